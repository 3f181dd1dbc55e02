//! The commit connections: the timeouts hold after a migration and with an `options=` in
//! DATABASE_URL (a trigger records the settings a batch ran under), and a refused upsert, sent
//! with its COMMIT, leaves the connection idle and the claim rolled back.

use crate::helpers::*;
use catchall::event::parse_message;
use catchall::store::{Message, Store};
use std::time::Duration;

/// Applies one message through `store` and returns the (statement_timeout,
/// idle_in_transaction_session_timeout) its transaction ran under.
async fn settings_of_a_batch(db: &TestDb, store: &Store) -> (String, String) {
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE seen (statement text, idle text); \
             CREATE FUNCTION record() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               INSERT INTO seen VALUES (current_setting('statement_timeout'), \
                 current_setting('idle_in_transaction_session_timeout')); RETURN NEW; END $$; \
             CREATE TRIGGER record BEFORE INSERT ON domains \
               FOR EACH ROW EXECUTE FUNCTION record();",
        )
        .await
        .expect("install the recording trigger");
    store
        .apply(&[one_delivery("a.example")])
        .await
        .expect("apply");
    let row = client
        .query_one("SELECT statement, idle FROM seen", &[])
        .await
        .expect("one batch recorded");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_leaves_the_statement_timeout_on_the_pooled_connection() {
    let db = TestDb::create().await;
    // One connection: the batch runs on the one the migration used, if it is still pooled.
    let store = Store::connect(&db.url, 1).await.expect("connect");
    store.migrate().await.expect("migrate");
    let (statement, idle) = settings_of_a_batch(&db, &store).await;
    assert_eq!((statement.as_str(), idle.as_str()), ("1min", "1min"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_in_database_url_keep_both_timeouts() {
    let db = TestDb::create().await;
    let url = format!("{}?options=-c%20search_path%3Dpublic", db.url);
    let store = Store::connect(&url, 1).await.expect("connect");
    store.migrate().await.expect("migrate");
    let (statement, idle) = settings_of_a_batch(&db, &store).await;
    assert_eq!((statement.as_str(), idle.as_str()), ("1min", "1min"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_in_database_url_win_over_ours() {
    let db = TestDb::create().await;
    let url = format!("{}?options=-c%20statement_timeout%3D5s", db.url);
    let store = Store::connect(&url, 1).await.expect("connect");
    store.migrate().await.expect("migrate");
    let (statement, idle) = settings_of_a_batch(&db, &store).await;
    assert_eq!((statement.as_str(), idle.as_str()), ("5s", "1min"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_purge_one_at_a_time() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 1).await.expect("connect");
    store.migrate().await.expect("migrate");
    let mut other = db.client().await;
    other
        .batch_execute(
            "INSERT INTO applied_messages (message_id, applied_at) \
             SELECT int8send(i), now() - interval '2 days' FROM generate_series(1, 25000) i",
        )
        .await
        .expect("old ids");
    let retention = std::time::Duration::from_secs(3600);
    // Another replica is purging (holds the purge lock): this one leaves it alone.
    let purging = other.transaction().await.expect("begin");
    purging
        .query_one(
            "SELECT pg_advisory_xact_lock($1)",
            &[&0x0063_6174_6368_7067i64],
        )
        .await
        .expect("take the purge lock");
    assert_eq!(store.purge_applied(retention).await.expect("purge"), 0);
    purging.rollback().await.expect("release");
    assert_eq!(store.purge_applied(retention).await.expect("purge"), 25_000);
}

/// Every replica runs the upkeep on its own timer: run at the same moment, none fails, and
/// the partitions are made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_running_the_partition_upkeep_at_once_do_not_fail() {
    let db = TestDb::create().await;
    let first = Store::connect(&db.url, 2).await.expect("connect");
    first.migrate().await.expect("migrate");
    db.client()
        .await
        .batch_execute(
            "SELECT applied_messages_partition((now() AT TIME ZONE 'UTC')::date - d) \
               FROM generate_series(10, 14) d; \
             DO $$ BEGIN EXECUTE format('DROP TABLE %I, %I', \
               'applied_messages_p' || to_char((now() AT TIME ZONE 'UTC')::date + 1, 'YYYYMMDD'), \
               'applied_messages_p' || to_char((now() AT TIME ZONE 'UTC')::date + 2, 'YYYYMMDD')); \
             END $$;",
        )
        .await
        .expect("five old partitions, none ahead");
    // The work of the rounds: five partitions to drop, two (of 3 days, for 7 days of retention)
    // to chain after today.
    let before = first.applied_partitions().await.expect("partitions");
    assert_eq!(before.len(), 7, "{before:?}");
    let mut stores = vec![first];
    for _ in 0..3 {
        stores.push(Store::connect(&db.url, 2).await.expect("connect"));
    }
    let retention = std::time::Duration::from_secs(7 * 24 * 3600);
    for _ in 0..5 {
        let rounds = stores.iter().map(|store| store.dedup_upkeep(retention));
        let results = futures_util::future::join_all(rounds).await;
        for result in results {
            result.expect("an upkeep round running beside others succeeds");
        }
    }
    let partitions = stores[0].applied_partitions().await.expect("partitions");
    assert_eq!(
        partitions.len(),
        4,
        "the default partition, today and two chained partitions of 3 days: {partitions:?}"
    );
}

/// A batch's upsert and its COMMIT go out together (`upsert_and_commit` in src/store.rs). When
/// Postgres refuses the upsert, that COMMIT must end the transaction, claim included, and the
/// pooled connection must come back idle: here its one connection applies the next batch, the
/// refused batch's id is not held (it can be applied once the refusal is lifted), and no
/// session of the store is left inside a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upsert_ends_its_transaction_and_the_connection_applies_the_next_batch() {
    let db = TestDb::create().await;
    let store = db.store(1).await;
    crate::refusals::refuse_one_domain(&db).await;
    let message = |id: &str, domain: &str| Message {
        id: Some(id.as_bytes().to_vec()),
        events: parse_message(format!(r#"{{"domain":"{domain}","type":"delivered"}}"#).as_bytes())
            .expect("valid"),
    };

    let error = store
        .apply(&[message("refused-1", "refused.example")])
        .await
        .expect_err("the trigger refuses refused.example");
    assert!(error.is_permanent(), "refused for its content: {error:?}");
    let applied = store
        .apply(&[message("next-1", "next.example")])
        .await
        .expect("the same connection applies the next batch");
    assert_eq!(applied.messages, 1);

    let client = db.client().await;
    let held: Vec<Vec<u8>> = client
        .query("SELECT message_id FROM applied_messages ORDER BY 1", &[])
        .await
        .expect("read the claimed ids")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        held,
        vec![b"next-1".to_vec()],
        "the refused batch's claim rolled back"
    );
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .expect("read the sessions")
        .get(0);
    assert_eq!(open, 0, "no session left inside a transaction");

    client
        .batch_execute("DROP TRIGGER refuse ON domains")
        .await
        .expect("lift the refusal");
    let applied = store
        .apply(&[message("refused-1", "refused.example")])
        .await
        .expect("applied once the refusal is lifted");
    assert_eq!((applied.messages, applied.duplicates), (1, 0));
    let counts = db.counts().await;
    assert_eq!(counts.get("refused.example"), Some(&(1, 0)));
    assert_eq!(counts.get("next.example"), Some(&(1, 0)));
}

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// A migration whose lock request waits behind a long transaction (here a read, as an export
/// makes) gives up after `MIGRATION_LOCK_TIMEOUT` and tries again: the running workers' writes
/// to the table, queued behind that request, go through in the meantime (they used to wait for
/// as long as the long transaction lasted), and the migration is applied once the transaction
/// ends. The report names every migration applied, those of the attempt that timed out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_waiting_for_a_lock_does_not_hold_up_the_writes_behind_it() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    embedded::migrations::runner()
        .set_target(refinery::Target::Version(2))
        .run_async(&mut client)
        .await
        .expect("V1 and V2");
    // A transaction that read domains and stays open: V3's CREATE INDEX goes through, V4's
    // ALTER TABLE waits for it.
    let long = db.client().await;
    long.batch_execute("BEGIN; SELECT count(*) FROM domains")
        .await
        .expect("the long transaction");
    let store = Store::connect(&db.url, 1).await.expect("connect");
    let migration = tokio::spawn(async move { store.migrate().await });
    db.await_lock_waits(
        1,
        "%ALTER TABLE domains ADD COLUMN other_bounced%",
        "the migration to wait for the lock",
    )
    .await;
    // A running worker's write, queued behind the migration's request.
    let writer = db.client().await;
    let wrote = tokio::time::timeout(
        Duration::from_secs(30),
        writer.execute(
            "INSERT INTO domains (domain, delivered, bounced) VALUES ('other.example', 1, 0)",
            &[],
        ),
    )
    .await;
    assert!(
        matches!(wrote, Ok(Ok(1))),
        "a write queued behind the migration's lock request: {wrote:?}"
    );
    long.batch_execute("COMMIT").await.expect("commit");
    let report = tokio::time::timeout(Duration::from_secs(90), migration)
        .await
        .expect("the migration to finish once the lock is free")
        .expect("the migration task")
        .expect("the migration");
    let applied: Vec<i32> = report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect();
    assert_eq!(applied, (3..=12).collect::<Vec<i32>>());
    let index: bool = client
        .query_one(
            "SELECT to_regclass('domains_never_bounced') IS NOT NULL",
            &[],
        )
        .await
        .expect("the index")
        .get(0);
    assert!(index, "V3's index exists");
    assert_eq!(db.total_events().await, 1);
}

/// A migration that has landed is never edited: refinery checks every applied migration's
/// checksum (its whole text, comments included) at start, so a changed file stops every
/// replica of the new build on databases the old one migrated (`DivergentVersion`), and the
/// other way round. A change goes in a new migration, which adds its checksum to `LANDED`. (V1, V5–V8, V10 and V11 were edited
/// before this check; these are their texts since 2026-12-05.)
#[test]
fn landed_migrations_are_never_edited() {
    const LANDED: &[(i32, u64)] = &[
        (1, 4684035827027312900),
        (2, 15743629583025969016),
        (3, 16532600618698181750),
        (4, 12286987729895757125),
        (5, 10306922658139906000),
        (6, 13171747912216279353),
        (7, 7458090205967017700),
        (8, 7019057250184149859),
        (9, 5212072717629346053),
        (10, 14737201305418054684),
        (11, 7913009070405035228),
        (12, 3292058764619838238),
    ];
    let mut checksums: Vec<(i32, u64)> = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| (m.version(), m.checksum()))
        .collect();
    checksums.sort();
    for (version, checksum) in LANDED {
        assert_eq!(
            checksums.iter().find(|(v, _)| v == version),
            Some(&(*version, *checksum)),
            "V{version} was edited or removed; add a new migration instead"
        );
    }
    // A new migration adds its line to LANDED.
    assert_eq!(checksums, LANDED, "the migrations and their checksums");
}

/// A replica that starts while another one migrates waits for that migration, however long it
/// takes. Its wait for the migration lock ran under the session's statement timeout (60 s), so
/// a replica started beside a migration longer than that failed to start, and restarted in a
/// loop. Here the statement timeout is 1 s and the other replica holds the lock for 3 s.
#[tokio::test]
async fn a_replica_waits_for_another_replicas_migration_past_the_statement_timeout() {
    let db = TestDb::create().await;
    let other = db.client().await;
    other
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&catchall::store::MIGRATION_LOCK],
        )
        .await
        .expect("the other replica's migration lock");
    let url = format!("{}?options=-c%20statement_timeout%3D1s", db.url);
    let store = Store::connect(&url, 1).await.expect("connect");
    let migration = tokio::spawn(async move { store.migrate().await });
    db.await_lock_waits(
        1,
        "%pg_advisory_lock%",
        "the replica to wait for the migration lock",
    )
    .await;
    // The other replica's migration goes on for three statement timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if migration.is_finished() {
        panic!("the waiting replica stopped waiting: {:?}", migration.await);
    }
    other
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&catchall::store::MIGRATION_LOCK],
        )
        .await
        .expect("unlock");
    let report = tokio::time::timeout(Duration::from_secs(60), migration)
        .await
        .expect("the migration to finish once the lock is free")
        .expect("the migration task")
        .expect("the migration");
    assert_eq!(report.applied_migrations().len(), 12);
}

