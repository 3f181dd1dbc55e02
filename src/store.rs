//! Postgres: the per-domain counters, the applied message ids, and the migrations.

use crate::event::{Event, Tally};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

mod dedup;
pub use dedup::{CLAIM, CLAIM_WINDOW, Upkeep, partition_days};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// How long a migration's statement waits for a table lock before the migration is rolled
/// back (see [`Store::migrate`]).
pub const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// The session advisory lock a replica holds while it migrates ("catchal"): the others wait
/// for it, without a time limit, before they run theirs.
pub const MIGRATION_LOCK: i64 = 0x0063_6174_6368_616c;
/// Migration attempts given up on a lock before the start fails (about a minute in all).
pub const MIGRATION_LOCK_ATTEMPTS: u32 = 6;

/// Whether a migration failed waiting for a lock (SQLSTATE 55P03, `lock_timeout`).
fn is_lock_timeout(error: &refinery::Error) -> bool {
    match error.kind() {
        refinery::error::Kind::Connection(_, source) => source
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            .is_some_and(|code| *code == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
        _ => false,
    }
}

/// Errors at the store's boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid DATABASE_URL: {0}")]
    Config(#[source] tokio_postgres::Error),
    /// The URL or its TLS settings (libpq's `sslmode`, `sslrootcert`, …; see [`crate::pg`]).
    #[error("invalid Postgres URL or TLS settings")]
    Url(#[from] crate::pg::PgError),
    #[error("could not get a Postgres connection from the pool")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("Postgres query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("migration failed")]
    Migration(#[from] refinery::Error),
    #[error("Postgres did not answer within {0:?} (DB_TIMEOUT); the connection was dropped")]
    Timeout(Duration),
    /// An apply attempt was given up while under way (see [`Store::apply_once`]).
    #[error(
        "the attempt was given up (a stop out of time, or its broker connection gone); its connection was dropped and its backend terminated"
    )]
    Abandoned,
    /// A task the query waited on is gone (it panicked): the one that answers single look-ups
    /// ([`crate::lookups`]) or one getting a connection ([`Store::client_within`]).
    #[error("a Postgres task stopped")]
    Closed,
    /// [`crate::lookups::MAX_QUEUED`] single look-ups already wait for Postgres.
    #[error("too many look-ups are waiting for Postgres")]
    Busy,
}

impl StoreError {
    /// A short reason for `/readyz`, fit for any client: no server message text (which can
    /// carry data or schema details), only the kind of failure and the SQLSTATE. The full
    /// error goes to the log.
    pub fn short_reason(&self) -> String {
        match self {
            Self::Config(_) => "invalid DATABASE_URL".into(),
            Self::Url(_) => "invalid Postgres URL or TLS settings".into(),
            Self::Pool(deadpool_postgres::PoolError::Backend(error)) => query_reason(error),
            Self::Pool(_) => "no connection available".into(),
            Self::Timeout(_) => "no answer within DB_TIMEOUT".into(),
            Self::Abandoned => "attempt given up".into(),
            Self::Closed => "a Postgres task stopped".into(),
            Self::Busy => "too many look-ups waiting".into(),
            Self::Migration(_) => "migration failed".into(),
            Self::Query(error) => query_reason(error),
        }
    }

    /// Whether retrying the same work can succeed later. Transient: the connection, the server
    /// or the pool failed (lost connection, admin shutdown, timeout or cancel, serialization
    /// failure or deadlock, read-only server, full disk, too many connections, out of memory).
    /// Permanent: the data of the batch is refused (class 22 data exceptions, class 23
    /// integrity violations, an exception raised by a trigger or function), except a claim's
    /// conflict with a concurrent claim of the same id ([`StoreError::is_claim_conflict`]).
    /// Anything else is treated as transient (not ready, retried; the delivery limit is the
    /// last resort).
    pub fn is_permanent(&self) -> bool {
        let Self::Query(error) = self else {
            return false;
        };
        if self.is_claim_conflict() {
            return false;
        }
        let Some(code) = error.code() else {
            return false; // I/O, closed connection: no SQLSTATE
        };
        let code = code.code();
        let class = &code[..2.min(code.len())];
        matches!(
            class,
            // data exception, integrity constraint, triggered data change, triggered action,
            // SQL routine / external routine / invocation exceptions, WITH CHECK OPTION,
            // PL/pgSQL RAISE (P0001 raise_exception, P0004 assert_failure).
            "22" | "23" | "27" | "09" | "2F" | "38" | "39" | "44" | "P0"
        )
    }

    /// Whether Postgres gave no answer at all (a refused, reset or timed-out connection, a
    /// name that does not resolve yet, the pool's wait) or answered that it cannot take the
    /// connection yet (starting up or shutting down, too many connections): the start waits
    /// and tries again. An answer that refuses the worker (authentication, an unknown
    /// database, a certificate that fails) is not: it stays until someone changes a setting.
    pub fn is_unreachable(&self) -> bool {
        let error = match self {
            Self::Timeout(_) | Self::Pool(deadpool_postgres::PoolError::Timeout(_)) => {
                return true;
            }
            Self::Pool(deadpool_postgres::PoolError::Backend(error)) | Self::Query(error) => error,
            _ => return false,
        };
        if let Some(db) = error.as_db_error() {
            use tokio_postgres::error::SqlState;
            return [
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
            ]
            .contains(db.code());
        }
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                // TLS failures come as invalid data. A Unix socket not there yet (a proxy
                // sidecar starting) is NotFound; a host that does not allow writes yet
                // (`target_session_attrs=read-write` during a failover) is PermissionDenied.
                return !matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                );
            }
            source = cause.source();
        }
        error.is_closed()
    }

    /// A `unique_violation` on the applied ids: a concurrent transaction claimed one of the
    /// batch's ids (or its token) and committed while this claim waited for it (see
    /// `dedup::CLAIM`). Retrying the batch meets the committed id and skips it. Recognised by
    /// the index: a partition's unique index on `message_id` (`<partition>_message_id`, V5) on
    /// a partition of `applied_messages`. Any other unique violation (on a table an operator
    /// added beside ours, say) stays a permanent error.
    pub fn is_claim_conflict(&self) -> bool {
        let Self::Query(error) = self else {
            return false;
        };
        let Some(db) = error.as_db_error() else {
            return false;
        };
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.table().is_some_and(|table| {
                table.starts_with("applied_messages_")
                    && db.constraint() == Some(format!("{table}_message_id").as_str())
            })
    }
}

