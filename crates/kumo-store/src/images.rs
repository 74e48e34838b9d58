//! Images: disk images (`ami-`), kernels (`aki-`) and ramdisks (`ari-`).

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use crate::{clamp_limit, now_str, parse_time, Result, Scope, Store, StoreError};

#[derive(Debug, Clone)]
pub struct ImageRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub kind: String,
    pub state: String,
    pub public: bool,
    pub source_format: Option<String>,
    pub virtual_size: Option<u64>,
    pub file_size: Option<u64>,
    pub sha256: Option<String>,
    pub path: String,
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    pub cmdline: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewImage {
    pub name: String,
    pub kind: String,
    pub public: bool,
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    pub cmdline: Option<String>,
}

const COLS: &str = "id, project_id, name, kind, state, public, source_format, virtual_size, file_size, sha256, path, kernel_id, ramdisk_id, cmdline, error, created_at";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ImageRow> {
    Ok(ImageRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        state: r.try_get("state")?,
        public: r.try_get::<i64, _>("public")? != 0,
        source_format: r.try_get("source_format")?,
        virtual_size: r
            .try_get::<Option<i64>, _>("virtual_size")?
            .map(|v| v as u64),
        file_size: r.try_get::<Option<i64>, _>("file_size")?.map(|v| v as u64),
        sha256: r.try_get("sha256")?,
        path: r.try_get("path")?,
        kernel_id: r.try_get("kernel_id")?,
        ramdisk_id: r.try_get("ramdisk_id")?,
        cmdline: r.try_get("cmdline")?,
        error: r.try_get("error")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

pub fn image_kind_prefix(kind: &str) -> Result<IdKind> {
    match kind {
        "disk" => Ok(IdKind::Image),
        "kernel" => Ok(IdKind::Kernel),
        "ramdisk" => Ok(IdKind::Ramdisk),
        other => Err(StoreError::Invalid(format!(
            "image kind must be disk, kernel or ramdisk, not {other:?}"
        ))),
    }
}

impl Store {
    /// Record a new image in state `pending`; `path_for` gives the file path from the new id.
    pub async fn create_image(
        &self,
        scope: &Scope,
        new: &NewImage,
        path_for: impl FnOnce(&str) -> String,
    ) -> Result<ImageRow> {
        kumo_types::id::validate_name(&new.name).map_err(StoreError::Invalid)?;
        let id = new_id(image_kind_prefix(&new.kind)?);
        if new.public && !scope.admin {
            return Err(StoreError::Invalid(
                "only admins can make public images".into(),
            ));
        }
        for (what, want, reference) in [
            ("kernel", "kernel", &new.kernel_id),
            ("ramdisk", "ramdisk", &new.ramdisk_id),
        ] {
            if let Some(rid) = reference {
                let img = self.image(scope, rid).await?;
                if img.kind != want || img.state != "available" {
                    return Err(StoreError::Invalid(format!(
                        "{rid} is not an available {what} image"
                    )));
                }
            }
        }
        // Names are unique among a project's live images.
        let clash: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM images WHERE project_id = $1 AND name = $2 AND deleted_at IS NULL",
        )
        .bind(&scope.project_id)
        .bind(&new.name)
        .fetch_optional(&self.pool)
        .await?;
        if let Some((other,)) = clash {
            return Err(StoreError::Conflict(format!(
                "an image named {} already exists ({other})",
                new.name
            )));
        }
        let path = path_for(&id);
        sqlx::query(
            "INSERT INTO images (id, project_id, name, kind, state, public, path, kernel_id, ramdisk_id, cmdline, created_at)
             VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8, $9, $10)",
        )
        .bind(&id)
        .bind(&scope.project_id)
        .bind(&new.name)
        .bind(&new.kind)
        .bind(i64::from(new.public))
        .bind(&path)
        .bind(&new.kernel_id)
        .bind(&new.ramdisk_id)
        .bind(&new.cmdline)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        self.image(scope, &id).await
    }

    pub async fn finish_image(
        &self,
        id: &str,
        source_format: &str,
        virtual_size: u64,
        file_size: u64,
        sha256: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE images SET state = 'available', source_format = $2, virtual_size = $3, file_size = $4, sha256 = $5, error = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(source_format)
        .bind(virtual_size as i64)
        .bind(file_size as i64)
        .bind(sha256)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A failed import leaves no image behind: the row is marked deleted with its error kept
    /// for the operation record.
    pub async fn fail_image(&self, id: &str, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE images SET state = 'failed', error = $2, deleted_at = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An image by id or name: the project's own images and public ones.
    pub async fn image(&self, scope: &Scope, id_or_name: &str) -> Result<ImageRow> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM images WHERE (id = $1 OR name = $1) AND deleted_at IS NULL
             AND (CAST($2 AS TEXT) IS NULL OR project_id = $2 OR public = 1)
             ORDER BY CASE WHEN project_id = $3 THEN 0 ELSE 1 END LIMIT 1"
        ))
        .bind(id_or_name)
        .bind(scope.filter())
        .bind(&scope.project_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "image",
                id: id_or_name.to_string(),
            }),
        }
    }

    pub async fn images(
        &self,
        scope: &Scope,
        limit: Option<u32>,
        cursor: Option<&str>,
        name: Option<&str>,
    ) -> Result<(Vec<ImageRow>, Option<String>)> {
        let limit = clamp_limit(limit);
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM images WHERE deleted_at IS NULL
             AND (CAST($1 AS TEXT) IS NULL OR project_id = $1 OR public = 1)
             AND id > $2 AND (CAST($3 AS TEXT) IS NULL OR name = $3)
             ORDER BY id LIMIT $4"
        ))
        .bind(scope.filter())
        .bind(cursor.unwrap_or(""))
        .bind(name)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(from_row).collect::<Result<Vec<_>>>()?;
        Ok(crate::page(items, limit, |i| i.id.clone()))
    }

    /// Delete an image the caller owns; refused while a live instance or another image uses it.
    pub async fn delete_image(&self, scope: &Scope, id_or_name: &str) -> Result<ImageRow> {
        let img = self.image(scope, id_or_name).await?;
        if !scope.admin && img.project_id != scope.project_id {
            return Err(StoreError::NotFound {
                kind: "image",
                id: id_or_name.to_string(),
            });
        }
        let users: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM instances WHERE image_id = $1 AND state <> 'terminated' LIMIT 5",
        )
        .bind(&img.id)
        .fetch_all(&self.pool)
        .await?;
        if !users.is_empty() {
            let ids: Vec<String> = users.into_iter().map(|r| r.0).collect();
            return Err(StoreError::Conflict(format!(
                "image {} is in use by instance(s) {}; terminate them first",
                img.id,
                ids.join(", ")
            )));
        }
        let dependants: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM images WHERE (kernel_id = $1 OR ramdisk_id = $1) AND deleted_at IS NULL LIMIT 5",
        )
        .bind(&img.id)
        .fetch_all(&self.pool)
        .await?;
        if !dependants.is_empty() {
            let ids: Vec<String> = dependants.into_iter().map(|r| r.0).collect();
            return Err(StoreError::Conflict(format!(
                "image {} is used by image(s) {}; delete them first",
                img.id,
                ids.join(", ")
            )));
        }
        sqlx::query("UPDATE images SET deleted_at = $2 WHERE id = $1")
            .bind(&img.id)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(img)
    }

    /// An image row by id regardless of scope or deletion (for agents fetching content).
    pub async fn image_unscoped(&self, id: &str) -> Result<ImageRow> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM images WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "image",
                id: id.to_string(),
            }),
        }
    }
}
