//! `kumo dev sim-hosts`: placeholder, being written.

#[derive(clap::Args, Debug)]
pub struct SimHostsArgs {}

pub async fn run(_a: SimHostsArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
