//! The network policy of one host, computed from the store each time its agent asks: the networks of the
//! VMs placed there (with the other hosts carrying them, for VXLAN), each port's security groups and
//! elastic IP, the groups' rules with group references resolved to member addresses, the public network,
//! and every VM's metadata. Agents render it whole (principle: rendered from the store, never patched).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kumo_types::agent::{
    GroupPolicy, Isolation, NetworkInfo, NetworkPolicy, PortPolicy, PublicNetwork, RulePolicy,
    VmMetadata,
};
use kumo_types::InstanceState;

use crate::{Controller, OpError};

fn isolation(net: &kumo_store::NetworkRow) -> Isolation {
    match (net.isolation.as_str(), net.vni, net.vlan_tag) {
        ("vlan", _, Some(tag)) => Isolation::Vlan {
            tag: u16::try_from(tag).unwrap_or(0),
        },
        (_, Some(vni), _) => Isolation::Vxlan {
            vni: u32::try_from(vni).unwrap_or(0),
        },
        _ => Isolation::Local,
    }
}

/// A rule as the agent renders it; `None` when the rule can never match (a group without members).
fn rule_policy(
    r: &kumo_store::SgRuleRow,
    members: &HashMap<String, Vec<String>>,
) -> Option<RulePolicy> {
    let sources = match (&r.cidr, &r.source_group_id) {
        (Some(c), _) => vec![c.clone()],
        (None, Some(g)) => members
            .get(g)
            .map(|ips| {
                ips.iter()
                    .map(|ip| {
                        // Dual-stack members come with their SLAAC address too.
                        let host = if ip.contains(':') { 128 } else { 32 };
                        format!("{ip}/{host}")
                    })
                    .collect()
            })
            .unwrap_or_default(),
        (None, None) => vec![],
    };
    if sources.is_empty() {
        return None;
    }
    let port = |p: Option<i64>| p.and_then(|v| u16::try_from(v).ok());
    Some(RulePolicy {
        protocol: r.protocol.clone(),
        from_port: port(r.from_port),
        to_port: port(r.to_port),
        sources,
    })
}

impl Controller {
    pub async fn network_policy(&self, host_id: &str) -> Result<NetworkPolicy, OpError> {
        let rows: Vec<_> = self
            .store
            .instances_on_host(host_id)
            .await?
            .into_iter()
            .filter(|r| r.state != InstanceState::Terminated)
            .collect();
        // Instances migrating here get their ports before the switch, but not their elastic IPs:
        // those stay with the host that runs the instance until the switch.
        let mut rows = rows;
        for mut r in self.store.instances_arriving(host_id).await? {
            r.public_ip = None;
            rows.push(r);
        }

        // Networks and their other hosts' tunnel addresses.
        let net_ids: Vec<String> = rows
            .iter()
            .map(|r| r.network_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut networks = Vec::new();
        let mut tunnels: HashMap<String, String> = HashMap::new();
        for net in self.store.networks_by_ids(&net_ids).await? {
            let mut peers = BTreeSet::new();
            for h in self.store.network_hosts(&net.id).await? {
                if h == host_id {
                    continue;
                }
                if !tunnels.contains_key(&h) {
                    let t = self
                        .store
                        .host(&h)
                        .await
                        .map(|r| r.tunnel_ip)
                        .unwrap_or_default();
                    tunnels.insert(h.clone(), t);
                }
                if let Some(t) = tunnels.get(&h).filter(|t| !t.is_empty()) {
                    peers.insert(t.clone());
                }
            }
            networks.push(NetworkInfo {
                isolation: isolation(&net),
                mtu: net.mtu.and_then(|m| u32::try_from(m).ok()),
                id: net.id,
                name: net.name,
                project_id: net.project_id,
                cidr: net.cidr,
                gateway: net.gateway,
                ipv6_cidr: net.ipv6_cidr,
                peers: peers.into_iter().collect(),
            });
        }

        // Security groups of the ports, their rules, and the members of groups the rules name.
        // The rows carry their groups in order and their elastic IP.
        let group_ids: Vec<String> = rows
            .iter()
            .flat_map(|r| r.security_group_ids.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let rules = self.store.security_group_rules(&group_ids).await?;
        let referenced: Vec<String> = rules
            .iter()
            .filter_map(|r| r.source_group_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut members: HashMap<String, Vec<String>> = HashMap::new();
        for (g, ip) in self.store.group_member_ips(&referenced).await? {
            members.entry(g).or_default().push(ip);
        }
        let mut groups: BTreeMap<String, GroupPolicy> = group_ids
            .iter()
            .map(|g| {
                (
                    g.clone(),
                    GroupPolicy {
                        id: g.clone(),
                        ingress: vec![],
                        egress: vec![],
                    },
                )
            })
            .collect();
        for r in &rules {
            let (Some(g), Some(rule)) = (groups.get_mut(&r.group_id), rule_policy(r, &members))
            else {
                continue;
            };
            if r.direction == "egress" {
                g.egress.push(rule);
            } else {
                g.ingress.push(rule);
            }
        }
        let names: HashMap<String, String> = self
            .store
            .security_group_names(&group_ids)
            .await?
            .into_iter()
            .collect();

        let public = self.store.address_pool().await?.map(|p| PublicNetwork {
            cidr: p.cidr,
            gateway: p.gateway,
        });

        // Every port here is on this host: its site is the availability zone.
        let site = self.store.host(host_id).await?.site;
        let mut ports = Vec::with_capacity(rows.len());
        for r in &rows {
            let groups = r.security_group_ids.clone();
            let public_ip = r.public_ip.clone();
            let metadata = VmMetadata {
                instance_id: r.id.clone(),
                hostname: r.name.clone(),
                local_ipv4: r.private_ip.clone(),
                public_ipv4: public_ip.clone(),
                mac: r.mac.clone(),
                availability_zone: site.clone(),
                instance_type: r.instance_type.clone(),
                ami_id: r.image_id.clone(),
                reservation_id: r.reservation_id.clone().unwrap_or_default(),
                security_groups: groups
                    .iter()
                    .map(|g| names.get(g).cloned().unwrap_or_else(|| g.clone()))
                    .collect(),
                public_keys: self.store.instance_public_keys(&r.id).await?,
                user_data: r.user_data.clone(),
            };
            ports.push(PortPolicy {
                instance_id: r.id.clone(),
                network_id: r.network_id.clone(),
                mac: r.mac.clone(),
                ip: r.private_ip.clone(),
                groups,
                public_ip,
                metadata,
            });
        }
        Ok(NetworkPolicy {
            networks,
            ports,
            groups: groups.into_values().collect(),
            public,
        })
    }
}
