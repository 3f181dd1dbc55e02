//! The consumer: deliveries in, batches applied to Postgres, acks out (SPEC §4).
//!
//! One loop, the same in production and in tests: [`Consumer::step`] gathers a batch (acking
//! earlier batches as their commits end meanwhile), submits it to the [`Pipeline`], which applies
//! up to `in_flight` batches at once, each in a task of its own, and acks what is ready, strictly
//! in delivery order. [`run`] calls `step` until the stop, and reconnects when the broker goes
//! away; tests call `step`, or the pipeline's `submit`, `ack_ready` and `drain`, one at a time.

use crate::amqp::{self, Topology};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::event::parse_body;
use crate::health::Health;
use crate::metrics;
use crate::store::{Applied, Message, Store};
use anyhow::{Context, anyhow};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;

/// How many events make a batch, and how long a batch waits to fill.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// A batch closes once it holds this many events (a message is never split).
    pub size: usize,
    /// Batches committing at once while the next one gathers.
    pub in_flight: usize,
    pub timeout: Duration,
}

/// A point in a batch's life where a test can inject a fault (cut a connection, kill the worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The batch's statements ran; `COMMIT` is next. The hook is called as each apply attempt
    /// starts; a future it returns is awaited at that moment, with the upsert and `COMMIT`
    /// sent apart. `None` (nothing to inject) leaves the attempt as production runs it, the
    /// upsert and `COMMIT` sent together.
    BeforeCommit,
    /// The transaction committed; the ack is next.
    AfterCommit,
    /// The prefetch is about to be raised (`basic.qos`, `basic.cancel`, `basic.consume`, each
    /// awaiting the broker's reply); a future returned here stands for a broker that does not
    /// answer them.
    BeforeRaise,
}

/// A test's fault injector, called at each [`FaultPoint`] (see [`ConsumerSettings::fault_hook`]):
/// the future it returns, if any, is awaited there.
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> Option<BoxFuture<'static, ()>> + Send + Sync>;

/// What the consumer uses of the configuration.
#[derive(Clone)]
pub struct ConsumerSettings {
    pub amqp_url: String,
    pub topology: Topology,
    /// PREFETCH: the most unacked messages.
    pub prefetch: u16,
    /// PREFETCH_BYTES: the most bytes of unacked bodies.
    pub prefetch_bytes: u64,
    pub batch: BatchSettings,
    /// SHUTDOWN_TIMEOUT: an apply attempt still running near its end is abandoned.
    pub shutdown_timeout: Duration,
    /// This worker's own counts (the Prometheus metrics are the process').
    pub stats: Arc<WorkerStats>,
    /// Tests only: awaited at each [`FaultPoint`]. Production never sets one.
    pub fault_hook: Option<FaultHook>,
}

impl ConsumerSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            amqp_url: config.amqp.amqp_url.clone(),
            topology: config.amqp.topology(),
            prefetch: config.prefetch,
            prefetch_bytes: config.prefetch_bytes,
            batch: BatchSettings {
                size: config.batch_size as usize,
                in_flight: config.in_flight as usize,
                timeout: config.batch_timeout(),
            },
            shutdown_timeout: config.shutdown_timeout,
            stats: Arc::default(),
            fault_hook: None,
        }
    }
}

/// One worker's counts, beside the process-global metrics: two workers in one process (tests)
/// each see their own.
#[derive(Debug, Default)]
pub struct WorkerStats {
    batches: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    recovered: AtomicU64,
    rejected: AtomicU64,
    database_rejected: AtomicU64,
    db_errors: AtomicU64,
    reconnects: AtomicU64,
    unacked_bytes: AtomicU64,
}

/// A copy of [`WorkerStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Batches committed (a bisected batch counts once per part).
    pub batches: u64,
    /// Messages counted.
    pub applied: u64,
    /// Messages skipped as already applied.
    pub duplicates: u64,
    /// Batches found committed by an earlier attempt whose `COMMIT` went unanswered.
    pub recovered: u64,
    /// Invalid messages dead-lettered while gathering.
    pub rejected: u64,
    /// Messages dead-lettered because Postgres refused them.
    pub database_rejected: u64,
    /// Failed apply attempts (transient Postgres errors).
    pub db_errors: u64,
    /// Connections to RabbitMQ lost and retried.
    pub reconnects: u64,
    /// Bytes of bodies held unacked (gathering and committing).
    pub unacked_bytes: u64,
}

impl WorkerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            batches: get(&self.batches),
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            recovered: get(&self.recovered),
            rejected: get(&self.rejected),
            database_rejected: get(&self.database_rejected),
            db_errors: get(&self.db_errors),
            reconnects: get(&self.reconnects),
            unacked_bytes: get(&self.unacked_bytes),
        }
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bodies taken (`gathered`) or given back (acked, rejected, returned to the broker).
    fn unacked(&self, gathered: usize, released: usize) {
        let now = if gathered >= released {
            let delta = (gathered - released) as u64;
            self.unacked_bytes.fetch_add(delta, Ordering::Relaxed) + delta
        } else {
            let delta = (released - gathered) as u64;
            let before = self
                .unacked_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                    Some(now.saturating_sub(delta))
                })
                .unwrap_or_default();
            before.saturating_sub(delta)
        };
        metrics::unacked_bytes(now as usize);
    }

    /// Batches committed so far.
    fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// The connection ended: the broker took back every unacked body, and its read gate goes
    /// with it.
    fn unacked_reset(&self) {
        self.unacked_bytes.store(0, Ordering::Relaxed);
        metrics::unacked_bytes(0);
        metrics::read_gate_in_use(None);
    }
}

/// Deliveries gathered into one unit of work.
#[derive(Debug)]
pub struct Batch {
    /// Valid messages, in delivery order.
    pub messages: Vec<Message>,
    /// Invalid messages rejected (dead-lettered) while gathering.
    pub rejected: usize,
    /// Events in `messages`.
    pub events: usize,
    /// Delivery tag of each of `messages`: the last acks the batch (one multiple-ack), each
    /// dead-letters its message if Postgres refuses it.
    pub tags: Vec<u64>,
    /// Bytes of the bodies of `messages`.
    pub bytes: usize,
    /// Identifies this batch in Postgres, so a retry after a lost COMMIT reply is recognised
    /// (see [`Store::apply_once`]).
    pub token: [u8; 16],
    /// The batch's trace span (`batch`): gather, apply, commit and ack are its children; each
    /// message's W3C trace is linked to it.
    pub span: tracing::Span,
}

/// What one step did: `applied` sums the batches acked during the step (earlier batches, and
/// this one if its commit ended in time), `rejected` counts the invalid messages gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A batch was gathered and submitted.
    Done { applied: Applied, rejected: usize },
    /// The stop signal came; everything in flight was committed and acked.
    Stopped { applied: Applied, rejected: usize },
}

