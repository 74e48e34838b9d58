//! Models of the native API for security groups and key pairs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A project's firewall for instance ports: what may reach members (ingress) and what they
/// may reach (egress). Every project has a group named `default`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub description: String,
    /// In the order they were added.
    pub rules: Vec<SecurityGroupRule>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroupRule {
    pub id: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: String,
    /// First and last port (tcp and udp only).
    pub from_port: Option<u16>,
    pub to_port: Option<u16>,
    /// The peer as an IPv4 CIDR ...
    pub cidr: Option<String>,
    /// ... or as a group of the same project (its members' addresses).
    pub source_group: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateSecurityGroup {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// A rule to add: exactly one of `cidr` and `source_group`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateSecurityGroupRule {
    /// `ingress` (default) or `egress`.
    #[serde(default)]
    pub direction: Option<String>,
    /// `tcp`, `udp`, `icmp` or `all` (EC2's numbers and `-1` are accepted too).
    pub protocol: String,
    /// tcp/udp: the first port (absent with `to_port` too: every port).
    #[serde(default)]
    pub from_port: Option<i64>,
    /// tcp/udp: the last port (default: `from_port`).
    #[serde(default)]
    pub to_port: Option<i64>,
    /// An IPv4 CIDR without host bits, e.g. `0.0.0.0/0`.
    #[serde(default)]
    pub cidr: Option<String>,
    /// A group (id or name) of the same project.
    #[serde(default)]
    pub source_group: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// The groups of an instance (ids or names, at most 5), replacing the current ones.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetSecurityGroups {
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyPair {
    pub id: String,
    pub name: String,
    pub project_id: String,
    /// `ed25519`, `rsa` or `ecdsa`.
    pub key_type: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The OpenSSH public key line.
    pub public_key: String,
    /// Only in the answer to a create that generated the key: shown once, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Import a public key (`public_key`), or have the controller generate a key pair.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateKeyPair {
    pub name: String,
    /// For a generated key: `ed25519` (default) or `rsa`.
    #[serde(default)]
    pub key_type: Option<String>,
    /// An OpenSSH public key line (`ssh-ed25519 AAAA… comment`) to import.
    #[serde(default)]
    pub public_key: Option<String>,
}
