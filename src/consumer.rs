//! The consumer: deliveries in, batches applied to Postgres, acks out (SPEC §4).
//!
//! [`Consumer::process_batch`] is one unit of work: gather a batch, apply it in one transaction,
//! then ack it. [`run`] calls it in a loop and reconnects when the broker goes away; tests call it
//! one step at a time.

use crate::amqp;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::event::parse_body;
use crate::health::Health;
use crate::metrics;
use crate::store::{Applied, FaultPoint, Message, Store};
use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How many events make a batch, and how long a batch waits to fill.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// A batch closes once it holds this many events (a message is never split).
    pub size: usize,
    /// Batches committing at once while the next one gathers.
    pub in_flight: usize,
    pub timeout: Duration,
}

/// Deliveries gathered into one unit of work.
#[derive(Debug, Default)]
pub struct Batch {
    /// Valid messages, in delivery order.
    pub messages: Vec<Message>,
    /// Delivery tag of the last valid message: one multiple-ack settles the whole batch.
    pub last_tag: Option<u64>,
    /// Invalid messages rejected (dead-lettered) while gathering.
    pub rejected: usize,
    /// Events in `messages`.
    pub events: usize,
    /// Delivery tag of each of `messages` (to dead-letter one that Postgres refuses).
    pub tags: Vec<u64>,
    /// Bytes of the bodies of `messages`.
    pub bytes: usize,
    /// Identifies this batch in Postgres, so a retry after a lost COMMIT reply is recognised
    /// (see [`Store::apply_once`]).
    pub token: [u8; 16],
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A batch was committed and acked.
    Done { applied: Applied, rejected: usize },
    /// The stop signal came; what was in flight was committed and acked.
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
    queue: String,
    settings: BatchSettings,
    prefetch: Prefetch,
}

/// The largest body a message may have (SPEC §3): what the prefetch assumes of a message it has
/// not seen yet.
const MAX_BODY: usize = 1 << 20;

/// Keeps the bodies held unacked under PREFETCH_BYTES by lowering the prefetch when large
/// messages arrive, and raising it again (up to PREFETCH) once a window of deliveries shows they
/// are small. RabbitMQ fixes a consumer's prefetch when it starts (basic.qos on a live channel
/// only affects consumers started after it), so a change is basic.qos, then basic.cancel of the
/// current consumer (its deliveries already sent stay unacked and are processed and acked as
/// usual, nothing is requeued), then basic.consume with the new prefetch.
#[derive(Debug, Clone)]
struct Prefetch {
    budget: u64,
    max: u16,
    /// The prefetch in force.
    current: u16,
    /// Largest body of the previous window of deliveries, and of the current one.
    previous_largest: usize,
    largest: usize,
    /// Deliveries left in the current window.
    window_left: usize,
}

impl Prefetch {
    fn new(budget: u64, max: u16) -> Self {
        let mut this = Self {
            budget,
            max,
            current: max,
            // Until a window has been seen, assume the largest message there may be.
            previous_largest: MAX_BODY,
            largest: 0,
            window_left: 0,
        };
        this.current = this.target();
        this.window_left = usize::from(this.current);
        this
    }

    fn target(&self) -> u16 {
        let largest = self.previous_largest.max(self.largest).max(1) as u64;
        (self.budget / largest).clamp(1, u64::from(self.max)) as u16
    }

    /// Records one delivery; returns the new prefetch when it must change.
    fn observe(&mut self, body: usize) -> Option<u16> {
        self.largest = self.largest.max(body);
        self.window_left = self.window_left.saturating_sub(1);
        if self.window_left == 0 {
            self.previous_largest = self.largest;
            self.largest = 0;
        }
        let target = self.target();
        // Lower at once; raise only at the end of a window (hysteresis: one large message keeps
        // the prefetch low for a window or two, instead of flapping).
        let change = target < self.current || (self.window_left == 0 && target > self.current);
        if self.window_left == 0 {
            self.window_left = usize::from(target.max(self.current)).max(64);
        }
        if change {
            self.current = target;
            Some(target)
        } else {
            None
        }
    }
}

