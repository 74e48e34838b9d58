//! Key pairs (generated keys that match what `ssh-keygen` says, imported ones, kept by
//! instances after deletion) and the `kumo sg` / `kumo key` commands.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kumo_types::security::CreateKeyPair;

use super::{refused, vm};
use crate::common::{Cloud, Hv, KUMO};
use crate::sim::tiny_image;

/// `kumo ARGS` as the given key; (success, stdout + stderr).
fn cli(cloud: &Cloud, key: &str, secret: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(KUMO)
        .args(args)
        .env(
            "KUMO_CONFIG",
            cloud.dir.path().join("no-client-config.toml"),
        )
        .env("KUMO_ENDPOINT", &cloud.endpoint)
        .env("KUMO_REGION", "kumo")
        .env("KUMO_ACCESS_KEY_ID", key)
        .env("KUMO_SECRET_ACCESS_KEY", secret)
        .output()
        .expect("run kumo");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `ssh-keygen ARGS FILE`'s standard output; it must succeed.
fn ssh_keygen(args: &[&str], file: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(args)
        .arg(file)
        .output()
        .expect("ssh-keygen (package openssh-client) must be installed");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn import(name: &str, public_key: &str) -> CreateKeyPair {
    CreateKeyPair {
        name: name.into(),
        key_type: None,
        public_key: Some(public_key.into()),
    }
}

fn generate(name: &str, key_type: Option<&str>) -> CreateKeyPair {
    CreateKeyPair {
        name: name.into(),
        key_type: key_type.map(String::from),
        public_key: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn key_pairs_generated_imported_and_kept_by_instances() {
    let cloud = Cloud::start(Hv::Sim).await;
    let c = cloud.client.clone();
    let img = tiny_image(&cloud, "tiny", true).await;
    let dir = cloud.dir.path();

    // A generated key: the private key comes once and matches the stored public key.
    let gen = c
        .create_key_pair(&generate("gen", None))
        .await
        .expect("generate");
    assert!(gen.id.starts_with("key-"), "{}", gen.id);
    assert_eq!(gen.key_type, "ed25519");
    let private = gen.private_key.clone().expect("the private key, once");
    assert!(
        private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
        "{private}"
    );
    let priv_path = dir.join("gen.key");
    std::fs::write(&priv_path, &private).expect("write key");
    std::fs::set_permissions(&priv_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let derived = ssh_keygen(&["-y", "-f"], &priv_path);
    let mut parts = gen.public_key.split_whitespace();
    let (kind, blob) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    assert!(
        derived.starts_with(&format!("{kind} {blob}")),
        "{derived} vs {}",
        gen.public_key
    );
    let pub_path = dir.join("gen.pub");
    std::fs::write(&pub_path, &gen.public_key).expect("write pub");
    let fp = ssh_keygen(&["-l", "-E", "sha256", "-f"], &pub_path);
    assert!(
        fp.contains(&gen.fingerprint),
        "{fp} lacks {}",
        gen.fingerprint
    );
    let rsa = c
        .create_key_pair(&generate("rsa", Some("rsa")))
        .await
        .expect("rsa");
    assert_eq!(rsa.key_type, "rsa");
    assert!(rsa
        .private_key
        .as_deref()
        .is_some_and(|k| k.starts_with("-----BEGIN RSA PRIVATE KEY-----")));

    // An imported key keeps ssh-keygen's fingerprint; listing never shows private keys.
    ssh_keygen(
        &["-q", "-t", "ed25519", "-N", "", "-C", "me@test", "-f"],
        &dir.join("mine"),
    );
    let mine_pub = std::fs::read_to_string(dir.join("mine.pub")).expect("read pub");
    let imported = c
        .create_key_pair(&import("mine", &mine_pub))
        .await
        .expect("import");
    assert!(imported.private_key.is_none());
    let fp = ssh_keygen(&["-l", "-E", "sha256", "-f"], &dir.join("mine.pub"));
    assert!(fp.contains(&imported.fingerprint), "{fp}");
    let keys = c.key_pairs().await.expect("list");
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k.private_key.is_none()));

    // Bad keys and names: refused, nothing stored.
    for (req, status, code) in [
        (import("mine", &mine_pub), 409, "Conflict"),
        (generate("gen", None), 409, "Conflict"),
        (
            import("junk", "ssh-ed25519 bm90IGEga2V5"),
            400,
            "InvalidParameter",
        ),
        (
            import("junk", &mine_pub.replace("ssh-ed25519", "ssh-rsa")),
            400,
            "InvalidParameter",
        ),
        (generate("junk", Some("dsa")), 400, "InvalidParameter"),
        (generate("bad name", None), 400, "InvalidParameter"),
        (
            CreateKeyPair {
                key_type: Some("rsa".into()),
                ..import("junk", &mine_pub)
            },
            400,
            "InvalidParameter",
        ),
    ] {
        refused(c.create_key_pair(&req).await, status, code);
    }
    assert_eq!(
        c.key_pairs().await.expect("list").len(),
        3,
        "nothing stored"
    );

    // An instance keeps its key after the key pair is deleted.
    let i = c
        .create_instance(&vm("keyed", &img, &[], Some("mine")), None)
        .await
        .expect("keyed");
    assert_eq!(i.key_name.as_deref(), Some("mine"));
    c.delete_key_pair("mine").await.expect("delete");
    refused(c.delete_key_pair("mine").await, 404, "NotFound");
    let store = kumo_store::Store::open_sqlite(&cloud.data_dir().join("kumo.db"))
        .await
        .expect("open store");
    let keys = store.instance_public_keys(&i.id).await.expect("keys");
    assert_eq!(
        keys,
        vec![("mine".to_string(), mine_pub.trim().to_string())]
    );
    let none = c
        .create_instance(&vm("keyless", &img, &[], None), None)
        .await
        .expect("keyless");
    assert!(store
        .instance_public_keys(&none.id)
        .await
        .expect("none")
        .is_empty());
    store.close().await;
    assert_eq!(
        c.instance(&i.id).await.expect("i").key_name.as_deref(),
        Some("mine")
    );
    refused(
        c.create_instance(&vm("late", &img, &[], Some("mine")), None)
            .await,
        400,
        "InvalidParameter",
    );
    for id in [&i.id, &none.id] {
        c.terminate(id).await.expect("terminate");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_groups_and_keys() {
    let cloud = Cloud::start(Hv::Sim).await;
    let img = tiny_image(&cloud, "tiny", true).await;
    let (k, s) = (cloud.access_key_id.clone(), cloud.secret.clone());
    let run = |args: &[&str]| cli(&cloud, &k, &s, args);

    let (ok, out) = run(&["sg", "create", "web", "--description", "web servers"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&[
        "sg",
        "allow",
        "web",
        "--proto",
        "tcp",
        "--port",
        "8000-8100",
        "--from",
        "10.0.0.0/8",
    ]);
    assert!(ok, "{out}");
    let rule_id = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(rule_id.starts_with("sgr-"), "{out}");
    let (ok, out) = run(&[
        "sg",
        "allow",
        "web",
        "--proto",
        "all",
        "--from-group",
        "default",
        "--egress",
    ]);
    assert!(ok, "{out}");
    // Exactly one peer, ports that parse, a CIDR without host bits.
    for bad in [
        &["sg", "allow", "web", "--proto", "tcp"][..],
        &[
            "sg",
            "allow",
            "web",
            "--proto",
            "tcp",
            "--from",
            "0.0.0.0/0",
            "--from-group",
            "default",
        ],
        &[
            "sg",
            "allow",
            "web",
            "--proto",
            "tcp",
            "--port",
            "99999",
            "--from",
            "0.0.0.0/0",
        ],
        &[
            "sg",
            "allow",
            "web",
            "--proto",
            "tcp",
            "--from",
            "10.0.0.1/8",
        ],
    ] {
        let (ok, out) = run(bad);
        assert!(!ok, "{bad:?} was accepted: {out}");
    }
    let (ok, out) = run(&["sg", "show", "web"]);
    assert!(
        ok && out.contains("8000-8100") && out.contains("group default"),
        "{out}"
    );
    assert_eq!(out.matches("sgr-").count(), 2, "{out}");
    let (ok, out) = run(&["sg", "list"]);
    assert!(
        ok && out.contains("web") && out.contains("default"),
        "{out}"
    );

    // A generated key goes to a new file of mode 0600, never over an existing one.
    let pem = cloud.dir.path().join("k.pem");
    let pem_s = pem.to_str().unwrap_or_default();
    let (ok, out) = run(&["key", "create", "k", "--out", pem_s]);
    assert!(ok, "{out}");
    let meta = std::fs::metadata(&pem).expect("written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read_to_string(&pem).expect("read");
    assert!(first.contains("PRIVATE KEY"));
    let (ok, out) = run(&["key", "create", "k2", "--out", pem_s]);
    assert!(!ok && out.contains("exists"), "{out}");
    assert_eq!(std::fs::read_to_string(&pem).expect("read"), first);
    let (ok, out) = run(&["key", "list"]);
    assert!(
        ok && out.contains("SHA256:") && !out.contains("k2"),
        "k2 must not exist: {out}"
    );
    let pubfile = cloud.dir.path().join("imp.pub");
    std::fs::write(&pubfile, ssh_keygen(&["-y", "-f"], &pem)).expect("pub");
    let (ok, out) = run(&["key", "import", "imp", pubfile.to_str().unwrap_or_default()]);
    assert!(ok && out.contains("SHA256:"), "{out}");

    let (ok, out) = run(&[
        "vm",
        "create",
        "--name",
        "v",
        "--image",
        &img,
        "--type",
        "t1.nano",
        "--security-group",
        "web",
        "--security-group",
        "default",
        "--key",
        "k",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["vm", "show", "v", "-o", "json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["key_name"], "k", "{out}");
    assert_eq!(
        v["security_groups"].as_array().map(Vec::len),
        Some(2),
        "{out}"
    );
    let (ok, out) = run(&["vm", "show", "v"]);
    assert!(
        ok && out.contains("security groups") && out.contains("sg-"),
        "{out}"
    );
    let (ok, out) = run(&["sg", "delete", "web"]);
    assert!(!ok && out.contains("used by"), "{out}");
    let (ok, out) = run(&["sg", "revoke", "web", &rule_id]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["sg", "show", "web"]);
    assert!(ok && !out.contains(&rule_id), "{out}");
    let (ok, out) = run(&["key", "delete", "imp"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["key", "list"]);
    assert!(ok && !out.contains("imp"), "{out}");
    let (ok, out) = run(&["vm", "delete", "v"]);
    assert!(ok, "{out}");
}
