//! ESP webhooks (SPEC §5): `POST /webhooks/{ses,mailgun,sendgrid,postmark}`.
//!
//! Each provider module is pure: it verifies a request (signature, basic auth) and parses its
//! documented payload into our events, with the provider's bounce classification mapped onto
//! ours (SPEC §3). The router here does the I/O: it hands the events to an [`EventSink`] (the
//! confirmed publisher of the HTTP ingest) with a `message_id` derived from the provider's own
//! ids, so a provider's retry is counted once. A route is on only when its setting is set.

pub mod mailgun;
pub mod postmark;
pub mod sendgrid;
pub mod sns;

use crate::event::{Event, MAX_BATCH_EVENTS};
use crate::metrics;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where verified webhook events go: the integrator implements it for the HTTP ingest's
/// confirmed publisher (one message per call, persistent, `message_id` set, `Ok` only once the
/// broker confirmed it).
pub trait EventSink: Send + Sync {
    fn publish(
        &self,
        events: Vec<Event>,
        message_id: String,
    ) -> BoxFuture<'_, Result<(), SinkError>>;
}

/// The sink could not take the events (the broker did not confirm them); answered with 503 so
/// the provider retries.
#[derive(Debug, thiserror::Error)]
#[error("could not publish the events: {0}")]
pub struct SinkError(pub String);

/// Webhook settings (SPEC §6). A provider's route is off (404) while its setting is unset.
#[derive(Clone, Default, clap::Args)]
pub struct WebhookArgs {
    /// Mailgun's HTTP webhook signing key: turns on `POST /webhooks/mailgun`.
    #[arg(
        long,
        visible_alias = "webhook-mailgun-signing-key",
        env = "WEBHOOK_MAILGUN_SIGNING_KEY",
        hide_env_values = true
    )]
    pub mailgun_signing_key: Option<String>,

    /// SendGrid's signed event webhook verification key, the base64 public key SendGrid
    /// shows: turns on `POST /webhooks/sendgrid`.
    #[arg(
        long,
        visible_alias = "webhook-sendgrid-public-key",
        env = "WEBHOOK_SENDGRID_PUBLIC_KEY"
    )]
    pub sendgrid_public_key: Option<String>,

    /// `user:password` of the basic auth in Postmark's webhook URL: turns on
    /// `POST /webhooks/postmark`.
    #[arg(
        long,
        visible_alias = "webhook-postmark-auth",
        env = "WEBHOOK_POSTMARK_AUTH",
        hide_env_values = true
    )]
    pub postmark_auth: Option<String>,

    /// SNS topic ARNs (comma-separated) whose SES notifications are accepted: turns on
    /// `POST /webhooks/ses`. Notifications from other topics are refused.
    #[arg(
        long,
        visible_alias = "webhook-sns-topic-arns",
        env = "WEBHOOK_SNS_TOPIC_ARNS",
        value_delimiter = ','
    )]
    pub sns_topic_arns: Vec<String>,

    /// A PEM file pinning the SNS signing certificate (closed networks, tests); unset, the
    /// certificate is fetched from `SigningCertURL`, only over https from an
    /// `sns.<region>.amazonaws.com` host.
    #[arg(long, visible_alias = "webhook-sns-cert", env = "WEBHOOK_SNS_CERT")]
    pub sns_cert: Option<std::path::PathBuf>,
}

impl WebhookArgs {
    /// The same settings trimmed, and with empty values (an env file's `KEY=`) taken as unset,
    /// so an empty signing key never turns a route on. Untrimmed, a topic after `, ` in
    /// `WEBHOOK_SNS_TOPIC_ARNS` (or a key with the newline a Kubernetes Secret made with `echo`
    /// keeps) refused every request (401), and every retry of it.
    pub fn normalized(mut self) -> Self {
        let trimmed = |value: String| Some(value.trim().to_string()).filter(|v| !v.is_empty());
        self.mailgun_signing_key = self.mailgun_signing_key.take().and_then(trimmed);
        self.sendgrid_public_key = self.sendgrid_public_key.take().and_then(trimmed);
        self.postmark_auth = self.postmark_auth.take().and_then(trimmed);
        self.sns_topic_arns = std::mem::take(&mut self.sns_topic_arns)
            .into_iter()
            .filter_map(trimmed)
            .collect();
        if self
            .sns_cert
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            self.sns_cert = None;
        }
        self
    }

    /// Whether any provider's route is on.
    pub fn any(&self) -> bool {
        let settings = self.clone().normalized();
        settings.mailgun_signing_key.is_some()
            || settings.sendgrid_public_key.is_some()
            || settings.postmark_auth.is_some()
            || !settings.sns_topic_arns.is_empty()
    }
}

