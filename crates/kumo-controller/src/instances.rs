//! Instance operations: validate, write the desired state, wake the reconciler.
//! They never talk to a host directly (except to read a console).

use kumo_scheduler::Request;
use kumo_store::{InstanceRow, LaunchExtras, NewInstance, Scope};
use kumo_types::api::CreateInstance;
use kumo_types::InstanceState;

use crate::{Controller, OpError};

pub const DEFAULT_TYPE: &str = "t1.small";
/// Instances one request may create.
pub const MAX_BATCH: u32 = 1000;

/// EC2's limit on user data (before base64).
const MAX_USER_DATA: usize = 16 * 1024;

impl Controller {
    pub async fn create_instance(
        &self,
        scope: &Scope,
        req: &CreateInstance,
    ) -> Result<InstanceRow, OpError> {
        self.create_instance_with(scope, req, &LaunchExtras::default())
            .await
    }

    /// [`Controller::create_instance`] recording EC2 launch details (user data, reservation).
    pub async fn create_instance_with(
        &self,
        scope: &Scope,
        req: &CreateInstance,
        extras: &LaunchExtras,
    ) -> Result<InstanceRow, OpError> {
        let mut rows = self
            .create_instances(scope, req, 1, 1, |_| (req.name.clone(), extras.clone()))
            .await?;
        rows.pop()
            .ok_or_else(|| OpError::Internal("no instance was created".into()))
    }

    /// Create `count` instances from one request in one step: as many as fit, at least `min`,
    /// or none. `each(n)` names the n-th instance and gives its launch details.
    pub async fn create_instances(
        &self,
        scope: &Scope,
        req: &CreateInstance,
        count: u32,
        min: u32,
        each: impl Fn(u32) -> (String, LaunchExtras),
    ) -> Result<Vec<InstanceRow>, OpError> {
        if !(1..=MAX_BATCH).contains(&count) || min < 1 || min > count {
            return Err(OpError::Invalid(format!(
                "count must be 1 to {MAX_BATCH} and min_count 1 to count (got count {count}, min_count {min})"
            )));
        }
        let ha_priority = req
            .ha_priority
            .unwrap_or(kumo_types::api::HA_PRIORITY_DEFAULT);
        kumo_store::check_ha_priority(ha_priority)?;
        // An imported machine's identity, one machine at a time.
        if let Some(m) = &req.mac {
            if !kumo_types::id::valid_unicast_mac(&m.to_ascii_lowercase()) {
                return Err(OpError::Invalid(format!(
                    "mac {m:?}: a unicast MAC address like 52:54:00:12:34:56"
                )));
            }
        }
        if let Some(u) = &req.uuid {
            if !kumo_types::id::valid_uuid(u) {
                return Err(OpError::Invalid(format!(
                    "uuid {u:?}: a UUID like 4c4c4544-0042-3510-8052-b4c04f4e4b32"
                )));
            }
        }
        if (req.mac.is_some() || req.uuid.is_some()) && count != 1 {
            return Err(OpError::Invalid(
                "a MAC or UUID belongs to one instance: create them one at a time".into(),
            ));
        }
        let snapshot = match &req.snapshot {
            Some(id) => Some(self.bootable_snapshot(scope, id, &req.image).await?),
            None => None,
        };
        let image = match &snapshot {
            Some(snap) => Ok(self
                .store
                .image_unscoped(snap.image_id.as_deref().unwrap_or_default())
                .await?),
            None => self.store.image(scope, &req.image).await,
        }
        .map_err(|e| match e {
            kumo_store::StoreError::NotFound { .. } => OpError::Invalid(format!(
                "image {:?} does not exist; see `kumo image list`",
                req.image
            )),
            other => other.into(),
        })?;
        if req
            .user_data
            .as_ref()
            .is_some_and(|u| u.len() > MAX_USER_DATA)
        {
            return Err(OpError::Invalid(format!(
                "user data is limited to {MAX_USER_DATA} bytes"
            )));
        }
        if image.kind != "disk" {
            return Err(OpError::Invalid(format!(
                "image {} is a {} image; instances boot from disk images",
                image.id, image.kind
            )));
        }
        if image.state != "available" {
            return Err(OpError::Invalid(format!(
                "image {} is {}, not available",
                image.id, image.state
            )));
        }
        let type_name = req.instance_type.as_deref().unwrap_or(DEFAULT_TYPE);
        let (request, itype, group) = self
            .placement_request(
                scope,
                type_name,
                req.site.clone(),
                &req.constraints,
                req.placement_group.as_deref(),
            )
            .await?;
        // Network, security groups and key pair of the request, resolved within the project.
        // The key first: the others may create the project's default network or group.
        let key_name = self
            .resolve_key_name(scope, req.key_name.as_deref())
            .await?;
        let network = self.resolve_network(scope, req.network.as_deref()).await?;
        let security_group_ids = self
            .resolve_security_groups(scope, &req.security_groups)
            .await?;
        // The root disk is at least as large as the image; a snapshot's disk has its own size
        // and lives in one pool, which the instance must be placed in.
        let image_gib = image.virtual_size.unwrap_or(0).div_ceil(1 << 30);
        let disk_gib = match &snapshot {
            Some(snap) => snap.size_bytes.div_ceil(kumo_store::GIB),
            None => itype.disk_gib.max(image_gib),
        };
        let pool_key = snapshot.as_ref().map(|s| match &s.host_id {
            Some(h) => format!("local:{h}"),
            None => s.pool.clone(),
        });
        let request = Request {
            disk_gib,
            pool_key,
            ..request
        };
        let news: Vec<NewInstance> = (0..count)
            .map(|n| {
                let (name, mut extras) = each(n);
                if extras.user_data.is_none() {
                    extras.user_data = req.user_data.clone();
                }
                NewInstance {
                    name,
                    image_id: image.id.clone(),
                    instance_type: itype.name.clone(),
                    vcpus: itype.vcpus,
                    memory_mib: itype.memory_mib,
                    disk_gib,
                    network_id: network.id.clone(),
                    extras,
                    placement_group: group.clone(),
                    site: req.site.clone(),
                    constraints: req.constraints.clone(),
                    security_group_ids: security_group_ids.clone(),
                    key_name: key_name.clone(),
                    root_snapshot_id: snapshot.as_ref().map(|s| s.id.clone()),
                    mac: req.mac.as_ref().map(|m| m.to_ascii_lowercase()),
                    smbios_uuid: req.uuid.as_ref().map(|u| u.to_ascii_lowercase()),
                    ha: req.ha,
                    ha_priority,
                }
            })
            .collect();
        let rows = self
            .store
            .create_instances(scope, &news, min as usize, |p, _| {
                let g = group.as_ref().map(|g| p.group_view(g));
                self.decide(p.hosts(), &request, g)
            })
            .await?;
        self.wake();
        Ok(rows)
    }

