//! The EC2-compatible Query API end to end on the simulated hypervisor: every action's
//! happy path, EC2's error codes for bad input, pagination, tenancy and authentication.
//! Requests are signed like botocore signs them (SigV4, service `ec2`).

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::Utc;

use crate::common::{Cloud, Hv};
use crate::sim::tiny_image;

const REGION: &str = "kumo";

struct Ec2 {
    endpoint: String,
    key: String,
    secret: String,
    http: reqwest::Client,
}

fn form(params: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    let has_version = params.iter().any(|(k, _)| *k == "Version");
    for (k, v) in params {
        s.append_pair(k, v);
    }
    if !has_version {
        s.append_pair("Version", "2016-11-15");
    }
    s.finish()
}

impl Ec2 {
    fn new(cloud: &Cloud, key: &str, secret: &str) -> Ec2 {
        Ec2 {
            endpoint: cloud.endpoint.clone(),
            key: key.into(),
            secret: secret.into(),
            http: reqwest::Client::new(),
        }
    }

    fn sign(&self, body: &str, now: chrono::DateTime<Utc>) -> Vec<(String, String)> {
        let url = url::Url::parse(&format!("{}/", self.endpoint)).expect("url");
        let headers = vec![(
            "content-type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        )];
        let creds = kumo_sigv4::Credentials {
            access_key_id: self.key.clone(),
            secret_access_key: self.secret.clone(),
        };
        let mut signed = kumo_sigv4::sign(
            "POST",
            &url,
            &headers,
            body.as_bytes(),
            &creds,
            REGION,
            "ec2",
            now,
        )
        .expect("sign");
        signed.extend(headers);
        signed
    }

    async fn send(&self, body: String, headers: Vec<(String, String)>) -> (u16, String) {
        let mut req = self.http.post(format!("{}/", self.endpoint)).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert_eq!(ct, "text/xml;charset=UTF-8");
        (status, resp.text().await.expect("body"))
    }

    async fn call(&self, params: &[(&str, &str)]) -> (u16, String) {
        let body = form(params);
        let headers = self.sign(&body, Utc::now());
        self.send(body, headers).await
    }

    /// A call that must succeed.
    async fn ok(&self, params: &[(&str, &str)]) -> String {
        let (status, body) = self.call(params).await;
        assert_eq!(status, 200, "{params:?} failed: {body}");
        let action = params
            .iter()
            .find(|(k, _)| *k == "Action")
            .map(|(_, v)| *v)
            .unwrap_or("");
        assert!(
            body.contains(&format!(
                "<{action}Response xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>"
            )),
            "{body}"
        );
        body
    }

    /// A call that must fail with this status and code.
    async fn err(&self, params: &[(&str, &str)], status: u16, code: &str) -> String {
        let (s, body) = self.call(params).await;
        assert_eq!(
            (s, error_code(&body).as_str()),
            (status, code),
            "{params:?}: {body}"
        );
        assert!(body.contains("</Errors><RequestID>req-"), "{body}");
        body
    }
}

/// Every text of `<tag>…</tag>` in document order.
fn texts(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = vec![];
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_string());
        rest = &after[j + close.len()..];
    }
    out
}

fn first(xml: &str, tag: &str) -> String {
    texts(xml, tag).into_iter().next().unwrap_or_default()
}

fn error_code(xml: &str) -> String {
    first(xml, "Code")
}

/// Instance ids of a DescribeInstances/RunInstances document.
fn instance_ids(xml: &str) -> Vec<String> {
    texts(xml, "instanceId")
}

async fn admin_and_image(cloud: &Cloud) -> (Ec2, String) {
    let ec2 = Ec2::new(cloud, &cloud.access_key_id, &cloud.secret);
    let img = tiny_image(cloud, "ec2-img", true).await;
    (ec2, img)
}

