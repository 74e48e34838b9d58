//! `kumo volume ...`: block volumes, and waiting for attach/detach to take effect.

use std::time::{Duration, Instant};

use clap::{ArgGroup, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kumo_types::storage::{CopyVolume, CreateVolume, Volume};

use super::dash;
use super::size::{bytes_and_human, human_size, parse_size};
use crate::commands::{follow_operation, print_json, table, Output};
use crate::{Client, ClientError};

/// How long attach/detach may take before the command gives up (the request stays in force).
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(300);

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Write a volume to a local file (qcow2, raw, vmdk or vdi), with a progress bar. Detach it
    /// (or stop its instance) first, or export a snapshot of it.
    Export {
        /// Volume id or name.
        id: String,
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// The file to write (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Create a volume: blank (--size) or from a snapshot (--snapshot).
    ///
    /// A volume made from a snapshot is copy-on-write: instant whatever its size.
    #[command(group(ArgGroup::new("content").required(true).multiple(true).args(["size", "snapshot"])))]
    Create {
        /// A name, usable instead of the id.
        #[arg(long)]
        name: Option<String>,
        /// Size: bytes or a binary unit, e.g. 512M, 10G, 1T (also MiB, GiB, TiB). With
        /// --snapshot: at least the snapshot's size (default: the snapshot's size).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: Option<u64>,
        /// Make the volume from this snapshot.
        #[arg(long)]
        snapshot: Option<String>,
        /// Put the volume where this instance (id or name) can attach it.
        #[arg(long)]
        instance: Option<String>,
        /// Storage pool (default: the instance's pool, else the pool with the most room).
        #[arg(long)]
        pool: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the project's volumes (administrators: every project's).
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one volume (id or name).
    Show {
        /// Volume id or name.
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Plug a volume into an instance and wait until it is attached.
    ///
    /// A running instance gets it hot-plugged; a stopped one from its next start. The guest sees
    /// it as /dev/disk/by-id/virtio-<serial>: the serial is the volume id, cut to 20 characters
    /// by Linux.
    Attach {
        /// Volume id or name.
        volume: String,
        /// Instance id or name.
        instance: String,
        /// Return at once (the volume is `attaching` until the host reports it).
        #[arg(long)]
        no_wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Unplug a volume from its instance and wait until it is available again.
    Detach {
        /// Volume id or name.
        volume: String,
        /// Return at once (the volume is `detaching` until the guest released it).
        #[arg(long)]
        no_wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Grow a volume (to shrink one, see `kumo volume copy`).
    ///
    /// Online if it is attached: the guest sees the new size. Volumes never shrink in place:
    /// copy into a smaller volume instead.
    Resize {
        /// Volume id or name.
        volume: String,
        /// The new, larger size: bytes or a binary unit, e.g. 20G.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Copy a volume into a new one of another size: how a volume is shrunk.
    ///
    /// The copy fails if data lies beyond the new size (shrink the guest's filesystem and
    /// partition first). The source must be detached or its instance stopped, and is left
    /// unchanged. A progress bar follows the copy.
    Copy {
        /// The volume to copy (id or name); it is left unchanged.
        volume: String,
        /// Size of the new volume: bytes or a binary unit, e.g. 5G.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        /// Name of the new volume.
        #[arg(long)]
        name: Option<String>,
        /// Return at once with the copy's operation (follow it with `kumo op ID`).
        #[arg(long)]
        no_wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a volume that is not attached (its snapshots stay).
    #[command(alias = "rm")]
    Delete {
        /// Volume id or name.
        volume: String,
    },
}

/// Where a volume stands while the CLI waits for an attach or a detach.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    Waiting(String),
    Done,
    Failed(String),
}

/// A volume error the request did not start with (`before`) means this request failed.
fn new_error(v: &Volume, before: Option<&str>) -> Option<String> {
    if v.state == "error" {
        return Some(
            v.error
                .clone()
                .unwrap_or_else(|| "the volume is in state error".into()),
        );
    }
    v.error.clone().filter(|e| Some(e.as_str()) != before)
}

fn attach_progress(v: &Volume, instance: &str, before: Option<&str>) -> Progress {
    if let Some(e) = new_error(v, before) {
        return Progress::Failed(format!("attaching {} to {instance} failed: {e}", v.id));
    }
    match (v.instance_id.as_deref(), v.attach_state.as_deref()) {
        (Some(i), Some("attached")) if i == instance => Progress::Done,
        (Some(i), state) if i == instance => Progress::Waiting(format!(
            "{} is {} to {instance}",
            v.id,
            state.unwrap_or(&v.state)
        )),
        // Released meanwhile, e.g. the instance was terminated.
        (other, _) => Progress::Failed(format!(
            "{} is no longer attaching to {instance}: it is {}{}",
            v.id,
            v.state,
            other
                .map(|i| format!(" (instance {i})"))
                .unwrap_or_default()
        )),
    }
}

fn detach_progress(v: &Volume, before: Option<&str>) -> Progress {
    if v.state == "available" {
        return Progress::Done;
    }
    if let Some(e) = new_error(v, before) {
        return Progress::Failed(format!("detaching {} failed: {e}", v.id));
    }
    Progress::Waiting(format!(
        "{} is {}",
        v.id,
        v.attach_state.as_deref().unwrap_or(&v.state)
    ))
}

/// Poll a volume until `check` says it is done or failed, with a spinner.
async fn wait_volume(
    client: &Client,
    id: &str,
    what: &str,
    check: impl Fn(&Volume) -> Progress,
) -> Result<Volume, ClientError> {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    let start = Instant::now();
    let result = loop {
        let v = match client.volume(id).await {
            Ok(v) => v,
            Err(e) => break Err(e),
        };
        match check(&v) {
            Progress::Done => break Ok(v),
            Progress::Failed(m) => break Err(ClientError::Failed(m)),
            Progress::Waiting(m) if start.elapsed() >= WAIT_TIMEOUT => {
                break Err(ClientError::Timeout(format!(
                    "{what}: {m} after {}s (the request stands; see `kumo volume show {}`)",
                    WAIT_TIMEOUT.as_secs(),
                    v.id
                )))
            }
            Progress::Waiting(m) => pb.set_message(m),
        }
        tokio::time::sleep(POLL).await;
    };
    pb.finish_and_clear();
    result
}

/// `/dev/disk/by-id/virtio-<serial>` as Linux shows it (virtio serials are cut at 20 bytes).
fn guest_path(serial: &str) -> String {
    let cut: String = serial.chars().take(20).collect();
    format!("/dev/disk/by-id/virtio-{cut}")
}

fn place(v: &Volume) -> String {
    match &v.host_id {
        Some(h) => format!("pool {} on host {h}", v.pool),
        None => format!("pool {}", v.pool),
    }
}

fn show_volume(v: &Volume, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(v);
    }
    let attached = match (&v.instance_id, &v.attach_state) {
        (Some(i), Some(s)) => format!("{i} ({s})"),
        (Some(i), None) => i.clone(),
        _ => "-".into(),
    };
    let mut t = table(&["field", "value"]);
    for (k, val) in [
        ("id", v.id.clone()),
        ("name", dash(v.name.as_ref())),
        ("state", v.state.clone()),
        ("size", bytes_and_human(v.size_bytes)),
        ("pool", v.pool.clone()),
        ("host", dash(v.host_id.as_ref())),
        ("instance", attached),
        ("serial", v.serial.clone()),
        ("guest device", guest_path(&v.serial)),
        ("snapshot", dash(v.snapshot_id.as_ref())),
        ("project", v.project_id.clone()),
        ("created", v.created_at.to_rfc3339()),
        ("error", dash(v.error.as_ref())),
    ] {
        t.add_row(vec![k.to_string(), val]);
    }
    println!("{t}");
    Ok(())
}

/// One line: `vol-… (name) 1073741824 bytes (1.0 GiB), available, pool p on host h`.
fn summary(v: &Volume) -> String {
    format!(
        "{}{} {}, {}, {}",
        v.id,
        v.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        bytes_and_human(v.size_bytes),
        v.state,
        place(v)
    )
}

impl VolumeCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            VolumeCmd::Export { id, format, out } => {
                super::export::export_to(client, "volumes", &id, &format, &out).await?
            }
            VolumeCmd::Create {
                name,
                size,
                snapshot,
                instance,
                pool,
                output,
            } => {
                let req = CreateVolume {
                    name,
                    size_bytes: size,
                    snapshot,
                    instance,
                    pool,
                };
                let v = client.create_volume(&req).await?;
                if output == Output::Json {
                    return print_json(&v);
                }
                println!("{}", summary(&v));
            }
            VolumeCmd::List { output } => {
                let list = client.volumes().await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&[
                    "id", "name", "size", "state", "instance", "pool", "host", "snapshot",
                ]);
                for v in list {
                    let instance = match (v.instance_id, v.attach_state) {
                        (Some(i), Some(s)) if s != "attached" => format!("{i} ({s})"),
                        (Some(i), _) => i,
                        (None, _) => "-".into(),
                    };
                    t.add_row(vec![
                        v.id,
                        dash(v.name),
                        human_size(v.size_bytes),
                        v.state,
                        instance,
                        v.pool,
                        dash(v.host_id),
                        dash(v.snapshot_id),
                    ]);
                }
                println!("{t}");
            }
            VolumeCmd::Show { id, output } => show_volume(&client.volume(&id).await?, output)?,
            VolumeCmd::Attach {
                volume,
                instance,
                no_wait,
                output,
            } => {
                let mut v = client.attach_volume(&volume, &instance).await?;
                // The answer names the instance by id even if it was given by name.
                let inst = v.instance_id.clone().unwrap_or(instance);
                if !no_wait {
                    let before = v.error.clone();
                    v = wait_volume(client, &v.id, "attach", |v| {
                        attach_progress(v, &inst, before.as_deref())
                    })
                    .await?;
                }
                if output == Output::Json {
                    return print_json(&v);
                }
                match v.attach_state.as_deref() {
                    Some("attached") => println!(
                        "{} attached to {inst} (serial {}, {} in the guest)",
                        v.id,
                        v.serial,
                        guest_path(&v.serial)
                    ),
                    state => println!("{} {} to {inst}", v.id, state.unwrap_or(&v.state)),
                }
            }
            VolumeCmd::Detach {
                volume,
                no_wait,
                output,
            } => {
                let mut v = client.detach_volume(&volume).await?;
                let from = v.instance_id.clone().unwrap_or_default();
                if !no_wait {
                    let before = v.error.clone();
                    v = wait_volume(client, &v.id, "detach", |v| {
                        detach_progress(v, before.as_deref())
                    })
                    .await?;
                }
                if output == Output::Json {
                    return print_json(&v);
                }
                match v.state.as_str() {
                    "available" => println!("{} detached from {from}, available", v.id),
                    _ => println!(
                        "{} {} from {from}",
                        v.id,
                        v.attach_state.as_deref().unwrap_or(&v.state)
                    ),
                }
            }
            VolumeCmd::Resize {
                volume,
                size,
                output,
            } => {
                let v = client.resize_volume(&volume, size).await?;
                if output == Output::Json {
                    return print_json(&v);
                }
                println!("{} is now {}", v.id, bytes_and_human(v.size_bytes));
            }
            VolumeCmd::Copy {
                volume,
                size,
                name,
                no_wait,
                output,
            } => {
                let req = CopyVolume {
                    size_bytes: size,
                    name,
                };
                let started = client.copy_volume(&volume, &req).await?;
                if no_wait {
                    if output == Output::Json {
                        return print_json(&started);
                    }
                    println!(
                        "{}\ncopying: follow with `kumo op {}`",
                        summary(&started.volume),
                        started.operation.id
                    );
                    return Ok(());
                }
                follow_operation(client, &started.operation.id).await?;
                let v = client.volume(&started.volume.id).await?;
                if output == Output::Json {
                    return print_json(&v);
                }
                println!("{} (copy of {volume})", summary(&v));
            }
            VolumeCmd::Delete { volume } => {
                client.delete_volume(&volume).await?;
                println!("deleted {volume}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(state: &str, instance: Option<&str>, attach: Option<&str>) -> Volume {
        Volume {
            id: "vol-0123456789abcdef0".into(),
            name: None,
            project_id: "p-1".into(),
            size_bytes: 1 << 30,
            pool: "default".into(),
            host_id: Some("h-1".into()),
            state: state.into(),
            instance_id: instance.map(Into::into),
            attach_state: attach.map(Into::into),
            serial: "vol-0123456789abcdef0".into(),
            snapshot_id: None,
            error: None,
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn attach_waits_for_attached_and_stops_on_errors() {
        let i = "i-1";
        let attaching = vol("in-use", Some(i), Some("attaching"));
        assert!(matches!(
            attach_progress(&attaching, i, None),
            Progress::Waiting(m) if m.contains("attaching")
        ));
        let attached = vol("in-use", Some(i), Some("attached"));
        assert_eq!(attach_progress(&attached, i, None), Progress::Done);
        // Released meanwhile (instance terminated): fail instead of waiting for the timeout.
        let released = vol("available", None, None);
        assert!(matches!(
            attach_progress(&released, i, None),
            Progress::Failed(m) if m.contains("no longer attaching")
        ));
        let mut failed = attaching.clone();
        failed.error = Some("device_add: no free slot".into());
        assert!(matches!(
            attach_progress(&failed, i, None),
            Progress::Failed(m) if m.contains("no free slot")
        ));
        let errored = vol("error", Some(i), Some("attaching"));
        assert!(matches!(
            attach_progress(&errored, i, None),
            Progress::Failed(_)
        ));
    }

    #[test]
    fn detach_waits_for_available_and_ignores_an_old_error() {
        let mut detaching = vol("in-use", Some("i-1"), Some("detaching"));
        detaching.error = Some("an older failure".into());
        assert!(matches!(
            detach_progress(&detaching, Some("an older failure")),
            Progress::Waiting(m) if m.contains("detaching")
        ));
        assert!(matches!(
            detach_progress(&detaching, None),
            Progress::Failed(m) if m.contains("an older failure")
        ));
        assert_eq!(
            detach_progress(&vol("available", None, None), None),
            Progress::Done
        );
    }

    #[test]
    fn guests_see_the_serial_cut_at_20_characters() {
        assert_eq!(
            guest_path("vol-0123456789abcdef0"),
            "/dev/disk/by-id/virtio-vol-0123456789abcdef"
        );
        assert_eq!(guest_path("vol-1"), "/dev/disk/by-id/virtio-vol-1");
    }

    #[test]
    fn summaries_give_bytes_human_size_and_place() {
        let mut v = vol("available", None, None);
        v.name = Some("data".into());
        assert_eq!(
            summary(&v),
            "vol-0123456789abcdef0 (data) 1073741824 bytes (1.0 GiB), available, pool default on host h-1"
        );
        v.host_id = None;
        assert!(summary(&v).ends_with("pool default"));
    }
}
