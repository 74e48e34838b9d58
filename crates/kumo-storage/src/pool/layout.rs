//! The pool's files: manifests (written atomically), the pool lock, layer names.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{check_id, DiskInfo, Pool, SnapshotInfo};
use crate::{blocking, StorageError};

pub(super) const IMAGES: &str = "images";
pub(super) const LAYERS: &str = "layers";
pub(super) const DISKS: &str = "disks";
pub(super) const SNAPSHOTS: &str = "snapshots";
const LOCK_FILE: &str = ".lock";
pub(super) const LAYER_EXT: &str = "qcow2";
/// Suffix of every temporary file (layers being built, manifests being written).
pub(super) const TMP_SUFFIX: &str = ".kumo-tmp";
/// Temp files untouched for this long belong to a crashed agent (a running copy keeps writing).
pub(super) const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

/// `disks/<id>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct DiskManifest {
    pub id: String,
    pub size: u64,
    pub format: String,
    /// Active layer name (dir/shared) or LV name (lvm).
    pub active: String,
    pub created: String,
    /// Next layer number for this disk: layer names are never reused.
    #[serde(default)]
    pub next_layer: u64,
    /// Overlays planned for live snapshots: live for the GC until committed or aborted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingLayer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PendingLayer {
    pub layer: String,
    pub snapshot: String,
}

/// `snapshots/<id>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapshotManifest {
    pub id: String,
    pub disk: String,
    /// The frozen layer's name.
    pub layer: String,
    pub size: u64,
    pub created: String,
}

/// The exclusive pool lock; released when dropped (the file is closed).
pub(super) struct PoolLock {
    _file: std::fs::File,
}

fn flock_blocking(path: &Path) -> Result<PoolLock, StorageError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(PoolLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(StorageError::io(format!("locking {}", path.display()), e));
        }
    }
}

/// Turns ENOSPC/EDQUOT into [`StorageError::NoSpace`].
pub(super) fn io_err(context: String, e: std::io::Error) -> StorageError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::NoSpace(format!("{context}: {e}")),
        _ => StorageError::io(context, e),
    }
}

pub(super) fn sync_dir(dir: &Path) {
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync directory");
    }
}

/// tmp + fsync + rename + fsync(dir): readers see the old or the new manifest, never a torn one.
fn write_json_blocking(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let dir = crate::parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}{TMP_SUFFIX}",
        uuid::Uuid::new_v4().simple()
    ));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err(format!("creating {}", tmp.display()), e))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| io_err(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| io_err(format!("renaming into {}", path.display()), e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res?;
    sync_dir(&dir);
    Ok(())
}

fn read_json_blocking<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StorageError::Parse(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(format!("reading {}", path.display()), e)),
    }
}

/// Every `*.json` manifest of a directory (temp files skipped), sorted by file name.
pub(super) fn read_dir_json_blocking<T: DeserializeOwned>(
    dir: &Path,
) -> Result<Vec<T>, StorageError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && name.ends_with(".json") {
            names.push(name);
        }
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        // A manifest removed since the listing is simply gone.
        if let Some(v) = read_json_blocking(&dir.join(n))? {
            out.push(v);
        }
    }
    Ok(out)
}

/// RFC 3339 UTC timestamp (seconds) without a date library.
pub(super) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// `<disk-id>.<n>` → (`disk-id`, n).
pub(super) fn split_layer(layer: &str) -> Option<(&str, u64)> {
    let (disk, n) = layer.rsplit_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((disk, n.parse().ok()?))
}

impl Pool {
    pub(super) async fn lock(&self) -> Result<PoolLock, StorageError> {
        let path = self.root.join(LOCK_FILE);
        blocking(move || flock_blocking(&path)).await
    }

    pub(super) fn layers_dir(&self) -> PathBuf {
        self.root.join(LAYERS)
    }

    pub(super) fn layer_path(&self, layer: &str) -> PathBuf {
        self.layers_dir().join(format!("{layer}.{LAYER_EXT}"))
    }

    /// The layer name of a path in this pool's `layers/`, if it is one.
    pub(super) fn layer_of(&self, path: &Path) -> Option<String> {
        if path.parent()? != self.layers_dir() {
            return None;
        }
        let name = path.file_name()?.to_str()?;
        let layer = name.strip_suffix(&format!(".{LAYER_EXT}"))?;
        check_id("layer", layer).ok()?;
        Some(layer.to_string())
    }

    pub(super) fn disk_json(&self, id: &str) -> PathBuf {
        self.root.join(DISKS).join(format!("{id}.json"))
    }

    pub(super) fn snapshot_json(&self, id: &str) -> PathBuf {
        self.root.join(SNAPSHOTS).join(format!("{id}.json"))
    }

    /// A fresh temp path in `layers/` for a layer being built (invisible to the GC's sweep).
    pub(super) fn tmp_layer(&self, label: &str) -> crate::TempFile {
        crate::TempFile::in_dir(&self.layers_dir(), label)
    }

    pub(super) async fn read_disk(&self, id: &str) -> Result<Option<DiskManifest>, StorageError> {
        let p = self.disk_json(id);
        blocking(move || read_json_blocking(&p)).await
    }

