//! Deduplication by `message_id`, and its bounded retention.

use crate::helpers::*;
use std::time::Duration;

async fn publish_stream(broker: &TestBroker, with_ids: bool) -> Counts {
    let (_connection, channel) = broker.channel().await;
    let mut expected = Counts::new();
    for i in 0..500 {
        let domain = format!("d{}.example", i % 37);
        let kind = if i % 11 == 0 { "bounced" } else { "delivered" };
        let body =
            serde_json::to_vec(&serde_json::json!({"domain": domain, "type": kind})).unwrap();
        let id = format!("message-{i}");
        publish_raw(
            &channel,
            &broker.exchange,
            kind,
            &body,
            with_ids.then_some(id.as_str()),
        )
        .await;
        let entry = expected.entry(domain).or_default();
        if kind == "bounced" {
            entry.1 += 1
        } else {
            entry.0 += 1
        }
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_published_twice_with_the_same_ids_is_counted_once() {
    let (db, broker, worker) = started().await;
    let expected = publish_stream(&broker, true).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    publish_stream(&broker, true).await;
    wait_for(
        Duration::from_secs(30),
        "the second copy to be skipped",
        || async {
            (worker
                .metric("catchall_messages_total{outcome=\"duplicate\"}")
                .await
                == 500.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(db.counts().await, expected, "counted once");
    assert_eq!(broker.depth(&broker.queue).await, 0, "duplicates are acked");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_published_twice_without_ids_is_counted_twice() {
    let (db, broker, worker) = started().await;
    let once = publish_stream(&broker, false).await;
    publish_stream(&broker, false).await;
    let twice: Counts = once
        .iter()
        .map(|(d, (a, b))| (d.clone(), (2 * a, 2 * b)))
        .collect();
    assert_counts_eventually(&db, &twice, Duration::from_secs(30)).await;
    assert_eq!(
        worker
            .metric("catchall_messages_total{outcome=\"duplicate\"}")
            .await,
        0.0
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_ids_older_than_the_retention_are_purged() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    // Upkeep every 10 s (a quarter of the retention); the test ages half the ids by days by
    // hand, so no timing decides what is young or old (a partition goes when its whole day
    // is older than the retention).
    config.dedup_retention = Duration::from_secs(40);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let expected = publish_stream(&broker, true).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    let client = db.client().await;
    // Half the ids are moved into the partition of three days ago (made for the test), which
    // the worker's upkeep then drops whole.
    client
        .execute(
            "SELECT applied_messages_partition((now() AT TIME ZONE 'UTC')::date - 3)",
            &[],
        )
        .await
        .unwrap();
    let aged = client
        .execute(
            "UPDATE applied_messages SET applied_at = now() - interval '3 days' \
             WHERE message_id IN (SELECT message_id FROM applied_messages ORDER BY message_id LIMIT 250)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(aged, 250);
    let left = wait_for(
        Duration::from_secs(30),
        "ids older than the retention to be purged",
        || async {
            let left: i64 = client
                .query_one("SELECT count(*) FROM applied_messages", &[])
                .await
                .unwrap()
                .get(0);
            (left < 500).then_some(left)
        },
    )
    .await;
    assert_eq!(left, 250, "the aged ids are purged, the young ones kept");
    let partitions: Vec<String> = client
        .query(
            "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relname LIKE 'applied\\_messages\\_p%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        partitions.len(),
        3,
        "today and the next two days: {partitions:?}"
    );
    // Counted once the upkeep round ends (its last step runs after the drop committed).
    wait_for(
        Duration::from_secs(30),
        "the dropped ids to be counted",
        || async {
            let purged = worker.metric("catchall_dedup_purged_total").await;
            (purged >= 250.0).then_some(purged)
        },
    )
    .await;
    assert_eq!(worker.metric("catchall_dedup_purged_total").await, 250.0);
    assert_eq!(
        db.counts().await,
        expected,
        "purging ids leaves the counters alone"
    );
    worker.stop().await;
}

/// An expired partition that a long transaction keeps from being dropped (it read the table:
/// an export, an operator's session left open) does not end the upkeep round: the drop gives up
/// after a few short lock waits (claims queue behind each wait; it waited 5 s, then failed the
/// round), and the round still purges the default partition; once the reader ends, the next
/// round drops the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_partition_held_by_a_long_transaction_does_not_stop_the_round() {
    let db = TestDb::create().await;
    let store = db.store(2).await;
    let client = db.client().await;
    client
        .batch_execute(
            "SELECT applied_messages_partition((now() AT TIME ZONE 'UTC')::date - 30); \
             INSERT INTO applied_messages (message_id, applied_at) \
               VALUES ('\\x6f6c64'::bytea, now() - interval '30 days'), \
                      ('\\x616e6369656e74'::bytea, now() - interval '60 days')",
        )
        .await
        .expect("an expired partition, and an expired id in the default partition");
    let reader = db.client().await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM applied_messages")
        .await
        .expect("a transaction that read the table");

    let retention = Duration::from_secs(7 * 24 * 3600);
    let done = store
        .dedup_upkeep(retention)
        .await
        .expect("the round ends well though a partition could not be dropped");
    assert_eq!(
        (done.dropped, done.ids),
        (0, 1),
        "the default partition's expired id purged, the held partition left: {done:?}"
    );

    reader
        .batch_execute("COMMIT")
        .await
        .expect("end the reader");
    let done = store.dedup_upkeep(retention).await.expect("the next round");
    assert_eq!((done.dropped, done.ids), (1, 1), "{done:?}");
}

/// The name of the partition of the UTC day `ago` days before today.
async fn day(client: &tokio_postgres::Client, ago: i32) -> String {
    client
        .query_one(
            "SELECT 'applied_messages_p' || \
               to_char((now() AT TIME ZONE 'UTC')::date - $1::int4, 'YYYYMMDD')",
            &[&ago],
        )
        .await
        .expect("partition name")
        .get(0)
}

/// Daily partitions (migration V5): a partition whose whole day is older than the retention is
/// dropped with its ids; ids of younger days are kept and still deduplicate a batch applied
/// today (across the day boundary); an id whose partition was dropped counts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_partitions_are_dropped_whole_and_young_ids_deduplicate_across_days() {
    use catchall::event::parse_message;
    use catchall::store::{Message, Store};
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 2).await.expect("connect");
    store.migrate().await.expect("migrate");
    let client = db.client().await;
    client
        .batch_execute(
            "SELECT applied_messages_partition((now() AT TIME ZONE 'UTC')::date - d) \
               FROM unnest(ARRAY[8, 1]) d; \
             INSERT INTO applied_messages (message_id, applied_at) \
               SELECT convert_to('old-' || i, 'UTF8'), now() - interval '8 days' \
               FROM generate_series(1, 30) i; \
             INSERT INTO applied_messages (message_id, applied_at) \
               SELECT convert_to('young-' || i, 'UTF8'), now() - interval '1 day' \
               FROM generate_series(1, 20) i;",
        )
        .await
        .expect("ids of 8 days ago and of yesterday");
    let partitions = store.applied_partitions().await.expect("partitions");
    assert!(
        partitions.contains(&day(&client, 8).await) && partitions.contains(&day(&client, 1).await)
    );
    // Each id landed in its day's partition, none in the default one.
    let in_default: i64 = client
        .query_one("SELECT count(*) FROM applied_messages_default", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_default, 0);

    let upkeep = store
        .dedup_upkeep(Duration::from_secs(7 * 24 * 3600))
        .await
        .expect("upkeep");
    // 7 days of retention: partitions of 3 days, chained after the migration's three days.
    assert_eq!(
        (upkeep.created, upkeep.dropped, upkeep.ids),
        (1, 1, 30),
        "{upkeep:?}"
    );
    let partitions = store.applied_partitions().await.expect("partitions");
    assert!(
        !partitions.contains(&day(&client, 8).await),
        "{partitions:?}"
    );
    for ago in [1, 0, -1, -2, -3] {
        assert!(
            partitions.contains(&day(&client, ago).await),
            "{ago}: {partitions:?}"
        );
    }

    let message = |id: String| Message {
        id: Some(id.into_bytes()),
        events: parse_message(br#"{"domain":"a.example","type":"delivered"}"#).expect("valid"),
    };
    let mut batch: Vec<Message> = (1..=20).map(|i| message(format!("young-{i}"))).collect();
    batch.extend((1..=30).map(|i| message(format!("old-{i}"))));
    batch.push(message("new".into()));
    let applied = store.apply(&batch).await.expect("apply");
    assert_eq!(
        (applied.messages, applied.duplicates),
        (31, 20),
        "yesterday's ids are duplicates today; the dropped ones count again"
    );
    let again = store.apply(&[message("new".into())]).await.expect("apply");
    assert_eq!((again.messages, again.duplicates), (0, 1));
    assert_eq!(db.counts().await["a.example"], (31, 0));
}

/// No partition covers now() (the upkeep failed, or the workers were down, longer than a
/// partition and a day), so claims insert into the default partition, and one is under way
/// when the upkeep creates the partition of now(): the creation waits for it, moves its id and
/// attaches the partition, and the expired partition is dropped in the same round. Before V12
/// the move missed the uncommitted id, ATTACH failed on it (23514) every round, and the round
/// ended there, so expired partitions were never dropped either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_of_now_is_made_while_claims_insert_into_the_default_one() {
    let db = TestDb::create().await;
    let store = db.store(2).await;
    let client = db.client().await;
    client
        .batch_execute(
            "DO $$ DECLARE p regclass; BEGIN \
               FOR p IN SELECT inhrelid::regclass FROM pg_inherits \
                 WHERE inhparent = 'applied_messages'::regclass \
                   AND applied_messages_upper(inhrelid) > now() LOOP \
                 EXECUTE format('DROP TABLE %s', p); \
               END LOOP; END $$; \
             SELECT applied_messages_partition((now() AT TIME ZONE 'UTC')::date - 30)",
        )
        .await
        .expect("no partition from today on; one expired");
    let claim = db.client().await;
    claim
        .batch_execute(
            "BEGIN; INSERT INTO applied_messages (message_id) VALUES ('\\x6e6f77'::bytea)",
        )
        .await
        .expect("an uncommitted id, in the default partition");
    let upkeep =
        tokio::spawn(async move { store.dedup_upkeep(Duration::from_secs(7 * 24 * 3600)).await });
    db.await_lock_waits(1, "%", "the upkeep waiting for the claim")
        .await;
    claim
        .batch_execute("COMMIT")
        .await
        .expect("commit the claim");
    let done = upkeep
        .await
        .expect("the upkeep task")
        .expect("the upkeep round");
    assert_eq!(done.dropped, 1, "the expired partition dropped: {done:?}");
    let held_in: String = client
        .query_one(
            "SELECT tableoid::regclass::text FROM applied_messages \
             WHERE message_id = '\\x6e6f77'::bytea",
            &[],
        )
        .await
        .expect("the id")
        .get(0);
    assert_ne!(
        held_in, "applied_messages_default",
        "the id moved into the partition of now()"
    );
}

/// A claim looks its ids up only in the partitions its insert does not check itself (migration
/// V6), and every id already held is a duplicate wherever it is: in a past partition, in the
/// default one, earlier in the partition of now() (its unique index, through ON CONFLICT), a
/// few minutes or days ahead (a clock that stepped back). The bounds of the partition of now()
/// are read in UTC and ISO whatever the session's DateStyle and TimeZone: read back in
/// `SQL, MDY` from Manila, `PST` meant US Pacific, 16 hours off (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_meet_ids_held_in_any_partition_whatever_the_session_time_zone() {
    use catchall::event::parse_message;
    use catchall::store::{Message, Store};
    let db = TestDb::create().await;
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET DateStyle = 'SQL, MDY'; \
             ALTER DATABASE \"{}\" SET TimeZone = 'Asia/Manila'",
            db.name, db.name
        ))
        .await
        .expect("a session style that prints zone abbreviations");
    let store = Store::connect(&db.url, 2).await.expect("connect");
    store.migrate().await.expect("migrate");
    let client = db.client().await;
    // The migration made today and the two days after it; two days ago has no partition of
    // its own (its ids go to the default one), yesterday gets one, and so do 4 days ahead.
    client
        .batch_execute(
            "SELECT applied_messages_partition((now() AT TIME ZONE 'UTC')::date + d) \
               FROM unnest(ARRAY[-1, 4]) d; \
             INSERT INTO applied_messages (message_id, applied_at) VALUES \
               ('default', now() - interval '2 days'), \
               ('yesterday', now() - interval '1 day'), \
               ('earlier', now() - interval '1 minute'), \
               ('ahead', now() + interval '5 minutes'), \
               ('days-ahead', now() + interval '4 days');",
        )
        .await
        .expect("ids in five partitions");
    let held: i64 = client
        .query_one(
            "SELECT count(*) FROM applied_messages_default WHERE message_id = 'default'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        held, 1,
        "the id of two days ago is in the default partition"
    );
    // The bounds of the partition of now(), against the partition that holds a row stamped
    // now() (tableoid), compared in UTC seconds so that no session setting enters.
    let row = client
        .query_one(
            "WITH probe AS (INSERT INTO applied_messages (message_id) VALUES ('probe') \
                            RETURNING tableoid) \
             SELECT extract(epoch FROM c.lo)::float8, extract(epoch FROM c.hi)::float8, \
                    extract(epoch FROM applied_messages_upper(probe.tableoid))::float8, \
                    extract(epoch FROM applied_messages_lower(probe.tableoid))::float8, \
                    extract(epoch FROM ((now() AT TIME ZONE 'UTC')::date::timestamp \
                                        AT TIME ZONE 'UTC'))::float8 \
             FROM applied_messages_current() c, probe",
            &[],
        )
        .await
        .expect("current partition");
    let (lo, hi, upper, lower, midnight): (f64, f64, f64, f64, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        (lo, hi),
        (lower, upper),
        "the partition a row of now() goes to"
    );
    assert_eq!(lo, midnight, "today's partition starts at UTC midnight");
    assert_eq!(hi - lo, 86_400.0, "and is one day wide (the migration's)");
    client
        .batch_execute("DELETE FROM applied_messages WHERE message_id = 'probe'")
        .await
        .expect("remove the probe");

    let message = |id: &str| Message {
        id: Some(id.as_bytes().to_vec()),
        events: parse_message(br#"{"domain":"a.example","type":"delivered"}"#).expect("valid"),
    };
    let batch: Vec<Message> = [
        "default",
        "yesterday",
        "earlier",
        "ahead",
        "days-ahead",
        "new",
    ]
    .into_iter()
    .map(message)
    .collect();
    let applied = store.apply(&batch).await.expect("apply");
    assert_eq!(
        (applied.messages, applied.duplicates),
        (1, 5),
        "only `new` counts"
    );
    let again = store.apply(&[message("new")]).await.expect("apply");
    assert_eq!((again.messages, again.duplicates), (0, 1));
    assert_eq!(db.counts().await["a.example"], (1, 0));
}

/// A message with `id` of one delivered event for `domain`.
fn delivered(id: &str, domain: &str) -> catchall::store::Message {
    catchall::store::Message {
        id: Some(id.as_bytes().to_vec()),
        events: catchall::event::parse_message(
            format!(r#"{{"domain":"{domain}","type":"delivered"}}"#).as_bytes(),
        )
        .expect("valid"),
    }
}

/// Applies `batch` in a task that stops between its statements and COMMIT; returns once it is
/// there, with the task and what lets it commit (`notify_one`).
async fn held_before_commit(
    store: &catchall::store::Store,
    batch: Vec<catchall::store::Message>,
) -> (
    tokio::task::JoinHandle<Result<catchall::store::Applied, catchall::store::StoreError>>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    use futures_util::future::BoxFuture;
    use std::sync::Arc;
    use tokio::sync::Notify;

    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = tokio::spawn({
        let (store, entered, release) = (store.clone(), entered.clone(), release.clone());
        async move {
            let hold: BoxFuture<'static, ()> = Box::pin(async move {
                entered.notify_one();
                release.notified().await;
            });
            store
                .apply_once(None, &batch, Some(hold), None, &mut None)
                .await
        }
    });
    entered.notified().await;
    (task, release)
}

/// Two batches claim the same id at once (a redelivery overlapping its earlier attempt, or a
/// publisher's second copy on another replica): the second waits for the first's uncommitted
/// row, and when the first commits it fails with a claim conflict, which is not permanent (no
/// bisecting, no dead-lettering); applied again, it counts its other message and skips the
/// shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_meets_a_concurrent_claim_of_the_same_id_is_applied_again_and_counts_it_once()
{
    let db = TestDb::create().await;
    // No bucket locks (at any hour): the unique index alone meets the concurrent claim.
    let store = db.store(4).await.with_claim_window(Duration::ZERO);
    let first_batch = vec![delivered("shared", "a.example")];
    let second_batch = vec![
        delivered("shared", "a.example"),
        delivered("own", "b.example"),
    ];

    // The first batch stops between its statements and COMMIT, its claim of `shared` made.
    let (first, release) = held_before_commit(&store, first_batch).await;
    let second = tokio::spawn({
        let (store, batch) = (store.clone(), second_batch.clone());
        async move { store.apply(&batch).await }
    });
    // The second batch's insert of `shared` waits for the first transaction.
    db.await_lock_waits(1, "%", "the second claim to wait for the first")
        .await;
    release.notify_one();
    let applied = first.await.expect("join").expect("the first batch commits");
    assert_eq!((applied.messages, applied.duplicates), (1, 0));
    let error = second
        .await
        .expect("join")
        .expect_err("the second claim meets the committed id in the unique index");
    assert!(error.is_claim_conflict(), "a claim conflict: {error:?}");
    assert!(!error.is_permanent(), "never bisected or dead-lettered");
    let again = store.apply(&second_batch).await.expect("applied again");
    assert_eq!(
        (again.messages, again.duplicates),
        (1, 1),
        "`own` counts, `shared` is a duplicate"
    );
    let counts = db.counts().await;
    assert_eq!(counts["a.example"], (1, 0));
    assert_eq!(counts["b.example"], (1, 0));
}

/// During a rolling upgrade, replicas of the version before V9 call the one-argument claim
/// (with their own bucket-lock statement) beside replicas calling V9's: both functions stay,
/// write the same table, and each sees what the other claimed.
#[tokio::test]
async fn the_claim_before_v9_and_v9_s_claim_see_each_other_s_ids() {
    let db = TestDb::create().await;
    let _store = db.store(1).await;
    let client = db.client().await;
    // The keys a claim found held.
    let claim = |sql: &'static str, keys: Vec<&'static [u8]>, window: Option<f64>| {
        let client = &client;
        async move {
            let rows = match window {
                None => client.query(sql, &[&keys]).await,
                Some(window) => client.query(sql, &[&keys, &window]).await,
            };
            let rows = rows.unwrap_or_else(|error| panic!("{sql}: {error}"));
            rows.iter().map(|row| row.get(0)).collect::<Vec<Vec<u8>>>()
        }
    };
    let claim_v8 = |keys| claim("SELECT applied_messages_claim($1::bytea[])", keys, None);
    // A window of zero: near midnight `new` would go into two partitions, and V8's claim
    // returns a held key once per partition (this test is about the two functions, not the
    // window).
    let claim_v9 = |keys| claim(catchall::store::CLAIM, keys, Some(0.0));
    assert!(claim_v8(vec![b"old"]).await.is_empty(), "`old` is new");
    assert_eq!(claim_v9(vec![b"new", b"old"]).await, [b"old".to_vec()]);
    assert_eq!(claim_v8(vec![b"new"]).await, [b"new".to_vec()]);
}

/// A claim window of more than 12 hours: the nearest UTC midnight and the partition bound
/// nearest to now are always within it, so the window's path runs at any hour.
const ANY_HOUR: Duration = Duration::from_secs(24 * 3600);

/// Two attempts of one id that start on either side of a partition boundary (UTC midnight in
/// production) would insert into two partitions, and neither unique index would see the
/// other's uncommitted row: with a window of zero both commit and the id counts twice (so the
/// test can tell the window's path apart from luck). With the window covering the moment
/// (production: 10 minutes around midnight; here: any hour), a claim inserts the id on both
/// sides of the boundary (V11): the later one waits in its claim for the earlier transaction,
/// fails with a claim conflict when that one commits, and, applied again, finds the id. So it
/// goes for small batches and for batches with 2,500 more ids each, when only one of the two
/// claims runs the window's path (either one), and when the default partition is the side after
/// the boundary. The boundary is made three seconds ahead, so the path runs at any hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_either_side_of_a_partition_boundary_count_an_id_once_within_the_window() {
    let (zero, window) = (Duration::ZERO, ANY_HOUR);
    let (counted, partitions) = claims_across_a_boundary((zero, zero), 0, 0, true).await;
    assert_eq!(
        counted, 2,
        "outside the window the hazard is real: counted twice"
    );
    assert_eq!(
        partitions,
        ["applied_messages_after", "applied_messages_before"]
    );

    for (windows, extra) in [
        ((window, window), 0),
        ((window, window), 2500),
        ((zero, window), 0),
        ((window, zero), 0),
    ] {
        let (counted, partitions) = claims_across_a_boundary(windows, extra, extra, true).await;
        let windowed = |w: Duration| if w.is_zero() { "zero" } else { "any hour" };
        let case = format!(
            "windows {} and {}, {extra} more messages each",
            windowed(windows.0),
            windowed(windows.1)
        );
        assert_eq!(counted, 1, "the second claim met the first's id ({case})");
        // Only the first claim's rows: on both sides when it ran the window's path.
        let expected: &[&str] = if windows.0.is_zero() {
            &["applied_messages_before"]
        } else {
            &["applied_messages_after", "applied_messages_before"]
        };
        assert_eq!(
            partitions, expected,
            "where the first claim put the id ({case})"
        );
    }

    // No partition after the boundary (the upkeep behind): the default partition is the other
    // side. The same hazard, and the window's path meets it there.
    let sides = ["applied_messages_before", "applied_messages_default"];
    let (counted, partitions) = claims_across_a_boundary((zero, zero), 0, 0, false).await;
    assert_eq!(
        counted, 2,
        "the default partition after the boundary: counted twice"
    );
    assert_eq!(partitions, sides);
    let (counted, partitions) = claims_across_a_boundary((window, window), 0, 0, false).await;
    assert_eq!(
        counted, 1,
        "the default partition after the boundary: counted once"
    );
    assert_eq!(
        partitions, sides,
        "the first claim's rows, one on each side"
    );
}

/// Near a partition bound, a claim waits only for claims that share one of its ids: a batch
/// whose ids are all new commits while another batch's transaction is open, whatever their
/// sizes. Under V10 a claim of more than 64 ids locked its hash buckets (128) exclusively, so
/// the second batch of 2,500 waited for the first's COMMIT; V11 takes no advisory locks.
/// Applied again, both count nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_midnight_a_claim_waits_only_for_claims_of_its_own_ids() {
    let db = TestDb::create().await;
    let store = db.store(4).await.with_claim_window(ANY_HOUR);
    let client = db.client().await;
    for n in [2500, 1] {
        let batch = |name: &str| -> Vec<catchall::store::Message> {
            (0..n)
                .map(|i| delivered(&format!("{name}-{n}-{i}"), &format!("{name}.example")))
                .collect()
        };
        let (first, release) = held_before_commit(&store, batch("first")).await;
        let applied = tokio::time::timeout(Duration::from_secs(10), store.apply(&batch("second")))
            .await
            .unwrap_or_else(|_| panic!("a batch of {n} commits while another of {n} is open"))
            .expect("the second batch applies");
        assert_eq!((applied.messages, applied.duplicates), (n, 0));
        let locks: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .expect("pg_locks")
            .get(0);
        assert_eq!(locks, 0, "advisory locks held by an open claim of {n} ids");
        release.notify_one();
        let applied = first.await.expect("join").expect("the first batch commits");
        assert_eq!((applied.messages, applied.duplicates), (n, 0));
        for name in ["first", "second"] {
            let again = store.apply(&batch(name)).await.expect("applied again");
            assert_eq!((again.messages, again.duplicates), (0, n), "{name} again");
        }
    }
    let counts = db.counts().await;
    assert_eq!(
        (counts["first.example"], counts["second.example"]),
        ((2501, 0), (2501, 0))
    );
}

