//! Hypervisor drivers for kumo.
//!
//! Two drivers implement the [`Hypervisor`] trait:
//!
//! - [`QemuDriver`] launches `qemu-system-x86_64` (KVM when it works, otherwise TCG) and drives it
//!   through QMP ([`qmp`]). Each VM has a run directory `run_root/<id>/` that *is* the driver's
//!   state, so a new driver on the same run root re-attaches to running VMs.
//! - [`SimDriver`] keeps everything in memory; it is cheap enough to run thousands of simulated
//!   hosts in one process for controller tests.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod backup;
mod block;
mod migrate;
mod qemu;
pub mod qmp;
mod sim;

pub use qemu::{probe_accel, qemu_args, QemuDriver, QEMU_BINARY_ENV};
pub use sim::SimDriver;

/// One disk attached to a VM as a virtio-blk device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// `"qcow2"` or `"raw"`.
    pub format: String,
    /// Serial number the guest sees (`/dev/disk/by-id/virtio-<serial>`).
    pub serial: Option<String>,
    pub read_only: bool,
    /// qdev id of the disk's virtio-blk device (volumes: their volume id). `None`:
    /// `virtio-disk<i>` (the root disk is `virtio-disk0`). Letters, digits, `-`, `_`, `.`,
    /// starting with a letter, at most 26 characters, not `disk<N>`.
    #[serde(default)]
    pub device_id: Option<String>,
}

/// A virtio-blk device of a running VM as QEMU sees it now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachedDisk {
    pub device_id: String,
    /// Current active node (changes with every live snapshot).
    pub node: String,
    /// Current active file (after a live snapshot: the overlay).
    pub file: PathBuf,
    /// Format of the active node (`qcow2`, `raw`).
    pub format: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    pub read_only: bool,
    /// Serial number the guest sees, if one was set.
    pub serial: Option<String>,
}

/// One disk of a live snapshot: QEMU creates `overlay` (qcow2, backing = the current active
/// file, absolute path) and makes it the disk's active layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTarget {
    pub device_id: String,
    /// Absolute path; must not exist yet.
    pub overlay: PathBuf,
}

/// Outcome of [`Hypervisor::snapshot_disks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Wall time of the QMP transaction (guest I/O is drained for its duration).
    pub pause: Duration,
    /// The new active node of each disk, in the order of the request.
    pub nodes: Vec<String>,
}

/// One NIC: a virtio-net device backed by a tap device the network layer already created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicSpec {
    pub mac: String,
    pub tap: String,
}

/// Everything a driver needs to launch a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    /// e.g. `"i-0123456789abcdef0"`; letters, digits, `-`, `_`, `.` only.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The first disk is the boot/root disk.
    pub disks: Vec<DiskSpec>,
    /// Tap devices already created by the network layer.
    pub nics: Vec<NicSpec>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// If set, QEMU runs inside this named network namespace (`ip netns exec NAME qemu...`).
    pub netns: Option<String>,
    /// SMBIOS system serial number: cloud-init reads `ds=nocloud-net;s=URL` from it (stock images
    /// then fetch their seed from the metadata service).
    pub smbios_serial: Option<String>,
    /// SMBIOS system UUID (`-uuid`): an imported machine keeps its own.
    #[serde(default)]
    pub uuid: Option<String>,
}

/// Power state of a VM as the hypervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PowerState {
    Running,
    Paused,
    Stopped,
}

/// What a driver knows about one VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    pub id: String,
    /// Host PID of the VM's process (QEMU), if it is running; `None` for the sim driver.
    pub pid: Option<u32>,
    pub state: PowerState,
}

/// The accelerator a QEMU driver actually uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator asked for: probe (`auto`), or force one accelerator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        })
    }
}

/// Error of [`AccelChoice::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?} (expected auto, kvm or tcg)")]
pub struct ParseAccelError(pub String);

impl FromStr for AccelChoice {
    type Err = ParseAccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(ParseAccelError(s.to_string())),
        }
    }
}

/// Errors of the hypervisor drivers.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("VM {0} is not running")]
    NotRunning(String),
    #[error("VM {0} is still running")]
    StillRunning(String),
    #[error("VM {id} failed to start: {reason}; QEMU output: {stderr_tail}")]
    StartFailed {
        id: String,
        reason: String,
        stderr_tail: String,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("accelerator unavailable: {0}")]
    AccelUnavailable(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("encoding VM spec")]
    Json(#[from] serde_json::Error),
    #[error("QMP")]
    Qmp(#[from] qmp::QmpError),
    /// The driver cannot do this (e.g. the sim driver has no disks to back up).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The caller asked to stop (a progress callback returned false); everything was rolled back.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A block job (backup, mirror) ended with an error; QEMU's message.
    #[error("block job failed: {0}")]
    BlockJobFailed(String),
    /// The VM is in a state that does not allow this now (e.g. paused after a completed
    /// migration, or already running when asked to wait for an incoming one).
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// A live migration failed (QEMU's migration error, or the destination is not usable).
    #[error("migration failed: {0}")]
    MigrationFailed(String),
    /// No byte of a migration (memory or mirror) moved for the stall timeout: the link is gone.
    #[error("migration stalled: {0}")]
    MigrationStalled(String),
}

impl HypervisorError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        HypervisorError::Io {
            context: context.into(),
            source,
        }
    }
}

