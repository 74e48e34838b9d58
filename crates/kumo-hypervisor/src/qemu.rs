//! The QEMU driver: launches `qemu-system-x86_64` per VM and drives it through QMP.
//!
//! Each VM has a run directory `run_root/<id>/`:
//!
//! | file | what |
//! | --- | --- |
//! | `spec.json` | the [`VmSpec`] it was last started with |
//! | `qemu.pid` | QEMU's pid (written by QEMU's `-pidfile`) |
//! | `qmp.sock` | QMP monitor (one client at a time; the driver holds it) |
//! | `qmp-aux.sock` | a second QMP monitor, free for tools and debugging |
//! | `serial.sock` | interactive serial console (server socket) |
//! | `console.log` | everything the guest wrote to its serial port |
//! | `vnc.sock` | VNC server |
//! | `qemu.log` | QEMU's stdout/stderr of the last start |
//! | `incoming.json` | while QEMU waits for an incoming migration: the URIs it listens on |
//!
//! The directory is the driver's whole state: a new [`QemuDriver`] on the same run root finds the
//! running VMs (pid file, checked against `/proc/<pid>/cmdline` for `-name kumo-<id>`) and
//! re-attaches to their QMP sockets. QEMU runs in its own session with stdin closed, so it
//! survives the agent.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::process::Command;

use crate::qmp::{Qmp, QmpError};
use crate::{
    validate_id, validate_spec, Accel, AccelChoice, AttachedDisk, DiskSpec, Hypervisor,
    HypervisorError, PowerState, SnapshotReport, SnapshotTarget, VmInfo, VmSpec,
};

/// Environment variable overriding the QEMU binary (default `qemu-system-x86_64`).
pub const QEMU_BINARY_ENV: &str = "KUMO_QEMU_BINARY";
const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// Machine type. `pc` and `q35` boot a PVH `vmlinux` equally fast under TCG here (medians
/// 3.03 s vs 3.27 s to poweroff of a busybox initramfs, within noise); `pc` needs no PCIe root
/// ports for hot-plug, so it wins.
pub const MACHINE: &str = "pc";

const START_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

pub(crate) const SPEC_FILE: &str = "spec.json";
const PID_FILE: &str = "qemu.pid";
const QMP_SOCK: &str = "qmp.sock";
const QMP_AUX_SOCK: &str = "qmp-aux.sock";
const SERIAL_SOCK: &str = "serial.sock";
const VNC_SOCK: &str = "vnc.sock";
const CONSOLE_LOG: &str = "console.log";
const QEMU_LOG: &str = "qemu.log";
/// The answer of a pending incoming migration (see `migrate::incoming`); it lives only as long
/// as the QEMU that waits.
pub(crate) const INCOMING_FILE: &str = "incoming.json";

fn qemu_binary() -> String {
    std::env::var(QEMU_BINARY_ENV).unwrap_or_else(|_| DEFAULT_BINARY.to_string())
}

/// Last `max` bytes of a log file, for error messages.
fn log_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).trim().to_string()
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Whether `pid` is a live (not zombie) QEMU started for VM `id`.
fn proc_is_ours(pid: u32, id: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ..."; comm may contain spaces or parentheses.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X") | Some("x")) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = format!("kumo-{id}");
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-name" && w[1] == want.as_bytes())
}

fn read_pidfile(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

async fn wait_exit(pid: u32, id: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !proc_is_ours(pid, id) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn remove_if_exists(path: &Path) -> Result<(), HypervisorError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HypervisorError::io(
            format!("removing {}", path.display()),
            e,
        )),
    }
}

fn status_to_power(status: &str) -> PowerState {
    match status {
        "running" => PowerState::Running,
        // Without -no-shutdown QEMU exits right after a guest shutdown.
        "shutdown" => PowerState::Stopped,
        _ => PowerState::Paused,
    }
}

/// Per-VM driver state (what is not in the run directory is only a cache of it).
#[derive(Default)]
struct Slot {
    pid: Option<u32>,
    qmp: Option<Arc<Qmp>>,
}

struct Inner {
    run_root: PathBuf,
    accel: Accel,
    binary: String,
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

/// The QEMU driver. Cheap to clone (shared state).
#[derive(Clone)]
pub struct QemuDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QemuDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuDriver")
            .field("run_root", &self.inner.run_root)
            .field("accel", &self.inner.accel)
            .finish_non_exhaustive()
    }
}

