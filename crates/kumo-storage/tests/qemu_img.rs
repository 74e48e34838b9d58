//! Integration tests against the real `qemu-img` (qemu-utils must be installed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kumo_storage::{
    create_blank, create_overlay, import_file, import_stream, inspect, sha256_file, ImageKind,
    Progress, StorageError,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn noop() -> Progress {
    Arc::new(|_| {})
}

fn recorder() -> (Progress, Arc<Mutex<Vec<f64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (Arc::new(move |f| s.lock().unwrap().push(f)), seen)
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(args: &[&str]) {
    run("qemu-img", args);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A qcow2 of `size` with a few MiB of patterned data written by qemu-io.
fn make_qcow2(path: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", p(path), size]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 4M",
            "-c",
            "write -P 0xcd 20M 2M",
            p(path),
        ],
    );
}

/// A raw disk with an MBR signature and some data.
fn make_mbr_raw(path: &Path, size: usize) {
    let mut data = vec![0u8; size];
    data[510] = 0x55;
    data[511] = 0xaa;
    let end = data.len().min(2 * MIB as usize);
    for (i, b) in data[end / 2..end].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(path, data).unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_only(dir: &Path, expected: &[&str]) {
    let mut e: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    e.sort();
    assert_eq!(names(dir), e, "unexpected files in {}", dir.display());
}

fn same_content(a: &Path, b: &Path) {
    qemu_img(&["compare", "-q", p(a), p(b)]);
}

async fn import_ok(src: &Path, dest: &Path, format: Option<&str>) -> kumo_storage::ImageInfo {
    let info = import_file(src, dest, ImageKind::Disk, format, noop())
        .await
        .unwrap_or_else(|e| panic!("import of {} failed: {e}", src.display()));
    let stored = inspect(dest).await.unwrap();
    assert_eq!(stored.format, "qcow2");
    assert_eq!(stored.backing_file(), None);
    assert_eq!(info.virtual_size, stored.virtual_size);
    assert_eq!(info.file_size, std::fs::metadata(dest).unwrap().len());
    assert_eq!(info.sha256, sha256_file(dest).await.unwrap());
    assert_eq!(info.kind, ImageKind::Disk);
    same_content(src, dest);
    info
}

#[tokio::test]
async fn imports_qcow2() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.qcow2");
    make_qcow2(&src, "64M");
    let dest = d.path().join("img.qcow2");
    let info = import_ok(&src, &dest, None).await;
    assert_eq!(info.source_format, "qcow2");
    assert_eq!(info.virtual_size, 64 * MIB);
    assert_only(d.path(), &["src.qcow2", "img.qcow2"]);
    // Explicit format works too; and an existing destination is never overwritten.
    let err = import_file(&src, &dest, ImageKind::Disk, Some("qcow2"), noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err}");
    assert_eq!(info.sha256, sha256_file(&dest).await.unwrap());
    let dest2 = d.path().join("img2.qcow2");
    import_ok(&src, &dest2, Some("QCOW2")).await;
}

#[tokio::test]
async fn imports_raw_with_mbr() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("disk.img");
    make_mbr_raw(&src, 8 * MIB as usize);
    let dest = d.path().join("img.qcow2");
    let info = import_ok(&src, &dest, None).await;
    assert_eq!(info.source_format, "raw");
    assert_eq!(info.virtual_size, 8 * MIB);
    // Sparse: the 6 MiB of zeros are not stored.
    assert!(info.file_size < 4 * MIB, "file_size {}", info.file_size);
    assert_only(d.path(), &["disk.img", "img.qcow2"]);
}

#[tokio::test]
async fn imports_raw_ext4_filesystem() {
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "mkfs.ext4 (e2fsprogs) is missing"
        );
        eprintln!("mkfs.ext4 not installed; skipping");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("fs.img");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    run("mkfs.ext4", &["-q", "-F", p(&src)]);
    let info = import_ok(&src, &d.path().join("img.qcow2"), None).await;
    assert_eq!(info.source_format, "raw");
}

