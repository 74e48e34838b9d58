//! The agent owns one host. The controller PUTs whole desired VM specs (idempotent, guarded by
//! generation numbers); one worker per VM converges the host to them; heartbeats report what
//! the agent observes. The agent keeps a small local ledger so it can restart without
//! touching running VMs: QEMU keeps running and the driver re-attaches to it.

mod disks;
mod error;
mod heartbeat;
mod http;
mod leases;
mod ledger;
pub mod metadata;
mod migrate;
mod probes;
mod storage;
mod tenant;
mod vms;
mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::AgentError;
use kumo_hypervisor::Hypervisor;
use kumo_network::HostNetwork;
use kumo_types::agent::HostInfo;
pub use ledger::Identity;
pub use probes::{ProbeError, ProbeTarget};

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub controller: String,
    pub join_token: Option<String>,
    pub name: String,
    pub site: String,
    /// Address the agent listens on.
    pub listen: std::net::SocketAddr,
    /// URL the controller uses to reach this agent; derived from the bound address if absent.
    pub advertise: Option<String>,
    /// `qemu` or `sim`.
    pub hypervisor: String,
    pub accel: kumo_hypervisor::AccelChoice,
    /// Run VM networks (bridges, taps, dnsmasq) and QEMU inside this network namespace.
    pub vm_netns: Option<String>,
    pub heartbeat_interval: Duration,
    /// How long a graceful stop waits for the guest before forcing it off.
    pub stop_timeout: Duration,
    /// Offer this many vCPUs and MiB of memory instead of the machine's own.
    pub capacity: Option<(u32, u64)>,
    /// Operator labels for placement policies (`role=core`, `role=spare` ...).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The storage pool of this host's VM disks and volumes.
    pub pool: kumo_storage::pool::PoolConfig,
    /// How often the network policy is fetched and the host's networks re-rendered (drift repair).
    pub network_interval: Duration,
    /// Prefix of router namespace names (unique per machine; default from `vm_netns` or "kumo-").
    pub router_prefix: Option<String>,
    /// This host's VXLAN source address.
    pub tunnel_ip: Option<std::net::Ipv4Addr>,
    /// 802.1Q trunk interface for VLAN networks.
    pub trunk: Option<String>,
    /// Existing bridge on the public network (elastic IPs).
    pub public_bridge: Option<String>,
    /// Bytes a second a backup may copy (`None`: unlimited).
    pub backup_rate: Option<u64>,
    /// Network-path probe targets on the VM-facing side (`--probe`); empty: none.
    pub probes: Vec<ProbeTarget>,
}

