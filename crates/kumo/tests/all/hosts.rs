//! Operators' host controls: checked state changes, explain-placement, capacity and N+1,
//! join tokens that can be issued and revoked.

use std::process::Command;
use std::time::{Duration, Instant};

use kumo_types::api::CreateInstance;

use crate::common::{Cloud, Hv, KUMO};

fn code(e: kumo_cli::ClientError) -> (u16, String) {
    match e {
        kumo_cli::ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn host_states_placement_capacity_and_join_tokens() {
    let mut cloud = Cloud::controller_only().await;
    cloud
        .add_agent_with(Hv::Sim, &["--capacity", "2:4096"])
        .await;
    cloud
        .add_agent_with(Hv::Sim, &["--capacity", "2:2048"])
        .await;
    let c = cloud.client.clone();
    let img = crate::sim::tiny_image(&cloud, "tiny", true).await;

    // Both hosts can take a t1.medium (1024 MiB); host0 scores better (more room left).
    let v = c
        .explain_placement("t1.medium", None, &[], None)
        .await
        .expect("explain");
    assert_eq!(v.len(), 2);
    assert!(
        v.iter().all(|h| h.refused.is_none() && h.score.is_some()),
        "{v:?}"
    );
    // A t1.large (2048 MiB) does not fit host1 (1536 MiB for guests): the reason is named.
    let v = c
        .explain_placement("t1.large", None, &[], None)
        .await
        .expect("explain");
    let h1 = v.iter().find(|h| h.host_name == "host1").expect("host1");
    assert!(
        h1.refused
            .as_deref()
            .is_some_and(|r| r.contains("needs 2048 MiB")),
        "{h1:?}"
    );
    assert!(matches!(
        code(
            c.explain_placement("no.such", None, &[], None)
                .await
                .expect_err("bad type")
        ),
        (400, _)
    ));

    // Maintenance keeps new instances away; transitions are checked.
    let h = c
        .set_host_state("host0", "maintenance")
        .await
        .expect("maintenance");
    assert_eq!(h.state, "maintenance");
    assert_eq!(
        code(
            c.set_host_state("host0", "draining")
                .await
                .expect_err("maintenance -> draining")
        ),
        (409, "IncorrectState".into())
    );
    assert_eq!(
        code(
            c.set_host_state("host0", "fenced")
                .await
                .expect_err("operators cannot fence")
        )
        .0,
        400
    );
    let v = c
        .explain_placement("t1.small", None, &[], None)
        .await
        .expect("explain");
    assert!(v
        .iter()
        .find(|h| h.host_name == "host0")
        .and_then(|h| h.refused.clone())
        .is_some_and(|r| r.contains("maintenance")));
    let req = |name: &str| CreateInstance {
        name: name.into(),
        image: img.clone(),
        instance_type: Some("t1.medium".into()),
        site: None,
        constraints: vec![],
        placement_group: None,
        ..Default::default()
    };
    let a = c.create_instance(&req("a"), None).await.expect("a");
    let host1 = c
        .hosts()
        .await
        .expect("hosts")
        .into_iter()
        .find(|h| h.name == "host1")
        .expect("host1");
    assert_eq!(
        a.host_id.as_deref(),
        Some(host1.id.as_str()),
        "maintenance host got the instance"
    );
    // The heartbeat does not undo an operator's state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.host("host0").await.expect("host0").state, "maintenance");
    assert_eq!(
        c.set_host_state("host0", "up").await.expect("up").state,
        "up"
    );

    // Capacity: host1 carries a (2 vCPUs, 1024 MiB). Losing host0 (the largest) strands nothing.
    let cap = c.capacity().await.expect("capacity");
    let r1 = cap.hosts.iter().find(|r| r.name == "host1").expect("row");
    assert_eq!(
        (
            r1.used_vcpus,
            r1.used_memory_mib,
            r1.memory_mib,
            r1.free_memory_mib
        ),
        (2, 1024, 1536, 512)
    );
    assert_eq!(cap.sites.len(), 1);
    assert_eq!(cap.sites[0].used_memory_mib, 1024);
    assert!(
        cap.n_plus_one && cap.largest_host.as_deref() == Some("host0"),
        "{cap:?}"
    );
    // Fill host0 with 3 GiB: host1 (512 MiB free) cannot absorb it.
    for n in ["b", "c", "d"] {
        c.create_instance(&req(n), None).await.expect("fill");
    }
    let cap = c.capacity().await.expect("capacity");
    assert!(!cap.n_plus_one, "{cap:?}");
    assert!(!cap.stranded.is_empty());

    // Join tokens: a new token admits a host; once revoked, it admits nobody.
    let t = c.create_join_token().await.expect("token");
    assert!(c
        .join_tokens()
        .await
        .expect("list")
        .iter()
        .any(|x| x.token == t.token && x.revoked_at.is_none()));
    c.revoke_join_token(&t.token).await.expect("revoke");
    let out = Command::new(KUMO)
        .args([
            "agent",
            "--join",
            &cloud.endpoint,
            "--join-token",
            &t.token,
            "--name",
            "intruder",
            "--hypervisor",
            "sim",
            "--data-dir",
        ])
        .arg(cloud.dir.path().join("intruder"))
        .output()
        .expect("run agent");
    assert!(
        !out.status.success(),
        "an agent joined with a revoked token"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c
        .hosts()
        .await
        .expect("hosts")
        .iter()
        .any(|h| h.name == "intruder"));
    assert_eq!(
        code(c.revoke_join_token(&t.token).await.expect_err("twice")).0,
        404
    );

    // Members may not manage hosts.
    let deadline = Instant::now() + Duration::from_secs(5);
    let store = loop {
        match kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db")).await {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
    };
    let p = store.create_project("team").await.expect("project");
    let u = store
        .create_user("carol", &p, "member")
        .await
        .expect("user");
    let k = store.create_access_key(&u).await.expect("key");
    let carol = cloud.client_for(&k.id, &k.secret);
    assert_eq!(
        code(
            carol
                .set_host_state("host0", "maintenance")
                .await
                .expect_err("member")
        )
        .0,
        403
    );
    assert_eq!(
        code(carol.create_join_token().await.expect_err("member")).0,
        403
    );
    assert_eq!(code(carol.capacity().await.expect_err("member")).0, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_spare_hosts_and_constraints() {
    let mut cloud = Cloud::controller_only().await;
    cloud
        .add_agent_with(Hv::Sim, &["--label", "role=core"])
        .await;
    cloud
        .add_agent_with(Hv::Sim, &["--label", "role=personal"])
        .await;
    cloud
        .add_agent_with(
            Hv::Sim,
            &["--label", "role=spare", "--capacity", "64:262144"],
        )
        .await;
    let c = cloud.client.clone();
    let img = crate::sim::tiny_image(&cloud, "tiny", true).await;
    let host_id = |name: &str, hosts: &[kumo_types::api::Host]| {
        hosts
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.id.clone())
            .expect("host")
    };
    let hosts = c.hosts().await.expect("hosts");
    assert_eq!(
        hosts
            .iter()
            .find(|h| h.name == "host2")
            .map(|h| h.labels.get("role").cloned()),
        Some(Some("spare".into()))
    );

    // The spare host is the emptiest by far, yet ordinary placement never uses it.
    let mut placed = vec![];
    for n in 0..4 {
        let i = c
            .create_instance(
                &CreateInstance {
                    name: format!("p{n}"),
                    image: img.clone(),
                    instance_type: Some("t1.nano".into()),
                    site: None,
                    constraints: vec![],
                    placement_group: None,
                    ..Default::default()
                },
                None,
            )
            .await
            .expect("create");
        placed.push(i.host_id.expect("placed"));
    }
    assert!(
        !placed.contains(&host_id("host2", &hosts)),
        "an instance landed on the spare host"
    );
    let v = c
        .explain_placement("t1.nano", None, &[], None)
        .await
        .expect("explain");
    assert!(
        v.iter()
            .any(|h| h.host_name == "host2"
                && h.refused.as_deref().is_some_and(|r| r.contains("spare"))),
        "{v:?}"
    );

    // Constraints: require role=core; avoid role=personal.
    let core = c
        .create_instance(
            &CreateInstance {
                name: "db".into(),
                image: img.clone(),
                instance_type: Some("t1.nano".into()),
                site: None,
                constraints: vec!["role=core".into()],
                placement_group: None,
                ..Default::default()
            },
            None,
        )
        .await
        .expect("core");
    assert_eq!(core.host_id, Some(host_id("host0", &hosts)));
    let away = c
        .create_instance(
            &CreateInstance {
                name: "web".into(),
                image: img.clone(),
                instance_type: Some("t1.nano".into()),
                site: None,
                constraints: vec!["role!=personal".into()],
                placement_group: None,
                ..Default::default()
            },
            None,
        )
        .await
        .expect("away");
    assert_eq!(away.host_id, Some(host_id("host0", &hosts)));
    // Nothing satisfies role=storage: the error names each host's reason, nothing is reserved.
    let before = c.instances().await.expect("list").len();
    let e = c
        .create_instance(
            &CreateInstance {
                name: "nope".into(),
                image: img.clone(),
                instance_type: Some("t1.nano".into()),
                site: None,
                constraints: vec!["role=storage".into()],
                placement_group: None,
                ..Default::default()
            },
            None,
        )
        .await
        .expect_err("no host");
    let kumo_cli::ClientError::Api {
        status, message, ..
    } = e
    else {
        panic!("{e}")
    };
    assert_eq!(status, 503);
    assert!(
        message.contains("needs role=storage, host has role=core")
            && message.contains("spare host"),
        "{message}"
    );
    // Contradictory or malformed constraints are refused before anything happens.
    for bad in [
        vec!["role=core", "role!=core"],
        vec!["role=core", "role=personal"],
        vec!["role"],
        vec!["Role=Core"],
    ] {
        let e = c
            .create_instance(
                &CreateInstance {
                    name: "bad".into(),
                    image: img.clone(),
                    instance_type: Some("t1.nano".into()),
                    site: None,
                    constraints: bad.iter().map(|s| s.to_string()).collect(),
                    placement_group: None,
                    ..Default::default()
                },
                None,
            )
            .await
            .expect_err("bad constraints");
        assert_eq!(code(e).0, 400, "{bad:?}");
    }
    assert_eq!(c.instances().await.expect("list").len(), before);

    // A host label with odd characters keeps the agent out.
    let out = Command::new(KUMO)
        .args([
            "agent",
            "--join",
            &cloud.endpoint,
            "--join-token",
            &cloud.join_token,
            "--name",
            "odd",
            "--hypervisor",
            "sim",
            "--label",
            "role=Core Host!",
            "--data-dir",
        ])
        .arg(cloud.dir.path().join("odd"))
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("label"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c
        .hosts()
        .await
        .expect("hosts")
        .iter()
        .any(|h| h.name == "odd"));
}
