//! Lease files on a shared pool: `<pool>/leases/<vm-id>` names the host that last renewed the
//! VM's lease, and its mtime is that renewal. A host refuses to start a VM whose file another
//! host renewed less than a lease ago: a guard on the storage itself, independent of the
//! controller's bookkeeping. (It compares the file's mtime with this host's wall clock, so the
//! hosts of a pool and its server must keep their clocks in step, as NFS needs anyway.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::LeaseError;

/// Files are rewritten at most this often (a fraction of any sensible lease): a renewal costs a
/// write and a rename on shared storage for each VM.
const RENEW_EVERY: Duration = Duration::from_millis(1500);

pub(crate) struct LeaseFiles {
    /// `<pool>/leases`; `None` for a pool of this host alone.
    dir: Option<PathBuf>,
    host_id: String,
    renewed: std::sync::Mutex<HashMap<String, Instant>>,
}

/// Another host's fresh claim on a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub host: String,
    pub age: Duration,
}

impl LeaseFiles {
    pub(crate) fn new(pool: &kumo_storage::pool::PoolConfig, host_id: &str) -> LeaseFiles {
        let shared = pool.kind == kumo_storage::pool::PoolKind::Shared;
        LeaseFiles::at(shared.then(|| pool.path.join("leases")), host_id)
    }

    pub(crate) fn at(dir: Option<PathBuf>, host_id: &str) -> LeaseFiles {
        LeaseFiles {
            dir,
            host_id: host_id.to_string(),
            renewed: Default::default(),
        }
    }

    fn path(dir: &Path, id: &str) -> PathBuf {
        dir.join(id)
    }

    /// Renew the files of VMs this host was just granted (those renewed lately are skipped).
    pub(crate) fn renew(&self, ids: &[String]) -> Result<(), LeaseError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let now = Instant::now();
        let due: Vec<&String> = {
            let renewed = self.renewed.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .filter(|id| {
                    renewed
                        .get(*id)
                        .is_none_or(|t| now.duration_since(*t) >= RENEW_EVERY)
                })
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(|source| LeaseError::Io {
            context: format!("creating {}", dir.display()),
            source,
        })?;
        for id in due {
            // A unique temp name and a rename: readers on other hosts never see half a file.
            let tmp = dir.join(format!(".{id}.{}.tmp", self.host_id));
            let path = Self::path(dir, id);
            std::fs::write(&tmp, self.host_id.as_bytes())
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|source| LeaseError::Io {
                    context: format!("renewing {}", path.display()),
                    source,
                })?;
            self.renewed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), now);
        }
        Ok(())
    }

    /// Another host's claim on the VM, if it renewed the file less than `ttl` ago.
    pub(crate) fn claimed_elsewhere(
        &self,
        id: &str,
        ttl: Duration,
    ) -> Result<Option<Claim>, LeaseError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = Self::path(dir, id);
        let io = |source| LeaseError::Io {
            context: format!("reading {}", path.display()),
            source,
        };
        let modified = match std::fs::metadata(&path) {
            Ok(m) => m.modified().map_err(io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let host = match std::fs::read_to_string(&path) {
            Ok(h) => h.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if host == self.host_id {
            return Ok(None);
        }
        // A file from the future (clocks apart) counts as just renewed.
        let age = SystemTime::now()
            .duration_since(modified)
            .unwrap_or(Duration::ZERO);
        Ok((age < ttl).then_some(Claim { host, age }))
    }

    /// This host no longer runs the VM: remove its file if this host wrote it last.
    pub(crate) fn release(&self, id: &str) {
        self.renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let Some(dir) = &self.dir else { return };
        let path = Self::path(dir, id);
        if std::fs::read_to_string(&path).is_ok_and(|h| h.trim() == self.host_id) {
            let _ = std::fs::remove_file(&path);
        }
    }
}
