//! One dnsmasq per network: static DHCP (MAC → IP, hostname) and DNS for the VM names (A, and AAAA on a
//! dual-stack network, where it also sends router advertisements for SLAAC and answers stateless DHCPv6),
//! rendered from the desired state. It runs daemonized so that it outlives an agent restart; its pid file, command line and
//! network namespace tell whether the running one is the wanted one.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd;
use crate::error::{io_err, NetworkError};
use crate::ledger::write_atomic;
use crate::spec::Network;

/// Subdirectory of the state directory holding everything of the dnsmasq processes.
pub(crate) const DIR: &str = "dnsmasq";
/// Log files beyond this size are rotated (once, to `.log.1`) when dnsmasq is (re)started.
const LOG_ROTATE_BYTES: u64 = 1 << 20;

/// Files of one network's dnsmasq.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub pid: PathBuf,
    pub dhcp_hosts: PathBuf,
    pub dns_hosts: PathBuf,
    pub log: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path, network: &str) -> Self {
        let dir = state_dir.join(DIR);
        Self {
            pid: dir.join(format!("{network}.pid")),
            dhcp_hosts: dir.join(format!("{network}.dhcp-hosts")),
            dns_hosts: dir.join(format!("{network}.hosts")),
            log: dir.join(format!("{network}.log")),
        }
    }

    pub fn all(&self) -> Vec<PathBuf> {
        let mut rotated = self.log.as_os_str().to_owned();
        rotated.push(".1");
        vec![
            self.pid.clone(),
            self.dhcp_hosts.clone(),
            self.dns_hosts.clone(),
            self.log.clone(),
            PathBuf::from(rotated),
        ]
    }
}

/// Network names that have a pid file in the state directory.
pub(crate) fn known_networks(state_dir: &Path) -> Result<Vec<String>, NetworkError> {
    let dir = state_dir.join(DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(NetworkError::Io {
                path: dir,
                source: e,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(net) = name.strip_suffix(".pid") {
            out.push(net.to_string());
        }
    }
    Ok(out)
}

/// The command line (without argv\[0\]) of a network's dnsmasq.
pub(crate) fn args(net: &Network, paths: &Paths) -> Vec<String> {
    let mut a = vec![
        "--conf-file=/dev/null".to_string(),
        format!("--pid-file={}", paths.pid.display()),
        "--bind-interfaces".into(),
        format!("--interface={}", crate::spec::ROUTER_INSIDE),
        "--except-interface=lo".into(),
        format!("--dhcp-range={},static,{},12h", net.network, net.netmask()),
        format!("--dhcp-hostsfile={}", paths.dhcp_hosts.display()),
        format!("--dhcp-option=option:router,{}", net.gateway),
        "--dhcp-authoritative".into(),
        "--leasefile-ro".into(),
        // DNS for the VM names on the gateway address only; never forwarded upstream.
        "--port=53".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        // Every name is answered from local data: unknown names and missing AAAA records get
        // NXDOMAIN/NODATA instead of REFUSED (which resolvers treat as a broken server).
        "--local=/#/".into(),
        format!("--addn-hosts={}", paths.dns_hosts.display()),
        format!("--log-facility={}", paths.log.display()),
        // Files are re-read on SIGHUP; staying root means the state directory's permissions never matter.
        "--user=root".into(),
    ];
    if let Some(mtu) = net.mtu {
        // Forced: sent even to clients that do not ask for it (busybox udhcpc does not).
        a.push(format!("--dhcp-option-force=option:mtu,{mtu}"));
    }
    if let (Some(prefix), Some(gw6)) = (net.ipv6, net.gateway6()) {
        let int = crate::spec::ROUTER_INSIDE;
        a.push("--enable-ra".into());
        // SLAAC for addresses; stateless DHCPv6 only hands out the DNS server.
        a.push(format!("--dhcp-range={prefix},ra-stateless,64,12h"));
        a.push(format!("--dhcp-option=option6:dns-server,[{gw6}]"));
        // Router lifetime 0: the prefix is on-link but the router is no default route (there is no IPv6
        // beyond the network), so guests fail fast to IPv4 instead of timing out. RAs every 30 s.
        let mtu = net.mtu.map(|m| format!("mtu:{m},")).unwrap_or_default();
        a.push(format!("--ra-param={int},{mtu}30,0"));
    }
    a
}

pub(crate) fn render_dhcp_hosts(net: &Network) -> String {
    let mut s = String::new();
    for p in &net.ports {
        s.push_str(&format!("{},{},{}\n", p.mac, p.ip, p.hostname));
    }
    s
}

pub(crate) fn render_dns_hosts(net: &Network) -> String {
    let mut s = String::new();
    for p in &net.ports {
        s.push_str(&format!("{} {}\n", p.ip, p.hostname));
        if let Some(a) = net
            .ipv6
            .and_then(|pre| kumo_types::ipv6::eui64(pre, &p.mac).ok())
        {
            s.push_str(&format!("{a} {}\n", p.hostname));
        }
    }
    s
}

/// Parses a rendered dhcp-hosts file back into MAC → IP.
fn parse_dhcp_hosts(text: &str) -> HashMap<String, Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split(',');
            let mac = it.next()?.to_string();
            let ip = it.next()?.parse().ok()?;
            Some((mac, ip))
        })
        .collect()
}

