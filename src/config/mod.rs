//! Typed settings, read once at start from the environment (and `.env`, by `main`).
//!
//! Every setting of the contract has its default here. A bad value stops the process with
//! one [`ConfigError`] line naming the variable, so an operator never has to read a
//! backtrace to find a typo. Tests build a [`Config`] from a map of overrides instead of
//! touching the process environment, so they can run side by side.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod jwt;
mod origins;
mod settings;
mod traces;

pub use jwt::{JwtConfig, JwtSecret, KeyFile};
pub(crate) use origins::normalise;
pub use origins::AllowedOrigins;
use settings::Settings;
pub use traces::{TraceSampler, TraceSettings};

/// One setting that could not be used, with what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// Whether a command verifies tokens, and so needs their keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tokens {
    Verified,
    Ignored,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How a worker knows the Engine has the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineConfirm {
    /// A successful XADD to the Engine stream counts as delivery.
    Publish,
    /// Wait for the Engine's correlated reply; republish when it does not come.
    Ack,
}

/// Where the users are kept: what the operator commands on users need of the store.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub database_path: PathBuf,
    /// `postgres://…`: the store is PostgreSQL instead of SQLite.
    pub database_url: Option<String>,
    /// PostgreSQL: the longest one statement may run, lock waits included.
    pub database_statement_timeout: Duration,
}

impl StoreSettings {
    /// The store settings alone, from the process environment: the operator commands on
    /// users never verify a token, so they must start without `JWT_SECRET`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Settings {
            lookup: &|name| std::env::var(name).ok(),
        }
        .store()
    }
}

/// A primary found through Redis Sentinel (`REDIS_SENTINELS`, `ENGINE_REDIS_SENTINELS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelSettings {
    /// The sentinels, `host:port`, asked in order.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// `REDIS_SENTINEL_PASSWORD`: what the sentinels themselves ask for, if anything.
    pub password: Option<String>,
}

/// Where the Engine reads its commands: what `users resync-engine` publishes to.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// `ENGINE_REDIS_URL`, else the (single) `REDIS_URL`.
    pub engine_redis_url: String,
    /// The Engine's primary through Sentinel; its credentials come from `ENGINE_REDIS_URL`.
    pub engine_redis_sentinel: Option<SentinelSettings>,
    pub engine_stream: String,
}

impl EngineSettings {
    /// The Engine settings alone, from the process environment (no token secret needed).
    pub fn from_env() -> Result<Self, ConfigError> {
        Settings {
            lookup: &|name| std::env::var(name).ok(),
        }
        .engine()
    }
}

