//! Real tests (root): bridges, taps, dnsmasq and DHCP inside namespaces created here. No traffic leaves the
//! test namespaces. Every namespace and dnsmasq is cleaned up by a Drop guard, even when a test fails.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kumo_network::{mac_for, tap_name, HostNetwork, NetworkSpec, PortSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn is_root() -> bool {
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        true
    } else {
        // In CI (root) a missing prerequisite is a failure, never a skip.
        assert!(std::env::var_os("CI").is_none(), "these tests need root");
        eprintln!("skipping: needs root");
        false
    }
}

/// Deletes the namespaces and kills every process whose command line mentions the state directory.
struct Guard {
    namespaces: Vec<String>,
    state_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Guard {
    fn new(namespaces: Vec<String>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("state");
        Guard {
            namespaces,
            state_dir,
            _tmp: tmp,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for pid in pids_mentioning(&self.state_dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Live (non-zombie) processes whose command line contains `path`.
fn pids_mentioning(path: &Path) -> Vec<i32> {
    let needle = path.display().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmd).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn links(ns: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&sh(&["ip", "-n", ns, "-j", "-d", "addr", "show"])).unwrap()
}

fn link<'a>(all: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    all.iter().find(|l| l["ifname"] == name)
}

fn is_up(l: &serde_json::Value) -> bool {
    l["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"))
}

fn network(name: &str, bridge: &str, third_octet: u8) -> NetworkSpec {
    NetworkSpec {
        name: name.into(),
        bridge: bridge.into(),
        cidr: format!("10.{third_octet}.0.0/24"),
        gateway: format!("10.{third_octet}.0.1"),
        mtu: None,
        isolation: kumo_network::Isolation::Local,
        peers: vec![],
    }
}

fn port(instance: &str, third_octet: u8, host: u8) -> PortSpec {
    PortSpec {
        tap: tap_name(instance),
        mac: mac_for(instance),
        ip: format!("10.{third_octet}.0.{host}"),
        hostname: format!("vm-{host}"),
        groups: vec![],
        public_ip: None,
    }
}

fn dnsmasq_pid(net: &HostNetwork, name: &str) -> i32 {
    std::fs::read_to_string(net.dnsmasq_pid_file(name))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// A "guest": namespace `guest` with a veth whose other end is enslaved to `bridge` in `host_ns` (or in
/// the current namespace when `host_ns` is None), carrying `mac`.
fn plug_guest(host_ns: Option<&str>, guest: &str, bridge: &str, mac: &str) {
    sh(&["ip", "netns", "add", guest]);
    sh(&["ip", "-n", guest, "link", "set", "lo", "up"]);
    let mut add = vec!["ip"];
    if let Some(ns) = host_ns {
        add.extend(["-n", ns]);
    }
    add.extend([
        "link", "add", "vh0", "type", "veth", "peer", "name", "vg0", "netns", guest,
    ]);
    sh(&add);
    let mut set = vec!["ip"];
    if let Some(ns) = host_ns {
        set.extend(["-n", ns]);
    }
    set.extend(["link", "set", "vh0", "master", bridge, "up"]);
    sh(&set);
    sh(&[
        "ip", "-n", guest, "link", "set", "vg0", "address", mac, "up",
    ]);
}

/// Runs busybox udhcpc in `guest`; returns (ip, mask, router, dns, mtu or "none"). The script also
/// configures the address.
fn dhcp(guest: &str, dir: &Path) -> (String, String, String, String, String) {
    let script = dir.join(format!("udhcpc-{guest}.sh"));
    let result = dir.join(format!("udhcpc-{guest}.out"));
    let mut f = std::fs::File::create(&script).unwrap();
    writeln!(
        f,
        "#!/bin/sh\nif [ \"$1\" = bound ]; then\n  busybox ip addr add \"$ip/$mask\" dev \"$interface\"\n  echo \"$ip $mask $router $dns ${{mtu:-none}}\" > {}\nfi\nexit 0",
        result.display()
    )
    .unwrap();
    drop(f);
    sh(&["chmod", "+x", script.to_str().unwrap()]);
    let out = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", guest, "busybox", "udhcpc"])
        .args(["-i", "vg0", "-f", "-q", "-n", "-t", "10", "-T", "1", "-s"])
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "udhcpc failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&result).unwrap();
    let f: Vec<String> = text.split_whitespace().map(String::from).collect();
    (
        f[0].clone(),
        f[1].clone(),
        f[2].clone(),
        f[3].clone(),
        f[4].clone(),
    )
}

/// Resolves `name` with the DNS server `server` from inside `guest`; None when it does not resolve.
fn resolve(guest: &str, name: &str, server: &str) -> Option<String> {
    let out = Command::new("timeout")
        .args([
            "10", "ip", "netns", "exec", guest, "busybox", "nslookup", name, server,
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // The answer section follows the "Name:" line.
    let after = text.split("Name:").nth(1)?;
    after.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Address:")
            .map(|a| a.trim().to_string())
    })
}

fn retry<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(5);
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

#[tokio::test]
async fn full_lifecycle_in_own_namespace() {
    if !is_root() {
        return;
    }
    let ns = unique("kn-life-");
    let guest = unique("kn-guest-");
    let guard = Guard::new(vec![ns.clone(), guest.clone()]);
    let state = guard.state_dir.clone();

    let net = HostNetwork::new(Some(ns.clone()), state.clone())
        .await
        .unwrap();
    assert_eq!(net.netns(), Some(ns.as_str()));
    assert!(Path::new("/run/netns").join(&ns).exists());

    let spec = network("default", "kb-default", 77);
    let a = port("i-00000000000000a1", 77, 10);
    let b = port("i-00000000000000b2", 77, 11);
    let repairs = net
        .apply(&[(spec.clone(), vec![a.clone(), b.clone()])])
        .await
        .unwrap();
    assert!(
        repairs.contains(&"created bridge kb-default for network default".to_string()),
        "{repairs:?}"
    );
    assert!(repairs.contains(&"started dnsmasq for default".to_string()));

    let all = links(&ns);
    let br = link(&all, "kb-default").expect("bridge exists");
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert!(is_up(br));
    assert!(br["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["local"] == "10.77.0.1" && a["prefixlen"] == 24));
    for p in [&a, &b] {
        let t = link(&all, &p.tap).expect("tap exists");
        assert_eq!(t["linkinfo"]["info_kind"], "tun");
        assert_eq!(t["master"], "kb-default");
        assert!(is_up(t));
    }
    let pid = dnsmasq_pid(&net, "default");
    assert!(alive(pid));
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino(),
        std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino(),
        "dnsmasq runs inside the namespace"
    );

    // Idempotent: nothing to do the second time.
    let again = net
        .apply(&[(spec.clone(), vec![a.clone(), b.clone()])])
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(dnsmasq_pid(&net, "default"), pid);

    // A guest with port a's MAC gets exactly port a's address, the router and DNS.
    plug_guest(Some(&ns), &guest, "kb-default", &a.mac);
    let (ip, mask, router, dns, mtu) = dhcp(&guest, guard._tmp.path());
    assert_eq!(ip, a.ip);
    assert_eq!(mask, "24"); // busybox 1.35 hands the script a prefix length
    assert_eq!(router, "10.77.0.1");
    assert_eq!(dns, "10.77.0.1");
    assert_eq!(mtu, "none");
    assert_eq!(
        resolve(&guest, "vm-11", "10.77.0.1").as_deref(),
        Some("10.77.0.11")
    );

    // Remove port b: its tap and its entries go, dnsmasq is reloaded (not restarted).
    let repairs = net.apply(&[(spec.clone(), vec![a.clone()])]).await.unwrap();
    assert!(
        repairs.contains(&format!("removed tap {}", b.tap)),
        "{repairs:?}"
    );
    assert!(repairs
        .iter()
        .any(|r| r.starts_with("reloaded dnsmasq hosts for default")));
    assert!(link(&links(&ns), &b.tap).is_none());
    assert!(link(&links(&ns), &a.tap).is_some());
    let hosts = std::fs::read_to_string(state.join("dnsmasq").join("default.dhcp-hosts")).unwrap();
    assert!(hosts.contains(&a.mac) && !hosts.contains(&b.mac), "{hosts}");
    assert_eq!(dnsmasq_pid(&net, "default"), pid);
    assert!(
        retry(|| resolve(&guest, "vm-11", "10.77.0.1")
            .is_none()
            .then_some(()))
        .is_some(),
        "vm-11 still resolves after reload"
    );
    assert_eq!(
        resolve(&guest, "vm-10", "10.77.0.1").as_deref(),
        Some("10.77.0.10")
    );

    // A dead dnsmasq is restarted and reported.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(retry(|| (!alive(pid)).then_some(())).is_some());
    let repairs = net.apply(&[(spec.clone(), vec![a.clone()])]).await.unwrap();
    assert_eq!(
        repairs,
        vec!["restarted dnsmasq for default (was not running)".to_string()]
    );
    let pid2 = dnsmasq_pid(&net, "default");
    assert_ne!(pid2, pid);
    assert!(alive(pid2));

    // A bridge deleted by hand is re-created, its tap re-attached, dnsmasq restarted on the new bridge.
    sh(&["ip", "-n", &ns, "link", "del", "kb-default"]);
    let repairs = net.apply(&[(spec.clone(), vec![a.clone()])]).await.unwrap();
    assert!(
        repairs.contains(&"re-created bridge kb-default for network default".to_string()),
        "{repairs:?}"
    );
    assert!(repairs.contains(&"restarted dnsmasq for default (bridge re-created)".to_string()));
    let all = links(&ns);
    assert_eq!(link(&all, &a.tap).unwrap()["master"], "kb-default");
    assert!(alive(dnsmasq_pid(&net, "default")));
    // The guest, re-plugged into the new bridge, still gets its address.
    sh(&[
        "ip",
        "-n",
        &ns,
        "link",
        "set",
        "vh0",
        "master",
        "kb-default",
    ]);
    sh(&["ip", "-n", &guest, "addr", "flush", "dev", "vg0"]);
    let (ip, ..) = dhcp(&guest, guard._tmp.path());
    assert_eq!(ip, a.ip);
    assert!(net
        .apply(&[(spec.clone(), vec![a.clone()])])
        .await
        .unwrap()
        .is_empty());

    // connect_tcp from this process (root namespace) to a server that exists only inside the namespace.
    let www = guard._tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the namespace\n").unwrap();
    let mut httpd = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "busybox",
            "httpd",
            "-f",
            "-p",
            "10.77.0.1:8080",
            "-h",
        ])
        .arg(&www)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stream = None;
    for _ in 0..50 {
        match net.connect_tcp("10.77.0.1".parse().unwrap(), 8080).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut stream = stream.expect("connect_tcp into the namespace");
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "{body}"
    );
    assert!(body.contains("hello from the namespace"), "{body}");
    let _ = httpd.kill().await;

    // Removing the network stops its dnsmasq and deletes bridge and taps.
    let pid3 = dnsmasq_pid(&net, "default");
    let repairs = net.apply(&[]).await.unwrap();
    assert!(repairs.contains(&"stopped dnsmasq for default (network removed)".to_string()));
    assert!(!alive(pid3));
    let all = links(&ns);
    assert!(link(&all, "kb-default").is_none() && link(&all, &a.tap).is_none());
    assert!(
        link(&all, "vh0").is_some(),
        "links kumo did not create are left alone"
    );

    // Teardown: no namespace, no dnsmasq, no files.
    net.apply(&[(spec.clone(), vec![a.clone(), b.clone()])])
        .await
        .unwrap();
    net.teardown().await.unwrap();
    assert!(!Path::new("/run/netns").join(&ns).exists());
    assert!(pids_mentioning(&state).is_empty());
    assert!(
        !state.exists(),
        "state dir left: {:?}",
        std::fs::read_dir(&state).map(|d| d.count())
    );
}

/// `netns: None` with the caller already inside a namespace (as an agent of a test host is): two networks,
/// two dnsmasq side by side, DHCP on the second; teardown leaves the (foreign) namespace in place.
#[test]
fn current_namespace_two_networks() {
    if !is_root() {
        return;
    }
    let ns = unique("kn-cur-");
    let guest = unique("kn-guest-");
    let guard = Guard::new(vec![ns.clone(), guest.clone()]);
    sh(&["ip", "netns", "add", &ns]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    let state = guard.state_dir.clone();
    let tmp = guard._tmp.path().to_path_buf();
    let ns_path = PathBuf::from("/run/netns").join(&ns);
    let guest2 = guest.clone();
    let ns2 = ns.clone();
    let handle = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns_path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let net = HostNetwork::new(None, state.clone()).await.unwrap();
            assert_eq!(net.netns(), None);
            let one = network("one", "kb-one", 80);
            let mut two = network("two", "kb-two", 81);
            two.mtu = Some(1450);
            let p1 = port("i-0000000000000c01", 80, 20);
            let p2 = port("i-0000000000000c02", 81, 30);
            net.apply(&[
                (one.clone(), vec![p1.clone()]),
                (two.clone(), vec![p2.clone()]),
            ])
            .await
            .unwrap();
            let (d1, d2) = (dnsmasq_pid(&net, "one"), dnsmasq_pid(&net, "two"));
            assert!(alive(d1) && alive(d2));
            // Links are in the namespace this thread is in.
            let all = links(&ns2);
            assert!(link(&all, "kb-one").is_some() && link(&all, "kb-two").is_some());
            plug_guest(None, &guest2, "kb-two", &p2.mac);
            let all = links(&ns2);
            assert_eq!(link(&all, "kb-two").unwrap()["mtu"], 1450);
            assert_eq!(link(&all, &p2.tap).unwrap()["mtu"], 1450);
            assert_eq!(link(&all, "kb-one").unwrap()["mtu"], 1500);
            let (ip, _, router, _, mtu) = dhcp(&guest2, &tmp);
            assert_eq!(
                (ip.as_str(), router.as_str(), mtu.as_str()),
                ("10.81.0.30", "10.81.0.1", "1450")
            );
            assert!(net
                .apply(&[(one, vec![p1]), (two, vec![p2])])
                .await
                .unwrap()
                .is_empty());
            net.teardown().await.unwrap();
            assert!(pids_mentioning(&state).is_empty());
            let all = links(&ns2);
            assert!(link(&all, "kb-one").is_none() && link(&all, "kb-two").is_none());
            assert!(link(&all, "vh0").is_some());
        });
    });
    let res = handle.join();
    assert!(
        Path::new("/run/netns").join(&ns).exists(),
        "a namespace kumo did not create is kept"
    );
    drop(guard);
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

