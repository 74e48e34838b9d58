//! What operators ask of placement: why each host would take or refuse an instance, how full
//! hosts and sites are, whether the cluster survives losing its largest host; host states and
//! join tokens.

use std::collections::VecDeque;
use std::time::Duration;

use kumo_scheduler::{GroupView, HostView, Request, Verdict};
use kumo_store::{HostRow, JoinToken, PlacementGroupRow, Scope};
use kumo_types::api::{CapacityReport, CapacityRow, PlacementStats};

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
            pool_key: None,
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

    pub fn decision_stats(&self) -> PlacementStats {
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
        PlacementStats {
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

    /// Used, reserved and free capacity per host and per site, and N+1.
    pub async fn capacity(&self) -> Result<CapacityReport, OpError> {
        let views = self.store.placement().await?.hosts().to_vec();
        let p = &self.cfg.policy;
        let mut hosts = Vec::with_capacity(views.len());
        // Site -> (hosts, totals); a site's free capacity counts `up` hosts only.
        let mut sites: std::collections::BTreeMap<String, (u32, CapacityRow)> = Default::default();
        for v in &views {
            let (c, m, d) = kumo_scheduler::capacity(v, p);
            let row = CapacityRow {
                name: v.name.clone(),
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
            let (n, s) = sites.entry(v.site.clone()).or_insert_with(|| {
                let site = CapacityRow {
                    name: v.site.clone(),
                    site: v.site.clone(),
                    ..CapacityRow::default()
                };
                (0, site)
            });
            *n += 1;
            s.vcpus += row.vcpus;
            s.memory_mib += row.memory_mib;
            s.disk_gib += row.disk_gib;
            s.used_vcpus += row.used_vcpus;
            s.used_memory_mib += row.used_memory_mib;
            s.used_disk_gib += row.used_disk_gib;
            s.instances += row.instances;
            if v.state == "up" {
                s.free_vcpus += row.free_vcpus;
                s.free_memory_mib += row.free_memory_mib;
                s.free_disk_gib += row.free_disk_gib;
            }
            hosts.push(row);
        }
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
        let n1 = kumo_scheduler::n_plus_one(&views, |_| load.clone(), p);
        Ok(CapacityReport {
            hosts,
            sites: sites
                .into_values()
                .map(|(n, s)| CapacityRow {
                    state: format!("{n} hosts"),
                    ..s
                })
                .collect(),
            n_plus_one: n1.ok,
            largest_host: n1.largest_host,
            stranded: n1.stranded,
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
