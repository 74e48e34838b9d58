//! Small system helpers: running `ip`, finding and killing processes by network namespace.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::ClusterError;

/// The `ip` binary: PATH may lack /usr/sbin when run through sudo or from an IDE.
pub fn ip_bin() -> PathBuf {
    for p in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("ip")
}

/// Run `ip ARGS`; an error carries the command line and its stderr.
pub fn ip(args: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new(ip_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::io("running ip", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClusterError::Command {
        cmd: format!("ip {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Run `ip ARGS` for cleanup: failures (usually "does not exist") do not matter.
pub fn ip_quiet(args: &[&str]) -> bool {
    Command::new(ip_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Names of the named network namespaces (`ip netns list` reads the same directory).
pub fn netns_names() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Network interfaces of the caller's namespace.
pub fn links() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether the process exists and is not a zombie (a zombie holds no namespace or memory).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false)
}

/// The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid it names a process unambiguously, even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let (_, rest) = s.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The command line, arguments separated by NUL.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live (non-zombie) processes whose network namespace is the named one; what
/// `ip netns pids` prints, compared by device and inode the same way.
pub fn pids_in_netns(ns: &str) -> Vec<u32> {
    let Ok(target) = std::fs::metadata(Path::new("/run/netns").join(ns)) else {
        return vec![];
    };
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
        })
        .filter(|&pid| alive(pid))
        .collect()
}

pub fn sigkill(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions; callers pass pids of this cluster.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: as above.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGKILL every process in the namespace until none is left (QEMU may be mid-fork, dnsmasq
/// may respawn a helper). Returns the pids still alive after `timeout`.
pub fn kill_netns_processes(ns: &str, timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = pids_in_netns(ns);
        if pids.is_empty() || Instant::now() >= deadline {
            return pids;
        }
        for pid in &pids {
            sigkill(*pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the process is gone (or a zombie); false after `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Output of a command that could not be run at all: exit status 127, the error on stderr.
pub fn failed_output(e: std::io::Error) -> Output {
    use std::os::unix::process::ExitStatusExt;
    Output {
        status: std::process::ExitStatus::from_raw(127 << 8),
        stdout: vec![],
        stderr: e.to_string().into_bytes(),
    }
}

/// The child joins the network namespace open as `ns` before it execs.
pub fn enter_netns(cmd: &mut Command, ns: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls setns(2) on a descriptor that
    // the caller keeps open until after spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Make the child die with this process (SIGKILL), so a killed test leaves no controller or
/// agent behind. Note: the kernel ties this to the *thread* that spawns the child; spawn from
/// a thread that lives as long as the cluster (a runtime worker or the main thread).
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec; it calls only async-signal-safe
    // functions (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}
