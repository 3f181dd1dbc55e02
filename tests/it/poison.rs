//! Poison messages are dead-lettered whole; valid ones around them are counted; the worker
//! keeps running. A message that keeps failing otherwise meets the queue's delivery limit.

use crate::helpers::*;
use std::time::Duration;

/// One of each kind of invalid message (SPEC §3).
fn invalid_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let event = serde_json::json!({"domain": "poison.example", "type": "delivered"});
    let over_max: Vec<_> = (0..10_001).map(|_| event.clone()).collect();
    let mut huge = br#"{"domain":"poison.example","type":"delivered","pad":""#.to_vec();
    huge.resize(1024 * 1024 + 10, b'x');
    huge.extend_from_slice(b"\"}");
    vec![
        ("not JSON", b"this is not json".to_vec()),
        ("not UTF-8", b"{\"domain\":\"poison\xff.example\",\"type\":\"delivered\"}".to_vec()),
        ("unknown type", br#"{"domain":"poison.example","type":"opened"}"#.to_vec()),
        ("invalid domain", br#"{"domain":"poison..example","type":"delivered"}"#.to_vec()),
        ("empty array", b"[]".to_vec()),
        (
            "array with one bad event",
            br#"[{"domain":"poison.example","type":"delivered"},{"domain":"-bad-.example","type":"bounced"}]"#.to_vec(),
        ),
        ("array over 10,000 events", serde_json::to_vec(&over_max).unwrap()),
        ("body over 1 MiB", huge),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_dead_lettered_and_valid_ones_counted() {
    let (db, broker, worker) = started().await;
    let (_connection, channel) = broker.channel().await;

    // Valid traffic interleaved with each invalid message, three rounds.
    let invalid = invalid_bodies();
    let mut expected = Counts::new();
    let rounds = 3;
    for round in 0..rounds {
        for (i, (_, body)) in invalid.iter().enumerate() {
            let domain = format!("valid-{i}.example");
            let single = serde_json::json!({"domain": domain, "type": "delivered"});
            publish_raw(
                &channel,
                &broker.exchange,
                "delivered",
                &serde_json::to_vec(&single).unwrap(),
                None,
            )
            .await;
            publish_raw(
                &channel,
                &broker.exchange,
                "poison",
                body,
                Some(&format!("poison-{round}-{i}")),
            )
            .await;
            let pair = serde_json::json!([
                {"domain": domain, "type": "bounced"},
                {"domain": "Valid-Batch.example.", "type": "delivered"}
            ]);
            publish_raw(
                &channel,
                &broker.exchange,
                "batch",
                &serde_json::to_vec(&pair).unwrap(),
                None,
            )
            .await;
            let entry = expected.entry(domain).or_default();
            entry.0 += 1;
            entry.1 += 1;
            expected.entry("valid-batch.example".into()).or_default().0 += 1;
        }
    }

    let dead = (invalid.len() * rounds) as u32;
    wait_for(
        Duration::from_secs(30),
        "every invalid message in the dead-letter queue",
        || async { (broker.depth(&broker.dead_queue()).await == dead).then_some(()) },
    )
    .await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    let counts = db.counts().await;
    assert!(
        !counts.contains_key("poison.example"),
        "nothing of an invalid message is counted"
    );

    // Rejections are counted by reason.
    let reasons = [
        "not_json",
        "not_utf8",
        "unknown_type",
        "invalid_domain",
        "empty_batch",
        "batch_too_large",
        "too_large",
    ];
    for reason in reasons {
        let series = format!("catchall_rejections_total{{reason=\"{reason}\"}}");
        let expected = if reason == "invalid_domain" {
            2 * rounds
        } else {
            rounds
        };
        assert_eq!(worker.metric(&series).await, expected as f64, "{series}");
    }
    assert_eq!(
        worker
            .metric("catchall_messages_total{outcome=\"rejected\"}")
            .await,
        dead as f64
    );

    // The worker keeps running: it is ready and counts what comes next.
    worker.ready().await;
    publish_raw(
        &channel,
        &broker.exchange,
        "delivered",
        br#"{"domain":"after.example","type":"delivered"}"#,
        None,
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "an event after the poison",
        || async {
            db.counts()
                .await
                .contains_key("after.example")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        broker.depth(&broker.dead_queue()).await,
        dead,
        "dead-letter queue unchanged"
    );
    worker.stop().await;
}

/// The queue the worker declares dead-letters a message handed back more often than
/// `DELIVERY_LIMIT` (SPEC §4, "Poison never loops"): here a consumer that requeues it every time,
/// as a worker that crashes on it would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_requeued_past_the_delivery_limit_is_dead_lettered() {
    use lapin::options::{BasicGetOptions, BasicRejectOptions, ConfirmSelectOptions};
    let broker = TestBroker::new();
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    let limit = 2;
    catchall::amqp::Topology::new(&broker.exchange, &broker.queue, limit)
        .declare(&channel)
        .await
        .expect("declare the topology as the worker does");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = br#"{"domain":"limit.example","type":"delivered"}"#;
    publish_raw(
        &channel,
        &broker.exchange,
        "delivered",
        body,
        Some("m-limit"),
    )
    .await;

    // Each poll takes the message if it is back and hands it back again, until it is dead.
    let deliveries = std::sync::atomic::AtomicU32::new(0);
    wait_for(
        Duration::from_secs(20),
        "the message dead-lettered",
        || async {
            let got = channel
                .basic_get(
                    broker.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .expect("basic.get");
            if let Some(message) = got {
                deliveries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                channel
                    .basic_reject(message.delivery_tag, BasicRejectOptions { requeue: true })
                    .await
                    .expect("requeue");
            }
            (broker.depth(&broker.dead_queue()).await == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        deliveries.into_inner(),
        limit + 1,
        "the first delivery and {limit} more"
    );
    let _ = connection.close(200, "".into()).await;
}
