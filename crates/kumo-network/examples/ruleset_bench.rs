//! Issue 4's benchmarks, the kumo-network side (root only; driven by `bench/issue4.py`, see BENCHMARKS.md).
//!
//! `ruleset_bench` (no arguments), figure 1: renders the host ruleset for RULESET_PORTS ports (1,000) with
//! 10-rule security groups in two shapes, (a) every port in one group, (b) every port in its own group,
//! and applies it with `nft -f` in a scratch namespace it creates (`ip netns add`) and always deletes,
//! also on error and on SIGINT/SIGTERM. RULESET_RUNS (11) runs per shape; median and max of render, apply
//! and both together, plus the agent's own path (`Nft::ensure`: apply + the listing kept for drift
//! checks). It then checks that the ruleset is complete and that a broken ruleset changes nothing.
//! RULESET_DUMP=DIR writes the two rendered rulesets there.
//!
//! `ruleset_bench host-apply NETNS STATE_DIR ROUTER_PREFIX TUNNEL_IP DESIRED_JSON RULESET_OUT`, figure 3's
//! set-up: `HostNetwork::apply` of the `HostDesired` in DESIRED_JSON inside the existing namespace NETNS,
//! then the rendered host ruleset (what apply loaded) written to RULESET_OUT so that the caller can load
//! it again after flushing it. The caller owns the namespaces and removes them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kumo_network::{
    mac_for, render_for_test, tap_name, GroupPolicy, HostDesired, HostNetwork, HostOptions,
    Isolation, NetworkError, NetworkSpec, Nft, PortSpec, RulePolicy, HOST_TABLES,
};

/// What can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("usage: {0}")]
    Usage(String),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a HostDesired document: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("check failed: {0}")]
    Check(String),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

type Result<T> = std::result::Result<T, BenchError>;

const GOAL_MS: f64 = 200.0;
const NETWORK: &str = "bench";
const CIDR_BASE: u32 = 0x0a80_0000; // 10.128.0.0/18: room for 16,000 ports

/// Runs a program to completion; its stdout, or an error carrying its stderr.
async fn run(program: &str, args: &[&str]) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| BenchError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(BenchError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A namespace this program created; deleted when dropped (errors, panics and signals included).
struct ScratchNs {
    name: String,
}

impl ScratchNs {
    async fn create(name: String) -> Result<Self> {
        run("ip", &["netns", "add", &name]).await?;
        let ns = ScratchNs { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]).await?;
        Ok(ns)
    }
}

impl Drop for ScratchNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Resolves on SIGINT or SIGTERM (never, if the handlers cannot be installed).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let work = async {
        match args.first().map(String::as_str) {
            None => figure1().await,
            Some("host-apply") => host_apply(&args[1..]).await,
            Some(other) => Err(BenchError::Usage(format!(
                "unknown mode {other:?}; run without arguments, or `host-apply ...`"
            ))),
        }
    };
    // Losing the race drops `work`, and with it any scratch namespace guard.
    let result = tokio::select! {
        r = work => r,
        s = interrupted() => Err(BenchError::Interrupted(s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ruleset_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------------------------------------ figure 1

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .parse()
            .map_err(|_| BenchError::Usage(format!("{name}={v:?} is not a number"))),
    }
}

fn rule(protocol: &str, ports: Option<(u16, u16)>, sources: &[String]) -> RulePolicy {
    RulePolicy {
        protocol: protocol.into(),
        from_port: ports.map(|p| p.0),
        to_port: ports.map(|p| p.1),
        sources: sources.to_vec(),
    }
}

/// Ten rules (8 ingress, 2 egress) for group number `j`, varied by `j` so that groups share no rule
/// sets; the first is EC2's default-group rule (all traffic from the group's members, one /32 each).
fn group(j: usize, members: Vec<String>) -> GroupPolicy {
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    let (hi, lo) = (j / 256 % 50, j % 256);
    let range = 8000 + (j % 1000) as u16;
    let any = s(&["0.0.0.0/0"]);
    let own = s(&["10.128.0.0/18"]);
    GroupPolicy {
        id: format!("sg-{j:08x}"),
        ingress: vec![
            rule("all", None, &members),
            rule(
                "tcp",
                Some((22, 22)),
                &[
                    "198.51.100.0/24".to_string(),
                    format!("10.{}.{lo}.0/24", 200 + hi),
                ],
            ),
            rule("tcp", Some((80, 80)), &any),
            rule("tcp", Some((443, 443)), &any),
            rule("tcp", Some((range, range + 99)), &own),
            rule("udp", Some((53, 53)), &own),
            rule("icmp", None, &any),
            rule(
                "tcp",
                Some((5432, 5432)),
                &[
                    "10.128.0.0/24".to_string(),
                    format!("172.{}.{lo}.0/24", 16 + hi % 16),
                ],
            ),
        ],
        egress: vec![
            rule("all", None, &any),
            rule(
                "udp",
                Some((123, 123)),
                &[format!("192.0.2.{}", 1 + j % 250)],
            ),
        ],
    }
}

/// One VXLAN network with `ports` ports; `own_groups`: each port in its own group, else all in one.
fn shape(ports: usize, own_groups: bool) -> (Vec<(NetworkSpec, Vec<PortSpec>)>, Vec<GroupPolicy>) {
    let net = NetworkSpec {
        name: NETWORK.into(),
        bridge: "kb-bench".into(),
        cidr: "10.128.0.0/18".into(),
        gateway: "10.128.0.1".into(),
        mtu: Some(1450),
        isolation: Isolation::Vxlan { vni: 4242 },
        peers: vec!["192.0.2.2".into(), "192.0.2.3".into()],
        ipv6_cidr: None,
    };
    let mut specs = Vec::with_capacity(ports);
    for i in 0..ports {
        let id = format!("i-{:017x}", 0x4_0000 + i);
        let ip = Ipv4Addr::from(CIDR_BASE + 10 + i as u32).to_string();
        let g = if own_groups { i } else { 0 };
        specs.push(PortSpec {
            tap: tap_name(&id),
            mac: mac_for(&id),
            ip,
            hostname: format!("vm-{i}"),
            groups: vec![format!("sg-{g:08x}")],
            public_ip: None,
        });
    }
    let groups = if own_groups {
        specs
            .iter()
            .enumerate()
            .map(|(i, p)| group(i, vec![p.ip.clone()]))
            .collect()
    } else {
        vec![group(0, specs.iter().map(|p| p.ip.clone()).collect())]
    };
    (vec![(net, specs)], groups)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, max) of samples in ms.
fn stats(xs: &[f64]) -> (f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[n - 1])
}

