//! Figure 1: memory-only migration between the two hosts of the shared pool, kumo against bare
//! QEMU migrating the same guest between the same two namespaces.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kumo_hypervisor::qmp::Qmp;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::bare::{self, BareQemu, BareRun, Template, DOWNTIME_LIMIT_MS};
use crate::util::{self, ms, stat};
use crate::{Bench, BenchError, Result, H1, H2, H3, HOST_NAMES};

/// One kumo migration's figures.
struct KumoRun {
    total_ms: f64,
    memory_ms: f64,
    downtime_ms: f64,
    controller_ms: f64,
    /// From just before the API call until the migration reads `done` (25 ms polls).
    api_ms: f64,
    /// Source STOP -> destination RESUME, from the events' timestamps.
    pause_ms: Option<f64>,
    ram_bytes: f64,
    /// Dirty-sync passes (source events).
    passes: u64,
}

fn other(i: usize) -> usize {
    if i == H1 {
        H2
    } else {
        H1
    }
}

/// A disk for the bare guest: a fresh overlay of kumo's backing image (what kumo's disk was when
/// the instance was created), or a copy when kumo's disk has no backing file.
pub fn disk_like(kumo_disk: &Path, out: &Path) -> Result<()> {
    let info = util::run(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(kumo_disk),
    )?;
    let v: Value = serde_json::from_slice(&info.stdout)?;
    let size = v["virtual-size"]
        .as_u64()
        .ok_or_else(|| BenchError::Check(format!("no virtual size for {}", kumo_disk.display())))?;
    match v["full-backing-filename"].as_str() {
        Some(backing) => {
            let fmt = v["backing-filename-format"].as_str().unwrap_or("qcow2");
            util::run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing])
                    .arg(out)
                    .arg(size.to_string()),
            )?;
        }
        None => {
            util::run(
                Command::new("qemu-img")
                    .args(["convert", "-U", "-O", "qcow2"])
                    .arg(kumo_disk)
                    .arg(out),
            )?;
        }
    }
    Ok(())
}