#[tokio::test]
async fn imports_vmdk_vdi_vhdx_vpc() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    make_qcow2(&base, "64M");
    for (fmt, opts, expect) in [
        ("vmdk", None, "vmdk"),
        ("vmdk", Some("subformat=streamOptimized"), "vmdk"),
        ("vdi", None, "vdi"),
        ("vhdx", None, "vhdx"),
        ("vpc", None, "vpc"),
    ] {
        let src = d.path().join(format!("src-{fmt}-{}", opts.is_some()));
        let mut args = vec!["convert", "-O", fmt];
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        args.extend([p(&base), p(&src)]);
        qemu_img(&args);
        let dest = d.path().join(format!("img-{fmt}-{}", opts.is_some()));
        let info = import_ok(&src, &dest, None).await;
        assert_eq!(info.source_format, expect);
        assert!(info.virtual_size >= 64 * MIB);
    }
    // "vhd" is an alias for qemu's "vpc".
    let dest = d.path().join("img-vhd");
    let info = import_ok(&d.path().join("src-vpc-false"), &dest, Some("vhd")).await;
    assert_eq!(info.source_format, "vpc");
    assert!(names(d.path()).iter().all(|n| !n.contains("kumo-tmp")));
}

#[tokio::test]
async fn rejects_text_file_as_not_a_disk() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("notes.txt");
    std::fs::write(&src, "hello, this is not a disk image\n".repeat(64)).unwrap(); // 2048 bytes
    let dest = d.path().join("img.qcow2");
    let err = import_file(&src, &dest, ImageKind::Disk, None, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NotADiskImage(_)), "{err}");
    assert!(err.to_string().contains("\"raw\""), "{err}");
    assert!(err.is_client_error());
    assert_only(d.path(), &["notes.txt"]);

    // Forcing raw skips the signature check...
    let info = import_file(&src, &dest, ImageKind::Disk, Some("raw"), noop())
        .await
        .unwrap();
    assert_eq!(info.source_format, "raw");
    assert_eq!(info.virtual_size, 2048);
    std::fs::remove_file(&dest).unwrap();

    // ...but not the multiple-of-512 rule.
    std::fs::write(&src, "odd size\n").unwrap();
    for fmt in [None, Some("raw")] {
        let err = import_file(&src, &dest, ImageKind::Disk, fmt, noop())
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::NotADiskImage(_)), "{err}");
        assert!(err.to_string().contains("512"), "{err}");
    }
    assert_only(d.path(), &["notes.txt"]);
}

#[tokio::test]
async fn rejects_truncated_images() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    make_qcow2(&base, "64M");
    let mut keep = vec!["base.qcow2".to_string()];
    for fmt in ["qcow2", "vmdk", "vdi", "vhdx", "vpc"] {
        let full = d.path().join(format!("full.{fmt}"));
        qemu_img(&["convert", "-O", fmt, p(&base), p(&full)]);
        let data = std::fs::read(&full).unwrap();
        for cut in [data.len() / 2, data.len() - 4096, 300 * 1024] {
            if cut >= data.len() {
                continue;
            }
            let name = format!("cut-{cut}.{fmt}");
            let src = d.path().join(&name);
            std::fs::write(&src, &data[..cut]).unwrap();
            let dest = d.path().join("img.qcow2");
            let res = import_file(&src, &dest, ImageKind::Disk, None, noop()).await;
            let err = match res {
                Err(e) => e,
                Ok(i) => panic!(
                    "{name} ({} of {} bytes) was accepted: {i:?}",
                    cut,
                    data.len()
                ),
            };
            assert!(
                matches!(
                    err,
                    StorageError::Corrupt(_) | StorageError::NotADiskImage(_)
                ),
                "{name}: {err}"
            );
            eprintln!("{name}: {err}");
            assert!(err.is_client_error());
            assert!(!dest.exists());
            keep.push(name);
        }
        keep.push(format!("full.{fmt}"));
    }
    let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
    assert_only(d.path(), &keep);
}

#[tokio::test]
async fn truncated_qcow2_error_is_clear() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.qcow2");
    make_qcow2(&src, "64M");
    let data = std::fs::read(&src).unwrap();
    std::fs::write(&src, &data[..data.len() / 2]).unwrap();
    let err = import_file(&src, &d.path().join("x"), ImageKind::Disk, None, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
    assert_only(d.path(), &["src.qcow2"]);
}

