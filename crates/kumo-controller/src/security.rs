//! Security group and key pair operations.

use kumo_store::Scope;

use crate::{Controller, OpError};

impl Controller {
    /// The security group ids of a create request (ids or names of the caller's project; empty: the
    /// project's `default` group). Errors when one is unknown.
    pub(crate) async fn resolve_security_groups(
        &self,
        _scope: &Scope,
        _groups: &[String],
    ) -> Result<Vec<String>, OpError> {
        // TODO(security groups): resolve; until then instances have no groups.
        Ok(vec![])
    }

    /// A key pair name of the caller's project, checked to exist.
    pub(crate) async fn resolve_key_name(
        &self,
        _scope: &Scope,
        key: Option<&str>,
    ) -> Result<Option<String>, OpError> {
        Ok(key.map(str::to_string))
    }
}
