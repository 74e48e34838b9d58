//! Helpers shared by the root tests: a Drop guard owning every namespace, process and file a test makes,
//! simulated guests (namespaces plugged onto a bridge by a veth), and busybox probes run inside them.
//!
//! Guests are veths, not the taps kumo creates: a tap carries no frames until a process (QEMU) opens it.
//! Each port's tap still exists (kumo manages it); the guest's veth carries the port's MAC, which is what
//! DHCP, DNS and the bridge care about.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kumo_network::{mac_for, tap_name, HostDesired, Isolation, NetworkSpec, PortSpec};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique across test binaries running at the same time (pid) and tests of one binary (counter).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn is_root() -> bool {
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        true
    } else {
        // In CI (root) a missing prerequisite is a failure, never a skip.
        assert!(std::env::var_os("CI").is_none(), "these tests need root");
        eprintln!("skipping: needs root");
        false
    }
}

/// Owns everything a test creates; dropping it (also on panic) kills the processes and deletes the
/// namespaces, then the temporary directory.
pub struct Guard {
    namespaces: Vec<String>,
    /// Every namespace whose name starts with one of these is deleted (router namespaces made by kumo).
    prefixes: Vec<String>,
    children: Vec<Child>,
    tmp: tempfile::TempDir,
}

impl Guard {
    pub fn new() -> Self {
        Guard {
            namespaces: Vec::new(),
            prefixes: Vec::new(),
            children: Vec::new(),
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    /// The temporary directory (scripts, payloads, state directories).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A state directory for one HostNetwork (not created: HostNetwork::new does that).
    pub fn state(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A unique namespace name, deleted on drop (whether or not it gets created).
    pub fn ns(&mut self, prefix: &str) -> String {
        let name = unique(prefix);
        self.namespaces.push(name.clone());
        name
    }

    /// A unique router namespace prefix; every namespace starting with it is deleted on drop.
    pub fn router_prefix(&mut self) -> String {
        let p = format!("{}-", unique("knr"));
        self.prefixes.push(p.clone());
        p
    }

    /// Starts `args` inside namespace `ns` with stdout to `out` (or discarded); killed on drop. stdin
    /// stays open (busybox nc quits when its stdin ends).
    pub fn spawn_in(&mut self, ns: &str, args: &[&str], out: Option<&Path>) {
        let stdout = match out {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        };
        // `ip netns exec` execs the program, so the child is the program itself.
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Starts busybox httpd in `ns` on `addr` (ip:port) serving `body` as /index.html.
    pub fn serve_http(&mut self, ns: &str, addr: &str, body: &str) {
        let www = self.tmp.path().join(format!("www-{}", unique("")));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), body).unwrap();
        let www = www.display().to_string();
        self.spawn_in(
            ns,
            &["busybox", "httpd", "-f", "-p", addr, "-h", &www],
            None,
        );
    }
}

impl Default for Guard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // dnsmasq processes: their command line names the state directory (inside tmp).
        for pid in pids_mentioning(self.tmp.path()) {
            kill9(pid);
        }
        let mut names = self.namespaces.clone();
        if let Ok(dir) = std::fs::read_dir("/run/netns") {
            for e in dir.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if self.prefixes.iter().any(|p| n.starts_with(p.as_str())) {
                    names.push(n);
                }
            }
        }
        for ns in &names {
            // Anything still running inside would keep the namespace (and its links) alive.
            if let Some(ino) = ns_inode(ns) {
                for pid in pids_in_netns(ino) {
                    kill9(pid);
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn kill9(pid: i32) {
    if pid != std::process::id() as i32 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The inode of a named namespace, if it exists.
pub fn ns_inode(ns: &str) -> Option<u64> {
    std::fs::metadata(Path::new("/run/netns").join(ns))
        .ok()
        .map(|m| m.ino())
}

pub fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes whose network namespace is the one with inode `ino`.
pub fn pids_in_netns(ino: u64) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| alive(*pid))
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino)
        })
        .collect()
}