/// Everything `serve`, `listen` and `work` need.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The console's listener; `None` with `ADMIN_ADDR=off`.
    pub admin_addr: Option<SocketAddr>,
    /// The console's token; required when `admin_addr` is not a loopback address.
    pub admin_token: Option<JwtSecret>,
    pub jwt: JwtConfig,
    /// The queue's Redis: what a 2xx depends on (the first node, for a cluster).
    pub redis_url: String,
    /// Every node URL given, for a Redis Cluster.
    pub redis_nodes: Vec<String>,
    /// The queue is a Redis Cluster (`REDIS_CLUSTER=true`, or several URLs in `REDIS_URL`).
    pub redis_cluster: bool,
    /// How many streams the ingress is split over.
    pub ensure_shards: usize,
    /// The Engine's Redis; may be down without the listener noticing.
    pub engine_redis_url: String,
    pub engine_redis_sentinel: Option<SentinelSettings>,
    /// The queue's primary through Sentinel; its credentials come from `REDIS_URL`.
    pub redis_sentinel: Option<SentinelSettings>,
    /// `QUEUE_MIN_REPLICAS`: replicas that must hold an entry (`WAIT`) before a 2xx.
    pub queue_min_replicas: usize,
    /// `QUEUE_REPLICA_TIMEOUT_MS`: how long that `WAIT` may take.
    pub queue_replica_timeout: Duration,
    pub ensure_stream: String,
    pub ensure_group: String,
    pub engine_stream: String,
    pub engine_reply_stream: String,
    /// How long a request waits for its outcome before it is answered 202.
    pub ensure_wait: Duration,
    /// How long the listener gives the queue Redis to take an entry before answering 503.
    pub enqueue_timeout: Duration,
    pub database_path: PathBuf,
    /// `postgres://…`: the store is PostgreSQL instead of SQLite.
    pub database_url: Option<String>,
    /// PostgreSQL: the longest one statement may run, lock waits included.
    pub database_statement_timeout: Duration,
    pub worker_concurrency: usize,
    pub worker_batch_size: usize,
    pub worker_block: Duration,
    /// Pending entries idle this long are taken over by another consumer.
    pub claim_idle: Duration,
    /// Deliveries after which an entry that never finishes is dead-lettered.
    pub max_deliveries: u64,
    /// How long request status records are kept.
    pub outcome_ttl_secs: u64,
    /// Unacknowledged entries above which new requests are refused with 503.
    pub queue_max_backlog: u64,
    pub engine_confirm: EngineConfirm,
    pub engine_confirm_timeout: Duration,
    pub engine_confirm_max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    /// Open connections above which the listener stops accepting until some close.
    pub max_connections: usize,
    /// Browser origins allowed to call the API; none by default (no CORS headers).
    pub cors_allowed_origins: AllowedOrigins,
    pub log_format: LogFormat,
    /// `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` and the rest: `None` exports nothing.
    pub tracing: Option<TraceSettings>,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Reads only the given variables: for tests and tools, never the process environment.
    pub fn from_vars<K: AsRef<str>, V: AsRef<str>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError> {
        let map = var_map(vars);
        Self::from_lookup(&|name| map.get(name).cloned())
    }

    /// Every setting but the token keys, which are not read at all: for the operator
    /// commands (`dead-letters …` and later ones), which never verify a token and must not
    /// need the platform's secret to start. The returned token settings accept no token.
    pub fn operator_from_env() -> Result<Self, ConfigError> {
        Self::read(&|name| std::env::var(name).ok(), Tokens::Ignored)
    }

    /// [`Config::operator_from_env`] from the given variables only.
    pub fn operator_from_vars<K: AsRef<str>, V: AsRef<str>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError> {
        let map = var_map(vars);
        Self::read(&|name| map.get(name).cloned(), Tokens::Ignored)
    }

    /// Only the token settings, for `ensure-user token`, which needs nothing else.
    pub fn jwt_from_env() -> Result<JwtConfig, ConfigError> {
        Settings {
            lookup: &|name| std::env::var(name).ok(),
        }
        .jwt()
    }

    fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(lookup, Tokens::Verified)
    }

    fn read(lookup: &dyn Fn(&str) -> Option<String>, tokens: Tokens) -> Result<Self, ConfigError> {
        let s = Settings { lookup };
        let port: u16 = s.parse("PORT", 8000, "a port number (0-65535)")?;
        let listen_addr = s.addr("LISTEN_ADDR", SocketAddr::from(([0, 0, 0, 0], port)))?;
        let metrics_addr = s.addr("METRICS_ADDR", SocketAddr::from(([0, 0, 0, 0], 9100)))?;
        let admin_addr = match s.get("ADMIN_ADDR") {
            Some(v) if v.eq_ignore_ascii_case("off") => None,
            _ => Some(s.addr("ADMIN_ADDR", SocketAddr::from(([127, 0, 0, 1], 9101)))?),
        };
        let admin_token = s.secret("ADMIN_TOKEN", "ADMIN_TOKEN_FILE")?;
        if let Some(token) = &admin_token {
            if token.as_bytes().len() < 16 {
                return Err(ConfigError::new(
                    "ADMIN_TOKEN",
                    "must be at least 16 characters (e.g. openssl rand -hex 32)",
                ));
            }
        }
        if let Some(addr) = admin_addr {
            // Replays and purges must never be one unauthenticated request away from the
            // network; on loopback only this host's users can reach the console.
            if !addr.ip().is_loopback() && admin_token.is_none() {
                return Err(ConfigError::new(
                    "ADMIN_TOKEN",
                    format!("must be set (or ADMIN_TOKEN_FILE) when ADMIN_ADDR {addr} is not a loopback address; or set ADMIN_ADDR=off"),
                ));
            }
        }
        let redis_nodes = s.redis_nodes()?;
        let redis_url = redis_nodes.first().cloned().unwrap_or_default();
        let redis_cluster = redis_nodes.len() > 1 || s.bool("REDIS_CLUSTER", false)?;
        let redis_sentinel = s.sentinel("REDIS_SENTINELS", "REDIS_SENTINEL_MASTER")?;
        if redis_sentinel.is_some() && redis_cluster {
            return Err(ConfigError::new(
                "REDIS_SENTINELS",
                "a Redis Cluster fails over by itself: set REDIS_SENTINELS or a cluster REDIS_URL, not both",
            ));
        }
        let engine = s.engine()?;
        let worker_block = s.millis("WORKER_BLOCK_MS", 1000)?;
        if worker_block.is_zero() {
            // BLOCK 0 means "forever" to Redis: a worker could never notice a shutdown.
            return Err(ConfigError::new("WORKER_BLOCK_MS", "must be at least 1"));
        }
        let claim_idle = s.millis("CLAIM_IDLE_MS", 30_000)?;
        if claim_idle < Duration::from_secs(1) {
            // Shorter than a batch can take: consumers would steal each other's live work.
            return Err(ConfigError::new("CLAIM_IDLE_MS", "must be at least 1000"));
        }
        let retry_initial = s.millis("RETRY_INITIAL_MS", 100)?;
        let retry_max = s.millis("RETRY_MAX_MS", 10_000)?;
        if retry_initial.is_zero() || retry_max < retry_initial {
            return Err(ConfigError::new(
                "RETRY_MAX_MS",
                "must be at least RETRY_INITIAL_MS, and RETRY_INITIAL_MS at least 1",
            ));
        }
        let enqueue_timeout = s.millis("ENQUEUE_TIMEOUT_MS", 1000)?;
        if enqueue_timeout.is_zero() {
            return Err(ConfigError::new("ENQUEUE_TIMEOUT_MS", "must be at least 1"));
        }
        let log_format = match s.string("LOG_FORMAT", "text").to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("{other:?} is not text or json"),
                ))
            }
        };
        let ensure_stream = s.string("ENSURE_STREAM", "stream:ensure-user");
        let store = s.store()?;
        let engine_confirm = match s
            .string("ENGINE_CONFIRM", "publish")
            .to_ascii_lowercase()
            .as_str()
        {
            "publish" => EngineConfirm::Publish,
            "ack" => EngineConfirm::Ack,
            other => {
                return Err(ConfigError::new(
                    "ENGINE_CONFIRM",
                    format!("{other:?} is not publish or ack"),
                ))
            }
        };
        Ok(Config {
            listen_addr,
            metrics_addr,
            admin_addr,
            admin_token,
            jwt: match tokens {
                Tokens::Verified => s.jwt()?,
                Tokens::Ignored => JwtConfig::no_keys(),
            },
            redis_url,
            redis_nodes,
            redis_cluster,
            ensure_shards: s.positive("ENSURE_SHARDS", 1)?,
            engine_redis_url: engine.engine_redis_url,
            engine_redis_sentinel: engine.engine_redis_sentinel,
            redis_sentinel,
            queue_min_replicas: s.parse("QUEUE_MIN_REPLICAS", 0, "a whole number of replicas")?,
            queue_replica_timeout: s.millis("QUEUE_REPLICA_TIMEOUT_MS", 200)?,
            ensure_group: s.string("ENSURE_GROUP", "ensure-workers"),
            engine_stream: engine.engine_stream,
            engine_reply_stream: s.string("ENGINE_REPLY_STREAM", "stream:exnessReceive"),
            ensure_stream,
            ensure_wait: s.millis("ENSURE_WAIT_MS", 5000)?,
            enqueue_timeout,
            database_path: store.database_path,
            database_url: store.database_url,
            database_statement_timeout: store.database_statement_timeout,
            worker_concurrency: s.positive("WORKER_CONCURRENCY", 4)?,
            worker_batch_size: s.positive("WORKER_BATCH_SIZE", 256)?,
            worker_block,
            claim_idle,
            max_deliveries: s.positive("MAX_DELIVERIES", 10)? as u64,
            outcome_ttl_secs: s.positive("OUTCOME_TTL_SECS", 86_400)? as u64,
            queue_max_backlog: s.positive("QUEUE_MAX_BACKLOG", 1_000_000)? as u64,
            engine_confirm,
            engine_confirm_timeout: s.millis("ENGINE_CONFIRM_TIMEOUT_MS", 5000)?,
            engine_confirm_max_attempts: s.positive("ENGINE_CONFIRM_MAX_ATTEMPTS", 5)? as u32,
            retry_initial,
            retry_max,
            shutdown_grace: Duration::from_secs(s.parse(
                "SHUTDOWN_GRACE_SECS",
                30,
                "a whole number of seconds",
            )?),
            header_read_timeout: s.millis("HEADER_READ_TIMEOUT_MS", 10_000)?,
            max_connections: s.positive("MAX_CONNECTIONS", 10_000)?,
            cors_allowed_origins: AllowedOrigins::parse(&s.string("CORS_ALLOWED_ORIGINS", ""))
                .map_err(|problem| ConfigError::new("CORS_ALLOWED_ORIGINS", problem))?,
            log_format,
            tracing: s.tracing()?,
        })
    }
}

/// Settings given as pairs, looked up by name.
fn var_map<K: AsRef<str>, V: AsRef<str>>(
    vars: impl IntoIterator<Item = (K, V)>,
) -> HashMap<String, String> {
    vars.into_iter()
        .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
        .collect()
}

#[cfg(test)]
mod tests;
