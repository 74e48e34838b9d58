//! Server-side verification (Authorization header and presigned query).

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, Utc};
use subtle::ConstantTimeEq;

use crate::canonical::{
    canonical_query, canonical_query_verbatim, canonical_request, canonical_uri, credential_scope,
    parse_query, sha256_hex, signature, signing_key, string_to_sign, UriMode, ALGORITHM,
    AMZ_DATE_FORMAT, SCOPE_DATE_FORMAT,
};

/// The parts of a received request that SigV4 covers.
#[derive(Debug, Clone, Copy)]
pub struct VerifyRequest<'a> {
    /// HTTP method as received (`GET`, `POST`, ...).
    pub method: &'a str,
    /// Raw path as received, still percent-encoded (`Uri::path()`).
    pub path: &'a str,
    /// Raw query string as received, without `?` (`Uri::query()`).
    pub query: Option<&'a str>,
    /// Request headers. Must contain `host` (HTTP/2 callers: copy
    /// `:authority` into `host` first).
    pub headers: &'a http::HeaderMap,
    /// The complete raw body.
    pub body: &'a [u8],
}

/// A successfully verified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Access key id that signed the request.
    pub access_key_id: String,
    /// Region from the credential scope.
    pub region: String,
    /// Service from the credential scope.
    pub service: String,
    /// Time the client says it signed the request.
    pub signed_at: DateTime<Utc>,
    /// The payload hash the signature covers (hex).
    pub content_sha256: String,
}

/// Why a request failed verification.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// Neither an Authorization header nor presigned query parameters.
    #[error(
        "request is not signed: no Authorization header and no X-Amz-Algorithm query parameter"
    )]
    MissingAuthorization,
    /// The signature information is present but cannot be understood.
    #[error("malformed signature information: {0}")]
    Malformed(String),
    /// The access key id is not known to the caller's lookup.
    #[error("unknown access key id")]
    UnknownAccessKey,
    /// The signature does not match the request.
    #[error("signature does not match")]
    SignatureMismatch,
    /// The signing time is outside the allowed clock-skew window, or a
    /// presigned URL has expired.
    #[error("request signature expired or not yet valid")]
    RequestExpired,
    /// The credential scope names another service.
    #[error("credential scope is for another service")]
    WrongService,
    /// The credential scope names another region.
    #[error("credential scope is for another region")]
    WrongRegion,
    /// `x-amz-content-sha256` does not match the body.
    #[error("x-amz-content-sha256 does not match the request body")]
    ContentSha256Mismatch,
    /// `x-amz-content-sha256` says `UNSIGNED-PAYLOAD` (or a streaming
    /// variant); bodies must be signed.
    #[error("unsigned payloads are not accepted")]
    UnsignedPayload,
}

/// Knobs for [`verify_with_options`]. `Default` is what [`verify`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Canonical-URI rule. Default: [`UriMode::Normalized`] (all non-S3
    /// services); the un-normalised double-encoded form is always tried as
    /// well in that mode, since several SDKs do not normalise.
    pub uri_mode: UriMode,
    /// Longest accepted `X-Amz-Expires` for presigned requests, in seconds.
    /// Default 604800 (7 days, AWS's limit).
    pub max_presign_expires: i64,
    /// The body is streamed and not in `req.body`: take the payload hash from the signed
    /// `x-amz-content-sha256` header (64 hex digits, required). The caller MUST then check
    /// that the streamed body hashes to [`Verified::content_sha256`].
    pub streamed_body: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            uri_mode: UriMode::Normalized,
            max_presign_expires: 604_800,
            streamed_body: false,
        }
    }
}

const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

fn malformed(msg: impl Into<String>) -> VerifyError {
    VerifyError::Malformed(msg.into())
}

