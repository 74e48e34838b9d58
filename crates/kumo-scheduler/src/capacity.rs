//! Whether the cluster survives losing its largest host (N+1).

use serde::Serialize;

use crate::{choose, HostView, Policy, Request};

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

/// The host whose loss N+1 simulates: the one with the most memory (then vCPUs, then name).
pub fn largest_host(hosts: &[HostView]) -> Option<&HostView> {
    hosts
        .iter()
        .max_by_key(|h| (h.memory_mib, h.vcpus, std::cmp::Reverse(h.name.clone())))
}

pub fn n_plus_one(
    hosts: &[HostView],
    instances_of: impl Fn(&str) -> Vec<(u32, u64)>,
    p: &Policy,
) -> NPlusOne {
    let Some(largest) = largest_host(hosts) else {
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
            Ok(i) => {
                others[i].used_vcpus += vcpus;
                others[i].used_memory_mib += mem;
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
