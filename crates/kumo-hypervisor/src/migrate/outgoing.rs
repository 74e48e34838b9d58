//! The source side: mirror the disks, migrate memory, and roll back on any failure.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    cancel_migration, cancel_mirrors, check_nbd_uri, check_tcp_uri, exec, mirror_jobs, qmp_err,
    roll_back, JOB_PREFIX, MEMORY_POLL, POLL,
};
use crate::qmp::Qmp;
use crate::{
    validate_id, AttachedDisk, HypervisorError, MigrateSpec, MigrationPhase, MigrationProgress,
    MigrationReport, NbdTarget, QemuDriver,
};

const DEFAULT_DOWNTIME_MS: u64 = 300;
/// QEMU refuses a larger downtime-limit.
const MAX_DOWNTIME_MS: u64 = 2_000_000;
const DEFAULT_STALL_SECS: u64 = 20;
/// drive-mirror into an existing target first zeroes all of it, and that is not counted as
/// progress; on a large thick LV it can take a while. Until the first mirrored byte the stall
/// timeout is this many times longer.
const ZEROING_GRACE_FACTOR: u32 = 5;
/// QEMU's way of saying "no limit" is a huge limit (its default is 128 MiB/s).
const UNLIMITED_BANDWIDTH: u64 = i64::MAX as u64;

/// Run directories of the VMs this process is migrating: a second migrate() of the same VM
/// must not take the first one's jobs for a crashed agent's leftovers.
static MIGRATING: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

struct Claim(PathBuf);

impl Claim {
    fn take(run_dir: PathBuf, id: &str) -> Result<Self, HypervisorError> {
        let mut set = MIGRATING.lock().unwrap_or_else(|e| e.into_inner());
        if !set.get_or_insert_with(HashSet::new).insert(run_dir.clone()) {
            return Err(HypervisorError::InvalidState(format!(
                "VM {id} is already being migrated"
            )));
        }
        Ok(Claim(run_dir))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut set = MIGRATING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = set.as_mut() {
            s.remove(&self.0);
        }
    }
}

/// A MigrateSpec checked, with its defaults applied.
struct Plan<'a> {
    uri: &'a str,
    targets: &'a [NbdTarget],
    downtime_ms: u64,
    bandwidth: Option<u64>,
    auto_converge: bool,
    stall: Duration,
}

fn plan(m: &MigrateSpec) -> Result<Plan<'_>, HypervisorError> {
    let invalid = |s: String| Err(HypervisorError::InvalidSpec(s));
    check_tcp_uri(&m.target.migrate_uri)?;
    let mut seen = HashSet::new();
    for t in &m.target.nbd_targets {
        crate::block::validate_device_id(&t.device_id)?;
        check_nbd_uri(&t.uri)?;
        if !seen.insert(t.device_id.as_str()) {
            return invalid(format!("disk {} has two NBD targets", t.device_id));
        }
    }
    let downtime_ms = match m.downtime_limit_ms {
        0 => DEFAULT_DOWNTIME_MS,
        d if d > MAX_DOWNTIME_MS => {
            return invalid(format!(
                "downtime limit {d} ms is above QEMU's {MAX_DOWNTIME_MS}"
            ))
        }
        d => d,
    };
    if m.bandwidth == Some(0) {
        return invalid("bandwidth must be positive (None: unlimited)".into());
    }
    Ok(Plan {
        uri: &m.target.migrate_uri,
        targets: &m.target.nbd_targets,
        downtime_ms,
        bandwidth: m.bandwidth,
        auto_converge: m.auto_converge,
        stall: Duration::from_secs(match m.stall_timeout_secs {
            0 => DEFAULT_STALL_SECS,
            s => s,
        }),
    })
}

/// Check a MigrateSpec without acting on it (the sim driver's validation).
pub(crate) fn check_migrate_spec(m: &MigrateSpec) -> Result<(), HypervisorError> {
    plan(m).map(|_| ())
}

/// Check that the targets name exactly the writable disks (none: memory only).
pub(crate) fn check_targets(
    id: &str,
    disks: &[AttachedDisk],
    targets: &[NbdTarget],
) -> Result<(), HypervisorError> {
    mirrors(id, disks, targets).map(|_| ())
}

/// One disk to mirror.
struct Mirror {
    device_id: String,
    node: String,
    job: String,
    uri: String,
}

