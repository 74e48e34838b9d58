//! The simulated hypervisor: all state in memory, instant transitions.
//!
//! It writes one line, `KUMO-GUEST-BOOTED id=<id>`, to `run_root/<id>/console.log` on every
//! (re)boot so console APIs have something to show. It is cheap enough for thousands of
//! simulated hosts in one process. It never stands in for a test that claims real VM behaviour.
//!
//! Each VM's spec and power state are also kept in `run_root/<id>/sim.json` and read back by
//! [`SimDriver::new`]: like QEMU processes, simulated VMs outlive a restart of the agent.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::{
    block, migrate, validate_id, validate_spec, Accel, AttachedDisk, DiskSpec, Hypervisor,
    HypervisorError, IncomingReady, IncomingSpec, MigrateSpec, MigrationPhase, MigrationProgress,
    MigrationReport, NbdTarget, PowerState, SnapshotReport, SnapshotTarget, VmInfo, VmSpec,
};

#[derive(serde::Serialize, serde::Deserialize)]
struct SimVm {
    spec: VmSpec,
    state: PowerState,
    /// The disks plugged in now (the spec's at start, then hot-plugs).
    #[serde(default)]
    disks: Vec<AttachedDisk>,
    /// Set by start_incoming: the VM waits (Paused) for a migration.
    #[serde(default)]
    incoming: Option<SimIncoming>,
    /// Paused by a completed outgoing migration (QEMU's `postmigrate`).
    #[serde(default)]
    migrated: bool,
    /// Test hook: the next migrate() fails with this message.
    #[serde(default)]
    fail_migration: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SimIncoming {
    inc: IncomingSpec,
    ready: IncomingReady,
    /// The simulated stream arrives at once; a test hook can say otherwise.
    completed: bool,
}

const STATE_FILE: &str = "sim.json";

/// In-memory hypervisor for controller tests.
pub struct SimDriver {
    run_root: PathBuf,
    vms: Mutex<HashMap<String, SimVm>>,
}

impl std::fmt::Debug for SimDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDriver")
            .field("run_root", &self.run_root)
            .finish_non_exhaustive()
    }
}

