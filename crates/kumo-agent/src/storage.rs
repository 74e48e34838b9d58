//! This host's storage pool: disks, snapshots and long storage jobs the controller asks for.
//! Root disks and volumes are disks of the pool (see kumo_storage::pool); a live snapshot asks
//! QEMU to switch the disk to a new overlay while the pool records the frozen layer.

use std::collections::HashMap;
use std::sync::Arc;

use kumo_hypervisor::{PowerState, SnapshotTarget};
use kumo_storage::pool::{DiskBase, DiskInfo, Source};
use kumo_types::storage::{
    AgentJob, CreateDisk, DiskReport, DiskSource, JobRequest, PoolReport, SnapshotTaken,
    TakeSnapshot,
};

use crate::error::chain;
use crate::{Agent, AgentError};

mod backup;
mod jobs;

/// Jobs kept after they end, so the controller can read their result.
const FINISHED_JOBS_KEPT: usize = 100;

#[derive(Default)]
pub(crate) struct Jobs {
    map: std::sync::Mutex<HashMap<String, AgentJob>>,
    cancelled: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Jobs {
    /// Ask a running job to stop (backups check between progress reports).
    pub(crate) fn cancel(&self, id: &str) -> bool {
        let known = self.get(id).is_some_and(|j| j.state == "running");
        if known {
            self.cancelled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string());
        }
        known
    }

    pub(crate) fn cancelled(&self, id: &str) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn set(&self, job: AgentJob) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(job.id.clone(), job);
        if m.len() > FINISHED_JOBS_KEPT {
            let done: Vec<String> = m
                .values()
                .filter(|j| j.state != "running")
                .map(|j| j.id.clone())
                .collect();
            for id in done.iter().take(m.len() - FINISHED_JOBS_KEPT) {
                m.remove(id);
            }
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<AgentJob> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn progress(&self, id: &str, p: f64) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = m.get_mut(id) {
            if j.state == "running" {
                j.progress = p.clamp(0.0, 1.0);
            }
        }
    }
}

pub(crate) fn report(d: &DiskInfo) -> DiskReport {
    DiskReport {
        id: d.id.clone(),
        size_bytes: d.size,
        format: d.format.clone(),
        path: d.path.display().to_string(),
    }
}

