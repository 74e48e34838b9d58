//! The README's contract: `kumo up` brings up a cloud that boots the demo image, the CLI works
//! with the config it writes, and `kumo down` removes what it started.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{pids_matching, KUMO};

struct Up {
    dir: tempfile::TempDir,
    netns: String,
    child: Option<Child>,
}

impl Up {
    fn kumo(&self, args: &[&str]) -> std::process::Output {
        Command::new(KUMO)
            .args(args)
            .env("KUMO_CONFIG", self.dir.path().join("config.toml"))
            .output()
            .expect("run kumo")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in pids_matching(&[&self.dir.path().display().to_string()]) {
            // SAFETY: plain kill(2) of a process this test started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kumo_up_boots_the_demo_image_and_down_cleans_up() {
    let dir = tempfile::Builder::new()
        .prefix("kumo-up-")
        .tempdir()
        .expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let netns = format!("kup{}", std::process::id() % 100000);
    let log = dir.path().join("up.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = Command::new(KUMO)
        .args([
            "up",
            "--no-install",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--netns",
            &netns,
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("KUMO_CONFIG", dir.path().join("config.toml"))
        .stdout(Stdio::from(out.try_clone().expect("clone")))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("spawn kumo up");
    let mut up = Up {
        dir,
        netns,
        child: Some(child),
    };

    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("kumo is up")
    {
        assert!(
            Instant::now() < deadline,
            "kumo up did not come up:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if let Some(Ok(Some(status))) = up.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "kumo up exited with {status}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let created = up.kumo(&[
        "vm", "create", "--name", "first", "--image", "demo", "--type", "t1.small", "--wait", "-o",
        "json",
    ]);
    assert!(
        created.status.success(),
        "create failed: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let inst: serde_json::Value = serde_json::from_slice(&created.stdout).expect("json");
    assert_eq!(inst["state"], "running");
    let id = inst["id"].as_str().expect("id").to_string();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = up.kumo(&["vm", "log", "first"]);
        if String::from_utf8_lossy(&log.stdout).contains(&format!("KUMO-GUEST-BOOTED id={id}")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the demo guest never printed its boot marker"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let images = up.kumo(&["image", "list", "-o", "json"]);
    let images: serde_json::Value = serde_json::from_slice(&images.stdout).expect("json");
    assert!(images
        .as_array()
        .expect("list")
        .iter()
        .any(|i| i["name"] == "demo" && i["public"] == true));

    // Ctrl-C leaves the VM running; `kumo down` stops it and removes the namespace.
    if let Some(mut c) = up.child.take() {
        // SAFETY: SIGINT to the child we spawned.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGINT);
        }
        let _ = c.wait();
    }
    assert_eq!(
        pids_matching(&["qemu-system", &format!("kumo-{id}")]).len(),
        1,
        "the VM should outlive kumo up"
    );
    let down = Command::new(KUMO)
        .args(["down", "--netns", &up.netns, "--data-dir"])
        .arg(up.dir.path().join("data"))
        .output()
        .expect("down");
    assert!(
        down.status.success(),
        "kumo down failed: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        pids_matching(&["qemu-system", &format!("kumo-{id}")]).is_empty(),
        "kumo down left the VM running"
    );
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&netns.stdout)
            .split_whitespace()
            .any(|n| n == up.netns),
        "kumo down left the namespace"
    );
}
