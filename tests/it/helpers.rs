//! Test helpers: an isolated database and broker topology per test, an in-process worker, the
//! binaries, and waiting for a condition with a timeout.

use catchall::app::App;
use catchall::config::Config;
use lapin::options::{
    BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Per-domain (delivered, bounced).
pub type Counts = HashMap<String, (i64, i64)>;

/// Waits until `check` returns `Some`, polling every 50 ms; panics with `what` after `timeout`
/// (also when a probe is still under way then: a hung probe does not hang the test).
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Some(value)) => return value,
            Ok(None) => {}
            Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh database `test_<uuid>`, dropped when this value is dropped (even on panic).
pub struct TestDb {
    pub name: String,
    pub url: String,
}

/// A client of the `postgres` database as the superuser (creating databases and roles).
pub async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls)
        .await
        .expect("Postgres must answer at 127.0.0.1:5432 (user postgres, trust auth)");
    tokio::spawn(connection);
    client
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("test_{}", uuid::Uuid::now_v7().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create the test database");
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Self { name, url }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }

    /// Waits until at least `sessions` sessions of this database whose query matches `like` (a
    /// SQL LIKE pattern) wait on a lock.
    pub async fn await_lock_waits(&self, sessions: i64, like: &str, what: &str) {
        let client = self.client().await;
        wait_for(Duration::from_secs(15), what, || async {
            let waiting: i64 = client
                .query_one(
                    &format!("SELECT count(*) {LOCK_WAITERS} AND query LIKE $1"),
                    &[&like],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            (waiting >= sessions).then_some(())
        })
        .await
    }

    /// A store on this database with `pool_size` connections, migrated.
    pub async fn store(&self, pool_size: u32) -> catchall::store::Store {
        let store = catchall::store::Store::connect(&self.url, pool_size)
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        // As for the test worker (see `TestWorker::config`); tests of the window set their own.
        store.with_claim_window(Duration::ZERO)
    }

    /// Every domain's counters.
    pub async fn counts(&self) -> Counts {
        self.client()
            .await
            .query("SELECT domain, delivered, bounced FROM domains", &[])
            .await
            .expect("read counters")
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect()
    }

    /// Waits (up to `within`) until more than `total` events are counted.
    pub async fn wait_total_past(&self, total: i64, within: Duration, what: &str) {
        wait_for(within, what, || async {
            (self.total_events().await > total).then_some(())
        })
        .await;
    }

    /// Sum of all events counted.
    pub async fn total_events(&self) -> i64 {
        let client = self.client().await;
        match client
            .query_one(
                "SELECT COALESCE(sum(delivered + bounced), 0)::int8 FROM domains",
                &[],
            )
            .await
        {
            Ok(row) => row.get(0),
            // Not migrated yet; any other failure fails the test (a 0 could pass a check).
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
            {
                0
            }
            Err(error) => panic!("counting the events: {error}"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        run_blocking(async move {
            if let Ok((client, connection)) =
                tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        });
    }
}

/// Runs a future to completion on a runtime of its own, from sync code (Drop).
pub fn run_blocking(future: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(future);
        }
    })
    .join();
}

/// Exchange and queue names of one test; the exchanges and queues are deleted on drop.
pub struct TestBroker {
    pub exchange: String,
    pub queue: String,
}

