//! Store tests of tenant networks, the address pool and elastic IPs.

use super::*;
use crate::{Bootstrap, ImageRow, NewImage, NewInstance, Placement};
use kumo_types::agent::HostInfo;
use kumo_types::InstanceState;

fn info() -> HostInfo {
    HostInfo {
        vcpus: 8,
        memory_mib: 16384,
        hypervisor: "sim".into(),
        accel: "tcg".into(),
        qemu_version: "sim".into(),
        labels: Default::default(),
        storage_pool: String::new(),
        disk_gib: 0,
        tunnel_ip: String::new(),
        pool: None,
    }
}

async fn setup() -> (Store, Bootstrap) {
    let s = Store::open_memory().await.expect("store");
    let b = s
        .bootstrap("10.9.0.0/24")
        .await
        .expect("bootstrap")
        .expect("first");
    (s, b)
}

/// A member of a new project.
async fn member(s: &Store, project: &str) -> Scope {
    let p = s.create_project(project).await.expect("project");
    let u = s
        .create_user(&format!("{project}-user"), &p, "member")
        .await
        .expect("user");
    s.create_access_key(&u).await.expect("key").scope()
}

async fn image(s: &Store, scope: &Scope) -> ImageRow {
    let img = s
        .create_image(
            scope,
            &NewImage {
                name: "img".into(),
                kind: "disk".into(),
                public: true,
                kernel_id: None,
                ramdisk_id: None,
                cmdline: None,
            },
            |id| format!("/x/{id}"),
        )
        .await
        .expect("image");
    s.finish_image(&img.id, "qcow2", 1 << 20, 1 << 20, "00")
        .await
        .expect("finish");
    img
}

fn first_host(p: &Placement) -> std::result::Result<usize, String> {
    (!p.hosts().is_empty())
        .then_some(0)
        .ok_or_else(|| "no host".to_string())
}

async fn vm(
    s: &Store,
    scope: &Scope,
    name: &str,
    img: &str,
    net: &str,
) -> Result<crate::InstanceRow> {
    let new = NewInstance {
        name: name.into(),
        image_id: img.into(),
        instance_type: "t1.nano".into(),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 1,
        network_id: net.into(),
        extras: Default::default(),
        placement_group: None,
        site: None,
        constraints: vec![],
        security_group_ids: vec![],
        key_name: None,
        root_snapshot_id: None,
        mac: None,
        smbios_uuid: None,
        ha: false,
        ha_priority: 500,
    };
    s.create_instance(scope, &new, |p, _| first_host(p)).await
}

async fn terminate(s: &Store, scope: &Scope, id: &str) {
    s.update_instance(scope, id, |r| {
        let mut n = r.clone();
        n.state = InstanceState::ShuttingDown;
        n.desired = "terminated".into();
        Ok(Some(n))
    })
    .await
    .expect("terminate");
    let row = s.instance(scope, id).await.expect("row");
    assert!(s.instance_absent_on_host(&row).await.expect("gone"));
}

fn net(name: &str, cidr: &str) -> NewNetwork {
    NewNetwork {
        name: name.into(),
        cidr: cidr.into(),
        ..NewNetwork::default()
    }
}

fn names(v: &[NetworkView]) -> Vec<String> {
    v.iter().map(|n| n.network.name.clone()).collect()
}

fn pool(cidr: &str, gateway: &str, first: &str, last: &str) -> AddressPoolRow {
    AddressPoolRow {
        cidr: cidr.into(),
        gateway: gateway.into(),
        first: first.into(),
        last: last.into(),
    }
}

