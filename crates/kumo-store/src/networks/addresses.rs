//! The public address pool and elastic IPs. One operator-defined pool; an allocation belongs
//! to a project and is associated with at most one of its live instances. Its id is never
//! reused, its address is once released. Allocation and association hold the placement lock,
//! as terminations do, so that a terminating instance cannot keep or gain an address.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use super::{in_chunks, parse_v4_cidr, span};
use crate::auth::unique_conflict;
use crate::{now_str, parse_time, Result, Scope, Store, StoreError};

/// The public address pool: elastic IPs are `first..=last` of `cidr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPoolRow {
    pub cidr: String,
    pub gateway: String,
    pub first: String,
    pub last: String,
}

/// The pool with how much of it is allocated.
#[derive(Debug, Clone)]
pub struct AddressPoolUsage {
    pub pool: AddressPoolRow,
    pub size: u64,
    pub used: u64,
}

/// A live (not released) elastic IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRow {
    pub id: String,
    pub project_id: String,
    pub public_ip: String,
    pub instance_id: Option<String>,
    pub association_id: Option<String>,
    /// The associated instance's private address.
    pub private_ip: Option<String>,
    pub created_at: DateTime<Utc>,
}

const ADDR_COLS: &str =
    "a.id, a.project_id, a.public_ip, a.instance_id, a.association_id, a.created_at, i.private_ip";
const ADDR_FROM: &str = "addresses a LEFT JOIN instances i ON i.id = a.instance_id";

