//! The host's tenant networks as the agent renders them: its VMs' NICs plus the controller's network policy
//! (security groups, elastic IPs, VXLAN peers, metadata), applied whole by kumo-network; one metadata
//! listener per network's router namespace; drift found by the periodic re-render reported as repairs.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex as StdMutex};

use kumo_network::{HostDesired, NetworkSpec, PortSpec};
use kumo_types::agent::{Isolation, NetworkPolicy, VmMetadata};

use crate::error::chain;
use crate::metadata::MetadataSource;
use crate::{Agent, AgentError};

/// Bridge name for a network: short and stable.
pub(crate) fn bridge_name(network_id: &str) -> String {
    let tail: String = network_id
        .chars()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("kb-{tail}")
}

/// A network as kumo-network renders it: named by its id (names repeat across projects), with what the
/// policy adds (MTU, isolation, peers) when known.
fn network_spec(
    n: &kumo_types::agent::NetworkDesired,
    info: Option<&kumo_types::agent::NetworkInfo>,
) -> NetworkSpec {
    NetworkSpec {
        name: n.id.clone(),
        bridge: bridge_name(&n.id),
        cidr: n.cidr.clone(),
        gateway: n.gateway.clone(),
        mtu: info.and_then(|i| i.mtu),
        isolation: info.map(|i| i.isolation).unwrap_or(Isolation::Local),
        peers: info.map(|i| i.peers.clone()).unwrap_or_default(),
        ipv6_cidr: info.and_then(|i| i.ipv6_cidr.clone()),
    }
}

/// What the agent knows of the network side, shared with the metadata listeners.
#[derive(Default)]
pub(crate) struct TenantState {
    /// The last policy fetched from the controller.
    pub policy: StdMutex<NetworkPolicy>,
    /// (network id, private ip) → metadata, rebuilt on every render.
    pub metadata: StdMutex<HashMap<(String, Ipv4Addr), VmMetadata>>,
    /// Router namespace → (its inode, the metadata listener's task).
    pub listeners: tokio::sync::Mutex<HashMap<String, (u64, tokio::task::JoinHandle<()>)>>,
    /// The desired state of the last render: a re-render of the same state that changes something
    /// repaired drift.
    pub last: tokio::sync::Mutex<Option<HostDesired>>,
    /// Drift repairs not yet reported to the controller.
    pub unreported: StdMutex<Vec<String>>,
}

fn policy_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("network-policy.json")
}

impl TenantState {
    /// The state at start-up, with the last policy fetched before a restart (if any).
    pub(crate) fn load(data_dir: &std::path::Path) -> Self {
        let policy = std::fs::read(policy_path(data_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            policy: StdMutex::new(policy),
            ..Default::default()
        }
    }
}

/// Looks a VM up by its network and address for the metadata service.
pub(crate) struct Lookup(pub Arc<TenantState>);

impl MetadataSource for Lookup {
    fn lookup(&self, network: &str, ip: Ipv4Addr) -> Option<VmMetadata> {
        let map = self.0.metadata.lock().ok()?;
        map.get(&(network.to_string(), ip)).cloned()
    }
}

impl Agent {
    /// Fetches the network policy of this host from the controller.
    pub(crate) async fn refresh_policy(&self) -> Result<(), AgentError> {
        let url = format!("{}/api/v1/agent/network-policy", self.identity.controller);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(format!(
                "{}:{}",
                self.identity.host_id, self.identity.host_secret
            ))
            .send()
            .await
            .map_err(|e| AgentError::Controller(chain(&e)))?;
        if !resp.status().is_success() {
            return Err(AgentError::Controller(format!(
                "network policy answered {}",
                resp.status()
            )));
        }
        let policy: NetworkPolicy = resp
            .json()
            .await
            .map_err(|e| AgentError::Controller(format!("network policy: {}", chain(&e))))?;
        let changed = match self.tenant.policy.lock() {
            Ok(mut p) if *p != policy => {
                *p = policy.clone();
                true
            }
            _ => false,
        };
        if changed {
            // Kept for the next start: running VMs keep their groups and elastic IPs even if the
            // controller cannot be reached then.
            let path = policy_path(&self.cfg.data_dir);
            let json = serde_json::to_vec(&policy)?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, json)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    }

    /// The desired host networks: every VM's NIC, with what the policy says about its port and network.
    async fn host_desired(&self) -> HostDesired {
        let policy = self
            .tenant
            .policy
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        let ports: HashMap<&str, _> = policy
            .ports
            .iter()
            .map(|p| (p.instance_id.as_str(), p))
            .collect();
        let infos: HashMap<&str, _> = policy.networks.iter().map(|n| (n.id.as_str(), n)).collect();
        let mut nets: BTreeMap<String, (NetworkSpec, Vec<PortSpec>)> = BTreeMap::new();
        let mut metadata = HashMap::new();
        for e in self.vms.map.lock().await.values().filter(|e| !e.deleting) {
            let d = &e.rec.desired;
            let n = &d.nic;
            let info = infos.get(n.network.id.as_str());
            let entry = nets
                .entry(n.network.id.clone())
                .or_insert_with(|| (network_spec(&n.network, info.copied()), vec![]));
            let port = ports.get(d.id.as_str());
            entry.1.push(PortSpec {
                tap: kumo_network::tap_name(&d.id),
                mac: n.mac.clone(),
                ip: n.ip.clone(),
                hostname: d.name.clone(),
                groups: port.map(|p| p.groups.clone()).unwrap_or_default(),
                public_ip: port
                    .and_then(|p| p.public_ip.as_deref())
                    .and_then(|ip| ip.parse().ok()),
            });
            if let (Some(p), Ok(ip)) = (port, n.ip.parse::<Ipv4Addr>()) {
                metadata.insert((n.network.id.clone(), ip), p.metadata.clone());
            }
        }
        if let Ok(mut m) = self.tenant.metadata.lock() {
            *m = metadata;
        }
        HostDesired {
            networks: nets.into_values().collect(),
            groups: policy.groups.clone(),
            public: policy.public.clone(),
        }
    }

