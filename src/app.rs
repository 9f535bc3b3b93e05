//! `Application`: every part of a running process, built from a [`Config`] and a [`Mode`].
//!
//! `build` binds the ports (port 0 works, and `address()` tells the real one) and connects
//! what must be there at start; `run_until_stopped` serves until the given future ends,
//! then shuts down in order: stop accepting, answer every waiting request (202 when its
//! entry is queued but unfinished), let workers finish or abandon their batch, exit.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, EngineConfirm};
use crate::connection::{self, RedisConn};
use crate::console::access::Access;
use crate::console::Console;
use crate::engine::confirm::{self, Confirmations};
use crate::engine::EnginePublisher;
use crate::health::{Probe, Readiness};
use crate::http::auth::Authenticator;
use crate::http::listener::{self, ConnectionLimits, Site};
use crate::http::routes::ApiState;
use crate::queue::monitor::QueueMonitor;
use crate::queue::status::StatusKeys;
use crate::queue::{self, ingress, layout, outcome};
use crate::retry::RetryPolicy;
use crate::store::{Store, StoreOptions};
use crate::telemetry;
use crate::telemetry::trace::Tracing;
use crate::worker::job::EngineConfirmation;
use crate::worker::runner::PoolSettings;
use crate::worker::{WorkerContext, WorkerPool};

/// Which parts run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Listener and workers together (the default).
    Serve,
    /// The HTTP listener only.
    Listen,
    /// The worker pool only (with health, readiness and metrics).
    Work,
}

impl Mode {
    fn listens(self) -> bool {
        matches!(self, Mode::Serve | Mode::Listen)
    }

    fn works(self) -> bool {
        matches!(self, Mode::Serve | Mode::Work)
    }
}