/// One connection, one channel, one consumer on the events queue.
pub struct Consumer {
    connection: Connection,
    channel: Channel,
    deliveries: lapin::Consumer,
    consumer_tag: String,
    /// Consumers cancelled to change the prefetch, whose buffered deliveries come first.
    draining: VecDeque<lapin::Consumer>,
    settings: ConsumerSettings,
    prefetch: Prefetch,
    /// Batches this worker had committed when the connection opened (see [`Prefetch::observe`]).
    batches_at_open: u64,
    /// The connection stops reading while this holds `PREFETCH_BYTES` of bodies not yet acked
    /// or rejected: the prefetch counts messages, so a switch to large ones would otherwise
    /// bring up to `PREFETCH` of them at once (see `vendor/README.md`, lapin).
    gate: lapin::ReadGate,
}

/// The largest body a message may have (SPEC §3): what the prefetch assumes of a message it has
/// not seen yet.
const MAX_BODY: usize = 1 << 20;

/// The prefetch: `PREFETCH_BYTES / 1 MiB` (the largest body there may be) until a window of
/// deliveries has been seen, then raised to `PREFETCH_BYTES / mean body of the window` (at most
/// PREFETCH) at the end of the first window that allows a raise. The mean, not the largest body:
/// the read gate keeps the bodies held under PREFETCH_BYTES whatever their sizes, so the prefetch
/// need only bring that many bytes on average. Sized for a window's largest body, one 90 KiB
/// message among single events held the prefetch at 729, and single-event batches at a third of
/// their size, for as long as the connection lived (`benches/ab-drain.sh`, `AB_HEAD_BULK`).
///
/// It is never lowered: a lowering would come when the first large body is taken, after the
/// broker sent the rest into the credit, and the `basic.cancel-ok` it waits for comes after
/// them, so the connection would read them all while waiting (a read gate lets reading go on
/// while a reply is awaited). The connection's read gate keeps the bodies under PREFETCH_BYTES
/// when the messages turn large. RabbitMQ fixes a consumer's prefetch when it starts (basic.qos
/// on a live channel only affects consumers started after it), so a raise is basic.qos, then
/// basic.cancel of the current consumer (its deliveries already sent stay unacked and are
/// processed and acked as usual, nothing is requeued), then basic.consume with the new prefetch.
/// The connection reads on while it waits for those replies, through whatever the old consumer
/// was sent before them, so a raise is made only from a prefetch whose deliveries fit the budget
/// at 1 MiB each: once, from the first one. Nor after a window with a delivery over 1 MiB, its
/// body and what its header holds once parsed (`lapin::ReadGate::header_weight`): a window of
/// small bodies with headers of megabytes raises nothing. (Deliveries sent after the window,
/// while the replies are awaited, are read whatever their headers: up to the first prefetch of
/// them.) The mean is of the bodies alone: a delivery's header is dropped when it is taken, and
/// a `traceparent` weighs ~1.1 KiB parsed (its table's B-tree node), ~24 times a single event.
#[derive(Debug, Clone)]
struct Prefetch {
    budget: u64,
    max: u16,
    /// The prefetch in force, and the first one (the only one raised from).
    current: u16,
    initial: u16,
    /// Bytes of bodies, the largest delivery (body and parsed header) and the deliveries seen
    /// in the current window, and the deliveries it spans.
    window_bytes: u64,
    window_largest: usize,
    window_seen: usize,
    window_len: usize,
}

impl Prefetch {
    fn new(budget: u64, max: u16) -> Self {
        // Until a window has been seen, assume the largest message there may be.
        let initial = Self::fit(budget, MAX_BODY as u64, max);
        Self {
            budget,
            max,
            current: initial,
            initial,
            window_bytes: 0,
            window_largest: 0,
            window_seen: 0,
            window_len: usize::from(initial),
        }
    }

    /// The prefetch that brings `budget` bytes of bodies of `body` bytes, within 1..=`max`.
    fn fit(budget: u64, body: u64, max: u16) -> u16 {
        (budget / body.max(1)).clamp(1, u64::from(max)) as u16
    }

    /// Records one delivery of a `body` and `weight` bytes in all (body and parsed header);
    /// returns the new prefetch when it must change. `may_raise`: a batch
    /// committed since the connection opened. While nothing commits (Postgres stalled from the
    /// start, or again after a reconnect) a window passes without a raise: more messages in hand
    /// would not be counted sooner, and when they turn large they fill the read gate, which
    /// blocks the broker's writes until it closes the connection (30 s), and again on every
    /// connection after it. Each close returns what was unacked, and RabbitMQ 3.x counts that
    /// as a delivery against `DELIVERY_LIMIT`.
    fn observe(&mut self, body: usize, weight: usize, may_raise: bool) -> Option<u16> {
        if self.current != self.initial {
            return None; // raised already: it changes no more
        }
        self.window_bytes += body as u64;
        self.window_largest = self.window_largest.max(weight);
        self.window_seen += 1;
        if self.window_seen < self.window_len {
            return None;
        }
        let mean = self.window_bytes / self.window_seen as u64;
        let target = Self::fit(self.budget, mean, self.max);
        // No raise after a delivery over the largest body allowed: a raise reads past the gate
        // while it awaits the broker's replies, which fits the budget only for deliveries of at
        // most 1 MiB.
        let oversized = self.window_largest > MAX_BODY;
        self.window_bytes = 0;
        self.window_largest = 0;
        self.window_seen = 0;
        if !may_raise {
            return None; // the next window of the same length decides
        }
        self.window_len = usize::from(target.max(self.current)).max(64);
        // Raise only from the first prefetch, whose deliveries fit the budget at 1 MiB each (or
        // are one body, under a budget below 1 MiB); never lower (see above).
        if target > self.current && !oversized {
            self.current = target;
            Some(target)
        } else {
            None
        }
    }
}

