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
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The error with its sources, for reports to the controller.
pub fn chain(e: &dyn std::error::Error) -> String {
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
