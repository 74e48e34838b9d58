//! Instances and their networks. The controller is the only writer of an instance row;
//! agents' observations come in through [`Store::apply_observation`].

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use kumo_types::agent::ObservedPower;
use kumo_types::id::{new_id, IdKind};
use kumo_types::InstanceState;
use rand::Rng;
use sqlx::Row;

use crate::placement::{Claim, Placement};
use crate::{clamp_limit, now_str, parse_time, parse_time_opt, Result, Scope, Store, StoreError};

#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub image_id: String,
    pub instance_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub state: InstanceState,
    pub desired: String,
    pub reboot_seq: i64,
    pub host_id: Option<String>,
    pub network_id: String,
    pub mac: String,
    pub private_ip: String,
    pub generation: i64,
    pub observed_generation: i64,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub terminated_at: Option<DateTime<Utc>>,
    /// Base64 user data (EC2 `UserData`).
    pub user_data: Option<String>,
    /// The EC2 reservation (one per RunInstances call); `None` for instances created elsewhere.
    pub reservation_id: Option<String>,
    /// Position in its reservation (EC2 `amiLaunchIndex`).
    pub launch_index: u32,
    /// The EC2 `ClientToken` the instance was launched with.
    pub client_token: Option<String>,
    /// What the instance asked of placement, kept to place it again by the same rules.
    pub placement_group_id: Option<String>,
    pub requested_site: Option<String>,
    pub constraints: Vec<String>,
    /// Security group ids, in the instance's order.
    pub security_group_ids: Vec<String>,
    /// The key pair it was launched with.
    pub key_name: Option<String>,
    /// The elastic IP associated with it.
    pub public_ip: Option<String>,
    /// Its SLAAC address when its network is dual stack (EUI-64 of the MAC in the network's /64).
    pub ipv6: Option<String>,
    /// The snapshot its root disk was made from (a booted snapshot or a hot clone).
    pub root_snapshot_id: Option<String>,
    /// SMBIOS system UUID kept from an imported machine.
    pub smbios_uuid: Option<String>,
    /// Restarted on another host when its host fails.
    pub ha: bool,
    /// Failover order (0..=1000): higher first.
    pub ha_priority: u32,
}

