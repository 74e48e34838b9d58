//! Backups: the agent of the host holding the disk copies it into the backup repository (a
//! full backup first, then incremental ones from QEMU's dirty bitmaps; a stopped disk is copied
//! whole), verifies it and writes its manifest. Restores flatten a chain into a disk again.
//! Schedules run backups by cron and expire old ones by their retention.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kumo_store::{BackupRow, NewSchedule, OperationRow, ScheduleRow, Scope};
use kumo_types::storage::{CreateBackup, CreateBackupSchedule, JobRequest, RestoreBackup};
use kumo_types::InstanceState;

use crate::{Controller, OpError};

/// How often due schedules are looked for.
const SCHEDULE_TICK: Duration = Duration::from_secs(5);
/// Kept per schedule at most, whatever the retention says.
const KEEP_MAX: u32 = 1000;

/// What to back up: the disk, the host that has it, and the running VM using it, if any.
struct Source {
    project_id: String,
    kind: &'static str,
    id: String,
    host: kumo_store::HostRow,
    vm: Option<(String, String)>,
}

/// A backup the repository holds (its manifest written): (kind, parent, bytes, size).
async fn recorded(repo: &str, b: &BackupRow) -> Option<(String, Option<String>, u64, u64)> {
    let r = kumo_storage::backup::BackupRepo::open(std::path::Path::new(repo)).ok()?;
    let m = r
        .backups(&b.source_id)
        .await
        .ok()?
        .into_iter()
        .find(|m| m.id == b.id)?;
    let kind = match m.kind {
        kumo_storage::backup::BackupKind::Full => "full",
        kumo_storage::backup::BackupKind::Incremental => "incremental",
    };
    Some((kind.into(), m.parent, m.file_bytes, m.virtual_size))
}

fn next_run(cron: &str, after: DateTime<Utc>) -> Result<DateTime<Utc>, OpError> {
    let c: croner::Cron = cron.parse().map_err(|e| {
        OpError::Invalid(format!(
            "schedule {cron:?} is not a cron expression (min hour day month weekday): {e}"
        ))
    })?;
    c.find_next_occurrence(&after, false)
        .map_err(|e| OpError::Invalid(format!("schedule {cron:?} never runs: {e}")))
}

impl Controller {
    async fn backup_source(
        &self,
        scope: &Scope,
        instance: Option<&str>,
        volume: Option<&str>,
    ) -> Result<Source, OpError> {
        match (instance, volume) {
            (Some(i), None) => {
                let inst = self.store.instance(scope, i).await?;
                if matches!(
                    inst.state,
                    InstanceState::Terminated | InstanceState::ShuttingDown
                ) {
                    return Err(OpError::IncorrectState(format!(
                        "instance {} is {}",
                        inst.id, inst.state
                    )));
                }
                let (_, host) = self.instance_domain(&inst).await?;
                let vm = (inst.state != InstanceState::Stopped)
                    .then(|| (inst.id.clone(), crate::storage::ROOT_DEVICE.to_string()));
                Ok(Source {
                    project_id: inst.project_id,
                    kind: "instance",
                    id: inst.id,
                    host,
                    vm,
                })
            }
            (None, Some(v)) => {
                let vol = self.store.volume(scope, v).await?;
                let (vm, prefer) = match (&vol.instance_id, vol.attach_state.as_deref()) {
                    (Some(i), Some("attached")) => {
                        let inst = self.store.instance(&Scope::system(), i).await?;
                        let running = inst.state != InstanceState::Stopped;
                        (
                            running.then(|| (inst.id.clone(), vol.id.clone())),
                            inst.host_id.clone(),
                        )
                    }
                    (Some(_), _) => {
                        return Err(OpError::IncorrectState(format!(
                            "volume {} is being attached or detached; try again",
                            vol.id
                        )))
                    }
                    (None, _) => (None, None),
                };
                // A running VM's disk is backed up by its own host, or not at all.
                let host = match (&vm, &prefer) {
                    (Some(_), Some(h)) => self.up_host(h).await?,
                    _ => self.storage_host(&vol.domain(), prefer.as_deref()).await?,
                };
                Ok(Source {
                    project_id: vol.project_id,
                    kind: "volume",
                    id: vol.id,
                    host,
                    vm,
                })
            }
            _ => Err(OpError::Invalid(
                "give either an instance or a volume to back up".into(),
            )),
        }
    }

    pub(crate) async fn backup_running(&self, source_id: &str) -> Result<bool, OpError> {
        Ok(self
            .store
            .backups(&Scope::system(), Some(source_id))
            .await?
            .iter()
            .any(|b| b.state == "running"))
    }

