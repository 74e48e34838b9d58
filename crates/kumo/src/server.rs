//! `kumo server` and `kumo agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kumo_controller::{Config, Controller};
use kumo_store::Store;

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Where the store and images live.
    #[arg(long, env = "KUMO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The backup repository: a directory the controller and every host mount at the same
    /// path, ideally on another machine (default DATA_DIR/backups).
    #[arg(long)]
    pub backup_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8780")]
    pub listen: SocketAddr,
    /// SigV4 region clients sign for.
    #[arg(long, default_value = "kumo")]
    pub region: String,
    /// Seconds without a heartbeat before a host is `down`.
    #[arg(long, default_value_t = 3)]
    pub heartbeat_timeout: u64,
    /// Seconds of HA lease each heartbeat grants a host for its VMs: a host that cannot renew
    /// kills its VMs when it lapses, and failover waits for it to expire. Several heartbeat
    /// intervals long.
    #[arg(long, default_value_t = 6)]
    pub lease_ttl: u64,
    /// CIDR of the default network, used when the store is first created.
    #[arg(long, default_value = "10.77.0.0/24")]
    pub default_cidr: String,
    /// Write the admin credentials and a join token here when the store is first created.
    #[arg(long)]
    pub bootstrap_file: Option<PathBuf>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// The cluster's placement policy; hosts may override the ratios (`kumo host set`).
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// `spread` (emptiest host first) or `pack` (fullest host that fits first).
    #[arg(long, default_value = "spread")]
    pub placement_strategy: kumo_scheduler::Weigher,
    /// Virtual CPUs per physical CPU.
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Guest memory per MiB of host memory.
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// Host memory kept for the host itself, MiB.
    #[arg(long, default_value_t = 512)]
    pub reserved_memory: u64,
    /// Virtual disk GiB per GiB of host storage (disks are thin overlays).
    #[arg(long, default_value_t = 1.0)]
    pub disk_overcommit: f64,
}

impl Default for PolicyArgs {
    fn default() -> Self {
        let p = kumo_scheduler::Policy::default();
        PolicyArgs {
            placement_strategy: p.weigher,
            cpu_overcommit: p.cpu_overcommit,
            memory_overcommit: p.memory_overcommit,
            reserved_memory: p.reserved_memory_mib,
            disk_overcommit: p.disk_overcommit,
        }
    }
}

