//! Real tests (root) on one host: bridges, taps, router namespaces with the gateway and dnsmasq, DHCP and
//! DNS seen from simulated guests, all inside namespaces created here. No traffic leaves them; every
//! namespace and process is cleaned up by a Drop guard, even when a test fails.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::slice::from_ref;
use std::time::{Duration, Instant};

use common::*;
use kumo_network::{HostNetwork, HostOptions, PortSpec, METADATA_IP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn opts(router_prefix: &str) -> HostOptions {
    HostOptions {
        router_prefix: router_prefix.to_string(),
        ..Default::default()
    }
}

fn has(repairs: &[String], want: &str) -> bool {
    repairs.iter().any(|r| r == want)
}

/// Answers one HTTP request on `listener` with `body` (a stand-in for the metadata service).
async fn serve_once(listener: tokio::net::TcpListener, body: &'static str) {
    if let Ok((mut s, _)) = listener.accept().await {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes()).await;
    }
}

#[tokio::test]
async fn full_lifecycle_in_own_namespace() {
    if !is_root() {
        return;
    }
    let mut guard = Guard::new();
    let ns = guard.ns("kn-life-");
    let guest = guard.ns("kn-guest-");
    let prefix = guard.router_prefix();
    let state = guard.state("state");

    let net = HostNetwork::new(Some(ns.clone()), state.clone(), opts(&prefix))
        .await
        .unwrap();
    assert_eq!(net.netns(), Some(ns.as_str()));
    assert!(ns_exists(&ns));

    let spec = network("default", "kb-default", 77);
    let router = net.router_netns(&spec);
    assert_eq!(router, format!("{prefix}default"));
    let a = port("i-00000000000000a1", 77, 10);
    let b = port("i-00000000000000b2", 77, 11);
    let repairs = net
        .apply(&desired(&[(&spec, &[a.clone(), b.clone()])]))
        .await
        .unwrap();
    for want in [
        format!("created router namespace {router}"),
        "created bridge kb-default for network default".to_string(),
        format!("created tap {} on kb-default", a.tap),
        format!("created kr-default to router {router}"),
        "started dnsmasq for default".to_string(),
    ] {
        assert!(has(&repairs, &want), "{want:?} not in {repairs:?}");
    }

    // The bridge is pure L2; the gateway lives in the router namespace.
    let all = links(&ns);
    let br = link(&all, "kb-default").expect("bridge exists");
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert!(is_up(br));
    assert!(ipv4(br).is_empty(), "bridge has addresses {:?}", ipv4(br));
    assert!(
        !all.iter()
            .any(|l| ipv4(l).contains(&"10.77.0.1/24".to_string())),
        "the gateway address is in the host namespace"
    );
    for p in [&a, &b] {
        let t = link(&all, &p.tap).expect("tap exists");
        assert_eq!(t["linkinfo"]["info_kind"], "tun");
        assert_eq!(t["master"], "kb-default");
        assert!(is_up(t));
    }
    let kr = link(&all, "kr-default").expect("router veth exists");
    assert_eq!(kr["linkinfo"]["info_kind"], "veth");
    assert_eq!(kr["master"], "kb-default");
    assert!(is_up(kr));
    let inside = links(&router);
    let int0 = link(&inside, "int0").expect("int0 in the router namespace");
    assert_eq!(ipv4(int0), vec!["10.77.0.1/24".to_string()]);
    assert_eq!(int0["address"], gateway_mac("default").as_str());
    assert!(is_up(int0));
    let lo = link(&inside, "lo").unwrap();
    assert!(
        ipv4(lo).contains(&format!("{METADATA_IP}/32")),
        "{:?}",
        ipv4(lo)
    );
    let pid = dnsmasq_pid(&net, "default");
    assert!(alive(pid));
    assert!(
        runs_in(pid, &router),
        "dnsmasq runs in the router namespace"
    );

    // Idempotent: nothing to do the second time.
    let again = net
        .apply(&desired(&[(&spec, &[a.clone(), b.clone()])]))
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(dnsmasq_pid(&net, "default"), pid);

    // A guest with port a's MAC gets exactly port a's address, the router and DNS; the gateway it sees
    // is the router namespace's int0.
    plug_guest(Some(&ns), &guest, "kb-default", &a.mac, "vh0", None);
    let lease = dhcp(&guest, guard.dir());
    assert_eq!(
        lease,
        Lease {
            ip: a.ip.clone(),
            mask: "24".into(),
            router: "10.77.0.1".into(),
            dns: "10.77.0.1".into(),
            mtu: "none".into(),
        }
    );
    assert_eq!(arping(&guest, "10.77.0.1"), vec![gateway_mac("default")]);
    assert!(ping(&guest, "10.77.0.1"));
    assert_eq!(
        resolve(&guest, "vm-11", "10.77.0.1").as_deref(),
        Some("10.77.0.11")
    );

    // The metadata address answers guests from the router namespace.
    let md = kumo_network::bind_tcp_in_netns(&router, SocketAddr::new(METADATA_IP.into(), 80))
        .await
        .unwrap();
    let server = tokio::spawn(serve_once(md, "instance-id: a1"));
    sh(&[
        "ip",
        "-n",
        &guest,
        "route",
        "add",
        "169.254.169.254",
        "via",
        "10.77.0.1",
    ]);
    let guest2 = guest.clone();
    let body = tokio::task::spawn_blocking(move || {
        http_get(&guest2, "http://169.254.169.254/latest/meta-data/")
    })
    .await
    .unwrap();
    assert_eq!(body.as_deref(), Some("instance-id: a1"));
    server.abort();

    // Remove port b: its tap and its entries go, dnsmasq is reloaded (not restarted).
    let repairs = net.apply(&desired(&[(&spec, from_ref(&a))])).await.unwrap();
    assert!(
        has(&repairs, &format!("removed tap {}", b.tap)),
        "{repairs:?}"
    );
    assert!(has(
        &repairs,
        "reloaded dnsmasq hosts for default (1 entries)"
    ));
    assert_eq!(non_fw(&repairs).len(), 2, "{repairs:?}");
    assert!(link(&links(&ns), &b.tap).is_none());
    assert!(link(&links(&ns), &a.tap).is_some());
    let hosts = std::fs::read_to_string(state.join("dnsmasq").join("default.dhcp-hosts")).unwrap();
    assert!(hosts.contains(&a.mac) && !hosts.contains(&b.mac), "{hosts}");
    assert_eq!(dnsmasq_pid(&net, "default"), pid);
    assert!(
        retry(Duration::from_secs(5), || resolve(
            &guest,
            "vm-11",
            "10.77.0.1"
        )
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
    assert!(retry(Duration::from_secs(5), || (!alive(pid)).then_some(())).is_some());
    let repairs = net.apply(&desired(&[(&spec, from_ref(&a))])).await.unwrap();
    assert_eq!(
        repairs,
        vec!["restarted dnsmasq for default (was not running)".to_string()]
    );
    let pid2 = dnsmasq_pid(&net, "default");
    assert_ne!(pid2, pid);
    assert!(alive(pid2) && runs_in(pid2, &router));

    // A bridge deleted by hand is re-created with its tap and router veth re-attached. dnsmasq listens on
    // int0, which the bridge's loss does not touch: no restart.
    sh(&["ip", "-n", &ns, "link", "del", "kb-default"]);
    let repairs = net.apply(&desired(&[(&spec, from_ref(&a))])).await.unwrap();
    assert_eq!(
        repairs,
        vec!["re-created bridge kb-default for network default".to_string()]
    );
    let all = links(&ns);
    assert_eq!(link(&all, &a.tap).unwrap()["master"], "kb-default");
    assert_eq!(link(&all, "kr-default").unwrap()["master"], "kb-default");
    assert_eq!(dnsmasq_pid(&net, "default"), pid2);
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
    assert_eq!(dhcp(&guest, guard.dir()).ip, a.ip);
    assert!(net
        .apply(&desired(&[(&spec, from_ref(&a))]))
        .await
        .unwrap()
        .is_empty());

    // connect_tcp from the router namespace to a server that exists only in the guest (port-forward).
    guard.serve_http(&guest, "10.77.0.10:8080", "hello from the guest\n");
    assert!(net
        .connect_tcp("kn-no-such-namespace", a.ip.parse().unwrap(), 8080)
        .await
        .is_err());
    let mut stream = None;
    for _ in 0..50 {
        match net.connect_tcp(&router, a.ip.parse().unwrap(), 8080).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut stream = stream.expect("connect_tcp from the router namespace");
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
    assert!(body.contains("hello from the guest"), "{body}");

    // Port a's address given to another MAC: dnsmasq would refuse it (lease held in memory), so restart.
    let mut c = port("i-00000000000000c3", 77, 10);
    c.hostname = "vm-c".into();
    let repairs = net.apply(&desired(&[(&spec, from_ref(&c))])).await.unwrap();
    assert!(
        has(
            &repairs,
            "restarted dnsmasq for default (an address moved to another MAC)"
        ),
        "{repairs:?}"
    );
    let pid3 = dnsmasq_pid(&net, "default");
    assert_ne!(pid3, pid2);

    // Removing the network stops its dnsmasq and deletes router namespace, bridge and taps.
    if let Some(repairs) = apply_removing(&net, &desired(&[])).await {
        assert!(has(
            &repairs,
            "stopped dnsmasq for default (network removed)"
        ));
        assert!(has(&repairs, &format!("removed router namespace {router}")));
    }
    assert!(!alive(pid3));
    assert!(!ns_exists(&router));
    let all = links(&ns);
    assert!(link(&all, "kb-default").is_none() && link(&all, &c.tap).is_none());
    assert!(link(&all, "kr-default").is_none());
    assert!(
        link(&all, "vh0").is_some(),
        "links kumo did not create are left alone"
    );

    // Teardown: no namespace (host or router), no dnsmasq, no files.
    net.apply(&desired(&[(&spec, &[a.clone(), b.clone()])]))
        .await
        .unwrap();
    assert!(ns_exists(&router));
    teardown(&net).await;
    assert!(!ns_exists(&ns));
    assert!(!ns_exists(&router));
    assert!(pids_mentioning(&state).is_empty());
    assert!(
        !state.exists(),
        "state dir left: {:?}",
        std::fs::read_dir(&state).map(|d| d.count())
    );
}

/// `netns: None` with the caller already inside a namespace (as an agent of a test host is): two networks,
/// two dnsmasq side by side in two router namespaces, DHCP on the second; teardown leaves the (foreign)
/// namespace in place and removes the router namespaces.
#[test]
fn current_namespace_two_networks() {
    if !is_root() {
        return;
    }
    let mut guard = Guard::new();
    let ns = guard.ns("kn-cur-");
    let guest = guard.ns("kn-guest-");
    let prefix = guard.router_prefix();
    sh(&["ip", "netns", "add", &ns]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    let state = guard.state("state");
    let tmp = guard.dir().to_path_buf();
    let ns_path = PathBuf::from("/run/netns").join(&ns);
    let ns2 = ns.clone();
    let handle = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns_path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let net = HostNetwork::new(None, state.clone(), opts(&prefix))
                .await
                .unwrap();
            assert_eq!(net.netns(), None);
            let one = network("one", "kb-one", 80);
            let mut two = network("two", "kb-two", 81);
            two.mtu = Some(1450);
            let p1 = port("i-0000000000000c01", 80, 20);
            let p2 = port("i-0000000000000c02", 81, 30);
            let want = desired(&[(&one, from_ref(&p1)), (&two, from_ref(&p2))]);
            net.apply(&want).await.unwrap();
            let (r1, r2) = (net.router_netns(&one), net.router_netns(&two));
            assert_ne!(r1, r2);
            let (d1, d2) = (dnsmasq_pid(&net, "one"), dnsmasq_pid(&net, "two"));
            assert!(alive(d1) && alive(d2));
            assert!(runs_in(d1, &r1) && runs_in(d2, &r2));
            // Links are in the namespace this thread is in.
            let all = links(&ns2);
            assert!(link(&all, "kb-one").is_some() && link(&all, "kb-two").is_some());
            assert_eq!(link(&all, "kr-two").unwrap()["master"], "kb-two");
            plug_guest(None, &guest, "kb-two", &p2.mac, "vh0", None);
            let all = links(&ns2);
            assert_eq!(link(&all, "kb-two").unwrap()["mtu"], 1450);
            assert_eq!(link(&all, &p2.tap).unwrap()["mtu"], 1450);
            assert_eq!(link(&all, "kr-two").unwrap()["mtu"], 1450);
            assert_eq!(link(&all, "kb-one").unwrap()["mtu"], 1500);
            let lease = dhcp(&guest, &tmp);
            assert_eq!(
                (lease.ip.as_str(), lease.router.as_str(), lease.mtu.as_str()),
                ("10.81.0.30", "10.81.0.1", "1450")
            );
            assert!(net.apply(&want).await.unwrap().is_empty());
            teardown(&net).await;
            assert!(pids_mentioning(&state).is_empty());
            assert!(!ns_exists(&r1) && !ns_exists(&r2));
            let all = links(&ns2);
            assert!(link(&all, "kb-one").is_none() && link(&all, "kb-two").is_none());
            assert!(link(&all, "vh0").is_some());
        });
    });
    let res = handle.join();
    assert!(ns_exists(&ns), "a namespace kumo did not create is kept");
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
    let mut guard = Guard::new();
    let ns = guard.ns("kn-fifty-");
    let prefix = guard.router_prefix();
    let net = HostNetwork::new(Some(ns.clone()), guard.state("state"), opts(&prefix))
        .await
        .unwrap();
    let spec = network("big", "kb-big", 90);
    let mut ports: Vec<PortSpec> = (0..50)
        .map(|i| port(&format!("i-{:017x}", 0xf000 + i), 90, 10 + i as u8))
        .collect();
    let t = Instant::now();
    let r = net.apply(&desired(&[(&spec, &ports)])).await.unwrap();
    let cold = t.elapsed();
    // router namespace, its gateway and metadata address, bridge, 50 taps, router veth, dnsmasq
    assert_eq!(non_fw(&r).len(), 56, "{r:?}");
    let t = Instant::now();
    let r = net.apply(&desired(&[(&spec, &ports)])).await.unwrap();
    let warm = t.elapsed();
    assert!(r.is_empty(), "{r:?}");
    ports.pop();
    ports.push(port("i-0000000000000ffff", 90, 200));
    let t = Instant::now();
    let r = net.apply(&desired(&[(&spec, &ports)])).await.unwrap();
    let change = t.elapsed();
    assert_eq!(non_fw(&r).len(), 3, "{r:?}"); // removed tap, created tap, reloaded hosts
    let all = links(&ns);
    // 50 taps and the router veth.
    assert_eq!(all.iter().filter(|l| l["master"] == "kb-big").count(), 51);
    eprintln!("apply 50 ports: cold {cold:?}, warm (no-op) {warm:?}, one port swapped {change:?}");
    teardown(&net).await;
    assert!(!ns_exists(&ns));
    assert!(!ns_exists(&net.router_netns(&spec)));
}

