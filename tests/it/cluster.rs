//! A cluster, not a node (SPEC §6): `AMQP_URL` lists several nodes and every (re)connection
//! tries them in turn; the broker's consumer-cancel and a silent broker (heartbeats) end the
//! consumer, which consumes again. The failover test runs against the 3-node cluster that
//! `.ci/cluster.sh` starts (catchall-c1..c3@localhost on 5701..5703).

use crate::helpers::{
    AMQP_URL, Producer, TestBroker, TestDb, TestWorker, assert_counts_now, wait_for,
};
use crate::proxy::Proxy;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

fn node_url(i: usize) -> String {
    format!("amqp://guest:guest@127.0.0.1:570{i}/%2f")
}

fn node_name(i: usize) -> String {
    format!("catchall-c{i}@localhost")
}

/// The nodes in the given order, as one `AMQP_URL`.
fn cluster_url(order: [usize; 3]) -> String {
    order.map(node_url).join(",")
}

/// The command `rabbitmqctl -n NODE ARGS…` as the rabbitmq user (who holds the Erlang cookie).
fn rabbitmqctl_command(node: usize, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("runuser");
    command
        .args([
            "-u",
            "rabbitmq",
            "--",
            "/usr/lib/rabbitmq/bin/rabbitmqctl",
            "-n",
        ])
        .arg(node_name(node))
        .args(args)
        .env("ERL_EPMD_ADDRESS", "127.0.0.1");
    command
}