#[tokio::test]
async fn tenant_networks_are_checked_and_kept_apart() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let alice = member(&s, "team-a").await;
    let bob = member(&s, "team-b").await;
    let boot = s.network("default").await.expect("bootstrap network");
    assert_eq!(
        (boot.isolation.as_str(), boot.vni, boot.mtu),
        ("vxlan", Some(1), Some(VXLAN_MTU))
    );
    assert_eq!(boot.gateway, "10.9.0.1");

    let a = s
        .create_tenant_network(&alice, &net("app", "10.1.0.0/24"))
        .await
        .expect("app");
    assert_eq!(
        (a.gateway.as_str(), a.vni, a.vlan_tag, a.mtu),
        ("10.1.0.1", Some(2), None, Some(VXLAN_MTU))
    );
    assert_eq!(a.project_id, alice.project_id);
    // The same CIDR in another project is fine: its own VNI keeps it apart.
    let b1 = s
        .create_tenant_network(&bob, &net("app", "10.1.0.0/24"))
        .await
        .expect("same cidr elsewhere");
    assert_eq!(b1.vni, Some(3));

    // Bad input: a clear error and nothing created.
    let bad: Vec<(NewNetwork, &str)> = vec![
        (net("x1", "10.2.0.0"), "not an IPv4 CIDR"),
        (net("x2", "10.2.0.300/24"), "not an IPv4 CIDR"),
        (net("x3", "ten/24"), "not an IPv4 CIDR"),
        (
            net("x4", "10.2.0.1/24"),
            "host bits set; did you mean 10.2.0.0/24",
        ),
        (net("x5", "10.0.0.0/15"), "between 16 and 28"),
        (net("x6", "10.2.0.0/29"), "between 16 and 28"),
        (net("bad name", "10.2.0.0/24"), "may only contain"),
        (net("app", "10.3.0.0/24"), "already exists"),
        (
            net("x7", "10.1.0.128/25"),
            "overlaps network app (10.1.0.0/24)",
        ),
        (net("x8", "10.1.0.0/16"), "overlaps network app"),
        (
            NewNetwork {
                isolation: Some("gre".into()),
                ..net("x9", "10.4.0.0/24")
            },
            "vxlan or vlan",
        ),
        (
            NewNetwork {
                vlan_tag: Some(100),
                ..net("x10", "10.4.0.0/24")
            },
            "only administrators",
        ),
        (
            NewNetwork {
                isolation: Some("vxlan".into()),
                vlan_tag: Some(100),
                ..net("x11", "10.4.0.0/24")
            },
            "only for vlan networks",
        ),
    ];
    for (n, want) in bad {
        let e = s
            .create_tenant_network(&alice, &n)
            .await
            .expect_err(&n.name);
        assert!(e.to_string().contains(want), "{}: {e}", n.name);
    }
    assert_eq!(names(&s.networks(&alice).await.expect("list")), vec!["app"]);

    // VLAN networks: administrators give a unique tag in 1..=4094.
    for (tag, want) in [(0, "between 1 and 4094"), (4095, "between 1 and 4094")] {
        let e = s
            .create_tenant_network(
                &admin,
                &NewNetwork {
                    vlan_tag: Some(tag),
                    ..net("v", "10.50.0.0/24")
                },
            )
            .await
            .expect_err("bad tag");
        assert!(e.to_string().contains(want), "{e}");
    }
    let e = s
        .create_tenant_network(
            &admin,
            &NewNetwork {
                isolation: Some("vlan".into()),
                ..net("v", "10.50.0.0/24")
            },
        )
        .await
        .expect_err("no tag");
    assert!(e.to_string().contains("needs a vlan_tag"), "{e}");
    let v = s
        .create_tenant_network(
            &admin,
            &NewNetwork {
                vlan_tag: Some(100),
                ..net("v100", "10.50.0.0/24")
            },
        )
        .await
        .expect("vlan");
    assert_eq!(
        (v.isolation.as_str(), v.vlan_tag, v.vni, v.mtu),
        ("vlan", Some(100), None, None)
    );
    let e = s
        .create_tenant_network(
            &admin,
            &NewNetwork {
                vlan_tag: Some(100),
                ..net("v100b", "10.51.0.0/24")
            },
        )
        .await
        .expect_err("tag taken");
    assert!(e.to_string().contains("vlan tag 100 is used"), "{e}");

    // Scoping: each project sees its own; an admin sees all, its own first by name.
    assert!(matches!(
        s.project_network(&bob, &a.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        s.project_network(&bob, "app")
            .await
            .expect("own")
            .network
            .id,
        b1.id
    );
    let all = s.networks(&admin).await.expect("all");
    assert!(all.len() >= 4, "{:?}", names(&all));

    // Delete frees the name, CIDR and tag; the VNI is never handed out again.
    s.delete_network(&admin, "v100").await.expect("delete vlan");
    s.create_tenant_network(
        &admin,
        &NewNetwork {
            vlan_tag: Some(100),
            ..net("v100", "10.50.0.0/24")
        },
    )
    .await
    .expect("tag and name reusable");
    s.delete_network(&alice, &a.id).await.expect("delete");
    assert!(matches!(
        s.project_network(&alice, &a.id).await,
        Err(StoreError::NotFound { .. })
    ));
    let again = s
        .create_tenant_network(&alice, &net("app", "10.1.0.0/24"))
        .await
        .expect("recreate");
    assert_ne!(again.id, a.id);
    assert_eq!(
        again.vni,
        Some(4),
        "VNI 2 of the deleted network is not reused"
    );
    // The controller still reads a deleted network by id (terminated instances name it).
    assert_eq!(s.network(&a.id).await.expect("by id").cidr, "10.1.0.0/24");
    let by_ids = s
        .networks_by_ids(&[again.id.clone(), b1.id.clone(), "vpc-nope".into()])
        .await
        .expect("by ids");
    let mut want = vec![again.id.clone(), b1.id.clone()];
    want.sort();
    assert_eq!(
        by_ids.iter().map(|n| n.id.clone()).collect::<Vec<_>>(),
        want
    );
}

#[tokio::test]
async fn each_project_gets_a_default_network_once() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let boot = s.network("default").await.expect("boot");
    // The admin's default is the bootstrapped one, untouched.
    assert_eq!(s.default_network(&admin, "default").await.expect("d"), boot);
    let alice = member(&s, "team-a").await;
    let d = s.default_network(&alice, "default").await.expect("made");
    assert_eq!(
        (d.cidr.as_str(), d.name.as_str()),
        ("10.9.0.0/24", "default")
    );
    assert_eq!(d.project_id, alice.project_id);
    assert_ne!(d.vni, boot.vni);
    assert_eq!(s.default_network(&alice, "default").await.expect("same"), d);
    assert_eq!(s.networks(&alice).await.expect("list").len(), 1);
    // A project whose own network takes the default CIDR gets a clear error.
    let carol = member(&s, "team-c").await;
    s.create_tenant_network(&carol, &net("mine", "10.9.0.0/25"))
        .await
        .expect("mine");
    let e = s
        .default_network(&carol, "default")
        .await
        .expect_err("overlap");
    assert!(
        e.to_string().contains("overlaps network mine") && e.to_string().contains("name a network"),
        "{e}"
    );
    assert_eq!(
        names(&s.networks(&carol).await.expect("list")),
        vec!["mine"]
    );
}

