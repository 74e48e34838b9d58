//! Streamed bodies: the signature covers the declared hash; the caller checks the body.

use chrono::{Duration, TimeZone, Utc};
use kumo_sigv4::{sign, verify_with_options, Credentials, VerifyOptions, VerifyRequest};

#[test]
fn streamed_body_verifies_against_declared_hash() {
    let creds = Credentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "secret".into(),
    };
    let now = Utc
        .with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
        .single()
        .expect("time");
    let url = url::Url::parse("http://127.0.0.1:8780/api/v1/images/upload?name=x").expect("url");
    let body = b"a large upload";
    let out = sign("PUT", &url, &[], body, &creds, "kumo", "kumo", now).expect("sign");
    let mut headers = http::HeaderMap::new();
    headers.insert("host", "127.0.0.1:8780".parse().expect("h"));
    for (k, v) in &out {
        headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("n"),
            v.parse().expect("v"),
        );
    }
    let req = VerifyRequest {
        method: "PUT",
        path: url.path(),
        query: url.query(),
        headers: &headers,
        body: b"",
    };
    let opts = VerifyOptions {
        streamed_body: true,
        ..VerifyOptions::default()
    };
    let v = verify_with_options(
        &req,
        "kumo",
        Some("kumo"),
        now,
        Duration::minutes(5),
        |_| Some("secret".into()),
        &opts,
    )
    .expect("verified");
    assert_eq!(v.content_sha256, kumo_sigv4::canonical::sha256_hex(body));
    // Without the option an empty body does not match the declared hash.
    let plain = verify_with_options(
        &req,
        "kumo",
        Some("kumo"),
        now,
        Duration::minutes(5),
        |_| Some("secret".into()),
        &VerifyOptions::default(),
    );
    assert!(plain.is_err());
}
