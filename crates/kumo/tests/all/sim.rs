//! The controller and agent end to end through the real API, on the simulated hypervisor:
//! fast (no VMs), so it can afford crashes, restarts and bursts.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use kumo_cli::{Client, ClientError};
use kumo_types::api::{CreateInstance, ImportImage, Instance};
use kumo_types::InstanceState;

use crate::common::{Cloud, Hv};

/// Generous: only there to turn a hang into a failure.
const T: Duration = Duration::from_secs(60);

/// Poll `check` until it holds; panic with `what` (and the test dir) if it never does.
async fn eventually<F, Fut>(cloud: &Cloud, what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; logs in {}",
            cloud.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 16 MiB qcow2 made with `qemu-img`, imported server-side as a disk image.
pub async fn tiny_image(cloud: &Cloud, name: &str, public: bool) -> String {
    let path = cloud.dir.path().join(format!("{name}.qcow2"));
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cloud.import_wait(&disk_import(name, &path, public)).await
}

pub fn disk_import(name: &str, path: &Path, public: bool) -> ImportImage {
    ImportImage {
        name: name.into(),
        kind: Some("disk".into()),
        path: path.display().to_string(),
        format: None,
        kernel_id: None,
        ramdisk_id: None,
        cmdline: None,
        public,
    }
}

pub fn create_req(name: &str, image: &str, itype: &str) -> CreateInstance {
    CreateInstance {
        name: name.into(),
        image: image.into(),
        instance_type: Some(itype.into()),
        site: None,
        constraints: vec![],
        placement_group: None,
        ..Default::default()
    }
}

/// HTTP status and error code of an API error; panics on any other outcome.
pub fn api_err<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Ids of the VMs in an agent's ledger (`<data dir>/ledger/<id>.json`).
fn ledger_ids(cloud: &Cloud, n: usize) -> BTreeSet<String> {
    let dir = cloud.agents[n].data_dir.join("ledger");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return BTreeSet::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension().and_then(|x| x.to_str()) == Some("json"))
                .then(|| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .flatten()
        })
        .collect()
}

fn ledger_record(cloud: &Cloud, n: usize, id: &str) -> serde_json::Value {
    let p = cloud.agents[n]
        .data_dir
        .join("ledger")
        .join(format!("{id}.json"));
    serde_json::from_slice(
        &std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
    )
    .expect("ledger json")
}

/// Every agent's ledger, with a check that no VM is on two hosts.
fn all_ledger_ids(cloud: &Cloud) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for n in 0..cloud.agents.len() {
        for id in ledger_ids(cloud, n) {
            assert!(
                all.insert(id.clone()),
                "{id} is in the ledger of two agents"
            );
        }
    }
    all
}

