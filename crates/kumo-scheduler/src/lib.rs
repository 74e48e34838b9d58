//! Placement as a pure function: filters refuse hosts with a reason, a weigher scores the rest,
//! so a failed placement explains itself. The store applies the decision atomically.
//!
//! At scale the scheduler does not score every host: past [`SCORE_ALL_UP_TO`] hosts it walks
//! them from a random start and stops after [`CANDIDATES`] feasible ones (Nomad's candidate
//! limit, Kubernetes' `percentageOfNodesToScore`). Decisions stay O(candidates), not O(hosts).

mod capacity;
mod constraints;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

pub use capacity::{largest_host, n_plus_one, NPlusOne};
pub use constraints::{parse_constraints, valid_label_part, Constraint};

/// Clusters up to this many hosts have every host scored.
pub const SCORE_ALL_UP_TO: usize = 100;
/// Feasible hosts scored per decision in larger clusters.
pub const CANDIDATES: usize = 20;

#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub id: String,
    pub name: String,
    pub site: String,
    pub state: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Size of the storage the host keeps VM disks on; 0 when the host does not say.
    pub disk_gib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub used_disk_gib: u64,
    pub instances: u32,
    /// Operator labels; `role` is the one policies use most (`core`, `personal`, `spare`).
    pub labels: BTreeMap<String, String>,
    /// The pool holding the host's VM disks; empty: a local pool of this host alone.
    pub storage_pool: String,
    /// The operator's per-host settings; `None` falls back to the cluster's policy.
    pub overrides: HostOverrides,
}

