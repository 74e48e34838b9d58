//! The backup repository: a directory (possibly shared by several hosts) holding each disk's
//! chain of backups.
//!
//! ```text
//! <repo>/<disk-id>/<backup-id>.qcow2   full (no backing) or incremental (backing = the previous
//!                                      backup's file, named relative to this directory)
//! <repo>/<disk-id>/<backup-id>.json    manifest, written only once the file was verified
//! <repo>/<disk-id>/.lock               flock(2)ed by every mutation of the disk's backups
//! ```
//!
//! A backup exists only once its manifest does: [`BackupRepo::prepare`] creates the target
//! file, QEMU fills it (kumo-hypervisor's `backup_disk`), [`BackupRepo::finish`] checks and
//! hashes it and writes the manifest. Anything interrupted leaves a file without a manifest,
//! which the next [`BackupRepo::repair`] (run first by every `prepare`) deletes. Backing files
//! are relative names, so the repository can be mounted at different paths on different hosts.
//!
//! The disk's lock is held from `prepare` until `finish`/`abandon` (or until the
//! [`PreparedBackup`] is dropped, or the process dies): no other host can repair away or rebase
//! files under a running backup. Operations that find it held fail with
//! [`StorageError::Busy`] instead of waiting for a backup that may take hours.

mod chain;
mod retention;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use retention::{expired, Retention};

use crate::{blocking, qemu, StorageError};

const LOCK_FILE: &str = ".lock";
const TMP_SUFFIX: &str = ".kumo-tmp";
/// How long a held disk lock is retried before the operation fails with `Busy`.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a backup holds the whole disk or only what changed since its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incremental,
}

/// `<repo>/<disk>/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub id: String,
    pub disk: String,
    pub kind: BackupKind,
    /// The backup this one's file is backed by (`None` for a full backup).
    pub parent: Option<String>,
    /// When the backup was prepared, i.e. just before QEMU took its point in time.
    pub created: DateTime<Utc>,
    pub virtual_size: u64,
    /// Bytes allocated on the host by this backup's own file.
    pub file_bytes: u64,
    /// sha256 (lowercase hex) of the chain's whole virtual content (what a restore yields).
    pub sha256: String,
    /// The dirty bitmap QEMU started with this backup: it tracks the writes made since, so
    /// the next incremental reads it.
    pub bitmap: String,
}

/// A backup that has a target file but no manifest yet. Holds the disk's lock until
/// [`BackupRepo::finish`] or [`BackupRepo::abandon`] (or until dropped).
pub struct PreparedBackup {
    pub disk: String,
    pub id: String,
    /// The qcow2 file QEMU must write (already created; backing = the parent's file).
    pub target: PathBuf,
    /// The backup this one is incremental to; `None`: a full backup.
    pub parent: Option<BackupManifest>,
    created: DateTime<Utc>,
    lock: Mutex<Option<DiskLock>>,
}

