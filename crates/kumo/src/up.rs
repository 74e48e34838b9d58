//! `kumo up`: a whole cloud on this machine, in the foreground — controller, local agent,
//! SQLite store, default network (inside its own network namespace, so the machine's own
//! network is never touched) and the `demo` image. `kumo down` stops what it started.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kumo_cli::ClientConfig;
use kumo_controller::Controller;
use kumo_store::Scope;
use kumo_types::api::ImportImage;

use crate::server::{self, AgentArgs, ServerArgs};

/// The namespace that holds the local host's VM networks and QEMU processes.
pub const UP_NETNS: &str = "kumo-up";

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Where the store, images, disks and agent state live.
    #[arg(long, env = "KUMO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8780")]
    pub listen: SocketAddr,
    /// Never install packages; print what is missing instead.
    #[arg(long)]
    pub no_install: bool,
    /// auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: kumo_hypervisor::AccelChoice,
    /// Exit once the cloud is ready instead of staying in the foreground (for scripts).
    #[arg(long)]
    pub detach_check: bool,
    /// Network namespace for the local host's VM networks and QEMU processes.
    #[arg(long, default_value = UP_NETNS)]
    pub netns: String,
}

#[derive(Args, Debug, Clone)]
pub struct DownArgs {
    #[arg(long, env = "KUMO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = UP_NETNS)]
    pub netns: String,
}

/// (command, Debian package) pairs `kumo up` needs.
const NEEDS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("dnsmasq", "dnsmasq-base"),
    ("ip", "iproute2"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("xz", "xz-utils"),
    ("gzip", "gzip"),
];

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(cmd).is_file()
        || Path::new("/sbin").join(cmd).is_file()
}

fn codename() -> Option<String> {
    std::fs::read_to_string("/etc/os-release")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("VERSION_CODENAME=")
                .map(|v| v.trim_matches('"').to_string())
        })
}

/// The apt command line that installs `pkgs`. qemu-system-x86 and qemu-utils must come from
/// the same release in one call, or apt removes a newer qemu-utils (and qemu-img with it).
pub fn apt_install_args(pkgs: &[&str], codename: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "install".to_string(),
        "-y".into(),
        "-q".into(),
        "--no-install-recommends".into(),
        "--allow-downgrades".into(),
    ];
    let qemu = pkgs
        .iter()
        .any(|p| *p == "qemu-system-x86" || *p == "qemu-utils");
    for p in pkgs {
        if *p == "qemu-utils" || *p == "qemu-system-x86" {
            continue;
        }
        args.push((*p).to_string());
    }
    if qemu {
        args.push("qemu-system-x86".into());
        args.push(match codename {
            Some(c) => format!("qemu-utils/{c}"),
            None => "qemu-utils".into(),
        });
    }
    args
}

