//! Live migration on a 3-host cluster of real hosts (namespaces, agents, QEMU under TCG): h1 and h2
//! share a pool (memory-only migration), h3 has its own pool on a small tmpfs (storage migration
//! over NBD). The guest keeps appending its counter to its disk and serving HTTP on its elastic
//! IP while it moves; the outside namespace fetches its page all along. Then every fault the issue
//! names is injected mid-migration: the VM must keep running at the source, with nothing left at
//! the destination.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_testcluster::{Cluster, ClusterSpec, HostSpec, OUTSIDE_IP};
use kumo_types::api::Instance;
use kumo_types::migration::Migration;
use kumo_types::InstanceState;
use serde_json::{json, Value};

use crate::cluster::{wait_console, wait_state};
use crate::common::{demo_image_with, KUMO};
use crate::e2e::BOOTED;
use crate::storage::guest_sh;

const BOOT: Duration = Duration::from_secs(180);
/// Only there to stop a hang.
const MIGRATION: Duration = Duration::from_secs(240);

fn step(t0: Instant, what: &str) {
    eprintln!("migration: [{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

async fn start_migration(c: &Client, id: &str, body: Value) -> Result<Migration, String> {
    c.post::<Migration>(&format!("/api/v1/instances/{id}/migrate"), &body)
        .await
        .map_err(|e| e.to_string())
}

async fn migration(c: &Client, id: &str) -> Migration {
    c.get(&format!("/api/v1/migrations/{id}"))
        .await
        .expect("migration")
}

/// Until the migration ends (done or failed).
async fn wait_end(c: &Client, id: &str) -> Migration {
    let deadline = Instant::now() + MIGRATION;
    loop {
        let m = migration(c, id).await;
        if matches!(m.step.as_str(), "done" | "failed") {
            return m;
        }
        assert!(Instant::now() < deadline, "migration never ended: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Until the migration is transferring and past `progress`.
async fn wait_transfer(c: &Client, id: &str, progress: f64) -> Migration {
    let deadline = Instant::now() + MIGRATION;
    loop {
        let m = migration(c, id).await;
        if m.step == "transfer" && m.progress >= progress {
            return m;
        }
        assert!(
            matches!(m.step.as_str(), "prepare" | "transfer"),
            "the migration went past its transfer before the fault: {m:?}"
        );
        assert!(Instant::now() < deadline, "transfer never started: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn instance(c: &Client, id: &str) -> Instance {
    c.instance(id).await.expect("instance")
}

async fn host_name(c: &Client, i: &Instance) -> String {
    c.host(i.host_id.as_deref().expect("placed"))
        .await
        .expect("host")
        .name
}

/// The counter lines the guest appended to its disk, checked to have no gap.
async fn disk_counter(c: &Client, id: &str) -> u64 {
    let out = guest_sh(c, id, "echo CNT; cat /data/counter; echo CNT-END").await;
    let body = out
        .split("CNT\r\n")
        .nth(1)
        .or_else(|| out.split("CNT\n").nth(1))
        .unwrap_or_default();
    let nums: Vec<u64> = body
        .lines()
        .map_while(|l| l.trim().parse::<u64>().ok())
        .collect();
    assert!(nums.len() > 3, "{id}: too few counter lines: {out}");
    for w in nums.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{id}: a gap in the counter on disk");
    }
    *nums.last().unwrap_or(&0)
}

/// Nothing of the instance is left on host `i`: no QEMU, no disk, no incoming record, no run dir.
async fn nothing_left(cluster: &Cluster, i: usize, id: &str, pool_dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let qemu = cluster.qemu_instances_on(i).contains(&id.to_string());
        let disk = pool_dir.join("disks").join(format!("{id}.json")).exists();
        let rec = cluster.hosts()[i]
            .data_dir
            .join("incoming")
            .join(format!("{id}.json"))
            .exists();
        if !qemu && !disk && !rec {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "host {i} still has {id}: qemu={qemu} disk={disk} incoming-record={rec}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The outside namespace fetching the guest's page through its elastic IP, every 100 ms.
struct Prober {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(outside_ns: String, url: String, want: String) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let failed = Arc::new(AtomicU32::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &outside_ns, "timeout", "2"])
                    .args(["busybox", "wget", "-q", "-O", "-", &url])
                    .output();
                match out {
                    Ok(o2) if String::from_utf8_lossy(&o2.stdout).contains(&want) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Prober {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// (answered, failed) so far.
    fn counts(&self) -> (u32, u32) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A tmpfs for h3's pool (small, so that the "destination pool full" fault can fill it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).expect("mountpoint");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(ok.success(), "mounting a tmpfs on {}", path.display());
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

async fn expect_refused(c: &Client, id: &str, body: Value, status: u16, what: &str) {
    let e = start_migration(c, id, body.clone())
        .await
        .expect_err(&format!("{what}: accepted {body}"));
    assert!(
        e.contains(&format!("HTTP {status}")),
        "{what}: want HTTP {status}, got {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_migration_keeps_the_guest_and_survives_faults() {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("kumo-migration-")
        .tempdir()
        .expect("tempdir")
        .keep();
    // Outside the cluster's directory: the cluster removes that before the tmpfs is unmounted.
    let pool_root = tempfile::Builder::new()
        .prefix("kumo-migration-pool-")
        .tempdir()
        .expect("tempdir");
    let h3_pool = pool_root.path().join("h3");
    let tmpfs = Tmpfs::mount(h3_pool.clone(), "400m");
    let shared = |name: &str| {
        let mut h = HostSpec::qemu(name).capacity(4, 4096);
        h.storage_pool = Some("sp".into());
        h
    };
    let mut h3 = HostSpec::qemu("h3").capacity(4, 4096);
    h3.extra_args = vec!["--pool-path".into(), h3_pool.display().to_string()];
    let mut cluster = Cluster::start(ClusterSpec {
        kumo_bin: KUMO.into(),
        dir: dir.clone(),
        hosts: vec![shared("h1"), shared("h2"), h3],
        heartbeat_timeout_secs: 10,
        keep_dir: false,
    })
    .await
    .expect("start a 3-host cluster");
    let sp_dir = dir.join("pools").join("sp");
    step(t0, &format!("cluster up, logs in {}", dir.display()));
    let c = cluster.client();
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
    let req: kumo_types::api::CreateInstance = serde_json::from_value(json!({
        "name": "mover", "image": "demo", "instance_type": "t1.nano"
    }))
    .expect("CreateInstance");
    let vm = c.create_instance(&req, None).await.expect("create").id;
    let mut i = wait_state(&c, &vm, InstanceState::Running, BOOT).await;
    wait_console(&c, &vm, BOOTED, BOOT).await;
    if host_name(&c, &i).await == "h3" {
        // Start in the shared pool: the first move is a storage migration then.
        let m = start_migration(&c, &vm, json!({"host": "h1"}))
            .await
            .expect("to h1");
        assert_eq!(wait_end(&c, &m.id).await.step, "done");
        i = instance(&c, &vm).await;
    }
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
    let outside = cluster.outside_netns();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::process::Command::new("ip")
        .args([
            "netns", "exec", &outside, "timeout", "3", "busybox", "wget", "-q", "-O", "-",
        ])
        .arg(&url)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&vm))
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "the outside never reached {url}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    step(
        t0,
        &format!(
            "{vm} runs on {}, reachable at {eip}",
            host_name(&c, &i).await
        ),
    );

    // --- Bad input: nothing starts, nothing changes. ---
    let here = host_name(&c, &i).await;
    expect_refused(&c, &vm, json!({"host": here}), 400, "same host").await;
    expect_refused(&c, &vm, json!({"host": "nowhere"}), 404, "unknown host").await;
    expect_refused(&c, &vm, json!({"downtime_ms": 0}), 400, "zero downtime").await;
    expect_refused(
        &c,
        &vm,
        json!({"downtime_ms": 600000}),
        400,
        "huge downtime",
    )
    .await;
    let other_shared = if here == "h1" { "h2" } else { "h1" };
    let _: Value = c
        .post(
            &format!("/api/v1/hosts/{other_shared}/state"),
            &json!({"state": "maintenance"}),
        )
        .await
        .expect("maintenance");
    expect_refused(
        &c,
        &vm,
        json!({"host": other_shared}),
        409,
        "host in maintenance",
    )
    .await;
    let _: Value = c
        .post(
            &format!("/api/v1/hosts/{other_shared}/state"),
            &json!({"state": "up"}),
        )
        .await
        .expect("up again");
    // A host without room (its memory all reserved for itself) is refused with 503.
    let _: Value = c
        .request(
            "PATCH",
            &format!("/api/v1/hosts/{other_shared}"),
            Some(&json!({"reserved_memory_mib": 4090})),
            None,
        )
        .await
        .expect("reserve all memory");
    expect_refused(
        &c,
        &vm,
        json!({"host": other_shared}),
        503,
        "host without capacity",
    )
    .await;
    let _: Value = c
        .request(
            "PATCH",
            &format!("/api/v1/hosts/{other_shared}"),
            Some(&json!({"reserved_memory_mib": 0})),
            None,
        )
        .await
        .expect("memory back");
    let m: Vec<Migration> = c
        .get::<kumo_types::api::Page<Migration>>("/api/v1/migrations")
        .await
        .expect("migrations")
        .items;
    assert!(m.is_empty(), "refused migrations left records: {m:?}");

    // --- Memory-only migration between the two hosts of the shared pool. ---
    let before = disk_counter(&c, &vm).await;
    let prober = Prober::start(outside.clone(), url.clone(), vm.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = start_migration(&c, &vm, json!({"host": other_shared}))
        .await
        .expect("migrate (shared)");
    assert_eq!(m.mode, "shared");
    expect_refused(&c, &vm, json!({}), 409, "a second migration while one runs").await;
    let m = wait_end(&c, &m.id).await;
    assert_eq!(m.step, "done", "{m:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed) = prober.finish();
    i = instance(&c, &vm).await;
    assert_eq!(host_name(&c, &i).await, other_shared);
    let dest = cluster.host_index(other_shared).expect("index");
    let src = cluster.host_index(&here).expect("index");
    assert!(cluster.qemu_instances_on(dest).contains(&vm));
    assert!(
        !cluster.qemu_instances_on(src).contains(&vm),
        "the source copy is gone"
    );
    assert!(
        sp_dir.join("disks").join(format!("{vm}.json")).exists(),
        "the shared disk stays"
    );
    let after = disk_counter(&c, &vm).await;
    assert!(after > before, "the counter went on: {before} -> {after}");
    step(
        t0,
        &format!(
            "shared migration: {:?}; HTTP through the EIP: {ok} answered, {failed} failed",
            m.stats
        ),
    );
    assert!(
        ok > 0 && failed <= 5,
        "{failed} failed requests during the switch"
    );

    // --- Storage migration to h3 (its own pool): the disk goes over NBD. ---
    let prober = Prober::start(outside.clone(), url.clone(), vm.clone());
    let m = start_migration(&c, &vm, json!({"host": "h3"}))
        .await
        .expect("migrate (storage)");
    assert_eq!(m.mode, "storage");
    let m = wait_end(&c, &m.id).await;
    assert_eq!(m.step, "done", "{m:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed) = prober.finish();
    i = instance(&c, &vm).await;
    assert_eq!(host_name(&c, &i).await, "h3");
    assert!(cluster.qemu_instances_on(2).contains(&vm));
    assert!(!cluster.qemu_instances_on(dest).contains(&vm));
    assert!(
        h3_pool.join("disks").join(format!("{vm}.json")).exists(),
        "the disk is in h3's pool"
    );
    assert!(
        !sp_dir.join("disks").join(format!("{vm}.json")).exists(),
        "the source's copy of the disk is deleted"
    );
    let after2 = disk_counter(&c, &vm).await;
    assert!(after2 > after, "the counter went on: {after} -> {after2}");
    step(
        t0,
        &format!(
            "storage migration: {:?}; HTTP through the EIP: {ok} answered, {failed} failed",
            m.stats
        ),
    );
    assert!(
        ok > 0 && failed <= 5,
        "{failed} failed requests during the switch"
    );

    // Back to h1 by storage migration, slowly, for the faults: each must leave the VM on h3.
    // Real data on the disk makes the mirror take a while at 8 MiB/s; auto-converge makes sure
    // the memory phase ends at that rate too.
    guest_sh(
        &c,
        &vm,
        "dd if=/dev/urandom of=/data/blob bs=1M count=16 2>/dev/null; sync",
    )
    .await;
    let slow = json!({"host": "h1", "bandwidth": 8 * 1024 * 1024, "auto_converge": true});
    let h1_pool = sp_dir.clone();
    let h1 = 0usize;
    let check_source = |label: &'static str| {
        let c = c.clone();
        let vm = vm.clone();
        async move {
            let i = instance(&c, &vm).await;
            assert_eq!(
                host_name(&c, &i).await,
                "h3",
                "{label}: the instance must still be on h3"
            );
            assert_eq!(i.state, InstanceState::Running, "{label}");
            let n = disk_counter(&c, &vm).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n2 = disk_counter(&c, &vm).await;
            assert!(
                n2 > n,
                "{label}: the guest at the source runs on ({n} -> {n2})"
            );
        }
    };

    // 1. The destination agent killed mid-transfer.
    let m = start_migration(&c, &vm, slow.clone())
        .await
        .expect("migrate");
    wait_transfer(&c, &m.id, 0.1).await;
    cluster.crash_agent(h1);
    let end = wait_end(&c, &m.id).await;
    assert_eq!(end.step, "failed", "{end:?}");
    check_source("destination agent killed").await;
    cluster.start_agent(h1).expect("agent back");
    nothing_left(&cluster, h1, &vm, &h1_pool).await;
    step(
        t0,
        &format!("destination agent killed: rolled back ({:?})", end.error),
    );

    // 2. The destination's QEMU killed mid-transfer.
    let m = start_migration(&c, &vm, slow.clone())
        .await
        .expect("migrate");
    wait_transfer(&c, &m.id, 0.1).await;
    let victim: Vec<u32> = cluster
        .qemu_processes_on(h1)
        .into_iter()
        .filter(|p| p.instance_id == vm)
        .map(|p| p.pid)
        .collect();
    assert!(
        !victim.is_empty(),
        "the destination QEMU runs during the transfer"
    );
    for pid in victim {
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let end = wait_end(&c, &m.id).await;
    assert_eq!(end.step, "failed", "{end:?}");
    check_source("destination QEMU killed").await;
    nothing_left(&cluster, h1, &vm, &h1_pool).await;
    step(
        t0,
        &format!("destination QEMU killed: rolled back ({:?})", end.error),
    );

    // 3. The controller killed mid-transfer, then started again.
    let m = start_migration(&c, &vm, slow.clone())
        .await
        .expect("migrate");
    wait_transfer(&c, &m.id, 0.1).await;
    cluster.kill_controller();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart_controller().await.expect("controller back");
    let c2 = cluster.client();
    let end = wait_end(&c2, &m.id).await;
    assert_eq!(end.step, "failed", "{end:?}");
    check_source("controller killed").await;
    nothing_left(&cluster, h1, &vm, &h1_pool).await;
    step(
        t0,
        &format!("controller killed: rolled back ({:?})", end.error),
    );

    // 4. The migration link cut mid-transfer (the destination's management veth down).
    let m = start_migration(&c2, &vm, slow.clone())
        .await
        .expect("migrate");
    wait_transfer(&c2, &m.id, 0.1).await;
    cluster.cut_mgmt(h1).expect("cut");
    let end = wait_end(&c2, &m.id).await;
    assert_eq!(end.step, "failed", "{end:?}");
    cluster.restore_mgmt(h1).expect("restore");
    check_source("migration link cut").await;
    nothing_left(&cluster, h1, &vm, &h1_pool).await;
    step(t0, &format!("link cut: rolled back ({:?})", end.error));

    // 5. The destination pool fills up mid-transfer: move the VM to h1, then back towards h3
    //    (its pool is a small tmpfs) and fill that pool while the disk streams in.
    let m = start_migration(&c2, &vm, json!({"host": "h1"}))
        .await
        .expect("to h1");
    let m = wait_end(&c2, &m.id).await;
    assert_eq!(m.step, "done", "{m:?}");
    let m = start_migration(
        &c2,
        &vm,
        json!({"host": "h3", "bandwidth": 8 * 1024 * 1024, "auto_converge": true}),
    )
    .await
    .expect("migrate to the small pool");
    wait_transfer(&c2, &m.id, 0.1).await;
    let filler = h3_pool.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status();
    let end = wait_end(&c2, &m.id).await;
    let _ = std::fs::remove_file(&filler);
    assert_eq!(end.step, "failed", "{end:?}");
    let i = instance(&c2, &vm).await;
    assert_eq!(host_name(&c2, &i).await, "h1", "the instance stays on h1");
    assert!(cluster.qemu_instances_on(0).contains(&vm));
    nothing_left(&cluster, 2, &vm, &h3_pool).await;
    let n = disk_counter(&c2, &vm).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(disk_counter(&c2, &vm).await > n, "the guest runs on at h1");
    step(
        t0,
        &format!("destination pool full: rolled back ({:?})", end.error),
    );

    // Events record each migration with its timings.
    let events: Value = c2.get("/api/v1/events?limit=500").await.expect("events");
    let text = events.to_string();
    assert!(text.contains("instance.migrated"), "events: {text}");
    assert!(text.contains("instance.migration.failed"), "events: {text}");

    drop(tmpfs);
    cluster.teardown().await.expect("teardown");
    let _ = std::fs::remove_dir_all(&dir);
    step(t0, "done");
}
