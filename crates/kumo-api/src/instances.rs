//! `/api/v1/instances`: thin handlers over the controller's operations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_types::api::{
    ConsoleOutput, CreateInstance, CreateInstanceBatch, ErrorBody, Instance, ListParams, Page,
    UpdateInstance,
};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::{convert, AppState};

#[utoipa::path(get, path = "/api/v1/instances", tag = "instances", params(ListParams),
    responses((status = 200, body = Page<Instance>), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<Page<Instance>>, ApiError> {
    let (rows, next) = st
        .ctl
        .store
        .instances(&c.scope(), q.limit, q.cursor.as_deref(), q.name.as_deref())
        .await?;
    Ok(Json(Page {
        items: rows.into_iter().map(convert::instance).collect(),
        next_cursor: next,
    }))
}

#[utoipa::path(post, path = "/api/v1/instances", tag = "instances", request_body = CreateInstance,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key")),
    responses((status = 201, body = Instance), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody, description = "no host can take it")))]
pub async fn create(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateInstance>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let row = st.ctl.create_instance(&c.scope(), &req).await?;
    Ok((StatusCode::CREATED, Json(convert::instance(row))))
}

#[utoipa::path(post, path = "/api/v1/instance-batches", tag = "instances", request_body = CreateInstanceBatch,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key")),
    responses((status = 201, body = Page<Instance>, description = "the instances created, in order"), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody, description = "fewer than min_count fit; none was created")))]
pub async fn create_batch(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateInstanceBatch>,
) -> Result<(StatusCode, Json<Page<Instance>>), ApiError> {
    let min = req.min_count.unwrap_or(req.count);
    let rows = st
        .ctl
        .create_instances(&c.scope(), &req.template, req.count, min, |n| {
            (format!("{}-{n}", req.template.name), Default::default())
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Page {
            items: rows.into_iter().map(convert::instance).collect(),
            next_cursor: None,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/instances/{id}", tag = "instances", params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Instance>, ApiError> {
    Ok(Json(convert::instance(
        st.ctl.store.instance(&c.scope(), &id).await?,
    )))
}

#[utoipa::path(patch, path = "/api/v1/instances/{id}", tag = "instances", request_body = UpdateInstance, params(("id" = String, Path)),
    responses((status = 200, body = Instance), (status = 400, body = ErrorBody, description = "ha_priority out of range (0 to 1000)"), (status = 409, body = ErrorBody)))]
pub async fn update(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateInstance>,
) -> Result<Json<Instance>, ApiError> {
    // Every setting is checked before any changes: a bad priority leaves the type alone too.
    if let Some(p) = req.ha_priority {
        kumo_store::check_ha_priority(p).map_err(kumo_controller::OpError::from)?;
    }
    let mut row = match req.instance_type {
        Some(t) => st.ctl.resize_instance(&c.scope(), &id, &t).await?,
        None => st.ctl.store.instance(&c.scope(), &id).await?,
    };
    if req.ha.is_some() || req.ha_priority.is_some() {
        row = st
            .ctl
            .set_instance_ha(&c.scope(), &id, req.ha, req.ha_priority)
            .await?;
    }
    Ok(Json(convert::instance(row)))
}

#[utoipa::path(delete, path = "/api/v1/instances/{id}", tag = "instances", params(("id" = String, Path)),
    responses((status = 202, body = Instance, description = "terminating"), (status = 404, body = ErrorBody)))]
pub async fn terminate(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let row = st.ctl.terminate_instance(&c.scope(), &id).await?;
    Ok((StatusCode::ACCEPTED, Json(convert::instance(row))))
}

#[utoipa::path(post, path = "/api/v1/instances/{id}/start", tag = "instances", params(("id" = String, Path)),
    responses((status = 202, body = Instance), (status = 409, body = ErrorBody)))]
pub async fn start(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(convert::instance(
            st.ctl.start_instance(&c.scope(), &id).await?,
        )),
    ))
}

#[utoipa::path(post, path = "/api/v1/instances/{id}/stop", tag = "instances", params(("id" = String, Path)),
    responses((status = 202, body = Instance), (status = 409, body = ErrorBody)))]
pub async fn stop(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(convert::instance(
            st.ctl.stop_instance(&c.scope(), &id).await?,
        )),
    ))
}

#[utoipa::path(post, path = "/api/v1/instances/{id}/reboot", tag = "instances", params(("id" = String, Path)),
    responses((status = 202, body = Instance), (status = 409, body = ErrorBody)))]
pub async fn reboot(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(convert::instance(
            st.ctl.reboot_instance(&c.scope(), &id).await?,
        )),
    ))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct ConsoleParams {
    /// How many bytes from the end of the log (default 65536, at most 1 MiB).
    pub bytes: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/instances/{id}/console", tag = "instances", params(("id" = String, Path), ConsoleParams),
    responses((status = 200, body = ConsoleOutput), (status = 404, body = ErrorBody)))]
pub async fn console(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ConsoleParams>,
) -> Result<Json<ConsoleOutput>, ApiError> {
    let bytes = q.bytes.unwrap_or(65536).min(1 << 20);
    let (row, output) = st.ctl.console_output(&c.scope(), &id, bytes).await?;
    Ok(Json(ConsoleOutput {
        instance_id: row.id,
        output,
    }))
}
