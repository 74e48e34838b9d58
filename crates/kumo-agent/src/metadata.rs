//! The metadata service (EC2 IMDSv1/v2 and NoCloud) served to VMs.
//!
//! One listener per tenant network, bound inside that network's router namespace on 169.254.169.254:80
//! (see `kumo_network::bind_tcp_in_netns`). Anti-spoofing rules guarantee a VM's source address, so the
//! peer address names the VM within the network: no VM can read another's metadata.
//!
//! Two layouts are served from the same VM facts:
//! - EC2 IMDS (`/latest/meta-data/…`, dated versions answer the same), IMDSv1 plus the IMDSv2 token flow;
//! - NoCloud (`/nocloud/…`), which stock cloud-init images use when SMBIOS announces
//!   `ds=nocloud-net;s=http://169.254.169.254/nocloud/`.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::header::{ALLOW, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use kumo_types::agent::VmMetadata;

use crate::error::chain;
use crate::AgentError;

/// Where the service learns which VM owns an address of a network.
pub trait MetadataSource: Send + Sync + 'static {
    fn lookup(&self, network: &str, ip: Ipv4Addr) -> Option<VmMetadata>;
}

/// The versions `GET /` lists; every one answers the same tree. cloud-init probes 2021-03-23, 2018-09-24
/// and 2016-09-02, then falls back to 2009-04-04.
const VERSIONS: &str = "\
    1.0\n2007-01-19\n2007-03-01\n2007-08-29\n2007-10-10\n2007-12-15\n2008-02-01\n2008-09-01\n\
    2009-04-04\n2011-01-01\n2011-05-01\n2012-01-12\n2014-02-25\n2014-11-05\n2015-10-20\n\
    2016-04-19\n2016-06-30\n2016-09-02\n2018-03-28\n2018-08-17\n2018-09-24\n2019-10-01\n\
    2020-10-27\n2021-01-03\n2021-03-23\n2021-07-15\n2022-09-24\nlatest";

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const MAX_TTL_SECONDS: u64 = 21600;
/// A VM asking for more tokens than this loses its oldest ones, so one VM cannot crowd out the others.
const TOKENS_PER_VM: usize = 64;
/// Hard cap on the whole table of a network; beyond it token requests get 503.
const MAX_TOKENS: usize = 16384;
/// NoCloud needs a user-data document even when the VM has none.
const EMPTY_CLOUD_CONFIG: &str = "#cloud-config\n{}\n";
/// VmMetadata carries no account; the identity document needs one.
const ACCOUNT_ID: &str = "000000000000";

type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The state of one network's service. The token table belongs to this network, so a token is bound to
/// (network, VM address).
struct Service {
    network: String,
    source: Arc<dyn MetadataSource>,
    tokens: Mutex<HashMap<String, Token>>,
    serial: AtomicU64,
    clock: Clock,
}

struct Token {
    ip: Ipv4Addr,
    expires: Instant,
    /// Issue order: the oldest go first when a VM exceeds its share.
    serial: u64,
}

/// The metadata service of one network. Serve it with `into_make_service_with_connect_info::<SocketAddr>`:
/// the peer address identifies the VM.
pub fn router(network: String, source: Arc<dyn MetadataSource>) -> Router {
    app(service(network, source, Arc::new(Instant::now)))
}

/// Serves one network's metadata on `listener` until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    network: String,
    source: Arc<dyn MetadataSource>,
) {
    let app = router(network.clone(), source);
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await;
    if let Err(e) = served {
        tracing::error!(network, error = %e, "metadata service stopped");
    }
}

fn service(network: String, source: Arc<dyn MetadataSource>, clock: Clock) -> Arc<Service> {
    Arc::new(Service {
        network,
        source,
        tokens: Mutex::new(HashMap::new()),
        serial: AtomicU64::new(0),
        clock,
    })
}

fn app(svc: Arc<Service>) -> Router {
    // One fallback handler: the layout is a tree walked by hand, and 404/405 follow IMDS, not axum's router.
    Router::new().fallback(handle).with_state(svc)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(CONTENT_TYPE, "text/plain")], body.into()).into_response()
}

fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "Not Found\n")
}

fn not_allowed(allow: &'static str) -> Response {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

async fn handle(
    State(svc): State<Arc<Service>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::PUT {
        return not_allowed("GET, PUT");
    }
    let ip = match peer.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    };
    let Some((ip, vm)) = ip.and_then(|ip| Some((ip, svc.source.lookup(&svc.network, ip)?))) else {
        tracing::debug!(network = %svc.network, %peer, "metadata request from an unknown address");
        return text(StatusCode::FORBIDDEN, "not a VM of this network\n");
    };
    let path = uri.path();
    if method == Method::PUT {
        return if path == TOKEN_PATH {
            svc.issue_token(ip, &headers)
        } else {
            not_allowed("GET")
        };
    }
    if path == TOKEN_PATH {
        return not_allowed("PUT");
    }
    if let Some(token) = headers.get(TOKEN_HEADER) {
        if !svc.token_valid(ip, token) {
            return text(StatusCode::UNAUTHORIZED, "invalid or expired token\n");
        }
    }
    get(&vm, path)
}

