//! Security groups and key pairs through the REST API, the CLI and the store, with simulated
//! hosts: the default group made on first need, rules checked (every bad input refused
//! without changing anything), groups of instances (and the store queries the agents'
//! network policy is built from), groups in use kept, and another project seeing none of it.
//! Key pairs and the CLI are in `security/keys.rs`.

use std::time::Duration;

use kumo_cli::{Client, ClientError};
use kumo_types::api::CreateInstance;
use kumo_types::security::{
    CreateKeyPair, CreateSecurityGroup, CreateSecurityGroupRule, SecurityGroup,
};
use kumo_types::InstanceState;

use crate::common::{Cloud, Hv};
use crate::sim::tiny_image;

mod keys;

const T: Duration = Duration::from_secs(60);

/// The error of a call that must fail with this status and code; returns its message.
fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>, status: u16, want: &str) -> String {
    match r {
        Err(ClientError::Api {
            status: s,
            code,
            message,
            ..
        }) => {
            assert_eq!((s, code.as_str()), (status, want), "{message}");
            message
        }
        other => panic!("expected HTTP {status} {want}, got {other:?}"),
    }
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

fn vm(name: &str, image: &str, groups: &[&str], key: Option<&str>) -> CreateInstance {
    CreateInstance {
        name: name.into(),
        image: image.into(),
        instance_type: Some("t1.nano".into()),
        security_groups: groups.iter().map(|g| g.to_string()).collect(),
        key_name: key.map(String::from),
        ..Default::default()
    }
}

fn tcp(port: i64, cidr: &str) -> CreateSecurityGroupRule {
    CreateSecurityGroupRule {
        protocol: "tcp".into(),
        from_port: Some(port),
        cidr: Some(cidr.into()),
        ..Default::default()
    }
}

/// Groups and their rules as (name, rules) for before/after comparisons.
/// Only the client's own project's: admins see every project's groups.
async fn snapshot(c: &Client) -> Vec<(String, Vec<String>)> {
    let project = c.whoami().await.expect("whoami").project_id;
    let mut v: Vec<(String, Vec<String>)> = c
        .security_groups()
        .await
        .expect("groups")
        .into_iter()
        .filter(|g| g.project_id == project)
        .map(|g: SecurityGroup| (g.name, g.rules.into_iter().map(|r| r.id).collect()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn security_groups_rules_and_instances() {
    let cloud = Cloud::start(Hv::Sim).await;
    let c = cloud.client.clone();
    let img = tiny_image(&cloud, "tiny", true).await;

    // The default group exists from the first look, with its two rules.
    let groups = c.security_groups().await.expect("list");
    assert_eq!(groups.len(), 1, "{groups:?}");
    let d = groups[0].clone();
    assert_eq!(d.name, "default");
    let mut shape: Vec<(String, String, Option<String>, Option<String>)> = d
        .rules
        .iter()
        .map(|r| {
            (
                r.direction.clone(),
                r.protocol.clone(),
                r.cidr.clone(),
                r.source_group.clone(),
            )
        })
        .collect();
    shape.sort();
    assert_eq!(
        shape,
        vec![
            (
                "egress".into(),
                "all".into(),
                Some("0.0.0.0/0".into()),
                None
            ),
            // Dual-stack networks: all outbound IPv6 too.
            ("egress".into(), "all".into(), Some("::/0".into()), None),
            ("ingress".into(), "all".into(), None, Some(d.id.clone())),
        ]
    );

    let web = c
        .create_security_group(&CreateSecurityGroup {
            name: "web".into(),
            description: Some("web servers".into()),
        })
        .await
        .expect("web");
    assert!(web.id.starts_with("sg-") && web.rules.is_empty(), "{web:?}");
    let ssh = c
        .add_security_group_rule("web", &tcp(22, "10.0.0.0/8"))
        .await
        .expect("ssh");
    assert_eq!((ssh.from_port, ssh.to_port), (Some(22), Some(22)));
    let from_default = c
        .add_security_group_rule(
            &web.id,
            &CreateSecurityGroupRule {
                protocol: "all".into(),
                source_group: Some("default".into()),
                ..Default::default()
            },
        )
        .await
        .expect("from default");
    assert_eq!(from_default.source_group.as_deref(), Some(d.id.as_str()));
    let shown = c.security_group("web").await.expect("show");
    assert_eq!(
        shown.rules.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![ssh.id.clone(), from_default.id.clone()]
    );

    // Bad input: a clear error, and nothing changes.
    let before = snapshot(&c).await;
    refused(
        c.add_security_group_rule("web", &tcp(22, "10.0.0.0/8"))
            .await,
        409,
        "Conflict",
    );
    for (rule, needle) in [
        (tcp(22, "10.0.0.5/24"), "host bits"),
        (tcp(22, "10.0.0.0/40"), "IPv4 CIDR"),
        (tcp(70000, "0.0.0.0/0"), "between 0 and 65535"),
        (
            CreateSecurityGroupRule {
                to_port: Some(10),
                ..tcp(20, "0.0.0.0/0")
            },
            "empty",
        ),
        (
            CreateSecurityGroupRule {
                protocol: "gre".into(),
                ..tcp(1, "0.0.0.0/0")
            },
            "protocol",
        ),
        (
            CreateSecurityGroupRule {
                protocol: "icmp".into(),
                ..tcp(8, "0.0.0.0/0")
            },
            "no ports",
        ),
        (
            CreateSecurityGroupRule {
                source_group: Some("web".into()),
                ..tcp(80, "0.0.0.0/0")
            },
            "not both",
        ),
        (
            CreateSecurityGroupRule {
                cidr: None,
                ..tcp(80, "0.0.0.0/0")
            },
            "needs a peer",
        ),
        (
            CreateSecurityGroupRule {
                direction: Some("sideways".into()),
                ..tcp(80, "0.0.0.0/0")
            },
            "direction",
        ),
    ] {
        let m = refused(
            c.add_security_group_rule("web", &rule).await,
            400,
            "InvalidParameter",
        );
        assert!(m.contains(needle), "{m:?} lacks {needle:?}");
    }
    refused(
        c.add_security_group_rule("nope", &tcp(1, "0.0.0.0/0"))
            .await,
        404,
        "NotFound",
    );
    for (name, status, code) in [
        ("web", 409, "Conflict"),
        ("default", 400, "InvalidParameter"),
        ("sg-12345678", 400, "InvalidParameter"),
        ("bad name", 400, "InvalidParameter"),
    ] {
        refused(
            c.create_security_group(&CreateSecurityGroup {
                name: name.into(),
                description: None,
            })
            .await,
            status,
            code,
        );
    }
    refused(
        c.revoke_security_group_rule("web", "sgr-00000000000000000")
            .await,
        404,
        "NotFound",
    );
    refused(
        c.delete_security_group("default").await,
        409,
        "IncorrectState",
    );
    assert_eq!(
        snapshot(&c).await,
        before,
        "refused requests changed nothing"
    );

    // Instances: named groups in order, the default group when none is named.
    let a = c
        .create_instance(&vm("a", &img, &["web", "default"], None), None)
        .await
        .expect("a");
    assert_eq!(a.security_groups, vec![web.id.clone(), d.id.clone()]);
    let b = c
        .create_instance(&vm("b", &img, &[], None), None)
        .await
        .expect("b");
    assert_eq!(b.security_groups, vec![d.id.clone()]);
    let listed = c.instances().await.expect("list");
    assert_eq!(listed.len(), 2);
    for (req, needle) in [
        (vm("x", &img, &["nope"], None), "nope"),
        (vm("x", &img, &["web"; 6], None), "at most 5"),
        (vm("x", &img, &[], Some("nokey")), "nokey"),
    ] {
        let m = refused(c.create_instance(&req, None).await, 400, "InvalidParameter");
        assert!(m.contains(needle), "{m}");
    }
    assert_eq!(
        c.instances().await.expect("list").len(),
        2,
        "nothing created"
    );
    let a = cloud.wait_state(&a.id, InstanceState::Running, T).await;

    // Changing an instance's groups; bad changes leave them as they were.
    let moved = c
        .set_instance_security_groups("b", &["web".into()])
        .await
        .expect("move");
    assert_eq!(moved.security_groups, vec![web.id.clone()]);
    refused(
        c.set_instance_security_groups("b", &[]).await,
        400,
        "InvalidParameter",
    );
    refused(
        c.set_instance_security_groups("b", &["nope".into()]).await,
        400,
        "InvalidParameter",
    );
    refused(
        c.set_instance_security_groups("nope", &["web".into()])
            .await,
        404,
        "NotFound",
    );
    assert_eq!(
        c.instance("b").await.expect("b").security_groups,
        vec![web.id.clone()]
    );

    // What the agents' network policy is built from.
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    assert_eq!(
        store
            .instance_group_ids(&[a.id.clone(), b.id.clone()])
            .await
            .expect("memberships"),
        vec![
            (a.id.clone(), web.id.clone()),
            (a.id.clone(), d.id.clone()),
            (b.id.clone(), web.id.clone()),
        ]
    );
    let mut ips = store
        .group_member_ips(&[web.id.clone(), d.id.clone()])
        .await
        .expect("ips");
    ips.sort();
    let (a_ip, b_ip) = (
        a.private_ip.clone().expect("a ip"),
        b.private_ip.clone().expect("b ip"),
    );
    let mut want = vec![
        (web.id.clone(), a_ip.clone()),
        (web.id.clone(), b_ip),
        (d.id.clone(), a_ip),
    ];
    want.sort();
    assert_eq!(ips, want);
    let rules = store
        .security_group_rules(std::slice::from_ref(&web.id))
        .await
        .expect("rules");
    assert_eq!(
        rules.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![ssh.id.clone(), from_default.id.clone()]
    );
    assert_eq!(
        (rules[0].protocol.as_str(), rules[0].cidr.as_deref()),
        ("tcp", Some("10.0.0.0/8"))
    );
    let mut names = store
        .security_group_names(&[web.id.clone(), d.id.clone()])
        .await
        .expect("names");
    names.sort();
    let mut want = vec![
        (web.id.clone(), "web".to_string()),
        (d.id.clone(), "default".to_string()),
    ];
    want.sort();
    assert_eq!(names, want);
    store.close().await;

    // A group in use, or named as a source, stays; revoking and terminating free them.
    let db = c
        .create_security_group(&CreateSecurityGroup {
            name: "db".into(),
            description: None,
        })
        .await
        .expect("db");
    let from_db = c
        .add_security_group_rule(
            "web",
            &CreateSecurityGroupRule {
                protocol: "tcp".into(),
                from_port: Some(8080),
                to_port: Some(8090),
                source_group: Some("db".into()),
                ..Default::default()
            },
        )
        .await
        .expect("from db");
    let m = refused(c.delete_security_group("db").await, 409, "IncorrectState");
    assert!(m.contains("web"), "{m}");
    let m = refused(c.delete_security_group("web").await, 409, "IncorrectState");
    assert!(m.contains(&a.id), "{m}");
    c.revoke_security_group_rule("web", &from_db.id)
        .await
        .expect("revoke");
    c.delete_security_group(&db.id).await.expect("delete db");
    refused(c.security_group("db").await, 404, "NotFound");
    for i in [&a.id, &b.id] {
        c.terminate(i).await.expect("terminate");
    }
    cloud.wait_state(&a.id, InstanceState::Terminated, T).await;
    cloud.wait_state(&b.id, InstanceState::Terminated, T).await;
    c.delete_security_group("web").await.expect("delete web");
    let left: Vec<String> = snapshot(&c).await.into_iter().map(|g| g.0).collect();
    assert_eq!(left, vec!["default"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_project_sees_none_of_it() {
    let cloud = Cloud::start(Hv::Sim).await;
    let admin = cloud.client.clone();
    let img = tiny_image(&cloud, "tiny", true).await;
    let web = admin
        .create_security_group(&CreateSecurityGroup {
            name: "web".into(),
            description: None,
        })
        .await
        .expect("web");
    admin
        .add_security_group_rule("web", &tcp(80, "0.0.0.0/0"))
        .await
        .expect("rule");
    let key = admin
        .create_key_pair(&CreateKeyPair {
            name: "k".into(),
            ..Default::default()
        })
        .await
        .expect("key");
    let admin_default = admin.security_group("default").await.expect("default");
    let before = snapshot(&admin).await;

    let (bob, bob_project, _, _) = member(&cloud, "other").await;
    let mine = bob.security_groups().await.expect("bob's");
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(
        (mine[0].name.as_str(), mine[0].project_id.as_str()),
        ("default", bob_project.as_str())
    );
    assert_ne!(mine[0].id, admin_default.id);
    assert!(bob.key_pairs().await.expect("keys").is_empty());
    for id in [web.id.as_str(), "web"] {
        refused(bob.security_group(id).await, 404, "NotFound");
        refused(bob.delete_security_group(id).await, 404, "NotFound");
        refused(
            bob.add_security_group_rule(id, &tcp(22, "0.0.0.0/0")).await,
            404,
            "NotFound",
        );
        refused(
            bob.revoke_security_group_rule(id, &before[1].1[0]).await,
            404,
            "NotFound",
        );
    }
    refused(bob.delete_key_pair("k").await, 404, "NotFound");
    refused(bob.delete_key_pair(&key.id).await, 404, "NotFound");
    // Nor can bob use them: not as a source, not for an instance.
    refused(
        bob.add_security_group_rule(
            "default",
            &CreateSecurityGroupRule {
                protocol: "all".into(),
                source_group: Some(web.id.clone()),
                ..Default::default()
            },
        )
        .await,
        404,
        "NotFound",
    );
    for req in [
        vm("x", &img, &[&web.id], None),
        vm("x", &img, &[&admin_default.id], None),
        vm("x", &img, &[], Some("k")),
    ] {
        refused(
            bob.create_instance(&req, None).await,
            400,
            "InvalidParameter",
        );
    }
    assert!(bob.instances().await.expect("none").is_empty());
    let theirs = bob
        .create_instance(&vm("mine", &img, &[], None), None)
        .await
        .expect("bob's own");
    assert_eq!(theirs.security_groups, vec![mine[0].id.clone()]);
    refused(
        bob.set_instance_security_groups(&theirs.id, std::slice::from_ref(&web.id))
            .await,
        400,
        "InvalidParameter",
    );
    // The admin's groups and keys are as they were.
    assert_eq!(snapshot(&admin).await, before);
    assert_eq!(admin.key_pairs().await.expect("keys").len(), 1);
    bob.terminate(&theirs.id).await.expect("terminate");
}
