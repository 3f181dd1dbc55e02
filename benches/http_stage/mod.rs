//! The HTTP stage of `make bench` (issue 10), alone with `BENCH_STAGES=http`:
//! - ingest: `PUT /events/{domain}/delivered` from `HTTP_BENCH_CLIENTS` (default 128) keep-alive
//!   clients for `HTTP_BENCH_SECS` (default 10) against the in-process worker (202 = confirmed),
//!   beside a publish-only ceiling measured just before on the same machine: the same events
//!   published straight to RabbitMQ, one confirmed message each, from as many concurrent tasks;
//! - listing: `GET /domains?status=catch-all&limit=1000` pages at `HTTP_BENCH_DOMAINS` (default
//!   1,000,000) domains, and pages of all domains from random cursors;
//! - bulk look-up: `POST /domains/lookup` with 10,000 random known domains;
//! - what the V3 partial index costs the upsert: `Store::apply` on the same batches with and
//!   without it.

use anyhow::{Context, Result, bail};
use catchall::amqp::Topology;
use catchall::app::App;
use catchall::config::Config;
use catchall::event::{Event, EventType};
use catchall::store::{Message, Store};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PG_HOST: &str = "postgres://postgres@127.0.0.1:5432";
const TOKEN: &str = "bench-ingest-token";
/// Distinct domains the ingest load spreads over.
const INGEST_DOMAINS: u64 = 100_000;
/// The seed project's figure on a machine like ours (issue 10), printed beside ours.
const SEED_NOTE: &str =
    "seed project: about 3,200 requests/s answered, about 1 % of events counted";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub async fn admin() -> Result<tokio_postgres::Client> {
    let (client, connection) =
        tokio_postgres::connect(&format!("{PG_HOST}/postgres"), tokio_postgres::NoTls)
            .await
            .context("Postgres must answer at 127.0.0.1:5432")?;
    tokio::spawn(connection);
    Ok(client)
}

