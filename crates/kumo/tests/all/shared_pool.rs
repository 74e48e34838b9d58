//! A shared pool: two hosts mount one directory. Their root disks and the project's volumes live
//! in it, its capacity counts once, and a volume written on one host is read on the other.

use kumo_types::storage::{CreateVolume, StoragePool};

use crate::common::{Cloud, Hv};
use crate::storage::{
    attach, boot, create_volume, detach, guest_dev, guest_sh, guest_until, vm, wait_volume, MIB,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_pool_volume_moves_between_hosts() {
    let mut cloud = Cloud::controller_only().await;
    let shared = cloud.dir.path().join("shared1");
    let shared_arg = shared.display().to_string();
    for _ in 0..2 {
        cloud
            .add_agent_with(
                Hv::Qemu,
                &["--storage-pool", "shared1", "--pool-path", &shared_arg],
            )
            .await;
    }
    cloud.demo_image().await;
    let c = &cloud.client;

    let pool: StoragePool = c.get("/api/v1/storage-pools/shared1").await.expect("pool");
    assert_eq!((pool.kind.as_str(), pool.shared), ("shared", true));
    assert_eq!(pool.hosts.len(), 2, "{pool:?}");
    assert_eq!(
        pool.total_bytes, pool.hosts[0].total_bytes,
        "one filesystem, counted once"
    );

    let (a, b) = tokio::join!(boot(&cloud, vm("a")), boot(&cloud, vm("b")));
    assert_ne!(a.host_id, b.host_id, "spread over the two hosts");
    // Both root disks live in the one directory.
    let layers: Vec<String> = std::fs::read_dir(shared.join("layers"))
        .expect("layers")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for i in [&a.id, &b.id] {
        assert!(
            layers.iter().any(|l| l.starts_with(i.as_str())),
            "{i}: {layers:?}"
        );
    }

    let v = create_volume(
        c,
        &CreateVolume {
            size_bytes: Some(64 * MIB),
            pool: Some("shared1".into()),
            ..Default::default()
        },
    )
    .await
    .expect("volume");
    assert_eq!((v.pool.as_str(), v.host_id.as_deref()), ("shared1", None));
    attach(c, &v.id, &a.id).await.expect("attach to a");
    wait_volume(c, &v.id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    let dev = guest_dev(c, &a.id, &v.id).await;
    let mark = format!("written-on-{}", a.host_id.clone().unwrap_or_default());
    guest_sh(
        c,
        &a.id,
        &format!("printf {mark} | dd of=/dev/{dev} conv=fsync 2>/dev/null"),
    )
    .await;
    detach(c, &v.id).await.expect("detach");
    wait_volume(c, &v.id, "available", |v| v.state == "available").await;
    attach(c, &v.id, &b.id)
        .await
        .expect("attach to b on the other host");
    wait_volume(c, &v.id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    let dev = guest_dev(c, &b.id, &v.id).await;
    guest_until(
        c,
        &b.id,
        &format!(
            "dd if=/dev/{dev} bs=512 count=1 2>/dev/null | head -c {}",
            mark.len()
        ),
        |o| o.contains(&mark),
    )
    .await;
}
