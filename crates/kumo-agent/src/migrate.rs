//! Live migration on this host: the destination's side (an *incoming* VM: disks made, port
//! rendered, QEMU waiting paused for the stream; then committed or aborted by the controller)
//! and the source's (a job that mirrors the disks and migrates the memory, and a resume that
//! rolls back). An incoming VM is recorded under `DATA_DIR/incoming/` before anything is made,
//! so an agent that restarts half-way still knows what to remove when the controller aborts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kumo_hypervisor::{IncomingSpec, MigrateSpec, MigrationPhase, MigrationProgress};
use kumo_storage::pool::DiskBase;
use kumo_types::migration::{
    CommitIncoming, IncomingRequest, IncomingState, MigrateOut, MigrationTarget, SourceDisk,
};
use serde::{Deserialize, Serialize};

use crate::error::chain;
use crate::ledger::{self, VmRecord};
use crate::vms::VmEntry;
use crate::volumes::ROOT_DEVICE;
use crate::{Agent, AgentError};

/// An incoming VM as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct IncomingRecord {
    pub req: IncomingRequest,
    /// Disks this host made for it (storage migration): deleted again on abort.
    pub created: Vec<String>,
}

fn incoming_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("incoming")
}

fn incoming_path(data_dir: &Path, id: &str) -> PathBuf {
    incoming_dir(data_dir).join(format!("{id}.json"))
}

pub(crate) fn load_incoming(data_dir: &Path) -> Result<Vec<IncomingRecord>, AgentError> {
    ledger::load_dir(&incoming_dir(data_dir))
}

fn save_incoming(data_dir: &Path, rec: &IncomingRecord) -> Result<(), AgentError> {
    ledger::write_atomic(
        &incoming_path(data_dir, &rec.req.desired.id),
        &serde_json::to_vec_pretty(rec)?,
    )
}

fn remove_incoming(data_dir: &Path, id: &str) -> Result<(), AgentError> {
    ledger::remove_record(&incoming_path(data_dir, id))
}

pub(crate) fn incoming_entry(rec: &IncomingRecord) -> VmEntry {
    VmEntry {
        rec: VmRecord {
            desired: rec.req.desired.clone(),
            applied_generation: 0,
            applied_reboot_seq: rec.req.desired.reboot_seq,
            error: None,
        },
        converging: false,
        wake: Arc::default(),
        op: Arc::default(),
        attached: vec![],
        incoming: true,
        deleting: false,
    }
}

/// The fraction done of a migration: disks first (storage migration), then memory.
fn fraction(p: &MigrationProgress) -> f64 {
    let part = |done: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            (done as f64 / total as f64).min(1.0)
        }
    };
    let (disk_share, mem) = if p.disk_total > 0 {
        (0.7, part(p.disk_done, p.disk_total))
    } else {
        (0.0, 1.0)
    };
    match p.phase {
        MigrationPhase::Mirroring => disk_share * mem,
        MigrationPhase::Memory => disk_share + (1.0 - disk_share) * part(p.ram_done, p.ram_total),
        MigrationPhase::Completed => 1.0,
    }
}

impl Agent {
    /// The address QEMU listens on for incoming migrations: this agent's advertised host.
    fn migration_ip(&self) -> Result<IpAddr, AgentError> {
        let host = url_host(&self.address).ok_or_else(|| {
            AgentError::Config(format!(
                "cannot tell this host's address from {}",
                self.address
            ))
        })?;
        host.parse().map_err(|_| {
            AgentError::Config(format!(
                "this agent advertises {host}, not an IP address: migrations need one"
            ))
        })
    }

    /// The disks of a running VM, for a storage migration's destination to make.
    pub async fn source_disks(&self, id: &str) -> Result<Vec<SourceDisk>, AgentError> {
        if !self.vms.map.lock().await.contains_key(id) {
            return Err(AgentError::NotFound(format!("VM {id}")));
        }
        Ok(self
            .hv
            .attached_disks(id)
            .await?
            .into_iter()
            .map(|a| SourceDisk {
                disk_id: if a.device_id == ROOT_DEVICE {
                    id.to_string()
                } else {
                    a.device_id.clone()
                },
                device_id: a.device_id,
                size_bytes: a.size_bytes,
            })
            .collect())
    }

