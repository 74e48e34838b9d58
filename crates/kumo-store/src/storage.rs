//! Storage pools as hosts report them, and the capacity rule every disk allocation follows:
//! the virtual bytes provisioned in a pool (root disks and volumes) stay within its real
//! capacity times the operator's overcommit. A `shared` pool is one capacity for all its hosts;
//! a `dir` or `lvm` pool is each host's own.

use kumo_types::agent::HostInfo;
use sqlx::Row;

use crate::{now_str, Result, Store, StoreError};

mod backups;
mod snapshots;
mod volumes;

pub use backups::{BackupRow, NewSchedule, ScheduleRow};
pub use snapshots::{NewSnapshot, SnapshotRow};
pub use volumes::{NewVolume, VolumeRow};

pub const GIB: u64 = 1 << 30;

/// Overcommit limits operators may set.
pub const OVERCOMMIT_RANGE: std::ops::RangeInclusive<f64> = 1.0..=20.0;

#[derive(Debug, Clone, PartialEq)]
pub struct PoolRow {
    pub name: String,
    pub kind: String,
    pub overcommit: f64,
}

/// Where a disk's bytes count: a shared pool, or one host's local pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub pool: String,
    /// `None` for a shared pool.
    pub host_id: Option<String>,
}

/// A domain's limit and what is provisioned in it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DomainUsage {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub provisioned_bytes: u64,
    /// `total × overcommit`; `None` when the pool has not reported its size (sim hosts).
    pub limit_bytes: Option<u64>,
}

pub fn is_shared(kind: &str) -> bool {
    kind == "shared"
}

impl Store {
    /// A host's report must agree with the pool's kind as other hosts reported it.
    pub(crate) async fn check_pool_report(&self, info: &HostInfo) -> Result<()> {
        let Some(rep) = &info.pool else { return Ok(()) };
        kumo_types::id::validate_name(&rep.name).map_err(StoreError::Invalid)?;
        if !matches!(rep.kind.as_str(), "dir" | "shared" | "lvm") {
            return Err(StoreError::Invalid(format!(
                "storage pool kind {:?}: one of dir, shared, lvm",
                rep.kind
            )));
        }
        if let Some(p) = self.storage_pool_opt(&rep.name).await? {
            if p.kind != rep.kind {
                return Err(StoreError::Invalid(format!(
                    "storage pool {} is a {} pool on other hosts, this host says {}",
                    rep.name, p.kind, rep.kind
                )));
            }
        }
        Ok(())
    }

