//! Tests of the metadata service: the router driven with fake peers, and one listener in a scratch namespace.

use super::*;
use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

const NET: &str = "net-1";
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 6);
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKumo alice@laptop";

struct Fake(HashMap<(String, Ipv4Addr), VmMetadata>);

impl MetadataSource for Fake {
    fn lookup(&self, network: &str, ip: Ipv4Addr) -> Option<VmMetadata> {
        self.0.get(&(network.to_string(), ip)).cloned()
    }
}

/// A: elastic IP, two keys, user-data, two groups. B: nothing optional.
fn vm_a() -> VmMetadata {
    VmMetadata {
        instance_id: "i-0123456789abcdef0".into(),
        hostname: "web-1".into(),
        local_ipv4: A.to_string(),
        public_ipv4: Some("203.0.113.7".into()),
        mac: "52:54:00:AA:BB:CC".into(),
        availability_zone: "kumo-1a".into(),
        instance_type: "t3.small".into(),
        ami_id: "ami-0000000000000abcd".into(),
        reservation_id: "r-0fedcba9876543210".into(),
        security_groups: vec!["default".into(), "web".into()],
        public_keys: vec![
            ("alice".into(), KEY.into()),
            ("bob".into(), "ssh-rsa AAAAB3 bob".into()),
        ],
        user_data: Some("#!/bin/sh\necho hi\n".into()),
    }
}

fn vm_b() -> VmMetadata {
    VmMetadata {
        instance_id: "i-00000000000000bbb".into(),
        hostname: "db-1".into(),
        local_ipv4: B.to_string(),
        mac: "52:54:00:00:00:0b".into(),
        availability_zone: "site-b".into(),
        instance_type: "t3.micro".into(),
        ami_id: "ami-0000000000000abcd".into(),
        reservation_id: "r-0000000000000000b".into(),
        security_groups: vec!["default".into()],
        ..Default::default()
    }
}

fn fake(extra: &[(Ipv4Addr, VmMetadata)]) -> Arc<dyn MetadataSource> {
    let mut m = HashMap::new();
    m.insert((NET.to_string(), A), vm_a());
    m.insert((NET.to_string(), B), vm_b());
    // Same address as B in another network: must never be served here.
    m.insert(("net-2".to_string(), STRANGER), vm_b());
    for (ip, vm) in extra {
        m.insert((NET.to_string(), *ip), vm.clone());
    }
    Arc::new(Fake(m))
}

/// A service whose clock the test moves.
fn fixture() -> (Router, Arc<Service>, Arc<Mutex<Duration>>) {
    let start = Instant::now();
    let offset = Arc::new(Mutex::new(Duration::ZERO));
    let o = offset.clone();
    let clock: Clock = Arc::new(move || start + *o.lock().unwrap());
    let svc = service(NET.into(), fake(&[]), clock);
    (app(svc.clone()), svc, offset)
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    from: Ipv4Addr,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(from.into(), 40000)));
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

async fn ok(app: &Router, path: &str, from: Ipv4Addr) -> String {
    let (status, headers, body) = call(app, "GET", path, from, &[]).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    assert_eq!(headers[CONTENT_TYPE], "text/plain", "GET {path}");
    body
}

async fn status(app: &Router, method: &str, path: &str, from: Ipv4Addr) -> StatusCode {
    call(app, method, path, from, &[]).await.0
}

