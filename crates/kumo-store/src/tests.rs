use super::*;
use kumo_types::agent::{HostInfo, ObservedPower};
use kumo_types::InstanceState;
use std::collections::HashSet;

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

async fn setup() -> (Store, Bootstrap) {
    let s = Store::open_memory().await.expect("store");
    let b = s
        .bootstrap("10.9.0.0/24")
        .await
        .expect("bootstrap")
        .expect("first");
    (s, b)
}

fn new_instance(name: &str, image: &str, network: &str) -> NewInstance {
    NewInstance {
        name: name.into(),
        image_id: image.into(),
        instance_type: "t1.small".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 4,
        network_id: network.into(),
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
    }
}

/// Create an instance placed on this host.
async fn create_on(
    s: &Store,
    scope: &Scope,
    name: &str,
    image: &str,
    network: &str,
    host: &str,
) -> Result<InstanceRow> {
    s.create_instance(scope, &new_instance(name, image, network), |p, _| {
        on(p, host)
    })
    .await
}

/// Terminate as the controller does, and as if the host reported the VM gone.
async fn terminate_now(s: &Store, scope: &Scope, id: &str) {
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

/// Place on this host.
fn on(p: &Placement, host: &str) -> std::result::Result<usize, String> {
    p.hosts()
        .iter()
        .position(|h| h.id == host)
        .ok_or_else(|| format!("no host {host}"))
}

async fn image(s: &Store, scope: &Scope, name: &str) -> ImageRow {
    let img = s
        .create_image(
            scope,
            &NewImage {
                name: name.into(),
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
    img
}

#[tokio::test]
async fn bootstrap_runs_once() {
    let (s, b) = setup().await;
    assert!(s.bootstrap("10.9.0.0/24").await.expect("again").is_none());
    let k = s
        .access_key(&b.access_key.id)
        .await
        .expect("lookup")
        .expect("key");
    assert_eq!(k.secret, b.access_key.secret);
    assert!(k.scope().admin);
    assert!(s.join_token_valid(&b.join_token).await.expect("tok"));
    assert!(!s.join_token_valid("nope").await.expect("tok"));
}

#[tokio::test]
async fn projects_cannot_see_each_other() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let host = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let p2 = s.create_project("other").await.expect("p2");
    let u2 = s.create_user("bob", &p2, "member").await.expect("u2");
    let k2 = s.create_access_key(&u2).await.expect("k2");
    let bob = k2.scope();
    let img = image(&s, &admin, "img").await;
    let net = s.network("default").await.expect("net");
    let i = create_on(&s, &admin, "vm1", &img.id, &net.id, &host.id)
        .await
        .expect("create");
    assert!(matches!(
        s.instance(&bob, &i.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.instance(&bob, "vm1").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(s
        .instances(&bob, None, None, None)
        .await
        .expect("list")
        .0
        .is_empty());
    assert!(matches!(
        s.image(&bob, &img.id).await,
        Err(StoreError::NotFound { .. })
    ));
    let r = s.update_instance(&bob, &i.id, |_| Ok(None)).await;
    assert!(matches!(r, Err(StoreError::NotFound { .. })));
    assert_eq!(
        s.instances(&admin, None, None, None)
            .await
            .expect("list")
            .0
            .len(),
        1
    );
}

#[tokio::test]
async fn addresses_are_unique_and_released() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let host = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin, "img").await;
    let net = s.network("default").await.expect("net");
    let a = create_on(&s, &admin, "a", &img.id, &net.id, &host.id)
        .await
        .expect("a");
    let c = create_on(&s, &admin, "c", &img.id, &net.id, &host.id)
        .await
        .expect("c");
    assert_ne!(a.private_ip, c.private_ip);
    assert_ne!(a.mac, c.mac);
    assert_eq!(a.private_ip, "10.9.0.10");
    let dup = create_on(&s, &admin, "a", &img.id, &net.id, &host.id).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))));
    // Terminate a: its address becomes free again.
    terminate_now(&s, &admin, &a.id).await;
    let d = create_on(&s, &admin, "d", &img.id, &net.id, &host.id)
        .await
        .expect("d");
    // Round robin: a released address is not handed out again at once (stale ARP caches).
    assert_eq!(d.private_ip, "10.9.0.12");
    // Terminated instance ids stay in the store, so they are never reused.
    assert_eq!(
        s.instance(&admin, &a.id).await.expect("kept").state,
        InstanceState::Terminated
    );
}

#[tokio::test]
async fn no_capacity_reserves_nothing() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let img = image(&s, &admin, "img").await;
    let net = s.network("default").await.expect("net");
    let r = s
        .create_instance(&admin, &new_instance("a", &img.id, &net.id), |_, _| {
            Err("no host".into())
        })
        .await;
    assert!(matches!(r, Err(StoreError::NoCapacity(_))));
    assert!(s
        .instances(&admin, None, None, None)
        .await
        .expect("l")
        .0
        .is_empty());
}

