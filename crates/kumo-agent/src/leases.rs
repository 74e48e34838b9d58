//! HA leases on the host, and self-fencing.
//!
//! The controller grants a lease (a duration) for every VM it wants here in each heartbeat
//! answer and in each desired-spec PUT. A heartbeat lease runs from the moment this agent *sent*
//! the heartbeat, on its own monotonic clock, so it always ends before the controller's record
//! of it (counted from when the heartbeat arrived). A PUT lease never reaches past the latest
//! heartbeat lease (the *horizon*): the controller knows nothing later than that.
//!
//! A VM may be started only while its lease is valid. A watchdog kills (no graceful stop) every
//! VM whose lease lapsed, journals it and reports it in the next heartbeat; such a *fenced* VM is
//! not started again until a fresh lease for it arrives. Leases are persisted (on the boot-time
//! clock, `/proc/uptime`) so a restarted agent enforces them at once. On a shared pool the agent
//! also renews a lease file per VM and does not start a VM another host renewed lately ([`file`]).

mod file;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kumo_hypervisor::PowerState;
use kumo_types::agent::{DesiredPower, FenceReport, LeaseGrant};
use serde::{Deserialize, Serialize};

use crate::error::chain;
use crate::Agent;
pub(crate) use file::LeaseFiles;

/// How often the watchdog looks for lapsed leases.
pub(crate) const WATCHDOG_TICK: Duration = Duration::from_millis(250);
/// A lease counts as lapsed this long before it ends, so that a late watchdog tick and the kill
/// itself are over before the end (and the controller waits a margin past its own, later, end).
pub(crate) const FENCE_AHEAD: Duration = Duration::from_millis(500);
/// How long the watchdog waits for the driver to tidy up after it killed the process (the
/// driver serialises calls per VM, so this may queue behind a slow start or stop).
const KILL_PATIENCE: Duration = Duration::from_millis(1500);
/// How long a restarted agent lets its first heartbeat renew lapsed leases before fencing.
pub(crate) const FIRST_BEAT_GRACE: Duration = Duration::from_secs(5);
/// `/proc/uptime` has 10 ms resolution: a restored lease ends this much earlier, never later.
const UPTIME_SLACK_MS: u64 = 20;
/// The lease length lease files are judged by before any heartbeat said (the controller's default).
const DEFAULT_TTL: Duration = Duration::from_secs(6);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading the boot-time clock (/proc/uptime): {0}")]
    Clock(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lease file")]
    Json(#[from] serde_json::Error),
}

/// One kill not yet reported to the controller.
#[derive(Debug, Clone)]
struct Kill {
    id: String,
    at: Instant,
    /// How long before the lease's end it happened, ms (negative: after).
    ahead_ms: i64,
}

/// Where a lease stops counting as valid: [`FENCE_AHEAD`] before its end.
fn usable_until(end: Instant) -> Option<Instant> {
    end.checked_sub(FENCE_AHEAD)
}

/// Signed ms from `now` to `end`.
fn ms_before(end: Instant, now: Instant) -> i64 {
    if end >= now {
        (end - now).as_millis() as i64
    } else {
        -((now - end).as_millis() as i64)
    }
}

#[derive(Default)]
struct State {
    /// Where each VM's lease ends.
    until: HashMap<String, Instant>,
    /// The end of the latest heartbeat lease: no PUT lease reaches past it.
    horizon: Option<Instant>,
    /// VMs stopped for lack of a lease: not started again until a fresh lease for them.
    fenced: HashSet<String>,
    unreported: Vec<Kill>,
    /// The lease length the controller grants, from its last answer.
    ttl: Option<Duration>,
}

/// The host's leases. Cheap to consult: one mutex, no I/O except [`Leases::save`].
pub(crate) struct Leases {
    state: std::sync::Mutex<State>,
    path: PathBuf,
    files: LeaseFiles,
    /// The first heartbeat after start-up has been answered (or failed).
    pub(crate) first_beat: tokio::sync::Notify,
}

/// The file: lease ends in ms of boot time (monotonic across agent restarts, not reboots).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    until_ms: HashMap<String, u64>,
    horizon_ms: Option<u64>,
    fenced: Vec<String>,
    /// Unreported kills: (vm, boot-time ms of the kill, ms ahead of the lease's end).
    #[serde(default)]
    unreported: Vec<(String, u64, i64)>,
}

