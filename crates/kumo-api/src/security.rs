//! REST endpoints for security groups and key pairs.
