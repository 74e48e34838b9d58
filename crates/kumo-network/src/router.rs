//! A network's router namespace: the gateway address (and its fixed MAC) on `int0` (plus `<prefix>::1/64` on
//! a dual-stack network), the metadata address on `lo`, elastic IPs on `ext0` with the public pool's routes. Each network routes in its own namespace, so two
//! projects may use the same CIDR on one host. The veths themselves are made from the host side (links.rs).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::Deserialize;

use crate::cmd;
use crate::error::NetworkError;
use crate::links::{parse_links, Link};
use crate::netns;
use crate::spec::{Network, PublicNetwork, METADATA_IP, ROUTER_INSIDE, ROUTER_OUTSIDE};

/// Creates the namespace (with forwarding on) unless it exists; returns whether it did.
pub(crate) async fn ensure(ip: &Path, ns: &str) -> Result<bool, NetworkError> {
    if netns::exists(ns) {
        return Ok(false);
    }
    netns::create(ip, ns).await?;
    // Set before int0 moves in, which then inherits `default`: without DAD its link-local and gateway
    // addresses are usable at once (dnsmasq binds them when it starts right after).
    let args: Vec<String> = [
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv6.conf.default.accept_dad=0",
    ]
    .map(String::from)
    .to_vec();
    cmd::run(ip, &args, None).await?;
    Ok(true)
}

/// IPv6 addresses of a link outside fe80::/10, with their prefix lengths.
fn global_v6(link: &Link) -> Vec<(Ipv6Addr, u8)> {
    link.addr_info
        .iter()
        .filter(|a| a.family.as_deref() == Some("inet6"))
        .filter_map(|a| Some((a.local.as_deref()?.parse::<Ipv6Addr>().ok()?, a.prefixlen?)))
        .filter(|(a, _)| a.segments()[0] & 0xffc0 != 0xfe80)
        .collect()
}

#[derive(Debug, Deserialize)]
struct Route {
    dst: String,
    gateway: Option<String>,
    dev: Option<String>,
}

fn has_addr(link: &Link, addr: Ipv4Addr, prefix: u8) -> bool {
    link.ipv4_addrs().contains(&(addr, prefix))
}

/// Makes the router namespace `ns` hold exactly the addresses and routes of `net`; returns the repairs.
pub(crate) async fn apply(
    ip: &Path,
    ns: &str,
    net: &Network,
    public: Option<&PublicNetwork>,
) -> Result<Vec<String>, NetworkError> {
    let show: Vec<String> = ["-n", ns, "-j", "-d", "addr", "show"]
        .map(String::from)
        .to_vec();
    let links = parse_links(&cmd::describe(ip, &show), &cmd::run(ip, &show, None).await?)?;
    let find = |name: &str| links.iter().find(|l| l.ifname == name);
    let mut batch = Vec::new();
    let mut repairs = Vec::new();

    if let Some(lo) = find("lo") {
        if !lo.is_up() {
            batch.push("link set lo up".to_string());
        }
        if !has_addr(lo, METADATA_IP, 32) {
            batch.push(format!("address add {METADATA_IP}/32 dev lo"));
            repairs.push(format!("{ns}: added the metadata address"));
        }
    }
    let Some(int) = find(ROUTER_INSIDE) else {
        return Err(NetworkError::Router {
            ns: ns.to_string(),
            detail: format!("no {ROUTER_INSIDE} (its veth to the bridge is missing)"),
        });
    };
    {
        let mac = net.gateway_mac();
        if int.address.as_deref().map(str::to_ascii_lowercase) != Some(mac.clone()) {
            batch.push(format!("link set dev {ROUTER_INSIDE} address {mac}"));
        }
        for (a, p) in int.ipv4_addrs() {
            if (a, p) != (net.gateway, net.prefix) {
                batch.push(format!("address del {a}/{p} dev {ROUTER_INSIDE}"));
                repairs.push(format!("{ns}: removed stray address {a}/{p}"));
            }
        }
        if !has_addr(int, net.gateway, net.prefix) {
            batch.push(format!(
                "address add {}/{} dev {ROUTER_INSIDE}",
                net.gateway, net.prefix
            ));
            repairs.push(format!("{ns}: set gateway {}/{}", net.gateway, net.prefix));
        }
        let want6 = net.gateway6().map(|g| (g, 64u8));
        for (a, p) in global_v6(int) {
            if Some((a, p)) != want6 {
                batch.push(format!("address del {a}/{p} dev {ROUTER_INSIDE}"));
                repairs.push(format!("{ns}: removed stray address {a}/{p}"));
            }
        }
        if let Some((g, p)) = want6.filter(|w| !global_v6(int).contains(w)) {
            // A router namespace made before IPv6 support may lack these; cheap, and only when adding.
            let args: Vec<String> = [
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.accept_dad=0",
            ]
            .map(String::from)
            .to_vec();
            cmd::run(ip, &args, None).await?;
            batch.push(format!("address add {g}/{p} dev {ROUTER_INSIDE} nodad"));
            repairs.push(format!("{ns}: set IPv6 gateway {g}/{p}"));
        }
        if !int.is_up() {
            batch.push(format!("link set dev {ROUTER_INSIDE} up"));
        }
    }
    let mut routes_wanted = Vec::new();
    // Elastic IPs new on this host: the public network's neighbours still send them to the host
    // that had them (a migrated instance's old host) until told otherwise.
    let mut announce: Vec<Ipv4Addr> = Vec::new();
    if let (Some(ext), Some(public)) = (find(ROUTER_OUTSIDE), public) {
        let want: BTreeSet<Ipv4Addr> = net.ports.iter().filter_map(|p| p.public_ip).collect();
        for (a, p) in ext.ipv4_addrs() {
            if p != 32 || !want.contains(&a) {
                batch.push(format!("address del {a}/{p} dev {ROUTER_OUTSIDE}"));
                repairs.push(format!("{ns}: removed elastic IP {a}"));
            }
        }
        for a in &want {
            if !has_addr(ext, *a, 32) {
                batch.push(format!("address add {a}/32 dev {ROUTER_OUTSIDE}"));
                repairs.push(format!("{ns}: added elastic IP {a}"));
                announce.push(*a);
            }
        }
        if !ext.is_up() {
            batch.push(format!("link set dev {ROUTER_OUTSIDE} up"));
        }
        routes_wanted.push((public.cidr.clone(), None));
        routes_wanted.push(("default".to_string(), Some(public.gateway.clone())));
    }
    if !batch.is_empty() {
        run_batch(ip, ns, &batch).await?;
    }
    for a in announce {
        gratuitous_arp(ip, ns, a).await;
    }
    // Routes after addresses and links are up: a route over a down link is refused.
    if !routes_wanted.is_empty() {
        let show: Vec<String> = ["-n", ns, "-j", "route", "show"].map(String::from).to_vec();
        let out = cmd::run(ip, &show, None).await?;
        let routes: Vec<Route> =
            serde_json::from_str(&out).map_err(|source| NetworkError::Parse {
                command: cmd::describe(ip, &show),
                source,
            })?;
        let mut lines = Vec::new();
        for (dst, via) in routes_wanted {
            let present = routes.iter().any(|r| {
                r.dst == dst && r.dev.as_deref() == Some(ROUTER_OUTSIDE) && r.gateway == via
            });
            if !present {
                match &via {
                    Some(gw) => {
                        lines.push(format!("route replace {dst} via {gw} dev {ROUTER_OUTSIDE}"))
                    }
                    None => lines.push(format!("route replace {dst} dev {ROUTER_OUTSIDE}")),
                }
                repairs.push(format!("{ns}: route {dst}"));
            }
        }
        if !lines.is_empty() {
            run_batch(ip, ns, &lines).await?;
        }
    }
    Ok(repairs)
}

