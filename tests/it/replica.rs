//! Look-ups from a streaming replica (`STATUS_DATABASE_URL`, SPEC §6), against the primary
//! (5434) and replica (5435) that `.ci/replica.sh` makes.

use crate::helpers::{TestBroker, TestWorker, closed_port, generate, wait_for};
use std::time::Duration;

const PRIMARY: &str = "postgres://postgres@127.0.0.1:5434";
const REPLICA: &str = "postgres://postgres@127.0.0.1:5435";

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("{url} must answer (run .ci/replica.sh): {error}"));
    tokio::spawn(connection);
    client
}

async fn pg_ctl(action: &str) {
    pg_ctl_cluster("catchall_replica", action).await;
}

async fn pg_ctl_cluster(cluster: &str, action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .expect("a Postgres version");
    let status = tokio::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, cluster, action])
        .args(if action == "stop" {
            &["-m", "fast"][..]
        } else {
            &[][..]
        })
        .status()
        .await
        .expect("run pg_ctlcluster");
    // Starting a cluster that runs already fails harmlessly.
    assert!(
        status.success() || action == "start",
        "pg_ctlcluster {action} {cluster}"
    );
}

/// A database on the primary (so on the replica too); dropped at the end, and the primary and
/// the replica started again if the test stopped them.
struct ReplicaDb {
    name: String,
}

impl ReplicaDb {
    /// A new database on the primary, once the replica has it too; and a client of the
    /// replica.
    async fn create() -> (Self, tokio_postgres::Client) {
        let name = format!("test_{}", uuid::Uuid::now_v7().simple());
        client(&format!("{PRIMARY}/postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create the test database on the primary");
        let db = ReplicaDb { name: name.clone() };
        let replica = client(&format!("{REPLICA}/postgres")).await;
        wait_for(
            Duration::from_secs(15),
            "the database on the replica",
            || async {
                let row = replica
                    .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                    .await
                    .ok()?;
                row.map(|_| ())
            },
        )
        .await;
        (db, replica)
    }
}

impl Drop for ReplicaDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                pg_ctl_cluster("catchall_primary", "start").await;
                pg_ctl("start").await;
                // A test that paused the replica's replay and failed before resuming it.
                if let Ok((replica, connection)) =
                    tokio_postgres::connect(&format!("{REPLICA}/postgres"), tokio_postgres::NoTls)
                        .await
                {
                    tokio::spawn(connection);
                    let _ = replica.batch_execute("SELECT pg_wal_replay_resume()").await;
                }
                let _ = client(&format!("{PRIMARY}/postgres"))
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            });
        })
        .join();
        // A second panic while the test fails would abort the process and hide its message.
        if joined.is_err() && !std::thread::panicking() {
            panic!("replica cleanup");
        }
    }
}

