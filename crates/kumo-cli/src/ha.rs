//! `kumo vm set ID --ha on|off --ha-priority N`: an instance's HA failover settings.

use clap::{Args, ValueEnum};
use kumo_types::api::Instance;

use crate::commands::{print_json, Output};
use crate::{Client, ClientError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Instance id or name.
    pub id: String,
    /// Restart it on another host when its host fails (its disks must be on a shared pool).
    #[arg(long, value_enum)]
    pub ha: Option<OnOff>,
    /// Failover order, 0 to 1000: higher restarts first.
    #[arg(long)]
    pub ha_priority: Option<u32>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

impl SetArgs {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        if self.ha.is_none() && self.ha_priority.is_none() {
            return Err(ClientError::Config(
                "nothing to set: give --ha on|off and/or --ha-priority N".into(),
            ));
        }
        let i = client
            .set_instance_ha(&self.id, self.ha.map(|h| h == OnOff::On), self.ha_priority)
            .await?;
        if self.output == Output::Json {
            return print_json(&i);
        }
        println!("{} ha: {}", i.id, describe(&i));
        Ok(())
    }
}

/// `on, priority 800` / `off`, for `vm show`.
pub fn describe(i: &Instance) -> String {
    if i.ha {
        format!("on, priority {}", i.ha_priority)
    } else {
        format!("off (priority {})", i.ha_priority)
    }
}
