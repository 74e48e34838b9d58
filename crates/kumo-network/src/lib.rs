//! Host side of kumo VM networks: one Linux bridge per network holding the gateway address, one tap per VM
//! port, and one dnsmasq per network serving static DHCP (MAC → IP, hostname) and DNS for the VM names.
//!
//! Everything lives either in a named network namespace (`kumo up` then never touches the machine's own
//! network) or in the current one (an agent already running inside a test-host namespace).
//! [`HostNetwork::apply`] is rendered from desired state: it reads what exists, computes the difference,
//! and makes the host match, removing only what kumo created (recorded in the state directory).
//!
//! Links are driven with the `ip` command (`ip -j` to read, one `ip -batch` to change): simple to debug by
//! hand, and one process per apply however many ports there are.

mod cmd;
mod dnsmasq;
mod error;
mod firewall;
mod ledger;
mod links;
mod names;
mod netns;
mod spec;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::NetworkError;
pub use names::{mac_for, tap_name, TAP_PREFIX};
pub use spec::{
    GroupPolicy, Isolation, NetworkSpec, PortSpec, PublicNetwork, RulePolicy, METADATA_IP,
};

use error::io_err;
use ledger::Ledger;
use spec::Network;

/// Prefix suggested for bridge names (kumo tracks what it created in the state directory, so any name works).
pub const BRIDGE_PREFIX: &str = "kb-";

/// The VM networks of one host (or one test-host namespace).
#[derive(Debug)]
pub struct HostNetwork {
    netns: Option<String>,
    state_dir: PathBuf,
    ip: PathBuf,
    /// apply and teardown never overlap.
    lock: tokio::sync::Mutex<()>,
}

impl HostNetwork {
    /// `netns`: `None` = the current namespace; `Some(name)` = create the namespace if missing
    /// (`ip netns add`) and do everything inside it. `state_dir` holds dnsmasq configs, hosts files, pid
    /// files, logs and the record of what kumo created.
    pub async fn new(netns: Option<String>, state_dir: PathBuf) -> Result<Self, NetworkError> {
        if let Some(ns) = &netns {
            netns::check_name(ns)?;
        }
        let ip = cmd::find_program("ip")?;
        std::fs::create_dir_all(state_dir.join(dnsmasq::DIR))
            .map_err(io_err(state_dir.join(dnsmasq::DIR)))?;
        let this = Self {
            netns,
            state_dir,
            ip,
            lock: tokio::sync::Mutex::new(()),
        };
        this.ensure_netns().await?;
        Ok(this)
    }

    /// The namespace everything lives in; `None` = the current one.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The state directory given to [`HostNetwork::new`].
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The pid file of a network's dnsmasq (for diagnostics and tests).
    pub fn dnsmasq_pid_file(&self, network: &str) -> PathBuf {
        dnsmasq::Paths::new(&self.state_dir, network).pid
    }

    /// Creates the namespace if it is missing; returns whether it did.
    async fn ensure_netns(&self) -> Result<bool, NetworkError> {
        let Some(ns) = &self.netns else {
            return Ok(false);
        };
        if netns::exists(ns) {
            return Ok(false);
        }
        let mut ledger = Ledger::load(&self.state_dir)?;
        ledger.netns_created = true;
        ledger.save(&self.state_dir)?;
        netns::create(&self.ip, ns).await?;
        tracing::info!(netns = %ns, "created network namespace");
        Ok(true)
    }

    fn ip_args(&self, args: &[&str]) -> Vec<String> {
        let mut v = Vec::with_capacity(args.len() + 2);
        if let Some(ns) = &self.netns {
            v.push("-n".to_string());
            v.push(ns.clone());
        }
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    async fn read_links(&self) -> Result<Vec<links::Link>, NetworkError> {
        let args = self.ip_args(&["-j", "-d", "addr", "show"]);
        let out = cmd::run(&self.ip, &args, None).await?;
        links::parse_links(&cmd::describe(&self.ip, &args), &out)
    }

    async fn ip_batch(&self, lines: &[String]) -> Result<(), NetworkError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut input = lines.join("\n");
        input.push('\n');
        let args = self.ip_args(&["-batch", "-"]);
        cmd::run(&self.ip, &args, Some(&input)).await.map(|_| ())
    }