    /// Render the host's networks from every VM the agent has; returns the changes made.
    pub(crate) async fn apply_network(&self) -> Result<Vec<String>, AgentError> {
        let Some(net) = &self.net else {
            return Ok(vec![]);
        };
        // Held across computing and applying, so two renders never apply out of order.
        let mut last = self.tenant.last.lock().await;
        let desired = self.host_desired().await;
        let changes = net.apply(&desired).await?;
        if last.as_ref() == Some(&desired) && !changes.is_empty() {
            tracing::warn!(repairs = ?changes, "repaired network drift");
            if let Ok(mut u) = self.tenant.unreported.lock() {
                u.extend(changes.iter().cloned());
            }
        }
        *last = Some(desired.clone());
        drop(last);
        self.ensure_listeners(net, &desired).await;
        Ok(changes)
    }

    /// One metadata listener per router namespace; a namespace that was re-created gets a new one.
    async fn ensure_listeners(&self, net: &kumo_network::HostNetwork, desired: &HostDesired) {
        let mut listeners = self.tenant.listeners.lock().await;
        let mut wanted = HashMap::new();
        for (spec, _) in &desired.networks {
            wanted.insert(net.router_netns(spec), spec.name.clone());
        }
        listeners.retain(|ns, (_, task)| {
            let keep = wanted.contains_key(ns);
            if !keep {
                task.abort();
            }
            keep
        });
        for (ns, network) in wanted {
            let inode = std::fs::metadata(format!("/run/netns/{ns}"))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap_or(0);
            if let Some((old, task)) = listeners.get(&ns) {
                if *old == inode && !task.is_finished() {
                    continue;
                }
                task.abort();
            }
            let addr = SocketAddr::new(kumo_network::METADATA_IP.into(), 80);
            match kumo_network::bind_tcp_in_netns(&ns, addr).await {
                Ok(listener) => {
                    let source: Arc<dyn MetadataSource> = Arc::new(Lookup(self.tenant.clone()));
                    let task = tokio::spawn(crate::metadata::serve(listener, network, source));
                    listeners.insert(ns, (inode, task));
                }
                Err(e) => {
                    tracing::warn!(netns = %ns, error = %chain(&e), "cannot serve metadata");
                }
            }
        }
    }

    /// Drift repairs to report with the next heartbeat.
    pub(crate) fn take_repairs(&self) -> Vec<String> {
        self.tenant
            .unreported
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default()
    }

    /// Puts back repairs whose heartbeat failed.
    pub(crate) fn restore_repairs(&self, mut repairs: Vec<String>) {
        if let Ok(mut u) = self.tenant.unreported.lock() {
            repairs.append(&mut u);
            *u = repairs;
        }
    }

    /// The router namespace and address to reach a VM's port from (port-forward).
    pub async fn vm_target(&self, id: &str) -> Option<(String, String)> {
        let net = self.net.as_ref()?;
        let map = self.vms.map.lock().await;
        let d = &map.get(id)?.rec.desired;
        let spec = network_spec(&d.nic.network, None);
        Some((net.router_netns(&spec), d.nic.ip.clone()))
    }

    /// Periodic re-render of the network (with a fresh policy), so drift is repaired and policy changes
    /// (security group rules, elastic IPs, peers) reach the host.
    pub(crate) async fn network_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.refresh_policy().await {
                tracing::debug!(error = %chain(&e), "network policy not refreshed");
            }
            if let Err(e) = self.apply_network().await {
                tracing::warn!(error = %chain(&e), "network apply failed");
            }
            tokio::time::sleep(self.cfg.network_interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_policy_survives_a_restart_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = TenantState::load(dir.path());
        assert_eq!(
            *empty.policy.lock().expect("lock"),
            NetworkPolicy::default()
        );
        let policy = NetworkPolicy {
            public: Some(kumo_types::agent::PublicNetwork {
                cidr: "203.0.113.0/24".into(),
                gateway: "203.0.113.1".into(),
            }),
            ..Default::default()
        };
        std::fs::write(
            policy_path(dir.path()),
            serde_json::to_vec(&policy).expect("json"),
        )
        .expect("write");
        let loaded = TenantState::load(dir.path());
        assert_eq!(*loaded.policy.lock().expect("lock"), policy);
        std::fs::write(policy_path(dir.path()), b"{not json").expect("write");
        let broken = TenantState::load(dir.path());
        assert_eq!(
            *broken.policy.lock().expect("lock"),
            NetworkPolicy::default()
        );
    }
}
