//! Disks of running VMs: hot-plug, unplug, online resize and live external snapshots, all
//! through QMP (QEMU 7.2, `-blockdev` nodes and `virtio-blk-pci` devices).
//!
//! Naming. A disk whose device has qdev id `D` gets a format node named `D` (and a file node
//! `D-file`), at start-up and when hot-plugged; disks started without a device id keep
//! `virtio-disk<i>` / `disk<i>`. Device ids of the form `disk<N>` are reserved so the two schemes
//! never collide. A live snapshot puts a new active node `D.<n>` on top: QEMU creates it (it is
//! not owned by the monitor) and frees it shortly after the device goes, which leaves the base
//! node (owned by the monitor since `-blockdev`/`blockdev-add`) for `blockdev-del`. That is why a
//! detach whose device is already gone can still find what to delete: the base node's name
//! follows from the device id, while the current node of a live device is always looked up
//! with `query-block`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::qmp::{Qmp, QmpError};
use crate::{AttachedDisk, DiskSpec, HypervisorError, QemuDriver, SnapshotReport, SnapshotTarget};

/// QEMU node names are at most 31 bytes; a device id also names its file node `<id>-file`.
const MAX_NODE_NAME: usize = 31;
const MAX_DEVICE_ID: usize = MAX_NODE_NAME - "-file".len();
const PERIPHERAL: &str = "/machine/peripheral/";
const VIRTIO_BLK: &str = "child<virtio-blk-pci>";
/// How often a detach re-checks the device besides waiting for `DEVICE_DELETED` (events can
/// be missed when the broadcast channel lags).
const POLL: Duration = Duration::from_millis(200);
/// How long a detach waits for QEMU to free a removed device's nodes (see `delete_base_nodes`).
const NODE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// The snapshot transaction drains guest I/O; under heavy load that can take a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// qdev id of disk `index` of a spec.
pub(crate) fn device_id(index: usize, disk: &DiskSpec) -> String {
    disk.device_id
        .clone()
        .unwrap_or_else(|| format!("virtio-disk{index}"))
}

/// Name of the format node QEMU opens disk `index` of a spec as.
pub(crate) fn node_name(index: usize, disk: &DiskSpec) -> String {
    disk.device_id
        .clone()
        .unwrap_or_else(|| format!("disk{index}"))
}

/// The monitor-owned node(s) a device may have been started or hot-plugged with.
fn base_nodes(device_id: &str) -> Vec<String> {
    let mut nodes = vec![device_id.to_string()];
    if let Some(n) = device_id.strip_prefix("virtio-disk") {
        if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) {
            nodes.push(format!("disk{n}"));
        }
    }
    nodes
}

/// A device id usable as qdev id and node name: a letter, then letters, digits, `-`, `_`, `.`;
/// at most 26 characters; not `disk<N>` (reserved for disks without a device id).
pub(crate) fn validate_device_id(id: &str) -> Result<(), HypervisorError> {
    let mut chars = id.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && id.len() <= MAX_DEVICE_ID;
    let reserved = id
        .strip_prefix("disk")
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    if well_formed && !reserved {
        Ok(())
    } else {
        Err(HypervisorError::InvalidSpec(format!(
            "device id {id:?} must be 1-{MAX_DEVICE_ID} characters of letters, digits, '-', '_' \
             or '.', start with a letter and not be disk<N>"
        )))
    }
}

/// Checks of one disk that need nothing but the spec.
pub(crate) fn validate_disk(what: &str, d: &DiskSpec) -> Result<(), HypervisorError> {
    let invalid = |m: String| Err(HypervisorError::InvalidSpec(m));
    if d.format != "qcow2" && d.format != "raw" {
        return invalid(format!(
            "{what}: format must be qcow2 or raw, got {:?}",
            d.format
        ));
    }
    if d.path.as_os_str().is_empty() || d.path.to_str().is_none() {
        return invalid(format!("{what}: path must be non-empty UTF-8"));
    }
    if let Some(s) = &d.serial {
        if s.is_empty()
            || s.len() > 20
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid(format!(
                "{what}: serial {s:?} must be 1-20 characters of letters, digits, '-', '_' or '.'"
            ));
        }
    }
    if let Some(id) = &d.device_id {
        validate_device_id(id).map_err(|e| HypervisorError::InvalidSpec(format!("{what}: {e}")))?;
    }
    Ok(())
}

