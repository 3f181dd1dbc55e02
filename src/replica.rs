//! Look-ups from a streaming replica (`STATUS_DATABASE_URL`, SPEC §6): its lag as a metric, and
//! look-ups from the primary while it is further behind than `MAX_REPLICA_LAG` or does not
//! answer. `/readyz` pings the replica beside the primary (see `crate::http::ReadyProbe`).

use crate::store::{Store, StoreError};
use metrics::{describe_gauge, gauge};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;

/// Seconds the replica is behind by its own account, and what it has replayed (NULL on a
/// primary). The account is 0 when it streams from its primary and has replayed all it received
/// (or is a primary), else the age of the last transaction it replayed. Without a WAL receiver
/// (primary gone, replication broken) what it received says nothing of what it missed, so the
/// age counts: it used to show 0 there, a replica cut off for hours looking current.
/// `pg_stat_wal_receiver` has its row (its pid, at least) for every role while a receiver runs.
/// A replica that has replayed no transaction since it started counts from its start. Used only
/// while the primary does not answer: a receiver that runs and receives nothing (its primary's
/// sender stuck, a network that drops packets without a reset) also reads 0, until
/// `wal_receiver_timeout` (60 s) ends it; [`Unreplayed`] measures against the primary instead.
const REPLICA: &str = "SELECT CASE \
       WHEN NOT pg_is_in_recovery() THEN 0 \
       WHEN EXISTS (SELECT 1 FROM pg_stat_wal_receiver) \
            AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
       ELSE EXTRACT(EPOCH FROM now() \
            - COALESCE(pg_last_xact_replay_timestamp(), pg_postmaster_start_time())) \
     END::float8, pg_last_wal_replay_lsn()";

/// How far the primary has flushed its WAL: all a replica can have received from it.
const PRIMARY: &str = "SELECT pg_current_wal_flush_lsn()";

/// The primary's WAL positions, as the lag loop read them, that the replica has not replayed:
/// each with when it was read, oldest first. The replica is as far behind as the oldest is old:
/// it lacks WAL the primary had then. This is measured in the lag loop's ticks (5 s), whatever
/// the replica says of itself, and whatever was written (a checkpoint's record on an idle
/// primary is not hours of lag, as the age of the last transaction replayed would say).
#[derive(Default)]
struct Unreplayed(std::collections::VecDeque<(u64, Instant)>);

impl Unreplayed {
    /// At most this many positions are kept (85 minutes of ticks); past it, the ones after the
    /// oldest go, so the lag stays right and a partial catch-up is seen a little late.
    const MOST: usize = 1024;

    /// The primary had flushed its WAL to `position` at `at`.
    fn flushed(&mut self, position: u64, at: Instant) {
        if self.0.back().is_none_or(|&(newest, _)| position > newest) {
            if self.0.len() >= Self::MOST {
                self.0.remove(1);
            }
            self.0.push_back((position, at));
        }
    }

    /// The replica has replayed up to `position`.
    fn replayed(&mut self, position: u64) {
        while self
            .0
            .front()
            .is_some_and(|&(oldest, _)| oldest <= position)
        {
            self.0.pop_front();
        }
    }

    /// Seconds since the oldest position the replica lacks was read on the primary.
    fn lag(&self) -> f64 {
        self.0
            .front()
            .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64())
    }
}

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
/// `catchall_replica_lag_seconds`: against the primary's WAL ([`Unreplayed`]), or by the
/// replica's own account ([`REPLICA`]) while the primary does not answer. `catchall_replica_up`
/// is 0 while the replica does not answer, and the lag then grows from the last one measured
/// (the replica is at least that far behind: it kept its last value, a replica down for hours
/// looking current). `replica` and `primary` are pools of their own, not the look-ups', so
/// look-ups holding every pooled connection do not make either look down. While the lag passes
/// `max_lag` or the replica does not answer, `fallback` sends reads to the primary if it
/// answers (in a failover the replica lags because its primary is gone: stale answers beat
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
    let mut unreplayed = Unreplayed::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        // A measurement against servers that do not answer takes up to 2 s (the two queries
        // run at once): the stop does not wait for it (it did, past the shortest
        // SHUTDOWN_TIMEOUT's share).
        tokio::select! {
            () = measure(&replica, &primary, max_lag, &fallback, &mut last, &mut unreplayed) => {}
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
    unreplayed: &mut Unreplayed,
) {
    let within = Duration::from_secs(2);
    let read_at = Instant::now();
    let (on_primary, on_replica) = tokio::join!(
        primary.query_one_within(PRIMARY, within),
        replica.query_one_within(REPLICA, within),
    );
    // The primary answers if it tells its WAL position (a server in recovery cannot).
    let flushed = on_primary.and_then(|row| Ok(u64::from(row.try_get::<_, PgLsn>(0)?)));
    let on_replica = on_replica.and_then(|row| {
        Ok((
            row.try_get::<_, f64>(0)?,
            row.try_get::<_, Option<PgLsn>>(1)?,
        ))
    });
    match on_replica {
        Ok((own_account, replayed)) => {
            let lag = match (&flushed, replayed) {
                // Not a replica: nothing to lag behind.
                (_, None) => {
                    *unreplayed = Unreplayed::default();
                    own_account
                }
                (Ok(flushed), Some(replayed)) => {
                    unreplayed.flushed(*flushed, read_at);
                    unreplayed.replayed(replayed.into());
                    unreplayed.lag()
                }
                // The primary does not answer (a failover, a network cut): the replica's own
                // account, unless it is known to lack more.
                (Err(_), Some(replayed)) => {
                    unreplayed.replayed(replayed.into());
                    own_account.max(unreplayed.lag())
                }
            };
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
                    flushed.map(drop),
                    fallback,
                    "the replica is further behind than MAX_REPLICA_LAG",
                );
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
            use_primary(flushed.map(drop), fallback, "the replica does not answer");
        }
    }
}

/// Reads from the primary if it answered this measurement; else from the replica (a failover:
/// the primary is gone, and the replica's answers, however old, beat none).
fn use_primary(primary: Result<(), StoreError>, fallback: &Fallback, why: &str) {
    match primary {
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
