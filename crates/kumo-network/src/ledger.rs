//! The record, in the state directory, of what kumo created on this host (so it removes only its own).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, NetworkError};

const FILE: &str = "network-ledger.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ledger {
    /// kumo created the network namespace (so teardown deletes it).
    #[serde(default)]
    pub netns_created: bool,
    #[serde(default)]
    pub bridges: BTreeSet<String>,
    #[serde(default)]
    pub taps: BTreeSet<String>,
    /// Networks with a dnsmasq.
    #[serde(default)]
    pub networks: BTreeSet<String>,
    /// VXLAN/VLAN devices, router veths and public veths (host ends).
    #[serde(default)]
    pub ports: BTreeSet<String>,
    /// Router namespaces.
    #[serde(default)]
    pub routers: BTreeSet<String>,
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

impl Ledger {
    pub fn load(state_dir: &Path) -> Result<Self, NetworkError> {
        let p = path(state_dir);
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NetworkError::Io {
                path: p,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(NetworkError::Io { path: p, source: e }),
        }
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), NetworkError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| NetworkError::Io {
            path: path(state_dir),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        write_atomic(&path(state_dir), &json)
    }
}

/// Writes `contents` to a temporary file beside `path` and renames it over `path`.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), NetworkError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