impl PolicyArgs {
    fn policy(&self) -> anyhow::Result<kumo_scheduler::Policy> {
        for (name, v) in [
            ("--cpu-overcommit", self.cpu_overcommit),
            ("--memory-overcommit", self.memory_overcommit),
            ("--disk-overcommit", self.disk_overcommit),
        ] {
            if !(v > 0.0 && v <= 64.0) {
                anyhow::bail!("{name} must be above 0 and at most 64, not {v}");
            }
        }
        Ok(kumo_scheduler::Policy {
            cpu_overcommit: self.cpu_overcommit,
            memory_overcommit: self.memory_overcommit,
            reserved_memory_mib: self.reserved_memory,
            disk_overcommit: self.disk_overcommit,
            weigher: self.placement_strategy,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// The controller's URL.
    #[arg(
        long,
        alias = "join",
        env = "KUMO_CONTROLLER",
        default_value = "http://127.0.0.1:8780"
    )]
    pub controller: String,
    /// Join token (needed the first time only).
    #[arg(long, env = "KUMO_JOIN_TOKEN")]
    pub join_token: Option<String>,
    #[arg(long, env = "KUMO_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Host name (default: the machine's hostname).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "site1")]
    pub site: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// URL the controller uses to reach this agent (default: from the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// qemu or sim.
    #[arg(long, default_value = "qemu")]
    pub hypervisor: String,
    /// auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: kumo_hypervisor::AccelChoice,
    /// Put VM networks and QEMU in this network namespace (created if missing).
    #[arg(long)]
    pub vm_netns: Option<String>,
    /// Seconds between heartbeats (each renews the host's HA leases).
    #[arg(long, default_value_t = 1)]
    pub heartbeat_interval: u64,
    /// Seconds a stop waits for the guest to power off before forcing it.
    #[arg(long, default_value_t = 30)]
    pub stop_timeout: u64,
    /// Offer VCPUS:MEMORY_MIB to the scheduler instead of the machine's own size.
    #[arg(long, value_parser = parse_capacity)]
    pub capacity: Option<(u32, u64)>,
    /// A host label KEY=VALUE for placement policies (repeatable), e.g. role=core, role=spare.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// The storage pool holding this host's VM disks and volumes. Hosts naming the same
    /// shared pool share it (default: `local`, a pool of this host alone).
    #[arg(long, default_value = "")]
    pub storage_pool: String,
    /// The pool's kind: dir (local files), shared (a directory every host of the pool mounts)
    /// or lvm (a volume group). Default: shared when --storage-pool is given, else dir.
    #[arg(long, value_parser = parse_pool_kind)]
    pub pool_kind: Option<kumo_storage::pool::PoolKind>,
    /// The pool's directory (dir, shared; default DATA_DIR/pool) or, for lvm, where its
    /// metadata lives.
    #[arg(long)]
    pub pool_path: Option<std::path::PathBuf>,
    /// The volume group of an lvm pool.
    #[arg(long)]
    pub pool_vg: Option<String>,
    /// Seconds between network re-renders (policy refresh and drift repair).
    #[arg(long, default_value_t = 5)]
    pub network_interval: u64,
    /// Prefix of router namespace names; must be unique per machine (default: VM_NETNS-r- or kumo-r-).
    #[arg(long)]
    pub router_netns_prefix: Option<String>,
    /// This host's address for VXLAN tunnels to other hosts (without it, networks stay on this host).
    #[arg(long)]
    pub tunnel_ip: Option<std::net::Ipv4Addr>,
    /// 802.1Q trunk interface for VLAN-isolated networks.
    #[arg(long)]
    pub trunk: Option<String>,
    /// An existing bridge on the public network, for elastic IPs.
    #[arg(long)]
    pub public_bridge: Option<String>,
    /// Limit each backup to this many MiB a second, so it does not starve the guests' I/O.
    #[arg(long, value_name = "MIB_PER_S")]
    pub backup_rate: Option<u64>,
    /// A network-path probe target on the VMs' side (repeatable): IP (ICMP echo) or IP%IFACE
    /// (ARP on that interface, e.g. 203.0.113.1%pub0). When every target stops answering while
    /// heartbeats still arrive, the controller live-migrates this host's VMs away.
    #[arg(long = "probe", value_name = "TARGET", value_parser = parse_probe)]
    pub probes: Vec<kumo_agent::ProbeTarget>,
}

pub(crate) fn parse_probe(s: &str) -> Result<kumo_agent::ProbeTarget, String> {
    s.parse().map_err(|e: kumo_agent::ProbeError| e.to_string())
}

pub(crate) fn parse_pool_kind(s: &str) -> Result<kumo_storage::pool::PoolKind, String> {
    s.parse()
        .map_err(|_| format!("pool kind {s:?}: one of dir, shared, lvm"))
}

pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or("a label is KEY=VALUE, e.g. role=core")?;
    Ok((k.to_string(), v.to_string()))
}

pub(crate) fn parse_capacity(s: &str) -> Result<(u32, u64), String> {
    let (c, m) = s
        .split_once(':')
        .ok_or("capacity must be VCPUS:MEMORY_MIB, e.g. 16:65536")?;
    let c: u32 = c.parse().map_err(|_| format!("bad vCPU count {c:?}"))?;
    let m: u64 = m
        .parse()
        .map_err(|_| format!("bad memory size {m:?} (MiB)"))?;
    if c == 0 || m == 0 {
        return Err("capacity must be positive".into());
    }
    Ok((c, m))
}

pub struct Bootstrapped {
    pub ctl: Controller,
    pub region: String,
    pub bootstrap: Option<kumo_store::Bootstrap>,
}

