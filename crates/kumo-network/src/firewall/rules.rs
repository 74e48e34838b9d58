//! Security group rules reduced to what nft needs, for IPv4 and IPv6 peers.
//!
//! A rule's sources may mix families; each family renders its own allow line (`ip saddr …` /
//! `ip6 saddr …`) unless the rule is open to both (`0.0.0.0/0` and `::/0`), which needs no address
//! match at all. `icmp` is IPv4's ICMP only and `icmpv6` IPv6's (as in EC2), so a rule of one with
//! only the other family's peers matches nothing.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::spec::RulePolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    All,
    Icmp,
    Icmpv6,
    /// "tcp" or "udp", with an inclusive port range (None = all ports).
    Ports(&'static str, Option<(u16, u16)>),
}

/// The peers of one family: any address, or some networks (widest first collapsed, sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Peers<T> {
    Any,
    Nets(Vec<(T, u8)>),
}

/// A parsed rule; `None` for a family the rule has no peers in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rule {
    pub proto: Proto,
    pub v4: Option<Peers<Ipv4Addr>>,
    pub v6: Option<Peers<Ipv6Addr>>,
}

pub(super) fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// A CIDR or bare address of either family, host bits cleared.
enum Cidr {
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
    let len = |max: u8| -> Result<u8, String> {
        if prefix.is_empty() {
            return Ok(max);
        }
        prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?} has a bad prefix length"))
    };
    if let Ok(a) = addr.parse::<Ipv4Addr>() {
        let p = len(32)?;
        return Ok(Cidr::V4(Ipv4Addr::from(u32::from(a) & mask(p)), p));
    }
    if let Ok(a) = addr.parse::<Ipv6Addr>() {
        let p = len(128)?;
        return Ok(Cidr::V6(Ipv6Addr::from(u128::from(a) & mask6(p)), p));
    }
    Err(format!("{s:?} is not a CIDR"))
}

/// An IPv4 CIDR (host bits cleared) or bare address; `Ok(None)` for IPv6.
pub(super) fn parse_v4_cidr(s: &str) -> Result<Option<(Ipv4Addr, u8)>, String> {
    match parse_cidr(s)? {
        Cidr::V4(a, p) => Ok(Some((a, p))),
        Cidr::V6(..) => Ok(None),
    }
}

pub(super) fn covers(outer: (Ipv4Addr, u8), inner: (Ipv4Addr, u8)) -> bool {
    outer.1 <= inner.1 && u32::from(inner.0) & mask(outer.1) == u32::from(outer.0)
}

fn covers6(outer: (Ipv6Addr, u8), inner: (Ipv6Addr, u8)) -> bool {
    outer.1 <= inner.1 && u128::from(inner.0) & mask6(outer.1) == u128::from(outer.0)
}

/// Widest first, so that covered ranges drop out (nft rejects overlapping intervals in one set).
fn collapse<T: Copy + Ord>(
    mut nets: Vec<(T, u8)>,
    covers: impl Fn((T, u8), (T, u8)) -> bool,
) -> Option<Peers<T>> {
    if nets.is_empty() {
        return None;
    }
    if nets.iter().any(|n| n.1 == 0) {
        return Some(Peers::Any);
    }
    nets.sort_by_key(|n| (n.1, n.0));
    let mut kept: Vec<(T, u8)> = Vec::new();
    for n in nets {
        if !kept.iter().any(|k| covers(*k, n)) {
            kept.push(n);
        }
    }
    kept.sort();
    Some(Peers::Nets(kept))
}

