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
}

impl HypervisorError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        HypervisorError::Io {
            context: context.into(),
            source,
        }
    }
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
    /// The serial console output log.
    fn console_log(&self, id: &str) -> PathBuf;
    /// Unix socket of the interactive serial console.
    fn serial_socket(&self, id: &str) -> PathBuf;
    /// Unix socket of the VM's VNC server.
    fn vnc_socket(&self, id: &str) -> PathBuf;
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
    for (i, d) in spec.disks.iter().enumerate() {
        if d.format != "qcow2" && d.format != "raw" {
            return invalid(format!(
                "disk {i}: format must be qcow2 or raw, got {:?}",
                d.format
            ));
        }
        if d.path.as_os_str().is_empty() || d.path.to_str().is_none() {
            return invalid(format!("disk {i}: path must be non-empty UTF-8"));
        }
        if let Some(s) = &d.serial {
            if s.is_empty()
                || s.len() > 20
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return invalid(format!(
                    "disk {i}: serial {s:?} must be 1-20 characters of letters, digits, '-', '_' or '.'"
                ));
            }
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
