//! Filters, weighers and explanations.

use super::*;

fn pick(hosts: &[HostView], r: &Request, p: &Policy) -> Result<String, String> {
    choose(hosts, r, p).map(|i| hosts[i].id.clone())
}

fn host(name: &str, vcpus: u32, mem: u64, used_mem: u64) -> HostView {
    HostView {
        id: format!("host-{name}"),
        name: name.into(),
        site: "s1".into(),
        state: "up".into(),
        vcpus,
        memory_mib: mem,
        used_memory_mib: used_mem,
        ..HostView::default()
    }
}

fn req(vcpus: u32, mem: u64) -> Request {
    Request {
        vcpus,
        memory_mib: mem,
        ..Request::default()
    }
}

fn labelled(name: &str, role: &str) -> HostView {
    let mut h = host(name, 2, 4096, 0);
    h.labels.insert("role".into(), role.into());
    h
}

#[test]
fn roles_and_spares() {
    let hosts = [
        labelled("core1", "core"),
        labelled("pers1", "personal"),
        labelled("spare1", "spare"),
    ];
    let p = Policy::default();
    let core = Request {
        constraints: parse_constraints(&["role=core".into()]).unwrap_or_default(),
        ..req(1, 128)
    };
    assert_eq!(pick(&hosts, &core, &p), Ok("host-core1".into()));
    let not_personal = Request {
        constraints: parse_constraints(&["role!=personal".into()]).unwrap_or_default(),
        ..req(1, 128)
    };
    let v = explain(&hosts, &not_personal, &p);
    assert_eq!(v[1].refused.as_deref(), Some("avoids role=personal"));
    assert_eq!(
        v[2].refused.as_deref(),
        Some("spare host: kept free for failover and evacuation")
    );
    // Failover may use the spare.
    let failover = Request {
        allow_spare: true,
        constraints: parse_constraints(&["role=spare".into()]).unwrap_or_default(),
        ..req(1, 128)
    };
    assert_eq!(pick(&hosts, &failover, &p), Ok("host-spare1".into()));
    let err = pick(
        &hosts,
        &Request {
            constraints: parse_constraints(&["rack=a".into()]).unwrap_or_default(),
            ..req(1, 128)
        },
        &p,
    )
    .unwrap_err();
    assert!(
        err.contains("needs rack=a, host has no rack label"),
        "{err}"
    );
}

#[test]
fn constraints_are_checked() {
    assert!(parse_constraints(&["role=core".into(), "rack!=b".into()]).is_ok());
    for bad in [
        vec!["role"],
        vec!["Role=core"],
        vec!["role=co re"],
        vec!["role=core", "role!=core"],
        vec!["role=core", "role=personal"],
        vec!["=x"],
    ] {
        let bad: Vec<String> = bad.into_iter().map(String::from).collect();
        assert!(parse_constraints(&bad).is_err(), "{bad:?}");
    }
    assert!(valid_label_part("spare") && !valid_label_part("sp are") && !valid_label_part("-x"));
}

#[test]
fn picks_the_emptiest_host() {
    let hosts = [host("a", 2, 4096, 2048), host("b", 2, 4096, 0)];
    assert_eq!(
        pick(&hosts, &req(1, 512), &Policy::default()),
        Ok("host-b".into())
    );
}

#[test]
fn refusals_name_every_reason() {
    let mut down = host("c", 2, 8192, 0);
    down.state = "down".into();
    let hosts = [host("a", 2, 4096, 3500), down];
    let err = pick(&hosts, &req(1, 1024), &Policy::default()).unwrap_err();
    assert!(
        err.contains("a: needs 1024 MiB, 84 of 3584 MiB free"),
        "{err}"
    );
    assert!(err.contains("c: host is down"), "{err}");
    let err = pick(&hosts, &req(64, 128), &Policy::default()).unwrap_err();
    assert!(
        err.contains("needs 64 vCPUs, host has 8 vCPUs in all"),
        "{err}"
    );
}

#[test]
fn site_is_a_filter() {
    let hosts = [host("a", 2, 4096, 0)];
    let r = Request {
        site: Some("s2".into()),
        ..req(1, 128)
    };
    let err = pick(&hosts, &r, &Policy::default()).unwrap_err();
    assert!(err.contains("site s1, not s2"));
}

#[test]
fn n_plus_one_moves_the_largest_hosts_load() {
    let big = HostView {
        used_memory_mib: 3000,
        ..host("big", 2, 8192, 0)
    };
    let small = host("small", 2, 4096, 0);
    let load = |id: &str| {
        if id == "host-big" {
            vec![(1, 2000), (1, 1000)]
        } else {
            vec![]
        }
    };
    let r = n_plus_one(&[big.clone(), small.clone()], load, &Policy::default());
    assert!(r.ok, "{r:?}");
    assert_eq!(r.largest_host.as_deref(), Some("big"));
    // Too much to move: 3 GiB + 2 GiB do not both fit in 3.5 GiB.
    let heavy = |id: &str| {
        if id == "host-big" {
            vec![(1, 3072), (1, 2048)]
        } else {
            vec![]
        }
    };
    let r = n_plus_one(&[big, small], heavy, &Policy::default());
    assert!(!r.ok);
    assert_eq!(r.stranded, vec![(1, 2048)]);
}

#[test]
fn no_hosts_says_what_to_do() {
    assert!(pick(&[], &req(1, 1), &Policy::default())
        .unwrap_err()
        .contains("no hosts"));
}

