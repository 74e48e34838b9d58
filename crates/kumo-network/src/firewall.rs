//! nftables rulesets rendered whole from the desired state, applied atomically (`nft -f`), and checked
//! for drift against what was applied.
//!
//! **Host namespace**: two tables, replaced together in one transaction ([`render_host`]).
//! - `bridge kumo`: anti-spoofing on VM taps, uplink hygiene, and packet marks. A *profile* is a
//!   distinct set of security groups, numbered 1, 2, … in the order of the sorted group lists (a port
//!   without groups has one too). The `ports_in` chain (prerouting) sets the mark's upper 16 bits to
//!   the sending tap's profile; a router port is 0xffff, an uplink 0. The `ports_out` chain (forward;
//!   it runs once per egress port, flooded frames included) ORs the receiving tap's profile into the
//!   lower 16 bits. nft 1.0.6 can only OR constants into the mark, hence one one-rule chain per
//!   profile behind a verdict map (cheap: no sets, one rule each).
//! - IPv6 (dual-stack networks only): taps send from their link-local and SLAAC (EUI-64) addresses, or
//!   from `::` for DAD/MLD; never router advertisements, redirects or DHCPv6 replies; neighbour
//!   advertisements only for their own addresses. Uplinks carry no RA/RS/DHCPv6 (each host's router
//!   serves its own VMs).
//! - `inet kumo`: br_netfilter passes bridged IPv4 and IPv6 through the inet forward hook with conntrack (there
//!   `iifname` is the bridge, hence the marks). `vm_filter` accepts established traffic, the gateway's
//!   services, then (from a tap) jumps to `sg_out` and (towards a tap) to `sg_in`. Security groups are
//!   data, not code, so that the ruleset's sets, chains and rules do not grow with the number of groups:
//!   per direction and family, concatenated interval sets keyed by the profile's half of the mark and
//!   the peer, `in4` (`mark . ipv4_addr . inet_proto . inet_service`, tcp/udp port ranges), `in4_proto`
//!   (`mark . ipv4_addr . inet_proto`) and `in4_all` (`mark . ipv4_addr`), likewise `in6*` and `out*`
//!   (egress looks up the daddr). A hit `return`s; `sg_in`/`sg_out` end in `drop`. A port without
//!   groups has open egress (`0.0.0.0/0` and `::/0` elements) and no ingress elements. Each bridge gets
//!   its own conntrack zone so that two networks with the same CIDR never share connection state.
//!
//! **Router namespace** ([`render_router`]): `inet kumo` with elastic IP DNAT/SNAT maps, forward policy
//! drop, and nothing reachable on the router itself from `ext0` but replies.

use std::collections::{BTreeMap, BTreeSet};

use sha2::Digest;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::error::NetworkError;
use crate::spec::{
    self, GroupPolicy, Network, NetworkSpec, Port, PortSpec, PublicNetwork, METADATA_IP,
    ROUTER_INSIDE, ROUTER_OUTSIDE,
};

/// The tables [`render_host`] replaces, as (family, name).
pub const HOST_TABLES: &[(&str, &str)] = &[("bridge", "kumo"), ("inet", "kumo")];
/// The table [`render_router`] replaces.
pub const ROUTER_TABLES: &[(&str, &str)] = &[("inet", "kumo")];

/// Upper half of the mark of frames from a router port (taps use 1..=MAX_PORTS).
const ROUTER_MARK: u32 = 0xffff_0000;
const MAX_PORTS: usize = 0xfffe;

// ---------------------------------------------------------------------------------------------------
// Security group rules, parsed.

use rules::{add_elements, covers, mask, parse_rule, parse_v4_cidr, Elements, Rule};

/// Characters a group id may have (it appears in comments of the rendered text).
fn group_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A port's profile: its group ids, sorted and deduplicated (the rules are their union).
fn profile_key(port: &Port) -> Vec<String> {
    let set: BTreeSet<&String> = port.groups.iter().collect();
    set.into_iter().cloned().collect()
}

fn public_cidr(public: &PublicNetwork) -> Option<(Ipv4Addr, u8)> {
    parse_v4_cidr(&public.cidr).ok().flatten()
}