/// Launch details the EC2 API records with a new instance; empty for the native API.
#[derive(Debug, Clone, Default)]
pub struct LaunchExtras {
    pub user_data: Option<String>,
    pub reservation_id: Option<String>,
    pub launch_index: u32,
    pub client_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewInstance {
    pub name: String,
    pub image_id: String,
    pub instance_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub network_id: String,
    pub extras: LaunchExtras,
    pub placement_group: Option<crate::PlacementGroupRow>,
    pub site: Option<String>,
    pub constraints: Vec<String>,
    /// Security group ids, in order (already resolved and checked to be the project's).
    pub security_group_ids: Vec<String>,
    /// A key pair name of the project (checked).
    pub key_name: Option<String>,
    /// Make the root disk from this snapshot (checked to be the project's) instead of the image.
    pub root_snapshot_id: Option<String>,
    /// Keep an imported machine's identity: its NIC's MAC (else a random one) and SMBIOS UUID.
    pub mac: Option<String>,
    pub smbios_uuid: Option<String>,
    /// HA failover on, and its priority (checked to be 0..=1000).
    pub ha: bool,
    pub ha_priority: u32,
}

pub use crate::networks::NetworkRow;

/// What an agent reported about one VM.
#[derive(Debug, Clone)]
pub struct Observation {
    pub generation: i64,
    pub power: ObservedPower,
    pub error: Option<String>,
}

pub(crate) const COLS: &str = "id, project_id, name, image_id, instance_type, vcpus, memory_mib, disk_gib, state, desired, reboot_seq, host_id, network_id, mac, private_ip, generation, observed_generation, last_error, created_at, updated_at, terminated_at, user_data, reservation_id, launch_index, client_token, placement_group_id, requested_site, constraints, key_name, root_snapshot_id, smbios_uuid, ha, ha_priority,
    (SELECT group_concat(group_id, ' ' ORDER BY position) FROM instance_security_groups WHERE instance_id = instances.id) AS security_group_ids,
    (SELECT public_ip FROM addresses WHERE instance_id = instances.id) AS public_ip,
    (SELECT ipv6_cidr FROM networks WHERE id = instances.network_id) AS network_ipv6";

pub(crate) fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<InstanceRow> {
    let state: String = r.try_get("state")?;
    Ok(InstanceRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        image_id: r.try_get("image_id")?,
        instance_type: r.try_get("instance_type")?,
        vcpus: r.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: r.try_get::<i64, _>("memory_mib")? as u64,
        disk_gib: r.try_get::<i64, _>("disk_gib")? as u64,
        state: InstanceState::parse(&state).ok_or(StoreError::Corrupt("state"))?,
        desired: r.try_get("desired")?,
        reboot_seq: r.try_get("reboot_seq")?,
        host_id: r.try_get("host_id")?,
        network_id: r.try_get("network_id")?,
        mac: r.try_get("mac")?,
        private_ip: r.try_get("private_ip")?,
        generation: r.try_get("generation")?,
        observed_generation: r.try_get("observed_generation")?,
        last_error: r.try_get("last_error")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_time(&r.try_get::<String, _>("updated_at")?)?,
        terminated_at: parse_time_opt(r.try_get::<Option<String>, _>("terminated_at")?.as_deref())?,
        user_data: r.try_get("user_data")?,
        reservation_id: r.try_get("reservation_id")?,
        launch_index: u32::try_from(r.try_get::<i64, _>("launch_index")?)
            .map_err(|_| StoreError::Corrupt("launch_index"))?,
        client_token: r.try_get("client_token")?,
        placement_group_id: r.try_get("placement_group_id")?,
        requested_site: r.try_get("requested_site")?,
        constraints: serde_json::from_str(&r.try_get::<String, _>("constraints")?)
            .map_err(|_| StoreError::Corrupt("constraints"))?,
        security_group_ids: r
            .try_get::<Option<String>, _>("security_group_ids")?
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        key_name: r.try_get("key_name")?,
        public_ip: r.try_get("public_ip")?,
        ipv6: kumo_types::ipv6::address_in(
            r.try_get::<Option<String>, _>("network_ipv6")?.as_deref(),
            &r.try_get::<String, _>("mac")?,
        )
        .map(|a| a.to_string()),
        root_snapshot_id: r.try_get("root_snapshot_id")?,
        smbios_uuid: r.try_get("smbios_uuid")?,
        ha: r.try_get::<i64, _>("ha")? != 0,
        ha_priority: u32::try_from(r.try_get::<i64, _>("ha_priority")?)
            .map_err(|_| StoreError::Corrupt("ha_priority"))?,
    })
}

/// Parse `a.b.c.d/len` into (network, prefix length).
pub fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let bad = || StoreError::Invalid(format!("{cidr:?} is not an IPv4 CIDR like 10.0.0.0/24"));
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=29).contains(&len) {
        return Err(StoreError::Invalid(format!(
            "prefix length of {cidr} must be between 8 and 29"
        )));
    }
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        return Err(StoreError::Invalid(format!("{cidr} has host bits set")));
    }
    Ok((addr, len))
}