/// Timing of an apply with 50 ports: cold (everything created), warm (nothing to do), one port changed.
#[tokio::test]
async fn apply_fifty_ports_timing() {
    if !is_root() {
        return;
    }
    let ns = unique("kn-fifty-");
    let guard = Guard::new(vec![ns.clone()]);
    let net = HostNetwork::new(Some(ns.clone()), guard.state_dir.clone())
        .await
        .unwrap();
    let spec = network("big", "kb-big", 90);
    let mut ports: Vec<PortSpec> = (0..50)
        .map(|i| port(&format!("i-{:017x}", 0xf000 + i), 90, 10 + i as u8))
        .collect();
    let t = Instant::now();
    let r = net.apply(&[(spec.clone(), ports.clone())]).await.unwrap();
    let cold = t.elapsed();
    assert_eq!(r.len(), 52, "{r:?}"); // bridge + 50 taps + dnsmasq
    let t = Instant::now();
    let r = net.apply(&[(spec.clone(), ports.clone())]).await.unwrap();
    let warm = t.elapsed();
    assert!(r.is_empty(), "{r:?}");
    ports.pop();
    ports.push(port("i-0000000000000ffff", 90, 200));
    let t = Instant::now();
    let r = net.apply(&[(spec.clone(), ports.clone())]).await.unwrap();
    let change = t.elapsed();
    assert_eq!(r.len(), 3, "{r:?}"); // removed tap, created tap, reloaded hosts
    let all = links(&ns);
    assert_eq!(all.iter().filter(|l| l["master"] == "kb-big").count(), 50);
    eprintln!("apply 50 ports: cold {cold:?}, warm (no-op) {warm:?}, one port swapped {change:?}");
    net.teardown().await.unwrap();
    assert!(!Path::new("/run/netns").join(&ns).exists());
}

