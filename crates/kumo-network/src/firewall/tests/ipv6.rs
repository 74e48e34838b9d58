//! Rendering of dual-stack networks: IPv6 anti-spoofing sets, ND/RA rules, IPv6 security group rules.

use super::*;

/// One dual-stack network (fd60:1::/64) with two ports, and one IPv4-only network with one.
fn dual() -> (Vec<(NetworkSpec, Vec<PortSpec>)>, Vec<GroupPolicy>) {
    let mut a = net(
        "alpha",
        "10.0.0.0/24",
        "10.0.0.1",
        Isolation::Vxlan { vni: 7 },
    );
    a.ipv6_cidr = Some("fd60:1::/64".into());
    let b = net("beta", "10.1.0.0/24", "10.1.0.1", Isolation::Local);
    let nets = vec![
        (
            a,
            vec![
                port("kt-a1", 1, "10.0.0.10", &["sg-v6"], None),
                port("kt-a2", 2, "10.0.0.11", &["sg-v6"], None),
            ],
        ),
        (b, vec![port("kt-b1", 3, "10.1.0.10", &["sg-v6"], None)]),
    ];
    let groups = vec![group(
        "sg-v6",
        vec![
            rule("tcp", Some(80), None, &["::/0"]),
            rule("tcp", Some(443), None, &["0.0.0.0/0", "::/0"]),
            rule("icmp", None, None, &["0.0.0.0/0", "::/0"]),
            rule("icmpv6", None, None, &["fd60:1::/64"]),
            rule(
                "all",
                None,
                None,
                &["10.0.0.11/32", "fd60:1::ff:fe00:2/128"],
            ),
        ],
        vec![rule("all", None, None, &["0.0.0.0/0", "::/0"])],
    )];
    (nets, groups)
}

fn render_dual() -> String {
    let (nets, groups) = dual();
    render_for_test(&nets, &groups, None).unwrap().0
}

#[test]
fn taps_of_dual_stack_networks_get_link_local_and_slaac_sources() {
    let host = render_dual();
    assert_eq!(
        block(&host, "set taps6"),
        ["type ifname", "\"kt-a1\"", "\"kt-a2\""]
    );
    assert_eq!(
        block(&host, "set tap_ip6"),
        [
            "type ifname . ipv6_addr",
            "\"kt-a1\" . fe80::ff:fe00:1",
            "\"kt-a1\" . fd60:1::ff:fe00:1",
            "\"kt-a2\" . fe80::ff:fe00:2",
            "\"kt-a2\" . fd60:1::ff:fe00:2",
        ]
    );
    let nd = block(&host, "set tap_nd");
    assert_eq!(nd[0], "typeof iifname . @th,64,128");
    assert_eq!(nd[2], "\"kt-a1\" . 0xfd60000100000000000000fffe000001");
    let from_vm = block(&host, "chain from_vm");
    // RA and redirects are refused before the `::` (DAD) exception can let anything through.
    let ra = from_vm.iter().position(|l| l.contains("nd-router-advert"));
    let dad = from_vm.iter().position(|l| l.contains("ip6 saddr ::"));
    assert!(ra.is_some() && dad.is_some() && ra < dad, "{from_vm:?}");
    assert!(from_vm.contains(&"ether type ip6 iifname != @taps6 drop".to_string()));
    assert_eq!(
        from_vm.last().map(String::as_str),
        Some("ether type != { ip, arp, ip6 } drop")
    );
    // Each host's router serves its own VMs: no RA/RS/DHCPv6 across the uplink.
    for chain in ["chain from_uplink", "chain to_uplink"] {
        let lines = block(&host, chain);
        assert!(
            lines.contains(&"icmpv6 type { nd-router-solicit, nd-router-advert } drop".to_string()),
            "{chain}: {lines:?}"
        );
    }
    // DNS on the IPv6 gateway and the router's link-local, DHCPv6 on its multicast group.
    let services6 = block(&host, "set services6");
    assert!(services6.contains(&"\"kb-alpha\" . fd60:1::1 . udp . 53".to_string()));
    assert!(services6.contains(&"\"kb-alpha\" . ff02::1:2 . udp . 547".to_string()));
    assert!(
        !services6.iter().any(|l| l.contains("kb-beta")),
        "{services6:?}"
    );
}

