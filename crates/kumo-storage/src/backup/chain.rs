//! The qemu-img side of the backup repository: checking files, hashing a chain's virtual
//! content, rebasing.
//!
//! The chain is hashed without a scratch copy: `qemu-img map` says, for every extent of the
//! virtual disk, which layer holds it and at which host offset (or that it reads as zeros), and
//! the data clusters are read straight from those files. Backups are plain qcow2 written by
//! QEMU's backup job or `qemu-img rebase`: no compression, no external data file, so every data
//! extent has a host offset in its own layer; anything else is refused rather than guessed.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::qemu::{self, CheckOutcome, QemuImgInfo};
use crate::StorageError;

const READ_CHUNK: usize = 4 << 20;
const INFO_TIMEOUT: Duration = Duration::from_secs(120);

fn os(s: &str) -> OsString {
    OsString::from(s)
}

fn qemu_img_failed(command: &str, message: String) -> StorageError {
    StorageError::QemuImg {
        command: command.into(),
        message,
    }
}

/// `qemu-img check` of one backup file: leaked clusters are harmless, anything worse is not.
pub(super) async fn check(file: &Path) -> Result<(), StorageError> {
    match qemu::check(file, "qcow2").await? {
        CheckOutcome::Clean(_) | CheckOutcome::Leaks(_) => Ok(()),
        CheckOutcome::Corrupt(msg) => {
            Err(StorageError::Corrupt(format!("{}: {msg}", file.display())))
        }
        CheckOutcome::Unsupported => Err(qemu_img_failed(
            "check",
            format!("{} cannot be checked", file.display()),
        )),
    }
}

