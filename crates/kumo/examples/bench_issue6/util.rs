//! What every figure needs: knobs, the API calls it waits on, processes, medians and tables.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_types::api::{ImportImage, Instance};
use kumo_types::migration::Migration;
use kumo_types::InstanceState;
use serde_json::{json, Value};

use crate::{Bench, BenchError, Knobs, Result, HOST_NAMES};

/// The guest prints this (then its id) as the second thing its /init does.
pub const BOOTED: &str = "KUMO-GUEST-BOOTED id=";
/// Only there to stop a hang: several TCG guests booting at once on a busy 2-core machine.
pub const BOOT: Duration = Duration::from_secs(300);
/// Only there to stop a hang.
pub const MIGRATION: Duration = Duration::from_secs(300);

/// An integer knob from the environment, `default` when unset; out of `min..=max` is an error.
pub fn env_num(name: &str, default: u64, min: u64, max: u64) -> Result<u64> {
    let Ok(s) = std::env::var(name) else {
        return Ok(default);
    };
    match s.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(BenchError::Config(format!(
            "{name}={s:?}: a whole number from {min} to {max}"
        ))),
    }
}

/// Run a command to its end; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let text = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BenchError::io(format!("running {text}"), e))?;
    if !out.status.success() {
        return Err(BenchError::Command {
            cmd: text,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// The first line a command prints, or "?" (for the environment line only).
fn first_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// One line naming the machine, the software and the settings of this run.
pub async fn env_line(k: &Knobs) -> String {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let dirty = Command::new("git")
        .args(["-C", repo, "status", "--porcelain"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0);
    format!(
        "env: {} {cpus} CPUs ({model}), load {}, kernel {}, {}, git {} (+{dirty} uncommitted paths), kumo {}, figures {:?}, runs: migration {} per side, storage {} per side ({} MiB of data), failover {}, evacuation of {} VMs",
        first_line("date", &["-u", "+%Y-%m-%dT%H:%MZ"]),
        loadavg(),
        first_line("uname", &["-r"]),
        first_line("qemu-system-x86_64", &["--version"]),
        first_line("git", &["-C", repo, "rev-parse", "--short", "HEAD"]),
        k.kumo_bin.display(),
        k.figures,
        k.mig_runs,
        k.storage_runs,
        k.data_mib,
        k.failover_runs,
        k.evac_vms,
    )
}

/// `kumo dev build-guest --out DIR` (a few seconds with a warm package cache).
pub async fn build_guest(kumo: &Path, out: &Path) -> Result<()> {
    run(Command::new(kumo)
        .args(["dev", "build-guest", "--out"])
        .arg(out))?;
    Ok(())
}

/// Import an image and wait until its operation succeeds; returns the image id.
pub async fn import_wait(c: &Client, req: &ImportImage) -> Result<String> {
    let started = c.import_image(req).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let op = c.operation(&started.operation.id).await?;
        match op.state.as_str() {
            "succeeded" => return Ok(started.image.id),
            "failed" => {
                return Err(BenchError::Check(format!(
                    "import of {} failed: {:?}",
                    req.name, op.error
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout(format!("import of {}", req.name)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn image_req(name: &str, kind: &str, path: &Path) -> ImportImage {
    ImportImage {
        name: name.into(),
        kind: Some(kind.into()),
        path: path.display().to_string(),
        format: None,
        kernel_id: None,
        ramdisk_id: None,
        cmdline: None,
        public: true,
    }
}

/// The test guest as image `demo` (kernel + initrd + disk), as the integration tests import it.
pub async fn import_demo(b: &Bench) -> Result<()> {
    import_disk_image(b, "demo", &b.guest.join("disk.qcow2")).await
}

/// A disk image booted with the test guest's kernel and initrd (imported once, as `demo-kernel`
/// and `demo-initrd`).
pub async fn import_disk_image(b: &Bench, name: &str, disk: &Path) -> Result<()> {
    let c = b.cluster.client();
    let images = c.images().await?;
    let find = |n: &str| images.iter().find(|i| i.name == n).map(|i| i.id.clone());
    let k = match find("demo-kernel") {
        Some(id) => id,
        None => {
            import_wait(
                &c,
                &image_req("demo-kernel", "kernel", &b.guest.join("vmlinux")),
            )
            .await?
        }
    };
    let r = match find("demo-initrd") {
        Some(id) => id,
        None => {
            import_wait(
                &c,
                &image_req("demo-initrd", "ramdisk", &b.guest.join("initrd.img")),
            )
            .await?
        }
    };
    let mut req = image_req(name, "disk", disk);
    req.kernel_id = Some(k);
    req.ramdisk_id = Some(r);
    req.cmdline = Some("console=ttyS0 quiet".into());
    import_wait(&c, &req).await?;
    Ok(())
}

pub async fn create_instance(c: &Client, body: Value) -> Result<Instance> {
    let req: kumo_types::api::CreateInstance = serde_json::from_value(body)?;
    Ok(c.create_instance(&req, None).await?)
}

/// Until the instance is running and its console shows its boot marker.
pub async fn wait_booted(c: &Client, id: &str) -> Result<Instance> {
    let deadline = Instant::now() + BOOT;
    let marker = format!("{BOOTED}{id}");
    loop {
        let i = c.instance(id).await?;
        if i.state == InstanceState::Running
            && c.console(id, 1 << 20)
                .await
                .map(|o| o.output.contains(&marker))
                .unwrap_or(false)
        {
            return Ok(i);
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout(format!(
                "{id} did not boot: {} ({:?})",
                i.state, i.last_error
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn set_host_state(c: &Client, host: &str, state: &str) -> Result<()> {
    c.set_host_state(host, state).await?;
    Ok(())
}

/// The cluster index of the host an instance is placed on.
pub async fn host_index_of(c: &Client, id: &str) -> Result<usize> {
    let i = c.instance(id).await?;
    let host_id = i
        .host_id
        .ok_or_else(|| BenchError::Check(format!("{id} is not placed")))?;
    let name = c.host(&host_id).await?.name;
    HOST_NAMES
        .iter()
        .position(|n| *n == name)
        .ok_or_else(|| BenchError::Check(format!("{id} is on unknown host {name}")))
}

pub async fn start_migration(c: &Client, id: &str, body: Value) -> Result<Migration> {
    Ok(c.post(&format!("/api/v1/instances/{id}/migrate"), &body)
        .await?)
}

/// Poll a migration every 25 ms until it is done (or failed: an error naming why).
pub async fn wait_migration(c: &Client, id: &str) -> Result<Migration> {
    let deadline = Instant::now() + MIGRATION;
    loop {
        let m: Migration = c.get(&format!("/api/v1/migrations/{id}")).await?;
        match m.step.as_str() {
            "done" => return Ok(m),
            "failed" => {
                return Err(BenchError::Check(format!(
                    "migration {id} of {} failed: {:?}",
                    m.instance_id, m.error
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout(format!("migration {id}: {m:?}")));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A number from a migration's stats (`total_ms`, `downtime_ms` ...).
pub fn stat(m: &Migration, key: &str) -> Result<f64> {
    m.stats
        .as_ref()
        .and_then(|s| s[key].as_f64())
        .ok_or_else(|| BenchError::Check(format!("migration {} has no {key}: {:?}", m.id, m.stats)))
}

/// Terminate instances and wait until no host runs a QEMU for any of them.
pub async fn terminate_all(b: &Bench, ids: &[String]) -> Result<()> {
    let c = b.cluster.client();
    for id in ids {
        c.terminate(id).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left: Vec<String> = (0..b.cluster.hosts().len())
            .flat_map(|i| b.cluster.qemu_instances_on(i))
            .filter(|q| ids.contains(q))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout(format!(
                "terminated instances still run: {left:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pid of the QEMU running instance `id` on host `i`.
pub fn qemu_pid(b: &Bench, i: usize, id: &str) -> Option<u32> {
    b.cluster
        .qemu_processes_on(i)
        .into_iter()
        .find(|q| q.instance_id == id)
        .map(|q| q.pid)
}

/// A process's command line, one string per argument.
pub fn cmdline(pid: u32) -> Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| BenchError::io(format!("reading the command line of {pid}"), e))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// The value after `flag` in a command line (first occurrence).
pub fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// The file of the first writable `-blockdev` of a QEMU command line (kumo's root disk).
pub fn root_disk(args: &[String]) -> Result<PathBuf> {
    args.windows(2)
        .filter(|w| w[0] == "-blockdev")
        .filter_map(|w| serde_json::from_str::<Value>(&w[1]).ok())
        .find(|v| v["read-only"] != json!(true))
        .and_then(|v| v["file"]["filename"].as_str().map(PathBuf::from))
        .ok_or_else(|| BenchError::Check("no writable -blockdev in the QEMU command line".into()))
}

/// The `path=` of a `-chardev` with the given id.
pub fn chardev_path(args: &[String], id: &str) -> Option<PathBuf> {
    let prefix = format!("socket,id={id},");
    args.windows(2)
        .filter(|w| w[0] == "-chardev" && w[1].starts_with(&prefix))
        .find_map(|w| {
            w[1].split(',')
                .find_map(|kv| kv.strip_prefix("path="))
                .map(PathBuf::from)
        })
}

/// Bytes of real data in a disk chain: the extents `qemu-img map` reports as data and not zero
/// (the backing chain included, as a full mirror or a convert reads it).
pub fn data_bytes(disk: &Path) -> Result<u64> {
    let out = run(Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(disk))?;
    let extents: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(extents
        .iter()
        .filter(|e| e["data"] == json!(true) && e["zero"] != json!(true))
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

/// The virtual size of a disk.
pub fn virtual_size(disk: &Path) -> Result<u64> {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(disk))?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["virtual-size"]
        .as_u64()
        .ok_or_else(|| BenchError::Check(format!("no virtual size for {}", disk.display())))
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// "MET" or "MISSED".
pub fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

/// A markdown table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n", headers.join(" | "));
    s.push_str(&format!(
        "|{}\n",
        headers.iter().map(|_| "---:|").collect::<String>()
    ));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// A whole number of ms (or "n/a").
pub fn ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.0}"),
        _ => "n/a".into(),
    }
}

/// How many times `needle` occurs in a file (0 when there is no file).
pub fn count_in_file(path: &Path, needle: &str) -> usize {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).matches(needle).count())
        .unwrap_or(0)
}
