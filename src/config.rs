//! Typed settings, read once at start from the environment (and `.env`, by `main`).
//!
//! Every setting of the contract has its default here. A bad value stops the process with
//! one [`ConfigError`] line naming the variable, so an operator never has to read a
//! backtrace to find a typo. Tests build a [`Config`] from a map of overrides instead of
//! touching the process environment, so they can run side by side.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

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

/// The HMAC secret that signs and verifies tokens. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSecret(Vec<u8>);

impl JwtSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtSecret({} bytes)", self.0.len())
    }
}

/// A key file's name and contents, read at start.
#[derive(Debug, Clone)]
pub struct KeyFile {
    pub path: String,
    pub contents: Vec<u8>,
}

/// How the service checks bearer tokens.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The HMAC secret (required when an HS algorithm is allowed).
    pub secret: Option<JwtSecret>,
    /// A second HMAC secret still accepted, so the secret can be rotated without refusing
    /// live sessions.
    pub previous_secret: Option<JwtSecret>,
    /// The accepted algorithms (`JWT_ALGORITHMS`, default HS256); anything else is refused.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// A PEM public key for RS*/PS*/ES*/EdDSA tokens.
    pub public_key: Option<KeyFile>,
    /// A local JWKS file; a token's `kid` chooses the key.
    pub jwks: Option<KeyFile>,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub leeway_secs: u64,
    pub require_exp: bool,
}

impl JwtConfig {
    /// No key at all: an authenticator built from it refuses every token. For commands
    /// that never verify one.
    pub fn no_keys() -> Self {
        Self {
            secret: None,
            ..Self::hs256("")
        }
    }

    /// HS256 with one secret and the contract's defaults (leeway 60 s, `exp` optional).
    pub fn hs256(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: Some(JwtSecret::new(secret)),
            previous_secret: None,
            algorithms: vec![jsonwebtoken::Algorithm::HS256],
            public_key: None,
            jwks: None,
            issuer: None,
            audience: Vec::new(),
            leeway_secs: 60,
            require_exp: false,
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

    /// How a one-off command opens the store: a small PostgreSQL pool (it runs one
    /// transaction at a time), and the configured statement timeout.
    pub fn options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            pool_size: 2,
            statement_timeout: self.database_statement_timeout,
        }
    }
}

/// Where the Engine reads its commands: what `users resync-engine` publishes to.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// `ENGINE_REDIS_URL`, else the (single) `REDIS_URL`.
    pub engine_redis_url: String,
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
    pub cors_allowed_origins: crate::http::cors::AllowedOrigins,
    pub log_format: LogFormat,
}

