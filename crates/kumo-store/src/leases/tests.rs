//! Leases and failover against a real (in-memory) store: the two conditional writes exclude
//! each other, usage follows a moved instance, and bad HA settings change nothing.

use chrono::{Duration, Utc};
use kumo_types::agent::HostInfo;
use kumo_types::InstanceState;

use crate::*;

fn info() -> HostInfo {
    HostInfo {
        vcpus: 4,
        memory_mib: 4096,
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

struct World {
    s: Store,
    admin: Scope,
    image: String,
    network: String,
    h1: HostRow,
    h2: HostRow,
}

async fn world() -> World {
    let s = Store::open_memory().await.expect("store");
    let b = s
        .bootstrap("10.9.0.0/24")
        .await
        .expect("bootstrap")
        .expect("first");
    let admin = b.access_key.scope();
    let h1 = s
        .register_host("h1", "http://h1", "site1", &info())
        .await
        .expect("h1");
    let h2 = s
        .register_host("h2", "http://h2", "site1", &info())
        .await
        .expect("h2");
    let img = s
        .create_image(
            &admin,
            &NewImage {
                name: "img".into(),
                kind: "disk".into(),
                public: false,
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
    let network = s.network("default").await.expect("net").id;
    World {
        s,
        admin,
        image: img.id,
        network,
        h1,
        h2,
    }
}

impl World {
    fn new_instance(&self, name: &str, ha: bool, ha_priority: u32) -> NewInstance {
        NewInstance {
            name: name.into(),
            image_id: self.image.clone(),
            instance_type: "t1.small".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 4,
            network_id: self.network.clone(),
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
            ha_priority,
        }
    }

    async fn create(&self, name: &str, ha: bool, prio: u32, host: &str) -> Result<InstanceRow> {
        let host = host.to_string();
        self.s
            .create_instance(&self.admin, &self.new_instance(name, ha, prio), |p, _| {
                index_of(p, &host)
            })
            .await
    }
}

fn index_of(p: &Placement, host: &str) -> std::result::Result<usize, String> {
    p.hosts()
        .iter()
        .position(|h| h.id == host)
        .ok_or_else(|| format!("no host {host}"))
}

async fn used_vcpus(s: &Store, host: &str) -> u32 {
    s.host_usage(host)
        .await
        .expect("usage")
        .map(|u| u.vcpus)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_lease_holds_the_instance_until_it_expires_and_then_it_moves() {
    let w = world().await;
    let i = w.create("web", true, 500, &w.h1.id).await.expect("create");
    let now = Utc::now();
    let granted =
        w.s.grant_leases(&w.h1.id, now + Duration::seconds(6))
            .await
            .expect("grant");
    assert_eq!(granted, vec![i.id.clone()]);
    let lease =
        w.s.instance_lease(&i.id)
            .await
            .expect("lease")
            .expect("row");
    assert_eq!(lease.host_id, w.h1.id);
    // A later grant extends it; an earlier one (a slow PUT answer) never shortens it.
    w.s.record_lease(&i.id, &w.h1.id, now + Duration::seconds(2))
        .await
        .expect("record");
    assert_eq!(
        w.s.host_leases(&w.h1.id).await.expect("leases")[0].expires_at,
        lease.expires_at
    );

    // The host is up: nothing moves, whatever the clocks say.
    let to_h2 = |p: &Placement| index_of(p, &w.h2.id);
    let far = now + Duration::seconds(60);
    let r =
        w.s.fail_over_instance(&i, &w.h1.id, far, far, to_h2)
            .await
            .expect("failover");
    assert!(matches!(r, Failover::Raced), "{r:?}");

    // Down, but the lease is still valid: nothing moves.
    let down =
        w.s.mark_stale_hosts_down(now + Duration::hours(1))
            .await
            .expect("down");
    assert!(down.contains(&w.h1.id));
    let r =
        w.s.fail_over_instance(&i, &w.h1.id, now, far, to_h2)
            .await
            .expect("failover");
    assert!(matches!(r, Failover::Raced), "{r:?}");
    assert_eq!(
        w.s.instance(&w.admin, &i.id).await.expect("row").host_id,
        Some(w.h1.id.clone())
    );

    // Expired: it moves, with a new generation to push and its usage with it.
    assert_eq!(used_vcpus(&w.s, &w.h1.id).await, 1);
    let r =
        w.s.fail_over_instance(&i, &w.h1.id, far, far, to_h2)
            .await
            .expect("failover");
    let Failover::Moved { row, host_id } = r else {
        panic!("not moved: {r:?}")
    };
    assert_eq!(host_id, w.h2.id);
    assert_eq!(row.host_id.as_deref(), Some(w.h2.id.as_str()));
    assert_eq!(row.generation, i.generation + 1);
    assert_eq!(row.observed_generation, 0);
    assert_eq!(row.state, InstanceState::Pending);
    assert_eq!(used_vcpus(&w.s, &w.h1.id).await, 0);
    assert_eq!(used_vcpus(&w.s, &w.h2.id).await, 1);
    assert!(w.s.placement_drift().await.expect("drift").is_empty());

    // The old host never gets a lease for it again; the new one does.
    assert!(w
        .s
        .grant_leases(&w.h1.id, far)
        .await
        .expect("grant")
        .is_empty());
    assert_eq!(
        w.s.grant_leases(&w.h2.id, far).await.expect("grant"),
        vec![i.id.clone()]
    );
    // A second failover from the stale row does nothing.
    let r =
        w.s.fail_over_instance(&i, &w.h1.id, far, far, to_h2)
            .await
            .expect("again");
    assert!(matches!(r, Failover::Raced), "{r:?}");
}

#[tokio::test]
async fn a_host_that_heartbeats_again_keeps_its_instances() {
    let w = world().await;
    let i = w.create("db", true, 500, &w.h1.id).await.expect("create");
    let now = Utc::now();
    w.s.mark_stale_hosts_down(now + Duration::hours(1))
        .await
        .expect("down");
    assert!(w.s.fence_host(&w.h1.id).await.expect("fence"));
    assert!(!w.s.fence_host(&w.h1.id).await.expect("fence twice"));
    // A fenced host that reports again: its heartbeat is newer than any cutoff before it.
    w.s.host_heartbeat(&w.h1.id, "http://h1", &info())
        .await
        .expect("heartbeat");
    let cutoff = now - Duration::seconds(1);
    let r =
        w.s.fail_over_instance(
            &i,
            &w.h1.id,
            Utc::now() + Duration::seconds(60),
            cutoff,
            |p| index_of(p, &w.h2.id),
        )
        .await
        .expect("failover");
    assert!(matches!(r, Failover::Raced), "{r:?}");
    assert!(w.s.unfence_host(&w.h1.id).await.expect("unfence"));
    assert_eq!(w.s.host(&w.h1.id).await.expect("host").state, "up");
    assert!(w.s.placement_drift().await.expect("drift").is_empty());
}

#[tokio::test]
async fn ha_settings_are_checked_and_order_the_candidates() {
    let w = world().await;
    // Out of range at create: refused, nothing created.
    let e = w.create("bad", true, 1001, &w.h1.id).await;
    assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");
    assert!(w
        .s
        .instances(&w.admin, None, None, Some("bad"))
        .await
        .expect("list")
        .0
        .is_empty());
    assert_eq!(used_vcpus(&w.s, &w.h1.id).await, 0);

    let low = w.create("low", true, 10, &w.h1.id).await.expect("low");
    let high = w.create("high", true, 900, &w.h1.id).await.expect("high");
    let off = w.create("off", false, 1000, &w.h1.id).await.expect("off");
    let mid = w.create("mid", false, 500, &w.h2.id).await.expect("mid");
    assert!(!off.ha && off.ha_priority == 1000);

    // Out of range later: refused, nothing changed.
    let e =
        w.s.set_instance_ha(&w.admin, &low.id, Some(false), Some(1001))
            .await;
    assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");
    let again = w.s.instance(&w.admin, &low.id).await.expect("row");
    assert!(again.ha && again.ha_priority == 10);
    let e = w.s.set_instance_ha(&w.admin, &low.id, None, None).await;
    assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");

    let mid =
        w.s.set_instance_ha(&w.admin, &mid.id, Some(true), Some(600))
            .await
            .expect("set");
    assert!(mid.ha && mid.ha_priority == 600);
    assert_eq!(
        mid.generation, 2,
        "turning HA on is pushed (the host enforces the lease)"
    );
    let mid =
        w.s.set_instance_ha(&w.admin, &mid.id, None, Some(700))
            .await
            .expect("set");
    assert_eq!(mid.generation, 2, "a priority alone pushes nothing");

    let hosts = vec![w.h1.id.clone(), w.h2.id.clone()];
    let order: Vec<String> =
        w.s.ha_instances_on(&hosts)
            .await
            .expect("candidates")
            .into_iter()
            .map(|r| r.name)
            .collect();
    assert_eq!(order, ["high", "mid", "low"], "HA only, by priority");
    // A stopped instance is not a candidate.
    w.s.update_instance(&w.admin, &high.id, |r| {
        let mut n = r.clone();
        n.state = InstanceState::Stopped;
        n.desired = "stopped".into();
        Ok(Some(n))
    })
    .await
    .expect("stop");
    let order: Vec<String> =
        w.s.ha_instances_on(&hosts[..1])
            .await
            .expect("candidates")
            .into_iter()
            .map(|r| r.name)
            .collect();
    assert_eq!(order, ["low"]);
    assert_eq!(w.s.host_ids_in_state(&["up"]).await.expect("up"), {
        let mut v = hosts.clone();
        v.sort();
        v
    });
}