fn boots(console: &str) -> usize {
    console
        .lines()
        .filter(|l| l.contains("KUMO-GUEST-BOOTED"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle() {
    let cloud = Cloud::start(Hv::Sim).await;
    let c = &cloud.client;
    let img = tiny_image(&cloud, "tiny", false).await;

    let created = c
        .create_instance(&create_req("life", &img, "t1.small"), None)
        .await
        .expect("create");
    assert_eq!(created.name, "life");
    assert_eq!(created.image_id, img);
    assert_eq!(
        (
            created.instance_type.as_str(),
            created.vcpus,
            created.memory_mib
        ),
        ("t1.small", 1, 512)
    );
    assert_eq!(created.desired, "running");
    assert!(
        matches!(
            created.state,
            InstanceState::Pending | InstanceState::Running
        ),
        "new instance is {}",
        created.state
    );
    assert!(
        created.host_id.is_some(),
        "a created instance is placed on a host"
    );
    let id = created.id.clone();
    let running = cloud.wait_state(&id, InstanceState::Running, T).await;
    assert_eq!(running.last_error, None);
    assert_eq!(
        ledger_ids(&cloud, 0),
        BTreeSet::from([id.clone()]),
        "the agent records the VM it runs"
    );
    cloud
        .wait_console(&id, &format!("KUMO-GUEST-BOOTED id={id}"), T)
        .await;

    // Resizing needs a stopped instance.
    let (status, code, msg) = api_err(c.resize(&id, "t1.medium").await);
    assert_eq!((status, code.as_str()), (409, "IncorrectState"), "{msg}");
    assert!(msg.contains("stop"), "the message says why: {msg}");
    let i = c.instance(&id).await.expect("get");
    assert_eq!(
        (i.instance_type.as_str(), i.vcpus, i.memory_mib, i.state),
        ("t1.small", 1, 512, InstanceState::Running)
    );

    // Reboot: the guest boots again and the instance never leaves `running`.
    let r = c.instance_action(&id, "reboot").await.expect("reboot");
    assert_eq!(r.state, InstanceState::Running);
    eventually(&cloud, "a second boot on the console", T, || async {
        let i = c.instance(&id).await.expect("get");
        assert_eq!(
            i.state,
            InstanceState::Running,
            "a rebooting instance stays running"
        );
        c.console(&id, 1 << 20)
            .await
            .map(|o| boots(&o.output) == 2)
            .unwrap_or(false)
    })
    .await;

    // Stop.
    let s = c.instance_action(&id, "stop").await.expect("stop");
    assert!(
        matches!(s.state, InstanceState::Stopping | InstanceState::Stopped),
        "after stop: {}",
        s.state
    );
    assert_eq!(s.desired, "stopped");
    cloud.wait_state(&id, InstanceState::Stopped, T).await;
    let (status, code, _) = api_err(c.instance_action(&id, "reboot").await);
    assert_eq!(
        (status, code.as_str()),
        (409, "IncorrectState"),
        "a stopped instance cannot be rebooted"
    );

    // Resize while stopped: the record and, after start, the agent's spec change.
    let (status, code, _) = api_err(c.resize(&id, "no.such-type").await);
    assert_eq!((status, code.as_str()), (400, "InvalidParameter"));
    let resized = c.resize(&id, "t1.medium").await.expect("resize stopped");
    assert_eq!(
        (
            resized.instance_type.as_str(),
            resized.vcpus,
            resized.memory_mib,
            resized.state
        ),
        ("t1.medium", 2, 1024, InstanceState::Stopped)
    );
    assert!(resized.disk_gib >= 8);
    let again = c.instance(&id).await.expect("get");
    assert_eq!((again.vcpus, again.memory_mib), (2, 1024));

    // Start.
    let st = c.instance_action(&id, "start").await.expect("start");
    assert_eq!(st.desired, "running");
    cloud.wait_state(&id, InstanceState::Running, T).await;
    let rec = ledger_record(&cloud, 0, &id);
    assert_eq!(
        (
            rec["desired"]["vcpus"].as_u64(),
            rec["desired"]["memory_mib"].as_u64()
        ),
        (Some(2), Some(1024)),
        "the agent runs the new size: {rec}"
    );
    let hosts = c.hosts().await.expect("hosts");
    assert_eq!(hosts[0].used_vcpus, 2, "host usage follows the resize");
    assert_eq!(hosts[0].instances, 1);

    // Terminate.
    let t = c.terminate(&id).await.expect("terminate");
    assert_eq!(t.desired, "terminated");
    let done = cloud.wait_state(&id, InstanceState::Terminated, T).await;
    assert!(done.terminated_at.is_some());
    assert!(
        !ledger_ids(&cloud, 0).contains(&id),
        "the agent forgot the terminated VM"
    );
    assert!(!cloud.agents[0]
        .data_dir
        .join("ledger")
        .join(format!("{id}.json"))
        .exists());
    // Terminated instances are still listed, as terminated; and they are final.
    let listed: Vec<Instance> = c
        .instances()
        .await
        .expect("list")
        .into_iter()
        .filter(|i| i.id == id)
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, InstanceState::Terminated);
    for action in ["start", "stop", "reboot"] {
        let (status, code, _) = api_err(c.instance_action(&id, action).await);
        assert_eq!(
            (status, code.as_str()),
            (409, "IncorrectState"),
            "{action} of a terminated instance"
        );
    }
    assert_eq!(
        c.terminate(&id).await.expect("terminate again").state,
        InstanceState::Terminated,
        "terminate is idempotent"
    );
    let hosts = c.hosts().await.expect("hosts");
    assert_eq!(
        (hosts[0].used_vcpus, hosts[0].instances),
        (0, 0),
        "a terminated instance frees its host"
    );

    // The name is free again once the first holder is terminated.
    let second = c
        .create_instance(&create_req("life", &img, "t1.nano"), None)
        .await
        .expect("reuse the name");
    assert_ne!(second.id, id);
    cloud
        .wait_state(&second.id, InstanceState::Running, T)
        .await;
    assert_eq!(
        c.instance("life").await.expect("by name").id,
        second.id,
        "a name means the live instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_crash_during_a_burst_of_creates() {
    let mut cloud = Cloud::start(Hv::Sim).await;
    // Three hosts, so that twenty small instances fit even on a small machine.
    cloud.add_agent(Hv::Sim).await;
    cloud.add_agent(Hv::Sim).await;
    let img = tiny_image(&cloud, "tiny", false).await;

    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = vec![];
    for i in 0..20u64 {
        let client: Client = cloud.client.clone();
        let img = img.clone();
        let done_tx = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            // Staggered, so that the crash lands in the middle of the burst.
            tokio::time::sleep(Duration::from_millis(i * 15)).await;
            let r = client
                .create_instance(&create_req(&format!("burst-{i}"), &img, "t1.nano"), None)
                .await;
            let _ = done_tx.send(());
            (i, r)
        }));
    }
    drop(done_tx);
    for _ in 0..5 {
        done_rx.recv().await.expect("a create finished");
    }
    cloud.kill_server();
    cloud.restart_server().await;
    let mut created: BTreeMap<String, String> = BTreeMap::new();
    let mut refused = 0;
    for t in tasks {
        let (i, r) = t.await.expect("task");
        match r {
            Ok(inst) => {
                assert_eq!(inst.name, format!("burst-{i}"));
                assert!(
                    created.insert(inst.id.clone(), inst.name).is_none(),
                    "two creates returned the same id"
                );
            }
            Err(ClientError::Unreachable(..)) => refused += 1,
            Err(e) => panic!("create burst-{i}: unexpected {e}"),
        }
    }
    assert!(
        created.len() >= 5,
        "at least the creates before the crash succeeded: {created:?}"
    );
    eprintln!(
        "burst: {} created, {refused} hit the dead controller",
        created.len()
    );

    // Every 201 ends running; nothing exists twice; the hosts run exactly the live instances.
    for id in created.keys() {
        cloud.wait_state(id, InstanceState::Running, T).await;
    }
    let c = &cloud.client;
    let all = c.instances().await.expect("list");
    let mut names = BTreeSet::new();
    for i in &all {
        assert!(
            names.insert(i.name.clone()),
            "name {} is used twice: {all:?}",
            i.name
        );
    }
    for (id, name) in &created {
        assert_eq!(
            all.iter().filter(|i| &i.id == id).count(),
            1,
            "{name} ({id}) is listed once"
        );
    }
    // An instance whose create committed just before the crash (its reply lost) is still a
    // proper instance: it too must run.
    for i in &all {
        cloud.wait_state(&i.id, InstanceState::Running, T).await;
    }
    let live: BTreeSet<String> = all.iter().map(|i| i.id.clone()).collect();
    eventually(
        &cloud,
        "the agents' ledgers to hold exactly the running instances",
        T,
        || async { all_ledger_ids(&cloud) == live },
    )
    .await;
    let hosts = c.hosts().await.expect("hosts");
    assert_eq!(
        hosts.iter().map(|h| h.instances as usize).sum::<usize>(),
        live.len(),
        "host usage counts each instance once: {hosts:?}"
    );

    // Now crash right after accepted stops and terminates.
    let ids: Vec<String> = live.iter().take(6).cloned().collect();
    let (to_stop, to_kill) = ids.split_at(3);
    for id in to_stop {
        c.instance_action(id, "stop").await.expect("stop");
    }
    for id in to_kill {
        c.terminate(id).await.expect("terminate");
    }
    cloud.kill_server();
    cloud.restart_server().await;
    for id in to_stop {
        cloud.wait_state(id, InstanceState::Stopped, T).await;
    }
    for id in to_kill {
        cloud.wait_state(id, InstanceState::Terminated, T).await;
    }
    let c = &cloud.client;
    let want: BTreeSet<String> = live
        .iter()
        .filter(|id| !to_kill.contains(id))
        .cloned()
        .collect();
    eventually(&cloud, "terminated VMs to leave the ledgers", T, || async {
        all_ledger_ids(&cloud) == want
    })
    .await;
    for id in live.iter().filter(|id| !ids.contains(id)) {
        assert_eq!(
            c.instance(id).await.expect("get").state,
            InstanceState::Running,
            "{id} was not touched and still runs"
        );
    }
    for id in to_stop {
        let rec = (0..cloud.agents.len())
            .find(|n| ledger_ids(&cloud, *n).contains(id))
            .map(|n| ledger_record(&cloud, n, id))
            .expect("stopped VM in a ledger");
        assert_eq!(rec["desired"]["power"], "stopped", "{rec}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_restart_and_host_down() {
    let mut cloud = Cloud::start(Hv::Sim).await;
    let img = tiny_image(&cloud, "tiny", false).await;
    let mut ids = vec![];
    for n in 0..2 {
        ids.push(
            cloud
                .client
                .create_instance(&create_req(&format!("keep-{n}"), &img, "t1.nano"), None)
                .await
                .expect("create")
                .id,
        );
    }
    for id in &ids {
        cloud.wait_state(id, InstanceState::Running, T).await;
    }
    let host = cloud.client.hosts().await.expect("hosts").remove(0);
    assert_eq!(host.state, "up");

    // A quick agent restart: the VMs keep running, the host stays (or comes back) up.
    cloud.kill_agent(0);
    cloud.start_agent(0);
    eventually(&cloud, "host0 to heartbeat again", T, || async {
        cloud
            .client
            .host(&host.id)
            .await
            .map(|h| h.state == "up" && h.last_heartbeat > host.last_heartbeat)
            .unwrap_or(false)
    })
    .await;
    // One more heartbeat, so the restarted agent has reported what it has.
    let seen = cloud
        .client
        .host(&host.id)
        .await
        .expect("host")
        .last_heartbeat;
    eventually(&cloud, "another heartbeat", T, || async {
        cloud
            .client
            .host(&host.id)
            .await
            .map(|h| h.last_heartbeat > seen)
            .unwrap_or(false)
    })
    .await;
    for id in &ids {
        let i = cloud.client.instance(id).await.expect("get");
        assert_eq!(
            i.state,
            InstanceState::Running,
            "{id} after an agent restart: {i:?}; logs in {}",
            cloud.dir.path().display()
        );
        assert_eq!(i.desired, "running");
    }
    assert_eq!(
        ledger_ids(&cloud, 0),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );

    // An agent that stays away: its host goes down after the heartbeat timeout (6 s).
    cloud.kill_agent(0);
    let killed = Instant::now();
    eventually(
        &cloud,
        "host0 to be marked down",
        Duration::from_secs(60),
        || async {
            cloud
                .client
                .host(&host.id)
                .await
                .map(|h| h.state == "down")
                .unwrap_or(false)
        },
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(4),
        "the host went down before its heartbeat timeout ({:?})",
        killed.elapsed()
    );
    let events = cloud.client.events(200).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.action == "host.down" && e.target.as_deref() == Some(host.id.as_str())),
        "host.down is journaled"
    );
    // Nothing new is placed on a down host.
    let (status, code, msg) = api_err(
        cloud
            .client
            .create_instance(&create_req("nowhere", &img, "t1.nano"), None)
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (503, "InsufficientCapacity"),
        "{msg}"
    );
    assert!(msg.contains("down"), "the refusal names the reason: {msg}");

    // It comes back.
    cloud.start_agent(0);
    eventually(&cloud, "host0 to be up again", T, || async {
        cloud
            .client
            .host(&host.id)
            .await
            .map(|h| h.state == "up")
            .unwrap_or(false)
    })
    .await;
    for id in &ids {
        cloud.wait_state(id, InstanceState::Running, T).await;
    }
    assert!(
        cloud
            .client
            .events(200)
            .await
            .expect("events")
            .iter()
            .any(|e| e.action == "host.up"),
        "host.up is journaled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_create() {
    let cloud = Cloud::start(Hv::Sim).await;
    let c = &cloud.client;
    let img = tiny_image(&cloud, "tiny", false).await;
    // Concurrent requests with one key: exactly one runs; the others are told it is running
    // or get its answer.
    let burst = create_req("burst", &img, "t1.nano");
    let results =
        futures::future::join_all((0..6).map(|_| c.create_instance(&burst, Some("key-burst"))))
            .await;
    let mut ids = std::collections::BTreeSet::new();
    for r in results {
        match r {
            Ok(i) => {
                ids.insert(i.id);
            }
            Err(kumo_cli::ClientError::Api {
                status: 409, code, ..
            }) if code == "IdempotencyKeyInProgress" => {}
            Err(e) => panic!("unexpected answer to a concurrent retry: {e}"),
        }
    }
    assert_eq!(ids.len(), 1, "one instance for one key: {ids:?}");
    let burst_instances = c
        .instances()
        .await
        .expect("list")
        .into_iter()
        .filter(|i| i.name == "burst")
        .count();
    assert_eq!(burst_instances, 1);

    let req = create_req("once", &img, "t1.nano");
    let first = c.create_instance(&req, Some("key1")).await.expect("first");
    let second = c.create_instance(&req, Some("key1")).await.expect("replay");
    assert_eq!(
        first.id, second.id,
        "the same key and body replay the first response"
    );
    assert_eq!(first.created_at, second.created_at);
    let named: Vec<Instance> = c
        .instances()
        .await
        .expect("list")
        .into_iter()
        .filter(|i| i.name == "once")
        .collect();
    assert_eq!(named.len(), 1, "one instance: {named:?}");

    // The same key with another body is refused and changes nothing.
    let other = create_req("twice", &img, "t1.nano");
    let (status, code, msg) = api_err(c.create_instance(&other, Some("key1")).await);
    assert_eq!(
        (status, code.as_str()),
        (422, "IdempotencyKeyReused"),
        "{msg}"
    );
    // Another key with the first body is a new request: the name is taken.
    let (status, code, _) = api_err(c.create_instance(&req, Some("key2")).await);
    assert_eq!((status, code.as_str()), (409, "Conflict"));
    let all = c.instances().await.expect("list");
    assert_eq!(all.len(), 2, "only 'burst' and 'once': {all:?}");

    // The replay is stable: still the first response after the instance changed.
    cloud.wait_state(&first.id, InstanceState::Running, T).await;
    let replay = c
        .create_instance(&req, Some("key1"))
        .await
        .expect("replay after it runs");
    assert_eq!(replay.id, first.id);
    assert_eq!(c.instances().await.expect("list").len(), 2);
}
