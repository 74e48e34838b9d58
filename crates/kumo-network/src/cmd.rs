//! Running external programs (`ip`, `dnsmasq`) with timeouts and useful errors.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::NetworkError;

/// Every external command gets this long before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds `name` in PATH, then in the sbin directories (which a non-login PATH may lack).
pub(crate) fn find_program(name: &'static str) -> Result<PathBuf, NetworkError> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let fallback = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    from_path
        .into_iter()
        .chain(fallback)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(NetworkError::ProgramNotFound(name))
}

pub(crate) fn describe(program: &Path, args: &[String]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs a program to completion, feeding it `stdin`, and returns its stdout; a non-zero exit is an error.
pub(crate) async fn run(
    program: &Path,
    args: &[String],
    stdin: Option<&str>,
) -> Result<String, NetworkError> {
    let command = describe(program, args);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| NetworkError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|source| NetworkError::Spawn {
                command: command.clone(),
                source,
            })?;
        drop(pipe);
    }
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| NetworkError::Timeout {
            command: command.clone(),
            seconds: COMMAND_TIMEOUT.as_secs(),
        })?
        .map_err(|source| NetworkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NetworkError::Command {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}