impl Consumer {
    /// Connects, declares the topology, sets the prefetch and starts consuming.
    pub async fn open(settings: &ConsumerSettings) -> anyhow::Result<Self> {
        let queue = &settings.topology.queue;
        let gate = lapin::ReadGate::new(settings.prefetch_bytes);
        let name = format!("catchall-worker {queue}");
        let connection = amqp::connect_gated(&settings.amqp_url, &name, Some(&gate))
            .await
            .with_context(|| {
                format!(
                    "{CONNECTING}{}",
                    crate::config::redact_url(&settings.amqp_url)
                )
            })?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        settings
            .topology
            .declare(&channel)
            .await
            .context("declaring the topology")?;
        // qos before consume, so the broker never sends more than the prefetch.
        let prefetch = Prefetch::new(settings.prefetch_bytes, settings.prefetch);
        channel
            .basic_qos(prefetch.current, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        metrics::prefetch_set(prefetch.current);
        metrics::read_gate_in_use(Some(&gate));
        let (consumer_tag, deliveries) = consume(&channel, queue).await?;
        tracing::info!(
            queue = %queue,
            prefetch = prefetch.current,
            prefetch_bytes = settings.prefetch_bytes,
            "Consuming."
        );
        Ok(Self {
            connection,
            channel,
            deliveries,
            consumer_tag,
            draining: VecDeque::new(),
            settings: settings.clone(),
            prefetch,
            batches_at_open: settings.stats.batches(),
            gate,
        })
    }

    /// The pipeline that applies and acks this consumer's batches. `cancel` is the stop (the loop
    /// commits what is in flight, retrying a failing Postgres meanwhile, and returns); `abort` fires
    /// when a stop runs out of time (an apply attempt still running is abandoned, its batch
    /// stays unacked and comes back).
    pub fn pipeline(
        &self,
        store: &Store,
        health: &Arc<Health>,
        cancel: &CancellationToken,
        abort: &CancellationToken,
    ) -> Pipeline {
        Pipeline {
            applier: Applier {
                store: store.clone(),
                health: health.clone(),
                channel: self.channel.clone(),
                cancel: cancel.clone(),
                // Fired by a stop out of time, or when the pipeline is dropped.
                abort: abort.child_token(),
                hook: self.settings.fault_hook.clone(),
                stats: self.settings.stats.clone(),
                gate: self.gate.clone(),
            },
            in_flight: self.settings.batch.in_flight.max(1),
            committing: VecDeque::new(),
            partly_committed: Vec::new(),
        }
    }

    /// Gathers a batch: waits for a first delivery, then until the batch is full or its timeout
    /// has passed, whichever comes first. Invalid messages are rejected at once (no requeue, so
    /// they are dead-lettered). Returns early with what it has when `cancel` fires.
    pub async fn next_batch(&mut self, cancel: &CancellationToken) -> anyhow::Result<Batch> {
        let span = tracing::info_span!(
            parent: None,
            "batch",
            otel.kind = "consumer",
            messages = Empty,
            events = Empty,
            bytes = Empty,
            rejected = Empty,
            applied = Empty,
            duplicates = Empty,
            database_rejected = Empty,
        );
        let mut batch = Batch {
            messages: Vec::new(),
            rejected: 0,
            events: 0,
            tags: Vec::new(),
            bytes: 0,
            token: *uuid::Uuid::now_v7().as_bytes(),
            span,
        };
        let gather = tracing::info_span!(parent: &batch.span, "gather");
        self.gather(&mut batch, cancel).instrument(gather).await?;
        batch.span.record("messages", batch.messages.len() as i64);
        batch.span.record("events", batch.events as i64);
        batch.span.record("bytes", batch.bytes as i64);
        batch.span.record("rejected", batch.rejected as i64);
        Ok(batch)
    }

    async fn gather(
        &mut self,
        batch: &mut Batch,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let traced = crate::telemetry::traces_enabled();
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.events < self.settings.batch.size {
            // Mid-batch with no delivery waiting: nap (see GATHER_NAP) before waiting for one.
            let mut ready = None;
            if let Some(deadline) = deadline {
                ready = next_delivery(&mut self.draining, &mut self.deliveries).now_or_never();
                if ready.is_none() {
                    let nap = deadline.min(tokio::time::Instant::now() + GATHER_NAP);
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep_until(nap) => {}
                    }
                }
            }
            let next = match ready {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    next = next_delivery(&mut self.draining, &mut self.deliveries) => next,
                    _ = sleep_until(deadline) => break,
                },
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(error).context("the consumer failed"),
                None => return Err(anyhow!("the broker ended the consumer")),
            };
            // Its headers go with it at the end of this turn: what the read gate counted for
            // them is given back now, its body's bytes at its ack or reject. A raise of the
            // prefetch reads past the gate what the broker sent before its replies, and a small
            // body can come with a header that is megabytes once parsed: see `observe`.
            let header = lapin::ReadGate::header_weight(&delivery.properties);
            self.gate.release(header);
            let size = delivery.data.len();
            self.settings.stats.unacked(size, 0);
            let committed = self.settings.stats.batches() > self.batches_at_open;
            let weight = size.saturating_add(usize::try_from(header).unwrap_or(usize::MAX));
            if let Some(prefetch) = self.prefetch.observe(size, weight, committed) {
                // The raise awaits three replies of the broker; a stop does not wait for them:
                // a broker that stopped answering then held the stop until the heartbeat gave
                // up, past SHUTDOWN_TIMEOUT. What this batch gathered stays unacked and comes
                // back, as after a lost connection.
                tokio::select! {
                    raised = self.reconsume(prefetch) => raised?,
                    _ = cancel.cancelled() => {
                        return Err(anyhow!("stopped while raising the prefetch"));
                    }
                }
                metrics::prefetch_set(prefetch);
            }
            if traced {
                link_publisher(&batch.span, &delivery.properties);
            }
            // The id as the publisher sent it, byte for byte (it need not be UTF-8).
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_bytes().to_vec())
                .filter(|id| !id.is_empty());
            match parse_body(&delivery.data) {
                Ok(parsed) => {
                    if parsed.ignored > 0 {
                        metrics::records_ignored(parsed.ignored);
                    }
                    let events = parsed.events;
                    batch.events += events.len();
                    batch.bytes += size;
                    batch.tags.push(delivery.delivery_tag);
                    batch.messages.push(Message { id, events });
                    deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + self.settings.batch.timeout
                    });
                }
                Err(reason) => {
                    let id = id.as_deref().map(String::from_utf8_lossy);
                    metrics::message_rejected(reason, delivery.delivery_tag, id.as_deref());
                    self.channel
                        .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
                        .await
                        .context("rejecting an invalid message")?;
                    self.settings.stats.unacked(0, size);
                    self.gate.release(size as u64);
                    WorkerStats::add(&self.settings.stats.rejected, 1);
                    batch.rejected += 1;
                }
            }
        }
        Ok(())
    }

    /// Restarts the consumer with a new prefetch (see [`Prefetch`]).
    async fn reconsume(&mut self, prefetch: u16) -> anyhow::Result<()> {
        fault(self.settings.fault_hook.as_ref(), FaultPoint::BeforeRaise).await;
        self.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("changing the prefetch")?;
        self.channel
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            )
            .await
            .context("cancelling the consumer to change its prefetch")?;
        let (tag, deliveries) = consume(&self.channel, &self.settings.topology.queue).await?;
        self.consumer_tag = tag;
        let old = std::mem::replace(&mut self.deliveries, deliveries);
        self.draining.push_back(old);
        Ok(())
    }

    /// One turn of the worker's loop: gathers a batch while acking earlier ones as their
    /// commits end, submits it to `pipeline` (waiting for room when `in_flight` batches are
    /// committing) and acks what is ready. After the stop it drains the pipeline: everything
    /// in flight committed and acked. On an error, the commits in flight are finished and
    /// acked in order while that works; the rest stays unacked and comes back.
    pub async fn step(&mut self, pipeline: &mut Pipeline) -> anyhow::Result<Step> {
        let cancel = pipeline.applier.cancel.clone();
        let mut applied = Applied::default();
        let gathered = {
            let gather = self.next_batch(&cancel);
            tokio::pin!(gather);
            loop {
                tokio::select! {
                    batch = &mut gather => break batch,
                    // Ack as soon as the oldest commit ends, even while no message arrives.
                    () = pipeline.oldest_settled(), if !pipeline.is_empty() => {
                        add(&mut applied, pipeline.ack_oldest().await?);
                    }
                }
            }
        };
        let batch = match gathered {
            Ok(batch) => batch,
            Err(error) => {
                pipeline.salvage().await;
                return Err(error);
            }
        };
        let rejected = batch.rejected;
        add(&mut applied, pipeline.submit(batch).await?);
        add(&mut applied, pipeline.ack_ready().await?);
        if cancel.is_cancelled() {
            add(&mut applied, pipeline.drain().await?);
            return Ok(Step::Stopped { applied, rejected });
        }
        Ok(Step::Done { applied, rejected })
    }

    /// The worker's loop: [`Consumer::step`] until the stop. Returns `Ok` when the stop came
    /// (after committing and acking what was in flight), or the error that ended it.
    pub async fn run(&mut self, pipeline: &mut Pipeline) -> anyhow::Result<()> {
        loop {
            if let Step::Stopped { .. } = self.step(pipeline).await? {
                return Ok(());
            }
        }
    }

    /// Cancels the consumer and closes the channel and connection. Deliveries that were
    /// prefetched but not acked go back to the queue.
    /// Callers bound it with a timeout: past the budget it cannot read the broker's answers.
    pub async fn close(self) {
        // What the broker sent before its replies could be any size: the gate stays shut for
        // them. Already full, the answers cannot come: the connection is dropped (the broker
        // requeues what was not acked) rather than wait out the caller's timeout.
        self.gate.seal();
        if !self.gate.is_open() {
            tracing::debug!("The read gate is full: closing without waiting for RabbitMQ.");
            self.settings.stats.unacked_reset();
            return;
        }
        // The cancel comes after the last acks, not first (SPEC §4 reads "stop consuming, commit
        // and ack"), although what the broker sends meanwhile (up to the prefetch) then goes
        // back at the close. Cancelled first, with the prefetch counted and acked after it,
        // committed messages came back to the next worker (26 and 270 of them, in 2 of 44 runs of
        // `it::shutdown::sigterm_while_events_flow_loses_and_doubles_nothing` on a loaded
        // machine; 0 of 16 with this order). Read in RabbitMQ 3.10's quorum-queue client (in
        // the channel process, `rabbit_fifo_client`): deliveries still on their way to a
        // consumer the channel cancelled are returned with a command each; past 32 commands
        // unanswered, acks are held back until answers come, and a channel closed before then
        // drops them, so the queue returns their messages. A cancel is answered once the
        // commands sent before it are applied, and those answers release what was held back.
        let cancel = self
            .channel
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            )
            .await;
        let channel = self.channel.close(200, "worker stopping".into()).await;
        let connection = self.connection.close(200, "worker stopping".into()).await;
        if let Err(error) = cancel.and(channel).and(connection) {
            tracing::debug!(%error, "RabbitMQ connection closed uncleanly.");
        }
        self.settings.stats.unacked_reset();
    }
}

