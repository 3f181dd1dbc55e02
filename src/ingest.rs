//! HTTP ingest's publisher (SPEC §5): events go onto the exchange as persistent messages, and a
//! caller learns of success only once the broker confirmed them (publisher confirms on a
//! connection of its own, reopened when lost).
//!
//! Single events without an `Idempotency-Key` are packed: a PUT waits at most `pack_window` for
//! others, the pack goes out as one `batch` message with a fresh `message_id`, and every PUT in
//! it is answered after that message's confirm. An event with an `Idempotency-Key` is never
//! packed: it is its own message with `message_id` = the key, so a retry of it is deduplicated by
//! the worker like any republished message (a pack's fresh id could not be).

use crate::amqp::{Topology, connect_beside};
use crate::config::redact_url;
use crate::event::{Event, MAX_BODY_BYTES};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc, oneshot};

/// What the publisher needs (not the whole worker configuration).
#[derive(Clone)]
pub struct IngestSettings {
    /// RabbitMQ URL; never logged with its password.
    pub amqp_url: String,
    /// Where events are published; declared at every (re)connect.
    pub topology: Topology,
    /// How long a single event waits for others to share its message.
    pub pack_window: Duration,
    /// Most events packed into one message.
    pub pack_max: usize,
    /// How long to wait for the broker to take a publish, and then for its confirm, before
    /// answering 503.
    pub confirm_timeout: Duration,
    /// After a failed connect, requests fail fast (503) for this long instead of each trying again.
    pub reconnect_pause: Duration,
    /// Most messages sent and not confirmed yet (see [`Unconfirmed`]).
    pub max_unconfirmed: usize,
}

/// Debug shows the URL without its password.
impl std::fmt::Debug for IngestSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestSettings")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("topology", &self.topology)
            .field("pack_window", &self.pack_window)
            .field("pack_max", &self.pack_max)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("reconnect_pause", &self.reconnect_pause)
            .field("max_unconfirmed", &self.max_unconfirmed)
            .finish()
    }
}

impl IngestSettings {
    pub fn new(amqp_url: &str, topology: Topology) -> Self {
        Self {
            amqp_url: amqp_url.to_string(),
            topology,
            pack_window: Duration::from_millis(2),
            pack_max: 1000,
            confirm_timeout: Duration::from_secs(5),
            reconnect_pause: Duration::from_millis(500),
            max_unconfirmed: 10_000,
        }
    }
}

/// Why events were not accepted: `TooLarge` is the caller's (413, never published); every other
/// variant means "not confirmed, try again later" (503).
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error(
        "the events serialise to {0} bytes, more than the {MAX_BODY_BYTES}-byte message limit; send fewer per request"
    )]
    TooLarge(usize),
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    #[error("RabbitMQ did not confirm the message: {0}")]
    NotConfirmed(String),
    #[error("the ingest publisher has stopped")]
    Stopped,
}

type Reply = oneshot::Sender<Result<(), IngestError>>;

/// Why a publish was refused at once: the connection is blocked by a resource alarm.
const BLOCKED: &str = "RabbitMQ blocks publishing (a memory or disk alarm)";

/// Why a publish was refused at once: [`IngestSettings::max_unconfirmed`] messages await their
/// confirm.
const UNCONFIRMED: &str = "too many messages await RabbitMQ's confirm (INGEST_MAX_UNCONFIRMED)";

/// A message sent whose confirm has not come: one of [`IngestSettings::max_unconfirmed`], held
/// until the confirm (or the connection's end) settles it, whatever became of the request (see
/// [`Link::send`]). The gauge `catchall_ingest_unconfirmed` counts them (over every publisher of
/// the process).
struct Unconfirmed {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Unconfirmed {
    fn take(permits: &Arc<tokio::sync::Semaphore>) -> Option<Self> {
        let _permit = permits.clone().try_acquire_owned().ok()?;
        crate::metrics::ingest_unconfirmed(1.0);
        Some(Self { _permit })
    }
}

impl Drop for Unconfirmed {
    fn drop(&mut self) {
        crate::metrics::ingest_unconfirmed(-1.0);
    }
}

/// A message handed to the broker: the task awaiting its confirm (see [`Link::send`]), to
/// await with [`Link::settle`].
struct Sent(tokio::task::JoinHandle<Option<lapin::Result<Confirmation>>>);

/// The publisher shared by the HTTP handlers. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    link: Arc<Link>,
    packer: mpsc::Sender<(Event, Reply)>,
}

