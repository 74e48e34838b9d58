//! Security group and key pair operations. The store checks rules and keys and enforces
//! tenancy; these resolve what a request names and generate key pairs with `ssh-keygen`.
//! Hosts learn about group changes from the network policy they fetch.

use std::path::PathBuf;
use std::time::Duration;

use kumo_store::{
    InstanceRow, KeyPairRow, NewSgRule, Scope, SecurityGroupRow, SgRuleRow, StoreError,
    DEFAULT_GROUP, MAX_GROUPS_PER_INSTANCE,
};
use kumo_types::id::{new_id, validate_name, IdKind};

use crate::{Controller, OpError};

/// `ssh-keygen` takes milliseconds for ed25519 and well under a second for RSA 2048.
const KEYGEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory only this process's user can read, removed with everything in it on drop:
/// a generated private key touches the disk only there, and only briefly.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> Result<PrivateDir, OpError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("kumo-keygen-{}", new_id(IdKind::Request)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| OpError::Internal(format!("cannot create {}: {e}", path.display())))?;
        Ok(PrivateDir(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Store conflicts of a group's state (in use, a source, the default group) are refusals of
/// the request in the group's current state.
fn group_state(e: StoreError) -> OpError {
    match e {
        StoreError::Conflict(m) => OpError::IncorrectState(m),
        other => other.into(),
    }
}

impl Controller {
    /// The security group ids of a create request (ids or names of the caller's project; empty: the
    /// project's `default` group). Errors when one is unknown.
    pub(crate) async fn resolve_security_groups(
        &self,
        scope: &Scope,
        groups: &[String],
    ) -> Result<Vec<String>, OpError> {
        if groups.is_empty() {
            return Ok(vec![self.store.default_security_group(scope).await?.id]);
        }
        if groups.len() > MAX_GROUPS_PER_INSTANCE {
            return Err(OpError::Invalid(format!(
                "an instance can be in at most {MAX_GROUPS_PER_INSTANCE} security groups (got {})",
                groups.len()
            )));
        }
        let mut ids: Vec<String> = Vec::with_capacity(groups.len());
        for g in groups {
            let row = if g == DEFAULT_GROUP {
                self.store.default_security_group(scope).await?
            } else {
                match self.store.security_group(scope, g).await {
                    // Admins see every project's groups, but instances join their own only.
                    Ok(r) if r.project_id == scope.project_id => r,
                    Ok(_) | Err(StoreError::NotFound { .. }) => {
                        return Err(OpError::Invalid(format!(
                            "security group {g:?} does not exist; see `kumo sg list`"
                        )))
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if !ids.contains(&row.id) {
                ids.push(row.id);
            }
        }
        Ok(ids)
    }

    /// A key pair name of the caller's project, checked to exist.
    pub(crate) async fn resolve_key_name(
        &self,
        scope: &Scope,
        key: Option<&str>,
    ) -> Result<Option<String>, OpError> {
        let Some(k) = key else {
            return Ok(None);
        };
        match self.store.key_pair(scope, k).await {
            Ok(row) if row.project_id == scope.project_id => Ok(Some(row.name)),
            Ok(_) | Err(StoreError::NotFound { .. }) => Err(OpError::Invalid(format!(
                "key pair {k:?} does not exist; see `kumo key list`"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn create_security_group(
        &self,
        scope: &Scope,
        name: &str,
        description: &str,
    ) -> Result<SecurityGroupRow, OpError> {
        Ok(self
            .store
            .create_security_group(scope, name, description)
            .await?)
    }

    /// The caller's groups (the project's `default` group is made on first need).
    pub async fn security_groups(&self, scope: &Scope) -> Result<Vec<SecurityGroupRow>, OpError> {
        Ok(self.store.security_groups(scope).await?)
    }

    pub async fn security_group(
        &self,
        scope: &Scope,
        id: &str,
    ) -> Result<SecurityGroupRow, OpError> {
        if id == DEFAULT_GROUP {
            return Ok(self.store.default_security_group(scope).await?);
        }
        Ok(self.store.security_group(scope, id).await?)
    }

    /// The rules of these groups, group by group, in the order added.
    pub async fn security_group_rules(
        &self,
        group_ids: &[String],
    ) -> Result<Vec<SgRuleRow>, OpError> {
        Ok(self.store.security_group_rules(group_ids).await?)
    }

    pub async fn delete_security_group(&self, scope: &Scope, id: &str) -> Result<(), OpError> {
        self.store
            .delete_security_group(scope, id)
            .await
            .map_err(group_state)
    }

    /// Add rules to a group, all or none.
    pub async fn add_security_group_rules(
        &self,
        scope: &Scope,
        group: &str,
        rules: &[NewSgRule],
    ) -> Result<Vec<SgRuleRow>, OpError> {
        let g = self.security_group(scope, group).await?;
        Ok(self
            .store
            .add_security_group_rules(scope, &g.id, rules)
            .await?)
    }

    /// Remove rules by id and by what they say, all or none.
    pub async fn revoke_security_group_rules(
        &self,
        scope: &Scope,
        group: &str,
        rule_ids: &[String],
        matching: &[NewSgRule],
    ) -> Result<Vec<SgRuleRow>, OpError> {
        let g = self.security_group(scope, group).await?;
        Ok(self
            .store
            .remove_security_group_rules(scope, &g.id, rule_ids, matching)
            .await?)
    }

    /// Replace a live instance's security groups (ids or names of its project).
    pub async fn set_instance_security_groups(
        &self,
        scope: &Scope,
        instance: &str,
        groups: &[String],
    ) -> Result<InstanceRow, OpError> {
        if groups.is_empty() {
            return Err(OpError::Invalid(
                "an instance must be in at least one security group".into(),
            ));
        }
        let row = self.store.instance(scope, instance).await?;
        // The instance's own project decides which groups it may join (admins act for others).
        let owner = Scope {
            project_id: row.project_id.clone(),
            user_id: scope.user_id.clone(),
            admin: false,
        };
        let ids = self.resolve_security_groups(&owner, groups).await?;
        self.store
            .set_instance_security_groups(scope, &row.id, &ids)
            .await
            .map_err(group_state)
    }

    /// Generate a key pair with `ssh-keygen` (`ed25519`, the default, or `rsa`): the store keeps
    /// the public key; the private key is answered once and never kept.
    pub async fn create_key_pair(
        &self,
        scope: &Scope,
        name: &str,
        key_type: Option<&str>,
    ) -> Result<(KeyPairRow, String), OpError> {
        validate_name(name).map_err(OpError::Invalid)?;
        let kind: &[&str] = match key_type.unwrap_or("ed25519") {
            "ed25519" => &["-t", "ed25519"],
            // PEM (PKCS#1) as EC2 hands out RSA keys; every SSH client reads it.
            "rsa" => &["-t", "rsa", "-b", "2048", "-m", "PEM"],
            other => {
                return Err(OpError::Invalid(format!(
                    "key type must be ed25519 or rsa, not {other:?}"
                )))
            }
        };
        // A taken name is refused before any key is made.
        match self.store.key_pair(scope, name).await {
            Ok(k) if k.project_id == scope.project_id && k.name == name => {
                return Err(OpError::Conflict(format!(
                    "a key pair named {name} already exists"
                )))
            }
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let dir = PrivateDir::new()?;
        let path = dir.0.join("key");
        let run = tokio::process::Command::new("ssh-keygen")
            .args(kind)
            .args(["-N", "", "-C", name, "-q", "-f"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(KEYGEN_TIMEOUT, run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(OpError::Internal(
                    "ssh-keygen is not installed on the controller (package openssh-client)".into(),
                ))
            }
            Ok(Err(e)) => return Err(OpError::Internal(format!("cannot run ssh-keygen: {e}"))),
            Err(_) => {
                return Err(OpError::Internal(format!(
                    "ssh-keygen did not finish within {KEYGEN_TIMEOUT:?}"
                )))
            }
        };
        if !out.status.success() {
            return Err(OpError::Internal(format!(
                "ssh-keygen failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let read = |p: PathBuf| async move {
            tokio::fs::read_to_string(&p)
                .await
                .map_err(|e| OpError::Internal(format!("cannot read {}: {e}", p.display())))
        };
        let private = read(path.clone()).await?;
        let public = read(dir.0.join("key.pub")).await?;
        let row = self.store.import_key_pair(scope, name, &public).await?;
        Ok((row, private))
    }

    /// Store an OpenSSH public key line as a key pair of the caller's project.
    pub async fn import_key_pair(
        &self,
        scope: &Scope,
        name: &str,
        public_key: &str,
    ) -> Result<KeyPairRow, OpError> {
        Ok(self.store.import_key_pair(scope, name, public_key).await?)
    }

    pub async fn key_pairs(&self, scope: &Scope) -> Result<Vec<KeyPairRow>, OpError> {
        Ok(self.store.key_pairs(scope).await?)
    }

    pub async fn key_pair(&self, scope: &Scope, id: &str) -> Result<KeyPairRow, OpError> {
        Ok(self.store.key_pair(scope, id).await?)
    }

    /// Delete a key pair (by id or name); instances launched with it keep their copy.
    pub async fn delete_key_pair(&self, scope: &Scope, id: &str) -> Result<KeyPairRow, OpError> {
        Ok(self.store.delete_key_pair(scope, id).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_are_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let d = PrivateDir::new().expect("dir");
        let p = d.0.clone();
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(p.join("key"), "secret").expect("write");
        drop(d);
        assert!(!p.exists());
    }
}