/// Every disk of a spec, and their device ids unique (so are their node names then).
pub(crate) fn validate_disks(disks: &[DiskSpec]) -> Result<(), HypervisorError> {
    let mut seen = HashSet::new();
    for (i, d) in disks.iter().enumerate() {
        validate_disk(&format!("disk {i}"), d)?;
        let dev = device_id(i, d);
        if !seen.insert(dev.clone()) {
            return Err(HypervisorError::InvalidSpec(format!(
                "disk {i}: device id {dev:?} is used twice"
            )));
        }
    }
    Ok(())
}

/// A disk to hot-plug: valid, with a device id and an absolute path (QEMU runs in the VM's run
/// directory, relative paths would be resolved there). Returns the device id.
pub(crate) fn validate_attach(disk: &DiskSpec) -> Result<&str, HypervisorError> {
    validate_disk("disk", disk)?;
    let Some(dev) = disk.device_id.as_deref() else {
        return Err(HypervisorError::InvalidSpec(
            "a hot-plugged disk needs a device id".into(),
        ));
    };
    if !disk.path.is_absolute() {
        return Err(HypervisorError::InvalidSpec(format!(
            "disk {dev}: path {} must be absolute",
            disk.path.display()
        )));
    }
    Ok(dev)
}

/// A new size for a disk: a whole number of 512-byte sectors (qcow2 refuses anything else).
pub(crate) fn validate_size(size_bytes: u64) -> Result<(), HypervisorError> {
    if size_bytes == 0 || size_bytes % 512 != 0 {
        return Err(HypervisorError::InvalidSpec(format!(
            "disk size {size_bytes} must be a positive multiple of 512 bytes"
        )));
    }
    Ok(())
}

/// Snapshot targets: at least one, device ids valid and distinct, overlays absolute UTF-8 paths,
/// distinct, and not existing yet (QEMU would overwrite an existing file).
pub(crate) fn validate_targets(targets: &[SnapshotTarget]) -> Result<(), HypervisorError> {
    let invalid = |m: String| Err(HypervisorError::InvalidSpec(m));
    if targets.is_empty() {
        return invalid("a snapshot needs at least one disk".into());
    }
    let mut devices = HashSet::new();
    let mut overlays = HashSet::new();
    for t in targets {
        validate_device_id(&t.device_id)?;
        if !devices.insert(t.device_id.as_str()) {
            return invalid(format!("disk {} is listed twice", t.device_id));
        }
        if !t.overlay.is_absolute() || t.overlay.to_str().is_none() {
            return invalid(format!(
                "overlay {} must be an absolute UTF-8 path",
                t.overlay.display()
            ));
        }
        if !overlays.insert(t.overlay.as_path()) {
            return invalid(format!("overlay {} is listed twice", t.overlay.display()));
        }
        if std::fs::symlink_metadata(&t.overlay).is_ok() {
            return invalid(format!("overlay {} already exists", t.overlay.display()));
        }
    }
    Ok(())
}

/// What the simulator reports for a disk: the virtual size from a qcow2 header, else the
/// file's length (0 if it cannot be read).
pub(crate) fn sim_disk(device_id: String, node: String, disk: &DiskSpec) -> AttachedDisk {
    AttachedDisk {
        device_id,
        node,
        file: disk.path.clone(),
        format: disk.format.clone(),
        size_bytes: virtual_size(&disk.path),
        read_only: disk.read_only,
        serial: disk.serial.clone(),
    }
}

fn virtual_size(path: &Path) -> u64 {
    use std::io::Read;
    let mut header = [0u8; 32];
    let qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok()
        && header[..4] == *b"QFI\xfb";
    if qcow2 {
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[24..32]);
        u64::from_be_bytes(size)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// QMP errors of a VM: a closed connection means QEMU is gone.
fn qmp_err(id: &str) -> impl Fn(QmpError) -> HypervisorError + '_ {
    move |e| match e {
        QmpError::Closed => HypervisorError::NotRunning(id.to_string()),
        e => HypervisorError::Qmp(e),
    }
}

