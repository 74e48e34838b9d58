//! The HA monitor against an in-memory store: it waits for leases to expire, restarts HA
//! instances highest priority first on hosts of the same shared pool, leaves the others where
//! they are with a reason, fences the host once, and journals each thing once.

use std::time::Duration;

use kumo_store::{NewImage, NewInstance, Placement, Scope, Store};
use kumo_types::agent::HostInfo;
use kumo_types::storage::PoolReport;

use super::{HaMemory, LEASE_MARGIN};
use crate::{Config, Controller};

fn info(pool: &str, kind: &str) -> HostInfo {
    HostInfo {
        vcpus: 4,
        memory_mib: 4096,
        hypervisor: "qemu".into(),
        accel: "tcg".into(),
        qemu_version: "7.2".into(),
        labels: Default::default(),
        storage_pool: if kind == "shared" {
            pool.into()
        } else {
            String::new()
        },
        disk_gib: 0,
        tunnel_ip: String::new(),
        pool: Some(PoolReport {
            name: pool.into(),
            kind: kind.into(),
            total_bytes: 100 << 30,
            free_bytes: 100 << 30,
        }),
    }
}

fn new_instance(name: &str, image: &str, net: &str, ha: bool, prio: u32) -> NewInstance {
    NewInstance {
        name: name.into(),
        image_id: image.into(),
        instance_type: "t1.small".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 4,
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
        ha,
        ha_priority: prio,
    }
}

fn on(p: &Placement, host: &str) -> Result<usize, String> {
    p.hosts()
        .iter()
        .position(|h| h.id == host)
        .ok_or_else(|| format!("no host {host}"))
}

async fn events(s: &Store, action: &str) -> Vec<(String, String, String)> {
    let (rows, _) = s
        .events(&Scope::system(), Some(1000), None)
        .await
        .expect("events");
    let mut v: Vec<_> = rows
        .into_iter()
        .filter(|e| e.action == action)
        .map(|e| {
            (
                e.target.unwrap_or_default(),
                e.result,
                e.detail.unwrap_or_default(),
            )
        })
        .collect();
    v.reverse();
    v
}

struct World {
    store: Store,
    ctl: Controller,
    admin: Scope,
    a: kumo_store::HostRow,
    b: kumo_store::HostRow,
    c: kumo_store::HostRow,
    img: String,
    net: String,
    _dir: tempfile::TempDir,
}

