//! The request pipeline every `/api/v1` call goes through: a request id, SigV4
//! authentication, `Idempotency-Key` replay, and a journal entry for every mutating call.

use axum::body::{to_bytes, Body};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kumo_store::{AccessKey, IdempotentResponse, NewEvent, Scope};
use kumo_types::id::{new_id, IdKind};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorCode, REQUEST_ID};
use crate::AppState;

/// Largest JSON body accepted (uploads are streamed and not limited by this).
const MAX_BODY: usize = 1 << 20;
/// Requests signed further than this from the server's clock are refused.
const MAX_SKEW_MINUTES: i64 = 15;

/// The authenticated caller, available to handlers as an extension.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: AccessKey,
    pub request_id: String,
}

impl Caller {
    pub fn scope(&self) -> Scope {
        self.key.scope()
    }
}

/// Routes whose bodies are streamed: their signature covers the declared payload hash, and
/// the handler checks the body against it.
pub fn is_streamed(method: &Method, path: &str) -> bool {
    method == Method::PUT && path == "/api/v1/images/upload"
}

fn is_public(path: &str) -> bool {
    path == "/api/v1/openapi.json" || path == "/healthz" || path.starts_with("/api/v1/agent/")
}

pub async fn pipeline(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let request_id = new_id(IdKind::Request);
    let rid = request_id.clone();
    let mut resp = REQUEST_ID
        .scope(rid.clone(), handle(st, req, next, rid))
        .await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn handle(st: AppState, req: Request, next: Next, request_id: String) -> Response {
    let path = req.uri().path().to_string();
    if is_public(&path) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let streamed = is_streamed(&method, &path);
    let (mut parts, body) = req.into_parts();
    // A streamed body is passed on untouched (the handler checks it against the signed hash).
    let mut streamed_body = None;
    let bytes = if streamed {
        streamed_body = Some(body);
        bytes::Bytes::new()
    } else {
        match to_bytes(body, MAX_BODY).await {
            Ok(b) => b,
            Err(_) => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestTooLarge",
                    format!("request bodies are limited to {MAX_BODY} bytes"),
                )
                .into_response()
            }
        }
    };
    let key = match authenticate(&st, &parts, &bytes, streamed).await {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let caller = Caller {
        key,
        request_id: request_id.clone(),
    };
    parts.extensions.insert(caller.clone());
    let matched = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let mutating = method != Method::GET && method != Method::HEAD;

    // Idempotency: the same key and body replays the first response; a different body is refused.
    let idem_key = if mutating && !streamed {
        parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    } else {
        None
    };
    let request_hash = idem_key.as_ref().map(|_| {
        let mut h = Sha256::new();
        h.update(method.as_str());
        h.update(b" ");
        h.update(path.as_bytes());
        h.update(b"?");
        h.update(parts.uri.query().unwrap_or("").as_bytes());
        h.update(b"\n");
        h.update(&bytes);
        hex::encode(h.finalize())
    });
    if let (Some(k), Some(hash)) = (&idem_key, &request_hash) {
        if k.is_empty() || k.len() > 255 {
            return ApiError::invalid("Idempotency-Key must be 1 to 255 characters")
                .into_response();
        }
        use kumo_store::IdempotencyClaim;
        match st
            .ctl
            .store
            .claim_idempotency(&caller.key.user_id, k, hash)
            .await
        {
            Ok(IdempotencyClaim::Claimed) => {}
            Ok(IdempotencyClaim::Done(prev)) if &prev.request_hash == hash => return replay(prev),
            Ok(IdempotencyClaim::Done(_)) => {
                return ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "IdempotencyKeyReused",
                    "this Idempotency-Key was used with a different request",
                )
                .into_response()
            }
            Ok(IdempotencyClaim::InProgress) => {
                return ApiError::new(
                    StatusCode::CONFLICT,
                    "IdempotencyKeyInProgress",
                    "a request with this Idempotency-Key is still running; retry shortly",
                )
                .into_response()
            }
            Err(e) => return ApiError::from(e).into_response(),
        }
    }

    let body = streamed_body.unwrap_or_else(|| Body::from(bytes));
    let req = Request::from_parts(parts, body);
    let resp = next.run(req).await;

    let resp = match (&idem_key, &request_hash) {
        (Some(k), Some(hash)) if !resp.status().is_server_error() => {
            save_idempotent(&st, &caller, k, hash, resp).await
        }
        (Some(k), Some(_)) => {
            // A server error is not an answer to remember: a retry may run again.
            if let Err(e) = st
                .ctl
                .store
                .release_idempotency(&caller.key.user_id, k)
                .await
            {
                tracing::warn!(error = %e, "could not release an idempotency key");
            }
            resp
        }
        _ => resp,
    };
    if mutating {
        let result = resp
            .extensions()
            .get::<ErrorCode>()
            .map(|c| c.0.clone())
            .unwrap_or_else(|| "ok".into());
        let e = NewEvent {
            project_id: Some(caller.key.project_id.clone()),
            user_id: Some(caller.key.user_id.clone()),
            action: format!("{method} {matched}"),
            target: Some(path.clone()),
            result,
            request_id: Some(request_id.clone()),
            detail: None,
        };
        if let Err(err) = st.ctl.store.record_event(&e).await {
            tracing::warn!(error = %err, "could not journal request");
        }
    }
    resp
}

