//! Mark & sweep of a dir/shared pool's layers (run under the pool lock).
//!
//! Live = the active and pending layers of every disk manifest and the layer of every snapshot
//! pin, closed over backing files. Every `layers/*.qcow2` that is not live is deleted, so a
//! snapshot's layer survives its disk and a disk's layers survive while anything builds on them.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::layout::{
    self, read_dir_json_blocking, sync_dir, DiskManifest, SnapshotManifest, LAYER_EXT, STALE_TMP,
    TMP_SUFFIX,
};
use super::Pool;
use crate::{blocking, StorageError};

/// QEMU's limit on a backing file name.
const MAX_BACKING_NAME: u32 = 1023;

/// The backing file recorded in a qcow2 header, read directly (no process per layer).
/// `Ok(None)`: no backing file, or not a qcow2 file.
pub(super) fn read_backing(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let f = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    let mut got = 0;
    {
        let mut r = &f;
        while got < header.len() {
            match r.read(&mut header[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    if got < header.len() || header[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let be64 = |b: &[u8]| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    let offset = be64(&header[8..16]);
    let len = be64(&header[16..20]) as u32;
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > MAX_BACKING_NAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: backing file name of {len} bytes", path.display()),
        ));
    }
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, offset)?;
    let name = String::from_utf8(name).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: backing file name is not UTF-8", path.display()),
        )
    })?;
    let p = PathBuf::from(&name);
    // Relative names are relative to the layer's directory (ours are always absolute).
    Ok(Some(if p.is_absolute() {
        p
    } else {
        crate::parent_dir(path).join(p)
    }))
}

/// The layer name a backing path designates, if it lies in `layers_dir`.
fn layer_name(
    layers_dir: &Path,
    canonical_layers: Option<&Path>,
    backing: &Path,
) -> Option<String> {
    let parent = backing.parent()?;
    let inside = parent == layers_dir
        || canonical_layers
            .is_some_and(|c| std::fs::canonicalize(parent).ok().as_deref() == Some(c));
    if !inside {
        return None;
    }
    let name = backing.file_name()?.to_str()?;
    name.strip_suffix(&format!(".{LAYER_EXT}"))
        .map(str::to_string)
}

/// A temp file (`.…kumo-tmp`) nobody has written to for [`STALE_TMP`].
fn is_stale_tmp(entry: &std::fs::DirEntry, now: SystemTime) -> bool {
    entry.file_name().to_string_lossy().ends_with(TMP_SUFFIX)
        && entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_TMP)
}

fn gc_blocking(root: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let layers_dir = root.join(layout::LAYERS);
    let canonical_layers = std::fs::canonicalize(&layers_dir).ok();
    // An unreadable manifest aborts the whole GC: its layers might be the ones we'd delete.
    let disks: Vec<DiskManifest> = read_dir_json_blocking(&root.join(layout::DISKS))?;
    let snaps: Vec<SnapshotManifest> = read_dir_json_blocking(&root.join(layout::SNAPSHOTS))?;

    let mut stack: Vec<String> = Vec::new();
    for d in &disks {
        stack.push(d.active.clone());
        stack.extend(d.pending.iter().map(|p| p.layer.clone()));
    }
    stack.extend(snaps.iter().map(|s| s.layer.clone()));

    let mut live: HashSet<String> = HashSet::new();
    while let Some(layer) = stack.pop() {
        if !live.insert(layer.clone()) {
            continue;
        }
        let path = layers_dir.join(format!("{layer}.{LAYER_EXT}"));
        match read_backing(&path) {
            Ok(Some(b)) => {
                if let Some(parent) = layer_name(&layers_dir, canonical_layers.as_deref(), &b) {
                    stack.push(parent);
                }
            }
            Ok(None) => {}
            // A pending overlay QEMU has not made yet, or a chain that is already broken.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Not knowing a live layer's parent would risk deleting it: sweep nothing.
            Err(e) => {
                return Err(StorageError::io(
                    format!(
                        "reading the backing file of {} (nothing collected)",
                        path.display()
                    ),
                    e,
                ))
            }
        }
    }

    let mut deleted = Vec::new();
    let rd = std::fs::read_dir(&layers_dir)
        .map_err(|e| StorageError::io(format!("listing {}", layers_dir.display()), e))?;
    let now = SystemTime::now();
    for entry in rd {
        let entry =
            entry.map_err(|e| StorageError::io(format!("listing {}", layers_dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let doomed = if name.starts_with('.') {
            // A layer being built, left by a crashed agent once it is old.
            is_stale_tmp(&entry, now)
        } else {
            match name.strip_suffix(&format!(".{LAYER_EXT}")) {
                Some(layer) => !live.contains(layer),
                None => false,
            }
        };
        if !doomed {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => deleted.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an unused layer")
            }
        }
    }
    if !deleted.is_empty() {
        sync_dir(&layers_dir);
    }
    // Manifests being written when an agent crashed.
    for dir in [layout::DISKS, layout::SNAPSHOTS].map(|d| root.join(d)) {
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
        for entry in rd.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.')
                && is_stale_tmp(&entry, now)
                && std::fs::remove_file(entry.path()).is_ok()
            {
                deleted.push(entry.path());
            }
        }
    }
    deleted.sort();
    Ok(deleted)
}

impl Pool {
    /// GC with the pool lock already held by the caller.
    pub(super) async fn gc_locked(&self) -> Result<Vec<PathBuf>, StorageError> {
        if self.is_lvm() {
            // An LV without manifest may be anybody's (the VG is shared with the host): keep it.
            return Ok(Vec::new());
        }
        let root = self.root.clone();
        let deleted = blocking(move || gc_blocking(&root)).await?;
        for p in &deleted {
            tracing::info!(pool = %self.cfg.name, path = %p.display(), "unused layer deleted");
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_of_non_qcow2_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"not a qcow2 at all, just text").unwrap();
        assert_eq!(read_backing(&p).unwrap(), None);
        std::fs::write(&p, b"QFI").unwrap();
        assert_eq!(read_backing(&p).unwrap(), None);
        assert!(read_backing(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn backing_name_too_long_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[15] = 32; // offset 32
        h[18] = 0x10; // 4096 bytes
        std::fs::write(&p, &h).unwrap();
        assert!(read_backing(&p).is_err());
    }
}
