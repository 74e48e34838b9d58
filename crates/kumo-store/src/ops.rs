//! Operations (long-running jobs with progress), the event journal, and idempotency records.

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use crate::{clamp_limit, now_str, parse_time, Result, Scope, Store, StoreError};

#[derive(Debug, Clone)]
pub struct OperationRow {
    pub id: String,
    pub project_id: String,
    pub kind: String,
    pub target_id: String,
    pub state: String,
    pub progress: f64,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: i64,
    pub time: DateTime<Utc>,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
    pub request_id: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
    pub request_id: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IdempotentResponse {
    pub request_hash: String,
    pub status: u16,
    pub body: String,
}

fn op_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<OperationRow> {
    Ok(OperationRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        kind: r.try_get("kind")?,
        target_id: r.try_get("target_id")?,
        state: r.try_get("state")?,
        progress: r.try_get("progress")?,
        error: r.try_get("error")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_time(&r.try_get::<String, _>("updated_at")?)?,
    })
}

const OP_COLS: &str =
    "id, project_id, kind, target_id, state, progress, error, created_at, updated_at";

impl Store {
    pub async fn create_operation(
        &self,
        project_id: &str,
        kind: &str,
        target_id: &str,
    ) -> Result<OperationRow> {
        let id = new_id(IdKind::Operation);
        let now = now_str();
        sqlx::query(
            "INSERT INTO operations (id, project_id, kind, target_id, state, progress, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'running', 0, $5, $5)",
        )
        .bind(&id)
        .bind(project_id)
        .bind(kind)
        .bind(target_id)
        .bind(&now)
        .execute(&self.pool)
        .await?;
        self.operation(&Scope::system(), &id).await
    }

