//! EC2 compatibility with the real clients (issue 7): boto3 and the aws CLI, installed from PyPI
//! into the project's venv by `scripts/test`, drive a real kumo with real QEMU guests through
//! the scenarios in `tests/compat/`. A missing venv or client is a failure, never a skip.
//!
//! The scripts run side by side (each tags what it launches with its own value) against one
//! cloud whose agent offers 4 vCPUs / 8 GiB, so that m1.2xlarge fits nowhere
//! (InsufficientInstanceCapacity). A second project's key, made through the store, checks that
//! another project's ids are NotFound.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{guest_dir, Cloud, Hv};

/// Each script's own time limit (only there to stop a hang; a run takes a few minutes).
const SCRIPT_LIMIT: Duration = Duration::from_secs(480);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv with boto3 and awscli: `$KUMO_COMPAT_VENV`, or `target/compat-venv`.
fn venv() -> PathBuf {
    let v = std::env::var_os("KUMO_COMPAT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/compat-venv"));
    let python = v.join("bin/python");
    let aws = v.join("bin/aws");
    assert!(
        python.exists() && aws.exists(),
        "the EC2 compatibility tests need boto3 and the aws CLI in a venv at {} \
         (bin/python and bin/aws): run scripts/test, which installs them from PyPI \
         (or set KUMO_COMPAT_VENV to such a venv)",
        v.display()
    );
    let check = std::process::Command::new(&python)
        .args(["-c", "import boto3, botocore, awscli"])
        .output()
        .expect("run the venv's python");
    assert!(
        check.status.success(),
        "the venv at {} lacks boto3/awscli: {}; run scripts/test to reinstall it",
        v.display(),
        String::from_utf8_lossy(&check.stderr)
    );
    v
}

struct Outcome {
    name: String,
    ok: bool,
    secs: f64,
    output: String,
}

async fn run_script(
    name: &str,
    program: &Path,
    args: &[PathBuf],
    env: &[(String, String)],
) -> Outcome {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(workspace_root().join("tests/compat"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Nothing of the caller's own AWS setup leaks in (profiles, endpoints, credentials).
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let (ok, output) = match tokio::time::timeout(SCRIPT_LIMIT, child.wait_with_output()).await {
        Ok(Ok(out)) => (
            out.status.success(),
            format!(
                "{}{}{}",
                String::from_utf8_lossy(&out.stdout),
                if out.stderr.is_empty() {
                    ""
                } else {
                    "\n--- stderr\n"
                },
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Ok(Err(e)) => (false, format!("waiting for {name} failed: {e}")),
        Err(_) => (
            false,
            format!("{name} did not finish within {SCRIPT_LIMIT:?} (killed)"),
        ),
    };
    Outcome {
        name: name.into(),
        ok,
        secs: started.elapsed().as_secs_f64(),
        output,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_compat_with_boto3_and_aws_cli() {
    let started = Instant::now();
    let venv = venv();
    let mut cloud = Cloud::controller_only().await;
    cloud
        .add_agent_with(Hv::Qemu, &["--capacity", "4:8192"])
        .await;
    cloud.demo_image().await;
    let guest = guest_dir().await;

    // A second project with a member's key, straight through the server's store.
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open the server's store");
    let project = store
        .create_project("compat-other")
        .await
        .expect("create project");
    let user = store
        .create_user("compat-other", &project, "member")
        .await
        .expect("create user");
    let other = store.create_access_key(&user).await.expect("create key");
    drop(store);

    let bin = venv.join("bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let nowhere = cloud.dir.path().join("no-aws-config");
    let run = format!(
        "{:x}",
        std::process::id() ^ (started.elapsed().subsec_nanos())
    );
    let env: Vec<(String, String)> = [
        ("PATH", path),
        ("AWS", bin.join("aws").display().to_string()),
        ("KUMO_EC2_ENDPOINT", cloud.endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", cloud.access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", cloud.secret.clone()),
        ("AWS_DEFAULT_REGION", "kumo".into()),
        ("AWS_CONFIG_FILE", nowhere.display().to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", nowhere.display().to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_PAGER", String::new()),
        ("KUMO_OTHER_ACCESS_KEY_ID", other.id.clone()),
        ("KUMO_OTHER_SECRET_ACCESS_KEY", other.secret.clone()),
        ("KUMO_GUEST_DIR", guest.display().to_string()),
        ("KUMO_COMPAT_RUN", run),
        ("PYTHONDONTWRITEBYTECODE", "1".into()),
        ("PYTHONUNBUFFERED", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let python = bin.join("python");
    let compat = workspace_root().join("tests/compat");
    let (life, describe, errors, volumes, cli) = (
        [compat.join("boto3_lifecycle.py")],
        [compat.join("boto3_describe.py")],
        [compat.join("boto3_errors.py")],
        [compat.join("boto3_volumes.py")],
        [compat.join("awscli_scenario.sh")],
    );
    let outcomes = tokio::join!(
        run_script("boto3_lifecycle.py", &python, &life, &env),
        run_script("boto3_describe.py", &python, &describe, &env),
        run_script("boto3_errors.py", &python, &errors, &env),
        run_script("boto3_volumes.py", &python, &volumes, &env),
        run_script("awscli_scenario.sh", Path::new("bash"), &cli, &env),
    );
    let outcomes = [outcomes.0, outcomes.1, outcomes.2, outcomes.3, outcomes.4];
    let mut report = String::new();
    for o in &outcomes {
        report.push_str(&format!(
            "\n===== {} ({}, {:.0} s)\n{}",
            o.name,
            if o.ok { "ok" } else { "FAILED" },
            o.secs,
            o.output
        ));
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.name.as_str())
        .collect();
    let summary = format!(
        "EC2 compatibility: {} script(s), {} failed, {:.0} s in all",
        outcomes.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{summary}: {failed:?} failed; server logs in {}{report}",
        cloud.dir.path().display()
    );
    println!("{summary}{report}");
}
