//! Backups with real guests: full then incremental backups while the guest writes, the bytes
//! an incremental copies against the bytes changed, restores as a new VM (data up to the
//! backup point) and in place, an interrupted backup (its agent killed) that leaves the chain
//! usable and is repaired by the next run, chain-consistent deletion, and schedules with
//! retention.

use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_types::storage::{
    Backup, BackupSchedule, BackupWithOperation, CreateBackup, CreateBackupSchedule, CreateVolume,
    RestoreBackup, RestoreResult,
};
use kumo_types::InstanceState;

use crate::common::{Cloud, Hv};
use crate::e2e::{counter, counter_above, SLOW};
use crate::storage::{
    api_err, attach, boot, create_volume, detach, disk_counter, guest_dev, guest_sh, vm,
    wait_operation, wait_volume, MIB,
};

async fn backup(c: &Client, req: CreateBackup) -> Backup {
    let started: BackupWithOperation = c.post("/api/v1/backups", &req).await.expect("backup");
    let op = wait_operation(c, &started.operation.id).await;
    assert_eq!(op.state, "succeeded", "{op:?}");
    let b: Backup = c
        .get(&format!("/api/v1/backups/{}", started.backup.id))
        .await
        .expect("show backup");
    assert_eq!(b.state, "completed", "{b:?}");
    b
}

fn of_volume(v: &str) -> CreateBackup {
    CreateBackup {
        volume: Some(v.into()),
        ..Default::default()
    }
}

fn of_instance(i: &str) -> CreateBackup {
    CreateBackup {
        instance: Some(i.into()),
        ..Default::default()
    }
}

