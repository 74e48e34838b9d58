//! Host maintenance on a 3-host cluster of real hosts: evacuating a host whose VMs have nowhere to
//! go reports why and strands nothing; evacuating it for real moves its three VMs away (two by
//! memory-only migration in the shared pool, or by storage migration to the host with its own
//! pool) while they keep running; an agent restarted as in a rolling upgrade leaves its VMs
//! running; returning the host with move-home brings them back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_testcluster::{Cluster, ClusterSpec, HostSpec};
use kumo_types::api::{Instance, Operation};
use kumo_types::migration::Evacuation;
use kumo_types::InstanceState;
use serde_json::{json, Value};

use crate::cluster::{wait_console, wait_state};
use crate::common::{demo_image_with, KUMO};
use crate::e2e::BOOTED;
use crate::storage::guest_sh;

const BOOT: Duration = Duration::from_secs(180);

fn step(t0: Instant, what: &str) {
    eprintln!("evacuate: [{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

async fn set_state(c: &Client, host: &str, state: &str) {
    let _: Value = c
        .post(
            &format!("/api/v1/hosts/{host}/state"),
            &json!({ "state": state }),
        )
        .await
        .unwrap_or_else(|e| panic!("{host} -> {state}: {e}"));
}

async fn wait_operation(c: &Client, id: &str) -> Operation {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let op = c.operation(id).await.expect("operation");
        if op.state != "running" {
            return op;
        }
        assert!(Instant::now() < deadline, "operation {id} never ended");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn host_names(c: &Client) -> HashMap<String, String> {
    c.hosts()
        .await
        .expect("hosts")
        .into_iter()
        .map(|h| (h.id, h.name))
        .collect()
}

async fn where_is(c: &Client, names: &HashMap<String, String>, id: &str) -> String {
    let i: Instance = c.instance(id).await.expect("instance");
    names
        .get(i.host_id.as_deref().unwrap_or_default())
        .cloned()
        .unwrap_or_default()
}

/// The guest's counter, read on its console (it must keep going).
async fn counter(c: &Client, id: &str) -> u64 {
    let out = guest_sh(c, id, "echo \"N=$(tail -n 1 /data/counter)\"").await;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("N="))
        .filter_map(|v| v.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("{id}: no counter in {out}"))
}

/// A member of another project, signed with its own key (made in the cluster's store).
async fn member_of(cluster: &Cluster, dir: &std::path::Path) -> Client {
    let store = kumo_store::Store::open_sqlite(&dir.join("server").join("kumo.db"))
        .await
        .expect("open store");
    let project = store.create_project("evac-users").await.expect("project");
    let user = store
        .create_user("eve", &project, "member")
        .await
        .expect("user");
    let key = store.create_access_key(&user).await.expect("key");
    store.close().await;
    let mut cfg = cluster.client_config();
    cfg.access_key_id = key.id.clone();
    cfg.secret_access_key = key.secret.clone();
    Client::new(cfg).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evacuate_return_and_rolling_agent_restart() {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("kumo-evacuate-")
        .tempdir()
        .expect("tempdir")
        .keep();
    let shared = |name: &str| {
        let mut h = HostSpec::qemu(name).capacity(4, 4096);
        h.storage_pool = Some("sp".into());
        h
    };
    let mut cluster = Cluster::start(ClusterSpec {
        kumo_bin: KUMO.into(),
        dir: dir.clone(),
        hosts: vec![
            shared("h1"),
            shared("h2"),
            HostSpec::qemu("h3").capacity(4, 4096),
        ],
        heartbeat_timeout_secs: 10,
        keep_dir: false,
    })
    .await
    .expect("start a 3-host cluster");
    step(t0, &format!("cluster up, logs in {}", dir.display()));
    let c = cluster.client();
    demo_image_with(&c).await;
    let names = host_names(&c).await;

    // Three VMs on h1: the other hosts take none while they are created.
    set_state(&c, "h2", "maintenance").await;
    set_state(&c, "h3", "maintenance").await;
    let mut vms = vec![];
    for n in 1..=3 {
        let req: kumo_types::api::CreateInstance = serde_json::from_value(json!({
            "name": format!("e{n}"), "image": "demo", "instance_type": "t1.nano"
        }))
        .expect("CreateInstance");
        vms.push(c.create_instance(&req, None).await.expect("create").id);
    }
    for id in &vms {
        wait_state(&c, id, InstanceState::Running, BOOT).await;
        wait_console(&c, id, BOOTED, BOOT).await;
        assert_eq!(where_is(&c, &names, id).await, "h1");
    }
    step(t0, "three VMs run on h1");

    // Nowhere to go: every VM is reported with the reason, none moves, h1 is in maintenance.
    let e: Evacuation = c
        .post("/api/v1/hosts/h1/evacuate", &json!({}))
        .await
        .expect("evacuate with nowhere to go");
    assert_eq!(e.items.len(), 3, "{e:?}");
    for item in &e.items {
        assert_eq!(item.result, "skipped", "{item:?}");
        let why = item.reason.clone().unwrap_or_default();
        assert!(
            why.contains("h2") && why.contains("maintenance"),
            "the reason names each host's refusal: {why}"
        );
    }
    let op = wait_operation(&c, &e.operation_id).await;
    assert_eq!(op.state, "succeeded", "{op:?}");
    assert_eq!(c.host("h1").await.expect("h1").state, "maintenance");
    for id in &vms {
        assert_eq!(where_is(&c, &names, id).await, "h1", "nothing moved");
        assert!(cluster.qemu_instances_on(0).contains(id), "{id} still runs");
    }
    // A member may not move VMs or hosts.
    let member = member_of(&cluster, &dir).await;
    let denied = member
        .post::<Value>("/api/v1/hosts/h1/evacuate", &json!({}))
        .await
        .expect_err("a member cannot evacuate");
    assert!(denied.to_string().contains("403"), "{denied}");
    let denied = member
        .post::<Value>(&format!("/api/v1/instances/{}/migrate", vms[0]), &json!({}))
        .await
        .expect_err("a member cannot migrate");
    assert!(
        denied.to_string().contains("403") || denied.to_string().contains("404"),
        "{denied}"
    );
    step(t0, "nowhere to go: reported, nothing stranded");

    // For real: h2 and h3 can take them.
    set_state(&c, "h2", "up").await;
    set_state(&c, "h3", "up").await;
    let before: HashMap<String, u64> = {
        let mut m = HashMap::new();
        for id in &vms {
            m.insert(id.clone(), counter(&c, id).await);
        }
        m
    };
    let started = Instant::now();
    let e: Evacuation = c
        .post("/api/v1/hosts/h1/evacuate", &json!({}))
        .await
        .expect("evacuate");
    assert!(
        e.items.iter().all(|i| i.result == "pending"),
        "{:?}",
        e.items
    );
    let op = wait_operation(&c, &e.operation_id).await;
    assert_eq!(op.state, "succeeded", "{op:?}");
    step(
        t0,
        &format!(
            "evacuated 3 VMs in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    assert!(cluster.qemu_instances_on(0).is_empty(), "h1 runs no VM");
    for id in &vms {
        let h = where_is(&c, &names, id).await;
        assert!(h == "h2" || h == "h3", "{id} on {h}");
        let i = c.instance(id).await.expect("instance");
        assert_eq!(i.state, InstanceState::Running);
        let n = counter(&c, id).await;
        assert!(
            n > before[id],
            "{id}: counter went on ({} -> {n})",
            before[id]
        );
    }

    // Rolling upgrade of an agent: it restarts, its VMs do not.
    let busy = (1..3)
        .find(|&i| !cluster.qemu_processes_on(i).is_empty())
        .expect("a host with VMs");
    let pids: Vec<u32> = cluster
        .qemu_processes_on(busy)
        .iter()
        .map(|p| p.pid)
        .collect();
    cluster.stop_agent(busy);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.start_agent(busy).expect("agent back");
    let deadline = Instant::now() + Duration::from_secs(60);
    let name = cluster.hosts()[busy].name.clone();
    while c.host(&name).await.map(|h| h.state).unwrap_or_default() != "up" {
        assert!(Instant::now() < deadline, "{name} never came back up");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after: Vec<u32> = cluster
        .qemu_processes_on(busy)
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(
        pids, after,
        "the VMs' QEMU processes outlived the agent restart"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cluster
            .qemu_processes_on(busy)
            .iter()
            .map(|p| p.pid)
            .collect::<Vec<_>>(),
        pids,
        "and the new agent did not fence them"
    );
    step(t0, &format!("agent of {name} restarted, its VMs ran on"));

    // Return h1 and bring its VMs home.
    let e: Evacuation = c
        .post("/api/v1/hosts/h1/return", &json!({"move_home": true}))
        .await
        .expect("return");
    assert_eq!(e.items.len(), 3, "{e:?}");
    let op = wait_operation(&c, &e.operation_id).await;
    assert_eq!(op.state, "succeeded", "{op:?}");
    assert_eq!(c.host("h1").await.expect("h1").state, "up");
    for id in &vms {
        assert_eq!(where_is(&c, &names, id).await, "h1", "{id} came home");
        assert!(cluster.qemu_instances_on(0).contains(id));
    }
    let events: Value = c.get("/api/v1/events?limit=500").await.expect("events");
    let text = events.to_string();
    for action in ["host.evacuation.started", "host.evacuated", "host.returned"] {
        assert!(text.contains(action), "no {action} event");
    }
    step(t0, "returned with move-home");
    cluster.teardown().await.expect("teardown");
    let _ = std::fs::remove_dir_all(&dir);
}
