//! A VM's disks in the pool: its root disk (made on first start from the image or a snapshot)
//! and its volumes, plugged in at start and hot-plugged, unplugged and grown while it runs to
//! match the desired spec.

use std::time::Duration;

use kumo_hypervisor::{DiskSpec, PowerState};
use kumo_storage::pool::{DiskBase, DiskInfo};
use kumo_types::agent::VmDesired;
use kumo_types::storage::VolumeDesired;

use crate::error::chain;
use crate::{Agent, AgentError};

/// The root disk's device in QEMU (volumes use their id).
pub(crate) const ROOT_DEVICE: &str = "virtio-disk0";
/// How long the guest gets to release a volume being unplugged.
const DETACH_TIMEOUT: Duration = Duration::from_secs(20);

impl Agent {
    /// The VM's root disk, made if it does not exist yet.
    pub(crate) async fn root_disk(&self, d: &VmDesired) -> Result<DiskInfo, AgentError> {
        if let Some(info) = self.pool.disk(&d.id).await? {
            return Ok(info);
        }
        let want = d.disk_gib.saturating_mul(1 << 30);
        let (base, size) = match &d.root_snapshot {
            Some(s) => {
                let snap = self.pool.snapshot(s).await?.ok_or_else(|| {
                    AgentError::NotFound(format!("snapshot {s} in this host's pool"))
                })?;
                (DiskBase::Snapshot(s.clone()), want.max(snap.size))
            }
            None => {
                let path = self.cached_image(&d.image).await?;
                (
                    DiskBase::Image {
                        path,
                        format: "qcow2".into(),
                    },
                    want.max(d.image.size),
                )
            }
        };
        Ok(self
            .pool
            .create_disk(&d.id, size, &base, std::sync::Arc::new(|_| {}))
            .await?)
    }

    /// A volume as a disk of a VM about to start (grown first if the spec says it is larger).
    pub(crate) async fn volume_disk(&self, v: &VolumeDesired) -> Result<DiskSpec, AgentError> {
        let mut info =
            self.pool.disk(&v.id).await?.ok_or_else(|| {
                AgentError::NotFound(format!("volume {} in this host's pool", v.id))
            })?;
        if v.size_bytes > info.size {
            info = self.pool.grow_disk(&v.id, v.size_bytes).await?;
        }
        Ok(volume_spec(v, &info))
    }

    /// Plug in, unplug and grow volumes of a running VM to match its spec.
    pub(crate) async fn sync_volumes(&self, d: &VmDesired) -> Result<(), AgentError> {
        let attached = self.hv.attached_disks(&d.id).await?;
        let mut errors = vec![];
        for v in &d.volumes {
            match attached.iter().find(|a| a.device_id == v.id) {
                None => {
                    let res = async {
                        let info = self.pool.disk(&v.id).await?.ok_or_else(|| {
                            AgentError::NotFound(format!("volume {} in this host's pool", v.id))
                        })?;
                        self.hv.attach_disk(&d.id, &volume_spec(v, &info)).await?;
                        tracing::info!(vm = %d.id, volume = %v.id, "volume attached");
                        Ok::<_, AgentError>(())
                    }
                    .await;
                    if let Err(e) = res {
                        errors.push(format!("attaching {}: {}", v.id, chain(&e)));
                    }
                }
                Some(a) if v.size_bytes > a.size_bytes => {
                    let res = async {
                        self.hv.resize_disk(&d.id, &v.id, v.size_bytes).await?;
                        self.pool.record_size(&v.id, v.size_bytes).await?;
                        tracing::info!(vm = %d.id, volume = %v.id, size = v.size_bytes, "volume grown online");
                        Ok::<_, AgentError>(())
                    }
                    .await;
                    if let Err(e) = res {
                        errors.push(format!("growing {}: {}", v.id, chain(&e)));
                    }
                }
                Some(_) => {}
            }
        }
        for a in &attached {
            if a.device_id == ROOT_DEVICE || d.volumes.iter().any(|v| v.id == a.device_id) {
                continue;
            }
            match self
                .hv
                .detach_disk(&d.id, &a.device_id, DETACH_TIMEOUT)
                .await
            {
                Ok(()) => tracing::info!(vm = %d.id, volume = %a.device_id, "volume detached"),
                Err(e) => errors.push(format!("detaching {}: {}", a.device_id, chain(&e))),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AgentError::Busy(errors.join("; ")))
        }
    }

    /// Remember which volumes the VM has plugged in, for heartbeats.
    pub(crate) async fn note_attached(&self, id: &str) {
        let attached = match self.hv.state(id).await {
            Ok(PowerState::Stopped) | Err(_) => vec![],
            Ok(_) => match self.hv.attached_disks(id).await {
                Ok(list) => list
                    .into_iter()
                    .map(|a| a.device_id)
                    .filter(|d| d != ROOT_DEVICE)
                    .collect(),
                Err(e) => {
                    tracing::debug!(vm = %id, error = %chain(&e), "cannot list the VM's disks");
                    return;
                }
            },
        };
        if let Some(e) = self.vms.map.lock().await.get_mut(id) {
            e.attached = attached;
        }
    }
}

fn volume_spec(v: &VolumeDesired, info: &DiskInfo) -> DiskSpec {
    DiskSpec {
        path: info.path.clone(),
        format: info.format.clone(),
        serial: Some(kumo_types::storage::volume_serial(&v.id)),
        read_only: false,
        device_id: Some(v.id.clone()),
    }
}
