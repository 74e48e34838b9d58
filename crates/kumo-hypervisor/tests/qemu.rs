//! Real-QEMU tests of the QEMU driver (TCG; no guest OS: the VM sits in firmware).
//! They need root only for the netns test; everything else runs as any user with QEMU installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kumo_hypervisor::qmp::QmpEvent;
use kumo_hypervisor::{
    probe_accel, Accel, AccelChoice, DiskSpec, Hypervisor, HypervisorError, NicSpec, PowerState,
    QemuDriver, VmSpec,
};
use serde_json::Value;

use common::qemu_pids;

/// Kills every QEMU of the given VM ids when dropped, so a failing test leaves nothing behind.
struct Reaper {
    ids: Vec<String>,
    netns: Option<String>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for id in &self.ids {
            for pid in qemu_pids(id) {
                eprintln!("test cleanup: killing leftover QEMU {pid} of {id}");
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn unique_id(tag: &str) -> String {
    format!("i-{tag}-{}", std::process::id())
}

fn make_disk(dir: &Path, name: &str, format: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&path)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn spec(id: &str, disks: Vec<DiskSpec>) -> VmSpec {
    VmSpec {
        id: id.to_string(),
        vcpus: 1,
        memory_mib: 128,
        disks,
        nics: vec![],
        kernel: None,
        initrd: None,
        cmdline: None,
        netns: None,
        smbios_serial: None,
        uuid: None,
    }
}

fn expect_kvm() -> bool {
    std::env::var("KUMO_TEST_EXPECT_KVM").is_ok_and(|v| v == "1")
}

#[tokio::test]
async fn kvm_probe_falls_back_to_tcg() {
    let root = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let accel = probe_accel(AccelChoice::Auto, root.path()).await.unwrap();
    let auto_ms = t.elapsed().as_millis();
    eprintln!("KVM probe (auto) chose {accel} in {auto_ms} ms");
    assert_eq!(
        probe_accel(AccelChoice::Tcg, root.path()).await.unwrap(),
        Accel::Tcg
    );
    if expect_kvm() {
        assert_eq!(accel, Accel::Kvm);
    } else {
        // On the kumo build/CI machines KVM exists but guests hang or QEMU aborts.
        assert_eq!(accel, Accel::Tcg);
        let forced = probe_accel(AccelChoice::Kvm, root.path()).await;
        assert!(
            matches!(forced, Err(HypervisorError::AccelUnavailable(_))),
            "{forced:?}"
        );
    }
    assert!(auto_ms < 4000, "probe took {auto_ms} ms");
    // The probe leaves nothing behind.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn lifecycle_reattach_stop_cleanup() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("run");
    let id = unique_id("life");
    let _reaper = Reaper {
        ids: vec![id.clone()],
        netns: None,
    };
    let root_disk = make_disk(work.path(), "root.qcow2", "qcow2");
    let seed_disk = make_disk(work.path(), "seed.raw", "raw");
    let spec = spec(
        &id,
        vec![
            DiskSpec {
                path: root_disk,
                format: "qcow2".into(),
                serial: Some("vol-root".into()),
                read_only: false,
                device_id: None,
            },
            DiskSpec {
                path: seed_disk,
                format: "raw".into(),
                serial: None,
                read_only: true,
                device_id: None,
            },
        ],
    );

    let d1 = QemuDriver::new(root.clone(), AccelChoice::Auto)
        .await
        .unwrap();
    assert_eq!(d1.name(), "qemu");
    if !expect_kvm() {
        assert_eq!(d1.accel(), Some(Accel::Tcg));
    }
    assert_eq!(d1.state(&id).await.unwrap(), PowerState::Stopped);

    let t = Instant::now();
    let info = d1.start(&spec).await.unwrap();
    eprintln!("start -> QMP running: {} ms", t.elapsed().as_millis());
    assert_eq!(info.state, PowerState::Running);
    let pid = info.pid.unwrap();
    assert_eq!(qemu_pids(&id), vec![pid]);
    // Idempotent start.
    assert_eq!(d1.start(&spec).await.unwrap(), info);
    assert_eq!(d1.state(&id).await.unwrap(), PowerState::Running);

    let run_dir = root.canonicalize().unwrap().join(&id);
    for f in [
        "qmp.sock",
        "serial.sock",
        "vnc.sock",
        "console.log",
        "qemu.pid",
        "spec.json",
    ] {
        assert!(run_dir.join(f).exists(), "{f} missing");
    }
    assert_eq!(d1.console_log(&id), run_dir.join("console.log"));
    // QEMU is in its own session, not ours.
    let sid = unsafe { libc::getsid(pid as i32) };
    assert_eq!(sid, pid as i32);

    // VNC answers with the RFB banner; the serial socket accepts a client.
    {
        use tokio::io::AsyncReadExt;
        let mut vnc = tokio::net::UnixStream::connect(d1.vnc_socket(&id))
            .await
            .unwrap();
        let mut banner = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), vnc.read_exact(&mut banner))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&banner[..4], b"RFB ");
        tokio::net::UnixStream::connect(d1.serial_socket(&id))
            .await
            .unwrap();
    }

