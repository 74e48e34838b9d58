//! Models of the native REST API (`/api/v1`). The OpenAPI document is generated from these.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::InstanceState;

/// Every error body: `{"error": {"code", "message", "request_id"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `NotFound`, `InvalidParameter`, `InsufficientCapacity`.
    pub code: String,
    pub message: String,
    pub request_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
pub struct ListParams {
    /// Page size, 1–1000 (default 100).
    pub limit: Option<u32>,
    /// Cursor from a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Only resources with this exact name.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: String,
    pub name: String,
    pub site: String,
    /// `up`, `maintenance`, `draining`, `down` or `fenced`.
    pub state: String,
    pub address: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub hypervisor: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub qemu_version: String,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub instances: u32,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Operator labels (`role=core`, `role=spare` ...).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The storage pool of the host's VM disks; empty: its own local pool.
    pub storage_pool: String,
    /// Size of the host's VM storage, GiB (0: not reported).
    pub disk_gib: u64,
    pub used_disk_gib: u64,
    /// The operator's settings for this host; absent: the cluster's policy applies.
    pub cpu_overcommit: Option<f64>,
    pub memory_overcommit: Option<f64>,
    pub reserved_memory_mib: Option<u64>,
    pub created_at: DateTime<Utc>,
    /// The VM-facing network path as the host's probes see it (`kumo agent --probe`); absent:
    /// the host probes nothing, or has not reported since the controller started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HostPath>,
}

/// What a host's network-path probes see.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct HostPath {
    /// `ok` (every target answers), `degraded` (some do not) or `down` (none does: the
    /// controller moves the host's instances away and marks it `draining`).
    pub state: String,
    pub targets: Vec<String>,
    pub failing: Vec<String>,
}

/// A host's own placement settings (administrators). Absent fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateHost {
    /// Virtual CPUs per physical CPU on this host (above 0, at most 64).
    #[serde(default)]
    pub cpu_overcommit: Option<f64>,
    /// Guest memory per MiB of host memory (above 0, at most 4).
    #[serde(default)]
    pub memory_overcommit: Option<f64>,
    /// Host memory kept for the host itself.
    #[serde(default)]
    pub reserved_memory_mib: Option<u64>,
}

/// A spread placement group: its members go to different hosts (at most `max_per_host` on
/// each) and, with `spread_storage`, to different storage pools.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlacementGroup {
    pub id: String,
    pub name: String,
    pub project_id: String,
    /// `spread`.
    pub strategy: String,
    pub max_per_host: u32,
    pub spread_storage: bool,
    /// Live instances in the group.
    pub members: u32,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatePlacementGroup {
    pub name: String,
    /// `spread` (the default).
    #[serde(default)]
    pub strategy: Option<String>,
    /// Members one host may hold (default 1).
    #[serde(default)]
    pub max_per_host: Option<u32>,
    /// Keep members on different storage pools too.
    #[serde(default)]
    pub spread_storage: bool,
}

/// Many instances from one template, placed in one step.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateInstanceBatch {
    /// Names are `NAME-0`, `NAME-1` ...
    pub template: CreateInstance,
    /// How many to create (1–1000).
    pub count: u32,
    /// Create at least this many or none (default: `count`).
    #[serde(default)]
    pub min_count: Option<u32>,
}