impl HostView {
    /// The storage pool as spread groups compare it: hosts naming one pool share it.
    pub fn pool_key(&self) -> String {
        if self.storage_pool.is_empty() {
            format!("local:{}", self.id)
        } else {
            self.storage_pool.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct HostOverrides {
    pub cpu_overcommit: Option<f64>,
    pub memory_overcommit: Option<f64>,
    pub reserved_memory_mib: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Weigher {
    /// Prefer the emptiest host: fewer VMs share a failure, load is even.
    Spread,
    /// Prefer the fullest host that fits: keeps whole hosts free for large VMs and maintenance.
    Pack,
}

impl std::str::FromStr for Weigher {
    type Err = String;
    fn from_str(s: &str) -> Result<Weigher, String> {
        match s {
            "spread" => Ok(Weigher::Spread),
            "pack" => Ok(Weigher::Pack),
            _ => Err(format!("placement strategy is spread or pack, not {s:?}")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Virtual CPUs per physical CPU.
    pub cpu_overcommit: f64,
    /// Guest memory per MiB of host memory.
    pub memory_overcommit: f64,
    /// Host memory kept for the host itself (agent, QEMU overhead, page cache).
    pub reserved_memory_mib: u64,
    /// Virtual disk GiB per GiB of host storage (disks are thin qcow2 overlays).
    pub disk_overcommit: f64,
    pub weigher: Weigher,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            reserved_memory_mib: 512,
            disk_overcommit: 1.0,
            weigher: Weigher::Spread,
        }
    }
}

impl Policy {
    /// This policy with a host's own settings applied.
    pub fn for_host(&self, h: &HostView) -> Policy {
        Policy {
            cpu_overcommit: h.overrides.cpu_overcommit.unwrap_or(self.cpu_overcommit),
            memory_overcommit: h
                .overrides
                .memory_overcommit
                .unwrap_or(self.memory_overcommit),
            reserved_memory_mib: h
                .overrides
                .reserved_memory_mib
                .unwrap_or(self.reserved_memory_mib),
            ..*self
        }
    }
}

/// What a host can hand out in all: (vCPUs, MiB, disk GiB), after overcommit and its reserve.
pub fn capacity(h: &HostView, p: &Policy) -> (u32, u64, u64) {
    let p = p.for_host(h);
    let cpus = (f64::from(h.vcpus) * p.cpu_overcommit).floor() as u32;
    let mem = ((h.memory_mib.saturating_sub(p.reserved_memory_mib)) as f64 * p.memory_overcommit)
        .floor() as u64;
    let disk = (h.disk_gib as f64 * p.disk_overcommit).floor() as u64;
    (cpus, mem, disk)
}

/// A spread placement group as the scheduler sees it: where its live members are.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    pub name: String,
    /// Members one host may hold (1: strict anti-affinity).
    pub max_per_host: u32,
    /// Also keep members on different storage pools (at most `max_per_host` per pool).
    pub spread_storage: bool,
    pub per_host: HashMap<String, u32>,
    pub per_pool: HashMap<String, u32>,
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub site: Option<String>,
    pub constraints: Vec<Constraint>,
    /// Failover and evacuation may use spare hosts; ordinary placement may not.
    pub allow_spare: bool,
    pub group: Option<GroupView>,
    /// Only hosts of this storage pool (their `pool_key`): the disk the instance is made from
    /// (a snapshot) lives there.
    pub pool_key: Option<String>,
}

/// Why a host cannot take an instance. Formatted only when someone reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal<'a> {
    State(&'a str),
    Site {
        has: &'a str,
        want: &'a str,
    },
    Spare,
    Pool {
        has: String,
        want: &'a str,
    },
    Needs(&'a Constraint, Option<&'a str>),
    Avoids(&'a Constraint),
    Never {
        what: &'static str,
        need: u64,
        all: u64,
    },
    Full {
        what: &'static str,
        need: u64,
        free: u64,
        all: u64,
    },
    GroupHost {
        group: &'a str,
        members: u32,
        max: u32,
    },
    GroupPool {
        group: &'a str,
        pool: String,
        members: u32,
        max: u32,
    },
}

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::State(s) => write!(f, "host is {s}"),
            Refusal::Site { has, want } => write!(f, "host is in site {has}, not {want}"),
            Refusal::Spare => write!(f, "spare host: kept free for failover and evacuation"),
            Refusal::Pool { has, want } => write!(
                f,
                "its storage pool ({has}) does not hold the disk the instance is made from ({want})"
            ),
            Refusal::Needs(c, Some(v)) => write!(f, "needs {c}, host has {}={v}", c.key),
            Refusal::Needs(c, None) => write!(f, "needs {c}, host has no {} label", c.key),
            Refusal::Avoids(c) => write!(f, "avoids {}={}", c.key, c.value),
            Refusal::Never { what, need, all } => {
                write!(f, "needs {need} {what}, host has {all} {what} in all")
            }
            Refusal::Full {
                what,
                need,
                free,
                all,
            } => write!(f, "needs {need} {what}, {free} of {all} {what} free"),
            Refusal::GroupHost {
                group,
                members,
                max,
            } => write!(
                f,
                "holds {members} member(s) of spread group {group} (at most {max} per host)"
            ),
            Refusal::GroupPool {
                group,
                pool,
                members,
                max,
            } => write!(
                f,
                "storage pool {pool} holds {members} member(s) of spread group {group} (at most {max} per pool)"
            ),
        }
    }
}

fn fits<'a>(what: &'static str, need: u64, used: u64, all: u64) -> Result<(), Refusal<'a>> {
    if need > all {
        return Err(Refusal::Never { what, need, all });
    }
    if used + need > all {
        return Err(Refusal::Full {
            what,
            need,
            free: all.saturating_sub(used),
            all,
        });
    }
    Ok(())
}

/// Filters, then the weigher: a score (higher is better) or the first reason to refuse.
pub fn judge<'a>(h: &'a HostView, r: &'a Request, p: &Policy) -> Result<f64, Refusal<'a>> {
    if h.state != "up" {
        return Err(Refusal::State(&h.state));
    }
    if let Some(site) = &r.site {
        if &h.site != site {
            return Err(Refusal::Site {
                has: &h.site,
                want: site,
            });
        }
    }
    if !r.allow_spare && h.labels.get("role").map(String::as_str) == Some("spare") {
        return Err(Refusal::Spare);
    }
    if let Some(want) = &r.pool_key {
        let has = h.pool_key();
        if &has != want {
            return Err(Refusal::Pool { has, want });
        }
    }
    for c in &r.constraints {
        let has = h.labels.get(&c.key).map(String::as_str);
        if c.require && has != Some(c.value.as_str()) {
            return Err(Refusal::Needs(c, has));
        }
        if !c.require && has == Some(c.value.as_str()) {
            return Err(Refusal::Avoids(c));
        }
    }
    let (cpus, mem, disk) = capacity(h, p);
    fits(
        "vCPUs",
        u64::from(r.vcpus),
        u64::from(h.used_vcpus),
        u64::from(cpus),
    )?;
    fits("MiB", r.memory_mib, h.used_memory_mib, mem)?;
    if h.disk_gib > 0 {
        fits("GiB disk", r.disk_gib, h.used_disk_gib, disk)?;
    }
    let mut members = 0;
    if let Some(g) = &r.group {
        members = g.per_host.get(&h.id).copied().unwrap_or(0);
        if members >= g.max_per_host {
            return Err(Refusal::GroupHost {
                group: &g.name,
                members,
                max: g.max_per_host,
            });
        }
        if g.spread_storage {
            let pool = h.pool_key();
            let in_pool = g.per_pool.get(&pool).copied().unwrap_or(0);
            if in_pool >= g.max_per_host {
                return Err(Refusal::GroupPool {
                    group: &g.name,
                    pool,
                    members: in_pool,
                    max: g.max_per_host,
                });
            }
        }
    }
    let free_mem = (mem - h.used_memory_mib - r.memory_mib) as f64 / mem.max(1) as f64;
    let free_cpu = f64::from(cpus - h.used_vcpus - r.vcpus) / f64::from(cpus.max(1));
    let emptiness = 0.8 * free_mem + 0.2 * free_cpu;
    let base = match p.weigher {
        Weigher::Spread => emptiness,
        Weigher::Pack => 1.0 - emptiness,
    };
    // A spread group's members go to the hosts holding the fewest of them first.
    Ok(base - f64::from(members))
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    pub host_id: String,
    pub host_name: String,
    /// Why the host was refused, or `None` when it can take the instance.
    pub refused: Option<String>,
    /// Higher is better; only for hosts that can take it.
    pub score: Option<f64>,
}