fn show(xs: &[f64]) -> String {
    let (m, x) = stats(xs);
    format!("{m:.1}/{x:.1}")
}

#[derive(Default)]
struct Samples {
    render: Vec<f64>,
    apply: Vec<f64>,
    total: Vec<f64>,
    apply_empty: Vec<f64>,
    ensure: Vec<f64>,
    drift_check: Vec<f64>,
}

/// Number of JSON objects of `kind` in `nft -j` output whose name passes `pred`, or the length of a set's
/// element list when `kind` is "elem".
fn count_json(listing: &str, kind: &str, pred: impl Fn(&str) -> bool) -> Result<usize> {
    let v: serde_json::Value = serde_json::from_str(listing).map_err(|e| BenchError::Json {
        path: PathBuf::from("<nft -j output>"),
        source: e,
    })?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let mut n = 0;
    for item in items {
        if kind == "elem" {
            n += item["set"]["elem"].as_array().map_or(0, |a| a.len());
        } else if item[kind]["name"].as_str().is_some_and(&pred) {
            n += 1;
        }
    }
    Ok(n)
}

struct ShapeResult {
    label: &'static str,
    samples: Samples,
    /// The rendered host ruleset (live in the namespace after the run).
    text: String,
    /// A tap that is in the ruleset's `taps` set.
    first_tap: String,
}

