//! Types shared by every part of kumo: resource ids, the native API's models, and the
//! controller↔agent protocol. No I/O lives here.

pub mod agent;
pub mod api;
pub mod id;
pub mod ipv6;
pub mod migration;
pub mod networks;
pub mod security;
pub mod state;
pub mod storage;

pub use id::{new_id, IdKind};
pub use state::InstanceState;

/// An error with its sources, for messages shown to users and sent between processes
/// (a source already contained in its parent's message is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let m = src.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = src.source();
    }
    s
}