/// A built, not yet running, process.
pub struct Application {
    config: Config,
    mode: Mode,
    api_listener: TcpListener,
    metrics_listener: TcpListener,
    /// The console's listener and what it serves; `None` with `ADMIN_ADDR=off`.
    admin: Option<(TcpListener, Arc<Console>)>,
    api: Arc<ApiState>,
    worker: Option<Arc<WorkerContext>>,
    /// The queue's connection the listener uses, shared with the backlog monitor.
    queue: RedisConn,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(config: Config, mode: Mode) -> anyhow::Result<Self> {
        let metrics = telemetry::metrics_handle();
        let api_listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on LISTEN_ADDR {}", config.listen_addr))?;
        let metrics_listener = TcpListener::bind(config.metrics_addr)
            .await
            .with_context(|| format!("cannot listen on METRICS_ADDR {}", config.metrics_addr))?;
        let admin_listener = match config.admin_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on ADMIN_ADDR {addr} (ADMIN_ADDR=off disables the console)")
            })?),
            None => None,
        };
        drop(metrics);

        let shutdown = CancellationToken::new();
        let tracing = Tracing::start(config.tracing.as_ref())?;
        let listener_id = uuid::Uuid::new_v4().simple().to_string();
        let waiters = Arc::new(outcome::Waiters::default());
        let topology = queue::QueueTopology::of(&config);
        // Workers WAIT on this connection after finishing entries (QUEUE_MIN_REPLICAS).
        let replica_wait = if config.queue_min_replicas > 0 {
            config.queue_replica_timeout
        } else {
            Duration::ZERO
        };
        let queue_conn =
            queue::connect_queue(&topology, config.enqueue_timeout + replica_wait).await?;

        // The group is created here when missing, so entries queued before any worker
        // starts are kept for it; workers create it too when the Redis was down now.
        let groups = async {
            for stream in &topology.shards {
                ingress::ensure_group(&queue_conn, stream, &config.ensure_group).await?;
            }
            // So that workers of a later layout know to drain these streams.
            layout::register(&queue_conn, &topology.ensure_stream, &topology.shards).await
        };
        match tokio::time::timeout(Duration::from_secs(2), groups).await {
            Ok(Ok(())) => queue::warn_unless_durable(&queue_conn).await,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "queue Redis is not answering; ensure requests get 503 until it does")
            }
            Err(_) => tracing::warn!(
                "queue Redis did not answer in 2 s; ensure requests get 503 until it does"
            ),
        }

        let status = StatusKeys {
            ttl_secs: config.outcome_ttl_secs,
        };
        let mut probes = vec![Probe::redis("queue_redis", queue_conn.clone())];
        let worker = if mode.works() {
            let store = Store::open(
                config.database_url.as_deref(),
                &config.database_path,
                StoreOptions::of_service(&config),
            )
            .await?;
            let engine_conn = connection::connect_via(
                &config.engine_redis_url,
                config.engine_redis_sentinel.as_ref(),
                Duration::from_secs(2),
            )?;
            probes.push(Probe::redis("engine_redis", engine_conn.clone()));
            let pinged = store.clone();
            probes.push(Probe::new(store.name(), move || {
                let store = pinged.clone();
                Box::pin(async move { store.ping().await.is_ok() })
            }));
            let local = mode
                .listens()
                .then(|| (listener_id.clone(), Arc::clone(&waiters)));
            let confirm =
                (config.engine_confirm == EngineConfirm::Ack).then(|| EngineConfirmation {
                    confirmations: Arc::new(Confirmations::default()),
                    timeout: config.engine_confirm_timeout,
                    max_attempts: config.engine_confirm_max_attempts,
                });
            Some(Arc::new(WorkerContext {
                store,
                engine: EnginePublisher::new(
                    engine_conn,
                    config.engine_stream.clone(),
                    Duration::from_secs(2),
                ),
                confirm,
                status,
                max_deliveries: config.max_deliveries,
                claim_idle: config.claim_idle,
                replicas: (config.queue_min_replicas > 0)
                    .then_some((config.queue_min_replicas, config.queue_replica_timeout)),
                queue: queue_conn.clone(),
                outcomes: outcome::OutcomeBus::new(
                    local,
                    queue_conn.clone(),
                    config.ensure_stream.clone(),
                    if topology.cluster {
                        topology.nodes.clone()
                    } else {
                        Vec::new()
                    },
                ),
                group: config.ensure_group.clone(),
                retry: RetryPolicy {
                    initial: config.retry_initial,
                    max: config.retry_max,
                },
                tracing: tracing.clone(),
                shutdown: shutdown.clone(),
            }))
        } else {
            None
        };

        let replication = if config.queue_min_replicas > 0 && mode.listens() {
            Some(queue::replication::Replication::connect(&topology, &config).await?)
        } else {
            None
        };
        let api = Arc::new(ApiState {
            auth: Authenticator::new(&config.jwt)?,
            ingress: mode.listens().then(|| {
                let ingress = ingress::Ingress::new(
                    queue_conn.clone(),
                    topology.clone(),
                    config.enqueue_timeout,
                    status,
                );
                match replication {
                    Some(r) => ingress.with_replication(r),
                    None => ingress,
                }
            }),
            waiters,
            listener_id,
            wait: config.ensure_wait,
            readiness: Arc::new(Readiness::new(probes)),
            backlog: Arc::default(),
            max_backlog: config.queue_max_backlog,
            body_timeout: config.header_read_timeout,
            cors: config.cors_allowed_origins.clone(),
            tracing,
            shutdown: shutdown.clone(),
        });
        let admin = match admin_listener {
            // A connection of its own (lazy, like the others): a page's scans never wait
            // behind, nor delay, the listener's XADDs, and may take up to 5 s.
            Some(listener) => Some((
                listener,
                queue::connect_queue(&topology, Duration::from_secs(5)).await?,
            )),
            None => None,
        };
        let admin = admin.map(|(listener, console_conn)| {
            let console = Console {
                api: Arc::clone(&api),
                queue: console_conn,
                topology: topology.clone(),
                group: config.ensure_group.clone(),
                store: worker.as_ref().map(|w| w.store.clone()),
                status,
                access: Access::new(config.admin_token.as_ref().map(|t| t.as_bytes().to_vec())),
                claim_idle_ms: config.claim_idle.as_millis() as u64,
                mode: match mode {
                    Mode::Serve => "serve",
                    Mode::Listen => "listen",
                    Mode::Work => "work",
                },
                redis_url: crate::console::redacted_url(&config.redis_url),
            };
            (listener, Arc::new(console))
        });
        Ok(Self {
            config,
            mode,
            api_listener,
            metrics_listener,
            admin,
            api,
            worker,
            queue: queue_conn,
            shutdown,
        })
    }

    /// The address the API listens on (the real port when 0 was asked for).
    pub fn address(&self) -> SocketAddr {
        self.api_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The console's address, when it runs (the real port when 0 was asked for).
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// The requests waiting for their outcome in this process's listener.
    pub fn waiters(&self) -> Arc<outcome::Waiters> {
        Arc::clone(&self.api.waiters)
    }

    /// The worker step, for tests that drive batches by hand.
    pub fn worker(&self) -> Option<Arc<WorkerContext>> {
        self.worker.clone()
    }

    /// Runs until `stop` completes, then shuts down within `SHUTDOWN_GRACE_SECS`.
    pub async fn run_until_stopped(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let limits = ConnectionLimits {
            header_read_timeout: self.config.header_read_timeout,
            max_connections: self.config.max_connections,
            shutdown_grace: self.config.shutdown_grace,
        };
        tracing::info!(mode = ?self.mode, address = %self.address(), metrics = %self.metrics_address(), "ensure-user running");
        tracker.spawn(listener::run(
            self.api_listener,
            Site::Api(Arc::clone(&self.api)),
            limits,
            self.shutdown.clone(),
        ));
        if let Some((admin_listener, console)) = self.admin {
            tracing::info!(
                console = %format!("http://{}/console/", admin_listener.local_addr()?),
                token_required = console.access.requires_token(),
                "console running"
            );
            tracker.spawn(listener::run(
                admin_listener,
                Site::Admin(Arc::new(move |req, peer| {
                    Box::pin(crate::console::handle(Arc::clone(&console), req, peer))
                })),
                limits,
                self.shutdown.clone(),
            ));
        }
        tracker.spawn(listener::run(
            self.metrics_listener,
            Site::Metrics(telemetry::metrics_handle()),
            limits,
            self.shutdown.clone(),
        ));
        if self.mode.listens() {
            tracker.spawn(outcome::run_subscriber(
                queue::QueueTopology::of(&self.config),
                outcome::channel(&self.config.ensure_stream, &self.api.listener_id),
                Arc::clone(&self.api.waiters),
                self.shutdown.clone(),
            ));
        }
        tracker.spawn(
            QueueMonitor {
                conn: self.queue.clone(),
                shards: queue::QueueTopology::of(&self.config).shards,
                ensure_stream: self.config.ensure_stream.clone(),
                group: self.config.ensure_group.clone(),
                backlog: Arc::clone(&self.api.backlog),
                max_backlog: self.config.queue_max_backlog,
            }
            .run(Duration::from_millis(250), self.shutdown.clone()),
        );
        tracker.spawn(telemetry::run_metrics_upkeep(
            telemetry::metrics_handle(),
            self.shutdown.clone(),
        ));
        tracker.spawn(crate::health::watch(
            Arc::clone(&self.api.readiness),
            self.shutdown.clone(),
        ));
        if let Some(ctx) = &self.worker {
            if let Some(confirm) = &ctx.confirm {
                // Its own connection: the reader blocks on XREAD.
                tracker.spawn(confirm::run_reply_reader(
                    connection::connect_via(
                        &self.config.engine_redis_url,
                        self.config.engine_redis_sentinel.as_ref(),
                        Duration::from_secs(3),
                    )?,
                    self.config.engine_reply_stream.clone(),
                    Arc::clone(&confirm.confirmations),
                    self.shutdown.clone(),
                ));
            }
            WorkerPool::new(
                Arc::clone(ctx),
                PoolSettings {
                    topology: queue::QueueTopology::of(&self.config),
                    concurrency: self.config.worker_concurrency,
                    batch_size: self.config.worker_batch_size,
                    block: self.config.worker_block,
                    claim_idle: self.config.claim_idle,
                },
            )
            .spawn(&tracker);
        }
        tracker.close();

        stop.await;
        tracing::info!("shutting down");
        self.shutdown.cancel();
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.config.shutdown_grace, "shutdown grace ran out; exiting anyway");
        }
        // What the last requests and batches traced is sent before the process ends.
        let traces = self.api.tracing.clone();
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        tracing::info!("stopped");
        Ok(())
    }
}