    /// Start a backup; returns it (`running`) and its operation.
    pub async fn create_backup(
        &self,
        scope: &Scope,
        req: &CreateBackup,
    ) -> Result<(BackupRow, OperationRow), OpError> {
        let rate = req.rate_mib_s.map(|m| m.saturating_mul(1 << 20));
        if rate == Some(0) {
            return Err(OpError::Invalid(
                "a rate of 0 MiB/s would never finish".into(),
            ));
        }
        self.start_backup(
            scope,
            req.instance.as_deref(),
            req.volume.as_deref(),
            (req.full, rate),
            None,
        )
        .await
    }

    async fn start_backup(
        &self,
        scope: &Scope,
        instance: Option<&str>,
        volume: Option<&str>,
        (full, rate): (bool, Option<u64>),
        schedule: Option<&str>,
    ) -> Result<(BackupRow, OperationRow), OpError> {
        let src = self.backup_source(scope, instance, volume).await?;
        // One backup of a disk at a time: they share its dirty bitmaps and its chain.
        if self.backup_running(&src.id).await? {
            return Err(OpError::IncorrectState(format!(
                "a backup of {} is already running",
                src.id
            )));
        }
        let repo = self.cfg.backup_dir.display().to_string();
        let b = self
            .store
            .create_backup(&src.project_id, src.kind, &src.id, &repo, schedule)
            .await?;
        let op = self
            .store
            .create_operation(&src.project_id, "backup", &b.id)
            .await?;
        self.store.set_backup_operation(&b.id, &op.id).await?;
        let job = JobRequest::Backup {
            backup_id: b.id.clone(),
            disk: src.id.clone(),
            vm: src.vm.as_ref().map(|v| v.0.clone()),
            device: src.vm.as_ref().map(|v| v.1.clone()),
            repository: repo.clone(),
            incremental: !full,
            rate,
        };
        let me = self.clone();
        let (b2, op2, host) = (b.clone(), op.clone(), src.host);
        tokio::spawn(async move {
            let res = me.run_job(&host, &job, &op2.id).await;
            let err = match res {
                Ok(Some(m)) => {
                    let kind = m["kind"].as_str().unwrap_or("full").to_string();
                    let parent = m["parent"].as_str().map(str::to_string);
                    let bytes = m["file_bytes"].as_u64().unwrap_or(0);
                    let size = m["virtual_size"].as_u64().unwrap_or(0);
                    me.store
                        .finish_backup(&b2.id, Ok((&kind, parent.as_deref(), bytes, size)))
                        .await
                        .err()
                        .map(|e| e.to_string())
                }
                Ok(None) => Some("the agent returned no manifest".into()),
                // The agent may have finished (manifest written) and died before reporting.
                Err(e) => match recorded(&repo, &b2).await {
                    Some(m) => me
                        .store
                        .finish_backup(&b2.id, Ok((m.0.as_str(), m.1.as_deref(), m.2, m.3)))
                        .await
                        .err()
                        .map(|e| e.to_string()),
                    None => Some(e.to_string()),
                },
            };
            if let Some(e) = &err {
                let _ = me.store.finish_backup(&b2.id, Err(e)).await;
            }
            let _ = me.store.finish_operation(&op2.id, err.as_deref()).await;
            me.system_event(
                Some(&b2.project_id),
                "backup.finished",
                &b2.id,
                if err.is_none() { "ok" } else { "failed" },
                Some(err.unwrap_or_else(|| format!("of {}", b2.source_id))),
            )
            .await;
        });
        Ok((b, op))
    }

    /// Delete a backup; its repository keeps the rest of the chain whole (a middle backup is
    /// merged into its child).
    pub async fn delete_backup(&self, scope: &Scope, id: &str) -> Result<(), OpError> {
        let b = self.store.backup(scope, id).await?;
        if b.state == "running" {
            return Err(OpError::IncorrectState(format!(
                "backup {} is still running",
                b.id
            )));
        }
        if b.state == "completed" {
            let repo = kumo_storage::backup::BackupRepo::open(std::path::Path::new(&b.repository))
                .map_err(|e| OpError::Unavailable(format!("backup repository: {e}")))?;
            repo.delete(&b.source_id, &b.id)
                .await
                .map_err(|e| OpError::Unavailable(format!("backup repository: {e}")))?;
            self.store
                .reparent_backups(&b.id, b.parent_id.as_deref())
                .await?;
        }
        self.store.backup_deleted(&b.id).await?;
        self.system_event(Some(&b.project_id), "backup.deleted", &b.id, "ok", None)
            .await;
        Ok(())
    }

