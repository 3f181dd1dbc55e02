//! Operations: the `catchall healthcheck` subcommand (the image's HEALTHCHECK), `catchall
//! migrate`, and the gauges the alert rules and the dashboard read (deploy/prometheus,
//! deploy/grafana).

use crate::helpers::*;
use catchall::store::Store;
use std::time::Duration;

async fn healthcheck(http_addr: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(binary("catchall"))
        .arg("healthcheck")
        .args(args)
        .env("HTTP_ADDR", http_addr)
        .output()
        .await
        .expect("run catchall healthcheck");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_for_a_healthy_worker_and_1_otherwise() {
    let (_db, _broker, worker) = started().await;
    let addr = worker.addr.to_string();
    assert_eq!(healthcheck(&addr, &[]).await, (true, String::new()));
    assert!(healthcheck(&addr, &["--path", "/readyz"]).await.0, "ready");
    // A wildcard HTTP_ADDR (as in the image) is probed on loopback.
    let wildcard = format!("0.0.0.0:{}", worker.addr.port());
    assert!(
        healthcheck(&wildcard, &[]).await.0,
        "0.0.0.0 probes 127.0.0.1"
    );
    let (ok, stderr) = healthcheck(&addr, &["--path", "/no-such-route"]).await;
    assert!(!ok && stderr.contains("404"), "{stderr}");
    // With ADMIN_ADDR set, that is what it probes (here with a HTTP_ADDR where nothing listens).
    let output = tokio::process::Command::new(binary("catchall"))
        .arg("healthcheck")
        .env("HTTP_ADDR", "127.0.0.1:9")
        .env("ADMIN_ADDR", &addr)
        .output()
        .await
        .expect("run catchall healthcheck");
    assert!(output.status.success(), "ADMIN_ADDR probed: {output:?}");
    worker.stop().await;

    // Nothing listens (the stopped worker's port could be taken by another test meanwhile).
    let (_closed, port) = closed_port();
    let (ok, stderr) = healthcheck(&format!("127.0.0.1:{port}"), &["--timeout", "2s"]).await;
    assert!(!ok, "nothing listens");
    assert!(stderr.starts_with("unhealthy: "), "{stderr}");
}

/// A `RUST_LOG` that does not parse is a usage error of both binaries (exit 2, naming it),
/// before anything connects; it fell back to `info` silently and the worker started.
#[tokio::test]
async fn a_rust_log_that_does_not_parse_is_a_usage_error() {
    for (name, args) in [
        ("catchall", vec![]),
        ("catchall-producer", vec!["send", "a.example", "delivered"]),
    ] {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(binary(name))
                .args(&args)
                .env("RUST_LOG", "catchall=lots")
                // Nothing answers here: had it started, it would wait to connect, not exit 2.
                .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
                .env("DATABASE_URL", "postgres://postgres@127.0.0.1:9/none")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} did not exit"))
        .expect("run the binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains("RUST_LOG"), "{name}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_readiness_memory_and_the_dedup_table() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    // Through a proxy, so that the broker can go away for this worker alone.
    let amqp = crate::proxy::Proxy::start("127.0.0.1:5672").await;
    let mut config = TestWorker::config(&db, &broker);
    config.amqp.amqp_url = format!("amqp://guest:guest@{}/%2f", amqp.addr);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let gauge = async |series: &'static str, want: f64| {
        // Sampled every 5 s.
        wait_for(Duration::from_secs(15), series, || async {
            (worker.try_metric(series).await == Some(want)).then_some(())
        })
        .await;
    };
    gauge("catchall_ready", 1.0).await;
    let rss = worker.metric("process_resident_memory_bytes").await;
    assert!(rss > 1_000_000.0 && rss < 1e9, "RSS {rss}");
    gauge("catchall_dedup_retention_seconds", 604_800.0).await;
    assert_eq!(worker.metric("catchall_dedup_overdue_ids").await, 0.0);

    // The broker gone: not ready, then ready again.
    amqp.cut();
    gauge("catchall_ready", 0.0).await;
    amqp.restore();
    gauge("catchall_ready", 1.0).await;

    // The request durations have a bucket at SPEC §1's 200 ms bound.
    let status = reqwest::get(worker.url("/domains/example.com"))
        .await
        .expect("GET a status")
        .status();
    assert_eq!(status, 200);
    let text = reqwest::get(worker.url("/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    assert!(
        text.lines().any(
            |line| line.starts_with("catchall_http_request_duration_seconds_bucket{")
                && line.contains("le=\"0.2\"")
        ),
        "a 0.2 s bucket"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_kept_past_the_retention_are_counted_up_to_a_cap() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 1).await.expect("connect");
    store.migrate().await.expect("migrate");
    db.client()
        .await
        .batch_execute(
            "INSERT INTO applied_messages (message_id, applied_at) VALUES \
               ('old-1', now() - interval '9 days'), ('old-2', now() - interval '8 days'), \
               ('old-3', now() - interval '8 days'), ('new-1', now()), ('new-2', now() - interval '1 day')",
        )
        .await
        .expect("insert applied ids");
    let week = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(store.overdue_applied(week, 10_000).await.expect("count"), 3);
    assert_eq!(store.overdue_applied(week, 2).await.expect("count"), 2);
    assert_eq!(
        store
            .overdue_applied(Duration::from_secs(30 * 24 * 3600), 10_000)
            .await
            .expect("count"),
        0
    );
    // The estimate reads the statistics, which the inserting backend reports within seconds.
    wait_for(
        Duration::from_secs(30),
        "the estimate to count the 5 ids",
        || async { (store.applied_estimate().await.expect("estimate") == 5).then_some(()) },
    )
    .await;
}

/// `catchall migrate` applies every migration of `migrations/` to an empty database and exits
/// 0; run again, it applies nothing and still exits 0 (an init container or a deploy job may
/// run it on every rollout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_every_migration_once_and_exits_0() {
    let db = TestDb::create().await;
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations/")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sql"))
        })
        .count() as i64;
    assert!(migrations > 0);
    for run in 1..=2 {
        let output = tokio::process::Command::new(binary("catchall"))
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .env("LOG_FORMAT", "json")
            .output()
            .await
            .expect("run catchall migrate");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "run {run}: {stderr}");
        let applied: i64 = db
            .client()
            .await
            .query_one("SELECT count(*) FROM refinery_schema_history", &[])
            .await
            .expect("read the schema history")
            .get(0);
        assert_eq!(applied, migrations, "run {run}: {stderr}");
    }
}