/// During a rolling upgrade a replica of V8 runs its own statements: bucket locks, then a
/// plain insert of its ids at now(). A V11 claim of one of those ids takes no lock, but it
/// inserts the id into the partition of now() too: it waits for that transaction on the id's
/// row, fails with a claim conflict when it commits, and, applied again, finds the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_midnight_a_claim_meets_the_ids_of_a_v8_replica() {
    let db = TestDb::create().await;
    let store = db.store(4).await.with_claim_window(ANY_HOUR);
    let mut v8 = db.client().await;
    let v8 = v8.transaction().await.expect("begin");
    // V8's lock statement (before V9 it was the worker's own), then its claim.
    v8_claim(&v8, b"shared").await.expect("V8's claim");
    v11_meets_v8_claim(&db, &store, v8).await;
}

/// A replica of V8 during a rolling upgrade claims with its own statements (bucket locks, then
/// the one-argument claim, which inserts at now() only) and never runs the window's path. Across
/// a partition boundary it still meets the claims of V11 replicas, because they insert on both
/// sides: V8 before the boundary and V11 after it (V11 waits in its claim, fails with a claim
/// conflict when V8 commits, and finds the id applied again), and V11 before it and V8 after it
/// (V8's insert waits on V11's row in the partition after the boundary and fails with
/// `unique_violation`; its batch, claimed again, finds the id). A V11 claim with a window of
/// zero does not wait for V8's: the meeting is the window's doing. The boundary is made three
/// seconds ahead, so this runs at any hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_a_partition_boundary_a_claim_meets_the_ids_of_a_v8_replica() {
    // V8 first, before the boundary; V11 after it, with and without the window.
    for window in [ANY_HOUR, Duration::ZERO] {
        let db = TestDb::create().await;
        let store = db.store(4).await.with_claim_window(window);
        let client = db.client().await;
        let boundary = partitions_meeting_soon(&client, true).await;
        let mut v8 = db.client().await;
        let v8 = v8.transaction().await.expect("begin");
        let held = v8_claim(&v8, b"shared").await.expect("V8's claim");
        assert!(held.is_empty(), "`shared` is new to V8");
        await_past(&client, &boundary).await;
        let batch = [delivered("shared", "a.example")];
        if window.is_zero() {
            let applied = store.apply(&batch).await.expect("V11 commits at once");
            assert_eq!(
                (applied.messages, applied.duplicates),
                (1, 0),
                "without the window V11 misses V8's uncommitted id: the hazard the window closes"
            );
            v8.rollback().await.expect("V8 rolls back");
            continue;
        }
        v11_meets_v8_claim(&db, &store, v8).await;
    }

    // V11 first, before the boundary; V8 after it.
    let db = TestDb::create().await;
    let store = db.store(4).await.with_claim_window(ANY_HOUR);
    let client = db.client().await;
    let boundary = partitions_meeting_soon(&client, true).await;
    let (ours, release) = held_before_commit(&store, vec![delivered("shared", "a.example")]).await;
    await_past(&client, &boundary).await;
    let v8 = tokio::spawn({
        let mut v8 = db.client().await;
        async move {
            let v8 = v8.transaction().await.expect("begin");
            let held = v8_claim(&v8, b"shared").await;
            drop(v8);
            held
        }
    });
    db.await_lock_waits(
        1,
        "%applied_messages_claim%",
        "V8's insert to wait for V11's row",
    )
    .await;
    release.notify_one();
    let applied = ours.await.expect("join").expect("V11's batch commits");
    assert_eq!((applied.messages, applied.duplicates), (1, 0));
    let error = v8
        .await
        .expect("join")
        .expect_err("V8's insert meets V11's committed row after the boundary");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "V8 fails its batch with unique_violation: {error:?}"
    );
    let mut v8 = db.client().await;
    let v8 = v8.transaction().await.expect("begin");
    let mut held = v8_claim(&v8, b"shared").await.expect("V8 claims again");
    // Once per partition holding it (V11 put it on both sides); V8's binary takes a set.
    held.dedup();
    assert_eq!(
        held,
        [b"shared".to_vec()],
        "V8, claiming again, finds the id"
    );
    assert_eq!(db.counts().await["a.example"], (1, 0));
}

