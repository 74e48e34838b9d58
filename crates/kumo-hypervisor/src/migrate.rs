//! Live migration through QMP (QEMU 7.2), as measured in ENVIRONMENT.md's storage-migration
//! recipe.
//!
//! Destination ([`incoming`]): QEMU started `-incoming defer -S`, capability
//! `late-block-activate` (so a shared-pool destination does not take the image locks before its
//! `cont`, and a source rolled back after completion can take them again) and `return-path`
//! (on both ends: the source then reports `completed` only once the destination has loaded the
//! state; without it the source "completed" into the loopback socket buffers of a SIGSTOPped
//! destination that had read nothing), storage mode:
//! `nbd-server-start` + one writable `block-export-add` per writable disk, then
//! `migrate-incoming tcp:IP:0` (QEMU picks the port; `query-migrate` tells it). Its answer is
//! kept in `run_dir/incoming.json` so a repeated call returns the same URIs.
//!
//! Source ([`outgoing`]): `drive-mirror` every writable disk into its NBD target (job ids
//! `mig-<device id>`, kept after they end until dismissed so their errors can be read), wait for
//! all READY, `migrate`, wait for `completed`, then `block-job-cancel` the mirrors (a READY
//! mirror then copies what is left and ends with the target consistent) while the destination
//! still sits in `-S`. Anything going wrong rolls back: `migrate_cancel`, force-cancel of every
//! `mig-` job, `cont`. A job cannot end while its NBD requests hang on a destination that stopped
//! answering (the kernel still ACKs a SIGSTOPped process), so after a grace period the NBD
//! connections and the migration socket are shut down with QMP `yank`.

mod incoming;
mod outgoing;

pub(crate) use outgoing::{check_migrate_spec, check_targets};

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::qmp::{Qmp, QmpError};
use crate::HypervisorError;

/// Prefix of the mirror job ids: `mig-<device id>` (device ids are at most 26 characters).
pub(crate) const JOB_PREFIX: &str = "mig-";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often jobs and the migration are polled (the progress callback is called as often).
const POLL: Duration = Duration::from_millis(250);
/// The memory phase is short and its end pauses the guest until the controller commits the
/// destination: notice it quickly.
pub(crate) const MEMORY_POLL: Duration = Duration::from_millis(20);
/// A cancelled job or migration gets this long before its sockets are yanked…
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// …and this long after.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(20);
/// Migration states in which a migration still runs (QAPI `MigrationStatus`).
const ACTIVE_STATES: [&str; 10] = [
    "setup",
    "active",
    "cancelling",
    "pre-switchover",
    "device",
    "wait-unplug",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover",
    "colo",
];

/// QMP errors of a VM: a closed connection means QEMU is gone.
fn qmp_err(id: &str) -> impl Fn(QmpError) -> HypervisorError + '_ {
    move |e| match e {
        QmpError::Closed => HypervisorError::NotRunning(id.to_string()),
        e => HypervisorError::Qmp(e),
    }
}

async fn exec(q: &Qmp, id: &str, cmd: &str, args: Value) -> Result<Value, HypervisorError> {
    q.execute_with_timeout(cmd, args, COMMAND_TIMEOUT)
        .await
        .map_err(qmp_err(id))
}

/// An address a destination can listen on for the source: not a wildcard, not multicast.
pub(crate) fn check_listen_ip(ip: IpAddr) -> Result<(), HypervisorError> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(HypervisorError::InvalidSpec(format!(
            "listen_ip {ip} must be an address of this host the source can reach"
        )));
    }
    Ok(())
}

/// `tcp:` URI of a migration stream.
pub(crate) fn tcp_uri(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("tcp:{v4}:{port}"),
        IpAddr::V6(v6) => format!("tcp:[{v6}]:{port}"),
    }
}

