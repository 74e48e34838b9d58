//! kumo's EC2-compatible Query API, as botocore (aws-cli, boto3) speaks it: `POST /` (or GET)
//! with form-encoded `Action=…&Version=…`, SigV4 with service `ec2`, XML responses in the
//! EC2 namespace and EC2's error codes. A thin front end: every action calls the same
//! controller operations and store queries as the native API.

mod addresses;
mod error;
mod filter;
mod groups;
mod images;
mod instances;
mod misc;
mod page;
mod params;
mod render;
mod security;
mod volumes;
mod xml;

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use kumo_controller::Controller;
use kumo_store::{AccessKey, NewEvent, Scope};
use kumo_types::id::{new_id, IdKind};

pub use error::Ec2Error;
pub use filter::{wildcard_match, Filter};
pub use params::Params;

/// Largest request body accepted (user data is at most 16 KiB, base64-encoded).
const MAX_BODY: usize = 1 << 20;
/// Requests signed further than this from the server's clock are refused.
const MAX_SKEW_MINUTES: i64 = 15;
/// How long terminated instances stay visible, as in EC2.
pub const TERMINATED_VISIBLE_SECS: i64 = 3600;
/// Live instances a project may have (EC2's `max-instances` account attribute).
pub const MAX_INSTANCES: i64 = 20_000;

/// Actions of the issue whose capability has not landed in kumo yet.
const NOT_YET: &[&str] = &[
    "CreateImage",
    "CreateSubnet",
    "DescribeSubnets",
    "DeleteSubnet",
];

/// The actions kumo answers today.
pub const ACTIONS: &[&str] = &[
    "RunInstances",
    "DescribeInstances",
    "StartInstances",
    "StopInstances",
    "RebootInstances",
    "TerminateInstances",
    "DescribeInstanceStatus",
    "DescribeInstanceTypes",
    "GetConsoleOutput",
    "DescribeInstanceAttribute",
    "ModifyInstanceAttribute",
    "DescribeImages",
    "RegisterImage",
    "DeregisterImage",
    "DescribeRegions",
    "DescribeAvailabilityZones",
    "DescribeAccountAttributes",
    "CreateTags",
    "DeleteTags",
    "DescribeTags",
    "CreatePlacementGroup",
    "DescribePlacementGroups",
    "DeletePlacementGroup",
    "CreateSecurityGroup",
    "DeleteSecurityGroup",
    "DescribeSecurityGroups",
    "AuthorizeSecurityGroupIngress",
    "AuthorizeSecurityGroupEgress",
    "RevokeSecurityGroupIngress",
    "RevokeSecurityGroupEgress",
    "CreateKeyPair",
    "ImportKeyPair",
    "DeleteKeyPair",
    "DescribeKeyPairs",
    "AllocateAddress",
    "AssociateAddress",
    "DisassociateAddress",
    "ReleaseAddress",
    "DescribeAddresses",
    "CreateVpc",
    "DescribeVpcs",
    "DeleteVpc",
    "CreateVolume",
    "DescribeVolumes",
    "AttachVolume",
    "DetachVolume",
    "DeleteVolume",
    "ModifyVolume",
    "CreateSnapshot",
    "DescribeSnapshots",
    "DeleteSnapshot",
];

/// Actions answered with UnsupportedOperation until their capability lands.
pub fn unsupported_actions() -> &'static [&'static str] {
    NOT_YET
}

#[derive(Clone)]
pub struct Ec2State {
    pub ctl: Controller,
    /// The SigV4 region requests must be signed for; also the one region DescribeRegions shows.
    pub region: String,
}

pub(crate) struct Inner {
    st: Ec2State,
    /// Serialises RunInstances with a ClientToken, so that a token is checked and recorded
    /// atomically.
    run_lock: tokio::sync::Mutex<()>,
}

/// The EC2 endpoint: `/` for POST and GET.
pub fn router(state: Ec2State) -> Router {
    let inner = Arc::new(Inner {
        st: state,
        run_lock: tokio::sync::Mutex::new(()),
    });
    Router::new()
        .route("/", get(handle).post(handle))
        .with_state(inner)
}

/// What an action handler gets.
pub(crate) struct Ctx<'a> {
    pub ctl: &'a Controller,
    pub region: &'a str,
    pub key: AccessKey,
    pub scope: Scope,
    pub request_id: String,
    /// The URL the request came to (for DescribeRegions).
    pub endpoint: String,
    pub inner: &'a Inner,
}