#[tokio::test]
async fn observations_follow_generations() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let host = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin, "img").await;
    let net = s.network("default").await.expect("net");
    let i = create_on(&s, &admin, "a", &img.id, &net.id, &host.id)
        .await
        .expect("a");
    // A report for an older generation changes nothing.
    let old = Observation {
        generation: 0,
        power: ObservedPower::Running,
        error: None,
    };
    assert_eq!(s.apply_observation(&i, &old).await.expect("obs"), None);
    let cur = Observation {
        generation: i.generation,
        power: ObservedPower::Running,
        error: None,
    };
    assert_eq!(
        s.apply_observation(&i, &cur).await.expect("obs"),
        Some(InstanceState::Running)
    );
    let i = s.instance(&admin, &i.id).await.expect("i");
    assert_eq!(i.observed_generation, i.generation);
    // The same report again writes nothing.
    assert_eq!(s.apply_observation(&i, &cur).await.expect("obs"), None);
    assert_eq!(
        s.instance(&admin, &i.id).await.expect("i").updated_at,
        i.updated_at
    );
    assert!(s.instances_to_push(10).await.expect("push").is_empty());
    // The guest powers itself off: the instance becomes stopped, and the new desired state is pushed.
    let off = Observation {
        generation: i.generation,
        power: ObservedPower::Stopped,
        error: None,
    };
    assert_eq!(
        s.apply_observation(&i, &off).await.expect("obs"),
        Some(InstanceState::Stopped)
    );
    let i = s.instance(&admin, &i.id).await.expect("i");
    assert_eq!(i.desired, "stopped");
    assert_eq!(s.instances_to_push(10).await.expect("push").len(), 1);
}

#[tokio::test]
async fn images_in_use_cannot_be_deleted() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let host = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin, "img").await;
    let net = s.network("default").await.expect("net");
    create_on(&s, &admin, "a", &img.id, &net.id, &host.id)
        .await
        .expect("a");
    assert!(matches!(
        s.delete_image(&admin, "img").await,
        Err(StoreError::Conflict(_))
    ));
}

#[tokio::test]
async fn host_states_follow_checked_transitions() {
    let (s, b) = setup().await;
    let h = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    assert_eq!(
        s.set_host_state(&h.id, "draining")
            .await
            .expect("drain")
            .state,
        "draining"
    );
    assert_eq!(
        s.set_host_state("h1", "maintenance")
            .await
            .expect("maint")
            .state,
        "maintenance"
    );
    assert!(matches!(
        s.set_host_state("h1", "draining").await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.set_host_state("h1", "fenced").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.set_host_state("h1", "down").await,
        Err(StoreError::Invalid(_))
    ));
    // A host that dies in maintenance goes down (HA fails it over), and comes back up.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(
        s.mark_stale_hosts_down(later).await.expect("stale"),
        vec![h.id.clone()]
    );
    assert_eq!(s.host("h1").await.expect("h1").state, "down");
    s.host_heartbeat(&h.id, "http://x", &info())
        .await
        .expect("heartbeat");
    assert_eq!(s.host("h1").await.expect("h1").state, "up");
    assert_eq!(s.set_host_state("h1", "up").await.expect("up").state, "up");
    // A revoked join token no longer admits hosts.
    assert!(s.join_token_valid(&b.join_token).await.expect("valid"));
    s.revoke_join_token(&b.join_token).await.expect("revoke");
    assert!(!s.join_token_valid(&b.join_token).await.expect("valid"));
    assert!(matches!(
        s.revoke_join_token(&b.join_token).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.join_tokens().await.expect("list").len(), 1);
}