    /// Make the host match exactly: these networks (bridge up with the gateway address, dnsmasq running with
    /// exactly these ports' MAC → IP/hostname entries) and these taps (exist, attached to their bridge, up).
    /// Taps, bridges and dnsmasq processes that kumo created earlier and that are not listed are removed;
    /// nothing else is touched. Returns the changes made, in words (empty when the host already matched).
    pub async fn apply(
        &self,
        networks: &[(NetworkSpec, Vec<PortSpec>)],
    ) -> Result<Vec<String>, NetworkError> {
        let desired = spec::validate(networks)?;
        let _guard = self.lock.lock().await;
        let started = std::time::Instant::now();
        let mut repairs = Vec::new();
        std::fs::create_dir_all(self.state_dir.join(dnsmasq::DIR))
            .map_err(io_err(self.state_dir.join(dnsmasq::DIR)))?;
        if self.ensure_netns().await? {
            repairs.push(format!(
                "re-created namespace {}",
                self.netns.as_deref().unwrap_or_default()
            ));
        }
        let owned = Ledger::load(&self.state_dir)?;

        // Record intent first: a crash half-way still leaves every created link on the record.
        let mut intent = owned.clone();
        for net in &desired {
            intent.bridges.insert(net.bridge.clone());
            intent.networks.insert(net.name.clone());
            intent.taps.extend(net.ports.iter().map(|p| p.tap.clone()));
        }
        if intent != owned {
            intent.save(&self.state_dir)?;
        }

        // dnsmasq of networks no longer wanted.
        let mut old_networks: Vec<String> = owned.networks.iter().cloned().collect();
        old_networks.extend(dnsmasq::known_networks(&self.state_dir)?);
        old_networks.sort();
        old_networks.dedup();
        for name in old_networks {
            if !desired.iter().any(|n| n.name == name)
                && dnsmasq::remove(&self.state_dir, &name).await?
            {
                repairs.push(format!("stopped dnsmasq for {name} (network removed)"));
            }
        }

        let current = self.read_links().await?;
        let plan = links::plan(&current, &desired, &owned, self.netns.is_some())?;
        self.ip_batch(&plan.batch).await?;
        repairs.extend(plan.repairs);

        if !desired.is_empty() {
            let dnsmasq_bin = cmd::find_program("dnsmasq")?;
            let ns_inode = netns::inode(self.netns.as_deref())?;
            for net in &desired {
                let bridge_created = plan.created_bridges.contains(&net.bridge);
                self.reconcile_dnsmasq(
                    &dnsmasq_bin,
                    ns_inode,
                    net,
                    bridge_created,
                    &owned,
                    &mut repairs,
                )
                .await?;
            }
        }

        let done = Ledger {
            netns_created: intent.netns_created,
            bridges: desired.iter().map(|n| n.bridge.clone()).collect(),
            taps: desired
                .iter()
                .flat_map(|n| n.ports.iter().map(|p| p.tap.clone()))
                .collect(),
            networks: desired.iter().map(|n| n.name.clone()).collect(),
        };
        if done != intent {
            done.save(&self.state_dir)?;
        }
        for r in &repairs {
            tracing::info!(netns = ?self.netns, "network: {r}");
        }
        tracing::debug!(elapsed = ?started.elapsed(), changes = repairs.len(), "network apply done");
        Ok(repairs)
    }