impl TestBroker {
    pub fn new() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Self {
            exchange: format!("test.{id}.events"),
            queue: format!("test.{id}.queue"),
        }
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Environment for the binaries.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AMQP_URL", AMQP_URL.to_string()),
            ("CATCHALL_EXCHANGE", self.exchange.clone()),
            ("CATCHALL_QUEUE", self.queue.clone()),
        ]
    }

    /// A channel with the test's topology declared and publisher confirms on.
    pub async fn channel(&self) -> (Connection, Channel) {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ must answer at 127.0.0.1:5672 (guest/guest)");
        let channel = connection.create_channel().await.expect("open a channel");
        catchall::amqp::Topology::new(&self.exchange, &self.queue, 20)
            .declare(&channel)
            .await
            .expect("declare the test topology");
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("enable publisher confirms");
        (connection, channel)
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("open a channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = connection.close(200, "".into()).await;
        declared.message_count()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        run_blocking(async move {
            if let Ok(connection) =
                Connection::connect(AMQP_URL, ConnectionProperties::default()).await
            {
                if let Ok(channel) = connection.create_channel().await {
                    // `.full`: a test's queue that refuses every message (it::producer).
                    for q in [
                        queue.clone(),
                        format!("{queue}.dead"),
                        format!("{queue}.full"),
                    ] {
                        let _ = channel
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    for e in [exchange.clone(), format!("{exchange}.dlx")] {
                        let _ = channel
                            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = connection.close(200, "".into()).await;
            }
        });
    }
}

/// Publishes a raw body with confirms, with or without a message id.
pub async fn publish_raw(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    message_id: Option<&str>,
) {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish");
    confirm.await.expect("publish confirmed");
}

/// A fresh database and topology, with a worker running on them and ready.
pub async fn started() -> (TestDb, TestBroker, TestWorker) {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let worker = TestWorker::start(TestWorker::config(&db, &broker)).await;
    worker.ready().await;
    (db, broker, worker)
}

/// A worker running in this process.
pub struct TestWorker {
    pub addr: SocketAddr,
    /// `ADMIN_ADDR`'s bound address, when the config set one.
    pub admin: Option<SocketAddr>,
    pub cancel: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
    /// This worker's own counts: the Prometheus metrics are the process', shared by every
    /// worker a test runs.
    worker_stats: std::sync::Arc<catchall::consumer::WorkerStats>,
}

/// A worker a test did not stop (it failed before `stop`) ends with it: otherwise it would
/// reconnect while the test's broker is dropped and declare its queues again, leaving them
/// behind.
impl Drop for TestWorker {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.handle.abort();
    }
}

impl TestWorker {
    pub fn config(db: &TestDb, broker: &TestBroker) -> Config {
        let mut config = Config::with_names(&db.url, &broker.exchange, &broker.queue);
        // Near midnight a claim writes its ids into two partitions (V11): no test's reading of
        // the table may depend on the hour it runs at.
        config.claim_window = Duration::ZERO;
        config
    }

    pub async fn start(config: Config) -> Self {
        Self::from_app(App::build(config).await.expect("worker starts"))
    }

    pub fn from_app(app: App) -> Self {
        // The metrics recorder and the tracing subscriber are one per process: the tests read
        // them as their own worker's only when each test runs in a process of its own.
        assert!(
            std::env::var_os("NEXTEST_RUN_ID").is_some(),
            "run the tests with `cargo nextest run` (one process per test), as `make test` does"
        );
        // Logs go to the test's output (shown when it fails); RUST_LOG sets the levels.
        catchall::telemetry::init(Some(catchall::config::LogFormat::Pretty));
        let (addr, admin) = (app.http_addr(), app.admin_addr());
        let worker_stats = app.stats();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(app.run(cancel.clone()));
        Self {
            addr,
            admin,
            cancel,
            handle,
            worker_stats,
        }
    }

    /// This worker's counts so far (not another worker's in the same process).
    pub fn stats(&self) -> catchall::consumer::StatsSnapshot {
        self.worker_stats.snapshot()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self) {
        let url = self.url("/readyz");
        wait_for(Duration::from_secs(30), "the worker to be ready", || {
            let url = url.clone();
            async move {
                let response = reqwest::get(&url).await.ok()?;
                (response.status() == 200).then_some(())
            }
        })
        .await;
    }

    /// Stops the worker cleanly and checks it stopped without error.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(15), &mut self.handle)
            .await
            .expect("worker stops within 15 s")
            .expect("worker task did not panic")
            .expect("worker stopped without error");
    }

    /// The value of one metric series in `/metrics`; an absent series fails the test (a
    /// renamed or unexported series must not read as 0).
    pub async fn metric(&self, series: &str) -> f64 {
        self.try_metric(series)
            .await
            .unwrap_or_else(|| panic!("{series} is not in /metrics"))
    }

    /// The value of one metric series in `/metrics`, `None` while it is not exported (a
    /// histogram before its first sample).
    pub async fn try_metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("body");
        metric_value(&text, series)
    }
}

/// The value of `series` (name with labels exactly as rendered) in a Prometheus text page.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// A local port where nothing listens: its socket is bound but not listening (connects are
/// refused) for as long as the caller keeps it, so no other test can take the port meanwhile.
pub fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let port = socket.local_addr().expect("its address").port();
    (socket, port)
}

