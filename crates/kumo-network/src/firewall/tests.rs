use super::nft::describe_drift;
use super::*;
use crate::spec::{Isolation, RulePolicy};
use std::collections::BTreeSet;

fn net(name: &str, cidr: &str, gw: &str, isolation: Isolation) -> NetworkSpec {
    NetworkSpec {
        name: name.into(),
        bridge: format!("kb-{name}"),
        cidr: cidr.into(),
        gateway: gw.into(),
        mtu: None,
        isolation,
        peers: vec![],
        ipv6_cidr: None,
    }
}

fn port(tap: &str, n: u8, ip: &str, groups: &[&str], eip: Option<&str>) -> PortSpec {
    PortSpec {
        tap: tap.into(),
        mac: format!("02:00:00:00:00:{n:02x}"),
        ip: ip.into(),
        hostname: format!("vm-{n}"),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        public_ip: eip.map(|e| e.parse().unwrap()),
    }
}

fn rule(proto: &str, from: Option<u16>, to: Option<u16>, sources: &[&str]) -> RulePolicy {
    RulePolicy {
        protocol: proto.into(),
        from_port: from,
        to_port: to,
        sources: sources.iter().map(|s| s.to_string()).collect(),
    }
}

fn group(id: &str, ingress: Vec<RulePolicy>, egress: Vec<RulePolicy>) -> GroupPolicy {
    GroupPolicy {
        id: id.into(),
        ingress,
        egress,
    }
}

fn public() -> PublicNetwork {
    PublicNetwork {
        cidr: "203.0.113.0/24".into(),
        gateway: "203.0.113.1".into(),
    }
}

/// Two networks with the same CIDR (two projects), one with a VXLAN uplink, five ports.
fn sample() -> (Vec<(NetworkSpec, Vec<PortSpec>)>, Vec<GroupPolicy>) {
    let a = net(
        "alpha",
        "10.0.0.0/24",
        "10.0.0.1",
        Isolation::Vxlan { vni: 42 },
    );
    let b = net("beta", "10.0.0.0/24", "10.0.0.1", Isolation::Local);
    let nets = vec![
        (
            a,
            vec![
                port("kt-a1", 1, "10.0.0.10", &["sg-web"], Some("203.0.113.10")),
                port("kt-a2", 2, "10.0.0.11", &["sg-web"], None),
                port("kt-a3", 3, "10.0.0.12", &["sg-ssh", "sg-web"], None),
            ],
        ),
        (
            b,
            vec![
                port(
                    "kt-b1",
                    4,
                    "10.0.0.10",
                    &["sg-web", "sg-ssh", "sg-web"],
                    None,
                ),
                port("kt-b2", 5, "10.0.0.11", &[], Some("203.0.113.11")),
            ],
        ),
    ];
    let groups = vec![
        group(
            "sg-web",
            vec![
                rule(
                    "tcp",
                    Some(80),
                    Some(90),
                    &["10.0.0.0/24", "192.168.1.5/32"],
                ),
                rule("icmp", None, None, &["0.0.0.0/0"]),
            ],
            vec![rule("all", None, None, &["0.0.0.0/0"])],
        ),
        group(
            "sg-ssh",
            vec![rule("tcp", Some(22), None, &["198.51.100.0/24"])],
            vec![rule("udp", Some(53), Some(53), &["10.0.0.1"])],
        ),
    ];
    (nets, groups)
}

fn render_sample() -> (String, Vec<(String, String)>) {
    let (nets, groups) = sample();
    render_for_test(&nets, &groups, Some(&public())).unwrap()
}

/// The lines of block `header` (e.g. "set tap_mac") of a rendered table, trimmed, without the
/// `elements = {` brackets: the type line then one line per element.
fn block(text: &str, header: &str) -> Vec<String> {
    let start = format!("\t{header} {{");
    let mut lines = text.lines().skip_while(|l| *l != start).skip(1);
    let mut out = Vec::new();
    for l in lines.by_ref() {
        if l == "\t}" {
            return out;
        }
        let l = l.trim().trim_end_matches(',');
        if l != "elements = {" && l != "}" {
            out.push(l.to_string());
        }
    }
    panic!("no block {header:?} in\n{text}");
}