/// Whether the new entries move an address to another MAC (or a MAC to another address) compared to the
/// old file. dnsmasq keeps leases in memory across SIGHUP and refuses to hand out a configured address that
/// is leased to another MAC, so such a change needs a restart rather than a reload.
pub(crate) fn reassigns(old: &str, net: &Network) -> bool {
    let old = parse_dhcp_hosts(old);
    let old_by_ip: HashMap<Ipv4Addr, &str> = old.iter().map(|(m, ip)| (*ip, m.as_str())).collect();
    net.ports.iter().any(|p| {
        old.get(&p.mac).is_some_and(|ip| *ip != p.ip)
            || old_by_ip.get(&p.ip).is_some_and(|m| *m != p.mac)
    })
}

/// Writes `contents` to `path` unless it already holds exactly that; returns whether it changed.
pub(crate) fn write_if_changed(path: &Path, contents: &str) -> Result<bool, NetworkError> {
    match std::fs::read_to_string(path) {
        Ok(old) if old == contents => Ok(false),
        _ => {
            write_atomic(path, contents.as_bytes())?;
            Ok(true)
        }
    }
}

/// What runs under a network's pid file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// No live process of ours; `had_pid_file` tells whether one ran before (so a start is a repair).
    NotRunning { had_pid_file: bool },
    /// Our dnsmasq (its command line names our pid file) runs; `current` is false when its arguments or its
    /// network namespace differ from the wanted ones.
    Running { pid: i32, current: bool },
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

fn netns_inode_of(pid: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

pub(crate) fn status(paths: &Paths, want: &[String], netns_inode: u64) -> Status {
    let had_pid_file = paths.pid.exists();
    let Some(pid) = read_pid(&paths.pid) else {
        return Status::NotRunning { had_pid_file };
    };
    if !alive(pid) {
        return Status::NotRunning { had_pid_file };
    }
    let Some(argv) = cmdline(pid) else {
        return Status::NotRunning { had_pid_file };
    };
    let pid_arg = format!("--pid-file={}", paths.pid.display());
    if !argv.contains(&pid_arg) {
        // The pid was reused by some other process.
        return Status::NotRunning { had_pid_file };
    }
    let current = argv.get(1..) == Some(want) && netns_inode_of(pid) == Some(netns_inode);
    Status::Running { pid, current }
}

/// Starts a daemonized dnsmasq (inside `netns` when given) and returns its pid.
pub(crate) async fn start(
    ip: &Path,
    dnsmasq: &Path,
    netns: Option<&str>,
    network: &str,
    paths: &Paths,
    args: &[String],
) -> Result<i32, NetworkError> {
    rotate_log(&paths.log)?;
    match std::fs::remove_file(&paths.pid) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(NetworkError::Io {
                path: paths.pid.clone(),
                source: e,
            })
        }
    }
    let (program, full): (&Path, Vec<String>) = match netns {
        Some(ns) => {
            let mut full = vec![
                "netns".to_string(),
                "exec".into(),
                ns.to_string(),
                dnsmasq.display().to_string(),
            ];
            full.extend(args.iter().cloned());
            (ip, full)
        }
        None => (dnsmasq, args.to_vec()),
    };
    // dnsmasq forks, reports start-up errors on stderr and exits 0 only once the daemon is ready.
    cmd::run(program, &full, None)
        .await
        .map_err(|e| NetworkError::Dnsmasq {
            network: network.to_string(),
            detail: e.to_string(),
        })?;
    for _ in 0..100 {
        if let Some(pid) = read_pid(&paths.pid) {
            if alive(pid) {
                return Ok(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(NetworkError::Dnsmasq {
        network: network.to_string(),
        detail: format!(
            "started but no live process in {} (see {})",
            paths.pid.display(),
            paths.log.display()
        ),
    })
}

fn rotate_log(log: &Path) -> Result<(), NetworkError> {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut rotated = log.as_os_str().to_owned();
        rotated.push(".1");
        std::fs::rename(log, PathBuf::from(rotated)).map_err(io_err(log))?;
    }
    Ok(())
}

/// Sends SIGHUP: dnsmasq re-reads its dhcp-hosts and addn-hosts files.
pub(crate) fn reload(pid: i32) -> Result<(), NetworkError> {
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|source| NetworkError::Sys {
        call: "kill(SIGHUP)",
        source,
    })
}

/// Stops a dnsmasq: SIGTERM, then SIGKILL after 2 s.
pub(crate) async fn stop(network: &str, pid: i32) -> Result<(), NetworkError> {
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) => {}
            Err(nix::Error::ESRCH) => return Ok(()),
            Err(source) => {
                return Err(NetworkError::Sys {
                    call: "kill",
                    source,
                })
            }
        }
        for _ in 0..100 {
            if !alive(pid) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Err(NetworkError::Dnsmasq {
        network: network.to_string(),
        detail: format!("process {pid} survived SIGKILL"),
    })
}

