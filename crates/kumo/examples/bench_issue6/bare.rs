//! Bare QEMU: kumo's own command line for a guest, run by hand in a host's namespace, and a
//! plain QMP `migrate` between two of them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kumo_hypervisor::qmp::{Qmp, QmpEvent};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::util::{arg_after, root_disk};
use crate::{BenchError, Result};

/// The downtime limit of every migration of the benchmark (kumo's default too).
pub const DOWNTIME_LIMIT_MS: u64 = 300;
/// kumo migrates without a bandwidth limit (`max-bandwidth` = i64::MAX); so does the bare side.
const UNLIMITED: u64 = i64::MAX as u64;

/// kumo's QEMU command line for one guest, to be replayed with other paths.
#[derive(Debug, Clone)]
pub struct Template {
    pub binary: String,
    args: Vec<String>,
    run_dir: String,
    disk: PathBuf,
}

impl Template {
    /// From the running QEMU's `/proc/<pid>/cmdline`.
    pub fn from_args(cmd: Vec<String>) -> Result<Template> {
        let (binary, args) = cmd
            .split_first()
            .map(|(b, a)| (b.clone(), a.to_vec()))
            .ok_or_else(|| BenchError::Check("an empty QEMU command line".into()))?;
        let pidfile = arg_after(&args, "-pidfile")
            .ok_or_else(|| BenchError::Check("kumo's QEMU has no -pidfile".into()))?;
        let run_dir = Path::new(pidfile)
            .parent()
            .map(|p| p.display().to_string())
            .ok_or_else(|| BenchError::Check(format!("pid file {pidfile} has no directory")))?;
        let disk = root_disk(&args)?;
        Ok(Template {
            binary,
            args,
            run_dir,
            disk,
        })
    }

    /// kumo's root disk of the guest.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The node name of the root disk's format node (what drive-mirror takes as `device`).
    pub fn root_node(&self) -> Result<String> {
        let disk = self.disk.display().to_string();
        self.args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .filter_map(|w| serde_json::from_str::<Value>(&w[1]).ok())
            .find(|v| v["file"]["filename"].as_str() == Some(disk.as_str()))
            .and_then(|v| v["node-name"].as_str().map(str::to_string))
            .ok_or_else(|| BenchError::Check("no node name for the root disk".into()))
    }

    /// The command line with its run directory, root disk and tap replaced, without any
    /// `-incoming`/`-S` kumo may have used, plus `-incoming` when given.
    pub fn args_for(
        &self,
        run_dir: &Path,
        disk: &Path,
        tap: &str,
        incoming: Option<&str>,
    ) -> Result<Vec<String>> {
        let new_dir = run_dir.display().to_string();
        let mut out = Vec::with_capacity(self.args.len() + 2);
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-S" => continue,
                "-incoming" => {
                    it.next();
                    continue;
                }
                "-name" => {
                    it.next();
                    // Not `kumo-<id>`: nothing may take it for one of kumo's VMs.
                    out.extend(["-name".to_string(), "bench6-bare".to_string()]);
                    continue;
                }
                "-blockdev" => {
                    let Some(v) = it.next() else { break };
                    let mut j: Value = serde_json::from_str(v)?;
                    if j["file"]["filename"].as_str() == Some(&self.disk.display().to_string()) {
                        j["file"]["filename"] = json!(disk.display().to_string());
                    }
                    out.extend(["-blockdev".to_string(), j.to_string()]);
                    continue;
                }
                "-netdev" => {
                    let Some(v) = it.next() else { break };
                    // A tap of its own (QEMU creates it, unconnected): the guest's NIC stays the
                    // same device, kumo's tap stays kumo's.
                    let v: Vec<String> = v
                        .split(',')
                        .map(|kv| {
                            if kv.starts_with("ifname=") {
                                format!("ifname={tap}")
                            } else {
                                kv.to_string()
                            }
                        })
                        .collect();
                    out.extend(["-netdev".to_string(), v.join(",")]);
                    continue;
                }
                _ => out.push(a.replace(&self.run_dir, &new_dir)),
            }
        }
        if let Some(uri) = incoming {
            out.extend(["-incoming".to_string(), uri.to_string()]);
        }
        Ok(out)
    }
}

/// A bare QEMU in a host's namespace; killed on drop.
pub struct BareQemu {
    child: Child,
    pub run_dir: PathBuf,
    /// The namespace's index in the cluster.
    pub host: usize,
}

