//! The applied message ids (`applied_messages`, SPEC §4 "nothing counted twice"): how a batch
//! claims its ids, and the upkeep of the table's partitions by time (migration V5).
//!
//! The table is partitioned by ranges of whole UTC days of `applied_at` (a third of the
//! retention each, see [`partition_days`]); each partition has its own unique index on
//! `message_id` (a partitioned table cannot have a unique key without the partition key). A claim
//! ([`CLAIM`]) therefore looks its ids up in every partition and inserts the others, with a plain
//! `INSERT`: when a concurrent transaction inserts one of the same ids into the same partition,
//! the unique index makes the second wait for the first and then fail with `unique_violation`
//! if the first committed. That error is transient ([`super::StoreError::is_claim_conflict`]): the batch is
//! retried, and its new look-up meets the committed id. Two attempts of one id can only run at
//! once when a redelivery (after a lost broker connection) overlaps the old attempt's
//! transaction, which lives at most a few statement timeouts, or when a publisher's retry put a
//! second copy of a message in the queue. If two such attempts start on either side of midnight
//! they land in two partitions and neither sees the other's uncommitted row; so within 10 minutes
//! of midnight (where every partition bound lies), when a bound lies within 10 minutes of now, a
//! claim inserts its new ids twice, once on each side of that bound: two overlapping attempts
//! then always insert into one common partition, whose unique index makes the later one wait
//! and fail as above (migration V11, which replaced the advisory locks of V9 and V10: no claim
//! waits for another that shares none of its ids).

use super::{Store, StoreError};
use std::time::Duration;

/// Advisory lock of the upkeep (the same key the row-by-row purge used), so replicas that run
/// it at the same moment take turns; one that does not get it leaves the work to the holder.
pub(super) const UPKEEP_LOCK: i64 = 0x0063_6174_6368_7067; // "catchpg"

/// How close to UTC midnight (the server's clock, the one that picks the partition) a claim
/// looks for the partition bound nearest to now and, when it lies within this time of now,
/// inserts its new ids on both sides of it (migration V11). It must exceed the life of a batch
/// transaction: a few statements under the 30 s `DB_TIMEOUT` and the 60 s `statement_timeout`
/// and `idle_in_transaction_session_timeout`. [`Store::with_claim_window`] changes it (tests of
/// the window use more than 12 hours, so it runs at any hour).
pub const CLAIM_WINDOW: Duration = Duration::from_secs(600);

/// Claims the keys of `$1` (a batch's distinct message ids and, when it has one, its token;
/// sorted): returns the keys some partition already holds, and inserts the others into the
/// partition of now() (migration V11's `applied_messages_claim`). Within `$2` seconds of a
/// partition bound ([`CLAIM_WINDOW`]) it inserts them on both sides of the bound instead (see
/// the module's documentation).
///
/// One `= ANY` index scan per partition finds the held keys (all sub-statements of a `WITH` run
/// on one snapshot); the rest are inserted in key order, so two batches with common ids wait
/// on each other in one order (no deadlock). A plain `INSERT`, not `ON CONFLICT DO NOTHING`:
/// the look-up already met every committed key, so a conflict can only be a concurrent claim,
/// which fails the batch (`unique_violation`, applied again: [`super::StoreError::is_claim_conflict`])
/// instead of costing every insert a speculative insertion, and only the held keys come back
/// (normally none), not every fresh id. Measured per id by `make bench-claim` (README). A
/// function, so that its plan is made with sequential scans off: see V8. Public for the bench.
pub const CLAIM: &str =
    "SELECT applied_messages_claim($1::bytea[], make_interval(secs => $2::float8))";

/// The first partition whose upper bound is at least `$1` seconds old: every id in it is older
/// than the retention (the default partition has no bound and is never listed).
const EXPIRED: &str = "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
     WHERE i.inhparent = 'applied_messages'::regclass \
       AND applied_messages_upper(c.oid) <= now() - make_interval(secs => $1) \
     ORDER BY 1 LIMIT 1";

/// Days per partition for a retention: a third of it, 1 to 7 days. A claim probes one index
/// per partition (about retention / width + 2 of them), and ids are kept up to one width past
/// the retention: a third keeps the probes to ~5 and the table under 4/3 of the retention's ids.
pub fn partition_days(retention: Duration) -> i32 {
    const DAY: u64 = 24 * 3600;
    (retention.as_secs().div_ceil(3 * DAY)).clamp(1, 7) as i32
}

