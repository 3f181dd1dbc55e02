//! Wires the parts together: store, consumer, purger and HTTP server, with a clean stop.

use crate::config::{Config, Tokens, redact_url};
use crate::consumer;
use crate::health::Health;
use crate::http::{AppState, ServerLimits, StartPhase, Switch, router};
use crate::metrics;
use crate::store::Store;
use anyhow::Context;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A worker that is connected to Postgres, migrated and listening, but not yet consuming.
pub struct App {
    config: Config,
    /// Batches and the purge: a small pool of its own, so look-ups cannot starve commits.
    store: Store,
    /// Status look-ups.
    lookups: Store,
    /// With a replica (`lookups`): the primary's look-up pool, read while the replica is too
    /// far behind; and one connection to the replica for measuring its lag and one to the
    /// primary for checking it answers, out of reach of the look-ups (on the look-up pool, a
    /// primary busy with the look-ups the fallback sent it failed its 2 s ping, and the
    /// look-ups went back to the lagging replica).
    primary: Option<Store>,
    lag_probe: Option<(Store, Store)>,
    /// Look-ups start on the primary: the replica did not answer at start.
    replica_down_at_start: bool,
    /// One connection for sampling the dedup table.
    dedup_probe: Store,
    /// What `/readyz` pings: the primary and (with STATUS_DATABASE_URL) the replica, one
    /// connection each, apart from the look-up pool.
    ready_probes: Vec<crate::http::ReadyProbe>,
    /// The servers of `HTTP_ADDR` and `ADMIN_ADDR`, serving since [`App::listen`].
    servers: Servers,
    health: Arc<Health>,
    /// What the consumer uses of `config`.
    consumer: consumer::ConsumerSettings,
}

/// Connects to Postgres at `url`, waiting with backoff (1 s doubling to 30 s) while it does not
/// answer: a worker started before its database (a restart of both, a new cluster) waits for it
/// instead of exiting. A URL that cannot work, or a server that refuses the worker, fails at
/// once (see [`crate::store::StoreError::is_unreachable`]). What it waits for goes to `phase`
/// (what a starting worker's `/readyz` says), with no password and no server text.
pub async fn connect_waiting(
    url: &str,
    pool_size: u32,
    phase: Option<&StartPhase>,
) -> anyhow::Result<Store> {
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(30),
    );
    let (mut attempts, since) = (0, std::time::SystemTime::now());
    loop {
        attempts += 1;
        match Store::connect(url, pool_size).await {
            Ok(store) => {
                if let Some(phase) = phase {
                    phase.set(format!(
                        "connected to Postgres {}",
                        crate::pg::describe(url)
                    ));
                }
                return Ok(store);
            }
            Err(error) if error.is_unreachable() => {
                let wait = backoff.next_wait();
                if let Some(phase) = phase {
                    phase.set(format!(
                        "Postgres {} does not answer ({}): {attempts} attempts since {}, the next \
                         at {}",
                        crate::pg::describe(url),
                        error.short_reason(),
                        humantime::format_rfc3339_seconds(since),
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + wait),
                    ));
                }
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::new(error)),
                    postgres = %redact_url(url),
                    wait = ?wait,
                    "Postgres does not answer at start; trying again."
                );
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("connecting to Postgres at {}", redact_url(url))));
            }
        }
    }
}

/// A worker starting: its HTTP addresses bound and answering ([`crate::http::starting_router`]:
/// `/healthz` 200, `/metrics`, 503 with what it waits for elsewhere) while [`Starting::build`]
/// connects to Postgres and migrates. A worker whose database is not there yet is alive,
/// scraped and says why it is not ready (SPEC §5), instead of refusing every connection.
pub struct Starting {
    config: Config,
    servers: Servers,
    phase: StartPhase,
}

/// A listener's server, running from [`App::listen`] until the worker stops. One that fails
/// during the start is noticed when `App::run` waits for it (the worker then stops with its
/// error), not before.
struct Served {
    addr: SocketAddr,
    /// Set to the worker's router by [`App::run`].
    switch: Switch,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    fn spawn(
        listener: TcpListener,
        starting: Router,
        limits: ServerLimits,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let switch = Switch::new(starting);
        Ok(Self {
            addr: listener.local_addr()?,
            task: tokio::spawn(crate::http::serve(listener, switch.router(), limits, stop)),
            switch,
        })
    }

