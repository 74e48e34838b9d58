//! Storage with real guests: volumes hot-plugged, grown online, moved between VMs and shrunk by
//! copy; a live snapshot booted next to its running original (the mail-spool recovery); a hot
//! clone; and every bad input the issue names refused without leaving anything behind.

use std::path::Path;
use std::time::{Duration, Instant};

use kumo_cli::{Client, ClientError};
use kumo_types::api::{CreateInstance, Operation};
use kumo_types::storage::{
    AttachVolume, CloneInstance, CloneResult, CopyVolume, CreateSnapshot, CreateVolume,
    ResizeVolume, Snapshot, StoragePool, Volume,
};
use kumo_types::InstanceState;
use serde_json::json;

use crate::common::{Cloud, Hv};
use crate::e2e::{counter, counter_above, wait_http, Ws, BOOTED, SLOW};

pub const MIB: u64 = 1 << 20;

pub async fn create_volume(c: &Client, req: &CreateVolume) -> Result<Volume, ClientError> {
    c.post("/api/v1/volumes", req).await
}

pub async fn volume(c: &Client, id: &str) -> Result<Volume, ClientError> {
    c.get(&format!("/api/v1/volumes/{id}")).await
}

pub async fn volumes(c: &Client) -> Vec<Volume> {
    c.get::<kumo_types::api::Page<Volume>>("/api/v1/volumes")
        .await
        .expect("list volumes")
        .items
}

pub async fn attach(c: &Client, vol: &str, instance: &str) -> Result<Volume, ClientError> {
    c.post(
        &format!("/api/v1/volumes/{vol}/attach"),
        &AttachVolume {
            instance: instance.into(),
        },
    )
    .await
}

pub async fn detach(c: &Client, vol: &str) -> Result<Volume, ClientError> {
    c.post(&format!("/api/v1/volumes/{vol}/detach"), &json!({}))
        .await
}

/// DELETE answered by 204 (an empty body is success).
pub async fn delete(c: &Client, path: &str) -> Result<(), ClientError> {
    match c
        .request::<serde_json::Value>("DELETE", path, None, None)
        .await
    {
        Ok(_) => Ok(()),
        Err(ClientError::Http(m)) if m.contains("EOF while parsing") => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn snapshot(c: &Client, req: &CreateSnapshot) -> Result<Snapshot, ClientError> {
    c.post("/api/v1/snapshots", req).await
}

/// The API error's (status, code), or a panic naming what came instead.
pub fn api_err<T: std::fmt::Debug>(r: Result<T, ClientError>, what: &str) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("{what}: expected an API error, got {other:?}"),
    }
}

