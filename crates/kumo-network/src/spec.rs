//! Desired state as given by callers, and its validated, parsed form.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

pub use kumo_types::agent::{GroupPolicy, Isolation, PublicNetwork, RulePolicy};

use crate::error::NetworkError;

/// One VM network on this host: a bridge holding the gateway address, served by one dnsmasq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Short id, e.g. "default"; used in file names (`[A-Za-z0-9_-]`, at most 32 chars).
    pub name: String,
    /// Bridge interface name, at most 15 chars.
    pub bridge: String,
    /// IPv4 subnet, e.g. "10.77.0.0/24" (prefix 8..=30).
    pub cidr: String,
    /// Gateway address inside `cidr`, e.g. "10.77.0.1"; put on the bridge and handed out as router and DNS.
    pub gateway: String,
    /// MTU of the bridge and its taps, also handed out by DHCP; `None` leaves the kernel default.
    pub mtu: Option<u32>,
    /// How frames of this network reach other hosts.
    #[serde(default = "local")]
    pub isolation: Isolation,
    /// Tunnel addresses of the other hosts carrying this network (VXLAN only).
    #[serde(default)]
    pub peers: Vec<String>,
    /// IPv6 /64 of a dual-stack network, e.g. "fd60:1::/64": the router advertises it (SLAAC) and holds
    /// `<prefix>::1`; each port's address is the EUI-64 of its MAC.
    #[serde(default)]
    pub ipv6_cidr: Option<String>,
}

fn local() -> Isolation {
    Isolation::Local
}

/// One VM port: a tap on the network's bridge plus a static DHCP entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Tap interface name, at most 15 chars (see [`crate::tap_name`]).
    pub tap: String,
    /// The guest's MAC address (unicast), e.g. from [`crate::mac_for`].
    pub mac: String,
    /// The guest's static IPv4 address inside the network's cidr.
    pub ip: String,
    /// The guest's host name (DHCP option 12 and a DNS name served by the network's dnsmasq).
    pub hostname: String,
    /// Security group ids whose rules apply to this port (none: inbound denied, outbound allowed).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Elastic IP mapped to `ip` by DNAT/SNAT in the network's router namespace.
    #[serde(default)]
    pub public_ip: Option<Ipv4Addr>,
}

/// A validated network with parsed addresses.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub name: String,
    pub bridge: String,
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mtu: Option<u32>,
    pub isolation: Isolation,
    pub peers: Vec<Ipv4Addr>,
    pub ports: Vec<Port>,
    /// The /64 (upper 64 bits) of a dual-stack network.
    pub ipv6: Option<Ipv6Addr>,
}

/// A validated port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Port {
    pub tap: String,
    /// Lower-case, colon-separated.
    pub mac: String,
    pub ip: Ipv4Addr,
    pub hostname: String,
    pub groups: Vec<String>,
    pub public_ip: Option<Ipv4Addr>,
}

impl Network {
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// Short key naming this network's devices: the bridge name after `kb-`, or 12 hex chars of a hash.
    pub fn key(&self) -> String {
        crate::names::network_key(&self.bridge)
    }

    /// The VXLAN or VLAN device on the bridge that carries the network to other hosts.
    pub fn uplink(&self) -> Option<String> {
        match self.isolation {
            Isolation::Local => None,
            Isolation::Vxlan { .. } | Isolation::Vlan { .. } => Some(format!("kx-{}", self.key())),
        }
    }

    /// Host end (on the bridge) of the veth to the network's router namespace.
    pub fn router_port(&self) -> String {
        format!("kr-{}", self.key())
    }

    /// Host end (on the public bridge) of the router namespace's public veth.
    pub fn public_port(&self) -> String {
        format!("kp-{}", self.key())
    }

    /// The gateway's MAC: the same on every host, so a VM that moves keeps a valid ARP entry; frames from
    /// it never cross the uplink (each host answers for the gateway itself).
    pub fn gateway_mac(&self) -> String {
        crate::names::mac_for(&format!("kumo-gateway:{}", self.name))
    }