    async fn reconcile_dnsmasq(
        &self,
        dnsmasq_bin: &Path,
        ns_inode: u64,
        net: &Network,
        bridge_created: bool,
        owned: &Ledger,
        repairs: &mut Vec<String>,
    ) -> Result<(), NetworkError> {
        let paths = dnsmasq::Paths::new(&self.state_dir, &net.name);
        let old_dhcp = std::fs::read_to_string(&paths.dhcp_hosts).unwrap_or_default();
        let reassigned = dnsmasq::reassigns(&old_dhcp, net);
        let dhcp_changed =
            dnsmasq::write_if_changed(&paths.dhcp_hosts, &dnsmasq::render_dhcp_hosts(net))?;
        let dns_changed =
            dnsmasq::write_if_changed(&paths.dns_hosts, &dnsmasq::render_dns_hosts(net))?;
        let args = dnsmasq::args(net, &paths);
        let name = &net.name;
        match dnsmasq::status(&paths, &args, ns_inode) {
            dnsmasq::Status::Running { pid, current: true } if !bridge_created && !reassigned => {
                if dhcp_changed || dns_changed {
                    dnsmasq::reload(pid)?;
                    repairs.push(format!(
                        "reloaded dnsmasq hosts for {name} ({} entries)",
                        net.ports.len()
                    ));
                }
            }
            dnsmasq::Status::Running { pid, current } => {
                dnsmasq::stop(name, pid).await?;
                self.start_dnsmasq(dnsmasq_bin, net, &paths, &args).await?;
                let why = if !current {
                    "configuration or namespace changed"
                } else if bridge_created {
                    "bridge re-created"
                } else {
                    "an address moved to another MAC"
                };
                repairs.push(format!("restarted dnsmasq for {name} ({why})"));
            }
            dnsmasq::Status::NotRunning { had_pid_file } => {
                self.start_dnsmasq(dnsmasq_bin, net, &paths, &args).await?;
                if had_pid_file || owned.networks.contains(name) {
                    repairs.push(format!("restarted dnsmasq for {name} (was not running)"));
                } else {
                    repairs.push(format!("started dnsmasq for {name}"));
                }
            }
        }
        Ok(())
    }

    async fn start_dnsmasq(
        &self,
        dnsmasq_bin: &Path,
        net: &Network,
        paths: &dnsmasq::Paths,
        args: &[String],
    ) -> Result<i32, NetworkError> {
        dnsmasq::start(
            &self.ip,
            dnsmasq_bin,
            self.netns.as_deref(),
            &net.name,
            paths,
            args,
        )
        .await
    }

    /// Opens a TCP connection to `ip:port` from inside the namespace (for `kumo vm port-forward`): the
    /// connect happens on a dedicated thread that enters the namespace; the socket is handed to tokio.
    pub async fn connect_tcp(
        &self,
        ip: IpAddr,
        port: u16,
    ) -> Result<tokio::net::TcpStream, NetworkError> {
        let addr = SocketAddr::new(ip, port);
        let Some(ns) = &self.netns else {
            return match tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(r) => r.map_err(|source| NetworkError::Connect { addr, source }),
                Err(_) => Err(NetworkError::Connect {
                    addr,
                    source: std::io::ErrorKind::TimedOut.into(),
                }),
            };
        };
        let ns_path = netns::path(ns);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("kumo-netns-connect".into())
            .spawn(move || {
                let _ = tx.send(netns::connect_in(&ns_path, addr));
            })
            .map_err(|source| NetworkError::Connect { addr, source })?;
        let stream = rx.await.map_err(|_| NetworkError::Connect {
            addr,
            source: std::io::Error::other("connect thread ended without an answer"),
        })??;
        tokio::net::TcpStream::from_std(stream)
            .map_err(|source| NetworkError::Connect { addr, source })
    }

    /// Removes everything kumo created: all its taps, bridges and dnsmasq processes, their files in the
    /// state directory, and the namespace if kumo created it.
    pub async fn teardown(&self) -> Result<(), NetworkError> {
        let _guard = self.lock.lock().await;
        let ledger = Ledger::load(&self.state_dir)?;
        let mut networks: Vec<String> = ledger.networks.iter().cloned().collect();
        networks.extend(dnsmasq::known_networks(&self.state_dir)?);
        networks.sort();
        networks.dedup();
        for name in &networks {
            dnsmasq::remove(&self.state_dir, name).await?;
        }
        let ns_present = self.netns.as_deref().is_none_or(netns::exists);
        if ns_present {
            let current = self.read_links().await?;
            let plan = links::plan(&current, &[], &ledger, false)?;
            self.ip_batch(&plan.batch).await?;
        }
        if let (Some(ns), true) = (&self.netns, ledger.netns_created) {
            netns::delete(&self.ip, ns).await?;
        }
        let dir = self.state_dir.join(dnsmasq::DIR);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(NetworkError::Io {
                    path: dir,
                    source: e,
                })
            }
        }
        let ledger_path = ledger::path(&self.state_dir);
        match std::fs::remove_file(&ledger_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(NetworkError::Io {
                    path: ledger_path,
                    source: e,
                })
            }
        }
        // The state directory itself goes only if nothing else lives there.
        let _ = std::fs::remove_dir(&self.state_dir);
        tracing::info!(netns = ?self.netns, "network teardown done");
        Ok(())
    }
}