/// Expected bodies: directory listings and leaves, for A (everything) and B (nothing optional).
/// `MACS` stands for /latest/meta-data/network/interfaces/macs.
#[rustfmt::skip]
const TREE: &[(Ipv4Addr, &str, &str)] = &[
    (A, "/latest/", "dynamic\nmeta-data\nuser-data"),
    (A, "/2009-04-04", "dynamic\nmeta-data\nuser-data"),
    (A, "/2021-03-23/", "dynamic\nmeta-data\nuser-data"),
    (B, "/latest/", "dynamic\nmeta-data"),
    (B, "/1.0/", "dynamic\nmeta-data"),
    (A, "/latest/meta-data/", "ami-id\nhostname\ninstance-id\ninstance-type\n\
        local-hostname\nlocal-ipv4\nmac\nnetwork/\nplacement/\npublic-hostname\npublic-ipv4\npublic-keys/\n\
        reservation-id\nsecurity-groups"),
    (B, "/2016-09-02/meta-data", "ami-id\nhostname\ninstance-id\ninstance-type\n\
        local-hostname\nlocal-ipv4\nmac\nnetwork/\nplacement/\nreservation-id\nsecurity-groups"),
    (A, "/latest/meta-data/placement/", "availability-zone\nregion"),
    (A, "/latest/meta-data/public-keys/", "0=alice\n1=bob"),
    (A, "/latest/meta-data/public-keys/1/", "openssh-key"),
    (A, "MACS/", "52:54:00:aa:bb:cc/"),
    (A, "MACS/52:54:00:aa:bb:cc/", "device-number\nlocal-ipv4s\nmac\npublic-ipv4s"),
    (B, "MACS/52%3A54%3A00%3A00%3A00%3A0b/", "device-number\nlocal-ipv4s\nmac"),
    (A, "/latest/dynamic/", "instance-identity/"),
    (A, "/latest/dynamic/instance-identity/", "document"),
    (A, "/latest/meta-data/ami-id", "ami-0000000000000abcd"),
    (A, "/latest/meta-data/hostname", "web-1"),
    (A, "/latest/meta-data/instance-id", "i-0123456789abcdef0"),
    (A, "/2009-04-04/meta-data/instance-id", "i-0123456789abcdef0"),
    (B, "/2018-09-24/meta-data/instance-id", "i-00000000000000bbb"),
    (A, "/latest/meta-data/instance-type", "t3.small"),
    (A, "/latest/meta-data/local-hostname", "web-1"),
    (A, "/latest/meta-data/local-ipv4", "10.0.0.5"),
    (A, "/latest/meta-data/mac", "52:54:00:aa:bb:cc"),
    (A, "/latest/meta-data/placement/availability-zone", "kumo-1a"),
    (A, "/latest/meta-data/placement/region", "kumo-1"),
    (B, "/latest/meta-data/placement/region", "site-b"),
    (A, "/latest/meta-data/public-hostname", "203.0.113.7"),
    (A, "/latest/meta-data/public-ipv4", "203.0.113.7"),
    (A, "/latest/meta-data/public-keys/0/openssh-key", KEY),
    (A, "/latest/meta-data/public-keys/1/openssh-key", "ssh-rsa AAAAB3 bob"),
    (A, "/latest/meta-data/reservation-id", "r-0fedcba9876543210"),
    (A, "/latest/meta-data/security-groups", "default\nweb"),
    (A, "MACS/52:54:00:aa:bb:cc/device-number", "0"),
    (A, "MACS/52:54:00:aa:bb:cc/local-ipv4s", "10.0.0.5"),
    (A, "MACS/52:54:00:aa:bb:cc/mac", "52:54:00:aa:bb:cc"),
    (A, "MACS/52:54:00:aa:bb:cc/public-ipv4s", "203.0.113.7"),
    (A, "/latest/user-data", "#!/bin/sh\necho hi\n"),
    (A, "/nocloud/meta-data", "instance-id: \"i-0123456789abcdef0\"\nlocal-hostname: \"web-1\"\npublic-keys:\n\
        \x20 - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKumo alice@laptop\"\n  - \"ssh-rsa AAAAB3 bob\"\n"),
    (B, "/nocloud/meta-data", "instance-id: \"i-00000000000000bbb\"\nlocal-hostname: \"db-1\"\n"),
    (A, "/nocloud/user-data", "#!/bin/sh\necho hi\n"),
    (B, "/nocloud/user-data", "#cloud-config\n{}\n"),
    (A, "/nocloud/vendor-data", ""),
];