/// Pair every writable disk with its target; the targets must name exactly those disks.
fn mirrors(
    id: &str,
    disks: &[AttachedDisk],
    targets: &[NbdTarget],
) -> Result<Vec<Mirror>, HypervisorError> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let invalid = |s: String| Err(HypervisorError::InvalidSpec(s));
    for t in targets {
        match disks.iter().find(|d| d.device_id == t.device_id) {
            None => return invalid(format!("VM {id} has no disk {}", t.device_id)),
            Some(d) if d.read_only => {
                return invalid(format!(
                    "disk {} of VM {id} is read-only: it is not mirrored",
                    t.device_id
                ))
            }
            Some(_) => {}
        }
    }
    disks
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| match targets.iter().find(|t| t.device_id == d.device_id) {
            Some(t) => Ok(Mirror {
                device_id: d.device_id.clone(),
                node: d.node.clone(),
                job: format!("{JOB_PREFIX}{}", d.device_id),
                uri: t.uri.clone(),
            }),
            None => Err(HypervisorError::InvalidSpec(format!(
                "disk {} of VM {id} has no NBD target: a storage migration needs one for every disk",
                d.device_id
            ))),
        })
        .collect()
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// One migration in progress.
struct Run<'a> {
    q: &'a Qmp,
    id: &'a str,
    plan: &'a Plan<'a>,
    mirrors: Vec<Mirror>,
    progress: &'a (dyn Fn(&MigrationProgress) -> bool + Send + Sync),
    /// Bytes moved so far (memory + mirror) and when that number last changed.
    moved: u64,
    moved_at: Instant,
}

/// What the mirror jobs report now.
struct Disks {
    done: u64,
    total: u64,
    ready: bool,
    concluded: bool,
}

