//! Issue 6 benchmarks: live migration against bare QEMU, storage migration against a plain copy,
//! HA failover time, and the evacuation of a host with 10 VMs. See BENCHMARKS.md, "Issue 6".
//!
//! Run as root after `cargo build --release -p kumo`:
//!
//! ```text
//! cargo run --release -p kumo --example bench_issue6
//! ```
//!
//! It starts a 3-host test cluster (kumo-testcluster: one network namespace per host, the release
//! `kumo` binary as controller and agents, QEMU under TCG). h1 and h2 share the pool `sp` (memory-only
//! migration), h3 has its own local pool (storage migration over NBD). The controller runs with
//! the default heartbeat timeout (3 s) and lease (6 s). stdout gets the figures (tables and one
//! RESULT line each); stderr gets progress.
//!
//! 1. Memory-only migration h1 <-> h2 of the test guest (t1.nano): kumo's migration stats
//!    (`total_ms`, `downtime_ms`, QEMU's own `memory_ms`), the API call -> `done` time, and the
//!    guest's pause seen from QEMU's events (source STOP -> destination RESUME), against bare QEMU
//!    running kumo's own command line for the guest (same kernel, initrd, memory, devices; its own
//!    overlay of the same image) started in the same host namespaces, migrated with QMP `migrate`
//!    to a QEMU started with `-incoming tcp:IP:0`, same capabilities and downtime limit (300 ms).
//!    Each migration starts after a random 0-199 ms, on both sides (see `bare::jitter`).
//! 2. Storage migration h1 <-> h3 of a guest whose image holds BENCH6_DATA_MIB of random data:
//!    real data bytes (allocated, non-zero extents of the source chain) per second of the mirror
//!    phase (`total_ms - memory_ms`), against `qemu-img convert -n -O raw` of the same disk from the
//!    source namespace into a `qemu-nbd` export of a blank qcow2 in the destination's pool, started
//!    in the destination namespace: the same transport (NBD over the hosts' network), the same
//!    kind of target (a sparse qcow2 served over NBD), the same direction. Also against bare
//!    QEMU's own drive-mirror of a copy of the disk into such an export (kumo's arguments).
//! 3. Failover: an HA guest on the shared pool, its host killed (`Cluster::kill_host`: agent, QEMU,
//!    dnsmasq); time until `KUMO-GUEST-BOOTED` appears in its console log on another host.
//! 4. Evacuation: BENCH6_EVAC_VMS t1.nano guests on h1, `POST /api/v1/hosts/h1/evacuate`; time until
//!    the operation ends, and each VM's migration figures. h3 is in maintenance meanwhile, so every
//!    VM moves over the shared pool to h2.
//!
//! Knobs: BENCH6_FIGURES ("1,2,3,4"), BENCH6_MIG_RUNS (20 per side), BENCH6_STORAGE_RUNS (5 per
//! side), BENCH6_DATA_MIB (256), BENCH6_FAILOVER_RUNS (5), BENCH6_EVAC_VMS (10), BENCH6_KEEP=1 (keep
//! the cluster's directory), KUMO_BIN (default: the workspace's target/release/kumo).
//!
//! Cleanup: the cluster tears itself down on drop (every process in its namespaces, the
//! namespaces, bridges and its directory); bare QEMUs and qemu-nbd are killed by their guards, the
//! scratch directory is a TempDir. Ctrl-C and SIGTERM drop everything the same way.

// The crate root of an example resolves modules next to it: point them at its own directory.
#[path = "bench_issue6/bare.rs"]
mod bare;
#[path = "bench_issue6/evacuate.rs"]
mod evacuate;
#[path = "bench_issue6/failover.rs"]
mod failover;
#[path = "bench_issue6/memory.rs"]
mod memory;
#[path = "bench_issue6/storage.rs"]
mod storage;
#[path = "bench_issue6/storage_base.rs"]
mod storage_base;
#[path = "bench_issue6/util.rs"]
mod util;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kumo_testcluster::{Cluster, ClusterSpec, HostSpec};

