//! Canonicalisation pieces of AWS Signature Version 4.
//!
//! Everything here is pure and operates on the raw strings a client put on
//! the wire, so the signer and the verifier share one implementation.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// The only algorithm this crate speaks.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Hex SHA-256 of the empty string.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// `X-Amz-Date` / string-to-sign timestamp format.
pub const AMZ_DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";
/// Credential-scope date format.
pub const SCOPE_DATE_FORMAT: &str = "%Y%m%d";

const SHA256_BLOCK: usize = 64;

/// Builds an HMAC-SHA256 instance for any key length without a fallible call:
/// keys longer than the block size are hashed first, then zero-padded to the
/// block size, which is exactly what HMAC (RFC 2104) does internally.
pub(crate) fn hmac_for_key(key: &[u8]) -> HmacSha256 {
    let mut block = [0u8; SHA256_BLOCK];
    if key.len() > SHA256_BLOCK {
        let digest = Sha256::digest(key);
        block[..digest.len()].copy_from_slice(&digest);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <HmacSha256 as KeyInit>::new(&block.into())
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = hmac_for_key(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Hex-encoded SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Derives the SigV4 signing key.
///
/// `date` is the credential-scope date, `YYYYMMDD` (e.g. `"20150830"`).
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let mut k_secret = Vec::with_capacity(4 + secret.len());
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret.as_bytes());
    let k_date = hmac_sha256(&k_secret, date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, b"aws4_request")
}

/// RFC 3986 unreserved characters, which SigV4 never encodes.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// AWS `UriEncode`: every byte except unreserved characters (and `/` when
/// `keep_slash`) becomes `%XX` with upper-case hex.
pub fn uri_encode(input: &[u8], keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(input.len() * 3);
    for &b in input {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// botocore's `remove_dot_segments`: RFC 3986 dot-segment removal that also
/// collapses empty segments (`//`), keeping a leading and trailing slash.
pub fn remove_dot_segments(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let first = if path.starts_with('/') { "/" } else { "" };
    let last = if path.ends_with('/') && !out.is_empty() {
        "/"
    } else {
        ""
    };
    format!("{first}{}{last}", out.join("/"))
}

/// How the canonical URI is derived from the raw request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriMode {
    /// Every service but S3 (what botocore's `SigV4Auth` does): remove dot
    /// segments and empty segments from the raw path, then URI-encode the
    /// result *again* (so `%3D` on the wire becomes `%253D`), keeping `/`.
    Normalized,
    /// Same double encoding, but without any path normalisation (some SDKs,
    /// e.g. aws-sdk-go-v2, sign the path as-is).
    NotNormalized,
    /// S3 style: no normalisation, each segment decoded and encoded once.
    S3,
}

/// Canonical URI for a raw (as-received) path.
pub fn canonical_uri(raw_path: &str, mode: UriMode) -> String {
    let path = if raw_path.is_empty() { "/" } else { raw_path };
    match mode {
        UriMode::Normalized => uri_encode(remove_dot_segments(path).as_bytes(), true),
        UriMode::NotNormalized => uri_encode(path.as_bytes(), true),
        UriMode::S3 => {
            let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
            uri_encode(&decoded, true)
        }
    }
}

fn decode_component(raw: &str, plus_as_space: bool) -> Vec<u8> {
    if plus_as_space && raw.contains('+') {
        let replaced = raw.replace('+', " ");
        percent_encoding::percent_decode_str(&replaced).collect()
    } else {
        percent_encoding::percent_decode_str(raw).collect()
    }
}

/// Splits a raw query string into decoded `(key, value)` pairs. Empty
/// `&&` segments are skipped; a key without `=` has an empty value.
pub fn parse_query(raw: &str, plus_as_space: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                decode_component(k, plus_as_space),
                decode_component(v, plus_as_space),
            )
        })
        .collect()
}