impl Run<'_> {
    /// `zeroing`: the mirrors may still be zeroing their targets (see ZEROING_GRACE_FACTOR).
    fn stalled(&mut self, moved: u64, what: &str, zeroing: bool) -> Result<(), HypervisorError> {
        if moved != self.moved {
            self.moved = moved;
            self.moved_at = Instant::now();
            return Ok(());
        }
        let limit = if zeroing && moved == 0 {
            self.plan.stall * ZEROING_GRACE_FACTOR
        } else {
            self.plan.stall
        };
        if self.moved_at.elapsed() < limit {
            return Ok(());
        }
        Err(HypervisorError::MigrationStalled(format!(
            "no byte moved for {} s while {what} (VM {}): the destination does not answer",
            limit.as_secs(),
            self.id
        )))
    }

    fn report(&self, p: MigrationProgress) -> Result<(), HypervisorError> {
        if (self.progress)(&p) {
            return Ok(());
        }
        tracing::info!(id = %self.id, phase = ?p.phase, "migration cancelled by the caller");
        Err(HypervisorError::Cancelled(format!(
            "migration of VM {} ({:?} phase)",
            self.id, p.phase
        )))
    }

    /// The mirror jobs now; any job that failed or vanished fails the migration.
    async fn disks(&self, completing: bool) -> Result<Disks, HypervisorError> {
        let mut d = Disks {
            done: 0,
            total: 0,
            ready: true,
            concluded: true,
        };
        if self.mirrors.is_empty() {
            return Ok(d);
        }
        let jobs = mirror_jobs(self.q, self.id).await?;
        for m in &self.mirrors {
            let Some(j) = jobs.iter().find(|j| j["device"] == m.job.as_str()) else {
                return Err(HypervisorError::BlockJobFailed(format!(
                    "mirror job {} of disk {} disappeared",
                    m.job, m.device_id
                )));
            };
            if let Some(err) = j["error"].as_str() {
                return Err(HypervisorError::BlockJobFailed(format!(
                    "mirror of disk {} to {}: {err}",
                    m.device_id, m.uri
                )));
            }
            let concluded = j["status"] == "concluded";
            if concluded && !completing {
                return Err(HypervisorError::BlockJobFailed(format!(
                    "mirror job {} of disk {} ended before the migration completed",
                    m.job, m.device_id
                )));
            }
            d.done += num(&j["offset"]);
            d.total += num(&j["len"]);
            d.ready &= j["ready"] == true;
            d.concluded &= concluded;
        }
        Ok(d)
    }

    async fn start_mirrors(&self) -> Result<(), HypervisorError> {
        // The bandwidth is shared between the disks.
        let speed = match self.plan.bandwidth {
            Some(b) => (b / self.mirrors.len().max(1) as u64).max(1),
            None => 0,
        };
        for m in &self.mirrors {
            exec(
                self.q,
                self.id,
                "drive-mirror",
                json!({
                    "job-id": m.job,
                    "device": m.node,
                    "target": m.uri,
                    "format": "raw",
                    "sync": "full",
                    "mode": "existing",
                    "speed": speed,
                    "on-source-error": "report",
                    "on-target-error": "report",
                    // Keep the ended job (and its error) until we read it.
                    "auto-dismiss": false,
                }),
            )
            .await
            .map_err(|e| {
                HypervisorError::BlockJobFailed(format!(
                    "starting the mirror of disk {} to {}: {e}",
                    m.device_id, m.uri
                ))
            })?;
            tracing::info!(id = %self.id, device = %m.device_id, target = %m.uri, speed, "mirror started");
        }
        Ok(())
    }

    async fn configure(&self) -> Result<(), HypervisorError> {
        exec(
            self.q,
            self.id,
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "events", "state": true },
                { "capability": "auto-converge", "state": self.plan.auto_converge },
                { "capability": "return-path", "state": true },
            ]}),
        )
        .await?;
        exec(
            self.q,
            self.id,
            "migrate-set-parameters",
            json!({
                "downtime-limit": self.plan.downtime_ms,
                "max-bandwidth": self.plan.bandwidth.unwrap_or(UNLIMITED_BANDWIDTH),
            }),
        )
        .await?;
        Ok(())
    }

    fn progress_of(phase: MigrationPhase, disks: &Disks, mig: &Value) -> MigrationProgress {
        let ram = &mig["ram"];
        MigrationProgress {
            phase,
            disk_done: disks.done,
            disk_total: disks.total,
            ram_done: num(&ram["transferred"]),
            ram_total: num(&ram["total"]),
            ram_remaining: num(&ram["remaining"]),
            passes: num(&ram["dirty-sync-count"]),
            throttle_pct: num(&mig["cpu-throttle-percentage"]),
        }
    }

    async fn go(&mut self, started: Instant) -> Result<MigrationReport, HypervisorError> {
        self.configure().await?;
        self.start_mirrors().await?;
        self.moved_at = Instant::now();
        while !self.mirrors.is_empty() {
            let d = self.disks(false).await?;
            self.stalled(d.done, "mirroring the disks", true)?;
            self.report(Self::progress_of(
                MigrationPhase::Mirroring,
                &d,
                &Value::Null,
            ))?;
            if d.ready {
                tracing::info!(id = %self.id, bytes = d.done, ms = started.elapsed().as_millis() as u64, "all mirrors ready");
                break;
            }
            tokio::time::sleep(POLL).await;
        }

        exec(self.q, self.id, "migrate", json!({ "uri": self.plan.uri }))
            .await
            .map_err(|e| HypervisorError::MigrationFailed(format!("starting: {e}")))?;
        tracing::info!(id = %self.id, uri = %self.plan.uri, "memory migration started");
        self.moved_at = Instant::now();
        let mig = loop {
            let mig = exec(self.q, self.id, "query-migrate", Value::Null).await?;
            let d = self.disks(false).await?;
            match mig["status"].as_str().unwrap_or("none") {
                "completed" => break mig,
                "failed" => {
                    let why = mig["error-desc"].as_str().unwrap_or("no reason given");
                    return Err(HypervisorError::MigrationFailed(why.to_string()));
                }
                s @ ("cancelling" | "cancelled") => {
                    return Err(HypervisorError::MigrationFailed(format!(
                        "the migration was {s} from outside"
                    )))
                }
                _ => {}
            }
            let p = Self::progress_of(MigrationPhase::Memory, &d, &mig);
            self.stalled(p.ram_done + d.done, "migrating memory", false)?;
            self.report(p)?;
            tokio::time::sleep(MEMORY_POLL).await;
        };
        tracing::info!(id = %self.id, ms = started.elapsed().as_millis() as u64, "memory migration completed; source paused");

        // The source is paused: a READY mirror now copies what is left and ends, leaving its
        // target consistent. The destination stays in -S until that is over.
        for m in &self.mirrors {
            let r = exec(
                self.q,
                self.id,
                "block-job-cancel",
                json!({ "device": m.job, "force": false }),
            )
            .await;
            if let Err(e) = r {
                // A job that failed meanwhile explains this better.
                self.disks(true).await?;
                return Err(e);
            }
        }
        let disks = loop {
            let d = self.disks(true).await?;
            if d.concluded {
                break d;
            }
            let p = Self::progress_of(MigrationPhase::Memory, &d, &mig);
            self.stalled(p.ram_done + d.done, "finishing the mirrors", false)?;
            self.report(p)?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for m in &self.mirrors {
            exec(self.q, self.id, "job-dismiss", json!({ "id": m.job })).await?;
        }
        let mig = self.final_stats(mig).await?;
        let report = MigrationReport {
            total_ms: started.elapsed().as_millis() as u64,
            downtime_ms: num(&mig["downtime"]),
            ram_bytes: num(&mig["ram"]["transferred"]),
            disk_bytes: disks.done,
            memory_ms: num(&mig["total-time"]),
        };
        // The destination has not run yet: a last "stop" still rolls back.
        self.report(Self::progress_of(MigrationPhase::Completed, &disks, &mig))?;
        Ok(report)
    }

    /// QEMU sets `completed` a moment before it fills in the times: ask again until they are.
    async fn final_stats(&self, mut mig: Value) -> Result<Value, HypervisorError> {
        for _ in 0..20 {
            if num(&mig["total-time"]) > 0 && mig.get("downtime").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            mig = exec(self.q, self.id, "query-migrate", Value::Null).await?;
        }
        Ok(mig)
    }
}

