//! Figure 2: storage migration (the disk mirrored over NBD) between the shared pool of h1 and the
//! local pool of h3, against a plain copy of the same disk and against bare QEMU's own mirror,
//! both between the same namespaces.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bare::{Template, DOWNTIME_LIMIT_MS};
use crate::storage_base::{bare_mirror, data_image, plain_copy, FileGuard, MIB};
use crate::util::{self, stat};
use crate::{Bench, BenchError, Result, H1, H2, H3, HOST_NAMES};

/// The instance's root disk on host `i`, from its QEMU command line.
fn disk_on(b: &Bench, i: usize, vm: &str) -> Result<PathBuf> {
    let pid = util::qemu_pid(b, i, vm)
        .ok_or_else(|| BenchError::Check(format!("no QEMU for {vm} on {}", HOST_NAMES[i])))?;
    util::root_disk(&util::cmdline(pid)?)
}

fn mbps(bytes: f64, ms: f64) -> f64 {
    bytes / 1e6 / (ms / 1000.0)
}

pub async fn figure(b: &mut Bench) -> Result<()> {
    let c = b.cluster.client();
    let mib = b.knobs.data_mib;
    b.step(&format!(
        "figure 2: storage migration with {mib} MiB of data, kumo vs a plain copy"
    ));
    let img = data_image(b, mib)?;
    let _img_guard = FileGuard(img.clone());
    util::import_disk_image(b, "bench-data", &img).await?;
    // Start in the shared pool, on h1.
    for h in [H2, H3] {
        util::set_host_state(&c, HOST_NAMES[h], "maintenance").await?;
    }
    let vm = util::create_instance(
        &c,
        json!({ "name": "data1", "image": "bench-data", "instance_type": "t1.nano" }),
    )
    .await?
    .id;
    for h in [H2, H3] {
        util::set_host_state(&c, HOST_NAMES[h], "up").await?;
    }
    util::wait_booted(&c, &vm).await?;
    b.step(&format!("{vm} booted on h1"));

    let tpl = Template::from_args(util::cmdline(
        util::qemu_pid(b, H1, &vm).ok_or_else(|| BenchError::Check(format!("no QEMU for {vm}")))?,
    )?)?;

    let mut rows = vec![];
    let (mut kumo_rates, mut copy_rates, mut mirror_rates) = (vec![], vec![], vec![]);
    for k in 0..2 * b.knobs.storage_runs {
        let from = util::host_index_of(&c, &vm).await?;
        let to = if from == H3 { H1 } else { H3 };
        let src = disk_on(b, from, &vm)?;
        let data = util::data_bytes(&src)? as f64;
        let copy_ms = plain_copy(b, from, to, &src, k)?;
        let (mirror_ms, mirror_len) = bare_mirror(b, &tpl, from, to, &src, k).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        let m = util::start_migration(
            &c,
            &vm,
            json!({ "host": HOST_NAMES[to], "downtime_ms": DOWNTIME_LIMIT_MS }),
        )
        .await?;
        if m.mode != "storage" {
            return Err(BenchError::Check(format!(
                "expected a storage migration, kumo chose {}",
                m.mode
            )));
        }
        let m = util::wait_migration(&c, &m.id).await?;
        let api_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let (total, memory) = (stat(&m, "total_ms")?, stat(&m, "memory_ms")?);
        let phase = total - memory;
        let disk_bytes = stat(&m, "disk_bytes")?;
        let (kr, cr, br) = (
            mbps(data, phase),
            mbps(data, copy_ms),
            mbps(data, mirror_ms),
        );
        rows.push(vec![
            (k + 1).to_string(),
            format!("{}→{}", HOST_NAMES[from], HOST_NAMES[to]),
            format!("{:.0}", data / MIB as f64),
            format!("{:.0}", disk_bytes / MIB as f64),
            format!("{total:.0}"),
            format!("{memory:.0}"),
            format!("{phase:.0}"),
            format!("{:.0}", stat(&m, "downtime_ms")?),
            format!("{api_ms:.0}"),
            format!("{kr:.0}"),
            format!("{copy_ms:.0}"),
            format!("{cr:.0}"),
            format!("{mirror_ms:.0}"),
            format!("{:.0}", mirror_len as f64 / MIB as f64),
            format!("{br:.0}"),
            format!("{:.2}", kr / cr),
        ]);
        eprintln!(
            "bench6:   run {}: {}",
            k + 1,
            rows[rows.len() - 1].join(" ")
        );
        kumo_rates.push(kr);
        copy_rates.push(cr);
        mirror_rates.push(br);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    util::terminate_all(b, std::slice::from_ref(&vm)).await?;

    println!("figure 2: storage migration (drive-mirror over NBD + memory) of a t1.nano guest whose 1 GiB root disk holds {mib} MiB of random data, between h1 (shared pool) and h3 (local pool), no bandwidth limit. Baselines, same direction, same namespaces, into qemu-nbd serving a blank qcow2 in the destination's pool: plain copy = qemu-img convert -U -n -O raw of the disk from the source namespace; bare mirror = kumo's QEMU command line on a copy of the disk, booted, QMP drive-mirror (kumo's arguments) until ready, then cancelled (completed)");
    print!(
        "{}",
        util::table(
            &[
                "run",
                "direction",
                "data MiB (allocated, non-zero)",
                "kumo disk_bytes MiB",
                "kumo total_ms",
                "kumo memory_ms",
                "kumo mirror phase ms (total - memory)",
                "kumo downtime_ms",
                "kumo API→done ms",
                "kumo MB/s (data / mirror phase)",
                "copy ms",
                "copy MB/s",
                "bare mirror ms",
                "bare mirror len MiB",
                "bare mirror MB/s",
                "kumo / copy",
            ],
            &rows
        )
    );
    let (km, cm, bm) = (
        util::median(&kumo_rates),
        util::median(&copy_rates),
        util::median(&mirror_rates),
    );
    let r = km / cm;
    println!(
        "RESULT storage-migration: kumo {km:.0} MB/s of real data in the mirror phase vs plain NBD copy {cm:.0} MB/s, ratio {r:.2} (goal >= 0.8: {}); extra: bare QEMU drive-mirror {bm:.0} MB/s (bare mirror / copy {:.2}, kumo / bare mirror {:.2}) [medians, n={} each, both directions alternating, TCG guests running]",
        util::verdict(r >= 0.8),
        bm / cm,
        km / bm,
        kumo_rates.len(),
    );
    Ok(())
}
