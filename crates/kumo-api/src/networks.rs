//! REST endpoints for networks, the address pool and elastic IPs.
