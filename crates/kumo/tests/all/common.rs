//! A whole kumo cloud for a test: `kumo server` and `kumo agent` processes on a temp data dir,
//! a signed client, and the demo image. Everything is torn down on drop, even if the test
//! fails: processes killed, QEMU and dnsmasq of this cloud killed, namespaces removed.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kumo_cli::{Client, ClientConfig};
use kumo_types::api::{ImportImage, Instance};
use kumo_types::InstanceState;
use tokio::sync::OnceCell;

pub const KUMO: &str = env!("CARGO_BIN_EXE_kumo");

static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hv {
    Qemu,
    Sim,
}

pub struct AgentProc {
    pub name: String,
    pub data_dir: PathBuf,
    pub netns: Option<String>,
    pub child: Option<Child>,
    hv: Hv,
    extra: Vec<String>,
}

pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub endpoint: String,
    pub server: Option<Child>,
    pub agents: Vec<AgentProc>,
    pub client: Client,
    pub access_key_id: String,
    pub secret: String,
    pub join_token: String,
    /// Extra `kumo server` arguments, kept for restarts.
    server_args: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .map(Stdio::from)
        .expect("log file")
}

impl Cloud {
    /// A controller and one agent.
    pub async fn start(hv: Hv) -> Cloud {
        let mut c = Cloud::controller_only().await;
        c.add_agent(hv).await;
        c
    }

    /// A controller with no agents yet.
    pub async fn controller_only() -> Cloud {
        Cloud::controller_with(&[]).await
    }