    pub async fn start_instance(&self, scope: &Scope, id: &str) -> Result<InstanceRow, OpError> {
        self.change(scope, id, |r| match r.state {
            InstanceState::Stopped => {
                let mut n = r.clone();
                n.state = InstanceState::Pending;
                n.desired = "running".into();
                Ok(Some(n))
            }
            InstanceState::Pending | InstanceState::Running => Ok(None),
            s => Err(format!("instance {} is {s} and cannot be started", r.id)),
        })
        .await
    }

    pub async fn stop_instance(&self, scope: &Scope, id: &str) -> Result<InstanceRow, OpError> {
        self.change(scope, id, |r| match r.state {
            InstanceState::Pending | InstanceState::Running => {
                let mut n = r.clone();
                n.state = InstanceState::Stopping;
                n.desired = "stopped".into();
                Ok(Some(n))
            }
            InstanceState::Stopping | InstanceState::Stopped => Ok(None),
            s => Err(format!("instance {} is {s} and cannot be stopped", r.id)),
        })
        .await
    }

    pub async fn reboot_instance(&self, scope: &Scope, id: &str) -> Result<InstanceRow, OpError> {
        self.change(scope, id, |r| match r.state {
            InstanceState::Running => {
                let mut n = r.clone();
                n.reboot_seq += 1;
                Ok(Some(n))
            }
            s => Err(format!(
                "instance {} is {s}; only running instances can be rebooted",
                r.id
            )),
        })
        .await
    }

    pub async fn terminate_instance(
        &self,
        scope: &Scope,
        id: &str,
    ) -> Result<InstanceRow, OpError> {
        let row = self
            .change(scope, id, |r| match r.state {
                InstanceState::Terminated | InstanceState::ShuttingDown => Ok(None),
                _ => {
                    let mut n = r.clone();
                    n.state = InstanceState::ShuttingDown;
                    n.desired = "terminated".into();
                    Ok(Some(n))
                }
            })
            .await?;
        if row.host_id.is_none() && row.state == InstanceState::ShuttingDown {
            // Never placed: nothing exists on any host.
            self.store.instance_absent_on_host(&row).await?;
        }
        Ok(row)
    }

