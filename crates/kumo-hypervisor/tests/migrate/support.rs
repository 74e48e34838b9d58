//! Helpers of the live-migration tests: two drivers, disks, the test guest, QMP probes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kumo_hypervisor::qmp::Qmp;
use kumo_hypervisor::{
    AccelChoice, DiskSpec, Hypervisor, IncomingReady, IncomingSpec, MigrateSpec, MigrationPhase,
    MigrationProgress, PowerState, QemuDriver, VmSpec,
};
use serde_json::{json, Value};

use crate::common::qemu_pids;

pub const MIB: u64 = 1 << 20;
pub const LOCALHOST: &str = "127.0.0.1";

/// Kills every QEMU of the test's VM id (source and destination share it, as on two hosts)
/// and unmounts what the test mounted, even when the test fails.
pub struct Guard {
    pub id: String,
    pub mounts: Vec<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for pid in qemu_pids(&self.id) {
            eprintln!("test cleanup: killing QEMU {pid} of {}", self.id);
            // SIGKILL also ends a SIGSTOPped process.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        for m in &self.mounts {
            // QEMU may need a moment to die and release the file.
            for _ in 0..50 {
                let ok = Command::new("umount")
                    .arg(m)
                    .status()
                    .is_ok_and(|s| s.success());
                if ok || !is_mounted(m) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if is_mounted(m) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = p.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_ref()))
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn create(path: &Path, size: u64) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s(path), &size.to_string()]);
    path.to_path_buf()
}

pub fn virtual_size(path: &Path) -> u64 {
    let out = qemu_img(&["info", "--output=json", "-U", s(path)]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// `qemu-img compare -U`: whether two images hold the same data.
pub fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", s(a), s(b)])
        .output()
        .expect("qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => {
            eprintln!("compare: {}", String::from_utf8_lossy(&out.stdout).trim());
            false
        }
        _ => panic!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// kumo's test guest, built once per test binary (cached by Debian package version).
pub fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hv-migrate-guest");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/build-guest.sh");
        let st = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("running guest/build-guest.sh");
        assert!(st.success(), "building the test guest failed");
        out
    })
}

pub fn disk(path: &Path, device_id: Option<&str>, serial: Option<&str>) -> DiskSpec {
    DiskSpec {
        path: path.to_path_buf(),
        format: "qcow2".into(),
        serial: serial.map(str::to_string),
        read_only: false,
        device_id: device_id.map(str::to_string),
    }
}

pub fn spec(id: &str, disks: Vec<DiskSpec>) -> VmSpec {
    VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: 128,
        disks,
        nics: vec![],
        kernel: None,
        initrd: None,
        cmdline: None,
        netns: None,
        smbios_serial: None,
        uuid: None,
    }
}

/// The same VM on the destination host: the same spec with the destination's disk files.
pub fn on_dest(spec: &VmSpec, files: &[&Path]) -> VmSpec {
    let mut d = spec.clone();
    for (disk, f) in d.disks.iter_mut().zip(files) {
        disk.path = f.to_path_buf();
    }
    d
}

pub fn with_guest(mut spec: VmSpec) -> VmSpec {
    let g = guest();
    spec.kernel = Some(g.join("vmlinux"));
    spec.initrd = Some(g.join("initrd.img"));
    spec.cmdline = Some(format!(
        "console=ttyS0 quiet kumo.id={} kumo.hostname=mig",
        spec.id
    ));
    spec
}

pub fn unique_id(tag: &str) -> String {
    format!("i-mg{tag}-{}", std::process::id())
}

pub async fn drivers(work: &Path) -> (QemuDriver, QemuDriver) {
    let src = QemuDriver::new(work.join("src-run"), AccelChoice::Tcg)
        .await
        .unwrap();
    let dst = QemuDriver::new(work.join("dst-run"), AccelChoice::Tcg)
        .await
        .unwrap();
    (src, dst)
}

pub async fn hmp(qmp: &Qmp, line: &str) {
    let out = qmp
        .execute_with_timeout(
            "human-monitor-command",
            json!({ "command-line": line }),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // HMP reports qemu-io failures as text, not as a QMP error.
    assert_eq!(out, json!(""), "{line}");
}

/// Write `len` bytes of `pattern` at `offset` of a disk through its own block backend.
pub async fn write(qmp: &Qmp, device: &str, pattern: u8, offset: u64, len: u64) {
    hmp(
        qmp,
        &format!("qemu-io -d {device}/virtio-backend \"write -P {pattern:#x} {offset} {len}\""),
    )
    .await;
    hmp(
        qmp,
        &format!("qemu-io -d {device}/virtio-backend \"flush\""),
    )
    .await;
}

pub async fn block_jobs(qmp: &Qmp) -> Vec<Value> {
    let v = qmp.execute("query-block-jobs", Value::Null).await.unwrap();
    v.as_array().unwrap().clone()
}

pub async fn qemu_status(qmp: &Qmp) -> String {
    qmp.query_status().await.unwrap().status
}

pub async fn migration_status(qmp: &Qmp) -> String {
    let v = qmp.execute("query-migrate", Value::Null).await.unwrap();
    v["status"].as_str().unwrap_or("none").to_string()
}

/// Guest writes the disk device has seen so far.
pub async fn writes(qmp: &Qmp, device: &str) -> u64 {
    let v = qmp.execute("query-blockstats", Value::Null).await.unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|b| {
            b["qdev"]
                .as_str()
                .is_some_and(|q| q.contains(&format!("/{device}/")))
        })
        .and_then(|b| b["stats"]["wr_operations"].as_u64())
        .unwrap_or_else(|| panic!("no blockstats for {device}: {v}"))
}