    /// Read a backup's whole chain again and compare it with what was recorded.
    pub async fn verify_backup(&self, scope: &Scope, id: &str) -> Result<BackupRow, OpError> {
        let b = self.store.backup(scope, id).await?;
        if b.state != "completed" {
            return Err(OpError::IncorrectState(format!(
                "backup {} is {}",
                b.id, b.state
            )));
        }
        let repo = kumo_storage::backup::BackupRepo::open(std::path::Path::new(&b.repository))
            .map_err(|e| OpError::Unavailable(format!("backup repository: {e}")))?;
        repo.verify(&b.source_id, &b.id)
            .await
            .map_err(|e| OpError::Conflict(format!("backup {} does not verify: {e}", b.id)))?;
        Ok(b)
    }

    /// Restore a backup in place (instance stopped / volume detached) or as a new instance or
    /// volume. Returns the operation and the target.
    pub async fn restore_backup(
        &self,
        scope: &Scope,
        id: &str,
        req: &RestoreBackup,
    ) -> Result<(OperationRow, String), OpError> {
        let b = self.store.backup(scope, id).await?;
        if b.state != "completed" {
            return Err(OpError::IncorrectState(format!(
                "backup {} is {}, not completed",
                b.id, b.state
            )));
        }
        if req.in_place {
            return self.restore_in_place(scope, &b).await;
        }
        match b.source_kind.as_str() {
            "volume" => self.restore_as_volume(scope, &b, req.name.clone()).await,
            _ => self.restore_as_instance(scope, &b, req.name.clone()).await,
        }
    }

    async fn restore_in_place(
        &self,
        scope: &Scope,
        b: &BackupRow,
    ) -> Result<(OperationRow, String), OpError> {
        let host = if b.source_kind == "instance" {
            let inst = self.store.instance(scope, &b.source_id).await?;
            if inst.state != InstanceState::Stopped {
                return Err(OpError::IncorrectState(format!(
                    "instance {} is {}: stop it to restore its disk in place",
                    inst.id, inst.state
                )));
            }
            self.instance_domain(&inst).await?.1
        } else {
            let vol = self.store.volume(scope, &b.source_id).await?;
            if let Some(i) = &vol.instance_id {
                return Err(OpError::IncorrectState(format!(
                    "volume {} is attached to {i}: detach it to restore it in place",
                    vol.id
                )));
            }
            self.storage_host(&vol.domain(), None).await?
        };
        let job = JobRequest::Restore {
            id: b.source_id.clone(),
            repository: b.repository.clone(),
            backup_disk: b.source_id.clone(),
            backup_id: b.id.clone(),
            in_place: true,
        };
        let op = self
            .store
            .create_operation(&b.project_id, "restore", &b.source_id)
            .await?;
        self.spawn_job(host, job, op.clone(), b.id.clone(), None);
        Ok((op, b.source_id.clone()))
    }

    async fn restore_as_volume(
        &self,
        scope: &Scope,
        b: &BackupRow,
        name: Option<String>,
    ) -> Result<(OperationRow, String), OpError> {
        // Next to the original if it still exists, else wherever there is room.
        let domain = match self.store.volume(scope, &b.source_id).await {
            Ok(v) => v.domain(),
            Err(_) => self.roomiest_domain(None).await?,
        };
        let host = self.storage_host(&domain, None).await?;
        let size = b.virtual_size.unwrap_or(0);
        let vol = self
            .store
            .create_volume(
                scope,
                &kumo_store::NewVolume {
                    name,
                    size_bytes: size,
                    domain,
                    snapshot_id: None,
                },
            )
            .await?;
        let job = JobRequest::Restore {
            id: vol.id.clone(),
            repository: b.repository.clone(),
            backup_disk: b.source_id.clone(),
            backup_id: b.id.clone(),
            in_place: false,
        };
        let op = self
            .store
            .create_operation(&b.project_id, "restore", &vol.id)
            .await?;
        self.spawn_job(host, job, op.clone(), b.id.clone(), Some(vol.id.clone()));
        Ok((op, vol.id))
    }

