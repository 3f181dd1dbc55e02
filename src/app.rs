//! Wires the parts together: store, consumer, purger and HTTP server, with a clean stop.

use crate::config::{Config, redact_url};
use crate::consumer;
use crate::health::Health;
use crate::http::{AppState, router};
use crate::metrics;
use crate::store::Store;
use anyhow::Context;
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
    /// Status look-ups and health checks.
    lookups: Store,
    listener: TcpListener,
    health: Arc<Health>,
}

impl App {
    /// Connects to Postgres (failing fast if it does not answer), applies the migrations and
    /// binds the HTTP address.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let url = config.database_url.as_str();
        let connect = |size| async move {
            Store::connect(url, size)
                .await
                .with_context(|| format!("connecting to Postgres at {}", redact_url(url)))
        };
        // The commits in flight, plus the purge.
        let store = connect(config.in_flight + 1)
            .await?
            .with_db_timeout(config.db_timeout);
        let lookups = connect(config.db_pool_size).await?;
        let report = store.migrate().await.context("applying migrations")?;
        for migration in report.applied_migrations() {
            tracing::info!(migration = %migration, "Migration applied.");
        }
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the HTTP address {}", config.http_addr))?;
        Ok(Self {
            config,
            store,
            lookups,
            listener,
            health: Arc::new(Health::default()),
        })
    }

    /// Installs a fault injector (tests only; see [`crate::store::FaultPoint`]).
    pub fn set_fault_hook(&mut self, hook: crate::store::FaultHook) {
        self.store.set_fault_hook(hook);
    }

    /// The address the HTTP server listens on (useful with port 0).
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener
            .local_addr()
            .context("reading the HTTP address")
    }

    /// Runs until `cancel` fires, then commits and acks what is in flight, stops the HTTP server
    /// and returns.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App {
            config,
            store,
            lookups,
            listener,
            health,
        } = self;
        let state = AppState {
            store: lookups,
            health: health.clone(),
            metrics: metrics::install(),
            threshold: config.threshold,
        };
        tracing::info!(
            http = %listener.local_addr().context("reading the HTTP address")?,
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
        let upkeep_cancel = cancel.clone();
        tracker.spawn(async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = ticker.tick() => upkeep.run_upkeep(),
                    _ = upkeep_cancel.cancelled() => return,
                }
            }
        });
        tracker.spawn(consumer::purge_loop(
            store.clone(),
            config.dedup_retention,
            cancel.clone(),
        ));
        let http_cancel = cancel.clone();
        let server = tracker.spawn(async move {
            axum::serve(listener, router(state))
                .with_graceful_shutdown(async move { http_cancel.cancelled().await })
                .await
        });
        let consumer_cancel = cancel.clone();
        tracker.spawn(async move {
            consumer::run(config, store, health, consumer_cancel).await;
        });
        tracker.close();
        tracker.wait().await;
        server
            .await
            .context("the HTTP server task panicked")?
            .context("the HTTP server failed")?;
        tracing::info!("Worker stopped.");
        Ok(())
    }
}