/// The connection and its confirming channel, reopened on demand.
struct Link {
    settings: IngestSettings,
    open: Mutex<LinkState>,
    /// A connection attempt is under way (see [`Link::channel`]), and its end.
    connecting: std::sync::atomic::AtomicBool,
    attempt_ended: tokio::sync::Notify,
    /// Permits for messages sent and not confirmed yet (see [`Unconfirmed`]).
    unconfirmed: Arc<tokio::sync::Semaphore>,
}

/// Clears [`Link::connecting`] and wakes the requests waiting for the attempt when it ends,
/// however it ends (a request whose own timeout dropped it included).
struct Connecting<'a>(&'a Link);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0
            .connecting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.0.attempt_ended.notify_waiters();
    }
}

/// What a request is answered when another one's connection attempt did not end within
/// [`ATTEMPT_WAIT`].
const CONNECTING: &str = "another request is connecting to RabbitMQ";

/// How long a request waits for another one's connection attempt: a broker that answers
/// connects in milliseconds; one that does not must not hold every request for OPEN_TIMEOUT.
const ATTEMPT_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct LinkState {
    /// The connection, its channel, and its number (see [`Link::forget`]).
    current: Option<(Connection, Channel, u64)>,
    /// Connections opened so far.
    opened: u64,
    last_failure: Option<Instant>,
}

