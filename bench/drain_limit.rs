//! The drain limit harness for `bench/run`: the least a drain of the ingress queue can do,
//! and nothing more. `ensure-user work` is measured against it in the same run, on the same
//! machine, on a backlog of the same size.
//!
//! `WORKER_CONCURRENCY` consumers (default 4, the service's default), each on its own Redis
//! connection, loop until the stream has nothing left for them:
//!
//! 1. `XREADGROUP GROUP <group> <consumer> COUNT <WORKER_BATCH_SIZE> STREAMS <stream> >`
//!    (default 256, the service's default; no BLOCK: the backlog is there already, and an
//!    empty answer ends the consumer);
//! 2. one SQLite transaction for the batch (`journal_mode=WAL`, `synchronous=FULL`, the
//!    service's table `users`): an upsert by `user_id` per entry that returns the stored
//!    pair (`INSERT … ON CONFLICT(user_id) DO UPDATE SET last_ensured_at = … RETURNING`);
//!    one thread owns the connection and takes the consumers' batches in turn;
//! 3. one pipeline of Engine `XADD <ENGINE_STREAM> * message <json>`, the wire format of
//!    docs/contract.md (`{"function":"createUser","userId":…,"userEmail":…,"requestId":…}`,
//!    in that key order), over one multiplexed connection to the Engine's Redis;
//! 4. `XACK` + `XDEL` of the batch's ids, in one round trip.
//!
//! No status records, no retries, no claims of idle entries, no dead letters, no email
//! owner rule beyond the upsert (a second id for a stored email fails the batch and the
//! run), no metrics, no logging. It prints one line at the end:
//!   `DRAIN_LIMIT entries=… seconds=… rate=…` (ensures per second, from its first read).
//!
//! Environment: `REDIS_URL` (redis://127.0.0.1:6379), `ENGINE_REDIS_URL` (`REDIS_URL`),
//! `DATABASE_PATH` (./drain-limit.db), `ENSURE_STREAM` (stream:ensure-user), `ENSURE_GROUP`
//! (ensure-workers; created at 0 when missing), `ENGINE_STREAM` (stream:exness),
//! `WORKER_BATCH_SIZE` (256), `WORKER_CONCURRENCY` (4).

use std::sync::mpsc;
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::Value;
use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::oneshot;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The service's users table (src/store/sqlite.rs, migration 1).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS users (
    user_id         TEXT PRIMARY KEY NOT NULL,
    email           TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_ensured_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)";

const UPSERT: &str = "INSERT INTO users (user_id, email) VALUES (?1, ?2)
    ON CONFLICT(user_id) DO UPDATE SET last_ensured_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
    RETURNING user_id, email";

/// One ingress entry: its stream id and the fields the drain uses.
struct Entry {
    id: String,
    request_id: String,
    user_id: String,
    email: String,
}

/// The Engine command, byte for byte as the Engine reads it.
#[derive(Serialize)]
struct EngineCommand<'a> {
    function: &'static str,
    #[serde(rename = "userId")]
    user_id: &'a str,
    #[serde(rename = "userEmail")]
    user_email: &'a str,
    #[serde(rename = "requestId")]
    request_id: &'a str,
}

/// (user_id, email) pairs in, the stored pairs out, in order.
type Batch = Vec<(String, String)>;
type Job = (Batch, oneshot::Sender<rusqlite::Result<Batch>>);

struct Settings {
    stream: String,
    group: String,
    engine_stream: String,
    batch: usize,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The entries of an XREADGROUP answer (RESP2 arrays or RESP3 maps). An entry deleted while
/// pending comes with no fields: it is kept (to be acknowledged) with empty values.
fn parse_entries(value: &Value) -> Vec<Entry> {
    let streams: Vec<&Value> = match value {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => Some(&kv[1]),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let Some(id) = parts.first().and_then(text) else {
                continue;
            };
            let mut e = Entry {
                id,
                request_id: String::new(),
                user_id: String::new(),
                email: String::new(),
            };
            if let Some(Value::Array(fields)) = parts.get(1) {
                for pair in fields.chunks_exact(2) {
                    let Value::BulkString(name) = &pair[0] else {
                        continue;
                    };
                    let slot = match name.as_slice() {
                        b"request_id" => &mut e.request_id,
                        b"user_id" => &mut e.user_id,
                        b"email" => &mut e.email,
                        _ => continue,
                    };
                    *slot = text(&pair[1]).unwrap_or_default();
                }
            }
            out.push(e);
        }
    }
    out
}

