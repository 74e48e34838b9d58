//! Client-side signing (Authorization-header form).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::canonical::{
    canonical_query, canonical_request, canonical_uri, credential_scope, sha256_hex, signature,
    signing_key, string_to_sign, UriMode, ALGORITHM, AMZ_DATE_FORMAT, SCOPE_DATE_FORMAT,
};
use crate::Credentials;

/// Why a request could not be signed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SignError {
    /// The URL has no host and no `host` header was given.
    #[error("request has no host: the URL has none and no host header was given")]
    MissingHost,
    /// A header name is empty or not an HTTP token.
    #[error("invalid header name {0:?}")]
    InvalidHeaderName(String),
    /// A header value contains CR, LF or NUL.
    #[error("invalid value for header {0:?}")]
    InvalidHeaderValue(String),
    /// The access key id is empty or contains `/`, `,`, `=` or whitespace.
    #[error("invalid access key id")]
    InvalidAccessKeyId,
    /// Region or service is empty or contains `/`, `,`, `=` or whitespace.
    #[error("invalid credential scope component {0:?}")]
    InvalidScope(String),
}

/// Knobs for [`sign_with_options`]. `Default` is what [`sign`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignOptions {
    /// Add (and sign) an `x-amz-content-sha256` header. Default `true`.
    pub content_sha256_header: bool,
    /// Sign this payload hash (hex) instead of hashing `body`: for bodies streamed after
    /// signing. The server checks the streamed body against it.
    pub payload_sha256: Option<String>,
}

impl Default for SignOptions {
    fn default() -> Self {
        Self {
            content_sha256_header: true,
            payload_sha256: None,
        }
    }
}

/// Headers botocore never signs because proxies and HTTP stacks rewrite them.
const UNSIGNED_HEADERS: &[&str] = &[
    "authorization",
    "expect",
    "transfer-encoding",
    "user-agent",
    "x-amzn-trace-id",
];

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn valid_scope_part(s: &str) -> bool {
    !s.is_empty()
        && !s
            .bytes()
            .any(|b| matches!(b, b'/' | b',' | b'=') || b.is_ascii_whitespace() || b < 0x20)
}

/// Value of the `Host` header an HTTP client sends for `url` (port only when
/// it is not the scheme's default), or `None` when the URL has no host.
pub fn host_header_for(url: &url::Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// Signs a request with SigV4 (Authorization-header form).
///
/// Every header in `headers` is signed except `authorization`, `expect`,
/// `transfer-encoding`, `user-agent` and `x-amzn-trace-id` (as botocore
/// does); caller-supplied `x-amz-date` / `x-amz-content-sha256` are replaced.
/// When no `host` header is given, the one an HTTP client derives from `url`
/// is signed (and not returned: the client adds it itself).
///
/// Returns the headers to add to the request: `x-amz-date`,
/// `x-amz-content-sha256` (hex SHA-256 of `body`) and `authorization`.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &str,
    url: &url::Url,
    headers: &[(String, String)],
    body: &[u8],
    creds: &Credentials,
    region: &str,
    service: &str,
    now: DateTime<Utc>,
) -> Result<Vec<(String, String)>, SignError> {
    sign_with_options(
        method,
        url,
        headers,
        body,
        creds,
        region,
        service,
        now,
        &SignOptions::default(),
    )
}

/// [`sign`] with options; with `content_sha256_header: false` the output is
/// byte-for-byte what botocore's `SigV4Auth` produces.
#[allow(clippy::too_many_arguments)]
pub fn sign_with_options(
    method: &str,
    url: &url::Url,
    headers: &[(String, String)],
    body: &[u8],
    creds: &Credentials,
    region: &str,
    service: &str,
    now: DateTime<Utc>,
    options: &SignOptions,
) -> Result<Vec<(String, String)>, SignError> {
    if !valid_scope_part(&creds.access_key_id) {
        return Err(SignError::InvalidAccessKeyId);
    }
    for part in [region, service] {
        if !valid_scope_part(part) {
            return Err(SignError::InvalidScope(part.to_owned()));
        }
    }

    let amz_date = now.format(AMZ_DATE_FORMAT).to_string();
    let date = now.format(SCOPE_DATE_FORMAT).to_string();
    let payload_hash = options
        .payload_sha256
        .clone()
        .unwrap_or_else(|| sha256_hex(body));

    // name -> values, in the order given; BTreeMap sorts the names.
    let mut signed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(SignError::InvalidHeaderName(name.clone()));
        }
        if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(SignError::InvalidHeaderValue(name.clone()));
        }
        let lname = name.to_ascii_lowercase();
        if UNSIGNED_HEADERS.contains(&lname.as_str())
            || lname == "x-amz-date"
            || lname == "x-amz-content-sha256"
        {
            continue;
        }
        signed.entry(lname).or_default().push(value.clone());
    }
    if !signed.contains_key("host") {
        let host = host_header_for(url).ok_or(SignError::MissingHost)?;
        signed.insert("host".to_owned(), vec![host]);
    }
    signed.insert("x-amz-date".to_owned(), vec![amz_date.clone()]);
    if options.content_sha256_header {
        signed.insert(
            "x-amz-content-sha256".to_owned(),
            vec![payload_hash.clone()],
        );
    }

    let header_list: Vec<(&str, Vec<&[u8]>)> = signed
        .iter()
        .map(|(k, vs)| (k.as_str(), vs.iter().map(|v| v.as_bytes()).collect()))
        .collect();
    let signed_headers = signed
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(";");

    let cr = canonical_request(
        method,
        &canonical_uri(url.path(), UriMode::Normalized),
        &canonical_query(url.query().unwrap_or(""), true, None),
        &header_list,
        &signed_headers,
        &payload_hash,
    );
    let scope = credential_scope(&date, region, service);
    let sts = string_to_sign(&amz_date, &scope, &cr);
    let key = signing_key(&creds.secret_access_key, &date, region, service);
    let sig = hex::encode(signature(&key, &sts));

    let authorization = format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={sig}",
        creds.access_key_id
    );
    let mut out = vec![("x-amz-date".to_owned(), amz_date)];
    if options.content_sha256_header {
        out.push(("x-amz-content-sha256".to_owned(), payload_hash));
    }
    out.push(("authorization".to_owned(), authorization));
    Ok(out)
}