/// Decide the accelerator: `Tcg` as is, `Kvm` only if the probe passes (error otherwise), `Auto`
/// KVM if the probe passes, else TCG. `scratch_dir` holds the probe's temporary files.
pub async fn probe_accel(
    choice: AccelChoice,
    scratch_dir: &Path,
) -> Result<Accel, HypervisorError> {
    let binary = qemu_binary();
    if choice == AccelChoice::Tcg {
        tracing::info!(accel = "tcg", %choice, "accelerator forced");
        return Ok(Accel::Tcg);
    }
    let started = Instant::now();
    let result = probe::probe_kvm(&binary, scratch_dir, PROBE_TIMEOUT).await;
    let probe_ms = started.elapsed().as_millis() as u64;
    match (result, choice) {
        (Ok(()), _) => {
            tracing::info!(accel = "kvm", %choice, probe_ms, "KVM probe passed");
            Ok(Accel::Kvm)
        }
        (Err(reason), AccelChoice::Kvm) => {
            tracing::error!(%choice, probe_ms, %reason, "KVM forced but unusable");
            Err(HypervisorError::AccelUnavailable(reason))
        }
        (Err(reason), _) => {
            tracing::info!(accel = "tcg", %choice, probe_ms, %reason, "KVM probe failed, falling back to TCG");
            Ok(Accel::Tcg)
        }
    }
}

impl QemuDriver {
    /// Create the driver: check QEMU, choose the accelerator (probing KVM unless TCG is forced)
    /// and re-attach to the VMs already running under `run_root`.
    pub async fn new(run_root: PathBuf, accel: AccelChoice) -> Result<Self, HypervisorError> {
        std::fs::create_dir_all(&run_root).map_err(|e| {
            HypervisorError::io(format!("creating run root {}", run_root.display()), e)
        })?;
        let run_root = std::fs::canonicalize(&run_root).map_err(|e| {
            HypervisorError::io(format!("resolving run root {}", run_root.display()), e)
        })?;
        match run_root.to_str() {
            Some(s) if !s.contains(',') => {}
            _ => {
                return Err(HypervisorError::InvalidSpec(format!(
                    "run root {} must be UTF-8 without commas",
                    run_root.display()
                )))
            }
        }
        let binary = qemu_binary();
        let version = tokio::time::timeout(
            Duration::from_secs(10),
            Command::new(&binary)
                .arg("--version")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| HypervisorError::Timeout(format!("{binary} --version")))?
        .map_err(|e| HypervisorError::io(format!("running {binary} --version"), e))?;
        let version = String::from_utf8_lossy(&version.stdout);
        let version = version.lines().next().unwrap_or("").to_string();
        let accel = probe_accel(accel, &run_root).await?;
        tracing::info!(%binary, %version, %accel, run_root = %run_root.display(), "QEMU driver ready");
        let driver = QemuDriver {
            inner: Arc::new(Inner {
                run_root,
                accel,
                binary,
                slots: Mutex::new(HashMap::new()),
            }),
        };
        driver.reattach().await;
        Ok(driver)
    }

    /// The directory holding every VM's run directory.
    pub fn run_root(&self) -> &Path {
        &self.inner.run_root
    }

