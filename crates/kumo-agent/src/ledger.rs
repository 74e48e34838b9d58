//! The agent's local record: its identity and every VM spec it accepted, as small JSON files
//! written atomically (write a temp file, fsync, rename).

use std::path::{Path, PathBuf};

use kumo_types::agent::VmDesired;
use serde::{Deserialize, Serialize};

use crate::AgentError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub host_id: String,
    pub host_secret: String,
    pub controller: String,
}

/// One VM as the agent records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmRecord {
    pub desired: VmDesired,
    /// The generation whose convergence finished (successfully or not).
    pub applied_generation: i64,
    pub applied_reboot_seq: i64,
    pub error: Option<String>,
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AgentError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| AgentError::io(format!("writing {}", tmp.display()), e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| AgentError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| AgentError::io(format!("renaming {}", tmp.display()), e))
}

pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("identity.json")
}

pub fn load_identity(data_dir: &Path) -> Result<Option<Identity>, AgentError> {
    let p = identity_path(data_dir);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(format!("reading {}", p.display()), e)),
    }
}

pub fn save_identity(data_dir: &Path, id: &Identity) -> Result<(), AgentError> {
    write_atomic(&identity_path(data_dir), &serde_json::to_vec_pretty(id)?)
}

pub fn vm_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger")
}

pub fn load_vms(data_dir: &Path) -> Result<Vec<VmRecord>, AgentError> {
    load_dir(&vm_dir(data_dir))
}

/// Every `*.json` record in `dir` (none if the directory does not exist).
pub fn load_dir<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<Vec<T>, AgentError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(AgentError::io(format!("reading {}", dir.display()), e)),
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let b =
            std::fs::read(&p).map_err(|e| AgentError::io(format!("reading {}", p.display()), e))?;
        out.push(serde_json::from_slice(&b)?);
    }
    Ok(out)
}

/// Remove a record file; one that is not there is fine.
pub fn remove_record(p: &Path) -> Result<(), AgentError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("removing {}", p.display()), e)),
    }
}

pub fn save_vm(data_dir: &Path, rec: &VmRecord) -> Result<(), AgentError> {
    write_atomic(
        &vm_dir(data_dir).join(format!("{}.json", rec.desired.id)),
        &serde_json::to_vec_pretty(rec)?,
    )
}

pub fn remove_vm(data_dir: &Path, id: &str) -> Result<(), AgentError> {
    remove_record(&vm_dir(data_dir).join(format!("{id}.json")))
}
