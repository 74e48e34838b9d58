//! `kumo dev sim-hosts`: thousands of simulated hosts in this process, joined to a running
//! controller, until Ctrl-C. For scale tests of the controller and scheduler.

use crate::server::{parse_capacity, parse_label};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use kumo_simfleet::{Fleet, FleetConfig};

#[derive(clap::Args, Debug)]
pub struct SimHostsArgs {
    /// The controller's URL.
    #[arg(long, env = "KUMO_CONTROLLER", default_value = "http://127.0.0.1:8780")]
    pub controller: String,
    /// Join token every simulated host registers with.
    #[arg(long, env = "KUMO_JOIN_TOKEN")]
    pub join_token: String,
    /// How many hosts.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Hosts are named PREFIX-0000, PREFIX-0001 ...
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Spread the hosts round-robin over site1..siteN.
    #[arg(long, default_value_t = 1)]
    pub sites: usize,
    /// What each host offers the scheduler, VCPUS:MEMORY_MIB.
    #[arg(long, default_value = "64:262144", value_parser = parse_capacity)]
    pub capacity: (u32, u64),
    /// A label KEY=VALUE on every host (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Seconds between two heartbeats of one host (spread over all hosts).
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_interval: f64,
    /// Hosts share storage pools (pool-0, pool-1 ...) in groups of this many.
    #[arg(long)]
    pub storage_pool_every: Option<usize>,
    /// Where the shared agent listener binds.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

pub async fn run(a: SimHostsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.sites > 0, "--sites must be at least 1");
    let interval = Duration::try_from_secs_f64(a.heartbeat_interval)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--heartbeat-interval must be a positive number of seconds")?;
    // Each host may hold a connection at times; the default soft limit (1024) is too low.
    match kumo_simfleet::raise_fd_limit() {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let cfg = FleetConfig {
        controller: a.controller,
        join_token: a.join_token,
        count: a.count,
        name_prefix: a.prefix,
        sites: (1..=a.sites).map(|i| format!("site{i}")).collect(),
        vcpus: a.capacity.0,
        memory_mib: a.capacity.1,
        labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
        storage_pool_every: a.storage_pool_every,
        heartbeat_interval: interval,
        listen: a.listen,
    };
    let t = Instant::now();
    let count = cfg.count;
    let fleet = match Fleet::start(cfg).await {
        Ok(f) => f,
        // Host names are unique and a fleet keeps no identities between runs.
        Err(e @ kumo_simfleet::FleetError::Refused { status: 409, .. }) => {
            return Err(anyhow::Error::new(e).context(
                "starting the simulated hosts (an earlier run registered these names: pass another --prefix)",
            ))
        }
        Err(e) => return Err(anyhow::Error::new(e).context("starting the simulated hosts")),
    };
    println!(
        "registered {count} hosts in {:.1} s (agent listener {}; Ctrl-C to stop)",
        t.elapsed().as_secs_f64(),
        fleet.addr()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    let s = fleet.stats();
    println!(
        "stopping: {} VMs; {} heartbeats ({} failed), {} puts, {} deletes",
        fleet.vm_count(),
        s.heartbeats_ok + s.heartbeats_failed,
        s.heartbeats_failed,
        s.puts,
        s.deletes
    );
    fleet.shutdown().await;
    Ok(())
}
