//! Hypervisor hosts: registration, heartbeats, usage.

use chrono::{DateTime, Utc};
use kumo_types::agent::HostInfo;
use kumo_types::id::{new_id, new_secret, IdKind};
use sqlx::Row;

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
}

/// What the live instances on a host reserve. Stopped instances keep their reservation:
/// their disks live on that host.
#[derive(Debug, Clone, Default)]
pub struct HostUsage {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub instances: u32,
}

const HOST_COLUMNS: &str = "id, name, secret, address, site, state, vcpus, memory_mib, hypervisor, accel, qemu_version, last_heartbeat, generation, created_at, labels";

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
    })
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

fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
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
        let id = new_id(IdKind::Host);
        let now = now_str();
        sqlx::query(
            "INSERT INTO hosts (id, name, secret, address, site, state, vcpus, memory_mib, hypervisor, accel, qemu_version, last_heartbeat, generation, created_at, labels)
             VALUES ($1, $2, $3, $4, $5, 'up', $6, $7, $8, $9, $10, $11, 1, $11, $12)",
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
        .execute(&self.pool)
        .await
        .map_err(|e| unique_conflict(e, format!("a host named {name} is already registered")))?;
        self.host(&id).await
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

    pub async fn host_usage(&self) -> Result<std::collections::HashMap<String, HostUsage>> {
        let rows = sqlx::query(
            "SELECT host_id, SUM(vcpus) AS v, SUM(memory_mib) AS m, COUNT(*) AS n FROM instances
             WHERE state <> 'terminated' AND host_id IS NOT NULL GROUP BY host_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = std::collections::HashMap::new();
        for r in rows {
            let host: String = r.try_get("host_id")?;
            out.insert(
                host,
                HostUsage {
                    vcpus: r.try_get::<i64, _>("v")? as u32,
                    memory_mib: r.try_get::<i64, _>("m")? as u64,
                    instances: r.try_get::<i64, _>("n")? as u32,
                },
            );
        }
        Ok(out)
    }

    /// Record a heartbeat; a `down` host that reports again comes back `up`.
    pub async fn host_heartbeat(&self, id: &str, address: &str, info: &HostInfo) -> Result<()> {
        let labels = check_labels(&info.labels)?;
        let done = sqlx::query(
            "UPDATE hosts SET address = $2, vcpus = $3, memory_mib = $4, hypervisor = $5, accel = $6,
                 qemu_version = $7, last_heartbeat = $8, labels = $9,
                 state = CASE WHEN state = 'down' THEN 'up' ELSE state END,
                 generation = generation + 1
             WHERE id = $1",
        )
        .bind(id)
        .bind(address)
        .bind(i64::from(info.vcpus))
        .bind(info.memory_mib as i64)
        .bind(&info.hypervisor)
        .bind(&info.accel)
        .bind(&info.qemu_version)
        .bind(now_str())
        .bind(&labels)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "host",
                id: id.to_string(),
            });
        }
        Ok(())
    }

    /// Mark `up` hosts whose last heartbeat is older than `cutoff` as `down`; returns their ids.
    pub async fn mark_stale_hosts_down(&self, cutoff: DateTime<Utc>) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE hosts SET state = 'down', generation = generation + 1
             WHERE state = 'up' AND (last_heartbeat IS NULL OR last_heartbeat < $1) RETURNING id",
        )
        .bind(fmt_time(cutoff))
        .fetch_all(&self.pool)
        .await?;
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
        self.host(&host.id).await
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