/// Someone deletes the host namespace by hand (`ip netns del`): apply re-creates it, the bridge, tap and
/// router veth in it, the gateway on the new int0, and restarts dnsmasq on it.
#[tokio::test]
async fn namespace_deleted_by_hand_is_rebuilt() {
    if !is_root() {
        return;
    }
    let mut guard = Guard::new();
    let ns = guard.ns("kn-gone-");
    let guest = guard.ns("kn-guest-");
    let prefix = guard.router_prefix();
    let state = guard.state("state");
    let net = HostNetwork::new(Some(ns.clone()), state.clone(), opts(&prefix))
        .await
        .unwrap();
    let spec = network("default", "kb-default", 91);
    let router = net.router_netns(&spec);
    let p = port("i-0000000000000d01", 91, 10);
    let want = desired(&[(&spec, from_ref(&p))]);
    net.apply(&want).await.unwrap();
    let old_pid = dnsmasq_pid(&net, "default");
    sh(&["ip", "netns", "del", &ns]);
    // WORKAROUND (reported): the kernel destroys the old namespace's veths asynchronously; until it has,
    // int0 still exists in the router namespace and re-creating the veth fails with "File exists".
    wait_gone(&router, "int0");
    let repairs = net.apply(&want).await.unwrap();
    assert_eq!(
        non_fw(&repairs),
        vec![
            format!("re-created namespace {ns}"),
            "re-created bridge kb-default for network default".to_string(),
            format!("re-created tap {} on kb-default", p.tap),
            format!("re-created kr-default to router {router}"),
            format!("{router}: set gateway 10.91.0.1/24"),
            "restarted dnsmasq for default (router re-created)".to_string(),
        ]
    );
    assert!(!alive(old_pid));
    let pid = dnsmasq_pid(&net, "default");
    assert!(runs_in(pid, &router));
    assert!(link(&links(&ns), &p.tap).is_some());
    assert!(net.apply(&want).await.unwrap().is_empty());
    // The rebuilt path serves DHCP again.
    plug_guest(Some(&ns), &guest, "kb-default", &p.mac, "vh0", None);
    assert_eq!(dhcp(&guest, guard.dir()).ip, p.ip);
    teardown(&net).await;
    assert!(!ns_exists(&ns) && !ns_exists(&router));
    assert!(pids_mentioning(&state).is_empty());
}

