//! A confirming publisher (SPEC §4, §7): persistent messages with a unique `message_id`, a
//! bounded window of unconfirmed publishes, and retries with the same id on a nack, a return
//! (unroutable), a confirm timeout or a lost connection.

use anyhow::{Context, anyhow};
use catchall::backoff::Backoff;
use catchall::config::{AmqpArgs, redact_url};
use catchall::event::{Event, Evidence, MAX_BODY_BYTES};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A message to publish and the events it carries (for the tally of what was confirmed).
#[derive(Debug)]
pub struct Outgoing {
    pub id: String,
    pub routing_key: &'static str,
    pub body: Vec<u8>,
    pub events: Vec<Event>,
}

impl Outgoing {
    /// What the message holds in memory while it is pending: its body and its events (which
    /// take about as much again: a domain's `String` and the `Event` around it).
    fn held_bytes(&self) -> usize {
        let events: usize = self
            .events
            .iter()
            .map(|event| {
                let evidence = event.evidence.as_ref().map_or(0, |evidence| {
                    std::mem::size_of::<Evidence>()
                        + evidence.diagnostic.as_ref().map_or(0, String::capacity)
                });
                std::mem::size_of::<Event>() + event.domain.capacity() + evidence
            })
            .sum();
        self.body.len() + events
    }

    /// One event, routed by its type.
    pub fn single(event: Event) -> Self {
        let body = serde_json::to_vec(&event).expect("an event always serialises");
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            routing_key: event.kind.as_str(),
            body,
            events: vec![event],
        }
    }

    /// Events packed into messages routed as `batch` (one event alone is sent as `single`); a
    /// body over the 1 MiB limit is split in two, again until each fits. No events, no
    /// message: an empty batch `[]` is invalid (SPEC §3), and the worker dead-letters it.
    pub fn batches(mut events: Vec<Event>) -> Vec<Self> {
        match events.len() {
            0 => return Vec::new(),
            1 => return vec![Self::single(events.remove(0))],
            _ => {}
        }
        let body = serde_json::to_vec(&events).expect("events always serialise");
        if body.len() > MAX_BODY_BYTES {
            let second = events.split_off(events.len() / 2);
            let mut messages = Self::batches(events);
            messages.extend(Self::batches(second));
            return messages;
        }
        vec![Self {
            id: uuid::Uuid::now_v7().to_string(),
            routing_key: "batch",
            body,
            events,
        }]
    }
}

/// Tuning of the publisher.
#[derive(Debug, Clone, Copy)]
pub struct PublisherSettings {
    /// Most publishes awaiting a confirm or a retry at once.
    pub window: usize,
    /// Most bytes they hold, bodies and events (one message is let through whatever its
    /// size). Counting messages alone, a window of 1,000 batches of 10,000 events held about a
    /// gigabyte while the broker was slow or nacking.
    pub window_bytes: usize,
    /// How long to wait for a confirm before publishing again.
    pub confirm_timeout: Duration,
    /// Attempts per message (nacked, returned or unconfirmed) before it counts as failed.
    pub max_attempts: u32,
    /// How long RabbitMQ may stay unreachable before the producer gives up on everything.
    pub give_up_after: Duration,
}

struct Pending {
    message: Arc<Outgoing>,
    /// Its body's bytes counted in the window until it is confirmed or given up on.
    _held: Held,
    attempts: u32,
    /// After a nack, return or timeout, the message waits until then before it goes out again
    /// (per-message backoff: a leader election nacks for seconds, not milliseconds).
    not_before: Option<tokio::time::Instant>,
}

/// The wait before attempt `attempts + 1` of a message the broker refused: 100 ms doubling up
/// to 5 s, with up to 25% jitter.
fn retry_wait(attempts: u32) -> Duration {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut wait = backoff.next_wait();
    for _ in 1..attempts.min(8) {
        wait = backoff.next_wait();
    }
    wait
}

