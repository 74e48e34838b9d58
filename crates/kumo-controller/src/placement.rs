//! What operators ask of placement: why each host would take or refuse an instance, how full
//! hosts and sites are, whether the cluster survives losing its largest host; host states and
//! join tokens.

use std::collections::VecDeque;
use std::time::Duration;

use kumo_scheduler::{GroupView, HostView, NPlusOne, Request, Verdict};
use kumo_store::{HostRow, JoinToken, PlacementGroupRow, Scope};
use serde::Serialize;

use crate::{Controller, OpError};

/// How long recent placement decisions took (the scheduler alone, inside the lock).
#[derive(Default)]
pub(crate) struct Decisions {
    total: u64,
    recent: VecDeque<u64>,
}

const RECENT_DECISIONS: usize = 100_000;

impl Decisions {
    pub(crate) fn record(&mut self, d: Duration) {
        self.total += 1;
        if self.recent.len() == RECENT_DECISIONS {
            self.recent.pop_front();
        }
        self.recent.push_back(d.as_nanos() as u64);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionStats {
    /// Decisions since the controller started.
    pub decisions: u64,
    /// Over the last 100,000 decisions, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostCapacity {
    pub host: String,
    pub site: String,
    pub state: String,
    /// What the scheduler may hand out (after overcommit and the host's reserve).
    pub vcpus: u32,
    pub memory_mib: u64,
    /// 0 when the host does not report its storage.
    pub disk_gib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub used_disk_gib: u64,
    pub free_vcpus: u32,
    pub free_memory_mib: u64,
    pub free_disk_gib: u64,
    /// Host memory kept back for the host itself.
    pub reserved_memory_mib: u64,
    pub instances: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SiteCapacity {
    pub site: String,
    pub hosts: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub used_disk_gib: u64,
    /// Free on `up` hosts only: what new instances can use now.
    pub free_vcpus: u32,
    pub free_memory_mib: u64,
    pub free_disk_gib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub hosts: Vec<HostCapacity>,
    pub sites: Vec<SiteCapacity>,
    pub n_plus_one: NPlusOne,
}

impl Controller {
    /// The scheduler's request for an instance type with these placement wishes.
    pub(crate) async fn placement_request(
        &self,
        scope: &Scope,
        instance_type: &str,
        site: Option<String>,
        constraints: &[String],
        group: Option<&str>,
    ) -> Result<
        (
            Request,
            kumo_types::api::InstanceType,
            Option<PlacementGroupRow>,
        ),
        OpError,
    > {
        let constraints =
            kumo_scheduler::parse_constraints(constraints).map_err(OpError::Invalid)?;
        let t = self
            .store
            .instance_type(instance_type)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::NotFound { .. } => OpError::Invalid(format!(
                    "instance type {instance_type:?} does not exist; see `kumo vm types`"
                )),
                other => other.into(),
            })?;
        let group =
            match group {
                Some(g) => Some(self.store.placement_group(scope, g).await.map_err(
                    |e| match e {
                        kumo_store::StoreError::NotFound { .. } => OpError::Invalid(format!(
                            "placement group {g:?} does not exist; see `kumo placement-group list`"
                        )),
                        other => other.into(),
                    },
                )?),
                None => None,
            };
        if let Some(site) = &site {
            kumo_types::id::validate_name(site).map_err(OpError::Invalid)?;
        }
        let req = Request {
            vcpus: t.vcpus,
            memory_mib: t.memory_mib,
            disk_gib: t.disk_gib,
            site,
            constraints,
            allow_spare: false,
            group: None,
        };
        Ok((req, t, group))
    }

    /// Choose a host and time the decision.
    pub(crate) fn decide(
        &self,
        hosts: &[HostView],
        req: &Request,
        group: Option<GroupView>,
    ) -> Result<usize, String> {
        let started = std::time::Instant::now();
        let r = if group.is_some() {
            let req = Request {
                group,
                ..req.clone()
            };
            kumo_scheduler::choose(hosts, &req, &self.cfg.policy)
        } else {
            kumo_scheduler::choose(hosts, req, &self.cfg.policy)
        };
        if let Ok(mut d) = self.decisions.lock() {
            d.record(started.elapsed());
        }
        r
    }

    pub fn decision_stats(&self) -> DecisionStats {
        let (total, mut v) = match self.decisions.lock() {
            Ok(d) => (d.total, d.recent.iter().copied().collect::<Vec<u64>>()),
            Err(_) => (0, vec![]),
        };
        v.sort_unstable();
        let pct = |q: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            v[i] as f64 / 1000.0
        };
        DecisionStats {
            decisions: total,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: pct(1.0),
        }
    }

