//! One task heartbeats for every host, spread evenly over the interval: host `k` of `n`
//! beats at `k/n` of each interval, so 10,000 hosts never fire at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kumo_types::agent::Heartbeat;
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};

use crate::http::observed;
use crate::{Inner, SimHost, HEARTBEAT_CONCURRENCY};

/// The finest tick: below this, each tick sends several hosts' beats instead.
const MIN_TICK: Duration = Duration::from_millis(5);

#[derive(Debug, Deserialize, Default)]
struct HeartbeatReply {
    /// VMs the controller does not want on the host.
    #[serde(default)]
    delete: Vec<String>,
}

pub(crate) async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let n = inner.hosts.len() as u128;
    if n == 0 {
        return;
    }
    let period = inner.heartbeat_interval;
    let tick = (period / inner.hosts.len().max(1) as u32).clamp(MIN_TICK, period.max(MIN_TICK));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let limit = Arc::new(Semaphore::new(HEARTBEAT_CONCURRENCY));
    let start = Instant::now();
    // Beats scheduled so far; beat `b` is for host `b % n`.
    let mut sent: u128 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let due = start.elapsed().as_nanos() * n / period.as_nanos().max(1);
        // After a long stall (a hung controller), skip ahead rather than burst rounds.
        if due > sent + n {
            sent = due - n;
        }
        while sent < due {
            let host = (sent % n) as usize;
            sent += 1;
            let h = &inner.hosts[host];
            if h.ident.get().is_none() || h.stopped.load(Ordering::Relaxed) {
                continue;
            }
            // Waiting here delays the schedule when the controller is slow: back-pressure
            // instead of an unbounded pile of requests.
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let inner = inner.clone();
            tokio::spawn(async move {
                let h = &inner.hosts[host];
                match beat(&inner, h).await {
                    Ok(()) => inner.counters.heartbeats_ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::debug!(host = %h.name, error = %e, "heartbeat failed");
                        inner
                            .counters
                            .heartbeats_failed
                            .fetch_add(1, Ordering::Relaxed)
                    }
                };
                drop(permit);
            });
        }
    }
}

async fn beat(inner: &Inner, h: &SimHost) -> Result<(), String> {
    let Some(ident) = h.ident.get() else {
        return Ok(());
    };
    let vms = h.vms().iter().map(|(id, v)| observed(id, v)).collect();
    let hb = Heartbeat {
        host_id: ident.host_id.clone(),
        address: h.address.clone(),
        info: h.info.clone(),
        vms,
        repairs: vec![],
        // Simulated hosts never fence (they ignore leases).
        fenced: vec![],
        path: None,
    };
    let url = format!("{}/api/v1/agent/heartbeat", inner.controller);
    let resp = inner
        .http
        .post(&url)
        .bearer_auth(&ident.credential)
        .json(&hb)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("heartbeat answered {}", resp.status()));
    }
    let reply: HeartbeatReply = resp.json().await.unwrap_or_default();
    if !reply.delete.is_empty() {
        let mut vms = h.vms();
        for id in &reply.delete {
            vms.remove(id.as_str());
        }
    }
    Ok(())
}
