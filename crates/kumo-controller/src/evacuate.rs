//! Host maintenance: evacuate a host (mark it `maintenance`, live-migrate every running instance
//! away by the placement rules, a few at a time) and return it (mark it `up`, optionally bring its
//! instances home). Instances that cannot move are reported with the reason and keep running.

use std::time::Duration;

use kumo_store::{HostRow, InstanceRow, Scope};
use kumo_types::migration::{
    EvacuateHost, Evacuation, EvacuationItem, MigrateInstance, ReturnHost,
};
use kumo_types::InstanceState;

use crate::pathwatch::PATH_REASON;
use crate::{Controller, OpError};

/// Migrations an evacuation runs at once (each is CPU- and network-heavy for both hosts).
const PARALLEL: usize = 2;

impl Controller {
    pub async fn evacuate_host(&self, id: &str, req: &EvacuateHost) -> Result<Evacuation, OpError> {
        self.evacuate_as(id, req, "maintenance", "evacuate").await
    }

    /// A host whose VM-facing network path failed (see `pathwatch`): marked `draining` rather
    /// than `maintenance` (the operator did not ask for it; they return it), migrations with
    /// reason `path-failure`, never to a host whose own probes fail.
    pub(crate) async fn evacuate_for_path(&self, id: &str) -> Result<Evacuation, OpError> {
        let req = EvacuateHost::default();
        self.evacuate_as(id, &req, "draining", PATH_REASON).await
    }

    /// Mark the host `state` and move its running instances away, migrations with `reason`.
    async fn evacuate_as(
        &self,
        id: &str,
        req: &EvacuateHost,
        state: &str,
        reason: &str,
    ) -> Result<Evacuation, OpError> {
        let host = self.store.host(id).await?;
        if matches!(host.state.as_str(), "down" | "fenced") {
            return Err(OpError::IncorrectState(format!(
                "host {} is {}: its instances cannot be live-migrated (HA restarts those that have it on)",
                host.name, host.state
            )));
        }
        if host.state != state {
            self.set_host_state(&host.id, state).await?;
        }
        let op = self
            .store
            .create_operation("", "evacuate", &host.id)
            .await?;
        let include_storage = req.include_storage.unwrap_or(true);
        let rows = self.store.instances_on_host(&host.id).await?;
        let avoid = if reason == PATH_REASON {
            self.path_failing_hosts()
        } else {
            Default::default()
        };
        let mut items = vec![];
        let mut todo = vec![];
        for r in rows {
            match self
                .evacuation_check(&host, &r, include_storage, &avoid)
                .await
            {
                Ok(()) => {
                    todo.push(r.id.clone());
                    items.push(item(&r.id, "pending", None));
                }
                Err(why) => items.push(item(&r.id, "skipped", Some(why))),
            }
        }
        self.system_event(
            None,
            "host.evacuation.started",
            &host.id,
            "ok",
            Some(format!(
                "{}: {} to migrate, {} cannot move",
                op.id,
                todo.len(),
                items.len() - todo.len()
            )),
        )
        .await;
        let me = self.clone();
        let (op_id, host_id, reason) = (op.id.clone(), host.id.clone(), reason.to_string());
        tokio::spawn(async move {
            me.run_moves(&op_id, &host_id, todo, None, &reason).await;
        });
        Ok(Evacuation {
            operation_id: op.id,
            host_id: host.id,
            items,
        })
    }

    pub async fn return_host(&self, id: &str, req: &ReturnHost) -> Result<Evacuation, OpError> {
        let host = self.store.host(id).await?;
        if host.state != "up" {
            self.set_host_state(&host.id, "up").await?;
        }
        let op = self.store.create_operation("", "return", &host.id).await?;
        let mut items = vec![];
        let mut todo = vec![];
        if req.move_home {
            for r in self.store.instances_from_home(&host.id).await? {
                if r.host_id.as_deref() == Some(host.id.as_str()) {
                    self.store.set_home_host(&r.id, None).await?;
                } else if r.state == InstanceState::Running {
                    todo.push(r.id.clone());
                    items.push(item(&r.id, "pending", None));
                } else {
                    items.push(item(
                        &r.id,
                        "skipped",
                        Some(format!("it is {}, not running", r.state.as_str())),
                    ));
                }
            }
        }
        let me = self.clone();
        let (op_id, host_id) = (op.id.clone(), host.id.clone());
        let dest = Some(host.id.clone());
        tokio::spawn(async move {
            me.run_moves(&op_id, &host_id, todo, dest, "return").await;
        });
        Ok(Evacuation {
            operation_id: op.id,
            host_id: host.id,
            items,
        })
    }

