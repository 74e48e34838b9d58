//! HA in the store: each instance's failover settings, the leases the controller grants hosts,
//! and the failover itself.
//!
//! Safety rests on two single-statement writes that SQLite (or PostgreSQL) serialises: a grant
//! ([`Store::grant_leases`]) only covers instances still placed on the host, and a failover
//! ([`Store::fail_over_instance`]) only moves an instance whose lease has expired on a host that
//! is still down and silent. Whichever runs first, the other sees it: a host is never granted a
//! lease for an instance that has moved, and an instance never moves while a lease is valid.

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::instances::{from_row, InstanceRow, COLS};
use crate::placement::{Claim, Placement};
use crate::{fmt_time, now_str, parse_time, Result, Scope, Store, StoreError};

/// Highest HA priority (the lowest is 0).
pub const HA_PRIORITY_MAX: u32 = kumo_types::api::HA_PRIORITY_MAX;

/// HA priorities are 0..=1000.
pub fn check_ha_priority(p: u32) -> Result<()> {
    if p > HA_PRIORITY_MAX {
        return Err(StoreError::Invalid(format!(
            "ha_priority {p} is out of range: 0 to {HA_PRIORITY_MAX}"
        )));
    }
    Ok(())
}

/// The latest lease granted for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub instance_id: String,
    pub host_id: String,
    /// On the controller's clock.
    pub expires_at: DateTime<Utc>,
}

/// What [`Store::fail_over_instance`] did.
#[derive(Debug, Clone)]
pub enum Failover {
    /// The instance now belongs to `host_id`, with a new generation, to be pushed there.
    Moved {
        row: Box<InstanceRow>,
        host_id: String,
    },
    /// No host can take it; why each was refused.
    NoHost(String),
    /// The instance changed, its lease was renewed, or its host came back: nothing was done.
    Raced,
}

/// Keeps the later expiry when the lease stays with the same host; a lease for another host
/// replaces it (the instance moved, which happens only once the old lease expired).
const KEEP_LATER: &str = "ON CONFLICT (instance_id) DO UPDATE SET host_id = excluded.host_id,
     expires_at = CASE WHEN leases.host_id = excluded.host_id AND leases.expires_at > excluded.expires_at
                       THEN leases.expires_at ELSE excluded.expires_at END";