#[tokio::test]
async fn host_labels_are_checked_and_kept() {
    let (s, _) = setup().await;
    let mut i = info();
    i.labels.insert("role".into(), "spare".into());
    let h = s
        .register_host("h1", "http://x", "site1", &i)
        .await
        .expect("host");
    assert_eq!(h.labels.get("role").map(String::as_str), Some("spare"));
    let mut bad = info();
    bad.labels.insert("role".into(), "Spare Host!".into());
    assert!(matches!(
        s.register_host("h2", "http://x", "site1", &bad).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(
        s.hosts()
            .await
            .expect("hosts")
            .iter()
            .all(|h| h.name != "h2"),
        "nothing is created"
    );
    i.labels.insert("rack".into(), "a".into());
    s.host_heartbeat(&h.id, "http://x", &i).await.expect("beat");
    assert_eq!(s.host("h1").await.expect("h1").labels.len(), 2);
}

#[tokio::test]
async fn idempotency_keys_are_claimed_once() {
    let (s, b) = setup().await;
    let u = &b.user_id;
    assert_eq!(
        s.claim_idempotency(u, "k", "h1").await.expect("claim"),
        IdempotencyClaim::Claimed
    );
    // A second request while the first runs: refused, whatever its body.
    assert_eq!(
        s.claim_idempotency(u, "k", "h1").await.expect("claim"),
        IdempotencyClaim::InProgress
    );
    let done = IdempotentResponse {
        request_hash: "h1".into(),
        status: 201,
        body: "{}".into(),
    };
    s.finish_idempotency(u, "k", &done).await.expect("finish");
    assert_eq!(
        s.claim_idempotency(u, "k", "h1").await.expect("claim"),
        IdempotencyClaim::Done(done)
    );
    // A released claim (server error) lets a retry run.
    assert_eq!(
        s.claim_idempotency(u, "k2", "h").await.expect("claim"),
        IdempotencyClaim::Claimed
    );
    s.release_idempotency(u, "k2").await.expect("release");
    assert_eq!(
        s.claim_idempotency(u, "k2", "h").await.expect("claim"),
        IdempotencyClaim::Claimed
    );
    // Another user's key of the same name is separate.
    assert_eq!(
        s.claim_idempotency("someone-else", "k", "h9")
            .await
            .expect("claim"),
        IdempotencyClaim::Claimed
    );
}

#[tokio::test]
async fn a_full_network_refuses_and_a_release_makes_room() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    let host = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin, "img").await;
    // A /28 has .10 to .14 for instances.
    let net = s
        .create_network(&admin.project_id, "small", "10.8.0.0/28")
        .await
        .expect("net");
    let mut ids = vec![];
    for n in 0..5 {
        let i = s
            .create_instance(
                &admin,
                &new_instance(&format!("v{n}"), &img.id, &net.id),
                |p, _| on(p, &host.id),
            )
            .await
            .expect("fits");
        ids.push(i);
    }
    let full = create_on(&s, &admin, "v5", &img.id, &net.id, &host.id).await;
    assert!(
        matches!(&full, Err(StoreError::NoCapacity(m)) if m.contains("no free address")),
        "{full:?}"
    );
    // Nothing was reserved by the refused create.
    let h = s
        .placement()
        .await
        .expect("p")
        .host(&host.id)
        .cloned()
        .expect("h");
    assert_eq!((h.instances, h.used_memory_mib), (5, 5 * 512));
    let victim = &ids[2];
    terminate_now(&s, &admin, &victim.id).await;
    let again = create_on(&s, &admin, "v5", &img.id, &net.id, &host.id)
        .await
        .expect("room again");
    assert_eq!(again.private_ip, victim.private_ip);
    assert!(s.placement_drift().await.expect("drift").is_empty());
}

#[tokio::test]
async fn a_batch_places_as_many_as_fit_or_none() {
    let (s, b) = setup().await;
    let admin = b.access_key.scope();
    // 4096 MiB - 512 reserved: room for seven 512 MiB instances.
    let host = s
        .register_host("h1", "http://x", "site1", &info())
        .await
        .expect("host");
    let img = image(&s, &admin, "img").await;
    let net = s.network("default").await.expect("net");
    let batch: Vec<NewInstance> = (0..10)
        .map(|n| new_instance(&format!("b{n}"), &img.id, &net.id))
        .collect();
    let place = |p: &Placement, n: &NewInstance| {
        let h = p.host(&host.id).ok_or("gone")?;
        if h.used_memory_mib + n.memory_mib > 3584 {
            return Err("full".to_string());
        }
        on(p, &host.id)
    };
    // At least 8: impossible, so nothing is created or reserved.
    let r = s.create_instances(&admin, &batch, 8, place).await;
    assert!(matches!(r, Err(StoreError::NoCapacity(_))), "{r:?}");
    assert_eq!(
        s.instances(&admin, None, None, None)
            .await
            .expect("l")
            .0
            .len(),
        0
    );
    assert!(s.placement_drift().await.expect("drift").is_empty());
    let rows = s
        .create_instances(&admin, &batch, 5, place)
        .await
        .expect("some");
    assert_eq!(rows.len(), 7);
    let ips: HashSet<&str> = rows.iter().map(|r| r.private_ip.as_str()).collect();
    assert_eq!(ips.len(), 7);
    assert!(s.placement_drift().await.expect("drift").is_empty());
    // Names given twice in one batch are refused up front.
    let twice = vec![
        new_instance("x", &img.id, &net.id),
        new_instance("x", &img.id, &net.id),
    ];
    assert!(matches!(
        s.create_instances(&admin, &twice, 1, place).await,
        Err(StoreError::Invalid(_))
    ));
}