/// Canonical query string: each key and value percent-decoded (with `+` read
/// as a space when `plus_as_space`), re-encoded with [`uri_encode`], sorted
/// by encoded key then encoded value, joined with `&`. Parameters whose
/// decoded key equals `exclude` (used for `X-Amz-Signature`) are dropped.
pub fn canonical_query(raw: &str, plus_as_space: bool, exclude: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = parse_query(raw, plus_as_space)
        .into_iter()
        .filter(|(k, _)| exclude.is_none_or(|ex| k.as_slice() != ex.as_bytes()))
        .map(|(k, v)| (uri_encode(&k, false), uri_encode(&v, false)))
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Canonical query string the way botocore computes it for a URL that
/// already carries a query (`_canonical_query_string_url`): pairs are split
/// on `&` and the first `=` and sorted, but keys and values are used exactly
/// as they appear on the wire (no decoding or re-encoding).
pub fn canonical_query_verbatim(raw: &str, exclude: Option<&str>) -> String {
    if raw.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(&str, &str)> = raw
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .filter(|(k, _)| exclude.is_none_or(|ex| *k != ex))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// SigV4 `Trimall`: strip leading/trailing whitespace and collapse internal
/// runs of whitespace to one space (botocore: `' '.join(value.split())`).
pub fn trim_all(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for word in value
        .split(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(b' ');
        }
        out.extend_from_slice(word);
    }
    out
}

/// Assembles a canonical request. `headers` are `(lower-case name, values)`
/// in the order they appear in `signed_headers`.
pub fn canonical_request(
    method: &str,
    canonical_uri: &str,
    canonical_query: &str,
    headers: &[(&str, Vec<&[u8]>)],
    signed_headers: &str,
    payload_hash: &str,
) -> Vec<u8> {
    let mut cr = Vec::with_capacity(256);
    cr.extend_from_slice(method.as_bytes());
    cr.push(b'\n');
    cr.extend_from_slice(canonical_uri.as_bytes());
    cr.push(b'\n');
    cr.extend_from_slice(canonical_query.as_bytes());
    cr.push(b'\n');
    for (name, values) in headers {
        cr.extend_from_slice(name.as_bytes());
        cr.push(b':');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                cr.push(b',');
            }
            cr.extend_from_slice(&trim_all(v));
        }
        cr.push(b'\n');
    }
    cr.push(b'\n');
    cr.extend_from_slice(signed_headers.as_bytes());
    cr.push(b'\n');
    cr.extend_from_slice(payload_hash.as_bytes());
    cr
}

/// `date/region/service/aws4_request`.
pub fn credential_scope(date: &str, region: &str, service: &str) -> String {
    format!("{date}/{region}/{service}/aws4_request")
}

/// String to sign for a canonical request.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &[u8]) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request)
    )
}

/// Raw signature bytes of a string to sign.
pub fn signature(key: &[u8; 32], string_to_sign: &str) -> [u8; 32] {
    hmac_sha256(key, string_to_sign.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_long_key() {
        // RFC 4231 test case 6: 131-byte key (longer than the block size).
        let key = [0xaau8; 131];
        let mac = hmac_sha256(
            &key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        // Test case 2: short key.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signing_key_matches_aws_docs() {
        // From the AWS "Examples of how to derive a signing key" page.
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20120215",
            "us-east-1",
            "iam",
        );
        assert_eq!(
            hex::encode(key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn dot_segments_like_botocore() {
        assert_eq!(remove_dot_segments(""), "/");
        assert_eq!(remove_dot_segments("/"), "/");
        assert_eq!(remove_dot_segments("//example//"), "/example/");
        assert_eq!(remove_dot_segments("/example/.."), "/");
        assert_eq!(remove_dot_segments("/example1/example2/../.."), "/");
        assert_eq!(remove_dot_segments("/./"), "/");
        assert_eq!(remove_dot_segments("/a/./b/../c"), "/a/c");
        assert_eq!(remove_dot_segments("/../a"), "/a");
    }

    #[test]
    fn uri_double_encoding() {
        assert_eq!(
            canonical_uri("/test/@connections/JBDvjfGEIAMCERw%3D", UriMode::Normalized),
            "/test/%40connections/JBDvjfGEIAMCERw%253D"
        );
        assert_eq!(canonical_uri("/a%20b/c d", UriMode::S3), "/a%20b/c%20d");
        assert_eq!(canonical_uri("", UriMode::Normalized), "/");
    }

    #[test]
    fn query_canonicalisation() {
        assert_eq!(canonical_query("", true, None), "");
        assert_eq!(
            canonical_query("b=2&a=3&a=1&c", true, None),
            "a=1&a=3&b=2&c="
        );
        assert_eq!(canonical_query("a=x+y", true, None), "a=x%20y");
        assert_eq!(canonical_query("a=x+y", false, None), "a=x%2By");
        assert_eq!(canonical_query("a=%7e%2f", true, None), "a=~%2F");
        assert_eq!(
            canonical_query("X-Amz-Signature=abc&z=1", true, Some("X-Amz-Signature")),
            "z=1"
        );
    }

    #[test]
    fn trim_all_collapses() {
        assert_eq!(trim_all(b"  a   b\t c  "), b"a b c");
        assert_eq!(trim_all(b""), b"");
    }
}