pub async fn open_controller(a: &ServerArgs) -> anyhow::Result<Bootstrapped> {
    if !(2..=3600).contains(&a.lease_ttl) {
        anyhow::bail!("--lease-ttl must be 2 to 3600 seconds, not {}", a.lease_ttl);
    }
    let data = a.data_dir.clone().unwrap_or_else(crate::default_data_dir);
    let image_dir = data.join("images");
    std::fs::create_dir_all(&image_dir)
        .with_context(|| format!("creating {}", image_dir.display()))?;
    let store = Store::open_sqlite(&data.join("kumo.db"))
        .await
        .context("opening the store")?;
    let bootstrap = store
        .bootstrap(&a.default_cidr)
        .await
        .context("initialising the store")?;
    let backup_dir = a.backup_dir.clone().unwrap_or_else(|| data.join("backups"));
    std::fs::create_dir_all(&backup_dir)
        .with_context(|| format!("creating {}", backup_dir.display()))?;
    let cfg = Config {
        image_dir,
        backup_dir,
        heartbeat_timeout: Duration::from_secs(a.heartbeat_timeout),
        lease_ttl: Duration::from_secs(a.lease_ttl),
        policy: a.policy.policy()?,
        default_network: "default".into(),
    };
    let ctl = Controller::new(store, cfg)?;
    ctl.start_background().await?;
    Ok(Bootstrapped {
        ctl,
        region: a.region.clone(),
        bootstrap,
    })
}

/// Serve the API on `listen`; returns the bound address once listening.
pub async fn serve(
    ctl: Controller,
    region: String,
    listen: SocketAddr,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = kumo_api::router(kumo_api::AppState { ctl, region });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let h = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    Ok((addr, h))
}

pub async fn run_server(a: ServerArgs) -> anyhow::Result<()> {
    let b = open_controller(&a).await?;
    if let (Some(boot), Some(path)) = (&b.bootstrap, &a.bootstrap_file) {
        let v = serde_json::json!({
            "access_key_id": boot.access_key.id,
            "secret_access_key": boot.access_key.secret,
            "join_token": boot.join_token,
            "region": a.region,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let (addr, h) = serve(b.ctl, b.region, a.listen).await?;
    tracing::info!(%addr, "kumo controller listening");
    tokio::select! {
        _ = h => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

pub fn agent_config(a: &AgentArgs) -> kumo_agent::Config {
    let name = a.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "host1".into())
    });
    use kumo_storage::pool::{PoolConfig, PoolKind};
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| crate::default_data_dir().join("agent"));
    let pool = PoolConfig {
        name: if a.storage_pool.is_empty() {
            "local".into()
        } else {
            a.storage_pool.clone()
        },
        kind: a.pool_kind.unwrap_or(if a.storage_pool.is_empty() {
            PoolKind::Dir
        } else {
            PoolKind::Shared
        }),
        path: a.pool_path.clone().unwrap_or_else(|| data_dir.join("pool")),
        vg: a.pool_vg.clone(),
    };
    kumo_agent::Config {
        data_dir,
        controller: a.controller.trim_end_matches('/').to_string(),
        join_token: a.join_token.clone(),
        name,
        site: a.site.clone(),
        listen: a.listen,
        advertise: a.advertise.clone(),
        hypervisor: a.hypervisor.clone(),
        accel: a.accel,
        vm_netns: a.vm_netns.clone(),
        heartbeat_interval: Duration::from_secs(a.heartbeat_interval.max(1)),
        stop_timeout: Duration::from_secs(a.stop_timeout),
        capacity: a.capacity,
        labels: a.labels.iter().cloned().collect(),
        pool,
        network_interval: Duration::from_secs(a.network_interval.max(1)),
        router_prefix: a.router_netns_prefix.clone(),
        tunnel_ip: a.tunnel_ip,
        trunk: a.trunk.clone(),
        public_bridge: a.public_bridge.clone(),
        backup_rate: a.backup_rate.map(|m| m.saturating_mul(1 << 20)),
        probes: a.probes.clone(),
    }
}

pub async fn run_agent(a: AgentArgs) -> anyhow::Result<()> {
    let agent = kumo_agent::start(agent_config(&a)).await?;
    tracing::info!(host = %agent.identity().host_id, "kumo agent running");
    tokio::signal::ctrl_c().await?;
    // VMs keep running: the next agent process re-attaches to them.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_capacity;

    #[test]
    fn capacity_is_vcpus_colon_mib() {
        assert_eq!(parse_capacity("16:65536"), Ok((16, 65536)));
        for bad in ["16", "x:1", "1:y", "0:1024", "4:0", ""] {
            assert!(parse_capacity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn probe_is_ip_or_ip_percent_iface() {
        use super::parse_probe;
        assert_eq!(
            parse_probe("203.0.113.1%pub0").map(|t| t.to_string()),
            Ok("203.0.113.1%pub0".to_string())
        );
        let e = parse_probe("gw%pub0").expect_err("not an address");
        assert!(e.contains("not an IP address"), "{e}");
    }
}
