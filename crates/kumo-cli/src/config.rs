//! The client configuration: `~/.config/kumo/config.toml`, overridable by environment.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ClientError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientConfig {
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

pub fn config_path() -> PathBuf {
    if let Ok(p) = std::env::var("KUMO_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".config")
        });
    base.join("kumo").join("config.toml")
}

impl ClientConfig {
    /// The file, then `KUMO_ENDPOINT`, `KUMO_REGION`, `KUMO_ACCESS_KEY_ID`, `KUMO_SECRET_ACCESS_KEY`.
    pub fn load() -> Result<ClientConfig, ClientError> {
        let path = config_path();
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(s) => toml::from_str::<ClientConfig>(&s).map_err(|e| {
                ClientError::Config(format!("{} is not valid: {e}", path.display()))
            })?,
            Err(_) => ClientConfig {
                endpoint: String::new(),
                region: "kumo".into(),
                access_key_id: String::new(),
                secret_access_key: String::new(),
            },
        };
        if let Ok(v) = std::env::var("KUMO_ENDPOINT") {
            cfg.endpoint = v;
        }
        if let Ok(v) = std::env::var("KUMO_REGION") {
            cfg.region = v;
        }
        if let Ok(v) = std::env::var("KUMO_ACCESS_KEY_ID") {
            cfg.access_key_id = v;
        }
        if let Ok(v) = std::env::var("KUMO_SECRET_ACCESS_KEY") {
            cfg.secret_access_key = v;
        }
        if cfg.endpoint.is_empty() || cfg.access_key_id.is_empty() {
            return Err(ClientError::Config(format!(
                "no kumo endpoint or access key configured: run `kumo up` (it writes {}) or set KUMO_ENDPOINT, KUMO_ACCESS_KEY_ID and KUMO_SECRET_ACCESS_KEY",
                path.display()
            )));
        }
        Ok(cfg)
    }

    /// Write the file readable by its owner only (it holds a secret).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ClientError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                ClientError::Config(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let text = toml::to_string(self).map_err(|e| ClientError::Config(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ClientError::Config(format!("cannot write {}: {e}", tmp.display())))?;
        f.write_all(
            format!("# Written by `kumo up`. The CLI reads it; keep it private.\n{text}")
                .as_bytes(),
        )
        .map_err(|e| ClientError::Config(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| ClientError::Config(e.to_string()))
    }
}
