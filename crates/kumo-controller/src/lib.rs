//! The controller. REST, EC2 and CLI are thin front ends over the operations here; the
//! reconciler converges hosts to the desired state in the store. Nothing lives only in
//! memory: after a restart the reconciler picks up from the store.

mod agent_client;
mod error;
mod evacuate;
mod ha;
mod hosts;
mod images;
mod instances;
mod migrate;
mod netpolicy;
mod networks;
mod pathwatch;
mod placement;
mod reconcile;
mod security;
mod storage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use agent_client::{credential, AgentClient, AgentError};
pub use error::OpError;
pub use ha::{DEFAULT_LEASE_TTL, LEASE_MARGIN};
pub use hosts::HeartbeatResponse;
pub use instances::{DEFAULT_TYPE, MAX_BATCH};
use kumo_store::{NewEvent, Store};
pub use storage::EXPORT_FORMATS;
use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where image files live.
    pub image_dir: PathBuf,
    /// The backup repository (mounted at the same path on every host).
    pub backup_dir: PathBuf,
    /// A host that has not sent a heartbeat for this long is `down`.
    pub heartbeat_timeout: Duration,
    /// HA lease each heartbeat and desired-spec PUT grants a host for its VMs; a host that
    /// cannot renew kills them when it lapses, and failover waits for it to expire.
    pub lease_ttl: Duration,
    pub policy: kumo_scheduler::Policy,
    /// The network new instances join.
    pub default_network: String,
}

#[derive(Clone)]
pub struct Controller {
    pub store: Store,
    pub cfg: Arc<Config>,
    agents: AgentClient,
    wake: Arc<Notify>,
    decisions: Arc<std::sync::Mutex<placement::Decisions>>,
    /// Hosts' latest network-path reports (see [`pathwatch`]).
    paths: Arc<pathwatch::Paths>,
}

impl Controller {
    pub fn new(store: Store, cfg: Config) -> Result<Controller, OpError> {
        Ok(Controller {
            store,
            cfg: Arc::new(cfg),
            agents: AgentClient::new()?,
            wake: Arc::new(Notify::new()),
            decisions: Default::default(),
            paths: Default::default(),
        })
    }

    /// Ask the reconciler to run now rather than at its next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn agents(&self) -> &AgentClient {
        &self.agents
    }

    /// Journal a change made by the controller itself.
    pub(crate) async fn system_event(
        &self,
        project: Option<&str>,
        action: &str,
        target: &str,
        result: &str,
        detail: Option<String>,
    ) {
        let e = NewEvent {
            project_id: project.map(str::to_string),
            user_id: Some("system".into()),
            action: action.into(),
            target: Some(target.into()),
            result: result.into(),
            request_id: None,
            detail,
        };
        if let Err(err) = self.store.record_event(&e).await {
            tracing::warn!(error = %err, action, target, "could not record event");
        }
    }

    /// Start the background work: the reconciler and host liveness. Call once per process.
    pub async fn start_background(&self) -> Result<(), OpError> {
        self.recover_operations().await?;
        let me = self.clone();
        tokio::spawn(async move { me.reconcile_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.schedule_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.ha_loop().await });
        Ok(())
    }

    /// Operations that were running when the previous controller process died.
    async fn recover_operations(&self) -> Result<(), OpError> {
        for op in self.store.running_operations().await? {
            if op.kind == "image-import" {
                // The import's temp file is gone with its process; the image never became available.
                let msg = "the controller restarted during the import; import the image again";
                self.store.fail_image(&op.target_id, msg).await?;
                self.store.finish_operation(&op.id, Some(msg)).await?;
            } else if op.kind == "migrate" {
                // Driven from the migrations table below.
            } else {
                self.recover_storage_operation(&op).await?;
            }
        }
        self.recover_migrations().await?;
        images::remove_stale_temp_files(&self.cfg.image_dir).await;
        Ok(())
    }
}