#[tokio::test]
async fn instances_need_a_live_network_of_their_project() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let alice = member(&s, "team-a").await;
    let bob = member(&s, "team-b").await;
    let host = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin).await;
    let an = s
        .create_tenant_network(&alice, &net("app", "10.1.0.0/28"))
        .await
        .expect("a");
    let bn = s
        .create_tenant_network(&bob, &net("app", "10.1.0.0/28"))
        .await
        .expect("b");
    // Same CIDR, separate address pools: both get the first instance address.
    let ai = vm(&s, &alice, "web", &img.id, &an.id).await.expect("a vm");
    let bi = vm(&s, &bob, "web", &img.id, &bn.id).await.expect("b vm");
    assert_eq!(
        (ai.private_ip.as_str(), bi.private_ip.as_str()),
        ("10.1.0.10", "10.1.0.10")
    );
    let e = vm(&s, &alice, "x", &img.id, &bn.id)
        .await
        .expect_err("other's");
    assert!(
        e.to_string().contains("not a network of this project"),
        "{e}"
    );
    assert_eq!(
        s.network_hosts(&an.id).await.expect("hosts"),
        vec![host.id.clone()]
    );
    // In use: no delete. Terminated: the network goes, and its pool with it.
    let e = s.delete_network(&alice, "app").await.expect_err("in use");
    assert!(e.to_string().contains("1 live instance(s)"), "{e}");
    assert!(s.project_network(&alice, "app").await.is_ok());
    terminate(&s, &alice, &ai.id).await;
    assert!(s.network_hosts(&an.id).await.expect("hosts").is_empty());
    s.delete_network(&alice, "app").await.expect("delete");
    let e = vm(&s, &alice, "late", &img.id, &an.id)
        .await
        .expect_err("deleted");
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    let an2 = s
        .create_tenant_network(&alice, &net("app", "10.1.0.0/28"))
        .await
        .expect("again");
    let ai2 = vm(&s, &alice, "web2", &img.id, &an2.id).await.expect("vm");
    assert_eq!(ai2.private_ip, "10.1.0.10");
    assert!(s.placement_drift().await.expect("drift").is_empty());
}

