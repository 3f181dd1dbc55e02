//! The worker's own loop driven one step at a time: `Consumer::step` is what production runs
//! (gather a batch, submit it to the pipeline, ack what is ready), and the pipeline's acks keep
//! delivery order across batches in flight.

use crate::helpers::*;
use catchall::consumer::{Consumer, ConsumerSettings, FaultHook, FaultPoint, Step};
use catchall::health::Health;
use catchall::store::{Applied, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn sum(a: Applied, b: Applied) -> Applied {
    Applied {
        messages: a.messages + b.messages,
        delivered: a.delivered + b.delivered,
        bounced: a.bounced + b.bounced,
        duplicates: a.duplicates + b.duplicates,
        ..Applied::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_loop_applies_one_batch_per_step() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.batch_size = 3; // events: the first step takes messages 0 (1 event) and 2 (2 events)
    config.batch_timeout_ms = 60_000; // only a full batch ends a step
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let settings = ConsumerSettings::from_config(&config);
    let mut consumer = Consumer::open(&settings).await.unwrap();
    let (health, cancel, abort) = (
        Arc::new(Health::default()),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let mut pipeline = consumer.pipeline(&store, &health, &cancel, &abort);

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

    let Step::Done { applied, rejected } = consumer.step(&mut pipeline).await.unwrap() else {
        panic!("not stopped")
    };
    assert_eq!(rejected, 1, "the poison message, rejected while gathering");
    // The batch is committing or committed; draining waits for it and acks it.
    let applied = sum(applied, pipeline.drain().await.unwrap());
    assert!(pipeline.is_empty());
    assert_eq!(
        (applied.messages, applied.delivered, applied.bounced),
        (2, 2, 1)
    );
    assert_eq!(
        db.counts().await.len(),
        2,
        "a.example and b.example after one step"
    );
    let stats = settings.stats.snapshot();
    assert_eq!((stats.applied, stats.rejected, stats.batches), (2, 1, 1));
    assert_eq!(stats.unacked_bytes, 0, "everything gathered is settled");

    // The stop signal ends the next step with what it has: nothing, since it comes first.
    cancel.cancel();
    let Step::Stopped { applied, rejected } = consumer.step(&mut pipeline).await.unwrap() else {
        panic!("stopped")
    };
    assert_eq!(
        (applied.messages, rejected),
        (0, 0),
        "nothing gathered after the stop"
    );
    drop(pipeline);
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

/// Holds the first batch that reaches `COMMIT`, forever; lets every other one through.
fn hold_first_commit(held: Arc<Notify>) -> FaultHook {
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    Arc::new(move |point| {
        let hold = point == FaultPoint::BeforeCommit
            && first.swap(false, std::sync::atomic::Ordering::SeqCst);
        let held = held.clone();
        hold.then(|| -> futures_util::future::BoxFuture<'static, ()> {
            Box::pin(async move {
                held.notify_one();
                std::future::pending::<()>().await;
            })
        })
    })
}

/// Batch 1 is held before its COMMIT while batch 2 commits: batch 2 is not acked ahead of
/// batch 1 (a multiple-ack would settle batch 1 too). The worker is killed: both come back,
/// batch 1 is counted once, batch 2 is recognised as already applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_batch_is_never_acked_before_an_earlier_one_commits() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.batch_size = 1; // one message, one batch
    config.in_flight = 2;
    config.batch_timeout_ms = 50;
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let held = Arc::new(Notify::new());
    let mut settings = ConsumerSettings::from_config(&config);
    settings.fault_hook = Some(hold_first_commit(held.clone()));
    let mut consumer = Consumer::open(&settings).await.unwrap();
    let (health, cancel, abort) = (
        Arc::new(Health::default()),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let mut pipeline = consumer.pipeline(&store, &health, &cancel, &abort);

    let (_connection, channel) = broker.channel().await;
    let one = br#"{"domain":"one.example","type":"delivered"}"#;
    let two = br#"{"domain":"two.example","type":"delivered"}"#;
    publish_raw(&channel, &broker.exchange, "x", one, Some("one")).await;
    publish_raw(&channel, &broker.exchange, "x", two, Some("two")).await;

    // Batch 1: submitted, held before COMMIT.
    consumer.step(&mut pipeline).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), held.notified())
        .await
        .expect("batch 1 reaches COMMIT");
    // Batch 2: submitted beside it, and committed.
    consumer.step(&mut pipeline).await.unwrap();
    // The worker counts a batch just after its commit is visible: wait for the count, then the
    // commit is visible too.
    wait_for(Duration::from_secs(20), "batch 2 committed", || async {
        (settings.stats.snapshot().applied == 1).then_some(())
    })
    .await;
    assert_eq!(
        db.counts().await.get("two.example").map(|c| c.0),
        Some(1),
        "batch 2 committed"
    );
    // Nothing is ready to ack: batch 2 waits behind batch 1.
    let acked = pipeline.ack_ready().await.unwrap();
    assert_eq!(
        acked,
        Applied::default(),
        "batch 2 is not acked before batch 1"
    );
    assert_eq!(pipeline.len(), 2, "both batches in flight");
    assert!(!db.counts().await.contains_key("one.example"));
    assert_eq!(
        settings.stats.snapshot().unacked_bytes,
        (one.len() + two.len()) as u64,
        "both bodies held unacked"
    );

    // The worker dies: batch 1 never commits, nothing more is acked.
    drop(pipeline);
    consumer.close().await;
    assert_eq!(settings.stats.snapshot().unacked_bytes, 0, "given back");
    // Had batch 2's ack gone out (a multiple-ack up to its tag), neither message would be back.
    wait_for(
        Duration::from_secs(10),
        "both messages back in the queue",
        || async { (broker.depth(&broker.queue).await == 2).then_some(()) },
    )
    .await;

    // A new worker: batch 1 counted once, batch 2's message skipped as already applied.
    let fresh = ConsumerSettings::from_config(&config);
    let mut consumer = Consumer::open(&fresh).await.unwrap();
    let mut pipeline = consumer.pipeline(&store, &health, &cancel, &abort);
    let mut applied = Applied::default();
    while applied.messages + applied.duplicates < 2 {
        let Step::Done { applied: step, .. } =
            tokio::time::timeout(Duration::from_secs(20), consumer.step(&mut pipeline))
                .await
                .expect("a step within 20 s")
                .unwrap()
        else {
            panic!("not stopped")
        };
        applied = sum(applied, step);
        applied = sum(applied, pipeline.drain().await.unwrap());
    }
    assert_eq!((applied.messages, applied.duplicates), (1, 1));
    let counts = db.counts().await;
    assert_eq!(counts.get("one.example").map(|c| c.0), Some(1));
    assert_eq!(counts.get("two.example").map(|c| c.0), Some(1));
    let stats = fresh.stats.snapshot();
    assert_eq!(
        (stats.applied, stats.duplicates),
        (1, 1),
        "this worker's own counts"
    );
    drop(pipeline);
    consumer.close().await;
    assert_eq!(broker.depth(&broker.queue).await, 0, "both acked");
}