    /// Waits for the server to end (after the stop, or on a failure).
    async fn ended(self) -> std::io::Result<()> {
        self.task
            .await
            .unwrap_or_else(|panic| Err(std::io::Error::other(format!("it panicked: {panic}"))))
    }
}

/// The HTTP and admin servers, and their stop (also when dropped: a stop signal during the start,
/// a start or run that fails).
struct Servers {
    http: Served,
    admin: Option<Served>,
    stop: tokio_util::sync::DropGuard,
}

/// The admin listener has a connection cap of its own: a client that holds every connection
/// HTTP_ADDR allows cannot make the probes fail and the pod restart.
fn admin_limits(limits: ServerLimits) -> ServerLimits {
    ServerLimits {
        max_connections: 64,
        ..limits
    }
}

impl App {
    /// [`App::listen`], then [`Starting::build`].
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::listen(config)?.build().await
    }

    /// Checks the settings, binds the HTTP (and admin) address and serves the probes and the
    /// metrics on them while the worker starts (see [`Starting`]).
    pub fn listen(config: Config) -> anyhow::Result<Starting> {
        config.validate().map_err(anyhow::Error::msg)?;
        config.check_amqp_url().map_err(anyhow::Error::msg)?;
        if config.claim_window.is_zero() {
            tracing::warn!(
                "CLAIM_WINDOW is 0: a message whose attempts fall on both sides of UTC midnight \
                 can be counted twice. It is meant for tests; leave it unset in production."
            );
        }
        if config.dedup_retention < std::time::Duration::from_secs(24 * 3600) {
            tracing::warn!(
                dedup_retention = %humantime::format_duration(config.dedup_retention),
                "DEDUP_RETENTION is under a day: a message redelivered or published again after \
                 it (a publisher's retry, a replay) counts again. (`1m` is a minute; a month is \
                 `1M` or `30d`.)"
            );
        }
        let http = crate::http::bind(config.http_addr)
            .with_context(|| format!("binding the HTTP address {}", config.http_addr))?;
        let admin = match config.admin_addr {
            Some(addr) => Some(
                crate::http::bind(addr)
                    .with_context(|| format!("binding the admin address {addr}"))?,
            ),
            None => None,
        };
        let phase = StartPhase::default();
        phase.set(format!(
            "connecting to Postgres {}",
            crate::pg::describe(&config.database_url)
        ));
        // The recorder first: a gauge set before it is lost.
        let app = crate::http::starting_router(phase.clone(), metrics::install());
        metrics::readiness(false);
        let stop = CancellationToken::new();
        let limits = ServerLimits::from_config(&config);
        let http = Served::spawn(http, app.clone(), limits, stop.clone())
            .context("reading the HTTP address")?;
        let admin = admin
            .map(|admin| Served::spawn(admin, app, admin_limits(limits), stop.clone()))
            .transpose()
            .context("reading the admin address")?;
        tracing::info!(
            http = %http.addr,
            admin = admin.as_ref().map(|admin| admin.addr.to_string()),
            // `/healthz` and `/metrics` answer, the rest 503 until Postgres answers and the
            // migrations ran.
            "Listening while starting."
        );
        Ok(Starting {
            config,
            servers: Servers {
                http,
                admin,
                stop: stop.drop_guard(),
            },
            phase,
        })
    }
}

