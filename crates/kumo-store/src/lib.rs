//! kumo's store. All controller state lives here, so a controller can be killed at any moment
//! and started again without losing anything.
//!
//! Tenancy is enforced here, not in handlers: every query on a project's resources takes a
//! [`Scope`], and a scope for project A cannot read or change a row of project B.
//! The SQL is plain enough for SQLite and PostgreSQL (`$N` placeholders, TEXT timestamps).

mod auth;
mod ec2;
mod groups;
mod hosts;
mod images;
mod instances;
mod leases;
mod migration;
mod networks;
mod ops;
mod placement;
mod secrets;
mod security;
mod storage;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub use auth::{AccessKey, Bootstrap};
pub use ec2::TagRow;
pub use groups::PlacementGroupRow;
pub use hosts::{host_transition_allowed, HostRow, HostUsage, JoinToken};
pub use images::{ImageRow, NewImage};
pub use instances::{InstanceRow, LaunchExtras, NetworkRow, NewInstance, Observation};
pub use leases::{check_ha_priority, sort_for_failover, Failover, LeaseRow, HA_PRIORITY_MAX};
pub use migration::{MigrationRow, NewMigration, ACTIVE_STEPS};
pub use networks::{
    check_address_pool, AddressPoolRow, AddressPoolUsage, AddressRow, NetworkView, NewNetwork,
    MAX_VLAN_TAG, MAX_VNI, TENANT_PREFIX, VXLAN_MTU,
};
pub use ops::{EventRow, IdempotencyClaim, IdempotentResponse, NewEvent, OperationRow};
pub use placement::{Placement, PlacementGuard};
pub use security::{
    check_cidr, describe_rule, normalize_protocol, parse_public_key, KeyPairRow, NewSgRule,
    PublicKey, SecurityGroupRow, SgRuleRow, DEFAULT_GROUP, MAX_GROUPS_PER_INSTANCE,
};
pub use storage::{
    is_shared, BackupRow, Domain, DomainUsage, NewSchedule, NewSnapshot, NewVolume, PoolRow,
    ScheduleRow, SnapshotRow, VolumeRow, GIB, OVERCOMMIT_RANGE,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no host can take this instance: {0}")]
    NoCapacity(String),
    /// A storage pool has no room for a disk.
    #[error("{0}")]
    NoStorage(String),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("secret key file {path}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt value in column {0}")]
    Corrupt(&'static str),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Whose rows a query may see. Admins see every project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub project_id: String,
    pub user_id: String,
    pub admin: bool,
}

impl Scope {
    /// The project filter to bind: `None` means all projects.
    fn filter(&self) -> Option<&str> {
        if self.admin {
            None
        } else {
            Some(&self.project_id)
        }
    }

    /// The scope background tasks use: all projects.
    pub fn system() -> Scope {
        Scope {
            project_id: String::new(),
            user_id: "system".into(),
            admin: true,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Hosts, usage, groups and addresses for placement, behind the lock that serialises
    /// capacity reservation: two creates never both take the last slot of a host.
    placement: std::sync::Arc<tokio::sync::Mutex<placement::Placement>>,
    /// Encrypts access-key secrets at rest (they must stay recoverable for SigV4).
    secrets: secrets::SecretBox,
}

pub fn now_str() -> String {
    fmt_time(Utc::now())
}

pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Corrupt("timestamp"))
}

pub(crate) fn parse_time_opt(s: Option<&str>) -> Result<Option<DateTime<Utc>>> {
    s.map(parse_time).transpose()
}

/// Cut a result fetched with `limit + 1` rows into a page and the cursor of the next one.
pub(crate) fn page<T>(
    mut items: Vec<T>,
    limit: i64,
    cursor_of: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        let next = items.last().map(&cursor_of);
        (items, next)
    } else {
        (items, None)
    }
}

/// Page sizes are clamped to 1..=1000.
pub fn clamp_limit(limit: Option<u32>) -> i64 {
    i64::from(limit.unwrap_or(100).clamp(1, 1000))
}

impl Store {
    /// Open (creating if needed) the SQLite store at `path` and run migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Store> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // A bounded pool with timeouts: connections can never pile up (seed 002's leak).
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        // The key lives beside the database, readable by its owner only.
        let secrets = secrets::SecretBox::load_or_create(&path.with_file_name("secrets.key"))?;
        Ok(Store {
            pool,
            placement: Default::default(),
            secrets,
        })
    }

    pub async fn open_memory() -> Result<Store> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store {
            pool,
            placement: Default::default(),
            secrets: secrets::SecretBox::ephemeral(),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests;
