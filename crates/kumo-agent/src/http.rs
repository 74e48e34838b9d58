//! The agent's HTTP API, called only by the controller (bearer host credential).

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use kumo_types::agent::{ConsoleTail, VmDesired, VmObserved};
use kumo_types::storage::{
    AgentJob, CreateDisk, DiskReport, JobRequest, ResizeVolume, SnapshotTaken, TakeSnapshot,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use kumo_storage::StorageError;

use crate::error::chain;
use crate::{Agent, AgentError};

type A = State<Arc<Agent>>;

struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": {"code": self.0.as_u16().to_string(), "message": self.1}}))).into_response()
    }
}

impl From<AgentError> for HttpError {
    fn from(e: AgentError) -> Self {
        // Storage refusals of bad input are the caller's (400/409/507), not the agent's.
        let status = match &e {
            AgentError::Storage(StorageError::NoSpace(_)) => StatusCode::INSUFFICIENT_STORAGE,
            AgentError::Storage(StorageError::NotFound(_)) => StatusCode::NOT_FOUND,
            AgentError::Storage(StorageError::Busy(_) | StorageError::Conflict(_)) => {
                StatusCode::CONFLICT
            }
            AgentError::Storage(s) if s.is_client_error() => StatusCode::BAD_REQUEST,
            AgentError::Busy(_) => StatusCode::CONFLICT,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Config(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(status, chain(&e))
    }
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/agent/v1/vms", get(list))
        .route("/agent/v1/vms/{id}", put(put_vm).delete(delete_vm))
        .route("/agent/v1/vms/{id}/console", get(console))
        .route("/agent/v1/vms/{id}/serial", get(serial))
        .route("/agent/v1/vms/{id}/tcp/{port}", get(tcp))
        .route("/agent/v1/disks/{id}", put(create_disk).delete(delete_disk))
        .route("/agent/v1/disks/{id}/grow", post(grow_disk))
        .route("/agent/v1/snapshots", post(take_snapshot))
        .route("/agent/v1/snapshots/{id}", delete(delete_snapshot))
        .route("/agent/v1/jobs", post(start_job))
        .route("/agent/v1/jobs/{id}", get(job).delete(cancel_job))
        .route("/agent/v1/vms/{id}/disks", get(source_disks))
        .route("/agent/v1/vms/{id}/resume", post(resume_source))
        .route("/agent/v1/migrations", post(start_incoming))
        .route(
            "/agent/v1/migrations/{id}",
            get(incoming_state).delete(abort_incoming),
        )
        .route("/agent/v1/migrations/{id}/commit", post(commit_incoming))
        .route_layer(axum::middleware::from_fn_with_state(agent.clone(), auth))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(agent)
}

async fn auth(State(a): A, req: Request, next: Next) -> Response {
    let want = format!("Bearer {}:{}", a.identity.host_id, a.identity.host_secret);
    let got = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok = got.len() == want.len()
        && got
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0;
    if !ok {
        return HttpError(StatusCode::UNAUTHORIZED, "wrong host credential".into()).into_response();
    }
    next.run(req).await
}

fn check_disk_id(id: &str) -> Result<(), HttpError> {
    kumo_hypervisor::validate_id(id).map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn create_disk(
    State(a): A,
    Path(id): Path<String>,
    Json(req): Json<CreateDisk>,
) -> Result<Json<DiskReport>, HttpError> {
    check_disk_id(&id)?;
    Ok(Json(a.create_disk(&id, &req).await?))
}

async fn delete_disk(State(a): A, Path(id): Path<String>) -> Result<StatusCode, HttpError> {
    check_disk_id(&id)?;
    a.delete_disk(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn grow_disk(
    State(a): A,
    Path(id): Path<String>,
    Json(req): Json<ResizeVolume>,
) -> Result<Json<DiskReport>, HttpError> {
    check_disk_id(&id)?;
    Ok(Json(a.grow_disk(&id, req.size_bytes).await?))
}

async fn take_snapshot(
    State(a): A,
    Json(req): Json<TakeSnapshot>,
) -> Result<Json<SnapshotTaken>, HttpError> {
    check_disk_id(&req.snapshot_id)?;
    check_disk_id(&req.disk)?;
    Ok(Json(a.take_snapshot(&req).await?))
}

async fn delete_snapshot(State(a): A, Path(id): Path<String>) -> Result<StatusCode, HttpError> {
    check_disk_id(&id)?;
    a.delete_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_job(
    State(a): A,
    Json(req): Json<JobRequest>,
) -> Result<(StatusCode, Json<AgentJob>), HttpError> {
    Ok((StatusCode::ACCEPTED, Json(a.start_job(req).await?)))
}

async fn job(State(a): A, Path(id): Path<String>) -> Result<Json<AgentJob>, HttpError> {
    a.job(&id)
        .map(Json)
        .ok_or_else(|| HttpError(StatusCode::NOT_FOUND, format!("no job {id}")))
}

async fn cancel_job(State(a): A, Path(id): Path<String>) -> Result<StatusCode, HttpError> {
    if a.cancel_job(&id) {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no running job {id}"),
        ))
    }
}

async fn list(State(a): A) -> Json<Vec<VmObserved>> {
    Json(a.observe_all().await)
}

async fn put_vm(
    State(a): A,
    Path(id): Path<String>,
    Json(spec): Json<VmDesired>,
) -> Result<(StatusCode, Json<VmObserved>), HttpError> {
    if spec.id != id {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            "the spec's id does not match the path".into(),
        ));
    }
    kumo_hypervisor::validate_id(&id)
        .map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(a.put_vm(spec).await?)))
}

