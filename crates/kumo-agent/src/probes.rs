//! Network-path probes: the host checks, from the VMs' side of its networking, that operator-given
//! targets (a gateway, the storage) answer. Management traffic (heartbeats) takes another path, so
//! a host can be reachable by the controller while its VMs are cut off; the controller moves the
//! VMs away when every target of a host is down (see `kumo_controller` `pathwatch`).
//!
//! Targets are `IP` (one ICMP echo, `busybox ping`) or `IP%IFACE` (one ARP request on that
//! interface, `busybox arping`: works on a bridge with no address of its own, like a host's
//! public bridge). Each is probed every second; a target is down after [`DOWN_AFTER`] failures in
//! a row and up again after [`UP_AFTER`] successes, so a brief flap changes nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kumo_types::agent::PathReport;

use crate::Agent;

/// Between two probes of a target.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Failed probes in a row before a target counts as down.
pub const DOWN_AFTER: u32 = 3;
/// Successful probes in a row before a down target counts as up again.
pub const UP_AFTER: u32 = 2;
/// A probe waits 1 s for its answer; this only stops a hung child.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFACE: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("probe target {target:?}: {reason} (use IP for an ICMP echo or IP%IFACE for an ARP probe, e.g. 192.0.2.1 or 203.0.113.1%pub0)")]
    BadTarget { target: String, reason: String },
    #[error("probe target {0} is given twice")]
    Duplicate(String),
    #[error("--probe needs busybox (its ping and arping applets) on this host; not found in PATH")]
    NoBusybox,
    #[error("probe target {target}: interface {iface} does not exist{where_}")]
    NoInterface {
        target: String,
        iface: String,
        where_: String,
    },
}

/// One probe target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// One ICMP echo to this address, routed as the host's VM side routes it.
    Icmp(IpAddr),
    /// One ARP request for `ip` on `iface` (IPv4 only; no address needed on `iface`).
    Arp { ip: Ipv4Addr, iface: String },
}

impl FromStr for ProbeTarget {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<ProbeTarget, ProbeError> {
        let bad = |reason: &str| ProbeError::BadTarget {
            target: s.to_string(),
            reason: reason.to_string(),
        };
        let (ip, iface) = match s.split_once('%') {
            Some((ip, iface)) => (ip, Some(iface)),
            None => (s, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(bad("not the address of one machine"));
        }
        let Some(iface) = iface else {
            return Ok(ProbeTarget::Icmp(ip));
        };
        let IpAddr::V4(ip) = ip else {
            return Err(bad("ARP probes (IP%IFACE) are IPv4 only"));
        };
        if iface.is_empty() || iface.len() > MAX_IFACE {
            return Err(bad("an interface name has 1 to 15 characters"));
        }
        if iface == "."
            || iface == ".."
            || iface.contains(['/', '%', ':'])
            || iface.contains(char::is_whitespace)
        {
            return Err(bad("not a valid interface name"));
        }
        Ok(ProbeTarget::Arp {
            ip,
            iface: iface.to_string(),
        })
    }
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeTarget::Icmp(ip) => write!(f, "{ip}"),
            ProbeTarget::Arp { ip, iface } => write!(f, "{ip}%{iface}"),
        }
    }
}

/// Up/down with hysteresis: a state flips only after enough contrary results in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    up: bool,
    /// Contrary results in a row so far.
    streak: u32,
}

impl Default for Hysteresis {
    /// Up: a target is trusted until it has failed [`DOWN_AFTER`] times in a row.
    fn default() -> Hysteresis {
        Hysteresis {
            up: true,
            streak: 0,
        }
    }
}

impl Hysteresis {
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Fold one probe result in; true when the state flipped.
    pub fn observe(&mut self, ok: bool) -> bool {
        if ok == self.up {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.up { DOWN_AFTER } else { UP_AFTER };
        if self.streak < needed {
            return false;
        }
        self.up = ok;
        self.streak = 0;
        true
    }
}

/// The configured targets and what the probes have seen of them.
pub(crate) struct Probes {
    targets: Vec<ProbeTarget>,
    state: Mutex<Vec<Hysteresis>>,
}

impl Probes {
    /// Refuses a target given twice (each must be reported once).
    pub(crate) fn new(targets: Vec<ProbeTarget>) -> Result<Probes, ProbeError> {
        for (i, t) in targets.iter().enumerate() {
            if targets[..i].contains(t) {
                return Err(ProbeError::Duplicate(t.to_string()));
            }
        }
        let state = Mutex::new(vec![Hysteresis::default(); targets.len()]);
        Ok(Probes { targets, state })
    }

