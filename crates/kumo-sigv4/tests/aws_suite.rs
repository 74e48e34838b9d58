//! AWS's official SigV4 test suite (aws-c-auth's `aws-signing-test-suite/v4`),
//! read from the source of the `aws-sigv4` dev-dependency in Cargo's registry.

mod common;

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use kumo_sigv4::{
    canonical::{canonical_uri, UriMode},
    sign_with_options, verify_with_options, Credentials, SignOptions, VerifyOptions, VerifyRequest,
};
use serde::Deserialize;

const DEFAULT_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

#[derive(Deserialize)]
struct Context {
    credentials: ContextCreds,
    normalize: bool,
    sign_body: bool,
    region: String,
    service: String,
    timestamp: DateTime<Utc>,
}

#[derive(Deserialize)]
struct ContextCreds {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
}

/// Locates `aws-signing-test-suite/v4` in the `aws-sigv4` crate source:
/// via `cargo metadata`, else by scanning `$CARGO_HOME/registry/src`.
fn suite_dir() -> PathBuf {
    const SUITE: &str = "aws-signing-test-suite/v4";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let from_metadata = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
        .and_then(|meta| {
            meta["packages"].as_array()?.iter().find_map(|p| {
                (p["name"] == "aws-sigv4")
                    .then(|| p["manifest_path"].as_str().map(PathBuf::from))
                    .flatten()
            })
        })
        .and_then(|manifest| manifest.parent().map(|d| d.join(SUITE)))
        .filter(|d| d.is_dir());
    if let Some(dir) = from_metadata {
        return dir;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/src"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|index| {
            std::fs::read_dir(index.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|e| e.file_name().to_string_lossy().starts_with("aws-sigv4-"))
        .map(|e| e.path().join(SUITE))
        .filter(|d| d.is_dir())
        .collect();
    found.sort();
    found
        .pop()
        .expect("aws-sigv4 crate source with aws-signing-test-suite/v4 not found")
}

struct RawRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    multiline: bool,
}

fn parse_request(text: &str) -> RawRequest {
    let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let first = lines.next().expect("request line");
    let (method, rest) = first.split_once(' ').expect("method");
    let target = rest.strip_suffix(" HTTP/1.1").unwrap_or(rest).to_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut multiline = false;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            multiline = true;
            if let Some(last) = headers.last_mut() {
                last.1.push('\n');
                last.1.push_str(line);
            }
            continue;
        }
        let (k, v) = line.split_once(':').expect("header line");
        headers.push((k.to_owned(), v.to_owned()));
    }
    RawRequest {
        method: method.to_owned(),
        target,
        headers,
        body: body.as_bytes().to_vec(),
        multiline,
    }
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

fn context(dir: &Path) -> Option<Context> {
    read(dir, "context.json").map(|t| serde_json::from_str(&t).expect("context.json"))
}

/// Signing time as written in the signed request (header or query).
fn signed_time(req: &RawRequest) -> DateTime<Utc> {
    let from_header = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-date"))
        .map(|(_, v)| v.clone());
    let value = from_header.unwrap_or_else(|| {
        req.target
            .split("X-Amz-Date=")
            .nth(1)
            .and_then(|s| s.split('&').next())
            .expect("X-Amz-Date")
            .to_owned()
    });
    NaiveDateTime::parse_from_str(&value, "%Y%m%dT%H%M%SZ")
        .expect("date")
        .and_utc()
}

fn service_region(req: &RawRequest) -> (String, String) {
    let auth = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.replace("%2F", "/"))
        .unwrap_or_else(|| req.target.replace("%2F", "/"));
    let cred = auth.split("Credential=").nth(1).expect("Credential");
    let parts: Vec<&str> = cred.split('/').collect();
    (parts[3].to_owned(), parts[2].to_owned())
}