    /// A new instance from an instance backup: the chain flattened into a disk on a host,
    /// frozen as a snapshot, and the snapshot booted (the same path as booting any snapshot).
    async fn restore_as_instance(
        &self,
        scope: &Scope,
        b: &BackupRow,
        name: Option<String>,
    ) -> Result<(OperationRow, String), OpError> {
        let name = name.ok_or_else(|| {
            OpError::Invalid("give the restored instance a name (or restore in place)".into())
        })?;
        kumo_types::id::validate_name(&name).map_err(OpError::Invalid)?;
        let src = self.store.instance(&Scope::system(), &b.source_id).await?;
        let domain = match self.instance_domain(&src).await {
            Ok((d, _)) if src.state != InstanceState::Terminated => d,
            _ => self.roomiest_domain(None).await?,
        };
        let host = self.storage_host(&domain, None).await?;
        let op = self
            .store
            .create_operation(&b.project_id, "restore", &b.id)
            .await?;
        let me = self.clone();
        let (b2, op2, scope2) = (b.clone(), op.clone(), scope.clone());
        tokio::spawn(async move {
            let res = me
                .restore_instance_steps(&scope2, &b2, &src, &domain, &host, &name, &op2.id)
                .await;
            let err = res.as_ref().err().map(|e| e.to_string());
            let _ = me.store.finish_operation(&op2.id, err.as_deref()).await;
            me.system_event(
                Some(&b2.project_id),
                "backup.restored",
                &b2.id,
                if err.is_none() { "ok" } else { "failed" },
                Some(match res {
                    Ok(i) => format!("as instance {i}"),
                    Err(e) => e.to_string(),
                }),
            )
            .await;
        });
        Ok((op, b.id.clone()))
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_instance_steps(
        &self,
        scope: &Scope,
        b: &BackupRow,
        src: &kumo_store::InstanceRow,
        domain: &kumo_store::Domain,
        host: &kumo_store::HostRow,
        name: &str,
        op: &str,
    ) -> Result<String, OpError> {
        let disk = format!("restore-{}", b.id);
        let job = JobRequest::Restore {
            id: disk.clone(),
            repository: b.repository.clone(),
            backup_disk: b.source_id.clone(),
            backup_id: b.id.clone(),
            in_place: false,
        };
        self.run_job(host, &job, op).await?;
        let snap = self
            .store
            .create_snapshot(
                scope,
                &kumo_store::NewSnapshot {
                    description: Some(format!("restored from backup {}", b.id)),
                    source_kind: "instance",
                    source_id: src.id.clone(),
                    size_bytes: b.virtual_size.unwrap_or(0),
                    domain: domain.clone(),
                    image_id: Some(src.image_id.clone()),
                },
            )
            .await?;
        let taken = self
            .agents()
            .take_snapshot(
                host,
                &kumo_types::storage::TakeSnapshot {
                    snapshot_id: snap.id.clone(),
                    disk: disk.clone(),
                    vm: None,
                    device: None,
                },
            )
            .await
            .map_err(Self::storage_error);
        // The snapshot pins the restored layer; the temporary disk itself can go.
        let _ = self.agents().delete_disk(host, &disk).await;
        let taken = match taken {
            Ok(t) => t,
            Err(e) => {
                self.store
                    .finish_snapshot(&snap.id, Err(&e.to_string()), None)
                    .await?;
                return Err(e);
            }
        };
        self.store
            .finish_snapshot(&snap.id, Ok(None), Some(taken.size_bytes))
            .await?;
        let inst = self
            .create_instance(
                scope,
                &kumo_types::api::CreateInstance {
                    name: name.to_string(),
                    snapshot: Some(snap.id.clone()),
                    instance_type: Some(src.instance_type.clone()),
                    network: Some(src.network_id.clone()),
                    security_groups: src.security_group_ids.clone(),
                    key_name: src.key_name.clone(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(inst.id)
    }

    /// Run a restore job in the background, finishing its operation (and the new volume).
    fn spawn_job(
        &self,
        host: kumo_store::HostRow,
        job: JobRequest,
        op: OperationRow,
        backup_id: String,
        new_volume: Option<String>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let res = me.run_job(&host, &job, &op.id).await;
            let err = res.err().map(|e| e.to_string());
            if let Some(v) = &new_volume {
                let _ = match &err {
                    None => me.store.set_volume_state(v, "available", None).await,
                    Some(_) => me.store.volume_deleted(v).await,
                };
            }
            let _ = me.store.finish_operation(&op.id, err.as_deref()).await;
            me.system_event(
                Some(&op.project_id),
                "backup.restored",
                &backup_id,
                if err.is_none() { "ok" } else { "failed" },
                Some(err.unwrap_or_else(|| format!("into {}", op.target_id))),
            )
            .await;
        });
    }

    pub async fn create_backup_schedule(
        &self,
        scope: &Scope,
        req: &CreateBackupSchedule,
    ) -> Result<ScheduleRow, OpError> {
        let src = self
            .backup_source(scope, req.instance.as_deref(), req.volume.as_deref())
            .await?;
        let keep = [
            req.keep_last,
            req.keep_hourly,
            req.keep_daily,
            req.keep_weekly,
        ];
        if keep.iter().all(|k| *k == 0) || keep.iter().any(|k| *k > KEEP_MAX) {
            return Err(OpError::Invalid(format!(
                "retention: keep at least one backup (keep_last, keep_hourly, keep_daily, keep_weekly), at most {KEEP_MAX} each"
            )));
        }
        let next = next_run(&req.cron, Utc::now())?;
        Ok(self
            .store
            .create_schedule(
                scope,
                &NewSchedule {
                    source_kind: src.kind,
                    source_id: src.id,
                    cron: req.cron.clone(),
                    keep,
                    next_run: next,
                },
            )
            .await?)
    }

    pub(crate) async fn schedule_loop(&self) {
        loop {
            if let Err(e) = self.run_due_schedules(Utc::now()).await {
                tracing::warn!(error = %e, "backup schedules");
            }
            tokio::time::sleep(SCHEDULE_TICK).await;
        }
    }

    /// Start the backups that are due and expire what their retention no longer keeps.
    pub async fn run_due_schedules(&self, now: DateTime<Utc>) -> Result<usize, OpError> {
        let mut started = 0;
        for s in self.store.due_schedules(now).await? {
            let Some(due) = s.next_run else { continue };
            let next = next_run(&s.cron, now).ok();
            if !self.store.advance_schedule(&s.id, due, next).await? {
                continue;
            }
            // A slot whose previous backup still runs is skipped, not failed.
            let busy = self
                .store
                .backups(&Scope::system(), Some(&s.source_id))
                .await?
                .iter()
                .any(|b| b.state == "running");
            if busy {
                self.system_event(
                    Some(&s.project_id),
                    "backup.schedule",
                    &s.id,
                    "skipped",
                    Some("the previous backup is still running".into()),
                )
                .await;
                continue;
            }
            self.expire_backups(&s).await;
            let scope = Scope {
                project_id: s.project_id.clone(),
                user_id: "system".into(),
                admin: false,
            };
            let (i, v) = match s.source_kind.as_str() {
                "volume" => (None, Some(s.source_id.as_str())),
                _ => (Some(s.source_id.as_str()), None),
            };
            // A schedule ends with its instance or volume.
            let gone = match (i, v) {
                (Some(i), _) => self
                    .store
                    .instance(&Scope::system(), i)
                    .await
                    .map(|r| r.state == InstanceState::Terminated)
                    .unwrap_or(true),
                (_, Some(v)) => self.store.volume(&Scope::system(), v).await.is_err(),
                _ => true,
            };
            if gone {
                self.store.delete_schedules_of(&s.source_id).await?;
                self.system_event(
                    Some(&s.project_id),
                    "backup.schedule",
                    &s.id,
                    "deleted",
                    Some(format!("{} is gone", s.source_id)),
                )
                .await;
                continue;
            }
            match self
                .start_backup(&scope, i, v, (false, None), Some(&s.id))
                .await
            {
                Ok(_) => started += 1,
                Err(e) => {
                    self.system_event(
                        Some(&s.project_id),
                        "backup.schedule",
                        &s.id,
                        "failed",
                        Some(e.to_string()),
                    )
                    .await
                }
            }
        }
        Ok(started)
    }

    /// Delete the schedule's completed backups its retention does not keep.
    async fn expire_backups(&self, s: &ScheduleRow) {
        let Ok(all) = self
            .store
            .backups(&Scope::system(), Some(&s.source_id))
            .await
        else {
            return;
        };
        let done: Vec<(String, DateTime<Utc>)> = all
            .iter()
            .filter(|b| b.state == "completed")
            .map(|b| (b.id.clone(), b.created_at))
            .collect();
        let policy = kumo_storage::backup::Retention {
            last: s.keep_last,
            hourly: s.keep_hourly,
            daily: s.keep_daily,
            weekly: s.keep_weekly,
        };
        for id in kumo_storage::backup::expired(&done, &policy) {
            if let Err(e) = self.delete_backup(&Scope::system(), &id).await {
                tracing::warn!(backup = %id, error = %e, "could not expire a backup");
            }
        }
    }
}