/// Links the publisher's W3C trace (its `traceparent` header), if the message carries one, to
/// the batch span: a batch continues many traces at once.
fn link_publisher(span: &tracing::Span, properties: &lapin::BasicProperties) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(headers) = properties.headers() else {
        return;
    };
    if let Some(parent) = crate::telemetry::remote_parent(headers) {
        span.add_link(parent.span().span_context().clone());
    }
}

fn add(total: &mut Applied, applied: Applied) {
    total.messages += applied.messages;
    total.duplicates += applied.duplicates;
    total.delivered += applied.delivered;
    total.bounced += applied.bounced;
    total.other_bounced += applied.other_bounced;
    total.domains += applied.domains;
    total.database_rejected += applied.database_rejected;
}

/// What applying a batch did, and the delivery tags of its messages that were not
/// dead-lettered: the last acks the batch (a multiple-ack may not name a tag already rejected),
/// and each alone acks its message when an earlier batch was given up (see
/// [`Pipeline::abandon`]).
struct Settled {
    applied: Applied,
    tags: Vec<u64>,
}

impl Settled {
    /// `tags` of a batch, less those at the indices in `rejected`.
    fn new(applied: Applied, mut tags: Vec<u64>, rejected: &[usize]) -> Self {
        if !rejected.is_empty() {
            let mut index = 0;
            tags.retain(|_| {
                index += 1;
                !rejected.contains(&(index - 1))
            });
        }
        Self { applied, tags }
    }

    fn ack_tag(&self) -> Option<u64> {
        self.tags.last().copied()
    }
}

/// Everything an apply task needs; cheap to clone.
#[derive(Clone)]
struct Applier {
    store: Store,
    health: Arc<Health>,
    channel: Channel,
    cancel: CancellationToken,
    abort: CancellationToken,
    hook: Option<FaultHook>,
    stats: Arc<WorkerStats>,
    gate: lapin::ReadGate,
}

/// Awaits what a test's `hook` injects at `point`, if anything.
async fn fault(hook: Option<&FaultHook>, point: FaultPoint) {
    if let Some(fault) = hook.and_then(|hook| hook(point)) {
        fault.await;
    }
}

/// Batches applied in tasks of their own, up to `in_flight` at once (each on its own
/// connection; sorted keys keep them from deadlocking), and acked strictly in delivery order,
/// each once it and every batch before it committed, so a multiple-ack never covers an
/// uncommitted message. Dropping the pipeline abandons what is in flight (the tasks give their
/// attempts up, their transactions roll back, their messages stay unacked and come back).
pub struct Pipeline {
    applier: Applier,
    in_flight: usize,
    committing: VecDeque<InFlight>,
    /// The committed parts of a batch given up while bisecting, whose error `ack_oldest`
    /// reported: acked by [`Pipeline::abandon`], within its deadline.
    partly_committed: Vec<u64>,
}

/// A batch being applied in its own task.
struct InFlight {
    task: Option<tokio::task::JoinHandle<anyhow::Result<Settled>>>,
    /// The task's outcome once it ended (kept, so that waiting for it is cancel-safe).
    settled: Option<anyhow::Result<Settled>>,
    bytes: usize,
    span: tracing::Span,
}

impl InFlight {
    fn is_settled(&self) -> bool {
        self.task.as_ref().is_none_or(|task| task.is_finished())
    }

    async fn settle(&mut self) {
        if let Some(task) = &mut self.task {
            let outcome = task.await;
            self.task = None;
            self.settled = Some(outcome.context("the apply task panicked").and_then(|r| r));
        }
    }
}

impl Pipeline {
    /// Batches submitted and not yet acked.
    pub fn len(&self) -> usize {
        self.committing.len()
    }

    pub fn is_empty(&self) -> bool {
        self.committing.is_empty()
    }