    /// Every host's verdict for an instance of this type and these wishes.
    pub async fn explain_placement(
        &self,
        scope: &Scope,
        instance_type: &str,
        site: Option<String>,
        constraints: &[String],
        group: Option<&str>,
    ) -> Result<Vec<Verdict>, OpError> {
        let (mut req, _, group) = self
            .placement_request(scope, instance_type, site, constraints, group)
            .await?;
        let p = self.store.placement().await?;
        req.group = group.as_ref().map(|g| p.group_view(g));
        Ok(kumo_scheduler::explain(p.hosts(), &req, &self.cfg.policy))
    }

    pub async fn capacity(&self) -> Result<Capacity, OpError> {
        let views = self.store.placement().await?.hosts().to_vec();
        let p = &self.cfg.policy;
        let mut sites: Vec<SiteCapacity> = vec![];
        let mut out = vec![];
        for v in &views {
            let (c, m, d) = kumo_scheduler::capacity(v, p);
            let hc = HostCapacity {
                host: v.name.clone(),
                site: v.site.clone(),
                state: v.state.clone(),
                vcpus: c,
                memory_mib: m,
                disk_gib: d,
                used_vcpus: v.used_vcpus,
                used_memory_mib: v.used_memory_mib,
                used_disk_gib: v.used_disk_gib,
                free_vcpus: c.saturating_sub(v.used_vcpus),
                free_memory_mib: m.saturating_sub(v.used_memory_mib),
                free_disk_gib: d.saturating_sub(v.used_disk_gib),
                reserved_memory_mib: p.for_host(v).reserved_memory_mib,
                instances: v.instances,
            };
            let s = match sites.iter().position(|s| s.site == v.site) {
                Some(i) => &mut sites[i],
                None => {
                    sites.push(SiteCapacity {
                        site: v.site.clone(),
                        ..SiteCapacity::default()
                    });
                    let last = sites.len() - 1;
                    &mut sites[last]
                }
            };
            s.hosts += 1;
            s.vcpus += hc.vcpus;
            s.memory_mib += hc.memory_mib;
            s.disk_gib += hc.disk_gib;
            s.used_vcpus += hc.used_vcpus;
            s.used_memory_mib += hc.used_memory_mib;
            s.used_disk_gib += hc.used_disk_gib;
            if v.state == "up" {
                s.free_vcpus += hc.free_vcpus;
                s.free_memory_mib += hc.free_memory_mib;
                s.free_disk_gib += hc.free_disk_gib;
            }
            out.push(hc);
        }
        sites.sort_by(|a, b| a.site.cmp(&b.site));
        // Only the largest host's instances are needed to simulate its loss.
        let load: Vec<(u32, u64)> = match kumo_scheduler::largest_host(&views) {
            Some(h) => self
                .store
                .instances_on_host(&h.id)
                .await?
                .iter()
                .map(|r| (r.vcpus, r.memory_mib))
                .collect(),
            None => vec![],
        };
        let n_plus_one = kumo_scheduler::n_plus_one(&views, |_| load.clone(), p);
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

    /// Set a host's own overcommit ratios and reserved memory (`None` keeps the current value).
    pub async fn set_host_policy(
        &self,
        id: &str,
        cpu_overcommit: Option<f64>,
        memory_overcommit: Option<f64>,
        reserved_memory_mib: Option<u64>,
    ) -> Result<HostRow, OpError> {
        let h = self
            .store
            .set_host_policy(id, cpu_overcommit, memory_overcommit, reserved_memory_mib)
            .await?;
        let detail = format!(
            "cpu_overcommit={:?} memory_overcommit={:?} reserved_memory_mib={:?}",
            h.cpu_overcommit, h.memory_overcommit, h.reserved_memory_mib
        );
        self.system_event(None, "host.policy", &h.id, "ok", Some(detail))
            .await;
        Ok(h)
    }

    pub async fn create_placement_group(
        &self,
        scope: &Scope,
        name: &str,
        strategy: &str,
        max_per_host: u32,
        spread_storage: bool,
    ) -> Result<PlacementGroupRow, OpError> {
        Ok(self
            .store
            .create_placement_group(scope, name, strategy, max_per_host, spread_storage)
            .await?)
    }

    pub async fn placement_groups(&self, scope: &Scope) -> Result<Vec<PlacementGroupRow>, OpError> {
        Ok(self.store.placement_groups(scope).await?)
    }

    pub async fn placement_group(
        &self,
        scope: &Scope,
        id: &str,
    ) -> Result<PlacementGroupRow, OpError> {
        Ok(self.store.placement_group(scope, id).await?)
    }

    pub async fn delete_placement_group(&self, scope: &Scope, id: &str) -> Result<(), OpError> {
        self.store
            .delete_placement_group(scope, id)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })
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
