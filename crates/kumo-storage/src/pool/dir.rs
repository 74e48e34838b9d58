//! dir and shared pools: disks are chains of qcow2 layers.
//!
//! Long copies are written to a temp file in `layers/` outside the lock (the GC ignores temp
//! files), then renamed to their layer name under the lock; O(1) overlays are made under it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::cmd::{self, os};
use super::gc::read_backing;
use super::layout::{io_err, now_rfc3339, sync_dir, DiskManifest, PendingLayer, SnapshotManifest};
use super::{check_id, Capacity, DiskBase, DiskInfo, Pool, SnapshotInfo, SnapshotPlan, Source};
use crate::{blocking, qemu, Reporter, StorageError, TempFile};

/// A disk's content, ready to become a layer under the lock.
pub(super) enum Built {
    /// A finished qcow2 file of the right size, in a temp path of `layers/`.
    File(TempFile),
    Blank,
    /// An overlay on an image (absolute path).
    Image {
        path: PathBuf,
        format: String,
    },
    /// An overlay on a snapshot's frozen layer (resolved under the lock, so it cannot vanish).
    Snapshot(String),
}

fn statvfs_blocking(path: &Path) -> Result<Capacity, StorageError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        StorageError::InvalidArgument(format!("{} contains a NUL byte", path.display()))
    })?;
    // SAFETY: statvfs only writes into the struct we pass; an all-zero statvfs is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(StorageError::io(
            format!("statvfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let frsize = st.f_frsize as u64;
    Ok(Capacity {
        total_bytes: (st.f_blocks as u64).saturating_mul(frsize),
        free_bytes: (st.f_bavail as u64).saturating_mul(frsize),
    })
}

/// Both paths name the same layer file (QEMU may spell a path through a symlink).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

impl Pool {
    pub(super) async fn dir_capacity(&self) -> Result<Capacity, StorageError> {
        let root = self.root.clone();
        blocking(move || statvfs_blocking(&root)).await
    }

    /// The file holding a disk's or snapshot's content, its format and virtual size.
    pub(super) async fn source_file(
        &self,
        src: &Source,
    ) -> Result<(PathBuf, &'static str, u64), StorageError> {
        match src {
            Source::Disk(id) => {
                check_id("disk", id)?;
                let m = self.need_disk(id).await?;
                let info = self.disk_info(&m);
                Ok((
                    info.path,
                    if self.is_lvm() { "raw" } else { "qcow2" },
                    m.size,
                ))
            }
            Source::Snapshot(id) => {
                check_id("snapshot", id)?;
                if self.is_lvm() {
                    return Err(self.no_snapshots());
                }
                let s = self.need_snapshot(id).await?;
                Ok((self.layer_path(&s.layer), "qcow2", s.size))
            }
        }
    }

    /// Converts `path` into a temp layer of exactly `size` bytes (progress 0..0.95).
    async fn flatten_into_tmp(
        &self,
        path: &Path,
        format: &str,
        size: u64,
        rep: &Reporter,
    ) -> Result<TempFile, StorageError> {
        let path = qemu::absolute(path)?;
        let info = cmd::input_info(&path, format).await?;
        if size < info.virtual_size {
            return Err(StorageError::InvalidArgument(format!(
                "size {size} is smaller than {}'s virtual size ({} bytes)",
                path.display(),
                info.virtual_size
            )));
        }
        let tmp = self.tmp_layer("flatten");
        let conv = rep.sub(0.0, 0.95);
        let args = vec![
            os("-U"),
            os("-f"),
            os(format),
            os("-O"),
            os("qcow2"),
            os(&path),
            os(&tmp.path),
        ];
        cmd::convert(args, &move |f| conv.set(f)).await?;
        if size > info.virtual_size {
            cmd::resize(&tmp.path, "qcow2", size, false).await?;
        }
        Ok(tmp)
    }

