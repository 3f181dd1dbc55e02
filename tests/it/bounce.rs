//! Bounce evidence (SPEC §3): only bounces proving the recipient does not exist change a status;
//! the others are counted apart. And the migration that adds the counter to a live table.

use crate::helpers::*;
use std::time::Duration;

/// `GET /domains/{domain}` as JSON.
pub async fn status(worker: &TestWorker, domain: &str) -> serde_json::Value {
    let response = reqwest::get(worker.url(&format!("/domains/{domain}")))
        .await
        .expect("GET /domains");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON")
}

/// Sum of every counter, other bounces included.
pub async fn all_events(db: &TestDb) -> i64 {
    let client = db.client().await;
    match client
        .query_one(
            "SELECT COALESCE(sum(delivered + bounced + other_bounced), 0)::int8 FROM domains",
            &[],
        )
        .await
    {
        Ok(row) => row.get(0),
        // Not migrated yet; any other failure fails the test (a 0 could pass a check).
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
        Err(error) => panic!("counting the events: {error}"),
    }
}

fn bounce(
    domain: &str,
    code: Option<&str>,
    smtp: Option<u16>,
    text: Option<&str>,
) -> serde_json::Value {
    let mut event = serde_json::json!({"domain": domain, "type": "bounced"});
    if let Some(code) = code {
        event["code"] = code.into();
    }
    if let Some(smtp) = smtp {
        event["smtp_code"] = smtp.into();
    }
    if let Some(text) = text {
        event["diagnostic"] = text.into();
    }
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_recipient_unknown_bounces_make_a_domain_not_catch_all() {
    let (db, broker, worker) = started().await;
    let (_connection, channel) = broker.channel().await;
    let domains = [
        "full.example",
        "unknown.example",
        "plain550.example",
        "spam.example",
        "old.example",
    ];
    let mut events = Vec::new();
    for domain in domains {
        for _ in 0..2000 {
            events.push(serde_json::json!({"domain": domain, "type": "delivered"}));
        }
        for _ in 0..5 {
            events.push(bounce(
                domain,
                Some("5.2.2"),
                Some(552),
                Some("Mailbox full"),
            ));
        }
    }
    events.push(bounce(
        "unknown.example",
        Some("5.1.1"),
        Some(550),
        Some("No such user"),
    ));
    events.push(bounce(
        "plain550.example",
        None,
        Some(550),
        Some("User unknown"),
    ));
    events.push(bounce(
        "spam.example",
        Some("5.7.1"),
        Some(554),
        Some("Message rejected as spam"),
    ));
    // The original wire format: a bounce without evidence still counts as proof.
    events.push(serde_json::json!({"domain": "old.example", "type": "bounced"}));
    let total = events.len() as i64;
    for chunk in events.chunks(5000) {
        publish_raw(
            &channel,
            &broker.exchange,
            "batch",
            &serde_json::to_vec(chunk).unwrap(),
            None,
        )
        .await;
    }
    wait_for(
        Duration::from_secs(30),
        "every event to be counted",
        || async { (all_events(&db).await == total).then_some(()) },
    )
    .await;
    // The metrics follow the commit: wait for the last batch to reach them too.
    wait_for(
        Duration::from_secs(10),
        "every event in the batch metrics",
        || async {
            (worker.try_metric("catchall_batch_events_sum").await == Some(total as f64))
                .then_some(())
        },
    )
    .await;

    let want = [
        ("full.example", "catch-all", 0, 5),
        ("unknown.example", "not catch-all", 1, 5),
        ("plain550.example", "not catch-all", 1, 5),
        ("spam.example", "catch-all", 0, 6),
        ("old.example", "not catch-all", 1, 5),
    ];
    for (domain, verdict, bounced, other) in want {
        assert_eq!(
            status(&worker, domain).await,
            serde_json::json!({"domain": domain, "status": verdict, "delivered": 2000,
                "bounced": bounced, "other_bounced": other}),
            "{domain}"
        );
    }
    assert_eq!(
        worker
            .metric("catchall_events_total{type=\"other_bounced\"}")
            .await,
        26.0
    );
    assert_eq!(
        worker
            .metric("catchall_events_total{type=\"bounced\"}")
            .await,
        3.0
    );
    // The batch-size histogram counts every event of a batch, the other bounces included.
    assert_eq!(
        worker.metric("catchall_batch_events_sum").await,
        total as f64
    );
    worker.stop().await;
}

/// V4 adds `other_bounced` to a table that already holds counters without rewriting it (the
/// table's file node stays the same) and keeps every row's counts, reading 0 other bounces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_bounced_migration_does_not_rewrite_the_table() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(include_str!("../../migrations/V1__domains.sql"))
        .await
        .expect("V1");
    client
        .batch_execute(
            "INSERT INTO domains (domain, delivered, bounced) \
             SELECT 'd' || i || '.example', i, i % 2 FROM generate_series(1, 10000) i",
        )
        .await
        .expect("fill the table");
    let file_node = "SELECT pg_relation_filenode('domains')::int8";
    let before: i64 = client.query_one(file_node, &[]).await.unwrap().get(0);
    client
        .batch_execute(include_str!("../../migrations/V4__other_bounced.sql"))
        .await
        .expect("V4");
    let after: i64 = client.query_one(file_node, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "the table was rewritten");
    let row = client
        .query_one(
            "SELECT count(*), sum(delivered)::int8, sum(bounced)::int8, sum(other_bounced)::int8 FROM domains",
            &[],
        )
        .await
        .unwrap();
    let sums: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(sums, (10_000, 50_005_000, 5_000, 0));
    let negative = client
        .execute(
            "UPDATE domains SET other_bounced = -1 WHERE domain = 'd1.example'",
            &[],
        )
        .await;
    assert!(negative.is_err(), "the CHECK holds for new values");
}