/// A replica of the previous release starts against a database that a newer release already
/// migrated (a rolling upgrade, or a rollback): it runs, rather than refusing to start because
/// the schema history holds a version it does not know (refinery's `MissingVersion`), and it
/// counts.
#[tokio::test]
async fn a_database_migrated_by_a_newer_release_still_starts_this_one() {
    let db = TestDb::create().await;
    let store = db.store(2).await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
             SELECT 9999, 'from_a_newer_release', applied_on, checksum \
             FROM refinery_schema_history WHERE version = 1",
        )
        .await
        .expect("record a newer migration");
    store
        .migrate()
        .await
        .expect("a newer schema does not stop this release");
    store
        .apply(&[one_delivery("a.example")])
        .await
        .expect("apply");
    assert_eq!(db.total_events().await, 1);
}

/// A multi-host `DATABASE_URL` whose first host drops packets (here: a listener whose accept
/// queue is full, so the kernel drops the SYNs) reaches the second host. The pool gave up after
/// 5 s, the first host's whole connect timeout, and never tried the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_moves_past_a_host_that_drops_packets() {
    let db = TestDb::create().await;
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let silent = socket.listen(1).expect("listen");
    let silent_addr = silent.local_addr().expect("its address");
    // Fill the accept queue (never accepted): later SYNs are dropped.
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(silent_addr),
        )
        .await
        {
            held.push(stream);
        }
    }
    assert!(
        held.len() < 4,
        "the accept queue never filled: {} connects answered",
        held.len()
    );
    let url = format!(
        "postgres://postgres@{silent_addr},127.0.0.1:5432/{}",
        db.name
    );
    connects_past_the_first_host(&url).await;
    drop(held);
}

