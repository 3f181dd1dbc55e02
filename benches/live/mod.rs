//! Open-loop load for `make bench` and `make soak` (issue 13): publishers at a fixed rate,
//! per-domain marker events timed from publish until the status endpoint shows them, and status
//! look-ups at a fixed rate with every non-2xx and timeout counted.
//!
//! Open loop: work is started on a schedule, not when the previous answer came back, so a stall
//! shows up as latency (measured from the scheduled time) instead of hiding as a slower client.

use anyhow::{Context, Result};
use catchall::event::{Event, EventType};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::measure::quantile;

/// One marker event per this interval while a freshness measurement runs.
const MARKER_EVERY: Duration = Duration::from_millis(20);
/// How often outstanding markers are looked up.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// A marker not visible after this long counts as lost (and as an error).
const MARKER_GIVE_UP: Duration = Duration::from_secs(30);
/// A look-up without an answer after this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Latency samples (ms) and errors, summarised as p50 / p99 / max.
pub fn latency_json(samples: &mut [f64], errors: u64) -> Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "samples": samples.len(),
        "p50_ms": round3(quantile(samples, 0.5)),
        "p99_ms": round3(quantile(samples, 0.99)),
        "max_ms": round3(samples.last().copied().unwrap_or(f64::NAN)),
        "errors": errors,
    })
}

async fn confirm_channel(amqp_url: &str) -> Result<(Connection, lapin::Channel)> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("RabbitMQ must answer")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Marker events (one new domain each) published every [`MARKER_EVERY`], each timed from its
/// publish until `GET /domains/{marker}` shows it.
pub struct Markers {
    stop: Arc<AtomicBool>,
    publisher: tokio::task::JoinHandle<Result<()>>,
    poller: tokio::task::JoinHandle<()>,
    /// Latencies not yet taken by [`Markers::take`].
    seen: Arc<Mutex<Vec<f64>>>,
    pending: Arc<Mutex<HashMap<String, Instant>>>,
    errors: Arc<AtomicU64>,
}

