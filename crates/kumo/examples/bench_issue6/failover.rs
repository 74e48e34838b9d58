//! Figure 3: failover of an HA guest when its whole host is killed, with default settings
//! (heartbeat every 1 s, host down after 3 s, lease 6 s).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{self, ms, BOOTED};
use crate::{Bench, BenchError, Result, H2, H3, HOST_NAMES};

/// Only there to stop a hang (the goal is 15 s).
const FAILOVER: Duration = Duration::from_secs(120);

/// What the API showed after the kill, first seen (ms since the kill).
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    down: Option<f64>,
    placed: Option<f64>,
}

/// The console log of the instance on host `to`, from its path on host `from`
/// (`<data dir>/run/<id>/console.log`: the same layout on every host).
fn console_on(b: &Bench, from: usize, to: usize, path: &Path) -> PathBuf {
    let hosts = b.cluster.hosts();
    match path.strip_prefix(&hosts[from].data_dir) {
        Ok(rel) => hosts[to].data_dir.join(rel),
        Err(_) => path.to_path_buf(),
    }
}

/// Polls the API every 100 ms (its own task, so the console polling is not held up): when the
/// killed host is seen down, and when the instance is placed elsewhere.
fn watch_api(
    b: &Bench,
    vm: &str,
    from: usize,
    t0: Instant,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (c, vm, s) = (b.cluster.client(), vm.to_string(), seen.clone());
    let from_name = HOST_NAMES[from];
    let task = tokio::spawn(async move {
        loop {
            let now = || t0.elapsed().as_secs_f64() * 1000.0;
            if let Ok(hosts) = c.hosts().await {
                let down = hosts
                    .iter()
                    .any(|h| h.name == from_name && (h.state == "down" || h.state == "fenced"));
                let from_id = hosts
                    .iter()
                    .find(|h| h.name == from_name)
                    .map(|h| h.id.clone());
                let placed = match c.instance(&vm).await {
                    Ok(i) => i.host_id.is_some() && i.host_id != from_id,
                    Err(_) => false,
                };
                if let Ok(mut g) = s.lock() {
                    if down && g.down.is_none() {
                        g.down = Some(now());
                    }
                    if placed && g.placed.is_none() {
                        g.placed = Some(now());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (seen, task)
}

/// Aborts the API watcher however the run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn figure(b: &mut Bench) -> Result<()> {
    let c = b.cluster.client();
    b.step("figure 3: HA failover after a host is killed");
    for h in [H2, H3] {
        util::set_host_state(&c, HOST_NAMES[h], "maintenance").await?;
    }
    let vm = util::create_instance(
        &c,
        json!({ "name": "ha1", "image": "demo", "instance_type": "t1.nano", "ha": true }),
    )
    .await?
    .id;
    for h in [H2, H3] {
        util::set_host_state(&c, HOST_NAMES[h], "up").await?;
    }
    util::wait_booted(&c, &vm).await?;
    let marker = format!("{BOOTED}{vm}");
    let mut rows = vec![];
    let mut times = vec![];
    let mut broken = None;
    for k in 0..b.knobs.failover_runs {
        let from = util::host_index_of(&c, &vm).await?;
        let pid = util::qemu_pid(b, from, &vm).ok_or_else(|| {
            BenchError::Check(format!("no QEMU for {vm} on {}", HOST_NAMES[from]))
        })?;
        let args = util::cmdline(pid)?;
        // The serial chardev's `logfile=`.
        let log = args
            .iter()
            .find_map(|a| a.split(',').find_map(|kv| kv.strip_prefix("logfile=")))
            .map(PathBuf::from)
            .ok_or_else(|| BenchError::Check("kumo's QEMU has no console log".into()))?;
        let others: Vec<(usize, PathBuf, usize)> = (0..b.cluster.hosts().len())
            .filter(|i| *i != from)
            .map(|i| {
                let p = console_on(b, from, i, &log);
                let n = util::count_in_file(&p, &marker);
                (i, p, n)
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t0 = Instant::now();
        b.cluster.kill_host(from);
        let killed_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let (seen, task) = watch_api(b, &vm, from, t0);
        let _abort = AbortOnDrop(task);
        let mut qemu_at = None;
        let booted = loop {
            let now = t0.elapsed();
            if let Some((i, _, _)) = others
                .iter()
                .find(|(_, p, n)| util::count_in_file(p, &marker) > *n)
            {
                break Some((*i, now.as_secs_f64() * 1000.0));
            }
            if qemu_at.is_none()
                && others
                    .iter()
                    .any(|(i, _, _)| util::qemu_pid(b, *i, &vm).is_some())
            {
                qemu_at = Some(now.as_secs_f64() * 1000.0);
            }
            if now >= FAILOVER {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let s = seen.lock().map(|g| *g).unwrap_or_default();
        drop(_abort);
        // The host comes back (as after a reboot) before the next run.
        b.cluster.start_agent(from)?;
        b.cluster
            .wait_host_state(HOST_NAMES[from], "up", Duration::from_secs(90))
            .await?;
        let Some((to, t)) = booted else {
            broken = Some(format!(
                "run {}: no boot marker on another host {} s after {} was killed (API: host down at {}, placed elsewhere at {} ms)",
                k + 1,
                FAILOVER.as_secs(),
                HOST_NAMES[from],
                ms(s.down),
                ms(s.placed)
            ));
            break;
        };
        rows.push(vec![
            (k + 1).to_string(),
            HOST_NAMES[from].to_string(),
            HOST_NAMES[to].to_string(),
            ms(Some(killed_ms)),
            ms(s.down),
            ms(s.placed),
            ms(qemu_at),
            ms(Some(t)),
        ]);
        eprintln!(
            "bench6:   run {}: {}",
            k + 1,
            rows[rows.len() - 1].join(" ")
        );
        times.push(t);
        // Let the guest settle on its new host (and the old one forget it) before the next kill.
        util::wait_booted(&c, &vm).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        if util::qemu_pid(b, from, &vm).is_some() {
            return Err(BenchError::Check(format!(
                "{} runs {vm} again after coming back",
                HOST_NAMES[from]
            )));
        }
    }
    util::terminate_all(b, std::slice::from_ref(&vm)).await?;

    println!("figure 3: HA failover, t1.nano guest with \"ha\": true on the shared pool, its host killed (agent, QEMU, dnsmasq: Cluster::kill_host); defaults: heartbeat 1 s, host down after 3 s, lease 6 s; times in ms from just before the kill");
    print!(
        "{}",
        util::table(
            &[
                "run",
                "killed",
                "booted on",
                "kill done",
                "API: host down",
                "API: placed elsewhere",
                "QEMU started there",
                "boot marker there",
            ],
            &rows
        )
    );
    if let Some(why) = broken {
        println!("RESULT failover: NOT MEASURED: {why}");
        return Err(BenchError::Check(format!("failover: {why}")));
    }
    let m = util::median(&times) / 1000.0;
    println!(
        "RESULT failover: host killed → boot marker on another host median {m:.1} s, max {:.1} s (goal <= 15 s: {}; Proxmox VE about 120 s) [n={}, default settings]",
        times.iter().cloned().fold(f64::NAN, f64::max) / 1000.0,
        util::verdict(m <= 15.0),
        times.len(),
    );
    Ok(())
}