impl std::fmt::Debug for WebhookArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("WebhookArgs")
            .field("mailgun_signing_key", &set(&self.mailgun_signing_key))
            .field("sendgrid_public_key", &self.sendgrid_public_key)
            .field("postmark_auth", &set(&self.postmark_auth))
            .field("sns_topic_arns", &self.sns_topic_arns)
            .field("sns_cert", &self.sns_cert)
            .finish()
    }
}

/// Why a webhook request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Forged, replayed, stale or unauthenticated: 401.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Not the provider's documented payload: 400.
    #[error("{0}")]
    BadRequest(String),
    /// The events could not be published: 503, so the provider retries.
    #[error("{0}")]
    Unavailable(String),
    /// The events serialise past the broker message limit ([`crate::event::MAX_BODY_BYTES`]):
    /// 413, never published (a retry would not fit either).
    #[error("the events serialise to {0} bytes, more than the {max}-byte message limit", max = crate::event::MAX_BODY_BYTES)]
    TooLarge(usize),
    /// The request body could not be read (over the 1 MiB request limit: 413), answered in
    /// JSON like every other refusal.
    #[error("the request body could not be read: {1}")]
    Body(StatusCode, String),
}

impl From<BytesRejection> for WebhookError {
    fn from(rejection: BytesRejection) -> Self {
        let (status, text) = crate::http::body_rejection(&rejection);
        WebhookError::Body(status, text)
    }
}

impl WebhookError {
    fn status(&self) -> StatusCode {
        match self {
            WebhookError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            WebhookError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebhookError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebhookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::Body(status, _) => *status,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            WebhookError::Unauthorized(_) => "refused",
            WebhookError::BadRequest(_) => "invalid",
            WebhookError::Unavailable(_) => "unavailable",
            WebhookError::TooLarge(_) => "too_large",
            WebhookError::Body(status, _) if *status == StatusCode::PAYLOAD_TOO_LARGE => {
                "too_large"
            }
            WebhookError::Body(..) => "invalid",
        }
    }
}

/// A body that is not the provider's JSON: 400 with serde's message, every string it quotes
/// from the body elided, so no answer echoes a token or a signature (SPEC §5). Field names
/// (quoted with backticks) and positions stay.
pub(crate) fn bad_json(what: &str, error: &serde_json::Error) -> WebhookError {
    let text = error.to_string();
    let mut message = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        message.push(c);
        if c == '"' {
            // serde writes a string from the input with `{:?}`: skip to its closing quote.
            message.push('…');
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
            message.push('"');
        }
    }
    WebhookError::BadRequest(format!("not {what}: {message}"))
}

/// Events from one verified request, and the `message_id` they are published under.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub events: Vec<Event>,
    /// Derived from the provider's ids (or the signed body), so a retry is counted once.
    pub message_id: String,
    /// Empty, or one per event: an event with the provider's own id of that event is published
    /// alone under it, so a copy the provider sends again in another batch is counted once
    /// (SendGrid's `sg_event_id`); the events without one go together under `message_id`.
    pub event_ids: Vec<Option<String>>,
    /// Provider events acknowledged without counting (opens, clicks, complaints, deferrals…).
    pub ignored: usize,
}

/// A provider's address → our event for its domain; `None` for an address without a valid
/// domain (skipped, not fatal: a provider's batch is not ours to reject whole).
pub(crate) fn event_for(address: &str, kind: crate::event::EventType) -> Option<Event> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (_, domain) = address.rsplit_once('@')?;
    Event::new(domain, kind).ok()
}

