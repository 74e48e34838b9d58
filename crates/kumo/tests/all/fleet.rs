//! Hundreds of simulated hosts (`kumo-simfleet`, in this process) against a real controller:
//! registration, spread, races for the last capacity, and a controller crash mid-burst.
//! No VMs run: a simulated host answers a desired spec at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kumo_cli::{Client, ClientError};
use kumo_simfleet::{Fleet, FleetConfig};
use kumo_types::api::{Host, Instance, Page};
use kumo_types::InstanceState;

use crate::common::Cloud;
use crate::sim::tiny_image;

/// Only there to turn a hang into a failure.
const T: Duration = Duration::from_secs(60);

/// The scheduler's default policy (kumo_scheduler::Policy): 4 vCPUs per CPU, memory not
/// overcommitted, 512 MiB kept for the host.
const CPU_OVERCOMMIT: u32 = 4;
const RESERVED_MIB: u64 = 512;

fn capacity(vcpus: u32, memory_mib: u64) -> (u32, u64) {
    (vcpus * CPU_OVERCOMMIT, memory_mib - RESERVED_MIB)
}

/// The fixture's default network is a /24 (244 addresses); hundreds of instances need more.
async fn cloud_with_network(cidr: &str) -> Cloud {
    Cloud::controller_with(&["--default-cidr", cidr, "--heartbeat-timeout", "10"]).await
}

async fn start_fleet(
    cloud: &Cloud,
    count: usize,
    sites: usize,
    (vcpus, memory_mib): (u32, u64),
) -> Fleet {
    let t = Instant::now();
    let fleet = Fleet::start(FleetConfig {
        controller: cloud.endpoint.clone(),
        join_token: cloud.join_token.clone(),
        count,
        name_prefix: "sim".into(),
        sites: (1..=sites).map(|i| format!("site{i}")).collect(),
        vcpus,
        memory_mib,
        labels: BTreeMap::new(),
        storage_pool_every: None,
        heartbeat_interval: Duration::from_secs(2),
        listen: "127.0.0.1:0".parse().expect("addr"),
    })
    .await
    .expect("start the simulated fleet");
    eprintln!(
        "{count} simulated hosts registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    fleet
}

/// Every host, following the list's cursors.
async fn all_hosts(c: &Client) -> Result<Vec<Host>, ClientError> {
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cur) => format!("/api/v1/hosts?limit=1000&cursor={cur}"),
            None => "/api/v1/hosts?limit=1000".to_string(),
        };
        let page: Page<Host> = c.get(&path).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(out),
        }
    }
}

async fn wait_all_up(cloud: &Cloud, fleet: &Fleet) {
    let want: BTreeSet<String> = fleet.hosts().into_iter().map(|(n, _)| n).collect();
    let deadline = Instant::now() + T;
    loop {
        let up: BTreeSet<String> = all_hosts(&cloud.client)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|h| h.state == "up")
            .map(|h| h.name)
            .collect();
        if up == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} hosts are up; logs in {}",
            up.len(),
            want.len(),
            cloud.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Through plain JSON, so the test does not depend on every field of `CreateInstance`.
async fn create(c: &Client, name: &str, image: &str, itype: &str) -> Result<Instance, ClientError> {
    let body = serde_json::json!({"name": name, "image": image, "instance_type": itype});
    c.request("POST", "/api/v1/instances", Some(&body), None)
        .await
}

