//! Volume operations. A volume row is written first (`creating`), the agent makes the disk,
//! then the row becomes `available`; if the agent fails, the row is deleted again so nothing
//! half-made stays behind. Attach, detach and online growth change the instance's desired spec;
//! the agent hot-plugs and reports, the reconciler folds the report in.

use std::time::Duration;

use kumo_store::{Domain, NewVolume, OperationRow, Scope, VolumeRow};
use kumo_types::storage::{
    AttachVolume, CopyVolume, CreateDisk, CreateVolume, DiskSource, JobRequest, ResizeVolume,
};
use kumo_types::InstanceState;

use crate::{Controller, OpError};

/// How often a long agent job is polled for progress.
pub(crate) const JOB_POLL: Duration = Duration::from_millis(500);

impl Controller {
    pub async fn create_volume(
        &self,
        scope: &Scope,
        req: &CreateVolume,
    ) -> Result<VolumeRow, OpError> {
        let snapshot = match &req.snapshot {
            Some(id) => {
                let s = self.store.snapshot(scope, id).await?;
                if s.state != "completed" {
                    return Err(OpError::IncorrectState(format!(
                        "snapshot {} is {}, not completed",
                        s.id, s.state
                    )));
                }
                Some(s)
            }
            None => None,
        };
        let size = match (req.size_bytes, &snapshot) {
            (Some(s), Some(snap)) if s < snap.size_bytes => {
                return Err(OpError::Invalid(format!(
                    "a volume made from snapshot {} has at least its {} bytes (asked: {s})",
                    snap.id, snap.size_bytes
                )))
            }
            (Some(s), _) => s,
            (None, Some(snap)) => snap.size_bytes,
            (None, None) => {
                return Err(OpError::Invalid(
                    "give the volume's size (size_bytes) or a snapshot to make it from".into(),
                ))
            }
        };
        let instance = match &req.instance {
            Some(i) => Some(self.store.instance(scope, i).await?),
            None => None,
        };
        // Where it goes: the snapshot's pool (copy-on-write needs its layer), else the
        // instance's, else the named pool, else the roomiest.
        let domain = if let Some(s) = &snapshot {
            s.domain()
        } else if let Some(i) = &instance {
            let host_id = i.host_id.clone().ok_or_else(|| {
                OpError::IncorrectState(format!("instance {} has no host yet", i.id))
            })?;
            kumo_store::Store::domain_of(&self.store.host(&host_id).await?)
        } else {
            self.roomiest_domain(req.pool.as_deref()).await?
        };
        if let (Some(p), true) = (&req.pool, snapshot.is_some() || instance.is_some()) {
            if p != &domain.pool {
                return Err(OpError::Invalid(format!(
                    "the volume must be in storage pool {} (where its snapshot or instance is), not {p}",
                    domain.pool
                )));
            }
        }
        let host = self
            .storage_host(
                &domain,
                instance.as_ref().and_then(|i| i.host_id.as_deref()),
            )
            .await?;
        let vol = self
            .store
            .create_volume(
                scope,
                &NewVolume {
                    name: req.name.clone(),
                    size_bytes: size,
                    domain,
                    snapshot_id: snapshot.as_ref().map(|s| s.id.clone()),
                },
            )
            .await?;
        let source = match &snapshot {
            Some(s) => DiskSource::Snapshot { id: s.id.clone() },
            None => DiskSource::Blank,
        };
        let made = self
            .agents()
            .create_disk(
                &host,
                &vol.id,
                &CreateDisk {
                    size_bytes: size,
                    source,
                },
            )
            .await;
        if let Err(e) = made {
            // Nothing half-made: the row goes (its id stays used) and the agent cleaned up.
            self.store.volume_deleted(&vol.id).await?;
            return Err(Self::storage_error(e));
        }
        self.store
            .set_volume_state(&vol.id, "available", None)
            .await?;
        self.system_event(Some(&vol.project_id), "volume.created", &vol.id, "ok", None)
            .await;
        Ok(self.store.volume(scope, &vol.id).await?)
    }