impl Consumer {
    /// Connects, declares the topology, sets the prefetch and starts consuming.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let connection = amqp::connect(
            &config.amqp.amqp_url,
            &format!("catchall-worker {}", config.amqp.queue),
        )
        .await
        .with_context(|| {
            format!(
                "connecting to RabbitMQ at {}",
                crate::config::redact_url(&config.amqp.amqp_url)
            )
        })?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        config
            .amqp
            .topology()
            .declare(&channel)
            .await
            .context("declaring the topology")?;
        // qos before consume, so the broker never sends more than the prefetch.
        let prefetch = Prefetch::new(config.prefetch_bytes, config.prefetch);
        channel
            .basic_qos(prefetch.current, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        metrics::prefetch_changed(prefetch.current, 0);
        let (consumer_tag, deliveries) = consume(&channel, &config.amqp.queue).await?;
        tracing::info!(
            queue = %config.amqp.queue,
            prefetch = prefetch.current,
            prefetch_bytes = config.prefetch_bytes,
            "Consuming."
        );
        Ok(Self {
            connection,
            channel,
            deliveries,
            consumer_tag,
            draining: VecDeque::new(),
            queue: config.amqp.queue.clone(),
            settings: BatchSettings {
                size: config.batch_size as usize,
                in_flight: config.in_flight as usize,
                timeout: config.batch_timeout(),
            },
            prefetch,
        })
    }

    /// Gathers a batch: waits for a first delivery, then until the batch is full or its timeout
    /// has passed, whichever comes first. Invalid messages are rejected at once (no requeue, so
    /// they are dead-lettered). Returns early with what it has when `cancel` fires.
    pub async fn next_batch(&mut self, cancel: &CancellationToken) -> anyhow::Result<Batch> {
        let mut batch = Batch {
            token: *uuid::Uuid::now_v7().as_bytes(),
            ..Batch::default()
        };
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.events < self.settings.size {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                next = next_delivery(&mut self.draining, &mut self.deliveries) => next,
                _ = sleep_until(deadline) => break,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(error).context("the consumer failed"),
                None => return Err(anyhow!("the broker ended the consumer")),
            };
            if let Some(prefetch) = self.prefetch.observe(delivery.data.len()) {
                self.reconsume(prefetch).await?;
                metrics::prefetch_changed(prefetch, delivery.data.len());
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
                    batch.bytes += delivery.data.len();
                    batch.tags.push(delivery.delivery_tag);
                    batch.messages.push(Message { id, events });
                    batch.last_tag = Some(delivery.delivery_tag);
                    deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + self.settings.timeout);
                }
                Err(reason) => {
                    let id = id.as_deref().map(String::from_utf8_lossy);
                    metrics::message_rejected(reason, delivery.delivery_tag, id.as_deref());
                    self.channel
                        .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
                        .await
                        .context("rejecting an invalid message")?;
                    batch.rejected += 1;
                }
            }
        }
        Ok(batch)
    }

    /// Restarts the consumer with a new prefetch (see [`Prefetch`]).
    async fn reconsume(&mut self, prefetch: u16) -> anyhow::Result<()> {
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
        let (tag, deliveries) = consume(&self.channel, &self.queue).await?;
        self.consumer_tag = tag;
        let old = std::mem::replace(&mut self.deliveries, deliveries);
        self.draining.push_back(old);
        Ok(())
    }

    /// One unit of work: gather a batch, commit it, ack it.
    pub async fn process_batch(
        &mut self,
        store: &Store,
        health: &Health,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Step> {
        let batch = self.next_batch(cancel).await?;
        let mut applied = Applied::default();
        if batch.last_tag.is_some() {
            // A step finishes its batch even after a stop; only the retries of a failing
            // Postgres end at the stop.
            let keep_going = CancellationToken::new();
            let ack_tag;
            (applied, ack_tag) =
                apply_with_retry(store, health, &self.channel, cancel, &keep_going, &batch).await?;
            ack(&self.channel, store, ack_tag).await?;
        }
        let rejected = batch.rejected;
        Ok(if cancel.is_cancelled() {
            Step::Stopped { applied, rejected }
        } else {
            Step::Done { applied, rejected }
        })
    }

    /// The worker's loop: like [`Consumer::process_batch`] over and over, but the next batch is
    /// gathered while earlier ones commit, up to `in_flight` commits at once (each on its own
    /// connection; sorted keys keep them from deadlocking). Batches are acked strictly in
    /// delivery order, each once it and every batch before it committed, so a multiple-ack never
    /// covers an uncommitted message. Returns `Ok` when `cancel` fires (after committing and
    /// acking what was in flight), or the error that ended it.
    ///
    /// `abort` fires when a stop runs out of time: an apply attempt still running is abandoned
    /// (its batch stays unacked and comes back).
    pub async fn run_pipelined(
        &mut self,
        store: &Store,
        health: &Arc<Health>,
        cancel: &CancellationToken,
        abort: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut committing: VecDeque<InFlight> = VecDeque::new();
        loop {
            let channel = self.channel.clone();
            let batch = {
                let gather = self.next_batch(cancel);
                tokio::pin!(gather);
                loop {
                    tokio::select! {
                        batch = &mut gather => break batch,
                        // Ack as soon as the oldest commit ends, even while no message arrives.
                        settled = wait_oldest(&mut committing), if !committing.is_empty() => {
                            if committing.pop_front().is_some() {
                                let (_, ack_tag) = settled?;
                                ack(&channel, store, ack_tag).await?;
                            }
                        }
                    }
                }
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    // Leave no commit behind: finish them, and ack in order while that works.
                    while let Some(done) = committing.pop_front() {
                        let Ok((_, ack_tag)) = join(done).await else {
                            break;
                        };
                        if ack(&self.channel, store, ack_tag).await.is_err() {
                            break;
                        }
                    }
                    return Err(error);
                }
            };
            while committing.len() >= self.settings.in_flight {
                self.ack_oldest(store, &mut committing).await?;
            }
            if batch.last_tag.is_some() {
                let (store, health, channel, cancel, abort) = (
                    store.clone(),
                    health.clone(),
                    self.channel.clone(),
                    cancel.clone(),
                    abort.clone(),
                );
                let task = tokio::spawn(async move {
                    apply_with_retry(&store, &health, &channel, &cancel, &abort, &batch).await
                });
                committing.push_back(InFlight { task });
            }
            if cancel.is_cancelled() {
                while !committing.is_empty() {
                    self.ack_oldest(store, &mut committing).await?;
                }
                return Ok(());
            }
        }
    }

    /// Waits for the oldest batch in flight to commit, then acks it.
    async fn ack_oldest(
        &self,
        store: &Store,
        committing: &mut VecDeque<InFlight>,
    ) -> anyhow::Result<()> {
        if let Some(done) = committing.pop_front() {
            let (_, ack_tag) = join(done).await?;
            ack(&self.channel, store, ack_tag).await?;
        }
        Ok(())
    }

    /// Cancels the consumer and closes the channel and connection. Deliveries that were
    /// prefetched but not acked go back to the queue.
    pub async fn close(self) {
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
    }
}

