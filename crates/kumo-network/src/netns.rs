//! Named network namespaces (`/run/netns/NAME`, as made by `ip netns add`) and connecting from inside one.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::cmd;
use crate::error::{io_err, NetworkError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

pub(crate) fn check_name(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::InvalidSpec(format!(
            "namespace name {name:?} must be 1-64 chars of A-Z a-z 0-9 _ . -"
        )))
    }
}

pub(crate) fn exists(name: &str) -> bool {
    path(name).exists()
}

/// The inode identifying a namespace (`None` = the current one); compared with `/proc/PID/ns/net`.
pub(crate) fn inode(name: Option<&str>) -> Result<u64, NetworkError> {
    let p = match name {
        Some(n) => path(n),
        // The calling thread's namespace: a thread may have entered another one than the process.
        None => PathBuf::from("/proc/thread-self/ns/net"),
    };
    std::fs::metadata(&p).map(|m| m.ino()).map_err(io_err(p))
}

/// Creates the namespace (tolerating a concurrent creator) and brings its loopback up.
pub(crate) async fn create(ip: &Path, name: &str) -> Result<(), NetworkError> {
    let add = cmd::run(ip, &["netns".into(), "add".into(), name.into()], None).await;
    if let Err(e) = add {
        if !exists(name) {
            return Err(e);
        }
    }
    cmd::run(
        ip,
        &[
            "-n".into(),
            name.into(),
            "link".into(),
            "set".into(),
            "lo".into(),
            "up".into(),
        ],
        None,
    )
    .await?;
    Ok(())
}

pub(crate) async fn delete(ip: &Path, name: &str) -> Result<(), NetworkError> {
    if exists(name) {
        cmd::run(ip, &["netns".into(), "del".into(), name.into()], None).await?;
    }
    Ok(())
}

/// Connects to `addr` from inside the namespace at `ns_path`. Must run on a thread of its own: it switches
/// that thread's network namespace, connects (the socket stays in the namespace it was made in), and
/// switches back.
pub(crate) fn connect_in(
    ns_path: &Path,
    addr: SocketAddr,
) -> Result<std::net::TcpStream, NetworkError> {
    let own_path = Path::new("/proc/thread-self/ns/net");
    let own = File::open(own_path).map_err(io_err(own_path))?;
    let target = File::open(ns_path).map_err(io_err(ns_path))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(|source| NetworkError::Sys {
        call: "setns",
        source,
    })?;
    let result = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|source| NetworkError::Connect { addr, source });
    if let Err(source) = setns(&own, CloneFlags::CLONE_NEWNET) {
        // The thread exits right after this; nothing else ever runs in it.
        tracing::warn!(error = %source, "could not switch connect thread back to its namespace");
    }
    let stream = result?;
    stream
        .set_nonblocking(true)
        .map_err(|source| NetworkError::Connect { addr, source })?;
    Ok(stream)
}