fn group(name: &str, max: u32, storage: bool, hosts: &[HostView], members: &[&str]) -> GroupView {
    let mut g = GroupView {
        name: name.into(),
        max_per_host: max,
        spread_storage: storage,
        ..GroupView::default()
    };
    for m in members {
        *g.per_host.entry(format!("host-{m}")).or_default() += 1;
        let h = hosts.iter().find(|h| h.name == *m).map(HostView::pool_key);
        *g.per_pool.entry(h.unwrap_or_default()).or_default() += 1;
    }
    g
}

#[test]
fn spread_group_fills_hosts_evenly_up_to_its_limit() {
    let hosts = [
        host("a", 8, 65536, 0),
        host("b", 8, 65536, 0),
        host("c", 8, 65536, 0),
    ];
    let p = Policy::default();
    let mut members: Vec<String> = vec![];
    for _ in 0..6 {
        let m: Vec<&str> = members.iter().map(String::as_str).collect();
        let r = Request {
            group: Some(group("web", 2, false, &hosts, &m)),
            ..req(1, 128)
        };
        let id = pick(&hosts, &r, &p).expect("room");
        members.push(id.trim_start_matches("host-").to_string());
    }
    members.sort();
    assert_eq!(members, ["a", "a", "b", "b", "c", "c"]);
    // A seventh member has nowhere to go, and the error says why for every host.
    let m: Vec<&str> = members.iter().map(String::as_str).collect();
    let r = Request {
        group: Some(group("web", 2, false, &hosts, &m)),
        ..req(1, 128)
    };
    let err = pick(&hosts, &r, &p).unwrap_err();
    assert!(
        err.contains("a: holds 2 member(s) of spread group web (at most 2 per host)"),
        "{err}"
    );
}

#[test]
fn spread_group_can_keep_storage_pools_apart() {
    let mut hosts = [
        host("a", 8, 65536, 0),
        host("b", 8, 65536, 0),
        host("c", 8, 65536, 0),
    ];
    hosts[0].storage_pool = "nfs1".into();
    hosts[1].storage_pool = "nfs1".into();
    let p = Policy::default();
    let r = Request {
        group: Some(group("db", 1, true, &hosts, &["a"])),
        ..req(1, 128)
    };
    // b is another host but the same pool as a: only c keeps the copies apart.
    assert_eq!(pick(&hosts, &r, &p), Ok("host-c".into()));
    let v = explain(&hosts, &r, &p);
    assert!(
        v[1].refused
            .as_deref()
            .unwrap_or("")
            .contains("storage pool nfs1"),
        "{v:?}"
    );
    // Without the storage rule, b is fine.
    let r = Request {
        group: Some(group("db", 1, false, &hosts, &["a"])),
        ..req(1, 128)
    };
    assert!(explain(&hosts, &r, &p)[1].refused.is_none());
}

#[test]
fn pack_prefers_the_fullest_host_that_fits() {
    let hosts = [
        host("a", 2, 4096, 2048),
        host("b", 2, 4096, 0),
        host("c", 2, 4096, 3500),
    ];
    let pack = Policy {
        weigher: Weigher::Pack,
        ..Policy::default()
    };
    // c is fullest but has no room for 512 MiB (84 free): a is the fullest that fits.
    assert_eq!(pick(&hosts, &req(1, 512), &pack), Ok("host-a".into()));
    assert_eq!(
        pick(&hosts, &req(1, 512), &Policy::default()),
        Ok("host-b".into())
    );
    assert_eq!("pack".parse::<Weigher>(), Ok(Weigher::Pack));
    assert!("binpack".parse::<Weigher>().is_err());
}

#[test]
fn per_host_overcommit_and_reserve() {
    let mut h = host("a", 2, 4096, 0);
    let p = Policy::default();
    assert_eq!(capacity(&h, &p), (8, 3584, 0));
    h.overrides = HostOverrides {
        cpu_overcommit: Some(1.0),
        memory_overcommit: Some(1.5),
        reserved_memory_mib: Some(1024),
    };
    assert_eq!(capacity(&h, &p), (2, 4608, 0));
    let err = pick(&[h.clone()], &req(3, 128), &p).unwrap_err();
    assert!(
        err.contains("needs 3 vCPUs, host has 2 vCPUs in all"),
        "{err}"
    );
    assert!(pick(&[h], &req(2, 4600), &p).is_ok());
}

#[test]
fn disk_is_checked_when_the_host_reports_it() {
    let mut h = host("a", 2, 4096, 0);
    h.disk_gib = 10;
    h.used_disk_gib = 8;
    let r = Request {
        disk_gib: 4,
        ..req(1, 128)
    };
    let err = pick(&[h.clone()], &r, &Policy::default()).unwrap_err();
    assert!(
        err.contains("needs 4 GiB disk, 2 of 10 GiB disk free"),
        "{err}"
    );
    h.disk_gib = 0;
    assert!(pick(&[h], &r, &Policy::default()).is_ok());
}

#[test]
fn large_clusters_score_a_sample_and_still_find_rare_hosts() {
    let mut hosts: Vec<HostView> = (0..5000)
        .map(|i| host(&format!("h{i:05}"), 4, 8192, 0))
        .collect();
    // Only one host has the label: the walk must not give up before it.
    hosts[4321].labels.insert("gpu".into(), "yes".into());
    let r = Request {
        constraints: parse_constraints(&["gpu=yes".into()]).unwrap_or_default(),
        ..req(1, 128)
    };
    for start in [0, 4322, 4999] {
        assert_eq!(choose_from(&hosts, &r, &Policy::default(), start), Ok(4321));
    }
    // Everyone full: the error groups hosts by reason instead of listing 5,000 lines.
    for h in &mut hosts {
        h.used_memory_mib = 7680;
    }
    let err = choose(&hosts, &req(1, 1024), &Policy::default()).unwrap_err();
    assert!(err.starts_with("5000 hosts (e.g. h"), "{err}");
    assert!(err.len() < 200, "{err}");
}