#[derive(Deserialize)]
struct DeleteVmQuery {
    /// The VM lives on another host of this shared pool now: keep its disk.
    #[serde(default)]
    keep_disk: bool,
}

async fn delete_vm(
    State(a): A,
    Path(id): Path<String>,
    Query(q): Query<DeleteVmQuery>,
) -> Result<StatusCode, HttpError> {
    kumo_hypervisor::validate_id(&id)
        .map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
    a.delete_vm(&id, q.keep_disk).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ConsoleQuery {
    bytes: Option<u64>,
}

async fn console(
    State(a): A,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Json<ConsoleTail>, HttpError> {
    if a.observe(&id).await.is_none() {
        return Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no VM {id} on this host"),
        ));
    }
    let path = a.console_log(&id);
    let want = q.bytes.unwrap_or(65536).min(1 << 20);
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => {
            return Ok(Json(ConsoleTail {
                output: String::new(),
            }))
        }
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(want);
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf)
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(ConsoleTail {
        output: String::from_utf8_lossy(&buf).into_owned(),
    }))
}

async fn serial(
    State(a): A,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, HttpError> {
    if a.observe(&id).await.is_none() {
        return Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no VM {id} on this host"),
        ));
    }
    let sock = tokio::net::UnixStream::connect(a.serial_socket(&id))
        .await
        .map_err(|e| {
            HttpError(
                StatusCode::CONFLICT,
                format!("the serial console is not available (is the VM running?): {e}"),
            )
        })?;
    Ok(ws.on_upgrade(move |socket| pump(socket, sock)))
}

async fn tcp(
    State(a): A,
    Path((id, port)): Path<(String, u16)>,
    ws: WebSocketUpgrade,
) -> Result<Response, HttpError> {
    let (router_ns, ip) = a
        .vm_target(&id)
        .await
        .ok_or_else(|| HttpError(StatusCode::NOT_FOUND, format!("no VM {id} on this host")))?;
    let net = a
        .network()
        .ok_or_else(|| HttpError(StatusCode::CONFLICT, "this host has no VM networks".into()))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| HttpError(StatusCode::INTERNAL_SERVER_ERROR, "bad VM address".into()))?;
    let stream = net.connect_tcp(&router_ns, ip, port).await.map_err(|e| {
        HttpError(
            StatusCode::BAD_GATEWAY,
            format!("cannot connect to {ip}:{port}: {}", chain(&e)),
        )
    })?;
    Ok(ws.on_upgrade(move |socket| pump(socket, stream)))
}

/// Copy bytes between a websocket (binary frames) and a stream until either side closes.
async fn pump<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send>(
    ws: WebSocket,
    stream: S,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (mut tx, mut rx) = ws.split();
    let up = async {
        while let Some(Ok(m)) = rx.next().await {
            let data = match m {
                Message::Binary(b) => b,
                Message::Text(t) => bytes::Bytes::copy_from_slice(t.as_bytes()),
                Message::Close(_) => break,
                _ => continue,
            };
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = tx.close().await;
    };
    tokio::select! { _ = up => {}, _ = down => {} }
}

fn checked_id(id: &str) -> Result<(), HttpError> {
    kumo_hypervisor::validate_id(id).map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn source_disks(
    State(a): A,
    Path(id): Path<String>,
) -> Result<Json<Vec<kumo_types::migration::SourceDisk>>, HttpError> {
    checked_id(&id)?;
    Ok(Json(a.source_disks(&id).await?))
}

async fn resume_source(State(a): A, Path(id): Path<String>) -> Result<StatusCode, HttpError> {
    checked_id(&id)?;
    a.resume_source(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_incoming(
    State(a): A,
    Json(req): Json<kumo_types::migration::IncomingRequest>,
) -> Result<Json<kumo_types::migration::MigrationTarget>, HttpError> {
    checked_id(&req.desired.id)?;
    Ok(Json(a.start_incoming(req).await?))
}

async fn incoming_state(
    State(a): A,
    Path(id): Path<String>,
) -> Result<Json<kumo_types::migration::IncomingState>, HttpError> {
    checked_id(&id)?;
    Ok(Json(a.incoming_state(&id).await?))
}

async fn abort_incoming(State(a): A, Path(id): Path<String>) -> Result<StatusCode, HttpError> {
    checked_id(&id)?;
    a.abort_incoming(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn commit_incoming(
    State(a): A,
    Path(id): Path<String>,
    Json(c): Json<kumo_types::migration::CommitIncoming>,
) -> Result<StatusCode, HttpError> {
    checked_id(&id)?;
    a.commit_incoming(&id, &c).await?;
    Ok(StatusCode::NO_CONTENT)
}
