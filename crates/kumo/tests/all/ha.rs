//! HA failover on a 3-host test cluster with a shared pool (real guests under TCG).
//!
//! - A host dies (agent, QEMU, dnsmasq killed): its HA instances boot on the other hosts,
//!   highest priority first; the non-HA one stays; the guests' disk counters continue without a
//!   gap; a watcher polling every host's QEMU processes every 200 ms never sees an instance on
//!   two hosts at once. The host comes back without running what it lost.
//! - A host is partitioned (management link down): it kills its VM itself when the lease lapses,
//!   and only then does the VM start elsewhere; reconnected, the host does not run it again.
//! - An HA priority out of range is refused (400) and changes nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kumo_cli::{Client, ClientError};
use kumo_testcluster::{qemu_processes_in, Cluster, ClusterSpec, HostSpec};
use kumo_types::api::{CreateInstance, Event, Instance};
use kumo_types::InstanceState;

use crate::cluster::{wait_console, wait_state};
use crate::common::{demo_image_with, Cloud, Hv, KUMO};
use crate::e2e::BOOTED;
use crate::storage::{api_err, guest_sh};

/// Only there to stop a hang (a loaded 2-core machine, guests under TCG).
const BOOT: Duration = Duration::from_secs(150);
/// Kill to boot elsewhere: the goal is well under 15 s; this bound only stops a hang.
const FAILOVER: Duration = Duration::from_secs(90);

/// The two cluster tests run one after the other: each boots several TCG guests.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn req(name: &str, ha: bool, prio: u32) -> CreateInstance {
    // JSON, so fields added later (all defaulted) need no change here.
    serde_json::from_value(serde_json::json!({
        "name": name,
        "image": "demo",
        "instance_type": "t1.nano",
        "ha": ha,
        "ha_priority": prio,
    }))
    .expect("a CreateInstance")
}

async fn start_cluster(prefix: &str) -> Cluster {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
        // The cluster removes it on teardown (or keeps it with KUMO_TEST_KEEP).
        .keep();
    let host = |name: &str| HostSpec {
        storage_pool: Some("ha".into()),
        ..HostSpec::qemu(name).capacity(2, 2048)
    };
    Cluster::start(ClusterSpec {
        kumo_bin: KUMO.into(),
        dir,
        hosts: vec![host("a"), host("b"), host("c")],
        // The HA defaults: down after 3 s of silence (lease 6 s, heartbeats every second).
        heartbeat_timeout_secs: 3,
        keep_dir: false,
    })
    .await
    .expect("start a 3-host cluster")
}

/// Create instances that all land on `host`: the other hosts drain meanwhile.
async fn create_on(
    c: &Client,
    host: &str,
    others: &[&str],
    reqs: &[CreateInstance],
) -> Vec<Instance> {
    for o in others {
        c.set_host_state(o, "draining").await.expect("drain");
    }
    let mut out = vec![];
    for r in reqs {
        out.push(c.create_instance(r, None).await.expect("create"));
    }
    for o in others {
        c.set_host_state(o, "up").await.expect("undrain");
    }
    let hosts = host_ids(c).await;
    for i in &out {
        assert_eq!(
            i.host_id.as_deref(),
            Some(hosts[host].as_str()),
            "{} placed",
            i.name
        );
    }
    out
}

