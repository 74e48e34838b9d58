//! Whether KVM really works here: a tiny guest must get through its firmware.

use super::*;

/// Launch a tiny KVM guest (SeaBIOS, no disk, the production `-cpu host`) and require that QMP
/// reports KVM enabled and that the firmware finishes POST (its debug port prints
/// "No bootable device") within `timeout`. Broken KVM here either aborts QEMU (`-cpu host`:
/// "failed to set MSR") or hangs the guest, so only real progress counts.
pub(super) async fn probe_kvm(
    binary: &str,
    scratch_dir: &Path,
    timeout: Duration,
) -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("cannot open /dev/kvm: {e}"));
    }
    let dir = scratch_dir.join(format!(".kvm-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let result = probe_kvm_in(binary, &dir, timeout).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn probe_kvm_in(binary: &str, dir: &Path, timeout: Duration) -> Result<(), String> {
    let debugcon = dir.join("debugcon.log");
    let qmp_sock = dir.join("qmp.sock");
    let log_path = dir.join("qemu.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("creating log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("cloning log: {e}"))?;
    let mut child = Command::new(binary)
        .args(["-machine", MACHINE, "-accel", "kvm", "-cpu", "host"])
        .args(["-smp", "1", "-m", "64", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-chardev"])
        .arg(format!("file,id=dbg,path={}", opt(&path_str(&debugcon))))
        .args([
            "-device",
            "isa-debugcon,iobase=0x402,chardev=dbg",
            "-chardev",
        ])
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt(&path_str(&qmp_sock))
        ))
        .args(["-mon", "chardev=qmp,mode=control"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawning {binary}: {e}"))?;

    let deadline = Instant::now() + timeout;
    let mut kvm_enabled = false;
    let mut qmp: Option<Qmp> = None;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                break Err(format!(
                    "QEMU exited with {status}: {}",
                    log_tail(&log_path, 500)
                ))
            }
            Ok(None) => {}
            Err(e) => break Err(format!("waiting for QEMU: {e}")),
        }
        if !kvm_enabled && qmp_sock.exists() {
            if qmp.is_none() {
                qmp = Qmp::connect_with_timeout(&qmp_sock, Duration::from_millis(500))
                    .await
                    .ok();
            }
            if let Some(q) = &qmp {
                match q
                    .execute_with_timeout("query-kvm", Value::Null, Duration::from_millis(500))
                    .await
                {
                    Ok(v) if v["enabled"] == true && v["present"] == true => kvm_enabled = true,
                    Ok(v) => break Err(format!("query-kvm says {v}")),
                    Err(e) => tracing::debug!(error = %e, "query-kvm failed"),
                }
            }
        }
        let progressed = std::fs::read(&debugcon)
            .map(|b| {
                let s = String::from_utf8_lossy(&b);
                s.contains("No bootable device") || s.contains("Booting from")
            })
            .unwrap_or(false);
        if kvm_enabled && progressed {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(format!(
                "no progress within {timeout:?} (kvm enabled: {kvm_enabled}, firmware finished: {progressed})"
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    drop(qmp);
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    outcome
}