impl BareQemu {
    /// `ip netns exec NS qemu ARGS` (ip execs QEMU: the child is QEMU itself).
    pub fn spawn(
        binary: &str,
        netns: &str,
        host: usize,
        run_dir: &Path,
        args: &[String],
    ) -> Result<BareQemu> {
        std::fs::create_dir_all(run_dir)
            .map_err(|e| BenchError::io(format!("creating {}", run_dir.display()), e))?;
        let log = std::fs::File::create(run_dir.join("qemu.log"))
            .map_err(|e| BenchError::io("creating qemu.log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| BenchError::io("creating qemu.log", e))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, binary])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| BenchError::io("starting bare QEMU", e))?;
        Ok(BareQemu {
            child,
            run_dir: run_dir.to_path_buf(),
            host,
        })
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    pub fn console(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// Connect to its QMP socket once QEMU has made it.
    pub async fn qmp(&mut self) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.run_dir.join("qemu.log")).unwrap_or_default();
                return Err(BenchError::Check(format!(
                    "bare QEMU exited ({status}): {}",
                    log.trim()
                )));
            }
            match Qmp::connect(self.qmp_path()).await {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() >= deadline => {
                    return Err(BenchError::qmp("connecting to bare QEMU", e))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Until its console shows the boot marker.
    pub async fn wait_booted(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while crate::util::count_in_file(&self.console(), crate::util::BOOTED) == 0 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError::Check(format!("bare QEMU exited ({status})")));
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout("the bare guest did not boot".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for BareQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The migration capabilities and parameters kumo's agent sets (source and destination).
pub async fn configure(q: &Qmp, source: bool) -> Result<()> {
    let mut caps = vec![
        json!({ "capability": "events", "state": true }),
        json!({ "capability": "return-path", "state": true }),
    ];
    if source {
        caps.push(json!({ "capability": "auto-converge", "state": false }));
    }
    q.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .await
        .map_err(|e| BenchError::qmp("migrate-set-capabilities", e))?;
    if source {
        q.execute(
            "migrate-set-parameters",
            json!({ "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": UNLIMITED }),
        )
        .await
        .map_err(|e| BenchError::qmp("migrate-set-parameters", e))?;
    }
    Ok(())
}

/// One bare migration's figures.
#[derive(Debug, Clone, Copy)]
pub struct BareRun {
    /// QEMU's `total-time` (ms).
    pub total_ms: f64,
    /// QEMU's `downtime` (ms).
    pub downtime_ms: f64,
    /// From the `migrate` command to `query-migrate` saying completed (10 ms polls).
    pub wall_ms: f64,
    /// Source STOP -> destination RESUME, from the events' timestamps.
    pub pause_ms: Option<f64>,
    pub ram_bytes: u64,
    pub passes: u64,
}

/// A QMP event's timestamp in ms since the epoch.
pub fn event_ms(e: &QmpEvent) -> Option<f64> {
    e.timestamp
        .map(|(s, us)| s as f64 * 1000.0 + us as f64 / 1000.0)
}

/// The first `name` event on `rx` within `timeout`: its timestamp.
pub async fn next_event(
    rx: &mut broadcast::Receiver<QmpEvent>,
    name: &str,
    timeout: Duration,
) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if e.event == name => return event_ms(&e),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
        }
    }
}

/// What the source's events tell about a migration: when the guest stopped, and how many
/// dirty-sync passes it took (the `MIGRATION_PASS` events of the `events` capability).
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceEvents {
    pub stop_ms: Option<f64>,
    pub passes: u64,
}

/// Read the source's events up to its STOP (the passes come before it).
pub async fn source_events(
    rx: &mut broadcast::Receiver<QmpEvent>,
    timeout: Duration,
) -> SourceEvents {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = SourceEvents::default();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if e.event == "STOP" => {
                out.stop_ms = event_ms(&e);
                return out;
            }
            Ok(Ok(e)) if e.event == "MIGRATION_PASS" => {
                out.passes = out.passes.max(e.data["pass"].as_u64().unwrap_or(0));
            }
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return out,
        }
    }
}

/// Sleep 0-199 ms: the guest does something every 100 ms (its counter), and QEMU measures the
/// bandwidth in 100 ms windows, so a migration started at a fixed phase would always meet the
/// guest in the same state. A random phase samples them all, on both sides alike.
pub async fn jitter() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let ms = u64::from(nanos.wrapping_mul(2_654_435_761) % 200);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Migrate `src` to `dst` (started with `-incoming tcp:IP:0`) with a plain QMP `migrate`.
pub async fn migrate(src: &mut BareQemu, dst: &mut BareQemu, dst_ip: &str) -> Result<BareRun> {
    let qs = src.qmp().await?;
    let qd = dst.qmp().await?;
    configure(&qd, false).await?;
    let v = qd
        .execute("query-migrate", Value::Null)
        .await
        .map_err(|e| BenchError::qmp("query-migrate (destination)", e))?;
    let port = v["socket-address"][0]["port"]
        .as_str()
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| BenchError::Check(format!("the destination reports no port: {v}")))?;
    configure(&qs, true).await?;
    let mut stops = qs.events();
    let mut resumes = qd.events();
    jitter().await;
    let t0 = Instant::now();
    qs.execute("migrate", json!({ "uri": format!("tcp:{dst_ip}:{port}") }))
        .await
        .map_err(|e| BenchError::qmp("migrate", e))?;
    let deadline = t0 + crate::util::MIGRATION;
    let mut mig = loop {
        let m = qs
            .execute("query-migrate", Value::Null)
            .await
            .map_err(|e| BenchError::qmp("query-migrate", e))?;
        match m["status"].as_str().unwrap_or("none") {
            "completed" => break m,
            "failed" | "cancelled" => {
                return Err(BenchError::Check(format!("bare migration failed: {m}")))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout(format!("bare migration: {m}")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // QEMU sets `completed` a moment before it fills in the times (kumo's agent waits too).
    for _ in 0..20 {
        if mig["total-time"].as_u64().unwrap_or(0) > 0 && mig.get("downtime").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        mig = qs
            .execute("query-migrate", Value::Null)
            .await
            .map_err(|e| BenchError::qmp("query-migrate", e))?;
    }
    let ev = source_events(&mut stops, Duration::from_secs(5)).await;
    let resume = next_event(&mut resumes, "RESUME", Duration::from_secs(10)).await;
    let num = |v: &Value| {
        v.as_f64()
            .ok_or_else(|| BenchError::Check(format!("no figure in {mig}")))
    };
    Ok(BareRun {
        total_ms: num(&mig["total-time"])?,
        downtime_ms: num(&mig["downtime"])?,
        wall_ms,
        pause_ms: ev.stop_ms.zip(resume).map(|(s, r)| r - s),
        ram_bytes: mig["ram"]["transferred"].as_u64().unwrap_or(0),
        passes: ev.passes,
    })
}
