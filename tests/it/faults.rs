//! Exactly-once counting under faults (SPEC §4): connections cut and the worker stopped at the
//! worst moments while a stream of events flows; afterwards the counters equal what the producer
//! confirmed — nothing lost, nothing doubled — and the worker is ready again by itself.

use crate::helpers::*;
use crate::proxy::Proxy;
use catchall::config::Config;
use catchall::consumer::{FaultHook, FaultPoint};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// A test's database and topology, with fault-injecting proxies in front of RabbitMQ and Postgres.
pub struct Rig {
    pub db: TestDb,
    pub broker: TestBroker,
    pub amqp: Arc<Proxy>,
    pub pg: Arc<Proxy>,
}

impl Rig {
    pub async fn new() -> Self {
        Self {
            db: TestDb::create().await,
            broker: TestBroker::new(),
            amqp: Arc::new(Proxy::start("127.0.0.1:5672").await),
            pg: Arc::new(Proxy::start("127.0.0.1:5432").await),
        }
    }

    /// A worker configuration that reaches both services through the proxies.
    pub fn config(&self) -> Config {
        let mut config = TestWorker::config(&self.db, &self.broker);
        config.amqp.amqp_url = format!("amqp://guest:guest@{}/%2f", self.amqp.addr);
        config.database_url = format!("postgres://postgres@{}/{}", self.pg.addr, self.db.name);
        config
    }

    /// Starts `catchall-producer generate` in the background, publishing straight to RabbitMQ
    /// (or through the AMQP proxy), with a 3 s confirm timeout.
    pub fn producer(&self, events: u64, rate: u64, seed: u64, through_proxy: bool) -> Producer {
        self.producer_with_confirm_timeout(events, rate, seed, through_proxy, "3s")
    }

    /// [`Rig::producer`] with its `--confirm-timeout` (past it a message is published again).
    pub fn producer_with_confirm_timeout(
        &self,
        events: u64,
        rate: u64,
        seed: u64,
        through_proxy: bool,
        confirm_timeout: &str,
    ) -> Producer {
        let mut env = self.broker.env();
        if through_proxy {
            env.push((
                "AMQP_URL",
                format!("amqp://guest:guest@{}/%2f", self.amqp.addr),
            ));
        }
        let (events, rate, seed) = (events.to_string(), rate.to_string(), seed.to_string());
        Producer::spawn(
            env,
            &[
                "--events",
                &events,
                "--rate",
                &rate,
                "--seed",
                &seed,
                "--confirm-timeout",
                confirm_timeout,
            ],
        )
    }

    /// Waits until at least `events` are counted, so a fault lands mid-stream.
    pub async fn counted_at_least(&self, events: i64) {
        wait_for(Duration::from_secs(60), "events to flow", || async {
            (self.db.total_events().await >= events).then_some(())
        })
        .await;
    }
}

/// What a fault hook does when it fires.
#[derive(Clone)]
pub enum Action {
    /// Cut the Postgres proxy before `COMMIT`, restoring it after a while.
    CutPgBeforeCommit,
    /// Let `COMMIT` reach Postgres but swallow its answer, then cut: committed, but the worker
    /// sees an error and retries the batch.
    LoseCommitReply,
    /// Stop between commit and ack until the test lets go (the test kills the worker meanwhile).
    HoldAfterCommit(Arc<Notify>, Arc<Notify>),
    /// Hold the `COMMIT` (and all else sent on the Postgres connections open then) in the
    /// proxy until the test releases it.
    HoldCommit,
}

/// A fault hook that performs one armed action at its point, once.
#[derive(Clone, Default)]
pub struct Trigger {
    armed: Arc<Mutex<Option<Action>>>,
    pub fired: Arc<std::sync::atomic::AtomicU64>,
}

impl Trigger {
    pub fn arm(&self, action: Action) {
        *self.armed.lock().unwrap() = Some(action);
    }

    pub fn disarm(&self) {
        self.armed.lock().unwrap().take();
    }