/// Scheduler decision times (administrators).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlacementStats {
    /// Decisions since the controller started.
    pub decisions: u64,
    /// Over the last 100,000 decisions, in microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceType {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: String,
    pub name: String,
    /// `disk`, `kernel` or `ramdisk`.
    pub kind: String,
    /// `pending` (importing), `available` or `failed`.
    pub state: String,
    pub public: bool,
    pub source_format: Option<String>,
    pub virtual_size: Option<u64>,
    pub file_size: Option<u64>,
    pub sha256: Option<String>,
    /// For disk images booted by direct kernel boot: the kernel and ramdisk images to use.
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    /// Extra kernel command line for direct kernel boot.
    pub cmdline: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Import an image from a file readable by the controller.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImportImage {
    pub name: String,
    /// `disk` (default), `kernel` or `ramdisk`.
    #[serde(default)]
    pub kind: Option<String>,
    pub path: String,
    /// Input format (`qcow2`, `raw`, `vmdk`, `vdi`); detected when absent.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub kernel_id: Option<String>,
    #[serde(default)]
    pub ramdisk_id: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Visible to every project (admins only).
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
pub struct UploadParams {
    pub name: String,
    pub kind: Option<String>,
    pub format: Option<String>,
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    pub cmdline: Option<String>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub image_id: String,
    pub instance_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub state: InstanceState,
    /// The state the controller is driving the instance to.
    pub desired: String,
    pub host_id: Option<String>,
    pub private_ip: Option<String>,
    /// The elastic IP associated with the instance.
    #[serde(default)]
    pub public_ip: Option<String>,
    /// The SLAAC (EUI-64) address on a dual-stack network, derived from the network's /64 and the MAC.
    #[serde(default)]
    pub ipv6: Option<String>,
    pub mac: Option<String>,
    pub generation: i64,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub terminated_at: Option<DateTime<Utc>>,
    /// What the instance asked of placement.
    pub placement_group_id: Option<String>,
    pub requested_site: Option<String>,
    pub constraints: Vec<String>,
    /// Security group ids, in order.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// The key pair the instance was launched with.
    #[serde(default)]
    pub key_name: Option<String>,
    /// Restarted on another host when its host fails (its disks must be on a shared pool).
    #[serde(default)]
    pub ha: bool,
    /// Failover order, 0 to 1000: higher restarts first.
    #[serde(default = "default_ha_priority")]
    pub ha_priority: u32,
}

/// Highest HA priority an instance may have (the lowest is 0).
pub const HA_PRIORITY_MAX: u32 = 1000;
/// The HA priority of an instance that does not give one.
pub const HA_PRIORITY_DEFAULT: u32 = 500;

fn default_ha_priority() -> u32 {
    HA_PRIORITY_DEFAULT
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateInstance {
    pub name: String,
    /// Image id or name (or give `snapshot`).
    #[serde(default)]
    pub image: String,
    /// Boot a snapshot of an instance's root disk as a new instance (copy-on-write, next to the
    /// original; the mail-recovery case) instead of an image.
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Place the instance in this site (availability zone).
    #[serde(default)]
    pub site: Option<String>,
    /// Host labels the instance needs (`role=core`) or avoids (`role!=personal`).
    #[serde(default)]
    pub constraints: Vec<String>,
    /// A spread placement group (id or name) the instance joins.
    #[serde(default)]
    pub placement_group: Option<String>,
    /// The network (id or name) of the instance's NIC; default: the project's `default` network.
    #[serde(default)]
    pub network: Option<String>,
    /// Security groups (ids or names); default: the project's `default` group.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// A key pair whose public key the metadata service hands to the guest.
    #[serde(default)]
    pub key_name: Option<String>,
    /// User data for the guest (cloud-init), as text.
    #[serde(default)]
    pub user_data: Option<String>,
    /// Keep an imported machine's NIC MAC address (P2V/V2V); unique among live instances.
    #[serde(default)]
    pub mac: Option<String>,
    /// Keep an imported machine's SMBIOS system UUID; unique among live instances.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Restart it on another host when its host fails (default off).
    #[serde(default)]
    pub ha: bool,
    /// Failover order, 0 to 1000 (default 500): higher restarts first.
    #[serde(default)]
    pub ha_priority: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateInstance {
    /// New instance type; allowed only while the instance is stopped.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Turn HA failover on or off.
    #[serde(default)]
    pub ha: Option<bool>,
    /// Failover order, 0 to 1000: higher restarts first.
    #[serde(default)]
    pub ha_priority: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleOutput {
    pub instance_id: String,
    /// The last bytes of the serial console (UTF-8, lossy).
    pub output: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: String,
    pub kind: String,
    pub target_id: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// 0.0 to 1.0.
    pub progress: f64,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: i64,
    pub time: DateTime<Utc>,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    /// `ok` or an error code.
    pub result: String,
    pub request_id: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub user_id: String,
    pub user_name: String,
    pub project_id: String,
    pub role: String,
}

/// Change a host's state (administrators): `up`, `maintenance` or `draining`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetHostState {
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// Pass to `kumo agent --join-token` on a new host.
    pub token: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
pub struct ExplainParams {
    /// Instance type to place (default t1.small).
    pub instance_type: Option<String>,
    /// Only hosts of this site.
    pub site: Option<String>,
    /// Comma-separated constraints, e.g. `role=core,rack!=b`.
    pub constraints: Option<String>,
    /// A spread placement group (id or name) the instance would join.
    pub placement_group: Option<String>,
}

/// One host's verdict for a placement.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlacementVerdict {
    pub host_id: String,
    pub host_name: String,
    /// Why the host cannot take the instance; absent when it can.
    pub refused: Option<String>,
    /// Higher is better, for hosts that can take it.
    pub score: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CapacityRow {
    /// Host or site name.
    pub name: String,
    pub site: String,
    /// Host state, or the number of hosts for a site.
    pub state: String,
    /// Schedulable capacity (after overcommit and the host's reserve).
    pub vcpus: u32,
    pub memory_mib: u64,
    /// 0 when the host does not report its storage.
    pub disk_gib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub used_disk_gib: u64,
    pub free_vcpus: u32,
    pub free_memory_mib: u64,
    pub free_disk_gib: u64,
    /// Host memory kept back for the host itself (0 for sites).
    pub reserved_memory_mib: u64,
    pub instances: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CapacityReport {
    pub hosts: Vec<CapacityRow>,
    pub sites: Vec<CapacityRow>,
    /// True when every instance of the largest host would fit on the other up hosts.
    pub n_plus_one: bool,
    pub largest_host: Option<String>,
    /// Instances (vCPUs, MiB) that would find no room if the largest host were lost.
    pub stranded: Vec<(u32, u64)>,
}