/// NBD URI of an export, in the `nbd:HOST:PORT:exportname=E` form QEMU's drive-mirror accepts;
/// IPv6 needs the URI form (`nbd://[::1]:PORT/E`).
pub(crate) fn nbd_uri(ip: IpAddr, port: u16, export: &str) -> String {
    match ip {
        IpAddr::V4(v4) => format!("nbd:{v4}:{port}:exportname={export}"),
        IpAddr::V6(v6) => format!("nbd://[{v6}]:{port}/{export}"),
    }
}

fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
}

/// `HOST:PORT` with HOST an IPv4 address, a DNS name or a bracketed IPv6 address.
fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (h, p) = rest.split_once("]:")?;
            h.parse::<std::net::Ipv6Addr>().ok()?;
            (h, p)
        }
        None => {
            let (h, p) = s.rsplit_once(':')?;
            if !is_hostname(h) {
                return None;
            }
            (h, p)
        }
    };
    let port: u16 = port.parse().ok()?;
    (port != 0).then(|| (host.to_string(), port))
}

/// Check a `tcp:HOST:PORT` migration URI.
fn check_tcp_uri(uri: &str) -> Result<(), HypervisorError> {
    uri.strip_prefix("tcp:")
        .and_then(parse_host_port)
        .map(|_| ())
        .ok_or_else(|| {
            HypervisorError::InvalidSpec(format!(
                "migrate URI {uri:?} is not tcp:HOST:PORT (port 1-65535)"
            ))
        })
}

/// Check an NBD target URI (`nbd:HOST:PORT:exportname=E` or `nbd://HOST:PORT/E`); returns the
/// export name.
fn check_nbd_uri(uri: &str) -> Result<String, HypervisorError> {
    let parsed = if let Some(rest) = uri.strip_prefix("nbd://") {
        rest.split_once('/')
            .and_then(|(hp, e)| parse_host_port(hp).map(|_| e))
    } else if let Some(rest) = uri.strip_prefix("nbd:") {
        rest.split_once(":exportname=")
            .and_then(|(hp, e)| parse_host_port(hp).map(|_| e))
    } else {
        None
    };
    match parsed {
        Some(e)
            if !e.is_empty()
                && e.len() <= 64
                && e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) =>
        {
            Ok(e.to_string())
        }
        _ => Err(HypervisorError::InvalidSpec(format!(
            "NBD URI {uri:?} is neither nbd:HOST:PORT:exportname=NAME nor nbd://HOST:PORT/NAME"
        ))),
    }
}

/// `query-migrate`'s status (`none` when no migration ever ran).
async fn migration_status(q: &Qmp, id: &str) -> Result<String, HypervisorError> {
    let v = exec(q, id, "query-migrate", Value::Null).await?;
    Ok(v["status"].as_str().unwrap_or("none").to_string())
}

fn is_active(status: &str) -> bool {
    ACTIVE_STATES.contains(&status)
}

/// Every migration mirror job (`query-block-jobs` entries with our prefix), running or ended.
async fn mirror_jobs(q: &Qmp, id: &str) -> Result<Vec<Value>, HypervisorError> {
    let v = exec(q, id, "query-block-jobs", Value::Null).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|j| {
            j["device"]
                .as_str()
                .is_some_and(|d| d.starts_with(JOB_PREFIX))
        })
        .cloned()
        .collect())
}

/// Shut down the NBD client connections of mirror targets. drive-mirror opens its target by
/// URI, so its NBD node has an automatic name (`#block…`); the VM's own disks always have
/// names kumo gave them.
async fn yank_mirror_targets(q: &Qmp, id: &str) -> Result<(), HypervisorError> {
    let nodes = exec(q, id, "query-named-block-nodes", json!({ "flat": true })).await?;
    let nbd_nodes: Vec<&str> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["drv"] == "nbd")
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with('#'))
        .collect();
    let yankable = exec(q, id, "query-yank", Value::Null).await?;
    let instances: Vec<Value> = yankable
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| {
            i["type"] == "block-node"
                && i["node-name"]
                    .as_str()
                    .is_some_and(|n| nbd_nodes.contains(&n))
        })
        .cloned()
        .collect();
    if instances.is_empty() {
        return Ok(());
    }
    tracing::warn!(%id, ?instances, "mirror targets do not answer: yanking their NBD connections");
    exec(q, id, "yank", json!({ "instances": instances }))
        .await
        .map(|_| ())
}

