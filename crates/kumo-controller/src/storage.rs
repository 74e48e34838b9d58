//! Storage pools as the operator sees them, and where disks go: which host of a pool does the
//! work for a disk (its own host in a local pool, any up host of a shared one).

use kumo_store::{Domain, HostRow, PoolRow, Scope};
use kumo_types::storage::{PoolHost, StoragePool, UpdateStoragePool};

use crate::{Controller, OpError};

mod backups;
mod exports;

pub use exports::EXPORT_FORMATS;
mod snapshots;
mod volumes;

/// The root disk's device in QEMU (volumes use their id).
pub(crate) const ROOT_DEVICE: &str = "virtio-disk0";

impl Controller {
    pub async fn storage_pools(&self) -> Result<Vec<StoragePool>, OpError> {
        let hosts = self.store.hosts().await?;
        let mut out = vec![];
        for p in self.store.storage_pools().await? {
            out.push(self.pool_view(&p, &hosts).await?);
        }
        Ok(out)
    }

    pub async fn storage_pool(&self, name: &str) -> Result<StoragePool, OpError> {
        let p = self.store.storage_pool(name).await?;
        let hosts = self.store.hosts().await?;
        self.pool_view(&p, &hosts).await
    }

    pub async fn update_storage_pool(
        &self,
        scope: &Scope,
        name: &str,
        req: &UpdateStoragePool,
    ) -> Result<StoragePool, OpError> {
        // Administrators only: the front ends check.
        let _ = scope;
        if let Some(o) = req.overcommit {
            self.store.set_pool_overcommit(name, o).await?;
        }
        self.storage_pool(name).await
    }

    async fn pool_view(&self, p: &PoolRow, hosts: &[HostRow]) -> Result<StoragePool, OpError> {
        let shared = kumo_store::is_shared(&p.kind);
        let members: Vec<&HostRow> = hosts.iter().filter(|h| h.pool_name == p.name).collect();
        let mut view = StoragePool {
            name: p.name.clone(),
            kind: p.kind.clone(),
            shared,
            overcommit: p.overcommit,
            total_bytes: 0,
            free_bytes: 0,
            provisioned_bytes: 0,
            limit_bytes: 0,
            hosts: vec![],
        };
        if shared {
            let u = self
                .store
                .domain_usage(&Domain {
                    pool: p.name.clone(),
                    host_id: None,
                })
                .await?;
            view.total_bytes = u.total_bytes;
            view.free_bytes = u.free_bytes;
            view.provisioned_bytes = u.provisioned_bytes;
            view.limit_bytes = u.limit_bytes.unwrap_or(0);
        }
        for h in members {
            let u = self
                .store
                .domain_usage(&kumo_store::Store::domain_of(h))
                .await?;
            if !shared {
                view.total_bytes += u.total_bytes;
                view.free_bytes += u.free_bytes;
                view.provisioned_bytes += u.provisioned_bytes;
                view.limit_bytes += u.limit_bytes.unwrap_or(0);
            }
            view.hosts.push(PoolHost {
                host_id: h.id.clone(),
                host_name: h.name.clone(),
                state: h.state.clone(),
                total_bytes: h.pool_total_bytes,
                free_bytes: h.pool_free_bytes,
                provisioned_bytes: u.provisioned_bytes,
            });
        }
        Ok(view)
    }

    /// A storage job whose controller died with it: the agent's job ran on or was lost, and
    /// nobody recorded its end, so it failed (a backup without its record is not part of any
    /// chain; the repository removes its file on the next run). Run it again.
    pub(crate) async fn recover_storage_operation(
        &self,
        op: &kumo_store::OperationRow,
    ) -> Result<(), OpError> {
        let msg = "the controller restarted during the operation; run it again";
        match op.kind.as_str() {
            "backup" => self.store.finish_backup(&op.target_id, Err(msg)).await?,
            "volume-copy" => self.store.volume_deleted(&op.target_id).await?,
            "restore" if op.target_id.starts_with("vol-") => {
                if let Ok(v) = self.store.volume(&Scope::system(), &op.target_id).await {
                    if v.state == "creating" {
                        self.store.volume_deleted(&v.id).await?;
                    }
                }
            }
            _ => {}
        }
        self.store.finish_operation(&op.id, Some(msg)).await?;
        Ok(())
    }

    /// An agent's storage error as the user should see it: its refusals of bad input (a copy
    /// that does not fit, a full pool) are the user's, not an unavailable host.
    pub(crate) fn storage_error(e: crate::AgentError) -> OpError {
        match e {
            crate::AgentError::Status { status, body, .. } => {
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_string))
                    .unwrap_or(body);
                match status {
                    400 => OpError::Invalid(msg),
                    404 => OpError::Invalid(format!("the host does not have it: {msg}")),
                    409 => OpError::IncorrectState(msg),
                    507 => OpError::NoStorage(msg),
                    _ => OpError::Unavailable(msg),
                }
            }
            other => other.into(),
        }
    }

    /// A host that must be the one (a running VM's): refused unless it is up.
    pub(crate) async fn up_host(&self, id: &str) -> Result<HostRow, OpError> {
        let host = self.store.host(id).await?;
        if host.state != "up" {
            return Err(OpError::Unavailable(format!(
                "host {} is {}",
                host.name, host.state
            )));
        }
        Ok(host)
    }

    /// The host that works on a disk of this domain: its own host, or for a shared pool the
    /// preferred host if given and up, else any up host of the pool.
    pub(crate) async fn storage_host(
        &self,
        d: &Domain,
        prefer: Option<&str>,
    ) -> Result<HostRow, OpError> {
        if let Some(h) = &d.host_id {
            let host = self.store.host(h).await?;
            if host.state == "down" || host.state == "fenced" {
                return Err(OpError::Unavailable(format!(
                    "host {} holding storage pool {} is {}",
                    host.name, d.pool, host.state
                )));
            }
            return Ok(host);
        }
        let hosts = self.store.hosts().await?;
        let up = |h: &&HostRow| h.pool_name == d.pool && h.state == "up";
        if let Some(p) = prefer {
            if let Some(h) = hosts.iter().filter(up).find(|h| h.id == p) {
                return Ok(h.clone());
            }
        }
        hosts.iter().find(up).cloned().ok_or_else(|| {
            OpError::Unavailable(format!("no host of storage pool {} is up", d.pool))
        })
    }

    /// Where a new volume goes without other hints: the up host with the most room in its pool
    /// (`pool`: only hosts of that pool).
    pub(crate) async fn roomiest_domain(&self, pool: Option<&str>) -> Result<Domain, OpError> {
        let hosts = self.store.hosts().await?;
        let mut best: Option<(u64, Domain)> = None;
        for h in hosts.iter().filter(|h| h.state == "up") {
            if pool.is_some_and(|p| p != h.pool_name) {
                continue;
            }
            let d = kumo_store::Store::domain_of(h);
            let u = self.store.domain_usage(&d).await?;
            let room = u
                .limit_bytes
                .map(|l| l.saturating_sub(u.provisioned_bytes))
                .unwrap_or(u64::MAX);
            if best.as_ref().is_none_or(|(r, _)| room > *r) {
                best = Some((room, d));
            }
        }
        match (best, pool) {
            (Some((_, d)), _) => Ok(d),
            (None, Some(p)) => {
                self.store.storage_pool(p).await?;
                Err(OpError::Unavailable(format!(
                    "no host of storage pool {p} is up"
                )))
            }
            (None, None) => Err(OpError::Unavailable("no host is up".into())),
        }
    }
}
