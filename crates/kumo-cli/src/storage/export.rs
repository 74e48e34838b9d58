//! Exports: a volume, snapshot or image written to a local file (qcow2, raw, vmdk or vdi).

use std::path::Path;

use futures::StreamExt;
use kumo_types::storage::{ExportDisk, ExportResult};
use tokio::io::AsyncWriteExt;

use crate::commands::follow_operation;
use crate::{Client, ClientError};

impl Client {
    /// Stream a GET's body into `out` (created; a partial file is removed on failure).
    pub async fn download(&self, path: &str, out: &Path) -> Result<u64, ClientError> {
        let url = self.url(path)?;
        let headers = self.sign("GET", &url, b"", &[])?;
        // Disks are big: the client's usual timeout would cut them off.
        let mut rb = self
            .http
            .get(url.clone())
            .timeout(std::time::Duration::from_secs(24 * 3600));
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.cfg.endpoint.clone(), e.to_string()))?;
        if !resp.status().is_success() {
            return crate::client::decode::<u64>(resp).await;
        }
        let res = async {
            let mut f = tokio::fs::File::create_new(out)
                .await
                .map_err(|e| ClientError::Http(format!("creating {}: {e}", out.display())))?;
            let mut n = 0u64;
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ClientError::Http(format!("download: {e}")))?;
                f.write_all(&chunk)
                    .await
                    .map_err(|e| ClientError::Http(format!("writing {}: {e}", out.display())))?;
                n += chunk.len() as u64;
            }
            f.sync_all()
                .await
                .map_err(|e| ClientError::Http(format!("writing {}: {e}", out.display())))?;
            Ok(n)
        }
        .await;
        if res.is_err() {
            let _ = tokio::fs::remove_file(out).await;
        }
        res
    }

    /// Start exporting a volume (`kind` = "volumes") or snapshot ("snapshots").
    pub async fn export_disk(
        &self,
        kind: &str,
        id: &str,
        format: &str,
    ) -> Result<ExportResult, ClientError> {
        self.post(
            &format!("/api/v1/{kind}/{id}/export"),
            &ExportDisk {
                format: format.into(),
            },
        )
        .await
    }
}

/// Export with a progress bar, then download into `out`.
pub async fn export_to(
    client: &Client,
    kind: &str,
    id: &str,
    format: &str,
    out: &Path,
) -> Result<(), ClientError> {
    if out.exists() {
        return Err(ClientError::Config(format!(
            "{} exists; choose another --out",
            out.display()
        )));
    }
    let r = client.export_disk(kind, id, format).await?;
    follow_operation(client, &r.operation.id).await?;
    let n = client
        .download(&format!("/api/v1/exports/{}", r.file), out)
        .await?;
    println!("{id} exported as {format} to {} ({n} bytes)", out.display());
    Ok(())
}
