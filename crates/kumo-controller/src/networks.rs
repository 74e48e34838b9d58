//! Network and elastic IP operations. The store enforces tenancy and the invariants; these
//! translate its errors into what the front ends show. Hosts learn about addresses from the
//! network policy they fetch, which is built from the store.

use kumo_store::{
    AddressPoolRow, AddressPoolUsage, AddressRow, NetworkRow, NetworkView, NewNetwork, Scope,
    StoreError,
};

use crate::{Controller, OpError};

impl Controller {
    /// The network of a create request: an id or name of the caller's project, or the
    /// project's default network (created on first need).
    pub(crate) async fn resolve_network(
        &self,
        scope: &Scope,
        network: Option<&str>,
    ) -> Result<NetworkRow, OpError> {
        let Some(n) = network else {
            return Ok(self
                .store
                .default_network(scope, &self.cfg.default_network)
                .await?);
        };
        let unknown = || {
            OpError::Invalid(format!(
                "network {n:?} does not exist; see `kumo network list`"
            ))
        };
        match self.store.project_network(scope, n).await {
            // Instances join networks of their own project only (admins see others' too).
            Ok(v) if v.network.project_id == scope.project_id => Ok(v.network),
            Ok(_) | Err(StoreError::NotFound { .. }) => Err(unknown()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn create_network(
        &self,
        scope: &Scope,
        new: &NewNetwork,
    ) -> Result<NetworkView, OpError> {
        let n = self.store.create_tenant_network(scope, new).await?;
        Ok(self.store.project_network(scope, &n.id).await?)
    }

    pub async fn networks(&self, scope: &Scope) -> Result<Vec<NetworkView>, OpError> {
        Ok(self.store.networks(scope).await?)
    }

    pub async fn network(&self, scope: &Scope, id: &str) -> Result<NetworkView, OpError> {
        Ok(self.store.project_network(scope, id).await?)
    }

    /// Delete a network without live instances.
    pub async fn delete_network(&self, scope: &Scope, id: &str) -> Result<NetworkRow, OpError> {
        self.store
            .delete_network(scope, id)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => OpError::IncorrectState(m),
                other => other.into(),
            })
    }

    pub async fn address_pool(&self) -> Result<Option<AddressPoolUsage>, OpError> {
        Ok(self.store.address_pool_usage().await?)
    }

    /// Define or replace the public address pool (administrators; the front end checks).
    pub async fn set_address_pool(
        &self,
        pool: &AddressPoolRow,
    ) -> Result<AddressPoolUsage, OpError> {
        self.store.set_address_pool(pool).await?;
        self.store
            .address_pool_usage()
            .await?
            .ok_or_else(|| OpError::Internal("the address pool vanished after being set".into()))
    }

    /// Allocate the pool's lowest free address to the caller's project.
    pub async fn allocate_address(&self, scope: &Scope) -> Result<AddressRow, OpError> {
        Ok(self.store.allocate_address(scope).await?)
    }

    pub async fn addresses(&self, scope: &Scope) -> Result<Vec<AddressRow>, OpError> {
        Ok(self.store.addresses(scope).await?)
    }

    /// An address by allocation id, public IP or association id.
    pub async fn address(&self, scope: &Scope, key: &str) -> Result<AddressRow, OpError> {
        Ok(self.store.address(scope, key).await?)
    }

    pub async fn associate_address(
        &self,
        scope: &Scope,
        key: &str,
        instance: &str,
        allow_reassociation: bool,
    ) -> Result<AddressRow, OpError> {
        Ok(self
            .store
            .associate_address(scope, key, instance, allow_reassociation)
            .await?)
    }

    pub async fn disassociate_address(
        &self,
        scope: &Scope,
        key: &str,
    ) -> Result<AddressRow, OpError> {
        Ok(self.store.disassociate_address(scope, key).await?)
    }

    /// Give an address back to the pool; refused while associated.
    pub async fn release_address(&self, scope: &Scope, key: &str) -> Result<AddressRow, OpError> {
        Ok(self.store.release_address(scope, key).await?)
    }
}
