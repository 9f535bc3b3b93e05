//! Test harness: a `redis-server` per test, the application in-process or as the built
//! binary, tokens, and one helper per endpoint. Nothing here sleeps to synchronise: every
//! wait polls a condition until a deadline.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ensure_user::connection::{parse_entries, RawEntry};
use ensure_user::engine::stub::{self, StubSettings};
use ensure_user::http::auth::mint_token;
use ensure_user::queue::outcome::Waiters;
use ensure_user::worker::WorkerContext;
use ensure_user::{Application, Config, Mode};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-that-is-long-enough-for-hs256";
pub const ENSURE_PATH: &str = "/api/v1/auth/ensure-user";
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` until it returns `Some`, or panics with `what` after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(DEADLINE, what, check).await
}

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn within<T, F, Fut>(deadline: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    last_look(deadline, Duration::from_millis(25), check, Option::is_some)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for: {what}"))
}

/// Looks (every `interval`) until `done` holds for what `look` saw, or `deadline` has
/// passed; returns the last look either way, for a test that reports what it saw.
pub async fn last_look<T, F, Fut>(
    deadline: Duration,
    interval: Duration,
    mut look: F,
    done: impl Fn(&T) -> bool,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let until = Instant::now() + deadline;
    loop {
        let seen = look().await;
        if done(&seen) || Instant::now() >= until {
            return seen;
        }
        tokio::time::sleep(interval).await; // the poll interval, bounded by the deadline above
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A connection to a Redis at `url`, or `None` while it does not answer.
pub async fn redis_conn(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()
}

/// Waits until the Redis at `url` answers PING.
pub async fn wait_until_answers(url: &str) {
    eventually(&format!("{url} to answer"), || async {
        let mut conn = redis_conn(url).await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    })
    .await;
}

/// Every entry of `stream` on the server behind `conn`, oldest first.
pub async fn stream_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<RawEntry> {
    let value: redis::Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    parse_entries(&value)
}

/// A `redis-server` of the test's own, on a free port, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts one with extra `redis-server` arguments (e.g. AOF settings).
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server runs");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on the same port and data folder, and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--dir"])
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (see README: ./scripts/test installs it)");
        self.child = Some(child);
        let url = self.url();
        wait_until_answers(&url).await;
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Creates the workers' group on `stream` (and the stream), as a process would.
    pub async fn create_group(&self, stream: &str) {
        let mut conn = self.conn().await;
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg("ensure-workers")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// Queues an ingress entry of `user` by hand, as a listener would (nobody waits for it);
    /// returns its id.
    pub async fn add_request(&self, stream: &str, request_id: &str, user: &str) -> String {
        let mut conn = self.conn().await;
        redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("request_id")
            .arg(request_id)
            .arg("user_id")
            .arg(user)
            .arg("email")
            .arg(format!("{user}@example.com"))
            .arg("reply_to")
            .arg("")
            .arg("enqueued_at")
            .arg(ensure_user::clock::now_millis())
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Reads `stream`'s new entries as the group's consumer `consumer`.
    pub async fn read_as(&self, stream: &str, consumer: &str) -> Vec<RawEntry> {
        let mut conn = self.conn().await;
        let read: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("ensure-workers")
            .arg(consumer)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        ensure_user::connection::parse_read_reply(&read)
    }

    /// Hands entries of `stream` to the group's consumer `consumer` (`XCLAIM … 0`), as a
    /// consumer taking over stalled entries does (each claim is one more delivery), and
    /// returns the entries claimed.
    pub async fn claim_as(&self, stream: &str, consumer: &str, ids: &[&str]) -> Vec<RawEntry> {
        let claimed: redis::Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg("ensure-workers")
            .arg(consumer)
            .arg(0)
            .arg(ids)
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        ensure_user::connection::parse_entries(&claimed)
    }

    /// Every entry of a stream, oldest first.
    pub async fn entries(&self, stream: &str) -> Vec<RawEntry> {
        stream_entries(&mut self.conn().await, stream).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a test of the built binary runs against: its own queue and Engine Redis servers, a
/// SQLite path in a folder of its own, and the settings that point at them.
pub struct Stack {
    pub queue: RedisServer,
    pub engine: RedisServer,
    pub db: PathBuf,
    pub vars: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        let queue = RedisServer::start().await;
        let engine = RedisServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("users.db");
        let vars = test_vars(&queue, &engine, &db);
        Self {
            queue,
            engine,
            db,
            vars,
            dir,
        }
    }
}

/// Waits until the group has no entry read but unacknowledged.
pub async fn wait_nothing_pending(queue: &RedisServer) {
    eventually("nothing left pending", || async {
        (pending_count(queue).await == 0).then_some(())
    })
    .await;
}

/// Signs a token as the platform does (no `exp`).
pub fn token(user_id: &str, email: &str) -> String {
    mint_token(SECRET.as_bytes(), user_id, email, None).unwrap()
}

/// The settings a test app runs with; tests change what they need.
pub fn test_vars(queue: &RedisServer, engine: &RedisServer, db: &Path) -> Vec<(String, String)> {
    [
        ("LISTEN_ADDR", "127.0.0.1:0".to_string()),
        ("METRICS_ADDR", "127.0.0.1:0".to_string()),
        // Tests run side by side: the console's default port would be taken.
        ("ADMIN_ADDR", "127.0.0.1:0".to_string()),
        ("JWT_SECRET", SECRET.to_string()),
        ("REDIS_URL", queue.url()),
        ("ENGINE_REDIS_URL", engine.url()),
        ("DATABASE_PATH", db.display().to_string()),
        ("WORKER_BLOCK_MS", "200".to_string()),
        ("RETRY_INITIAL_MS", "20".to_string()),
        ("RETRY_MAX_MS", "200".to_string()),
        ("SHUTDOWN_GRACE_SECS", "5".to_string()),
        ("CLAIM_IDLE_MS", "1000".to_string()),
        ("ENSURE_WAIT_MS", "5000".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

pub fn set(vars: &mut Vec<(String, String)>, name: &str, value: &str) {
    vars.retain(|(k, _)| k != name);
    vars.push((name.to_string(), value.to_string()));
}

/// One application under test, with its own Redis servers and SQLite file.
pub struct TestApp {
    pub address: SocketAddr,
    pub metrics_address: SocketAddr,
    /// The console's address (tests run it on a port of its own).
    pub admin_address: Option<SocketAddr>,
    pub queue: RedisServer,
    /// The Engine's Redis: its own server, so a test can stop it alone.
    pub engine: RedisServer,
    pub db_path: PathBuf,
    pub client: reqwest::Client,
    /// Requests of the app's listener waiting for their outcome.
    pub waiters: std::sync::Arc<Waiters>,
    /// The worker step, when the app runs workers.
    pub worker: Option<std::sync::Arc<WorkerContext>>,
    pub stop: CancellationToken,
    pub running: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns `serve` in-process with settings changed by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Vec<(String, String)>)) -> TestApp {
    spawn_app_in(Mode::Serve, adjust).await
}

/// Spawns `serve` with `ENGINE_CONFIRM=ack` and these timings.
pub async fn spawn_ack_app(timeout_ms: u64, max_attempts: u32, wait_ms: u64) -> TestApp {
    spawn_app_with(|v| {
        set(v, "ENGINE_CONFIRM", "ack");
        set(v, "ENGINE_CONFIRM_TIMEOUT_MS", &timeout_ms.to_string());
        set(v, "ENGINE_CONFIRM_MAX_ATTEMPTS", &max_attempts.to_string());
        set(v, "ENSURE_WAIT_MS", &wait_ms.to_string());
    })
    .await
}

/// Spawns the app in `mode` with Redis servers of its own.
pub async fn spawn_app_in(mode: Mode, adjust: impl FnOnce(&mut Vec<(String, String)>)) -> TestApp {
    let queue = RedisServer::start().await;
    let engine = RedisServer::start().await;
    spawn_app_on(queue, engine, tempfile::tempdir().unwrap(), mode, adjust).await
}

/// Spawns the app in `mode` on these Redis servers, with its SQLite file under `dir`.
pub async fn spawn_app_on(
    queue: RedisServer,
    engine: RedisServer,
    dir: tempfile::TempDir,
    mode: Mode,
    adjust: impl FnOnce(&mut Vec<(String, String)>),
) -> TestApp {
    let db_path = dir.path().join("data").join("users.db");
    let mut vars = test_vars(&queue, &engine, &db_path);
    adjust(&mut vars);
    let config = Config::from_vars(vars).expect("test settings are valid");
    let app = Application::build(config, mode).await.expect("app builds");
    let address = app.address();
    let metrics_address = app.metrics_address();
    let admin_address = app.admin_address();
    let waiters = app.waiters();
    let worker = app.worker();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    TestApp {
        address,
        metrics_address,
        admin_address,
        queue,
        engine,
        db_path,
        client: reqwest::Client::new(),
        waiters,
        worker,
        stop,
        running,
        _dir: dir,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    /// `POST /api/v1/auth/ensure-user` with a bearer token.
    pub async fn ensure(&self, token: &str) -> reqwest::Response {
        self.ensure_with_header(Some(&format!("Bearer {token}")))
            .await
    }

    /// `POST /api/v1/auth/ensure-user` with this `Authorization` value (or none).
    pub async fn ensure_with_header(&self, authorization: Option<&str>) -> reqwest::Response {
        let mut req = self.client.post(self.url(ENSURE_PATH));
        if let Some(value) = authorization {
            req = req.header("Authorization", value);
        }
        req.send().await.expect("request sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    /// Every `(user_id, email)` row, ordered by user id.
    pub fn rows(&self) -> Vec<(String, String)> {
        rows(&self.db_path)
    }

    pub async fn engine_entries(&self) -> Vec<RawEntry> {
        self.engine.entries("stream:exness").await
    }

    /// Waits until the Engine stream has at least `n` entries, and returns them.
    pub async fn wait_for_engine_entries(&self, n: usize) -> Vec<RawEntry> {
        eventually(&format!("{n} Engine entries"), || async {
            let entries = self.engine_entries().await;
            (entries.len() >= n).then_some(entries)
        })
        .await
    }

    /// Waits until every entry was acknowledged (and so deleted) from the ingress stream.
    pub async fn wait_until_queue_is_empty(&self) {
        eventually("the ingress stream to be empty", || async {
            self.queue
                .entries("stream:ensure-user")
                .await
                .is_empty()
                .then_some(())
        })
        .await;
    }

    /// Stops the app as SIGTERM would, and waits for it to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.running.await.unwrap()
    }

    /// Stops the app and hands back its Redis servers and data folder, for a next app.
    pub async fn stop_keeping_data(self) -> (RedisServer, RedisServer, tempfile::TempDir) {
        self.stop.cancel();
        self.running.await.unwrap().unwrap();
        (self.queue, self.engine, self._dir)
    }

    /// When each entry of the ingress stream first failed (ms), from its failure history.
    pub async fn first_failures(&self) -> Vec<u64> {
        let mut conn = self.queue.conn().await;
        let history: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg("stream:ensure-user:failures")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        history
            .iter()
            .filter(|(k, _)| k.ends_with(":first"))
            .filter_map(|(_, v)| v.parse().ok())
            .collect()
    }

    /// The status record a 202's `Location` leads to, as its user reads it.
    pub async fn request_status(&self, location: &str, token: &str) -> Option<serde_json::Value> {
        let r = self
            .client
            .get(self.url(location))
            .bearer_auth(token)
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The worker step of an app that runs workers.
    pub fn worker_context(&self) -> std::sync::Arc<WorkerContext> {
        self.worker.clone().expect("the app runs workers")
    }

    /// The value of an unlabelled metric on this process's `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        metric_at(self.metrics_address, name).await
    }
}

