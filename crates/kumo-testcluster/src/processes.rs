//! The processes of a test host: what runs in its namespace, and which QEMU runs which instance.

use crate::{sys, Cluster, QemuProcess};

impl Cluster {
    /// Live processes in host `i`'s namespace.
    pub fn pids_on(&self, i: usize) -> Vec<u32> {
        sys::pids_in_netns(&self.hosts[i].netns)
    }

    /// QEMU processes (not zombies) in host `i`'s namespace, with the instance each runs
    /// (kumo starts QEMU with `-name kumo-<instance id>`).
    pub fn qemu_processes_on(&self, i: usize) -> Vec<QemuProcess> {
        qemu_processes_in(&self.hosts[i].netns)
    }

    /// Instance ids of the QEMU processes running in host `i`'s namespace.
    pub fn qemu_instances_on(&self, i: usize) -> Vec<String> {
        self.qemu_processes_on(i)
            .into_iter()
            .map(|q| q.instance_id)
            .collect()
    }
}

/// QEMU processes (not zombies) in a network namespace, with the instance each runs. A free
/// function so that a watcher thread can poll hosts while the test holds the cluster.
pub fn qemu_processes_in(netns: &str) -> Vec<QemuProcess> {
    let mut out: Vec<QemuProcess> = sys::pids_in_netns(netns)
        .into_iter()
        .filter_map(|pid| {
            let args = sys::cmdline(pid);
            let prog = args.first()?;
            if !prog.rsplit('/').next()?.starts_with("qemu-system") {
                return None;
            }
            let name = args
                .windows(2)
                .find(|w| w[0] == "-name")
                .map(|w| w[1].clone())?;
            let id = name.split(',').next()?.strip_prefix("kumo-")?.to_string();
            Some(QemuProcess {
                pid,
                instance_id: id,
            })
        })
        .collect();
    out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    out
}