/// Milliseconds since boot (CLOCK_BOOTTIME as the kernel reports it in /proc/uptime).
fn uptime_ms() -> Result<u64, LeaseError> {
    let s =
        std::fs::read_to_string("/proc/uptime").map_err(|e| LeaseError::Clock(e.to_string()))?;
    let secs = s
        .split_whitespace()
        .next()
        .ok_or_else(|| LeaseError::Clock(format!("unexpected content {s:?}")))?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
    let whole: u64 = whole
        .parse()
        .map_err(|_| LeaseError::Clock(format!("unexpected content {s:?}")))?;
    let frac = format!("{frac:0<3}");
    let ms: u64 = frac[..3]
        .parse()
        .map_err(|_| LeaseError::Clock(format!("unexpected content {s:?}")))?;
    Ok(whole * 1000 + ms)
}

impl Leases {
    /// The leases saved by the previous agent process, if any (a missing or unreadable file
    /// means no lease: VMs wait for the first heartbeat's grant).
    pub(crate) fn load(data_dir: &Path, files: LeaseFiles) -> Leases {
        let path = data_dir.join("leases.json");
        let mut st = State::default();
        match restore(&path) {
            Ok(Some(s)) => st = s,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %chain(&e), "lease file not restored; waiting for fresh leases")
            }
        }
        Leases {
            state: std::sync::Mutex::new(st),
            path,
            files,
            first_beat: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the VM holds a valid lease now.
    pub(crate) fn valid(&self, id: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .until
            .get(id)
            .and_then(|u| usable_until(*u))
            .is_some_and(|u| u > now)
    }

    pub(crate) fn is_fenced(&self, id: &str) -> bool {
        self.lock().fenced.contains(id)
    }

    /// A heartbeat sent at `sent` was answered with `grant`. Returns the VMs that were fenced
    /// and may start again.
    pub(crate) fn grant_heartbeat(&self, sent: Instant, grant: &LeaseGrant) -> Vec<String> {
        let until = sent + Duration::from_millis(grant.ttl_ms);
        let now = Instant::now();
        let mut st = self.lock();
        st.ttl = Some(Duration::from_millis(grant.ttl_ms));
        st.horizon = Some(st.horizon.map_or(until, |h| h.max(until)));
        let granted: HashSet<&String> = grant.vms.iter().collect();
        // Leases neither renewed nor still running are of no use any more.
        st.until.retain(|id, u| granted.contains(id) || *u > now);
        let mut revived = vec![];
        for id in &grant.vms {
            let e = st.until.entry(id.clone()).or_insert(until);
            *e = (*e).max(until);
            if usable_until(until).is_some_and(|u| u > now) && st.fenced.remove(id) {
                revived.push(id.clone());
            }
        }
        revived
    }

    /// A lease of `ttl` from now, but never past the horizon. Returns whether the VM was fenced
    /// and may start again.
    pub(crate) fn grant_one(&self, id: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(horizon) = st.horizon else {
            return false;
        };
        let until = (now + ttl).min(horizon);
        if usable_until(until).is_none_or(|u| u <= now) {
            return false;
        }
        let e = st.until.entry(id.to_string()).or_insert(until);
        *e = (*e).max(until);
        st.fenced.remove(id)
    }

    /// The VM must not start until a fresh lease arrives.
    pub(crate) fn hold(&self, id: &str) {
        self.lock().fenced.insert(id.to_string());
    }

    pub(crate) fn forget(&self, id: &str) {
        {
            let mut st = self.lock();
            st.until.remove(id);
            st.fenced.remove(id);
        }
        self.files.release(id);
    }

    /// VMs whose lease is not valid now (never granted, or lapsed), with how long before its
    /// end it is now, ms (negative: after; 0 when there never was one).
    fn lapsed<'a>(&self, ids: impl Iterator<Item = &'a String>) -> Vec<(String, i64)> {
        let now = Instant::now();
        let st = self.lock();
        ids.filter_map(|id| match st.until.get(id) {
            Some(u) if usable_until(*u).is_some_and(|v| v > now) => None,
            Some(u) => Some((id.clone(), ms_before(*u, now))),
            None => Some((id.clone(), 0)),
        })
        .collect()
    }

    fn record_kill(&self, id: &str, ahead_ms: i64) {
        let mut st = self.lock();
        st.unreported.push(Kill {
            id: id.to_string(),
            at: Instant::now(),
            ahead_ms,
        });
    }

    /// Kills to report in the heartbeat about to be sent.
    pub(crate) fn take_reports(&self) -> Vec<FenceReport> {
        let now = Instant::now();
        let mut st = self.lock();
        let kills = std::mem::take(&mut st.unreported);
        drop(st);
        kills
            .into_iter()
            .map(|k| FenceReport {
                id: k.id,
                ahead_ms: k.ahead_ms,
                ago_ms: now.saturating_duration_since(k.at).as_millis() as u64,
            })
            .collect()
    }

    /// The heartbeat carrying these reports failed: report them next time.
    pub(crate) fn restore_reports(&self, reports: Vec<FenceReport>) {
        let now = Instant::now();
        let mut st = self.lock();
        for r in reports {
            st.unreported.push(Kill {
                at: now
                    .checked_sub(Duration::from_millis(r.ago_ms))
                    .unwrap_or(now),
                ahead_ms: r.ahead_ms,
                id: r.id,
            });
        }
    }

    /// Write the leases for the next agent process (atomically; no fsync: after a crash of the
    /// machine every VM is gone anyway).
    pub(crate) fn save(&self) -> Result<(), LeaseError> {
        let boot_now = uptime_ms()?;
        let now = Instant::now();
        let at = |i: Instant| boot_now + i.saturating_duration_since(now).as_millis() as u64;
        let saved = {
            let st = self.lock();
            Saved {
                until_ms: st.until.iter().map(|(k, v)| (k.clone(), at(*v))).collect(),
                horizon_ms: st.horizon.map(at),
                fenced: st.fenced.iter().cloned().collect(),
                unreported: st
                    .unreported
                    .iter()
                    .map(|k| {
                        let ago = now.saturating_duration_since(k.at).as_millis() as u64;
                        (k.id.clone(), boot_now.saturating_sub(ago), k.ahead_ms)
                    })
                    .collect(),
            }
        };
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&saved)?).map_err(|source| LeaseError::Io {
            context: format!("writing {}", tmp.display()),
            source,
        })?;
        std::fs::rename(&tmp, &self.path).map_err(|source| LeaseError::Io {
            context: format!("renaming {}", tmp.display()),
            source,
        })
    }
}