impl Markers {
    pub fn start(amqp_url: &str, exchange: &str, base: &str, run: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
        let errors = Arc::new(AtomicU64::new(0));
        let publisher = {
            let (url, exchange, run) =
                (amqp_url.to_string(), exchange.to_string(), run.to_string());
            let (stop, pending, errors) = (stop.clone(), pending.clone(), errors.clone());
            tokio::spawn(async move {
                let (connection, channel) = confirm_channel(&url).await?;
                let mut tick = tokio::time::interval(MARKER_EVERY);
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    k += 1;
                    let domain = format!("m{k}.{run}.marker.example");
                    let body = serde_json::to_vec(&Event {
                        domain: domain.clone(),
                        kind: EventType::Delivered,
                        evidence: None,
                    })?;
                    let properties = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(uuid::Uuid::now_v7().to_string().into());
                    let published = Instant::now();
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "marker".into(),
                            BasicPublishOptions::default(),
                            &body,
                            properties,
                        )
                        .await;
                    match confirm {
                        Ok(_) => {
                            if let Ok(mut p) = pending.lock() {
                                p.insert(domain, published);
                            }
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                let _ = connection.close(200, "".into()).await;
                Ok(())
            })
        };
        let poller = {
            let base = base.to_string();
            let (stop, pending, seen, errors) =
                (stop.clone(), pending.clone(), seen.clone(), errors.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .build()
                    .expect("a client with a timeout builds");
                let mut tick = tokio::time::interval(POLL_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut stopped_at: Option<Instant> = None;
                loop {
                    tick.tick().await;
                    let outstanding: Vec<(String, Instant)> = pending
                        .lock()
                        .map(|p| p.iter().map(|(d, t)| (d.clone(), *t)).collect())
                        .unwrap_or_default();
                    if stop.load(Ordering::Relaxed) {
                        let since = *stopped_at.get_or_insert_with(Instant::now);
                        if outstanding.is_empty() || since.elapsed() > MARKER_GIVE_UP {
                            break;
                        }
                    }
                    let checks = outstanding.into_iter().map(|(domain, published)| {
                        let (http, base) = (http.clone(), base.clone());
                        async move {
                            let answer = http.get(format!("{base}/domains/{domain}")).send().await;
                            let visible = match answer {
                                Ok(r) if r.status().is_success() => r
                                    .json::<Value>()
                                    .await
                                    .ok()
                                    .map(|v| v["delivered"].as_i64().unwrap_or(0) > 0),
                                _ => None,
                            };
                            (domain, published, visible, Instant::now())
                        }
                    });
                    for (domain, published, visible, at) in
                        futures_util::future::join_all(checks).await
                    {
                        match visible {
                            Some(true) => {
                                if let Ok(mut p) = pending.lock() {
                                    p.remove(&domain);
                                }
                                if let Ok(mut s) = seen.lock() {
                                    s.push((at - published).as_secs_f64() * 1000.0);
                                }
                            }
                            Some(false) => {
                                if published.elapsed() > MARKER_GIVE_UP {
                                    if let Ok(mut p) = pending.lock() {
                                        p.remove(&domain);
                                    }
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            None => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        };
        Self {
            stop,
            publisher,
            poller,
            seen,
            pending,
            errors,
        }
    }

    /// The latencies seen since the last call, and the errors counted so far.
    pub fn take(&self) -> (Vec<f64>, u64) {
        let samples = self
            .seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        (samples, self.errors.load(Ordering::Relaxed))
    }

    /// Stops publishing markers, waits for the outstanding ones (up to [`MARKER_GIVE_UP`]),
    /// and returns every latency not yet taken and the errors, lost markers included.
    pub async fn finish(self) -> Result<(Vec<f64>, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.publisher.await.context("marker publisher")??;
        let Self {
            poller,
            seen,
            pending,
            errors,
            ..
        } = self;
        poller.await.context("marker poller")?;
        let lost = pending.lock().map(|p| p.len() as u64).unwrap_or(0);
        let samples = seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        Ok((samples, errors.load(Ordering::Relaxed) + lost))
    }
}

/// Status look-ups of random known domains at `rate` requests/s until `stop`: each request is
/// started at its scheduled time and timed from it; non-2xx answers, transport errors and
/// timeouts are counted.
pub async fn lookups_at(
    base: &str,
    domains: u64,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> Result<Value> {
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(256)
        .build()?;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    // What the errors were: [non-2xx, timeouts, other transport errors].
    let kinds = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut rng = StdRng::seed_from_u64(11);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let scheduled = started + Duration::from_secs_f64(sent as f64 / rate);
            let url = format!(
                "{base}/domains/{}",
                crate::domain(rng.random_range(0..domains))
            );
            let (http, latencies, errors, kinds) = (
                http.clone(),
                latencies.clone(),
                errors.clone(),
                kinds.clone(),
            );
            tasks.spawn(async move {
                let ok = match http.get(url).send().await {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => true,
                        Err(e) => {
                            kinds[if e.is_timeout() { 1 } else { 2 }]
                                .fetch_add(1, Ordering::Relaxed);
                            false
                        }
                    },
                    Ok(_) => {
                        kinds[0].fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Err(e) => {
                        kinds[if e.is_timeout() { 1 } else { 2 }].fetch_add(1, Ordering::Relaxed);
                        false
                    }
                };
                match ok {
                    true => {
                        if let Ok(mut l) = latencies.lock() {
                            l.push(scheduled.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    false => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            sent += 1;
        }
        while tasks.try_join_next().is_some() {}
    }
    let secs = started.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    let mut all = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let errors = errors.load(Ordering::Relaxed);
    let mut out = latency_json(&mut all, errors);
    out["rate"] = json!(rate.round());
    out["requests"] = json!(sent);
    out["answered_per_s"] = json!((all.len() as f64 / secs).round());
    // The keys `status` had before issue 13 (closed loop), for comparison across runs.
    out["rps"] = out["answered_per_s"].clone();
    out["p95_ms"] = json!(round3(quantile(&all, 0.95)));
    out["errors_non_2xx"] = json!(kinds[0].load(Ordering::Relaxed));
    out["errors_timeout"] = json!(kinds[1].load(Ordering::Relaxed));
    out["errors_transport"] = json!(kinds[2].load(Ordering::Relaxed));
    Ok(out)
}