impl SimDriver {
    /// Nothing is created on disk until a VM starts. VMs a previous driver on the same
    /// `run_root` left are picked up.
    pub fn new(run_root: PathBuf) -> Self {
        let mut vms = HashMap::new();
        for e in std::fs::read_dir(&run_root).into_iter().flatten().flatten() {
            let Ok(b) = std::fs::read(e.path().join(STATE_FILE)) else {
                continue;
            };
            match serde_json::from_slice::<SimVm>(&b) {
                Ok(vm) => {
                    vms.insert(vm.spec.id.clone(), vm);
                }
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "ignoring unreadable sim VM state")
                }
            }
        }
        SimDriver {
            run_root,
            vms: Mutex::new(vms),
        }
    }

    /// Record a VM's spec and state (write a temp file, rename).
    fn save(&self, vm: &SimVm) -> Result<(), HypervisorError> {
        let dir = self.run_root.join(&vm.spec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| HypervisorError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let data = serde_json::to_vec(vm).unwrap_or_default();
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| HypervisorError::io(format!("writing {}", path.display()), e))
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimVm>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn boot_line(&self, id: &str) -> Result<(), HypervisorError> {
        let dir = self.run_root.join(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| HypervisorError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join("console.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| HypervisorError::io(format!("opening {}", path.display()), e))?;
        writeln!(f, "KUMO-GUEST-BOOTED id={id}")
            .map_err(|e| HypervisorError::io(format!("writing {}", path.display()), e))
    }

    /// The spec a VM was last started with.
    pub fn spec(&self, id: &str) -> Option<VmSpec> {
        self.vms().get(id).map(|vm| vm.spec.clone())
    }

    /// Test hook: pause a running VM (as after a QMP `stop`).
    pub fn pause(&self, id: &str) -> Result<(), HypervisorError> {
        self.set_state(id, PowerState::Running, PowerState::Paused)
    }

    /// Test hook: resume a paused VM.
    pub fn resume(&self, id: &str) -> Result<(), HypervisorError> {
        self.set_state(id, PowerState::Paused, PowerState::Running)
    }

    /// Test hook: the VM dies on its own (guest crash, QEMU killed from outside).
    pub fn crash(&self, id: &str) {
        if let Some(vm) = self.vms().get_mut(id) {
            vm.state = PowerState::Stopped;
            let _ = self.save(vm);
        }
    }

    /// Test hook: whether the incoming migration of a VM waiting for one has completed (it
    /// completes at once by default).
    pub fn set_incoming_completed(&self, id: &str, completed: bool) -> Result<(), HypervisorError> {
        self.with_vm(id, |vm| match vm.incoming.as_mut() {
            Some(i) => {
                i.completed = completed;
                Ok(())
            }
            None => Err(HypervisorError::InvalidState(format!(
                "VM {id} is not an incoming migration"
            ))),
        })
    }

    /// Test hook: the next migrate() of this VM fails with `reason` (the VM keeps running).
    pub fn fail_next_migration(&self, id: &str, reason: &str) -> Result<(), HypervisorError> {
        self.with_vm(id, |vm| {
            vm.fail_migration = Some(reason.to_string());
            Ok(())
        })
    }

    /// Run `f` on a running (or paused) VM and save it.
    fn with_vm<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut SimVm) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        validate_id(id)?;
        let mut vms = self.vms();
        match vms.get_mut(id) {
            Some(vm) if vm.state != PowerState::Stopped => {
                let out = f(vm)?;
                self.save(vm)?;
                Ok(out)
            }
            _ => Err(HypervisorError::NotRunning(id.to_string())),
        }
    }

    /// Run `f` on the disks of a running (or paused) VM and save the VM.
    fn with_disks<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Vec<AttachedDisk>) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        validate_id(id)?;
        let mut vms = self.vms();
        match vms.get_mut(id) {
            Some(vm) if vm.state != PowerState::Stopped => {
                let out = f(&mut vm.disks)?;
                self.save(vm)?;
                Ok(out)
            }
            _ => Err(HypervisorError::NotRunning(id.to_string())),
        }
    }

    fn set_state(&self, id: &str, from: PowerState, to: PowerState) -> Result<(), HypervisorError> {
        let mut vms = self.vms();
        match vms.get_mut(id) {
            Some(vm) if vm.state == from => {
                vm.state = to;
                self.save(vm)
            }
            _ => Err(HypervisorError::NotRunning(id.to_string())),
        }
    }
}

impl SimVm {
    fn new(spec: &VmSpec, state: PowerState) -> Self {
        SimVm {
            spec: spec.clone(),
            state,
            disks: spec
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| block::sim_disk(block::device_id(i, d), block::node_name(i, d), d))
                .collect(),
            incoming: None,
            migrated: false,
            fail_migration: None,
        }
    }
}

