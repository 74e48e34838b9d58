//! Disk backups of running VMs through QMP: dirty bitmaps + `blockdev-backup` into a qcow2 file
//! that the backup repository (kumo-storage's `backup` module) created beforehand.
//!
//! One backup: `blockdev-add` the target file, then one `transaction` that adds the new dirty
//! bitmap and starts the job (so the bitmap and the backup share the same point in time), then
//! wait for the job (events + `query-jobs` polling, which also feeds the progress callback),
//! `job-dismiss` it and `blockdev-del` the target. Whatever goes wrong after the target was added
//! is undone: new bitmap removed, job dismissed, target node deleted; the `since` bitmap is never
//! touched (`bitmap-mode=never`), so the next attempt can start from it again.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::qmp::{Qmp, QmpError, QmpEvent};
use crate::{validate_id, BackupJob, BackupReport, HypervisorError, QemuDriver};

/// How often `query-jobs` is polled (and the progress callback called) while a job runs.
const POLL: Duration = Duration::from_millis(250);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cancelled job may take to conclude (it only has to finish in-flight requests).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefixes of the node names and job ids this module creates, so leftovers can be recognised.
const NODE_PREFIX: &str = "kumo-bt-";
const JOB_PREFIX: &str = "kumo-bj-";
/// QEMU's limit on dirty bitmap names (`BDRV_BITMAP_MAX_NAME_SIZE`).
const MAX_BITMAP_NAME: usize = 1023;

/// Job ids of the backups running in this process: everything else with our prefix is a
/// leftover of a killed agent and may be cleaned up.
static ACTIVE: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn active() -> std::sync::MutexGuard<'static, Option<HashSet<String>>> {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node name and job id of one backup, registered in [`ACTIVE`] while it lives.
struct Names {
    node: String,
    job: String,
}

impl Names {
    fn new() -> Self {
        // Node names are limited to 31 characters; millis + a counter stay unique across
        // restarts of the agent (a leftover node from a previous run must not collide).
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{millis:x}-{n:x}");
        let names = Names {
            node: format!("{NODE_PREFIX}{tag}"),
            job: format!("{JOB_PREFIX}{tag}"),
        };
        let mut set = active();
        let set = set.get_or_insert_with(HashSet::new);
        set.insert(names.job.clone());
        set.insert(names.node.clone());
        names
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        if let Some(set) = active().as_mut() {
            set.remove(&self.job);
            set.remove(&self.node);
        }
    }
}

fn is_active(name: &str) -> bool {
    active().as_ref().is_some_and(|s| s.contains(name))
}

fn invalid(msg: String) -> HypervisorError {
    HypervisorError::InvalidSpec(msg)
}

/// A qdev id or a bitmap name we create: letters, digits, `-`, `_`, `.`.
fn check_name(what: &str, s: &str) -> Result<(), HypervisorError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {s:?} must be 1-128 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

fn check_target(target: &Path) -> Result<String, HypervisorError> {
    let Some(s) = target.to_str() else {
        return Err(invalid(format!(
            "backup target {} is not UTF-8",
            target.display()
        )));
    };
    if !target.is_absolute() {
        return Err(invalid(format!(
            "backup target {s} must be an absolute path"
        )));
    }
    match std::fs::metadata(target) {
        Ok(m) if m.is_file() => Ok(s.to_string()),
        Ok(_) => Err(invalid(format!("backup target {s} is not a regular file"))),
        Err(e) => Err(invalid(format!("backup target {s}: {e}"))),
    }
}

/// The active node of a disk device, as `query-block` reports it now.
struct DiskNode {
    node: String,
    driver: String,
    /// Usable bitmaps.
    bitmaps: Vec<String>,
    /// Persistent bitmaps QEMU found unclean after a crash: they cannot be used.
    inconsistent: Vec<String>,
}

async fn find_node(qmp: &Qmp, id: &str, device_id: &str) -> Result<DiskNode, HypervisorError> {
    let v = qmp
        .execute_with_timeout("query-block", Value::Null, COMMAND_TIMEOUT)
        .await?;
    // With -blockdev the backend belongs to the virtio device's child object.
    let qom = format!("/machine/peripheral/{device_id}");
    let backend = format!("{qom}/virtio-backend");
    let dev = v.as_array().and_then(|devs| {
        devs.iter().find(|d| {
            let q = d["qdev"].as_str().unwrap_or_default();
            q == device_id || q == qom || q == backend
        })
    });
    let Some(dev) = dev else {
        return Err(invalid(format!("VM {id} has no disk device {device_id:?}")));
    };
    let inserted = &dev["inserted"];
    let Some(node) = inserted["node-name"].as_str() else {
        return Err(invalid(format!(
            "disk device {device_id:?} of VM {id} has no medium"
        )));
    };
    let (mut bitmaps, mut inconsistent) = (vec![], vec![]);
    for b in inserted["dirty-bitmaps"].as_array().into_iter().flatten() {
        if let Some(name) = b["name"].as_str() {
            if b["inconsistent"].as_bool() == Some(true) {
                inconsistent.push(name.to_string());
            } else {
                bitmaps.push(name.to_string());
            }
        }
    }
    Ok(DiskNode {
        node: node.to_string(),
        driver: inserted["drv"].as_str().unwrap_or_default().to_string(),
        bitmaps,
        inconsistent,
    })
}

