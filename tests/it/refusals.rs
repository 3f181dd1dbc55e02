//! What Postgres does to a batch never wedges the queue (SPEC §4): a permanent error isolates
//! its culprit, a hung backend costs one deadline, a stop with Postgres frozen is still clean,
//! and memory stays bounded by bytes while Postgres refuses.

use crate::helpers::*;
use crate::rawamqp::{Properties, RawPublisher, Table};
use std::time::{Duration, Instant};

/// A trigger on `domains` that refuses `refused.example` (a permanent, content-caused error).
pub async fn refuse_one_domain(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF NEW.domain = 'refused.example' THEN \
                 RAISE EXCEPTION 'refused by the test trigger' USING ERRCODE = 'check_violation'; \
               END IF; RETURN NEW; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON domains \
               FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .await
        .expect("install the refusing trigger");
}

/// Publishes `messages` with ids, concurrently confirmed.
async fn publish_all(broker: &TestBroker, messages: &[(String, Vec<u8>)]) {
    let (_connection, channel) = broker.channel().await;
    for chunk in messages.chunks(200) {
        let confirms = futures_util::future::join_all(chunk.iter().map(|(id, body)| {
            let channel = channel.clone();
            let exchange = broker.exchange.clone();
            async move {
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "x".into(),
                        lapin::options::BasicPublishOptions::default(),
                        body,
                        lapin::BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_message_id(id.as_str().into()),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirmed")
            }
        }))
        .await;
        assert!(confirms.iter().all(|c| c.is_ack()), "every message acked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_dead_lettered_and_the_rest_is_counted() {
    let (db, broker, worker) = started().await;
    refuse_one_domain(&db).await;
    let mut messages = Vec::new();
    let mut expected = Counts::new();
    // 2,000 single-event messages with one refused among them ...
    for i in 0..2000 {
        let domain = if i == 1234 {
            "refused.example".to_string()
        } else {
            format!("d{}.example", i % 97)
        };
        let body = format!(r#"{{"domain":"{domain}","type":"delivered"}}"#);
        messages.push((format!("single-{i}"), body.into_bytes()));
        if i != 1234 {
            expected.entry(domain).or_default().0 += 1;
        }
    }
    // ... and 300 ten-event messages, one of which holds the refused domain among others: that
    // message is refused whole, its other events are not counted.
    for m in 0..300 {
        let culprit = m == 150;
        let events: Vec<_> = (0..10)
            .map(|e| {
                let domain = match (culprit, e) {
                    (true, 7) => "refused.example".to_string(),
                    (true, _) => format!("peer-{e}.example"),
                    _ => format!("b{}.example", (m * 10 + e) % 89),
                };
                if !culprit {
                    expected.entry(domain.clone()).or_default().1 += 1;
                }
                serde_json::json!({"domain": domain, "type": "bounced"})
            })
            .collect();
        messages.push((
            format!("multi-{m}"),
            serde_json::to_vec(&events).expect("json"),
        ));
    }
    publish_all(&broker, &messages).await;
    // Last of the stream, so last of its batch: the batch's ack may not name it.
    let last = br#"{"domain":"refused.example","type":"delivered"}"#.to_vec();
    publish_all(&broker, &[("last".to_string(), last)]).await;

    assert_counts_eventually(&db, &expected, Duration::from_secs(60)).await;
    wait_for(
        Duration::from_secs(10),
        "the three refused messages dead-lettered",
        || async { (broker.depth(&broker.dead_queue()).await == 3).then_some(()) },
    )
    .await;
    assert_eq!(worker.stats().database_rejected, 3);
    // The process-wide metric says the same.
    assert_eq!(
        worker
            .metric("catchall_rejections_total{reason=\"database_rejected\"}")
            .await,
        3.0
    );
    assert_eq!(
        worker.stats().applied,
        2298,
        "every other message applied exactly once"
    );
    assert_eq!(broker.depth(&broker.queue).await, 0, "the queue drained");
    assert_eq!(
        worker.stats().reconnects,
        0,
        "no ack named a rejected tag (the broker would close the channel)"
    );
    worker.ready().await;
    worker.stop().await;
}

/// The worker's own Postgres backends in the test's database, stopped with SIGSTOP until this
/// value is dropped (SIGCONT, even on panic). Only pids of this test's database are touched.
struct Frozen(Vec<i32>);

impl Frozen {
    async fn worker_backends(db: &TestDb) -> Self {
        let pids: Vec<i32> = db
            .client()
            .await
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name = 'catchall'",
                &[&db.name],
            )
            .await
            .expect("list the worker's backends")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert!(!pids.is_empty(), "the worker has backends to freeze");
        for &pid in &pids {
            // SAFETY: kill(2) with a pid read from pg_stat_activity for this test's database.
            assert_eq!(
                unsafe { libc::kill(pid, libc::SIGSTOP) },
                0,
                "SIGSTOP {pid}"
            );
        }
        Self(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as above; resumes the backends this value stopped.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

fn singles(prefix: &str, n: usize) -> (Vec<(String, Vec<u8>)>, Counts) {
    let mut expected = Counts::new();
    let messages = (0..n)
        .map(|i| {
            let domain = format!("{prefix}{}.example", i % 13);
            expected.entry(domain.clone()).or_default().0 += 1;
            let body = format!(r#"{{"domain":"{domain}","type":"delivered"}}"#);
            (format!("{prefix}-{i}"), body.into_bytes())
        })
        .collect();
    (messages, expected)
}

fn merge(into: &mut Counts, from: Counts) {
    for (domain, (d, b)) in from {
        let entry = into.entry(domain).or_default();
        entry.0 += d;
        entry.1 += b;
    }
}

/// A fresh database and topology, with a worker whose `DB_TIMEOUT` is `db_timeout`, ready.
async fn started_with_db_timeout(db_timeout: Duration) -> (TestDb, TestBroker, TestWorker) {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.db_timeout = db_timeout;
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    (db, broker, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_backend_costs_one_deadline_then_a_fresh_connection_commits() {
    let (db, broker, worker) = started_with_db_timeout(Duration::from_secs(2)).await;
    let (first, mut expected) = singles("before", 300);
    publish_all(&broker, &first).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;

    // Every backend the worker has is frozen while idle; the next batches hang on them.
    let frozen = Frozen::worker_backends(&db).await;
    let (second, more) = singles("during", 300);
    merge(&mut expected, more);
    let started = Instant::now();
    publish_all(&broker, &second).await;
    // Counted while the old backends are still stopped: the hung attempts were abandoned after
    // DB_TIMEOUT and retried on fresh connections.
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    eprintln!(
        "counted past the frozen backends in {:?}",
        started.elapsed()
    );
    assert!(worker.stats().db_errors >= 1, "a deadline was hit");
    drop(frozen);
    worker.stop().await;
}

/// An attempt abandoned at `DB_TIMEOUT` leaves no session behind that can still commit it. The
/// upsert and its `COMMIT` go out together, so a backend waiting for a lock holds both; the worker
/// used to drop the connection only, and when the lock went, that backend committed the batch the
/// worker had given up on (its channel had closed, so the broker redelivered it): messages without
/// an id counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_attempt_cannot_commit_after_its_batch_is_redelivered() {
    const MESSAGES: i64 = 40;
    let (db, broker, worker) = started_with_db_timeout(Duration::from_secs(1)).await;
    // The domain's row is locked (not the table, which would hold a fresh connection's
    // statements at `prepare`, before anything is sent): every attempt sends its upsert and
    // `COMMIT`, and its backend waits for the row.
    let lock = lock_row(&db, "zombie.example").await;
    publish_id_less(&broker, "zombie.example", MESSAGES).await;
    // An attempt has met its deadline: its backend still waits for the lock.
    wait_for(Duration::from_secs(30), "an attempt timed out", || async {
        (worker.stats().db_errors >= 1).then_some(())
    })
    .await;
    // The broker closes the worker's connection: the next failed attempt gives the batch up, and
    // the broker redelivers it to the reconnected consumer.
    give_up_through_the_broker(&worker, &broker).await;
    // By now the given-up attempts' backends were ended: the worker waits for that before it
    // reconnects.
    lock.batch_execute("COMMIT").await.expect("release the row");
    wait_for(
        Duration::from_secs(60),
        "the redelivered batch applied",
        || async {
            (worker.stats().applied >= MESSAGES as u64 && broker.depth(&broker.queue).await == 0)
                .then_some(())
        },
    )
    .await;
    assert!(
        worker.metric("catchall_batches_given_up_total").await >= 1.0,
        "the batch given up is counted"
    );
    worker.stop().await;
    let counts = db.counts().await;
    assert_eq!(
        counts.get("zombie.example"),
        Some(&(MESSAGES, 0)),
        "counted once"
    );
}

/// A statement that waits for a row lock on a connection the worker dropped without a cancel
/// (as when a cancel request reaches the backend before the statement does, and is discarded)
/// is ended by Postgres once it sees the worker gone, not run when the lock goes. Before the
/// worker set `client_connection_check_interval` the backend waited on and committed the
/// update after the lock was released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_of_a_connection_dropped_without_a_cancel_does_not_outlive_it() {
    let db = TestDb::create().await;
    let store = db.store(1).await;
    let lock = lock_row(&db, "dropped.example").await;
    // Past its deadline the connection leaves the pool and is dropped; no cancel is sent.
    let update = "UPDATE domains SET delivered = delivered + 1 \
                  WHERE domain = 'dropped.example' RETURNING delivered::float8";
    let error = store
        .query_one_within(update, Duration::from_secs(1))
        .await
        .expect_err("the row is locked");
    assert!(
        matches!(error, catchall::store::StoreError::Timeout(_)),
        "{error:?}"
    );
    wait_for(
        Duration::from_secs(10),
        "the dropped connection's backend to end its statement",
        || async { (lock_waiters(&lock).await? == 0).then_some(()) },
    )
    .await;
    lock.batch_execute("COMMIT").await.expect("release the row");
    assert_eq!(
        db.counts().await.get("dropped.example"),
        Some(&(0, 0)),
        "the update never ran"
    );
}

/// An attempt given up while its `COMMIT` is still on the way to its backend (held in a proxy
/// here; a loaded machine's socket buffers in life) cannot commit. The cancel request sent at
/// the give-up reached the backend first, idle between statements, and was discarded: the
/// backend stayed in its transaction, holding the batch's upsert and token, and committed once
/// its `COMMIT` arrived. Had the batch been redelivered meanwhile (its broker connection lost),
/// its messages without an id counted twice: 67 and 69 of 40 in a version of this test that
/// closed the broker connection (dropped: the close could land between a retry's commit and
/// its ack, a double count by design), 49 of 40 in a full run of
/// `an_abandoned_attempt_cannot_commit_after_its_batch_is_redelivered`. The backend is now
/// terminated: no session holds the upsert, and the retry commits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_attempt_whose_commit_arrives_after_the_cancel_does_not_commit() {
    abandoned_attempt_with_its_commit_held(false).await;
}

/// The same with the worker logged in as a role that is not a superuser (the owner of its
/// database, as on a managed Postgres): it may end its own backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_is_not_a_superuser_ends_the_backend_of_an_abandoned_attempt() {
    abandoned_attempt_with_its_commit_held(true).await;
}

/// A login role for one test, dropped with what it owns once the test's database is gone (so
/// it is declared before the database).
struct TestRole(String);

impl TestRole {
    async fn create() -> Self {
        let name = format!("catchall_{}", uuid::Uuid::now_v7().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE ROLE {name} LOGIN"))
            .await
            .expect("create the role");
        Self(name)
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let name = self.0.clone();
        run_blocking(async move {
            let _ = admin()
                .await
                .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
                .await;
        });
    }
}

async fn abandoned_attempt_with_its_commit_held(as_owner_role: bool) {
    use crate::faults::{Action, Rig, Trigger, start_with_hook};
    const MESSAGES: i64 = 40;
    let role = match as_owner_role {
        true => Some(TestRole::create().await),
        false => None,
    };
    let rig = Rig::new().await;
    let mut config = rig.config();
    if let Some(role) = &role {
        admin()
            .await
            .batch_execute(&format!(
                "ALTER DATABASE \"{}\" OWNER TO {}",
                rig.db.name, role.0
            ))
            .await
            .expect("the role owns the test database");
        config.database_url = format!("postgres://{}@{}/{}", role.0, rig.pg.addr, rig.db.name);
    }
    config.db_timeout = Duration::from_secs(1);
    let trigger = Trigger::default();
    let worker = start_with_hook(config, trigger.hook(rig.pg.clone())).await;
    worker.ready().await;
    trigger.arm(Action::HoldCommit);
    publish_id_less(&rig.broker, "late.example", MESSAGES).await;
    // The first attempt ran its statements; its COMMIT is held: no answer, DB_TIMEOUT, given
    // up. The retries go on (on fresh connections; the pool's held ones time out too).
    wait_for(Duration::from_secs(30), "an attempt timed out", || async {
        (worker.stats().db_errors >= 1).then_some(())
    })
    .await;
    // With the backend of the attempt given up still in its transaction, every retry waits
    // behind it (the batch's token): this times out. Counted in the table, not in the worker's
    // applied messages: when the messages came as two batches, both held, the second one's
    // backend could take the row lock once the first was terminated and commit before its own
    // terminate came; its retry then found its token and applied nothing, rightly.
    wait_for(
        Duration::from_secs(30),
        "a retry to apply the batch",
        || async {
            let counted = rig.db.total_events().await;
            assert!(counted <= MESSAGES, "{counted} of {MESSAGES} counted");
            (counted == MESSAGES).then_some(())
        },
    )
    .await;
    let client = rig.db.client().await;
    let holding: Vec<i32> = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'idle in transaction' AND query LIKE 'INSERT INTO domains%'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(holding, Vec::<i32>::new(), "backends holding an upsert");
    // The held COMMIT goes out, to a backend that is gone.
    rig.pg.release_held();
    wait_for(Duration::from_secs(30), "the queue drained", || async {
        (rig.broker.depth(&rig.broker.queue).await == 0).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(
        rig.db.counts().await.get("late.example"),
        Some(&(MESSAGES, 0)),
        "counted once"
    );
    if let Some(role) = &role {
        let superuser: bool = admin()
            .await
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                &[&role.0],
            )
            .await
            .expect("the role")
            .get(0);
        assert!(
            !superuser,
            "the worker ran as a role that is not a superuser"
        );
    }
}

/// Closes the worker's broker connection from the broker's side and waits until it has
/// reconnected: a batch still failing then is given up, and its messages redelivered.
async fn give_up_through_the_broker(worker: &TestWorker, broker: &TestBroker) {
    let name = format!("catchall-worker {}", broker.queue);
    wait_for(
        Duration::from_secs(30),
        "the worker's connection closed",
        || async { (crate::faults::broker_closes_connections(&name).await > 0).then_some(()) },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "the worker reconnected",
        || async { (worker.stats().reconnects >= 1).then_some(()) },
    )
    .await;
}

/// A client holding `domain`'s row locked (`FOR UPDATE`, in a transaction it leaves open): an
/// upsert of the domain waits for it. The row is inserted first, apart: in one simple query the
/// `BEGIN` would take the `INSERT` into its transaction, and a plain `UPDATE` would find no row.
async fn lock_row(db: &TestDb, domain: &str) -> tokio_postgres::Client {
    let lock = db.client().await;
    lock.execute("INSERT INTO domains (domain) VALUES ($1)", &[&domain])
        .await
        .expect("insert the domain");
    lock.batch_execute("BEGIN").await.expect("begin");
    lock.execute(
        "SELECT 1 FROM domains WHERE domain = $1 FOR UPDATE",
        &[&domain],
    )
    .await
    .expect("lock the domain's row");
    lock
}

/// Publishes `count` single delivered events for `domain` without a `message_id`.
async fn publish_id_less(broker: &TestBroker, domain: &str, count: i64) {
    let (_connection, channel) = broker.channel().await;
    let body = serde_json::json!({"domain": domain, "type": "delivered"}).to_string();
    for _ in 0..count {
        publish_raw(&channel, &broker.exchange, "x", body.as_bytes(), None).await;
    }
}

/// A store of one connection with a 1 s deadline, on a database that holds `a.example` with 7
/// deliveries.
async fn one_connection_store_with_a_domain() -> (TestDb, catchall::store::Store) {
    let db = TestDb::create().await;
    let store = db.store(1).await.with_db_timeout(Duration::from_secs(1));
    db.client()
        .await
        .batch_execute("INSERT INTO domains (domain, delivered) VALUES ('a.example', 7)")
        .await
        .expect("seed a domain");
    (db, store)
}

/// Look-ups on a frozen backend: the one on it, and every one queued behind it for the only
/// connection, fails within the look-up deadline (never hangs); the frozen connection leaves
/// the pool, so the next look-up, with the backend still stopped, runs on a fresh connection
/// and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_on_a_frozen_backend_fail_in_time_and_the_next_runs_on_a_fresh_connection() {
    let (db, store) = one_connection_store_with_a_domain().await;
    assert_eq!(
        store.lookup("a.example").await.expect("look-up").delivered,
        7
    );

    let frozen = Frozen::worker_backends(&db).await;
    let started = Instant::now();
    let asks = (0..20).map(|_| store.lookup("a.example"));
    for answer in futures_util::future::join_all(asks).await {
        let error = answer.expect_err("no answer from a frozen backend");
        assert!(
            matches!(error, catchall::store::StoreError::Timeout(_)),
            "a timeout: {error:?}"
        );
    }
    let waited = started.elapsed();
    // One deadline (1 s) for all of them, not 20 one after the other; the bound leaves room
    // for a loaded machine.
    assert!(waited < Duration::from_secs(10), "failed after {waited:?}");
    let counts = store
        .lookup("a.example")
        .await
        .expect("answered on a fresh connection while the old backend is stopped");
    assert_eq!(counts.delivered, 7);
    drop(frozen);
}

/// The same through `Lookups` (what `GET /domains/{domain}` uses): a group of look-ups on a
/// frozen backend fails as a whole within the deadline, each look-up with the timeout, and the
/// next one answers on a fresh connection. Current-thread runtime: the 20 look-ups are all
/// queued before the task that groups them runs, so they are one group.
#[tokio::test]
async fn grouped_lookups_on_a_frozen_backend_all_fail_in_time() {
    let (db, store) = one_connection_store_with_a_domain().await;
    let lookups = catchall::lookups::Lookups::spawn(store);
    let warm = lookups.lookup("a.example".into()).await.expect("look-up");
    assert_eq!(warm.delivered, 7);

    let frozen = Frozen::worker_backends(&db).await;
    let started = Instant::now();
    let asks = (0..20).map(|i| lookups.lookup(format!("d{i}.example")));
    for answer in futures_util::future::join_all(asks).await {
        let error = answer.expect_err("no answer from a frozen backend");
        assert!(
            matches!(*error, catchall::store::StoreError::Timeout(_)),
            "a timeout: {error:?}"
        );
    }
    let waited = started.elapsed();
    // One deadline (1 s) for all of them, not 20 one after the other; the bound leaves room
    // for a loaded machine.
    assert!(waited < Duration::from_secs(10), "failed after {waited:?}");
    assert_eq!(
        lookups.queries(),
        2,
        "the warm-up, then the 20 look-ups as one query"
    );
    let counts = lookups
        .lookup("a.example".into())
        .await
        .expect("answered on a fresh connection while the old backend is stopped");
    assert_eq!(counts.delivered, 7);
    drop(frozen);
}

/// The worker binary for a stop with Postgres frozen (`SHUTDOWN_TIMEOUT` 4 s, a `DB_TIMEOUT`
/// past it), with `settings` over those, once it is ready (the topology exists once it
/// consumes, so publish after this); and its HTTP port.
async fn stoppable_worker(
    db: &TestDb,
    broker: &TestBroker,
    settings: &[(&str, String)],
) -> (tokio::process::Child, u16) {
    let mut all = vec![
        ("SHUTDOWN_TIMEOUT", "4s".into()),
        ("DB_TIMEOUT", "60s".into()),
    ];
    all.extend(settings.iter().cloned());
    ready_worker(db, broker, &all).await
}

/// The worker binary with `settings`, once it is ready (it consumes: the topology exists); and
/// its HTTP port.
async fn ready_worker(
    db: &TestDb,
    broker: &TestBroker,
    settings: &[(&str, String)],
) -> (tokio::process::Child, u16) {
    let (child, port) = spawn_on_a_port(worker_command(db, broker, settings)).await;
    wait_for(Duration::from_secs(30), "the worker ready", || async {
        let response = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_postgres_frozen_exits_0_in_time_and_loses_nothing() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let (mut child, _) = stoppable_worker(&db, &broker, &[]).await;
    let (first, mut expected) = singles("before", 200);
    publish_all(&broker, &first).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;

    let frozen = Frozen::worker_backends(&db).await;
    let (second, more) = singles("during", 200);
    merge(&mut expected, more);
    publish_all(&broker, &second).await;
    wait_for(
        Duration::from_secs(10),
        "the worker holding the messages",
        || async {
            let depth = broker.depth(&broker.queue).await;
            eprintln!("depth {depth}");
            (depth == 0).then_some(())
        },
    )
    .await;
    let (status, took) = sigterm(&mut child, Duration::from_secs(8)).await;
    eprintln!("stopped in {took:?} with {status:?}");
    assert!(
        status.success(),
        "a stop with Postgres frozen is clean: {status:?}"
    );
    assert!(took < Duration::from_secs(6));
    drop(frozen);

    // What was not committed comes back; a new worker counts it, once.
    let restarted = TestWorker::start(TestWorker::config(&db, &broker)).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    restarted.stop().await;
}

/// A stop out of time while the oldest batch waits for a row lock, with a later batch already
/// committed behind it: the later batch's messages are acked one by one (a multiple-ack would
/// cover the batch given up), so only the given-up one comes back. They used to be left
/// unacked and redelivered, and those without an id counted twice (40 of 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_out_of_time_acks_what_committed_behind_the_batch_it_gives_up() {
    const BEHIND: i64 = 20;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    // Batches close after 1 s, so each burst below is one batch.
    let settings = [
        ("BATCH_TIMEOUT_MS", "1000".into()),
        ("IN_FLIGHT", "4".into()),
    ];
    let (mut child, _) = stoppable_worker(&db, &broker, &settings).await;
    let lock = lock_row(&db, "held.example").await;
    publish_id_less(&broker, "held.example", 1).await;
    db.await_lock_waits(1, "%", "the first batch waiting for the row")
        .await;
    publish_id_less(&broker, "behind.example", BEHIND).await;
    wait_for(
        Duration::from_secs(30),
        "the second batch committed",
        || async { (db.counts().await.get("behind.example") == Some(&(BEHIND, 0))).then_some(()) },
    )
    .await;
    let (status, took) = sigterm(&mut child, Duration::from_secs(8)).await;
    eprintln!("stopped in {took:?} with {status:?}");
    assert!(status.success(), "a stop out of time is clean: {status:?}");
    lock.batch_execute("COMMIT").await.expect("release the row");

    // The given-up batch comes back to a new worker; nothing else does.
    let restarted = TestWorker::start(TestWorker::config(&db, &broker)).await;
    wait_for(
        Duration::from_secs(30),
        "the given-up batch applied",
        || async {
            let held = db.counts().await.get("held.example").copied();
            (held == Some((1, 0)) && broker.depth(&broker.queue).await == 0).then_some(())
        },
    )
    .await;
    restarted.stop().await;
    let counts = db.counts().await;
    assert_eq!(counts.get("held.example"), Some(&(1, 0)));
    assert_eq!(
        counts.get("behind.example"),
        Some(&(BEHIND, 0)),
        "what committed behind the batch given up was acked, not redelivered"
    );
}

/// A stop that gives up a batch while it is being bisected acks, one by one, the messages of
/// the parts that committed. The parts' tokens died with the task, so those messages came back
/// and, having no id, were counted again (found by a review).
///
/// One batch of 10 id-less messages: 8 to `good.example`, then one to `refused.example`
/// (refused by a trigger: the batch is bisected) and one to `z-held.example`, whose row is
/// locked; in sorted order the refusal comes before the lock, so every part holding it fails
/// at once, and the parts of `good.example` commit while the last part waits for the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_bisecting_acks_the_parts_that_committed() {
    const GOOD: i64 = 8;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    // One batch: it closes after 1 s.
    let (mut child, _) =
        stoppable_worker(&db, &broker, &[("BATCH_TIMEOUT_MS", "1000".into())]).await;
    refuse_one_domain(&db).await;
    let lock = lock_row(&db, "z-held.example").await;
    publish_id_less(&broker, "good.example", GOOD).await;
    publish_id_less(&broker, "refused.example", 1).await;
    publish_id_less(&broker, "z-held.example", 1).await;
    db.await_lock_waits(1, "%", "the last part waiting for the row")
        .await;
    assert_eq!(
        db.counts().await.get("good.example"),
        Some(&(GOOD, 0)),
        "the parts of good.example committed"
    );
    let (status, took) = sigterm(&mut child, Duration::from_secs(20)).await;
    eprintln!("stopped in {took:?} with {status:?}");
    assert!(status.success(), "a clean stop: {status:?}");
    lock.batch_execute("COMMIT").await.expect("release the row");

    // Only the part given up comes back; the refused message was dead-lettered.
    let restarted = TestWorker::start(TestWorker::config(&db, &broker)).await;
    wait_for(
        Duration::from_secs(30),
        "the part given up applied",
        || async {
            let held = db.counts().await.get("z-held.example").copied();
            (held == Some((1, 0)) && broker.depth(&broker.queue).await == 0).then_some(())
        },
    )
    .await;
    restarted.stop().await;
    assert_eq!(
        db.counts().await.get("good.example"),
        Some(&(GOOD, 0)),
        "the committed parts were acked, not redelivered and counted again"
    );
    assert_eq!(broker.depth(&broker.dead_queue()).await, 1);
}

/// An attempt that fails during a stop is retried while the stop's time lasts: the batch
/// commits and is acked. The stop's first Postgres error used to give it up at once, seconds
/// early, so the messages came back (and had the failed attempt's COMMIT gone through, its
/// reply lost, those without an id would have counted twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_failing_during_a_stop_is_retried_until_the_stop_runs_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MESSAGES: i64 = 10;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let settings = [
        ("SHUTDOWN_TIMEOUT", "10s".into()),
        ("DB_TIMEOUT", "60s".into()),
        ("BATCH_SIZE", MESSAGES.to_string()),
        // An idle connection stays open until the stop closes it (below).
        ("HTTP_HEADER_TIMEOUT", "60s".into()),
    ];
    let (mut child, port) = ready_worker(&db, &broker, &settings).await;
    let lock = lock_row(&db, "failing.example").await;
    publish_id_less(&broker, "failing.example", MESSAGES).await;
    db.await_lock_waits(1, "%", "the batch waiting for the row")
        .await;

    // An idle keep-alive connection: the worker closes it once the stop has begun.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: worker\r\n\r\n")
        .await
        .expect("send a request");
    let mut answer = [0u8; 1024];
    let read = idle.read(&mut answer).await.expect("read the answer");
    assert!(
        answer[..read].starts_with(b"HTTP/1.1 200"),
        "healthz answered"
    );
    let pid = child.id().expect("the child's pid") as i32;
    // SAFETY: kill(2) on our own child process, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "send SIGTERM");
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut answer)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the stop closed the idle connection: {closed:?}"
    );

    // The stop is under way: the attempt's backend is ended (a transient failure), then the
    // row is released.
    db.client()
        .await
        .execute(
            &format!("SELECT pg_terminate_backend(pid) {LOCK_WAITERS}"),
            &[],
        )
        .await
        .expect("terminate the waiting backend");
    lock.batch_execute("COMMIT").await.expect("release the row");
    let status = tokio::time::timeout(Duration::from_secs(12), child.wait())
        .await
        .expect("the worker exits within SHUTDOWN_TIMEOUT")
        .expect("wait for the worker");
    assert!(status.success(), "a clean stop: {status:?}");
    assert_eq!(
        broker.depth(&broker.queue).await,
        0,
        "the batch was committed and acked, not left for redelivery"
    );
    assert_eq!(
        db.counts().await.get("failing.example"),
        Some(&(MESSAGES, 0))
    );
}

/// A look-up in flight on a frozen Postgres does not hold the stop past SHUTDOWN_TIMEOUT: the
/// HTTP drain gives up on it a margin before, and the worker still exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_postgres_frozen_and_a_lookup_in_flight_exits_0_in_time() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    // One pooled connection: the look-up needs the frozen one.
    let (mut child, port) = stoppable_worker(&db, &broker, &[("DB_POOL_SIZE", "1".into())]).await;
    let (first, expected) = singles("before", 50);
    publish_all(&broker, &first).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;

    let frozen = Frozen::worker_backends(&db).await;
    let lookup = tokio::spawn(reqwest::get(format!(
        "http://127.0.0.1:{port}/domains/before0.example"
    )));
    // The worker counts a look-up query as it sends it (its only pooled connection is the
    // frozen one); then the look-up must still be waiting when the stop comes.
    wait_for(
        Duration::from_secs(10),
        "the look-up query sent",
        || async {
            let sent = child_metric(port, "catchall_lookup_group_domains_count").await?;
            (sent >= 1.0).then_some(())
        },
    )
    .await;
    assert!(
        !lookup.is_finished(),
        "the look-up waits on frozen Postgres"
    );
    let (status, took) = sigterm(&mut child, Duration::from_secs(8)).await;
    eprintln!("stopped in {took:?} with {status:?}");
    assert!(
        status.success(),
        "a stop with a look-up stuck on frozen Postgres is clean: {status:?}"
    );
    assert!(took < Duration::from_secs(6));
    // The look-up got no 2xx: 503, or its connection closed by the stop.
    let answer = lookup.await.expect("the look-up task");
    if let Ok(response) = answer {
        assert!(!response.status().is_success(), "{}", response.status());
    }
    drop(frozen);
}

