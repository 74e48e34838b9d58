//! A test cluster of real hosts on one machine: each host is a network namespace running a
//! `kumo agent`, joined to a management bridge in the root namespace where the controller
//! (`kumo server`) listens. Agents run *inside* their namespace, so each host's VM bridge, taps,
//! dnsmasq and QEMU processes live there too, as on separate machines.
//!
//! Cluster X (0..=255) owns: bridge `kcbX` with 10.252.X.1/24, namespaces `kcX-<host>`, veth
//! `kcvXh<i>` (root end) / `mgmt0` (host end, 10.252.X.(10+i)/24) and `/run/kumo-clusters/X`.
//! Hosts have no default route: they reach only 10.252.X.0/24. Nothing is NATed or forwarded
//! towards the machine's uplink.
//!
//! Teardown happens on [`Cluster::teardown`], on drop, and, if the owner was killed, in the next
//! [`Cluster::start`] or `kumo dev cluster down` ([`sweep_stale`]).

mod processes;
mod public;
mod registry;
mod sys;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kumo_cli::{Client, ClientConfig};

pub use processes::qemu_processes_in;
pub use registry::{bridge_name, netns_name, public_bridge_name, veth_name, REGISTRY};

/// The public network of every test cluster (documentation range: never routed anywhere).
pub const PUBLIC_CIDR: &str = "203.0.113.0/24";
/// The outside namespace's address on the public network (also the public network's gateway).
pub const OUTSIDE_IP: &str = "203.0.113.1";
/// The bridge on the public network inside every test host.
pub const HOST_PUBLIC_BRIDGE: &str = "pub0";

/// The port every agent listens on (each host has its own address).
pub const AGENT_PORT: u16 = 8781;

/// Longest host name: namespace names and log file names stay short and readable.
const MAX_HOST_NAME: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad cluster spec: {0}")]
    Spec(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error(
        "all 256 cluster ids in {REGISTRY} are taken; `kumo dev cluster down` removes stale ones"
    )]
    NoFreeId,
    #[error("the controller did not start: {0}")]
    Controller(String),
    #[error("host {host}: {message}")]
    Host { host: String, message: String },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error(transparent)]
    Client(#[from] kumo_cli::ClientError),
    #[error("teardown left behind: {}", .0.join("; "))]
    Teardown(Vec<String>),
}