    pub fn hook(&self, pg: Arc<Proxy>) -> FaultHook {
        let trigger = self.clone();
        Arc::new(move |point| {
            let mut armed = trigger.armed.lock().unwrap();
            let action = match (&*armed, point) {
                (Some(Action::HoldAfterCommit(..)), FaultPoint::AfterCommit)
                | (
                    Some(Action::CutPgBeforeCommit | Action::LoseCommitReply | Action::HoldCommit),
                    FaultPoint::BeforeCommit,
                ) => armed.take(),
                _ => None,
            };
            drop(armed);
            // Nothing armed for this point: the batch goes on as in production.
            let action = action?;
            let pg = pg.clone();
            let fired = trigger.fired.clone();
            Some(Box::pin(async move {
                fired.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match action {
                    Action::CutPgBeforeCommit => {
                        pg.cut();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            pg.restore();
                        });
                    }
                    Action::LoseCommitReply => {
                        // Before the COMMIT goes out: its answer will be lost, then the
                        // connection cut.
                        let before = pg.commits_swallowed();
                        pg.swallow_replies();
                        tokio::spawn(async move {
                            // Postgres has answered the COMMIT (however late this task runs
                            // or the server is), and its answer was swallowed: cut now. Cut
                            // and restored regardless after 10 s (no COMMIT went out: the
                            // test's own wait for a duplicate then fails, and says so).
                            let answered = tokio::time::timeout(Duration::from_secs(10), async {
                                while pg.commits_swallowed() == before {
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                            })
                            .await;
                            if answered.is_err() {
                                eprintln!("fault: no COMMIT answered within 10 s; cutting anyway");
                            }
                            pg.cut();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            pg.restore();
                        });
                    }
                    Action::HoldCommit => pg.hold_open_connections(),
                    Action::HoldAfterCommit(held, release) => {
                        held.notify_one();
                        release.notified().await;
                    }
                }
            }))
        })
    }
}

/// Starts a worker with a fault hook installed.
pub async fn start_with_hook(config: Config, hook: FaultHook) -> TestWorker {
    let mut app = catchall::app::App::build(config)
        .await
        .expect("worker starts");
    app.set_fault_hook(hook);
    TestWorker::from_app(app)
}

/// The broker's pids of the connections named `name` (their `connection_name`).
pub async fn broker_connections(name: &str) -> Vec<String> {
    let listed = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("rabbitmqctl")
            .args(["list_connections", "pid", "client_properties", "-q"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("rabbitmqctl list_connections answers within 60 s")
    .expect("rabbitmqctl must be installed");
    assert!(
        listed.status.success(),
        "rabbitmqctl list_connections: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    // One line per connection: `<pid>\t[client properties, with {"connection_name","…"}]`.
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, properties)| properties.contains(&format!("\"{name}\"")))
        .map(|(pid, _)| pid.to_string())
        .collect()
}

/// Closes, from the broker side, every connection named `name`.
pub async fn broker_closes_connections(name: &str) -> usize {
    let mut closed = 0;
    for pid in broker_connections(name).await {
        let status = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("rabbitmqctl")
                .args(["close_connection", &pid, "fault injection by a test", "-q"])
                .kill_on_drop(true)
                .status(),
        )
        .await
        .expect("rabbitmqctl close_connection answers within 60 s")
        .expect("rabbitmqctl close_connection");
        assert!(status.success(), "rabbitmqctl close_connection {pid}");
        closed += 1;
    }
    closed
}

const EVENTS: u64 = 50_000;
const RATE: u64 = 20_000;

/// Runs one fault against a flowing stream and checks exact counters and recovery.
async fn survives(seed: u64, inject: impl AsyncFnOnce(&Rig, &TestWorker, &Trigger)) {
    let rig = Rig::new().await;
    let trigger = Trigger::default();
    let worker = start_with_hook(rig.config(), trigger.hook(rig.pg.clone())).await;
    worker.ready().await;
    let producer = rig.producer(EVENTS, RATE, seed, false);
    rig.counted_at_least(10_000).await;
    inject(&rig, &worker, &trigger).await;
    let expected = producer.finish().await;
    assert_counts_eventually(&rig.db, &expected, Duration::from_secs(60)).await;
    worker.ready().await;
    worker.stop().await;
    assert_exactly_once_after_stop(&rig.db, &expected).await;
}