#[test]
fn ipv6_rules_render_per_family() {
    let host = render_dual();
    // One profile (1): tcp/80 from any IPv6, tcp/443 from both families, icmp IPv4 only, icmpv6
    // from the prefix, everything from one peer of each family.
    assert_eq!(
        block(&host, "set in4")[1..],
        ["0x00000001 . 0.0.0.0/0 . tcp . 443"]
    );
    assert_eq!(
        block(&host, "set in6")[1..],
        [
            "0x00000001 . ::/0 . tcp . 443",
            "0x00000001 . ::/0 . tcp . 80"
        ]
    );
    assert_eq!(
        block(&host, "set in4_proto")[1..],
        ["0x00000001 . 0.0.0.0/0 . icmp"]
    );
    assert_eq!(
        block(&host, "set in6_proto")[1..],
        ["0x00000001 . fd60:1::/64 . ipv6-icmp"]
    );
    assert_eq!(block(&host, "set in4_all")[1..], ["0x00000001 . 10.0.0.11"]);
    assert_eq!(
        block(&host, "set in6_all")[1..],
        ["0x00000001 . fd60:1::ff:fe00:2"]
    );
    assert_eq!(
        block(&host, "set out4_all")[1..],
        ["0x00010000 . 0.0.0.0/0"]
    );
    assert_eq!(block(&host, "set out6_all")[1..], ["0x00010000 . ::/0"]);
    assert!(block(&host, "chain sg_in").contains(
        &"meta mark & 0x0000ffff . ip6 saddr . meta l4proto . th dport @in6 return".to_string()
    ));
    let vm_filter = block(&host, "chain vm_filter");
    let nd = vm_filter
        .iter()
        .position(|l| l.contains("nd-neighbor-solicit"));
    let invalid = vm_filter.iter().position(|l| l == "ct state invalid drop");
    assert!(nd.is_some() && nd < invalid, "{vm_filter:?}");
    assert!(vm_filter
        .iter()
        .any(|l| l.contains("udp sport 547 udp dport 546 accept")));
}

#[test]
fn ipv4_only_networks_render_no_ipv6_sources() {
    let (mut nets, groups) = dual();
    nets.remove(0);
    let (host, _) = render_for_test(&nets, &groups, None).unwrap();
    assert_eq!(block(&host, "set taps6"), ["type ifname"]);
    assert_eq!(block(&host, "set tap_ip6"), ["type ifname . ipv6_addr"]);
    assert_eq!(
        block(&host, "set services6"),
        ["type ifname . ipv6_addr . inet_proto . inet_service"]
    );
}

#[test]
fn bad_ipv6_input_is_refused() {
    let (nets, groups) = dual();
    for bad in [
        rule("all", None, None, &["fd60::/129"]),
        rule("icmpv6", Some(1), None, &["::/0"]),
        rule("gre", None, None, &["::/0"]),
    ] {
        let mut g = groups.clone();
        g[0].ingress.push(bad.clone());
        let e = render_for_test(&nets, &g, None).unwrap_err().to_string();
        assert!(e.contains("sg-v6 ingress rule 6"), "{bad:?}: {e}");
    }
    let mut n = nets.clone();
    n[0].0.ipv6_cidr = Some("fd60:1::/56".into());
    let e = render_for_test(&n, &groups, None).unwrap_err().to_string();
    assert!(e.contains("ipv6_cidr"), "{e}");
}

#[test]
fn nft_accepts_the_dual_stack_ruleset() {
    if !is_root() {
        return;
    }
    let ns = format!("kfw-check6-{}", std::process::id());
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
    let file = dir.path().join("host");
    let text = render_dual();
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "-c", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft rejected the dual-stack ruleset: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}
