//! Backups of this host's disks into a repository (a directory the host mounts), and restores.
//! A running VM's disk is backed up by QEMU (full, then incremental from the dirty bitmap the
//! previous backup started); a stopped one is copied whole. A backup exists only once the
//! repository has verified it and written its manifest, so an interrupted one leaves the chain
//! as it was and the next run starts from the last good backup (kumo_storage::backup).

use std::path::Path;

use kumo_hypervisor::{BackupJob, PowerState};
use kumo_storage::backup::BackupRepo;
use kumo_storage::pool::{DiskBase, Source};
use kumo_types::storage::JobRequest;

use crate::error::chain;
use crate::{Agent, AgentError};

/// The manifest's bitmap for a copy of a stopped disk: never one QEMU has.
const OFFLINE_BITMAP: &str = "none";

/// Share of a backup's progress for copying; the rest is verification.
const COPY_SHARE: f64 = 0.8;

impl Agent {
    pub(super) async fn run_backup_job(
        &self,
        req: &JobRequest,
        job_id: &str,
        progress: kumo_storage::Progress,
    ) -> Result<serde_json::Value, AgentError> {
        match req {
            JobRequest::Backup {
                backup_id,
                disk,
                vm,
                device,
                repository,
                incremental,
                rate,
            } => {
                let repo = BackupRepo::open(Path::new(repository))?;
                let size = self
                    .pool
                    .disk(disk)
                    .await?
                    .ok_or_else(|| AgentError::NotFound(format!("disk {disk}")))?
                    .size;
                let live = match (vm, device) {
                    (Some(vm), Some(dev)) if self.hv.state(vm).await? != PowerState::Stopped => {
                        Some((vm.as_str(), dev.as_str()))
                    }
                    _ => None,
                };
                let manifest = match live {
                    Some((vm, dev)) => {
                        self.live_backup(
                            &repo,
                            disk,
                            backup_id,
                            size,
                            vm,
                            dev,
                            *incremental,
                            rate.or(self.cfg.backup_rate),
                            job_id,
                            &progress,
                        )
                        .await?
                    }
                    None => {
                        if self.disk_in_use(disk).await {
                            return Err(AgentError::Busy(format!(
                                "disk {disk} is in use by a running VM the request did not name"
                            )));
                        }
                        let prepared = repo.prepare(disk, backup_id, size, false).await?;
                        // The repository made an empty target; the export writes it whole.
                        let _ = tokio::fs::remove_file(&prepared.target).await;
                        let p = progress.clone();
                        let copy: kumo_storage::Progress =
                            std::sync::Arc::new(move |f| p(f * COPY_SHARE));
                        let res = async {
                            self.pool
                                .export(
                                    &Source::Disk(disk.clone()),
                                    &prepared.target,
                                    "qcow2",
                                    copy,
                                )
                                .await?;
                            // No dirty bitmap tracks a stopped disk: the next backup is full.
                            Ok::<_, AgentError>(repo.finish(&prepared, OFFLINE_BITMAP).await?)
                        }
                        .await;
                        match res {
                            Ok(m) => m,
                            Err(e) => {
                                let _ = repo.abandon(&prepared).await;
                                return Err(e);
                            }
                        }
                    }
                };
                Ok(serde_json::to_value(&manifest)?)
            }
            JobRequest::Restore {
                id,
                repository,
                backup_disk,
                backup_id,
                in_place,
            } => {
                let repo = BackupRepo::open(Path::new(repository))?;
                let m = repo
                    .backups(backup_disk)
                    .await?
                    .into_iter()
                    .find(|b| &b.id == backup_id)
                    .ok_or_else(|| AgentError::NotFound(format!("backup {backup_id}")))?;
                let base = DiskBase::Flatten {
                    path: repo.chain_file(backup_disk, backup_id),
                    format: "qcow2".into(),
                };
                let d = if *in_place {
                    if self.disk_in_use(id).await {
                        return Err(AgentError::Busy(format!(
                            "disk {id} is in use by a running VM: stop it to restore in place"
                        )));
                    }
                    self.pool.replace_content(id, &base, progress).await?
                } else {
                    self.pool
                        .create_disk(id, m.virtual_size, &base, progress)
                        .await?
                };
                Ok(serde_json::to_value(super::report(&d))?)
            }
            _ => Err(AgentError::Config("not a backup job".into())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn live_backup(
        &self,
        repo: &BackupRepo,
        disk: &str,
        backup_id: &str,
        size: u64,
        vm: &str,
        device: &str,
        incremental: bool,
        speed: Option<u64>,
        job_id: &str,
        progress: &kumo_storage::Progress,
    ) -> Result<kumo_storage::backup::BackupManifest, AgentError> {
        let bitmaps = self.hv.disk_bitmaps(vm, device).await?;
        let last = repo.backups(disk).await?.pop();
        // Incremental only from a backup whose bitmap QEMU still has on the active layer (a
        // restart or a snapshot since then loses it: then a full backup repairs the chain).
        let usable = |b: &str| !b.is_empty() && bitmaps.iter().any(|x| x == b);
        let want = incremental && last.as_ref().is_some_and(|l| usable(&l.bitmap));
        let mut prepared = repo.prepare(disk, backup_id, size, want).await?;
        // From here the repository is locked: the parent it chose is the one whose bitmap
        // says what to copy (the chain may have changed since it was read above).
        let mut since = prepared
            .parent
            .as_ref()
            .map(|p| p.bitmap.clone())
            .filter(|b| usable(b));
        if prepared.parent.is_some() && since.is_none() {
            repo.abandon(&prepared).await?;
            drop(prepared);
            prepared = repo.prepare(disk, backup_id, size, false).await?;
            since = None;
        }
        for b in bitmaps.iter().filter(|b| b.starts_with("kumo-")) {
            if Some(b) != since.as_ref() {
                self.hv.remove_bitmap(vm, device, b).await?;
            }
        }
        let new_bitmap = format!("kumo-{backup_id}");
        let job = BackupJob {
            device_id: device.to_string(),
            target: prepared.target.clone(),
            new_bitmap: new_bitmap.clone(),
            since_bitmap: since.clone(),
            speed,
        };
        let p = progress.clone();
        let jobs = &self.jobs;
        let on_progress = move |done: u64, total: u64| {
            if total > 0 {
                p(done as f64 / total as f64 * COPY_SHARE);
            }
            !jobs.cancelled(job_id)
        };
        let res = self.hv.backup_disk(vm, &job, &on_progress).await;
        let res = match res {
            Ok(_) => repo
                .finish(&prepared, &new_bitmap)
                .await
                .map_err(AgentError::from),
            Err(e) => Err(e.into()),
        };
        match res {
            Ok(m) => {
                if let Some(old) = &since {
                    if let Err(e) = self.hv.remove_bitmap(vm, device, old).await {
                        tracing::warn!(error = %chain(&e), "could not remove the previous backup's bitmap");
                    }
                }
                Ok(m)
            }
            Err(e) => {
                // The new bitmap goes (QEMU removed it on failure; after a failed verify it is
                // ours to remove); the previous one stays for the next incremental.
                let _ = self.hv.remove_bitmap(vm, device, &new_bitmap).await;
                let _ = repo.abandon(&prepared).await;
                Err(e)
            }
        }
    }
}