/// A Postgres error's kind and SQLSTATE, without the server's message text.
fn query_reason(error: &tokio_postgres::Error) -> String {
    match error.code() {
        Some(code) => format!("error SQLSTATE {}", code.code()),
        None if error.is_closed() => "connection closed".into(),
        None => "connection failed".into(),
    }
}

/// A message ready to apply: its id (if the publisher set one) and its valid events.
#[derive(Debug, Clone)]
pub struct Message {
    /// The publisher's `message_id`, as bytes: AMQP short strings need not be UTF-8, and two
    /// ids that differ only in invalid bytes are two messages.
    pub id: Option<Vec<u8>>,
    pub events: Vec<Event>,
}

/// What applying one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Messages whose events were counted.
    pub messages: usize,
    /// Messages skipped because their id had already been applied.
    pub duplicates: usize,
    pub delivered: u64,
    pub bounced: u64,
    /// Bounces that prove nothing about catch-all (SPEC §3), counted apart.
    pub other_bounced: u64,
    /// Distinct domains upserted.
    pub domains: usize,
    /// Messages Postgres refused for their content, dead-lettered (`database_rejected`).
    pub database_rejected: usize,
}

/// A domain's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub delivered: i64,
    pub bounced: i64,
    /// Bounces that prove nothing about catch-all (mailbox full, policy…); never change the status.
    pub other_bounced: i64,
}

/// Awaited just before `COMMIT` (see [`Store::apply_once`]): how the consumer's fault
/// injection (tests only) reaches the moment between a batch's statements and its commit.
pub type BeforeCommit = BoxFuture<'static, ()>;

/// The Postgres side of the worker. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// For the connection that terminates the backend of an abandoned attempt (see
    /// [`Store::abandon`]): its own, not the pool's, whose connections may be stalled too.
    pg: Arc<tokio_postgres::Config>,
    /// For the cancel requests of abandoned attempts whose backend could not be terminated
    /// (see [`Store::abandon`]).
    tls: crate::pg::PgTls,
    /// Client-side deadline of one apply attempt (DB_TIMEOUT).
    db_timeout: Duration,
    /// How close to UTC midnight a claim inserts its ids on both sides of the nearest partition
    /// bound, in seconds (see `dedup`).
    claim_window: f64,
}

/// Adds a batch's per-domain totals (`$1` domains, sorted; `$2`..`$4` their counts). Public for
/// the bench (`make bench-claim` times it as its yardstick).
pub const UPSERT: &str = "INSERT INTO domains AS d (domain, delivered, bounced, other_bounced) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
     ON CONFLICT (domain) DO UPDATE \
     SET delivered = d.delivered + EXCLUDED.delivered, bounced = d.bounced + EXCLUDED.bounced, \
     other_bounced = d.other_bounced + EXCLUDED.other_bounced";
const LOOKUP: &str = "SELECT delivered, bounced, other_bounced FROM domains WHERE domain = $1";
/// Longest the terminate of an abandoned apply attempt's backend may take, connection included
/// (see [`Store::abandon`]).
const TERMINATE_TIMEOUT: Duration = Duration::from_millis(400);
/// Longest the cancel request sent when the terminate did not end the backend may take; with
/// [`TERMINATE_TIMEOUT`], 600 ms, within the consumer's 1 s `ABANDON_TIMEOUT`.
const CANCEL_TIMEOUT: Duration = Duration::from_millis(200);
/// Ends a backend of this role and database: `true` if it was signalled.
const TERMINATE: &str = "SELECT COALESCE((SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE pid = $1 AND usename = current_user AND datname = current_database()), false)";

