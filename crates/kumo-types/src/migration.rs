//! Live migration: the native API's request and record, and the controller↔agent protocol.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent::VmDesired;

/// Highest downtime limit a user may ask for (QEMU pauses the guest at most this long at the switch).
pub const MAX_DOWNTIME_MS: u64 = 60_000;
/// The downtime limit when none is given.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// `POST /api/v1/instances/{id}/migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct MigrateInstance {
    /// Destination host (id or name); chosen by the placement rules when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// The longest pause of the guest at the switch, in ms (default 300, at most 60000).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Throttle the guest's vCPUs when its memory changes faster than it can be copied.
    #[serde(default)]
    pub auto_converge: bool,
    /// Bytes a second for the memory and disk copy (none: unlimited).
    #[serde(default)]
    pub bandwidth: Option<u64>,
}

/// A live migration, current or past.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    /// The operation's id (`op-…`): progress and cancel go through it.
    pub id: String,
    pub instance_id: String,
    pub source_host: String,
    pub dest_host: String,
    /// `shared` (memory only: both hosts see the disk) or `storage` (disks mirrored over NBD).
    pub mode: String,
    /// `prepare`, `transfer`, `switch`, `cleanup`, `done`, `rollback`, `failed`.
    pub step: String,
    /// Why it runs: `user`, `evacuate`, `return`, `path-failure`.
    pub reason: String,
    pub progress: f64,
    pub downtime_ms: u64,
    pub auto_converge: bool,
    pub bandwidth: Option<u64>,
    /// Figures once it completed: total_ms, downtime_ms, ram_bytes, disk_bytes.
    pub stats: Option<serde_json::Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One disk of a VM on its source host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceDisk {
    /// QEMU device id (`virtio-disk0` for the root disk, the volume id for volumes).
    pub device_id: String,
    /// The disk's id in the pool (the instance id for the root disk, the volume id for volumes).
    pub disk_id: String,
    pub size_bytes: u64,
}

/// `POST /agent/v1/migrations` on the destination.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IncomingRequest {
    pub desired: VmDesired,
    /// Storage migration: make blank disks of these sizes and export them over NBD. Empty: the
    /// disks are in a pool both hosts share.
    pub disks: Vec<SourceDisk>,
}

/// Where the source sends the migration (`tcp:IP:PORT`) and, for storage migration, each disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationTarget {
    pub migrate_uri: String,
    /// (device id, `nbd:IP:PORT:exportname=…`).
    pub nbd_targets: Vec<(String, String)>,
}

/// The migration job a source agent runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrateOut {
    pub vm: String,
    pub target: MigrationTarget,
    pub downtime_ms: u64,
    pub auto_converge: bool,
    pub bandwidth: Option<u64>,
}

/// What a destination says about an incoming migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncomingState {
    /// The memory stream arrived completely (the guest waits paused for the commit).
    pub completed: bool,
    /// The VM runs here (committed).
    pub running: bool,
}

/// `POST /agent/v1/migrations/{id}/commit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitIncoming {
    /// The VM's lease (ms) from the moment the controller sent this.
    #[serde(default)]
    pub lease_ms: Option<u64>,
}

/// `POST /api/v1/hosts/{id}/evacuate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct EvacuateHost {
    /// Also migrate instances whose disks would have to be copied (local pools). Default true.
    #[serde(default)]
    pub include_storage: Option<bool>,
}

/// One instance of an evacuation and what became of it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvacuationItem {
    pub instance_id: String,
    /// `migrated`, `failed`, `skipped` (cannot move: see `reason`), `pending`.
    pub result: String,
    pub dest_host: Option<String>,
    pub reason: Option<String>,
    pub migration_id: Option<String>,
}

/// The answer to an evacuation or a return: the operation and each instance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Evacuation {
    pub operation_id: String,
    pub host_id: String,
    pub items: Vec<EvacuationItem>,
}

/// `POST /api/v1/hosts/{id}/return`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ReturnHost {
    /// Migrate the instances evacuated from this host back to it.
    #[serde(default)]
    pub move_home: bool,
}