/// One series of `/metrics` of the worker binary on `port`; `None` if it does not answer or
/// does not export the series.
async fn child_metric(port: u16, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric_value(&text, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_under_prefetch_bytes_with_1_mib_messages_while_postgres_refuses() {
    const BUDGET: u64 = 16 << 20;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let (mut child, port) =
        ready_worker(&db, &broker, &[("PREFETCH_BYTES", BUDGET.to_string())]).await;
    // Every commit fails with a transient error: nothing is acked, the worker holds what the
    // prefetch lets it.
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION outage() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               RAISE EXCEPTION 'test outage' USING ERRCODE = 'serialization_failure'; END $$; \
             CREATE TRIGGER outage BEFORE INSERT OR UPDATE ON domains \
               FOR EACH ROW EXECUTE FUNCTION outage();",
        )
        .await
        .expect("install the outage trigger");
    let total = 150;
    let messages: Vec<(String, Vec<u8>)> = (0..total)
        .map(|i| {
            let mut body =
                format!(r#"{{"domain":"big{i}.example","type":"delivered","pad":""#).into_bytes();
            body.resize((1 << 20) - 16, b'x');
            body.extend_from_slice(b"\"}");
            (format!("big-{i}"), body)
        })
        .collect();
    publish_all(&broker, &messages).await;
    // The worker has taken what it may and keeps failing on it.
    wait_for(Duration::from_secs(30), "commits failing", || async {
        (child_metric(port, "catchall_db_errors_total").await? >= 5.0).then_some(())
    })
    .await;
    // /readyz says why, shortly, without the server's message text.
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("GET /readyz");
    assert_eq!(ready.status(), 503);
    let reason = ready.text().await.expect("body");
    assert!(
        reason.contains("SQLSTATE 40001") && !reason.contains("test outage"),
        "a short reason, no Postgres error text: {reason}"
    );
    let held = total - broker.depth(&broker.queue).await;
    let peak = peak_rss_bytes(child.id().expect("pid"));
    eprintln!(
        "held {held} messages of 1 MiB, peak RSS {} MiB (budget {} MiB + 64 MiB)",
        peak >> 20,
        BUDGET >> 20
    );
    assert!(
        u64::from(held) <= (BUDGET >> 20) + 1,
        "unacked bodies stay under PREFETCH_BYTES plus one message (held {held})"
    );
    assert!(peak < BUDGET + (64 << 20), "peak RSS {peak} bytes");
    let _ = child.kill().await;
}

/// `PREFETCH_BYTES` holds when the messages turn large: single-event messages raise the prefetch
/// to `PREFETCH`, then messages of ~900 KiB come faster than the worker takes them. Without the
/// read gate the broker sent them into the credit the small ones left and the worker read them
/// all (peak RSS 250 MiB against a 16 MiB budget in `benches/prefetch-switch.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_under_prefetch_bytes_when_messages_turn_large() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let budget = [("PREFETCH_BYTES", SWITCH_BUDGET.to_string())];
    let total = small_then_large_queued(&db, &broker, &budget, SWITCH_SMALL, 150).await;
    let (mut child, port) = ready_worker(&db, &broker, &budget).await;
    wait_for(Duration::from_secs(180), "every event counted", || async {
        (db.total_events().await == total).then_some(())
    })
    .await;
    let peak = peak_rss_bytes(child.id().expect("pid"));
    eprintln!(
        "peak RSS {} MiB (budget {} MiB + 64 MiB)",
        peak >> 20,
        SWITCH_BUDGET >> 20
    );
    assert!(peak < SWITCH_BUDGET + (64 << 20), "peak RSS {peak} bytes");
    // The prefetch had been raised for the small ones: the gate, not the prefetch, held the
    // large ones back.
    let prefetch = child_metric(port, "catchall_prefetch_messages")
        .await
        .expect("GET /metrics");
    assert!(prefetch > 1000.0, "the prefetch was raised: {prefetch}");
    let _ = child.kill().await;
}

/// Postgres stalled for longer than RabbitMQ's send timeout (Ranch's default, 30 s) while large
/// messages wait behind a full read gate: the broker's writes to the worker block, and it closes
/// the connection. That costs one reconnect and the redelivery of what was unacked, deduplicated
/// by message id: no event is lost or counted twice, and memory stays within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_stall_behind_a_full_read_gate_costs_a_reconnect_and_no_count() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    // A short DB_TIMEOUT, so the stalled batch sees the closed channel soon after the close.
    let settings = [
        ("PREFETCH_BYTES", SWITCH_BUDGET.to_string()),
        ("DB_TIMEOUT", "5s".to_string()),
    ];
    let total = small_then_large_queued(&db, &broker, &settings, SWITCH_SMALL, 150).await;
    let (mut child, port) = ready_worker(&db, &broker, &settings).await;
    // The small ones raise the prefetch; once they are counted, the large ones flow. Then
    // Postgres stalls: every batch waits for the lock until it is released.
    wait_for(
        Duration::from_secs(60),
        "the small messages counted",
        || async { (db.total_events().await >= SWITCH_SMALL as i64).then_some(()) },
    )
    .await;
    let stall = lock_domains(&db).await;
    wait_for(
        Duration::from_secs(120),
        "the broker closes the blocked connection and the worker reconnects",
        || async {
            let reconnects = child_metric(port, "catchall_broker_reconnects_total").await?;
            (reconnects >= 1.0).then_some(())
        },
    )
    .await;
    stall
        .batch_execute("COMMIT")
        .await
        .expect("release domains");
    // Everything counted, nothing left in the queue or in the worker's hands.
    wait_for(Duration::from_secs(180), "every event counted", || async {
        let held = child_metric(port, "catchall_unacked_bytes").await?;
        (db.total_events().await == total && broker.depth(&broker.queue).await == 0 && held == 0.0)
            .then_some(())
    })
    .await;
    let peak = peak_rss_bytes(child.id().expect("pid"));
    // A clean stop acks what is in flight; a redelivery still under way would count twice or
    // return to the queue.
    let (status, _) = sigterm(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert_eq!(db.total_events().await, total, "counted once each");
    assert_eq!(broker.depth(&broker.queue).await, 0, "everything acked");
    assert!(peak < SWITCH_BUDGET + (64 << 20), "peak RSS {peak} bytes");
}

/// Postgres stalled from the start, small messages in front of large ones: nothing commits,
/// so the prefetch is not raised and the worker holds no more than its first prefetch. Raised
/// after the first window of small ones, the prefetch brought the large ones until the read gate
/// was full; the broker's writes then blocked and it closed the connection 30 s later, and did
/// again on each new connection for as long as the stall lasted (each close a delivery
/// against `DELIVERY_LIMIT`, so a long stall dead-lettered valid messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_from_the_start_keeps_the_first_prefetch_and_the_connection() {
    const HELD_FOR: Duration = Duration::from_secs(40);
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let settings = [
        ("PREFETCH_BYTES", SWITCH_BUDGET.to_string()),
        ("DB_TIMEOUT", "5s".to_string()),
    ];
    let total = small_then_large_queued(&db, &broker, &settings, 100, 40).await;
    let stall = lock_domains(&db).await;
    let (mut child, port) = spawn_on_a_port(worker_command(&db, &broker, &settings)).await;
    wait_for(
        Duration::from_secs(30),
        "the worker holding its first prefetch",
        || async {
            let held = child_metric(port, "catchall_unacked_bytes").await?;
            (held > 0.0).then_some(())
        },
    )
    .await;
    // Longer than RabbitMQ's send timeout (30 s): a blocked connection would be closed in it.
    let name = format!("catchall-worker {}", broker.queue);
    // The first worker's (killed) may still be listed for a moment.
    let connection = wait_for(
        Duration::from_secs(15),
        "one consumer connection",
        || async {
            let listed = crate::faults::broker_connections(&name).await;
            (listed.len() == 1).then_some(listed)
        },
    )
    .await;
    let started = Instant::now();
    while started.elapsed() < HELD_FOR {
        let prefetch = child_metric(port, "catchall_prefetch_messages").await;
        let held = child_metric(port, "catchall_unacked_bytes").await;
        assert_eq!(
            crate::faults::broker_connections(&name).await,
            connection,
            "the broker closed the worker's connection after {:?} (prefetch {prefetch:?}, {held:?} bytes held)",
            started.elapsed()
        );
        assert!(
            held.is_some_and(|held| held < 1e6),
            "only the first prefetch is held: {held:?} bytes (prefetch {prefetch:?})"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stall
        .batch_execute("COMMIT")
        .await
        .expect("release domains");
    wait_for(Duration::from_secs(120), "every event counted", || async {
        (db.total_events().await == total && broker.depth(&broker.queue).await == 0).then_some(())
    })
    .await;
    let (status, _) = sigterm(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert_eq!(db.total_events().await, total, "counted once each");
}

/// Small messages whose headers are large once parsed: a header frame of 128 KiB of voids
/// (`V`, one byte each) parses to 5 MiB of values. Only bodies counted against
/// PREFETCH_BYTES, so while the worker's batches waited for Postgres its connection read and
/// parsed its whole first prefetch of them (64 × 5 MiB); a publisher who sets such headers on
/// every message takes the worker that far past its budget after each raise of the prefetch,
/// 10,000 × 5 MiB at the default `PREFETCH`. The read gate now counts what a header holds once
/// parsed and leaves frames unparsed while it is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_count_against_prefetch_bytes_as_they_are_once_parsed() {
    // The first prefetch under the default budget (64 MiB / 1 MiB).
    const MESSAGES: usize = 64;
    const BOUND: u64 = (64 << 20) + (64 << 20);
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    // Batches of one, one at a time: with the table locked, the worker takes two messages and
    // leaves the rest to its connection.
    let settings = [
        ("BATCH_SIZE", "1".to_string()),
        ("IN_FLIGHT", "1".to_string()),
    ];
    let (mut first, _) = ready_worker(&db, &broker, &settings).await;
    first.kill().await.expect("stop the first worker");
    publish_heavy_headers(&broker, MESSAGES).await;
    let stall = lock_domains(&db).await;
    let (mut child, port) = spawn_on_a_port(worker_command(&db, &broker, &settings)).await;
    let pid = child.id().expect("pid");
    wait_for(
        Duration::from_secs(60),
        "the broker sends the whole prefetch",
        || async { (broker.depth(&broker.queue).await == 0).then_some(()) },
    )
    .await;
    // Either the connection reads and parses all of it, or it stops with bytes left unread in
    // its socket. Unread bytes are also seen for a moment while a connection reads on, so they
    // must stay for 2 s (parsing all 64 takes well under that).
    let mut unread_since: Option<Instant> = None;
    wait_for(
        Duration::from_secs(60),
        "the connection holds bytes unread for 2 s, or its memory passes the bound",
        || {
            let unread = unread_from_port(pid, 5672) > 0;
            let since = if unread {
                *unread_since.get_or_insert_with(Instant::now)
            } else {
                unread_since = None;
                Instant::now()
            };
            async move {
                (peak_rss_bytes(pid) > BOUND || since.elapsed() >= Duration::from_secs(2))
                    .then_some(())
            }
        },
    )
    .await;
    let stalled_peak = peak_rss_bytes(pid);
    eprintln!("peak RSS while stalled {} MiB", stalled_peak >> 20);
    assert!(
        stalled_peak < BOUND,
        "peak RSS {stalled_peak} bytes while Postgres stalled"
    );
    stall
        .batch_execute("COMMIT")
        .await
        .expect("release domains");
    // Every message counted and acked, and the gate's count back to 0: what it was given for
    // each header was given back.
    wait_for(
        Duration::from_secs(120),
        "every message counted",
        || async {
            let held = child_metric(port, "catchall_unacked_bytes").await?;
            let gate = child_metric(port, "catchall_read_gate_bytes").await?;
            (db.total_events().await == MESSAGES as i64
                && broker.depth(&broker.queue).await == 0
                && held == 0.0
                && gate == 0.0)
                .then_some(())
        },
    )
    .await;
    let peak = peak_rss_bytes(pid);
    assert!(peak < BOUND, "peak RSS {peak} bytes");
    assert_eq!(
        child_metric(port, "catchall_broker_reconnects_total").await,
        Some(0.0),
        "the connection was kept"
    );
    // A window of small bodies with such headers raises nothing: a raise reads past the gate
    // whatever the broker sent before its replies (it was raised to PREFETCH).
    assert_eq!(
        child_metric(port, "catchall_prefetch_messages").await,
        Some(MESSAGES as f64),
        "the first prefetch kept"
    );
    assert_eq!(
        broker.depth(&broker.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    let _ = child.kill().await;
}

/// A delivery whose header alone weighs more than `PREFETCH_BYTES` once parsed still arrives,
/// as a body larger than the budget does: the gate counts a delivery once its body is read.
/// Counted when its header was parsed, the first one closed the gate before its body and the
/// consumer stalled for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_heavier_than_prefetch_bytes_still_arrives() {
    const MESSAGES: usize = 5;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let (mut child, port) = ready_worker(
        &db,
        &broker,
        &[("PREFETCH_BYTES", (1u64 << 20).to_string())],
    )
    .await;
    publish_heavy_headers(&broker, MESSAGES).await;
    wait_for(Duration::from_secs(60), "every event counted", || async {
        let gate = child_metric(port, "catchall_read_gate_bytes").await?;
        (db.total_events().await == MESSAGES as i64 && gate == 0.0).then_some(())
    })
    .await;
    let _ = child.kill().await;
}

/// Publishes `messages` single events (`h<i>.example`, ids `heavy-<i>`), each with a header of
/// 130,000 voids: 128 KiB on the wire, 5 MiB once parsed.
async fn publish_heavy_headers(broker: &TestBroker, messages: usize) {
    let mut voids = vec![b'A'];
    voids.extend(130_000u32.to_be_bytes());
    voids.resize(voids.len() + 130_000, b'V');
    let mut raw = RawPublisher::connect().await;
    for i in 0..messages {
        let properties = Properties {
            headers: Some(Table::default().field(b"v", &voids)),
            message_id: Some(format!("heavy-{i}").into_bytes()),
            ..Properties::default()
        };
        let body = format!(r#"{{"domain":"h{i}.example","type":"delivered"}}"#);
        raw.publish(&broker.exchange, b"delivered", &properties, body.as_bytes())
            .await;
    }
    raw.close().await;
}

/// Bytes the kernel holds unread in `pid`'s TCP sockets to `remote_port`.
fn unread_from_port(pid: u32, remote_port: u16) -> u64 {
    socket_queue_bytes(pid, Queue::Unread, |_, remote| remote == remote_port)
}

/// A client whose transaction holds `domains` locked (ACCESS EXCLUSIVE) until its `COMMIT`:
/// every batch waits.
async fn lock_domains(db: &TestDb) -> tokio_postgres::Client {
    let client = db.client().await;
    client
        .batch_execute("BEGIN; LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock domains");
    client
}

/// The budget of the small-then-large queue below.
const SWITCH_BUDGET: u64 = 16 << 20;
const SWITCH_SMALL: usize = 20_000;

/// Queues `small` single-event messages, then `large` of ~900 KiB (4,000 events each), all
/// with ids, behind a first worker with `settings` that declared the queue and went; so the
/// small ones are a backlog in front of the large ones. Returns the events queued.
async fn small_then_large_queued(
    db: &TestDb,
    broker: &TestBroker,
    settings: &[(&str, String)],
    small: usize,
    large: usize,
) -> i64 {
    const PER_LARGE: usize = 4_000;
    let (mut first, _) = ready_worker(db, broker, settings).await;
    first.kill().await.expect("stop the first worker");
    let singles: Vec<(String, Vec<u8>)> = (0..small)
        .map(|i| {
            let body = format!(r#"{{"domain":"s{}.example","type":"delivered"}}"#, i % 1000);
            (format!("small-{i}"), body.into_bytes())
        })
        .collect();
    publish_all(broker, &singles).await;
    publish_all(broker, &large_messages(large, PER_LARGE)).await;
    (small + large * PER_LARGE) as i64
}

/// `count` messages of `per` events each, about 900 KiB at 4,000 events: long names (about 225
/// bytes a line) of a hundred domains, so the bodies are large and the batches cheap.
fn large_messages(count: usize, per: usize) -> Vec<(String, Vec<u8>)> {
    let stem = ["a", "b", "c"].map(|c| c.repeat(60)).join(".");
    (0..count)
        .map(|i| {
            let events: Vec<serde_json::Value> = (0..per)
                .map(|j| {
                    serde_json::json!({"domain": format!("{stem}.d{}.example", j % 100),
                        "type": "delivered"})
                })
                .collect();
            let body = serde_json::to_vec(&events).unwrap();
            assert!(body.len() < 1 << 20, "{} bytes", body.len());
            (format!("large-{i}"), body)
        })
        .collect()
}

/// A body larger than `PREFETCH_BYTES` still arrives, one at a time: the read gate waits for a
/// body under way to be read whole. It closed as soon as the body's header was counted, and a
/// body cut in two by the socket's reads never completed: the consumer stalled for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_prefetch_bytes_still_arrives() {
    const BUDGET: u64 = 256 << 10;
    const MESSAGES: usize = 20;
    const PER: usize = 4_000;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let (mut child, _) =
        ready_worker(&db, &broker, &[("PREFETCH_BYTES", BUDGET.to_string())]).await;
    publish_all(&broker, &large_messages(MESSAGES, PER)).await;
    let total = (MESSAGES * PER) as i64;
    wait_for(Duration::from_secs(60), "every event counted", || async {
        (db.total_events().await == total).then_some(())
    })
    .await;
    let _ = child.kill().await;
}

/// Postgres reached through a connection that goes silent without a reset (a host that
/// vanished, a failover that moved the address): `/readyz` says so within its 2 s (once the last
/// ping's outcome, fresh for 1 s, is past), drops that
/// connection, and is ready again on the next probe over a new one. It used to keep the dead
/// connection and answer 503 until TCP gave up on it, about 15 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_recovers_from_a_postgres_connection_that_went_silent() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let pg = crate::proxy::Proxy::start("127.0.0.1:5432").await;
    let mut config = TestWorker::config(&db, &broker);
    config.database_url = format!("postgres://postgres@{}/{}", pg.addr, db.name);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let readyz = || async {
        let response = reqwest::get(worker.url("/readyz"))
            .await
            .expect("GET /readyz");
        (response.status(), response.text().await.expect("body"))
    };

    pg.freeze_open_connections();
    // A ping's outcome answers for 1 s: the one before the freeze may still be fresh.
    let body = wait_for(Duration::from_secs(10), "/readyz to say 503", || async {
        let (status, body) = readyz().await;
        (status == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(body)
    })
    .await;
    assert!(body.contains("no answer within 2 s"), "{body}");
    wait_for(Duration::from_secs(10), "/readyz ready again", || async {
        (readyz().await.0 == reqwest::StatusCode::OK).then_some(())
    })
    .await;
    worker.stop().await;
}

/// A batch that first meets a transient failure (not ready, `/readyz` says Postgres) and then
/// a refusal of its data (dead-lettered) leaves the worker ready: Postgres answered. It stayed
/// 503 on an idle queue until some later batch committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_a_transient_failure_leaves_the_worker_ready() {
    let (db, broker, worker) = started().await;
    db.client()
        .await
        .batch_execute(
            "CREATE SEQUENCE flaky_calls; \
             CREATE FUNCTION flaky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF NEW.domain = 'flaky.example' THEN \
                 IF nextval('flaky_calls') = 1 THEN \
                   RAISE EXCEPTION 'test outage' USING ERRCODE = 'serialization_failure'; \
                 END IF; \
                 RAISE EXCEPTION 'refused by the test trigger' USING ERRCODE = 'check_violation'; \
               END IF; RETURN NEW; END $$; \
             CREATE TRIGGER flaky BEFORE INSERT OR UPDATE ON domains \
               FOR EACH ROW EXECUTE FUNCTION flaky();",
        )
        .await
        .expect("install the trigger");
    publish_all(
        &broker,
        &[(
            "flaky-1".to_string(),
            br#"{"domain":"flaky.example","type":"delivered"}"#.to_vec(),
        )],
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "the message dead-lettered",
        || async { (broker.depth(&broker.dead_queue()).await == 1).then_some(()) },
    )
    .await;
    wait_for(Duration::from_secs(5), "/readyz ready", || async {
        let response = reqwest::get(worker.url("/readyz")).await.ok()?;
        (response.status() == reqwest::StatusCode::OK).then_some(())
    })
    .await;
    worker.stop().await;
}
