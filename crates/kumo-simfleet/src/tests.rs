//! The fleet against a fake controller: registration, the agent API of each host, its
//! credentials, heartbeats spread over the interval, dead hosts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use kumo_types::agent::{
    DesiredPower, Heartbeat, ImageRef, NetworkDesired, NicDesired, ObservedPower, RegisterRequest,
    RegisterResponse, VmDesired, VmObserved,
};

use crate::{Fleet, FleetConfig, FleetError};

#[derive(Default)]
struct Fake {
    registered: Mutex<Vec<RegisterRequest>>,
    /// (host id, when, VMs reported)
    beats: Mutex<Vec<(String, Instant, Vec<VmObserved>)>>,
    /// VM ids to answer in `delete` to a host's next heartbeat.
    delete: Mutex<HashMap<String, Vec<String>>>,
}

type F = State<Arc<Fake>>;

async fn register(
    State(f): F,
    Json(r): Json<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), StatusCode> {
    if r.join_token != "tok" {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let resp = RegisterResponse {
        host_id: format!("host-{}", r.name),
        host_secret: format!("secret-{}", r.name),
    };
    f.registered.lock().expect("lock").push(r);
    Ok((StatusCode::CREATED, Json(resp)))
}

async fn heartbeat(
    State(f): F,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> Result<Json<serde_json::Value>, StatusCode> {
    let name = hb.host_id.trim_start_matches("host-");
    let want = format!("Bearer {}:secret-{name}", hb.host_id);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let delete = f
        .delete
        .lock()
        .expect("lock")
        .remove(&hb.host_id)
        .unwrap_or_default();
    f.beats
        .lock()
        .expect("lock")
        .push((hb.host_id.clone(), Instant::now(), hb.vms));
    Ok(Json(serde_json::json!({ "delete": delete })))
}

async fn fake_controller() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/api/v1/agent/register", post(register))
        .route("/api/v1/agent/heartbeat", post(heartbeat))
        .with_state(fake.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/"), fake)
}

fn config(controller: String, count: usize, interval: Duration) -> FleetConfig {
    FleetConfig {
        controller,
        join_token: "tok".into(),
        count,
        name_prefix: "sim".into(),
        sites: vec!["site1".into(), "site2".into(), "site3".into()],
        vcpus: 8,
        memory_mib: 16384,
        labels: BTreeMap::from([("rack".to_string(), "a".to_string())]),
        storage_pool_every: Some(4),
        heartbeat_interval: interval,
        listen: "127.0.0.1:0".parse().expect("addr"),
    }
}

fn spec(id: &str, generation: i64, power: DesiredPower) -> VmDesired {
    let img = ImageRef {
        id: "img-1".into(),
        sha256: String::new(),
        size: 0,
        controller_path: "/nowhere".into(),
    };
    VmDesired {
        id: id.into(),
        name: id.into(),
        generation,
        power,
        reboot_seq: 3,
        vcpus: 2,
        memory_mib: 512,
        disk_gib: 4,
        image: img,
        kernel: None,
        ramdisk: None,
        cmdline: None,
        nic: NicDesired {
            mac: "52:54:00:00:00:01".into(),
            ip: "10.0.0.10".into(),
            network: NetworkDesired {
                id: "vpc-1".into(),
                name: "default".into(),
                cidr: "10.0.0.0/24".into(),
                gateway: "10.0.0.1".into(),
            },
        },
        root_snapshot: None,
        volumes: vec![],
        uuid: None,
        lease_ms: None,
        ha: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_register_and_answer_the_agent_api() {
    let (ctl, fake) = fake_controller().await;
    let fleet = Fleet::start(config(ctl, 10, Duration::from_secs(60)))
        .await
        .expect("start");
    let hosts = fleet.hosts();
    assert_eq!(hosts.len(), 10);
    assert_eq!(
        hosts[0],
        ("sim-0000".to_string(), "host-sim-0000".to_string())
    );
    let reg: HashMap<String, RegisterRequest> = fake
        .registered
        .lock()
        .expect("lock")
        .drain(..)
        .map(|r| (r.name.clone(), r))
        .collect();
    let r = &reg["sim-0005"];
    let base = format!("http://{}/h/sim-0005", fleet.addr());
    assert_eq!(r.address, base);
    assert_eq!(r.site, "site3");
    assert_eq!(
        (r.info.vcpus, r.info.memory_mib, r.info.hypervisor.as_str()),
        (8, 16384, "sim")
    );
    assert_eq!(
        (r.info.accel.as_str(), r.info.qemu_version.as_str()),
        ("tcg", "sim")
    );
    assert_eq!(r.info.storage_pool, "pool-1");
    assert_eq!(r.info.labels.get("rack").map(String::as_str), Some("a"));

    let http = reqwest::Client::new();
    let good = "host-sim-0005:secret-sim-0005";
    // Wrong credentials: another host's, or none.
    for bad in ["host-sim-0004:secret-sim-0004", "host-sim-0005:nope", ""] {
        let r = http
            .put(format!("{base}/agent/v1/vms/i-1"))
            .bearer_auth(bad)
            .json(&spec("i-1", 1, DesiredPower::Running))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 401, "credential {bad:?}");
    }
    let r = http
        .get(format!("{base}/agent/v1/vms"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);

    // A desired spec is answered at once with what it asks for.
    let put = |id: &str, g: i64, p: DesiredPower| {
        http.put(format!("{base}/agent/v1/vms/{id}"))
            .bearer_auth(good)
            .json(&spec(id, g, p))
            .send()
    };
    let r = put("i-1", 2, DesiredPower::Running).await.expect("put");
    assert!(r.status().is_success());
    let o: VmObserved = r.json().await.expect("json");
    assert_eq!(
        (o.id.as_str(), o.generation, o.power, o.reboot_seq, o.error),
        ("i-1", 2, ObservedPower::Running, 3, None)
    );
    let o: VmObserved = put("i-1", 3, DesiredPower::Stopped)
        .await
        .expect("put")
        .json()
        .await
        .expect("json");
    assert_eq!((o.generation, o.power), (3, ObservedPower::Stopped));
    // An older spec does not undo a newer one.
    let o: VmObserved = put("i-1", 2, DesiredPower::Running)
        .await
        .expect("put")
        .json()
        .await
        .expect("json");
    assert_eq!((o.generation, o.power), (3, ObservedPower::Stopped));
    put("i-2", 1, DesiredPower::Running).await.expect("put");
    // The path and the spec must agree.
    let r = http
        .put(format!("{base}/agent/v1/vms/i-3"))
        .bearer_auth(good)
        .json(&spec("i-4", 1, DesiredPower::Running))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400);

    let list: Vec<VmObserved> = http
        .get(format!("{base}/agent/v1/vms"))
        .bearer_auth(good)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list.len(), 2);
    assert_eq!(fleet.vm_count(), 2);
    let vms = fleet.vms_on("sim-0005");
    assert_eq!(
        vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        ["i-1", "i-2"]
    );
    assert_eq!((vms[0].vcpus, vms[0].memory_mib), (2, 512));
    assert!(fleet.vms_on("sim-0004").is_empty());
    assert!(fleet.vms_on("nope").is_empty());

    // Delete, twice: gone either way.
    for _ in 0..2 {
        let r = http
            .delete(format!("{base}/agent/v1/vms/i-1"))
            .bearer_auth(good)
            .send()
            .await
            .expect("delete");
        assert!(r.status().is_success());
    }
    assert_eq!(fleet.vm_count(), 1);

    // A dead host answers nothing useful.
    fleet.stop_host("sim-0005").expect("stop");
    let r = put("i-5", 1, DesiredPower::Running).await.expect("put");
    assert_eq!(r.status(), 503);
    fleet.resume_host("sim-0005").expect("resume");
    let r = put("i-5", 1, DesiredPower::Running).await.expect("put");
    assert!(r.status().is_success());
    assert!(matches!(
        fleet.stop_host("nope"),
        Err(FleetError::NoSuchHost(_))
    ));
    let r = http
        .get(format!("http://{}/h/nope/agent/v1/vms", fleet.addr()))
        .bearer_auth(good)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);

    let addr = fleet.addr();
    fleet.shutdown().await;
    assert!(
        http.get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_err(),
        "the listener is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_spread_and_carry_the_vms() {
    const N: usize = 40;
    let interval = Duration::from_millis(800);
    let (ctl, fake) = fake_controller().await;
    let fleet = Fleet::start(config(ctl, N, interval)).await.expect("start");
    let base = format!("http://{}/h/sim-0007", fleet.addr());
    let http = reqwest::Client::new();
    for id in ["i-1", "i-2"] {
        http.put(format!("{base}/agent/v1/vms/{id}"))
            .bearer_auth("host-sim-0007:secret-sim-0007")
            .json(&spec(id, 1, DesiredPower::Running))
            .send()
            .await
            .expect("put");
    }
    fleet.stop_host("sim-0003").expect("stop");
    tokio::time::sleep(Duration::from_millis(100)).await;
    fake.beats.lock().expect("lock").clear();
    // The controller no longer wants i-2.
    fake.delete
        .lock()
        .expect("lock")
        .insert("host-sim-0007".into(), vec!["i-2".into()]);
    tokio::time::sleep(interval * 3).await;

    let beats = std::mem::take(&mut *fake.beats.lock().expect("lock"));
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for (h, _, _) in &beats {
        *per_host.entry(h.as_str()).or_default() += 1;
    }
    assert_eq!(
        per_host.get("host-sim-0003"),
        None,
        "a stopped host is silent"
    );
    assert_eq!(per_host.len(), N - 1, "every other host beats");
    assert!(
        per_host.values().all(|&n| (2..=4).contains(&n)),
        "about one beat per host per interval: {per_host:?}"
    );
    // Spread: in any tenth of the interval, about a tenth of the beats (never all at once).
    let t0 = beats[0].1;
    let mut buckets = [0usize; 10];
    for (_, t, _) in &beats {
        let phase = (t.duration_since(t0).as_secs_f64() / interval.as_secs_f64()).fract();
        buckets[(phase * 10.0) as usize % 10] += 1;
    }
    let most = buckets.iter().max().copied().unwrap_or(0);
    assert!(
        most <= beats.len() / 4,
        "beats bunch up: {buckets:?} of {}",
        beats.len()
    );
    // The VMs ride along; the one the controller refused is removed after the first beat.
    let of7: Vec<&Vec<VmObserved>> = beats
        .iter()
        .filter(|(h, _, _)| h == "host-sim-0007")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(of7[0].len(), 2);
    assert_eq!(of7.last().map(|v| v.len()), Some(1));
    assert_eq!(
        fleet
            .vms_on("sim-0007")
            .iter()
            .map(|v| v.id.as_str())
            .collect::<Vec<_>>(),
        ["i-1"]
    );
    let s = fleet.stats();
    assert!(
        s.heartbeats_ok >= beats.len() as u64 && s.puts == 2,
        "{s:?}"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_wrong_join_token_fails_the_start() {
    let (ctl, _fake) = fake_controller().await;
    let mut cfg = config(ctl, 3, Duration::from_secs(1));
    cfg.join_token = "wrong".into();
    match Fleet::start(cfg).await {
        Err(FleetError::Refused { status: 401, .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a wrong join token was accepted"),
    }
}
