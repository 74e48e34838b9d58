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
    /// The root disk is made from this snapshot (in the host's pool) instead of the image.
    #[serde(default)]
    pub root_snapshot: Option<String>,
    /// Volumes attached to the VM (hot-plugged while it runs).
    #[serde(default)]
    pub volumes: Vec<crate::storage::VolumeDesired>,
    /// SMBIOS system UUID an imported machine keeps.
    #[serde(default)]
    pub uuid: Option<String>,
    /// HA lease granted with this PUT, in ms: the agent may start the VM for this long after it
    /// received the spec (never past its heartbeat lease horizon). Not part of the desired state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// HA is on: the VM runs only while it holds a lease (it may be restarted elsewhere when
    /// its host goes silent, so a host that cannot renew must kill its copy). VMs without HA are
    /// never restarted elsewhere and are not fenced: a controller outage does not stop them.
    #[serde(default)]
    pub ha: bool,
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
    /// Volumes attached to the running VM, as QEMU reports them.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Why a volume could not be attached, detached or resized (the VM itself is fine).
    #[serde(default)]
    pub volume_error: Option<String>,
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
    /// This host's address for VXLAN tunnels between hosts (empty: no tunnels).
    #[serde(default)]
    pub tunnel_ip: String,
    /// The host's storage pool: its kind and capacity.
    #[serde(default)]
    pub pool: Option<crate::storage::PoolReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub host_id: String,
    pub address: String,
    pub info: HostInfo,
    /// Every VM the agent has, with what it observes.
    pub vms: Vec<VmObserved>,
    /// Drift the agent found and repaired since its last heartbeat (network state put back), in words.
    #[serde(default)]
    pub repairs: Vec<String>,
    /// VMs the agent killed since its last heartbeat because their lease lapsed (self-fencing).
    #[serde(default)]
    pub fenced: Vec<FenceReport>,
    /// The VM-facing network path as the agent's probes see it; `None`: it probes nothing.
    #[serde(default)]
    pub path: Option<PathReport>,
}

/// What an agent's path probes (`kumo agent --probe`) see: a target is failing after 3 failed
/// probes in a row and answers again after 2 successes, so a brief flap reports nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathReport {
    /// Every configured target, as given (`IP` or `IP%IFACE`).
    pub targets: Vec<String>,
    /// The targets that are down now (a subset of `targets`).
    pub failing: Vec<String>,
}

impl PathReport {
    /// Every target is down (and there is at least one): the host's VMs are cut off.
    pub fn all_down(&self) -> bool {
        !self.targets.is_empty() && self.targets.iter().all(|t| self.failing.contains(t))
    }
}

/// One self-fencing: the agent SIGKILLed a VM whose lease lapsed by its own clock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FenceReport {
    pub id: String,
    /// How long before its lease would have ended the VM was killed, ms (negative: after).
    pub ahead_ms: i64,
    /// How long before this heartbeat was sent the kill happened, ms.
    pub ago_ms: u64,
}

/// The leases a heartbeat answer grants: every VM listed may run for `ttl_ms` from the moment
/// the agent *sent* that heartbeat (its own monotonic clock), so its view ends first.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseGrant {
    pub ttl_ms: u64,
    pub vms: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleTail {
    pub output: String,
}

/// Everything a host needs to render its tenant networks beyond each VM's own NIC: the networks of its
/// VMs (with the other hosts that carry them), every port's security groups and elastic IP, the groups'
/// rules with group references resolved to addresses, the public network, and each VM's metadata.
/// Fetched by the agent from `GET /api/v1/agent/network-policy`; the agent renders it whole.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkPolicy {
    pub networks: Vec<NetworkInfo>,
    pub ports: Vec<PortPolicy>,
    pub groups: Vec<GroupPolicy>,
    /// The operator's public network (elastic IPs); `None` when no address pool is defined.
    pub public: Option<PublicNetwork>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkInfo {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub cidr: String,
    pub gateway: String,
    /// MTU handed to guests (1450 on VXLAN networks so that full frames fit the underlay).
    pub mtu: Option<u32>,
    pub isolation: Isolation,
    /// Tunnel addresses of the other hosts running VMs of this network (VXLAN flooding list).
    #[serde(default)]
    pub peers: Vec<String>,
    /// The network's IPv6 /64 (router advertisements, SLAAC); `None`: IPv4 only.
    #[serde(default)]
    pub ipv6_cidr: Option<String>,
}

/// How a network's frames are kept apart from other networks' between hosts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Isolation {
    /// Host-local only (the single-host default network of `kumo up`).
    Local,
    /// VXLAN over the hosts' tunnel addresses.
    Vxlan { vni: u32 },
    /// 802.1Q tag on the agent's trunk interface.
    Vlan { tag: u16 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortPolicy {
    pub instance_id: String,
    pub network_id: String,
    pub mac: String,
    pub ip: String,
    /// Security group ids, in the order they were given.
    pub groups: Vec<String>,
    pub public_ip: Option<String>,
    pub metadata: VmMetadata,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupPolicy {
    pub id: String,
    pub ingress: Vec<RulePolicy>,
    pub egress: Vec<RulePolicy>,
}

/// One allow rule. `protocol` is `tcp`, `udp`, `icmp` (IPv4 only), `icmpv6` or `all`; ports only for
/// tcp/udp (both `None` = all ports). `sources` are IPv4 or IPv6 CIDRs (the peer: source for ingress,
/// destination for egress); a rule naming another group carries that group's members' addresses as /32s
/// (and /128s for members of dual-stack networks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RulePolicy {
    pub protocol: String,
    pub from_port: Option<u16>,
    pub to_port: Option<u16>,
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PublicNetwork {
    /// The pool's subnet, e.g. 203.0.113.0/24 (on-link on the host's public bridge).
    pub cidr: String,
    /// Next hop for traffic leaving through an elastic IP.
    pub gateway: String,
}

/// What the metadata service tells a VM about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VmMetadata {
    pub instance_id: String,
    pub hostname: String,
    pub local_ipv4: String,
    pub public_ipv4: Option<String>,
    pub mac: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub ami_id: String,
    pub reservation_id: String,
    /// Security group names.
    pub security_groups: Vec<String>,
    /// (key name, OpenSSH public key).
    pub public_keys: Vec<(String, String)>,
    pub user_data: Option<String>,
}