/// A multi-host `DATABASE_URL` whose first host accepts the connection and then never answers
/// (a proxy in front of a dead server, a half-failed-over address) reaches the second host, as
/// with libpq, whose `connect_timeout` bounds each host's whole attempt. tokio-postgres bounded
/// only the TCP connect, so the attempt waited on the first host until the pool gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_moves_past_a_host_that_accepts_and_never_answers() {
    let db = TestDb::create().await;
    let (mute_addr, holder, mut accepted) = mute_host().await;
    let url = format!(
        "postgres://postgres@{mute_addr},127.0.0.1:5432/{}?connect_timeout=2",
        db.name
    );
    connects_past_the_first_host(&url).await;
    assert!(
        accepted.try_recv().is_ok(),
        "the first host was tried (and accepted the connection)"
    );
    holder.abort();
}

/// Probes and look-ups wait for a connection for less time than opening one can take with a
/// multi-host URL whose first host does not answer (`/readyz` 2 s, here 1 s, against a
/// `connect_timeout` of 3 s on the first host). Each such wait cancelled the connection being
/// opened, so none ever reached the second host and `/readyz` stayed 503 after a failover. Now
/// the connection is opened on, lands in the pool, and a later probe answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_shorter_than_a_connect_still_reach_the_second_host() {
    let db = TestDb::create().await;
    let (mute_addr, holder, _) = mute_host().await;
    let url = format!(
        "postgres://postgres@{mute_addr},127.0.0.1:5432/{}?connect_timeout=3",
        db.name
    );
    let store = Store::open(&url, 1).expect("the URL is valid");
    let first = store.ping_within(Duration::from_secs(1)).await;
    assert!(
        first.is_err(),
        "the first probe cannot get past the first host in 1 s: {first:?}"
    );
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if store.ping_within(Duration::from_secs(1)).await.is_ok() {
                return;
            }
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "a 1 s probe answers once the connection opened past the first host"
    );
    holder.abort();
}