/// How often a backend running one of the worker's queries checks that the worker is still
/// connected (`client_connection_check_interval`, PostgreSQL 14 and later, on Linux, macOS
/// and the BSDs), and ends the query and its transaction if not: the second line of defence
/// behind `Store::abandon`'s terminate, for a backend it could not reach. It narrows, not
/// closes, the window: a lock released within the interval still let such a backend commit
/// a batch already redelivered. A check is a `poll` while a query runs.
const CLIENT_CHECK_INTERVAL: &str = "250ms";

/// Asks Postgres to end a query of this connection once the worker is gone (see
/// [`CLIENT_CHECK_INTERVAL`]); a server that cannot is logged and the connection used as is.
/// No answer within [`CHECK_SET_TIMEOUT`] fails the new connection (the pool's create timeout
/// does not cover this hook: a login answered and a first query never, behind a pooler with no
/// server free or a network gone, would hold a pool slot for as long as TCP takes to give up).
async fn check_the_client(
    client: &tokio_postgres::Client,
) -> Result<(), deadpool_postgres::HookError> {
    let set = format!("SET client_connection_check_interval = '{CLIENT_CHECK_INTERVAL}'");
    match tokio::time::timeout(CHECK_SET_TIMEOUT, client.batch_execute(&set)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(
            error = %error,
            "Postgres does not check that the worker is still connected (before PostgreSQL 14?)."
        ),
        Err(_) => {
            return Err(deadpool_postgres::HookError::message(
                "no answer to the connection's first statement in time",
            ));
        }
    }
    Ok(())
}

