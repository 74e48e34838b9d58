//! Real-QEMU tests of live migration (TCG), both ends on 127.0.0.1 as two QEMU processes with
//! their own run roots and drivers, as two agents would have. The tests with a guest OS boot
//! kumo's test guest (guest/build-guest.sh: it appends to /data/counter every 100 ms, so its
//! disk and memory keep changing); the others idle in firmware and get their disk data through
//! HMP `qemu-io` on the device's own block backend. The ENOSPC test mounts a tmpfs and the
//! stall test stops a process: they need root, as CI has.

mod common;
#[path = "migrate/support.rs"]
mod support;

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kumo_hypervisor::{
    AccelChoice, Hypervisor, HypervisorError, IncomingSpec, MigrationPhase, NbdTarget, PowerState,
    QemuDriver, SimDriver,
};
use serde_json::{json, Value};

use common::qemu_pids;
use support::*;

#[tokio::test]
async fn storage_migration_of_a_writing_guest() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("st");
    let _guard = Guard {
        id: id.clone(),
        mounts: vec![],
    };
    let (src, dst) = drivers(work.path()).await;
    let root = work.path().join("src/root.qcow2");
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    std::fs::copy(guest().join("disk.qcow2"), &root).unwrap();
    let extra = create(&work.path().join("src/extra.qcow2"), 32 * MIB);
    let src_spec = with_guest(spec(
        &id,
        vec![
            disk(&root, None, Some(&id)),
            disk(&extra, Some("vol-extra"), Some("vol-extra")),
        ],
    ));
    // What the destination agent makes: blank disks of the same virtual sizes.
    let dst_root = create(&work.path().join("dst/root.qcow2"), virtual_size(&root));
    let dst_extra = create(&work.path().join("dst/extra.qcow2"), 32 * MIB);
    let dst_spec = on_dest(&src_spec, &[&dst_root, &dst_extra]);

    src.start(&src_spec).await.unwrap();
    wait_writing(&src, &id).await;
    let sq = src.qmp(&id).await.unwrap();
    write(&sq, "vol-extra", 0x77, MIB, 8 * MIB).await;

    let ready = dst
        .start_incoming(&dst_spec, &incoming(true))
        .await
        .unwrap();
    eprintln!("destination ready: {ready:?}");
    assert!(ready.migrate_uri.starts_with("tcp:127.0.0.1:"), "{ready:?}");
    let devs: Vec<&str> = ready
        .nbd_targets
        .iter()
        .map(|t| t.device_id.as_str())
        .collect();
    assert_eq!(devs, ["virtio-disk0", "vol-extra"]);
    assert!(ready.nbd_targets[0]
        .uri
        .ends_with(":exportname=virtio-disk0"));
    assert_eq!(dst.state(&id).await.unwrap(), PowerState::Paused);
    assert!(!dst.incoming_completed(&id).await.unwrap());
    // A repeated request (agent restarted) gets the same answer; no second QEMU.
    assert_eq!(
        dst.start_incoming(&dst_spec, &incoming(true))
            .await
            .unwrap(),
        ready
    );
    assert_eq!(qemu_pids(&id).len(), 2);
    // Nothing arrived yet: the destination refuses to run.
    let err = dst.finish_incoming(&id).await.unwrap_err();
    assert!(matches!(err, HypervisorError::MigrationFailed(_)), "{err}");
    assert_eq!(dst.state(&id).await.unwrap(), PowerState::Paused);

    let rec = Recorder::default();
    let mut m = migrate_spec(&ready);
    m.auto_converge = true;
    let started = Instant::now();
    let report = src
        .migrate(&id, &m, &|p| {
            rec.push(p);
            true
        })
        .await
        .unwrap();
    eprintln!("report: {report:?}");
    eprintln!(
        "phases {:?}, {} progress calls, longest gap {:?}",
        rec.phases(),
        rec.calls().len(),
        rec.longest_gap(started)
    );
    assert!(report.downtime_ms > 0, "{report:?}");
    assert!(report.downtime_ms < report.total_ms, "{report:?}");
    assert!(report.memory_ms <= report.total_ms, "{report:?}");
    assert!(report.ram_bytes > MIB, "{report:?}");
    // The mirrors copy allocated data only (the targets are zeroed first): at least the 8 MiB
    // written to the extra disk plus the guest's file system.
    assert!(report.disk_bytes > 8 * MIB, "{report:?}");
    assert_eq!(
        rec.phases(),
        [
            MigrationPhase::Mirroring,
            MigrationPhase::Memory,
            MigrationPhase::Completed
        ]
    );
    assert!(rec.longest_gap(started) < Duration::from_millis(1000));
    let caps = sq
        .execute("query-migrate-capabilities", Value::Null)
        .await
        .unwrap();
    assert!(caps
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["capability"] == "auto-converge" && c["state"] == true));

    // Source paused for good, destination complete but still paused: both disks quiet.
    assert_eq!(src.state(&id).await.unwrap(), PowerState::Paused);
    assert_eq!(qemu_status(&sq).await, "postmigrate");
    assert!(block_jobs(&sq).await.is_empty());
    assert!(dst.incoming_completed(&id).await.unwrap());
    assert!(!src.incoming_completed(&id).await.unwrap());
    assert!(same_content(&root, &dst_root), "root disks differ");
    assert!(same_content(&extra, &dst_extra), "extra disks differ");

    dst.finish_incoming(&id).await.unwrap();
    dst.finish_incoming(&id).await.unwrap();
    assert_eq!(dst.state(&id).await.unwrap(), PowerState::Running);
    assert_eq!(src.state(&id).await.unwrap(), PowerState::Paused);
    // The finished destination's NBD server is gone.
    let dq = dst.qmp(&id).await.unwrap();
    let exports = dq
        .execute("query-block-exports", Value::Null)
        .await
        .unwrap();
    assert_eq!(exports, json!([]));
    // The guest goes on writing its counter, on the destination's disk.
    assert!(keeps_writing(&dst, &id, Duration::from_secs(10)).await);
    assert!(
        !same_content(&root, &dst_root),
        "destination guest wrote nothing"
    );
    assert!(same_content(&extra, &dst_extra));
    // The source is a destination of nothing: it refuses to be finished.
    assert!(src.finish_incoming(&id).await.is_err());
    src.kill(&id).await.unwrap();
    dst.kill(&id).await.unwrap();
}