/// The SQLite thread: one transaction per batch, in the order the batches arrive.
fn sqlite_loop(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok((users, reply)) = jobs.recv() {
        let result = (|| {
            let tx = conn.transaction()?;
            let mut stored = Vec::with_capacity(users.len());
            {
                let mut upsert = tx.prepare_cached(UPSERT)?;
                for (user_id, email) in &users {
                    stored
                        .push(upsert.query_row([user_id, email], |r| Ok((r.get(0)?, r.get(1)?)))?);
                }
            }
            tx.commit()?;
            Ok(stored)
        })();
        let _ = reply.send(result);
    }
}

/// One consumer: read, store, publish, acknowledge, until the stream is empty for it.
async fn consume(
    name: String,
    mut queue: MultiplexedConnection,
    mut engine: MultiplexedConnection,
    store: mpsc::Sender<Job>,
    settings: &Settings,
) -> Result<u64, Error> {
    let mut done = 0u64;
    loop {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&settings.group)
            .arg(&name)
            .arg("COUNT")
            .arg(settings.batch)
            .arg("STREAMS")
            .arg(&settings.stream)
            .arg(">")
            .query_async(&mut queue)
            .await?;
        let entries = parse_entries(&reply);
        if entries.is_empty() {
            return Ok(done);
        }
        // Entries deleted while pending carry nothing to ensure; they are only acknowledged.
        let live: Vec<&Entry> = entries.iter().filter(|e| !e.user_id.is_empty()).collect();
        let users: Batch = live
            .iter()
            .map(|e| (e.user_id.clone(), e.email.clone()))
            .collect();
        let (reply, stored) = oneshot::channel();
        store
            .send((users, reply))
            .map_err(|_| "the SQLite thread stopped")?;
        let stored = stored.await.map_err(|_| "the SQLite thread stopped")??;

        let mut publish = redis::pipe();
        for (entry, (user_id, email)) in live.iter().zip(&stored) {
            let message = serde_json::to_string(&EngineCommand {
                function: "createUser",
                user_id,
                user_email: email,
                request_id: &entry.request_id,
            })?;
            publish
                .cmd("XADD")
                .arg(&settings.engine_stream)
                .arg("*")
                .arg("message")
                .arg(message)
                .ignore();
        }
        if !live.is_empty() {
            publish.query_async::<()>(&mut engine).await?;
        }

        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let mut ack = redis::pipe();
        ack.cmd("XACK")
            .arg(&settings.stream)
            .arg(&settings.group)
            .arg(&ids)
            .ignore()
            .cmd("XDEL")
            .arg(&settings.stream)
            .arg(&ids)
            .ignore();
        ack.query_async::<()>(&mut queue).await?;
        done += live.len() as u64;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let engine_url = env_or("ENGINE_REDIS_URL", &redis_url);
    let db_path = env_or("DATABASE_PATH", "./drain-limit.db");
    let settings: &'static Settings = Box::leak(Box::new(Settings {
        stream: env_or("ENSURE_STREAM", "stream:ensure-user"),
        group: env_or("ENSURE_GROUP", "ensure-workers"),
        engine_stream: env_or("ENGINE_STREAM", "stream:exness"),
        batch: env_or("WORKER_BATCH_SIZE", "256").parse()?,
    }));
    let consumers: usize = env_or("WORKER_CONCURRENCY", "4").parse()?;
    if settings.batch == 0 || consumers == 0 {
        return Err("WORKER_BATCH_SIZE and WORKER_CONCURRENCY must be at least 1".into());
    }

    let conn = Connection::open(&db_path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The service's page cache (16 MiB); checkpoints are SQLite's default (automatic).
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.execute_batch(SCHEMA)?;
    let (store, jobs) = mpsc::channel::<Job>();
    let writer = std::thread::spawn(move || sqlite_loop(conn, jobs));

    let queue_client = redis::Client::open(redis_url.as_str())?;
    let engine_client = redis::Client::open(engine_url.as_str())?;
    let engine = engine_client.get_multiplexed_async_connection().await?;
    let mut queue = Vec::with_capacity(consumers);
    for _ in 0..consumers {
        queue.push(queue_client.get_multiplexed_async_connection().await?);
    }
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&settings.stream)
        .arg(&settings.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut queue[0])
        .await;
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            return Err(e.into());
        }
    }

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(consumers);
    for (i, conn) in queue.into_iter().enumerate() {
        let name = format!("drain-limit-{}-{i}", std::process::id());
        tasks.push(tokio::spawn(consume(
            name,
            conn,
            engine.clone(),
            store.clone(),
            settings,
        )));
    }
    drop(store);
    let mut total = 0u64;
    for task in tasks {
        total += task.await??;
    }
    let seconds = start.elapsed().as_secs_f64();
    writer.join().map_err(|_| "the SQLite thread panicked")?;
    println!(
        "DRAIN_LIMIT entries={total} seconds={seconds:.3} rate={:.1}",
        total as f64 / seconds
    );
    Ok(())
}