    /// Why an instance cannot leave its host (`Err`), judged before anything moves.
    async fn evacuation_check(
        &self,
        host: &HostRow,
        r: &InstanceRow,
        include_storage: bool,
        avoid: &std::collections::HashSet<String>,
    ) -> Result<(), String> {
        if r.state != InstanceState::Running || r.desired != "running" {
            return Err(format!(
                "it is {}: only running instances are live-migrated (it stays assigned to this host)",
                r.state.as_str()
            ));
        }
        if let Ok(Some(m)) = self.store.active_migration(&r.id).await {
            return Err(format!("it is already migrating ({})", m.id));
        }
        let others: Vec<_> = self
            .store
            .placement()
            .await
            .map_err(|e| e.to_string())?
            .hosts()
            .iter()
            .filter(|h| h.id != host.id && !avoid.contains(&h.id))
            .cloned()
            .collect();
        let request = kumo_scheduler::Request {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_gib: r.disk_gib,
            site: r.requested_site.clone(),
            constraints: kumo_scheduler::parse_constraints(&r.constraints).unwrap_or_default(),
            allow_spare: true,
            group: None,
            pool_key: (!include_storage).then(|| {
                if host.storage_pool.is_empty() {
                    format!("local:{}", host.id)
                } else {
                    host.storage_pool.clone()
                }
            }),
        };
        let verdicts = kumo_scheduler::explain(&others, &request, &self.cfg.policy);
        if verdicts.iter().any(|v| v.refused.is_none()) {
            return Ok(());
        }
        let why: Vec<String> = verdicts
            .iter()
            .map(|v| format!("{}: {}", v.host_name, v.refused.as_deref().unwrap_or("")))
            .collect();
        Err(if why.is_empty() {
            "no other host exists".to_string()
        } else {
            format!("no other host can take it ({})", why.join("; "))
        })
    }

    /// Migrate `ids` (away from `host`, or to `dest`), `PARALLEL` at a time; the operation's
    /// progress counts finished migrations and its error lists those that failed.
    async fn run_moves(
        &self,
        op_id: &str,
        host_id: &str,
        ids: Vec<String>,
        dest: Option<String>,
        reason: &str,
    ) {
        let started = std::time::Instant::now();
        let total = ids.len().max(1);
        let mut failed: Vec<String> = vec![];
        let mut moved = 0usize;
        let mut done = 0usize;
        for chunk in ids.chunks(PARALLEL) {
            let mut running = vec![];
            for id in chunk {
                let req = MigrateInstance {
                    host: dest.clone(),
                    ..Default::default()
                };
                let started = if reason == PATH_REASON {
                    self.start_path_migration(id, host_id, op_id).await
                } else {
                    self.start_migration(&Scope::system(), id, &req, reason, Some(op_id))
                        .await
                };
                match started {
                    Ok(m) => running.push(m),
                    Err(e) => {
                        failed.push(format!("{id}: {e}"));
                        done += 1;
                    }
                }
            }
            for m in running {
                let end = self.wait_migration(&m.id).await;
                done += 1;
                match end {
                    Some(e) => failed.push(format!("{}: {e}", m.instance_id)),
                    None => {
                        moved += 1;
                        let home = if reason != "return" {
                            Some(host_id)
                        } else {
                            None
                        };
                        let _ = self.store.set_home_host(&m.instance_id, home).await;
                    }
                }
                let _ = self
                    .store
                    .set_operation_progress(op_id, done as f64 / total as f64)
                    .await;
            }
        }
        let error = (!failed.is_empty()).then(|| failed.join("; "));
        let _ = self.store.finish_operation(op_id, error.as_deref()).await;
        let action = if reason != "return" {
            "host.evacuated"
        } else {
            "host.returned"
        };
        self.system_event(
            None,
            action,
            host_id,
            if failed.is_empty() { "ok" } else { "error" },
            Some(format!(
                "{op_id}: {moved} migrated, {} failed in {:.1} s{}",
                failed.len(),
                started.elapsed().as_secs_f64(),
                error.map(|e| format!(": {e}")).unwrap_or_default()
            )),
        )
        .await;
    }

    /// Wait for a migration to end: `None` when it succeeded, else its error.
    async fn wait_migration(&self, id: &str) -> Option<String> {
        loop {
            match self.store.migration_row(id).await {
                Ok(m) if !m.active() => {
                    return (m.step != "done").then(|| m.error.unwrap_or_else(|| "failed".into()))
                }
                Ok(_) => {}
                Err(e) => return Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn item(id: &str, result: &str, reason: Option<String>) -> EvacuationItem {
    EvacuationItem {
        instance_id: id.to_string(),
        result: result.to_string(),
        dest_host: None,
        reason,
        migration_id: None,
    }
}