#[test]
fn rendering_is_deterministic_whatever_the_input_order() {
    let (host, routers) = render_sample();
    assert_eq!(render_sample(), (host.clone(), routers.clone()));
    let (mut nets, mut groups) = sample();
    nets.reverse();
    for (_, ports) in &mut nets {
        ports.reverse();
    }
    groups.reverse();
    let (host2, mut routers2) = render_for_test(&nets, &groups, Some(&public())).unwrap();
    assert_eq!(host, host2);
    routers2.reverse();
    assert_eq!(routers, routers2);
    assert!(
        !host.contains("counter"),
        "counters would make the listing drift"
    );
}

#[test]
fn anti_spoofing_sets_hold_each_ports_mac_and_ip() {
    let (host, _) = render_sample();
    let macs = block(&host, "set tap_mac");
    let ips = block(&host, "set tap_ip");
    let (nets, _) = sample();
    for (_, ports) in &nets {
        for p in ports {
            assert!(
                macs.contains(&format!("\"{}\" . {}", p.tap, p.mac)),
                "{macs:?}"
            );
            assert!(
                ips.contains(&format!("\"{}\" . {}", p.tap, p.ip)),
                "{ips:?}"
            );
        }
    }
    assert_eq!(macs.len(), 1 + 5, "type line, five ports");
    // Ports are numbered in tap name order across networks; router ports and uplinks are marked too.
    let marks = block(&host, "map port_mark");
    for expected in [
        // Taps carry their profile in the upper half (see ports_with_the_same_groups_share_chains).
        "\"kt-a1\" : 0x00030000",
        "\"kt-a3\" : 0x00020000",
        "\"kt-b2\" : 0x00010000",
        "\"kr-alpha\" : 0xffff0000",
        "\"kx-alpha\" : 0x00000000",
    ] {
        assert!(
            marks.iter().any(|m| m == expected),
            "{expected} in {marks:?}"
        );
    }
    assert!(
        !marks.iter().any(|m| m.contains("kx-beta")),
        "beta is host-local"
    );
    assert_eq!(block(&host, "set uplinks")[1], "\"kx-alpha\"");
    let gw_mac = crate::names::mac_for("kumo-gateway:alpha");
    assert!(block(&host, "set uplink_gw_mac").contains(&format!("\"kx-alpha\" . {gw_mac}")));
}

#[test]
fn ports_with_the_same_groups_share_chains() {
    let (host, _) = render_sample();
    // Profiles: [] = 1, [sg-ssh sg-web] = 2, [sg-web] = 3; b1's duplicate and order do not matter.
    assert_eq!(host.matches("\tchain sg_").count(), 2);
    assert_eq!(host.matches("\tchain out_profile_").count(), 3);
    let to_vm = block(&host, "map to_vm");
    for expected in [
        "\"kt-a1\" : jump out_profile_3",
        "\"kt-a2\" : jump out_profile_3",
        "\"kt-a3\" : jump out_profile_2",
        "\"kt-b1\" : jump out_profile_2",
        "\"kt-b2\" : jump out_profile_1",
    ] {
        assert!(
            to_vm.iter().any(|l| l == expected),
            "{expected} in {to_vm:?}"
        );
    }
    assert_eq!(
        block(&host, "chain out_profile_2"),
        ["meta mark set meta mark | 0x00000002"]
    );
    // A thousand ports in one group still render one pair of chains.
    let many: Vec<PortSpec> = (0..1000u32)
        .map(|i| PortSpec {
            tap: format!("kt-{i:012}"),
            mac: crate::names::mac_for(&i.to_string()),
            ip: std::net::Ipv4Addr::from(0x0a00_0000 + 10 + i).to_string(),
            hostname: format!("vm-{i}"),
            groups: vec!["sg-web".into()],
            public_ip: None,
        })
        .collect();
    let nets = vec![(
        net("big", "10.0.0.0/16", "10.0.0.1", Isolation::Local),
        many,
    )];
    let (host, _) = render_for_test(&nets, &sample().1, None).unwrap();
    assert_eq!(host.matches("\tchain sg_").count(), 2);
    assert_eq!(host.matches("\tchain out_profile_").count(), 1);
    assert_eq!(block(&host, "set in4").len(), 1 + 2, "type line, two peers");
    assert_eq!(block(&host, "map port_mark").len(), 1 + 1000 + 1);
}

