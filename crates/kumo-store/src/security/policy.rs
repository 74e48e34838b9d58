//! What the agents' network policy is built from: memberships, rules and member addresses
//! of groups, by id lists (unscoped: the controller asks on behalf of hosts).

use std::collections::HashMap;

use super::{marks, rule_from_row, SgRuleRow, RULE_COLS};
use crate::{Result, Store};

/// Statements bind at most this many ids (far under SQLite's limit).
const CHUNK: usize = 500;

impl Store {
    /// (instance id, group id) in each instance's order.
    pub async fn instance_group_ids(
        &self,
        instance_ids: &[String],
    ) -> Result<Vec<(String, String)>> {
        let order: HashMap<&str, usize> = instance_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let mut out: Vec<(String, String, i64)> = Vec::new();
        for chunk in instance_ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT instance_id, group_id, position FROM instance_security_groups WHERE instance_id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query_as::<_, (String, String, i64)>(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            out.extend(q.fetch_all(&self.pool).await?);
        }
        out.sort_by_key(|(i, _, pos)| (order.get(i.as_str()).copied(), *pos));
        Ok(out.into_iter().map(|(i, g, _)| (i, g)).collect())
    }

    /// The rules of these groups, group by group (in the given order), in the order added.
    pub async fn security_group_rules(&self, group_ids: &[String]) -> Result<Vec<SgRuleRow>> {
        let order: HashMap<&str, usize> = group_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let mut out = Vec::new();
        for chunk in group_ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT {RULE_COLS} FROM security_group_rules WHERE group_id IN ({}) ORDER BY group_id, seq",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push(rule_from_row(&r)?);
            }
        }
        // Stable: rules keep their age order within a group.
        out.sort_by_key(|r| order.get(r.group_id.as_str()).copied());
        Ok(out)
    }

    /// (group id, address) of non-terminated member instances: each member's private IPv4 and,
    /// on a dual-stack network, its SLAAC IPv6 address (after the IPv4 ones).
    pub async fn group_member_ips(&self, group_ids: &[String]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut v6 = Vec::new();
        for chunk in group_ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT m.group_id, i.private_ip, i.mac, n.ipv6_cidr FROM instance_security_groups m
                 JOIN instances i ON i.id = m.instance_id LEFT JOIN networks n ON n.id = i.network_id
                 WHERE m.group_id IN ({}) AND i.state <> 'terminated' AND i.private_ip <> ''
                 ORDER BY m.group_id, i.private_ip",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query_as::<_, (String, String, String, Option<String>)>(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            for (g, ip, mac, prefix) in q.fetch_all(&self.pool).await? {
                if let Some(a) = kumo_types::ipv6::address_in(prefix.as_deref(), &mac) {
                    v6.push((g.clone(), a.to_string()));
                }
                out.push((g, ip));
            }
        }
        out.extend(v6);
        Ok(out)
    }

    /// (group id, group name).
    pub async fn security_group_names(
        &self,
        group_ids: &[String],
    ) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for chunk in group_ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT id, name FROM security_groups WHERE id IN ({}) ORDER BY id",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query_as::<_, (String, String)>(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            out.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(out)
    }
}
