//! kumo's integration tests: one binary (fast to link), one module per area.
//! Real-VM tests need root, QEMU, dnsmasq and namespaces: in CI they run, and a missing
//! prerequisite is a failure, never a skip.

mod api;
mod backups;
mod cloudinit;
mod cluster;
mod common;
mod e2e;
mod ec2;
mod ec2compat;
mod evacuate;
mod fleet;
mod ha;
mod hosts;
mod images;
mod ipv6;
mod migration;
mod netpath;
mod networks;
mod openapi;
mod p2v;
mod placement;
mod restart;
mod security;
mod shared_pool;
mod sim;
mod storage;
mod tenant;
mod up;