#[tokio::test]
async fn shared_pool_memory_only() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("sh");
    let _guard = Guard {
        id: id.clone(),
        mounts: vec![],
    };
    let (src, dst) = drivers(work.path()).await;
    let root = work.path().join("pool/root.qcow2");
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    std::fs::copy(guest().join("disk.qcow2"), &root).unwrap();
    // Both hosts open the very same file.
    let vm = with_guest(spec(&id, vec![disk(&root, None, Some(&id))]));
    src.start(&vm).await.unwrap();
    wait_writing(&src, &id).await;

    // Completed, then rolled back while the destination still has the file open: the source
    // takes its image locks back (the destination never activated the image).
    let ready = dst.start_incoming(&vm, &incoming(false)).await.unwrap();
    assert!(ready.nbd_targets.is_empty());
    src.migrate(&id, &migrate_spec(&ready), &|_| true)
        .await
        .unwrap();
    assert_eq!(src.state(&id).await.unwrap(), PowerState::Paused);
    assert!(dst.incoming_completed(&id).await.unwrap());
    src.resume_after_migration(&id).await.unwrap();
    assert!(keeps_writing(&src, &id, Duration::from_secs(10)).await);
    dst.kill(&id).await.unwrap();

    let ready = dst.start_incoming(&vm, &incoming(false)).await.unwrap();
    let rec = Recorder::default();
    let started = Instant::now();
    let report = src
        .migrate(&id, &migrate_spec(&ready), &|p| {
            rec.push(p);
            true
        })
        .await
        .unwrap();
    eprintln!("report: {report:?}, phases {:?}", rec.phases());
    assert_eq!(report.disk_bytes, 0);
    assert!(report.downtime_ms > 0 && report.downtime_ms < report.total_ms);
    assert!(!rec.phases().contains(&MigrationPhase::Mirroring));
    assert!(rec.longest_gap(started) < Duration::from_millis(1000));
    assert!(dst.incoming_completed(&id).await.unwrap());
    dst.finish_incoming(&id).await.unwrap();
    assert_eq!(dst.state(&id).await.unwrap(), PowerState::Running);
    assert_eq!(src.state(&id).await.unwrap(), PowerState::Paused);
    // The destination took the image over (its locks included) and the guest writes on.
    assert!(keeps_writing(&dst, &id, Duration::from_secs(10)).await);
    let sq = src.qmp(&id).await.unwrap();
    let before = writes(&sq, "virtio-disk0").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        writes(&sq, "virtio-disk0").await,
        before,
        "source still writes"
    );
    src.kill(&id).await.unwrap();
    dst.stop(&id, Duration::from_secs(10)).await.unwrap();
    // The guest shut down cleanly from the shared file: it is consistent and unlocked.
    let out = qemu_img(&["check", s(&root)]);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
}