/// Best effort: remove a bitmap, logging failures (used while undoing).
async fn drop_bitmap(qmp: &Qmp, node: &str, name: &str) {
    let r = qmp
        .execute_with_timeout(
            "block-dirty-bitmap-remove",
            json!({ "node": node, "name": name }),
            COMMAND_TIMEOUT,
        )
        .await;
    if let Err(e) = r {
        tracing::warn!(%node, bitmap = %name, error = %e, "cannot remove dirty bitmap");
    }
}

async fn del_node(qmp: &Qmp, node: &str) -> Result<(), QmpError> {
    qmp.execute_with_timeout(
        "blockdev-del",
        json!({ "node-name": node }),
        COMMAND_TIMEOUT,
    )
    .await
    .map(|_| ())
}

async fn dismiss(qmp: &Qmp, job: &str) {
    if let Err(e) = qmp
        .execute_with_timeout("job-dismiss", json!({ "id": job }), COMMAND_TIMEOUT)
        .await
    {
        tracing::warn!(%job, error = %e, "job-dismiss failed");
    }
}

/// Our job's entry of `query-jobs`, if it still exists.
async fn query_job(qmp: &Qmp, job: &str) -> Result<Option<Value>, QmpError> {
    let v = qmp
        .execute_with_timeout("query-jobs", Value::Null, COMMAND_TIMEOUT)
        .await?;
    Ok(v.as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == job))
        .cloned())
}

/// Jobs and target nodes with our prefixes that no backup of this process owns: a previous
/// agent was killed mid-backup. They hold the target file open, so they go before a new backup.
async fn cleanup_leftovers(qmp: &Qmp, id: &str) {
    if let Ok(Value::Array(jobs)) = qmp
        .execute_with_timeout("query-jobs", Value::Null, COMMAND_TIMEOUT)
        .await
    {
        for j in jobs {
            let Some(job) = j["id"].as_str() else {
                continue;
            };
            if !job.starts_with(JOB_PREFIX) || is_active(job) {
                continue;
            }
            tracing::info!(%id, %job, status = %j["status"], "cleaning up a leftover backup job");
            if j["status"] != "concluded" {
                let _ = qmp
                    .execute_with_timeout("job-cancel", json!({ "id": job }), COMMAND_TIMEOUT)
                    .await;
                let deadline = Instant::now() + CANCEL_TIMEOUT;
                while Instant::now() < deadline {
                    match query_job(qmp, job).await {
                        Ok(Some(j)) if j["status"] != "concluded" => tokio::time::sleep(POLL).await,
                        _ => break,
                    }
                }
            }
            dismiss(qmp, job).await;
        }
    }
    if let Ok(Value::Array(nodes)) = qmp
        .execute_with_timeout(
            "query-named-block-nodes",
            json!({ "flat": true }),
            COMMAND_TIMEOUT,
        )
        .await
    {
        for n in nodes {
            let Some(node) = n["node-name"].as_str() else {
                continue;
            };
            if node.starts_with(NODE_PREFIX) && !is_active(node) {
                tracing::info!(%id, %node, "deleting a leftover backup target node");
                if let Err(e) = del_node(qmp, node).await {
                    tracing::warn!(%id, %node, error = %e, "cannot delete leftover backup node");
                }
            }
        }
    }
}

/// How a job ended when it did not succeed.
enum JobEnd {
    Cancelled,
    Failed(HypervisorError),
}

impl From<QmpError> for JobEnd {
    fn from(e: QmpError) -> Self {
        JobEnd::Failed(e.into())
    }
}

