//! Repository tests with real qemu-img/qemu-io (no VM): targets are filled by hand the way
//! QEMU's backup job would (an incremental holds only the changed clusters).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::*;

const MIB: u64 = 1 << 20;
// Small: sha256 is slow in unoptimised test builds.
const SIZE: u64 = 4 * MIB;
const DISK: &str = "vol-0123456789abcdef0";

fn run(cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io commands on a qcow2 file (its backing opens read-only by itself).
fn qemu_io(file: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(file));
    run("qemu-io", &args);
}

/// sha256 of `qemu-img convert -O raw` of the chain: the reference the repository must match.
fn raw_sha(top: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("flat.raw");
    run("qemu-img", &["convert", "-U", "-O", "raw", s(top), s(&raw)]);
    let mut h = Sha256::new();
    h.update(std::fs::read(&raw).unwrap());
    hex::encode(h.finalize())
}

fn backing(file: &Path) -> Option<String> {
    let out = run("qemu-img", &["info", "--output=json", "-U", s(file)]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v["backing-filename"].as_str().map(str::to_string)
}

/// Host offset of the first data cluster stored in `file` itself.
fn own_data_offset(file: &Path) -> u64 {
    let out = run("qemu-img", &["map", "--output=json", "-U", s(file)]);
    let map: serde_json::Value = serde_json::from_slice(&out).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .find(|e| e["depth"] == 0 && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .unwrap()
}

fn flip_byte(file: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

fn ids(list: &[BackupManifest]) -> Vec<&str> {
    list.iter().map(|m| m.id.as_str()).collect()
}

/// Full + two incrementals, each holding only what changed.
async fn three_backups(repo: &BackupRepo) -> Vec<BackupManifest> {
    let p1 = repo.prepare(DISK, "b1", SIZE, true).await.unwrap();
    assert!(p1.parent.is_none());
    assert_eq!(backing(&p1.target), None);
    qemu_io(
        &p1.target,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 2M 64k",
            "write -P 0x13 3M 1M",
        ],
    );
    let m1 = repo.finish(&p1, "kumo-b1").await.unwrap();

    let p2 = repo.prepare(DISK, "b2", SIZE, true).await.unwrap();
    assert_eq!(p2.parent.as_ref().map(|m| m.id.as_str()), Some("b1"));
    assert_eq!(backing(&p2.target).as_deref(), Some("b1.qcow2"));
    // Overlaps b1's data, and zeroes one of its clusters (must read as zero, not b1's 0x12).
    qemu_io(&p2.target, &["write -P 0x22 512k 1M", "write -z 2M 64k"]);
    let m2 = repo.finish(&p2, "kumo-b2").await.unwrap();

    let p3 = repo.prepare(DISK, "b3", SIZE, true).await.unwrap();
    assert_eq!(backing(&p3.target).as_deref(), Some("b2.qcow2"));
    qemu_io(&p3.target, &["write -P 0x33 1536k 64k"]);
    let m3 = repo.finish(&p3, "kumo-b3").await.unwrap();
    vec![m1, m2, m3]
}

#[tokio::test]
async fn chain_manifests_verify_delete() {
    let root = tempfile::tempdir().unwrap();
    let repo = BackupRepo::open(root.path()).unwrap();
    assert!(repo.backups(DISK).await.unwrap().is_empty());
    let ms = three_backups(&repo).await;
    let (m1, m2, m3) = (&ms[0], &ms[1], &ms[2]);

    assert_eq!(m1.kind, BackupKind::Full);
    assert_eq!(m1.parent, None);
    assert_eq!(
        (m2.kind, m2.parent.as_deref()),
        (BackupKind::Incremental, Some("b1"))
    );
    assert_eq!(
        (m3.kind, m3.parent.as_deref()),
        (BackupKind::Incremental, Some("b2"))
    );
    assert_eq!(m3.bitmap, "kumo-b3");
    assert_eq!(m3.virtual_size, SIZE);
    assert!(m1.created < m2.created && m2.created < m3.created);
    // b3 holds one cluster (plus metadata), b1 about 2 MiB.
    assert!(
        m3.file_bytes < m1.file_bytes,
        "{} {}",
        m3.file_bytes,
        m1.file_bytes
    );
    for m in &ms {
        let file = repo.chain_file(DISK, &m.id);
        assert_eq!(m.sha256, raw_sha(&file), "backup {}", m.id);
        repo.verify(DISK, &m.id).await.unwrap();
    }
    // Different content, different hashes.
    assert_ne!(m1.sha256, m2.sha256);
    assert_ne!(m2.sha256, m3.sha256);
    let listed = repo.backups(DISK).await.unwrap();
    assert_eq!(ids(&listed), ["b1", "b2", "b3"]);
    assert_eq!(&listed, &ms);
    let on_disk: BackupManifest =
        serde_json::from_slice(&std::fs::read(root.path().join(DISK).join("b2.json")).unwrap())
            .unwrap();
    assert_eq!(&on_disk, m2);

    // A flipped byte in one of b2's data clusters: b2 and b3 (which reads through it) fail.
    let b2 = repo.chain_file(DISK, "b2");
    let off = own_data_offset(&b2);
    flip_byte(&b2, off);
    for id in ["b2", "b3"] {
        let err = repo.verify(DISK, id).await.unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{id}: {err}");
    }
    repo.verify(DISK, "b1").await.unwrap();
    flip_byte(&b2, off);
    repo.verify(DISK, "b3").await.unwrap();

    // Delete the middle one: b3 now stands on b1 with the same content.
    repo.delete(DISK, "b2").await.unwrap();
    assert!(!b2.exists());
    assert!(!root.path().join(DISK).join("b2.json").exists());
    let listed = repo.backups(DISK).await.unwrap();
    assert_eq!(ids(&listed), ["b1", "b3"]);
    let b3 = &listed[1];
    assert_eq!(
        (b3.kind, b3.parent.as_deref()),
        (BackupKind::Incremental, Some("b1"))
    );
    let b3_file = repo.chain_file(DISK, "b3");
    assert_eq!(backing(&b3_file).as_deref(), Some("b1.qcow2"));
    assert_eq!(raw_sha(&b3_file), m3.sha256);
    repo.verify(DISK, "b3").await.unwrap();

    // Delete the full one: b3 becomes standalone, same content.
    repo.delete(DISK, "b1").await.unwrap();
    let listed = repo.backups(DISK).await.unwrap();
    assert_eq!(ids(&listed), ["b3"]);
    assert_eq!(
        (listed[0].kind, listed[0].parent.as_deref()),
        (BackupKind::Full, None)
    );
    assert_eq!(backing(&b3_file), None);
    assert_eq!(raw_sha(&b3_file), m3.sha256);
    assert!(listed[0].file_bytes > m3.file_bytes);
    repo.verify(DISK, "b3").await.unwrap();

    // The next backup builds on b3.
    let p4 = repo.prepare(DISK, "b4", SIZE, true).await.unwrap();
    assert_eq!(p4.parent.as_ref().map(|m| m.id.as_str()), Some("b3"));
    repo.abandon(&p4).await.unwrap();
    assert!(!p4.target.exists());
    // Deleting the newest (childless) backup just removes it.
    repo.delete(DISK, "b3").await.unwrap();
    assert!(repo.backups(DISK).await.unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(root.path().join(DISK))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [LOCK_FILE]);
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    assert!(matches!(
        BackupRepo::open(&root.path().join("missing")),
        Err(StorageError::NotFound(_))
    ));
    let repo = BackupRepo::open(root.path()).unwrap();
    for (disk, id) in [
        ("../x", "b1"),
        ("", "b1"),
        (".x", "b1"),
        (DISK, "a/b"),
        (DISK, ""),
    ] {
        let err = repo.prepare(disk, id, SIZE, true).await.unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidArgument(_)),
            "{disk:?} {id:?}: {err}"
        );
    }
    assert!(matches!(
        repo.prepare(DISK, "b1", 0, true).await,
        Err(StorageError::Empty(_))
    ));
    assert!(matches!(
        repo.delete(DISK, "nope").await,
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        repo.verify("vol-nope", "nope").await,
        Err(StorageError::NotFound(_))
    ));

    let p = repo.prepare(DISK, "b1", SIZE, true).await.unwrap();
    qemu_io(&p.target, &["write -P 0x11 0 64k"]);
    let m = repo.finish(&p, "kumo-b1").await.unwrap();
    // Finished: neither finish nor abandon again.
    assert!(repo.finish(&p, "kumo-b1").await.is_err());
    assert!(repo.abandon(&p).await.is_err());
    assert!(p.target.exists());
    // An existing id is refused and its files stay.
    assert!(matches!(
        repo.prepare(DISK, "b1", SIZE, true).await,
        Err(StorageError::AlreadyExists(_))
    ));
    assert!(matches!(
        repo.delete(DISK, "nope").await,
        Err(StorageError::NotFound(_))
    ));
    repo.verify(DISK, "b1").await.unwrap();
    assert_eq!(repo.backups(DISK).await.unwrap(), [m]);

    // A broken manifest stops everything rather than letting repair delete its file.
    let bad = root.path().join(DISK).join("b0.json");
    std::fs::write(&bad, b"{not json").unwrap();
    assert!(matches!(
        repo.prepare(DISK, "b2", SIZE, true).await,
        Err(StorageError::Corrupt(_))
    ));
    assert!(repo.chain_file(DISK, "b1").exists());
    std::fs::remove_file(&bad).unwrap();
}