#[tokio::test]
async fn cancel_mid_mirror_and_bad_input() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("cx");
    let _guard = Guard {
        id: id.clone(),
        mounts: vec![],
    };
    let dest_dir = work.path().join("dst");
    let (src, dst, _, dst_spec) = firmware_pair(work.path(), &id, 48 * MIB, &dest_dir).await;
    let sq = src.qmp(&id).await.unwrap();

    // Bad input is refused before anything starts on either side.
    let bad_id = format!("{id}-bad");
    let mut bad = dst_spec.clone();
    bad.id = bad_id.clone();
    let _bad_guard = Guard {
        id: bad_id.clone(),
        mounts: vec![],
    };
    for ip in ["0.0.0.0", "224.0.0.1"] {
        let inc = IncomingSpec {
            listen_ip: ip.parse().unwrap(),
            nbd: true,
        };
        let err = dst.start_incoming(&bad, &inc).await.unwrap_err();
        assert!(matches!(err, HypervisorError::InvalidSpec(_)), "{err}");
    }
    bad.disks[0].path = dest_dir.join("missing.qcow2");
    let err = dst.start_incoming(&bad, &incoming(true)).await.unwrap_err();
    assert!(matches!(err, HypervisorError::InvalidSpec(_)), "{err}");
    assert!(qemu_pids(&bad_id).is_empty());
    assert!(!dst.run_dir(&bad_id).exists());

    let ready = dst
        .start_incoming(&dst_spec, &incoming(true))
        .await
        .unwrap();
    let dst_pid = pid_of(&dst, &id);
    let target = |dev: &str| NbdTarget {
        device_id: dev.into(),
        uri: ready.nbd_targets[0].uri.clone(),
    };
    let mut bad_specs = Vec::new();
    for targets in [
        vec![target("vol-nope")],
        vec![target("virtio-disk0"), target("vol-nope")],
        vec![target("virtio-disk0"), target("virtio-disk0")],
    ] {
        let mut m = migrate_spec(&ready);
        m.target.nbd_targets = targets;
        bad_specs.push(m);
    }
    let mut m = migrate_spec(&ready);
    m.target.migrate_uri = "exec:true".into();
    bad_specs.push(m);
    let mut m = migrate_spec(&ready);
    m.target.nbd_targets[0].uri = "file:/etc/passwd".into();
    bad_specs.push(m);
    for m in bad_specs {
        let err = src.migrate(&id, &m, &|_| true).await.unwrap_err();
        assert!(
            matches!(err, HypervisorError::InvalidSpec(_)),
            "{m:?}: {err}"
        );
    }
    assert_source_intact(&src, &id).await;
    assert_eq!(migration_status(&sq).await, "none");

    // Slow enough that the mirror still runs at its first report.
    let rec = Recorder::default();
    let mut m = migrate_spec(&ready);
    m.bandwidth = Some(8 * MIB);
    let err = src
        .migrate(&id, &m, &|p| {
            rec.push(p);
            !(p.phase == MigrationPhase::Mirroring && p.disk_done > 0)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::Cancelled(_)), "{err}");
    let (_, last) = rec.calls().pop().unwrap();
    eprintln!("cancelled at {last:?}");
    assert!(last.disk_done < last.disk_total, "{last:?}");
    // What the mirror copies: the allocated 48 MiB.
    assert_eq!(last.disk_total, 48 * MIB);
    assert_source_intact(&src, &id).await;
    assert!(!dst.incoming_completed(&id).await.unwrap());
    dst.kill(&id).await.unwrap();
    assert!(!alive(dst_pid));
    src.kill(&id).await.unwrap();
}

