//! REST endpoints for live migration and host maintenance (operators only: where an instance
//! runs is the operator's business, as on EC2).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_types::api::{ErrorBody, Page};
use kumo_types::migration::{EvacuateHost, Evacuation, MigrateInstance, Migration, ReturnHost};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::misc::admin_only;
use crate::AppState;

#[utoipa::path(post, path = "/api/v1/instances/{id}/migrate", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")), request_body = MigrateInstance,
    responses((status = 202, body = Migration, description = "started; follow it with GET /api/v1/migrations/{id}"),
        (status = 400, body = ErrorBody, description = "same host, bad downtime or bandwidth, a host that cannot carry its network or volumes"),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not running, already migrating, destination not up"),
        (status = 503, body = ErrorBody, description = "no host has room")))]
pub async fn migrate(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<MigrateInstance>,
) -> Result<(StatusCode, Json<Migration>), ApiError> {
    admin_only(&c)?;
    let m = st.ctl.migrate_instance(&c.scope(), &id, &req).await?;
    Ok((StatusCode::ACCEPTED, Json(m)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct MigrationQuery {
    /// Only this instance's migrations.
    pub instance: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/migrations", tag = "instances", params(MigrationQuery),
    responses((status = 200, body = Page<Migration>, description = "newest first")))]
pub async fn list(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<MigrationQuery>,
) -> Result<Json<Page<Migration>>, ApiError> {
    admin_only(&c)?;
    let items = st.ctl.migrations(&c.scope(), q.instance.as_deref()).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/migrations/{id}", tag = "instances",
    params(("id" = String, Path, description = "Migration (operation) id")),
    responses((status = 200, body = Migration), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Migration>, ApiError> {
    admin_only(&c)?;
    Ok(Json(st.ctl.migration(&c.scope(), &id).await?))
}

#[utoipa::path(post, path = "/api/v1/migrations/{id}/cancel", tag = "instances",
    params(("id" = String, Path, description = "Migration (operation) id")),
    responses((status = 200, body = Migration, description = "rolling back: the instance stays where it was"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "already switching")))]
pub async fn cancel(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Migration>, ApiError> {
    admin_only(&c)?;
    Ok(Json(st.ctl.cancel_migration(&c.scope(), &id).await?))
}

#[utoipa::path(post, path = "/api/v1/hosts/{id}/evacuate", tag = "hosts",
    params(("id" = String, Path, description = "Host id or name")), request_body = EvacuateHost,
    responses((status = 202, body = Evacuation, description = "the host is in maintenance; its instances are migrating (see the items for those that cannot move and why)"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn evacuate(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<EvacuateHost>,
) -> Result<(StatusCode, Json<Evacuation>), ApiError> {
    admin_only(&c)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(st.ctl.evacuate_host(&id, &req).await?),
    ))
}

#[utoipa::path(post, path = "/api/v1/hosts/{id}/return", tag = "hosts",
    params(("id" = String, Path, description = "Host id or name")), request_body = ReturnHost,
    responses((status = 202, body = Evacuation, description = "the host is up; with move_home, its instances are migrating back"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn return_host(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ReturnHost>,
) -> Result<(StatusCode, Json<Evacuation>), ApiError> {
    admin_only(&c)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(st.ctl.return_host(&id, &req).await?),
    ))
}