    /// The IPv6 gateway (`<prefix>::1`) of a dual-stack network.
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.ipv6.map(kumo_types::ipv6::gateway)
    }

    /// A port's IPv6 source addresses on a dual-stack network: link-local and SLAAC (none on IPv4-only
    /// networks, whose taps send no IPv6 at all).
    pub fn port_v6(&self, port: &Port) -> Vec<Ipv6Addr> {
        let Some(p) = self.ipv6 else {
            return Vec::new();
        };
        let mut v: Vec<Ipv6Addr> = kumo_types::ipv6::link_local(&port.mac)
            .into_iter()
            .collect();
        v.extend(kumo_types::ipv6::eui64(p, &port.mac));
        v
    }
}

/// Name of the router veth's end inside the router namespace (holds the gateway address).
pub const ROUTER_INSIDE: &str = "int0";
/// Name of the public veth's end inside the router namespace (holds the elastic IPs).
pub const ROUTER_OUTSIDE: &str = "ext0";
/// The metadata service's address, on the router namespace's loopback.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn invalid(msg: String) -> NetworkError {
    NetworkError::InvalidSpec(msg)
}

/// Interface names: 1..=15 chars of `[A-Za-z0-9_.-]`, not "." or "..".
pub(crate) fn check_ifname(what: &str, name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {name:?} is not a valid interface name (1-15 chars of A-Z a-z 0-9 _ . -)"
        )))
    }
}

fn check_network_name(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "network name {name:?} must be 1-32 chars of A-Z a-z 0-9 _ -"
        )))
    }
}

fn check_hostname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "hostname {name:?} is not a valid DNS name"
        )))
    }
}

