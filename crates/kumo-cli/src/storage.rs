//! `kumo pool ...`, `kumo volume ...`, `kumo snapshot ...` and `kumo vm clone`: storage pools,
//! block volumes, snapshots and hot clones, and the client calls behind them.

mod backups;
mod export;
mod size;
mod volumes;

use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use kumo_types::api::{Operation, Page};
use kumo_types::storage::{
    AttachVolume, CloneInstance, CloneResult, CopyVolume, CreateSnapshot, CreateVolume,
    ResizeVolume, Snapshot, StoragePool, UpdateStoragePool, Volume,
};
use kumo_types::InstanceState;
use serde::{Deserialize, Serialize};

use crate::commands::{print_json, table, wait_for, Output};
use crate::{Client, ClientError};

pub use backups::{BackupCmd, ScheduleCmd};
pub use size::{human_size, parse_size, SizeError};
pub use volumes::VolumeCmd;

/// What `POST /volumes/{id}/copy` answers: the new volume (`creating`) and the copy's operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeWithOperation {
    pub volume: Volume,
    pub operation: Operation,
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Client {
    pub async fn storage_pools(&self) -> Result<Vec<StoragePool>, ClientError> {
        Ok(self
            .get::<Page<StoragePool>>("/api/v1/storage-pools")
            .await?
            .items)
    }

    pub async fn storage_pool(&self, name: &str) -> Result<StoragePool, ClientError> {
        self.get(&format!("/api/v1/storage-pools/{}", enc(name)))
            .await
    }

    /// Change a pool's overcommit (administrators).
    pub async fn update_storage_pool(
        &self,
        name: &str,
        req: &UpdateStoragePool,
    ) -> Result<StoragePool, ClientError> {
        let v = serde_json::to_value(req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.request(
            "PATCH",
            &format!("/api/v1/storage-pools/{}", enc(name)),
            Some(&v),
            None,
        )
        .await
    }

    pub async fn volumes(&self) -> Result<Vec<Volume>, ClientError> {
        Ok(self.get::<Page<Volume>>("/api/v1/volumes").await?.items)
    }

    /// A volume by id or name.
    pub async fn volume(&self, id: &str) -> Result<Volume, ClientError> {
        self.get(&format!("/api/v1/volumes/{}", enc(id))).await
    }

    pub async fn create_volume(&self, req: &CreateVolume) -> Result<Volume, ClientError> {
        self.post("/api/v1/volumes", req).await
    }

    pub async fn delete_volume(&self, id: &str) -> Result<(), ClientError> {
        delete_204(self, &format!("/api/v1/volumes/{}", enc(id))).await
    }

    /// Ask for a volume to be plugged into an instance; it is `attaching` until the host reports it.
    pub async fn attach_volume(&self, id: &str, instance: &str) -> Result<Volume, ClientError> {
        let req = AttachVolume {
            instance: instance.into(),
        };
        self.post(&format!("/api/v1/volumes/{}/attach", enc(id)), &req)
            .await
    }

    pub async fn detach_volume(&self, id: &str) -> Result<Volume, ClientError> {
        self.request(
            "POST",
            &format!("/api/v1/volumes/{}/detach", enc(id)),
            Some(&serde_json::json!({})),
            None,
        )
        .await
    }

    /// Grow a volume (never shrinks: see [`Client::copy_volume`]).
    pub async fn resize_volume(&self, id: &str, size_bytes: u64) -> Result<Volume, ClientError> {
        self.post(
            &format!("/api/v1/volumes/{}/resize", enc(id)),
            &ResizeVolume { size_bytes },
        )
        .await
    }

    /// Start copying a volume into a new one of another size (how a volume is shrunk).
    pub async fn copy_volume(
        &self,
        id: &str,
        req: &CopyVolume,
    ) -> Result<VolumeWithOperation, ClientError> {
        self.post(&format!("/api/v1/volumes/{}/copy", enc(id)), req)
            .await
    }

    pub async fn snapshots(&self) -> Result<Vec<Snapshot>, ClientError> {
        Ok(self.get::<Page<Snapshot>>("/api/v1/snapshots").await?.items)
    }

    pub async fn snapshot(&self, id: &str) -> Result<Snapshot, ClientError> {
        self.get(&format!("/api/v1/snapshots/{}", enc(id))).await
    }

    pub async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<Snapshot, ClientError> {
        self.post("/api/v1/snapshots", req).await
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), ClientError> {
        delete_204(self, &format!("/api/v1/snapshots/{}", enc(id))).await
    }

    /// Hot clone: a live snapshot of the instance's root disk booted as a new instance.
    pub async fn clone_instance(
        &self,
        id: &str,
        req: &CloneInstance,
    ) -> Result<CloneResult, ClientError> {
        self.post(&format!("/api/v1/instances/{}/clone", enc(id)), req)
            .await
    }
}

/// A DELETE answered by 204 No Content.
async fn delete_204(client: &Client, path: &str) -> Result<(), ClientError> {
    match client
        .request::<serde_json::Value>("DELETE", path, None, None)
        .await
    {
        Ok(_) => Ok(()),
        // 204 has no body to decode.
        Err(ClientError::Http(m)) if m.contains("EOF while parsing") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why `--overcommit` was refused before any request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatioError {
    #[error("{0:?} is not a ratio: give a number such as 1.5")]
    Invalid(String),
    #[error("{0:?}: the overcommit must be a positive, finite number")]
    OutOfRange(String),
}

/// `--overcommit`: a finite positive number (`nan` would be sent as null and change nothing).
fn parse_ratio(s: &str) -> Result<f64, RatioError> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| RatioError::Invalid(s.into()))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(RatioError::OutOfRange(s.into()));
    }
    Ok(v)
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Every storage pool: capacity, provisioned (virtual) size and how much may be provisioned.
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// One pool, with a row per host that has it.
    Show {
        /// Pool name.
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Change a pool's settings (administrators).
    Set {
        /// Pool name.
        name: String,
        /// Thin provisioning: virtual bytes the pool may hand out per byte of real capacity,
        /// from 1.0 (no overcommit) to 20.0.
        #[arg(long, value_parser = parse_ratio, allow_hyphen_values = true)]
        overcommit: f64,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot an instance's root disk or a volume.
    ///
    /// Live if it is in use: the guest's disk I/O pauses for milliseconds and the instance keeps
    /// running. Boot a snapshot with `kumo vm create --snapshot`, or make a volume of it with
    /// `kumo volume create --snapshot`.
    #[command(group(ArgGroup::new("source").required(true).args(["instance", "volume"])))]
    Create {
        /// The instance (id or name) whose root disk to snapshot.
        #[arg(long)]
        instance: Option<String>,
        /// The volume (id or name) to snapshot.
        #[arg(long)]
        volume: Option<String>,
        /// Free text to recognise it by.
        #[arg(long)]
        description: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the project's snapshots (administrators: every project's).
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Make an image from a snapshot (an instance snapshot boots like its instance).
    Image {
        /// Snapshot id.
        id: String,
        /// The new image's name.
        #[arg(long)]
        name: String,
    },
    /// Write a snapshot to a local file (qcow2, raw, vmdk or vdi), with a progress bar.
    Export {
        /// Snapshot id.
        id: String,
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// The file to write (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Show one snapshot.
    Show {
        /// Snapshot id.
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a snapshot no instance or volume is made from.
    #[command(alias = "rm")]
    Delete {
        /// Snapshot id.
        id: String,
    },
}

/// `kumo vm clone`: the arguments of [`crate::VmCmd::Clone`].
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The instance to clone (id or name); it keeps running.
    pub source: String,
    /// Name of the clone.
    #[arg(long)]
    pub name: String,
    /// Attach the clone to this network (id or name; default: the source's network).
    #[arg(long)]
    pub network: Option<String>,
    /// Put the clone in this security group (id or name); repeatable (default: the source's).
    #[arg(long = "security-group")]
    pub security_groups: Vec<String>,
    /// The key pair whose public key the clone's guest gets (default: the source's).
    #[arg(long)]
    pub key: Option<String>,
    /// Wait until the clone is running.
    #[arg(long)]
    pub wait: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// `2.5x`, `1.0x`: an overcommit ratio.
fn ratio(r: f64) -> String {
    if r.fract() == 0.0 {
        format!("{r:.1}x")
    } else {
        format!("{r}x")
    }
}

fn dash(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// ` (I/O paused 2.1 ms)` for a live snapshot, else nothing.
fn io_pause(ms: Option<f64>) -> String {
    ms.map(|ms| format!(" (I/O paused {ms:.1} ms)"))
        .unwrap_or_default()
}

fn show_pool(p: &StoragePool, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(p);
    }
    let mut t = table(&["field", "value"]);
    for (k, v) in [
        ("name", p.name.clone()),
        ("kind", p.kind.clone()),
        ("shared", p.shared.to_string()),
        ("total", human_size(p.total_bytes)),
        ("free", human_size(p.free_bytes)),
        ("provisioned", human_size(p.provisioned_bytes)),
        ("limit", human_size(p.limit_bytes)),
        ("overcommit", ratio(p.overcommit)),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    let mut t = table(&["host", "id", "state", "total", "free", "provisioned"]);
    for h in &p.hosts {
        t.add_row(vec![
            h.host_name.clone(),
            h.host_id.clone(),
            h.state.clone(),
            human_size(h.total_bytes),
            human_size(h.free_bytes),
            human_size(h.provisioned_bytes),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn show_snapshot(s: &Snapshot, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(s);
    }
    let mut t = table(&["field", "value"]);
    for (k, v) in [
        ("id", s.id.clone()),
        ("state", s.state.clone()),
        ("source", format!("{} {}", s.source_kind, s.source_id)),
        ("size", size::bytes_and_human(s.size_bytes)),
        ("pool", s.pool.clone()),
        ("host", dash(s.host_id.as_ref())),
        (
            "I/O pause",
            dash(s.io_pause_ms.map(|ms| format!("{ms:.1} ms"))),
        ),
        ("image", dash(s.image_id.as_ref())),
        ("description", dash(s.description.as_ref())),
        ("project", s.project_id.clone()),
        ("created", s.created_at.to_rfc3339()),
        ("error", dash(s.error.as_ref())),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

impl PoolCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            PoolCmd::List { output } => {
                let list = client.storage_pools().await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&[
                    "name",
                    "kind",
                    "shared",
                    "hosts",
                    "total",
                    "free",
                    "provisioned",
                    "limit",
                    "overcommit",
                ]);
                for p in list {
                    t.add_row(vec![
                        p.name,
                        p.kind,
                        p.shared.to_string(),
                        p.hosts.len().to_string(),
                        human_size(p.total_bytes),
                        human_size(p.free_bytes),
                        human_size(p.provisioned_bytes),
                        human_size(p.limit_bytes),
                        ratio(p.overcommit),
                    ]);
                }
                println!("{t}");
            }
            PoolCmd::Show { name, output } => {
                show_pool(&client.storage_pool(&name).await?, output)?
            }
            PoolCmd::Set {
                name,
                overcommit,
                output,
            } => {
                let req = UpdateStoragePool {
                    overcommit: Some(overcommit),
                };
                let p = client.update_storage_pool(&name, &req).await?;
                if output == Output::Json {
                    return print_json(&p);
                }
                println!(
                    "{}: overcommit {}, may provision {} ({} provisioned)",
                    p.name,
                    ratio(p.overcommit),
                    human_size(p.limit_bytes),
                    human_size(p.provisioned_bytes)
                );
            }
        }
        Ok(())
    }
}

impl SnapshotCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            SnapshotCmd::Image { id, name } => {
                let r: crate::ImageWithOperation = client
                    .post(
                        &format!("/api/v1/snapshots/{id}/image"),
                        &serde_json::json!({ "name": name }),
                    )
                    .await?;
                crate::commands::follow_operation(client, &r.operation.id).await?;
                println!("{} {} made from {id}", r.image.id, r.image.name);
            }
            SnapshotCmd::Export { id, format, out } => {
                export::export_to(client, "snapshots", &id, &format, &out).await?
            }
            SnapshotCmd::Create {
                instance,
                volume,
                description,
                output,
            } => {
                let s = client
                    .create_snapshot(&CreateSnapshot {
                        instance,
                        volume,
                        description,
                    })
                    .await?;
                if output == Output::Json {
                    return print_json(&s);
                }
                println!(
                    "{} {} ({} of {} {}){}",
                    s.id,
                    s.state,
                    human_size(s.size_bytes),
                    s.source_kind,
                    s.source_id,
                    io_pause(s.io_pause_ms)
                );
            }
            SnapshotCmd::List { output } => {
                let list = client.snapshots().await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&[
                    "id",
                    "state",
                    "source",
                    "size",
                    "pool",
                    "I/O pause",
                    "description",
                    "created",
                ]);
                for s in list {
                    t.add_row(vec![
                        s.id,
                        s.state,
                        format!("{} {}", s.source_kind, s.source_id),
                        human_size(s.size_bytes),
                        s.pool,
                        dash(s.io_pause_ms.map(|ms| format!("{ms:.1} ms"))),
                        dash(s.description),
                        s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    ]);
                }
                println!("{t}");
            }
            SnapshotCmd::Show { id, output } => {
                show_snapshot(&client.snapshot(&id).await?, output)?
            }
            SnapshotCmd::Delete { id } => {
                client.delete_snapshot(&id).await?;
                println!("deleted {id}");
            }
        }
        Ok(())
    }
}

impl CloneArgs {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        let req = CloneInstance {
            name: self.name,
            network: self.network,
            security_groups: self.security_groups,
            key_name: self.key,
        };
        let mut r = client.clone_instance(&self.source, &req).await?;
        if self.wait {
            let timeout = Duration::from_secs(300);
            r.instance = wait_for(client, &r.instance.id, InstanceState::Running, timeout).await?;
        }
        if self.output == Output::Json {
            return print_json(&r);
        }
        let i = &r.instance;
        println!(
            "{} {} ({}, {}) from snapshot {}{}",
            i.id,
            i.name,
            i.state,
            i.private_ip.as_deref().unwrap_or("no IP yet"),
            r.snapshot.id,
            io_pause(r.snapshot.io_pause_ms)
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_must_be_finite_and_positive() {
        assert_eq!(parse_ratio("1.5"), Ok(1.5));
        assert_eq!(parse_ratio("20"), Ok(20.0));
        for bad in ["nan", "NaN", "inf", "-1", "0"] {
            assert_eq!(
                parse_ratio(bad),
                Err(RatioError::OutOfRange(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(parse_ratio("lots"), Err(RatioError::Invalid("lots".into())));
    }

    #[test]
    fn ratios_print_with_a_decimal() {
        assert_eq!(ratio(1.0), "1.0x");
        assert_eq!(ratio(2.5), "2.5x");
        assert_eq!(ratio(1.25), "1.25x");
    }

    #[test]
    fn live_snapshots_show_the_pause() {
        assert_eq!(io_pause(Some(2.06)), " (I/O paused 2.1 ms)");
        assert_eq!(io_pause(None), "");
    }
}