/// Wait until an event about `job` arrives or `timeout` passes. Remembers the error a
/// `BLOCK_JOB_COMPLETED` carries.
async fn wait_event(
    events: &mut broadcast::Receiver<QmpEvent>,
    job: &str,
    timeout: Duration,
    error: &mut Option<String>,
) -> Result<(), QmpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Ok(()),
            // Missed events are harmless: query-jobs is the source of truth.
            Ok(Err(RecvError::Lagged(_))) => return Ok(()),
            Ok(Err(RecvError::Closed)) => return Err(QmpError::Closed),
            Ok(Ok(ev)) => {
                let about = ev.data["id"] == job || ev.data["device"] == job;
                if !about {
                    continue;
                }
                if ev.event == "BLOCK_JOB_COMPLETED" {
                    if let Some(msg) = ev.data["error"].as_str() {
                        *error = Some(msg.to_string());
                    }
                }
                return Ok(());
            }
        }
    }
}

/// Runs the job to its end; `Ok(total bytes)` on success.
async fn wait_job(
    qmp: &Qmp,
    job: &str,
    events: &mut broadcast::Receiver<QmpEvent>,
    progress: &(dyn Fn(u64, u64) -> bool + Send + Sync),
) -> Result<u64, JobEnd> {
    let mut cancel_deadline: Option<Instant> = None;
    let mut event_error: Option<String> = None;
    loop {
        let Some(info) = query_job(qmp, job).await? else {
            return Err(JobEnd::Failed(HypervisorError::BlockJobFailed(format!(
                "backup job {job} disappeared"
            ))));
        };
        let done = info["current-progress"].as_u64().unwrap_or(0);
        let total = info["total-progress"].as_u64().unwrap_or(0);
        if info["status"] == "concluded" {
            if cancel_deadline.is_some() {
                return Err(JobEnd::Cancelled);
            }
            if let Some(msg) = info["error"].as_str().map(str::to_string).or(event_error) {
                return Err(JobEnd::Failed(HypervisorError::BlockJobFailed(msg)));
            }
            // The caller may still refuse a backup that finished before it could say stop.
            if !progress(done, total) {
                return Err(JobEnd::Cancelled);
            }
            return Ok(total);
        }
        match cancel_deadline {
            None => {
                if !progress(done, total) {
                    tracing::info!(%job, done, total, "backup cancelled by the caller");
                    // Fails if the job concluded meanwhile; the next poll sees that.
                    if let Err(e) = qmp
                        .execute_with_timeout("job-cancel", json!({ "id": job }), COMMAND_TIMEOUT)
                        .await
                    {
                        tracing::debug!(%job, error = %e, "job-cancel failed");
                    }
                    cancel_deadline = Some(Instant::now() + CANCEL_TIMEOUT);
                }
            }
            Some(deadline) if Instant::now() > deadline => {
                return Err(JobEnd::Failed(HypervisorError::Timeout(format!(
                    "cancelled backup job {job} did not conclude within {CANCEL_TIMEOUT:?}"
                ))));
            }
            Some(_) => {}
        }
        wait_event(events, job, POLL, &mut event_error).await?;
    }
}

