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
/// A marker's publish not confirmed by the broker after this long counts as an error.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
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
/// scheduled tick until `GET /domains/{marker}` shows it. Each tick's publish runs on a task of
/// its own, so a broker that stalls delays every marker scheduled meanwhile (each a slow
/// sample), not the schedule.
pub struct Markers {
    stop: Arc<AtomicBool>,
    /// Set once the publisher has ended: every marker it published is in `pending`.
    published: Arc<AtomicBool>,
    publisher: tokio::task::JoinHandle<Result<()>>,
    poller: tokio::task::JoinHandle<()>,
    /// Latencies (ms) not yet taken by [`Markers::take`], with the tick each was scheduled at.
    seen: Arc<Mutex<Vec<(Instant, f64)>>>,
    pending: Arc<Mutex<HashMap<String, Instant>>>,
    /// Markers given up on after [`MARKER_GIVE_UP`], polls that failed (a non-2xx answer, a
    /// transport error or a timeout; the marker is polled again) and publishes the broker did
    /// not confirm: the errors, by kind.
    given_up: Arc<AtomicU64>,
    failed_polls: Arc<AtomicU64>,
    failed_publishes: Arc<AtomicU64>,
}

impl Markers {
    pub fn start(amqp_url: &str, exchange: &str, base: &str, run: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
        let given_up = Arc::new(AtomicU64::new(0));
        let failed_polls = Arc::new(AtomicU64::new(0));
        let failed_publishes = Arc::new(AtomicU64::new(0));
        let publisher = {
            let (url, exchange, run) =
                (amqp_url.to_string(), exchange.to_string(), run.to_string());
            let (stop, pending, failed_publishes) =
                (stop.clone(), pending.clone(), failed_publishes.clone());
            tokio::spawn(async move {
                let (connection, channel) = confirm_channel(&url).await?;
                let mut tick = tokio::time::interval(MARKER_EVERY);
                // Publishes not yet confirmed: at most CONFIRM_TIMEOUT / MARKER_EVERY (250).
                let mut publishes = tokio::task::JoinSet::new();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Late ticks fire at once (the default burst), each timed from its schedule.
                    let scheduled = tick.tick().await.into_std();
                    while publishes.try_join_next().is_some() {}
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
                    let (channel, exchange) = (channel.clone(), exchange.clone());
                    let (pending, failed_publishes) = (pending.clone(), failed_publishes.clone());
                    publishes.spawn(async move {
                        // The broker's confirm is awaited: a marker published just before the
                        // stop and not yet written out when the connection closed never reached
                        // the queue, and was waited for 30 s and counted as an error. Bounded
                        // (the publish too), so a broker that never confirms cannot hold
                        // `finish` for good.
                        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, async {
                            channel
                                .basic_publish(
                                    exchange.as_str().into(),
                                    "marker".into(),
                                    BasicPublishOptions::default(),
                                    &body,
                                    properties,
                                )
                                .await?
                                .await
                        })
                        .await;
                        match confirm {
                            Ok(Ok(confirmation)) if confirmation.is_ack() => {
                                if let Ok(mut p) = pending.lock() {
                                    p.insert(domain, scheduled);
                                }
                            }
                            _ => {
                                failed_publishes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
                // Every publish ends within CONFIRM_TIMEOUT.
                while publishes.join_next().await.is_some() {}
                let _ = connection.close(200, "".into()).await;
                Ok(())
            })
        };
        let poller = {
            let base = base.to_string();
            let (published, pending, seen, given_up, failed_polls) = (
                published.clone(),
                pending.clone(),
                seen.clone(),
                given_up.clone(),
                failed_polls.clone(),
            );
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
                    // Read before the outstanding markers: once it is set, they are all in
                    // `pending`. (Checking the publisher's stop instead ended the poll early
                    // when the last marker went in after the poll had read `pending`, and
                    // counted that marker as lost.)
                    let finished = published.load(Ordering::Acquire);
                    let outstanding: Vec<(String, Instant)> = pending
                        .lock()
                        .map(|p| p.iter().map(|(d, t)| (d.clone(), *t)).collect())
                        .unwrap_or_default();
                    if finished {
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
                                    s.push((published, (at - published).as_secs_f64() * 1000.0));
                                }
                            }
                            Some(false) => {
                                if published.elapsed() > MARKER_GIVE_UP {
                                    if let Ok(mut p) = pending.lock() {
                                        p.remove(&domain);
                                    }
                                    given_up.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            None => {
                                failed_polls.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        };
        Self {
            stop,
            published,
            publisher,
            poller,
            seen,
            pending,
            given_up,
            failed_polls,
            failed_publishes,
        }
    }

    /// The latencies seen since the last call.
    pub fn take(&self) -> Vec<f64> {
        self.seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s).into_iter().map(|x| x.1).collect())
            .unwrap_or_default()
    }

    /// Stops publishing markers, waits for the outstanding ones (up to [`MARKER_GIVE_UP`]),
    /// and returns the latencies not yet taken (with `window`, only those of markers scheduled
    /// in `[start, end)`: the timed window) and the errors ([`MarkerErrors`], of every marker).
    pub async fn finish(
        self,
        window: Option<(Instant, Instant)>,
    ) -> Result<(Vec<f64>, MarkerErrors)> {
        self.stop.store(true, Ordering::Relaxed);
        let ended = self.publisher.await;
        self.published.store(true, Ordering::Release);
        ended.context("marker publisher")??;
        let Self {
            poller,
            seen,
            pending,
            given_up,
            failed_polls,
            failed_publishes,
            ..
        } = self;
        poller.await.context("marker poller")?;
        let outstanding = pending.lock().map(|p| p.len() as u64).unwrap_or(0);
        let kinds = MarkerErrors {
            lost: given_up.load(Ordering::Relaxed) + outstanding,
            failed_polls: failed_polls.load(Ordering::Relaxed),
            failed_publishes: failed_publishes.load(Ordering::Relaxed),
        };
        let samples = seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
            .into_iter()
            .filter(|(at, _)| window.is_none_or(|(start, end)| (start..end).contains(at)))
            .map(|x| x.1)
            .collect();
        Ok((samples, kinds))
    }
}

/// What the marker errors were.
pub struct MarkerErrors {
    /// Markers the broker confirmed whose domain never showed as delivered within
    /// [`MARKER_GIVE_UP`]: events the worker lost or was that late with.
    pub lost: u64,
    /// Polls of the status endpoint that failed (the marker was polled again).
    pub failed_polls: u64,
    /// Markers the broker did not confirm (never pending, so never polled).
    pub failed_publishes: u64,
}

impl MarkerErrors {
    /// Every marker error: failed publishes and polls, lost markers.
    pub fn total(&self) -> u64 {
        self.lost + self.failed_polls + self.failed_publishes
    }

    /// Adds the total and the three counts to a window's or the soak's JSON.
    pub fn write(&self, json: &mut Value) {
        json["marker_errors"] = json!(self.total());
        json["markers_lost"] = json!(self.lost);
        json["marker_polls_failed"] = json!(self.failed_polls);
        json["marker_publishes_failed"] = json!(self.failed_publishes);
    }
}

/// Status look-ups of random known domains at `rate` requests/s until `stop`: each request is
/// started at its scheduled time and timed from it; non-2xx answers, transport errors and
/// timeouts are counted. Only requests scheduled in `window` (`[start, end)`: the timed window)
/// are reported.
///
/// A failed request is a sample of [`REQUEST_TIMEOUT`] or its time, whichever is longer, in the
/// percentiles (`p50_ms`, `p95_ms`, `p99_ms`, `max_ms`), so they cannot improve as requests
/// fail; `p50_ms_answered` and `p99_ms_answered` are over the 2xx answers alone (what `p50_ms`
/// and `p99_ms` were before, equal to them when nothing failed).
///
/// The client is [`KeepAlive`] connections (a new one whenever none is idle, so the schedule
/// never waits for one), not reqwest: it shares the machine with the worker it measures, and
/// with reqwest the bench process spent up to 55 CPU-µs per look-up (0.28 of a core at 5,000/s).
pub async fn lookups_at(
    base: &str,
    domains: u64,
    rate: f64,
    stop: Arc<AtomicBool>,
    (window_start, window_end): (Instant, Instant),
) -> Result<Value> {
    let addr = base
        .strip_prefix("http://")
        .context("the look-up client speaks plain http://")?
        .trim_end_matches('/')
        .to_string();
    let idle: Arc<Mutex<Vec<KeepAlive>>> = Arc::default();
    // (ms, answered 2xx) of every request scheduled in the window.
    let latencies: Arc<Mutex<Vec<(f64, bool)>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    // What the errors were: [non-2xx, timeouts, other transport errors].
    let kinds = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut rng = StdRng::seed_from_u64(11);
    let started = Instant::now();
    let (mut sent, mut requests) = (0u64, 0u64);
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let scheduled = started + Duration::from_secs_f64(sent as f64 / rate);
            let timed = (window_start..window_end).contains(&scheduled);
            requests += u64::from(timed);
            let path = format!("/domains/{}", crate::domain(rng.random_range(0..domains)));
            let (addr, idle, latencies, errors, kinds) = (
                addr.clone(),
                idle.clone(),
                latencies.clone(),
                errors.clone(),
                kinds.clone(),
            );
            tasks.spawn(async move {
                let mut reused = idle.lock().ok().and_then(|mut idle| idle.pop());
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    loop {
                        let (mut connection, fresh) = match reused.take() {
                            Some(connection) => (connection, false),
                            None => (KeepAlive::connect(&addr).await?, true),
                        };
                        match connection.get(&addr, &path).await {
                            Ok(answer) => return Ok::<_, std::io::Error>((answer, connection)),
                            // The server closed an idle connection: once more on a new one.
                            Err(Answer::NotSent(_)) if !fresh => continue,
                            Err(Answer::NotSent(error) | Answer::Broken(error)) => {
                                return Err(error);
                            }
                        }
                    }
                })
                .await;
                let kind = match answer {
                    Ok(Ok(((status, keep_alive), connection))) => {
                        if keep_alive && let Ok(mut idle) = idle.lock() {
                            idle.push(connection);
                        }
                        match (200..300).contains(&status) {
                            true => None,
                            false => Some(0),
                        }
                    }
                    Err(_) => Some(1),
                    Ok(Err(_)) => Some(2),
                };
                if !timed {
                    return;
                }
                let took = scheduled.elapsed();
                let sample = match kind {
                    None => (took, true),
                    Some(kind) => {
                        kinds[kind].fetch_add(1, Ordering::Relaxed);
                        errors.fetch_add(1, Ordering::Relaxed);
                        (took.max(REQUEST_TIMEOUT), false)
                    }
                };
                if let Ok(mut l) = latencies.lock() {
                    l.push((sample.0.as_secs_f64() * 1000.0, sample.1));
                }
            });
            sent += 1;
        }
        while tasks.try_join_next().is_some() {}
    }
    let secs = (window_end - window_start).as_secs_f64();
    while tasks.join_next().await.is_some() {}
    let samples = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let mut all: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let mut answered: Vec<f64> = samples.iter().filter(|s| s.1).map(|s| s.0).collect();
    answered.sort_by(f64::total_cmp);
    let errors = errors.load(Ordering::Relaxed);
    let mut out = latency_json(&mut all, errors);
    out["p50_ms_answered"] = json!(round3(quantile(&answered, 0.5)));
    out["p99_ms_answered"] = json!(round3(quantile(&answered, 0.99)));
    out["rate"] = json!(rate.round());
    out["requests"] = json!(requests);
    out["answered_per_s"] = json!((answered.len() as f64 / secs).round());
    // The keys `status` had before issue 13 (closed loop), for comparison across runs.
    out["rps"] = out["answered_per_s"].clone();
    out["p95_ms"] = json!(round3(quantile(&all, 0.95)));
    out["errors_non_2xx"] = json!(kinds[0].load(Ordering::Relaxed));
    out["errors_timeout"] = json!(kinds[1].load(Ordering::Relaxed));
    out["errors_transport"] = json!(kinds[2].load(Ordering::Relaxed));
    Ok(out)
}

