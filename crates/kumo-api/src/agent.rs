//! Endpoints agents call: register with a join token, heartbeat, fetch image content.
//! Agents authenticate with `Authorization: Bearer <host-id>:<host-secret>`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kumo_controller::HeartbeatResponse;
use kumo_store::HostRow;
use kumo_types::agent::{Heartbeat, RegisterRequest, RegisterResponse};

use crate::error::{ApiError, ApiJson, ApiPath};
use crate::AppState;

async fn host_from_bearer(st: &AppState, headers: &HeaderMap) -> Result<HostRow, ApiError> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized(
                "AuthFailure",
                "agent requests need a bearer host credential",
            )
        })?;
    let (id, secret) = bearer
        .split_once(':')
        .ok_or_else(|| ApiError::unauthorized("AuthFailure", "malformed host credential"))?;
    st.ctl
        .authenticate_host(id, secret)
        .await?
        .ok_or_else(|| ApiError::unauthorized("AuthFailure", "unknown host or wrong host secret"))
}

pub async fn register(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let resp = st.ctl.register_host(&req).await.map_err(|e| match e {
        kumo_controller::OpError::Invalid(m) if m.contains("join token") => {
            ApiError::unauthorized("AuthFailure", m)
        }
        other => other.into(),
    })?;
    Ok((StatusCode::CREATED, Json(resp)))
}

/// The host's network policy (networks, security groups, elastic IPs, metadata) for its agent to render.
pub async fn network_policy(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<kumo_types::agent::NetworkPolicy>, ApiError> {
    let host = host_from_bearer(&st, &headers).await?;
    Ok(Json(st.ctl.network_policy(&host.id).await?))
}

pub async fn heartbeat(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let host = host_from_bearer(&st, &headers).await?;
    if hb.host_id != host.id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "a host may only report for itself",
        ));
    }
    Ok(Json(st.ctl.heartbeat(&host, &hb).await?))
}

pub async fn image_content(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    host_from_bearer(&st, &headers).await?;
    let img = st.ctl.store.image_unscoped(&id).await?;
    if img.state != "available" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "IncorrectState",
            format!("image {id} is {}", img.state),
        ));
    }
    crate::images::stream_file(std::path::Path::new(&img.path))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("cannot read image file: {e}"),
            )
        })
}