pub struct Agent {
    cfg: Config,
    hv: Arc<dyn Hypervisor>,
    net: Option<HostNetwork>,
    identity: Identity,
    address: String,
    info: HostInfo,
    vms: vms::Vms,
    http: reqwest::Client,
    beat: tokio::sync::Notify,
    tenant: Arc<tenant::TenantState>,
    pool: kumo_storage::pool::Pool,
    jobs: storage::Jobs,
    /// HA leases for this host's VMs (see [`leases`]).
    leases: leases::Leases,
    /// Network-path probes and what they see (see [`probes`]).
    probes: probes::Probes,
    /// One lock per image id: VMs starting together fetch a shared image once.
    image_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Agent {
    pub fn info(&self) -> &HostInfo {
        &self.info
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// Start an agent: bind, register (first time) or load its identity, re-attach to running
/// VMs, then serve and heartbeat until the process ends. Returns once serving has started.
pub async fn start(cfg: Config) -> Result<Arc<Agent>, AgentError> {
    // Bad probe targets stop the agent before it touches anything.
    let probes =
        probes::Probes::new(cfg.probes.clone()).map_err(|e| AgentError::Config(e.to_string()))?;
    probes
        .check(cfg.vm_netns.as_deref())
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| AgentError::io(format!("binding {}", cfg.listen), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AgentError::io("reading bound address", e))?;
    let address = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{bound}"));
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| AgentError::io(format!("creating {}", cfg.data_dir.display()), e))?;

    let hv: Arc<dyn Hypervisor> = match cfg.hypervisor.as_str() {
        "qemu" => {
            Arc::new(kumo_hypervisor::QemuDriver::new(cfg.data_dir.join("run"), cfg.accel).await?)
        }
        "sim" => Arc::new(kumo_hypervisor::SimDriver::new(cfg.data_dir.join("run"))),
        other => {
            return Err(AgentError::Config(format!(
                "unknown hypervisor {other:?}; use qemu or sim"
            )))
        }
    };
    let net = if cfg.hypervisor == "qemu" {
        let router_prefix = cfg
            .router_prefix
            .clone()
            .unwrap_or_else(|| format!("{}-r-", cfg.vm_netns.as_deref().unwrap_or("kumo")));
        let opts = kumo_network::HostOptions {
            router_prefix,
            tunnel_ip: cfg.tunnel_ip,
            trunk: cfg.trunk.clone(),
            public_bridge: cfg.public_bridge.clone(),
        };
        Some(HostNetwork::new(cfg.vm_netns.clone(), cfg.data_dir.join("net"), opts).await?)
    } else {
        None
    };
    let mut info = heartbeat::host_info(hv.as_ref()).await;
    info.labels = cfg.labels.clone();
    let pool = kumo_storage::pool::Pool::open(cfg.pool.clone())?;
    // Hosts naming one shared pool share it (placement and spread groups compare this name).
    info.storage_pool = if cfg.pool.kind == kumo_storage::pool::PoolKind::Shared {
        cfg.pool.name.clone()
    } else {
        String::new()
    };
    info.tunnel_ip = cfg.tunnel_ip.map(|t| t.to_string()).unwrap_or_default();
    // Simulated VMs take no disk: a sim host leaves disk unchecked (0).
    let capacity = pool.capacity().await?;
    info.pool = Some(kumo_types::storage::PoolReport {
        name: cfg.pool.name.clone(),
        kind: cfg.pool.kind.to_string(),
        total_bytes: capacity.total_bytes,
        free_bytes: capacity.free_bytes,
    });
    if cfg.hypervisor == "qemu" {
        info.disk_gib = capacity.total_bytes >> 30;
    }
    if let Some((vcpus, memory_mib)) = cfg.capacity {
        info.vcpus = vcpus;
        info.memory_mib = memory_mib;
    }
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| AgentError::Controller(format!("building HTTP client: {e}")))?;
    let identity = heartbeat::identity(&cfg, &http, &address, &info).await?;
    let vms = vms::Vms::load(&cfg.data_dir)?;
    let tenant = Arc::new(tenant::TenantState::load(&cfg.data_dir));
    let lease_files = leases::LeaseFiles::new(&cfg.pool, &identity.host_id);
    let lease_state = leases::Leases::load(&cfg.data_dir, lease_files);
    let agent = Arc::new(Agent {
        cfg,
        hv,
        net,
        identity,
        address,
        info,
        vms,
        http,
        beat: tokio::sync::Notify::new(),
        tenant,
        pool,
        jobs: Default::default(),
        leases: lease_state,
        probes,
        image_locks: Default::default(),
    });
    agent.hold_unleased().await;
    agent.resume().await;
    let app = http::router(agent.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "agent HTTP server stopped");
        }
    });
    let a = agent.clone();
    tokio::spawn(async move { a.heartbeat_loop().await });
    let a = agent.clone();
    tokio::spawn(async move { a.watchdog_loop().await });
    let a = agent.clone();
    tokio::spawn(async move { a.network_loop().await });
    if !agent.cfg.probes.is_empty() {
        let a = agent.clone();
        tokio::spawn(async move { a.probe_loop().await });
    }
    tracing::info!(host = %agent.identity.host_id, address = %agent.address, hypervisor = agent.hv.name(), accel = %agent.info.accel, "agent ready");
    Ok(agent)
}
