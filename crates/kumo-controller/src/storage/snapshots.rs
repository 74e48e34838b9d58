//! Snapshots: taken by the agent of the host holding the disk, live when a VM runs on it
//! (QEMU switches the disk to a new overlay and the old layer freezes), offline otherwise.
//! A snapshot of an instance can be booted as a new instance next to the original, and a
//! running instance can be cloned (snapshot + boot) without stopping it.

use kumo_store::{InstanceRow, NewSnapshot, Scope, SnapshotRow};
use kumo_types::api::CreateInstance;
use kumo_types::storage::{CloneInstance, CreateSnapshot, TakeSnapshot};
use kumo_types::InstanceState;

use crate::{Controller, OpError};

impl Controller {
    pub async fn create_snapshot(
        &self,
        scope: &Scope,
        req: &CreateSnapshot,
    ) -> Result<SnapshotRow, OpError> {
        match (&req.instance, &req.volume) {
            (Some(i), None) => {
                let inst = self.store.instance(scope, i).await?;
                self.snapshot_instance(scope, &inst, req.description.clone())
                    .await
            }
            (None, Some(v)) => {
                let vol = self.store.volume(scope, v).await?;
                if !matches!(vol.state.as_str(), "available" | "in-use") {
                    return Err(OpError::IncorrectState(format!(
                        "volume {} is {}",
                        vol.id, vol.state
                    )));
                }
                // Live if attached to a running VM (its host does it), else offline.
                let (vm, prefer) = match (&vol.instance_id, vol.attach_state.as_deref()) {
                    (Some(i), Some("attached")) => {
                        let inst = self.store.instance(&Scope::system(), i).await?;
                        (Some(inst.id.clone()), inst.host_id.clone())
                    }
                    (Some(_), _) => {
                        return Err(OpError::IncorrectState(format!(
                            "volume {} is {}; try again when it is attached",
                            vol.id,
                            vol.attach_state.as_deref().unwrap_or("changing")
                        )))
                    }
                    (None, _) => (None, None),
                };
                let host = match (&vm, &prefer) {
                    (Some(_), Some(h)) => self.up_host(h).await?,
                    _ => self.storage_host(&vol.domain(), prefer.as_deref()).await?,
                };
                let row = self
                    .store
                    .create_snapshot(
                        scope,
                        &NewSnapshot {
                            description: req.description.clone(),
                            source_kind: "volume",
                            source_id: vol.id.clone(),
                            size_bytes: vol.size_bytes,
                            domain: vol.domain(),
                            image_id: None,
                        },
                    )
                    .await?;
                let device = vm.as_ref().map(|_| vol.id.clone());
                self.take_snapshot(&host, row, &vol.id, vm, device).await
            }
            _ => Err(OpError::Invalid(
                "give either an instance or a volume to snapshot".into(),
            )),
        }
    }

    async fn snapshot_instance(
        &self,
        scope: &Scope,
        inst: &InstanceRow,
        description: Option<String>,
    ) -> Result<SnapshotRow, OpError> {
        if !matches!(inst.state, InstanceState::Running | InstanceState::Stopped) {
            return Err(OpError::IncorrectState(format!(
                "instance {} is {}; snapshots are taken of running or stopped instances",
                inst.id, inst.state
            )));
        }
        let (domain, host) = self.instance_domain(inst).await?;
        let row = self
            .store
            .create_snapshot(
                scope,
                &NewSnapshot {
                    description,
                    source_kind: "instance",
                    source_id: inst.id.clone(),
                    size_bytes: inst.disk_gib * kumo_store::GIB,
                    domain,
                    image_id: Some(inst.image_id.clone()),
                },
            )
            .await?;
        let live = inst.state == InstanceState::Running;
        let vm = live.then(|| inst.id.clone());
        let device = live.then(|| "virtio-disk0".to_string());
        self.take_snapshot(&host, row, &inst.id, vm, device).await
    }