async fn connect_db(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The HTTP stage: creates its own databases and topology, removes them afterwards.
pub async fn http_stage() -> Result<Value> {
    let id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let databases = [
        format!("bench_http_{id}"),
        format!("bench_http_idx_{id}"),
        format!("bench_http_noidx_{id}"),
        format!("bench_http_nov7_{id}"),
    ];
    let topology = Topology::new(&format!("bench.{id}.http"), &format!("bench.{id}.http"), 20);
    let admin = admin().await?;
    for name in &databases {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
    }
    let result = run(&databases, &topology).await;
    for name in &databases {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
    delete_topology(&topology).await;
    result
}

async fn run(databases: &[String; 4], topology: &Topology) -> Result<Value> {
    let secs = env_u64("HTTP_BENCH_SECS", 10);
    let clients = env_u64("HTTP_BENCH_CLIENTS", 128) as usize;
    let domains = env_u64("HTTP_BENCH_DOMAINS", 1_000_000);
    let url = format!("{PG_HOST}/{}", databases[0]);
    let mut config = Config::with_names(&url, &topology.exchange, &topology.queue);
    config.ingest_tokens = Some(TOKEN.parse().map_err(anyhow::Error::msg)?);
    config.http_max_concurrency = 4096;
    let app = App::build(config).await?;
    let base = format!("http://{}", app.http_addr());
    let cancel = CancellationToken::new();
    let worker = tokio::spawn(app.run(cancel.clone()));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    crate::measure::wait_ready(&http, &base, Duration::from_secs(30), "http").await?;

    let ceiling = publish_ceiling(topology, clients, secs).await?;
    eprintln!(
        "http: publish-only ceiling {:.0} msgs/s (p99 {:.1} ms)",
        ceiling.rps, ceiling.p99_ms
    );
    wait_drained(topology).await?;
    let ingest = http_ingest(&http, &base, clients, secs).await?;
    eprintln!(
        "http: ingest {:.0} PUT/s (p99 {:.1} ms), {} not 202",
        ingest.rps, ingest.p99_ms, ingest.failed
    );
    wait_drained(topology).await?;
    // Every 202 was counted.
    let counted = counted_events(&url).await?;
    if counted < ingest.accepted || counted > ingest.accepted + ingest.failed {
        bail!(
            "http: {} PUTs answered 202 ({} not) but {counted} events counted",
            ingest.accepted,
            ingest.failed
        );
    }

    let seeded = Instant::now();
    seed_domains(&url, domains).await?;
    eprintln!(
        "http: {domains} domains seeded in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    let listing = listing(&http, &base, domains).await?;
    let lookup = bulk_lookup(&http, &base, domains).await?;
    cancel.cancel();
    worker.await.context("the worker panicked")??;

    let upsert = index_cost(&databases[1], &databases[2], &databases[3]).await?;
    Ok(json!({
        "ingest": {
            "clients": clients,
            "seconds": secs,
            "ceiling_publish_only_per_s": ceiling.rps.round(),
            "ceiling_p99_ms": round3(ceiling.p99_ms),
            "http_put_per_s": ingest.rps.round(),
            "http_p50_ms": round3(ingest.p50_ms),
            "http_p99_ms": round3(ingest.p99_ms),
            "ratio": round3(ingest.rps / ceiling.rps),
            "accepted_and_counted": ingest.accepted,
            "not_accepted": ingest.failed,
            "seed": SEED_NOTE,
        },
        "listing": listing,
        "bulk_lookup": lookup,
        "upsert_v3_index": upsert,
    }))
}

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    accepted: u64,
    failed: u64,
}

fn ingest_domain(rng: &mut StdRng, suffix: &str) -> String {
    format!("h{}.{suffix}", rng.random_range(0..INGEST_DOMAINS))
}

/// `clients` tasks each publishing one event per message and awaiting its confirm, for `secs`.
async fn publish_ceiling(topology: &Topology, clients: usize, secs: u64) -> Result<Load> {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..clients {
        let (channel, stop, exchange) = (channel.clone(), stop.clone(), topology.exchange.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(task as u64);
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let event = Event::new(
                    &ingest_domain(&mut rng, "ceiling.example"),
                    EventType::Delivered,
                )
                .expect("valid domain");
                let body = serde_json::to_vec(&event).expect("serialise");
                let t = Instant::now();
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(uuid::Uuid::now_v7().to_string().into());
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "delivered".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        properties,
                    )
                    .await?;
                if !confirm.await?.is_ack() {
                    bail!("ceiling: nacked");
                }
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(latencies)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let _ = connection.close(200, "".into()).await;
    all.sort_by(f64::total_cmp);
    Ok(Load {
        rps: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        accepted: all.len() as u64,
        failed: 0,
    })
}

/// `clients` keep-alive clients each sending PUTs (both spellings) back to back for `secs`.
async fn http_ingest(
    http: &reqwest::Client,
    base: &str,
    clients: usize,
    secs: u64,
) -> Result<Load> {
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..clients {
        let (http, base, stop, failed) =
            (http.clone(), base.to_string(), stop.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(1_000 + task as u64);
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let prefix = if n.is_multiple_of(2) {
                    "events"
                } else {
                    "v1/events"
                };
                n += 1;
                let url = format!(
                    "{base}/{prefix}/{}/delivered",
                    ingest_domain(&mut rng, "ingest.example")
                );
                let t = Instant::now();
                match http.put(url).bearer_auth(TOKEN).send().await {
                    Ok(response) if response.status().as_u16() == 202 => {
                        let _ = response.bytes().await;
                        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await?);
    }
    all.sort_by(f64::total_cmp);
    Ok(Load {
        rps: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        accepted: all.len() as u64,
        failed: failed.load(Ordering::Relaxed),
    })
}

/// Waits until the stage's queue is empty and nothing is unacked (up to 5 minutes).
async fn wait_drained(topology: &Topology) -> Result<()> {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let queue = channel
            .queue_declare(
                topology.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        // message_count counts ready messages; give unacked ones a moment to commit as well.
        if queue.message_count() == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            break;
        }
        if Instant::now() > deadline {
            bail!("http: the queue did not drain within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = connection.close(200, "".into()).await;
    Ok(())
}

async fn counted_events(url: &str) -> Result<u64> {
    let client = connect_db(url).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = -1i64;
    // Counting may still be committing the last batch: wait until the sum is stable.
    loop {
        let row = client
            .query_one(
                "SELECT COALESCE(sum(delivered + bounced), 0)::int8 FROM domains WHERE domain LIKE '%.ingest.example'",
                &[],
            )
            .await?;
        let now: i64 = row.get(0);
        if now == last || Instant::now() > deadline {
            return Ok(now as u64);
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `n` domains shaped like the assignment's traffic: one in 25 never bounces (most of those
/// past the threshold), the rest bounced.
async fn seed_domains(url: &str, n: u64) -> Result<()> {
    let client = connect_db(url).await?;
    client
        .execute(
            "INSERT INTO domains (domain, delivered, bounced) \
             SELECT 'd' || i || '.list.example', (i * 7919) % 2500, CASE WHEN i % 25 = 0 THEN 0 ELSE 3 END \
             FROM generate_series(0, $1::int8 - 1) AS i",
            &[&(n as i64)],
        )
        .await
        .context("seeding domains")?;
    client.batch_execute("VACUUM ANALYZE domains").await?;
    // Measure the listing after the seeding's dirty pages are written, not during.
    client.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Listing pages of 1,000: every catch-all page (repeated until 200 samples), and pages of all
/// domains from random cursors.
async fn listing(http: &reqwest::Client, base: &str, domains: u64) -> Result<Value> {
    let page = |query: String| {
        let http = http.clone();
        async move {
            let t = Instant::now();
            let response = http.get(query).send().await?;
            if !response.status().is_success() {
                bail!("listing answered {}", response.status());
            }
            let body: Value = response.json().await?;
            Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64() * 1000.0, body))
        }
    };
    // One untimed pass warms the cache and the prepared statements; then at least 1,000 pages.
    let mut catch_all = Vec::new();
    let mut listed = 0usize;
    let mut passes = 0;
    while catch_all.len() < 1_000 {
        let mut after = String::new();
        passes += 1;
        loop {
            let (ms, body) = page(format!(
                "{base}/domains?status=catch-all&limit=1000&after={after}"
            ))
            .await?;
            if passes == 1 {
                listed += body["domains"].as_array().map_or(0, Vec::len);
            } else {
                catch_all.push(ms);
            }
            match body["next"].as_str() {
                Some(next) => after = next.to_string(),
                None => break,
            }
        }
    }
    let mut rng = StdRng::seed_from_u64(7);
    let mut all = Vec::new();
    for _ in 0..1_000 {
        let after = format!("d{}.list.example", rng.random_range(0..domains));
        all.push(
            page(format!("{base}/domains?limit=1000&after={after}"))
                .await?
                .0,
        );
    }
    catch_all.sort_by(f64::total_cmp);
    all.sort_by(f64::total_cmp);
    eprintln!(
        "http: listing catch-all pages of 1000 at {domains} domains: p50 {:.1} ms, p99 {:.1} ms ({listed} catch-all domains)",
        percentile(&catch_all, 0.5),
        percentile(&catch_all, 0.99)
    );
    Ok(json!({
        "domains": domains,
        "catch_all_domains": listed,
        "catch_all_pages": catch_all.len(),
        "catch_all_page_p50_ms": round3(percentile(&catch_all, 0.5)),
        "catch_all_page_p99_ms": round3(percentile(&catch_all, 0.99)),
        "all_page_p50_ms": round3(percentile(&all, 0.5)),
        "all_page_p99_ms": round3(percentile(&all, 0.99)),
    }))
}

/// `POST /domains/lookup` with 10,000 random known domains, 30 times.
async fn bulk_lookup(http: &reqwest::Client, base: &str, domains: u64) -> Result<Value> {
    let mut rng = StdRng::seed_from_u64(8);
    let mut latencies = Vec::new();
    let started = Instant::now();
    for _ in 0..30 {
        let asked: Vec<String> = (0..10_000)
            .map(|_| format!("d{}.list.example", rng.random_range(0..domains)))
            .collect();
        let t = Instant::now();
        let response = http
            .post(format!("{base}/domains/lookup"))
            .json(&json!({ "domains": asked }))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("bulk look-up answered {}", response.status());
        }
        let _ = response.bytes().await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let per_s = 300_000.0 / elapsed;
    eprintln!(
        "http: bulk look-up {per_s:.0} domains/s (10,000 per request, p99 {:.1} ms)",
        percentile(&latencies, 0.99)
    );
    Ok(json!({
        "domains_per_request": 10_000,
        "requests": 30,
        "domains_per_s": per_s.round(),
        "request_p50_ms": round3(percentile(&latencies, 0.5)),
        "request_p99_ms": round3(percentile(&latencies, 0.99)),
    }))
}

/// `Store::apply` on the same batches in three fresh databases: one with everything the listing
/// needs, one without any of it (the V3 partial index, V7's generated column and its index),
/// one without V7 alone: events/s of each, the databases alternating in every round.
async fn index_cost(with: &str, without: &str, without_v7: &str) -> Result<Value> {
    let mut rng = StdRng::seed_from_u64(9);
    let messages: Vec<Message> = (0..4_000)
        .map(|_| Message {
            id: Some(uuid::Uuid::now_v7().to_string().into_bytes()),
            events: (0..100)
                .map(|_| {
                    let kind = if rng.random_ratio(1, 50) {
                        EventType::Bounced
                    } else {
                        EventType::Delivered
                    };
                    Event::new(
                        &format!("u{}.upsert.example", rng.random_range(0..100_000)),
                        kind,
                    )
                    .expect("valid")
                })
                .collect(),
        })
        .collect();
    let events = (messages.len() * 100) as f64;
    let names = [with, without, without_v7];
    for (slot, name) in names.iter().enumerate() {
        let store = Store::connect(&format!("{PG_HOST}/{name}"), 1).await?;
        store.migrate().await?;
        let drop = match slot {
            1 => {
                "DROP INDEX domains_never_bounced; DROP INDEX domains_catch_all_1000; \
                  ALTER TABLE domains DROP COLUMN catch_all_1000"
            }
            2 => {
                "DROP INDEX domains_catch_all_1000; ALTER TABLE domains DROP COLUMN catch_all_1000"
            }
            _ => continue,
        };
        connect_db(&format!("{PG_HOST}/{name}"))
            .await?
            .batch_execute(drop)
            .await?;
    }
    // Round 0 inserts the domains; rounds 1–4 update them. The databases alternate, so all
    // see the same machine (other load on it included).
    let mut rates: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..5 {
        for (slot, name) in names.iter().enumerate() {
            let store = Store::connect(&format!("{PG_HOST}/{name}"), 1).await?;
            let batch: Vec<Message> = messages
                .iter()
                .map(|m| Message {
                    id: m.id.as_ref().map(|id| {
                        let mut id = id.clone();
                        id.extend_from_slice(format!("-{round}").as_bytes());
                        id
                    }),
                    events: m.events.clone(),
                })
                .collect();
            let started = Instant::now();
            for chunk in batch.chunks(25) {
                store.apply(chunk).await?;
            }
            rates[slot].push(events / started.elapsed().as_secs_f64());
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let insert = |slot: usize| rates[slot][0];
    let update = |slot: usize| median(&rates[slot][1..]);
    eprintln!(
        "http: upsert with the listing indexes (V3, V7): inserts {:.0} vs {:.0} events/s without, updates (median of 4) {:.0} vs {:.0}; without V7 alone: inserts {:.0}, updates {:.0}",
        insert(0),
        insert(1),
        update(0),
        update(1),
        insert(2),
        update(2)
    );
    Ok(json!({
        "events_per_round": events,
        "events_per_batch": 2_500,
        "insert_with_index_events_per_s": insert(0).round(),
        "insert_without_index_events_per_s": insert(1).round(),
        "update_with_index_events_per_s": update(0).round(),
        "update_without_index_events_per_s": update(1).round(),
        "insert_ratio": round3(insert(0) / insert(1)),
        "ratio": round3(update(0) / update(1)),
        "insert_without_v7_events_per_s": insert(2).round(),
        "update_without_v7_events_per_s": update(2).round(),
        "v7_insert_ratio": round3(insert(0) / insert(2)),
        "v7_ratio": round3(update(0) / update(2)),
    }))
}

async fn delete_topology(topology: &Topology) {
    if let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
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

/// The stage's lines of the bench table.
pub fn print_http(r: &Value) {
    let (i, l, b, u) = (
        &r["ingest"],
        &r["listing"],
        &r["bulk_lookup"],
        &r["upsert_v3_index"],
    );
    println!(
        "\n| HTTP ingest ({} clients) | req/s | p50 ms | p99 ms |",
        i["clients"]
    );
    println!("|---|---|---|---|");
    println!(
        "| publish-only ceiling (1 confirmed message per event) | {} | | {} |",
        i["ceiling_publish_only_per_s"], i["ceiling_p99_ms"]
    );
    println!(
        "| PUT /events/… (202 after confirm) | {} | {} | {} |",
        i["http_put_per_s"], i["http_p50_ms"], i["http_p99_ms"]
    );
    println!("| ratio to ceiling | {} | | |", i["ratio"]);
    println!("| {SEED_NOTE} | | | |");
    println!(
        "\nlisting at {} domains, pages of 1000: catch-all p99 {} ms, all p99 {} ms; bulk look-up {} domains/s (p99 {} ms per 10,000); upsert with the listing indexes (V3, V7) {} of without (updates; inserts {}), with V7 {} of without it alone (updates; inserts {})",
        l["domains"],
        l["catch_all_page_p99_ms"],
        l["all_page_p99_ms"],
        b["domains_per_s"],
        b["request_p99_ms"],
        u["ratio"],
        u["insert_ratio"],
        u["v7_ratio"],
        u["v7_insert_ratio"]
    );
}