#[tokio::test]
async fn stalled_destination_fails_and_source_runs_on() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("sl");
    let _guard = Guard {
        id: id.clone(),
        mounts: vec![],
    };
    let dest_dir = work.path().join("dst");
    let (src, dst, _, dst_spec) = firmware_pair(work.path(), &id, 48 * MIB, &dest_dir).await;
    let ready = dst
        .start_incoming(&dst_spec, &incoming(true))
        .await
        .unwrap();
    let dst_pid = pid_of(&dst, &id);

    let stopped_at: Mutex<Option<Instant>> = Mutex::new(None);
    let mut m = migrate_spec(&ready);
    m.bandwidth = Some(8 * MIB);
    m.stall_timeout_secs = 3;
    let err = src
        .migrate(&id, &m, &|p| {
            let mut at = stopped_at.lock().unwrap();
            if at.is_none() && p.disk_done > 0 {
                // The destination freezes: its kernel still ACKs, nothing answers.
                unsafe {
                    libc::kill(dst_pid as i32, libc::SIGSTOP);
                }
                *at = Some(Instant::now());
            }
            true
        })
        .await
        .unwrap_err();
    let took = stopped_at.lock().unwrap().unwrap().elapsed();
    unsafe {
        libc::kill(dst_pid as i32, libc::SIGCONT);
    }
    eprintln!("failed {took:?} after the destination stopped: {err}");
    assert!(matches!(err, HypervisorError::MigrationStalled(_)), "{err}");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert!(took < Duration::from_secs(3 + 7), "{took:?}");
    assert_source_intact(&src, &id).await;
    dst.kill(&id).await.unwrap();
    assert!(!alive(dst_pid));

    // The same in the memory phase (memory only, slow enough to be caught mid-way).
    let ready = dst
        .start_incoming(&dst_spec, &incoming(false))
        .await
        .unwrap();
    let dst_pid = pid_of(&dst, &id);
    *stopped_at.lock().unwrap() = None;
    let mut m = migrate_spec(&ready);
    m.bandwidth = Some(256 * 1024);
    m.stall_timeout_secs = 2;
    let err = src
        .migrate(&id, &m, &|p| {
            let mut at = stopped_at.lock().unwrap();
            if at.is_none() && p.phase == MigrationPhase::Memory && p.ram_done > 0 {
                unsafe {
                    libc::kill(dst_pid as i32, libc::SIGSTOP);
                }
                *at = Some(Instant::now());
            }
            true
        })
        .await
        .unwrap_err();
    let took = stopped_at
        .lock()
        .unwrap()
        .expect("the memory phase was never reported")
        .elapsed();
    unsafe {
        libc::kill(dst_pid as i32, libc::SIGCONT);
    }
    eprintln!("memory phase: failed {took:?} after the destination stopped: {err}");
    assert!(matches!(err, HypervisorError::MigrationStalled(_)), "{err}");
    assert!(took < Duration::from_secs(2 + 7), "{took:?}");
    assert_source_intact(&src, &id).await;
    // Cancelled, or failed when its dead connection was closed from outside first.
    let status = migration_status(&src.qmp(&id).await.unwrap()).await;
    assert!(
        status == "cancelled" || status == "failed",
        "migration status {status}"
    );
    dst.kill(&id).await.unwrap();
    src.kill(&id).await.unwrap();
}

