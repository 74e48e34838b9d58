//! `kumo dev cluster`: a test cluster of real hosts on this machine (see the
//! `kumo-testcluster` crate), in the foreground until Ctrl-C; `kumo dev cluster down` removes
//! clusters whose owner died.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kumo_testcluster::{sweep_stale, Cluster, ClusterSpec, HostSpec, Hypervisor};
use kumo_types::api::ImportImage;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ClusterArgs {
    #[command(subcommand)]
    cmd: Option<ClusterCmd>,
    /// Number of hosts, named host1, host2 ...
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Hosts run real QEMU guests (the default).
    #[arg(long, conflicts_with = "sim")]
    qemu: bool,
    /// Hosts run the in-memory `sim` hypervisor.
    #[arg(long)]
    sim: bool,
    /// Data and logs go here and are kept afterwards (default: a temporary directory,
    /// removed at exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// HOST:KEY=VALUE, a label for one host (repeatable), e.g. host3:role=spare.
    #[arg(long = "label", value_parser = parse_host_label)]
    labels: Vec<(String, String, String)>,
    /// VCPUS:MEMORY_MIB every host offers (default: the machine's own size).
    #[arg(long, value_parser = parse_capacity)]
    capacity: Option<(u32, u64)>,
    /// Seconds without a heartbeat before the controller marks a host down.
    #[arg(long, default_value_t = 6)]
    heartbeat_timeout: u64,
    /// Build the test guest and import it as the public image `demo`.
    #[arg(long)]
    demo: bool,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Remove test clusters whose owner process is gone (with --all: every cluster).
    Down {
        #[arg(long)]
        all: bool,
    },
}

fn parse_host_label(s: &str) -> Result<(String, String, String), String> {
    let err = || "a host label is HOST:KEY=VALUE, e.g. host3:role=spare".to_string();
    let (host, kv) = s.split_once(':').ok_or_else(err)?;
    let (k, v) = kv.split_once('=').ok_or_else(err)?;
    if host.is_empty() || k.is_empty() {
        return Err(err());
    }
    Ok((host.into(), k.into(), v.into()))
}

fn parse_capacity(s: &str) -> Result<(u32, u64), String> {
    let err = || "capacity is VCPUS:MEMORY_MIB, e.g. 2:2048".to_string();
    let (c, m) = s.split_once(':').ok_or_else(err)?;
    let c: u32 = c.parse().map_err(|_| err())?;
    let m: u64 = m.parse().map_err(|_| err())?;
    if c == 0 || m == 0 {
        return Err(err());
    }
    Ok((c, m))
}

pub async fn run(a: ClusterArgs) -> anyhow::Result<()> {
    if let Some(ClusterCmd::Down { all }) = a.cmd {
        let swept = sweep_stale(all);
        if swept.is_empty() {
            println!(
                "no {}test cluster to remove",
                if all { "" } else { "stale " }
            );
        }
        for line in swept {
            println!("removed {line}");
        }
        return Ok(());
    }
    if a.hosts == 0 {
        bail!("--hosts must be at least 1");
    }
    let hv = if a.sim {
        Hypervisor::Sim
    } else {
        crate::up::ensure_prerequisites(false)?;
        Hypervisor::Qemu
    };
    let mut hosts: Vec<HostSpec> = (1..=a.hosts)
        .map(|n| HostSpec {
            capacity: a.capacity,
            hypervisor: hv,
            ..HostSpec::qemu(&format!("host{n}"))
        })
        .collect();
    for (host, k, v) in &a.labels {
        let Some(h) = hosts.iter_mut().find(|h| &h.name == host) else {
            bail!(
                "--label {host}:{k}={v}: there is no host {host} (host1..host{})",
                a.hosts
            );
        };
        h.labels.push((k.clone(), v.clone()));
    }
    let keep_dir = a.dir.is_some();
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("kumo-dev-cluster-{}", std::process::id()))
    });
    let spec = ClusterSpec {
        kumo_bin: std::env::current_exe().context("finding the kumo binary")?,
        dir,
        hosts,
        heartbeat_timeout_secs: a.heartbeat_timeout,
        keep_dir,
    };
    eprintln!("starting a cluster of {} hosts ...", a.hosts);
    // Ctrl-C while starting drops the half-built cluster, which tears it down.
    let mut cluster = tokio::select! {
        c = Cluster::start(spec) => c?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    let cfg_path = cluster.dir().join("config.toml");
    cluster.client_config().save(&cfg_path)?;
    if a.demo {
        import_demo(&cluster.client()).await?;
    }
    print_summary(&cluster, &cfg_path);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("tearing down cluster {} ...", cluster.id());
    cluster.teardown().await?;
    Ok(())
}