impl ClusterError {
    fn io(what: impl Into<String>, source: std::io::Error) -> ClusterError {
        ClusterError::Io {
            what: what.into(),
            source,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypervisor {
    Qemu,
    Sim,
}

impl Hypervisor {
    fn arg(self) -> &'static str {
        match self {
            Hypervisor::Qemu => "qemu",
            Hypervisor::Sim => "sim",
        }
    }
}

#[derive(Clone, Debug)]
pub struct HostSpec {
    pub name: String,
    pub hypervisor: Hypervisor,
    pub labels: Vec<(String, String)>,
    pub site: Option<String>,
    /// `--capacity VCPUS:MIB`.
    pub capacity: Option<(u32, u64)>,
    pub storage_pool: Option<String>,
    /// Appended to the agent's command line.
    pub extra_args: Vec<String>,
}

impl HostSpec {
    /// A QEMU host with no labels and the machine's own size.
    pub fn qemu(name: &str) -> HostSpec {
        HostSpec {
            name: name.into(),
            hypervisor: Hypervisor::Qemu,
            labels: vec![],
            site: None,
            capacity: None,
            storage_pool: None,
            extra_args: vec![],
        }
    }

    pub fn sim(name: &str) -> HostSpec {
        HostSpec {
            hypervisor: Hypervisor::Sim,
            ..HostSpec::qemu(name)
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> HostSpec {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn capacity(mut self, vcpus: u32, memory_mib: u64) -> HostSpec {
        self.capacity = Some((vcpus, memory_mib));
        self
    }
}

#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The `kumo` binary for the controller and the agents.
    pub kumo_bin: PathBuf,
    /// Data and logs (`server.log`, `<host>.log`). Created if missing; removed on teardown
    /// unless `keep_dir` or the environment variable `KUMO_TEST_KEEP` is set.
    pub dir: PathBuf,
    pub hosts: Vec<HostSpec>,
    pub heartbeat_timeout_secs: u64,
    pub keep_dir: bool,
}

/// One host of a running cluster.
#[derive(Clone, Debug)]
pub struct ClusterHost {
    pub name: String,
    /// Its network namespace, `kc<X>-<name>`.
    pub netns: String,
    /// Its address on the management network, 10.252.X.(10+i).
    pub mgmt_ip: String,
    /// The root-namespace end of its management veth.
    pub veth: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// A QEMU process seen in a host's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuProcess {
    pub pid: u32,
    pub instance_id: String,
}

pub struct Cluster {
    id: u8,
    reg_dir: PathBuf,
    /// Held for the cluster's life: a sweep treats the cluster as alive while it is locked.
    lock: Option<File>,
    record: registry::Record,
    spec: ClusterSpec,
    endpoint: String,
    access_key_id: String,
    secret: String,
    join_token: String,
    client: Client,
    controller: Option<Child>,
    hosts: Vec<ClusterHost>,
    agents: Vec<Option<Child>>,
    torn_down: bool,
}

/// Tear down every cluster in /run/kumo-clusters whose owner process is gone (every cluster
/// with `all`). Returns one line per cluster removed.
pub fn sweep_stale(all: bool) -> Vec<String> {
    registry::sweep(all)
}

fn log_file(path: &Path) -> Result<(Stdio, Stdio), ClusterError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| ClusterError::io(format!("opening {}", path.display()), e))?;
    let g = f
        .try_clone()
        .map_err(|e| ClusterError::io(format!("opening {}", path.display()), e))?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

fn valid_host_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_HOST_NAME
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        // The outside namespace is named like a host called "outside".
        && n != "outside"
}

impl Cluster {
    /// Build the cluster and wait until every host is registered and `up`. On error, whatever
    /// was built is torn down again.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster, ClusterError> {
        if !sys::is_root() {
            return Err(ClusterError::Spec(
                "a cluster needs root (network namespaces, bridges, veths)".into(),
            ));
        }
        if spec.hosts.is_empty() || spec.hosts.len() > 200 {
            return Err(ClusterError::Spec("between 1 and 200 hosts".into()));
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            if !valid_host_name(&h.name) {
                return Err(ClusterError::Spec(format!(
                    "host name {:?}: use 1-{MAX_HOST_NAME} of a-z, 0-9 and - (not \"outside\")",
                    h.name
                )));
            }
            if spec.hosts[..i].iter().any(|o| o.name == h.name) {
                return Err(ClusterError::Spec(format!("host {} twice", h.name)));
            }
        }
        if !spec.kumo_bin.is_file() {
            return Err(ClusterError::Spec(format!(
                "no kumo binary at {}",
                spec.kumo_bin.display()
            )));
        }
        // Absolute, so that agents and sweeps do not depend on the working directory.
        let mut spec = spec;
        std::fs::create_dir_all(&spec.dir)
            .map_err(|e| ClusterError::io(format!("creating {}", spec.dir.display()), e))?;
        spec.dir = spec
            .dir
            .canonicalize()
            .map_err(|e| ClusterError::io(format!("resolving {}", spec.dir.display()), e))?;
        for line in sweep_stale(false) {
            tracing::info!("removed a stale test cluster: {line}");
        }
        // Replaced by a signed client once the controller has written its credentials.
        let client = Client::new(ClientConfig {
            endpoint: String::new(),
            region: "kumo".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
        })?;
        let slot = registry::allocate()?;
        let id = slot.id;
        let mut c = Cluster {
            id,
            reg_dir: slot.dir,
            lock: Some(slot.lock),
            record: registry::Record::default(),
            endpoint: String::new(),
            access_key_id: String::new(),
            secret: String::new(),
            join_token: String::new(),
            client,
            controller: None,
            hosts: spec
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| ClusterHost {
                    name: h.name.clone(),
                    netns: netns_name(id, &h.name),
                    mgmt_ip: format!("10.252.{id}.{}", 10 + i),
                    veth: veth_name(id, i),
                    data_dir: spec.dir.join(&h.name),
                    log: spec.dir.join(format!("{}.log", h.name)),
                })
                .collect(),
            agents: spec.hosts.iter().map(|_| None).collect(),
            spec,
            torn_down: false,
        };
        // From here on, an early return drops `c`, and Drop tears down what exists.
        c.build().await?;
        Ok(c)
    }

