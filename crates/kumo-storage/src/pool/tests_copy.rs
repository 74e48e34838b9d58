//! dir-pool tests of full copies: copy_disk (shrink/grow), data_end, ENOSPC, export, restore.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use super::tests::{
    dir_pool, files, img_info, layers, make_image, noop, p, reads_pattern, run, vsize,
    write_pattern, Holder, MIB,
};
use super::*;

fn recorder() -> (Progress, Arc<Mutex<Vec<f64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (Arc::new(move |f| s.lock().unwrap().push(f)), seen)
}

fn assert_progress(seen: &[f64]) {
    assert_eq!(seen.first(), Some(&0.0), "{seen:?}");
    assert_eq!(seen.last(), Some(&1.0), "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "not increasing: {seen:?}"
    );
}

fn identical(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", p(a), p(b)])
        .output()
        .unwrap();
    out.status.success()
}

#[tokio::test]
async fn data_end_reads_only_what_may_be_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&base), "64M"],
    );
    assert_eq!(data_end(&base, "qcow2").await.unwrap(), 0);
    // Explicit zeros are allocated data that qemu-img cannot prove zero: scanned, not counted.
    write_pattern(&base, 0, "10M", "1M");
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -z 40M 1M", p(&base)],
    );
    assert_eq!(data_end(&base, "qcow2").await.unwrap(), 0);
    write_pattern(&base, 0x5a, "20M", "4096");
    assert_eq!(data_end(&base, "qcow2").await.unwrap(), 20 * MIB + 4096);

    // Data in the backing file counts through the overlay.
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
            "64M",
        ],
    );
    write_pattern(&top, 0x77, "0", "64k");
    assert_eq!(data_end(&top, "qcow2").await.unwrap(), 20 * MIB + 4096);

    // Raw: a single non-zero byte in the middle.
    let raw = dir.path().join("r.raw");
    let mut bytes = vec![0u8; 3 * MIB as usize];
    bytes[MIB as usize + 17] = 1;
    std::fs::write(&raw, &bytes).unwrap();
    assert_eq!(data_end(&raw, "raw").await.unwrap(), MIB + 18);
    assert!(matches!(
        data_end(&dir.path().join("none"), "raw").await,
        Err(StorageError::NotFound(_))
    ));
}

#[tokio::test]
async fn copy_disk_shrinks_and_grows_by_copy() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let d = pool
        .create_disk("vol-big", 100 * MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();
    write_pattern(&d.path, 0xab, "50M", "1M");

    match pool
        .copy_disk(&Source::Disk("vol-big".into()), "vol-40", 40 * MIB, noop())
        .await
    {
        Err(StorageError::DataBeyondSize { data_end, size }) => {
            assert_eq!((data_end, size), (51 * MIB, 40 * MIB))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(layers(dir.path()), vec!["vol-big.0.qcow2"]);
    assert_eq!(files(&dir.path().join("disks")), vec!["vol-big.json"]);

    let (progress, seen) = recorder();
    let c = pool
        .copy_disk(
            &Source::Disk("vol-big".into()),
            "vol-60",
            60 * MIB,
            progress,
        )
        .await
        .unwrap();
    assert_progress(&seen.lock().unwrap());
    assert_eq!((c.size, vsize(&c.path)), (60 * MIB, 60 * MIB));
    assert!(
        img_info(&c.path).get("backing-filename").is_none(),
        "a full copy"
    );
    assert!(reads_pattern(&c.path, "qcow2", 0xab, "50M", "1M"));
    assert!(reads_pattern(&c.path, "qcow2", 0, "0", "50M"));
    assert!(matches!(
        pool.copy_disk(&Source::Disk("vol-big".into()), "vol-60", 60 * MIB, noop())
            .await,
        Err(StorageError::Conflict(_))
    ));

    // A volume from a snapshot, bigger than its disk.
    pool.snapshot_offline("vol-60", "snap-60").await.unwrap();
    let top = pool.disk("vol-60").await.unwrap().unwrap().path;
    write_pattern(&top, 0xcd, "50M", "1M"); // after the snapshot: not copied
    let g = pool
        .copy_disk(
            &Source::Snapshot("snap-60".into()),
            "vol-120",
            120 * MIB,
            noop(),
        )
        .await
        .unwrap();
    assert_eq!(vsize(&g.path), 120 * MIB);
    assert!(reads_pattern(&g.path, "qcow2", 0xab, "50M", "1M"));
    assert!(matches!(
        pool.copy_disk(
            &Source::Snapshot("snap-0".into()),
            "vol-x",
            120 * MIB,
            noop()
        )
        .await,
        Err(StorageError::NotFound(_))
    ));
    assert!(!dir.path().join("disks/vol-x.json").exists());
}

/// Unmounts and removes a tmpfs mount point, even when the test fails.
struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    fn new(dir: &Path, size: &str) -> TmpfsMount {
        std::fs::create_dir(dir).unwrap();
        let guard = TmpfsMount(dir.to_path_buf());
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                p(dir),
            ],
        );
        guard
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test]
async fn flatten_into_a_full_pool_is_nospace_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // 100 MiB of random data: nothing compresses or turns into holes.
    let src = dir.path().join("random.raw");
    let mut data = vec![0u8; 100 * MIB as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&src, &data).unwrap();
    drop(data);

    let mnt = TmpfsMount::new(&dir.path().join("mnt"), "40m");
    let pool = dir_pool(&mnt.0);
    let base = DiskBase::Flatten {
        path: src.clone(),
        format: "raw".into(),
    };
    match pool.create_disk("vol-full", 100 * MIB, &base, noop()).await {
        Err(StorageError::NoSpace(m)) => assert!(m.contains("No space left"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(layers(&mnt.0).is_empty(), "{:?}", layers(&mnt.0));
    assert!(files(&mnt.0.join("disks")).is_empty());
    assert_eq!(pool.disk("vol-full").await.unwrap(), None);
    assert!(StorageError::NoSpace(String::new()).is_client_error());
}

#[tokio::test]
async fn export_writes_the_whole_chain() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let img = make_image(&pool, "img-e", "24M");
    let base = DiskBase::Image {
        path: img,
        format: "qcow2".into(),
    };
    let d = pool
        .create_disk("i-e", 32 * MIB, &base, noop())
        .await
        .unwrap();
    write_pattern(&d.path, 0x42, "8M", "2M");
    let out = tempfile::tempdir().unwrap();

    for fmt in ["raw", "vmdk", "vdi", "qcow2"] {
        let dest = out.path().join(format!("e.{fmt}"));
        let (progress, seen) = recorder();
        let n = pool
            .export(&Source::Disk("i-e".into()), &dest, fmt, progress)
            .await
            .unwrap();
        assert_progress(&seen.lock().unwrap());
        assert_eq!(n, std::fs::metadata(&dest).unwrap().len());
        assert_eq!(img_info(&dest)["format"], fmt);
        assert!(img_info(&dest).get("backing-filename").is_none());
        assert!(identical(&d.path, &dest), "{fmt} differs");
    }
    // Sparse raw: far fewer blocks than bytes.
    let raw = out.path().join("e.raw");
    let meta = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&raw).unwrap()) * 512;
    assert!(
        meta < 16 * MIB,
        "raw export is not sparse: {meta} bytes allocated"
    );

    assert!(matches!(
        pool.export(&Source::Disk("i-e".into()), &raw, "raw", noop())
            .await,
        Err(StorageError::AlreadyExists(_))
    ));
    assert!(matches!(
        pool.export(
            &Source::Disk("i-e".into()),
            &out.path().join("e.qed"),
            "qed",
            noop()
        )
        .await,
        Err(StorageError::UnsupportedFormat(_))
    ));
    assert!(!out.path().join("e.qed").exists());

    pool.snapshot_offline("i-e", "snap-e").await.unwrap();
    let snap_dest = out.path().join("snap.raw");
    pool.export(
        &Source::Snapshot("snap-e".into()),
        &snap_dest,
        "raw",
        noop(),
    )
    .await
    .unwrap();
    assert!(identical(&d.path, &snap_dest));
    assert_eq!(
        files(out.path()),
        vec!["e.qcow2", "e.raw", "e.vdi", "e.vmdk", "snap.raw"],
        "no temp file left"
    );
}

