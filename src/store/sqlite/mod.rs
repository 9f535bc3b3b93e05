//! The SQLite store: one writer thread, one transaction per batch.
//!
//! SQLite allows one writer at a time, so the writes of all workers go through one thread
//! that owns the connection; batches that arrive while a transaction commits are committed
//! together in the next one (group commit), so `synchronous=FULL` costs one fsync per
//! group rather than per user. The async side only sends a message and awaits the reply.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension};
use tokio::sync::oneshot;

use super::{NewUser, Resolution, StoreError};

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: the users table.
    "CREATE TABLE IF NOT EXISTS users (
        user_id         TEXT PRIMARY KEY NOT NULL,
        email           TEXT NOT NULL UNIQUE,
        created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
        last_ensured_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    )",
];

const TOUCH_BY_ID: &str = "UPDATE users SET last_ensured_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE user_id = ?1 RETURNING email";
const INSERT: &str = "INSERT INTO users (user_id, email) VALUES (?1, ?2) ON CONFLICT DO NOTHING";
const TOUCH_BY_EMAIL: &str =
    "UPDATE users SET last_ensured_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE email = ?1 RETURNING user_id, email";

/// Busy, locked, out of disk or memory, an I/O hiccup: the same work may succeed later.
fn is_transient(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory
        )
    )
}

/// True when the error concerns the whole database rather than one row's values.
fn is_database_wide(e: &rusqlite::Error) -> bool {
    is_transient(e)
        || matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase | ErrorCode::ReadOnly)
        )
}

fn classify(e: rusqlite::Error) -> StoreError {
    if is_transient(&e) {
        StoreError::Transient(e.to_string())
    } else {
        StoreError::Fatal(e.to_string())
    }
}

type UpsertReply = oneshot::Sender<Result<Vec<Resolution>, StoreError>>;

enum Command {
    Upsert(Vec<NewUser>, UpsertReply),
    Ping(oneshot::Sender<Result<(), StoreError>>),
    Page {
        after: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<NewUser>, StoreError>>,
    },
    Count(oneshot::Sender<Result<u64, StoreError>>),
    Find(String, oneshot::Sender<Result<Vec<NewUser>, StoreError>>),
}

/// Users after a key, in key order (`user_id` is the primary key: an index range scan).
const PAGE_FROM_START: &str = "SELECT user_id, email FROM users ORDER BY user_id LIMIT ?1";
/// A user by id or by email (both columns are indexed: primary key and unique index).
const FIND: &str = "SELECT user_id, email FROM users WHERE user_id = ?1 OR email = ?1 LIMIT 2";
const PAGE_AFTER: &str =
    "SELECT user_id, email FROM users WHERE user_id > ?1 ORDER BY user_id LIMIT ?2";

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    tx: mpsc::Sender<Command>,
    path: PathBuf,
    /// Dropped with the last handle: the checkpoint thread then does a last one and ends.
    _stop_checkpoints: Arc<mpsc::Sender<()>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating when missing) the database and its folder, migrates it, and starts
    /// the writer thread. Fails at once when the file cannot be used.
    pub fn open(path: &Path, busy_timeout: Duration) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the folder {}", dir.display()))?;
        }
        create_private(path)?;
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open SQLite database {}", path.display()))?;
        prepare(&conn, busy_timeout)
            .with_context(|| format!("cannot prepare SQLite database {}", path.display()))?;
        let checkpointer = Connection::open(path)
            .with_context(|| format!("cannot open SQLite database {}", path.display()))?;
        checkpointer.busy_timeout(busy_timeout)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .context("cannot start the SQLite writer thread")?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, stopped))
            .context("cannot start the SQLite checkpoint thread")?;
        Ok(Self {
            tx,
            path: path.to_path_buf(),
            _stop_checkpoints: Arc::new(stop_checkpoints),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes sure of every user in one transaction; one [`Resolution`] per user, in order.
    pub async fn upsert(&self, users: Vec<NewUser>) -> Result<Vec<Resolution>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Upsert(users, reply))
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Answers when the writer thread can read the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ping(reply))
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// At most `limit` users whose id sorts after `after` (from the first with `None`), in
    /// id order (SQLite's byte order).
    pub async fn page_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NewUser>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Page {
                after: after.map(str::to_string),
                limit,
                reply,
            })
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// The rows whose user id or email is `key`.
    pub async fn find(&self, key: &str) -> Result<Vec<NewUser>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Find(key.to_string(), reply))
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// How many users the table holds.
    pub async fn count(&self) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Count(reply))
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

/// Creates the database file readable by its owner only; an existing file keeps its mode.
fn create_private(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok(())
}

