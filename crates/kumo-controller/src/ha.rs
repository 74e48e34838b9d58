//! HA: leases and failover.
//!
//! Every heartbeat answer grants the host a lease for each VM the controller wants there, and
//! every desired-spec PUT carries one; the store records `received + ttl` per instance. A host
//! that cannot renew kills its VMs when its leases lapse (the agent's watchdog). When a host is
//! `down`, the monitor here waits until every lease it held has provably expired (`now >
//! expiry + margin`, and no heartbeat for `ttl + margin`), then restarts its HA instances on
//! other hosts by the placement rules, highest priority first, and marks the host `fenced`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kumo_scheduler::Request;
use kumo_store::{Failover, HostRow, InstanceRow, Scope};
use kumo_types::agent::{FenceReport, LeaseGrant};

use crate::{Controller, OpError};

/// The lease a host gets for its VMs unless configured otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(6);
/// Failover waits this much past a lease's expiry (clock rates, scheduling).
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// How often the monitor looks at down hosts.
const TICK: Duration = Duration::from_millis(250);

/// What one monitor pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaPass {
    /// (instance, from host, to host), in the order they were restarted.
    pub moved: Vec<(String, String, String)>,
    /// (instance, why it stays on its failed host), reported once per outage.
    pub skipped: Vec<(String, String)>,
    /// Hosts marked `fenced` in this pass.
    pub fenced: Vec<String>,
}

/// What the monitor has already reported per failed host, so each reason is journalled once,
/// and the failed hosts some instance was restarted away from.
#[derive(Debug, Default)]
pub struct HaMemory {
    reported: HashMap<String, HashSet<String>>,
    took_over: HashSet<String>,
}

impl HaMemory {
    fn first_time(&mut self, host: &str, key: String) -> bool {
        self.reported
            .entry(host.to_string())
            .or_default()
            .insert(key)
    }
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_default()
}

/// Why an instance of a failed host cannot be restarted elsewhere, if it cannot.
pub fn ha_blocker(
    row: &InstanceRow,
    host: &HostRow,
    volumes: &[kumo_store::VolumeRow],
) -> Option<String> {
    if !row.ha {
        return Some("HA is off".into());
    }
    if row.desired != "running" {
        return Some(format!("it is not meant to run (desired {})", row.desired));
    }
    // Simulated hosts have no disks to reach.
    if host.hypervisor == "sim" {
        return None;
    }
    if !kumo_store::is_shared(&host.pool_kind) || host.storage_pool.is_empty() {
        return Some(format!(
            "its root disk is on host {}'s local pool {}",
            host.name, host.pool_name
        ));
    }
    for v in volumes {
        if v.host_id.is_some() || v.pool != host.pool_name {
            return Some(format!(
                "volume {} is on pool {}, not on the shared pool {}",
                v.id, v.pool, host.pool_name
            ));
        }
    }
    None
}

impl Controller {
    /// Grant the host leases for every VM it should run, counted from `received`.
    pub(crate) async fn grant_leases(
        &self,
        host: &HostRow,
        received: DateTime<Utc>,
    ) -> Result<LeaseGrant, OpError> {
        let ttl = self.cfg.lease_ttl;
        let vms = self
            .store
            .grant_leases(&host.id, received + chrono_dur(ttl))
            .await?;
        Ok(LeaseGrant {
            ttl_ms: ttl.as_millis() as u64,
            vms,
        })
    }

    /// The host took a PUT (and its lease): record the lease from now.
    pub(crate) async fn record_put_lease(&self, row: &InstanceRow, host: &HostRow) {
        let until = Utc::now() + chrono_dur(self.cfg.lease_ttl);
        if let Err(e) = self.store.record_lease(&row.id, &host.id, until).await {
            tracing::warn!(instance = %row.id, error = %e, "could not record a lease");
        }
    }

    /// Journal the VMs a host killed for lack of a lease.
    pub(crate) async fn record_fencings(&self, host: &HostRow, reports: &[FenceReport]) {
        for r in reports {
            let project = self
                .store
                .instance(&Scope::system(), &r.id)
                .await
                .ok()
                .map(|i| i.project_id);
            let detail = format!(
                "host {} ({}) killed it for lack of a lease renewal, {:.1} s before its lease ended and {:.1} s before this heartbeat",
                host.name,
                host.id,
                r.ahead_ms as f64 / 1000.0,
                r.ago_ms as f64 / 1000.0
            );
            tracing::warn!(instance = %r.id, host = %host.id, "{detail}");
            self.system_event(
                project.as_deref(),
                "instance.fenced",
                &r.id,
                "ok",
                Some(detail),
            )
            .await;
        }
    }

