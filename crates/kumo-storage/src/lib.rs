//! kumo-storage: image import/validation and VM disk provisioning through `qemu-img`.
//!
//! * [`import_file`] / [`import_stream`] validate an uploaded disk image (qcow2, raw, vmdk, vdi,
//!   vhdx, vpc), kernel or ramdisk and store it (disks as compacted qcow2) with its sha256.
//!   Nothing is ever left at the destination or in a temp file when they fail.
//! * [`create_overlay`] makes a copy-on-write qcow2 clone of an image in O(1);
//!   [`create_blank`] makes an empty qcow2 disk.
//! * [`inspect`] is `qemu-img info`, [`sha256_file`] hashes a file.
//!
//! The `qemu-img` binary is taken from `PATH` unless [`QEMU_IMG_ENV`] names another one.

pub mod backup;
mod error;
pub mod pool;
mod qemu;
pub mod sniff;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub use error::StorageError;
pub use qemu::{parse_progress, QemuImgInfo, QEMU_IMG_ENV};

/// What an image is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Disk,
    Kernel,
    Ramdisk,
}

/// The result of an import.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub kind: ImageKind,
    /// Detected input format: "qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc" for disks,
    /// "kernel" or "initrd" otherwise.
    pub source_format: String,
    /// Guest-visible size of a disk; the file size for kernels and ramdisks.
    pub virtual_size: u64,
    /// Size of the stored file.
    pub file_size: u64,
    /// sha256 (lowercase hex) of the stored file.
    pub sha256: String,
}

/// Progress callback gets a fraction 0.0..=1.0 (called often; cheap).
pub type Progress = std::sync::Arc<dyn Fn(f64) + Send + Sync>;

/// Disk formats accepted by the importers (qemu-img names; "vhd" is accepted as an alias of "vpc").
pub const SUPPORTED_DISK_FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc"];

/// Formats for which `qemu-img check` is run before conversion.
const CHECKABLE: &[&str] = &["qcow2", "vmdk", "vdi", "vhdx"];

/// A progress callback that only ever moves forward, mapped into `lo..=hi` of the caller's range.
#[derive(Clone)]
struct Reporter {
    cb: Progress,
    last: Arc<AtomicU64>,
    lo: f64,
    hi: f64,
}

impl Reporter {
    fn new(cb: Progress) -> Self {
        Reporter {
            cb,
            last: Arc::new(AtomicU64::new((-1.0f64).to_bits())),
            lo: 0.0,
            hi: 1.0,
        }
    }

    /// A sub-range: `sub(a, b).set(x)` reports `a + x * (b - a)` inside this range.
    fn sub(&self, a: f64, b: f64) -> Self {
        let span = self.hi - self.lo;
        Reporter {
            cb: self.cb.clone(),
            last: self.last.clone(),
            lo: self.lo + a * span,
            hi: self.lo + b * span,
        }
    }

    fn set(&self, fraction: f64) {
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let v = self.lo + f * (self.hi - self.lo);
        let advanced = self
            .last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (v > f64::from_bits(old)).then_some(v.to_bits())
            })
            .is_ok();
        if advanced {
            (self.cb)(v);
        }
    }
}

/// A file that is deleted when dropped unless it was published.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    fn beside(dest: &Path) -> Result<Self, StorageError> {
        let name = dest
            .file_name()
            .ok_or_else(|| {
                StorageError::InvalidArgument(format!("{} is not a file name", dest.display()))
            })?
            .to_string_lossy();
        let parent = parent_dir(dest);
        Ok(TempFile {
            path: parent.join(format!(
                ".{name}.{}.kumo-tmp",
                uuid::Uuid::new_v4().simple()
            )),
            armed: true,
        })
    }

    fn in_dir(dir: &Path, label: &str) -> Self {
        TempFile {
            path: dir.join(format!(
                ".{label}.{}.kumo-tmp",
                uuid::Uuid::new_v4().simple()
            )),
            armed: true,
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temp file");
                }
            }
        }
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The destination's directory must exist and the destination itself must not.
async fn check_dest(dest: &Path) -> Result<(), StorageError> {
    if dest.file_name().is_none() {
        return Err(StorageError::InvalidArgument(format!(
            "destination {} is not a file name",
            dest.display()
        )));
    }
    let dir = parent_dir(dest);
    match tokio::fs::metadata(&dir).await {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StorageError::InvalidArgument(format!(
                "{} is not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StorageError::NotFound(dir));
        }
        Err(e) => return Err(StorageError::io(format!("checking {}", dir.display()), e)),
    }
    match tokio::fs::symlink_metadata(dest).await {
        Ok(_) => Err(StorageError::AlreadyExists(dest.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io(format!("checking {}", dest.display()), e)),
    }
}

/// Size of a regular file or block device.
async fn source_len(path: &Path) -> Result<u64, StorageError> {
    let path = path.to_path_buf();
    blocking(move || {
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound(path));
            }
            Err(e) => return Err(StorageError::io(format!("reading {}", path.display()), e)),
        };
        if meta.is_file() {
            Ok(meta.len())
        } else if meta.file_type().is_block_device() {
            let mut f = std::fs::File::open(&path)
                .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
            f.seek(SeekFrom::End(0))
                .map_err(|e| StorageError::io(format!("sizing {}", path.display()), e))
        } else {
            Err(StorageError::InvalidArgument(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )))
        }
    })
    .await
}