    pub async fn set_operation_progress(&self, id: &str, progress: f64) -> Result<()> {
        sqlx::query("UPDATE operations SET progress = $2, updated_at = $3 WHERE id = $1 AND state = 'running'")
            .bind(id)
            .bind(progress.clamp(0.0, 1.0))
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn finish_operation(&self, id: &str, error: Option<&str>) -> Result<()> {
        let state = if error.is_some() {
            "failed"
        } else {
            "succeeded"
        };
        sqlx::query(
            "UPDATE operations SET state = $2, error = $3, progress = CASE WHEN $2 = 'succeeded' THEN 1.0 ELSE progress END, updated_at = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(error)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Operations still marked running, e.g. after a controller restart.
    pub async fn running_operations(&self) -> Result<Vec<OperationRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {OP_COLS} FROM operations WHERE state = 'running'"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(op_from_row).collect()
    }

    pub async fn operation(&self, scope: &Scope, id: &str) -> Result<OperationRow> {
        let r = sqlx::query(&format!(
            "SELECT {OP_COLS} FROM operations WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR project_id = $2)"
        ))
        .bind(id)
        .bind(scope.filter())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound { kind: "operation", id: id.to_string() })?;
        op_from_row(&r)
    }

    pub async fn operations(
        &self,
        scope: &Scope,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<(Vec<OperationRow>, Option<String>)> {
        let limit = clamp_limit(limit);
        let rows = sqlx::query(&format!(
            "SELECT {OP_COLS} FROM operations WHERE (CAST($1 AS TEXT) IS NULL OR project_id = $1) AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(scope.filter())
        .bind(cursor.unwrap_or(""))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(op_from_row).collect::<Result<Vec<_>>>()?;
        Ok(crate::page(items, limit, |i| i.id.clone()))
    }

    pub async fn record_event(&self, e: &NewEvent) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (time, project_id, user_id, action, target, result, request_id, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(now_str())
        .bind(&e.project_id)
        .bind(&e.user_id)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.result)
        .bind(&e.request_id)
        .bind(&e.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Newest first; `cursor` is the id to continue below.
    pub async fn events(
        &self,
        scope: &Scope,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<(Vec<EventRow>, Option<String>)> {
        let limit = clamp_limit(limit);
        let before: i64 = match cursor {
            Some(c) => c
                .parse()
                .map_err(|_| StoreError::Invalid(format!("bad cursor {c:?}")))?,
            None => i64::MAX,
        };
        let rows = sqlx::query(
            "SELECT id, time, project_id, user_id, action, target, result, request_id, detail FROM events
             WHERE (CAST($1 AS TEXT) IS NULL OR project_id = $1) AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(scope.filter())
        .bind(before)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for r in &rows {
            items.push(EventRow {
                id: r.try_get("id")?,
                time: parse_time(&r.try_get::<String, _>("time")?)?,
                project_id: r.try_get("project_id")?,
                user_id: r.try_get("user_id")?,
                action: r.try_get("action")?,
                target: r.try_get("target")?,
                result: r.try_get("result")?,
                request_id: r.try_get("request_id")?,
                detail: r.try_get("detail")?,
            });
        }
        Ok(crate::page(items, limit, |i| i.id.to_string()))
    }

    pub async fn idempotent_response(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<Option<IdempotentResponse>> {
        let r = sqlx::query(
            "SELECT request_hash, status, body FROM idempotency WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| {
            Ok(IdempotentResponse {
                request_hash: r.try_get("request_hash")?,
                status: r.try_get::<i64, _>("status")? as u16,
                body: r.try_get("body")?,
            })
        })
        .transpose()
    }

    pub async fn save_idempotent_response(
        &self,
        user_id: &str,
        key: &str,
        resp: &IdempotentResponse,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO idempotency (user_id, key, request_hash, status, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (user_id, key) DO NOTHING",
        )
        .bind(user_id)
        .bind(key)
        .bind(&resp.request_hash)
        .bind(i64::from(resp.status))
        .bind(&resp.body)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// The outcome of claiming an idempotency key before running a request.
#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyClaim {
    /// This request owns the key: run it, then `finish_idempotency` (or release on failure).
    Claimed,
    /// The key already has a finished response.
    Done(IdempotentResponse),
    /// Another request with this key is running now.
    InProgress,
}

/// A claim not finished within this long is taken to be abandoned (its process died).
const ABANDONED_AFTER_SECS: i64 = 300;

impl Store {
    /// Claim `key` for this user atomically: exactly one of several concurrent requests with
    /// the same key gets `Claimed`.
    pub async fn claim_idempotency(
        &self,
        user_id: &str,
        key: &str,
        request_hash: &str,
    ) -> Result<IdempotencyClaim> {
        let now = chrono::Utc::now();
        let inserted = sqlx::query(
            "INSERT INTO idempotency (user_id, key, request_hash, status, body, created_at) VALUES ($1, $2, $3, 0, '', $4)
             ON CONFLICT (user_id, key) DO NOTHING",
        )
        .bind(user_id)
        .bind(key)
        .bind(request_hash)
        .bind(crate::fmt_time(now))
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(IdempotencyClaim::Claimed);
        }
        // Take over a claim whose owner died without finishing.
        let stale = crate::fmt_time(now - chrono::Duration::seconds(ABANDONED_AFTER_SECS));
        let taken = sqlx::query(
            "UPDATE idempotency SET request_hash = $3, created_at = $4 WHERE user_id = $1 AND key = $2 AND status = 0 AND created_at < $5",
        )
        .bind(user_id)
        .bind(key)
        .bind(request_hash)
        .bind(crate::fmt_time(now))
        .bind(stale)
        .execute(&self.pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(IdempotencyClaim::Claimed);
        }
        match self.idempotent_response(user_id, key).await? {
            Some(r) if r.status == 0 => Ok(IdempotencyClaim::InProgress),
            Some(r) => Ok(IdempotencyClaim::Done(r)),
            None => Ok(IdempotencyClaim::InProgress),
        }
    }

    /// Record the response of a claimed request.
    pub async fn finish_idempotency(
        &self,
        user_id: &str,
        key: &str,
        resp: &IdempotentResponse,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE idempotency SET status = $3, body = $4 WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(key)
        .bind(i64::from(resp.status))
        .bind(&resp.body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Give a claim back (the request failed on the server side): a retry may run again.
    pub async fn release_idempotency(&self, user_id: &str, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM idempotency WHERE user_id = $1 AND key = $2 AND status = 0")
            .bind(user_id)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
