//! Real-QEMU tests of disk backups (TCG; the VM has no kernel and idles in SeaBIOS, which is
//! enough for QMP). Data is written into the disk from the host through HMP `qemu-io` on the
//! device's own block backend, so dirty bitmaps see it like guest writes. The ENOSPC test mounts
//! a small tmpfs, so these tests need root (as CI has).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use kumo_hypervisor::qmp::Qmp;
use kumo_hypervisor::{
    AccelChoice, BackupJob, DiskSpec, Hypervisor, HypervisorError, PowerState, QemuDriver,
    SimDriver, VmSpec,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 1 << 30;
const DEVICE: &str = "virtio-disk0";

use common::qemu_pids;

/// Kills the VM's QEMU and unmounts what the test mounted, even when the test fails.
struct Guard {
    id: String,
    mounts: Vec<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for pid in qemu_pids(&self.id) {
            eprintln!("test cleanup: killing QEMU {pid} of {}", self.id);
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
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if is_mounted(m) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

fn is_mounted(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = p.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_ref()))
}

fn qemu_img(args: &[&str]) -> std::process::Output {
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An empty qcow2 of `size` bytes, optionally backed by `backing` (named relative to `path`'s
/// directory, as the backup repository does).
fn create(path: &Path, size: u64, backing: Option<&str>) {
    let size = size.to_string();
    match backing {
        None => qemu_img(&["create", "-q", "-f", "qcow2", s(path), &size]),
        Some(b) => qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            b,
            "-F",
            "qcow2",
            "-u",
            s(path),
            &size,
        ]),
    };
}

/// Whether the two images (chains) have the same content.
fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", s(a), s(b)])
        .output()
        .expect("qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Bytes of data clusters allocated in `file` itself (not in its backing chain).
fn own_data_bytes(file: &Path) -> u64 {
    let out = qemu_img(&["map", "--output=json", "-U", s(file)]);
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

fn actual_size(file: &Path) -> u64 {
    let out = qemu_img(&["info", "--output=json", "-U", s(file)]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["actual-size"].as_u64().unwrap()
}

async fn hmp(qmp: &Qmp, line: &str) {
    let out = qmp
        .execute_with_timeout(
            "human-monitor-command",
            json!({ "command-line": line }),
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
    // HMP reports qemu-io failures as text, not as a QMP error.
    assert_eq!(out, json!(""), "{line}");
}

/// Write `len` bytes of `pattern` at `offset` through the disk's own block backend, then flush
/// so that `qemu-img -U` on the host sees it.
async fn write(qmp: &Qmp, pattern: u8, offset: u64, len: u64) {
    let chunk = 64 * MIB;
    let mut done = 0;
    while done < len {
        let n = chunk.min(len - done);
        hmp(
            qmp,
            &format!(
                "qemu-io -d {DEVICE}/virtio-backend \"write -P {pattern:#x} {} {n}\"",
                offset + done
            ),
        )
        .await;
        done += n;
    }
    hmp(
        qmp,
        &format!("qemu-io -d {DEVICE}/virtio-backend \"flush\""),
    )
    .await;
}

/// Node names that look like backup targets (they must never outlive a backup).
async fn target_nodes(qmp: &Qmp) -> Vec<String> {
    let v = qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("kumo-bt-"))
        .map(str::to_string)
        .collect()
}

async fn jobs(qmp: &Qmp) -> Vec<Value> {
    let v = qmp.execute("query-jobs", Value::Null).await.unwrap();
    v.as_array().unwrap().clone()
}

struct Vm {
    driver: QemuDriver,
    id: String,
    disk: PathBuf,
    dir: PathBuf,
    _guard: Guard,
}

/// A running VM with a 1 GiB qcow2 root disk; its first MiB holds 0x11.
async fn vm(work: &Path, tag: &str) -> Vm {
    let id = format!("i-bk{tag}-{}", std::process::id());
    let guard = Guard {
        id: id.clone(),
        mounts: vec![],
    };
    let dir = work.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("root.qcow2");
    create(&disk, DISK_SIZE, None);
    let driver = QemuDriver::new(work.join("run"), AccelChoice::Tcg)
        .await
        .unwrap();
    let spec = VmSpec {
        id: id.clone(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![DiskSpec {
            path: disk.clone(),
            format: "qcow2".into(),
            serial: Some(id.clone()),
            read_only: false,
            device_id: None,
        }],
        nics: vec![],
        kernel: None,
        initrd: None,
        cmdline: None,
        netns: None,
        smbios_serial: None,
        uuid: None,
    };
    driver.start(&spec).await.unwrap();
    let qmp = driver.qmp(&id).await.unwrap();
    write(&qmp, 0x11, 0, MIB).await;
    Vm {
        driver,
        id,
        disk,
        dir,
        _guard: guard,
    }
}

fn job(target: &Path, new: &str, since: Option<&str>) -> BackupJob {
    BackupJob {
        device_id: DEVICE.into(),
        target: target.to_path_buf(),
        new_bitmap: new.into(),
        since_bitmap: since.map(str::to_string),
        speed: None,
    }
}

#[tokio::test]
async fn full_then_incremental() {
    let work = tempfile::tempdir().unwrap();
    let vm = vm(work.path(), "inc").await;
    let (d, id) = (&vm.driver, vm.id.as_str());
    let qmp = d.qmp(id).await.unwrap();
    assert!(d.disk_bitmaps(id, DEVICE).await.unwrap().is_empty());

    let b1 = vm.dir.join("b1.qcow2");
    create(&b1, DISK_SIZE, None);
    let calls = Mutex::new(Vec::new());
    let record = |done: u64, total: u64| {
        calls.lock().unwrap().push((done, total));
        true
    };
    let report = d
        .backup_disk(id, &job(&b1, "kumo-b1", None), &record)
        .await
        .unwrap();
    assert_eq!(report.bytes_total, DISK_SIZE);
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.last(), Some(&(DISK_SIZE, DISK_SIZE)), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert_eq!(d.disk_bitmaps(id, DEVICE).await.unwrap(), ["kumo-b1"]);
    assert!(target_nodes(&qmp).await.is_empty());
    assert!(jobs(&qmp).await.is_empty(), "job not dismissed");
    assert!(same_content(&vm.disk, &b1));

    // 2 MiB more: the incremental holds exactly those 32 clusters.
    write(&qmp, 0x22, 4 * MIB, 2 * MIB).await;
    assert!(!same_content(&vm.disk, &b1));
    let b2 = vm.dir.join("b2.qcow2");
    create(&b2, DISK_SIZE, Some("b1.qcow2"));
    let report = d
        .backup_disk(id, &job(&b2, "kumo-b2", Some("kumo-b1")), &|_, _| true)
        .await
        .unwrap();
    eprintln!("incremental: {report:?}");
    let mut bitmaps = d.disk_bitmaps(id, DEVICE).await.unwrap();
    bitmaps.sort();
    assert_eq!(bitmaps, ["kumo-b1", "kumo-b2"], "since bitmap must stay");
    let data = own_data_bytes(&b2);
    let actual = actual_size(&b2);
    eprintln!("incremental: {data} data bytes, {actual} bytes allocated");
    assert!((2 * MIB..=2 * MIB + MIB / 5).contains(&data), "{data}");
    // Plus qcow2 metadata (header, L1, L2, refcounts: a few clusters).
    assert!(
        (2 * MIB..=2 * MIB + MIB / 5 + 512 * 1024).contains(&actual),
        "{actual}"
    );
    assert!(same_content(&vm.disk, &b2), "chain differs from the disk");
    assert!(target_nodes(&qmp).await.is_empty());

    // What the agent does after verifying b2.
    d.remove_bitmap(id, DEVICE, "kumo-b1").await.unwrap();
    d.remove_bitmap(id, DEVICE, "kumo-b1").await.unwrap();
    assert_eq!(d.disk_bitmaps(id, DEVICE).await.unwrap(), ["kumo-b2"]);

    // Bad requests change nothing.
    let b3 = vm.dir.join("b3.qcow2");
    create(&b3, DISK_SIZE, Some("b2.qcow2"));
    let bad = [
        job(&b3, "kumo-b3", Some("kumo-b1")),        // since bitmap gone
        job(&b3, "kumo-b2", None),                   // new bitmap exists
        job(&b3, "kumo-b3", Some("kumo-b3")),        // same name twice
        job(Path::new("b3.qcow2"), "kumo-b3", None), // relative target
        BackupJob {
            device_id: "vol-nope".into(),
            ..job(&b3, "kumo-b3", None)
        },
    ];
    for j in bad {
        let err = d.backup_disk(id, &j, &|_, _| true).await.unwrap_err();
        assert!(
            matches!(err, HypervisorError::InvalidSpec(_)),
            "{j:?}: {err}"
        );
    }
    // QEMU itself refuses a target of the wrong size: the transaction fails as a whole.
    let small = vm.dir.join("small.qcow2");
    create(&small, 64 * MIB, None);
    let err = d
        .backup_disk(id, &job(&small, "kumo-b3", Some("kumo-b2")), &|_, _| true)
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::Qmp(_)), "{err}");
    assert_eq!(d.disk_bitmaps(id, DEVICE).await.unwrap(), ["kumo-b2"]);
    assert!(target_nodes(&qmp).await.is_empty());
    assert!(jobs(&qmp).await.is_empty());
    assert!(matches!(
        d.disk_bitmaps(id, "vol-nope").await,
        Err(HypervisorError::InvalidSpec(_))
    ));
    assert!(matches!(
        d.disk_bitmaps("i-not-running", DEVICE).await,
        Err(HypervisorError::NotRunning(_))
    ));
    d.kill(id).await.unwrap();
}

#[tokio::test]
async fn cancel_keeps_the_chain_usable() {
    let work = tempfile::tempdir().unwrap();
    let vm = vm(work.path(), "cancel").await;
    let (d, id) = (&vm.driver, vm.id.as_str());
    let qmp = d.qmp(id).await.unwrap();
    let b1 = vm.dir.join("b1.qcow2");
    create(&b1, DISK_SIZE, None);
    d.backup_disk(id, &job(&b1, "kumo-b1", None), &|_, _| true)
        .await
        .unwrap();

    // Enough data that the job is still running at its first progress report.
    write(&qmp, 0x44, 16 * MIB, 512 * MIB).await;
    let b2 = vm.dir.join("b2.qcow2");
    create(&b2, DISK_SIZE, Some("b1.qcow2"));
    let first = Mutex::new(None);
    let stop = |done: u64, total: u64| {
        first.lock().unwrap().get_or_insert((done, total));
        false
    };
    let err = d
        .backup_disk(id, &job(&b2, "kumo-b2", Some("kumo-b1")), &stop)
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::Cancelled(_)), "{err}");
    let (done, total) = first.lock().unwrap().unwrap();
    eprintln!("cancelled at {done}/{total}");
    assert!(total >= 512 * MIB && done < total, "{done}/{total}");
    assert_eq!(d.disk_bitmaps(id, DEVICE).await.unwrap(), ["kumo-b1"]);
    assert!(target_nodes(&qmp).await.is_empty());
    assert!(jobs(&qmp).await.is_empty());
    assert_eq!(d.state(id).await.unwrap(), PowerState::Running);
    assert_eq!(qmp.query_status().await.unwrap().status, "running");

    // The repository would delete b2; the next incremental starts from the same bitmap.
    std::fs::remove_file(&b2).unwrap();
    let b3 = vm.dir.join("b3.qcow2");
    create(&b3, DISK_SIZE, Some("b1.qcow2"));
    let report = d
        .backup_disk(id, &job(&b3, "kumo-b3", Some("kumo-b1")), &|_, _| true)
        .await
        .unwrap();
    eprintln!("incremental after cancel: {report:?}");
    assert!(same_content(&vm.disk, &b3), "chain differs from the disk");
    let data = own_data_bytes(&b3);
    assert!((512 * MIB..=513 * MIB).contains(&data), "{data}");

    // An agent killed mid-backup leaves a running job and an open target node behind (as
    // named by the driver); the next backup clears them first.
    let blocks = qmp.execute("query-block", Value::Null).await.unwrap();
    let node = blocks[0]["inserted"]["node-name"]
        .as_str()
        .unwrap()
        .to_string();
    let dead = vm.dir.join("dead.qcow2");
    create(&dead, DISK_SIZE, None);
    qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "kumo-bt-dead",
               "file": {"driver": "file", "filename": s(&dead)}}),
    )
    .await
    .unwrap();
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "kumo-bj-dead", "device": node, "target": "kumo-bt-dead",
               "sync": "full", "speed": MIB, "auto-dismiss": false}),
    )
    .await
    .unwrap();
    assert_eq!(jobs(&qmp).await.len(), 1);
    let locked = |p: &Path| {
        !Command::new("qemu-img")
            .args(["info", s(p)])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(locked(&dead), "QEMU should hold the leftover target");
    let b4 = vm.dir.join("b4.qcow2");
    create(&b4, DISK_SIZE, Some("b3.qcow2"));
    d.backup_disk(id, &job(&b4, "kumo-b4", Some("kumo-b3")), &|_, _| true)
        .await
        .unwrap();
    assert!(jobs(&qmp).await.is_empty());
    assert!(target_nodes(&qmp).await.is_empty());
    assert!(!locked(&dead), "leftover target still open");
    assert!(same_content(&vm.disk, &b4));
    d.kill(id).await.unwrap();
}

