//! `kumo vm migrate`, `kumo migration ...`, `kumo host evacuate|return`.

use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kumo_types::api::Page;
use kumo_types::migration::{EvacuateHost, Evacuation, MigrateInstance, Migration, ReturnHost};

use crate::commands::{follow_operation, print_json, table, Output};
use crate::{Client, ClientError};

/// `kumo vm migrate`: the arguments of [`crate::VmCmd::Migrate`].
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The instance (id or name); it keeps running while it moves.
    pub id: String,
    /// Destination host (id or name; default: where placement says).
    #[arg(long)]
    pub host: Option<String>,
    /// Longest pause of the guest at the switch, ms (default 300).
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Slow the guest's vCPUs down if its memory changes faster than it can be copied.
    #[arg(long)]
    pub auto_converge: bool,
    /// Bytes a second for the copy (default: unlimited).
    #[arg(long)]
    pub bandwidth: Option<u64>,
    /// Return at once instead of following the migration.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

impl MigrateArgs {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        let req = MigrateInstance {
            host: self.host,
            downtime_ms: self.downtime_ms,
            auto_converge: self.auto_converge,
            bandwidth: self.bandwidth,
        };
        let m: Migration = client
            .post(&format!("/api/v1/instances/{}/migrate", self.id), &req)
            .await?;
        if self.no_wait {
            return show(&m, self.output);
        }
        let m = follow(client, &m.id).await?;
        show(&m, self.output)?;
        if m.step == "done" {
            Ok(())
        } else {
            Err(ClientError::Failed(format!(
                "migration {} failed: {}",
                m.id,
                m.error.unwrap_or_default()
            )))
        }
    }
}

/// Follow a migration with a progress bar until it ends.
async fn follow(client: &Client, id: &str) -> Result<Migration, ClientError> {
    let pb = ProgressBar::new(1000);
    pb.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {percent}% [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let m: Migration = client.get(&format!("/api/v1/migrations/{id}")).await?;
        pb.set_message(format!("{} ({})", m.instance_id, m.step));
        pb.set_position((m.progress * 1000.0) as u64);
        if matches!(m.step.as_str(), "done" | "failed") {
            pb.finish_and_clear();
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn show(m: &Migration, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(m);
    }
    let mut t = table(&["field", "value"]);
    let stat = |k: &str| {
        m.stats
            .as_ref()
            .and_then(|s| s.get(k))
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    for (k, v) in [
        ("id", m.id.clone()),
        ("instance", m.instance_id.clone()),
        ("from", m.source_host.clone()),
        ("to", m.dest_host.clone()),
        ("mode", m.mode.clone()),
        ("step", m.step.clone()),
        ("progress", format!("{:.0}%", m.progress * 100.0)),
        ("total ms", stat("total_ms")),
        ("downtime ms", stat("downtime_ms")),
        ("error", m.error.clone().unwrap_or_default()),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum MigrationCmd {
    /// Migrations, newest first.
    #[command(alias = "ls")]
    List {
        /// Only this instance's.
        #[arg(long)]
        instance: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Show {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop a migration before its switch: the instance stays where it was.
    Cancel { id: String },
}

impl MigrationCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            MigrationCmd::List { instance, output } => {
                let path = match &instance {
                    Some(i) => format!("/api/v1/migrations?instance={i}"),
                    None => "/api/v1/migrations".to_string(),
                };
                let page: Page<Migration> = client.get(&path).await?;
                if output == Output::Json {
                    return print_json(&page.items);
                }
                let mut t = table(&["id", "instance", "from", "to", "mode", "step", "progress"]);
                for m in page.items {
                    t.add_row(vec![
                        m.id,
                        m.instance_id,
                        m.source_host,
                        m.dest_host,
                        m.mode,
                        m.step,
                        format!("{:.0}%", m.progress * 100.0),
                    ]);
                }
                println!("{t}");
            }
            MigrationCmd::Show { id, output } => {
                let m: Migration = client.get(&format!("/api/v1/migrations/{id}")).await?;
                show(&m, output)?;
            }
            MigrationCmd::Cancel { id } => {
                let m: Migration = client
                    .post(&format!("/api/v1/migrations/{id}/cancel"), &())
                    .await?;
                println!("{}: {}", m.id, m.step);
            }
        }
        Ok(())
    }
}

/// `kumo host evacuate`.
#[derive(Debug, Args)]
pub struct EvacuateArgs {
    pub host: String,
    /// Only instances whose disks need not be copied (hosts of the same shared pool).
    #[arg(long)]
    pub shared_only: bool,
    #[arg(long)]
    pub no_wait: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// `kumo host return`.
#[derive(Debug, Args)]
pub struct ReturnArgs {
    pub host: String,
    /// Migrate the instances evacuated from it back.
    #[arg(long)]
    pub move_home: bool,
    #[arg(long)]
    pub no_wait: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

impl EvacuateArgs {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        let req = EvacuateHost {
            include_storage: Some(!self.shared_only),
        };
        let e: Evacuation = client
            .post(&format!("/api/v1/hosts/{}/evacuate", self.host), &req)
            .await?;
        finish(client, e, self.no_wait, self.output).await
    }
}

impl ReturnArgs {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        let req = ReturnHost {
            move_home: self.move_home,
        };
        let e: Evacuation = client
            .post(&format!("/api/v1/hosts/{}/return", self.host), &req)
            .await?;
        finish(client, e, self.no_wait, self.output).await
    }
}

/// Print what will move and what cannot, then follow the operation.
async fn finish(
    client: &Client,
    e: Evacuation,
    no_wait: bool,
    output: Output,
) -> Result<(), ClientError> {
    if output == Output::Json {
        print_json(&e)?;
    } else {
        let mut t = table(&["instance", "result", "reason"]);
        for i in &e.items {
            t.add_row(vec![
                i.instance_id.clone(),
                i.result.clone(),
                i.reason.clone().unwrap_or_default(),
            ]);
        }
        println!("{t}");
    }
    if no_wait {
        return Ok(());
    }
    follow_operation(client, &e.operation_id).await?;
    if output == Output::Table {
        println!("done: operation {}", e.operation_id);
    }
    Ok(())
}
