//! A bounded chaos soak of ensure-user: `scripts/soak [--seconds N]` (or `cargo run --release
//! --example soak -- [--seconds N]`). Not part of the test suite; all traffic stays on
//! 127.0.0.1.
//!
//! Two phases, each `--seconds` long (default 60), each with redis-servers of its own (the
//! queue's with AOF, `appendfsync always`; the Engine's without persistence) and a SQLite file
//! of its own, in a temporary folder:
//!
//! - A: one `ensure-user serve`;
//! - B: one `ensure-user listen` and two `ensure-user work`.
//!
//! 64 keep-alive clients POST `/api/v1/auth/ensure-user`, every request for a user of its
//! own, while the soak SIGKILLs a service process every 15 s (restarting it at once on the
//! same address), SIGKILLs the queue's Redis once (restarted on the same port and folder, so
//! its AOF replays) and SIGSTOPs the Engine's Redis for 10 s. Then it waits until the queue
//! has drained, stops the processes with SIGTERM, and checks that every request answered
//! 2xx has its SQLite row and a `createUser` on the Engine stream.
//!
//! Prints `accepted N, lost L, duplicated D (after kills K)` per phase and in total. Exits 1
//! when an accepted request was lost, 2 when the soak itself could not run; duplicates are
//! reported, never failed. The service binary is `target/release/ensure-user` next to this
//! example, or `ENSURE_USER_BIN`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ensure_user::clock::now_millis;
use ensure_user::connection::{parse_entries, RawEntry};
use ensure_user::http::auth::mint_token;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

/// The HS256 secret the service and the clients share (40 characters).
const SECRET: &str = "soak-secret-0123456789-abcdefghij-KLMNOP";
const ENSURE_PATH: &str = "/api/v1/auth/ensure-user";
const INGRESS_STREAM: &str = "stream:ensure-user";
const DEAD_STREAM: &str = "stream:ensure-user:dead";
const GROUP: &str = "ensure-workers";
const ENGINE_STREAM: &str = "stream:exness";

const CLIENTS: usize = 64;
const FIRST_KILL: Duration = Duration::from_millis(7_500);
const KILL_EVERY: Duration = Duration::from_secs(15);
/// How far a publication may come before a kill's recorded time and still be its victim
/// (the kill is recorded just after the signal).
const KILL_SLACK_MS: u64 = 50;
/// How long after SIGCONT the Engine's Redis may still be running what was sent while it
/// was paused.
const PAUSE_WAKE_MS: u64 = 2_000;
const ENGINE_OUTAGE: Duration = Duration::from_secs(10);

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const START_DEADLINE: Duration = Duration::from_secs(30);
const REDIS_DEADLINE: Duration = Duration::from_secs(60);
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
const STOP_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);
/// Pause of a client after a failed connection, so a dead listener is not spun on.
const RETRY_PACE: Duration = Duration::from_millis(10);
/// Engine stream entries read per XRANGE.
const PAGE: usize = 10_000;

#[derive(Debug, Parser)]
#[command(
    name = "soak",
    about = "Chaos soak of ensure-user: kills processes and Redis under load, then checks that nothing answered 2xx was lost."
)]
struct Args {
    /// Length of each of the two phases, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=600))]
    seconds: u64,
    /// Keep the temporary folder (logs, SQLite, Redis files) even when nothing was lost.
    #[arg(long)]
    keep: bool,
}

/// One phase: which processes run; the first one is where the clients send requests.
struct PhaseSpec {
    label: &'static str,
    /// `(name, subcommand)` of each service process.
    services: &'static [(&'static str, &'static str)],
}

const PHASES: [PhaseSpec; 2] = [
    PhaseSpec {
        label: "A",
        services: &[("serve", "serve")],
    },
    PhaseSpec {
        label: "B",
        services: &[("listen", "listen"), ("work-1", "work"), ("work-2", "work")],
    },
];

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let root = match tempfile::Builder::new()
        .prefix("ensure-user-soak-")
        .tempdir()
    {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("soak: cannot make a temporary folder: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match run(&args, root.path()).await {
        Ok(total) if total.lost == 0 => 0,
        Ok(_) => 1,
        Err(e) => {
            eprintln!("soak: {e:#}");
            2
        }
    };
    if args.keep || code != 0 {
        println!(
            "kept {} (service logs: phase-*/*.log)",
            root.keep().display()
        );
    }
    ExitCode::from(code)
}

