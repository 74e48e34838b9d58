//! Network-path failure (seed 000, test 2: a VM moves away when its host's network path fails) on
//! a 3-host cluster of real hosts (namespaces, agents, QEMU under TCG). Every agent probes the
//! outside namespace over its public bridge (`--probe 203.0.113.1%pub0`, an ARP probe: `pub0` has
//! no address); h3 also probes an address nobody has, so one of its targets always fails and it
//! must never be chosen as a destination. h1 and h2 share a pool (the move is memory only).
//!
//! The VM runs on h1 behind an elastic IP. A one-second cut of h2's public link changes nothing
//! (the probes' window is three failures). Cutting h1's public link (management stays up) makes
//! h1 `draining` and live-migrates the VM to h2 (reason `path-failure`), where the same guest runs
//! on and the outside reaches it again; restoring the link journals `host.path.up` and h1 stays
//! draining.

use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_testcluster::{Cluster, ClusterSpec, HostSpec, OUTSIDE_IP};
use kumo_types::api::{Event, Host};
use kumo_types::migration::Migration;
use kumo_types::InstanceState;
use serde_json::{json, Value};

use crate::cluster::{wait_console, wait_state};
use crate::common::{demo_image_with, KUMO};
use crate::e2e::BOOTED;
use crate::storage::guest_sh;

const BOOT: Duration = Duration::from_secs(180);
/// Probes see the cut within ~3 s and the shared-pool move takes seconds; only stops a hang.
const REACT: Duration = Duration::from_secs(120);
const GOOD: &str = "203.0.113.1%pub0";
const DEAD: &str = "203.0.113.99%pub0";

