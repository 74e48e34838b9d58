//! The controller↔agent protocol. The controller PUTs the whole desired spec of a VM
//! (idempotent, guarded by a generation number); the agent reports what it observes.

use serde::{Deserialize, Serialize};

/// What the controller wants on a host for one VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmDesired {
    pub id: String,
    pub name: String,
    /// Increases with every change of the desired state; the agent ignores older specs.
    pub generation: i64,
    pub power: DesiredPower,
    /// Increases each time a reboot is requested; the agent reboots once per increase.
    pub reboot_seq: i64,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: ImageRef,
    pub kernel: Option<ImageRef>,
    pub ramdisk: Option<ImageRef>,
    pub cmdline: Option<String>,
    pub nic: NicDesired,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DesiredPower {
    Running,
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRef {
    pub id: String,
    pub sha256: String,
    pub size: u64,
    /// The file on the controller; used directly when the agent can see it (same machine).
    pub controller_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NicDesired {
    pub mac: String,
    pub ip: String,
    pub network: NetworkDesired,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkDesired {
    pub id: String,
    pub name: String,
    pub cidr: String,
    pub gateway: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ObservedPower {
    /// The agent is preparing the VM (disk, network, image download) or launching it.
    Starting,
    Running,
    Stopping,
    Stopped,
    /// Preparing or launching failed; `error` says why.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmObserved {
    pub id: String,
    /// The generation of the spec the agent has applied.
    pub generation: i64,
    pub power: ObservedPower,
    pub reboot_seq: i64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub join_token: String,
    pub name: String,
    pub address: String,
    pub site: String,
    pub info: HostInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub host_id: String,
    /// Bearer secret for both directions of agent traffic from now on.
    pub host_secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub hypervisor: String,
    pub accel: String,
    pub qemu_version: String,
    /// Operator labels of the host (`role=core`, `rack=a` ...).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The storage pool that holds this host's VM disks. Hosts that name the same pool share
    /// it; empty means the host's own local pool.
    #[serde(default)]
    pub storage_pool: String,
    /// Size of the filesystem holding VM disks, GiB (0: not reported).
    #[serde(default)]
    pub disk_gib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub host_id: String,
    pub address: String,
    pub info: HostInfo,
    /// Every VM the agent has, with what it observes.
    pub vms: Vec<VmObserved>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleTail {
    pub output: String,
}
