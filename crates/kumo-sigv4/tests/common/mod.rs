//! Shared helpers for the integration tests.
#![allow(dead_code)]

use http::{HeaderMap, HeaderName, HeaderValue};

pub fn header_map(headers: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        let value = HeaderValue::from_bytes(v.as_bytes()).expect("header value");
        map.append(name, value);
    }
    map
}

pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    }
}
