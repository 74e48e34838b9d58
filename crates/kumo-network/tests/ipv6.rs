//! Dual-stack networks with real traffic (root): the router namespace made by [`HostNetwork::apply`]
//! advertises the network's /64 (dnsmasq RA), two guest namespaces configure their SLAAC addresses from
//! it, and the host firewall rendered for their ports lets IPv6 through only as the security groups say,
//! drops a spoofed IPv6 source and drops router advertisements sent by a guest.
//!
//! Guests are veths (a tap carries nothing without QEMU), so the host firewall is rendered for the
//! guests' veths with [`kumo_network::render_for_test`] and loaded with `nft -f`, as tests/firewall.rs
//! does; everything else is what `apply` made.

mod common;

use std::net::Ipv6Addr;
use std::time::Duration;

use common::*;
use kumo_network::{GroupPolicy, HostNetwork, HostOptions, PortSpec, RulePolicy};

const PREFIX: &str = "fd60:60::/64";

fn slaac(mac: &str) -> Ipv6Addr {
    let p: Ipv6Addr = "fd60:60::".parse().unwrap();
    kumo_types::ipv6::eui64(p, mac).unwrap()
}

fn group(ingress: Vec<RulePolicy>) -> Vec<GroupPolicy> {
    vec![GroupPolicy {
        id: "sg-a".into(),
        ingress,
        egress: vec![RulePolicy {
            protocol: "all".into(),
            from_port: None,
            to_port: None,
            sources: vec!["0.0.0.0/0".into(), "::/0".into()],
        }],
    }]
}

/// Global IPv6 addresses of the guest's vg0.
fn global_v6(ns: &str) -> Vec<Ipv6Addr> {
    let text = sh(&[
        "ip", "-n", ns, "-6", "-o", "addr", "show", "dev", "vg0", "scope", "global",
    ]);
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet6")?;
            w.get(i + 1)?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Loads the host firewall rendered for the guests' veths (standing in for their taps).
fn load_firewall(
    guard: &Guard,
    host: &str,
    net: &kumo_network::NetworkSpec,
    ports: &[PortSpec],
    groups: &[GroupPolicy],
) {
    let (text, _) =
        kumo_network::render_for_test(&[(net.clone(), ports.to_vec())], groups, None).unwrap();
    let file = guard.dir().join("host.nft");
    std::fs::write(&file, &text).unwrap();
    sh(&[
        "ip",
        "netns",
        "exec",
        host,
        "nft",
        "-f",
        file.to_str().unwrap(),
    ]);
}

/// A router advertisement for fd66:66::/64 (SLAAC allowed), sent from `ns` out of `dev` to all nodes.
fn send_ra(ns: &str, dev: &str) {
    let script = format!(
        r#"
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"{dev}")
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 0, 0, 0)
pio = struct.pack("!BBBBIII", 3, 4, 64, 0xc0, 3600, 3600, 0) + socket.inet_pton(socket.AF_INET6, "fd66:66::")
idx = socket.if_nametoindex("{dev}")
for _ in range(3):
    s.sendto(ra + pio, ("ff02::1", 0, 0, idx))
"#
    );
    let (ok, _, err) = run_in(ns, 10, &["python3", "-c", &script]);
    assert!(ok, "sending an RA from {ns} failed: {err}");
}

