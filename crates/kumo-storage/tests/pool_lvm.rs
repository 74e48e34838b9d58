//! lvm pool against a real volume group on a loop device (needs root and lvm2; scripts/test
//! installs lvm2). Without device-mapper in the kernel LVs cannot be created: then the test checks
//! that create_disk fails clearly and leaves no LV and no manifest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kumo_storage::pool::{DiskBase, Pool, PoolConfig, PoolKind, Source};
use kumo_storage::{Progress, StorageError};

const MIB: u64 = 1 << 20;

fn noop() -> Progress {
    Arc::new(|_| {})
}

/// An LVM or util-linux tool; sbin may be missing from a test harness's PATH.
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (lvm2/util-linux are required)"))
}

fn out(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool(name))
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap()
}

fn ok(name: &str, args: &[&str]) -> String {
    let o = out(name, args);
    assert!(
        o.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A VG on a loop device over a sparse file; removes VG, PV, loop device and file when dropped.
struct TestVg {
    file: PathBuf,
    dev: Option<String>,
    vg: String,
    has_vg: bool,
}

impl TestVg {
    fn new(dir: &Path) -> TestVg {
        let file = dir.join("pv.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let vg = format!("kumotest{}x{}", std::process::id(), uuid_ish());
        let mut t = TestVg {
            file,
            dev: None,
            vg,
            has_vg: false,
        };
        let dev = ok("losetup", &["-f", "--show", t.file.to_str().unwrap()])
            .trim()
            .to_string();
        t.dev = Some(dev.clone());
        ok("pvcreate", &["-y", &dev]);
        ok("vgcreate", &[&t.vg, &dev]);
        t.has_vg = true;
        t
    }
}

fn uuid_ish() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

impl Drop for TestVg {
    fn drop(&mut self) {
        if self.has_vg {
            let _ = out("vgremove", &["-f", "-y", &self.vg]);
        }
        if let Some(dev) = &self.dev {
            let _ = out("pvremove", &["-ff", "-y", dev]);
            let _ = out("losetup", &["-d", dev]);
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

fn lv_names(vg: &str) -> Vec<String> {
    ok("lvs", &["--noheadings", "-o", "lv_name", vg])
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn has_device_mapper() -> bool {
    std::fs::read_to_string("/proc/misc")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"))
}

#[tokio::test]
async fn lvm_pool_on_a_loop_device() {
    tool("vgs"); // fails loudly when lvm2 is missing
    let dir = tempfile::tempdir().unwrap();
    let vg = TestVg::new(dir.path());
    let meta = dir.path().join("pool");
    let pool = Pool::open(PoolConfig {
        name: "lvm-test".into(),
        kind: PoolKind::Lvm,
        path: meta.clone(),
        vg: Some(vg.vg.clone()),
    })
    .unwrap();
    assert!(pool.image_dir().starts_with(&meta) && pool.image_dir().is_dir());

    let figures: Vec<u64> = ok(
        "vgs",
        &[
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "-o",
            "vg_size,vg_free,vg_extent_size",
            &vg.vg,
        ],
    )
    .split_whitespace()
    .map(|s| s.parse().unwrap())
    .collect();
    let cap = pool.capacity().await.unwrap();
    assert_eq!((cap.total_bytes, cap.free_bytes), (figures[0], figures[1]));
    assert!(
        cap.total_bytes > 32 * MIB && cap.total_bytes <= 64 * MIB,
        "{cap:?}"
    );
    let extent = figures[2];

    // Sizes must be whole extents.
    match pool
        .create_disk("vol-odd", extent + 512, &DiskBase::Blank, noop())
        .await
    {
        Err(StorageError::InvalidArgument(m)) => {
            assert!(m.contains(&extent.to_string()), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // No snapshots in an lvm pool.
    for r in [
        pool.plan_snapshot("vol-a", "snap-a").await.err(),
        pool.snapshot_offline("vol-a", "snap-a").await.err(),
        pool.create_disk(
            "vol-a",
            2 * extent,
            &DiskBase::Snapshot("snap-a".into()),
            noop(),
        )
        .await
        .err(),
        pool.copy_disk(
            &Source::Snapshot("snap-a".into()),
            "vol-b",
            2 * extent,
            noop(),
        )
        .await
        .err(),
    ] {
        match r {
            Some(StorageError::Unsupported(m)) => assert!(m.contains("dir or shared"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(lv_names(&vg.vg).is_empty());

    let size = 2 * extent;
    let res = pool
        .create_disk("vol-a", size, &DiskBase::Blank, noop())
        .await;
    if has_device_mapper() {
        let d = res.unwrap();
        assert_eq!((d.format.as_str(), d.size), ("raw", size));
        assert_eq!(d.path, Path::new("/dev").join(&vg.vg).join("vol-a"));
        let lv_size: u64 = ok(
            "lvs",
            &[
                "--noheadings",
                "--nosuffix",
                "--units",
                "b",
                "-o",
                "lv_size",
                &format!("{}/vol-a", vg.vg),
            ],
        )
        .trim()
        .parse()
        .unwrap();
        assert_eq!(lv_size, size);
        assert_eq!(pool.disks().await.unwrap(), vec![d.clone()]);
        assert_eq!(
            pool.create_disk("vol-a", size, &DiskBase::Blank, noop())
                .await
                .unwrap(),
            d
        );
        let cap2 = pool.capacity().await.unwrap();
        assert_eq!(cap2.free_bytes, cap.free_bytes - size);
        pool.delete_disk("vol-a").await.unwrap();
        assert!(lv_names(&vg.vg).is_empty());
    } else {
        match res {
            Err(StorageError::Lvm { command, message }) => {
                assert_eq!(command, "lvcreate");
                assert!(message.contains("device-mapper"), "{message}");
            }
            other => panic!("expected a clear lvcreate error, got {other:?}"),
        }
        assert!(lv_names(&vg.vg).is_empty(), "{:?}", lv_names(&vg.vg));
        assert_eq!(pool.disk("vol-a").await.unwrap(), None);
        assert_eq!(pool.capacity().await.unwrap(), cap);
    }
    let manifests: Vec<_> = std::fs::read_dir(meta.join("disks")).unwrap().collect();
    assert!(manifests.is_empty(), "{manifests:?}");
    pool.delete_disk("vol-a").await.unwrap(); // idempotent
    assert_eq!(pool.gc().await.unwrap(), Vec::<PathBuf>::new());
}