/// The device id in a `query-block` qdev path: `/machine/peripheral/<id>` or a child of it
/// (`…/<id>/virtio-backend` with `-blockdev`).
fn qdev_device_id(qdev: &str) -> Option<&str> {
    let rest = qdev.strip_prefix(PERIPHERAL)?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// The user-created devices of a VM: id → QOM type (`child<virtio-blk-pci>`).
async fn peripherals(q: &Qmp) -> Result<HashMap<String, String>, QmpError> {
    let v = q
        .execute(
            "qom-list",
            json!({ "path": PERIPHERAL.trim_end_matches('/') }),
        )
        .await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let ty = p["type"].as_str()?;
            ty.starts_with("child<").then(|| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    ty.to_string(),
                )
            })
        })
        .collect())
}

/// Every block device of the VM with its current active node (serial not filled in).
async fn block_devices(q: &Qmp) -> Result<Vec<AttachedDisk>, QmpError> {
    let v = q.execute("query-block", Value::Null).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let device_id = qdev_device_id(b["qdev"].as_str()?)?.to_string();
            let ins = b.get("inserted")?;
            Some(AttachedDisk {
                device_id,
                node: ins["node-name"].as_str()?.to_string(),
                file: ins["file"].as_str()?.into(),
                format: ins["drv"].as_str().unwrap_or_default().to_string(),
                size_bytes: ins["image"]["virtual-size"].as_u64().unwrap_or(0),
                read_only: ins["ro"].as_bool().unwrap_or(false),
                serial: None,
            })
        })
        .collect())
}

async fn find_device(q: &Qmp, id: &str, device: &str) -> Result<AttachedDisk, HypervisorError> {
    block_devices(q)
        .await
        .map_err(qmp_err(id))?
        .into_iter()
        .find(|d| d.device_id == device)
        .ok_or_else(|| HypervisorError::InvalidSpec(format!("VM {id} has no disk {device}")))
}

/// Names of every named node (`flat`: without the nested backing-chain details).
async fn node_names(q: &Qmp) -> Result<HashSet<String>, QmpError> {
    let v = q
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str().map(str::to_string))
        .collect())
}