/// Two projects' networks with the same CIDR on one host: each has its own router namespace with the same
/// gateway address, its own dnsmasq, and no path to the other's guests even at the same addresses.
#[tokio::test]
async fn same_cidr_networks_are_isolated() {
    if !is_root() {
        return;
    }
    let mut guard = Guard::new();
    let ns = guard.ns("kn-same-");
    let prefix = guard.router_prefix();
    let state = guard.state("state");
    let net = HostNetwork::new(Some(ns.clone()), state.clone(), opts(&prefix))
        .await
        .unwrap();
    let mut spec_a = network("proj-a", "kb-sa", 90);
    spec_a.cidr = "10.90.0.0/24".into();
    let mut spec_b = network("proj-b", "kb-sb", 90);
    spec_b.cidr = "10.90.0.0/24".into();
    let named = |inst: &str, host: u8, name: &str| {
        let mut p = port(inst, 90, host);
        p.hostname = name.into();
        p
    };
    let a10 = named("i-000000000000a010", 10, "a-10");
    let a11 = named("i-000000000000a011", 11, "a-11");
    let b10 = named("i-000000000000b010", 10, "b-10");
    let b11 = named("i-000000000000b011", 11, "b-11");
    let want = desired(&[
        (&spec_a, &[a10.clone(), a11.clone()]),
        (&spec_b, &[b10.clone(), b11.clone()]),
    ]);
    net.apply(&want).await.unwrap();
    assert!(net.apply(&want).await.unwrap().is_empty());
    let (ra, rb) = (net.router_netns(&spec_a), net.router_netns(&spec_b));
    assert_ne!(ra, rb);
    for (r, name) in [(&ra, "proj-a"), (&rb, "proj-b")] {
        let inside = links(r);
        let int0 = link(&inside, "int0").unwrap();
        assert_eq!(ipv4(int0), vec!["10.90.0.1/24".to_string()]);
        assert_eq!(int0["address"], gateway_mac(name).as_str());
    }
    let (da, db) = (dnsmasq_pid(&net, "proj-a"), dnsmasq_pid(&net, "proj-b"));
    assert!(runs_in(da, &ra) && runs_in(db, &rb));

    let mut guests = Vec::new();
    for (p, bridge, host_if) in [
        (&a10, "kb-sa", "vh-a10"),
        (&a11, "kb-sa", "vh-a11"),
        (&b10, "kb-sb", "vh-b10"),
        (&b11, "kb-sb", "vh-b11"),
    ] {
        let g = guard.ns("kn-g-");
        plug_guest(Some(&ns), &g, bridge, &p.mac, host_if, None);
        let lease = dhcp(&g, guard.dir());
        assert_eq!(lease.ip, p.ip, "{host_if}");
        assert_eq!(
            (lease.router.as_str(), lease.dns.as_str()),
            ("10.90.0.1", "10.90.0.1")
        );
        guests.push(g);
    }
    let (ga10, ga11, gb10, gb11) = (&guests[0], &guests[1], &guests[2], &guests[3]);

    // Each network's DNS knows only its own guests.
    assert_eq!(
        resolve(ga10, "a-11", "10.90.0.1").as_deref(),
        Some("10.90.0.11")
    );
    assert_eq!(resolve(ga10, "b-11", "10.90.0.1"), None);
    assert_eq!(
        resolve(gb10, "b-11", "10.90.0.1").as_deref(),
        Some("10.90.0.11")
    );
    assert_eq!(resolve(gb10, "a-11", "10.90.0.1"), None);

    // The same addresses answer with each network's own MACs.
    assert_eq!(arping(ga10, "10.90.0.1"), vec![gateway_mac("proj-a")]);
    assert_eq!(arping(gb10, "10.90.0.1"), vec![gateway_mac("proj-b")]);
    assert_eq!(arping(ga10, "10.90.0.11"), vec![a11.mac.clone()]);
    assert_eq!(arping(gb10, "10.90.0.11"), vec![b11.mac.clone()]);
    assert!(ping(ga10, "10.90.0.11") && ping(gb10, "10.90.0.11"));
    guard.serve_http(ga11, "10.90.0.11:8080", "network A\n");
    guard.serve_http(gb11, "10.90.0.11:8080", "network B\n");
    let url = "http://10.90.0.11:8080/index.html";
    assert_eq!(
        retry(Duration::from_secs(5), || http_get(ga10, url)).as_deref(),
        Some("network A\n")
    );
    assert_eq!(
        retry(Duration::from_secs(5), || http_get(gb10, url)).as_deref(),
        Some("network B\n")
    );

    // With A's .11 gone, A's .10 finds nothing at .11, although B's .11 is up and serving.
    sh(&["ip", "-n", ga11, "link", "set", "vg0", "down"]);
    sh(&["ip", "-n", ga10, "neigh", "flush", "dev", "vg0"]);
    assert!(arping(ga10, "10.90.0.11").is_empty());
    assert!(!ping(ga10, "10.90.0.11"));
    assert_eq!(http_get(ga10, url), None);
    assert_eq!(http_get(gb10, url).as_deref(), Some("network B\n"));

    teardown(&net).await;
    assert!(!ns_exists(&ns) && !ns_exists(&ra) && !ns_exists(&rb));
    assert!(pids_mentioning(&state).is_empty());
    assert!(!Path::new(&state).exists());
}
