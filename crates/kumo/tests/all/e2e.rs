//! The life of one real VM (QEMU under TCG, the test guest): create, boot, reach it over the
//! private network and through the API's websockets, stop (ACPI), start with its disk intact,
//! reboot, terminate, and nothing left behind on the host.

use std::time::{Duration, Instant};

use kumo_cli::Client;
use kumo_types::api::CreateInstance;
use kumo_types::InstanceState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Cloud, Hv};

/// Generous bound for anything that involves a guest booting or shutting down on a busy
/// 2-core machine under TCG (a boot takes ~4 s). Only there to stop a hang.
pub const SLOW: Duration = Duration::from_secs(90);

pub const BOOTED: &str = "KUMO-GUEST-BOOTED id=";
pub const POWEROFF: &str = "KUMO-GUEST-POWEROFF";

/// A minimal websocket client over a plain TCP connection, signed like `Client::websocket`.
/// (The test crate has no websocket library of its own; this speaks just enough RFC 6455.)
pub struct Ws {
    sock: tokio::net::TcpStream,
    buf: Vec<u8>,
    pub closed: bool,
}

impl Ws {
    /// Open a signed websocket to an API path; Err carries the HTTP status line and body.
    pub async fn connect(client: &Client, path: &str) -> Result<Ws, String> {
        let url = client.url(path).map_err(|e| e.to_string())?;
        let headers = client
            .sign("GET", &url, b"", &[])
            .map_err(|e| e.to_string())?;
        let host = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(80)
        );
        let mut sock = tokio::net::TcpStream::connect(&host)
            .await
            .map_err(|e| e.to_string())?;
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let mut req = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        sock.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut chunk))
                .await
                .map_err(|_| "no handshake reply within 30 s".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!(
                    "connection closed during handshake: {}",
                    String::from_utf8_lossy(&buf)
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            // Read the error body (the connection stays open: read Content-Length bytes).
            let len = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let mut rest = buf[head_end..].to_vec();
            while rest.len() < len {
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => rest.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            return Err(format!(
                "{} {}",
                head.lines().next().unwrap_or(""),
                String::from_utf8_lossy(&rest)
            ));
        }
        let expected_accept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        assert!(
            head.to_ascii_lowercase()
                .contains(&expected_accept.to_ascii_lowercase()),
            "bad Sec-WebSocket-Accept in {head}"
        );
        Ok(Ws {
            sock,
            buf: buf[head_end..].to_vec(),
            closed: false,
        })
    }

    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut f = vec![0x80 | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask: [u8; 4] = rand_mask();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.sock.write_all(&f).await
    }

    pub async fn send_binary(&mut self, payload: &[u8]) {
        self.write_frame(0x2, payload)
            .await
            .expect("send websocket frame");
    }

    pub async fn close(&mut self) {
        let _ = self.write_frame(0x8, &1000u16.to_be_bytes()).await;
    }

    async fn fill(&mut self, want: usize, deadline: Instant) -> bool {
        while self.buf.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout(left, self.sock.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    return false;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
        true
    }

    /// The next data frame's payload (binary or text); None on close, EOF or the deadline.
    pub async fn next_data(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            if self.closed || !self.fill(2, deadline).await {
                return None;
            }
            let (b0, b1) = (self.buf[0], self.buf[1]);
            let masked = b1 & 0x80 != 0;
            let mut hdr = 2;
            let mut len = (b1 & 0x7f) as usize;
            if len == 126 {
                if !self.fill(4, deadline).await {
                    return None;
                }
                len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
                hdr = 4;
            } else if len == 127 {
                if !self.fill(10, deadline).await {
                    return None;
                }
                len = u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize;
                hdr = 10;
            }
            let mask_len = if masked { 4 } else { 0 };
            if !self.fill(hdr + mask_len + len, deadline).await {
                return None;
            }
            let mask: Vec<u8> = self.buf[hdr..hdr + mask_len].to_vec();
            let mut payload: Vec<u8> = self.buf[hdr + mask_len..hdr + mask_len + len].to_vec();
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            self.buf.drain(..hdr + mask_len + len);
            match b0 & 0x0f {
                0x0..=0x2 => return Some(payload),
                0x8 => {
                    self.closed = true;
                    return None;
                }
                0x9 => {
                    let _ = self.write_frame(0xA, &payload).await;
                }
                _ => {}
            }
        }
    }

    /// Collect data until it contains `needle`, the stream ends or `timeout` passes.
    pub async fn read_until(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !String::from_utf8_lossy(&out).contains(needle) {
            match self.next_data(deadline).await {
                Some(d) => out.extend_from_slice(&d),
                None => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Collect data until the other side closes (or `timeout`).
    pub async fn read_to_close(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(d) = self.next_data(deadline).await {
            out.extend_from_slice(&d);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn rand_mask() -> [u8; 4] {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    (n ^ 0x5a5a_a5a5).to_be_bytes()
}

/// Create an instance of the demo image (t1.micro) and return its id.
pub async fn create_vm(cloud: &Cloud, name: &str) -> String {
    let req = CreateInstance {
        name: name.into(),
        image: "demo".into(),
        instance_type: Some("t1.micro".into()),
        site: None,
        constraints: vec![],
        placement_group: None,
        ..Default::default()
    };
    let i = cloud
        .client
        .create_instance(&req, None)
        .await
        .expect("create instance");
    assert_eq!(i.name, name);
    assert_eq!(
        i.state,
        InstanceState::Pending,
        "a new instance starts pending"
    );
    i.id
}

/// Times `needle` occurs in the instance's console (whole log).
pub async fn console_count(cloud: &Cloud, id: &str, needle: &str) -> usize {
    cloud
        .client
        .console(id, 1 << 20)
        .await
        .map(|c| c.output.matches(needle).count())
        .unwrap_or(0)
}

/// Wait until `needle` occurs at least `n` times on the console; returns the count.
pub async fn wait_console_count(
    cloud: &Cloud,
    id: &str,
    needle: &str,
    n: usize,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let c = console_count(cloud, id, needle).await;
        if c >= n {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{id}'s console showed {needle:?} {c} times, wanted {n}; logs in {}",
            cloud.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Poll the guest's HTTP `path` (from inside the VM namespace) until it answers.
pub async fn wait_http(cloud: &Cloud, ip: &str, path: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(body) = cloud.guest_http(0, ip, path) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "guest {ip} never answered HTTP {path}; logs in {}",
            cloud.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The guest's counter (GET /counter), waiting for it to answer.
pub async fn counter(cloud: &Cloud, ip: &str) -> u64 {
    let body = wait_http(cloud, ip, "/counter", SLOW).await;
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("guest {ip} /counter answered {body:?}"))
}

/// Read the counter until it has moved past `above` (it ticks every 100 ms).
pub async fn counter_above(cloud: &Cloud, ip: &str, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = counter(cloud, ip).await;
        if c > above {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "guest {ip}'s counter stuck at {c} (not above {above})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Wait until no QEMU process runs the instance.
pub async fn wait_no_qemu(cloud: &Cloud, id: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !cloud.qemu_pids_for(id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU of {id} still runs: {:?}",
            cloud.qemu_pids_for(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every trace of `id` on agent 0's host: QEMU, tap, its directories, ledger entry and DHCP/DNS
/// host entries. Returns what is left, empty when clean.
pub fn leftovers(cloud: &Cloud, id: &str, mac: &str) -> Vec<String> {
    let mut left = vec![];
    let pids = cloud.qemu_pids_for(id);
    if !pids.is_empty() {
        left.push(format!("QEMU processes {pids:?}"));
    }
    let tap = kumo_network::tap_name(id);
    if cloud.taps(0).contains(&tap) {
        left.push(format!("tap {tap}"));
    }
    let data = &cloud.agents[0].data_dir;
    for p in [
        data.join("vms").join(id),
        data.join("run").join(id),
        data.join("ledger").join(format!("{id}.json")),
        data.join("pool").join("disks").join(format!("{id}.json")),
    ] {
        if p.exists() {
            left.push(format!("{}", p.display()));
        }
    }
    // No layer of its root disk either (no snapshot pins one).
    if let Ok(rd) = std::fs::read_dir(data.join("pool").join("layers")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{id}.")) {
                left.push(format!("layer {name}"));
            }
        }
    }
    // Host entries for its MAC in the network state (dnsmasq's logs may mention it: skip logs).
    let mut stack = vec![data.join("net")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if p.is_dir() {
                stack.push(p);
            } else if !name.contains(".log") {
                let text = std::fs::read_to_string(&p)
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if text.contains(&mac.to_ascii_lowercase()) {
                    left.push(format!("{} mentions {mac}", p.display()));
                }
            }
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_end_to_end() {
    let t0 = Instant::now();
    let cloud = Cloud::start(Hv::Qemu).await;
    cloud.demo_image().await;

    // create → running, boot marker with its id
    let id = create_vm(&cloud, "e2e-vm").await;
    let inst = cloud.wait_state(&id, InstanceState::Running, SLOW).await;
    let ip = inst
        .private_ip
        .clone()
        .expect("running instance has a private IP");
    let mac = inst.mac.clone().expect("running instance has a MAC");
    assert_eq!(
        inst.host_id.as_deref(),
        Some(cloud.client.hosts().await.expect("hosts")[0].id.as_str())
    );
    let console = cloud
        .wait_console(&id, &format!("{BOOTED}{id}"), SLOW)
        .await;
    assert_eq!(
        console.matches(BOOTED).count(),
        1,
        "one boot so far:\n{console}"
    );
    assert_eq!(
        cloud.qemu_pids_for(&id).len(),
        1,
        "exactly one QEMU for {id}"
    );
    let tap = kumo_network::tap_name(&id);
    assert!(
        cloud.taps(0).contains(&tap),
        "tap {tap} in the namespace: {:?}",
        cloud.taps(0)
    );

    eprintln!("e2e {:>6.1?} HTTP inside the namespace", t0.elapsed());
    // HTTP inside the namespace
    let page = wait_http(&cloud, &ip, "/", SLOW).await;
    assert!(
        page.contains(&format!("instance-id: {id}")),
        "GET / from the namespace: {page:?}"
    );
    assert!(
        page.contains("hostname: e2e-vm"),
        "GET / names the hostname: {page:?}"
    );
    let console = cloud
        .client
        .console(&id, 1 << 20)
        .await
        .expect("console")
        .output;
    assert!(
        console.contains(&format!("KUMO-GUEST-IP {ip}")),
        "the guest got its private IP {ip} by DHCP:\n{console}"
    );

    eprintln!("e2e {:>6.1?} HTTP through the API", t0.elapsed());
    // HTTP through the API's port-forward websocket
    let mut ws = Ws::connect(&cloud.client, &format!("/api/v1/instances/{id}/tcp/80"))
        .await
        .expect("port-forward websocket");
    ws.send_binary(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let reply = ws.read_to_close(Duration::from_secs(30)).await;
    assert!(
        reply.starts_with("HTTP/1."),
        "an HTTP reply came back through the websocket: {reply:?}"
    );
    assert!(
        reply.contains(&format!("instance-id: {id}")),
        "port-forwarded GET /: {reply:?}"
    );
    eprintln!("e2e {:>6.1?} port 81", t0.elapsed());
    // A port nothing listens on: the stream ends without data instead of hanging.
    let mut ws81 = Ws::connect(&cloud.client, &format!("/api/v1/instances/{id}/tcp/81"))
        .await
        .expect("port-forward websocket to port 81");
    let got = ws81.read_to_close(Duration::from_secs(30)).await;
    assert!(ws81.closed, "a forward to a closed port must end, not hang");
    assert!(
        got.is_empty(),
        "nothing listens on port 81, yet got {got:?}"
    );
    eprintln!("e2e {:>6.1?} unknown instance", t0.elapsed());
    let bad = Ws::connect(&cloud.client, "/api/v1/instances/i-0000000000000000/tcp/80").await;
    let bad = bad
        .err()
        .expect("a forward to an unknown instance is refused");
    assert!(
        bad.contains("404") && bad.contains("NotFound"),
        "clear refusal: {bad}"
    );

    eprintln!("e2e {:>6.1?} interactive serial console", t0.elapsed());
    // interactive serial console
    let mut ser = Ws::connect(&cloud.client, &format!("/api/v1/instances/{id}/serial"))
        .await
        .expect("serial websocket");
    ser.send_binary(b"\n").await;
    ser.send_binary(b"echo kumo-$((6*7))\n").await;
    let out = ser.read_until("kumo-42", Duration::from_secs(30)).await;
    assert!(
        out.contains("kumo-42"),
        "the guest shell evaluated the command: {out:?}"
    );
    ser.close().await;
    drop(ser);

    eprintln!("e2e {:>6.1?} the counter moves", t0.elapsed());
    // the counter moves
    let c1 = counter(&cloud, &ip).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c2 = counter(&cloud, &ip).await;
    assert!(c2 > c1, "counter must increase: {c1} then {c2}");

    eprintln!("e2e {:>6.1?} stop", t0.elapsed());
    // stop: ACPI power button, the guest powers off, QEMU exits
    let pid_before = cloud.qemu_pids_for(&id);
    let stopping = cloud
        .client
        .instance_action(&id, "stop")
        .await
        .expect("stop");
    assert!(
        matches!(
            stopping.state,
            InstanceState::Stopping | InstanceState::Stopped
        ),
        "stop answers {}",
        stopping.state
    );
    let stopped = cloud.wait_state(&id, InstanceState::Stopped, SLOW).await;
    assert!(
        stopped.last_error.is_none(),
        "clean stop: {:?}",
        stopped.last_error
    );
    let console = cloud
        .client
        .console(&id, 1 << 20)
        .await
        .expect("console of a stopped instance")
        .output;
    assert!(
        console.contains(POWEROFF),
        "the guest saw the ACPI power button (graceful stop):\n{console}"
    );
    wait_no_qemu(&cloud, &id, Duration::from_secs(10)).await;
    assert_eq!(pid_before.len(), 1);
    assert!(
        cloud.guest_http(0, &ip, "/counter").is_none(),
        "a stopped guest must not answer"
    );
    let stop_counter = c2;

    eprintln!("e2e {:>6.1?} start", t0.elapsed());
    // start: running again, a second boot marker, the counter continues from the disk
    cloud
        .client
        .instance_action(&id, "start")
        .await
        .expect("start");
    let again = cloud.wait_state(&id, InstanceState::Running, SLOW).await;
    assert_eq!(
        again.private_ip.as_deref(),
        Some(ip.as_str()),
        "the private IP is kept across stop/start"
    );
    assert_eq!(
        again.mac.as_deref(),
        Some(mac.as_str()),
        "the MAC is kept across stop/start"
    );
    wait_console_count(&cloud, &id, &format!("{BOOTED}{id}"), 2, SLOW).await;
    assert_eq!(
        cloud.qemu_pids_for(&id).len(),
        1,
        "exactly one QEMU after start"
    );
    let c3 = counter(&cloud, &ip).await;
    assert!(
        c3 > stop_counter,
        "the counter continues from the disk: {c3} after start, {stop_counter} before stop"
    );

    eprintln!("e2e {:>6.1?} reboot", t0.elapsed());
    // reboot: a new boot marker, same QEMU process (a guest reset), counter keeps going
    let pid = cloud.qemu_pids_for(&id);
    cloud
        .client
        .instance_action(&id, "reboot")
        .await
        .expect("reboot");
    wait_console_count(&cloud, &id, &format!("{BOOTED}{id}"), 3, SLOW).await;
    cloud.wait_state(&id, InstanceState::Running, SLOW).await;
    let c4 = counter_above(&cloud, &ip, c3).await;
    assert!(c4 > c3, "counter after reboot {c4} > {c3}");
    assert_eq!(
        cloud.qemu_pids_for(&id),
        pid,
        "a reboot keeps the QEMU process"
    );

    eprintln!("e2e {:>6.1?} terminate", t0.elapsed());
    // terminate: terminated and nothing left on the host. First make sure the leftover
    // check sees every kind of trace of a live VM (so an empty result means something).
    let traces = leftovers(&cloud, &id, &mac).join("\n");
    for kind in [
        "QEMU",
        "tap",
        "/pool/disks/",
        "layer ",
        "/run/",
        "/ledger/",
        ".dhcp-hosts mentions",
    ] {
        assert!(
            traces.contains(kind),
            "a live VM has a {kind:?} trace:\n{traces}"
        );
    }
    cloud.client.terminate(&id).await.expect("terminate");
    let gone = cloud.wait_state(&id, InstanceState::Terminated, SLOW).await;
    assert!(gone.terminated_at.is_some(), "terminated_at is set");
    let left = leftovers(&cloud, &id, &mac);
    assert!(left.is_empty(), "terminated {id} left: {left:?}");
    assert!(
        cloud.taps(0).is_empty(),
        "no taps left: {:?}",
        cloud.taps(0)
    );
    assert!(
        cloud.qemu_pids().is_empty(),
        "no QEMU of this cloud left: {:?}",
        cloud.qemu_pids()
    );
    assert!(
        cloud.guest_http(0, &ip, "/").is_none(),
        "nobody answers at {ip} any more"
    );
    let err = Ws::connect(&cloud.client, &format!("/api/v1/instances/{id}/serial"))
        .await
        .err()
        .expect("serial of a terminated instance is refused");
    assert!(
        err.contains("409") || err.contains("IncorrectState"),
        "clear refusal: {err}"
    );
    eprintln!("e2e::vm_lifecycle_end_to_end took {:?}", t0.elapsed());
}

/// Several VMs launched at once from a cold host cache fetch each image once and all run.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_launches_share_the_image_cache() {
    let cloud = Cloud::start(Hv::Qemu).await;
    let image = cloud.demo_image().await;
    let req = |name: &str| kumo_types::api::CreateInstance {
        name: name.into(),
        image: image.clone(),
        instance_type: Some("t1.nano".into()),
        site: None,
        constraints: vec![],
        placement_group: None,
        ..Default::default()
    };
    let c = &cloud.client;
    let (r1, r2, r3) = (req("c1"), req("c2"), req("c3"));
    let (a, b, d) = tokio::join!(
        c.create_instance(&r1, None),
        c.create_instance(&r2, None),
        c.create_instance(&r3, None)
    );
    let ids: Vec<String> = [a, b, d]
        .into_iter()
        .map(|r| r.expect("create").id)
        .collect();
    for id in &ids {
        let i = cloud
            .wait_state(id, InstanceState::Running, Duration::from_secs(120))
            .await;
        assert!(i.last_error.is_none(), "{id}: {:?}", i.last_error);
        assert_eq!(cloud.qemu_pids_for(id).len(), 1, "{id} runs exactly once");
    }
    let cache = cloud.agents[0].data_dir.join("pool").join("images");
    let mut files: Vec<String> = std::fs::read_dir(&cache)
        .expect("cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        3,
        "kernel, ramdisk and disk once each: {files:?}"
    );
    assert!(files.iter().all(|f| !f.contains(".download")), "{files:?}");
}