/// A binary of the workspace, built beside the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// A file path of the test's own in the temporary directory, removed on drop (also when the
/// test fails).
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// `catchall-{name}-{uuid}.csv`.
    pub fn csv(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("catchall-{name}-{}.csv", uuid::Uuid::now_v7())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads a `--expect` CSV.
pub fn read_expect(path: &Path) -> Counts {
    std::fs::read_to_string(path)
        .expect("read the expect CSV")
        .lines()
        .skip(1)
        .map(|line| {
            let mut fields = line.split(',');
            let domain = fields.next().expect("domain").to_string();
            let delivered = fields.next().expect("delivered").parse().expect("number");
            let bounced = fields.next().expect("bounced").parse().expect("number");
            (domain, (delivered, bounced))
        })
        .collect()
}

/// `catchall-producer generate … --expect <temp file>` running in the background.
pub struct Producer {
    child: tokio::process::Child,
    expect: TempFile,
}

impl Producer {
    /// Starts `generate` with `args`, on the broker `env` names.
    pub fn spawn(env: Vec<(&'static str, String)>, args: &[&str]) -> Self {
        let expect = TempFile::csv("expect");
        let child = tokio::process::Command::new(binary("catchall-producer"))
            .envs(env)
            .arg("generate")
            .args(args)
            .arg("--expect")
            .arg(&expect.0)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start catchall-producer");
        Self { child, expect }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("the producer's pid") as i32
    }

    /// Waits (up to `within`) for the producer to exit, whatever its status: its output, and
    /// the events of its `--expect` CSV.
    pub async fn exit(self, within: Duration) -> (std::process::Output, i64) {
        let output = tokio::time::timeout(within, self.child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("the producer exits within {within:?}"))
            .expect("wait for the producer");
        let confirmed = read_expect(&self.expect.0)
            .values()
            .map(|(d, b)| d + b)
            .sum();
        (output, confirmed)
    }

    /// Stops the producer with SIGTERM: it settles what it sent, writes the counts it
    /// confirmed and exits 1 (a stopped stream is not a finished one). Those counts.
    pub async fn interrupt(self) -> Counts {
        let (status, summary, counts) = self.stop().await;
        assert_eq!(
            status.code(),
            Some(1),
            "a producer stopped by SIGTERM exits 1"
        );
        // A message given up on may be in the queue without being in the CSV: the counts would
        // then exceed it, and the test would fail on them, far from the cause.
        assert!(
            summary.contains(" 0 failed"),
            "the producer settled every message it sent: {summary}"
        );
        counts
    }

    /// Sends SIGTERM and waits for the exit: its status, its summary line and the counts of
    /// its `--expect` CSV.
    pub async fn stop(mut self) -> (std::process::ExitStatus, String, Counts) {
        use tokio::io::AsyncReadExt;
        let mut stdout = self.child.stdout.take().expect("the producer's stdout");
        let (status, took) = sigterm(&mut self.child, Duration::from_secs(60)).await;
        let mut summary = String::new();
        stdout
            .read_to_string(&mut summary)
            .await
            .expect("read the producer's summary");
        eprintln!(
            "producer stopped by SIGTERM in {:.1} s: {}",
            took.as_secs_f64(),
            summary.trim()
        );
        (
            status,
            summary.trim().to_string(),
            read_expect(&self.expect.0),
        )
    }

    /// Waits for the producer to exit 0 and returns the counts it confirmed.
    pub async fn finish(self) -> Counts {
        let output = tokio::time::timeout(Duration::from_secs(120), self.child.wait_with_output())
            .await
            .expect("the producer finishes within 120 s")
            .expect("wait for the producer");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "producer failed: {stdout}");
        eprintln!("producer: {}", stdout.trim());
        read_expect(&self.expect.0)
    }
}

/// Runs `catchall-producer generate` to the end and returns the expected counts it confirmed.
pub async fn generate(broker: &TestBroker, events: u64, batch: u32, seed: u64) -> Counts {
    let (events_arg, batch_arg, seed_arg) =
        (events.to_string(), batch.to_string(), seed.to_string());
    let args = [
        "--events",
        &events_arg,
        "--batch",
        &batch_arg,
        "--seed",
        &seed_arg,
    ];
    let counts = Producer::spawn(broker.env(), &args).finish().await;
    assert_eq!(
        counts.values().map(|(d, b)| d + b).sum::<i64>(),
        events as i64,
        "every event confirmed"
    );
    counts
}

/// Waits until the database holds `total` events, then checks every domain against `expected`.
pub async fn assert_counts_eventually(db: &TestDb, expected: &Counts, timeout: Duration) {
    let total: i64 = expected.values().map(|(d, b)| d + b).sum();
    wait_for(timeout, "every event to be counted", || async {
        let counted = db.total_events().await;
        assert!(
            counted <= total,
            "counted {counted} events, more than the {total} published"
        );
        (counted == total).then_some(())
    })
    .await;
    assert_counts_now(db, expected).await;
}

/// Checks every domain against `expected` now (after [`assert_counts_eventually`] and the
/// workers' stop: nothing was counted again later, by a late redelivery).
pub async fn assert_counts_now(db: &TestDb, expected: &Counts) {
    let actual = db.counts().await;
    assert_eq!(actual.len(), expected.len(), "same domains");
    for (domain, want) in expected {
        assert_eq!(actual.get(domain), Some(want), "counters of {domain}");
    }
}

/// Checks that the dedup table (`applied_messages`) holds exactly `messages` distinct message
/// ids: every message's id claimed (a lost one would be missing). Batch tokens (`\0catchall-batch\0…`, recorded only for
/// batches with id-less messages) are not message ids and are left out.
pub async fn assert_claimed_ids(db: &TestDb, messages: i64) {
    let token_prefix: &[u8] = b"\0catchall-batch\0";
    let claimed: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(DISTINCT message_id) FROM applied_messages \
             WHERE substring(message_id FOR length($1::bytea)) <> $1::bytea",
            &[&token_prefix],
        )
        .await
        .expect("count the claimed message ids")
        .get(0);
    assert_eq!(
        claimed, messages,
        "distinct message ids claimed in applied_messages"
    );
}

