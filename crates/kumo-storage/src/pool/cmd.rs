//! The external commands pools run: qemu-img (with progress), LVM tools, blkdiscard.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::qemu::{self, QemuImgInfo};
use crate::StorageError;

/// Limit for the quick qemu-img commands (create, resize, info); conversions have none.
const QUICK_TIMEOUT: Duration = Duration::from_secs(300);
/// LVM commands wait on LVM's own locks; give up eventually rather than hang an agent.
const LVM_TIMEOUT: Duration = Duration::from_secs(600);

pub(super) fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// A tool's stderr on one line, shortened.
pub(super) fn tidy(stderr: &str) -> String {
    let s = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if s.len() > 2000 {
        let mut cut = 2000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{} ...", &s[..cut])
    } else {
        s
    }
}

/// A failed qemu-img run: a full pool and an image in use are the caller's business.
pub(super) fn qemu_failure(command: &str, message: String) -> StorageError {
    let m = message.to_ascii_lowercase();
    if m.contains("no space left on device") || m.contains("disk quota exceeded") {
        StorageError::NoSpace(message)
    } else if m.contains("failed to get") && m.contains("lock") {
        StorageError::Busy(format!("the disk is in use by another process: {message}"))
    } else {
        StorageError::QemuImg {
            command: command.into(),
            message,
        }
    }
}

/// Runs a quick `qemu-img ARGS`; a failure becomes an error.
pub(super) async fn qemu_img(args: Vec<OsString>) -> Result<(), StorageError> {
    let name = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = qemu::run(args, false, Some(QUICK_TIMEOUT)).await?;
    if !out.status.success() {
        return Err(qemu_failure(&name, out.stderr_summary()));
    }
    Ok(())
}

/// `qemu-img create -f qcow2 [-b BACKING -F FMT -u] DEST SIZE`. The backing path must be
/// absolute and already checked by the caller (`-u`: O(1), and no lock conflict with a QEMU
/// that uses it).
pub(super) async fn create_qcow2(
    dest: &Path,
    size: u64,
    backing: Option<(&Path, &str)>,
) -> Result<(), StorageError> {
    let mut args = vec![os("create"), os("-q"), os("-f"), os("qcow2")];
    if let Some((b, fmt)) = backing {
        args.extend([os("-b"), os(b), os("-F"), os(fmt), os("-u")]);
    }
    args.extend([os(dest), os(size.to_string())]);
    qemu_img(args).await
}

/// `qemu-img resize [--shrink] -f FMT PATH SIZE` on a file nobody else uses.
pub(super) async fn resize(
    path: &Path,
    format: &str,
    size: u64,
    shrink: bool,
) -> Result<(), StorageError> {
    let mut args = vec![os("resize"), os("-q")];
    if shrink {
        args.push(os("--shrink"));
    }
    args.extend([os("-f"), os(format), os(path), os(size.to_string())]);
    qemu_img(args).await
}

/// `qemu-img info -U` of an input the caller named (an image, a restore source): a file that
/// qemu-img refuses is the caller's mistake.
pub(super) async fn input_info(path: &Path, format: &str) -> Result<QemuImgInfo, StorageError> {
    if tokio::fs::metadata(path).await.is_err() {
        return Err(StorageError::NotFound(path.to_path_buf()));
    }
    qemu::info_raw(path, Some(format)).await?.map_err(|msg| {
        StorageError::InvalidArgument(format!(
            "{} cannot be opened as {format}: {msg}",
            path.display()
        ))
    })
}

/// `qemu-img info -U --backing-chain`: the image first, then its backing files.
pub(super) async fn backing_chain(
    path: &Path,
    format: &str,
) -> Result<Vec<QemuImgInfo>, StorageError> {
    let args = vec![
        os("info"),
        os("--output=json"),
        os("-U"),
        os("--backing-chain"),
        os("-f"),
        os(format),
        os(path),
    ];
    let out = qemu::run(args, true, Some(QUICK_TIMEOUT)).await?;
    if !out.status.success() {
        return Err(qemu_failure("info", out.stderr_summary()));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| StorageError::Parse(format!("qemu-img info --backing-chain: {e}")))
}

/// Fails with [`StorageError::Busy`] when a running QEMU holds the image (`qemu-img info`
/// without `-U` cannot take its shared lock then).
pub(super) async fn ensure_idle(path: &Path, format: &str, what: &str) -> Result<(), StorageError> {
    let args = vec![
        os("info"),
        os("--output=json"),
        os("-f"),
        os(format),
        os(path),
    ];
    let out = qemu::run(args, true, Some(QUICK_TIMEOUT)).await?;
    if out.status.success() {
        return Ok(());
    }
    let msg = out.stderr_summary();
    if msg.contains("lock") {
        Err(StorageError::Busy(format!(
            "{what} is in use (stop the VM that uses it first): {msg}"
        )))
    } else {
        Err(qemu_failure("info", msg))
    }
}

/// `qemu-img convert -p ARGS`, reporting 0..1 through `on_progress`. Killed if the future is
/// dropped.
pub(super) async fn convert(
    args: Vec<OsString>,
    on_progress: &(dyn Fn(f64) + Send + Sync),
) -> Result<(), StorageError> {
    let mut all = vec![os("convert"), os("-p")];
    all.extend(args);
    let (status, stderr) = qemu::run_with_progress(&all, on_progress).await?;
    if !status.success() {
        let msg = tidy(&stderr);
        return Err(qemu_failure(
            "convert",
            if msg.is_empty() {
                status.to_string()
            } else {
                msg
            },
        ));
    }
    Ok(())
}

/// A system tool by name: `PATH`, then the sbin directories (a test harness's PATH may lack them).
pub(super) fn find_tool(name: &str) -> PathBuf {
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.into_iter()
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// What an LVM tool (or blkdiscard) printed.
pub(super) struct ToolOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `name ARGS` (LVM tools, blkdiscard). Only failing to run it at all is an error here.
pub(super) async fn tool(name: &str, args: &[OsString]) -> Result<ToolOutput, StorageError> {
    let bin = find_tool(name);
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .env("LC_ALL", "C")
        // LVM complains about every inherited descriptor otherwise.
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(LVM_TIMEOUT, cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return Err(StorageError::Lvm {
                command: name.into(),
                message: format!(
                    "cannot run {}: {e} (is lvm2/util-linux installed?)",
                    bin.display()
                ),
            })
        }
        Err(_) => {
            return Err(StorageError::Lvm {
                command: name.into(),
                message: format!("timed out after {}s", LVM_TIMEOUT.as_secs()),
            })
        }
    };
    Ok(ToolOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: tidy(&String::from_utf8_lossy(&out.stderr)),
    })
}

/// Runs a tool that must succeed.
pub(super) async fn tool_ok(name: &str, args: &[OsString]) -> Result<String, StorageError> {
    let out = tool(name, args).await?;
    if out.ok {
        Ok(out.stdout)
    } else {
        Err(StorageError::Lvm {
            command: name.into(),
            message: out.stderr,
        })
    }
}
