//! Storage pools: where a host keeps its VMs' root disks and volumes.
//!
//! * `dir` and `shared` pools are directories of qcow2 layers (a `shared` one is mounted by every
//!   host of the pool at the same path); disks are chains of layers, snapshots pin frozen layers,
//!   and a mark & sweep garbage collector deletes the layers nothing needs any more.
//! * `lvm` pools keep each disk as a raw logical volume `/dev/VG/<disk-id>`; their manifests and
//!   image cache live in a metadata directory.
//!
//! Layout of a dir/shared pool (see the storage design):
//! ```text
//! .lock                 flock(2)ed exclusively by every mutation (several agents share a shared pool)
//! images/<image-id>     image cache
//! layers/<layer>.qcow2  qcow2 layers `<disk-id>.<n>`; backing files are absolute paths
//! disks/<disk-id>.json  {"id","size","format","active","created",...}
//! snapshots/<id>.json   {"id","disk","layer","size","created"}
//! ```

mod cmd;
mod dir;
mod extent;
mod gc;
mod layout;
mod lvm;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_copy;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Progress, StorageError};

pub use extent::data_end;

/// Formats [`Pool::export`] writes.
pub const EXPORT_FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vdi"];

/// Kind of a storage pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    Dir,
    Shared,
    Lvm,
}

impl PoolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Dir => "dir",
            PoolKind::Shared => "shared",
            PoolKind::Lvm => "lvm",
        }
    }

    /// True when every host of the pool sees the same disks (no copy needed to migrate).
    pub fn is_shared(self) -> bool {
        self == PoolKind::Shared
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PoolKind {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "dir" => Ok(PoolKind::Dir),
            "shared" => Ok(PoolKind::Shared),
            "lvm" => Ok(PoolKind::Lvm),
            _ => Err(StorageError::InvalidArgument(format!(
                "unknown pool kind {s:?} (expected dir, shared or lvm)"
            ))),
        }
    }
}

/// How a host's pool is configured (`kumo agent --storage-pool NAME --pool-kind ... `).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    pub name: String,
    pub kind: PoolKind,
    /// The pool's root directory (dir/shared) or its metadata directory (lvm).
    pub path: PathBuf,
    /// The volume group of an lvm pool.
    pub vg: Option<String>,
}

/// What a pool can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Where a new disk's (or a restored disk's) content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskBase {
    /// An empty disk.
    Blank,
    /// A cached image: a qcow2 overlay on it (dir/shared), converted into the LV (lvm).
    Image { path: PathBuf, format: String },
    /// A snapshot id of this pool: an overlay on its frozen layer.
    Snapshot(String),
    /// Copy the whole (chained) content of a file: restores, imports.
    Flatten { path: PathBuf, format: String },
}

/// A live disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// "qcow2" (dir/shared) or "raw" (lvm).
    pub format: String,
    /// The active layer (what QEMU opens) or the LV's device.
    pub path: PathBuf,
}

/// A live snapshot under way: QEMU creates `overlay` on top of `frozen`, then the caller commits
/// (or aborts) the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPlan {
    pub disk: String,
    pub snapshot: String,
    pub frozen: PathBuf,
    pub overlay: PathBuf,
}

/// A snapshot: a pinned, frozen layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub disk: String,
    pub layer: PathBuf,
    /// Virtual size of the disk when the snapshot was taken.
    pub size: u64,
}

/// What to copy or export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Disk(String),
    Snapshot(String),
}

/// One host's storage pool.
#[derive(Clone, Debug)]
pub struct Pool {
    cfg: PoolConfig,
    /// Absolute root (dir/shared) or metadata directory (lvm).
    root: PathBuf,
}

/// Disk, snapshot and layer ids become file and LV names: keep them to a safe alphabet.
pub(crate) fn check_id(what: &str, id: &str) -> Result<(), StorageError> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "invalid {what} id {id:?}: use 1 to 100 letters, digits, '-', '_' or '.', \
             not starting with '.' or '-'"
        )))
    }
}

