//! Look-ups from a streaming replica (`STATUS_DATABASE_URL`, SPEC §6): its lag as a metric, and
//! look-ups from the primary while it is further behind than `MAX_REPLICA_LAG` or does not
//! answer. `/readyz` pings the replica beside the primary (see `crate::http::ReadyProbe`).

use crate::store::Store;
use metrics::{describe_gauge, gauge};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Seconds the replica is behind: 0 when it streams from its primary and has replayed all it
/// received (or is a primary), else the age of the last transaction it replayed. Without a WAL
/// receiver (primary gone, replication broken) what it received says nothing of what it missed,
/// so the age counts: it used to show 0 there, a replica cut off for hours looking current.
/// `pg_stat_wal_receiver` has its row (its pid, at least) for every role while a receiver runs.
/// A replica that has replayed no transaction since it started counts from its start.
const LAG: &str = "SELECT CASE \
       WHEN NOT pg_is_in_recovery() THEN 0 \
       WHEN EXISTS (SELECT 1 FROM pg_stat_wal_receiver) \
            AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
       ELSE EXTRACT(EPOCH FROM now() \
            - COALESCE(pg_last_xact_replay_timestamp(), pg_postmaster_start_time())) \
     END::float8";

/// Whether reads go to the primary instead of the replica: set by [`lag_loop`], read by the
/// HTTP handlers. Cheap to clone.
#[derive(Clone, Default)]
pub struct Fallback(Arc<AtomicBool>);

impl Fallback {
    /// `active` from the start: the replica did not answer at start (until the first
    /// measurement says otherwise).
    pub fn new(active: bool) -> Self {
        Self(Arc::new(AtomicBool::new(active)))
    }

    pub fn is_active(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets it, logging and exporting a change (`catchall_lookups_from_primary`).
    fn set(&self, active: bool, why: &str) {
        gauge!("catchall_lookups_from_primary").set(if active { 1.0 } else { 0.0 });
        if self.0.swap(active, Ordering::Relaxed) != active {
            if active {
                tracing::warn!(
                    why,
                    "Look-ups read from the primary until the replica catches up."
                );
            } else {
                tracing::info!("The replica caught up: look-ups read from it again.");
            }
        }
    }
}

/// Measures the replica's lag every `every` until `cancel` fires, as the gauge
/// `catchall_replica_lag_seconds`; `catchall_replica_up` is 0 while it does not answer, and the
/// lag then grows from the last one measured (the replica is at least that far behind: it kept
/// its last value, a replica down for hours looking current). `replica` is a pool of its own, so
/// look-ups holding every pooled connection do not make the replica look down. While the lag
/// passes `max_lag` or the replica does not answer, `fallback` sends reads to the primary, if
/// `primary` (a pool of its own too, not the look-ups') answers (in a failover the replica lags because its primary is gone: stale answers beat
/// none); back to the replica once its lag is under half of `max_lag`, so a replica hovering
/// around the bound does not make answers flip between two servers every few seconds.
pub async fn lag_loop(
    replica: Store,
    primary: Store,
    every: Duration,
    max_lag: Duration,
    fallback: Fallback,
    cancel: CancellationToken,
) {
    describe_gauge!(
        "catchall_replica_lag_seconds",
        metrics::Unit::Seconds,
        "How far the look-up replica (STATUS_DATABASE_URL) is behind the primary."
    );
    describe_gauge!(
        "catchall_replica_up",
        "1 while the look-up replica (STATUS_DATABASE_URL) answers, else 0."
    );
    describe_gauge!(
        "catchall_lookups_from_primary",
        "1 while look-ups read from DATABASE_URL because the replica is further behind than \
         MAX_REPLICA_LAG or does not answer."
    );
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last lag measured, and when.
    let mut last: Option<(f64, Instant)> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        // A measurement against servers that do not answer takes up to 4 s (the query, then
        // the primary's ping): the stop does not wait for it (it did, past the shortest
        // SHUTDOWN_TIMEOUT's share).
        tokio::select! {
            () = measure(&replica, &primary, max_lag, &fallback, &mut last) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// One measurement of the lag loop: the gauges, and where look-ups read. `last` is the last
/// lag measured, and when.
async fn measure(
    replica: &Store,
    primary: &Store,
    max_lag: Duration,
    fallback: &Fallback,
    last: &mut Option<(f64, Instant)>,
) {
    match replica.query_f64_within(LAG, Duration::from_secs(2)).await {
        Ok(lag) => {
            *last = Some((lag, Instant::now()));
            gauge!("catchall_replica_lag_seconds").set(lag);
            gauge!("catchall_replica_up").set(1.0);
            let bound = max_lag.as_secs_f64();
            let behind = lag
                > if fallback.is_active() {
                    bound / 2.0
                } else {
                    bound
                };
            if behind {
                use_primary(
                    primary,
                    fallback,
                    "the replica is further behind than MAX_REPLICA_LAG",
                )
                .await;
            } else {
                fallback.set(false, "");
            }
        }
        Err(error) => {
            gauge!("catchall_replica_up").set(0.0);
            if let Some((lag, at)) = *last {
                gauge!("catchall_replica_lag_seconds").set(lag + at.elapsed().as_secs_f64());
            }
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(error)),
                "The look-up replica does not answer."
            );
            use_primary(primary, fallback, "the replica does not answer").await;
        }
    }
}

/// Reads from the primary if it answers now; else from the replica (a failover: the primary is
/// gone, and the replica's answers, however old, beat none).
async fn use_primary(primary: &Store, fallback: &Fallback, why: &str) {
    match primary.ping_within(Duration::from_secs(2)).await {
        Ok(()) => fallback.set(true, why),
        Err(error) => {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(error)),
                "The primary does not answer either: look-ups read the replica."
            );
            fallback.set(false, "");
        }
    }
}
