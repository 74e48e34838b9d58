//! Network-path failure (seed 000, test 2): each agent probes operator-given targets on its VMs'
//! side (`kumo agent --probe`) and reports them in every heartbeat. A host whose heartbeats still
//! arrive (management path up) but whose every target is down has VMs nobody can reach: it is
//! marked `draining` and its running instances are live-migrated to hosts whose probes are fine
//! (journal: `host.path.down`, then the evacuation's events). When a target answers again:
//! `host.path.up`; the host stays draining until an operator returns it (`kumo host return`).
//!
//! Hosts that are `down`/`fenced` (no heartbeats: HA's job) or in `maintenance` are left alone.
//! The agent's hysteresis (3 failures / 2 successes) means a brief flap never gets here.
//!
//! Destinations: a host with any failing target is never chosen. The placement candidates are
//! the hosts minus the source minus those failing, the best is chosen by the usual rules and
//! named explicitly in the migration (if the migration refuses it, e.g. it cannot carry the
//! network, the next best is tried). A host whose every target fails is also `draining`, which
//! placement refuses anyway.
//!
//! What lives only in memory is the latest report per host (re-sent every second) and whether
//! this process already acted on the current outage; the lasting effects are in the store (the
//! host's state, the evacuation operation, the migrations, the journal). After a controller
//! restart the first all-down report of a `draining` host journals `host.path.down` again and
//! evacuates what is still on it (migrations cut short by the restart were rolled back to it).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kumo_scheduler::{HostView, Request};
use kumo_store::{HostRow, MigrationRow, Scope};
use kumo_types::agent::PathReport;
use kumo_types::api::HostPath;
use kumo_types::migration::MigrateInstance;

use crate::{Controller, OpError};

/// The migrations' reason when a host's path failed.
pub(crate) const PATH_REASON: &str = "path-failure";
/// Destinations tried per instance before giving up (each refusal rules one host out).
const DEST_TRIES: usize = 8;
/// Attempts to start a path evacuation, and the pause between them.
const EVACUATE_TRIES: usize = 5;
const EVACUATE_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Latest path report per host and whether this process acted on its current outage.
#[derive(Debug, Default)]
pub(crate) struct Paths {
    hosts: Mutex<HashMap<String, HostPathState>>,
}

#[derive(Debug, Default, Clone)]
struct HostPathState {
    report: PathReport,
    /// `host.path.down` journalled and the host evacuated for this outage.
    acted: bool,
}

/// What a report calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Nothing,
    /// Every target is down on a host we may act on: these are the targets.
    Down(Vec<String>),
    /// The path of a host we had acted on answers again.
    Up,
}

/// The decision for one report, given the host's state before this heartbeat and whether the
/// outage was already acted on; returns the verdict and the new `acted`.
pub(crate) fn decide(state: &str, acted: bool, report: Option<&PathReport>) -> (Verdict, bool) {
    let all_down = report.is_some_and(PathReport::all_down);
    match (all_down, acted) {
        (true, true) => (Verdict::Nothing, true),
        // A host coming back from `down` is left to its next heartbeat; `maintenance` is the
        // operator's (it is empty or being emptied already).
        (true, false) if matches!(state, "up" | "draining") => (
            Verdict::Down(report.map(|r| r.failing.clone()).unwrap_or_default()),
            true,
        ),
        (true, false) => (Verdict::Nothing, false),
        (false, true) => (Verdict::Up, false),
        (false, false) => (Verdict::Nothing, false),
    }
}

impl Paths {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostPathState>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a host's report and decide, atomically: two heartbeats of one host racing each
    /// other cannot both act.
    fn observe(&self, host: &HostRow, report: Option<&PathReport>) -> Verdict {
        let mut hosts = self.lock();
        let e = hosts.entry(host.id.clone()).or_default();
        e.report = report.cloned().unwrap_or_default();
        let (verdict, acted) = decide(&host.state, e.acted, report);
        e.acted = acted;
        verdict
    }

    /// Acting failed: the next report tries again.
    fn unact(&self, host_id: &str) {
        if let Some(e) = self.lock().get_mut(host_id) {
            e.acted = false;
        }
    }

