//! Cost of verifying one SigV4-signed EC2 request (a DescribeInstances form POST, as botocore
//! sends it). `cargo run --release -p kumo-sigv4 --example verify_cost`

use std::time::Instant;

use kumo_sigv4::{sign, verify, Credentials, VerifyRequest};

fn main() {
    let creds = Credentials {
        access_key_id: "AKIAEXAMPLEEXAMPLE00".into(),
        secret_access_key: "s3cr3t/s3cr3t/s3cr3t/s3cr3t/s3cr3t/s3cr3".into(),
    };
    let url = url::Url::parse("http://127.0.0.1:8780/").expect("url");
    let body = b"Action=DescribeInstances&Version=2016-11-15&MaxResults=1000&Filter.1.Name=instance-state-name&Filter.1.Value.1=running";
    let headers = vec![(
        "content-type".to_string(),
        "application/x-www-form-urlencoded; charset=utf-8".to_string(),
    )];
    let now = chrono::Utc::now();
    let signed = sign("POST", &url, &headers, body, &creds, "kumo", "ec2", now).expect("sign");
    let mut map = http::HeaderMap::new();
    map.insert("host", "127.0.0.1:8780".parse().expect("host"));
    map.insert("content-type", headers[0].1.parse().expect("ct"));
    for (k, v) in &signed {
        map.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let req = VerifyRequest {
        method: "POST",
        path: "/",
        query: None,
        headers: &map,
        body,
    };
    let skew = chrono::Duration::minutes(15);
    let n = 20_000;
    let mut samples = Vec::with_capacity(5);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            verify(&req, "ec2", Some("kumo"), now, skew, |_| {
                Some(creds.secret_access_key.clone())
            })
            .expect("verified");
        }
        samples.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    samples.sort_by(f64::total_cmp);
    println!("RESULT sigv4-verify: median {:.1} µs per request ({n} verifications x 5 rounds; rounds {:?} µs)", samples[2] / 1000.0, samples.iter().map(|s| (s / 100.0).round() / 10.0).collect::<Vec<_>>());
}