impl Service {
    fn issue_token(&self, ip: Ipv4Addr, headers: &HeaderMap) -> Response {
        // A relayed token request (a proxy or container inside the VM) would hand the VM's token to whoever
        // asked the relay; AWS refuses these too.
        if headers.contains_key("x-forwarded-for") {
            return text(
                StatusCode::FORBIDDEN,
                "token requests may not be forwarded\n",
            );
        }
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| (1..=MAX_TTL_SECONDS).contains(t));
        let Some(ttl) = ttl else {
            return text(
                StatusCode::BAD_REQUEST,
                format!("{TTL_HEADER} must be an integer from 1 to {MAX_TTL_SECONDS}\n"),
            );
        };
        let token = match random_token() {
            Ok(t) => t,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, chain(&e)),
        };
        let now = (self.clock)();
        let Ok(mut tokens) = self.tokens.lock() else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "token table poisoned\n");
        };
        tokens.retain(|_, t| t.expires > now);
        let mut own: Vec<(&String, u64)> = tokens
            .iter()
            .filter(|(_, t)| t.ip == ip)
            .map(|(k, t)| (k, t.serial))
            .collect();
        if own.len() >= TOKENS_PER_VM {
            own.sort_by_key(|(_, serial)| *serial);
            let evict: Vec<String> = own[..=own.len() - TOKENS_PER_VM]
                .iter()
                .map(|(k, _)| (*k).clone())
                .collect();
            for k in evict {
                tokens.remove(&k);
            }
        }
        if tokens.len() >= MAX_TOKENS {
            return text(StatusCode::SERVICE_UNAVAILABLE, "too many tokens\n");
        }
        tokens.insert(
            token.clone(),
            Token {
                ip,
                expires: now + Duration::from_secs(ttl),
                serial: self.serial.fetch_add(1, Ordering::Relaxed),
            },
        );
        let mut r = text(StatusCode::OK, token);
        r.headers_mut().insert(TTL_HEADER, HeaderValue::from(ttl));
        r
    }

    /// A token is good only for the VM it was issued to, and only until it expires.
    fn token_valid(&self, ip: Ipv4Addr, token: &HeaderValue) -> bool {
        let Ok(token) = token.to_str() else {
            return false;
        };
        let now = (self.clock)();
        let Ok(mut tokens) = self.tokens.lock() else {
            return false;
        };
        match tokens.get(token) {
            Some(t) if t.expires <= now => {
                tokens.remove(token);
                false
            }
            Some(t) => t.ip == ip,
            None => false,
        }
    }
}

/// 32 bytes from the kernel's CSPRNG, hex-encoded.
fn random_token() -> Result<String, AgentError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| AgentError::io("reading /dev/urandom for a metadata token", e))?;
    Ok(hex::encode(bytes))
}

/// A node of the IMDS tree: a value, or a directory listed by its children's names (directories end in
/// `/`) unless it has its own listing (`public-keys/` lists `0=name`).
enum Node {
    Leaf(String),
    Dir {
        listing: Option<String>,
        children: Vec<(String, Node)>,
    },
}

fn dir(children: Vec<(&str, Node)>) -> Node {
    listed(None, children)
}

