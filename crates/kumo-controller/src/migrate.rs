//! Live migration as a resumable operation. Steps (persisted before each irreversible action):
//!
//! - `prepare`: the destination makes its disks (storage migration), renders the port and starts
//!   a paused QEMU waiting for the stream;
//! - `transfer`: the source agent's job mirrors the disks and migrates the memory; the source ends
//!   paused, the destination has everything but has not run;
//! - `switch` (point of no return, in one transaction with moving the instance): the destination
//!   runs it, the elastic IP follows;
//! - `cleanup`: the source forgets its paused copy (and its disk, unless the pool is shared);
//! - `done`, or on any failure before `switch`: `rollback` (the source resumes, the destination
//!   removes what it made) then `failed`.
//!
//! A restarted controller rolls back migrations that had not switched and finishes those that had.

use std::time::{Duration, Instant};

use kumo_scheduler::{HostView, Refusal, Request};
use kumo_store::{HostRow, MigrationRow, NewMigration, Scope, StoreError};
use kumo_types::migration::{
    CommitIncoming, IncomingRequest, MigrateInstance, MigrateOut, Migration, DEFAULT_DOWNTIME_MS,
    MAX_DOWNTIME_MS,
};
use kumo_types::storage::JobRequest;

use crate::{AgentClient, Controller, OpError};

/// How often the source's job is read: its end pauses the guest until the destination is
/// committed, so it is read often (a cheap local call on the agent).
const POLL: Duration = Duration::from_millis(50);
/// How long the source agent may stay silent during the transfer before the migration is rolled back.
const SOURCE_SILENCE: Duration = Duration::from_secs(30);
/// Between attempts of a rollback or commit call to a host that does not answer.
const RETRY: Duration = Duration::from_secs(2);

impl Controller {
    /// Start a live migration of a running instance (to `req.host`, or where placement says).
    pub async fn migrate_instance(
        &self,
        scope: &Scope,
        id: &str,
        req: &MigrateInstance,
    ) -> Result<Migration, OpError> {
        let m = self.start_migration(scope, id, req, "user", None).await?;
        self.migration_view(&m).await
    }