/// Everything that can stop the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad setting: {0}")]
    Config(String),
    #[error(transparent)]
    Cluster(#[from] kumo_testcluster::ClusterError),
    #[error("API: {0}")]
    Api(#[from] kumo_cli::ClientError),
    #[error("QMP ({what}): {source}")]
    Qmp {
        what: String,
        #[source]
        source: kumo_hypervisor::qmp::QmpError,
    },
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
    #[error("timed out: {0}")]
    Timeout(String),
    /// Something the benchmark relies on did not hold (a migration failed, a VM is not where
    /// it should be...).
    #[error("{0}")]
    Check(String),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> BenchError {
        BenchError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn qmp(what: impl Into<String>, source: kumo_hypervisor::qmp::QmpError) -> BenchError {
        BenchError::Qmp {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// The knobs, read and checked before anything starts.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub figures: BTreeSet<u8>,
    pub mig_runs: usize,
    pub storage_runs: usize,
    pub data_mib: u64,
    pub failover_runs: usize,
    pub evac_vms: usize,
    pub keep: bool,
    pub kumo_bin: PathBuf,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        let figures = match std::env::var("BENCH6_FIGURES") {
            Err(_) => [1, 2, 3, 4].into_iter().collect(),
            Ok(s) => {
                let mut set = BTreeSet::new();
                for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match part.parse::<u8>() {
                        Ok(n @ 1..=4) => {
                            set.insert(n);
                        }
                        _ => {
                            return Err(BenchError::Config(format!(
                                "BENCH6_FIGURES={s:?}: a comma-separated list of 1, 2, 3, 4"
                            )))
                        }
                    }
                }
                if set.is_empty() {
                    return Err(BenchError::Config(format!(
                        "BENCH6_FIGURES={s:?} names no figure"
                    )));
                }
                set
            }
        };
        let kumo_bin = match std::env::var_os("KUMO_BIN") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/kumo"),
        };
        let kumo_bin = kumo_bin.canonicalize().map_err(|e| {
            BenchError::Config(format!(
                "no kumo binary at {} ({e}): run `cargo build --release -p kumo` first or set KUMO_BIN",
                kumo_bin.display()
            ))
        })?;
        Ok(Knobs {
            figures,
            mig_runs: util::env_num("BENCH6_MIG_RUNS", 20, 1, 100)? as usize,
            storage_runs: util::env_num("BENCH6_STORAGE_RUNS", 5, 1, 50)? as usize,
            // The data sits between 128 MiB and the end of the 1 GiB root disk of a t1.nano.
            data_mib: util::env_num("BENCH6_DATA_MIB", 256, 16, 896)?,
            failover_runs: util::env_num("BENCH6_FAILOVER_RUNS", 5, 1, 20)? as usize,
            evac_vms: util::env_num("BENCH6_EVAC_VMS", 10, 1, 30)? as usize,
            keep: std::env::var_os("BENCH6_KEEP").is_some(),
            kumo_bin,
        })
    }
}

/// What every figure works with.
pub struct Bench {
    pub cluster: Cluster,
    pub knobs: Knobs,
    /// Scratch space of the benchmark itself (the cluster's directory, bare QEMU run dirs, the
    /// data image).
    pub scratch: PathBuf,
    /// Removes `scratch` on drop (after the cluster: fields drop in order); None with BENCH6_KEEP.
    _scratch_guard: Option<tempfile::TempDir>,
    /// The test guest (`kumo dev build-guest`): vmlinux, initrd.img, disk.qcow2.
    pub guest: PathBuf,
    pub t0: Instant,
}

impl Bench {
    /// A progress line on stderr.
    pub fn step(&self, what: &str) {
        eprintln!("bench6: [{:>6.1}s] {what}", self.t0.elapsed().as_secs_f64());
    }

    /// The directory of the shared pool `sp` of h1 and h2.
    pub fn shared_pool_dir(&self) -> PathBuf {
        self.cluster.dir().join("pools").join(SHARED_POOL)
    }

    /// The pool directory of host `i`: the shared one, or the agent's default local pool.
    pub fn pool_dir(&self, i: usize) -> PathBuf {
        if i == H3 {
            self.cluster.hosts()[i].data_dir.join("pool")
        } else {
            self.shared_pool_dir()
        }
    }
}

pub const SHARED_POOL: &str = "sp";
/// Host indexes in the cluster.
pub const H1: usize = 0;
pub const H2: usize = 1;
pub const H3: usize = 2;
pub const HOST_NAMES: [&str; 3] = ["h1", "h2", "h3"];

async fn start(knobs: Knobs, t0: Instant) -> Result<Bench> {
    let guard = tempfile::Builder::new()
        .prefix("bench6-")
        .tempdir()
        .map_err(|e| BenchError::io("making a scratch directory", e))?;
    let scratch = guard.path().to_path_buf();
    let guard = if knobs.keep {
        eprintln!("bench6: BENCH6_KEEP: {} stays", scratch.display());
        let _ = guard.keep();
        None
    } else {
        Some(guard)
    };
    let dir = scratch.join("cluster");
    let shared = |name: &str| HostSpec {
        storage_pool: Some(SHARED_POOL.into()),
        ..HostSpec::qemu(name).capacity(16, 8192)
    };
    eprintln!("bench6: starting a 3-host cluster in {}", dir.display());
    let cluster = Cluster::start(ClusterSpec {
        kumo_bin: knobs.kumo_bin.clone(),
        dir,
        hosts: vec![
            shared(HOST_NAMES[H1]),
            shared(HOST_NAMES[H2]),
            HostSpec::qemu(HOST_NAMES[H3]).capacity(16, 8192),
        ],
        // `kumo server`'s default: failover is measured "with default settings".
        heartbeat_timeout_secs: 3,
        keep_dir: knobs.keep,
    })
    .await?;
    let guest = scratch.join("guest");
    util::build_guest(&knobs.kumo_bin, &guest).await?;
    let b = Bench {
        cluster,
        knobs,
        scratch,
        _scratch_guard: guard,
        guest,
        t0,
    };
    util::import_demo(&b).await?;
    b.step("cluster up, test guest imported as `demo`");
    Ok(b)
}

async fn run(knobs: Knobs) -> Result<()> {
    let t0 = Instant::now();
    println!("{}", util::env_line(&knobs).await);
    let mut b = start(knobs, t0).await?;
    let figures = b.knobs.figures.clone();
    // Failover last: it kills hosts.
    if figures.contains(&1) {
        memory::figure(&mut b).await?;
    }
    if figures.contains(&2) {
        storage::figure(&mut b).await?;
    }
    if figures.contains(&4) {
        evacuate::figure(&mut b).await?;
    }
    if figures.contains(&3) {
        failover::figure(&mut b).await?;
    }
    println!(
        "  total {:.0} s; load average at the end: {}",
        t0.elapsed().as_secs_f64(),
        util::loadavg()
    );
    b.step("tearing down");
    b.cluster.teardown().await?;
    Ok(())
}

async fn interrupted() -> BenchError {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // No SIGTERM handler: only Ctrl-C stops us early.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    BenchError::Interrupted
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    let knobs = match Knobs::from_env() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("bench6: {e}");
            return ExitCode::from(2);
        }
    };
    // Dropping the run (on error or signal) drops the cluster and the guards: that is the cleanup.
    let r = tokio::select! {
        r = run(knobs) => r,
        e = interrupted() => Err(e),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench6: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
