//! Models of the native API for networks, the public address pool and elastic IPs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A tenant network of a project: one L2 segment with its own addresses, kept apart from other
/// networks by a VXLAN VNI or a VLAN tag.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub project_id: String,
    /// IPv4 CIDR, e.g. `10.0.0.0/24`.
    pub cidr: String,
    /// The first host address of the CIDR.
    pub gateway: String,
    /// IPv6 /64 of a dual-stack network (guests configure themselves by SLAAC); absent: IPv4 only.
    #[serde(default)]
    pub ipv6_cidr: Option<String>,
    /// `vxlan` or `vlan`.
    pub isolation: String,
    /// VXLAN network identifier (vxlan networks).
    pub vni: Option<u32>,
    /// 802.1Q tag (vlan networks).
    pub vlan_tag: Option<u32>,
    /// MTU handed to guests; absent: the host link's own.
    pub mtu: Option<u32>,
    /// The project's `default` network, used when an instance names none.
    pub is_default: bool,
    /// Live instances on the network.
    pub instances: u32,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateNetwork {
    pub name: String,
    /// IPv4 CIDR with a prefix length of 16 to 28, e.g. `10.1.0.0/24`.
    pub cidr: String,
    /// `vxlan` (the default) or `vlan`.
    #[serde(default)]
    pub isolation: Option<String>,
    /// 802.1Q tag 1–4094 of a `vlan` network (administrators only).
    #[serde(default)]
    pub vlan_tag: Option<u32>,
    /// Make the network dual stack with a random unique local /64 (RFC 4193).
    #[serde(default)]
    pub ipv6: bool,
    /// Make the network dual stack with this /64 (e.g. `fd60:1::/64`); implies `ipv6`.
    #[serde(default)]
    pub ipv6_cidr: Option<String>,
}

/// The operator's public addresses that elastic IPs come from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddressPool {
    /// The public subnet, e.g. `203.0.113.0/24`.
    pub cidr: String,
    /// Next hop for traffic leaving through an elastic IP.
    pub gateway: String,
    /// First and last address handed out (inclusive).
    pub first: String,
    pub last: String,
    /// Addresses in the range.
    pub size: u64,
    /// Allocated addresses.
    pub used: u64,
    pub free: u64,
}

/// Define or replace the public address pool (administrators).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SetAddressPool {
    pub cidr: String,
    pub gateway: String,
    pub first: String,
    pub last: String,
}

/// An elastic IP: a public address of the pool, allocated to a project and associated with
/// at most one of its instances.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Address {
    /// `eipalloc-…`
    pub id: String,
    pub public_ip: String,
    pub project_id: String,
    pub instance_id: Option<String>,
    /// `eipassoc-…` while associated.
    pub association_id: Option<String>,
    /// The associated instance's private address.
    pub private_ip: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AssociateAddress {
    /// Instance id or name (of the address's project).
    pub instance_id: String,
    /// Move the address even when it is associated with another instance.
    #[serde(default)]
    pub allow_reassociation: bool,
}