    /// Change the instance type; only while stopped.
    pub async fn resize_instance(
        &self,
        scope: &Scope,
        id: &str,
        type_name: &str,
    ) -> Result<InstanceRow, OpError> {
        let itype = self
            .store
            .instance_type(type_name)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::NotFound { .. } => {
                    OpError::Invalid(format!("instance type {type_name:?} does not exist"))
                }
                other => other.into(),
            })?;
        let current = self.store.instance(scope, id).await?;
        if current.state == InstanceState::Stopped && current.instance_type != itype.name {
            // The stopped instance keeps its host: the new size must fit there.
            let host_id = current.host_id.clone().unwrap_or_default();
            let mut view = self
                .store
                .placement()
                .await?
                .host(&host_id)
                .cloned()
                .ok_or_else(|| OpError::Internal(format!("host {host_id} is not known")))?;
            view.used_vcpus = view.used_vcpus.saturating_sub(current.vcpus);
            view.used_memory_mib = view.used_memory_mib.saturating_sub(current.memory_mib);
            view.used_disk_gib = view.used_disk_gib.saturating_sub(current.disk_gib);
            // The instance stays where it is: only its size is checked.
            view.state = "up".into();
            view.labels.clear();
            let req = Request {
                vcpus: itype.vcpus,
                memory_mib: itype.memory_mib,
                disk_gib: current.disk_gib.max(itype.disk_gib),
                allow_spare: true,
                ..Request::default()
            };
            kumo_scheduler::choose(&[view], &req, &self.cfg.policy).map_err(OpError::NoCapacity)?;
        }
        self.change(scope, id, |r| {
            if r.state != InstanceState::Stopped {
                return Err(format!(
                    "instance {} is {}; stop it before changing its type",
                    r.id, r.state
                ));
            }
            if r.instance_type == itype.name {
                return Ok(None);
            }
            let mut n = r.clone();
            n.instance_type = itype.name.clone();
            n.vcpus = itype.vcpus;
            n.memory_mib = itype.memory_mib;
            n.disk_gib = n.disk_gib.max(itype.disk_gib);
            Ok(Some(n))
        })
        .await
    }

    /// Turn HA failover on or off and/or set its priority (0..=1000); `None` keeps the value.
    pub async fn set_instance_ha(
        &self,
        scope: &Scope,
        id: &str,
        ha: Option<bool>,
        ha_priority: Option<u32>,
    ) -> Result<InstanceRow, OpError> {
        self.store
            .set_instance_ha(scope, id, ha, ha_priority)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })
    }

    /// Replace the instance's (base64) user data; only while stopped.
    pub async fn set_user_data(
        &self,
        scope: &Scope,
        id: &str,
        user_data: Option<&str>,
    ) -> Result<InstanceRow, OpError> {
        if !self.store.set_user_data(scope, id, user_data).await? {
            let cur = self.store.instance(scope, id).await?;
            return Err(OpError::IncorrectState(format!(
                "instance {} is {}; stop it before changing its user data",
                cur.id, cur.state
            )));
        }
        Ok(self.store.instance(scope, id).await?)
    }

    async fn change(
        &self,
        scope: &Scope,
        id: &str,
        f: impl Fn(&InstanceRow) -> Result<Option<InstanceRow>, String>,
    ) -> Result<InstanceRow, OpError> {
        let row = self
            .store
            .update_instance(scope, id, f)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })?;
        self.wake();
        Ok(row)
    }

    /// The last `bytes` of the instance's serial console.
    pub async fn console_output(
        &self,
        scope: &Scope,
        id: &str,
        bytes: u64,
    ) -> Result<(InstanceRow, String), OpError> {
        let row = self.store.instance(scope, id).await?;
        let Some(host_id) = row.host_id.clone() else {
            return Ok((row, String::new()));
        };
        if row.state == InstanceState::Terminated {
            return Ok((row, String::new()));
        }
        let host = self.store.host(&host_id).await?;
        let out = self.agents().console(&host, &row.id, bytes).await?;
        Ok((row, out))
    }
}