    /// Hosts with at least one failing target: never a destination for a path evacuation.
    pub(crate) fn failing_hosts(&self) -> HashSet<String> {
        self.lock()
            .iter()
            .filter(|(_, s)| !s.report.failing.is_empty())
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn view(&self, host_id: &str) -> Option<HostPath> {
        let hosts = self.lock();
        let r = &hosts.get(host_id)?.report;
        if r.targets.is_empty() {
            return None;
        }
        let state = if r.failing.is_empty() {
            "ok"
        } else if r.all_down() {
            "down"
        } else {
            "degraded"
        };
        Some(HostPath {
            state: state.into(),
            targets: r.targets.clone(),
            failing: r.failing.clone(),
        })
    }
}

impl Controller {
    /// A heartbeat's path report (after the heartbeat is recorded). Never fails the heartbeat:
    /// the evacuation runs in the background.
    pub(crate) async fn observe_path(&self, host: &HostRow, report: Option<&PathReport>) {
        match self.paths.observe(host, report) {
            Verdict::Nothing => {}
            Verdict::Up => {
                tracing::info!(host = %host.id, "network path answers again");
                let detail = report.map(|r| format!("answering: {}", answering(r)));
                self.system_event(None, "host.path.up", &host.id, "ok", detail)
                    .await;
            }
            Verdict::Down(failing) => {
                tracing::warn!(host = %host.id, ?failing, "network path down; evacuating the host");
                self.system_event(
                    None,
                    "host.path.down",
                    &host.id,
                    "ok",
                    Some(format!("failing: {}", failing.join(", "))),
                )
                .await;
                let me = self.clone();
                let id = host.id.clone();
                tokio::spawn(async move { me.evacuate_path_host(&id).await });
            }
        }
    }

    /// Start the path evacuation of a host, retrying briefly: its own heartbeats bump the host
    /// record and can race the state change. Given up (and journalled) when the host went
    /// where it must not be touched, or after a few tries; the next report tries again.
    async fn evacuate_path_host(&self, id: &str) {
        let mut error = String::new();
        for _ in 0..EVACUATE_TRIES {
            match self.evacuate_for_path(id).await {
                Ok(_) => return,
                Err(e) => error = e.to_string(),
            }
            match self.store.host(id).await {
                Ok(h) if matches!(h.state.as_str(), "up" | "draining") => {}
                Ok(h) => {
                    error = format!("{error} (the host is {} now)", h.state);
                    break;
                }
                Err(e) => {
                    error = format!("{error}; {e}");
                    break;
                }
            }
            tokio::time::sleep(EVACUATE_RETRY).await;
        }
        tracing::warn!(host = %id, %error, "path evacuation did not start");
        self.system_event(
            None,
            "host.evacuation.failed",
            id,
            "error",
            Some(format!("{PATH_REASON}: {error}")),
        )
        .await;
        self.paths.unact(id);
    }

    /// The path state of a host for the API; `None` when it probes nothing (or has not
    /// reported since this controller started).
    pub fn host_path(&self, host_id: &str) -> Option<HostPath> {
        self.paths.view(host_id)
    }

    /// Hosts whose own probes fail (destinations a path evacuation avoids).
    pub(crate) fn path_failing_hosts(&self) -> HashSet<String> {
        self.paths.failing_hosts()
    }

