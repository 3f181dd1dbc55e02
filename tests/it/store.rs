//! The session settings of the commit connections: the timeouts hold after a migration and
//! with an `options=` in DATABASE_URL. A trigger records the settings a batch ran under.

use crate::helpers::*;
use catchall::event::parse_message;
use catchall::store::{Message, Store};

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
    let events = parse_message(br#"{"domain":"a.example","type":"delivered"}"#).expect("valid");
    store
        .apply(&[Message { id: None, events }])
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