    async fn build(&mut self) -> Result<(), ClusterError> {
        let dir = self.spec.dir.clone();
        std::fs::write(dir.join(registry::DIR_MARKER), format!("{}\n", self.id))
            .map_err(|e| ClusterError::io("marking the data dir", e))?;
        self.record.data_dir = Some(dir.clone());
        self.record.remove_dir = (!self.keeps_dir()).then(|| dir.clone());
        registry::write_record(&self.reg_dir, &self.record)?;

        // Leftovers under this id can only be from a teardown that failed half-way: the id is
        // ours now, so they are ours to remove.
        let _ = registry::remove_network(self.id);
        let br = bridge_name(self.id);
        sys::ip(&["link", "add", &br, "type", "bridge"])?;
        sys::ip(&[
            "addr",
            "add",
            &format!("10.252.{}.1/24", self.id),
            "dev",
            &br,
        ])?;
        sys::ip(&["link", "set", &br, "up"])?;
        for h in self.hosts.clone() {
            sys::ip(&["netns", "add", &h.netns])?;
            // Create the peer directly inside the namespace under its final name: no
            // temporary name in the root namespace to clash with another cluster.
            sys::ip(&[
                "link", "add", &h.veth, "type", "veth", "peer", "name", "mgmt0", "netns", &h.netns,
            ])?;
            sys::ip(&["link", "set", &h.veth, "master", &br, "up"])?;
            sys::ip(&[
                "-n",
                &h.netns,
                "addr",
                "add",
                &format!("{}/24", h.mgmt_ip),
                "dev",
                "mgmt0",
            ])?;
            sys::ip(&["-n", &h.netns, "link", "set", "mgmt0", "up"])?;
            sys::ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
        }
        self.build_public_network()?;
        self.start_controller().await?;
        for i in 0..self.hosts.len() {
            self.start_agent(i)?;
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        for i in 0..self.hosts.len() {
            let name = self.hosts[i].name.clone();
            self.wait_host(&name, "up", deadline).await?;
        }
        Ok(())
    }

    fn keeps_dir(&self) -> bool {
        self.spec.keep_dir || std::env::var_os("KUMO_TEST_KEEP").is_some()
    }

    async fn start_controller(&mut self) -> Result<(), ClusterError> {
        self.start_controller_on(None).await
    }

    /// Kill the controller (SIGKILL, as in a crash). Agents and VMs keep running.
    pub fn kill_controller(&mut self) {
        self.stop_controller();
    }

    /// Start the controller again on the same address, with the same store.
    pub async fn restart_controller(&mut self) -> Result<(), ClusterError> {
        self.stop_controller();
        let port = self
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok());
        self.start_controller_on(port).await
    }