    /// Start one path-failure migration of `id` off `source` to the best host whose path is
    /// fine (see the module documentation).
    pub(crate) async fn start_path_migration(
        &self,
        id: &str,
        source: &str,
        op_id: &str,
    ) -> Result<MigrationRow, OpError> {
        let row = self.store.instance(&Scope::system(), id).await?;
        let request = Request {
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            disk_gib: row.disk_gib,
            site: row.requested_site.clone(),
            constraints: kumo_scheduler::parse_constraints(&row.constraints)
                .map_err(OpError::Invalid)?,
            allow_spare: true,
            group: None,
            pool_key: None,
        };
        let mut avoid = self.path_failing_hosts();
        avoid.insert(source.to_string());
        let mut refused: Vec<String> = vec![];
        for _ in 0..DEST_TRIES {
            let candidates: Vec<HostView> = {
                let p = self.store.placement().await?;
                p.hosts()
                    .iter()
                    .filter(|h| !avoid.contains(&h.id))
                    .cloned()
                    .collect()
            };
            let i =
                kumo_scheduler::choose(&candidates, &request, &self.cfg.policy).map_err(|why| {
                    refused.push(why);
                    OpError::NoCapacity(format!(
                        "no host with a working network path can take instance {id}: {}",
                        refused.join("; ")
                    ))
                })?;
            let dest = &candidates[i];
            let req = MigrateInstance {
                host: Some(dest.id.clone()),
                ..Default::default()
            };
            match self
                .start_migration(&Scope::system(), id, &req, PATH_REASON, Some(op_id))
                .await
            {
                Ok(m) => return Ok(m),
                // That host cannot take it after all (network, volumes, capacity): the next one.
                Err(e @ (OpError::Invalid(_) | OpError::NoCapacity(_))) => {
                    refused.push(format!("{}: {e}", dest.name));
                    avoid.insert(dest.id.clone());
                }
                Err(e) => return Err(e),
            }
        }
        Err(OpError::NoCapacity(format!(
            "no host with a working network path can take instance {id}: {}",
            refused.join("; ")
        )))
    }
}

fn answering(r: &PathReport) -> String {
    let up: Vec<&str> = r
        .targets
        .iter()
        .filter(|t| !r.failing.contains(t))
        .map(String::as_str)
        .collect();
    up.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(targets: &[&str], failing: &[&str]) -> PathReport {
        PathReport {
            targets: targets.iter().map(|s| s.to_string()).collect(),
            failing: failing.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn acts_once_per_outage_and_only_on_hosts_it_may_touch() {
        let down = report(&["a", "b"], &["a", "b"]);
        let partial = report(&["a", "b"], &["a"]);
        let fine = report(&["a", "b"], &[]);
        assert_eq!(
            decide("up", false, Some(&down)),
            (Verdict::Down(vec!["a".into(), "b".into()]), true)
        );
        assert_eq!(
            decide("draining", true, Some(&down)),
            (Verdict::Nothing, true),
            "not twice"
        );
        assert!(matches!(
            decide("draining", false, Some(&down)).0,
            Verdict::Down(_)
        ));
        for state in ["down", "fenced", "maintenance"] {
            assert_eq!(
                decide(state, false, Some(&down)),
                (Verdict::Nothing, false),
                "{state}"
            );
        }
        assert_eq!(
            decide("up", false, Some(&partial)),
            (Verdict::Nothing, false)
        );
        assert_eq!(
            decide("draining", true, Some(&partial)),
            (Verdict::Up, false)
        );
        assert_eq!(decide("draining", true, Some(&fine)), (Verdict::Up, false));
        assert_eq!(decide("up", false, Some(&fine)), (Verdict::Nothing, false));
        // No probes configured (or the agent stopped probing): never a failure.
        assert_eq!(decide("up", false, None), (Verdict::Nothing, false));
        assert_eq!(
            decide("up", false, Some(&report(&[], &[]))),
            (Verdict::Nothing, false)
        );
    }

    fn host(id: &str, state: &str) -> HostRow {
        HostRow {
            id: id.into(),
            name: id.into(),
            secret: String::new(),
            address: String::new(),
            site: "site1".into(),
            state: state.into(),
            vcpus: 1,
            memory_mib: 1,
            hypervisor: "sim".into(),
            accel: "none".into(),
            qemu_version: String::new(),
            last_heartbeat: None,
            generation: 0,
            created_at: chrono::Utc::now(),
            labels: Default::default(),
            storage_pool: String::new(),
            disk_gib: 0,
            cpu_overcommit: None,
            memory_overcommit: None,
            reserved_memory_mib: None,
            tunnel_ip: String::new(),
            pool_name: String::new(),
            pool_kind: String::new(),
            pool_total_bytes: 0,
            pool_free_bytes: 0,
        }
    }

    #[test]
    fn failing_hosts_and_the_api_view_follow_the_latest_reports() {
        let p = Paths::default();
        let h1 = host("h1", "up");
        let h2 = host("h2", "up");
        let h3 = host("h3", "up");
        assert_eq!(
            p.observe(&h1, Some(&report(&["a"], &["a"]))),
            Verdict::Down(vec!["a".into()])
        );
        assert_eq!(
            p.observe(&h2, Some(&report(&["a", "b"], &["b"]))),
            Verdict::Nothing
        );
        assert_eq!(p.observe(&h3, Some(&report(&["a"], &[]))), Verdict::Nothing);
        let failing = p.failing_hosts();
        assert_eq!(failing, HashSet::from(["h1".to_string(), "h2".to_string()]));
        assert_eq!(p.view("h1").map(|v| v.state), Some("down".to_string()));
        assert_eq!(p.view("h2").map(|v| v.state), Some("degraded".to_string()));
        assert_eq!(p.view("h3").map(|v| v.state), Some("ok".to_string()));
        assert_eq!(p.view("h4"), None);
        // The same outage reported again does nothing; an answer ends it once.
        let h1 = host("h1", "draining");
        assert_eq!(
            p.observe(&h1, Some(&report(&["a"], &["a"]))),
            Verdict::Nothing
        );
        assert_eq!(p.observe(&h1, Some(&report(&["a"], &[]))), Verdict::Up);
        assert_eq!(p.observe(&h1, Some(&report(&["a"], &[]))), Verdict::Nothing);
        assert!(!p.failing_hosts().contains("h1"));
        // An action that could not start is tried again on the next report.
        assert!(matches!(
            p.observe(&h1, Some(&report(&["a"], &["a"]))),
            Verdict::Down(_)
        ));
        p.unact("h1");
        assert!(matches!(
            p.observe(&h1, Some(&report(&["a"], &["a"]))),
            Verdict::Down(_)
        ));
        // A host that stops probing has no path view.
        assert_eq!(p.observe(&h3, None), Verdict::Nothing);
        assert_eq!(p.view("h3"), None);
    }
}