/// Bytes of a pending message's body, counted in [`Publisher::held_bytes`] while it lives:
/// whichever way a message leaves (confirmed, given up on, dropped by a stop), its bytes do.
struct Held {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl Held {
    fn new(bytes: usize, total: &Arc<AtomicUsize>) -> Self {
        total.fetch_add(bytes, Ordering::Relaxed);
        Self {
            bytes,
            total: total.clone(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

type ConfirmFuture = BoxFuture<'static, (Pending, anyhow::Result<()>)>;

/// Publishes with confirms; `on_confirm` is called once for each message the broker confirmed.
pub struct Publisher<F: FnMut(&Outgoing)> {
    amqp: AmqpArgs,
    settings: PublisherSettings,
    link: Option<(Connection, Channel)>,
    in_flight: FuturesUnordered<ConfirmFuture>,
    retry: VecDeque<Pending>,
    /// The message being published, while it is (see [`Publisher::publish`]).
    publishing: Option<Pending>,
    /// Bytes of the bodies in `in_flight`, `retry` and `publishing` (see [`Held`]).
    held_bytes: Arc<AtomicUsize>,
    reconnect: Backoff,
    /// Since when RabbitMQ has not answered, while it does not.
    unreachable_since: Option<std::time::Instant>,
    on_confirm: F,
    /// Messages sent and not confirmed: given up on after `max_attempts`, or while RabbitMQ was
    /// unreachable past `give_up_after`.
    pub failed: u64,
    /// Publishes repeated after a nack, return, timeout or lost connection.
    pub retries: u64,
    /// Set once RabbitMQ stayed unreachable for `give_up_after`: every message still pending
    /// counts as failed, and the run ends normally (so what was confirmed is still reported
    /// and written to `--expect`).
    pub gave_up: bool,
    /// Cancelled by a stop: waits for room in the window or for RabbitMQ end at once (see
    /// [`Publisher::stop_on`]).
    stop: tokio_util::sync::CancellationToken,
}

impl<F: FnMut(&Outgoing)> Publisher<F> {
    pub async fn connect(
        amqp: AmqpArgs,
        settings: PublisherSettings,
        on_confirm: F,
    ) -> anyhow::Result<Self> {
        let mut publisher = Self {
            amqp,
            settings,
            link: None,
            in_flight: FuturesUnordered::new(),
            retry: VecDeque::new(),
            publishing: None,
            held_bytes: Arc::new(AtomicUsize::new(0)),
            reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            unreachable_since: None,
            on_confirm,
            failed: 0,
            retries: 0,
            gave_up: false,
            stop: tokio_util::sync::CancellationToken::new(),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// Once `stop` is cancelled, `send` publishes nothing more (a message it is handed, or that
    /// waits for room in the window, is dropped: not sent, so not failed either), and RabbitMQ
    /// unavailable means giving up at once: a stop does not wait for a broker that takes
    /// messages but never confirms them (up to `max_attempts` confirm timeouts), or for
    /// `give_up_after`.
    pub fn stop_on(&mut self, stop: tokio_util::sync::CancellationToken) {
        self.stop = stop;
    }

    /// Opens the connection and channel if they are not open, declares the topology (so
    /// nothing published before a worker starts is lost) and enables confirms.
    async fn channel(&mut self) -> anyhow::Result<Channel> {
        if let Some((_, channel)) = &self.link
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        self.link = None;
        let connection = catchall::amqp::connect(
            &self.amqp.amqp_url,
            &format!("catchall-producer {}", self.amqp.exchange),
        )
        .await
        .with_context(|| {
            format!(
                "connecting to RabbitMQ at {}",
                redact_url(&self.amqp.amqp_url)
            )
        })?;
        let channel =
            catchall::amqp::confirming_channel(&connection, &self.amqp.topology()).await?;
        self.link = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Publishes a message, first waiting while the window is full (of messages or of their
    /// bytes): messages awaiting their confirm and messages awaiting a retry count alike.
    /// (Retries once stood outside it: a broker that nacks at once, a full queue with
    /// `overflow: reject-publish`, freed a slot per nack, and the producer read its whole input
    /// into the retry queue.)
    pub async fn send(&mut self, message: Outgoing) -> anyhow::Result<()> {
        let stop = self.stop.clone();
        let held = message.held_bytes();
        while self.window_is_full(held) && !stop.is_cancelled() {
            tokio::select! {
                progress = self.progress() => progress?,
                _ = stop.cancelled() => {}
            }
        }
        // Stopped: not sent, so neither confirmed nor failed (failed is what was sent and not
        // confirmed), like the input not read yet. A stop used to send whatever the window had
        // room for (`publish`'s partial batch after its loop included), though it "stops
        // sending".
        if stop.is_cancelled() {
            return Ok(());
        }
        self.publish(Pending {
            _held: Held::new(held, &self.held_bytes),
            message: Arc::new(message),
            attempts: 0,
            not_before: None,
        })
        .await
    }

    /// Whether a message of `bytes` must wait for room; never when nothing is pending.
    fn window_is_full(&self, bytes: usize) -> bool {
        let pending = self.unsettled();
        let held = self.held_bytes.load(Ordering::Relaxed);
        pending >= self.settings.window
            || (pending > 0 && held.saturating_add(bytes) > self.settings.window_bytes)
    }

    /// Publishes each message in turn.
    pub async fn send_all(&mut self, messages: Vec<Outgoing>) -> anyhow::Result<()> {
        for message in messages {
            self.send(message).await?;
        }
        Ok(())
    }

    /// Waits until every message is confirmed or given up on, and closes the connection.
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        self.flush().await?;
        if let Some((connection, _)) = self.link.take() {
            // Bounded: a broker that blocked publishing (a resource alarm) may never answer.
            let close = connection.close(200, "producer done".into());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
        }
        Ok(())
    }

    /// Messages sent and neither confirmed nor given up on: awaiting a confirm or a retry.
    pub fn unsettled(&self) -> usize {
        self.in_flight.len() + self.retry.len() + usize::from(self.publishing.is_some())
    }

    /// Waits until every message sent so far is confirmed or given up on.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        while self.unsettled() > 0 {
            self.progress().await?;
        }
        Ok(())
    }

    /// One step towards settling what was sent: a retry that is due goes out, else the next
    /// confirm is awaited, else (only retries left, none due) the first is waited for.
    async fn progress(&mut self) -> anyhow::Result<()> {
        if let Some(pending) = self.due_retry() {
            self.publish(pending).await?;
        } else if !self.in_flight.is_empty() {
            self.settle_one().await?;
        } else if let Some(due) = self.retry.front().and_then(|p| p.not_before) {
            tokio::time::sleep_until(due).await;
        }
        Ok(())
    }

    /// Publishes until the broker takes the message (the confirm is awaited later), reconnecting
    /// as needed. A message fails after `max_attempts`; everything fails (an error) once
    /// RabbitMQ has been unreachable for `give_up_after`.
    ///
    /// The message is held in `self.publishing` meanwhile, not in this call: a caller that drops
    /// the call (a stop racing `finish` or the window's wait, while the message waits between
    /// connection attempts) leaves it there, where [`Publisher::unsettled`] counts it and
    /// [`Publisher::reclaim`] puts it back at the front of the retries. Dropped with the call, it
    /// was neither confirmed nor failed.
    async fn publish(&mut self, mut pending: Pending) -> anyhow::Result<()> {
        pending.not_before = None;
        self.reclaim();
        self.publishing = Some(pending);
        loop {
            if self.gave_up {
                self.publishing = None;
                self.failed += 1;
                return Ok(());
            }
            let channel = match self.channel().await {
                Ok(channel) => channel,
                Err(error) => {
                    self.unavailable(error, "RabbitMQ unavailable; retrying.")
                        .await;
                    continue;
                }
            };
            let Some(pending) = self.publishing.as_mut() else {
                return Ok(());
            };
            pending.attempts += 1;
            if pending.attempts > self.settings.max_attempts {
                // The broker answered (it refused or did not confirm): not unreachable.
                tracing::error!(message_id = %pending.message.id, "Message not confirmed after {} attempts; giving up on it.", self.settings.max_attempts);
                self.publishing = None;
                self.unreachable_since = None;
                self.failed += 1;
                return Ok(());
            }
            let message = &pending.message;
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(message.id.as_str().into());
            // W3C `traceparent` of the current span, when traces are exported (issue 12).
            if let Some(headers) = catchall::telemetry::trace_headers() {
                properties = properties.with_headers(headers);
            }
            // Bounded: while the broker blocks publishing (`connection.blocked`, a memory or
            // disk alarm) lapin writes nothing and this waited for ever, past every timeout.
            let timeout = self.settings.confirm_timeout;
            let published = tokio::time::timeout(
                timeout,
                channel.basic_publish(
                    self.amqp.exchange.as_str().into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the broker took no publish within {timeout:?} (publishing blocked by a resource alarm?)"
                    ),
                )))
            });
            match published {
                Ok(confirm) => {
                    let Some(pending) = self.publishing.take() else {
                        return Ok(());
                    };
                    // Counted once it went out (a publish that failed on the connection is
                    // attempted again, and was counted at each attempt).
                    if pending.attempts > 1 {
                        self.retries += 1;
                    }
                    self.reconnect.reset();
                    self.unreachable_since = None;
                    // From now, not from when the window first polls it.
                    let deadline = tokio::time::Instant::now() + timeout;
                    self.in_flight.push(Box::pin(async move {
                        let outcome = match tokio::time::timeout_at(deadline, confirm).await {
                            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                                Err(anyhow!("returned as unroutable: {}", returned.reply_text))
                            }
                            Ok(Ok(Confirmation::Nack(_))) => Err(anyhow!("nacked by the broker")),
                            Ok(Ok(Confirmation::NotRequested)) => {
                                Err(anyhow!("confirms are not enabled"))
                            }
                            Ok(Err(error)) => {
                                Err(anyhow::Error::new(error).context("waiting for the confirm"))
                            }
                            Err(_) => Err(anyhow!("no confirm within {timeout:?}")),
                        };
                        (pending, outcome)
                    }));
                    return Ok(());
                }
                Err(error) => {
                    self.link = None;
                    // The connection failed, not the message.
                    pending.attempts -= 1;
                    self.unavailable(error, "Publish failed; reconnecting.")
                        .await;
                }
            }
        }
    }