/// Hex SHA-256 of `data`: message ids for providers whose batches carry no single id.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    crate::hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A field a provider documents as a string: any other JSON type reads as absent, so one odd
/// field does not refuse a whole signed batch.
pub(crate) fn lenient_string<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    use serde::Deserialize;
    Ok(
        match Option::<serde_json::Value>::deserialize(deserializer)? {
            Some(serde_json::Value::String(text)) => Some(text),
            _ => None,
        },
    )
}

/// How the webhooks' message ids begin (`sendgrid:{sg_event_id}`, `mailgun:{day}:{id}`,
/// `sns:{MessageId}`, `postmark:{type}:{id}`): an HTTP `Idempotency-Key` may not, so a client's
/// key can never be a provider event's id (that event would be skipped as a duplicate of it).
pub const ID_PREFIXES: [&str; 4] = [
    sendgrid::ID_PREFIX,
    mailgun::ID_PREFIX,
    sns::ID_PREFIX,
    postmark::ID_PREFIX,
];

/// How far a signed timestamp may be from now (Mailgun, SendGrid).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Remembers the Mailgun tokens seen within the freshness window, so a replayed request is
/// refused. Bounded by the window: older tokens would fail the timestamp check anyway. Those
/// are dropped at most once a second (each drop is a pass over every token held), so a busy
/// webhook does not pay a pass per request.
#[derive(Default)]
pub struct ReplayCache {
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    tokens: HashMap<String, i64>,
    pruned_at: i64,
}

impl ReplayCache {
    /// True the first time `token` is seen (at `timestamp`); false for a replay.
    pub fn first_use(&self, token: &str, timestamp: i64, now: i64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.tokens.len() > 1024 && now != seen.pruned_at {
            let horizon = now - 2 * MAX_CLOCK_SKEW.as_secs() as i64;
            seen.tokens.retain(|_, at| *at >= horizon);
            seen.pruned_at = now;
        }
        seen.tokens.insert(token.to_string(), timestamp).is_none()
    }

    /// Forgets `token`: its request was not published (503), so the provider's retry of that
    /// very request is not a replay.
    pub fn forget(&self, token: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.tokens.remove(token);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tokens
            .len()
    }
}

/// What the webhook routes share.
#[derive(Clone)]
pub struct WebhookState {
    pub sink: Arc<dyn EventSink>,
    pub settings: Arc<WebhookArgs>,
    pub replays: Arc<ReplayCache>,
    pub sns: Arc<sns::SnsVerifier>,
}

impl WebhookState {
    /// Reads the pinned SNS certificate, if set.
    ///
    /// Fails at start on a SendGrid key that is not a base64 P-256 public key.
    pub fn new(sink: Arc<dyn EventSink>, settings: WebhookArgs) -> anyhow::Result<Self> {
        let settings = settings.normalized();
        if let Some(key) = &settings.sendgrid_public_key {
            sendgrid::check_key(key)?;
        }
        let sns = sns::SnsVerifier::from_settings(&settings)?;
        Ok(Self {
            sink,
            settings: Arc::new(settings),
            replays: Arc::new(ReplayCache::default()),
            sns: Arc::new(sns),
        })
    }
}

/// The routes of the configured providers; the others are absent (404 from the main router).
pub fn router(state: WebhookState) -> Router {
    let mut router = Router::new();
    if state.settings.mailgun_signing_key.is_some() {
        router = router.route("/webhooks/mailgun", post(mailgun_hook));
    }
    if state.settings.sendgrid_public_key.is_some() {
        router = router.route("/webhooks/sendgrid", post(sendgrid_hook));
    }
    if state.settings.postmark_auth.is_some() {
        router = router.route("/webhooks/postmark", post(postmark_hook));
    }
    if !state.settings.sns_topic_arns.is_empty() {
        router = router.route("/webhooks/ses", post(ses_hook));
    }
    router
        .layer(DefaultBodyLimit::max(crate::event::MAX_BODY_BYTES))
        .with_state(state)
}