impl Ingest {
    /// Starts the packer task; the connection opens with the first publish. The packer ends
    /// when the last clone of this value is dropped.
    pub fn start(settings: IngestSettings) -> Self {
        let (packer, queue) = mpsc::channel(settings.pack_max * 4);
        let link = Arc::new(Link {
            open: Mutex::new(LinkState::default()),
            connecting: Default::default(),
            attempt_ended: tokio::sync::Notify::new(),
            unconfirmed: Arc::new(tokio::sync::Semaphore::new(
                settings
                    .max_unconfirmed
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            settings,
        });
        tokio::spawn(pack_loop(link.clone(), queue));
        Self { link, packer }
    }

    /// Opens the connection now, so the first request does not pay for it.
    pub async fn warm_up(&self) -> Result<(), IngestError> {
        self.link.channel().await.map(|_| ())
    }

    /// Closes the connection (at shutdown, once the HTTP server has stopped). A broker that
    /// does not answer the close within [`CLOSE_TIMEOUT`] (frozen, or its replies lost) has the
    /// connection dropped: waiting for it held the stop past `SHUTDOWN_TIMEOUT` (exit 1).
    pub async fn close(&self) {
        let close = async {
            let mut state = self.link.open.lock().await;
            if let Some((connection, _, _)) = state.current.take() {
                let _ = connection.close(200, "worker stopping".into()).await;
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
            tracing::warn!(
                timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
                "RabbitMQ did not answer the ingest connection's close in time; dropping it."
            );
        }
    }

    /// Publishes one event and returns once the broker confirmed it. With a key, the event is its
    /// own message with that `message_id`; without one, it may share a message with others.
    pub async fn publish_one(&self, event: Event, key: Option<String>) -> Result<(), IngestError> {
        if let Some(key) = key {
            let body = serde_json::to_vec(&event).expect("an event always serialises");
            let sent = self.link.send(event.kind.as_str(), body, &key).await?;
            return self.link.settle(sent).await;
        }
        let (reply, answer) = oneshot::channel();
        self.packer
            .send((event, reply))
            .await
            .map_err(|_| IngestError::Stopped)?;
        answer.await.map_err(|_| IngestError::Stopped)?
    }

    /// Publishes events as one message (`message_id` = `key`, else a fresh UUIDv7) and returns
    /// once the broker confirmed it. Events that serialise past [`MAX_BODY_BYTES`] (normalised
    /// IDN domains grow) are refused with [`IngestError::TooLarge`] and never published.
    pub async fn publish_many(
        &self,
        events: &[Event],
        key: Option<String>,
    ) -> Result<(), IngestError> {
        let body = serde_json::to_vec(events).expect("events always serialise");
        let id = key.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let sent = self.link.send("batch", body, &id).await?;
        self.link.settle(sent).await
    }
}

impl Link {
    /// The open channel, or a new connection with the topology declared and confirms on. While
    /// an attempt is under way callers wait for it [`ATTEMPT_WAIT`] at most, and for
    /// `reconnect_pause` after one failed they fail fast, rather than queue up behind connects
    /// to a broker that is down. The attempt runs outside the lock: held across it (up to
    /// OPEN_TIMEOUT, 10 s), every request queued behind it, and at a few hundred a second they
    /// filled HTTP_MAX_CONCURRENCY, so look-ups got 503 too.
    async fn channel(&self) -> Result<(Channel, u64), IngestError> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut waited = false;
        let mut state = loop {
            // Registered before the flag is read: an attempt that ends after the read (it
            // clears the flag, then wakes the waiters) wakes this one too.
            let ended = self.attempt_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let state = self.open.lock().await;
            if !self.connecting.load(SeqCst) || state.current.is_some() {
                break state;
            }
            if waited {
                return Err(IngestError::Unavailable(CONNECTING.into()));
            }
            drop(state);
            if tokio::time::timeout(ATTEMPT_WAIT, ended).await.is_err() {
                return Err(IngestError::Unavailable(CONNECTING.into()));
            }
            waited = true;
        };
        if let Some((connection, channel, number)) = &state.current {
            // Blocked by a resource alarm, the connection takes frames it will not send: each
            // publish would be answered 503 after the publish timeout, and kept, to be sent
            // when the alarm clears (the client's retries then counted once each).
            if connection.status().blocked() {
                return Err(IngestError::Unavailable(BLOCKED.into()));
            }
            if channel.status().connected() {
                return Ok((channel.clone(), *number));
            }
            state.current = None;
        }
        if let Some(failed) = state.last_failure
            && failed.elapsed() < self.settings.reconnect_pause
        {
            return Err(IngestError::Unavailable("reconnecting".into()));
        }
        // Counted as failed until it succeeds: a request dropped mid-attempt (its own timeout)
        // leaves the pause behind it, not a queue of requests restarting the attempt.
        state.last_failure = Some(Instant::now());
        self.connecting.store(true, SeqCst);
        let _connecting = Connecting(self);
        drop(state);
        let opened = tokio::time::timeout(OPEN_TIMEOUT, self.open_channel())
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no connection within {OPEN_TIMEOUT:?}")));
        let mut state = self.open.lock().await;
        match opened {
            Ok((connection, channel)) => {
                state.opened += 1;
                let number = state.opened;
                state.current = Some((connection, channel.clone(), number));
                state.last_failure = None;
                tracing::info!("Ingest publisher connected to RabbitMQ.");
                Ok((channel, number))
            }
            Err(error) => {
                state.last_failure = Some(Instant::now());
                tracing::warn!(
                    amqp = %redact_url(&self.settings.amqp_url),
                    error = format!("{:#}", error),
                    "Ingest publisher could not connect to RabbitMQ."
                );
                Err(IngestError::Unavailable(error.to_string()))
            }
        }
    }

    /// Connects (each node of a cluster's `AMQP_URL` in turn, each within its own connect
    /// timeout), then opens a confirming channel within [`SETUP_TIMEOUT`]. The whole used to
    /// share that 5 s, one node's connect timeout: a first node that dropped
    /// packets used it up, the next node was never tried, and ingest answered 503 for as long
    /// as the consumer's connection lasted (which decides the node tried first). The first
    /// node tried is the consumer's (see [`connect_beside`]).
    async fn open_channel(&self) -> anyhow::Result<(Connection, Channel)> {
        use anyhow::Context;
        let connection = connect_beside(
            &self.settings.amqp_url,
            &format!("catchall ingest {}", self.settings.topology.exchange),
        )
        .await
        .context("connecting")?;
        let setup = crate::amqp::confirming_channel(&connection, &self.settings.topology);
        let channel = tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .map_err(|_| anyhow::anyhow!("no channel within {SETUP_TIMEOUT:?}"))??;
        Ok((connection, channel))
    }

    /// Hands a message to the broker (persistent, mandatory, JSON, with its id); the confirm is
    /// awaited with [`Link::settle`]. The publish and then its confirm are awaited to their end
    /// on a task of their own that holds the message's [`Unconfirmed`] permit, whatever becomes
    /// of the wait (timed out, or the request dropped: its client gone, or past
    /// HTTP_REQUEST_TIMEOUT): lapin holds the message and its confirm until the broker settles
    /// it or the connection ends, and a confirm dropped unresolved stayed in lapin until
    /// `wait_for_confirms`, which nothing calls.
    async fn send(
        &self,
        routing_key: &str,
        body: Vec<u8>,
        message_id: &str,
    ) -> Result<Sent, IngestError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(IngestError::TooLarge(body.len()));
        }
        let (channel, connection) = match self.channel().await {
            Ok(open) => open,
            Err(error) => {
                let outcome = match &error {
                    IngestError::Unavailable(why) if why == BLOCKED => "blocked",
                    _ => "unavailable",
                };
                crate::metrics::ingest_published(outcome, Some(&error));
                return Err(error);
            }
        };
        let Some(unconfirmed) = Unconfirmed::take(&self.unconfirmed) else {
            let error = IngestError::Unavailable(UNCONFIRMED.into());
            crate::metrics::ingest_published("unconfirmed", Some(&error));
            return Err(error);
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(short_message_id(message_id).as_ref().into());
        let exchange = self.settings.topology.exchange.clone();
        let routing_key = routing_key.to_string();
        let (published, publishing) = oneshot::channel();
        let task = tokio::spawn(async move {
            let _unconfirmed = unconfirmed;
            let publish = channel.basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            );
            match publish.await {
                Ok(confirm) => {
                    let _ = published.send(Ok(()));
                    Some(confirm.await)
                }
                Err(error) => {
                    let _ = published.send(Err(error));
                    None
                }
            }
        });
        // A broker blocked by a resource alarm accepts no publish: bounded like the confirm,
        // so the pack loop and callers are not stalled behind it.
        let timeout = self.settings.confirm_timeout;
        match tokio::time::timeout(timeout, publishing).await {
            Ok(Ok(Ok(()))) => Ok(Sent(task)),
            Ok(Ok(Err(error))) => {
                self.forget(connection);
                crate::metrics::ingest_published("unavailable", Some(&error));
                Err(IngestError::Unavailable(error.to_string()))
            }
            Ok(Err(_)) => {
                let error = IngestError::Unavailable("the publishing task ended".into());
                crate::metrics::ingest_published("unavailable", Some(&error));
                Err(error)
            }
            Err(_) => {
                self.forget(connection);
                let error = IngestError::Unavailable(format!(
                    "the broker took no publish within {timeout:?} (blocked?)"
                ));
                crate::metrics::ingest_published("publish_timeout", Some(&error));
                Err(error)
            }
        }
    }

