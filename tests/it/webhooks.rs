//! ESP webhooks end to end (SPEC §5): signed provider payloads through `webhooks::router`,
//! published with confirms onto the test's exchange, counted by a worker; forged and replayed
//! requests refused with 401 and counted; the SNS subscription handshake answered; a provider
//! without its setting is off.

use crate::bounce::{all_events, status};
use crate::helpers::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use catchall::event::Event;
use catchall::webhooks::{self, EventSink, SinkError, WebhookArgs, WebhookState};
use futures_util::future::BoxFuture;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use reqwest::StatusCode;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The test's own sink: one persistent message per call, awaited until the broker confirms.
struct ConfirmingSink {
    _connection: Connection,
    channel: Channel,
    exchange: String,
}

impl EventSink for ConfirmingSink {
    fn publish(
        &self,
        events: Vec<Event>,
        message_id: String,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(&events).map_err(|e| SinkError(e.to_string()))?;
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(message_id.into());
            let confirm = self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    "batch".into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .map_err(|e| SinkError(e.to_string()))?
                .await
                .map_err(|e| SinkError(e.to_string()))?;
            if confirm.is_ack() {
                Ok(())
            } else {
                Err(SinkError("nacked".into()))
            }
        })
    }
}

/// [`ConfirmingSink`] that fails the next `failures` publishes first (the broker did not
/// confirm them), as an outage would.
struct FailingSink {
    sink: ConfirmingSink,
    failures: AtomicUsize,
}

impl EventSink for FailingSink {
    fn publish(
        &self,
        events: Vec<Event>,
        message_id: String,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err(SinkError("not confirmed (the test's outage)".into())) });
        }
        self.sink.publish(events, message_id)
    }
}

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/webhooks")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A SendGrid signing key pair and its public key as an operator configures it (base64 SPKI).
fn sendgrid_key(rng: &SystemRandom) -> (EcdsaKeyPair, String) {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng).expect("key");
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng)
        .expect("key pair");
    let mut spki = catchall::webhooks::sendgrid::P256_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(key.public_key().as_ref());
    (key, STANDARD.encode(&spki))
}

/// An RSA key and self-signed certificate for SNS, made with the openssl CLI.
struct SnsKey {
    dir: PathBuf,
}

impl SnsKey {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("catchall-sns-it-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("key dir");
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
            .expect("run openssl");
        assert!(status.success(), "openssl req");
        Self { dir }
    }

    fn sign(&self, data: &str, version: &str) -> String {
        let input = self.dir.join(format!("in-{}", uuid::Uuid::now_v7()));
        std::fs::write(&input, data).expect("write");
        let digest = if version == "1" { "-sha1" } else { "-sha256" };
        let output = std::process::Command::new("openssl")
            .args(["dgst", digest, "-sign"])
            .arg(self.dir.join("key.pem"))
            .arg(&input)
            .output()
            .expect("openssl dgst");
        assert!(output.status.success(), "openssl dgst");
        STANDARD.encode(output.stdout)
    }

    /// An SNS envelope around `message`, signed (SignatureVersion `version`).
    fn envelope(
        &self,
        fixture_name: &str,
        message: &str,
        version: &str,
        subscribe_url: Option<&str>,
    ) -> String {
        // Signed now: an SNS message more than two hours old is refused as a replay.
        self.envelope_at(
            fixture_name,
            message,
            version,
            subscribe_url,
            std::time::SystemTime::now(),
        )
    }

    /// [`SnsKey::envelope`] with the `Timestamp` of `signed`.
    fn envelope_at(
        &self,
        fixture_name: &str,
        message: &str,
        version: &str,
        subscribe_url: Option<&str>,
        signed: std::time::SystemTime,
    ) -> String {
        let mut value: serde_json::Value =
            serde_json::from_str(&fixture(fixture_name)).expect("json");
        value["Message"] = message.into();
        value["MessageId"] = uuid::Uuid::now_v7().to_string().into();
        value["Timestamp"] = humantime::format_rfc3339_millis(signed).to_string().into();
        value["SignatureVersion"] = version.into();
        if let Some(url) = subscribe_url {
            value["SubscribeURL"] = url.into();
        }
        let envelope: catchall::webhooks::sns::Envelope =
            serde_json::from_value(value.clone()).expect("envelope");
        value["Signature"] = self
            .sign(
                &catchall::webhooks::sns::canonical_string(&envelope),
                version,
            )
            .into();
        value.to_string()
    }
}

