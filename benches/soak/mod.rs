//! `make soak` (issue 13): the producer's generator stream (new domains shaped like the
//! assignment's, one event per message, each with an id) at half the measured capacity for
//! `SOAK_MINUTES` (default 30), into the release worker binary. Each `SOAK_INTERVAL_SECS`
//! (default 60): events counted per second, the worker's RSS, the dedup table's size, and the
//! event-to-visible latency of marker events; printed as a table, drawn to
//! `target/bench/soak.svg`, written to `target/bench/soak.json` and as `soak` into
//! `target/bench/latest.json`.
//!
//! The capacity is `SOAK_RATE` when set, else calibrated first: the producer unthrottled for
//! `SOAK_CALIBRATE_SECS` (default 20), the worker's counting rate over its second half.

use anyhow::{Context, Result, bail};
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use crate::measure::{Sampler, Services, Watch, quantile};
use crate::{AMQP_URL, PG_HOST, counted, env_u64, round3, rss_mib, spawn_worker, stop_worker};

struct Row {
    minute: f64,
    events_per_s: f64,
    rss_mib: f64,
    dedup_mib: f64,
    dedup_rows: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_us_per_event: f64,
    cpu_by_process: std::collections::BTreeMap<String, f64>,
}

pub(crate) fn producer_path() -> Result<std::path::PathBuf> {
    let path = std::env::var("CATCHALL_PRODUCER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/release/catchall-producer")
        });
    if !path.exists() {
        bail!(
            "{} not found: `make soak` and `make bench` build it (cargo build --release -p catchall-producer)",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `catchall-producer generate` (one event per message, each with an id) on the
/// topology's exchange, at `rate` events/s (unthrottled without); its messages (a failure to
/// connect or to publish, for one) are appended to `target/bench/<log>`.
pub(crate) fn start_producer(
    path: &std::path::Path,
    topology: &catchall::amqp::Topology,
    rate: Option<f64>,
    events: u64,
    seed: u64,
    log: &str,
) -> Result<tokio::process::Child> {
    std::fs::create_dir_all("target/bench")?;
    let log_path = format!("target/bench/{log}");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {log_path}"))?;
    let mut command = tokio::process::Command::new(path);
    command
        .env("AMQP_URL", AMQP_URL)
        // The producer declares the topology too: the soak's own names, or it would declare
        // the default queue on the shared broker.
        .env("CATCHALL_EXCHANGE", &topology.exchange)
        .env("CATCHALL_QUEUE", &topology.queue)
        .env("RUST_LOG", "warn")
        .args([
            "generate",
            "--events",
            &events.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    if let Some(rate) = rate {
        command.args(["--rate", &(rate.round() as u64).to_string()]);
    }
    command.spawn().context("starting catchall-producer")
}

pub(crate) async fn stop_producer(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Size (bytes, indexes included) and live rows (from the statistics, not a count) of the
/// applied-ids table(s), whatever their shape (one table, or a partitioned one whose partitions
/// hold the rows).
async fn dedup_size(client: &tokio_postgres::Client) -> Result<(f64, f64)> {
    let row = client
        .query_one(
            "SELECT COALESCE(sum(pg_total_relation_size(relid)), 0)::float8, \
                    COALESCE(sum(n_live_tup), 0)::float8 \
             FROM pg_stat_user_tables WHERE relname LIKE 'applied%' AND schemaname = 'public'",
            &[],
        )
        .await
        .context("measuring the dedup table")?;
    Ok((row.get(0), row.get(1)))
}

/// Waits until the worker's count stops moving for a second (the queue drained).
pub(crate) async fn wait_settled(http: &reqwest::Client, base: &str) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = -1.0;
    loop {
        let now = counted(http, base).await.unwrap_or(-1.0);
        if now == last {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("soak: the queue did not drain within 600 s");
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The live capacity: events/s the worker at `base` counts while `catchall-producer` publishes
/// unthrottled onto its topology (publishing and consuming share the machine, as they do in
/// production), over the second half of `secs`; then waits until the queue is drained.
pub(crate) async fn calibrate(
    producer: &std::path::Path,
    topology: &catchall::amqp::Topology,
    http: &reqwest::Client,
    base: &str,
    secs: u64,
) -> Result<f64> {
    let secs = secs.max(4);
    let mut calibrate = start_producer(producer, topology, None, u64::MAX / 2, 1, "producer.log")?;
    tokio::time::sleep(Duration::from_secs(secs / 2)).await;
    let (c0, t0) = (counted(http, base).await.unwrap_or(0.0), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs - secs / 2)).await;
    let c1 = counted(http, base).await.unwrap_or(0.0);
    let capacity = (c1 - c0) / t0.elapsed().as_secs_f64();
    stop_producer(&mut calibrate).await;
    wait_settled(http, base).await?;
    Ok(capacity)
}

pub async fn soak() -> Result<()> {
    let minutes = env_u64("SOAK_MINUTES", 30).max(1);
    let interval = Duration::from_secs(env_u64("SOAK_INTERVAL_SECS", 60).max(5));
    let producer = producer_path()?;
    let id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let db = format!("bench_soak_{id}");
    let topology =
        catchall::amqp::Topology::new(&format!("bench.{id}.soak"), &format!("bench.{id}.soak"), 20);
    let (admin, connection) =
        tokio_postgres::connect(&format!("{PG_HOST}/postgres"), tokio_postgres::NoTls)
            .await
            .context("Postgres must answer at 127.0.0.1:5432")?;
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let result = run(&db, &topology, &producer, minutes, interval, &id).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await;
    if let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        if let Ok(channel) = connection.create_channel().await {
            for q in [topology.queue.clone(), topology.dead_letter_queue()] {
                let _ = channel
                    .queue_delete(q.as_str().into(), Default::default())
                    .await;
            }
            for e in [topology.exchange.clone(), topology.dead_letter_exchange()] {
                let _ = channel
                    .exchange_delete(e.as_str().into(), Default::default())
                    .await;
            }
        }
        let _ = connection.close(200, "".into()).await;
    }
    let report = result?;
    println!(
        "\nmarkers: {} errors ({} lost, {} polls failed, {} publishes not confirmed)",
        report["marker_errors"],
        report["markers_lost"],
        report["marker_polls_failed"],
        report["marker_publishes_failed"]
    );
    std::fs::create_dir_all("target/bench").context("creating target/bench")?;
    std::fs::write(
        "target/bench/soak.json",
        serde_json::to_string_pretty(&report)?,
    )
    .context("writing target/bench/soak.json")?;
    // `soak` beside the other sections of the last `make bench`.
    let mut latest: Value = std::fs::read_to_string("target/bench/latest.json")
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({}));
    latest["soak"] = report;
    std::fs::write(
        "target/bench/latest.json",
        serde_json::to_string_pretty(&latest)?,
    )
    .context("writing target/bench/latest.json")?;
    println!(
        "\nwritten: target/bench/soak.json, target/bench/soak.svg, `soak` in target/bench/latest.json"
    );
    Ok(())
}

async fn run(
    db: &str,
    topology: &catchall::amqp::Topology,
    producer: &std::path::Path,
    minutes: u64,
    interval: Duration,
    id: &str,
) -> Result<Value> {
    // Before anything starts: an error here leaves nothing running.
    let services = Services::find()?;
    let url = format!("{PG_HOST}/{db}");
    let config = <catchall::config::Cli as clap::Parser>::parse_from(["catchall"]).config;
    let (mut worker, pid, base) = spawn_worker(crate::ours(), &url, topology, &config)?;
    let http = crate::http_client();
    crate::measure::wait_ready(&http, &base, Duration::from_secs(60), "soak").await?;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);

    let (rate, calibrated) = match std::env::var("SOAK_RATE")
        .ok()
        .and_then(|r| r.replace('_', "").parse::<f64>().ok())
    {
        Some(rate) => (rate, None),
        None => {
            let secs = env_u64("SOAK_CALIBRATE_SECS", 20);
            let capacity = calibrate(producer, topology, &http, &base, secs).await?;
            eprintln!(
                "soak: calibrated capacity {capacity:.0} events/s (producer unthrottled, generator stream)"
            );
            (capacity / 2.0, Some(capacity))
        }
    };
    if rate < 1.0 {
        bail!("soak: a rate of {rate:.1} events/s measures nothing");
    }
    eprintln!(
        "soak: {minutes} min at {rate:.0} events/s, a row every {} s",
        interval.as_secs()
    );
    let events = (rate * 60.0 * minutes as f64 * 2.0) as u64 + 1_000_000;
    let mut stream = start_producer(
        producer,
        topology,
        Some(rate),
        events,
        2,
        "soak-producer.log",
    )?;
    let producer_pid = stream.id().map(|p| p as i32);
    let markers =
        crate::live::Markers::start(AMQP_URL, &topology.exchange, &base, &format!("{id}-soak"));

    println!(
        "\n| minute | events/s | worker RSS MiB | dedup table MiB (rows) | visible p50 / p99 / max ms | CPU-µs/event |"
    );
    println!("|---|---|---|---|---|---|");
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let mut rows = Vec::new();
    let mut last = counted(&http, &base).await.unwrap_or(0.0);
    while Instant::now() < end {
        let sampler = Sampler::start(
            &services,
            Watch {
                worker: Some(pid as i32),
                producer: producer_pid,
                databases: vec![db.to_string()],
            },
        );
        let t = Instant::now();
        tokio::time::sleep(
            interval
                .min(end.saturating_duration_since(t))
                .max(Duration::from_secs(1)),
        )
        .await;
        let cpu = sampler.stop();
        if let Some(status) = worker.try_wait()? {
            bail!("soak: the worker exited: {status}");
        }
        let now = counted(&http, &base).await.unwrap_or(last);
        let events = now - last;
        last = now;
        let (bytes, dedup_rows) = dedup_size(&client).await?;
        let mut samples = markers.take();
        samples.sort_by(f64::total_cmp);
        let row = Row {
            minute: started.elapsed().as_secs_f64() / 60.0,
            events_per_s: events / t.elapsed().as_secs_f64(),
            rss_mib: rss_mib(pid, "VmRSS:"),
            dedup_mib: bytes / 1048576.0,
            dedup_rows,
            p50_ms: quantile(&samples, 0.5),
            p99_ms: quantile(&samples, 0.99),
            max_ms: samples.last().copied().unwrap_or(f64::NAN),
            cpu_us_per_event: cpu.total_per_event(events.max(1.0)),
            cpu_by_process: cpu.per_event(events.max(1.0)),
        };
        println!(
            "| {:.1} | {:.0} | {:.1} | {:.1} ({:.0}) | {:.1} / {:.1} / {:.1} | {:.1} |",
            row.minute,
            row.events_per_s,
            row.rss_mib,
            row.dedup_mib,
            row.dedup_rows,
            row.p50_ms,
            row.p99_ms,
            row.max_ms,
            row.cpu_us_per_event
        );
        rows.push(row);
    }
    stop_producer(&mut stream).await;
    let (_, marker_kinds) = markers.finish(None).await?;
    stop_worker(&mut worker, pid).await?;
    draw(&rows, rate).context("drawing target/bench/soak.svg")?;

    let spread = |f: &dyn Fn(&Row) -> f64| -> Value {
        // The first interval includes the warm-up; flatness is judged on the rest.
        let v: Vec<f64> = rows
            .iter()
            .skip(1)
            .map(f)
            .filter(|x| x.is_finite())
            .collect();
        let (min, max) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(*x), b.max(*x))
            });
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        let median = quantile(&sorted, 0.5);
        json!({
            "min": round3(min), "max": round3(max), "median": round3(median),
            "max_deviation_from_median": round3(((max - median).abs().max((median - min).abs())) / median),
        })
    };
    let mut out = json!({
        "minutes": minutes,
        "interval_secs": interval.as_secs(),
        "rate": rate.round(),
        "calibrated_capacity_events_per_s": calibrated.map(f64::round),
        "rss_mib": spread(&|r| r.rss_mib),
        "events_per_s": spread(&|r| r.events_per_s),
        "rows": rows.iter().map(|r| json!({
            "minute": round3(r.minute),
            "events_per_s": r.events_per_s.round(),
            "rss_mib": round3(r.rss_mib),
            "dedup_mib": round3(r.dedup_mib),
            "dedup_rows": r.dedup_rows.round(),
            "p50_ms": round3(r.p50_ms),
            "p99_ms": round3(r.p99_ms),
            "max_ms": round3(r.max_ms),
            "cpu_us_per_event": round3(r.cpu_us_per_event),
            "cpu_us_per_event_by_process": r.cpu_by_process.iter().map(|(k, v)| (k.clone(), json!(round3(*v)))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        "svg": "target/bench/soak.svg",
    });
    marker_kinds.write(&mut out);
    Ok(out)
}

/// Four panels over time: throughput, RSS, dedup table size, freshness.
fn draw(rows: &[Row], rate: f64) -> Result<()> {
    use plotters::prelude::*;
    std::fs::create_dir_all("target/bench")?;
    let root = SVGBackend::new("target/bench/soak.svg", (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((2, 2));
    let x_max = rows.last().map_or(1.0, |r| r.minute).max(1.0);
    type Series<'a> = Vec<(&'a str, RGBColor, Vec<(f64, f64)>)>;
    let charts: [(&str, Series); 4] = [
        (
            "events/s counted",
            vec![
                (
                    "worker",
                    BLUE,
                    rows.iter().map(|r| (r.minute, r.events_per_s)).collect(),
                ),
                ("published rate", BLACK, vec![(0.0, rate), (x_max, rate)]),
            ],
        ),
        (
            "worker RSS (MiB)",
            vec![(
                "VmRSS",
                RED,
                rows.iter().map(|r| (r.minute, r.rss_mib)).collect(),
            )],
        ),
        (
            "dedup table (MiB)",
            vec![(
                "applied ids",
                GREEN,
                rows.iter().map(|r| (r.minute, r.dedup_mib)).collect(),
            )],
        ),
        (
            "event to visible (ms)",
            vec![
                (
                    "p50",
                    BLUE,
                    rows.iter().map(|r| (r.minute, r.p50_ms)).collect(),
                ),
                (
                    "p99",
                    RED,
                    rows.iter().map(|r| (r.minute, r.p99_ms)).collect(),
                ),
            ],
        ),
    ];
    for (area, (title, series)) in panels.iter().zip(charts) {
        let y_max = series
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y))
            .filter(|y| y.is_finite())
            .fold(0.0, f64::max)
            .max(1.0)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("minute")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (name, color, points) in series {
            let points: Vec<(f64, f64)> =
                points.into_iter().filter(|(_, y)| y.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