/// Both phases, one after the other; returns the total.
async fn run(args: &Args, root: &Path) -> Result<Tally> {
    let bin = service_binary()?;
    println!(
        "soak: {} ({} s per phase, {CLIENTS} clients), work folder {}",
        bin.display(),
        args.seconds,
        root.display()
    );
    let began = Instant::now();
    let mut total = Tally::default();
    for spec in &PHASES {
        let dir = root.join(format!("phase-{}", spec.label));
        let report = run_phase(spec, args, &bin, &dir).await?;
        report.print();
        total.add(&report.tally);
    }
    println!("\n== total ==");
    total.print();
    println!("  elapsed {:.1} s", began.elapsed().as_secs_f64());
    Ok(total)
}

/// `ENSURE_USER_BIN`, or `ensure-user` in the folder above this example's.
fn service_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ENSURE_USER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find the soak's own path")?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("ensure-user"))
        .context("the soak binary has no folder above its own")?;
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build --release --bin ensure-user) or set ENSURE_USER_BIN",
            path.display()
        );
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------
// One phase

async fn run_phase(spec: &PhaseSpec, args: &Args, bin: &Path, dir: &Path) -> Result<PhaseReport> {
    let began = Instant::now();
    let names: Vec<_> = spec.services.iter().map(|(name, _)| *name).collect();
    println!("\n== phase {}: {} ==", spec.label, names.join(" + "));
    let mut stack = Stack::start(spec, bin, dir).await?;
    let length = Duration::from_secs(args.seconds);
    let load = Load::start(spec.label, stack.entry_url())?;
    let events = schedule(length, stack.services.len());
    let chaos = match run_chaos(&mut stack, &events, load.started).await {
        Ok(chaos) => chaos,
        Err(e) => {
            let _ = load.stop().await;
            return Err(e.context(format!("phase {}: chaos", spec.label)));
        }
    };
    tokio::time::sleep_until((load.started + length).into()).await; // the phase's length
    let load_time = load.started.elapsed();
    let attempts = load.stop().await?;
    let drain = wait_drained(&stack.queue.url()).await;
    let problems = stack.stop_services().await;
    let evidence = Evidence::gather(&stack).await?;
    let (tally, lost_examples) = tally(spec.label, &attempts, &evidence, &chaos);
    Ok(PhaseReport {
        tally,
        lost_examples,
        drain,
        problems,
        dead_letters: evidence.dead_letters,
        load_time,
        elapsed: began.elapsed(),
    })
}

/// Two redis-servers, the phase's service processes, and where SQLite keeps the users.
struct Stack {
    queue: RedisServer,
    engine: RedisServer,
    services: Vec<Service>,
    db: PathBuf,
    /// A client for `/healthz`, apart from the load's pool.
    health: reqwest::Client,
}

impl Stack {
    async fn start(spec: &PhaseSpec, bin: &Path, dir: &Path) -> Result<Self> {
        let queue_args = ["--appendonly", "yes", "--appendfsync", "always"];
        let queue = RedisServer::start("queue", dir.join("queue-redis"), &queue_args).await?;
        let engine = RedisServer::start("engine", dir.join("engine-redis"), &[]).await?;
        let db = dir.join("users.db");
        let vars = base_vars(&queue, &engine, &db);
        let health = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let mut services = Vec::new();
        for (name, command) in spec.services {
            let mut service = Service::new(name, command, bin, &vars, dir)?;
            service.start(&health, "start").await?;
            services.push(service);
        }
        Ok(Self {
            queue,
            engine,
            services,
            db,
            health,
        })
    }

    fn entry_url(&self) -> String {
        format!("http://{}{ENSURE_PATH}", self.services[0].address)
    }