/// A locally administered unicast MAC with 40 random bits: at 100,000 instances a collision
/// is about 1 in 200 (QEMU's 52:54:00 prefix leaves 24 bits: ~300 collisions).
fn random_mac() -> String {
    let b: [u8; 5] = rand::thread_rng().gen();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

impl Store {
    /// Place and record a new instance in one step: `place` chooses a host (an index into
    /// the placement's hosts), and the reservation is written before anyone else can place.
    pub async fn create_instance(
        &self,
        scope: &Scope,
        new: &NewInstance,
        place: impl FnMut(&Placement, &NewInstance) -> std::result::Result<usize, String>,
    ) -> Result<InstanceRow> {
        let mut rows = self
            .create_instances(scope, std::slice::from_ref(new), 1, place)
            .await?;
        rows.pop().ok_or(StoreError::Corrupt("instances"))
    }

    /// Place and record several instances in one transaction: as many as fit, at least `min`
    /// (EC2's MinCount), or none. Each placement sees the ones before it.
    pub async fn create_instances(
        &self,
        scope: &Scope,
        news: &[NewInstance],
        min: usize,
        mut place: impl FnMut(&Placement, &NewInstance) -> std::result::Result<usize, String>,
    ) -> Result<Vec<InstanceRow>> {
        let mut names = HashSet::new();
        for n in news {
            kumo_types::id::validate_name(&n.name).map_err(StoreError::Invalid)?;
            crate::leases::check_ha_priority(n.ha_priority)?;
            if !names.insert(n.name.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "the name {} is given twice",
                    n.name
                )));
            }
        }
        // Networks are read under the lock: a network being deleted cannot gain an instance.
        let mut placement = self.placement().await?;
        let mut networks: HashMap<String, NetworkRow> = HashMap::new();
        for n in news {
            if !networks.contains_key(&n.network_id) {
                let net = self.live_network(&n.network_id).await?;
                if net.project_id != scope.project_id {
                    return Err(StoreError::Invalid(format!(
                        "network {} is not a network of this project",
                        net.id
                    )));
                }
                networks.insert(n.network_id.clone(), net);
            }
        }
        self.check_names_free(scope, news).await?;
        // Checked under the lock: a snapshot being deleted cannot gain an instance.
        for n in news {
            if let Some(snap) = &n.root_snapshot_id {
                let s = self.snapshot(scope, snap).await?;
                if s.state != "completed" {
                    return Err(StoreError::Invalid(format!(
                        "snapshot {} is {}, not completed",
                        s.id, s.state
                    )));
                }
            }
        }
        // Decide every placement in memory first; undo them all if the batch fails.
        let mut claims: Vec<Claim> = Vec::with_capacity(news.len());
        let mut failure = None;
        // Root disks this batch adds to each storage pool so far.
        let mut pending: HashMap<String, u64> = HashMap::new();
        for n in news {
            let net = &networks[&n.network_id];
            let (host, reports_disk) = match place(&placement, n) {
                Ok(i) => (
                    placement.hosts()[i].id.clone(),
                    placement.hosts()[i].disk_gib > 0,
                ),
                Err(reason) => {
                    failure = Some(StoreError::NoCapacity(reason));
                    break;
                }
            };
            // The pool's own limit (a shared pool is one capacity for all its hosts; volumes
            // count too); hosts that report no storage (simulated ones) have none.
            if reports_disk {
                let domain = crate::Store::domain_of(&self.host(&host).await?);
                let key = format!(
                    "{}@{}",
                    domain.pool,
                    domain.host_id.clone().unwrap_or_default()
                );
                let bytes = n.disk_gib.saturating_mul(crate::GIB);
                let before = pending.get(&key).copied().unwrap_or(0);
                if let Err(e) = self.check_room(&domain, before.saturating_add(bytes)).await {
                    failure = Some(e);
                    break;
                }
                pending.insert(key, before.saturating_add(bytes));
            }
            let ip = match placement.take_ip(self, net).await {
                Ok(ip) => ip,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let c = Claim {
                host_id: host,
                vcpus: n.vcpus,
                memory_mib: n.memory_mib,
                disk_gib: n.disk_gib,
                group_id: n.placement_group.as_ref().map(|g| g.id.clone()),
                network_id: net.id.clone(),
                ip: None,
            };
            placement.apply(&c, 1);
            claims.push(Claim { ip: Some(ip), ..c });
        }
        let undo = |placement: &mut Placement, claims: &[Claim]| {
            for c in claims {
                placement.apply(c, -1);
            }
        };
        if let Some(e) = failure {
            if claims.len() < min.max(1) {
                undo(&mut placement, &claims);
                return Err(e);
            }
        }
        let mut last = None;
        for _ in 0..3 {
            match self
                .insert_instances(scope, &news[..claims.len()], &claims)
                .await
            {
                Ok(rows) => return Ok(rows),
                // A MAC collision (or a name taken by a writer outside placement): try again.
                Err(StoreError::Db(sqlx::Error::Database(d))) if d.is_unique_violation() => {
                    last = Some(d.message().to_string());
                }
                Err(e) => {
                    undo(&mut placement, &claims);
                    return Err(e);
                }
            }
        }
        undo(&mut placement, &claims);
        Err(StoreError::Conflict(format!(
            "could not record the instances: {}",
            last.unwrap_or_default()
        )))
    }

    async fn check_names_free(&self, scope: &Scope, news: &[NewInstance]) -> Result<()> {
        for chunk in news.chunks(100) {
            let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "SELECT name, id FROM instances WHERE project_id = $1 AND state <> 'terminated' AND name IN ({})",
                marks.join(", ")
            );
            let mut q = sqlx::query_as::<_, (String, String)>(&sql).bind(&scope.project_id);
            for n in chunk {
                q = q.bind(&n.name);
            }
            if let Some((name, other)) = q.fetch_optional(&self.pool).await? {
                return Err(StoreError::Conflict(format!(
                    "an instance named {name} already exists ({other})"
                )));
            }
        }
        Ok(())
    }

    async fn insert_instances(
        &self,
        scope: &Scope,
        news: &[NewInstance],
        claims: &[Claim],
    ) -> Result<Vec<InstanceRow>> {
        let now = now_str();
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(news.len());
        for (new, c) in news.iter().zip(claims) {
            let constraints = serde_json::to_string(&new.constraints)
                .map_err(|_| StoreError::Corrupt("constraints"))?;
            let row = sqlx::query(&format!(
                "INSERT INTO instances (id, project_id, name, image_id, instance_type, vcpus, memory_mib, disk_gib, state, desired, reboot_seq, host_id, network_id, mac, private_ip, generation, observed_generation, created_at, updated_at,
                     user_data, reservation_id, launch_index, client_token, placement_group_id, requested_site, constraints, key_name, public_key, root_snapshot_id, smbios_uuid, ha, ha_priority)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', 'running', 0, $9, $10, $11, $12, 1, 0, $13, $13, $14, $15, $16, $17, $18, $19, $20,
                     $21, (SELECT public_key FROM key_pairs WHERE project_id = $2 AND name = $21), $22, $23, $24, $25)
                 RETURNING {COLS}"
            ))
            .bind(new_id(IdKind::Instance))
            .bind(&scope.project_id)
            .bind(&new.name)
            .bind(&new.image_id)
            .bind(&new.instance_type)
            .bind(i64::from(new.vcpus))
            .bind(new.memory_mib as i64)
            .bind(new.disk_gib as i64)
            .bind(&c.host_id)
            .bind(&c.network_id)
            .bind(new.mac.clone().unwrap_or_else(random_mac))
            .bind(c.ip.map(|ip| ip.to_string()).unwrap_or_default())
            .bind(&now)
            .bind(&new.extras.user_data)
            .bind(&new.extras.reservation_id)
            .bind(i64::from(new.extras.launch_index))
            .bind(&new.extras.client_token)
            .bind(new.placement_group.as_ref().map(|g| &g.id))
            .bind(&new.site)
            .bind(constraints)
            .bind(&new.key_name)
            .bind(&new.root_snapshot_id)
            .bind(&new.smbios_uuid)
            .bind(i64::from(new.ha))
            .bind(i64::from(new.ha_priority))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                crate::auth::unique_conflict(
                    e,
                    format!(
                        "another live instance already has MAC {} or UUID {}",
                        new.mac.as_deref().unwrap_or("(random)"),
                        new.smbios_uuid.as_deref().unwrap_or("(none)")
                    ),
                )
            })?;
            let mut row = from_row(&row)?;
            row.security_group_ids = crate::security::record_launch(
                &mut tx,
                &row.id,
                &new.security_group_ids,
                new.key_name.as_deref(),
            )
            .await?;
            out.push(row);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// An instance by id, or by name among the scope's live instances.
    pub async fn instance(&self, scope: &Scope, id_or_name: &str) -> Result<InstanceRow> {
        // By id, then by live name: two index lookups (an OR of both scans the table).
        let mut row = sqlx::query(&format!(
            "SELECT {COLS} FROM instances WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR project_id = $2)"
        ))
        .bind(id_or_name)
        .bind(scope.filter())
        .fetch_optional(&self.pool)
        .await?;
        if row.is_none() {
            row = sqlx::query(&format!(
                "SELECT {COLS} FROM instances WHERE name = $1 AND state <> 'terminated'
                 AND (CAST($2 AS TEXT) IS NULL OR project_id = $2) ORDER BY created_at DESC LIMIT 1"
            ))
            .bind(id_or_name)
            .bind(scope.filter())
            .fetch_optional(&self.pool)
            .await?;
        }
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "instance",
                id: id_or_name.to_string(),
            }),
        }
    }

    pub async fn instances(
        &self,
        scope: &Scope,
        limit: Option<u32>,
        cursor: Option<&str>,
        name: Option<&str>,
    ) -> Result<(Vec<InstanceRow>, Option<String>)> {
        let limit = clamp_limit(limit);
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM instances WHERE (CAST($1 AS TEXT) IS NULL OR project_id = $1)
             AND id > $2 AND (CAST($3 AS TEXT) IS NULL OR name = $3)
             ORDER BY id LIMIT $4"
        ))
        .bind(scope.filter())
        .bind(cursor.unwrap_or(""))
        .bind(name)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(from_row).collect::<Result<Vec<_>>>()?;
        Ok(crate::page(items, limit, |i| i.id.clone()))
    }

    /// Change what the controller wants of an instance. `change` gets the current row and
    /// returns the new (state, desired, reboot_seq, vcpus, memory, disk, type) or an error that
    /// explains why the request does not fit the current state. Guarded by the generation, so
    /// concurrent requests cannot both apply.
    pub async fn update_instance(
        &self,
        scope: &Scope,
        id_or_name: &str,
        change: impl Fn(&InstanceRow) -> std::result::Result<Option<InstanceRow>, String>,
    ) -> Result<InstanceRow> {
        // Sizes and terminations change what hosts have free: held with the write.
        let mut placement = self.placement().await?;
        for _ in 0..10 {
            let cur = self.instance(scope, id_or_name).await?;
            let next = match change(&cur) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(cur),
                Err(msg) => return Err(StoreError::Conflict(msg)),
            };
            if !cur.state.valid_transition(next.state) {
                return Err(StoreError::Conflict(format!(
                    "instance {} cannot go from {} to {}",
                    cur.id, cur.state, next.state
                )));
            }
            let terminated_at = (next.state == InstanceState::Terminated).then(now_str);
            let done = sqlx::query(
                "UPDATE instances SET state = $3, desired = $4, reboot_seq = $5, vcpus = $6, memory_mib = $7,
                     disk_gib = $8, instance_type = $9, generation = generation + 1, updated_at = $10,
                     terminated_at = COALESCE($11, terminated_at), last_error = NULL
                 WHERE id = $1 AND generation = $2",
            )
            .bind(&cur.id)
            .bind(cur.generation)
            .bind(next.state.as_str())
            .bind(&next.desired)
            .bind(next.reboot_seq)
            .bind(i64::from(next.vcpus))
            .bind(next.memory_mib as i64)
            .bind(next.disk_gib as i64)
            .bind(&next.instance_type)
            .bind(now_str())
            .bind(terminated_at)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                if next.desired == "terminated" {
                    // A terminating instance loses its elastic IP (the allocation stays).
                    self.disassociate_instance(&cur.id).await?;
                }
                let after = self.instance(&Scope::system(), &cur.id).await?;
                if let (Some(old), Some(new)) = (Claim::of(&cur), Claim::of(&after)) {
                    if old.vcpus != new.vcpus
                        || old.memory_mib != new.memory_mib
                        || old.disk_gib != new.disk_gib
                        || after.state == InstanceState::Terminated
                    {
                        placement.apply(&old, -1);
                        if after.state != InstanceState::Terminated {
                            placement.apply(&new, 1);
                        }
                    }
                }
                return Ok(after);
            }
        }
        Err(StoreError::Conflict(format!(
            "instance {id_or_name} is being changed concurrently; try again"
        )))
    }

    /// Instances whose desired state a host has not applied yet.
    pub async fn instances_to_push(&self, limit: i64) -> Result<Vec<InstanceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM instances WHERE state <> 'terminated' AND generation > observed_generation
             ORDER BY updated_at LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Live instances placed on a host.
    pub async fn instances_on_host(&self, host_id: &str) -> Result<Vec<InstanceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM instances WHERE host_id = $1 AND state <> 'terminated'"
        ))
        .bind(host_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Fold an agent's report into the record. Returns the new state when it changed.
    pub async fn apply_observation(
        &self,
        row: &InstanceRow,
        obs: &Observation,
    ) -> Result<Option<InstanceState>> {
        if obs.generation < row.generation {
            // The host has not applied the latest spec: its report says nothing about it.
            return Ok(None);
        }
        use InstanceState::*;
        let (state, desired) = match (row.desired.as_str(), obs.power) {
            ("terminated", _) => (ShuttingDown, "terminated"),
            ("running", ObservedPower::Running) => (Running, "running"),
            ("running", ObservedPower::Starting | ObservedPower::Failed) => (Pending, "running"),
            // The guest powered itself off: like EC2, the instance is now stopped.
            ("running", ObservedPower::Stopped | ObservedPower::Stopping) => {
                if row.state == Running {
                    (Stopped, "stopped")
                } else {
                    (Pending, "running")
                }
            }
            ("stopped", ObservedPower::Stopped | ObservedPower::Failed) => (Stopped, "stopped"),
            ("stopped", _) => (Stopping, "stopped"),
            _ => return Ok(None),
        };
        let state = if row.state.valid_transition(state) {
            state
        } else {
            row.state
        };
        let error = if obs.power == ObservedPower::Failed {
            obs.error.clone()
        } else {
            None
        };
        if state == row.state
            && desired == row.desired
            && obs.generation == row.observed_generation
            && error == row.last_error
        {
            // Heartbeats repeat what is already recorded: write nothing.
            return Ok(None);
        }
        let bump = i64::from(desired != row.desired);
        sqlx::query(
            "UPDATE instances SET state = $3, desired = $4, observed_generation = $5, last_error = $6,
                 generation = generation + $7, updated_at = $8
             WHERE id = $1 AND generation = $2",
        )
        .bind(&row.id)
        .bind(row.generation)
        .bind(state.as_str())
        .bind(desired)
        .bind(obs.generation)
        .bind(&error)
        .bind(bump)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        Ok((state != row.state).then_some(state))
    }

    /// The host no longer has this VM: a terminating instance is now terminated; any other
    /// live instance must be pushed again.
    pub async fn instance_absent_on_host(&self, row: &InstanceRow) -> Result<bool> {
        if row.desired == "terminated" {
            let mut placement = self.placement().await?;
            let done = sqlx::query(
                "UPDATE instances SET state = 'terminated', terminated_at = $3, updated_at = $3, observed_generation = generation
                 WHERE id = $1 AND generation = $2",
            )
            .bind(&row.id)
            .bind(row.generation)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                self.disassociate_instance(&row.id).await?;
                self.release_instance_volumes(&row.id).await?;
                match Claim::of(row) {
                    Some(c) => placement.apply(&c, -1),
                    // Never placed: only its address was taken.
                    None => {
                        if let Ok(ip) = row.private_ip.parse() {
                            placement.give_ip(&row.network_id, ip);
                        }
                    }
                }
            }
            Ok(done.rows_affected() == 1)
        } else {
            if row.observed_generation > 0 {
                sqlx::query("UPDATE instances SET observed_generation = 0 WHERE id = $1 AND generation = $2")
                    .bind(&row.id)
                    .bind(row.generation)
                    .execute(&self.pool)
                    .await?;
            }
            Ok(false)
        }
    }

    /// Record why the last push to the instance's host failed; shown as `last_error`.
    pub async fn record_push_error(&self, id: &str, error: &str) -> Result<()> {
        sqlx::query("UPDATE instances SET last_error = $2 WHERE id = $1")
            .bind(id)
            .bind(error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Is this id a live instance of this host? Used to find orphans the host must delete.
    pub async fn live_instance_ids(&self, host_id: &str) -> Result<HashSet<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM instances WHERE host_id = $1 AND state <> 'terminated'")
                .bind(host_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    pub async fn instance_type(&self, name: &str) -> Result<kumo_types::api::InstanceType> {
        let r = sqlx::query(
            "SELECT name, vcpus, memory_mib, disk_gib FROM instance_types WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "instance type",
            id: name.to_string(),
        })?;
        type_from_row(&r)
    }

    pub async fn instance_types(&self) -> Result<Vec<kumo_types::api::InstanceType>> {
        let rows = sqlx::query("SELECT name, vcpus, memory_mib, disk_gib FROM instance_types ORDER BY memory_mib, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(type_from_row).collect()
    }
}

fn type_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<kumo_types::api::InstanceType> {
    Ok(kumo_types::api::InstanceType {
        name: r.try_get("name")?,
        vcpus: r.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: r.try_get::<i64, _>("memory_mib")? as u64,
        disk_gib: r.try_get::<i64, _>("disk_gib")? as u64,
    })
}
