//! The PostgreSQL store (`DATABASE_URL=postgres://…`), for platforms that outgrow one
//! SQLite file: any number of worker processes on any hosts share it.
//!
//! Same table, same rules as SQLite. A batch is one transaction of at most three
//! set-based statements per round (touch existing ids, insert the new, resolve emails owned
//! by someone else), in arrival order; a row a concurrent transaction raced us to is
//! resolved in the next round. A batch the database refuses as a whole for a reason that
//! is not transient is retried row by row, so one bad row cannot dead-letter its neighbours.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{NewUser, Resolution, StoreError};

const MIGRATIONS: &[&str] = &[
    // 1: the users table.
    "CREATE TABLE IF NOT EXISTS users (
        user_id         TEXT PRIMARY KEY,
        email           TEXT NOT NULL UNIQUE,
        created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
        last_ensured_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )",
];

const TOUCH_BY_ID: &str =
    "UPDATE users SET last_ensured_at = now() WHERE user_id = ANY($1) RETURNING user_id";
const INSERT: &str = "INSERT INTO users (user_id, email)
     SELECT u, e FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(u, e, n) ORDER BY n
     ON CONFLICT DO NOTHING RETURNING user_id";
const TOUCH_BY_EMAIL: &str =
    "UPDATE users SET last_ensured_at = now() WHERE email = ANY($1) RETURNING user_id, email";

/// A pool of connections to PostgreSQL; cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, and migrates the schema (one process at a time, under an advisory lock).
    pub async fn open(url: &str, pool_size: usize) -> anyhow::Result<Self> {
        let config: tokio_postgres::Config = url
            .parse()
            .context("DATABASE_URL is not a PostgreSQL URL")?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(5)))
            .create_timeout(Some(std::time::Duration::from_secs(5)))
            .build()
            .context("cannot set up the PostgreSQL pool")?;
        let mut client = pool
            .get()
            .await
            .context("cannot connect to PostgreSQL (DATABASE_URL)")?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7283946501)", &[])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS ensure_user_schema (version INTEGER NOT NULL)",
        )
        .await?;
        let version: i32 = tx
            .query_opt("SELECT version FROM ensure_user_schema", &[])
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0);
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {}", i + 1))?;
        }
        tx.execute("DELETE FROM ensure_user_schema", &[]).await?;
        tx.execute(
            "INSERT INTO ensure_user_schema (version) VALUES ($1)",
            &[&(MIGRATIONS.len() as i32)],
        )
        .await?;
        tx.commit()
            .await
            .context("cannot migrate the PostgreSQL schema")?;
        Ok(Self { pool })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client.simple_query("SELECT 1").await.map_err(classify)?;
        Ok(())
    }

    /// Makes sure of every user; one [`Resolution`] per user, in order.
    pub async fn upsert(&self, users: Vec<NewUser>) -> Result<Vec<Resolution>, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // Overlapping batches of several workers can deadlock on the unique indexes; the
        // loser's batch is simply run again at once.
        let mut attempt = 0;
        let batch = loop {
            attempt += 1;
            match upsert_batch(&mut client, &users).await {
                Err(e) if is_conflict(&e) && attempt < 5 => continue,
                other => break other,
            }
        };
        match batch {
            Ok(resolutions) => Ok(resolutions),
            Err(e) if is_transient(&e) => Err(classify(e)),
            // Refused as a whole: find the row that is to blame, keep the others.
            Err(_) => {
                let mut resolutions = Vec::with_capacity(users.len());
                for user in &users {
                    match upsert_batch(&mut client, std::slice::from_ref(user)).await {
                        Ok(mut r) => resolutions.push(r.remove(0)),
                        Err(e) if is_transient(&e) => return Err(classify(e)),
                        Err(e) => resolutions.push(Resolution::Refused {
                            reason: format!("PostgreSQL refused the row: {}", describe(&e)),
                        }),
                    }
                }
                Ok(resolutions)
            }
        }
    }
}

async fn upsert_batch(
    client: &mut deadpool_postgres::Client,
    users: &[NewUser],
) -> Result<Vec<Resolution>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut resolved: Vec<Option<String>> = vec![None; users.len()];
    for _round in 0..3 {
        let open: Vec<usize> = (0..users.len())
            .filter(|&i| resolved[i].is_none())
            .collect();
        if open.is_empty() {
            break;
        }
        let ids: Vec<&str> = open.iter().map(|&i| users[i].user_id.as_str()).collect();
        let existing: HashSet<String> = tx
            .query(TOUCH_BY_ID, &[&ids])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut fresh_ids = Vec::new();
        let mut fresh_emails = Vec::new();
        for &i in &open {
            if existing.contains(&users[i].user_id) {
                resolved[i] = Some(users[i].user_id.clone());
            } else {
                fresh_ids.push(users[i].user_id.as_str());
                fresh_emails.push(users[i].email.as_str());
            }
        }
        if !fresh_ids.is_empty() {
            let inserted: HashSet<String> = tx
                .query(INSERT, &[&fresh_ids, &fresh_emails])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for &i in &open {
                if resolved[i].is_none() && inserted.contains(&users[i].user_id) {
                    resolved[i] = Some(users[i].user_id.clone());
                }
            }
        }
        let emails: Vec<&str> = open
            .iter()
            .filter(|&&i| resolved[i].is_none())
            .map(|&i| users[i].email.as_str())
            .collect();
        if !emails.is_empty() {
            let owners: HashMap<String, String> = tx
                .query(TOUCH_BY_EMAIL, &[&emails])
                .await?
                .iter()
                .map(|r| (r.get::<_, String>(1), r.get::<_, String>(0)))
                .collect();
            for &i in &open {
                if resolved[i].is_none() {
                    resolved[i] = owners.get(&users[i].email).cloned();
                }
            }
        }
    }
    tx.commit().await?;
    Ok(resolved
        .into_iter()
        .map(|r| match r {
            Some(canonical_id) => Resolution::Stored { canonical_id },
            None => Resolution::Refused {
                reason: "neither the user id nor the email could be stored".into(),
            },
        })
        .collect())
}

/// Connection trouble, serialisation failures, deadlocks, a server shutting down or out
/// of resources: the same batch may succeed later.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // no SQLSTATE: the connection itself failed
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57")
                || c == "40001"
                || c == "40P01"
        }
    }
}

/// A deadlock or serialisation failure: another transaction won; run it again.
fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(e.code().map(|c| c.code()), Some("40001" | "40P01"))
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn classify(e: tokio_postgres::Error) -> StoreError {
    if is_transient(&e) {
        StoreError::Transient(describe(&e))
    } else {
        StoreError::Fatal(describe(&e))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Transient(format!("no PostgreSQL connection: {e}"))
}