/// The events' size as the one JSON message they are published as.
fn serialised_len(events: &[Event]) -> usize {
    serde_json::to_vec(events).map_or(0, |body| body.len())
}

/// The events published together under `message_id` (those without an id of their own), and
/// each of the others with its id.
fn split(parsed: &Parsed) -> (Vec<Event>, Vec<(Event, String)>) {
    let (mut grouped, mut keyed) = (Vec::new(), Vec::new());
    for (n, event) in parsed.events.iter().enumerate() {
        match parsed.event_ids.get(n).cloned().flatten() {
            Some(id) => keyed.push((event.clone(), id)),
            None => grouped.push(event.clone()),
        }
    }
    (grouped, keyed)
}

/// Publishes one event as a message of its own (owned, so the stream of them is `Send`).
async fn publish_alone(
    sink: Arc<dyn EventSink>,
    event: Event,
    id: String,
) -> Result<(), SinkError> {
    sink.publish(vec![event], id).await
}

/// How many single-event messages of one request are awaiting their confirms at once: a
/// SendGrid post of 10,000 events with ids is 40 rounds of confirms, well inside
/// HTTP_REQUEST_TIMEOUT even at 100 ms a confirm.
const KEYED_IN_FLIGHT: usize = 256;

/// Publishes the events as messages of at most [`MAX_BATCH_EVENTS`] each, the most a message
/// may hold (the consumer dead-letters more as `batch_too_large`; a SendGrid post can carry
/// more, and was lost so). One part keeps the provider-derived id; parts of a larger delivery
/// are `{id}/{n}`, so a retry after a partial failure counts each part once.
async fn publish_in_parts(
    state: &WebhookState,
    message_id: &str,
    grouped: Vec<Event>,
    keyed: Vec<(Event, String)>,
) -> Result<(), SinkError> {
    use futures_util::{StreamExt, TryStreamExt};
    // The events without an id of their own first: a request that times out on the
    // single-event messages after them is retried, and those already confirmed then count once.
    let parts = grouped.chunks(MAX_BATCH_EVENTS);
    let several = parts.len() > 1;
    for (n, part) in parts.enumerate() {
        let id = if several {
            format!("{message_id}/{n}")
        } else {
            message_id.to_string()
        };
        state.sink.publish(part.to_vec(), id).await?;
    }
    let sink = state.sink.clone();
    futures_util::stream::iter(keyed)
        .map(move |(event, id)| publish_alone(sink.clone(), event, id))
        .buffer_unordered(KEYED_IN_FLIGHT)
        .try_collect::<()>()
        .await
}

/// Publishes what a provider module parsed and answers.
async fn finish(
    state: &WebhookState,
    provider: &'static str,
    parsed: Result<Parsed, WebhookError>,
) -> Response {
    let result = match parsed {
        Ok(parsed) if parsed.events.is_empty() => Ok(parsed),
        Ok(parsed) => {
            let (grouped, keyed) = split(&parsed);
            match serialised_len(&grouped) {
                len if len > crate::event::MAX_BODY_BYTES => Err(WebhookError::TooLarge(len)),
                _ => publish_in_parts(state, &parsed.message_id, grouped, keyed)
                    .await
                    .map(|()| parsed)
                    .map_err(|e| WebhookError::Unavailable(e.to_string())),
            }
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(parsed) => {
            let outcome = if parsed.events.is_empty() {
                "ignored"
            } else {
                "accepted"
            };
            metrics::webhook_handled(provider, outcome, parsed.events.len(), parsed.ignored);
            (
                StatusCode::OK,
                Json(serde_json::json!({"status": outcome, "events": parsed.events.len()})),
            )
                .into_response()
        }
        Err(error) => {
            metrics::webhook_failed(provider, error.outcome(), &error.to_string());
            (
                error.status(),
                Json(serde_json::json!({"error": error.to_string()})),
            )
                .into_response()
        }
    }
}

async fn mailgun_hook(
    State(state): State<WebhookState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return finish(&state, "mailgun", Err(rejection.into())).await,
    };
    let key = state.settings.mailgun_signing_key.as_deref().unwrap_or("");
    let parsed = mailgun::handle(key, &body, unix_now(), &state.replays);
    let response = finish(&state, "mailgun", parsed).await;
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        // Verified (its token recorded) but not published: Mailgun sends it again.
        if let Some(token) = mailgun::token(&body) {
            state.replays.forget(&token);
        }
    }
    response
}

