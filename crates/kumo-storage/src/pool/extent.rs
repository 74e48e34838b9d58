//! Where an image's data ends: decides whether a copy into a smaller disk would lose data.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::cmd::{backing_chain, qemu_failure, tidy};
use crate::{blocking, qemu, StorageError};

/// One extent of `qemu-img map --output=json` (QEMU 7.2 fields).
#[derive(Debug, Clone, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    #[serde(default)]
    depth: usize,
    #[serde(default)]
    zero: bool,
    #[serde(default)]
    data: bool,
    /// Host offset of the data in the file at `depth` (absent for compressed clusters).
    #[serde(default)]
    offset: Option<u64>,
}

/// A data extent and where its bytes can be read directly, if they can.
struct DataExtent {
    start: u64,
    length: u64,
    host: Option<(PathBuf, u64)>,
}

const SCAN_CHUNK: u64 = 1 << 20;

/// Offset just past the last byte of non-zero data in an image (0 for an empty one), reading only
/// allocated extents (`qemu-img map -U --output=json`, then the bytes of data extents that
/// qemu-img cannot prove zero). Extents whose bytes cannot be read directly (compressed clusters,
/// formats other than raw and qcow2, encryption, external data files) count as data.
pub async fn data_end(path: &Path, format: &str) -> Result<u64, StorageError> {
    let path = qemu::absolute(path)?;
    if tokio::fs::metadata(&path).await.is_err() {
        return Err(StorageError::NotFound(path));
    }
    let chain = backing_chain(&path, format).await?;
    // The file at each depth of the chain, when its data clusters are plain bytes at `offset`.
    let readable: Vec<Option<PathBuf>> = chain
        .iter()
        .map(|i| {
            let plain = match i.format.as_str() {
                "raw" => true,
                "qcow2" => {
                    i.encrypted != Some(true) && i.format_specific_data("data-file").is_none()
                }
                _ => false,
            };
            plain.then(|| PathBuf::from(&i.filename))
        })
        .collect();
    let extents = map_data_extents(&path, format, &readable).await?;
    blocking(move || last_nonzero(&extents)).await
}

/// Streams `qemu-img map` (it can be long) and keeps the extents that may hold data.
async fn map_data_extents(
    path: &Path,
    format: &str,
    readable: &[Option<PathBuf>],
) -> Result<Vec<DataExtent>, StorageError> {
    let mut child = Command::new(qemu::qemu_img_bin())
        .args(["map", "--output=json", "-U", "-f", format])
        .arg(path)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| StorageError::QemuImg {
            command: "map".into(),
            message: format!("cannot run qemu-img: {e}"),
        })?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(StorageError::QemuImg {
            command: "map".into(),
            message: "no pipes to the child".into(),
        });
    };
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut s).await;
        s
    });
    let mut out = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| StorageError::QemuImg {
        command: "map".into(),
        message: format!("reading output: {e}"),
    })? {
        // QEMU prints one extent per line: `[{ ... },` / `{ ... },` / `{ ... }]`.
        let t = line.trim().trim_start_matches('[').trim_end_matches(',');
        let t = t.strip_suffix(']').unwrap_or(t).trim();
        if t.is_empty() {
            continue;
        }
        let e: MapEntry = serde_json::from_str(t)
            .map_err(|err| StorageError::Parse(format!("qemu-img map line {line:?}: {err}")))?;
        if !e.data || e.zero || e.length == 0 {
            continue;
        }
        let host = match (readable.get(e.depth), e.offset) {
            (Some(Some(file)), Some(off)) => Some((file.clone(), off)),
            _ => None,
        };
        out.push(DataExtent {
            start: e.start,
            length: e.length,
            host,
        });
    }
    let status = child.wait().await.map_err(|e| StorageError::QemuImg {
        command: "map".into(),
        message: format!("waiting for qemu-img: {e}"),
    })?;
    let stderr = stderr_task.await.unwrap_or_default();
    if !status.success() {
        return Err(qemu_failure("map", tidy(&stderr)));
    }
    Ok(out)
}

/// Scans the data extents from the end for the last non-zero byte.
fn last_nonzero(extents: &[DataExtent]) -> Result<u64, StorageError> {
    let mut buf = vec![0u8; SCAN_CHUNK as usize];
    for e in extents.iter().rev() {
        let Some((file, off)) = &e.host else {
            return Ok(e.start + e.length);
        };
        let f = std::fs::File::open(file)
            .map_err(|err| StorageError::io(format!("opening {}", file.display()), err))?;
        let mut end = e.length;
        while end > 0 {
            let begin = end.saturating_sub(SCAN_CHUNK);
            let chunk = &mut buf[..(end - begin) as usize];
            let n = read_full_at(&f, chunk, off + begin)
                .map_err(|err| StorageError::io(format!("reading {}", file.display()), err))?;
            // Bytes past the end of the file read as zeros, as in QEMU.
            chunk[n..].fill(0);
            if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
                return Ok(e.start + begin + i as u64 + 1);
            }
            end = begin;
        }
    }
    Ok(0)
}

fn read_full_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