/// The broker's password is not logged at any level. lapin traced every frame it wrote, among
/// them the login (`Connection.StartOk`, `response: LongString([0, 103, …])`: PLAIN's
/// `\0user\0password` as bytes), so `RUST_LOG=trace` put the password in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_password_is_not_in_a_trace_log() {
    use tokio::io::AsyncBufReadExt;
    const PASSWORD: &str = "s3cret-in-a-trace";
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let url = format!("amqp://guest:{PASSWORD}@127.0.0.1:5672/%2f");
    let mut worker = worker_command(
        &db,
        &broker,
        &[("AMQP_URL", url), ("RUST_LOG", "trace".into())],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start the worker binary");
    let mut lines = tokio::io::BufReader::new(worker.stderr.take().expect("stderr")).lines();
    let as_bytes = PASSWORD
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // Every line until the login was written and refused and the worker tried again (the
    // refusal's handling and the retry are logged too), or 30 s.
    let (mut read, mut logins) = (0, 0);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read the log") {
            read += 1;
            assert!(
                !line.contains(PASSWORD) && !line.contains(&as_bytes),
                "the password is in the log: {line}"
            );
            // The login frame, written (both its old and its redacted form).
            if line.contains("will write to buffer")
                && (line.contains("StartOk") || line.contains("start-ok"))
            {
                logins += 1;
                if logins == 2 {
                    return;
                }
            }
        }
    })
    .await;
    eprintln!("{read} log lines read, {logins} logins among them");
    assert_eq!(
        logins, 2,
        "the worker logged in, was refused, and logged in again"
    );
    let _ = worker.kill().await;
}

