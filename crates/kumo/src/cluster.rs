//! `kumo dev cluster`: placeholder, being written.

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {}

pub async fn run(_a: ClusterArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