/// Watch a namespace for the instance's QEMU (the incoming one), attach to its spare QMP socket
/// and send the timestamp of its RESUME event. Gives up as soon as the receiver is gone, so that
/// it never keeps that socket (one client at a time) from the next run.
fn watch_resume(netns: String, id: String, mut tx: oneshot::Sender<Option<f64>>) {
    tokio::spawn(async move {
        let q = loop {
            let found = kumo_testcluster::qemu_processes_in(&netns)
                .into_iter()
                .find(|p| p.instance_id == id)
                .and_then(|p| util::cmdline(p.pid).ok())
                .and_then(|a| util::chardev_path(&a, "qmp-aux"));
            if let Some(path) = found {
                if let Ok(q) = Qmp::connect_with_timeout(&path, Duration::from_secs(2)).await {
                    break q;
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut rx = q.events();
        let t = tokio::select! {
            t = bare::next_event(&mut rx, "RESUME", util::MIGRATION) => t,
            _ = tx.closed() => return,
        };
        let _ = tx.send(t);
    });
}

async fn kumo_run(b: &Bench, vm: &str, from: usize, to: usize) -> Result<KumoRun> {
    let c = b.cluster.client();
    let pid = util::qemu_pid(b, from, vm)
        .ok_or_else(|| BenchError::Check(format!("no QEMU for {vm} on {}", HOST_NAMES[from])))?;
    let aux = util::chardev_path(&util::cmdline(pid)?, "qmp-aux")
        .ok_or_else(|| BenchError::Check("kumo's QEMU has no qmp-aux socket".into()))?;
    let qs = Qmp::connect(&aux)
        .await
        .map_err(|e| BenchError::qmp("kumo's source (qmp-aux)", e))?;
    let mut stops = qs.events();
    let (tx, rx) = oneshot::channel();
    watch_resume(b.cluster.hosts()[to].netns.clone(), vm.to_string(), tx);
    bare::jitter().await;
    let t0 = Instant::now();
    let m = util::start_migration(
        &c,
        vm,
        json!({ "host": HOST_NAMES[to], "downtime_ms": DOWNTIME_LIMIT_MS }),
    )
    .await?;
    if m.mode != "shared" {
        return Err(BenchError::Check(format!(
            "expected a memory-only migration, kumo chose {}",
            m.mode
        )));
    }
    let m = util::wait_migration(&c, &m.id).await?;
    let api_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let ev = bare::source_events(&mut stops, Duration::from_secs(1)).await;
    let resume = tokio::time::timeout(Duration::from_secs(2), rx)
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten();
    Ok(KumoRun {
        total_ms: stat(&m, "total_ms")?,
        memory_ms: stat(&m, "memory_ms")?,
        downtime_ms: stat(&m, "downtime_ms")?,
        controller_ms: stat(&m, "controller_ms")?,
        api_ms,
        pause_ms: ev.stop_ms.zip(resume).map(|(s, r)| r - s),
        ram_bytes: stat(&m, "ram_bytes")?,
        passes: ev.passes,
    })
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    util::median(&v.collect::<Vec<_>>())
}

pub async fn figure(b: &mut Bench) -> Result<()> {
    let c = b.cluster.client();
    b.step("figure 1: memory-only migration, kumo vs bare QEMU");
    // The guest starts in the shared pool (h1 or h2).
    util::set_host_state(&c, HOST_NAMES[H3], "maintenance").await?;
    let vm = util::create_instance(
        &c,
        json!({ "name": "mem1", "image": "demo", "instance_type": "t1.nano" }),
    )
    .await?
    .id;
    util::wait_booted(&c, &vm).await?;
    util::set_host_state(&c, HOST_NAMES[H3], "up").await?;
    let start = util::host_index_of(&c, &vm).await?;
    let pid = util::qemu_pid(b, start, &vm)
        .ok_or_else(|| BenchError::Check(format!("no QEMU for {vm}")))?;
    let tpl = Template::from_args(util::cmdline(pid)?)?;
    let dir = b.scratch.join("bare1");
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("creating bare1", e))?;
    let disk = dir.join("disk.qcow2");
    disk_like(tpl.disk(), &disk)?;
    let ns = |i: usize| b.cluster.hosts()[i].netns.clone();
    let ip = |i: usize| b.cluster.hosts()[i].mgmt_ip.clone();
    let r0 = dir.join("r0");
    let mut cur = BareQemu::spawn(
        &tpl.binary,
        &ns(start),
        start,
        &r0,
        &tpl.args_for(&r0, &disk, "kb6m0", None)?,
    )?;
    cur.wait_booted(util::BOOT).await?;
    b.step(&format!(
        "kumo's {vm} and the bare guest both run on {}",
        HOST_NAMES[start]
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut rows = vec![];
    let mut kumo: Vec<KumoRun> = vec![];
    let mut bares: Vec<BareRun> = vec![];
    for k in 0..b.knobs.mig_runs {
        let from = util::host_index_of(&c, &vm).await?;
        let to = other(from);
        let kr = kumo_run(b, &vm, from, to).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let to_b = other(cur.host);
        let rd = dir.join(format!("r{}", k + 1));
        let incoming = format!("tcp:{}:0", ip(to_b));
        let mut next = BareQemu::spawn(
            &tpl.binary,
            &ns(to_b),
            to_b,
            &rd,
            &tpl.args_for(&rd, &disk, &format!("kb6m{}", k + 1), Some(&incoming))?,
        )?;
        let br = bare::migrate(&mut cur, &mut next, &ip(to_b)).await?;
        // The paused source goes, as kumo's cleanup removes its own.
        cur = next;
        rows.push(vec![
            (k + 1).to_string(),
            format!("{}→{}", HOST_NAMES[from], HOST_NAMES[to]),
            ms(Some(kr.total_ms)),
            ms(Some(kr.memory_ms)),
            ms(Some(kr.downtime_ms)),
            ms(kr.pause_ms),
            ms(Some(kr.api_ms)),
            ms(Some(kr.controller_ms)),
            format!("{:.0}", kr.ram_bytes / 1048576.0),
            kr.passes.to_string(),
            ms(Some(br.total_ms)),
            ms(Some(br.downtime_ms)),
            ms(br.pause_ms),
            ms(Some(br.wall_ms)),
            format!("{:.0}", br.ram_bytes as f64 / 1048576.0),
            br.passes.to_string(),
        ]);
        eprintln!(
            "bench6:   run {}: {}",
            k + 1,
            rows[rows.len() - 1].join(" ")
        );
        kumo.push(kr);
        bares.push(br);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(cur);
    util::terminate_all(b, std::slice::from_ref(&vm)).await?;

    println!("figure 1: memory-only migration of the test guest (t1.nano, 128 MiB) between h1 and h2 (shared pool), downtime limit {DOWNTIME_LIMIT_MS} ms, no bandwidth limit");
    print!(
        "{}",
        util::table(
            &[
                "run",
                "direction",
                "kumo total_ms",
                "kumo memory_ms (QEMU total-time)",
                "kumo downtime_ms",
                "kumo pause STOP→RESUME",
                "kumo API→done",
                "kumo controller_ms",
                "kumo RAM MiB",
                "kumo passes",
                "bare total-time",
                "bare downtime",
                "bare pause STOP→RESUME",
                "bare migrate→completed",
                "bare RAM MiB",
                "bare passes",
            ],
            &rows
        )
    );
    // Per number of dirty-sync passes: like against like.
    for passes in 1..=3 {
        let k: Vec<&KumoRun> = kumo.iter().filter(|r| r.passes == passes).collect();
        let bb: Vec<&BareRun> = bares.iter().filter(|r| r.passes == passes).collect();
        if k.is_empty() && bb.is_empty() {
            continue;
        }
        println!(
            "  runs with {passes} pass(es): kumo n={}, memory_ms median {:.0}, downtime_ms {:.0}, pause {:.0}; bare n={}, total-time median {:.0}, downtime {:.0}, pause {:.0}",
            k.len(),
            med(k.iter().map(|r| r.memory_ms)),
            med(k.iter().map(|r| r.downtime_ms)),
            med(k.iter().filter_map(|r| r.pause_ms)),
            bb.len(),
            med(bb.iter().map(|r| r.total_ms)),
            med(bb.iter().map(|r| r.downtime_ms)),
            med(bb.iter().filter_map(|r| r.pause_ms)),
        );
    }
    let kt = med(kumo.iter().map(|r| r.total_ms));
    let km = med(kumo.iter().map(|r| r.memory_ms));
    let kd = med(kumo.iter().map(|r| r.downtime_ms));
    let kp = med(kumo.iter().filter_map(|r| r.pause_ms));
    let ka = med(kumo.iter().map(|r| r.api_ms));
    let kc = med(kumo.iter().map(|r| r.controller_ms));
    let bt = med(bares.iter().map(|r| r.total_ms));
    let bd = med(bares.iter().map(|r| r.downtime_ms));
    let bp = med(bares.iter().filter_map(|r| r.pause_ms));
    let bw = med(bares.iter().map(|r| r.wall_ms));
    let (rt, rd) = (kt / bt, kd / bd);
    let avg = |v: Vec<f64>| util::mean(&v);
    println!(
        "  means (the distributions are bimodal, see the passes): kumo total_ms {:.0}, memory_ms {:.0}, downtime_ms {:.0}, pause {:.0}; bare total-time {:.0}, downtime {:.0}, pause {:.0}",
        avg(kumo.iter().map(|r| r.total_ms).collect()),
        avg(kumo.iter().map(|r| r.memory_ms).collect()),
        avg(kumo.iter().map(|r| r.downtime_ms).collect()),
        avg(kumo.iter().filter_map(|r| r.pause_ms).collect()),
        avg(bares.iter().map(|r| r.total_ms).collect()),
        avg(bares.iter().map(|r| r.downtime_ms).collect()),
        avg(bares.iter().filter_map(|r| r.pause_ms).collect()),
    );
    println!(
        "  medians: kumo total_ms {kt:.0}, memory_ms {km:.0}, downtime_ms {kd:.0}, pause {kp:.0}, API→done {ka:.0}, controller_ms {kc:.0}; bare total-time {bt:.0}, downtime {bd:.0}, pause {bp:.0}, migrate→completed {bw:.0}"
    );
    println!(
        "RESULT migration: total time kumo {kt:.0} ms (agent total_ms) vs bare QEMU {bt:.0} ms (total-time), ratio {rt:.2} (goal <= 1.1: {}); downtime kumo {kd:.0} vs bare {bd:.0} ms, ratio {rd:.2} (goal <= 1.1: {}); extra: kumo's own QEMU total-time {km:.0} ms (ratio {:.2}), guest pause STOP→RESUME kumo {kp:.0} vs bare {bp:.0} ms (ratio {:.2}), API call→done {ka:.0} ms [medians, n={} each, alternating, TCG]",
        util::verdict(rt <= 1.1),
        util::verdict(rd <= 1.1),
        km / bt,
        kp / bp,
        b.knobs.mig_runs,
    );
    Ok(())
}
