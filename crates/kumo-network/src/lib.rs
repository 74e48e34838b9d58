//! Host side of kumo VM networks. Per network on a host: a Linux bridge (pure L2) with one tap per VM port,
//! a VXLAN or VLAN uplink to the other hosts carrying the network, and a *router namespace* joined to the
//! bridge by a veth: it holds the gateway, runs the network's dnsmasq (static DHCP and DNS for the VMs of this
//! host only), serves the metadata address, and NATs elastic IPs through a veth on the public bridge. Each
//! network routes in its own namespace, so two projects may use the same CIDR on one host. nftables in the
//! host namespace keeps VMs to their own MAC/IP and applies security groups (firewall.rs).
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
mod fdb;
mod firewall;
mod ledger;
mod links;
mod names;
mod netns;
mod router;
mod spec;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub use error::NetworkError;
#[doc(hidden)]
pub use firewall::{render_for_test, Nft, HOST_TABLES, ROUTER_TABLES};
pub use names::{mac_for, tap_name, TAP_PREFIX};
pub use netns::bind_tcp_in_netns;
pub use spec::{
    GroupPolicy, Isolation, NetworkSpec, PortSpec, PublicNetwork, RulePolicy, METADATA_IP,
};

use serde::{Deserialize, Serialize};

use error::io_err;
use ledger::Ledger;
use spec::Network;

/// Prefix suggested for bridge names (kumo tracks what it created in the state directory, so any name works).
pub const BRIDGE_PREFIX: &str = "kb-";

/// Host facts that shape the rendered networks.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// Router namespaces are named this prefix + the network's key (12 chars); must be unique per machine
    /// across agents (test hosts share one machine).
    pub router_prefix: String,
    /// This host's VXLAN source address; without one, VXLAN networks stay host-local.
    pub tunnel_ip: Option<Ipv4Addr>,
    /// The 802.1Q trunk interface for VLAN networks.
    pub trunk: Option<String>,
    /// An existing bridge on the public network; elastic IPs need one.
    pub public_bridge: Option<String>,
}

/// Everything a host's networks must look like.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostDesired {
    pub networks: Vec<(NetworkSpec, Vec<PortSpec>)>,
    pub groups: Vec<GroupPolicy>,
    pub public: Option<PublicNetwork>,
}

/// The VM networks of one host (or one test-host namespace).
#[derive(Debug)]
pub struct HostNetwork {
    netns: Option<String>,
    state_dir: PathBuf,
    opts: HostOptions,
    ip: PathBuf,
    bridge_bin: PathBuf,
    nft: firewall::Nft,
    /// apply and teardown never overlap.
    lock: tokio::sync::Mutex<()>,
}