async fn sendgrid_hook(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let key = state.settings.sendgrid_public_key.as_deref().unwrap_or("");
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let parsed = body.map_err(WebhookError::from).and_then(|body| {
        sendgrid::handle(
            key,
            header(sendgrid::SIGNATURE_HEADER),
            header(sendgrid::TIMESTAMP_HEADER),
            &body,
            unix_now(),
        )
    });
    finish(&state, "sendgrid", parsed).await
}

async fn postmark_hook(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let auth = state.settings.postmark_auth.as_deref().unwrap_or("");
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let parsed = body
        .map_err(WebhookError::from)
        .and_then(|body| postmark::check_auth(auth, given).and_then(|()| postmark::parse(&body)));
    finish(&state, "postmark", parsed).await
}

async fn ses_hook(
    State(state): State<WebhookState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = match body {
        Ok(body) => sns::handle(&state.sns, &state.settings.sns_topic_arns, &body).await,
        Err(rejection) => Err(rejection.into()),
    };
    finish(&state, "ses", parsed).await
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    /// Each event's domain and how it counts.
    pub fn tallies(parsed: &super::Parsed) -> Vec<(&str, crate::event::Tally)> {
        parsed
            .events
            .iter()
            .map(|e| (e.domain.as_str(), e.tally()))
            .collect()
    }

    /// A sample payload from `tests/fixtures/webhooks/` (sources in its README).
    pub fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/webhooks")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// An RSA key and self-signed certificate generated for this test process (openssl CLI).
    fn test_key_dir() -> &'static PathBuf {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("catchall-sns-{}", uuid::Uuid::now_v7()));
            std::fs::create_dir_all(&dir).unwrap();
            let status = std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-subj", "/CN=sns.us-west-2.amazonaws.com"])
                .arg("-keyout")
                .arg(dir.join("key.pem"))
                .arg("-out")
                .arg(dir.join("cert.pem"))
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl");
            assert!(status.success(), "openssl req");
            dir
        })
    }

    pub fn test_cert_der() -> Vec<u8> {
        super::sns::pem_der_for_tests(&test_cert_pem())
    }

    /// The PEM of the key [`rsa_sign`] signs with (PKCS #8).
    pub fn test_key_pem() -> String {
        std::fs::read_to_string(test_key_dir().join("key.pem")).unwrap()
    }

    /// The PEM of the certificate whose key [`rsa_sign`] signs with.
    pub fn test_cert_pem() -> String {
        std::fs::read_to_string(test_key_dir().join("cert.pem")).unwrap()
    }

    /// Signs `data` with the test key: SHA1withRSA (`1`) or SHA256withRSA (`2`), base64.
    pub fn rsa_sign(data: &[u8], version: &str) -> String {
        use base64::Engine;
        let dir = test_key_dir();
        let input = dir.join(format!("in-{}", uuid::Uuid::now_v7()));
        std::fs::write(&input, data).unwrap();
        let digest = if version == "1" { "-sha1" } else { "-sha256" };
        let output = std::process::Command::new("openssl")
            .args(["dgst", digest, "-sign"])
            .arg(dir.join("key.pem"))
            .arg(&input)
            .output()
            .expect("openssl dgst");
        assert!(output.status.success());
        let _ = std::fs::remove_file(&input);
        base64::engine::general_purpose::STANDARD.encode(output.stdout)
    }

    /// The SNS fixture of `kind` carrying `message`, signed with the test key.
    pub fn sns_envelope(kind: &str, message: &str, version: &str) -> String {
        let name = if kind == "Notification" {
            "sns-notification.json"
        } else {
            "sns-subscription-confirmation.json"
        };
        let mut value: serde_json::Value = serde_json::from_str(&fixture(name)).unwrap();
        value["Message"] = message.into();
        value["SignatureVersion"] = version.into();
        // Signed now: older than two hours is refused as a replay.
        value["Timestamp"] = humantime::format_rfc3339_millis(std::time::SystemTime::now())
            .to_string()
            .into();
        let envelope: super::sns::Envelope = serde_json::from_value(value.clone()).unwrap();
        value["Signature"] =
            rsa_sign(super::sns::canonical_string(&envelope).as_bytes(), version).into();
        value.to_string()
    }
}

