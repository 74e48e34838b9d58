//! `kumo placement-group ...`: spread groups that keep a service's members apart.

use clap::Subcommand;
use kumo_types::api::CreatePlacementGroup;

use crate::commands::{print_json, table, Output};
use crate::{Client, ClientError};

#[derive(Debug, Subcommand)]
pub enum PlacementGroupCmd {
    /// Create a spread group: its members go to different hosts.
    Create {
        name: String,
        /// Members one host may hold.
        #[arg(long, default_value_t = 1)]
        max_per_host: u32,
        /// Keep members on different storage pools too.
        #[arg(long)]
        spread_storage: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a group without live members.
    #[command(alias = "rm")]
    Delete { id: String },
}

impl PlacementGroupCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            PlacementGroupCmd::Create {
                name,
                max_per_host,
                spread_storage,
                output,
            } => {
                let g = client
                    .create_placement_group(&CreatePlacementGroup {
                        name,
                        strategy: Some("spread".into()),
                        max_per_host: Some(max_per_host),
                        spread_storage,
                    })
                    .await?;
                if output == Output::Json {
                    return print_json(&g);
                }
                println!(
                    "{} {} (spread, at most {} per host)",
                    g.id, g.name, g.max_per_host
                );
            }
            PlacementGroupCmd::List { output } => {
                let groups = client.placement_groups().await?;
                if output == Output::Json {
                    return print_json(&groups);
                }
                let mut t = table(&[
                    "id",
                    "name",
                    "strategy",
                    "max per host",
                    "storage",
                    "members",
                ]);
                for g in groups {
                    t.add_row(vec![
                        g.id,
                        g.name,
                        g.strategy,
                        g.max_per_host.to_string(),
                        if g.spread_storage { "spread" } else { "-" }.into(),
                        g.members.to_string(),
                    ]);
                }
                println!("{t}");
            }
            PlacementGroupCmd::Delete { id } => {
                client.delete_placement_group(&id).await?;
                println!("deleted");
            }
        }
        Ok(())
    }
}