/// Poll until every live instance is running; returns them all.
async fn wait_all_running(cloud: &Cloud, expect: usize) -> Vec<Instance> {
    let deadline = Instant::now() + T;
    loop {
        let all: Vec<Instance> = cloud
            .client
            .instances()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i.state != InstanceState::Terminated)
            .collect();
        let running = all
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .count();
        if all.len() == expect && running == expect {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "{running} of {} instances running (want {expect}); logs in {}",
            all.len(),
            cloud.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Instance ids per host name, as the API places them.
fn by_host(fleet: &Fleet, instances: &[Instance]) -> BTreeMap<String, BTreeSet<String>> {
    let names: HashMap<String, String> = fleet.hosts().into_iter().map(|(n, id)| (id, n)).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = names
        .values()
        .map(|n| (n.clone(), BTreeSet::new()))
        .collect();
    for i in instances {
        let host = i.host_id.as_ref().expect("a live instance is placed");
        let name = names
            .get(host)
            .unwrap_or_else(|| panic!("{} is on {host}, not a fleet host", i.id));
        out.entry(name.clone()).or_default().insert(i.id.clone());
    }
    out
}

/// The fleet holds exactly the VMs the API places on each host (after convergence).
async fn fleet_matches_api(cloud: &Cloud, fleet: &Fleet, instances: &[Instance]) {
    let want = by_host(fleet, instances);
    let deadline = Instant::now() + T;
    loop {
        let got: BTreeMap<String, BTreeSet<String>> = want
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    fleet.vms_on(n).into_iter().map(|v| v.id).collect(),
                )
            })
            .collect();
        if got == want {
            assert_eq!(fleet.vm_count(), instances.len());
            return;
        }
        let wrong: Vec<&String> = want.keys().filter(|n| got[*n] != want[*n]).collect();
        assert!(
            Instant::now() < deadline,
            "the fleet disagrees with the API on {} hosts, e.g. {:?}: fleet {:?}, API {:?}; logs in {}",
            wrong.len(),
            wrong[0],
            got[wrong[0]],
            want[wrong[0]],
            cloud.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every fleet host's VMs fit its capacity.
fn assert_fleet_within_capacity(fleet: &Fleet, cap: (u32, u64)) {
    for (name, _) in fleet.hosts() {
        let vms = fleet.vms_on(&name);
        let cpus: u32 = vms.iter().map(|v| v.vcpus).sum();
        let mem: u64 = vms.iter().map(|v| v.memory_mib).sum();
        assert!(
            cpus <= cap.0 && mem <= cap.1,
            "{name} holds {} VMs, {cpus} vCPUs and {mem} MiB: over its capacity {cap:?}",
            vms.len()
        );
    }
}

/// And the API's record of each host agrees.
async fn assert_api_within_capacity(c: &Client) {
    for h in all_hosts(c).await.expect("hosts") {
        let (cpus, mem) = capacity(h.vcpus, h.memory_mib);
        assert!(
            h.used_vcpus <= cpus && h.used_memory_mib <= mem,
            "{} uses {} vCPUs and {} MiB of {cpus} and {mem}",
            h.name,
            h.used_vcpus,
            h.used_memory_mib
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_of_300_hosts() {
    const HOSTS: usize = 300;
    const VMS: usize = 600;
    let cloud = cloud_with_network("10.64.0.0/16").await;
    let host_size = (4, 4096);
    let fleet = start_fleet(&cloud, HOSTS, 3, host_size).await;
    assert_eq!(fleet.hosts().len(), HOSTS);
    wait_all_up(&cloud, &fleet).await;
    let hosts = all_hosts(&cloud.client).await.expect("hosts");
    let per_site = hosts
        .iter()
        .fold(BTreeMap::<&str, usize>::new(), |mut m, h| {
            *m.entry(h.site.as_str()).or_default() += 1;
            m
        });
    assert_eq!(
        per_site,
        BTreeMap::from([("site1", 100), ("site2", 100), ("site3", 100)])
    );
    assert!(hosts
        .iter()
        .all(|h| h.hypervisor == "sim" && h.vcpus == 4 && h.memory_mib == 4096));

    let img = tiny_image(&cloud, "tiny", false).await;
    let t = Instant::now();
    let c = &cloud.client;
    let results: Vec<Result<Instance, ClientError>> = futures::stream::iter(0..VMS)
        .map(|i| {
            let img = img.clone();
            async move { create(c, &format!("vm-{i}"), &img, "t1.nano").await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let accepted = t.elapsed();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} creates failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    let instances = wait_all_running(&cloud, VMS).await;
    eprintln!(
        "{VMS} creates accepted in {:.1} s, all running after {:.1} s",
        accepted.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    // Spread: identical empty hosts, so the weigher must not pile instances up.
    let placed = by_host(&fleet, &instances);
    let mean = VMS as f64 / HOSTS as f64;
    let most = placed.values().map(BTreeSet::len).max().unwrap_or(0);
    let empty = placed.values().filter(|s| s.is_empty()).count();
    assert!(
        most as f64 <= 2.0 * mean,
        "a host got {most} instances; the mean is {mean}"
    );
    eprintln!("most instances on one host: {most}; hosts left empty: {empty}");
    assert_fleet_within_capacity(&fleet, capacity(host_size.0, host_size.1));
    assert_api_within_capacity(c).await;
    fleet_matches_api(&cloud, &fleet, &instances).await;
    let s = fleet.stats();
    assert!(s.heartbeats_ok > 0 && s.puts >= VMS as u64, "{s:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_race_for_the_last_capacity() {
    // 1 vCPU (4 with overcommit) and 1024 MiB for guests: two t1.small (1 vCPU, 512 MiB).
    const HOSTS: usize = 4;
    const PER_HOST: usize = 2;
    const SLOTS: usize = HOSTS * PER_HOST;
    const TRIES: usize = 48;
    let host_size = (1, RESERVED_MIB + 1024);
    let cloud = Cloud::controller_only().await;
    let fleet = start_fleet(&cloud, HOSTS, 1, host_size).await;
    wait_all_up(&cloud, &fleet).await;
    let img = tiny_image(&cloud, "tiny", false).await;

    // All at once: every create races every other for the same few slots.
    let c = &cloud.client;
    let results = futures::future::join_all((0..TRIES).map(|i| {
        let img = img.clone();
        async move { create(c, &format!("race-{i}"), &img, "t1.small").await }
    }))
    .await;
    let mut won = vec![];
    let mut refused = 0;
    for r in results {
        match r {
            Ok(i) => won.push(i),
            Err(ClientError::Api { status, code, .. })
                if status == 503 && code == "InsufficientCapacity" =>
            {
                refused += 1
            }
            Err(e) => panic!("a create failed other than for capacity: {e}"),
        }
    }
    assert_eq!(
        (won.len(), refused),
        (SLOTS, TRIES - SLOTS),
        "exactly the free slots are taken"
    );
    let instances = wait_all_running(&cloud, SLOTS).await;
    let placed = by_host(&fleet, &instances);
    assert!(
        placed.values().all(|s| s.len() == PER_HOST),
        "each host holds exactly {PER_HOST}: {placed:?}"
    );
    assert_fleet_within_capacity(&fleet, capacity(host_size.0, host_size.1));
    assert_api_within_capacity(c).await;
    fleet_matches_api(&cloud, &fleet, &instances).await;

    // Full is full: one more is refused.
    let (status, code) = match create(c, "one-more", &img, "t1.small").await {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected a capacity error, got {other:?}"),
    };
    assert_eq!((status, code.as_str()), (503, "InsufficientCapacity"));
    fleet.shutdown().await;
}

#[derive(Debug)]
enum Outcome {
    /// Acknowledged, with the instance's id.
    Created(String),
    NoCapacity,
    /// The controller died while the request was in flight: it may or may not exist.
    Unknown(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_restart_during_a_burst_of_creates() {
    // 2 vCPUs (8 with overcommit) and 1024 MiB for guests: eight t1.nano (1 vCPU, 128 MiB).
    const HOSTS: usize = 10;
    const SLOTS: usize = HOSTS * 8;
    const BURST: usize = 120;
    const KILL_AFTER: usize = 24;
    let host_size = (2, RESERVED_MIB + 1024);
    let cap = capacity(host_size.0, host_size.1);
    let mut cloud = Cloud::controller_only().await;
    let fleet = Arc::new(start_fleet(&cloud, HOSTS, 2, host_size).await);
    wait_all_up(&cloud, &fleet).await;
    let img = tiny_image(&cloud, "tiny", false).await;

    // Watch the hosts all along: usage must never exceed capacity, not just at the end.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (fleet, done) = (fleet.clone(), done.clone());
        tokio::spawn(async move {
            let mut checks = 0u32;
            while !done.load(Ordering::SeqCst) {
                assert_fleet_within_capacity(&fleet, cap);
                checks += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            checks
        })
    };

    let created = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, Outcome>::new()));
    let burst = {
        let (c, created, outcomes, img) = (
            cloud.client.clone(),
            created.clone(),
            outcomes.clone(),
            img.clone(),
        );
        let health = format!("{}/healthz", cloud.endpoint);
        tokio::spawn(async move {
            futures::stream::iter(0..BURST)
                .for_each_concurrent(16, |i| {
                    let (c, created, outcomes, img, health) = (
                        c.clone(),
                        created.clone(),
                        outcomes.clone(),
                        img.clone(),
                        health.clone(),
                    );
                    async move {
                        let name = format!("burst-{i}");
                        let out = match create(&c, &name, &img, "t1.nano").await {
                            Ok(inst) => {
                                created.fetch_add(1, Ordering::SeqCst);
                                Outcome::Created(inst.id)
                            }
                            Err(ClientError::Api { status, code, .. })
                                if status == 503 && code == "InsufficientCapacity" =>
                            {
                                Outcome::NoCapacity
                            }
                            Err(e @ (ClientError::Unreachable(..) | ClientError::Http(_))) => {
                                // Wait for the controller to come back, so the burst goes on
                                // through the restart instead of failing fast while it is down.
                                let deadline = Instant::now() + T;
                                while Instant::now() < deadline
                                    && !reqwest::get(&health)
                                        .await
                                        .is_ok_and(|r| r.status().is_success())
                                {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                Outcome::Unknown(e.to_string())
                            }
                            Err(e) => panic!("{name}: unexpected error {e}"),
                        };
                        outcomes.lock().expect("lock").insert(name, out);
                    }
                })
                .await;
        })
    };

    let deadline = Instant::now() + T;
    while created.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < deadline && !burst.is_finished(),
            "the burst did not get going"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_kill = created.load(Ordering::SeqCst);
    cloud.restart_server().await;
    burst.await.expect("the burst");
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("lock"));
    let count = |f: fn(&Outcome) -> bool| outcomes.values().filter(|o| f(o)).count();
    let (ok, full, unknown) = (
        count(|o| matches!(o, Outcome::Created(_))),
        count(|o| matches!(o, Outcome::NoCapacity)),
        count(|o| matches!(o, Outcome::Unknown(_))),
    );
    eprintln!(
        "killed the controller after {at_kill} creates; in all {ok} created, {full} refused for capacity, {unknown} unknown"
    );
    if let Some(Outcome::Unknown(e)) = outcomes.values().find(|o| matches!(o, Outcome::Unknown(_)))
    {
        eprintln!("an unknown outcome: {e}");
    }
    assert_eq!(outcomes.len(), BURST);
    assert!(
        ok > at_kill,
        "creates succeed again after the restart ({ok} in all, {at_kill} before the kill)"
    );

    // Whatever exists converges; every acknowledged create is among it, once.
    let live: Vec<Instance> = cloud
        .client
        .instances()
        .await
        .expect("list")
        .into_iter()
        .filter(|i| i.state != InstanceState::Terminated)
        .collect();
    let instances = wait_all_running(&cloud, live.len()).await;
    let mut per_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for i in &instances {
        per_name.entry(&i.name).or_default().push(&i.id);
    }
    for (name, ids) in &per_name {
        assert_eq!(ids.len(), 1, "{name} exists {} times: {ids:?}", ids.len());
    }
    for (name, o) in &outcomes {
        match o {
            Outcome::Created(id) => assert_eq!(
                per_name.get(name.as_str()).map(|v| v[0]),
                Some(id.as_str()),
                "{name} was acknowledged as {id} but is not running"
            ),
            Outcome::NoCapacity => assert!(
                !per_name.contains_key(name.as_str()),
                "{name} was refused but exists"
            ),
            Outcome::Unknown(_) => {}
        }
    }
    assert!(instances.len() <= SLOTS, "{} instances", instances.len());
    if full > 0 {
        // A refusal means every slot was taken then, and instances only accumulate.
        assert_eq!(instances.len(), SLOTS, "refused while slots were free");
    }
    done.store(true, Ordering::SeqCst);
    let checks = watcher.await.expect("the capacity watcher");
    assert!(checks > 10, "the capacity watcher ran {checks} times");
    assert_fleet_within_capacity(&fleet, cap);
    assert_api_within_capacity(&cloud.client).await;
    fleet_matches_api(&cloud, &fleet, &instances).await;
}
