//! Figure 2's data image and its two baselines: a plain NBD copy of the disk, and bare QEMU's
//! own drive-mirror of it, both into a qemu-nbd export in the destination's namespace.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bare::{BareQemu, Template};
use crate::util;
use crate::{Bench, BenchError, Result};

pub const MIB: u64 = 1 << 20;
/// The root disk of a t1.nano (GiB): the data image has this virtual size.
const DISK_BYTES: u64 = 1 << 30;
/// Where the random data starts in the image: past the test guest's 64 MiB filesystem.
const DATA_OFFSET: u64 = 128 * MIB;
/// First port of the baselines' qemu-nbd (one port per export).
const NBD_PORT: u16 = 10_900;

/// A file removed on drop.
pub struct FileGuard(pub PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test guest's disk grown to 1 GiB with `mib` MiB of random data at 128 MiB, as qcow2.
pub fn data_image(b: &Bench, mib: u64) -> Result<PathBuf> {
    let raw = b.scratch.join("data.raw");
    let _raw_guard = FileGuard(raw.clone());
    let out = b.scratch.join("data.qcow2");
    util::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(b.guest.join("disk.qcow2"))
            .arg(&raw),
    )?;
    let io = |e| BenchError::io(format!("writing {}", raw.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .map_err(io)?;
    f.set_len(DISK_BYTES).map_err(io)?;
    f.seek(SeekFrom::Start(DATA_OFFSET)).map_err(io)?;
    let mut rnd =
        std::fs::File::open("/dev/urandom").map_err(|e| BenchError::io("/dev/urandom", e))?;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..mib {
        rnd.read_exact(&mut buf)
            .map_err(|e| BenchError::io("/dev/urandom", e))?;
        f.write_all(&buf).map_err(io)?;
    }
    drop(f);
    util::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&out),
    )?;
    Ok(out)
}

