//! REST endpoints for storage pools, volumes, snapshots and instance clones.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_store::{SnapshotRow, VolumeRow};
use kumo_types::api::{ErrorBody, Operation, Page};
use kumo_types::storage::{
    AttachVolume, CloneInstance, CloneResult, CopyVolume, CreateSnapshot, CreateVolume, ExportDisk,
    ExportResult, ResizeVolume, Snapshot, StoragePool, UpdateStoragePool, Volume,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::{convert, AppState};

pub fn volume(v: VolumeRow) -> Volume {
    Volume {
        serial: kumo_types::storage::volume_serial(&v.id),
        id: v.id,
        name: v.name,
        project_id: v.project_id,
        size_bytes: v.size_bytes,
        pool: v.pool,
        host_id: v.host_id,
        state: v.state,
        instance_id: v.instance_id,
        attach_state: v.attach_state,
        snapshot_id: v.snapshot_id,
        error: v.last_error,
        created_at: v.created_at,
    }
}

pub fn snapshot(s: SnapshotRow) -> Snapshot {
    Snapshot {
        id: s.id,
        project_id: s.project_id,
        description: s.description,
        source_kind: s.source_kind,
        source_id: s.source_id,
        size_bytes: s.size_bytes,
        pool: s.pool,
        host_id: s.host_id,
        state: s.state,
        io_pause_ms: s.io_pause_ms,
        image_id: s.image_id,
        error: s.last_error,
        created_at: s.created_at,
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VolumeWithOperation {
    pub volume: Volume,
    pub operation: Operation,
}

#[utoipa::path(get, path = "/api/v1/storage-pools", tag = "storage",
    responses((status = 200, body = Page<StoragePool>, description = "every pool with its hosts, capacity and provisioned bytes")))]
pub async fn list_pools(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<StoragePool>>, ApiError> {
    let admin = c.scope().admin;
    Ok(Json(Page {
        items: st
            .ctl
            .storage_pools()
            .await?
            .into_iter()
            .map(|p| for_caller(p, admin))
            .collect(),
        next_cursor: None,
    }))
}

/// Members see a pool's name, kind and room, not the hosts behind it (like `/hosts`).
fn for_caller(mut p: StoragePool, admin: bool) -> StoragePool {
    if !admin {
        p.hosts.clear();
    }
    p
}

#[utoipa::path(get, path = "/api/v1/storage-pools/{name}", tag = "storage", params(("name" = String, Path, description = "Pool name")),
    responses((status = 200, body = StoragePool), (status = 404, body = ErrorBody)))]
pub async fn show_pool(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<StoragePool>, ApiError> {
    Ok(Json(for_caller(
        st.ctl.storage_pool(&name).await?,
        c.scope().admin,
    )))
}

#[utoipa::path(patch, path = "/api/v1/storage-pools/{name}", tag = "storage", params(("name" = String, Path, description = "Pool name")),
    request_body = UpdateStoragePool,
    responses((status = 200, body = StoragePool), (status = 400, body = ErrorBody, description = "overcommit outside 1.0-20.0"),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_pool(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateStoragePool>,
) -> Result<Json<StoragePool>, ApiError> {
    let scope = c.scope();
    if !scope.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "only administrators change storage pools",
        ));
    }
    Ok(Json(st.ctl.update_storage_pool(&scope, &name, &req).await?))
}

#[utoipa::path(get, path = "/api/v1/volumes", tag = "storage",
    responses((status = 200, body = Page<Volume>, description = "the project's volumes (administrators: every project's)")))]
pub async fn list_volumes(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<Volume>>, ApiError> {
    let rows = st.ctl.store.volumes(&c.scope()).await?;
    Ok(Json(Page {
        items: rows.into_iter().map(volume).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/volumes", tag = "storage", request_body = CreateVolume,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key")),
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody, description = "a size of 0, not a multiple of 512, above 64 TiB, smaller than the snapshot"),
        (status = 404, body = ErrorBody, description = "no such snapshot, instance or pool in this project"),
        (status = 507, body = ErrorBody, description = "the pool has no room for it")))]
