//! Live migrations: the record of each attempt and its steps, the destination's reservation in the
//! placement state, and the switch that moves an instance (and its local volumes) to the
//! destination in one transaction.

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::placement::Claim;
use crate::{now_str, parse_time, InstanceRow, Placement, Result, Scope, Store, StoreError};

/// Steps a migration is in; the first four are "active".
pub const ACTIVE_STEPS: [&str; 5] = ["prepare", "transfer", "switch", "cleanup", "rollback"];

#[derive(Debug, Clone)]
pub struct MigrationRow {
    pub id: String,
    pub instance_id: String,
    pub project_id: String,
    pub source_host: String,
    pub dest_host: String,
    pub mode: String,
    pub step: String,
    pub reason: String,
    pub downtime_ms: u64,
    pub auto_converge: bool,
    pub bandwidth: Option<u64>,
    pub job_id: Option<String>,
    pub evacuation_id: Option<String>,
    pub stats: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl MigrationRow {
    pub fn active(&self) -> bool {
        ACTIVE_STEPS.contains(&self.step.as_str())
    }
}

/// What the controller decided for a new migration.
#[derive(Debug, Clone)]
pub struct NewMigration {
    pub dest_host: String,
    /// `shared` or `storage`.
    pub mode: String,
    pub reason: String,
    pub downtime_ms: u64,
    pub auto_converge: bool,
    pub bandwidth: Option<u64>,
    pub evacuation_id: Option<String>,
}

const COLS: &str = "id, instance_id, project_id, source_host, dest_host, mode, step, reason, downtime_ms, auto_converge, bandwidth, job_id, evacuation_id, stats, error, created_at, updated_at";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<MigrationRow> {
    Ok(MigrationRow {
        id: r.try_get("id")?,
        instance_id: r.try_get("instance_id")?,
        project_id: r.try_get("project_id")?,
        source_host: r.try_get("source_host")?,
        dest_host: r.try_get("dest_host")?,
        mode: r.try_get("mode")?,
        step: r.try_get("step")?,
        reason: r.try_get("reason")?,
        downtime_ms: r.try_get::<i64, _>("downtime_ms")? as u64,
        auto_converge: r.try_get::<i64, _>("auto_converge")? != 0,
        bandwidth: r.try_get::<Option<i64>, _>("bandwidth")?.map(|b| b as u64),
        job_id: r.try_get("job_id")?,
        evacuation_id: r.try_get("evacuation_id")?,
        stats: r.try_get("stats")?,
        error: r.try_get("error")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_time(&r.try_get::<String, _>("updated_at")?)?,
    })
}

/// The destination's share while a migration is in flight: the instance's vCPUs, memory and
/// disk (no address: the instance keeps the one it has; no group member: it moves at the switch).
fn reservation(row: &InstanceRow, dest: &str) -> Claim {
    Claim {
        host_id: dest.to_string(),
        vcpus: row.vcpus,
        memory_mib: row.memory_mib,
        disk_gib: row.disk_gib,
        group_id: None,
        network_id: row.network_id.clone(),
        ip: None,
    }
}

impl Store {
    /// Start a migration of a running instance: `place` chooses the destination under the
    /// placement lock (so two migrations cannot both take the last room of a host), and the
    /// destination's share is reserved until the migration ends. Refused while another migration
    /// of the instance is in flight.
    pub async fn create_migration(
        &self,
        scope: &Scope,
        instance_id: &str,
        place: impl FnOnce(&Placement, &InstanceRow) -> std::result::Result<NewMigration, StoreError>,
    ) -> Result<(MigrationRow, InstanceRow)> {
        let mut placement = self.placement().await?;
        let row = self.instance(scope, instance_id).await?;
        if let Some(m) = self.active_migration(&row.id).await? {
            return Err(StoreError::Conflict(format!(
                "instance {} is already migrating ({} to {}, {})",
                row.id, m.source_host, m.dest_host, m.id
            )));
        }
        if row.state != kumo_types::InstanceState::Running || row.desired != "running" {
            return Err(StoreError::Conflict(format!(
                "instance {} is {}: only a running instance can be live-migrated",
                row.id,
                row.state.as_str()
            )));
        }
        let Some(source) = row.host_id.clone() else {
            return Err(StoreError::Conflict(format!(
                "instance {} has no host",
                row.id
            )));
        };
        let new = place(&placement, &row)?;
        if new.dest_host == source {
            return Err(StoreError::Invalid(format!(
                "instance {} already runs on that host",
                row.id
            )));
        }
        let id = kumo_types::new_id(kumo_types::IdKind::Operation);
        let now = now_str();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO operations (id, project_id, kind, target_id, state, progress, created_at, updated_at)
             VALUES ($1, $2, 'migrate', $3, 'running', 0, $4, $4)",
        )
        .bind(&id)
        .bind(&row.project_id)
        .bind(&row.id)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(
            "INSERT INTO migrations (id, instance_id, project_id, source_host, dest_host, mode, step, reason,
                 downtime_ms, auto_converge, bandwidth, evacuation_id, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'prepare', $7, $8, $9, $10, $11, $12, $12)",
        )
        .bind(&id)
        .bind(&row.id)
        .bind(&row.project_id)
        .bind(&source)
        .bind(&new.dest_host)
        .bind(&new.mode)
        .bind(&new.reason)
        .bind(new.downtime_ms as i64)
        .bind(i64::from(new.auto_converge))
        .bind(new.bandwidth.map(|b| b as i64))
        .bind(&new.evacuation_id)
        .bind(&now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            if let sqlx::Error::Database(d) = &e {
                if d.is_unique_violation() {
                    return Err(StoreError::Conflict(format!(
                        "instance {} is already migrating",
                        row.id
                    )));
                }
            }
            return Err(e.into());
        }
        tx.commit().await?;
        placement.apply(&reservation(&row, &new.dest_host), 1);
        Ok((self.migration_row(&id).await?, row))
    }

    pub async fn migration_row(&self, id: &str) -> Result<MigrationRow> {
        let r = sqlx::query(&format!("SELECT {COLS} FROM migrations WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "migration",
                id: id.to_string(),
            })?;
        from_row(&r)
    }

    /// A migration the caller's project may see.
    pub async fn migration(&self, scope: &Scope, id: &str) -> Result<MigrationRow> {
        let m = self.migration_row(id).await?;
        if scope.filter().is_some_and(|p| p != m.project_id) {
            return Err(StoreError::NotFound {
                kind: "migration",
                id: id.to_string(),
            });
        }
        Ok(m)
    }

    /// Migrations of the caller's projects, newest first; only an instance's when given.
    pub async fn migrations(
        &self,
        scope: &Scope,
        instance_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<MigrationRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM migrations
             WHERE (CAST($1 AS TEXT) IS NULL OR project_id = $1) AND (CAST($2 AS TEXT) IS NULL OR instance_id = $2)
             ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .bind(scope.filter())
        .bind(instance_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn active_migration(&self, instance_id: &str) -> Result<Option<MigrationRow>> {
        let r = sqlx::query(&format!(
            "SELECT {COLS} FROM migrations WHERE instance_id = $1 AND step NOT IN ('done', 'failed')"
        ))
        .bind(instance_id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(from_row).transpose()
    }

    /// Every migration in flight (recovery after a restart, hosts' views).
    pub async fn active_migrations(&self) -> Result<Vec<MigrationRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM migrations WHERE step NOT IN ('done', 'failed') ORDER BY created_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Instances on their way to `host` that have not switched yet: the destination renders
    /// their network ports before the switch.
    pub async fn instances_arriving(&self, host_id: &str) -> Result<Vec<InstanceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM instances WHERE state <> 'terminated' AND id IN
                 (SELECT instance_id FROM migrations WHERE dest_host = $1 AND step IN ('prepare', 'transfer', 'rollback'))",
            crate::instances::COLS
        ))
        .bind(host_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(crate::instances::from_row).collect()
    }

    /// Persist a step (and the source's job id) before acting on it.
    pub async fn set_migration_step(
        &self,
        id: &str,
        step: &str,
        job_id: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE migrations SET step = $2, job_id = COALESCE($3, job_id), updated_at = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(step)
        .bind(job_id)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Mark a migration (a cancel asks its driver to roll back).
    pub async fn set_migration_error(&self, id: &str, error: &str) -> Result<()> {
        sqlx::query("UPDATE migrations SET error = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(error)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The point of no return: the instance (and its volumes, when they were copied) belongs
    /// to the destination from now on; the step becomes `switch` in the same transaction.
    pub async fn switch_migration(&self, m: &MigrationRow, dest_pool: &str) -> Result<()> {
        let mut placement = self.placement().await?;
        let row = self.instance(&Scope::system(), &m.instance_id).await?;
        let mut tx = self.pool.begin().await?;
        let now = now_str();
        sqlx::query(
            "UPDATE instances SET host_id = $2, generation = generation + 1, updated_at = $3 WHERE id = $1",
        )
        .bind(&row.id)
        .bind(&m.dest_host)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        if m.mode == "storage" {
            sqlx::query(
                "UPDATE volumes SET host_id = $2, pool = $3 WHERE instance_id = $1 AND host_id IS NOT NULL",
            )
            .bind(&row.id)
            .bind(&m.dest_host)
            .bind(dest_pool)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE migrations SET step = 'switch', updated_at = $2 WHERE id = $1")
            .bind(&m.id)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // The reservation becomes the instance's share; the source's share goes.
        placement.apply(&reservation(&row, &m.dest_host), -1);
        if let Some(c) = Claim::of(&row) {
            placement.apply(&c, -1);
            placement.apply(
                &Claim {
                    host_id: m.dest_host.clone(),
                    ..c
                },
                1,
            );
        }
        Ok(())
    }

    /// End a migration: `done` (after the switch) or `failed` (rolled back: the reservation goes).
    pub async fn finish_migration(
        &self,
        m: &MigrationRow,
        error: Option<&str>,
        stats: Option<&str>,
    ) -> Result<()> {
        let mut placement = self.placement().await?;
        let current = self.migration_row(&m.id).await?;
        if !current.active() {
            return Ok(());
        }
        let switched = matches!(current.step.as_str(), "switch" | "cleanup");
        let step = if switched { "done" } else { "failed" };
        let now = now_str();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE migrations SET step = $2, error = $3, stats = COALESCE($4, stats), updated_at = $5 WHERE id = $1",
        )
        .bind(&m.id)
        .bind(step)
        .bind(error)
        .bind(stats)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        let state = if error.is_some() && !switched {
            "failed"
        } else {
            "succeeded"
        };
        sqlx::query(
            "UPDATE operations SET state = $2, error = $3, progress = CASE WHEN $2 = 'succeeded' THEN 1.0 ELSE progress END, updated_at = $4 WHERE id = $1",
        )
        .bind(&m.id)
        .bind(state)
        .bind(error)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if !switched {
            if let Ok(row) = self.instance(&Scope::system(), &m.instance_id).await {
                placement.apply(&reservation(&row, &m.dest_host), -1);
            }
        }
        Ok(())
    }

    /// Failed migrations whose destination still has to clean up.
    pub async fn migrations_pending_cleanup(&self) -> Result<Vec<MigrationRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM migrations WHERE dest_pending = 1 ORDER BY created_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Whether the destination of a failed migration still has to clean up.
    pub async fn set_dest_pending(&self, id: &str, pending: bool) -> Result<()> {
        sqlx::query("UPDATE migrations SET dest_pending = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(i64::from(pending))
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Remember where an evacuated instance lived (`None` forgets it).
    pub async fn set_home_host(&self, instance_id: &str, host: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE instances SET home_host_id = $2 WHERE id = $1")
            .bind(instance_id)
            .bind(host)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live instances evacuated from `host` (to bring them home).
    pub async fn instances_from_home(&self, host: &str) -> Result<Vec<InstanceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM instances WHERE home_host_id = $1 AND state <> 'terminated' ORDER BY id",
            crate::instances::COLS
        ))
        .bind(host)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(crate::instances::from_row).collect()
    }
}

/// The destination shares of migrations in flight, for the placement state's load.
pub(crate) async fn reservations(store: &Store) -> Result<Vec<(String, u32, u64, u64)>> {
    let rows = sqlx::query(
        "SELECT m.dest_host, i.vcpus, i.memory_mib, i.disk_gib FROM migrations m JOIN instances i ON i.id = m.instance_id
         WHERE m.step IN ('prepare', 'transfer', 'rollback') AND i.state <> 'terminated'",
    )
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("dest_host")?,
                r.try_get::<i64, _>("vcpus")? as u32,
                r.try_get::<i64, _>("memory_mib")? as u64,
                r.try_get::<i64, _>("disk_gib")? as u64,
            ))
        })
        .collect()
}
