//! Real traffic through kumo's nftables rulesets (root). A "host" namespace holds the network's bridge with
//! two "VM" namespaces on veths named like taps and a router namespace; a public bridge joins the router's
//! ext0 to an "outside" namespace. Nothing leaves these namespaces; a Drop guard removes them and every
//! server process, even when the test fails.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kumo_network::{
    mac_for, render_for_test, GroupPolicy, Isolation, NetworkSpec, Nft, PortSpec, PublicNetwork,
    RulePolicy, HOST_TABLES, ROUTER_TABLES,
};

const VM1_TAP: &str = "kt-aaaaaaaaaaa1";
const VM2_TAP: &str = "kt-aaaaaaaaaaa2";
const VM1_MAC: &str = "02:00:00:00:00:01";
const VM2_MAC: &str = "02:00:00:00:00:02";

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

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces of one test, and the servers running in them.
struct Lab {
    host: String,
    vm1: String,
    vm2: String,
    router: String,
    outside: String,
    servers: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [
            &self.host,
            &self.vm1,
            &self.vm2,
            &self.router,
            &self.outside,
        ] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Lab {
    fn new() -> Lab {
        let p = format!("kfw{}", std::process::id());
        let mut lab = Lab {
            host: format!("{p}-host"),
            vm1: format!("{p}-vm1"),
            vm2: format!("{p}-vm2"),
            router: format!("{p}-router"),
            outside: format!("{p}-out"),
            servers: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let (h, r, o) = (lab.host.clone(), lab.router.clone(), lab.outside.clone());
        for ns in [&lab.host, &lab.vm1, &lab.vm2, &lab.router, &lab.outside] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        for (br, _) in [("kb-t1", ()), ("kb-pub", ())] {
            sh(&["ip", "-n", &h, "link", "add", br, "type", "bridge"]);
            sh(&["ip", "-n", &h, "link", "set", br, "up"]);
        }
        // veth `host_end` on `bridge` in the host namespace, its peer `inner` in `ns`.
        let plug = |ns: &str, host_end: &str, bridge: &str, inner: &str| {
            sh(&[
                "ip", "-n", &h, "link", "add", host_end, "type", "veth", "peer", "name", inner,
                "netns", ns,
            ]);
            sh(&[
                "ip", "-n", &h, "link", "set", host_end, "master", bridge, "up",
            ]);
        };
        for (ns, tap, mac, ip) in [
            (&lab.vm1, VM1_TAP, VM1_MAC, "10.0.0.10/24"),
            (&lab.vm2, VM2_TAP, VM2_MAC, "10.0.0.11/24"),
        ] {
            plug(ns, tap, "kb-t1", "eth0");
            sh(&["ip", "-n", ns, "link", "set", "eth0", "address", mac, "up"]);
            sh(&["ip", "-n", ns, "addr", "add", ip, "dev", "eth0"]);
            sh(&["ip", "-n", ns, "route", "add", "default", "via", "10.0.0.1"]);
        }
        plug(&r, "kr-t1", "kb-t1", "int0");
        let gw_mac = mac_for("kumo-gateway:t1");
        sh(&[
            "ip", "-n", &r, "link", "set", "int0", "address", &gw_mac, "up",
        ]);
        sh(&["ip", "-n", &r, "addr", "add", "10.0.0.1/24", "dev", "int0"]);
        sh(&[
            "ip",
            "-n",
            &r,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "lo",
        ]);
        plug(&r, "kp-t1", "kb-pub", "ext0");
        sh(&[
            "ip",
            "-n",
            &r,
            "addr",
            "add",
            "203.0.113.10/32",
            "dev",
            "ext0",
        ]);
        sh(&["ip", "-n", &r, "link", "set", "ext0", "up"]);
        sh(&[
            "ip",
            "-n",
            &r,
            "route",
            "add",
            "203.0.113.0/24",
            "dev",
            "ext0",
            "src",
            "203.0.113.10",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        plug(&o, "ko-1", "kb-pub", "eth0");
        sh(&[
            "ip",
            "-n",
            &o,
            "addr",
            "add",
            "203.0.113.1/24",
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &o, "link", "set", "eth0", "up"]);

        // Web roots: "hello" everywhere, and a CGI printing the client address as the server saw it.
        let www = lab.dir.path().join("www");
        std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
        std::fs::write(www.join("index.html"), "hello\n").unwrap();
        let cgi = www.join("cgi-bin/ip");
        std::fs::write(
            &cgi,
            "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n",
        )
        .unwrap();
        sh(&["chmod", "+x", cgi.to_str().unwrap()]);
        let servers = [
            (lab.vm1.clone(), "80"),
            (lab.vm1.clone(), "81"),
            (lab.vm2.clone(), "80"),
            (lab.outside.clone(), "80"),
            (lab.router.clone(), "169.254.169.254:80"),
            (lab.router.clone(), "10.0.0.1:53"),
            (lab.router.clone(), "10.0.0.1:8080"),
        ];
        for (ns, addr) in servers {
            lab.serve(&ns, addr, &www);
        }
        lab
    }

    fn serve(&mut self, ns: &str, addr: &str, root: &Path) {
        let child = Command::new("ip")
            .args([
                "netns", "exec", ns, "busybox", "httpd", "-f", "-p", addr, "-h",
            ])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let needle = format!(":{port:04X} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tables = sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "cat",
                "/proc/net/tcp",
                "/proc/net/tcp6",
            ]);
            let listening = tables.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && format!("{} ", f[1]).ends_with(&needle) && f[3] == "0A"
            });
            if listening {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "httpd on {addr} in {ns} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// GET `path` from `addr:port` inside `ns`; the body when the server answered 200.
fn http(ns: &str, addr: &str, port: u16, path: &str) -> Option<String> {
    let mut child = Command::new("timeout")
        .args([
            "10", "ip", "netns", "exec", ns, "busybox", "nc", "-w", "2", addr,
        ])
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let _ = child.stdin.take().unwrap().write_all(request.as_bytes());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.starts_with("HTTP/1.") && text.lines().next().is_some_and(|l| l.contains(" 200 ")) {
        // The body follows the first empty line (CGI headers end in bare "\n").
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        lines.by_ref().find(|l| l.is_empty())?;
        Some(lines.collect::<Vec<_>>().join("\n").trim().to_string())
    } else {
        None
    }
}

fn allow(proto: &str, port: u16, sources: &[&str]) -> RulePolicy {
    RulePolicy {
        protocol: proto.into(),
        from_port: Some(port),
        to_port: Some(port),
        sources: sources.iter().map(|s| s.to_string()).collect(),
    }
}

fn public() -> PublicNetwork {
    PublicNetwork {
        cidr: "203.0.113.0/24".into(),
        gateway: "203.0.113.1".into(),
    }
}

/// Network t1 (10.0.0.0/24): VM1 in group sg-web with elastic IP 203.0.113.10, VM2 with no groups.
/// sg-web's egress reaches only the public network, so the gateway's services must pass on their own.
fn desired(ingress: Vec<RulePolicy>) -> (Vec<(NetworkSpec, Vec<PortSpec>)>, Vec<GroupPolicy>) {
    let net = NetworkSpec {
        name: "t1".into(),
        bridge: "kb-t1".into(),
        cidr: "10.0.0.0/24".into(),
        gateway: "10.0.0.1".into(),
        mtu: None,
        isolation: Isolation::Local,
        peers: vec![],
        ipv6_cidr: None,
    };
    let port = |tap: &str, mac: &str, ip: &str, groups: &[&str], eip: Option<&str>| PortSpec {
        tap: tap.into(),
        mac: mac.into(),
        ip: ip.into(),
        hostname: tap.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        public_ip: eip.map(|e| e.parse().unwrap()),
    };
    let ports = vec![
        port(
            VM1_TAP,
            VM1_MAC,
            "10.0.0.10",
            &["sg-web"],
            Some("203.0.113.10"),
        ),
        port(VM2_TAP, VM2_MAC, "10.0.0.11", &[], None),
    ];
    let egress = vec![RulePolicy {
        protocol: "all".into(),
        from_port: None,
        to_port: None,
        sources: vec!["203.0.113.0/24".into()],
    }];
    let groups = vec![GroupPolicy {
        id: "sg-web".into(),
        ingress,
        egress,
    }];
    (vec![(net, ports)], groups)
}

fn render(ingress: Vec<RulePolicy>) -> (String, String) {
    let (nets, groups) = desired(ingress);
    let (host, mut routers) = render_for_test(&nets, &groups, Some(&public())).unwrap();
    (host, routers.remove(0).1)
}

/// Moves VM2's address (and its default route, which goes with it).
fn set_vm2_ip(lab: &Lab, cidr: &str) {
    sh(&["ip", "-n", &lab.vm2, "addr", "flush", "dev", "eth0"]);
    sh(&["ip", "-n", &lab.vm2, "addr", "add", cidr, "dev", "eth0"]);
    sh(&[
        "ip", "-n", &lab.vm2, "route", "replace", "default", "via", "10.0.0.1",
    ]);
}

#[tokio::test]
async fn security_groups_nat_anti_spoofing_and_drift_with_real_traffic() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let nft = Nft::new().unwrap();
    let host = Some(lab.host.as_str());
    let router = Some(lab.router.as_str());
    let host_record = lab.dir.path().join("records/host.json");
    let router_record = lab.dir.path().join("records/router.json");
    let (vm1, vm2, out) = (lab.vm1.as_str(), lab.vm2.as_str(), lab.outside.as_str());

    // 1. VM1 accepts tcp/80 from its network only.
    let private_web = vec![allow("tcp", 80, &["10.0.0.0/24"])];
    let (host_text, router_text) = render(private_web.clone());
    let did = nft
        .ensure(host, HOST_TABLES, &host_text, &host_record)
        .await
        .unwrap();
    assert!(did.unwrap().starts_with("applied new nftables ruleset"));
    let did = nft
        .ensure(router, ROUTER_TABLES, &router_text, &router_record)
        .await
        .unwrap();
    assert!(did.unwrap().starts_with("applied new nftables ruleset"));
    assert_eq!(
        nft.ensure(host, HOST_TABLES, &host_text, &host_record)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        nft.ensure(router, ROUTER_TABLES, &router_text, &router_record)
            .await
            .unwrap(),
        None
    );

    assert_eq!(http(vm2, "10.0.0.10", 80, "/").as_deref(), Some("hello"));
    assert_eq!(
        http(vm2, "10.0.0.10", 81, "/"),
        None,
        "tcp/81 is not allowed"
    );
    assert_eq!(
        http(vm1, "10.0.0.11", 80, "/"),
        None,
        "VM2 has no groups: ingress denied"
    );
    assert_eq!(
        http(out, "203.0.113.10", 80, "/"),
        None,
        "only 10.0.0.0/24 may connect"
    );
    let seen = http(vm1, "203.0.113.1", 80, "/cgi-bin/ip").expect("VM1 reaches the outside");
    assert!(
        seen.trim_matches(['[', ']']).rsplit(':').next() == Some("203.0.113.10"),
        "VM1 leaves as its elastic IP, seen as {seen}"
    );
    assert_eq!(
        http(vm2, "203.0.113.1", 80, "/"),
        None,
        "VM2 has no elastic IP"
    );
    // sg-web's egress reaches only 203.0.113.0/24, yet DNS and metadata on the gateway always work.
    assert_eq!(http(vm1, "10.0.0.1", 53, "/").as_deref(), Some("hello"));
    assert_eq!(
        http(vm1, "169.254.169.254", 80, "/").as_deref(),
        Some("hello")
    );
    assert!(
        http(vm2, "10.0.0.1", 8080, "/").is_some(),
        "VM2 has no groups: all egress allowed"
    );
    assert_eq!(
        http(vm1, "10.0.0.1", 8080, "/"),
        None,
        "other gateway ports follow egress rules"
    );

    // 2. Open tcp/80 to the world: the outside gets in, through the elastic IP only.
    let public_web = vec![
        allow("tcp", 80, &["10.0.0.0/24"]),
        allow("tcp", 80, &["0.0.0.0/0"]),
    ];
    let (host_text, router_text2) = render(public_web.clone());
    assert_eq!(
        router_text, router_text2,
        "the router does not depend on groups"
    );
    let did = nft
        .ensure(host, HOST_TABLES, &host_text, &host_record)
        .await
        .unwrap();
    assert!(did.unwrap().contains("replacing a different one"));
    assert_eq!(
        nft.ensure(router, ROUTER_TABLES, &router_text, &router_record)
            .await
            .unwrap(),
        None
    );
    assert_eq!(http(out, "203.0.113.10", 80, "/").as_deref(), Some("hello"));
    assert_eq!(http(out, "203.0.113.10", 81, "/"), None);
    sh(&[
        "ip",
        "-n",
        out,
        "route",
        "add",
        "10.0.0.0/24",
        "via",
        "203.0.113.10",
    ]);
    assert_eq!(
        http(out, "10.0.0.10", 80, "/"),
        None,
        "no way in without DNAT"
    );
    sh(&["ip", "-n", out, "route", "del", "10.0.0.0/24"]);

    // 3. No ingress rules: nothing gets to VM1.
    let (host_text, _) = render(vec![]);
    assert!(nft
        .ensure(host, HOST_TABLES, &host_text, &host_record)
        .await
        .unwrap()
        .is_some());
    assert_eq!(http(vm2, "10.0.0.10", 80, "/"), None, "rule removed");
    assert_eq!(http(out, "203.0.113.10", 80, "/"), None, "rule removed");

    // 4. Anti-spoofing: VM2 with another IP or MAC no longer reaches VM1.
    let (host_text, _) = render(private_web.clone());
    assert!(nft
        .ensure(host, HOST_TABLES, &host_text, &host_record)
        .await
        .unwrap()
        .is_some());
    assert_eq!(http(vm2, "10.0.0.10", 80, "/").as_deref(), Some("hello"));
    set_vm2_ip(&lab, "10.0.0.12/24");
    assert_eq!(http(vm2, "10.0.0.10", 80, "/"), None, "spoofed IP");
    set_vm2_ip(&lab, "10.0.0.11/24");
    assert_eq!(http(vm2, "10.0.0.10", 80, "/").as_deref(), Some("hello"));
    sh(&[
        "ip",
        "-n",
        vm2,
        "link",
        "set",
        "eth0",
        "address",
        "02:00:00:00:00:99",
    ]);
    assert_eq!(http(vm2, "10.0.0.10", 80, "/"), None, "spoofed MAC");
    sh(&["ip", "-n", vm2, "link", "set", "eth0", "address", VM2_MAC]);
    assert_eq!(http(vm2, "10.0.0.10", 80, "/").as_deref(), Some("hello"));

    // 5. Drift: a rule deleted by hand comes back.
    // Security groups are set elements keyed by profile ([] = 1, [sg-web] = 2).
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.host,
        "nft",
        "delete",
        "element",
        "inet",
        "kumo",
        "in4",
        "{ 0x00000002 . 10.0.0.0/24 . tcp . 80 }",
    ]);
    assert_eq!(
        http(vm2, "10.0.0.10", 80, "/"),
        None,
        "allow rule deleted by hand"
    );
    let did = nft
        .ensure(host, HOST_TABLES, &host_text, &host_record)
        .await
        .unwrap()
        .unwrap();
    assert!(
        did.starts_with("repaired nftables drift in inet kumo:"),
        "{did}"
    );
    assert!(did.contains("set in4: 1 line removed"), "{did}");
    assert_eq!(http(vm2, "10.0.0.10", 80, "/").as_deref(), Some("hello"));
    assert_eq!(
        nft.ensure(host, HOST_TABLES, &host_text, &host_record)
            .await
            .unwrap(),
        None
    );

    // ...and so does an element added by hand (it let VM2 use 10.0.0.12).
    let element = format!("{{ \"{VM2_TAP}\" . 10.0.0.12 }}");
    sh(&[
        "ip", "netns", "exec", &lab.host, "nft", "add", "element", "bridge", "kumo", "tap_ip",
        &element,
    ]);
    set_vm2_ip(&lab, "10.0.0.12/24");
    assert_eq!(
        http(vm2, "10.0.0.10", 80, "/").as_deref(),
        Some("hello"),
        "hand-made hole"
    );
    let did = nft
        .ensure(host, HOST_TABLES, &host_text, &host_record)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        did,
        "repaired nftables drift in bridge kumo: bridge kumo: set tap_ip: 1 line added"
    );
    assert_eq!(http(vm2, "10.0.0.10", 80, "/"), None, "hole closed");
    set_vm2_ip(&lab, "10.0.0.11/24");