/// Requests that must fail, and how.
#[rustfmt::skip]
const REFUSED: &[(Ipv4Addr, &str, &str, StatusCode)] = &[
    (B, "GET", "/latest/user-data", StatusCode::NOT_FOUND),
    (B, "GET", "/latest/meta-data/public-keys/", StatusCode::NOT_FOUND),
    (B, "GET", "/latest/meta-data/public-keys/0/openssh-key", StatusCode::NOT_FOUND),
    (A, "GET", "/latest/meta-data/public-keys/2/openssh-key", StatusCode::NOT_FOUND),
    (B, "GET", "/latest/meta-data/public-ipv4", StatusCode::NOT_FOUND),
    (B, "GET", "/latest/meta-data/public-hostname", StatusCode::NOT_FOUND),
    (B, "GET", "MACS/52:54:00:00:00:0b/public-ipv4s", StatusCode::NOT_FOUND),
    // A's MAC asked by B: each VM sees only its own tree.
    (B, "GET", "MACS/52:54:00:aa:bb:cc/", StatusCode::NOT_FOUND),
    (B, "GET", "/latest/meta-data/nope", StatusCode::NOT_FOUND),
    (B, "GET", "/latest/meta-data/instance-id/extra", StatusCode::NOT_FOUND),
    (B, "GET", "/latest//meta-data/instance-id", StatusCode::NOT_FOUND),
    (B, "GET", "/2010-01-01/", StatusCode::NOT_FOUND),
    (B, "GET", "/nope", StatusCode::NOT_FOUND),
    (B, "GET", "/nocloud/", StatusCode::NOT_FOUND),
    (B, "GET", "/nocloud/network-config", StatusCode::NOT_FOUND),
    // STRANGER is a VM of net-2, not of this network.
    (STRANGER, "GET", "/latest/meta-data/instance-id", StatusCode::FORBIDDEN),
    (STRANGER, "GET", "/", StatusCode::FORBIDDEN),
    (STRANGER, "PUT", TOKEN_PATH, StatusCode::FORBIDDEN),
    (A, "POST", "/latest/meta-data/", StatusCode::METHOD_NOT_ALLOWED),
    (A, "DELETE", "/latest/meta-data/", StatusCode::METHOD_NOT_ALLOWED),
    (A, "HEAD", "/", StatusCode::METHOD_NOT_ALLOWED),
    (A, "PATCH", "/latest/meta-data/", StatusCode::METHOD_NOT_ALLOWED),
    (A, "PUT", "/latest/meta-data/", StatusCode::METHOD_NOT_ALLOWED),
    (A, "GET", TOKEN_PATH, StatusCode::METHOD_NOT_ALLOWED),
];

fn expand(path: &str) -> String {
    path.replace("MACS", "/latest/meta-data/network/interfaces/macs")
}

#[tokio::test]
async fn listings_and_leaves() {
    let (app, _, _) = fixture();
    let versions = ok(&app, "/", A).await;
    let lines: Vec<&str> = versions.lines().collect();
    assert_eq!((lines[0], lines[lines.len() - 1]), ("1.0", "latest"));
    for v in [
        "2007-01-19",
        "2009-04-04",
        "2016-09-02",
        "2018-09-24",
        "2021-03-23",
    ] {
        assert!(lines.contains(&v), "{v} missing from {versions}");
    }
    for (from, path, want) in TREE {
        let path = expand(path);
        assert_eq!(
            ok(&app, &path, *from).await,
            *want,
            "GET {path} from {from}"
        );
    }
    let doc = ok(&app, "/latest/dynamic/instance-identity/document", A).await;
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    for (k, v) in [
        ("instanceId", "i-0123456789abcdef0"),
        ("region", "kumo-1"),
        ("availabilityZone", "kumo-1a"),
        ("instanceType", "t3.small"),
        ("imageId", "ami-0000000000000abcd"),
        ("privateIp", "10.0.0.5"),
        ("accountId", ACCOUNT_ID),
    ] {
        assert_eq!(doc[k], v, "{k}");
    }
    let doc = ok(&app, "/latest/dynamic/instance-identity/document", B).await;
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(
        (&doc["instanceId"], &doc["region"]),
        (&"i-00000000000000bbb".into(), &"site-b".into())
    );
}

