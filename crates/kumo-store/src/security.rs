//! Security groups, their rules, instance memberships, and key pairs.
//!
//! Every project has a group named `default` (members reach each other, all outbound
//! allowed), made the first time it is needed. Rules are checked and normalised here, so
//! every front end refuses the same bad input with the same message and changes nothing.

mod keys;
mod policy;

use std::collections::HashSet;
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, validate_name, IdKind};
use kumo_types::InstanceState;
use sqlx::{Row, Sqlite, Transaction};

use crate::auth::unique_conflict;
use crate::{now_str, parse_time, InstanceRow, Result, Scope, Store, StoreError};

pub use keys::{parse_public_key, KeyPairRow, PublicKey};

/// The group every project has.
pub const DEFAULT_GROUP: &str = "default";
/// Security groups one instance may be in (as EC2's default quota).
pub const MAX_GROUPS_PER_INSTANCE: usize = 5;
/// Rules one group may hold, both directions together.
const MAX_RULES_PER_GROUP: usize = 200;

#[derive(Debug, Clone)]
pub struct SecurityGroupRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

/// A stored rule: `protocol` is tcp, udp, icmp or all; ports only for tcp and udp; exactly
/// one of `cidr` and `source_group_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgRuleRow {
    pub id: String,
    pub group_id: String,
    pub direction: String,
    pub protocol: String,
    pub from_port: Option<i64>,
    pub to_port: Option<i64>,
    pub cidr: Option<String>,
    pub source_group_id: Option<String>,
    pub description: Option<String>,
}

/// A rule as a caller asks for it. Protocols may be names or EC2's numbers (`-1` for all);
/// tcp/udp without ports mean every port, one port alone means that port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSgRule {
    /// `ingress` or `egress`.
    pub direction: String,
    pub protocol: String,
    pub from_port: Option<i64>,
    pub to_port: Option<i64>,
    pub cidr: Option<String>,
    /// A group (id or name) of the same project.
    pub source_group: Option<String>,
    pub description: Option<String>,
}

const GROUP_COLS: &str = "id, project_id, name, description, created_at";
pub(crate) const RULE_COLS: &str =
    "id, group_id, direction, protocol, from_port, to_port, cidr, source_group_id, description";

fn group_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<SecurityGroupRow> {
    Ok(SecurityGroupRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

pub(crate) fn rule_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<SgRuleRow> {
    Ok(SgRuleRow {
        id: r.try_get("id")?,
        group_id: r.try_get("group_id")?,
        direction: r.try_get("direction")?,
        protocol: r.try_get("protocol")?,
        from_port: r.try_get("from_port")?,
        to_port: r.try_get("to_port")?,
        cidr: r.try_get("cidr")?,
        source_group_id: r.try_get("source_group_id")?,
        description: r.try_get("description")?,
    })
}

/// `$start, $start+1, …` for an `IN (…)` list of `n` values.
pub(crate) fn marks(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn invalid(msg: impl Into<String>) -> StoreError {
    StoreError::Invalid(msg.into())
}

/// tcp, udp, icmp, icmpv6 or all, from a name or EC2's protocol number (`-1` is all). As in EC2,
/// `icmp` is IPv4's only; IPv6 ping needs an `icmpv6` (58) rule.
pub fn normalize_protocol(p: &str) -> Result<&'static str> {
    match p.trim().to_ascii_lowercase().as_str() {
        "tcp" | "6" => Ok("tcp"),
        "udp" | "17" => Ok("udp"),
        "icmp" | "1" => Ok("icmp"),
        "icmpv6" | "58" => Ok("icmpv6"),
        "all" | "-1" => Ok("all"),
        other => Err(invalid(format!(
            "protocol {other:?} is not supported; use tcp, udp, icmp, icmpv6 or all (-1)"
        ))),
    }
}

/// The stored port range of a protocol: tcp/udp always have one, icmp/all none.
fn check_ports(
    protocol: &str,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<(Option<i64>, Option<i64>)> {
    if protocol == "icmp" || protocol == "icmpv6" || protocol == "all" {
        if from.unwrap_or(-1) != -1 || to.unwrap_or(-1) != -1 {
            return Err(invalid(format!(
                "{protocol} rules match all traffic of the protocol: give no ports (or -1)"
            )));
        }
        return Ok((None, None));
    }
    let (from, to) = match (from, to) {
        (None, None) => (0, 65535),
        (Some(a), None) | (None, Some(a)) => (a, a),
        (Some(a), Some(b)) => (a, b),
    };
    for p in [from, to] {
        if !(0..=65535).contains(&p) {
            return Err(invalid(format!(
                "{protocol} ports must be between 0 and 65535 (got {p})"
            )));
        }
    }
    if from > to {
        return Err(invalid(format!(
            "the port range {from}-{to} is empty: the first port must not be above the last"
        )));
    }
    Ok((Some(from), Some(to)))
}

/// An IPv4 or IPv6 CIDR with no host bits (`10.0.0.5/24` is refused: which one was meant?).
pub fn check_cidr(cidr: &str) -> Result<String> {
    let bad = || {
        invalid(format!(
            "{cidr:?} is not an IPv4 CIDR (such as 10.0.0.0/24 or 0.0.0.0/0) or IPv6 CIDR (fd60:1::/64, ::/0)"
        ))
    };
    let (addr, len) = cidr.trim().split_once('/').ok_or_else(bad)?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if let Ok(v6) = addr.parse::<std::net::Ipv6Addr>() {
        let len: u32 = len.parse().map_err(|_| bad())?;
        if len > 128 {
            return Err(bad());
        }
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        let net = std::net::Ipv6Addr::from(u128::from(v6) & mask);
        if net != v6 {
            return Err(invalid(format!(
                "{cidr} has host bits set; the network is {net}/{len}"
            )));
        }
        return Ok(format!("{net}/{len}"));
    }
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u32 = len.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let net = Ipv4Addr::from(u32::from(addr) & mask);
    if net != addr {
        return Err(invalid(format!(
            "{cidr} has host bits set; the network is {net}/{len}"
        )));
    }
    Ok(format!("{net}/{len}"))
}

fn check_description(what: &str, d: &str) -> Result<()> {
    if d.chars().count() > 255 || d.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} must be at most 255 characters without control characters"
        )));
    }
    Ok(())
}

