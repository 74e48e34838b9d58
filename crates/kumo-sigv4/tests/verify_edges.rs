//! Edge cases of verify(), using our own signer.

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use kumo_sigv4::{sign, verify, Credentials, VerifyError, VerifyRequest};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
        .single()
        .expect("time")
}

fn creds() -> Credentials {
    Credentials {
        access_key_id: "AKIDEDGE".to_owned(),
        secret_access_key: "edge-secret".to_owned(),
    }
}

fn signed_headers(body: &[u8]) -> Vec<(String, String)> {
    let url = url::Url::parse("https://api.kumo.test/v1/x?b=2&a=1").expect("url");
    let mut h = sign(
        "POST",
        &url,
        &[("content-type".to_owned(), "application/json".to_owned())],
        body,
        &creds(),
        "kumo-1",
        "kumo",
        now(),
    )
    .expect("sign");
    h.push(("host".to_owned(), "api.kumo.test".to_owned()));
    h.push(("content-type".to_owned(), "application/json".to_owned()));
    h
}

fn run(
    headers: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<kumo_sigv4::Verified, VerifyError> {
    let map = common::header_map(headers);
    let req = VerifyRequest {
        method: "POST",
        path: "/v1/x",
        query,
        headers: &map,
        body,
    };
    verify(
        &req,
        "kumo",
        Some("kumo-1"),
        now(),
        Duration::minutes(5),
        |_| Some("edge-secret".to_owned()),
    )
}

fn replace(headers: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            if k == name {
                (k.clone(), value.to_owned())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

#[test]
fn round_trip_and_failures() {
    let body = br#"{"a":1}"#;
    let h = signed_headers(body);
    let ok = run(&h, Some("b=2&a=1"), body).expect("verifies");
    assert_eq!(ok.region, "kumo-1");
    assert_eq!(ok.service, "kumo");

    assert_eq!(run(&[], None, body), Err(VerifyError::MissingAuthorization));
    assert_eq!(
        run(
            &replace(&h, "x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
            Some("b=2&a=1"),
            body
        ),
        Err(VerifyError::UnsignedPayload)
    );
    assert_eq!(
        run(&h, Some("b=2&a=1"), b"{}"),
        Err(VerifyError::ContentSha256Mismatch)
    );
    assert_eq!(
        run(&h, Some("b=2&a=3"), body),
        Err(VerifyError::SignatureMismatch)
    );
    let auth = h
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone())
        .expect("auth");
    let bad = auth.replace("Signature=", "Signature=zz");
    assert!(matches!(
        run(&replace(&h, "authorization", &bad), Some("b=2&a=1"), body),
        Err(VerifyError::Malformed(_))
    ));
    let bad = auth.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1");
    assert!(matches!(
        run(&replace(&h, "authorization", &bad), Some("b=2&a=1"), body),
        Err(VerifyError::Malformed(_))
    ));
    let bad = auth.replace("SignedHeaders=", "SignedHeaders=x-missing;");
    assert!(matches!(
        run(&replace(&h, "authorization", &bad), Some("b=2&a=1"), body),
        Err(VerifyError::Malformed(_))
    ));
    // Scope date that does not match x-amz-date.
    let bad = auth.replace("/20240501/", "/20240502/");
    assert!(matches!(
        run(&replace(&h, "authorization", &bad), Some("b=2&a=1"), body),
        Err(VerifyError::Malformed(_))
    ));
    // Both auth forms at once.
    assert!(matches!(
        run(&h, Some("b=2&a=1&X-Amz-Algorithm=AWS4-HMAC-SHA256"), body),
        Err(VerifyError::Malformed(_))
    ));
}

#[test]
fn presigned_expiry_window() {
    let url = "/v1/x";
    let q = |date: &str, expires: &str, sig: &str| {
        format!(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEDGE%2F{}%2Fkumo-1%2Fkumo%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}",
            &date[..8]
        )
    };
    // Compute a valid presigned signature by hand with the public pieces.
    use kumo_sigv4::canonical::*;
    let date = "20240501T115000Z";
    let unsigned = q(date, "900", "x");
    let cq = canonical_query(&unsigned, true, Some("X-Amz-Signature"));
    let host = b"api.kumo.test".as_slice();
    let cr = canonical_request(
        "GET",
        &canonical_uri(url, UriMode::Normalized),
        &cq,
        &[("host", vec![host])],
        "host",
        EMPTY_SHA256,
    );
    let sts = string_to_sign(date, &credential_scope("20240501", "kumo-1", "kumo"), &cr);
    let sig = hex::encode(signature(
        &kumo_sigv4::signing_key("edge-secret", "20240501", "kumo-1", "kumo"),
        &sts,
    ));
    let query = q(date, "900", &sig);
    let map = common::header_map(&[("host".to_owned(), "api.kumo.test".to_owned())]);
    let at = |t: DateTime<Utc>| {
        let req = VerifyRequest {
            method: "GET",
            path: url,
            query: Some(&query),
            headers: &map,
            body: b"",
        };
        verify(&req, "kumo", None, t, Duration::minutes(5), |_| {
            Some("edge-secret".to_owned())
        })
    };
    // Signed 11:50, valid 15 minutes: fine at 12:00 and 12:05, expired at 12:06.
    assert!(at(now()).is_ok());
    assert!(at(now() + Duration::minutes(5)).is_ok());
    assert_eq!(
        at(now() + Duration::minutes(6)),
        Err(VerifyError::RequestExpired)
    );
    // Too early (more than max_skew before X-Amz-Date).
    assert_eq!(
        at(now() - Duration::minutes(20)),
        Err(VerifyError::RequestExpired)
    );
}
