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

/// Seconds the replica is behind by its own account, and how far it has replayed its WAL: on a
/// server not in recovery, how far it has flushed its own (`pg_last_wal_replay_lsn()` stays
/// where it was on a promoted standby, or on a primary after crash recovery: the same server
/// as the primary then lagged for ever, and a standby promoted apart from it, which gets none
/// of the writes, must not read as current). The account is 0 when it streams from its primary
/// and has replayed all it received (or is a primary), else the age of the last transaction it
/// replayed. Without a WAL receiver
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
     END::float8, \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
          ELSE pg_current_wal_flush_lsn() END";

/// How far the primary has flushed its WAL: all a replica can have received from it.
const PRIMARY: &str = "SELECT pg_current_wal_flush_lsn()";

/// The primary's WAL positions, as the lag loop read them, that the replica has not replayed:
/// each with when it was read, oldest first. The replica is as far behind as the oldest is old:
/// it lacks WAL the primary had then. This is measured in the lag loop's ticks (5 s), whatever
/// the replica says of itself, and whatever was written (a checkpoint's record on an idle
/// primary is not hours of lag, as the age of the last transaction replayed would say).
///
/// What the replica lacked before the first position read (at the worker's start, after the
/// primary did not answer, or after its WAL went back: another server) is not known, so until
/// the replica has replayed that first position, its own account counts too: a replica hours
/// behind read milliseconds at first, and look-ups read it.
#[derive(Default)]
struct Unreplayed {
    positions: std::collections::VecDeque<(u64, Instant)>,
    /// Whether the positions tell the whole lag (see above).
    whole: Whole,
    /// The last position read.
    newest: Option<u64>,
}

/// Whether [`Unreplayed`]'s positions tell the whole lag.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Whole {
    /// No position read since the start or the last gap.
    #[default]
    Unknown,
    /// Once the replica has replayed this position, the first read since the start or the
    /// last gap.
    Once(u64),
    Yes,
}

impl Unreplayed {
    /// At most this many positions are kept (85 minutes of ticks); past it, the second oldest
    /// goes and the next takes its time, so the lag is never read short (a position is taken
    /// for older than it is).
    const MOST: usize = 1024;

    /// The primary had flushed its WAL to `position` at `at`.
    fn flushed(&mut self, position: u64, at: Instant) {
        // Another server's WAL (a failover to a server behind, a restore): the positions
        // read say nothing of it.
        if self.newest.is_some_and(|newest| position < newest) {
            self.positions.clear();
            self.gap();
        }
        self.newest = Some(position);
        if self.whole == Whole::Unknown {
            self.whole = Whole::Once(position);
        }
        match self.positions.back() {
            Some(&(newest, _)) if position <= newest => {}
            _ => {
                if self.positions.len() >= Self::MOST
                    && let Some((_, older)) = self.positions.remove(1)
                    && let Some(next) = self.positions.get_mut(1)
                {
                    next.1 = older;
                }
                self.positions.push_back((position, at));
            }
        }
    }

    /// Positions were not read for a while (the primary did not answer): the replica may lack
    /// WAL written meanwhile, before the next position read.
    fn gap(&mut self) {
        self.whole = Whole::Unknown;
    }

    /// The replica has replayed up to `position`, read before the primary's position of this
    /// tick if `before_primary`. A server that follows the primary (or is the primary) cannot
    /// be past a position the primary flushed after: one that is does not follow it (a standby
    /// promoted apart from it, a replica left on an old timeline after a failover). Then its
    /// own account counts, and the positions are not taken for replayed: it falls behind.
    fn replayed(&mut self, position: u64, before_primary: bool) {
        if before_primary && self.newest.is_some_and(|newest| position > newest) {
            self.gap();
            return;
        }
        while self
            .positions
            .front()
            .is_some_and(|&(oldest, _)| oldest <= position)
        {
            self.positions.pop_front();
        }
        if matches!(self.whole, Whole::Once(first) if first <= position) {
            self.whole = Whole::Yes;
        }
    }

