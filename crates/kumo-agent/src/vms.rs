//! The VMs of this host: accepted specs, and one convergence worker per VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kumo_hypervisor::{DiskSpec, NicSpec, PowerState, VmSpec};
use kumo_types::agent::{DesiredPower, ObservedPower, VmDesired, VmObserved};
use tokio::sync::{Mutex, Notify};

use crate::error::chain;

/// Attempts to converge a VM after a failure before it is reported `Failed`.
const CONVERGE_RETRIES: u32 = 3;

/// How long a heartbeat waits for one VM's state.
const STATE_PROBE: std::time::Duration = std::time::Duration::from_millis(200);
use crate::ledger::{self, VmRecord};
use crate::{Agent, AgentError};

pub struct VmEntry {
    pub rec: VmRecord,
    /// A worker is converging the VM to `rec.desired`.
    pub converging: bool,
    pub wake: Arc<Notify>,
    /// Held while converging or deleting, so a delete never races a start.
    pub op: Arc<Mutex<()>>,
    /// Volumes plugged into the running VM, as of the last look (heartbeats report this).
    pub attached: Vec<String>,
    /// The destination side of a live migration not committed yet: its QEMU waits paused for the
    /// migration stream; no worker converges it and it holds no lease.
    pub incoming: bool,
    /// Being deleted: its network is rendered without it while heartbeats still report it, so
    /// the controller never sees it gone before its traces are.
    pub deleting: bool,
}

#[derive(Default)]
pub struct Vms {
    pub map: Mutex<HashMap<String, VmEntry>>,
}

impl Vms {
    pub fn load(data_dir: &Path) -> Result<Vms, AgentError> {
        let mut map = HashMap::new();
        for rec in ledger::load_vms(data_dir)? {
            let converging = rec.applied_generation < rec.desired.generation;
            map.insert(
                rec.desired.id.clone(),
                VmEntry {
                    rec,
                    converging,
                    wake: Arc::new(Notify::new()),
                    op: Arc::default(),
                    attached: vec![],
                    incoming: false,
                    deleting: false,
                },
            );
        }
        // Incoming migrations the agent was receiving when it stopped: the controller commits
        // or aborts them.
        for rec in crate::migrate::load_incoming(data_dir)? {
            map.entry(rec.req.desired.id.clone())
                .or_insert_with(|| crate::migrate::incoming_entry(&rec));
        }
        Ok(Vms {
            map: Mutex::new(map),
        })
    }
}

/// Where stock cloud images find their NoCloud seed: the metadata service (see kumo_agent::metadata).
const NOCLOUD_SEED: &str = "ds=nocloud-net;s=http://169.254.169.254/nocloud/";

impl Agent {
    pub(crate) fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    /// After a restart: start a worker for every VM in the ledger. Running VMs stay as they are.
    pub(crate) async fn resume(self: &Arc<Self>) {
        let ids: Vec<(String, Arc<Notify>)> = self
            .vms
            .map
            .lock()
            .await
            .iter()
            .filter(|(_, v)| !v.incoming)
            .map(|(k, v)| (k.clone(), v.wake.clone()))
            .collect();
        for (id, wake) in ids {
            self.spawn_worker(id, wake);
        }
        // Running VMs keep their groups and elastic IPs only if the policy is known before the first
        // render after a restart.
        if let Err(e) = self.refresh_policy().await {
            tracing::warn!(error = %chain(&e), "network policy not fetched at start-up");
        }
        if let Err(e) = self.apply_network().await {
            tracing::warn!(error = %chain(&e), "network apply at start-up failed");
        }
    }

    pub(crate) fn spawn_worker(self: &Arc<Self>, id: String, wake: Arc<Notify>) {
        let me = self.clone();
        tokio::spawn(async move { me.worker(id, wake).await });
    }

    /// Accept a desired spec. Older generations are ignored; returns what the agent observes.
    pub async fn put_vm(self: &Arc<Self>, mut spec: VmDesired) -> Result<VmObserved, AgentError> {
        // The lease that came with the spec is not part of it (nor of the ledger).
        let revived = spec.lease_ms.take().is_some_and(|ms| {
            self.leases
                .grant_one(&spec.id, std::time::Duration::from_millis(ms))
        });
        self.save_leases();
        let mut new_vm = None;
        {
            let mut map = self.vms.map.lock().await;
            match map.get_mut(&spec.id) {
                Some(e) if spec.generation <= e.rec.desired.generation => {}
                Some(e) => {
                    e.rec.desired = spec.clone();
                    e.converging = true;
                    ledger::save_vm(&self.cfg.data_dir, &e.rec)?;
                    e.wake.notify_one();
                }
                None => {
                    let rec = VmRecord {
                        desired: spec.clone(),
                        applied_generation: 0,
                        applied_reboot_seq: spec.reboot_seq,
                        error: None,
                    };
                    ledger::save_vm(&self.cfg.data_dir, &rec)?;
                    let wake = Arc::new(Notify::new());
                    map.insert(
                        spec.id.clone(),
                        VmEntry {
                            rec,
                            converging: true,
                            wake: wake.clone(),
                            op: Arc::default(),
                            attached: vec![],
                            incoming: false,
                            deleting: false,
                        },
                    );
                    new_vm = Some(wake);
                }
            }
        }
        if let Some(wake) = new_vm {
            self.spawn_worker(spec.id.clone(), wake);
        }
        if revived {
            self.revive(std::slice::from_ref(&spec.id)).await;
        }
        self.observe(&spec.id)
            .await
            .ok_or_else(|| AgentError::Config("VM vanished while being accepted".into()))
    }