#[cfg(test)]
mod settings_tests {
    use super::WebhookArgs;

    #[test]
    fn empty_settings_turn_no_route_on() {
        let empty = WebhookArgs {
            mailgun_signing_key: Some(String::new()),
            sendgrid_public_key: Some(" ".into()),
            postmark_auth: Some(String::new()),
            sns_topic_arns: vec![String::new()],
            sns_cert: None,
        };
        assert!(!empty.any());
        let mailgun = WebhookArgs {
            mailgun_signing_key: Some("key".into()),
            ..WebhookArgs::default()
        };
        assert!(mailgun.any());
    }
}

#[cfg(test)]
mod bad_json_tests {
    use super::{ReplayCache, WebhookError, mailgun};

    /// A signature or token of the wrong type is named in serde's message; the answer elides it
    /// (and any other string of the body) but keeps what is wrong and where.
    #[test]
    fn a_bad_body_is_answered_without_the_strings_it_carried() {
        let secret = "5ec12e7f0123456789abcdef";
        let bodies = [
            format!(r#"{{"signature": "{secret}", "event-data": {{}}}}"#),
            format!(
                r#"{{"signature": {{"timestamp": "1", "token": 7, "signature": "{secret}"}}, "event-data": "{secret}\"q"}}"#
            ),
            format!(
                r#"{{"signature": {{"timestamp": "1", "token": "{secret}", "signature": ["{secret}"]}}}}"#
            ),
        ];
        for body in bodies {
            let error = mailgun::handle("key", body.as_bytes(), 1, &ReplayCache::default())
                .expect_err("not a Mailgun webhook");
            let WebhookError::BadRequest(message) = &error else {
                panic!("{error:?}")
            };
            assert!(!message.contains(secret), "{message}");
            assert!(message.starts_with("not a Mailgun webhook: "), "{message}");
            assert!(message.contains("line 1"), "{message}");
        }
        let error = mailgun::handle(
            "key",
            br#"{"signature": "abc", "event-data": {}}"#,
            1,
            &ReplayCache::default(),
        )
        .expect_err("bad");
        assert!(
            error.to_string().contains(r#"invalid type: string "…""#),
            "{error}"
        );
    }
}

#[cfg(test)]
mod replay_tests {
    use super::{MAX_CLOCK_SKEW, ReplayCache};

    /// Tokens past the window are dropped once a second, not on every request: a burst within
    /// one second keeps them, the first request of the next second drops them; a replay is
    /// refused throughout.
    #[test]
    fn old_tokens_are_dropped_once_a_second_and_replays_are_refused() {
        let cache = ReplayCache::default();
        let window = 2 * MAX_CLOCK_SKEW.as_secs() as i64;
        let now = 1_000_000;
        // Past 1024 tokens the first request of second `now` makes a pass (nothing is old).
        for i in 0..1100 {
            assert!(cache.first_use(&format!("new-{i}"), now, now));
        }
        // Tokens already past the window, within the same second: no pass, they stay.
        for i in 0..500 {
            assert!(cache.first_use(&format!("old-{i}"), now - window - 1, now));
        }
        assert_eq!(cache.len(), 1600, "no second pass within one second");
        assert!(cache.first_use("next-second", now + 1, now + 1));
        assert_eq!(
            cache.len(),
            1101,
            "the next second's pass dropped the old tokens"
        );
        assert!(!cache.first_use("new-7", now, now + 1), "a replay");
        cache.forget("new-7");
        assert!(cache.first_use("new-7", now, now + 1), "forgotten: a retry");
    }
}