fn restore(path: &Path) -> Result<Option<State>, LeaseError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LeaseError::Io {
                context: format!("reading {}", path.display()),
                source,
            })
        }
    };
    let saved: Saved = serde_json::from_slice(&bytes)?;
    let boot_now = uptime_ms()?;
    let now = Instant::now();
    // Past ends become "now" (lapsed); future ones keep their distance, rounded down.
    let at = |ms: u64| {
        now + Duration::from_millis(ms.saturating_sub(boot_now).saturating_sub(UPTIME_SLACK_MS))
    };
    Ok(Some(State {
        until: saved
            .until_ms
            .into_iter()
            .map(|(k, v)| (k, at(v)))
            .collect(),
        horizon: saved.horizon_ms.map(at),
        fenced: saved.fenced.into_iter().collect(),
        ttl: None,
        unreported: saved
            .unreported
            .into_iter()
            .map(|(id, t, ahead_ms)| Kill {
                id,
                at: now
                    .checked_sub(Duration::from_millis(boot_now.saturating_sub(t)))
                    .unwrap_or(now),
                ahead_ms,
            })
            .collect(),
    }))
}

/// Live QEMU processes this agent's driver started (their `-pidfile` is under `run_root`; other
/// agents on the same machine have their own), by the VM they run (`-name kumo-<id>`), found in
/// /proc: the watchdog kills without waiting for the driver, which serialises calls per VM.
fn qemu_processes(run_root: &Path) -> HashMap<String, Vec<i32>> {
    let mut out: HashMap<String, Vec<i32>> = HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for pid in rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args
            .windows(2)
            .find(|w| w[0] == b"-pidfile")
            .and_then(|w| std::str::from_utf8(w[1]).ok())
            .is_some_and(|p| Path::new(p).starts_with(run_root));
        if !ours {
            continue;
        }
        let name = args
            .windows(2)
            .find(|w| w[0] == b"-name")
            .and_then(|w| std::str::from_utf8(w[1]).ok())
            .and_then(|n| n.split(',').next())
            .and_then(|n| n.strip_prefix("kumo-"));
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|st| {
                st.rfind(')')
                    .and_then(|i| st[i + 1..].split_whitespace().next())
                    .is_some_and(|s| s == "Z" || s == "X")
            })
            .unwrap_or(true);
        if let (Some(id), false) = (name, zombie) {
            out.entry(id.to_string()).or_default().push(pid);
        }
    }
    out
}