/// Longest the first statement of a new connection may take (see [`check_the_client`]).
const CHECK_SET_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a look-up (single, bulk or listing) waits for Postgres before answering 503.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends a batch's upsert and its `COMMIT` together (pipelined): `COMMIT` leaves right behind
/// the upsert instead of a round trip through the worker later. The rows the upsert locks stay
/// locked until `COMMIT` ends, and the next batch in flight waits for them from its first
/// domain in common with this one (two batches of 2,500 events from 100,000 domains share ~60),
/// so that round trip was part of every batch's serial section: with `pgbench`, 2 connections
/// upserting such batches ran 12 % fewer per second with 2 ms between the upsert and `COMMIT`.
///
/// The upsert goes out on its first poll (or fails before anything is sent: then nothing else
/// is, and dropping `tx` rolls back). Once both have gone out the transaction ends either way:
/// after a failed upsert, `COMMIT` answers `ROLLBACK`, and the upsert's error is returned.
async fn upsert_and_commit(
    tx: tokio_postgres::Transaction<'_>,
    upsert: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(), StoreError> {
    let mut upserted = Box::pin(tx.execute(upsert, params));
    if let std::task::Poll::Ready(result) = futures_util::poll!(upserted.as_mut()) {
        // Not sent (an answer cannot come before its request): commit on its own, or not at all.
        result?;
        drop(upserted);
        tx.commit().await?;
        return Ok(());
    }
    let (upserted, committed) =
        futures_util::future::join(upserted, tx.client().batch_execute("COMMIT")).await;
    // COMMIT went out, so the transaction is over: the ROLLBACK `tx` would send on drop could
    // only draw a warning. tokio-postgres' own transaction, not deadpool's wrapper (which holds
    // an `Arc` of the statement cache): forgetting it leaks nothing (it holds no savepoint name).
    std::mem::forget(tx);
    upserted?;
    committed?;
    Ok(())
}

async fn lookup_on(client: &deadpool_postgres::Client, domain: &str) -> Result<Counts, StoreError> {
    let statement = client.prepare_cached(LOOKUP).await?;
    let row = client.query_opt(&statement, &[&domain]).await?;
    Ok(row
        .map(|row| Counts {
            delivered: row.get(0),
            bounced: row.get(1),
            other_bounced: row.get(2),
        })
        .unwrap_or_default())
}

impl Store {
    /// Builds the pool and checks that Postgres answers (fail fast at start).
    pub async fn connect(database_url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let store = Self::open(database_url, pool_size)?;
        // As long as opening a connection may take (the pool's create timeout: every host of
        // the URL in turn, each for up to its connect_timeout, plus 5 s).
        let within = store
            .pool
            .timeouts()
            .create
            .unwrap_or(Duration::from_secs(10));
        store.ping_within(within).await?;
        Ok(store)
    }

    /// Builds the pool without connecting: the URL and its TLS files are checked now, the
    /// server on first use (the look-up replica, which may be down at start).
    pub fn open(database_url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let (mut pg, tls) = crate::pg::config(database_url)?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        pg.keepalives_idle(Duration::from_secs(30));
        if pg.get_application_name().is_none() {
            pg.application_name("catchall");
        }
        // No query or transaction may hang the worker: a stuck one fails and is retried. An
        // `options=` in DATABASE_URL keeps what it says; ours are appended unless it sets them.
        let mut options = pg.get_options().unwrap_or_default().to_string();
        for (name, value) in [
            ("statement_timeout", "60s"),
            ("idle_in_transaction_session_timeout", "60s"),
        ] {
            if !options.contains(name) {
                options = format!("{options} -c {name}={value}").trim().to_string();
            }
        }
        // Always ISO dates in UTC (appended last, so they win over the URL's and the server's
        // defaults): the dedup partitions' bounds are written into DDL and read back from the
        // catalogue as text (V5, V6), and a zone abbreviation printed in another DateStyle can
        // read back as another zone's, hours off. Rows travel in binary, whatever these say.
        options = format!("{options} -c DateStyle=ISO -c TimeZone=UTC")
            .trim()
            .to_string();
        // Set after connecting, where a server that does not know it (before PostgreSQL 14) or
        // cannot check on its platform refuses it without failing the connection.
        let check_client = !options.contains("client_connection_check_interval");
        pg.options(&options);
        // A connection may try every host of a multi-host URL in turn, each for up to
        // connect_timeout: the pool must wait for all of them, or a first host that drops
        // packets would use up the whole wait and the next host would never be tried.
        let per_host = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let hosts = pg.get_hosts().len().max(1) as u32;
        // At most a day: a huge connect_timeout in the URL must not overflow a deadline.
        let create_timeout = per_host
            .saturating_mul(hosts)
            .saturating_add(Duration::from_secs(5))
            .min(Duration::from_secs(24 * 3600));
        let terminating = Arc::new(pg.clone());
        let manager = Manager::from_config(
            pg,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size as usize)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(create_timeout))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                Box::pin(async move {
                    if check_client {
                        check_the_client(client).await?;
                    }
                    Ok(())
                })
            }))
            .build()
            .expect("a runtime and timeouts are set, so the pool builds");
        Ok(Self {
            pool,
            pg: terminating,
            tls,
            db_timeout: Duration::from_secs(30),
            claim_window: dedup::CLAIM_WINDOW.as_secs_f64(),
        })
    }

    /// Sets the client-side deadline of one apply attempt (DB_TIMEOUT, default 30 s).
    pub fn with_db_timeout(mut self, db_timeout: Duration) -> Self {
        self.db_timeout = db_timeout;
        self
    }

    /// Sets how close to UTC midnight a claim inserts its ids on both sides of the partition
    /// bound nearest to now, when that bound lies within this time of now (default
    /// [`CLAIM_WINDOW`], 10 minutes; more than 12 hours: at any hour). Longer inserts more ids
    /// twice; shorter than a batch transaction's life would let two attempts of one id on either
    /// side of the bound both count. It must stay well under half a partition (a day): the
    /// claims' insert order rules out deadlocks only for stamps around one bound.
    pub fn with_claim_window(mut self, window: Duration) -> Self {
        self.claim_window = window.as_secs_f64();
        self
    }

    /// Applies the migrations in `migrations/`. Replicas starting together serialise on an
    /// advisory lock, so only one applies each migration.
    ///
    /// A migration waits at most [`MIGRATION_LOCK_TIMEOUT`] for a table lock, then is rolled
    /// back and tried again, [`MIGRATION_LOCK_ATTEMPTS`] times in all. A lock request waiting
    /// behind a long transaction (an export, a stuck session) queues every later request for
    /// the table behind it: without the bound, the running workers' upserts (a rolling
    /// upgrade) stopped for as long as that transaction lasted.
    pub async fn migrate(&self) -> Result<refinery::Report, StoreError> {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let mut attempt = 1;
        // Each migration commits on its own: those an attempt applied before one timed out
        // stay applied, and belong in the report.
        let mut applied = Vec::new();
        loop {
            match self.migrate_once().await {
                Ok(report) => {
                    applied.extend(report.applied_migrations().iter().cloned());
                    return Ok(refinery::Report::new(applied));
                }
                Err(StoreError::Migration(error))
                    if attempt < MIGRATION_LOCK_ATTEMPTS && is_lock_timeout(&error) =>
                {
                    if let Some(report) = error.report() {
                        applied.extend(report.applied_migrations().iter().cloned());
                    }
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        error = %error,
                        attempt,
                        wait = ?wait,
                        "A migration waited {MIGRATION_LOCK_TIMEOUT:?} for a table lock (a long \
                         transaction holds it) and was rolled back; trying again."
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn migrate_once(&self) -> Result<refinery::Report, StoreError> {
        let mut client = self.pool.get().await?;
        // A migration on a large table may take longer than the statement timeout, and so may
        // the wait for another replica's (a waiter used to fail after 60 s and exit). The
        // session settings must not outlive the migration: this connection leaves the pool.
        client
            .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
            .await?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?
            .get(0);
        if !locked {
            tracing::info!("Another replica is migrating the database; waiting for it to finish.");
            client
                .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
                .await?;
        }
        client
            .batch_execute(&format!(
                "SET lock_timeout = {}",
                MIGRATION_LOCK_TIMEOUT.as_millis()
            ))
            .await?;
        // A database migrated by a newer release (its replicas rolling out, or this release
        // rolled back to) holds versions this build does not know: run anyway. Every
        // migration keeps the release before it working (V8 keeps the old claim function; V7's
        // flag is computed by Postgres, whoever writes); refinery would refuse to start
        // (`MissingVersion`).
        let runner = embedded::migrations::runner().set_abort_missing(false);
        let known = runner.get_migrations().iter().map(|m| m.version()).max();
        let client_ref: &mut tokio_postgres::Client = &mut client;
        let report = runner.run_async(client_ref).await;
        let newest: Result<Option<i32>, _> = match report {
            Ok(_) => client
                .query_one("SELECT max(version) FROM refinery_schema_history", &[])
                .await
                .and_then(|row| row.try_get(0)),
            Err(_) => Ok(None),
        };
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        drop(deadpool_postgres::Object::take(client));
        unlocked?;
        let report = report?;
        if let (Some(newest), Some(known)) = (newest?, known)
            && newest > known
        {
            tracing::warn!(
                schema_version = newest,
                this_release = known,
                "the database was migrated by a newer release; running on it (rolling upgrade or rollback)"
            );
        }
        Ok(report)
    }

    /// The one row a query returns within `within` (the lag probe); see
    /// [`Store::ping_within`] for a connection that does not answer.
    pub async fn query_one_within(
        &self,
        sql: &str,
        within: Duration,
    ) -> Result<tokio_postgres::Row, StoreError> {
        let (client, deadline) = self.client_within(within).await?;
        let answer = tokio::time::timeout_at(deadline, client.query_one(sql, &[])).await;
        done_within(client, answer, within)
    }

    /// Checks that Postgres answers a query within `within`. A connection that does not answer
    /// in time leaves the pool: a socket to a host that vanished without a reset would
    /// otherwise hold every later probe until TCP gives up (about 15 minutes), long after
    /// Postgres came back.
    pub async fn ping_within(&self, within: Duration) -> Result<(), StoreError> {
        let (client, deadline) = self.client_within(within).await?;
        let answer = tokio::time::timeout_at(deadline, client.simple_query("SELECT 1")).await;
        done_within(client, answer, within).map(drop)
    }

    /// Applies a batch in one transaction: claims the message ids (skipping those already
    /// applied, here or by another worker), then adds the remaining events per domain with one
    /// upsert in sorted domain order, so concurrent workers cannot deadlock.
    ///
    /// The attempt has a client-side deadline (DB_TIMEOUT): a backend that stops answering
    /// costs one deadline, and its connection is taken out of the pool (not reused with a
    /// transaction in an unknown state), so the retry runs on a fresh connection.
    pub async fn apply(&self, batch: &[Message]) -> Result<Applied, StoreError> {
        self.apply_once(None, batch, None, None, &mut None).await
    }

    /// Like [`Store::apply`], and when `token` is given and some message has no id, the token
    /// is recorded in the same transaction (beside the message ids) and checked first: a batch
    /// whose COMMIT went through but whose reply was lost is not applied again when retried
    /// (its id-less messages would otherwise count twice). `before_commit`, if given, is
    /// awaited between the statements and `COMMIT`. An attempt past `DB_TIMEOUT`, or under way
    /// when `abandon` fires ([`StoreError::Abandoned`]; also while it waits for a connection),
    /// is given up: its connection is dropped and its backend terminated (see
    /// [`Store::abandon`]). An attempt that ended when `abandon` fires keeps its outcome.
    ///
    /// `sent` is set to what the attempt counts once its statements and `COMMIT` are about to go
    /// out: if it fails then, the batch may have committed, and a later attempt that finds it
    /// so (every message a duplicate) reports these counts (see `consumer::apply_attempts`).
    pub async fn apply_once(
        &self,
        token: Option<&[u8]>,
        batch: &[Message],
        before_commit: Option<BeforeCommit>,
        abandon: Option<&CancellationToken>,
        sent: &mut Option<Applied>,
    ) -> Result<Applied, StoreError> {
        let token = token.filter(|_| batch.iter().any(|m| m.id.is_none()));
        let deadline = tokio::time::Instant::now() + self.db_timeout;
        // Outside the attempt, so that it is still here to cancel when the attempt is dropped.
        let mut connection: Option<deadpool_postgres::Object> = None;
        let outcome = {
            let attempt = async {
                let client = tokio::time::timeout_at(deadline, self.pool.get())
                    .await
                    .map_err(|_| StoreError::Timeout(self.db_timeout))??;
                let client = connection.insert(client);
                tokio::time::timeout_at(
                    deadline,
                    self.apply_on(client, token, batch, before_commit, sent),
                )
                .await
                .map_err(|_| StoreError::Timeout(self.db_timeout))?
            };
            match abandon {
                Some(abandon) => tokio::select! {
                    biased;
                    outcome = attempt => Some(outcome),
                    _ = abandon.cancelled() => None,
                },
                None => Some(attempt.await),
            }
        };
        match (outcome, connection) {
            (Some(Ok(applied)), _) => Ok(applied),
            // Past DB_TIMEOUT with a connection: the statements are under way.
            (Some(Err(error @ StoreError::Timeout(_))), Some(client)) => {
                self.abandon(client).await;
                Err(error)
            }
            (Some(Err(error)), Some(client)) => {
                if !error.is_permanent() && !error.is_claim_conflict() {
                    // The connection may be the cause: do not hand it to the next attempt.
                    drop(deadpool_postgres::Object::take(client));
                }
                Err(error)
            }
            (Some(Err(error)), None) => Err(error),
            (None, client) => {
                if let Some(client) = client {
                    self.abandon(client).await;
                }
                Err(StoreError::Abandoned)
            }
        }
    }

    /// Gives up an attempt under way on `client`: drops the connection (never back to the pool)
    /// and ends its backend with `pg_terminate_backend` from a connection of its own,
    /// so nothing of the attempt can commit once its batch is retried or redelivered.
    ///
    /// The upsert and its `COMMIT` go out together (see `upsert_and_commit`), so a backend
    /// still at work (waiting for a row lock, say) holds the `COMMIT` as well; with the
    /// connection dropped alone it went on and committed, later, a batch the worker had given
    /// up on and the broker redelivered, and the messages without an id counted twice. A cancel
    /// request (what this did before) has the same hole in a narrower place: one that reaches
    /// the backend between statements, before the rest of the attempt arrives on the other
    /// connection, is discarded, and the statements then ran and committed
    /// (`an_abandoned_attempt_whose_commit_arrives_after_the_cancel_does_not_commit`). A
    /// terminated backend runs nothing more. Neither can stop a `COMMIT` already running: the
    /// batch commits then; retried (past `DB_TIMEOUT`), its token or ids make the retry a
    /// no-op; given up and redelivered, its messages without an id count twice.
    ///
    /// If the terminate cannot be sent within [`TERMINATE_TIMEOUT`] (no connection to be had, a
    /// role without the right) or finds no backend of that pid (one that ended already, or
    /// behind a pooler such as PgBouncer, whose key is its own), a cancel request is sent as
    /// before (a pooler passes it on). A terminate that failed is logged; the backend then
    /// ends when `client_connection_check_interval` sees the connection gone, at its
    /// `statement_timeout` (60 s), or commits if what it waits for comes first.
    async fn abandon(&self, client: deadpool_postgres::Object) {
        let client = deadpool_postgres::Object::take(client);
        let pid = client.backend_pid();
        let token = client.cancel_token();
        drop(client);
        let terminate = async {
            let (other, connection) = self.pg.connect(self.tls.clone()).await?;
            // Only a backend of this role and database: after a failover a multi-host URL may
            // reach another server, where the pid is someone else's.
            let query = async {
                let terminated = other
                    .query_one(TERMINATE, &[&pid])
                    .await
                    .and_then(|row| row.try_get::<_, bool>(0));
                drop(other);
                terminated
            };
            // Both in this future: given up at the deadline, the connection goes with it.
            let (terminated, _) = tokio::join!(query, connection);
            terminated
        };
        let (error, expected) = match tokio::time::timeout(TERMINATE_TIMEOUT, terminate).await {
            Ok(Ok(true)) => return,
            // No backend of that pid: one that ended already, or a pooler (PgBouncer) that
            // gave the client a key of its own; the cancel request goes through the pooler.
            Ok(Ok(false)) => (anyhow::anyhow!("no backend with pid {pid}"), true),
            Ok(Err(error)) => (anyhow::Error::new(error), false),
            Err(_) => (
                anyhow::anyhow!("no answer within {TERMINATE_TIMEOUT:?}"),
                false,
            ),
        };
        let cancel = token.cancel_query(self.tls.clone());
        let cancelled = match tokio::time::timeout(CANCEL_TIMEOUT, cancel).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(anyhow::Error::new(error)),
            Err(_) => Err(anyhow::anyhow!("no answer within {CANCEL_TIMEOUT:?}")),
        };
        let cancel = cancelled
            .as_ref()
            .map_or_else(|e| format!("{e:#}"), |()| "sent".into());
        if expected && cancelled.is_ok() {
            tracing::debug!(
                backend = pid,
                error = format!("{error:#}"),
                cancel,
                "Abandoned Postgres attempt cancelled."
            );
            return;
        }
        tracing::warn!(
            backend = pid,
            error = format!("{error:#}"),
            cancel,
            "Could not terminate the backend of an abandoned Postgres attempt; it may still commit (its batch is retried or redelivered)."
        );
    }

    async fn apply_on(
        &self,
        client: &mut deadpool_postgres::Object,
        token: Option<&[u8]>,
        batch: &[Message],
        before_commit: Option<BeforeCommit>,
        sent: &mut Option<Applied>,
    ) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        // Prepared (once per connection: cached) before the transaction, which is tokio-postgres'
        // own (see `upsert_and_commit`).
        let claim = client.prepare_cached(dedup::CLAIM).await?;
        let upsert = client.prepare_cached(UPSERT).await?;
        // READ COMMITTED whatever `default_transaction_isolation` says: the claim is made for it
        // (a concurrent claim of an id surfaces as `unique_violation`, a claim conflict).
        let client: &mut tokio_postgres::Client = client;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .start()
            .await?;
        // Ids, sorted (the claim's insert order) and without repeats within the batch.
        let mut ids: Vec<&[u8]> = batch.iter().filter_map(|m| m.id.as_deref()).collect();
        ids.sort_unstable();
        ids.dedup();
        // The claim (see `dedup`): the ids and the batch token in one statement (near midnight
        // it inserts them on both sides of the partition bound).
        let mut keys: Vec<&[u8]> = ids.clone();
        keys.extend(token);
        keys.sort_unstable();
        keys.dedup();
        let held: HashSet<Vec<u8>> = if keys.is_empty() {
            HashSet::new()
        } else {
            tx.query(&claim, &[&keys, &self.claim_window])
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?
        };
        if token.is_some_and(|token| held.contains(token)) {
            // Committed by an earlier attempt: every message of it is a duplicate.
            applied.duplicates = batch.len();
            return Ok(applied);
        }

        let mut seen: HashSet<&[u8]> = HashSet::with_capacity(ids.len());
        let mut totals: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
        for message in batch {
            if let Some(id) = message.id.as_deref()
                && (held.contains(id) || !seen.insert(id))
            {
                applied.duplicates += 1;
                continue;
            }
            applied.messages += 1;
            for event in &message.events {
                let entry = totals.entry(event.domain.as_str()).or_default();
                match event.tally() {
                    Tally::Delivered => {
                        entry.0 += 1;
                        applied.delivered += 1;
                    }
                    Tally::Bounced => {
                        entry.1 += 1;
                        applied.bounced += 1;
                    }
                    Tally::OtherBounced => {
                        entry.2 += 1;
                        applied.other_bounced += 1;
                    }
                }
            }
        }
        applied.domains = totals.len();

        if !totals.is_empty() {
            let mut domains = Vec::with_capacity(totals.len());
            let mut delivered = Vec::with_capacity(totals.len());
            let mut bounced = Vec::with_capacity(totals.len());
            let mut other_bounced = Vec::with_capacity(totals.len());
            for (domain, (d, b, o)) in totals {
                domains.push(domain);
                delivered.push(d);
                bounced.push(b);
                other_bounced.push(o);
            }
            let params: [&(dyn ToSql + Sync); 4] = [&domains, &delivered, &bounced, &other_bounced];
            match before_commit {
                Some(before_commit) => {
                    tx.execute(&upsert, &params).await?;
                    before_commit.await;
                    *sent = Some(applied);
                    tx.commit().await?;
                }
                None => {
                    *sent = Some(applied);
                    upsert_and_commit(tx, &upsert, &params).await?;
                }
            }
            return Ok(applied);
        }
        if let Some(before_commit) = before_commit {
            before_commit.await;
        }
        *sent = Some(applied);
        tx.commit().await?;
        Ok(applied)
    }

    /// A domain's counters; zero for a domain never seen.
    pub async fn lookup(&self, domain: &str) -> Result<Counts, StoreError> {
        let (client, deadline) = self.lookup_client().await?;
        let result = tokio::time::timeout_at(deadline, lookup_on(&client, domain)).await;
        self.lookup_done(client, result)
    }

    /// The look-up deadline: at most [`LOOKUP_TIMEOUT`], and never more than DB_TIMEOUT.
    fn lookup_timeout(&self) -> Duration {
        self.db_timeout.min(LOOKUP_TIMEOUT)
    }

    /// A pooled connection for a look-up, and the look-up's deadline (see [`done_within`]).
    async fn lookup_client(
        &self,
    ) -> Result<(deadpool_postgres::Object, tokio::time::Instant), StoreError> {
        self.client_within(self.lookup_timeout()).await
    }

    /// A look-up has a client-side deadline, so a Postgres that stops answering costs a request
    /// one deadline (then 503), not an open-ended wait that also holds up a graceful shutdown.
    fn lookup_done<T>(
        &self,
        client: deadpool_postgres::Object,
        result: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        done_within(client, result, self.lookup_timeout())
    }

    /// A pooled connection got within `within`, and the deadline its query must keep.
    async fn client_within(
        &self,
        within: Duration,
    ) -> Result<(deadpool_postgres::Object, tokio::time::Instant), StoreError> {
        let deadline = tokio::time::Instant::now() + within;
        // The wait for a connection runs in a task of its own, which the deadline does not
        // cancel: a connection being opened (each host of a multi-host URL in turn, for up to
        // its connect_timeout) outlives a 2-second probe and lands in the pool for the next
        // one. Cancelled with the probe, it was abandoned, and with a first host that does not
        // answer no probe or look-up ever reached the second.
        // With an idle connection in the pool (the common case) it is taken at once, without
        // the task: a task per look-up query cost ~15 % more worker CPU per look-up
        // (benches/ab-lookups.sh). Should another caller take that connection first, or the
        // idle one turn out dead when recycled (after a failover), this wait opens one itself
        // and may lose it to the deadline; the pool is then empty and the next caller takes
        // the task.
        if self.pool.status().available > 0 {
            let client = tokio::time::timeout_at(deadline, self.pool.get())
                .await
                .map_err(|_| StoreError::Timeout(within))??;
            return Ok((client, deadline));
        }
        let pool = self.pool.clone();
        let mut getting = tokio::spawn(async move { pool.get().await });
        let client = tokio::time::timeout_at(deadline, &mut getting)
            .await
            .map_err(|_| StoreError::Timeout(within))?
            .map_err(|_| StoreError::Closed)??;
        Ok((client, deadline))
    }
}

/// The answer of a query made with a deadline (look-ups, probes). A connection whose query
/// timed out leaves the pool: its state is unknown, and a socket to a host that vanished
/// without a reset would hold every later query on it.
fn done_within<T, E: Into<StoreError>>(
    client: deadpool_postgres::Object,
    result: Result<Result<T, E>, tokio::time::error::Elapsed>,
    within: Duration,
) -> Result<T, StoreError> {
    match result {
        Ok(result) => result.map_err(Into::into),
        Err(_) => {
            drop(deadpool_postgres::Object::take(client));
            Err(StoreError::Timeout(within))
        }
    }
}

// --- Bulk look-ups and listings (SPEC §5, issue 10) ---

/// One row of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRow {
    pub domain: String,
    pub delivered: i64,
    pub bounced: i64,
    pub other_bounced: i64,
}