/// Verifies a SigV4-signed request.
///
/// Accepts the `Authorization: AWS4-HMAC-SHA256 ...` header form and the
/// presigned query-string form (`X-Amz-Algorithm=...`). The payload hash is
/// always computed from `body`; an `x-amz-content-sha256` header, if present,
/// must equal it. The signing time (`x-amz-date`, else `date`, or the
/// `X-Amz-Date` query parameter) must lie within `max_skew` of `now`;
/// presigned requests are valid from `X-Amz-Date - max_skew` to
/// `X-Amz-Date + X-Amz-Expires`.
///
/// `lookup` maps an access key id to its secret. Pure: no I/O, no clock.
pub fn verify(
    req: &VerifyRequest,
    expected_service: &str,
    expected_region: Option<&str>,
    now: DateTime<Utc>,
    max_skew: Duration,
    lookup: impl FnOnce(&str) -> Option<String>,
) -> Result<Verified, VerifyError> {
    verify_with_options(
        req,
        expected_service,
        expected_region,
        now,
        max_skew,
        lookup,
        &VerifyOptions::default(),
    )
}

/// Parsed signature information, whichever form it came in.
struct AuthInfo {
    access_key_id: String,
    scope_date: String,
    region: String,
    service: String,
    signed_headers: String,
    signature: String,
    /// Timestamp string as it enters the string to sign.
    amz_date: String,
    signed_at: DateTime<Utc>,
    /// `Some(seconds)` for the presigned form.
    presign_expires: Option<i64>,
}

fn parse_amz_date(s: &str) -> Result<DateTime<Utc>, VerifyError> {
    NaiveDateTime::parse_from_str(s, AMZ_DATE_FORMAT)
        .map(|t| t.and_utc())
        .map_err(|_| malformed(format!("bad X-Amz-Date {s:?}")))
}

fn header_str<'h>(
    headers: &'h http::HeaderMap,
    name: &str,
) -> Result<Option<&'h str>, VerifyError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(malformed(format!("more than one {name} header")));
    }
    first
        .to_str()
        .map(|s| Some(s.trim()))
        .map_err(|_| malformed(format!("{name} header is not visible ASCII")))
}

/// `AKID/20150830/us-east-1/service/aws4_request`
fn parse_credential(cred: &str) -> Result<(String, String, String, String), VerifyError> {
    let mut parts = cred.rsplitn(5, '/');
    let (Some(term), Some(service), Some(region), Some(date), Some(akid)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(malformed(
            "Credential must be AKID/date/region/service/aws4_request",
        ));
    };
    if term != "aws4_request" {
        return Err(malformed("credential scope must end in aws4_request"));
    }
    if akid.is_empty() || region.is_empty() || service.is_empty() {
        return Err(malformed("empty component in Credential"));
    }
    if date.len() != 8 || NaiveDate::parse_from_str(date, SCOPE_DATE_FORMAT).is_err() {
        return Err(malformed("credential scope date must be YYYYMMDD"));
    }
    Ok((
        akid.to_owned(),
        date.to_owned(),
        region.to_owned(),
        service.to_owned(),
    ))
}

fn parse_authorization_header(
    value: &str,
    headers: &http::HeaderMap,
) -> Result<AuthInfo, VerifyError> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| malformed("Authorization must use AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed_headers, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| malformed(format!("bad Authorization component {part:?}")))?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut sig,
            other => {
                return Err(malformed(format!(
                    "unknown Authorization component {other:?}"
                )))
            }
        };
        if slot.replace(v).is_some() {
            return Err(malformed(format!("duplicate {k} in Authorization")));
        }
    }
    let credential = credential.ok_or_else(|| malformed("Authorization lacks Credential"))?;
    let signed_headers =
        signed_headers.ok_or_else(|| malformed("Authorization lacks SignedHeaders"))?;
    let sig = sig.ok_or_else(|| malformed("Authorization lacks Signature"))?;
    let (access_key_id, scope_date, region, service) = parse_credential(credential)?;

    let (amz_date, signed_at) = if let Some(d) = header_str(headers, "x-amz-date")? {
        (d.to_owned(), parse_amz_date(d)?)
    } else if let Some(d) = header_str(headers, "date")? {
        let t = DateTime::parse_from_rfc2822(d)
            .map_err(|_| malformed(format!("bad Date header {d:?}")))?
            .with_timezone(&Utc);
        (t.format(AMZ_DATE_FORMAT).to_string(), t)
    } else {
        return Err(malformed("no x-amz-date or date header"));
    };

    Ok(AuthInfo {
        access_key_id,
        scope_date,
        region,
        service,
        signed_headers: signed_headers.to_owned(),
        signature: sig.to_owned(),
        amz_date,
        signed_at,
        presign_expires: None,
    })
}