/// Cancel a running migration, yanking its socket if the cancel does not finish.
async fn cancel_migration(q: &Qmp, id: &str) -> Result<(), HypervisorError> {
    if !is_active(&migration_status(q, id).await?) {
        return Ok(());
    }
    tracing::info!(%id, "cancelling the migration");
    if let Err(e) = exec(q, id, "migrate_cancel", Value::Null).await {
        tracing::debug!(%id, error = %e, "migrate_cancel failed");
    }
    let mut yanked = false;
    let started = Instant::now();
    loop {
        let status = migration_status(q, id).await?;
        if !is_active(&status) {
            tracing::info!(%id, %status, "migration ended");
            return Ok(());
        }
        let waited = started.elapsed();
        if !yanked && waited >= CANCEL_GRACE {
            yanked = true;
            tracing::warn!(%id, %status, "migration does not cancel: yanking its socket");
            let r = exec(
                q,
                id,
                "yank",
                json!({ "instances": [{ "type": "migration" }] }),
            )
            .await;
            if let Err(e) = r {
                tracing::warn!(%id, error = %e, "yank of the migration failed");
            }
        }
        if waited >= CANCEL_GRACE + CANCEL_TIMEOUT {
            return Err(HypervisorError::Timeout(format!(
                "the migration of VM {id} is still {status} after migrate_cancel"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Force-cancel and dismiss every mirror job (ours or a crashed agent's), yanking their NBD
/// connections if they hang.
async fn cancel_mirrors(q: &Qmp, id: &str) -> Result<(), HypervisorError> {
    let jobs = mirror_jobs(q, id).await?;
    if jobs.is_empty() {
        return Ok(());
    }
    for j in jobs.iter().filter(|j| j["status"] != "concluded") {
        let job = j["device"].as_str().unwrap_or_default();
        tracing::info!(%id, %job, status = %j["status"], "cancelling mirror job");
        // Fails if the job concluded meanwhile; the next query sees that.
        let r = exec(
            q,
            id,
            "block-job-cancel",
            json!({ "device": job, "force": true }),
        )
        .await;
        if let Err(e) = r {
            tracing::debug!(%id, %job, error = %e, "block-job-cancel failed");
        }
    }
    let started = Instant::now();
    let mut yanked = false;
    loop {
        let jobs = mirror_jobs(q, id).await?;
        let pending: Vec<&str> = jobs
            .iter()
            .filter(|j| j["status"] != "concluded")
            .filter_map(|j| j["device"].as_str())
            .collect();
        if pending.is_empty() {
            for j in &jobs {
                let job = j["device"].as_str().unwrap_or_default();
                if let Err(e) = exec(q, id, "job-dismiss", json!({ "id": job })).await {
                    tracing::warn!(%id, %job, error = %e, "job-dismiss failed");
                }
            }
            return Ok(());
        }
        let waited = started.elapsed();
        if !yanked && waited >= CANCEL_GRACE {
            yanked = true;
            if let Err(e) = yank_mirror_targets(q, id).await {
                tracing::warn!(%id, error = %e, "yank of the mirror targets failed");
            }
        }
        if waited >= CANCEL_GRACE + CANCEL_TIMEOUT {
            return Err(HypervisorError::Timeout(format!(
                "mirror jobs {pending:?} of VM {id} did not end after block-job-cancel"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `cont` a paused source (after a completed or failed migration). Refuses a VM that waits for
/// an incoming migration: that one is a destination.
async fn ensure_running(q: &Qmp, id: &str) -> Result<(), HypervisorError> {
    let status = q
        .execute_with_timeout("query-status", Value::Null, COMMAND_TIMEOUT)
        .await
        .map_err(qmp_err(id))?;
    match status["status"].as_str().unwrap_or_default() {
        "running" => {
            // A migration that failed in its last stage had already handed the disks over
            // (inactivated them), and QEMU 7.2 restarts the guest without taking them back:
            // its disk I/O then hangs. `cont` re-activates them, and needs a stopped VM.
            let failed = exec(q, id, "query-migrate", Value::Null)
                .await
                .map(|m| m["status"] == "failed")
                .unwrap_or(false);
            if failed {
                tracing::info!(%id, "re-activating the source's disks after a failed migration");
                exec(q, id, "stop", Value::Null).await?;
                exec(q, id, "cont", Value::Null).await?;
            }
            Ok(())
        }
        "inmigrate" => Err(HypervisorError::InvalidState(format!(
            "VM {id} waits for an incoming migration: it is a destination, not resumed"
        ))),
        other => {
            tracing::info!(%id, status = %other, "resuming the source");
            exec(q, id, "cont", Value::Null).await?;
            Ok(())
        }
    }
}

/// Everything a failed or abandoned migration leaves on the source: migration cancelled, mirror
/// jobs gone, VM running. Every step is tried; the first error is returned.
async fn roll_back(q: &Qmp, id: &str) -> Result<(), HypervisorError> {
    let migration = cancel_migration(q, id).await;
    let mirrors = cancel_mirrors(q, id).await;
    let running = ensure_running(q, id).await;
    migration.and(mirrors).and(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let v4: IpAddr = "10.252.1.12".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(tcp_uri(v4, 49152), "tcp:10.252.1.12:49152");
        assert_eq!(tcp_uri(v6, 1), "tcp:[fd00::1]:1");
        assert_eq!(
            nbd_uri(v4, 49153, "virtio-disk0"),
            "nbd:10.252.1.12:49153:exportname=virtio-disk0"
        );
        assert_eq!(nbd_uri(v6, 5, "vol-a"), "nbd://[fd00::1]:5/vol-a");
        for ok in [
            "tcp:10.252.1.12:49152",
            "tcp:[fd00::1]:1",
            "tcp:host-b.example:7",
        ] {
            assert!(check_tcp_uri(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "tcp:",
            "tcp:1.2.3.4",
            "tcp:1.2.3.4:0",
            "tcp:1.2.3.4:70000",
            "tcp:fd00::1:5",
            "tcp:[zz]:5",
            "unix:/x",
            "tcp:a b:1",
            "exec:rm -rf /:1",
        ] {
            assert!(check_tcp_uri(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            check_nbd_uri("nbd:10.252.1.12:49153:exportname=virtio-disk0").unwrap(),
            "virtio-disk0"
        );
        assert_eq!(check_nbd_uri("nbd://[fd00::1]:5/vol-a").unwrap(), "vol-a");
        for bad in [
            "nbd:1.2.3.4:5",
            "nbd:1.2.3.4:5:exportname=",
            "nbd:1.2.3.4:0:exportname=a",
            "nbd://1.2.3.4:5/",
            "nbd://1.2.3.4:5/a,b",
            "nbd+unix:///a?socket=/x",
            "/dev/sda",
        ] {
            assert!(check_nbd_uri(bad).is_err(), "{bad:?} accepted");
        }
        assert!(is_active("active") && is_active("cancelling"));
        assert!(check_listen_ip("0.0.0.0".parse().unwrap()).is_err());
        assert!(check_listen_ip("::".parse().unwrap()).is_err());
        assert!(check_listen_ip("224.0.0.1".parse().unwrap()).is_err());
        assert!(check_listen_ip("127.0.0.1".parse().unwrap()).is_ok());
        assert!(!is_active("completed") && !is_active("none") && !is_active("failed"));
    }
}
