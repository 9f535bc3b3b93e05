//! The settings reader: one place for looking a variable up, parsing it, and wording the
//! error that names it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::{
    ConfigError, EngineSettings, JwtConfig, JwtSecret, KeyFile, SentinelSettings, StoreSettings,
};

/// Reads settings from a lookup function.
pub(super) struct Settings<'a> {
    pub(super) lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Settings<'_> {
    /// A set, non-blank value, trimmed.
    pub(super) fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    pub(super) fn string(&self, name: &'static str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_string())
    }

    pub(super) fn parse<T: FromStr>(
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

    pub(super) fn millis(
        &self,
        name: &'static str,
        default_ms: u64,
    ) -> Result<Duration, ConfigError> {
        self.parse(name, default_ms, "a whole number of milliseconds")
            .map(Duration::from_millis)
    }

    pub(super) fn positive(
        &self,
        name: &'static str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        let n = self.parse(name, default, "a whole number")?;
        if n == 0 {
            return Err(ConfigError::new(name, "must be at least 1"));
        }
        Ok(n)
    }

    pub(super) fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
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

    pub(super) fn addr(
        &self,
        name: &'static str,
        default: SocketAddr,
    ) -> Result<SocketAddr, ConfigError> {
        self.parse(name, default, "a socket address such as 0.0.0.0:8000")
    }

    pub(super) fn redis_url(
        &self,
        name: &'static str,
        default: &str,
    ) -> Result<String, ConfigError> {
        let url = self.string(name, default);
        redis::Client::open(url.as_str())
            .map_err(|e| ConfigError::new(name, format!("not a usable Redis URL: {e}")))?;
        Ok(url)
    }

    /// A secret from `NAME` (byte for byte) or from the file `NAME_FILE`.
    pub(super) fn secret(
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
            (Some(s), None) => Ok(Some(JwtSecret::new(s.into_bytes()))),
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
                Ok(Some(JwtSecret::new(bytes)))
            }
            (None, None) => Ok(None),
        }
    }

    pub(super) fn key_file(&self, name: &'static str) -> Result<Option<KeyFile>, ConfigError> {
        let Some(path) = self.get(name) else {
            return Ok(None);
        };
        let contents = std::fs::read(&path)
            .map_err(|e| ConfigError::new(name, format!("cannot read {path}: {e}")))?;
        Ok(Some(KeyFile { path, contents }))
    }

    /// `REDIS_URL`: one URL, or several comma-separated node URLs of a cluster.
    pub(super) fn redis_nodes(&self) -> Result<Vec<String>, ConfigError> {
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

    /// `<PREFIX>SENTINELS` (comma-separated `host:port`) with `<PREFIX>SENTINEL_MASTER`:
    /// the primary is found through Sentinel. `None` when no sentinels are set.
    pub(super) fn sentinel(
        &self,
        sentinels: &'static str,
        master: &'static str,
    ) -> Result<Option<SentinelSettings>, ConfigError> {
        let Some(raw) = self.get(sentinels) else {
            if self.get(master).is_some() {
                return Err(ConfigError::new(
                    sentinels,
                    format!("must be set with {master}"),
                ));
            }
            return Ok(None);
        };
        let mut addresses = Vec::new();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let port = entry.rsplit_once(':').and_then(|(host, port)| {
                (!host.is_empty()).then_some(())?;
                port.parse::<u16>().ok().filter(|p| *p != 0)
            });
            if port.is_none() {
                return Err(ConfigError::new(
                    sentinels,
                    format!("{entry:?} is not host:port"),
                ));
            }
            addresses.push(entry.to_string());
        }
        if addresses.is_empty() {
            return Err(ConfigError::new(sentinels, "names no sentinel"));
        }
        let Some(name) = self.get(master) else {
            return Err(ConfigError::new(
                master,
                format!("must be set with {sentinels} (the name the sentinels monitor)"),
            ));
        };
        Ok(Some(SentinelSettings {
            sentinels: addresses,
            master: name,
            password: self.get("REDIS_SENTINEL_PASSWORD"),
        }))
    }

    /// The Engine's Redis and stream; `ENGINE_REDIS_URL` defaults to the queue's Redis.
    pub(super) fn engine(&self) -> Result<EngineSettings, ConfigError> {
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
            engine_redis_sentinel: self
                .sentinel("ENGINE_REDIS_SENTINELS", "ENGINE_REDIS_SENTINEL_MASTER")?,
            engine_stream: self.string("ENGINE_STREAM", "stream:exness"),
        })
    }

    pub(super) fn store(&self) -> Result<StoreSettings, ConfigError> {
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

    pub(super) fn jwt(&self) -> Result<JwtConfig, ConfigError> {
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
