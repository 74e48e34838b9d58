//! Placement as a pure function: every host is either refused with a reason or scored, so a
//! failed placement explains itself. The store applies the decision atomically.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct HostView {
    pub id: String,
    pub name: String,
    pub site: String,
    pub state: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    /// Operator labels; `role` is the one policies use most (`core`, `personal`, `spare`).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub site: Option<String>,
    pub constraints: Vec<Constraint>,
    /// Failover and evacuation may use spare hosts; ordinary placement may not.
    pub allow_spare: bool,
}

/// `key=value` (the host must have it) or `key!=value` (the host must not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Constraint {
    pub key: String,
    pub value: String,
    pub require: bool,
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}{}",
            self.key,
            if self.require { "=" } else { "!=" },
            self.value
        )
    }
}

/// Label keys and values: 1–63 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
}

/// Parse `key=value` / `key!=value` constraints; contradictions are refused.
pub fn parse_constraints(raw: &[String]) -> Result<Vec<Constraint>, String> {
    let mut out: Vec<Constraint> = vec![];
    for r in raw {
        let (key, value, require) = match r.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match r.split_once('=') {
                Some((k, v)) => (k, v, true),
                None => return Err(format!("constraint {r:?} must be key=value or key!=value")),
            },
        };
        if !valid_label_part(key) || !valid_label_part(value) {
            return Err(format!(
                "constraint {r:?}: keys and values are 1-63 of a-z, 0-9, '.', '_', '-'"
            ));
        }
        let c = Constraint {
            key: key.into(),
            value: value.into(),
            require,
        };
        for o in &out {
            let clash = o.key == c.key
                && ((o.value == c.value && o.require != c.require)
                    || (o.require && c.require && o.value != c.value));
            if clash {
                return Err(format!("constraints {o} and {c} contradict each other"));
            }
        }
        out.push(c);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Virtual CPUs per physical CPU.
    pub cpu_overcommit: f64,
    /// Guest memory per MiB of host memory.
    pub memory_overcommit: f64,
    /// Host memory kept for the host itself (agent, QEMU overhead, page cache).
    pub reserved_memory_mib: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            reserved_memory_mib: 512,
        }
    }
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

pub fn capacity(h: &HostView, p: &Policy) -> (u32, u64) {
    let cpus = (f64::from(h.vcpus) * p.cpu_overcommit).floor() as u32;
    let mem = ((h.memory_mib.saturating_sub(p.reserved_memory_mib)) as f64 * p.memory_overcommit)
        .floor() as u64;
    (cpus, mem)
}

fn judge(h: &HostView, r: &Request, p: &Policy) -> Result<f64, String> {
    if h.state != "up" {
        return Err(format!("host is {}", h.state));
    }
    if let Some(site) = &r.site {
        if &h.site != site {
            return Err(format!("host is in site {}, not {site}", h.site));
        }
    }
    if !r.allow_spare && h.labels.get("role").map(String::as_str) == Some("spare") {
        return Err("spare host: kept free for failover and evacuation".into());
    }
    for c in &r.constraints {
        let has = h.labels.get(&c.key);
        if c.require && has != Some(&c.value) {
            return Err(match has {
                Some(v) => format!("needs {c}, host has {}={v}", c.key),
                None => format!("needs {c}, host has no {} label", c.key),
            });
        }
        if !c.require && has == Some(&c.value) {
            return Err(format!("avoids {}={}", c.key, c.value));
        }
    }
    let (cpus, mem) = capacity(h, p);
    if r.vcpus > cpus {
        return Err(format!("needs {} vCPUs, host has {cpus} in all", r.vcpus));
    }
    if r.memory_mib > mem {
        return Err(format!(
            "needs {} MiB, host has {mem} MiB for guests in all",
            r.memory_mib
        ));
    }
    if h.used_vcpus + r.vcpus > cpus {
        return Err(format!(
            "needs {} vCPUs, {} of {cpus} free",
            r.vcpus,
            cpus.saturating_sub(h.used_vcpus)
        ));
    }
    if h.used_memory_mib + r.memory_mib > mem {
        return Err(format!(
            "needs {} MiB, {} of {mem} MiB free",
            r.memory_mib,
            mem.saturating_sub(h.used_memory_mib)
        ));
    }
    // Spread: prefer the host with the most free memory left afterwards.
    Ok((mem - h.used_memory_mib - r.memory_mib) as f64 / mem.max(1) as f64)
}

