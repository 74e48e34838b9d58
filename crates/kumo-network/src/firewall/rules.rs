//! Security group rules reduced to set elements, for IPv4 and IPv6 peers.
//!
//! A rule's sources may mix families; each family gets its own elements (`ipv4_addr` / `ipv6_addr`
//! sets), `0.0.0.0/0` and `::/0` being ordinary intervals. `icmp` is IPv4's ICMP only and `icmpv6`
//! IPv6's (as in EC2), so a rule of one with only the other family's peers matches nothing. Elements
//! of one profile never overlap: the kernel refuses overlapping elements in a concatenated interval set.

use std::collections::{BTreeMap, BTreeSet};
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

/// The element lists of one direction's lookup sets, each sorted and deduplicated.
#[derive(Debug, Default)]
pub(super) struct Elements {
    /// `mark . peer . proto . port-range`: tcp/udp rules with ports, IPv4 and IPv6.
    pub ports4: BTreeSet<String>,
    pub ports6: BTreeSet<String>,
    /// `mark . peer . proto`: icmp, icmpv6, and tcp/udp with all ports.
    pub proto4: BTreeSet<String>,
    pub proto6: BTreeSet<String>,
    /// `mark . peer`: all protocols.
    pub all4: BTreeSet<String>,
    pub all6: BTreeSet<String>,
}

/// An inclusive port range and the peers it is open to.
type PortRule<T> = ((u16, u16), Vec<(T, u8)>);

/// One family's share of a profile's rules, before it is made disjoint.
struct Family<T> {
    all: Vec<(T, u8)>,
    proto: BTreeMap<&'static str, Vec<(T, u8)>>,
    ports: BTreeMap<&'static str, Vec<PortRule<T>>>,
}

impl<T> Default for Family<T> {
    fn default() -> Self {
        Family {
            all: Vec::new(),
            proto: BTreeMap::new(),
            ports: BTreeMap::new(),
        }
    }
}

impl<T: Copy + Ord + std::fmt::Display> Family<T> {
    fn add(&mut self, proto: Proto, peers: &Peers<T>, zero: T) {
        let nets = match peers {
            Peers::Any => vec![(zero, 0)],
            Peers::Nets(n) => n.clone(),
        };
        match proto {
            Proto::All => self.all.extend(nets),
            Proto::Icmp => self.proto.entry("icmp").or_default().extend(nets),
            Proto::Icmpv6 => self.proto.entry("ipv6-icmp").or_default().extend(nets),
            Proto::Ports(p, None) => self.proto.entry(p).or_default().extend(nets),
            Proto::Ports(p, Some(range)) => self.ports.entry(p).or_default().push((range, nets)),
        }
    }

    /// Renders the elements. The kernel refuses overlapping elements in a concatenated interval set,
    /// so nested peers collapse to the widest and port ranges split where their peer lists differ.
    fn render(
        self,
        key: &str,
        host: u8,
        covers: impl Fn((T, u8), (T, u8)) -> bool + Copy,
        out: [&mut BTreeSet<String>; 3],
    ) {
        let [ports_out, proto_out, all_out] = out;
        let any = if host == 32 { "0.0.0.0/0" } else { "::/0" };
        let peer_texts = |nets: Vec<(T, u8)>| -> Vec<String> {
            match collapse(nets, covers) {
                None => Vec::new(),
                Some(Peers::Any) => vec![any.to_string()],
                Some(Peers::Nets(n)) => n.iter().map(|x| cidr_text(x, host)).collect(),
            }
        };
        for peer in peer_texts(self.all) {
            all_out.insert(format!("{key} . {peer}"));
        }
        for (proto, nets) in self.proto {
            for peer in peer_texts(nets) {
                proto_out.insert(format!("{key} . {peer} . {proto}"));
            }
        }
        for (proto, ranges) in self.ports {
            // Elementary segments between all range boundaries; each gets the union of its rules' peers.
            let mut cuts: BTreeSet<u32> = BTreeSet::new();
            for ((a, b), _) in &ranges {
                cuts.insert(u32::from(*a));
                cuts.insert(u32::from(*b) + 1);
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            let mut merged: Vec<(u32, u32, Vec<String>)> = Vec::new();
            for w in cuts.windows(2) {
                let (lo, hi) = (w[0], w[1] - 1);
                let nets: Vec<(T, u8)> = ranges
                    .iter()
                    .filter(|((a, b), _)| u32::from(*a) <= lo && hi <= u32::from(*b))
                    .flat_map(|(_, n)| n.iter().copied())
                    .collect();
                let peers = peer_texts(nets);
                match merged.last_mut() {
                    Some(last) if last.1 + 1 == lo && last.2 == peers => last.1 = hi,
                    _ => merged.push((lo, hi, peers)),
                }
            }
            for (lo, hi, peers) in merged {
                let range = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                };
                for peer in peers {
                    ports_out.insert(format!("{key} . {peer} . {proto} . {range}"));
                }
            }
        }
    }
}

/// Adds the set elements of `rules` under the profile's mark value `key` (e.g. `0x00000003`).
pub(super) fn add_elements(key: &str, rules: &[Rule], out: &mut Elements) {
    let mut v4: Family<Ipv4Addr> = Family::default();
    let mut v6: Family<Ipv6Addr> = Family::default();
    for r in rules {
        if let Some(p) = &r.v4 {
            v4.add(r.proto, p, Ipv4Addr::UNSPECIFIED);
        }
        if let Some(p) = &r.v6 {
            v6.add(r.proto, p, Ipv6Addr::UNSPECIFIED);
        }
    }
    v4.render(
        key,
        32,
        covers,
        [&mut out.ports4, &mut out.proto4, &mut out.all4],
    );
    v6.render(
        key,
        128,
        covers6,
        [&mut out.ports6, &mut out.proto6, &mut out.all6],
    );
}
