//! The image cache of the host's pool: each image once per pool, verified by its checksum,
//! shared by the copy-on-write root disks of every VM made from it.

use std::path::PathBuf;

use futures::StreamExt;
use kumo_types::agent::ImageRef;
use tokio::io::AsyncWriteExt;

use crate::{Agent, AgentError};

impl Agent {
    pub(crate) async fn cached_image(&self, img: &ImageRef) -> Result<PathBuf, AgentError> {
        // In the pool: on a shared pool every host sees the image its disks are based on.
        let dir = self.pool.image_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(&img.id);
        let lock = {
            let mut locks = self.image_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(img.id.clone()).or_default().clone()
        };
        let _held = lock.lock().await;
        if tokio::fs::metadata(&path).await.is_ok() {
            return Ok(path);
        }
        // Same machine as the controller: link its (immutable) file instead of copying.
        let local = PathBuf::from(&img.controller_path);
        if let Ok(meta) = tokio::fs::metadata(&local).await {
            if meta.len() == img.size && tokio::fs::hard_link(&local, &path).await.is_ok() {
                return Ok(path);
            }
        }
        self.download_image(img, &path).await?;
        Ok(path)
    }

    async fn download_image(&self, img: &ImageRef, path: &PathBuf) -> Result<(), AgentError> {
        use sha2::{Digest, Sha256};
        let url = format!(
            "{}/api/v1/agent/images/{}",
            self.identity.controller, img.id
        );
        // Per host: agents sharing a pool may download the same image at once.
        let tmp = path.with_extension(format!("download-{}", self.identity.host_id));
        let fail = |reason: String| AgentError::Image {
            id: img.id.clone(),
            reason,
        };
        let resp = self
            .http
            .get(&url)
            .bearer_auth(format!(
                "{}:{}",
                self.identity.host_id, self.identity.host_secret
            ))
            .timeout(std::time::Duration::from_secs(3600))
            .send()
            .await
            .map_err(|e| fail(format!("download failed: {e}")))?;
        if !resp.status().is_success() {
            return Err(fail(format!("controller answered {}", resp.status())));
        }
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| AgentError::io(format!("creating {}", tmp.display()), e))?;
        let mut hasher = Sha256::new();
        let mut stream = resp.bytes_stream();
        let result = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| fail(format!("download interrupted: {e}")))?;
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| AgentError::io(format!("writing {}", tmp.display()), e))?;
            }
            file.sync_all()
                .await
                .map_err(|e| AgentError::io(format!("writing {}", tmp.display()), e))?;
            let got = hex::encode(hasher.finalize());
            if got != img.sha256 {
                return Err(fail(format!(
                    "checksum mismatch: expected {}, got {got}",
                    img.sha256
                )));
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, path)
            .await
            .map_err(|e| AgentError::io(format!("renaming {}", tmp.display()), e))
    }
}
