//! What operators ask of placement: why each host would take or refuse an instance, how full
//! hosts and sites are, whether the cluster survives losing its largest host; host states and
//! join tokens.

use std::collections::HashMap;

use kumo_scheduler::{HostView, NPlusOne, Request, Verdict};
use kumo_store::{HostRow, HostUsage, JoinToken};
use serde::Serialize;

use crate::{Controller, OpError};

/// Scheduler views of hosts with their current usage.
pub(crate) fn host_views(hosts: &[HostRow], usage: &HashMap<String, HostUsage>) -> Vec<HostView> {
    hosts
        .iter()
        .map(|h| {
            let u = usage.get(&h.id).cloned().unwrap_or_default();
            HostView {
                id: h.id.clone(),
                name: h.name.clone(),
                site: h.site.clone(),
                state: h.state.clone(),
                vcpus: h.vcpus,
                memory_mib: h.memory_mib,
                used_vcpus: u.vcpus,
                used_memory_mib: u.memory_mib,
                labels: h.labels.clone(),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct HostCapacity {
    pub host: String,
    pub site: String,
    pub state: String,
    /// What the scheduler may hand out (after overcommit and the host's reserve).
    pub vcpus: u32,
    pub memory_mib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub free_vcpus: u32,
    pub free_memory_mib: u64,
    pub instances: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SiteCapacity {
    pub site: String,
    pub hosts: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub free_vcpus: u32,
    pub free_memory_mib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub hosts: Vec<HostCapacity>,
    pub sites: Vec<SiteCapacity>,
    pub n_plus_one: NPlusOne,
}

impl Controller {
    /// Every host's verdict for an instance of this type (in this site).
    pub async fn explain_placement(
        &self,
        instance_type: &str,
        site: Option<String>,
        constraints: &[String],
    ) -> Result<Vec<Verdict>, OpError> {
        let constraints =
            kumo_scheduler::parse_constraints(constraints).map_err(OpError::Invalid)?;
        let t = self
            .store
            .instance_type(instance_type)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::NotFound { .. } => {
                    OpError::Invalid(format!("instance type {instance_type:?} does not exist"))
                }
                other => other.into(),
            })?;
        let views = host_views(&self.store.hosts().await?, &self.store.host_usage().await?);
        let req = Request {
            vcpus: t.vcpus,
            memory_mib: t.memory_mib,
            site,
            constraints,
            allow_spare: false,
        };
        Ok(kumo_scheduler::explain(&views, &req, &self.cfg.policy))
    }

    pub async fn capacity(&self) -> Result<Capacity, OpError> {
        let hosts = self.store.hosts().await?;
        let usage = self.store.host_usage().await?;
        let views = host_views(&hosts, &usage);
        let p = &self.cfg.policy;
        let mut sites: Vec<SiteCapacity> = vec![];
        let mut out = vec![];
        for v in &views {
            let (c, m) = kumo_scheduler::capacity(v, p);
            let hc = HostCapacity {
                host: v.name.clone(),
                site: v.site.clone(),
                state: v.state.clone(),
                vcpus: c,
                memory_mib: m,
                used_vcpus: v.used_vcpus,
                used_memory_mib: v.used_memory_mib,
                free_vcpus: c.saturating_sub(v.used_vcpus),
                free_memory_mib: m.saturating_sub(v.used_memory_mib),
                instances: usage.get(&v.id).map(|u| u.instances).unwrap_or(0),
            };
            let s = match sites.iter_mut().find(|s| s.site == v.site) {
                Some(s) => s,
                None => {
                    sites.push(SiteCapacity {
                        site: v.site.clone(),
                        hosts: 0,
                        vcpus: 0,
                        memory_mib: 0,
                        used_vcpus: 0,
                        used_memory_mib: 0,
                        free_vcpus: 0,
                        free_memory_mib: 0,
                    });
                    let last = sites.len() - 1;
                    &mut sites[last]
                }
            };
            s.hosts += 1;
            s.vcpus += hc.vcpus;
            s.memory_mib += hc.memory_mib;
            s.used_vcpus += hc.used_vcpus;
            s.used_memory_mib += hc.used_memory_mib;
            if v.state == "up" {
                s.free_vcpus += hc.free_vcpus;
                s.free_memory_mib += hc.free_memory_mib;
            }
            out.push(hc);
        }
        let mut per_host: HashMap<String, Vec<(u32, u64)>> = HashMap::new();
        for h in &hosts {
            let rows = self.store.instances_on_host(&h.id).await?;
            per_host.insert(
                h.id.clone(),
                rows.iter().map(|r| (r.vcpus, r.memory_mib)).collect(),
            );
        }
        let n_plus_one = kumo_scheduler::n_plus_one(
            &views,
            |id| per_host.get(id).cloned().unwrap_or_default(),
            p,
        );
        Ok(Capacity {
            hosts: out,
            sites,
            n_plus_one,
        })
    }

    pub async fn set_host_state(&self, id: &str, state: &str) -> Result<HostRow, OpError> {
        let h = self
            .store
            .set_host_state(id, state)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })?;
        self.system_event(None, "host.state", &h.id, &h.state, None)
            .await;
        Ok(h)
    }

    pub async fn join_tokens(&self) -> Result<Vec<JoinToken>, OpError> {
        Ok(self.store.join_tokens().await?)
    }

    pub async fn create_join_token(&self) -> Result<String, OpError> {
        Ok(self.store.create_join_token().await?)
    }

    pub async fn revoke_join_token(&self, token: &str) -> Result<(), OpError> {
        Ok(self.store.revoke_join_token(token).await?)
    }
}
