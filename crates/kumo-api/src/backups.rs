//! REST endpoints for backups, restores and backup schedules.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_store::{BackupRow, ScheduleRow};
use kumo_types::api::{ErrorBody, Page};
use kumo_types::storage::{
    Backup, BackupSchedule, BackupWithOperation, CreateBackup, CreateBackupSchedule, RestoreBackup,
    RestoreResult,
};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::{convert, AppState};

pub fn backup(b: BackupRow) -> Backup {
    Backup {
        id: b.id,
        project_id: b.project_id,
        source_kind: b.source_kind,
        source_id: b.source_id,
        kind: b.kind,
        parent_id: b.parent_id,
        state: b.state,
        bytes_written: b.bytes_written,
        virtual_size: b.virtual_size,
        operation_id: b.operation_id,
        schedule_id: b.schedule_id,
        error: b.last_error,
        created_at: b.created_at,
        finished_at: b.finished_at,
    }
}

fn schedule(s: ScheduleRow) -> BackupSchedule {
    BackupSchedule {
        id: s.id,
        project_id: s.project_id,
        source_kind: s.source_kind,
        source_id: s.source_id,
        cron: s.cron,
        keep_last: s.keep_last,
        keep_hourly: s.keep_hourly,
        keep_daily: s.keep_daily,
        keep_weekly: s.keep_weekly,
        next_run: s.next_run,
        created_at: s.created_at,
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct BackupQuery {
    /// Only the backups of this instance or volume.
    pub source: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/backups", tag = "storage", params(BackupQuery),
    responses((status = 200, body = Page<Backup>, description = "oldest first")))]
pub async fn list(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<BackupQuery>,
) -> Result<Json<Page<Backup>>, ApiError> {
    let rows = st
        .ctl
        .store
        .backups(&c.scope(), q.source.as_deref())
        .await?;
    Ok(Json(Page {
        items: rows.into_iter().map(backup).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/backups", tag = "storage", request_body = CreateBackup,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key")),
    responses((status = 202, body = BackupWithOperation, description = "started: incremental from the last backup unless `full` (or the chain must restart)"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateBackup>,
) -> Result<(StatusCode, Json<BackupWithOperation>), ApiError> {
    let (b, op) = st.ctl.create_backup(&c.scope(), &req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BackupWithOperation {
            backup: backup(b),
            operation: convert::operation(op),
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/backups/{id}", tag = "storage", params(("id" = String, Path, description = "Backup id")),
    responses((status = 200, body = Backup), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Backup>, ApiError> {
    Ok(Json(backup(st.ctl.store.backup(&c.scope(), &id).await?)))
}

#[utoipa::path(delete, path = "/api/v1/backups/{id}", tag = "storage", params(("id" = String, Path, description = "Backup id")),
    responses((status = 204, description = "deleted; the chain stays restorable"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "still running")))]
pub async fn delete(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.delete_backup(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/backups/{id}/verify", tag = "storage", params(("id" = String, Path, description = "Backup id")),
    responses((status = 200, body = Backup, description = "the chain reads back as recorded"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "it does not verify (damaged) or is not completed")))]
pub async fn verify(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Backup>, ApiError> {
    Ok(Json(backup(st.ctl.verify_backup(&c.scope(), &id).await?)))
}

#[utoipa::path(post, path = "/api/v1/backups/{id}/restore", tag = "storage", params(("id" = String, Path, description = "Backup id")),
    request_body = RestoreBackup,
    responses((status = 202, body = RestoreResult, description = "restoring: follow the operation"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "in place while the instance runs or the volume is attached")))]
pub async fn restore(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RestoreBackup>,
) -> Result<(StatusCode, Json<RestoreResult>), ApiError> {
    let (op, target) = st.ctl.restore_backup(&c.scope(), &id, &req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RestoreResult {
            operation: convert::operation(op),
            target_id: target,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/backup-schedules", tag = "storage",
    responses((status = 200, body = Page<BackupSchedule>)))]
pub async fn list_schedules(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<BackupSchedule>>, ApiError> {
    let rows = st.ctl.store.schedules(&c.scope()).await?;
    Ok(Json(Page {
        items: rows.into_iter().map(schedule).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/backup-schedules", tag = "storage", request_body = CreateBackupSchedule,
    responses((status = 201, body = BackupSchedule), (status = 400, body = ErrorBody, description = "bad cron expression or retention"),
        (status = 404, body = ErrorBody)))]
pub async fn create_schedule(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateBackupSchedule>,
) -> Result<(StatusCode, Json<BackupSchedule>), ApiError> {
    let s = st.ctl.create_backup_schedule(&c.scope(), &req).await?;
    Ok((StatusCode::CREATED, Json(schedule(s))))
}

#[utoipa::path(delete, path = "/api/v1/backup-schedules/{id}", tag = "storage", params(("id" = String, Path, description = "Schedule id")),
    responses((status = 204, description = "deleted (its backups stay)"), (status = 404, body = ErrorBody)))]
pub async fn delete_schedule(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.store.delete_schedule(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
