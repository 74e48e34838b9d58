//! Models of the native API for networks, the public address pool and elastic IPs.
