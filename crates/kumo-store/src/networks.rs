//! Tenant networks, the public address pool and elastic IPs.