#[tokio::test]
async fn the_address_pool_is_checked() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    assert!(s.address_pool().await.expect("none").is_none());
    let e = s.allocate_address(&admin).await.expect_err("no pool");
    assert!(e.to_string().contains("no public address pool"), "{e}");
    let bad = [
        (
            pool("203.0.113.0", "203.0.113.1", "203.0.113.10", "203.0.113.20"),
            "not an IPv4 CIDR",
        ),
        (
            pool(
                "203.0.113.5/24",
                "203.0.113.1",
                "203.0.113.10",
                "203.0.113.20",
            ),
            "host bits",
        ),
        (
            pool(
                "203.0.113.0/24",
                "198.51.100.1",
                "203.0.113.10",
                "203.0.113.20",
            ),
            "gateway 198.51.100.1 is outside",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.112.10",
                "203.0.113.20",
            ),
            "first address 203.0.112.10 is outside",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.10",
                "203.0.114.20",
            ),
            "last address 203.0.114.20 is outside",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.30",
                "203.0.113.20",
            ),
            "is empty",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.0",
                "203.0.113.20",
            ),
            "contains the network address",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.1",
                "203.0.113.200",
                "203.0.113.255",
            ),
            "contains the broadcast address",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.15",
                "203.0.113.10",
                "203.0.113.20",
            ),
            "contains the gateway address",
        ),
        (
            pool(
                "203.0.113.0/24",
                "203.0.113.255",
                "203.0.113.10",
                "203.0.113.20",
            ),
            "network or broadcast",
        ),
        (
            pool("203.0.113.0/24", "gw", "203.0.113.10", "203.0.113.20"),
            "gateway \"gw\" is not an IPv4 address",
        ),
    ];
    for (p, want) in bad {
        let e = s.set_address_pool(&p).await.expect_err(want);
        assert!(e.to_string().contains(want), "{p:?}: {e}");
    }
    assert!(s.address_pool().await.expect("still none").is_none());
    let p = s
        .set_address_pool(&pool(
            "203.0.113.0/24",
            "203.0.113.1",
            "203.0.113.10",
            "203.0.113.12",
        ))
        .await
        .expect("set");
    assert_eq!(s.address_pool().await.expect("get"), Some(p.clone()));
    let u = s.address_pool_usage().await.expect("usage").expect("pool");
    assert_eq!((u.size, u.used), (3, 0));

    // Lowest free first; a tiny pool runs out; a release makes room and the id is new.
    let alice = member(&s, "team-a").await;
    let a1 = s.allocate_address(&alice).await.expect("1");
    let a2 = s.allocate_address(&alice).await.expect("2");
    let a3 = s.allocate_address(&admin).await.expect("3");
    assert_eq!(
        [&a1, &a2, &a3].map(|a| a.public_ip.as_str()),
        ["203.0.113.10", "203.0.113.11", "203.0.113.12"]
    );
    assert!(a1.id.starts_with("eipalloc-"));
    let e = s.allocate_address(&alice).await.expect_err("exhausted");
    assert!(
        e.to_string().contains("no free address (3 allocated)"),
        "{e}"
    );
    assert_eq!(s.addresses(&alice).await.expect("list").len(), 2);
    assert_eq!(
        s.address_pool_usage().await.expect("u").map(|u| u.used),
        Some(3)
    );
    s.release_address(&alice, "203.0.113.10")
        .await
        .expect("release by ip");
    let a4 = s.allocate_address(&alice).await.expect("again");
    assert_eq!(a4.public_ip, "203.0.113.10");
    assert_ne!(a4.id, a1.id);
    assert!(matches!(
        s.release_address(&alice, &a1.id).await,
        Err(StoreError::NotFound { .. })
    ));
    // Replacing the pool may not strand allocated addresses.
    let e = s
        .set_address_pool(&pool(
            "203.0.113.0/24",
            "203.0.113.1",
            "203.0.113.11",
            "203.0.113.50",
        ))
        .await
        .expect_err("strands .10");
    assert!(
        e.to_string().contains("203.0.113.10 would fall outside"),
        "{e}"
    );
    assert_eq!(s.address_pool().await.expect("get"), Some(p));
    let wider = s
        .set_address_pool(&pool(
            "203.0.113.0/24",
            "203.0.113.1",
            "203.0.113.10",
            "203.0.113.50",
        ))
        .await
        .expect("wider");
    assert_eq!(wider.last, "203.0.113.50");
    assert_eq!(
        s.allocate_address(&alice).await.expect("more").public_ip,
        "203.0.113.13"
    );
}