impl Store {
    /// Turn HA on or off and/or set its priority (`None` keeps the value). Nothing changes when
    /// the priority is out of range or the instance is terminated.
    pub async fn set_instance_ha(
        &self,
        scope: &Scope,
        id_or_name: &str,
        ha: Option<bool>,
        priority: Option<u32>,
    ) -> Result<InstanceRow> {
        if ha.is_none() && priority.is_none() {
            return Err(StoreError::Invalid(
                "nothing to change: give ha and/or ha_priority".into(),
            ));
        }
        if let Some(p) = priority {
            check_ha_priority(p)?;
        }
        let cur = self.instance(scope, id_or_name).await?;
        // Turning HA on or off changes what the host enforces (leases), so the spec is pushed
        // again; the priority only matters to the controller.
        let done = sqlx::query(
            "UPDATE instances SET generation = generation + CASE WHEN COALESCE($2, ha) <> ha THEN 1 ELSE 0 END,
                 ha = COALESCE($2, ha), ha_priority = COALESCE($3, ha_priority), updated_at = $4
             WHERE id = $1 AND state <> 'terminated'",
        )
        .bind(&cur.id)
        .bind(ha.map(i64::from))
        .bind(priority.map(i64::from))
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "instance {} is terminated",
                cur.id
            )));
        }
        self.instance(scope, &cur.id).await
    }

    /// Grant the host a lease until `expires_at` for every live instance placed on it; returns
    /// their ids. One statement: an instance moved away meanwhile is not granted.
    pub async fn grant_leases(
        &self,
        host_id: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(&format!(
            "INSERT INTO leases (instance_id, host_id, expires_at)
             SELECT id, host_id, $2 FROM instances
             WHERE host_id = $1 AND state <> 'terminated' AND desired <> 'terminated'
             {KEEP_LATER}
             RETURNING instance_id"
        ))
        .bind(host_id)
        .bind(fmt_time(expires_at))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Record a lease sent with a desired-spec PUT, if the instance is still on that host.
    pub async fn record_lease(
        &self,
        instance_id: &str,
        host_id: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO leases (instance_id, host_id, expires_at)
             SELECT id, host_id, $3 FROM instances WHERE id = $1 AND host_id = $2
             {KEEP_LATER}"
        ))
        .bind(instance_id)
        .bind(host_id)
        .bind(fmt_time(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The leases last granted to a host.
    pub async fn host_leases(&self, host_id: &str) -> Result<Vec<LeaseRow>> {
        let rows = sqlx::query(
            "SELECT instance_id, host_id, expires_at FROM leases WHERE host_id = $1 ORDER BY instance_id",
        )
        .bind(host_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(lease_from_row).collect()
    }

    /// The lease last granted for an instance (to whichever host).
    pub async fn instance_lease(&self, instance_id: &str) -> Result<Option<LeaseRow>> {
        let row = sqlx::query(
            "SELECT instance_id, host_id, expires_at FROM leases WHERE instance_id = $1",
        )
        .bind(instance_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(lease_from_row).transpose()
    }

    /// Ids of the hosts in one of these states (`down`, `fenced` ...).
    pub async fn host_ids_in_state(&self, states: &[&str]) -> Result<Vec<String>> {
        let marks: Vec<String> = (1..=states.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT id FROM hosts WHERE state IN ({}) ORDER BY id",
            marks.join(", ")
        );
        let mut q = sqlx::query_as::<_, (String,)>(&sql);
        for s in states {
            q = q.bind(*s);
        }
        Ok(q.fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| r.0)
            .collect())
    }

    /// Live instances placed on any of these hosts that want to run and have HA on, highest
    /// priority first (then oldest first, so the order is stable).
    pub async fn ha_instances_on(&self, host_ids: &[String]) -> Result<Vec<InstanceRow>> {
        let mut out = Vec::new();
        for h in host_ids {
            let rows = sqlx::query(&format!(
                "SELECT {COLS} FROM instances
                 WHERE host_id = $1 AND state <> 'terminated' AND desired = 'running' AND ha <> 0"
            ))
            .bind(h)
            .fetch_all(&self.pool)
            .await?;
            for r in &rows {
                out.push(from_row(r)?);
            }
        }
        sort_for_failover(&mut out);
        Ok(out)
    }

    /// Move an instance off its failed host `from` to the host `place` chooses, in one
    /// conditional write: only if the instance is unchanged since `row` was read, its lease
    /// expired before `lease_cutoff`, and `from` is still down or fenced with no heartbeat since
    /// `heartbeat_cutoff` (its agent's leases, PUT grants included, end by then).
    pub async fn fail_over_instance(
        &self,
        row: &InstanceRow,
        from: &str,
        lease_cutoff: DateTime<Utc>,
        heartbeat_cutoff: DateTime<Utc>,
        place: impl FnOnce(&Placement) -> std::result::Result<usize, String>,
    ) -> Result<Failover> {
        if row.host_id.as_deref() != Some(from) {
            return Ok(Failover::Raced);
        }
        let mut placement = self.placement().await?;
        let to = match place(&placement) {
            Ok(i) => match placement.hosts().get(i) {
                Some(h) if h.id != from => h.id.clone(),
                _ => return Ok(Failover::NoHost("only the failed host fits".into())),
            },
            Err(reason) => return Ok(Failover::NoHost(reason)),
        };
        let done = sqlx::query(
            "UPDATE instances SET host_id = $3, state = 'pending', generation = generation + 1,
                 observed_generation = 0, last_error = NULL, updated_at = $5
             WHERE id = $1 AND generation = $2 AND host_id = $4 AND state <> 'terminated' AND desired = 'running'
               AND NOT EXISTS (SELECT 1 FROM leases WHERE instance_id = $1 AND expires_at >= $6)
               AND EXISTS (SELECT 1 FROM hosts WHERE id = $4 AND state IN ('down', 'fenced')
                           AND (last_heartbeat IS NULL OR last_heartbeat < $7))",
        )
        .bind(&row.id)
        .bind(row.generation)
        .bind(&to)
        .bind(from)
        .bind(now_str())
        .bind(fmt_time(lease_cutoff))
        .bind(fmt_time(heartbeat_cutoff))
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(Failover::Raced);
        }
        let after = self.instance(&Scope::system(), &row.id).await?;
        if let (Some(old), Some(new)) = (Claim::of(row), Claim::of(&after)) {
            placement.apply(&old, -1);
            placement.apply(&new, 1);
        }
        Ok(Failover::Moved {
            row: Box::new(after),
            host_id: to,
        })
    }

    /// A `down` host whose instances have been handled becomes `fenced`. Returns whether it did
    /// (not when it came back meanwhile).
    pub async fn fence_host(&self, id: &str) -> Result<bool> {
        self.move_host_state(id, "down", "fenced").await
    }

    /// A `fenced` host that heartbeats again comes back `up`.
    pub async fn unfence_host(&self, id: &str) -> Result<bool> {
        self.move_host_state(id, "fenced", "up").await
    }

    async fn move_host_state(&self, id: &str, from: &str, to: &str) -> Result<bool> {
        let mut placement = self.placement().await?;
        let done = sqlx::query(
            "UPDATE hosts SET state = $3, generation = generation + 1 WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            placement.set_host_state(id, to);
        }
        Ok(done.rows_affected() == 1)
    }
}

/// Failover order: highest `ha_priority` first, then the oldest instance.
pub fn sort_for_failover(rows: &mut [InstanceRow]) {
    rows.sort_by(|a, b| {
        b.ha_priority
            .cmp(&a.ha_priority)
            .then(a.created_at.cmp(&b.created_at))
            .then(a.id.cmp(&b.id))
    });
}

fn lease_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<LeaseRow> {
    Ok(LeaseRow {
        instance_id: r.try_get("instance_id")?,
        host_id: r.try_get("host_id")?,
        expires_at: parse_time(&r.try_get::<String, _>("expires_at")?)?,
    })
}

#[cfg(test)]
mod tests;
