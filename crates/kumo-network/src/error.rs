//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while making the host match the desired network state.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The desired state is malformed or self-contradictory; nothing was changed.
    #[error("invalid network spec: {0}")]
    InvalidSpec(String),
    /// A required program (`ip`, `dnsmasq`) is not installed.
    #[error("program `{0}` not found in PATH, /usr/sbin or /sbin")]
    ProgramNotFound(&'static str),
    /// A program could not be started.
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// A program did not finish in time (it was killed).
    #[error("`{command}` did not finish within {seconds} s")]
    Timeout { command: String, seconds: u64 },
    /// The output of `ip -j` could not be understood.
    #[error("could not parse the output of `{command}`")]
    Parse {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    /// Reading or writing a file in the state directory (or /proc, /run/netns) failed.
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An interface with a desired name exists, is of another kind, and kumo did not create it.
    #[error("interface {name} exists as a {found} device, expected {expected}; it was not created by kumo, refusing to replace it")]
    Conflict {
        name: String,
        found: String,
        expected: &'static str,
    },
    /// A network's router namespace is not as the links were just made (e.g. its gateway end missing).
    #[error("router namespace {ns}: {detail}")]
    Router { ns: String, detail: String },
    /// dnsmasq for a network could not be started or stopped.
    #[error("dnsmasq for network {network}: {detail}")]
    Dnsmasq { network: String, detail: String },
    /// A system call (setns, kill) failed.
    #[error("system call {call} failed")]
    Sys {
        call: &'static str,
        #[source]
        source: nix::Error,
    },
    /// A TCP connection could not be opened.
    #[error("could not connect to {addr}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> NetworkError {
    let path = path.into();
    move |source| NetworkError::Io { path, source }
}