/// A message without an id holding one delivery to `domain`, ready for `Store::apply`.
pub fn one_delivery(domain: &str) -> catchall::store::Message {
    let body = serde_json::json!({"domain": domain, "type": "delivered"}).to_string();
    catchall::store::Message {
        id: None,
        events: catchall::event::parse_message(body.as_bytes()).expect("valid"),
    }
}

/// The worker binary on `db` and `broker`, with `settings` over their environment (an
/// `AMQP_URL` through a proxy, `SHUTDOWN_TIMEOUT`, ...); JSON logs to the test's stderr.
pub fn spawn_worker(
    db: &TestDb,
    broker: &TestBroker,
    settings: &[(&str, String)],
) -> tokio::process::Child {
    worker_command(db, broker, settings)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the worker binary")
}

/// The worker binary's command for `db` and `broker` on `HTTP_ADDR=127.0.0.1:0`, with
/// `settings` over that.
pub fn worker_command(
    db: &TestDb,
    broker: &TestBroker,
    settings: &[(&str, String)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("catchall"));
    command
        .envs(broker.env())
        .env("DATABASE_URL", &db.url)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        // The start-up line `spawn_on_a_port` reads is logged at info, whatever RUST_LOG says.
        .env(
            "RUST_LOG",
            match std::env::var("RUST_LOG") {
                Ok(filter) if !filter.is_empty() => format!("{filter},catchall::app=info"),
                _ => "info".to_string(),
            },
        )
        .envs(settings.iter().map(|(name, value)| (*name, value.as_str())))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// Starts `command` (a worker binary with `HTTP_ADDR=127.0.0.1:0` and JSON logs) and reads the
/// port it bound from its "Worker starting." line; its log goes on to the test's stderr. No
/// port is picked, freed and bound again, which another test could take in between.
pub async fn spawn_on_a_port(command: tokio::process::Command) -> (tokio::process::Child, u16) {
    let (child, (http, _)) = spawn_until_logged(command, "Worker starting.").await;
    (child, http)
}

/// [`spawn_on_a_port`] as soon as the worker listens, before it connects to Postgres ("Listening
/// while starting."): its HTTP port and, with `ADMIN_ADDR`, its admin port.
pub async fn spawn_listening(
    command: tokio::process::Command,
) -> (tokio::process::Child, u16, Option<u16>) {
    let (child, (http, admin)) = spawn_until_logged(command, "Listening while starting.").await;
    (child, http, admin)
}

/// [`spawn_on_a_port`] up to the log line `message`, which names the HTTP address (`http`) and
/// may name the admin one (`admin`).
async fn spawn_until_logged(
    mut command: tokio::process::Command,
    message: &'static str,
) -> (tokio::process::Child, (u16, Option<u16>)) {
    use tokio::io::AsyncBufReadExt;
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the worker binary");
    let stderr = child.stderr.take().expect("its stderr, piped");
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut port_tx = Some(port_tx);
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let port = |field: &str| {
                record[field]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .map(|addr: SocketAddr| addr.port())
            };
            if record["message"] == message
                && let Some(http) = port("http")
                && let Some(port_tx) = port_tx.take()
            {
                let _ = port_tx.send((http, port("admin")));
            }
        }
    });
    let port = tokio::time::timeout(Duration::from_secs(30), port_rx)
        .await
        .unwrap_or_else(|_| panic!("the worker logs {message:?} within 30 s"))
        .expect("the worker's start-up line names its HTTP address");
    (child, port)
}

