use kumo_store::StoreError;

/// Errors of controller operations. Front ends map them to HTTP statuses and EC2 codes.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Invalid(String),
    /// The request does not fit the resource's current state.
    #[error("{0}")]
    IncorrectState(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no host can take this instance: {0}")]
    NoCapacity(String),
    /// A storage pool has no room.
    #[error("{0}")]
    NoStorage(String),
    #[error("host agent unavailable: {0}")]
    Unavailable(String),
    #[error("store error")]
    Store(#[source] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind, id } => OpError::NotFound { kind, id },
            StoreError::Invalid(m) => OpError::Invalid(m),
            StoreError::Conflict(m) => OpError::Conflict(m),
            StoreError::NoCapacity(m) => OpError::NoCapacity(m),
            StoreError::NoStorage(m) => OpError::NoStorage(m),
            other => OpError::Store(other),
        }
    }
}

impl OpError {
    /// A stable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            OpError::NotFound { .. } => "NotFound",
            OpError::Invalid(_) => "InvalidParameter",
            OpError::IncorrectState(_) => "IncorrectState",
            OpError::Conflict(_) => "Conflict",
            OpError::NoCapacity(_) => "InsufficientCapacity",
            OpError::NoStorage(_) => "InsufficientStorage",
            OpError::Unavailable(_) => "HostUnavailable",
            OpError::Store(_) | OpError::Internal(_) => "InternalError",
        }
    }
}