/// Reads settings from a lookup function; one place for parsing and error wording.
struct Settings<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Settings<'_> {
    /// A set, non-blank value, trimmed.
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, name: &'static str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_string())
    }

    fn parse<T: FromStr>(
        &self,
        name: &'static str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .parse()
                .map_err(|_| ConfigError::new(name, format!("{raw:?} is not {what}"))),
        }
    }

    fn millis(&self, name: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
        self.parse(name, default_ms, "a whole number of milliseconds")
            .map(Duration::from_millis)
    }

    fn positive(&self, name: &'static str, default: usize) -> Result<usize, ConfigError> {
        let n = self.parse(name, default, "a whole number")?;
        if n == 0 {
            return Err(ConfigError::new(name, "must be at least 1"));
        }
        Ok(n)
    }

    fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(
                    name,
                    format!("{v:?} is not true or false"),
                )),
            },
        }
    }

    fn addr(&self, name: &'static str, default: SocketAddr) -> Result<SocketAddr, ConfigError> {
        self.parse(name, default, "a socket address such as 0.0.0.0:8000")
    }

    fn redis_url(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let url = self.string(name, default);
        redis::Client::open(url.as_str())
            .map_err(|e| ConfigError::new(name, format!("not a usable Redis URL: {e}")))?;
        Ok(url)
    }

    /// A secret from `NAME` (byte for byte) or from the file `NAME_FILE`.
    fn secret(
        &self,
        name: &'static str,
        file_name: &'static str,
    ) -> Result<Option<JwtSecret>, ConfigError> {
        // The secret is taken byte for byte: a space in it is part of it, as in Node.
        let inline = (self.lookup)(name).filter(|v| !v.is_empty());
        match (inline, self.get(file_name)) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                name,
                format!("set either {name} or {file_name}, not both"),
            )),
            (Some(s), None) => Ok(Some(JwtSecret(s.into_bytes()))),
            (None, Some(path)) => {
                let mut bytes = std::fs::read(&path)
                    .map_err(|e| ConfigError::new(file_name, format!("cannot read {path}: {e}")))?;
                // Editors and `echo` add a final newline; it is never part of the secret.
                while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                    bytes.pop();
                }
                if bytes.is_empty() {
                    return Err(ConfigError::new(file_name, format!("{path} is empty")));
                }
                Ok(Some(JwtSecret(bytes)))
            }
            (None, None) => Ok(None),
        }
    }

    fn key_file(&self, name: &'static str) -> Result<Option<KeyFile>, ConfigError> {
        let Some(path) = self.get(name) else {
            return Ok(None);
        };
        let contents = std::fs::read(&path)
            .map_err(|e| ConfigError::new(name, format!("cannot read {path}: {e}")))?;
        Ok(Some(KeyFile { path, contents }))
    }

    /// `REDIS_URL`: one URL, or several comma-separated node URLs of a cluster.
    fn redis_nodes(&self) -> Result<Vec<String>, ConfigError> {
        let nodes: Vec<String> = self
            .string("REDIS_URL", "redis://127.0.0.1:6379")
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        for url in &nodes {
            redis::Client::open(url.as_str()).map_err(|e| {
                ConfigError::new(
                    "REDIS_URL",
                    format!("{url:?} is not a usable Redis URL: {e}"),
                )
            })?;
        }
        Ok(nodes)
    }

    /// The Engine's Redis and stream; `ENGINE_REDIS_URL` defaults to the queue's Redis.
    fn engine(&self) -> Result<EngineSettings, ConfigError> {
        let nodes = self.redis_nodes()?;
        let cluster = nodes.len() > 1 || self.bool("REDIS_CLUSTER", false)?;
        if cluster && self.get("ENGINE_REDIS_URL").is_none() {
            return Err(ConfigError::new(
                "ENGINE_REDIS_URL",
                "must be set when the queue is a Redis Cluster (the Engine reads one stream on one Redis)",
            ));
        }
        let first = nodes.first().cloned().unwrap_or_default();
        Ok(EngineSettings {
            engine_redis_url: self.redis_url("ENGINE_REDIS_URL", &first)?,
            engine_stream: self.string("ENGINE_STREAM", "stream:exness"),
        })
    }

    fn store(&self) -> Result<StoreSettings, ConfigError> {
        let database_url = self.get("DATABASE_URL");
        if let Some(url) = &database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    "must start with postgres:// (unset it to use SQLite)",
                ));
            }
            url.parse::<tokio_postgres::Config>().map_err(|e| {
                ConfigError::new("DATABASE_URL", format!("not a usable PostgreSQL URL: {e}"))
            })?;
        }
        let database_statement_timeout = self.millis("DATABASE_STATEMENT_TIMEOUT_MS", 5000)?;
        if database_statement_timeout < Duration::from_millis(100) {
            // Shorter than a healthy batch can take: every batch would time out and retry.
            return Err(ConfigError::new(
                "DATABASE_STATEMENT_TIMEOUT_MS",
                "must be at least 100",
            ));
        }
        Ok(StoreSettings {
            database_path: PathBuf::from(self.string("DATABASE_PATH", "./data/ensure-user.db")),
            database_url,
            database_statement_timeout,
        })
    }

    fn jwt(&self) -> Result<JwtConfig, ConfigError> {
        let algorithms = self
            .string("JWT_ALGORITHMS", "HS256")
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse::<jsonwebtoken::Algorithm>().map_err(|_| {
                    ConfigError::new(
                        "JWT_ALGORITHMS",
                        format!("{a:?} is not a JWS algorithm (e.g. HS256, RS256, ES256, EdDSA)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(ConfigError::new("JWT_ALGORITHMS", "names no algorithm"));
        }
        let secret = self.secret("JWT_SECRET", "JWT_SECRET_FILE")?;
        let previous_secret = self.secret("JWT_SECRET_PREVIOUS", "JWT_SECRET_PREVIOUS_FILE")?;
        let public_key = self.key_file("JWT_PUBLIC_KEY_FILE")?;
        let jwks = self.key_file("JWT_JWKS_FILE")?;
        let hmac = algorithms
            .iter()
            .any(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac);
        if hmac && secret.is_none() {
            return Err(ConfigError::new(
                "JWT_SECRET",
                "is not set (set JWT_SECRET or JWT_SECRET_FILE to the platform's token secret)",
            ));
        }
        if !hmac && public_key.is_none() && jwks.is_none() {
            return Err(ConfigError::new(
                "JWT_PUBLIC_KEY_FILE",
                "JWT_ALGORITHMS allows only public-key algorithms: set JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE",
            ));
        }
        Ok(JwtConfig {
            secret,
            previous_secret,
            algorithms,
            public_key,
            jwks,
            issuer: self.get("JWT_ISSUER"),
            audience: self
                .get("JWT_AUDIENCE")
                .map(|a| {
                    a.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            leeway_secs: self.parse("JWT_LEEWAY_SECS", 60, "a whole number of seconds")?,
            require_exp: self.bool("JWT_REQUIRE_EXP", false)?,
        })
    }
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
            cors_allowed_origins: crate::http::cors::AllowedOrigins::parse(
                &s.string("CORS_ALLOWED_ORIGINS", ""),
            )
            .map_err(|problem| ConfigError::new("CORS_ALLOWED_ORIGINS", problem))?,
            log_format,
        })
    }

    /// How the store is opened: a PostgreSQL pool of 2 × `WORKER_CONCURRENCY` connections,
    /// and the statement timeout.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            pool_size: self.worker_concurrency * 2,
            statement_timeout: self.database_statement_timeout,
        }
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
mod tests {
    use super::*;

    fn with(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut vars = vec![("JWT_SECRET", "s3cret")];
        vars.extend_from_slice(extra);
        Config::from_vars(vars)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = with(&[]).unwrap();
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:8000");
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9100");
        assert_eq!(c.admin_addr.unwrap().to_string(), "127.0.0.1:9101");
        assert!(c.admin_token.is_none());
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(c.engine_redis_url, c.redis_url);
        assert_eq!(c.ensure_stream, "stream:ensure-user");
        assert_eq!(c.redis_nodes, vec!["redis://127.0.0.1:6379"]);
        assert_eq!(c.ensure_shards, 1);
        assert!(!c.redis_cluster);
        assert_eq!(c.ensure_group, "ensure-workers");
        assert_eq!(c.engine_stream, "stream:exness");
        assert_eq!(c.engine_reply_stream, "stream:exnessReceive");
        assert_eq!(c.ensure_wait, Duration::from_millis(5000));
        assert_eq!(c.database_path, PathBuf::from("./data/ensure-user.db"));
        assert_eq!(c.database_statement_timeout, Duration::from_millis(5000));
        assert_eq!(c.jwt.leeway_secs, 60);
        assert!(!c.jwt.require_exp);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert!(!c.cors_allowed_origins.is_enabled());
    }

    #[test]
    fn the_console_needs_a_token_off_loopback() {
        assert!(with(&[("ADMIN_ADDR", "off")]).unwrap().admin_addr.is_none());
        assert!(with(&[("ADMIN_ADDR", "[::1]:9200")]).is_ok());
        let err = with(&[("ADMIN_ADDR", "0.0.0.0:9101")]).unwrap_err();
        assert_eq!(err.setting, "ADMIN_TOKEN");
        let c = with(&[
            ("ADMIN_ADDR", "0.0.0.0:9101"),
            ("ADMIN_TOKEN", "0123456789abcdef"),
        ])
        .unwrap();
        assert_eq!(c.admin_token.unwrap().as_bytes(), b"0123456789abcdef");
        assert_eq!(
            with(&[("ADMIN_TOKEN", "short")]).unwrap_err().setting,
            "ADMIN_TOKEN"
        );
        assert_eq!(
            with(&[("ADMIN_ADDR", "everywhere")]).unwrap_err().setting,
            "ADMIN_ADDR"
        );
    }

    #[test]
    fn port_sets_the_listen_address() {
        assert_eq!(with(&[("PORT", "9000")]).unwrap().listen_addr.port(), 9000);
    }

    #[test]
    fn bad_settings_name_themselves() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("PORT", "eighty")], "PORT"),
            (&[("ENSURE_WAIT_MS", "-1")], "ENSURE_WAIT_MS"),
            (&[("JWT_REQUIRE_EXP", "maybe")], "JWT_REQUIRE_EXP"),
            (&[("REDIS_URL", "http://nope")], "REDIS_URL"),
            (&[("WORKER_CONCURRENCY", "0")], "WORKER_CONCURRENCY"),
            (&[("LISTEN_ADDR", "localhost")], "LISTEN_ADDR"),
            (&[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
            (
                &[("REDIS_URL", "redis://a:1,redis://b:2")],
                "ENGINE_REDIS_URL",
            ),
            (&[("ENSURE_SHARDS", "0")], "ENSURE_SHARDS"),
            (&[("WORKER_BLOCK_MS", "0")], "WORKER_BLOCK_MS"),
            (&[("CLAIM_IDLE_MS", "10")], "CLAIM_IDLE_MS"),
            (&[("ENGINE_CONFIRM", "maybe")], "ENGINE_CONFIRM"),
            (&[("MAX_DELIVERIES", "0")], "MAX_DELIVERIES"),
            (
                &[("DATABASE_STATEMENT_TIMEOUT_MS", "99")],
                "DATABASE_STATEMENT_TIMEOUT_MS",
            ),
            (
                &[("DATABASE_STATEMENT_TIMEOUT_MS", "5s")],
                "DATABASE_STATEMENT_TIMEOUT_MS",
            ),
            (&[("JWT_ALGORITHMS", "HS256,none")], "JWT_ALGORITHMS"),
            (
                &[("CORS_ALLOWED_ORIGINS", "https://app.example.com/")],
                "CORS_ALLOWED_ORIGINS",
            ),
            (
                &[("CORS_ALLOWED_ORIGINS", "*,app.example.com")],
                "CORS_ALLOWED_ORIGINS",
            ),
            (&[("JWT_ALGORITHMS", "RS256")], "JWT_PUBLIC_KEY_FILE"),
            (
                &[("JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")],
                "JWT_PUBLIC_KEY_FILE",
            ),
        ];
        for (vars, setting) in cases {
            let err = with(vars).unwrap_err();
            assert_eq!(err.setting, *setting, "{vars:?}");
            assert!(err
                .to_string()
                .starts_with(&format!("configuration error: {setting}: ")));
        }
    }

    /// Every name a setting is read under here, from this file's code (its tests left out):
    /// each must have its row in the contract's settings table and in the README's.
    #[test]
    fn every_setting_is_documented() {
        let code = include_str!("config.rs")
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default();
        // Quoted upper-case names; `HS256` is the one such value that is not a setting.
        let names: std::collections::BTreeSet<&str> = code
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| {
                s.starts_with(|c: char| c.is_ascii_uppercase())
                    && s.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    && *s != "HS256"
            })
            .collect();
        assert!(
            names.contains("CORS_ALLOWED_ORIGINS") && names.len() > 30,
            "{names:?}"
        );
        for (doc, text) in [
            ("docs/contract.md", include_str!("../docs/contract.md")),
            ("README.md", include_str!("../README.md")),
        ] {
            let missing: Vec<_> = names
                .iter()
                .filter(|n| !text.contains(&format!("`{n}`")))
                .collect();
            assert!(
                missing.is_empty(),
                "{doc} does not document {missing:?}: give each a row in its settings table"
            );
        }
    }

    #[test]
    fn the_users_commands_read_store_and_engine_settings_without_a_secret() {
        let vars: HashMap<&str, &str> = [
            ("DATABASE_PATH", "/tmp/users.db"),
            ("REDIS_URL", "redis://queue:6379"),
            ("ENGINE_STREAM", "stream:engine"),
        ]
        .into();
        let s = Settings {
            lookup: &|name| vars.get(name).map(|v| v.to_string()),
        };
        let store = s.store().unwrap();
        assert_eq!(store.database_path, PathBuf::from("/tmp/users.db"));
        assert!(store.database_url.is_none());
        let engine = s.engine().unwrap();
        assert_eq!(engine.engine_redis_url, "redis://queue:6379");
        assert_eq!(engine.engine_stream, "stream:engine");
        let cluster = Settings {
            lookup: &|name| (name == "REDIS_URL").then(|| "redis://a:1,redis://b:2".into()),
        };
        assert_eq!(cluster.engine().unwrap_err().setting, "ENGINE_REDIS_URL");
        let bad = Settings {
            lookup: &|name| (name == "DATABASE_URL").then(|| "mysql://x".into()),
        };
        assert_eq!(bad.store().unwrap_err().setting, "DATABASE_URL");
    }

    #[test]
    fn operator_commands_need_no_token_settings() {
        let c = Config::operator_from_vars([("REDIS_URL", "redis://127.0.0.1:7000")]).unwrap();
        assert_eq!(c.redis_url, "redis://127.0.0.1:7000");
        assert!(c.jwt.secret.is_none() && c.jwt.public_key.is_none() && c.jwt.jwks.is_none());
        // Other settings are still checked.
        let err = Config::operator_from_vars([("REDIS_URL", "http://nope")]).unwrap_err();
        assert_eq!(err.setting, "REDIS_URL");
    }

    #[test]
    fn a_missing_secret_is_refused() {
        let err = Config::from_vars(Vec::<(&str, &str)>::new()).unwrap_err();
        assert_eq!(err.setting, "JWT_SECRET");
    }

    #[test]
    fn secret_file_loses_its_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("eu-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "from-file\n").unwrap();
        let c = Config::from_vars([("JWT_SECRET_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(c.jwt.secret.as_ref().unwrap().as_bytes(), b"from-file");
        let debug = format!("{:?}", c.jwt.secret);
        assert!(!debug.contains("from-file"), "{debug}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