    async fn start_controller_on(&mut self, fixed: Option<u16>) -> Result<(), ClusterError> {
        let ip = format!("10.252.{}.1", self.id);
        let boot = self.spec.dir.join("bootstrap.json");
        let log = self.spec.dir.join("server.log");
        // A port that was free a moment ago can be taken before the server binds it: retry.
        let mut last = String::new();
        for _ in 0..3 {
            let port = match fixed {
                Some(p) => p,
                None => std::net::TcpListener::bind((ip.as_str(), 0))
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .map_err(|e| ClusterError::io(format!("finding a free port on {ip}"), e))?,
            };
            let (out, err) = log_file(&log)?;
            let mut cmd = Command::new(&self.spec.kumo_bin);
            cmd.args(["server", "--listen", &format!("{ip}:{port}")])
                .arg("--data-dir")
                .arg(self.spec.dir.join("server"))
                .arg("--bootstrap-file")
                .arg(&boot)
                .args([
                    "--heartbeat-timeout",
                    &self.spec.heartbeat_timeout_secs.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            if std::env::var_os("KUMO_LOG").is_none() {
                cmd.env("KUMO_LOG", "info,kumo=debug");
            }
            sys::die_with_parent(&mut cmd);
            let child = cmd
                .spawn()
                .map_err(|e| ClusterError::io("starting kumo server", e))?;
            self.record.controller_pid = Some(child.id());
            self.controller = Some(child);
            registry::write_record(&self.reg_dir, &self.record)?;
            self.endpoint = format!("http://{ip}:{port}");
            match self.wait_controller(&boot).await {
                Ok(()) => return Ok(()),
                Err(ClusterError::Controller(m)) => {
                    last = m;
                    self.stop_controller();
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClusterError::Controller(format!(
            "{last}\n--- {}:\n{}",
            log.display(),
            sys::tail(&log, 20)
        )))
    }

    /// Until the bootstrap file is there and the API answers a signed request.
    async fn wait_controller(&mut self, boot: &Path) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.controller.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(ClusterError::Controller(format!(
                        "kumo server exited ({status})"
                    )));
                }
            }
            if self.access_key_id.is_empty() {
                if let Ok(bytes) = std::fs::read(boot) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                        self.access_key_id = s("access_key_id");
                        self.secret = s("secret_access_key");
                        self.join_token = s("join_token");
                    }
                }
            }
            if !self.access_key_id.is_empty() {
                let client = Client::new(ClientConfig {
                    endpoint: self.endpoint.clone(),
                    region: "kumo".into(),
                    access_key_id: self.access_key_id.clone(),
                    secret_access_key: self.secret.clone(),
                })?;
                if client.whoami().await.is_ok() {
                    self.client = client;
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Controller(
                    "no bootstrap file or no answer within 60 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn wait_host(
        &mut self,
        name: &str,
        state: &str,
        deadline: Instant,
    ) -> Result<(), ClusterError> {
        let i = self.hosts.iter().position(|h| h.name == name);
        loop {
            if let Some(i) = i {
                if let Some(Ok(Some(status))) = self.agents[i].as_mut().map(|c| c.try_wait()) {
                    let log = &self.hosts[i].log;
                    return Err(ClusterError::Host {
                        host: name.into(),
                        message: format!(
                            "kumo agent exited ({status})\n--- {}:\n{}",
                            log.display(),
                            sys::tail(log, 20)
                        ),
                    });
                }
            }
            let hosts = self.client().hosts().await.unwrap_or_default();
            if hosts.iter().any(|h| h.name == name && h.state == state) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let seen = hosts
                    .iter()
                    .find(|h| h.name == name)
                    .map(|h| h.state.clone())
                    .unwrap_or_else(|| "not registered".into());
                let log = i
                    .map(|i| {
                        let log = &self.hosts[i].log;
                        format!("\n--- {}:\n{}", log.display(), sys::tail(log, 15))
                    })
                    .unwrap_or_default();
                return Err(ClusterError::Timeout(format!(
                    "host {name} is {seen}, wanted {state}{log}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Poll the API until host `name` is in `state` (e.g. `down` after its agent stopped).
    pub async fn wait_host_state(
        &mut self,
        name: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        self.wait_host(name, state, Instant::now() + timeout).await
    }

    /// The cluster id X (bridge `kcbX`, namespaces `kcX-*`, 10.252.X.0/24).
    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn bridge(&self) -> String {
        bridge_name(self.id)
    }

    /// The data and log directory.
    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    /// The controller's URL, `http://10.252.X.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A client signed with the admin credentials.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The CLI configuration for this cluster (`ClientConfig::save` writes it).
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            endpoint: self.endpoint.clone(),
            region: "kumo".into(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret.clone(),
        }
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret
    }

    pub fn join_token(&self) -> &str {
        &self.join_token
    }

    pub fn hosts(&self) -> &[ClusterHost] {
        &self.hosts
    }

    /// The index of host `name`.
    pub fn host_index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    /// Start host `i`'s agent (again): it re-attaches to the VMs that kept running.
    pub fn start_agent(&mut self, i: usize) -> Result<(), ClusterError> {
        self.stop_agent(i);
        let h = &self.hosts[i];
        let hs = &self.spec.hosts[i];
        let (out, err) = log_file(&h.log)?;
        // Only the network namespace is entered (not `ip netns exec`, which also gives the process a
        // mount namespace of its own): the router namespaces the agent creates with `ip netns add` must
        // be visible to everyone else on the machine (tests, sweeps).
        let ns_path = format!("/run/netns/{}", h.netns);
        let ns_file = std::fs::File::open(&ns_path).map_err(|e| ClusterError::Host {
            host: h.name.clone(),
            message: format!("opening {ns_path}: {e}"),
        })?;
        let mut cmd = Command::new(&self.spec.kumo_bin);
        sys::enter_netns(&mut cmd, &ns_file);
        cmd.args([
            "agent",
            "--controller",
            &self.endpoint,
            "--join-token",
            &self.join_token,
            "--name",
            &h.name,
            "--listen",
            &format!("{}:{AGENT_PORT}", h.mgmt_ip),
        ])
        .arg("--data-dir")
        .arg(&h.data_dir)
        .args([
            "--hypervisor",
            hs.hypervisor.arg(),
            "--accel",
            "tcg",
            "--heartbeat-interval",
            "1",
            "--stop-timeout",
            "10",
            "--network-interval",
            "2",
            "--tunnel-ip",
            &h.mgmt_ip,
            "--trunk",
            "mgmt0",
            "--public-bridge",
            HOST_PUBLIC_BRIDGE,
            "--router-netns-prefix",
            &format!("{}-r-", h.netns),
        ]);
        for (k, v) in &hs.labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        if let Some(s) = &hs.site {
            cmd.args(["--site", s]);
        }
        if let Some((c, m)) = hs.capacity {
            cmd.args(["--capacity", &format!("{c}:{m}")]);
        }
        if let Some(p) = &hs.storage_pool {
            // A shared pool: one directory of the cluster that every host naming it uses.
            let dir = h
                .data_dir
                .parent()
                .unwrap_or(&h.data_dir)
                .join("pools")
                .join(p);
            cmd.args(["--storage-pool", p]).arg("--pool-path").arg(dir);
        }
        cmd.args(&hs.extra_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::var_os("KUMO_LOG").is_none() {
            cmd.env("KUMO_LOG", "info,kumo=debug");
        }
        sys::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| ClusterError::Host {
            host: h.name.clone(),
            message: format!("starting its agent: {e}"),
        })?;
        drop(ns_file);
        self.agents[i] = Some(child);
        Ok(())
    }

    /// Stop host `i`'s agent (SIGINT, then SIGKILL after 10 s). Its VMs keep running.
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            sys::signal(c.id(), libc::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL host `i`'s agent, as in a crash. Its VMs keep running.
    pub fn crash_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The whole host dies: its agent and every process in its namespace (QEMU) and in its
    /// router namespaces (dnsmasq). The namespaces stay, so `start_agent` brings the host back
    /// empty of processes, as after a reboot.
    pub fn kill_host(&mut self, i: usize) {
        self.crash_agent(i);
        let ns = self.hosts[i].netns.clone();
        sys::kill_netns_processes(&ns, Duration::from_secs(10));
        let routers = format!("{ns}-r-");
        for r in sys::netns_names()
            .into_iter()
            .filter(|n| n.starts_with(&routers))
        {
            sys::kill_netns_processes(&r, Duration::from_secs(10));
        }
    }

    /// Cut host `i` off the management network (its veth's root end down).
    pub fn cut_mgmt(&self, i: usize) -> Result<(), ClusterError> {
        sys::ip(&["link", "set", &self.hosts[i].veth, "down"])
    }

    pub fn restore_mgmt(&self, i: usize) -> Result<(), ClusterError> {
        sys::ip(&["link", "set", &self.hosts[i].veth, "up"])
    }

    /// Run a command inside host `i`'s namespace.
    pub fn exec_in(&self, i: usize, args: &[&str]) -> Output {
        Command::new(sys::ip_bin())
            .args(["netns", "exec", &self.hosts[i].netns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(sys::failed_output)
    }

    fn teardown_now(&mut self) -> Result<(), ClusterError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        // Our own children first, so they are reaped rather than left as zombies.
        for i in 0..self.agents.len() {
            self.crash_agent(i);
        }
        self.stop_controller();
        let keep = self.keeps_dir();
        let problems = registry::remove_cluster(self.id, &self.reg_dir);
        // Releasing the lock last: until here a sweep would see the cluster as alive.
        self.lock = None;
        if keep {
            eprintln!(
                "kumo test cluster {}: kept {}",
                self.id,
                self.spec.dir.display()
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Teardown(problems))
        }
    }

    /// Stop everything and remove every trace of the cluster (the data dir too, unless kept).
    pub async fn teardown(&mut self) -> Result<(), ClusterError> {
        self.teardown_now()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_now() {
            eprintln!("kumo test cluster {}: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests;