/// A V11 claim of `shared` (`a.example`) while `v8` holds V8's uncommitted claim of it: it waits
/// on V8's row, fails with a claim conflict when `v8` commits, and, applied again, finds the id.
async fn v11_meets_v8_claim(
    db: &TestDb,
    store: &catchall::store::Store,
    v8: tokio_postgres::Transaction<'_>,
) {
    let batch = [delivered("shared", "a.example")];
    let ours = tokio::spawn({
        let (store, batch) = (store.clone(), batch.clone());
        async move { store.apply(&batch).await }
    });
    db.await_lock_waits(
        1,
        "%applied_messages_claim%",
        "the V11 claim to wait for V8's row",
    )
    .await;
    v8.commit().await.expect("V8's transaction commits");
    let error = ours
        .await
        .expect("join")
        .expect_err("the claim meets V8's committed id in the unique index");
    assert!(error.is_claim_conflict(), "a claim conflict: {error:?}");
    let applied = store.apply(&batch).await.expect("applied again");
    assert_eq!(
        (applied.messages, applied.duplicates),
        (0, 1),
        "it met V8's id"
    );
}

/// V8's claim of `key` in `tx`: its bucket-lock statement, then the one-argument claim. Returns
/// the keys it found held.
async fn v8_claim(
    tx: &tokio_postgres::Transaction<'_>,
    key: &[u8],
) -> Result<Vec<Vec<u8>>, tokio_postgres::Error> {
    let keys = vec![key.to_vec()];
    tx.query_one(
        "SELECT count(pg_advisory_xact_lock(1667326824, bucket)) \
         FROM (SELECT DISTINCT ('x' || substr(md5(id), 1, 8))::bit(32)::int4 & 127 AS bucket \
               FROM unnest($1::bytea[]) id ORDER BY bucket) buckets",
        &[&keys],
    )
    .await?;
    let rows = tx
        .query("SELECT applied_messages_claim($1::bytea[])", &[&keys])
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// The first batch claims `shared` before the boundary and stops before COMMIT; the second
/// claims `shared` and `own` after it; each with its own claim window (`windows`). Each has `first_extra` / `second_extra` more messages of
/// ids of its own. Returns how often `shared`'s domain was counted and the partitions holding
/// `shared`.
async fn claims_across_a_boundary(
    windows: (Duration, Duration),
    first_extra: usize,
    second_extra: usize,
    after: bool,
) -> (i64, Vec<String>) {
    let db = TestDb::create().await;
    let store = db.store(4).await;
    let (first_store, store) = (
        store.clone().with_claim_window(windows.0),
        store.with_claim_window(windows.1),
    );
    // The two claims meet on a unique index when either inserts on both sides of the boundary.
    let meet = !(windows.0.is_zero() && windows.1.is_zero());
    let client = db.client().await;
    let boundary = partitions_meeting_soon(&client, after).await;

    let mut first_batch = vec![delivered("shared", "a.example")];
    first_batch.extend((0..first_extra).map(|i| delivered(&format!("first-{i}"), "c.example")));
    let mut second_batch = vec![
        delivered("shared", "a.example"),
        delivered("own", "b.example"),
    ];
    second_batch.extend((0..second_extra).map(|i| delivered(&format!("second-{i}"), "d.example")));
    let (first, release) = held_before_commit(&first_store, first_batch).await;
    await_past(&client, &boundary).await;
    let second = tokio::spawn({
        let (store, batch) = (store.clone(), second_batch.clone());
        async move { store.apply(&batch).await }
    });
    // Outside the window the second claim waits for nothing: it reaches the upsert, where it
    // waits for the first's row of `a.example`, its claim of `shared` made into the other
    // partition. Within it, it waits in the claim, on the first's row of `shared` in one of
    // the two partitions, fails when the first commits, and, applied again, finds `shared`.
    let (waits_in, second_counts) = if meet {
        ("%applied_messages_claim%", (1 + second_extra, 1))
    } else {
        ("%INSERT INTO domains%", (2 + second_extra, 0))
    };
    db.await_lock_waits(1, waits_in, "the second batch to wait for the first")
        .await;
    release.notify_one();
    let applied = first.await.expect("join").expect("the first batch commits");
    assert_eq!((applied.messages, applied.duplicates), (1 + first_extra, 0));
    let applied = match second.await.expect("join") {
        Ok(applied) => applied,
        // Within the window the second claim's insert met the first's committed row of
        // `shared` in one partition's unique index: a claim conflict, and the batch is applied
        // again (as the worker does).
        Err(error) if error.is_claim_conflict() && meet => store
            .apply(&second_batch)
            .await
            .expect("the second batch, applied again, commits"),
        Err(error) => panic!("the second batch commits: {error:?}"),
    };
    assert_eq!(
        (applied.messages, applied.duplicates),
        second_counts,
        "the second batch's (counted, duplicates)"
    );
    let counts = db.counts().await;
    assert_eq!(counts["b.example"], (1, 0));
    let held: Vec<String> = client
        .query(
            "SELECT tableoid::regclass::text FROM applied_messages \
             WHERE message_id = 'shared'::bytea ORDER BY 1",
            &[],
        )
        .await
        .expect("where `shared` is held")
        .iter()
        .map(|row| row.get(0))
        .collect();
    (counts["a.example"].0, held)
}

/// A new partition is empty, and autovacuum may analyse it so: a prepared claim statement's
/// generic plan, made then and kept by the connection, read that partition with a sequential
/// scan at every claim while it grew to millions of ids. The claim (migration V8) is planned
/// with sequential scans off: it probes the index of a partition analysed while empty, after as
/// many claims on one connection as it takes Postgres to switch to a generic plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_probes_the_index_of_a_partition_analysed_while_empty() {
    use catchall::event::parse_message;
    use catchall::store::Message;
    let db = TestDb::create().await;
    let store = db.store(1).await;
    let client = db.client().await;
    client
        .batch_execute("ANALYZE applied_messages")
        .await
        .expect("analyse the empty partitions");
    // The partition of now(), and its scans so far.
    let current: String = client
        .query_one(
            "WITH probe AS (INSERT INTO applied_messages (message_id) VALUES ('probe') \
                            RETURNING tableoid) \
             SELECT tableoid::regclass::text FROM probe",
            &[],
        )
        .await
        .expect("the partition of now()")
        .get(0);
    let scans = || async {
        let row = client
            .query_one(
                "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables \
                   WHERE relid = $1::text::regclass",
                &[&current],
            )
            .await
            .expect("pg_stat_user_tables");
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let (seq_before, idx_before) = scans().await;
    for batch in 0..10 {
        let messages: Vec<Message> = (0..20)
            .map(|i| Message {
                id: Some(format!("{batch}-{i}").into_bytes()),
                events: parse_message(br#"{"domain":"a.example","type":"delivered"}"#)
                    .expect("valid"),
            })
            .collect();
        let applied = store.apply(&messages).await.expect("apply");
        assert_eq!(applied.messages, 20);
    }
    // Statistics reach pg_stat_user_tables when the backend flushes them (within seconds).
    let (seq_after, idx_after) = wait_for(
        Duration::from_secs(30),
        "the claims' scans of the partition in the statistics",
        || async {
            let (seq, idx) = scans().await;
            (seq - seq_before + idx - idx_before >= 10).then_some((seq, idx))
        },
    )
    .await;
    assert_eq!(
        seq_after,
        seq_before,
        "no claim read the partition sequentially ({} index scans)",
        idx_after - idx_before
    );
    assert_eq!(db.counts().await["a.example"], (200, 0));
}

/// A unique violation that is not a claim's (here from a table an operator added, named like
/// ours, filled by a trigger on `domains`) is not a claim conflict: it stays permanent (the batch
/// is bisected and the culprit dead-lettered), never an endless immediate retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_violation_elsewhere_is_not_a_claim_conflict() {
    use catchall::event::parse_message;
    use catchall::store::Message;
    let db = TestDb::create().await;
    let store = db.store(1).await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE applied_messages_audit (domain text PRIMARY KEY); \
             CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               INSERT INTO applied_messages_audit VALUES (NEW.domain); RETURN NEW; END $$; \
             CREATE TRIGGER audit AFTER INSERT OR UPDATE ON domains \
               FOR EACH ROW EXECUTE FUNCTION audit();",
        )
        .await
        .expect("an operator's audit table");
    let message = |id: &str| Message {
        id: Some(id.as_bytes().to_vec()),
        events: parse_message(br#"{"domain":"a.example","type":"delivered"}"#).expect("valid"),
    };
    store
        .apply(&[message("first")])
        .await
        .expect("the first event of a.example");
    let error = store
        .apply(&[message("second")])
        .await
        .expect_err("the audit row of a.example exists");
    assert!(
        !error.is_claim_conflict(),
        "not a claim conflict: {error:?}"
    );
    assert!(error.is_permanent(), "refused for its content: {error:?}");
}

/// Replaces the partitions of `applied_messages` by two that meet three seconds from now (or,
/// without `after`, by one that ends then, the default partition taking what comes after).
/// Returns the boundary as the server's text.
async fn partitions_meeting_soon(client: &tokio_postgres::Client, after: bool) -> String {
    let partitions: Vec<String> = client
        .query(
            "SELECT inhrelid::regclass::text FROM pg_inherits \
             WHERE inhparent = 'applied_messages'::regclass \
               AND inhrelid <> 'applied_messages_default'::regclass",
            &[],
        )
        .await
        .expect("partitions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let boundary: String = client
        .query_one(
            "SELECT (clock_timestamp() + interval '3 seconds')::text",
            &[],
        )
        .await
        .expect("the server's clock")
        .get(0);
    // One transaction, so one commit (one fsync) between reading the clock and the claims.
    let mut ddl = String::from("BEGIN;");
    for partition in partitions {
        ddl.push_str(&format!(" DROP TABLE {partition};"));
    }
    ddl.push_str(&format!(
        " CREATE TABLE applied_messages_before PARTITION OF applied_messages \
            FOR VALUES FROM (MINVALUE) TO ('{boundary}'); \
          CREATE UNIQUE INDEX applied_messages_before_message_id \
            ON applied_messages_before (message_id);"
    ));
    if after {
        ddl.push_str(&format!(
            " CREATE TABLE applied_messages_after PARTITION OF applied_messages \
                FOR VALUES FROM ('{boundary}') TO (MAXVALUE); \
              CREATE UNIQUE INDEX applied_messages_after_message_id \
                ON applied_messages_after (message_id);"
        ));
    }
    ddl.push_str(" COMMIT;");
    client
        .batch_execute(&ddl)
        .await
        .expect("partitions meeting at the boundary");
    boundary
}

/// Checks that the transactions held open in this database began before `boundary` (the
/// set-up was fast enough), then waits for the server's clock to pass it.
async fn await_past(client: &tokio_postgres::Client, boundary: &str) {
    let began_before: bool = client
        .query_one(
            "SELECT coalesce(bool_and(xact_start < $1::text::timestamptz), false) FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'idle in transaction'",
            &[&boundary],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert!(
        began_before,
        "setup too slow: the first claim began after the boundary"
    );
    wait_for(
        Duration::from_secs(15),
        "the server's clock to pass the boundary",
        || async move {
            let past: bool = client
                .query_one(
                    "SELECT clock_timestamp() > $1::text::timestamptz",
                    &[&boundary],
                )
                .await
                .expect("the server's clock")
                .get(0);
            past.then_some(())
        },
    )
    .await;
}
