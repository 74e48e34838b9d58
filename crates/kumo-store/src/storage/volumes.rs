//! Volumes: EBS-like disks of a project. A volume lives in one pool (and, in a local pool, on
//! one host), is attached to at most one instance, and keeps its row after deletion so its id
//! is never reused. Attaching and detaching bump the instance's generation: the agent hot-plugs
//! what the instance's desired spec lists, and its report moves `attaching`/`detaching` on.

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use super::Domain;
use crate::auth::unique_conflict;
use crate::{now_str, parse_time, Result, Scope, Store, StoreError};

/// Volumes are at most 64 TiB, like EBS.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRow {
    pub id: String,
    pub project_id: String,
    pub name: Option<String>,
    pub size_bytes: u64,
    pub pool: String,
    pub host_id: Option<String>,
    pub state: String,
    pub instance_id: Option<String>,
    pub attach_state: Option<String>,
    pub snapshot_id: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl VolumeRow {
    pub fn domain(&self) -> Domain {
        Domain {
            pool: self.pool.clone(),
            host_id: self.host_id.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: Option<String>,
    pub size_bytes: u64,
    pub domain: Domain,
    pub snapshot_id: Option<String>,
}

const COLS: &str = "id, project_id, name, size_bytes, pool, host_id, state, instance_id, attach_state, snapshot_id, last_error, created_at";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        size_bytes: u64::try_from(r.try_get::<i64, _>("size_bytes")?)
            .map_err(|_| StoreError::Corrupt("size_bytes"))?,
        pool: r.try_get("pool")?,
        host_id: r.try_get("host_id")?,
        state: r.try_get("state")?,
        instance_id: r.try_get("instance_id")?,
        attach_state: r.try_get("attach_state")?,
        snapshot_id: r.try_get("snapshot_id")?,
        last_error: r.try_get("last_error")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

/// A disk size in bytes: positive, whole 512-byte sectors, at most 64 TiB.
pub fn check_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(StoreError::Invalid(
            "a size of 0 bytes: give a positive size".into(),
        ));
    }
    if !size.is_multiple_of(512) {
        return Err(StoreError::Invalid(format!(
            "size {size}: disks are made of 512-byte sectors; give a multiple of 512"
        )));
    }
    if size > MAX_VOLUME_BYTES {
        return Err(StoreError::Invalid(format!(
            "size {size}: at most {MAX_VOLUME_BYTES} bytes (64 TiB)"
        )));
    }
    Ok(())
}

