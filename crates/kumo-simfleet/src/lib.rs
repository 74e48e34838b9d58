//! Thousands of simulated hosts in one process, joined to a real controller.
//!
//! Every host registers with the join token and heartbeats like a real `kumo agent`, but
//! they all share one HTTP listener: host `h` advertises `http://<listener>/h/<h>`, so the
//! controller's calls arrive as `/h/<h>/agent/v1/vms/<id>`. A simulated host answers a desired
//! spec at once with the state it asks for; nothing runs. This measures the controller.
//!
//! Per host the fleet keeps its identity, its info and a small map of VM states, so 10,000
//! hosts with 100,000 VMs fit in a few tens of MiB.

mod heartbeat;
mod http;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use kumo_types::agent::{HostInfo, ObservedPower, RegisterRequest, RegisterResponse};
use tokio::task::JoinHandle;

/// Hosts registering at the same time; the controller serialises them on its store anyway.
const REGISTER_CONCURRENCY: usize = 64;
/// Heartbeats in flight at once (and idle connections kept to the controller).
const HEARTBEAT_CONCURRENCY: usize = 64;
/// How long registration keeps retrying while the controller is unreachable (still starting).
const REGISTER_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The controller's URL, e.g. `http://127.0.0.1:8780`.
    pub controller: String,
    pub join_token: String,
    pub count: usize,
    /// Host `i` is named `<name_prefix>-<i>` (zero-padded, from 0).
    pub name_prefix: String,
    /// Host `i` joins `sites[i % sites.len()]`.
    pub sites: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub labels: BTreeMap<String, String>,
    /// Hosts share storage pools in groups of this many (`pool-<k>`); `None`: each host
    /// has its own local pool.
    pub storage_pool_every: Option<usize>,
    /// Every host heartbeats once per interval; the beats are spread evenly over it.
    pub heartbeat_interval: Duration,
    /// Where the shared agent listener binds; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("bad fleet configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("host {host}: cannot reach the controller at {url}")]
    Unreachable {
        host: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("host {host}: the controller refused the registration (HTTP {status}): {body}")]
    Refused {
        host: String,
        status: u16,
        body: String,
    },
    #[error("host {host}: unexpected registration response")]
    BadResponse {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no simulated host is named {0}")]
    NoSuchHost(String),
    #[error("cannot read or raise the open-file limit")]
    Rlimit(#[source] std::io::Error),
}

/// What a simulated host holds for one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct SimVm {
    pub id: String,
    pub generation: i64,
    pub power: ObservedPower,
    pub reboot_seq: i64,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Counters since the fleet started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetStats {
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    pub puts: u64,
    pub deletes: u64,
}

/// A VM's state without its id (the id is the map key): kept small, there are many.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmState {
    pub generation: i64,
    pub power: ObservedPower,
    pub reboot_seq: i64,
    pub vcpus: u32,
    pub memory_mib: u64,
}

pub(crate) struct Identity {
    pub host_id: String,
    /// The whole `Authorization` header value the controller must send.
    pub bearer: String,
    /// `<host-id>:<secret>` for this host's own calls to the controller.
    pub credential: String,
}

pub(crate) struct SimHost {
    pub name: String,
    pub site: String,
    pub address: String,
    pub info: HostInfo,
    /// Set once registration answers; until then the host neither heartbeats nor answers.
    pub ident: OnceLock<Identity>,
    pub stopped: AtomicBool,
    pub vms: Mutex<HashMap<Box<str>, VmState>>,
}

impl SimHost {
    pub fn vms(&self) -> MutexGuard<'_, HashMap<Box<str>, VmState>> {
        // Nothing panics while holding the lock; a poisoned map is still consistent.
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub heartbeats_ok: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
}

pub(crate) struct Inner {
    pub hosts: Vec<SimHost>,
    pub by_name: HashMap<String, usize>,
    pub controller: String,
    pub http: reqwest::Client,
    pub heartbeat_interval: Duration,
    /// Set by `shutdown`: every host stops answering.
    pub closed: AtomicBool,
    pub counters: Counters,
}