#[test]
fn a_port_without_groups_has_open_egress_and_closed_ingress() {
    let (host, _) = render_sample();
    // kt-b2 has no groups (profile 1): egress open to both families, no ingress element at all.
    let out4 = block(&host, "set out4_all");
    assert_eq!(
        out4[1..],
        [
            "0x00010000 . 0.0.0.0/0",
            "0x00020000 . 0.0.0.0/0",
            "0x00030000 . 0.0.0.0/0"
        ]
    );
    assert_eq!(block(&host, "set out6_all")[1..], ["0x00010000 . ::/0"]);
    for set in ["in4", "in6", "in4_proto", "in6_proto", "in4_all", "in6_all"] {
        assert!(
            !block(&host, &format!("set {set}"))
                .iter()
                .any(|l| l.starts_with("0x00000001 ")),
            "{set}"
        );
    }
    assert_eq!(
        block(&host, "chain sg_in").last().map(String::as_str),
        Some("drop")
    );
    // A port naming an unknown group fails closed: its chains allow nothing.
    let nets = vec![(
        net("n", "10.1.0.0/24", "10.1.0.1", Isolation::Local),
        vec![port("kt-x", 1, "10.1.0.5", &["sg-gone"], None)],
    )];
    let (host, _) = render_for_test(&nets, &[], None).unwrap();
    for set in [
        "out4",
        "out6",
        "out4_proto",
        "out6_proto",
        "out4_all",
        "out6_all",
    ] {
        assert_eq!(
            block(&host, &format!("set {set}")).len(),
            1,
            "{set}: type line only"
        );
    }
}

#[test]
fn rules_render_protocols_ports_and_sources() {
    let (host, _) = render_sample();
    // Profiles: [sg-ssh sg-web] = 2, [sg-web] = 3; ingress keyed by the lower half of the mark.
    assert_eq!(
        block(&host, "set in4"),
        [
            "type mark . ipv4_addr . inet_proto . inet_service; flags interval",
            "0x00000002 . 10.0.0.0/24 . tcp . 80-90",
            "0x00000002 . 192.168.1.5 . tcp . 80-90",
            "0x00000002 . 198.51.100.0/24 . tcp . 22",
            "0x00000003 . 10.0.0.0/24 . tcp . 80-90",
            "0x00000003 . 192.168.1.5 . tcp . 80-90",
        ]
    );
    assert_eq!(
        block(&host, "set in4_proto")[1..],
        [
            "0x00000002 . 0.0.0.0/0 . icmp",
            "0x00000003 . 0.0.0.0/0 . icmp"
        ]
    );
    // Egress keyed by the upper half: the sending port's profile.
    assert_eq!(
        block(&host, "set out4")[1..],
        ["0x00020000 . 10.0.0.1 . udp . 53"]
    );
    let elements = |rules: &[RulePolicy]| -> Elements {
        let parsed: Vec<Rule> = rules
            .iter()
            .filter_map(|r| parse_rule(r).unwrap())
            .collect();
        let mut e = Elements::default();
        add_elements("0x00000001", &parsed, &mut e);
        e
    };
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|x| x.to_string()).collect() };
    let e = elements(&[
        rule("udp", None, None, &["10.0.0.0/8"]),
        rule("tcp", Some(0), Some(65535), &["0.0.0.0/0"]),
        rule("tcp", None, Some(443), &["10.0.0.5/24"]),
        // Covered ranges collapse (the kernel rejects overlapping elements); IPv6 peers go to the v6 sets.
        rule(
            "all",
            None,
            None,
            &["10.1.2.3/32", "10.0.0.0/8", "172.16.0.0/12", "::/0"],
        ),
        rule("all", None, None, &["2001:db8::/32"]),
        rule("tcp", Some(22), None, &[]),
    ]);
    assert_eq!(e.ports4, set(&["0x00000001 . 10.0.0.0/24 . tcp . 443"]));
    assert_eq!(
        e.proto4,
        set(&[
            "0x00000001 . 0.0.0.0/0 . tcp",
            "0x00000001 . 10.0.0.0/8 . udp"
        ])
    );
    assert_eq!(
        e.all4,
        set(&["0x00000001 . 10.0.0.0/8", "0x00000001 . 172.16.0.0/12"])
    );
    assert_eq!(e.all6, set(&["0x00000001 . ::/0"]));
    assert!(e.ports6.is_empty() && e.proto6.is_empty());
    // Overlapping port ranges of different rules split into disjoint pieces, each with its widest peers.
    let e = elements(&[
        rule("tcp", Some(80), Some(90), &["10.0.0.0/24"]),
        rule("tcp", Some(85), Some(95), &["10.0.0.0/16"]),
        rule("tcp", Some(80), None, &["10.0.0.5"]),
        rule("tcp", Some(80), None, &["10.0.0.5"]),
    ]);
    assert_eq!(
        e.ports4,
        set(&[
            "0x00000001 . 10.0.0.0/24 . tcp . 80-84",
            "0x00000001 . 10.0.0.0/16 . tcp . 85-95",
        ])
    );
}