/// Stops a network's dnsmasq if ours runs, and removes its files. Returns whether a process was stopped.
pub(crate) async fn remove(state_dir: &Path, network: &str) -> Result<bool, NetworkError> {
    let paths = Paths::new(state_dir, network);
    let mut stopped = false;
    if let Some(pid) = read_pid(&paths.pid) {
        let pid_arg = format!("--pid-file={}", paths.pid.display());
        if alive(pid) && cmdline(pid).is_some_and(|argv| argv.contains(&pid_arg)) {
            stop(network, pid).await?;
            stopped = true;
        }
    }
    for p in paths.all() {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NetworkError::Io { path: p, source: e }),
        }
    }
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{validate, NetworkSpec, PortSpec};

    fn net(ports: &[(&str, &str)]) -> Network {
        let ports = ports
            .iter()
            .enumerate()
            .map(|(i, (mac, ip))| PortSpec {
                tap: format!("kt-{i}"),
                mac: (*mac).into(),
                ip: (*ip).into(),
                hostname: format!("vm{i}"),
                groups: vec![],
                public_ip: None,
            })
            .collect();
        let mut v = validate(&[(
            NetworkSpec {
                name: "default".into(),
                bridge: "kb-default".into(),
                cidr: "10.77.0.0/24".into(),
                gateway: "10.77.0.1".into(),
                mtu: Some(1450),
                isolation: crate::Isolation::Local,
                peers: vec![],
                ipv6_cidr: None,
            },
            ports,
        )])
        .unwrap();
        v.remove(0)
    }

    #[test]
    fn renders_hosts_and_args() {
        let n = net(&[("02:00:00:00:00:01", "10.77.0.10")]);
        assert_eq!(render_dhcp_hosts(&n), "02:00:00:00:00:01,10.77.0.10,vm0\n");
        assert_eq!(render_dns_hosts(&n), "10.77.0.10 vm0\n");
        let a = args(&n, &Paths::new(Path::new("/s"), "default"));
        assert!(a.contains(&"--dhcp-range=10.77.0.0,static,255.255.255.0,12h".to_string()));
        assert!(a.contains(&"--dhcp-option-force=option:mtu,1450".to_string()));
        assert!(a.contains(&"--pid-file=/s/dnsmasq/default.pid".to_string()));
        assert!(
            !a.iter()
                .any(|x| x.contains("enable-ra") || x.contains("ra-param")),
            "no RA on IPv4-only: {a:?}"
        );
    }

    #[test]
    fn dual_stack_adds_ra_and_aaaa() {
        let mut n = net(&[("02:00:00:00:00:01", "10.77.0.10")]);
        n.ipv6 = Some("fd60:1::".parse().unwrap());
        assert_eq!(
            render_dns_hosts(&n),
            "10.77.0.10 vm0\nfd60:1::ff:fe00:1 vm0\n"
        );
        let paths = Paths::new(Path::new("/s"), "default");
        let a = args(&n, &paths);
        let tail: Vec<&str> = a.iter().rev().take(4).rev().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "--enable-ra",
                "--dhcp-range=fd60:1::,ra-stateless,64,12h",
                "--dhcp-option=option6:dns-server,[fd60:1::1]",
                "--ra-param=int0,mtu:1450,30,0",
            ]
        );
        // Deterministic: the running process's arguments are compared to decide restarts.
        assert_eq!(a, args(&n, &paths));
    }

    #[test]
    fn detects_reassigned_addresses() {
        let old = "02:00:00:00:00:01,10.77.0.10,vm0\n02:00:00:00:00:02,10.77.0.11,vm1\n";
        // Removing a port or adding a new one is a reload.
        assert!(!reassigns(
            old,
            &net(&[("02:00:00:00:00:01", "10.77.0.10")])
        ));
        assert!(!reassigns(
            old,
            &net(&[("02:00:00:00:00:03", "10.77.0.12")])
        ));
        // An address now given to another MAC, or a MAC given another address, needs a restart.
        assert!(reassigns(old, &net(&[("02:00:00:00:00:03", "10.77.0.11")])));
        assert!(reassigns(old, &net(&[("02:00:00:00:00:01", "10.77.0.20")])));
    }

    #[test]
    fn zombie_and_missing_processes_are_not_alive() {
        assert!(alive(std::process::id() as i32));
        assert!(!alive(i32::MAX));
    }
}