impl Inner {
    pub fn host(&self, name: &str) -> Option<&SimHost> {
        self.by_name.get(name).map(|&i| &self.hosts[i])
    }
}

pub struct Fleet {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Bind the shared listener, register every host (bounded concurrency) and start
    /// heartbeating. Returns once all hosts are registered.
    pub async fn start(cfg: FleetConfig) -> Result<Fleet, FleetError> {
        if cfg.sites.is_empty() {
            return Err(FleetError::Config("at least one site is needed".into()));
        }
        if cfg.heartbeat_interval.is_zero() {
            return Err(FleetError::Config(
                "the heartbeat interval must be positive".into(),
            ));
        }
        if cfg.storage_pool_every == Some(0) {
            return Err(FleetError::Config(
                "storage pools group at least one host".into(),
            ));
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| FleetError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let mut addr = listener.local_addr().map_err(|source| FleetError::Bind {
            addr: cfg.listen,
            source,
        })?;
        if addr.ip().is_unspecified() {
            // Bound to every interface: loopback is one of them and the controller is local.
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(HEARTBEAT_CONCURRENCY)
            .build()
            .map_err(FleetError::Client)?;

        let width = cfg.count.saturating_sub(1).to_string().len().max(4);
        let mut hosts = Vec::with_capacity(cfg.count);
        let mut by_name = HashMap::with_capacity(cfg.count);
        for i in 0..cfg.count {
            let name = format!("{}-{i:0width$}", cfg.name_prefix);
            let storage_pool = cfg
                .storage_pool_every
                .map(|n| format!("pool-{}", i / n))
                .unwrap_or_default();
            by_name.insert(name.clone(), i);
            hosts.push(SimHost {
                address: format!("http://{addr}/h/{name}"),
                site: cfg.sites[i % cfg.sites.len()].clone(),
                name,
                info: HostInfo {
                    vcpus: cfg.vcpus,
                    memory_mib: cfg.memory_mib,
                    hypervisor: "sim".into(),
                    accel: "tcg".into(),
                    qemu_version: "sim".into(),
                    labels: cfg.labels.clone(),
                    storage_pool,
                    // Not reported: the scheduler then does not limit disk.
                    disk_gib: 0,
                    tunnel_ip: String::new(),
                    pool: None,
                },
                ident: OnceLock::new(),
                stopped: AtomicBool::new(false),
                vms: Mutex::new(HashMap::new()),
            });
        }
        let inner = Arc::new(Inner {
            hosts,
            by_name,
            controller: cfg.controller.trim_end_matches('/').to_string(),
            http,
            heartbeat_interval: cfg.heartbeat_interval,
            closed: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let app = http::router(inner.clone());
        let mut graceful = stop_rx.clone();
        let server = tokio::spawn(async move {
            let stopped = async move {
                let _ = graceful.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(error = %e, "simulated fleet listener stopped");
            }
        });
        // Heartbeats start before registration ends: early hosts must not go stale while
        // thousands of others are still joining. Unregistered hosts are skipped.
        let beats = tokio::spawn(heartbeat::run(inner.clone(), stop_rx));
        // From here on, dropping `fleet` (also on an error) stops the tasks.
        let fleet = Fleet {
            inner,
            addr,
            stop_tx,
            tasks: vec![server, beats],
        };
        fleet.register_all(&cfg.join_token).await?;
        Ok(fleet)
    }

    async fn register_all(&self, join_token: &str) -> Result<(), FleetError> {
        let inner = &self.inner;
        let mut results = futures::stream::iter(inner.hosts.iter())
            .map(|h| register(inner, h, join_token))
            .buffer_unordered(REGISTER_CONCURRENCY);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }

    /// The shared listener every simulated host is reached on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `(name, host id)` of every registered host, in name order.
    pub fn hosts(&self) -> Vec<(String, String)> {
        self.inner
            .hosts
            .iter()
            .filter_map(|h| h.ident.get().map(|i| (h.name.clone(), i.host_id.clone())))
            .collect()
    }

    /// VMs on all hosts, stopped hosts included.
    pub fn vm_count(&self) -> usize {
        self.inner.hosts.iter().map(|h| h.vms().len()).sum()
    }

    /// The VMs a host holds, by id; empty for an unknown host.
    pub fn vms_on(&self, name: &str) -> Vec<SimVm> {
        let Some(h) = self.inner.host(name) else {
            return vec![];
        };
        let mut out: Vec<SimVm> = h
            .vms()
            .iter()
            .map(|(id, v)| SimVm {
                id: id.to_string(),
                generation: v.generation,
                power: v.power,
                reboot_seq: v.reboot_seq,
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Simulate a dead host: it stops heartbeating, and calls to it fail (503) until
    /// [`Fleet::resume_host`]. Its VMs are kept, as a real agent's ledger keeps them.
    pub fn stop_host(&self, name: &str) -> Result<(), FleetError> {
        self.set_stopped(name, true)
    }

    /// Bring a stopped host back: it heartbeats and answers again.
    pub fn resume_host(&self, name: &str) -> Result<(), FleetError> {
        self.set_stopped(name, false)
    }

    fn set_stopped(&self, name: &str, stopped: bool) -> Result<(), FleetError> {
        let h = self
            .inner
            .host(name)
            .ok_or_else(|| FleetError::NoSuchHost(name.to_string()))?;
        h.stopped.store(stopped, Ordering::SeqCst);
        Ok(())
    }

    pub fn stats(&self) -> FleetStats {
        let c = &self.inner.counters;
        FleetStats {
            heartbeats_ok: c.heartbeats_ok.load(Ordering::Relaxed),
            heartbeats_failed: c.heartbeats_failed.load(Ordering::Relaxed),
            puts: c.puts.load(Ordering::Relaxed),
            deletes: c.deletes.load(Ordering::Relaxed),
        }
    }

    /// Stop heartbeating and answering; closes the listener and its connections.
    pub async fn shutdown(mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
        for t in std::mem::take(&mut self.tasks) {
            // Graceful close waits for open connections; do not wait on a stuck client.
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Register one host, retrying while the controller cannot be reached or is overloaded.
async fn register(inner: &Inner, h: &SimHost, join_token: &str) -> Result<(), FleetError> {
    let url = format!("{}/api/v1/agent/register", inner.controller);
    let req = RegisterRequest {
        join_token: join_token.to_string(),
        name: h.name.clone(),
        address: h.address.clone(),
        site: h.site.clone(),
        info: h.info.clone(),
    };
    let deadline = tokio::time::Instant::now() + REGISTER_PATIENCE;
    loop {
        let retry = match inner.http.post(&url).json(&req).send().await {
            Ok(r) if r.status().is_success() => {
                let resp: RegisterResponse =
                    r.json().await.map_err(|source| FleetError::BadResponse {
                        host: h.name.clone(),
                        source,
                    })?;
                let credential = format!("{}:{}", resp.host_id, resp.host_secret);
                // `start` registers each host once, so the cell is always empty here.
                let _ = h.ident.set(Identity {
                    bearer: format!("Bearer {credential}"),
                    host_id: resp.host_id,
                    credential,
                });
                return Ok(());
            }
            Ok(r) if r.status().is_server_error() => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                FleetError::Refused {
                    host: h.name.clone(),
                    status,
                    body,
                }
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                return Err(FleetError::Refused {
                    host: h.name.clone(),
                    status,
                    body,
                });
            }
            Err(source) => FleetError::Unreachable {
                host: h.name.clone(),
                url: url.clone(),
                source,
            },
        };
        if tokio::time::Instant::now() > deadline {
            return Err(retry);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Raise the soft open-file limit to the hard limit (thousands of hosts need many
/// connections at times). Returns the new soft limit.
pub fn raise_fd_limit() -> Result<u64, FleetError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(FleetError::Rlimit(std::io::Error::last_os_error()));
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(FleetError::Rlimit(std::io::Error::last_os_error()));
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests;