#[tokio::test]
async fn refusals() {
    let (app, svc, _) = fixture();
    for (from, method, path, want) in REFUSED {
        let (st, headers, body) =
            call(&app, method, &expand(path), *from, &[(TTL_HEADER, "60")]).await;
        assert_eq!(st, *want, "{method} {path} from {from}: {body}");
        match *want {
            StatusCode::FORBIDDEN => assert_eq!(body, "not a VM of this network\n"),
            StatusCode::METHOD_NOT_ALLOWED => assert!(headers.contains_key(ALLOW)),
            _ => {}
        }
    }
    assert!(
        svc.tokens.lock().unwrap().is_empty(),
        "no refused PUT made a token"
    );
    // An IPv4-mapped IPv6 peer is the same VM.
    let mut req = Request::get("/latest/meta-data/instance-id")
        .body(Body::empty())
        .unwrap();
    let mapped = SocketAddr::new(A.to_ipv6_mapped().into(), 1);
    req.extensions_mut().insert(ConnectInfo(mapped));
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
}

async fn token(app: &Router, from: Ipv4Addr, ttl: &str) -> String {
    let (st, headers, body) = call(app, "PUT", TOKEN_PATH, from, &[(TTL_HEADER, ttl)]).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(headers[TTL_HEADER], ttl);
    body
}

