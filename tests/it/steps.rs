//! The consumer driven one step at a time: `process_batch` gathers, applies and acks a batch.

use crate::helpers::*;
use catchall::consumer::{Consumer, Step};
use catchall::health::Health;
use catchall::store::Store;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_batch_applies_one_batch_per_step() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.batch_size = 3; // events: the first step takes messages 0 (1 event) and 2 (2 events)
    config.batch_timeout_ms = 60_000; // only a full batch ends a step
    let store = Store::connect(&db.url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let mut consumer = Consumer::open(&config).await.unwrap();
    let (health, cancel) = (Health::default(), CancellationToken::new());

    let (_connection, channel) = broker.channel().await;
    let bodies: [&[u8]; 5] = [
        br#"{"domain":"a.example","type":"delivered"}"#,
        b"not json",
        br#"[{"domain":"a.example","type":"bounced"},{"domain":"b.example","type":"delivered"}]"#,
        br#"{"domain":"b.example","type":"delivered"}"#,
        br#"{"domain":"c.example","type":"delivered"}"#,
    ];
    for (i, body) in bodies.iter().enumerate() {
        publish_raw(
            &channel,
            &broker.exchange,
            "x",
            body,
            Some(&format!("m{i}")),
        )
        .await;
    }

    let Step::Done { applied, rejected } = consumer
        .process_batch(&store, &health, &cancel)
        .await
        .unwrap()
    else {
        panic!("not stopped")
    };
    assert_eq!(
        (
            applied.messages,
            applied.delivered,
            applied.bounced,
            rejected
        ),
        (2, 2, 1, 1)
    );
    assert_eq!(
        db.counts().await.len(),
        2,
        "a.example and b.example after one step"
    );

    // The stop signal ends the next step with what it has: nothing, since it comes first.
    cancel.cancel();
    let Step::Stopped { applied, rejected } = consumer
        .process_batch(&store, &health, &cancel)
        .await
        .unwrap()
    else {
        panic!("stopped")
    };
    assert_eq!(
        (applied.messages, rejected),
        (0, 0),
        "nothing gathered after the stop"
    );
    consumer.close().await;
    wait_for(
        Duration::from_secs(10),
        "the two last messages back in the queue and the poison dead-lettered",
        || async {
            let queued = broker.depth(&broker.queue).await;
            let dead = broker.depth(&broker.dead_queue()).await;
            (queued == 2 && dead == 1).then_some(())
        },
    )
    .await;
}
