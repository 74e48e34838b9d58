//! kumo's command-line client. [`Client`] signs every request with SigV4; the commands print
//! human tables by default and JSON with `-o json`.

mod client;
mod commands;
mod config;
mod groups;
mod ha;
mod migrate;
mod networks;
mod security;
mod storage;
mod streams;

pub use client::{Client, ImageWithOperation};
pub use commands::{follow_operation, wait_for, HostCmd, ImageCmd, Output, TokenCmd, VmCmd};
pub use config::{config_path, ClientConfig};
pub use groups::PlacementGroupCmd;
pub use migrate::{EvacuateArgs, MigrateArgs, MigrationCmd, ReturnArgs};
pub use networks::{AddressCmd, AddressPoolCmd, NetworkCmd};
pub use security::{KeyCmd, KeyType, Proto, SgCmd};
pub use storage::{
    human_size, parse_size, BackupCmd, CloneArgs, PoolCmd, RatioError, ScheduleCmd, SizeError,
    SnapshotCmd, VolumeCmd, VolumeWithOperation,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach kumo at {0}: {1}\n  is the controller running? (`kumo up`)")]
    Unreachable(String, String),
    #[error("{message} ({code}, HTTP {status}{})", if request_id.is_empty() { String::new() } else { format!(", request {request_id}") })]
    Api {
        status: u16,
        code: String,
        message: String,
        request_id: String,
    },
    #[error("{0}")]
    Http(String),
    #[error("{0}")]
    Failed(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl ClientError {
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}