/// Host name -> id.
async fn host_ids(c: &Client) -> BTreeMap<String, String> {
    c.hosts()
        .await
        .expect("hosts")
        .into_iter()
        .map(|h| (h.name, h.id))
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

async fn wait_host(c: &Client, name: &str, state: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let s = host_state(c, name).await;
        if s == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "host {name} is {s}, wanted {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events of these actions about `target`, oldest first.
async fn events_of(c: &Client, actions: &[&str], target: &str) -> Vec<Event> {
    let mut v: Vec<Event> = c
        .events(1000)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| actions.contains(&e.action.as_str()) && e.target.as_deref() == Some(target))
        .collect();
    v.sort_by_key(|e| e.id);
    v
}

/// What the watcher saw of one instance on one host.
#[derive(Debug, Clone, Copy)]
struct Seen {
    first: DateTime<Utc>,
    last: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct Log {
    polls: u64,
    /// Moments an instance ran on two hosts at once.
    doubles: Vec<String>,
    /// (instance, host name) -> when its QEMU was first and last seen there.
    seen: BTreeMap<(String, String), Seen>,
}

/// Polls every host's QEMU processes every 200 ms on its own thread until dropped.
struct Watcher {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(cluster: &Cluster) -> Watcher {
        let hosts: Vec<(String, String)> = cluster
            .hosts()
            .iter()
            .map(|h| (h.name.clone(), h.netns.clone()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Log::default()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let now = Utc::now();
                let mut on: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (name, ns) in &hosts {
                    for q in qemu_processes_in(ns) {
                        on.entry(q.instance_id).or_default().push(name.clone());
                    }
                }
                if let Ok(mut log) = l.lock() {
                    log.polls += 1;
                    for (id, where_) in &on {
                        if where_.len() > 1 {
                            log.doubles.push(format!("{now}: {id} on {where_:?}"));
                        }
                        for h in where_ {
                            log.seen
                                .entry((id.clone(), h.clone()))
                                .and_modify(|s| s.last = now)
                                .or_insert(Seen {
                                    first: now,
                                    last: now,
                                });
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Watcher {
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn seen(&self, id: &str, host: &str) -> Option<Seen> {
        self.log
            .lock()
            .ok()
            .and_then(|l| l.seen.get(&(id.to_string(), host.to_string())).copied())
    }

    /// Stop polling; the log must show polls and no instance on two hosts at once.
    fn finish(mut self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let log = std::mem::take(&mut *self.log.lock().expect("watch log"));
        assert!(
            log.polls > 10,
            "the watcher barely ran: {} polls",
            log.polls
        );
        assert!(
            log.doubles.is_empty(),
            "two copies ran at once: {:?}",
            log.doubles
        );
        log
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The guest's `/data/counter` once it is written (right after boot the guest may still be
/// mounting its disk): how many lines, and the checker's output (`GAP` if it is not 1..N).
async fn counter(c: &Client, id: &str) -> (u64, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = guest_sh(
            c,
            id,
            "awk 'NR != $0 { print \"GAP\", NR, $0; exit } END { print \"LINES\", NR }' /data/counter",
        )
        .await;
        let lines: Option<u64> = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("LINES "))
            .and_then(|n| n.trim().parse().ok());
        match lines {
            Some(n) if n > 0 => return (n, out),
            _ => assert!(Instant::now() < deadline, "{id}: no counter: {out:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Wait until the instance runs on a host other than `not`, booted there; returns that host's id.
async fn wait_moved(c: &Client, id: &str, not: &str) -> String {
    let deadline = Instant::now() + FAILOVER;
    loop {
        let i = c.instance(id).await.expect("instance");
        if let Some(h) = i.host_id.as_deref() {
            if h != not && i.state == InstanceState::Running {
                wait_console(c, id, &format!("{BOOTED}{id}"), FAILOVER).await;
                return h.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not move off {not}: {:?} {} ({:?})",
            i.host_id,
            i.state,
            i.last_error
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_host_s_ha_instances_boot_elsewhere_by_priority() {
    let _one = ONE_CLUSTER.lock().await;
    let t0 = Instant::now();
    let mut cluster = start_cluster("kumo-ha-kill-").await;
    let c = cluster.client();
    demo_image_with(&c).await;
    let ids = host_ids(&c).await;
    let a_idx = cluster.host_index("a").expect("a");
    let vms = create_on(
        &c,
        "a",
        &["b", "c"],
        &[
            req("low", true, 100),
            req("high", true, 900),
            req("plain", false, 500),
        ],
    )
    .await;
    let (low, high, plain) = (&vms[0], &vms[1], &vms[2]);
    for v in &vms {
        wait_state(&c, &v.id, InstanceState::Running, BOOT).await;
        wait_console(&c, &v.id, &format!("{BOOTED}{}", v.id), BOOT).await;
    }
    let mut before = BTreeMap::new();
    for v in [low, high] {
        let (n, out) = counter(&c, &v.id).await;
        assert!(n > 0 && !out.contains("GAP"), "{}: {out:?}", v.name);
        before.insert(v.id.clone(), n);
    }
    eprintln!("ha: 3 guests writing on host a at {:?}", t0.elapsed());

    let watch = Watcher::start(&cluster);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    let killed_at = Utc::now();
    cluster.kill_host(a_idx);
    assert!(
        cluster.pids_on(a_idx).is_empty(),
        "host a's processes are all gone"
    );

    // Both HA instances boot elsewhere; the kill -> boot time goes into the test output.
    let mut booted = BTreeMap::new();
    for v in [high, low] {
        let to = wait_moved(&c, &v.id, &ids["a"]).await;
        booted.insert(v.name.clone(), (to, killed.elapsed()));
    }
    for (name, (to, t)) in &booted {
        eprintln!(
            "ha: {name} booted on {to} {:.1} s after host a was killed",
            t.as_secs_f64()
        );
    }
    wait_host(&c, "a", "fenced", Duration::from_secs(30)).await;

    // Highest priority first.
    let mut moved: Vec<Event> = vec![];
    for v in [high, low] {
        let e = events_of(&c, &["instance.failover"], &v.id)
            .await
            .into_iter()
            .find(|e| e.result == "ok")
            .unwrap_or_else(|| panic!("no failover event for {}", v.name));
        moved.push(e);
    }
    assert!(moved[0].id < moved[1].id, "high before low: {moved:?}");
    for e in &moved {
        let d = e.detail.clone().unwrap_or_default();
        assert!(
            d.contains("after the host's last heartbeat") && d.contains(&ids["a"]),
            "{d}"
        );
        assert!(e.time > killed_at, "failed over after the kill: {e:?}");
    }
    let fenced = events_of(&c, &["host.fenced"], &ids["a"]).await;
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    assert!(
        fenced[0]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("leases expired at"),
        "{fenced:?}"
    );
    assert!(
        events_of(&c, &["host.down"], &ids["a"]).await.len() == 1,
        "host a went down once"
    );

    // The non-HA instance stayed (reported), and runs nowhere.
    let p = c.instance(&plain.id).await.expect("plain");
    assert_eq!(
        p.host_id.as_deref(),
        Some(ids["a"].as_str()),
        "plain did not move"
    );
    let skipped = events_of(&c, &["instance.failover"], &plain.id).await;
    assert!(
        skipped
            .iter()
            .any(|e| e.result == "skipped"
                && e.detail.as_deref().unwrap_or("").contains("HA is off")),
        "{skipped:?}"
    );
    for h in ["a", "b", "c"] {
        assert!(
            watch.seen(&plain.id, h).is_none_or(|s| s.last < killed_at),
            "plain ran on {h} after the kill"
        );
    }

    // The disks: the guests mount them and their counters continue, 1..N without a gap.
    for v in [low, high] {
        let (n, out) = counter(&c, &v.id).await;
        assert!(!out.contains("GAP"), "{}: {out:?}", v.name);
        assert!(
            n + 1 >= before[&v.id],
            "{}: {n} lines, {} before the kill",
            v.name,
            before[&v.id]
        );
    }

    // Host a comes back (as after a reboot): it forgets the instances that moved and never
    // starts them; it gets its non-HA instance back.
    cluster.start_agent(a_idx).expect("restart a");
    wait_host(&c, "a", "up", Duration::from_secs(60)).await;
    wait_state(&c, &plain.id, InstanceState::Running, BOOT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for v in [low, high] {
        assert!(
            watch.seen(&v.id, "a").is_none_or(|s| s.last < killed_at),
            "{} ran on a again",
            v.name
        );
        assert!(
            !cluster.hosts()[a_idx]
                .data_dir
                .join("ledger")
                .join(format!("{}.json", v.id))
                .exists(),
            "host a forgot {}",
            v.name
        );
    }
    let log = watch.finish();
    eprintln!(
        "ha: kill test done in {:?} ({} polls, never two copies)",
        t0.elapsed(),
        log.polls
    );
    cluster.teardown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_host_fences_itself_before_the_vm_moves() {
    let _one = ONE_CLUSTER.lock().await;
    let t0 = Instant::now();
    let mut cluster = start_cluster("kumo-ha-cut-").await;
    let c = cluster.client();
    demo_image_with(&c).await;
    let ids = host_ids(&c).await;
    let b_idx = cluster.host_index("b").expect("b");
    let vm = create_on(&c, "b", &["a", "c"], &[req("solo", true, 500)])
        .await
        .remove(0);
    wait_state(&c, &vm.id, InstanceState::Running, BOOT).await;
    wait_console(&c, &vm.id, &format!("{BOOTED}{}", vm.id), BOOT).await;
    let (n0, _) = counter(&c, &vm.id).await;

    let watch = Watcher::start(&cluster);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = Instant::now();
    cluster.cut_mgmt(b_idx).expect("cut b's management link");

    // b kills the VM itself once its lease lapses (6 s from its last heartbeat).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.qemu_instances_on(b_idx).contains(&vm.id) {
        assert!(Instant::now() < deadline, "b never fenced {}", vm.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fenced_after = cut.elapsed();
    let to = wait_moved(&c, &vm.id, &ids["b"]).await;
    let booted_after = cut.elapsed();
    eprintln!(
        "ha: b fenced its VM {:.1} s after the cut; it booted on {to} {:.1} s after the cut",
        fenced_after.as_secs_f64(),
        booted_after.as_secs_f64()
    );
    let on_b = watch.seen(&vm.id, "b").expect("seen on b");
    let to_name = ids
        .iter()
        .find(|(_, id)| **id == to)
        .map(|(n, _)| n.clone())
        .expect("new host");
    let on_new = watch.seen(&vm.id, &to_name).expect("seen on the new host");
    assert!(
        on_b.last < on_new.first,
        "b's copy was gone (last seen {}) before the new one started (first seen {})",
        on_b.last,
        on_new.first
    );
    let failover = events_of(&c, &["instance.failover"], &vm.id)
        .await
        .into_iter()
        .find(|e| e.result == "ok")
        .expect("failover event");
    assert!(
        on_b.last < failover.time,
        "fenced (last seen {}) before the failover ({})",
        on_b.last,
        failover.time
    );
    let journal = std::fs::read_to_string(cluster.hosts()[b_idx].data_dir.join("fencing.log"))
        .expect("b's fencing journal");
    assert!(journal.contains(&vm.id), "{journal}");

    // Reconnected: b comes back up, reports the fencing, and never runs the VM again.
    cluster.restore_mgmt(b_idx).expect("restore b");
    wait_host(&c, "b", "up", Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !events_of(&c, &["instance.fenced"], &vm.id)
        .await
        .iter()
        .any(|e| e.detail.as_deref().unwrap_or("").contains(&ids["b"]))
    {
        assert!(Instant::now() < deadline, "b never reported the fencing");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        watch.seen(&vm.id, "b").is_some_and(|s| s.last == on_b.last),
        "b ran {} again",
        vm.id
    );
    let i = c.instance(&vm.id).await.expect("instance");
    assert_eq!(i.host_id.as_deref(), Some(to.as_str()));
    assert_eq!(i.state, InstanceState::Running);
    let (n1, out) = counter(&c, &vm.id).await;
    assert!(!out.contains("GAP") && n1 + 1 >= n0, "{n0} then {out:?}");
    let log = watch.finish();
    assert_eq!(
        log.seen.keys().filter(|(i, _)| i == &vm.id).count(),
        2,
        "one copy on b, then one on {to_name}: {:?}",
        log.seen
    );
    eprintln!("ha: partition test done in {:?}", t0.elapsed());
    cluster.teardown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_priority_out_of_range_changes_nothing() {
    let cloud = Cloud::start(Hv::Sim).await;
    cloud.demo_image().await;
    let c = &cloud.client;
    match c.create_instance(&req("bad", true, 1001), None).await {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 400, "{message}");
            assert!(message.contains("ha_priority"), "{message}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    assert!(
        c.instances().await.expect("list").is_empty(),
        "nothing was created"
    );

    let i = c
        .create_instance(&req("good", false, 700), None)
        .await
        .expect("create");
    assert!(!i.ha && i.ha_priority == 700);
    let (status, code) = api_err(
        c.set_instance_ha(&i.id, Some(true), Some(5000)).await,
        "set",
    );
    assert_eq!((status, code.as_str()), (400, "InvalidParameter"));
    // A bad priority next to a valid change refuses both.
    let v = serde_json::json!({"instance_type": "t1.micro", "ha": true, "ha_priority": 1001});
    let r: Result<Instance, _> = c
        .request(
            "PATCH",
            &format!("/api/v1/instances/{}", i.id),
            Some(&v),
            None,
        )
        .await;
    let (status, _) = api_err(r, "patch");
    assert_eq!(status, 400);
    let after = c.instance(&i.id).await.expect("instance");
    assert_eq!(
        (
            after.ha,
            after.ha_priority,
            after.instance_type.as_str(),
            after.generation
        ),
        (false, 700, "t1.nano", i.generation),
        "unchanged"
    );
    let ok = c
        .set_instance_ha(&i.id, Some(true), Some(1000))
        .await
        .expect("set");
    assert!(ok.ha && ok.ha_priority == 1000);
    let ok = c
        .set_instance_ha(&i.id, Some(false), None)
        .await
        .expect("off");
    assert!(!ok.ha && ok.ha_priority == 1000, "the priority stays");
}