impl Agent {
    /// Every [`WATCHDOG_TICK`]: kill the VMs whose lease lapsed. Starts once the first heartbeat
    /// after start-up had its chance to renew leases a previous agent process let lapse.
    pub(crate) async fn watchdog_loop(self: Arc<Self>) {
        let _ = tokio::time::timeout(FIRST_BEAT_GRACE, self.leases.first_beat.notified()).await;
        loop {
            self.fence_lapsed().await;
            tokio::time::sleep(WATCHDOG_TICK).await;
        }
    }

    /// One watchdog pass. Returns the VMs it killed.
    pub(crate) async fn fence_lapsed(&self) -> Vec<String> {
        let wants: HashMap<String, bool> = {
            let map = self.vms.map.lock().await;
            map.iter()
                // An incoming migration's VM is paused and holds no lease until its commit; a VM
                // without HA is never restarted elsewhere, so it is never fenced.
                .filter(|(_, e)| !e.incoming && e.rec.desired.ha)
                .map(|(id, e)| (id.clone(), e.rec.desired.power == DesiredPower::Running))
                .collect()
        };
        let lapsed = self.leases.lapsed(wants.keys());
        if lapsed.is_empty() {
            return vec![];
        }
        // QEMU processes by VM, from one look at /proc (not the driver, which may be busy).
        let procs = if self.hv.name() == "qemu" {
            // The driver names files under its canonical run root.
            let root = self.cfg.data_dir.join("run");
            Some(qemu_processes(
                &std::fs::canonicalize(&root).unwrap_or(root),
            ))
        } else {
            None
        };
        let mut killed = vec![];
        for (id, ahead_ms) in lapsed {
            if wants.get(&id).copied().unwrap_or(false) && !self.leases.is_fenced(&id) {
                self.leases.hold(&id);
                self.save_leases();
            }
            let pids = match &procs {
                Some(p) => p.get(&id).cloned().unwrap_or_default(),
                None => vec![],
            };
            let running = match &procs {
                Some(_) => !pids.is_empty(),
                None => !matches!(
                    tokio::time::timeout(Duration::from_millis(200), self.hv.state(&id)).await,
                    Ok(Ok(PowerState::Stopped))
                ),
            };
            if !running {
                continue;
            }
            self.kill_now(&id, &pids).await;
            tracing::warn!(vm = %id, ahead_ms, "lease lapsing: VM killed (self-fencing)");
            self.leases.record_kill(&id, ahead_ms);
            self.journal_fence(&id, ahead_ms);
            self.save_leases();
            killed.push(id);
        }
        if !killed.is_empty() {
            // Tell the controller as soon as it can hear us.
            self.beat.notify_one();
        }
        killed
    }

