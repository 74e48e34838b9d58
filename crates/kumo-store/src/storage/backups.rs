//! Backups and backup schedules. A backup row is `running` until the agent's job ends; it is
//! `completed` only once the repository verified the copy and wrote its manifest, so a failed
//! or interrupted one never becomes part of a chain.

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use super::volumes::scope_filter;
use crate::{fmt_time, now_str, parse_time, parse_time_opt, Result, Scope, Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct BackupRow {
    pub id: String,
    pub project_id: String,
    /// `instance` or `volume`.
    pub source_kind: String,
    pub source_id: String,
    /// `full` or `incremental` (decided by the agent), empty while running.
    pub kind: String,
    pub parent_id: Option<String>,
    /// `running`, `completed`, `failed`.
    pub state: String,
    pub bytes_written: Option<u64>,
    pub virtual_size: Option<u64>,
    pub repository: String,
    pub operation_id: Option<String>,
    pub schedule_id: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRow {
    pub id: String,
    pub project_id: String,
    pub source_kind: String,
    pub source_id: String,
    pub cron: String,
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub next_run: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const COLS: &str = "id, project_id, source_kind, source_id, kind, parent_id, state, bytes_written, virtual_size, repository, operation_id, schedule_id, last_error, created_at, finished_at";
const SCOLS: &str = "id, project_id, source_kind, source_id, cron, keep_last, keep_hourly, keep_daily, keep_weekly, next_run, created_at";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<BackupRow> {
    let opt_u64 = |c: &str| -> Result<Option<u64>> {
        Ok(r.try_get::<Option<i64>, _>(c)?.map(|v| v.max(0) as u64))
    };
    Ok(BackupRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        source_kind: r.try_get("source_kind")?,
        source_id: r.try_get("source_id")?,
        kind: r.try_get("kind")?,
        parent_id: r.try_get("parent_id")?,
        state: r.try_get("state")?,
        bytes_written: opt_u64("bytes_written")?,
        virtual_size: opt_u64("virtual_size")?,
        repository: r.try_get("repository")?,
        operation_id: r.try_get("operation_id")?,
        schedule_id: r.try_get("schedule_id")?,
        last_error: r.try_get("last_error")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
        finished_at: parse_time_opt(r.try_get::<Option<String>, _>("finished_at")?.as_deref())?,
    })
}

fn schedule_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ScheduleRow> {
    let n = |c: &str| -> Result<u32> {
        u32::try_from(r.try_get::<i64, _>(c)?).map_err(|_| StoreError::Corrupt("keep"))
    };
    Ok(ScheduleRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        source_kind: r.try_get("source_kind")?,
        source_id: r.try_get("source_id")?,
        cron: r.try_get("cron")?,
        keep_last: n("keep_last")?,
        keep_hourly: n("keep_hourly")?,
        keep_daily: n("keep_daily")?,
        keep_weekly: n("keep_weekly")?,
        next_run: parse_time_opt(r.try_get::<Option<String>, _>("next_run")?.as_deref())?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

/// What a new schedule asks for (checked by the controller).
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub source_kind: &'static str,
    pub source_id: String,
    pub cron: String,
    pub keep: [u32; 4],
    pub next_run: DateTime<Utc>,
}

impl Store {
    pub async fn create_backup(
        &self,
        project_id: &str,
        source_kind: &str,
        source_id: &str,
        repository: &str,
        schedule_id: Option<&str>,
    ) -> Result<BackupRow> {
        let row = sqlx::query(&format!(
            "INSERT INTO backups (id, project_id, source_kind, source_id, kind, state, repository, schedule_id, created_at)
             VALUES ($1, $2, $3, $4, '', 'running', $5, $6, $7) RETURNING {COLS}"
        ))
        .bind(new_id(IdKind::Backup))
        .bind(project_id)
        .bind(source_kind)
        .bind(source_id)
        .bind(repository)
        .bind(schedule_id)
        .bind(now_str())
        .fetch_one(&self.pool)
        .await?;
        from_row(&row)
    }

    pub async fn set_backup_operation(&self, id: &str, op: &str) -> Result<()> {
        sqlx::query("UPDATE backups SET operation_id = $2 WHERE id = $1")
            .bind(id)
            .bind(op)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Record how a backup ended: (kind, parent, bytes written, virtual size), or the error.
    pub async fn finish_backup(
        &self,
        id: &str,
        result: std::result::Result<(&str, Option<&str>, u64, u64), &str>,
    ) -> Result<()> {
        let now = now_str();
        match result {
            Ok((kind, parent, bytes, size)) => {
                sqlx::query(
                    "UPDATE backups SET state = 'completed', kind = $2, parent_id = $3, bytes_written = $4,
                         virtual_size = $5, finished_at = $6 WHERE id = $1",
                )
                .bind(id)
                .bind(kind)
                .bind(parent)
                .bind(bytes as i64)
                .bind(size as i64)
                .bind(&now)
                .execute(&self.pool)
                .await?;
            }
            Err(e) => {
                sqlx::query(
                    "UPDATE backups SET state = 'failed', last_error = $2, finished_at = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(e)
                .bind(&now)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    pub async fn backup(&self, scope: &Scope, id: &str) -> Result<BackupRow> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM backups WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR project_id = $2)"
        ))
        .bind(id)
        .bind(scope_filter(scope))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "backup",
                id: id.to_string(),
            }),
        }
    }

    /// The scope's backups, oldest first; of one instance or volume if `source` is given.
    pub async fn backups(&self, scope: &Scope, source: Option<&str>) -> Result<Vec<BackupRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM backups WHERE deleted_at IS NULL AND ($1 IS NULL OR project_id = $1)
                 AND ($2 IS NULL OR source_id = $2) ORDER BY created_at, id"
        ))
        .bind(scope_filter(scope))
        .bind(source)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn backup_deleted(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE backups SET deleted_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A deleted middle backup is merged into its child: the child's parent moves up.
    pub async fn reparent_backups(&self, old_parent: &str, new_parent: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE backups SET parent_id = $2, kind = CASE WHEN $2 IS NULL THEN 'full' ELSE kind END WHERE parent_id = $1 AND deleted_at IS NULL")
            .bind(old_parent)
            .bind(new_parent)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn create_schedule(&self, scope: &Scope, new: &NewSchedule) -> Result<ScheduleRow> {
        let row = sqlx::query(&format!(
            "INSERT INTO backup_schedules (id, project_id, source_kind, source_id, cron, keep_last, keep_hourly, keep_daily, keep_weekly, next_run, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {SCOLS}"
        ))
        .bind(new_id(IdKind::BackupSchedule))
        .bind(&scope.project_id)
        .bind(new.source_kind)
        .bind(&new.source_id)
        .bind(&new.cron)
        .bind(i64::from(new.keep[0]))
        .bind(i64::from(new.keep[1]))
        .bind(i64::from(new.keep[2]))
        .bind(i64::from(new.keep[3]))
        .bind(fmt_time(new.next_run))
        .bind(now_str())
        .fetch_one(&self.pool)
        .await?;
        schedule_from_row(&row)
    }

    pub async fn schedules(&self, scope: &Scope) -> Result<Vec<ScheduleRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {SCOLS} FROM backup_schedules WHERE deleted_at IS NULL AND ($1 IS NULL OR project_id = $1) ORDER BY created_at, id"
        ))
        .bind(scope_filter(scope))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(schedule_from_row).collect()
    }

    pub async fn schedule(&self, scope: &Scope, id: &str) -> Result<ScheduleRow> {
        let row = sqlx::query(&format!(
            "SELECT {SCOLS} FROM backup_schedules WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR project_id = $2)"
        ))
        .bind(id)
        .bind(scope_filter(scope))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => schedule_from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "backup schedule",
                id: id.to_string(),
            }),
        }
    }

    /// Schedules whose next run is due, for the controller's scheduler loop.
    pub async fn due_schedules(&self, now: DateTime<Utc>) -> Result<Vec<ScheduleRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {SCOLS} FROM backup_schedules WHERE deleted_at IS NULL AND next_run IS NOT NULL AND next_run <= $1"
        ))
        .bind(fmt_time(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(schedule_from_row).collect()
    }

    /// Move a schedule on; false if another controller pass already did (runs once per slot).
    pub async fn advance_schedule(
        &self,
        id: &str,
        from: DateTime<Utc>,
        next: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE backup_schedules SET next_run = $3 WHERE id = $1 AND next_run = $2",
        )
        .bind(id)
        .bind(fmt_time(from))
        .bind(next.map(fmt_time))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn delete_schedule(&self, scope: &Scope, id: &str) -> Result<()> {
        let s = self.schedule(scope, id).await?;
        sqlx::query("UPDATE backup_schedules SET deleted_at = $2 WHERE id = $1")
            .bind(&s.id)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Schedules of a source that is going away.
    pub async fn delete_schedules_of(&self, source_id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE backup_schedules SET deleted_at = $2 WHERE source_id = $1 AND deleted_at IS NULL",
        )
        .bind(source_id)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
