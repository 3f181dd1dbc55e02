//! `make bench`: how close the worker comes to what RabbitMQ and Postgres themselves can do on
//! this machine, measured in one run (issue 4).
//!
//! Every stage drains a pre-filled queue of the same events (the insert path's: of new domains,
//! below), in a database of its own cloned from one template (so each starts from the same
//! `domains` table):
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
//!
//! Issue 13 added, so that one run means something and is read against the true limit:
//! - `BENCH_REPEATS` (default 4) interleaved rounds (A B C … A B C …), each figure reported as
//!   the median with its spread (min/max, interquartile range);
//! - the CPU time of every process (broker, Postgres backends and server processes, worker,
//!   bench) over each timed window, as CPU-µs per event (see `measure`);
//! - the single-message limit `cores / (CPU per message of the no-op drain + Postgres CPU per
//!   event of applying single-message batches)`, the dedup overhead (applying the same
//!   single-message batches with and without ids), and a batched reference floor that is not our
//!   code (the plainest sorted `unnest` upsert);
//! - an `insert` stage beside the update path: events of the same kinds, each for a domain of its
//!   own outside the template's (`BENCH_DOMAINS + i`), so every event inserts a row; into an
//!   empty table and (`insert.populated`) into a copy of the template holding `BENCH_DOMAINS`;
//! - open-loop stages (see `live`), fed by the release `catchall-producer` in a process of its
//!   own: the live capacity (the producer unthrottled while the worker counts), event-to-visible
//!   latency at 50 % and 90 % of it, and status look-ups at `BENCH_LOOKUP_RATE` (default
//!   5,000/s) while ingesting at half of it, every error counted; `BENCH_LIVE_SECS` (default 20)
//!   each, `BENCH_LIVE_REPEATS` (default 3) interleaved windows of each, reported as medians;
//! - `BENCH_STAGES=soak` (`make soak`): see `soak`;
//! - `BENCH_STAGES=lookups`: only the look-ups under ingest, `BENCH_REPEATS` rounds, with our
//!   worker and (`BENCH_OTHER_BIN=<another build of ours>`) that one beside it in every round,
//!   into `target/bench/lookups.json`.
//!
//! An `outage` stage (issue 8) holds 1 MiB messages while Postgres refuses every commit and
//! reports the worker's peak RSS against `PREFETCH_BYTES` (`BENCH_SKIP_OUTAGE=1` skips it).
//!
//! `BENCH_BASELINE_BIN=<path to another build's catchall>` adds that binary's single and batched
//! drains to every round, on a template it migrated itself, and reports ours / baseline paired
//! per round (`make bench-baseline` builds the commit before issue 8 for it).

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

// Issue 13: what a claim costs Postgres per id, statement against statement.
mod claim;
// The HTTP stage (issue 10): its own module, so the stages stay apart.
mod http_stage;
// Issue 13: CPU sampling and statistics; open-loop load; the soak.
mod live;
mod measure;
// Issue 8: peak RSS with 1 MiB messages while Postgres refuses.
mod outage;
mod soak;

use measure::{CpuWindow, Sampler, Services, Summary, Watch};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PG_HOST: &str = "postgres://postgres@127.0.0.1:5432";
const PER_MESSAGE: usize = 100;
const LOOKUP_CONCURRENCY: usize = 4;
/// Every HTTP request the bench makes to a worker (its `/metrics`, `/readyz`, the closed-loop
/// look-ups) gives up after this long, so a worker that stops answering fails the stage or
/// counts as an error instead of hanging it.
pub(crate) const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// A no-op drain with no delivery for this long, or a prefill publish not confirmed within it,
/// fails the stage.
const BROKER_TIMEOUT: Duration = Duration::from_secs(60);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// A client for the worker's HTTP server, with [`HTTP_TIMEOUT`].
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .expect("a client with a timeout builds")
}

fn domain(i: u64) -> String {
    format!("d{i}.bench.example")
}

struct Run {
    id: String,
    events: Vec<Event>,
    /// The insert path's events: `events`' kinds, each for a domain of its own that no template
    /// holds (`BENCH_DOMAINS + i`), so every one of them inserts a row.
    insert_events: Vec<Event>,
    domains: u64,
    config: Config,
    /// Migrated, every bench domain present at zero (the update path).
    template: String,
    /// Migrated and empty (the insert path).
    empty_template: String,
    /// `BENCH_BASELINE_BIN`: another build's `catchall` (say, of the commit before a change),
    /// run beside ours in every round on a template it migrated itself, so "before" and
    /// "after" come from one run (issue 8).
    baseline: Option<Baseline>,
    repeats: usize,
    services: Services,
}

struct Baseline {
    bin: std::path::PathBuf,
    /// Migrated by the baseline binary, every bench domain present at zero.
    template: String,
    /// Ours without migration V7's column and index (issue 10's listing flag), which came after
    /// the baseline: our worker drains it too, so issue 8's changes can be read apart from V7.
    without_v7: String,
}

/// One timed window of a stage: its wall time and the CPU every process spent in it.
struct Timed {
    secs: f64,
    /// For worker drains, the CPU of the steady window (from a tenth counted to the end) scaled
    /// to every event, as `steady_secs` is: the worker's start-up (connecting, migrations, the
    /// first batch) is left out, as the limit's inputs and the floors leave out their set-up.
    /// For other stages, the whole window.
    cpu: CpuWindow,
    /// The worker's peak RSS (`VmHWM`), for stages that run the worker binary.
    rss_mib: f64,
    /// Worker drains: from starting the process to its first counted event (connecting,
    /// migrations, topology, the first batch), NaN for other stages.
    startup_secs: f64,
    /// The time the whole stage would take at its steady rate: for worker drains, the rate
    /// from the moment a tenth of the events was counted to the end (no process start-up,
    /// connecting or migrations in it); for other stages, `secs` (the no-op drain and the
    /// floors time no set-up either). Every rate and ratio of `all` is taken over it.
    steady_secs: f64,
}

