//! Hypervisor hosts: registration, heartbeats, usage.

use chrono::{DateTime, Utc};
use kumo_types::agent::HostInfo;
use kumo_types::id::{new_id, new_secret, IdKind};
use sqlx::Row;

use kumo_scheduler::valid_label_part;

use crate::auth::unique_conflict;
use crate::{fmt_time, now_str, parse_time, parse_time_opt, Result, Store, StoreError};

#[derive(Debug, Clone)]
pub struct HostRow {
    pub id: String,
    pub name: String,
    pub secret: String,
    pub address: String,
    pub site: String,
    pub state: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub hypervisor: String,
    pub accel: String,
    pub qemu_version: String,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The pool holding this host's VM disks ("" = its own local pool).
    pub storage_pool: String,
    /// Size of the host's VM storage; 0 when the host does not report it.
    pub disk_gib: u64,
    /// The operator's settings for this host; `None` means the cluster's policy.
    pub cpu_overcommit: Option<f64>,
    pub memory_overcommit: Option<f64>,
    pub reserved_memory_mib: Option<u64>,
    /// VXLAN tunnel address ("" = none).
    pub tunnel_ip: String,
    /// The host's storage pool as its agent reports it (name, kind, real capacity).
    pub pool_name: String,
    pub pool_kind: String,
    pub pool_total_bytes: u64,
    pub pool_free_bytes: u64,
}

/// What the live instances on a host reserve. Stopped instances keep their reservation:
/// their disks live on that host.
#[derive(Debug, Clone, Default)]
pub struct HostUsage {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub instances: u32,
    pub disk_gib: u64,
}

const HOST_COLUMNS: &str = "id, name, secret, address, site, state, vcpus, memory_mib, hypervisor, accel, qemu_version, last_heartbeat, generation, created_at, labels, storage_pool, disk_gib, cpu_overcommit, memory_overcommit, reserved_memory_mib, tunnel_ip, pool_name, pool_kind, pool_total_bytes, pool_free_bytes";

fn host_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<HostRow> {
    Ok(HostRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        secret: r.try_get("secret")?,
        address: r.try_get("address")?,
        site: r.try_get("site")?,
        state: r.try_get("state")?,
        vcpus: u32::try_from(r.try_get::<i64, _>("vcpus")?)
            .map_err(|_| StoreError::Corrupt("vcpus"))?,
        memory_mib: u64::try_from(r.try_get::<i64, _>("memory_mib")?)
            .map_err(|_| StoreError::Corrupt("memory_mib"))?,
        hypervisor: r.try_get("hypervisor")?,
        accel: r.try_get("accel")?,
        qemu_version: r.try_get("qemu_version")?,
        last_heartbeat: parse_time_opt(
            r.try_get::<Option<String>, _>("last_heartbeat")?.as_deref(),
        )?,
        generation: r.try_get("generation")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
        labels: serde_json::from_str(&r.try_get::<String, _>("labels")?)
            .map_err(|_| StoreError::Corrupt("labels"))?,
        storage_pool: r.try_get("storage_pool")?,
        disk_gib: u64::try_from(r.try_get::<i64, _>("disk_gib")?)
            .map_err(|_| StoreError::Corrupt("disk_gib"))?,
        cpu_overcommit: r.try_get("cpu_overcommit")?,
        memory_overcommit: r.try_get("memory_overcommit")?,
        reserved_memory_mib: r
            .try_get::<Option<i64>, _>("reserved_memory_mib")?
            .map(|v| v.max(0) as u64),
        tunnel_ip: r.try_get("tunnel_ip")?,
        pool_name: r.try_get("pool_name")?,
        pool_kind: r.try_get("pool_kind")?,
        pool_total_bytes: r.try_get::<i64, _>("pool_total_bytes")?.max(0) as u64,
        pool_free_bytes: r.try_get::<i64, _>("pool_free_bytes")?.max(0) as u64,
    })
}

/// Storage pool names follow the label rules (they are compared, never parsed).
fn check_pool(pool: &str) -> Result<()> {
    if pool.is_empty() || valid_label_part(pool) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "storage pool {pool:?}: 1 to 63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )))
    }
}

/// Labels are `key=value` with keys and values of 1-63 `a-z 0-9 . _ -`.
fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<String> {
    for (k, v) in labels {
        if !valid_label_part(k) || !valid_label_part(v) {
            return Err(StoreError::Invalid(format!(
                "label {k:?}={v:?}: keys and values are 1 to 63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
            )));
        }
    }
    serde_json::to_string(labels).map_err(|_| StoreError::Corrupt("labels"))
}