fn print_summary(c: &Cluster, cfg_path: &std::path::Path) {
    let x = c.id();
    println!();
    println!(
        "kumo test cluster {x}: controller {} on bridge {} (10.252.{x}.0/24)",
        c.endpoint(),
        c.bridge()
    );
    println!(
        "  {:<10} {:<16} {:<16} log",
        "host", "mgmt address", "namespace"
    );
    for h in c.hosts() {
        println!(
            "  {:<10} {:<16} {:<16} {}",
            h.name,
            h.mgmt_ip,
            h.netns,
            h.log.display()
        );
    }
    println!("  data and logs: {}", c.dir().display());
    println!(
        "  public network {} (VXLAN over the management network between hosts); the outside: namespace {} at {}",
        kumo_testcluster::PUBLIC_CIDR,
        c.outside_netns(),
        kumo_testcluster::OUTSIDE_IP
    );
    println!();
    println!("Use it from another shell:");
    println!("  export KUMO_CONFIG={}", cfg_path.display());
    println!("  kumo host list");
    println!("  kumo vm list");
    println!(
        "  ip netns exec {} ip addr   # look inside a host",
        c.hosts()[0].netns
    );
    println!(
        "  kumo address-pool set --cidr {} --gateway {} --range 203.0.113.10-203.0.113.200   # elastic IPs",
        kumo_testcluster::PUBLIC_CIDR,
        kumo_testcluster::OUTSIDE_IP
    );
    println!(
        "  ip netns exec {} busybox wget -q -O - http://<elastic ip>/   # from the outside",
        c.outside_netns()
    );
    println!();
    println!("Press Ctrl-C to tear it all down (VMs included).");
}

/// Build the test guest (cached next to `kumo up`'s) and import it as `demo`.
async fn import_demo(c: &kumo_cli::Client) -> anyhow::Result<()> {
    let guest = crate::default_data_dir().join("guest");
    eprintln!("building the demo guest in {} ...", guest.display());
    crate::dev::build_guest(&guest).await?;
    let mut ids: Vec<String> = vec![];
    for (name, kind, file) in [
        ("demo-kernel", "kernel", "vmlinux"),
        ("demo-initrd", "ramdisk", "initrd.img"),
        ("demo", "disk", "disk.qcow2"),
    ] {
        let disk = kind == "disk";
        let req = ImportImage {
            name: name.into(),
            kind: Some(kind.into()),
            path: guest.join(file).display().to_string(),
            format: None,
            kernel_id: if disk { ids.first().cloned() } else { None },
            ramdisk_id: if disk { ids.get(1).cloned() } else { None },
            cmdline: disk.then(|| "console=ttyS0 quiet".to_string()),
            public: true,
        };
        let started = c.import_image(&req).await?;
        kumo_cli::follow_operation(c, &started.operation.id)
            .await
            .with_context(|| format!("importing {name}"))?;
        ids.push(started.image.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_capacity, parse_host_label};

    #[test]
    fn host_labels_and_capacity_parse() {
        assert_eq!(
            parse_host_label("host3:role=spare"),
            Ok(("host3".into(), "role".into(), "spare".into()))
        );
        for bad in ["role=spare", "host3:role", ":a=b", "h:=b"] {
            assert!(parse_host_label(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_capacity("2:2048"), Ok((2, 2048)));
        assert!(parse_capacity("0:1").is_err());
    }
}