/// How long an upkeep step waits for a lock on the dedup table: every claim queues behind the
/// wait (it was 5 s: all counting stopped for 5 s whenever a claim or a reader held the table).
pub const UPKEEP_LOCK_WAIT: Duration = Duration::from_millis(200);
/// Attempts of a step locked out, each after a longer pause ([`UPKEEP_LOCK_PAUSE`] × tries).
const UPKEEP_LOCK_TRIES: u32 = 5;
const UPKEEP_LOCK_PAUSE: Duration = Duration::from_millis(250);

/// The largest never-analysed partition whose ids are counted before it is dropped (a count
/// of 64 MiB takes well under a second).
const COUNTED_PARTITION_BYTES: i64 = 64 << 20;

/// The tries of one upkeep step kept out by a lock.
#[derive(Default)]
struct LockTries(u32);

impl LockTries {
    /// After a lock timeout with tries left: waits a growing pause and says to try again.
    async fn again(&mut self, error: &tokio_postgres::Error) -> bool {
        if !is_lock_timeout(error) || self.0 + 1 >= UPKEEP_LOCK_TRIES {
            return false;
        }
        self.0 += 1;
        tokio::time::sleep(UPKEEP_LOCK_PAUSE * self.0).await;
        true
    }
}

/// A lock wait past `lock_timeout` (SQLSTATE 55P03).
fn is_lock_timeout(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// What one upkeep round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Upkeep {
    /// Partitions created ahead (covering a width and a day from now).
    pub created: u64,
    /// Partitions dropped whole.
    pub dropped: u64,
    /// Ids removed: the dropped partitions' (Postgres' estimate; counted for a small one never
    /// analysed, none for a large one) plus those deleted from the default partition.
    pub ids: u64,
}

impl Store {
    /// Deletes applied message ids older than `retention` and makes the partitions ahead; see
    /// [`Store::dedup_upkeep`]. Returns how many ids were removed.
    pub async fn purge_applied(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(self.dedup_upkeep(retention).await?.ids)
    }

