//! The PostgreSQL store (`DATABASE_URL=postgres://…`), for platforms that outgrow one
//! SQLite file: any number of worker processes on any hosts share it.
//!
//! Same table, same rules as SQLite. A batch is one transaction of at most three
//! set-based statements per round (touch existing ids, insert the new, resolve emails owned
//! by someone else), in arrival order; a row a concurrent transaction raced us to is
//! resolved in the next round. A batch the database refuses as a whole for a reason that
//! is not transient is retried row by row, so one bad row cannot dead-letter its neighbours.
//! A row still unresolved after its rounds is a retryable failure, never a refusal: only
//! the database refusing the row's values makes it a dead letter.
//!
//! Nothing waits forever: the server cancels any statement after `statement_timeout` (a
//! lock held elsewhere, a slow plan), and the client gives up on a server that does not
//! answer at all (a dead connection); both are retryable failures.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{NewUser, Resolution, StoreError, StoreOptions};

mod errors;

use errors::{classify, describe, is_conflict, is_transient, pool_error};

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
    "UPDATE users SET last_ensured_at = now() WHERE user_id = ANY($1) RETURNING user_id, email";
const INSERT: &str = "INSERT INTO users (user_id, email)
     SELECT u, e FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(u, e, n) ORDER BY n
     ON CONFLICT DO NOTHING RETURNING user_id";
const TOUCH_BY_EMAIL: &str =
    "UPDATE users SET last_ensured_at = now() WHERE email = ANY($1) RETURNING user_id, email";

/// Users after a key, in key order: a range scan of the primary key's index. Comparison and
/// order use the same (the column's) collation, so the pages never skip nor repeat a user.
const PAGE_FROM_START: &str = "SELECT user_id, email FROM users ORDER BY user_id LIMIT $1";
const PAGE_AFTER: &str =
    "SELECT user_id, email FROM users WHERE user_id > $1 ORDER BY user_id LIMIT $2";

/// How many times a batch is run at once when concurrent batches get in its way (a
/// deadlock, or rows a concurrent transaction kept changing through every round).
const ATTEMPTS: u32 = 5;

/// A pool of connections to PostgreSQL; cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The longest the client waits for one transaction (or ping) before it takes the
    /// connection for dead.
    answer_limit: Duration,
}

/// The server did not answer one transaction within `answer_limit`.
struct Unanswered;

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, and migrates the schema (one process at a time, under an advisory lock).
    pub async fn open(url: &str, options: StoreOptions) -> anyhow::Result<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .context("DATABASE_URL is not a PostgreSQL URL")?;
        // In the startup packet rather than a `SET` after connecting: the server applies it
        // before the connection is usable, to every connection the pool ever opens
        // (reconnects included), with no extra round trip and no window without it. Options
        // the URL already gives are kept; ours comes last, so it wins.
        let timeout = format!(
            "-c statement_timeout={}",
            options.statement_timeout.as_millis()
        );
        let startup = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {timeout}"),
            _ => timeout,
        };
        config.options(startup);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
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
        // The server ends a slow statement itself; this limit is for a server that cannot
        // answer at all (statement_timeout cannot help when the connection is dead). A
        // transaction is a handful of statements that each take milliseconds, so twice the
        // statement timeout and a second is reached only by a connection that is gone.
        let answer_limit = options.statement_timeout * 2 + Duration::from_secs(1);
        Ok(Self { pool, answer_limit })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        match tokio::time::timeout(self.answer_limit, client.simple_query("SELECT 1")).await {
            Ok(answer) => answer.map(|_| ()).map_err(classify),
            Err(_) => Err(self.discard(client)),
        }
    }

    /// At most `limit` users whose id sorts after `after` (from the first with `None`), in
    /// id order (the column's collation).
    pub async fn page_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NewUser>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = async {
            match after {
                None => client.query(PAGE_FROM_START, &[&limit]).await,
                Some(after) => client.query(PAGE_AFTER, &[&after, &limit]).await,
            }
        };
        let answered = tokio::time::timeout(self.answer_limit, query).await;
        self.users_of(client, answered)
    }

    /// The `(user_id, email)` rows of a query's answer; a query that did not answer within
    /// the limit costs its connection.
    fn users_of(
        &self,
        client: deadpool_postgres::Client,
        answered: Result<
            Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<Vec<NewUser>, StoreError> {
        match answered {
            Ok(rows) => Ok(rows
                .map_err(classify)?
                .iter()
                .map(|r| NewUser::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect()),
            Err(_) => Err(self.discard(client)),
        }
    }

    /// The rows whose user id or email is `key`.
    pub async fn find(&self, key: &str) -> Result<Vec<NewUser>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        let query = client.query(
            "SELECT user_id, email FROM users WHERE user_id = $1 OR email = $1 LIMIT 2",
            &params,
        );
        let answered = tokio::time::timeout(self.answer_limit, query).await;
        self.users_of(client, answered)
    }

    /// How many users the table holds.
    pub async fn count(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let query = client.query_one("SELECT count(*) FROM users", &[]);
        match tokio::time::timeout(self.answer_limit, query).await {
            Ok(row) => Ok(row.map_err(classify)?.get::<_, i64>(0).max(0) as u64),
            Err(_) => Err(self.discard(client)),
        }
    }

    /// Runs one transaction over `users`, giving the server at most `answer_limit`.
    async fn run(
        &self,
        client: &mut deadpool_postgres::Client,
        users: &[NewUser],
    ) -> Result<Result<Vec<Option<(String, String)>>, tokio_postgres::Error>, Unanswered> {
        tokio::time::timeout(self.answer_limit, upsert_batch(client, users))
            .await
            .map_err(|_| Unanswered)
    }

    /// Closes a connection the server stopped answering on, rather than returning it to
    /// the pool where the next batch would wait on it too.
    fn discard(&self, client: deadpool_postgres::Client) -> StoreError {
        drop(deadpool_postgres::Object::take(client));
        StoreError::Transient(format!(
            "PostgreSQL did not answer within {} ms; the connection was closed",
            self.answer_limit.as_millis()
        ))
    }

    /// Makes sure of every user; one [`Resolution`] per user, in order.
    pub async fn upsert(&self, users: Vec<NewUser>) -> Result<Vec<Resolution>, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // Overlapping batches of several workers can deadlock on the unique indexes, or keep
        // changing a row under us through every round; the batch is simply run again at once.
        let mut attempt = 0;
        let batch = loop {
            attempt += 1;
            match self.run(&mut client, &users).await {
                Err(Unanswered) => return Err(self.discard(client)),
                Ok(Err(e)) if is_conflict(&e) && attempt < ATTEMPTS => continue,
                Ok(Ok(rows)) if rows.contains(&None) && attempt < ATTEMPTS => continue,
                Ok(other) => break other,
            }
        };
        match batch {
            Ok(rows) => stored_or_retry(rows),
            Err(e) if is_transient(&e) => Err(classify(e)),
            // Refused as a whole: find the row that is to blame, keep the others.
            Err(_) => {
                let mut resolutions = Vec::with_capacity(users.len());
                for user in &users {
                    match self.run(&mut client, std::slice::from_ref(user)).await {
                        Err(Unanswered) => return Err(self.discard(client)),
                        Ok(Ok(rows)) => resolutions.extend(stored_or_retry(rows)?),
                        Ok(Err(e)) if is_transient(&e) => return Err(classify(e)),
                        Ok(Err(e)) => resolutions.push(Resolution::Refused {
                            reason: format!("PostgreSQL refused the row: {}", describe(&e)),
                        }),
                    }
                }
                Ok(resolutions)
            }
        }
    }
}

