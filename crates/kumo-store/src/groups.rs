//! Placement groups: `spread` keeps a group's members apart, on different hosts (at most
//! `max_per_host` on each, as Nova's `max_server_per_host`) and optionally on different
//! storage pools, so the primary and the secondary of a service never fail together.

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use crate::auth::unique_conflict;
use crate::{now_str, parse_time, Result, Scope, Store, StoreError};

#[derive(Debug, Clone)]
pub struct PlacementGroupRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub strategy: String,
    pub max_per_host: u32,
    pub spread_storage: bool,
    pub created_at: DateTime<Utc>,
    /// Live instances in the group.
    pub members: u32,
}

const GROUP_COLUMNS: &str = "g.id, g.project_id, g.name, g.strategy, g.max_per_host, g.spread_storage, g.created_at,
    (SELECT COUNT(*) FROM instances i WHERE i.placement_group_id = g.id AND i.state <> 'terminated') AS members";

fn group_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<PlacementGroupRow> {
    Ok(PlacementGroupRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        strategy: r.try_get("strategy")?,
        max_per_host: u32::try_from(r.try_get::<i64, _>("max_per_host")?)
            .map_err(|_| StoreError::Corrupt("max_per_host"))?,
        spread_storage: r.try_get::<i64, _>("spread_storage")? != 0,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
        members: r.try_get::<i64, _>("members")? as u32,
    })
}

impl Store {
    pub async fn create_placement_group(
        &self,
        scope: &Scope,
        name: &str,
        strategy: &str,
        max_per_host: u32,
        spread_storage: bool,
    ) -> Result<PlacementGroupRow> {
        kumo_types::id::validate_name(name).map_err(StoreError::Invalid)?;
        if strategy != "spread" {
            return Err(StoreError::Invalid(format!(
                "placement group strategy must be spread, not {strategy:?}"
            )));
        }
        if !(1..=100).contains(&max_per_host) {
            return Err(StoreError::Invalid(format!(
                "max_per_host must be between 1 and 100, not {max_per_host}"
            )));
        }
        let id = new_id(IdKind::PlacementGroup);
        sqlx::query(
            "INSERT INTO placement_groups (id, project_id, name, strategy, max_per_host, spread_storage, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(&scope.project_id)
        .bind(name)
        .bind(strategy)
        .bind(i64::from(max_per_host))
        .bind(i64::from(spread_storage))
        .bind(now_str())
        .execute(&self.pool)
        .await
        .map_err(|e| unique_conflict(e, format!("a placement group named {name} already exists")))?;
        self.placement_group(scope, &id).await
    }

    /// A group of the scope's project by id or name.
    pub async fn placement_group(
        &self,
        scope: &Scope,
        id_or_name: &str,
    ) -> Result<PlacementGroupRow> {
        let row = sqlx::query(&format!(
            "SELECT {GROUP_COLUMNS} FROM placement_groups g
             WHERE (g.id = $1 OR g.name = $1) AND (CAST($2 AS TEXT) IS NULL OR g.project_id = $2)
             ORDER BY g.project_id = $3 DESC LIMIT 1"
        ))
        .bind(id_or_name)
        .bind(scope.filter())
        .bind(&scope.project_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => group_from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "placement group",
                id: id_or_name.to_string(),
            }),
        }
    }

    pub async fn placement_groups(&self, scope: &Scope) -> Result<Vec<PlacementGroupRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {GROUP_COLUMNS} FROM placement_groups g
             WHERE CAST($1 AS TEXT) IS NULL OR g.project_id = $1 ORDER BY g.name"
        ))
        .bind(scope.filter())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(group_from_row).collect()
    }

    /// Delete a group that has no live members.
    pub async fn delete_placement_group(&self, scope: &Scope, id_or_name: &str) -> Result<()> {
        let g = self.placement_group(scope, id_or_name).await?;
        // Held so that no create can join the group between the check and the delete.
        let _placement = self.placement().await?;
        let done = sqlx::query(
            "DELETE FROM placement_groups WHERE id = $1 AND NOT EXISTS
               (SELECT 1 FROM instances WHERE placement_group_id = $1 AND state <> 'terminated')",
        )
        .bind(&g.id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "placement group {} still has live instances; terminate them first",
                g.name
            )));
        }
        Ok(())
    }
}