    pub async fn attach_volume(
        &self,
        scope: &Scope,
        id: &str,
        req: &AttachVolume,
    ) -> Result<VolumeRow, OpError> {
        let vol = self.store.volume(scope, id).await?;
        let inst = self.store.instance(scope, &req.instance).await?;
        // Administrators see every project; a volume still only goes to its own project's VMs.
        if inst.project_id != vol.project_id {
            return Err(OpError::Invalid(format!(
                "volume {} and instance {} belong to different projects",
                vol.id, inst.id
            )));
        }
        if matches!(
            inst.state,
            InstanceState::Terminated | InstanceState::ShuttingDown
        ) {
            return Err(OpError::IncorrectState(format!(
                "instance {} is {}",
                inst.id, inst.state
            )));
        }
        if vol.state != "available" {
            return Err(OpError::IncorrectState(format!(
                "volume {} is {}{}",
                vol.id,
                vol.state,
                vol.instance_id
                    .as_deref()
                    .map(|i| format!(" (attached to {i})"))
                    .unwrap_or_default()
            )));
        }
        let host_id = inst
            .host_id
            .clone()
            .ok_or_else(|| OpError::IncorrectState(format!("instance {} has no host", inst.id)))?;
        let host = self.store.host(&host_id).await?;
        let reachable = match &vol.host_id {
            Some(h) => h == &host.id,
            None => host.pool_name == vol.pool,
        };
        if !reachable {
            return Err(OpError::Invalid(format!(
                "volume {} lives in storage pool {}{}; instance {} runs on host {} (pool {}): \
                 make the volume next to the instance (or use a shared pool)",
                vol.id,
                vol.pool,
                vol.host_id
                    .as_deref()
                    .map(|h| format!(" on host {h}"))
                    .unwrap_or_default(),
                inst.id,
                host.name,
                host.pool_name
            )));
        }
        let vol = self
            .store
            .attach_volume(&vol, &inst.id)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })?;
        self.wake();
        Ok(vol)
    }

    pub async fn detach_volume(&self, scope: &Scope, id: &str) -> Result<VolumeRow, OpError> {
        let vol = self.store.volume(scope, id).await?;
        if vol.instance_id.is_none() {
            return Err(OpError::IncorrectState(format!(
                "volume {} is not attached",
                vol.id
            )));
        }
        if self.backup_running(&vol.id).await? {
            return Err(OpError::IncorrectState(format!(
                "a backup of volume {} is running: detach it when the backup ends",
                vol.id
            )));
        }
        let vol = self.store.detach_volume(&vol).await?;
        self.wake();
        Ok(vol)
    }

    /// Grow a volume: online through the instance's spec if attached, else by the agent.
    pub async fn resize_volume(
        &self,
        scope: &Scope,
        id: &str,
        req: &ResizeVolume,
    ) -> Result<VolumeRow, OpError> {
        let vol = self.store.volume(scope, id).await?;
        if !matches!(vol.state.as_str(), "available" | "in-use") {
            return Err(OpError::IncorrectState(format!(
                "volume {} is {}",
                vol.id, vol.state
            )));
        }
        // An attached volume grows through its instance's spec; a free one on its host.
        let host = match vol.instance_id {
            None => Some(self.storage_host(&vol.domain(), None).await?),
            Some(_) => None,
        };
        let grown = self.store.grow_volume(&vol, req.size_bytes).await?;
        if let Some(host) = host {
            if let Err(e) = self
                .agents()
                .grow_disk(&host, &vol.id, req.size_bytes)
                .await
            {
                self.store.set_volume_size(&vol.id, vol.size_bytes).await?;
                return Err(Self::storage_error(e));
            }
        }
        self.wake();
        self.system_event(
            Some(&vol.project_id),
            "volume.resized",
            &vol.id,
            "ok",
            Some(format!("{} -> {} bytes", vol.size_bytes, req.size_bytes)),
        )
        .await;
        Ok(grown)
    }

    /// Copy a volume into a new one of another size (shrinking needs the data to fit). A long
    /// job: returns the new volume (`creating`) and the operation to follow.
    pub async fn copy_volume(
        &self,
        scope: &Scope,
        id: &str,
        req: &CopyVolume,
    ) -> Result<(VolumeRow, OperationRow), OpError> {
        let src = self.store.volume(scope, id).await?;
        if let Some(i) = &src.instance_id {
            let inst = self.store.instance(&Scope::system(), i).await?;
            if inst.state != InstanceState::Stopped {
                return Err(OpError::IncorrectState(format!(
                    "volume {} is attached to {} which is {}: detach it or stop the instance first, \
                     so that the copy is consistent",
                    src.id, inst.id, inst.state
                )));
            }
        }
        let host = self.storage_host(&src.domain(), None).await?;
        let dst = self
            .store
            .create_volume(
                scope,
                &NewVolume {
                    name: req.name.clone(),
                    size_bytes: req.size_bytes,
                    domain: src.domain(),
                    snapshot_id: None,
                },
            )
            .await?;
        let op = self
            .store
            .create_operation(&dst.project_id, "volume-copy", &dst.id)
            .await?;
        let job = JobRequest::CopyDisk {
            id: dst.id.clone(),
            create: CreateDisk {
                size_bytes: req.size_bytes,
                source: DiskSource::Copy {
                    disk: Some(src.id.clone()),
                    snapshot: None,
                },
            },
        };
        let me = self.clone();
        let (dst2, op2, src_id) = (dst.clone(), op.clone(), src.id.clone());
        tokio::spawn(async move {
            let res = me.run_job(&host, &job, &op2.id).await;
            let err = match res {
                Ok(_) => me
                    .store
                    .set_volume_state(&dst2.id, "available", None)
                    .await
                    .err()
                    .map(|e| e.to_string()),
                Err(e) => {
                    let _ = me.store.volume_deleted(&dst2.id).await;
                    Some(e.to_string())
                }
            };
            let _ = me.store.finish_operation(&op2.id, err.as_deref()).await;
            me.system_event(
                Some(&dst2.project_id),
                "volume.copied",
                &dst2.id,
                if err.is_none() { "ok" } else { "failed" },
                Some(err.unwrap_or_else(|| format!("from {src_id}"))),
            )
            .await;
        });
        Ok((dst, op))
    }

    pub async fn delete_volume(&self, scope: &Scope, id: &str) -> Result<(), OpError> {
        let vol = self.store.volume(scope, id).await?;
        self.store
            .begin_delete_volume(&vol)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })?;
        let host = self.storage_host(&vol.domain(), None).await?;
        self.agents()
            .delete_disk(&host, &vol.id)
            .await
            .map_err(Self::storage_error)?;
        self.store.volume_deleted(&vol.id).await?;
        self.store.delete_schedules_of(&vol.id).await?;
        self.system_event(Some(&vol.project_id), "volume.deleted", &vol.id, "ok", None)
            .await;
        Ok(())
    }

    /// Run an agent job to its end, mirroring its progress into the operation.
    pub(crate) async fn run_job(
        &self,
        host: &kumo_store::HostRow,
        job: &JobRequest,
        op_id: &str,
    ) -> Result<Option<serde_json::Value>, OpError> {
        self.run_job_within(host, job, op_id, (0.0, 1.0)).await
    }

    /// [`Controller::run_job`] reporting the job's progress as `lo..hi` of the operation's.
    pub(crate) async fn run_job_within(
        &self,
        host: &kumo_store::HostRow,
        job: &JobRequest,
        op_id: &str,
        (lo, hi): (f64, f64),
    ) -> Result<Option<serde_json::Value>, OpError> {
        let started = self
            .agents()
            .start_job(host, job)
            .await
            .map_err(Self::storage_error)?;
        let mut failures = 0;
        let mut last = -1.0;
        loop {
            tokio::time::sleep(JOB_POLL).await;
            let j = match self.agents().job(host, &started.id).await {
                Ok(j) => j,
                // The agent restarted and lost the job, or is gone.
                Err(e) if crate::AgentClient::is_not_found(&e) => {
                    return Err(OpError::Unavailable(
                        "the host's agent lost the job (it restarted); run it again".into(),
                    ))
                }
                Err(e) => {
                    failures += 1;
                    if failures > 20 {
                        return Err(e.into());
                    }
                    continue;
                }
            };
            failures = 0;
            if (j.progress - last).abs() >= 0.01 {
                last = j.progress;
                let _ = self
                    .store
                    .set_operation_progress(op_id, lo + (hi - lo) * j.progress)
                    .await;
            }
            match j.state.as_str() {
                "running" => continue,
                "succeeded" => return Ok(j.result),
                _ => {
                    return Err(OpError::Invalid(
                        j.error.unwrap_or_else(|| "the job failed".into()),
                    ))
                }
            }
        }
    }
}

impl Controller {
    /// The domain of an instance's root disk.
    pub(crate) async fn instance_domain(
        &self,
        inst: &kumo_store::InstanceRow,
    ) -> Result<(Domain, kumo_store::HostRow), OpError> {
        let host_id = inst
            .host_id
            .clone()
            .ok_or_else(|| OpError::IncorrectState(format!("instance {} has no host", inst.id)))?;
        let host = self.store.host(&host_id).await?;
        Ok((kumo_store::Store::domain_of(&host), host))
    }
}