/// Runs the reference Engine on the app's Engine Redis (from the stream's start) until the
/// returned token is cancelled; `without_ids` replies as the platform's older Engine.
/// (For the older Engine's reads too, see [`start_legacy_stub`].)
pub fn start_stub(app: &TestApp, without_ids: bool) -> CancellationToken {
    start_stub_dropping(app, without_ids, 0)
}

/// [`start_stub`] that drops its first `drop_replies` replies.
pub fn start_stub_dropping(
    app: &TestApp,
    without_ids: bool,
    drop_replies: u64,
) -> CancellationToken {
    spawn_stub(app, drop_replies, without_ids, false)
}

/// Runs the reference Engine as the platform's older Engine: reading with `XREAD … $`,
/// replying without ids. Returns once it is reading (the client list shows its XREAD), so
/// what is published next is seen.
pub async fn start_legacy_stub(app: &TestApp) -> CancellationToken {
    let stop = spawn_stub(app, 0, true, true);
    let conn = app.engine.conn().await;
    eventually("the legacy Engine to be reading", || {
        let mut conn = conn.clone();
        async move {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .ok()?;
            clients.contains("cmd=xread").then_some(())
        }
    })
    .await;
    stop
}

fn spawn_stub(
    app: &TestApp,
    drop_replies: u64,
    without_ids: bool,
    legacy: bool,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let engine =
        ensure_user::connection::connect(&app.engine.url(), Duration::from_secs(3)).unwrap();
    tokio::spawn(stub::run(
        engine,
        StubSettings {
            engine_stream: "stream:exness".into(),
            reply_stream: "stream:exnessReceive".into(),
            drop_replies,
            from_start: !legacy,
            without_ids,
            reads_from_dollar: legacy,
        },
        stop.clone(),
    ));
    stop
}

