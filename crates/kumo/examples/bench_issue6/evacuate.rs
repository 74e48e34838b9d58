//! Figure 4: evacuating a host that runs BENCH6_EVAC_VMS t1.nano guests.

use std::time::{Duration, Instant};

use kumo_types::migration::{Evacuation, Migration};
use serde_json::{json, Value};

use crate::util::{self, ms, stat};
use crate::{Bench, BenchError, Result, H1, H2, H3, HOST_NAMES};

pub async fn figure(b: &mut Bench) -> Result<()> {
    let c = b.cluster.client();
    let n = b.knobs.evac_vms;
    b.step(&format!("figure 4: evacuation of {n} VMs from h1"));
    // All on h1; h3 stays in maintenance through the evacuation, so every VM goes to h2.
    for h in [H2, H3] {
        util::set_host_state(&c, HOST_NAMES[h], "maintenance").await?;
    }
    let mut vms = vec![];
    for i in 1..=n {
        let inst = util::create_instance(
            &c,
            json!({ "name": format!("ev{i}"), "image": "demo", "instance_type": "t1.nano" }),
        )
        .await?;
        vms.push(inst.id);
    }
    util::set_host_state(&c, HOST_NAMES[H2], "up").await?;
    for id in &vms {
        util::wait_booted(&c, id).await?;
        if util::host_index_of(&c, id).await? != H1 {
            return Err(BenchError::Check(format!("{id} is not on h1")));
        }
    }
    b.step(&format!("{n} VMs booted on h1; 5 s to settle"));
    tokio::time::sleep(Duration::from_secs(5)).await;

    let t0 = Instant::now();
    let e: Evacuation = c
        .post(
            &format!("/api/v1/hosts/{}/evacuate", HOST_NAMES[H1]),
            &json!({}),
        )
        .await?;
    let answered_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let deadline = t0 + Duration::from_secs(600);
    let op = loop {
        let op = c.operation(&e.operation_id).await?;
        if op.state != "running" {
            break op;
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout(format!(
                "evacuation {}",
                e.operation_id
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let total_s = t0.elapsed().as_secs_f64();
    b.step(&format!(
        "evacuation ended: {} after {total_s:.1} s",
        op.state
    ));

    let mut rows = vec![];
    let mut totals = vec![];
    let mut failed = vec![];
    // The call answers with every item `pending`: the migrations are made as they start.
    for item in &e.items {
        let page: kumo_types::api::Page<Migration> = c
            .get(&format!("/api/v1/migrations?instance={}", item.instance_id))
            .await?;
        let Some(m) = page
            .items
            .into_iter()
            .find(|m| m.reason == "evacuate" && m.created_at >= op.created_at)
        else {
            failed.push(format!(
                "{}: no migration ({}, {:?})",
                item.instance_id, item.result, item.reason
            ));
            continue;
        };
        if m.step != "done" {
            failed.push(format!(
                "{}: migration {} {} ({:?})",
                item.instance_id, m.id, m.step, m.error
            ));
            continue;
        }
        // When the controller started and finished it, counted from the evacuation's start.
        let rel = |t: chrono::DateTime<chrono::Utc>| (t - op.created_at).num_milliseconds() as f64;
        let total = stat(&m, "total_ms")?;
        totals.push(total);
        let dest = c
            .host(&m.dest_host)
            .await
            .map(|h| h.name)
            .unwrap_or(m.dest_host.clone());
        rows.push(vec![
            item.instance_id.clone(),
            dest,
            m.mode.clone(),
            ms(Some(rel(m.created_at))),
            ms(Some(rel(m.updated_at))),
            ms(Some(total)),
            ms(stat(&m, "downtime_ms").ok()),
            ms(stat(&m, "controller_ms").ok()),
        ]);
    }
    rows.sort_by(|a, b| {
        let k = |r: &Vec<String>| r[3].parse::<f64>().unwrap_or(f64::MAX);
        k(a).total_cmp(&k(b))
    });
    let mut on_h2 = 0;
    for id in &vms {
        if util::host_index_of(&c, id).await? == H2 && util::qemu_pid(b, H2, id).is_some() {
            on_h2 += 1;
        }
    }

    println!("figure 4: POST /api/v1/hosts/h1/evacuate with {n} running t1.nano guests on h1 (shared pool; h3 in maintenance, so all go to h2; kumo migrates two at a time)");
    print!(
        "{}",
        util::table(
            &[
                "instance",
                "to",
                "mode",
                "started at ms (from the call)",
                "done at ms",
                "total_ms",
                "downtime_ms",
                "controller_ms",
            ],
            &rows
        )
    );
    if !failed.is_empty() {
        println!("  not migrated: {}", failed.join("; "));
    }
    let sum: f64 = totals.iter().sum();
    println!(
        "RESULT evacuation: {n} VMs, evacuate call → operation {} in {total_s:.1} s (the call answered in {answered_ms:.0} ms); {} migrated, {on_h2} running on h2 afterwards; per-VM total_ms median {:.0}, max {:.0}, sum {:.1} s (no goal in the issue)",
        op.state,
        totals.len(),
        util::median(&totals),
        totals.iter().cloned().fold(f64::NAN, f64::max),
        sum / 1000.0,
    );

    let _: Value = c
        .post(
            &format!("/api/v1/hosts/{}/return", HOST_NAMES[H1]),
            &json!({ "move_home": false }),
        )
        .await?;
    util::set_host_state(&c, HOST_NAMES[H3], "up").await?;
    util::terminate_all(b, &vms).await?;
    if op.state != "succeeded" || on_h2 != n {
        return Err(BenchError::Check(format!(
            "the evacuation {}: {on_h2} of {n} VMs run on h2; {}",
            op.state,
            failed.join("; ")
        )));
    }
    Ok(())
}