async fn bench_shape(
    nft: &Nft,
    ns: &str,
    dir: &Path,
    label: &'static str,
    ports: usize,
    own_groups: bool,
    runs: usize,
) -> Result<ShapeResult> {
    let (networks, groups) = shape(ports, own_groups);
    let netns = Some(ns);
    let (text, _) = render_for_test(&networks, &groups, None)?;
    // RULESET_DUMP=DIR keeps the rendered text for inspection (e.g. `nft -c -f` by hand).
    if let Ok(d) = std::env::var("RULESET_DUMP") {
        let p = Path::new(&d).join(format!("host-{label}.nft"));
        std::fs::write(&p, &text).map_err(|e| BenchError::Io { path: p, source: e })?;
    }
    let profiles = if own_groups { ports } else { 1 };
    let rules: usize = groups
        .iter()
        .map(|g| g.ingress.len() + g.egress.len())
        .sum();
    let mut s = Samples::default();
    // One unmeasured round first: nft and the kernel warm up, like an agent that has applied before.
    nft.apply(netns, &text).await?;
    for run_no in 0..runs {
        // Into an empty namespace (the agent's first apply after boot).
        nft.delete(netns, HOST_TABLES).await?;
        let t = Instant::now();
        let (fresh, _) = render_for_test(&networks, &groups, None)?;
        nft.apply(netns, &fresh).await?;
        s.apply_empty.push(ms(t.elapsed()));
        // Replacing the live tables (every later change): render, then apply, timed apart and together.
        let t0 = Instant::now();
        let (host, _) = render_for_test(&networks, &groups, None)?;
        let t1 = Instant::now();
        nft.apply(netns, &host).await?;
        let t2 = Instant::now();
        s.render.push(ms(t1 - t0));
        s.apply.push(ms(t2 - t1));
        s.total.push(ms(t2 - t0));
        if host != text {
            return Err(BenchError::Check("rendering is not deterministic".into()));
        }
        // The agent's path: apply, then list the tables for its drift record (a fresh record forces apply).
        let record = dir.join(format!("record-{label}-{run_no}.json"));
        let t = Instant::now();
        let did = nft.ensure(netns, HOST_TABLES, &host, &record).await?;
        s.ensure.push(ms(t.elapsed()));
        if did.is_none() {
            return Err(BenchError::Check("ensure did not apply".into()));
        }
        // Nothing changed: what the agent pays on every periodic re-render (list tables, compare).
        let t = Instant::now();
        let again = nft.ensure(netns, HOST_TABLES, &host, &record).await?;
        s.drift_check.push(ms(t.elapsed()));
        if let Some(did) = again {
            return Err(BenchError::Check(format!(
                "unchanged ruleset re-applied: {did}"
            )));
        }
    }
    // The live ruleset is the whole one: every port in the tap set, one mark chain per profile
    // (the rules themselves are set elements).
    let ip_nft = ["netns", "exec", ns, "nft", "-j"];
    let set = run(
        "ip",
        &[&ip_nft[..], &["list", "set", "bridge", "kumo", "taps"]].concat(),
    )
    .await?;
    let taps = count_json(&set, "elem", |_| true)?;
    let chains = run("ip", &[&ip_nft[..], &["list", "chains", "bridge"]].concat()).await?;
    let sg_in = count_json(&chains, "chain", |n| n.starts_with("out_profile_"))?;
    if taps != ports || sg_in != profiles {
        return Err(BenchError::Check(format!(
            "{label}: live ruleset has {taps} taps and {sg_in} profile chains, want {ports} and {profiles}"
        )));
    }
    println!(
        "  ({label}) {ports} ports, {} group(s), {rules} rules in all: {} lines, {:.0} KiB of nft text; live: {taps} taps, {sg_in} profile chain(s)",
        groups.len(),
        text.lines().count(),
        text.len() as f64 / 1024.0
    );
    println!(
        "      median/max ms over {runs} runs: render {}, nft -f replacing the live tables {}, render+apply {}; \
         render+apply into empty tables {}; agent Nft::ensure (apply + drift listing) {}; \
         periodic drift check with nothing to do (listing) {}",
        show(&s.render),
        show(&s.apply),
        show(&s.total),
        show(&s.apply_empty),
        show(&s.ensure),
        show(&s.drift_check)
    );
    let first_tap = networks[0].1[0].tap.clone();
    Ok(ShapeResult {
        label,
        samples: s,
        text,
        first_tap,
    })
}

/// Applies the live `text` again with one more command at its end that only the kernel refuses (creating
/// a set element that exists: EEXIST at commit), so the tables were already deleted and rebuilt inside the
/// transaction when it fails. The live ruleset must be exactly as before.
async fn check_atomic(nft: &Nft, ns: &str, text: &str, tap: &str) -> Result<String> {
    let list = ["netns", "exec", ns, "nft", "list", "ruleset"];
    let before = run("ip", &list).await?;
    let broken = format!("{text}create element bridge kumo taps {{ \"{tap}\" }}\n");
    let refused = nft.apply(Some(ns), &broken).await.is_err();
    let after = run("ip", &list).await?;
    if !refused {
        return Err(BenchError::Check("nft accepted a broken ruleset".into()));
    }
    if before != after {
        return Err(BenchError::Check(
            "a refused ruleset changed the live one (not atomic)".into(),
        ));
    }
    Ok(format!(
        "the same ruleset plus a last line the kernel refuses (EEXIST) was rolled back whole; the live ruleset \
         ({} lines) is unchanged",
        before.lines().count()
    ))
}

