//! HTTP ingest (SPEC §5): the assignment's and the seed's routes, 202 only after the broker's
//! confirm, 503 when the broker is unreachable, idempotency keys, tokens, and 4xx JSON for bad
//! input; and the server's own protection (half-sent requests, the concurrency cap).

use crate::helpers::*;
use crate::proxy::Proxy;
use catchall::config::Config;
use catchall::event::Event;
use futures_util::StreamExt;
use reqwest::StatusCode;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The assignment generator's stream, exactly as the producer makes it.
#[allow(dead_code)]
#[path = "../../producer/src/generate.rs"]
mod generate;

pub const TOKEN: &str = "ingest-token-7f3a";

/// A worker with HTTP ingest on (token [`TOKEN`]), after `configure` adjusted its settings.
pub async fn ingest_worker(
    configure: impl FnOnce(&mut Config),
) -> (TestDb, TestBroker, TestWorker) {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.ingest_tokens = Some(TOKEN.parse().unwrap());
    configure(&mut config);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    (db, broker, worker)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `PUT` one event on the assignment's (`/events/…`) or the seed's (`/v1/events/…`) spelling.
async fn put_event(
    client: &reqwest::Client,
    worker: &TestWorker,
    event: &Event,
    seed_spelling: bool,
) -> reqwest::Result<reqwest::Response> {
    let prefix = if seed_spelling {
        "/v1/events"
    } else {
        "/events"
    };
    client
        .put(worker.url(&format!("{prefix}/{}/{}", event.domain, event.kind)))
        .bearer_auth(TOKEN)
        .send()
        .await
}

fn tally(events: &[Event]) -> Counts {
    let mut counts = Counts::new();
    for event in events {
        let entry = counts.entry(event.domain.clone()).or_default();
        match event.kind {
            catchall::event::EventType::Delivered => entry.0 += 1,
            catchall::event::EventType::Bounced => entry.1 += 1,
        }
    }
    counts
}

/// Asserts an answer is JSON `{"error": …}` with a 4xx code, and returns its message.
async fn assert_json_4xx(response: reqwest::Response, what: &str) -> (StatusCode, String) {
    let status = response.status();
    assert!(status.is_client_error(), "{what}: {status}");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: content-type {content_type:?}"
    );
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error field in {body}"))
        .to_string();
    (status, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_load_shape_over_http_is_counted_exactly() {
    let (db, _broker, worker) = ingest_worker(|_| {}).await;
    let events: Vec<Event> = generate::Generator::new(10).take(12_000).collect();
    let expected = tally(&events);
    let client = client();
    let started = std::time::Instant::now();
    // 128 clients at once, alternating the assignment's and the seed's spelling.
    let codes: Vec<StatusCode> = futures_util::stream::iter(events.iter().enumerate())
        .map(|(i, event)| {
            let (client, worker) = (&client, &worker);
            async move {
                put_event(client, worker, event, i % 2 == 1)
                    .await
                    .expect("PUT answered")
                    .status()
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let elapsed = started.elapsed();
    assert!(
        codes.iter().all(|c| *c == StatusCode::ACCEPTED),
        "every PUT accepted: {:?}",
        codes
            .iter()
            .filter(|c| **c != StatusCode::ACCEPTED)
            .take(5)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "{} PUTs from 128 clients in {elapsed:?} ({:.0}/s)",
        events.len(),
        events.len() as f64 / elapsed.as_secs_f64()
    );
    assert_counts_eventually(&db, &expected, Duration::from_secs(60)).await;
    // Packed behind the scenes: far fewer messages than PUTs.
    let messages = worker
        .metric("catchall_messages_total{outcome=\"applied\"}")
        .await;
    eprintln!("{} PUTs arrived in {messages} messages", events.len());
    assert!(messages > 0.0 && messages < events.len() as f64);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_mid_run_gives_503_and_loses_no_accepted_event() {
    let proxy = Arc::new(Proxy::start("127.0.0.1:5672").await);
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let (db, _broker, worker) = ingest_worker(|config| config.amqp.amqp_url = url).await;
    let events: Vec<Event> = generate::Generator::new(11).take(6_000).collect();
    let client = client();
    let accepted_count = AtomicUsize::new(0);
    let unavailable_count = AtomicUsize::new(0);
    let cut = AtomicBool::new(false);
    // Cut the broker off once 2,000 events are accepted; restore it after 300 answers of 503.
    let outcomes: Vec<(usize, StatusCode)> = futures_util::stream::iter(events.iter().enumerate())
        .map(|(i, event)| {
            let (client, worker, proxy) = (&client, &worker, &proxy);
            let (accepted_count, unavailable_count, cut) =
                (&accepted_count, &unavailable_count, &cut);
            async move {
                if accepted_count.load(Ordering::SeqCst) >= 2_000
                    && !cut.swap(true, Ordering::SeqCst)
                {
                    proxy.cut();
                }
                let status = put_event(client, worker, event, i % 2 == 0)
                    .await
                    .expect("PUT answered")
                    .status();
                if status == StatusCode::ACCEPTED {
                    accepted_count.fetch_add(1, Ordering::SeqCst);
                } else if status == StatusCode::SERVICE_UNAVAILABLE
                    && unavailable_count.fetch_add(1, Ordering::SeqCst) + 1 == 300
                {
                    proxy.restore();
                }
                (i, status)
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    proxy.restore();

    let unavailable = outcomes
        .iter()
        .filter(|(_, s)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let others: Vec<_> = outcomes
        .iter()
        .filter(|(_, s)| *s != StatusCode::SERVICE_UNAVAILABLE && *s != StatusCode::ACCEPTED)
        .collect();
    assert!(others.is_empty(), "only 202 or 503: {others:?}");
    assert!(unavailable > 0, "the cut produced 503s");
    let accepted: Vec<Event> = outcomes
        .iter()
        .filter(|(_, s)| *s == StatusCode::ACCEPTED)
        .map(|(i, _)| events[*i].clone())
        .collect();
    eprintln!(
        "{} accepted, {unavailable} answered 503 of {}",
        accepted.len(),
        events.len()
    );
    assert!(accepted.len() >= 2_000, "accepted before the cut");

    // The publisher reconnects once the broker is back: a PUT is accepted again.
    let sentinel = Event::new(
        "after-restore.example",
        catchall::event::EventType::Delivered,
    )
    .unwrap();
    let attempts = AtomicUsize::new(0);
    wait_for(
        Duration::from_secs(30),
        "ingest to accept again",
        || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            let status = put_event(&client, &worker, &sentinel, false)
                .await
                .expect("PUT answered")
                .status();
            (status == StatusCode::ACCEPTED).then_some(())
        },
    )
    .await;

    // Every accepted event is counted; nothing is counted that was not sent (a 503 may still have
    // reached the broker: its confirm was lost with the connection, so it may count).
    let mut must = tally(&accepted);
    must.insert(sentinel.domain.clone(), (1, 0));
    let mut may = tally(&events);
    may.insert(
        sentinel.domain.clone(),
        (attempts.load(Ordering::SeqCst) as i64, 0),
    );
    let counts = wait_for(
        Duration::from_secs(90),
        "every accepted event to be counted",
        || async {
            let counts = db.counts().await;
            must.iter()
                .all(|(domain, (d, b))| {
                    let (cd, cb) = counts.get(domain).copied().unwrap_or_default();
                    cd >= *d && cb >= *b
                })
                .then_some(counts)
        },
    )
    .await;
    for (domain, (d, b)) in &counts {
        let (md, mb) = may.get(domain).copied().unwrap_or_default();
        assert!(*d <= md && *b <= mb, "{domain} counted more than was sent");
    }
    // The publisher's outcomes are counted: the 503s came from failed publishes.
    let outcome = |name: &str| format!("catchall_ingest_publishes_total{{outcome=\"{name}\"}}");
    assert!(worker.metric(&outcome("acked")).await > 0.0);
    let mut failed = 0.0;
    for name in [
        "unavailable",
        "publish_timeout",
        "confirm_timeout",
        "nacked",
    ] {
        failed += worker.metric(&outcome(name)).await;
    }
    assert!(
        failed > 0.0,
        "no failed publish counted for {unavailable} answers of 503"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_idempotency_key_is_counted_once() {
    let (db, _broker, worker) = ingest_worker(|_| {}).await;
    let client = client();
    for _ in 0..3 {
        for (path, key) in [
            ("/events/keyed.example/delivered", "put-key-1"),
            ("/v1/events/keyed.example/bounced", "put-key-2"),
        ] {
            let response = client
                .put(worker.url(path))
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", key)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::ACCEPTED);
        }
        let response = client
            .post(worker.url("/events"))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", "post-key-1")
            .body("{\"domain\":\"bulk.example\",\"type\":\"delivered\"}\n{\"domain\":\"Bulk.Example.\",\"type\":\"delivered\"}\n")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["accepted"], 2);
    }
    // Unkeyed PUTs count every time.
    for _ in 0..3 {
        let response = client
            .put(worker.url("/events/unkeyed.example/delivered"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let expected: Counts = [
        ("keyed.example".to_string(), (1, 1)),
        ("bulk.example".to_string(), (2, 0)),
        ("unkeyed.example".to_string(), (3, 0)),
    ]
    .into();
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    // A later event is counted, and the retries still have not been.
    let response = client
        .put(worker.url("/events/sentinel.example/delivered"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let mut with_sentinel = expected.clone();
    with_sentinel.insert("sentinel.example".into(), (1, 0));
    assert_counts_eventually(&db, &with_sentinel, Duration::from_secs(30)).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_bodies_and_tokens_get_4xx_json_and_publish_nothing() {
    let (db, _broker, worker) = ingest_worker(|_| {}).await;
    let client = client();
    let put = |path: &str| client.put(worker.url(path)).bearer_auth(TOKEN);
    let post = |body: Vec<u8>| {
        client
            .post(worker.url("/events"))
            .bearer_auth(TOKEN)
            .body(body)
    };

    // Tokens: missing, wrong, wrong scheme; the answer never echoes what was sent.
    for (what, request) in [
        (
            "no token",
            client.put(worker.url("/events/a.example/delivered")),
        ),
        (
            "wrong token",
            client
                .put(worker.url("/events/a.example/delivered"))
                .bearer_auth("guessed-secret-value"),
        ),
        (
            "basic auth",
            client
                .put(worker.url("/events/a.example/delivered"))
                .basic_auth("user", Some(TOKEN)),
        ),
        (
            "POST without token",
            client.post(worker.url("/events")).body("[]"),
        ),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
        let (status, message) = assert_json_4xx(response, what).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert!(
            !message.contains("guessed") && !message.contains(TOKEN),
            "{what}: {message}"
        );
    }

    // Bad paths and headers.
    for (what, request, want) in [
        (
            "bad type",
            put("/events/a.example/opened"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad domain",
            put("/events/a..example/delivered"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad domain, seed spelling",
            put("/v1/events/exa_mple.com/bounced"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "sql in domain",
            put("/events/a.com';DROP TABLE domains;--/delivered"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "too few segments",
            put("/events/a.example"),
            StatusCode::NOT_FOUND,
        ),
        (
            "too many segments",
            put("/events/a.example/delivered/x"),
            StatusCode::NOT_FOUND,
        ),
        (
            "GET on ingest",
            client.get(worker.url("/events/a.example/delivered")),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "bad idempotency key",
            put("/events/a.example/delivered").header("Idempotency-Key", "has space"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "long idempotency key",
            put("/events/a.example/delivered").header("Idempotency-Key", "k".repeat(256)),
            StatusCode::BAD_REQUEST,
        ),
        (
            "300-byte idempotency key",
            put("/events/a.example/delivered").header("Idempotency-Key", "k".repeat(300)),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a webhook's message id as the key",
            put("/events/a.example/delivered").header("Idempotency-Key", "sendgrid:abc123"),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, message) = assert_json_4xx(request.send().await.unwrap(), what).await;
        assert_eq!(status, want, "{what}: {message}");
    }

    // A request head past 64 KiB is refused (431, by hyper), not buffered.
    let response = put("/events/a.example/delivered")
        .header("X-Padding", "p".repeat(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    // Bad bodies: the first bad event is named, and nothing of the request is published.
    let good = r#"{"domain":"good.example","type":"delivered"}"#;
    let too_many = format!("[{}]", vec![good; 10_001].join(","));
    let too_large = vec![b' '; 1024 * 1024 + 1];
    for (what, body, want_status, want_text) in [
        ("empty", String::new(), 400, "empty"),
        (
            "NDJSON line 3",
            format!("{good}\n{good}\n{{\"domain\":\"x..y\",\"type\":\"delivered\"}}\n"),
            400,
            "line 3",
        ),
        (
            "NDJSON bad type",
            format!("{good}\n\n{{\"domain\":\"a.example\",\"type\":\"open\"}}"),
            400,
            "line 3",
        ),
        (
            "NDJSON not JSON",
            format!("{good}\nnot json\n"),
            400,
            "line 2",
        ),
        (
            "array event 2",
            format!("[{good},{{\"domain\":\"\",\"type\":\"bounced\"}}]"),
            400,
            "event 2",
        ),
        ("array of numbers", "[1,2]".to_string(), 400, "event 1"),
        ("unclosed array", format!("[{good}"), 400, "JSON"),
        ("empty array", "[]".to_string(), 400, "no events"),
        ("too many", too_many, 400, "10000"),
    ] {
        let (status, message) =
            assert_json_4xx(post(body.into_bytes()).send().await.unwrap(), what).await;
        assert_eq!(status.as_u16(), want_status, "{what}: {message}");
        assert!(message.contains(want_text), "{what}: {message}");
    }
    let (status, message) =
        assert_json_4xx(post(vec![0xff, 0xfe]).send().await.unwrap(), "not UTF-8").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "not UTF-8: {message}");
    assert!(message.contains("UTF-8"), "not UTF-8: {message}");
    let (status, _) = assert_json_4xx(post(too_large).send().await.unwrap(), "too large").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Nothing above was published: a good request is the only thing counted.
    let response = post(format!("[{good},{good}]").into_bytes())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let expected: Counts = [("good.example".to_string(), (2, 0))].into();
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    // A refused body that was published anyway would have been dead-lettered (not counted)
    // before the good one was counted.
    assert_eq!(worker.stats().rejected, 0, "nothing was dead-lettered");
    worker.stop().await;
}

/// IDN domains grow when normalised (`ü` → `xn--tda`): a body under the 1 MiB request limit can
/// serialise past the worker's 1 MiB message limit. It is refused with 413 naming the limit and
/// never published (a 202 would be dead-lettered by the worker as too large: events lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_grows_past_the_message_limit_gets_413_and_publishes_nothing() {
    let (db, _broker, worker) = ingest_worker(|_| {}).await;
    let client = client();
    let idn = vec!["ü"; 31].join(".");
    let line = format!("{{\"domain\":\"{idn}\",\"type\":\"delivered\"}}\n");
    let body = line.repeat(5_000);
    assert!(body.len() < 1024 * 1024, "raw body {} bytes", body.len());
    let response = client
        .post(worker.url("/events"))
        .bearer_auth(TOKEN)
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, message) = assert_json_4xx(response, "grown past the limit").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{message}");
    assert!(message.contains("1048576"), "{message}");

    // Nothing of it was published: a good request afterwards is the only thing counted.
    let good = r#"{"domain":"good.example","type":"delivered"}"#;
    let response = client
        .post(worker.url("/events"))
        .bearer_auth(TOKEN)
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let expected: Counts = [("good.example".to_string(), (1, 0))].into();
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    assert_eq!(worker.stats().rejected, 0, "nothing was dead-lettered");
    worker.stop().await;
}

/// A packed single event whose caller went away before the pack was published (client gone,
/// or answered 408) is left out of the pack: it got no 202, so it must not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_event_whose_caller_left_is_not_published() {
    let (db, _broker, worker) = ingest_worker(|config| {
        config.ingest_pack_window_ms = 1500;
    })
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = impatient
        .put(worker.url("/events/gone.example/delivered"))
        .bearer_auth(TOKEN)
        .send()
        .await;
    assert!(
        gone.as_ref().is_err_and(|e| e.is_timeout()),
        "the caller gave up before the pack went out: {gone:?}"
    );
    // Still in the same pack's window: published with it, answered after its confirm.
    let response = client()
        .put(worker.url("/events/stayed.example/delivered"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let expected: Counts = [("stayed.example".to_string(), (1, 0))].into();
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_is_off_without_tokens() {
    let (_db, _broker, worker) = started().await;
    let client = client();
    for request in [
        client
            .put(worker.url("/events/a.example/delivered"))
            .bearer_auth(TOKEN),
        client.put(worker.url("/v1/events/a.example/bounced")),
        client.post(worker.url("/events")).body("[]"),
    ] {
        let (status, _) = assert_json_4xx(request.send().await.unwrap(), "ingest off").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // The seed's look-up spelling works without ingest.
    let response = client
        .get(worker.url("/v1/domain/Example.COM"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["domain"], "example.com");
    worker.stop().await;

    // An empty list (`INGEST_TOKENS=` in an env file) is no token: ingest stays off.
    let (_db, _broker, worker) =
        ingest_worker(|config| config.ingest_tokens = Some(" , ".parse().unwrap())).await;
    let response = client
        .put(worker.url("/events/a.example/delivered"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    let (status, _) = assert_json_4xx(response, "empty token list").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    worker.stop().await;
}

/// Opens a connection and sends half a request line, never finishing it.
async fn half_sent(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /domains/exam")
        .await
        .expect("send half a request line");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_while_lookups_and_ingest_answer() {
    let (_db, _broker, worker) = ingest_worker(|config| {
        config.http_header_timeout = Duration::from_secs(2);
    })
    .await;
    let mut streams = Vec::with_capacity(2_000);
    for _ in 0..2_000 {
        streams.push(half_sent(worker.addr).await);
    }
    let opened = std::time::Instant::now();
    // Meanwhile the server answers.
    let client = client();
    let lookup = client
        .get(worker.url("/domains/example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), StatusCode::OK);
    let put = client
        .put(worker.url("/events/example.com/delivered"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::ACCEPTED);
    // Every half-sent connection is closed by the server within the timeout (and a margin).
    let closed = futures_util::stream::iter(streams)
        .map(|mut stream| async move {
            let mut buf = [0u8; 1024];
            loop {
                match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => continue, // an error answer before the close is fine
                    Err(_) => return false,
                }
            }
        })
        .buffer_unordered(2_000)
        .filter(|closed| std::future::ready(*closed))
        .count()
        .await;
    eprintln!(
        "{closed} half-sent connections closed after {:?}",
        opened.elapsed()
    );
    assert_eq!(closed, 2_000, "every half-sent connection closed");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_concurrency_cap_gets_503_and_slow_requests_408() {
    let (_db, _broker, worker) = ingest_worker(|config| {
        config.http_max_concurrency = 4;
        // Long enough that the slow requests surely hold their slots through the flood below,
        // on a loaded machine too.
        config.http_request_timeout = Duration::from_secs(12);
    })
    .await;
    // Four requests that hold their slot: headers sent, body promised but never sent.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(worker.addr).await.unwrap();
        stream
            .write_all(
                b"POST /domains/lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"dom",
            )
            .await
            .unwrap();
        slow.push(stream);
    }
    let client = client();
    let url = worker.url("/domains/example.com");
    // The slow requests hold every slot once a single GET is refused. Polled with an invalid
    // domain, which is answered (400) without Postgres while a slot is free: a look-up that
    // took a slot before the slow requests did could take seconds on a loaded machine (it
    // once outlasted the whole wait, in CI).
    let invalid = worker.url("/domains/a..b");
    wait_for(Duration::from_secs(5), "the slots to fill", || async {
        let response = client.get(&invalid).send().await.ok()?;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let answers: Vec<(u16, Option<String>)> = futures_util::stream::iter(0..200)
        .map(|_| async {
            let response = client.get(&url).send().await.unwrap();
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (response.status().as_u16(), retry)
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let mut codes = HashMap::new();
    for (code, retry) in &answers {
        if *code == 503 {
            assert!(retry.is_some(), "503 carries Retry-After");
        }
        *codes.entry(*code).or_insert(0) += 1;
    }
    assert_eq!(
        codes,
        HashMap::from([(503, 200)]),
        "the whole flood refused"
    );
    eprintln!("flood answers: {codes:?}");
    // Probes bypass the cap, so an overloaded worker does not look dead.
    let health = client.get(worker.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    // The slow requests time out with 408, and the slots free up again.
    for mut stream in slow {
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(25), stream.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "slow request: {text}");
        assert!(
            text.contains("{\"error\":\"the request took too long\"}"),
            "the request timeout's 408, as JSON: {text}"
        );
    }
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Both refusals are in the request metrics (the 408s were missing: the timeout dropped the
    // request before the router's metrics saw its answer).
    assert_eq!(
        worker
            .metric("catchall_http_requests_total{route=\"timeout\",code=\"408\"}")
            .await,
        4.0
    );
    assert!(
        worker
            .metric("catchall_http_requests_total{route=\"overloaded\",code=\"503\"}")
            .await
            >= 200.0
    );
    worker.stop().await;
}

/// A cluster `AMQP_URL` whose first node accepts TCP and never answers, and a PUT at once,
/// while the consumer still waits on that node: no node is known good yet, so ingest starts
/// there too, connects past it to the next, and the event is accepted. The whole connection
/// attempt used to share the 5 s confirm timeout, one node's connect timeout, so the silent
/// node used it up, the next was never tried, and every request got 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_connects_past_a_cluster_node_that_never_answers() {
    a_put_is_accepted_with_a_silent_node(false, |silent| {
        format!("amqp://guest:guest@{silent}/%2f,amqp://guest:guest@127.0.0.1:5672/%2f")
    })
    .await;
}

/// Two cluster nodes that accept TCP and never answer, before a live one: the consumer gets
/// to the live node past both, and ingest's connection starts there too. It started after the
/// consumer's node, so every attempt spent its 10 s on the two silent ones (6 s each here) and
/// every request got 503 for as long as the consumer stayed connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_connects_to_the_consumers_node_past_two_silent_ones() {
    a_put_is_accepted_with_a_silent_node(true, |silent| {
        let quiet = format!("amqp://guest:guest@{silent}/%2f?connection_timeout=6000");
        format!("{quiet},{quiet},amqp://guest:guest@127.0.0.1:5672/%2f")
    })
    .await;
}

/// A node that accepts TCP and never answers (its connections held open until the task is
/// aborted): its address and the task.
async fn silent_node() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holding = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    (silent_addr, holding)
}

/// A worker on the cluster `AMQP_URL` that `url` makes of a node that accepts TCP and never
/// answers: one PUT, once the worker is ready or (`ready` false) at once, is answered 202.
async fn a_put_is_accepted_with_a_silent_node(
    ready: bool,
    url: impl FnOnce(std::net::SocketAddr) -> String,
) {
    let (silent_addr, holding) = silent_node().await;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.ingest_tokens = Some(TOKEN.parse().unwrap());
    config.amqp.amqp_url = url(silent_addr);
    let worker = TestWorker::start(config).await;
    if ready {
        worker.ready().await;
    }
    let answer = client()
        .put(worker.url("/events/cluster.example/delivered"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = answer.status();
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        answer.text().await.unwrap()
    );
    holding.abort();
    worker.stop().await;
}

/// A broker that accepts TCP and never answers: one publish's connection attempt takes its
/// connect timeout (4 s here), and the publishes that come meanwhile wait for it a second at most,
/// then fail (503 over HTTP) before it ends. They used to queue behind it for all of it (up to
/// 10 s), and at a few hundred requests a second filled the HTTP concurrency cap, look-ups' share
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_do_not_queue_behind_a_connection_attempt() {
    let (silent_addr, holding) = silent_node().await;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let topology = TestWorker::config(&db, &broker).amqp.topology();
    let url = format!("amqp://guest:guest@{silent_addr}/%2f?connection_timeout=4000");
    let ingest =
        catchall::ingest::Ingest::start(catchall::ingest::IngestSettings::new(&url, topology));
    // Keyed: each its own message, so each asks for the channel itself.
    let mut outcomes: futures_util::stream::FuturesUnordered<_> = (0..20)
        .map(|i| {
            let event = Event::new("queue.example", catchall::event::EventType::Delivered)
                .expect("an event");
            let ingest = ingest.clone();
            async move {
                ingest
                    .publish_one(event, Some(format!("attempt-{i}")))
                    .await
            }
        })
        .collect();
    let mut order = Vec::new();
    while let Some(outcome) = outcomes.next().await {
        order.push(outcome.expect_err("nothing can be confirmed").to_string());
    }
    // The attempt's own failure comes last: every other publish was answered before it ended.
    let waited = order
        .iter()
        .filter(|error| error.contains("another request is connecting to RabbitMQ"))
        .count();
    assert_eq!(waited, 19, "{order:#?}");
    assert!(!order[19].contains("another request"), "{order:#?}");
    holding.abort();
}

/// KumoMTA records over `POST /events` (a KumoMTA webhook pointed at the worker) are read as on
/// the queue (SPEC §3): `Delivery` and `Bounce` counted, every other type acknowledged and
/// counted as ignored. A 400 for them would make KumoMTA retry its `Reception` records forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kumomta_records_over_post_are_counted_or_ignored_as_on_the_queue() {
    use crate::bounce::{all_events, status};
    let (db, broker, worker) = ingest_worker(|_| {}).await;
    let client = client();
    let post = |body: String| {
        client
            .post(worker.url("/events"))
            .bearer_auth(TOKEN)
            .body(body)
            .send()
    };
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kumomta/records.ndjson");
    let ndjson = std::fs::read_to_string(&fixture).expect("the KumoMTA fixture");
    let array = format!("[{}]", ndjson.lines().collect::<Vec<_>>().join(","));
    let reception = ndjson.lines().next().expect("a first record").to_string();
    assert!(reception.contains(r#""type": "Reception""#), "{reception}");
    // 13 records: 4 deliveries, 4 bounces, 5 of other types (tests/fixtures/kumomta/README.md).
    for (what, body, want) in [
        (
            "NDJSON",
            ndjson.clone(),
            serde_json::json!({"accepted": 8, "ignored": 5}),
        ),
        (
            "array",
            array,
            serde_json::json!({"accepted": 8, "ignored": 5}),
        ),
        (
            "only a Reception",
            reception,
            serde_json::json!({"accepted": 0, "ignored": 1}),
        ),
    ] {
        let response = post(body).await.expect("POST answered");
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{what}");
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(body, want, "{what}");
    }
    wait_for(
        Duration::from_secs(30),
        "both passes to be counted",
        || async { (all_events(&db).await == 16).then_some(()) },
    )
    .await;
    assert_eq!(
        worker
            .metric("catchall_records_ignored_total{source=\"kumomta\"}")
            .await,
        11.0
    );
    let want = [
        ("kumo-one.example", "not catch-all", 4, 2, 0),
        ("kumo-two.example", "unknown", 2, 0, 4),
        ("kumo-three.example", "not catch-all", 2, 2, 0),
    ];
    for (domain, verdict, delivered, bounced, other) in want {
        assert_eq!(
            status(&worker, domain).await,
            serde_json::json!({"domain": domain, "status": verdict, "delivered": delivered,
                "bounced": bounced, "other_bounced": other}),
            "{domain}"
        );
    }
    assert_eq!(broker.depth(&broker.dead_queue()).await, 0);
    worker.stop().await;
}

/// Publishes on one channel from many tasks at once, as the ingest's shared channel does: each
/// confirm answers its own message. lapin took a message's delivery tag before copying its body
/// into frames, and queued the frames after, so a small message published meanwhile could go
/// out first under the large one's tag: each got the other's confirm (a request answered 202
/// for a message the broker refused, and the other 503 for one it took).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_on_one_channel_get_their_own_confirms() {
    use lapin::options::{
        BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, LongString};
    const PUBLISHES: usize = 600;
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    // An exchange of its own: key `ok` to a queue that takes everything, `full` to one that
    // refuses everything (the broker nacks those).
    let exchange = format!("{}.confirms", broker.exchange);
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the exchange");
    let (ok, full) = (
        format!("{}.ok", broker.queue),
        format!("{}.full", broker.queue),
    );
    let mut refusing = FieldTable::default();
    refusing.insert("x-max-length".into(), AMQPValue::LongInt(0));
    refusing.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    for (queue, key, args) in [
        (&ok, "ok", FieldTable::default()),
        (&full, "full", refusing),
    ] {
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
            .await
            .expect("declare a queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind a queue");
    }
    let large = vec![b'x'; 512 * 1024];
    let outcomes = futures_util::future::join_all((0..PUBLISHES).map(|i| {
        let (channel, exchange, large) = (channel.clone(), exchange.clone(), large.clone());
        tokio::spawn(async move {
            // Large messages to the queue that takes them, small ones to the one that refuses.
            let (key, body): (&str, &[u8]) = if i % 2 == 0 {
                ("ok", &large)
            } else {
                ("full", b"small")
            };
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    body,
                    lapin::BasicProperties::default(),
                )
                .await
                .expect("publish")
                .await
                .expect("a confirm");
            (key, confirm.is_ack())
        })
    }))
    .await;
    let wrong = outcomes
        .into_iter()
        .map(|outcome| outcome.expect("the publishing task"))
        .filter(|(key, acked)| *acked != (*key == "ok"))
        .count();
    for queue in [&ok, &full] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
    assert_eq!(wrong, 0, "confirms answered another message of {PUBLISHES}");
}

/// A broker that takes publishes but never confirms them, with HTTP_REQUEST_TIMEOUT shorter
/// than ingest's own waits (5 s for the publish, 5 s for its confirm): the request timed out
/// first, 408 "the request took too long", which says nothing of the broker. Ingest's waits now
/// take a third of HTTP_REQUEST_TIMEOUT each at most (1 s here), so it answers itself: 503, not
/// confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_never_comes_is_a_503_within_the_request_timeout() {
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let (_db, _broker, worker) = ingest_worker(|config| {
        config.amqp.amqp_url = url;
        config.http_request_timeout = Duration::from_secs(3);
    })
    .await;
    let client = client();
    let put = || {
        client
            .put(worker.url("/events/confirm.example/delivered"))
            .bearer_auth(TOKEN)
            .send()
    };
    // The ingest connection is open and confirms.
    assert_eq!(put().await.unwrap().status(), StatusCode::ACCEPTED);

    proxy.swallow_replies();
    let response = put().await.expect("PUT answered");
    let status = response.status();
    let body: serde_json::Value = response.json().await.expect("a JSON error");
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "ingest's own answer, not the request's timeout: {body}"
    );
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("did not confirm"), "{body}");
    worker.stop().await;
}

/// A broker that takes publishes and holds their confirms back (as a quorum queue without its
/// majority does): each request stops waiting at its timeout (503), and its confirm is still
/// awaited. Past `INGEST_MAX_UNCONFIRMED` of them, publishes are answered 503 at once, and the
/// room comes back when the connection's end settles them. There was no bound: one waiting
/// confirm (and a task) per request, for as long as clients retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_awaiting_their_confirm_are_bounded() {
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let (_db, _broker, worker) = ingest_worker(|config| {
        config.amqp.amqp_url = url;
        config.http_request_timeout = Duration::from_secs(3);
        config.ingest_max_unconfirmed = 4;
    })
    .await;
    let client = client();
    let put = |key: String| {
        client
            .put(worker.url("/events/held.example/delivered"))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", key)
            .send()
    };
    let error_of = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = response.json().await.expect("a JSON error");
        body["error"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(
        put("first".into()).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(worker.metric("catchall_ingest_unconfirmed").await, 0.0);

    proxy.swallow_replies();
    let held = futures_util::future::join_all((0..4).map(|i| put(format!("held-{i}")))).await;
    for response in held {
        let error = error_of(response.expect("PUT answered")).await;
        assert!(error.contains("did not confirm"), "{error}");
    }
    assert_eq!(worker.metric("catchall_ingest_unconfirmed").await, 4.0);
    // The fifth is refused at once, without a wait of its own (the answer's text is the same).
    let error = error_of(put("one-more".into()).await.expect("PUT answered")).await;
    assert!(error.contains("did not confirm"), "{error}");
    let outcome =
        |outcome: &str| format!("catchall_ingest_publishes_total{{outcome=\"{outcome}\"}}");
    assert_eq!(worker.metric(&outcome("unconfirmed")).await, 1.0);
    assert_eq!(worker.metric(&outcome("confirm_timeout")).await, 4.0);

    // The connection's end settles what it held (the confirms fail): room again.
    proxy.drop_connections();
    proxy.restore();
    wait_for(
        Duration::from_secs(30),
        "the held confirms settled and a PUT accepted",
        || async {
            let unconfirmed = worker.try_metric("catchall_ingest_unconfirmed").await?;
            let key = uuid::Uuid::now_v7().to_string();
            (unconfirmed == 0.0 && put(key).await.ok()?.status() == StatusCode::ACCEPTED)
                .then_some(())
        },
    )
    .await;
    worker.stop().await;
}