/// md5 of `count` MiB at `skip` MiB of a guest block device.
async fn region_md5(c: &Client, vm: &str, dev: &str, skip: u64, count: u64) -> String {
    let out = guest_sh(
        c,
        vm,
        &format!("dd if=/dev/{dev} bs=1M skip={skip} count={count} 2>/dev/null | md5sum"),
    )
    .await;
    out.split_whitespace()
        .find(|w| w.len() == 32)
        .unwrap_or_else(|| panic!("no md5 in {out:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_incremental_restore_and_interrupted() {
    let mut cloud = Cloud::start(Hv::Qemu).await;
    cloud.demo_image().await;
    let c = cloud.client.clone();
    let t0 = Instant::now();
    let step = |s: &str| eprintln!("backups {:>6.1?} {s}", t0.elapsed());

    let a = boot(&cloud, vm("a")).await;
    let a_ip = a.private_ip.clone().expect("ip");
    // Fully up (its data disk mounted) before volumes come and go.
    counter_above(&cloud, &a_ip, 0).await;
    let v = create_volume(
        &c,
        &CreateVolume {
            size_bytes: Some(256 * MIB),
            instance: Some(a.id.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("volume");
    attach(&c, &v.id, &a.id).await.expect("attach");
    wait_volume(&c, &v.id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    let vd = guest_dev(&c, &a.id, &v.id).await;
    guest_sh(
        &c,
        &a.id,
        &format!("dd if=/dev/urandom of=/dev/{vd} bs=1M count=1 conv=fsync 2>/dev/null"),
    )
    .await;

    step("full backup of the volume, then an incremental one");
    let b1 = backup(&c, of_volume(&v.id)).await;
    assert_eq!((b1.kind.as_str(), b1.parent_id.as_deref()), ("full", None));
    let changed = 8 * MIB;
    guest_sh(
        &c,
        &a.id,
        &format!("dd if=/dev/urandom of=/dev/{vd} bs=1M seek=64 count=8 conv=fsync 2>/dev/null"),
    )
    .await;
    let b2 = backup(&c, of_volume(&v.id)).await;
    assert_eq!(
        (b2.kind.as_str(), b2.parent_id.as_deref()),
        ("incremental", Some(b1.id.as_str()))
    );
    let written = b2.bytes_written.expect("bytes written");
    eprintln!("incremental: {written} bytes for {changed} changed");
    assert!(
        written >= changed && (written as f64) <= changed as f64 * 1.1,
        "an incremental copies the changed blocks only: {written} for {changed}"
    );

    step("an interrupted backup: its agent killed half-way");
    guest_sh(
        &c,
        &a.id,
        &format!("dd if=/dev/urandom of=/dev/{vd} bs=1M seek=100 count=16 conv=fsync 2>/dev/null"),
    )
    .await;
    // 16 MiB at 2 MiB/s: the agent dies while QEMU is copying.
    let started: BackupWithOperation = c
        .post(
            "/api/v1/backups",
            &CreateBackup {
                rate_mib_s: Some(2),
                ..of_volume(&v.id)
            },
        )
        .await
        .expect("start");
    let deadline = Instant::now() + SLOW;
    while c
        .operation(&started.operation.id)
        .await
        .expect("op")
        .progress
        <= 0.0
    {
        assert!(Instant::now() < deadline, "the backup never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One backup of a disk at a time.
    let second: Result<BackupWithOperation, _> = c.post("/api/v1/backups", &of_volume(&v.id)).await;
    assert_eq!(api_err(second, "a second backup while one runs").0, 409);
    cloud.kill_agent(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cloud.start_agent(0);
    let op = wait_operation(&c, &started.operation.id).await;
    assert_eq!(op.state, "failed", "the interrupted backup failed: {op:?}");
    let b3: Backup = c
        .get(&format!("/api/v1/backups/{}", started.backup.id))
        .await
        .expect("show");
    assert_eq!(b3.state, "failed");
    // The chain is still usable, and the next run goes on from the last good backup.
    let b4 = backup(&c, of_volume(&v.id)).await;
    assert_eq!(
        (b4.kind.as_str(), b4.parent_id.as_deref()),
        ("incremental", Some(b2.id.as_str())),
        "the next backup builds on the last good one"
    );
    assert!(
        b4.bytes_written.unwrap_or(0) >= 16 * MIB,
        "it holds what the interrupted one should have: {b4:?}"
    );
    let _: Backup = c
        .post(
            &format!("/api/v1/backups/{}/verify", b4.id),
            &serde_json::json!({}),
        )
        .await
        .expect("the chain verifies");

    step("restore the chain as a new volume: the same bytes");
    let restored: RestoreResult = c
        .post(
            &format!("/api/v1/backups/{}/restore", b4.id),
            &RestoreBackup {
                name: Some("restored-vol".into()),
                ..Default::default()
            },
        )
        .await
        .expect("restore");
    let op = wait_operation(&c, &restored.operation.id).await;
    assert_eq!(op.state, "succeeded", "{op:?}");
    attach(&c, &restored.target_id, &a.id)
        .await
        .expect("attach restored");
    wait_volume(&c, &restored.target_id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    let rd = guest_dev(&c, &a.id, &restored.target_id).await;
    for (skip, count) in [(0, 1), (64, 8), (100, 16)] {
        assert_eq!(
            region_md5(&c, &a.id, &vd, skip, count).await,
            region_md5(&c, &a.id, &rd, skip, count).await,
            "MiB {skip}..{} restored",
            skip + count
        );
    }

    step("restore in place: refused while attached, then back to the full backup");
    let r: Result<RestoreResult, _> = c
        .post(
            &format!("/api/v1/backups/{}/restore", b1.id),
            &RestoreBackup {
                in_place: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(api_err(r, "in place while attached").0, 409);
    let before = region_md5(&c, &a.id, &vd, 0, 1).await;
    detach(&c, &v.id).await.expect("detach");
    wait_volume(&c, &v.id, "available", |v| v.state == "available").await;
    let inplace: RestoreResult = c
        .post(
            &format!("/api/v1/backups/{}/restore", b1.id),
            &RestoreBackup {
                in_place: true,
                ..Default::default()
            },
        )
        .await
        .expect("restore in place");
    assert_eq!(
        wait_operation(&c, &inplace.operation.id).await.state,
        "succeeded"
    );
    attach(&c, &v.id, &a.id).await.expect("attach again");
    wait_volume(&c, &v.id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    // Device names are reused; the serial says which one it is.
    let vd = guest_dev(&c, &a.id, &v.id).await;
    assert_eq!(
        region_md5(&c, &a.id, &vd, 0, 1).await,
        before,
        "MiB 0 as in the full backup"
    );
    let zeros = guest_sh(
        &c,
        &a.id,
        &format!("dd if=/dev/{vd} bs=1M skip=64 count=8 2>/dev/null | tr -d '\\000' | wc -c"),
    )
    .await;
    assert_eq!(
        zeros.trim(),
        "0",
        "what came after the full backup is gone: {zeros:?}"
    );

    step("delete a middle backup: the chain stays whole");
    crate::storage::delete(&c, &format!("/api/v1/backups/{}", b2.id))
        .await
        .expect("delete middle");
    let b4: Backup = c
        .get(&format!("/api/v1/backups/{}", b4.id))
        .await
        .expect("show");
    assert_eq!(
        b4.parent_id.as_deref(),
        Some(b1.id.as_str()),
        "merged into its child"
    );
    let _: Backup = c
        .post(
            &format!("/api/v1/backups/{}/verify", b4.id),
            &serde_json::json!({}),
        )
        .await
        .expect("still verifies");

    step("instance backups while the guest writes; restore one as a new VM");
    let v0 = counter(&cloud, &a_ip).await;
    let r1 = backup(&c, of_instance(&a.id)).await;
    let after = counter(&cloud, &a_ip).await;
    assert_eq!(r1.kind, "full", "the root disk's first backup: {r1:?}");
    let r2 = backup(&c, of_instance(&a.id)).await;
    assert_eq!(r2.kind, "incremental");
    let r3 = backup(&c, of_instance(&a.id)).await;
    assert_eq!(
        (r3.kind.as_str(), r3.parent_id.as_deref()),
        ("incremental", Some(r2.id.as_str()))
    );
    let repo = cloud.data_dir().join("backups").join(&a.id);
    let lines = disk_counter(&repo.join(format!("{}.qcow2", r1.id)), cloud.dir.path());
    let n1 = *lines.last().expect("counter lines in the full backup");
    assert!(lines.iter().copied().eq(1..=n1), "1..{n1} without a gap");
    assert!(
        v0 <= n1 && n1 <= after + 1,
        "the backup point: {v0} <= {n1} <= {after}+1"
    );
    let n3 = *disk_counter(&repo.join(format!("{}.qcow2", r3.id)), cloud.dir.path())
        .last()
        .expect("counter lines in the chain");
    assert!(n3 > n1, "the third backup is later: {n3} > {n1}");
    let r: Result<RestoreResult, _> = c
        .post(
            &format!("/api/v1/backups/{}/restore", r3.id),
            &RestoreBackup {
                in_place: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(api_err(r, "restore in place into a running VM").0, 409);
    let res: RestoreResult = c
        .post(
            &format!("/api/v1/backups/{}/restore", r3.id),
            &RestoreBackup {
                name: Some("a-restored".into()),
                ..Default::default()
            },
        )
        .await
        .expect("restore as new");
    assert_eq!(
        wait_operation(&c, &res.operation.id).await.state,
        "succeeded"
    );
    let list = c.instances().await.expect("instances");
    let ra = list
        .iter()
        .find(|i| i.name == "a-restored")
        .expect("restored VM");
    let ra = cloud.wait_state(&ra.id, InstanceState::Running, SLOW).await;
    let first = counter_above(&cloud, ra.private_ip.as_deref().expect("ip"), 0).await;
    let a_now = counter(&cloud, &a_ip).await;
    assert!(
        n3 < first && first < a_now,
        "the restored VM goes on from the backup ({n3}), behind the original ({a_now}): {first}"
    );

    step("a schedule every 5 s keeping 2");
    let bad: Result<BackupSchedule, _> = c
        .post(
            "/api/v1/backup-schedules",
            &CreateBackupSchedule {
                volume: Some(v.id.clone()),
                cron: "every five seconds".into(),
                keep_last: 2,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(api_err(bad, "bad cron").0, 400);
    let bad: Result<BackupSchedule, _> = c
        .post(
            "/api/v1/backup-schedules",
            &CreateBackupSchedule {
                volume: Some(v.id.clone()),
                cron: "*/5 * * * * *".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(api_err(bad, "no retention").0, 400);
    let sched: BackupSchedule = c
        .post(
            "/api/v1/backup-schedules",
            &CreateBackupSchedule {
                volume: Some(v.id.clone()),
                cron: "*/5 * * * * *".into(),
                keep_last: 2,
                ..Default::default()
            },
        )
        .await
        .expect("schedule");
    let deadline = Instant::now() + SLOW;
    let mut seen = std::collections::HashSet::new();
    loop {
        let mine: Vec<Backup> = c
            .get::<kumo_types::api::Page<Backup>>(&format!("/api/v1/backups?source={}", v.id))
            .await
            .expect("list")
            .items
            .into_iter()
            .filter(|b| b.schedule_id.as_deref() == Some(sched.id.as_str()))
            .collect();
        assert!(mine.iter().all(|b| b.state != "failed"), "{mine:?}");
        seen.extend(mine.iter().map(|b| b.id.clone()));
        // Four runs: retention (keep 2) has expired the oldest by then.
        if seen.len() >= 4 {
            let done = mine.iter().filter(|b| b.state == "completed").count();
            assert!(done <= 3, "retention keeps 2 (+ the newest): {mine:?}");
            assert!(
                mine.len() < seen.len(),
                "older scheduled backups were expired"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scheduled backups so far: {mine:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    crate::storage::delete(&c, &format!("/api/v1/backup-schedules/{}", sched.id))
        .await
        .expect("delete schedule");

    step("a schedule ends with its volume");
    let gone = create_volume(
        &c,
        &CreateVolume {
            size_bytes: Some(MIB),
            ..Default::default()
        },
    )
    .await
    .expect("volume");
    let s2: BackupSchedule = c
        .post(
            "/api/v1/backup-schedules",
            &CreateBackupSchedule {
                volume: Some(gone.id.clone()),
                cron: "*/5 * * * * *".into(),
                keep_last: 1,
                ..Default::default()
            },
        )
        .await
        .expect("schedule");
    crate::storage::delete(&c, &format!("/api/v1/volumes/{}", gone.id))
        .await
        .expect("delete volume");
    let listed = |all: Vec<BackupSchedule>| all.iter().any(|s| s.id == s2.id);
    let all: Vec<BackupSchedule> = c
        .get::<kumo_types::api::Page<BackupSchedule>>("/api/v1/backup-schedules")
        .await
        .expect("schedules")
        .items;
    assert!(!listed(all), "deleting the volume deleted its schedule");
}