/// One disk backup for [`Hypervisor::backup_disk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJob {
    /// qdev id of the disk (root: `"virtio-disk0"`; volumes: their id).
    pub device_id: String,
    /// qcow2 file already created by the backup repository (backing = the previous backup).
    pub target: PathBuf,
    /// Dirty bitmap added in the same transaction as the job starts: it tracks the writes made
    /// after this backup's point in time.
    pub new_bitmap: String,
    /// `None`: full backup (`sync=full`); `Some(b)`: only what bitmap `b` marks (`sync=bitmap`,
    /// `bitmap-mode=never`, so `b` stays as it is).
    pub since_bitmap: Option<String>,
    /// Copy at most this many bytes a second (`None`: as fast as the storage goes), so
    /// backups do not starve the guests' own I/O.
    pub speed: Option<u64>,
}

/// Outcome of a successful [`Hypervisor::backup_disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupReport {
    pub duration: Duration,
    /// The job's total progress (bytes it had to consider).
    pub bytes_total: u64,
}

/// How a destination QEMU waits for an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingSpec {
    /// Address QEMU listens on for the migration stream and (storage mode) its NBD server.
    pub listen_ip: std::net::IpAddr,
    /// Export every disk of the spec over NBD, writable, for the source to mirror into (storage
    /// migration).
    pub nbd: bool,
}

/// What the source needs to migrate into a destination that is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingReady {
    /// e.g. "tcp:10.252.1.12:49152"
    pub migrate_uri: String,
    /// Storage mode: per disk (device id as in DiskSpec: `virtio-disk0` for the root disk unless
    /// device_id is set), the NBD URI to mirror into, e.g.
    /// "nbd:10.252.1.12:49153:exportname=virtio-disk0".
    pub nbd_targets: Vec<NbdTarget>,
}

/// One disk's NBD export on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdTarget {
    pub device_id: String,
    pub uri: String,
}

/// How the source migrates into a ready destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateSpec {
    pub target: IncomingReady,
    /// QEMU's downtime-limit in ms (default 300 if 0).
    pub downtime_limit_ms: u64,
    pub auto_converge: bool,
    /// Bytes per second for memory and mirror (None: unlimited).
    pub bandwidth: Option<u64>,
    /// No byte moved for this long (mirror or memory) = the link is gone: cancel and fail
    /// (secs; 0 = 20).
    pub stall_timeout_secs: u64,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationPhase {
    Mirroring,
    Memory,
    Completed,
}

/// What [`Hypervisor::migrate`] reports to its progress callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    pub disk_done: u64,
    pub disk_total: u64,
    pub ram_done: u64,
    pub ram_total: u64,
    pub ram_remaining: u64,
    /// Memory passes so far (QEMU's dirty-sync-count) and auto-converge throttle %.
    pub passes: u64,
    pub throttle_pct: u64,
}

/// Outcome of a successful [`Hypervisor::migrate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// From the call to completion (mirror + memory).
    pub total_ms: u64,
    /// QEMU's reported downtime (guest paused) in ms.
    pub downtime_ms: u64,
    pub ram_bytes: u64,
    pub disk_bytes: u64,
    /// Time spent only in the memory phase (QEMU's total-time).
    pub memory_ms: u64,
}