    /// SIGKILL the VM's processes at once, then let the driver forget them.
    async fn kill_now(&self, id: &str, pids: &[i32]) {
        for pid in pids {
            if let Err(e) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                tracing::warn!(vm = %id, pid, error = %e, "SIGKILL failed");
            }
        }
        match tokio::time::timeout(KILL_PATIENCE, self.hv.kill(id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %id, error = %chain(&e), "driver kill failed"),
            Err(_) => tracing::warn!(vm = %id, "driver kill still waiting; the process is killed"),
        }
    }

    /// Append the fencing to `DATA_DIR/fencing.log` (the host's own record of it).
    fn journal_fence(&self, id: &str, ahead_ms: i64) {
        let path = self.cfg.data_dir.join("fencing.log");
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let line = format!(
            "unix_ms={unix_ms} vm={id} killed: no lease renewal, {ahead_ms} ms before the lease ended\n"
        );
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "cannot journal a fencing");
        }
    }

    pub(crate) fn save_leases(&self) {
        if let Err(e) = self.leases.save() {
            tracing::warn!(error = %chain(&e), "cannot save leases");
        }
    }

    /// Fresh leases for VMs that were fenced: converge them again (start them).
    pub(crate) async fn revive(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut map = self.vms.map.lock().await;
        for id in ids {
            if let Some(e) = map.get_mut(id) {
                if !e.incoming && e.rec.desired.power == DesiredPower::Running {
                    tracing::info!(vm = %id, "fresh lease: starting the fenced VM again");
                    e.converging = true;
                    e.wake.notify_one();
                }
            }
        }
    }

    /// Grant VM `id` a lease of `ttl` from now (bounded by the heartbeat horizon), e.g. when a
    /// migration commits it here. Without any heartbeat lease yet, nothing is granted.
    pub async fn grant_lease(&self, id: &str, ttl: Duration) {
        let revived = self.leases.grant_one(id, ttl);
        self.save_leases();
        if revived {
            self.revive(&[id.to_string()]).await;
        }
    }

    /// At start-up: VMs meant to run that are not running and hold no valid lease (the host
    /// went down with them) wait for a fresh lease instead of being reported stopped; the
    /// controller grants it only if they still belong here.
    pub(crate) async fn hold_unleased(&self) {
        let ids: Vec<String> = {
            let map = self.vms.map.lock().await;
            map.iter()
                .filter(|(_, e)| !e.incoming && e.rec.desired.power == DesiredPower::Running)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for (id, _) in self.leases.lapsed(ids.iter()) {
            if matches!(self.hv.state(&id).await, Ok(PowerState::Stopped))
                && !self.leases.is_fenced(&id)
            {
                tracing::info!(vm = %id, "not running and no valid lease: waiting for one before starting it");
                self.leases.hold(&id);
            }
        }
        self.save_leases();
    }

    /// Whether VM `id` holds a valid lease now.
    pub fn has_lease(&self, id: &str) -> bool {
        self.leases.valid(id)
    }

    /// A heartbeat sent at `sent` was answered with these leases: take them, renew the lease
    /// files, and start again the fenced VMs they cover.
    pub(crate) async fn take_grant(&self, sent: Instant, grant: &LeaseGrant) {
        let revived = self.leases.grant_heartbeat(sent, grant);
        self.save_leases();
        if let Err(e) = self.leases.files.renew(&grant.vms) {
            tracing::warn!(error = %chain(&e), "cannot renew lease files on the shared pool");
        }
        self.revive(&revived).await;
    }

    /// The start gate: a VM without a valid lease does not start; it waits (fenced) for one.
    /// Nor does a VM whose lease file another host renewed lately.
    pub(crate) fn may_start(&self, id: &str) -> bool {
        if self.leases.valid(id) {
            let ttl = self.leases.lock().ttl.unwrap_or(DEFAULT_TTL);
            match self.leases.files.claimed_elsewhere(id, ttl) {
                Ok(None) => return true,
                Ok(Some(c)) => {
                    tracing::warn!(vm = %id, host = %c.host, age_ms = c.age.as_millis() as u64, "another host renewed this VM's lease file lately: not starting it")
                }
                Err(e) => {
                    tracing::warn!(vm = %id, error = %chain(&e), "cannot read the VM's lease file: not starting it")
                }
            }
            self.leases.hold(id);
            self.save_leases();
            return false;
        }
        if !self.leases.is_fenced(id) {
            tracing::info!(vm = %id, "no valid lease: not starting the VM until one arrives");
            self.leases.hold(id);
            self.save_leases();
        }
        false
    }
}

#[cfg(test)]
mod tests;