    /// One round of upkeep of `applied_messages`: chains partitions of [`partition_days`] each
    /// until a width and a day from now, drops the partitions whose whole range is older than
    /// `retention`,
    /// and deletes old ids from the default partition (normally empty), a slice at a time.
    ///
    /// Each step is its own short transaction that first tries the upkeep's advisory lock:
    /// replicas running it at once take turns, and one that finds it taken stops (the holder
    /// does the work). The DDL's locks (ACCESS EXCLUSIVE on `applied_messages` for a DROP, on
    /// the default partition for a creation) queue every claim behind them while they wait, so
    /// a step waits [`UPKEEP_LOCK_WAIT`] at most, then tries again a few times
    /// ([`UPKEEP_LOCK_TRIES`]); a step still locked out (a long transaction on the table) is
    /// logged and the round goes on to the next one. Dropping the future (on stop) abandons at
    /// most one step, which rolls back.
    pub async fn dedup_upkeep(&self, retention: Duration) -> Result<Upkeep, StoreError> {
        let mut client = self.pool.get().await?;
        let mut done = Upkeep::default();
        let seconds = retention.as_secs_f64();

        // Partitions ahead: covered until a width and a day from now. A failure here is logged
        // and the purges below still run: returning early, a creation that failed every round
        // left the expired partitions undropped, and the table grew without bound.
        let days = partition_days(retention);
        let mut tries = LockTries::default();
        loop {
            let tx = client.transaction().await?;
            if !Self::upkeep_lock(&tx).await? {
                return Ok(done);
            }
            let extended = tx
                .query_one(
                    "SELECT applied_messages_extend($1, \
                       now() + make_interval(days => $1 + 1))",
                    &[&days],
                )
                .await;
            match extended {
                Ok(row) => {
                    tx.commit().await?;
                    done.created += row.get::<_, i32>(0) as u64;
                    break;
                }
                Err(error) => {
                    drop(tx);
                    if tries.again(&error).await {
                        continue;
                    }
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::new(error)),
                        "Creating the dedup partitions ahead failed; dropping expired ones anyway."
                    );
                    break;
                }
            }
        }

        // One expired partition a transaction, found under the lock: a list read before it
        // could name a partition another replica had dropped since (the round then failed).
        let mut tries = LockTries::default();
        loop {
            let tx = client.transaction().await?;
            if !Self::upkeep_lock(&tx).await? {
                return Ok(done);
            }
            let Some(row) = tx.query_opt(EXPIRED, &[&seconds]).await? else {
                break;
            };
            let partition: String = row.get(0);
            // Postgres' estimate (no scan of days of ids). Never analysed: counted if it is
            // small; a large one counts as none (counted whatever its size, a scan could outlast
            // the statement timeout and fail every round, and the partition was never dropped).
            let row = tx
                .query_one(
                    "SELECT reltuples::float8, pg_relation_size(oid) FROM pg_class \
                     WHERE oid = $1::text::regclass",
                    &[&partition],
                )
                .await?;
            let (estimate, size): (f64, i64) = (row.get(0), row.get(1));
            let ids = if estimate >= 0.0 {
                estimate
            } else if size <= COUNTED_PARTITION_BYTES {
                let counted: i64 = tx
                    .query_one(
                        &format!("SELECT count(*) FROM {}", quote_ident(&partition)),
                        &[],
                    )
                    .await?
                    .get(0);
                counted as f64
            } else {
                0.0
            };
            // The name comes from the catalogue (a child of applied_messages), quoted.
            let dropped = tx
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", quote_ident(&partition)))
                .await;
            match dropped {
                Ok(()) => {
                    tx.commit().await?;
                    done.dropped += 1;
                    done.ids += ids as u64;
                }
                Err(error) => {
                    drop(tx);
                    if tries.again(&error).await {
                        continue;
                    }
                    if !is_lock_timeout(&error) {
                        return Err(error.into());
                    }
                    tracing::warn!(
                        partition,
                        tries = UPKEEP_LOCK_TRIES,
                        "An expired dedup partition stays: a transaction on the table keeps it \
                         from being dropped; the next round tries again."
                    );
                    break;
                }
            }
        }

        loop {
            let tx = client.transaction().await?;
            if !Self::upkeep_lock(&tx).await? {
                return Ok(done);
            }
            let statement = tx
                .prepare_cached(
                    "DELETE FROM applied_messages_default WHERE message_id IN ( \
                       SELECT message_id FROM applied_messages_default \
                       WHERE applied_at < now() - make_interval(secs => $1) LIMIT 10000)",
                )
                .await?;
            let deleted = tx.execute(&statement, &[&seconds]).await?;
            tx.commit().await?;
            done.ids += deleted;
            if deleted < 10_000 {
                return Ok(done);
            }
        }
    }

    /// Tries the upkeep's advisory lock for the transaction, and bounds its lock waits.
    async fn upkeep_lock(tx: &deadpool_postgres::Transaction<'_>) -> Result<bool, StoreError> {
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&UPKEEP_LOCK])
            .await?
            .get(0);
        if locked {
            let wait = UPKEEP_LOCK_WAIT.as_millis();
            tx.batch_execute(&format!("SET LOCAL lock_timeout = '{wait}ms'"))
                .await?;
        }
        Ok(locked)
    }

    /// Applied ids still stored although applied before `older_than` ago, counted up to `cap`:
    /// above zero, the upkeep is failing or falling behind (the dedup table grows past its
    /// retention). Only the default partition and partitions that should have been dropped
    /// are read (partition pruning), through the BRIN index on `applied_at`.
    pub async fn overdue_applied(&self, older_than: Duration, cap: i64) -> Result<i64, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM (SELECT 1 FROM applied_messages \
                   WHERE applied_at < now() - make_interval(secs => $1) LIMIT $2) overdue",
                &[&older_than.as_secs_f64(), &cap],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Applied ids stored, from Postgres' statistics of every partition (no scan; approximate).
    pub async fn applied_estimate(&self) -> Result<i64, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT COALESCE(sum(s.n_live_tup), 0)::int8 FROM pg_stat_user_tables s \
                   JOIN pg_inherits i ON i.inhrelid = s.relid \
                   WHERE i.inhparent = 'applied_messages'::regclass",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The partitions of `applied_messages`, by name (tests and operators).
    pub async fn applied_partitions(&self) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                   WHERE i.inhparent = 'applied_messages'::regclass ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }
}

/// A Postgres identifier, quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