impl Drop for SnsKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A local stand-in for SNS's SubscribeURL: counts the GETs it gets.
async fn subscribe_endpoint() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/confirm",
        axum::routing::get(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "<ConfirmSubscriptionResponse/>"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        format!("http://{addr}/confirm?Action=ConfirmSubscription&Token=abc"),
        hits,
    )
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn mailgun_body(name: &str, key: &str, token: &str) -> Vec<u8> {
    let mut body: serde_json::Value = serde_json::from_str(&fixture(name)).expect("json");
    let ts = now().to_string();
    body["signature"] = serde_json::json!({
        "timestamp": ts, "token": token,
        "signature": catchall::webhooks::mailgun::sign(key, &ts, token),
    });
    serde_json::to_vec(&body).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_webhooks_are_verified_published_and_counted() {
    let (db, broker, worker) = started().await;
    let (connection, channel) = broker.channel().await;
    let sink = Arc::new(ConfirmingSink {
        _connection: connection,
        channel,
        exchange: broker.exchange.clone(),
    });

    // Keys the test generates, configured as an operator would.
    let mailgun_key = "key-it-signing-0123456789";
    let rng = SystemRandom::new();
    let (sendgrid, sendgrid_public_key) = sendgrid_key(&rng);
    let sns_key = SnsKey::new();
    let topic = "arn:aws:sns:us-west-2:123456789012:MyTopic";
    let settings = WebhookArgs {
        mailgun_signing_key: Some(mailgun_key.into()),
        sendgrid_public_key: Some(sendgrid_public_key),
        postmark_auth: Some("hook:s3cret".into()),
        sns_topic_arns: vec![topic.into()],
        sns_cert: Some(sns_key.dir.join("cert.pem")),
    };
    let mut state = WebhookState::new(sink.clone(), settings).expect("webhook state");
    Arc::get_mut(&mut state.sns)
        .expect("unshared")
        .extra_confirm_hosts = vec!["127.0.0.1".into()];
    let base = serve(webhooks::router(state)).await;
    let client = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>, headers: Vec<(&'static str, String)>| {
        let mut request = client.post(format!("{base}{path}")).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.expect("POST");
            let status = response.status();
            let json: serde_json::Value = response.json().await.expect("JSON answer");
            (status, json)
        }
    };

    // Mailgun: delivered and a 5.1.1 bounce; a replay, a forgery and a stale request refused.
    let delivered = mailgun_body("mailgun-delivered.json", mailgun_key, "tok-1");
    assert_eq!(
        post("/webhooks/mailgun", delivered.clone(), vec![]).await.0,
        StatusCode::OK
    );
    let bounce = mailgun_body("mailgun-failed-permanent.json", mailgun_key, "tok-2");
    assert_eq!(
        post("/webhooks/mailgun", bounce, vec![]).await.0,
        StatusCode::OK
    );
    let complained = mailgun_body("mailgun-complained.json", mailgun_key, "tok-3");
    let (code, answer) = post("/webhooks/mailgun", complained, vec![]).await;
    assert_eq!(
        (code, answer["status"].as_str()),
        (StatusCode::OK, Some("ignored"))
    );
    let (code, answer) = post("/webhooks/mailgun", delivered, vec![]).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "replay: {answer}");
    let forged = mailgun_body("mailgun-delivered.json", "not-the-key", "tok-4");
    assert_eq!(
        post("/webhooks/mailgun", forged, vec![]).await.0,
        StatusCode::UNAUTHORIZED
    );

    // SendGrid: a signed batch, sent twice (a retry: counted once); a bad signature refused.
    let events = fixture("sendgrid-events.json").into_bytes();
    for ts in [now(), now() + 1] {
        let ts = ts.to_string();
        let mut signed = ts.as_bytes().to_vec();
        signed.extend_from_slice(&events);
        let signature = STANDARD.encode(sendgrid.sign(&rng, &signed).expect("sign").as_ref());
        let headers = vec![
            (catchall::webhooks::sendgrid::SIGNATURE_HEADER, signature),
            (catchall::webhooks::sendgrid::TIMESTAMP_HEADER, ts),
        ];
        assert_eq!(
            post("/webhooks/sendgrid", events.clone(), headers).await.0,
            StatusCode::OK
        );
    }
    let headers = vec![
        (
            catchall::webhooks::sendgrid::SIGNATURE_HEADER,
            STANDARD.encode([0u8; 70]),
        ),
        (
            catchall::webhooks::sendgrid::TIMESTAMP_HEADER,
            now().to_string(),
        ),
    ];
    assert_eq!(
        post("/webhooks/sendgrid", events.clone(), headers).await.0,
        StatusCode::UNAUTHORIZED
    );

    // SendGrid: a signed batch under the 1 MiB request limit whose IDN domains grow past the
    // 1 MiB message limit when normalised: 413, never published (the counts below show it).
    // Without `sg_event_id`s, the events go as one message.
    let idn = vec!["ü"; 31].join(".");
    let grown: Vec<serde_json::Value> = (0..4500)
        .map(|_| {
            serde_json::json!({"email": format!("a@{idn}"), "timestamp": 1513299569,
                "event": "delivered"})
        })
        .collect();
    let grown = serde_json::to_vec(&grown).unwrap();
    assert!(grown.len() < 1024 * 1024, "{} bytes", grown.len());
    let ts = now().to_string();
    let mut signed = ts.as_bytes().to_vec();
    signed.extend_from_slice(&grown);
    let signature = STANDARD.encode(sendgrid.sign(&rng, &signed).expect("sign").as_ref());
    let headers = vec![
        (catchall::webhooks::sendgrid::SIGNATURE_HEADER, signature),
        (catchall::webhooks::sendgrid::TIMESTAMP_HEADER, ts),
    ];
    let (code, answer) = post("/webhooks/sendgrid", grown, headers).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("1048576")),
        "{answer}"
    );

    // A body over the 1 MiB request limit: 413, with a JSON error like every other refusal.
    for provider in ["mailgun", "sendgrid", "postmark", "ses"] {
        let path = format!("/webhooks/{provider}");
        let (code, answer) = post(&path, vec![b' '; 1024 * 1024 + 1], vec![]).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{provider}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("length limit")),
            "{provider}: {answer}"
        );
    }

    // Postmark: basic auth.
    let auth = vec![(
        "authorization",
        format!("Basic {}", STANDARD.encode("hook:s3cret")),
    )];
    for name in [
        "postmark-delivery.json",
        "postmark-hard-bounce.json",
        "postmark-open.json",
    ] {
        let (code, answer) = post(
            "/webhooks/postmark",
            fixture(name).into_bytes(),
            auth.clone(),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{name}: {answer}");
    }
    let wrong = vec![(
        "authorization",
        format!("Basic {}", STANDARD.encode("hook:guess")),
    )];
    let (code, answer) = post(
        "/webhooks/postmark",
        fixture("postmark-delivery.json").into_bytes(),
        wrong,
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert!(!answer.to_string().contains("s3cret") && !answer.to_string().contains("guess"));

    // SES through SNS: the handshake, then notifications (v1 and v2); a forgery refused.
    let (subscribe_url, hits) = subscribe_endpoint().await;
    let confirmation = sns_key.envelope(
        "sns-subscription-confirmation.json",
        "You have chosen to subscribe to the topic.",
        "1",
        Some(&subscribe_url),
    );
    let (code, answer) = post("/webhooks/ses", confirmation.into_bytes(), vec![]).await;
    assert_eq!(code, StatusCode::OK, "{answer}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "SubscribeURL was fetched once"
    );
    // A confirmation that fails says why without the SubscribeURL, which holds the
    // subscription's token (the error, in the log and in the answer, quoted the URL whole).
    let failing = subscribe_url
        .replace("/confirm?", "/missing?")
        .replace("Token=abc", "Token=t0ken-s3cret");
    let confirmation = sns_key.envelope(
        "sns-subscription-confirmation.json",
        "You have chosen to subscribe to the topic.",
        "1",
        Some(&failing),
    );
    let (code, answer) = post("/webhooks/ses", confirmation.into_bytes(), vec![]).await;
    assert_ne!(code, StatusCode::OK, "{answer}");
    assert!(
        answer.to_string().contains("404") && !answer.to_string().contains("t0ken-s3cret"),
        "{answer}"
    );
    let bounce = sns_key.envelope(
        "sns-notification.json",
        &fixture("ses-bounce-permanent.json"),
        "2",
        None,
    );
    assert_eq!(
        post("/webhooks/ses", bounce.into_bytes(), vec![]).await.0,
        StatusCode::OK
    );
    let delivery = sns_key.envelope(
        "sns-notification.json",
        &fixture("ses-delivery.json"),
        "1",
        None,
    );
    let mut delivery: serde_json::Value = serde_json::from_str(&delivery).expect("json");
    assert_eq!(
        post("/webhooks/ses", delivery.to_string().into_bytes(), vec![])
            .await
            .0,
        StatusCode::OK
    );
    delivery["Message"] = fixture("ses-bounce-transient.json").into();
    assert_eq!(
        post("/webhooks/ses", delivery.to_string().into_bytes(), vec![])
            .await
            .0,
        StatusCode::UNAUTHORIZED,
        "a message changed after signing"
    );
    // Signed, but three hours ago: a replay (AWS retries for an hour at most). It was counted,
    // and its id may have left the dedup table.
    let stale = sns_key.envelope_at(
        "sns-notification.json",
        &fixture("ses-delivery.json"),
        "2",
        None,
        std::time::SystemTime::now() - Duration::from_secs(3 * 3600),
    );
    let (code, answer) = post("/webhooks/ses", stale.into_bytes(), vec![]).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{answer}");

    // Counted: delivered 1 (Mailgun) + 1 (SendGrid) + 1 (Postmark) + 2 (SES); proving bounces
    // 1 + 1 + 1 + 2; other bounces 3 (SendGrid 500/5.0.0, 5.2.2, 5.7.1 blocked).
    wait_for(
        Duration::from_secs(20),
        "the webhook events to be counted",
        || async { (all_events(&db).await == 13).then_some(()) },
    )
    .await;
    assert_eq!(
        status(&worker, "example.com").await,
        serde_json::json!({"domain": "example.com", "status": "not catch-all",
            "delivered": 5, "bounced": 5, "other_bounced": 3})
    );
    let refused = |provider: &str| {
        format!("catchall_webhook_requests_total{{provider=\"{provider}\",outcome=\"refused\"}}")
    };
    assert_eq!(worker.metric(&refused("mailgun")).await, 2.0);
    assert_eq!(worker.metric(&refused("sendgrid")).await, 1.0);
    assert_eq!(worker.metric(&refused("postmark")).await, 1.0);
    assert_eq!(worker.metric(&refused("ses")).await, 2.0);
    let too_large = |provider: &str| {
        format!("catchall_webhook_requests_total{{provider=\"{provider}\",outcome=\"too_large\"}}")
    };
    // SendGrid's: the grown batch and the oversized body.
    assert_eq!(worker.metric(&too_large("sendgrid")).await, 2.0);
    for provider in ["mailgun", "postmark", "ses"] {
        assert_eq!(worker.metric(&too_large(provider)).await, 1.0, "{provider}");
    }

    // Without their settings the routes are off.
    let off = serve(webhooks::router(
        WebhookState::new(sink, WebhookArgs::default()).expect("state"),
    ))
    .await;
    for provider in ["ses", "mailgun", "sendgrid", "postmark"] {
        let response = client
            .post(format!("{off}/webhooks/{provider}"))
            .body("{}")
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{provider}");
    }
    worker.stop().await;
}

/// The worker itself serves a configured provider's route, publishing through its own
/// confirming publisher (no INGEST_TOKENS needed): a delivery posted twice counts once, a hard
/// bounce counts, and providers left unset stay off.
#[tokio::test]
async fn the_worker_serves_configured_webhooks_with_its_confirming_publisher() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.webhooks.postmark_auth = Some("hook:s3cret".into());
    config.webhooks.mailgun_signing_key = Some(String::new()); // empty: stays off
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let client = reqwest::Client::new();
    let auth = format!("Basic {}", STANDARD.encode("hook:s3cret"));
    for name in [
        "postmark-delivery.json",
        "postmark-delivery.json",
        "postmark-hard-bounce.json",
    ] {
        let response = client
            .post(worker.url("/webhooks/postmark"))
            .header("authorization", &auth)
            .body(fixture(name))
            .send()
            .await
            .expect("POST /webhooks/postmark");
        assert_eq!(response.status(), StatusCode::OK, "{name}");
    }
    for off in ["/webhooks/mailgun", "/webhooks/sendgrid", "/webhooks/ses"] {
        let response = client
            .post(worker.url(off))
            .body("{}")
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{off}");
    }
    let expected: Counts = [("example.com".to_string(), (1, 1))].into_iter().collect();
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    worker.stop().await;
}