/// What the worker itself saw of its single look-ups, from its
/// `catchall_http_request_duration_seconds` histogram of `/domains/{domain}` (every such request
/// of the run: the look-up client's and the marker polls): the share that took longer than 5 and
/// 10 ms from the router taking the request to the answer, and the upper bound of the bucket
/// holding the 99th percentile; and the look-ups per Postgres query ([`catchall::lookups`]).
/// Beside the client's open-loop figures this tells the time in the handler (Postgres included)
/// from the time before it: the socket, the kernel, the runtime.
pub fn server_side(metrics: &str) -> Value {
    let series = "catchall_http_request_duration_seconds_bucket{route=\"/domains/{domain}\",le=\"";
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|line| {
            // `le` parses as f64, "+Inf" included.
            let (le, count) = line.strip_prefix(series)?.split_once("\"} ")?;
            Some((le.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.iter().map(|b| b.1).fold(0.0, f64::max);
    let within = |seconds: f64| {
        buckets
            .iter()
            .find(|b| (b.0 - seconds).abs() < 1e-9)
            .map_or(f64::NAN, |b| b.1)
    };
    let over = |seconds: f64| round3(1.0 - within(seconds) / total.max(1.0));
    let p99 = buckets
        .iter()
        .find(|b| b.1 >= 0.99 * total)
        .map(|b| b.0 * 1000.0);
    // Look-ups per Postgres query: above 1 when look-ups queued for one of the two queries.
    let queries = crate::metric(metrics, "catchall_lookup_group_domains_count");
    let grouped = crate::metric(metrics, "catchall_lookup_group_domains_sum");
    json!({
        "requests": total,
        "lookups_per_query": round3(grouped / queries.max(1.0)),
        "share_over_5ms": over(0.005),
        "share_over_10ms": over(0.010),
        "p99_bucket_ms": p99.filter(|p| p.is_finite()),
    })
}

/// One keep-alive HTTP/1.1 connection of the look-up client: `GET` a path, read the whole
/// answer (`Content-Length` bodies, which is what the worker sends).
struct KeepAlive(tokio::io::BufReader<tokio::net::TcpStream>);

impl KeepAlive {
    async fn connect(addr: &str) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self(tokio::io::BufReader::new(stream)))
    }

    /// The answer's status code and whether the connection stays open, once its body is read.
    async fn get(&mut self, host: &str, path: &str) -> Result<(u16, bool), Answer> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let invalid = |what: &str| {
            Answer::Broken(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                what.to_string(),
            ))
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let sent = self.0.get_mut().write_all(request.as_bytes()).await;
        sent.map_err(Answer::NotSent)?;
        let mut line = String::new();
        match self.0.read_line(&mut line).await {
            Ok(0) => {
                let closed = std::io::ErrorKind::UnexpectedEof;
                return Err(Answer::NotSent(closed.into()));
            }
            Ok(_) => {}
            Err(error) => return Err(Answer::NotSent(error)),
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid("no status line"))?;
        let (mut length, mut keep_alive) = (None, true);
        loop {
            line.clear();
            if self.0.read_line(&mut line).await.map_err(Answer::Broken)? == 0 {
                return Err(invalid("closed before the end of the headers"));
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<u64>().ok();
                } else if name.eq_ignore_ascii_case("connection") {
                    keep_alive = !value.trim().eq_ignore_ascii_case("close");
                }
            }
        }
        let length = length.ok_or_else(|| invalid("no Content-Length"))?;
        let mut body = (&mut self.0).take(length);
        let read = tokio::io::copy(&mut body, &mut tokio::io::sink()).await;
        match read.map_err(Answer::Broken)? == length {
            true => Ok((status, keep_alive)),
            false => Err(invalid("closed before the end of the body")),
        }
    }
}

/// Why a look-up got no answer: the request was not taken (the connection was closed before
/// any of the answer came back: a reused one is tried again on a new connection), or the answer
/// broke off.
enum Answer {
    NotSent(std::io::Error),
    Broken(std::io::Error),
}
