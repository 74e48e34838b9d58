//! Real-QEMU tests of disk hot-plug, resize and live snapshots (TCG; no guest OS: the VM sits
//! in SeaBIOS, which is enough for QMP but never releases a hot-unplugged device; a QMP
//! `system_reset` completes a pending unplug, which stands in for the guest here).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kumo_hypervisor::{
    AccelChoice, AttachedDisk, DiskSpec, Hypervisor, HypervisorError, QemuDriver, SimDriver,
    SnapshotTarget, VmSpec,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

use common::qemu_pids;

/// Kills the test's QEMU when dropped, so a failing test leaves no process behind (the files
/// go with the tempdir, dropped after this guard).
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in qemu_pids(&self.0) {
            eprintln!("test cleanup: killing leftover QEMU {pid} of {}", self.0);
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

fn unique_id(tag: &str) -> String {
    format!("i-{tag}-{}", std::process::id())
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_qcow2(path: &Path, size: &str) -> PathBuf {
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size]);
    path.to_path_buf()
}

/// `qemu-img info -U` (the file is held by a running QEMU).
fn img_info(path: &Path) -> Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

fn disk(path: &Path, device_id: Option<&str>, serial: Option<&str>) -> DiskSpec {
    DiskSpec {
        path: path.to_path_buf(),
        format: "qcow2".into(),
        serial: serial.map(str::to_string),
        read_only: false,
        device_id: device_id.map(str::to_string),
    }
}

fn spec(id: &str, disks: Vec<DiskSpec>) -> VmSpec {
    VmSpec {
        id: id.to_string(),
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

/// Names of every block node of the VM.
async fn nodes(d: &QemuDriver, id: &str) -> BTreeSet<String> {
    let v = d
        .qmp(id)
        .await
        .unwrap()
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect()
}

fn find<'a>(disks: &'a [AttachedDisk], dev: &str) -> Option<&'a AttachedDisk> {
    disks.iter().find(|d| d.device_id == dev)
}

/// QMP reset, then wait for SeaBIOS's own reset that follows it (~40 ms later under TCG):
/// that one would also complete any unplug requested meanwhile, which must not happen while a
/// test relies on "the guest never releases".
async fn reboot_settled(d: &QemuDriver, id: &str) {
    let mut events = d.qmp(id).await.unwrap().events();
    d.reboot(id).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = events.recv().await {
            if ev.event == "RESET" && ev.data["guest"] == true {
                break;
            }
        }
    })
    .await;
}

