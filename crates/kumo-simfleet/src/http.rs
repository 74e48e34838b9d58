//! The agent API of every simulated host on one listener: `/h/<host>/agent/v1/...`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use kumo_types::agent::{ConsoleTail, DesiredPower, ObservedPower, VmDesired, VmObserved};

use crate::{Inner, SimHost, VmState};

type S = State<Arc<Inner>>;

/// The real agent's error shape, so the controller's messages read the same.
struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(serde_json::json!({"error": {"code": self.0.as_u16().to_string(), "message": self.1}})),
        )
            .into_response()
    }
}

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/h/{host}/agent/v1/vms", get(list))
        .route("/h/{host}/agent/v1/vms/{id}", put(put_vm).delete(delete_vm))
        .route("/h/{host}/agent/v1/vms/{id}/console", get(console))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(inner)
}

/// The host a call is for, if the caller holds its credential (checked as the real agent
/// does: the whole `Bearer <host-id>:<secret>` header, in constant time).
fn authorize<'a>(
    inner: &'a Inner,
    name: &str,
    headers: &HeaderMap,
) -> Result<&'a SimHost, HttpError> {
    let h = inner
        .host(name)
        .ok_or_else(|| HttpError(StatusCode::NOT_FOUND, format!("no simulated host {name}")))?;
    if inner.closed.load(Ordering::Relaxed) || h.stopped.load(Ordering::Relaxed) {
        // A dead host: fail fast, as a refused connection would.
        return Err(HttpError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("simulated host {name} is stopped"),
        ));
    }
    let Some(ident) = h.ident.get() else {
        return Err(HttpError(
            StatusCode::UNAUTHORIZED,
            "this host has not joined yet".into(),
        ));
    };
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let want = ident.bearer.as_bytes();
    let ok = got.len() == want.len()
        && got
            .bytes()
            .zip(want.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0;
    if !ok {
        return Err(HttpError(
            StatusCode::UNAUTHORIZED,
            "wrong host credential".into(),
        ));
    }
    Ok(h)
}

pub(crate) fn observed(id: &str, v: &VmState) -> VmObserved {
    VmObserved {
        id: id.to_string(),
        generation: v.generation,
        power: v.power,
        reboot_seq: v.reboot_seq,
        error: None,
        volumes: vec![],
        volume_error: None,
    }
}

async fn list(
    State(inner): S,
    Path(host): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<VmObserved>>, HttpError> {
    let h = authorize(&inner, &host, &headers)?;
    let out = h.vms().iter().map(|(id, v)| observed(id, v)).collect();
    Ok(Json(out))
}

async fn put_vm(
    State(inner): S,
    Path((host, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(spec): Json<VmDesired>,
) -> Result<(StatusCode, Json<VmObserved>), HttpError> {
    let h = authorize(&inner, &host, &headers)?;
    if spec.id != id {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            "the spec's id does not match the path".into(),
        ));
    }
    let want = VmState {
        generation: spec.generation,
        power: match spec.power {
            DesiredPower::Running => ObservedPower::Running,
            DesiredPower::Stopped => ObservedPower::Stopped,
        },
        reboot_seq: spec.reboot_seq,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
    };
    let mut vms = h.vms();
    let now = match vms.get_mut(id.as_str()) {
        // Like the real agent, an older spec never undoes a newer one.
        Some(cur) if cur.generation > spec.generation => *cur,
        Some(cur) => {
            *cur = want;
            want
        }
        None => {
            vms.insert(id.clone().into_boxed_str(), want);
            want
        }
    };
    drop(vms);
    inner.counters.puts.fetch_add(1, Ordering::Relaxed);
    Ok((StatusCode::ACCEPTED, Json(observed(&id, &now))))
}

async fn delete_vm(
    State(inner): S,
    Path((host, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, HttpError> {
    let h = authorize(&inner, &host, &headers)?;
    h.vms().remove(id.as_str());
    inner.counters.deletes.fetch_add(1, Ordering::Relaxed);
    Ok(StatusCode::NO_CONTENT)
}

/// A simulated VM has no console; an empty one keeps `kumo vm log` working.
async fn console(
    State(inner): S,
    Path((host, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<ConsoleTail>, HttpError> {
    let h = authorize(&inner, &host, &headers)?;
    if !h.vms().contains_key(id.as_str()) {
        return Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no VM {id} on this host"),
        ));
    }
    Ok(Json(ConsoleTail {
        output: String::new(),
    }))
}
