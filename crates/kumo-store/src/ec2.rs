//! What the EC2-compatible API needs beyond the native one: tags, user data, reservations,
//! and listings that keep terminated instances visible for a while (as EC2 does).

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::instances::{from_row, COLS};
use crate::{fmt_time, now_str, InstanceRow, Result, Scope, Store, StoreError};

/// One tag of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRow {
    pub project_id: String,
    pub resource_id: String,
    pub resource_type: String,
    pub key: String,
    pub value: String,
}

impl Store {
    /// The scope's instances, ordered by id, except those terminated before `cutoff`.
    pub async fn instances_visible(
        &self,
        scope: &Scope,
        cutoff: DateTime<Utc>,
    ) -> Result<Vec<InstanceRow>> {
        self.instances_visible_after(scope, cutoff, None, None)
            .await
    }

    /// Visible instances with ids after `after`, in id order, at most `limit`: one page of a
    /// listing without filters, read from the index instead of the whole table.
    pub async fn instances_visible_after(
        &self,
        scope: &Scope,
        cutoff: DateTime<Utc>,
        after: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Vec<InstanceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM instances WHERE (CAST($1 AS TEXT) IS NULL OR project_id = $1)
             AND (state <> 'terminated' OR terminated_at IS NULL OR terminated_at >= $2)
             AND id > $3 ORDER BY id LIMIT $4"
        ))
        .bind(scope.filter())
        .bind(fmt_time(cutoff))
        .bind(after.unwrap_or(""))
        .bind(limit.unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// An instance strictly by id (never by name), within the scope.
    pub async fn instance_by_id(&self, scope: &Scope, id: &str) -> Result<InstanceRow> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM instances WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR project_id = $2)"
        ))
        .bind(id)
        .bind(scope.filter())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "instance",
                id: id.to_string(),
            }),
        }
    }

    /// The instances of one reservation, by launch index.
    pub async fn reservation_instances(
        &self,
        scope: &Scope,
        reservation_id: &str,
    ) -> Result<Vec<InstanceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM instances WHERE reservation_id = $1
             AND (CAST($2 AS TEXT) IS NULL OR project_id = $2) ORDER BY launch_index, id"
        ))
        .bind(reservation_id)
        .bind(scope.filter())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Live (not terminated) instances of the scope's project.
    pub async fn count_live_instances(&self, scope: &Scope) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM instances WHERE project_id = $1 AND state <> 'terminated'",
        )
        .bind(&scope.project_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Replace an instance's user data; only while it is stopped. `Ok(false)` when the
    /// instance exists but is not stopped.
    pub async fn set_user_data(
        &self,
        scope: &Scope,
        id: &str,
        user_data: Option<&str>,
    ) -> Result<bool> {
        let cur = self.instance(scope, id).await?;
        let done = sqlx::query(
            "UPDATE instances SET user_data = $2, updated_at = $3 WHERE id = $1 AND state = 'stopped'",
        )
        .bind(&cur.id)
        .bind(user_data)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Add or overwrite tags of resources of `project_id` (the resources' own project).
    pub async fn put_tags(
        &self,
        project_id: &str,
        resources: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<()> {
        let now = now_str();
        let mut tx = self.pool.begin().await?;
        for (rid, rtype) in resources {
            for (k, v) in tags {
                sqlx::query(
                    "INSERT INTO tags (project_id, resource_id, resource_type, key, value, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (resource_id, key) DO UPDATE SET value = excluded.value",
                )
                .bind(project_id)
                .bind(rid)
                .bind(rtype)
                .bind(k)
                .bind(v)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Delete tags of the scope's resources. A tag with a value is deleted only when its
    /// value matches; no tags at all deletes every tag of the resources.
    pub async fn delete_tags(
        &self,
        scope: &Scope,
        resource_ids: &[String],
        tags: &[(String, Option<String>)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for rid in resource_ids {
            if tags.is_empty() {
                sqlx::query(
                    "DELETE FROM tags WHERE resource_id = $1 AND (CAST($2 AS TEXT) IS NULL OR project_id = $2)",
                )
                .bind(rid)
                .bind(scope.filter())
                .execute(&mut *tx)
                .await?;
            }
            for (k, v) in tags {
                sqlx::query(
                    "DELETE FROM tags WHERE resource_id = $1 AND key = $2
                     AND (CAST($3 AS TEXT) IS NULL OR value = $3)
                     AND (CAST($4 AS TEXT) IS NULL OR project_id = $4)",
                )
                .bind(rid)
                .bind(k)
                .bind(v.as_deref())
                .bind(scope.filter())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The scope's tags, ordered by resource and key, except those of resources that are
    /// gone (instances terminated before `cutoff`, deleted images).
    pub async fn tags(&self, scope: &Scope, cutoff: DateTime<Utc>) -> Result<Vec<TagRow>> {
        let rows = sqlx::query(
            "SELECT t.project_id, t.resource_id, t.resource_type, t.key, t.value FROM tags t
             WHERE (CAST($1 AS TEXT) IS NULL OR t.project_id = $1)
             AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = t.resource_id
                             AND i.state = 'terminated' AND i.terminated_at < $2)
             AND NOT EXISTS (SELECT 1 FROM images m WHERE m.id = t.resource_id AND m.deleted_at IS NOT NULL)
             ORDER BY t.resource_id, t.key",
        )
        .bind(scope.filter())
        .bind(fmt_time(cutoff))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TagRow {
                    project_id: r.try_get("project_id")?,
                    resource_id: r.try_get("resource_id")?,
                    resource_type: r.try_get("resource_type")?,
                    key: r.try_get("key")?,
                    value: r.try_get("value")?,
                })
            })
            .collect()
    }
}
