use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kumo_types::agent::HostInfo;
use kumo_types::InstanceState;

use super::*;
use crate::{Bootstrap, NewImage, NewInstance};

const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF2UTqqTm3O46VP9U6wi5zRgsKtgAgYTehtK6/sPyjCM alice@example";
const ED_FP: &str = "SHA256:pbWboIsoReH8UXlLIkVwJkUm70deR28+j3WO9BX0EbY";
const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC28BC4Mx+gyqifIZBG1NweKNPX3AIOFn6cYGZYVrOrzdaPDCDpyZe8InoUG789x7b6O3kepki2HcXLPcFZh2KQnssgZ/nhfgpam8cqkp/f+BsjvIuxODr2ucAFp7pQhMXPTU6Bi3HxDUVRoO2hVRfY64WamVguQ9ZMMjpgA4QqVNmlm2E4H10qUZOhb+88dR8V15GtU0bRZcE5HGKYJ16GW1X59OEIdZa6i2NQS6tthEzS4Wqz0Cmgnh9cKfgjVZgz241GUsNxGMFaD5toXa8y065XKUB4tezZBrtOloOG2IwxZPv9gspa4wMNMBIp6S9lSTzE4HtgtY8kSO+VS7Pl rsa-key";
const RSA_FP: &str = "SHA256:B++UjofBfbSvzMUxc33Iq4f14v9zVwlXnURUA5hOEP8";
const EC: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNCbAbwVNMEMRFWaA3LDtG9RlV0VHXoSP9snlDQlATsHLjXOcAPUw2GJtboivjLUYGsOW0jzoT4jhxd/FRRHCSA= ec";
const EC_FP: &str = "SHA256:nBbuwq7cv9vTzximE511I/riBmDIVUmPtFLRECyVujU";

struct Env {
    s: Store,
    admin: Scope,
    bob: Scope,
    host: String,
    image: String,
    network: String,
}

async fn env() -> Env {
    let s = Store::open_memory().await.expect("store");
    let b: Bootstrap = s
        .bootstrap("10.9.0.0/24")
        .await
        .expect("bootstrap")
        .expect("first");
    let admin = b.access_key.scope();
    let info = HostInfo {
        vcpus: 64,
        memory_mib: 65536,
        hypervisor: "sim".into(),
        accel: "tcg".into(),
        qemu_version: "sim".into(),
        labels: Default::default(),
        storage_pool: String::new(),
        disk_gib: 0,
        tunnel_ip: String::new(),
        pool: None,
    };
    let host = s
        .register_host("h1", "http://x", "site1", &info)
        .await
        .expect("host")
        .id;
    let p2 = s.create_project("other").await.expect("p2");
    let u2 = s.create_user("bob", &p2, "member").await.expect("u2");
    let bob = s.create_access_key(&u2).await.expect("k2").scope();
    let img = s
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
    s.finish_image(&img.id, "qcow2", 1 << 20, 1 << 20, "00")
        .await
        .expect("finish");
    let network = s.network("default").await.expect("net").id;
    Env {
        s,
        admin,
        bob,
        host,
        image: img.id,
        network,
    }
}

impl Env {
    async fn launch(
        &self,
        scope: &Scope,
        name: &str,
        groups: &[&str],
        key: Option<&str>,
    ) -> Result<InstanceRow> {
        let new = NewInstance {
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
            security_group_ids: groups.iter().map(|g| g.to_string()).collect(),
            key_name: key.map(str::to_string),
            root_snapshot_id: None,
            mac: None,
            smbios_uuid: None,
            ha: false,
            ha_priority: 500,
        };
        let host = self.host.clone();
        self.s
            .create_instance(scope, &new, |p, _| {
                p.hosts()
                    .iter()
                    .position(|h| h.id == host)
                    .ok_or_else(|| "no host".to_string())
            })
            .await
    }

    async fn terminate(&self, id: &str) {
        self.s
            .update_instance(&self.admin, id, |r| {
                let mut n = r.clone();
                n.state = InstanceState::ShuttingDown;
                n.desired = "terminated".into();
                Ok(Some(n))
            })
            .await
            .expect("terminate");
        let row = self.s.instance(&self.admin, id).await.expect("row");
        assert!(self.s.instance_absent_on_host(&row).await.expect("gone"));
    }

