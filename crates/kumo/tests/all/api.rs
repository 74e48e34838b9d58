//! Bad input through the real API: every refusal is a clear JSON error with a request id, it
//! is journaled, and it creates nothing. Authentication and tenancy between projects.

use std::collections::BTreeSet;
use std::time::Duration;

use kumo_cli::{Client, ClientError};
use kumo_types::api::{Event, ImportImage};
use kumo_types::InstanceState;

use crate::common::{Cloud, Hv};
use crate::sim::{api_err, create_req, disk_import, tiny_image};

const T: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct ApiErr {
    status: u16,
    code: String,
    message: String,
    request_id: String,
}

fn err_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ApiErr {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
            request_id,
        }) => ApiErr {
            status,
            code,
            message,
            request_id,
        },
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The journal entry of one request.
fn journaled<'a>(events: &'a [Event], request_id: &str) -> &'a Event {
    events
        .iter()
        .find(|e| e.request_id.as_deref() == Some(request_id))
        .unwrap_or_else(|| panic!("request {request_id} is not in the journal: {events:#?}"))
}

struct Raw {
    status: u16,
    request_id_header: Option<String>,
    body: serde_json::Value,
}

/// Send a request signed by `client` for `signed_body`, with `sent_body` on the wire and the
/// signed headers passed through `edit` first.
async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    signed_body: &[u8],
    sent_body: &[u8],
    edit: impl FnOnce(&mut Vec<(String, String)>),
) -> Raw {
    let url = client.url(path).expect("url");
    let mut headers = client
        .sign(
            method,
            &url,
            signed_body,
            &[("content-type".into(), "application/json".into())],
        )
        .expect("sign");
    edit(&mut headers);
    let mut rb = reqwest::Client::new().request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        url,
    );
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    into_raw(rb.body(sent_body.to_vec()).send().await.expect("send")).await
}

async fn into_raw(resp: reqwest::Response) -> Raw {
    let status = resp.status().as_u16();
    let request_id_header = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.expect("body");
    let body =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"));
    Raw {
        status,
        request_id_header,
        body,
    }
}