#[test]
fn bad_policy_is_rejected_with_a_clear_error() {
    let (nets, groups) = sample();
    let bad_rule = |r: RulePolicy| {
        let mut g = groups.clone();
        g[0].egress.push(r);
        g
    };
    let cases: Vec<(Vec<GroupPolicy>, Option<PublicNetwork>, &str)> = vec![
        (
            bad_rule(rule("sctp", None, None, &["0.0.0.0/0"])),
            Some(public()),
            "protocol \"sctp\"",
        ),
        (
            bad_rule(rule("tcp", Some(90), Some(80), &["0.0.0.0/0"])),
            Some(public()),
            "90-80 is empty",
        ),
        (
            bad_rule(rule("icmp", Some(8), None, &["0.0.0.0/0"])),
            Some(public()),
            "take no ports",
        ),
        (
            bad_rule(rule("tcp", Some(1), None, &["10.0.0.0/33"])),
            Some(public()),
            "prefix",
        ),
        (
            bad_rule(rule("tcp", Some(1), None, &["ten"])),
            Some(public()),
            "not a CIDR",
        ),
        (
            [groups.clone(), vec![group("sg-web", vec![], vec![])]].concat(),
            Some(public()),
            "listed twice",
        ),
        (
            vec![group("sg web\n", vec![], vec![])],
            Some(public()),
            "malformed",
        ),
        (groups.clone(), None, "no public network"),
        (
            groups.clone(),
            Some(PublicNetwork {
                cidr: "198.51.100.0/24".into(),
                gateway: "198.51.100.1".into(),
            }),
            "not a usable address",
        ),
        (
            groups.clone(),
            Some(PublicNetwork {
                cidr: "203.0.113.0/24".into(),
                gateway: "203.0.113.10".into(),
            }),
            "not a usable address",
        ),
    ];
    for (g, p, want) in cases {
        let err = render_for_test(&nets, &g, p.as_ref())
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    }
    let mut dup = nets.clone();
    dup[1].1[1].public_ip = Some("203.0.113.10".parse().unwrap());
    let err = render_for_test(&dup, &groups, Some(&public())).unwrap_err();
    assert!(err.to_string().contains("given to two ports"), "{err}");
}

#[test]
fn router_maps_elastic_ips_both_ways() {
    let (_, routers) = render_sample();
    assert_eq!(routers.len(), 2);
    let (name, alpha) = &routers[0];
    assert_eq!(name, "alpha");
    assert_eq!(
        block(alpha, "map eip_dnat")[1..],
        ["203.0.113.10 : 10.0.0.10"]
    );
    assert_eq!(
        block(alpha, "map eip_snat")[1..],
        ["10.0.0.10 : 203.0.113.10"]
    );
    assert_eq!(block(alpha, "set eip_private")[1..], ["10.0.0.10"]);
    let routed = block(alpha, "chain routed");
    assert!(routed[0].contains("policy drop"));
    assert!(routed.contains(&"iifname \"ext0\" oifname \"int0\" ct status dnat accept".into()));
    assert!(block(alpha, "chain local_in").contains(&"iifname \"ext0\" drop".into()));
    let beta = &routers[1].1;
    assert_eq!(
        block(beta, "map eip_dnat")[1..],
        ["203.0.113.11 : 10.0.0.11"]
    );
    // Without a public network the table still exists, with empty maps and forward policy drop.
    let (nets, groups) = sample();
    let plain: Vec<_> = nets
        .into_iter()
        .map(|(n, ports)| {
            let ports = ports
                .into_iter()
                .map(|p| PortSpec {
                    public_ip: None,
                    ..p
                })
                .collect();
            (n, ports)
        })
        .collect();
    let (_, routers) = render_for_test(&plain, &groups, None).unwrap();
    let alpha = &routers[0].1;
    assert_eq!(block(alpha, "map eip_dnat"), ["type ipv4_addr : ipv4_addr"]);
    assert!(block(alpha, "chain routed")[0].contains("policy drop"));
    assert!(alpha.starts_with("# kumo router ruleset of network alpha"));
    assert!(alpha.contains("table inet kumo {}\ndelete table inet kumo\ntable inet kumo {\n"));
}

