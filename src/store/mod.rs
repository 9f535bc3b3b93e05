//! Where ensured users are kept: the `users` table.
//!
//! SQLite is the default (one file, one writer thread); PostgreSQL serves many worker
//! hosts. The rules every store keeps:
//! ensuring the same user again adds no row, and an email that already belongs to another
//! user id resolves to that owner instead of moving or duplicating anything.
//!
//! Users that exist elsewhere come in through [`source`] (a file of CSV or JSON lines, or a
//! PostgreSQL query) and [`import`] (the same upserts as the worker's, in batches).

pub mod import;
pub mod postgres;
pub mod source;
pub mod sqlite;

use std::path::Path;
use std::time::Duration;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A store failure that concerns the whole batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: the database is busy, locked or unreachable, or the disk hiccupped.
    #[error("the database is temporarily unavailable: {0}")]
    Transient(String),
    /// Not worth retrying as it is (e.g. the file is not a database).
    #[error("the database failed: {0}")]
    Fatal(String),
    #[error("the SQLite writer thread has stopped")]
    Stopped,
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, StoreError::Fatal(_))
    }
}

/// How to open a store; what SQLite has no use for, it ignores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// PostgreSQL connections in the pool.
    pub pool_size: usize,
    /// PostgreSQL: the longest one statement may run, lock waits included, before the
    /// server cancels it (a retryable failure) instead of letting a worker hang.
    pub statement_timeout: Duration,
}

impl StoreOptions {
    /// The options with this pool size and the default statement timeout (5 s).
    pub fn with_pool_size(pool_size: usize) -> Self {
        Self {
            pool_size,
            statement_timeout: Duration::from_secs(5),
        }
    }

    /// How `serve` and `work` open the store: a PostgreSQL pool of 2 ×
    /// `WORKER_CONCURRENCY` connections, and the statement timeout.
    pub fn of_service(config: &crate::config::Config) -> Self {
        Self {
            pool_size: config.worker_concurrency * 2,
            statement_timeout: config.database_statement_timeout,
        }
    }

    /// How a one-off command opens the store: a small PostgreSQL pool (it runs one
    /// transaction at a time), and the configured statement timeout.
    pub fn of_command(settings: &crate::config::StoreSettings) -> Self {
        Self {
            pool_size: 2,
            statement_timeout: settings.database_statement_timeout,
        }
    }
}

/// The configured store: SQLite by default, PostgreSQL when `DATABASE_URL` is set.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Store {
    /// Opens PostgreSQL when a URL is given, else the SQLite file.
    pub async fn open(
        database_url: Option<&str>,
        sqlite_path: &Path,
        options: StoreOptions,
    ) -> anyhow::Result<Self> {
        Ok(match database_url {
            Some(url) => Store::Postgres(PostgresStore::open(url, options).await?),
            None => Store::Sqlite(SqliteStore::open(sqlite_path, Duration::from_secs(5))?),
        })
    }

    /// Makes sure of every user in one transaction; one [`Resolution`] per user, in order.
    pub async fn upsert(&self, users: Vec<NewUser>) -> Result<Vec<Resolution>, StoreError> {
        match self {
            Store::Sqlite(s) => s.upsert(users).await,
            Store::Postgres(p) => p.upsert(users).await,
        }
    }

    /// At most `limit` users whose id sorts after `after` (from the first with `None`), in
    /// id order, with the email the store keeps: pages for `users resync-engine`.
    pub async fn page_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NewUser>, StoreError> {
        match self {
            Store::Sqlite(s) => s.page_after(after, limit).await,
            Store::Postgres(p) => p.page_after(after, limit).await,
        }
    }

    /// The rows whose user id or email is `key` (at most two: one of each): what the
    /// console shows as a user's stored, canonical pair.
    pub async fn find(&self, key: &str) -> Result<Vec<NewUser>, StoreError> {
        match self {
            Store::Sqlite(s) => s.find(key).await,
            Store::Postgres(p) => p.find(key).await,
        }
    }

    /// How many users the store holds.
    pub async fn count(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.count().await,
            Store::Postgres(p) => p.count().await,
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.ping().await,
            Store::Postgres(p) => p.ping().await,
        }
    }

    /// The name `/readyz` and the metrics report this store under.
    pub fn name(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }
}

/// A user to make sure of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub user_id: String,
    pub email: String,
}

impl NewUser {
    pub fn new(user_id: impl Into<String>, email: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            email: email.into(),
        }
    }
}

/// What the store made of one [`NewUser`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The user exists now as the store keeps it: `canonical_id` owns the email (it differs
    /// from the requested id when the email already belonged to someone else), and
    /// `email` is the one kept for it (it differs from the requested email when the id was
    /// stored with another one first). The Engine is told this pair, never the token's.
    Stored { canonical_id: String, email: String },
    /// This row can never be stored (e.g. the database refuses its values).
    Refused { reason: String },
}

impl Resolution {
    pub fn stored(canonical_id: impl Into<String>, email: impl Into<String>) -> Self {
        Resolution::Stored {
            canonical_id: canonical_id.into(),
            email: email.into(),
        }
    }
}