    /// Waits for the broker's verdict on a message (see [`Link::send`]). Only an ack of a
    /// routed message is success.
    async fn settle(&self, sent: Sent) -> Result<(), IngestError> {
        let timeout = self.settings.confirm_timeout;
        let (outcome, result) = match tokio::time::timeout(timeout, sent.0).await {
            Ok(Ok(Some(outcome))) => Self::verdict(outcome),
            Ok(Ok(None)) => (
                "unavailable",
                Err(IngestError::Unavailable("the publish failed".into())),
            ),
            Ok(Err(error)) => (
                "unavailable",
                Err(IngestError::Unavailable(format!(
                    "waiting for the confirm: {error}"
                ))),
            ),
            Err(_) => (
                "confirm_timeout",
                Err(IngestError::NotConfirmed(format!(
                    "no confirm within {timeout:?}"
                ))),
            ),
        };
        let error = result.as_ref().err().map(|e| e as &dyn std::fmt::Display);
        crate::metrics::ingest_published(outcome, error);
        result
    }

    /// The broker's verdict, and its `catchall_ingest_publishes_total` outcome.
    fn verdict(outcome: lapin::Result<Confirmation>) -> (&'static str, Result<(), IngestError>) {
        match outcome {
            Ok(Confirmation::Ack(None)) => ("acked", Ok(())),
            Ok(Confirmation::Ack(Some(returned))) => (
                "returned",
                Err(IngestError::NotConfirmed(format!(
                    "returned as unroutable: {}",
                    returned.reply_text
                ))),
            ),
            Ok(Confirmation::Nack(_)) => {
                ("nacked", Err(IngestError::NotConfirmed("nacked".into())))
            }
            Ok(Confirmation::NotRequested) => (
                "unavailable",
                Err(IngestError::NotConfirmed("confirms are off".into())),
            ),
            Err(error) => (
                "unavailable",
                Err(IngestError::Unavailable(error.to_string())),
            ),
        }
    }

    /// Drops the connection a failed publish used (its number), so the next one reconnects;
    /// not a newer one. By the channel's id, the same on every connection (1), a late failure
    /// on a connection long gone dropped its healthy successor, then the next.
    /// (Not waiting for the lock: the next failure tries again.)
    fn forget(&self, connection: u64) {
        if let Ok(mut state) = self.open.try_lock()
            && state
                .current
                .as_ref()
                .is_some_and(|(_, _, current)| *current == connection)
        {
            state.current = None;
        }
    }
}