    /// Validates `base` and does the slow part (copies) outside the lock.
    pub(super) async fn prepare(
        &self,
        base: &DiskBase,
        size: u64,
        rep: &Reporter,
    ) -> Result<Built, StorageError> {
        match base {
            DiskBase::Blank => Ok(Built::Blank),
            DiskBase::Image { path, format } => {
                let path = qemu::absolute(path)?;
                let info = cmd::input_info(&path, format).await?;
                if size < info.virtual_size {
                    return Err(StorageError::InvalidArgument(format!(
                        "size {size} is smaller than the image's virtual size ({} bytes)",
                        info.virtual_size
                    )));
                }
                Ok(Built::Image {
                    path,
                    format: info.format,
                })
            }
            DiskBase::Snapshot(id) => {
                check_id("snapshot", id)?;
                Ok(Built::Snapshot(id.clone()))
            }
            DiskBase::Flatten { path, format } => Ok(Built::File(
                self.flatten_into_tmp(path, format, size, rep).await?,
            )),
        }
    }

    /// Under the lock: makes `built` layer `layer` of `size` bytes. Nothing is left on failure.
    pub(super) async fn materialize(
        &self,
        built: Built,
        layer: &str,
        size: u64,
    ) -> Result<(), StorageError> {
        let dest = self.layer_path(layer);
        if tokio::fs::symlink_metadata(&dest).await.is_ok() {
            return Err(StorageError::Conflict(format!(
                "layer {} exists already",
                dest.display()
            )));
        }
        let res = match built {
            Built::File(mut tmp) => {
                let (src, dst) = (tmp.path.clone(), dest.clone());
                blocking(move || {
                    std::fs::rename(&src, &dst)
                        .map_err(|e| io_err(format!("renaming into {}", dst.display()), e))?;
                    sync_dir(&crate::parent_dir(&dst));
                    Ok(())
                })
                .await?;
                tmp.armed = false;
                return Ok(());
            }
            Built::Blank => cmd::create_qcow2(&dest, size, None).await,
            Built::Image { path, format } => {
                cmd::create_qcow2(&dest, size, Some((&path, &format))).await
            }
            Built::Snapshot(id) => {
                let s = self.need_snapshot(&id).await?;
                if size < s.size {
                    return Err(StorageError::InvalidArgument(format!(
                        "size {size} is smaller than snapshot {id} ({} bytes)",
                        s.size
                    )));
                }
                let frozen = self.layer_path(&s.layer);
                cmd::create_qcow2(&dest, size, Some((&frozen, "qcow2"))).await
            }
        };
        if res.is_err() {
            let _ = tokio::fs::remove_file(&dest).await;
        }
        res
    }

    /// Under the lock: the manifest of a new disk whose first layer is made. Removes the layer if
    /// the manifest cannot be written.
    async fn publish_new_disk(
        &self,
        id: &str,
        size: u64,
        layer: String,
    ) -> Result<DiskInfo, StorageError> {
        let m = DiskManifest {
            id: id.to_string(),
            size,
            format: "qcow2".into(),
            next_layer: super::layout::split_layer(&layer).map_or(0, |(_, n)| n + 1),
            active: layer,
            created: now_rfc3339(),
            pending: Vec::new(),
        };
        if let Err(e) = self.write_disk(&m).await {
            let _ = tokio::fs::remove_file(self.layer_path(&m.active)).await;
            return Err(e);
        }
        Ok(self.disk_info(&m))
    }

    pub(super) async fn dir_create_disk(
        &self,
        id: &str,
        size: u64,
        base: &DiskBase,
        rep: &Reporter,
    ) -> Result<DiskInfo, StorageError> {
        self.check_size(size).await?;
        if let Some(m) = self.read_disk(id).await? {
            return self.same_or_conflict(&m, size);
        }
        let built = self.prepare(base, size, rep).await?;
        let _lock = self.lock().await?;
        // Another agent (or task) may have made it meanwhile; `built` is dropped (deleted).
        if let Some(m) = self.read_disk(id).await? {
            return self.same_or_conflict(&m, size);
        }
        let layer = self.alloc_layer(id, None).await?;
        self.materialize(built, &layer, size).await?;
        self.publish_new_disk(id, size, layer).await
    }