/// The value of an unlabelled metric on the `/metrics` at `address` (0 when absent).
pub async fn metric_at(address: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("metrics answered")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// SQLite: makes the database refuse the user `poison`, as a constraint the service does
/// not know would; [`REPAIR_POISON_SQL`] undoes it.
pub const REFUSE_POISON_SQL: &str = "CREATE TRIGGER refuse_poison BEFORE INSERT ON users
     WHEN NEW.user_id = 'poison' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;";
pub const REPAIR_POISON_SQL: &str = "DROP TRIGGER refuse_poison";

/// Runs [`REFUSE_POISON_SQL`] on the SQLite file at `db`.
pub fn refuse_poison(db: &std::path::Path) {
    run_sql(db, REFUSE_POISON_SQL);
}

/// Runs [`REPAIR_POISON_SQL`] on the SQLite file at `db`.
pub fn repair_poison(db: &std::path::Path) {
    run_sql(db, REPAIR_POISON_SQL);
}

/// Runs `sql` on the SQLite file at `db`, as an operator with `sqlite3` would.
pub fn run_sql(db: &std::path::Path, sql: &str) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

/// Sends `request` and reads its answer's body as text.
pub async fn text_of(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

/// `chromium` for a browser test; `None` (the test skips, saying so) when it is not
/// installed, except in CI (`CI` set), where a missing browser fails the test.
pub fn chromium_or_skip(test: &str) -> Option<String> {
    let found = find_chromium();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and chromium is missing: scripts/install-deps installs it"
        );
        eprintln!("{test} SKIPPED: chromium is not installed (apt-get install chromium); in CI (CI set) this fails");
    }
    found
}

