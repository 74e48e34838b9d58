//! `kumo dev ...`: developer tools.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;

/// The guest build script, embedded so the installed binary can build the demo image.
const BUILD_GUEST: &str = include_str!("../../../guest/build-guest.sh");
/// The stock Debian cloud guest build script (debootstrap + Debian's cloud-init), embedded likewise.
const BUILD_CLOUD_GUEST: &str = include_str!("../../../guest/build-cloud-guest.sh");

#[derive(Subcommand)]
pub enum DevCmd {
    /// Build the test guest (kernel, initramfs, data disk) from Debian packages.
    BuildGuest {
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a stock Debian 12 cloud guest (debootstrap, Debian's cloud-init as shipped):
    /// kernel, initrd, ext4 root disk and kernel command line. Needs root and a Debian mirror.
    BuildCloudGuest {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the OpenAPI document of the native API.
    Openapi,
    /// A test cluster of real hosts on this machine: network namespaces joined by a
    /// management network, a controller, and one agent per host. Runs until Ctrl-C.
    Cluster(crate::cluster::ClusterArgs),
    /// Thousands of simulated hosts in one process, joined to a running controller.
    SimHosts(crate::simfleet::SimHostsArgs),
}

pub async fn run(c: DevCmd) -> anyhow::Result<()> {
    match c {
        DevCmd::BuildGuest { out } => {
            build_guest(&out).await?;
            println!("guest built in {}", out.display());
            Ok(())
        }
        DevCmd::BuildCloudGuest { out } => {
            build_cloud_guest(&out).await?;
            println!("cloud guest built in {}", out.display());
            Ok(())
        }
        DevCmd::Openapi => {
            println!("{}", kumo_api::openapi_json());
            Ok(())
        }
        DevCmd::Cluster(a) => crate::cluster::run(a).await,
        DevCmd::SimHosts(a) => crate::simfleet::run(a).await,
    }
}

/// Run the embedded build script into `out`.
pub async fn build_guest(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let script = out.join(".build-guest.sh");
    std::fs::write(&script, BUILD_GUEST)
        .with_context(|| format!("writing {}", script.display()))?;
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(out)
        .status()
        .await
        .context("running the guest build script")?;
    let _ = std::fs::remove_file(&script);
    if !status.success() {
        bail!("building the test guest failed ({status}); see the messages above");
    }
    Ok(())
}

/// Run the embedded cloud guest build script into `out` (a no-op when `out` is up to date).
pub async fn build_cloud_guest(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // A name of its own per run: bash reads a script as it goes, so a concurrent run must never
    // rewrite the file under it. The script hashes itself, and the content is the same.
    let script = out.join(format!(".build-cloud-guest.{}.sh", std::process::id()));
    std::fs::write(&script, BUILD_CLOUD_GUEST)
        .with_context(|| format!("writing {}", script.display()))?;
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(out)
        .status()
        .await;
    let _ = std::fs::remove_file(&script);
    let status = status.context("running the cloud guest build script")?;
    if !status.success() {
        bail!("building the cloud guest failed ({status}); see the messages above");
    }
    Ok(())
}