    /// Seconds since the oldest position the replica lacks was read on the primary, or the
    /// replica's `own_account` if more while the positions do not tell the whole lag.
    fn lag(&self, own_account: f64) -> f64 {
        let lag = self
            .positions
            .front()
            .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64());
        if self.whole == Whole::Yes {
            lag
        } else {
            lag.max(own_account)
        }
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
        // A measurement against servers that do not answer takes up to 4 s (the replica's
        // query, then the primary's): the stop does not wait for it (it did, past the shortest
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
    // The replica first, then the primary: a server that follows the primary is then never
    // past the primary's position (see `Unreplayed::replayed`).
    let on_replica = replica.query_one_within(REPLICA, within).await;
    let read_at = Instant::now();
    let on_primary = primary.query_one_within(PRIMARY, within).await;
    // The primary answers if it tells its WAL position (a server in recovery cannot).
    let flushed = on_primary.and_then(|row| Ok(u64::from(row.try_get::<_, PgLsn>(0)?)));
    match &flushed {
        Ok(flushed) => unreplayed.flushed(*flushed, read_at),
        Err(_) => unreplayed.gap(),
    }
    let on_replica = on_replica.and_then(|row| {
        Ok((
            row.try_get::<_, f64>(0)?,
            row.try_get::<_, Option<PgLsn>>(1)?,
        ))
    });
    match on_replica {
        Ok((own_account, replayed)) => {
            let lag = match replayed {
                Some(replayed) => {
                    unreplayed.replayed(replayed.into(), flushed.is_ok());
                    unreplayed.lag(own_account)
                }
                // Nothing replayed yet: the replica's own account.
                None => {
                    unreplayed.gap();
                    unreplayed.lag(own_account)
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

#[cfg(test)]
mod tests {
    use super::Unreplayed;
    use std::time::{Duration, Instant};

    fn ago(now: Instant, seconds: u64) -> Instant {
        now.checked_sub(Duration::from_secs(seconds))
            .expect("an instant in the past")
    }

    fn assert_lag(unreplayed: &Unreplayed, own_account: f64, from: f64, to: f64) {
        let lag = unreplayed.lag(own_account);
        assert!((from..to).contains(&lag), "lag {lag}, not in {from}..{to}");
    }

    /// The lag is the age of the oldest primary position not replayed; the replica's own account
    /// counts until it has replayed the first position read since the start, a gap, or a primary
    /// whose WAL went back.
    #[test]
    fn the_lag_is_the_age_of_the_oldest_position_not_replayed() {
        let now = Instant::now();
        let mut unreplayed = Unreplayed::default();
        // Started against a replica an hour behind: not read as current.
        unreplayed.flushed(100, ago(now, 20));
        unreplayed.replayed(50, true);
        assert_lag(&unreplayed, 3600.0, 3600.0, 3601.0);
        unreplayed.flushed(200, ago(now, 10));
        unreplayed.replayed(100, true);
        assert_lag(&unreplayed, 3600.0, 10.0, 11.0);
        unreplayed.replayed(200, true);
        assert_lag(&unreplayed, 3600.0, 0.0, 0.001);
        // It receives nothing while the primary writes: the position ages, whatever the
        // replica's own account says.
        unreplayed.flushed(300, ago(now, 30));
        unreplayed.replayed(200, true);
        assert_lag(&unreplayed, 0.0, 30.0, 31.0);
        unreplayed.replayed(300, true);
        // The primary did not answer for a while: the own account counts again.
        unreplayed.gap();
        unreplayed.replayed(320, false);
        assert_lag(&unreplayed, 7200.0, 7200.0, 7201.0);
        unreplayed.flushed(400, ago(now, 5));
        unreplayed.replayed(400, true);
        assert_lag(&unreplayed, 7200.0, 0.0, 0.001);
        // The primary's WAL went back (another server): its earlier positions are dropped,
        // and the own account counts until the replica has replayed the new one.
        unreplayed.flushed(500, ago(now, 4));
        unreplayed.replayed(500, true);
        unreplayed.flushed(350, ago(now, 1));
        unreplayed.replayed(340, true);
        assert_lag(&unreplayed, 100.0, 100.0, 101.0);
        unreplayed.replayed(350, true);
        assert_lag(&unreplayed, 100.0, 0.0, 0.001);
        // A server past the primary's position read after its own (left on an old timeline,
        // or promoted apart) does not follow it: the primary's positions age, and its own
        // account counts, until it has replayed a position read after.
        unreplayed.flushed(360, ago(now, 20));
        unreplayed.replayed(9000, true);
        assert_lag(&unreplayed, 0.0, 20.0, 21.0);
        assert_lag(&unreplayed, 50.0, 50.0, 51.0);
        unreplayed.flushed(9100, ago(now, 1));
        unreplayed.replayed(9100, true);
        assert_lag(&unreplayed, 50.0, 0.0, 0.001);
    }

    /// Past [`Unreplayed::MOST`] positions, the lag is never read short: a partial catch-up
    /// reads the age of the oldest position kept, not of a much newer one.
    #[test]
    fn the_cap_on_positions_never_reads_the_lag_short() {
        let now = Instant::now();
        let mut unreplayed = Unreplayed::default();
        unreplayed.flushed(0, ago(now, 5000));
        unreplayed.replayed(0, true);
        for i in 1..=2000u64 {
            unreplayed.flushed(i, ago(now, 3000 - i));
        }
        assert!(unreplayed.positions.len() <= Unreplayed::MOST);
        assert_lag(&unreplayed, 0.0, 2999.0, 3000.0);
        unreplayed.replayed(1, true);
        assert_lag(&unreplayed, 0.0, 2998.0, 3000.0);
        unreplayed.replayed(1999, true);
        assert_lag(&unreplayed, 0.0, 1000.0, 1001.0);
    }
}