    /// Destination: get ready to receive `req.desired`. Nothing is left behind on error.
    pub async fn start_incoming(
        self: &Arc<Self>,
        req: IncomingRequest,
    ) -> Result<MigrationTarget, AgentError> {
        let id = req.desired.id.clone();
        kumo_hypervisor::validate_id(&id)?;
        let listen_ip = self.migration_ip()?;
        let mut rec = IncomingRecord {
            req,
            created: vec![],
        };
        {
            let mut map = self.vms.map.lock().await;
            if map.contains_key(&id) {
                return Err(AgentError::Busy(format!("VM {id} is already on this host")));
            }
            save_incoming(&self.cfg.data_dir, &rec)?;
            map.insert(id.clone(), incoming_entry(&rec));
        }
        match self.prepare_incoming(&mut rec, listen_ip).await {
            Ok(t) => {
                tracing::info!(vm = %id, uri = %t.migrate_uri, disks = t.nbd_targets.len(), "waiting for an incoming migration");
                Ok(t)
            }
            Err(e) => {
                tracing::warn!(vm = %id, error = %chain(&e), "incoming migration could not start; cleaning up");
                if let Err(c) = self.abort_incoming(&id).await {
                    tracing::warn!(vm = %id, error = %chain(&c), "cleanup after a failed incoming start");
                }
                Err(e)
            }
        }
    }

    async fn prepare_incoming(
        &self,
        rec: &mut IncomingRecord,
        listen_ip: IpAddr,
    ) -> Result<MigrationTarget, AgentError> {
        let d = rec.req.desired.clone();
        let storage = !rec.req.disks.is_empty();
        if storage {
            for disk in rec.req.disks.clone() {
                if self.pool.disk(&disk.disk_id).await?.is_some() {
                    return Err(AgentError::Busy(format!(
                        "disk {} already exists in this host's pool",
                        disk.disk_id
                    )));
                }
                // Recorded first: a crash right after the create still knows to delete it.
                rec.created.push(disk.disk_id.clone());
                save_incoming(&self.cfg.data_dir, rec)?;
                self.pool
                    .create_disk(
                        &disk.disk_id,
                        disk.size_bytes,
                        &DiskBase::Blank,
                        Arc::new(|_| {}),
                    )
                    .await?;
            }
        } else {
            // Shared pool: the disks are the source's own files, never made here.
            for disk in
                std::iter::once(d.id.as_str()).chain(d.volumes.iter().map(|v| v.id.as_str()))
            {
                if self.pool.disk(disk).await?.is_none() {
                    return Err(AgentError::NotFound(format!(
                        "disk {disk} in this host's pool (is the pool really shared?)"
                    )));
                }
            }
        }
        let spec = self.prepare(&d).await?;
        let ready = self
            .hv
            .start_incoming(
                &spec,
                &IncomingSpec {
                    listen_ip,
                    nbd: storage,
                },
            )
            .await?;
        Ok(MigrationTarget {
            migrate_uri: ready.migrate_uri,
            nbd_targets: ready
                .nbd_targets
                .into_iter()
                .map(|t| (t.device_id, t.uri))
                .collect(),
        })
    }

    /// Destination: where the incoming migration stands.
    pub async fn incoming_state(&self, id: &str) -> Result<IncomingState, AgentError> {
        let incoming = match self.vms.map.lock().await.get(id) {
            None => return Err(AgentError::NotFound(format!("VM {id}"))),
            Some(e) => e.incoming,
        };
        if !incoming {
            let running = self.hv.state(id).await? == kumo_hypervisor::PowerState::Running;
            return Ok(IncomingState {
                completed: true,
                running,
            });
        }
        Ok(IncomingState {
            completed: self.hv.incoming_completed(id).await?,
            running: false,
        })
    }

    /// Destination, after the controller switched the instance here: run it. Idempotent.
    pub async fn commit_incoming(
        self: &Arc<Self>,
        id: &str,
        c: &CommitIncoming,
    ) -> Result<(), AgentError> {
        let incoming = match self.vms.map.lock().await.get(id) {
            None => return Err(AgentError::NotFound(format!("incoming VM {id}"))),
            Some(e) => e.incoming,
        };
        // The lease comes with the commit: the watchdog must find it valid the moment the VM is
        // no longer incoming.
        if let Some(ms) = c.lease_ms {
            self.grant_lease(id, std::time::Duration::from_millis(ms))
                .await;
        }
        if incoming {
            self.hv.finish_incoming(id).await?;
            let wake = {
                let mut map = self.vms.map.lock().await;
                let Some(e) = map.get_mut(id) else {
                    return Err(AgentError::NotFound(format!("incoming VM {id}")));
                };
                e.incoming = false;
                e.rec.applied_generation = e.rec.desired.generation;
                ledger::save_vm(&self.cfg.data_dir, &e.rec)?;
                e.wake.clone()
            };
            remove_incoming(&self.cfg.data_dir, id)?;
            self.spawn_worker(id.to_string(), wake);
            tracing::info!(vm = %id, "incoming migration committed; the VM runs here");
        } else {
            // Committed before (a retried call): make sure it runs.
            self.hv.finish_incoming(id).await?;
        }
        // The elastic IP moves here now (the policy names this host for the instance). In the
        // background: the controller's wait for this answer is part of the migration's end.
        let me = self.clone();
        let vm = id.to_string();
        tokio::spawn(async move {
            me.note_attached(&vm).await;
            if let Err(e) = me.refresh_policy().await {
                tracing::warn!(vm = %vm, error = %chain(&e), "policy refresh after a migration");
            }
            if let Err(e) = me.apply_network().await {
                tracing::warn!(vm = %vm, error = %chain(&e), "network apply after a migration");
            }
            me.beat.notify_one();
        });
        Ok(())
    }

