//! Network and elastic IP operations.

use kumo_store::{NetworkRow, Scope};

use crate::{Controller, OpError};

impl Controller {
    /// The network of a create request: an id or name of the caller's project, or the project's default.
    pub(crate) async fn resolve_network(
        &self,
        _scope: &Scope,
        _network: Option<&str>,
    ) -> Result<NetworkRow, OpError> {
        // TODO(networks): per-project networks; until then the server's default network.
        Ok(self.store.network(&self.cfg.default_network).await?)
    }
}