/// Acks everything up to `last_tag` on `channel`, once its batch (and every batch before it)
/// committed. `None`: every message of the batch was dead-lettered, nothing to ack.
async fn ack(channel: &Channel, store: &Store, last_tag: Option<u64>) -> anyhow::Result<()> {
    store.fault(FaultPoint::AfterCommit).await;
    let Some(last_tag) = last_tag else {
        return Ok(());
    };
    channel
        .basic_ack(last_tag, BasicAckOptions { multiple: true })
        .await
        .context("acking a committed batch (it will be redelivered and skipped as a duplicate)")
}

/// What applying a batch did, and the tag that acks it: its last message that was not
/// dead-lettered (a multiple-ack may not name a tag already rejected).
type Settled = (Applied, Option<u64>);

/// A batch being applied in its own task.
struct InFlight {
    task: tokio::task::JoinHandle<anyhow::Result<Settled>>,
}

/// Waits for the oldest batch in flight (callers check there is one) without taking it.
async fn wait_oldest(in_flight: &mut VecDeque<InFlight>) -> anyhow::Result<Settled> {
    match in_flight.front_mut() {
        Some(oldest) => (&mut oldest.task)
            .await
            .context("the apply task panicked")?,
        None => std::future::pending().await,
    }
}

async fn join(in_flight: InFlight) -> anyhow::Result<Settled> {
    in_flight.task.await.context("the apply task panicked")?
}