impl Store {
    /// Register a new host; its name must be new. Returns the host with its secret.
    pub async fn register_host(
        &self,
        name: &str,
        address: &str,
        site: &str,
        info: &HostInfo,
    ) -> Result<HostRow> {
        kumo_types::id::validate_name(name).map_err(StoreError::Invalid)?;
        kumo_types::id::validate_name(site).map_err(StoreError::Invalid)?;
        let labels = check_labels(&info.labels)?;
        check_pool(&info.storage_pool)?;
        self.check_pool_report(info).await?;
        let id = new_id(IdKind::Host);
        let now = now_str();
        let mut placement = self.placement().await?;
        sqlx::query(
            "INSERT INTO hosts (id, name, secret, address, site, state, vcpus, memory_mib, hypervisor, accel, qemu_version, last_heartbeat, generation, created_at, labels, storage_pool, disk_gib, tunnel_ip)
             VALUES ($1, $2, $3, $4, $5, 'up', $6, $7, $8, $9, $10, $11, 1, $11, $12, $13, $14, $15)",
        )
        .bind(&id)
        .bind(name)
        .bind(new_secret())
        .bind(address)
        .bind(site)
        .bind(i64::from(info.vcpus))
        .bind(info.memory_mib as i64)
        .bind(&info.hypervisor)
        .bind(&info.accel)
        .bind(&info.qemu_version)
        .bind(&now)
        .bind(&labels)
        .bind(&info.storage_pool)
        .bind(info.disk_gib as i64)
        .bind(&info.tunnel_ip)
        .execute(&self.pool)
        .await
        .map_err(|e| unique_conflict(e, format!("a host named {name} is already registered")))?;
        self.record_pool_report(&id, info).await?;
        let host = self.host(&id).await?;
        placement.upsert_host(&host);
        Ok(host)
    }

    pub async fn host(&self, id: &str) -> Result<HostRow> {
        let row = sqlx::query(&format!(
            "SELECT {HOST_COLUMNS} FROM hosts WHERE id = $1 OR name = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => host_from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "host",
                id: id.to_string(),
            }),
        }
    }

    pub async fn hosts(&self) -> Result<Vec<HostRow>> {
        let rows = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(host_from_row).collect()
    }

    /// What the live instances on a host reserve (from placement's state, no scan).
    pub async fn host_usage(&self, host_id: &str) -> Result<Option<HostUsage>> {
        Ok(self.placement().await?.usage(host_id))
    }

    /// Hosts by name, a page at a time.
    pub async fn hosts_page(
        &self,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<(Vec<HostRow>, Option<String>)> {
        let limit = crate::clamp_limit(limit);
        let rows = sqlx::query(&format!(
            "SELECT {HOST_COLUMNS} FROM hosts WHERE name > $1 ORDER BY name LIMIT $2"
        ))
        .bind(cursor.unwrap_or(""))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(host_from_row).collect::<Result<Vec<_>>>()?;
        Ok(crate::page(items, limit, |h| h.name.clone()))
    }

    /// Record a heartbeat; a `down` host that reports again comes back `up`.
    pub async fn host_heartbeat(&self, id: &str, address: &str, info: &HostInfo) -> Result<()> {
        let labels = check_labels(&info.labels)?;
        check_pool(&info.storage_pool)?;
        self.check_pool_report(info).await?;
        let mut placement = self.placement().await?;
        self.record_pool_report(id, info).await?;
        let row = sqlx::query(&format!(
            "UPDATE hosts SET address = $2, vcpus = $3, memory_mib = $4, hypervisor = $5, accel = $6,
                 qemu_version = $7, last_heartbeat = $8, labels = $9, storage_pool = $10, disk_gib = $11, tunnel_ip = $12,
                 state = CASE WHEN state = 'down' THEN 'up' ELSE state END,
                 generation = generation + 1
             WHERE id = $1 RETURNING {HOST_COLUMNS}"
        ))
        .bind(id)
        .bind(address)
        .bind(i64::from(info.vcpus))
        .bind(info.memory_mib as i64)
        .bind(&info.hypervisor)
        .bind(&info.accel)
        .bind(&info.qemu_version)
        .bind(now_str())
        .bind(&labels)
        .bind(&info.storage_pool)
        .bind(info.disk_gib as i64)
        .bind(&info.tunnel_ip)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound {
                kind: "host",
                id: id.to_string(),
            });
        };
        placement.upsert_host(&host_from_row(&row)?);
        Ok(())
    }

    /// Mark hosts whose last heartbeat is older than `cutoff` as `down`; returns their ids. A
    /// host in maintenance or draining that dies goes `down` too, so HA fails it over: HA never
    /// has to be switched off for maintenance (when it heartbeats again it comes back `up`).
    pub async fn mark_stale_hosts_down(&self, cutoff: DateTime<Utc>) -> Result<Vec<String>> {
        let mut placement = self.placement().await?;
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE hosts SET state = 'down', generation = generation + 1
             WHERE state IN ('up', 'maintenance', 'draining')
               AND (last_heartbeat IS NULL OR last_heartbeat < $1) RETURNING id",
        )
        .bind(fmt_time(cutoff))
        .fetch_all(&self.pool)
        .await?;
        for (id,) in &rows {
            placement.set_host_state(id, "down");
        }
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}

