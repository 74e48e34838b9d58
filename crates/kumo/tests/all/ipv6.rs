//! Dual-stack tenant networks with real guests (single host): a network with an IPv6 /64, two guests
//! that configure their SLAAC address from the router's advertisements, and guest A fetching guest B's
//! page over IPv6 at the address the API shows for B (the EUI-64 of its MAC).

use std::time::Duration;

use kumo_cli::Client;
use kumo_types::api::CreateInstance;
use kumo_types::networks::CreateNetwork;
use kumo_types::InstanceState;

use crate::common::{Cloud, Hv};
use crate::e2e::{Ws, BOOTED, SLOW};

/// Runs `line` on the guest's serial console; the output up to an end marker computed by the shell
/// (so the echoed command never matches it).
async fn guest_sh(c: &Client, id: &str, line: &str) -> String {
    let mut ws = Ws::connect(c, &format!("/api/v1/instances/{id}/serial"))
        .await
        .expect("serial");
    ws.send_binary(b"\n").await;
    ws.send_binary(format!("{line}; echo END$((6*7))END\n").as_bytes())
        .await;
    let out = ws.read_until("END42END", Duration::from_secs(60)).await;
    ws.close().await;
    assert!(
        out.contains("END42END"),
        "{id}: no end marker after {line:?}: {out}"
    );
    out
}

/// The second line of `http://[addr]/` fetched by guest `from` (the page names its instance id).
async fn fetch6(c: &Client, from: &str, addr: &str) -> String {
    guest_sh(
        c,
        from,
        &format!("echo \"GOT$((1+1))=$(timeout 6 wget -q -O - http://[{addr}]/ 2>/dev/null | sed -n 2p)\""),
    )
    .await
    .lines()
    .find_map(|l| l.trim().strip_prefix("GOT2=").map(str::to_string))
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_guests_reach_each_other_over_ipv6() {
    let cloud = Cloud::start(Hv::Qemu).await;
    cloud.demo_image().await;
    let c = &cloud.client;

    // The network: bad prefixes are refused and change nothing; the prefix is shown.
    let req = |name: &str, cidr: &str, v6: Option<&str>| CreateNetwork {
        name: name.into(),
        cidr: cidr.into(),
        ipv6: true,
        ipv6_cidr: v6.map(str::to_string),
        ..CreateNetwork::default()
    };
    for bad in ["fd60:66::/48", "fd60:66::1/64", "fe80::/64", "10.0.0.0/24"] {
        let e = c
            .create_network(&req("bad", "10.67.0.0/24", Some(bad)))
            .await
            .expect_err(bad);
        assert!(e.to_string().contains("ipv6_cidr"), "{bad}: {e}");
    }
    assert!(
        !c.networks()
            .await
            .expect("list")
            .iter()
            .any(|n| n.name == "bad"),
        "a refused network was not created"
    );
    let net = c
        .create_network(&req("dual", "10.66.0.0/24", Some("fd60:66::/64")))
        .await
        .expect("dual-stack network");
    assert_eq!(net.ipv6_cidr.as_deref(), Some("fd60:66::/64"));
    let dup = c
        .create_network(&req("dual2", "10.68.0.0/24", Some("fd60:66::/64")))
        .await
        .expect_err("same prefix twice");
    assert!(dup.to_string().contains("fd60:66::/64"), "{dup}");
    // `--ipv6` alone: a random unique local /64.
    let ula = c
        .create_network(&req("ula", "10.69.0.0/24", None))
        .await
        .expect("ula network");
    let ula6 = ula.ipv6_cidr.expect("generated prefix");
    assert!(ula6.starts_with("fd") && ula6.ends_with("::/64"), "{ula6}");

    let mut ids = Vec::new();
    for name in ["six-a", "six-b"] {
        let i = c
            .create_instance(
                &CreateInstance {
                    name: name.into(),
                    image: "demo".into(),
                    instance_type: Some("t1.micro".into()),
                    network: Some("dual".into()),
                    ..Default::default()
                },
                None,
            )
            .await
            .expect("create");
        ids.push(i.id);
    }
    let mut insts = Vec::new();
    for id in &ids {
        let i = cloud.wait_state(id, InstanceState::Running, SLOW).await;
        cloud.wait_console(id, &format!("{BOOTED}{id}"), SLOW).await;
        insts.push(i);
    }
    let (a, b) = (&insts[0], &insts[1]);
    let b6 = b.ipv6.clone().expect("B has an IPv6 address");
    let want = kumo_types::ipv6::address_in(Some("fd60:66::/64"), b.mac.as_deref().unwrap_or(""))
        .expect("eui64");
    assert_eq!(b6, want.to_string(), "the API shows B's SLAAC address");

    // The guest configures the same address from the router's advertisement.
    let mut seen = String::new();
    for _ in 0..30 {
        seen = guest_sh(c, &b.id, "ip -6 addr show dev eth0 scope global").await;
        if seen.contains(&b6) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(seen.contains(&b6), "B never configured {b6}: {seen}");

    // A reaches B's HTTP over IPv6 (the default group lets members in, by their IPv6 too).
    let mut got = String::new();
    for _ in 0..10 {
        got = fetch6(c, &a.id, &b6).await;
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(
        got,
        format!("instance-id: {}", b.id),
        "A fetched B's page over IPv6"
    );
}
