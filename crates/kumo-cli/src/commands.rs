//! `kumo vm|image|host ...`: thin wrappers over [`Client`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use indicatif::{ProgressBar, ProgressStyle};
use kumo_types::api::{
    CreateInstance, CreateInstanceBatch, ImportImage, Instance, UpdateHost, UploadParams,
};
use kumo_types::InstanceState;
use serde::Serialize;

use crate::{streams, Client, ClientError};

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

// Parsed once per process: the size of the create variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Create an instance from an image.
    Create {
        #[arg(long)]
        name: String,
        /// Image name or id.
        #[arg(long, default_value = "demo", conflicts_with = "snapshot")]
        image: String,
        /// Boot a snapshot of an instance instead (next to the original; see `kumo snapshot`).
        #[arg(long)]
        snapshot: Option<String>,
        /// Instance type (see `kumo vm types`).
        #[arg(long = "type", default_value = "t1.small")]
        instance_type: String,
        /// Place it in this site (availability zone).
        #[arg(long)]
        site: Option<String>,
        /// A host label it needs (role=core) or avoids (role!=personal); repeatable.
        #[arg(long = "constraint")]
        constraints: Vec<String>,
        /// Join this spread placement group (see `kumo placement-group`).
        #[arg(long)]
        placement_group: Option<String>,
        /// Attach to this network (id or name; default: the project's `default` network).
        #[arg(long)]
        network: Option<String>,
        /// Join this security group (id or name); repeatable, at most 5 (default: `default`).
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// The key pair (see `kumo key`) whose public key the guest gets.
        #[arg(long)]
        key: Option<String>,
        /// User data for the guest (e.g. a #cloud-config file), served by the metadata service.
        #[arg(long, value_name = "FILE")]
        user_data_file: Option<std::path::PathBuf>,
        /// Keep an imported machine's NIC MAC address (P2V); must be unique among live instances.
        #[arg(long)]
        mac: Option<String>,
        /// Keep an imported machine's SMBIOS UUID (P2V); must be unique among live instances.
        #[arg(long)]
        uuid: Option<String>,
        /// Create this many (named NAME-0, NAME-1 ...), placed in one step: all or none.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Restart it on another host when its host fails (its disks must be on a shared pool).
        #[arg(long)]
        ha: bool,
        /// Failover order, 0 to 1000 (default 500): higher restarts first.
        #[arg(long)]
        ha_priority: Option<u32>,
        /// Wait until it is running.
        #[arg(long)]
        wait: bool,
        /// Retry-safe: the same key returns the same instance.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List instances.
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        /// Include terminated instances.
        #[arg(long)]
        all: bool,
    },
    /// Show one instance.
    Show {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Start(Action),
    /// Stop (ACPI shutdown, then forced after a timeout).
    Stop(Action),
    Reboot(Action),
    /// Terminate: removes the instance and everything it had on its host.
    #[command(alias = "terminate", alias = "rm")]
    Delete(Action),
    /// Hot clone: a copy of a running instance, which keeps running.
    ///
    /// A live snapshot of its root disk boots as a new instance with its own identity (id, MAC,
    /// addresses); its I/O pauses for milliseconds.
    Clone(crate::storage::CloneArgs),
    /// Live-migrate a running instance to another host (memory only on a shared pool, with its
    /// disks otherwise); it keeps running and keeps its addresses.
    Migrate(crate::migrate::MigrateArgs),
    /// Change an instance's HA settings: `kumo vm set web1 --ha on --ha-priority 800`.
    Set(crate::ha::SetArgs),
    /// Change the instance type (only while stopped).
    Resize {
        id: String,
        #[arg(long = "type")]
        instance_type: String,
    },
    /// Attach to the interactive serial console (Ctrl-] to leave).
    Console {
        id: String,
    },
    /// Print the serial console log.
    Log {
        id: String,
        /// Bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// Make a guest port reachable on 127.0.0.1: `kumo vm port-forward web1 8080:80`.
    PortForward {
        id: String,
        /// LOCAL:REMOTE
        ports: String,
    },
    /// Why each host would take or refuse an instance of this type.
    ExplainPlacement {
        #[arg(long = "type", default_value = "t1.small")]
        instance_type: String,
        #[arg(long)]
        site: Option<String>,
        /// A host label it needs (role=core) or avoids (role!=personal); repeatable.
        #[arg(long = "constraint")]
        constraints: Vec<String>,
        /// As a member of this spread placement group.
        #[arg(long)]
        placement_group: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List instance types.
    Types {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct Action {
    /// Instance id or name.
    pub id: String,
    /// Wait until the action has finished.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Download an image's file (disks are stored as qcow2).
    Export {
        /// Image id or name.
        id: String,
        /// The file to write (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Show {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Import a disk image (qcow2, raw, vmdk, vdi), a kernel or a ramdisk.
    Import {
        /// File to upload (or, with --server-side, a path the controller can read).
        path: PathBuf,
        #[arg(long)]
        name: String,
        /// disk, kernel or ramdisk.
        #[arg(long, default_value = "disk")]
        kind: String,
        /// Input format; detected when absent.
        #[arg(long)]
        format: Option<String>,
        /// Kernel image (id or name) for direct kernel boot.
        #[arg(long)]
        kernel: Option<String>,
        /// Ramdisk image (id or name) for direct kernel boot.
        #[arg(long)]
        ramdisk: Option<String>,
        /// Kernel command line for direct kernel boot.
        #[arg(long)]
        cmdline: Option<String>,
        /// Visible to every project (admins only).
        #[arg(long)]
        public: bool,
        /// The controller reads the file itself instead of receiving an upload.
        #[arg(long)]
        server_side: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    #[command(alias = "rm")]
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token for `kumo agent --join-token`.
    Create,
    #[command(alias = "ls")]
    List,
    /// Refuse new joins with this token (joined hosts stay).
    Revoke { token: String },
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Set a host up, maintenance (no new instances) or draining.
    SetState { id: String, state: String },
    /// Put a host in maintenance and live-migrate its running instances away; those that cannot
    /// move are listed with the reason and keep running.
    Evacuate(crate::migrate::EvacuateArgs),
    /// Bring a host out of maintenance (with --move-home, its evacuated instances come back).
    Return(crate::migrate::ReturnArgs),
    /// Set a host's own overcommit ratios and reserved memory (others keep their value).
    Set {
        id: String,
        /// Virtual CPUs per physical CPU (default: the cluster's, 4).
        #[arg(long)]
        cpu_overcommit: Option<f64>,
        /// Guest memory per MiB of host memory (default: the cluster's, 1).
        #[arg(long)]
        memory_overcommit: Option<f64>,
        /// Host memory kept for the host itself, MiB (default: the cluster's, 512).
        #[arg(long)]
        reserved_memory: Option<u64>,
    },
    /// Used, reserved and free capacity per host and site, and whether the cluster survives
    /// losing its largest host (N+1).
    Capacity {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Join tokens for new hosts.
    #[command(subcommand)]
    Token(TokenCmd),
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Show {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

fn or_cluster<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string())
        .unwrap_or_else(|| "(cluster default)".into())
}

async fn create_batch(
    client: &Client,
    template: CreateInstance,
    count: u32,
    wait: bool,
    idempotency_key: Option<String>,
    output: Output,
) -> Result<(), ClientError> {
    let req = CreateInstanceBatch {
        template,
        count,
        min_count: None,
    };
    let mut list = client
        .create_instance_batch(&req, idempotency_key.as_deref())
        .await?;
    if wait {
        let long = Duration::from_secs(300);
        for i in list.iter_mut() {
            *i = wait_for(client, &i.id, InstanceState::Running, long).await?;
        }
    }
    if output == Output::Json {
        return print_json(&list);
    }
    for i in list {
        println!(
            "{} {} ({}, {})",
            i.id,
            i.name,
            i.state,
            i.private_ip.unwrap_or_default()
        );
    }
    Ok(())
}

pub(crate) fn print_json<T: Serialize>(v: &T) -> Result<(), ClientError> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| ClientError::Failed(e.to_string()))?
    );
    Ok(())
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn gib(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
        .unwrap_or_else(|| "-".into())
}

fn show_instance(i: &Instance, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(i);
    }
    let mut t = table(&["field", "value"]);
    for (k, v) in [
        ("id", i.id.clone()),
        ("name", i.name.clone()),
        ("state", i.state.to_string()),
        (
            "type",
            format!(
                "{} ({} vCPU, {} MiB, {} GiB disk)",
                i.instance_type, i.vcpus, i.memory_mib, i.disk_gib
            ),
        ),
        ("image", i.image_id.clone()),
        ("host", i.host_id.clone().unwrap_or_default()),
        ("private ip", i.private_ip.clone().unwrap_or_default()),
        ("public ip", i.public_ip.clone().unwrap_or_default()),
        ("ipv6", i.ipv6.clone().unwrap_or_default()),
        ("mac", i.mac.clone().unwrap_or_default()),
        ("security groups", i.security_groups.join(", ")),
        ("key", i.key_name.clone().unwrap_or_default()),
        ("ha", crate::ha::describe(i)),
        ("created", i.created_at.to_rfc3339()),
        ("last error", i.last_error.clone().unwrap_or_default()),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

/// Wait for an instance to reach `want`, with a spinner; fails on a timeout.
pub async fn wait_for(
    client: &Client,
    id: &str,
    want: InstanceState,
    timeout: Duration,
) -> Result<Instance, ClientError> {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    let start = Instant::now();
    loop {
        let i = client.instance(id).await?;
        pb.set_message(format!("{} is {}", i.id, i.state));
        if i.state == want {
            pb.finish_and_clear();
            return Ok(i);
        }
        if want != InstanceState::Terminated && i.state == InstanceState::Terminated {
            pb.finish_and_clear();
            return Err(ClientError::Failed(format!("{} was terminated", i.id)));
        }
        if start.elapsed() > timeout {
            pb.finish_and_clear();
            let hint = i
                .last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            return Err(ClientError::Timeout(format!(
                "{} is still {} after {:?}{hint}",
                i.id, i.state, timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

impl VmCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        let long = Duration::from_secs(300);
        match self {
            VmCmd::Create {
                name,
                image,
                snapshot,
                instance_type,
                site,
                constraints,
                placement_group,
                network,
                security_groups,
                key,
                user_data_file,
                mac,
                uuid,
                count,
                ha,
                ha_priority,
                wait,
                idempotency_key,
                output,
            } => {
                let user_data =
                    match user_data_file {
                        Some(p) => Some(std::fs::read_to_string(&p).map_err(|e| {
                            ClientError::Http(format!("reading {}: {e}", p.display()))
                        })?),
                        None => None,
                    };
                let req = CreateInstance {
                    name,
                    image: if snapshot.is_some() {
                        String::new()
                    } else {
                        image
                    },
                    snapshot,
                    instance_type: Some(instance_type),
                    site,
                    constraints,
                    placement_group,
                    network,
                    security_groups,
                    key_name: key,
                    user_data,
                    mac,
                    uuid,
                    ha,
                    ha_priority,
                };
                if count != 1 {
                    return create_batch(client, req, count, wait, idempotency_key, output).await;
                }
                let mut i = client
                    .create_instance(&req, idempotency_key.as_deref())
                    .await?;
                if wait {
                    i = wait_for(client, &i.id, InstanceState::Running, long).await?;
                }
                if output == Output::Json {
                    return print_json(&i);
                }
                println!(
                    "{} {} ({}, {})",
                    i.id,
                    i.name,
                    i.state,
                    i.private_ip.unwrap_or_default()
                );
            }
            VmCmd::List { output, all } => {
                let mut list = client.instances().await?;
                if !all {
                    list.retain(|i| i.state != InstanceState::Terminated);
                }
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&["id", "name", "state", "type", "ip", "host"]);
                for i in list {
                    t.add_row(vec![
                        i.id,
                        i.name,
                        i.state.to_string(),
                        i.instance_type,
                        i.private_ip.unwrap_or_default(),
                        i.host_id.unwrap_or_default(),
                    ]);
                }
                println!("{t}");
            }
            VmCmd::Show { id, output } => show_instance(&client.instance(&id).await?, output)?,
            VmCmd::Start(a) => {
                let i = client.instance_action(&a.id, "start").await?;
                let i = if a.wait {
                    wait_for(client, &i.id, InstanceState::Running, long).await?
                } else {
                    i
                };
                println!("{} is {}", i.id, i.state);
            }
            VmCmd::Stop(a) => {
                let i = client.instance_action(&a.id, "stop").await?;
                let i = if a.wait {
                    wait_for(client, &i.id, InstanceState::Stopped, long).await?
                } else {
                    i
                };
                println!("{} is {}", i.id, i.state);
            }
            VmCmd::Reboot(a) => {
                let i = client.instance_action(&a.id, "reboot").await?;
                println!("{} is rebooting", i.id);
            }
            VmCmd::Delete(a) => {
                let i = client.terminate(&a.id).await?;
                let i = if a.wait {
                    wait_for(client, &i.id, InstanceState::Terminated, long).await?
                } else {
                    i
                };
                println!("{} is {}", i.id, i.state);
            }
            VmCmd::Clone(a) => a.run(client).await?,
            VmCmd::Migrate(a) => a.run(client).await?,
            VmCmd::Set(a) => a.run(client).await?,
            VmCmd::Resize { id, instance_type } => {
                let i = client.resize(&id, &instance_type).await?;
                println!(
                    "{} is now {} ({} vCPU, {} MiB)",
                    i.id, i.instance_type, i.vcpus, i.memory_mib
                );
            }
            VmCmd::Console { id } => streams::console(client, &id).await?,
            VmCmd::Log { id, bytes } => print!("{}", client.console(&id, bytes).await?.output),
            VmCmd::PortForward { id, ports } => {
                let (l, r) = ports.split_once(':').ok_or_else(|| {
                    ClientError::Config("ports must be LOCAL:REMOTE, e.g. 8080:80".into())
                })?;
                let l: u16 = l
                    .parse()
                    .map_err(|_| ClientError::Config(format!("bad local port {l:?}")))?;
                let r: u16 = r
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| ClientError::Config(format!("bad remote port {r:?}")))?;
                streams::port_forward(client, &id, l, r).await?
            }
            VmCmd::ExplainPlacement {
                instance_type,
                site,
                constraints,
                placement_group,
                output,
            } => {
                let v = client
                    .explain_placement(
                        &instance_type,
                        site.as_deref(),
                        &constraints,
                        placement_group.as_deref(),
                    )
                    .await?;
                if output == Output::Json {
                    return print_json(&v);
                }
                let mut t = table(&["host", "verdict", "score"]);
                for h in v {
                    let verdict = h.refused.clone().unwrap_or_else(|| "can take it".into());
                    t.add_row(vec![
                        h.host_name,
                        verdict,
                        h.score.map(|s| format!("{s:.3}")).unwrap_or_default(),
                    ]);
                }
                println!("{t}");
            }
            VmCmd::Types { output } => {
                let types = client.instance_types().await?;
                if output == Output::Json {
                    return print_json(&types);
                }
                let mut t = table(&["type", "vCPUs", "memory", "disk"]);
                for ty in types {
                    t.add_row(vec![
                        ty.name,
                        ty.vcpus.to_string(),
                        format!("{} MiB", ty.memory_mib),
                        format!("{} GiB", ty.disk_gib),
                    ]);
                }
                println!("{t}");
            }
        }
        Ok(())
    }
}

impl ImageCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            ImageCmd::Export { id, out } => {
                if out.exists() {
                    return Err(ClientError::Config(format!(
                        "{} exists; choose another --out",
                        out.display()
                    )));
                }
                let n = client
                    .download(&format!("/api/v1/images/{id}/file"), &out)
                    .await?;
                println!("{id} written to {} ({n} bytes)", out.display());
            }
            ImageCmd::List { output } => {
                let list = client.images().await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&["id", "name", "kind", "state", "format", "size", "public"]);
                for i in list {
                    t.add_row(vec![
                        i.id,
                        i.name,
                        i.kind,
                        i.state,
                        i.source_format.unwrap_or_default(),
                        gib(i.virtual_size),
                        i.public.to_string(),
                    ]);
                }
                println!("{t}");
            }
            ImageCmd::Show { id, output } => {
                let i = client.image(&id).await?;
                if output == Output::Json {
                    return print_json(&i);
                }
                let mut t = table(&["field", "value"]);
                for (k, v) in [
                    ("id", i.id),
                    ("name", i.name),
                    ("kind", i.kind),
                    ("state", i.state),
                    ("format", i.source_format.unwrap_or_default()),
                    ("virtual size", gib(i.virtual_size)),
                    ("file size", gib(i.file_size)),
                    ("sha256", i.sha256.unwrap_or_default()),
                    ("kernel", i.kernel_id.unwrap_or_default()),
                    ("ramdisk", i.ramdisk_id.unwrap_or_default()),
                    ("cmdline", i.cmdline.unwrap_or_default()),
                ] {
                    t.add_row(vec![k.to_string(), v]);
                }
                println!("{t}");
            }
            ImageCmd::Import {
                path,
                name,
                kind,
                format,
                kernel,
                ramdisk,
                cmdline,
                public,
                server_side,
                output,
            } => {
                let kernel_id = match kernel {
                    Some(k) => Some(client.image(&k).await?.id),
                    None => None,
                };
                let ramdisk_id = match ramdisk {
                    Some(k) => Some(client.image(&k).await?.id),
                    None => None,
                };
                let result = if server_side {
                    let abs = std::fs::canonicalize(&path).unwrap_or(path.clone());
                    let req = ImportImage {
                        name,
                        kind: Some(kind),
                        path: abs.display().to_string(),
                        format,
                        kernel_id,
                        ramdisk_id,
                        cmdline,
                        public,
                    };
                    let started = client.import_image(&req).await?;
                    follow_operation(client, &started.operation.id).await?;
                    client.image(&started.image.id).await?
                } else {
                    let len = std::fs::metadata(&path)
                        .map_err(|e| {
                            ClientError::Config(format!("cannot read {}: {e}", path.display()))
                        })?
                        .len();
                    let pb = ProgressBar::new(len);
                    pb.set_style(
                        ProgressStyle::with_template(
                            "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    let pb2 = pb.clone();
                    let params = UploadParams {
                        name,
                        kind: Some(kind),
                        format,
                        kernel_id,
                        ramdisk_id,
                        cmdline,
                        public,
                    };
                    let r = client
                        .upload_image(&params, &path, move |n| pb2.set_position(n))
                        .await;
                    pb.finish_and_clear();
                    r?.image
                };
                if output == Output::Json {
                    return print_json(&result);
                }
                println!(
                    "{} {} ({}, {}, sha256 {})",
                    result.id,
                    result.name,
                    result.kind,
                    result.state,
                    result.sha256.unwrap_or_default()
                );
            }
            ImageCmd::Delete { id } => {
                let i = client.delete_image(&id).await?;
                println!("deleted {} ({})", i.id, i.name);
            }
        }
        Ok(())
    }
}

/// Follow an operation with a progress bar until it ends.
pub async fn follow_operation(client: &Client, id: &str) -> Result<(), ClientError> {
    let pb = ProgressBar::new(1000);
    pb.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {percent}% [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let op = client.operation(id).await?;
        pb.set_message(op.kind.clone());
        pb.set_position((op.progress * 1000.0) as u64);
        match op.state.as_str() {
            "succeeded" => {
                pb.finish_and_clear();
                return Ok(());
            }
            "failed" => {
                pb.finish_and_clear();
                return Err(ClientError::Failed(format!(
                    "{} failed: {}",
                    op.kind,
                    op.error.unwrap_or_default()
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

impl HostCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            HostCmd::Evacuate(a) => a.run(client).await?,
            HostCmd::Return(a) => a.run(client).await?,
            HostCmd::SetState { id, state } => {
                let h = client.set_host_state(&id, &state).await?;
                println!("{} is {}", h.name, h.state);
            }
            HostCmd::Set {
                id,
                cpu_overcommit,
                memory_overcommit,
                reserved_memory,
            } => {
                let h = client
                    .update_host(
                        &id,
                        &UpdateHost {
                            cpu_overcommit,
                            memory_overcommit,
                            reserved_memory_mib: reserved_memory,
                        },
                    )
                    .await?;
                println!(
                    "{}: cpu overcommit {}, memory overcommit {}, reserved memory {}",
                    h.name,
                    or_cluster(h.cpu_overcommit),
                    or_cluster(h.memory_overcommit),
                    or_cluster(h.reserved_memory_mib.map(|m| format!("{m} MiB")))
                );
            }
            HostCmd::Capacity { output } => {
                let c = client.capacity().await?;
                if output == Output::Json {
                    return print_json(&c);
                }
                for (title, rows) in [("hosts", &c.hosts), ("sites", &c.sites)] {
                    let mut t = table(&[
                        title,
                        "site",
                        "state",
                        "vCPUs used/free/total",
                        "memory MiB used/free/total",
                        "reserved MiB",
                        "disk GiB used/free/total",
                    ]);
                    for r in rows.iter() {
                        t.add_row(vec![
                            r.name.clone(),
                            r.site.clone(),
                            r.state.clone(),
                            format!("{}/{}/{}", r.used_vcpus, r.free_vcpus, r.vcpus),
                            format!(
                                "{}/{}/{}",
                                r.used_memory_mib, r.free_memory_mib, r.memory_mib
                            ),
                            r.reserved_memory_mib.to_string(),
                            if r.disk_gib == 0 {
                                format!("{}/-/-", r.used_disk_gib)
                            } else {
                                format!("{}/{}/{}", r.used_disk_gib, r.free_disk_gib, r.disk_gib)
                            },
                        ]);
                    }
                    println!("{t}");
                }
                match (&c.largest_host, c.n_plus_one) {
                    (None, _) => println!("N+1: no hosts"),
                    (Some(h), true) => {
                        println!("N+1: ok — losing {h} leaves room for all its instances")
                    }
                    (Some(h), false) => println!(
                        "N+1: NOT ok — losing {h} strands {} instance(s): {:?} (vCPUs, MiB)",
                        c.stranded.len(),
                        c.stranded
                    ),
                }
            }
            HostCmd::Token(t) => match t {
                TokenCmd::Create => println!("{}", client.create_join_token().await?.token),
                TokenCmd::List => {
                    for t in client.join_tokens().await? {
                        let state = t
                            .revoked_at
                            .map(|r| format!("revoked {}", r.to_rfc3339()))
                            .unwrap_or_else(|| "valid".into());
                        println!("{} created {} {state}", t.token, t.created_at.to_rfc3339());
                    }
                }
                TokenCmd::Revoke { token } => {
                    client.revoke_join_token(&token).await?;
                    println!("revoked");
                }
            },
            HostCmd::List { output } => {
                let hosts = client.hosts().await?;
                if output == Output::Json {
                    return print_json(&hosts);
                }
                let mut t = table(&[
                    "id",
                    "name",
                    "site",
                    "state",
                    "accel",
                    "vCPUs used",
                    "memory used",
                    "instances",
                ]);
                for h in hosts {
                    t.add_row(vec![
                        h.id,
                        h.name,
                        h.site,
                        h.state,
                        h.accel,
                        format!("{}/{}", h.used_vcpus, h.vcpus),
                        format!("{}/{} MiB", h.used_memory_mib, h.memory_mib),
                        h.instances.to_string(),
                    ]);
                }
                println!("{t}");
            }
            HostCmd::Show { id, output } => {
                let h = client.host(&id).await?;
                if output == Output::Json {
                    return print_json(&h);
                }
                let mut t = table(&["field", "value"]);
                for (k, v) in [
                    ("id", h.id),
                    ("name", h.name),
                    ("site", h.site),
                    ("state", h.state),
                    ("address", h.address),
                    ("hypervisor", format!("{} ({})", h.hypervisor, h.accel)),
                    ("qemu", h.qemu_version),
                    ("vCPUs", format!("{} used of {}", h.used_vcpus, h.vcpus)),
                    (
                        "memory",
                        format!("{} MiB used of {} MiB", h.used_memory_mib, h.memory_mib),
                    ),
                    ("instances", h.instances.to_string()),
                    (
                        "disk",
                        format!("{} GiB used of {} GiB", h.used_disk_gib, h.disk_gib),
                    ),
                    (
                        "storage pool",
                        if h.storage_pool.is_empty() {
                            "(local)".into()
                        } else {
                            h.storage_pool
                        },
                    ),
                    (
                        "labels",
                        h.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    ("cpu overcommit", or_cluster(h.cpu_overcommit)),
                    ("memory overcommit", or_cluster(h.memory_overcommit)),
                    (
                        "reserved memory",
                        or_cluster(h.reserved_memory_mib.map(|m| format!("{m} MiB"))),
                    ),
                    (
                        "last heartbeat",
                        h.last_heartbeat.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    ),
                    (
                        "network path",
                        match &h.path {
                            None => "(not probed)".into(),
                            Some(p) if p.failing.is_empty() => p.state.clone(),
                            Some(p) => format!("{} (failing: {})", p.state, p.failing.join(", ")),
                        },
                    ),
                ] {
                    t.add_row(vec![k.to_string(), v]);
                }
                println!("{t}");
            }
        }
        Ok(())
    }
}