    /// What the agent observes of one VM.
    pub async fn observe(&self, id: &str) -> Option<VmObserved> {
        let (rec, converging, attached) = {
            let map = self.vms.map.lock().await;
            let e = map.get(id)?;
            (e.rec.clone(), e.converging, e.attached.clone())
        };
        // The driver serialises calls per VM, so a state query waits behind a launch or a stop
        // in progress; never let a heartbeat wait for that: the transition is the answer.
        let actual = match tokio::time::timeout(STATE_PROBE, self.hv.state(id)).await {
            Ok(s) => s.unwrap_or(PowerState::Stopped),
            Err(_) if converging && rec.desired.power == DesiredPower::Running => {
                PowerState::Stopped
            }
            Err(_) => PowerState::Running,
        };
        let is_on = actual != PowerState::Stopped;
        // Fenced (no lease): it waits for a fresh lease to start again, it did not stop.
        let fenced = self.leases.is_fenced(id);
        // While converging, report the transition in progress; a reboot or a no-op change of a
        // running VM keeps it `Running`, as EC2 does.
        let power = match (converging, rec.desired.power, is_on) {
            (true, DesiredPower::Running, false) => ObservedPower::Starting,
            (true, DesiredPower::Stopped, true) => ObservedPower::Stopping,
            (_, DesiredPower::Running, false) if fenced => ObservedPower::Starting,
            (_, _, true) => ObservedPower::Running,
            (_, _, false) if rec.error.is_some() => ObservedPower::Failed,
            (_, _, false) => ObservedPower::Stopped,
        };
        Some(VmObserved {
            id: id.to_string(),
            generation: rec.desired.generation,
            power,
            reboot_seq: rec.applied_reboot_seq,
            // A running VM's error is about its volumes (a failed VM is not running).
            volume_error: if is_on { rec.error.clone() } else { None },
            error: rec.error,
            // What was last seen plugged in, unless the VM is known to be off: a state probe that
            // timed out behind a hot-plug must not read as "nothing attached".
            volumes: if actual == PowerState::Stopped && !converging {
                vec![]
            } else {
                attached
            },
        })
    }