    /// A controller with extra `kumo server` arguments (e.g. `--default-cidr 10.64.0.0/16`;
    /// `--heartbeat-timeout` replaces the fixture's 6 s).
    pub async fn controller_with(extra: &[&str]) -> Cloud {
        let dir = tempfile::Builder::new()
            .prefix("kumo-test-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let boot = dir.path().join("bootstrap.json");
        let mut cloud = Cloud {
            dir,
            port,
            endpoint: endpoint.clone(),
            server: None,
            agents: vec![],
            client: Client::new(ClientConfig {
                endpoint: endpoint.clone(),
                region: "kumo".into(),
                access_key_id: String::new(),
                secret_access_key: String::new(),
            })
            .expect("client"),
            access_key_id: String::new(),
            secret: String::new(),
            join_token: String::new(),
            server_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        cloud.start_server();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !boot.exists() {
            assert!(
                Instant::now() < deadline,
                "controller did not write its bootstrap file; see {}",
                cloud.dir.path().join("server.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&boot).expect("read bootstrap"))
                .expect("bootstrap json");
        cloud.access_key_id = v["access_key_id"].as_str().expect("key").to_string();
        cloud.secret = v["secret_access_key"].as_str().expect("secret").to_string();
        cloud.join_token = v["join_token"].as_str().expect("token").to_string();
        cloud.client = cloud.client_for(&cloud.access_key_id.clone(), &cloud.secret.clone());
        cloud.wait_api().await;
        cloud
    }

    pub fn client_for(&self, key: &str, secret: &str) -> Client {
        Client::new(ClientConfig {
            endpoint: self.endpoint.clone(),
            region: "kumo".into(),
            access_key_id: key.into(),
            secret_access_key: secret.into(),
        })
        .expect("client")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// Start (or restart) the controller on the same port and data dir.
    pub fn start_server(&mut self) {
        let mut args = vec![
            "server".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
        ];
        if !self.server_args.iter().any(|a| a == "--heartbeat-timeout") {
            args.extend(["--heartbeat-timeout".into(), "6".into()]);
        }
        args.extend(self.server_args.iter().cloned());
        let child = Command::new(KUMO)
            .args(&args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--bootstrap-file")
            .arg(self.dir.path().join("bootstrap.json"))
            .env("KUMO_LOG", "info,kumo=debug")
            .stdout(log_file(self.dir.path(), "server.log"))
            .stderr(log_file(self.dir.path(), "server.log"))
            .spawn()
            .expect("spawn kumo server");
        self.server = Some(child);
    }

    /// SIGKILL the controller: no chance to clean up, as in a crash.
    pub fn kill_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart_server(&mut self) {
        self.kill_server();
        self.start_server();
        self.wait_api().await;
    }

    pub async fn wait_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(format!("{}/healthz", self.endpoint))
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "controller did not answer; see {}",
                self.dir.path().join("server.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start another agent; real-VM agents get their own network namespace.
    pub async fn add_agent(&mut self, hv: Hv) -> usize {
        self.add_agent_with(hv, &[]).await
    }

    /// Start another agent with extra command-line arguments (e.g. `--capacity 2:2048`).
    pub async fn add_agent_with(&mut self, hv: Hv, extra: &[&str]) -> usize {
        let n = self.agents.len();
        let name = format!("host{n}");
        let netns = (hv == Hv::Qemu).then(|| {
            format!(
                "kt{}-{}",
                std::process::id() % 100000,
                SEQ.fetch_add(1, Ordering::SeqCst)
            )
        });
        let data_dir = self.dir.path().join(&name);
        self.agents.push(AgentProc {
            name,
            data_dir,
            netns,
            child: None,
            hv,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        });
        self.start_agent(n);
        let before = self.agents.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let hosts = self.client.hosts().await.unwrap_or_default();
            if hosts
                .iter()
                .any(|h| h.name == self.agents[n].name && h.state == "up")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent {n} did not register; see {}",
                self.dir.path().join(format!("agent{n}.log")).display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(before, self.agents.len());
        n
    }

    pub fn start_agent(&mut self, n: usize) {
        let a = &self.agents[n];
        let mut cmd = Command::new(KUMO);
        cmd.args([
            "agent",
            "--controller",
            &self.endpoint,
            "--join-token",
            &self.join_token,
            "--name",
            &a.name,
            "--heartbeat-interval",
            "1",
            "--stop-timeout",
            "10",
        ])
        .arg("--data-dir")
        .arg(&a.data_dir)
        .args([
            "--hypervisor",
            if a.hv == Hv::Qemu { "qemu" } else { "sim" },
            "--accel",
            "tcg",
        ])
        .env("KUMO_LOG", "info,kumo=debug")
        .stdout(log_file(self.dir.path(), &format!("agent{n}.log")))
        .stderr(log_file(self.dir.path(), &format!("agent{n}.log")));
        if let Some(ns) = &a.netns {
            cmd.args(["--vm-netns", ns]);
        }
        cmd.args(&a.extra);
        let child = cmd.spawn().expect("spawn kumo agent");
        self.agents[n].child = Some(child);
    }

    pub fn kill_agent(&mut self, n: usize) {
        if let Some(mut c) = self.agents[n].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Import the test guest as `demo` (kernel + initrd + disk), public.
    pub async fn demo_image(&self) -> String {
        demo_image_with(&self.client).await
    }

    pub async fn import_wait(&self, req: &ImportImage) -> String {
        import_wait_with(&self.client, req).await
    }

    /// Poll until the instance is in `want`.
    pub async fn wait_state(&self, id: &str, want: InstanceState, timeout: Duration) -> Instance {
        let deadline = Instant::now() + timeout;
        loop {
            let i = self.client.instance(id).await.expect("instance");
            if i.state == want {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is {} (last error {:?}), wanted {want}; logs in {}",
                i.state,
                i.last_error,
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until the serial console contains `needle`.
    pub async fn wait_console(&self, id: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(out) = self.client.console(id, 1 << 20).await {
                if out.output.contains(needle) {
                    return out.output;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{id}'s console never showed {needle:?}; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Pids of QEMU processes of this cloud (their command line names this cloud's dir).
    pub fn qemu_pids(&self) -> Vec<u32> {
        pids_matching(&["qemu-system", &self.dir.path().display().to_string()])
    }

    /// Pids of QEMU processes running the given instance.
    pub fn qemu_pids_for(&self, id: &str) -> Vec<u32> {
        pids_matching(&["qemu-system", &format!("kumo-{id}")])
    }

    /// Tap devices in an agent's VM namespace.
    pub fn taps(&self, n: usize) -> Vec<String> {
        let Some(ns) = &self.agents[n].netns else {
            return vec![];
        };
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ip", "-br", "link"])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with("kt-"))
            .map(|s| s.split('@').next().unwrap_or(s).to_string())
            .collect()
    }

    /// The router namespaces of an agent's networks (`<vm netns>-r-<key>`, one per network).
    pub fn routers(&self, n: usize) -> Vec<String> {
        let Some(ns) = &self.agents[n].netns else {
            return vec![];
        };
        router_namespaces(ns)
    }

    /// HTTP GET from a router namespace of the agent's networks (where guests are reachable
    /// from: the gateway side).
    pub fn guest_http(&self, n: usize, ip: &str, path: &str) -> Option<String> {
        self.routers(n).iter().find_map(|r| {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", r, "timeout", "5", "busybox", "wget", "-q", "-O", "-",
                ])
                .arg(format!("http://{ip}{path}"))
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
    }
}

/// Import the test guest as `demo` (kernel + initrd + disk), public, through any client
/// (e.g. a `kumo_testcluster::Cluster`'s).
pub async fn demo_image_with(client: &Client) -> String {
    let guest = guest_dir().await;
    let import = |name: &str,
                  kind: &str,
                  file: &str,
                  kernel: Option<String>,
                  ramdisk: Option<String>,
                  cmdline: Option<String>| ImportImage {
        name: name.into(),
        kind: Some(kind.into()),
        path: guest.join(file).display().to_string(),
        format: None,
        kernel_id: kernel,
        ramdisk_id: ramdisk,
        cmdline,
        public: true,
    };
    let k = import_wait_with(
        client,
        &import("demo-kernel", "kernel", "vmlinux", None, None, None),
    )
    .await;
    let r = import_wait_with(
        client,
        &import("demo-initrd", "ramdisk", "initrd.img", None, None, None),
    )
    .await;
    import_wait_with(
        client,
        &import(
            "demo",
            "disk",
            "disk.qcow2",
            Some(k),
            Some(r),
            Some("console=ttyS0 quiet".into()),
        ),
    )
    .await
}

/// Import an image and wait until its operation succeeds.
pub async fn import_wait_with(client: &Client, req: &ImportImage) -> String {
    let started = client.import_image(req).await.expect("import");
    let deadline = Instant::now() + Duration::from_secs(120);
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pids whose command line contains every needle.
pub fn pids_matching(needles: &[&str]) -> Vec<u32> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
            .unwrap_or(true);
        if !zombie && needles.iter().all(|n| cmd.contains(n)) {
            out.push(pid);
        }
    }
    out
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.kill_server();
        for n in 0..self.agents.len() {
            self.kill_agent(n);
        }
        let dir = self.dir.path().display().to_string();
        for pid in pids_matching(&[&dir]) {
            // SAFETY: plain kill(2) of a process this test started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        for a in &self.agents {
            if let Some(ns) = &a.netns {
                for r in router_namespaces(ns).iter().chain([ns]) {
                    let _ = Command::new("ip")
                        .args(["netns", "del", r])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        if std::env::var_os("KUMO_TEST_KEEP").is_some() {
            let p = self.dir.path().to_path_buf();
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("tempdir"),
            ));
            eprintln!("kept test dir {}", p.display());
        }
    }
}

/// Named namespaces `<ns>-r-*`: an agent's router namespaces.
pub fn router_namespaces(ns: &str) -> Vec<String> {
    let prefix = format!("{ns}-r-");
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

static GUEST: OnceCell<PathBuf> = OnceCell::const_new();

/// The test guest, built once per test run (`kumo dev build-guest`, cached by Debian package).
/// A client of a member of a new project, made straight in the controller's store.
pub async fn project_member(cloud: &Cloud, project: &str) -> Client {
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    let p = store.create_project(project).await.expect("project");
    let u = store
        .create_user(&format!("{project}-user"), &p, "member")
        .await
        .expect("user");
    let k = store.create_access_key(&u).await.expect("key");
    store.close().await;
    cloud.client_for(&k.id, &k.secret)
}

pub async fn guest_dir() -> PathBuf {
    GUEST
        .get_or_init(|| async {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest");
            let ok = tokio::process::Command::new(KUMO)
                .args(["dev", "build-guest", "--out"])
                .arg(&dir)
                .status()
                .await
                .expect("run build-guest");
            assert!(ok.success(), "building the test guest failed");
            dir
        })
        .await
        .clone()
}