async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::io("blocking task", std::io::Error::other(e.to_string())))?
}

/// Up to `n` bytes from the start of `path`.
async fn read_head(path: &Path, n: usize) -> Result<Vec<u8>, StorageError> {
    let path = path.to_path_buf();
    blocking(move || {
        let f = std::fs::File::open(&path)
            .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
        let mut buf = Vec::with_capacity(n);
        f.take(n as u64)
            .read_to_end(&mut buf)
            .map_err(|e| StorageError::io(format!("reading {}", path.display()), e))?;
        Ok(buf)
    })
    .await
}

fn read_retry(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

const CHUNK: usize = 1 << 20;

fn hash_blocking(path: &Path, progress: Option<&Reporter>) -> Result<String, StorageError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done: u64 = 0;
    loop {
        let n = read_retry(&mut f, &mut buf)
            .map_err(|e| StorageError::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        if let Some(p) = progress {
            if total > 0 {
                p.set(done as f64 / total as f64);
            }
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Copies `src` to a new file `dst`, returning its length and sha256.
fn copy_hash_blocking(
    src: &Path,
    dst: &Path,
    total: u64,
    progress: &Reporter,
) -> Result<(u64, String), StorageError> {
    let mut input = std::fs::File::open(src)
        .map_err(|e| StorageError::io(format!("opening {}", src.display()), e))?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| StorageError::io(format!("creating {}", dst.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done: u64 = 0;
    loop {
        let n = read_retry(&mut input, &mut buf)
            .map_err(|e| StorageError::io(format!("reading {}", src.display()), e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| StorageError::io(format!("writing {}", dst.display()), e))?;
        hasher.update(&buf[..n]);
        done += n as u64;
        if total > 0 {
            progress.set(done as f64 / total as f64);
        }
    }
    out.sync_all()
        .map_err(|e| StorageError::io(format!("syncing {}", dst.display()), e))?;
    Ok((done, hex::encode(hasher.finalize())))
}

/// Moves a finished temp file to `dest` without ever replacing an existing file, durably.
async fn publish(mut tmp: TempFile, dest: &Path) -> Result<(), StorageError> {
    let src = tmp.path.clone();
    let dst = dest.to_path_buf();
    blocking(move || {
        std::fs::File::open(&src)
            .and_then(|f| f.sync_all())
            .map_err(|e| StorageError::io(format!("syncing {}", src.display()), e))?;
        // hard_link refuses to replace an existing destination (rename would not).
        match std::fs::hard_link(&src, &dst) {
            Ok(()) => {
                let _ = std::fs::remove_file(&src);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StorageError::AlreadyExists(dst));
            }
            Err(_) => {
                // Filesystems without hard links: check, then rename.
                if std::fs::symlink_metadata(&dst).is_ok() {
                    return Err(StorageError::AlreadyExists(dst));
                }
                std::fs::rename(&src, &dst)
                    .map_err(|e| StorageError::io(format!("renaming into {}", dst.display()), e))?;
            }
        }
        let dir = parent_dir(&dst);
        if let Err(e) = std::fs::File::open(&dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync directory");
        }
        Ok(())
    })
    .await?;
    tmp.armed = false;
    Ok(())
}

/// Lower-cases and resolves aliases; rejects unknown disk formats.
fn normalize_disk_format(format: &str) -> Result<String, StorageError> {
    let f = format.trim().to_ascii_lowercase();
    let f = match f.as_str() {
        "vhd" => "vpc".to_string(),
        _ => f,
    };
    if SUPPORTED_DISK_FORMATS.contains(&f.as_str()) {
        Ok(f)
    } else {
        Err(StorageError::UnsupportedFormat(format.to_string()))
    }
}

fn check_blob_format(kind: ImageKind, format: Option<&str>) -> Result<(), StorageError> {
    let Some(f) = format else { return Ok(()) };
    let f = f.trim().to_ascii_lowercase();
    let ok = match kind {
        ImageKind::Kernel => f == "kernel",
        ImageKind::Ramdisk => f == "initrd" || f == "ramdisk",
        ImageKind::Disk => true,
    };
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "format {f:?} makes no sense for a {kind:?} image (leave it empty)"
        )))
    }
}

/// Validate and import `src` as an image of `kind` into `dest` (disk images are stored as qcow2;
/// kernels/ramdisks copied as-is).
/// `format`: None = detect. Writes to a temp file next to dest and renames at the end; on ANY
/// error nothing is left at dest or the temp path. `dest` must not exist yet.
pub async fn import_file(
    src: &Path,
    dest: &Path,
    kind: ImageKind,
    format: Option<&str>,
    progress: Progress,
) -> Result<ImageInfo, StorageError> {
    let reporter = Reporter::new(progress);
    import_inner(src, dest, kind, format, &reporter).await
}

async fn import_inner(
    src: &Path,
    dest: &Path,
    kind: ImageKind,
    format: Option<&str>,
    p: &Reporter,
) -> Result<ImageInfo, StorageError> {
    p.set(0.0);
    let info = match kind {
        ImageKind::Disk => import_disk(src, dest, format, p).await?,
        ImageKind::Kernel | ImageKind::Ramdisk => import_blob(src, dest, kind, format, p).await?,
    };
    p.set(1.0);
    tracing::info!(src = %src.display(), dest = %dest.display(), kind = ?info.kind,
        format = %info.source_format, virtual_size = info.virtual_size,
        file_size = info.file_size, sha256 = %info.sha256, "image imported");
    Ok(info)
}

async fn import_blob(
    src: &Path,
    dest: &Path,
    kind: ImageKind,
    format: Option<&str>,
    p: &Reporter,
) -> Result<ImageInfo, StorageError> {
    check_blob_format(kind, format)?;
    check_dest(dest).await?;
    let len = source_len(src).await?;
    if len == 0 {
        return Err(StorageError::Empty(format!("{} is empty", src.display())));
    }
    let validate = |head: &[u8]| -> Result<(), StorageError> {
        match kind {
            ImageKind::Kernel => sniff::kernel_kind(head).map(|_| ()).ok_or_else(|| {
                StorageError::InvalidKernel(
                    "expected an x86 bzImage (\"HdrS\" at offset 0x202) or an ELF vmlinux".into(),
                )
            }),
            _ => sniff::ramdisk_kind(head).map(|_| ()).ok_or_else(|| {
                StorageError::InvalidRamdisk(
                    "expected a gzip, xz, zstd, lz4, bzip2 or lzo compressed initramfs or a newc cpio archive"
                        .into(),
                )
            }),
        }
    };
    // Fail fast on the source, then validate what was actually copied.
    validate(&read_head(src, 0x400).await?)?;
    let tmp = TempFile::beside(dest)?;
    let (src_c, tmp_c, copy_p) = (src.to_path_buf(), tmp.path.clone(), p.sub(0.0, 0.99));
    let (file_size, sha256) =
        blocking(move || copy_hash_blocking(&src_c, &tmp_c, len, &copy_p)).await?;
    if file_size == 0 {
        return Err(StorageError::Empty(format!("{} is empty", src.display())));
    }
    validate(&read_head(&tmp.path, 0x400).await?)?;
    publish(tmp, dest).await?;
    Ok(ImageInfo {
        kind,
        source_format: match kind {
            ImageKind::Kernel => "kernel".into(),
            _ => "initrd".into(),
        },
        virtual_size: file_size,
        file_size,
        sha256,
    })
}

fn is_host_side_convert_error(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("while writing")
        || m.contains("no space left")
        || m.contains("disk quota")
        || m.contains("kumo-tmp")
}

/// Validates a disk image without converting it. Returns qemu-img's view of it.
async fn validate_disk(
    src: &Path,
    src_len: u64,
    explicit: Option<&str>,
) -> Result<QemuImgInfo, StorageError> {
    let info = match qemu::info_raw(src, explicit).await? {
        Ok(i) => i,
        Err(msg) => {
            return Err(match explicit {
                Some(f) => StorageError::Corrupt(format!("not a valid {f} image: {msg}")),
                None => StorageError::Corrupt(format!("qemu-img cannot open it: {msg}")),
            })
        }
    };
    let format = info.format.clone();
    if !SUPPORTED_DISK_FORMATS.contains(&format.as_str()) {
        return Err(StorageError::UnsupportedFormat(format));
    }
    if let Some(b) = info.backing_file() {
        return Err(StorageError::Unsafe(format!(
            "the image has a backing file ({b}); upload a standalone image (qemu-img convert it first)"
        )));
    }
    if let Some(df) = info.format_specific_data("data-file") {
        return Err(StorageError::Unsafe(format!(
            "the image uses an external data file ({df}); upload a standalone image"
        )));
    }
    if info.encrypted == Some(true) {
        return Err(StorageError::Unsafe(
            "encrypted images are not supported".into(),
        ));
    }
    if format == "vmdk" {
        let create_type = info
            .format_specific_data("create-type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let extents = info
            .format_specific_data("extents")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            .unwrap_or(0);
        if !matches!(create_type, "monolithicSparse" | "streamOptimized") || extents > 1 {
            return Err(StorageError::Unsafe(format!(
                "VMDK of type {create_type:?} with {extents} extent(s) refers to other files; \
                 upload a single-file VMDK (monolithicSparse or streamOptimized)"
            )));
        }
    }
    if info.is_marked_corrupt() {
        return Err(StorageError::Corrupt(
            "the qcow2 image is marked corrupt by QEMU".into(),
        ));
    }
    if info.virtual_size == 0 {
        return Err(StorageError::Empty("the image's virtual size is 0".into()));
    }

    if format == "raw" {
        if src_len % 512 != 0 {
            return Err(StorageError::NotADiskImage(format!(
                "a raw disk image must be a multiple of 512 bytes, this file is {src_len} bytes"
            )));
        }
        if explicit.is_none() {
            let head = read_head(src, sniff::SNIFF_LEN).await?;
            if sniff::raw_disk_signature(&head).is_none() {
                return Err(StorageError::NotADiskImage(
                    "the file is not a known image format and has no partition table or \
                     filesystem signature (MBR/GPT, ext2/3/4, XFS, btrfs, ISO 9660, FAT); \
                     if it really is a raw disk, pass format \"raw\" to import it anyway"
                        .into(),
                ));
            }
        }
        return Ok(info);
    }

    if CHECKABLE.contains(&format.as_str()) {
        match qemu::check(src, &format).await? {
            qemu::CheckOutcome::Corrupt(msg) => return Err(StorageError::Corrupt(msg)),
            qemu::CheckOutcome::Clean(r) | qemu::CheckOutcome::Leaks(r) => {
                if let Some(leaks) = r.leaks.filter(|l| *l > 0) {
                    tracing::info!(src = %src.display(), leaks, "image has leaked clusters; conversion drops them");
                }
                if let Some(end) = r.image_end_offset {
                    // QEMU writes only the used start of an image's last cluster (a fresh
                    // `qemu-img create` file ends 8 bytes into its refcount block), and reads
                    // past the end as zeros: only a missing whole cluster is truncation.
                    let cluster = info.cluster_size.unwrap_or(512).max(512);
                    if end > src_len.div_ceil(cluster).saturating_mul(cluster) {
                        return Err(StorageError::Corrupt(format!(
                            "the image is truncated: its metadata ends at byte {end} but the file has {src_len} bytes"
                        )));
                    }
                }
            }
            qemu::CheckOutcome::Unsupported => {}
        }
    }
    match qemu::first_extent_beyond(src, &format, src_len).await? {
        Ok(None) => {}
        Ok(Some(e)) => {
            return Err(StorageError::Corrupt(format!(
                "the image is truncated: guest data at offset {} is stored at file offset {}..{} \
                 but the file has {src_len} bytes",
                e.start,
                e.offset.unwrap_or(0),
                e.offset.unwrap_or(0).saturating_add(e.length)
            )))
        }
        Err(msg) => {
            return Err(StorageError::Corrupt(format!(
                "qemu-img cannot map it: {msg}"
            )))
        }
    }
    Ok(info)
}

async fn import_disk(
    src: &Path,
    dest: &Path,
    format: Option<&str>,
    p: &Reporter,
) -> Result<ImageInfo, StorageError> {
    let explicit = format.map(normalize_disk_format).transpose()?;
    check_dest(dest).await?;
    let src_len = source_len(src).await?;
    if src_len == 0 {
        return Err(StorageError::Empty(format!("{} is empty", src.display())));
    }
    let info = validate_disk(src, src_len, explicit.as_deref()).await?;
    let format = info.format.clone();

    let tmp = TempFile::beside(dest)?;
    let conv_p = p.sub(0.0, 0.9);
    let on_progress = move |f: f64| conv_p.set(f);
    match qemu::convert_to_qcow2(src, &format, &tmp.path, &on_progress).await? {
        Ok(()) => {}
        Err(msg) if is_host_side_convert_error(&msg) => {
            return Err(StorageError::QemuImg {
                command: "convert".into(),
                message: msg,
            })
        }
        Err(msg) => {
            return Err(StorageError::Corrupt(format!(
                "the {format} image cannot be read: {msg}"
            )))
        }
    }
    let out = qemu::info_raw(&tmp.path, Some("qcow2"))
        .await?
        .map_err(|msg| StorageError::QemuImg {
            command: "info".into(),
            message: format!("converted image unreadable: {msg}"),
        })?;
    if out.virtual_size < info.virtual_size {
        return Err(StorageError::QemuImg {
            command: "convert".into(),
            message: format!(
                "converted image is {} bytes, source is {}",
                out.virtual_size, info.virtual_size
            ),
        });
    }
    let file_size = tokio::fs::metadata(&tmp.path)
        .await
        .map_err(|e| StorageError::io(format!("reading {}", tmp.path.display()), e))?
        .len();
    let (hash_path, hash_p) = (tmp.path.clone(), p.sub(0.9, 0.99));
    let sha256 = blocking(move || hash_blocking(&hash_path, Some(&hash_p))).await?;
    publish(tmp, dest).await?;
    Ok(ImageInfo {
        kind: ImageKind::Disk,
        source_format: format,
        virtual_size: out.virtual_size,
        file_size,
        sha256,
    })
}

/// Same as [`import_file`] from a byte stream (HTTP upload). The stream is spooled to a temp file
/// in `tmp_dir` first (removed in every case). `expected_len` when known (Content-Length): a
/// stream that ends early or errors is [`StorageError::Truncated`], and nothing is left behind.
/// Progress: 0..0.5 while receiving (only when `expected_len` is known), 0.5..1.0 for the import.
pub async fn import_stream<S>(
    mut stream: S,
    expected_len: Option<u64>,
    tmp_dir: &Path,
    dest: &Path,
    kind: ImageKind,
    format: Option<&str>,
    progress: Progress,
) -> Result<ImageInfo, StorageError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin + Send,
{
    let p = Reporter::new(progress);
    p.set(0.0);
    // Refuse what can be refused before receiving anything.
    match kind {
        ImageKind::Disk => {
            format.map(normalize_disk_format).transpose()?;
        }
        _ => check_blob_format(kind, format)?,
    }
    if expected_len == Some(0) {
        return Err(StorageError::Empty("the upload is empty".into()));
    }
    match tokio::fs::metadata(tmp_dir).await {
        Ok(m) if m.is_dir() => {}
        _ => return Err(StorageError::NotFound(tmp_dir.to_path_buf())),
    }
    check_dest(dest).await?;

    let spool = TempFile::in_dir(tmp_dir, "upload");
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&spool.path)
        .await
        .map_err(|e| StorageError::io(format!("creating {}", spool.path.display()), e))?;
    let mut out = tokio::io::BufWriter::with_capacity(CHUNK, file);
    let recv_p = p.sub(0.0, 0.5);
    let mut received: u64 = 0;
    while let Some(item) = stream.next().await {
        let chunk = item.map_err(|e| {
            StorageError::Truncated(format!("the upload failed after {received} bytes: {e}"))
        })?;
        received += chunk.len() as u64;
        if let Some(exp) = expected_len {
            if received > exp {
                return Err(StorageError::InvalidArgument(format!(
                    "the upload is longer than the announced {exp} bytes"
                )));
            }
            recv_p.set(received as f64 / exp as f64);
        }
        out.write_all(&chunk)
            .await
            .map_err(|e| StorageError::io(format!("writing {}", spool.path.display()), e))?;
    }
    if let Some(exp) = expected_len {
        if received < exp {
            return Err(StorageError::Truncated(format!(
                "the upload ended after {received} of {exp} bytes"
            )));
        }
    }
    if received == 0 {
        return Err(StorageError::Empty("the upload is empty".into()));
    }
    out.flush()
        .await
        .map_err(|e| StorageError::io(format!("writing {}", spool.path.display()), e))?;
    drop(out);
    import_inner(&spool.path, dest, kind, format, &p.sub(0.5, 1.0)).await
}

/// Copy-on-write clone: create a qcow2 overlay at `dest` backed by `backing` (qcow2), optionally
/// with a larger virtual size. O(1) in the backing size. The overlay records the backing file's
/// absolute path. `dest` must not exist.
pub async fn create_overlay(
    backing: &Path,
    dest: &Path,
    size: Option<u64>,
) -> Result<(), StorageError> {
    let backing = qemu::absolute(backing)?;
    if tokio::fs::metadata(&backing).await.is_err() {
        return Err(StorageError::NotFound(backing));
    }
    if size == Some(0) {
        return Err(StorageError::Empty("overlay size 0".into()));
    }
    check_dest(dest).await?;
    let info = qemu::info_raw(&backing, None).await?.map_err(|msg| {
        StorageError::InvalidArgument(format!(
            "backing file {} cannot be opened: {msg}",
            backing.display()
        ))
    })?;
    if info.format != "qcow2" {
        return Err(StorageError::InvalidArgument(format!(
            "backing file {} is {}, not qcow2",
            backing.display(),
            info.format
        )));
    }
    let size = match size {
        None => info.virtual_size,
        Some(s) if s < info.virtual_size => {
            return Err(StorageError::InvalidArgument(format!(
                "an overlay cannot be smaller than its backing image ({s} < {} bytes)",
                info.virtual_size
            )))
        }
        Some(s) => s,
    };
    if size == 0 {
        return Err(StorageError::Empty(
            "backing image has virtual size 0".into(),
        ));
    }
    let tmp = TempFile::beside(dest)?;
    qemu::create_qcow2(&tmp.path, size, Some(&backing)).await?;
    publish(tmp, dest).await
}

/// Create an empty (sparse, not preallocated) qcow2 disk of `size` bytes at `dest`, which must
/// not exist.
pub async fn create_blank(dest: &Path, size: u64) -> Result<(), StorageError> {
    if size == 0 {
        return Err(StorageError::Empty("disk size 0".into()));
    }
    check_dest(dest).await?;
    let tmp = TempFile::beside(dest)?;
    qemu::create_qcow2(&tmp.path, size, None).await?;
    publish(tmp, dest).await
}

/// Parsed `qemu-img info --output=json -U` (format detected by qemu-img).
pub async fn inspect(path: &Path) -> Result<QemuImgInfo, StorageError> {
    if tokio::fs::metadata(path).await.is_err() {
        return Err(StorageError::NotFound(path.to_path_buf()));
    }
    qemu::info_raw(path, None)
        .await?
        .map_err(|message| StorageError::QemuImg {
            command: "info".into(),
            message,
        })
}

/// sha256 (lowercase hex) of a file.
pub async fn sha256_file(path: &Path) -> Result<String, StorageError> {
    let path = path.to_path_buf();
    if tokio::fs::metadata(&path).await.is_err() {
        return Err(StorageError::NotFound(path));
    }
    blocking(move || hash_blocking(&path, None)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn reporter_is_monotonic_and_mapped() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let r = Reporter::new(Arc::new(move |f| s.lock().unwrap().push(f)));
        r.set(0.0);
        let half = r.sub(0.5, 1.0);
        let inner = half.sub(0.0, 0.5);
        inner.set(0.5); // 0.625
        inner.set(0.2); // backwards: ignored
        half.set(1.0);
        r.set(1.0); // already there: ignored
        assert_eq!(*seen.lock().unwrap(), vec![0.0, 0.625, 1.0]);
    }

    #[test]
    fn formats() {
        assert_eq!(normalize_disk_format("QCOW2").unwrap(), "qcow2");
        assert_eq!(normalize_disk_format("vhd").unwrap(), "vpc");
        assert!(matches!(
            normalize_disk_format("qed"),
            Err(StorageError::UnsupportedFormat(_))
        ));
    }
}