/// Someone deletes the namespace by hand (`ip netns del`) while dnsmasq still runs in it: apply re-creates
/// the namespace, the bridge and taps in it, and moves dnsmasq into it.
#[tokio::test]
async fn namespace_deleted_by_hand_is_rebuilt() {
    if !is_root() {
        return;
    }
    let ns = unique("kn-gone-");
    let guard = Guard::new(vec![ns.clone()]);
    let net = HostNetwork::new(Some(ns.clone()), guard.state_dir.clone())
        .await
        .unwrap();
    let spec = network("default", "kb-default", 91);
    let p = port("i-0000000000000d01", 91, 10);
    net.apply(&[(spec.clone(), vec![p.clone()])]).await.unwrap();
    let old_pid = dnsmasq_pid(&net, "default");
    sh(&["ip", "netns", "del", &ns]);
    let repairs = net.apply(&[(spec.clone(), vec![p.clone()])]).await.unwrap();
    assert_eq!(
        repairs,
        vec![
            format!("re-created namespace {ns}"),
            "re-created bridge kb-default for network default".to_string(),
            format!("re-created tap {} on kb-default", p.tap),
            "restarted dnsmasq for default (configuration or namespace changed)".to_string(),
        ]
    );
    assert!(!alive(old_pid));
    let pid = dnsmasq_pid(&net, "default");
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino(),
        std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino()
    );
    assert!(link(&links(&ns), &p.tap).is_some());
    net.teardown().await.unwrap();
    assert!(!Path::new("/run/netns").join(&ns).exists());
    assert!(pids_mentioning(&guard.state_dir).is_empty());
}
