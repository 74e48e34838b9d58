//! Stock cloud images configure themselves from kumo's metadata service, unchanged: a Debian 12
//! guest built by debootstrap with Debian's own cloud-init package (`kumo dev build-cloud-guest`,
//! guest/build-cloud-guest.sh) boots on a one-host cloud, finds the NoCloud seed that SMBIOS
//! announces, and applies the instance's user data, hostname and key pair.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kumo_types::api::{CreateInstance, ImportImage};
use kumo_types::security::CreateKeyPair;
use kumo_types::InstanceState;
use tokio::sync::OnceCell;

use kumo_cli::Client;

use crate::common::{Cloud, Hv, KUMO};

/// A cold build (debootstrap + apt from the mirror) takes ~3 min here; only there to stop a hang.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Debian + systemd + cloud-init under TCG on a busy 2-core machine: ~1 min alone; only there
/// to stop a hang.
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);
const MARKER: &str = "KUMO-CLOUDINIT-OK";
const AUTHKEY: &str = "KUMO-AUTHKEY";
const SEED: &str = "http://169.254.169.254/nocloud/";

/// The instance's user data: print every authorized_keys line, then the marker with the
/// instance id cloud-init recorded and the hostname it set.
const USER_DATA: &str = r#"#cloud-config
runcmd:
  - [ sh, -c, 'for f in /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys; do [ -f "$f" ] && sed "s|^|KUMO-AUTHKEY $f |" "$f"; done > /dev/ttyS0' ]
  - [ sh, -c, 'echo "KUMO-CLOUDINIT-OK $(cat /var/lib/cloud/data/instance-id) $(hostname)" > /dev/ttyS0' ]
"#;

static CLOUD_GUEST: OnceCell<PathBuf> = OnceCell::const_new();

/// `kumo dev build-cloud-guest` once per test run, cached across runs in CARGO_TARGET_TMPDIR.
/// A missing prerequisite (debootstrap, an unreachable mirror) fails here.
async fn cloud_guest_dir() -> PathBuf {
    CLOUD_GUEST
        .get_or_init(|| async {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cloud-guest");
            let t0 = Instant::now();
            let (ok, stderr) = build(&dir).await;
            assert!(ok, "building the cloud guest failed:\n{stderr}");
            eprintln!(
                "cloud guest ready in {} in {:.1} s",
                dir.display(),
                t0.elapsed().as_secs_f64()
            );
            dir
        })
        .await
        .clone()
}

/// Run `kumo dev build-cloud-guest --out dir`; returns success and its stderr (also echoed).
async fn build(dir: &Path) -> (bool, String) {
    let child = tokio::process::Command::new(KUMO)
        .args(["dev", "build-cloud-guest", "--out"])
        .arg(dir)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run kumo dev build-cloud-guest");
    let out = tokio::time::timeout(BUILD_TIMEOUT, child.wait_with_output())
        .await
        .expect("the cloud guest build hung")
        .expect("wait for kumo dev build-cloud-guest");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprint!("{stderr}");
    (out.status.success(), stderr)
}

