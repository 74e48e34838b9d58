//! Hosts, instance types, operations, events and the caller's identity.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_types::api::{
    ErrorBody, Event, Host, InstanceType, JoinToken, ListParams, Operation, Page, SetHostState,
    WhoAmI,
};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::{convert, AppState};

pub(crate) fn admin_only(c: &Caller) -> Result<(), ApiError> {
    if c.scope().admin {
        Ok(())
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "Forbidden",
            "only administrators can see and manage hosts",
        ))
    }
}

#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts", params(ListParams), responses((status = 200, body = Page<Host>, description = "by name"), (status = 403, body = ErrorBody)))]
pub async fn hosts(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<Page<Host>>, ApiError> {
    admin_only(&c)?;
    let (rows, next) = st
        .ctl
        .store
        .hosts_page(q.limit, q.cursor.as_deref())
        .await?;
    let p = st.ctl.store.placement().await?;
    let items = rows
        .into_iter()
        .map(|h| {
            let u = p.usage(&h.id);
            let path = st.ctl.host_path(&h.id);
            Host {
                path,
                ..convert::host(h, u.as_ref())
            }
        })
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: next,
    }))
}

#[utoipa::path(get, path = "/api/v1/hosts/{id}", tag = "hosts", params(("id" = String, Path, description = "Host id or name")),
    responses((status = 200, body = Host), (status = 404, body = ErrorBody)))]
pub async fn host(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Host>, ApiError> {
    admin_only(&c)?;
    let h = st.ctl.store.host(&id).await?;
    let u = st.ctl.store.host_usage(&h.id).await?;
    let path = st.ctl.host_path(&h.id);
    Ok(Json(Host {
        path,
        ..convert::host(h, u.as_ref())
    }))
}

#[utoipa::path(get, path = "/api/v1/instance-types", tag = "instances", responses((status = 200, body = Page<InstanceType>)))]
pub async fn instance_types(
    State(st): State<AppState>,
) -> Result<Json<Page<InstanceType>>, ApiError> {
    Ok(Json(Page {
        items: st.ctl.store.instance_types().await?,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/operations", tag = "operations", params(ListParams), responses((status = 200, body = Page<Operation>)))]
pub async fn operations(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<Page<Operation>>, ApiError> {
    let (rows, next) = st
        .ctl
        .store
        .operations(&c.scope(), q.limit, q.cursor.as_deref())
        .await?;
    Ok(Json(Page {
        items: rows.into_iter().map(convert::operation).collect(),
        next_cursor: next,
    }))
}

#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "operations", params(("id" = String, Path)),
    responses((status = 200, body = Operation), (status = 404, body = ErrorBody)))]
pub async fn operation(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Operation>, ApiError> {
    Ok(Json(convert::operation(
        st.ctl.store.operation(&c.scope(), &id).await?,
    )))
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(ListParams), responses((status = 200, body = Page<Event>, description = "newest first")))]
pub async fn events(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<Page<Event>>, ApiError> {
    let (rows, next) = st
        .ctl
        .store
        .events(&c.scope(), q.limit, q.cursor.as_deref())
        .await?;
    Ok(Json(Page {
        items: rows.into_iter().map(convert::event).collect(),
        next_cursor: next,
    }))
}

#[utoipa::path(get, path = "/api/v1/whoami", tag = "auth", responses((status = 200, body = WhoAmI)))]
pub async fn whoami(Extension(c): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        user_id: c.key.user_id.clone(),
        user_name: c.key.user_name.clone(),
        project_id: c.key.project_id.clone(),
        role: c.key.role.clone(),
    })
}

#[utoipa::path(post, path = "/api/v1/hosts/{id}/state", tag = "hosts", request_body = SetHostState, params(("id" = String, Path)),
    responses((status = 200, body = Host), (status = 409, body = ErrorBody, description = "transition not allowed"), (status = 403, body = ErrorBody)))]
pub async fn set_host_state(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SetHostState>,
) -> Result<Json<Host>, ApiError> {
    admin_only(&c)?;
    let h = st.ctl.set_host_state(&id, &req.state).await?;
    let u = st.ctl.store.host_usage(&h.id).await?;
    Ok(Json(convert::host(h, u.as_ref())))
}

#[utoipa::path(get, path = "/api/v1/join-tokens", tag = "hosts", responses((status = 200, body = Page<JoinToken>), (status = 403, body = ErrorBody)))]
pub async fn join_tokens(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<JoinToken>>, ApiError> {
    admin_only(&c)?;
    let items = st
        .ctl
        .join_tokens()
        .await?
        .into_iter()
        .map(|t| JoinToken {
            token: t.token,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
        })
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/join-tokens", tag = "hosts", responses((status = 201, body = JoinToken), (status = 403, body = ErrorBody)))]
pub async fn create_join_token(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<(StatusCode, Json<JoinToken>), ApiError> {
    admin_only(&c)?;
    let token = st.ctl.create_join_token().await?;
    Ok((
        StatusCode::CREATED,
        Json(JoinToken {
            token,
            created_at: chrono::Utc::now(),
            revoked_at: None,
        }),
    ))
}

#[utoipa::path(delete, path = "/api/v1/join-tokens/{token}", tag = "hosts", params(("token" = String, Path)),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody)))]
pub async fn revoke_join_token(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(token): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    admin_only(&c)?;
    st.ctl.revoke_join_token(&token).await?;
    Ok(StatusCode::NO_CONTENT)
}