fn listed(listing: Option<String>, children: Vec<(&str, Node)>) -> Node {
    Node::Dir {
        listing,
        children: children
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

fn leaf(s: impl Into<String>) -> Node {
    Node::Leaf(s.into())
}

impl Node {
    fn render(&self) -> String {
        match self {
            Node::Leaf(s) => s.clone(),
            Node::Dir {
                listing: Some(l), ..
            } => l.clone(),
            Node::Dir { children, .. } => children
                .iter()
                .map(|(name, n)| match n {
                    Node::Dir { .. } => format!("{name}/"),
                    Node::Leaf(_) => name.clone(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    fn walk(&self, segments: &[String]) -> Option<&Node> {
        let Some((first, rest)) = segments.split_first() else {
            return Some(self);
        };
        match self {
            Node::Dir { children, .. } => children
                .iter()
                .find(|(name, _)| name == first)?
                .1
                .walk(rest),
            Node::Leaf(_) => None,
        }
    }
}

/// `us-east-1a` → `us-east-1`; a zone not shaped like that is its own region.
fn region_of(zone: &str) -> &str {
    let b = zone.as_bytes();
    match b {
        [.., d, l] if d.is_ascii_digit() && l.is_ascii_lowercase() => &zone[..zone.len() - 1],
        _ => zone,
    }
}

fn identity_document(vm: &VmMetadata) -> String {
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    };
    let doc = serde_json::json!({
        "accountId": ACCOUNT_ID,
        "architecture": arch,
        "availabilityZone": vm.availability_zone,
        "billingProducts": null,
        "devpayProductCodes": null,
        "marketplaceProductCodes": null,
        "imageId": vm.ami_id,
        "instanceId": vm.instance_id,
        "instanceType": vm.instance_type,
        "kernelId": null,
        "privateIp": vm.local_ipv4,
        "ramdiskId": null,
        "region": region_of(&vm.availability_zone),
        "version": "2017-09-30",
    });
    // Serialising a json! value cannot fail; fall back to compact output all the same.
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string())
}

/// The tree under `/{version}/`.
fn version_tree(vm: &VmMetadata) -> Node {
    let mac = vm.mac.to_ascii_lowercase();
    let mut iface = vec![
        ("device-number", leaf("0")),
        ("local-ipv4s", leaf(&vm.local_ipv4)),
        ("mac", leaf(&mac)),
    ];
    let mut meta = vec![
        ("ami-id", leaf(&vm.ami_id)),
        ("hostname", leaf(&vm.hostname)),
        ("instance-id", leaf(&vm.instance_id)),
        ("instance-type", leaf(&vm.instance_type)),
        ("local-hostname", leaf(&vm.hostname)),
        ("local-ipv4", leaf(&vm.local_ipv4)),
        ("mac", leaf(&mac)),
    ];
    if let Some(public) = &vm.public_ipv4 {
        iface.push(("public-ipv4s", leaf(public)));
    }
    let macs = Node::Dir {
        listing: None,
        children: vec![(mac.clone(), dir(iface))],
    };
    meta.push((
        "network",
        dir(vec![("interfaces", dir(vec![("macs", macs)]))]),
    ));
    meta.push((
        "placement",
        dir(vec![
            ("availability-zone", leaf(&vm.availability_zone)),
            ("region", leaf(region_of(&vm.availability_zone))),
        ]),
    ));
    if let Some(public) = &vm.public_ipv4 {
        // There are no public DNS names: the address is the name that resolves.
        meta.push(("public-hostname", leaf(public)));
        meta.push(("public-ipv4", leaf(public)));
    }
    if !vm.public_keys.is_empty() {
        let keys = Node::Dir {
            listing: Some(
                vm.public_keys
                    .iter()
                    .enumerate()
                    .map(|(i, (name, _))| format!("{i}={name}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            children: vm
                .public_keys
                .iter()
                .enumerate()
                .map(|(i, (_, key))| (i.to_string(), dir(vec![("openssh-key", leaf(key))])))
                .collect(),
        };
        meta.push(("public-keys", keys));
    }
    meta.push(("reservation-id", leaf(&vm.reservation_id)));
    meta.push(("security-groups", leaf(vm.security_groups.join("\n"))));

    let dynamic = dir(vec![(
        "instance-identity",
        dir(vec![("document", leaf(identity_document(vm)))]),
    )]);
    let mut top = vec![("dynamic", dynamic), ("meta-data", dir(meta))];
    if let Some(ud) = &vm.user_data {
        top.push(("user-data", leaf(ud)));
    }
    // The version level lists its entries without trailing slashes, as EC2 does.
    let listing = top.iter().map(|(k, _)| *k).collect::<Vec<_>>().join("\n");
    listed(Some(listing), top)
}

/// `instance-id: …` etc. as YAML; values are JSON strings, which YAML reads as double-quoted scalars, so
/// no hostname or key comment can inject YAML.
fn nocloud_meta_data(vm: &VmMetadata) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let mut y = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&vm.instance_id),
        q(&vm.hostname)
    );
    if !vm.public_keys.is_empty() {
        y.push_str("public-keys:\n");
        for (_, key) in &vm.public_keys {
            y.push_str(&format!("  - {}\n", q(key)));
        }
    }
    y
}

/// Path segments without the leading and one trailing `/`; `%3A` decoded so MACs match either way.
fn segments(path: &str) -> Vec<String> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = p.strip_suffix('/').unwrap_or(p);
    if p.is_empty() {
        return Vec::new();
    }
    p.split('/')
        .map(|s| s.replace("%3A", ":").replace("%3a", ":"))
        .collect()
}

fn get(vm: &VmMetadata, path: &str) -> Response {
    let segs = segments(path);
    let Some((first, rest)) = segs.split_first() else {
        return text(StatusCode::OK, VERSIONS);
    };
    if first == "nocloud" {
        return match rest {
            [doc] if doc == "meta-data" => text(StatusCode::OK, nocloud_meta_data(vm)),
            [doc] if doc == "user-data" => text(
                StatusCode::OK,
                vm.user_data.as_deref().unwrap_or(EMPTY_CLOUD_CONFIG),
            ),
            // Empty but present: a 404 costs cloud-init about 10 s of retries.
            [doc] if doc == "vendor-data" => text(StatusCode::OK, ""),
            _ => not_found(),
        };
    }
    if !VERSIONS.split('\n').any(|v| v == first) {
        return not_found();
    }
    match version_tree(vm).walk(rest) {
        Some(node) => text(StatusCode::OK, node.render()),
        None => not_found(),
    }
}

// The tests are long tables of paths; they live in their own file to keep this one readable.
#[cfg(test)]
mod tests;