/// `chromium` on `PATH`, if any.
pub fn find_chromium() -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

pub fn rows(db: &Path) -> Vec<(String, String)> {
    if !db.exists() {
        return Vec::new();
    }
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT user_id, email FROM users ORDER BY user_id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The `message` field of an Engine entry, checking it is the entry's only field.
pub fn engine_message(entry: &RawEntry) -> String {
    let fields = entry.fields.as_ref().expect("entry has fields");
    assert_eq!(
        fields.len(),
        1,
        "an Engine entry has exactly one field: {fields:?}"
    );
    assert_eq!(fields[0].0, b"message");
    String::from_utf8(fields[0].1.clone()).unwrap()
}

/// The user ids of every `createUser` on the Engine stream, in stream order.
pub async fn published_users(engine: &RedisServer) -> Vec<String> {
    engine
        .entries("stream:exness")
        .await
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&engine_message(e)).ok())
        .filter_map(|v| v["userId"].as_str().map(str::to_string))
        .collect()
}

/// POSTs an ensure for `user` (email `<user>@example.com`) with its token.
pub async fn post_ensure(
    client: &reqwest::Client,
    address: SocketAddr,
    user: &str,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("http://{address}{ENSURE_PATH}"))
        .bearer_auth(token(user, &format!("{user}@example.com")))
        .send()
        .await
}

