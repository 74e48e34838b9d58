//! `kumo backup ...`: full and incremental backups of root disks and volumes, restores (in place
//! or as a new instance/volume) and backup schedules with retention.

use clap::{ArgGroup, Subcommand};
use kumo_types::api::Page;
use kumo_types::storage::{
    Backup, BackupSchedule, BackupWithOperation, CreateBackup, CreateBackupSchedule, RestoreBackup,
    RestoreResult,
};

use super::size::{bytes_and_human, human_size};
use super::{dash, delete_204, enc};
use crate::commands::{follow_operation, print_json, table, Output};
use crate::{Client, ClientError};

impl Client {
    /// The project's backups, oldest first; `source`: only those of this instance or volume id.
    pub async fn backups(&self, source: Option<&str>) -> Result<Vec<Backup>, ClientError> {
        let path = match source {
            Some(s) => format!("/api/v1/backups?source={}", enc(s)),
            None => "/api/v1/backups".into(),
        };
        Ok(self.get::<Page<Backup>>(&path).await?.items)
    }

    pub async fn backup(&self, id: &str) -> Result<Backup, ClientError> {
        self.get(&format!("/api/v1/backups/{}", enc(id))).await
    }

    /// Start a backup: incremental on top of the last one unless `full` (or the chain must restart).
    pub async fn create_backup(
        &self,
        req: &CreateBackup,
    ) -> Result<BackupWithOperation, ClientError> {
        self.post("/api/v1/backups", req).await
    }

    /// Delete a backup; the server keeps the rest of its chain restorable.
    pub async fn delete_backup(&self, id: &str) -> Result<(), ClientError> {
        delete_204(self, &format!("/api/v1/backups/{}", enc(id))).await
    }

    /// Check that a backup's chain reads back as recorded (an API error if it does not).
    pub async fn verify_backup(&self, id: &str) -> Result<Backup, ClientError> {
        self.request(
            "POST",
            &format!("/api/v1/backups/{}/verify", enc(id)),
            Some(&serde_json::json!({})),
            None,
        )
        .await
    }

    pub async fn restore_backup(
        &self,
        id: &str,
        req: &RestoreBackup,
    ) -> Result<RestoreResult, ClientError> {
        self.post(&format!("/api/v1/backups/{}/restore", enc(id)), req)
            .await
    }

    pub async fn backup_schedules(&self) -> Result<Vec<BackupSchedule>, ClientError> {
        Ok(self
            .get::<Page<BackupSchedule>>("/api/v1/backup-schedules")
            .await?
            .items)
    }

    pub async fn create_backup_schedule(
        &self,
        req: &CreateBackupSchedule,
    ) -> Result<BackupSchedule, ClientError> {
        self.post("/api/v1/backup-schedules", req).await
    }

    /// Delete a schedule; the backups it made stay.
    pub async fn delete_backup_schedule(&self, id: &str) -> Result<(), ClientError> {
        delete_204(self, &format!("/api/v1/backup-schedules/{}", enc(id))).await
    }
}