    /// SIGTERMs every service process; returns what went wrong, if anything.
    async fn stop_services(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for service in &mut self.services {
            match service.terminate().await {
                Ok(status) if status.success() => {}
                Ok(status) => problems.push(format!(
                    "{} exited with {status} after SIGTERM (log: {})",
                    service.name,
                    service.log.display()
                )),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        problems
    }
}

/// The settings every service process of a phase shares (`LISTEN_ADDR` and `METRICS_ADDR`
/// are each process's own).
fn base_vars(queue: &RedisServer, engine: &RedisServer, db: &Path) -> Vec<(String, String)> {
    [
        ("JWT_SECRET", SECRET.to_string()),
        ("REDIS_URL", queue.url()),
        ("ENGINE_REDIS_URL", engine.url()),
        ("DATABASE_PATH", db.display().to_string()),
        ("CLAIM_IDLE_MS", "2000".to_string()),
        ("RETRY_INITIAL_MS", "50".to_string()),
        ("RETRY_MAX_MS", "500".to_string()),
        ("ENSURE_WAIT_MS", "2000".to_string()),
        ("SHUTDOWN_GRACE_SECS", "5".to_string()),
        ("PATH", std::env::var("PATH").unwrap_or_default()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect()
}

// ---------------------------------------------------------------------------------------
// Processes

/// A port nobody listens on right now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `kill -<signal> <pid>`.
fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed: {status}");
    }
    Ok(())
}

/// SIGKILLs a child and reaps it.
fn kill9(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Calls `check` every [`POLL`] until it gives a value, or `None` after `deadline`.
async fn poll_until<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(POLL).await; // poll interval, bounded by the deadline
    }
}

/// A `redis-server` of the soak's own on 127.0.0.1, killed when dropped.
struct RedisServer {
    name: &'static str,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    async fn start(name: &'static str, dir: PathBuf, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
        let mut server = Self {
            name,
            port: free_port()?,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Starts it on its port and folder, and waits until it answers PING (after any AOF replay).
    async fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "cannot start redis-server (is it on PATH? scripts/install-deps installs it)",
            )?;
        self.child = Some(child);
        let url = self.url();
        let answered = poll_until(REDIS_DEADLINE, || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
        if answered.is_none() {
            bail!(
                "the {} redis-server on port {} did not answer within {REDIS_DEADLINE:?} (log: {})",
                self.name,
                self.port,
                self.log().display()
            );
        }
        Ok(())
    }

    fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .with_context(|| format!("the {} redis-server is not running", self.name))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

/// A connection to the Redis at `url`, or `None` while it does not answer.
async fn redis_conn(url: &str) -> Option<MultiplexedConnection> {
    let client = redis::Client::open(url).ok()?;
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

async fn ping(url: &str) -> Option<()> {
    let mut conn = redis_conn(url).await?;
    let ping = redis::cmd("PING");
    let reply = ping.query_async::<String>(&mut conn);
    let pong = tokio::time::timeout(Duration::from_secs(2), reply)
        .await
        .ok()?
        .ok()?;
    (pong == "PONG").then_some(())
}

/// One `ensure-user` process; restarted with the same settings (and address) after a kill.
/// Its stdout and stderr are appended to `<name>.log`.
struct Service {
    name: &'static str,
    command: &'static str,
    bin: PathBuf,
    vars: Vec<(String, String)>,
    address: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn new(
        name: &'static str,
        command: &'static str,
        bin: &Path,
        base: &[(String, String)],
        dir: &Path,
    ) -> Result<Self> {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut vars = base.to_vec();
        vars.push(("LISTEN_ADDR".into(), address.to_string()));
        vars.push(("METRICS_ADDR".into(), format!("127.0.0.1:{}", free_port()?)));
        // Several processes on one host: no console (its default port would clash).
        vars.push(("ADMIN_ADDR".into(), "off".into()));
        Ok(Self {
            name,
            command,
            bin: bin.to_path_buf(),
            vars,
            address,
            log: dir.join(format!("{name}.log")),
            child: None,
        })
    }

    /// Starts the process and waits until `/healthz` answers 200.
    async fn start(&mut self, health: &reqwest::Client, note: &str) -> Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        writeln!(log, "==== soak: {note} ====")?;
        let child = Command::new(&self.bin)
            .arg(self.command)
            .env_clear()
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_healthy(health).await
    }

    async fn wait_healthy(&mut self, health: &reqwest::Client) -> Result<()> {
        let url = format!("http://{}/healthz", self.address);
        let child = self.child.as_mut().context("not started")?;
        let outcome = poll_until(START_DEADLINE, || {
            let exited = child.try_wait().ok().flatten();
            let request = health.get(&url).send();
            async move {
                if let Some(status) = exited {
                    return Some(Err(status));
                }
                match request.await {
                    Ok(response) if response.status() == 200 => Some(Ok(())),
                    _ => None,
                }
            }
        })
        .await;
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(status)) => bail!(
                "{} exited with {status} while starting (log: {})",
                self.name,
                self.log.display()
            ),
            None => bail!(
                "{} did not answer /healthz within {START_DEADLINE:?} (log: {})",
                self.name,
                self.log.display()
            ),
        }
    }

    fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// SIGTERM, then waits for the exit; SIGKILLs it when it does not come in time.
    async fn terminate(&mut self) -> Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("{} is not running", self.name))?;
        send_signal(child.id(), "TERM")?;
        let exited = poll_until(STOP_DEADLINE, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        match exited {
            Some(status) => {
                self.child = None;
                Ok(status)
            }
            None => {
                self.kill9();
                bail!(
                    "{} did not exit within {STOP_DEADLINE:?} of SIGTERM; killed (log: {})",
                    self.name,
                    self.log.display()
                )
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------
// Chaos

#[derive(Debug, Clone, Copy)]
enum Action {
    /// SIGKILL the service process of this index and restart it.
    KillService(usize),
    /// SIGKILL the queue's Redis and restart it (its AOF replays).
    KillQueue,
    /// SIGSTOP the Engine's Redis, SIGCONT it this much later.
    PauseEngine(Duration),
}

/// When what happens in a phase of `length`: a service kill every 15 s (round robin), the
/// queue Redis kill half-way, the Engine outage from 60 % (ending by the phase's end).
fn schedule(length: Duration, services: usize) -> Vec<(Duration, Action)> {
    let mut events = Vec::new();
    let mut at = FIRST_KILL;
    let mut victim = 0;
    while at + Duration::from_secs(3) < length {
        events.push((at, Action::KillService(victim % services)));
        victim += 1;
        at += KILL_EVERY;
    }
    events.push((length / 2, Action::KillQueue));
    let outage = ENGINE_OUTAGE.min(length / 3);
    let pause = length.mul_f64(0.6).min(length - outage);
    events.push((pause, Action::PauseEngine(outage)));
    events.sort_by_key(|(at, _)| *at);
    events
}

/// What the chaos did: the kills (service processes and Redis) it counted.
struct Chaos {
    kills: u64,
    /// Wall-clock milliseconds of each kill, to tell which duplicates a kill explains.
    kill_times: Vec<u64>,
    /// Wall-clock milliseconds of the Engine's pause: `(SIGSTOP, SIGCONT)`.
    engine_pause: Option<(u64, u64)>,
}

/// Runs the schedule from `started`; every restart waits until the process answers.
async fn run_chaos(
    stack: &mut Stack,
    events: &[(Duration, Action)],
    started: Instant,
) -> Result<Chaos> {
    let mut chaos = Chaos {
        kills: 0,
        kill_times: Vec::new(),
        engine_pause: None,
    };
    let mut resume: Option<JoinHandle<Result<u64>>> = None;
    let mut paused_at = 0;
    for &(at, action) in events {
        tokio::time::sleep_until((started + at).into()).await; // the chaos schedule's pace
        let t = started.elapsed();
        let line = match action {
            Action::KillService(index) => {
                chaos.kills += 1;
                chaos.kill_times.push(now_millis());
                let service = &mut stack.services[index];
                service.kill9();
                let note = format!("restart after SIGKILL at t={:.1}s", t.as_secs_f64());
                service.start(&stack.health, &note).await?;
                format!(
                    "SIGKILL {}; back on {} after {:.1} s",
                    service.name,
                    service.address,
                    (started.elapsed() - t).as_secs_f64()
                )
            }
            Action::KillQueue => {
                chaos.kills += 1;
                chaos.kill_times.push(now_millis());
                kill9(&mut stack.queue.child);
                stack.queue.spawn().await?;
                format!(
                    "SIGKILL queue redis-server; AOF replayed, answering after {:.1} s",
                    (started.elapsed() - t).as_secs_f64()
                )
            }
            Action::PauseEngine(outage) => {
                let pid = stack.engine.pid()?;
                send_signal(pid, "STOP")?;
                paused_at = now_millis();
                resume = Some(tokio::spawn(async move {
                    tokio::time::sleep(outage).await; // the outage's length
                    send_signal(pid, "CONT")?;
                    let resumed_at = now_millis();
                    let t = started.elapsed().as_secs_f64();
                    println!("  t={t:>5.1}s  SIGCONT engine redis-server");
                    Ok(resumed_at)
                }));
                format!(
                    "SIGSTOP engine redis-server for {:.1} s",
                    outage.as_secs_f64()
                )
            }
        };
        println!("  t={:>5.1}s  {line}", t.as_secs_f64());
    }
    if let Some(resume) = resume {
        let resumed_at = resume.await.context("the SIGCONT task failed")??;
        chaos.engine_pause = Some((paused_at, resumed_at));
    }
    Ok(chaos)
}

// ---------------------------------------------------------------------------------------
// Load

fn user_id(phase: &str, n: u64) -> String {
    format!("soak-{}-{n}", phase.to_ascii_lowercase())
}

fn email_of(user_id: &str) -> String {
    format!("{user_id}@soak.test")
}

/// What one request got.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// 2xx; `body_ok` when the body names the user and a request id.
    Accepted { status: u16, body_ok: bool },
    /// Any other status.
    Refused(u16),
    /// No answer: the connection failed or the request timed out.
    Failed(&'static str),
}

/// One request: the user's number in the phase, and what it got.
struct Attempt {
    n: u64,
    outcome: Outcome,
}

struct Shared {
    client: reqwest::Client,
    url: String,
    phase: &'static str,
    next: AtomicU64,
    stop: AtomicBool,
}

/// [`CLIENTS`] tasks sending requests, each for a new user, until stopped.
struct Load {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<Vec<Attempt>>>,
    started: Instant,
}

impl Load {
    fn start(phase: &'static str, url: String) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(CLIENTS)
            .build()?;
        let shared = Arc::new(Shared {
            client,
            url,
            phase,
            next: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let tasks = (0..CLIENTS)
            .map(|_| tokio::spawn(client_loop(shared.clone())))
            .collect();
        Ok(Self {
            shared,
            tasks,
            started: Instant::now(),
        })
    }

    /// Stops sending, waits for the requests in flight, and returns every attempt.
    async fn stop(self) -> Result<Vec<Attempt>> {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut attempts = Vec::new();
        for task in self.tasks {
            attempts.extend(task.await.context("a client task failed")?);
        }
        Ok(attempts)
    }
}

async fn client_loop(shared: Arc<Shared>) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        let n = shared.next.fetch_add(1, Ordering::SeqCst);
        let outcome = ensure(&shared, &user_id(shared.phase, n)).await;
        if matches!(outcome, Outcome::Failed(_)) {
            tokio::time::sleep(RETRY_PACE).await; // pace against a listener that is down
        }
        attempts.push(Attempt { n, outcome });
    }
    attempts
}

/// `POST /api/v1/auth/ensure-user` for `user`, with a token of the platform's form.
async fn ensure(shared: &Shared, user: &str) -> Outcome {
    let Ok(token) = mint_token(SECRET.as_bytes(), user, &email_of(user), None) else {
        return Outcome::Failed("token errors");
    };
    let sent = shared
        .client
        .post(&shared.url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Outcome::Failed("timeouts"),
        Err(e) if e.is_connect() => return Outcome::Failed("connection refused"),
        Err(_) => return Outcome::Failed("connections lost"),
    };
    let status = response.status().as_u16();
    if !response.status().is_success() {
        let _ = response.bytes().await;
        return Outcome::Refused(status);
    }
    let body_ok = response
        .json::<serde_json::Value>()
        .await
        .is_ok_and(|body| body["userId"] == user && body["requestId"].is_string());
    Outcome::Accepted { status, body_ok }
}

// ---------------------------------------------------------------------------------------
// Draining and evidence

enum Drain {
    Done(Duration),
    TimedOut {
        xlen: Option<u64>,
        pending: Option<u64>,
    },
}

/// Waits until the ingress stream is empty and the group has nothing pending.
async fn wait_drained(url: &str) -> Drain {
    let began = Instant::now();
    let drained = poll_until(DRAIN_DEADLINE, || {
        let url = url.to_string();
        async move {
            let (xlen, pending) = backlog(&url).await;
            (xlen == Some(0) && pending == Some(0)).then_some(())
        }
    })
    .await;
    match drained {
        Some(()) => Drain::Done(began.elapsed()),
        None => {
            let (xlen, pending) = backlog(url).await;
            Drain::TimedOut { xlen, pending }
        }
    }
}

/// `XLEN` of the ingress stream and the group's pending count (`None`: no answer).
async fn backlog(url: &str) -> (Option<u64>, Option<u64>) {
    let Some(mut conn) = redis_conn(url).await else {
        return (None, None);
    };
    let xlen: Option<u64> = redis::cmd("XLEN")
        .arg(INGRESS_STREAM)
        .query_async(&mut conn)
        .await
        .ok();
    let summary = redis::cmd("XPENDING")
        .arg(INGRESS_STREAM)
        .arg(GROUP)
        .query_async::<redis::Value>(&mut conn)
        .await;
    let pending = match summary {
        Ok(redis::Value::Array(parts)) => match parts.first() {
            Some(redis::Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        },
        // No stream at all (nothing was ever queued): nothing is pending either.
        Err(e) if xlen == Some(0) && e.code() == Some("NOGROUP") => Some(0),
        _ => None,
    };
    (xlen, pending)
}

/// What the phase left behind: SQLite rows and the Engine's `createUser` entries.
struct Evidence {
    /// `user_id` → `email`.
    rows: HashMap<String, String>,
    /// `userId` → how many well-formed `createUser` entries name it.
    /// Per user, when the Engine's Redis stored each of its `createUser` (entry id ms).
    created: HashMap<String, Vec<u64>>,
    /// Engine entries that are not a well-formed `createUser` of a soak user.
    malformed: u64,
    dead_letters: Option<u64>,
}

impl Evidence {
    async fn gather(stack: &Stack) -> Result<Self> {
        let rows = read_rows(&stack.db)?;
        let (created, malformed) = read_engine(&stack.engine.url()).await?;
        let dead_letters = match redis_conn(&stack.queue.url()).await {
            Some(mut conn) => redis::cmd("XLEN")
                .arg(DEAD_STREAM)
                .query_async(&mut conn)
                .await
                .ok(),
            None => None,
        };
        Ok(Self {
            rows,
            created,
            malformed,
            dead_letters,
        })
    }
}

fn read_rows(db: &Path) -> Result<HashMap<String, String>> {
    if !db.exists() {
        return Ok(HashMap::new());
    }
    let conn =
        rusqlite::Connection::open(db).with_context(|| format!("cannot open {}", db.display()))?;
    let mut statement = conn.prepare("SELECT user_id, email FROM users")?;
    let rows = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<HashMap<String, String>>>()?;
    Ok(rows)
}

/// Reads the whole Engine stream, page by page.
async fn read_engine(url: &str) -> Result<(HashMap<String, Vec<u64>>, u64)> {
    let mut conn = redis_conn(url)
        .await
        .context("the Engine's Redis does not answer")?;
    let mut created = HashMap::new();
    let mut malformed = 0;
    let mut start = "-".to_string();
    loop {
        let page: redis::Value = redis::cmd("XRANGE")
            .arg(ENGINE_STREAM)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut conn)
            .await
            .context("XRANGE of the Engine stream")?;
        let entries = parse_entries(&page);
        for entry in &entries {
            match created_user(entry) {
                Some(user) => created
                    .entry(user)
                    .or_insert_with(Vec::new)
                    .push(entry.id_millis().unwrap_or(0)),
                None => malformed += 1,
            }
        }
        match entries.last() {
            Some(last) if entries.len() == PAGE => start = format!("({}", last.id),
            _ => break,
        }
    }
    Ok((created, malformed))
}

/// The user of an entry whose only field `message` is
/// `{"function":"createUser","userId":…,"userEmail":…,"requestId":…}` with the user's email.
fn created_user(entry: &RawEntry) -> Option<String> {
    let fields = entry.fields.as_ref()?;
    let [(name, message)] = fields.as_slice() else {
        return None;
    };
    let json: serde_json::Value = serde_json::from_slice(message).ok()?;
    let user = json.get("userId")?.as_str()?;
    let well_formed = name.as_slice() == b"message"
        && json.as_object()?.len() == 4
        && json.get("function")?.as_str()? == "createUser"
        && json.get("userEmail")?.as_str()? == email_of(user)
        && json
            .get("requestId")?
            .as_str()
            .is_some_and(|r| !r.is_empty());
    well_formed.then(|| user.to_string())
}

// ---------------------------------------------------------------------------------------
// Checks and the report

/// The counts of a phase, or of the whole run.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    accepted: u64,
    lost: u64,
    lost_no_row: u64,
    lost_no_create: u64,
    duplicated: u64,
    /// Duplicates with no kill between a user's first and last `createUser`.
    unexplained: u64,
    unexplained_examples: Vec<String>,
    kills: u64,
    /// Answers by status, 2xx included.
    statuses: BTreeMap<u16, u64>,
    /// Requests without an answer, by why.
    failures: BTreeMap<&'static str, u64>,
    /// 2xx answers whose body did not name the user and a request id.
    bad_bodies: u64,
    /// Users never answered 2xx that still got a `createUser`, and how many entries.
    unanswered_users: u64,
    unanswered_entries: u64,
    malformed: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.lost += other.lost;
        self.lost_no_row += other.lost_no_row;
        self.lost_no_create += other.lost_no_create;
        self.duplicated += other.duplicated;
        self.unexplained += other.unexplained;
        self.kills += other.kills;
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_insert(0) += n;
        }
        for (why, n) in &other.failures {
            *self.failures.entry(why).or_insert(0) += n;
        }
        self.bad_bodies += other.bad_bodies;
        self.unanswered_users += other.unanswered_users;
        self.unanswered_entries += other.unanswered_entries;
        self.malformed += other.malformed;
    }

    fn print(&self) {
        println!(
            "accepted {}, lost {}, duplicated {} (after kills {})",
            self.accepted, self.lost, self.duplicated, self.kills
        );
        let statuses: Vec<_> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect();
        let failures: Vec<_> = self
            .failures
            .iter()
            .map(|(why, n)| format!("{why}: {n}"))
            .collect();
        println!(
            "  duplicates explained by a kill: {}, not explained: {}",
            self.duplicated - self.unexplained,
            self.unexplained
        );
        for example in &self.unexplained_examples {
            println!("    not explained: {example}");
        }
        println!("  requests sent {}", self.sent);
        println!("  answers by status: {}", or_none(&statuses));
        println!("  not answered: {}", or_none(&failures));
        println!(
            "  unanswered but carried out: {} users ({} createUser entries)",
            self.unanswered_users, self.unanswered_entries
        );
        if self.lost > 0 {
            println!(
                "  lost: {} without a SQLite row, {} without a createUser",
                self.lost_no_row, self.lost_no_create
            );
        }
        if self.bad_bodies > 0 || self.malformed > 0 {
            println!(
                "  odd: {} 2xx bodies without userId/requestId, {} Engine entries that are not a soak createUser",
                self.bad_bodies, self.malformed
            );
        }
    }
}