const LOOKUP_MANY: &str =
    "SELECT domain, delivered, bounced, other_bounced FROM domains WHERE domain = ANY($1::text[])";
// One statement per status, with the status as literal predicates so the planner can use the
// partial index `domains_never_bounced` (V3) for catch-all and unknown. `$1` is the cursor.
const LIST_ALL: &str = "SELECT domain, delivered, bounced, other_bounced FROM domains \
     WHERE domain > $1 ORDER BY domain LIMIT $2";
const LIST_CATCH_ALL: &str = "SELECT domain, delivered, bounced, other_bounced FROM domains \
     WHERE bounced = 0 AND delivered > $3 AND domain > $1 ORDER BY domain LIMIT $2";
/// Catch-all at a threshold of [`CATCH_ALL_INDEXED`] or more: the partial index of V7 holds
/// exactly the domains that never bounced and are past 1000 deliveries, so a page reads about
/// its own rows rather than every never-bounced domain between two catch-all ones.
const LIST_CATCH_ALL_INDEXED: &str = "SELECT domain, delivered, bounced, other_bounced FROM domains \
     WHERE catch_all_1000 AND bounced = 0 AND delivered > $3 AND domain > $1 ORDER BY domain LIMIT $2";
/// The threshold built into V7's `catch_all_1000` (the default `CATCHALL_THRESHOLD`).
const CATCH_ALL_INDEXED: i64 = 1000;
const LIST_UNKNOWN: &str = "SELECT domain, delivered, bounced, other_bounced FROM domains \
     WHERE bounced = 0 AND delivered <= $3 AND domain > $1 ORDER BY domain LIMIT $2";
