//! The producer's retries: a nack waits before the message goes out again, and giving up still
//! writes the `--expect` CSV of what was confirmed.

use crate::helpers::*;
use crate::proxy::Proxy;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_is_retried_with_backoff() {
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    // A queue that refuses every message: the broker nacks each publish.
    let full = format!("{}.full", broker.queue);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare the full queue");
    channel
        .queue_bind(
            full.as_str().into(),
            broker.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the full queue");
    let started = Instant::now();
    let output = tokio::process::Command::new(binary("catchall-producer"))
        .envs(broker.env())
        .args(["send", "a.example", "delivered", "--max-attempts", "4"])
        .output()
        .await
        .expect("run the producer");
    let took = started.elapsed();
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
    assert!(
        !output.status.success(),
        "nacked 4 times: the producer fails"
    );
    // Three waits between four attempts: at least 100 + 200 + 400 ms.
    assert!(
        took >= Duration::from_millis(700),
        "the retries were spaced by a backoff, not burnt at once ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_still_writes_what_was_confirmed() {
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let expect = std::env::temp_dir().join(format!("catchall-expect-{}.csv", uuid::Uuid::now_v7()));
    let mut env = broker.env();
    env.push(("AMQP_URL", format!("amqp://guest:guest@{}/%2f", proxy.addr)));
    let child = tokio::process::Command::new(binary("catchall-producer"))
        .envs(env)
        .args(["--give-up-after", "1s", "--confirm-timeout", "1s"])
        .args([
            "generate", "--events", "1000000", "--rate", "5000", "--seed", "8",
        ])
        .arg("--expect")
        .arg(&expect)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the producer");
    wait_for(Duration::from_secs(30), "some events confirmed", || async {
        (broker.depth(&broker.queue).await >= 1000).then_some(())
    })
    .await;
    proxy.cut();
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the producer gives up within a minute")
        .expect("wait for the producer");
    assert!(!output.status.success(), "giving up is a failure");
    let confirmed: i64 = read_expect(&expect).values().map(|(d, b)| d + b).sum();
    let _ = std::fs::remove_file(&expect);
    let queued = i64::from(broker.depth(&broker.queue).await);
    eprintln!(
        "{}; {confirmed} events in the CSV, {queued} messages queued",
        String::from_utf8_lossy(&output.stdout).trim()
    );
    assert!(confirmed >= 1000, "the CSV holds what was confirmed");
    assert!(confirmed <= queued, "only what the broker took");
}