#[tokio::test]
async fn addresses_associate_within_their_project() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    s.register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin).await;
    s.set_address_pool(&pool(
        "198.51.100.0/24",
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.254",
    ))
    .await
    .expect("pool");
    let alice = member(&s, "team-a").await;
    let bob = member(&s, "team-b").await;
    let an = s.default_network(&alice, "default").await.expect("a net");
    let bn = s.default_network(&bob, "default").await.expect("b net");
    let web = vm(&s, &alice, "web", &img.id, &an.id).await.expect("web");
    let db = vm(&s, &alice, "db", &img.id, &an.id).await.expect("db");
    let theirs = vm(&s, &bob, "web", &img.id, &bn.id).await.expect("bob's");
    let a = s.allocate_address(&alice).await.expect("a");
    let b2 = s.allocate_address(&alice).await.expect("b");
    let bobs = s.allocate_address(&bob).await.expect("bob's address");

    // Another project's address or instance is not found: nothing is revealed or changed.
    for (key, inst) in [(&bobs.id, "web"), (&a.id, theirs.id.as_str())] {
        let e = s
            .associate_address(&alice, key, inst, false)
            .await
            .expect_err("other project");
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    }
    assert!(matches!(
        s.release_address(&alice, &bobs.public_ip).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.disassociate_address(&alice, &bobs.id).await,
        Err(StoreError::NotFound { .. })
    ));
    // An administrator sees both, but cannot cross projects either.
    let e = s
        .associate_address(&admin, &bobs.id, &web.id, false)
        .await
        .expect_err("cross project");
    assert!(e.to_string().contains("different projects"), "{e}");
    assert!(s
        .address(&bob, &bobs.id)
        .await
        .expect("b")
        .instance_id
        .is_none());

    let x = s
        .associate_address(&alice, &a.public_ip, "web", false)
        .await
        .expect("associate");
    assert_eq!(x.instance_id.as_deref(), Some(web.id.as_str()));
    assert_eq!(x.private_ip.as_deref(), Some(web.private_ip.as_str()));
    let assoc = x.association_id.clone().expect("association");
    assert!(assoc.starts_with("eipassoc-"));
    assert_eq!(s.address(&alice, &assoc).await.expect("by assoc").id, a.id);
    assert_eq!(
        s.instance(&alice, "web")
            .await
            .expect("row")
            .public_ip
            .as_deref(),
        Some(a.public_ip.as_str())
    );
    // Associating again is a no-op; with another instance it needs allow_reassociation.
    assert_eq!(
        s.associate_address(&alice, &a.id, &web.id, false)
            .await
            .expect("same"),
        x
    );
    let e = s
        .associate_address(&alice, &a.id, "db", false)
        .await
        .expect_err("already associated");
    assert!(
        e.to_string().contains("already associated with instance"),
        "{e}"
    );
    assert_eq!(s.address(&alice, &a.id).await.expect("a"), x);
    let moved = s
        .associate_address(&alice, &a.id, "db", true)
        .await
        .expect("reassociate");
    assert_eq!(moved.instance_id.as_deref(), Some(db.id.as_str()));
    assert_ne!(moved.association_id.as_deref(), Some(assoc.as_str()));
    assert!(s
        .instance(&alice, "web")
        .await
        .expect("web")
        .public_ip
        .is_none());
    // An instance takes one address: the one it had is disassociated.
    s.associate_address(&alice, &b2.id, "db", false)
        .await
        .expect("second address");
    assert!(s
        .address(&alice, &a.id)
        .await
        .expect("a")
        .instance_id
        .is_none());
    let ips = s
        .instance_public_ips(&[db.id.clone(), web.id.clone(), "i-nope".into()])
        .await
        .expect("ips");
    assert_eq!(ips, vec![(db.id.clone(), b2.public_ip.clone())]);
    // Release is refused while associated.
    let e = s.release_address(&alice, &b2.id).await.expect_err("in use");
    assert!(e.to_string().contains("disassociate it first"), "{e}");
    assert!(s.address(&alice, &b2.id).await.is_ok());
    // Terminating disassociates; the allocation stays with the project.
    terminate(&s, &alice, &db.id).await;
    let kept = s.address(&alice, &b2.id).await.expect("kept");
    assert_eq!((kept.instance_id, kept.association_id), (None, None));
    assert!(s
        .instance_public_ips(std::slice::from_ref(&db.id))
        .await
        .expect("ips")
        .is_empty());
    let e = s
        .associate_address(&alice, &b2.id, &db.id, false)
        .await
        .expect_err("terminated");
    assert!(e.to_string().contains("only live instances"), "{e}");
    s.release_address(&alice, &b2.id).await.expect("release");
    assert_eq!(s.addresses(&alice).await.expect("list").len(), 1);
    // Disassociating an unassociated address changes nothing.
    let d = s.disassociate_address(&alice, &a.id).await.expect("noop");
    assert!(d.instance_id.is_none());
}