/// Status look-ups are served by the replica (its pg_stat_activity shows them) and the primary
/// sees none; the replica's lag is exported, and grows while the replica is cut off from its
/// primary (it showed 0 then). The replica stopped: `/readyz` is 503 naming it, and counting
/// goes on against the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_serves_lookups_and_its_loss_only_stops_readiness() {
    let (database, replica) = ReplicaDb::create().await;
    let name = database.name.clone();
    let broker = TestBroker::new();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (writes, lookups) = (format!("catchall-w-{id}"), format!("catchall-l-{id}"));
    let primary_url = format!("{PRIMARY}/{name}?application_name={writes}");
    let mut config =
        catchall::config::Config::with_names(&primary_url, &broker.exchange, &broker.queue);
    config.status_database_url = Some(format!("{REPLICA}/{name}?application_name={lookups}"));
    let worker = TestWorker::start(config).await;
    worker.ready().await;

    let expected = generate(&broker, 2000, 20, 5).await;
    let (domain, counts) = expected.iter().next().expect("a domain");
    let url = worker.url(&format!("/domains/{domain}"));
    wait_for(
        Duration::from_secs(30),
        "the replica to serve the counts",
        || async {
            let body: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            (body["delivered"] == counts.0 && body["bounced"] == counts.1).then_some(())
        },
    )
    .await;

    let primary = client(&format!("{PRIMARY}/postgres")).await;
    let on_replica: Vec<String> = replica
        .query(
            "SELECT query FROM pg_stat_activity WHERE application_name = $1",
            &[&lookups],
        )
        .await
        .expect("replica pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        on_replica
            .iter()
            .any(|q| q.contains("FROM domains WHERE domain = $1")),
        "the look-up ran on the replica: {on_replica:?}"
    );
    let on_primary: Vec<(String, String)> = primary
        .query(
            // Client backends only: autovacuum workers show up in the database too.
            "SELECT application_name, query FROM pg_stat_activity \
             WHERE datname = $1 AND backend_type = 'client backend'",
            &[&name],
        )
        .await
        .expect("primary pg_stat_activity")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert!(
        on_primary.iter().all(|(app, query)| *app == writes
            && !query.contains("FROM domains WHERE domain = $1")),
        "only the writes reach the primary: {on_primary:?}"
    );
    let lag = || async {
        let text = reqwest::get(worker.url("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix("catchall_replica_lag_seconds "))?
            .trim()
            .parse::<f64>()
            .ok()
    };
    wait_for(Duration::from_secs(15), "the replica lag metric", lag).await;

    // The primary goes away: the replica has replayed all it received, and is cut off. Its
    // lag is the age of what it last replayed, not 0; back to 0 once it streams again.
    pg_ctl_cluster("catchall_primary", "stop").await;
    let cut_off = wait_for(
        Duration::from_secs(30),
        "the lag of a replica cut off from its primary to grow past 5 s",
        || async { lag().await.filter(|&seconds| seconds > 5.0) },
    )
    .await;
    eprintln!("primary stopped: replica lag {cut_off} s");
    pg_ctl_cluster("catchall_primary", "start").await;
    wait_for(
        Duration::from_secs(60),
        "the lag to be 0 once the replica streams again",
        || async { lag().await.filter(|&seconds| seconds == 0.0).map(|_| ()) },
    )
    .await;
    worker.ready().await;

    // The replica goes away: not ready, naming it; counting goes on.
    pg_ctl("stop").await;
    let readyz = worker.url("/readyz");
    let reason = wait_for(
        Duration::from_secs(15),
        "/readyz to name the replica",
        || async {
            let response = reqwest::get(&readyz).await.ok()?;
            if response.status() != 503 {
                return None;
            }
            let body: serde_json::Value = response.json().await.ok()?;
            body["error"].as_str().map(str::to_string)
        },
    )
    .await;
    assert!(
        reason.contains("Postgres replica 127.0.0.1:5435/"),
        "{reason}"
    );
    eprintln!("replica stopped: /readyz 503 {reason}");
    let more = generate(&broker, 1000, 20, 6).await;
    let mut total = expected.clone();
    for (domain, (d, b)) in more {
        let entry = total.entry(domain).or_default();
        entry.0 += d;
        entry.1 += b;
    }
    let writes_db = client(&format!("{PRIMARY}/{name}")).await;
    wait_for(
        Duration::from_secs(30),
        "counting to go on without the replica",
        || async {
            let rows = writes_db
                .query("SELECT domain, delivered, bounced FROM domains", &[])
                .await
                .ok()?;
            let counts: crate::helpers::Counts = rows
                .iter()
                .map(|row| (row.get(0), (row.get(1), row.get(2))))
                .collect();
            (counts == total).then_some(())
        },
    )
    .await;

    pg_ctl("start").await;
    worker.ready().await;
    drop(writes_db);
    worker.stop().await;
}

/// A replica that does not answer when the worker starts (a deploy or a scale-out while it
/// restarts) does not stop the worker: it counts, `/readyz` names the replica, and look-ups
/// read the primary (`/readyz/lookups` pings it). It used to fail at start and crash-loop.
/// (No replica server needed: nothing listens on the port.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_at_start_does_not_stop_counting() {
    let db = crate::helpers::TestDb::create().await;
    let broker = TestBroker::new();
    let (_closed, port) = closed_port();
    let mut config = TestWorker::config(&db, &broker);
    config.status_database_url = Some(format!("postgres://postgres@127.0.0.1:{port}/postgres"));
    let worker = TestWorker::start(config).await;
    let expected = generate(&broker, 2_000, 10, 11).await;
    crate::helpers::assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    let response = reqwest::get(worker.url("/readyz")).await.expect("/readyz");
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body = response.text().await.expect("body");
    assert!(body.contains("replica"), "/readyz: {body}");
    let (domain, counts) = expected.iter().next().expect("a domain");
    let url = worker.url(&format!("/domains/{domain}"));
    wait_for(
        Duration::from_secs(15),
        "look-ups from the primary, and /readyz/lookups ready",
        || async {
            let ready = reqwest::get(worker.url("/readyz/lookups")).await.ok()?;
            let body: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            (ready.status() == 200 && body["delivered"] == counts.0 && body["bounced"] == counts.1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(worker.metric("catchall_lookups_from_primary").await, 1.0);
    worker.stop().await;
}

/// A worker's settings on the primary's database `name`, looking up from the replica, with a
/// `MAX_REPLICA_LAG` of 1 s.
fn lagging_replica_config(name: &str, broker: &TestBroker) -> catchall::config::Config {
    let mut config = catchall::config::Config::with_names(
        &format!("{PRIMARY}/{name}"),
        &broker.exchange,
        &broker.queue,
    );
    config.status_database_url = Some(format!("{REPLICA}/{name}"));
    config.max_replica_lag = Duration::from_secs(1);
    config
}

/// The delivered count `GET /domains/{domain}` answers, if it answers.
async fn delivered(worker: &TestWorker, domain: &str) -> Option<i64> {
    let url = worker.url(&format!("/domains/{domain}"));
    let body: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
    body["delivered"].as_i64()
}

/// A replica further behind than MAX_REPLICA_LAG (its replay paused: a broken stream, or an
/// operator's pause) is not read: look-ups answer from the primary until it catches up, then
/// from the replica again. They answered from the stale replica for as long as it lagged, and
/// `/readyz/lookups` stayed 200. With the primary down too, they stay on the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lookups_read_the_primary_while_the_replica_lags() {
    let (database, replica) = ReplicaDb::create().await;
    let name = database.name.clone();
    let broker = TestBroker::new();
    let config = lagging_replica_config(&name, &broker);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let publish = |domain: &'static str, count: usize| {
        let broker = &broker;
        async move {
            let (_connection, channel) = broker.channel().await;
            let body = serde_json::json!({"domain": domain, "type": "delivered"}).to_string();
            for _ in 0..count {
                crate::helpers::publish_raw(&channel, &broker.exchange, "x", body.as_bytes(), None)
                    .await;
            }
        }
    };
    publish("before.example", 3).await;
    wait_for(Duration::from_secs(30), "the replica to serve", || async {
        (delivered(&worker, "before.example").await == Some(3)).then_some(())
    })
    .await;

    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause the replica's replay");
    publish("during.example", 5).await;
    wait_for(
        Duration::from_secs(30),
        "look-ups from the primary while the replica lags",
        || async { (delivered(&worker, "during.example").await == Some(5)).then_some(()) },
    )
    .await;
    assert_eq!(worker.metric("catchall_lookups_from_primary").await, 1.0);
    let ready = reqwest::get(worker.url("/readyz/lookups"))
        .await
        .expect("/readyz/lookups");
    assert_eq!(ready.status(), 200, "look-ups are served, from the primary");

    replica
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume the replica's replay");
    wait_for(
        Duration::from_secs(30),
        "look-ups from the replica again once it caught up",
        || async {
            let from_primary = worker.try_metric("catchall_lookups_from_primary").await?;
            (from_primary == 0.0).then_some(())
        },
    )
    .await;
    assert_eq!(delivered(&worker, "during.example").await, Some(5));

    // A failover: the primary gone, the replica cut off and lagging. Look-ups stay on the
    // replica, whose answers, however old, beat none (they went to the primary, and failed).
    pg_ctl_cluster("catchall_primary", "stop").await;
    wait_for(
        Duration::from_secs(30),
        "look-ups from the lagging replica while the primary is down",
        || async {
            let lag = worker.try_metric("catchall_replica_lag_seconds").await?;
            let from_primary = worker.try_metric("catchall_lookups_from_primary").await?;
            let answered = delivered(&worker, "during.example").await;
            (lag > 2.0 && from_primary == 0.0 && answered == Some(5)).then_some(())
        },
    )
    .await;
    pg_ctl_cluster("catchall_primary", "start").await;
    worker.stop().await;
}

/// While the replica lags, a primary busy with the look-ups the fallback sent it is not taken
/// for down: the check that it answers has a connection of its own. It pinged on the look-up
/// pool, whose every connection the look-ups held (here one, waiting on a lock), failed its 2 s
/// and sent the look-ups back to the lagging replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_busy_with_lookups_is_not_taken_for_down() {
    let (database, replica) = ReplicaDb::create().await;
    let name = database.name.clone();
    let broker = TestBroker::new();
    let mut config = lagging_replica_config(&name, &broker);
    config.db_pool_size = 1;
    // A look-up waits 4 s for Postgres at most (a third of it): out of step with the lag
    // loop's 5 s, so its checks land at every point of a look-up's wait.
    config.http_request_timeout = Duration::from_secs(12);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let (_connection, channel) = broker.channel().await;
    let body = br#"{"domain":"busy.example","type":"delivered"}"#;
    crate::helpers::publish_raw(&channel, &broker.exchange, "x", body, None).await;
    wait_for(Duration::from_secs(30), "the replica to serve", || async {
        (delivered(&worker, "busy.example").await == Some(1)).then_some(())
    })
    .await;
    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause the replica's replay");
    crate::helpers::publish_raw(&channel, &broker.exchange, "x", body, None).await;
    wait_for(
        Duration::from_secs(30),
        "look-ups from the primary while the replica lags",
        || async { (delivered(&worker, "busy.example").await == Some(2)).then_some(()) },
    )
    .await;
    // The look-ups hold the primary's one look-up connection: each waits on a lock until its
    // deadline, and more wait behind it.
    let locker = client(&format!("{PRIMARY}/{name}")).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the table on the primary");
    let flooding = tokio_util::sync::CancellationToken::new();
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let (url, flooding) = (worker.url("/domains/busy.example"), flooding.clone());
            tokio::spawn(async move {
                while !flooding.is_cancelled() {
                    let _ = reqwest::get(&url).await;
                }
            })
        })
        .collect();
    // Four ticks of the lag loop (every 5 s): the fallback holds.
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < until {
        assert_eq!(
            worker.metric("catchall_lookups_from_primary").await,
            1.0,
            "look-ups went back to the lagging replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    flooding.cancel();
    for flood in floods {
        let _ = flood.await;
    }
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    replica
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume the replica's replay");
    worker.stop().await;
}

/// Processes stopped with SIGSTOP, continued when dropped (also when the test fails).
struct Stopped(Vec<i32>);

impl Stopped {
    fn stop(pids: Vec<i32>) -> Self {
        let mut stopped = Self(Vec::new());
        for pid in pids {
            // SAFETY: kill(2) with a pid and a signal number has no memory effects.
            assert_eq!(
                unsafe { libc::kill(pid, libc::SIGSTOP) },
                0,
                "SIGSTOP {pid}"
            );
            stopped.0.push(pid);
        }
        stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// A replica whose WAL receiver runs and receives nothing (here its primary's WAL sender is
/// stopped; a network that drops packets without a reset does the same) is behind as soon as
/// the primary writes, and look-ups read the primary. It read 0 s of lag (it has replayed all
/// it received) until `wal_receiver_timeout` (60 s) ended the receiver, and answered stale
/// counts all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_receives_nothing_is_behind_once_the_primary_writes() {
    let (database, _replica) = ReplicaDb::create().await;
    let name = database.name.clone();
    let broker = TestBroker::new();
    let worker = TestWorker::start(lagging_replica_config(&name, &broker)).await;
    worker.ready().await;
    let (_connection, channel) = broker.channel().await;
    let body = br#"{"domain":"stuck.example","type":"delivered"}"#;
    crate::helpers::publish_raw(&channel, &broker.exchange, "x", body, None).await;
    wait_for(Duration::from_secs(30), "the replica to serve", || async {
        let from_primary = worker.try_metric("catchall_lookups_from_primary").await?;
        (from_primary == 0.0 && delivered(&worker, "stuck.example").await == Some(1)).then_some(())
    })
    .await;

    let senders: Vec<i32> = client(&format!("{PRIMARY}/postgres"))
        .await
        .query("SELECT pid FROM pg_stat_replication", &[])
        .await
        .expect("the primary's WAL senders")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!senders.is_empty(), "the replica streams from the primary");
    let stopped = Stopped::stop(senders);
    for _ in 0..4 {
        crate::helpers::publish_raw(&channel, &broker.exchange, "x", body, None).await;
    }
    let lag = wait_for(
        Duration::from_secs(30),
        "look-ups from the primary while the replica receives nothing",
        || async {
            let from_primary = worker.try_metric("catchall_lookups_from_primary").await?;
            let lag = worker.try_metric("catchall_replica_lag_seconds").await?;
            (from_primary == 1.0 && delivered(&worker, "stuck.example").await == Some(5))
                .then_some(lag)
        },
    )
    .await;
    assert!(lag > 1.0, "the lag passed MAX_REPLICA_LAG: {lag}");

    drop(stopped);
    wait_for(
        Duration::from_secs(30),
        "look-ups from the replica again once it streams",
        || async {
            let from_primary = worker.try_metric("catchall_lookups_from_primary").await?;
            let lag = worker.try_metric("catchall_replica_lag_seconds").await?;
            (from_primary == 0.0 && lag < 0.5).then_some(())
        },
    )
    .await;
    assert_eq!(delivered(&worker, "stuck.example").await, Some(5));
    worker.stop().await;
}

/// A worker started while the replica lags is not misled by knowing no earlier primary
/// position: the replica's own account counts at its first measurement, and look-ups read the
/// primary. (A first version of the lag against the primary's WAL read milliseconds there, and
/// look-ups read the stale replica until the lag had grown past MAX_REPLICA_LAG.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_started_against_a_lagging_replica_does_not_read_it() {
    let (database, replica) = ReplicaDb::create().await;
    let name = database.name.clone();
    let broker = TestBroker::new();
    // Migrated and counted without a worker: the gauges are the process's, and a worker
    // before would have left its lag behind.
    let store = catchall::store::Store::connect(&format!("{PRIMARY}/{name}"), 1)
        .await
        .expect("connect to the primary");
    store.migrate().await.expect("migrate");
    store
        .apply(&[crate::helpers::one_delivery("late.example")])
        .await
        .expect("count one delivery");
    let on_replica = client(&format!("{REPLICA}/{name}")).await;
    wait_for(
        Duration::from_secs(30),
        "the replica to have it",
        || async {
            let row = on_replica
                .query_opt(
                    "SELECT delivered FROM domains WHERE domain = 'late.example'",
                    &[],
                )
                .await
                .ok()??;
            (row.get::<_, i64>(0) == 1).then_some(())
        },
    )
    .await;

    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause the replica's replay");
    client(&format!("{PRIMARY}/{name}"))
        .await
        .batch_execute("UPDATE domains SET delivered = delivered + 1 WHERE domain = 'late.example'")
        .await
        .expect("a write on the primary");
    wait_for(
        Duration::from_secs(30),
        "the replica to have received the write, and replayed nothing for 2 s",
        || async {
            let row = replica
                .query_one(
                    "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn() \
                     AND now() - pg_last_xact_replay_timestamp() > interval '2 s'",
                    &[],
                )
                .await
                .ok()?;
            row.get::<_, bool>(0).then_some(())
        },
    )
    .await;

    let worker = TestWorker::start(lagging_replica_config(&name, &broker)).await;
    let lag = wait_for(
        Duration::from_secs(15),
        "the first measurement of the lag",
        || async { worker.try_metric("catchall_replica_lag_seconds").await },
    )
    .await;
    assert!(lag > 1.0, "the first measurement read {lag} s");
    wait_for(
        Duration::from_secs(15),
        "look-ups from the primary",
        || async {
            let from_primary = worker.try_metric("catchall_lookups_from_primary").await?;
            (from_primary == 1.0 && delivered(&worker, "late.example").await == Some(2))
                .then_some(())
        },
    )
    .await;
    replica
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume the replica's replay");
    worker.stop().await;
}