#[tokio::test]
async fn v2_token_flow() {
    let (app, svc, clock) = fixture();
    let path = "/latest/meta-data/instance-id";
    let t = token(&app, A, "60").await;
    assert!(
        t.len() >= 64 && t.bytes().all(|b| b.is_ascii_hexdigit()),
        "{t}"
    );
    assert_ne!(t, token(&app, A, "21600").await, "tokens must be random");
    let get = |from, token: &str| {
        let (app, token) = (app.clone(), token.to_string());
        async move { call(&app, "GET", path, from, &[(TOKEN_HEADER, &token)]).await }
    };
    let (st, _, body) = get(A, &t).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "i-0123456789abcdef0"));
    // IMDSv1 stays on.
    assert_eq!(status(&app, "GET", path, A).await, StatusCode::OK);
    // A's token presented by B, an unknown token, and NoCloud with a bad token.
    assert_eq!(get(B, &t).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(get(A, &"0".repeat(64)).await.0, StatusCode::UNAUTHORIZED);
    let bogus = [(TOKEN_HEADER, "bogus")];
    let (st, _, _) = call(&app, "GET", "/nocloud/meta-data", A, &bogus).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Expiry: good at 59 s, gone at 60 s, and removed from the table.
    *clock.lock().unwrap() = Duration::from_secs(59);
    assert_eq!(get(A, &t).await.0, StatusCode::OK);
    *clock.lock().unwrap() = Duration::from_secs(60);
    assert_eq!(get(A, &t).await.0, StatusCode::UNAUTHORIZED);
    assert!(!svc.tokens.lock().unwrap().contains_key(&t));
    assert_eq!(svc.tokens.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_token_requests_change_nothing() {
    let (app, svc, _) = fixture();
    for ttl in ["0", "21601", "-1", "abc", "", "1.5", "99999999999999999999"] {
        let (st, _, body) = call(&app, "PUT", TOKEN_PATH, A, &[(TTL_HEADER, ttl)]).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "ttl {ttl:?}");
        assert!(body.contains("1 to 21600"), "{body}");
    }
    assert_eq!(
        status(&app, "PUT", TOKEN_PATH, A).await,
        StatusCode::BAD_REQUEST
    );
    let (st, _, _) = call(
        &app,
        "PUT",
        TOKEN_PATH,
        A,
        &[(TTL_HEADER, "60"), ("X-Forwarded-For", "10.0.0.6")],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(svc.tokens.lock().unwrap().is_empty());
    token(&app, A, "1").await;
    token(&app, A, "21600").await;
    assert_eq!(svc.tokens.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn token_table_is_bounded() {
    let (app, svc, clock) = fixture();
    let first = token(&app, A, "600").await;
    for _ in 0..TOKENS_PER_VM {
        token(&app, A, "600").await;
    }
    let b = token(&app, B, "600").await;
    {
        let tokens = svc.tokens.lock().unwrap();
        assert_eq!(tokens.values().filter(|t| t.ip == A).count(), TOKENS_PER_VM);
        assert!(
            !tokens.contains_key(&first),
            "the oldest token of A is evicted"
        );
        assert!(tokens.contains_key(&b), "A's flood does not touch B");
    }
    let (st, _, _) = call(&app, "GET", "/", A, &[(TOKEN_HEADER, &first)]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // The whole table is capped: a full table refuses new tokens and keeps the old ones.
    {
        let mut tokens = svc.tokens.lock().unwrap();
        for i in 0..MAX_TOKENS - tokens.len() {
            let t = Token {
                ip: Ipv4Addr::from(0x0a01_0000 + i as u32),
                expires: Instant::now() + Duration::from_secs(3600),
                serial: 0,
            };
            tokens.insert(format!("filler-{i}"), t);
        }
    }
    let (st, _, _) = call(&app, "PUT", TOKEN_PATH, B, &[(TTL_HEADER, "60")]).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(svc.tokens.lock().unwrap().len(), MAX_TOKENS);
    assert!(svc.tokens.lock().unwrap().contains_key(&b));
    svc.tokens
        .lock()
        .unwrap()
        .retain(|k, _| !k.starts_with("filler-"));
    // Expired tokens are purged by the next issue.
    *clock.lock().unwrap() = Duration::from_secs(600);
    token(&app, B, "60").await;
    assert_eq!(svc.tokens.lock().unwrap().len(), 1);
}

#[test]
fn nocloud_values_cannot_inject_yaml() {
    let evil = VmMetadata {
        hostname: "x\"\ninstance-id: i-evil".into(),
        ..vm_b()
    };
    let y = nocloud_meta_data(&evil);
    assert_eq!(y.lines().count(), 2, "{y}");
    assert!(
        y.contains(r#"local-hostname: "x\"\ninstance-id: i-evil""#),
        "{y}"
    );
}

#[test]
fn regions() {
    assert_eq!(region_of("us-east-1a"), "us-east-1");
    assert_eq!(region_of("kumo-1"), "kumo-1");
    assert_eq!(region_of("site-b"), "site-b");
    assert_eq!(region_of(""), "");
}

#[tokio::test]
async fn bind_refuses_bad_namespaces() {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let e = kumo_network::bind_tcp_in_netns("../etc", addr)
        .await
        .unwrap_err();
    assert!(
        matches!(e, kumo_network::NetworkError::InvalidSpec(_)),
        "{e:?}"
    );
    let e = kumo_network::bind_tcp_in_netns("kumo-md-does-not-exist", addr)
        .await
        .unwrap_err();
    assert!(
        chain(&e).contains("/run/netns/kumo-md-does-not-exist"),
        "{}",
        chain(&e)
    );
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        true
    } else {
        // In CI (root) a missing prerequisite is a failure, never a skip.
        assert!(std::env::var_os("CI").is_none(), "this test needs root");
        eprintln!("skipping: needs root");
        false
    }
}

/// Deletes the scratch namespace however the test ends.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "ip {args:?}: {st}");
}

#[tokio::test]
async fn serves_inside_a_namespace() {
    if !is_root() {
        return;
    }
    let ns = format!("kumo-md-{}", std::process::id());
    ip(&["netns", "add", &ns]);
    let _guard = NetnsGuard(ns.clone());
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&["-n", &ns, "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let addr: SocketAddr = "169.254.169.254:80".parse().unwrap();
    let listener = kumo_network::bind_tcp_in_netns(&ns, addr).await.unwrap();
    // Inside the namespace the client's source is the metadata address itself.
    let me = Ipv4Addr::new(169, 254, 169, 254);
    let server = tokio::spawn(serve(listener, NET.into(), fake(&[(me, vm_a())])));
    // busybox 1.35's wget segfaults with -T: bound the wait here and kill wget if it hangs.
    let wget = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns, "busybox", "wget", "-q", "-O", "-"])
        .arg("http://169.254.169.254/latest/meta-data/instance-id")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), wget).await;
    server.abort();
    let out = out.expect("wget timed out").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "wget {}: {err}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "i-0123456789abcdef0");
}
