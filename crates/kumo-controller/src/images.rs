//! Image operations: import from a file (as an operation with progress), upload, delete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kumo_storage::{ImageKind, Progress};
use kumo_store::{ImageRow, NewImage, OperationRow, Scope};
use kumo_types::api::{ImportImage, UploadParams};

use crate::{Controller, OpError};
use kumo_types::error_chain;

fn parse_kind(kind: Option<&str>) -> Result<ImageKind, OpError> {
    match kind.unwrap_or("disk") {
        "disk" => Ok(ImageKind::Disk),
        "kernel" => Ok(ImageKind::Kernel),
        "ramdisk" => Ok(ImageKind::Ramdisk),
        other => Err(OpError::Invalid(format!(
            "image kind must be disk, kernel or ramdisk, not {other:?}"
        ))),
    }
}

fn kind_name(kind: ImageKind) -> &'static str {
    match kind {
        ImageKind::Disk => "disk",
        ImageKind::Kernel => "kernel",
        ImageKind::Ramdisk => "ramdisk",
    }
}

const TMP_MARK: &str = ".importing";

/// Temp files of imports that a dead controller process left.
pub(crate) async fn remove_stale_temp_files(dir: &Path) {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().to_string();
        if name.contains(TMP_MARK) || name.starts_with(".tmp") {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
}

impl Controller {
    pub(crate) fn image_path(&self, id: &str) -> PathBuf {
        self.cfg.image_dir.join(id)
    }

    pub(crate) async fn new_image_row(
        &self,
        scope: &Scope,
        kind: ImageKind,
        new: NewImage,
    ) -> Result<ImageRow, OpError> {
        if kind != ImageKind::Disk && (new.kernel_id.is_some() || new.ramdisk_id.is_some()) {
            return Err(OpError::Invalid(
                "only disk images can name a kernel or ramdisk".into(),
            ));
        }
        let dir = self.cfg.image_dir.clone();
        Ok(self
            .store
            .create_image(scope, &new, |id| dir.join(id).display().to_string())
            .await?)
    }

    pub(crate) fn progress_writer(&self, op_id: &str) -> Progress {
        // Progress arrives many times a second; write it at most twice a second.
        let store = self.store.clone();
        let op = op_id.to_string();
        let last = Arc::new(std::sync::Mutex::new(
            Instant::now() - Duration::from_secs(1),
        ));
        Arc::new(move |f: f64| {
            let due = match last.lock() {
                Ok(mut l) if l.elapsed() >= Duration::from_millis(500) => {
                    *l = Instant::now();
                    true
                }
                _ => false,
            };
            if due {
                let store = store.clone();
                let op = op.clone();
                tokio::spawn(async move {
                    let _ = store.set_operation_progress(&op, f).await;
                });
            }
        })
    }

    /// Start importing a file the controller can read. Returns at once with the pending
    /// image and the operation that tracks the import.
    pub async fn import_image(
        &self,
        scope: &Scope,
        req: &ImportImage,
    ) -> Result<(ImageRow, OperationRow), OpError> {
        let kind = parse_kind(req.kind.as_deref())?;
        let src = PathBuf::from(&req.path);
        if !src.is_absolute() {
            return Err(OpError::Invalid(format!(
                "path {:?} must be absolute",
                req.path
            )));
        }
        let meta = tokio::fs::metadata(&src)
            .await
            .map_err(|e| OpError::Invalid(format!("cannot read {}: {e}", src.display())))?;
        if !meta.is_file() && !is_block_device(&meta) {
            return Err(OpError::Invalid(format!(
                "{} is not a file or block device",
                src.display()
            )));
        }
        let img = self
            .new_image_row(
                scope,
                kind,
                NewImage {
                    name: req.name.clone(),
                    kind: kind_name(kind).into(),
                    public: req.public,
                    kernel_id: req.kernel_id.clone(),
                    ramdisk_id: req.ramdisk_id.clone(),
                    cmdline: req.cmdline.clone(),
                },
            )
            .await?;
        let op = self
            .store
            .create_operation(&img.project_id, "image-import", &img.id)
            .await?;
        let me = self.clone();
        let (img2, op2) = (img.clone(), op.clone());
        let format = req.format.clone();
        tokio::spawn(async move {
            let dest = me.image_path(&img2.id);
            let progress = me.progress_writer(&op2.id);
            let res =
                kumo_storage::import_file(&src, &dest, kind, format.as_deref(), progress).await;
            me.finish_import(&img2, &op2.id, res).await;
        });
        Ok((img, op))
    }

    /// Import an upload stream; returns when the image is available (or the upload failed,
    /// in which case nothing is left).
    pub async fn upload_image<S>(
        &self,
        scope: &Scope,
        params: &UploadParams,
        len: Option<u64>,
        stream: S,
    ) -> Result<(ImageRow, OperationRow), OpError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin + Send,
    {
        let kind = parse_kind(params.kind.as_deref())?;
        let img = self
            .new_image_row(
                scope,
                kind,
                NewImage {
                    name: params.name.clone(),
                    kind: kind_name(kind).into(),
                    public: params.public,
                    kernel_id: params.kernel_id.clone(),
                    ramdisk_id: params.ramdisk_id.clone(),
                    cmdline: params.cmdline.clone(),
                },
            )
            .await?;
        let op = self
            .store
            .create_operation(&img.project_id, "image-upload", &img.id)
            .await?;
        let dest = self.image_path(&img.id);
        let progress = self.progress_writer(&op.id);
        let res = kumo_storage::import_stream(
            stream,
            len,
            &self.cfg.image_dir,
            &dest,
            kind,
            params.format.as_deref(),
            progress,
        )
        .await;
        let ok = res.is_ok();
        let err = res.as_ref().err().map(|e| e.to_string());
        self.finish_import(&img, &op.id, res).await;
        if !ok {
            return Err(OpError::Invalid(err.unwrap_or_default()));
        }
        let img = self.store.image(scope, &img.id).await?;
        let op = self.store.operation(scope, &op.id).await?;
        Ok((img, op))
    }

    pub(crate) async fn finish_import(
        &self,
        img: &ImageRow,
        op_id: &str,
        res: Result<kumo_storage::ImageInfo, kumo_storage::StorageError>,
    ) {
        let outcome = match res {
            Ok(info) => self
                .store
                .finish_image(
                    &img.id,
                    &info.source_format,
                    info.virtual_size,
                    info.file_size,
                    &info.sha256,
                )
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(error_chain(&e)),
        };
        let err = outcome.err();
        if let Some(msg) = &err {
            let _ = self.store.fail_image(&img.id, msg).await;
            let _ = tokio::fs::remove_file(self.image_path(&img.id)).await;
        }
        let _ = self.store.finish_operation(op_id, err.as_deref()).await;
        let result = if err.is_some() { "failed" } else { "ok" };
        self.system_event(
            Some(&img.project_id),
            "image.imported",
            &img.id,
            result,
            err,
        )
        .await;
    }

    pub async fn delete_image(&self, scope: &Scope, id: &str) -> Result<ImageRow, OpError> {
        let img = self.store.delete_image(scope, id).await?;
        // Hosts keep their own cached copies until no VM uses them; the controller's copy goes now.
        let _ = tokio::fs::remove_file(&img.path).await;
        Ok(img)
    }
}

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}