/// Parses a rule; `Ok(None)` when it can match no traffic (no peers of a family its protocol has).
pub(super) fn parse_rule(r: &RulePolicy) -> Result<Option<Rule>, String> {
    let proto = match r.protocol.as_str() {
        "all" | "icmp" | "icmpv6" => {
            if r.from_port.is_some() || r.to_port.is_some() {
                return Err(format!("{} rules take no ports", r.protocol));
            }
            match r.protocol.as_str() {
                "all" => Proto::All,
                "icmp" => Proto::Icmp,
                _ => Proto::Icmpv6,
            }
        }
        "tcp" | "udp" => {
            let name = if r.protocol == "tcp" { "tcp" } else { "udp" };
            let range = match (r.from_port, r.to_port) {
                (None, None) => None,
                (Some(a), None) | (None, Some(a)) => Some((a, a)),
                (Some(a), Some(b)) if a > b => {
                    return Err(format!("port range {a}-{b} is empty"));
                }
                (Some(0), Some(u16::MAX)) => None,
                (Some(a), Some(b)) => Some((a, b)),
            };
            Proto::Ports(name, range)
        }
        other => {
            return Err(format!(
                "protocol {other:?} is not one of tcp, udp, icmp, icmpv6, all"
            ))
        }
    };
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for s in &r.sources {
        match parse_cidr(s)? {
            Cidr::V4(a, p) => v4.push((a, p)),
            Cidr::V6(a, p) => v6.push((a, p)),
        }
    }
    let mut rule = Rule {
        proto,
        v4: collapse(v4, covers),
        v6: collapse(v6, covers6),
    };
    match proto {
        Proto::Icmp => rule.v6 = None,
        Proto::Icmpv6 => rule.v4 = None,
        _ => {}
    }
    if rule.v4.is_none() && rule.v6.is_none() {
        return Ok(None);
    }
    Ok(Some(rule))
}

fn cidr_text<T: std::fmt::Display>((addr, prefix): &(T, u8), host: u8) -> String {
    if *prefix == host {
        addr.to_string()
    } else {
        format!("{addr}/{prefix}")
    }
}

fn peers_text<T: std::fmt::Display>(
    family: &str,
    field: &str,
    peers: &Peers<T>,
    host: u8,
) -> String {
    match peers {
        Peers::Any => format!(
            "meta nfproto {} ",
            if family == "ip" { "ipv4" } else { "ipv6" }
        ),
        Peers::Nets(nets) => {
            let list: Vec<String> = nets.iter().map(|n| cidr_text(n, host)).collect();
            if list.len() == 1 {
                format!("{family} {field} {} ", list[0])
            } else {
                format!("{family} {field} {{ {} }} ", list.join(", "))
            }
        }
    }
}

fn proto_text(proto: Proto) -> String {
    match proto {
        Proto::All => String::new(),
        Proto::Icmp => "meta l4proto icmp ".into(),
        Proto::Icmpv6 => "meta l4proto ipv6-icmp ".into(),
        Proto::Ports(p, None) => format!("meta l4proto {p} "),
        Proto::Ports(p, Some((a, b))) if a == b => format!("{p} dport {a} "),
        Proto::Ports(p, Some((a, b))) => format!("{p} dport {a}-{b} "),
    }
}

/// The nft allow lines of a rule: `saddr` peers (ingress) or `daddr` peers (egress), protocol, `return`.
pub(super) fn rule_texts(rule: &Rule, peer_field: &str) -> Vec<String> {
    let proto = proto_text(rule.proto);
    if rule.v4 == Some(Peers::Any) && rule.v6 == Some(Peers::Any) {
        return vec![format!("{proto}return")];
    }
    let mut out = Vec::new();
    if let Some(p) = &rule.v4 {
        // ICMP exists only in IPv4: no family match needed.
        let peers = match (p, rule.proto) {
            (Peers::Any, Proto::Icmp) => String::new(),
            _ => peers_text("ip", peer_field, p, 32),
        };
        out.push(format!("{peers}{proto}return"));
    }
    if let Some(p) = &rule.v6 {
        let peers = match (p, rule.proto) {
            (Peers::Any, Proto::Icmpv6) => String::new(),
            _ => peers_text("ip6", peer_field, p, 128),
        };
        out.push(format!("{peers}{proto}return"));
    }
    out
}