    async fn take_snapshot(
        &self,
        host: &kumo_store::HostRow,
        row: SnapshotRow,
        disk: &str,
        vm: Option<String>,
        device: Option<String>,
    ) -> Result<SnapshotRow, OpError> {
        let req = TakeSnapshot {
            snapshot_id: row.id.clone(),
            disk: disk.to_string(),
            vm,
            device,
        };
        match self.agents().take_snapshot(host, &req).await {
            Ok(taken) => {
                self.store
                    .finish_snapshot(&row.id, Ok(taken.io_pause_ms), Some(taken.size_bytes))
                    .await?;
                self.system_event(
                    Some(&row.project_id),
                    "snapshot.created",
                    &row.id,
                    "ok",
                    Some(match taken.io_pause_ms {
                        Some(ms) => format!("live snapshot of {disk}: I/O paused {ms:.1} ms"),
                        None => format!("offline snapshot of {disk}"),
                    }),
                )
                .await;
            }
            Err(e) => {
                let err = Self::storage_error(e);
                self.store
                    .finish_snapshot(&row.id, Err(&err.to_string()), None)
                    .await?;
                return Err(err);
            }
        }
        Ok(self.store.snapshot(&Scope::system(), &row.id).await?)
    }

    pub async fn delete_snapshot(&self, scope: &Scope, id: &str) -> Result<(), OpError> {
        let snap = self.store.snapshot(scope, id).await?;
        if snap.state == "pending" {
            return Err(OpError::IncorrectState(format!(
                "snapshot {} is still being taken",
                snap.id
            )));
        }
        // First no new dependents (under the placement lock), then the host, then the row.
        self.store
            .begin_delete_snapshot(&snap)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })?;
        if snap.state != "error" {
            let host = self.storage_host(&snap.domain(), None).await;
            let done = match host {
                Ok(h) => self
                    .agents()
                    .delete_snapshot(&h, &snap.id)
                    .await
                    .map_err(Self::storage_error),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                self.store.set_snapshot_state(&snap.id, &snap.state).await?;
                return Err(e);
            }
        }
        self.store.delete_snapshot_row(&snap).await?;
        self.system_event(
            Some(&snap.project_id),
            "snapshot.deleted",
            &snap.id,
            "ok",
            None,
        )
        .await;
        Ok(())
    }

    /// A snapshot an instance can boot from.
    pub(crate) async fn bootable_snapshot(
        &self,
        scope: &Scope,
        id: &str,
        image: &str,
    ) -> Result<SnapshotRow, OpError> {
        if !image.is_empty() {
            return Err(OpError::Invalid(
                "give an image or a snapshot to boot from, not both".into(),
            ));
        }
        let snap = self.store.snapshot(scope, id).await?;
        if snap.state != "completed" {
            return Err(OpError::IncorrectState(format!(
                "snapshot {} is {}, not completed",
                snap.id, snap.state
            )));
        }
        if snap.source_kind != "instance" || snap.image_id.is_none() {
            return Err(OpError::Invalid(format!(
                "snapshot {} is of a volume; boot from a snapshot of an instance (or make a volume from it)",
                snap.id
            )));
        }
        Ok(snap)
    }

    /// Hot clone: a live snapshot of the instance's root disk booted as a new instance with
    /// its own identity; the source keeps running.
    pub async fn clone_instance(
        &self,
        scope: &Scope,
        id: &str,
        req: &CloneInstance,
    ) -> Result<(InstanceRow, SnapshotRow), OpError> {
        let src = self.store.instance(scope, id).await?;
        kumo_types::id::validate_name(&req.name).map_err(OpError::Invalid)?;
        let snap = self
            .snapshot_instance(
                scope,
                &src,
                Some(format!("clone of {} for {}", src.id, req.name)),
            )
            .await?;
        let create = CreateInstance {
            name: req.name.clone(),
            snapshot: Some(snap.id.clone()),
            instance_type: Some(src.instance_type.clone()),
            network: Some(
                req.network
                    .clone()
                    .unwrap_or_else(|| src.network_id.clone()),
            ),
            security_groups: if req.security_groups.is_empty() {
                src.security_group_ids.clone()
            } else {
                req.security_groups.clone()
            },
            key_name: req.key_name.clone().or_else(|| src.key_name.clone()),
            ..CreateInstance::default()
        };
        match self.create_instance(scope, &create).await {
            Ok(inst) => {
                self.system_event(
                    Some(&inst.project_id),
                    "instance.cloned",
                    &inst.id,
                    "ok",
                    Some(format!("from {} by snapshot {}", src.id, snap.id)),
                )
                .await;
                Ok((inst, snap))
            }
            Err(e) => {
                // The clone's snapshot is of no use without the clone.
                if let Err(e2) = self.delete_snapshot(scope, &snap.id).await {
                    tracing::warn!(snapshot = %snap.id, error = %e2, "could not remove the failed clone's snapshot");
                }
                Err(e)
            }
        }
    }
}
