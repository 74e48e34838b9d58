//! lvm pools: each disk is a raw logical volume `/dev/VG/<disk-id>` of exactly its size.
//!
//! LVs are not zeroed by LVM (a new or extended LV may show another tenant's old data), so every
//! byte of a new LV is written: copied content, and `blkdiscard -z` for the rest.
//! Unlike dir pools, copies into an LV run under the pool lock (one host uses the VG).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::cmd::{self, os, tool, tool_ok};
use super::layout::{now_rfc3339, DiskManifest};
use super::{Capacity, DiskBase, DiskInfo, Pool, Source};
use crate::{qemu, Reporter, StorageError};

/// `vgs` figures of the pool's volume group, in bytes.
pub(super) struct VgFigures {
    pub size: u64,
    pub free: u64,
    pub extent: u64,
}

fn has_device_mapper() -> bool {
    std::fs::read_to_string("/proc/misc")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"))
        })
        .unwrap_or(true)
}

fn lvm_err(command: &str, message: String) -> StorageError {
    StorageError::Lvm {
        command: command.into(),
        message,
    }
}

/// What an Image/Flatten base converts from.
struct Input {
    path: PathBuf,
    format: String,
    vsize: u64,
}

impl Pool {
    fn vg(&self) -> &str {
        // Validated by `Pool::open`.
        self.cfg.vg.as_deref().unwrap_or_default()
    }

    pub(super) fn lv_path(&self, lv: &str) -> PathBuf {
        Path::new("/dev").join(self.vg()).join(lv)
    }

    fn lv_spec(&self, lv: &str) -> OsString {
        os(format!("{}/{lv}", self.vg()))
    }