impl Pool {
    /// Opens a pool, creating its directories.
    pub fn open(cfg: PoolConfig) -> Result<Pool, StorageError> {
        if cfg.name.trim().is_empty() {
            return Err(StorageError::InvalidArgument("a pool needs a name".into()));
        }
        let root = crate::qemu::absolute(&cfg.path)?;
        let mut subdirs = vec![layout::IMAGES, layout::DISKS];
        match cfg.kind {
            PoolKind::Lvm => {
                let vg = cfg.vg.as_deref().unwrap_or("");
                if vg.is_empty()
                    || vg.starts_with('-')
                    || !vg.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+')
                    })
                {
                    return Err(StorageError::InvalidArgument(format!(
                        "an lvm pool needs a valid volume group name (--pool-vg), got {vg:?}"
                    )));
                }
            }
            PoolKind::Dir | PoolKind::Shared => {
                subdirs.push(layout::LAYERS);
                subdirs.push(layout::SNAPSHOTS);
            }
        }
        for d in subdirs {
            let p = root.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| StorageError::io(format!("creating {}", p.display()), e))?;
        }
        let cfg = PoolConfig {
            path: root.clone(),
            ..cfg
        };
        Ok(Pool { cfg, root })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// `<root>/images`: the image cache (in the pool, so every host of a shared pool sees it).
    pub fn image_dir(&self) -> PathBuf {
        self.root.join(layout::IMAGES)
    }

    fn is_lvm(&self) -> bool {
        self.cfg.kind == PoolKind::Lvm
    }

    fn no_snapshots(&self) -> StorageError {
        StorageError::Unsupported(format!(
            "snapshots need a dir or shared pool; pool {} is lvm",
            self.cfg.name
        ))
    }

    /// Total and free bytes (statvfs of the root; `vgs` for lvm).
    pub async fn capacity(&self) -> Result<Capacity, StorageError> {
        if self.is_lvm() {
            self.lvm_capacity().await
        } else {
            self.dir_capacity().await
        }
    }

    /// Creates disk `id` of exactly `size` bytes from `base`. Idempotent for the same id and size;
    /// nothing is left behind when it fails.
    pub async fn create_disk(
        &self,
        id: &str,
        size: u64,
        base: &DiskBase,
        progress: Progress,
    ) -> Result<DiskInfo, StorageError> {
        check_id("disk", id)?;
        let rep = crate::Reporter::new(progress);
        rep.set(0.0);
        let info = if self.is_lvm() {
            self.lvm_create_disk(id, size, base, &rep).await?
        } else {
            self.dir_create_disk(id, size, base, &rep).await?
        };
        rep.set(1.0);
        tracing::info!(pool = %self.cfg.name, disk = %id, size, path = %info.path.display(), "disk created");
        Ok(info)
    }

    pub async fn disk(&self, id: &str) -> Result<Option<DiskInfo>, StorageError> {
        check_id("disk", id)?;
        Ok(self.read_disk(id).await?.map(|m| self.disk_info(&m)))
    }

    /// Every live disk, sorted by id.
    pub async fn disks(&self) -> Result<Vec<DiskInfo>, StorageError> {
        let all = self.read_all_disks().await?;
        Ok(all.iter().map(|m| self.disk_info(m)).collect())
    }

    /// Deletes a disk (idempotent); its layers go unless a snapshot or another disk needs them.
    pub async fn delete_disk(&self, id: &str) -> Result<(), StorageError> {
        check_id("disk", id)?;
        if self.is_lvm() {
            return self.lvm_delete_disk(id).await;
        }
        let _lock = self.lock().await?;
        self.remove_json(&self.disk_json(id)).await?;
        let deleted = self.gc_locked().await?;
        tracing::info!(pool = %self.cfg.name, disk = %id, layers = deleted.len(), "disk deleted");
        Ok(())
    }

    /// Grows a stopped disk to `size`; shrinking is refused (use [`Pool::copy_disk`]).
    pub async fn grow_disk(&self, id: &str, size: u64) -> Result<DiskInfo, StorageError> {
        check_id("disk", id)?;
        if self.is_lvm() {
            self.lvm_grow_disk(id, size).await
        } else {
            self.dir_grow_disk(id, size).await
        }
    }

    /// Records the new size after QEMU's `block_resize` grew a running disk.
    pub async fn record_size(&self, id: &str, size: u64) -> Result<(), StorageError> {
        check_id("disk", id)?;
        self.check_size(size).await?;
        let _lock = self.lock().await?;
        let mut m = self.need_disk(id).await?;
        if size < m.size {
            return Err(StorageError::InvalidArgument(format!(
                "disk {id} has {} bytes; a recorded size cannot shrink it to {size}",
                m.size
            )));
        }
        m.size = size;
        self.write_disk(&m).await
    }

    /// Allocates the overlay QEMU will create for a live snapshot of `disk`.
    pub async fn plan_snapshot(
        &self,
        disk: &str,
        snapshot: &str,
    ) -> Result<SnapshotPlan, StorageError> {
        check_id("disk", disk)?;
        check_id("snapshot", snapshot)?;
        if self.is_lvm() {
            return Err(self.no_snapshots());
        }
        self.dir_plan_snapshot(disk, snapshot).await
    }

    /// QEMU created the plan's overlay and writes to it: make it the active layer and pin the
    /// frozen one.
    pub async fn commit_snapshot(&self, plan: &SnapshotPlan) -> Result<SnapshotInfo, StorageError> {
        check_id("disk", &plan.disk)?;
        check_id("snapshot", &plan.snapshot)?;
        if self.is_lvm() {
            return Err(self.no_snapshots());
        }
        self.dir_commit_snapshot(plan).await
    }

    /// The live snapshot failed: forget the plan and delete the overlay if QEMU made it.
    pub async fn abort_snapshot(&self, plan: &SnapshotPlan) -> Result<(), StorageError> {
        check_id("disk", &plan.disk)?;
        check_id("snapshot", &plan.snapshot)?;
        if self.is_lvm() {
            return Err(self.no_snapshots());
        }
        self.dir_abort_snapshot(plan).await
    }

    /// Snapshot of a stopped disk (`qemu-img create` makes the overlay).
    pub async fn snapshot_offline(
        &self,
        disk: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, StorageError> {
        check_id("disk", disk)?;
        check_id("snapshot", snapshot)?;
        if self.is_lvm() {
            return Err(self.no_snapshots());
        }
        self.dir_snapshot_offline(disk, snapshot).await
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>, StorageError> {
        check_id("snapshot", id)?;
        if self.is_lvm() {
            return Ok(None);
        }
        Ok(self
            .read_snapshot(id)
            .await?
            .map(|s| self.snapshot_info(&s)))
    }

    /// Deletes a snapshot (idempotent); its layer goes unless a disk or snapshot still needs it.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), StorageError> {
        check_id("snapshot", id)?;
        if self.is_lvm() {
            return Ok(());
        }
        let _lock = self.lock().await?;
        self.remove_json(&self.snapshot_json(id)).await?;
        let deleted = self.gc_locked().await?;
        tracing::info!(pool = %self.cfg.name, snapshot = %id, layers = deleted.len(), "snapshot deleted");
        Ok(())
    }

    /// Full copy of a disk or snapshot into new disk `dst` of exactly `size` bytes (shrink by
    /// copy, grow by copy, volume from snapshot). Refused when guest data lies beyond `size`.
    pub async fn copy_disk(
        &self,
        src: &Source,
        dst: &str,
        size: u64,
        progress: Progress,
    ) -> Result<DiskInfo, StorageError> {
        check_id("disk", dst)?;
        let rep = crate::Reporter::new(progress);
        rep.set(0.0);
        let info = if self.is_lvm() {
            self.lvm_copy_disk(src, dst, size, &rep).await?
        } else {
            self.dir_copy_disk(src, dst, size, &rep).await?
        };
        rep.set(1.0);
        tracing::info!(pool = %self.cfg.name, src = ?src, disk = %dst, size, "disk copied");
        Ok(info)
    }

    /// Restore in place: a new layer made from `base` becomes the stopped disk's content.
    pub async fn replace_content(
        &self,
        id: &str,
        base: &DiskBase,
        progress: Progress,
    ) -> Result<DiskInfo, StorageError> {
        check_id("disk", id)?;
        let rep = crate::Reporter::new(progress);
        rep.set(0.0);
        let info = if self.is_lvm() {
            self.lvm_replace_content(id, base, &rep).await?
        } else {
            self.dir_replace_content(id, base, &rep).await?
        };
        rep.set(1.0);
        tracing::info!(pool = %self.cfg.name, disk = %id, "disk content replaced");
        Ok(info)
    }

    /// Writes the whole content of a disk or snapshot to a new file `dest` in `format`
    /// (qcow2, raw, vmdk, vdi; raw is sparse). Returns the length of the written file.
    pub async fn export(
        &self,
        src: &Source,
        dest: &Path,
        format: &str,
        progress: Progress,
    ) -> Result<u64, StorageError> {
        let rep = crate::Reporter::new(progress);
        rep.set(0.0);
        let written = self.export_inner(src, dest, format, &rep).await?;
        rep.set(1.0);
        tracing::info!(pool = %self.cfg.name, src = ?src, dest = %dest.display(), format, written, "exported");
        Ok(written)
    }

    /// Mark & sweep of the layers; returns what it deleted.
    pub async fn gc(&self) -> Result<Vec<PathBuf>, StorageError> {
        let _lock = self.lock().await?;
        self.gc_locked().await
    }
}