#[tokio::test]
async fn job_error_is_reported_and_undone() {
    let work = tempfile::tempdir().unwrap();
    let mut vm = vm(work.path(), "enospc").await;
    let mnt = work.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs", s(&mnt)])
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs needs root");
    vm._guard.mounts.push(mnt.clone());
    let (d, id) = (&vm.driver, vm.id.as_str());
    let qmp = d.qmp(id).await.unwrap();
    write(&qmp, 0x55, 0, 64 * MIB).await;

    let target = mnt.join("b1.qcow2");
    create(&target, DISK_SIZE, None);
    let err = d
        .backup_disk(id, &job(&target, "kumo-b1", None), &|_, _| true)
        .await
        .unwrap_err();
    match &err {
        HypervisorError::BlockJobFailed(msg) => {
            assert!(msg.contains("No space left"), "{msg}")
        }
        other => panic!("expected a job error, got {other:?}"),
    }
    assert!(d.disk_bitmaps(id, DEVICE).await.unwrap().is_empty());
    assert!(target_nodes(&qmp).await.is_empty());
    assert!(jobs(&qmp).await.is_empty());
    assert_eq!(qmp.query_status().await.unwrap().status, "running");
    d.kill(id).await.unwrap();
}

#[tokio::test]
async fn sim_driver_has_no_backups() {
    let root = tempfile::tempdir().unwrap();
    let d = SimDriver::new(root.path().to_path_buf());
    let j = job(Path::new("/nonexistent/b.qcow2"), "kumo-b1", None);
    let err = d.backup_disk("i-x", &j, &|_, _| true).await.unwrap_err();
    assert!(matches!(err, HypervisorError::Unsupported(_)), "{err}");
    assert!(d.disk_bitmaps("i-x", DEVICE).await.unwrap().is_empty());
    d.remove_bitmap("i-x", DEVICE, "kumo-b1").await.unwrap();
}
