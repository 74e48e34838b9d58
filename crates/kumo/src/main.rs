//! `kumo`: one binary for the controller (`server`), the host agent (`agent`), the all-in-one
//! cloud (`up`), developer tools (`dev`) and the client commands (`vm`, `image`, `host` ...).

mod cluster;
mod dev;
mod server;
mod simfleet;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kumo_cli::{
    AddressCmd, AddressPoolCmd, Client, ClientConfig, HostCmd, ImageCmd, NetworkCmd,
    PlacementGroupCmd, VmCmd,
};
use kumo_cli::{BackupCmd, KeyCmd, PoolCmd, SgCmd, SnapshotCmd, VolumeCmd};

#[derive(Parser)]
#[command(
    name = "kumo",
    version,
    about = "kumo (雲): a private IaaS cloud",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring up a whole cloud on this machine: controller, local agent, SQLite, default network, demo image.
    Up(up::UpArgs),
    /// Stop every VM `kumo up` started and remove its network namespace.
    Down(up::DownArgs),
    /// Run the controller (API, reconciler, store).
    Server(server::ServerArgs),
    /// Run a host agent.
    Agent(server::AgentArgs),
    /// Instances.
    #[command(subcommand, alias = "instance")]
    Vm(VmCmd),
    /// Images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Hypervisor hosts (administrators).
    #[command(subcommand)]
    Host(HostCmd),
    /// Live migrations (administrators): list, show, cancel.
    #[command(subcommand)]
    Migration(kumo_cli::MigrationCmd),
    /// Spread placement groups: keep a service's instances on different hosts.
    #[command(subcommand, name = "placement-group", alias = "pg")]
    PlacementGroup(PlacementGroupCmd),
    /// Security groups: which traffic may reach instances and leave them.
    #[command(subcommand, alias = "security-group")]
    Sg(SgCmd),
    /// SSH key pairs for instances.
    #[command(subcommand, alias = "key-pair")]
    Key(KeyCmd),
    /// Tenant networks of your project.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// The public address pool elastic IPs come from (administrators).
    #[command(subcommand, name = "address-pool")]
    AddressPool(AddressPoolCmd),
    /// Elastic IPs: public addresses mapped to instances.
    #[command(subcommand)]
    Address(AddressCmd),
    /// Storage pools: where root disks and volumes live, their capacity and overcommit.
    #[command(subcommand, alias = "storage-pool")]
    Pool(PoolCmd),
    /// Block volumes: extra disks for instances, attached and grown while they run.
    #[command(subcommand, alias = "vol")]
    Volume(VolumeCmd),
    /// Snapshots of instance root disks and volumes (live while they run).
    #[command(subcommand, alias = "snap")]
    Snapshot(SnapshotCmd),
    /// Backups of instance root disks and volumes: full then incremental, scheduled, restorable.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Recent events from the journal.
    Events {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Long-running operations.
    Op {
        /// Show this operation (and follow it until it ends).
        id: Option<String>,
    },
    /// Who the configured credentials belong to.
    Whoami,
    /// Developer tools.
    #[command(subcommand)]
    Dev(dev::DevCmd),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KUMO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn client() -> anyhow::Result<Client> {
    Ok(Client::new(ClientConfig::load()?)?)
}

pub fn default_data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("XDG_DATA_HOME") {
        return PathBuf::from(d).join("kumo");
    }
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .join(".local/share/kumo")
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = run(cli).await;
    if let Err(e) = result {
        eprintln!("error: {e}");
        let mut src = e.source();
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Up(a) => {
            init_tracing();
            up::run(a).await
        }
        Cmd::Down(a) => up::down(a).await,
        Cmd::Server(a) => {
            init_tracing();
            server::run_server(a).await
        }
        Cmd::Agent(a) => {
            init_tracing();
            server::run_agent(a).await
        }
        Cmd::Vm(c) => Ok(c.run(&client()?).await?),
        Cmd::Image(c) => Ok(c.run(&client()?).await?),
        Cmd::Host(c) => Ok(c.run(&client()?).await?),
        Cmd::Migration(c) => Ok(c.run(&client()?).await?),
        Cmd::PlacementGroup(c) => Ok(c.run(&client()?).await?),
        Cmd::Sg(c) => Ok(c.run(&client()?).await?),
        Cmd::Key(c) => Ok(c.run(&client()?).await?),
        Cmd::Network(c) => Ok(c.run(&client()?).await?),
        Cmd::AddressPool(c) => Ok(c.run(&client()?).await?),
        Cmd::Address(c) => Ok(c.run(&client()?).await?),
        Cmd::Pool(c) => Ok(c.run(&client()?).await?),
        Cmd::Volume(c) => Ok(c.run(&client()?).await?),
        Cmd::Snapshot(c) => Ok(c.run(&client()?).await?),
        Cmd::Backup(c) => Ok(c.run(&client()?).await?),
        Cmd::Events { limit } => {
            for e in client()?.events(limit).await? {
                println!(
                    "{} {:<8} {:<40} {:<30} {}",
                    e.time.format("%Y-%m-%d %H:%M:%S"),
                    e.result,
                    e.action,
                    e.target.unwrap_or_default(),
                    e.detail.unwrap_or_default()
                );
            }
            Ok(())
        }
        Cmd::Op { id } => {
            let c = client()?;
            match id {
                Some(id) => {
                    kumo_cli_follow(&c, &id).await?;
                    let op = c.operation(&id).await?;
                    println!(
                        "{} {} {} {:.0}% {}",
                        op.id,
                        op.kind,
                        op.state,
                        op.progress * 100.0,
                        op.error.unwrap_or_default()
                    );
                }
                None => {
                    for op in c.operations().await? {
                        println!(
                            "{} {:<14} {:<10} {:>4.0}% {} {}",
                            op.id,
                            op.kind,
                            op.state,
                            op.progress * 100.0,
                            op.target_id,
                            op.error.unwrap_or_default()
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Whoami => {
            let w = client()?.whoami().await?;
            println!(
                "{} ({}) in project {}, role {}",
                w.user_name, w.user_id, w.project_id, w.role
            );
            Ok(())
        }
        Cmd::Dev(c) => dev::run(c).await,
    }
}

async fn kumo_cli_follow(c: &Client, id: &str) -> anyhow::Result<()> {
    match kumo_cli::follow_operation(c, id).await {
        Ok(()) | Err(kumo_cli::ClientError::Failed(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
