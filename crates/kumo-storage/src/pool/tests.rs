//! dir-pool tests against the real qemu-img/qemu-io: disks, images, snapshots, GC.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::*;

pub(super) const MIB: u64 = 1 << 20;

pub(super) fn noop() -> Progress {
    Arc::new(|_| {})
}

pub(super) fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub(super) fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-io -c 'write -P PAT OFF LEN'`.
pub(super) fn write_pattern(path: &Path, pattern: u8, off: &str, len: &str) {
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern:#x} {off} {len}"),
            p(path),
        ],
    );
}

/// `qemu-io -c 'read -P PAT OFF LEN'` succeeds (qemu-io exits 1 on a mismatch).
pub(super) fn reads_pattern(path: &Path, format: &str, pattern: u8, off: &str, len: &str) -> bool {
    Command::new("qemu-io")
        .args([
            "-f",
            format,
            "-r",
            "-c",
            &format!("read -P {pattern:#x} {off} {len}"),
            p(path),
        ])
        .output()
        .unwrap()
        .status
        .success()
}

pub(super) fn img_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", p(path)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(super) fn vsize(path: &Path) -> u64 {
    img_info(path)["virtual-size"].as_u64().unwrap()
}

/// File names in a directory of the pool, sorted.
pub(super) fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub(super) fn dir_pool(root: &Path) -> Pool {
    Pool::open(PoolConfig {
        name: "test".into(),
        kind: PoolKind::Dir,
        path: root.to_path_buf(),
        vg: None,
    })
    .unwrap()
}

pub(super) fn layers(root: &Path) -> Vec<String> {
    files(&root.join("layers"))
}

/// A qcow2 image in the pool's image cache with 0x11 at its start.
pub(super) fn make_image(pool: &Pool, name: &str, size: &str) -> PathBuf {
    let img = pool.image_dir().join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), size]);
    write_pattern(&img, 0x11, "0", "1M");
    img
}

#[test]
fn pool_kinds() {
    for (s, k) in [
        ("dir", PoolKind::Dir),
        ("Shared", PoolKind::Shared),
        ("lvm", PoolKind::Lvm),
    ] {
        assert_eq!(s.parse::<PoolKind>().unwrap(), k);
        assert_eq!(k.to_string(), s.to_ascii_lowercase());
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            format!("\"{}\"", k.as_str())
        );
    }
    assert!(matches!(
        "nfs".parse::<PoolKind>(),
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(PoolKind::Shared.is_shared() && !PoolKind::Dir.is_shared());
    let lvm_without_vg = Pool::open(PoolConfig {
        name: "x".into(),
        kind: PoolKind::Lvm,
        path: PathBuf::from("/nonexistent/never"),
        vg: None,
    });
    assert!(matches!(
        lvm_without_vg,
        Err(StorageError::InvalidArgument(_))
    ));
}

#[test]
fn ids_are_checked() {
    for ok in ["i-0123abcd", "vol-1", "a.b_c-d"] {
        check_id("disk", ok).unwrap();
    }
    for bad in [
        "",
        ".",
        "..",
        "-x",
        "a/b",
        "a b",
        ".hidden",
        &"x".repeat(101),
    ] {
        assert!(
            matches!(check_id("disk", bad), Err(StorageError::InvalidArgument(_))),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn blank_disks_have_exact_sizes_and_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    for d in ["images", "layers", "disks", "snapshots"] {
        assert!(dir.path().join(d).is_dir(), "{d}");
    }

    let err = pool
        .create_disk("vol-odd", 10 * MIB + 123, &DiskBase::Blank, noop())
        .await;
    match err {
        Err(StorageError::InvalidArgument(m)) => assert!(m.contains("multiple of 512"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        pool.create_disk("vol-zero", 0, &DiskBase::Blank, noop())
            .await,
        Err(StorageError::Empty(_))
    ));
    assert!(matches!(
        pool.create_disk("../evil", MIB, &DiskBase::Blank, noop())
            .await,
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(layers(dir.path()).is_empty() && files(&dir.path().join("disks")).is_empty());

    let d = pool
        .create_disk("vol-a", 10 * MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();
    assert_eq!(d.size, 10 * MIB);
    assert_eq!(d.format, "qcow2");
    assert_eq!(d.path, dir.path().join("layers/vol-a.0.qcow2"));
    assert_eq!(vsize(&d.path), 10 * MIB);
    assert!(img_info(&d.path).get("backing-filename").is_none());

    let again = pool
        .create_disk("vol-a", 10 * MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();
    assert_eq!(again, d);
    assert!(matches!(
        pool.create_disk("vol-a", 20 * MIB, &DiskBase::Blank, noop())
            .await,
        Err(StorageError::Conflict(_))
    ));
    assert_eq!(layers(dir.path()), vec!["vol-a.0.qcow2"]);
    assert_eq!(pool.disk("vol-a").await.unwrap(), Some(d.clone()));
    assert_eq!(pool.disks().await.unwrap(), vec![d]);
    assert_eq!(pool.disk("vol-b").await.unwrap(), None);

    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("disks/vol-a.json")).unwrap())
            .unwrap();
    assert_eq!(m["active"], "vol-a.0");
    assert_eq!(m["size"], 10 * MIB);
    assert_eq!(m["format"], "qcow2");
    assert!(m["created"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn concurrent_creates_of_one_disk_make_one_layer() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let other = dir_pool(dir.path()); // a second agent on the same (shared) directory
    let (a, b) = tokio::join!(
        pool.create_disk("vol-c", 4 * MIB, &DiskBase::Blank, noop()),
        other.create_disk("vol-c", 4 * MIB, &DiskBase::Blank, noop())
    );
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(layers(dir.path()), vec!["vol-c.0.qcow2"]);
}

#[tokio::test]
async fn disk_on_image_is_an_overlay_and_gc_removes_its_layers() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let img = make_image(&pool, "img-1", "20M");
    let base = DiskBase::Image {
        path: img.clone(),
        format: "qcow2".into(),
    };

    let small = pool.create_disk("i-1", 16 * MIB, &base, noop()).await;
    assert!(
        matches!(small, Err(StorageError::InvalidArgument(_))),
        "{small:?}"
    );
    let missing = DiskBase::Image {
        path: dir.path().join("images/nope"),
        format: "qcow2".into(),
    };
    assert!(matches!(
        pool.create_disk("i-1", 32 * MIB, &missing, noop()).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(layers(dir.path()).is_empty() && files(&dir.path().join("disks")).is_empty());

    let d = pool
        .create_disk("i-1", 32 * MIB, &base, noop())
        .await
        .unwrap();
    let info = img_info(&d.path);
    assert_eq!(info["backing-filename"], p(&img));
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 32 * MIB);
    assert!(reads_pattern(&d.path, "qcow2", 0x11, "0", "1M"));

    // A second disk on the same image, and an orphan layer nobody references.
    let d2 = pool
        .create_disk("i-2", 20 * MIB, &base, noop())
        .await
        .unwrap();
    let orphan = dir.path().join("layers/i-9.0.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&orphan), "1M"],
    );
    assert_eq!(pool.gc().await.unwrap(), vec![orphan.clone()]);

    pool.delete_disk("i-1").await.unwrap();
    assert!(!d.path.exists() && d2.path.exists() && img.exists());
    pool.delete_disk("i-1").await.unwrap(); // idempotent
    pool.delete_disk("i-2").await.unwrap();
    assert!(layers(dir.path()).is_empty(), "{:?}", layers(dir.path()));
    assert!(files(&dir.path().join("disks")).is_empty());
    assert!(img.exists(), "images are not the GC's business");
    assert_eq!(pool.disks().await.unwrap(), vec![]);
}

#[tokio::test]
async fn capacity_is_statvfs() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let c = pool.capacity().await.unwrap();
    assert!(c.total_bytes > 0 && c.free_bytes <= c.total_bytes, "{c:?}");
}

#[tokio::test]
async fn offline_snapshots_pin_layers_across_disk_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let d = pool
        .create_disk("vol-s", 16 * MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();
    write_pattern(&d.path, 0xab, "0", "1M");

    let s1 = pool.snapshot_offline("vol-s", "snap-1").await.unwrap();
    assert_eq!(s1.layer, d.path);
    assert_eq!((s1.disk.as_str(), s1.size), ("vol-s", 16 * MIB));
    let active = pool.disk("vol-s").await.unwrap().unwrap().path;
    assert_eq!(active, dir.path().join("layers/vol-s.1.qcow2"));
    assert_eq!(img_info(&active)["backing-filename"], p(&d.path));
    write_pattern(&active, 0xcd, "1M", "1M");
    assert!(matches!(
        pool.snapshot_offline("vol-s", "snap-1").await,
        Err(StorageError::Conflict(_))
    ));

    let s2 = pool.snapshot_offline("vol-s", "snap-2").await.unwrap();
    assert_eq!(s2.layer, active);
    assert_eq!(pool.snapshot("snap-2").await.unwrap(), Some(s2.clone()));
    // Written after snap-2: must not show in a disk made from it.
    let top = pool.disk("vol-s").await.unwrap().unwrap().path;
    write_pattern(&top, 0xef, "0", "1M");

    pool.delete_disk("vol-s").await.unwrap();
    assert_eq!(layers(dir.path()), vec!["vol-s.0.qcow2", "vol-s.1.qcow2"]);

    let c = pool
        .create_disk(
            "vol-c",
            16 * MIB,
            &DiskBase::Snapshot("snap-2".into()),
            noop(),
        )
        .await
        .unwrap();
    assert_eq!(img_info(&c.path)["backing-filename"], p(&s2.layer));
    assert!(reads_pattern(&c.path, "qcow2", 0xab, "0", "1M"));
    assert!(reads_pattern(&c.path, "qcow2", 0xcd, "1M", "1M"));
    assert!(matches!(
        pool.create_disk(
            "vol-x",
            8 * MIB,
            &DiskBase::Snapshot("snap-2".into()),
            noop()
        )
        .await,
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.create_disk(
            "vol-x",
            16 * MIB,
            &DiskBase::Snapshot("snap-9".into()),
            noop()
        )
        .await,
        Err(StorageError::NotFound(_))
    ));
    pool.delete_disk("vol-c").await.unwrap();

    // snap-1's layer backs snap-2's: it survives until snap-2 goes.
    pool.delete_snapshot("snap-1").await.unwrap();
    assert_eq!(pool.snapshot("snap-1").await.unwrap(), None);
    assert_eq!(layers(dir.path()), vec!["vol-s.0.qcow2", "vol-s.1.qcow2"]);
    pool.delete_snapshot("snap-1").await.unwrap(); // idempotent
    pool.delete_snapshot("snap-2").await.unwrap();
    assert!(layers(dir.path()).is_empty(), "{:?}", layers(dir.path()));
    assert!(files(&dir.path().join("snapshots")).is_empty());
}

#[tokio::test]
async fn live_snapshot_plan_commit_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let d = pool
        .create_disk("i-live", 8 * MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();

    let plan = pool.plan_snapshot("i-live", "snap-a").await.unwrap();
    assert_eq!(plan.frozen, d.path);
    assert_eq!(plan.overlay, dir.path().join("layers/i-live.1.qcow2"));
    // Committing before QEMU made the overlay is refused and changes nothing.
    assert!(matches!(
        pool.commit_snapshot(&plan).await,
        Err(StorageError::InvalidArgument(_))
    ));
    // What QEMU's blockdev-snapshot-sync does; the planned overlay is live for the GC.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&plan.frozen),
            "-F",
            "qcow2",
            p(&plan.overlay),
            "8M",
        ],
    );
    assert_eq!(pool.gc().await.unwrap(), Vec::<PathBuf>::new());
    assert!(plan.overlay.exists());

    let s = pool.commit_snapshot(&plan).await.unwrap();
    assert_eq!(s.layer, d.path);
    assert_eq!(
        pool.disk("i-live").await.unwrap().unwrap().path,
        plan.overlay
    );
    assert_eq!(
        pool.commit_snapshot(&plan).await.unwrap(),
        s,
        "commit is idempotent"
    );
    assert!(matches!(
        pool.abort_snapshot(&plan).await,
        Err(StorageError::Conflict(_))
    ));

    // A failed live snapshot: the overlay goes, the next plan gets a new layer name.
    let plan2 = pool.plan_snapshot("i-live", "snap-b").await.unwrap();
    assert_eq!(plan2.frozen, plan.overlay);
    assert!(matches!(
        pool.plan_snapshot("i-live", "snap-b").await,
        Err(StorageError::Conflict(_))
    ));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&plan2.frozen),
            "-F",
            "qcow2",
            p(&plan2.overlay),
            "8M",
        ],
    );
    pool.abort_snapshot(&plan2).await.unwrap();
    assert!(!plan2.overlay.exists());
    pool.abort_snapshot(&plan2).await.unwrap(); // idempotent
    assert_eq!(pool.snapshot("snap-b").await.unwrap(), None);
    let plan3 = pool.plan_snapshot("i-live", "snap-b").await.unwrap();
    assert_ne!(plan3.overlay, plan2.overlay, "layer names are never reused");

    // An overlay on the wrong backing file is refused.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&plan3.overlay), "8M"],
    );
    assert!(matches!(
        pool.commit_snapshot(&plan3).await,
        Err(StorageError::InvalidArgument(_))
    ));
    pool.abort_snapshot(&plan3).await.unwrap();
    assert_eq!(layers(dir.path()), vec!["i-live.0.qcow2", "i-live.1.qcow2"]);
}

/// Holds an image open for writing like a running QEMU would (qemu-io waits on stdin).
pub(super) struct Holder(std::process::Child);

impl Holder {
    fn spawn(path: &Path) -> std::process::Child {
        Command::new("qemu-io")
            .args(["-f", "qcow2", p(path)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    pub(super) fn new(path: &Path) -> Holder {
        // Wrapped at once, so that a failure below still kills and reaps it.
        let mut holder = Holder(Self::spawn(path));
        // Wait until the image is locked for good. A probe that runs while qemu-io opens the
        // image can make qemu-io's own open fail (it then exits): start it again.
        let mut refused = 0;
        for _ in 0..200 {
            if let Ok(Some(_)) = holder.0.try_wait() {
                holder.0 = Self::spawn(path);
                refused = 0;
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            let st = Command::new("qemu-img")
                .args(["info", p(path)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            refused = if st.success() { 0 } else { refused + 1 };
            if refused >= 3 {
                return holder;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("qemu-io never locked {}", path.display());
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn grow_disk_offline_only() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let d = pool
        .create_disk("vol-g", 10 * MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();
    let g = pool.grow_disk("vol-g", 20 * MIB).await.unwrap();
    assert_eq!((g.size, vsize(&g.path)), (20 * MIB, 20 * MIB));
    assert!(matches!(
        pool.grow_disk("vol-g", 10 * MIB).await,
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.grow_disk("vol-none", 10 * MIB).await,
        Err(StorageError::NotFound(_))
    ));
    {
        let _vm = Holder::new(&d.path);
        match pool.grow_disk("vol-g", 30 * MIB).await {
            Err(StorageError::Busy(m)) => assert!(m.contains("in use"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pool.snapshot_offline("vol-g", "snap-busy").await,
            Err(StorageError::Busy(_))
        ));
        // What the agent does after QEMU's block_resize.
        pool.record_size("vol-g", 40 * MIB).await.unwrap();
        assert!(matches!(
            pool.record_size("vol-g", 30 * MIB).await,
            Err(StorageError::InvalidArgument(_))
        ));
    }
    assert_eq!(pool.disk("vol-g").await.unwrap().unwrap().size, 40 * MIB);
    assert_eq!(layers(dir.path()), vec!["vol-g.0.qcow2"]);
    assert_eq!(pool.snapshot("snap-busy").await.unwrap(), None);
}

#[tokio::test]
async fn gc_spares_fresh_temp_files_and_refuses_bad_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    pool.create_disk("vol-k", MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();
    let tmp = dir.path().join("layers/.flatten.0123.kumo-tmp");
    std::fs::write(&tmp, b"a copy in progress").unwrap();
    let stray = dir.path().join("layers/README");
    std::fs::write(&stray, b"not a layer").unwrap();
    assert_eq!(pool.gc().await.unwrap(), Vec::<PathBuf>::new());
    assert!(tmp.exists() && stray.exists());
    // Left by agents that crashed two days ago: collected.
    let old_layer = dir.path().join("layers/.copy.4567.kumo-tmp");
    let old_json = dir.path().join("disks/.vol-k.json.89ab.kumo-tmp");
    for f in [&old_layer, &old_json] {
        std::fs::write(f, b"half").unwrap();
        run("touch", &["-d", "2 days ago", p(f)]);
    }
    assert_eq!(pool.gc().await.unwrap(), vec![old_json, old_layer]);
    assert!(tmp.exists() && pool.disk("vol-k").await.unwrap().is_some());

    // An unreadable manifest could hide live layers: collect nothing.
    let orphan = dir.path().join("layers/vol-z.0.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&orphan), "1M"],
    );
    std::fs::write(dir.path().join("disks/vol-bad.json"), b"{not json").unwrap();
    assert!(matches!(pool.gc().await, Err(StorageError::Parse(_))));
    assert!(orphan.exists());
    std::fs::remove_file(dir.path().join("disks/vol-bad.json")).unwrap();
    assert_eq!(pool.gc().await.unwrap(), vec![orphan]);
}