#[tokio::test]
async fn rejects_garbage_with_qcow2_magic() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("evil.qcow2");
    let mut data = b"QFI\xfb".to_vec();
    data.extend((0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    std::fs::write(&src, &data).unwrap();
    let err = import_file(&src, &d.path().join("img"), ImageKind::Disk, None, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
    assert_only(d.path(), &["evil.qcow2"]);
    // Same with the format given explicitly.
    let err = import_file(
        &src,
        &d.path().join("img"),
        ImageKind::Disk,
        Some("qcow2"),
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
    assert_only(d.path(), &["evil.qcow2"]);
}

#[tokio::test]
async fn rejects_backing_files_and_unknown_formats() {
    let d = tempfile::tempdir().unwrap();
    let secret = d.path().join("secret.raw");
    make_mbr_raw(&secret, MIB as usize);
    let src = d.path().join("sneaky.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&secret),
        "-F",
        "raw",
        p(&src),
    ]);
    let err = import_file(&src, &d.path().join("img"), ImageKind::Disk, None, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unsafe(_)), "{err}");

    // A qcow2 whose data lives in an external (host) file.
    let ext = d.path().join("ext.qcow2");
    let ext_data = d.path().join("ext.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p(&ext_data)),
        p(&ext),
        "16M",
    ]);
    let err = import_file(&ext, &d.path().join("img"), ImageKind::Disk, None, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unsafe(_)), "{err}");

    // A VMDK descriptor that points at another file (here: any host file).
    let flat = d.path().join("flat.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        p(&flat),
        "16M",
    ]);
    let err = import_file(&flat, &d.path().join("img"), ImageKind::Disk, None, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unsafe(_)), "{err}");
    eprintln!("{err}");

    let qed = d.path().join("x.qed");
    qemu_img(&["create", "-q", "-f", "qed", p(&qed), "16M"]);
    let err = import_file(&qed, &d.path().join("img"), ImageKind::Disk, None, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UnsupportedFormat(_)), "{err}");
    let err = import_file(
        &qed,
        &d.path().join("img"),
        ImageKind::Disk,
        Some("qed"),
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::UnsupportedFormat(_)), "{err}");
    assert_only(
        d.path(),
        &[
            "ext.data",
            "ext.qcow2",
            "flat-flat.vmdk",
            "flat.vmdk",
            "secret.raw",
            "sneaky.qcow2",
            "x.qed",
        ],
    );
}

#[tokio::test]
async fn rejects_empty_missing_and_bad_destinations() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    for kind in [ImageKind::Disk, ImageKind::Kernel, ImageKind::Ramdisk] {
        let err = import_file(&empty, &d.path().join("img"), kind, None, noop())
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Empty(_)), "{kind:?}: {err}");
    }
    let err = import_file(
        &d.path().join("missing"),
        &d.path().join("img"),
        ImageKind::Disk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err}");
    let src = d.path().join("disk.img");
    make_mbr_raw(&src, MIB as usize);
    let err = import_file(
        &src,
        &d.path().join("no-such-dir/img"),
        ImageKind::Disk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err}");
    assert_only(d.path(), &["disk.img", "empty"]);
}