/// A hypervisor driver. All methods are idempotent where that makes sense: starting a running VM
/// returns its info, stopping/killing a stopped VM is `Ok`.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// `"qemu"` or `"sim"`.
    fn name(&self) -> &'static str;
    /// The accelerator in use (`None` for drivers without one).
    fn accel(&self) -> Option<Accel>;
    /// Launch the VM; if it is already running with this id, return its current info.
    async fn start(&self, spec: &VmSpec) -> Result<VmInfo, HypervisorError>;
    /// ACPI power-down, wait up to `timeout` for the VM to exit, then force it. `Ok` if not running.
    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), HypervisorError>;
    /// Force the VM off now. `Ok` if not running.
    async fn kill(&self, id: &str) -> Result<(), HypervisorError>;
    /// Hard reset (QMP `system_reset`). Error if not running.
    async fn reboot(&self, id: &str) -> Result<(), HypervisorError>;
    /// Current power state; `Stopped` if unknown or not running.
    async fn state(&self, id: &str) -> Result<PowerState, HypervisorError>;
    /// Every VM this driver has: running, or stopped with its run directory still present.
    async fn list(&self) -> Result<Vec<VmInfo>, HypervisorError>;
    /// Remove the VM's run directory. Error if it is running; `Ok` if there is nothing to remove.
    async fn cleanup(&self, id: &str) -> Result<(), HypervisorError>;
    /// Hot-plug a disk into a running VM (blockdev-add + device_add virtio-blk-pci
    /// id=device_id serial=serial). Already attached with this device id and file: Ok (another
    /// file: InvalidSpec). Needs `disk.device_id` and an absolute path. Not running: NotRunning.
    async fn attach_disk(&self, id: &str, disk: &DiskSpec) -> Result<(), HypervisorError>;
    /// device_del, wait for DEVICE_DELETED (the guest must release it) up to `timeout`
    /// (else Timeout, the disk stays listed), then blockdev-del the node(s). Not attached: Ok.
    /// A second call after a timeout finishes the job (device gone: only blockdev-del).
    async fn detach_disk(
        &self,
        id: &str,
        device_id: &str,
        timeout: Duration,
    ) -> Result<(), HypervisorError>;
    /// Every virtio-blk device of a running VM with its current active file and virtual size.
    async fn attached_disks(&self, id: &str) -> Result<Vec<AttachedDisk>, HypervisorError>;
    /// block_resize on the device's current node; growing only (smaller: InvalidSpec, nothing
    /// changed). The size must be a multiple of 512.
    async fn resize_disk(
        &self,
        id: &str,
        device_id: &str,
        size_bytes: u64,
    ) -> Result<(), HypervisorError>;
    /// Live external snapshot of several disks in ONE QMP `transaction` of
    /// `blockdev-snapshot-sync` (format qcow2, mode absolute-paths): QEMU creates each overlay
    /// with the old active file as backing and makes it active. `pause` = wall time of the
    /// transaction. On failure nothing changed and no overlay file is left behind (except when
    /// QEMU did not answer: then the outcome is unknown and the files stay).
    async fn snapshot_disks(
        &self,
        id: &str,
        disks: &[SnapshotTarget],
    ) -> Result<SnapshotReport, HypervisorError>;
    /// The serial console output log.
    fn console_log(&self, id: &str) -> PathBuf;
    /// Unix socket of the interactive serial console.
    fn serial_socket(&self, id: &str) -> PathBuf;
    /// Unix socket of the VM's VNC server.
    fn vnc_socket(&self, id: &str) -> PathBuf;
    /// Back up one disk of a running VM into `job.target` and wait for the end. `progress(done,
    /// total)` is called at least every second; returning false cancels (then
    /// `Err(Cancelled)`). On any failure or cancel the new bitmap and the target node are gone,
    /// `since_bitmap` is untouched and the VM keeps running.
    async fn backup_disk(
        &self,
        id: &str,
        job: &BackupJob,
        progress: &(dyn Fn(u64, u64) -> bool + Send + Sync),
    ) -> Result<BackupReport, HypervisorError>;
    /// Names of the dirty bitmaps on the device's current active node.
    async fn disk_bitmaps(&self, id: &str, device_id: &str)
        -> Result<Vec<String>, HypervisorError>;
    /// Remove a dirty bitmap from the device's current active node; `Ok` if it is absent.
    async fn remove_bitmap(
        &self,
        id: &str,
        device_id: &str,
        name: &str,
    ) -> Result<(), HypervisorError>;
    /// Launch `spec` as the destination of an incoming migration: QEMU started paused with
    /// `-incoming defer -S`, NBD exports of its disks when `inc.nbd`, and `migrate-incoming`
    /// listening. Ports are chosen free on listen_ip. On error nothing is left running.
    async fn start_incoming(
        &self,
        spec: &VmSpec,
        inc: &IncomingSpec,
    ) -> Result<IncomingReady, HypervisorError>;
    /// Destination, after the source completed: stop the NBD server and `cont`. Idempotent: a
    /// VM already running is Ok. Fails (leaving the VM paused) if the incoming migration did not
    /// complete.
    async fn finish_incoming(&self, id: &str) -> Result<(), HypervisorError>;
    /// Destination: has the incoming migration completed (QEMU's query-migrate on the
    /// destination, `completed`)?
    async fn incoming_completed(&self, id: &str) -> Result<bool, HypervisorError>;
    /// Source: mirror (if target.nbd_targets is non-empty; every disk the VM has must have a
    /// target) then migrate memory. Calls `progress` at least every 500 ms; `progress`
    /// returning false cancels. On success the source is paused (postmigrate) and the mirrors
    /// are cancelled after completion (targets consistent). On any error or cancel the
    /// migration and every mirror job are cancelled and the source is left RUNNING (cont if it
    /// was paused) with its disks unchanged; the error says which step failed (stall, mirror
    /// error such as ENOSPC on the target, QEMU migration error, cancelled).
    /// (`for<'p>` is spelled out because async_trait would otherwise turn the elided lifetime
    /// into one of the method's own; the type is the same.)
    async fn migrate(
        &self,
        id: &str,
        m: &MigrateSpec,
        progress: &(dyn for<'p> Fn(&'p MigrationProgress) -> bool + Send + Sync),
    ) -> Result<MigrationReport, HypervisorError>;
    /// Source, roll back after a migration that completed (or was left half-way by a crashed
    /// agent): cancel any migration and mirror job still active, and `cont` if paused.
    /// Idempotent; Ok on a running VM.
    async fn resume_after_migration(&self, id: &str) -> Result<(), HypervisorError>;
}