impl Starting {
    /// Connects to Postgres (waiting while it does not answer; failing fast when it refuses)
    /// and applies the migrations; `/readyz` says which meanwhile. The servers go on serving
    /// the start's router until [`App::run`] gives them the worker's.
    pub async fn build(self) -> anyhow::Result<App> {
        let Starting {
            config,
            servers,
            phase,
        } = self;
        let url = config.database_url.as_str();
        let connect = |size| connect_waiting(url, size, Some(&phase));
        // The commits in flight, plus the purge.
        let store = connect(config.in_flight + 1)
            .await?
            .with_db_timeout(config.db_timeout)
            .with_claim_window(config.claim_window);
        // The replica may be down at start: the worker still counts, and look-ups and /readyz
        // say so until it answers. Only its URL and TLS files are checked now.
        let replica = |pool_size| -> anyhow::Result<Option<Store>> {
            config
                .replica_url()
                .map(|replica| {
                    Store::open(replica, pool_size).with_context(|| {
                        format!(
                            "the look-up replica's settings (STATUS_DATABASE_URL) for {}",
                            crate::pg::describe(replica)
                        )
                    })
                })
                .transpose()
        };
        // With a replica, a look-up pool on the primary too, read while the replica is too far
        // behind (or down), and a pool of one for measuring its lag.
        // A look-up may wait for one group's query to end, then run its own (see
        // `crate::lookups`): each within a third of HTTP_REQUEST_TIMEOUT (and DB_TIMEOUT, and
        // 5 s), so a Postgres that stops answering is a 503 with Retry-After, not the request
        // timeout's 408.
        let lookup_deadline = config.db_timeout.min(config.http_request_timeout / 3);
        let mut replica_down_at_start = false;
        let (lookups, primary, lag_probe) = match replica(config.db_pool_size)? {
            Some(replica_pool) => {
                phase.set(format!(
                    "connecting to the look-up replica {}",
                    config
                        .replica_url()
                        .map(crate::pg::describe)
                        .unwrap_or_default()
                ));
                if let Err(error) = replica_pool
                    .ping_within(std::time::Duration::from_secs(5))
                    .await
                {
                    replica_down_at_start = true;
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::new(error)),
                        "The look-up replica does not answer at start; look-ups read from the \
                         primary and /readyz says so until it does."
                    );
                }
                let primary = connect(config.db_pool_size)
                    .await?
                    .with_db_timeout(lookup_deadline);
                let probes = match replica(1)? {
                    Some(lag) => Some((
                        lag,
                        Store::open(url, 1).context("the primary's settings (DATABASE_URL)")?,
                    )),
                    None => None,
                };
                (replica_pool, Some(primary), probes)
            }
            None => (connect(config.db_pool_size).await?, None, None),
        };
        let lookups = lookups.with_db_timeout(lookup_deadline);
        // Readiness pings: one connection per server, so a look-up flood cannot starve them.
        let mut ready_probes = vec![crate::http::ReadyProbe::new(
            format!("Postgres {}", crate::pg::describe(url)),
            connect(1).await?,
            config.replica_url().is_none(),
        )];
        if let (Some(replica), Some(store)) = (config.replica_url(), replica(1)?) {
            ready_probes.push(crate::http::ReadyProbe::new(
                format!("Postgres replica {}", crate::pg::describe(replica)),
                store,
                true,
            ));
        }
        phase.set("applying migrations");
        let report = store.migrate().await.context("applying migrations")?;
        for migration in report.applied_migrations() {
            tracing::info!(migration = %migration, "Migration applied.");
        }
        let dedup_probe = connect(1).await?;
        servers.http.switch.started_soon();
        if let Some(admin) = &servers.admin {
            admin.switch.started_soon();
        }
        Ok(App {
            consumer: consumer::ConsumerSettings::from_config(&config),
            config,
            store,
            lookups,
            primary,
            lag_probe,
            replica_down_at_start,
            dedup_probe,
            ready_probes,
            servers,
            health: Arc::new(Health::default()),
        })
    }
}

impl App {
    /// Installs a fault injector (tests only; see [`consumer::FaultPoint`]).
    pub fn set_fault_hook(&mut self, hook: consumer::FaultHook) {
        self.consumer.fault_hook = Some(hook);
    }

    /// This worker's own counts (the metrics are the process'; tests run several workers).
    pub fn stats(&self) -> Arc<consumer::WorkerStats> {
        self.consumer.stats.clone()
    }