    /// What goes into the heartbeat; `None` when nothing is probed.
    pub(crate) fn report(&self) -> Option<PathReport> {
        if self.targets.is_empty() {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Some(PathReport {
            targets: self.targets.iter().map(ToString::to_string).collect(),
            failing: self
                .targets
                .iter()
                .zip(state.iter())
                .filter(|(_, h)| !h.is_up())
                .map(|(t, _)| t.to_string())
                .collect(),
        })
    }

    /// Fold one round of results (in target order); returns the targets that flipped, with
    /// their new state (true: up).
    fn fold(&self, results: &[bool]) -> Vec<(&ProbeTarget, bool)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut flipped = vec![];
        for ((t, h), ok) in self.targets.iter().zip(state.iter_mut()).zip(results) {
            if h.observe(*ok) {
                flipped.push((t, h.is_up()));
            }
        }
        flipped
    }

    /// Checks what can be checked before the agent starts: busybox is there, and each ARP
    /// target's interface exists where the VMs' networks live (a typo would otherwise read as a
    /// dead path and empty the host).
    pub(crate) async fn check(&self, netns: Option<&str>) -> Result<(), ProbeError> {
        if self.targets.is_empty() {
            return Ok(());
        }
        find_program("busybox").ok_or(ProbeError::NoBusybox)?;
        for t in &self.targets {
            let ProbeTarget::Arp { iface, .. } = t else {
                continue;
            };
            // Netlink, not /sys/class/net: sysfs shows the namespace it was mounted in, which
            // is not ours when only the network namespace was entered.
            let ip = find_program("ip").unwrap_or_else(|| PathBuf::from("ip"));
            let mut cmd = tokio::process::Command::new(ip);
            if let Some(ns) = netns {
                cmd.args(["-n", ns]);
            }
            let exists = cmd
                .args(["link", "show", "dev", iface])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map(|s| s.success())
                .unwrap_or(false);
            if !exists {
                return Err(ProbeError::NoInterface {
                    target: t.to_string(),
                    iface: iface.clone(),
                    where_: netns
                        .map(|ns| format!(" in network namespace {ns}"))
                        .unwrap_or_default(),
                });
            }
        }
        Ok(())
    }
}

/// `name` from PATH or the usual system directories (a service's PATH may lack sbin).
fn find_program(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let fallback = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    from_path
        .into_iter()
        .chain(fallback)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The command line of one probe of `t`, run in `netns` when the VMs live in one.
fn probe_command(t: &ProbeTarget, netns: Option<&str>) -> Vec<String> {
    let mut argv: Vec<String> = vec![];
    if let Some(ns) = netns {
        let ip = find_program("ip").unwrap_or_else(|| PathBuf::from("ip"));
        argv.extend([
            ip.display().to_string(),
            "netns".into(),
            "exec".into(),
            ns.into(),
        ]);
    }
    let busybox = find_program("busybox").unwrap_or_else(|| PathBuf::from("busybox"));
    argv.push(busybox.display().to_string());
    match t {
        ProbeTarget::Icmp(ip) => {
            argv.extend(["ping", "-c", "1", "-W", "1"].map(String::from));
            argv.push(ip.to_string());
        }
        // Sender 0.0.0.0 (an RFC 5227 probe): answered like any request, but it touches no
        // neighbour's ARP cache and needs no address on the interface.
        ProbeTarget::Arp { ip, iface } => {
            argv.extend(["arping", "-c", "1", "-w", "1", "-s", "0.0.0.0", "-I"].map(String::from));
            argv.push(iface.clone());
            argv.push(ip.to_string());
        }
    }
    argv
}

/// One probe: `Ok` when the target answered, else what the probe said.
async fn probe_once(t: &ProbeTarget, netns: Option<&str>) -> Result<(), String> {
    let argv = probe_command(t, netns);
    let (prog, args) = argv.split_first().ok_or("empty probe command")?;
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(PROBE_TIMEOUT, child).await {
        Err(_) => Err(format!("no result within {} s", PROBE_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(format!("running {prog}: {e}")),
        Ok(Ok(o)) if o.status.success() => Ok(()),
        Ok(Ok(o)) => {
            let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
            Err(if err.is_empty() {
                "no answer".to_string()
            } else {
                err
            })
        }
    }
}

impl Agent {
    /// Probe every target each [`PROBE_INTERVAL`], for the life of the agent. A target changing
    /// state wakes the heartbeat, so the controller hears of it at once.
    pub(crate) async fn probe_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let netns = self.cfg.vm_netns.clone();
        loop {
            tick.tick().await;
            let results = futures::future::join_all(
                self.probes
                    .targets
                    .iter()
                    .map(|t| probe_once(t, netns.as_deref())),
            )
            .await;
            let oks: Vec<bool> = results.iter().map(Result::is_ok).collect();
            let flipped = self.probes.fold(&oks);
            for (t, up) in &flipped {
                if *up {
                    tracing::info!(target = %t, "network path probe answers again");
                } else {
                    let i = self.probes.targets.iter().position(|x| x == *t);
                    let why = i
                        .and_then(|i| results.get(i))
                        .and_then(|r| r.as_ref().err().cloned())
                        .unwrap_or_default();
                    tracing::warn!(target = %t, why, "network path probe down ({DOWN_AFTER} failures in a row)");
                }
            }
            if !flipped.is_empty() {
                self.beat.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        for s in ["192.0.2.1", "203.0.113.1%pub0", "2001:db8::1"] {
            let t: ProbeTarget = s.parse().expect(s);
            assert_eq!(t.to_string(), s);
        }
        assert_eq!(
            "203.0.113.1%pub0".parse::<ProbeTarget>(),
            Ok(ProbeTarget::Arp {
                ip: Ipv4Addr::new(203, 0, 113, 1),
                iface: "pub0".into()
            })
        );
    }

    #[test]
    fn bad_targets_are_refused_with_the_reason() {
        for (s, why) in [
            ("", "not an IP address"),
            ("gateway", "not an IP address"),
            ("192.0.2.300", "not an IP address"),
            ("0.0.0.0", "one machine"),
            ("224.0.0.1", "one machine"),
            ("255.255.255.255", "one machine"),
            ("2001:db8::1%eth0", "IPv4 only"),
            ("192.0.2.1%", "1 to 15"),
            ("192.0.2.1%averyveryverylongname", "1 to 15"),
            ("192.0.2.1%a/b", "valid interface"),
            ("192.0.2.1%a b", "valid interface"),
            ("192.0.2.1%..", "valid interface"),
        ] {
            let e = s.parse::<ProbeTarget>().expect_err(s).to_string();
            assert!(e.contains(why), "{s:?}: {e}");
            assert!(
                e.contains("IP%IFACE"),
                "{s:?}: the error shows the forms: {e}"
            );
        }
    }

    #[test]
    fn a_target_given_twice_is_refused() {
        let t: ProbeTarget = "192.0.2.1".parse().expect("target");
        let e = Probes::new(vec![t.clone(), t]).err().expect("duplicate");
        assert_eq!(e, ProbeError::Duplicate("192.0.2.1".into()));
    }

    #[test]
    fn down_after_three_failures_in_a_row_up_after_two_successes() {
        let mut h = Hysteresis::default();
        assert!(h.is_up());
        // Flaps shorter than the window change nothing.
        for ok in [false, false, true, false, true, false, false, true] {
            assert!(!h.observe(ok), "flipped on a flap");
            assert!(h.is_up());
        }
        assert!(!h.observe(false));
        assert!(!h.observe(false));
        assert!(h.observe(false), "the third failure in a row takes it down");
        assert!(!h.is_up());
        assert!(!h.observe(false), "staying down is no change");
        // One success is not enough; a failure starts the count again.
        assert!(!h.observe(true));
        assert!(!h.observe(false));
        assert!(!h.observe(true));
        assert!(!h.is_up());
        assert!(h.observe(true), "the second success in a row brings it up");
        assert!(h.is_up());
    }

    #[test]
    fn the_report_lists_failing_targets_and_nothing_without_targets() {
        assert_eq!(Probes::new(vec![]).expect("none").report(), None);
        let a: ProbeTarget = "192.0.2.1".parse().expect("a");
        let b: ProbeTarget = "203.0.113.1%pub0".parse().expect("b");
        let p = Probes::new(vec![a, b]).expect("probes");
        let r = p.report().expect("report");
        assert_eq!(r.targets, vec!["192.0.2.1", "203.0.113.1%pub0"]);
        assert!(r.failing.is_empty());
        assert!(!r.all_down());
        for round in 0..DOWN_AFTER {
            let flipped = p.fold(&[true, false]);
            assert_eq!(flipped.len(), usize::from(round + 1 == DOWN_AFTER));
        }
        let r = p.report().expect("report");
        assert_eq!(r.failing, vec!["203.0.113.1%pub0"]);
        assert!(!r.all_down(), "one target still answers");
        for _ in 0..DOWN_AFTER {
            p.fold(&[false, false]);
        }
        assert!(p.report().expect("report").all_down());
    }

    /// Two namespaces on a veth pair: `a` (no address, as a host's public bridge) and `b`
    /// (192.0.2.1/24, the gateway). Removed on drop, even when the test fails.
    struct Pair {
        a: String,
        b: String,
    }

    impl Pair {
        fn new() -> Pair {
            let tag = std::process::id() % 100_000;
            let p = Pair {
                a: format!("kpra{tag}"),
                b: format!("kprb{tag}"),
            };
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .expect("ip");
                assert!(st.success(), "ip {args:?} (this test needs root)");
            };
            ip(&["netns", "add", &p.a]);
            ip(&["netns", "add", &p.b]);
            ip(&[
                "-n", &p.a, "link", "add", "pub0", "type", "veth", "peer", "name", "eth0", "netns",
                &p.b,
            ]);
            ip(&["-n", &p.b, "addr", "add", "192.0.2.1/24", "dev", "eth0"]);
            ip(&["-n", &p.b, "link", "set", "eth0", "up"]);
            ip(&["-n", &p.a, "link", "set", "pub0", "up"]);
            p
        }

        fn link(&self, up: bool) {
            let st = std::process::Command::new("ip")
                .args([
                    "-n",
                    &self.b,
                    "link",
                    "set",
                    "eth0",
                    if up { "up" } else { "down" },
                ])
                .status()
                .expect("ip");
            assert!(st.success());
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status();
            }
        }
    }

    /// The real probes against a real neighbour: they answer while the link is up and fail
    /// when it is down; the interface check refuses a missing interface.
    #[tokio::test]
    async fn real_probes_see_a_link_go_down() {
        let pair = Pair::new();
        let arp: ProbeTarget = "192.0.2.1%pub0".parse().expect("arp");
        let missing: ProbeTarget = "192.0.2.1%nosuch0".parse().expect("missing");
        let ns = Some(pair.a.as_str());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The veth needs a moment to come up.
        while let Err(e) = probe_once(&arp, ns).await {
            assert!(
                std::time::Instant::now() < deadline,
                "ARP probe never answered: {e}"
            );
        }
        assert!(
            probe_once(&"192.0.2.7%pub0".parse().expect("t"), ns)
                .await
                .is_err(),
            "nobody has 192.0.2.7"
        );
        let e = probe_once(&missing, ns)
            .await
            .expect_err("no such interface");
        assert!(e.contains("nosuch0"), "{e}");
        Probes::new(vec![arp.clone()])
            .expect("p")
            .check(ns)
            .await
            .expect("pub0 exists in a");
        let e = Probes::new(vec![missing])
            .expect("p")
            .check(ns)
            .await
            .expect_err("missing");
        assert!(matches!(e, ProbeError::NoInterface { .. }), "{e}");
        assert!(e.to_string().contains(&pair.a), "{e}");
        // In the agent's own namespace.
        let lo: ProbeTarget = "192.0.2.1%lo".parse().expect("lo");
        Probes::new(vec![lo])
            .expect("p")
            .check(None)
            .await
            .expect("lo exists");
        let e = Probes::new(vec!["192.0.2.1%nosuch0".parse().expect("t")])
            .expect("p")
            .check(None)
            .await
            .expect_err("missing here");
        assert_eq!(
            e.to_string(),
            "probe target 192.0.2.1%nosuch0: interface nosuch0 does not exist"
        );
        // ICMP needs an address on the probing side.
        let st = std::process::Command::new("ip")
            .args(["-n", &pair.a, "addr", "add", "192.0.2.50/24", "dev", "pub0"])
            .status()
            .expect("ip");
        assert!(st.success());
        let icmp: ProbeTarget = "192.0.2.1".parse().expect("icmp");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Err(e) = probe_once(&icmp, ns).await {
            assert!(
                std::time::Instant::now() < deadline,
                "ping never answered: {e}"
            );
        }
        pair.link(false);
        assert!(
            probe_once(&arp, ns).await.is_err(),
            "ARP answered over a dead link"
        );
        assert!(
            probe_once(&icmp, ns).await.is_err(),
            "ping answered over a dead link"
        );
        pair.link(true);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while probe_once(&arp, ns).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "ARP never answered again"
            );
        }
    }

    #[test]
    fn probe_commands_use_busybox_in_the_vm_namespace() {
        let t: ProbeTarget = "203.0.113.1%pub0".parse().expect("t");
        let argv = probe_command(&t, Some("vmns"));
        assert!(
            argv[0].ends_with("ip") && argv[1..4] == ["netns", "exec", "vmns"],
            "{argv:?}"
        );
        assert!(argv[4].ends_with("busybox"), "{argv:?}");
        assert_eq!(
            argv[5..],
            [
                "arping",
                "-c",
                "1",
                "-w",
                "1",
                "-s",
                "0.0.0.0",
                "-I",
                "pub0",
                "203.0.113.1"
            ]
        );
        let t: ProbeTarget = "192.0.2.1".parse().expect("t");
        let argv = probe_command(&t, None);
        assert!(argv[0].ends_with("busybox"), "{argv:?}");
        assert_eq!(argv[1..], ["ping", "-c", "1", "-W", "1", "192.0.2.1"]);
    }
}