    /// RabbitMQ did not take a message (no connection, or a publish that failed or was blocked):
    /// waits before the next attempt, or gives up once that has lasted `give_up_after` since
    /// the last message it took.
    async fn unavailable(&mut self, error: impl std::fmt::Display, what: &str) {
        let since = *self
            .unreachable_since
            .get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= self.settings.give_up_after || self.stop.is_cancelled() {
            tracing::error!(
                error = %error,
                "RabbitMQ unavailable for {:?}; giving up on every message not confirmed.",
                self.settings.give_up_after
            );
            self.gave_up = true;
            return;
        }
        let wait = self.reconnect.next_wait();
        tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "{what}");
        let stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => self.gave_up = true,
        }
    }

    /// Settles the next confirm: a confirmed message is tallied, any other outcome is queued
    /// for a retry with the same `message_id`.
    async fn settle_one(&mut self) -> anyhow::Result<()> {
        let Some((pending, outcome)) = self.in_flight.next().await else {
            return Ok(());
        };
        self.settle(pending, outcome).await
    }

    /// Settles what is ready without waiting for more: the confirms that came, and the
    /// retries that are due.
    pub async fn settle_ready(&mut self) -> anyhow::Result<()> {
        use futures_util::FutureExt;
        while let Some(Some((pending, outcome))) = self.in_flight.next().now_or_never() {
            self.settle(pending, outcome).await?;
        }
        while self.in_flight.len() < self.settings.window {
            let Some(pending) = self.due_retry() else {
                break;
            };
            self.publish(pending).await?;
        }
        Ok(())
    }

    /// Tallies a confirmed message or queues any other outcome for a retry, then sends the
    /// retries that are due.
    async fn settle(
        &mut self,
        pending: Pending,
        outcome: anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match outcome {
            Ok(()) => (self.on_confirm)(&pending.message),
            Err(error) => {
                let mut pending = pending;
                let wait = retry_wait(pending.attempts);
                tracing::debug!(message_id = %pending.message.id, error = format!("{error:#}"), retry_in_ms = wait.as_millis() as u64, "Publishing again.");
                pending.not_before = Some(tokio::time::Instant::now() + wait);
                self.retry.push_back(pending);
            }
        }
        // Retries that are due go out before new messages; the window still bounds them.
        while self.in_flight.len() < self.settings.window {
            let Some(pending) = self.due_retry() else {
                break;
            };
            self.publish(pending).await?;
        }
        Ok(())
    }

    /// The first retry, if its backoff has passed (retries wait in the order they failed).
    fn due_retry(&mut self) -> Option<Pending> {
        self.reclaim();
        let due = self
            .retry
            .front()?
            .not_before
            .is_none_or(|due| due <= tokio::time::Instant::now());
        if due { self.retry.pop_front() } else { None }
    }

    /// A message a dropped [`Publisher::publish`] call left in hand goes back to the front of
    /// the retries, due at once.
    fn reclaim(&mut self) {
        if let Some(pending) = self.publishing.take() {
            self.retry.push_front(pending);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catchall::event::{EventType, MAX_BATCH_EVENTS, parse_message};

    #[test]
    fn batches_over_the_body_limit_are_split() {
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        let events: Vec<Event> = (0..MAX_BATCH_EVENTS)
            .map(|_| Event::new(&long, EventType::Delivered).unwrap())
            .collect();
        let messages = Outgoing::batches(events);
        assert!(messages.len() > 1);
        let mut total = 0;
        for message in &messages {
            assert!(message.body.len() <= MAX_BODY_BYTES);
            assert_eq!(
                parse_message(&message.body).unwrap().len(),
                message.events.len(),
                "the worker accepts it"
            );
            total += message.events.len();
        }
        assert_eq!(total, MAX_BATCH_EVENTS);
        let one = Outgoing::batches(vec![Event::new("a.io", EventType::Bounced).unwrap()]);
        assert_eq!((one.len(), one[0].routing_key), (1, "bounced"));
        // `publish` handed over an empty chunk after a line that holds no event (a KumoMTA
        // `Reception` record), and it went out as `[]`, which the worker dead-letters.
        assert!(Outgoing::batches(Vec::new()).is_empty());
    }

    /// A stop ends sending (README: SIGINT/SIGTERM stops `publish` sending): a message handed
    /// to `send` after it is not published, nor counted as failed (it was not sent; the chaos
    /// test's producer must settle all it sent). It was published whenever the window had room
    /// (`publish` sent its partial batch after its loop stopped). Against the test broker
    /// (`AMQP_URL`), on an exchange and queue of its own.
    #[tokio::test]
    async fn a_send_after_a_stop_publishes_nothing() {
        use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
        use lapin::types::FieldTable;
        let name = format!("catchall.test.stop.{}", uuid::Uuid::now_v7().simple());
        let amqp = AmqpArgs {
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            exchange: name.clone(),
            queue: name.clone(),
            delivery_limit: 20,
        };
        let settings = PublisherSettings {
            window: 10,
            window_bytes: 1 << 20,
            confirm_timeout: Duration::from_secs(5),
            max_attempts: 3,
            give_up_after: Duration::from_secs(10),
        };
        let confirmed = Arc::new(AtomicUsize::new(0));
        let counted = confirmed.clone();
        let mut publisher = Publisher::connect(amqp.clone(), settings, move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .expect("RabbitMQ answers");
        let stop = tokio_util::sync::CancellationToken::new();
        publisher.stop_on(stop.clone());
        let event = || Outgoing::single(Event::new("a.example", EventType::Delivered).unwrap());
        publisher.send(event()).await.expect("sent");
        publisher.flush().await.expect("confirmed");
        stop.cancel();
        publisher.send(event()).await.expect("not sent, no error");
        publisher.finish().await.expect("finished");
        let failed = publisher.failed;

        let connection = catchall::amqp::connect(&amqp.amqp_url, "catchall-producer test")
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("open a channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queued = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
            .map(|queue| queue.message_count());
        let topology = amqp.topology();
        for queue in [name.clone(), topology.dead_letter_queue()] {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [name.clone(), topology.dead_letter_exchange()] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "".into()).await;
        assert_eq!(
            (
                confirmed.load(Ordering::Relaxed),
                failed,
                queued.expect("the queue")
            ),
            (1, 0, 1),
            "(confirmed, failed, in the queue): the message handed over after the stop is not published"
        );
    }
}