#[test]
fn drift_is_described_by_table_and_block() {
    let recorded = "table bridge kumo {\n\tset tap_ip {\n\t\ttype ifname . ipv4_addr\n\t\telements = { \"kt-a\" . 10.0.0.10,\n\t\t\t     \"kt-b\" . 10.0.0.11 }\n\t}\n\n\tchain from_vm {\n\t\tiifname . ip saddr != @tap_ip drop\n\t}\n}\ntable inet kumo {\n\tchain sg_in_1 {\n\t\ttcp dport 80 return\n\t\tdrop\n\t}\n}\n";
    let (tables, what) =
        describe_drift(recorded, &recorded.replace("\t\ttcp dport 80 return\n", ""));
    assert_eq!(tables, "inet kumo");
    assert_eq!(what, "inet kumo: chain sg_in_1: 1 line removed");
    let added = recorded.replace(
        "10.0.0.11 }",
        "10.0.0.11,\n\t\t\t     \"kt-b\" . 10.0.0.12 }",
    );
    let (tables, what) = describe_drift(recorded, &added);
    assert_eq!(tables, "bridge kumo");
    assert_eq!(what, "bridge kumo: set tap_ip: 1 line added");
    let gone = recorded.split("table inet").next().unwrap();
    assert_eq!(describe_drift(recorded, gone).1, "inet kumo: table missing");
    let extra = recorded.replace("}\ntable inet", "\tchain mine {\n\t}\n}\ntable inet");
    assert_eq!(
        describe_drift(recorded, &extra).1,
        "bridge kumo: unexpected chain mine"
    );
}

/// Deletes the scratch namespace even when the test fails.
struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return true;
    }
    // In CI (root) a missing prerequisite is a failure, never a skip.
    assert!(std::env::var_os("CI").is_none(), "this test needs root");
    eprintln!("skipping: needs root");
    false
}

/// `nft -c -f` (check only) accepts the rendered text inside a scratch namespace.
#[test]
fn nft_accepts_rendered_rulesets() {
    if !is_root() {
        return;
    }
    let ns = format!("kfw-check-{}", std::process::id());
    let out = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _guard = NsGuard(ns.clone());
    let dir = tempfile::tempdir().unwrap();
    let (host, routers) = render_sample();
    // Rules whose elements would overlap (the kernel refuses that in one set) unless split.
    let (nets, mut groups) = sample();
    groups[0].ingress.extend([
        rule("tcp", Some(85), Some(95), &["10.0.0.0/16", "::/0"]),
        rule("tcp", Some(80), None, &["10.0.0.5", "fd00::/8"]),
        rule("all", None, None, &["10.0.0.0/8", "10.1.0.0/16", "fd00::1"]),
        rule("icmpv6", None, None, &["::/0", "fd00::/8"]),
    ]);
    groups[1]
        .ingress
        .push(rule("tcp", Some(20), Some(30), &["198.51.100.7"]));
    let (overlap, _) = render_for_test(&nets, &groups, Some(&public())).unwrap();
    let texts = [
        ("host", host),
        ("router", routers[0].1.clone()),
        ("overlap", overlap),
    ];
    for (what, text) in texts {
        let file = dir.path().join(what);
        std::fs::write(&file, &text).unwrap();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-c", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft rejected the {what} ruleset: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

mod ipv6;
