//! Any message the broker accepts is handled (SPEC §3): properties and headers of every AMQP
//! type, short strings that are not UTF-8 anywhere, published as raw frames. The worker counts
//! each valid body, keeps its connection, stays ready, and deduplicates by the id's bytes.

use crate::helpers::*;
use crate::rawamqp::{Properties, RawPublisher, Table, array, long_value, value};
use std::time::Duration;

/// Not UTF-8: `ff fe` then "abc" (the id of the issue's report).
const NOT_UTF8: &[u8] = b"\xff\xfeabc";

fn long_not_utf8() -> Vec<u8> {
    // 255 invalid bytes: the lossy text (3 bytes each) is longer than any short string.
    vec![0xff; 255]
}

/// Headers with every field type RabbitMQ accepts, keys that are not UTF-8, nested. (RabbitMQ
/// itself refuses NaN and infinite floats: the connection closes with INTERNAL_ERROR.)
fn every_type() -> Table {
    let nested = Table::default()
        .field(NOT_UTF8, &value(b'V', &[]))
        .field(b"inner", &long_value(b'S', NOT_UTF8));
    Table::default()
        .field(b"bool", &value(b't', &[1]))
        .field(b"i8", &value(b'b', &[0x80]))
        .field(b"u8", &value(b'B', &[0xff]))
        .field(b"i16", &value(b's', &(-2i16).to_be_bytes()))
        .field(b"u16", &value(b'u', &u16::MAX.to_be_bytes()))
        .field(b"i32", &value(b'I', &i32::MIN.to_be_bytes()))
        .field(b"u32", &value(b'i', &u32::MAX.to_be_bytes()))
        .field(b"i64", &value(b'l', &i64::MIN.to_be_bytes()))
        .field(b"f32", &value(b'f', &f32::MIN_POSITIVE.to_be_bytes()))
        .field(b"f64", &value(b'd', &f64::MAX.to_be_bytes()))
        .field(b"decimal", &value(b'D', &[255, 0xff, 0xff, 0xff, 0xff]))
        .field(b"timestamp", &value(b'T', &u64::MAX.to_be_bytes()))
        .field(b"void", &value(b'V', &[]))
        .field(b"long string", &long_value(b'S', NOT_UTF8))
        .field(b"bytes", &long_value(b'x', &[0, 0xff, 0xfe, 0]))
        .field(
            b"array",
            &array(&[
                long_value(b'S', NOT_UTF8),
                value(b'V', &[]),
                value(b'D', &[2, 0, 0, 1, 0]),
                nested.as_value(),
                array(&[value(b'T', &0u64.to_be_bytes())]),
            ]),
        )
        .field(b"table", &nested.as_value())
        .field(NOT_UTF8, &long_value(b'S', b"value"))
        .field(&long_not_utf8(), &value(b'V', &[]))
}