fn chunks(data: &[u8], size: usize) -> Vec<Result<Bytes, std::io::Error>> {
    data.chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

#[tokio::test]
async fn stream_import_and_truncation() {
    let d = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let src = d.path().join("src.qcow2");
    make_qcow2(&src, "64M");
    let data = std::fs::read(&src).unwrap();
    let store = tempfile::tempdir().unwrap();

    // Ends early.
    let mut short = chunks(&data, 64 * 1024);
    short.truncate(short.len() / 2);
    let err = import_stream(
        futures::stream::iter(short),
        Some(data.len() as u64),
        spool.path(),
        &store.path().join("img"),
        ImageKind::Disk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::Truncated(_)), "{err}");
    assert_only(spool.path(), &[]);
    assert_only(store.path(), &[]);

    // Errors midway.
    let mut broken = chunks(&data, 64 * 1024);
    broken.truncate(10);
    broken.push(Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "client went away",
    )));
    let err = import_stream(
        futures::stream::iter(broken),
        None,
        spool.path(),
        &store.path().join("img"),
        ImageKind::Disk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::Truncated(_)), "{err}");
    assert_only(spool.path(), &[]);
    assert_only(store.path(), &[]);

    // Longer than announced.
    let err = import_stream(
        futures::stream::iter(chunks(&data, 64 * 1024)),
        Some(1000),
        spool.path(),
        &store.path().join("img"),
        ImageKind::Disk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(err.is_client_error(), "{err}");
    assert_only(spool.path(), &[]);
    assert_only(store.path(), &[]);

    // A stream of a truncated image with unknown length: rejected by validation.
    let err = import_stream(
        futures::stream::iter(chunks(&data[..data.len() / 2], 64 * 1024)),
        None,
        spool.path(),
        &store.path().join("img"),
        ImageKind::Disk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
    assert_only(spool.path(), &[]);
    assert_only(store.path(), &[]);

    // Complete, with progress.
    let (progress, seen) = recorder();
    let dest = store.path().join("img");
    let info = import_stream(
        futures::stream::iter(chunks(&data, 64 * 1024)),
        Some(data.len() as u64),
        spool.path(),
        &dest,
        ImageKind::Disk,
        None,
        progress,
    )
    .await
    .unwrap();
    assert_eq!(info.source_format, "qcow2");
    assert_eq!(info.sha256, sha256_file(&dest).await.unwrap());
    same_content(&src, &dest);
    assert_only(spool.path(), &[]);
    assert_only(store.path(), &["img"]);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.last(), Some(&1.0));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen.iter().any(|f| *f > 0.0 && *f < 0.5), "{seen:?}");
    assert!(seen.iter().any(|f| *f > 0.5 && *f < 1.0), "{seen:?}");
}

#[tokio::test]
async fn progress_is_reported_and_ends_at_one() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("disk.img");
    // 64 MiB of non-zero data so that qemu-img reports intermediate progress.
    let data: Vec<u8> = (0..64 * MIB as usize)
        .map(|i| (i % 253) as u8 | 1)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let (progress, seen) = recorder();
    let info = import_file(
        &src,
        &d.path().join("img"),
        ImageKind::Disk,
        Some("raw"),
        progress,
    )
    .await
    .unwrap();
    assert_eq!(info.virtual_size, 64 * MIB);
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 4, "{seen:?}");
    assert_eq!(seen.first(), Some(&0.0));
    assert_eq!(seen.last(), Some(&1.0));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen.iter().all(|f| (0.0..=1.0).contains(f)));
    assert!(seen.iter().any(|f| *f > 0.0 && *f < 0.9), "{seen:?}");
}