/// Import an image and wait for it: the 1 GiB root disk takes ~40 s here, longer on a busy
/// machine, so the deadline is wider than common's.
async fn import_wait(client: &Client, req: &ImportImage) -> String {
    let started = client.import_image(req).await.expect("import");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let op = client.operation(&started.operation.id).await.expect("op");
        match op.state.as_str() {
            "succeeded" => return started.image.id,
            "failed" => panic!("import of {} failed: {:?}", req.name, op.error),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "import of {} did not finish",
            req.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The last `n` characters of a console, for failure messages.
fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

/// Console lines without the serial line's `\r`.
fn lines(console: &str) -> impl Iterator<Item = &str> {
    console.lines().map(|l| l.trim_end_matches('\r'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_debian_cloud_init_uses_nocloud_from_metadata_service() {
    let guest = cloud_guest_dir().await;
    let cmdline = std::fs::read_to_string(guest.join("cmdline")).expect("cmdline file");
    assert!(
        cmdline.contains("root=/dev/vda") && cmdline.contains("console=ttyS0"),
        "unexpected command line {cmdline:?}"
    );

    let cloud = Cloud::start(Hv::Qemu).await;
    let import =
        |name: &str, kind: &str, file: &str, k: Option<String>, r: Option<String>| ImportImage {
            name: name.into(),
            kind: Some(kind.into()),
            path: guest.join(file).display().to_string(),
            format: None,
            kernel_id: k,
            ramdisk_id: r,
            cmdline: (kind == "disk").then(|| cmdline.trim().to_string()),
            public: false,
        };
    let t_import = Instant::now();
    let k = import_wait(
        &cloud.client,
        &import("debian12-kernel", "kernel", "vmlinuz", None, None),
    )
    .await;
    let r = import_wait(
        &cloud.client,
        &import("debian12-initrd", "ramdisk", "initrd.img", None, None),
    )
    .await;
    import_wait(
        &cloud.client,
        &import("debian12-cloud", "disk", "disk.qcow2", Some(k), Some(r)),
    )
    .await;
    let import_s = t_import.elapsed().as_secs_f64();

    let key = cloud
        .client
        .create_key_pair(&CreateKeyPair {
            name: "ci-key".into(),
            ..Default::default()
        })
        .await
        .expect("create key pair");
    // "ssh-ed25519 AAAA…": what authorized_keys must carry (the comment may differ).
    let key_words: Vec<&str> = key.public_key.split_whitespace().take(2).collect();
    assert_eq!(key_words.len(), 2, "public key {:?}", key.public_key);

    let name = "ci-debian";
    let t_create = Instant::now();
    let inst = cloud
        .client
        .create_instance(
            &CreateInstance {
                name: name.into(),
                image: "debian12-cloud".into(),
                instance_type: Some("t1.small".into()),
                key_name: Some("ci-key".into()),
                user_data: Some(USER_DATA.into()),
                ..Default::default()
            },
            None,
        )
        .await
        .expect("create instance");
    let id = inst.id.clone();
    let running = cloud
        .wait_state(&id, InstanceState::Running, BOOT_TIMEOUT)
        .await;
    let running_s = t_create.elapsed().as_secs_f64();
    let ip = running.private_ip.clone().expect("a private IP");

    // The marker comes from runcmd; cloud-init's "finished" line follows it.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut marker_s = None;
    let console = loop {
        let out = cloud
            .client
            .console(&id, 1 << 20)
            .await
            .map(|c| c.output)
            .unwrap_or_default();
        if marker_s.is_none() && out.contains(MARKER) {
            marker_s = Some(t_create.elapsed().as_secs_f64());
        }
        if marker_s.is_some()
            && lines(&out).any(|l| l.contains("Cloud-init v.") && l.contains(" finished at "))
        {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "{id}'s console never showed {MARKER} and cloud-init's final message; logs in {}; console ends:\n{}",
            cloud.dir.path().display(),
            tail(&out, 4000)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // cloud-init chose NoCloud (network mode) from the SMBIOS seed, not a fallback.
    let finished = lines(&console)
        .find(|l| l.contains("Cloud-init v.") && l.contains(" finished at "))
        .unwrap_or_default();
    assert!(
        finished.contains("DataSourceNoCloudNet") && finished.contains(SEED),
        "cloud-init did not use the NoCloud seed at {SEED}: {finished:?}"
    );
    // Every module ran cleanly on what kumo served (a bad meta-data or user-data shows up here).
    let failed: Vec<&str> = lines(&console)
        .filter(|l| l.contains("Running module") && l.contains(" failed"))
        .collect();
    assert!(failed.is_empty(), "cloud-init modules failed: {failed:#?}");
    // It brought the NIC up with the address kumo's DHCP gave the instance.
    assert!(
        lines(&console).any(|l| l.contains("ci-info") && l.contains(&format!(" {ip} "))),
        "cloud-init's network table never shows {ip}; console ends:\n{}",
        tail(&console, 4000)
    );

    // The marker: the instance id cloud-init recorded and the hostname it set.
    let marker: Vec<&str> = lines(&console)
        .filter_map(|l| l.split_once(MARKER).map(|(_, rest)| rest.trim()))
        .collect();
    assert_eq!(
        marker,
        vec![format!("{id} {name}").as_str()],
        "runcmd's marker (once, with the instance id and name)"
    );

    // The key pair landed in the default user's authorized_keys (Debian's default user is
    // `debian`); root's carries it too, behind Debian's "log in as debian" command.
    let keys: Vec<(&str, &str)> = lines(&console)
        .filter_map(|l| l.split_once(AUTHKEY).map(|(_, rest)| rest.trim()))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let has_key = |line: &str| {
        line.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == key_words.as_slice())
    };
    assert!(
        keys.iter()
            .any(|(f, line)| *f == "/home/debian/.ssh/authorized_keys" && has_key(line)),
        "the key pair is not in /home/debian/.ssh/authorized_keys: {keys:?}"
    );
    assert!(
        keys.iter().all(|(_, line)| has_key(line)),
        "an authorized_keys line that is not the instance's key: {keys:?}"
    );

    let up = finished
        .split_once(" Up ")
        .map(|(_, r)| r.trim().to_string())
        .unwrap_or_default();
    eprintln!(
        "cloud-init guest: images imported in {import_s:.1} s; create -> running {running_s:.1} s, \
         create -> marker {:.1} s; cloud-init: {up}",
        marker_s.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_guest_build_is_cached() {
    let dir = cloud_guest_dir().await;
    let files = [
        "vmlinuz",
        "initrd.img",
        "disk.qcow2",
        "cmdline",
        "manifest.json",
    ];
    let before: Vec<SystemTime> = files.iter().map(|f| mtime(&dir.join(f))).collect();
    let t0 = Instant::now();
    let (ok, stderr) = build(&dir).await;
    let took = t0.elapsed();
    assert!(ok, "a second build failed:\n{stderr}");
    assert!(
        stderr.contains("up to date"),
        "a second build did not use the cache:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(20),
        "a cached build took {took:?}"
    );
    let after: Vec<SystemTime> = files.iter().map(|f| mtime(&dir.join(f))).collect();
    assert_eq!(before, after, "a cached build rewrote its outputs");
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let m: serde_json::Value = serde_json::from_str(&manifest).expect("manifest is JSON");
    assert_eq!(m["suite"], "bookworm");
    assert!(
        m["cloud_init_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("22.")),
        "Debian 12's cloud-init is 22.x: {manifest}"
    );
    for f in ["vmlinuz", "initrd.img", "disk.qcow2"] {
        let len = std::fs::metadata(dir.join(f)).expect("output").len();
        assert_eq!(m["size"][f].as_u64(), Some(len), "manifest size of {f}");
    }
}

/// Bad usage is refused with a usage message and creates nothing.
#[tokio::test]
async fn cloud_guest_build_refuses_bad_usage() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/build-cloud-guest.sh");
    let scratch = tempfile::tempdir().expect("tempdir");
    for args in [vec![], vec!["--out"], vec!["a", "b"]] {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(&args)
            .current_dir(scratch.path())
            .output()
            .expect("run the script");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage:"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(KUMO)
        .args(["dev", "build-cloud-guest"])
        .current_dir(scratch.path())
        .output()
        .expect("run kumo");
    assert!(!out.status.success(), "--out is required");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--out"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(scratch.path()).expect("scratch").count(),
        0,
        "bad usage created files"
    );
}