impl QemuDriver {
    pub(crate) async fn migrate_impl(
        &self,
        id: &str,
        m: &MigrateSpec,
        progress: &(dyn Fn(&MigrationProgress) -> bool + Send + Sync),
    ) -> Result<MigrationReport, HypervisorError> {
        validate_id(id)?;
        let plan = plan(m)?;
        let q = self.qmp(id).await?;
        let _claim = Claim::take(self.run_dir(id), id)?;
        let status = q.query_status().await.map_err(qmp_err(id))?.status;
        match status.as_str() {
            "running" => {}
            "postmigrate" => {
                return Err(HypervisorError::InvalidState(format!(
                    "VM {id} is paused after a completed migration: resume_after_migration first"
                )))
            }
            other => {
                return Err(HypervisorError::InvalidState(format!(
                    "VM {id} is {other}: only a running VM migrates"
                )))
            }
        }
        let disks = crate::block::attached_disks(self, id).await?;
        let mirrors = mirrors(id, &disks, plan.targets)?;
        // Leftovers of an agent that crashed mid-migration would make QEMU refuse.
        cancel_migration(&q, id).await?;
        cancel_mirrors(&q, id).await?;

        let started = Instant::now();
        tracing::info!(%id, uri = %plan.uri, disks = mirrors.len(), downtime_ms = plan.downtime_ms,
            bandwidth = ?plan.bandwidth, auto_converge = plan.auto_converge, "migration starting");
        let mut run = Run {
            q: &q,
            id,
            plan: &plan,
            mirrors,
            progress,
            moved: 0,
            moved_at: Instant::now(),
        };
        match run.go(started).await {
            Ok(report) => {
                tracing::info!(%id, ?report, "migration completed");
                Ok(report)
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "migration failed; rolling back");
                // A migration thread blocked writing to a dead link can hold QEMU's big lock, and
                // then no QMP command (not even `yank`) gets through: close its connections
                // from outside first.
                let netns = self.spec_netns(id);
                let mut uris = vec![m.target.migrate_uri.as_str()];
                uris.extend(m.target.nbd_targets.iter().map(|t| t.uri.as_str()));
                for uri in uris {
                    kill_connections(netns.as_deref(), uri).await;
                }
                match roll_back(&q, id).await {
                    Ok(()) => tracing::info!(%id, "rolled back: source running"),
                    Err(r) => {
                        tracing::error!(%id, error = %r, "rollback of a failed migration failed")
                    }
                }
                Err(e)
            }
        }
    }

    /// The network namespace the VM's QEMU runs in (from its saved spec).
    fn spec_netns(&self, id: &str) -> Option<String> {
        let b = std::fs::read(self.run_dir(id).join(crate::qemu::SPEC_FILE)).ok()?;
        serde_json::from_slice::<crate::VmSpec>(&b).ok()?.netns
    }

    pub(crate) async fn resume_after_migration_impl(
        &self,
        id: &str,
    ) -> Result<(), HypervisorError> {
        validate_id(id)?;
        let q = self.qmp(id).await?;
        let status = q.query_status().await.map_err(qmp_err(id))?.status;
        // A destination, even one whose stream completed, must only run through
        // finish_incoming: resuming it here could run the guest twice.
        if status == "inmigrate" || super::incoming::is_destination(&self.run_dir(id)) {
            return Err(HypervisorError::InvalidState(format!(
                "VM {id} is the destination of an unfinished migration, not a source"
            )));
        }
        roll_back(&q, id).await
    }
}

/// `IP` and `PORT` of `tcp:IP:PORT` / `nbd:IP:PORT[:…]`.
fn uri_endpoint(uri: &str) -> Option<(&str, &str)> {
    let rest = uri
        .strip_prefix("tcp:")
        .or_else(|| uri.strip_prefix("nbd:"))?;
    let mut parts = rest.splitn(3, ':');
    let ip = parts.next()?;
    let port = parts.next()?;
    (!ip.is_empty() && port.parse::<u16>().is_ok()).then_some((ip, port))
}

