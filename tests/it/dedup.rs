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
    assert_eq!(publish_stream(&broker, true).await, expected);
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
    // Purged every 10 s (a quarter of the retention); the test ages half the ids by hand
    // rather than waiting 40 s, so no timing decides what is young or old.
    config.dedup_retention = Duration::from_secs(40);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let expected = publish_stream(&broker, true).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    let client = db.client().await;
    let aged = client
        .execute(
            "UPDATE applied_messages SET applied_at = now() - interval '1 hour' \
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
    assert_eq!(worker.metric("catchall_dedup_purged_total").await, 250.0);
    assert_eq!(
        db.counts().await,
        expected,
        "purging ids leaves the counters alone"
    );
    worker.stop().await;
}
