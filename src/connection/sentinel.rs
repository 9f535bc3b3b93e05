//! A primary found through Redis Sentinel, and followed across failovers.
//!
//! The sentinels are asked which address the primary has (`SENTINEL
//! get-master-addr-by-name`); the answer is connected to and checked with `ROLE`. The
//! connection is kept until a command on it fails the way a lost or demoted primary fails
//! (the connection dropped or refused, a timeout, `READONLY`, `MASTERDOWN`); then it is
//! forgotten, and the next command asks the sentinels again. So every user of the
//! connection (listener, workers, monitor, operator commands) follows a failover without a
//! restart, and a command that runs into one fails like any other Redis failure: the
//! listener answers 503, a worker retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo as _, RedisError, RedisResult};

use crate::config::SentinelSettings;

/// How long one sentinel may take to answer before the next is asked.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// Primaries lost by any connection of this process. A connection that finds the count
/// moved since it last checked asks the sentinels before its next command, so one
/// connection's discovery of a failover spares the others their own failed command (the
/// listener's pool of confirmed XADDs would otherwise answer one 503 per connection).
static LOSSES: AtomicU64 = AtomicU64::new(0);

/// The connection to whichever server the sentinels name primary.
pub struct SentinelConn {
    sentinels: Vec<redis::Client>,
    master: String,
    /// The primary's credentials and database (from `REDIS_URL`); its address is replaced.
    base: ConnectionInfo,
    config: ConnectionManagerConfig,
    current: Mutex<Option<Primary>>,
    /// One resolution at a time: a failover must not make every waiting command ask.
    resolving: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Primary {
    address: String,
    conn: ConnectionManager,
    /// [`LOSSES`] when this primary was last confirmed.
    checked: u64,
}

impl SentinelConn {
    pub fn new(
        settings: &SentinelSettings,
        url: &str,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        let sentinels = settings
            .sentinels
            .iter()
            .map(|address| {
                let url = match &settings.password {
                    Some(password) => format!("redis://:{password}@{address}"),
                    None => format!("redis://{address}"),
                };
                redis::Client::open(url)
            })
            .collect::<RedisResult<_>>()?;
        Ok(Self {
            sentinels,
            master: settings.master.clone(),
            base: url.into_connection_info()?,
            config,
            current: Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
        })
    }

    /// The primary in use (`host:port`), if one is connected.
    pub fn primary_address(&self) -> Option<String> {
        self.lock().as_ref().map(|p| p.address.clone())
    }

    /// A client for the current primary (for a subscription of its own).
    pub async fn primary_client(&self) -> RedisResult<redis::Client> {
        let (host, port) = self.ask_sentinels().await?;
        redis::Client::open(self.base.clone().set_addr(ConnectionAddr::Tcp(host, port)))
    }

    /// The connection to the primary, asking the sentinels when there is none.
    pub(super) async fn get(&self) -> RedisResult<ConnectionManager> {
        if let Some(conn) = self.checked_primary() {
            return Ok(conn);
        }
        let _one_at_a_time = self.resolving.lock().await;
        if let Some(conn) = self.checked_primary() {
            return Ok(conn);
        }
        let losses = LOSSES.load(Ordering::Relaxed);
        let (host, port) = self.ask_sentinels().await?;
        let address = format!("{host}:{port}");
        // Another connection lost a primary: keep this one if it is still the one named.
        if let Some(p) = self.lock().as_mut() {
            if p.address == address {
                p.checked = losses;
                return Ok(p.conn.clone());
            }
        }
        let info = self.base.clone().set_addr(ConnectionAddr::Tcp(host, port));
        let client = redis::Client::open(info)?;
        let mut conn = ConnectionManager::new_with_config(client, self.config.clone()).await?;
        // The sentinels may not have noticed a demotion yet: only a primary will do.
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
            return Err(not_found(format!(
                "{address}, named primary of {}, is not (yet) one",
                self.master
            )));
        }
        tracing::info!(primary = %address, master = %self.master, "connected to the primary Sentinel names");
        metrics::gauge!(crate::telemetry::SENTINEL_PRIMARY, "master" => self.master.clone(), "address" => address.clone())
            .set(1.0);
        *self.lock() = Some(Primary {
            address,
            conn: conn.clone(),
            checked: losses,
        });
        Ok(conn)
    }

    /// The connection, unless there is none or a loss elsewhere calls for a check.
    fn checked_primary(&self) -> Option<ConnectionManager> {
        let current = self.lock();
        let p = current.as_ref()?;
        (p.checked == LOSSES.load(Ordering::Relaxed)).then(|| p.conn.clone())
    }

    /// Forgets the primary when `error` says it is gone or no longer primary.
    pub(super) fn note(&self, error: &RedisError) {
        let lost = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || matches!(error.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"));
        if lost {
            if let Some(p) = self.lock().take() {
                LOSSES.fetch_add(1, Ordering::Relaxed);
                metrics::gauge!(crate::telemetry::SENTINEL_PRIMARY, "master" => self.master.clone(), "address" => p.address.clone())
                    .set(0.0);
                tracing::warn!(primary = %p.address, error = %error, "queue primary lost; asking the sentinels again");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Primary>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary's address as the first sentinel that answers names it.
    async fn ask_sentinels(&self) -> RedisResult<(String, u16)> {
        let mut last = None;
        for sentinel in &self.sentinels {
            let ask = async {
                let mut conn = sentinel.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            match tokio::time::timeout(ASK_TIMEOUT, ask).await {
                Ok(Ok(Some(address))) => return Ok(address),
                Ok(Ok(None)) => last = Some(format!("does not monitor {:?}", self.master)),
                Ok(Err(e)) => last = Some(e.to_string()),
                Err(_) => last = Some(format!("no answer in {ASK_TIMEOUT:?}")),
            }
        }
        Err(not_found(format!(
            "no sentinel named the primary of {:?} (last: {})",
            self.master,
            last.unwrap_or_default()
        )))
    }
}

fn not_found(why: String) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, why))
}