async fn figure1() -> Result<()> {
    let ports = env_usize("RULESET_PORTS", 1000)?;
    let runs = env_usize("RULESET_RUNS", 11)?;
    if !(1..=16_000).contains(&ports) || runs == 0 {
        return Err(BenchError::Usage(
            "RULESET_PORTS must be 1..=16000 and RULESET_RUNS at least 1".into(),
        ));
    }
    let nft = Nft::new()?;
    let name =
        std::env::var("RULESET_NETNS").unwrap_or_else(|_| format!("kb4rs-{}", std::process::id()));
    // Drift records of Nft::ensure; removed when dropped (also when a signal drops this future).
    let dir = tempfile::tempdir().map_err(|e| BenchError::Io {
        path: std::env::temp_dir(),
        source: e,
    })?;
    figure1_in(&nft, &name, dir.path(), ports, runs).await
}

async fn figure1_in(nft: &Nft, name: &str, dir: &Path, ports: usize, runs: usize) -> Result<()> {
    let ns = ScratchNs::create(name.to_string()).await?;
    let nft_version = run("nft", &["--version"]).await?;
    println!(
        "figure 1: host ruleset, {ports} ports x 10 rules, scratch namespace {} ({})",
        ns.name,
        nft_version.trim()
    );
    // Floor: what one `ip netns exec NS nft -f` costs with (almost) nothing to do.
    let mut floor = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        nft.apply(
            Some(&ns.name),
            "table inet kbfloor {}\ndelete table inet kbfloor\n",
        )
        .await?;
        floor.push(ms(t.elapsed()));
    }
    println!(
        "  floor: `ip netns exec NS nft -f` of an empty transaction, median/max {} ms",
        show(&floor)
    );
    let a = bench_shape(nft, &ns.name, dir, "a", ports, false, runs).await?;
    let b = bench_shape(nft, &ns.name, dir, "b", ports, true, runs).await?;
    let atomic = check_atomic(nft, &ns.name, &b.text, &b.first_tap).await?;
    println!("  atomic: {atomic}");
    let verdict = |xs: &[f64]| {
        let (m, x) = stats(xs);
        let met = if m <= GOAL_MS { "MET" } else { "MISSED" };
        let tail = if x <= GOAL_MS {
            "max within"
        } else {
            "max over"
        };
        format!("median {m:.0} ms, max {x:.0} ms ({met}; {tail})")
    };
    let part = |r: &ShapeResult, what: &str| {
        let (rm, _) = stats(&r.samples.render);
        let (am, _) = stats(&r.samples.apply);
        format!(
            "({}) {what}: {} [render {rm:.0} + nft -f {am:.0} ms]",
            r.label,
            verdict(&r.samples.total)
        )
    };
    println!(
        "RESULT ruleset: render + atomic nft -f of the host ruleset, {ports} VMs x 10 rules: {}; {}; goal <= {GOAL_MS:.0} ms; \
         atomic: yes [n={runs} each, replacing live tables]",
        part(&a, "one group"),
        part(&b, &format!("{ports} groups"))
    );
    drop(ns);
    Ok(())
}

// ------------------------------------------------------------------------------------------ host-apply

async fn host_apply(args: &[String]) -> Result<()> {
    let [netns, state, prefix, tunnel, desired, out] = args else {
        return Err(BenchError::Usage(
            "host-apply NETNS STATE_DIR ROUTER_PREFIX TUNNEL_IP DESIRED_JSON RULESET_OUT".into(),
        ));
    };
    let tunnel_ip: Ipv4Addr = tunnel
        .parse()
        .map_err(|_| BenchError::Usage(format!("{tunnel:?} is not an IPv4 address")))?;
    let path = PathBuf::from(desired);
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::Io {
        path: path.clone(),
        source: e,
    })?;
    let want: HostDesired =
        serde_json::from_str(&text).map_err(|e| BenchError::Json { path, source: e })?;
    // Refuse to create a namespace: the caller made it and will delete it.
    if !Path::new("/run/netns").join(netns).exists() {
        return Err(BenchError::Usage(format!(
            "namespace {netns} does not exist"
        )));
    }
    let opts = HostOptions {
        router_prefix: prefix.clone(),
        tunnel_ip: Some(tunnel_ip),
        trunk: None,
        public_bridge: None,
    };
    let net = HostNetwork::new(Some(netns.clone()), PathBuf::from(state), opts).await?;
    let t = Instant::now();
    let repairs = net.apply(&want).await?;
    eprintln!(
        "host-apply {netns}: {} changes in {:.0} ms",
        repairs.len(),
        ms(t.elapsed())
    );
    for r in &repairs {
        eprintln!("  {r}");
    }
    // Without a public bridge apply renders with no public network; so does this.
    let (host, _) = render_for_test(&want.networks, &want.groups, None)?;
    std::fs::write(out, host).map_err(|e| BenchError::Io {
        path: PathBuf::from(out),
        source: e,
    })?;
    Ok(())
}
