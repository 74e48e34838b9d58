//! Types shared by every part of kumo: resource ids, the native API's models, and the
//! controller↔agent protocol. No I/O lives here.

pub mod agent;
pub mod api;
pub mod id;
pub mod state;

pub use id::{new_id, IdKind};
pub use state::InstanceState;