/// Live (non-zombie) processes whose command line contains `path`.
pub fn pids_mentioning(path: &Path) -> Vec<i32> {
    let needle = path.display().to_string();
    all_pids()
        .into_iter()
        .filter(|pid| alive(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Whether the process runs in the named namespace.
pub fn runs_in(pid: i32, ns: &str) -> bool {
    let own = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
    own.is_ok() && own.ok() == ns_inode(ns)
}

/// Runs a command that must succeed; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `args` inside namespace `ns` with a timeout; returns (success, stdout, stderr).
pub fn run_in(ns: &str, secs: u32, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .args(["ip", "netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn links(ns: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&sh(&["ip", "-n", ns, "-j", "-d", "addr", "show"])).unwrap()
}

pub fn link<'a>(all: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    all.iter().find(|l| l["ifname"] == name)
}

pub fn is_up(l: &serde_json::Value) -> bool {
    l["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"))
}

/// The IPv4 addresses of a link as "a.b.c.d/len".
pub fn ipv4(l: &serde_json::Value) -> Vec<String> {
    l["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["family"] == "inet")
                .map(|x| format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

/// The all-zeros (flooding) destinations of a VXLAN device.
pub fn flood_peers(ns: &str, dev: &str) -> Vec<String> {
    let out = sh(&["bridge", "-n", ns, "-j", "fdb", "show", "dev", dev]);
    let entries: Vec<serde_json::Value> = if out.trim().is_empty() {
        vec![]
    } else {
        serde_json::from_str(&out).unwrap()
    };
    entries
        .iter()
        .filter(|e| e["mac"] == "00:00:00:00:00:00")
        .filter_map(|e| e["dst"].as_str().map(String::from))
        .collect()
}

pub fn network(name: &str, bridge: &str, third_octet: u8) -> NetworkSpec {
    NetworkSpec {
        name: name.into(),
        bridge: bridge.into(),
        cidr: format!("10.{third_octet}.0.0/24"),
        gateway: format!("10.{third_octet}.0.1"),
        mtu: None,
        isolation: Isolation::Local,
        peers: vec![],
        ipv6_cidr: None,
    }
}

pub fn port(instance: &str, third_octet: u8, host: u8) -> PortSpec {
    PortSpec {
        tap: tap_name(instance),
        mac: mac_for(instance),
        ip: format!("10.{third_octet}.0.{host}"),
        hostname: format!("vm-{host}"),
        groups: vec![],
        public_ip: None,
    }
}

/// Desired state with these networks and no security groups or public network.
pub fn desired(networks: &[(&NetworkSpec, &[PortSpec])]) -> HostDesired {
    HostDesired {
        networks: networks
            .iter()
            .map(|(n, p)| ((*n).clone(), p.to_vec()))
            .collect(),
        groups: vec![],
        public: None,
    }
}

/// The repairs that are not the firewall's (its wording belongs to firewall.rs; idempotence checks still
/// look at every repair).
pub fn non_fw(repairs: &[String]) -> Vec<String> {
    repairs
        .iter()
        .filter(|r| !r.contains("nftables"))
        .cloned()
        .collect()
}

/// Teardown, which must succeed the first time (veths go before their router namespaces).
pub async fn teardown(net: &kumo_network::HostNetwork) {
    net.teardown().await.unwrap();
}

/// An apply that removes networks; always `Some` (kept so callers read the repairs).
pub async fn apply_removing(
    net: &kumo_network::HostNetwork,
    d: &HostDesired,
) -> Option<Vec<String>> {
    Some(net.apply(d).await.unwrap())
}

/// Waits until `ifname` is gone from namespace `ns` (the kernel tears a deleted namespace's veths down
/// asynchronously, and their peers with them).
pub fn wait_gone(ns: &str, ifname: &str) {
    let gone = retry(Duration::from_secs(10), || {
        link(&links(ns), ifname).is_none().then_some(())
    });
    assert!(gone.is_some(), "{ifname} still in {ns}");
}

/// The MAC kumo gives a network's gateway (`int0` in its router namespace).
pub fn gateway_mac(network: &str) -> String {
    mac_for(&format!("kumo-gateway:{network}"))
}

pub fn dnsmasq_pid(net: &kumo_network::HostNetwork, name: &str) -> i32 {
    std::fs::read_to_string(net.dnsmasq_pid_file(name))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A "guest": namespace `guest` (not created yet) whose `vg0` carries `mac`, joined by a veth to `bridge`
/// in `host_ns` (or the current namespace), the host end named `host_if`. `mtu` is set on the host end
/// (the guest end takes what DHCP says).
pub fn plug_guest(
    host_ns: Option<&str>,
    guest: &str,
    bridge: &str,
    mac: &str,
    host_if: &str,
    mtu: Option<u32>,
) {
    sh(&["ip", "netns", "add", guest]);
    sh(&["ip", "-n", guest, "link", "set", "lo", "up"]);
    let ip_in_host = |rest: &[&str]| {
        let mut v = vec!["ip"];
        if let Some(ns) = host_ns {
            v.extend(["-n", ns]);
        }
        v.extend(rest);
        sh(&v);
    };
    ip_in_host(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "vg0", "netns", guest,
    ]);
    if let Some(m) = mtu {
        ip_in_host(&["link", "set", host_if, "mtu", &m.to_string()]);
    }
    ip_in_host(&["link", "set", host_if, "master", bridge, "up"]);
    sh(&[
        "ip", "-n", guest, "link", "set", "vg0", "address", mac, "up",
    ]);
}

/// What udhcpc got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: String,
    /// Prefix length (busybox 1.35 hands the script a prefix length).
    pub mask: String,
    pub router: String,
    pub dns: String,
    /// "none" when the server sent no MTU option.
    pub mtu: String,
}

/// Runs busybox udhcpc in `guest` on vg0; the script configures the address (and the MTU when offered).
pub fn dhcp(guest: &str, dir: &Path) -> Lease {
    let script = dir.join(format!("udhcpc-{guest}.sh"));
    let result = dir.join(format!("udhcpc-{guest}.out"));
    let _ = std::fs::remove_file(&result);
    let mut f = std::fs::File::create(&script).unwrap();
    writeln!(
        f,
        "#!/bin/sh\nif [ \"$1\" = bound ]; then\n  busybox ip addr add \"$ip/$mask\" dev \"$interface\"\n  if [ -n \"$mtu\" ]; then busybox ip link set dev \"$interface\" mtu \"$mtu\"; fi\n  echo \"$ip $mask $router $dns ${{mtu:-none}}\" > {}\nfi\nexit 0",
        result.display()
    )
    .unwrap();
    drop(f);
    sh(&["chmod", "+x", script.to_str().unwrap()]);
    let script = script.display().to_string();
    let (ok, out, err) = run_in(
        guest,
        30,
        &[
            "busybox", "udhcpc", "-i", "vg0", "-f", "-q", "-n", "-t", "10", "-T", "1", "-s",
            &script,
        ],
    );
    assert!(ok, "udhcpc in {guest} failed: {out}{err}");
    let text = std::fs::read_to_string(&result).unwrap();
    let f: Vec<String> = text.split_whitespace().map(String::from).collect();
    assert_eq!(f.len(), 5, "udhcpc result {text:?}");
    Lease {
        ip: f[0].clone(),
        mask: f[1].clone(),
        router: f[2].clone(),
        dns: f[3].clone(),
        mtu: f[4].clone(),
    }
}

/// Resolves `name` with the DNS server `server` from inside `guest`; None when it does not resolve.
pub fn resolve(guest: &str, name: &str, server: &str) -> Option<String> {
    let (ok, text, _) = run_in(guest, 10, &["busybox", "nslookup", name, server]);
    if !ok {
        return None;
    }
    // The answer section follows the "Name:" line.
    let after = text.split("Name:").nth(1)?;
    after.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Address:")
            .map(|a| a.trim().to_string())
    })
}

/// Whether `ip` answers pings from `ns` (three tries, a second each).
pub fn ping(ns: &str, ip: &str) -> bool {
    run_in(ns, 10, &["busybox", "ping", "-c", "3", "-W", "1", ip]).0
}

/// `ping` retried for a few seconds (ARP and learning can take a moment on a fresh path).
pub fn ping_soon(ns: &str, ip: &str) -> bool {
    retry(Duration::from_secs(10), || ping(ns, ip).then_some(())).is_some()
}

/// The MACs answering an ARP request for `ip` sent from `ns` on vg0.
pub fn arping(ns: &str, ip: &str) -> Vec<String> {
    let (_, text, _) = run_in(
        ns,
        10,
        &[
            "busybox", "arping", "-c", "3", "-w", "3", "-b", "-I", "vg0", ip,
        ],
    );
    let mut macs: Vec<String> = text
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| {
            let start = l.find('[')?;
            let end = l.find(']')?;
            Some(l.get(start + 1..end)?.to_ascii_lowercase())
        })
        .collect();
    macs.sort();
    macs.dedup();
    macs
}

/// GET `url` from inside `ns`; the body, or None when it cannot be fetched.
pub fn http_get(ns: &str, url: &str) -> Option<String> {
    // No `-T`: busybox 1.35's wget crashes with it; `timeout` bounds the wait instead.
    let (ok, text, _) = run_in(ns, 5, &["busybox", "wget", "-q", "-O", "-", url]);
    ok.then_some(text)
}

pub fn retry<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `len` bytes that do not compress (a transfer that truncates or reorders data shows).
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` with busybox nc from `from` to `to_ip:port` (a listener in `to` started here) and
/// returns what arrived.
pub fn nc_transfer(guard: &mut Guard, from: &str, to: &str, to_ip: &str, data: &[u8]) -> Vec<u8> {
    let src = guard.dir().join(format!("send-{}", unique("")));
    let dst = guard.dir().join(format!("recv-{}", unique("")));
    std::fs::write(&src, data).unwrap();
    // A port per transfer: a finished listener keeps its port until the guard kills it.
    let port = (5001 + COUNTER.fetch_add(1, Ordering::SeqCst) % 1000).to_string();
    guard.spawn_in(to, &["busybox", "nc", "-l", "-p", &port], Some(&dst));
    // The listener needs a moment; a refused connect makes nc fail, so retry.
    let sent = retry(Duration::from_secs(10), || {
        let out = Command::new("timeout")
            .args([
                "30", "ip", "netns", "exec", from, "busybox", "nc", to_ip, &port,
            ])
            .stdin(std::fs::File::open(&src).unwrap())
            .output()
            .unwrap();
        out.status.success().then_some(())
    });
    assert!(sent.is_some(), "nc from {from} to {to_ip} never connected");
    // nc may exit once its data is queued; wait until it has all arrived (or stops growing).
    let _ = retry(Duration::from_secs(30), || {
        let len = std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
        (len >= data.len() as u64).then_some(())
    });
    std::fs::read(&dst).unwrap_or_default()
}
