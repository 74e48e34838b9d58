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

/// Binds a listening TCP socket to `addr` inside the namespace at `ns_path`. Like [`connect_in`] it must run
/// on a thread of its own: it enters the namespace, binds (std sets SO_REUSEADDR and listens), and switches
/// back; the socket keeps serving inside the namespace it was made in.
pub fn bind_tcp_in(
    ns_path: &Path,
    addr: SocketAddr,
) -> Result<std::net::TcpListener, NetworkError> {
    // NetworkError has no bind variant; the path names both the namespace and the address.
    let bind_err = |source| NetworkError::Io {
        path: PathBuf::from(format!("{} (binding {addr})", ns_path.display())),
        source,
    };
    let own_path = Path::new("/proc/thread-self/ns/net");
    let own = File::open(own_path).map_err(io_err(own_path))?;
    let target = File::open(ns_path).map_err(io_err(ns_path))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(|source| NetworkError::Sys {
        call: "setns",
        source,
    })?;
    let result = std::net::TcpListener::bind(addr).map_err(bind_err);
    if let Err(source) = setns(&own, CloneFlags::CLONE_NEWNET) {
        // The thread exits right after this; nothing else ever runs in it.
        tracing::warn!(error = %source, "could not switch bind thread back to its namespace");
    }
    let listener = result?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// Binds a tokio TCP listener to `addr` inside the named namespace (`/run/netns/NAME`), e.g. the metadata
/// service on 169.254.169.254:80 in a network's router namespace. The bind runs on a dedicated thread so
/// no tokio worker ever changes namespace.
pub async fn bind_tcp_in_netns(
    ns_name: &str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, NetworkError> {
    check_name(ns_name)?;
    let ns_path = path(ns_name);
    let thread_err = |source| NetworkError::Io {
        path: PathBuf::from(format!("{} (binding {addr})", path(ns_name).display())),
        source,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kumo-netns-bind".into())
        .spawn(move || {
            let _ = tx.send(bind_tcp_in(&ns_path, addr));
        })
        .map_err(thread_err)?;
    let listener = rx
        .await
        .map_err(|_| thread_err(std::io::Error::other("bind thread ended without an answer")))??;
    tokio::net::TcpListener::from_std(listener).map_err(thread_err)
}