#[tokio::test]
async fn overlays_are_o1_and_point_at_their_backing() {
    let d = tempfile::tempdir().unwrap();
    let big = d.path().join("big.qcow2");
    let small = d.path().join("small.qcow2");
    // 10 GiB sparse raw file with data at both ends, converted to qcow2; and a 1 GiB one.
    for (path, size) in [(&big, 10 * GIB), (&small, GIB)] {
        let raw = d.path().join("tmp.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 1M",
                "-c",
                &format!("write -P 0x22 {} 1M", size - MIB),
                p(&raw),
            ],
        );
        qemu_img(&["convert", "-O", "qcow2", p(&raw), p(path)]);
        std::fs::remove_file(&raw).unwrap();
    }
    let mut times = Vec::new();
    for (backing, size) in [(&big, 10 * GIB), (&small, GIB)] {
        let dest = d.path().join(format!(
            "vm-{}",
            backing.file_name().unwrap().to_string_lossy()
        ));
        let t = Instant::now();
        create_overlay(backing, &dest, None).await.unwrap();
        times.push(t.elapsed());
        let info = inspect(&dest).await.unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, size);
        assert_eq!(info.backing_filename.as_deref(), Some(p(backing)));
        assert_eq!(info.backing_filename_format.as_deref(), Some("qcow2"));
        assert!(std::fs::metadata(&dest).unwrap().len() < MIB);
        same_content(backing, &dest);
    }
    eprintln!("overlay creation times (10 GiB, 1 GiB backing): {times:?}");
    for t in &times {
        assert!(*t < Duration::from_secs(1), "overlay took {t:?}");
    }

    // Larger, from a relative backing path (stored absolute).
    let grown = d.path().join("grown.qcow2");
    let cwd = std::env::current_dir().unwrap();
    let rel = pathdiff(&small, &cwd);
    create_overlay(&rel, &grown, Some(2 * GIB)).await.unwrap();
    let info = inspect(&grown).await.unwrap();
    assert_eq!(info.virtual_size, 2 * GIB);
    assert_eq!(info.backing_filename.as_deref(), Some(p(&small)));

    // Errors: smaller than the backing, existing destination, raw backing, size 0, missing backing.
    let err = create_overlay(&big, &d.path().join("x"), Some(GIB))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidArgument(_)), "{err}");
    let err = create_overlay(&small, &grown, None).await.unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err}");
    assert_eq!(inspect(&grown).await.unwrap().virtual_size, 2 * GIB);
    let raw = d.path().join("r.raw");
    make_mbr_raw(&raw, MIB as usize);
    let err = create_overlay(&raw, &d.path().join("x"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidArgument(_)), "{err}");
    let err = create_overlay(&small, &d.path().join("x"), Some(0))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Empty(_)), "{err}");
    let err = create_overlay(&d.path().join("nope"), &d.path().join("x"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err}");
    assert_only(
        d.path(),
        &[
            "big.qcow2",
            "small.qcow2",
            "vm-big.qcow2",
            "vm-small.qcow2",
            "grown.qcow2",
            "r.raw",
        ],
    );
}

/// `path` relative to `base` (both absolute), with `..` as needed.
fn pathdiff(path: &Path, base: &Path) -> PathBuf {
    let p: Vec<_> = path.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}

#[tokio::test]
async fn blank_disks() {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("blank.qcow2");
    let err = create_blank(&dest, 0).await.unwrap_err();
    assert!(matches!(err, StorageError::Empty(_)), "{err}");
    create_blank(&dest, 20 * GIB).await.unwrap();
    let info = inspect(&dest).await.unwrap();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 20 * GIB);
    assert!(std::fs::metadata(&dest).unwrap().len() < MIB);
    let err = create_blank(&dest, GIB).await.unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err}");
    let err = create_blank(&d.path().join("missing/x"), GIB)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err}");
    assert_only(d.path(), &["blank.qcow2"]);
}