/// Every row stored, or a retryable failure for the batch. A row neither stored nor
/// refused by the database was only in the way of concurrent writers: it may well be stored
/// next time, so it must not become a dead letter (a `Refused` would make it one).
fn stored_or_retry(rows: Vec<Option<(String, String)>>) -> Result<Vec<Resolution>, StoreError> {
    let unresolved = rows.iter().filter(|r| r.is_none()).count();
    if unresolved > 0 {
        return Err(StoreError::Transient(format!(
            "{unresolved} of {} row(s) neither stored nor refused after {ATTEMPTS} attempts \
             (concurrent writers kept changing them)",
            rows.len()
        )));
    }
    Ok(rows
        .into_iter()
        .flatten()
        .map(|(id, email)| Resolution::stored(id, email))
        .collect())
}

/// One transaction of at most three rounds; per user, in order, the id that owns its email
/// now with the email kept for it, or `None` when concurrent transactions kept it
/// unresolved through every round.
async fn upsert_batch(
    client: &mut deadpool_postgres::Client,
    users: &[NewUser],
) -> Result<Vec<Option<(String, String)>>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut resolved: Vec<Option<(String, String)>> = vec![None; users.len()];
    for _round in 0..3 {
        let open: Vec<usize> = (0..users.len())
            .filter(|&i| resolved[i].is_none())
            .collect();
        if open.is_empty() {
            break;
        }
        let ids: Vec<&str> = open.iter().map(|&i| users[i].user_id.as_str()).collect();
        let existing: HashMap<String, String> = tx
            .query(TOUCH_BY_ID, &[&ids])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut fresh_ids = Vec::new();
        let mut fresh_emails = Vec::new();
        for &i in &open {
            // An existing user keeps the email it was stored with.
            if let Some(email) = existing.get(&users[i].user_id) {
                resolved[i] = Some((users[i].user_id.clone(), email.clone()));
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
                    resolved[i] = Some((users[i].user_id.clone(), users[i].email.clone()));
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
                    let email = &users[i].email;
                    resolved[i] = owners
                        .get(email)
                        .map(|owner| (owner.clone(), email.clone()));
                }
            }
        }
    }
    // Committed even with rows unresolved: what was resolved is kept, and the retry of the
    // batch finds those rows by id at once.
    tx.commit().await?;
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_left_unresolved_fails_the_batch_retryably_and_is_never_refused() {
        let u1 = || Some(("u1".to_string(), "u1@x".to_string()));
        let err = stored_or_retry(vec![u1(), None]).unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert_eq!(
            stored_or_retry(vec![u1(), u1()]).unwrap(),
            vec![
                Resolution::stored("u1", "u1@x"),
                Resolution::stored("u1", "u1@x")
            ]
        );
    }
}