/// Hosts a and b share pool `sp`; c has a local pool. Leases end with the heartbeat.
async fn world() -> World {
    let store = Store::open_memory().await.expect("store");
    let boot = store
        .bootstrap("10.9.0.0/24")
        .await
        .expect("bootstrap")
        .expect("first");
    let admin = boot.access_key.scope();
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = Controller::new(
        store.clone(),
        Config {
            image_dir: dir.path().join("images"),
            backup_dir: dir.path().join("backups"),
            heartbeat_timeout: Duration::from_secs(3),
            // Leases end with the heartbeat: only the margin is left to wait.
            lease_ttl: Duration::ZERO,
            policy: Default::default(),
            default_network: "default".into(),
        },
    )
    .expect("controller");
    let a = store
        .register_host("a", "http://a", "site1", &info("sp", "shared"))
        .await
        .expect("a");
    let b = store
        .register_host("b", "http://b", "site1", &info("sp", "shared"))
        .await
        .expect("b");
    // Same cluster, but its own local pool: it cannot open the failed host's disks.
    let c = store
        .register_host("c", "http://c", "site1", &info("local", "dir"))
        .await
        .expect("c");
    let img = store
        .create_image(
            &admin,
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
    store
        .finish_image(&img.id, "qcow2", 1 << 20, 1 << 20, "00")
        .await
        .expect("finish");
    let net = store.network("default").await.expect("net").id;
    World {
        store,
        ctl,
        admin,
        a,
        b,
        c,
        img: img.id,
        net,
        _dir: dir,
    }
}

impl World {
    async fn create_on(&self, name: &str, ha: bool, prio: u32, host: &str) -> String {
        let host = host.to_string();
        self.store
            .create_instance(
                &self.admin,
                &new_instance(name, &self.img, &self.net, ha, prio),
                |p, _| on(p, &host),
            )
            .await
            .expect("create")
            .id
    }

    /// Only `silent` stops reporting; it is marked down.
    async fn silence(&self, silent: &kumo_store::HostRow) {
        self.store
            .grant_leases(&silent.id, chrono::Utc::now())
            .await
            .expect("grant");
        tokio::time::sleep(Duration::from_millis(300)).await;
        for h in [&self.a, &self.b, &self.c] {
            if h.id != silent.id {
                let i = if h.name == "c" {
                    info("local", "dir")
                } else {
                    info("sp", "shared")
                };
                self.store
                    .host_heartbeat(&h.id, &h.address, &i)
                    .await
                    .expect("heartbeat");
            }
        }
        let down = self
            .store
            .mark_stale_hosts_down(chrono::Utc::now() - chrono::Duration::milliseconds(200))
            .await
            .expect("down");
        assert_eq!(down, vec![silent.id.clone()]);
    }
}

#[tokio::test]
async fn a_failed_host_s_ha_instances_restart_elsewhere_by_priority() {
    let w = world().await;
    let (store, ctl, admin, a, b) = (&w.store, &w.ctl, &w.admin, &w.a, &w.b);
    let mut ids = std::collections::HashMap::new();
    for (name, ha, prio) in [
        ("lo", true, 100),
        ("hi", true, 900),
        ("off", false, 1000),
        ("idle", true, 1000),
    ] {
        ids.insert(name, w.create_on(name, ha, prio, &a.id).await);
    }
    ctl.stop_instance(admin, &ids["idle"]).await.expect("stop");

    // Host a goes silent; b and c keep reporting.
    let mut memory = HaMemory::default();
    w.silence(a).await;
    // Down, but its leases are not provably over yet: nothing happens.
    let pass = ctl.ha_once(&mut memory).await.expect("pass");
    assert_eq!(pass, Default::default());
    assert_eq!(store.host(&a.id).await.expect("a").state, "down");

    tokio::time::sleep(LEASE_MARGIN + Duration::from_millis(200)).await;
    let pass = ctl.ha_once(&mut memory).await.expect("pass");
    let moved: Vec<(&str, &str)> = pass
        .moved
        .iter()
        .map(|(i, _, to)| (i.as_str(), to.as_str()))
        .collect();
    assert_eq!(
        moved,
        vec![
            (ids["hi"].as_str(), b.id.as_str()),
            (ids["lo"].as_str(), b.id.as_str())
        ],
        "HA instances, highest priority first, to the host of the same shared pool"
    );
    let mut skipped: Vec<String> = pass.skipped.iter().map(|s| s.0.clone()).collect();
    skipped.sort();
    let mut want = vec![ids["off"].clone(), ids["idle"].clone()];
    want.sort();
    assert_eq!(skipped, want, "{:?}", pass.skipped);
    assert_eq!(pass.fenced, vec![a.id.clone()]);
    assert_eq!(store.host(&a.id).await.expect("a").state, "fenced");
    for name in ["hi", "lo"] {
        let r = store.instance(admin, &ids[name]).await.expect("row");
        assert_eq!(r.host_id.as_deref(), Some(b.id.as_str()), "{name}");
        assert!(
            r.generation > r.observed_generation,
            "{name} is to be pushed"
        );
    }
    for name in ["off", "idle"] {
        let r = store.instance(admin, &ids[name]).await.expect("row");
        assert_eq!(r.host_id.as_deref(), Some(a.id.as_str()), "{name} stays");
    }
    assert!(store.placement_drift().await.expect("drift").is_empty());

    // The journal: two failovers in priority order with timings, two skips with reasons, one
    // fencing; a second pass adds nothing.
    let again = ctl.ha_once(&mut memory).await.expect("pass");
    assert_eq!(again, Default::default());
    let fo = events(store, "instance.failover").await;
    let oks: Vec<&str> = fo
        .iter()
        .filter(|e| e.1 == "ok")
        .map(|e| e.0.as_str())
        .collect();
    assert_eq!(oks, vec![ids["hi"].as_str(), ids["lo"].as_str()]);
    assert!(
        fo.iter()
            .filter(|e| e.1 == "ok")
            .all(|e| e.2.contains("after the host's last heartbeat")),
        "{fo:?}"
    );
    let off = fo.iter().find(|e| e.0 == ids["off"]).expect("off reported");
    assert_eq!(off.1, "skipped");
    assert!(off.2.contains("HA is off"), "{off:?}");
    assert_eq!(fo.len(), 4, "{fo:?}");
    let fenced = events(store, "host.fenced").await;
    assert_eq!(fenced.len(), 1);
    assert!(fenced[0].2.contains("leases expired at"), "{fenced:?}");

    // The fenced host reports again: it comes back up.
    store.unfence_host(&a.id).await.expect("unfence");
    assert_eq!(store.host(&a.id).await.expect("a").state, "up");
}

#[tokio::test]
async fn a_host_with_nothing_to_take_over_stays_down() {
    let w = world().await;
    let solo = w.create_on("solo", false, 500, &w.c.id).await;
    let mut memory = HaMemory::default();
    w.silence(&w.c).await;
    tokio::time::sleep(LEASE_MARGIN + Duration::from_millis(200)).await;
    let pass = w.ctl.ha_once(&mut memory).await.expect("pass");
    assert!(pass.moved.is_empty() && pass.fenced.is_empty(), "{pass:?}");
    assert_eq!(pass.skipped.len(), 1, "{pass:?}");
    assert_eq!(pass.skipped[0].0, solo);
    assert_eq!(w.store.host(&w.c.id).await.expect("c").state, "down");
    // Reported once, however long it stays down.
    let again = w.ctl.ha_once(&mut memory).await.expect("pass");
    assert_eq!(again, Default::default());

    // HA on a local pool: it stays too, with the reason.
    let on = w
        .store
        .set_instance_ha(&w.admin, &solo, Some(true), None)
        .await
        .expect("ha on");
    assert!(on.ha);
    let mut fresh = HaMemory::default();
    let pass = w.ctl.ha_once(&mut fresh).await.expect("pass");
    assert!(pass.moved.is_empty(), "{pass:?}");
    assert!(
        pass.skipped
            .iter()
            .any(|(i, why)| i == &solo && why.contains("local pool")),
        "{pass:?}"
    );
}