    /// `run_root/<id>`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.inner.run_root.join(id)
    }

    /// A second QMP socket of the VM that the driver never connects to: for tools, debugging and
    /// code that wants its own session (`Qmp::connect(driver.aux_qmp_socket(id))`).
    pub fn aux_qmp_socket(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(QMP_AUX_SOCK)
    }

    /// The driver's QMP connection to a running VM, for commands beyond the trait (block jobs,
    /// migration, hot-plug). Share it: QEMU serves one QMP client per socket at a time.
    pub async fn qmp(&self, id: &str) -> Result<Arc<Qmp>, HypervisorError> {
        validate_id(id)?;
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        if self.live_pid(&mut slot, id).is_none() {
            return Err(HypervisorError::NotRunning(id.to_string()));
        }
        Ok(self.qmp_for(&mut slot, id, QMP_CONNECT_TIMEOUT).await?)
    }

    fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(id.to_string()).or_default())
    }

    fn ids_on_disk(&self) -> Result<Vec<String>, HypervisorError> {
        let rd = std::fs::read_dir(&self.inner.run_root).map_err(|e| {
            HypervisorError::io(
                format!("reading run root {}", self.inner.run_root.display()),
                e,
            )
        })?;
        let mut ids = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| HypervisorError::io("reading run root entry", e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if validate_id(&name).is_ok() && entry.path().join(SPEC_FILE).is_file() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    async fn reattach(&self) {
        let ids = match self.ids_on_disk() {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot scan run root for running VMs");
                return;
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let this = self.clone();
            tasks.spawn(async move {
                let slot = this.slot(&id);
                let mut slot = slot.lock().await;
                if let Some(pid) = this.live_pid(&mut slot, &id) {
                    match this.qmp_for(&mut slot, &id, QMP_CONNECT_TIMEOUT).await {
                        Ok(_) => tracing::info!(%id, pid, "re-attached to running VM"),
                        Err(e) => {
                            tracing::warn!(%id, pid, error = %e, "running VM found but QMP not reachable yet")
                        }
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// The pid of the VM's live QEMU, from the cache or the pid file, verified in /proc.
    fn live_pid(&self, slot: &mut Slot, id: &str) -> Option<u32> {
        let candidates = [slot.pid, read_pidfile(&self.run_dir(id))];
        let pid = candidates
            .into_iter()
            .flatten()
            .find(|pid| proc_is_ours(*pid, id));
        if pid.is_none() {
            slot.pid = None;
            slot.qmp = None;
        } else {
            slot.pid = pid;
        }
        pid
    }

    async fn qmp_for(
        &self,
        slot: &mut Slot,
        id: &str,
        timeout: Duration,
    ) -> Result<Arc<Qmp>, QmpError> {
        if let Some(q) = &slot.qmp {
            if !q.is_closed() {
                return Ok(Arc::clone(q));
            }
        }
        slot.qmp = None;
        let q =
            Arc::new(Qmp::connect_with_timeout(self.run_dir(id).join(QMP_SOCK), timeout).await?);
        slot.qmp = Some(Arc::clone(&q));
        Ok(q)
    }

    async fn power_state(&self, slot: &mut Slot, id: &str) -> PowerState {
        if self.live_pid(slot, id).is_none() {
            return PowerState::Stopped;
        }
        let status = match self.qmp_for(slot, id, QMP_CONNECT_TIMEOUT).await {
            Ok(q) => q
                .execute_with_timeout("query-status", Value::Null, QMP_COMMAND_TIMEOUT)
                .await
                .and_then(|v| Ok(serde_json::from_value::<crate::qmp::StatusInfo>(v)?)),
            Err(e) => Err(e),
        };
        match status {
            Ok(s) => status_to_power(&s.status),
            Err(e) => {
                if self.live_pid(slot, id).is_some() {
                    tracing::warn!(%id, error = %e, "QMP unavailable; reporting Running from the live process");
                    PowerState::Running
                } else {
                    PowerState::Stopped
                }
            }
        }
    }

    fn clear_runtime_files(&self, id: &str) {
        let dir = self.run_dir(id);
        for f in [
            PID_FILE,
            QMP_SOCK,
            QMP_AUX_SOCK,
            SERIAL_SOCK,
            VNC_SOCK,
            INCOMING_FILE,
        ] {
            if let Err(e) = remove_if_exists(&dir.join(f)) {
                tracing::warn!(%id, error = %e, "cannot remove runtime file");
            }
        }
    }

    /// `quit` through QMP, then SIGKILL; returns once the process is gone.
    async fn force_off(
        &self,
        slot: &mut Slot,
        id: &str,
        pid: u32,
        quit_timeout: Duration,
    ) -> Result<(), HypervisorError> {
        match self.qmp_for(slot, id, quit_timeout).await {
            Ok(q) => match q
                .execute_with_timeout("quit", Value::Null, quit_timeout)
                .await
            {
                Ok(_) | Err(QmpError::Closed) => {}
                Err(e) => tracing::debug!(%id, error = %e, "QMP quit failed"),
            },
            Err(e) => tracing::debug!(%id, error = %e, "no QMP for quit"),
        }
        if wait_exit(pid, id, Duration::from_secs(2)).await {
            return Ok(());
        }
        tracing::warn!(%id, pid, "QEMU did not quit; sending SIGKILL");
        if proc_is_ours(pid, id) {
            // SAFETY: plain kill(2) on a pid just verified to be this VM's QEMU.
            let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(HypervisorError::io(format!("killing pid {pid}"), e));
                }
            }
        }
        if wait_exit(pid, id, Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(HypervisorError::Timeout(format!(
                "VM {id} (pid {pid}) still alive after SIGKILL"
            )))
        }
    }

    fn check_files(spec: &VmSpec) -> Result<(), HypervisorError> {
        let mut files: Vec<(String, &Path)> = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("disk {i}"), d.path.as_path()))
            .collect();
        if let Some(k) = &spec.kernel {
            files.push(("kernel".into(), k));
        }
        if let Some(i) = &spec.initrd {
            files.push(("initrd".into(), i));
        }
        for (what, p) in files {
            if let Err(e) = std::fs::metadata(p) {
                return Err(HypervisorError::InvalidSpec(format!(
                    "{what}: {}: {e}",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// Launch the destination QEMU of an incoming migration (`-incoming defer -S`), unless one
    /// runs already. Returns its info and whether this call launched it.
    pub(crate) async fn launch_incoming(
        &self,
        spec: &VmSpec,
    ) -> Result<(VmInfo, bool), HypervisorError> {
        validate_spec(spec)?;
        let slot = self.slot(&spec.id);
        let mut slot = slot.lock().await;
        if let Some(pid) = self.live_pid(&mut slot, &spec.id) {
            let state = self.power_state(&mut slot, &spec.id).await;
            let info = VmInfo {
                id: spec.id.clone(),
                pid: Some(pid),
                state,
            };
            return Ok((info, false));
        }
        Self::check_files(spec)?;
        Ok((self.launch(spec, &mut slot, true).await?, true))
    }

    /// Start QEMU for `spec`; `incoming`: as a paused migration destination
    /// (`-incoming defer -S`, ready once QMP reports `inmigrate`).
    async fn launch(
        &self,
        spec: &VmSpec,
        slot: &mut Slot,
        incoming: bool,
    ) -> Result<VmInfo, HypervisorError> {
        let id = &spec.id;
        let dir = self.run_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| HypervisorError::io(format!("creating {}", dir.display()), e))?;
        for sock in [QMP_SOCK, QMP_AUX_SOCK, SERIAL_SOCK, VNC_SOCK] {
            let len = dir.join(sock).as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(HypervisorError::InvalidSpec(format!(
                    "socket path {} is {len} bytes, longer than the {MAX_SOCKET_PATH} a unix socket allows",
                    dir.join(sock).display()
                )));
            }
        }
        self.clear_runtime_files(id);
        let spec_path = dir.join(SPEC_FILE);
        let tmp = dir.join(format!("{SPEC_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(spec)?)
            .and_then(|()| std::fs::rename(&tmp, &spec_path))
            .map_err(|e| HypervisorError::io(format!("writing {}", spec_path.display()), e))?;

        let log_path = dir.join(QEMU_LOG);
        let log = std::fs::File::create(&log_path)
            .map_err(|e| HypervisorError::io(format!("creating {}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HypervisorError::io("cloning log file handle", e))?;
        let mut args = qemu_args(spec, self.inner.accel, &dir);
        if incoming {
            // -S as well: the guest must not run before the source's last mirror copy landed
            // and the agent says `cont` (finish_incoming).
            args.extend(["-incoming", "defer", "-S"].map(String::from));
        }
        let ready_status = if incoming { "inmigrate" } else { "running" };
        let mut cmd = match &spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), self.inner.binary.as_str()]);
                c
            }
            None => Command::new(&self.inner.binary),
        };
        cmd.args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        // SAFETY: setsid(2) is async-signal-safe; it detaches QEMU from the agent's session and
        // process group so signals aimed at the agent (terminal, systemd stop of the group,
        // Ctrl-C) do not reach the VMs.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::debug!(%id, binary = %self.inner.binary, args = ?args, "launching QEMU");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| HypervisorError::io(format!("spawning {}", self.inner.binary), e))?;
        let child_pid = child.id();
        let qmp_path = dir.join(QMP_SOCK);
        let deadline = started + START_TIMEOUT;
        let mut qmp: Option<Qmp> = None;
        let failure = loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    break Some(HypervisorError::StartFailed {
                        id: id.clone(),
                        reason: format!("QEMU exited with {status}"),
                        stderr_tail: log_tail(&log_path, 2000),
                    })
                }
                Ok(None) => {}
                Err(e) => break Some(HypervisorError::io("waiting for QEMU", e)),
            }
            if Instant::now() >= deadline {
                break Some(HypervisorError::Timeout(format!(
                    "VM {id} did not report running on QMP within {START_TIMEOUT:?}; QEMU output: {}",
                    log_tail(&log_path, 2000)
                )));
            }
            if qmp.is_none() && qmp_path.exists() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                qmp = Qmp::connect_with_timeout(&qmp_path, remaining.min(QMP_CONNECT_TIMEOUT))
                    .await
                    .ok();
            }
            if let Some(q) = &qmp {
                match q.query_status().await {
                    Ok(s) if s.status == ready_status => break None,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(%id, error = %e, "query-status during start failed");
                        qmp = None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if let Some(err) = failure {
            drop(qmp);
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            self.clear_runtime_files(id);
            tracing::warn!(%id, error = %err, "VM start failed");
            return Err(err);
        }
        let pid = read_pidfile(&dir).or(child_pid);
        // Reap QEMU when it exits (pid 1 in containers may not), without tying it to us.
        let reap_id = id.clone();
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => tracing::info!(id = %reap_id, %status, "QEMU exited"),
                Err(e) => tracing::warn!(id = %reap_id, error = %e, "waiting for QEMU failed"),
            }
        });
        slot.pid = pid;
        slot.qmp = qmp.map(Arc::new);
        tracing::info!(%id, pid = ?pid, accel = %self.inner.accel, incoming, ready_ms = started.elapsed().as_millis() as u64, "VM started");
        Ok(VmInfo {
            id: id.clone(),
            pid,
            state: if incoming {
                PowerState::Paused
            } else {
                PowerState::Running
            },
        })
    }
}

#[async_trait::async_trait]
impl Hypervisor for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Option<Accel> {
        Some(self.inner.accel)
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmInfo, HypervisorError> {
        validate_spec(spec)?;
        let slot = self.slot(&spec.id);
        let mut slot = slot.lock().await;
        if let Some(pid) = self.live_pid(&mut slot, &spec.id) {
            let state = self.power_state(&mut slot, &spec.id).await;
            return Ok(VmInfo {
                id: spec.id.clone(),
                pid: Some(pid),
                state,
            });
        }
        Self::check_files(spec)?;
        self.launch(spec, &mut slot, false).await
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), HypervisorError> {
        validate_id(id)?;
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        let Some(pid) = self.live_pid(&mut slot, id) else {
            self.clear_runtime_files(id);
            return Ok(());
        };
        let started = Instant::now();
        match self.qmp_for(&mut slot, id, QMP_CONNECT_TIMEOUT).await {
            Ok(q) => {
                if let Err(e) = q
                    .execute_with_timeout("system_powerdown", Value::Null, QMP_COMMAND_TIMEOUT)
                    .await
                {
                    tracing::warn!(%id, error = %e, "system_powerdown failed");
                }
            }
            Err(e) => tracing::warn!(%id, error = %e, "no QMP for system_powerdown"),
        }
        let remaining = timeout.saturating_sub(started.elapsed());
        if wait_exit(pid, id, remaining).await {
            tracing::info!(%id, pid, "VM powered off");
        } else {
            tracing::info!(%id, pid, ?timeout, "guest ignored ACPI power-down; forcing");
            self.force_off(&mut slot, id, pid, Duration::from_secs(2))
                .await?;
        }
        slot.pid = None;
        slot.qmp = None;
        self.clear_runtime_files(id);
        Ok(())
    }

    async fn kill(&self, id: &str) -> Result<(), HypervisorError> {
        validate_id(id)?;
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        if let Some(pid) = self.live_pid(&mut slot, id) {
            self.force_off(&mut slot, id, pid, Duration::from_millis(500))
                .await?;
            tracing::info!(%id, pid, "VM killed");
        }
        slot.pid = None;
        slot.qmp = None;
        self.clear_runtime_files(id);
        Ok(())
    }

    async fn reboot(&self, id: &str) -> Result<(), HypervisorError> {
        validate_id(id)?;
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        if self.live_pid(&mut slot, id).is_none() {
            return Err(HypervisorError::NotRunning(id.to_string()));
        }
        let q = self.qmp_for(&mut slot, id, QMP_CONNECT_TIMEOUT).await?;
        q.execute_with_timeout("system_reset", Value::Null, QMP_COMMAND_TIMEOUT)
            .await?;
        tracing::info!(%id, "VM reset");
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<PowerState, HypervisorError> {
        validate_id(id)?;
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        Ok(self.power_state(&mut slot, id).await)
    }

    async fn list(&self) -> Result<Vec<VmInfo>, HypervisorError> {
        let mut out = Vec::new();
        for id in self.ids_on_disk()? {
            let slot = self.slot(&id);
            let mut slot = slot.lock().await;
            let state = self.power_state(&mut slot, &id).await;
            let pid = if state == PowerState::Stopped {
                None
            } else {
                slot.pid
            };
            out.push(VmInfo { id, pid, state });
        }
        Ok(out)
    }

    async fn cleanup(&self, id: &str) -> Result<(), HypervisorError> {
        validate_id(id)?;
        let slot_arc = self.slot(id);
        let mut slot = slot_arc.lock().await;
        if self.live_pid(&mut slot, id).is_some() {
            return Err(HypervisorError::StillRunning(id.to_string()));
        }
        let dir = self.run_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HypervisorError::io(
                    format!("removing {}", dir.display()),
                    e,
                ))
            }
        }
        drop(slot);
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Only forget the slot if nobody else is waiting on it.
        if Arc::strong_count(&slot_arc) <= 2 {
            slots.remove(id);
        }
        Ok(())
    }

    fn console_log(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(CONSOLE_LOG)
    }

    fn serial_socket(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(SERIAL_SOCK)
    }

    fn vnc_socket(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(VNC_SOCK)
    }

    async fn attach_disk(&self, id: &str, disk: &DiskSpec) -> Result<(), HypervisorError> {
        crate::block::attach_disk(self, id, disk).await
    }

    async fn detach_disk(
        &self,
        id: &str,
        device_id: &str,
        timeout: Duration,
    ) -> Result<(), HypervisorError> {
        crate::block::detach_disk(self, id, device_id, timeout).await
    }

    async fn attached_disks(&self, id: &str) -> Result<Vec<AttachedDisk>, HypervisorError> {
        crate::block::attached_disks(self, id).await
    }

    async fn resize_disk(
        &self,
        id: &str,
        device_id: &str,
        size_bytes: u64,
    ) -> Result<(), HypervisorError> {
        crate::block::resize_disk(self, id, device_id, size_bytes).await
    }

    async fn snapshot_disks(
        &self,
        id: &str,
        disks: &[SnapshotTarget],
    ) -> Result<SnapshotReport, HypervisorError> {
        crate::block::snapshot_disks(self, id, disks).await
    }

    async fn backup_disk(
        &self,
        id: &str,
        job: &crate::BackupJob,
        progress: &(dyn Fn(u64, u64) -> bool + Send + Sync),
    ) -> Result<crate::BackupReport, HypervisorError> {
        self.backup_disk_impl(id, job, progress).await
    }

    async fn disk_bitmaps(
        &self,
        id: &str,
        device_id: &str,
    ) -> Result<Vec<String>, HypervisorError> {
        self.disk_bitmaps_impl(id, device_id).await
    }

    async fn remove_bitmap(
        &self,
        id: &str,
        device_id: &str,
        name: &str,
    ) -> Result<(), HypervisorError> {
        self.remove_bitmap_impl(id, device_id, name).await
    }

    async fn start_incoming(
        &self,
        spec: &VmSpec,
        inc: &crate::IncomingSpec,
    ) -> Result<crate::IncomingReady, HypervisorError> {
        self.start_incoming_impl(spec, inc).await
    }

    async fn finish_incoming(&self, id: &str) -> Result<(), HypervisorError> {
        self.finish_incoming_impl(id).await
    }

    async fn incoming_completed(&self, id: &str) -> Result<bool, HypervisorError> {
        self.incoming_completed_impl(id).await
    }

    async fn migrate(
        &self,
        id: &str,
        m: &crate::MigrateSpec,
        progress: &(dyn for<'p> Fn(&'p crate::MigrationProgress) -> bool + Send + Sync),
    ) -> Result<crate::MigrationReport, HypervisorError> {
        self.migrate_impl(id, m, progress).await
    }

    async fn resume_after_migration(&self, id: &str) -> Result<(), HypervisorError> {
        self.resume_after_migration_impl(id).await
    }
}

mod args;
mod probe;
pub use args::qemu_args;
use args::{opt, path_str};
#[cfg(test)]
mod tests;