async fn authenticate(
    st: &AppState,
    parts: &axum::http::request::Parts,
    body: &[u8],
    streamed: bool,
) -> Result<AccessKey, ApiError> {
    let access_key_id = claimed_access_key(parts).ok_or_else(|| {
        ApiError::unauthorized("AuthFailure", "the request is not signed; sign it with AWS Signature Version 4 (the kumo CLI does this for you)")
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
    let opts = kumo_sigv4::VerifyOptions {
        streamed_body: streamed,
        ..Default::default()
    };
    let now = chrono::Utc::now();
    let skew = chrono::Duration::minutes(MAX_SKEW_MINUTES);
    match kumo_sigv4::verify_with_options(
        &req,
        "kumo",
        Some(&st.region),
        now,
        skew,
        |_| secret,
        &opts,
    ) {
        // For streamed bodies the handler checks the body against the signed hash.
        Ok(_) => key.ok_or_else(|| ApiError::unauthorized("AuthFailure", "unknown access key")),
        Err(e) => {
            use kumo_sigv4::VerifyError as V;
            let code = match e {
                V::UnknownAccessKey => "InvalidAccessKeyId",
                V::SignatureMismatch | V::ContentSha256Mismatch => "SignatureDoesNotMatch",
                V::RequestExpired => "RequestExpired",
                _ => "AuthFailure",
            };
            Err(ApiError::unauthorized(code, e.to_string()))
        }
    }
}

/// The access key id named in the Authorization header or presigned query.
fn claimed_access_key(parts: &axum::http::request::Parts) -> Option<String> {
    let from_header = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .map(str::to_string);
    from_header.or_else(|| {
        parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("X-Amz-Credential="))
                .and_then(|c| c.split("%2F").next().or_else(|| c.split('/').next()))
                .map(str::to_string)
        })
    })
}

fn replay(prev: IdempotentResponse) -> Response {
    let status = StatusCode::from_u16(prev.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, prev.body).into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    resp
}

async fn save_idempotent(
    st: &AppState,
    caller: &Caller,
    key: &str,
    hash: &str,
    resp: Response,
) -> Response {
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = to_bytes(body, 16 << 20).await else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "response too large to record",
        )
        .into_response();
    };
    let rec = IdempotentResponse {
        request_hash: hash.to_string(),
        status: parts.status.as_u16(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    };
    if let Err(e) = st
        .ctl
        .store
        .finish_idempotency(&caller.key.user_id, key, &rec)
        .await
    {
        tracing::warn!(error = %e, "could not record idempotent response");
    }
    Response::from_parts(parts, Body::from(bytes))
}
