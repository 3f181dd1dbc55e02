//! End to end: producer → RabbitMQ → worker → Postgres → HTTP.

use crate::helpers::*;
use catchall::event::Status;
use std::collections::HashSet;
use std::time::{Duration, Instant};

async fn end_to_end(events: u64, batch: u32, seed: u64) {
    let (db, broker, worker) = started().await;

    let started = Instant::now();
    let expected = generate(&broker, events, batch, seed).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(120)).await;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "end to end: {events} events in messages of {batch}: {elapsed:.2} s, {:.0} events/s",
        events as f64 / elapsed
    );

    // The HTTP answers agree with the counters, for every domain of the stream.
    let client = reqwest::Client::new();
    let mut statuses = HashSet::new();
    for (domain, &(delivered, bounced)) in &expected {
        let body: serde_json::Value = client
            .get(worker.url(&format!("/domains/{domain}")))
            .send()
            .await
            .expect("GET /domains")
            .json()
            .await
            .expect("JSON body");
        let status = Status::classify(delivered, bounced, 1000).as_str();
        assert_eq!(
            body,
            serde_json::json!({"domain": domain, "status": status, "delivered": delivered, "bounced": bounced, "other_bounced": 0})
        );
        statuses.insert(status);
    }
    assert_eq!(
        statuses.len(),
        3,
        "the stream holds all three statuses: {statuses:?}"
    );
    assert_eq!(broker.depth(&broker.queue).await, 0, "queue drained");
    assert_eq!(
        broker.depth(&broker.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_stream_of_single_events_is_counted_exactly() {
    end_to_end(100_000, 1, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_stream_of_batches_is_counted_exactly() {
    end_to_end(200_000, 100, 11).await;
}