impl Timed {
    /// A stage that runs no worker binary: no RSS, no start-up, steady throughout.
    fn window(secs: f64, cpu: CpuWindow) -> Self {
        Self {
            secs,
            cpu,
            rss_mib: f64::NAN,
            startup_secs: f64::NAN,
            steady_secs: secs,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // BENCH_STAGES=http runs only the HTTP stage (ingest, listing, bulk look-up).
    if std::env::var("BENCH_STAGES").is_ok_and(|s| s == "http") {
        let report = http_stage::http_stage().await?;
        http_stage::print_http(&report);
        return write_report("http.json", &report);
    }
    // BENCH_STAGES=claim (`make bench-claim`) runs only the claim stage.
    if std::env::var("BENCH_STAGES").is_ok_and(|s| s == "claim") {
        return write_report("claim.json", &claim::claim_stage().await?);
    }
    // BENCH_STAGES=soak (`make soak`) runs only the soak.
    if std::env::var("BENCH_STAGES").is_ok_and(|s| s == "soak") {
        return soak::soak().await;
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
    let insert_events: Vec<Event> = events
        .iter()
        .zip(domains..)
        .map(|(e, i)| Event {
            domain: domain(i),
            kind: e.kind,
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
    let empty_template = format!("bench_empty_{id}");
    let baseline = std::env::var_os("BENCH_BASELINE_BIN").map(|bin| Baseline {
        bin: bin.into(),
        template: format!("bench_base_{id}"),
        without_v7: format!("bench_nov7_{id}"),
    });
    let run = Run {
        id,
        events,
        insert_events,
        domains,
        config,
        template,
        empty_template,
        baseline,
        repeats: env_u64("BENCH_REPEATS", 4).max(1) as usize,
        services: Services::find()?,
    };
    let started = Instant::now();
    let only_lookups = std::env::var("BENCH_STAGES").is_ok_and(|s| s == "lookups");
    let result = match run.create_template().await {
        Ok(()) if only_lookups => run.lookups_ab().await,
        Ok(()) => run.all().await,
        Err(error) => Err(error),
    };
    run.drop_db(&run.template).await;
    run.drop_db(&run.empty_template).await;
    if let Some(baseline) = &run.baseline {
        run.drop_db(&baseline.template).await;
        run.drop_db(&baseline.without_v7).await;
    }
    let mut report = result?;
    if only_lookups {
        return write_report("lookups.json", &report);
    }
    if std::env::var("BENCH_STAGES").is_err() && std::env::var("BENCH_SKIP_HTTP").is_err() {
        let http = http_stage::http_stage().await?;
        http_stage::print_http(&http);
        report["http"] = http;
    }
    eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
    print_table(&report);
    write_report("latest.json", &report)
}

/// Writes a report to `target/bench/{file}`, keeping the `soak` section of the file it replaces
/// (`make soak` adds it; a bench run does not measure it).
fn write_report(file: &str, report: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all("target/bench").context("creating target/bench")?;
    let path = format!("target/bench/{file}");
    let mut report = report.clone();
    let earlier: Option<serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    if let Some(soak) = earlier.and_then(|mut earlier| earlier.get_mut("soak").map(|s| s.take()))
        && report.get("soak").is_none()
    {
        report["soak"] = soak;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {path}"))?;
    println!("\nwritten: {path}");
    Ok(())
}

impl Run {
    async fn all(&self) -> Result<serde_json::Value> {
        let n = self.events.len() as f64;
        let singles: Vec<Vec<u8>> = self
            .events
            .iter()
            .map(|e| serde_json::to_vec(e).context("serialising an event"))
            .collect::<Result<_>>()?;
        // 100 events per message: the bodies, and the same messages as the worker would apply
        // them, parsed beforehand.
        let batched = |events: &[Event]| -> Result<(Vec<Vec<u8>>, Vec<Message>)> {
            let bodies: Vec<Vec<u8>> = events
                .chunks(PER_MESSAGE)
                .map(|c| serde_json::to_vec(c).context("serialising a batch"))
                .collect::<Result<_>>()?;
            let messages = bodies
                .iter()
                .map(|body| {
                    Ok(Message {
                        id: Some(uuid::Uuid::now_v7().to_string().into_bytes()),
                        events: parse_message(body).map_err(|r| anyhow::anyhow!("{r}"))?,
                    })
                })
                .collect::<Result<_>>()?;
            Ok((bodies, messages))
        };
        let (batches, batched_messages) = batched(&self.events)?;
        // The insert path's own events (every domain new), batched alike.
        let (insert_batches, insert_messages) = batched(&self.insert_events)?;
        // The same events as the worker would apply them, parsed beforehand: one per message
        // (with ids and without).
        let single_messages = |with_ids: bool| -> Vec<Message> {
            self.events
                .iter()
                .map(|e| Message {
                    id: with_ids.then(|| uuid::Uuid::now_v7().to_string().into_bytes()),
                    events: vec![e.clone()],
                })
                .collect()
        };

        // BENCH_STAGES=batched runs only the batched floors and worker (for big BENCH_DOMAINS).
        let only_batched = std::env::var("BENCH_STAGES").is_ok_and(|s| s == "batched");
        let (with_ids, without_ids) = if only_batched {
            (Vec::new(), Vec::new())
        } else {
            (single_messages(true), single_messages(false))
        };

        // Interleaved rounds: every stage once per round, so a slow minute on this machine
        // touches every stage alike instead of one stage's every run.
        let mut t: std::collections::BTreeMap<&'static str, Vec<Timed>> = Default::default();
        let mut publish_rates = Vec::new();
        if self.repeats % 2 == 1 && self.repeats > 1 {
            eprintln!(
                "bench: BENCH_REPEATS={} is odd: the paired stages run first in one round more \
                 than second, and a stage's place in the round weighs on its median",
                self.repeats
            );
        }
        for round in 1..=self.repeats {
            eprintln!("round {round}/{}", self.repeats);
            let mut record = |stage: &'static str, timed: Timed| {
                let steady = if timed.startup_secs.is_nan() {
                    String::new()
                } else {
                    format!(
                        "; steady {:.0} events/s after {:.3} s to the first count",
                        n / timed.steady_secs,
                        timed.startup_secs
                    )
                };
                eprintln!(
                    "  {stage}: {:.0} events/s, {:.1} CPU-µs/event ({:.2} cores busy on the machine){steady}",
                    n / timed.secs,
                    timed.cpu.total_per_event(n),
                    timed.cpu.machine_busy_cores
                );
                t.entry(stage).or_default().push(timed);
            };
            // Odd rounds run each pair below in one order, even rounds in the other, so a
            // stage's place in the round (what ran just before it) weighs on both alike.
            let odd = round % 2 == 1;
            if !only_batched {
                let (noop, publish_rate) = self.noop_drain("single-ceiling", &singles).await?;
                publish_rates.push(publish_rate);
                record("single_noop", noop);
                for ids in [odd, !odd] {
                    if ids {
                        record(
                            "single_apply_ids",
                            self.store_floor("single-apply", &with_ids, false).await?,
                        );
                    } else {
                        record(
                            "single_apply_no_ids",
                            self.store_floor("single-apply-noids", &without_ids, false)
                                .await?,
                        );
                    }
                }
                for dedup in [odd, !odd] {
                    if dedup {
                        let on = self
                            .worker_drain("single-worker", &singles, true, false, false)
                            .await?;
                        record("single_worker", on.timed);
                        if let Some((base, ours)) =
                            self.baseline_drains("single", &singles, round).await?
                        {
                            record("single_worker_baseline", base.timed);
                            record("single_worker_without_v7", ours.timed);
                        }
                    } else {
                        let off = self
                            .worker_drain("single-nodedup", &singles, false, false, false)
                            .await?;
                        record("single_worker_dedup_off", off.timed);
                    }
                }
            }
            for apply_turn in [odd, !odd] {
                if apply_turn {
                    record(
                        "batched_floor",
                        self.store_floor("batched-ceiling", &batched_messages, false)
                            .await?,
                    );
                } else {
                    record(
                        "batched_reference",
                        self.reference_floor("batched-reference", &self.events, false)
                            .await?,
                    );
                }
            }
            let batched = self
                .worker_drain("batched-worker", &batches, true, false, false)
                .await?;
            record("batched_worker", batched.timed);
            if let Some((base, ours)) = self.baseline_drains("batched", &batches, round).await? {
                record("batched_worker_baseline", base.timed);
                record("batched_worker_without_v7", ours.timed);
            }
            if let Some(baseline) = &self.baseline {
                // The Postgres sides alone, on the same two databases as those drains.
                record(
                    "batched_floor_baseline",
                    self.baseline_floor("batched-floor-base", &batched_messages, baseline)
                        .await?,
                );
                record(
                    "batched_floor_without_v7",
                    self.store_floor_in(
                        "batched-floor-nov7",
                        &batched_messages,
                        &baseline.without_v7,
                    )
                    .await?,
                );
            }
            // The insert path (every domain new) runs with BENCH_STAGES=batched too, so
            // `make bench-pg` measures it at 10,000,000 domains: into an empty table, then into
            // one holding BENCH_DOMAINS rows (`populated`); floor, reference and worker in this
            // order in odd rounds, reversed in even ones.
            for (empty, stages) in [
                (true, ["insert_floor", "insert_reference", "insert_worker"]),
                (
                    false,
                    [
                        "insert_populated_floor",
                        "insert_populated_reference",
                        "insert_populated_worker",
                    ],
                ),
            ] {
                let mut turns = [0, 1, 2];
                if !odd {
                    turns.reverse();
                }
                for turn in turns {
                    let name = stages[turn];
                    let stage = name.replace('_', "-");
                    let timed = match turn {
                        0 => self.store_floor(&stage, &insert_messages, empty).await?,
                        1 => {
                            self.reference_floor(&stage, &self.insert_events, empty)
                                .await?
                        }
                        _ => {
                            self.worker_drain(&stage, &insert_batches, true, false, empty)
                                .await?
                                .timed
                        }
                    };
                    record(name, timed);
                }
            }
        }
        // Rates and ratios are over each stage's steady window (`Timed::steady_secs`): for a
        // worker drain from the moment a tenth of the events was counted to the end, so its
        // process start-up is left out as the no-op drain's and the floors' set-up is (for
        // those, the whole timed window). Only `baseline`'s ratios are whole drains (its
        // `steady` gives them over the steady windows).
        let rate_by = |stage: &str, secs: fn(&Timed) -> f64| -> Summary {
            Summary::of(
                &t.get(stage)
                    .map(|v| v.iter().map(|x| n / secs(x)).collect::<Vec<_>>())
                    .unwrap_or_default(),
            )
        };
        let rate = |stage: &str| rate_by(stage, |x| x.steady_secs);
        // Paired per round: worker against the ceiling measured minutes apart in the same round.
        let paired_by = |worker: &str, ceiling: &str, secs: fn(&Timed) -> f64| -> Summary {
            let (Some(w), Some(c)) = (t.get(worker), t.get(ceiling)) else {
                return Summary::of(&[]);
            };
            Summary::of(
                &w.iter()
                    .zip(c)
                    .map(|(w, c)| secs(c) / secs(w))
                    .collect::<Vec<_>>(),
            )
        };
        // Whole drains, start-up included (`baseline` only).
        let paired_whole = |worker: &str, ceiling: &str| paired_by(worker, ceiling, |x| x.secs);
        // At the steady rates (worker drains without their start-up).
        let paired = |worker: &str, ceiling: &str| paired_by(worker, ceiling, |x| x.steady_secs);
        let cpu = |stage: &str| -> serde_json::Value {
            let windows: Vec<(CpuWindow, f64)> = t
                .get(stage)
                .map(|v| v.iter().map(|x| (x.cpu.clone(), n)).collect())
                .unwrap_or_default();
            serde_json::json!(measure::median_per_event(&windows))
        };
        let median_of = |stage: &str, f: &dyn Fn(&Timed) -> f64| -> f64 {
            Summary::of(
                &t.get(stage)
                    .map(|v| v.iter().map(f).collect::<Vec<_>>())
                    .unwrap_or_default(),
            )
            .median
        };
        let spread = |stages: &[&str]| -> serde_json::Value {
            stages
                .iter()
                .filter(|s| t.contains_key(**s))
                .map(|s| (s.to_string(), rate(s).json(0)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };

        let single = if only_batched {
            serde_json::Value::Null
        } else {
            let (noop, on, off) = (
                rate("single_noop"),
                rate("single_worker"),
                rate("single_worker_dedup_off"),
            );
            // The true single-message limit on this machine: every core busy with the broker
            // and client work of the no-op drain plus the Postgres work of applying the events.
            let noop_us = median_of("single_noop", &|x| x.cpu.total_per_event(n));
            let apply_pg_us = median_of("single_apply_ids", &|x| x.cpu.postgres_per_event(n));
            let limit = measure::cores() * 1e6 / (noop_us + apply_pg_us);
            // Dedup overhead: the same single-message batches applied with ids and without,
            // the CPU of Postgres and the applying client (not the broker's, which the floors
            // do not use), as a fraction of the apply cost.
            let apply_ids_us =
                median_of("single_apply_ids", &|x| x.cpu.without_broker_per_event(n));
            let apply_plain_us = median_of("single_apply_no_ids", &|x| {
                x.cpu.without_broker_per_event(n)
            });
            let pg_ids_us = apply_pg_us;
            let pg_plain_us = median_of("single_apply_no_ids", &|x| x.cpu.postgres_per_event(n));
            // The limit of messages without ids (what the dedup-off worker is read against):
            // the same no-op drain plus the Postgres CPU of applying them without ids.
            let limit_no_ids = measure::cores() * 1e6 / (noop_us + pg_plain_us);
            let dedup_overhead = (apply_ids_us - apply_plain_us) / apply_plain_us;
            // The same figures round by round (each from the stages of one round), for their
            // spread: the headline figures above are from the medians of their inputs.
            let per_round = |f: &dyn Fn(&Timed, &Timed, &Timed, &Timed) -> f64| -> Summary {
                let stages = ["single_noop", "single_apply_ids", "single_apply_no_ids"]
                    .map(|s| t.get(s).map(Vec::as_slice).unwrap_or_default());
                let worker = t
                    .get("single_worker")
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                Summary::of(
                    &(0..worker
                        .len()
                        .min(stages.iter().map(|s| s.len()).min().unwrap_or(0)))
                        .map(|i| f(&stages[0][i], &stages[1][i], &stages[2][i], &worker[i]))
                        .collect::<Vec<_>>(),
                )
            };
            let limit_of = |noop: &Timed, ids: &Timed| {
                measure::cores() * 1e6
                    / (noop.cpu.total_per_event(n) + ids.cpu.postgres_per_event(n))
            };
            let limit_rounds = per_round(&|noop, ids, _, _| limit_of(noop, ids));
            let ratio_to_limit_rounds =
                per_round(&|noop, ids, _, worker| n / worker.steady_secs / limit_of(noop, ids));
            let overhead_rounds = per_round(&|_, ids, plain, _| {
                ids.cpu.without_broker_per_event(n) / plain.cpu.without_broker_per_event(n) - 1.0
            });
            eprintln!(
                "single: limit {limit:.0} events/s (no-op drain {noop_us:.1} µs/msg + Postgres apply {apply_pg_us:.1} µs/event on {} cores), without ids {limit_no_ids:.0} (Postgres apply {pg_plain_us:.1} µs/event); dedup overhead {dedup_overhead:.3}",
                measure::cores()
            );
            serde_json::json!({
                "events": self.events.len(),
                "ceiling_events_per_s": noop.median.round(),
                "worker_events_per_s": on.median.round(),
                "ratio": round3(paired("single_worker", "single_noop").median),
                "worker_dedup_off_events_per_s": off.median.round(),
                "ratio_dedup_off": round3(paired("single_worker_dedup_off", "single_noop").median),
                "publish_confirmed_msgs_per_s": Summary::of(&publish_rates).median.round(),
                "rss_mib": round3(rss_of(&t, &["single_worker", "single_worker_dedup_off"])),
                "limit_events_per_s": limit.round(),
                "ratio_to_limit": round3(on.median / limit),
                "limit_no_ids_events_per_s": limit_no_ids.round(),
                "ratio_to_limit_dedup_off": round3(off.median / limit_no_ids),
                "limit_inputs_cpu_us": {
                    "noop_drain_per_message": round3(noop_us),
                    "postgres_apply_per_event": round3(apply_pg_us),
                    "postgres_apply_no_ids_per_event": round3(pg_plain_us),
                    "cores": measure::cores(),
                },
                "dedup_overhead": round3(dedup_overhead),
                "per_round": {
                    "limit_events_per_s": limit_rounds.json(0),
                    "ratio_to_limit": ratio_to_limit_rounds.json(3),
                    "dedup_overhead": overhead_rounds.json(3),
                },
                "dedup_overhead_postgres_only": round3((pg_ids_us - pg_plain_us) / pg_plain_us),
                "apply_events_per_s": rate("single_apply_ids").median.round(),
                "apply_no_ids_events_per_s": rate("single_apply_no_ids").median.round(),
                "cpu_us_per_event": {
                    "noop_drain": cpu("single_noop"),
                    "worker": cpu("single_worker"),
                    "worker_dedup_off": cpu("single_worker_dedup_off"),
                    "apply_ids": cpu("single_apply_ids"),
                    "apply_no_ids": cpu("single_apply_no_ids"),
                },
                "spread_events_per_s": spread(&["single_noop", "single_worker", "single_worker_dedup_off", "single_apply_ids", "single_apply_no_ids"]),
                "ratio_spread": paired("single_worker", "single_noop").json(3),
            })
        };

        let (floor, reference, worker) = (
            rate("batched_floor"),
            rate("batched_reference"),
            rate("batched_worker"),
        );
        eprintln!(
            "batched: Store::apply {:.0}, reference upsert {:.0}, worker {:.0} events/s (medians)",
            floor.median, reference.median, worker.median
        );
        // Again, with status look-ups at a fixed concurrency competing for the same CPU (once,
        // closed loop, as before issue 13: the open-loop figures are in `status`).
        let loaded = if only_batched {
            None
        } else {
            let loaded = self
                .worker_drain("batched-lookups", &batches, true, true, false)
                .await?;
            eprintln!(
                "batched worker under look-ups: {:.0} events/s (steady)",
                n / loaded.timed.steady_secs
            );
            Some(loaded)
        };
        let closed_loop = loaded.as_ref().and_then(|l| l.lookups.clone());
        let rss = [
            single["rss_mib"].as_f64(),
            Some(rss_of(
                &t,
                &["batched_worker", "insert_worker", "insert_populated_worker"],
            )),
            loaded.as_ref().map(|l| l.timed.rss_mib),
        ]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max);
        // The insert path: `prefix` is `insert` (an empty table) or `insert_populated` (one
        // holding BENCH_DOMAINS rows); every event's domain is new to either.
        let insert_of = |prefix: &str| {
            let [floor, reference, worker] =
                ["floor", "reference", "worker"].map(|s| format!("{prefix}_{s}"));
            let (floor, reference, worker) = (floor.as_str(), reference.as_str(), worker.as_str());
            serde_json::json!({
                "events": self.insert_events.len(),
                "store_apply_events_per_s": rate(floor).median.round(),
                "reference_floor_events_per_s": rate(reference).median.round(),
                "worker_events_per_s": rate(worker).median.round(),
                "ratio": round3(paired(worker, floor).median),
                "ratio_to_reference": round3(paired(worker, reference).median),
                "cpu_us_per_event": {
                    "store_apply": cpu(floor),
                    "reference": cpu(reference),
                    "worker": cpu(worker),
                },
                "spread_events_per_s": spread(&[floor, reference, worker]),
            })
        };
        let insert = t.contains_key("insert_worker").then(|| {
            let mut insert = insert_of("insert");
            insert["populated"] = insert_of("insert_populated");
            insert["populated"]["table_rows_before"] = serde_json::json!(self.domains);
            insert
        });

        // Open loop: freshness at 50 % and 90 % of the measured capacity, look-ups while
        // ingesting at half of it.
        let live = if only_batched || std::env::var("BENCH_SKIP_LIVE").is_ok() {
            None
        } else {
            Some(self.live_stages(on_capacity(&single)).await?)
        };
        let (freshness, status) = match live {
            Some((freshness, status)) => (freshness, status),
            None => (serde_json::Value::Null, serde_json::Value::Null),
        };
        let mut status = status;
        if let Some(c) = closed_loop {
            status["closed_loop"] = serde_json::json!({
                "concurrency": LOOKUP_CONCURRENCY,
                "requests": c.requests,
                "errors": c.errors,
                "p50_ms": round3(c.p50_ms),
                "p95_ms": round3(c.p95_ms),
                "p99_ms": round3(c.p99_ms),
                "rps": c.rps.round(),
            });
        }
        // Bounded memory during an outage (issue 8): ours, and the baseline's when given.
        let outage = if only_batched || std::env::var("BENCH_SKIP_OUTAGE").is_ok() {
            serde_json::Value::Null
        } else {
            eprintln!("outage: 1 MiB messages while Postgres refuses every commit");
            let bin = ours();
            let mut outage = serde_json::json!({
                "prefetch_bytes_mib": self.config.prefetch_bytes >> 20,
                "worker": self.outage("outage", bin, &self.template).await?,
            });
            if let Some(b) = &self.baseline {
                outage["baseline"] = self.outage("outage-baseline", &b.bin, &b.template).await?;
            }
            outage
        };
        // Ours against the baseline binary, paired per round (> 1: ours is faster). `paired`
        // takes (numerator, denominator) as (worker, ceiling): ours first.
        let baseline = self.baseline.as_ref().map(|b| {
            serde_json::json!({
                "bin": b.bin.display().to_string(),
                "single_events_per_s": rate_by("single_worker_baseline", |x| x.secs).median.round(),
                "single_ratio": round3(paired_whole("single_worker", "single_worker_baseline").median),
                "single_ratio_spread": paired_whole("single_worker", "single_worker_baseline").json(3),
                "batched_events_per_s": rate_by("batched_worker_baseline", |x| x.secs).median.round(),
                "batched_ratio": round3(paired_whole("batched_worker", "batched_worker_baseline").median),
                "batched_ratio_spread": paired_whole("batched_worker", "batched_worker_baseline").json(3),
                // Issue 8's changes alone: ours without V7 (issue 10) against the baseline.
                "single_ratio_without_v7": round3(paired_whole("single_worker_without_v7", "single_worker_baseline").median),
                "single_ratio_without_v7_spread": paired_whole("single_worker_without_v7", "single_worker_baseline").json(3),
                "batched_ratio_without_v7": round3(paired_whole("batched_worker_without_v7", "batched_worker_baseline").median),
                "batched_ratio_without_v7_spread": paired_whole("batched_worker_without_v7", "batched_worker_baseline").json(3),
                // The Postgres sides alone: our `Store::apply` without V7 against the baseline's
                // statements, batched alike (`baseline_floor`).
                "batched_floor_ratio_without_v7": paired_whole("batched_floor_without_v7", "batched_floor_baseline").json(3),
                "batched_floor_cpu_us_per_event": {
                    "baseline": cpu("batched_floor_baseline"),
                    "ours_without_v7": cpu("batched_floor_without_v7"),
                },
                // Without the start-up (process start to first count), which the whole drains
                // include: the rate from the first tenth counted to the end.
                "steady": {
                    "single_ratio": paired("single_worker", "single_worker_baseline").json(3),
                    "batched_ratio": paired("batched_worker", "batched_worker_baseline").json(3),
                    "single_ratio_without_v7": paired("single_worker_without_v7", "single_worker_baseline").json(3),
                    "batched_ratio_without_v7": paired("batched_worker_without_v7", "batched_worker_baseline").json(3),
                },
                "startup_secs": {
                    "ours": round3(median_of("batched_worker", &|x| x.startup_secs)),
                    "ours_without_v7": round3(median_of("batched_worker_without_v7", &|x| x.startup_secs)),
                    "baseline": round3(median_of("batched_worker_baseline", &|x| x.startup_secs)),
                },
                "rss_mib": round3(rss_of(&t, &["single_worker_baseline", "batched_worker_baseline"])),
                "cpu_us_per_event": {
                    "single": cpu("single_worker_baseline"),
                    "batched": cpu("batched_worker_baseline"),
                    "single_ours_without_v7": cpu("single_worker_without_v7"),
                    "batched_ours_without_v7": cpu("batched_worker_without_v7"),
                },
            })
        });
        Ok(serde_json::json!({
            "baseline": baseline,
            "single": single,
            "batched": {
                "events": self.events.len(),
                "messages": batches.len(),
                "ceiling_events_per_s": floor.median.round(),
                "worker_events_per_s": worker.median.round(),
                "ratio": round3(paired("batched_worker", "batched_floor").median),
                "worker_under_lookups_events_per_s": loaded.as_ref().map(|l| (n / l.timed.steady_secs).round()),
                "reference_floor_events_per_s": reference.median.round(),
                "ratio_to_reference": round3(paired("batched_worker", "batched_reference").median),
                "store_apply_ratio_to_reference": round3(paired("batched_floor", "batched_reference").median),
                "cpu_us_per_event": {
                    "store_apply": cpu("batched_floor"),
                    "reference": cpu("batched_reference"),
                    "worker": cpu("batched_worker"),
                },
                "spread_events_per_s": spread(&["batched_floor", "batched_reference", "batched_worker"]),
            },
            "insert": insert,
            "outage": outage,
            "freshness": freshness,
            "status": status,
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
                "BENCH_REPEATS": self.repeats,
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "cpu_sampled": {
                    "broker_pid": self.services.broker,
                    "postmaster_pid": self.services.postmaster,
                },
            },
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
        self.seed_domains(&url).await?;
        // The insert path starts from a migrated database without domains.
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE {}", self.empty_template))
            .await?;
        let store = Store::connect(&format!("{PG_HOST}/{}", self.empty_template), 1).await?;
        store.migrate().await?;
        drop(store);
        if let Some(baseline) = &self.baseline {
            self.baseline_template(baseline).await?;
            // Our template without V7 (the worker does not read the flag to apply).
            self.admin()
                .await?
                .batch_execute(&format!(
                    "CREATE DATABASE {} TEMPLATE {}",
                    baseline.without_v7, self.template
                ))
                .await?;
            let url = format!("{PG_HOST}/{}", baseline.without_v7);
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            let task = tokio::spawn(connection);
            // One statement each: VACUUM cannot run in the implicit transaction of a batch.
            for sql in [
                "ALTER TABLE domains DROP COLUMN catch_all_1000",
                "VACUUM ANALYZE domains",
                "CHECKPOINT",
            ] {
                client
                    .batch_execute(sql)
                    .await
                    .with_context(|| format!("dropping V7 from a copy of the template: {sql}"))?;
            }
            drop(client);
            let _ = task.await;
        }
        eprintln!(
            "template: {} domains in {:.1} s",
            self.domains,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The baseline's template: migrated by the baseline binary itself (`catchall migrate`:
    /// its own schema, whatever ours is), then the same domains as ours.
    async fn baseline_template(&self, baseline: &Baseline) -> Result<()> {
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE {}", baseline.template))
            .await?;
        let url = format!("{PG_HOST}/{}", baseline.template);
        let status = tokio::process::Command::new(&baseline.bin)
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            .status()
            .await
            .with_context(|| format!("running {} migrate", baseline.bin.display()))?;
        if !status.success() {
            bail!("{} migrate: {status}", baseline.bin.display());
        }
        self.seed_domains(&url).await
    }

    /// Every bench domain at zero in the database at `url`, vacuumed and checkpointed.
    async fn seed_domains(&self, url: &str) -> Result<()> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
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
        Ok(())
    }

    /// A database for one stage's run: the template with every domain, or (`empty`) none.
    async fn clone_db(&self, stage: &str, empty: bool) -> Result<String> {
        let template = if empty {
            &self.empty_template
        } else {
            &self.template
        };
        self.clone_db_of(stage, template).await
    }

    async fn clone_db_of(&self, stage: &str, template: &str) -> Result<String> {
        let name = format!("bench_{}_{}", stage.replace('-', "_"), self.id);
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
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
            if window.len() >= 2_000
                && let Some(confirm) = window.pop_front()
                && !confirmed(confirm).await?
            {
                bail!("prefill: nacked");
            }
        }
        for confirm in window {
            if !confirmed(confirm).await? {
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
    /// one multiple-ack, do nothing else. Returns the window and the publish msgs/s.
    async fn noop_drain(&self, stage: &str, bodies: &[Vec<u8>]) -> Result<(Timed, f64)> {
        let topology = self.topology(stage);
        let publish_rate = self.prefill(&topology, bodies, true).await?;
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let sampler = Sampler::start(&self.services, Watch::default());
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
                None => tokio::time::timeout(BROKER_TIMEOUT, consumer.next())
                    .await
                    .with_context(|| {
                        format!(
                            "{stage}: no delivery within {BROKER_TIMEOUT:?} ({seen} of {})",
                            bodies.len()
                        )
                    })?,
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
        let cpu = sampler.stop();
        let _ = connection.close(200, "".into()).await;
        self.delete_topology(&topology).await;
        Ok((Timed::window(secs, cpu), publish_rate))
    }

    /// The Postgres floor: the worker's `Store::apply` on the same messages (parsed
    /// beforehand), batched as the worker batches them, as many at once as the worker has
    /// batches in flight. Into the template with every domain, or (`empty`) none.
    async fn store_floor(&self, stage: &str, messages: &[Message], empty: bool) -> Result<Timed> {
        let template = if empty {
            &self.empty_template
        } else {
            &self.template
        };
        self.store_floor_in(stage, messages, template).await
    }

    /// [`Run::store_floor`] on a clone of `template`.
    async fn store_floor_in(
        &self,
        stage: &str,
        messages: &[Message],
        template: &str,
    ) -> Result<Timed> {
        let db = self.clone_db_of(stage, template).await?;
        let store = Store::connect(&format!("{PG_HOST}/{db}"), self.config.db_pool_size).await?;
        // Warm the pool, so the window measures applying rather than connecting.
        store.ping_within(Duration::from_secs(10)).await?;
        let (sampler, started) = (self.db_sampler(&db), Instant::now());
        // IN_FLIGHT batches committing at once.
        let batches = self.worker_batches(messages);
        let shared = &store;
        let mut applied = futures_util::stream::iter(batches)
            .map(|batch| async move { shared.apply(batch).await })
            .buffered(self.config.in_flight as usize);
        while let Some(result) = applied.next().await {
            result?;
        }
        drop(applied);
        let (secs, cpu) = (started.elapsed().as_secs_f64(), sampler.stop());
        drop(store);
        self.floor_done(&db, "store floor", secs, cpu).await
    }

    /// The CPU sampler of a floor's window: Postgres on `db`.
    fn db_sampler(&self, db: &str) -> Sampler {
        Sampler::start(
            &self.services,
            Watch {
                databases: vec![db.to_string()],
                ..Watch::default()
            },
        )
    }

    /// Ends a floor: checks that `db` counted every event, drops it, returns the window.
    async fn floor_done(&self, db: &str, what: &str, secs: f64, cpu: CpuWindow) -> Result<Timed> {
        let total = self.total_events(db).await?;
        self.drop_db(db).await;
        if total != self.events.len() as i64 {
            bail!("{what} counted {total} events, not {}", self.events.len());
        }
        Ok(Timed::window(secs, cpu))
    }

    /// `messages` cut into batches as the worker closes them (once they hold BATCH_SIZE events).
    fn worker_batches<'a>(&self, messages: &'a [Message]) -> Vec<&'a [Message]> {
        let mut batches = Vec::new();
        let (mut start, mut events) = (0, 0);
        for (i, message) in messages.iter().enumerate() {
            events += message.events.len();
            if events >= self.config.batch_size as usize || i + 1 == messages.len() {
                batches.push(&messages[start..=i]);
                (start, events) = (i + 1, 0);
            }
        }
        batches
    }

    /// The baseline's Postgres side, for [`Run::store_floor_in`] on ours without V7 to be read
    /// against: the pre-issue-8 `Store::apply` statements (`cbf388c`: one transaction per
    /// batch, `INSERT INTO applied_messages … ON CONFLICT DO NOTHING RETURNING` of the text
    /// ids, then the same sorted upsert) on a clone of the baseline's template, batched as the
    /// worker batches, IN_FLIGHT connections at once. Each batch's ids and per-domain sums are
    /// made before the window.
    async fn baseline_floor(
        &self,
        stage: &str,
        messages: &[Message],
        baseline: &Baseline,
    ) -> Result<Timed> {
        type Prepared = (Vec<String>, Vec<String>, Vec<i64>, Vec<i64>, Vec<i64>);
        let batches: Vec<Prepared> = self
            .worker_batches(messages)
            .into_iter()
            .map(|batch| {
                let mut ids: Vec<String> = batch
                    .iter()
                    .filter_map(|m| m.id.as_ref())
                    .map(|id| String::from_utf8_lossy(id).into_owned())
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                let mut totals: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
                for event in batch.iter().flat_map(|m| &m.events) {
                    let entry = totals.entry(event.domain.as_str()).or_default();
                    match event.kind {
                        EventType::Delivered => entry.0 += 1,
                        _ => entry.1 += 1,
                    }
                }
                let mut prepared: Prepared = (ids, Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (domain, (d, b)) in totals {
                    prepared.1.push(domain.to_string());
                    prepared.2.push(d);
                    prepared.3.push(b);
                    prepared.4.push(0);
                }
                prepared
            })
            .collect();
        let db = self.clone_db_of(stage, &baseline.template).await?;
        let lanes = self.config.in_flight.max(1) as usize;
        let mut clients = Vec::new();
        for _ in 0..lanes {
            let (client, connection) =
                tokio_postgres::connect(&format!("{PG_HOST}/{db}"), tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            // Text ids before our V2, bytes since (a baseline may be a later revision of ours).
            let bytes: bool = client
                .query_one(
                    "SELECT atttypid = 'bytea'::regtype FROM pg_attribute \
                     WHERE attrelid = 'applied_messages'::regclass AND attname = 'message_id'",
                    &[],
                )
                .await?
                .get(0);
            let id = if bytes {
                "convert_to(id, 'UTF8')"
            } else {
                "id"
            };
            let claim = client
                .prepare(&format!(
                    "INSERT INTO applied_messages (message_id) SELECT {id} FROM unnest($1::text[]) id \
                     ON CONFLICT DO NOTHING RETURNING message_id"
                ))
                .await?;
            let upsert = client
                .prepare(
                    "INSERT INTO domains AS d (domain, delivered, bounced, other_bounced) \
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
                     ON CONFLICT (domain) DO UPDATE \
                     SET delivered = d.delivered + EXCLUDED.delivered, bounced = d.bounced + EXCLUDED.bounced, \
                     other_bounced = d.other_bounced + EXCLUDED.other_bounced",
                )
                .await?;
            clients.push((client, claim, upsert));
        }
        let (sampler, started) = (self.db_sampler(&db), Instant::now());
        let runs = clients
            .iter_mut()
            .enumerate()
            .map(|(lane, (client, claim, upsert))| {
                let batches = &batches;
                async move {
                    for (ids, domains, d, b, o) in batches.iter().skip(lane).step_by(lanes) {
                        let tx = client.transaction().await?;
                        tx.query(&*claim, &[ids]).await?;
                        tx.execute(&*upsert, &[domains, d, b, o]).await?;
                        tx.commit().await.context("baseline floor")?;
                    }
                    Ok::<_, anyhow::Error>(())
                }
            });
        for result in futures_util::future::join_all(runs).await {
            result?;
        }
        let (secs, cpu) = (started.elapsed().as_secs_f64(), sampler.stop());
        drop(clients);
        self.floor_done(&db, "baseline floor", secs, cpu).await
    }

    /// A floor that is not our code: the plainest upsert of the same events, without
    /// deduplication. Each batch (BATCH_SIZE events, in order) summed per domain and sorted
    /// beforehand, then one `INSERT … SELECT FROM unnest(…) ON CONFLICT DO UPDATE` per batch
    /// (its own transaction), on IN_FLIGHT connections at once. `events`: the run's, or the
    /// insert path's.
    async fn reference_floor(&self, stage: &str, events: &[Event], empty: bool) -> Result<Timed> {
        type Arrays = (Vec<String>, Vec<i64>, Vec<i64>);
        let batches: Vec<Arrays> = events
            .chunks(self.config.batch_size as usize)
            .map(|chunk| {
                let mut totals: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
                for e in chunk {
                    let entry = totals.entry(e.domain.as_str()).or_default();
                    match e.kind {
                        EventType::Delivered => entry.0 += 1,
                        _ => entry.1 += 1,
                    }
                }
                let mut arrays: Arrays = Default::default();
                for (domain, (d, b)) in totals {
                    arrays.0.push(domain.to_string());
                    arrays.1.push(d);
                    arrays.2.push(b);
                }
                arrays
            })
            .collect();
        let db = self.clone_db(stage, empty).await?;
        let lanes = self.config.in_flight.max(1) as usize;
        let mut clients = Vec::new();
        for _ in 0..lanes {
            let (client, connection) =
                tokio_postgres::connect(&format!("{PG_HOST}/{db}"), tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let statement = client
                .prepare(
                    "INSERT INTO domains AS d (domain, delivered, bounced) \
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[]) \
                     ON CONFLICT (domain) DO UPDATE \
                     SET delivered = d.delivered + EXCLUDED.delivered, bounced = d.bounced + EXCLUDED.bounced",
                )
                .await?;
            clients.push((client, statement));
        }
        let (sampler, started) = (self.db_sampler(&db), Instant::now());
        let runs = clients
            .iter()
            .enumerate()
            .map(|(lane, (client, statement))| {
                let batches = &batches;
                async move {
                    for (domains, delivered, bounced) in batches.iter().skip(lane).step_by(lanes) {
                        client
                            .execute(statement, &[domains, delivered, bounced])
                            .await
                            .context("reference upsert")?;
                    }
                    Ok::<_, anyhow::Error>(())
                }
            });
        for result in futures_util::future::join_all(runs).await {
            result?;
        }
        let (secs, cpu) = (started.elapsed().as_secs_f64(), sampler.stop());
        drop(clients);
        self.floor_done(&db, "reference floor", secs, cpu).await
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
        empty: bool,
    ) -> Result<Drain> {
        let template = if empty {
            &self.empty_template
        } else {
            &self.template
        };
        let bin = ours();
        self.drain_with(stage, bodies, with_ids, lookups, (bin, template.as_str()))
            .await
    }

    /// With `BENCH_BASELINE_BIN`, two more drains of `bodies` (ids, update path): the baseline
    /// binary on its own template and ours on our template without V7.
    ///
    /// The two swap places every other round: a drain right after another runs measurably
    /// slower here (its predecessor's dropped database and deleted queue are still being
    /// cleaned up; 4–17 % in back-to-back drains of the same two binaries, 2026-12-03), so a
    /// fixed order would favour whichever comes first.
    async fn baseline_drains(
        &self,
        kind: &str,
        bodies: &[Vec<u8>],
        round: usize,
    ) -> Result<Option<(Drain, Drain)>> {
        let Some(baseline) = &self.baseline else {
            return Ok(None);
        };
        let base = (baseline.bin.as_path(), baseline.template.as_str());
        let without_v7 = (ours(), baseline.without_v7.as_str());
        let (base_stage, ours_stage) = (format!("{kind}-baseline"), format!("{kind}-nov7"));
        let drain_base = || self.drain_with(&base_stage, bodies, true, false, base);
        let drain_ours = || self.drain_with(&ours_stage, bodies, true, false, without_v7);
        Ok(Some(if round % 2 == 1 {
            let base = drain_base().await?;
            (base, drain_ours().await?)
        } else {
            let ours = drain_ours().await?;
            (drain_base().await?, ours)
        }))
    }

    /// Drains a prefilled queue with `worker`'s binary on a clone of its template database.
    async fn drain_with(
        &self,
        stage: &str,
        bodies: &[Vec<u8>],
        with_ids: bool,
        lookups: bool,
        (bin, template): (&std::path::Path, &str),
    ) -> Result<Drain> {
        let topology = self.topology(stage);
        let db = self.clone_db_of(stage, template).await?;
        self.prefill(&topology, bodies, with_ids).await?;
        let started = Instant::now();
        let (mut child, pid, base) =
            spawn_worker(bin, &format!("{PG_HOST}/{db}"), &topology, &self.config)?;
        let sampler = Sampler::start(
            &self.services,
            Watch {
                worker: Some(pid as i32),
                databases: vec![db.clone()],
                ..Watch::default()
            },
        );
        let http = http_client();
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
        // The first counted event, and the first moment a tenth was counted (with the count).
        let mut first: Option<Instant> = None;
        let mut tenth: Option<(Instant, f64, measure::Mark)> = None;
        loop {
            let now = counted(&http, &base).await;
            if let Some(c) = now.filter(|c| *c > 0.0) {
                first.get_or_insert_with(Instant::now);
                if c >= want / 10.0 && c < want {
                    tenth.get_or_insert_with(|| (Instant::now(), c, sampler.mark()));
                }
            }
            if now >= Some(want) {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("{stage}: the worker exited early: {status}");
            }
            if Instant::now() > deadline {
                bail!("{stage}: not drained within 600 s");
            }
            tokio::time::sleep(poll_interval(first, now, want)).await;
        }
        let end = Instant::now();
        let secs = (end - started).as_secs_f64();
        // Seconds and CPU for every event at the rate and cost after the first tenth (the whole
        // drain when it went faster than one poll, or the first poll past a tenth already saw
        // half counted: scaled up from so few events, the end's idle CPU would weigh too much).
        let (cpu, steady_secs) = match tenth.filter(|(_, c, _)| *c <= want / 2.0) {
            Some((at, c, mark)) => (
                sampler.stop_since(&mark).scaled(want / (want - c)),
                (end - at).as_secs_f64() * want / (want - c),
            ),
            None => (sampler.stop(), secs),
        };
        done.notify_waiters();
        let startup_secs = first.map_or(secs, |f| (f - started).as_secs_f64());
        let lookups = match lookup_task {
            Some(task) => Some(task.await?),
            None => None,
        };
        let rss_mib = peak_rss_mib(pid);
        stop_worker(&mut child, pid).await?;
        let total = self.total_events(&db).await?;
        self.drop_db(&db).await;
        self.delete_topology(&topology).await;
        if total != self.events.len() as i64 {
            bail!("{stage}: counted {total} events, not {}", self.events.len());
        }
        Ok(Drain {
            timed: Timed {
                secs,
                cpu,
                rss_mib,
                startup_secs,
                steady_secs,
            },
            lookups,
        })
    }

    /// Starts the release worker binary on `db` and `topology`; returns it, its pid and the
    /// base URL of its HTTP server.
    fn spawn_worker(
        &self,
        db: &str,
        topology: &Topology,
    ) -> Result<(tokio::process::Child, u32, String)> {
        spawn_worker(ours(), &format!("{PG_HOST}/{db}"), topology, &self.config)
    }
}

/// Our release worker binary.
pub(crate) fn ours() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_catchall"))
}

/// Starts a worker binary (ours, or the baseline's) with `config`'s batch settings; returns
/// it, its pid and the base URL of its HTTP server.
fn spawn_worker(
    bin: &std::path::Path,
    database_url: &str,
    topology: &Topology,
    config: &Config,
) -> Result<(tokio::process::Child, u32, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let child = tokio::process::Command::new(bin)
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", AMQP_URL)
        .env("CATCHALL_EXCHANGE", &topology.exchange)
        .env("CATCHALL_QUEUE", &topology.queue)
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .env("BATCH_SIZE", config.batch_size.to_string())
        .env("BATCH_TIMEOUT_MS", config.batch_timeout_ms.to_string())
        .env("PREFETCH", config.prefetch.to_string())
        .env("DB_POOL_SIZE", config.db_pool_size.to_string())
        .env("IN_FLIGHT", config.in_flight.to_string())
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker binary")?;
    let pid = child.id().context("worker pid")?;
    Ok((child, pid, base))
}

/// The worker's `/metrics` text.
async fn metrics_text(http: &reqwest::Client, base: &str) -> Result<String> {
    let response = http
        .get(format!("{base}/metrics"))
        .timeout(HTTP_TIMEOUT)
        .send()
        .await;
    let text = response.context("the worker's /metrics")?.text().await;
    text.context("the worker's /metrics")
}

/// Events the worker counted so far, from its `/metrics` (None while it does not answer).
async fn counted(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = metrics_text(http, base).await.ok()?;
    Some(
        ["delivered", "bounced"]
            .iter()
            .map(|t| metric(&text, &format!("catchall_events_total{{type=\"{t}\"}}")))
            .sum(),
    )
}

/// How long a drain waits before it asks the worker's `/metrics` for the count again: every 5 ms
/// until the first event is counted (the start-up is timed from it) and in the drain's last
/// stretch (its end is), and in between half the time left at the rate so far, at most 100 ms.
/// Each poll renders the worker's whole exposition and parses it here: polled every 5 ms
/// throughout, a single-event drain paid for ~200 of them a second, in the worker and the bench
/// process, inside the timed window the no-op drain has no such cost in.
fn poll_interval(first: Option<Instant>, counted: Option<f64>, want: f64) -> Duration {
    const FINE: f64 = 0.005;
    match (first, counted) {
        (Some(first), Some(counted)) if counted > 0.0 => {
            let rate = counted / first.elapsed().as_secs_f64().max(FINE);
            Duration::from_secs_f64(((want - counted) / rate / 2.0).clamp(FINE, 0.1))
        }
        _ => Duration::from_secs_f64(FINE),
    }
}

/// Whether the broker acked a prefill publish; an error if it did not answer within
/// [`BROKER_TIMEOUT`].
async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<bool> {
    let confirmation = tokio::time::timeout(BROKER_TIMEOUT, confirm)
        .await
        .with_context(|| format!("prefill: no confirm within {BROKER_TIMEOUT:?}"))??;
    Ok(confirmation.is_ack())
}

/// A process's peak resident memory (`VmHWM`), or its current one (`VmRSS`).
fn rss_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn peak_rss_mib(pid: u32) -> f64 {
    rss_mib(pid, "VmHWM:")
}

/// SIGTERM, then waits (up to 15 s) for a clean exit.
async fn stop_worker(child: &mut tokio::process::Child, pid: u32) -> Result<()> {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .context("the worker did not stop within 15 s")??;
    if !status.success() {
        bail!("the worker stopped with {status}");
    }
    Ok(())
}

struct Drain {
    timed: Timed,
    lookups: Option<Lookups>,
}

/// The worker's peak RSS over the runs of some stages.
fn rss_of(t: &std::collections::BTreeMap<&'static str, Vec<Timed>>, stages: &[&str]) -> f64 {
    stages
        .iter()
        .filter_map(|s| t.get(s))
        .flatten()
        .map(|x| x.rss_mib)
        .filter(|r| r.is_finite())
        .fold(0.0, f64::max)
}

/// The measured single-message capacity the open-loop stages are set against.
fn on_capacity(single: &serde_json::Value) -> f64 {
    single["worker_events_per_s"].as_f64().unwrap_or(10_000.0)
}

#[derive(Clone, Default)]
struct Lookups {
    /// Answered 2xx (the percentiles are theirs).
    requests: usize,
    /// Non-2xx answers, transport errors and timeouts ([`HTTP_TIMEOUT`]).
    errors: usize,
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
            let (mut latencies, mut errors) = (Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!("{base}/domains/{}", domain(rng.random_range(0..domains)));
                let t = Instant::now();
                match http.get(url).send().await {
                    Ok(response) if response.status().is_success() => {
                        match response.bytes().await {
                            Ok(_) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
                            Err(_) => errors += 1,
                        }
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    done.notified().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, failed) = task.await.unwrap_or_default();
        all.extend(latencies);
        errors += failed;
    }
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Lookups {
        requests: all.len(),
        errors,
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
    row(
        "batched against the reference upsert",
        batched,
        "worker_events_per_s",
        batched["ratio_to_reference"].as_f64(),
    );
    println!(
        "\nmedians of {} interleaved rounds; spread (min–max) in latest.json `spread_events_per_s`",
        r["config"]["BENCH_REPEATS"]
    );
    if single.is_object() {
        println!(
            "single: limit {} events/s (cores / (no-op drain {} + Postgres apply {} CPU-µs per event)); worker / limit {} (dedup off / limit without ids {}: {}); dedup overhead {} of the apply cost (Postgres alone {})",
            single["limit_events_per_s"],
            single["limit_inputs_cpu_us"]["noop_drain_per_message"],
            single["limit_inputs_cpu_us"]["postgres_apply_per_event"],
            single["ratio_to_limit"],
            single["limit_no_ids_events_per_s"],
            single["ratio_to_limit_dedup_off"],
            single["dedup_overhead"],
            single["dedup_overhead_postgres_only"],
        );
    }
    println!(
        "batched: Store::apply {} events/s, reference upsert {} (Store::apply / reference {}), worker / reference {}",
        batched["ceiling_events_per_s"],
        batched["reference_floor_events_per_s"],
        batched["store_apply_ratio_to_reference"],
        batched["ratio_to_reference"]
    );
    let baseline = &r["baseline"];
    if baseline.is_object() {
        println!(
            "baseline ({}): single {} events/s, ours / baseline {} (spread {}); batched {} events/s, ours / baseline {} (spread {}); baseline peak RSS {} MiB",
            baseline["bin"],
            baseline["single_events_per_s"],
            baseline["single_ratio"],
            baseline["single_ratio_spread"],
            baseline["batched_events_per_s"],
            baseline["batched_ratio"],
            baseline["batched_ratio_spread"],
            baseline["rss_mib"],
        );
        println!(
            "ours without V7 (issue 10's listing flag) / baseline: single {} (spread {}); batched {} (spread {})",
            baseline["single_ratio_without_v7"],
            baseline["single_ratio_without_v7_spread"],
            baseline["batched_ratio_without_v7"],
            baseline["batched_ratio_without_v7_spread"],
        );
        let steady = &baseline["steady"];
        println!(
            "at the steady rates (start-up left out; to the first count: ours {} s, without V7 {} s, baseline {} s): single {}, batched {}; without V7: single {}, batched {}",
            baseline["startup_secs"]["ours"],
            baseline["startup_secs"]["ours_without_v7"],
            baseline["startup_secs"]["baseline"],
            steady["single_ratio"]["median"],
            steady["batched_ratio"]["median"],
            steady["single_ratio_without_v7"]["median"],
            steady["batched_ratio_without_v7"]["median"],
        );
        println!(
            "the Postgres sides alone (Store::apply without V7 / the baseline's statements, batched alike): {}; Postgres CPU-µs per event {} / {}",
            baseline["batched_floor_ratio_without_v7"],
            baseline["batched_floor_cpu_us_per_event"]["ours_without_v7"]["postgres_backends"],
            baseline["batched_floor_cpu_us_per_event"]["baseline"]["postgres_backends"],
        );
    }
    let outage = &r["outage"];
    if outage.is_object() {
        println!(
            "outage ({} × 1 MiB queued, Postgres refusing 20 s, PREFETCH_BYTES {} MiB): worker peak RSS {} MiB{}",
            outage["worker"]["messages_of_1_mib"],
            outage["prefetch_bytes_mib"],
            outage["worker"]["peak_rss_during_outage_mib"],
            if outage["baseline"].is_object() {
                format!(
                    ", baseline {} MiB",
                    outage["baseline"]["peak_rss_during_outage_mib"]
                )
            } else {
                String::new()
            }
        );
    }
    let insert = &r["insert"];
    for (name, x) in [
        ("empty table", insert),
        ("table of BENCH_DOMAINS", &insert["populated"]),
    ] {
        if x.is_object() {
            println!(
                "insert (every domain new, {name}): Store::apply {} events/s, reference {}, worker {} (worker / reference {})",
                x["store_apply_events_per_s"],
                x["reference_floor_events_per_s"],
                x["worker_events_per_s"],
                x["ratio_to_reference"]
            );
        }
    }
    // CPU-µs per event, by process, per stage (medians).
    let mut cpu_rows: Vec<(String, &serde_json::Value)> = Vec::new();
    for (section, value) in [
        ("single", single),
        ("batched", batched),
        ("insert", insert),
        ("insert populated", &insert["populated"]),
    ] {
        if let Some(stages) = value["cpu_us_per_event"].as_object() {
            for (stage, groups) in stages {
                cpu_rows.push((format!("{section} {stage}"), groups));
            }
        }
    }
    if !cpu_rows.is_empty() {
        let groups = [
            "rabbitmq",
            "postgres_backends",
            "postgres_server",
            "worker",
            "bench",
            "total",
        ];
        println!("\n| CPU-µs per event | {} |", groups.join(" | "));
        println!("|---|{}", "---|".repeat(groups.len()));
        for (name, values) in cpu_rows {
            let cells: Vec<String> = groups
                .iter()
                .map(|g| {
                    values[*g]
                        .as_f64()
                        .map(|v| format!("{v:.1}"))
                        .unwrap_or_default()
                })
                .collect();
            println!("| {name} | {} |", cells.join(" | "));
        }
    }
    let f = &r["freshness"];
    if f.is_object() {
        println!(
            "\n| event to visible (medians of {} windows) | rate msgs/s (achieved) | p50 ms | p99 ms (min–max) | max ms | errors (markers lost) |",
            f["rounds"].as_array().map_or(1, Vec::len)
        );
        println!("|---|---|---|---|---|---|");
        for (name, x) in [
            ("50 % of capacity", f),
            ("90 % of capacity", &f["at_90_percent"]),
            ("50 %, with look-ups", &f["under_lookups"]),
        ] {
            println!(
                "| {name} | {} ({}) | {} | {} ({}–{}) | {} | {} ({}) |",
                x["rate"],
                x["achieved_rate"],
                x["p50_ms"],
                x["p99_ms"],
                x["p99_ms_spread"]["min"],
                x["p99_ms_spread"]["max"],
                x["max_ms"],
                x["errors"],
                x["markers_lost"]
            );
        }
    }
    let st = &r["status"];
    if st["rate"].is_null() {
        println!("\nstatus look-ups open loop: not run (BENCH_SKIP_LIVE)");
    } else {
        println!(
            "\nstatus look-ups open loop at {}/s ({} domains) while ingesting at {} msgs/s, medians of {} windows: p50 {} ms, p99 {} ms ({}–{}), max {} ms, {} errors of {} requests ({} non-2xx, {} timeouts, {} other)",
            st["rate"],
            st["domains"],
            st["ingest_achieved_rate"],
            st["rounds"].as_array().map_or(1, Vec::len),
            st["p50_ms"],
            st["p99_ms"],
            st["p99_ms_spread"]["min"],
            st["p99_ms_spread"]["max"],
            st["max_ms"],
            st["errors"],
            st["requests"],
            st["errors_non_2xx"],
            st["errors_timeout"],
            st["errors_transport"]
        );
    }
    let c = &st["closed_loop"];
    if c.is_object() {
        println!(
            "status closed loop ({} concurrent) during a batched drain: p50 {} ms, p95 {} ms, p99 {} ms, {} req/s, {} errors",
            c["concurrency"], c["p50_ms"], c["p95_ms"], c["p99_ms"], c["rps"], c["errors"]
        );
    }
    println!("worker peak RSS {} MiB", r["rss_peak_mib"]);
}

/// The rounds of one open-loop window as one report: the round with the median p99, its
/// `p50_ms`, `p99_ms` and `achieved_rate` replaced by the medians over the rounds, `max_ms` by
/// the maximum over every round (the median of the rounds' maxima in `median_of_max_ms`),
/// its counts (samples, requests, every kind of error) by their sums, `rate_reached` only if
/// every round reached it, plus `p99_ms_spread` and every round as it was (`rounds`).
fn over_rounds(mut runs: Vec<serde_json::Value>) -> serde_json::Value {
    let values = |key: &str| -> Vec<f64> {
        runs.iter()
            .map(|r| r[key].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let p99s = values("p99_ms");
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|a, b| p99s[*a].total_cmp(&p99s[*b]));
    let Some(middle) = order.get(order.len().saturating_sub(1) / 2) else {
        return serde_json::Value::Null;
    };
    let mut out = runs[*middle].clone();
    if !out.is_object() {
        return out;
    }
    if out.get("max_ms").is_some() {
        let maxima = values("max_ms");
        out["median_of_max_ms"] = serde_json::json!(round3(Summary::of(&maxima).median));
        // The slowest sample of any round (NaN, written as null, when no round had one).
        let max = maxima
            .into_iter()
            .filter(|x| x.is_finite())
            .reduce(f64::max);
        out["max_ms"] = serde_json::json!(round3(max.unwrap_or(f64::NAN)));
    }
    for key in [
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "p50_ms_answered",
        "p99_ms_answered",
        "achieved_rate",
        "answered_per_s",
        "rps",
    ] {
        if out.get(key).is_some() {
            out[key] = serde_json::json!(round3(Summary::of(&values(key)).median));
        }
    }
    for key in [
        "samples",
        "requests",
        "errors",
        "marker_errors",
        "markers_lost",
        "marker_polls_failed",
        "marker_publishes_failed",
        "errors_non_2xx",
        "errors_timeout",
        "errors_transport",
    ] {
        if out.get(key).is_some() {
            let sum: u64 = runs.iter().filter_map(|r| r[key].as_u64()).sum();
            out[key] = serde_json::json!(sum);
        }
    }
    if out.get("rate_reached").is_some() {
        let all = runs
            .iter()
            .all(|r| r["rate_reached"].as_bool() == Some(true));
        out["rate_reached"] = serde_json::json!(all);
    }
    out["p99_ms_spread"] = Summary::of(&p99s).json(3);
    out["rounds"] = serde_json::Value::Array(std::mem::take(&mut runs));
    out
}

/// One open-loop run: what was published, how fresh it became visible, what look-ups saw.
struct LiveRun {
    json: serde_json::Value,
    lookups: Option<serde_json::Value>,
}

impl Run {
    /// Open loop, the worker binary on a clone of the template (every domain known), fed by
    /// `catchall-producer generate --rate` in a process of its own: first the live capacity
    /// (the producer unthrottled while the worker counts: publishing and consuming share the
    /// machine, which a drain of a pre-filled queue does not measure), then freshness at 50 %
    /// and 90 % of it, and status look-ups at `BENCH_LOOKUP_RATE` while ingesting at 50 %.
    /// Returns (`freshness`, `status`).
    async fn live_stages(
        &self,
        drain_capacity: f64,
    ) -> Result<(serde_json::Value, serde_json::Value)> {
        let secs = env_u64("BENCH_LIVE_SECS", 20);
        let lookup_rate = env_u64("BENCH_LOOKUP_RATE", 5_000) as f64;
        let producer = soak::producer_path()?;
        let capacity = self.live_capacity(&producer).await?;
        eprintln!(
            "live: capacity {capacity:.0} events/s with the producer publishing (a pre-filled queue drained at {drain_capacity:.0})"
        );
        // One 20 s window holds about a thousand markers, so its p99 is the tenth-slowest and one
        // stall of the machine moves it (173.7 and 43.9 ms at 50 % in two runs of one hour):
        // every window runs BENCH_LIVE_REPEATS times, interleaved, and reports its median.
        let repeats = env_u64("BENCH_LIVE_REPEATS", 3).max(1);
        let (mut half, mut ninety, mut loaded, mut status) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 1..=repeats {
            eprintln!("live round {round}/{repeats}");
            let run = self
                .live(ours(), "live-50", &producer, capacity * 0.5, secs, None)
                .await?;
            half.push(run.json);
            let run = self
                .live(ours(), "live-90", &producer, capacity * 0.9, secs, None)
                .await?;
            ninety.push(run.json);
            let run = self
                .live(
                    ours(),
                    "live-lookups",
                    &producer,
                    capacity * 0.5,
                    secs,
                    Some(lookup_rate),
                )
                .await?;
            loaded.push(run.json);
            status.push(run.lookups.unwrap_or(serde_json::Value::Null));
        }
        let mut freshness = over_rounds(half);
        freshness["capacity_events_per_s"] = serde_json::json!(capacity.round());
        freshness["drain_capacity_events_per_s"] = serde_json::json!(drain_capacity.round());
        freshness["at_90_percent"] = over_rounds(ninety);
        let loaded = over_rounds(loaded);
        let mut status = over_rounds(status);
        status["domains"] = serde_json::json!(self.domains);
        status["ingest_rate"] = loaded["rate"].clone();
        status["ingest_achieved_rate"] = loaded["achieved_rate"].clone();
        freshness["under_lookups"] = loaded;
        Ok((freshness, status))
    }

    /// `BENCH_STAGES=lookups`: the open-loop look-ups while ingesting at half the live capacity
    /// (the `status` stage), `BENCH_REPEATS` rounds, each with our worker and, when
    /// `BENCH_OTHER_BIN` names another build of it (same schema), with that one, interleaved.
    async fn lookups_ab(&self) -> Result<serde_json::Value> {
        let secs = env_u64("BENCH_LIVE_SECS", 20);
        let rate = env_u64("BENCH_LOOKUP_RATE", 5_000) as f64;
        let producer = soak::producer_path()?;
        let other = std::env::var_os("BENCH_OTHER_BIN").map(std::path::PathBuf::from);
        let capacity = self.live_capacity(&producer).await?;
        eprintln!("lookups: live capacity {capacity:.0} events/s; ingest at half of it");
        let mut binaries = vec![("ours", ours().to_path_buf())];
        binaries.extend(other.map(|bin| ("other", bin)));
        let mut p99: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        let mut runs = Vec::new();
        for round in 1..=self.repeats {
            eprintln!("round {round}/{}", self.repeats);
            for (name, bin) in &binaries {
                let stage = format!("lookups-{name}");
                let run = self
                    .live(bin, &stage, &producer, capacity * 0.5, secs, Some(rate))
                    .await?;
                let lookups = run.lookups.unwrap_or(serde_json::Value::Null);
                p99.entry(name)
                    .or_default()
                    .push(lookups["p99_ms"].as_f64().unwrap_or(f64::NAN));
                runs.push(serde_json::json!({
                    "binary": name, "round": round, "lookups": lookups, "ingest": run.json,
                }));
            }
        }
        let mut report = serde_json::json!({
            "rate": rate, "capacity_events_per_s": capacity.round(), "runs": runs,
        });
        println!("\nlook-ups at {rate:.0}/s while ingesting at half capacity: p99 ms per round");
        for (name, values) in &p99 {
            let summary = Summary::of(values);
            println!(
                "  {name:6} median {:.1} (min {:.1}, max {:.1}): {values:?}",
                summary.median, summary.min, summary.max
            );
            report["p99_ms"][name] = summary.json(1);
        }
        Ok(report)
    }

    /// Events/s the worker counts on a clone of the template while the producer publishes
    /// unthrottled (`BENCH_CALIBRATE_SECS`, default 16; the second half is timed).
    async fn live_capacity(&self, producer: &std::path::Path) -> Result<f64> {
        let stage = "live-capacity";
        let topology = self.topology(stage);
        {
            let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
            topology
                .declare(&connection.create_channel().await?)
                .await?;
            let _ = connection.close(200, "".into()).await;
        }
        let db = self.clone_db(stage, false).await?;
        let result = async {
            let (mut child, pid, base) = self.spawn_worker(&db, &topology)?;
            let http = http_client();
            measure::wait_ready(&http, &base, Duration::from_secs(30), stage).await?;
            let secs = env_u64("BENCH_CALIBRATE_SECS", 16);
            let capacity = soak::calibrate(producer, &topology, &http, &base, secs).await;
            stop_worker(&mut child, pid).await?;
            capacity
        }
        .await;
        self.drop_db(&db).await;
        self.delete_topology(&topology).await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn live(
        &self,
        bin: &std::path::Path,
        stage: &str,
        producer: &std::path::Path,
        rate: f64,
        secs: u64,
        lookups: Option<f64>,
    ) -> Result<LiveRun> {
        let topology = self.topology(stage);
        {
            let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
            topology
                .declare(&connection.create_channel().await?)
                .await?;
            let _ = connection.close(200, "".into()).await;
        }
        let db = self.clone_db(stage, false).await?;
        let result = self
            .live_on(bin, stage, producer, &db, &topology, rate, secs, lookups)
            .await;
        self.drop_db(&db).await;
        self.delete_topology(&topology).await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn live_on(
        &self,
        bin: &std::path::Path,
        stage: &str,
        producer: &std::path::Path,
        db: &str,
        topology: &Topology,
        rate: f64,
        secs: u64,
        lookups: Option<f64>,
    ) -> Result<LiveRun> {
        let (mut child, pid, base) =
            spawn_worker(bin, &format!("{PG_HOST}/{db}"), topology, &self.config)?;
        let http = http_client();
        measure::wait_ready(&http, &base, Duration::from_secs(30), stage).await?;
        // The producer publishes in a process of its own (in the bench's, the publishers
        // starved: 20,000 of 29,000 msgs/s); its messages go to target/bench/producer.log.
        let events = (rate * secs as f64 * 2.0) as u64 + 10_000;
        let mut stream =
            soak::start_producer(producer, topology, Some(rate), events, 3, "producer.log")?;
        let producer_pid = stream.id().map(|p| p as i32);
        let markers = live::Markers::start(
            AMQP_URL,
            &topology.exchange,
            &base,
            &format!("{}-{stage}", self.id),
        );
        // Timed after a second of warm-up (the producer connects and reaches its rate), for
        // `secs`: only look-ups and markers scheduled in [window_start, window_end) are reported.
        let window_start = Instant::now() + Duration::from_secs(1);
        let window_end = window_start + Duration::from_secs(secs);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lookup_task = lookups.map(|r| {
            let (base, stop) = (base.clone(), stop.clone());
            let domains = self.domains;
            let window = (window_start, window_end);
            tokio::spawn(async move { live::lookups_at(&base, domains, r, stop, window).await })
        });
        tokio::time::sleep_until(window_start.into()).await;
        let sampler = Sampler::start(
            &self.services,
            Watch {
                worker: Some(pid as i32),
                producer: producer_pid,
                databases: vec![db.to_string()],
            },
        );
        let (counted0, started) = (counted(&http, &base).await.unwrap_or(0.0), Instant::now());
        tokio::time::sleep_until(window_end.into()).await;
        let counted1 = counted(&http, &base).await.unwrap_or(0.0);
        let window = started.elapsed().as_secs_f64();
        let cpu = sampler.stop();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        soak::stop_producer(&mut stream).await;
        let mut lookups = match lookup_task {
            Some(task) => Some(task.await.context("look-ups panicked")??),
            None => None,
        };
        if let Some(lookups) = lookups.as_mut() {
            lookups["server"] = live::server_side(&metrics_text(&http, &base).await?);
        }
        let (mut samples, marker_kinds) = markers.finish(Some((window_start, window_end))).await?;
        let rss = peak_rss_mib(pid);
        stop_worker(&mut child, pid).await?;
        let mut json = live::latency_json(&mut samples, marker_kinds.total());
        // What the worker counted in the timed window: the producer's rate when it keeps up.
        let achieved = (counted1 - counted0) / window.max(1e-9);
        json["rate"] = serde_json::json!(rate.round());
        json["achieved_rate"] = serde_json::json!(achieved.round());
        let reached = achieved >= 0.95 * rate;
        json["rate_reached"] = serde_json::json!(reached);
        if !reached {
            eprintln!(
                "{stage}: WARNING {achieved:.0} of {rate:.0} events/s counted (the producer or the worker fell behind); read the latency against the counted rate"
            );
        }
        json["seconds"] = serde_json::json!(secs);
        marker_kinds.write(&mut json);
        json["worker_rss_peak_mib"] = serde_json::json!(round3(rss));
        json["cpu_us_per_event"] = serde_json::json!(cpu.per_event((counted1 - counted0).max(1.0)));
        json["machine_busy_cores"] = serde_json::json!(round3(cpu.machine_busy_cores));
        eprintln!(
            "{stage}: {achieved:.0} of {rate:.0} events/s counted; visible p50 {} ms, p99 {} ms, max {} ms, {} errors{}",
            json["p50_ms"],
            json["p99_ms"],
            json["max_ms"],
            json["errors"],
            lookups
                .as_ref()
                .map(|l| format!(
                    "; look-ups at {}/s: p50 {} ms, p99 {} ms, max {} ms, {} errors; in the worker: {} over 5 ms, {} over 10 ms, p99 in the bucket up to {} ms, {} look-ups per query",
                    l["rate"],
                    l["p50_ms"],
                    l["p99_ms"],
                    l["max_ms"],
                    l["errors"],
                    l["server"]["share_over_5ms"],
                    l["server"]["share_over_10ms"],
                    l["server"]["p99_bucket_ms"],
                    l["server"]["lookups_per_query"]
                ))
                .unwrap_or_default()
        );
        Ok(LiveRun { json, lookups })
    }
}