impl Store {
    /// Record a new volume (`creating`) if its pool has room; the agent then makes it.
    pub async fn create_volume(&self, scope: &Scope, new: &NewVolume) -> Result<VolumeRow> {
        check_size(new.size_bytes)?;
        if let Some(n) = &new.name {
            kumo_types::id::validate_name(n).map_err(StoreError::Invalid)?;
        }
        let _placement = self.placement().await?;
        self.check_room(&new.domain, new.size_bytes).await?;
        let now = now_str();
        let row = sqlx::query(&format!(
            "INSERT INTO volumes (id, project_id, name, size_bytes, pool, host_id, state, snapshot_id, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'creating', $7, $8, $8) RETURNING {COLS}"
        ))
        .bind(new_id(IdKind::Volume))
        .bind(&scope.project_id)
        .bind(&new.name)
        .bind(new.size_bytes as i64)
        .bind(&new.domain.pool)
        .bind(&new.domain.host_id)
        .bind(&new.snapshot_id)
        .bind(&now)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            unique_conflict(
                e,
                format!(
                    "a volume named {} already exists",
                    new.name.as_deref().unwrap_or_default()
                ),
            )
        })?;
        from_row(&row)
    }

    /// A live volume of the scope's project (another project's is "not found").
    pub async fn volume(&self, scope: &Scope, id_or_name: &str) -> Result<VolumeRow> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM volumes WHERE (id = $1 OR name = $1) AND deleted_at IS NULL
                 AND ($2 IS NULL OR project_id = $2)"
        ))
        .bind(id_or_name)
        .bind(scope_filter(scope))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "volume",
                id: id_or_name.to_string(),
            }),
        }
    }

    pub async fn volumes(&self, scope: &Scope) -> Result<Vec<VolumeRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM volumes WHERE deleted_at IS NULL AND ($1 IS NULL OR project_id = $1)
             ORDER BY created_at, id"
        ))
        .bind(scope_filter(scope))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn set_volume_state(&self, id: &str, state: &str, error: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE volumes SET state = $2, last_error = $3, updated_at = $4 WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(state)
        .bind(error)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Attach an `available` volume to an instance; fails if anything else got there first.
    pub async fn attach_volume(&self, vol: &VolumeRow, instance_id: &str) -> Result<VolumeRow> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE volumes SET instance_id = $2, attach_state = 'attaching', state = 'in-use', last_error = NULL, updated_at = $3
             WHERE id = $1 AND state = 'available' AND instance_id IS NULL AND deleted_at IS NULL
                 AND EXISTS (SELECT 1 FROM instances WHERE id = $2 AND state <> 'terminated' AND desired <> 'terminated')",
        )
        .bind(&vol.id)
        .bind(instance_id)
        .bind(now_str())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "volume {} is not available (it is {}{})",
                vol.id,
                vol.state,
                vol.instance_id
                    .as_deref()
                    .map(|i| format!(", attached to {i}"))
                    .unwrap_or_default()
            )));
        }
        bump_instance(&mut tx, instance_id).await?;
        tx.commit().await?;
        self.volume(&Scope::system(), &vol.id).await
    }

    /// Ask for a volume to be detached; the agent's report finishes it.
    pub async fn detach_volume(&self, vol: &VolumeRow) -> Result<VolumeRow> {
        let Some(instance_id) = &vol.instance_id else {
            return Err(StoreError::Conflict(format!(
                "volume {} is not attached",
                vol.id
            )));
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE volumes SET attach_state = 'detaching', updated_at = $2 WHERE id = $1 AND instance_id IS NOT NULL",
        )
        .bind(&vol.id)
        .bind(now_str())
        .execute(&mut *tx)
        .await?;
        bump_instance(&mut tx, instance_id).await?;
        tx.commit().await?;
        self.volume(&Scope::system(), &vol.id).await
    }

    /// Volumes an instance's spec lists: attached or being attached.
    pub async fn instance_volumes(&self, instance_id: &str) -> Result<Vec<VolumeRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM volumes WHERE instance_id = $1 AND deleted_at IS NULL
                 AND attach_state IN ('attaching', 'attached') ORDER BY created_at, id"
        ))
        .bind(instance_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Every volume with an attachment to this instance, whatever its attach state.
    pub async fn volumes_of_instance(&self, instance_id: &str) -> Result<Vec<VolumeRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM volumes WHERE instance_id = $1 AND deleted_at IS NULL ORDER BY created_at, id"
        ))
        .bind(instance_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Fold what the agent reports attached: `attaching` ones it lists are attached,
    /// `detaching` ones it no longer lists are free. Returns the volumes that changed.
    pub async fn observe_volumes(
        &self,
        instance_id: &str,
        attached: &[String],
        running: bool,
    ) -> Result<Vec<VolumeRow>> {
        let mut changed = vec![];
        for v in self.volumes_of_instance(instance_id).await? {
            let listed = attached.contains(&v.id);
            let to = match v.attach_state.as_deref() {
                Some("attaching") if listed => "attached",
                // A stopped VM has nothing plugged: the volume is attached from the next start.
                Some("attaching") if !running => "attached",
                Some("detaching") if !listed => "",
                _ => continue,
            };
            let q = if to.is_empty() {
                "UPDATE volumes SET instance_id = NULL, attach_state = NULL, state = 'available', last_error = NULL, updated_at = $3
                 WHERE id = $1 AND attach_state = $2"
            } else {
                "UPDATE volumes SET attach_state = 'attached', last_error = NULL, updated_at = $3 WHERE id = $1 AND attach_state = $2"
            };
            sqlx::query(q)
                .bind(&v.id)
                .bind(v.attach_state.as_deref())
                .bind(now_str())
                .execute(&self.pool)
                .await?;
            changed.push(v);
        }
        Ok(changed)
    }

    /// Why the host could not plug or unplug an instance's volumes: shown on those still
    /// attaching or detaching (cleared when the host stops reporting it).
    pub async fn set_transition_error(&self, instance_id: &str, error: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE volumes SET last_error = $2 WHERE instance_id = $1 AND deleted_at IS NULL
                 AND attach_state IN ('attaching', 'detaching') AND last_error IS NOT $2",
        )
        .bind(instance_id)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An instance is gone: its volumes are free again (EBS data volumes outlive instances).
    pub async fn release_instance_volumes(&self, instance_id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE volumes SET instance_id = NULL, attach_state = NULL, state = 'available', updated_at = $2
             WHERE instance_id = $1",
        )
        .bind(instance_id)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record a larger size if the pool has room for the difference.
    pub async fn grow_volume(&self, vol: &VolumeRow, size: u64) -> Result<VolumeRow> {
        check_size(size)?;
        if size <= vol.size_bytes {
            return Err(StoreError::Invalid(format!(
                "volume {} has {} bytes; a resize only grows it (copy it into a smaller volume to shrink)",
                vol.id, vol.size_bytes
            )));
        }
        let _placement = self.placement().await?;
        self.check_room(&vol.domain(), size - vol.size_bytes)
            .await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE volumes SET size_bytes = $2, updated_at = $3 WHERE id = $1")
            .bind(&vol.id)
            .bind(size as i64)
            .bind(now_str())
            .execute(&mut *tx)
            .await?;
        if let Some(i) = &vol.instance_id {
            bump_instance(&mut tx, i).await?;
        }
        tx.commit().await?;
        self.volume(&Scope::system(), &vol.id).await
    }

    /// Put back a size (a failed resize).
    pub async fn set_volume_size(&self, id: &str, size: u64) -> Result<()> {
        sqlx::query("UPDATE volumes SET size_bytes = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(size as i64)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Start deleting a volume: only an unattached one.
    pub async fn begin_delete_volume(&self, vol: &VolumeRow) -> Result<()> {
        let done = sqlx::query(
            "UPDATE volumes SET state = 'deleting', updated_at = $2
             WHERE id = $1 AND instance_id IS NULL AND deleted_at IS NULL AND state IN ('available', 'error', 'deleting')",
        )
        .bind(&vol.id)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "volume {} is {}{}: detach it first",
                vol.id,
                vol.state,
                vol.instance_id
                    .as_deref()
                    .map(|i| format!(" (attached to {i})"))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    pub async fn volume_deleted(&self, id: &str) -> Result<()> {
        let now = now_str();
        sqlx::query(
            "UPDATE volumes SET state = 'deleted', deleted_at = $2, updated_at = $2 WHERE id = $1",
        )
        .bind(id)
        .bind(&now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

pub(crate) fn scope_filter(scope: &Scope) -> Option<String> {
    (!scope.admin).then(|| scope.project_id.clone())
}

/// The instance's spec changed: push it again.
pub(crate) async fn bump_instance(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    instance_id: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE instances SET generation = generation + 1, updated_at = $2 WHERE id = $1 AND state <> 'terminated'",
    )
    .bind(instance_id)
    .bind(now_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
