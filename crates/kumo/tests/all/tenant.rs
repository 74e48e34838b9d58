//! Tenant networks on a 3-host cluster of real hosts (namespaces, agents, QEMU under TCG): VMs of
//! one network on different hosts talk over VXLAN; another project with the same CIDR is cut off;
//! the metadata service answers each guest (v1 and v2) with its own data; an elastic IP lets the
//! outside namespace reach a guest's HTTP only while a security group allows port 80, and the
//! guest's outbound traffic leaves with that address; a guest that changes its IP or MAC is cut
//! off; drift made by hand is repaired and reported; a restarted agent renders the same ruleset.

use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_testcluster::{Cluster, ClusterSpec, HostSpec, OUTSIDE_IP};
use kumo_types::api::{CreateInstance, Instance};
use kumo_types::InstanceState;
use serde_json::{json, Value};

use crate::cluster::{wait_console, wait_state};
use crate::common::{demo_image_with, KUMO};
use crate::e2e::{Ws, BOOTED};

/// Only there to stop a hang (several TCG guests booting at once on 2 cores).
const BOOT: Duration = Duration::from_secs(180);
/// Policy changes reach the hosts within a few network intervals (2 s in test clusters).
const CONVERGE: Duration = Duration::from_secs(45);

/// Runs a shell line on a guest's serial console and returns what it printed up to the end marker.
/// Markers are computed by the guest's shell (`$((..))`), so the echoed command never matches them.
async fn guest_sh(c: &Client, id: &str, line: &str) -> String {
    let mut ws = Ws::connect(c, &format!("/api/v1/instances/{id}/serial"))
        .await
        .expect("serial");
    ws.send_binary(b"\n").await;
    ws.send_binary(format!("{line}; echo END$((6*7))END\n").as_bytes())
        .await;
    let out = ws.read_until("END42END", Duration::from_secs(60)).await;
    ws.close().await;
    assert!(
        out.contains("END42END"),
        "{id}: no end marker after {line:?}: {out}"
    );
    out
}

/// Whether `from` can fetch `http://ip/` (the test guest's page names its instance id).
async fn guest_fetch(c: &Client, from: &str, ip: &str) -> String {
    guest_sh(
        c,
        from,
        &format!(
            "echo \"GOT$((1+1))=$(timeout 6 wget -q -O - http://{ip}/ 2>/dev/null | sed -n 2p)\""
        ),
    )
    .await
    .lines()
    .find_map(|l| l.trim().strip_prefix("GOT2=").map(str::to_string))
    .unwrap_or_default()
}

fn ipof(i: &Instance) -> String {
    i.private_ip.clone().unwrap_or_default()
}