/// Judge every host. The caller picks the best with [`choose`].
pub fn explain(hosts: &[HostView], r: &Request, p: &Policy) -> Vec<Verdict> {
    hosts
        .iter()
        .map(|h| {
            let v = judge(h, r, p);
            Verdict {
                host_id: h.id.clone(),
                host_name: h.name.clone(),
                refused: v.as_ref().err().cloned(),
                score: v.ok(),
            }
        })
        .collect()
}

/// The best host, or an error that lists why each host was refused.
pub fn choose(hosts: &[HostView], r: &Request, p: &Policy) -> Result<String, String> {
    if hosts.is_empty() {
        return Err("there are no hosts; start an agent (kumo agent) first".into());
    }
    let verdicts = explain(hosts, r, p);
    let best = verdicts
        .iter()
        .filter_map(|v| v.score.map(|s| (s, v)))
        .max_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then_with(|| b.1.host_name.cmp(&a.1.host_name))
        });
    match best {
        Some((_, v)) => Ok(v.host_id.clone()),
        None => Err(verdicts
            .iter()
            .map(|v| {
                format!(
                    "{}: {}",
                    v.host_name,
                    v.refused.as_deref().unwrap_or("refused")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Whether the cluster can lose its largest host and still place every instance that ran
/// on it (N+1). Greedy, largest instance first, onto the other `up` hosts' free capacity.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NPlusOne {
    pub ok: bool,
    /// The host whose loss was simulated (the one with the most memory).
    pub largest_host: Option<String>,
    /// Instances (vCPUs, MiB) of that host that would find no room elsewhere.
    pub stranded: Vec<(u32, u64)>,
}

pub fn n_plus_one(
    hosts: &[HostView],
    instances_of: impl Fn(&str) -> Vec<(u32, u64)>,
    p: &Policy,
) -> NPlusOne {
    let Some(largest) = hosts
        .iter()
        .max_by_key(|h| (h.memory_mib, h.vcpus, std::cmp::Reverse(h.name.clone())))
    else {
        return NPlusOne {
            ok: true,
            largest_host: None,
            stranded: vec![],
        };
    };
    let mut others: Vec<HostView> = hosts
        .iter()
        .filter(|h| h.id != largest.id && h.state == "up")
        .cloned()
        .collect();
    let mut load = instances_of(&largest.id);
    load.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut stranded = vec![];
    for (vcpus, mem) in load {
        // Failover may use spare hosts.
        let req = Request {
            vcpus,
            memory_mib: mem,
            allow_spare: true,
            ..Request::default()
        };
        match choose(&others, &req, p) {
            Ok(id) => {
                if let Some(h) = others.iter_mut().find(|h| h.id == id) {
                    h.used_vcpus += vcpus;
                    h.used_memory_mib += mem;
                }
            }
            Err(_) => stranded.push((vcpus, mem)),
        }
    }
    NPlusOne {
        ok: stranded.is_empty(),
        largest_host: Some(largest.name.clone()),
        stranded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, vcpus: u32, mem: u64, used_mem: u64) -> HostView {
        HostView {
            id: format!("host-{name}"),
            name: name.into(),
            site: "s1".into(),
            state: "up".into(),
            vcpus,
            memory_mib: mem,
            used_vcpus: 0,
            used_memory_mib: used_mem,
            labels: BTreeMap::new(),
        }
    }

    fn req(vcpus: u32, mem: u64) -> Request {
        Request {
            vcpus,
            memory_mib: mem,
            ..Request::default()
        }
    }

    fn labelled(name: &str, role: &str) -> HostView {
        let mut h = host(name, 2, 4096, 0);
        h.labels.insert("role".into(), role.into());
        h
    }

    #[test]
    fn roles_and_spares() {
        let hosts = [
            labelled("core1", "core"),
            labelled("pers1", "personal"),
            labelled("spare1", "spare"),
        ];
        let p = Policy::default();
        let core = Request {
            constraints: parse_constraints(&["role=core".into()]).unwrap_or_default(),
            ..req(1, 128)
        };
        assert_eq!(choose(&hosts, &core, &p), Ok("host-core1".into()));
        let not_personal = Request {
            constraints: parse_constraints(&["role!=personal".into()]).unwrap_or_default(),
            ..req(1, 128)
        };
        let v = explain(&hosts, &not_personal, &p);
        assert_eq!(v[1].refused.as_deref(), Some("avoids role=personal"));
        assert_eq!(
            v[2].refused.as_deref(),
            Some("spare host: kept free for failover and evacuation")
        );
        // Failover may use the spare.
        let failover = Request {
            allow_spare: true,
            constraints: parse_constraints(&["role=spare".into()]).unwrap_or_default(),
            ..req(1, 128)
        };
        assert_eq!(choose(&hosts, &failover, &p), Ok("host-spare1".into()));
        let err = choose(
            &hosts,
            &Request {
                constraints: parse_constraints(&["rack=a".into()]).unwrap_or_default(),
                ..req(1, 128)
            },
            &p,
        )
        .unwrap_err();
        assert!(
            err.contains("needs rack=a, host has no rack label"),
            "{err}"
        );
    }

    #[test]
    fn constraints_are_checked() {
        assert!(parse_constraints(&["role=core".into(), "rack!=b".into()]).is_ok());
        for bad in [
            vec!["role"],
            vec!["Role=core"],
            vec!["role=co re"],
            vec!["role=core", "role!=core"],
            vec!["role=core", "role=personal"],
            vec!["=x"],
        ] {
            let bad: Vec<String> = bad.into_iter().map(String::from).collect();
            assert!(parse_constraints(&bad).is_err(), "{bad:?}");
        }
        assert!(
            valid_label_part("spare") && !valid_label_part("sp are") && !valid_label_part("-x")
        );
    }

    #[test]
    fn picks_the_emptiest_host() {
        let hosts = [host("a", 2, 4096, 2048), host("b", 2, 4096, 0)];
        assert_eq!(
            choose(&hosts, &req(1, 512), &Policy::default()),
            Ok("host-b".into())
        );
    }

    #[test]
    fn refusals_name_every_reason() {
        let mut down = host("c", 2, 8192, 0);
        down.state = "down".into();
        let hosts = [host("a", 2, 4096, 3500), down];
        let err = choose(&hosts, &req(1, 1024), &Policy::default()).unwrap_err();
        assert!(
            err.contains("a: needs 1024 MiB, 84 of 3584 MiB free"),
            "{err}"
        );
        assert!(err.contains("c: host is down"), "{err}");
        let err = choose(&hosts, &req(64, 128), &Policy::default()).unwrap_err();
        assert!(err.contains("needs 64 vCPUs, host has 8 in all"), "{err}");
    }

    #[test]
    fn site_is_a_filter() {
        let hosts = [host("a", 2, 4096, 0)];
        let r = Request {
            site: Some("s2".into()),
            ..req(1, 128)
        };
        let err = choose(&hosts, &r, &Policy::default()).unwrap_err();
        assert!(err.contains("site s1, not s2"));
    }

    #[test]
    fn n_plus_one_moves_the_largest_hosts_load() {
        let big = HostView {
            used_memory_mib: 3000,
            ..host("big", 2, 8192, 0)
        };
        let small = host("small", 2, 4096, 0);
        let load = |id: &str| {
            if id == "host-big" {
                vec![(1, 2000), (1, 1000)]
            } else {
                vec![]
            }
        };
        let r = n_plus_one(&[big.clone(), small.clone()], load, &Policy::default());
        assert!(r.ok, "{r:?}");
        assert_eq!(r.largest_host.as_deref(), Some("big"));
        // Too much to move: 3 GiB + 2 GiB do not both fit in 3.5 GiB.
        let heavy = |id: &str| {
            if id == "host-big" {
                vec![(1, 3072), (1, 2048)]
            } else {
                vec![]
            }
        };
        let r = n_plus_one(&[big, small], heavy, &Policy::default());
        assert!(!r.ok);
        assert_eq!(r.stranded, vec![(1, 2048)]);
    }

    #[test]
    fn no_hosts_says_what_to_do() {
        assert!(choose(&[], &req(1, 1), &Policy::default())
            .unwrap_err()
            .contains("no hosts"));
    }
}