pub fn ensure_prerequisites(no_install: bool) -> anyhow::Result<()> {
    let missing: Vec<&(&str, &str)> = NEEDS.iter().filter(|(c, _)| !on_path(c)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    pkgs.dedup();
    let is_root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let args = apt_install_args(&pkgs, codename().as_deref());
    let list = missing
        .iter()
        .map(|(c, p)| format!("{c} ({p})"))
        .collect::<Vec<_>>()
        .join(", ");
    if no_install || !is_root || !on_path("apt-get") {
        bail!(
            "missing: {list}\ninstall them with: sudo apt-get update && sudo apt-get {}",
            args.join(" ")
        );
    }
    eprintln!("kumo up: installing {list}");
    let ok = |s: std::io::Result<std::process::ExitStatus>| s.map(|s| s.success()).unwrap_or(false);
    if !ok(std::process::Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status())
    {
        // The package lists may be missing or stale on a fresh machine.
        if !ok(std::process::Command::new("apt-get")
            .args(["update", "-q"])
            .status())
            || !ok(std::process::Command::new("apt-get")
                .args(&args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status())
        {
            bail!(
                "installing packages failed; run: apt-get update && apt-get {}",
                args.join(" ")
            );
        }
    }
    let still: Vec<&str> = NEEDS
        .iter()
        .filter(|(c, _)| !on_path(c))
        .map(|(c, _)| *c)
        .collect();
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    Ok(())
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    ensure_prerequisites(a.no_install)?;
    let data = a.data_dir.clone().unwrap_or_else(crate::default_data_dir);
    let sargs = ServerArgs {
        data_dir: Some(data.clone()),
        backup_dir: None,
        listen: a.listen,
        region: "kumo".into(),
        heartbeat_timeout: 10,
        lease_ttl: 6,
        default_cidr: "10.77.0.0/24".into(),
        bootstrap_file: None,
        policy: Default::default(),
    };
    let b = server::open_controller(&sargs).await?;
    let ctl = b.ctl.clone();
    let key = match b.bootstrap {
        Some(boot) => boot.access_key,
        None => ctl
            .store
            .admin_access_key()
            .await?
            .context("the store has no admin access key")?,
    };
    let (addr, _h) = server::serve(ctl.clone(), b.region.clone(), a.listen).await?;
    let endpoint = format!("http://{addr}");
    let cfg = ClientConfig {
        endpoint: endpoint.clone(),
        region: b.region.clone(),
        access_key_id: key.id.clone(),
        secret_access_key: key.secret.clone(),
    };
    let cfg_path = kumo_cli::config_path();
    cfg.save(&cfg_path)?;
    let (aws_config, aws_creds) = write_aws_profile(&endpoint, &b.region, &key.id, &key.secret)?;

    let token = ctl
        .store
        .any_join_token()
        .await?
        .context("the store has no join token")?;
    let aargs = AgentArgs {
        controller: endpoint.clone(),
        join_token: Some(token),
        data_dir: Some(data.join("agent")),
        name: Some("local".into()),
        site: "site1".into(),
        listen: "127.0.0.1:0".parse()?,
        advertise: None,
        hypervisor: "qemu".into(),
        accel: a.accel,
        vm_netns: Some(a.netns.clone()),
        heartbeat_interval: 1,
        stop_timeout: 30,
        capacity: None,
        labels: vec![],
        storage_pool: String::new(),
        pool_kind: None,
        pool_path: None,
        pool_vg: None,
        network_interval: 5,
        router_netns_prefix: None,
        tunnel_ip: None,
        trunk: None,
        public_bridge: None,
        backup_rate: None,
        probes: vec![],
    };
    let agent = kumo_agent::start(server::agent_config(&aargs)).await?;
    ensure_demo_image(&ctl, &data).await?;

    println!();
    println!(
        "kumo is up: API {endpoint}, host {} ({}), data in {}",
        agent.identity().host_id,
        agent.info().accel,
        data.display()
    );
    println!("CLI credentials written to {}", cfg_path.display());
    println!(
        "AWS CLI profile `kumo` written to {} and {}",
        aws_config.display(),
        aws_creds.display()
    );
    println!();
    println!("  kumo vm create --name web1 --image demo --type t1.small --wait");
    println!("  kumo vm console web1            # Ctrl-] to leave");
    println!("  kumo vm port-forward web1 8080:80 &   curl http://127.0.0.1:8080/");
    println!("  kumo vm delete web1");
    println!("  aws --profile kumo ec2 describe-instances   # the EC2-compatible API");
    println!();
    if a.detach_check {
        return Ok(());
    }
    println!(
        "Press Ctrl-C to stop the controller and agent (VMs keep running; `kumo down` stops them)."
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The AWS CLI's config and credentials files, honouring `AWS_CONFIG_FILE` and
/// `AWS_SHARED_CREDENTIALS_FILE`.
fn aws_paths() -> anyhow::Result<(PathBuf, PathBuf)> {
    let home = || -> anyhow::Result<PathBuf> {
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".aws"))
            .context("HOME is not set")
    };
    let config = match std::env::var_os("AWS_CONFIG_FILE") {
        Some(p) => PathBuf::from(p),
        None => home()?.join("config"),
    };
    let creds = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => PathBuf::from(p),
        None => home()?.join("credentials"),
    };
    Ok((config, creds))
}

/// Write the AWS CLI profile `kumo` (endpoint, region, credentials), keeping other profiles.
pub fn write_aws_profile(
    endpoint: &str,
    region: &str,
    key_id: &str,
    secret: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (config, creds) = aws_paths()?;
    update_ini_file(
        &config,
        "profile kumo",
        &[("region", region), ("endpoint_url", endpoint)],
    )?;
    update_ini_file(
        &creds,
        "kumo",
        &[
            ("aws_access_key_id", key_id),
            ("aws_secret_access_key", secret),
        ],
    )?;
    Ok((config, creds))
}

fn update_ini_file(path: &Path, section: &str, values: &[(&str, &str)]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = update_ini_section(&old, section, values);
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let tmp = path.with_extension("kumo-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(new.as_bytes())?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Replace (or append) one `[section]` of an INI document, leaving everything else as it was.
pub fn update_ini_section(old: &str, section: &str, values: &[(&str, &str)]) -> String {
    let header = |l: &str| {
        let t = l.trim();
        (t.starts_with('[') && t.ends_with(']')).then(|| t[1..t.len() - 1].trim().to_string())
    };
    let mut body = format!("[{section}]\n");
    for (k, v) in values {
        body.push_str(&format!("{k} = {v}\n"));
    }
    let mut out = String::new();
    let mut skipping = false;
    let mut written = false;
    for line in old.lines() {
        if let Some(name) = header(line) {
            skipping = name == section;
            if skipping && !written {
                out.push_str(&body);
                written = true;
                continue;
            }
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !written {
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(&body);
    }
    out
}

/// Build the test guest and import it as `demo` (kernel, ramdisk and disk), once.
async fn ensure_demo_image(ctl: &Controller, data: &Path) -> anyhow::Result<()> {
    let admin = Scope::system();
    if let Ok(img) = ctl.store.image(&admin, "demo").await {
        if img.state == "available" {
            return Ok(());
        }
    }
    let guest = data.join("guest");
    eprintln!("kumo up: building the demo guest from Debian's kernel and busybox");
    crate::dev::build_guest(&guest).await?;
    let project = ctl
        .store
        .project_id_by_name("admin")
        .await?
        .context("no admin project")?;
    let scope = Scope {
        project_id: project,
        user_id: "system".into(),
        admin: true,
    };
    let import = |name: &str,
                  kind: &str,
                  file: &str,
                  kernel: Option<String>,
                  ramdisk: Option<String>,
                  cmdline: Option<String>| ImportImage {
        name: name.into(),
        kind: Some(kind.into()),
        path: guest.join(file).display().to_string(),
        format: None,
        kernel_id: kernel,
        ramdisk_id: ramdisk,
        cmdline,
        public: true,
    };
    let kernel = import_and_wait(
        ctl,
        &scope,
        &import("demo-kernel", "kernel", "vmlinux", None, None, None),
    )
    .await?;
    let initrd = import_and_wait(
        ctl,
        &scope,
        &import("demo-initrd", "ramdisk", "initrd.img", None, None, None),
    )
    .await?;
    import_and_wait(
        ctl,
        &scope,
        &import(
            "demo",
            "disk",
            "disk.qcow2",
            Some(kernel),
            Some(initrd),
            Some("console=ttyS0 quiet".into()),
        ),
    )
    .await?;
    eprintln!("kumo up: imported the demo image");
    Ok(())
}

async fn import_and_wait(
    ctl: &Controller,
    scope: &Scope,
    req: &ImportImage,
) -> anyhow::Result<String> {
    if let Ok(img) = ctl.store.image(scope, &req.name).await {
        if img.state == "available" {
            return Ok(img.id);
        }
    }
    let (img, op) = ctl.import_image(scope, req).await?;
    loop {
        let op = ctl.store.operation(scope, &op.id).await?;
        match op.state.as_str() {
            "succeeded" => return Ok(img.id),
            "failed" => bail!(
                "importing {} failed: {}",
                req.name,
                op.error.unwrap_or_default()
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn down(a: DownArgs) -> anyhow::Result<()> {
    let data = a.data_dir.unwrap_or_else(crate::default_data_dir);
    let agent_dir = data.join("agent");
    let hv =
        kumo_hypervisor::QemuDriver::new(agent_dir.join("run"), kumo_hypervisor::AccelChoice::Tcg)
            .await?;
    use kumo_hypervisor::Hypervisor;
    for vm in hv.list().await? {
        hv.kill(&vm.id).await?;
        println!("stopped {}", vm.id);
    }
    // Teardown removes what the ledger lists (router namespaces included); the options only name new ones.
    let opts = kumo_network::HostOptions {
        router_prefix: format!("{}-r-", a.netns),
        ..Default::default()
    };
    let net =
        kumo_network::HostNetwork::new(Some(a.netns.clone()), agent_dir.join("net"), opts).await?;
    net.teardown().await?;
    println!("removed network namespace {}", a.netns);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_profile_replaces_only_its_section() {
        let old = "[default]\nregion = us-east-1\n\n[profile kumo]\nregion = old\nendpoint_url = http://old\n\n[profile other]\nregion = eu-west-1\n";
        let new = update_ini_section(
            old,
            "profile kumo",
            &[
                ("region", "kumo"),
                ("endpoint_url", "http://127.0.0.1:8780"),
            ],
        );
        assert_eq!(
            new,
            "[default]\nregion = us-east-1\n\n[profile kumo]\nregion = kumo\nendpoint_url = http://127.0.0.1:8780\n[profile other]\nregion = eu-west-1\n"
        );
        let fresh = update_ini_section("", "kumo", &[("aws_access_key_id", "AKIA")]);
        assert_eq!(fresh, "[kumo]\naws_access_key_id = AKIA\n");
        let appended = update_ini_section("[default]\nx = 1\n", "kumo", &[("a", "b")]);
        assert_eq!(appended, "[default]\nx = 1\n\n[kumo]\na = b\n");
    }

    #[test]
    fn aws_profile_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("sub").join("credentials");
        std::fs::create_dir_all(dir.path().join("sub")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&path, "[default]\naws_access_key_id = X\n")
            .unwrap_or_else(|e| panic!("{e}"));
        update_ini_file(&path, "kumo", &[("aws_access_key_id", "K")])
            .unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text.contains("[default]\naws_access_key_id = X")
                && text.contains("[kumo]\naws_access_key_id = K")
        );
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn qemu_packages_come_from_one_release() {
        let a = apt_install_args(&["qemu-utils", "dnsmasq-base"], Some("bookworm"));
        assert!(a.contains(&"qemu-utils/bookworm".to_string()), "{a:?}");
        assert!(a.contains(&"qemu-system-x86".to_string()));
        assert!(a.contains(&"dnsmasq-base".to_string()));
        let b = apt_install_args(&["cpio"], Some("bookworm"));
        assert!(!b.iter().any(|x| x.starts_with("qemu")));
    }
}