    async fn rules(&self, group: &str) -> Vec<SgRuleRow> {
        self.s
            .security_group_rules(&[group.to_string()])
            .await
            .expect("rules")
    }
}

fn rule(proto: &str, from: Option<i64>, to: Option<i64>, cidr: &str) -> NewSgRule {
    NewSgRule {
        direction: "ingress".into(),
        protocol: proto.into(),
        from_port: from,
        to_port: to,
        cidr: Some(cidr.into()),
        ..Default::default()
    }
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Err(StoreError::Invalid(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected Invalid({needle}), got {other:?}"),
    }
}

#[tokio::test]
async fn default_group_is_made_once_with_its_rules() {
    let e = env().await;
    let groups = e.s.security_groups(&e.admin).await.expect("list");
    assert_eq!(groups.len(), 1);
    let d = &groups[0];
    assert_eq!(d.name, DEFAULT_GROUP);
    assert!(
        kumo_types::id::is_id(IdKind::SecurityGroup, &d.id),
        "{}",
        d.id
    );
    let rules = e.rules(&d.id).await;
    assert_eq!(rules.len(), 3, "{rules:?}");
    let ingress = rules.iter().find(|r| r.direction == "ingress").expect("in");
    assert_eq!(
        (
            ingress.protocol.as_str(),
            ingress.source_group_id.as_deref()
        ),
        ("all", Some(d.id.as_str()))
    );
    assert_eq!((ingress.cidr.as_deref(), ingress.from_port), (None, None));
    // All outbound traffic, IPv4 and IPv6 (dual-stack networks).
    let egress: Vec<(&str, Option<&str>)> = rules
        .iter()
        .filter(|r| r.direction == "egress")
        .map(|r| (r.protocol.as_str(), r.cidr.as_deref()))
        .collect();
    assert_eq!(egress, [("all", Some("0.0.0.0/0")), ("all", Some("::/0"))]);
    // Asking again makes nothing new; the other project gets its own default.
    let again = e.s.default_security_group(&e.admin).await.expect("again");
    assert_eq!(again.id, d.id);
    assert_eq!(e.s.security_groups(&e.admin).await.expect("list").len(), 1);
    let theirs = e.s.security_groups(&e.bob).await.expect("bob");
    assert_eq!(theirs.len(), 1);
    assert_ne!(theirs[0].id, d.id);
    assert_eq!(theirs[0].project_id, e.bob.project_id);
    // The default group cannot be deleted.
    assert!(matches!(
        e.s.delete_security_group(&e.admin, DEFAULT_GROUP).await,
        Err(StoreError::Conflict(_))
    ));
}

#[tokio::test]
async fn bad_groups_and_rules_change_nothing() {
    let e = env().await;
    let web =
        e.s.create_security_group(&e.admin, "web", "web servers")
            .await
            .expect("web");
    assert!(matches!(
        e.s.create_security_group(&e.admin, "web", "again").await,
        Err(StoreError::Conflict(_))
    ));
    is_invalid(
        e.s.create_security_group(&e.admin, "default", "").await,
        "reserved",
    );
    is_invalid(e.s.create_security_group(&e.admin, "sg-1", "").await, "sg-");
    is_invalid(
        e.s.create_security_group(&e.admin, "bad name", "").await,
        "may only contain",
    );
    is_invalid(
        e.s.create_security_group(&e.admin, "ctl", "a\nb").await,
        "control",
    );
    let ok =
        e.s.add_security_group_rules(
            &e.admin,
            "web",
            &[rule("tcp", Some(22), None, "10.0.0.0/8")],
        )
        .await
        .expect("ssh");
    assert_eq!(ok[0].from_port, Some(22));
    assert_eq!(ok[0].to_port, Some(22));
    assert!(kumo_types::id::is_id(IdKind::SecurityGroupRule, &ok[0].id));
    let before = e.rules(&web.id).await;
    for (r, needle) in [
        (rule("gre", None, None, "10.0.0.0/8"), "protocol"),
        (
            rule("tcp", Some(70000), None, "10.0.0.0/8"),
            "between 0 and 65535",
        ),
        (
            rule("tcp", Some(-1), Some(-1), "10.0.0.0/8"),
            "between 0 and 65535",
        ),
        (rule("udp", Some(90), Some(80), "10.0.0.0/8"), "empty"),
        (rule("icmp", Some(8), Some(0), "10.0.0.0/8"), "no ports"),
        (rule("all", Some(0), Some(65535), "10.0.0.0/8"), "no ports"),
        (rule("tcp", Some(80), None, "10.0.0.5/24"), "host bits"),
        (rule("tcp", Some(80), None, "10.0.0.0/33"), "IPv4 CIDR"),
        (rule("tcp", Some(80), None, "10.0.0.0"), "IPv4 CIDR"),
        (rule("tcp", Some(80), None, "10.0.0.0/+8"), "IPv4 CIDR"),
        (rule("tcp", Some(80), None, "fd60::1/64"), "host bits"),
        (rule("tcp", Some(80), None, "fd60::/129"), "IPv4 CIDR"),
        (rule("icmpv6", Some(8), None, "::/0"), "no ports"),
        (
            NewSgRule {
                direction: "sideways".into(),
                ..rule("tcp", Some(80), None, "0.0.0.0/0")
            },
            "direction",
        ),
        (
            NewSgRule {
                cidr: None,
                ..rule("tcp", Some(80), None, "0.0.0.0/0")
            },
            "needs a peer",
        ),
        (
            NewSgRule {
                source_group: Some("web".into()),
                ..rule("tcp", Some(80), None, "0.0.0.0/0")
            },
            "not both",
        ),
    ] {
        is_invalid(
            e.s.add_security_group_rules(&e.admin, "web", &[r]).await,
            needle,
        );
    }
    // All or none: a good rule before a bad one is not added either.
    is_invalid(
        e.s.add_security_group_rules(
            &e.admin,
            "web",
            &[
                rule("tcp", Some(443), None, "0.0.0.0/0"),
                rule("tcp", Some(80), None, "1.2.3.4/8"),
            ],
        )
        .await,
        "host bits",
    );
    // The same rule again (also written with EC2's protocol number) is a conflict.
    for dup in [
        rule("tcp", Some(22), Some(22), "10.0.0.0/8"),
        rule("6", Some(22), None, "10.0.0.0/8"),
    ] {
        assert!(matches!(
            e.s.add_security_group_rules(&e.admin, "web", &[dup]).await,
            Err(StoreError::Conflict(_))
        ));
    }
    assert!(matches!(
        e.s.add_security_group_rules(
            &e.admin,
            "web",
            &[
                rule("udp", Some(53), None, "0.0.0.0/0"),
                rule("17", Some(53), Some(53), "0.0.0.0/0"),
            ],
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    // Another project's group is not a source: not found, as one that never existed.
    let theirs =
        e.s.default_security_group(&e.bob)
            .await
            .expect("bob default");
    let from_theirs = NewSgRule {
        cidr: None,
        source_group: Some(theirs.id.clone()),
        ..rule("tcp", Some(80), None, "")
    };
    assert!(matches!(
        e.s.add_security_group_rules(&e.admin, "web", &[from_theirs])
            .await,
        Err(StoreError::NotFound { .. })
    ));
    // Nor can bob touch the admin's group.
    assert!(matches!(
        e.s.add_security_group_rules(&e.bob, &web.id, &[rule("tcp", None, None, "0.0.0.0/0")])
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        e.s.delete_security_group(&e.bob, &web.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        e.s.remove_security_group_rules(&e.bob, &web.id, &[ok[0].id.clone()], &[])
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(e.rules(&web.id).await, before, "nothing changed");
    let names: Vec<String> =
        e.s.security_groups(&e.admin)
            .await
            .expect("list")
            .into_iter()
            .filter(|g| g.project_id == e.admin.project_id)
            .map(|g| g.name)
            .collect();
    assert_eq!(names, vec!["default", "web"]);
}

#[tokio::test]
async fn rules_normalise_and_revoke() {
    let e = env().await;
    let web =
        e.s.create_security_group(&e.admin, "web", "")
            .await
            .expect("web");
    let db =
        e.s.create_security_group(&e.admin, "db", "")
            .await
            .expect("db");
    let added =
        e.s.add_security_group_rules(
            &e.admin,
            "web",
            &[
                rule("TCP", None, None, "0.0.0.0/0"),
                rule("-1", Some(-1), Some(-1), "192.168.0.0/16"),
                rule("1", None, None, "172.16.0.0/12"),
                NewSgRule {
                    direction: "egress".into(),
                    cidr: None,
                    source_group: Some("db".into()),
                    description: Some("to the database".into()),
                    ..rule("tcp", Some(5432), Some(5432), "")
                },
            ],
        )
        .await
        .expect("add");
    let got: Vec<(&str, &str, Option<i64>, Option<i64>)> = added
        .iter()
        .map(|r| {
            (
                r.direction.as_str(),
                r.protocol.as_str(),
                r.from_port,
                r.to_port,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("ingress", "tcp", Some(0), Some(65535)),
            ("ingress", "all", None, None),
            ("ingress", "icmp", None, None),
            ("egress", "tcp", Some(5432), Some(5432)),
        ]
    );
    assert_eq!(added[3].source_group_id.as_deref(), Some(db.id.as_str()));
    assert_eq!(
        e.rules(&web.id).await,
        added,
        "stored as answered, in order"
    );
    // A group named as a source cannot be deleted; revoking the rule frees it.
    match e.s.delete_security_group(&e.admin, "db").await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("web"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Revoking something the group lacks fails whole: the known rule named with it stays.
    let missing = rule("udp", Some(1), None, "0.0.0.0/0");
    assert!(matches!(
        e.s.remove_security_group_rules(&e.admin, "web", &[added[0].id.clone()], &[missing])
            .await,
        Err(StoreError::NotFound {
            kind: "security group rule",
            ..
        })
    ));
    assert!(matches!(
        e.s.remove_security_group_rules(&e.admin, "web", &["sgr-00000000000000000".into()], &[])
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(e.rules(&web.id).await.len(), 4);
    // By id and by what the rule says.
    let gone =
        e.s.remove_security_group_rules(
            &e.admin,
            &web.id,
            &[added[3].id.clone()],
            &[rule("all", None, None, "192.168.0.0/16")],
        )
        .await
        .expect("revoke");
    assert_eq!(gone.len(), 2);
    let left: Vec<String> = e.rules(&web.id).await.into_iter().map(|r| r.id).collect();
    assert_eq!(left, vec![added[0].id.clone(), added[2].id.clone()]);
    e.s.delete_security_group(&e.admin, "db").await.expect("db");
    assert!(matches!(
        e.s.security_group(&e.admin, "db").await,
        Err(StoreError::NotFound { .. })
    ));
    // Deleting a group takes its rules with it.
    e.s.delete_security_group(&e.admin, &web.id)
        .await
        .expect("web");
    assert!(e.rules(&web.id).await.is_empty());
}

#[tokio::test]
async fn instances_keep_groups_and_keys() {
    let e = env().await;
    let d = e.s.default_security_group(&e.admin).await.expect("default");
    let web =
        e.s.create_security_group(&e.admin, "web", "")
            .await
            .expect("web");
    let key =
        e.s.import_key_pair(&e.admin, "alice", ED)
            .await
            .expect("key");
    let a = e
        .launch(&e.admin, "a", &[&web.id, &d.id], Some("alice"))
        .await
        .expect("a");
    assert_eq!(a.security_group_ids, vec![web.id.clone(), d.id.clone()]);
    assert_eq!(a.key_name.as_deref(), Some("alice"));
    let read = e.s.instance(&e.admin, &a.id).await.expect("read");
    assert_eq!(read.security_group_ids, a.security_group_ids, "order kept");
    let b = e.launch(&e.admin, "b", &[&d.id], None).await.expect("b");
    assert!(e
        .s
        .instance_public_keys(&b.id)
        .await
        .expect("none")
        .is_empty());

    // The agent's view.
    let ids = vec![b.id.clone(), a.id.clone()];
    assert_eq!(
        e.s.instance_group_ids(&ids).await.expect("memberships"),
        vec![
            (b.id.clone(), d.id.clone()),
            (a.id.clone(), web.id.clone()),
            (a.id.clone(), d.id.clone()),
        ]
    );
    let mut ips =
        e.s.group_member_ips(&[d.id.clone(), web.id.clone()])
            .await
            .expect("ips");
    ips.sort();
    let mut want = vec![
        (d.id.clone(), a.private_ip.clone()),
        (d.id.clone(), b.private_ip.clone()),
        (web.id.clone(), a.private_ip.clone()),
    ];
    want.sort();
    assert_eq!(ips, want);
    let mut names =
        e.s.security_group_names(&[web.id.clone(), d.id.clone(), "sg-nothing".into()])
            .await
            .expect("names");
    names.sort();
    let mut want = vec![
        (d.id.clone(), "default".into()),
        (web.id.clone(), "web".into()),
    ];
    want.sort();
    assert_eq!(names, want);
    let rules =
        e.s.security_group_rules(&[web.id.clone(), d.id.clone()])
            .await
            .expect("rules");
    assert!(rules.iter().all(|r| r.group_id == d.id), "web has none yet");

    // The key stays with the instance after the key pair is deleted.
    let deleted =
        e.s.delete_key_pair(&e.admin, "alice")
            .await
            .expect("delete");
    assert_eq!(deleted.id, key.id);
    assert_eq!(
        e.s.instance_public_keys(&a.id).await.expect("keys"),
        vec![("alice".to_string(), ED.to_string())]
    );
    // Unknown key, another project's group, too many groups: refused, nothing created.
    let before =
        e.s.instances(&e.admin, None, None, None)
            .await
            .expect("l")
            .0;
    assert!(matches!(
        e.launch(&e.admin, "c", &[&d.id], Some("alice")).await,
        Err(StoreError::NotFound {
            kind: "key pair",
            ..
        })
    ));
    let theirs = e.s.default_security_group(&e.bob).await.expect("theirs");
    assert!(matches!(
        e.launch(&e.admin, "c", &[&theirs.id], None).await,
        Err(StoreError::NotFound {
            kind: "security group",
            ..
        })
    ));
    let six = ["x"; 6];
    is_invalid(e.launch(&e.admin, "c", &six, None).await, "at most 5");
    let after =
        e.s.instances(&e.admin, None, None, None)
            .await
            .expect("l")
            .0;
    assert_eq!(before.len(), after.len());
    assert!(e.s.placement_drift().await.expect("drift").is_empty());

    // Changing an instance's groups.
    let changed =
        e.s.set_instance_security_groups(&e.admin, "b", &[web.id.clone(), d.id.clone()])
            .await
            .expect("change");
    assert_eq!(
        changed.security_group_ids,
        vec![web.id.clone(), d.id.clone()]
    );
    for bad in [vec![], vec![theirs.id.clone()]] {
        assert!(e
            .s
            .set_instance_security_groups(&e.admin, "b", &bad)
            .await
            .is_err());
    }
    assert!(matches!(
        e.s.set_instance_security_groups(&e.bob, &b.id, std::slice::from_ref(&theirs.id))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    let kept = e.s.instance(&e.admin, "b").await.expect("b");
    assert_eq!(kept.security_group_ids, changed.security_group_ids);

    // Groups in use cannot be deleted; once their members are gone they can.
    match e.s.delete_security_group(&e.admin, "web").await {
        Err(StoreError::Conflict(m)) => assert!(m.contains(&a.id), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    e.terminate(&a.id).await;
    e.terminate(&b.id).await;
    let ips =
        e.s.group_member_ips(std::slice::from_ref(&d.id))
            .await
            .expect("ips");
    assert!(
        ips.is_empty(),
        "terminated members are not members: {ips:?}"
    );
    assert!(matches!(
        e.s.set_instance_security_groups(&e.admin, &a.id, std::slice::from_ref(&d.id))
            .await,
        Err(StoreError::Conflict(_))
    ));
    e.s.delete_security_group(&e.admin, "web")
        .await
        .expect("web");
    assert_eq!(
        e.s.instance_group_ids(std::slice::from_ref(&a.id))
            .await
            .expect("m"),
        vec![(a.id.clone(), d.id.clone())]
    );
}

#[test]
fn public_keys_are_checked_and_fingerprinted() {
    for (line, ty, fp) in [
        (ED, "ed25519", ED_FP),
        (RSA, "rsa", RSA_FP),
        (EC, "ecdsa", EC_FP),
    ] {
        let k = parse_public_key(&format!("  {line}\n")).expect(ty);
        assert_eq!((k.key_type.as_str(), k.fingerprint.as_str()), (ty, fp));
        assert_eq!(k.line, line);
    }
    let no_comment = ED.rsplit_once(' ').map(|(k, _)| k).unwrap_or(ED);
    assert_eq!(
        parse_public_key(no_comment)
            .expect("no comment")
            .fingerprint,
        ED_FP
    );
    let ed_blob = ED.split(' ').nth(1).unwrap_or_default();
    let rsa_blob = RSA.split(' ').nth(1).unwrap_or_default();
    let trailing = {
        let mut b = STANDARD.decode(ed_blob).expect("blob");
        b.push(0);
        STANDARD.encode(b)
    };
    let truncated = {
        let mut b = STANDARD.decode(ed_blob).expect("blob");
        b.truncate(b.len() - 1);
        STANDARD.encode(b)
    };
    for bad in [
        String::new(),
        "ssh-ed25519".into(),
        format!("ssh-dss {ed_blob}"),
        format!("ssh-rsa {ed_blob} mislabelled"),
        format!("ssh-ed25519 {rsa_blob}"),
        "ssh-ed25519 !!!notbase64!!!".into(),
        format!("ssh-ed25519 {trailing}"),
        format!("ssh-ed25519 {truncated}"),
        format!("{ED}\n{RSA}"),
        "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
    ] {
        assert!(
            matches!(parse_public_key(&bad), Err(StoreError::Invalid(_))),
            "{bad:?} was accepted"
        );
    }
}

#[tokio::test]
async fn key_pairs_belong_to_a_project() {
    let e = env().await;
    let k =
        e.s.import_key_pair(&e.admin, "alice", RSA)
            .await
            .expect("import");
    assert_eq!(
        (k.key_type.as_str(), k.fingerprint.as_str()),
        ("rsa", RSA_FP)
    );
    assert!(kumo_types::id::is_id(IdKind::KeyPair, &k.id), "{}", k.id);
    assert!(matches!(
        e.s.import_key_pair(&e.admin, "alice", ED).await,
        Err(StoreError::Conflict(_))
    ));
    is_invalid(
        e.s.import_key_pair(&e.admin, "bad", "garbage").await,
        "OpenSSH",
    );
    is_invalid(
        e.s.import_key_pair(&e.admin, "bad name", ED).await,
        "may only",
    );
    // Bob neither sees nor deletes it, and may use the same name for his own.
    assert!(e.s.key_pairs(&e.bob).await.expect("bob").is_empty());
    assert!(matches!(
        e.s.key_pair(&e.bob, &k.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        e.s.delete_key_pair(&e.bob, "alice").await,
        Err(StoreError::NotFound { .. })
    ));
    let theirs =
        e.s.import_key_pair(&e.bob, "alice", ED)
            .await
            .expect("bob's");
    assert_ne!(theirs.id, k.id);
    let mine: Vec<String> =
        e.s.key_pairs(&e.admin)
            .await
            .expect("mine")
            .into_iter()
            .filter(|x| x.project_id == e.admin.project_id)
            .map(|x| x.id)
            .collect();
    assert_eq!(mine, vec![k.id.clone()]);
    assert_eq!(
        e.s.key_pair(&e.admin, "alice").await.expect("by name").id,
        k.id
    );
    e.s.delete_key_pair(&e.admin, &k.id).await.expect("by id");
    assert!(matches!(
        e.s.delete_key_pair(&e.admin, &k.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        e.s.key_pair(&e.bob, "alice").await.expect("bob's stays").id,
        theirs.id
    );
}

#[test]
fn cidrs_and_protocols() {
    assert_eq!(check_cidr("0.0.0.0/0").expect("any"), "0.0.0.0/0");
    assert_eq!(check_cidr(" 10.1.2.3/32 ").expect("host"), "10.1.2.3/32");
    assert!(check_cidr("10.1.2.3/31").is_err());
    assert!(check_cidr("256.0.0.0/8").is_err());
    assert_eq!(normalize_protocol("Udp").expect("udp"), "udp");
    assert_eq!(normalize_protocol("-1").expect("all"), "all");
    assert!(normalize_protocol("47").is_err());
    // IPv6 peers and ICMPv6 (dual-stack networks).
    assert_eq!(check_cidr("::/0").expect("any v6"), "::/0");
    assert_eq!(check_cidr("FD60:1:0::/64").expect("v6"), "fd60:1::/64");
    assert_eq!(
        check_cidr("fd60:1::5054:ff:fe00:1/128").expect("v6 host"),
        "fd60:1::5054:ff:fe00:1/128"
    );
    assert!(check_cidr("fd60:1::1/64").is_err(), "host bits");
    assert!(check_cidr("fd60:1::/129").is_err());
    assert_eq!(normalize_protocol("58").expect("icmpv6"), "icmpv6");
    assert_eq!(normalize_protocol("ICMPv6").expect("icmpv6"), "icmpv6");
}
