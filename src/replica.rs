//! Look-ups from a streaming replica (`STATUS_DATABASE_URL`, SPEC §6): its lag as a metric.
//! `/readyz` pings the replica beside the primary (see `crate::http::ReadyProbe`).

use crate::store::Store;
use metrics::{describe_gauge, gauge};
use std::time::Duration;
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

/// Measures the replica's lag every `every` until `cancel` fires, as the gauge
/// `catchall_replica_lag_seconds`; `catchall_replica_up` is 0 while it does not answer.
pub async fn lag_loop(replica: Store, every: Duration, cancel: CancellationToken) {
    describe_gauge!(
        "catchall_replica_lag_seconds",
        "How far the look-up replica (STATUS_DATABASE_URL) is behind the primary."
    );
    describe_gauge!(
        "catchall_replica_up",
        "1 while the look-up replica (STATUS_DATABASE_URL) answers, else 0."
    );
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        match replica.query_f64_within(LAG, Duration::from_secs(2)).await {
            Ok(lag) => {
                gauge!("catchall_replica_lag_seconds").set(lag);
                gauge!("catchall_replica_up").set(1.0);
            }
            Err(error) => {
                gauge!("catchall_replica_up").set(0.0);
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::new(error)),
                    "The look-up replica does not answer."
                );
            }
        }
    }
}