/// SendGrid's side of a test: its signing key.
struct SendGrid {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl SendGrid {
    /// Signs `body` as SendGrid does and posts it to the worker's webhook.
    async fn post(&self, worker: &TestWorker, body: Vec<u8>) -> StatusCode {
        let ts = now().to_string();
        let mut signed = ts.as_bytes().to_vec();
        signed.extend_from_slice(&body);
        let signature = STANDARD.encode(self.key.sign(&self.rng, &signed).expect("sign").as_ref());
        reqwest::Client::new()
            .post(worker.url("/webhooks/sendgrid"))
            .header(catchall::webhooks::sendgrid::SIGNATURE_HEADER, signature)
            .header(catchall::webhooks::sendgrid::TIMESTAMP_HEADER, ts)
            .body(body)
            .send()
            .await
            .expect("POST /webhooks/sendgrid")
            .status()
    }
}

/// A worker with the SendGrid webhook on, ready.
async fn sendgrid_worker() -> (TestDb, TestBroker, TestWorker, SendGrid) {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let rng = SystemRandom::new();
    let (key, public_key) = sendgrid_key(&rng);
    let mut config = TestWorker::config(&db, &broker);
    config.webhooks.sendgrid_public_key = Some(public_key);
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    (db, broker, worker, SendGrid { key, rng })
}

/// A SendGrid post of more events than one message may hold (10,000), without `sg_event_id`s,
/// is published in parts, every event counted and none dead-lettered; its retry counts once. It
/// used to go out as one message that the consumer dead-lettered as `batch_too_large` after
/// SendGrid had its 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sendgrid_post_of_more_than_a_message_holds_is_published_in_parts() {
    let (db, broker, worker, sendgrid) = sendgrid_worker().await;
    let total = catchall::event::MAX_BATCH_EVENTS + 1;
    let events: Vec<serde_json::Value> = (0..total)
        .map(|i| {
            serde_json::json!({"email": format!("u{i}@parts.example"), "timestamp": 1513299569,
                "event": "delivered"})
        })
        .collect();
    let body = serde_json::to_vec(&events).expect("JSON");
    for attempt in ["first", "retry"] {
        let status = sendgrid.post(&worker, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{attempt}");
    }
    let expected: Counts = [("parts.example".to_string(), (total as i64, 0))]
        .into_iter()
        .collect();
    assert_counts_eventually(&db, &expected, Duration::from_secs(60)).await;
    // Every message settled: the retry's parts were skipped as duplicates, none dead-lettered.
    wait_for(Duration::from_secs(30), "the queue to drain", || async {
        (broker.depth(&broker.queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(broker.depth(&broker.dead_queue()).await, 0, "dead letters");
    assert_eq!(db.total_events().await, total as i64);
    worker.stop().await;
}

/// A verified Mailgun request that could not be published is answered 503, and the provider's
/// retry of that very request (same token and signature) is published and counted, not refused
/// as a replay. (The token used to be recorded before the publish, so the retry got 401 and its
/// event was lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailgun_request_answered_503_is_counted_when_mailgun_sends_it_again() {
    let (db, broker, worker) = started().await;
    let (connection, channel) = broker.channel().await;
    let sink = Arc::new(FailingSink {
        sink: ConfirmingSink {
            _connection: connection,
            channel,
            exchange: broker.exchange.clone(),
        },
        failures: AtomicUsize::new(1),
    });
    let key = "key-it-signing-retry";
    let settings = WebhookArgs {
        mailgun_signing_key: Some(key.into()),
        ..WebhookArgs::default()
    };
    let base = serve(webhooks::router(
        WebhookState::new(sink, settings).expect("webhook state"),
    ))
    .await;
    let client = reqwest::Client::new();
    let body = mailgun_body("mailgun-delivered.json", key, "tok-retry");
    let url = format!("{base}/webhooks/mailgun");
    let post = || post_answer(&client, &url, &body);

    let (code, answer) = post().await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let (code, answer) = post().await;
    assert_eq!(code, StatusCode::OK, "the retry: {answer}");
    // A third time it is a replay again.
    let (code, answer) = post().await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{answer}");
    counted_once(&db).await;
    worker.stop().await;
    assert_eq!(
        all_events(&db).await,
        1,
        "counted once, also after the stop"
    );
}

/// The same through the worker's own route and publisher, with RabbitMQ really gone (its
/// connection cut by a proxy): the request is answered 503, and Mailgun's retries after the
/// broker is back are published and counted once; once accepted, the token is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailgun_request_refused_while_rabbitmq_is_down_is_counted_when_sent_again() {
    let proxy = crate::proxy::Proxy::start("127.0.0.1:5672").await;
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.amqp.amqp_url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let key = "key-it-signing-outage";
    config.webhooks.mailgun_signing_key = Some(key.into());
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let client = reqwest::Client::new();
    let body = mailgun_body("mailgun-delivered.json", key, "tok-outage");
    let url = worker.url("/webhooks/mailgun");
    let post = || post_answer(&client, &url, &body);

    proxy.cut();
    let (code, answer) = post().await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    proxy.restore();
    // Mailgun retries until it gets a 2xx; a 401 here would be the lost event.
    wait_for(
        Duration::from_secs(30),
        "a retry to be accepted",
        || async {
            let (code, answer) = post().await;
            assert_ne!(code, StatusCode::UNAUTHORIZED, "a retry refused: {answer}");
            (code == StatusCode::OK).then_some(())
        },
    )
    .await;
    let (code, answer) = post().await;
    assert_eq!(
        code,
        StatusCode::UNAUTHORIZED,
        "accepted once, then a replay: {answer}"
    );
    counted_once(&db).await;
    worker.stop().await;
    assert_eq!(
        all_events(&db).await,
        1,
        "counted once, also after the stop"
    );
}

/// POSTs `body` to `url`: the status and the answer's text.
async fn post_answer(client: &reqwest::Client, url: &str, body: &[u8]) -> (StatusCode, String) {
    let response = client
        .post(url)
        .body(body.to_vec())
        .send()
        .await
        .expect("POST");
    (response.status(), response.text().await.expect("answer"))
}

/// Waits until the one retried delivery is counted.
async fn counted_once(db: &TestDb) {
    wait_for(
        Duration::from_secs(20),
        "the retried delivery to be counted",
        || async { (all_events(db).await == 1).then_some(()) },
    )
    .await;
}

/// SendGrid may send an event again in another batch, and says to deduplicate on its
/// `sg_event_id`: each event with one is published alone under it, so the copy is counted once.
/// The signed body's hash was the only id, and a copy in a batch of other events counted
/// twice. Events without an id still go together under the body's hash (a retry of the same
/// body counts once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sendgrid_event_sent_again_in_another_batch_is_counted_once() {
    let (db, broker, worker, sendgrid) = sendgrid_worker().await;
    let event = |email: &str, kind: &str, id: Option<&str>| {
        let mut event = serde_json::json!({"email": email, "timestamp": 1513299569,
            "event": kind, "status": "5.1.1", "reason": "550 5.1.1 no such user"});
        if let Some(id) = id {
            event["sg_event_id"] = id.into();
        }
        event
    };
    let first = vec![
        event("a@dup.example", "delivered", Some("E1")),
        event("b@bounced.example", "bounce", Some("E2")),
    ];
    let again = vec![
        event("c@other.example", "delivered", Some("E3")),
        event("a@dup.example", "delivered", Some("E1")),
        event("b@bounced.example", "bounce", Some("E2")),
        event("d@noid.example", "delivered", None),
    ];
    // The second batch twice: SendGrid's retry of the very same body.
    for batch in [&first, &again, &again] {
        let body = serde_json::to_vec(batch).expect("JSON");
        assert_eq!(sendgrid.post(&worker, body).await, StatusCode::OK);
    }
    let expected: Counts = [
        ("dup.example", (1, 0)),
        ("bounced.example", (0, 1)),
        ("other.example", (1, 0)),
        ("noid.example", (1, 0)),
    ]
    .into_iter()
    .map(|(domain, counts)| (domain.to_string(), counts))
    .collect();
    assert_counts_eventually(&db, &expected, Duration::from_secs(30)).await;
    wait_for(Duration::from_secs(30), "the queue to drain", || async {
        (broker.depth(&broker.queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(db.counts().await, expected, "nothing counted twice");
    // E1 and E2 in the second batch; E3, E1, E2 and the id-less part in its retry. The queue
    // counts only ready messages: the retry's may still be in the worker's batch.
    wait_for(Duration::from_secs(30), "six duplicates", || async {
        (worker.stats().duplicates >= 6).then_some(())
    })
    .await;
    assert_eq!(worker.stats().duplicates, 6);
    worker.stop().await;
}
