//! P2V: a physical disk (a loop device standing in for it) imported as an image with progress,
//! booted as an instance that keeps the machine's MAC and SMBIOS UUID, and a second instance
//! claiming the same identity refused (seed 003: the hypervisor checks that UUID and MAC are
//! not duplicated, then the P2V'd machine boots).

use std::process::Command;
use std::time::Duration;

use kumo_types::api::{CreateInstance, ImportImage};
use kumo_types::InstanceState;

use crate::common::{guest_dir, Cloud, Hv};
use crate::e2e::{counter_above, SLOW};
use crate::storage::{api_err, boot, guest_sh};

/// A loop device over a file, detached on drop even if the test fails.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--read-only"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn p2v_import_from_a_block_device() {
    let cloud = Cloud::start(Hv::Qemu).await;
    cloud.demo_image().await;
    let c = &cloud.client;
    let demo = c.image("demo").await.expect("demo image");

    // The "physical disk": the guest's data disk as raw bytes on a block device.
    let raw = cloud.dir.path().join("physical.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(guest_dir().await.join("disk.qcow2"))
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let size = std::fs::metadata(&raw).expect("raw").len();
    let dev = Loop::attach(&raw);

    let started = c
        .import_image(&ImportImage {
            name: "p2v".into(),
            kind: Some("disk".into()),
            path: dev.0.clone(),
            format: Some("raw".into()),
            kernel_id: demo.kernel_id.clone(),
            ramdisk_id: demo.ramdisk_id.clone(),
            cmdline: demo.cmdline.clone(),
            public: false,
        })
        .await
        .expect("import from the block device");
    let op = crate::storage::wait_operation(c, &started.operation.id).await;
    assert_eq!(
        (op.state.as_str(), op.progress),
        ("succeeded", 1.0),
        "{op:?}"
    );
    let img = c.image("p2v").await.expect("image");
    assert_eq!(img.state, "available");
    assert_eq!(img.virtual_size, Some(size), "the whole device");
    assert_eq!(img.source_format.as_deref(), Some("raw"));

    let (mac, uuid) = ("52:54:00:aa:bb:01", "4c4c4544-0042-3510-8052-b4c04f4e4b32");
    let mut req = CreateInstance {
        name: "bell".into(),
        image: "p2v".into(),
        instance_type: Some("t1.micro".into()),
        mac: Some("01:00:5e:00:00:01".into()),
        ..Default::default()
    };
    assert_eq!(
        api_err(c.create_instance(&req, None).await, "multicast MAC").0,
        400
    );
    req.mac = Some(mac.into());
    req.uuid = Some("not-a-uuid".into());
    assert_eq!(
        api_err(c.create_instance(&req, None).await, "bad UUID").0,
        400
    );
    req.uuid = Some(uuid.into());
    let bell = boot(&cloud, req.clone()).await;
    assert_eq!(bell.mac.as_deref(), Some(mac), "it keeps its MAC");
    let ip = bell.private_ip.clone().expect("ip");
    counter_above(&cloud, &ip, 0).await;
    let seen = guest_sh(c, &bell.id, "cat /sys/class/dmi/id/product_uuid").await;
    assert!(seen.contains(uuid), "the guest sees its UUID: {seen:?}");

    // The same identity twice: refused, nothing created.
    let before = c.instances().await.expect("list").len();
    for (m, u) in [(Some(mac), None), (None, Some(uuid))] {
        let dup = CreateInstance {
            name: "bell-copy".into(),
            image: "p2v".into(),
            instance_type: Some("t1.micro".into()),
            mac: m.map(str::to_string),
            uuid: u.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(
            api_err(c.create_instance(&dup, None).await, "duplicate identity").0,
            409,
            "{m:?} {u:?}"
        );
    }
    assert_eq!(c.instances().await.expect("list").len(), before);

    // Once the original is gone, its identity may be used again.
    c.terminate(&bell.id).await.expect("terminate");
    cloud
        .wait_state(&bell.id, InstanceState::Terminated, SLOW)
        .await;
    let again = c
        .create_instance(
            &CreateInstance {
                name: "bell2".into(),
                ..req
            },
            None,
        )
        .await
        .expect("the identity is free again");
    c.terminate(&again.id).await.expect("terminate");
    cloud
        .wait_state(&again.id, InstanceState::Terminated, SLOW)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
}