/// A blank qcow2 in host `to`'s pool, exported by qemu-nbd in `to`'s namespace on its management
/// address, reachable from host `from`'s namespace. Process and file go on drop.
pub struct NbdExport {
    child: Child,
    pub target: FileGuard,
    /// `nbd://IP:PORT/bench6`
    pub uri: String,
    /// The same export in QEMU's legacy syntax (what kumo hands drive-mirror).
    pub legacy: String,
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NbdExport {
    pub fn start(b: &Bench, from: usize, to: usize, size: u64, tag: &str) -> Result<NbdExport> {
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let hosts = b.cluster.hosts();
        let (src_ns, dst_ns, ip) = (&hosts[from].netns, &hosts[to].netns, &hosts[to].mgmt_ip);
        let target = FileGuard(b.pool_dir(to).join(format!("bench6-{tag}.qcow2")));
        util::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&target.0)
                .arg(size.to_string()),
        )?;
        let port = NBD_PORT + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = b.scratch.join(format!("qemu-nbd-{tag}.log"));
        let logf = std::fs::File::create(&log).map_err(|e| BenchError::io("qemu-nbd log", e))?;
        // The discard setting of the -blockdev of kumo's destination disk; both use the
        // default writeback cache.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                dst_ns,
                "qemu-nbd",
                "-f",
                "qcow2",
                "--discard=unmap",
            ])
            .args(["-b", ip, "-p", &port.to_string(), "-x", "bench6", "-t"])
            .arg(&target.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf))
            .spawn()
            .map_err(|e| BenchError::io("starting qemu-nbd", e))?;
        let mut e = NbdExport {
            child,
            target,
            uri: format!("nbd://{ip}:{port}/bench6"),
            legacy: format!("nbd:{ip}:{port}:exportname=bench6"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = e.child.try_wait() {
                return Err(BenchError::Check(format!(
                    "qemu-nbd exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                )));
            }
            let probe = Command::new("ip")
                .args(["netns", "exec", src_ns, "qemu-img", "info", &e.uri])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if probe.map(|s| s.success()).unwrap_or(false) {
                return Ok(e);
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout(format!("qemu-nbd at {}", e.uri)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop serving, then check the copy holds the source's data (or its time means nothing).
    pub fn finish(mut self, src: &Path) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (want, got) = (util::data_bytes(src)?, util::data_bytes(&self.target.0)?);
        if (got as f64) < want as f64 * 0.9 {
            return Err(BenchError::Check(format!(
                "the copy holds {got} bytes of data, the source {want}"
            )));
        }
        Ok(())
    }
}

/// `qemu-img convert -U -n -O raw SRC nbd://...` from host `from`'s namespace into a fresh
/// export in `to`'s. Returns its wall time (ms).
pub fn plain_copy(b: &Bench, from: usize, to: usize, src: &Path, run: usize) -> Result<f64> {
    let exp = NbdExport::start(
        b,
        from,
        to,
        util::virtual_size(src)?,
        &format!("copy-{run}"),
    )?;
    let t0 = Instant::now();
    util::run(
        Command::new("ip")
            .args(["netns", "exec", &b.cluster.hosts()[from].netns])
            .args(["qemu-img", "convert", "-U", "-n", "-O", "raw"])
            .arg(src)
            .arg(&exp.uri),
    )?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    exp.finish(src)?;
    Ok(ms)
}

/// Bare QEMU's own mirror: kumo's command line for the guest on a copy of its disk (in the
/// source's pool), booted in `from`'s namespace, then QMP `drive-mirror` (sync full, existing
/// target, no speed limit: kumo's arguments) into a fresh export in `to`'s namespace, until the
/// job is ready and then cancelled into a consistent copy: the steps of kumo's mirror phase,
/// without the memory migration. Returns (mirror ms, the job's length in bytes).
pub async fn bare_mirror(
    b: &Bench,
    tpl: &Template,
    from: usize,
    to: usize,
    src: &Path,
    run: usize,
) -> Result<(f64, u64)> {
    let disk = FileGuard(
        b.pool_dir(from)
            .join(format!("bench6-mirror-src-{run}.qcow2")),
    );
    util::run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "qcow2"])
            .arg(src)
            .arg(&disk.0),
    )?;
    let rd = b.scratch.join(format!("mirror{run}"));
    let mut q = BareQemu::spawn(
        &tpl.binary,
        &b.cluster.hosts()[from].netns,
        from,
        &rd,
        &tpl.args_for(&rd, &disk.0, &format!("kb6s{run}"), None)?,
    )?;
    q.wait_booted(util::BOOT).await?;
    let exp = NbdExport::start(
        b,
        from,
        to,
        util::virtual_size(&disk.0)?,
        &format!("mirror-{run}"),
    )?;
    let qmp = q.qmp().await?;
    let exec = |cmd: &'static str, args: Value| {
        let qmp = &qmp;
        async move {
            qmp.execute(cmd, args)
                .await
                .map_err(|e| BenchError::qmp(cmd, e))
        }
    };
    let job = "bench6-mirror";
    let t0 = Instant::now();
    exec(
        "drive-mirror",
        json!({ "job-id": job, "device": tpl.root_node()?, "target": exp.legacy, "format": "raw",
                "sync": "full", "mode": "existing", "speed": 0, "auto-dismiss": false }),
    )
    .await?;
    let deadline = t0 + util::MIGRATION;
    let mut cancelled = false;
    let len = loop {
        let jobs = exec("query-block-jobs", Value::Null).await?;
        let j = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == job).cloned())
            .ok_or_else(|| BenchError::Check(format!("the mirror job vanished: {jobs}")))?;
        if let Some(err) = j["error"].as_str() {
            return Err(BenchError::Check(format!("bare mirror: {err}")));
        }
        if j["status"] == "concluded" {
            break j["len"].as_u64().unwrap_or(0);
        }
        if j["ready"] == true && !cancelled {
            // A ready mirror cancelled without force completes into a consistent copy.
            exec("block-job-cancel", json!({ "device": job, "force": false })).await?;
            cancelled = true;
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout(format!("bare mirror: {j}")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    exec("job-dismiss", json!({ "id": job })).await?;
    drop(qmp);
    drop(q);
    exp.finish(&disk.0)?;
    Ok((ms, len))
}