    pub(crate) async fn ha_loop(&self) {
        let started = Instant::now();
        let mut memory = HaMemory::default();
        loop {
            tokio::time::sleep(TICK).await;
            // After a controller restart every host looks silent: give them a heartbeat timeout
            // to report before treating any as failed.
            if started.elapsed() < self.cfg.heartbeat_timeout {
                continue;
            }
            if let Err(e) = self.ha_once(&mut memory).await {
                tracing::warn!(error = %e, "HA pass failed");
            }
        }
    }

    /// One pass of the HA monitor over the `down` and `fenced` hosts.
    pub async fn ha_once(&self, memory: &mut HaMemory) -> Result<HaPass, OpError> {
        let mut pass = HaPass::default();
        let failed = self.store.host_ids_in_state(&["down", "fenced"]).await?;
        memory.reported.retain(|h, _| failed.contains(h));
        memory.took_over.retain(|h| failed.contains(h));
        if failed.is_empty() {
            return Ok(pass);
        }
        let now = Utc::now();
        let ttl = chrono_dur(self.cfg.lease_ttl);
        let margin = chrono_dur(LEASE_MARGIN);
        // Hosts whose every lease has provably expired, with when that happened.
        let mut ready: HashMap<String, (HostRow, DateTime<Utc>)> = HashMap::new();
        for id in failed {
            let host = self.store.host(&id).await?;
            let last_lease = self
                .store
                .host_leases(&id)
                .await?
                .into_iter()
                .map(|l| l.expires_at)
                .max();
            // A PUT lease never reaches past the host's heartbeat lease (the agent bounds it).
            let expired_at = [last_lease, host.last_heartbeat.map(|t| t + ttl)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(now);
            if now > expired_at + margin {
                ready.insert(id, (host, expired_at));
            }
        }
        if ready.is_empty() {
            return Ok(pass);
        }
        let ids: Vec<String> = ready.keys().cloned().collect();
        for row in self.store.ha_instances_on(&ids).await? {
            let Some((from, expired_at)) = row.host_id.as_ref().and_then(|h| ready.get(h)) else {
                continue;
            };
            match self.fail_over(&row, from, now).await? {
                Outcome::Retry => {}
                Outcome::Moved(to) => {
                    let since = host_silence(from, Utc::now());
                    let detail = format!(
                        "from {} ({}) to {} ({}); {since:.1} s after the host's last heartbeat, leases expired at {}",
                        from.name,
                        from.id,
                        to.name,
                        to.id,
                        kumo_store::fmt_time(*expired_at)
                    );
                    tracing::warn!(instance = %row.id, "failover: {detail}");
                    self.system_event(
                        Some(&row.project_id),
                        "instance.failover",
                        &row.id,
                        "ok",
                        Some(detail),
                    )
                    .await;
                    pass.moved
                        .push((row.id.clone(), from.id.clone(), to.id.clone()));
                    memory.took_over.insert(from.id.clone());
                    self.wake();
                }
                Outcome::Stays(reason) => {
                    if memory.first_time(&from.id, format!("{}|{reason}", row.id)) {
                        let detail = format!("stays on {} ({}): {reason}", from.name, from.id);
                        self.system_event(
                            Some(&row.project_id),
                            "instance.failover",
                            &row.id,
                            "skipped",
                            Some(detail),
                        )
                        .await;
                        pass.skipped.push((row.id.clone(), reason));
                    }
                }
            }
        }
        // Down hosts: every instance left there is reported once; a host whose instances were
        // taken over is `fenced` (one with nothing taken over stays `down`).
        for (id, (host, expired_at)) in &ready {
            if host.state != "down" {
                continue;
            }
            let left = self.report_left_behind(host, memory, &mut pass).await?;
            if !memory.took_over.contains(id) || !self.store.fence_host(id).await? {
                continue; // nothing taken over, or it came back meanwhile
            }
            let detail = format!(
                "leases expired at {}; last heartbeat {} ({:.1} s ago); {} instance(s) restarted elsewhere, {left} left",
                kumo_store::fmt_time(*expired_at),
                host.last_heartbeat
                    .map(kumo_store::fmt_time)
                    .unwrap_or_else(|| "never".into()),
                host_silence(host, Utc::now()),
                pass.moved.iter().filter(|m| &m.1 == id).count(),
            );
            tracing::warn!(host = %id, "host fenced: {detail}");
            self.system_event(None, "host.fenced", id, "ok", Some(detail))
                .await;
            pass.fenced.push(id.clone());
        }
        Ok(pass)
    }

    /// Journal (once per outage) each live instance still on a failed host that will not be
    /// restarted elsewhere, and why. Returns how many are left there.
    async fn report_left_behind(
        &self,
        host: &HostRow,
        memory: &mut HaMemory,
        pass: &mut HaPass,
    ) -> Result<usize, OpError> {
        let rows: Vec<InstanceRow> = self
            .store
            .instances_on_host(&host.id)
            .await?
            .into_iter()
            .filter(|r| r.desired != "terminated")
            .collect();
        if !memory.first_time(&host.id, "left-behind".into()) {
            return Ok(rows.len());
        }
        for row in &rows {
            let volumes = self.store.instance_volumes(&row.id).await?;
            let Some(reason) = ha_blocker(row, host, &volumes) else {
                continue; // an HA instance that found no host: reported by the failover itself
            };
            if memory.first_time(&host.id, format!("{}|{reason}", row.id)) {
                let detail = format!("stays on {} ({}): {reason}", host.name, host.id);
                self.system_event(
                    Some(&row.project_id),
                    "instance.failover",
                    &row.id,
                    "skipped",
                    Some(detail),
                )
                .await;
                pass.skipped.push((row.id.clone(), reason));
            }
        }
        Ok(rows.len())
    }

    /// Restart one instance of a failed host elsewhere: the host it went to, or why it stays.
    async fn fail_over(
        &self,
        row: &InstanceRow,
        from: &HostRow,
        now: DateTime<Utc>,
    ) -> Result<Outcome, OpError> {
        let volumes = self.store.instance_volumes(&row.id).await?;
        if let Some(reason) = ha_blocker(row, from, &volumes) {
            return Ok(Outcome::Stays(reason));
        }
        let constraints = match kumo_scheduler::parse_constraints(&row.constraints) {
            Ok(c) => c,
            Err(e) => return Ok(Outcome::Stays(format!("its placement constraints: {e}"))),
        };
        let group = match &row.placement_group_id {
            Some(g) => Some(self.store.placement_group(&Scope::system(), g).await?),
            None => None,
        };
        let req = Request {
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            disk_gib: row.disk_gib,
            site: row.requested_site.clone(),
            constraints,
            // Failover may use the spare hosts kept free for it.
            allow_spare: true,
            group: None,
            // Only hosts of the shared pool holding its disks.
            pool_key: (from.hypervisor != "sim").then(|| from.storage_pool.clone()),
        };
        let margin = chrono_dur(LEASE_MARGIN);
        let heartbeat_cutoff = now - chrono_dur(self.cfg.lease_ttl) - margin;
        let outcome = self
            .store
            .fail_over_instance(row, &from.id, now - margin, heartbeat_cutoff, |p| {
                let g = group.as_ref().map(|g| p.group_view(g));
                self.decide(p.hosts(), &req, g)
            })
            .await?;
        Ok(match outcome {
            Failover::Moved { host_id, .. } => {
                Outcome::Moved(Box::new(self.store.host(&host_id).await?))
            }
            Failover::NoHost(reason) => Outcome::Stays(format!("no host can take it: {reason}")),
            Failover::Raced => {
                tracing::info!(instance = %row.id, host = %from.id, "failover not done: the instance or its host changed meanwhile");
                Outcome::Retry
            }
        })
    }
}

/// What became of one failover attempt.
enum Outcome {
    Moved(Box<HostRow>),
    /// It stays on its failed host, and why.
    Stays(String),
    /// The instance or its host changed under us: look again next pass.
    Retry,
}

/// Seconds since the host's last heartbeat.
fn host_silence(host: &HostRow, now: DateTime<Utc>) -> f64 {
    host.last_heartbeat
        .map(|t| (now - t).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests;
