//! Tenant networks and elastic IPs through the REST API, the CLI and the store, with simulated
//! hosts: per-project networks (same CIDR in two projects, default networks made on first
//! need), every bad input refused without changing anything, a tiny address pool running out,
//! associations kept within a project, and termination disassociating.

use std::process::Command;
use std::time::Duration;

use kumo_cli::{Client, ClientError};
use kumo_types::api::CreateInstance;
use kumo_types::networks::{AssociateAddress, CreateNetwork, SetAddressPool};
use kumo_types::InstanceState;

use crate::common::{Cloud, Hv, KUMO};
use crate::sim::tiny_image;

const T: Duration = Duration::from_secs(60);

fn code(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
            ..
        } => (status, code, message),
        other => panic!("expected an API error, got {other}"),
    }
}

/// The error of a call that must fail with this status and code; returns its message.
fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>, status: u16, want: &str) -> String {
    let (s, c, m) = code(r.expect_err("must be refused"));
    assert_eq!((s, c.as_str()), (status, want), "{m}");
    m
}

/// A member of a new project, made straight in the controller's store (no API for users).
async fn member(cloud: &Cloud, project: &str) -> (Client, String, String, String) {
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    let p = store.create_project(project).await.expect("project");
    let u = store
        .create_user(&format!("{project}-user"), &p, "member")
        .await
        .expect("user");
    let k = store.create_access_key(&u).await.expect("key");
    store.close().await;
    (cloud.client_for(&k.id, &k.secret), p, k.id, k.secret)
}

fn vm(name: &str, image: &str, network: Option<&str>) -> CreateInstance {
    CreateInstance {
        name: name.into(),
        image: image.into(),
        instance_type: Some("t1.nano".into()),
        network: network.map(String::from),
        ..Default::default()
    }
}

fn net(name: &str, cidr: &str) -> CreateNetwork {
    CreateNetwork {
        name: name.into(),
        cidr: cidr.into(),
        ..CreateNetwork::default()
    }
}

async fn network_names(c: &Client) -> Vec<String> {
    let mut v: Vec<String> = c
        .networks()
        .await
        .expect("networks")
        .into_iter()
        .map(|n| n.name)
        .collect();
    v.sort();
    v
}

