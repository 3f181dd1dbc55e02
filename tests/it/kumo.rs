//! KumoMTA log records (SPEC §3) published by another AMQP client (Python's pika), counted as
//! the records say.

use crate::bounce::{all_events, status};
use crate::helpers::*;
use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kumomta_record_stream_from_pika_is_counted_as_the_records_say() {
    let (db, broker, worker) = started().await;
    // Declares the test's topology before pika publishes onto it.
    let (_connection, _channel) = broker.channel().await;
    const PASSES: i64 = 40;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kumomta");
    let output = tokio::process::Command::new("python3")
        .arg(fixtures.join("publish.py"))
        .arg(AMQP_URL)
        .arg(&broker.exchange)
        .arg("kumomta.log")
        .arg(fixtures.join("records.ndjson"))
        .arg(PASSES.to_string())
        .output()
        .await
        .expect("run python3");
    assert!(
        output.status.success(),
        "publish.py failed (is pika installed? .ci/run installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Per pass: 4 deliveries, 2 proving bounces, 2 other bounces (tests/fixtures/kumomta/README.md).
    wait_for(
        Duration::from_secs(30),
        "every record to be counted",
        || async { (all_events(&db).await == 8 * PASSES).then_some(()) },
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "every record to be settled",
        || async {
            let ignored = worker
                .metric("catchall_records_ignored_total{source=\"kumomta\"}")
                .await;
            (ignored == (5 * PASSES) as f64).then_some(())
        },
    )
    .await;
    let want = [
        ("kumo-one.example", "not catch-all", 2, 1, 0),
        ("kumo-two.example", "unknown", 1, 0, 2),
        ("kumo-three.example", "not catch-all", 1, 1, 0),
    ];
    for (domain, verdict, delivered, bounced, other) in want {
        assert_eq!(
            status(&worker, domain).await,
            serde_json::json!({"domain": domain, "status": verdict,
                "delivered": delivered * PASSES, "bounced": bounced * PASSES,
                "other_bounced": other * PASSES}),
            "{domain}"
        );
    }
    assert_eq!(
        worker
            .metric("catchall_messages_total{outcome=\"rejected\"}")
            .await,
        0.0,
        "nothing dead-lettered"
    );
    assert_eq!(broker.depth(&broker.dead_queue()).await, 0);
    worker.stop().await;
}