pub async fn create_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateVolume>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let v = st.ctl.create_volume(&c.scope(), &req).await?;
    Ok((StatusCode::CREATED, Json(volume(v))))
}

#[utoipa::path(get, path = "/api/v1/volumes/{id}", tag = "storage", params(("id" = String, Path, description = "Volume id or name")),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
pub async fn show_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(volume(st.ctl.store.volume(&c.scope(), &id).await?)))
}

#[utoipa::path(delete, path = "/api/v1/volumes/{id}", tag = "storage", params(("id" = String, Path, description = "Volume id or name")),
    responses((status = 204, description = "deleted (its snapshots stay)"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "attached: detach it first")))]
pub async fn delete_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.delete_volume(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/volumes/{id}/attach", tag = "storage", params(("id" = String, Path, description = "Volume id or name")),
    request_body = AttachVolume,
    responses((status = 202, body = Volume, description = "attaching: hot-plugged into a running instance, `attached` once the host reports it"),
        (status = 400, body = ErrorBody, description = "the instance's host cannot reach the volume's pool"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the volume is not available (e.g. attached elsewhere)")))]
pub async fn attach_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AttachVolume>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let v = st.ctl.attach_volume(&c.scope(), &id, &req).await?;
    Ok((StatusCode::ACCEPTED, Json(volume(v))))
}

#[utoipa::path(post, path = "/api/v1/volumes/{id}/detach", tag = "storage", params(("id" = String, Path, description = "Volume id or name")),
    responses((status = 202, body = Volume, description = "detaching: `available` once the guest released it"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "not attached")))]
pub async fn detach_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let v = st.ctl.detach_volume(&c.scope(), &id).await?;
    Ok((StatusCode::ACCEPTED, Json(volume(v))))
}

#[utoipa::path(post, path = "/api/v1/volumes/{id}/resize", tag = "storage", params(("id" = String, Path, description = "Volume id or name")),
    request_body = ResizeVolume,
    responses((status = 200, body = Volume, description = "grown (online if attached: the guest sees the new size)"),
        (status = 400, body = ErrorBody, description = "not larger (shrink by copying)"), (status = 404, body = ErrorBody),
        (status = 507, body = ErrorBody, description = "the pool has no room")))]
pub async fn resize_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ResizeVolume>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(volume(
        st.ctl.resize_volume(&c.scope(), &id, &req).await?,
    )))
}

#[utoipa::path(post, path = "/api/v1/volumes/{id}/copy", tag = "storage", params(("id" = String, Path, description = "Volume id or name")),
    request_body = CopyVolume,
    responses((status = 202, body = VolumeWithOperation, description = "the new volume (`creating`) and the copy's operation; the copy fails if data lies beyond the new size"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "attached to a running instance"),
        (status = 507, body = ErrorBody)))]