/// A readable form of a rule, for messages.
pub fn describe_rule(r: &SgRuleRow, source_name: Option<&str>) -> String {
    let ports = match (r.from_port, r.to_port) {
        (Some(a), Some(b)) if a == b => format!(" port {a}"),
        (Some(0), Some(65535)) => " all ports".to_string(),
        (Some(a), Some(b)) => format!(" ports {a}-{b}"),
        _ => String::new(),
    };
    let peer = match (&r.cidr, &r.source_group_id) {
        (Some(c), _) => c.clone(),
        (None, Some(g)) => format!("group {}", source_name.unwrap_or(g)),
        (None, None) => "-".into(),
    };
    let dir = if r.direction == "egress" {
        "to"
    } else {
        "from"
    };
    format!("{} {}{ports} {dir} {peer}", r.direction, r.protocol)
}

/// Record a new instance's groups (in order, each of the instance's project) and check that
/// its key pair was found; inside the create's transaction.
pub(crate) async fn record_launch(
    tx: &mut Transaction<'_, Sqlite>,
    instance_id: &str,
    group_ids: &[String],
    key_name: Option<&str>,
) -> Result<Vec<String>> {
    if group_ids.len() > MAX_GROUPS_PER_INSTANCE {
        return Err(invalid(format!(
            "an instance can be in at most {MAX_GROUPS_PER_INSTANCE} security groups (got {})",
            group_ids.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(group_ids.len());
    for g in group_ids {
        if !seen.insert(g.as_str()) {
            continue;
        }
        insert_membership(tx, instance_id, g, out.len()).await?;
        out.push(g.clone());
    }
    if let Some(k) = key_name {
        let (found,): (i64,) =
            sqlx::query_as("SELECT public_key IS NOT NULL FROM instances WHERE id = $1")
                .bind(instance_id)
                .fetch_one(&mut **tx)
                .await?;
        if found == 0 {
            return Err(StoreError::NotFound {
                kind: "key pair",
                id: k.to_string(),
            });
        }
    }
    Ok(out)
}

/// One membership, only if the group is of the instance's project.
async fn insert_membership(
    tx: &mut Transaction<'_, Sqlite>,
    instance_id: &str,
    group_id: &str,
    position: usize,
) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO instance_security_groups (instance_id, group_id, position)
         SELECT $1, g.id, $3 FROM security_groups g
         WHERE g.id = $2 AND g.project_id = (SELECT project_id FROM instances WHERE id = $1)",
    )
    .bind(instance_id)
    .bind(group_id)
    .bind(position as i64)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(StoreError::NotFound {
            kind: "security group",
            id: group_id.to_string(),
        });
    }
    Ok(())
}

/// A rule after checks, ready to store or compare.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Checked {
    direction: String,
    protocol: String,
    from_port: Option<i64>,
    to_port: Option<i64>,
    cidr: Option<String>,
    source_group_id: Option<String>,
    description: Option<String>,
}