/// Deletes an interface of a router namespace if it is there.
pub(crate) async fn remove_link(ip: &Path, ns: &str, ifname: &str) -> Result<(), NetworkError> {
    let show: Vec<String> = ["-n", ns, "-j", "link", "show"].map(String::from).to_vec();
    let out = cmd::run(ip, &show, None).await?;
    let links = parse_links(&cmd::describe(ip, &show), &out)?;
    if links.iter().any(|l| l.ifname == ifname) {
        let del: Vec<String> = ["-n", ns, "link", "del", ifname].map(String::from).to_vec();
        cmd::run(ip, &del, None).await?;
    }
    Ok(())
}

async fn run_batch(ip: &Path, ns: &str, lines: &[String]) -> Result<(), NetworkError> {
    let mut input = lines.join("\n");
    input.push('\n');
    let args: Vec<String> = ["-n", ns, "-batch", "-"].map(String::from).to_vec();
    cmd::run(ip, &args, Some(&input)).await.map(|_| ())
}

/// Tell the public network that `addr` is here now (unsolicited ARP from the router's outside
/// interface). Best effort: without it neighbours find out when their ARP entry goes stale.
async fn gratuitous_arp(ip: &Path, ns: &str, addr: Ipv4Addr) {
    let a = addr.to_string();
    let attempts: [&[&str]; 2] = [
        &[
            "arping",
            "-U",
            "-c",
            "1",
            "-I",
            ROUTER_OUTSIDE,
            "-s",
            &a,
            &a,
        ],
        &[
            "busybox",
            "arping",
            "-U",
            "-c",
            "1",
            "-I",
            ROUTER_OUTSIDE,
            "-s",
            &a,
            &a,
        ],
    ];
    for argv in attempts {
        let mut args: Vec<String> = ["netns", "exec", ns].map(String::from).to_vec();
        args.extend(argv.iter().map(|s| s.to_string()));
        match cmd::run(ip, &args, None).await {
            Ok(_) => return,
            Err(e) => tracing::debug!(%addr, error = %e, "gratuitous ARP attempt failed"),
        }
    }
    tracing::warn!(%addr, ns, "could not announce the elastic IP (no arping or busybox)");
}