async fn serial_of(q: &Qmp, device: &str) -> Result<Option<String>, QmpError> {
    let v = q
        .execute(
            "qom-get",
            json!({ "path": format!("{PERIPHERAL}{device}"), "property": "serial" }),
        )
        .await?;
    Ok(v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
}

/// A node name not in `taken`, derived from the device id: `<device>.<n>`.
fn fresh_node_name(device: &str, taken: &mut HashSet<String>) -> String {
    let mut n = 0u64;
    loop {
        n += 1;
        let suffix = format!(".{n}");
        let keep = MAX_NODE_NAME.saturating_sub(suffix.len()).min(device.len());
        let name = format!("{}{suffix}", &device[..keep]);
        if taken.insert(name.clone()) {
            return name;
        }
    }
}

pub(crate) async fn attach_disk(
    drv: &QemuDriver,
    id: &str,
    disk: &DiskSpec,
) -> Result<(), HypervisorError> {
    let dev = validate_attach(disk)?;
    let q = drv.qmp(id).await?;
    let err = qmp_err(id);
    let devices = block_devices(&q).await.map_err(&err)?;
    if let Some(cur) = devices.iter().find(|d| d.device_id == dev) {
        if same_file(&cur.file, &disk.path) {
            return Ok(());
        }
        return Err(HypervisorError::InvalidSpec(format!(
            "VM {id} already has disk {dev} with file {}",
            cur.file.display()
        )));
    }
    if node_names(&q).await.map_err(&err)?.contains(dev) {
        return Err(HypervisorError::InvalidSpec(format!(
            "VM {id} still has block node {dev} of an unfinished detach: detach {dev} first"
        )));
    }
    let filename = disk.path.to_string_lossy();
    let node = json!({
        "driver": disk.format,
        "node-name": dev,
        "read-only": disk.read_only,
        "discard": "unmap",
        "file": {
            "driver": "file",
            "node-name": format!("{dev}-file"),
            "filename": filename,
            "read-only": disk.read_only,
            "discard": "unmap",
        }
    });
    q.execute("blockdev-add", node).await.map_err(&err)?;
    let mut device = json!({ "driver": "virtio-blk-pci", "id": dev, "drive": dev });
    if let Some(serial) = &disk.serial {
        device["serial"] = json!(serial);
    }
    if let Err(e) = q.execute("device_add", device).await {
        // Leave no node behind: the caller sees a clean failure.
        if let Err(del) = q.execute("blockdev-del", json!({ "node-name": dev })).await {
            tracing::warn!(%id, device = %dev, error = %del, "cannot remove node of failed hot-plug");
        }
        return Err(err(e));
    }
    tracing::info!(%id, device = %dev, file = %filename, "disk attached");
    Ok(())
}

pub(crate) async fn detach_disk(
    drv: &QemuDriver,
    id: &str,
    dev: &str,
    timeout: Duration,
) -> Result<(), HypervisorError> {
    validate_device_id(dev)?;
    let q = drv.qmp(id).await?;
    let err = qmp_err(id);
    // Subscribe before device_del so a quick DEVICE_DELETED is not missed.
    let mut events = q.events();
    if device_present(&q, id, dev).await? {
        let is_disk = block_devices(&q)
            .await
            .map_err(&err)?
            .iter()
            .any(|d| d.device_id == dev);
        if !is_disk {
            return Err(HypervisorError::InvalidSpec(format!(
                "device {dev} of VM {id} is not a disk"
            )));
        }
        // Repeating device_del while an unplug is pending is harmless (the guest is asked again).
        match q.execute("device_del", json!({ "id": dev })).await {
            Ok(_) => {}
            Err(e) if e.class() == Some("DeviceNotFound") => {}
            Err(e) => return Err(err(e)),
        }
        wait_deleted(&q, &mut events, id, dev, timeout).await?;
    }
    delete_base_nodes(&q, id, dev).await?;
    tracing::info!(%id, device = %dev, "disk detached");
    Ok(())
}

/// Delete the monitor-owned node(s) of a device that is gone. QEMU frees the device's
/// BlockBackend, and with it the snapshot overlays above the base node, a little after the
/// device itself (40-120 ms measured under TCG); until then blockdev-del fails ("in use",
/// "busy"), so it is retried for a while.
async fn delete_base_nodes(q: &Qmp, id: &str, dev: &str) -> Result<(), HypervisorError> {
    let err = qmp_err(id);
    let deadline = Instant::now() + NODE_RELEASE_TIMEOUT;
    loop {
        let nodes = node_names(q).await.map_err(&err)?;
        let mut busy = None;
        for node in base_nodes(dev).into_iter().filter(|n| nodes.contains(n)) {
            match q
                .execute("blockdev-del", json!({ "node-name": node }))
                .await
            {
                Ok(_) => {}
                Err(e @ QmpError::Command { .. }) => busy = Some(e),
                Err(e) => return Err(err(e)),
            }
        }
        match busy {
            None => return Ok(()),
            Some(e) if Instant::now() >= deadline => return Err(err(e)),
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn device_present(q: &Qmp, id: &str, dev: &str) -> Result<bool, HypervisorError> {
    Ok(peripherals(q).await.map_err(qmp_err(id))?.contains_key(dev))
}

/// Wait for the guest to release the device: its `DEVICE_DELETED` event, or its absence.
async fn wait_deleted(
    q: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>,
    id: &str,
    dev: &str,
    timeout: Duration,
) -> Result<(), HypervisorError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match tokio::time::timeout((deadline - now).min(POLL), events.recv()).await {
            Ok(Ok(ev)) if ev.event == "DEVICE_DELETED" && ev.data["device"] == dev => return Ok(()),
            Ok(Ok(_)) => continue,
            // Lagged, or our poll interval passed: ask QEMU.
            Ok(Err(RecvError::Lagged(_))) | Err(_) => {}
            Ok(Err(RecvError::Closed)) => return Err(HypervisorError::NotRunning(id.into())),
        }
        if !device_present(q, id, dev).await? {
            return Ok(());
        }
    }
    if !device_present(q, id, dev).await? {
        return Ok(());
    }
    Err(HypervisorError::Timeout(format!(
        "the guest of VM {id} did not release disk {dev} within {timeout:?}; \
         the unplug stays requested, detach again to finish it"
    )))
}

pub(crate) async fn attached_disks(
    drv: &QemuDriver,
    id: &str,
) -> Result<Vec<AttachedDisk>, HypervisorError> {
    let q = drv.qmp(id).await?;
    let err = qmp_err(id);
    let types = peripherals(&q).await.map_err(&err)?;
    let mut out = Vec::new();
    for mut d in block_devices(&q).await.map_err(&err)? {
        if types.get(&d.device_id).map(String::as_str) == Some(VIRTIO_BLK) {
            d.serial = serial_of(&q, &d.device_id).await.map_err(&err)?;
            out.push(d);
        }
    }
    Ok(out)
}

pub(crate) async fn resize_disk(
    drv: &QemuDriver,
    id: &str,
    dev: &str,
    size_bytes: u64,
) -> Result<(), HypervisorError> {
    validate_device_id(dev)?;
    validate_size(size_bytes)?;
    let q = drv.qmp(id).await?;
    let cur = find_device(&q, id, dev).await?;
    if size_bytes < cur.size_bytes {
        return Err(HypervisorError::InvalidSpec(format!(
            "disk {dev} of VM {id} is {} bytes: it cannot shrink to {size_bytes}",
            cur.size_bytes
        )));
    }
    if size_bytes == cur.size_bytes {
        return Ok(());
    }
    q.execute(
        "block_resize",
        json!({ "node-name": cur.node, "size": size_bytes }),
    )
    .await
    .map_err(qmp_err(id))?;
    tracing::info!(%id, device = %dev, from = cur.size_bytes, to = size_bytes, "disk grown");
    Ok(())
}

pub(crate) async fn snapshot_disks(
    drv: &QemuDriver,
    id: &str,
    targets: &[SnapshotTarget],
) -> Result<SnapshotReport, HypervisorError> {
    validate_targets(targets)?;
    let q = drv.qmp(id).await?;
    let err = qmp_err(id);
    let devices = block_devices(&q).await.map_err(&err)?;
    let mut taken = node_names(&q).await.map_err(&err)?;
    let mut nodes = Vec::with_capacity(targets.len());
    let mut actions = Vec::with_capacity(targets.len());
    for t in targets {
        let Some(dev) = devices.iter().find(|d| d.device_id == t.device_id) else {
            return Err(HypervisorError::InvalidSpec(format!(
                "VM {id} has no disk {}",
                t.device_id
            )));
        };
        let new = fresh_node_name(&t.device_id, &mut taken);
        actions.push(json!({
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": dev.node,
                "snapshot-file": t.overlay.to_string_lossy(),
                "snapshot-node-name": new,
                "format": "qcow2",
                "mode": "absolute-paths",
            }
        }));
        nodes.push(new);
    }
    let started = Instant::now();
    let result = q
        .execute_with_timeout(
            "transaction",
            json!({ "actions": actions }),
            SNAPSHOT_TIMEOUT,
        )
        .await;
    let pause = started.elapsed();
    match result {
        Ok(_) => {
            let pause_ms = pause.as_secs_f64() * 1e3;
            tracing::info!(%id, pause_ms, ?nodes, "live snapshot");
            Ok(SnapshotReport { pause, nodes })
        }
        Err(e @ QmpError::Command { .. }) => {
            // QEMU rolled the transaction back but keeps the overlays its earlier actions
            // created; none existed before (checked above), so they are ours to remove.
            for t in targets {
                let overlay = t.overlay.display();
                match std::fs::remove_file(&t.overlay) {
                    Ok(()) => tracing::debug!(%id, %overlay, "removed overlay of failed snapshot"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(%id, %overlay, error = %e, "cannot remove overlay of failed snapshot")
                    }
                }
            }
            Err(err(e))
        }
        // Timed out or QEMU died: whether the snapshot happened is unknown, so the overlays
        // (which may hold guest writes by now) stay.
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn disk(device_id: Option<&str>) -> DiskSpec {
        DiskSpec {
            path: "/pool/layers/vol-1.0.qcow2".into(),
            format: "qcow2".into(),
            serial: device_id.map(str::to_string),
            read_only: false,
            device_id: device_id.map(str::to_string),
        }
    }

    #[test]
    fn names() {
        assert_eq!(device_id(0, &disk(None)), "virtio-disk0");
        assert_eq!(node_name(3, &disk(None)), "disk3");
        assert_eq!(device_id(1, &disk(Some("vol-a"))), "vol-a");
        assert_eq!(node_name(1, &disk(Some("vol-a"))), "vol-a");
        assert_eq!(base_nodes("virtio-disk2"), ["virtio-disk2", "disk2"]);
        assert_eq!(base_nodes("virtio-diskx"), ["virtio-diskx"]);
        assert_eq!(base_nodes("vol-a"), ["vol-a"]);
        assert_eq!(
            qdev_device_id("/machine/peripheral/vol-a/virtio-backend"),
            Some("vol-a")
        );
        assert_eq!(qdev_device_id("/machine/peripheral/vol-a"), Some("vol-a"));
        assert_eq!(qdev_device_id("/machine/peripheral-anon/device[0]"), None);
        let mut taken: HashSet<String> = ["vol-a".into(), "vol-a.1".into()].into();
        assert_eq!(fresh_node_name("vol-a", &mut taken), "vol-a.2");
        assert_eq!(fresh_node_name("vol-a", &mut taken), "vol-a.3");
        let long = "v".repeat(MAX_DEVICE_ID);
        let n = fresh_node_name(&long, &mut taken);
        assert!(n.len() <= MAX_NODE_NAME && n.ends_with(".1"), "{n}");
    }

    #[test]
    fn device_ids() {
        for ok in [
            "vol-0123456789abcdef0",
            "virtio-disk0",
            "a",
            "d1sk",
            "disk",
            "diskx",
        ] {
            assert!(validate_device_id(ok).is_ok(), "{ok} refused");
        }
        let too_long = "v".repeat(MAX_DEVICE_ID + 1);
        for bad in [
            "", "0vol", "-a", "vol,x", "vol x", "disk0", "disk12", &too_long,
        ] {
            assert!(validate_device_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn disks_of_a_spec() {
        assert!(validate_disks(&[disk(None), disk(Some("vol-a"))]).is_ok());
        assert!(validate_disks(&[disk(Some("vol-a")), disk(Some("vol-a"))]).is_err());
        // An explicit id equal to another disk's default one.
        assert!(validate_disks(&[disk(None), disk(Some("virtio-disk0"))]).is_err());
        assert!(validate_disks(&[disk(Some("disk1"))]).is_err());
        let mut d = disk(None);
        d.format = "vmdk".into();
        assert!(validate_disks(&[d]).is_err());
    }

    #[test]
    fn attach_and_targets() {
        assert_eq!(validate_attach(&disk(Some("vol-a"))).unwrap(), "vol-a");
        assert!(validate_attach(&disk(None)).is_err());
        let mut rel = disk(Some("vol-a"));
        rel.path = "rel.qcow2".into();
        assert!(validate_attach(&rel).is_err());
        assert!(validate_size(512).is_ok());
        assert!(validate_size(0).is_err());
        assert!(validate_size(1000).is_err());

        let dir = tempfile::tempdir().unwrap();
        let t = |dev: &str, f: &str| SnapshotTarget {
            device_id: dev.into(),
            overlay: dir.path().join(f),
        };
        assert!(validate_targets(&[t("a", "a.1"), t("b", "b.1")]).is_ok());
        assert!(validate_targets(&[]).is_err());
        assert!(validate_targets(&[t("a", "a.1"), t("a", "b.1")]).is_err());
        assert!(validate_targets(&[t("a", "x"), t("b", "x")]).is_err());
        assert!(validate_targets(&[SnapshotTarget {
            device_id: "a".into(),
            overlay: PathBuf::from("rel")
        }])
        .is_err());
        std::fs::write(dir.path().join("exists"), b"").unwrap();
        assert!(validate_targets(&[t("a", "exists")]).is_err());
    }

    #[test]
    fn sim_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let mut header = b"QFI\xfb".to_vec();
        header.resize(24, 0);
        header.extend_from_slice(&(64u64 << 20).to_be_bytes());
        let qcow = dir.path().join("q");
        std::fs::write(&qcow, &header).unwrap();
        assert_eq!(virtual_size(&raw), 4096);
        assert_eq!(virtual_size(&qcow), 64 << 20);
        assert_eq!(virtual_size(&dir.path().join("missing")), 0);
    }
}