#[tokio::test]
async fn resume_after_completed_and_half_done_migrations() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("rs");
    let _guard = Guard {
        id: id.clone(),
        mounts: vec![],
    };
    let dest_dir = work.path().join("dst");
    let (src, dst, _, dst_spec) = firmware_pair(work.path(), &id, 4 * MIB, &dest_dir).await;
    let ready = dst
        .start_incoming(&dst_spec, &incoming(true))
        .await
        .unwrap();
    src.migrate(&id, &migrate_spec(&ready), &|_| true)
        .await
        .unwrap();
    assert_eq!(src.state(&id).await.unwrap(), PowerState::Paused);
    // A second migrate of a migrated source is refused.
    let err = src
        .migrate(&id, &migrate_spec(&ready), &|_| true)
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::InvalidState(_)), "{err}");
    // Rolled back by an agent that restarted: a new driver on the same run root.
    drop(src);
    let src = QemuDriver::new(work.path().join("src-run"), AccelChoice::Tcg)
        .await
        .unwrap();
    src.resume_after_migration(&id).await.unwrap();
    src.resume_after_migration(&id).await.unwrap();
    assert_source_intact(&src, &id).await;
    // The completed but unfinished destination is no source: it stays paused.
    let err = dst.resume_after_migration(&id).await.unwrap_err();
    assert!(matches!(err, HypervisorError::InvalidState(_)), "{err}");
    assert_eq!(dst.state(&id).await.unwrap(), PowerState::Paused);
    dst.kill(&id).await.unwrap();

    // An agent that crashed mid-way leaves a mirror job and a migration running.
    let ready = dst
        .start_incoming(&dst_spec, &incoming(true))
        .await
        .unwrap();
    let dq = dst.qmp(&id).await.unwrap();
    assert_eq!(qemu_status(&dq).await, "inmigrate");
    let err = dst.resume_after_migration(&id).await.unwrap_err();
    assert!(matches!(err, HypervisorError::InvalidState(_)), "{err}");
    let sq = src.qmp(&id).await.unwrap();
    sq.execute(
        "drive-mirror",
        json!({ "job-id": "mig-virtio-disk0", "device": "disk0",
                "target": ready.nbd_targets[0].uri, "format": "raw", "sync": "full",
                "mode": "existing", "speed": MIB, "auto-dismiss": false }),
    )
    .await
    .unwrap();
    sq.execute("migrate-set-parameters", json!({ "max-bandwidth": MIB }))
        .await
        .unwrap();
    sq.execute("migrate", json!({ "uri": ready.migrate_uri }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(block_jobs(&sq).await.len(), 1);
    assert_eq!(migration_status(&sq).await, "active");
    drop(sq);
    drop(src);
    let src = QemuDriver::new(work.path().join("src-run"), AccelChoice::Tcg)
        .await
        .unwrap();
    src.resume_after_migration(&id).await.unwrap();
    assert_source_intact(&src, &id).await;
    // Cancelled, or failed when its dead connection was closed from outside first.
    let status = migration_status(&src.qmp(&id).await.unwrap()).await;
    assert!(
        status == "cancelled" || status == "failed",
        "migration status {status}"
    );
    // A cancelled incoming migration ends QEMU 7.2's destination by itself; kill is Ok anyway.
    dst.kill(&id).await.unwrap();
    src.kill(&id).await.unwrap();
    assert!(qemu_pids(&id).is_empty());
}

#[tokio::test]
async fn full_target_fails_the_mirror() {
    let work = tempfile::tempdir().unwrap();
    let id = unique_id("ns");
    let mnt = work.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs", s(&mnt)])
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs needs root");
    let _guard = Guard {
        id: id.clone(),
        mounts: vec![mnt.clone()],
    };
    let (src, dst, src_spec, dst_spec) = firmware_pair(work.path(), &id, 40 * MIB, &mnt).await;
    let before = work.path().join("before.qcow2");
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "qcow2",
        s(&src_spec.disks[0].path),
        s(&before),
    ]);
    let ready = dst
        .start_incoming(&dst_spec, &incoming(true))
        .await
        .unwrap();
    let err = src
        .migrate(&id, &migrate_spec(&ready), &|_| true)
        .await
        .unwrap_err();
    eprintln!("{err}");
    match &err {
        HypervisorError::BlockJobFailed(msg) => {
            assert!(msg.contains("No space left"), "{msg}");
            assert!(msg.contains("virtio-disk0"), "{msg}");
        }
        other => panic!("expected a mirror error, got {other:?}"),
    }
    assert_source_intact(&src, &id).await;
    assert!(
        same_content(&src_spec.disks[0].path, &before),
        "source disk changed"
    );
    dst.kill(&id).await.unwrap();
    src.kill(&id).await.unwrap();
}