#[tokio::test]
async fn repair_locking_and_fallbacks() {
    let root = tempfile::tempdir().unwrap();
    let repo = BackupRepo::open(root.path()).unwrap();
    let dir = root.path().join(DISK);
    assert!(repo.repair(DISK).await.unwrap().is_empty());

    let p1 = repo.prepare(DISK, "b1", SIZE, true).await.unwrap();
    // While a backup runs, nothing else may touch the disk's backups.
    for r in [
        repo.prepare(DISK, "b2", SIZE, true).await.map(|_| ()),
        repo.repair(DISK).await.map(|_| ()),
        repo.delete(DISK, "b1").await,
        repo.verify(DISK, "b1").await,
    ] {
        assert!(matches!(r, Err(StorageError::Busy(_))), "{r:?}");
    }
    // Another disk is independent.
    let other = repo.prepare("vol-other", "x1", SIZE, true).await.unwrap();
    repo.abandon(&other).await.unwrap();
    repo.abandon(&other).await.unwrap();

    // The agent dies mid-backup: the lock goes with it, the file stays until repair.
    let target = p1.target.clone();
    drop(p1);
    assert!(target.exists());
    std::fs::write(dir.join(".b9.json.1234.kumo-tmp"), b"x").unwrap();
    std::fs::write(dir.join("unrelated.txt"), b"keep").unwrap();
    let deleted = repo.repair(DISK).await.unwrap();
    assert_eq!(
        deleted,
        [dir.join(".b9.json.1234.kumo-tmp"), target.clone()]
    );
    assert!(!target.exists());
    assert!(dir.join("unrelated.txt").exists());

    // prepare repairs by itself: a leftover target of another id disappears.
    let p = repo.prepare(DISK, "b1", SIZE, true).await.unwrap();
    let m1 = repo.finish(&p, "kumo-b1").await.unwrap();
    drop(p);
    let leftover = dir.join("b2.qcow2");
    std::fs::copy(repo.chain_file(DISK, "b1"), &leftover).unwrap();
    let p = repo.prepare(DISK, "b3", SIZE, true).await.unwrap();
    assert!(!leftover.exists());
    assert_eq!(p.parent.as_ref(), Some(&m1));
    // finish refuses a target whose backing is not what prepare made.
    run("qemu-img", &["rebase", "-u", "-b", "", s(&p.target)]);
    assert!(matches!(
        repo.finish(&p, "kumo-b3").await,
        Err(StorageError::Corrupt(_))
    ));
    repo.abandon(&p).await.unwrap();
    assert!(!p.target.exists());
    drop(p);

    // Full on request, and when the disk shrank below its last backup.
    let p = repo.prepare(DISK, "b4", SIZE, false).await.unwrap();
    assert!(p.parent.is_none());
    repo.abandon(&p).await.unwrap();
    let p = repo.prepare(DISK, "b4", SIZE / 2, true).await.unwrap();
    assert!(p.parent.is_none());
    repo.abandon(&p).await.unwrap();
    // A grown disk still gets an incremental (the overlay is simply larger).
    let p = repo.prepare(DISK, "b4", 2 * SIZE, true).await.unwrap();
    assert_eq!(p.parent.as_ref().map(|m| m.id.as_str()), Some("b1"));
    qemu_io(&p.target, &["write -P 0x44 5M 64k"]);
    let m4 = repo.finish(&p, "kumo-b4").await.unwrap();
    assert_eq!(m4.virtual_size, 2 * SIZE);
    assert_eq!(m4.sha256, raw_sha(&p.target));
    drop(p);

    // The newest backup's file vanished: the next one is full.
    std::fs::remove_file(repo.chain_file(DISK, "b4")).unwrap();
    let p = repo.prepare(DISK, "b5", SIZE, true).await.unwrap();
    assert!(p.parent.is_none());
    repo.abandon(&p).await.unwrap();
    assert!(matches!(
        repo.verify(DISK, "b4").await,
        Err(StorageError::Corrupt(_))
    ));
}
