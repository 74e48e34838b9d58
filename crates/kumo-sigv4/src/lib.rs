//! AWS Signature Version 4 (`AWS4-HMAC-SHA256`) signing and verification.
//!
//! * [`sign`] — client side (kumo's CLI calling kumo's native API).
//! * [`verify`] — server side: checks a request from its raw path, query,
//!   headers and body against the request's own `SignedHeaders`, within a
//!   clock-skew window. Accepts the `Authorization` header form and the
//!   presigned query-string form.
//!
//! Canonicalisation follows botocore (`SigV4Auth`) for non-S3 services: the
//! raw path has dot segments and empty segments removed and is then
//! URI-encoded once more (double encoding), the query string is decoded and
//! re-encoded with AWS's `UriEncode` and sorted by key then value.
//!
//! All functions are pure (no I/O, no clock), so they can be fuzzed.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod canonical;
mod sign;
mod verify;

pub use canonical::{signing_key, UriMode};
pub use sign::{host_header_for, sign, sign_with_options, SignError, SignOptions};
pub use verify::{
    verify, verify_with_options, Verified, VerifyError, VerifyOptions, VerifyRequest,
};

/// An access key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id (public, e.g. `AKIA...`).
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}
