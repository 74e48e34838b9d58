//! Snapshots: a frozen layer of an instance's root disk or of a volume, in the pool that holds
//! it. Instances and volumes made from a snapshot are copy-on-write on that layer, so a
//! snapshot cannot be deleted while one of them lives.

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use super::volumes::scope_filter;
use super::Domain;
use crate::{now_str, parse_time, Result, Scope, Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub id: String,
    pub project_id: String,
    pub description: Option<String>,
    /// `instance` or `volume`.
    pub source_kind: String,
    pub source_id: String,
    pub size_bytes: u64,
    pub pool: String,
    pub host_id: Option<String>,
    /// `pending`, `completed` or `error`.
    pub state: String,
    pub io_pause_ms: Option<f64>,
    pub image_id: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl SnapshotRow {
    pub fn domain(&self) -> Domain {
        Domain {
            pool: self.pool.clone(),
            host_id: self.host_id.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub description: Option<String>,
    pub source_kind: &'static str,
    pub source_id: String,
    pub size_bytes: u64,
    pub domain: Domain,
    pub image_id: Option<String>,
}

const COLS: &str = "id, project_id, description, source_kind, source_id, size_bytes, pool, host_id, state, io_pause_ms, image_id, last_error, created_at";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        description: r.try_get("description")?,
        source_kind: r.try_get("source_kind")?,
        source_id: r.try_get("source_id")?,
        size_bytes: u64::try_from(r.try_get::<i64, _>("size_bytes")?)
            .map_err(|_| StoreError::Corrupt("size_bytes"))?,
        pool: r.try_get("pool")?,
        host_id: r.try_get("host_id")?,
        state: r.try_get("state")?,
        io_pause_ms: r.try_get("io_pause_ms")?,
        image_id: r.try_get("image_id")?,
        last_error: r.try_get("last_error")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

impl Store {
    pub async fn create_snapshot(&self, scope: &Scope, new: &NewSnapshot) -> Result<SnapshotRow> {
        if let Some(d) = &new.description {
            if d.len() > 255 {
                return Err(StoreError::Invalid(
                    "a description has at most 255 characters".into(),
                ));
            }
        }
        let row = sqlx::query(&format!(
            "INSERT INTO snapshots (id, project_id, description, source_kind, source_id, size_bytes, pool, host_id, state, image_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10) RETURNING {COLS}"
        ))
        .bind(new_id(IdKind::Snapshot))
        .bind(&scope.project_id)
        .bind(&new.description)
        .bind(new.source_kind)
        .bind(&new.source_id)
        .bind(new.size_bytes as i64)
        .bind(&new.domain.pool)
        .bind(&new.domain.host_id)
        .bind(&new.image_id)
        .bind(now_str())
        .fetch_one(&self.pool)
        .await?;
        from_row(&row)
    }

    /// Record the agent's answer: the pause and the disk's real size, or the error.
    pub async fn finish_snapshot(
        &self,
        id: &str,
        result: std::result::Result<Option<f64>, &str>,
        size: Option<u64>,
    ) -> Result<()> {
        let (state, pause, error) = match result {
            Ok(p) => ("completed", p, None),
            Err(e) => ("error", None, Some(e)),
        };
        sqlx::query(
            "UPDATE snapshots SET state = $2, io_pause_ms = $3, last_error = $4,
                 size_bytes = COALESCE($5, size_bytes) WHERE id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(pause)
        .bind(error)
        .bind(size.map(|s| s as i64))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn snapshot(&self, scope: &Scope, id: &str) -> Result<SnapshotRow> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM snapshots WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR project_id = $2)"
        ))
        .bind(id)
        .bind(scope_filter(scope))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "snapshot",
                id: id.to_string(),
            }),
        }
    }

    pub async fn snapshots(&self, scope: &Scope) -> Result<Vec<SnapshotRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM snapshots WHERE deleted_at IS NULL AND ($1 IS NULL OR project_id = $1)
             ORDER BY created_at, id"
        ))
        .bind(scope_filter(scope))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// What still builds on a snapshot: live instances booted from it and volumes made from it.
    pub async fn snapshot_dependents(&self, id: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM instances WHERE root_snapshot_id = $1 AND state <> 'terminated'
             UNION ALL SELECT id FROM volumes WHERE snapshot_id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(i,)| i).collect())
    }

    /// Start deleting a snapshot: refused while others are made from it; from now on nothing
    /// new can be made from it (they need `completed`).
    pub async fn begin_delete_snapshot(&self, snap: &SnapshotRow) -> Result<()> {
        let _placement = self.placement().await?;
        let deps = self.snapshot_dependents(&snap.id).await?;
        if !deps.is_empty() {
            return Err(StoreError::Conflict(format!(
                "snapshot {} is the base of {}: delete those first",
                snap.id,
                deps.join(", ")
            )));
        }
        sqlx::query("UPDATE snapshots SET state = 'deleting' WHERE id = $1 AND deleted_at IS NULL")
            .bind(&snap.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Put a snapshot back (its deletion failed on the host).
    pub async fn set_snapshot_state(&self, id: &str, state: &str) -> Result<()> {
        sqlx::query("UPDATE snapshots SET state = $2 WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .bind(state)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The host let go of the snapshot: mark it deleted.
    pub async fn delete_snapshot_row(&self, snap: &SnapshotRow) -> Result<()> {
        sqlx::query("UPDATE snapshots SET state = 'deleted', deleted_at = $2 WHERE id = $1")
            .bind(&snap.id)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