/// The exact command the Engine must receive.
pub fn expected_command(user_id: &str, email: &str, request_id: &str) -> String {
    format!(
        r#"{{"function":"createUser","userId":"{user_id}","userEmail":"{email}","requestId":"{request_id}"}}"#
    )
}

/// The built `ensure-user` binary, run as a child process with the given settings. Its
/// log (stderr) goes to a file, so a chatty process can never block on a full pipe.
pub struct Process {
    pub child: Child,
    pub address: SocketAddr,
    pub metrics_address: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Process {
    pub async fn spawn(args: &[&str], vars: &[(String, String)]) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let port = free_port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let metrics_address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ensure-user"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Processes run side by side: no console unless a test asks for one.
            .env("ADMIN_ADDR", "off")
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("LISTEN_ADDR", address.to_string())
            .env("METRICS_ADDR", metrics_address.to_string())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let process = Self {
            child,
            address,
            metrics_address,
            log,
        };
        let client = reqwest::Client::new();
        let url = format!("http://{address}/healthz");
        eventually("the process to answer /healthz", || async {
            client
                .get(&url)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        })
        .await;
        process
    }

    /// Sends SIGTERM and returns the exit status and the whole log once it has exited.
    pub async fn terminate_with_logs(self) -> (std::process::ExitStatus, String) {
        let log = self.log.reopen().unwrap();
        let status = self.terminate().await;
        (status, std::io::read_to_string(log).unwrap())
    }

    /// Sends SIGTERM and returns the exit status once the process has exited.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        eventually("the process to exit", || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }
}

