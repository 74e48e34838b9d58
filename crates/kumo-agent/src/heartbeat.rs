//! Registration and heartbeats: the agent tells the controller what it observes.

use std::time::Duration;

use kumo_hypervisor::Hypervisor;
use kumo_types::agent::{Heartbeat, HostInfo, RegisterRequest, RegisterResponse};
use serde::Deserialize;

use crate::error::chain;
use crate::ledger::{self, Identity};
use crate::{Agent, AgentError, Config};

#[derive(Debug, Deserialize, Default)]
struct HeartbeatResponse {
    #[serde(default)]
    delete: Vec<String>,
    /// VMs that live on another host of this shared pool now: removed, their disks kept.
    #[serde(default)]
    forget: Vec<String>,
    /// HA leases for the VMs the controller wants here, counted from when this heartbeat was sent.
    #[serde(default)]
    leases: Option<kumo_types::agent::LeaseGrant>,
}

/// A heartbeat answered later than this is of little use: the leases it grants run from its
/// sending, and the next one is due.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(4);

pub(crate) async fn host_info(hv: &dyn Hypervisor) -> HostInfo {
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let qemu_version = if hv.name() == "qemu" {
        tokio::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .await
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| {
                s.lines()
                    .next()
                    .map(|l| l.trim_start_matches("QEMU emulator version ").to_string())
            })
            .unwrap_or_default()
    } else {
        "sim".into()
    };
    HostInfo {
        vcpus,
        memory_mib,
        hypervisor: hv.name().into(),
        accel: hv
            .accel()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| "none".into()),
        qemu_version,
        labels: Default::default(),
        storage_pool: String::new(),
        disk_gib: 0,
        tunnel_ip: String::new(),
        pool: None,
    }
}

/// This agent's identity: from its ledger, or by registering with the join token.
pub(crate) async fn identity(
    cfg: &Config,
    http: &reqwest::Client,
    address: &str,
    info: &HostInfo,
) -> Result<Identity, AgentError> {
    if let Some(mut id) = ledger::load_identity(&cfg.data_dir)? {
        // The controller may have moved (e.g. `kumo up` on another port): follow the config.
        if id.controller != cfg.controller {
            id.controller = cfg.controller.clone();
            ledger::save_identity(&cfg.data_dir, &id)?;
        }
        return Ok(id);
    }
    let token = cfg.join_token.clone().ok_or_else(|| {
        AgentError::Config("this agent has not joined a controller yet; pass --join-token".into())
    })?;
    let req = RegisterRequest {
        join_token: token,
        name: cfg.name.clone(),
        address: address.to_string(),
        site: cfg.site.clone(),
        info: info.clone(),
    };
    let url = format!("{}/api/v1/agent/register", cfg.controller);
    let mut last = String::new();
    // The controller may still be starting: retry for a while.
    for _ in 0..30 {
        match http.post(&url).json(&req).send().await {
            Ok(r) if r.status().is_success() => {
                let resp: RegisterResponse = r
                    .json()
                    .await
                    .map_err(|e| AgentError::Controller(format!("bad register response: {e}")))?;
                let id = Identity {
                    host_id: resp.host_id,
                    host_secret: resp.host_secret,
                    controller: cfg.controller.clone(),
                };
                ledger::save_identity(&cfg.data_dir, &id)?;
                return Ok(id);
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                return Err(AgentError::Controller(format!(
                    "registration refused ({status}): {body}"
                )));
            }
            Err(e) => last = chain(&e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(AgentError::Controller(format!(
        "cannot reach the controller at {}: {last}",
        cfg.controller
    )))
}

impl Agent {
    pub(crate) async fn heartbeat_loop(self: std::sync::Arc<Self>) {
        loop {
            if let Err(e) = self.heartbeat_once().await {
                tracing::debug!(error = %chain(&e), "heartbeat failed");
            }
            // The watchdog waits for the first attempt to renew what a previous process let lapse.
            self.leases.first_beat.notify_one();
            tokio::select! {
                _ = self.beat.notified() => {}
                _ = tokio::time::sleep(self.cfg.heartbeat_interval) => {}
            }
        }
    }

    pub async fn heartbeat_once(&self) -> Result<(), AgentError> {
        let mut info = self.info.clone();
        if let Some(p) = self.pool_report().await {
            if self.hv.name() == "qemu" {
                info.disk_gib = p.total_bytes >> 30;
            }
            info.pool = Some(p);
        }
        let hb = Heartbeat {
            host_id: self.identity.host_id.clone(),
            address: self.address.clone(),
            info,
            vms: self.observe_all().await,
            repairs: self.take_repairs(),
            fenced: self.leases.take_reports(),
            path: self.probes.report(),
        };
        let url = format!("{}/api/v1/agent/heartbeat", self.identity.controller);
        // Leases granted in the answer run from here: before the controller receives it.
        let sent = std::time::Instant::now();
        let resp = self
            .http
            .post(&url)
            .timeout(HEARTBEAT_TIMEOUT)
            .bearer_auth(format!(
                "{}:{}",
                self.identity.host_id, self.identity.host_secret
            ))
            .json(&hb)
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            other => {
                self.restore_repairs(hb.repairs);
                self.leases.restore_reports(hb.fenced);
                return Err(AgentError::Controller(match other {
                    Ok(r) => format!("heartbeat answered {}", r.status()),
                    Err(e) => chain(&e),
                }));
            }
        };
        let r: HeartbeatResponse = resp.json().await.unwrap_or_default();
        if let Some(grant) = &r.leases {
            self.take_grant(sent, grant).await;
        }
        let removals = r.delete.iter().map(|id| (id, false));
        for (id, keep_disk) in removals.chain(r.forget.iter().map(|id| (id, true))) {
            tracing::info!(vm = %id, keep_disk, "controller does not want this VM here; removing it");
            if let Err(e) = self.delete_vm(id, keep_disk).await {
                tracing::warn!(vm = %id, error = %chain(&e), "could not remove VM");
            }
        }
        Ok(())
    }
}