/// Applies a batch. A transient Postgres failure is retried with backoff while the batch stays
/// unacked; gives up only when the channel has closed (the broker redelivers the batch), on stop
/// (`cancel`, between attempts) or when a stop runs out of time (`abort`, during an attempt).
///
/// A permanent failure (Postgres refuses the content, see
/// [`crate::store::StoreError::is_permanent`]) is isolated by bisecting: each half is applied in
/// its own transaction, down to the single messages that fail, which are rejected without
/// requeue (dead-lettered, reason `database_rejected`); the rest is applied. Ids are claimed in
/// the same transactions as the counters, so exactly-once holds across the halves.
pub async fn apply_with_retry(
    store: &Store,
    health: &Health,
    channel: &Channel,
    cancel: &CancellationToken,
    abort: &CancellationToken,
    batch: &Batch,
) -> anyhow::Result<Settled> {
    let (messages, tags, token) = (&batch.messages, &batch.tags, &batch.token);
    let mut total = Applied::default();
    let mut rejected: Vec<usize> = Vec::new();
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
        match apply_attempts(store, health, channel, cancel, abort, &part_token, part).await? {
            Ok(applied) => {
                total.messages += applied.messages;
                total.duplicates += applied.duplicates;
                total.delivered += applied.delivered;
                total.bounced += applied.bounced;
                total.domains += applied.domains;
            }
            Err(refused) if range.len() == 1 => {
                let tag = tags[range.start];
                let id = part[0].id.as_deref().map(String::from_utf8_lossy);
                metrics::message_database_rejected(tag, id.as_deref(), &refused);
                channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await
                    .context("dead-lettering a message Postgres refused")?;
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
    let mut dead = vec![false; messages.len()];
    for &index in &rejected {
        dead[index] = true;
    }
    let ack_tag = tags
        .iter()
        .zip(&dead)
        .rev()
        .find(|(_, dead)| !**dead)
        .map(|(tag, _)| *tag);
    Ok((total, ack_tag))
}

/// Attempts to apply `messages` in one transaction until it commits (`Ok(Ok)`) or Postgres
/// refuses the content (`Ok(Err(reason))`); transient failures are retried with backoff.
async fn apply_attempts(
    store: &Store,
    health: &Health,
    channel: &Channel,
    cancel: &CancellationToken,
    abort: &CancellationToken,
    token: &[u8],
    messages: &[Message],
) -> anyhow::Result<Result<Applied, String>> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            attempt = store.apply_once(Some(token), messages) => attempt,
            _ = abort.cancelled() => return Err(anyhow!(
                "the stop ran out of time while Postgres was applying a batch; it stays unacked and is redelivered"
            )),
        };
        match attempt {
            Ok(applied) => {
                metrics::batch_committed(
                    applied.messages,
                    applied.duplicates,
                    applied.delivered,
                    applied.bounced,
                    started.elapsed(),
                );
                metrics::other_bounces_counted(applied.other_bounced);
                health.set_db_error(None);
                return Ok(Ok(applied));
            }
            Err(error) if error.is_permanent() => {
                let error = anyhow::Error::new(error);
                return Ok(Err(format!("{error:#}")));
            }
            Err(error) => {
                // /readyz gets a short reason; the log gets the whole error.
                health.set_db_error(Some(error.short_reason()));
                let error = anyhow::Error::new(error).context("applying a batch");
                let wait = backoff.next_wait();
                metrics::db_error(&error, wait);
                if !channel.status().connected() {
                    return Err(anyhow!(
                        "the channel closed while Postgres was failing; the broker redelivers the batch"
                    ));
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return Err(anyhow!(
                        "stopped while Postgres was failing; the batch stays unacked and is redelivered"
                    )),
                }
            }
        }
    }
}

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
pub async fn run(config: Config, store: Store, health: Arc<Health>, cancel: CancellationToken) {
    // A stop may take SHUTDOWN_TIMEOUT; an apply attempt still running near its end is abandoned
    // (left unacked) so the process still exits in time and cleanly.
    let abort = CancellationToken::new();
    {
        let (cancel, abort) = (cancel.clone(), abort.clone());
        let grace = config
            .shutdown_timeout
            .saturating_sub(Duration::from_secs(2))
            .max(config.shutdown_timeout / 2);
        tokio::spawn(async move {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
            abort.cancel();
        });
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    while !cancel.is_cancelled() {
        let opened = tokio::select! {
            opened = Consumer::open(&config) => opened,
            _ = cancel.cancelled() => return,
        };
        let error = match opened {
            Ok(mut consumer) => {
                // A Postgres failure of the previous connection is judged afresh.
                health.set_db_error(None);
                health.set_broker_error(None);
                health.set_consuming(true);
                let connected_at = Instant::now();
                let result = consumer
                    .run_pipelined(&store, &health, &cancel, &abort)
                    .await;
                health.set_consuming(false);
                if cancel.is_cancelled() {
                    consumer.close().await;
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
        health.set_broker_error(Some(format!("{error:#}")));
        metrics::broker_reconnect(&error, wait);
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
    fn prefetch_follows_body_sizes() {
        const MIB: u64 = 1 << 20;
        // Nothing seen yet: the largest body is assumed.
        let mut prefetch = Prefetch::new(64 * MIB, 5000);
        assert_eq!(prefetch.current, 64);
        // A window of small bodies raises it to PREFETCH, at the end of the window only.
        let raised: Vec<_> = (0..64).filter_map(|_| prefetch.observe(200)).collect();
        assert_eq!(raised, vec![5000]);
        // One large body lowers it at once.
        assert_eq!(prefetch.observe(MIB as usize), Some(64));
        assert_eq!(prefetch.observe(200), None);
        // It stays low for this window and the next one, then rises again.
        let changes: Vec<_> = (0..10_000).filter_map(|_| prefetch.observe(100)).collect();
        assert_eq!(changes, vec![5000]);
        // Bodies over the budget: one at a time.
        let mut tiny = Prefetch::new(1000, 5000);
        assert_eq!(tiny.current, 1);
        assert_eq!(tiny.observe(4000), None);
    }
}