    /// The address the HTTP server listens on (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.servers.http.addr
    }

    /// The address `ADMIN_ADDR` listens on, when set (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.servers.admin.as_ref().map(|admin| admin.addr)
    }

    /// Runs until `cancel` fires, then commits and acks what is in flight, stops the HTTP server
    /// and returns.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App {
            config,
            store,
            lookups,
            primary,
            lag_probe,
            replica_down_at_start,
            dedup_probe,
            ready_probes,
            servers:
                Servers {
                    http,
                    admin,
                    stop: stop_servers,
                },
            health,
            consumer: consumer_settings,
        } = self;
        // HTTP ingest (only with tokens: SPEC §5, never open) and the webhooks (only with a
        // provider's setting) publish through one confirming publisher on its own connection.
        let ingest_tokens = Tokens::configured(&config.ingest_tokens);
        let publisher = (ingest_tokens.is_some() || config.webhooks.any()).then(|| {
            let mut settings =
                crate::ingest::IngestSettings::new(&config.amqp.amqp_url, config.amqp.topology());
            settings.pack_window = std::time::Duration::from_millis(config.ingest_pack_window_ms);
            settings.max_unconfirmed = config.ingest_max_unconfirmed as usize;
            // The publish and its confirm each wait a third of HTTP_REQUEST_TIMEOUT at most (and
            // 250 ms at least: a publish that times out drops the connection every request
            // shares), so a broker that takes publishes but never confirms them gets ingest's
            // own 503 (not confirmed) rather than the request's 408, which says nothing of the
            // broker (with HTTP_REQUEST_TIMEOUT of 750 ms or more).
            settings.confirm_timeout = settings
                .confirm_timeout
                .min(config.http_request_timeout / 3)
                .max(std::time::Duration::from_millis(250));
            crate::ingest::Ingest::start(settings)
        });
        let webhooks = match &publisher {
            Some(publisher) if config.webhooks.any() => Some(
                crate::webhooks::WebhookState::new(
                    Arc::new(publisher.clone()),
                    config.webhooks.clone(),
                )
                .context("configuring the webhooks")?,
            ),
            _ => None,
        };
        let ingest = ingest_tokens.and_then(|tokens| Some((publisher.clone()?, tokens)));
        let closing = publisher;
        let fallback = crate::replica::Fallback::new(replica_down_at_start);
        let state = AppState {
            lookups: crate::lookups::Lookups::spawn(lookups.clone()),
            store: lookups,
            primary: primary.map(|primary| {
                let lookups = crate::lookups::Lookups::spawn(primary.clone());
                (primary, lookups, fallback.clone())
            }),
            ready_probes: ready_probes.into(),
            health: health.clone(),
            metrics: metrics::install(),
            threshold: config.threshold,
            ingest,
            query_tokens: Tokens::configured(&config.query_tokens),
            webhooks,
            answers: crate::http::AnswerBudget::new(
                config.http_answer_budget,
                config.http_request_timeout / 3,
            ),
        };
        tracing::info!(
            http = %http.addr,
            amqp = %redact_url(&config.amqp.amqp_url),
            exchange = %config.amqp.exchange,
            queue = %config.amqp.queue,
            batch_size = config.batch_size,
            batch_timeout_ms = config.batch_timeout_ms,
            prefetch = config.prefetch,
            in_flight = config.in_flight,
            "Worker starting."
        );

        let tracker = TaskTracker::new();
        let upkeep = state.metrics.clone();
        let upkeep_health = health.clone();
        let upkeep_cancel = cancel.clone();
        tracker.spawn(async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        upkeep.run_upkeep();
                        metrics::process_memory();
                        metrics::read_gate_sample();
                        metrics::readiness(upkeep_health.consuming() && upkeep_health.db_error().is_none());
                    }
                    _ = upkeep_cancel.cancelled() => {
                        // Stopping: not ready any more (it stayed 1 for the whole stop).
                        metrics::readiness(false);
                        return;
                    }
                }
            }
        });
        // On the primary, where the ids are (the look-up pool may be a replica's, whose table
        // statistics are its own), on a connection of its own (a sample may take seconds).
        tracker.spawn(dedup_gauges(
            dedup_probe,
            config.dedup_retention,
            cancel.clone(),
        ));
        tracker.spawn(consumer::purge_loop(
            store.clone(),
            config.dedup_retention,
            cancel.clone(),
        ));
        if let Some((lag_probe, primary_ping)) = lag_probe {
            tracker.spawn(crate::replica::lag_loop(
                lag_probe,
                primary_ping,
                std::time::Duration::from_secs(5),
                config.max_replica_lag,
                fallback,
                cancel.clone(),
            ));
        }
        // The servers have run since `listen`; from now on they serve the worker's routers,
        // and they stop with it.
        let stop_servers = stop_servers.disarm();
        tracker.spawn({
            let cancel = cancel.clone();
            let stop_servers = stop_servers.clone();
            async move {
                cancel.cancelled().await;
                stop_servers.cancel();
            }
        });
        // Should `run` end before the stop (an error below), the servers stop too.
        let _stop_servers = stop_servers.drop_guard();
        let admin_server = admin.map(|admin| {
            admin.switch.start(crate::http::admin_router(state.clone()));
            let stop_all = cancel.clone();
            tracker.spawn(async move {
                // A server that ends before the stop (an error, a panic) stops the worker: it
                // exits 1 with the reason instead of counting on without probes or metrics.
                let _stop_all = stop_all.drop_guard();
                admin.ended().await
            })
        });
        http.switch.start(router(state));
        let http_cancel = cancel.clone();
        let server = tracker.spawn(async move {
            // As for the admin server above.
            let _stop_all = http_cancel.drop_guard();
            let served = http.ended().await;
            // Only HTTP requests publish through it: closed once the server has stopped (its
            // drain ends 2 s before SHUTDOWN_TIMEOUT, the close takes at most 1 s), while the
            // consumer may still be stopping.
            if let Some(ingest) = closing {
                ingest.close().await;
            }
            served
        });
        let consumer_cancel = cancel.clone();
        let consumer = tracker.spawn(async move {
            // As for the servers: a consumer that ends before the stop (a panic) stops the
            // worker, which exits 1 with the reason. Alone, the task died and the worker went on
            // serving look-ups and answering /readyz 200 without consuming again.
            let _stop_all = consumer_cancel.clone().drop_guard();
            consumer::run(consumer_settings, store, health, consumer_cancel).await;
        });
        tracker.close();
        tracker.wait().await;
        consumer.await.context("the consumer task panicked")?;
        server
            .await
            .context("the HTTP server task panicked")?
            .context("the HTTP server failed")?;
        if let Some(admin_server) = admin_server {
            admin_server
                .await
                .context("the admin HTTP server task panicked")?
                .context("the admin HTTP server failed")?;
        }
        tracing::info!("Worker stopped.");
        Ok(())
    }
}