    pub(super) async fn need_disk(&self, id: &str) -> Result<DiskManifest, StorageError> {
        self.read_disk(id)
            .await?
            .ok_or_else(|| StorageError::NotFound(self.disk_json(id)))
    }

    pub(super) async fn read_snapshot(
        &self,
        id: &str,
    ) -> Result<Option<SnapshotManifest>, StorageError> {
        let p = self.snapshot_json(id);
        blocking(move || read_json_blocking(&p)).await
    }

    pub(super) async fn need_snapshot(&self, id: &str) -> Result<SnapshotManifest, StorageError> {
        self.read_snapshot(id)
            .await?
            .ok_or_else(|| StorageError::NotFound(self.snapshot_json(id)))
    }

    pub(super) async fn read_all_disks(&self) -> Result<Vec<DiskManifest>, StorageError> {
        let dir = self.root.join(DISKS);
        blocking(move || read_dir_json_blocking(&dir)).await
    }

    pub(super) async fn write_disk(&self, m: &DiskManifest) -> Result<(), StorageError> {
        let p = self.disk_json(&m.id);
        let bytes = serde_json::to_vec_pretty(m)
            .map_err(|e| StorageError::Parse(format!("encoding a manifest: {e}")))?;
        blocking(move || write_json_blocking(&p, &bytes)).await
    }

    pub(super) async fn write_snapshot(&self, s: &SnapshotManifest) -> Result<(), StorageError> {
        let p = self.snapshot_json(&s.id);
        let bytes = serde_json::to_vec_pretty(s)
            .map_err(|e| StorageError::Parse(format!("encoding a manifest: {e}")))?;
        blocking(move || write_json_blocking(&p, &bytes)).await
    }

    /// Removes a manifest durably; a missing one is fine.
    pub(super) async fn remove_json(&self, path: &Path) -> Result<(), StorageError> {
        let p = path.to_path_buf();
        blocking(move || {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(StorageError::io(format!("removing {}", p.display()), e)),
            }
            sync_dir(&crate::parent_dir(&p));
            Ok(())
        })
        .await
    }

    /// The next unused layer name of `disk` (call under the lock): past the manifest's counter
    /// and every layer file of that disk still present.
    pub(super) async fn alloc_layer(
        &self,
        disk: &str,
        manifest: Option<&mut DiskManifest>,
    ) -> Result<String, StorageError> {
        let dir = self.layers_dir();
        let prefix = disk.to_string();
        let on_disk = blocking(move || {
            let rd = std::fs::read_dir(&dir)
                .map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
            let mut next = 0u64;
            for entry in rd {
                let entry =
                    entry.map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(layer) = name.strip_suffix(&format!(".{LAYER_EXT}")) else {
                    continue;
                };
                if let Some((d, n)) = split_layer(layer) {
                    if d == prefix {
                        next = next.max(n.saturating_add(1));
                    }
                }
            }
            Ok(next)
        })
        .await?;
        let n = match manifest {
            Some(m) => {
                let n = on_disk.max(m.next_layer);
                m.next_layer = n + 1;
                n
            }
            None => on_disk,
        };
        Ok(format!("{disk}.{n}"))
    }

    pub(super) fn disk_info(&self, m: &DiskManifest) -> DiskInfo {
        let path = if self.is_lvm() {
            self.lv_path(&m.active)
        } else {
            self.layer_path(&m.active)
        };
        DiskInfo {
            id: m.id.clone(),
            size: m.size,
            format: m.format.clone(),
            path,
        }
    }

    pub(super) fn snapshot_info(&self, s: &SnapshotManifest) -> SnapshotInfo {
        SnapshotInfo {
            id: s.id.clone(),
            disk: s.disk.clone(),
            layer: self.layer_path(&s.layer),
            size: s.size,
        }
    }

    /// An existing disk is the answer to a repeated create of the same size.
    pub(super) fn same_or_conflict(
        &self,
        m: &DiskManifest,
        size: u64,
    ) -> Result<DiskInfo, StorageError> {
        if m.size == size {
            Ok(self.disk_info(m))
        } else {
            Err(StorageError::Conflict(format!(
                "disk {} already exists with {} bytes, not {size}",
                m.id, m.size
            )))
        }
    }

    /// Sizes are exact bytes: qcow2 needs a multiple of 512, an LV a multiple of the extent size.
    pub(super) async fn check_size(&self, size: u64) -> Result<(), StorageError> {
        if size == 0 {
            return Err(StorageError::Empty("disk size 0".into()));
        }
        if self.is_lvm() {
            let extent = self.vg_figures().await?.extent;
            if extent > 0 && size % extent != 0 {
                return Err(StorageError::InvalidArgument(format!(
                    "size {size} is not a multiple of the volume group's extent size \
                     ({extent} bytes)"
                )));
            }
        } else if size % 512 != 0 {
            return Err(StorageError::InvalidArgument(format!(
                "size {size} is not a multiple of 512 bytes (qcow2 would round it up to {})",
                size.div_ceil(512) * 512
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(split_layer("vol-1.0"), Some(("vol-1", 0)));
        assert_eq!(split_layer("a.b.12"), Some(("a.b", 12)));
        assert_eq!(split_layer("a.b"), None);
        assert_eq!(split_layer("a."), None);
    }

    #[test]
    fn timestamp_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }
}