#[test]
fn official_vectors_verify() {
    let root = suite_dir();
    let mut passed = Vec::new();
    let mut skipped = Vec::new();
    let mut failed = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("read suite")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for dir in &entries {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        let ctx = context(dir);
        let secret = ctx
            .as_ref()
            .map(|c| c.credentials.secret_access_key.clone())
            .unwrap_or_else(|| DEFAULT_SECRET.to_owned());
        let uri_mode = match &ctx {
            Some(c) if !c.normalize => UriMode::S3,
            _ => UriMode::Normalized,
        };
        for form in ["header", "query"] {
            let Some(text) = read(dir, &format!("{form}-signed-request.txt")) else {
                continue;
            };
            let label = format!("{name} ({form})");
            let req = parse_request(&text);
            if ctx.is_none() {
                // Legacy vectors migrated by aws-sigv4 without context.json;
                // double-encode-path's signed request is inconsistent (its
                // X-Amz-Date differs from the canonical request's), so check
                // the canonical URI line, which is what these vectors are for.
                let creq = read(dir, "header-canonical-request.txt").expect("creq");
                let expected_uri = creq.lines().nth(1).expect("uri line");
                let (path, _) = common::split_target(&req.target);
                assert_eq!(
                    canonical_uri(path, UriMode::Normalized),
                    expected_uri,
                    "{label}"
                );
            }
            if name == "double-encode-path" {
                passed.push(format!("{label} [canonical URI only]"));
                continue;
            }
            if name == "post-sts-header-after" && form == "query" {
                // Token appended to the query after signing, i.e. unsigned
                // query parameter: by design every query parameter is signed.
                skipped.push(label);
                continue;
            }
            if req.multiline {
                // obs-fold header values cannot be represented in http::HeaderValue.
                skipped.push(label);
                continue;
            }
            let headers = common::header_map(&req.headers);
            let (path, query) = common::split_target(&req.target);
            let (service, region) = service_region(&req);
            let now = signed_time(&req) + Duration::seconds(10);
            let vr = VerifyRequest {
                method: &req.method,
                path,
                query,
                headers: &headers,
                body: &req.body,
            };
            let result = verify_with_options(
                &vr,
                &service,
                Some(&region),
                now,
                Duration::minutes(5),
                |_| Some(secret.clone()),
                &VerifyOptions {
                    uri_mode,
                    ..VerifyOptions::default()
                },
            );
            match result {
                Ok(v) => {
                    assert_eq!(v.access_key_id, "AKIDEXAMPLE");
                    passed.push(label);
                }
                Err(e) => failed.push(format!("{label}: {e:?}")),
            }
        }
    }
    println!("passed {}: {passed:?}", passed.len());
    println!("skipped {}: {skipped:?}", skipped.len());
    assert!(failed.is_empty(), "failed: {failed:#?}");
    assert!(passed.len() >= 70, "only {} vectors passed", passed.len());
}

#[test]
fn official_vectors_sign() {
    let root = suite_dir();
    let mut passed = Vec::new();
    let mut skipped = Vec::new();
    let mut failed = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("read suite")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for dir in &entries {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        let (Some(ctx), Some(text), Some(expected)) = (
            context(dir),
            read(dir, "request.txt"),
            read(dir, "header-signature.txt"),
        ) else {
            skipped.push(format!("{name}: no context/signature"));
            continue;
        };
        if !ctx.normalize || ctx.credentials.token.is_some() {
            skipped.push(format!("{name}: S3-style or session token"));
            continue;
        }
        if name == "get-space-normalized" {
            // aws-sigv4 edited this request to put `%20` on the wire but kept
            // the single-encoded expectation (see its sign.rs comment);
            // botocore would double-encode to `%2520`, as we do.
            skipped.push(format!("{name}: vector inconsistent with double encoding"));
            continue;
        }
        let req = parse_request(&text);
        if req.multiline {
            skipped.push(format!(
                "{name}: CR/LF in header values is refused by sign()"
            ));
            continue;
        }
        let host = req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.clone())
            .expect("host");
        let url = url::Url::parse(&format!("https://{host}{}", req.target)).expect("url");
        let (raw_path, _) = common::split_target(&req.target);
        if canonical_uri(raw_path, UriMode::Normalized)
            != canonical_uri(url.path(), UriMode::Normalized)
        {
            // The vector puts raw bytes (spaces, UTF-8) on the wire; a real
            // client (url::Url) percent-encodes them first, so the canonical
            // URI legitimately differs. verify() still covers these.
            skipped.push(format!("{name}: path not representable in url::Url"));
            continue;
        }
        let creds = Credentials {
            access_key_id: ctx.credentials.access_key_id.clone(),
            secret_access_key: ctx.credentials.secret_access_key.clone(),
        };
        let out = sign_with_options(
            &req.method,
            &url,
            &req.headers,
            &req.body,
            &creds,
            &ctx.region,
            &ctx.service,
            ctx.timestamp,
            &SignOptions {
                content_sha256_header: ctx.sign_body,
                ..SignOptions::default()
            },
        );
        let sig = out.ok().and_then(|h| {
            h.into_iter()
                .find(|(k, _)| k == "authorization")
                .and_then(|(_, v)| v.split("Signature=").nth(1).map(str::to_owned))
        });
        if sig.as_deref() == Some(expected.trim()) {
            passed.push(name);
        } else {
            failed.push(name);
        }
    }
    println!("passed {}: {passed:?}", passed.len());
    println!("skipped {}: {skipped:#?}", skipped.len());
    assert!(failed.is_empty(), "failed: {failed:#?}");
    assert!(passed.len() >= 20, "only {} vectors passed", passed.len());
}