fn or_none(parts: &[String]) -> String {
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

/// Checks every accepted request against the evidence; returns the tally and a few lost users.
fn tally(
    phase: &str,
    attempts: &[Attempt],
    evidence: &Evidence,
    chaos: &Chaos,
) -> (Tally, Vec<String>) {
    let kill_times = &chaos.kill_times;
    let mut tally = Tally {
        sent: attempts.len() as u64,
        kills: kill_times.len() as u64,
        malformed: evidence.malformed,
        ..Tally::default()
    };
    let mut accepted = HashSet::new();
    for attempt in attempts {
        match attempt.outcome {
            Outcome::Accepted { status, body_ok } => {
                *tally.statuses.entry(status).or_insert(0) += 1;
                tally.bad_bodies += u64::from(!body_ok);
                accepted.insert(user_id(phase, attempt.n));
            }
            Outcome::Refused(status) => *tally.statuses.entry(status).or_insert(0) += 1,
            Outcome::Failed(why) => *tally.failures.entry(why).or_insert(0) += 1,
        }
    }
    tally.accepted = accepted.len() as u64;
    let mut lost_examples = Vec::new();
    for user in &accepted {
        let has_row = evidence.rows.get(user) == Some(&email_of(user));
        let has_create = evidence.created.contains_key(user);
        tally.lost_no_row += u64::from(!has_row);
        tally.lost_no_create += u64::from(!has_create);
        if !(has_row && has_create) {
            tally.lost += 1;
            if lost_examples.len() < 10 {
                lost_examples.push(user.clone());
            }
        }
    }
    for (user, stored_at) in &evidence.created {
        let count = stored_at.len() as u64;
        tally.duplicated += count - 1;
        if count > 1 {
            // A kill explains a copy when it fell between the first publication and the
            // last: the first went out, the process (or the queue) died before the ack,
            // and the entry was carried out again after.
            let mut first = stored_at.iter().min().copied().unwrap_or(0);
            let last = stored_at.iter().max().copied().unwrap_or(0);
            // A command stored as the Engine's Redis woke up was sent at some point of its
            // pause: a kill during the pause may have left it behind.
            if let Some((paused, resumed)) = chaos.engine_pause {
                // (Its wake may come a few ms before the SIGCONT's recorded time.)
                if first + KILL_SLACK_MS >= resumed && first <= resumed + PAUSE_WAKE_MS {
                    first = paused;
                }
            }
            let explained = kill_times
                .iter()
                .any(|&t| first <= t + KILL_SLACK_MS && t <= last);
            if !explained {
                tally.unexplained += count - 1;
                if tally.unexplained_examples.len() < 5 {
                    let mut at = stored_at.clone();
                    at.sort();
                    tally.unexplained_examples.push(format!(
                        "{user} stored at {at:?}; kills at {kill_times:?}; Engine paused {:?}",
                        chaos.engine_pause
                    ));
                }
            }
        }
        if !accepted.contains(user) {
            tally.unanswered_users += 1;
            tally.unanswered_entries += count;
        }
    }
    lost_examples.sort();
    (tally, lost_examples)
}

struct PhaseReport {
    tally: Tally,
    lost_examples: Vec<String>,
    drain: Drain,
    problems: Vec<String>,
    dead_letters: Option<u64>,
    load_time: Duration,
    elapsed: Duration,
}

impl PhaseReport {
    fn print(&self) {
        self.tally.print();
        if !self.lost_examples.is_empty() {
            println!(
                "  lost users (first {}): {}",
                self.lost_examples.len(),
                self.lost_examples.join(" ")
            );
        }
        match &self.drain {
            Drain::Done(took) => {
                println!("  queue drained {:.1} s after the load", took.as_secs_f64())
            }
            Drain::TimedOut { xlen, pending } => println!(
                "  queue NOT drained within {DRAIN_DEADLINE:?}: XLEN {xlen:?}, pending {pending:?}"
            ),
        }
        if let Some(dead) = self.dead_letters.filter(|n| *n > 0) {
            println!("  dead letters: {dead}");
        }
        for problem in &self.problems {
            println!("  problem: {problem}");
        }
        println!(
            "  elapsed {:.1} s (load {:.1} s)",
            self.elapsed.as_secs_f64(),
            self.load_time.as_secs_f64()
        );
    }
}