/// SPEC §5: `/healthz` answers 200 while the process runs, and `/readyz` 503 with a reason. A
/// worker whose Postgres did not answer at start used to refuse every connection until it did
/// (and had migrated): no liveness, no metrics, no word of what it waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_answer_while_postgres_does_not_at_start() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let postgres = crate::proxy::Proxy::start("127.0.0.1:5432").await;
    postgres.cut();
    // A password (trust authentication ignores it) that no answer may show.
    let through_proxy = db.url.replace(
        "postgres@127.0.0.1:5432",
        &format!("postgres:hunter2@{}", postgres.addr),
    );
    assert_ne!(through_proxy, db.url);
    let (mut child, port, admin) = spawn_listening(worker_command(
        &db,
        &broker,
        &[
            ("DATABASE_URL", through_proxy),
            ("ADMIN_ADDR", "127.0.0.1:0".into()),
        ],
    ))
    .await;
    let admin = admin.expect("the start-up line names the admin address");
    let get = async |port: u16, path: &str| {
        let response = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .expect("the worker answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("a body"))
    };
    let starting = |body: &str| -> String {
        let error: serde_json::Value = serde_json::from_str(body).expect("a JSON error");
        let error = error["error"].as_str().expect("an error text").to_string();
        assert!(error.starts_with("starting: "), "{error}");
        assert!(!error.contains("hunter2"), "the password in {error}");
        error
    };

    // Waiting for Postgres: alive, scraped, and /readyz names what it waits for.
    let reason = wait_for(
        Duration::from_secs(30),
        "a refused attempt in /readyz",
        || async {
            let (status, body) = get(port, "/readyz").await;
            assert_eq!(status, 503, "/readyz while starting: {body}");
            let error = starting(&body);
            error.contains("does not answer").then_some(error)
        },
    )
    .await;
    assert!(
        reason.contains(&postgres.addr.to_string()) && reason.contains("the next at"),
        "{reason}"
    );
    assert!(postgres.refused() >= 1, "the worker tried Postgres");
    for port in [port, admin] {
        assert_eq!(
            get(port, "/healthz").await,
            (200, r#"{"status":"ok"}"#.into())
        );
        let (status, metrics) = get(port, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            metrics.lines().any(|line| line == "catchall_ready 0"),
            "catchall_ready 0 while starting:\n{metrics}"
        );
        for path in ["/readyz", "/readyz/lookups"] {
            let (status, body) = get(port, path).await;
            assert_eq!(status, 503, "{path} while starting: {body}");
            starting(&body);
        }
    }
    // Elsewhere, not what it waits for (no server address for anyone who asks).
    let (status, body) = get(port, "/domains/example.com").await;
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"error":"starting"}"#),
        "a look-up while starting"
    );

    // Postgres back, with another replica's migration under way (its lock held here): the
    // worker says it waits for the migrations.
    let migrating = db.client().await;
    migrating
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&catchall::store::MIGRATION_LOCK],
        )
        .await
        .expect("take the migration lock");
    postgres.restore();
    wait_for(
        Duration::from_secs(60),
        "the migrations in /readyz",
        || async {
            let (_, body) = get(port, "/readyz").await;
            (starting(&body) == "starting: applying migrations").then_some(())
        },
    )
    .await;

    // The migrations done: the worker consumes, and its own routes answer on both addresses.
    drop(migrating);
    wait_for(
        Duration::from_secs(60),
        "/readyz 200 after the start",
        || async { (get(port, "/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    let (status, body) = get(port, "/domains/example.com").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"unknown\""), "{body}");
    assert_eq!(get(admin, "/readyz").await.0, 200);
    assert_eq!(
        get(admin, "/domains/example.com").await.0,
        404,
        "no API on the admin address"
    );
    let (status, _) = sigterm(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
}