/// Over the Unix-domain socket `sslmode=require` connects, as with libpq, which ignores
/// `sslmode` there (a Cloud SQL proxy's socket, say). tokio-postgres asked the server for TLS
/// on the socket, was refused, and failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_over_the_unix_socket_connects() {
    let db = TestDb::create().await;
    let url = format!(
        "postgres://postgres@/{}?host=/var/run/postgresql&sslmode=require",
        db.name
    );
    let store = Store::connect(&url, 1)
        .await
        .expect("connect over the socket");
    assert_answers(&store).await;
}

/// A host that accepts connections and never answers on them: its address, the task holding
/// the connections (abort it to close them), and one message per accepted connection.
async fn mute_host() -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = mute.local_addr().expect("its address");
    let (accepted_tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = mute.accept().await {
            held.push(stream); // kept open, never read from or written to
            let _ = accepted_tx.send(());
        }
    });
    (addr, holder, accepted)
}

/// `Store::connect` on a multi-host `url` ends within 30 s, and the store answers.
async fn connects_past_the_first_host(url: &str) {
    let store = tokio::time::timeout(Duration::from_secs(30), Store::connect(url, 1))
        .await
        .expect("connect ends")
        .expect("the second host answers");
    assert_answers(&store).await;
}

/// `store` runs a query and gets its answer.
async fn assert_answers(store: &Store) {
    let one: f64 = store
        .query_one_within("SELECT 1::float8", Duration::from_secs(5))
        .await
        .expect("a query")
        .get(0);
    assert_eq!(one, 1.0);
}
