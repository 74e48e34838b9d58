//! Needs root (namespaces, bridges); in CI a missing prerequisite is a failure, never a skip.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::*;

#[test]
fn names_fit_linux_interface_names() {
    assert_eq!(bridge_name(7), "kcb7");
    assert_eq!(veth_name(7, 2), "kcv7h2");
    assert_eq!(netns_name(7, "h2"), "kc7-h2");
    assert!(veth_name(255, 199).len() <= 15);
    assert!(valid_host_name("h1") && valid_host_name("host-2"));
    for bad in ["", "-a", "H1", "a b", "a/b", "outside", &"x".repeat(33)] {
        assert!(!valid_host_name(bad), "{bad:?}");
    }
}

/// The pid of a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().expect("wait for true");
    pid
}

struct Fake {
    id: u8,
    reg_dir: PathBuf,
    data_dir: PathBuf,
    netns: String,
    sleeper: Child,
}

/// What a SIGKILLed owner leaves: a registry entry naming a dead pid, a bridge, a host
/// namespace joined to it with a process inside, and a data dir. `with_lock`: the entry has its
/// (now unlocked) lock file, as `allocate` makes it; otherwise only the owner pid tells.
fn fake_cluster(with_lock: bool) -> Fake {
    let slot = registry::allocate().expect("allocate a cluster id");
    let id = slot.id;
    std::fs::write(slot.dir.join("owner"), format!("{} 0\n", dead_pid())).expect("owner");
    let data_dir = tempfile::Builder::new()
        .prefix("kumo-sweep-test-")
        .tempdir()
        .expect("tempdir")
        .keep();
    std::fs::write(data_dir.join(registry::DIR_MARKER), "x").expect("marker");
    registry::write_record(
        &slot.dir,
        &registry::Record {
            controller_pid: Some(dead_pid()),
            remove_dir: Some(data_dir.clone()),
            data_dir: Some(data_dir.clone()),
        },
    )
    .expect("record");
    let br = bridge_name(id);
    let ns = netns_name(id, "h1");
    let veth = veth_name(id, 0);
    sys::ip(&["link", "add", &br, "type", "bridge"]).expect("bridge");
    sys::ip(&["netns", "add", &ns]).expect("netns");
    sys::ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "mgmt0", "netns", &ns,
    ])
    .expect("veth");
    sys::ip(&["link", "set", &veth, "master", &br, "up"]).expect("enslave");
    let sleeper = Command::new(sys::ip_bin())
        .args(["netns", "exec", &ns, "sleep", "600"])
        .spawn()
        .expect("a process in the namespace");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sys::pids_in_netns(&ns).is_empty() {
        assert!(Instant::now() < deadline, "sleep did not start in {ns}");
        std::thread::sleep(Duration::from_millis(20));
    }
    if !with_lock {
        std::fs::remove_file(slot.dir.join("lock")).expect("remove lock file");
    }
    // The owner is gone: its lock goes with it.
    drop(slot.lock);
    Fake {
        id,
        reg_dir: slot.dir,
        data_dir,
        netns: ns,
        sleeper,
    }
}

fn leftovers(f: &Fake) -> Vec<String> {
    let mut left = vec![];
    if f.reg_dir.exists() {
        left.push(f.reg_dir.display().to_string());
    }
    if sys::netns_names().contains(&f.netns) {
        left.push(f.netns.clone());
    }
    for l in [bridge_name(f.id), veth_name(f.id, 0)] {
        if sys::link_exists(&l) {
            left.push(l);
        }
    }
    if f.data_dir.exists() {
        left.push(f.data_dir.display().to_string());
    }
    left
}

#[test]
fn sweep_removes_clusters_whose_owner_is_dead() {
    assert!(sys::is_root(), "this test needs root");
    let mut fakes = vec![fake_cluster(true), fake_cluster(false)];
    let swept = sweep_stale(false);
    // Another test process may sweep the same entries first: what counts is that they go.
    let deadline = Instant::now() + Duration::from_secs(30);
    for f in &mut fakes {
        loop {
            let left = leftovers(f);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster {} not swept (sweep said {swept:?}); left: {left:?}",
                f.id
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = f.sleeper.wait().expect("wait for the sleeper");
        assert!(
            !status.success(),
            "the process in {} was not killed",
            f.netns
        );
    }
}

#[test]
fn sweep_leaves_live_clusters_alone() {
    assert!(sys::is_root(), "this test needs root");
    let slot = registry::allocate().expect("allocate a cluster id");
    let br = bridge_name(slot.id);
    sys::ip(&["link", "add", &br, "type", "bridge"]).expect("bridge");
    sweep_stale(false);
    let alive = slot.dir.exists() && sys::link_exists(&br);
    // Clean up before asserting, so a failure leaves nothing behind.
    let problems = registry::remove_cluster(slot.id, &slot.dir);
    drop(slot.lock);
    assert!(
        alive,
        "a sweep removed a cluster whose owner holds its lock"
    );
    assert!(problems.is_empty(), "{problems:?}");
}