#[tokio::test]
async fn sim_driver_migrates() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (
        SimDriver::new(root.path().join("a")),
        SimDriver::new(root.path().join("b")),
    );
    let file = root.path().join("root.raw");
    std::fs::write(&file, vec![0u8; 4096]).unwrap();
    let vm = spec("i-sim", vec![disk(&file, None, None)]);
    a.start(&vm).await.unwrap();
    let ready = b.start_incoming(&vm, &incoming(true)).await.unwrap();
    assert_eq!(b.state("i-sim").await.unwrap(), PowerState::Paused);
    assert_eq!(ready.nbd_targets.len(), 1);
    assert_eq!(b.start_incoming(&vm, &incoming(true)).await.unwrap(), ready);
    assert!(matches!(
        b.start_incoming(&vm, &incoming(false)).await,
        Err(HypervisorError::InvalidState(_))
    ));

    // Cancelled by the callback, then a failure: the source runs on.
    let err = a
        .migrate("i-sim", &migrate_spec(&ready), &|_| false)
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::Cancelled(_)), "{err}");
    a.fail_next_migration("i-sim", "link down").unwrap();
    let err = a
        .migrate("i-sim", &migrate_spec(&ready), &|_| true)
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::MigrationFailed(_)), "{err}");
    assert_eq!(a.state("i-sim").await.unwrap(), PowerState::Running);
    let mut m = migrate_spec(&ready);
    m.target.nbd_targets[0].device_id = "vol-x".into();
    assert!(matches!(
        a.migrate("i-sim", &m, &|_| true).await,
        Err(HypervisorError::InvalidSpec(_))
    ));

    let calls = Mutex::new(0);
    let report = a
        .migrate("i-sim", &migrate_spec(&ready), &|_| {
            *calls.lock().unwrap() += 1;
            true
        })
        .await
        .unwrap();
    assert_eq!(*calls.lock().unwrap(), 1);
    assert_eq!(report.ram_bytes, 128 * MIB);
    assert_eq!(report.disk_bytes, 4096);
    assert!(report.downtime_ms > 0 && report.downtime_ms < report.total_ms);
    assert_eq!(a.state("i-sim").await.unwrap(), PowerState::Paused);
    assert!(b.incoming_completed("i-sim").await.unwrap());
    b.finish_incoming("i-sim").await.unwrap();
    b.finish_incoming("i-sim").await.unwrap();
    assert_eq!(b.state("i-sim").await.unwrap(), PowerState::Running);
    assert!(a.finish_incoming("i-sim").await.is_err());
    a.resume_after_migration("i-sim").await.unwrap();
    a.resume_after_migration("i-sim").await.unwrap();
    assert_eq!(a.state("i-sim").await.unwrap(), PowerState::Running);

    // A destination whose stream never arrived stays paused.
    b.kill("i-sim").await.unwrap();
    b.start_incoming(&vm, &incoming(false)).await.unwrap();
    b.set_incoming_completed("i-sim", false).unwrap();
    assert!(matches!(
        b.finish_incoming("i-sim").await,
        Err(HypervisorError::MigrationFailed(_))
    ));
    assert_eq!(b.state("i-sim").await.unwrap(), PowerState::Paused);
    assert!(b.incoming_completed("i-sim").await.is_ok_and(|c| !c));
    assert!(matches!(
        b.incoming_completed("i-none").await,
        Err(HypervisorError::NotRunning(_))
    ));
}
