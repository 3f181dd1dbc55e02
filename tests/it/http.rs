//! The HTTP API: normalised look-ups, JSON errors, readiness and metrics.

use crate::helpers::*;
use reqwest::StatusCode;
use std::time::Duration;

async fn get_json(url: &str) -> (StatusCode, serde_json::Value) {
    let response = reqwest::get(url).await.expect("request");
    let status = response.status();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{url}: content-type {content_type}"
    );
    (status, response.json().await.expect("JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_are_normalised_and_errors_are_json() {
    let (db, broker, worker) = started().await;
    let (_connection, channel) = broker.channel().await;
    let mut events = Vec::new();
    for _ in 0..1001 {
        events.push(serde_json::json!({"domain": "Example.COM", "type": "delivered"}));
    }
    events.push(serde_json::json!({"domain": "bücher.de", "type": "bounced"}));
    publish_raw(
        &channel,
        &broker.exchange,
        "batch",
        &serde_json::to_vec(&events).unwrap(),
        None,
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "the batch to be counted",
        || async { (db.total_events().await == 1002).then_some(()) },
    )
    .await;

    let (status, canonical) = get_json(&worker.url("/domains/example.com")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        canonical,
        serde_json::json!({"domain": "example.com", "status": "catch-all", "delivered": 1001, "bounced": 0, "other_bounced": 0})
    );
    for variant in [
        "EXAMPLE.com.",
        "Example.Com",
        "%20example.com%20",
        "example.com.",
    ] {
        let (status, body) = get_json(&worker.url(&format!("/domains/{variant}"))).await;
        assert_eq!(
            (status, &body),
            (StatusCode::OK, &canonical),
            "variant {variant}"
        );
    }
    let (_, idn) = get_json(&worker.url("/domains/b%C3%BCcher.de")).await;
    assert_eq!(
        idn,
        serde_json::json!({"domain": "xn--bcher-kva.de", "status": "not catch-all", "delivered": 0, "bounced": 1, "other_bounced": 0})
    );
    let (status, unseen) = get_json(&worker.url("/domains/never-seen.example")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        unseen,
        serde_json::json!({"domain": "never-seen.example", "status": "unknown", "delivered": 0, "bounced": 0, "other_bounced": 0})
    );

    // Invalid domains: 400 with a JSON error, including SQL-looking input.
    for bad in [
        "a..b",
        "-a.com",
        "exa_mple.com",
        "%27%3B%20DROP%20TABLE%20domains%3B--",
        "%FF%FE",
        &"a".repeat(300),
    ] {
        let (status, body) = get_json(&worker.url(&format!("/domains/{bad}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {body}"
        );
    }
    let (status, body) = get_json(&worker.url("/no/such/route")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let response = reqwest::Client::new()
        .post(worker.url("/domains/example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].is_string());
    assert_eq!(db.counts().await.len(), 2, "the table is still there");

    let (status, body) = get_json(&worker.url("/healthz")).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic() {
    let (_db, broker, worker) = started().await;
    let page = reqwest::get(worker.url("/metrics")).await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let before = page.text().await.unwrap();
    for series in [
        "catchall_events_total{type=\"delivered\"}",
        "catchall_messages_total{outcome=\"applied\"}",
        "catchall_rejections_total{reason=\"not_json\"}",
        "catchall_db_errors_total",
        "catchall_broker_reconnects_total",
        "catchall_batches_given_up_total",
    ] {
        assert!(
            before.contains(series),
            "{series} is exported before any traffic"
        );
        assert_eq!(metric_value(&before, series), Some(0.0), "{series}");
    }

    let (_connection, channel) = broker.channel().await;
    for i in 0..10 {
        let kind = if i % 5 == 0 { "bounced" } else { "delivered" };
        let body = serde_json::json!({"domain": format!("m{i}.example"), "type": kind});
        publish_raw(
            &channel,
            &broker.exchange,
            kind,
            &serde_json::to_vec(&body).unwrap(),
            Some(&format!("id-{i}")),
        )
        .await;
    }
    publish_raw(&channel, &broker.exchange, "x", b"garbage", None).await;
    // A message already applied (same message_id) is a duplicate.
    publish_raw(
        &channel,
        &broker.exchange,
        "delivered",
        br#"{"domain":"m1.example","type":"delivered"}"#,
        Some("id-1"),
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "metrics to show the traffic",
        || async {
            let applied = worker
                .metric("catchall_messages_total{outcome=\"applied\"}")
                .await;
            let duplicate = worker
                .metric("catchall_messages_total{outcome=\"duplicate\"}")
                .await;
            (applied == 10.0 && duplicate == 1.0).then_some(())
        },
    )
    .await;
    reqwest::get(worker.url("/domains/m1.example"))
        .await
        .unwrap();
    reqwest::get(worker.url("/domains/bad..domain"))
        .await
        .unwrap();
    // The single-label domain `lookup`, whose path is the bulk look-up's (POST): 405 before.
    let lookup = reqwest::get(worker.url("/domains/lookup")).await.unwrap();
    assert_eq!(lookup.status(), 200);
    let lookup: serde_json::Value = lookup.json().await.unwrap();
    assert_eq!(
        (lookup["domain"].as_str(), lookup["status"].as_str()),
        (Some("lookup"), Some("unknown"))
    );

    let after = reqwest::get(worker.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_value(&after, "catchall_events_total{type=\"delivered\"}"),
        Some(8.0)
    );
    assert_eq!(
        metric_value(&after, "catchall_events_total{type=\"bounced\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&after, "catchall_messages_total{outcome=\"rejected\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&after, "catchall_rejections_total{reason=\"not_json\"}"),
        Some(1.0)
    );
    assert!(metric_value(&after, "catchall_batch_events_count").is_some_and(|v| v >= 1.0));
    assert!(
        metric_value(&after, "catchall_batch_commit_duration_seconds_count")
            .is_some_and(|v| v >= 1.0)
    );
    assert_eq!(
        metric_value(&after, "catchall_batch_events_sum"),
        Some(10.0)
    );
    assert_eq!(
        metric_value(
            &after,
            "catchall_http_requests_total{route=\"/domains/{domain}\",code=\"200\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &after,
            "catchall_http_requests_total{route=\"/domains/{domain}\",code=\"400\"}"
        ),
        Some(1.0)
    );
    assert!(
        metric_value(
            &after,
            "catchall_http_request_duration_seconds_count{route=\"/domains/{domain}\"}"
        )
        .is_some_and(|v| v >= 2.0)
    );
    // A probe is counted under its own path (it was `/metrics/metrics`: the probes' router and
    // the app's both matched it).
    assert!(
        metric_value(
            &after,
            "catchall_http_requests_total{route=\"/metrics\",code=\"200\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{after}"
    );
    assert!(!after.contains("/metrics/metrics"), "{after}");

    // The exposition passes Prometheus' own linter (promtool; .ci/run installs it).
    if let Ok(promtool) = which("promtool") {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(after.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    } else {
        // Never skipped silently: a missing linter is a failure (.ci/run installs it).
        panic!("promtool is required to lint /metrics: apt-get install prometheus");
    }
    worker.stop().await;
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_consumer_cannot_run() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    // A broker address where nothing listens: the consumer cannot start.
    let (closed, port) = closed_port();
    config.amqp.amqp_url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let worker = TestWorker::start(config).await;

    let (status, body) = get_json(&worker.url("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"].as_str().unwrap().contains("not consuming"),
        "{body}"
    );
    let (status, _) = get_json(&worker.url("/healthz")).await;
    assert_eq!(status, StatusCode::OK, "alive while not ready");
    let (status, _) = get_json(&worker.url("/domains/example.com")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "look-ups are served from Postgres meanwhile"
    );
    // So the look-up API stays in the Service (Kubernetes' readiness probe).
    let (status, body) = get_json(&worker.url("/readyz/lookups")).await;
    assert_eq!(status, StatusCode::OK, "ready for look-ups: {body}");
    wait_for(
        Duration::from_secs(10),
        "reconnect attempts to be counted",
        || async { (worker.metric("catchall_broker_reconnects_total").await >= 2.0).then_some(()) },
    )
    .await;
    worker.stop().await;
    drop(closed);
}

/// `/readyz` (open to whoever reaches the port) names the broker's node and why it failed, not the
/// URL's user name and vhost; it used to carry the whole URL, password masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_broker_failure_without_the_urls_user() {
    // RabbitMQ answers and refuses the login: no such user.
    readyz_hides_the_user_and_vhost(
        "amqp://readyz-probe-user:wrong@127.0.0.1:5672/readyz-probe-vhost",
        false,
    )
    .await;
}

/// The same with a login RabbitMQ accepts and a vhost it refuses: its own answer names the
/// vhost (`vhost readyz-probe-vhost not found`), and `/readyz` must not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_broker_failure_without_the_urls_vhost() {
    readyz_hides_the_user_and_vhost("amqp://guest:guest@127.0.0.1:5672/readyz-probe-vhost", true)
        .await;
}

/// `masked`: RabbitMQ's answer names the vhost, and `/readyz` shows `***` in its place.
async fn readyz_hides_the_user_and_vhost(url: &str, masked: bool) {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.amqp.amqp_url = url.into();
    let worker = TestWorker::start(config).await;
    let reason = wait_for(
        Duration::from_secs(15),
        "/readyz to name the refused login",
        || async {
            let (status, body) = get_json(&worker.url("/readyz")).await;
            let reason = body["error"].as_str()?.to_string();
            (status == StatusCode::SERVICE_UNAVAILABLE && reason.contains("127.0.0.1:5672"))
                .then_some(reason)
        },
    )
    .await;
    assert!(
        reason.starts_with("not consuming from RabbitMQ: "),
        "{reason}"
    );
    assert!(!reason.contains("readyz-probe"), "{reason}");
    assert_eq!(reason.contains("***"), masked, "{reason}");
    worker.stop().await;
}

/// A flood of `/readyz` requests (the port needs no token) shares pings: each used to ping
/// Postgres on the probes' one connection, so Kubernetes' probe queued behind the flood past its
/// timeout and the pod left the Service. 200 at once: 200 pings before, at most a few now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readiness_probes_shares_its_pings() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let postgres = crate::proxy::Proxy::start("127.0.0.1:5432").await;
    let mut config = TestWorker::config(&db, &broker);
    config.database_url = format!("postgres://postgres@{}/{}", postgres.addr, db.name);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let client = reqwest::Client::new();
    let before = postgres.pings();
    // The proxy sees the pings (the readiness just awaited took one), so "few" below means few.
    assert!(before >= 1, "no ping seen through the proxy");
    let answers = futures_util::future::join_all((0..200).map(|_| {
        let request = client.get(worker.url("/readyz")).send();
        async move { request.await.map(|answer| answer.status()) }
    }))
    .await;
    let pings = postgres.pings() - before;
    let ready = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(status) if *status == StatusCode::OK))
        .count();
    assert_eq!(ready, 200, "{answers:?}");
    // (None at all when the last ping, the wait for readiness, is still fresh.)
    assert!(pings <= 5, "{pings} pings for 200 probes");
    worker.stop().await;
}

/// A flood of look-ups that holds every connection of the look-up pool (each one waits on a
/// lock of `domains`) does not make the worker unready: `/readyz` pings on a connection of
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_ready_while_lookups_hold_every_pooled_connection() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.db_pool_size = 2;
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let mut holder = db.client().await;
    let lock = holder.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock domains");
    let flood: Vec<_> = (0..8)
        .map(|i| {
            let url = worker.url(&format!("/domains/flood{i}.example"));
            tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) })
        })
        .collect();
    db.await_lock_waits(
        2,
        "%FROM domains WHERE domain%",
        "both pooled look-up connections to wait on the lock",
    )
    .await;
    for _ in 0..3 {
        let (status, body) = get_json(&worker.url("/readyz")).await;
        assert_eq!(status, StatusCode::OK, "ready during the flood: {body}");
    }
    lock.rollback().await.expect("release the lock");
    for request in flood {
        let status = request.await.expect("task").expect("look-up answered");
        assert_eq!(status, StatusCode::OK);
    }
    worker.stop().await;
}

/// `/readyz` answers a short reason (the server and the SQLSTATE), never the text of the
/// server's error, which goes to the log only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_failure_without_the_servers_text() {
    let (db, _broker, worker) = started().await;
    let admin = admin().await;
    let name = db.name.clone();
    // New connections are refused with a FATAL whose text names the database; the
    // worker's existing ones are cut, so its readiness ping must open a new one.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{name}';"
        ))
        .await
        .expect("refuse connections");
    let url = worker.url("/readyz");
    let reason = wait_for(Duration::from_secs(15), "/readyz to be 503", || async {
        let response = reqwest::get(&url).await.ok()?;
        if response.status() != 503 {
            return None;
        }
        let body: serde_json::Value = response.json().await.ok()?;
        body["error"].as_str().map(str::to_string)
    })
    .await;
    admin
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .expect("accept connections again");
    assert!(
        reason.contains(&format!("Postgres 127.0.0.1:5432/{name}")) && reason.contains("SQLSTATE"),
        "names the server and the SQLSTATE: {reason}"
    );
    assert!(
        !reason.contains("accepting connections") && !reason.contains("FATAL"),
        "no server message text: {reason}"
    );
    worker.stop().await;
}

/// With `ADMIN_ADDR` the probes and the metrics have a listener of their own: a client holding
/// every connection `HTTP_ADDR` allows (here 1) leaves them answering, so Kubernetes does not
/// restart a worker that is only saturated and the scrape goes on. The admin address serves
/// nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_address_answers_probes_while_http_addr_is_full() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.http_max_connections = 1;
    config.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let admin = worker.admin.expect("an admin address");

    // HTTP_ADDR's only connection, answered once and held open.
    let mut held = tokio::net::TcpStream::connect(worker.addr).await.unwrap();
    held.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0; 1024];
    let n = held.read(&mut buffer).await.unwrap();
    assert!(
        buffer[..n].starts_with(b"HTTP/1.1 200"),
        "the held connection was served"
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    assert!(
        client.get(worker.url("/healthz")).send().await.is_err(),
        "HTTP_ADDR takes no second connection"
    );
    for path in ["/healthz", "/readyz", "/readyz/lookups", "/metrics"] {
        let response = client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap_or_else(|error| panic!("{path} on the admin address: {error}"));
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let (status, _) = get_json(&format!("http://{admin}/domains/example.com")).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "no look-ups on the admin address"
    );
    drop(held);
    worker.stop().await;
}