impl Agent {
    pub(crate) async fn pool_report(&self) -> Option<PoolReport> {
        let cfg = self.pool.config();
        match self.pool.capacity().await {
            Ok(c) => Some(PoolReport {
                name: cfg.name.clone(),
                kind: cfg.kind.to_string(),
                total_bytes: c.total_bytes,
                free_bytes: c.free_bytes,
            }),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot read the storage pool's capacity");
                None
            }
        }
    }

    fn no_progress() -> kumo_storage::Progress {
        Arc::new(|_| {})
    }

    /// Make a disk quickly (blank or on a snapshot). Full copies are jobs.
    pub async fn create_disk(&self, id: &str, req: &CreateDisk) -> Result<DiskReport, AgentError> {
        let base = match &req.source {
            DiskSource::Blank => DiskBase::Blank,
            DiskSource::Snapshot { id } => DiskBase::Snapshot(id.clone()),
            DiskSource::Copy { .. } => {
                return Err(AgentError::Config(
                    "a copy is a long job: POST it to /agent/v1/jobs".into(),
                ))
            }
        };
        let d = self
            .pool
            .create_disk(id, req.size_bytes, &base, Self::no_progress())
            .await?;
        Ok(report(&d))
    }

    pub async fn delete_disk(&self, id: &str) -> Result<(), AgentError> {
        if self.disk_in_use(id).await {
            return Err(AgentError::Busy(format!(
                "disk {id} is attached to a running VM"
            )));
        }
        self.pool.delete_disk(id).await?;
        Ok(())
    }

    pub async fn grow_disk(&self, id: &str, size: u64) -> Result<DiskReport, AgentError> {
        if self.disk_in_use(id).await {
            return Err(AgentError::Busy(format!(
                "disk {id} is attached to a running VM: it grows through the VM's spec"
            )));
        }
        Ok(report(&self.pool.grow_disk(id, size).await?))
    }

    /// Whether a running VM of this host has the disk open (its root disk or a volume).
    async fn disk_in_use(&self, id: &str) -> bool {
        let specs: Vec<kumo_types::agent::VmDesired> = self
            .vms
            .map
            .lock()
            .await
            .values()
            .map(|e| e.rec.desired.clone())
            .collect();
        for d in specs {
            let uses = d.id == id || d.volumes.iter().any(|v| v.id == id);
            if uses && self.hv.state(&d.id).await.ok() != Some(PowerState::Stopped) {
                return true;
            }
        }
        false
    }

    /// Snapshot a disk: live through QEMU when its VM runs, else offline.
    pub async fn take_snapshot(&self, req: &TakeSnapshot) -> Result<SnapshotTaken, AgentError> {
        // The VM's op lock: it neither starts nor stops while its disk switches layers.
        let op = match &req.vm {
            Some(vm) => self.vms.map.lock().await.get(vm).map(|e| e.op.clone()),
            None => None,
        };
        let _guard = match &op {
            Some(op) => Some(op.lock().await),
            None => None,
        };
        let running = match &req.vm {
            Some(vm) => self.hv.state(vm).await? != PowerState::Stopped,
            None => false,
        };
        if !running {
            if self.disk_in_use(&req.disk).await {
                return Err(AgentError::Busy(format!(
                    "disk {} is in use by a running VM the request did not name",
                    req.disk
                )));
            }
            let s = self
                .pool
                .snapshot_offline(&req.disk, &req.snapshot_id)
                .await?;
            return Ok(SnapshotTaken {
                snapshot_id: s.id,
                size_bytes: s.size,
                io_pause_ms: None,
            });
        }
        let (Some(vm), Some(device)) = (&req.vm, &req.device) else {
            return Err(AgentError::Config(
                "a live snapshot needs the VM and the disk's device".into(),
            ));
        };
        let plan = self.pool.plan_snapshot(&req.disk, &req.snapshot_id).await?;
        let target = SnapshotTarget {
            device_id: device.clone(),
            overlay: plan.overlay.clone(),
        };
        match self.hv.snapshot_disks(vm, &[target]).await {
            Ok(r) => {
                let s = self.pool.commit_snapshot(&plan).await?;
                tracing::info!(vm = %vm, disk = %req.disk, snapshot = %s.id, pause_ms = r.pause.as_secs_f64() * 1000.0, "live snapshot");
                Ok(SnapshotTaken {
                    snapshot_id: s.id,
                    size_bytes: s.size,
                    io_pause_ms: Some(r.pause.as_secs_f64() * 1000.0),
                })
            }
            Err(e) => {
                // A transaction that timed out (or whose QMP link broke) may have switched the
                // disk anyway: ask QEMU which file it writes before touching the overlay.
                match self.hv.attached_disks(vm).await {
                    Ok(disks) => {
                        let active = disks.iter().find(|d| &d.device_id == device);
                        if active.is_some_and(|d| d.file == plan.overlay) {
                            let s = self.pool.commit_snapshot(&plan).await?;
                            tracing::warn!(vm = %vm, snapshot = %s.id, error = %chain(&e), "the snapshot command failed but QEMU switched: recorded");
                            return Ok(SnapshotTaken {
                                snapshot_id: s.id,
                                size_bytes: s.size,
                                io_pause_ms: None,
                            });
                        }
                        if let Err(e2) = self.pool.abort_snapshot(&plan).await {
                            tracing::warn!(error = %chain(&e2), "could not remove a failed snapshot's overlay");
                        }
                    }
                    // Unknown: the overlay may hold the guest's writes; keep it (the plan
                    // stays pending in the pool's record, which its GC respects).
                    Err(e2) => {
                        tracing::error!(vm = %vm, error = %chain(&e2), "snapshot outcome unknown; its overlay is kept")
                    }
                }
                Err(e.into())
            }
        }
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), AgentError> {
        self.pool.delete_snapshot(id).await?;
        Ok(())
    }

    /// Start a long job; it runs in the background and is polled with `job`.
    pub async fn start_job(self: &Arc<Self>, req: JobRequest) -> Result<AgentJob, AgentError> {
        let id = kumo_types::new_id(kumo_types::IdKind::Operation);
        let job = AgentJob {
            id: id.clone(),
            state: "running".into(),
            progress: 0.0,
            error: None,
            result: None,
        };
        self.jobs.set(job.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let jid = id.clone();
            let me2 = me.clone();
            let progress: kumo_storage::Progress = Arc::new(move |p| me2.jobs.progress(&jid, p));
            let res = me.run_job(&req, &id, progress).await;
            let mut done = me.jobs.get(&id).unwrap_or(AgentJob {
                id: id.clone(),
                state: "running".into(),
                progress: 0.0,
                error: None,
                result: None,
            });
            match res {
                Ok(result) => {
                    done.state = "succeeded".into();
                    done.progress = 1.0;
                    done.result = Some(result);
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %chain(&e), "storage job failed");
                    done.state = "failed".into();
                    done.error = Some(chain(&e));
                }
            }
            me.jobs.set(done);
        });
        Ok(job)
    }

    pub fn job(&self, id: &str) -> Option<AgentJob> {
        self.jobs.get(id)
    }

    pub fn cancel_job(&self, id: &str) -> bool {
        self.jobs.cancel(id)
    }

    /// The disk of a copy's source.
    pub(crate) fn copy_source(
        disk: &Option<String>,
        snapshot: &Option<String>,
    ) -> Result<Source, AgentError> {
        match (disk, snapshot) {
            (Some(d), None) => Ok(Source::Disk(d.clone())),
            (None, Some(s)) => Ok(Source::Snapshot(s.clone())),
            _ => Err(AgentError::Config(
                "a copy needs either a disk or a snapshot".into(),
            )),
        }
    }
}