/// One message per kind of odd property, named for the report.
pub fn odd_messages() -> Vec<(&'static str, Vec<u8>, Properties)> {
    let odd = NOT_UTF8.to_vec();
    let routing = b"delivered".to_vec();
    let mut all = Properties {
        content_type: Some(long_not_utf8()),
        content_encoding: Some(odd.clone()),
        headers: Some(every_type()),
        delivery_mode: Some(2),
        priority: Some(255),
        correlation_id: Some(long_not_utf8()),
        reply_to: Some(odd.clone()),
        message_id: Some(long_not_utf8()),
        timestamp: Some(u64::MAX),
        kind: Some(long_not_utf8()),
        app_id: Some(long_not_utf8()),
    };
    let one = |set: &dyn Fn(&mut Properties)| {
        let mut p = Properties::default();
        set(&mut p);
        p
    };
    let cases = vec![
        (
            "message_id",
            routing.clone(),
            one(&|p| p.message_id = Some(odd.clone())),
        ),
        (
            "correlation_id",
            routing.clone(),
            one(&|p| p.correlation_id = Some(odd.clone())),
        ),
        (
            "type",
            routing.clone(),
            one(&|p| p.kind = Some(odd.clone())),
        ),
        (
            "app_id",
            routing.clone(),
            one(&|p| p.app_id = Some(odd.clone())),
        ),
        (
            "content_type",
            routing.clone(),
            one(&|p| p.content_type = Some(odd.clone())),
        ),
        (
            "content_encoding",
            routing.clone(),
            one(&|p| p.content_encoding = Some(odd.clone())),
        ),
        (
            "reply_to",
            routing.clone(),
            one(&|p| p.reply_to = Some(odd.clone())),
        ),
        (
            "header key",
            routing.clone(),
            one(&|p| p.headers = Some(Table::default().field(NOT_UTF8, &value(b'V', &[])))),
        ),
        (
            "nested table key",
            routing.clone(),
            one(&|p| {
                let nested = Table::default().field(NOT_UTF8, &value(b't', &[0]));
                p.headers = Some(Table::default().field(b"n", &nested.as_value()))
            }),
        ),
        (
            "array of tables",
            routing.clone(),
            one(&|p| {
                let nested = Table::default().field(NOT_UTF8, &long_value(b'x', NOT_UTF8));
                p.headers = Some(Table::default().field(b"a", &array(&[nested.as_value()])))
            }),
        ),
        (
            "every field type",
            routing.clone(),
            one(&|p| p.headers = Some(every_type())),
        ),
        ("routing key", odd.clone(), Properties::default()),
        ("all at once, 255 invalid bytes each", long_not_utf8(), {
            all.delivery_mode = Some(2);
            all
        }),
    ];
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_odd_properties_are_counted_and_the_connection_stays() {
    let (db, broker, worker) = started().await;
    let mut raw = RawPublisher::connect().await;
    let cases = odd_messages();
    let mut expected = Counts::new();
    for (i, (what, routing_key, properties)) in cases.iter().enumerate() {
        let domain = format!("odd-{i}.example");
        eprintln!("publishing {domain}: {what}");
        let body = format!(r#"{{"domain":"{domain}","type":"delivered"}}"#);
        raw.publish(&broker.exchange, routing_key, properties, body.as_bytes())
            .await;
        expected.insert(domain, (1, 0));
    }
    raw.close().await;
    // Valid traffic behind them, as in the report (one stuck message stopped all of it).
    let (_connection, channel) = broker.channel().await;
    for i in 0..200 {
        let body = format!(
            r#"{{"domain":"after-{}.example","type":"delivered"}}"#,
            i % 10
        );
        publish_raw(
            &channel,
            &broker.exchange,
            "delivered",
            body.as_bytes(),
            None,
        )
        .await;
        expected
            .entry(format!("after-{}.example", i % 10))
            .or_default()
            .0 += 1;
    }
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    assert_eq!(
        worker.metric("catchall_broker_reconnects_total").await,
        0.0,
        "no property made the worker lose its connection"
    );
    assert_eq!(
        broker.depth(&broker.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    worker.ready().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_are_compared_as_bytes() {
    let (db, broker, worker) = started().await;
    let mut raw = RawPublisher::connect().await;
    let with_id = |id: &[u8]| Properties {
        message_id: Some(id.to_vec()),
        delivery_mode: Some(2),
        ..Properties::default()
    };
    let same_lossy = b"\xfe\xffabc"; // decodes lossily to the same text as NOT_UTF8
    let nul = b"a\0b";
    let sends: [(&[u8], &str); 6] = [
        (NOT_UTF8, "x.example"),
        (NOT_UTF8, "x.example"),   // same bytes: a duplicate
        (same_lossy, "x.example"), // other bytes: counted
        (nul, "y.example"),
        (nul, "y.example"), // a duplicate
        (&long_not_utf8(), "z.example"),
    ];
    for (id, domain) in sends {
        let body = format!(r#"{{"domain":"{domain}","type":"delivered"}}"#);
        raw.publish(
            &broker.exchange,
            b"delivered",
            &with_id(id),
            body.as_bytes(),
        )
        .await;
    }
    raw.close().await;
    wait_for(
        Duration::from_secs(30),
        "two duplicates skipped",
        || async {
            (worker
                .metric("catchall_messages_total{outcome=\"duplicate\"}")
                .await
                == 2.0)
                .then_some(())
        },
    )
    .await;
    let expected: Counts = [
        ("x.example".to_string(), (2, 0)),
        ("y.example".to_string(), (1, 0)),
        ("z.example".to_string(), (1, 0)),
    ]
    .into();
    assert_counts_eventually(&db, &expected, Duration::from_secs(10)).await;
    let stored: Vec<Vec<u8>> = db
        .client()
        .await
        .query("SELECT message_id FROM applied_messages ORDER BY 1", &[])
        .await
        .expect("read applied ids")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut want: Vec<Vec<u8>> = vec![
        NOT_UTF8.to_vec(),
        same_lossy.to_vec(),
        nul.to_vec(),
        long_not_utf8(),
    ];
    want.sort();
    assert_eq!(stored, want, "the exact bytes are recorded");
    worker.stop().await;
}

/// A header value nested `depth` arrays deep (`A[A[…A[]…]]`), 5 bytes a level.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 * depth);
    for level in (1..=depth).rev() {
        out.push(b'A');
        out.extend((5 * (level - 1) as u32).to_be_bytes());
    }
    out
}

/// A header nested 20,000 arrays deep (RabbitMQ takes it; 100 KB, within its frame size) is a
/// message like any other: counted, the connection kept. The header's parse recursed once per
/// level and overflowed the stack of lapin's I/O thread, which aborted the worker's process,
/// again at each redelivery (vendor/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_header_is_handled_and_the_worker_stays() {
    let (db, broker, worker) = started().await;
    let mut raw = RawPublisher::connect().await;
    let properties = Properties {
        headers: Some(Table::default().field(b"deep", &nested_arrays(20_000))),
        ..Properties::default()
    };
    raw.publish(
        &broker.exchange,
        b"delivered",
        &properties,
        br#"{"domain":"deep.example","type":"delivered"}"#,
    )
    .await;
    raw.close().await;
    let (_connection, channel) = broker.channel().await;
    publish_raw(
        &channel,
        &broker.exchange,
        "delivered",
        br#"{"domain":"after-deep.example","type":"delivered"}"#,
        None,
    )
    .await;
    let mut expected = Counts::new();
    expected.insert("deep.example".into(), (1, 0));
    expected.insert("after-deep.example".into(), (1, 0));
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    assert_eq!(
        worker.metric("catchall_broker_reconnects_total").await,
        0.0,
        "the header did not make the worker lose its connection"
    );
    assert_eq!(
        broker.depth(&broker.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    worker.ready().await;
    worker.stop().await;
}