impl Ctx<'_> {
    /// The caller's permission for an action: `DryRunOperation` when it would be allowed.
    pub fn authorize(&self, action: &str) -> Result<(), Ec2Error> {
        match self.key.role.as_str() {
            "admin" | "member" => Ok(()),
            _ => Err(Ec2Error::UnauthorizedOperation(format!(
                "You are not authorized to perform this operation ({action})."
            ))),
        }
    }

    /// Answer a DryRun: the caller could do it, so nothing is done.
    pub fn dry_run(&self, action: &str) -> Ec2Error {
        match self.authorize(action) {
            Ok(()) => Ec2Error::DryRunOperation,
            Err(e) => e,
        }
    }

    pub fn cutoff(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() - chrono::Duration::seconds(TERMINATED_VISIBLE_SECS)
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let request_id = new_id(IdKind::Request);
    let (parts, body) = req.into_parts();
    let result = match to_bytes(body, MAX_BODY).await {
        Ok(bytes) => serve(&inner, &parts, &bytes, &request_id).await,
        Err(_) => Err(Ec2Error::InvalidParameterValue(format!(
            "request bodies are limited to {MAX_BODY} bytes"
        ))),
    };
    let (status, body) = match result {
        Ok(xml) => (axum::http::StatusCode::OK, xml),
        Err(e) => {
            if let Ec2Error::Internal(detail) = &e {
                tracing::error!(request_id, detail, "EC2 request failed");
            }
            (e.status(), e.to_xml(&request_id))
        }
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/xml;charset=UTF-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-amzn-requestid", v.clone());
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn serve(
    inner: &Inner,
    parts: &axum::http::request::Parts,
    body: &[u8],
    request_id: &str,
) -> Result<String, Ec2Error> {
    let key = authenticate(&inner.st, parts, body).await?;
    let mut params = Params::from_form(body)?;
    if let Some(q) = parts.uri.query() {
        params = params.merge(Params::from_form(q.as_bytes())?)?;
    }
    let action = params.peek("Action").map(str::to_string).ok_or_else(|| {
        Ec2Error::MissingParameter("The request must contain the parameter Action".into())
    })?;
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let ctx = Ctx {
        ctl: &inner.st.ctl,
        region: &inner.st.region,
        scope: key.scope(),
        key,
        request_id: request_id.to_string(),
        endpoint: format!("http://{host}"),
        inner,
    };
    let result = dispatch(&ctx, &action, params).await;
    let read_only = action.starts_with("Describe") || action.starts_with("Get");
    let dry = matches!(result, Err(Ec2Error::DryRunOperation));
    if !read_only && !dry && ACTIONS.contains(&action.as_str()) {
        let e = NewEvent {
            project_id: Some(ctx.key.project_id.clone()),
            user_id: Some(ctx.key.user_id.clone()),
            action: format!("ec2:{action}"),
            target: None,
            result: match &result {
                Ok(_) => "ok".into(),
                Err(e) => e.code().into(),
            },
            request_id: Some(request_id.to_string()),
            detail: None,
        };
        if let Err(err) = ctx.ctl.store.record_event(&e).await {
            tracing::warn!(error = %err, "could not journal EC2 request");
        }
    }
    result
}

async fn dispatch(ctx: &Ctx<'_>, action: &str, p: Params) -> Result<String, Ec2Error> {
    match action {
        "RunInstances" => instances::run(ctx, p).await,
        "DescribeInstances" => instances::describe(ctx, p).await,
        "StartInstances" | "StopInstances" | "TerminateInstances" | "RebootInstances" => {
            instances::change_state(ctx, action, p).await
        }
        "DescribeInstanceStatus" => instances::status(ctx, p).await,
        "GetConsoleOutput" => instances::console(ctx, p).await,
        "DescribeInstanceAttribute" => instances::describe_attribute(ctx, p).await,
        "ModifyInstanceAttribute" => instances::modify_attribute(ctx, p).await,
        "DescribeInstanceTypes" => misc::instance_types(ctx, p).await,
        "DescribeImages" => images::describe(ctx, p).await,
        "RegisterImage" => images::register(ctx, p).await,
        "DeregisterImage" => images::deregister(ctx, p).await,
        "DescribeRegions" => misc::regions(ctx, p).await,
        "DescribeAvailabilityZones" => misc::zones(ctx, p).await,
        "DescribeAccountAttributes" => misc::account_attributes(ctx, p).await,
        "CreateTags" => misc::create_tags(ctx, p).await,
        "DeleteTags" => misc::delete_tags(ctx, p).await,
        "DescribeTags" => misc::describe_tags(ctx, p).await,
        "CreatePlacementGroup" => groups::create(ctx, p).await,
        "DescribePlacementGroups" => groups::describe(ctx, p).await,
        "DeletePlacementGroup" => groups::delete(ctx, p).await,
        "CreateSecurityGroup" => security::create_group(ctx, p).await,
        "DeleteSecurityGroup" => security::delete_group(ctx, p).await,
        "DescribeSecurityGroups" => security::describe_groups(ctx, p).await,
        "AuthorizeSecurityGroupIngress" | "AuthorizeSecurityGroupEgress" => {
            security::authorize(ctx, action, p).await
        }
        "RevokeSecurityGroupIngress" | "RevokeSecurityGroupEgress" => {
            security::revoke(ctx, action, p).await
        }
        "CreateKeyPair" => security::keys::create(ctx, p).await,
        "ImportKeyPair" => security::keys::import(ctx, p).await,
        "DeleteKeyPair" => security::keys::delete(ctx, p).await,
        "DescribeKeyPairs" => security::keys::describe(ctx, p).await,
        "AllocateAddress" => addresses::allocate(ctx, p).await,
        "AssociateAddress" => addresses::associate(ctx, p).await,
        "DisassociateAddress" => addresses::disassociate(ctx, p).await,
        "ReleaseAddress" => addresses::release(ctx, p).await,
        "DescribeAddresses" => addresses::describe(ctx, p).await,
        "CreateVpc" => addresses::create_vpc(ctx, p).await,
        "DescribeVpcs" => addresses::describe_vpcs(ctx, p).await,
        "DeleteVpc" => addresses::delete_vpc(ctx, p).await,
        "CreateVolume" => volumes::create(ctx, p).await,
        "DescribeVolumes" => volumes::describe(ctx, p).await,
        "AttachVolume" => volumes::attach(ctx, p).await,
        "DetachVolume" => volumes::detach(ctx, p).await,
        "DeleteVolume" => volumes::delete(ctx, p).await,
        "ModifyVolume" => volumes::modify(ctx, p).await,
        "CreateSnapshot" => volumes::create_snapshot(ctx, p).await,
        "DescribeSnapshots" => volumes::describe_snapshots(ctx, p).await,
        "DeleteSnapshot" => volumes::delete_snapshot(ctx, p).await,
        a if NOT_YET.contains(&a) => Err(Ec2Error::UnsupportedOperation(format!(
            "The action {a} is not available in kumo yet; it arrives with its capability"
        ))),
        a => Err(Ec2Error::InvalidAction(format!(
            "The action {a} is not valid for this web service."
        ))),
    }
}

/// SigV4 with service `ec2` and the configured region, from the raw body and the request's
/// own SignedHeaders.
async fn authenticate(
    st: &Ec2State,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Result<AccessKey, Ec2Error> {
    let access_key_id = claimed_access_key(parts).ok_or_else(|| {
        Ec2Error::AuthFailure(
            "AWS was not able to validate the provided access credentials: the request is not signed with AWS Signature Version 4".into(),
        )
    })?;
    let key = st.ctl.store.access_key(&access_key_id).await?;
    let secret = key.as_ref().map(|k| k.secret.clone());
    let req = kumo_sigv4::VerifyRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body,
    };
    let now = chrono::Utc::now();
    let skew = chrono::Duration::minutes(MAX_SKEW_MINUTES);
    match kumo_sigv4::verify(&req, "ec2", Some(&st.region), now, skew, |_| secret) {
        Ok(_) => key.ok_or_else(|| {
            Ec2Error::AuthFailure(
                "AWS was not able to validate the provided access credentials".into(),
            )
        }),
        Err(e) => {
            use kumo_sigv4::VerifyError as V;
            Err(match e {
                // EC2 (unlike S3) answers a bad signature with AuthFailure.
                V::SignatureMismatch | V::ContentSha256Mismatch => Ec2Error::AuthFailure(
                    "AWS was not able to validate the provided access credentials".into(),
                ),
                V::RequestExpired => Ec2Error::RequestExpired(format!(
                    "Request has expired: the signing time is more than {MAX_SKEW_MINUTES} minutes from the server's clock"
                )),
                V::UnknownAccessKey => Ec2Error::AuthFailure(
                    "AWS was not able to validate the provided access credentials".into(),
                ),
                V::WrongRegion => Ec2Error::AuthFailure(format!(
                    "Credential should be scoped to a valid region, not this one; this endpoint's region is '{}'",
                    st.region
                )),
                V::WrongService => Ec2Error::AuthFailure(
                    "Credential should be scoped to correct service: 'ec2'".into(),
                ),
                other => Ec2Error::AuthFailure(other.to_string()),
            })
        }
    }
}

/// The access key id named in the Authorization header or presigned query.
fn claimed_access_key(parts: &axum::http::request::Parts) -> Option<String> {
    let from_header = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .map(str::to_string);
    from_header.or_else(|| {
        let q = parts.uri.query()?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "X-Amz-Credential")
            .and_then(|(_, v)| v.split('/').next().map(str::to_string))
    })
}
