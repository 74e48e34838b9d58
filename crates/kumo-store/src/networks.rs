//! Tenant networks (the address pool and elastic IPs are in [`addresses`]).
//!
//! A network belongs to a project: its name is unique among the project's live networks and
//! its CIDR may not overlap theirs. Two projects may use the same CIDR; a VXLAN VNI (unique
//! across all networks, never reused) or a VLAN tag keeps them apart. Deleted networks keep
//! their row because terminated instances still name them. A dual-stack network also has an
//! IPv6 /64 (unique within the project); its instances' IPv6 addresses are the EUI-64s of their
//! MACs (SLAAC), computed when read, never stored.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, IdKind};
use sqlx::Row;

use crate::auth::unique_conflict;
use crate::instances::parse_cidr;
use crate::{now_str, parse_time, Result, Scope, Store, StoreError};

/// VXLAN adds 50 bytes per frame: 1450 keeps overlay frames within a 1500-byte underlay.
pub const VXLAN_MTU: i64 = 1450;
/// VNIs are 24 bits (0 is not used).
pub const MAX_VNI: i64 = 16_777_215;
/// 802.1Q tags 1–4094 (0 and 4095 are reserved).
pub const MAX_VLAN_TAG: i64 = 4094;
/// Prefix lengths of tenant networks: a /28 still leaves five instance addresses after the
/// reserved first ten and the broadcast address.
pub const TENANT_PREFIX: std::ops::RangeInclusive<u8> = 16..=28;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub cidr: String,
    pub gateway: String,
    /// VXLAN network identifier (`vxlan` networks).
    pub vni: Option<i64>,
    /// 802.1Q tag (`vlan` networks).
    pub vlan_tag: Option<i64>,
    /// MTU for guests; `None`: the host link's own.
    pub mtu: Option<i64>,
    /// `vxlan` or `vlan`.
    pub isolation: String,
    /// IPv6 /64 of a dual-stack network (`fd60:1::/64`); instances' addresses are its EUI-64s.
    pub ipv6_cidr: Option<String>,
}

/// A network with what the API shows besides its row.
#[derive(Debug, Clone)]
pub struct NetworkView {
    pub network: NetworkRow,
    /// Live (not terminated) instances on it.
    pub instances: u32,
    pub created_at: DateTime<Utc>,
}

/// A tenant's request for a network.
#[derive(Debug, Clone, Default)]
pub struct NewNetwork {
    pub name: String,
    pub cidr: String,
    /// `vxlan` (default) or `vlan`.
    pub isolation: Option<String>,
    /// The tag of a `vlan` network (administrators only).
    pub vlan_tag: Option<i64>,
    /// Dual stack with a random unique local /64.
    pub ipv6: bool,
    /// Dual stack with this /64 (implies `ipv6`).
    pub ipv6_cidr: Option<String>,
}

enum Isolation {
    Vxlan,
    Vlan(i64),
}

const NET_COLS: &str =
    "n.id, n.project_id, n.name, n.cidr, n.gateway, n.vni, n.vlan_tag, n.mtu, n.isolation, n.ipv6_cidr, n.created_at";
const LIVE_COUNT: &str = "(SELECT COUNT(*) FROM instances i WHERE i.network_id = n.id AND i.state <> 'terminated') AS live";

fn network_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<NetworkRow> {
    Ok(NetworkRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        cidr: r.try_get("cidr")?,
        gateway: r.try_get("gateway")?,
        vni: r.try_get("vni")?,
        vlan_tag: r.try_get("vlan_tag")?,
        mtu: r.try_get("mtu")?,
        isolation: r.try_get("isolation")?,
        ipv6_cidr: r.try_get("ipv6_cidr")?,
    })
}