pub async fn copy_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CopyVolume>,
) -> Result<(StatusCode, Json<VolumeWithOperation>), ApiError> {
    let (v, op) = st.ctl.copy_volume(&c.scope(), &id, &req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(VolumeWithOperation {
            volume: volume(v),
            operation: convert::operation(op),
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/snapshots", tag = "storage",
    responses((status = 200, body = Page<Snapshot>)))]
pub async fn list_snapshots(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<Snapshot>>, ApiError> {
    let rows = st.ctl.store.snapshots(&c.scope()).await?;
    Ok(Json(Page {
        items: rows.into_iter().map(snapshot).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/snapshots", tag = "storage", request_body = CreateSnapshot,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key")),
    responses((status = 201, body = Snapshot, description = "taken: live (with the I/O pause) if the disk's VM runs"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_snapshot(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let s = st.ctl.create_snapshot(&c.scope(), &req).await?;
    Ok((StatusCode::CREATED, Json(snapshot(s))))
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}", tag = "storage", params(("id" = String, Path, description = "Snapshot id")),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
pub async fn show_snapshot(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(snapshot(
        st.ctl.store.snapshot(&c.scope(), &id).await?,
    )))
}

#[utoipa::path(delete, path = "/api/v1/snapshots/{id}", tag = "storage", params(("id" = String, Path, description = "Snapshot id")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "instances or volumes are made from it")))]
pub async fn delete_snapshot(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.delete_snapshot(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/instances/{id}/clone", tag = "instances", params(("id" = String, Path, description = "Instance id or name")),
    request_body = CloneInstance,
    responses((status = 201, body = CloneResult, description = "the clone (a new identity: id, MAC, addresses) and the live snapshot it boots from; the source keeps running"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn clone_instance(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CloneInstance>,
) -> Result<(StatusCode, Json<CloneResult>), ApiError> {
    let (inst, snap) = st.ctl.clone_instance(&c.scope(), &id, &req).await?;
    Ok((
        StatusCode::CREATED,
        Json(CloneResult {
            instance: convert::instance(inst),
            snapshot: snapshot(snap),
        }),
    ))
}

#[utoipa::path(post, path = "/api/v1/volumes/{id}/export", tag = "storage", params(("id" = String, Path, description = "Volume id or name")),
    request_body = ExportDisk,
    responses((status = 202, body = ExportResult, description = "exporting: download the file once the operation succeeded"),
        (status = 400, body = ErrorBody, description = "unknown format"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "attached to a running instance (export a snapshot of it)")))]
pub async fn export_volume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ExportDisk>,
) -> Result<(StatusCode, Json<ExportResult>), ApiError> {
    let (op, file) = st
        .ctl
        .export_disk(&c.scope(), &id, false, &req.format)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ExportResult {
            operation: convert::operation(op),
            file,
        }),
    ))
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/export", tag = "storage", params(("id" = String, Path, description = "Snapshot id")),
    request_body = ExportDisk,
    responses((status = 202, body = ExportResult, description = "exporting: download the file once the operation succeeded"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn export_snapshot(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ExportDisk>,
) -> Result<(StatusCode, Json<ExportResult>), ApiError> {
    let (op, file) = st
        .ctl
        .export_disk(&c.scope(), &id, true, &req.format)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ExportResult {
            operation: convert::operation(op),
            file,
        }),
    ))
}

/// An export file's name: `<id>.<format>`, nothing that could leave the project's directory.
fn export_name_ok(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((id, fmt)) => {
            kumo_controller::EXPORT_FORMATS.contains(&fmt)
                && !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        }
        None => false,
    }
}

#[utoipa::path(get, path = "/api/v1/exports/{file}", tag = "storage", params(("file" = String, Path, description = "The export's file name (`<id>.<format>`)")),
    responses((status = 200, content_type = "application/octet-stream", description = "the exported disk"),
        (status = 404, body = ErrorBody)))]
pub async fn download_export(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(file): ApiPath<String>,
) -> Result<axum::response::Response, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("export {file} not found (is its operation finished?)"),
        )
    };
    if !export_name_ok(&file) {
        return Err(not_found());
    }
    let path = st.ctl.export_dir(&c.scope().project_id).join(&file);
    crate::images::stream_file(&path)
        .await
        .map_err(|_| not_found())
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_names_stay_in_their_directory() {
        assert!(super::export_name_ok("vol-0123456789abcdef0.raw"));
        assert!(super::export_name_ok("snap-0123456789abcdef0.vmdk"));
        for bad in [
            "../x.raw",
            "vol-1.exe",
            "vol-1",
            ".raw",
            "a/b.raw",
            "VOL.raw",
            "vol-1.raw/",
        ] {
            assert!(!super::export_name_ok(bad), "{bad}");
        }
    }
}

#[derive(Debug, serde::Deserialize, ToSchema)]
pub struct ImageFromSnapshot {
    pub name: String,
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/image", tag = "storage", params(("id" = String, Path, description = "Snapshot id")),
    request_body = ImageFromSnapshot,
    responses((status = 202, body = crate::images::ImageWithOperation, description = "the image (`pending`) and the operation that exports and imports it"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn image_from_snapshot(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ImageFromSnapshot>,
) -> Result<(StatusCode, Json<crate::images::ImageWithOperation>), ApiError> {
    let (img, op) = st
        .ctl
        .image_from_snapshot(&c.scope(), &id, &req.name)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::images::ImageWithOperation {
            image: convert::image(img),
            operation: convert::operation(op),
        }),
    ))
}