    /// Starts applying `batch` in a task of its own, first acking the oldest batches (waiting
    /// for their commits) while `in_flight` are committing. Returns what was acked meanwhile.
    pub async fn submit(&mut self, batch: Batch) -> anyhow::Result<Applied> {
        let mut applied = Applied::default();
        while self.committing.len() >= self.in_flight {
            add(&mut applied, self.ack_oldest().await?);
        }
        if batch.tags.is_empty() {
            return Ok(applied);
        }
        let applier = self.applier.clone();
        let (bytes, span) = (batch.bytes, batch.span.clone());
        let task = tokio::spawn(async move {
            let (applied, rejected) = apply_with_retry(&applier, &batch).await?;
            Ok(Settled::new(applied, batch.tags, &rejected))
        });
        self.committing.push_back(InFlight {
            task: Some(task),
            settled: None,
            bytes,
            span,
        });
        Ok(applied)
    }

    /// Acks, in order, the batches at the front whose commits ended; never waits for a commit.
    pub async fn ack_ready(&mut self) -> anyhow::Result<Applied> {
        let mut applied = Applied::default();
        while self.committing.front().is_some_and(InFlight::is_settled) {
            add(&mut applied, self.ack_oldest().await?);
        }
        Ok(applied)
    }

    /// Waits until the oldest batch's commit ends (pending while none is in flight). Cancel-safe.
    pub async fn oldest_settled(&mut self) {
        match self.committing.front_mut() {
            Some(oldest) => oldest.settle().await,
            None => std::future::pending().await,
        }
    }

    /// Waits for the oldest batch to commit, then acks it.
    pub async fn ack_oldest(&mut self) -> anyhow::Result<Applied> {
        let Some(mut oldest) = self.committing.pop_front() else {
            return Ok(Applied::default());
        };
        oldest.settle().await;
        let outcome = oldest
            .settled
            .take()
            .unwrap_or_else(|| Err(anyhow!("the apply task left no outcome")));
        let settled = match outcome {
            Ok(settled) => settled,
            Err(error) => {
                // Given up halfway through a bisection: its committed parts are acked by
                // `abandon`, which always follows, under the stop's one deadline.
                self.partly_committed
                    .extend_from_slice(committed_part(&error));
                return Err(error);
            }
        };
        let (applied, ack_tag) = (settled.applied, settled.ack_tag());
        fault(self.applier.hook.as_ref(), FaultPoint::AfterCommit).await;
        ack(&self.applier.channel, ack_tag)
            .instrument(tracing::info_span!(parent: &oldest.span, "ack", tag = ack_tag))
            .await?;
        self.applier.stats.unacked(0, oldest.bytes);
        self.applier.gate.release(oldest.bytes as u64);
        oldest.span.record("applied", applied.messages as i64);
        oldest.span.record("duplicates", applied.duplicates as i64);
        oldest
            .span
            .record("database_rejected", applied.database_rejected as i64);
        Ok(applied)
    }

    /// Waits for every batch in flight to commit and acks them in order.
    pub async fn drain(&mut self) -> anyhow::Result<Applied> {
        let mut applied = Applied::default();
        while !self.committing.is_empty() {
            add(&mut applied, self.ack_oldest().await?);
        }
        Ok(applied)
    }

    /// Gives up the batches in flight and waits (a bounded time) for their tasks to end: each
    /// terminates its backend (see `Store::apply_once`), so none can still commit once
    /// its messages are redelivered, or after the process exits. Batches that committed
    /// behind one given up (a stop out of time while an older batch waits for a lock, say)
    /// cannot be acked with a multiple-ack: each of their messages is acked alone, so they are
    /// not redelivered (those without an id would count twice).
    pub async fn abandon(mut self) {
        self.applier.abort.cancel();
        // One deadline for waiting and acking, so the stop's reserve holds whatever each takes.
        let deadline = tokio::time::Instant::now() + ABANDON_TIMEOUT;
        // First the committed parts of a batch `ack_oldest` reported given up: they are known.
        let reported = std::mem::take(&mut self.partly_committed);
        ack_each(&self.applier.channel, &reported, deadline).await;
        let mut committing = std::mem::take(&mut self.committing);
        let ended = futures_util::future::join_all(committing.iter_mut().map(InFlight::settle));
        if tokio::time::timeout_at(deadline, ended).await.is_err() {
            tracing::warn!(
                timeout_ms = ABANDON_TIMEOUT.as_millis() as u64,
                "Batches given up did not end in time."
            );
            return;
        }
        // Whole batches that committed, and the committed parts of one given up while bisecting.
        let mut tags = Vec::new();
        let mut released = 0;
        for in_flight in &mut committing {
            match in_flight.settled.take() {
                Some(Ok(settled)) => {
                    tags.extend_from_slice(&settled.tags);
                    released += in_flight.bytes;
                }
                Some(Err(error)) if error.downcast_ref::<tokio::task::JoinError>().is_some() => {
                    tracing::error!(error = format!("{error:#}"), "An apply task panicked.");
                }
                // The giving up itself, or what the pipeline reported already.
                Some(Err(error)) => tags.extend_from_slice(committed_part(&error)),
                None => {}
            }
        }
        if ack_each(&self.applier.channel, &tags, deadline).await {
            self.applier.stats.unacked(0, released);
            self.applier.gate.release(released as u64);
        }
    }

    /// After a failure: leave no commit behind; finish them, and ack in order while that works.
    async fn salvage(&mut self) {
        while !self.committing.is_empty() {
            if self.ack_oldest().await.is_err() {
                break;
            }
        }
    }
}

/// What a stop keeps after giving up the attempts under way: the oldest batch's terminate of its
/// backend (up to 600 ms with the cancel request that follows one that failed), waiting for the other tasks and acking what committed behind it
/// ([`ABANDON_TIMEOUT`]) and the broker's close ([`CLOSE_TIMEOUT`]).
const STOP_RESERVE: Duration = Duration::from_secs(3);

/// How long [`Pipeline::abandon`] waits for its tasks (a terminate, and a cancel request after
/// one that failed, take up to 600 ms)
/// and for the acks of what committed behind a batch given up (a few batches' worth of single
/// acks: milliseconds when the broker is well), both together.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(1);

impl Drop for Pipeline {
    /// The tasks in flight give their attempts up (see [`Pipeline::abandon`], which also waits
    /// for them) and end by themselves. Aborted, a task dropped its connection with the upsert
    /// and `COMMIT` already sent, and a backend still waiting for a row lock committed them
    /// later, after the batch had been redelivered.
    fn drop(&mut self) {
        self.applier.abort.cancel();
    }
}

/// A batch given up while it was being bisected, some of its parts committed: their messages
/// must be acked one by one (a multiple-ack would cover the rest). The parts' tokens die with
/// the task, so redelivered, those without an id were counted again.
#[derive(Debug)]
struct PartlyCommitted {
    tags: Vec<u64>,
}

impl std::fmt::Display for PartlyCommitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "given up while bisecting, {} of its messages committed",
            self.tags.len()
        )
    }
}

/// The tags of the messages that committed in a batch given up halfway (none otherwise).
fn committed_part(error: &anyhow::Error) -> &[u64] {
    error
        .downcast_ref::<PartlyCommitted>()
        .map_or(&[], |part| part.tags.as_slice())
}

