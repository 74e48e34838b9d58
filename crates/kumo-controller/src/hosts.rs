//! Host registration and heartbeats: agents report what they observe, the controller alone
//! writes the records.

use kumo_store::{HostRow, InstanceRow, Observation};
use kumo_types::agent::{Heartbeat, RegisterRequest, RegisterResponse, VmObserved};
use serde::{Deserialize, Serialize};

use crate::{Controller, OpError};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// VMs the host has that the controller does not want anywhere: the agent removes them.
    pub delete: Vec<String>,
    /// VMs the host has that live on another host of its shared pool now (migrated or failed
    /// over): the agent removes them but keeps their disks.
    #[serde(default)]
    pub forget: Vec<String>,
    /// HA leases for every VM the controller wants on the host (see `ha`).
    #[serde(default)]
    pub leases: Option<kumo_types::agent::LeaseGrant>,
}

impl Controller {
    pub async fn register_host(&self, req: &RegisterRequest) -> Result<RegisterResponse, OpError> {
        if !self.store.join_token_valid(&req.join_token).await? {
            return Err(OpError::Invalid(
                "the join token is wrong or revoked".into(),
            ));
        }
        let host = self
            .store
            .register_host(&req.name, &req.address, &req.site, &req.info)
            .await?;
        self.system_event(
            None,
            "host.registered",
            &host.id,
            "ok",
            Some(format!("{} at {}", host.name, host.address)),
        )
        .await;
        Ok(RegisterResponse {
            host_id: host.id,
            host_secret: host.secret,
        })
    }

    /// The host for an agent's credentials; `None` when they do not match.
    pub async fn authenticate_host(
        &self,
        host_id: &str,
        secret: &str,
    ) -> Result<Option<HostRow>, OpError> {
        match self.store.host(host_id).await {
            Ok(h) if h.id == host_id && constant_eq(h.secret.as_bytes(), secret.as_bytes()) => {
                Ok(Some(h))
            }
            Ok(_) | Err(kumo_store::StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn heartbeat(
        &self,
        host: &HostRow,
        hb: &Heartbeat,
    ) -> Result<HeartbeatResponse, OpError> {
        // The agent counts its leases from before it sent this: counting from now ends later.
        let received = chrono::Utc::now();
        self.store
            .host_heartbeat(&host.id, &hb.address, &hb.info)
            .await?;
        if host.state == "fenced" {
            self.store.unfence_host(&host.id).await?;
        }
        if host.state == "down" || host.state == "fenced" {
            self.system_event(None, "host.up", &host.id, "ok", None)
                .await;
        }
        // After the heartbeat is recorded: a failover racing this either sees it or moved the
        // instance before the grant, which then leaves it out.
        let leases = self.grant_leases(host, received).await?;
        self.record_fencings(host, &hb.fenced).await;
        self.observe_path(host, hb.path.as_ref()).await;
        if !hb.repairs.is_empty() {
            // Drift the agent found in its networks and put back (a deleted rule, a killed dnsmasq...).
            let detail = hb.repairs.join("; ");
            self.system_event(None, "host.network.repaired", &host.id, "ok", Some(detail))
                .await;
        }
        let mut live: std::collections::HashMap<String, InstanceRow> = self
            .store
            .instances_on_host(&host.id)
            .await?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let mut delete = Vec::new();
        let mut forget = Vec::new();
        for vm in &hb.vms {
            match live.remove(&vm.id) {
                Some(row) => self.fold_observation(&row, vm).await?,
                None => match self.elsewhere(host, &vm.id).await? {
                    Elsewhere::Gone => delete.push(vm.id.clone()),
                    Elsewhere::SharedPool => forget.push(vm.id.clone()),
                    Elsewhere::Migrating => {}
                },
            }
        }
        // What is left was not reported: gone from the host.
        for row in live.into_values() {
            if self.store.instance_absent_on_host(&row).await? {
                self.system_event(
                    Some(&row.project_id),
                    "instance.state",
                    &row.id,
                    "terminated",
                    None,
                )
                .await;
            }
        }
        if !delete.is_empty() || !forget.is_empty() {
            tracing::info!(host = %host.id, vms = ?delete, moved = ?forget, "host has VMs the controller does not want there; asking it to remove them");
            self.wake();
        }
        Ok(HeartbeatResponse {
            delete,
            forget,
            leases: Some(leases),
        })
    }
}

/// What became of a VM a host reports but does not hold in the store.
enum Elsewhere {
    /// Terminated or unknown: remove it with its disk.
    Gone,
    /// It lives on another host of this host's shared pool: remove it, keep the disk.
    SharedPool,
    /// A migration from this host is finishing: that migration removes it.
    Migrating,
}

impl Controller {
    async fn elsewhere(&self, host: &HostRow, id: &str) -> Result<Elsewhere, OpError> {
        if let Some(m) = self.store.active_migration(id).await? {
            if m.source_host == host.id || m.dest_host == host.id {
                return Ok(Elsewhere::Migrating);
            }
        }
        let row = match self.store.instance(&kumo_store::Scope::system(), id).await {
            Ok(r) => r,
            Err(kumo_store::StoreError::NotFound { .. }) => return Ok(Elsewhere::Gone),
            Err(e) => return Err(e.into()),
        };
        if row.state == kumo_types::InstanceState::Terminated {
            return Ok(Elsewhere::Gone);
        }
        let Some(now_on) = &row.host_id else {
            return Ok(Elsewhere::Gone);
        };
        let there = self.store.host(now_on).await?;
        let shared = !host.storage_pool.is_empty() && host.storage_pool == there.storage_pool;
        Ok(if shared {
            Elsewhere::SharedPool
        } else {
            Elsewhere::Gone
        })
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Controller {
    /// Fold one agent report into the instance record, journalling a state change.
    pub(crate) async fn fold_observation(
        &self,
        row: &InstanceRow,
        vm: &VmObserved,
    ) -> Result<(), OpError> {
        let obs = Observation {
            generation: vm.generation,
            power: vm.power,
            error: vm.error.clone(),
        };
        // Only settled reports say what is plugged in: a VM starting or stopping (or whose state
        // probe timed out behind a hot-plug) reports too little.
        use kumo_types::agent::ObservedPower;
        let settled = matches!(
            vm.power,
            ObservedPower::Running | ObservedPower::Stopped | ObservedPower::Failed
        );
        if vm.generation >= row.generation && settled {
            self.store
                .set_transition_error(&row.id, vm.volume_error.as_deref())
                .await?;
            let running = vm.power == ObservedPower::Running;
            for v in self
                .store
                .observe_volumes(&row.id, &vm.volumes, running)
                .await?
            {
                let action = if v.attach_state.as_deref() == Some("attaching") {
                    "volume.attached"
                } else {
                    "volume.detached"
                };
                self.system_event(
                    Some(&row.project_id),
                    action,
                    &v.id,
                    "ok",
                    Some(row.id.clone()),
                )
                .await;
            }
        }
        if let Some(state) = self.store.apply_observation(row, &obs).await? {
            self.system_event(
                Some(&row.project_id),
                "instance.state",
                &row.id,
                state.as_str(),
                None,
            )
            .await;
        }
        Ok(())
    }
}
