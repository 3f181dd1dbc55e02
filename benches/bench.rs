//! `make bench`: how close the worker comes to what RabbitMQ and Postgres themselves can do on
//! this machine, measured in one run (issue 4).
//!
//! Every stage drains a pre-filled queue of the same events, in a database of its own cloned from
//! one template (so each starts from the same `domains` table):
//! - single: N single-event messages with a `message_id`. Ceiling: a no-op consumer with the
//!   worker's prefetch and multi-ack pattern. Worker: the release `catchall` binary, dedup on
//!   (and off: the same messages without `message_id`).
//! - batched: the same events, 100 per message. Ceiling: the worker's own `Store::apply` on the
//!   same batches, straight to Postgres. Worker: the binary again, while HTTP look-ups of random
//!   known domains run at a fixed concurrency.
//!
//! Scale with `BENCH_EVENTS` (default 500,000) and `BENCH_DOMAINS` (default 100,000); the
//! worker's settings come from its own defaults or the usual variables (`BATCH_SIZE`, …).
//! Writes `target/bench/latest.json`.

use anyhow::{Context, Result, bail};
use catchall::amqp::Topology;
use catchall::config::Config;
use catchall::event::{Event, EventType, parse_message};
use catchall::store::{Message, Store};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

// The HTTP stage (issue 10): its own module, so the stages stay apart.
mod http_stage;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PG_HOST: &str = "postgres://postgres@127.0.0.1:5432";
const PER_MESSAGE: usize = 100;
const LOOKUP_CONCURRENCY: usize = 4;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn domain(i: u64) -> String {
    format!("d{i}.bench.example")
}

struct Run {
    id: String,
    events: Vec<Event>,
    domains: u64,
    config: Config,
    template: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // BENCH_STAGES=http runs only the HTTP stage (ingest, listing, bulk look-up).
    if std::env::var("BENCH_STAGES").is_ok_and(|s| s == "http") {
        let report = http_stage::http_stage().await?;
        http_stage::print_http(&report);
        std::fs::create_dir_all("target/bench").context("creating target/bench")?;
        std::fs::write(
            "target/bench/http.json",
            serde_json::to_string_pretty(&report)?,
        )
        .context("writing target/bench/http.json")?;
        println!("\nwritten: target/bench/http.json");
        return Ok(());
    }
    let events_n = env_u64("BENCH_EVENTS", 500_000);
    let domains = env_u64("BENCH_DOMAINS", 100_000).max(1);
    // The worker's own defaults, overridden by the usual variables, as the binary reads them.
    let config = <catchall::config::Cli as clap::Parser>::parse_from(["catchall"]).config;
    let id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let mut rng = StdRng::seed_from_u64(42);
    let events: Vec<Event> = (0..events_n)
        .map(|_| Event {
            domain: domain(rng.random_range(0..domains)),
            kind: if rng.random_ratio(1, 50) {
                EventType::Bounced
            } else {
                EventType::Delivered
            },
            evidence: None,
        })
        .collect();
    eprintln!(
        "bench: {events_n} events over {domains} domains; BATCH_SIZE={} BATCH_TIMEOUT_MS={} PREFETCH={} DB_POOL_SIZE={} IN_FLIGHT={}",
        config.batch_size,
        config.batch_timeout_ms,
        config.prefetch,
        config.db_pool_size,
        config.in_flight
    );
    let template = format!("bench_tpl_{id}");
    let run = Run {
        id,
        events,
        domains,
        config,
        template,
    };
    let started = Instant::now();
    let result = match run.create_template().await {
        Ok(()) => run.all().await,
        Err(error) => Err(error),
    };
    run.drop_db(&run.template).await;
    let mut report = result?;
    if std::env::var("BENCH_STAGES").is_err() {
        let http = http_stage::http_stage().await?;
        http_stage::print_http(&http);
        report["http"] = http;
    }
    eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
    print_table(&report);
    std::fs::create_dir_all("target/bench").context("creating target/bench")?;
    std::fs::write(
        "target/bench/latest.json",
        serde_json::to_string_pretty(&report)?,
    )
    .context("writing target/bench/latest.json")?;
    println!("\nwritten: target/bench/latest.json");
    Ok(())
}