/// Parses and normalises a MAC address; rejects multicast and all-zero addresses.
pub(crate) fn parse_mac(mac: &str) -> Result<String, NetworkError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let bytes: Option<Vec<u8>> = if parts.len() == 6 {
        parts
            .iter()
            .map(|p| {
                if p.len() == 2 {
                    u8::from_str_radix(p, 16).ok()
                } else {
                    None
                }
            })
            .collect()
    } else {
        None
    };
    let bytes = bytes
        .ok_or_else(|| invalid(format!("MAC {mac:?} is not of the form xx:xx:xx:xx:xx:xx")))?;
    if bytes[0] & 1 == 1 {
        return Err(invalid(format!("MAC {mac} is a multicast address")));
    }
    if bytes.iter().all(|b| *b == 0) {
        return Err(invalid(format!("MAC {mac} is all zeros")));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8), NetworkError> {
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| invalid(format!("cidr {cidr:?} has no /prefix")))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| invalid(format!("cidr {cidr:?}: {addr:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| invalid(format!("cidr {cidr:?}: bad prefix length")))?;
    if !(8..=30).contains(&prefix) {
        return Err(invalid(format!(
            "cidr {cidr:?}: prefix length must be between 8 and 30"
        )));
    }
    if u32::from(addr) & !mask(prefix) != 0 {
        return Err(invalid(format!(
            "cidr {cidr:?} has host bits set (did you mean {}/{prefix}?)",
            Ipv4Addr::from(u32::from(addr) & mask(prefix))
        )));
    }
    Ok((addr, prefix))
}

/// Whether `ip` is a usable host address of `net/prefix` (not the network or broadcast address).
fn is_host_in(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let m = mask(prefix);
    let ip = u32::from(ip);
    let net = u32::from(net);
    ip & m == net && ip != net && ip != (net | !m)
}

/// Validates the whole desired state at once; nothing is touched when this fails.
pub(crate) fn validate(
    networks: &[(NetworkSpec, Vec<PortSpec>)],
) -> Result<Vec<Network>, NetworkError> {
    let mut names = HashSet::new();
    let mut ifnames = HashSet::new();
    let mut macs = HashSet::new();
    let mut out: Vec<Network> = Vec::with_capacity(networks.len());
    for (spec, ports) in networks {
        check_network_name(&spec.name)?;
        if !names.insert(spec.name.as_str()) {
            return Err(invalid(format!("network {} is listed twice", spec.name)));
        }
        check_ifname("bridge", &spec.bridge)?;
        if !ifnames.insert(spec.bridge.clone()) {
            return Err(invalid(format!(
                "interface name {} is used twice",
                spec.bridge
            )));
        }
        let (network, prefix) = parse_cidr(&spec.cidr)?;
        let gateway: Ipv4Addr = spec.gateway.parse().map_err(|_| {
            invalid(format!(
                "network {}: gateway {:?} is not an IPv4 address",
                spec.name, spec.gateway
            ))
        })?;
        if !is_host_in(gateway, network, prefix) {
            return Err(invalid(format!(
                "network {}: gateway {gateway} is not a host address of {}",
                spec.name, spec.cidr
            )));
        }
        if let Some(mtu) = spec.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(invalid(format!(
                    "network {}: mtu {mtu} is outside 576..=65535",
                    spec.name
                )));
            }
        }
        // Overlapping cidrs are fine: each network routes in its own namespace.
        let mut ips = HashSet::new();
        let mut parsed_ports = Vec::with_capacity(ports.len());
        for port in ports {
            check_ifname("tap", &port.tap)?;
            if !ifnames.insert(port.tap.clone()) {
                return Err(invalid(format!(
                    "interface name {} is used twice",
                    port.tap
                )));
            }
            let mac = parse_mac(&port.mac)?;
            if !macs.insert(mac.clone()) {
                return Err(invalid(format!("MAC {mac} is used by two ports")));
            }
            let ip: Ipv4Addr = port.ip.parse().map_err(|_| {
                invalid(format!(
                    "port {}: ip {:?} is not an IPv4 address",
                    port.tap, port.ip
                ))
            })?;
            if !is_host_in(ip, network, prefix) || ip == gateway {
                return Err(invalid(format!(
                    "port {}: ip {ip} is not a free host address of {} (gateway {gateway})",
                    port.tap, spec.cidr
                )));
            }
            if !ips.insert(ip) {
                return Err(invalid(format!(
                    "network {}: ip {ip} is used by two ports",
                    spec.name
                )));
            }
            check_hostname(&port.hostname)?;
            parsed_ports.push(Port {
                tap: port.tap.clone(),
                mac,
                ip,
                hostname: port.hostname.clone(),
                groups: port.groups.clone(),
                public_ip: port.public_ip,
            });
        }
        let ipv6 = match &spec.ipv6_cidr {
            Some(c) => Some(
                kumo_types::ipv6::parse_prefix64(c)
                    .map_err(|e| invalid(format!("network {}: ipv6_cidr: {e}", spec.name)))?,
            ),
            None => None,
        };
        let mut peers = Vec::with_capacity(spec.peers.len());
        for p in &spec.peers {
            peers.push(p.parse::<Ipv4Addr>().map_err(|_| {
                invalid(format!(
                    "network {}: peer {p:?} is not an IPv4 address",
                    spec.name
                ))
            })?);
        }
        peers.sort();
        peers.dedup();
        // Deterministic order: the rendered rules depend on it.
        parsed_ports.sort_by(|a, b| a.tap.cmp(&b.tap));
        out.push(Network {
            name: spec.name.clone(),
            bridge: spec.bridge.clone(),
            network,
            prefix,
            gateway,
            mtu: spec.mtu,
            isolation: spec.isolation,
            peers,
            ports: parsed_ports,
            ipv6,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, bridge: &str, cidr: &str, gw: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.into(),
            bridge: bridge.into(),
            cidr: cidr.into(),
            gateway: gw.into(),
            mtu: None,
            isolation: Isolation::Local,
            peers: vec![],
            ipv6_cidr: None,
        }
    }

    fn port(tap: &str, mac: &str, ip: &str) -> PortSpec {
        PortSpec {
            tap: tap.into(),
            mac: mac.into(),
            ip: ip.into(),
            hostname: "vm-1".into(),
            groups: vec![],
            public_ip: None,
        }
    }

    #[test]
    fn accepts_good_spec_and_normalises_mac() {
        let nets = validate(&[(
            net("default", "kb-default", "10.77.0.0/24", "10.77.0.1"),
            vec![port("kt-1", "02:AA:bb:cc:dd:ee", "10.77.0.10")],
        )])
        .unwrap();
        assert_eq!(nets[0].ports[0].mac, "02:aa:bb:cc:dd:ee");
        assert_eq!(nets[0].netmask(), Ipv4Addr::new(255, 255, 255, 0));
    }

    #[test]
    fn rejects_bad_specs() {
        let good = net("default", "kb-default", "10.77.0.0/24", "10.77.0.1");
        let cases: Vec<(NetworkSpec, Vec<PortSpec>)> = vec![
            (
                net("default", "kb-default", "10.77.0.1/24", "10.77.0.1"),
                vec![],
            ),
            (
                net("default", "kb-default", "10.77.0.0/24", "10.78.0.1"),
                vec![],
            ),
            (
                net("default", "kb-default", "10.77.0.0/24", "10.77.0.255"),
                vec![],
            ),
            (
                net("de/fault", "kb-default", "10.77.0.0/24", "10.77.0.1"),
                vec![],
            ),
            (
                net(
                    "default",
                    "kb-this-is-too-long",
                    "10.77.0.0/24",
                    "10.77.0.1",
                ),
                vec![],
            ),
            (
                good.clone(),
                vec![port("kt-1", "03:00:00:00:00:01", "10.77.0.10")],
            ),
            (
                good.clone(),
                vec![port("kt-1", "02:00:00:00:00:01", "10.77.0.1")],
            ),
            (
                good.clone(),
                vec![port("kt-1", "02:00:00:00:00:01", "10.77.1.5")],
            ),
            (
                good.clone(),
                vec![port("kb-default", "02:00:00:00:00:01", "10.77.0.5")],
            ),
            (
                good.clone(),
                vec![
                    port("kt-1", "02:00:00:00:00:01", "10.77.0.5"),
                    port("kt-2", "02:00:00:00:00:02", "10.77.0.5"),
                ],
            ),
        ];
        for case in cases {
            assert!(
                validate(std::slice::from_ref(&case)).is_err(),
                "accepted {case:?}"
            );
        }
        // Two networks may share a cidr (two projects): each routes in its own namespace.
        let overlap = validate(&[
            (good.clone(), vec![]),
            (
                net("other", "kb-other", "10.77.0.0/16", "10.77.9.1"),
                vec![],
            ),
        ]);
        assert!(overlap.is_ok());
        let mut bad_host = port("kt-1", "02:00:00:00:00:01", "10.77.0.5");
        bad_host.hostname = "a,b".into();
        assert!(validate(&[(good, vec![bad_host])]).is_err());
    }

    #[test]
    fn parses_ipv6_prefix_and_derives_port_addresses() {
        let mut n = net("default", "kb-default", "10.77.0.0/24", "10.77.0.1");
        n.ipv6_cidr = Some("fd60:1::/64".into());
        let nets = validate(&[(
            n.clone(),
            vec![port("kt-1", "02:00:00:00:00:01", "10.77.0.5")],
        )])
        .unwrap();
        let v = &nets[0];
        assert_eq!(v.gateway6(), Some("fd60:1::1".parse().unwrap()));
        let want: Vec<Ipv6Addr> = vec![
            "fe80::ff:fe00:1".parse().unwrap(),
            "fd60:1::ff:fe00:1".parse().unwrap(),
        ];
        assert_eq!(v.port_v6(&v.ports[0]), want);
        for bad in [
            "fd60:1::/48",
            "fd60:1::1/64",
            "fe80::/64",
            "10.0.0.0/24",
            "nonsense",
        ] {
            n.ipv6_cidr = Some(bad.into());
            let e = validate(&[(n.clone(), vec![])]).unwrap_err().to_string();
            assert!(e.contains("ipv6_cidr"), "{bad}: {e}");
        }
        // IPv4-only networks: no IPv6 gateway, no IPv6 source address for their ports.
        n.ipv6_cidr = None;
        let nets = validate(&[(n, vec![port("kt-1", "02:00:00:00:00:01", "10.77.0.5")])]).unwrap();
        assert_eq!(nets[0].gateway6(), None);
        assert!(nets[0].port_v6(&nets[0].ports[0]).is_empty());
    }
}