impl Checked {
    fn same(&self, r: &SgRuleRow) -> bool {
        self.direction == r.direction
            && self.protocol == r.protocol
            && self.from_port == r.from_port
            && self.to_port == r.to_port
            && self.cidr == r.cidr
            && self.source_group_id == r.source_group_id
    }

    fn row(&self, id: String, group_id: &str) -> SgRuleRow {
        SgRuleRow {
            id,
            group_id: group_id.to_string(),
            direction: self.direction.clone(),
            protocol: self.protocol.clone(),
            from_port: self.from_port,
            to_port: self.to_port,
            cidr: self.cidr.clone(),
            source_group_id: self.source_group_id.clone(),
            description: self.description.clone(),
        }
    }
}

impl Store {
    pub async fn create_security_group(
        &self,
        scope: &Scope,
        name: &str,
        description: &str,
    ) -> Result<SecurityGroupRow> {
        validate_name(name).map_err(StoreError::Invalid)?;
        if name == DEFAULT_GROUP {
            return Err(invalid(
                "the name default is reserved: every project already has a default group",
            ));
        }
        if name.starts_with("sg-") {
            return Err(invalid(format!(
                "security group names may not start with sg- (got {name}): they would read as ids"
            )));
        }
        check_description("a security group's description", description)?;
        let id = new_id(IdKind::SecurityGroup);
        sqlx::query(
            "INSERT INTO security_groups (id, project_id, name, description, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(&scope.project_id)
        .bind(name)
        .bind(description)
        .bind(now_str())
        .execute(&self.pool)
        .await
        .map_err(|e| unique_conflict(e, format!("a security group named {name} already exists")))?;
        self.security_group(scope, &id).await
    }

    /// The project's `default` group, made with its rules on first use.
    pub async fn default_security_group(&self, scope: &Scope) -> Result<SecurityGroupRow> {
        if scope.project_id.is_empty() {
            return Err(invalid("the default security group belongs to a project"));
        }
        let own = Scope {
            admin: false,
            ..scope.clone()
        };
        match self.security_group(&own, DEFAULT_GROUP).await {
            Err(StoreError::NotFound { .. }) => {}
            other => return other,
        }
        let id = new_id(IdKind::SecurityGroup);
        let now = now_str();
        let mut tx = self.pool.begin().await?;
        let made = sqlx::query(
            "INSERT INTO security_groups (id, project_id, name, description, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project_id, name) DO NOTHING",
        )
        .bind(&id)
        .bind(&scope.project_id)
        .bind(DEFAULT_GROUP)
        .bind("members reach each other; all outbound traffic allowed")
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        if made.rows_affected() == 1 {
            for (direction, cidr, source) in [
                ("ingress", None, Some(id.as_str())),
                ("egress", Some("0.0.0.0/0"), None),
                ("egress", Some("::/0"), None),
            ] {
                sqlx::query(
                    "INSERT INTO security_group_rules (id, group_id, direction, protocol, cidr, source_group_id, seq, created_at)
                     VALUES ($1, $2, $3, 'all', $4, $5, (SELECT COUNT(*) FROM security_group_rules WHERE group_id = $2), $6)",
                )
                .bind(new_id(IdKind::SecurityGroupRule))
                .bind(&id)
                .bind(direction)
                .bind(cidr)
                .bind(source)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        self.security_group(&own, DEFAULT_GROUP).await
    }

    /// A group of the scope's project by id or name.
    pub async fn security_group(
        &self,
        scope: &Scope,
        id_or_name: &str,
    ) -> Result<SecurityGroupRow> {
        let row = sqlx::query(&format!(
            "SELECT {GROUP_COLS} FROM security_groups
             WHERE (id = $1 OR name = $1) AND (CAST($2 AS TEXT) IS NULL OR project_id = $2)
             ORDER BY project_id = $3 DESC, id = $1 DESC LIMIT 1"
        ))
        .bind(id_or_name)
        .bind(scope.filter())
        .bind(&scope.project_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => group_from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "security group",
                id: id_or_name.to_string(),
            }),
        }
    }

    /// The scope's groups by name (admins: every project's), the default one included.
    pub async fn security_groups(&self, scope: &Scope) -> Result<Vec<SecurityGroupRow>> {
        if !scope.project_id.is_empty() {
            self.default_security_group(scope).await?;
        }
        let rows = sqlx::query(&format!(
            "SELECT {GROUP_COLS} FROM security_groups
             WHERE CAST($1 AS TEXT) IS NULL OR project_id = $1 ORDER BY name, project_id"
        ))
        .bind(scope.filter())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(group_from_row).collect()
    }

    /// Delete a group no live instance is in and no other group's rule names as a source.
    pub async fn delete_security_group(&self, scope: &Scope, id_or_name: &str) -> Result<()> {
        let g = self.security_group(scope, id_or_name).await?;
        if g.name == DEFAULT_GROUP {
            return Err(StoreError::Conflict(format!(
                "the default security group of a project cannot be deleted ({})",
                g.id
            )));
        }
        // One statement: an instance joining or a rule naming the group in between is seen.
        let done = sqlx::query(
            "DELETE FROM security_groups WHERE id = $1
             AND NOT EXISTS (SELECT 1 FROM instance_security_groups m JOIN instances i ON i.id = m.instance_id
                             WHERE m.group_id = $1 AND i.state <> 'terminated')
             AND NOT EXISTS (SELECT 1 FROM security_group_rules r WHERE r.source_group_id = $1 AND r.group_id <> $1)",
        )
        .bind(&g.id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let users: Vec<(String,)> = sqlx::query_as(
            "SELECT i.id FROM instance_security_groups m JOIN instances i ON i.id = m.instance_id
             WHERE m.group_id = $1 AND i.state <> 'terminated' ORDER BY i.id LIMIT 5",
        )
        .bind(&g.id)
        .fetch_all(&self.pool)
        .await?;
        if !users.is_empty() {
            let ids: Vec<String> = users.into_iter().map(|u| u.0).collect();
            return Err(StoreError::Conflict(format!(
                "security group {} ({}) is used by instance(s) {}; terminate them or change their groups first",
                g.name,
                g.id,
                ids.join(", ")
            )));
        }
        let refs: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT g.name FROM security_group_rules r JOIN security_groups g ON g.id = r.group_id
             WHERE r.source_group_id = $1 AND r.group_id <> $1 ORDER BY g.name",
        )
        .bind(&g.id)
        .fetch_all(&self.pool)
        .await?;
        let names: Vec<String> = refs.into_iter().map(|r| r.0).collect();
        Err(StoreError::Conflict(format!(
            "security group {} ({}) is the source of rules in group(s) {}; revoke those rules first",
            g.name,
            g.id,
            names.join(", ")
        )))
    }

    /// Check a rule of `group`; a source group must be of the group's project.
    async fn check_rule(&self, group: &SecurityGroupRow, r: &NewSgRule) -> Result<Checked> {
        let direction = r.direction.trim().to_ascii_lowercase();
        if direction != "ingress" && direction != "egress" {
            return Err(invalid(format!(
                "direction must be ingress or egress, not {:?}",
                r.direction
            )));
        }
        let protocol = normalize_protocol(&r.protocol)?;
        let (from_port, to_port) = check_ports(protocol, r.from_port, r.to_port)?;
        if let Some(d) = &r.description {
            check_description("a rule's description", d)?;
        }
        let (cidr, source_group_id) = match (&r.cidr, &r.source_group) {
            (Some(c), None) => (Some(check_cidr(c)?), None),
            (None, Some(s)) => {
                // Another project's group is not found, exactly like one that never existed.
                let own = Scope {
                    project_id: group.project_id.clone(),
                    user_id: String::new(),
                    admin: false,
                };
                let g = if s == DEFAULT_GROUP {
                    self.default_security_group(&own).await?
                } else {
                    self.security_group(&own, s).await?
                };
                (None, Some(g.id))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "a rule has one peer: give a CIDR or a source group, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "a rule needs a peer: a CIDR (e.g. 0.0.0.0/0) or a source group",
                ))
            }
        };
        Ok(Checked {
            direction,
            protocol: protocol.to_string(),
            from_port,
            to_port,
            cidr,
            source_group_id,
            description: r.description.clone().filter(|d| !d.is_empty()),
        })
    }

    /// Add rules to a group, all or none. A rule the group already has is a conflict.
    pub async fn add_security_group_rules(
        &self,
        scope: &Scope,
        group: &str,
        rules: &[NewSgRule],
    ) -> Result<Vec<SgRuleRow>> {
        let g = self.security_group(scope, group).await?;
        if rules.is_empty() {
            return Err(invalid("no rule given"));
        }
        let current = self
            .security_group_rules(std::slice::from_ref(&g.id))
            .await?;
        if current.len() + rules.len() > MAX_RULES_PER_GROUP {
            return Err(invalid(format!(
                "a security group holds at most {MAX_RULES_PER_GROUP} rules ({} has {})",
                g.name,
                current.len()
            )));
        }
        let mut out: Vec<SgRuleRow> = Vec::with_capacity(rules.len());
        for r in rules {
            let c = self.check_rule(&g, r).await?;
            if let Some(old) = current.iter().chain(out.iter()).find(|o| c.same(o)) {
                return Err(StoreError::Conflict(format!(
                    "security group {} already has the rule {} ({})",
                    g.name,
                    describe_rule(old, None),
                    old.id
                )));
            }
            out.push(c.row(new_id(IdKind::SecurityGroupRule), &g.id));
        }
        let now = now_str();
        let mut tx = self.pool.begin().await?;
        for r in &out {
            sqlx::query(&format!(
                "INSERT INTO security_group_rules ({RULE_COLS}, seq, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                     (SELECT COALESCE(MAX(seq), -1) + 1 FROM security_group_rules WHERE group_id = $2), $10)"
            ))
            .bind(&r.id)
            .bind(&r.group_id)
            .bind(&r.direction)
            .bind(&r.protocol)
            .bind(r.from_port)
            .bind(r.to_port)
            .bind(&r.cidr)
            .bind(&r.source_group_id)
            .bind(&r.description)
            .bind(&now)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                unique_conflict(
                    e,
                    format!(
                        "security group {} already has the rule {}",
                        g.name,
                        describe_rule(r, None)
                    ),
                )
            })?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Remove rules of a group by id and by what they say, all or none: a rule the group
    /// does not have is not found.
    pub async fn remove_security_group_rules(
        &self,
        scope: &Scope,
        group: &str,
        rule_ids: &[String],
        matching: &[NewSgRule],
    ) -> Result<Vec<SgRuleRow>> {
        let g = self.security_group(scope, group).await?;
        if rule_ids.is_empty() && matching.is_empty() {
            return Err(invalid("no rule given"));
        }
        let current = self
            .security_group_rules(std::slice::from_ref(&g.id))
            .await?;
        let mut doomed: Vec<SgRuleRow> = Vec::new();
        for id in rule_ids {
            match current.iter().find(|r| &r.id == id) {
                Some(r) => doomed.push(r.clone()),
                None => {
                    return Err(StoreError::NotFound {
                        kind: "security group rule",
                        id: id.clone(),
                    })
                }
            }
        }
        for m in matching {
            let c = self.check_rule(&g, m).await?;
            match current.iter().find(|r| c.same(r)) {
                Some(r) => doomed.push(r.clone()),
                None => {
                    return Err(StoreError::NotFound {
                        kind: "security group rule",
                        id: describe_rule(&c.row(String::new(), &g.id), m.source_group.as_deref()),
                    })
                }
            }
        }
        let mut seen = HashSet::new();
        doomed.retain(|r| seen.insert(r.id.clone()));
        let mut tx = self.pool.begin().await?;
        for r in &doomed {
            let done =
                sqlx::query("DELETE FROM security_group_rules WHERE id = $1 AND group_id = $2")
                    .bind(&r.id)
                    .bind(&g.id)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() != 1 {
                // Revoked by someone else meanwhile: the transaction rolls back on return.
                return Err(StoreError::NotFound {
                    kind: "security group rule",
                    id: r.id.clone(),
                });
            }
        }
        tx.commit().await?;
        Ok(doomed)
    }

    /// Replace a live instance's groups (ids of its project, in order). The agent sees the
    /// change in the network policy it fetches.
    pub async fn set_instance_security_groups(
        &self,
        scope: &Scope,
        instance: &str,
        group_ids: &[String],
    ) -> Result<InstanceRow> {
        let inst = self.instance(scope, instance).await?;
        if matches!(
            inst.state,
            InstanceState::Terminated | InstanceState::ShuttingDown
        ) {
            return Err(StoreError::Conflict(format!(
                "instance {} is {}; its security groups can no longer change",
                inst.id, inst.state
            )));
        }
        if group_ids.is_empty() {
            return Err(invalid(
                "an instance must be in at least one security group",
            ));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM instance_security_groups WHERE instance_id = $1")
            .bind(&inst.id)
            .execute(&mut *tx)
            .await?;
        record_launch(&mut tx, &inst.id, group_ids, None).await?;
        tx.commit().await?;
        self.instance(scope, &inst.id).await
    }
}

#[cfg(test)]
mod tests;