/// Wait until the volume satisfies `ok`.
pub async fn wait_volume(c: &Client, id: &str, what: &str, ok: impl Fn(&Volume) -> bool) -> Volume {
    let deadline = Instant::now() + SLOW;
    loop {
        let v = volume(c, id).await.expect("volume");
        if ok(&v) {
            return v;
        }
        assert!(
            v.error.is_none() || v.attach_state.is_some(),
            "{id}: {:?}",
            v.error
        );
        assert!(Instant::now() < deadline, "{id} never got {what}: {v:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn wait_operation(c: &Client, id: &str) -> Operation {
    let deadline = Instant::now() + SLOW;
    loop {
        let op = c.operation(id).await.expect("operation");
        if op.state != "running" {
            return op;
        }
        assert!(Instant::now() < deadline, "operation {id} still running");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A shell command on the guest's serial console; returns what it printed before the end marker.
pub async fn guest_sh(c: &Client, id: &str, cmd: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut ser = Ws::connect(c, &format!("/api/v1/instances/{id}/serial"))
        .await
        .expect("serial websocket");
    // The typed line echoes back too: quoting splits the marker there, not in the output.
    let end = format!("KUMO-END-{n}");
    let line = format!("\n{cmd}; echo KUMO-EN''D-{n}\n");
    ser.send_binary(line.as_bytes()).await;
    let out = ser.read_until(&end, Duration::from_secs(60)).await;
    ser.close().await;
    assert!(out.contains(&end), "{id}: `{cmd}` did not finish: {out:?}");
    let before = &out[..out.rfind(&end).unwrap_or(out.len())];
    // Drop the echoed command line.
    match before.rfind(&format!("KUMO-EN''D-{n}")) {
        Some(i) => before[i..]
            .split_once('\n')
            .map(|x| x.1)
            .unwrap_or("")
            .to_string(),
        None => before.to_string(),
    }
}

/// The guest's device (`vdb` ...) of a volume, found by its serial once the guest sees it.
pub async fn guest_dev(c: &Client, vm: &str, volume: &str) -> String {
    let serial = kumo_types::storage::volume_serial(volume);
    let out = guest_until(
        c,
        vm,
        "for s in /sys/block/vd*/serial; do echo DEV ${s#/sys/block/} $(cat $s); done",
        |o| o.contains(&serial),
    )
    .await;
    out.lines()
        .find(|l| l.contains(&serial) && l.starts_with("DEV "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.split('/').next())
        .unwrap_or_else(|| panic!("no device with serial {serial}: {out:?}"))
        .to_string()
}

/// Poll a guest command until its output satisfies `ok`.
pub async fn guest_until(c: &Client, id: &str, cmd: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SLOW;
    loop {
        let out = guest_sh(c, id, cmd).await;
        if ok(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: `{cmd}` never gave what was wanted; last: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn boot(cloud: &Cloud, req: CreateInstance) -> kumo_types::api::Instance {
    boot_as(cloud, &cloud.client, req).await
}

/// Boot an instance as `client`'s user (the fixture's admin client watches it).
pub async fn boot_as(
    cloud: &Cloud,
    client: &Client,
    req: CreateInstance,
) -> kumo_types::api::Instance {
    let i = client
        .create_instance(&req, None)
        .await
        .unwrap_or_else(|e| panic!("create {}: {e}", req.name));
    let i = cloud.wait_state(&i.id, InstanceState::Running, SLOW).await;
    cloud.wait_console(&i.id, BOOTED, SLOW).await;
    i
}

pub fn vm(name: &str) -> CreateInstance {
    vm_of(name, "demo")
}

pub fn vm_of(name: &str, image: &str) -> CreateInstance {
    CreateInstance {
        name: name.into(),
        image: image.into(),
        instance_type: Some("t1.micro".into()),
        ..Default::default()
    }
}

/// The counter lines of a disk image's ext4 filesystem (file `/counter`), read on the host
/// with e2fsprogs from a raw copy of the image.
pub fn disk_counter(image: &Path, scratch: &Path) -> Vec<u64> {
    let raw = scratch.join("counter-check.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert {}", image.display());
    // Crash-consistent: replay the journal as the guest's kernel would when mounting it.
    let st = std::process::Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&raw)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("e2fsck (e2fsprogs)");
    assert!(st.success(), "e2fsck journal replay: {st}");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /counter"])
        .arg(&raw)
        .output()
        .expect("debugfs (e2fsprogs)");
    let _ = std::fs::remove_file(&raw);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The frozen layer of a snapshot in an agent's pool.
pub fn snapshot_layer(pool: &Path, snap: &str) -> std::path::PathBuf {
    let pin: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pool.join("snapshots").join(format!("{snap}.json"))).expect("pin file"),
    )
    .expect("pin json");
    let layer = pin["layer"].as_str().expect("layer").to_string();
    let p = std::path::PathBuf::from(&layer);
    if p.is_absolute() {
        p
    } else {
        pool.join("layers").join(format!("{layer}.qcow2"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volumes_snapshots_and_clones() {
    let cloud = Cloud::start(Hv::Qemu).await;
    cloud.demo_image().await;
    let c = &cloud.client;
    let pool_dir = cloud.agents[0].data_dir.join("pool");
    let t0 = Instant::now();
    let step = |s: &str| eprintln!("storage {:>6.1?} {s}", t0.elapsed());

    // The host's pool is reported with its capacity.
    let pools: Vec<StoragePool> = c
        .get::<kumo_types::api::Page<StoragePool>>("/api/v1/storage-pools")
        .await
        .expect("pools")
        .items;
    assert_eq!(pools.len(), 1, "{pools:?}");
    assert_eq!(
        (pools[0].name.as_str(), pools[0].kind.as_str()),
        ("local", "dir")
    );
    assert!(pools[0].total_bytes > 0 && pools[0].free_bytes <= pools[0].total_bytes);

    step("boot a and b");
    let (a, b) = tokio::join!(boot(&cloud, vm("a")), boot(&cloud, vm("b")));
    let a_ip = a.private_ip.clone().expect("a ip");
    let b_ip = b.private_ip.clone().expect("b ip");
    wait_http(&cloud, &a_ip, "/counter", SLOW).await;
    wait_http(&cloud, &b_ip, "/counter", SLOW).await;
    let a_pid = cloud.qemu_pids_for(&a.id);

    step("bad volume sizes change nothing");
    for (size, status, code) in [
        (0, 400, "InvalidParameter"),
        (1000, 400, "InvalidParameter"),
        (65 << 40, 400, "InvalidParameter"),
        (60 << 40, 507, "InsufficientStorage"),
    ] {
        let r = create_volume(
            c,
            &CreateVolume {
                size_bytes: Some(size),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            api_err(r, &format!("size {size}")),
            (status, code.to_string()),
            "size {size}"
        );
    }
    assert!(volumes(c).await.is_empty(), "no volume was made");
    let disks_dir = pool_dir.join("disks");
    let manifests = || -> Vec<String> {
        std::fs::read_dir(&disks_dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("vol-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(manifests().is_empty(), "{:?}", manifests());

    step("thin provisioning: the operator's overcommit decides what fits");
    let total = pools[0].total_bytes;
    let big = (total + total / 2) / 512 * 512;
    let r = create_volume(
        c,
        &CreateVolume {
            size_bytes: Some(big),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(api_err(r, "1.5x the pool at overcommit 1").0, 507);
    let set = |o: f64| async move {
        let body = json!({ "overcommit": o });
        c.request::<StoragePool>("PATCH", "/api/v1/storage-pools/local", Some(&body), None)
            .await
    };
    assert_eq!(api_err(set(0.5).await, "overcommit below 1").0, 400);
    let p = set(2.0).await.expect("set overcommit");
    assert_eq!(p.limit_bytes, (total as f64 * 2.0) as u64);
    let thin = create_volume(
        c,
        &CreateVolume {
            size_bytes: Some(big),
            ..Default::default()
        },
    )
    .await
    .expect("thin: fits at overcommit 2");
    let p: StoragePool = c.get("/api/v1/storage-pools/local").await.expect("pool");
    assert!(p.provisioned_bytes >= big, "{p:?}");
    delete(c, &format!("/api/v1/volumes/{}", thin.id))
        .await
        .expect("delete thin volume");
    set(1.0).await.expect("back to 1");

    step("create and hot-plug a volume into a");
    let v1 = create_volume(
        c,
        &CreateVolume {
            name: Some("data".into()),
            size_bytes: Some(64 * MIB),
            instance: Some(a.id.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("create volume");
    assert_eq!((v1.size_bytes, v1.state.as_str()), (64 * MIB, "available"));
    assert_eq!(
        v1.serial,
        v1.id.replace('-', ""),
        "the id without its dash, like EBS on Nitro"
    );
    assert_eq!(v1.serial.len(), 20);
    attach(c, &v1.id, &a.id).await.expect("attach");
    wait_volume(c, &v1.id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    let serial20 = v1.serial.clone();
    let seen = guest_until(
        c,
        &a.id,
        "cat /sys/block/vdb/size /sys/block/vdb/serial",
        |o| o.contains(&serial20),
    )
    .await;
    assert!(
        seen.contains(&(64 * MIB / 512).to_string()),
        "the guest sees exactly 64 MiB: {seen:?}"
    );
    let mark = format!("kumo-data-{}", v1.id);
    guest_sh(
        c,
        &a.id,
        &format!("printf {mark} | dd of=/dev/vdb conv=fsync 2>/dev/null"),
    )
    .await;

    step("a volume in use: second attach and delete refused");
    let r = attach(c, &v1.id, &b.id).await;
    assert_eq!(api_err(r, "attach to a second VM").0, 409);
    let r = delete(c, &format!("/api/v1/volumes/{}", v1.id)).await;
    assert_eq!(api_err(r, "delete in use").0, 409);

    step("grow online");
    let r: Result<Volume, _> = c
        .post(
            &format!("/api/v1/volumes/{}/resize", v1.id),
            &ResizeVolume {
                size_bytes: 32 * MIB,
            },
        )
        .await;
    assert_eq!(api_err(r, "resize smaller").0, 400);
    let grown: Volume = c
        .post(
            &format!("/api/v1/volumes/{}/resize", v1.id),
            &ResizeVolume {
                size_bytes: 128 * MIB,
            },
        )
        .await
        .expect("grow");
    assert_eq!(grown.size_bytes, 128 * MIB);
    guest_until(c, &a.id, "cat /sys/block/vdb/size", |o| {
        o.contains(&(128 * MIB / 512).to_string())
    })
    .await;

    step("detach from a, attach to b: the data is there");
    detach(c, &v1.id).await.expect("detach");
    wait_volume(c, &v1.id, "available", |v| v.state == "available").await;
    guest_until(c, &a.id, "ls /sys/block", |o| !o.contains("vdb")).await;
    attach(c, &v1.id, &b.id).await.expect("attach to b");
    wait_volume(c, &v1.id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    let got = guest_until(
        c,
        &b.id,
        &format!(
            "dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c {}",
            mark.len()
        ),
        |o| o.contains(&mark),
    )
    .await;
    assert!(got.contains(&mark), "{got:?}");

    step("live snapshot of a while it writes its counter");
    let before = counter(&cloud, &a_ip).await;
    let snap = snapshot(
        c,
        &CreateSnapshot {
            instance: Some(a.id.clone()),
            description: Some("before the mistake".into()),
            ..Default::default()
        },
    )
    .await
    .expect("live snapshot");
    let after = counter(&cloud, &a_ip).await;
    assert_eq!(snap.state, "completed", "{snap:?}");
    let pause = snap
        .io_pause_ms
        .expect("a live snapshot reports the I/O pause");
    assert!(pause > 0.0 && pause < 5000.0, "pause {pause} ms");
    let frozen = disk_counter(&snapshot_layer(&pool_dir, &snap.id), cloud.dir.path());
    let n_s = *frozen.last().expect("the snapshot holds counter lines");
    assert!(
        frozen.iter().copied().eq(1..=n_s),
        "the snapshot's counter is 1..{n_s} without a gap"
    );
    assert!(
        before <= n_s && n_s <= after + 1,
        "the snapshot stops where it was taken: {before} <= {n_s} <= {after}+1"
    );

    step("boot the snapshot next to the original");
    let r = c
        .create_instance(
            &CreateInstance {
                name: "bad".into(),
                image: "demo".into(),
                snapshot: Some(snap.id.clone()),
                ..Default::default()
            },
            None,
        )
        .await;
    assert_eq!(api_err(r, "image and snapshot").0, 400);
    let restored = boot(
        &cloud,
        CreateInstance {
            name: "restored".into(),
            snapshot: Some(snap.id.clone()),
            instance_type: Some("t1.micro".into()),
            ..Default::default()
        },
    )
    .await;
    let r_ip = restored.private_ip.clone().expect("restored ip");
    let first = counter_above(&cloud, &r_ip, 0).await;
    let a_now = counter(&cloud, &a_ip).await;
    assert!(
        n_s < first && first < a_now,
        "the restored VM continues from the snapshot ({n_s}), behind the original ({a_now}): {first}"
    );
    assert_eq!(cloud.qemu_pids_for(&a.id), a_pid, "a never stopped");
    // An image made from the snapshot boots like it too.
    let made: kumo_cli::ImageWithOperation = c
        .post(
            &format!("/api/v1/snapshots/{}/image", snap.id),
            &json!({ "name": "before-the-mistake" }),
        )
        .await
        .expect("image from snapshot");
    assert_eq!(
        wait_operation(c, &made.operation.id).await.state,
        "succeeded"
    );
    let from_image = boot(&cloud, vm_of("from-image", "before-the-mistake")).await;
    let fi_first = counter_above(&cloud, from_image.private_ip.as_deref().expect("ip"), 0).await;
    assert!(
        fi_first > n_s,
        "the image holds the snapshot's data: {fi_first} > {n_s}"
    );
    c.terminate(&from_image.id).await.expect("terminate");
    let r = delete(c, &format!("/api/v1/snapshots/{}", snap.id)).await;
    assert_eq!(
        api_err(r, "delete a snapshot an instance is made from").0,
        409
    );

    step("hot clone a");
    let cloned: CloneResult = c
        .post(
            &format!("/api/v1/instances/{}/clone", a.id),
            &CloneInstance {
                name: "a-clone".into(),
                ..Default::default()
            },
        )
        .await
        .expect("clone");
    let d = cloud
        .wait_state(&cloned.instance.id, InstanceState::Running, SLOW)
        .await;
    assert!(
        cloned.snapshot.io_pause_ms.is_some(),
        "the clone's snapshot was live"
    );
    assert_ne!(d.id, a.id);
    assert_ne!(d.mac, a.mac);
    assert_ne!(d.private_ip, a.private_ip);
    let d_ip = d.private_ip.clone().expect("clone ip");
    let page = wait_http(&cloud, &d_ip, "/", SLOW).await;
    assert!(page.contains(&format!("instance-id: {}", d.id)), "{page}");
    assert!(counter(&cloud, &a_ip).await > a_now, "a keeps running");
    assert_eq!(cloud.qemu_pids_for(&a.id), a_pid, "a never stopped");

    step("volume snapshot, a volume from it, shrink by copy");
    let vsnap = snapshot(
        c,
        &CreateSnapshot {
            volume: Some(v1.id.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("volume snapshot");
    assert!(
        vsnap.io_pause_ms.is_some(),
        "v1 is attached to running b: live"
    );
    let v2 = create_volume(
        c,
        &CreateVolume {
            snapshot: Some(vsnap.id.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("volume from snapshot");
    assert_eq!(v2.size_bytes, 128 * MIB);
    attach(c, &v2.id, &a.id).await.expect("attach v2 to a");
    wait_volume(c, &v2.id, "attached", |v| {
        v.attach_state.as_deref() == Some("attached")
    })
    .await;
    guest_until(
        c,
        &a.id,
        &format!(
            "dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c {}",
            mark.len()
        ),
        |o| o.contains(&mark),
    )
    .await;
    // Data far out on v1, then v1 detached for a consistent copy.
    guest_sh(
        c,
        &b.id,
        "dd if=/dev/urandom of=/dev/vdb bs=1M seek=100 count=1 conv=fsync 2>/dev/null",
    )
    .await;
    detach(c, &v1.id).await.expect("detach v1");
    wait_volume(c, &v1.id, "available", |v| v.state == "available").await;
    #[derive(serde::Deserialize, Debug)]
    struct Copied {
        volume: Volume,
        operation: Operation,
    }
    let too_small: Copied = c
        .post(
            &format!("/api/v1/volumes/{}/copy", v1.id),
            &CopyVolume {
                size_bytes: 64 * MIB,
                name: None,
            },
        )
        .await
        .expect("copy accepted");
    let op = wait_operation(c, &too_small.operation.id).await;
    assert_eq!(op.state, "failed", "{op:?}");
    assert!(
        op.error.as_deref().unwrap_or("").contains("beyond"),
        "the refusal says why: {op:?}"
    );
    assert!(
        volume(c, &too_small.volume.id).await.is_err(),
        "the failed copy's volume is gone"
    );
    let fits: Copied = c
        .post(
            &format!("/api/v1/volumes/{}/copy", v1.id),
            &CopyVolume {
                size_bytes: 101 * MIB + 512,
                name: Some("smaller".into()),
            },
        )
        .await
        .expect("copy accepted");
    let op = wait_operation(c, &fits.operation.id).await;
    assert_eq!(op.state, "succeeded", "{op:?}");
    let v3 = volume(c, &fits.volume.id).await.expect("copy");
    assert_eq!(
        (v3.size_bytes, v3.state.as_str()),
        (101 * MIB + 512, "available")
    );

    step("export a volume, a snapshot and an image, and download them");
    assert_eq!(
        api_err(
            c.export_disk("volumes", &v3.id, "exe").await,
            "unknown format"
        )
        .0,
        400
    );
    let ex = c
        .export_disk("volumes", &v3.id, "raw")
        .await
        .expect("export");
    assert_eq!(wait_operation(c, &ex.operation.id).await.state, "succeeded");
    let out = cloud.dir.path().join("v3.raw");
    let n = c
        .download(&format!("/api/v1/exports/{}", ex.file), &out)
        .await
        .expect("download");
    assert_eq!(n, v3.size_bytes, "raw export: exactly the volume's size");
    let head = std::fs::read(&out).expect("read export");
    assert!(
        head.starts_with(mark.as_bytes()),
        "the export holds the volume's data"
    );
    let _ = std::fs::remove_file(&out);
    let ex = c
        .export_disk("snapshots", &vsnap.id, "qcow2")
        .await
        .expect("export snapshot");
    assert_eq!(wait_operation(c, &ex.operation.id).await.state, "succeeded");
    let out = cloud.dir.path().join("snap.qcow2");
    c.download(&format!("/api/v1/exports/{}", ex.file), &out)
        .await
        .expect("download snapshot");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&out)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info json");
    assert_eq!(info["virtual-size"], json!(128 * MIB));
    assert!(
        info.get("backing-filename").is_none(),
        "an export stands alone"
    );
    let _ = std::fs::remove_file(&out);
    let out = cloud.dir.path().join("demo.qcow2");
    c.download("/api/v1/images/demo/file", &out)
        .await
        .expect("download image");
    assert!(std::fs::metadata(&out).expect("image file").len() > 0);
    let _ = std::fs::remove_file(&out);

    step("another project sees and touches none of it");
    let other = crate::common::project_member(&cloud, "storage-other").await;
    assert_eq!(
        api_err(other.export_disk("volumes", &v1.id, "raw").await, "export").0,
        404
    );
    let stolen = cloud.dir.path().join("stolen.raw");
    let r = other
        .download(&format!("/api/v1/exports/{}.raw", v3.id), &stolen)
        .await;
    assert_eq!(api_err(r, "download another project's export").0, 404);
    assert!(!stolen.exists());
    let r = other
        .request::<StoragePool>(
            "PATCH",
            "/api/v1/storage-pools/local",
            Some(&json!({ "overcommit": 20.0 })),
            None,
        )
        .await;
    assert_eq!(api_err(r, "a member changing a pool").0, 403);
    assert!(volumes(&other).await.is_empty());
    let seen: Vec<StoragePool> = other
        .get::<kumo_types::api::Page<StoragePool>>("/api/v1/storage-pools")
        .await
        .expect("pools")
        .items;
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].hosts.is_empty() && seen[0].total_bytes > 0,
        "a member sees the pool's room, not its hosts: {seen:?}"
    );
    let snaps: Vec<Snapshot> = other
        .get::<kumo_types::api::Page<Snapshot>>("/api/v1/snapshots")
        .await
        .expect("list")
        .items;
    assert!(snaps.is_empty(), "{snaps:?}");
    assert_eq!(api_err(volume(&other, &v1.id).await, "show").0, 404);
    assert_eq!(
        api_err(
            delete(&other, &format!("/api/v1/volumes/{}", v1.id)).await,
            "delete"
        )
        .0,
        404
    );
    assert_eq!(
        api_err(
            snapshot(
                &other,
                &CreateSnapshot {
                    volume: Some(v1.id.clone()),
                    ..Default::default()
                }
            )
            .await,
            "snapshot"
        )
        .0,
        404
    );
    assert_eq!(
        api_err(
            delete(&other, &format!("/api/v1/snapshots/{}", snap.id)).await,
            "delete snap"
        )
        .0,
        404
    );
    let theirs = boot_as(&cloud, &other, {
        let mut v = vm("theirs");
        v.instance_type = Some("t1.nano".into());
        v
    })
    .await;
    assert_eq!(
        api_err(
            attach(&other, &v1.id, &theirs.id).await,
            "attach another's volume"
        )
        .0,
        404
    );
    // The fixture's client is an administrator: it sees both, and still may not mix them.
    assert_eq!(
        api_err(
            attach(c, &v1.id, &theirs.id).await,
            "attach to another's instance"
        )
        .0,
        400
    );

    step("clean up: nothing left in the pool");
    for i in [&a.id, &b.id, &restored.id, &d.id, &theirs.id] {
        cloud.client.terminate(i).await.expect("terminate");
    }
    for i in [&a.id, &b.id, &restored.id, &d.id, &theirs.id] {
        cloud.wait_state(i, InstanceState::Terminated, SLOW).await;
    }
    for v in [&v1.id, &v2.id, &v3.id] {
        wait_volume(c, v, "available", |v| v.state == "available").await;
        delete(c, &format!("/api/v1/volumes/{v}"))
            .await
            .expect("delete volume");
    }
    for s in [&vsnap.id, &snap.id, &cloned.snapshot.id] {
        delete(c, &format!("/api/v1/snapshots/{s}"))
            .await
            .expect("delete snapshot");
    }
    let layers: Vec<String> = std::fs::read_dir(pool_dir.join("layers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(layers.is_empty(), "every layer collected: {layers:?}");
    assert!(manifests().is_empty(), "{:?}", manifests());
}