/// Complete a pending unplug the way a guest would (QEMU finishes it on reset), then wait
/// until the device is gone.
async fn reset_and_wait_gone(d: &QemuDriver, id: &str, dev: &str) {
    reboot_settled(d, id).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while find(&d.attached_disks(id).await.unwrap(), dev).is_some() {
        assert!(Instant::now() < deadline, "{dev} still there after reset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn attach_resize_snapshot_detach() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("blk");
    let _reaper = Reaper(id.clone());
    let w = work.path();
    let root = make_qcow2(&w.join("root.qcow2"), "64M");
    let vol_id = format!("vol-{:x}", std::process::id());
    let vol = make_qcow2(&w.join("vol.qcow2"), "64M");
    let other = make_qcow2(&w.join("other.qcow2"), "64M");
    let d = QemuDriver::new(w.join("run"), AccelChoice::Tcg)
        .await
        .unwrap();
    let vol_disk = disk(&vol, Some(&vol_id), Some(&vol_id));

    // Not running yet.
    assert!(matches!(
        d.attach_disk(&id, &vol_disk).await,
        Err(HypervisorError::NotRunning(_))
    ));
    assert!(matches!(
        d.attached_disks(&id).await,
        Err(HypervisorError::NotRunning(_))
    ));

    d.start(&spec(&id, vec![disk(&root, None, Some(&id))]))
        .await
        .unwrap();
    let listed = d.attached_disks(&id).await.unwrap();
    assert_eq!(
        listed,
        vec![AttachedDisk {
            device_id: "virtio-disk0".into(),
            node: "disk0".into(),
            file: root.clone(),
            format: "qcow2".into(),
            size_bytes: 64 * MIB,
            read_only: false,
            serial: Some(id.clone()),
        }]
    );

    // Hot-plug.
    let t = Instant::now();
    d.attach_disk(&id, &vol_disk).await.unwrap();
    eprintln!("attach: {} ms", t.elapsed().as_millis());
    let listed = d.attached_disks(&id).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        find(&listed, &vol_id),
        Some(&AttachedDisk {
            device_id: vol_id.clone(),
            node: vol_id.clone(),
            file: vol.clone(),
            format: "qcow2".into(),
            size_bytes: 64 * MIB,
            read_only: false,
            serial: Some(vol_id.clone()),
        })
    );
    let after_attach = nodes(&d, &id).await;
    // Again: Ok, nothing added.
    d.attach_disk(&id, &vol_disk).await.unwrap();
    assert_eq!(d.attached_disks(&id).await.unwrap(), listed);
    assert_eq!(nodes(&d, &id).await, after_attach);

    // Failures leave no node and no device behind.
    let missing = disk(&w.join("missing.qcow2"), Some("vol-missing"), None);
    let err = d.attach_disk(&id, &missing).await.unwrap_err();
    assert!(err.source_chain_contains("No such file"), "{err:?}");
    let dup = disk(&other, Some(&vol_id), None);
    assert!(matches!(
        d.attach_disk(&id, &dup).await,
        Err(HypervisorError::InvalidSpec(_))
    ));
    // A device id taken by a non-disk device: device_add fails after blockdev-add.
    let clash = disk(&other, Some("rng0dev"), None);
    let err = d.attach_disk(&id, &clash).await.unwrap_err();
    assert!(matches!(err, HypervisorError::Qmp(_)), "{err:?}");
    for bad in [
        disk(&other, None, None),
        disk(Path::new("rel.qcow2"), Some("vol-rel"), None),
        disk(&other, Some("disk7"), None),
    ] {
        assert!(matches!(
            d.attach_disk(&id, &bad).await,
            Err(HypervisorError::InvalidSpec(_))
        ));
    }
    assert_eq!(nodes(&d, &id).await, after_attach);
    assert_eq!(d.attached_disks(&id).await.unwrap(), listed);

    // Grow online; shrinking is refused.
    d.resize_disk(&id, &vol_id, 128 * MIB).await.unwrap();
    let vol_now = d.attached_disks(&id).await.unwrap();
    assert_eq!(find(&vol_now, &vol_id).unwrap().size_bytes, 128 * MIB);
    assert_eq!(img_info(&vol)["virtual-size"], 128 * MIB);
    for (size, what) in [(64 * MIB, "shrink"), (128 * MIB + 1, "odd size")] {
        assert!(
            matches!(
                d.resize_disk(&id, &vol_id, size).await,
                Err(HypervisorError::InvalidSpec(_))
            ),
            "{what} accepted"
        );
    }
    assert!(d.resize_disk(&id, "vol-nope", 128 * MIB).await.is_err());
    assert_eq!(img_info(&vol)["virtual-size"], 128 * MIB);

    // A snapshot that fails half-way changes nothing and leaves no overlay.
    let root1 = w.join("root.1.qcow2");
    let vol1 = w.join("vol.1.qcow2");
    let before = nodes(&d, &id).await;
    let err = d
        .snapshot_disks(
            &id,
            &[
                SnapshotTarget {
                    device_id: "virtio-disk0".into(),
                    overlay: root1.clone(),
                },
                SnapshotTarget {
                    device_id: vol_id.clone(),
                    overlay: w.join("nodir/vol.1.qcow2"),
                },
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::Qmp(_)), "{err:?}");
    assert!(!root1.exists(), "overlay of a failed snapshot left behind");
    assert_eq!(d.attached_disks(&id).await.unwrap(), vol_now);
    assert_eq!(nodes(&d, &id).await, before);
    // An existing overlay file is never overwritten.
    std::fs::write(&vol1, b"keep").unwrap();
    let target = SnapshotTarget {
        device_id: vol_id.clone(),
        overlay: vol1.clone(),
    };
    assert!(matches!(
        d.snapshot_disks(&id, std::slice::from_ref(&target)).await,
        Err(HypervisorError::InvalidSpec(_))
    ));
    assert_eq!(std::fs::read(&vol1).unwrap(), b"keep");
    std::fs::remove_file(&vol1).unwrap();

    // Root + volume in one transaction.
    let report = d
        .snapshot_disks(
            &id,
            &[
                SnapshotTarget {
                    device_id: "virtio-disk0".into(),
                    overlay: root1.clone(),
                },
                target,
            ],
        )
        .await
        .unwrap();
    eprintln!("snapshot of 2 disks: pause {:?}", report.pause);
    assert!(report.pause > Duration::ZERO && report.pause < Duration::from_secs(5));
    assert_eq!(report.nodes.len(), 2);
    for (overlay, old) in [(&root1, &root), (&vol1, &vol)] {
        let info = img_info(overlay);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["backing-filename"], old.to_str().unwrap(), "{info}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    }
    let snapped = d.attached_disks(&id).await.unwrap();
    let root_now = find(&snapped, "virtio-disk0").unwrap();
    let vol_after = find(&snapped, &vol_id).unwrap();
    assert_eq!((&root_now.file, &root_now.node), (&root1, &report.nodes[0]));
    assert_eq!(
        (&vol_after.file, &vol_after.node),
        (&vol1, &report.nodes[1])
    );
    assert_eq!(vol_after.size_bytes, 128 * MIB);
    assert_ne!(report.nodes[1], vol_id);
    // Resize acts on the new active node.
    d.resize_disk(&id, &vol_id, 192 * MIB).await.unwrap();
    assert_eq!(img_info(&vol1)["virtual-size"], 192 * MIB);

    // SeaBIOS never releases the device: Timeout, and the disk is still there.
    let t = Instant::now();
    let err = d
        .detach_disk(&id, &vol_id, Duration::from_secs(2))
        .await
        .unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, HypervisorError::Timeout(_)), "{err:?}");
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(5));
    assert!(find(&d.attached_disks(&id).await.unwrap(), &vol_id).is_some());
    // The device goes (QEMU completes the pending unplug on reset); its nodes stay (QEMU
    // frees the overlay a moment later, the base node only on blockdev-del).
    reset_and_wait_gone(&d, &id, &vol_id).await;
    let left = nodes(&d, &id).await;
    assert!(left.contains(&vol_id), "{left:?}");
    // The second call, right away, finishes the job: only blockdev-del.
    let t = Instant::now();
    d.detach_disk(&id, &vol_id, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    let left = nodes(&d, &id).await;
    assert!(
        left.iter().all(|n| !n.starts_with(&vol_id)),
        "volume nodes left: {left:?}"
    );
    // Not attached: Ok. The files stay.
    d.detach_disk(&id, &vol_id, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(vol.exists() && vol1.exists());
    // The same volume can be attached again (on its active layer).
    let again = disk(&vol1, Some(&vol_id), Some(&vol_id));
    d.attach_disk(&id, &again).await.unwrap();
    assert_eq!(
        find(&d.attached_disks(&id).await.unwrap(), &vol_id).map(|d| &d.file),
        Some(&vol1)
    );

    // A guest that releases the device while detach waits: detach returns once it is gone.
    let waiter = {
        let d = d.clone();
        let (id, vol_id) = (id.clone(), vol_id.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let r = d.detach_disk(&id, &vol_id, Duration::from_secs(30)).await;
            (r, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    if waiter.is_finished() {
        panic!(
            "detach returned before the release: {:?}",
            waiter.await.unwrap()
        );
    }
    d.reboot(&id).await.unwrap();
    let (r, took) = waiter.await.unwrap();
    r.unwrap();
    eprintln!("detach with release after 700 ms: {} ms", took.as_millis());
    assert!(took < Duration::from_secs(10));
    assert!(find(&d.attached_disks(&id).await.unwrap(), &vol_id).is_none());
    assert!(nodes(&d, &id).await.iter().all(|n| !n.starts_with(&vol_id)));

    // Stopped VM: every disk operation says so.
    d.kill(&id).await.unwrap();
    assert!(matches!(
        d.attach_disk(&id, &vol_disk).await,
        Err(HypervisorError::NotRunning(_))
    ));
    assert!(matches!(
        d.detach_disk(&id, &vol_id, Duration::from_secs(1)).await,
        Err(HypervisorError::NotRunning(_))
    ));
    assert!(matches!(
        d.resize_disk(&id, &vol_id, 256 * MIB).await,
        Err(HypervisorError::NotRunning(_))
    ));
    let target = SnapshotTarget {
        device_id: vol_id.clone(),
        overlay: w.join("vol.2.qcow2"),
    };
    assert!(matches!(
        d.snapshot_disks(&id, &[target]).await,
        Err(HypervisorError::NotRunning(_))
    ));
    assert!(!w.join("vol.2.qcow2").exists());
    d.cleanup(&id).await.unwrap();
    assert!(qemu_pids(&id).is_empty());
}

/// Disks given device ids at start-up are found and detached like hot-plugged ones; so is a
/// disk started without one (`virtio-disk<i>` on node `disk<i>`).
#[tokio::test]
async fn startup_disks_with_device_ids() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("blkstart");
    let _reaper = Reaper(id.clone());
    let w = work.path();
    let root = make_qcow2(&w.join("root.qcow2"), "64M");
    let vol_id = format!("vol-s{:x}", std::process::id());
    let vol = make_qcow2(&w.join("vol.qcow2"), "32M");
    let seed = make_qcow2(&w.join("seed.qcow2"), "1M");
    let d = QemuDriver::new(w.join("run"), AccelChoice::Tcg)
        .await
        .unwrap();
    d.start(&spec(
        &id,
        vec![
            disk(&root, None, Some(&id)),
            disk(&vol, Some(&vol_id), Some(&vol_id)),
            disk(&seed, None, None),
        ],
    ))
    .await
    .unwrap();
    let listed = d.attached_disks(&id).await.unwrap();
    let summary: Vec<(&str, &str, Option<&str>, u64)> = listed
        .iter()
        .map(|a| {
            (
                a.device_id.as_str(),
                a.node.as_str(),
                a.serial.as_deref(),
                a.size_bytes,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("virtio-disk0", "disk0", Some(id.as_str()), 64 * MIB),
            (
                vol_id.as_str(),
                vol_id.as_str(),
                Some(vol_id.as_str()),
                32 * MIB
            ),
            ("virtio-disk2", "disk2", None, MIB),
        ]
    );
    // Boot order: only the root disk.
    let pid = qemu_pids(&id)[0];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let devices: Vec<String> = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .filter(|a| a.starts_with("virtio-blk-pci,"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        devices,
        [
            format!("virtio-blk-pci,id=virtio-disk0,drive=disk0,serial={id},bootindex=1"),
            format!("virtio-blk-pci,id={vol_id},drive={vol_id},serial={vol_id}"),
            "virtio-blk-pci,id=virtio-disk2,drive=disk2".to_string(),
        ]
    );

    let report = d
        .snapshot_disks(
            &id,
            &[SnapshotTarget {
                device_id: vol_id.clone(),
                overlay: w.join("vol.1.qcow2"),
            }],
        )
        .await
        .unwrap();
    assert_eq!(report.nodes.len(), 1);
    for dev in [vol_id.as_str(), "virtio-disk2"] {
        assert!(matches!(
            d.detach_disk(&id, dev, Duration::from_millis(300)).await,
            Err(HypervisorError::Timeout(_))
        ));
    }
    reboot_settled(&d, &id).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.attached_disks(&id).await.unwrap().len() > 1 {
        assert!(Instant::now() < deadline, "devices not released by reset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for dev in [vol_id.as_str(), "virtio-disk2"] {
        d.detach_disk(&id, dev, Duration::from_secs(1))
            .await
            .unwrap();
    }
    assert_eq!(
        nodes(&d, &id).await,
        ["disk0", "disk0-file"].map(String::from).into()
    );
    // A NIC-like non-disk device is not detached as a disk.
    assert!(matches!(
        d.detach_disk(&id, "rng0dev", Duration::from_secs(1)).await,
        Err(HypervisorError::InvalidSpec(_))
    ));
    d.kill(&id).await.unwrap();
    d.cleanup(&id).await.unwrap();
}

#[tokio::test]
async fn sim_driver_disks() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let root = make_qcow2(&w.join("root.qcow2"), "64M");
    let vol = make_qcow2(&w.join("vol.qcow2"), "16M");
    let d = SimDriver::new(w.join("run"));
    let vol_disk = disk(&vol, Some("vol-1"), Some("vol-1"));
    assert!(matches!(
        d.attach_disk("i-1", &vol_disk).await,
        Err(HypervisorError::NotRunning(_))
    ));
    d.start(&spec("i-1", vec![disk(&root, None, Some("i-1"))]))
        .await
        .unwrap();
    d.attach_disk("i-1", &vol_disk).await.unwrap();
    d.attach_disk("i-1", &vol_disk).await.unwrap();
    assert!(matches!(
        d.attach_disk("i-1", &disk(&root, Some("vol-1"), None))
            .await,
        Err(HypervisorError::InvalidSpec(_))
    ));
    let listed = d.attached_disks("i-1").await.unwrap();
    let sizes: Vec<(&str, u64)> = listed
        .iter()
        .map(|a| (a.device_id.as_str(), a.size_bytes))
        .collect();
    assert_eq!(sizes, [("virtio-disk0", 64 * MIB), ("vol-1", 16 * MIB)]);
    d.resize_disk("i-1", "vol-1", 32 * MIB).await.unwrap();
    assert!(d.resize_disk("i-1", "vol-1", 16 * MIB).await.is_err());
    assert!(d.resize_disk("i-1", "vol-2", 64 * MIB).await.is_err());
    let report = d
        .snapshot_disks(
            "i-1",
            &[SnapshotTarget {
                device_id: "vol-1".into(),
                overlay: w.join("vol.1.qcow2"),
            }],
        )
        .await
        .unwrap();
    assert_eq!(report.pause, Duration::ZERO);
    assert_eq!(report.nodes.len(), 1);
    // Disks survive a driver restart like the VM does.
    drop(d);
    let d = SimDriver::new(w.join("run"));
    let listed = d.attached_disks("i-1").await.unwrap();
    assert_eq!(find(&listed, "vol-1").unwrap().size_bytes, 32 * MIB);
    d.detach_disk("i-1", "vol-1", Duration::ZERO).await.unwrap();
    d.detach_disk("i-1", "vol-1", Duration::ZERO).await.unwrap();
    assert_eq!(d.attached_disks("i-1").await.unwrap().len(), 1);
    d.stop("i-1", Duration::ZERO).await.unwrap();
    assert!(matches!(
        d.attached_disks("i-1").await,
        Err(HypervisorError::NotRunning(_))
    ));
    // A restart plugs the spec's disks only.
    d.start(&spec("i-1", vec![disk(&root, None, None)]))
        .await
        .unwrap();
    assert_eq!(d.attached_disks("i-1").await.unwrap().len(), 1);
}

/// Error chains (`HypervisorError::Qmp` carries QEMU's message in its source).
trait ChainContains {
    fn source_chain_contains(&self, needle: &str) -> bool;
}

impl ChainContains for HypervisorError {
    fn source_chain_contains(&self, needle: &str) -> bool {
        let mut e: Option<&dyn std::error::Error> = Some(self);
        while let Some(cur) = e {
            if cur.to_string().contains(needle) {
                return true;
            }
            e = cur.source();
        }
        false
    }
}