/// Networks that existed before migration 0007 get VNIs 1, 2, … in creation order.
#[tokio::test]
async fn migration_gives_existing_networks_a_vni() {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(":memory:")
        .foreign_keys(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .expect("pool");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("migrations")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let run = |p: &std::path::Path| std::fs::read_to_string(p).expect("read migration");
    let version = |p: &std::path::Path| -> u32 {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.get(..4))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for f in files.iter().filter(|f| version(f) < 7) {
        sqlx::raw_sql(&run(f))
            .execute(&pool)
            .await
            .expect("old migration");
    }
    sqlx::raw_sql(
        "INSERT INTO projects (id, name, created_at) VALUES ('p1', 'admin', '2024-01-01T00:00:00.000Z');
         INSERT INTO networks (id, project_id, name, cidr, gateway, created_at) VALUES
           ('vpc-b', 'p1', 'second', '10.2.0.0/24', '10.2.0.1', '2024-01-02T00:00:00.000Z'),
           ('vpc-a', 'p1', 'default', '10.1.0.0/24', '10.1.0.1', '2024-01-01T00:00:00.000Z');",
    )
    .execute(&pool)
    .await
    .expect("old rows");
    let ours = files.iter().find(|f| version(f) == 7).expect("0007");
    sqlx::raw_sql(&run(ours))
        .execute(&pool)
        .await
        .expect("0007");
    let rows: Vec<(String, Option<i64>, String, Option<i64>)> =
        sqlx::query_as("SELECT id, vni, isolation, mtu FROM networks ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        vec![
            ("vpc-a".into(), Some(1), "vxlan".into(), None),
            ("vpc-b".into(), Some(2), "vxlan".into(), None)
        ]
    );
}

mod ipv6;