/// Destroy the TCP connections to a migration or NBD endpoint (`ss -K`, in the VM's namespace).
/// Best effort: without it QEMU finds out when TCP gives up, minutes later.
async fn kill_connections(netns: Option<&str>, uri: &str) {
    let Some((ip, port)) = uri_endpoint(uri) else {
        return;
    };
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, "ss"]);
            c
        }
        None => tokio::process::Command::new("ss"),
    };
    cmd.args(["-K", "dst", ip, "dport", "=", port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match tokio::time::timeout(Duration::from_secs(5), cmd.status()).await {
        Ok(Ok(_)) => tracing::info!(uri, "closed the connections of a failed migration"),
        Ok(Err(e)) => tracing::warn!(uri, error = %e, "could not run ss -K"),
        Err(_) => tracing::warn!(uri, "ss -K timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IncomingReady;

    #[test]
    fn endpoints() {
        assert_eq!(
            uri_endpoint("tcp:10.0.0.1:4444"),
            Some(("10.0.0.1", "4444"))
        );
        assert_eq!(
            uri_endpoint("nbd:10.0.0.1:5:exportname=virtio-disk0"),
            Some(("10.0.0.1", "5"))
        );
        assert_eq!(uri_endpoint("exec:reboot"), None);
        assert_eq!(uri_endpoint("tcp:10.0.0.1:x"), None);
    }

    fn spec(targets: &[(&str, &str)]) -> MigrateSpec {
        MigrateSpec {
            target: IncomingReady {
                migrate_uri: "tcp:127.0.0.1:4444".into(),
                nbd_targets: targets
                    .iter()
                    .map(|(d, u)| NbdTarget {
                        device_id: d.to_string(),
                        uri: u.to_string(),
                    })
                    .collect(),
            },
            downtime_limit_ms: 0,
            auto_converge: false,
            bandwidth: None,
            stall_timeout_secs: 0,
        }
    }

    fn disk(dev: &str, ro: bool) -> AttachedDisk {
        AttachedDisk {
            device_id: dev.into(),
            node: format!("{dev}-node"),
            file: "/x".into(),
            format: "qcow2".into(),
            size_bytes: 1 << 20,
            read_only: ro,
            serial: None,
        }
    }

    #[test]
    fn plans() {
        let m = spec(&[]);
        let p = plan(&m).unwrap();
        assert_eq!(p.downtime_ms, 300);
        assert_eq!(p.stall, Duration::from_secs(20));
        let u = "nbd:127.0.0.1:5:exportname=virtio-disk0";
        assert!(plan(&spec(&[("virtio-disk0", u)])).is_ok());
        assert!(plan(&spec(&[("virtio-disk0", u), ("virtio-disk0", u)])).is_err());
        assert!(plan(&spec(&[("virtio-disk0", "file:/etc/passwd")])).is_err());
        assert!(plan(&spec(&[("0bad", u)])).is_err());
        let mut m = spec(&[]);
        m.bandwidth = Some(0);
        assert!(plan(&m).is_err());
        let mut m = spec(&[]);
        m.downtime_limit_ms = MAX_DOWNTIME_MS + 1;
        assert!(plan(&m).is_err());
        let mut m = spec(&[]);
        m.target.migrate_uri = "exec:reboot".into();
        assert!(plan(&m).is_err());
    }

    #[test]
    fn targets_cover_every_writable_disk() {
        let disks = [
            disk("virtio-disk0", false),
            disk("vol-a", false),
            disk("seed", true),
        ];
        let t = |d: &str| NbdTarget {
            device_id: d.into(),
            uri: format!("nbd:127.0.0.1:5:exportname={d}"),
        };
        assert!(mirrors("i", &disks, &[]).unwrap().is_empty());
        let m = mirrors("i", &disks, &[t("vol-a"), t("virtio-disk0")]).unwrap();
        let jobs: Vec<&str> = m.iter().map(|m| m.job.as_str()).collect();
        assert_eq!(jobs, ["mig-virtio-disk0", "mig-vol-a"]);
        assert_eq!(m[0].node, "virtio-disk0-node");
        assert!(mirrors("i", &disks, &[t("virtio-disk0")]).is_err());
        assert!(mirrors("i", &disks, &[t("virtio-disk0"), t("vol-a"), t("seed")]).is_err());
        assert!(mirrors("i", &disks, &[t("virtio-disk0"), t("vol-a"), t("vol-b")]).is_err());
    }
}
