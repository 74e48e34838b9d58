//! Placement: explanations, capacity, spread groups, per-host settings, decision times.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_types::api::{
    CapacityReport, CreatePlacementGroup, ErrorBody, ExplainParams, Host, Page, PlacementGroup,
    PlacementStats, PlacementVerdict, UpdateHost,
};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::misc::admin_only;
use crate::{convert, AppState};

#[utoipa::path(get, path = "/api/v1/placement/explain", tag = "hosts", params(ExplainParams),
    responses((status = 200, body = Vec<PlacementVerdict>), (status = 400, body = ErrorBody)))]
pub async fn explain_placement(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<ExplainParams>,
) -> Result<Json<Vec<PlacementVerdict>>, ApiError> {
    admin_only(&c)?;
    let ty = q.instance_type.as_deref().unwrap_or("t1.small");
    let constraints: Vec<String> = q
        .constraints
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    let v = st
        .ctl
        .explain_placement(
            &c.scope(),
            ty,
            q.site,
            &constraints,
            q.placement_group.as_deref(),
        )
        .await?;
    Ok(Json(
        v.into_iter()
            .map(|v| PlacementVerdict {
                host_id: v.host_id,
                host_name: v.host_name,
                refused: v.refused,
                score: v.score,
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/placement/stats", tag = "hosts",
    responses((status = 200, body = PlacementStats), (status = 403, body = ErrorBody)))]
pub async fn stats(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<PlacementStats>, ApiError> {
    admin_only(&c)?;
    Ok(Json(st.ctl.decision_stats()))
}

#[utoipa::path(get, path = "/api/v1/capacity", tag = "hosts", responses((status = 200, body = CapacityReport), (status = 403, body = ErrorBody)))]
pub async fn capacity(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<CapacityReport>, ApiError> {
    admin_only(&c)?;
    Ok(Json(st.ctl.capacity().await?))
}

#[utoipa::path(patch, path = "/api/v1/hosts/{id}", tag = "hosts", request_body = UpdateHost, params(("id" = String, Path, description = "Host id or name")),
    responses((status = 200, body = Host), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_host(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateHost>,
) -> Result<Json<Host>, ApiError> {
    admin_only(&c)?;
    let h = st
        .ctl
        .set_host_policy(
            &id,
            req.cpu_overcommit,
            req.memory_overcommit,
            req.reserved_memory_mib,
        )
        .await?;
    let u = st.ctl.store.host_usage(&h.id).await?;
    Ok(Json(convert::host(h, u.as_ref())))
}

#[utoipa::path(get, path = "/api/v1/placement-groups", tag = "placement-groups",
    responses((status = 200, body = Page<PlacementGroup>)))]
pub async fn list_groups(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<PlacementGroup>>, ApiError> {
    let rows = st.ctl.placement_groups(&c.scope()).await?;
    Ok(Json(Page {
        items: rows.into_iter().map(convert::placement_group).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/placement-groups", tag = "placement-groups", request_body = CreatePlacementGroup,
    responses((status = 201, body = PlacementGroup), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_group(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreatePlacementGroup>,
) -> Result<(StatusCode, Json<PlacementGroup>), ApiError> {
    let g = st
        .ctl
        .create_placement_group(
            &c.scope(),
            &req.name,
            req.strategy.as_deref().unwrap_or("spread"),
            req.max_per_host.unwrap_or(1),
            req.spread_storage,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(convert::placement_group(g))))
}

#[utoipa::path(get, path = "/api/v1/placement-groups/{id}", tag = "placement-groups", params(("id" = String, Path, description = "Group id or name")),
    responses((status = 200, body = PlacementGroup), (status = 404, body = ErrorBody)))]
pub async fn show_group(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<PlacementGroup>, ApiError> {
    let g = st.ctl.placement_group(&c.scope(), &id).await?;
    Ok(Json(convert::placement_group(g)))
}

#[utoipa::path(delete, path = "/api/v1/placement-groups/{id}", tag = "placement-groups", params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the group still has live instances")))]
pub async fn delete_group(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.delete_placement_group(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