fn has_prefix(addrs: &[Ipv6Addr], prefix: u16) -> bool {
    addrs.iter().any(|a| a.segments()[0] == prefix)
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_slaac_security_groups_and_ra_guard() {
    if !is_root() {
        return;
    }
    let mut g = Guard::new();
    let host = g.ns("k6h");
    let router_prefix = g.router_prefix();
    let hn = HostNetwork::new(
        Some(host.clone()),
        g.state("host"),
        HostOptions {
            router_prefix,
            ..HostOptions::default()
        },
    )
    .await
    .unwrap();
    let mut net = network("v6", "kb-v6", 60);
    net.ipv6_cidr = Some(PREFIX.into());
    let mut ports = vec![port("i-v6one", 60, 10), port("i-v6two", 60, 11)];
    for p in &mut ports {
        p.groups = vec!["sg-a".into()];
    }
    let mut d = desired(&[(&net, &ports)]);
    d.groups = group(vec![]);
    hn.apply(&d).await.unwrap();

    // The router holds the IPv6 gateway; dnsmasq was started with RA on.
    let router = hn.router_netns(&net);
    let int0 = sh(&["ip", "-n", &router, "-6", "addr", "show", "dev", "int0"]);
    assert!(int0.contains("fd60:60::1/64"), "{int0}");

    // Guests on veths standing in for the taps; the firewall rendered for them.
    let vm1 = g.ns("k6v1");
    let vm2 = g.ns("k6v2");
    plug_guest(Some(&host), &vm1, "kb-v6", &ports[0].mac, "kv6-1", None);
    plug_guest(Some(&host), &vm2, "kb-v6", &ports[1].mac, "kv6-2", None);
    let mut fw_ports = ports.clone();
    fw_ports[0].tap = "kv6-1".into();
    fw_ports[1].tap = "kv6-2".into();
    load_firewall(&g, &host, &net, &fw_ports, &group(vec![]));

    // 1. SLAAC from the router's advertisements: the EUI-64 of each guest's MAC.
    let (a1, a2) = (slaac(&ports[0].mac), slaac(&ports[1].mac));
    for (vm, want) in [(&vm1, a1), (&vm2, a2)] {
        let got = retry(Duration::from_secs(30), || {
            let addrs = global_v6(vm);
            addrs.contains(&want).then_some(addrs)
        });
        assert!(
            got.is_some(),
            "{vm} got no SLAAC address {want}: {:?}",
            global_v6(vm)
        );
    }

    // 2. Security groups: no ingress rule, no IPv6 HTTP; a rule from the network's prefix lets it in.
    g.serve_http(&vm2, "80", "hello6\n");
    let url = format!("http://[{a2}]/");
    // The server listens once IPv4-mapped or v6 sockets show up; wait for it through the allowed path.
    load_firewall(
        &g,
        &host,
        &net,
        &fw_ports,
        &group(vec![RulePolicy {
            protocol: "tcp".into(),
            from_port: Some(80),
            to_port: Some(80),
            sources: vec![PREFIX.into()],
        }]),
    );
    let got = retry(Duration::from_secs(15), || http_get(&vm1, &url));
    assert_eq!(
        got.as_deref(),
        Some("hello6\n"),
        "allowed by a rule from {PREFIX}"
    );
    load_firewall(&g, &host, &net, &fw_ports, &group(vec![]));
    assert_eq!(http_get(&vm1, &url), None, "no rule: dropped");
    // An IPv4-only rule does not open IPv6.
    load_firewall(
        &g,
        &host,
        &net,
        &fw_ports,
        &group(vec![RulePolicy {
            protocol: "tcp".into(),
            from_port: Some(80),
            to_port: Some(80),
            sources: vec!["0.0.0.0/0".into()],
        }]),
    );
    assert_eq!(http_get(&vm1, &url), None, "IPv4 rule: IPv6 still dropped");
    load_firewall(
        &g,
        &host,
        &net,
        &fw_ports,
        &group(vec![RulePolicy {
            protocol: "tcp".into(),
            from_port: Some(80),
            to_port: Some(80),
            sources: vec!["::/0".into()],
        }]),
    );
    assert_eq!(http_get(&vm1, &url).as_deref(), Some("hello6\n"), "::/0");

    // 3. Anti-spoofing: vm1 sending from an address that is not its own is dropped.
    sh(&[
        "ip",
        "netns",
        "exec",
        &vm1,
        "sysctl",
        "-qw",
        "net.ipv6.conf.vg0.accept_ra=0",
    ]);
    let own = format!("{a1}/64");
    sh(&["ip", "-n", &vm1, "addr", "del", &own, "dev", "vg0"]);
    sh(&[
        "ip",
        "-n",
        &vm1,
        "addr",
        "add",
        "fd60:60::99/64",
        "dev",
        "vg0",
        "nodad",
    ]);
    assert_eq!(http_get(&vm1, &url), None, "spoofed IPv6 source");
    sh(&[
        "ip",
        "-n",
        &vm1,
        "addr",
        "del",
        "fd60:60::99/64",
        "dev",
        "vg0",
    ]);
    sh(&["ip", "-n", &vm1, "addr", "add", &own, "dev", "vg0", "nodad"]);
    let back = retry(Duration::from_secs(10), || http_get(&vm1, &url));
    assert_eq!(back.as_deref(), Some("hello6\n"), "own address again");

    // 4. RA guard: a guest's router advertisement never reaches the other guest...
    send_ra(&vm1, "vg0");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !has_prefix(&global_v6(&vm2), 0xfd66),
        "{:?}",
        global_v6(&vm2)
    );
    // ...while the same advertisement from the router port does (the tool works).
    send_ra(&router, "int0");
    let learnt = retry(Duration::from_secs(10), || {
        has_prefix(&global_v6(&vm2), 0xfd66).then_some(())
    });
    assert!(
        learnt.is_some(),
        "control RA from the router: {:?}",
        global_v6(&vm2)
    );

    teardown(&hn).await;
}