fn step(t0: Instant, what: &str) {
    eprintln!("netpath: [{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

async fn host(c: &Client, name: &str) -> Host {
    c.host(name).await.expect("host")
}

/// Polls host `name` until `ok` holds; returns it.
async fn wait_host(c: &Client, name: &str, what: &str, ok: impl Fn(&Host) -> bool) -> Host {
    let deadline = Instant::now() + REACT;
    loop {
        let h = host(c, name).await;
        if ok(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "{name}: never {what}: {h:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn path_state(h: &Host) -> Option<&str> {
    h.path.as_ref().map(|p| p.state.as_str())
}

async fn events(c: &Client, action: &str, target: &str) -> Vec<Event> {
    c.events(1000)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.action == action && e.target.as_deref() == Some(target))
        .collect()
}

async fn migrations_of(c: &Client, vm: &str) -> Vec<Migration> {
    c.get::<kumo_types::api::Page<Migration>>("/api/v1/migrations")
        .await
        .expect("migrations")
        .items
        .into_iter()
        .filter(|m| m.instance_id == vm)
        .collect()
}

/// The guest's uptime in seconds (from its serial console: works whatever its network does).
/// Retried: right after a migration the first characters typed can be lost.
async fn uptime(c: &Client, vm: &str) -> f64 {
    let mut outs = vec![];
    for _ in 0..5 {
        let out = guest_sh(c, vm, "echo UP $(cut -d' ' -f1 /proc/uptime)").await;
        let up = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("UP "))
            .find_map(|v| v.trim().parse().ok());
        if let Some(up) = up {
            return up;
        }
        outs.push(out);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("no uptime from {vm}: {outs:?}");
}

/// Whether the outside namespace gets the guest's page through its elastic IP.
fn outside_reaches(cluster: &Cluster, url: &str, vm: &str) -> bool {
    let out = cluster.exec_outside(&["timeout", "3", "busybox", "wget", "-q", "-O", "-", url]);
    String::from_utf8_lossy(&out.stdout).contains(vm)
}

async fn wait_outside(cluster: &Cluster, url: &str, vm: &str) {
    let deadline = Instant::now() + REACT;
    while !outside_reaches(cluster, url, vm) {
        assert!(Instant::now() < deadline, "the outside never reached {url}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_whose_vm_path_fails_is_drained_by_live_migration() {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("kumo-netpath-")
        .tempdir()
        .expect("tempdir")
        // The cluster removes it on teardown, also a failed test's (or keeps it with KUMO_TEST_KEEP).
        .keep();
    let spec = |name: &str, pool: Option<&str>, probes: &[&str]| {
        let mut h = HostSpec::qemu(name).capacity(4, 4096);
        h.storage_pool = pool.map(str::to_string);
        for p in probes {
            h.extra_args.extend(["--probe".to_string(), p.to_string()]);
        }
        h
    };
    let mut cluster = Cluster::start(ClusterSpec {
        kumo_bin: KUMO.into(),
        dir: dir.clone(),
        hosts: vec![
            spec("h1", Some("sp"), &[GOOD]),
            spec("h2", Some("sp"), &[GOOD]),
            spec("h3", None, &[GOOD, DEAD]),
        ],
        heartbeat_timeout_secs: 10,
        keep_dir: false,
    })
    .await
    .expect("start a 3-host cluster");
    step(t0, &format!("cluster up, logs in {}", dir.display()));
    let c = cluster.client();

    // Every host reports its path: h1 and h2 fine, h3 with its dead target failing.
    for name in ["h1", "h2"] {
        let h = wait_host(&c, name, "path ok", |h| path_state(h) == Some("ok")).await;
        assert_eq!(
            h.path.as_ref().map(|p| p.targets.clone()),
            Some(vec![GOOD.to_string()])
        );
    }
    let h3 = wait_host(&c, "h3", "path degraded", |h| {
        path_state(h) == Some("degraded")
    })
    .await;
    assert_eq!(
        h3.path.as_ref().map(|p| p.failing.clone()),
        Some(vec![DEAD.to_string()])
    );
    assert_eq!(
        h3.state, "up",
        "one failing target of two is no path failure"
    );

    demo_image_with(&c).await;
    let _: Value = c
        .request(
            "PUT",
            "/api/v1/address-pool",
            Some(&json!({"cidr": "203.0.113.0/24", "gateway": OUTSIDE_IP,
                         "first": "203.0.113.10", "last": "203.0.113.20"})),
            None,
        )
        .await
        .expect("address pool");
    let _: Value = c
        .post(
            "/api/v1/security-groups/default/rules",
            &json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80,
                    "cidr": "0.0.0.0/0"}),
        )
        .await
        .expect("allow 80");

    // The VM starts on h1: the others are in maintenance while it is placed.
    for name in ["h2", "h3"] {
        c.set_host_state(name, "maintenance")
            .await
            .expect("maintenance");
    }
    let req: kumo_types::api::CreateInstance = serde_json::from_value(json!({
        "name": "pathvm", "image": "demo", "instance_type": "t1.nano"
    }))
    .expect("CreateInstance");
    let vm = c.create_instance(&req, None).await.expect("create").id;
    let i = wait_state(&c, &vm, InstanceState::Running, BOOT).await;
    for name in ["h2", "h3"] {
        c.set_host_state(name, "up").await.expect("up again");
    }
    let h1 = host(&c, "h1").await;
    assert_eq!(i.host_id.as_deref(), Some(h1.id.as_str()), "placed on h1");
    wait_console(&c, &vm, BOOTED, BOOT).await;
    let addr: Value = c
        .post("/api/v1/addresses", &json!({}))
        .await
        .expect("allocate");
    let eip = addr["public_ip"].as_str().expect("ip").to_string();
    let _: Value = c
        .post(
            &format!(
                "/api/v1/addresses/{}/associate",
                addr["id"].as_str().expect("id")
            ),
            &json!({"instance_id": vm}),
        )
        .await
        .expect("associate");
    let url = format!("http://{eip}/");
    wait_outside(&cluster, &url, &vm).await;
    assert!(cluster.qemu_instances_on(0).contains(&vm));
    step(t0, &format!("{vm} runs on h1, reachable at {eip}"));

    // A flap shorter than the probes' window changes nothing.
    let h2 = host(&c, "h2").await;
    cluster.cut_public(1).expect("cut h2");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.restore_public(1).expect("restore h2");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        events(&c, "host.path.down", &h2.id).await.is_empty(),
        "a 1 s flap of h2 acted"
    );
    let h2 = host(&c, "h2").await;
    assert_eq!((h2.state.as_str(), path_state(&h2)), ("up", Some("ok")));
    step(t0, "a 1 s flap of h2's public link: nothing happened");

    // h1's VM-facing path fails; its management path stays up.
    let before = uptime(&c, &vm).await;
    let cut_at = Instant::now();
    cluster.cut_public(0).expect("cut h1");
    let h1 = wait_host(&c, "h1", "draining", |h| h.state == "draining").await;
    step(
        t0,
        &format!(
            "h1 draining {:.1} s after the cut",
            cut_at.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(path_state(&h1), Some("down"));
    assert!(h1.last_heartbeat.is_some(), "h1's heartbeats still arrive");
    let down = events(&c, "host.path.down", &h1.id).await;
    assert_eq!(down.len(), 1, "{down:?}");
    assert!(
        down[0].detail.as_deref().is_some_and(|d| d.contains(GOOD)),
        "{down:?}"
    );

    // The VM is live-migrated to h2 (h3's own path is half down: never a destination).
    let deadline = Instant::now() + REACT;
    let m = loop {
        let ms = migrations_of(&c, &vm).await;
        if let Some(m) = ms
            .iter()
            .find(|m| !matches!(m.step.as_str(), "done" | "failed"))
        {
            assert_eq!(m.reason, "path-failure", "{m:?}");
        }
        if let Some(m) = ms.into_iter().find(|m| m.step == "done") {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the VM never moved: {:?}",
            migrations_of(&c, &vm).await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    step(
        t0,
        &format!(
            "migrated {:.1} s after the cut: {:?}",
            cut_at.elapsed().as_secs_f64(),
            m.stats
        ),
    );
    let h2 = host(&c, "h2").await;
    assert_eq!(m.reason, "path-failure");
    assert_eq!(m.source_host, h1.id);
    assert_eq!(
        m.dest_host, h2.id,
        "h3 has a failing probe: not a destination"
    );
    assert_eq!(m.mode, "shared");
    let i = c.instance(&vm).await.expect("instance");
    assert_eq!(i.host_id.as_deref(), Some(h2.id.as_str()));
    assert_eq!(i.state, InstanceState::Running);
    let deadline = Instant::now() + REACT;
    while cluster.qemu_instances_on(0).contains(&vm) {
        assert!(Instant::now() < deadline, "h1 still runs a QEMU of {vm}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(cluster.qemu_instances_on(1).contains(&vm), "h2 runs it");
    assert!(!cluster.qemu_instances_on(2).contains(&vm), "not h3");

    // The same guest kept running (no reboot), and the outside reaches it again through h2.
    let after = uptime(&c, &vm).await;
    assert!(
        after > before + cut_at.elapsed().as_secs_f64() * 0.5,
        "the guest rebooted or stalled: uptime {before} -> {after}"
    );
    wait_outside(&cluster, &url, &vm).await;
    step(
        t0,
        &format!("guest uptime {before:.0} s -> {after:.0} s; reachable at {eip} via h2"),
    );
    let started = events(&c, "host.evacuation.started", &h1.id).await;
    assert_eq!(started.len(), 1, "{started:?}");
    let deadline = Instant::now() + REACT;
    while events(&c, "host.evacuated", &h1.id).await.is_empty() {
        assert!(Instant::now() < deadline, "no host.evacuated event");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Still down: nothing more happens (one outage, one evacuation).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(events(&c, "host.path.down", &h1.id).await.len(), 1);
    assert_eq!(events(&c, "host.evacuation.started", &h1.id).await.len(), 1);
    assert_eq!(migrations_of(&c, &vm).await.len(), 1);

    // The path comes back: journalled; h1 stays draining until an operator returns it.
    cluster.restore_public(0).expect("restore h1");
    let h1 = wait_host(&c, "h1", "path ok", |h| path_state(h) == Some("ok")).await;
    assert_eq!(h1.state, "draining");
    let up = events(&c, "host.path.up", &h1.id).await;
    assert_eq!(up.len(), 1, "{up:?}");
    // `kumo host return h1 --move-home`: up again, and the VM goes back to it.
    let _: Value = c
        .post("/api/v1/hosts/h1/return", &json!({"move_home": true}))
        .await
        .expect("return h1");
    assert_eq!(host(&c, "h1").await.state, "up");
    let deadline = Instant::now() + REACT;
    loop {
        let i = c.instance(&vm).await.expect("instance");
        if i.host_id.as_deref() == Some(h1.id.as_str()) && i.state == InstanceState::Running {
            break;
        }
        assert!(Instant::now() < deadline, "the VM never went home: {i:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        events(&c, "host.path.down", &h1.id).await.len(),
        1,
        "acted again after the return"
    );
    wait_outside(&cluster, &url, &vm).await;
    step(
        t0,
        "path back: host.path.up; h1 returned and the VM moved home",
    );

    cluster.teardown().await.expect("teardown");
    step(t0, "done");
}