fn view_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<NetworkView> {
    Ok(NetworkView {
        network: network_from_row(r)?,
        instances: u32::try_from(r.try_get::<i64, _>("live")?)
            .map_err(|_| StoreError::Corrupt("live"))?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

/// `a.b.c.d/len` with `len` in `prefix`, no host bits: (first address, prefix length).
fn parse_v4_cidr(cidr: &str, prefix: std::ops::RangeInclusive<u8>) -> Result<(u32, u8)> {
    let bad = || StoreError::Invalid(format!("{cidr:?} is not an IPv4 CIDR like 10.1.0.0/24"));
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !prefix.contains(&len) {
        return Err(StoreError::Invalid(format!(
            "the prefix length of {cidr} must be between {} and {}",
            prefix.start(),
            prefix.end()
        )));
    }
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        let net = Ipv4Addr::from(u32::from(addr) & mask);
        return Err(StoreError::Invalid(format!(
            "{cidr} has host bits set; did you mean {net}/{len}?"
        )));
    }
    Ok((u32::from(addr), len))
}

/// The addresses of a CIDR as an inclusive range.
fn span(base: u32, len: u8) -> (u32, u32) {
    let size = 1u64 << (32 - u32::from(len));
    (base, (u64::from(base) + size - 1) as u32)
}

/// Chunks of ids with their `$1, $2, …` placeholders (SQLite allows 32,766 per statement).
fn in_chunks(ids: &[String]) -> impl Iterator<Item = (&[String], String)> {
    ids.chunks(500).map(|c| {
        let marks: Vec<String> = (1..=c.len()).map(|i| format!("${i}")).collect();
        (c, marks.join(", "))
    })
}

impl Store {
    /// Create a network on behalf of the system (bootstrap, a project's default network): any
    /// prefix the placement pool takes, VXLAN with the overlay MTU.
    pub async fn create_network(
        &self,
        project_id: &str,
        name: &str,
        cidr: &str,
    ) -> Result<NetworkRow> {
        kumo_types::id::validate_name(name).map_err(StoreError::Invalid)?;
        let (net, len) = parse_cidr(cidr)?;
        self.insert_network(
            project_id,
            name,
            u32::from(net),
            len,
            Isolation::Vxlan,
            None,
        )
        .await
    }

    /// A tenant's network: checked name, CIDR (prefix 16–28) and isolation. VLAN networks
    /// need an administrator, who gives their tag.
    pub async fn create_tenant_network(
        &self,
        scope: &Scope,
        new: &NewNetwork,
    ) -> Result<NetworkRow> {
        kumo_types::id::validate_name(&new.name).map_err(StoreError::Invalid)?;
        let isolation = match (new.isolation.as_deref(), new.vlan_tag) {
            (None | Some("vxlan"), None) => Isolation::Vxlan,
            (Some("vxlan"), Some(_)) => {
                return Err(StoreError::Invalid(
                    "a vlan_tag is only for vlan networks, not vxlan ones".into(),
                ))
            }
            (None | Some("vlan"), Some(tag)) => Isolation::Vlan(tag),
            (Some("vlan"), None) => {
                return Err(StoreError::Invalid(
                    "a vlan network needs a vlan_tag (1-4094)".into(),
                ))
            }
            (Some(other), _) => {
                return Err(StoreError::Invalid(format!(
                    "isolation must be vxlan or vlan, not {other:?}"
                )))
            }
        };
        if let Isolation::Vlan(tag) = isolation {
            if !scope.admin {
                return Err(StoreError::Invalid(
                    "only administrators can create vlan networks (their tags are trunked on the hosts)"
                        .into(),
                ));
            }
            if !(1..=MAX_VLAN_TAG).contains(&tag) {
                return Err(StoreError::Invalid(format!(
                    "vlan_tag must be between 1 and {MAX_VLAN_TAG}, not {tag}"
                )));
            }
        }
        let (base, len) = parse_v4_cidr(&new.cidr, TENANT_PREFIX)?;
        let ipv6 = match (&new.ipv6_cidr, new.ipv6) {
            (Some(c), _) => Some(
                kumo_types::ipv6::parse_prefix64(c)
                    .map_err(|e| StoreError::Invalid(format!("ipv6_cidr: {e}")))?,
            ),
            (None, true) => Some(kumo_types::ipv6::random_ula()),
            (None, false) => None,
        };
        self.insert_network(&scope.project_id, &new.name, base, len, isolation, ipv6)
            .await
    }

    async fn insert_network(
        &self,
        project_id: &str,
        name: &str,
        base: u32,
        len: u8,
        isolation: Isolation,
        ipv6: Option<std::net::Ipv6Addr>,
    ) -> Result<NetworkRow> {
        let ipv6_cidr = ipv6.map(kumo_types::ipv6::prefix_text);
        let cidr = format!("{}/{len}", Ipv4Addr::from(base));
        let gateway = Ipv4Addr::from(base + 1).to_string();
        // Held so that two creates cannot both pass the overlap check.
        let _placement = self.placement().await?;
        let (lo, hi) = span(base, len);
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT name, cidr, ipv6_cidr FROM networks WHERE project_id = $1 AND deleted_at IS NULL ORDER BY name",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        for (other, other_cidr, other_v6) in rows {
            if other == name {
                return Err(StoreError::Conflict(format!(
                    "a network named {name} already exists"
                )));
            }
            // Two /64s overlap only when they are the same prefix.
            if let (Some(mine), Some(theirs)) = (&ipv6_cidr, &other_v6) {
                if mine == theirs {
                    return Err(StoreError::Conflict(format!(
                        "{mine} is the IPv6 prefix of network {other} of this project"
                    )));
                }
            }
            let (b, l) = parse_cidr(&other_cidr)?;
            let (olo, ohi) = span(u32::from(b), l);
            if lo <= ohi && olo <= hi {
                return Err(StoreError::Conflict(format!(
                    "{cidr} overlaps network {other} ({other_cidr}) of this project"
                )));
            }
        }
        let (mtu, tag) = match isolation {
            Isolation::Vxlan => (Some(VXLAN_MTU), None),
            Isolation::Vlan(tag) => (None, Some(tag)),
        };
        let kind = if tag.is_some() { "vlan" } else { "vxlan" };
        // The lowest free VNI; another controller may take it first: then try the next.
        for _ in 0..5 {
            let vni = match tag {
                Some(_) => None,
                None => Some(self.free_vni().await?),
            };
            let id = new_id(IdKind::Network);
            let done = sqlx::query(
                "INSERT INTO networks (id, project_id, name, cidr, gateway, created_at, isolation, vni, vlan_tag, mtu, ipv6_cidr)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(&id)
            .bind(project_id)
            .bind(name)
            .bind(&cidr)
            .bind(&gateway)
            .bind(now_str())
            .bind(kind)
            .bind(vni)
            .bind(tag)
            .bind(mtu)
            .bind(&ipv6_cidr)
            .execute(&self.pool)
            .await;
            match done {
                Ok(_) => return self.network(&id).await,
                Err(sqlx::Error::Database(d))
                    if d.is_unique_violation() && d.message().contains("vni") =>
                {
                    continue
                }
                Err(sqlx::Error::Database(d))
                    if d.is_unique_violation() && d.message().contains("vlan_tag") =>
                {
                    return Err(StoreError::Conflict(format!(
                        "vlan tag {} is used by another network",
                        tag.unwrap_or_default()
                    )))
                }
                Err(e) => {
                    return Err(unique_conflict(
                        e,
                        format!("a network named {name} already exists"),
                    ))
                }
            }
        }
        Err(StoreError::Conflict(
            "could not allocate a VNI: networks are being created concurrently; try again".into(),
        ))
    }

    /// The lowest VNI no network (deleted ones included) has.
    async fn free_vni(&self) -> Result<i64> {
        let (vni,): (i64,) = sqlx::query_as(
            "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM networks WHERE vni = 1) THEN 1
                    ELSE (SELECT MIN(a.vni) + 1 FROM networks a WHERE a.vni IS NOT NULL
                          AND NOT EXISTS (SELECT 1 FROM networks b WHERE b.vni = a.vni + 1)) END",
        )
        .fetch_one(&self.pool)
        .await?;
        if !(1..=MAX_VNI).contains(&vni) {
            return Err(StoreError::Conflict("every VXLAN VNI is in use".into()));
        }
        Ok(vni)
    }

    /// A network by id (deleted ones too), or a live one by name, of any project: for the
    /// controller's own use (desired state), never for a user's request.
    pub async fn network(&self, id_or_name: &str) -> Result<NetworkRow> {
        let r = sqlx::query(&format!(
            "SELECT {NET_COLS} FROM networks n WHERE n.id = $1 OR (n.name = $1 AND n.deleted_at IS NULL)
             ORDER BY n.id = $1 DESC, n.created_at LIMIT 1"
        ))
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "network",
            id: id_or_name.to_string(),
        })?;
        network_from_row(&r)
    }

    /// A live network by id (instances may only join live networks).
    pub(crate) async fn live_network(&self, id: &str) -> Result<NetworkRow> {
        let r = sqlx::query(&format!(
            "SELECT {NET_COLS} FROM networks n WHERE n.id = $1 AND n.deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "network",
            id: id.to_string(),
        })?;
        network_from_row(&r)
    }

    /// A live network of the scope's project by id or name (admins: any project's, their
    /// own first).
    pub async fn project_network(&self, scope: &Scope, id_or_name: &str) -> Result<NetworkView> {
        let r = sqlx::query(&format!(
            "SELECT {NET_COLS}, {LIVE_COUNT} FROM networks n
             WHERE (n.id = $1 OR n.name = $1) AND n.deleted_at IS NULL
               AND (CAST($2 AS TEXT) IS NULL OR n.project_id = $2)
             ORDER BY n.project_id = $3 DESC, n.created_at LIMIT 1"
        ))
        .bind(id_or_name)
        .bind(scope.filter())
        .bind(&scope.project_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "network",
            id: id_or_name.to_string(),
        })?;
        view_from_row(&r)
    }

    /// The scope's live networks (admins: every project's), by project and name.
    pub async fn networks(&self, scope: &Scope) -> Result<Vec<NetworkView>> {
        let rows = sqlx::query(&format!(
            "SELECT {NET_COLS}, {LIVE_COUNT} FROM networks n
             WHERE n.deleted_at IS NULL AND (CAST($1 AS TEXT) IS NULL OR n.project_id = $1)
             ORDER BY n.project_id, n.name"
        ))
        .bind(scope.filter())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(view_from_row).collect()
    }

    /// Networks by id, of any project (the agents' network policy).
    pub async fn networks_by_ids(&self, ids: &[String]) -> Result<Vec<NetworkRow>> {
        let mut out = Vec::with_capacity(ids.len());
        for (chunk, marks) in in_chunks(ids) {
            let sql =
                format!("SELECT {NET_COLS} FROM networks n WHERE n.id IN ({marks}) ORDER BY n.id");
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push(network_from_row(&r)?);
            }
        }
        Ok(out)
    }

    /// Ids of hosts running non-terminated instances of the network.
    pub async fn network_hosts(&self, network_id: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT host_id FROM instances
             WHERE network_id = $1 AND state <> 'terminated' AND host_id IS NOT NULL
             UNION
             SELECT m.dest_host FROM migrations m JOIN instances i ON i.id = m.instance_id
             WHERE i.network_id = $1 AND i.state <> 'terminated' AND m.step NOT IN ('done', 'failed')
             ORDER BY 1",
        )
        .bind(network_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The project's network named `name`, created on first need with the server's default
    /// CIDR (the one the admin project's network of that name was bootstrapped with).
    pub async fn default_network(&self, scope: &Scope, name: &str) -> Result<NetworkRow> {
        if let Some(n) = self.live_network_named(&scope.project_id, name).await? {
            return Ok(n);
        }
        let template: Option<(String,)> = sqlx::query_as(
            "SELECT n.cidr FROM networks n JOIN projects p ON p.id = n.project_id
             WHERE p.name = 'admin' AND n.name = $1 ORDER BY n.created_at LIMIT 1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some((cidr,)) = template else {
            return Err(StoreError::Invalid(format!(
                "the server has no {name} network to copy; name a network for the instance"
            )));
        };
        match self.create_network(&scope.project_id, name, &cidr).await {
            Ok(n) => Ok(n),
            Err(StoreError::Conflict(m)) => {
                // Another request created it first; anything else is the project's own doing.
                match self.live_network_named(&scope.project_id, name).await? {
                    Some(n) => Ok(n),
                    None => Err(StoreError::Conflict(format!(
                        "cannot create the project's {name} network ({cidr}): {m}; name a network for the instance"
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn live_network_named(&self, project_id: &str, name: &str) -> Result<Option<NetworkRow>> {
        let r = sqlx::query(&format!(
            "SELECT {NET_COLS} FROM networks n WHERE n.project_id = $1 AND n.name = $2 AND n.deleted_at IS NULL"
        ))
        .bind(project_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(network_from_row).transpose()
    }

    /// Delete a network no live instance uses. Its row stays (terminated instances name it);
    /// its name, CIDR and VLAN tag are free again, its VNI is not reused.
    pub async fn delete_network(&self, scope: &Scope, id_or_name: &str) -> Result<NetworkRow> {
        let n = self.project_network(scope, id_or_name).await?.network;
        // Held so that no create can join the network between the check and the delete.
        let mut placement = self.placement().await?;
        let done = sqlx::query(
            "UPDATE networks SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL AND NOT EXISTS
               (SELECT 1 FROM instances WHERE network_id = $1 AND state <> 'terminated')",
        )
        .bind(&n.id)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            let (live,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM instances WHERE network_id = $1 AND state <> 'terminated'",
            )
            .bind(&n.id)
            .fetch_one(&self.pool)
            .await?;
            return Err(StoreError::Conflict(format!(
                "network {} still has {live} live instance(s); terminate them first",
                n.name
            )));
        }
        placement.forget_network(&n.id);
        Ok(n)
    }
}

mod addresses;

pub use addresses::{check_address_pool, AddressPoolRow, AddressPoolUsage, AddressRow};

#[cfg(test)]
mod tests;