    // ...and a deleted table.
    // (With a route back, VM2 reaches the outside un-NATed while the router has no firewall.)
    sh(&[
        "ip",
        "-n",
        out,
        "route",
        "add",
        "10.0.0.0/24",
        "via",
        "203.0.113.10",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.router,
        "nft",
        "delete",
        "table",
        "inet",
        "kumo",
    ]);
    assert!(
        http(vm2, "203.0.113.1", 80, "/").is_some(),
        "router firewall gone"
    );
    let did = nft
        .ensure(router, ROUTER_TABLES, &router_text, &router_record)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        did,
        "repaired nftables drift in inet kumo: inet kumo: table missing"
    );
    assert_eq!(
        http(vm2, "203.0.113.1", 80, "/"),
        None,
        "router firewall back"
    );
    sh(&["ip", "-n", out, "route", "del", "10.0.0.0/24"]);
    assert_eq!(
        nft.ensure(router, ROUTER_TABLES, &router_text, &router_record)
            .await
            .unwrap(),
        None
    );

    // 6. Same text twice: byte-identical listing.
    nft.apply(host, &host_text).await.unwrap();
    let first = nft.listing(host, HOST_TABLES).await.unwrap();
    nft.apply(host, &host_text).await.unwrap();
    let second = nft.listing(host, HOST_TABLES).await.unwrap();
    assert_eq!(first, second);
    assert!(first.contains("table bridge kumo {") && first.contains("table inet kumo {"));
    assert_eq!(
        nft.ensure(host, HOST_TABLES, &host_text, &host_record)
            .await
            .unwrap(),
        None
    );

    // 7. Bad input changes nothing: rejected before rendering, or by nft as a whole transaction.
    let (nets, mut groups) = desired(private_web);
    groups[0].ingress.push(allow("sctp", 1, &["0.0.0.0/0"]));
    let err = render_for_test(&nets, &groups, Some(&public())).unwrap_err();
    assert!(err.to_string().contains("sctp"), "{err}");
    let broken = format!("{host_text}add rule inet kumo vm_filter bogus\n");
    assert!(nft.apply(host, &broken).await.is_err());
    assert_eq!(nft.listing(host, HOST_TABLES).await.unwrap(), first);
    assert_eq!(http(vm2, "10.0.0.10", 80, "/").as_deref(), Some("hello"));

    // 8. Delete: tables gone, deleting again is fine.
    nft.delete(host, HOST_TABLES).await.unwrap();
    assert_eq!(nft.listing(host, HOST_TABLES).await.unwrap(), "");
    nft.delete(host, HOST_TABLES).await.unwrap();
}