    pub(super) async fn dir_grow_disk(
        &self,
        id: &str,
        size: u64,
    ) -> Result<DiskInfo, StorageError> {
        self.check_size(size).await?;
        let _lock = self.lock().await?;
        let mut m = self.need_disk(id).await?;
        if size < m.size {
            return Err(StorageError::InvalidArgument(format!(
                "disk {id} has {} bytes: it cannot shrink to {size} in place (copy it into a \
                 smaller disk instead)",
                m.size
            )));
        }
        if size == m.size {
            return Ok(self.disk_info(&m));
        }
        let path = self.layer_path(&m.active);
        cmd::ensure_idle(&path, "qcow2", &format!("disk {id}")).await?;
        cmd::resize(&path, "qcow2", size, false).await?;
        m.size = size;
        self.write_disk(&m).await?;
        Ok(self.disk_info(&m))
    }

    pub(super) async fn dir_plan_snapshot(
        &self,
        disk: &str,
        snapshot: &str,
    ) -> Result<SnapshotPlan, StorageError> {
        let _lock = self.lock().await?;
        let mut m = self.need_disk(disk).await?;
        if self.read_snapshot(snapshot).await?.is_some()
            || m.pending.iter().any(|p| p.snapshot == snapshot)
        {
            return Err(StorageError::Conflict(format!(
                "snapshot {snapshot} exists already"
            )));
        }
        let layer = self.alloc_layer(disk, Some(&mut m)).await?;
        m.pending.push(PendingLayer {
            layer: layer.clone(),
            snapshot: snapshot.to_string(),
        });
        self.write_disk(&m).await?;
        Ok(SnapshotPlan {
            disk: disk.to_string(),
            snapshot: snapshot.to_string(),
            frozen: self.layer_path(&m.active),
            overlay: self.layer_path(&layer),
        })
    }

    fn plan_layers(&self, plan: &SnapshotPlan) -> Result<(String, String), StorageError> {
        let bad = |p: &Path| {
            StorageError::InvalidArgument(format!(
                "{} is not a layer of pool {}",
                p.display(),
                self.cfg.name
            ))
        };
        let frozen = self
            .layer_of(&plan.frozen)
            .ok_or_else(|| bad(&plan.frozen))?;
        let overlay = self
            .layer_of(&plan.overlay)
            .ok_or_else(|| bad(&plan.overlay))?;
        Ok((frozen, overlay))
    }