impl std::fmt::Debug for PreparedBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedBackup")
            .field("disk", &self.disk)
            .field("id", &self.id)
            .field("target", &self.target)
            .field("parent", &self.parent.as_ref().map(|p| &p.id))
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl PreparedBackup {
    fn take_lock(&self) -> Option<DiskLock> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn is_pending(&self) -> bool {
        self.lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// An exclusive flock(2) on `<repo>/<disk>/.lock`, released when dropped (or when the process
/// dies). flock works across hosts on NFS (emulated with POSIX locks) and between two opens
/// in the same process.
struct DiskLock {
    _file: File,
}

impl DiskLock {
    async fn try_acquire(dir: &Path, disk: &str) -> Result<DiskLock, StorageError> {
        let path = dir.join(LOCK_FILE);
        let disk = disk.to_string();
        blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
            // A process forked elsewhere in the agent holds a copy of a just-closed lock's
            // descriptor until it execs (CLOEXEC): retry briefly before calling it busy.
            let deadline = std::time::Instant::now() + LOCK_GRACE;
            loop {
                // SAFETY: flock(2) on a descriptor this function owns.
                let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if rc == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(StorageError::io(format!("locking {}", path.display()), e));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(StorageError::Busy(format!(
                        "another backup operation on disk {disk} is in progress"
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(DiskLock { _file: file })
        })
        .await
    }
}

/// Disk and backup ids become file names: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn check_id(what: &str, s: &str) -> Result<(), StorageError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "{what} {s:?} must be 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

fn file_name(id: &str) -> String {
    format!("{id}.qcow2")
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn remove_if_exists(p: &Path) -> Result<bool, StorageError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StorageError::io(format!("removing {}", p.display()), e)),
    }
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync directory");
    }
}

/// Bytes the file occupies on the host (sparse regions excluded).
fn allocated(p: &Path) -> Result<u64, StorageError> {
    std::fs::metadata(p)
        .map(|m| m.blocks() * 512)
        .map_err(|e| StorageError::io(format!("reading {}", p.display()), e))
}

/// Every manifest of a disk, oldest first. A manifest that cannot be read is an error, never
/// skipped: skipping it would make repair delete its backup file.
fn read_manifests(dir: &Path, disk: &str) -> Result<Vec<BackupManifest>, StorageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io(format!("reading {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| StorageError::io(format!("reading {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let bytes = std::fs::read(&path)
            .map_err(|e| StorageError::io(format!("reading {}", path.display()), e))?;
        let m: BackupManifest = serde_json::from_slice(&bytes).map_err(|e| {
            StorageError::Corrupt(format!("backup manifest {}: {e}", path.display()))
        })?;
        if m.id != id || m.disk != disk {
            return Err(StorageError::Corrupt(format!(
                "backup manifest {} names backup {:?} of disk {:?}",
                path.display(),
                m.id,
                m.disk
            )));
        }
        out.push(m);
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

/// Write (or replace) a manifest atomically and durably: temp file, fsync, rename, fsync dir.
fn write_manifest(dir: &Path, m: &BackupManifest) -> Result<(), StorageError> {
    let path = dir.join(format!("{}.json", m.id));
    let tmp = dir.join(format!(
        ".{}.json.{}{TMP_SUFFIX}",
        m.id,
        uuid::Uuid::new_v4().simple()
    ));
    let data = serde_json::to_vec_pretty(m)
        .map_err(|e| StorageError::Parse(format!("encoding manifest: {e}")))?;
    let result = (|| {
        use std::io::Write;
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(StorageError::io(format!("writing {}", path.display()), e));
    }
    sync_dir(dir);
    Ok(())
}

/// Delete what no manifest accounts for: backup files of interrupted runs and temp files.
fn repair_dir(dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io(format!("reading {}", dir.display()), e)),
    };
    let mut deleted = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| StorageError::io(format!("reading {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let orphan = if name.ends_with(TMP_SUFFIX) {
            true
        } else if let Some(id) = name.strip_suffix(".qcow2") {
            !name.starts_with('.') && !exists(&dir.join(format!("{id}.json")))
        } else {
            false
        };
        if orphan && remove_if_exists(&entry.path())? {
            tracing::info!(file = %entry.path().display(), "deleted a backup file without manifest");
            deleted.push(entry.path());
        }
    }
    if !deleted.is_empty() {
        sync_dir(dir);
    }
    deleted.sort();
    Ok(deleted)
}

/// A backup repository rooted at a directory.
#[derive(Debug, Clone)]
pub struct BackupRepo {
    root: PathBuf,
}

impl BackupRepo {
    /// Open an existing directory. It is never created: a missing mount must not turn into
    /// backups silently written to the local disk.
    pub fn open(root: &Path) -> Result<BackupRepo, StorageError> {
        let root = qemu::absolute(root)?;
        match std::fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(BackupRepo { root }),
            Ok(_) => Err(StorageError::InvalidArgument(format!(
                "backup repository {} is not a directory",
                root.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NotFound(root)),
            Err(e) => Err(StorageError::io(format!("opening {}", root.display()), e)),
        }
    }

    /// The repository's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn disk_dir(&self, disk: &str) -> PathBuf {
        self.root.join(disk)
    }

    /// The file whose chain holds the backup's whole content (flatten it to restore).
    pub fn chain_file(&self, disk: &str, id: &str) -> PathBuf {
        self.disk_dir(disk).join(file_name(id))
    }

    /// Lock an existing disk directory (`NotFound` names `what` if it does not exist).
    async fn lock_existing(&self, disk: &str, what: &Path) -> Result<DiskLock, StorageError> {
        check_id("disk id", disk)?;
        let dir = self.disk_dir(disk);
        if !dir.is_dir() {
            return Err(StorageError::NotFound(what.to_path_buf()));
        }
        DiskLock::try_acquire(&dir, disk).await
    }

    /// The disk's backups, oldest first.
    pub async fn backups(&self, disk: &str) -> Result<Vec<BackupManifest>, StorageError> {
        check_id("disk id", disk)?;
        let dir = self.disk_dir(disk);
        let disk = disk.to_string();
        blocking(move || read_manifests(&dir, &disk)).await
    }

    fn find(list: &[BackupManifest], dir: &Path, id: &str) -> Result<usize, StorageError> {
        list.iter()
            .position(|m| m.id == id)
            .ok_or_else(|| StorageError::NotFound(dir.join(format!("{id}.json"))))
    }

    /// Delete the disk's files that have no manifest (interrupted backups); returns them.
    pub async fn repair(&self, disk: &str) -> Result<Vec<PathBuf>, StorageError> {
        check_id("disk id", disk)?;
        let dir = self.disk_dir(disk);
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let _lock = DiskLock::try_acquire(&dir, disk).await?;
        blocking(move || repair_dir(&dir)).await
    }

    /// Repair, then create the target of a new backup: incremental on top of the newest backup
    /// if `incremental` and that backup is usable, else full. `virtual_size` is the disk's size
    /// now (a disk smaller than its last backup gets a full backup).
    pub async fn prepare(
        &self,
        disk: &str,
        id: &str,
        virtual_size: u64,
        incremental: bool,
    ) -> Result<PreparedBackup, StorageError> {
        check_id("disk id", disk)?;
        check_id("backup id", id)?;
        if virtual_size == 0 {
            return Err(StorageError::Empty("disk size 0".into()));
        }
        let dir = self.disk_dir(disk);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        let lock = DiskLock::try_acquire(&dir, disk).await?;
        let (list, target) = {
            let (dir, disk, id) = (dir.clone(), disk.to_string(), id.to_string());
            blocking(move || {
                repair_dir(&dir)?;
                let list = read_manifests(&dir, &disk)?;
                let manifest = dir.join(format!("{id}.json"));
                let target = dir.join(file_name(&id));
                if list.iter().any(|m| m.id == id) {
                    return Err(StorageError::AlreadyExists(manifest));
                }
                if exists(&target) {
                    return Err(StorageError::AlreadyExists(target));
                }
                Ok((list, target))
            })
            .await?
        };
        let parent = match list.last() {
            Some(p) if incremental => {
                let file = dir.join(file_name(&p.id));
                if !file.is_file() {
                    tracing::warn!(%disk, backup = %p.id, "newest backup's file is missing: taking a full backup");
                    None
                } else if p.virtual_size > virtual_size {
                    tracing::warn!(%disk, backup = %p.id, "disk is smaller than its last backup: taking a full backup");
                    None
                } else {
                    Some(p.clone())
                }
            }
            _ => None,
        };
        let backing = parent.as_ref().map(|p| PathBuf::from(file_name(&p.id)));
        if let Err(e) = qemu::create_qcow2(&target, virtual_size, backing.as_deref()).await {
            let _ = remove_if_exists(&target);
            return Err(e);
        }
        tracing::info!(%disk, backup = %id, parent = ?parent.as_ref().map(|p| &p.id), "backup target created");
        Ok(PreparedBackup {
            disk: disk.to_string(),
            id: id.to_string(),
            target,
            parent,
            created: Utc::now(),
            lock: Mutex::new(Some(lock)),
        })
    }

    /// Verify the filled target (`qemu-img check`, then the chain's content hashed once) and
    /// write the manifest. Only then does the backup exist. On error nothing is written and the
    /// target stays for [`BackupRepo::abandon`].
    pub async fn finish(
        &self,
        p: &PreparedBackup,
        bitmap: &str,
    ) -> Result<BackupManifest, StorageError> {
        if bitmap.is_empty() {
            return Err(StorageError::InvalidArgument("empty bitmap name".into()));
        }
        if !p.is_pending() {
            return Err(StorageError::InvalidArgument(format!(
                "backup {} of disk {} was already finished or abandoned",
                p.id, p.disk
            )));
        }
        chain::check(&p.target).await?;
        let infos = chain::chain_info(&p.target).await?;
        let want = p.parent.as_ref().map(|m| file_name(&m.id));
        let got = infos.first().and_then(|i| i.backing_filename.clone());
        if got != want {
            return Err(StorageError::Corrupt(format!(
                "{} is backed by {got:?}, expected {want:?}",
                p.target.display()
            )));
        }
        let (sha256, virtual_size) = chain::content_sha256(&p.target).await?;
        let m = BackupManifest {
            id: p.id.clone(),
            disk: p.disk.clone(),
            kind: match p.parent {
                None => BackupKind::Full,
                Some(_) => BackupKind::Incremental,
            },
            parent: p.parent.as_ref().map(|m| m.id.clone()),
            created: p.created,
            virtual_size,
            file_bytes: allocated(&p.target)?,
            sha256,
            bitmap: bitmap.to_string(),
        };
        let dir = self.disk_dir(&p.disk);
        let manifest = m.clone();
        blocking(move || write_manifest(&dir, &manifest)).await?;
        drop(p.take_lock());
        tracing::info!(disk = %m.disk, backup = %m.id, kind = ?m.kind, bytes = m.file_bytes, "backup recorded");
        Ok(m)
    }

    /// Give up a prepared backup: its target is deleted and the lock released. Idempotent;
    /// refused once the backup was finished (delete it instead).
    pub async fn abandon(&self, p: &PreparedBackup) -> Result<(), StorageError> {
        let dir = self.disk_dir(&p.disk);
        if !p.is_pending() {
            if exists(&dir.join(format!("{}.json", p.id))) {
                return Err(StorageError::InvalidArgument(format!(
                    "backup {} of disk {} is finished; delete it instead",
                    p.id, p.disk
                )));
            }
            return Ok(());
        }
        let target = p.target.clone();
        blocking(move || {
            remove_if_exists(&target)?;
            sync_dir(&dir);
            Ok(())
        })
        .await?;
        drop(p.take_lock());
        tracing::info!(disk = %p.disk, backup = %p.id, "backup abandoned");
        Ok(())
    }

    /// Check the backup's file and re-hash its chain against the manifest.
    pub async fn verify(&self, disk: &str, id: &str) -> Result<(), StorageError> {
        check_id("backup id", id)?;
        let dir = self.disk_dir(disk);
        let _lock = self
            .lock_existing(disk, &dir.join(format!("{id}.json")))
            .await?;
        let list = self.backups(disk).await?;
        let m = &list[Self::find(&list, &dir, id)?];
        let file = dir.join(file_name(id));
        if !file.is_file() {
            return Err(StorageError::Corrupt(format!(
                "backup {id} of disk {disk}: {} is missing",
                file.display()
            )));
        }
        chain::check(&file).await?;
        let (sha, size) = chain::content_sha256(&file).await?;
        if sha != m.sha256 || size != m.virtual_size {
            return Err(StorageError::Corrupt(format!(
                "backup {id} of disk {disk}: content sha256 {sha} ({size} bytes) differs from the manifest's {} ({} bytes)",
                m.sha256, m.virtual_size
            )));
        }
        Ok(())
    }

    /// Delete a backup, keeping every other one restorable: a backup's children get its data
    /// (`qemu-img rebase` onto its parent, or standalone when it was the full one) before its
    /// files go.
    pub async fn delete(&self, disk: &str, id: &str) -> Result<(), StorageError> {
        check_id("backup id", id)?;
        let dir = self.disk_dir(disk);
        let _lock = self
            .lock_existing(disk, &dir.join(format!("{id}.json")))
            .await?;
        let list = self.backups(disk).await?;
        let gone = list[Self::find(&list, &dir, id)?].clone();
        for child in list.iter().filter(|m| m.parent.as_deref() == Some(id)) {
            let child_file = dir.join(file_name(&child.id));
            let new_backing = gone.parent.as_deref().map(file_name);
            // Safe mode: the child's content is the same before, during and after.
            chain::rebase(&child_file, new_backing.as_deref()).await?;
            let mut updated = child.clone();
            updated.parent = gone.parent.clone();
            updated.kind = match updated.parent {
                None => BackupKind::Full,
                Some(_) => BackupKind::Incremental,
            };
            updated.file_bytes = allocated(&child_file)?;
            let d = dir.clone();
            blocking(move || write_manifest(&d, &updated)).await?;
            tracing::info!(%disk, backup = %child.id, parent = ?gone.parent, "backup rebased");
        }
        let (d, id2) = (dir.clone(), id.to_string());
        blocking(move || {
            // Manifest first: a crash in between leaves a file without manifest, which repair
            // removes.
            remove_if_exists(&d.join(format!("{id2}.json")))?;
            remove_if_exists(&d.join(file_name(&id2)))?;
            sync_dir(&d);
            Ok(())
        })
        .await?;
        tracing::info!(%disk, backup = %id, "backup deleted");
        Ok(())
    }
}