    pub(crate) async fn record_pool_report(&self, host_id: &str, info: &HostInfo) -> Result<()> {
        let Some(rep) = &info.pool else { return Ok(()) };
        sqlx::query(
            "INSERT INTO storage_pools (name, kind, overcommit, created_at) VALUES ($1, $2, 1.0, $3)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&rep.name)
        .bind(&rep.kind)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE hosts SET pool_name = $2, pool_kind = $3, pool_total_bytes = $4, pool_free_bytes = $5 WHERE id = $1",
        )
        .bind(host_id)
        .bind(&rep.name)
        .bind(&rep.kind)
        .bind(rep.total_bytes.min(i64::MAX as u64) as i64)
        .bind(rep.free_bytes.min(i64::MAX as u64) as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn storage_pool_opt(&self, name: &str) -> Result<Option<PoolRow>> {
        let row = sqlx::query("SELECT name, kind, overcommit FROM storage_pools WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| pool_from_row(&r)).transpose()
    }

    pub async fn storage_pool(&self, name: &str) -> Result<PoolRow> {
        self.storage_pool_opt(name)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "storage pool",
                id: name.to_string(),
            })
    }

    pub async fn storage_pools(&self) -> Result<Vec<PoolRow>> {
        let rows = sqlx::query("SELECT name, kind, overcommit FROM storage_pools ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(pool_from_row).collect()
    }

    pub async fn set_pool_overcommit(&self, name: &str, overcommit: f64) -> Result<PoolRow> {
        if !OVERCOMMIT_RANGE.contains(&overcommit) {
            return Err(StoreError::Invalid(format!(
                "overcommit {overcommit}: from {} to {}",
                OVERCOMMIT_RANGE.start(),
                OVERCOMMIT_RANGE.end()
            )));
        }
        // Lowering it below what is already provisioned is allowed: nothing new fits until
        // disks are deleted, and nothing existing breaks.
        let _placement = self.placement().await?;
        let done = sqlx::query("UPDATE storage_pools SET overcommit = $2 WHERE name = $1")
            .bind(name)
            .bind(overcommit)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "storage pool",
                id: name.to_string(),
            });
        }
        self.storage_pool(name).await
    }

    /// The domain a host's disks count in.
    pub fn domain_of(host: &crate::HostRow) -> Domain {
        Domain {
            pool: host.pool_name.clone(),
            host_id: (!is_shared(&host.pool_kind)).then(|| host.id.clone()),
        }
    }

    /// Limit and provisioned bytes of a domain. Call with the placement lock held when the
    /// answer decides an allocation.
    pub async fn domain_usage(&self, d: &Domain) -> Result<DomainUsage> {
        let overcommit = self
            .storage_pool_opt(&d.pool)
            .await?
            .map(|p| p.overcommit)
            .unwrap_or(1.0);
        let (host_filter, vol_filter) = match &d.host_id {
            Some(_) => ("h.id = $2", "v.pool = $1 AND v.host_id = $2"),
            None => ("h.pool_name = $1", "v.pool = $1"),
        };
        let host_id = d.host_id.clone().unwrap_or_default();
        let cap = sqlx::query(&format!(
            "SELECT COALESCE(MAX(h.pool_total_bytes), 0) AS t, COALESCE(MIN(h.pool_free_bytes), 0) AS f
             FROM hosts h WHERE {host_filter} AND h.pool_name = $1"
        ))
        .bind(&d.pool)
        .bind(&host_id)
        .fetch_one(&self.pool)
        .await?;
        let roots: i64 = sqlx::query(&format!(
            "SELECT COALESCE(SUM(i.disk_gib), 0) FROM instances i JOIN hosts h ON h.id = i.host_id
             WHERE i.state <> 'terminated' AND {host_filter} AND h.pool_name = $1"
        ))
        .bind(&d.pool)
        .bind(&host_id)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let vols: i64 = sqlx::query(&format!(
            "SELECT COALESCE(SUM(v.size_bytes), 0) FROM volumes v WHERE v.deleted_at IS NULL AND {vol_filter}"
        ))
        .bind(&d.pool)
        .bind(&host_id)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let total = cap.try_get::<i64, _>("t")?.max(0) as u64;
        Ok(DomainUsage {
            total_bytes: total,
            free_bytes: cap.try_get::<i64, _>("f")?.max(0) as u64,
            provisioned_bytes: (roots.max(0) as u64).saturating_mul(GIB) + vols.max(0) as u64,
            limit_bytes: (total > 0).then_some((total as f64 * overcommit) as u64),
        })
    }

    /// Refuse an allocation of `bytes` that would take the domain past its limit.
    pub(crate) async fn check_room(&self, d: &Domain, bytes: u64) -> Result<()> {
        let u = self.domain_usage(d).await?;
        if let Some(limit) = u.limit_bytes {
            if u.provisioned_bytes.saturating_add(bytes) > limit {
                let place = match &d.host_id {
                    Some(h) => format!("storage pool {} on host {h}", d.pool),
                    None => format!("storage pool {}", d.pool),
                };
                return Err(StoreError::NoStorage(format!(
                    "{place} cannot take {bytes} more bytes: {} of {limit} provisioned (capacity {} × overcommit)",
                    u.provisioned_bytes, u.total_bytes
                )));
            }
        }
        Ok(())
    }
}

fn pool_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<PoolRow> {
    Ok(PoolRow {
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        overcommit: r.try_get("overcommit")?,
    })
}