impl Process {
    /// `kill -9`: no shutdown, no cleanup, whatever was in flight stays where it was.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's log (stderr) so far, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

/// Runs a one-shot command of the binary (e.g. `dead-letters list`), asserts it succeeded,
/// and returns its stdout.
pub fn run_cli(args: &[&str], vars: &[(String, String)]) -> String {
    let output = run_cli_output(args, vars);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs a one-shot command of the binary and returns how it ended, successful or not.
pub fn run_cli_output(args: &[&str], vars: &[(String, String)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ensure-user"))
        .args(args)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs a one-shot command of the binary with `input` on its stdin; returns how it ended.
pub fn run_cli_with_stdin(
    args: &[&str],
    vars: &[(String, String)],
    input: &[u8],
) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ensure-user"))
        .args(args)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Written from a thread of its own: a child that answers before reading all its input
    // must not deadlock on a full pipe either way.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    let _ = writer.join(); // a child that stopped reading early is the test's to judge
    output
}

/// Entries read by the group but not acknowledged, by consumer name.
pub async fn pending_by_consumer(queue: &RedisServer) -> Vec<(String, u64)> {
    let mut conn = queue.conn().await;
    let summary: redis::Value = match redis::cmd("XPENDING")
        .arg("stream:ensure-user")
        .arg("ensure-workers")
        .query_async(&mut conn)
        .await
    {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let redis::Value::Array(parts) = summary else {
        return Vec::new();
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return Vec::new();
    };
    consumers
        .iter()
        .filter_map(|c| {
            let redis::Value::Array(kv) = c else {
                return None;
            };
            let name: String = redis::from_redis_value_ref(kv.first()?).ok()?;
            let count: String = redis::from_redis_value_ref(kv.get(1)?).ok()?;
            Some((name, count.parse().ok()?))
        })
        .collect()
}

/// Total of [`pending_by_consumer`].
pub async fn pending_count(queue: &RedisServer) -> u64 {
    pending_by_consumer(queue)
        .await
        .iter()
        .map(|(_, n)| n)
        .sum()
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database of the test's own: a SQLite file, or a PostgreSQL schema (in the machine's
/// `test` database, dropped when the test ends).
pub enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres { schema: String, url: String },
}

/// The PostgreSQL the tests use (`TEST_DATABASE_URL` overrides it); the password only
/// matters where the server asks for one (`scripts/test` sets it on a fresh machine).
pub static POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/test".into())
});

impl TestDb {
    pub fn sqlite() -> Self {
        TestDb::Sqlite(tempfile::tempdir().unwrap())
    }

    pub async fn postgres() -> Self {
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&POSTGRES, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL must listen on 127.0.0.1:5432 (see README: Development)");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let url = format!("{}?options=-csearch_path%3D{schema}", *POSTGRES);
        TestDb::Postgres { schema, url }
    }

    pub fn url(&self) -> Option<&str> {
        match self {
            TestDb::Sqlite(_) => None,
            TestDb::Postgres { url, .. } => Some(url),
        }
    }

    pub async fn open(&self) -> ensure_user::store::Store {
        self.open_with(ensure_user::store::StoreOptions::with_pool_size(8))
            .await
    }

    pub async fn open_with(
        &self,
        options: ensure_user::store::StoreOptions,
    ) -> ensure_user::store::Store {
        let path = match self {
            TestDb::Sqlite(dir) => dir.path().join("users.db"),
            TestDb::Postgres { .. } => PathBuf::from("unused"),
        };
        ensure_user::store::Store::open(self.url(), &path, options)
            .await
            .unwrap()
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(self.url().unwrap(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    pub async fn rows(&self) -> Vec<(String, String)> {
        match self {
            TestDb::Sqlite(dir) => rows(&dir.path().join("users.db")),
            TestDb::Postgres { .. } => self
                .client()
                .await
                .query("SELECT user_id, email FROM users ORDER BY user_id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        }
    }

    /// Makes the database refuse rows of `user_id`, as a constraint the service does not know.
    pub async fn refuse(&self, user_id: &str) {
        match self {
            TestDb::Sqlite(dir) => rusqlite::Connection::open(dir.path().join("users.db"))
                .unwrap()
                .execute_batch(&format!(
                    "CREATE TRIGGER refuse BEFORE INSERT ON users WHEN NEW.user_id = '{user_id}'
                     BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
                ))
                .unwrap(),
            TestDb::Postgres { .. } => self
                .client()
                .await
                .batch_execute(&format!(
                    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN
                       IF NEW.user_id = '{user_id}' THEN RAISE EXCEPTION 'refused by the test'; END IF;
                       RETURN NEW; END $$ LANGUAGE plpgsql;
                     CREATE TRIGGER refuse BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse();"
                ))
                .await
                .unwrap(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { schema, .. } = self {
            let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
            // Drop runs inside the test's runtime; a thread of its own may block.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let (client, conn) = tokio_postgres::connect(&POSTGRES, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                    tokio::spawn(conn);
                    client.batch_execute(&sql).await.ok()
                })
            })
            .join();
        }
    }
}