/// `{"error": {"code", "message", "request_id"}}` with the request id also in `x-request-id`.
fn assert_error(r: &Raw, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", r.body);
    let e = &r.body["error"];
    assert_eq!(e["code"], code, "{}", r.body);
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error has a message: {}",
        r.body
    );
    let rid = e["request_id"].as_str().expect("request_id").to_string();
    assert!(!rid.is_empty(), "{}", r.body);
    assert_eq!(
        r.request_id_header.as_deref(),
        Some(rid.as_str()),
        "x-request-id equals the body's request_id"
    );
    rid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_creates_are_refused_and_create_nothing() {
    let mut cloud = Cloud::controller_only().await;
    cloud
        .add_agent_with(Hv::Sim, &["--capacity", "2:2048"])
        .await;
    let c = &cloud.client;
    let img = tiny_image(&cloud, "tiny", false).await;
    let images_before: BTreeSet<String> = c
        .images()
        .await
        .expect("images")
        .into_iter()
        .map(|i| i.id)
        .collect();

    let long = "a".repeat(64);
    let cases: Vec<(&str, String, &str, u16, &str, &str)> = vec![
        // (what, name, image, instance type) -> (status, code, the message names)
        (
            "unknown image",
            "ok-name".into(),
            "no-such-image",
            400,
            "InvalidParameter",
            "no-such-image",
        ),
        (
            "unknown type",
            "ok-name".into(),
            &img,
            400,
            "InvalidParameter",
            "t9.huge",
        ),
        (
            "64-character name",
            long.clone(),
            &img,
            400,
            "InvalidParameter",
            "63",
        ),
        (
            "name with a space",
            "bad name".into(),
            &img,
            400,
            "InvalidParameter",
            "bad name",
        ),
        (
            "name with a semicolon",
            "x;rm".into(),
            &img,
            400,
            "InvalidParameter",
            "x;rm",
        ),
        (
            "non-ASCII name",
            "ü".into(),
            &img,
            400,
            "InvalidParameter",
            "ü",
        ),
        (
            "empty name",
            String::new(),
            &img,
            400,
            "InvalidParameter",
            "name",
        ),
        (
            "name starting with a dash",
            "-x".into(),
            &img,
            400,
            "InvalidParameter",
            "-x",
        ),
    ];
    let mut refused = vec![];
    for (what, name, image, status, code, names) in &cases {
        let itype = if *what == "unknown type" {
            "t9.huge"
        } else {
            "t1.nano"
        };
        let e = err_of(
            c.create_instance(&create_req(name, image, itype), None)
                .await,
        );
        assert_eq!(
            (e.status, e.code.as_str()),
            (*status, *code),
            "{what}: {e:?}"
        );
        assert!(
            e.message.contains(names),
            "{what}: the message names the reason ({names:?}): {}",
            e.message
        );
        assert!(!e.request_id.is_empty(), "{what}: {e:?}");
        refused.push((what.to_string(), e));
    }

    // Bigger than any host: the sim host offers 2 vCPUs (8 with overcommit) and 2048 MiB
    // (1536 for guests after the host's reserve).
    for (what, ty, reason) in [
        ("too much memory", "t1.xlarge", "needs 4096 MiB"),
        ("too many vCPUs and memory", "m1.2xlarge", "needs 16384 MiB"),
    ] {
        let e = err_of(c.create_instance(&create_req("huge", &img, ty), None).await);
        assert_eq!(
            (e.status, e.code.as_str()),
            (503, "InsufficientCapacity"),
            "{what}: {e:?}"
        );
        assert!(
            e.message.contains(reason),
            "{what}: the refusal says what is missing: {}",
            e.message
        );
        refused.push((what.into(), e));
    }

    // A duplicate live name.
    let dup = c
        .create_instance(&create_req("dup", &img, "t1.nano"), None)
        .await
        .expect("create dup");
    let e = err_of(
        c.create_instance(&create_req("dup", &img, "t1.micro"), None)
            .await,
    );
    assert_eq!((e.status, e.code.as_str()), (409, "Conflict"), "{e:?}");
    assert!(
        e.message.contains("dup") && e.message.contains(&dup.id),
        "the message names the holder: {}",
        e.message
    );
    refused.push(("duplicate name".into(), e));

    // Nothing was created by any refusal.
    let all = c.instances().await.expect("list");
    assert_eq!(
        all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec![dup.id.as_str()],
        "{all:#?}"
    );
    let images_after: BTreeSet<String> = c
        .images()
        .await
        .expect("images")
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(images_before, images_after);
    assert_eq!(c.hosts().await.expect("hosts")[0].instances, 1);

    // Every call is journaled with its outcome.
    let events = c.events(1000).await.expect("events");
    for (what, e) in &refused {
        let ev = journaled(&events, &e.request_id);
        assert_eq!(ev.action, "POST /api/v1/instances", "{what}");
        assert_eq!(ev.result, e.code, "{what}");
        assert_eq!(ev.target.as_deref(), Some("/api/v1/instances"));
    }
    assert!(
        events
            .iter()
            .any(|e| e.action == "POST /api/v1/instances" && e.result == "ok"),
        "the successful create is journaled"
    );
    assert!(
        events
            .iter()
            .any(|e| e.action == "POST /api/v1/images" && e.result == "ok"),
        "the import is journaled"
    );
    let (status, code, _) = api_err(c.resize(&dup.id, "t1.small").await);
    assert_eq!((status, code.as_str()), (409, "IncorrectState"));
    let events = c.events(1000).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.action == "PATCH /api/v1/instances/{id}"
                && e.result == "IncorrectState"
                && e.target.as_deref() == Some(&format!("/api/v1/instances/{}", dup.id))),
        "the refused resize is journaled: {events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.action.starts_with("GET ")),
        "reads are not journaled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_hosts_means_insufficient_capacity() {
    let cloud = Cloud::controller_only().await;
    let c = &cloud.client;
    let img = tiny_image(&cloud, "tiny", false).await;
    let e = err_of(
        c.create_instance(&create_req("nowhere", &img, "t1.nano"), None)
            .await,
    );
    assert_eq!(
        (e.status, e.code.as_str()),
        (503, "InsufficientCapacity"),
        "{e:?}"
    );
    assert!(e.message.contains("no hosts"), "{}", e.message);
    assert!(c.instances().await.expect("list").is_empty());
    let ev = journaled(&c.events(100).await.expect("events"), &e.request_id).clone();
    assert_eq!(
        (ev.action.as_str(), ev.result.as_str()),
        ("POST /api/v1/instances", "InsufficientCapacity")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_are_json_with_the_request_id() {
    let cloud = Cloud::start(Hv::Sim).await;
    let c = &cloud.client;
    let r = raw(
        c,
        "GET",
        "/api/v1/instances/i-0000000000000000",
        b"",
        b"",
        |_| {},
    )
    .await;
    assert_error(&r, 404, "NotFound");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("i-0000000000000000"),
        "{}",
        r.body
    );

    // Unknown paths answer in the same shape, with a request id.
    let r = raw(c, "GET", "/api/v1/no-such-thing", b"", b"", |_| {}).await;
    assert_error(&r, 404, "NotFound");

    let r = raw(c, "POST", "/api/v1/instances", b"{", b"{", |_| {}).await;
    let rid = assert_error(&r, 400, "InvalidParameter");
    let ev = journaled(&c.events(100).await.expect("events"), &rid).clone();
    assert_eq!(
        (ev.action.as_str(), ev.result.as_str()),
        ("POST /api/v1/instances", "InvalidParameter")
    );

    let r = raw(
        c,
        "POST",
        "/api/v1/instances/i-0000000000000000/stop",
        b"{}",
        b"{}",
        |_| {},
    )
    .await;
    let rid = assert_error(&r, 404, "NotFound");
    let ev = journaled(&c.events(100).await.expect("events"), &rid).clone();
    assert_eq!(
        (ev.action.as_str(), ev.result.as_str()),
        ("POST /api/v1/instances/{id}/stop", "NotFound")
    );

    // Successful calls carry a request id too.
    let r = raw(c, "GET", "/api/v1/whoami", b"", b"", |_| {}).await;
    assert_eq!(r.status, 200);
    assert!(r.request_id_header.is_some_and(|h| !h.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_must_be_signed_correctly() {
    let cloud = Cloud::start(Hv::Sim).await;
    let c = &cloud.client;
    let img = tiny_image(&cloud, "tiny", false).await;
    let body = serde_json::to_vec(&create_req("signed", &img, "t1.nano")).expect("json");

    // Not signed at all.
    let r = into_raw(
        reqwest::get(format!("{}/api/v1/instances", cloud.endpoint))
            .await
            .expect("get"),
    )
    .await;
    assert_error(&r, 401, "AuthFailure");
    let r = into_raw(
        reqwest::Client::new()
            .post(format!("{}/api/v1/instances", cloud.endpoint))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_error(&r, 401, "AuthFailure");

    // The wrong secret; an unknown access key.
    let wrong = cloud.client_for(&cloud.access_key_id, "not-the-secret");
    let e = err_of(
        wrong
            .create_instance(&create_req("signed", &img, "t1.nano"), None)
            .await,
    );
    assert_eq!(
        (e.status, e.code.as_str()),
        (401, "SignatureDoesNotMatch"),
        "{e:?}"
    );
    assert!(!e.request_id.is_empty());
    let e = err_of(wrong.instances().await);
    assert_eq!(
        (e.status, e.code.as_str()),
        (401, "SignatureDoesNotMatch"),
        "{e:?}"
    );
    let unknown = cloud.client_for("AKIAUNKNOWNUNKNOWN00", &cloud.secret);
    let e = err_of(
        unknown
            .create_instance(&create_req("signed", &img, "t1.nano"), None)
            .await,
    );
    assert_eq!(
        (e.status, e.code.as_str()),
        (401, "InvalidAccessKeyId"),
        "{e:?}"
    );

    // A body other than the signed one.
    let other = serde_json::to_vec(&create_req("tampered", &img, "t1.nano")).expect("json");
    let r = raw(c, "POST", "/api/v1/instances", &body, &other, |_| {}).await;
    assert_error(&r, 401, "SignatureDoesNotMatch");
    // ... also when the body hash header is dropped (then the signature itself must catch it:
    // the header is signed, so its absence is a malformed request).
    let r = raw(c, "POST", "/api/v1/instances", &body, &other, |h| {
        h.retain(|(k, _)| k != "x-amz-content-sha256")
    })
    .await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Signed an hour ago: the date and the credential scope both say so.
    let r = raw(c, "POST", "/api/v1/instances", &body, &body, |h| {
        let now = h
            .iter()
            .find(|(k, _)| k == "x-amz-date")
            .map(|(_, v)| v.clone())
            .expect("x-amz-date");
        let t = chrono::NaiveDateTime::parse_from_str(&now, "%Y%m%dT%H%M%SZ").expect("amz date");
        let then = (t - chrono::Duration::hours(1))
            .format("%Y%m%dT%H%M%SZ")
            .to_string();
        for (k, v) in h.iter_mut() {
            if k == "x-amz-date" {
                *v = then.clone();
            } else if k == "authorization" {
                *v = v.replace(&format!("/{}/", &now[..8]), &format!("/{}/", &then[..8]));
            }
        }
    })
    .await;
    assert_error(&r, 401, "RequestExpired");

    // None of that created anything; the very same request, signed properly, works.
    assert!(c.instances().await.expect("list").is_empty());
    let r = raw(c, "POST", "/api/v1/instances", &body, &body, |_| {}).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["name"], "signed");
    let all = c.instances().await.expect("list");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].name, "signed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projects_cannot_see_each_other() {
    let cloud = Cloud::start(Hv::Sim).await;
    let admin = &cloud.client;
    let private = tiny_image(&cloud, "private-img", false).await;
    let public = tiny_image(&cloud, "pub-img", true).await;
    let adm = admin
        .create_instance(&create_req("adm", &private, "t1.nano"), None)
        .await
        .expect("create");
    let adm = cloud.wait_state(&adm.id, InstanceState::Running, T).await;

    // A second project with a member, straight in the controller's store (no API for users yet).
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
    let bob = cloud.client_for(&key.id, &key.secret);
    let me = bob.whoami().await.expect("whoami");
    assert_eq!(
        (
            me.project_id.as_str(),
            me.role.as_str(),
            me.user_name.as_str()
        ),
        (project.as_str(), "member", "bob")
    );

    // The admin's instance does not exist for bob, by id or by name.
    assert!(bob.instances().await.expect("list").is_empty());
    for r in [
        bob.instance(&adm.id).await,
        bob.instance("adm").await,
        bob.instance_action(&adm.id, "stop").await,
        bob.instance_action(&adm.id, "start").await,
        bob.instance_action(&adm.id, "reboot").await,
        bob.terminate(&adm.id).await,
        bob.resize(&adm.id, "t1.micro").await,
    ] {
        let (status, code, msg) = api_err(r);
        assert_eq!((status, code.as_str()), (404, "NotFound"), "{msg}");
    }
    let (status, code, _) = api_err(bob.console(&adm.id, 1024).await);
    assert_eq!((status, code.as_str()), (404, "NotFound"));
    let (status, code, _) = api_err(bob.hosts().await);
    assert_eq!((status, code.as_str()), (403, "Forbidden"));
    let still = admin.instance(&adm.id).await.expect("admin still sees it");
    assert_eq!(
        (still.state, still.generation, still.desired.as_str()),
        (InstanceState::Running, adm.generation, "running"),
        "bob changed nothing"
    );

    // Images: the admin's private one is invisible, the public one is visible but not his.
    let seen: BTreeSet<String> = bob
        .images()
        .await
        .expect("images")
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert!(seen.contains(&public), "{seen:?}");
    assert!(!seen.contains(&private), "{seen:?}");
    assert_eq!(
        bob.image(&public).await.expect("public image").name,
        "pub-img"
    );
    let (status, code, _) = api_err(bob.image(&private).await);
    assert_eq!((status, code.as_str()), (404, "NotFound"));
    for id in [&public, &private] {
        let (status, code, _) = api_err(bob.delete_image(id).await);
        assert_eq!(
            (status, code.as_str()),
            (404, "NotFound"),
            "bob deletes {id}"
        );
    }
    assert_eq!(
        admin.image(&public).await.expect("still there").state,
        "available"
    );
    let path = cloud.dir.path().join("pub-img.qcow2");
    let (status, code, msg) = api_err(
        bob.import_image(&disk_import("mine-public", &path, true))
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (400, "InvalidParameter"),
        "members cannot publish: {msg}"
    );

    // Bob boots from the public image only; names are per project.
    let (status, code, _) = api_err(
        bob.create_instance(&create_req("b1", &private, "t1.nano"), None)
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "InvalidParameter"));
    let mine = bob
        .create_instance(&create_req("adm", &public, "t1.nano"), None)
        .await
        .expect("bob's own 'adm'");
    assert_eq!(mine.project_id, project);
    assert_eq!(
        bob.instances()
            .await
            .expect("list")
            .iter()
            .map(|i| i.id.clone())
            .collect::<Vec<_>>(),
        vec![mine.id.clone()]
    );
    assert_eq!(
        bob.instance("adm").await.expect("by name").id,
        mine.id,
        "bob's name means bob's instance"
    );
    assert_eq!(admin.instances().await.expect("admin lists all").len(), 2);
    let (status, code, _) = api_err(bob.terminate(&adm.id).await);
    assert_eq!((status, code.as_str()), (404, "NotFound"));

    // Journal and operations are per project too.
    let events = bob.events(1000).await.expect("events");
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|e| e.project_id.as_deref() == Some(project.as_str())),
        "{events:#?}"
    );
    assert!(events
        .iter()
        .any(|e| e.action == "POST /api/v1/instances" && e.result == "ok"));
    assert!(
        bob.operations().await.expect("ops").is_empty(),
        "the admin's imports are not bob's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_errors() {
    let cloud = Cloud::start(Hv::Sim).await;
    let c = &cloud.client;
    let disk = tiny_image(&cloud, "disk1", false).await;
    let vmlinux = cloud.dir.path().join("vmlinux");
    std::fs::copy("/bin/true", &vmlinux).expect("an ELF file to stand in for a kernel");
    let kernel = cloud
        .import_wait(&ImportImage {
            kind: Some("kernel".into()),
            ..disk_import("kern", &vmlinux, false)
        })
        .await;
    assert_eq!(c.image(&kernel).await.expect("kernel").kind, "kernel");
    let images_before: BTreeSet<String> = c
        .images()
        .await
        .expect("images")
        .into_iter()
        .map(|i| i.id)
        .collect();

    // A kernel is not something to boot from.
    for image in [kernel.as_str(), "kern"] {
        let (status, code, msg) = api_err(
            c.create_instance(&create_req("k", image, "t1.nano"), None)
                .await,
        );
        assert_eq!((status, code.as_str()), (400, "InvalidParameter"), "{msg}");
        assert!(msg.contains("kernel"), "{msg}");
    }

    // Imports that cannot start leave no image.
    let dir = cloud.dir.path().display().to_string();
    for (name, path) in [
        ("gone", "/nonexistent/x.qcow2".to_string()),
        ("relative", "disk1.qcow2".to_string()),
        ("a-dir", dir),
    ] {
        let (status, code, msg) = api_err(
            c.import_image(&disk_import(name, std::path::Path::new(&path), false))
                .await,
        );
        assert_eq!(
            (status, code.as_str()),
            (400, "InvalidParameter"),
            "{name}: {msg}"
        );
        assert!(
            msg.contains(&path),
            "{name}: the message names the path: {msg}"
        );
    }
    // One that starts but fails (not an image) leaves no image either.
    let junk = cloud.dir.path().join("junk.qcow2");
    std::fs::write(&junk, b"this is not a disk image\n".repeat(1000)).expect("write junk");
    let started = c
        .import_image(&disk_import("junk", &junk, false))
        .await
        .expect("import starts");
    let deadline = std::time::Instant::now() + T;
    let op = loop {
        let op = c.operation(&started.operation.id).await.expect("op");
        if op.state != "running" {
            break op;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "import of junk never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(op.state, "failed", "{op:?}");
    assert!(op.error.is_some());
    let (status, code, _) = api_err(c.image(&started.image.id).await);
    assert_eq!((status, code.as_str()), (404, "NotFound"));
    let images_after: BTreeSet<String> = c
        .images()
        .await
        .expect("images")
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(images_before, images_after);
    assert!(!cloud
        .data_dir()
        .join("images")
        .join(&started.image.id)
        .exists());

    // In use: a disk image by an instance, a kernel by a disk image.
    let user = c
        .create_instance(&create_req("user", &disk, "t1.nano"), None)
        .await
        .expect("create");
    let (status, code, msg) = api_err(c.delete_image(&disk).await);
    assert_eq!((status, code.as_str()), (409, "Conflict"), "{msg}");
    assert!(msg.contains(&user.id), "the message names the user: {msg}");
    assert_eq!(
        c.image(&disk).await.expect("still there").state,
        "available"
    );
    let path = cloud.dir.path().join("disk1.qcow2");
    let withk = cloud
        .import_wait(&ImportImage {
            kernel_id: Some(kernel.clone()),
            ..disk_import("withk", &path, false)
        })
        .await;
    let (status, code, msg) = api_err(c.delete_image(&kernel).await);
    assert_eq!((status, code.as_str()), (409, "Conflict"), "{msg}");
    assert!(msg.contains(&withk), "{msg}");

    // Once unused, they go.
    c.terminate(&user.id).await.expect("terminate");
    cloud
        .wait_state(&user.id, InstanceState::Terminated, T)
        .await;
    c.delete_image(&disk)
        .await
        .expect("delete unused disk image");
    c.delete_image(&withk).await.expect("delete withk");
    c.delete_image(&kernel).await.expect("delete unused kernel");
    let left: Vec<String> = c
        .images()
        .await
        .expect("images")
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let (status, code, _) = api_err(c.image(&disk).await);
    assert_eq!((status, code.as_str()), (404, "NotFound"));
    let (status, code, _) = api_err(
        c.create_instance(&create_req("late", &disk, "t1.nano"), None)
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (400, "InvalidParameter"),
        "a deleted image cannot be booted"
    );
}