fn parse_presigned_query(query: &str) -> Result<AuthInfo, VerifyError> {
    let mut fields: [(&str, Option<String>); 6] = [
        ("X-Amz-Algorithm", None),
        ("X-Amz-Credential", None),
        ("X-Amz-Date", None),
        ("X-Amz-Expires", None),
        ("X-Amz-SignedHeaders", None),
        ("X-Amz-Signature", None),
    ];
    for (k, v) in parse_query(query, true) {
        if let Some((name, slot)) = fields
            .iter_mut()
            .find(|(n, _)| n.as_bytes() == k.as_slice())
        {
            let v = String::from_utf8(v).map_err(|_| malformed(format!("{name} is not UTF-8")))?;
            if slot.replace(v).is_some() {
                return Err(malformed(format!("duplicate {name} query parameter")));
            }
        }
    }
    let [(_, alg), (_, cred), (_, date), (_, expires), (_, signed_headers), (_, sig)] = fields;
    if alg.as_deref() != Some(ALGORITHM) {
        return Err(malformed("X-Amz-Algorithm must be AWS4-HMAC-SHA256"));
    }
    let cred = cred.ok_or_else(|| malformed("missing X-Amz-Credential"))?;
    let amz_date = date.ok_or_else(|| malformed("missing X-Amz-Date"))?;
    let expires = expires.ok_or_else(|| malformed("missing X-Amz-Expires"))?;
    let signed_headers = signed_headers.ok_or_else(|| malformed("missing X-Amz-SignedHeaders"))?;
    let sig = sig.ok_or_else(|| malformed("missing X-Amz-Signature"))?;
    let expires: i64 = expires
        .parse()
        .map_err(|_| malformed("X-Amz-Expires is not an integer"))?;
    let (access_key_id, scope_date, region, service) = parse_credential(&cred)?;
    let signed_at = parse_amz_date(&amz_date)?;
    Ok(AuthInfo {
        access_key_id,
        scope_date,
        region,
        service,
        signed_headers,
        signature: sig,
        amz_date,
        signed_at,
        presign_expires: Some(expires),
    })
}

fn has_query_param(query: &str, name: &str) -> bool {
    parse_query(query, true)
        .iter()
        .any(|(k, _)| k.as_slice() == name.as_bytes())
}