/// Packs waiting single events into messages: takes what is queued, waits up to `pack_window`
/// for more (at most `pack_max`), publishes, and answers every event of the pack after its
/// confirm, while the next pack gathers.
async fn pack_loop(link: Arc<Link>, mut queue: mpsc::Receiver<(Event, Reply)>) {
    let (window, max) = (link.settings.pack_window, link.settings.pack_max.max(1));
    // A job that would have pushed the last pack past the message limit starts the next one.
    let mut carried: Option<(Event, Reply)> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        // The pack's size as a JSON array: brackets, events, commas.
        let mut size = 2 + serialised_len(&first.0);
        let mut pack = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while pack.len() < max {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(job)) => {
                    let grown = size + 1 + serialised_len(&job.0);
                    if grown > MAX_BODY_BYTES {
                        carried = Some(job);
                        break;
                    }
                    size = grown;
                    pack.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }
        // A caller that has gone (client disconnected, or answered 408) is not published for:
        // it got no 202, so its event must not count. Checked once the connection is there (a
        // reconnect may take seconds: callers that gave up meanwhile were published for).
        let _ = link.channel().await;
        pack.retain(|(_, reply)| !reply.is_closed());
        if pack.is_empty() {
            continue;
        }
        let (events, replies): (Vec<Event>, Vec<Reply>) = pack.into_iter().unzip();
        let (routing_key, body) = if events.len() == 1 {
            (events[0].kind.as_str(), serde_json::to_vec(&events[0]))
        } else {
            ("batch", serde_json::to_vec(&events))
        };
        let body = body.expect("events always serialise");
        let id = uuid::Uuid::now_v7().to_string();
        let sent = link.send(routing_key, body, &id).await;
        let link = link.clone();
        tokio::spawn(async move {
            let outcome = match sent {
                Ok(sent) => link.settle(sent).await,
                Err(error) => Err(error),
            };
            for reply in replies {
                let _ = reply.send(outcome.clone());
            }
        });
    }
}

/// Longest AMQP short string, so the longest `message_id`.
const MAX_MESSAGE_ID_BYTES: usize = 255;

/// Longest one attempt to open the ingest connection takes (its nodes in turn, each within
/// its connect timeout, then the channel): under `HTTP_REQUEST_TIMEOUT`'s default (15 s), so the
/// request that makes it sees its end. Two silent nodes (5 s each) before a live one use it up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest opening the confirming channel (and declaring the topology) takes, whatever the
/// confirm wait (which a short HTTP_REQUEST_TIMEOUT shortens).
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a stop waits for RabbitMQ to answer the close of the ingest connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A `message_id` that fits an AMQP short string: ids up to 255 bytes unchanged, longer ones
/// (webhook ids built from a provider's payload) as their first 128 bytes, `~sha256:` and the
/// SHA-256 hex of the whole id — deterministic, so a retry still gets the same id.
fn short_message_id(id: &str) -> std::borrow::Cow<'_, str> {
    if id.len() <= MAX_MESSAGE_ID_BYTES {
        return id.into();
    }
    let mut cut = 128;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}~sha256:{}",
        &id[..cut],
        crate::webhooks::sha256_hex(id.as_bytes())
    )
    .into()
}

/// One event's size as JSON.
fn serialised_len(event: &Event) -> usize {
    serde_json::to_vec(event).map_or(0, |body| body.len())
}

/// Verified webhook events go out like `POST /events`: one message, `message_id` from the
/// provider's own ids (so its retries count once), `Ok` only after the broker confirmed it.
impl crate::webhooks::EventSink for Ingest {
    fn publish(
        &self,
        events: Vec<Event>,
        message_id: String,
    ) -> futures_util::future::BoxFuture<'_, Result<(), crate::webhooks::SinkError>> {
        Box::pin(async move {
            self.publish_many(&events, Some(message_id))
                .await
                .map_err(|error| crate::webhooks::SinkError(error.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_message_ids_are_shortened_deterministically_and_never_panic() {
        let short = "k".repeat(MAX_MESSAGE_ID_BYTES);
        assert_eq!(short_message_id(&short), short.as_str());
        for long in [
            format!("postmark:Bounce:{}", "x".repeat(300)),
            format!("sns:{}", "é".repeat(200)),
        ] {
            let id = short_message_id(&long);
            assert!(id.len() <= MAX_MESSAGE_ID_BYTES, "{} bytes", id.len());
            assert!(long.starts_with(id.split("~sha256:").next().unwrap()));
            assert_eq!(short_message_id(&long), id, "deterministic");
            // What `send` does with it must not panic.
            let _ = BasicProperties::default().with_message_id(id.as_ref().into());
        }
        let (a, b) = ("a".repeat(400), format!("{}b", "a".repeat(399)));
        assert_ne!(short_message_id(&a), short_message_id(&b));
    }
}