impl QemuDriver {
    pub(crate) async fn backup_disk_impl(
        &self,
        id: &str,
        job: &BackupJob,
        progress: &(dyn Fn(u64, u64) -> bool + Send + Sync),
    ) -> Result<BackupReport, HypervisorError> {
        validate_id(id)?;
        check_name("device id", &job.device_id)?;
        check_name("bitmap name", &job.new_bitmap)?;
        if let Some(since) = &job.since_bitmap {
            check_name("bitmap name", since)?;
            if *since == job.new_bitmap {
                return Err(invalid(format!(
                    "the new bitmap and the since bitmap are both {since:?}"
                )));
            }
        }
        let target = check_target(&job.target)?;
        let qmp = self.qmp(id).await?;
        // Subscribe before anything starts so no event of our job is missed.
        let mut events = qmp.events();
        cleanup_leftovers(&qmp, id).await;
        let disk = find_node(&qmp, id, &job.device_id).await?;
        if let Some(since) = &job.since_bitmap {
            if !disk.bitmaps.contains(since) {
                return Err(invalid(format!(
                    "bitmap {since:?} is not on disk {} of VM {id} (QEMU restarted or the active node changed): a full backup is needed",
                    job.device_id
                )));
            }
        }
        if disk.bitmaps.contains(&job.new_bitmap) {
            return Err(invalid(format!(
                "bitmap {:?} already exists on disk {} of VM {id}",
                job.new_bitmap, job.device_id
            )));
        }
        let names = Names::new();
        qmp.execute_with_timeout(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": names.node,
                "file": { "driver": "file", "filename": target },
            }),
            COMMAND_TIMEOUT,
        )
        .await?;

        let mut backup = json!({
            "job-id": names.job,
            "device": disk.node,
            "target": names.node,
            // Keep the concluded job (and its error) until we have read it.
            "auto-dismiss": false,
        });
        if let Some(speed) = job.speed {
            backup["speed"] = json!(speed);
        }
        match &job.since_bitmap {
            None => backup["sync"] = json!("full"),
            Some(since) => {
                backup["sync"] = json!("bitmap");
                backup["bitmap"] = json!(since);
                backup["bitmap-mode"] = json!("never");
            }
        }
        let actions = json!({ "actions": [
            { "type": "block-dirty-bitmap-add", "data": {
                "node": disk.node,
                "name": job.new_bitmap,
                // Only qcow2 can store bitmaps; there they survive a QEMU restart.
                "persistent": disk.driver == "qcow2",
            }},
            { "type": "blockdev-backup", "data": backup },
        ]});
        let started = Instant::now();
        if let Err(e) = qmp
            .execute_with_timeout("transaction", actions, COMMAND_TIMEOUT)
            .await
        {
            // A transaction is all or nothing: only the target node is ours to undo.
            if let Err(e2) = del_node(&qmp, &names.node).await {
                tracing::warn!(%id, node = %names.node, error = %e2, "cannot delete backup target node");
            }
            return Err(e.into());
        }
        tracing::info!(%id, device = %job.device_id, job = %names.job, target = %target,
            since = ?job.since_bitmap, "backup started");

        let outcome = wait_job(&qmp, &names.job, &mut events, progress).await;
        let closed = matches!(
            outcome,
            Err(JobEnd::Failed(HypervisorError::Qmp(QmpError::Closed)))
        );
        if !closed {
            dismiss(&qmp, &names.job).await;
        }
        let end = match outcome {
            Ok(total) => match del_node(&qmp, &names.node).await {
                Ok(()) => {
                    let report = BackupReport {
                        duration: started.elapsed(),
                        bytes_total: total,
                    };
                    tracing::info!(%id, device = %job.device_id, bytes = total,
                        ms = report.duration.as_millis() as u64, "backup completed");
                    return Ok(report);
                }
                // The file would stay open in QEMU: not a usable backup.
                Err(e) => JobEnd::Failed(e.into()),
            },
            Err(end) => {
                if !closed {
                    if let Err(e) = del_node(&qmp, &names.node).await {
                        tracing::warn!(%id, node = %names.node, error = %e, "cannot delete backup target node");
                    }
                }
                end
            }
        };
        if !closed {
            drop_bitmap(&qmp, &disk.node, &job.new_bitmap).await;
        }
        match end {
            JobEnd::Cancelled => Err(HypervisorError::Cancelled(format!(
                "backup of disk {} of VM {id}",
                job.device_id
            ))),
            JobEnd::Failed(e) => {
                tracing::warn!(%id, device = %job.device_id, error = %e, "backup failed");
                Err(e)
            }
        }
    }

    pub(crate) async fn disk_bitmaps_impl(
        &self,
        id: &str,
        device_id: &str,
    ) -> Result<Vec<String>, HypervisorError> {
        validate_id(id)?;
        check_name("device id", device_id)?;
        let qmp = self.qmp(id).await?;
        let disk = find_node(&qmp, id, device_id).await?;
        // A bitmap left unclean by a QEMU crash can never be used again: drop it, so that the
        // caller sees it missing and takes a full backup.
        for name in &disk.inconsistent {
            tracing::warn!(%id, device = %device_id, bitmap = %name, "removing an inconsistent dirty bitmap");
            drop_bitmap(&qmp, &disk.node, name).await;
        }
        Ok(disk.bitmaps)
    }

    pub(crate) async fn remove_bitmap_impl(
        &self,
        id: &str,
        device_id: &str,
        name: &str,
    ) -> Result<(), HypervisorError> {
        validate_id(id)?;
        check_name("device id", device_id)?;
        if name.is_empty() || name.len() > MAX_BITMAP_NAME {
            return Err(invalid(format!(
                "bitmap name must be 1-{MAX_BITMAP_NAME} bytes"
            )));
        }
        let qmp = self.qmp(id).await?;
        let disk = find_node(&qmp, id, device_id).await?;
        if !disk.bitmaps.iter().any(|b| b == name) {
            return Ok(());
        }
        qmp.execute_with_timeout(
            "block-dirty-bitmap-remove",
            json!({ "node": disk.node, "name": name }),
            COMMAND_TIMEOUT,
        )
        .await?;
        tracing::info!(%id, device = %device_id, bitmap = %name, "dirty bitmap removed");
        Ok(())
    }
}