impl Run {
    async fn all(&self) -> Result<serde_json::Value> {
        let n = self.events.len() as f64;
        let singles: Vec<Vec<u8>> = self
            .events
            .iter()
            .map(|e| serde_json::to_vec(e).expect("serialise"))
            .collect();
        let batches: Vec<Vec<u8>> = self
            .events
            .chunks(PER_MESSAGE)
            .map(|c| serde_json::to_vec(c).expect("serialise"))
            .collect();

        // BENCH_STAGES=batched runs only the batched floor and worker (for big BENCH_DOMAINS).
        let only_batched = std::env::var("BENCH_STAGES").is_ok_and(|s| s == "batched");
        let single = if only_batched {
            serde_json::Value::Null
        } else {
            self.single_stages(&singles).await?
        };

        let batched_ceiling = self.store_floor("batched-ceiling", &batches).await?;
        eprintln!(
            "batched ceiling (Store::apply, no broker): {:.0} events/s",
            n / batched_ceiling
        );
        let batched = self
            .worker_drain("batched-worker", &batches, true, false)
            .await?;
        eprintln!("batched worker: {:.0} events/s", n / batched.secs);
        // Again, with status look-ups at a fixed concurrency competing for the same CPU.
        let loaded = if only_batched {
            None
        } else {
            let loaded = self
                .worker_drain("batched-lookups", &batches, true, true)
                .await?;
            eprintln!(
                "batched worker under look-ups: {:.0} events/s",
                n / loaded.secs
            );
            Some(loaded)
        };
        let status = loaded.as_ref().and_then(|l| l.lookups.clone());
        let rss = [
            single["rss_mib"].as_f64(),
            Some(batched.rss_mib),
            loaded.as_ref().map(|l| l.rss_mib),
        ]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max);
        Ok(serde_json::json!({
            "single": single,
            "batched": {
                "events": self.events.len(),
                "messages": batches.len(),
                "ceiling_events_per_s": (n / batched_ceiling).round(),
                "worker_events_per_s": (n / batched.secs).round(),
                "ratio": round3(batched_ceiling / batched.secs),
                "worker_under_lookups_events_per_s": loaded.as_ref().map(|l| (n / l.secs).round()),
            },
            "status": status.map(|status| serde_json::json!({
                "domains": self.domains,
                "concurrency": LOOKUP_CONCURRENCY,
                "requests": status.requests,
                "p50_ms": round3(status.p50_ms),
                "p95_ms": round3(status.p95_ms),
                "p99_ms": round3(status.p99_ms),
                "rps": status.rps.round(),
            })),
            "rss_peak_mib": round3(rss),
            "config": {
                "BATCH_SIZE": self.config.batch_size,
                "BATCH_TIMEOUT_MS": self.config.batch_timeout_ms,
                "PREFETCH": self.config.prefetch,
                "DB_POOL_SIZE": self.config.db_pool_size,
                "IN_FLIGHT": self.config.in_flight,
                "events_per_batched_message": PER_MESSAGE,
                "BENCH_EVENTS": self.events.len(),
                "BENCH_DOMAINS": self.domains,
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            },
        }))
    }

    /// The single-event stages: no-op ceiling, worker with dedup on, and off.
    async fn single_stages(&self, singles: &[Vec<u8>]) -> Result<serde_json::Value> {
        let n = self.events.len() as f64;
        let (single_ceiling, publish_rate) = self.noop_drain("single-ceiling", singles).await?;
        eprintln!(
            "single ceiling (no-op consumer): {:.0} msgs/s; publish with confirms {:.0} msgs/s",
            n / single_ceiling,
            publish_rate
        );
        let single = self
            .worker_drain("single-worker", singles, true, false)
            .await?;
        eprintln!("single worker, dedup on: {:.0} events/s", n / single.secs);
        let single_off = self
            .worker_drain("single-nodedup", singles, false, false)
            .await?;
        eprintln!(
            "single worker, dedup off: {:.0} events/s",
            n / single_off.secs
        );

        Ok(serde_json::json!({
            "events": self.events.len(),
            "ceiling_events_per_s": (n / single_ceiling).round(),
            "worker_events_per_s": (n / single.secs).round(),
            "ratio": round3(single_ceiling / single.secs),
            "worker_dedup_off_events_per_s": (n / single_off.secs).round(),
            "ratio_dedup_off": round3(single_ceiling / single_off.secs),
            "publish_confirmed_msgs_per_s": publish_rate.round(),
            "rss_mib": round3(single.rss_mib.max(single_off.rss_mib)),
        }))
    }

    async fn admin(&self) -> Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&format!("{PG_HOST}/postgres"), tokio_postgres::NoTls)
                .await
                .context("Postgres must answer at 127.0.0.1:5432")?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// A migrated database holding every bench domain at zero, cloned by each stage.
    async fn create_template(&self) -> Result<()> {
        let started = Instant::now();
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE {}", self.template))
            .await?;
        let url = format!("{PG_HOST}/{}", self.template);
        let store = Store::connect(&url, 1).await?;
        store.migrate().await?;
        drop(store);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(connection);
        client
            .execute(
                "INSERT INTO domains (domain) SELECT 'd' || i || '.bench.example' FROM generate_series(0, $1::int8 - 1) AS i",
                &[&(self.domains as i64)],
            )
            .await
            .context("pre-populating domains")?;
        client.batch_execute("VACUUM ANALYZE domains").await?;
        client.batch_execute("CHECKPOINT").await?;
        drop(client);
        let _ = task.await;
        eprintln!(
            "template: {} domains in {:.1} s",
            self.domains,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn clone_db(&self, stage: &str) -> Result<String> {
        let name = format!("bench_{}_{}", stage.replace('-', "_"), self.id);
        self.admin()
            .await?
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE {}",
                self.template
            ))
            .await
            .context("cloning the template database")?;
        // Start every stage right after a checkpoint, so none pays for another's dirty pages.
        self.admin().await?.batch_execute("CHECKPOINT").await?;
        Ok(name)
    }

    async fn drop_db(&self, name: &str) {
        if let Ok(admin) = self.admin().await {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }

    fn topology(&self, stage: &str) -> Topology {
        Topology::new(
            &format!("bench.{}.{stage}", self.id),
            &format!("bench.{}.{stage}", self.id),
            20,
        )
    }

    /// Declares the stage's topology and fills its queue, with confirms. Returns messages/s.
    async fn prefill(
        &self,
        topology: &Topology,
        bodies: &[Vec<u8>],
        with_ids: bool,
    ) -> Result<f64> {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let started = Instant::now();
        let mut window = VecDeque::new();
        for body in bodies {
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if with_ids {
                properties = properties.with_message_id(uuid::Uuid::now_v7().to_string().into());
            }
            let confirm = channel
                .basic_publish(
                    topology.exchange.as_str().into(),
                    "bench".into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?;
            window.push_back(confirm);
            if window.len() >= 2_000 {
                if let Some(confirm) = window.pop_front() {
                    if !confirm.await?.is_ack() {
                        bail!("prefill: nacked");
                    }
                }
            }
        }
        for confirm in window {
            if !confirm.await?.is_ack() {
                bail!("prefill: nacked");
            }
        }
        let rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
        let _ = connection.close(200, "".into()).await;
        Ok(rate)
    }

    async fn delete_topology(&self, topology: &Topology) {
        if let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
        {
            if let Ok(channel) = connection.create_channel().await {
                for q in [topology.queue.clone(), topology.dead_letter_queue()] {
                    let _ = channel
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for e in [topology.exchange.clone(), topology.dead_letter_exchange()] {
                    let _ = channel
                        .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
            }
            let _ = connection.close(200, "".into()).await;
        }
    }

    /// The broker + client floor: consume with the worker's prefetch, ack a batch at a time with
    /// one multiple-ack, do nothing else. Returns (seconds, publish msgs/s).
    async fn noop_drain(&self, stage: &str, bodies: &[Vec<u8>]) -> Result<(f64, f64)> {
        let topology = self.topology(stage);
        let publish_rate = self.prefill(&topology, bodies, true).await?;
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let started = Instant::now();
        let mut consumer = channel
            .basic_consume(
                topology.queue.as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let batch = self.config.batch_size as usize;
        let mut seen = 0usize;
        let mut in_batch = 0usize;
        let mut last_tag = 0;
        let mut deadline: Option<tokio::time::Instant> = None;
        while seen < bodies.len() {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, consumer.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        channel
                            .basic_ack(last_tag, BasicAckOptions { multiple: true })
                            .await?;
                        (in_batch, deadline) = (0, None);
                        continue;
                    }
                },
                None => consumer.next().await,
            };
            let delivery = next.context("consumer ended")??;
            last_tag = delivery.delivery_tag;
            seen += 1;
            in_batch += 1;
            deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.config.batch_timeout());
            if in_batch >= batch || seen == bodies.len() {
                channel
                    .basic_ack(last_tag, BasicAckOptions { multiple: true })
                    .await?;
                (in_batch, deadline) = (0, None);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let _ = connection.close(200, "".into()).await;
        self.delete_topology(&topology).await;
        Ok((secs, publish_rate))
    }

    /// The Postgres floor: the worker's `Store::apply` on the same batches (parsed beforehand),
    /// as many at once as the worker has batches in flight.
    async fn store_floor(&self, stage: &str, bodies: &[Vec<u8>]) -> Result<f64> {
        let db = self.clone_db(stage).await?;
        let store = Store::connect(&format!("{PG_HOST}/{db}"), self.config.db_pool_size).await?;
        let messages: Vec<Message> = bodies
            .iter()
            .map(|body| {
                Ok(Message {
                    id: Some(uuid::Uuid::now_v7().to_string().into_bytes()),
                    events: parse_message(body).map_err(|r| anyhow::anyhow!("{r}"))?,
                })
            })
            .collect::<Result<_>>()?;
        let started = Instant::now();
        // Batches as the worker closes them (once they hold BATCH_SIZE events), IN_FLIGHT of
        // them committing at once.
        let mut batches = Vec::new();
        let (mut start, mut events) = (0, 0);
        for (i, message) in messages.iter().enumerate() {
            events += message.events.len();
            if events >= self.config.batch_size as usize || i + 1 == messages.len() {
                batches.push(&messages[start..=i]);
                (start, events) = (i + 1, 0);
            }
        }
        let shared = &store;
        let mut applied = futures_util::stream::iter(batches)
            .map(|batch| async move { shared.apply(batch).await })
            .buffered(self.config.in_flight as usize);
        while let Some(result) = applied.next().await {
            result?;
        }
        drop(applied);
        let secs = started.elapsed().as_secs_f64();
        let total = self.total_events(&db).await?;
        drop(store);
        self.drop_db(&db).await;
        if total != self.events.len() as i64 {
            bail!(
                "store floor counted {total} events, not {}",
                self.events.len()
            );
        }
        Ok(secs)
    }

    async fn total_events(&self, db: &str) -> Result<i64> {
        let (client, connection) =
            tokio_postgres::connect(&format!("{PG_HOST}/{db}"), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client
            .query_one("SELECT sum(delivered + bounced)::int8 FROM domains", &[])
            .await?
            .get(0))
    }

    /// Runs the release worker binary on a pre-filled queue until every event is committed.
    async fn worker_drain(
        &self,
        stage: &str,
        bodies: &[Vec<u8>],
        with_ids: bool,
        lookups: bool,
    ) -> Result<Drain> {
        let topology = self.topology(stage);
        let db = self.clone_db(stage).await?;
        self.prefill(&topology, bodies, with_ids).await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_catchall"))
            .env("DATABASE_URL", format!("{PG_HOST}/{db}"))
            .env("AMQP_URL", AMQP_URL)
            .env("CATCHALL_EXCHANGE", &topology.exchange)
            .env("CATCHALL_QUEUE", &topology.queue)
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .env("BATCH_SIZE", self.config.batch_size.to_string())
            .env("BATCH_TIMEOUT_MS", self.config.batch_timeout_ms.to_string())
            .env("PREFETCH", self.config.prefetch.to_string())
            .env("DB_POOL_SIZE", self.config.db_pool_size.to_string())
            .env("IN_FLIGHT", self.config.in_flight.to_string())
            .kill_on_drop(true)
            .spawn()
            .context("starting the worker binary")?;
        let pid = child.id().context("worker pid")?;
        let http = reqwest::Client::new();
        let done = std::sync::Arc::new(tokio::sync::Notify::new());
        let lookup_task = lookups.then(|| {
            tokio::spawn(lookup_load(
                http.clone(),
                base.clone(),
                self.domains,
                done.clone(),
            ))
        });

        let want = self.events.len() as f64;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(response) = http.get(format!("{base}/metrics")).send().await {
                if let Ok(text) = response.text().await {
                    let counted: f64 = ["delivered", "bounced"]
                        .iter()
                        .map(|t| metric(&text, &format!("catchall_events_total{{type=\"{t}\"}}")))
                        .sum();
                    if counted >= want {
                        break;
                    }
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("{stage}: the worker exited early: {status}");
            }
            if Instant::now() > deadline {
                bail!("{stage}: not drained within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        done.notify_waiters();
        let lookups = match lookup_task {
            Some(task) => Some(task.await?),
            None => None,
        };
        let rss_mib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN);
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
        let total = self.total_events(&db).await?;
        self.drop_db(&db).await;
        self.delete_topology(&topology).await;
        if !status.success() {
            bail!("{stage}: the worker stopped with {status}");
        }
        if total != self.events.len() as i64 {
            bail!("{stage}: counted {total} events, not {}", self.events.len());
        }
        Ok(Drain {
            secs,
            rss_mib,
            lookups,
        })
    }
}

struct Drain {
    secs: f64,
    rss_mib: f64,
    lookups: Option<Lookups>,
}

#[derive(Clone, Default)]
struct Lookups {
    requests: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    rps: f64,
}

/// Look-ups of random known domains at a fixed concurrency until `done`.
async fn lookup_load(
    http: reqwest::Client,
    base: String,
    domains: u64,
    done: std::sync::Arc<tokio::sync::Notify>,
) -> Lookups {
    // Wait for the server to answer before timing.
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..LOOKUP_CONCURRENCY {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(worker as u64);
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!("{base}/domains/{}", domain(rng.random_range(0..domains)));
                let t = Instant::now();
                match http.get(url).send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => {}
                }
            }
            latencies
        }));
    }
    done.notified().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Lookups {
        requests: all.len(),
        p50_ms: pct(0.50),
        p95_ms: pct(0.95),
        p99_ms: pct(0.99),
        rps: all.len() as f64 / elapsed,
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_table(r: &serde_json::Value) {
    println!("\n| run | events | ceiling events/s | worker events/s | worker / ceiling |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, s: &serde_json::Value, worker: &str, ratio: Option<f64>| {
        if s.is_object() && !s[worker].is_null() {
            let ratio = ratio.unwrap_or_else(|| {
                s[worker].as_f64().unwrap_or(0.0)
                    / s["ceiling_events_per_s"].as_f64().unwrap_or(1.0)
            });
            println!(
                "| {name} | {} | {} | {} | {ratio:.3} |",
                s["events"], s["ceiling_events_per_s"], s[worker]
            );
        }
    };
    let (single, batched) = (&r["single"], &r["batched"]);
    row(
        "single (1 event/message, dedup on)",
        single,
        "worker_events_per_s",
        single["ratio"].as_f64(),
    );
    row(
        "single, dedup off",
        single,
        "worker_dedup_off_events_per_s",
        single["ratio_dedup_off"].as_f64(),
    );
    row(
        "batched (100 events/message)",
        batched,
        "worker_events_per_s",
        batched["ratio"].as_f64(),
    );
    row(
        "batched, with status look-ups",
        batched,
        "worker_under_lookups_events_per_s",
        None,
    );
    let st = &r["status"];
    if st.is_object() {
        println!(
            "\nstatus while ingesting ({} domains, {} concurrent): p50 {} ms, p95 {} ms, p99 {} ms, {} req/s",
            st["domains"], st["concurrency"], st["p50_ms"], st["p95_ms"], st["p99_ms"], st["rps"]
        );
    }
    println!("worker peak RSS {} MiB", r["rss_peak_mib"]);
}