    /// What the agent observes of every VM it runs (not incoming migrations: they are not
    /// here until committed).
    pub async fn observe_all(&self) -> Vec<VmObserved> {
        let ids: Vec<String> = self
            .vms
            .map
            .lock()
            .await
            .iter()
            .filter(|(_, e)| !e.incoming)
            .map(|(k, _)| k.clone())
            .collect();
        // Concurrently: each probe may wait its full timeout, and the heartbeat that carries
        // them renews the HA leases.
        futures::future::join_all(ids.iter().map(|id| self.observe(id)))
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn worker(self: Arc<Self>, id: String, wake: Arc<Notify>) {
        let mut failures = 0u32;
        loop {
            let job = {
                let map = self.vms.map.lock().await;
                match map.get(&id) {
                    None => return,
                    Some(e) if e.converging => Some((e.rec.clone(), e.op.clone())),
                    Some(_) => None,
                }
            };
            if let Some((rec, op)) = job {
                let guard = op.lock().await;
                if !self.vms.map.lock().await.contains_key(&id) {
                    return; // deleted while we waited
                }
                let result = self.converge(&rec).await;
                drop(guard);
                let error = result.err().map(|e| chain(&e));
                if let Some(err) = &error {
                    tracing::warn!(vm = %id, error = %err, "could not converge VM");
                }
                let mut map = self.vms.map.lock().await;
                let Some(e) = map.get_mut(&id) else { return };
                if error.is_some() && failures < CONVERGE_RETRIES {
                    // Often transient (a download, a busy host): try again before reporting
                    // failure; a newer spec or a delete ends the wait.
                    failures += 1;
                    e.rec.error = error;
                    drop(map);
                    let backoff = std::time::Duration::from_secs(1 << failures.min(4));
                    let _ = tokio::time::timeout(backoff, wake.notified()).await;
                    continue;
                }
                failures = 0;
                e.rec.applied_generation = rec.desired.generation;
                e.rec.applied_reboot_seq = e.rec.applied_reboot_seq.max(rec.desired.reboot_seq);
                e.rec.error = error;
                // A newer spec may have arrived while converging; go round again.
                e.converging = e.rec.desired.generation > rec.desired.generation;
                if let Err(err) = ledger::save_vm(&self.cfg.data_dir, &e.rec) {
                    tracing::warn!(vm = %id, error = %chain(&err), "could not save ledger");
                }
                drop(map);
                self.beat.notify_one();
                continue;
            }
            wake.notified().await;
        }
    }

    async fn converge(&self, rec: &VmRecord) -> Result<(), AgentError> {
        let d = &rec.desired;
        match d.power {
            DesiredPower::Running => {
                let running = self.hv.state(&d.id).await? != PowerState::Stopped;
                if !running {
                    // HA: only with a valid lease (checked again after the slow preparation).
                    if d.ha && !self.may_start(&d.id) {
                        return Ok(());
                    }
                    let spec = self.prepare(d).await?;
                    if d.ha && !self.may_start(&d.id) {
                        return Ok(());
                    }
                    self.hv.start(&spec).await?;
                } else if d.reboot_seq > rec.applied_reboot_seq {
                    self.hv.reboot(&d.id).await?;
                }
                if running {
                    self.sync_volumes(d).await?;
                }
                self.note_attached(&d.id).await;
            }
            DesiredPower::Stopped => {
                self.hv.stop(&d.id, self.cfg.stop_timeout).await?;
            }
        }
        Ok(())
    }

    /// Disk, network and the hypervisor spec for a VM about to start.
    pub(crate) async fn prepare(&self, d: &VmDesired) -> Result<VmSpec, AgentError> {
        if self.hv.name() == "sim" {
            return Ok(VmSpec {
                id: d.id.clone(),
                vcpus: d.vcpus,
                memory_mib: d.memory_mib,
                disks: vec![],
                nics: vec![],
                kernel: None,
                initrd: None,
                cmdline: None,
                netns: None,
                smbios_serial: None,
                uuid: None,
            });
        }
        let root = self.root_disk(d).await?;
        let mut disks = vec![DiskSpec {
            path: root.path.clone(),
            format: root.format.clone(),
            serial: Some(d.id.clone()),
            read_only: false,
            device_id: None,
        }];
        for v in &d.volumes {
            disks.push(self.volume_disk(v).await?);
        }
        let kernel = match &d.kernel {
            Some(k) => Some(self.cached_image(k).await?),
            None => None,
        };
        let initrd = match &d.ramdisk {
            Some(k) => Some(self.cached_image(k).await?),
            None => None,
        };
        // The VM's security groups, elastic IP and metadata must be in place before it boots.
        if let Err(e) = self.refresh_policy().await {
            tracing::warn!(vm = %d.id, error = %chain(&e), "starting with the last known network policy");
        }
        self.apply_network().await?;
        let cmdline = kernel.as_ref().map(|_| {
            let base = d.cmdline.clone().unwrap_or_else(|| "console=ttyS0".into());
            format!("{base} kumo.id={} kumo.hostname={}", d.id, d.name)
        });
        Ok(VmSpec {
            id: d.id.clone(),
            vcpus: d.vcpus,
            memory_mib: d.memory_mib,
            disks,
            nics: vec![NicSpec {
                mac: d.nic.mac.clone(),
                tap: kumo_network::tap_name(&d.id),
            }],
            kernel,
            initrd,
            cmdline,
            netns: self.cfg.vm_netns.clone(),
            smbios_serial: Some(NOCLOUD_SEED.into()),
            uuid: d.uuid.clone(),
        })
    }

    /// Remove a VM and everything it has on this host. Idempotent. `keep_disk`: the VM lives on
    /// another host of this shared pool now (migrated, failed over), so its disk is not ours to delete.
    pub async fn delete_vm(&self, id: &str, keep_disk: bool) -> Result<(), AgentError> {
        let op = self.vms.map.lock().await.get(id).map(|e| e.op.clone());
        let _guard = match &op {
            Some(op) => Some(op.lock().await),
            None => None,
        };
        self.hv.kill(id).await?;
        self.hv.cleanup(id).await?;
        // Its layers stay while snapshots of it need them (the pool collects the rest).
        if self.hv.name() != "sim" && !keep_disk {
            self.pool.delete_disk(id).await?;
        }
        let dir = self.vm_dir(id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io(format!("removing {}", dir.display()), e)),
        }
        let existed = match self.vms.map.lock().await.get_mut(id) {
            Some(e) => {
                e.deleting = true;
                true
            }
            None => false,
        };
        if existed {
            self.apply_network().await?;
        }
        if let Some(e) = self.vms.map.lock().await.remove(id) {
            e.wake.notify_one();
        }
        ledger::remove_vm(&self.cfg.data_dir, id)?;
        self.leases.forget(id);
        self.beat.notify_one();
        Ok(())
    }

    pub fn console_log(&self, id: &str) -> PathBuf {
        self.hv.console_log(id)
    }

    pub fn serial_socket(&self, id: &str) -> PathBuf {
        self.hv.serial_socket(id)
    }

    pub fn network(&self) -> Option<&kumo_network::HostNetwork> {
        self.net.as_ref()
    }
}
