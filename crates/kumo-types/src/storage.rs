//! Storage: pools, volumes, snapshots and backups in the native API, and the controller↔agent
//! storage protocol. See docs/storage.md.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The disk serial of a volume: `vol-0123…` becomes `vol0123…` (20 characters, what virtio-blk
/// and NVMe hold), as EBS volumes show on Nitro instances.
pub fn volume_serial(id: &str) -> String {
    id.replacen('-', "", 1)
}

/// A storage pool: the hosts that have it and what it holds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StoragePool {
    pub name: String,
    /// `dir` (local files), `shared` (a directory every host of the pool mounts) or `lvm`.
    pub kind: String,
    /// Disks of a shared pool can be opened on every host of the pool.
    pub shared: bool,
    /// Virtual bytes the pool may hand out per byte of real capacity (thin provisioning).
    pub overcommit: f64,
    /// Real capacity (a shared pool counted once).
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Virtual size of every root disk and volume in the pool.
    pub provisioned_bytes: u64,
    /// `total_bytes × overcommit`: what may be provisioned.
    pub limit_bytes: u64,
    pub hosts: Vec<PoolHost>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolHost {
    pub host_id: String,
    pub host_name: String,
    pub state: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub provisioned_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateStoragePool {
    /// 1.0 (no overcommit) to 20.0.
    pub overcommit: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub id: String,
    pub name: Option<String>,
    pub project_id: String,
    /// Exact size in bytes, as requested.
    pub size_bytes: u64,
    pub pool: String,
    /// The host holding it (local pools); none on a shared pool.
    pub host_id: Option<String>,
    /// `creating`, `available`, `in-use`, `deleting`, `deleted` or `error`.
    pub state: String,
    pub instance_id: Option<String>,
    /// `attaching`, `attached` or `detaching` while `instance_id` is set.
    pub attach_state: Option<String>,
    /// The serial the guest sees (`/dev/disk/by-id/virtio-<serial>`): the id without its dash,
    /// as EBS on Nitro does, because virtio (like NVMe) holds 20 characters.
    pub serial: String,
    /// The snapshot it was made from.
    pub snapshot_id: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateVolume {
    #[serde(default)]
    pub name: Option<String>,
    /// Size in bytes (a multiple of 512); default: the snapshot's size.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Make the volume from this snapshot (copy-on-write: instant).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Put the volume where this instance can attach it.
    #[serde(default)]
    pub instance: Option<String>,
    /// Pool (default: the pool of `instance`, else the pool with the most room).
    #[serde(default)]
    pub pool: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttachVolume {
    /// Instance id.
    pub instance: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResizeVolume {
    /// The new size in bytes. Larger: grown in place, online if attached. Smaller: refused (use copy).
    pub size_bytes: u64,
}

/// Copy a volume into a new one, e.g. a smaller one (shrink): refused if data lies beyond the new size.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CopyVolume {
    pub size_bytes: u64,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    pub project_id: String,
    pub description: Option<String>,
    /// `instance` (its root disk) or `volume`.
    pub source_kind: String,
    pub source_id: String,
    pub size_bytes: u64,
    pub pool: String,
    pub host_id: Option<String>,
    /// `pending`, `completed`, `error` or `deleted`.
    pub state: String,
    /// How long the guest's disk I/O was paused to take it (live snapshots), milliseconds.
    pub io_pause_ms: Option<f64>,
    /// For instance snapshots: the image the instance was made from (its kernel, for booting it).
    pub image_id: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateSnapshot {
    /// Snapshot this instance's root disk ...
    #[serde(default)]
    pub instance: Option<String>,
    /// ... or this volume.
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Clone a running (or stopped) instance: a live snapshot of its root disk booted as a new
/// instance with its own identity (id, MAC, addresses); the source keeps running.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CloneInstance {
    pub name: String,
    /// Default: the source's network.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub key_name: Option<String>,
}

/// The clone and the snapshot it boots from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CloneResult {
    pub instance: crate::api::Instance,
    pub snapshot: Snapshot,
}

/// Storage a pool reports with every heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PoolReport {
    pub name: String,
    pub kind: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// A volume attached to a VM (agent protocol): the agent finds it in its pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeDesired {
    pub id: String,
    pub size_bytes: u64,
}

/// Where a new disk's content comes from (agent protocol).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskSource {
    Blank,
    /// Copy-on-write on a snapshot's frozen layer.
    Snapshot {
        id: String,
    },
    /// A full copy of a disk or snapshot (`copy_of` = a disk id, or a snapshot id), e.g. shrinking.
    Copy {
        disk: Option<String>,
        snapshot: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreateDisk {
    pub size_bytes: u64,
    pub source: DiskSource,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskReport {
    pub id: String,
    pub size_bytes: u64,
    pub format: String,
    pub path: String,
}

/// Snapshot disks of this host's pool, live (QEMU) if `vm` runs, else offline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TakeSnapshot {
    pub snapshot_id: String,
    pub disk: String,
    /// The VM using the disk, and the disk's device in it (`virtio-disk0` for a root disk, else the volume id).
    pub vm: Option<String>,
    pub device: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotTaken {
    pub snapshot_id: String,
    pub size_bytes: u64,
    /// Set for a live snapshot.
    pub io_pause_ms: Option<f64>,
}

/// A long job on an agent (copy, backup, import, export), polled by the controller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentJob {
    pub id: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    pub progress: f64,
    pub error: Option<String>,
    /// What the job produced (job-specific JSON).
    pub result: Option<serde_json::Value>,
}

/// A long job for an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobRequest {
    /// Make disk `id` as a full copy (shrink or grow by copy).
    CopyDisk { id: String, create: CreateDisk },
    /// Back a disk up into a repository (a directory the host mounts).
    Backup {
        backup_id: String,
        disk: String,
        /// The running VM using the disk and its device; none: the disk is copied offline.
        vm: Option<String>,
        device: Option<String>,
        repository: String,
        incremental: bool,
        /// Bytes a second (`None`: the host's default).
        #[serde(default)]
        rate: Option<u64>,
    },
    /// Make disk `id` from a backup (flattened).
    Restore {
        id: String,
        repository: String,
        backup_disk: String,
        backup_id: String,
        /// Replace the content of the existing disk `id` (restore in place) instead of making it.
        in_place: bool,
    },
    /// Write a disk or snapshot to a file.
    Export {
        disk: Option<String>,
        snapshot: Option<String>,
        dest: String,
        format: String,
    },
    /// Live-migrate a running VM of this host (the source side).
    Migrate(crate::migration::MigrateOut),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Backup {
    pub id: String,
    pub project_id: String,
    /// `instance` (its root disk) or `volume`.
    pub source_kind: String,
    pub source_id: String,
    /// `full` or `incremental` (empty while running).
    pub kind: String,
    /// The backup an incremental one builds on.
    pub parent_id: Option<String>,
    /// `running`, `completed` (copied and verified) or `failed`.
    pub state: String,
    /// Bytes this backup wrote (an incremental one: about what changed since its parent).
    pub bytes_written: Option<u64>,
    pub virtual_size: Option<u64>,
    pub operation_id: Option<String>,
    pub schedule_id: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateBackup {
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default)]
    pub volume: Option<String>,
    /// Start a new chain instead of an incremental backup.
    #[serde(default)]
    pub full: bool,
    /// Copy at most this many MiB a second (default: the host's `--backup-rate`, else unlimited).
    #[serde(default)]
    pub rate_mib_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupWithOperation {
    pub backup: Backup,
    pub operation: crate::api::Operation,
}

/// Restore a backup: in place (the instance stopped, or the volume detached) or as something new.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RestoreBackup {
    /// Replace the source's disk with the backup's content.
    #[serde(default)]
    pub in_place: bool,
    /// Otherwise: the name of the new instance (instance backups) or volume (volume backups).
    #[serde(default)]
    pub name: Option<String>,
}

/// What a restore made or changed, and the operation that does it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RestoreResult {
    pub operation: crate::api::Operation,
    /// The new instance or volume (restores as new), or the source (in place).
    pub target_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupSchedule {
    pub id: String,
    pub project_id: String,
    pub source_kind: String,
    pub source_id: String,
    /// Cron, UTC: 5 fields (`min hour day month weekday`), or 6 with seconds first.
    pub cron: String,
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub next_run: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateBackupSchedule {
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default)]
    pub volume: Option<String>,
    pub cron: String,
    /// Keep the newest N backups ...
    #[serde(default)]
    pub keep_last: u32,
    /// ... and the newest of each of the last N hours, days, ISO weeks that have one.
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
}

/// Export a volume or snapshot to a file (`qcow2`, `raw`, `vmdk` or `vdi`), then download it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExportDisk {
    pub format: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExportResult {
    pub operation: crate::api::Operation,
    /// Download it from `/api/v1/exports/{file}` once the operation succeeded.
    pub file: String,
}