/// Checks what [`render_host`] and [`render_router`] would otherwise silently leave out (they skip
/// malformed rules and out-of-pool elastic IPs, failing closed). Call before rendering to report bad input.
pub(crate) fn check_policy(
    nets: &[Network],
    groups: &[GroupPolicy],
    public: Option<&PublicNetwork>,
) -> Result<(), NetworkError> {
    let bad = NetworkError::InvalidSpec;
    let mut ids = BTreeSet::new();
    for g in groups {
        if !group_id_ok(&g.id) {
            return Err(bad(format!("security group id {:?} is malformed", g.id)));
        }
        if !ids.insert(g.id.as_str()) {
            return Err(bad(format!("security group {} is listed twice", g.id)));
        }
        for (dir, rules) in [("ingress", &g.ingress), ("egress", &g.egress)] {
            for (i, r) in rules.iter().enumerate() {
                parse_rule(r).map_err(|e| {
                    bad(format!("security group {} {dir} rule {}: {e}", g.id, i + 1))
                })?;
            }
        }
    }
    let ports: Vec<&Port> = nets.iter().flat_map(|n| n.ports.iter()).collect();
    if ports.len() > MAX_PORTS {
        return Err(bad(format!(
            "{} ports on one host; at most {MAX_PORTS} are supported",
            ports.len()
        )));
    }
    let pool = match public {
        Some(p) => {
            let (net, prefix) = public_cidr(p).ok_or_else(|| {
                bad(format!(
                    "public network cidr {:?} is not an IPv4 CIDR",
                    p.cidr
                ))
            })?;
            let gw: Ipv4Addr = p.gateway.parse().map_err(|_| {
                bad(format!(
                    "public gateway {:?} is not an IPv4 address",
                    p.gateway
                ))
            })?;
            Some((net, prefix, gw))
        }
        None => None,
    };
    let mut eips = BTreeSet::new();
    for port in &ports {
        if let Some(g) = port.groups.iter().find(|g| !group_id_ok(g)) {
            return Err(bad(format!(
                "port {}: security group id {g:?} is malformed",
                port.tap
            )));
        }
        let Some(eip) = port.public_ip else { continue };
        let Some((net, prefix, gw)) = pool else {
            return Err(bad(format!(
                "port {} has elastic IP {eip} but no public network is configured",
                port.tap
            )));
        };
        let host = u32::from(eip) & !mask(prefix);
        if !covers((net, prefix), (eip, 32)) || host == 0 || host == !mask(prefix) || eip == gw {
            return Err(bad(format!(
                "port {}: elastic IP {eip} is not a usable address of {net}/{prefix} (gateway {gw})",
                port.tap
            )));
        }
        if !eips.insert(eip) {
            return Err(bad(format!("elastic IP {eip} is given to two ports")));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Rendering.

fn push(out: &mut String, indent: usize, line: &str) {
    for _ in 0..indent {
        out.push('\t');
    }
    out.push_str(line);
    out.push('\n');
}

/// A named set or map; `elements` are rendered one per line (empty: no elements clause).
fn set_block(out: &mut String, kind: &str, name: &str, ty: &str, elements: &[String]) {
    push(out, 1, &format!("{kind} {name} {{"));
    push(out, 2, ty);
    if !elements.is_empty() {
        push(out, 2, "elements = {");
        for (i, e) in elements.iter().enumerate() {
            let comma = if i + 1 < elements.len() { "," } else { "" };
            push(out, 3, &format!("{e}{comma}"));
        }
        push(out, 2, "}");
    }
    push(out, 1, "}");
}

fn chain_block(out: &mut String, name: &str, lines: &[String]) {
    push(out, 1, &format!("chain {name} {{"));
    for l in lines {
        push(out, 2, l);
    }
    push(out, 1, "}");
}

fn replace_table(out: &mut String, family: &str, name: &str) {
    // Declaring first makes the delete succeed when the table is missing; all of it is one transaction.
    push(out, 0, &format!("table {family} {name} {{}}"));
    push(out, 0, &format!("delete table {family} {name}"));
    push(out, 0, &format!("table {family} {name} {{"));
}

fn q(ifname: &str) -> String {
    format!("\"{ifname}\"")
}

/// The parsed rules of a profile in one direction: the union of its groups' rules.
fn profile_rules(
    key: &[String],
    groups: &BTreeMap<&str, &GroupPolicy>,
    ingress: bool,
) -> Vec<Rule> {
    let mut out = Vec::new();
    for id in key {
        let Some(g) = groups.get(id.as_str()) else {
            continue; // Unknown group: contributes nothing (fails closed).
        };
        let rules = if ingress { &g.ingress } else { &g.egress };
        out.extend(rules.iter().filter_map(|r| parse_rule(r).ok().flatten()));
    }
    out
}

/// The lookup sets of one direction (`in` or `out`), keyed by the profile's mark value.
fn sg_sets(out: &mut String, dir: &str, e: &Elements) {
    let v = |s: &BTreeSet<String>| -> Vec<String> { s.iter().cloned().collect() };
    let sets = [
        ("4", "ipv4_addr . inet_proto . inet_service", &e.ports4),
        ("6", "ipv6_addr . inet_proto . inet_service", &e.ports6),
        ("4_proto", "ipv4_addr . inet_proto", &e.proto4),
        ("6_proto", "ipv6_addr . inet_proto", &e.proto6),
        ("4_all", "ipv4_addr", &e.all4),
        ("6_all", "ipv6_addr", &e.all6),
    ];
    for (suffix, ty, elems) in sets {
        set_block(
            out,
            "set",
            &format!("{dir}{suffix}"),
            &format!("type mark . {ty}; flags interval"),
            &v(elems),
        );
    }
}

/// The chain that looks a packet up in one direction's sets: allowed traffic returns, the rest drops.
fn sg_chain(out: &mut String, dir: &str, mask: &str, field: &str) {
    let m = format!("meta mark & {mask}");
    let lines = vec![
        format!("{m} . ip {field} . meta l4proto . th dport @{dir}4 return"),
        format!("{m} . ip6 {field} . meta l4proto . th dport @{dir}6 return"),
        format!("{m} . ip {field} . meta l4proto @{dir}4_proto return"),
        format!("{m} . ip6 {field} . meta l4proto @{dir}6_proto return"),
        format!("{m} . ip {field} @{dir}4_all return"),
        format!("{m} . ip6 {field} @{dir}6_all return"),
        "drop".to_string(),
    ];
    chain_block(out, &format!("sg_{dir}"), &lines);
}

/// The host namespace's ruleset (tables [`HOST_TABLES`]) as text for `nft -f`.
pub(crate) fn render_host(nets: &[Network], groups: &[GroupPolicy]) -> String {
    let mut nets: Vec<&Network> = nets.iter().collect();
    nets.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ports: Vec<(&Network, &Port)> = nets
        .iter()
        .flat_map(|n| n.ports.iter().map(move |p| (*n, p)))
        .collect();
    ports.sort_by(|a, b| a.1.tap.cmp(&b.1.tap));
    let profiles: BTreeMap<Vec<String>, usize> = ports
        .iter()
        .map(|(_, p)| profile_key(p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, i + 1))
        .collect();
    let mut by_id: BTreeMap<&str, &GroupPolicy> = BTreeMap::new();
    for g in groups {
        by_id.entry(g.id.as_str()).or_insert(g);
    }
    let profile_of = |p: &Port| profiles.get(&profile_key(p)).copied().unwrap_or(0);
    let uplinks: Vec<(&Network, String)> = nets
        .iter()
        .filter_map(|n| n.uplink().map(|u| (*n, u)))
        .collect();

    let mut out = String::new();
    push(
        &mut out,
        0,
        "# kumo host ruleset, rendered from the desired state; do not edit by hand.",
    );
    push(
        &mut out,
        0,
        "# Ports in tap name order, with their profile:",
    );
    for (n, p) in &ports {
        let line = format!(
            "#   {} (network {}, profile {})",
            p.tap,
            n.name,
            profile_of(p)
        );
        push(&mut out, 0, &line);
    }
    push(
        &mut out,
        0,
        "# Profiles (mark bits 16-31 from a tap, 0-15 towards a tap):",
    );
    for (key, k) in &profiles {
        push(&mut out, 0, &format!("#   {k} = [{}]", key.join(" ")));
    }

    // --- bridge kumo ---
    replace_table(&mut out, "bridge", "kumo");
    let taps: Vec<String> = ports.iter().map(|(_, p)| q(&p.tap)).collect();
    set_block(&mut out, "set", "taps", "type ifname", &taps);
    let tap_mac: Vec<String> = ports
        .iter()
        .map(|(_, p)| format!("{} . {}", q(&p.tap), p.mac))
        .collect();
    set_block(
        &mut out,
        "set",
        "tap_mac",
        "type ifname . ether_addr",
        &tap_mac,
    );
    let tap_ip: Vec<String> = ports
        .iter()
        .map(|(_, p)| format!("{} . {}", q(&p.tap), p.ip))
        .collect();
    set_block(
        &mut out,
        "set",
        "tap_ip",
        "type ifname . ipv4_addr",
        &tap_ip,
    );
    // IPv6: only taps of dual-stack networks, from their link-local and SLAAC addresses.
    let v6_ports: Vec<(&Port, Vec<Ipv6Addr>)> = ports
        .iter()
        .map(|(n, p)| (*p, n.port_v6(p)))
        .filter(|(_, a)| !a.is_empty())
        .collect();
    let taps6: Vec<String> = v6_ports.iter().map(|(p, _)| q(&p.tap)).collect();
    set_block(&mut out, "set", "taps6", "type ifname", &taps6);
    let tap_ip6: Vec<String> = v6_ports
        .iter()
        .flat_map(|(p, addrs)| addrs.iter().map(|a| format!("{} . {a}", q(&p.tap))))
        .collect();
    set_block(
        &mut out,
        "set",
        "tap_ip6",
        "type ifname . ipv6_addr",
        &tap_ip6,
    );
    // The same pairs keyed by raw payload: nft 1.0.6 has no `icmpv6 taddr` for neighbour advertisements.
    let tap_nd: Vec<String> = v6_ports
        .iter()
        .flat_map(|(p, addrs)| {
            addrs
                .iter()
                .map(|a| format!("{} . 0x{:032x}", q(&p.tap), u128::from(*a)))
        })
        .collect();
    set_block(
        &mut out,
        "set",
        "tap_nd",
        "typeof iifname . @th,64,128",
        &tap_nd,
    );
    let uplink_names: Vec<String> = uplinks.iter().map(|(_, u)| q(u)).collect();
    set_block(&mut out, "set", "uplinks", "type ifname", &uplink_names);
    let uplink_gw_mac: Vec<String> = uplinks
        .iter()
        .map(|(n, u)| format!("{} . {}", q(u), n.gateway_mac()))
        .collect();
    set_block(
        &mut out,
        "set",
        "uplink_gw_mac",
        "type ifname . ether_addr",
        &uplink_gw_mac,
    );
    let uplink_gw_ip: Vec<String> = uplinks
        .iter()
        .map(|(n, u)| format!("{} . {}", q(u), n.gateway))
        .collect();
    set_block(
        &mut out,
        "set",
        "uplink_gw_ip",
        "type ifname . ipv4_addr",
        &uplink_gw_ip,
    );
    let mut marks: Vec<(String, u32)> = ports
        .iter()
        .map(|(_, p)| (p.tap.clone(), (profile_of(p) as u32 & 0xffff) << 16))
        .collect();
    marks.extend(nets.iter().map(|n| (n.router_port(), ROUTER_MARK)));
    marks.extend(uplinks.iter().map(|(_, u)| (u.clone(), 0)));
    marks.sort();
    let marks: Vec<String> = marks
        .iter()
        .map(|(name, m)| format!("{} : 0x{m:08x}", q(name)))
        .collect();
    set_block(&mut out, "map", "port_mark", "type ifname : mark", &marks);
    let to_vm: Vec<String> = ports
        .iter()
        .map(|(_, p)| format!("{} : jump out_profile_{}", q(&p.tap), profile_of(p)))
        .collect();
    set_block(&mut out, "map", "to_vm", "type ifname : verdict", &to_vm);

    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    chain_block(
        &mut out,
        "ports_in",
        &s(&[
            "type filter hook prerouting priority -300; policy accept;",
            "meta mark set iifname map @port_mark",
            "iifname @taps jump from_vm",
            "iifname @uplinks jump from_uplink",
        ]),
    );
    chain_block(
        &mut out,
        "from_vm",
        &s(&[
            "iifname . ether saddr != @tap_mac drop",
            "ether type arp iifname . arp saddr ether != @tap_mac drop",
            "ether type arp arp saddr ip 0.0.0.0 return",
            "ether type arp iifname . arp saddr ip != @tap_ip drop",
            "ether type ip udp sport 67 drop",
            "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
            "ether type ip iifname . ip saddr != @tap_ip drop",
            "ether type ip6 iifname != @taps6 drop",
            // A VM is no router and no DHCPv6 server.
            "icmpv6 type { nd-router-advert, nd-redirect } drop",
            "ether type ip6 udp sport 547 drop",
            // Duplicate address detection and MLD before an address is configured come from ::.
            "ether type ip6 ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld-listener-report, mld2-listener-report } return",
            "ether type ip6 iifname . ip6 saddr != @tap_ip6 drop",
            "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @tap_nd drop",
            "ether type != { ip, arp, ip6 } drop",
        ]),
    );
    let hygiene = |dev: &str| -> Vec<String> {
        vec![
            format!("{dev} . ether saddr @uplink_gw_mac drop"),
            format!("{dev} . ether daddr @uplink_gw_mac drop"),
            format!("ether type arp {dev} . arp daddr ip @uplink_gw_ip drop"),
            "ether type ip udp dport { 67, 68 } drop".to_string(),
            // Each host's router advertises and answers DHCPv6 for its own VMs.
            "icmpv6 type { nd-router-solicit, nd-router-advert } drop".to_string(),
            "ether type ip6 udp dport { 546, 547 } drop".to_string(),
        ]
    };
    chain_block(&mut out, "from_uplink", &hygiene("iifname"));
    chain_block(
        &mut out,
        "ports_out",
        &s(&[
            "type filter hook forward priority -100; policy accept;",
            "oifname @uplinks jump to_uplink",
            "oifname @taps ether type != { ip, arp, ip6 } drop",
            "oifname @taps ether type ip6 oifname != @taps6 drop",
            "oifname vmap @to_vm",
        ]),
    );
    chain_block(&mut out, "to_uplink", &hygiene("oifname"));
    // The VXLAN packet would inherit the mark; it is ours only while the frame crosses the bridge.
    chain_block(
        &mut out,
        "ports_post",
        &s(&[
            "type filter hook postrouting priority 300; policy accept;",
            "oifname @uplinks meta mark set 0x00000000",
        ]),
    );
    for k in profiles.values() {
        chain_block(
            &mut out,
            &format!("out_profile_{k}"),
            &[format!("meta mark set meta mark | 0x{k:08x}")],
        );
    }
    push(&mut out, 0, "}");

    // --- inet kumo ---
    replace_table(&mut out, "inet", "kumo");
    let bridges: Vec<String> = nets.iter().map(|n| q(&n.bridge)).collect();
    set_block(&mut out, "set", "bridges", "type ifname", &bridges);
    let zones: Vec<String> = conntrack_zones(&nets)
        .into_iter()
        .map(|(bridge, z)| format!("{} : {z}", q(bridge)))
        .collect();
    set_block(&mut out, "map", "zone", "typeof iifname : ct zone", &zones);
    let mut services = Vec::new();
    for n in &nets {
        let b = q(&n.bridge);
        let gw = n.gateway;
        services.push(format!("{b} . {gw} . udp . 53"));
        services.push(format!("{b} . {gw} . tcp . 53"));
        services.push(format!("{b} . {gw} . udp . 67"));
        services.push(format!("{b} . 255.255.255.255 . udp . 67"));
        services.push(format!("{b} . {METADATA_IP} . tcp . 80"));
    }
    set_block(
        &mut out,
        "set",
        "services",
        "type ifname . ipv4_addr . inet_proto . inet_service",
        &services,
    );
    let mut services6 = Vec::new();
    for n in &nets {
        let (Some(gw6), Ok(ll)) = (n.gateway6(), kumo_types::ipv6::link_local(&n.gateway_mac()))
        else {
            continue;
        };
        let b = q(&n.bridge);
        for a in [gw6, ll] {
            services6.push(format!("{b} . {a} . udp . 53"));
            services6.push(format!("{b} . {a} . tcp . 53"));
        }
        services6.push(format!("{b} . ff02::1:2 . udp . 547"));
    }
    set_block(
        &mut out,
        "set",
        "services6",
        "type ifname . ipv6_addr . inet_proto . inet_service",
        &services6,
    );
    let gateways: Vec<String> = nets
        .iter()
        .map(|n| format!("{} . {}", q(&n.bridge), n.gateway))
        .collect();
    set_block(
        &mut out,
        "set",
        "gateways",
        "type ifname . ipv4_addr",
        &gateways,
    );
    // Security groups as data: elements per (profile, peer, protocol, ports), not chains per group.
    let mut ins = Elements::default();
    let mut outs = Elements::default();
    for (key, k) in &profiles {
        add_elements(
            &format!("0x{k:08x}"),
            &profile_rules(key, &by_id, true),
            &mut ins,
        );
        let egress_key = format!("0x{:08x}", (*k as u32 & 0xffff) << 16);
        if key.is_empty() {
            // A port without groups sends anywhere.
            outs.all4.insert(format!("{egress_key} . 0.0.0.0/0"));
            outs.all6.insert(format!("{egress_key} . ::/0"));
        } else {
            add_elements(&egress_key, &profile_rules(key, &by_id, false), &mut outs);
        }
    }
    sg_sets(&mut out, "in", &ins);
    sg_sets(&mut out, "out", &outs);
    chain_block(
        &mut out,
        "zones",
        &s(&[
            "type filter hook prerouting priority raw; policy accept;",
            "ct zone set iifname map @zone",
        ]),
    );
    chain_block(
        &mut out,
        "vm_filter",
        &[
            "type filter hook forward priority filter; policy accept;".to_string(),
            "iifname != @bridges accept".to_string(),
            "ct state established,related accept".to_string(),
            // Neighbour discovery and MLD are the link's plumbing (untracked); the bridge table already
            // keeps router advertisements to the router port.
            "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report } accept".to_string(),
            "ct state invalid drop".to_string(),
            format!("meta mark & 0xffff0000 == 0x{ROUTER_MARK:08x} udp sport 67 udp dport 68 accept"),
            format!("meta mark & 0xffff0000 == 0x{ROUTER_MARK:08x} udp sport 547 udp dport 546 accept"),
            "meta mark & 0x0000ffff == 0x00000000 iifname . ip daddr . meta l4proto . th dport @services accept"
                .to_string(),
            "meta mark & 0x0000ffff == 0x00000000 iifname . ip6 daddr . meta l4proto . th dport @services6 accept"
                .to_string(),
            // The router itself (the agent's port-forward) reaches its VMs; elastic-IP traffic keeps the
            // outside source and passes the security groups.
            format!("meta mark & 0xffff0000 == 0x{ROUTER_MARK:08x} iifname . ip saddr @gateways accept"),
            // From a tap (not an uplink or router port): its egress rules; towards a tap: its ingress rules.
            format!("meta mark & 0xffff0000 != {{ 0x00000000, 0x{ROUTER_MARK:08x} }} jump sg_out"),
            "meta mark & 0x0000ffff != 0x00000000 jump sg_in".to_string(),
        ],
    );
    sg_chain(&mut out, "out", "0xffff0000", "daddr");
    sg_chain(&mut out, "in", "0x0000ffff", "saddr");
    push(&mut out, 0, "}");
    out
}

/// A conntrack zone per bridge that does not move when other networks come or go (a moved zone
/// would orphan the network's open connections): derived from the bridge name, the next free one on
/// the rare collision.
fn conntrack_zones<'a>(nets: &[&'a Network]) -> Vec<(&'a str, u16)> {
    let mut used = std::collections::BTreeSet::new();
    nets.iter()
        .map(|n| {
            let digest = sha2::Sha256::digest(n.bridge.as_bytes());
            let mut z = 1 + u16::from_be_bytes([digest[0], digest[1]]) % 65534;
            while !used.insert(z) {
                z = z % 65534 + 1;
            }
            (n.bridge.as_str(), z)
        })
        .collect()
}

/// A network's router namespace ruleset (tables [`ROUTER_TABLES`]) as text for `nft -f`.
pub(crate) fn render_router(net: &Network, public: Option<&PublicNetwork>) -> String {
    let pool = public.and_then(public_cidr);
    let mut eips: Vec<(Ipv4Addr, Ipv4Addr)> = net
        .ports
        .iter()
        .filter_map(|p| p.public_ip.map(|e| (e, p.ip)))
        .filter(|(e, _)| pool.is_some_and(|n| covers(n, (*e, 32))))
        .collect();
    eips.sort();
    let dnat: Vec<String> = eips.iter().map(|(e, p)| format!("{e} : {p}")).collect();
    let mut snat: Vec<String> = eips.iter().map(|(e, p)| format!("{p} : {e}")).collect();
    snat.sort();
    let mut private: Vec<Ipv4Addr> = eips.iter().map(|(_, p)| *p).collect();
    private.sort();
    let private: Vec<String> = private.iter().map(|p| p.to_string()).collect();
    let ext = q(ROUTER_OUTSIDE);
    let int = q(ROUTER_INSIDE);

    let mut out = String::new();
    push(
        &mut out,
        0,
        &format!(
            "# kumo router ruleset of network {}; do not edit by hand.",
            net.name
        ),
    );
    replace_table(&mut out, "inet", "kumo");
    set_block(
        &mut out,
        "map",
        "eip_dnat",
        "type ipv4_addr : ipv4_addr",
        &dnat,
    );
    set_block(
        &mut out,
        "map",
        "eip_snat",
        "type ipv4_addr : ipv4_addr",
        &snat,
    );
    set_block(&mut out, "set", "eip_private", "type ipv4_addr", &private);
    chain_block(
        &mut out,
        "nat_in",
        &[
            "type nat hook prerouting priority dstnat; policy accept;".into(),
            format!("iifname {ext} dnat ip to ip daddr map @eip_dnat"),
        ],
    );
    chain_block(
        &mut out,
        "nat_out",
        &[
            "type nat hook postrouting priority srcnat; policy accept;".into(),
            format!("oifname {ext} snat ip to ip saddr map @eip_snat"),
        ],
    );
    chain_block(
        &mut out,
        "routed",
        &[
            "type filter hook forward priority filter; policy drop;".into(),
            "ct state established,related accept".into(),
            // Outside traffic posing as this network's own addresses would pass for the gateway.
            format!("iifname {ext} ip saddr {}/{} drop", net.network, net.prefix),
            format!("iifname {ext} oifname {int} ct status dnat accept"),
            format!("iifname {int} oifname {ext} ip saddr @eip_private accept"),
        ],
    );
    chain_block(
        &mut out,
        "local_in",
        &[
            "type filter hook input priority filter; policy accept;".into(),
            format!("iifname {ext} ct state established,related accept"),
            format!("iifname {ext} drop"),
        ],
    );
    push(&mut out, 0, "}");
    out
}

/// Test hook: validates like the agent does and renders the host text and each network's router text.
#[doc(hidden)]
pub fn render_for_test(
    networks: &[(NetworkSpec, Vec<PortSpec>)],
    groups: &[GroupPolicy],
    public: Option<&PublicNetwork>,
) -> Result<(String, Vec<(String, String)>), NetworkError> {
    let nets = spec::validate(networks)?;
    check_policy(&nets, groups, public)?;
    let routers = nets
        .iter()
        .map(|n| (n.name.clone(), render_router(n, public)))
        .collect();
    Ok((render_host(&nets, groups), routers))
}

mod nft;
mod rules;
pub use nft::Nft;

#[cfg(test)]
mod tests;