async fn wait_state(ec2: &Ec2, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = ec2
            .ok(&[("Action", "DescribeInstances"), ("InstanceId.1", id)])
            .await;
        let states = texts(&body, "name");
        if states.first().map(String::as_str) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn ec2_instance_lifecycle() {
    let cloud = Cloud::start(Hv::Sim).await;
    let (ec2, img) = admin_and_image(&cloud).await;
    let user_data = STANDARD.encode("#!/bin/sh\necho hello <&> world\n");

    // RunInstances with user data, tags and a client token.
    let run = [
        ("Action", "RunInstances"),
        ("ImageId", img.as_str()),
        ("InstanceType", "t1.nano"),
        ("MinCount", "2"),
        ("MaxCount", "2"),
        ("UserData", user_data.as_str()),
        ("ClientToken", "tok-1"),
        ("TagSpecification.1.ResourceType", "instance"),
        ("TagSpecification.1.Tag.1.Key", "Name"),
        ("TagSpecification.1.Tag.1.Value", "web"),
        ("TagSpecification.1.Tag.2.Key", "env"),
        ("TagSpecification.1.Tag.2.Value", "prod & <test>"),
    ];
    let body = ec2.ok(&run).await;
    let rid = first(&body, "reservationId");
    assert!(rid.starts_with("r-"), "{body}");
    let ids = instance_ids(&body);
    assert_eq!(ids.len(), 2, "{body}");
    assert_eq!(texts(&body, "amiLaunchIndex"), vec!["0", "1"]);
    assert!(body.contains("<instanceState><code>0</code><name>pending</name></instanceState>"));
    assert!(
        body.contains("<value>prod &amp; &lt;test&gt;</value>"),
        "{body}"
    );
    assert_eq!(first(&body, "clientToken"), "tok-1");
    // The Name tag names the kumo instances, suffixed.
    let names: Vec<String> = {
        let mut v = vec![];
        for id in &ids {
            v.push(cloud.client.instance(id).await.expect("native").name);
        }
        v
    };
    assert_eq!(names, vec!["web-1", "web-2"]);

    // The same token and parameters: the same reservation, nothing new.
    let again = ec2.ok(&run).await;
    assert_eq!(first(&again, "reservationId"), rid);
    assert_eq!(instance_ids(&again), ids);
    // The same token with other parameters.
    let mut other = run.to_vec();
    other[2] = ("InstanceType", "t1.micro");
    ec2.err(&other, 400, "IdempotentParameterMismatch").await;

    // DryRun changes nothing.
    ec2.err(
        &[
            ("Action", "RunInstances"),
            ("ImageId", img.as_str()),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("DryRun", "true"),
        ],
        412,
        "DryRunOperation",
    )
    .await;
    ec2.err(
        &[
            ("Action", "StopInstances"),
            ("InstanceId.1", &ids[0]),
            ("DryRun", "true"),
        ],
        412,
        "DryRunOperation",
    )
    .await;

    for id in &ids {
        wait_state(&ec2, id, "running").await;
    }
    let all = ec2.ok(&[("Action", "DescribeInstances")]).await;
    assert_eq!(instance_ids(&all).len(), 2);
    assert_eq!(texts(&all, "reservationId"), vec![rid.clone()]);
    assert!(all.contains("<instanceState><code>16</code><name>running</name></instanceState>"));
    assert_eq!(first(&all, "availabilityZone"), "site1");
    assert_eq!(first(&all, "rootDeviceName"), "/dev/vda");
    assert!(first(&all, "launchTime").ends_with('Z'));
    assert_eq!(
        first(&all, "launchTime").len(),
        "2024-01-01T00:00:00.000Z".len()
    );

    // Filters: AND across, OR within, wildcards, tags.
    let f = ec2
        .ok(&[
            ("Action", "DescribeInstances"),
            ("Filter.1.Name", "tag:Name"),
            ("Filter.1.Value.1", "we?"),
            ("Filter.1.Value.2", "nothing"),
            ("Filter.2.Name", "instance-state-name"),
            ("Filter.2.Value.1", "run*"),
        ])
        .await;
    assert_eq!(instance_ids(&f).len(), 2);
    let f = ec2
        .ok(&[
            ("Action", "DescribeInstances"),
            ("Filter.1.Name", "tag-key"),
            ("Filter.1.Value.1", "env"),
            ("Filter.2.Name", "instance-state-code"),
            ("Filter.2.Value.1", "80"),
        ])
        .await;
    assert!(instance_ids(&f).is_empty(), "{f}");
    assert!(f.contains("<reservationSet/>"), "{f}");

    // Status, attributes, console output.
    let st = ec2.ok(&[("Action", "DescribeInstanceStatus")]).await;
    assert_eq!(instance_ids(&st).len(), 2);
    assert!(st.contains("<instanceStatus><status>ok</status>"), "{st}");
    let attr = ec2
        .ok(&[
            ("Action", "DescribeInstanceAttribute"),
            ("InstanceId", &ids[0]),
            ("Attribute", "userData"),
        ])
        .await;
    assert_eq!(first(&attr, "value"), user_data);
    let con = ec2
        .ok(&[("Action", "GetConsoleOutput"), ("InstanceId", &ids[0])])
        .await;
    STANDARD
        .decode(first(&con, "output"))
        .expect("console output is base64");

    // Stop, modify while stopped, start, reboot.
    let stop = ec2
        .ok(&[
            ("Action", "StopInstances"),
            ("InstanceId.1", &ids[0]),
            ("Force", "true"),
        ])
        .await;
    assert!(
        stop.contains("<previousState><code>16</code><name>running</name></previousState>"),
        "{stop}"
    );
    assert!(
        stop.contains("<currentState><code>64</code><name>stopping</name></currentState>"),
        "{stop}"
    );
    ec2.err(
        &[
            ("Action", "ModifyInstanceAttribute"),
            ("InstanceId", &ids[1]),
            ("InstanceType.Value", "t1.micro"),
        ],
        400,
        "IncorrectInstanceState",
    )
    .await;
    wait_state(&ec2, &ids[0], "stopped").await;
    ec2.ok(&[
        ("Action", "ModifyInstanceAttribute"),
        ("InstanceId", &ids[0]),
        ("InstanceType.Value", "t1.micro"),
    ])
    .await;
    let new_ud = STANDARD.encode("new");
    ec2.ok(&[
        ("Action", "ModifyInstanceAttribute"),
        ("InstanceId", &ids[0]),
        ("UserData.Value", &new_ud),
    ])
    .await;
    let attr = ec2
        .ok(&[
            ("Action", "DescribeInstanceAttribute"),
            ("InstanceId", &ids[0]),
            ("Attribute", "instanceType"),
        ])
        .await;
    assert!(
        attr.contains("<instanceType><value>t1.micro</value></instanceType>"),
        "{attr}"
    );
    let st = ec2
        .ok(&[
            ("Action", "DescribeInstanceStatus"),
            ("IncludeAllInstances", "true"),
        ])
        .await;
    assert!(st.contains("<name>stopped</name>"), "{st}");
    ec2.ok(&[("Action", "StartInstances"), ("InstanceId.1", &ids[0])])
        .await;
    wait_state(&ec2, &ids[0], "running").await;
    let reboot = ec2
        .ok(&[("Action", "RebootInstances"), ("InstanceId.1", &ids[0])])
        .await;
    assert!(reboot.contains("<return>true</return>"));

    // Tags.
    ec2.ok(&[
        ("Action", "CreateTags"),
        ("ResourceId.1", &ids[0]),
        ("ResourceId.2", &img),
        ("Tag.1.Key", "team"),
        ("Tag.1.Value", "blue"),
    ])
    .await;
    let tags = ec2
        .ok(&[
            ("Action", "DescribeTags"),
            ("Filter.1.Name", "key"),
            ("Filter.1.Value.1", "team"),
        ])
        .await;
    assert_eq!(texts(&tags, "resourceId").len(), 2, "{tags}");
    assert!(tags.contains("<resourceType>image</resourceType>"));
    ec2.ok(&[
        ("Action", "DeleteTags"),
        ("ResourceId.1", &ids[0]),
        ("Tag.1.Key", "team"),
        ("Tag.1.Value", "other"),
    ])
    .await;
    let tags = ec2
        .ok(&[
            ("Action", "DescribeTags"),
            ("Filter.1.Name", "resource-id"),
            ("Filter.1.Value.1", &ids[0]),
        ])
        .await;
    assert!(
        texts(&tags, "key").contains(&"team".to_string()),
        "value mismatch keeps it: {tags}"
    );
    ec2.ok(&[
        ("Action", "DeleteTags"),
        ("ResourceId.1", &ids[0]),
        ("Tag.1.Key", "team"),
    ])
    .await;
    let tags = ec2
        .ok(&[
            ("Action", "DescribeTags"),
            ("Filter.1.Name", "resource-id"),
            ("Filter.1.Value.1", &ids[0]),
        ])
        .await;
    assert_eq!(texts(&tags, "key"), vec!["Name", "env"], "{tags}");

    // Terminate: visible as terminated, then gone once terminated more than an hour ago.
    let term = ec2
        .ok(&[("Action", "TerminateInstances"), ("InstanceId.1", &ids[1])])
        .await;
    assert!(
        term.contains("<currentState><code>32</code><name>shutting-down</name></currentState>"),
        "{term}"
    );
    wait_state(&ec2, &ids[1], "terminated").await;
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    sqlx::query("UPDATE instances SET terminated_at = '2020-01-01T00:00:00.000Z' WHERE id = $1")
        .bind(&ids[1])
        .execute(store.pool())
        .await
        .expect("age the instance");
    store.close().await;
    ec2.err(
        &[("Action", "DescribeInstances"), ("InstanceId.1", &ids[1])],
        400,
        "InvalidInstanceID.NotFound",
    )
    .await;
    let all = ec2.ok(&[("Action", "DescribeInstances")]).await;
    assert_eq!(instance_ids(&all), vec![ids[0].clone()]);
    let tags = ec2
        .ok(&[
            ("Action", "DescribeTags"),
            ("Filter.1.Name", "resource-id"),
            ("Filter.1.Value.1", &ids[1]),
        ])
        .await;
    assert!(
        tags.contains("<tagSet/>"),
        "tags of a gone instance: {tags}"
    );
}

#[tokio::test]
async fn ec2_pagination_and_describes() {
    let mut cloud = Cloud::controller_only().await;
    cloud
        .add_agent_with(Hv::Sim, &["--capacity", "64:65536"])
        .await;
    let (ec2, img) = admin_and_image(&cloud).await;
    let body = ec2
        .ok(&[
            ("Action", "RunInstances"),
            ("ImageId", &img),
            ("InstanceType", "t1.nano"),
            ("MinCount", "12"),
            ("MaxCount", "12"),
        ])
        .await;
    let mut ids = instance_ids(&body);
    assert_eq!(ids.len(), 12);
    // Generated names.
    let one = cloud.client.instance(&ids[0]).await.expect("native");
    assert!(one.name.starts_with("ec2-"), "{}", one.name);
    // A native instance gets a stable reservation of its own.
    let native = cloud
        .client
        .create_instance(&crate::sim::create_req("native1", &img, "t1.nano"), None)
        .await
        .expect("native create");
    ids.push(native.id.clone());
    ids.sort();

    let mut seen = vec![];
    let mut tokens: Vec<String> = vec![];
    let mut token: Option<String> = None;
    loop {
        let mut params = vec![("Action", "DescribeInstances"), ("MaxResults", "5")];
        if let Some(t) = &token {
            params.push(("NextToken", t));
        }
        let page = ec2.ok(&params).await;
        let got = instance_ids(&page);
        assert!(got.len() <= 5);
        seen.extend(got);
        match texts(&page, "nextToken").pop() {
            Some(t) => {
                assert!(!tokens.contains(&t), "token repeated");
                tokens.push(t.clone());
                token = Some(t);
            }
            None => break,
        }
    }
    // Within a page, instances are grouped by reservation.
    seen.sort();
    assert_eq!(seen, ids, "every instance exactly once");
    assert_eq!(tokens.len(), 2);
    let r1 = ec2
        .ok(&[
            ("Action", "DescribeInstances"),
            ("InstanceId.1", &native.id),
        ])
        .await;
    let r2 = ec2
        .ok(&[
            ("Action", "DescribeInstances"),
            ("InstanceId.1", &native.id),
        ])
        .await;
    assert_eq!(first(&r1, "reservationId"), first(&r2, "reservationId"));
    assert!(first(&r1, "reservationId").starts_with("r-"));

    // Types, images, regions, zones, account attributes.
    let types = ec2
        .ok(&[
            ("Action", "DescribeInstanceTypes"),
            ("InstanceType.1", "t1.small"),
        ])
        .await;
    assert_eq!(texts(&types, "instanceType"), vec!["t1.small"]);
    assert!(
        types.contains("<memoryInfo><sizeInMiB>512</sizeInMiB></memoryInfo>"),
        "{types}"
    );
    ec2.err(
        &[
            ("Action", "DescribeInstanceTypes"),
            ("InstanceType.1", "x9.huge"),
        ],
        400,
        "InvalidInstanceType",
    )
    .await;
    let images = ec2
        .ok(&[("Action", "DescribeImages"), ("Owner.1", "self")])
        .await;
    assert_eq!(texts(&images, "imageId"), vec![img.clone()]);
    assert_eq!(first(&images, "imageState"), "available");
    let images = ec2
        .ok(&[
            ("Action", "DescribeImages"),
            ("Filter.1.Name", "name"),
            ("Filter.1.Value.1", "ec2-*"),
        ])
        .await;
    assert_eq!(texts(&images, "imageId"), vec![img.clone()]);
    let regions = ec2.ok(&[("Action", "DescribeRegions")]).await;
    assert_eq!(first(&regions, "regionName"), "kumo");
    assert_eq!(first(&regions, "regionEndpoint"), cloud.endpoint);
    let zones = ec2.ok(&[("Action", "DescribeAvailabilityZones")]).await;
    assert_eq!(texts(&zones, "zoneName"), vec!["site1"]);
    assert_eq!(first(&zones, "zoneState"), "available");
    let attrs = ec2
        .ok(&[
            ("Action", "DescribeAccountAttributes"),
            ("AttributeName.1", "supported-platforms"),
        ])
        .await;
    assert_eq!(texts(&attrs, "attributeValue"), vec!["VPC"]);

    // Register an image from a server-side file, then deregister it; refused while in use.
    let path = cloud.dir.path().join("reg.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success());
    let reg = ec2
        .ok(&[
            ("Action", "RegisterImage"),
            ("Name", "registered"),
            ("ImageLocation", &path.display().to_string()),
        ])
        .await;
    let new_img = first(&reg, "imageId");
    assert!(new_img.starts_with("ami-"), "{reg}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = ec2
            .ok(&[("Action", "DescribeImages"), ("ImageId.1", &new_img)])
            .await;
        if first(&d, "imageState") == "available" {
            break;
        }
        assert!(Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ec2.err(
        &[("Action", "DeregisterImage"), ("ImageId", &img)],
        400,
        "DependencyViolation",
    )
    .await;
    let dereg = ec2
        .ok(&[("Action", "DeregisterImage"), ("ImageId", &new_img)])
        .await;
    assert!(dereg.contains("<return>true</return>"));
    ec2.err(
        &[("Action", "DescribeImages"), ("ImageId.1", &new_img)],
        400,
        "InvalidAMIID.NotFound",
    )
    .await;
}

#[tokio::test]
async fn ec2_bad_input() {
    let cloud = Cloud::controller_only().await;
    let ec2 = Ec2::new(&cloud, &cloud.access_key_id, &cloud.secret);
    let di = ("Action", "DescribeInstances");
    ec2.err(
        &[di, ("InstanceId.0", "i-0123456789abcdef0")],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(
        &[di, ("InstanceId.x", "i-0123456789abcdef0")],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(&[di, ("Bogus", "1")], 400, "UnknownParameter")
        .await;
    ec2.err(&[di, ("MaxResults", "ten")], 400, "InvalidParameterValue")
        .await;
    ec2.err(&[di, ("MaxResults", "4")], 400, "InvalidParameterValue")
        .await;
    ec2.err(&[di, ("MaxResults", "1001")], 400, "InvalidParameterValue")
        .await;
    ec2.err(&[di, ("DryRun", "maybe")], 400, "InvalidParameterValue")
        .await;
    ec2.err(
        &[
            di,
            ("MaxResults", "5"),
            ("InstanceId.1", "i-0123456789abcdef0"),
        ],
        400,
        "InvalidParameterCombination",
    )
    .await;
    ec2.err(
        &[di, ("InstanceId.1", "nope")],
        400,
        "InvalidInstanceID.Malformed",
    )
    .await;
    ec2.err(
        &[di, ("InstanceId.1", "i-0123456789abcdef0")],
        400,
        "InvalidInstanceID.NotFound",
    )
    .await;
    ec2.err(
        &[di, ("Filter.1.Name", "bogus"), ("Filter.1.Value.1", "x")],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(
        &[di, ("NextToken", "garbage")],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(
        &[
            ("Action", "RunInstances"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
        ],
        400,
        "MissingParameter",
    )
    .await;
    ec2.err(
        &[
            ("Action", "RunInstances"),
            ("ImageId", "ami-0123456789abcdef0"),
            ("MinCount", "2"),
            ("MaxCount", "1"),
        ],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(
        &[
            ("Action", "RunInstances"),
            ("ImageId", "bad"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
        ],
        400,
        "InvalidAMIID.Malformed",
    )
    .await;
    ec2.err(
        &[
            ("Action", "RunInstances"),
            ("ImageId", "ami-0123456789abcdef0"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
        ],
        400,
        "InvalidAMIID.NotFound",
    )
    .await;
    ec2.err(
        &[
            ("Action", "RunInstances"),
            ("ImageId", "ami-0123456789abcdef0"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("UserData", "%%%"),
        ],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(&[("Action", "StartInstances")], 400, "MissingParameter")
        .await;
    ec2.err(&[("Action", "CreateVolume")], 400, "MissingParameter")
        .await;
    ec2.err(
        &[("Action", "DescribeKeyPairs"), ("KeyName.1", "nope")],
        400,
        "InvalidKeyPair.NotFound",
    )
    .await;
    ec2.err(&[("Action", "LaunchRockets")], 400, "InvalidAction")
        .await;
    ec2.err(&[("Version", "2016-11-15")], 400, "MissingParameter")
        .await;
    ec2.err(
        &[
            ("Action", "DescribeInstanceAttribute"),
            ("InstanceId", "i-0123456789abcdef0"),
            ("Attribute", "colour"),
        ],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(
        &[
            ("Action", "CreateTags"),
            ("ResourceId.1", "i-0123456789abcdef0"),
            ("Tag.1.Key", "aws:x"),
        ],
        400,
        "InvalidParameterValue",
    )
    .await;
    ec2.err(
        &[
            ("Action", "CreateTags"),
            ("ResourceId.1", "thing-1"),
            ("Tag.1.Key", "a"),
        ],
        400,
        "InvalidID",
    )
    .await;
    ec2.err(
        &[("Action", "DescribeRegions"), ("RegionName.1", "us-east-1")],
        400,
        "InvalidParameterValue",
    )
    .await;

    // Authentication.
    let body = form(&[di]);
    let mut headers = ec2.sign(&body, Utc::now());
    let (s, b) = ec2
        .send(format!("{body}&MaxResults=5"), headers.clone())
        .await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (401, "AuthFailure"),
        "tampered: {b}"
    );
    let old = ec2.sign(&body, Utc::now() - chrono::Duration::minutes(20));
    let (s, b) = ec2.send(body.clone(), old).await;
    assert_eq!((s, error_code(&b).as_str()), (400, "RequestExpired"), "{b}");
    let stranger = Ec2::new(&cloud, "AKIAUNKNOWNUNKNOWN00", "secret");
    let h = stranger.sign(&body, Utc::now());
    let (s, b) = ec2.send(body.clone(), h).await;
    assert_eq!((s, error_code(&b).as_str()), (401, "AuthFailure"), "{b}");
    let (s, b) = ec2
        .send(
            body.clone(),
            vec![(
                "content-type".into(),
                "application/x-www-form-urlencoded".into(),
            )],
        )
        .await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (401, "AuthFailure"),
        "unsigned: {b}"
    );
    headers.retain(|(k, _)| k != "authorization");
    let (s, _) = ec2.send(body.clone(), headers).await;
    assert_eq!(s, 401);
    let wrong_secret = Ec2::new(&cloud, &cloud.access_key_id, "not-the-secret");
    let h = wrong_secret.sign(&body, Utc::now());
    let (s, b) = ec2.send(body, h).await;
    assert_eq!((s, error_code(&b).as_str()), (401, "AuthFailure"), "{b}");
}

#[tokio::test]
async fn ec2_projects_see_only_their_own() {
    let cloud = Cloud::start(Hv::Sim).await;
    let (admin, img) = admin_and_image(&cloud).await;
    let mine = admin
        .ok(&[
            ("Action", "RunInstances"),
            ("ImageId", &img),
            ("InstanceType", "t1.nano"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Tag.1.Key", "secret"),
            ("TagSpecification.1.Tag.1.Value", "admin-only"),
        ])
        .await;
    let id = first(&mine, "instanceId");
    let private = tiny_image(&cloud, "private-ec2", false).await;

    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    let project = store.create_project("other").await.expect("project");
    let user = store
        .create_user("bob", &project, "member")
        .await
        .expect("user");
    let key = store.create_access_key(&user).await.expect("key");
    store.close().await;
    let bob = Ec2::new(&cloud, &key.id, &key.secret);

    let all = bob.ok(&[("Action", "DescribeInstances")]).await;
    assert!(instance_ids(&all).is_empty(), "{all}");
    for action in [
        "StopInstances",
        "TerminateInstances",
        "StartInstances",
        "RebootInstances",
    ] {
        let b = bob
            .err(
                &[("Action", action), ("InstanceId.1", &id)],
                400,
                "InvalidInstanceID.NotFound",
            )
            .await;
        assert!(!b.contains("running") && !b.contains("admin"), "{b}");
    }
    bob.err(
        &[("Action", "GetConsoleOutput"), ("InstanceId", &id)],
        400,
        "InvalidInstanceID.NotFound",
    )
    .await;
    bob.err(
        &[
            ("Action", "CreateTags"),
            ("ResourceId.1", &id),
            ("Tag.1.Key", "x"),
        ],
        400,
        "InvalidInstanceID.NotFound",
    )
    .await;
    bob.err(
        &[("Action", "DescribeImages"), ("ImageId.1", &private)],
        400,
        "InvalidAMIID.NotFound",
    )
    .await;
    // A public image is visible to bob but not his to change; a private one does not exist for him.
    bob.err(
        &[("Action", "DeregisterImage"), ("ImageId", &img)],
        403,
        "UnauthorizedOperation",
    )
    .await;
    bob.err(
        &[
            ("Action", "DeregisterImage"),
            ("ImageId", &img),
            ("DryRun", "true"),
        ],
        403,
        "UnauthorizedOperation",
    )
    .await;
    bob.err(
        &[("Action", "DeregisterImage"), ("ImageId", &private)],
        400,
        "InvalidAMIID.NotFound",
    )
    .await;
    let tags = bob.ok(&[("Action", "DescribeTags")]).await;
    assert!(!tags.contains("admin-only"), "{tags}");
    // Bob launches from the public image; his instance is his alone.
    let his = bob
        .ok(&[
            ("Action", "RunInstances"),
            ("ImageId", &img),
            ("InstanceType", "t1.nano"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
        ])
        .await;
    assert_eq!(first(&his, "ownerId"), project);
    let all = bob.ok(&[("Action", "DescribeInstances")]).await;
    assert_eq!(instance_ids(&all), instance_ids(&his));
    // Capacity: more than any host can take, and nothing is left behind.
    let before = admin.ok(&[("Action", "DescribeInstances")]).await;
    admin
        .err(
            &[
                ("Action", "RunInstances"),
                ("ImageId", &img),
                ("InstanceType", "m1.2xlarge"),
                ("MinCount", "500"),
                ("MaxCount", "500"),
            ],
            500,
            "InsufficientInstanceCapacity",
        )
        .await;
    let live = |xml: &str| {
        texts(xml, "name")
            .into_iter()
            .filter(|s| s == "pending" || s == "running")
            .count()
    };
    let after = admin.ok(&[("Action", "DescribeInstances")]).await;
    assert_eq!(live(&after), live(&before), "rolled back: {after}");
}