#[tokio::test]
async fn replace_content_restores_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir_pool(dir.path());
    let d = pool
        .create_disk("vol-r", 16 * MIB, &DiskBase::Blank, noop())
        .await
        .unwrap();
    write_pattern(&d.path, 0xaa, "0", "1M");
    pool.snapshot_offline("vol-r", "snap-r").await.unwrap();
    let top = pool.disk("vol-r").await.unwrap().unwrap().path;
    write_pattern(&top, 0xbb, "0", "1M");

    // Restore from the snapshot: a new overlay on the frozen layer; the old active layer goes.
    let r = pool
        .replace_content("vol-r", &DiskBase::Snapshot("snap-r".into()), noop())
        .await
        .unwrap();
    assert_eq!(r.size, 16 * MIB);
    assert!(reads_pattern(&r.path, "qcow2", 0xaa, "0", "1M"));
    assert_eq!(layers(dir.path()), vec!["vol-r.0.qcow2", "vol-r.2.qcow2"]);

    // Restore from a backup file (flattened): 8 MiB content in a 16 MiB disk.
    let backup = dir.path().join("backup.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&backup), "8M"],
    );
    write_pattern(&backup, 0xcc, "4M", "1M");
    let flat = DiskBase::Flatten {
        path: backup.clone(),
        format: "qcow2".into(),
    };
    let (progress, seen) = recorder();
    let r2 = pool
        .replace_content("vol-r", &flat, progress)
        .await
        .unwrap();
    assert_progress(&seen.lock().unwrap());
    assert_eq!(vsize(&r2.path), 16 * MIB);
    assert!(img_info(&r2.path).get("backing-filename").is_none());
    assert!(reads_pattern(&r2.path, "qcow2", 0xcc, "4M", "1M"));
    assert!(reads_pattern(&r2.path, "qcow2", 0, "0", "1M"));
    // The snapshot still pins its layer; the replaced overlay is gone.
    assert_eq!(layers(dir.path()), vec!["vol-r.0.qcow2", "vol-r.3.qcow2"]);

    // Too big a source, or a running VM: refused, nothing changes.
    let huge = dir.path().join("huge.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&huge), "32M"],
    );
    let too_big = DiskBase::Flatten {
        path: huge,
        format: "qcow2".into(),
    };
    assert!(matches!(
        pool.replace_content("vol-r", &too_big, noop()).await,
        Err(StorageError::InvalidArgument(_))
    ));
    {
        let _vm = Holder::new(&r2.path);
        assert!(matches!(
            pool.replace_content("vol-r", &flat, noop()).await,
            Err(StorageError::Busy(_))
        ));
    }
    assert_eq!(pool.disk("vol-r").await.unwrap().unwrap(), r2);
    assert_eq!(layers(dir.path()), vec!["vol-r.0.qcow2", "vol-r.3.qcow2"]);
    assert!(matches!(
        pool.replace_content("vol-none", &flat, noop()).await,
        Err(StorageError::NotFound(_))
    ));
}