/// `qemu-img info --backing-chain` of a chain of qcow2 files, top first.
pub(super) async fn chain_info(top: &Path) -> Result<Vec<QemuImgInfo>, StorageError> {
    let top = qemu::absolute(top)?;
    let args = vec![
        os("info"),
        os("--output=json"),
        os("-U"),
        os("--backing-chain"),
        os("-f"),
        os("qcow2"),
        top.clone().into_os_string(),
    ];
    let out = qemu::run(args, false, Some(INFO_TIMEOUT)).await?;
    if !out.status.success() {
        return Err(StorageError::Corrupt(format!(
            "cannot open the chain of {}: {}",
            top.display(),
            out.stderr_summary()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| StorageError::Parse(format!("qemu-img info --backing-chain: {e}")))
}

/// sha256 (lowercase hex) of the whole virtual content of the chain whose top is `top`, and
/// the virtual size it covers.
pub(super) async fn content_sha256(top: &Path) -> Result<(String, u64), StorageError> {
    let top = qemu::absolute(top)?;
    let infos = chain_info(&top).await?;
    let mut files: Vec<PathBuf> = Vec::with_capacity(infos.len());
    for (depth, info) in infos.iter().enumerate() {
        if info.format != "qcow2" {
            return Err(StorageError::Corrupt(format!(
                "layer {} of the chain of {} is {}, not qcow2",
                info.filename,
                top.display(),
                info.format
            )));
        }
        if info.format_specific_data("data-file").is_some() {
            return Err(StorageError::Unsafe(format!(
                "{} has an external data file",
                info.filename
            )));
        }
        let path = match depth {
            0 => top.clone(),
            _ => {
                let p = PathBuf::from(&info.filename);
                if p.is_absolute() {
                    p
                } else {
                    crate::parent_dir(&files[depth - 1]).join(p)
                }
            }
        };
        files.push(path);
    }
    let size = infos.first().map(|i| i.virtual_size).unwrap_or(0);
    let sha = crate::blocking(move || hash_blocking(&files, size)).await?;
    Ok((sha, size))
}

/// One extent of `qemu-img map --output=json` on a chain.
#[derive(Debug, Deserialize)]
struct Extent {
    start: u64,
    length: u64,
    #[serde(default)]
    depth: usize,
    #[serde(default)]
    zero: bool,
    #[serde(default)]
    data: bool,
    #[serde(default)]
    offset: Option<u64>,
}

/// Kills and reaps `qemu-img map` if hashing stops early.
struct MapChild(Child);

impl Drop for MapChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn hash_blocking(files: &[PathBuf], size: u64) -> Result<String, StorageError> {
    let top = &files[0];
    let mut child = MapChild(
        Command::new(qemu::qemu_img_bin())
            .args(["map", "--output=json", "-U", "-f", "qcow2"])
            .arg(top)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| qemu_img_failed("map", format!("cannot run qemu-img: {e}")))?,
    );
    let (Some(stdout), Some(mut stderr)) = (child.0.stdout.take(), child.0.stderr.take()) else {
        return Err(qemu_img_failed("map", "no pipes to the child".into()));
    };
    // Drained on the side so a chatty stderr can never block the map output.
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut opened: Vec<Option<std::fs::File>> = files.iter().map(|_| None).collect();
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; READ_CHUNK];
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos: u64 = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| qemu_img_failed("map", format!("reading output: {e}")))?;
        // One extent per line: `[{ ... },` / `{ ... },` / `{ ... }]`.
        let t = line.trim().trim_start_matches('[').trim_end_matches(',');
        let t = t.strip_suffix(']').unwrap_or(t).trim();
        if t.is_empty() {
            continue;
        }
        let e: Extent = serde_json::from_str(t)
            .map_err(|err| StorageError::Parse(format!("qemu-img map line {line:?}: {err}")))?;
        if e.start != pos {
            return Err(StorageError::Parse(format!(
                "qemu-img map skipped from {pos} to {}",
                e.start
            )));
        }
        if e.zero {
            feed_zeros(&mut hasher, &zeros, e.length);
        } else if e.data {
            let (Some(offset), Some(path)) = (e.offset, files.get(e.depth)) else {
                return Err(StorageError::Unsafe(format!(
                    "extent {}+{} of {} has no host offset (compressed?)",
                    e.start,
                    e.length,
                    top.display()
                )));
            };
            let file =
                match &mut opened[e.depth] {
                    Some(f) => f,
                    slot => slot.insert(std::fs::File::open(path).map_err(|err| {
                        StorageError::io(format!("opening {}", path.display()), err)
                    })?),
                };
            let mut done = 0u64;
            while done < e.length {
                let n = (e.length - done).min(READ_CHUNK as u64) as usize;
                file.read_exact_at(&mut buf[..n], offset + done)
                    .map_err(|err| StorageError::io(format!("reading {}", path.display()), err))?;
                hasher.update(&buf[..n]);
                done += n as u64;
            }
        } else {
            return Err(StorageError::Parse(format!(
                "qemu-img map cannot tell the content of {}+{} of {}",
                e.start,
                e.length,
                top.display()
            )));
        }
        pos += e.length;
    }
    let status = child
        .0
        .wait()
        .map_err(|e| qemu_img_failed("map", format!("waiting for qemu-img: {e}")))?;
    let stderr = stderr_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(StorageError::Corrupt(format!(
            "qemu-img map of {} failed: {}",
            top.display(),
            stderr.trim()
        )));
    }
    if pos != size {
        return Err(StorageError::Parse(format!(
            "qemu-img map covered {pos} of {size} bytes of {}",
            top.display()
        )));
    }
    Ok(hex::encode(hasher.finalize()))
}

fn feed_zeros(hasher: &mut Sha256, zeros: &[u8], mut len: u64) {
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        hasher.update(&zeros[..n]);
        len -= n as u64;
    }
}

/// `qemu-img rebase` (safe mode) of `child` onto `backing` (a file name relative to the child's
/// directory), or onto nothing: the child then holds everything it used to read through.
pub(super) async fn rebase(child: &Path, backing: Option<&str>) -> Result<(), StorageError> {
    let child = qemu::absolute(child)?;
    let mut args = vec![os("rebase"), os("-q"), os("-f"), os("qcow2")];
    match backing {
        Some(b) => args.extend([os("-F"), os("qcow2"), os("-b"), os(b)]),
        None => args.extend([os("-b"), os("")]),
    }
    args.push(child.clone().into_os_string());
    let out = qemu::run(args, false, None).await?;
    if !out.status.success() {
        return Err(qemu_img_failed(
            "rebase",
            format!("{}: {}", child.display(), out.stderr_summary()),
        ));
    }
    Ok(())
}