    /// Validate, choose the destination, record the migration and run it in the background.
    pub(crate) async fn start_migration(
        &self,
        scope: &Scope,
        id: &str,
        req: &MigrateInstance,
        reason: &str,
        evacuation: Option<&str>,
    ) -> Result<MigrationRow, OpError> {
        let downtime_ms = req.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
        if downtime_ms == 0 || downtime_ms > MAX_DOWNTIME_MS {
            return Err(OpError::Invalid(format!(
                "downtime_ms must be 1 to {MAX_DOWNTIME_MS}, got {downtime_ms}"
            )));
        }
        if req.bandwidth == Some(0) {
            return Err(OpError::Invalid(
                "bandwidth must be more than 0 bytes a second (leave it out for unlimited)".into(),
            ));
        }
        let row = self.store.instance(scope, id).await?;
        let volumes = self.store.instance_volumes(&row.id).await?;
        let network = self.store.network(&row.network_id).await?;
        let hosts: std::collections::HashMap<String, HostRow> = self
            .store
            .hosts()
            .await?
            .into_iter()
            .map(|h| (h.id.clone(), h))
            .collect();
        let constraints =
            kumo_scheduler::parse_constraints(&row.constraints).map_err(OpError::Invalid)?;
        let policy = self.cfg.policy;
        let want = req.host.clone();
        let (m, _) = self
            .store
            .create_migration(scope, &row.id, |p, row| {
                let source = row
                    .host_id
                    .as_deref()
                    .and_then(|h| p.host(h))
                    .ok_or_else(|| StoreError::Conflict(format!("instance {} has no host", row.id)))?;
                let request = Request {
                    vcpus: row.vcpus,
                    memory_mib: row.memory_mib,
                    disk_gib: row.disk_gib,
                    site: row.requested_site.clone(),
                    constraints: constraints.clone(),
                    // Moving instances off a host may use the hosts kept free for it.
                    allow_spare: reason != "user",
                    group: None,
                    pool_key: None,
                };
                // What placement does not know: the network and the volumes must follow.
                let reach = |h: &HostView| -> Result<(), String> {
                    if network.isolation == "vxlan"
                        && hosts.get(&h.id).is_none_or(|r| r.tunnel_ip.is_empty())
                    {
                        return Err(format!(
                            "it has no VXLAN tunnel address, so it cannot carry network {}",
                            network.id
                        ));
                    }
                    if h.pool_key() != source.pool_key() {
                        if let Some(v) = volumes.iter().find(|v| v.host_id.is_none()) {
                            return Err(format!(
                                "volume {} lives in shared pool {}, which it does not reach (detach the volume first)",
                                v.id, v.pool
                            ));
                        }
                    }
                    Ok(())
                };
                let dest = match &want {
                    Some(w) => {
                        let h = p
                            .hosts()
                            .iter()
                            .find(|h| &h.id == w || &h.name == w)
                            .ok_or_else(|| StoreError::NotFound {
                                kind: "host",
                                id: w.clone(),
                            })?;
                        if h.id == source.id {
                            return Err(StoreError::Invalid(format!(
                                "instance {} already runs on host {}",
                                row.id, h.name
                            )));
                        }
                        match kumo_scheduler::judge(h, &request, &policy.for_host(h)) {
                            Ok(_) => {}
                            Err(r @ (Refusal::Full { .. } | Refusal::Never { .. })) => {
                                return Err(StoreError::NoCapacity(format!("host {}: {r}", h.name)))
                            }
                            Err(r @ Refusal::State(_)) => {
                                return Err(StoreError::Conflict(format!("host {}: {r}", h.name)))
                            }
                            Err(r) => {
                                return Err(StoreError::Invalid(format!("host {}: {r}", h.name)))
                            }
                        }
                        reach(h).map_err(|e| {
                            StoreError::Invalid(format!("host {} cannot take it: {e}", h.name))
                        })?;
                        h
                    }
                    None => {
                        let mut why = vec![];
                        let candidates: Vec<HostView> = p
                            .hosts()
                            .iter()
                            .filter(|h| h.id != source.id)
                            .filter(|h| match reach(h) {
                                Ok(()) => true,
                                Err(e) => {
                                    why.push(format!("{}: {e}", h.name));
                                    false
                                }
                            })
                            .cloned()
                            .collect();
                        let i = kumo_scheduler::choose(&candidates, &request, &policy).map_err(
                            |e| {
                                why.push(e);
                                StoreError::NoCapacity(format!(
                                    "no other host can take instance {}: {}",
                                    row.id,
                                    why.join("; ")
                                ))
                            },
                        )?;
                        p.host(&candidates[i].id).ok_or_else(|| {
                            StoreError::NoCapacity("the chosen host vanished".into())
                        })?
                    }
                };
                let mode = if dest.pool_key() == source.pool_key() {
                    "shared"
                } else {
                    "storage"
                };
                Ok(NewMigration {
                    dest_host: dest.id.clone(),
                    mode: mode.into(),
                    reason: reason.into(),
                    downtime_ms,
                    auto_converge: req.auto_converge,
                    bandwidth: req.bandwidth,
                    evacuation_id: evacuation.map(str::to_string),
                })
            })
            .await?;
        self.system_event(
            Some(&m.project_id),
            "instance.migration.started",
            &m.instance_id,
            "ok",
            Some(format!(
                "{} from {} to {} ({} migration, {})",
                m.id, m.source_host, m.dest_host, m.mode, m.reason
            )),
        )
        .await;
        let me = self.clone();
        let run = m.clone();
        tokio::spawn(async move { me.drive_migration(run).await });
        Ok(m)
    }

    pub async fn migration(&self, scope: &Scope, id: &str) -> Result<Migration, OpError> {
        let m = self.store.migration(scope, id).await?;
        self.migration_view(&m).await
    }

    pub async fn migrations(
        &self,
        scope: &Scope,
        instance: Option<&str>,
    ) -> Result<Vec<Migration>, OpError> {
        let instance = match instance {
            Some(i) => Some(self.store.instance(scope, i).await?.id),
            None => None,
        };
        let mut out = vec![];
        for m in self
            .store
            .migrations(scope, instance.as_deref(), 200)
            .await?
        {
            out.push(self.migration_view(&m).await?);
        }
        Ok(out)
    }

