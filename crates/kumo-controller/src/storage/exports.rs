//! Exports: a volume or snapshot written whole to a file in the repository directory the
//! controller and hosts share (`exports/<project>/<id>.<format>`), which its project can then
//! download. A job on the host holding the disk does the conversion (`qemu-img convert`).

use std::path::PathBuf;

use kumo_store::{OperationRow, Scope};
use kumo_types::storage::JobRequest;
use kumo_types::InstanceState;

use crate::{Controller, OpError};

pub const EXPORT_FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vdi"];

impl Controller {
    /// Where a project's exports go.
    pub fn export_dir(&self, project_id: &str) -> PathBuf {
        self.cfg.backup_dir.join("exports").join(project_id)
    }

    /// Export a volume (`snapshot` false) or a snapshot; returns the operation and the file name.
    pub async fn export_disk(
        &self,
        scope: &Scope,
        id: &str,
        snapshot: bool,
        format: &str,
    ) -> Result<(OperationRow, String), OpError> {
        if !EXPORT_FORMATS.contains(&format) {
            return Err(OpError::Invalid(format!(
                "format {format:?}: one of {}",
                EXPORT_FORMATS.join(", ")
            )));
        }
        // The disk's project and pool, its resolved id (the caller may have used a name), and
        // what the job copies: (disk, snapshot).
        let (project, domain, rid, source) = if snapshot {
            let s = self.store.snapshot(scope, id).await?;
            if s.state != "completed" {
                return Err(OpError::IncorrectState(format!(
                    "snapshot {} is {}",
                    s.id, s.state
                )));
            }
            let d = s.domain();
            (s.project_id, d, s.id.clone(), (None, Some(s.id)))
        } else {
            let v = self.store.volume(scope, id).await?;
            if let Some(i) = &v.instance_id {
                let inst = self.store.instance(&Scope::system(), i).await?;
                if inst.state != InstanceState::Stopped {
                    return Err(OpError::IncorrectState(format!(
                        "volume {} is in use by {} ({}): snapshot it and export the snapshot, or detach it",
                        v.id, inst.id, inst.state
                    )));
                }
            }
            let d = v.domain();
            (v.project_id, d, v.id.clone(), (Some(v.id), None))
        };
        let host = self.storage_host(&domain, None).await?;
        let file = format!("{rid}.{format}");
        let dir = self.export_dir(&project);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| OpError::Internal(format!("creating {}: {e}", dir.display())))?;
        let dest = dir.join(&file);
        // A new export replaces the previous one of the same disk and format.
        let _ = tokio::fs::remove_file(&dest).await;
        let job = JobRequest::Export {
            disk: source.0,
            snapshot: source.1,
            dest: dest.display().to_string(),
            format: format.to_string(),
        };
        let op = self
            .store
            .create_operation(&project, "export", &rid)
            .await?;
        let me = self.clone();
        let op2 = op.clone();
        tokio::spawn(async move {
            let err = me
                .run_job(&host, &job, &op2.id)
                .await
                .err()
                .map(|e| e.to_string());
            let _ = me.store.finish_operation(&op2.id, err.as_deref()).await;
            me.system_event(
                Some(&op2.project_id),
                "disk.exported",
                &op2.target_id,
                if err.is_none() { "ok" } else { "failed" },
                err,
            )
            .await;
        });
        Ok((op, file))
    }
}

impl Controller {
    /// An image made from a snapshot: the snapshot exported as qcow2 by its host into the shared
    /// directory, then imported like any image (validated, stored, checksummed). An instance
    /// snapshot's image boots like its source (same kernel, ramdisk and command line).
    pub async fn image_from_snapshot(
        &self,
        scope: &Scope,
        snapshot_id: &str,
        name: &str,
    ) -> Result<(kumo_store::ImageRow, OperationRow), OpError> {
        let snap = self.store.snapshot(scope, snapshot_id).await?;
        if snap.state != "completed" {
            return Err(OpError::IncorrectState(format!(
                "snapshot {} is {}",
                snap.id, snap.state
            )));
        }
        let source = match &snap.image_id {
            Some(i) => Some(self.store.image_unscoped(i).await?),
            None => None,
        };
        let host = self.storage_host(&snap.domain(), None).await?;
        let img = self
            .new_image_row(
                scope,
                kumo_storage::ImageKind::Disk,
                kumo_store::NewImage {
                    name: name.to_string(),
                    kind: "disk".into(),
                    public: false,
                    kernel_id: source.as_ref().and_then(|s| s.kernel_id.clone()),
                    ramdisk_id: source.as_ref().and_then(|s| s.ramdisk_id.clone()),
                    cmdline: source.as_ref().and_then(|s| s.cmdline.clone()),
                },
            )
            .await?;
        let op = self
            .store
            .create_operation(&img.project_id, "image-from-snapshot", &img.id)
            .await?;
        let dir = self.export_dir(&snap.project_id);
        let dest = dir.join(format!("{}.qcow2", img.id));
        let job = JobRequest::Export {
            disk: None,
            snapshot: Some(snap.id.clone()),
            dest: dest.display().to_string(),
            format: "qcow2".into(),
        };
        let me = self.clone();
        let (img2, op2) = (img.clone(), op.clone());
        tokio::spawn(async move {
            let exported = async {
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| OpError::Internal(format!("creating {}: {e}", dir.display())))?;
                me.run_job_within(&host, &job, &op2.id, (0.0, 0.5)).await
            }
            .await;
            let res = match exported {
                Ok(_) => {
                    let p = me.progress_writer(&op2.id);
                    let half: kumo_storage::Progress =
                        std::sync::Arc::new(move |f| p(0.5 + f / 2.0));
                    kumo_storage::import_file(
                        &dest,
                        &me.image_path(&img2.id),
                        kumo_storage::ImageKind::Disk,
                        Some("qcow2"),
                        half,
                    )
                    .await
                }
                Err(e) => Err(kumo_storage::StorageError::InvalidArgument(format!(
                    "exporting snapshot: {e}"
                ))),
            };
            let _ = tokio::fs::remove_file(&dest).await;
            me.finish_import(&img2, &op2.id, res).await;
        });
        Ok((img, op))
    }
}