/// Samples the dedup table for the alert on an upkeep that fails or falls behind. Ids live in
/// partitions of whole days dropped once their whole range is older than the retention, so an
/// id can be kept up to one partition width past it; ids older than the retention plus a width
/// plus three upkeep intervals (the upkeep runs every retention/4, at most every 10 minutes)
/// should not exist.
async fn dedup_gauges(store: Store, retention: std::time::Duration, cancel: CancellationToken) {
    let upkeep_every = (retention / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(600),
    );
    let width = crate::store::partition_days(retention) as u64 * 24 * 3600;
    let overdue_after = retention + std::time::Duration::from_secs(width) + upkeep_every * 3;
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(60));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let sampled = async {
            let overdue = store.overdue_applied(overdue_after, 10_000).await?;
            Ok::<_, crate::store::StoreError>((store.applied_estimate().await?, overdue))
        };
        // A sample that hangs on a frozen Postgres must not hold up the stop, nor the next
        // sample (it had no bound of its own).
        let sampled = tokio::select! {
            sampled = tokio::time::timeout(std::time::Duration::from_secs(30), sampled) => sampled,
            _ = cancel.cancelled() => return,
        };
        match sampled {
            Ok(Ok((ids, overdue))) => metrics::dedup_table(ids, overdue, retention),
            // Once a minute at most. The gauges keep their last values meanwhile, so the
            // alert on overdue ids cannot see a purge that fails while this does: said here.
            Ok(Err(error)) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(error)),
                "Sampling the dedup table failed; its gauges keep their last values."
            ),
            Err(_) => tracing::warn!(
                "Sampling the dedup table took over 30 s; its gauges keep their last values."
            ),
        }
    }
}
