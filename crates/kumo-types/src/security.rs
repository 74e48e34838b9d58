//! Models of the native API for security groups and key pairs.