/// Acks `tags` one by one, within `deadline`; what is not acked is redelivered. Whether all
/// were acked.
async fn ack_each(channel: &Channel, tags: &[u64], deadline: tokio::time::Instant) -> bool {
    if tags.is_empty() {
        return true;
    }
    if !channel.status().connected() {
        return false;
    }
    let acks = tags
        .iter()
        .map(|&tag| channel.basic_ack(tag, BasicAckOptions { multiple: false }));
    match tokio::time::timeout_at(deadline, futures_util::future::try_join_all(acks)).await {
        Ok(Ok(_)) => {
            tracing::info!(
                messages = tags.len(),
                "Acked one by one the messages committed behind, or in parts of, a batch given up."
            );
            true
        }
        Ok(Err(error)) => {
            tracing::warn!(
                error = %error,
                "Could not ack the messages committed in a batch given up; they are redelivered (those with an id are skipped as duplicates)."
            );
            false
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = ABANDON_TIMEOUT.as_millis() as u64,
                "The acks of the messages committed in a batch given up did not end in time; those not acked are redelivered."
            );
            false
        }
    }
}

/// Acks everything up to `last_tag` on `channel`, once its batch (and every batch before it)
/// committed. `None`: every message of the batch was dead-lettered, nothing to ack.
async fn ack(channel: &Channel, last_tag: Option<u64>) -> anyhow::Result<()> {
    let Some(last_tag) = last_tag else {
        return Ok(());
    };
    channel
        .basic_ack(last_tag, BasicAckOptions { multiple: true })
        .await
        .context("acking a committed batch (it will be redelivered and skipped as a duplicate)")
}

/// Applies a batch. A transient Postgres failure is retried with backoff while the batch stays
/// unacked, during a stop too; gives up only when the channel has closed (the broker
/// redelivers the batch), or when a stop runs out of time or the pipeline is given up
/// (`abort`, at any time; an attempt under way has its backend terminated).
///
/// A permanent failure (Postgres refuses the content, see
/// [`crate::store::StoreError::is_permanent`]) is isolated by bisecting: each half is applied in
/// its own transaction, down to the single messages that fail, which are rejected without
/// requeue (dead-lettered, reason `database_rejected`); the rest is applied. Ids are claimed in
/// the same transactions as the counters, so exactly-once holds across the halves.
#[tracing::instrument(
    name = "apply",
    parent = &batch.span,
    skip_all,
    fields(messages = batch.messages.len() as i64, events = batch.events as i64)
)]
async fn apply_with_retry(
    applier: &Applier,
    batch: &Batch,
) -> anyhow::Result<(Applied, Vec<usize>)> {
    let (messages, tags, token) = (&batch.messages, &batch.tags, &batch.token);
    let mut total = Applied::default();
    let mut rejected: Vec<usize> = Vec::new();
    // The tags of the parts that committed, while bisecting: a batch given up halfway must still
    // have them acked (see `PartlyCommitted`).
    let mut committed: Vec<u64> = Vec::new();
    // Ranges still to apply, the next one on top.
    let mut pending: Vec<std::ops::Range<usize>> = Vec::with_capacity(8);
    pending.push(0..messages.len());
    while let Some(range) = pending.pop() {
        let part = &messages[range.clone()];
        // One token per part (the batch's, and the part's bounds when bisecting).
        let mut part_token = b"\0catchall-batch\0".to_vec();
        part_token.extend_from_slice(token);
        if range.len() != messages.len() {
            part_token.extend((range.start as u32).to_be_bytes());
            part_token.extend((range.end as u32).to_be_bytes());
        }
        let attempted = match apply_attempts(applier, &part_token, part).await {
            Ok(attempted) => attempted,
            Err(error) if !committed.is_empty() => {
                return Err(error.context(PartlyCommitted { tags: committed }));
            }
            Err(error) => return Err(error),
        };
        match attempted {
            Ok(applied) => {
                add(&mut total, applied);
                if range.len() != messages.len() {
                    committed.extend_from_slice(&tags[range]);
                }
            }
            Err(refused) if range.len() == 1 => {
                let tag = tags[range.start];
                let id = part[0].id.as_deref().map(String::from_utf8_lossy);
                metrics::message_database_rejected(tag, id.as_deref(), &refused);
                applier
                    .channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await
                    .context("dead-lettering a message Postgres refused")?;
                WorkerStats::add(&applier.stats.database_rejected, 1);
                total.database_rejected += 1;
                rejected.push(range.start);
            }
            Err(_) => {
                let middle = range.start + range.len() / 2;
                pending.push(middle..range.end);
                pending.push(range.start..middle);
            }
        }
    }
    Ok((total, rejected))
}

/// Attempts to apply `messages` in one transaction until it commits (`Ok(Ok)`) or Postgres
/// refuses the content (`Ok(Err(reason))`); transient failures are retried with backoff.
#[tracing::instrument(name = "commit", skip_all, fields(messages = messages.len() as i64, attempts = Empty))]
async fn apply_attempts(
    applier: &Applier,
    token: &[u8],
    messages: &[Message],
) -> anyhow::Result<Result<Applied, String>> {
    let Applier {
        store,
        health,
        channel,
        abort,
        stats,
        ..
    } = applier;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut attempts = 0u32;
    let mut conflicts = 0u32;
    // What the last failed attempt counted when its COMMIT went out: it may have committed.
    let mut maybe_committed: Option<Applied> = None;
    loop {
        attempts += 1;
        tracing::Span::current().record("attempts", i64::from(attempts));
        let started = Instant::now();
        let before_commit = applier
            .hook
            .as_ref()
            .and_then(|hook| hook(FaultPoint::BeforeCommit));
        let mut sent = None;
        let attempt = store
            .apply_once(Some(token), messages, before_commit, Some(abort), &mut sent)
            .await;
        // Only an attempt that counted something: one that found every message claimed
        // already and failed must not replace the counts of the attempt that committed.
        if attempt.is_err() && sent.is_some_and(|sent| sent.messages > 0) {
            maybe_committed = sent;
        }
        match attempt {
            Err(error @ crate::store::StoreError::Abandoned) => {
                metrics::batch_given_up();
                return Err(
                    anyhow::Error::new(error).context("the batch stays unacked and is redelivered")
                );
            }
            Ok(mut applied) => {
                // Every message a duplicate after an attempt whose COMMIT went out unanswered:
                // that attempt committed, so its counts are this batch's (reported as
                // duplicates, its events were missing from `catchall_events_total`). Its token
                // proves it for a batch with id-less messages; for one of ids alone, only while
                // this channel still holds the messages unacked: closed, the broker may have
                // redelivered them to another replica, whose commit this attempt found.
                if let Some(committed) = maybe_committed
                    && applied.messages == 0
                    && applied.duplicates == messages.len()
                    && channel.status().connected()
                {
                    tracing::debug!(
                        messages = messages.len(),
                        "An earlier attempt of this batch had committed."
                    );
                    WorkerStats::add(&stats.recovered, 1);
                    applied = committed;
                }
                metrics::batch_committed(&applied, started.elapsed());
                WorkerStats::add(&stats.batches, 1);
                WorkerStats::add(&stats.applied, applied.messages);
                WorkerStats::add(&stats.duplicates, applied.duplicates);
                health.set_db_error(None);
                return Ok(Ok(applied));
            }
            Err(error) if error.is_permanent() => {
                // Postgres answered (it refused the data): a failure an earlier attempt of this
                // batch met is over, and /readyz must not go on saying so.
                health.set_db_error(None);
                let error = anyhow::Error::new(error);
                return Ok(Err(format!("{error:#}")));
            }
            Err(error) if error.is_claim_conflict() && conflicts < MAX_IMMEDIATE_CONFLICTS => {
                // Not a failure of Postgres: the retry's look-up meets the id the other batch
                // committed, so it is applied again at once. More conflicts in a row than that
                // take the backoff path below (counted, logged, `/readyz` told), in case
                // something else raises them.
                conflicts += 1;
                metrics::claim_conflict(&anyhow::Error::new(error));
            }
            Err(error) => {
                // /readyz gets a short reason; the log gets the whole error.
                health.set_db_error(Some(error.short_reason()));
                let error = anyhow::Error::new(error).context("applying a batch");
                let wait = backoff.next_wait();
                metrics::db_error(&error, wait);
                WorkerStats::add(&stats.db_errors, 1);
                if !channel.status().connected() {
                    metrics::batch_given_up();
                    return Err(anyhow!(
                        "the channel closed while Postgres was failing; the broker redelivers the batch"
                    ));
                }
                // A stop does not end the retries: what is in flight is committed while the
                // stop's time lasts (`abort` ends them). Given up at the stop's first failure, a
                // batch whose COMMIT had gone through (its reply lost) was redelivered instead of
                // recognised by its next attempt, and its messages without an id counted twice.
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = abort.cancelled() => {
                        metrics::batch_given_up();
                        return Err(anyhow!(
                            "given up while Postgres was failing; the batch stays unacked and is redelivered"
                        ));
                    }
                }
            }
        }
    }
}