/// Check that a VM id is safe to use as a directory name and in a QEMU option value.
pub fn validate_id(id: &str) -> Result<(), HypervisorError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(HypervisorError::InvalidSpec(format!(
            "VM id {id:?} must be 1-128 characters of letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

fn is_valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Validate a spec before acting on it (nothing is touched on the host).
pub fn validate_spec(spec: &VmSpec) -> Result<(), HypervisorError> {
    let invalid = |m: String| Err(HypervisorError::InvalidSpec(m));
    validate_id(&spec.id)?;
    if spec.vcpus == 0 || spec.vcpus > 255 {
        return invalid(format!("vcpus must be 1-255, got {}", spec.vcpus));
    }
    if spec.memory_mib < 16 {
        return invalid(format!(
            "memory_mib must be at least 16, got {}",
            spec.memory_mib
        ));
    }
    block::validate_disks(&spec.disks)?;
    if let Some(u) = &spec.uuid {
        let shape = u.len() == 36
            && u.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        if !shape {
            return invalid(format!("uuid {u:?} is not a UUID"));
        }
    }
    for (i, n) in spec.nics.iter().enumerate() {
        if !is_valid_mac(&n.mac) {
            return invalid(format!("nic {i}: bad MAC address {:?}", n.mac));
        }
        if n.tap.is_empty()
            || n.tap.len() > 15
            || !n
                .tap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid(format!("nic {i}: bad tap device name {:?}", n.tap));
        }
    }
    for (what, p) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if let Some(p) = p {
            if p.to_str().is_none() {
                return invalid(format!("{what} path must be UTF-8"));
            }
        }
    }
    if spec.initrd.is_some() && spec.kernel.is_none() {
        return invalid("initrd given without a kernel".into());
    }
    if spec.cmdline.is_some() && spec.kernel.is_none() {
        return invalid("cmdline given without a kernel".into());
    }
    if let Some(ns) = &spec.netns {
        if ns.is_empty() || ns.contains('/') || ns.starts_with('.') {
            return invalid(format!("bad netns name {ns:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_choice_parses() {
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert_eq!("KVM".parse::<AccelChoice>(), Ok(AccelChoice::Kvm));
        assert_eq!(" tcg ".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("xen".parse::<AccelChoice>().is_err());
        assert_eq!(AccelChoice::Tcg.to_string(), "tcg");
        assert_eq!(Accel::Kvm.to_string(), "kvm");
    }

    fn spec() -> VmSpec {
        VmSpec {
            id: "i-0123456789abcdef0".into(),
            vcpus: 1,
            memory_mib: 256,
            disks: vec![],
            nics: vec![NicSpec {
                mac: "52:54:00:12:34:56".into(),
                tap: "tap0".into(),
            }],
            kernel: None,
            initrd: None,
            cmdline: None,
            netns: None,
            smbios_serial: None,
            uuid: None,
        }
    }

    #[test]
    fn validation() {
        assert!(validate_spec(&spec()).is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a,b", "a b"] {
            let mut s = spec();
            s.id = bad.into();
            assert!(validate_spec(&s).is_err(), "{bad:?} accepted");
        }
        let mut s = spec();
        s.nics[0].mac = "52:54:00:12:34".into();
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.vcpus = 0;
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.disks.push(DiskSpec {
            path: "/x".into(),
            format: "vmdk".into(),
            serial: None,
            read_only: false,
            device_id: None,
        });
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.initrd = Some("/initrd".into());
        assert!(validate_spec(&s).is_err());
    }

    #[test]
    fn spec_roundtrips_json() {
        let s = spec();
        let j = serde_json::to_string(&s).unwrap();
        let back: VmSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(s, back);
        assert_eq!(
            serde_json::to_string(&PowerState::Running).unwrap(),
            "\"Running\""
        );
    }
}