    /// The overlay must exist and be backed by the frozen layer, or the chain would be wrong.
    async fn check_overlay(&self, plan: &SnapshotPlan) -> Result<(), StorageError> {
        let overlay = plan.overlay.clone();
        let backing = blocking(move || match read_backing(&overlay) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::InvalidArgument(format!(
                    "the snapshot overlay {} was not created",
                    overlay.display()
                )))
            }
            Err(e) => Err(StorageError::io(
                format!("reading {}", overlay.display()),
                e,
            )),
        })
        .await?;
        match backing {
            Some(b) if same_file(&b, &plan.frozen) => Ok(()),
            other => Err(StorageError::InvalidArgument(format!(
                "the snapshot overlay {} is backed by {:?}, not by {}",
                plan.overlay.display(),
                other,
                plan.frozen.display()
            ))),
        }
    }

    pub(super) async fn dir_commit_snapshot(
        &self,
        plan: &SnapshotPlan,
    ) -> Result<SnapshotInfo, StorageError> {
        let (frozen, overlay) = self.plan_layers(plan)?;
        let _lock = self.lock().await?;
        let mut m = self.need_disk(&plan.disk).await?;
        let existing = self.read_snapshot(&plan.snapshot).await?;
        if m.active == overlay {
            // Committed before (perhaps without its pin, if writing that failed).
            match existing {
                Some(s) if s.layer == frozen => return Ok(self.snapshot_info(&s)),
                Some(_) => {
                    return Err(StorageError::Conflict(format!(
                        "snapshot {} exists already",
                        plan.snapshot
                    )))
                }
                None => {}
            }
        } else {
            let Some(idx) = m
                .pending
                .iter()
                .position(|p| p.layer == overlay && p.snapshot == plan.snapshot)
            else {
                return Err(StorageError::InvalidArgument(format!(
                    "no snapshot {} of disk {} is planned with overlay {}",
                    plan.snapshot,
                    plan.disk,
                    plan.overlay.display()
                )));
            };
            if m.active != frozen {
                return Err(StorageError::Conflict(format!(
                    "disk {}'s active layer is {}, not the planned {}",
                    plan.disk, m.active, frozen
                )));
            }
            if existing.is_some() {
                return Err(StorageError::Conflict(format!(
                    "snapshot {} exists already",
                    plan.snapshot
                )));
            }
            self.check_overlay(plan).await?;
            m.active = overlay;
            m.pending.remove(idx);
            // The disk first: if the pin cannot be written, the disk is still right.
            self.write_disk(&m).await?;
        }
        let pin = SnapshotManifest {
            id: plan.snapshot.clone(),
            disk: plan.disk.clone(),
            layer: frozen,
            size: m.size,
            created: now_rfc3339(),
        };
        self.write_snapshot(&pin).await?;
        tracing::info!(pool = %self.cfg.name, disk = %plan.disk, snapshot = %plan.snapshot,
            layer = %pin.layer, "snapshot taken");
        Ok(self.snapshot_info(&pin))
    }

    pub(super) async fn dir_abort_snapshot(&self, plan: &SnapshotPlan) -> Result<(), StorageError> {
        let (_, overlay) = self.plan_layers(plan)?;
        let _lock = self.lock().await?;
        let Some(mut m) = self.read_disk(&plan.disk).await? else {
            // The disk is gone: its pending overlay is garbage for the next GC.
            return Ok(());
        };
        if m.active == overlay {
            return Err(StorageError::Conflict(format!(
                "snapshot {} of disk {} is already committed",
                plan.snapshot, plan.disk
            )));
        }
        let Some(idx) = m.pending.iter().position(|p| p.layer == overlay) else {
            return Ok(()); // aborted before
        };
        m.pending.remove(idx);
        self.write_disk(&m).await?;
        match tokio::fs::remove_file(&plan.overlay).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StorageError::io(
                    format!("removing {}", plan.overlay.display()),
                    e,
                ))
            }
        }
        Ok(())
    }

    pub(super) async fn dir_snapshot_offline(
        &self,
        disk: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, StorageError> {
        let m = self.need_disk(disk).await?;
        cmd::ensure_idle(
            &self.layer_path(&m.active),
            "qcow2",
            &format!("disk {disk}"),
        )
        .await?;
        let plan = self.dir_plan_snapshot(disk, snapshot).await?;
        let size = self.need_disk(disk).await?.size;
        if let Err(e) = cmd::create_qcow2(&plan.overlay, size, Some((&plan.frozen, "qcow2"))).await
        {
            if let Err(e2) = self.dir_abort_snapshot(&plan).await {
                tracing::warn!(error = %e2, "cannot abort a failed offline snapshot");
            }
            return Err(e);
        }
        self.dir_commit_snapshot(&plan).await
    }

    pub(super) async fn dir_copy_disk(
        &self,
        src: &Source,
        dst: &str,
        size: u64,
        rep: &Reporter,
    ) -> Result<DiskInfo, StorageError> {
        self.check_size(size).await?;
        if self.read_disk(dst).await?.is_some() {
            return Err(StorageError::Conflict(format!("disk {dst} exists already")));
        }
        let (path, format, _) = self.source_file(src).await?;
        let end = super::data_end(&path, format).await?;
        if end > size {
            return Err(StorageError::DataBeyondSize {
                data_end: end,
                size,
            });
        }
        let vsize = match qemu::info_raw(&path, Some(format)).await? {
            Ok(i) => i.virtual_size,
            Err(msg) => return Err(cmd::qemu_failure("info", msg)),
        };
        let tmp = self.tmp_layer("copy");
        let conv = rep.sub(0.0, 0.95);
        let args = vec![
            os("-U"),
            os("-f"),
            os(format),
            os("-O"),
            os("qcow2"),
            os(&path),
            os(&tmp.path),
        ];
        cmd::convert(args, &move |f| conv.set(f)).await?;
        if size != vsize {
            cmd::resize(&tmp.path, "qcow2", size, size < vsize).await?;
        }
        let _lock = self.lock().await?;
        if self.read_disk(dst).await?.is_some() {
            return Err(StorageError::Conflict(format!("disk {dst} exists already")));
        }
        let layer = self.alloc_layer(dst, None).await?;
        self.materialize(Built::File(tmp), &layer, size).await?;
        self.publish_new_disk(dst, size, layer).await
    }

    pub(super) async fn dir_replace_content(
        &self,
        id: &str,
        base: &DiskBase,
        rep: &Reporter,
    ) -> Result<DiskInfo, StorageError> {
        let m = self.need_disk(id).await?;
        let what = format!("disk {id}");
        // Fail before a long copy if the VM runs.
        cmd::ensure_idle(&self.layer_path(&m.active), "qcow2", &what).await?;
        let built = self.prepare(base, m.size, rep).await?;
        let _lock = self.lock().await?;
        let mut m2 = self.need_disk(id).await?;
        if m2.size != m.size {
            return Err(StorageError::Conflict(format!(
                "disk {id} was resized during the restore"
            )));
        }
        cmd::ensure_idle(&self.layer_path(&m2.active), "qcow2", &what).await?;
        let layer = self.alloc_layer(id, Some(&mut m2)).await?;
        self.materialize(built, &layer, m2.size).await?;
        let old = std::mem::replace(&mut m2.active, layer);
        if let Err(e) = self.write_disk(&m2).await {
            let _ = tokio::fs::remove_file(self.layer_path(&m2.active)).await;
            return Err(e);
        }
        tracing::info!(pool = %self.cfg.name, disk = %id, old = %old, new = %m2.active, "active layer replaced");
        self.gc_locked().await?;
        Ok(self.disk_info(&m2))
    }

    pub(super) async fn export_inner(
        &self,
        src: &Source,
        dest: &Path,
        format: &str,
        rep: &Reporter,
    ) -> Result<u64, StorageError> {
        let fmt = format.trim().to_ascii_lowercase();
        if !super::EXPORT_FORMATS.contains(&fmt.as_str()) {
            return Err(StorageError::UnsupportedFormat(format.to_string()));
        }
        crate::check_dest(dest).await?;
        let (path, src_format, _) = self.source_file(src).await?;
        let tmp = TempFile::beside(dest)?;
        // Absolute: qemu-img would read `name:...` in a relative path as a protocol.
        let out = qemu::absolute(&tmp.path)?;
        let conv = rep.sub(0.0, 0.97);
        let args = vec![
            os("-U"),
            os("-f"),
            os(src_format),
            os("-O"),
            os(&fmt),
            os(&path),
            os(&out),
        ];
        cmd::convert(args, &move |f| conv.set(f)).await?;
        let len = tokio::fs::metadata(&tmp.path)
            .await
            .map_err(|e| StorageError::io(format!("reading {}", tmp.path.display()), e))?
            .len();
        crate::publish(tmp, dest).await?;
        Ok(len)
    }
}
