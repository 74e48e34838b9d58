//! Bridges and taps: read the host's links (`ip -j -d addr show`) and plan one `ip -batch` that makes them match.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::error::NetworkError;
use crate::ledger::Ledger;
use crate::names::mac_for;
use crate::spec::{Isolation, Network};

/// One interface as printed by `ip -j -d addr show`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Link {
    pub ifname: String,
    #[serde(default)]
    pub flags: Vec<String>,
    pub mtu: Option<u32>,
    pub master: Option<String>,
    /// The lower device of a VLAN (`ip -j` prints it as "link").
    pub link: Option<String>,
    pub address: Option<String>,
    pub linkinfo: Option<LinkInfo>,
    #[serde(default)]
    pub addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct LinkInfo {
    pub info_kind: Option<String>,
    pub info_data: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AddrInfo {
    pub family: Option<String>,
    pub local: Option<String>,
    pub prefixlen: Option<u8>,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }

    /// "bridge", "tap", "tun", "veth", … or "device" when the kernel gives no kind.
    pub fn kind(&self) -> String {
        let Some(info) = &self.linkinfo else {
            return "device".into();
        };
        match info.info_kind.as_deref() {
            Some("tun") => info
                .info_data
                .as_ref()
                .and_then(|d| d.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("tap")
                .to_string(),
            Some(kind) => kind.to_string(),
            None => "device".into(),
        }
    }

    pub(crate) fn ipv4_addrs(&self) -> Vec<(Ipv4Addr, u8)> {
        self.addr_info
            .iter()
            .filter(|a| a.family.as_deref() == Some("inet"))
            .filter_map(|a| Some((a.local.as_deref()?.parse().ok()?, a.prefixlen?)))
            .collect()
    }
}

pub(crate) fn parse_links(command: &str, json: &str) -> Result<Vec<Link>, NetworkError> {
    serde_json::from_str(json).map_err(|source| NetworkError::Parse {
        command: command.to_string(),
        source,
    })
}

/// The fixed MAC of a bridge: without one, a Linux bridge takes the lowest MAC of its ports and the
/// gateway's MAC changes whenever a VM comes or goes (guests' ARP caches then point at nothing).
pub(crate) fn bridge_mac(bridge: &str) -> String {
    mac_for(&format!("kumo-bridge:{bridge}"))
}

/// What one apply must do to the links.
#[derive(Debug, Default)]
pub(crate) struct LinkPlan {
    /// Lines for `ip -batch -`, in order.
    pub batch: Vec<String>,
    /// Human-readable changes.
    pub repairs: Vec<String>,
    /// Bridges (re-)created by this plan: their dnsmasq must be restarted (its DHCP socket is bound to the
    /// old interface index).
    pub created_bridges: BTreeSet<String>,
    /// Router and public veths (host ends) created by this plan: their namespace ends are new too.
    pub created_veths: BTreeSet<String>,
    /// (router namespace, interface) to delete before the batch: the inside end of a veth about to be
    /// re-created, possibly left behind when its host end went first.
    pub stale_router_ends: Vec<(String, String)>,
}

/// Host facts the links depend on besides the desired networks.
#[derive(Debug, Default, Clone)]
pub(crate) struct Wiring {
    /// This host's VXLAN source address; without one, VXLAN networks stay host-local.
    pub tunnel: Option<Ipv4Addr>,
    /// The 802.1Q trunk for VLAN networks.
    pub trunk: Option<String>,
    /// The bridge on the public network, for router namespaces' public veths.
    pub public_bridge: Option<String>,
    /// Network name → its router namespace.
    pub routers: HashMap<String, String>,
    /// Router namespaces created just now: their veths are new whatever the host side shows (a
    /// namespace deleted by hand can linger, with its end of the old veth, while a process holds it).
    pub fresh_routers: BTreeSet<String>,
}

impl Wiring {
    /// The uplink device a network wants here, with the `ip link add` arguments after its name.
    pub fn uplink(&self, net: &Network) -> Option<(String, String)> {
        let name = net.uplink()?;
        let mtu = net.mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        match net.isolation {
            Isolation::Local => None,
            Isolation::Vxlan { vni } => {
                let local = self.tunnel?;
                Some((
                    name,
                    format!("{mtu} type vxlan id {vni} local {local} dstport 4789"),
                ))
            }
            Isolation::Vlan { tag } => {
                let trunk = self.trunk.as_deref()?;
                Some((name, format!(" link {trunk}{mtu} type vlan id {tag}")))
            }
        }
    }
}

/// Whether an existing uplink matches what `uplink` would create.
fn uplink_matches(link: &Link, net: &Network, wiring: &Wiring) -> bool {
    let data = link.linkinfo.as_ref().and_then(|i| i.info_data.as_ref());
    let field = |k: &str| data.and_then(|d| d.get(k)).cloned();
    match net.isolation {
        Isolation::Local => false,
        Isolation::Vxlan { vni } => {
            link.kind() == "vxlan"
                && field("id").and_then(|v| v.as_u64()) == Some(u64::from(vni))
                && field("local").and_then(|v| v.as_str().map(str::to_string))
                    == wiring.tunnel.map(|t| t.to_string())
        }
        Isolation::Vlan { tag } => {
            link.kind() == "vlan"
                && field("id").and_then(|v| v.as_u64()) == Some(u64::from(tag))
                && link.link.as_deref() == wiring.trunk.as_deref()
        }
    }
}

/// Computes the `ip` commands that make `links` match `desired`. Links named in `owned` (created by kumo
/// earlier) and not desired are deleted; links kumo does not own are never touched unless desired.
pub(crate) fn plan(
    links: &[Link],
    desired: &[Network],
    owned: &Ledger,
    manage_lo: bool,
    wiring: &Wiring,
) -> Result<LinkPlan, NetworkError> {
    let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.ifname.as_str(), l)).collect();
    let mut plan = LinkPlan::default();
    let desired_bridges: BTreeSet<&str> = desired.iter().map(|n| n.bridge.as_str()).collect();
    let desired_taps: BTreeSet<&str> = desired
        .iter()
        .flat_map(|n| n.ports.iter().map(|p| p.tap.as_str()))
        .collect();

    if manage_lo {
        if let Some(lo) = by_name.get("lo") {
            if !lo.is_up() {
                plan.batch.push("link set lo up".into());
                plan.repairs.push("brought lo up".into());
            }
        }
    }

    // 1. Remove what kumo created and no longer wants.
    for tap in &owned.taps {
        if !desired_taps.contains(tap.as_str()) && by_name.contains_key(tap.as_str()) {
            plan.batch.push(format!("link del dev {tap}"));
            plan.repairs.push(format!("removed tap {tap}"));
        }
    }
    let desired_ports: BTreeSet<String> = desired
        .iter()
        .flat_map(|n| [n.uplink(), Some(n.router_port()), Some(n.public_port())])
        .flatten()
        .collect();
    for port in &owned.ports {
        if !desired_ports.contains(port) && by_name.contains_key(port.as_str()) {
            plan.batch.push(format!("link del dev {port}"));
            plan.repairs.push(format!("removed {port}"));
        }
    }
    for bridge in &owned.bridges {
        if !desired_bridges.contains(bridge.as_str()) && by_name.contains_key(bridge.as_str()) {
            plan.batch.push(format!("link del dev {bridge}"));
            plan.repairs.push(format!("removed bridge {bridge}"));
        }
    }

    // 2. Bridges.
    for net in desired {
        let br = &net.bridge;
        let mac = bridge_mac(br);
        let mtu = net.mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        let existing = match by_name.get(br.as_str()) {
            Some(link) if link.kind() != "bridge" => {
                if !owned.bridges.contains(br) && !owned.taps.contains(br) {
                    return Err(NetworkError::Conflict {
                        name: br.clone(),
                        found: link.kind(),
                        expected: "bridge",
                    });
                }
                plan.batch.push(format!("link del dev {br}"));
                None
            }
            other => other.copied(),
        };
        match existing {
            None => {
                plan.batch
                    .push(format!("link add name {br} address {mac}{mtu} type bridge"));
                plan.batch.push(format!("link set dev {br} up"));
                plan.created_bridges.insert(br.clone());
                let verb = if owned.bridges.contains(br) {
                    "re-created"
                } else {
                    "created"
                };
                plan.repairs
                    .push(format!("{verb} bridge {br} for network {}", net.name));
            }
            Some(link) => {
                if let Some(want) = net.mtu {
                    if link.mtu != Some(want) {
                        plan.batch.push(format!("link set dev {br} mtu {want}"));
                        plan.repairs.push(format!("set mtu {want} on bridge {br}"));
                    }
                }
                if link.address.as_deref().map(str::to_ascii_lowercase) != Some(mac.clone()) {
                    plan.batch.push(format!("link set dev {br} address {mac}"));
                    plan.repairs.push(format!("reset MAC of bridge {br}"));
                }
                // The bridge is pure L2: the gateway lives in the network's router namespace.
                for (addr, prefix) in link.ipv4_addrs() {
                    plan.batch
                        .push(format!("address del {addr}/{prefix} dev {br}"));
                    plan.repairs
                        .push(format!("removed stray address {addr}/{prefix} from {br}"));
                }
                if !link.is_up() {
                    plan.batch.push(format!("link set dev {br} up"));
                    plan.repairs.push(format!("brought bridge {br} up"));
                }
            }
        }
    }

    // 3. Taps.
    for net in desired {
        let br = &net.bridge;
        let bridge_created = plan.created_bridges.contains(br);
        for port in &net.ports {
            let tap = &port.tap;
            let mtu = net.mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
            let existing = match by_name.get(tap.as_str()) {
                Some(link) if link.kind() != "tap" => {
                    if !owned.taps.contains(tap) && !owned.bridges.contains(tap) {
                        return Err(NetworkError::Conflict {
                            name: tap.clone(),
                            found: link.kind(),
                            expected: "tap",
                        });
                    }
                    plan.batch.push(format!("link del dev {tap}"));
                    None
                }
                other => other.copied(),
            };
            match existing {
                None => {
                    plan.batch.push(format!("tuntap add dev {tap} mode tap"));
                    plan.batch
                        .push(format!("link set dev {tap}{mtu} master {br} up"));
                    let verb = if owned.taps.contains(tap) {
                        "re-created"
                    } else {
                        "created"
                    };
                    plan.repairs.push(format!("{verb} tap {tap} on {br}"));
                }
                Some(link) => {
                    if let Some(want) = net.mtu {
                        if link.mtu != Some(want) {
                            plan.batch.push(format!("link set dev {tap} mtu {want}"));
                            plan.repairs.push(format!("set mtu {want} on tap {tap}"));
                        }
                    }
                    if bridge_created || link.master.as_deref() != Some(br.as_str()) {
                        plan.batch.push(format!("link set dev {tap} master {br}"));
                        if !bridge_created {
                            plan.repairs.push(format!("attached tap {tap} to {br}"));
                        }
                    }
                    if !link.is_up() {
                        plan.batch.push(format!("link set dev {tap} up"));
                        plan.repairs.push(format!("brought tap {tap} up"));
                    }
                }
            }
        }
    }

    // 4. Uplinks (VXLAN/VLAN), router veths and public veths.
    for net in desired {
        let br = &net.bridge;
        let bridge_created = plan.created_bridges.contains(br);
        let mtu = net.mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        if let Some((name, args)) = wiring.uplink(net) {
            let ok = by_name
                .get(name.as_str())
                .filter(|l| uplink_matches(l, net, wiring));
            match ok {
                Some(link) => {
                    if bridge_created || link.master.as_deref() != Some(br.as_str()) {
                        plan.batch.push(format!("link set dev {name} master {br}"));
                    }
                    if !link.is_up() {
                        plan.batch.push(format!("link set dev {name} up"));
                        plan.repairs.push(format!("brought {name} up"));
                    }
                }
                None => {
                    if by_name.contains_key(name.as_str()) {
                        if !owned.ports.contains(&name) {
                            let found = by_name
                                .get(name.as_str())
                                .map(|l| l.kind())
                                .unwrap_or_default();
                            return Err(NetworkError::Conflict {
                                name,
                                found,
                                expected: "uplink",
                            });
                        }
                        plan.batch.push(format!("link del dev {name}"));
                    }
                    plan.batch.push(format!("link add {name}{args}"));
                    plan.batch
                        .push(format!("link set dev {name} master {br} up"));
                    plan.repairs
                        .push(format!("created {name} for network {}", net.name));
                }
            }
        }
        let Some(router) = wiring.routers.get(&net.name) else {
            continue;
        };
        let mut veths = vec![(net.router_port(), crate::spec::ROUTER_INSIDE, br.clone())];
        if let Some(public) = &wiring.public_bridge {
            veths.push((
                net.public_port(),
                crate::spec::ROUTER_OUTSIDE,
                public.clone(),
            ));
        }
        let fresh = wiring.fresh_routers.contains(router);
        for (port, inside, master) in veths {
            match by_name.get(port.as_str()) {
                Some(link) if link.kind() == "veth" && !fresh => {
                    let rebridged = master == *br && bridge_created;
                    if rebridged || link.master.as_deref() != Some(master.as_str()) {
                        plan.batch
                            .push(format!("link set dev {port} master {master}"));
                    }
                    if !link.is_up() {
                        plan.batch.push(format!("link set dev {port} up"));
                        plan.repairs.push(format!("brought {port} up"));
                    }
                }
                other => {
                    if let Some(link) = other {
                        if !owned.ports.contains(&port) {
                            return Err(NetworkError::Conflict {
                                name: port,
                                found: link.kind(),
                                expected: "veth",
                            });
                        }
                        plan.batch.push(format!("link del dev {port}"));
                    }
                    if !fresh {
                        plan.stale_router_ends
                            .push((router.clone(), inside.to_string()));
                    }
                    plan.batch.push(format!(
                        "link add {port}{mtu} type veth peer name {inside} netns {router}"
                    ));
                    plan.batch
                        .push(format!("link set dev {port} master {master} up"));
                    plan.created_veths.insert(port.clone());
                    let verb = if owned.ports.contains(&port) {
                        "re-created"
                    } else {
                        "created"
                    };
                    plan.repairs
                        .push(format!("{verb} {port} to router {router}"));
                }
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{validate, NetworkSpec, PortSpec};

    const SAMPLE: &str = r#"[
 {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
 {"ifindex":5,"ifname":"kb-default","flags":["BROADCAST","MULTICAST","UP"],"mtu":1500,"address":"MAC","linkinfo":{"info_kind":"bridge","info_data":{"stp_state":0}},"addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64}]},
 {"ifindex":6,"ifname":"kt-a","flags":["NO-CARRIER","BROADCAST","MULTICAST","UP"],"mtu":1500,"master":"kb-default","address":"aa:bb:cc:dd:ee:01","linkinfo":{"info_kind":"tun","info_data":{"type":"tap"}},"addr_info":[]},
 {"ifindex":7,"ifname":"kt-old","flags":["BROADCAST","MULTICAST"],"mtu":1500,"master":"kb-default","linkinfo":{"info_kind":"tun","info_data":{"type":"tap"}},"addr_info":[]},
 {"ifindex":8,"ifname":"veth0","flags":["UP"],"mtu":1500,"master":"kb-default","linkinfo":{"info_kind":"veth"},"addr_info":[]}
]"#;

    fn desired(taps: &[&str]) -> Vec<Network> {
        let ports = taps
            .iter()
            .enumerate()
            .map(|(i, t)| PortSpec {
                tap: (*t).into(),
                mac: format!("02:00:00:00:00:{:02x}", i + 1),
                ip: format!("10.77.0.{}", i + 10),
                hostname: format!("vm{i}"),
                groups: vec![],
                public_ip: None,
            })
            .collect();
        validate(&[(
            NetworkSpec {
                name: "default".into(),
                bridge: "kb-default".into(),
                cidr: "10.77.0.0/24".into(),
                gateway: "10.77.0.1".into(),
                mtu: None,
                isolation: crate::Isolation::Local,
                peers: vec![],
                ipv6_cidr: None,
            },
            ports,
        )])
        .unwrap()
    }

    fn sample() -> Vec<Link> {
        parse_links("test", &SAMPLE.replace("MAC", &bridge_mac("kb-default"))).unwrap()
    }

    #[test]
    fn converged_host_needs_nothing() {
        let owned = Ledger::default();
        let mut links = sample();
        links.retain(|l| l.ifname != "kt-old");
        let plan = plan(
            &links,
            &desired(&["kt-a"]),
            &owned,
            true,
            &Wiring::default(),
        )
        .unwrap();
        assert!(plan.batch.is_empty(), "{:?}", plan.batch);
        assert!(plan.repairs.is_empty());
    }

    #[test]
    fn removes_only_owned_links_and_creates_missing_ones() {
        let mut owned = Ledger::default();
        owned.taps.insert("kt-old".into());
        owned.bridges.insert("kb-default".into());
        let plan = plan(
            &sample(),
            &desired(&["kt-a", "kt-b"]),
            &owned,
            true,
            &Wiring::default(),
        )
        .unwrap();
        assert_eq!(
            plan.batch,
            vec![
                "link del dev kt-old",
                "tuntap add dev kt-b mode tap",
                "link set dev kt-b master kb-default up",
            ]
        );
        assert!(!plan.batch.iter().any(|l| l.contains("veth0")));
    }

    #[test]
    fn recreates_missing_bridge_and_reattaches_taps() {
        let mut owned = Ledger::default();
        owned.bridges.insert("kb-default".into());
        owned.taps.insert("kt-a".into());
        let mut links = sample();
        links.retain(|l| l.ifname != "kb-default" && l.ifname != "kt-old");
        links[1].master = None;
        let plan = plan(
            &links,
            &desired(&["kt-a"]),
            &owned,
            true,
            &Wiring::default(),
        )
        .unwrap();
        assert!(plan.created_bridges.contains("kb-default"));
        assert!(plan
            .batch
            .contains(&"link set dev kt-a master kb-default".to_string()));
        assert_eq!(
            plan.repairs,
            vec!["re-created bridge kb-default for network default"]
        );
    }

    #[test]
    fn refuses_to_replace_foreign_interface() {
        let links = sample();
        let err = plan(
            &links,
            &desired(&["veth0"]),
            &Ledger::default(),
            true,
            &Wiring::default(),
        )
        .unwrap_err();
        assert!(matches!(err, NetworkError::Conflict { .. }));
    }
}
