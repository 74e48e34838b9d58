//! A cluster of real hosts (network namespaces, one `kumo agent` each, QEMU under TCG): a
//! spread group's members land two per host, checked against the QEMU processes in each
//! host's namespace, and the spare host stays empty; a host whose
//! agent stops goes `down` and is avoided while its VM keeps running; nothing is left after
//! teardown.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_testcluster::{Cluster, ClusterSpec, HostSpec};
use kumo_types::api::{CreateInstance, Instance};
use kumo_types::InstanceState;

use crate::common::{demo_image_with, pids_matching, KUMO};
use crate::e2e::BOOTED;

/// Bound for a boot on a busy 2-core machine under TCG with several guests booting at once.
/// Only there to stop a hang.
const BOOT: Duration = Duration::from_secs(180);
/// Bound for a host to be seen down (heartbeat timeout 6 s) or up again.
const HOST_STATE: Duration = Duration::from_secs(60);

fn create_req(name: &str) -> CreateInstance {
    // Built from JSON so fields added to the request later (all defaulted) need no change here.
    serde_json::from_value(serde_json::json!({
        "name": name,
        "image": "demo",
        "instance_type": "t1.nano",
    }))
    .expect("a CreateInstance")
}

pub(crate) async fn wait_state(
    c: &Client,
    id: &str,
    want: InstanceState,
    timeout: Duration,
) -> Instance {
    let deadline = Instant::now() + timeout;
    loop {
        let i = c.instance(id).await.expect("instance");
        if i.state == want {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "{id} is {} (last error {:?}), wanted {want}",
            i.state,
            i.last_error
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the console shows `needle`; returns the console text.
pub(crate) async fn wait_console(c: &Client, id: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(out) = c.console(id, 1 << 20).await {
            if out.output.contains(needle) {
                return out.output;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id}'s console never showed {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Host id -> host name, from the API.
async fn host_names(c: &Client) -> BTreeMap<String, String> {
    c.hosts()
        .await
        .expect("hosts")
        .into_iter()
        .map(|h| (h.id, h.name))
        .collect()
}

async fn host_state(c: &Client, name: &str) -> String {
    c.hosts()
        .await
        .expect("hosts")
        .into_iter()
        .find(|h| h.name == name)
        .map(|h| h.state)
        .unwrap_or_default()
}

/// Instance id -> name of the host whose namespace runs its QEMU process.
fn qemu_placement(cluster: &Cluster) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, h) in cluster.hosts().iter().enumerate() {
        for id in cluster.qemu_instances_on(i) {
            out.entry(id).or_default().push(h.name.clone());
        }
    }
    out
}

fn qemu_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn command_stdout(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_real_hosts() {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("kumo-cluster-")
        .tempdir()
        .expect("tempdir")
        // The cluster removes it on teardown (or keeps it with KUMO_TEST_KEEP).
        .keep();
    let host = |name: &str| HostSpec::qemu(name).capacity(2, 2048);
    let mut cluster = Cluster::start(ClusterSpec {
        kumo_bin: KUMO.into(),
        dir: dir.clone(),
        hosts: vec![
            host("h1"),
            host("h2"),
            host("h3"),
            host("h4").label("role", "spare"),
        ],
        heartbeat_timeout_secs: 6,
        keep_dir: false,
    })
    .await
    .expect("start a 4-host cluster");
    let x = cluster.id();
    eprintln!(
        "cluster {x} up in {:?}: {} hosts, logs in {}",
        t0.elapsed(),
        cluster.hosts().len(),
        dir.display()
    );
    let c = cluster.client();
    let names = host_names(&c).await;
    assert_eq!(
        names.values().cloned().collect::<BTreeSet<_>>(),
        ["h1", "h2", "h3", "h4"].map(String::from).into(),
        "{names:?}"
    );
    // The management network: each host reaches the controller's address, and only its
    // own subnet (no default route).
    for (i, h) in cluster.hosts().iter().enumerate() {
        assert_eq!(h.mgmt_ip, format!("10.252.{x}.{}", 10 + i));
        let routes = cluster.exec_in(i, &["ip", "route"]);
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(!routes.contains("default"), "{}: {routes}", h.name);
    }

    // Six instances of one spread group (at most 2 per host) land two on each plain host;
    // the spare host gets none, although it is the emptiest.
    demo_image_with(&c).await;
    c.create_placement_group(&kumo_types::api::CreatePlacementGroup {
        name: "web".into(),
        strategy: None,
        max_per_host: Some(2),
        spread_storage: false,
    })
    .await
    .expect("spread group");
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    for n in 1..=6 {
        let mut req = create_req(&format!("web{n}"));
        req.placement_group = Some("web".into());
        let i = c.create_instance(&req, None).await.expect("create");
        let host_id = i.host_id.clone().expect("placed at creation");
        placed.insert(i.id.clone(), names[&host_id].clone());
    }
    for id in placed.keys() {
        wait_state(&c, id, InstanceState::Running, BOOT).await;
        wait_console(&c, id, BOOTED, BOOT).await;
    }
    eprintln!("6 guests booted at {:?}: {placed:?}", t0.elapsed());
    let seen = qemu_placement(&cluster);
    for (id, host) in &placed {
        assert_eq!(
            seen.get(id),
            Some(&vec![host.clone()]),
            "the API puts {id} on {host}; QEMU processes per namespace: {seen:?}"
        );
    }
    assert_eq!(seen.len(), 6, "stray QEMU processes: {seen:?}");
    for (i, h) in cluster.hosts().iter().enumerate() {
        let n = cluster.qemu_instances_on(i).len();
        let want = if h.name == "h4" { 0 } else { 2 };
        assert_eq!(n, want, "{} runs {n} QEMU processes: {seen:?}", h.name);
    }
    // A seventh member has nowhere to go: every plain host holds 2, the spare is not used.
    let mut seventh = create_req("web7");
    seventh.placement_group = Some("web".into());
    match c.create_instance(&seventh, None).await {
        Err(kumo_cli::ClientError::Api { code, message, .. }) => {
            assert_eq!(code, "InsufficientCapacity");
            assert!(message.contains("spread group web"), "{message}");
            assert!(message.contains("h4: spare host"), "{message}");
        }
        other => panic!("a seventh member was placed: {other:?}"),
    }

    // h2's agent stops: its VM keeps running, the controller marks h2 down after the
    // heartbeat timeout, and new instances go elsewhere.
    let h2 = cluster.host_index("h2").expect("h2");
    let on_h2 = cluster.qemu_processes_on(h2);
    assert_eq!(on_h2.len(), 2, "{on_h2:?}");
    let (vm_h2, qemu_pid) = (on_h2[0].instance_id.clone(), on_h2[0].pid);
    cluster.stop_agent(h2);
    assert!(qemu_alive(qemu_pid), "QEMU {qemu_pid} died with h2's agent");
    let deadline = Instant::now() + HOST_STATE;
    loop {
        let s = host_state(&c, "h2").await;
        if s == "down" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "h2 is still {s} with its agent stopped"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("h2 down at {:?}", t0.elapsed());
    assert!(
        qemu_alive(qemu_pid),
        "QEMU {qemu_pid} died while h2 was down"
    );
    let vm4 = c
        .create_instance(&create_req("vm4"), None)
        .await
        .expect("create while h2 is down");
    let vm4_host = names[vm4.host_id.as_deref().expect("vm4 placed")].clone();
    assert!(
        vm4_host != "h2" && vm4_host != "h4",
        "vm4 went to {vm4_host} (h2 is down, h4 is spare)"
    );

    // The agent comes back: h2 is up again and re-attached to the same QEMU process.
    cluster.start_agent(h2).expect("restart h2's agent");
    cluster
        .wait_host_state("h2", "up", HOST_STATE)
        .await
        .expect("h2 up again");
    wait_state(&c, &vm_h2, InstanceState::Running, HOST_STATE).await;
    let mut after = cluster.qemu_processes_on(h2);
    let mut before = on_h2.clone();
    after.sort_by_key(|p| p.pid);
    before.sort_by_key(|p| p.pid);
    assert_eq!(after, before, "h2 should still run the same QEMU processes");
    assert!(qemu_alive(qemu_pid));
    eprintln!("h2 back at {:?}", t0.elapsed());

    // Terminating every instance leaves no QEMU in any namespace.
    let all: Vec<String> = placed
        .keys()
        .cloned()
        .chain(std::iter::once(vm4.id.clone()))
        .collect();
    for id in &all {
        c.terminate(id).await.expect("terminate");
    }
    for id in &all {
        wait_state(&c, id, InstanceState::Terminated, BOOT).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = qemu_placement(&cluster);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU left after terminating everything: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Teardown leaves nothing: no namespace, link, registry entry, process or data dir.
    cluster.teardown().await.expect("teardown");
    drop(cluster);
    let netns = command_stdout("ip", &["netns", "list"]);
    let ns_prefix = format!("kc{x}-");
    assert!(
        !netns.lines().any(|l| l.starts_with(&ns_prefix)),
        "namespaces left: {netns}"
    );
    let links = command_stdout("ip", &["-br", "link"]);
    for prefix in [format!("kcb{x} "), format!("kcb{x}@"), format!("kcv{x}h")] {
        assert!(
            !links.lines().any(|l| l.starts_with(&prefix)),
            "links left: {links}"
        );
    }
    let d = dir.display().to_string();
    assert!(
        pids_matching(&[&d]).is_empty(),
        "processes of the cluster left: {:?}",
        pids_matching(&[&d])
    );
    assert!(
        !std::path::Path::new(kumo_testcluster::REGISTRY)
            .join(x.to_string())
            .exists(),
        "registry entry {x} left"
    );
    if std::env::var_os("KUMO_TEST_KEEP").is_none() {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    eprintln!("cluster test done in {:?}", t0.elapsed());
}