/// Claim conflicts (see [`crate::store::StoreError::is_claim_conflict`]) a batch is applied again
/// after at once; each one means another batch committed one of its ids, so a few are plenty.
const MAX_IMMEDIATE_CONFLICTS: u32 = 8;

/// Starts a consumer on `queue` under a fresh tag.
async fn consume(channel: &Channel, queue: &str) -> anyhow::Result<(String, lapin::Consumer)> {
    let tag = format!("catchall-{}", uuid::Uuid::now_v7());
    let deliveries = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from queue {queue}"))?;
    Ok((tag, deliveries))
}

/// How long a batch's gather naps when it finds no delivery waiting: the deliveries that arrive
/// meanwhile queue in lapin's channel and are taken in one go, instead of lapin's I/O thread
/// waking the gather once per message (a futex wake and two context switches each: 14 % of the
/// worker's CPU samples on single-event messages). Only in the middle of a batch, so the first
/// message after a quiet spell is taken at once; a batch is closed no later than its timeout.
/// 1 ms (the timer's resolution): paired drains of 200,000 single-event messages 6–17 % faster
/// (medians of two runs) with 9–12 % less worker CPU; 2 ms was slower than 1
/// (benches/README.md, "Fewer wake-ups per message").
const GATHER_NAP: Duration = Duration::from_millis(1);

/// Longest a clean stop waits for RabbitMQ to answer the consumer's cancel and the channel's and
/// connection's close (milliseconds when it is well), inside the [`STOP_RESERVE`] the commits in
/// flight leave of `SHUTDOWN_TIMEOUT` (5/8 of it when that is less: under 4.8 s).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How the error of a connection attempt begins, before the (password-redacted) URL.
const CONNECTING: &str = "connecting to RabbitMQ at ";

/// What `/readyz` says of a broker error: the chain without the URL, and with the URL's user
/// names and vhosts, which RabbitMQ's own answers repeat (`access to vhost 'v' refused for user
/// 'u'`, `vhost v not found`), as `***`: they are not for whoever reaches the port (the probes
/// need no token). The nodes' `host:port` and the failure stay, as `Postgres HOST:PORT/DB`
/// does for Postgres. The log has the whole chain.
fn broker_reason(error: &anyhow::Error, amqp_url: &str) -> String {
    let causes: Vec<String> = error
        .chain()
        .map(ToString::to_string)
        .filter(|cause| !cause.starts_with(CONNECTING))
        .collect();
    if causes.is_empty() {
        return "cannot connect".into();
    }
    let mut reason = causes.join(": ");
    for name in crate::amqp::users_and_vhosts(amqp_url) {
        if name != "/" {
            reason = without_word(&reason, &name);
        }
    }
    reason
}