    pub(super) async fn vg_figures(&self) -> Result<VgFigures, StorageError> {
        let args = [
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "-o",
            "vg_size,vg_free,vg_extent_size",
            self.vg(),
        ]
        .map(os);
        let out = tool_ok("vgs", &args).await?;
        let nums: Vec<u64> = out
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| StorageError::Parse(format!("vgs printed {out:?}")))?;
        match nums[..] {
            [size, free, extent] => Ok(VgFigures { size, free, extent }),
            _ => Err(StorageError::Parse(format!("vgs printed {out:?}"))),
        }
    }

    pub(super) async fn lvm_capacity(&self) -> Result<Capacity, StorageError> {
        let f = self.vg_figures().await?;
        Ok(Capacity {
            total_bytes: f.size,
            free_bytes: f.free,
        })
    }

    /// The LV's attributes (`lv_attr`), or None when there is no such LV.
    async fn lv_attr(&self, lv: &str) -> Result<Option<String>, StorageError> {
        let args = [
            os("--noheadings"),
            os("-o"),
            os("lv_attr"),
            self.lv_spec(lv),
        ];
        let out = tool("lvs", &args).await?;
        if out.ok {
            return Ok(Some(out.stdout.trim().to_string()));
        }
        if out.stderr.contains("Failed to find") || out.stderr.contains("not found") {
            return Ok(None);
        }
        Err(lvm_err("lvs", out.stderr))
    }

    /// Refuses an LV that a running VM has open.
    async fn lv_idle(&self, lv: &str) -> Result<(), StorageError> {
        if let Some(attr) = self.lv_attr(lv).await? {
            if attr.as_bytes().get(5) == Some(&b'o') {
                return Err(StorageError::Busy(format!(
                    "disk {lv} is in use (its LV is open): stop the VM that uses it first"
                )));
            }
        }
        Ok(())
    }

    async fn lvcreate(&self, lv: &str, size: u64) -> Result<(), StorageError> {
        let args = [
            os("--yes"),
            os("--wipesignatures"),
            os("y"),
            os("-n"),
            os(lv),
            os("-L"),
            os(format!("{size}b")),
            os(self.vg()),
        ];
        let out = tool("lvcreate", &args).await?;
        if out.ok {
            return Ok(());
        }
        // A failed lvcreate may still have recorded the LV in the metadata.
        if let Ok(Some(_)) = self.lv_attr(lv).await {
            if let Err(e) = self.lvremove(lv).await {
                tracing::warn!(lv, error = %e, "cannot remove a half-made LV");
            }
        }
        let msg = out.stderr;
        if msg.contains("Insufficient free space") || msg.contains("insufficient free space") {
            return Err(StorageError::NoSpace(msg));
        }
        if !has_device_mapper() {
            return Err(lvm_err(
                "lvcreate",
                format!(
                    "device-mapper is not available in this kernel (/proc/misc lists no \
                     device-mapper), so logical volumes cannot be created on this host: {msg}"
                ),
            ));
        }
        Err(lvm_err("lvcreate", msg))
    }

    async fn lvremove(&self, lv: &str) -> Result<(), StorageError> {
        let out = tool("lvremove", &[os("--yes"), self.lv_spec(lv)]).await?;
        if out.ok {
            return Ok(());
        }
        if out.stderr.contains("in use") || out.stderr.contains("open") {
            return Err(StorageError::Busy(format!("LV {lv}: {}", out.stderr)));
        }
        Err(lvm_err("lvremove", out.stderr))
    }

    /// Writes zeros over `len` bytes at `offset` of a block device.
    async fn zero(&self, dev: &Path, offset: u64, len: u64) -> Result<(), StorageError> {
        if len == 0 {
            return Ok(());
        }
        let args = [
            os("-z"),
            os("-o"),
            os(offset.to_string()),
            os("-l"),
            os(len.to_string()),
            os(dev),
        ];
        tool_ok("blkdiscard", &args).await.map(|_| ())
    }

    /// Checks a base before any LV is made; Some(input) when content is to be converted in.
    async fn lvm_input(&self, base: &DiskBase, size: u64) -> Result<Option<Input>, StorageError> {
        match base {
            DiskBase::Blank => Ok(None),
            DiskBase::Snapshot(_) => Err(self.no_snapshots()),
            DiskBase::Image { path, format } | DiskBase::Flatten { path, format } => {
                let path = qemu::absolute(path)?;
                let info = cmd::input_info(&path, format).await?;
                if size < info.virtual_size {
                    return Err(StorageError::InvalidArgument(format!(
                        "size {size} is smaller than {}'s virtual size ({} bytes)",
                        path.display(),
                        info.virtual_size
                    )));
                }
                Ok(Some(Input {
                    path,
                    format: info.format,
                    vsize: info.virtual_size,
                }))
            }
        }
    }

    /// Writes every byte of LV `lv` (`size` bytes): the input's content, zeros after it.
    async fn fill_lv(
        &self,
        lv: &str,
        input: Option<&Input>,
        size: u64,
        rep: &Reporter,
    ) -> Result<(), StorageError> {
        let dev = self.lv_path(lv);
        let Some(input) = input else {
            return self.zero(&dev, 0, size).await;
        };
        // Zero from the sector holding the input's end first: the copy rewrites its start.
        let tail = input.vsize / 512 * 512;
        self.zero(&dev, tail, size - tail).await?;
        let conv = rep.sub(0.0, 0.95);
        let args = vec![
            os("-U"),
            os("-n"),
            os("-f"),
            os(&input.format),
            os("-O"),
            os("raw"),
            os(&input.path),
            os(&dev),
        ];
        cmd::convert(args, &move |f| conv.set(f)).await
    }

    /// Removes an LV we just made after a failure (the original error matters more).
    async fn undo_lv(&self, lv: &str) {
        if let Err(e) = self.lvremove(lv).await {
            tracing::warn!(pool = %self.cfg.name, lv, error = %e, "cannot remove a half-made LV");
        }
    }

    async fn publish_lv(&self, id: &str, size: u64) -> Result<DiskInfo, StorageError> {
        let m = DiskManifest {
            id: id.to_string(),
            size,
            format: "raw".into(),
            active: id.to_string(),
            created: now_rfc3339(),
            next_layer: 0,
            pending: Vec::new(),
        };
        if let Err(e) = self.write_disk(&m).await {
            self.undo_lv(id).await;
            return Err(e);
        }
        Ok(self.disk_info(&m))
    }

    /// A new LV for disk `id`, refusing names LVM already uses for something else.
    async fn new_lv(&self, id: &str, size: u64) -> Result<(), StorageError> {
        if self.lv_attr(id).await?.is_some() {
            return Err(StorageError::Conflict(format!(
                "volume group {} already has an LV named {id} that is not a disk of pool {}",
                self.vg(),
                self.cfg.name
            )));
        }
        self.lvcreate(id, size).await
    }

    pub(super) async fn lvm_create_disk(
        &self,
        id: &str,
        size: u64,
        base: &DiskBase,
        rep: &Reporter,
    ) -> Result<DiskInfo, StorageError> {
        if let DiskBase::Snapshot(_) = base {
            return Err(self.no_snapshots());
        }
        self.check_size(size).await?;
        if let Some(m) = self.read_disk(id).await? {
            return self.same_or_conflict(&m, size);
        }
        let input = self.lvm_input(base, size).await?;
        let _lock = self.lock().await?;
        if let Some(m) = self.read_disk(id).await? {
            return self.same_or_conflict(&m, size);
        }
        self.new_lv(id, size).await?;
        if let Err(e) = self.fill_lv(id, input.as_ref(), size, rep).await {
            self.undo_lv(id).await;
            return Err(e);
        }
        self.publish_lv(id, size).await
    }

    pub(super) async fn lvm_delete_disk(&self, id: &str) -> Result<(), StorageError> {
        let _lock = self.lock().await?;
        // An LV without our manifest may be anybody's: only our disks are removed.
        if self.read_disk(id).await?.is_none() {
            return Ok(());
        }
        if self.lv_attr(id).await?.is_some() {
            self.lvremove(id).await?;
        }
        self.remove_json(&self.disk_json(id)).await?;
        tracing::info!(pool = %self.cfg.name, disk = %id, "disk deleted");
        Ok(())
    }

    pub(super) async fn lvm_grow_disk(
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
        self.lv_idle(id).await?;
        let args = [
            os("--yes"),
            os("-L"),
            os(format!("{size}b")),
            self.lv_spec(id),
        ];
        let out = tool("lvextend", &args).await?;
        if !out.ok {
            if out.stderr.contains("Insufficient free space") {
                return Err(StorageError::NoSpace(out.stderr));
            }
            return Err(lvm_err("lvextend", out.stderr));
        }
        self.zero(&self.lv_path(id), m.size, size - m.size).await?;
        m.size = size;
        self.write_disk(&m).await?;
        Ok(self.disk_info(&m))
    }

    pub(super) async fn lvm_copy_disk(
        &self,
        src: &Source,
        dst: &str,
        size: u64,
        rep: &Reporter,
    ) -> Result<DiskInfo, StorageError> {
        let (src_dev, _, src_size) = self.source_file(src).await?;
        self.check_size(size).await?;
        if self.read_disk(dst).await?.is_some() {
            return Err(StorageError::Conflict(format!("disk {dst} exists already")));
        }
        let end = super::data_end(&src_dev, "raw").await?;
        if end > size {
            return Err(StorageError::DataBeyondSize {
                data_end: end,
                size,
            });
        }
        let _lock = self.lock().await?;
        if self.read_disk(dst).await?.is_some() {
            return Err(StorageError::Conflict(format!("disk {dst} exists already")));
        }
        self.new_lv(dst, size).await?;
        let dst_dev = self.lv_path(dst);
        let n = src_size.min(size);
        let conv = rep.sub(0.0, 0.95);
        // A raw node of `n` bytes over the source reads just what fits (shrink by copy).
        let src_opts = format!(
            "driver=raw,size={n},file.driver=host_device,file.filename={}",
            src_dev.display()
        );
        let args = vec![
            os("-U"),
            os("-n"),
            os("--image-opts"),
            os(src_opts),
            os("-O"),
            os("raw"),
            os(&dst_dev),
        ];
        let res = async {
            self.zero(&dst_dev, n, size - n).await?;
            cmd::convert(args, &move |f| conv.set(f)).await
        }
        .await;
        if let Err(e) = res {
            self.undo_lv(dst).await;
            return Err(e);
        }
        self.publish_lv(dst, size).await
    }

    pub(super) async fn lvm_replace_content(
        &self,
        id: &str,
        base: &DiskBase,
        rep: &Reporter,
    ) -> Result<DiskInfo, StorageError> {
        let m = self.need_disk(id).await?;
        let input = self.lvm_input(base, m.size).await?;
        let _lock = self.lock().await?;
        let m = self.need_disk(id).await?;
        self.lv_idle(id).await?;
        // In place: an LV has no layers, so a failed restore leaves the disk half-written.
        self.fill_lv(id, input.as_ref(), m.size, rep).await?;
        Ok(self.disk_info(&m))
    }
}