/// Host states an operator may set, and from which states. `down` comes from missed
/// heartbeats and `fenced` from HA; a heartbeat brings a `down` host back `up`.
pub fn host_transition_allowed(from: &str, to: &str) -> bool {
    matches!(
        (from, to),
        ("up", "maintenance")
            | ("up", "draining")
            | ("draining", "maintenance")
            | ("draining", "up")
            | ("maintenance", "up")
            | ("fenced", "maintenance")
            | ("down", "maintenance")
    ) || from == to
}

#[derive(Debug, Clone)]
pub struct JoinToken {
    pub token: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Set a host's state as an operator; refuses transitions that make no sense.
    pub async fn set_host_state(&self, id: &str, to: &str) -> Result<HostRow> {
        let host = self.host(id).await?;
        if !["up", "maintenance", "draining"].contains(&to) {
            return Err(StoreError::Invalid(format!(
                "an operator can set a host up, maintenance or draining, not {to:?}"
            )));
        }
        if !host_transition_allowed(&host.state, to) {
            return Err(StoreError::Conflict(format!(
                "host {} is {} and cannot go to {to}",
                host.name, host.state
            )));
        }
        let mut placement = self.placement().await?;
        let done = sqlx::query(
            "UPDATE hosts SET state = $3, generation = generation + 1 WHERE id = $1 AND generation = $2",
        )
        .bind(&host.id)
        .bind(host.generation)
        .bind(to)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "host {} changed meanwhile; try again",
                host.name
            )));
        }
        placement.set_host_state(&host.id, to);
        self.host(&host.id).await
    }

    /// Set (or with `None`, keep) a host's own overcommit ratios and reserved memory.
    pub async fn set_host_policy(
        &self,
        id: &str,
        cpu_overcommit: Option<f64>,
        memory_overcommit: Option<f64>,
        reserved_memory_mib: Option<u64>,
    ) -> Result<HostRow> {
        if cpu_overcommit.is_none() && memory_overcommit.is_none() && reserved_memory_mib.is_none()
        {
            return Err(StoreError::Invalid(
                "nothing to change: give cpu_overcommit, memory_overcommit or reserved_memory_mib"
                    .into(),
            ));
        }
        let host = self.host(id).await?;
        if let Some(c) = cpu_overcommit {
            if !(c > 0.0 && c <= 64.0) {
                return Err(StoreError::Invalid(format!(
                    "cpu overcommit must be above 0 and at most 64, not {c}"
                )));
            }
        }
        if let Some(m) = memory_overcommit {
            if !(m > 0.0 && m <= 4.0) {
                return Err(StoreError::Invalid(format!(
                    "memory overcommit must be above 0 and at most 4, not {m}"
                )));
            }
        }
        if let Some(r) = reserved_memory_mib {
            if r >= host.memory_mib {
                return Err(StoreError::Invalid(format!(
                    "reserved memory ({r} MiB) must be less than the host's {} MiB",
                    host.memory_mib
                )));
            }
        }
        let mut placement = self.placement().await?;
        let row = sqlx::query(&format!(
            "UPDATE hosts SET cpu_overcommit = COALESCE($2, cpu_overcommit),
                 memory_overcommit = COALESCE($3, memory_overcommit),
                 reserved_memory_mib = COALESCE($4, reserved_memory_mib),
                 generation = generation + 1
             WHERE id = $1 RETURNING {HOST_COLUMNS}"
        ))
        .bind(&host.id)
        .bind(cpu_overcommit)
        .bind(memory_overcommit)
        .bind(reserved_memory_mib.map(|r| r as i64))
        .fetch_one(&self.pool)
        .await?;
        let host = host_from_row(&row)?;
        placement.upsert_host(&host);
        Ok(host)
    }

    pub async fn join_tokens(&self) -> Result<Vec<JoinToken>> {
        let rows = sqlx::query(
            "SELECT token, created_at, revoked_at FROM join_tokens ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JoinToken {
                    token: r.try_get("token")?,
                    created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
                    revoked_at: parse_time_opt(
                        r.try_get::<Option<String>, _>("revoked_at")?.as_deref(),
                    )?,
                })
            })
            .collect()
    }

    /// Revoke a join token: hosts can no longer join with it (hosts that joined stay).
    pub async fn revoke_join_token(&self, token: &str) -> Result<()> {
        let done = sqlx::query(
            "UPDATE join_tokens SET revoked_at = $2 WHERE token = $1 AND revoked_at IS NULL",
        )
        .bind(token)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "join token",
                id: token.to_string(),
            });
        }
        Ok(())
    }
}