fn prepare(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // 16 MiB of page cache (the default is 2 MiB): with millions of users the index pages
    // of a touch or insert would otherwise be read from disk again and again.
    conn.pragma_update(None, "cache_size", -16_384)?;
    // The writer never checkpoints: a thread of its own copies the WAL into the database,
    // so a large checkpoint never stalls a batch.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Copies the WAL into the database every 200 ms (PASSIVE: never waits for, nor blocks,
/// the writer), and once more when the store is dropped.
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>) {
    let checkpoint = |mode: &str| {
        if let Err(e) = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
            tracing::warn!(error = %e, "SQLite checkpoint failed; retrying later");
        }
    };
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(Duration::from_millis(200)) {
        checkpoint("PASSIVE");
    }
    checkpoint("TRUNCATE");
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Command>) {
    while let Ok(first) = rx.recv() {
        let mut group: Vec<(Vec<NewUser>, UpsertReply)> = Vec::new();
        let mut next = Some(first);
        // Take whatever else is already waiting: one commit serves them all.
        while let Some(command) = next.take().or_else(|| rx.try_recv().ok()) {
            match command {
                Command::Upsert(users, reply) => group.push((users, reply)),
                Command::Ping(reply) => {
                    let ok = conn
                        .query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
                        .map_err(classify);
                    let _ = reply.send(ok);
                }
                // Reads go through the writer's connection too: the only callers are the
                // operator commands, each with a store of its own, and one thread per
                // connection keeps all SQLite work off the async threads.
                Command::Page {
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(page(&conn, after.as_deref(), limit).map_err(classify));
                }
                Command::Find(key, reply) => {
                    let rows = conn.prepare_cached(FIND).and_then(|mut stmt| {
                        stmt.query_map([&key], |r| {
                            Ok(NewUser::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                        })?
                        .collect()
                    });
                    let _ = reply.send(rows.map_err(classify));
                }
                Command::Count(reply) => {
                    let count = conn
                        .query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))
                        .map(|n| n.max(0) as u64)
                        .map_err(classify);
                    let _ = reply.send(count);
                }
            }
            if group.len() >= 64 {
                break;
            }
        }
        if group.is_empty() {
            continue;
        }
        match upsert_group(&mut conn, &group) {
            Ok(results) => {
                for ((_, reply), result) in group.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                let e = classify(e);
                for (_, reply) in group {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn page(conn: &Connection, after: Option<&str>, limit: usize) -> rusqlite::Result<Vec<NewUser>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let row =
        |r: &rusqlite::Row<'_>| Ok(NewUser::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?));
    match after {
        None => conn
            .prepare_cached(PAGE_FROM_START)?
            .query_map([limit], row)?
            .collect(),
        Some(after) => conn
            .prepare_cached(PAGE_AFTER)?
            .query_map(rusqlite::params![after, limit], row)?
            .collect(),
    }
}

fn upsert_group(
    conn: &mut Connection,
    group: &[(Vec<NewUser>, UpsertReply)],
) -> rusqlite::Result<Vec<Vec<Resolution>>> {
    let tx = conn.transaction()?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut touch_by_id = tx.prepare_cached(TOUCH_BY_ID)?;
        let mut insert = tx.prepare_cached(INSERT)?;
        let mut touch_by_email = tx.prepare_cached(TOUCH_BY_EMAIL)?;
        for (users, _) in group {
            let mut batch = Vec::with_capacity(users.len());
            for user in users {
                let resolved = (|| -> rusqlite::Result<Resolution> {
                    // The user exists already: the common case of a returning user. It
                    // keeps the email it was stored with.
                    let kept: Option<String> = touch_by_id
                        .query_row([&user.user_id], |r| r.get(0))
                        .optional()?;
                    if let Some(email) = kept {
                        return Ok(Resolution::stored(&user.user_id, email));
                    }
                    if insert.execute([&user.user_id, &user.email])? == 1 {
                        return Ok(Resolution::stored(&user.user_id, &user.email));
                    }
                    // The email belongs to another user id: that owner is the user.
                    let owner: Option<(String, String)> = touch_by_email
                        .query_row([&user.email], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    Ok(match owner {
                        Some((canonical_id, email)) => Resolution::stored(canonical_id, email),
                        None => Resolution::Refused {
                            reason: "neither the user id nor the email could be stored".into(),
                        },
                    })
                })();
                match resolved {
                    Ok(r) => batch.push(r),
                    // Busy, I/O and the like concern the whole transaction: retry it all.
                    Err(e) if is_database_wide(&e) => return Err(e),
                    // Anything else is about this row's values; the rest of the batch goes on.
                    Err(e) => batch.push(Resolution::Refused {
                        reason: format!("SQLite refused the row: {e}"),
                    }),
                }
            }
            results.push(batch);
        }
    }
    tx.commit()?;
    Ok(results)
}

#[cfg(test)]
mod tests;