/// After the workers stopped: the counters still equal `expected` (no late redelivery counted
/// again), and each of the generator's messages (one event each, each with its own id) had its
/// id claimed.
async fn assert_exactly_once_after_stop(db: &TestDb, expected: &Counts) {
    assert_counts_now(db, expected).await;
    assert_claimed_ids(db, expected.values().map(|(d, b)| d + b).sum()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_connection_cut_mid_batch() {
    survives(21, async |rig, worker, _| {
        rig.amqp.cut();
        wait_for(Duration::from_secs(10), "the worker to notice", || async {
            (worker.stats().reconnects >= 1).then_some(())
        })
        .await;
        rig.amqp.restore();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_cut_before_commit() {
    survives(22, async |_, worker, trigger| {
        trigger.arm(Action::CutPgBeforeCommit);
        wait_for(Duration::from_secs(10), "a commit to fail", || async {
            (worker.stats().db_errors >= 1).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_cut_after_commit_before_ack() {
    survives(23, async |rig, worker, trigger| {
        trigger.arm(Action::LoseCommitReply);
        // The batch committed, the worker saw an error and applied it again: every message of
        // it is already claimed, and the retry recognises the batch as committed (reported as
        // the attempt that committed counted it, not as duplicates).
        wait_for(
            Duration::from_secs(10),
            "the retried batch to be recognised as committed",
            || async {
                let stats = worker.stats();
                (stats.db_errors >= 1 && stats.recovered >= 1).then_some(())
            },
        )
        .await;
        // The COMMIT whose answer was lost must have happened.
        assert!(
            rig.pg.commits_swallowed() >= 1,
            "a COMMIT's answer was swallowed (the fault's COMMIT reached Postgres)"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_between_commit_and_ack() {
    let rig = Rig::new().await;
    let trigger = Trigger::default();
    let mut worker = start_with_hook(rig.config(), trigger.hook(rig.pg.clone())).await;
    worker.ready().await;
    let producer = rig.producer(EVENTS, RATE, 24, false);
    rig.counted_at_least(10_000).await;

    let (held, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    trigger.arm(Action::HoldAfterCommit(held.clone(), release.clone()));
    tokio::time::timeout(Duration::from_secs(10), held.notified())
        .await
        .expect("a batch committed (and held before its ack) within 10 s");
    // The batch is committed and not acked: the worker dies now. Its connections drop, as a
    // crashed process's would, and it never acks.
    rig.amqp.cut();
    rig.pg.cut();
    worker.cancel.cancel();
    release.notify_one();
    // Ended before the proxies let connections through again: it cannot ack after all. Its
    // outcome (an error, most likely, with its connections cut) does not matter.
    let _outcome = tokio::time::timeout(Duration::from_secs(15), &mut worker.handle)
        .await
        .expect("the killed worker ended within 15 s");
    rig.amqp.restore();
    rig.pg.restore();

    let restarted = TestWorker::start(rig.config()).await;
    let expected = producer.finish().await;
    assert_counts_eventually(&rig.db, &expected, Duration::from_secs(60)).await;
    // The counters are visible once the commit is; the worker's own stats follow right after.
    wait_for(
        Duration::from_secs(10),
        "the committed, unacked batch to come back and be skipped by the new worker",
        || async { (restarted.stats().duplicates >= 1).then_some(()) },
    )
    .await;
    restarted.ready().await;
    restarted.stop().await;
    assert_exactly_once_after_stop(&rig.db, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closes_all_connections() {
    survives(25, async |rig, worker, _| {
        let closed =
            broker_closes_connections(&format!("catchall-worker {}", rig.broker.queue)).await;
        assert_eq!(closed, 1, "the worker's connection was found and closed");
        wait_for(
            Duration::from_secs(10),
            "the worker to reconnect",
            || async { (worker.stats().reconnects >= 1).then_some(()) },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_longer_than_a_batch_timeout() {
    let rig = Rig::new().await;
    let config = rig.config();
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    // A long confirm timeout: a copy published again would be in the queue twice, and the
    // count of held messages below assumes each message is there once.
    let producer = rig.producer_with_confirm_timeout(EVENTS, 50_000, 26, false, "60s");
    rig.counted_at_least(5_000).await;
    rig.pg.cut();

    // Not ready, with the reason.
    let reason = wait_for(Duration::from_secs(10), "/readyz to say 503", || async {
        let response = reqwest::get(worker.url("/readyz")).await.ok()?;
        (response.status() == 503).then_some(())?;
        response.json::<serde_json::Value>().await.ok()
    })
    .await;
    assert!(
        reason["error"].as_str().unwrap().contains("Postgres"),
        "{reason}"
    );
    // Look-ups read the same Postgres: not ready for them either (once the last ping's
    // outcome, fresh for a second, is past).
    wait_for(
        Duration::from_secs(10),
        "/readyz/lookups to say 503: look-ups need the Postgres that is cut",
        || async {
            let response = reqwest::get(worker.url("/readyz/lookups")).await.ok()?;
            (response.status() == 503).then_some(())
        },
    )
    .await;

    // The producer finishes while Postgres is down: the worker holds at most the prefetch, the
    // rest waits in the queue.
    let expected = producer.finish().await;
    let counted = rig.db.total_events().await;
    let ready_in_queue = i64::from(rig.broker.depth(&rig.broker.queue).await);
    eprintln!("Postgres down: {counted} counted, {ready_in_queue} waiting in the queue");
    // Single-event messages: what is neither counted nor queued is held by the worker, unacked.
    let held = EVENTS as i64 - counted - ready_in_queue;
    let prefetch = worker.metric("catchall_prefetch_messages").await as i64;
    assert!(
        (1..=prefetch).contains(&held),
        "the worker holds what it could not commit, within its prefetch ({prefetch}): {held} held"
    );
    // Down for longer than a batch timeout: another failed attempt after the producer ended.
    let errors = worker.stats().db_errors;
    wait_for(
        Duration::from_secs(30),
        "another failed attempt",
        || async { (worker.stats().db_errors > errors).then_some(()) },
    )
    .await;
    assert_eq!(
        i64::from(rig.broker.depth(&rig.broker.queue).await),
        ready_in_queue,
        "no new messages taken"
    );

    rig.pg.restore();
    assert_counts_eventually(&rig.db, &expected, Duration::from_secs(60)).await;
    worker.ready().await;
    worker.stop().await;
    assert_exactly_once_after_stop(&rig.db, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_survives_its_broker_connection_cut() {
    let rig = Rig::new().await;
    let worker = TestWorker::start(TestWorker::config(&rig.db, &rig.broker)).await;
    worker.ready().await;
    // 5,000 a second: the stream lasts 10 s, and the cut lands well within it.
    let producer = rig.producer(EVENTS, 5_000, 27, true);
    rig.counted_at_least(10_000).await;
    let accepted = rig.amqp.accepted();
    let open = rig.amqp.drop_connections();
    assert!(open >= 1, "the cut dropped the producer's open connection");
    let expected = producer.finish().await;
    assert!(
        rig.amqp.accepted() > accepted,
        "the producer connected again after the cut ({accepted} connections before it)"
    );
    assert_eq!(
        expected.values().map(|(d, b)| d + b).sum::<i64>(),
        EVENTS as i64,
        "every event confirmed"
    );
    assert_counts_eventually(&rig.db, &expected, Duration::from_secs(60)).await;
    worker.stop().await;
    assert_exactly_once_after_stop(&rig.db, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_reply_does_not_double_count_messages_without_ids() {
    let rig = Rig::new().await;
    let trigger = Trigger::default();
    let worker = start_with_hook(rig.config(), trigger.hook(rig.pg.clone())).await;
    worker.ready().await;
    // The first batch's COMMIT goes through, its reply is lost; the worker retries that batch.
    trigger.arm(Action::LoseCommitReply);
    let (_connection, channel) = rig.broker.channel().await;
    let mut expected = Counts::new();
    for i in 0..300 {
        let domain = format!("noid{}.example", i % 7);
        let body = format!(r#"{{"domain":"{domain}","type":"delivered"}}"#);
        publish_raw(
            &channel,
            &rig.broker.exchange,
            "delivered",
            body.as_bytes(),
            None,
        )
        .await;
        expected.entry(domain).or_default().0 += 1;
    }
    wait_for(Duration::from_secs(30), "every message settled", || async {
        let stats = worker.stats();
        (stats.applied + stats.duplicates >= 300 && rig.broker.depth(&rig.broker.queue).await == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        trigger.fired.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the fault fired"
    );
    assert!(worker.stats().db_errors >= 1);
    assert!(
        rig.pg.commits_swallowed() >= 1,
        "a COMMIT's answer was swallowed (the fault's COMMIT reached Postgres)"
    );
    // The batch whose reply was lost is recognised by its token: not applied again, and
    // reported as the attempt that committed it counted it (it was reported as duplicates, and
    // its events were missing from the worker's counts and catchall_events_total).
    let stats = worker.stats();
    assert!(stats.recovered >= 1, "{stats:?}");
    assert_eq!(
        (stats.applied, stats.duplicates),
        (300, 0),
        "every message reported applied, once"
    );
    assert_eq!(rig.db.counts().await, expected, "counted once");
    worker.ready().await;
    worker.stop().await;
}

/// A panic on the consumer's task (here injected where a committed batch is acked) stops the
/// worker with an error that names it, as a server's end does: the task died alone, and the
/// worker went on answering `/readyz` 200 and serving look-ups, never consuming again, and
/// exited 0 at its stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_consumer_stops_the_worker_with_an_error() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let hook: FaultHook = Arc::new(|point| match point {
        FaultPoint::AfterCommit => panic!("injected: the consumer panics after a commit"),
        FaultPoint::BeforeCommit | FaultPoint::BeforeRaise => None,
    });
    let mut worker = start_with_hook(TestWorker::config(&db, &broker), hook).await;
    worker.ready().await;
    let (_connection, channel) = broker.channel().await;
    publish_raw(
        &channel,
        &broker.exchange,
        "delivered",
        br#"{"domain":"panic.example","type":"delivered"}"#,
        None,
    )
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(30), &mut worker.handle)
        .await
        .expect("the worker stops by itself")
        .expect("App::run itself did not panic");
    let error = ended.expect_err("the worker stops with an error");
    assert!(
        format!("{error:#}").contains("consumer"),
        "the error names the consumer: {error:#}"
    );
}

/// A stop while the prefetch is being raised and the broker does not answer (the raise's
/// replies never come) ends the worker cleanly and in time, and loses nothing: what it had
/// gathered comes back to the next worker. The raise was not raced against the stop, which
/// then waited for the heartbeat to give up on the broker, past SHUTDOWN_TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_prefetch_is_raised_and_the_broker_does_not_answer_is_clean() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let raising = Arc::new(Notify::new());
    let hook: FaultHook = {
        let raising = raising.clone();
        Arc::new(move |point| {
            (point == FaultPoint::BeforeRaise).then(
                || -> futures_util::future::BoxFuture<'static, ()> {
                    let raising = raising.clone();
                    Box::pin(async move {
                        raising.notify_one();
                        std::future::pending::<()>().await;
                    })
                },
            )
        })
    };
    let worker = start_with_hook(TestWorker::config(&db, &broker), hook).await;
    // Single-event messages: after a first window of 64 and a commit, the prefetch is raised.
    let expected = generate(&broker, 500, 1, 27).await;
    tokio::time::timeout(Duration::from_secs(30), raising.notified())
        .await
        .expect("the worker raises its prefetch");
    // Within 15 s and without an error (it waited for the broker's replies for ever).
    worker.stop().await;
    let next = TestWorker::start(TestWorker::config(&db, &broker)).await;
    assert_counts_eventually(&db, &expected, Duration::from_secs(60)).await;
    next.stop().await;
    assert_counts_now(&db, &expected).await;
}