    // The read-only disk is read-only, the serial is set.
    let qmp = d1.qmp(&id).await.unwrap();
    let block = qmp.execute("query-block", Value::Null).await.unwrap();
    let ro_of = |node: &str| {
        block
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["inserted"]["node-name"] == node)
            .map(|b| b["inserted"]["ro"].clone())
    };
    assert_eq!(ro_of("disk0"), Some(Value::Bool(false)), "{block}");
    assert_eq!(ro_of("disk1"), Some(Value::Bool(true)), "{block}");
    drop(qmp);
    // The aux QMP socket works while the driver holds the main one.
    let aux = kumo_hypervisor::qmp::Qmp::connect(d1.aux_qmp_socket(&id))
        .await
        .unwrap();
    assert!(aux.query_status().await.unwrap().running);
    drop(aux);

    let listed = d1.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], info);

    // The agent restarts: a new driver on the same run root re-attaches.
    drop(d1);
    let t = Instant::now();
    let d2 = QemuDriver::new(root.clone(), AccelChoice::Tcg)
        .await
        .unwrap();
    eprintln!("re-attach driver: {} ms", t.elapsed().as_millis());
    assert_eq!(d2.state(&id).await.unwrap(), PowerState::Running);
    assert_eq!(d2.list().await.unwrap(), vec![info.clone()]);
    assert_eq!(d2.start(&spec).await.unwrap().pid, Some(pid));

    // Reboot: QEMU reports a RESET event.
    let qmp = d2.qmp(&id).await.unwrap();
    let mut events = qmp.events();
    d2.reboot(&id).await.unwrap();
    let reset = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Ok(QmpEvent { event, .. }) if event == "RESET" => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(reset);
    drop(qmp);
    assert_eq!(d2.state(&id).await.unwrap(), PowerState::Running);

    // Pause shows up as Paused.
    d2.qmp(&id)
        .await
        .unwrap()
        .execute("stop", Value::Null)
        .await
        .unwrap();
    assert_eq!(d2.state(&id).await.unwrap(), PowerState::Paused);
    d2.qmp(&id)
        .await
        .unwrap()
        .execute("cont", Value::Null)
        .await
        .unwrap();

    // Firmware ignores ACPI power-down: stop must force it after the timeout.
    let t = Instant::now();
    d2.stop(&id, Duration::from_millis(500)).await.unwrap();
    let stop_ms = t.elapsed().as_millis();
    eprintln!("stop (500 ms ACPI timeout, then quit): {stop_ms} ms");
    assert!(stop_ms < 5000, "stop took {stop_ms} ms");
    assert_eq!(d2.state(&id).await.unwrap(), PowerState::Stopped);
    assert!(qemu_pids(&id).is_empty());
    assert!(!run_dir.join("qemu.pid").exists());
    assert!(run_dir.join("spec.json").exists());
    let listed = d2.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, PowerState::Stopped);
    assert_eq!(listed[0].pid, None);

    // Stopped VM: stop/kill are Ok, reboot is an error.
    d2.stop(&id, Duration::from_millis(100)).await.unwrap();
    d2.kill(&id).await.unwrap();
    assert!(matches!(
        d2.reboot(&id).await,
        Err(HypervisorError::NotRunning(_))
    ));

    d2.cleanup(&id).await.unwrap();
    assert!(!run_dir.exists());
    assert!(d2.list().await.unwrap().is_empty());
    d2.cleanup(&id).await.unwrap();
    assert!(qemu_pids(&id).is_empty());
}

