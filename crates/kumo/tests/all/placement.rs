//! Placement policies through the API with simulated hosts: spread groups (per host and per
//! storage pool), batches that place all or nothing, per-host overcommit and reserve, and
//! what an instance asked of placement being kept.

use std::collections::HashMap;

use kumo_types::api::{CreateInstance, CreateInstanceBatch, CreatePlacementGroup, UpdateHost};

use crate::common::{Cloud, Hv};

fn code(e: kumo_cli::ClientError) -> (u16, String, String) {
    match e {
        kumo_cli::ClientError::Api {
            status,
            code,
            message,
            ..
        } => (status, code, message),
        other => panic!("expected an API error, got {other}"),
    }
}

fn req(name: &str, img: &str, group: Option<&str>) -> CreateInstance {
    CreateInstance {
        name: name.into(),
        image: img.into(),
        instance_type: Some("t1.nano".into()),
        site: None,
        constraints: vec![],
        placement_group: group.map(String::from),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spread_groups_batches_and_host_policy() {
    let mut cloud = Cloud::controller_only().await;
    // host0 and host1 share the storage pool nfs1; host2 has its own.
    for pool in ["nfs1", "nfs1", ""] {
        let mut args = vec!["--capacity", "4:8192"];
        if !pool.is_empty() {
            args.extend(["--storage-pool", pool]);
        }
        cloud.add_agent_with(Hv::Sim, &args).await;
    }
    let c = cloud.client.clone();
    let img = crate::sim::tiny_image(&cloud, "tiny", true).await;
    let hosts: HashMap<String, String> = c
        .hosts()
        .await
        .expect("hosts")
        .into_iter()
        .map(|h| (h.id, h.name))
        .collect();

    // A spread group of at most 2 per host: six members land two on each host.
    let g = c
        .create_placement_group(&CreatePlacementGroup {
            name: "web".into(),
            strategy: None,
            max_per_host: Some(2),
            spread_storage: false,
        })
        .await
        .expect("group");
    assert_eq!((g.strategy.as_str(), g.max_per_host), ("spread", 2));
    let mut per_host: HashMap<String, u32> = HashMap::new();
    let mut members = vec![];
    for n in 0..6 {
        let i = c
            .create_instance(&req(&format!("web{n}"), &img, Some("web")), None)
            .await
            .expect("member");
        assert_eq!(i.placement_group_id.as_deref(), Some(g.id.as_str()));
        *per_host
            .entry(hosts[&i.host_id.clone().expect("placed")].clone())
            .or_default() += 1;
        members.push(i.id);
    }
    assert_eq!(per_host.len(), 3, "{per_host:?}");
    assert!(per_host.values().all(|&n| n == 2), "{per_host:?}");
    // A seventh does not fit anywhere; the error says why per host and nothing is reserved.
    let before = c.capacity().await.expect("cap");
    let (status, code7, msg) = code(
        c.create_instance(&req("web6", &img, Some("web")), None)
            .await
            .expect_err("full group"),
    );
    assert_eq!((status, code7.as_str()), (503, "InsufficientCapacity"));
    assert!(
        msg.contains("holds 2 member(s) of spread group web (at most 2 per host)"),
        "{msg}"
    );
    let after = c.capacity().await.expect("cap");
    let used = |r: &kumo_types::api::CapacityReport| -> u64 {
        r.hosts.iter().map(|h| h.used_memory_mib).sum()
    };
    assert_eq!(used(&before), used(&after));
    // explain-placement shows the group rule for every host.
    let v = c
        .explain_placement("t1.nano", None, &[], Some("web"))
        .await
        .expect("explain");
    assert!(v.iter().all(|h| h.refused.is_some()), "{v:?}");
    // A group in use cannot be deleted; unknown groups are refused at create.
    let (s, code_del, _) = code(c.delete_placement_group("web").await.expect_err("in use"));
    assert_eq!((s, code_del.as_str()), (409, "IncorrectState"));
    let (s, code_unknown, _) = code(
        c.create_instance(&req("x", &img, Some("nope")), None)
            .await
            .expect_err("unknown group"),
    );
    assert_eq!((s, code_unknown.as_str()), (400, "InvalidParameter"));
    for bad in [0, 101] {
        let e = c
            .create_placement_group(&CreatePlacementGroup {
                name: format!("bad{bad}"),
                strategy: None,
                max_per_host: Some(bad),
                spread_storage: false,
            })
            .await
            .expect_err("bad max");
        assert_eq!(code(e).0, 400);
    }
    for id in &members {
        c.terminate(id).await.expect("terminate");
    }
    // Once its members are gone, the group can be deleted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match c.delete_placement_group("web").await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "group never freed: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    assert!(c
        .placement_groups()
        .await
        .expect("groups")
        .iter()
        .all(|g| g.name != "web"));

    // Storage spread: host0 and host1 share nfs1, so a strict group with spread_storage
    // fits only two members (one on nfs1, one on host2's own pool).
    c.create_placement_group(&CreatePlacementGroup {
        name: "db".into(),
        strategy: Some("spread".into()),
        max_per_host: Some(1),
        spread_storage: true,
    })
    .await
    .expect("db group");
    let a = c
        .create_instance(&req("db0", &img, Some("db")), None)
        .await
        .expect("db0");
    let b = c
        .create_instance(&req("db1", &img, Some("db")), None)
        .await
        .expect("db1");
    let pools: Vec<&str> = [&a, &b]
        .iter()
        .map(|i| {
            let h = &hosts[i.host_id.as_deref().expect("placed")];
            if h == "host2" {
                "own"
            } else {
                "nfs1"
            }
        })
        .collect();
    assert!(
        pools.contains(&"own") && pools.contains(&"nfs1"),
        "{pools:?}"
    );
    let (_, _, msg) = code(
        c.create_instance(&req("db2", &img, Some("db")), None)
            .await
            .expect_err("pools used up"),
    );
    assert!(msg.contains("storage pool nfs1 holds 1 member(s)"), "{msg}");

    // A batch is all or nothing: 100 t1.xlarge (4 GiB) cannot fit, none is created.
    let n_before = c.instances().await.expect("list").len();
    let big = CreateInstance {
        instance_type: Some("t1.xlarge".into()),
        ..req("big", &img, None)
    };
    let e = c
        .create_instance_batch(
            &CreateInstanceBatch {
                template: big.clone(),
                count: 100,
                min_count: None,
            },
            None,
        )
        .await
        .expect_err("too many");
    assert_eq!(code(e).0, 503);
    assert_eq!(c.instances().await.expect("list").len(), n_before);
    // With a minimum, as many as fit: each host has 8192 - 512 MiB, minus what runs.
    let made = c
        .create_instance_batch(
            &CreateInstanceBatch {
                template: big,
                count: 10,
                min_count: Some(1),
            },
            None,
        )
        .await
        .expect("some fit");
    assert!((1..10).contains(&made.len()), "{}", made.len());
    assert_eq!(made[0].name, "big-0");
    let cap = c.capacity().await.expect("cap");
    assert!(cap.hosts.iter().all(|h| h.used_memory_mib <= h.memory_mib));
    let e = c
        .create_instance_batch(
            &CreateInstanceBatch {
                template: req("many", &img, None),
                count: 1001,
                min_count: None,
            },
            None,
        )
        .await
        .expect_err("over the batch limit");
    assert_eq!(code(e).0, 400);

    // Per-host policy: reserve most of host2's memory; capacity and placement follow.
    let h2 = c
        .update_host(
            "host2",
            &UpdateHost {
                reserved_memory_mib: Some(8000),
                cpu_overcommit: Some(16.0),
                memory_overcommit: None,
            },
        )
        .await
        .expect("set");
    assert_eq!(h2.reserved_memory_mib, Some(8000));
    assert_eq!(h2.cpu_overcommit, Some(16.0));
    let row = c
        .capacity()
        .await
        .expect("cap")
        .hosts
        .into_iter()
        .find(|h| h.name == "host2")
        .expect("row");
    assert_eq!(
        (row.memory_mib, row.vcpus, row.reserved_memory_mib),
        (192, 64, 8000)
    );
    let v = c
        .explain_placement("t1.small", None, &[], None)
        .await
        .expect("explain");
    let why = v
        .iter()
        .find(|h| h.host_name == "host2")
        .and_then(|h| h.refused.clone())
        .unwrap_or_default();
    assert!(
        why.contains("needs 512 MiB, host has 192 MiB in all"),
        "{why}"
    );
    for bad in [
        UpdateHost {
            cpu_overcommit: Some(0.0),
            ..UpdateHost::default()
        },
        UpdateHost {
            memory_overcommit: Some(10.0),
            ..UpdateHost::default()
        },
        UpdateHost {
            reserved_memory_mib: Some(8192),
            ..UpdateHost::default()
        },
        UpdateHost::default(),
    ] {
        let e = c.update_host("host2", &bad).await.expect_err("bad policy");
        assert_eq!(code(e).0, 400);
    }
    // Unchanged by the refused updates.
    assert_eq!(
        c.host("host2").await.expect("h").reserved_memory_mib,
        Some(8000)
    );

    // What an instance asked of placement is kept.
    let kept = c
        .create_instance(
            &CreateInstance {
                site: Some("site1".into()),
                constraints: vec!["role!=personal".into()],
                ..req("kept", &img, None)
            },
            None,
        )
        .await
        .expect("kept");
    let again = c.instance(&kept.id).await.expect("show");
    assert_eq!(again.requested_site.as_deref(), Some("site1"));
    assert_eq!(again.constraints, ["role!=personal"]);
    let stats = c.placement_stats().await.expect("stats");
    assert!(stats.decisions >= 10, "{stats:?}");
    assert!(
        stats.p50_us > 0.0 && stats.p99_us >= stats.p50_us,
        "{stats:?}"
    );
}
