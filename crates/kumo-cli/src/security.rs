//! `kumo sg ...` and `kumo key ...`.