fn address_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<AddressRow> {
    Ok(AddressRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        public_ip: r.try_get("public_ip")?,
        instance_id: r.try_get("instance_id")?,
        association_id: r.try_get("association_id")?,
        private_ip: r.try_get("private_ip")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

fn parse_ip(what: &str, s: &str) -> Result<u32> {
    s.parse::<Ipv4Addr>()
        .map(u32::from)
        .map_err(|_| StoreError::Invalid(format!("{what} {s:?} is not an IPv4 address")))
}

/// Check a pool: the gateway and the range inside the CIDR, the range holding neither the
/// network, the broadcast nor the gateway address. Returns it normalised and its range.
pub fn check_address_pool(p: &AddressPoolRow) -> Result<(AddressPoolRow, u32, u32)> {
    let (base, len) = parse_v4_cidr(&p.cidr, 8..=30)?;
    let (lo, hi) = span(base, len);
    let gateway = parse_ip("gateway", &p.gateway)?;
    let first = parse_ip("first address", &p.first)?;
    let last = parse_ip("last address", &p.last)?;
    let ip = |n: u32| Ipv4Addr::from(n).to_string();
    for (what, n) in [
        ("gateway", gateway),
        ("first address", first),
        ("last address", last),
    ] {
        if n < lo || n > hi {
            return Err(StoreError::Invalid(format!(
                "the {what} {} is outside {}",
                ip(n),
                p.cidr
            )));
        }
    }
    if gateway == lo || gateway == hi {
        return Err(StoreError::Invalid(format!(
            "the gateway {} is the network or broadcast address of {}",
            ip(gateway),
            p.cidr
        )));
    }
    if first > last {
        return Err(StoreError::Invalid(format!(
            "the range {}-{} is empty: the first address is after the last",
            ip(first),
            ip(last)
        )));
    }
    for (what, n) in [("network", lo), ("broadcast", hi), ("gateway", gateway)] {
        if (first..=last).contains(&n) {
            return Err(StoreError::Invalid(format!(
                "the range {}-{} contains the {what} address {}",
                ip(first),
                ip(last),
                ip(n)
            )));
        }
    }
    let norm = AddressPoolRow {
        cidr: format!("{}/{len}", ip(base)),
        gateway: ip(gateway),
        first: ip(first),
        last: ip(last),
    };
    Ok((norm, first, last))
}

impl Store {
    // --- the public address pool ---

    pub async fn address_pool(&self) -> Result<Option<AddressPoolRow>> {
        let row: Option<(String, String, String, String)> = sqlx::query_as(
            "SELECT cidr, gateway, first_ip, last_ip FROM address_pool WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(cidr, gateway, first, last)| AddressPoolRow {
            cidr,
            gateway,
            first,
            last,
        }))
    }

    /// The pool with its size and allocated addresses; `None` when there is no pool.
    pub async fn address_pool_usage(&self) -> Result<Option<AddressPoolUsage>> {
        let Some(pool) = self.address_pool().await? else {
            return Ok(None);
        };
        let (_, first, last) = check_address_pool(&pool)?;
        let (used,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM addresses WHERE released_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(Some(AddressPoolUsage {
            pool,
            size: u64::from(last - first) + 1,
            used: used as u64,
        }))
    }

    /// Define or replace the pool (administrators). Refused when an allocated address would
    /// fall outside the new range.
    pub async fn set_address_pool(&self, pool: &AddressPoolRow) -> Result<AddressPoolRow> {
        let (pool, first, last) = check_address_pool(pool)?;
        // Held so that no allocation happens between the check and the change.
        let _placement = self.placement().await?;
        let outside: Vec<String> = self
            .live_public_ips()
            .await?
            .into_iter()
            .filter(|ip| !(first..=last).contains(ip))
            .map(|ip| Ipv4Addr::from(ip).to_string())
            .collect();
        if !outside.is_empty() {
            return Err(StoreError::Conflict(format!(
                "allocated address(es) {} would fall outside {}-{}; release them first",
                outside.join(", "),
                pool.first,
                pool.last
            )));
        }
        sqlx::query(
            "INSERT INTO address_pool (id, cidr, gateway, first_ip, last_ip, updated_at) VALUES (1, $1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET cidr = excluded.cidr, gateway = excluded.gateway,
                 first_ip = excluded.first_ip, last_ip = excluded.last_ip, updated_at = excluded.updated_at",
        )
        .bind(&pool.cidr)
        .bind(&pool.gateway)
        .bind(&pool.first)
        .bind(&pool.last)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok(pool)
    }

    async fn live_public_ips(&self) -> Result<Vec<u32>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT public_ip FROM addresses WHERE released_at IS NULL")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| parse_ip("public address", &r.0).map_err(|_| StoreError::Corrupt("public_ip")))
            .collect()
    }

    // --- elastic IPs ---

    /// Allocate the lowest free address of the pool to the scope's project.
    pub async fn allocate_address(&self, scope: &Scope) -> Result<AddressRow> {
        let _placement = self.placement().await?;
        let pool = self.address_pool().await?.ok_or_else(|| {
            StoreError::Conflict(
                "no public address pool is defined; an administrator sets one with `kumo address-pool set`"
                    .into(),
            )
        })?;
        let (_, first, last) = check_address_pool(&pool)?;
        let used: HashSet<u32> = self.live_public_ips().await?.into_iter().collect();
        let ip = (first..=last)
            .find(|ip| !used.contains(ip))
            .map(Ipv4Addr::from)
            .ok_or_else(|| {
                StoreError::Conflict(format!(
                    "the public address pool {}-{} has no free address ({} allocated)",
                    pool.first,
                    pool.last,
                    used.len()
                ))
            })?;
        let id = new_id(IdKind::Address);
        sqlx::query(
            "INSERT INTO addresses (id, project_id, public_ip, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(&scope.project_id)
        .bind(ip.to_string())
        .bind(now_str())
        .execute(&self.pool)
        .await
        .map_err(|e| unique_conflict(e, format!("{ip} was allocated concurrently; try again")))?;
        self.address(scope, &id).await
    }

    /// A live address of the scope by allocation id, public IP or association id.
    pub async fn address(&self, scope: &Scope, key: &str) -> Result<AddressRow> {
        let r = sqlx::query(&format!(
            "SELECT {ADDR_COLS} FROM {ADDR_FROM}
             WHERE a.released_at IS NULL AND (a.id = $1 OR a.public_ip = $1 OR a.association_id = $1)
               AND (CAST($2 AS TEXT) IS NULL OR a.project_id = $2)"
        ))
        .bind(key)
        .bind(scope.filter())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "address",
            id: key.to_string(),
        })?;
        address_from_row(&r)
    }

    /// The scope's live addresses, by id.
    pub async fn addresses(&self, scope: &Scope) -> Result<Vec<AddressRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {ADDR_COLS} FROM {ADDR_FROM}
             WHERE a.released_at IS NULL AND (CAST($1 AS TEXT) IS NULL OR a.project_id = $1) ORDER BY a.id"
        ))
        .bind(scope.filter())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(address_from_row).collect()
    }

    /// Associate an address with a live instance of its project. An address associated with
    /// another instance moves only with `allow_reassociation`; an address the instance had
    /// before is disassociated (as EC2 does).
    pub async fn associate_address(
        &self,
        scope: &Scope,
        key: &str,
        instance: &str,
        allow_reassociation: bool,
    ) -> Result<AddressRow> {
        // Held so that a termination or another association cannot slip between the checks
        // and the change.
        let _placement = self.placement().await?;
        let a = self.address(scope, key).await?;
        let i = self.instance(scope, instance).await?;
        if i.project_id != a.project_id {
            return Err(StoreError::Invalid(format!(
                "instance {} and address {} belong to different projects",
                i.id, a.public_ip
            )));
        }
        if i.desired == "terminated" || i.state == kumo_types::InstanceState::Terminated {
            return Err(StoreError::Conflict(format!(
                "instance {} is {}; only live instances get addresses",
                i.id, i.state
            )));
        }
        match &a.instance_id {
            Some(cur) if *cur == i.id => return Ok(a),
            Some(cur) if !allow_reassociation => {
                return Err(StoreError::Conflict(format!(
                    "address {} is already associated with instance {cur}; allow reassociation to move it",
                    a.public_ip
                )))
            }
            _ => {}
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE addresses SET instance_id = NULL, association_id = NULL, associated_at = NULL
             WHERE instance_id = $1 AND id <> $2",
        )
        .bind(&i.id)
        .bind(&a.id)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "UPDATE addresses SET instance_id = $2, association_id = $3, associated_at = $4
             WHERE id = $1 AND released_at IS NULL",
        )
        .bind(&a.id)
        .bind(&i.id)
        .bind(new_id(IdKind::Association))
        .bind(now_str())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::NotFound {
                kind: "address",
                id: key.to_string(),
            });
        }
        tx.commit().await?;
        self.address(scope, &a.id).await
    }

    /// Disassociate an address (nothing to do when it is not associated).
    pub async fn disassociate_address(&self, scope: &Scope, key: &str) -> Result<AddressRow> {
        let a = self.address(scope, key).await?;
        sqlx::query(
            "UPDATE addresses SET instance_id = NULL, association_id = NULL, associated_at = NULL WHERE id = $1",
        )
        .bind(&a.id)
        .execute(&self.pool)
        .await?;
        self.address(scope, &a.id).await
    }

    /// Give an address back to the pool; refused while it is associated.
    pub async fn release_address(&self, scope: &Scope, key: &str) -> Result<AddressRow> {
        let a = self.address(scope, key).await?;
        let done = sqlx::query(
            "UPDATE addresses SET released_at = $2 WHERE id = $1 AND released_at IS NULL AND instance_id IS NULL",
        )
        .bind(&a.id)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            let now = self.address(scope, &a.id).await?;
            return Err(StoreError::Conflict(format!(
                "address {} is associated with instance {}; disassociate it first",
                now.public_ip,
                now.instance_id.unwrap_or_default()
            )));
        }
        Ok(a)
    }

    /// (instance id, public ip) of associated addresses.
    pub async fn instance_public_ips(
        &self,
        instance_ids: &[String],
    ) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (chunk, marks) in in_chunks(instance_ids) {
            let sql = format!(
                "SELECT instance_id, public_ip FROM addresses
                 WHERE released_at IS NULL AND instance_id IN ({marks}) ORDER BY instance_id"
            );
            let mut q = sqlx::query_as::<_, (String, String)>(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            out.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(out)
    }

    /// A terminating instance loses its address; the allocation stays with the project.
    pub(crate) async fn disassociate_instance(&self, instance_id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE addresses SET instance_id = NULL, association_id = NULL, associated_at = NULL WHERE instance_id = $1",
        )
        .bind(instance_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