#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Back up an instance's root disk or a volume into the backup repository.
    ///
    /// The first backup of a disk is full; later ones are incremental (only what changed since
    /// the last good backup), unless --full starts a new chain. Works while the instance runs.
    #[command(group(ArgGroup::new("source").required(true).args(["instance", "volume"])))]
    Create {
        /// The instance (id or name) whose root disk to back up.
        #[arg(long)]
        instance: Option<String>,
        /// The volume (id or name) to back up.
        #[arg(long)]
        volume: Option<String>,
        /// Start a new chain with a full backup instead of an incremental one.
        #[arg(long)]
        full: bool,
        /// Copy at most this many MiB a second (default: the host's --backup-rate).
        #[arg(long, value_name = "MIB_PER_S")]
        rate: Option<u64>,
        /// Return at once with the backup's operation (follow it with `kumo op ID`).
        #[arg(long)]
        no_wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the project's backups, oldest first (administrators: every project's).
    #[command(alias = "ls")]
    List {
        /// Only the backups of this instance or volume id.
        #[arg(long)]
        source: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one backup.
    Show {
        /// Backup id.
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a backup; the rest of its chain stays restorable.
    #[command(alias = "rm")]
    Delete {
        /// Backup id.
        id: String,
    },
    /// Check that a backup (and the chain it builds on) reads back as recorded.
    Verify {
        /// Backup id.
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Restore a backup: in place, or as a new instance/volume.
    ///
    /// In place replaces the source's disk (the instance must be stopped, the volume detached).
    /// --name makes a new instance (instance backups) or volume (volume backups) instead and
    /// leaves the source alone. A progress bar follows the restore.
    #[command(group(ArgGroup::new("target").required(true).args(["in_place", "name"])))]
    Restore {
        /// Backup id.
        id: String,
        /// Replace the source's disk with the backup's content.
        #[arg(long)]
        in_place: bool,
        /// Name of the new instance or volume.
        #[arg(long)]
        name: Option<String>,
        /// Return at once with the restore's operation (follow it with `kumo op ID`).
        #[arg(long)]
        no_wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Scheduled backups with retention.
    #[command(subcommand)]
    Schedule(ScheduleCmd),
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCmd {
    /// Back an instance or a volume up on a cron schedule, expiring old backups.
    ///
    /// Retention works like restic's `forget --keep-*`: a backup is kept if any rule keeps it.
    /// Give at least one --keep-* option.
    #[command(group(ArgGroup::new("source").required(true).args(["instance", "volume"])))]
    #[command(group(
        ArgGroup::new("retention")
            .required(true)
            .multiple(true)
            .args(["keep_last", "keep_hourly", "keep_daily", "keep_weekly"])
    ))]
    Create {
        /// The instance (id or name) whose root disk to back up.
        #[arg(long)]
        instance: Option<String>,
        /// The volume (id or name) to back up.
        #[arg(long)]
        volume: Option<String>,
        /// When, in UTC: cron with 5 fields (`min hour day month weekday`, e.g. "0 3 * * *"),
        /// or 6 with seconds first.
        #[arg(long)]
        cron: String,
        /// Keep the newest N backups.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep_last: Option<u32>,
        /// Keep the newest backup of each of the last N hours that have one.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep_hourly: Option<u32>,
        /// Keep the newest backup of each of the last N days that have one.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep_daily: Option<u32>,
        /// Keep the newest backup of each of the last N ISO weeks that have one.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep_weekly: Option<u32>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the project's backup schedules.
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a schedule (the backups it made stay).
    #[command(alias = "rm")]
    Delete {
        /// Schedule id.
        id: String,
    },
}

/// `full`, `incremental`, `pending` while a running backup has not decided yet, else `-`.
fn kind(b: &Backup) -> &str {
    match (b.kind.as_str(), b.state.as_str()) {
        ("", "running") => "pending",
        ("", _) => "-",
        (k, _) => k,
    }
}

fn written(b: &Backup) -> String {
    dash(b.bytes_written.map(human_size))
}

/// One line: `backup-… incremental of instance i-… on top of backup-…: 12.0 MiB written, completed`.
fn summary(b: &Backup) -> String {
    let parent = b
        .parent_id
        .as_ref()
        .map(|p| format!(" on top of {p}"))
        .unwrap_or_default();
    let written = match b.bytes_written {
        Some(n) => format!("{} written", human_size(n)),
        None => "nothing written yet".into(),
    };
    let error = b
        .error
        .as_ref()
        .filter(|_| b.state == "failed")
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    format!(
        "{} {} of {} {}{parent}: {written}, {}{error}",
        b.id,
        kind(b),
        b.source_kind,
        b.source_id,
        b.state
    )
}

fn show_backup(b: &Backup, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(b);
    }
    let mut t = table(&["field", "value"]);
    for (k, v) in [
        ("id", b.id.clone()),
        ("source", format!("{} {}", b.source_kind, b.source_id)),
        ("kind", kind(b).to_string()),
        ("parent", dash(b.parent_id.as_ref())),
        ("state", b.state.clone()),
        ("written", dash(b.bytes_written.map(bytes_and_human))),
        ("size", dash(b.virtual_size.map(bytes_and_human))),
        ("schedule", dash(b.schedule_id.as_ref())),
        ("operation", dash(b.operation_id.as_ref())),
        ("project", b.project_id.clone()),
        ("created", b.created_at.to_rfc3339()),
        ("finished", dash(b.finished_at.map(|t| t.to_rfc3339()))),
        ("error", dash(b.error.as_ref())),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

/// What a restore makes, known from the backup's source and the request.
#[derive(Debug, PartialEq, Eq)]
enum Restored {
    /// The source's disk was replaced: `kind` `id`.
    InPlace {
        kind: String,
        id: String,
    },
    NewVolume {
        id: String,
    },
    /// The operation targets the backup: the instance is found by name once it succeeded.
    NewInstance {
        name: String,
    },
}

fn restored(b: &Backup, in_place: bool, name: Option<&str>, target_id: &str) -> Restored {
    if in_place {
        return Restored::InPlace {
            kind: b.source_kind.clone(),
            id: target_id.into(),
        };
    }
    match (b.source_kind.as_str(), name) {
        ("instance", Some(n)) => Restored::NewInstance { name: n.into() },
        _ => Restored::NewVolume {
            id: target_id.into(),
        },
    }
}

/// The line `--no-wait` prints.
fn restoring_line(backup: &str, r: &Restored, op: &str) -> String {
    let into = match r {
        Restored::InPlace { kind, id } => format!("in place into {kind} {id}"),
        Restored::NewVolume { id } => format!("as volume {id}"),
        Restored::NewInstance { name } => format!("as a new instance named {name}"),
    };
    format!("restoring {backup} {into}: follow with `kumo op {op}`")
}

/// The line printed once the restore succeeded; `instance`: the new instance's id, if found.
fn restored_line(backup: &str, r: &Restored, instance: Option<&str>) -> String {
    match r {
        Restored::InPlace { kind, id } => format!("{backup} restored in place into {kind} {id}"),
        Restored::NewVolume { id } => format!("{backup} restored as volume {id}"),
        Restored::NewInstance { name } => match instance {
            Some(i) => {
                format!("{backup} restored as instance {i}: it appears in `kumo vm list` as {name}")
            }
            None => {
                format!("{backup} restored as a new instance: look for {name} in `kumo vm list`")
            }
        },
    }
}

/// `last 7, daily 7, weekly 4`: the rules a schedule keeps by.
fn retention(s: &BackupSchedule) -> String {
    let rules: Vec<String> = [
        ("last", s.keep_last),
        ("hourly", s.keep_hourly),
        ("daily", s.keep_daily),
        ("weekly", s.keep_weekly),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k} {n}"))
    .collect();
    if rules.is_empty() {
        "-".into()
    } else {
        rules.join(", ")
    }
}

fn next_run(s: &BackupSchedule) -> String {
    dash(
        s.next_run
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
    )
}

impl BackupCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            BackupCmd::Create {
                instance,
                volume,
                full,
                rate,
                no_wait,
                output,
            } => {
                let req = CreateBackup {
                    instance,
                    volume,
                    full,
                    rate_mib_s: rate,
                };
                println!("{}", create(client, &req, no_wait, output).await?);
            }
            BackupCmd::List { source, output } => {
                let list = client.backups(source.as_deref()).await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&[
                    "id", "source", "kind", "parent", "state", "written", "size", "created",
                ]);
                for b in list {
                    t.add_row(vec![
                        b.id.clone(),
                        format!("{} {}", b.source_kind, b.source_id),
                        kind(&b).to_string(),
                        dash(b.parent_id.as_ref()),
                        b.state.clone(),
                        written(&b),
                        dash(b.virtual_size.map(human_size)),
                        b.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    ]);
                }
                println!("{t}");
            }
            BackupCmd::Show { id, output } => show_backup(&client.backup(&id).await?, output)?,
            BackupCmd::Delete { id } => {
                client.delete_backup(&id).await?;
                println!("deleted {id}");
            }
            BackupCmd::Verify { id, output } => {
                let b = client.verify_backup(&id).await?;
                if output == Output::Json {
                    return print_json(&b);
                }
                println!("{} verified", b.id);
            }
            BackupCmd::Restore {
                id,
                in_place,
                name,
                no_wait,
                output,
            } => println!(
                "{}",
                restore(client, &id, in_place, name, no_wait, output).await?
            ),
            BackupCmd::Schedule(c) => c.run(client).await?,
        }
        Ok(())
    }
}

