use std::path::PathBuf;

/// Everything that can go wrong in this crate.
///
/// Variants up to and including [`StorageError::Conflict`] describe bad *input*
/// (the user's fault: answer 4xx); see [`StorageError::is_client_error`].
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file that qemu-img reports as `raw` (or that was forced to `raw`) does not look like a disk.
    #[error("not a disk image: {0}")]
    NotADiskImage(String),
    /// The detected or requested format is not one we import.
    #[error("unsupported image format {0:?} (supported: qcow2, raw, vmdk, vdi, vhdx, vpc/vhd)")]
    UnsupportedFormat(String),
    /// The image is damaged or truncated (qemu-img cannot open it, `qemu-img check` failed,
    /// or its metadata points past the end of the file).
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// The image is well-formed but refers to other files (backing file, external data file,
    /// multi-file VMDK) or is encrypted: importing it could read host files, so it is refused.
    #[error("image refused: {0}")]
    Unsafe(String),
    /// A kernel that is neither an x86 bzImage nor an ELF file.
    #[error("not a kernel: {0}")]
    InvalidKernel(String),
    /// A ramdisk that is neither compressed with a known compressor nor a newc cpio archive.
    #[error("not a ramdisk: {0}")]
    InvalidRamdisk(String),
    /// A zero-sized file, stream or requested size.
    #[error("empty image: {0}")]
    Empty(String),
    /// An argument that makes no sense (shrinking overlay, unknown format for a kernel, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The source file (or the destination's directory) does not exist.
    #[error("not found: {}", .0.display())]
    NotFound(PathBuf),
    /// The destination already exists; nothing is ever overwritten.
    #[error("destination already exists: {}", .0.display())]
    AlreadyExists(PathBuf),
    /// An upload stream ended before `expected_len` bytes, sent more than that, or failed.
    #[error("upload truncated: {0}")]
    Truncated(String),
    /// The operation does not exist for this kind of pool (e.g. snapshots in an lvm pool).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The pool (or the export's destination) is full: HTTP 507.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// Copying into `size` bytes would cut off guest data that ends at byte `data_end`.
    #[error("the disk holds data up to byte {data_end}, beyond the new size of {size} bytes")]
    DataBeyondSize { data_end: u64, size: u64 },
    /// The disk is in use (a running VM holds it) and the operation needs it stopped.
    #[error("busy: {0}")]
    Busy(String),
    /// The name is taken by something else (a disk of another size, an existing snapshot, ...).
    #[error("conflict: {0}")]
    Conflict(String),

    /// Local I/O failure.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` could not be run, timed out, or failed on an image we created ourselves.
    #[error("qemu-img {command} failed: {message}")]
    QemuImg { command: String, message: String },
    /// `qemu-img` printed something we could not parse.
    #[error("could not parse qemu-img output: {0}")]
    Parse(String),
    /// An LVM tool (`lvcreate`, `vgs`, ...) or `blkdiscard` could not be run or failed.
    #[error("{command} failed: {message}")]
    Lvm { command: String, message: String },
}

impl StorageError {
    /// True when the error is caused by the caller's input (HTTP 4xx), false for host-side failures.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            StorageError::Io { .. }
                | StorageError::QemuImg { .. }
                | StorageError::Parse(_)
                | StorageError::Lvm { .. }
        )
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}