/// `kumo ARGS` as the given key; (success, stdout + stderr).
fn cli(cloud: &Cloud, key: &str, secret: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(KUMO)
        .args(args)
        .env(
            "KUMO_CONFIG",
            cloud.dir.path().join("no-client-config.toml"),
        )
        .env("KUMO_ENDPOINT", &cloud.endpoint)
        .env("KUMO_REGION", "kumo")
        .env("KUMO_ACCESS_KEY_ID", key)
        .env("KUMO_SECRET_ACCESS_KEY", secret)
        .output()
        .expect("run kumo");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_networks_per_project() {
    let cloud = Cloud::start(Hv::Sim).await;
    let admin = cloud.client.clone();
    let img = tiny_image(&cloud, "tiny", true).await;
    let (carol, carol_project, ck, cs) = member(&cloud, "team").await;
    let (bob, _, _, _) = member(&cloud, "other").await;

    // The admin's bootstrapped default network is as it was.
    let boot = admin.network("default").await.expect("admin default");
    assert_eq!(
        (boot.cidr.as_str(), boot.gateway.as_str(), boot.is_default),
        ("10.77.0.0/24", "10.77.0.1", true)
    );
    // A project's default network is made on first need, with the server's default CIDR.
    assert!(carol.networks().await.expect("none yet").is_empty());
    let first = carol
        .create_instance(&vm("first", &img, None), None)
        .await
        .expect("first");
    let d = carol.network("default").await.expect("carol's default");
    assert_eq!(
        (d.cidr.as_str(), d.project_id.as_str()),
        ("10.77.0.0/24", carol_project.as_str())
    );
    assert_ne!(d.id, boot.id);
    assert_ne!(d.vni, boot.vni);
    assert!(first
        .private_ip
        .as_deref()
        .is_some_and(|ip| ip.starts_with("10.77.0.")));
    carol
        .create_instance(&vm("second", &img, None), None)
        .await
        .expect("second");
    assert_eq!(network_names(&carol).await, vec!["default"]);

    // A network of one's own; the same CIDR in another project is fine.
    let app = carol
        .create_network(&net("app", "10.1.0.0/24"))
        .await
        .expect("app");
    assert_eq!(
        (
            app.gateway.as_str(),
            app.isolation.as_str(),
            app.mtu,
            app.vlan_tag
        ),
        ("10.1.0.1", "vxlan", Some(1450), None)
    );
    let bapp = bob
        .create_network(&net("app", "10.1.0.0/24"))
        .await
        .expect("bob's app");
    assert!(app.vni.is_some() && bapp.vni.is_some() && app.vni != bapp.vni);

    // Bad input: a clear error, and nothing changes.
    let before = network_names(&carol).await;
    for (req, status, want, says) in [
        (
            net("x", "10.2.0.0"),
            400,
            "InvalidParameter",
            "not an IPv4 CIDR",
        ),
        (
            net("x", "10.2.0.0/33"),
            400,
            "InvalidParameter",
            "between 16 and 28",
        ),
        (
            net("x", "10.2.0.5/24"),
            400,
            "InvalidParameter",
            "host bits",
        ),
        (
            net("x", "10.0.0.0/15"),
            400,
            "InvalidParameter",
            "between 16 and 28",
        ),
        (
            net("x", "10.2.0.0/29"),
            400,
            "InvalidParameter",
            "between 16 and 28",
        ),
        (
            net("bad name", "10.2.0.0/24"),
            400,
            "InvalidParameter",
            "may only contain",
        ),
        (net("app", "10.3.0.0/24"), 409, "Conflict", "already exists"),
        (
            net("x", "10.1.0.64/26"),
            409,
            "Conflict",
            "overlaps network app (10.1.0.0/24)",
        ),
        (
            CreateNetwork {
                isolation: Some("gre".into()),
                ..net("x", "10.4.0.0/24")
            },
            400,
            "InvalidParameter",
            "vxlan or vlan",
        ),
        (
            CreateNetwork {
                vlan_tag: Some(10),
                ..net("x", "10.4.0.0/24")
            },
            403,
            "Forbidden",
            "administrators",
        ),
    ] {
        let m = refused(carol.create_network(&req).await, status, want);
        assert!(m.contains(says), "{req:?}: {m}");
        assert_eq!(
            network_names(&carol).await,
            before,
            "{req:?} changed something"
        );
    }
    // VLAN networks: administrators, tags 1..=4094, each once.
    for tag in [0, 4095] {
        let req = CreateNetwork {
            vlan_tag: Some(tag),
            ..net("v", "10.60.0.0/24")
        };
        refused(admin.create_network(&req).await, 400, "InvalidParameter");
    }
    let v = admin
        .create_network(&CreateNetwork {
            vlan_tag: Some(120),
            ..net("v120", "10.60.0.0/24")
        })
        .await
        .expect("vlan");
    assert_eq!(
        (v.isolation.as_str(), v.vlan_tag, v.vni),
        ("vlan", Some(120), None)
    );
    let m = refused(
        admin
            .create_network(&CreateNetwork {
                vlan_tag: Some(120),
                ..net("v120b", "10.61.0.0/24")
            })
            .await,
        409,
        "Conflict",
    );
    assert!(m.contains("vlan tag 120"), "{m}");

    // Instances on the network; the same addresses in both projects.
    let web = carol
        .create_instance(&vm("web", &img, Some("app")), None)
        .await
        .expect("web");
    let bweb = bob
        .create_instance(&vm("web", &img, Some(&bapp.id)), None)
        .await
        .expect("bob's web");
    assert_eq!(web.private_ip.as_deref(), Some("10.1.0.10"));
    assert_eq!(bweb.private_ip.as_deref(), Some("10.1.0.10"));
    // Another project's network, by id or name, does not exist for carol.
    for other in [bapp.id.as_str(), "v120", "nope"] {
        let m = refused(
            carol
                .create_instance(&vm("x", &img, Some(other)), None)
                .await,
            400,
            "InvalidParameter",
        );
        assert!(m.contains("does not exist"), "{m}");
    }
    refused(carol.network(&bapp.id).await, 404, "NotFound");
    refused(bob.delete_network(&app.id).await, 404, "NotFound");
    // In use: no delete.
    let m = refused(carol.delete_network("app").await, 409, "IncorrectState");
    assert!(m.contains("1 live instance(s)"), "{m}");
    cloud.wait_state(&web.id, InstanceState::Running, T).await;
    assert_eq!(carol.network("app").await.expect("app").instances, 1);

    // What the agents' network policy is built from.
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    let hosts = store.network_hosts(&app.id).await.expect("hosts");
    assert_eq!(hosts, vec![web.host_id.clone().expect("placed")]);
    assert!(store.network_hosts(&v.id).await.expect("none").is_empty());
    let rows = store
        .networks_by_ids(&[app.id.clone(), bapp.id.clone()])
        .await
        .expect("by ids");
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|n| n.cidr == "10.1.0.0/24" && n.isolation == "vxlan"));
    store.close().await;

    // Terminated, the network can go; its name and CIDR are free again.
    carol.terminate(&web.id).await.expect("terminate");
    cloud
        .wait_state(&web.id, InstanceState::Terminated, T)
        .await;
    carol.delete_network("app").await.expect("delete");
    assert_eq!(network_names(&carol).await, vec!["default"]);
    refused(carol.network("app").await, 404, "NotFound");

    // The CLI: `kumo network`, and `kumo vm create --network`.
    let (ok, out) = cli(
        &cloud,
        &ck,
        &cs,
        &["network", "create", "db", "--cidr", "10.5.0.0/24"],
    );
    assert!(
        ok && out.contains("db (10.5.0.0/24, gateway 10.5.0.1)"),
        "{out}"
    );
    let (ok, out) = cli(
        &cloud,
        &ck,
        &cs,
        &["network", "create", "db2", "--cidr", "10.5.0.0/25"],
    );
    assert!(!ok && out.contains("overlaps network db"), "{out}");
    let (ok, out) = cli(&cloud, &ck, &cs, &["network", "list"]);
    assert!(
        ok && out.contains("10.5.0.0/24") && !out.contains("db2"),
        "{out}"
    );
    let (ok, out) = cli(
        &cloud,
        &ck,
        &cs,
        &[
            "vm",
            "create",
            "--name",
            "dbvm",
            "--image",
            &img,
            "--type",
            "t1.nano",
            "--network",
            "db",
        ],
    );
    assert!(ok && out.contains("10.5.0.10"), "{out}");
    let (ok, out) = cli(&cloud, &ck, &cs, &["network", "show", "db", "-o", "json"]);
    assert!(ok, "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["instances"], 1, "{out}");
    let (ok, out) = cli(&cloud, &ck, &cs, &["network", "delete", "db"]);
    assert!(!ok && out.contains("terminate them first"), "{out}");

    // The OpenAPI document describes the new endpoints and models.
    let doc: serde_json::Value = reqwest::get(format!("{}/api/v1/openapi.json", cloud.endpoint))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("openapi json");
    for path in [
        "/api/v1/networks",
        "/api/v1/networks/{id}",
        "/api/v1/address-pool",
        "/api/v1/addresses",
        "/api/v1/addresses/{id}",
        "/api/v1/addresses/{id}/associate",
        "/api/v1/addresses/{id}/disassociate",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} is not in the OpenAPI document"
        );
    }
    for schema in [
        "Network",
        "CreateNetwork",
        "AddressPool",
        "SetAddressPool",
        "Address",
        "AssociateAddress",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} is missing"
        );
    }
    assert!(doc["components"]["schemas"]["Instance"]["properties"]["public_ip"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn elastic_ips_from_the_pool() {
    let cloud = Cloud::start(Hv::Sim).await;
    let admin = cloud.client.clone();
    let img = tiny_image(&cloud, "tiny", true).await;
    let (carol, carol_project, ck, cs) = member(&cloud, "team").await;
    let (bob, _, _, _) = member(&cloud, "other").await;
    let web = carol
        .create_instance(&vm("web", &img, None), None)
        .await
        .expect("web");
    let db = carol
        .create_instance(&vm("db", &img, None), None)
        .await
        .expect("db");
    let theirs = bob
        .create_instance(&vm("theirs", &img, None), None)
        .await
        .expect("bob's");

    // The pool is the administrators'; without one there is nothing to allocate.
    refused(carol.address_pool().await, 403, "Forbidden");
    let good = SetAddressPool {
        cidr: "203.0.113.0/24".into(),
        gateway: "203.0.113.1".into(),
        first: "203.0.113.10".into(),
        last: "203.0.113.12".into(),
    };
    refused(carol.set_address_pool(&good).await, 403, "Forbidden");
    refused(admin.address_pool().await, 404, "NotFound");
    let m = refused(carol.allocate_address().await, 409, "Conflict");
    assert!(m.contains("no public address pool"), "{m}");
    let pool = |cidr: &str, gateway: &str, first: &str, last: &str| SetAddressPool {
        cidr: cidr.into(),
        gateway: gateway.into(),
        first: first.into(),
        last: last.into(),
    };
    for (p, says) in [
        (
            pool(
                "203.0.113.0/33",
                "203.0.113.1",
                "203.0.113.10",
                "203.0.113.12",
            ),
            "between 8 and 30",
        ),
        (
            pool("203.0.113.0", "203.0.113.1", "203.0.113.10", "203.0.113.12"),
            "not an IPv4 CIDR",
        ),
        (
            pool(
                "203.0.113.0/24",
                "198.51.100.1",
                "203.0.113.10",
                "203.0.113.12",
            ),
            "outside",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.10",
                "203.0.114.12",
            ),
            "outside",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.12",
                "203.0.113.10",
            ),
            "empty",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.1",
                "203.0.113.12",
            ),
            "gateway",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.200",
                "203.0.113.255",
            ),
            "broadcast",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.0",
                "203.0.113.9",
            ),
            "network address",
        ),
        (
            pool("203.0.113.0/24", "x", "203.0.113.10", "203.0.113.12"),
            "not an IPv4 address",
        ),
    ] {
        let m = refused(admin.set_address_pool(&p).await, 400, "InvalidParameter");
        assert!(m.contains(says), "{p:?}: {m}");
        refused(admin.address_pool().await, 404, "NotFound");
    }
    let p = admin.set_address_pool(&good).await.expect("pool");
    assert_eq!((p.size, p.used, p.free), (3, 0, 3));

    // A tiny pool: three addresses, lowest first, then AddressLimit.
    let a1 = carol.allocate_address().await.expect("a1");
    let a2 = carol.allocate_address().await.expect("a2");
    let b1 = bob.allocate_address().await.expect("b1");
    assert_eq!(
        [&a1.public_ip, &a2.public_ip, &b1.public_ip],
        ["203.0.113.10", "203.0.113.11", "203.0.113.12"]
    );
    assert!(a1.id.starts_with("eipalloc-") && a1.instance_id.is_none());
    assert_eq!(a1.project_id, carol_project);
    let m = refused(carol.allocate_address().await, 409, "Conflict");
    assert!(m.contains("no free address"), "{m}");
    assert_eq!(carol.addresses().await.expect("list").len(), 2);
    assert_eq!(bob.addresses().await.expect("list").len(), 1);
    let p = admin.address_pool().await.expect("pool");
    assert_eq!((p.used, p.free), (3, 0));
    // Shrinking the pool may not strand an allocated address.
    let m = refused(
        admin
            .set_address_pool(&pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.11",
                "203.0.113.20",
            ))
            .await,
        409,
        "Conflict",
    );
    assert!(m.contains("203.0.113.10"), "{m}");
    assert_eq!(
        admin.address_pool().await.expect("pool").last,
        "203.0.113.12"
    );

    // Another project's address or instance does not exist: nothing is revealed or changed.
    let assoc = |i: &str| AssociateAddress {
        instance_id: i.into(),
        allow_reassociation: true,
    };
    refused(
        bob.associate_address(&a1.id, &assoc(&theirs.id)).await,
        404,
        "NotFound",
    );
    refused(
        bob.associate_address(&a1.public_ip, &assoc("theirs")).await,
        404,
        "NotFound",
    );
    refused(
        bob.associate_address(&b1.id, &assoc(&web.id)).await,
        404,
        "NotFound",
    );
    refused(bob.disassociate_address(&a1.id).await, 404, "NotFound");
    refused(bob.release_address(&a1.public_ip).await, 404, "NotFound");
    refused(carol.release_address(&b1.id).await, 404, "NotFound");
    assert!(bob
        .addresses()
        .await
        .expect("list")
        .iter()
        .all(|a| a.id == b1.id));
    assert!(carol
        .addresses()
        .await
        .expect("list")
        .iter()
        .all(|a| a.instance_id.is_none()));
    refused(
        carol
            .associate_address(
                &a1.id,
                &AssociateAddress {
                    instance_id: "nope".into(),
                    allow_reassociation: false,
                },
            )
            .await,
        404,
        "NotFound",
    );

    // Associate; the instance shows its public IP.
    let x = carol
        .associate_address(
            &a1.public_ip,
            &AssociateAddress {
                instance_id: "web".into(),
                allow_reassociation: false,
            },
        )
        .await
        .expect("associate");
    assert_eq!(x.instance_id.as_deref(), Some(web.id.as_str()));
    assert_eq!(x.private_ip, web.private_ip);
    assert!(x
        .association_id
        .as_deref()
        .is_some_and(|a| a.starts_with("eipassoc-")));
    assert_eq!(
        carol
            .instance("web")
            .await
            .expect("web")
            .public_ip
            .as_deref(),
        Some("203.0.113.10")
    );
    // Already associated: refused without allow_reassociation, moved with it.
    let m = refused(
        carol
            .associate_address(
                &a1.id,
                &AssociateAddress {
                    instance_id: "db".into(),
                    allow_reassociation: false,
                },
            )
            .await,
        409,
        "Conflict",
    );
    assert!(m.contains("already associated"), "{m}");
    assert_eq!(
        carol
            .instance("web")
            .await
            .expect("web")
            .public_ip
            .as_deref(),
        Some("203.0.113.10")
    );
    carol
        .associate_address(&a1.id, &assoc("db"))
        .await
        .expect("move");
    assert!(carol
        .instance("web")
        .await
        .expect("web")
        .public_ip
        .is_none());
    // An instance holds one address: giving db another disassociates the first.
    carol
        .associate_address(&a2.id, &assoc("db"))
        .await
        .expect("second");
    let list = carol.addresses().await.expect("list");
    let find = |id: &str| list.iter().find(|a| a.id == id).cloned().expect("listed");
    assert!(find(&a1.id).instance_id.is_none());
    assert_eq!(find(&a2.id).instance_id.as_deref(), Some(db.id.as_str()));
    // Release is refused while associated.
    let m = refused(carol.release_address(&a2.id).await, 409, "Conflict");
    assert!(m.contains("disassociate it first"), "{m}");
    assert_eq!(carol.addresses().await.expect("list").len(), 2);

    // What the agents' NAT is built from.
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    let ips = store
        .instance_public_ips(&[web.id.clone(), db.id.clone(), theirs.id.clone()])
        .await
        .expect("ips");
    assert_eq!(ips, vec![(db.id.clone(), a2.public_ip.clone())]);
    let sp = store.address_pool().await.expect("pool").expect("some");
    assert_eq!(
        (
            sp.cidr.as_str(),
            sp.gateway.as_str(),
            sp.first.as_str(),
            sp.last.as_str()
        ),
        (
            "203.0.113.0/24",
            "203.0.113.1",
            "203.0.113.10",
            "203.0.113.12"
        )
    );
    store.close().await;

    // Terminating db disassociates its address; the allocation stays with the project.
    carol.terminate(&db.id).await.expect("terminate");
    cloud.wait_state(&db.id, InstanceState::Terminated, T).await;
    let kept = carol
        .addresses()
        .await
        .expect("list")
        .into_iter()
        .find(|a| a.id == a2.id)
        .expect("kept");
    assert_eq!((kept.instance_id, kept.association_id), (None, None));
    refused(
        carol.associate_address(&a2.id, &assoc(&db.id)).await,
        409,
        "Conflict",
    );

    // Released addresses come back with a new id.
    carol.release_address(&a2.public_ip).await.expect("release");
    refused(carol.release_address(&a2.id).await, 404, "NotFound");
    let again = carol.allocate_address().await.expect("again");
    assert_eq!(again.public_ip, a2.public_ip);
    assert_ne!(again.id, a2.id);

    // The CLI.
    let (ok, out) = cli(&cloud, &ck, &cs, &["address", "list"]);
    assert!(
        ok && out.contains(&a1.public_ip) && !out.contains(&b1.public_ip),
        "{out}"
    );
    let (ok, out) = cli(
        &cloud,
        &ck,
        &cs,
        &["address", "associate", &again.public_ip, "web"],
    );
    assert!(
        ok && out.contains(&format!("{} -> {}", again.public_ip, web.id)),
        "{out}"
    );
    let (ok, out) = cli(&cloud, &ck, &cs, &["address", "release", &again.id]);
    assert!(!ok && out.contains("disassociate it first"), "{out}");
    let (ok, out) = cli(&cloud, &ck, &cs, &["address", "disassociate", &again.id]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&cloud, &ck, &cs, &["address", "allocate"]);
    assert!(!ok && out.contains("no free address"), "{out}");
    let (ok, out) = cli(&cloud, &ck, &cs, &["address-pool", "show"]);
    assert!(!ok && out.contains("only administrators"), "{out}");
    let (ok, out) = cli(
        &cloud,
        &cloud.access_key_id,
        &cloud.secret,
        &[
            "address-pool",
            "set",
            "--cidr",
            "203.0.113.0/24",
            "--gateway",
            "203.0.113.1",
            "--range",
            "203.0.113.10-203.0.113.20",
        ],
    );
    assert!(ok && out.contains("3 used, 8 free of 11"), "{out}");
    let (ok, out) = cli(&cloud, &ck, &cs, &["address", "allocate"]);
    assert!(ok && out.contains("203.0.113.13"), "{out}");
}