fn json(v: &impl serde::Serialize) -> Result<String, ClientError> {
    serde_json::to_string_pretty(v).map_err(|e| ClientError::Failed(e.to_string()))
}

/// Start a backup and (unless `no_wait`) follow it; returns what to print.
async fn create(
    client: &Client,
    req: &CreateBackup,
    no_wait: bool,
    output: Output,
) -> Result<String, ClientError> {
    let started = client.create_backup(req).await?;
    if no_wait {
        if output == Output::Json {
            return json(&started);
        }
        return Ok(format!(
            "{}\nbacking up: follow with `kumo op {}`",
            summary(&started.backup),
            started.operation.id
        ));
    }
    follow_operation(client, &started.operation.id).await?;
    let b = client.backup(&started.backup.id).await?;
    if output == Output::Json {
        return json(&b);
    }
    Ok(summary(&b))
}

/// Start a restore and (unless `no_wait`) follow it; returns what to print.
async fn restore(
    client: &Client,
    id: &str,
    in_place: bool,
    name: Option<String>,
    no_wait: bool,
    output: Output,
) -> Result<String, ClientError> {
    // The source's kind says what a restore as new makes; asking first also fails early on a
    // wrong id, before anything is created.
    let b = client.backup(id).await?;
    let req = RestoreBackup {
        in_place,
        name: name.clone(),
    };
    let started = client.restore_backup(&b.id, &req).await?;
    let what = restored(&b, in_place, name.as_deref(), &started.target_id);
    if no_wait {
        if output == Output::Json {
            return json(&started);
        }
        return Ok(restoring_line(&b.id, &what, &started.operation.id));
    }
    follow_operation(client, &started.operation.id).await?;
    let instance = match &what {
        Restored::NewInstance { name } => match client.instance(name).await {
            Ok(i) => Some(i),
            // The restore itself succeeded: say so, and where to look, rather than fail.
            Err(e) => {
                eprintln!("warning: cannot find the restored instance {name}: {e}");
                None
            }
        },
        _ => None,
    };
    if output == Output::Json {
        // The restored thing itself, as `show` prints it.
        return match (&what, &instance) {
            (_, Some(i)) => json(i),
            (Restored::InPlace { kind, id }, _) if kind == "instance" => {
                json(&client.instance(id).await?)
            }
            (Restored::InPlace { id, .. } | Restored::NewVolume { id }, _) => {
                json(&client.volume(id).await?)
            }
            (Restored::NewInstance { .. }, None) => {
                json(&client.operation(&started.operation.id).await?)
            }
        };
    }
    Ok(restored_line(
        &b.id,
        &what,
        instance.as_ref().map(|i| i.id.as_str()),
    ))
}