/// Sends SIGTERM to `child` and waits at most `within` for it to exit: its status and how long
/// the stop took.
pub async fn sigterm(
    child: &mut tokio::process::Child,
    within: Duration,
) -> (std::process::ExitStatus, Duration) {
    // A child that already exited (a zombie) would take the signal too, and its own exit
    // status would pass for the stop's.
    match child.try_wait() {
        Ok(None) => {}
        Ok(Some(status)) => panic!("the child had already exited ({status}) before SIGTERM"),
        Err(error) => panic!("checking the child is still running before SIGTERM: {error}"),
    }
    let pid = child.id().expect("the child's pid") as i32;
    let stopped_at = std::time::Instant::now();
    // SAFETY: kill(2) on our own child process, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "send SIGTERM");
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the child exits within {within:?} of SIGTERM"))
        .expect("wait for the child");
    (status, stopped_at.elapsed())
}

/// Which queue of a TCP socket [`socket_queue_bytes`] sums.
pub enum Queue {
    /// Sent and not acknowledged by the peer, or not sent yet (`tx_queue`).
    Unsent,
    /// Received and not read by the process (`rx_queue`).
    Unread,
}

/// Bytes the kernel holds in `queue` of `pid`'s TCP sockets whose (local, remote) ports
/// `pick` takes (`/proc/<pid>/net/tcp`, its sockets found by inode among its file descriptors).
pub fn socket_queue_bytes(pid: u32, queue: Queue, pick: impl Fn(u16, u16) -> bool) -> u64 {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the process' file descriptors")
        .filter_map(|entry| {
            let link = std::fs::read_link(entry.ok()?.path()).ok()?;
            let link = link.to_str()?;
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next()?, 16).ok();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter_map(|line| {
            // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode …
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote) = (port(fields.get(1)?)?, port(fields.get(2)?)?);
            let (queues, inode) = (fields.get(4)?, fields.get(9)?);
            if !pick(local, remote) || !inodes.contains(*inode) {
                return None;
            }
            let (unsent, unread) = queues.split_once(':')?;
            let bytes = match queue {
                Queue::Unsent => unsent,
                Queue::Unread => unread,
            };
            u64::from_str_radix(bytes, 16).ok()
        })
        .sum()
}

/// Resident memory of a process now, from /proc (VmRSS).
pub fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// Peak resident memory of a process, from /proc (VmHWM).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// A size in `/proc/<pid>/status` (`field` with its colon), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        * 1024
}

/// The backends of this test's database waiting for a lock (`FROM …`).
pub const LOCK_WAITERS: &str =
    "FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";

/// How many backends of this test's database wait for a lock (`None` if the query fails).
pub async fn lock_waiters(client: &tokio_postgres::Client) -> Option<i64> {
    let row = client
        .query_one(&format!("SELECT count(*) {LOCK_WAITERS}"), &[])
        .await
        .ok()?;
    Some(row.get(0))
}

/// The lines of a child's piped stderr.
pub type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// Takes `child`'s piped stderr, as lines.
pub fn stderr_lines(child: &mut tokio::process::Child) -> LogLines {
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(child.stderr.take().expect("stderr piped")).lines()
}

/// Reads `lines` until one contains `wanted` (returned), panicking after `within`, or if a
/// line contains `forbidden`.
pub async fn log_line(
    lines: &mut LogLines,
    wanted: &str,
    forbidden: Option<&str>,
    within: Duration,
) -> String {
    tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await.expect("read the log") {
            eprintln!("{line}");
            if let Some(forbidden) = forbidden {
                assert!(!line.contains(forbidden), "{forbidden:?} logged: {line}");
            }
            if line.contains(wanted) {
                return line;
            }
        }
        panic!("the log ended without {wanted:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted:?} in the log within {within:?}"))
}