    /// Destination: give up an incoming migration and remove all it made. Idempotent; refused
    /// once the VM was committed (it runs here then).
    pub async fn abort_incoming(&self, id: &str) -> Result<(), AgentError> {
        let known = match self.vms.map.lock().await.get(id) {
            None => false,
            Some(e) if e.incoming => true,
            Some(_) => {
                return Err(AgentError::Busy(format!(
                    "VM {id} was committed and runs on this host"
                )))
            }
        };
        self.hv.kill(id).await?;
        self.hv.cleanup(id).await?;
        let created = load_incoming(&self.cfg.data_dir)?
            .into_iter()
            .find(|r| r.req.desired.id == id)
            .map(|r| r.created)
            .unwrap_or_default();
        for disk in &created {
            self.pool.delete_disk(disk).await?;
        }
        if known {
            self.vms.map.lock().await.remove(id);
        }
        remove_incoming(&self.cfg.data_dir, id)?;
        let dir = self.vm_dir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(AgentError::io(format!("removing {}", dir.display()), e));
            }
        }
        self.apply_network().await?;
        tracing::info!(vm = %id, disks = created.len(), "incoming migration aborted");
        Ok(())
    }

    /// Source, rolling back: the VM runs here again (migration and mirrors cancelled, resumed).
    pub async fn resume_source(&self, id: &str) -> Result<(), AgentError> {
        if !self.vms.map.lock().await.contains_key(id) {
            return Err(AgentError::NotFound(format!("VM {id}")));
        }
        self.hv.resume_after_migration(id).await?;
        tracing::info!(vm = %id, "migration rolled back; the VM runs here");
        Ok(())
    }

    /// Source: the migration job.
    pub(crate) async fn run_migration(
        &self,
        m: &MigrateOut,
        job_id: &str,
        progress: kumo_storage::Progress,
    ) -> Result<serde_json::Value, AgentError> {
        if !self.vms.map.lock().await.contains_key(&m.vm) {
            return Err(AgentError::NotFound(format!("VM {}", m.vm)));
        }
        let spec = MigrateSpec {
            target: kumo_hypervisor::IncomingReady {
                migrate_uri: m.target.migrate_uri.clone(),
                nbd_targets: m
                    .target
                    .nbd_targets
                    .iter()
                    .map(|(device_id, uri)| kumo_hypervisor::NbdTarget {
                        device_id: device_id.clone(),
                        uri: uri.clone(),
                    })
                    .collect(),
            },
            downtime_limit_ms: m.downtime_ms,
            auto_converge: m.auto_converge,
            bandwidth: m.bandwidth,
            stall_timeout_secs: 0,
        };
        let report = self
            .hv
            .migrate(&m.vm, &spec, &|p: &MigrationProgress| {
                progress(fraction(p));
                !self.jobs.cancelled(job_id)
            })
            .await?;
        tracing::info!(vm = %m.vm, total_ms = report.total_ms, downtime_ms = report.downtime_ms, "migration completed; the source is paused");
        Ok(serde_json::to_value(report)?)
    }
}

/// The host part of `http://host:port/...`.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map(str::to_string);
    }
    authority.split(':').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("http://10.0.0.1:8781").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            url_host("http://[fd00::1]:80/x").as_deref(),
            Some("fd00::1")
        );
        assert_eq!(url_host("host.example").as_deref(), Some("host.example"));
    }

    #[test]
    fn progress_goes_disk_then_memory() {
        let mut p = MigrationProgress {
            phase: MigrationPhase::Mirroring,
            disk_done: 50,
            disk_total: 100,
            ram_done: 0,
            ram_total: 100,
            ram_remaining: 100,
            passes: 0,
            throttle_pct: 0,
        };
        assert!((fraction(&p) - 0.35).abs() < 1e-9);
        p.phase = MigrationPhase::Memory;
        p.ram_done = 50;
        assert!((fraction(&p) - 0.85).abs() < 1e-9);
        p.disk_total = 0;
        assert!((fraction(&p) - 0.5).abs() < 1e-9);
        p.phase = MigrationPhase::Completed;
        assert_eq!(fraction(&p), 1.0);
    }
}
