//! Projects, users, access keys and host join tokens.

use kumo_types::id::{new_access_key_id, new_id, new_secret, IdKind};
use sqlx::Row;

use crate::{now_str, Result, Scope, Store, StoreError};

#[derive(Debug, Clone)]
pub struct AccessKey {
    pub id: String,
    pub secret: String,
    pub user_id: String,
    pub user_name: String,
    pub project_id: String,
    pub role: String,
}

impl AccessKey {
    pub fn scope(&self) -> Scope {
        Scope {
            project_id: self.project_id.clone(),
            user_id: self.user_id.clone(),
            admin: self.role == "admin",
        }
    }
}

/// What `kumo up` and `kumo server --init` need to hand to the first user.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub project_id: String,
    pub user_id: String,
    pub access_key: AccessKey,
    pub join_token: String,
}

impl Store {
    pub async fn create_project(&self, name: &str) -> Result<String> {
        kumo_types::id::validate_name(name).map_err(StoreError::Invalid)?;
        let id = new_id(IdKind::Project);
        sqlx::query("INSERT INTO projects (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&id)
            .bind(name)
            .bind(now_str())
            .execute(&self.pool)
            .await
            .map_err(|e| unique_conflict(e, format!("project {name} already exists")))?;
        Ok(id)
    }

    pub async fn create_user(&self, name: &str, project_id: &str, role: &str) -> Result<String> {
        kumo_types::id::validate_name(name).map_err(StoreError::Invalid)?;
        if role != "admin" && role != "member" {
            return Err(StoreError::Invalid(format!(
                "role must be admin or member, not {role}"
            )));
        }
        let id = new_id(IdKind::User);
        sqlx::query(
            "INSERT INTO users (id, name, project_id, role, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(project_id)
        .bind(role)
        .bind(now_str())
        .execute(&self.pool)
        .await
        .map_err(|e| unique_conflict(e, format!("user {name} already exists")))?;
        Ok(id)
    }

    pub async fn create_access_key(&self, user_id: &str) -> Result<AccessKey> {
        let id = new_access_key_id();
        let secret = new_secret();
        sqlx::query(
            "INSERT INTO access_keys (id, secret, user_id, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(self.secrets.seal(&secret)?)
        .bind(user_id)
        .bind(now_str())
        .execute(&self.pool)
        .await?;
        self.access_key(&id).await?.ok_or(StoreError::NotFound {
            kind: "access key",
            id,
        })
    }

    /// A live (not revoked) access key with its user and project.
    pub async fn access_key(&self, id: &str) -> Result<Option<AccessKey>> {
        let row = sqlx::query(
            "SELECT k.id, k.secret, k.user_id, u.name AS user_name, u.project_id, u.role
             FROM access_keys k JOIN users u ON u.id = k.user_id
             WHERE k.id = $1 AND k.revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(AccessKey {
                id: r.try_get("id")?,
                secret: self.secrets.open(&r.try_get::<String, _>("secret")?)?,
                user_id: r.try_get("user_id")?,
                user_name: r.try_get("user_name")?,
                project_id: r.try_get("project_id")?,
                role: r.try_get("role")?,
            })
        })
        .transpose()
    }

    /// Create the admin project, user, key, a join token and the default network, once.
    /// Returns `None` when the store was already initialised.
    pub async fn bootstrap(&self, default_cidr: &str) -> Result<Option<Bootstrap>> {
        let exists: Option<(String,)> =
            sqlx::query_as("SELECT id FROM projects WHERE name = 'admin'")
                .fetch_optional(&self.pool)
                .await?;
        if exists.is_some() {
            return Ok(None);
        }
        let project_id = self.create_project("admin").await?;
        let user_id = self.create_user("admin", &project_id, "admin").await?;
        let access_key = self.create_access_key(&user_id).await?;
        let join_token = self.create_join_token().await?;
        self.create_network(&project_id, "default", default_cidr)
            .await?;
        Ok(Some(Bootstrap {
            project_id,
            user_id,
            access_key,
            join_token,
        }))
    }

    pub async fn create_join_token(&self) -> Result<String> {
        let token = format!("kjt-{}", new_secret().replace(['+', '/'], "x"));
        sqlx::query("INSERT INTO join_tokens (token, created_at) VALUES ($1, $2)")
            .bind(&token)
            .bind(now_str())
            .execute(&self.pool)
            .await?;
        Ok(token)
    }

    pub async fn join_token_valid(&self, token: &str) -> Result<bool> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT token FROM join_tokens WHERE token = $1 AND revoked_at IS NULL")
                .bind(token)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// Any live join token (for `kumo up`, which starts its own agent).
    pub async fn any_join_token(&self) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT token FROM join_tokens WHERE revoked_at IS NULL ORDER BY created_at LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// The first admin access key (for `kumo up` restarting on an existing data dir).
    pub async fn admin_access_key(&self) -> Result<Option<AccessKey>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT k.id FROM access_keys k JOIN users u ON u.id = k.user_id
             WHERE u.role = 'admin' AND k.revoked_at IS NULL ORDER BY k.created_at LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((id,)) => self.access_key(&id).await,
            None => Ok(None),
        }
    }

    pub async fn project_id_by_name(&self, name: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as("SELECT id FROM projects WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.0))
    }
}

pub(crate) fn unique_conflict(e: sqlx::Error, msg: String) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(msg),
        _ => StoreError::Db(e),
    }
}