const LIST_NOT_CATCH_ALL: &str = "SELECT domain, delivered, bounced, other_bounced FROM domains \
     WHERE bounced >= 1 AND domain > $1 ORDER BY domain LIMIT $2";

impl Store {
    /// The counters of many (normalised) domains in one round trip; never-seen ones are absent.
    pub async fn lookup_many(
        &self,
        domains: &[String],
    ) -> Result<std::collections::HashMap<String, Counts>, StoreError> {
        if domains.is_empty() {
            return Ok(Default::default());
        }
        let (client, deadline) = self.lookup_client().await?;
        let result = tokio::time::timeout_at(deadline, async {
            let statement = client.prepare_cached(LOOKUP_MANY).await?;
            Ok(client.query(&statement, &[&domains]).await?)
        })
        .await;
        let rows = self.lookup_done(client, result)?;
        Ok(rows
            .iter()
            .map(|row| {
                (
                    row.get(0),
                    Counts {
                        delivered: row.get(1),
                        bounced: row.get(2),
                        other_bounced: row.get(3),
                    },
                )
            })
            .collect())
    }

    /// Up to `limit` domains after `after` in byte order, of one status (or all): one keyset
    /// page. Domains never seen (status unknown with no row) are not listed.
    pub async fn list_domains(
        &self,
        status: Option<crate::event::Status>,
        threshold: i64,
        after: &str,
        limit: u32,
    ) -> Result<Vec<DomainRow>, StoreError> {
        let limit = i64::from(limit);
        let (client, deadline) = self.lookup_client().await?;
        let result =
            tokio::time::timeout_at(deadline, list_on(&client, status, threshold, after, limit))
                .await;
        let rows = self.lookup_done(client, result)?;
        Ok(rows
            .iter()
            .map(|row| DomainRow {
                domain: row.get(0),
                delivered: row.get(1),
                bounced: row.get(2),
                other_bounced: row.get(3),
            })
            .collect())
    }
}

async fn list_on(
    client: &deadpool_postgres::Client,
    status: Option<crate::event::Status>,
    threshold: i64,
    after: &str,
    limit: i64,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    use crate::event::Status;
    let rows = match status {
        None => {
            let statement = client.prepare_cached(LIST_ALL).await?;
            client.query(&statement, &[&after, &limit]).await?
        }
        Some(Status::NotCatchAll) => {
            let statement = client.prepare_cached(LIST_NOT_CATCH_ALL).await?;
            client.query(&statement, &[&after, &limit]).await?
        }
        Some(status) => {
            let sql = match status {
                Status::CatchAll if threshold >= CATCH_ALL_INDEXED => LIST_CATCH_ALL_INDEXED,
                Status::CatchAll => LIST_CATCH_ALL,
                _ => LIST_UNKNOWN,
            };
            let statement = client.prepare_cached(sql).await?;
            client
                .query(&statement, &[&after, &limit, &threshold])
                .await?
        }
    };
    Ok(rows)
}
