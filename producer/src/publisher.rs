//! A confirming publisher (SPEC §4, §7): persistent messages with a unique `message_id`, a
//! bounded window of unconfirmed publishes, and retries with the same id on a nack, a return
//! (unroutable), a confirm timeout or a lost connection.

use anyhow::{Context, anyhow};
use catchall::backoff::Backoff;
use catchall::config::{AmqpArgs, redact_url};
use catchall::event::Event;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use std::collections::VecDeque;
use std::sync::Arc;
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

    /// Several events in one message, routed as `batch`; one event alone is sent as `single`.
    pub fn batch(events: Vec<Event>) -> Self {
        if events.len() == 1 {
            let mut events = events;
            return Self::single(events.remove(0));
        }
        let body = serde_json::to_vec(&events).expect("events always serialise");
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            routing_key: "batch",
            body,
            events,
        }
    }
}

/// Tuning of the publisher.
#[derive(Debug, Clone, Copy)]
pub struct PublisherSettings {
    /// Most publishes awaiting a confirm at once.
    pub window: usize,
    /// How long to wait for a confirm before publishing again.
    pub confirm_timeout: Duration,
    /// Attempts per message before it counts as failed.
    pub max_attempts: u32,
}

struct Pending {
    message: Arc<Outgoing>,
    attempts: u32,
}

type ConfirmFuture = BoxFuture<'static, (Pending, anyhow::Result<()>)>;

/// Publishes with confirms; `on_confirm` is called once for each message the broker confirmed.
pub struct Publisher<F: FnMut(&Outgoing)> {
    amqp: AmqpArgs,
    settings: PublisherSettings,
    link: Option<(Connection, Channel)>,
    in_flight: FuturesUnordered<ConfirmFuture>,
    retry: VecDeque<Pending>,
    reconnect: Backoff,
    on_confirm: F,
    /// Messages given up on after `max_attempts`.
    pub failed: u64,
    /// Publishes repeated after a nack, return, timeout or lost connection.
    pub retries: u64,
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
            reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            on_confirm,
            failed: 0,
            retries: 0,
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// Opens the connection and channel if they are not open, declares the topology (so
    /// nothing published before a worker starts is lost) and enables confirms.
    async fn channel(&mut self) -> anyhow::Result<Channel> {
        if let Some((_, channel)) = &self.link {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
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
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        self.amqp
            .topology()
            .declare(&channel)
            .await
            .context("declaring the topology")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        self.link = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Publishes a message, first waiting while the window is full.
    pub async fn send(&mut self, message: Outgoing) -> anyhow::Result<()> {
        while self.in_flight.len() >= self.settings.window {
            self.settle_one().await;
        }
        self.publish(Pending {
            message: Arc::new(message),
            attempts: 0,
        })
        .await;
        Ok(())
    }

    /// Waits until every message is confirmed or given up on.
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() || !self.retry.is_empty() {
            if let Some(pending) = self.retry.pop_front() {
                self.publish(pending).await;
            } else {
                self.settle_one().await;
            }
        }
        if let Some((connection, _)) = self.link.take() {
            let _ = connection.close(200, "producer done".into()).await;
        }
        Ok(())
    }

    /// Publishes until the broker takes the message (the confirm is awaited later), reconnecting
    /// as needed; gives up after `max_attempts`.
    async fn publish(&mut self, mut pending: Pending) {
        loop {
            pending.attempts += 1;
            if pending.attempts > self.settings.max_attempts {
                self.failed += 1;
                tracing::error!(message_id = %pending.message.id, "Message not confirmed after {} attempts; giving up.", self.settings.max_attempts);
                return;
            }
            if pending.attempts > 1 {
                self.retries += 1;
            }
            let channel = match self.channel().await {
                Ok(channel) => channel,
                Err(error) => {
                    let wait = self.reconnect.next_wait();
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = wait.as_millis() as u64,
                        "RabbitMQ unavailable; retrying."
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let message = &pending.message;
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(message.id.as_str().into());
            let published = channel
                .basic_publish(
                    self.amqp.exchange.as_str().into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties,
                )
                .await;
            match published {
                Ok(confirm) => {
                    self.reconnect.reset();
                    let timeout = self.settings.confirm_timeout;
                    self.in_flight.push(Box::pin(async move {
                        let outcome = match tokio::time::timeout(timeout, confirm).await {
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
                    return;
                }
                Err(error) => {
                    let wait = self.reconnect.next_wait();
                    tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "Publish failed; reconnecting.");
                    self.link = None;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Settles the next confirm: a confirmed message is tallied, any other outcome is queued
    /// for a retry with the same `message_id`.
    async fn settle_one(&mut self) {
        let Some((pending, outcome)) = self.in_flight.next().await else {
            return;
        };
        match outcome {
            Ok(()) => (self.on_confirm)(&pending.message),
            Err(error) => {
                tracing::debug!(message_id = %pending.message.id, error = format!("{error:#}"), "Publishing again.");
                self.retry.push_back(pending);
            }
        }
        // Retries go out before new messages; the window still bounds them.
        while let Some(pending) = self.retry.pop_front() {
            if self.in_flight.len() >= self.settings.window {
                self.retry.push_front(pending);
                break;
            }
            self.publish(pending).await;
        }
    }
}