/// `rabbitmqctl -n NODE ARGS…` as the rabbitmq user; panics when it fails.
async fn rabbitmqctl(node: usize, args: &[&str]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        rabbitmqctl_command(node, args).output(),
    )
    .await
    .expect("rabbitmqctl answers within 60 s")
    .expect("run rabbitmqctl (run .ci/cluster.sh first)");
    assert!(
        output.status.success(),
        "rabbitmqctl -n {} {args:?} failed: {}",
        node_name(node),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Starts every stopped node again and deletes the test's queues, even when the test fails.
struct ClusterGuard {
    exchange: String,
    queue: String,
    stopped: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        // Never panics (a panic in drop while the test fails would abort the process): every
        // result is ignored.
        let stopped = match self.stopped.lock() {
            Ok(mut stopped) => std::mem::take(&mut *stopped),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                for node in stopped {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(60),
                        rabbitmqctl_command(node, &["start_app"]).output(),
                    )
                    .await;
                }
                let url = cluster_url([1, 2, 3]);
                if let Ok(connection) = catchall::amqp::connect(&url, "test cleanup").await {
                    if let Ok(channel) = connection.create_channel().await {
                        for q in [queue.clone(), format!("{queue}.dead")] {
                            let _ = channel
                                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                                .await;
                        }
                        for e in [exchange.clone(), format!("{exchange}.dlx")] {
                            let _ = channel
                                .exchange_delete(
                                    e.as_str().into(),
                                    ExchangeDeleteOptions::default(),
                                )
                                .await;
                        }
                    }
                    let _ = connection.close(200, "".into()).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Spells of not being ready: since when, and until when (`None` while it lasts).
type Spells = Arc<Mutex<Vec<(Instant, Option<Instant>)>>>;

/// Watches a worker's `/readyz` every 50 ms and records the spells it was not ready.
struct ReadyWatch {
    unready: Spells,
    stop: Arc<AtomicBool>,
}

impl ReadyWatch {
    fn start(worker: &TestWorker) -> Self {
        let url = worker.url("/readyz");
        let unready: Spells = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (spells, done) = (unready.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !done.load(Ordering::SeqCst) {
                let ready = matches!(
                    client.get(&url).timeout(Duration::from_secs(1)).send().await,
                    Ok(response) if response.status() == 200
                );
                let mut spells = spells.lock().await;
                match (ready, spells.last_mut()) {
                    (false, Some((_, None))) => {}
                    (false, _) => spells.push((Instant::now(), None)),
                    (true, Some((_, end @ None))) => *end = Some(Instant::now()),
                    (true, _) => {}
                }
                drop(spells);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { unready, stop }
    }

    /// Seconds not ready since `since`; `None` while still not ready.
    async fn unready_since(&self, since: Instant) -> Option<f64> {
        let spells = self.unready.lock().await;
        let mut total = 0.0;
        for (start, end) in spells.iter().filter(|(start, _)| *start >= since) {
            total += (*end)?.duration_since(*start).as_secs_f64();
        }
        Some(total)
    }

    /// Whether it has been not ready at some point since `since`.
    async fn went_unready(&self, since: Instant) -> bool {
        self.unready
            .lock()
            .await
            .iter()
            .any(|(start, _)| *start >= since)
    }

    async fn ready(&self) -> bool {
        !matches!(self.unready.lock().await.last(), Some((_, None)))
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The queue's Raft leader, as a node number.
async fn leader(up: usize, queue: &str) -> usize {
    let listing = rabbitmqctl(
        up,
        &["list_queues", "name", "leader", "-q", "--no-table-headers"],
    )
    .await;
    let line = listing
        .lines()
        .find(|line| line.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} listed: {listing}"));
    (1..=3)
        .find(|&i| line.contains(&node_name(i)))
        .unwrap_or_else(|| panic!("a leader in {line}"))
}

/// Whether `node` lists all three nodes among the queue's online members (false when
/// rabbitmqctl fails or does not answer within 10 s: the node may still be starting).
async fn all_members_online(node: usize, queue: &str) -> bool {
    let command = rabbitmqctl_command(
        node,
        &["list_queues", "name", "online", "-q", "--no-table-headers"],
    )
    .kill_on_drop(true)
    .output();
    let Ok(Ok(output)) = tokio::time::timeout(Duration::from_secs(10), command).await else {
        return false;
    };
    let listing = String::from_utf8_lossy(&output.stdout);
    output.status.success()
        && listing
            .lines()
            .find(|line| line.split_whitespace().next() == Some(queue))
            .is_some_and(|line| (1..=3).all(|i| line.contains(&node_name(i))))
}

/// Two workers and the producer, each given the three nodes in a different order. The node
/// each worker is on, then the queue's leader (and the producer's node) are stopped one after
/// another while events flow at 3,000 a second (a stream of 3,000,000, stopped by SIGTERM once
/// the last node is back: a stream of fixed length could end before the last outage on a slow
/// machine, and could then not show counting during it): each worker is ready again within 15 s (the
/// seconds are printed, not asserted: speed is for benchmarks) while the node is still
/// down, counting goes on during every outage, and every domain ends equal to the producer's
/// confirmed counts (nothing lost, nothing doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_failover_counts_every_event() {
    let db = TestDb::create().await;
    let broker = TestBroker::new(); // names only; the topology lives on the cluster
    let stopped = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _guard = ClusterGuard {
        exchange: broker.exchange.clone(),
        queue: broker.queue.clone(),
        stopped: stopped.clone(),
    };

    let mut config = TestWorker::config(&db, &broker);
    config.amqp.amqp_url = cluster_url([1, 2, 3]);
    let a = TestWorker::start(config.clone()).await;
    a.ready().await;
    config.amqp.amqp_url = cluster_url([2, 3, 1]);
    let b = TestWorker::start(config).await;
    b.ready().await;
    let members = rabbitmqctl(
        1,
        &[
            "list_queues",
            "name",
            "type",
            "members",
            "-q",
            "--no-table-headers",
        ],
    )
    .await;
    let line = members
        .lines()
        .find(|line| line.split_whitespace().next() == Some(broker.queue.as_str()))
        .unwrap_or_else(|| panic!("queue listed: {members}"));
    assert!(
        line.contains("quorum") && (1..=3).all(|i| line.contains(&node_name(i))),
        "a quorum queue on all three nodes: {line}"
    );
    let watches = [ReadyWatch::start(&a), ReadyWatch::start(&b)];

    let env = vec![
        ("AMQP_URL", cluster_url([3, 1, 2])),
        ("CATCHALL_EXCHANGE", broker.exchange.clone()),
        ("CATCHALL_QUEUE", broker.queue.clone()),
    ];
    let producer = Producer::spawn(
        env,
        &[
            "--events", "3000000", "--batch", "25", "--rate", "3000", "--seed", "77",
        ],
    );
    wait_for(Duration::from_secs(30), "events to flow", || async {
        (db.total_events().await > 5_000).then_some(())
    })
    .await;

    // Worker a is on c1, worker b on c2 (the first of their lists); then the leader.
    let mut report = Vec::new();
    let mut lost = Vec::new();
    for (what, node) in [
        ("worker a's node", Some(1)),
        ("worker b's node", Some(2)),
        ("the queue leader", None),
        ("the producer's node", Some(3)),
    ] {
        let node = match node {
            Some(node) => node,
            None => leader(3, &broker.queue).await,
        };
        if lost.contains(&node) {
            continue; // the leader was on a node already lost once
        }
        lost.push(node);
        let since = Instant::now();
        // Listed first: the guard starts it again should stop_app fail half-way.
        stopped.lock().unwrap().push(node);
        rabbitmqctl(node, &["stop_app"]).await;
        let stopped_at = since.elapsed().as_secs_f64();
        // Read once the node is down: what is counted from here on is counted during the outage.
        let before = db.total_events().await;
        // Ready again while the node is still down.
        let mut unready = Vec::new();
        for (name, watch) in ["a", "b"].iter().zip(&watches) {
            let seconds = wait_for(
                Duration::from_secs(15),
                "the worker ready again",
                || async {
                    if !watch.ready().await {
                        return None;
                    }
                    watch.unready_since(since).await
                },
            )
            .await;
            unready.push(format!("{name} {seconds:.1} s"));
        }
        // Counting goes on while the node is down.
        db.wait_total_past(
            before + 2_000,
            Duration::from_secs(20),
            "counting to go on during the outage",
        )
        .await;
        report.push(format!(
            "{what} {} (stop_app took {stopped_at:.1} s): unready {}",
            node_name(node),
            unready.join(", ")
        ));
        rabbitmqctl(node, &["start_app"]).await;
        stopped.lock().unwrap().retain(|n| *n != node);
        // The queue's three members online again before the next stop, which would otherwise
        // leave the queue without a quorum.
        wait_for(
            Duration::from_secs(60),
            "the queue's three members online again",
            || async { all_members_online(node, &broker.queue).await.then_some(()) },
        )
        .await;
    }
    eprintln!("failover:\n  {}", report.join("\n  "));

    // Counting on with every node back, then the stream stopped: what the producer confirmed
    // is what must be counted.
    let before = db.total_events().await;
    db.wait_total_past(
        before + 2_000,
        Duration::from_secs(20),
        "counting to go on with every node back",
    )
    .await;
    let expected = producer.interrupt().await;
    let confirmed = expected.values().map(|(d, b)| d + b).sum::<i64>();
    eprintln!("{confirmed} events confirmed");
    assert!(
        confirmed > before + 2_000,
        "the CSV holds what was counted: {confirmed}"
    );
    wait_for(
        Duration::from_secs(60),
        "every domain to equal --expect",
        || async { (db.counts().await == expected).then_some(()) },
    )
    .await;
    drop(watches);
    a.stop().await;
    b.stop().await;
    // Still exact once both stopped: nothing counted again later (a late redelivery).
    assert_counts_now(&db, &expected).await;
}

/// The broker cancels the consumer when its queue is deleted (as it does when a queue moves):
/// the worker consumes again at once, re-declaring the queue, and counts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_consumer_cancel_consumes_again() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let worker = TestWorker::start(TestWorker::config(&db, &broker)).await;
    worker.ready().await;

    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    channel
        .queue_delete(broker.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue under the worker");
    let started = Instant::now();
    // The worker declares the queue again when it consumes again.
    wait_for(
        Duration::from_secs(10),
        "the queue declared again",
        || async {
            let channel = connection.create_channel().await.ok()?;
            channel
                .queue_declare(
                    broker.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()
        },
    )
    .await;
    worker.ready().await;
    eprintln!(
        "consuming again {:.2} s after the cancel",
        started.elapsed().as_secs_f64()
    );
    let (_publisher, publisher_channel) = broker.channel().await;
    crate::helpers::publish_raw(
        &publisher_channel,
        &broker.exchange,
        "delivered",
        br#"{"domain":"after-cancel.example","type":"delivered"}"#,
        Some("after-cancel-1"),
    )
    .await;
    wait_for(Duration::from_secs(10), "the event counted", || async {
        db.counts()
            .await
            .get("after-cancel.example")
            .copied()
            .filter(|c| *c == (1, 0))
    })
    .await;
    let _ = connection.close(200, "".into()).await;
    worker.stop().await;
}

/// A broker that stops answering without closing the socket is noticed by heartbeats
/// (`heartbeat=1` here): the worker leaves the silent node for the next one and counts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_heartbeat_leaves_a_silent_node() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let mut config = TestWorker::config(&db, &broker);
    config.amqp.amqp_url = format!(
        "amqp://guest:guest@{}/%2f?heartbeat=1,{AMQP_URL}",
        proxy.addr
    );
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let watch = ReadyWatch::start(&worker);

    let since = Instant::now();
    proxy.swallow_replies();
    wait_for(
        Duration::from_secs(15),
        "the worker to leave the silent node",
        || async { watch.went_unready(since).await.then_some(()) },
    )
    .await;
    let noticed = since.elapsed().as_secs_f64();
    worker.ready().await;
    eprintln!(
        "silent node noticed after {noticed:.1} s, consuming again after {:.1} s",
        since.elapsed().as_secs_f64()
    );
    let (_publisher, channel) = broker.channel().await;
    crate::helpers::publish_raw(
        &channel,
        &broker.exchange,
        "delivered",
        br#"{"domain":"after-silence.example","type":"delivered"}"#,
        Some("after-silence-1"),
    )
    .await;
    wait_for(Duration::from_secs(10), "the event counted", || async {
        db.counts()
            .await
            .get("after-silence.example")
            .copied()
            .filter(|c| *c == (1, 0))
    })
    .await;
    drop(watch);
    worker.stop().await;
}