fn sh_out(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The outside namespace fetches a URL; `None` when it cannot.
fn outside_fetch(cluster: &Cluster, url: &str) -> Option<String> {
    let o = cluster.exec_outside(&["timeout", "5", "busybox", "wget", "-q", "-O", "-", url]);
    o.status.success().then(|| sh_out(o))
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn create(name: &str, extra: Value) -> CreateInstance {
    let mut v = json!({"name": name, "image": "demo", "instance_type": "t1.nano"});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    serde_json::from_value(v).expect("CreateInstance")
}

/// `nft list ruleset` in a namespace, via the cluster host `i` or a named namespace.
fn ruleset_in(ns: &str) -> String {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "ruleset"])
        .output()
        .expect("nft");
    sh_out(o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_networks_across_real_hosts() {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("kumo-tenant-")
        .tempdir()
        .expect("tempdir")
        .keep();
    let host = |name: &str| HostSpec::qemu(name).capacity(2, 2048);
    let mut cluster = Cluster::start(ClusterSpec {
        kumo_bin: KUMO.into(),
        dir: dir.clone(),
        hosts: vec![host("h1"), host("h2"), host("h3")],
        heartbeat_timeout_secs: 10,
        keep_dir: false,
    })
    .await
    .expect("start a 3-host cluster");
    eprintln!(
        "tenant: cluster up in {:?}, logs in {}",
        t0.elapsed(),
        dir.display()
    );
    let c = cluster.client();
    demo_image_with(&c).await;

    // The operator's public pool lives on the clusters' public network.
    let _: Value = c
        .request(
            "PUT",
            "/api/v1/address-pool",
            Some(&json!({"cidr": "203.0.113.0/24", "gateway": OUTSIDE_IP,
                         "first": "203.0.113.10", "last": "203.0.113.20"})),
            None,
        )
        .await
        .expect("address pool");

    // Project A (admin): network blue, two VMs on different hosts (a spread group of 1 per host).
    let blue: Value = c
        .post(
            "/api/v1/networks",
            &json!({"name": "blue", "cidr": "10.60.0.0/24"}),
        )
        .await
        .expect("network blue");
    let blue_id = blue["id"].as_str().expect("id").to_string();
    let _: Value = c
        .post(
            "/api/v1/security-groups",
            &json!({"name": "web", "description": "http"}),
        )
        .await
        .expect("group web");
    c.create_placement_group(&kumo_types::api::CreatePlacementGroup {
        name: "apart".into(),
        strategy: None,
        max_per_host: Some(1),
        spread_storage: false,
    })
    .await
    .expect("spread group");
    let mut a_ids = vec![];
    for n in 1..=2 {
        let req = create(
            &format!("a{n}"),
            json!({"network": "blue", "placement_group": "apart",
                   "security_groups": ["default", "web"], "user_data": format!("hello-a{n}")}),
        );
        a_ids.push(c.create_instance(&req, None).await.expect("create").id);
    }

    // Project B: its own network with the SAME cidr.
    let store = kumo_store::Store::open_sqlite(&dir.join("server").join("kumo.db"))
        .await
        .expect("open store");
    let project = store.create_project("tenant-b").await.expect("project");
    let user = store
        .create_user("bea", &project, "member")
        .await
        .expect("user");
    let key = store.create_access_key(&user).await.expect("key");
    store.close().await;
    let mut cfg = cluster.client_config();
    cfg.access_key_id = key.id.clone();
    cfg.secret_access_key = key.secret.clone();
    let b = Client::new(cfg).expect("client b");
    let _: Value = b
        .post(
            "/api/v1/networks",
            &json!({"name": "blue", "cidr": "10.60.0.0/24"}),
        )
        .await
        .expect("project B's network with the same cidr");
    let b1 = b
        .create_instance(&create("b1", json!({"network": "blue"})), None)
        .await
        .expect("create b1")
        .id;

    let mut vms: Vec<Instance> = vec![];
    for id in a_ids.iter().chain([&b1]) {
        let cl = if *id == b1 { &b } else { &c };
        vms.push(wait_state(cl, id, InstanceState::Running, BOOT).await);
        wait_console(cl, id, BOOTED, BOOT).await;
    }
    let (a1, a2, bvm) = (&vms[0], &vms[1], &vms[2]);
    assert_ne!(
        a1.host_id, a2.host_id,
        "the spread group put a1 and a2 apart"
    );
    eprintln!("tenant: 3 guests booted at {:?}", t0.elapsed());

    // Metadata: each guest read its own instance id, by IMDSv1 and by IMDSv2 with a token.
    for vm in [a1, a2] {
        let out = wait_console(&c, &vm.id, "KUMO-GUEST-METADATA", BOOT).await;
        let line = out
            .lines()
            .find(|l| l.contains("KUMO-GUEST-METADATA"))
            .unwrap_or_default();
        assert!(
            line.contains(&format!("instance-id={} v2={}", vm.id, vm.id)),
            "{}: {line}",
            vm.id
        );
    }
    let ud = guest_sh(&c, &a1.id, "echo \"UD$((1+1))=$(cat /www/md/user-data)\"").await;
    assert!(ud.contains("UD2=hello-a1"), "user-data: {ud}");

    // Same network across hosts (VXLAN): a1 fetches a2's page.
    let got = guest_fetch(&c, &a1.id, &ipof(a2)).await;
    assert_eq!(
        got,
        format!("instance-id: {}", a2.id),
        "a1 -> a2 across hosts"
    );
    // Project B's guest, same cidr, reaches none of A's guests (whatever its own address).
    for a in [a1, a2] {
        if a.private_ip != bvm.private_ip {
            let got = guest_fetch(&b, &bvm.id, &ipof(a)).await;
            assert!(!got.contains(&a.id), "project B reached {}: {got:?}", a.id);
        }
    }
    eprintln!("tenant: isolation checked at {:?}", t0.elapsed());

    // Elastic IP on a1.
    let addr: Value = c
        .post("/api/v1/addresses", &json!({}))
        .await
        .expect("allocate");
    let eip = addr["public_ip"].as_str().expect("ip").to_string();
    let addr_id = addr["id"].as_str().expect("id").to_string();
    let _: Value = c
        .post(
            &format!("/api/v1/addresses/{addr_id}/associate"),
            &json!({"instance_id": a1.id}),
        )
        .await
        .expect("associate");
    let a1_host = c
        .host(a1.host_id.as_deref().expect("placed"))
        .await
        .expect("a1's host");
    let h1 = cluster.host_index(&a1_host.name).expect("a1's host index");
    let router = cluster.router_netns(h1, &blue_id);
    eventually("the elastic IP on a1's router", || {
        let o = std::process::Command::new("ip")
            .args(["-n", &router, "addr", "show", "ext0"])
            .output();
        let out = o.map(sh_out).unwrap_or_default();
        let ok = out.contains(&format!("{eip}/32"));
        if !ok {
            eprintln!("tenant: {router} ext0: {out:?} (want {eip})");
        }
        ok
    })
    .await;
    let url = format!("http://{eip}/");
    assert!(
        outside_fetch(&cluster, &url).is_none(),
        "port 80 is not allowed from outside yet"
    );
    let rule: Value = c
        .post(
            "/api/v1/security-groups/web/rules",
            &json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80,
                    "cidr": "0.0.0.0/0"}),
        )
        .await
        .expect("allow 80");
    eventually("the outside reaches a1 through its elastic IP", || {
        outside_fetch(&cluster, &url).is_some_and(|p| p.contains(&a1.id))
    })
    .await;
    assert!(
        outside_fetch(&cluster, &format!("http://{eip}:81/")).is_none(),
        "only port 80 is open"
    );
    // a1's outbound traffic leaves with its elastic IP: the outside sees that source.
    let www = dir.join("outside-www");
    std::fs::create_dir_all(www.join("cgi-bin")).expect("www");
    std::fs::write(
        www.join("cgi-bin/ip"),
        "#!/bin/sh\necho Content-Type: text/plain\necho\necho \"SRC=$REMOTE_ADDR\"\n",
    )
    .expect("cgi");
    std::process::Command::new("chmod")
        .args(["755", &www.join("cgi-bin/ip").display().to_string()])
        .status()
        .expect("chmod");
    let httpd = cluster.exec_outside(&[
        "busybox",
        "httpd",
        "-p",
        "8080",
        "-h",
        &www.display().to_string(),
    ]);
    assert!(httpd.status.success(), "outside httpd: {httpd:?}");
    let src = guest_sh(
        &c,
        &a1.id,
        &format!("timeout 6 wget -q -O - http://{OUTSIDE_IP}:8080/cgi-bin/ip"),
    )
    .await;
    // busybox httpd listens on IPv6 and shows v4 peers as [::ffff:a.b.c.d].
    let seen = src
        .lines()
        .find_map(|l| l.trim().strip_prefix("SRC="))
        .unwrap_or_default();
    assert!(
        seen.contains(&format!(":{eip}]")) || seen == eip,
        "outbound source: {src}"
    );
    // a2 has no elastic IP: it cannot reach the outside at all.
    let src2 = guest_sh(
        &c,
        &a2.id,
        &format!("timeout 6 wget -q -O - http://{OUTSIDE_IP}:8080/cgi-bin/ip"),
    )
    .await;
    assert!(!src2.contains("SRC="), "a2 reached the outside: {src2}");
    // Revoking the rule closes the port again.
    let rule_id = rule["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["from_port"] == 80))
        .and_then(|r| r["id"].as_str())
        .or_else(|| rule["id"].as_str())
        .expect("rule id")
        .to_string();
    let _: Value = c
        .request(
            "DELETE",
            &format!("/api/v1/security-groups/web/rules/{rule_id}"),
            None,
            None,
        )
        .await
        .unwrap_or(Value::Null);
    eventually("port 80 closed again", || {
        outside_fetch(&cluster, &url).is_none()
    })
    .await;
    eprintln!(
        "tenant: elastic IP and security groups checked at {:?}",
        t0.elapsed()
    );

    // Metadata refuses an address that is no VM's (the router itself asking).
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &router,
            "timeout",
            "5",
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            "http://169.254.169.254/latest/meta-data/instance-id",
        ])
        .output()
        .expect("wget");
    assert!(
        !o.status.success(),
        "metadata answered a non-VM: {}",
        sh_out(o)
    );

    // Anti-spoofing: a1 with another IP, then another MAC, cannot reach a2.
    let spoof_ip = guest_sh(
        &c,
        &a1.id,
        &format!(
            "ip addr add 10.60.0.250/24 dev eth0; ip addr del {ip}/24 dev eth0; \
             timeout 6 wget -q -O - http://{a2}/ >/dev/null && echo SP$((1+1))=reached || echo SP$((1+1))=blocked; \
             ip addr add {ip}/24 dev eth0; ip addr del 10.60.0.250/24 dev eth0",
            ip = ipof(a1),
            a2 = ipof(a2)
        ),
    )
    .await;
    assert!(spoof_ip.contains("SP2=blocked"), "IP spoofing: {spoof_ip}");
    let spoof_mac = guest_sh(
        &c,
        &a1.id,
        &format!(
            "ip link set eth0 address 02:99:99:99:99:99; \
             timeout 6 wget -q -O - http://{a2}/ >/dev/null && echo SM$((1+1))=reached || echo SM$((1+1))=blocked; \
             ip link set eth0 address {mac}",
            a2 = ipof(a2),
            mac = a1.mac.clone().unwrap_or_default()
        ),
    )
    .await;
    assert!(
        spoof_mac.contains("SM2=blocked"),
        "MAC spoofing: {spoof_mac}"
    );
    let back = guest_fetch(&c, &a1.id, &ipof(a2)).await;
    assert_eq!(
        back,
        format!("instance-id: {}", a2.id),
        "a1 works again with its own IP and MAC"
    );

    // Drift on a1's host: delete the host firewall, add a bogus NAT rule in the router, kill the
    // router's dnsmasq, delete the network's bridge. The agent puts everything back and says so.
    let host_ns = cluster.hosts()[h1].netns.clone();
    let host_rules = ruleset_in(&host_ns);
    let router_rules = ruleset_in(&router);
    assert!(host_rules.contains("table inet kumo"), "{host_rules}");
    let before_events = c.events(1000).await.expect("events").len();
    let tail = &blue_id[blue_id.len() - 12..];
    let run = |ns: &str, args: &[&str]| {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .expect("run");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&host_ns, &["nft", "delete", "table", "inet", "kumo"]);
    run(&router, &["nft", "add", "table", "ip", "bogus"]);
    // A bogus NAT entry: a stale elastic IP mapping (the Eucalyptus failure).
    run(
        &router,
        &[
            "nft",
            "add",
            "element",
            "inet",
            "kumo",
            "eip_dnat",
            "{ 203.0.113.99 : 10.60.0.99 }",
        ],
    );
    let pid_file = dir
        .join(&a1_host.name)
        .join("net/dnsmasq")
        .join(format!("{blue_id}.pid"));
    let dnsmasq_pid = std::fs::read_to_string(&pid_file).expect("dnsmasq pid file");
    let killed = std::process::Command::new("kill")
        .arg(dnsmasq_pid.trim())
        .status()
        .expect("kill");
    assert!(killed.success(), "killing dnsmasq {dnsmasq_pid}");
    run(&host_ns, &["ip", "link", "del", &format!("kb-{tail}")]);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let ev = c.events(1000).await.expect("events");
        let repaired =
            ev.len() > before_events && ev.iter().any(|e| e.action == "host.network.repaired");
        if repaired && ruleset_in(&host_ns) == host_rules {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drift not repaired: events {ev:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after_router = ruleset_in(&router);
    // The bogus table is not kumo's: it stays; kumo's own table is back to the rendered one.
    assert_eq!(
        after_router.replace("table ip bogus {\n}\n", ""),
        router_rules,
        "router ruleset repaired"
    );
    let back = guest_fetch(&c, &a2.id, &ipof(a1)).await;
    assert_eq!(
        back,
        format!("instance-id: {}", a1.id),
        "a2 -> a1 after the repair"
    );

    // A restarted agent renders the same ruleset, byte for byte.
    cluster.stop_agent(h1);
    cluster.start_agent(h1).expect("restart agent");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        ruleset_in(&host_ns),
        host_rules,
        "same host ruleset after an agent restart"
    );

    // In-use resources cannot be deleted.
    let err = c
        .request::<Value>("DELETE", "/api/v1/networks/blue", None, None)
        .await
        .expect_err("network in use");
    assert!(err.to_string().contains("live instance"), "{err}");
    let err = c
        .request::<Value>("DELETE", "/api/v1/security-groups/web", None, None)
        .await
        .expect_err("group in use");
    assert!(!err.to_string().is_empty());

    cluster.teardown().await.expect("teardown");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("kc{}-", cluster.id())))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    eprintln!("tenant: done in {:?}", t0.elapsed());
}