#[tokio::test]
async fn kernels_and_ramdisks() {
    let d = tempfile::tempdir().unwrap();
    let mut bz = vec![0u8; 8192];
    bz[0x1fe] = 0x55;
    bz[0x1ff] = 0xaa;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let bz_path = d.path().join("bzImage");
    std::fs::write(&bz_path, &bz).unwrap();
    let elf_path = d.path().join("vmlinux");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(4096, 0);
    std::fs::write(&elf_path, &elf).unwrap();
    let text = d.path().join("readme");
    std::fs::write(&text, "not a kernel\n".repeat(100)).unwrap();

    let (progress, seen) = recorder();
    let info = import_file(
        &bz_path,
        &d.path().join("aki-1"),
        ImageKind::Kernel,
        None,
        progress,
    )
    .await
    .unwrap();
    assert_eq!(info.kind, ImageKind::Kernel);
    assert_eq!(info.source_format, "kernel");
    assert_eq!(info.file_size, 8192);
    assert_eq!(info.virtual_size, 8192);
    assert_eq!(info.sha256, sha256_file(&bz_path).await.unwrap());
    assert_eq!(std::fs::read(d.path().join("aki-1")).unwrap(), bz);
    assert_eq!(seen.lock().unwrap().last(), Some(&1.0));
    import_file(
        &elf_path,
        &d.path().join("aki-2"),
        ImageKind::Kernel,
        Some("kernel"),
        noop(),
    )
    .await
    .unwrap();
    let err = import_file(
        &text,
        &d.path().join("aki-3"),
        ImageKind::Kernel,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::InvalidKernel(_)), "{err}");
    // A disk image is not a kernel either.
    let err = import_file(
        &bz_path,
        &d.path().join("aki-3"),
        ImageKind::Ramdisk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::InvalidRamdisk(_)), "{err}");

    let mut n = 0;
    for (name, head) in [
        ("gz", &b"\x1f\x8b\x08\x00"[..]),
        ("xz", b"\xfd7zXZ\x00\x00\x04"),
        ("zst", b"\x28\xb5\x2f\xfd\x00"),
        ("lz4", b"\x02\x21\x4c\x18"),
        ("cpio", b"07070100000001000081a4"),
    ] {
        let mut data = head.to_vec();
        data.resize(1000, 7);
        let src = d.path().join(format!("initrd.{name}"));
        std::fs::write(&src, &data).unwrap();
        n += 1;
        let dest = d.path().join(format!("ari-{n}"));
        let info = import_file(&src, &dest, ImageKind::Ramdisk, None, noop())
            .await
            .unwrap();
        assert_eq!(info.source_format, "initrd");
        assert_eq!(std::fs::read(&dest).unwrap(), data);
    }
    let err = import_file(
        &text,
        &d.path().join("ari-x"),
        ImageKind::Ramdisk,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::InvalidRamdisk(_)), "{err}");
    let err = import_file(
        &text,
        &d.path().join("ari-x"),
        ImageKind::Ramdisk,
        Some("qcow2"),
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::InvalidArgument(_)), "{err}");

    // Streamed kernel, and a streamed kernel that ends early.
    let spool = tempfile::tempdir().unwrap();
    let info = import_stream(
        futures::stream::iter(chunks(&bz, 1000)),
        Some(bz.len() as u64),
        spool.path(),
        &d.path().join("aki-s"),
        ImageKind::Kernel,
        None,
        noop(),
    )
    .await
    .unwrap();
    assert_eq!(info.sha256, sha256_file(&bz_path).await.unwrap());
    let err = import_stream(
        futures::stream::iter(chunks(&bz[..4000], 1000)),
        Some(bz.len() as u64),
        spool.path(),
        &d.path().join("aki-t"),
        ImageKind::Kernel,
        None,
        noop(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StorageError::Truncated(_)), "{err}");
    assert_only(spool.path(), &[]);
    assert!(names(d.path()).iter().all(|n| !n.contains("kumo-tmp")));
    assert!(!d.path().join("aki-t").exists());
    assert!(!d.path().join("aki-3").exists());
    assert!(!d.path().join("ari-x").exists());
}

#[tokio::test]
async fn sha256_of_known_content() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("abc");
    std::fs::write(&f, b"abc").unwrap();
    assert_eq!(
        sha256_file(&f).await.unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(matches!(
        sha256_file(&d.path().join("nope")).await,
        Err(StorageError::NotFound(_))
    ));
}

#[tokio::test]
async fn inspect_reports_missing_and_garbage() {
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(
        inspect(&d.path().join("nope")).await,
        Err(StorageError::NotFound(_))
    ));
    let f = d.path().join("g");
    std::fs::write(&f, b"QFI\xfb\x00\x00\x00\x09garbage").unwrap();
    let err = inspect(&f).await.unwrap_err();
    assert!(!err.is_client_error(), "{err}");
}

#[tokio::test]
async fn cancelled_import_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("disk.img");
    let data: Vec<u8> = (0..256 * MIB as usize)
        .map(|i| (i % 251) as u8 | 1)
        .collect();
    std::fs::write(&src, &data).unwrap();
    drop(data);
    let (progress, seen) = recorder();
    let dest = d.path().join("img");
    let started = {
        let seen = seen.clone();
        move || seen.lock().unwrap().iter().any(|f| *f > 0.0)
    };
    let mut fut = Box::pin(import_file(
        &src,
        &dest,
        ImageKind::Disk,
        Some("raw"),
        progress,
    ));
    // Poll until the conversion is under way, then drop the future (client went away).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::select! {
            r = &mut fut => panic!("import finished before it could be cancelled: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        if started() || Instant::now() > deadline {
            break;
        }
    }
    assert!(started(), "conversion never started");
    drop(fut);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_only(d.path(), &["disk.img"]);
}