#[tokio::test]
async fn start_failures_and_kill() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("run");
    let id = unique_id("fail");
    let id_kill = unique_id("kill");
    let _reaper = Reaper {
        ids: vec![id.clone(), id_kill.clone()],
        netns: None,
    };
    let d = QemuDriver::new(root.clone(), AccelChoice::Tcg)
        .await
        .unwrap();
    assert_eq!(d.accel(), Some(Accel::Tcg));

    // Missing disk: refused before QEMU runs.
    let missing = spec(
        &id,
        vec![DiskSpec {
            path: work.path().join("nope.qcow2"),
            format: "qcow2".into(),
            serial: None,
            read_only: false,
            device_id: None,
        }],
    );
    assert!(matches!(
        d.start(&missing).await,
        Err(HypervisorError::InvalidSpec(_))
    ));

    // A raw file claimed to be qcow2: QEMU exits early, its stderr is in the error.
    let raw = make_disk(work.path(), "raw.img", "raw");
    let bad = spec(
        &id,
        vec![DiskSpec {
            path: raw,
            format: "qcow2".into(),
            serial: None,
            read_only: false,
            device_id: None,
        }],
    );
    let t = Instant::now();
    let err = d.start(&bad).await.unwrap_err();
    eprintln!(
        "early-exit error after {} ms: {err}",
        t.elapsed().as_millis()
    );
    match &err {
        HypervisorError::StartFailed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("qcow2"), "{stderr_tail}")
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(d.state(&id).await.unwrap(), PowerState::Stopped);
    assert!(qemu_pids(&id).is_empty());
    d.cleanup(&id).await.unwrap();

    // kill() forces a running VM off at once.
    let disk = make_disk(work.path(), "k.qcow2", "qcow2");
    let s = spec(
        &id_kill,
        vec![DiskSpec {
            path: disk,
            format: "qcow2".into(),
            serial: None,
            read_only: false,
            device_id: None,
        }],
    );
    let info = d.start(&s).await.unwrap();
    assert!(matches!(
        d.cleanup(&id_kill).await,
        Err(HypervisorError::StillRunning(_))
    ));
    let t = Instant::now();
    d.kill(&id_kill).await.unwrap();
    eprintln!("kill: {} ms", t.elapsed().as_millis());
    assert_eq!(d.state(&id_kill).await.unwrap(), PowerState::Stopped);
    assert!(qemu_pids(&id_kill).is_empty());
    // The reaper task collects our child: no zombie remains for long.
    let pid = info.pid.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "zombie left");
    d.cleanup(&id_kill).await.unwrap();
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn nic_in_netns() {
    if !is_root() {
        eprintln!("skipping: needs root for ip netns");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("run");
    let id = unique_id("net");
    let ns = format!("kumo-hvtest-{}", std::process::id());
    let _reaper = Reaper {
        ids: vec![id.clone()],
        netns: Some(ns.clone()),
    };
    ip(&["netns", "add", &ns]);
    ip(&[
        "netns", "exec", &ns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap",
    ]);
    let d = QemuDriver::new(root, AccelChoice::Tcg).await.unwrap();
    let mut s = spec(&id, vec![]);
    s.netns = Some(ns.clone());
    s.nics = vec![NicSpec {
        mac: "52:54:00:12:34:56".into(),
        tap: "tap0".into(),
    }];
    let info = d.start(&s).await.unwrap();
    assert_eq!(info.state, PowerState::Running);
    assert_eq!(qemu_pids(&id), vec![info.pid.unwrap()]);
    let qmp = d.qmp(&id).await.unwrap();
    let filters = qmp.execute("query-rx-filter", Value::Null).await.unwrap();
    assert_eq!(filters[0]["main-mac"], "52:54:00:12:34:56", "{filters}");
    drop(qmp);
    // A missing namespace fails with `ip`'s message.
    let mut bad = spec(&format!("{id}-b"), vec![]);
    bad.netns = Some(format!("{ns}-missing"));
    let err = d.start(&bad).await.unwrap_err();
    assert!(matches!(err, HypervisorError::StartFailed { .. }), "{err}");
    assert!(err.to_string().contains("network namespace"), "{err}");
    d.kill(&id).await.unwrap();
    assert!(qemu_pids(&id).is_empty());
}

/// The agent dies (SIGKILL) right after starting a VM: QEMU keeps running and a new driver on
/// the same run root re-attaches. The "agent" is this test binary re-executed as a child.
#[tokio::test]
async fn qemu_survives_agent_death() {
    const ROOT_ENV: &str = "KUMO_HV_TEST_AGENT_ROOT";
    if let Ok(root) = std::env::var(ROOT_ENV) {
        // Child ("agent") side.
        let id = std::env::var("KUMO_HV_TEST_AGENT_ID").unwrap();
        let d = QemuDriver::new(root.into(), AccelChoice::Tcg)
            .await
            .unwrap();
        d.start(&spec(&id, vec![])).await.unwrap();
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        unreachable!();
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("run");
    let id = unique_id("orphan");
    let _reaper = Reaper {
        ids: vec![id.clone()],
        netns: None,
    };
    // Orphaned QEMU is re-parented to us instead of a pid 1 that may never reap it.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let status = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "qemu_survives_agent_death", "--nocapture"])
        .env(ROOT_ENV, &root)
        .env("KUMO_HV_TEST_AGENT_ID", &id)
        .status()
        .await
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let pids = qemu_pids(&id);
    assert_eq!(pids.len(), 1, "QEMU died with its agent");
    let d = QemuDriver::new(root, AccelChoice::Tcg).await.unwrap();
    assert_eq!(d.state(&id).await.unwrap(), PowerState::Running);
    assert_eq!(d.list().await.unwrap()[0].pid, Some(pids[0]));
    d.kill(&id).await.unwrap();
    assert_eq!(d.state(&id).await.unwrap(), PowerState::Stopped);
    unsafe {
        libc::waitpid(pids[0] as i32, std::ptr::null_mut(), 0);
    }
    assert!(!Path::new(&format!("/proc/{}", pids[0])).exists());
    d.cleanup(&id).await.unwrap();
}