/// What the simulated destination answers: fixed ports (nothing listens), writable disks only.
fn sim_ready(spec: &VmSpec, inc: &IncomingSpec) -> IncomingReady {
    let nbd_targets = if inc.nbd {
        spec.disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only)
            .map(|(i, d)| {
                let dev = block::device_id(i, d);
                NbdTarget {
                    uri: migrate::nbd_uri(inc.listen_ip, 49153, &dev),
                    device_id: dev,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    IncomingReady {
        migrate_uri: migrate::tcp_uri(inc.listen_ip, 49152),
        nbd_targets,
    }
}

#[async_trait::async_trait]
impl Hypervisor for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn accel(&self) -> Option<Accel> {
        None
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmInfo, HypervisorError> {
        validate_spec(spec)?;
        {
            let mut vms = self.vms();
            if let Some(vm) = vms.get(&spec.id) {
                if vm.state != PowerState::Stopped {
                    return Ok(VmInfo {
                        id: spec.id.clone(),
                        pid: None,
                        state: vm.state,
                    });
                }
            }
            let vm = SimVm::new(spec, PowerState::Running);
            self.save(&vm)?;
            vms.insert(spec.id.clone(), vm);
        }
        self.boot_line(&spec.id)?;
        Ok(VmInfo {
            id: spec.id.clone(),
            pid: None,
            state: PowerState::Running,
        })
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<(), HypervisorError> {
        self.kill(id).await
    }

    async fn kill(&self, id: &str) -> Result<(), HypervisorError> {
        validate_id(id)?;
        if let Some(vm) = self.vms().get_mut(id) {
            if vm.state != PowerState::Stopped {
                vm.state = PowerState::Stopped;
                self.save(vm)?;
            }
        }
        Ok(())
    }

    async fn reboot(&self, id: &str) -> Result<(), HypervisorError> {
        validate_id(id)?;
        let running = matches!(
            self.vms().get(id).map(|vm| vm.state),
            Some(PowerState::Running | PowerState::Paused)
        );
        if !running {
            return Err(HypervisorError::NotRunning(id.to_string()));
        }
        self.boot_line(id)
    }

    async fn state(&self, id: &str) -> Result<PowerState, HypervisorError> {
        validate_id(id)?;
        Ok(self
            .vms()
            .get(id)
            .map(|vm| vm.state)
            .unwrap_or(PowerState::Stopped))
    }

    async fn list(&self) -> Result<Vec<VmInfo>, HypervisorError> {
        let mut out: Vec<VmInfo> = self
            .vms()
            .iter()
            .map(|(id, vm)| VmInfo {
                id: id.clone(),
                pid: None,
                state: vm.state,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn cleanup(&self, id: &str) -> Result<(), HypervisorError> {
        validate_id(id)?;
        {
            let mut vms = self.vms();
            if let Some(vm) = vms.get(id) {
                if vm.state != PowerState::Stopped {
                    return Err(HypervisorError::StillRunning(id.to_string()));
                }
            }
            vms.remove(id);
        }
        let dir = self.run_root.join(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HypervisorError::io(
                format!("removing {}", dir.display()),
                e,
            )),
        }
    }

    fn console_log(&self, id: &str) -> PathBuf {
        self.run_root.join(id).join("console.log")
    }

    fn serial_socket(&self, id: &str) -> PathBuf {
        self.run_root.join(id).join("serial.sock")
    }

    fn vnc_socket(&self, id: &str) -> PathBuf {
        self.run_root.join(id).join("vnc.sock")
    }

    async fn attach_disk(&self, id: &str, disk: &DiskSpec) -> Result<(), HypervisorError> {
        let dev = block::validate_attach(disk)?;
        self.with_disks(id, |disks| {
            match disks.iter().find(|d| d.device_id == dev) {
                Some(d) if d.file == disk.path => {}
                Some(d) => {
                    return Err(HypervisorError::InvalidSpec(format!(
                        "VM {id} already has disk {dev} with file {}",
                        d.file.display()
                    )))
                }
                None => disks.push(block::sim_disk(dev.into(), dev.into(), disk)),
            }
            Ok(())
        })
    }

    async fn detach_disk(
        &self,
        id: &str,
        device_id: &str,
        _timeout: Duration,
    ) -> Result<(), HypervisorError> {
        block::validate_device_id(device_id)?;
        // The simulated guest releases the device at once.
        self.with_disks(id, |disks| {
            disks.retain(|d| d.device_id != device_id);
            Ok(())
        })
    }

    async fn attached_disks(&self, id: &str) -> Result<Vec<AttachedDisk>, HypervisorError> {
        self.with_disks(id, |disks| Ok(disks.clone()))
    }

    async fn resize_disk(
        &self,
        id: &str,
        device_id: &str,
        size_bytes: u64,
    ) -> Result<(), HypervisorError> {
        block::validate_size(size_bytes)?;
        self.with_disks(id, |disks| {
            let d = disks
                .iter_mut()
                .find(|d| d.device_id == device_id)
                .ok_or_else(|| {
                    HypervisorError::InvalidSpec(format!("VM {id} has no disk {device_id}"))
                })?;
            if size_bytes < d.size_bytes {
                return Err(HypervisorError::InvalidSpec(format!(
                    "disk {device_id} of VM {id} is {} bytes: it cannot shrink to {size_bytes}",
                    d.size_bytes
                )));
            }
            d.size_bytes = size_bytes;
            Ok(())
        })
    }

    async fn snapshot_disks(
        &self,
        id: &str,
        disks: &[SnapshotTarget],
    ) -> Result<SnapshotReport, HypervisorError> {
        block::validate_targets(disks)?;
        // Nothing is recorded: the simulated disks keep their files.
        self.with_disks(id, |attached| {
            let mut nodes = Vec::with_capacity(disks.len());
            for t in disks {
                let Some(d) = attached.iter().find(|d| d.device_id == t.device_id) else {
                    return Err(HypervisorError::InvalidSpec(format!(
                        "VM {id} has no disk {}",
                        t.device_id
                    )));
                };
                nodes.push(format!("{}.snap", d.node));
            }
            Ok(SnapshotReport {
                pause: Duration::ZERO,
                nodes,
            })
        })
    }

    async fn backup_disk(
        &self,
        id: &str,
        _job: &crate::BackupJob,
        _progress: &(dyn Fn(u64, u64) -> bool + Send + Sync),
    ) -> Result<crate::BackupReport, HypervisorError> {
        validate_id(id)?;
        Err(HypervisorError::Unsupported(
            "the sim driver has no disks to back up".into(),
        ))
    }

    async fn disk_bitmaps(
        &self,
        id: &str,
        _device_id: &str,
    ) -> Result<Vec<String>, HypervisorError> {
        validate_id(id)?;
        Ok(Vec::new())
    }

    async fn remove_bitmap(
        &self,
        id: &str,
        _device_id: &str,
        _name: &str,
    ) -> Result<(), HypervisorError> {
        validate_id(id)
    }

    async fn start_incoming(
        &self,
        spec: &VmSpec,
        inc: &IncomingSpec,
    ) -> Result<IncomingReady, HypervisorError> {
        validate_spec(spec)?;
        migrate::check_listen_ip(inc.listen_ip)?;
        let mut vms = self.vms();
        if let Some(vm) = vms.get(&spec.id) {
            if vm.state != PowerState::Stopped {
                return match &vm.incoming {
                    Some(i) if vm.state == PowerState::Paused && i.inc == *inc => {
                        Ok(i.ready.clone())
                    }
                    _ => Err(HypervisorError::InvalidState(format!(
                        "VM {} already runs on this host",
                        spec.id
                    ))),
                };
            }
        }
        let ready = sim_ready(spec, inc);
        let mut vm = SimVm::new(spec, PowerState::Paused);
        vm.incoming = Some(SimIncoming {
            inc: inc.clone(),
            ready: ready.clone(),
            completed: true,
        });
        self.save(&vm)?;
        vms.insert(spec.id.clone(), vm);
        Ok(ready)
    }

    async fn finish_incoming(&self, id: &str) -> Result<(), HypervisorError> {
        self.with_vm(id, |vm| {
            if vm.state == PowerState::Running {
                return Ok(());
            }
            if vm.migrated {
                return Err(HypervisorError::InvalidState(format!(
                    "VM {id} is the source of a completed migration, not a destination"
                )));
            }
            match &vm.incoming {
                Some(i) if i.completed => {
                    vm.state = PowerState::Running;
                    Ok(())
                }
                _ => Err(HypervisorError::MigrationFailed(format!(
                    "the incoming migration of VM {id} did not complete; the VM stays paused"
                ))),
            }
        })
    }

    async fn incoming_completed(&self, id: &str) -> Result<bool, HypervisorError> {
        self.with_vm(id, |vm| {
            Ok(!vm.migrated && vm.incoming.as_ref().is_some_and(|i| i.completed))
        })
    }

    async fn migrate(
        &self,
        id: &str,
        m: &MigrateSpec,
        progress: &(dyn for<'p> Fn(&'p MigrationProgress) -> bool + Send + Sync),
    ) -> Result<MigrationReport, HypervisorError> {
        migrate::check_migrate_spec(m)?;
        // Checked and decided under the lock; the callback runs outside it.
        let (ram, disk) = self.with_vm(id, |vm| {
            if vm.state != PowerState::Running || vm.migrated {
                return Err(HypervisorError::InvalidState(format!(
                    "VM {id} is not running: only a running VM migrates"
                )));
            }
            migrate::check_targets(id, &vm.disks, &m.target.nbd_targets)?;
            if let Some(reason) = vm.fail_migration.take() {
                return Err(HypervisorError::MigrationFailed(reason));
            }
            let disk: u64 = if m.target.nbd_targets.is_empty() {
                0
            } else {
                vm.disks
                    .iter()
                    .filter(|d| !d.read_only)
                    .map(|d| d.size_bytes)
                    .sum()
            };
            Ok((vm.spec.memory_mib << 20, disk))
        })?;
        let p = MigrationProgress {
            phase: MigrationPhase::Completed,
            disk_done: disk,
            disk_total: disk,
            ram_done: ram,
            ram_total: ram,
            ram_remaining: 0,
            passes: 2,
            throttle_pct: 0,
        };
        if !progress(&p) {
            return Err(HypervisorError::Cancelled(format!("migration of VM {id}")));
        }
        self.with_vm(id, |vm| {
            vm.state = PowerState::Paused;
            vm.migrated = true;
            Ok(())
        })?;
        // As if copied at 1 GB/s, with a short switch-over.
        let memory_ms = 20 + ram / 1_000_000;
        Ok(MigrationReport {
            total_ms: memory_ms + disk / 1_000_000,
            downtime_ms: 15,
            ram_bytes: ram,
            disk_bytes: disk,
            memory_ms,
        })
    }

    async fn resume_after_migration(&self, id: &str) -> Result<(), HypervisorError> {
        self.with_vm(id, |vm| {
            if vm.incoming.is_some() && vm.state == PowerState::Paused {
                return Err(HypervisorError::InvalidState(format!(
                    "VM {id} waits for an incoming migration: it is a destination, not a source"
                )));
            }
            vm.state = PowerState::Running;
            vm.migrated = false;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> VmSpec {
        VmSpec {
            id: id.into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            nics: vec![],
            kernel: None,
            initrd: None,
            cmdline: None,
            netns: None,
            smbios_serial: None,
            uuid: None,
        }
    }

    #[tokio::test]
    async fn lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let d = SimDriver::new(dir.path().to_path_buf());
        let h: &dyn Hypervisor = &d;
        assert_eq!(h.name(), "sim");
        assert_eq!(h.accel(), None);
        assert_eq!(h.state("i-1").await.unwrap(), PowerState::Stopped);
        let info = h.start(&spec("i-1")).await.unwrap();
        assert_eq!(info.state, PowerState::Running);
        // Idempotent.
        assert_eq!(h.start(&spec("i-1")).await.unwrap(), info);
        let log = std::fs::read_to_string(h.console_log("i-1")).unwrap();
        assert_eq!(log, "KUMO-GUEST-BOOTED id=i-1\n");
        h.reboot("i-1").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(h.console_log("i-1"))
                .unwrap()
                .lines()
                .count(),
            2
        );
        d.pause("i-1").unwrap();
        assert_eq!(h.state("i-1").await.unwrap(), PowerState::Paused);
        d.resume("i-1").unwrap();
        assert!(matches!(
            h.cleanup("i-1").await,
            Err(HypervisorError::StillRunning(_))
        ));
        h.stop("i-1", Duration::from_secs(1)).await.unwrap();
        h.stop("i-1", Duration::from_secs(1)).await.unwrap();
        h.kill("i-unknown").await.unwrap();
        assert!(h.reboot("i-1").await.is_err());
        assert_eq!(
            h.list().await.unwrap(),
            vec![VmInfo {
                id: "i-1".into(),
                pid: None,
                state: PowerState::Stopped
            }]
        );
        h.cleanup("i-1").await.unwrap();
        assert!(!dir.path().join("i-1").exists());
        assert!(h.list().await.unwrap().is_empty());
        assert!(h.start(&spec("../evil")).await.is_err());
        assert!(h.cleanup("..").await.is_err());
    }

    #[tokio::test]
    async fn vms_outlive_the_driver() {
        let dir = tempfile::tempdir().unwrap();
        let d = SimDriver::new(dir.path().to_path_buf());
        d.start(&spec("i-1")).await.unwrap();
        d.start(&spec("i-2")).await.unwrap();
        d.stop("i-2", Duration::from_secs(1)).await.unwrap();
        drop(d);
        // A new driver on the same run root (an agent restart) finds them as they were.
        let d = SimDriver::new(dir.path().to_path_buf());
        assert_eq!(d.state("i-1").await.unwrap(), PowerState::Running);
        assert_eq!(d.state("i-2").await.unwrap(), PowerState::Stopped);
        assert_eq!(d.spec("i-1"), Some(spec("i-1")));
        d.kill("i-1").await.unwrap();
        d.cleanup("i-2").await.unwrap();
        let d = SimDriver::new(dir.path().to_path_buf());
        assert_eq!(d.state("i-1").await.unwrap(), PowerState::Stopped);
        assert_eq!(d.list().await.unwrap().len(), 1, "i-2 was cleaned up");
    }
}