impl ScheduleCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            ScheduleCmd::Create {
                instance,
                volume,
                cron,
                keep_last,
                keep_hourly,
                keep_daily,
                keep_weekly,
                output,
            } => {
                let req = CreateBackupSchedule {
                    instance,
                    volume,
                    cron,
                    keep_last: keep_last.unwrap_or(0),
                    keep_hourly: keep_hourly.unwrap_or(0),
                    keep_daily: keep_daily.unwrap_or(0),
                    keep_weekly: keep_weekly.unwrap_or(0),
                };
                let s = client.create_backup_schedule(&req).await?;
                if output == Output::Json {
                    return print_json(&s);
                }
                println!(
                    "{}: backs up {} {} at \"{}\" (UTC), keeping {}; next run {}",
                    s.id,
                    s.source_kind,
                    s.source_id,
                    s.cron,
                    retention(&s),
                    next_run(&s)
                );
            }
            ScheduleCmd::List { output } => {
                let list = client.backup_schedules().await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&["id", "source", "cron (UTC)", "keep", "next run", "created"]);
                for s in list {
                    t.add_row(vec![
                        s.id.clone(),
                        format!("{} {}", s.source_kind, s.source_id),
                        s.cron.clone(),
                        retention(&s),
                        next_run(&s),
                        s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    ]);
                }
                println!("{t}");
            }
            ScheduleCmd::Delete { id } => {
                client.delete_backup_schedule(&id).await?;
                println!("deleted {id} (its backups stay)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
