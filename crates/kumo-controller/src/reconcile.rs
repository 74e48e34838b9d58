//! The reconciler: level-triggered and idempotent. It pushes every instance whose desired
//! generation a host has not applied, and marks hosts that stopped heartbeating as down.

use std::time::Duration;

use futures::StreamExt;
use kumo_store::InstanceRow;
use kumo_types::agent::{DesiredPower, ImageRef, NetworkDesired, NicDesired, VmDesired};
use kumo_types::storage::VolumeDesired;

use crate::{Controller, OpError};

const TICK: Duration = Duration::from_secs(1);
/// Instances pushed per pass.
const PUSH_PAGE: usize = 500;

impl Controller {
    pub(crate) async fn reconcile_loop(&self) {
        loop {
            match self.reconcile_once().await {
                // A full page that made progress: more is waiting (a burst of creates); go
                // on at once. Failing pushes wait for the tick, so a dead host is no busy loop.
                Ok((n, ok)) if n >= PUSH_PAGE && ok > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reconcile pass failed"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// One pass; safe to run any number of times. Returns how many instances it looked at and
    /// how many it actually pushed (rows waiting for a host that is down are not progress).
    pub async fn reconcile_once(&self) -> Result<(usize, usize), OpError> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.cfg.heartbeat_timeout).unwrap_or_default();
        for id in self.store.mark_stale_hosts_down(cutoff).await? {
            tracing::warn!(host = %id, "no heartbeat; host is down");
            // With timings: HA failover follows once the host's leases have expired.
            let last = self
                .store
                .host(&id)
                .await
                .ok()
                .and_then(|h| h.last_heartbeat);
            let detail = match last {
                Some(t) => format!(
                    "missed heartbeats: the last one was at {} ({:.1} s ago)",
                    kumo_store::fmt_time(t),
                    (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0
                ),
                None => "missed heartbeats: none ever arrived".into(),
            };
            self.system_event(None, "host.down", &id, "ok", Some(detail))
                .await;
        }
        let rows = self.store.instances_to_push(PUSH_PAGE as i64).await?;
        let n = rows.len();
        let ok = futures::stream::iter(rows)
            .map(|row| async move {
                match self.push(&row).await {
                    Ok(pushed) => pushed,
                    Err(e) => {
                        tracing::debug!(instance = %row.id, error = %e, "push failed; will retry");
                        let _ = self.store.record_push_error(&row.id, &e.to_string()).await;
                        false
                    }
                }
            })
            .buffer_unordered(16)
            .filter(|pushed| futures::future::ready(*pushed))
            .count()
            .await;
        Ok((n, ok))
    }

    /// Sends the row's desired state to its host; `false` when there is no host to send it to.
    async fn push(&self, row: &InstanceRow) -> Result<bool, OpError> {
        let Some(host_id) = &row.host_id else {
            return Ok(false);
        };
        let host = self.store.host(host_id).await?;
        if host.state == "down" || host.state == "fenced" {
            return Ok(false);
        }
        if row.desired == "terminated" {
            self.agents().delete_vm(&host, &row.id, false).await?;
            if self.store.instance_absent_on_host(row).await? {
                self.system_event(
                    Some(&row.project_id),
                    "instance.state",
                    &row.id,
                    "terminated",
                    None,
                )
                .await;
            }
            return Ok(true);
        }
        let mut spec = self.desired_spec(row).await?;
        // The host may start the VM on this lease (bounded on its side by its heartbeat lease,
        // which the failover check already covers); recorded once the host has taken it.
        spec.lease_ms = Some(self.cfg.lease_ttl.as_millis() as u64);
        let observed = self.agents().put_vm(&host, &spec).await?;
        self.record_put_lease(row, &host).await;
        self.fold_observation(row, &observed).await?;
        Ok(true)
    }

    pub async fn desired_spec(&self, row: &InstanceRow) -> Result<VmDesired, OpError> {
        let image = self.store.image_unscoped(&row.image_id).await?;
        let image_ref = |img: &kumo_store::ImageRow| ImageRef {
            id: img.id.clone(),
            sha256: img.sha256.clone().unwrap_or_default(),
            size: img.file_size.unwrap_or(0),
            controller_path: img.path.clone(),
        };
        let kernel = match &image.kernel_id {
            Some(k) => Some(image_ref(&self.store.image_unscoped(k).await?)),
            None => None,
        };
        let ramdisk = match &image.ramdisk_id {
            Some(k) => Some(image_ref(&self.store.image_unscoped(k).await?)),
            None => None,
        };
        let network = self.store.network(&row.network_id).await?;
        let volumes = self
            .store
            .instance_volumes(&row.id)
            .await?
            .into_iter()
            .map(|v| VolumeDesired {
                id: v.id,
                size_bytes: v.size_bytes,
            })
            .collect();
        Ok(VmDesired {
            id: row.id.clone(),
            name: row.name.clone(),
            generation: row.generation,
            power: if row.desired == "running" {
                DesiredPower::Running
            } else {
                DesiredPower::Stopped
            },
            reboot_seq: row.reboot_seq,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            disk_gib: row.disk_gib,
            image: image_ref(&image),
            kernel,
            ramdisk,
            cmdline: image.cmdline.clone(),
            nic: NicDesired {
                mac: row.mac.clone(),
                ip: row.private_ip.clone(),
                network: NetworkDesired {
                    id: network.id,
                    name: network.name,
                    cidr: network.cidr,
                    gateway: network.gateway,
                },
            },
            root_snapshot: row.root_snapshot_id.clone(),
            volumes,
            uuid: row.smbios_uuid.clone(),
            lease_ms: None,
            ha: row.ha,
        })
    }
}
