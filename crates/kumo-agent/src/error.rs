#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("controller: {0}")]
    Controller(String),
    #[error("hypervisor")]
    Hypervisor(#[from] kumo_hypervisor::HypervisorError),
    #[error("network")]
    Network(#[from] kumo_network::NetworkError),
    #[error("storage")]
    Storage(#[from] kumo_storage::StorageError),
    #[error("ledger")]
    Json(#[from] serde_json::Error),
    #[error("image {id}: {reason}")]
    Image { id: String, reason: String },
    /// The disk or VM is in use in a way the request cannot work with.
    #[error("{0}")]
    Busy(String),
    #[error("{0} not found")]
    NotFound(String),
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }
}

pub use kumo_types::error_chain as chain;
