//! `/run/kumo-clusters/<X>`: which cluster ids are taken, by whom, and what to remove when the
//! owner is gone.
//!
//! The owner holds an exclusive `flock` on `<X>/lock` for the cluster's whole life; the kernel
//! drops it when the owner dies, however it dies, so "can I take the lock?" is the liveness test
//! (a pid alone can be reused). The directory appears fully formed (lock file already locked)
//! by renaming a private staging directory to `<X>`, which fails when `<X>` exists and is not
//! empty: that makes taking an id atomic across processes.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::{sys, ClusterError};

pub const REGISTRY: &str = "/run/kumo-clusters";

/// Marks a data dir as made by a cluster, so a sweep only ever deletes such a directory.
pub const DIR_MARKER: &str = ".kumo-cluster";

pub fn bridge_name(id: u8) -> String {
    format!("kcb{id}")
}

pub fn public_bridge_name(id: u8) -> String {
    format!("kcp{id}")
}

pub fn netns_name(id: u8, host: &str) -> String {
    format!("kc{id}-{host}")
}

pub fn veth_name(id: u8, index: usize) -> String {
    format!("kcv{id}h{index}")
}

/// A taken cluster id and the lock that proves it is ours.
pub struct Slot {
    pub id: u8,
    pub dir: PathBuf,
    pub lock: File,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |e| ClusterError::io(what, e)
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock(2) on a file descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Take the lowest free id.
pub fn allocate() -> Result<Slot, ClusterError> {
    std::fs::create_dir_all(REGISTRY).map_err(io(format!("creating {REGISTRY}")))?;
    let pid = std::process::id();
    let stage = Path::new(REGISTRY).join(format!(
        ".new-{pid}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&stage).map_err(io(format!("creating {}", stage.display())))?;
    let made = (|| {
        let lock = File::create(stage.join("lock")).map_err(io("creating the lock file"))?;
        if !try_lock(&lock) {
            return Err(ClusterError::io(
                "locking a fresh lock file",
                std::io::Error::last_os_error(),
            ));
        }
        let start = sys::start_time(pid).unwrap_or(0);
        std::fs::write(stage.join("owner"), format!("{pid} {start}\n"))
            .map_err(io("writing the owner file"))?;
        Ok(lock)
    })();
    let lock = match made {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
    };
    for id in 0..=255u8 {
        let dir = Path::new(REGISTRY).join(id.to_string());
        match std::fs::rename(&stage, &dir) {
            Ok(()) => return Ok(Slot { id, dir, lock }),
            // Another cluster holds the id.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&stage);
                return Err(ClusterError::io(format!("taking {}", dir.display()), e));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&stage);
    Err(ClusterError::NoFreeId)
}

/// What a sweep needs beyond names derived from the id (written before each is created).
#[derive(Default, Clone)]
pub struct Record {
    pub controller_pid: Option<u32>,
    /// The data dir to delete on teardown (absent when it is kept).
    pub remove_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
}

pub fn write_record(dir: &Path, r: &Record) -> Result<(), ClusterError> {
    let v = json!({
        "owner_pid": std::process::id(),
        "controller_pid": r.controller_pid,
        "data_dir": r.data_dir,
        "remove_dir": r.remove_dir,
    });
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, v.to_string()).map_err(io("writing the cluster record"))?;
    std::fs::rename(&tmp, dir.join("state.json")).map_err(io("writing the cluster record"))
}

fn read_record(dir: &Path) -> Record {
    let v: serde_json::Value = std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    Record {
        controller_pid: v["controller_pid"].as_u64().map(|p| p as u32),
        remove_dir: v["remove_dir"].as_str().map(PathBuf::from),
        data_dir: v["data_dir"].as_str().map(PathBuf::from),
    }
}

/// The owner's pid, when the owner file names a process that is still the same process.
fn owner_alive(dir: &Path) -> Option<bool> {
    let s = std::fs::read_to_string(dir.join("owner")).ok()?;
    let mut it = s.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: Option<u64> = it.next().and_then(|s| s.parse().ok());
    let same = sys::alive(pid) && (start.is_none() || sys::start_time(pid) == start);
    Some(same)
}

fn young(dir: &Path) -> bool {
    std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(30))
}

/// Claim `dir` if its owner is gone: Some(lock) to hold while tearing it down.
fn claim_if_stale(dir: &Path) -> Option<Option<File>> {
    let lock_path = dir.join("lock");
    match File::options().read(true).write(true).open(&lock_path) {
        Ok(f) => {
            if !try_lock(&f) {
                return None;
            }
            // Another sweeper may have removed the directory (and someone re-created it)
            // between our open and our lock: only the file still at the path counts.
            let same = match (f.metadata(), std::fs::metadata(&lock_path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            same.then_some(Some(f))
        }
        // No lock file: not made by `allocate` (or half removed). Fall back to the owner pid.
        Err(_) => match owner_alive(dir) {
            Some(true) => None,
            Some(false) => Some(None),
            None if young(dir) => None,
            None => Some(None),
        },
    }
}

/// Remove everything of cluster `id` that is left on the machine: its controller, every
/// process in its host namespaces, the namespaces, veths and bridge, its data dir (when
/// recorded for removal) and its registry entry. Returns what could not be removed.
pub fn remove_cluster(id: u8, dir: &Path) -> Vec<String> {
    let rec = read_record(dir);
    let mut problems = vec![];
    if let Some(pid) = rec.controller_pid {
        // Only if the pid still is this cluster's controller (pids get reused).
        let cmd = sys::cmdline(pid).join(" ");
        let ours = rec
            .data_dir
            .as_ref()
            .is_some_and(|d| cmd.contains(&d.display().to_string()));
        if ours && cmd.contains("server") {
            sys::sigkill(pid);
            sys::wait_gone(pid, Duration::from_secs(5));
        }
    }
    problems.extend(remove_network(id));
    if let Some(d) = rec.remove_dir {
        if d.is_absolute() && d.join(DIR_MARKER).exists() {
            if let Err(e) = std::fs::remove_dir_all(&d) {
                problems.push(format!("{}: {e}", d.display()));
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            problems.push(format!("{}: {e}", dir.display()));
        }
    }
    problems
}

/// Remove cluster `id`'s namespaces (killing every process in them), veths and bridge.
pub fn remove_network(id: u8) -> Vec<String> {
    let mut problems = vec![];
    let prefix = format!("kc{id}-");
    for ns in sys::netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
    {
        let left = sys::kill_netns_processes(&ns, Duration::from_secs(10));
        if !left.is_empty() {
            problems.push(format!("processes {left:?} in namespace {ns}"));
        }
        sys::ip_quiet(&["netns", "del", &ns]);
        if sys::netns_names().contains(&ns) {
            problems.push(format!("namespace {ns}"));
        }
    }
    // Deleting a namespace deletes its veth ends, and with them the root ends; any left over
    // (e.g. a namespace that was never made) goes here.
    let veth_prefixes = [
        format!("kcv{id}h"),
        format!("kcv{id}p"),
        format!("kcv{id}o"),
    ];
    for l in sys::links()
        .into_iter()
        .filter(|l| veth_prefixes.iter().any(|p| l.starts_with(p.as_str())))
    {
        sys::ip_quiet(&["link", "del", &l]);
        if sys::link_exists(&l) {
            problems.push(format!("link {l}"));
        }
    }
    for br in [bridge_name(id), public_bridge_name(id)] {
        if sys::link_exists(&br) {
            sys::ip_quiet(&["link", "del", &br]);
            if sys::link_exists(&br) {
                problems.push(format!("bridge {br}"));
            }
        }
    }
    problems
}

/// Tear down every cluster whose owner is gone (all of them with `all`); one line per cluster.
pub fn sweep(all: bool) -> Vec<String> {
    let mut done = vec![];
    let Ok(rd) = std::fs::read_dir(REGISTRY) else {
        return done;
    };
    let mut entries: Vec<(String, PathBuf)> = rd
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    entries.sort();
    for (name, path) in entries {
        if let Some(rest) = name.strip_prefix(".new-") {
            // A staging dir whose creator died before renaming it.
            let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
            if pid.is_some_and(|p| !sys::alive(p)) {
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        }
        let Ok(id) = name.parse::<u8>() else {
            continue;
        };
        let owner = std::fs::read_to_string(path.join("owner"))
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        let _lock = if all {
            None
        } else {
            match claim_if_stale(&path) {
                Some(l) => l,
                None => continue,
            }
        };
        let problems = remove_cluster(id, &path);
        let mut line = format!("cluster {id} (owner pid {owner}, bridge kcb{id})");
        if !problems.is_empty() {
            line.push_str(&format!("; left behind: {}", problems.join(", ")));
        }
        tracing::info!("swept {line}");
        done.push(line);
    }
    done
}
