//! The destination side: a paused QEMU waiting for the stream, its disks exported over NBD.

use std::net::{IpAddr, TcpListener};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{check_listen_ip, exec, nbd_uri, qmp_err, tcp_uri};
use crate::qemu::INCOMING_FILE;
use crate::qmp::{Qmp, QmpError};
use crate::{
    block, validate_id, validate_spec, Hypervisor, HypervisorError, IncomingReady, IncomingSpec,
    NbdTarget, QemuDriver, VmSpec,
};

/// Attempts at a free NBD port (another process may take the one we picked).
const NBD_PORT_ATTEMPTS: u32 = 8;

/// What `start_incoming` answered, kept (in `INCOMING_FILE`) until `finish_incoming` or the
/// VM's end, so a repeated call (agent restarted, request retried) returns the same URIs.
#[derive(Serialize, Deserialize)]
struct IncomingRecord {
    inc: IncomingSpec,
    ready: IncomingReady,
}

/// A port that is free on `ip` now (the kernel's choice), or, when this process cannot bind
/// there (QEMU may run in another network namespace), a pseudo-random one of the dynamic range.
fn pick_port(ip: IpAddr, attempt: u32) -> u16 {
    if let Ok(port) = TcpListener::bind((ip, 0)).and_then(|l| l.local_addr().map(|a| a.port())) {
        return port;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = nanos ^ std::process::id().rotate_left(16) ^ attempt.wrapping_mul(2_654_435_761);
    49152 + (mix % 16384) as u16
}

async fn start_nbd_server(q: &Qmp, id: &str, ip: IpAddr) -> Result<u16, HypervisorError> {
    let mut last = None;
    for attempt in 0..NBD_PORT_ATTEMPTS {
        let port = pick_port(ip, attempt);
        let addr =
            json!({ "type": "inet", "data": { "host": ip.to_string(), "port": port.to_string() } });
        match q
            .execute_with_timeout(
                "nbd-server-start",
                json!({ "addr": addr }),
                super::COMMAND_TIMEOUT,
            )
            .await
        {
            Ok(_) => return Ok(port),
            Err(QmpError::Command { ref desc, .. }) if desc.contains("in use") => {
                tracing::debug!(%id, port, %desc, "NBD port taken, trying another");
                last = Some(desc.clone());
            }
            Err(e) => return Err(qmp_err(id)(e)),
        }
    }
    Err(HypervisorError::MigrationFailed(format!(
        "no free NBD port on {ip} after {NBD_PORT_ATTEMPTS} attempts: {}",
        last.unwrap_or_default()
    )))
}

fn write_record(dir: &Path, rec: &IncomingRecord) -> Result<(), HypervisorError> {
    let path = dir.join(INCOMING_FILE);
    let tmp = dir.join(format!("{INCOMING_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| HypervisorError::io(format!("writing {}", path.display()), e))
}

/// Whether the VM of this run directory is the destination of a migration not finished yet.
pub(super) fn is_destination(dir: &Path) -> bool {
    dir.join(INCOMING_FILE).exists()
}

fn read_record(dir: &Path) -> Option<IncomingRecord> {
    let b = std::fs::read(dir.join(INCOMING_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

fn remove_record(dir: &Path) {
    let path = dir.join(INCOMING_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove incoming record")
        }
    }
}

impl QemuDriver {
    pub(crate) async fn start_incoming_impl(
        &self,
        spec: &VmSpec,
        inc: &IncomingSpec,
    ) -> Result<IncomingReady, HypervisorError> {
        validate_spec(spec)?;
        check_listen_ip(inc.listen_ip)?;
        let id = spec.id.as_str();
        let dir = self.run_dir(id);
        let dir_existed = dir.exists();
        let launched = match self.launch_incoming(spec).await {
            Ok((_, launched)) => launched,
            Err(e) => {
                if !dir_existed {
                    // launch() already stopped QEMU; leave no trace of this VM either.
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        if !launched {
            return self.existing_incoming(id, inc).await;
        }
        match self.prepare_incoming(spec, inc).await {
            Ok(ready) => {
                tracing::info!(%id, uri = %ready.migrate_uri, nbd = ready.nbd_targets.len(), "waiting for an incoming migration");
                Ok(ready)
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "incoming migration setup failed; stopping QEMU");
                if let Err(k) = self.kill(id).await {
                    tracing::error!(%id, error = %k, "cannot kill the QEMU of a failed incoming setup");
                }
                if dir_existed {
                    remove_record(&dir);
                } else if let Err(r) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(%id, error = %r, "cannot remove run directory");
                }
                Err(e)
            }
        }
    }

    /// A QEMU for this id runs already: the same incoming setup again is answered from the
    /// record; anything else is a VM that must not be replaced.
    async fn existing_incoming(
        &self,
        id: &str,
        inc: &IncomingSpec,
    ) -> Result<IncomingReady, HypervisorError> {
        let q = self.qmp(id).await?;
        let status = q.query_status().await.map_err(qmp_err(id))?.status;
        match read_record(&self.run_dir(id)) {
            Some(rec) if status == "inmigrate" && rec.inc == *inc => Ok(rec.ready),
            _ => Err(HypervisorError::InvalidState(format!(
                "VM {id} already runs on this host ({status}); kill it before starting an incoming migration"
            ))),
        }
    }

    async fn prepare_incoming(
        &self,
        spec: &VmSpec,
        inc: &IncomingSpec,
    ) -> Result<IncomingReady, HypervisorError> {
        let id = spec.id.as_str();
        let ip = inc.listen_ip;
        let q = self.qmp(id).await?;
        exec(
            &q,
            id,
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "events", "state": true },
                { "capability": "late-block-activate", "state": true },
                // Both ends (see migrate.rs).
                { "capability": "return-path", "state": true },
            ]}),
        )
        .await?;
        let mut nbd_targets = Vec::new();
        // Read-only disks cannot change: they are neither exported nor mirrored.
        let writable: Vec<(String, String)> = spec
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only)
            .map(|(i, d)| (block::device_id(i, d), block::node_name(i, d)))
            .collect();
        if inc.nbd && !writable.is_empty() {
            let port = start_nbd_server(&q, id, ip).await?;
            for (dev, node) in writable {
                exec(
                    &q,
                    id,
                    "block-export-add",
                    json!({ "type": "nbd", "id": dev, "node-name": node, "name": dev, "writable": true }),
                )
                .await?;
                nbd_targets.push(NbdTarget {
                    uri: nbd_uri(ip, port, &dev),
                    device_id: dev,
                });
            }
        }
        // Port 0: QEMU binds a free port in its own network namespace and reports it.
        exec(&q, id, "migrate-incoming", json!({ "uri": tcp_uri(ip, 0) })).await?;
        let v = exec(&q, id, "query-migrate", Value::Null).await?;
        let port = v["socket-address"][0]["port"]
            .as_str()
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                HypervisorError::MigrationFailed(format!(
                    "QEMU did not report its migration port: {v}"
                ))
            })?;
        let ready = IncomingReady {
            migrate_uri: tcp_uri(ip, port),
            nbd_targets,
        };
        write_record(
            &self.run_dir(id),
            &IncomingRecord {
                inc: inc.clone(),
                ready: ready.clone(),
            },
        )?;
        Ok(ready)
    }

    pub(crate) async fn finish_incoming_impl(&self, id: &str) -> Result<(), HypervisorError> {
        validate_id(id)?;
        let q = self.qmp(id).await?;
        let status = q.query_status().await.map_err(qmp_err(id))?.status;
        if status == "running" {
            remove_record(&self.run_dir(id));
            return Ok(());
        }
        if status == "postmigrate" {
            // A source whose migration completed: its guest lives elsewhere now.
            return Err(HypervisorError::InvalidState(format!(
                "VM {id} is the source of a completed migration, not a destination"
            )));
        }
        let mig = super::migration_status(&q, id).await?;
        if mig != "completed" {
            return Err(HypervisorError::MigrationFailed(format!(
                "the incoming migration of VM {id} is {mig}, not completed; the VM stays {status}"
            )));
        }
        // Only now: the source's last mirror writes are over once its migrate() returned.
        match q
            .execute_with_timeout("nbd-server-stop", Value::Null, super::COMMAND_TIMEOUT)
            .await
        {
            Ok(_) => {}
            Err(QmpError::Command { ref desc, .. }) if desc.contains("not running") => {}
            Err(e) => return Err(qmp_err(id)(e)),
        }
        exec(&q, id, "cont", Value::Null).await?;
        tracing::info!(%id, "incoming migration finished: VM running");
        remove_record(&self.run_dir(id));
        Ok(())
    }

    pub(crate) async fn incoming_completed_impl(&self, id: &str) -> Result<bool, HypervisorError> {
        validate_id(id)?;
        let q = self.qmp(id).await?;
        // A source after its own completed migration (postmigrate) reports `completed` too.
        let status = q.query_status().await.map_err(qmp_err(id))?.status;
        Ok(status != "postmigrate" && super::migration_status(&q, id).await? == "completed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        let p = pick_port("127.0.0.1".parse().unwrap(), 0);
        assert_ne!(p, 0);
        // An address this host does not have: a port of the dynamic range.
        let p = pick_port("192.0.2.77".parse().unwrap(), 3);
        assert!(p >= 49152, "{p}");
    }
}