/// `text` with each occurrence of `word` that is not part of a longer name (no letter, digit,
/// `-`, `_` or `.` on either side) as `***`.
fn without_word(text: &str, word: &str) -> String {
    if word.is_empty() {
        return text.to_string();
    }
    let part_of_name = |c: char| c.is_alphanumeric() || "-_.".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let (before, after) = (&rest[..at], &rest[at + word.len()..]);
        let alone = !before.chars().next_back().is_some_and(part_of_name)
            && !after.chars().next().is_some_and(part_of_name);
        out.push_str(before);
        out.push_str(if alone { "***" } else { word });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The next delivery: what cancelled consumers still buffer first, then the current consumer.
async fn next_delivery(
    draining: &mut VecDeque<lapin::Consumer>,
    current: &mut lapin::Consumer,
) -> Option<lapin::Result<lapin::message::Delivery>> {
    while let Some(old) = draining.front_mut() {
        match old.next().await {
            Some(delivery) => return Some(delivery),
            None => {
                draining.pop_front();
            }
        }
    }
    current.next().await
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Consumes until `cancel` fires, reconnecting to RabbitMQ with capped exponential backoff.
pub async fn run(
    settings: ConsumerSettings,
    store: Store,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    // A stop may take SHUTDOWN_TIMEOUT; an apply attempt still running near its end is abandoned
    // (left unacked) so the process still exits in time and cleanly.
    let abort = CancellationToken::new();
    {
        let (cancel, abort) = (cancel.clone(), abort.clone());
        // Under 4.8 s the reserve is 5/8 of SHUTDOWN_TIMEOUT (2.5 s of the shortest, 4 s): with
        // half, the reserve was the 2 s that a terminate that cannot connect (1 s) and a close
        // the broker does not answer (1 s) may take, and no margin beside it (measured with
        // both: 3.41 s of 4 s).
        let grace = settings
            .shutdown_timeout
            .saturating_sub(STOP_RESERVE)
            .max(settings.shutdown_timeout * 3 / 8);
        tokio::spawn(async move {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
            abort.cancel();
        });
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    while !cancel.is_cancelled() {
        let opened = tokio::select! {
            opened = Consumer::open(&settings) => opened,
            _ = cancel.cancelled() => return,
        };
        let error = match opened {
            Ok(mut consumer) => {
                // A Postgres failure of the previous connection is judged afresh.
                health.set_db_error(None);
                health.set_broker_error(None);
                health.set_consuming(true);
                let connected_at = Instant::now();
                let mut pipeline = consumer.pipeline(&store, &health, &cancel, &abort);
                let result = consumer.run(&mut pipeline).await;
                pipeline.abandon().await;
                health.set_consuming(false);
                if cancel.is_cancelled() {
                    // Everything committed is acked by now; a broker that does not answer the
                    // close (frozen, or its replies lost) must not hold the stop past its time.
                    if tokio::time::timeout(CLOSE_TIMEOUT, consumer.close())
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
                            "RabbitMQ did not answer the close in time; dropping the connection."
                        );
                        settings.stats.unacked_reset();
                    }
                } else {
                    // The connection is gone: the broker takes back what was unacked.
                    settings.stats.unacked_reset();
                }
                match result {
                    Ok(()) => {
                        tracing::info!("Consumer stopped; in-flight batches committed and acked.");
                        return;
                    }
                    // A connection that lived a while earns a fresh backoff.
                    Err(error) if connected_at.elapsed() > Duration::from_secs(30) => {
                        backoff.reset();
                        error
                    }
                    Err(error) => error,
                }
            }
            Err(error) => error,
        };
        if cancel.is_cancelled() {
            tracing::warn!(
                error = format!("{error:#}"),
                "Consumer stopped with an error."
            );
            return;
        }
        let wait = backoff.next_wait();
        health.set_broker_error(Some(broker_reason(&error, &settings.amqp_url)));
        metrics::broker_reconnect(&error, wait);
        WorkerStats::add(&settings.stats.reconnects, 1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Purges applied message ids older than the retention, at an interval derived from it
/// (a quarter of the retention, between 1 s and 10 min), until `cancel` fires.
pub async fn purge_loop(store: Store, retention: Duration, cancel: CancellationToken) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let purged = tokio::select! {
            purged = store.purge_applied(retention) => purged,
            _ = cancel.cancelled() => return,
        };
        match purged {
            Ok(rows) => metrics::dedup_purged(rows),
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::new(error)),
                    "Purging applied message ids failed; will retry."
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_is_masked_only_where_it_stands_alone() {
        assert_eq!(
            without_word(
                "access to vhost 'v' refused for user 'u'; vhost v not found",
                "v"
            ),
            "access to vhost '***' refused for user 'u'; vhost *** not found"
        );
        assert_eq!(
            without_word("vhost prod-2 and prod and prod.x", "prod"),
            "vhost prod-2 and *** and prod.x"
        );
        assert_eq!(without_word("nothing", ""), "nothing");
    }

    #[test]
    fn prefetch_follows_body_sizes() {
        const MIB: u64 = 1 << 20;
        // Nothing seen yet: the largest body is assumed.
        let mut prefetch = Prefetch::new(64 * MIB, 5000);
        assert_eq!(prefetch.current, 64);
        // A window of small bodies raises it to PREFETCH, at the end of the window only.
        let raised: Vec<_> = (0..64)
            .filter_map(|_| seen(&mut prefetch, 200, true))
            .collect();
        assert_eq!(raised, vec![5000]);
        // A large body does not lower it (the read gate holds the bytes).
        assert_eq!(seen(&mut prefetch, MIB as usize, true), None);
        assert_eq!(prefetch.current, 5000);
        let changes: Vec<_> = (0..10_000)
            .filter_map(|_| seen(&mut prefetch, 100, true))
            .collect();
        assert_eq!(changes, Vec::<u16>::new());
        // The window's mean body decides, not its largest: one 90 KiB body among single events
        // raises it as far as the small ones alone would.
        let mut mixed = Prefetch::new(64 * MIB, 5000);
        let raised: Vec<_> = (0..64)
            .filter_map(|i| seen(&mut mixed, if i == 40 { 90 << 10 } else { 50 }, true))
            .collect();
        assert_eq!(raised, vec![5000]);
        // Not from a window that held a body over 1 MiB (dead-lettered, but read first).
        let mut oversized = Prefetch::new(64 * MIB, 5000);
        let changes: Vec<_> = (0..64)
            .filter_map(|i| seen(&mut oversized, if i == 40 { 2 << 20 } else { 50 }, true))
            .collect();
        assert_eq!(changes, Vec::<u16>::new());
        // Raised once, from the first prefetch only: mid-size bodies first keep it there.
        let mut mid = Prefetch::new(64 * MIB, 5000);
        let raised: Vec<_> = (0..64)
            .filter_map(|_| seen(&mut mid, 100 << 10, true))
            .collect();
        assert_eq!(raised, vec![655]);
        let changes: Vec<_> = (0..10_000)
            .filter_map(|_| seen(&mut mid, 100, true))
            .collect();
        assert_eq!(changes, Vec::<u16>::new(), "raised once already");
        // A budget under 1 MiB starts at one message and is raised too.
        let mut small_budget = Prefetch::new(256 << 10, 5000);
        assert_eq!(small_budget.current, 1);
        let raised: Vec<_> = (0..64)
            .filter_map(|_| seen(&mut small_budget, 100, true))
            .collect();
        assert_eq!(raised, vec![2621]);
        // Large bodies from the start keep it low: nothing raises it.
        let mut large = Prefetch::new(64 * MIB, 5000);
        let changes: Vec<_> = (0..1000)
            .filter_map(|_| seen(&mut large, MIB as usize, true))
            .collect();
        assert_eq!(changes, Vec::<u16>::new());
        assert_eq!(large.current, 64);
        // Bodies over the budget: one at a time.
        let mut tiny = Prefetch::new(1000, 5000);
        assert_eq!(tiny.current, 1);
        assert_eq!(seen(&mut tiny, 4000, true), None);
        // Nothing committed on the connection: windows pass without a raise, and the first
        // window after a commit raises it.
        let mut stalled = Prefetch::new(64 * MIB, 5000);
        let changes: Vec<_> = (0..640)
            .filter_map(|_| seen(&mut stalled, 100, false))
            .collect();
        assert_eq!(changes, Vec::<u16>::new(), "no raise before a commit");
        let raised: Vec<_> = (0..64)
            .filter_map(|_| seen(&mut stalled, 100, true))
            .collect();
        assert_eq!(raised, vec![5000], "one window after the first commit");
        // Small bodies whose headers are megabytes once parsed: no raise (it would read the
        // deliveries sent before the broker's replies, headers and all); headers of a few KiB
        // leave the mean of the bodies as it was.
        let mut heavy = Prefetch::new(64 * MIB, 5000);
        let changes: Vec<_> = (0..64)
            .filter_map(|_| heavy.observe(100, 6 << 20, true))
            .collect();
        assert_eq!(changes, Vec::<u16>::new());
        let mut traced = Prefetch::new(64 * MIB, 5000);
        let raised: Vec<_> = (0..64)
            .filter_map(|_| traced.observe(100, 1300, true))
            .collect();
        assert_eq!(raised, vec![5000]);
    }

    /// A delivery without headers.
    fn seen(prefetch: &mut Prefetch, body: usize, may_raise: bool) -> Option<u16> {
        prefetch.observe(body, body, may_raise)
    }
}