/// Judge every host (for `explain-placement`). The scheduler itself uses [`choose`].
pub fn explain(hosts: &[HostView], r: &Request, p: &Policy) -> Vec<Verdict> {
    hosts
        .iter()
        .map(|h| {
            let v = judge(h, r, p);
            Verdict {
                host_id: h.id.clone(),
                host_name: h.name.clone(),
                refused: v.as_ref().err().map(ToString::to_string),
                score: v.ok(),
            }
        })
        .collect()
}

/// The best host's index, or an error that lists why each host was refused.
pub fn choose(hosts: &[HostView], r: &Request, p: &Policy) -> Result<usize, String> {
    let start = if hosts.len() > SCORE_ALL_UP_TO {
        use std::hash::{BuildHasher, Hasher};
        // A random start without a dependency: RandomState is seeded per instance.
        let x = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        (x % hosts.len() as u64) as usize
    } else {
        0
    };
    choose_from(hosts, r, p, start)
}

/// [`choose`] walking the hosts from `start` (deterministic, for tests).
pub fn choose_from(
    hosts: &[HostView],
    r: &Request,
    p: &Policy,
    start: usize,
) -> Result<usize, String> {
    if hosts.is_empty() {
        return Err("there are no hosts; start an agent (kumo agent) first".into());
    }
    let limit = if hosts.len() > SCORE_ALL_UP_TO {
        CANDIDATES
    } else {
        usize::MAX
    };
    let mut best: Option<(f64, usize)> = None;
    let mut feasible = 0;
    for k in 0..hosts.len() {
        let i = (start + k) % hosts.len();
        if let Ok(score) = judge(&hosts[i], r, p) {
            feasible += 1;
            let better = match best {
                None => true,
                Some((s, j)) => score > s || (score == s && hosts[i].name < hosts[j].name),
            };
            if better {
                best = Some((score, i));
            }
            if feasible >= limit {
                break;
            }
        }
    }
    match best {
        Some((_, i)) => Ok(i),
        None => Err(refusals(hosts, r, p)),
    }
}

/// Every host's reason, grouped when many hosts share one (10,000 lines help nobody).
fn refusals(hosts: &[HostView], r: &Request, p: &Policy) -> String {
    if hosts.len() <= 20 {
        return hosts
            .iter()
            .filter_map(|h| judge(h, r, p).err().map(|e| format!("{}: {e}", h.name)))
            .collect::<Vec<_>>()
            .join("; ");
    }
    let mut by_reason: BTreeMap<String, (usize, &str)> = BTreeMap::new();
    for h in hosts {
        if let Err(e) = judge(h, r, p) {
            let e = e.to_string();
            let entry = by_reason.entry(e).or_insert((0, &h.name));
            entry.0 += 1;
        }
    }
    by_reason
        .into_iter()
        .map(|(reason, (n, example))| {
            if n == 1 {
                format!("{example}: {reason}")
            } else {
                format!("{n} hosts (e.g. {example}): {reason}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