/// Wait until the guest writes its counter to its root disk.
pub async fn wait_writing(d: &QemuDriver, id: &str) {
    let qmp = d.qmp(id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let first = writes(&qmp, "virtio-disk0").await;
    loop {
        let log = std::fs::read_to_string(d.console_log(id)).unwrap_or_default();
        if log.contains("KUMO-GUEST-DATA-ERROR") {
            panic!("guest cannot use its disk: {log}");
        }
        if log.contains("KUMO-GUEST-BOOTED") && writes(&qmp, "virtio-disk0").await > first + 5 {
            return;
        }
        assert!(Instant::now() < deadline, "guest did not boot: {log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the guest of `id` writes to its root disk on this driver within `within`.
pub async fn keeps_writing(d: &QemuDriver, id: &str, within: Duration) -> bool {
    let qmp = d.qmp(id).await.unwrap();
    let before = writes(&qmp, "virtio-disk0").await;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if writes(&qmp, "virtio-disk0").await > before + 2 {
            return true;
        }
    }
    false
}

pub fn incoming(nbd: bool) -> IncomingSpec {
    IncomingSpec {
        listen_ip: LOCALHOST.parse().unwrap(),
        nbd,
    }
}

pub fn migrate_spec(target: &IncomingReady) -> MigrateSpec {
    MigrateSpec {
        target: target.clone(),
        downtime_limit_ms: 0,
        auto_converge: false,
        bandwidth: None,
        stall_timeout_secs: 0,
    }
}

/// Every progress call with its time.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<(Instant, MigrationProgress)>>);

impl Recorder {
    pub fn push(&self, p: &MigrationProgress) {
        self.0.lock().unwrap().push((Instant::now(), p.clone()));
    }

    pub fn calls(&self) -> Vec<(Instant, MigrationProgress)> {
        self.0.lock().unwrap().clone()
    }

    /// Phases in order, repeats collapsed.
    pub fn phases(&self) -> Vec<MigrationPhase> {
        let mut v: Vec<MigrationPhase> = self.calls().iter().map(|(_, p)| p.phase).collect();
        v.dedup();
        v
    }

    pub fn longest_gap(&self, start: Instant) -> Duration {
        let calls = self.calls();
        let mut last = start;
        let mut gap = Duration::ZERO;
        for (t, _) in calls {
            gap = gap.max(t - last);
            last = t;
        }
        gap
    }
}

pub fn pid_of(d: &QemuDriver, id: &str) -> u32 {
    std::fs::read_to_string(d.run_dir(id).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z'))
}

/// A source VM idling in firmware with a 64 MiB root disk holding `data` bytes of 0x5a, and a
/// blank 64 MiB destination disk in `dest_dir`.
pub async fn firmware_pair(
    work: &Path,
    id: &str,
    data: u64,
    dest_dir: &Path,
) -> (QemuDriver, QemuDriver, VmSpec, VmSpec) {
    let (src, dst) = drivers(work).await;
    let root = create(&work.join("src/root.qcow2"), 64 * MIB);
    let src_spec = spec(id, vec![disk(&root, None, None)]);
    let dst_root = create(&dest_dir.join("root.qcow2"), 64 * MIB);
    let dst_spec = on_dest(&src_spec, &[&dst_root]);
    src.start(&src_spec).await.unwrap();
    if data > 0 {
        let qmp = src.qmp(id).await.unwrap();
        write(&qmp, "virtio-disk0", 0x5a, 0, data).await;
    }
    (src, dst, src_spec, dst_spec)
}

/// Source running, no mirror job, no migration under way.
pub async fn assert_source_intact(src: &QemuDriver, id: &str) {
    assert_eq!(src.state(id).await.unwrap(), PowerState::Running);
    let qmp = src.qmp(id).await.unwrap();
    assert_eq!(qemu_status(&qmp).await, "running");
    assert!(
        block_jobs(&qmp).await.is_empty(),
        "{:?}",
        block_jobs(&qmp).await
    );
    let mig = migration_status(&qmp).await;
    assert!(
        matches!(mig.as_str(), "none" | "cancelled" | "failed" | "completed"),
        "{mig}"
    );
}
