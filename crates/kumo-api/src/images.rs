//! `/api/v1/images`: import from a server-side file (an operation with progress), streamed
//! upload, list, show, delete.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use futures::StreamExt;
use kumo_types::api::{ErrorBody, Image, ImportImage, ListParams, Operation, Page, UploadParams};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::{convert, AppState};

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageWithOperation {
    pub image: Image,
    pub operation: Operation,
}

#[utoipa::path(get, path = "/api/v1/images", tag = "images", params(ListParams),
    responses((status = 200, body = Page<Image>)))]
pub async fn list(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<Page<Image>>, ApiError> {
    let (rows, next) = st
        .ctl
        .store
        .images(&c.scope(), q.limit, q.cursor.as_deref(), q.name.as_deref())
        .await?;
    Ok(Json(Page {
        items: rows.into_iter().map(convert::image).collect(),
        next_cursor: next,
    }))
}

#[utoipa::path(get, path = "/api/v1/images/{id}", tag = "images", params(("id" = String, Path, description = "Image id or name")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(convert::image(
        st.ctl.store.image(&c.scope(), &id).await?,
    )))
}

#[utoipa::path(post, path = "/api/v1/images", tag = "images", request_body = ImportImage,
    responses((status = 202, body = ImageWithOperation, description = "import started; follow the operation"), (status = 400, body = ErrorBody)))]
pub async fn import(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<ImportImage>,
) -> Result<(StatusCode, Json<ImageWithOperation>), ApiError> {
    let (img, op) = st.ctl.import_image(&c.scope(), &req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ImageWithOperation {
            image: convert::image(img),
            operation: convert::operation(op),
        }),
    ))
}

/// Upload an image as the request body. The body's SHA-256 must be sent (and signed) as
/// `x-amz-content-sha256`; the upload is refused if the body does not match it.
#[utoipa::path(put, path = "/api/v1/images/upload", tag = "images", params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ImageWithOperation), (status = 400, body = ErrorBody)))]
pub async fn upload(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<UploadParams>,
    body: Body,
) -> Result<(StatusCode, Json<ImageWithOperation>), ApiError> {
    let declared = headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| ApiError::invalid("uploads need an x-amz-content-sha256 header"))?;
    let len = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let hasher = std::sync::Arc::new(std::sync::Mutex::new(Some(Sha256::new())));
    let h2 = hasher.clone();
    let mut finished = false;
    // Hash the bytes as they stream; at the end, a mismatch turns into a stream error so the
    // import fails and leaves nothing behind.
    let stream = body.into_data_stream().map(move |chunk| match chunk {
        Ok(b) => {
            if let Ok(mut g) = h2.lock() {
                if let Some(h) = g.as_mut() {
                    h.update(&b);
                }
            }
            Ok(b)
        }
        Err(e) => Err(std::io::Error::other(e)),
    });
    let declared2 = declared.clone();
    let checked = stream.chain(futures::stream::poll_fn(move |_| {
        if finished {
            return std::task::Poll::Ready(None);
        }
        finished = true;
        let got = hasher
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .map(|h| hex::encode(h.finalize()))
            .unwrap_or_default();
        if got == declared2 {
            std::task::Poll::Ready(None)
        } else {
            std::task::Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the uploaded body does not match its signed x-amz-content-sha256",
            ))))
        }
    }));
    let (img, op) = st
        .ctl
        .upload_image(&c.scope(), &q, len, Box::pin(checked))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(ImageWithOperation {
            image: convert::image(img),
            operation: convert::operation(op),
        }),
    ))
}

#[utoipa::path(delete, path = "/api/v1/images/{id}", tag = "images", params(("id" = String, Path)),
    responses((status = 200, body = Image), (status = 409, body = ErrorBody, description = "in use")))]
pub async fn delete(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(convert::image(
        st.ctl.delete_image(&c.scope(), &id).await?,
    )))
}

/// A file as a streamed `application/octet-stream` response.
pub(crate) async fn stream_file(
    path: &std::path::Path,
) -> std::io::Result<axum::response::Response> {
    let file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    axum::response::Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .body(Body::from_stream(tokio_util::io::ReaderStream::new(file)))
        .map_err(std::io::Error::other)
}

/// Export an image: download its (qcow2, or kernel/ramdisk) file.
#[utoipa::path(get, path = "/api/v1/images/{id}/file", tag = "images", params(("id" = String, Path, description = "Image id or name")),
    responses((status = 200, content_type = "application/octet-stream", description = "the image file as stored (disks: qcow2)"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "not available yet")))]
pub async fn download(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::response::Response, ApiError> {
    let img = st.ctl.store.image(&c.scope(), &id).await?;
    if img.state != "available" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "IncorrectState",
            format!("image {} is {}", img.id, img.state),
        ));
    }
    stream_file(std::path::Path::new(&img.path))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("cannot read image {}: {e}", img.id),
            )
        })
}