    /// Stop a migration that has not switched yet: it rolls back and the instance stays where it was.
    pub async fn cancel_migration(&self, scope: &Scope, id: &str) -> Result<Migration, OpError> {
        let m = self.store.migration(scope, id).await?;
        match m.step.as_str() {
            "prepare" | "transfer" => {}
            "rollback" | "failed" => return self.migration_view(&m).await,
            _ => {
                return Err(OpError::IncorrectState(format!(
                    "migration {} is {}: too late to cancel",
                    m.id, m.step
                )))
            }
        }
        self.store.set_migration_error(&m.id, "cancelled").await?;
        if let (Some(job), Ok(src)) = (&m.job_id, self.store.host(&m.source_host).await) {
            if let Err(e) = self.agents().cancel_job(&src, job).await {
                tracing::warn!(migration = %m.id, error = %e, "could not cancel the source's job; it will be rolled back when it ends");
            }
        }
        let m = self.store.migration(scope, id).await?;
        self.migration_view(&m).await
    }

    async fn migration_view(&self, m: &MigrationRow) -> Result<Migration, OpError> {
        let progress = self
            .store
            .operation(&Scope::system(), &m.id)
            .await
            .map(|o| o.progress)
            .unwrap_or(0.0);
        Ok(Migration {
            id: m.id.clone(),
            instance_id: m.instance_id.clone(),
            source_host: m.source_host.clone(),
            dest_host: m.dest_host.clone(),
            mode: m.mode.clone(),
            step: m.step.clone(),
            reason: m.reason.clone(),
            progress,
            downtime_ms: m.downtime_ms,
            auto_converge: m.auto_converge,
            bandwidth: m.bandwidth,
            stats: m
                .stats
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            error: m.error.clone(),
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }

    /// Run a migration to its end: done, or rolled back. Called for a new migration (`prepare`)
    /// and, after a restart, for one past its switch; those before it are rolled back instead
    /// (see `recover_migrations`).
    pub(crate) async fn drive_migration(&self, m: MigrationRow) {
        let started = Instant::now();
        let result = if matches!(m.step.as_str(), "switch" | "cleanup") {
            Ok((None, None))
        } else {
            self.transfer(&m).await
        };
        match result {
            Ok((stats, seen)) => {
                self.finish_switch(&m, stats, seen, started).await;
            }
            Err(e) => {
                let msg = if self.cancelled(&m).await {
                    "cancelled by the user".to_string()
                } else {
                    e.to_string()
                };
                self.roll_back(&m, &msg).await;
            }
        }
    }

    /// `prepare` and `transfer`; the source's report, and when its end was seen (the guest is
    /// paused from then until the destination is committed).
    async fn transfer(
        &self,
        m: &MigrationRow,
    ) -> Result<(Option<serde_json::Value>, Option<Instant>), OpError> {
        let src = self.store.host(&m.source_host).await?;
        let dst = self.store.host(&m.dest_host).await?;
        let row = self
            .store
            .instance(&Scope::system(), &m.instance_id)
            .await?;
        let disks = if m.mode == "storage" {
            self.agents().source_disks(&src, &row.id).await?
        } else {
            vec![]
        };
        let desired = self.desired_spec(&row).await?;
        let target = self
            .agents()
            .start_incoming(&dst, &IncomingRequest { desired, disks })
            .await?;
        self.store.set_operation_progress(&m.id, 0.05).await?;
        if self.cancelled(m).await {
            return Err(OpError::Conflict("cancelled".into()));
        }
        let job = self
            .agents()
            .start_job(
                &src,
                &JobRequest::Migrate(MigrateOut {
                    vm: row.id.clone(),
                    target,
                    downtime_ms: m.downtime_ms,
                    auto_converge: m.auto_converge,
                    bandwidth: m.bandwidth,
                }),
            )
            .await?;
        self.store
            .set_migration_step(&m.id, "transfer", Some(&job.id))
            .await?;
        let mut last_ok = Instant::now();
        let mut last_progress = -1.0;
        let report = loop {
            tokio::time::sleep(POLL).await;
            let j = match self.agents().job(&src, &job.id).await {
                Ok(j) => j,
                Err(e) if AgentClient::is_not_found(&e) => {
                    return Err(OpError::Unavailable(
                        "the source's agent restarted and lost the migration".into(),
                    ))
                }
                Err(e) if last_ok.elapsed() > SOURCE_SILENCE => return Err(e.into()),
                Err(_) => continue,
            };
            last_ok = Instant::now();
            if (j.progress - last_progress).abs() >= 0.01 {
                last_progress = j.progress;
                let _ = self
                    .store
                    .set_operation_progress(&m.id, 0.05 + 0.9 * j.progress)
                    .await;
            }
            match j.state.as_str() {
                "running" => continue,
                "succeeded" => break (j.result, Instant::now()),
                _ => {
                    return Err(OpError::Conflict(
                        j.error.unwrap_or_else(|| "the migration failed".into()),
                    ))
                }
            }
        };
        // The destination must hold the whole stream before anything is switched. The source
        // ends once the destination has loaded it (return path), but the destination's own
        // status may say so a moment later.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let state = self.agents().incoming_state(&dst, &row.id).await?;
            if state.completed {
                break;
            }
            if Instant::now() >= deadline {
                return Err(OpError::Conflict(
                    "the destination did not receive the whole migration".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dest_pool = dst.pool_name.clone();
        self.store.switch_migration(m, &dest_pool).await?;
        self.store.set_operation_progress(&m.id, 0.97).await?;
        Ok((report.0, Some(report.1)))
    }

    async fn cancelled(&self, m: &MigrationRow) -> bool {
        matches!(self.store.migration_row(&m.id).await, Ok(cur) if cur.error.as_deref() == Some("cancelled"))
    }

    /// From `switch` on: the destination runs the VM (retried until it does), the source forgets it.
    async fn finish_switch(
        &self,
        m: &MigrationRow,
        report: Option<serde_json::Value>,
        seen: Option<Instant>,
        started: Instant,
    ) {
        let lease_ms = Some(self.cfg.lease_ttl.as_millis() as u64);
        loop {
            let res = async {
                let dst = self.store.host(&m.dest_host).await?;
                self.agents()
                    .commit_incoming(&dst, &m.instance_id, &CommitIncoming { lease_ms })
                    .await?;
                Ok::<_, OpError>(())
            }
            .await;
            match res {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(migration = %m.id, error = %e, "destination did not commit yet; retrying (the migration is past its switch)");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        // From the source's end (paused) to the destination running, as seen from here: the
        // guest's pause is QEMU's downtime plus this (plus up to one poll).
        let switch_ms = seen.map(|t| t.elapsed().as_millis() as u64);
        let _ = self.store.set_migration_step(&m.id, "cleanup", None).await;
        self.wake();
        let keep_disk = m.mode == "shared";
        let volumes: Vec<String> = if keep_disk {
            vec![]
        } else {
            self.store
                .instance_volumes(&m.instance_id)
                .await
                .map(|v| v.into_iter().map(|v| v.id).collect())
                .unwrap_or_default()
        };
        // Best effort: a source that does not answer is told again by its next heartbeat.
        let cleaned = async {
            let src = self.store.host(&m.source_host).await?;
            self.agents()
                .delete_vm(&src, &m.instance_id, keep_disk)
                .await?;
            for v in &volumes {
                self.agents().delete_disk(&src, v).await?;
            }
            Ok::<_, OpError>(())
        }
        .await;
        if let Err(e) = &cleaned {
            tracing::warn!(migration = %m.id, error = %e, "the source's copy was not removed yet");
        }
        let stats = report.map(|mut r| {
            if let Some(o) = r.as_object_mut() {
                o.insert(
                    "controller_ms".into(),
                    serde_json::json!(started.elapsed().as_millis() as u64),
                );
                if let Some(ms) = switch_ms {
                    o.insert("switch_ms".into(), serde_json::json!(ms));
                }
            }
            r
        });
        let stats_text = stats.as_ref().map(|s| s.to_string());
        if let Err(e) = self
            .store
            .finish_migration(m, None, stats_text.as_deref())
            .await
        {
            tracing::warn!(migration = %m.id, error = %e, "could not record the migration's end");
        }
        self.system_event(
            Some(&m.project_id),
            "instance.migrated",
            &m.instance_id,
            "ok",
            Some(format!(
                "{} from {} to {} ({}): {}",
                m.id,
                m.source_host,
                m.dest_host,
                m.mode,
                stats_text.unwrap_or_else(|| "resumed after a controller restart".into())
            )),
        )
        .await;
    }

    /// Before the switch: the source runs the VM again (retried until its host answers: the VM's
    /// state is only known there), then the destination removes all it made. A destination that
    /// does not answer is cleaned in the background once it does; the migration has failed already.
    async fn roll_back(&self, m: &MigrationRow, error: &str) {
        tracing::warn!(migration = %m.id, instance = %m.instance_id, error, "migration failed; rolling back");
        let _ = self.store.set_migration_step(&m.id, "rollback", None).await;
        let mut attempts = 0u32;
        while !self.roll_back_source(m).await {
            attempts += 1;
            if attempts % 15 == 1 {
                tracing::warn!(migration = %m.id, "the source has not resumed the instance yet; retrying");
            }
            tokio::time::sleep(RETRY).await;
        }
        let dest_done = self.clean_destination(m).await;
        if !dest_done {
            let _ = self.store.set_dest_pending(&m.id, true).await;
        }
        if let Err(e) = self.store.finish_migration(m, Some(error), None).await {
            tracing::warn!(migration = %m.id, error = %e, "could not record the migration's end");
        }
        self.system_event(
            Some(&m.project_id),
            "instance.migration.failed",
            &m.instance_id,
            "error",
            Some(format!(
                "{} from {} to {}: {error}; rolled back, the instance runs on {}{}",
                m.id,
                m.source_host,
                m.dest_host,
                m.source_host,
                if dest_done {
                    ""
                } else {
                    "; the destination is cleaned when it answers again"
                }
            )),
        )
        .await;
        if !dest_done {
            let me = self.clone();
            let m = m.clone();
            tokio::spawn(async move { me.clean_destination_until_done(&m).await });
        }
    }

    /// Ask the destination to remove the incoming VM and what it made; true once it has.
    async fn clean_destination(&self, m: &MigrationRow) -> bool {
        match self.store.host(&m.dest_host).await {
            Ok(dst) => match self.agents().abort_incoming(&dst, &m.instance_id).await {
                Ok(()) => true,
                Err(e) if AgentClient::is_not_found(&e) => true,
                Err(e) => {
                    tracing::debug!(migration = %m.id, error = %e, "destination not cleaned yet");
                    false
                }
            },
            Err(StoreError::NotFound { .. }) => true,
            Err(_) => false,
        }
    }

    async fn clean_destination_until_done(&self, m: &MigrationRow) {
        while !self.clean_destination(m).await {
            tokio::time::sleep(RETRY).await;
        }
        let _ = self.store.set_dest_pending(&m.id, false).await;
        tracing::info!(migration = %m.id, "the destination of a failed migration is clean");
    }

    /// Cancel the source's job and resume the VM there; true once done (or nothing is left to do).
    async fn roll_back_source(&self, m: &MigrationRow) -> bool {
        let Ok(src) = self.store.host(&m.source_host).await else {
            return false;
        };
        if let Some(job) = &m.job_id {
            let _ = self.agents().cancel_job(&src, job).await;
        }
        // Fresh job id: the transfer may have recorded it after `m` was read.
        if let Ok(cur) = self.store.migration_row(&m.id).await {
            if let (Some(job), true) = (&cur.job_id, cur.job_id != m.job_id) {
                let _ = self.agents().cancel_job(&src, job).await;
            }
        }
        match self.agents().resume_source(&src, &m.instance_id).await {
            Ok(()) => true,
            // The VM is gone from the source (terminated meanwhile): nothing to resume.
            Err(e) if AgentClient::is_not_found(&e) => true,
            Err(e) => {
                tracing::warn!(migration = %m.id, error = %e, "source not resumed yet");
                false
            }
        }
    }

    /// Migrations in flight when the previous controller stopped.
    pub(crate) async fn recover_migrations(&self) -> Result<(), OpError> {
        for m in self.store.migrations_pending_cleanup().await? {
            let me = self.clone();
            tokio::spawn(async move { me.clean_destination_until_done(&m).await });
        }
        for m in self.store.active_migrations().await? {
            tracing::info!(migration = %m.id, step = %m.step, "resuming a migration after a restart");
            let me = self.clone();
            tokio::spawn(async move {
                match m.step.as_str() {
                    "switch" | "cleanup" => me.drive_migration(m).await,
                    _ => {
                        me.roll_back(&m, "the controller restarted during the migration")
                            .await
                    }
                }
            });
        }
        Ok(())
    }
}
