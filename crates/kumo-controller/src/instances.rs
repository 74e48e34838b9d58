//! Instance operations: validate, write the desired state, wake the reconciler.
//! They never talk to a host directly (except to read a console).

use kumo_scheduler::{HostView, Request};
use kumo_store::{InstanceRow, LaunchExtras, NewInstance, Scope};
use kumo_types::api::CreateInstance;
use kumo_types::InstanceState;

use crate::{Controller, OpError};

pub const DEFAULT_TYPE: &str = "t1.small";

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
        kumo_types::id::validate_name(&req.name).map_err(OpError::Invalid)?;
        let image = self
            .store
            .image(scope, &req.image)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::NotFound { .. } => OpError::Invalid(format!(
                    "image {:?} does not exist; see `kumo image list`",
                    req.image
                )),
                other => other.into(),
            })?;
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
        let itype = self
            .store
            .instance_type(type_name)
            .await
            .map_err(|e| match e {
                kumo_store::StoreError::NotFound { .. } => OpError::Invalid(format!(
                    "instance type {type_name:?} does not exist; see `kumo vm types`"
                )),
                other => other.into(),
            })?;
        let network = self.store.network(&self.cfg.default_network).await?;
        // The root disk is at least as large as the image.
        let image_gib = image.virtual_size.unwrap_or(0).div_ceil(1 << 30);
        let new = NewInstance {
            name: req.name.clone(),
            image_id: image.id.clone(),
            instance_type: itype.name.clone(),
            vcpus: itype.vcpus,
            memory_mib: itype.memory_mib,
            disk_gib: itype.disk_gib.max(image_gib),
            network_id: network.id,
            extras: extras.clone(),
        };
        let constraints =
            kumo_scheduler::parse_constraints(&req.constraints).map_err(OpError::Invalid)?;
        let request = Request {
            vcpus: itype.vcpus,
            memory_mib: itype.memory_mib,
            site: req.site.clone(),
            constraints,
            allow_spare: false,
        };
        let policy = self.cfg.policy;
        let row = self
            .store
            .create_instance(scope, &new, |hosts, usage| {
                let views = crate::placement::host_views(hosts, usage);
                kumo_scheduler::choose(&views, &request, &policy)
            })
            .await?;
        self.wake();
        Ok(row)
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
            let host = self.store.host(&host_id).await?;
            let usage = self.store.host_usage().await?;
            let u = usage.get(&host.id).cloned().unwrap_or_default();
            let view = HostView {
                id: host.id.clone(),
                name: host.name.clone(),
                site: host.site.clone(),
                state: "up".into(),
                vcpus: host.vcpus,
                memory_mib: host.memory_mib,
                used_vcpus: u.vcpus.saturating_sub(current.vcpus),
                used_memory_mib: u.memory_mib.saturating_sub(current.memory_mib),
                // The instance stays where it is: only its size is checked.
                labels: Default::default(),
            };
            let req = Request {
                vcpus: itype.vcpus,
                memory_mib: itype.memory_mib,
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
