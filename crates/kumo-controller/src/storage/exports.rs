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
        let (project, domain, prefer, job_src) = if snapshot {
            let s = self.store.snapshot(scope, id).await?;
            if s.state != "completed" {
                return Err(OpError::IncorrectState(format!(
                    "snapshot {} is {}",
                    s.id, s.state
                )));
            }
            let d = s.domain();
            (s.project_id, d, None, (None, Some(s.id)))
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
            (v.project_id, d, None::<String>, (Some(v.id), None))
        };
        let host = self.storage_host(&domain, prefer.as_deref()).await?;
        let file = format!("{id}.{format}");
        let dir = self.export_dir(&project);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| OpError::Internal(format!("creating {}: {e}", dir.display())))?;
        let dest = dir.join(&file);
        // A new export replaces the previous one of the same disk and format.
        let _ = tokio::fs::remove_file(&dest).await;
        let job = JobRequest::Export {
            disk: job_src.0,
            snapshot: job_src.1,
            dest: dest.display().to_string(),
            format: format.to_string(),
        };
        let op = self.store.create_operation(&project, "export", id).await?;
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