impl HostNetwork {
    /// `netns`: `None` = the current namespace; `Some(name)` = create the namespace if missing
    /// (`ip netns add`) and do everything inside it. `state_dir` holds dnsmasq configs, hosts files, pid
    /// files, logs and the record of what kumo created.
    pub async fn new(
        netns: Option<String>,
        state_dir: PathBuf,
        opts: HostOptions,
    ) -> Result<Self, NetworkError> {
        if let Some(ns) = &netns {
            netns::check_name(ns)?;
        }
        // Router namespaces are the prefix and a 12-char key: the whole name must be valid.
        netns::check_name(&format!("{}{}", opts.router_prefix, "x".repeat(12)))?;
        let ip = cmd::find_program("ip")?;
        let bridge_bin = cmd::find_program("bridge")?;
        let nft = firewall::Nft::new()?;
        std::fs::create_dir_all(state_dir.join(dnsmasq::DIR))
            .map_err(io_err(state_dir.join(dnsmasq::DIR)))?;
        let this = Self {
            netns,
            state_dir,
            opts,
            ip,
            bridge_bin,
            nft,
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

    /// The router namespace of a network (where its gateway, dnsmasq and metadata listener live).
    pub fn router_netns(&self, spec: &NetworkSpec) -> String {
        self.router_of(&spec.bridge)
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

    /// Make the host match `desired` exactly: per network its bridge, taps, uplink (with a flooding entry
    /// per peer), router namespace (gateway, metadata address, elastic IPs, NAT) and dnsmasq serving exactly
    /// these ports; the host firewall (anti-spoofing, security groups). What kumo created earlier and is no
    /// longer wanted is removed; nothing else is touched. Returns the changes made, in words (empty when the
    /// host already matched).
    pub async fn apply(&self, d: &HostDesired) -> Result<Vec<String>, NetworkError> {
        let public = self.opts.public_bridge.as_ref().and(d.public.as_ref());
        let mut desired = spec::validate(&d.networks)?;
        if public.is_none() {
            // A host without a public bridge cannot carry elastic IPs; its other networking must not
            // fail because of them.
            for port in desired.iter_mut().flat_map(|n| n.ports.iter_mut()) {
                if let Some(eip) = port.public_ip.take() {
                    tracing::warn!(tap = %port.tap, %eip, "elastic IP ignored: this host has no public bridge (kumo agent --public-bridge)");
                }
            }
        }
        firewall::check_policy(&desired, &d.groups, public)?;
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
        let routers: std::collections::HashMap<String, String> = desired
            .iter()
            .map(|n| (n.name.clone(), self.router_of(&n.bridge)))
            .collect();

        // Record intent first: a crash half-way still leaves every created thing on the record.
        let mut intent = owned.clone();
        for net in &desired {
            intent.bridges.insert(net.bridge.clone());
            intent.networks.insert(net.name.clone());
            intent.taps.extend(net.ports.iter().map(|p| p.tap.clone()));
            intent.ports.extend(self.ports_of(net));
        }
        intent.routers.extend(routers.values().cloned());
        if intent != owned {
            intent.save(&self.state_dir)?;
        }

        // dnsmasq and router namespaces of networks no longer wanted.
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
        let mut new_routers = std::collections::BTreeSet::new();
        for ns in routers.values() {
            if router::ensure(&self.ip, ns).await? {
                new_routers.insert(ns.clone());
                let verb = if owned.routers.contains(ns) {
                    "re-created"
                } else {
                    "created"
                };
                repairs.push(format!("{verb} router namespace {ns}"));
            }
        }

        let wiring = links::Wiring {
            tunnel: self.opts.tunnel_ip,
            trunk: self.opts.trunk.clone(),
            public_bridge: self.opts.public_bridge.clone(),
            routers: routers.clone(),
            fresh_routers: new_routers.clone(),
        };
        let current = self.read_links().await?;
        let plan = links::plan(&current, &desired, &owned, self.netns.is_some(), &wiring)?;
        // A veth end left in an existing router (its host end vanished first) would make the add fail.
        for (ns, inside) in &plan.stale_router_ends {
            router::remove_link(&self.ip, ns, inside).await?;
        }
        self.ip_batch(&plan.batch).await?;
        repairs.extend(plan.repairs);

        // Routers go after their host-side veths: the kernel removes a dead namespace's veths
        // asynchronously, and a batch naming one that is vanishing fails.
        let wanted_routers: std::collections::BTreeSet<&String> = routers.values().collect();
        for ns in &owned.routers {
            if !wanted_routers.contains(ns) && netns::exists(ns) {
                netns::delete(&self.ip, ns).await?;
                repairs.push(format!("removed router namespace {ns}"));
            }
        }

        for net in &desired {
            if let (Some((dev, _)), Isolation::Vxlan { .. }) = (wiring.uplink(net), net.isolation) {
                repairs.extend(
                    fdb::apply(&self.bridge_bin, self.netns.as_deref(), &dev, &net.peers).await?,
                );
            }
            let ns = &routers[&net.name];
            repairs.extend(router::apply(&self.ip, ns, net, public).await?);
        }

        if !desired.is_empty() {
            let dnsmasq_bin = cmd::find_program("dnsmasq")?;
            for net in &desired {
                let ns = &routers[&net.name];
                let fresh =
                    new_routers.contains(ns) || plan.created_veths.contains(&net.router_port());
                self.reconcile_dnsmasq(&dnsmasq_bin, ns, net, fresh, &owned, &mut repairs)
                    .await?;
            }
        }

        repairs.extend(self.apply_firewall(&desired, d, &routers).await?);

        let done = Ledger {
            netns_created: intent.netns_created,
            bridges: desired.iter().map(|n| n.bridge.clone()).collect(),
            taps: desired
                .iter()
                .flat_map(|n| n.ports.iter().map(|p| p.tap.clone()))
                .collect(),
            networks: desired.iter().map(|n| n.name.clone()).collect(),
            ports: desired.iter().flat_map(|n| self.ports_of(n)).collect(),
            routers: routers.values().cloned().collect(),
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

    fn router_of(&self, bridge: &str) -> String {
        format!("{}{}", self.opts.router_prefix, names::network_key(bridge))
    }

    /// Host-side devices of a network besides its bridge and taps.
    fn ports_of(&self, net: &Network) -> Vec<String> {
        let mut v = vec![net.router_port()];
        if let Some(u) = net.uplink() {
            v.push(u);
        }
        if self.opts.public_bridge.is_some() {
            v.push(net.public_port());
        }
        v
    }

    /// Removes the host firewall tables and every record of applied rulesets (teardown).
    async fn remove_firewall(&self) -> Result<(), NetworkError> {
        self.nft
            .delete(self.netns.as_deref(), firewall::HOST_TABLES)
            .await?;
        for f in self.nft_records()? {
            std::fs::remove_file(&f).map_err(io_err(&f))?;
        }
        Ok(())
    }

    fn nft_record(&self, what: &str) -> PathBuf {
        self.state_dir.join(format!("nft-{what}.json"))
    }

    fn nft_records(&self) -> Result<Vec<PathBuf>, NetworkError> {
        let rd = match std::fs::read_dir(&self.state_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err(&self.state_dir)(e)),
        };
        Ok(rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nft-") && n.ends_with(".json"))
            })
            .collect())
    }

    /// The host firewall and every router's NAT table, each applied whole and only when it differs.
    async fn apply_firewall(
        &self,
        desired: &[Network],
        d: &HostDesired,
        routers: &std::collections::HashMap<String, String>,
    ) -> Result<Vec<String>, NetworkError> {
        let mut out = Vec::new();
        let host = firewall::render_host(desired, &d.groups);
        let record = self.nft_record("host");
        let netns = self.netns.as_deref();
        if let Some(r) = self
            .nft
            .ensure(netns, firewall::HOST_TABLES, &host, &record)
            .await?
        {
            out.push(r);
        }
        let public = self.opts.public_bridge.as_ref().and(d.public.as_ref());
        let mut keep = vec![record];
        for net in desired {
            let ns = &routers[&net.name];
            let text = firewall::render_router(net, public);
            let record = self.nft_record(&format!("router-{}", net.name));
            if let Some(r) = self
                .nft
                .ensure(Some(ns), firewall::ROUTER_TABLES, &text, &record)
                .await?
            {
                out.push(format!("{ns}: {r}"));
            }
            keep.push(record);
        }
        // Records of routers that are gone.
        for f in self.nft_records()? {
            if !keep.contains(&f) {
                std::fs::remove_file(&f).map_err(io_err(&f))?;
            }
        }
        Ok(out)
    }

    async fn reconcile_dnsmasq(
        &self,
        dnsmasq_bin: &Path,
        router_ns: &str,
        net: &Network,
        bridge_created: bool,
        owned: &Ledger,
        repairs: &mut Vec<String>,
    ) -> Result<(), NetworkError> {
        let ns_inode = netns::inode(Some(router_ns))?;
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
                self.start_dnsmasq(dnsmasq_bin, router_ns, net, &paths, &args)
                    .await?;
                let why = if !current {
                    "configuration or namespace changed"
                } else if bridge_created {
                    "router re-created"
                } else {
                    "an address moved to another MAC"
                };
                repairs.push(format!("restarted dnsmasq for {name} ({why})"));
            }
            dnsmasq::Status::NotRunning { had_pid_file } => {
                self.start_dnsmasq(dnsmasq_bin, router_ns, net, &paths, &args)
                    .await?;
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
        router_ns: &str,
        net: &Network,
        paths: &dnsmasq::Paths,
        args: &[String],
    ) -> Result<i32, NetworkError> {
        dnsmasq::start(
            &self.ip,
            dnsmasq_bin,
            Some(router_ns),
            &net.name,
            paths,
            args,
        )
        .await
    }

    /// Opens a TCP connection to `ip:port` from inside a network's router namespace (for `kumo vm
    /// port-forward`): the connect happens on a dedicated thread that enters the namespace; the socket is
    /// handed to tokio.
    pub async fn connect_tcp(
        &self,
        router_ns: &str,
        ip: IpAddr,
        port: u16,
    ) -> Result<tokio::net::TcpStream, NetworkError> {
        let addr = SocketAddr::new(ip, port);
        let ns = router_ns;
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
            let plan = links::plan(&current, &[], &ledger, false, &links::Wiring::default())?;
            self.ip_batch(&plan.batch).await?;
            self.remove_firewall().await?;
        }
        // After the veths (see apply).
        for ns in &ledger.routers {
            netns::delete(&self.ip, ns).await?;
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