/// [`verify`] with options (e.g. S3-style canonical URIs).
#[allow(clippy::too_many_arguments)]
pub fn verify_with_options(
    req: &VerifyRequest,
    expected_service: &str,
    expected_region: Option<&str>,
    now: DateTime<Utc>,
    max_skew: Duration,
    lookup: impl FnOnce(&str) -> Option<String>,
    options: &VerifyOptions,
) -> Result<Verified, VerifyError> {
    let query = req.query.unwrap_or("");
    let auth_header = header_str(req.headers, "authorization")?;
    let presigned = has_query_param(query, "X-Amz-Algorithm");
    let info = match (auth_header, presigned) {
        (Some(_), true) => {
            return Err(malformed(
                "both an Authorization header and presigned query parameters",
            ))
        }
        (Some(h), false) => parse_authorization_header(h, req.headers)?,
        (None, true) => parse_presigned_query(query)?,
        (None, false) => return Err(VerifyError::MissingAuthorization),
    };

    if info.signed_at.format(SCOPE_DATE_FORMAT).to_string() != info.scope_date {
        return Err(malformed(
            "credential scope date does not match the request date",
        ));
    }
    if info.service != expected_service {
        return Err(VerifyError::WrongService);
    }
    if let Some(region) = expected_region {
        if info.region != region {
            return Err(VerifyError::WrongRegion);
        }
    }

    // Time window.
    match info.presign_expires {
        None => {
            let skew = (now - info.signed_at).abs();
            if skew > max_skew {
                return Err(VerifyError::RequestExpired);
            }
        }
        Some(expires) => {
            if !(1..=options.max_presign_expires).contains(&expires) {
                return Err(malformed(format!(
                    "X-Amz-Expires must be between 1 and {}",
                    options.max_presign_expires
                )));
            }
            if now < info.signed_at - max_skew || now > info.signed_at + Duration::seconds(expires)
            {
                return Err(VerifyError::RequestExpired);
            }
        }
    }

    // Payload.
    let body_hash = if options.streamed_body {
        let claimed = header_str(req.headers, "x-amz-content-sha256")?
            .ok_or_else(|| malformed("a streamed body needs an x-amz-content-sha256 header"))?;
        if claimed.len() != 64 || !claimed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("x-amz-content-sha256 must be 64 hex digits"));
        }
        claimed.to_ascii_lowercase()
    } else {
        sha256_hex(req.body)
    };
    if let Some(claimed) = header_str(req.headers, "x-amz-content-sha256")? {
        if claimed == UNSIGNED_PAYLOAD || claimed.starts_with("STREAMING-") {
            return Err(VerifyError::UnsignedPayload);
        }
        if !claimed.eq_ignore_ascii_case(&body_hash) {
            return Err(VerifyError::ContentSha256Mismatch);
        }
    }

    // Signed headers: `a;b;c`, lower-case, all present, host included.
    let mut header_list: Vec<(&str, Vec<&[u8]>)> = Vec::new();
    for name in info.signed_headers.split(';') {
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed(
                "SignedHeaders must be lower-case names separated by ';'",
            ));
        }
        if header_list.iter().any(|(n, _)| *n == name) {
            return Err(malformed(format!("{name} listed twice in SignedHeaders")));
        }
        let values: Vec<&[u8]> = req
            .headers
            .get_all(name)
            .iter()
            .map(http::HeaderValue::as_bytes)
            .collect();
        if values.is_empty() {
            return Err(malformed(format!(
                "signed header {name} is not in the request"
            )));
        }
        header_list.push((name, values));
    }
    if !header_list.iter().any(|(n, _)| *n == "host") {
        return Err(malformed("the host header must be signed"));
    }

    let provided: [u8; 32] = hex::decode(&info.signature)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| malformed("Signature must be 64 hex digits"))?;

    let secret = lookup(&info.access_key_id).ok_or(VerifyError::UnknownAccessKey)?;
    let key = signing_key(&secret, &info.scope_date, &info.region, &info.service);
    let scope = credential_scope(&info.scope_date, &info.region, &info.service);

    // Candidate canonical forms. All are computed and compared, so timing
    // does not reveal which (if any) matched.
    let uris: Vec<String> = match options.uri_mode {
        UriMode::Normalized => {
            let a = canonical_uri(req.path, UriMode::Normalized);
            let b = canonical_uri(req.path, UriMode::NotNormalized);
            if a == b {
                vec![a]
            } else {
                vec![a, b]
            }
        }
        mode => vec![canonical_uri(req.path, mode)],
    };
    let exclude = info.presign_expires.map(|_| "X-Amz-Signature");
    let mut queries = vec![canonical_query(query, true, exclude)];
    if query.contains('+') {
        // '+' is a space to most SDKs (form decoding), a literal to some.
        queries.push(canonical_query(query, false, exclude));
    }
    let verbatim = canonical_query_verbatim(query, exclude);
    if !queries.contains(&verbatim) {
        // botocore signs a URL's own query string without re-encoding it.
        queries.push(verbatim);
    }
    let mut payloads = vec![body_hash.as_str()];
    if info.presign_expires.is_some() && req.body.is_empty() {
        // S3-style presigners always use UNSIGNED-PAYLOAD; harmless with no body.
        payloads.push(UNSIGNED_PAYLOAD);
    }

    let mut matched = subtle::Choice::from(0u8);
    for uri in &uris {
        for q in &queries {
            for payload in &payloads {
                let cr = canonical_request(
                    req.method,
                    uri,
                    q,
                    &header_list,
                    &info.signed_headers,
                    payload,
                );
                let sts = string_to_sign(&info.amz_date, &scope, &cr);
                matched |= signature(&key, &sts).ct_eq(&provided);
            }
        }
    }
    if !bool::from(matched) {
        return Err(VerifyError::SignatureMismatch);
    }

    Ok(Verified {
        access_key_id: info.access_key_id,
        region: info.region,
        service: info.service,
        signed_at: info.signed_at,
        content_sha256: body_hash,
    })
}
