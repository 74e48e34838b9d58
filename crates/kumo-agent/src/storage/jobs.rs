//! The long storage jobs: copies, exports, backups and restores.

use kumo_types::storage::{DiskSource, JobRequest};

use crate::{Agent, AgentError};

impl Agent {
    pub(super) async fn run_job(
        &self,
        req: &JobRequest,
        job_id: &str,
        progress: kumo_storage::Progress,
    ) -> Result<serde_json::Value, AgentError> {
        match req {
            JobRequest::CopyDisk { id, create } => {
                let DiskSource::Copy { disk, snapshot } = &create.source else {
                    return Err(AgentError::Config("a copy job needs a copy source".into()));
                };
                let src = Self::copy_source(disk, snapshot)?;
                let d = self
                    .pool
                    .copy_disk(&src, id, create.size_bytes, progress)
                    .await?;
                Ok(serde_json::to_value(super::report(&d))?)
            }
            JobRequest::Export {
                disk,
                snapshot,
                dest,
                format,
            } => {
                let src = Self::copy_source(disk, snapshot)?;
                let bytes = self
                    .pool
                    .export(&src, std::path::Path::new(dest), format, progress)
                    .await?;
                Ok(serde_json::json!({ "bytes": bytes }))
            }
            JobRequest::Migrate(m) => self.run_migration(m, job_id, progress).await,
            JobRequest::Backup { .. } | JobRequest::Restore { .. } => {
                self.run_backup_job(req, job_id, progress).await
            }
        }
    }
}
