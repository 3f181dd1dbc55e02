//! Amazon SES notifications delivered by SNS over HTTPS.
//!
//! Every SNS message is verified before anything else: its `TopicArn` must be one of
//! `WEBHOOK_SNS_TOPIC_ARNS`, and its `Signature` must verify over the canonical string of its
//! fields (SignatureVersion 1: SHA1withRSA; 2: SHA256withRSA) with the certificate at
//! `SigningCertURL` — fetched only over https from an `sns.<region>.amazonaws.com` host and
//! cached — or the certificate pinned by `WEBHOOK_SNS_CERT`.
//!
//! - `SubscriptionConfirmation`: the handshake is answered by GETting `SubscribeURL` (only an
//!   https `sns.<region>.amazonaws.com` URL, unless a test allows its own host).
//! - `Notification`: the SES notification in `Message` (`notificationType`, or `eventType` for
//!   event publishing). `Delivery` → delivered per recipient. `Bounce` → bounced per bounced
//!   recipient with `status` and `diagnosticCode` as evidence; without them, `NoEmail` counts as
//!   proof and every other sub-type is counted apart; `Suppressed` and
//!   `OnAccountSuppressionList` (SES did not send) are ignored, like complaints and the rest.

/// How this provider's message ids begin (see [`super::ID_PREFIXES`]).
pub const ID_PREFIX: &str = "sns:";

use super::{Parsed, WebhookArgs, WebhookError, event_for};
use crate::bounce::{EnhancedCode, codes_in_text};
use crate::event::{EventType, Evidence};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::FutureExt;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use x509_cert::Certificate;
use x509_cert::der::{Decode, DecodePem};

/// The SNS message envelope.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Envelope {
    #[serde(rename = "Type")]
    pub kind: String,
    pub message_id: String,
    pub topic_arn: String,
    #[serde(default)]
    pub subject: Option<String>,
    pub message: String,
    pub timestamp: String,
    pub signature_version: String,
    pub signature: String,
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    #[serde(default, rename = "SubscribeURL")]
    pub subscribe_url: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

/// The string SNS signs: `Name\nvalue\n` for the fields of the message type, in this order.
pub fn canonical_string(envelope: &Envelope) -> String {
    let mut out = String::new();
    let mut add = |name: &str, value: &str| {
        out.push_str(name);
        out.push('\n');
        out.push_str(value);
        out.push('\n');
    };
    add("Message", &envelope.message);
    add("MessageId", &envelope.message_id);
    if envelope.kind == "Notification" {
        if let Some(subject) = &envelope.subject {
            add("Subject", subject);
        }
    } else {
        add(
            "SubscribeURL",
            envelope.subscribe_url.as_deref().unwrap_or(""),
        );
    }
    add("Timestamp", &envelope.timestamp);
    if envelope.kind != "Notification" {
        add("Token", envelope.token.as_deref().unwrap_or(""));
    }
    add("TopicArn", &envelope.topic_arn);
    add("Type", &envelope.kind);
    out
}

/// True for an https URL on an `sns.<region>.amazonaws.com` host (or `.amazonaws.com.cn`):
/// exactly one label of at least 3 letters, digits or hyphens between, as AWS's own SDKs
/// check (`^sns\.[a-zA-Z0-9\-]{3,}\.amazonaws\.com(\.cn)?$`). Looser, `sns.s3.amazonaws.com`
/// (the S3 bucket `sns`, under S3's wildcard certificate) passed.
pub fn is_sns_url(raw: &str) -> bool {
    let Ok(url) = url::Url::parse(raw) else {
        return false;
    };
    let host = url.host_str().unwrap_or("");
    let region = host
        .strip_prefix("sns.")
        .and_then(|rest| {
            rest.strip_suffix(".amazonaws.com")
                .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))
        })
        .unwrap_or("");
    url.scheme() == "https"
        && url.username().is_empty()
        && url.password().is_none()
        && url.port().is_none()
        && region.len() >= 3
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The longest SigningCertURL accepted (AWS's are about 100 bytes).
const MAX_CERTIFICATE_URL_BYTES: usize = 256;

/// True for an SNS signing certificate's URL: an SNS host (see [`is_sns_url`]) and a path
/// `/SimpleNotificationService-NAME.pem` (NAME letters and digits), with no query or fragment,
/// written as the URL parser writes it back (AWS sends it so): each new spelling of one
/// certificate (`:443`, `/x/../`, a tab, which the parser drops) would be a fetch and a cache
/// entry of its own.
fn is_certificate_url(raw: &str) -> bool {
    let Ok(url) = url::Url::parse(raw) else {
        return false;
    };
    raw.len() <= MAX_CERTIFICATE_URL_BYTES
        && url.as_str() == raw
        && is_sns_url(raw)
        && url.query().is_none()
        && url.fragment().is_none()
        && url
            .path()
            .strip_prefix("/SimpleNotificationService-")
            .and_then(|name| name.strip_suffix(".pem"))
            .is_some_and(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether `arn` has the shape of an SNS topic's ARN: `arn:PARTITION:sns:REGION:ACCOUNT:NAME`.
pub fn is_topic_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.split(':').collect();
    matches!(
        parts.as_slice(),
        ["arn", partition, "sns", region, account, name]
            if partition.starts_with("aws")
                && [region, account, name].iter().all(|part| !part.is_empty())
    )
}

/// The SNS host of the region a topic is in: `arn:aws:sns:us-east-1:…` →
/// `sns.us-east-1.amazonaws.com` (`arn:aws-cn:…` → `….amazonaws.com.cn`). The topic is one the
/// settings list, so its region is trusted: a host of the general shape that is not a region
/// (`sns.s3-accelerate.amazonaws.com`, the S3 bucket `sns` under S3's certificate) is refused.
fn region_host(topic_arn: &str) -> Option<String> {
    let mut parts = topic_arn.split(':');
    let (Some("arn"), Some(partition), Some("sns"), Some(region)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let suffix = if partition == "aws-cn" {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    Some(format!("sns.{region}.{suffix}"))
}

/// True when `raw` is on the SNS host of `topic_arn`'s region (see [`region_host`]).
fn on_region_host(raw: &str, topic_arn: &str) -> bool {
    let host = url::Url::parse(raw)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string));
    host.is_some() && host == region_host(topic_arn)
}

/// The most of a certificate's PEM read from `SigningCertURL` (AWS's are under 2 KiB).
const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// The most certificate URLs remembered; past it, the failed ones are forgotten.
const MAX_CERTIFICATE_URLS: usize = 64;

/// The most shared certificate fetches under way at once. A shared fetch goes on when its
/// requests are gone, so forged requests with new URLs that close at once would otherwise
/// start fetches from AWS without bound. Past it (or with no room left among the URLs), a
/// request fetches on its own ([`MAX_OWN_FETCHES`]), ended with the request, and what it gave
/// is remembered as a shared fetch's would be, if there is room: answered 503 instead, forged
/// requests that kept the shared fetches busy made every new certificate fail, AWS's next one
/// included.
const MAX_FETCHES: usize = 8;

/// The most fetches requests make on their own at once (see [`MAX_FETCHES`]). Past it a
/// request waits in turn, [`OWN_FETCH_WAIT`] at most, then gets 503: refused at once, forged
/// requests that kept every place busy made every new certificate fail again.
const MAX_OWN_FETCHES: usize = 32;

/// How long a request waits for a place among [`MAX_OWN_FETCHES`]: the places turn over within
/// a fetch's time (AWS answers a missing name at once; 10 s at most), and requests are served
/// in turn, so one that arrives during a flood gets its place unless the queue ahead of it
/// takes longer than this to drain. Short: the wait, the fetch (10 s at most) and the publish
/// all fall within the request's HTTP_REQUEST_TIMEOUT (15 s by default).
const OWN_FETCH_WAIT: Duration = Duration::from_secs(2);

/// With the map past [`MAX_CERTIFICATE_URLS`], forgets the failures; fetches under way and
/// certificates stay.
fn make_room(fetched: &mut HashMap<String, Fetch>) {
    if fetched.len() >= MAX_CERTIFICATE_URLS {
        fetched.retain(|_, fetch| {
            !matches!(
                fetch.peek(),
                Some(Fetched::Refused(..) | Fetched::Unavailable(..))
            )
        });
    }
}

/// How long a URL that served no certificate (400, 404, 410, or a body that is not one) is
/// refused without fetching it again: each forged request with one such URL fetched it from
/// AWS. Short: a certificate AWS has yet to publish at its URL is refused no longer than that.
const REFUSED_FOR: Duration = Duration::from_secs(60);

/// How long a fetch that failed otherwise (a 5xx, a 403 or 429 of AWS's throttling, the
/// network) is answered 503 without fetching again: SNS retries, and a burst of deliveries
/// waits for one fetch, not one each.
const UNAVAILABLE_FOR: Duration = Duration::from_secs(5);

/// What a fetch of a certificate URL gave.
#[derive(Clone)]
enum Fetched {
    Certificate(Arc<[u8]>),
    Refused(&'static str, Instant),
    Unavailable(String, Instant),
}

impl Fetched {
    fn new(fetch: Result<Vec<u8>, WebhookError>, now: Instant) -> Self {
        match fetch {
            Ok(der) => Self::Certificate(der.into()),
            Err(WebhookError::Unauthorized(why)) => Self::Refused(why, now + REFUSED_FOR),
            Err(error) => Self::Unavailable(error.to_string(), now + UNAVAILABLE_FOR),
        }
    }

    /// A failure remembered for long enough: the next request fetches again.
    fn expired(&self, now: Instant) -> bool {
        match self {
            Self::Certificate(_) => false,
            Self::Refused(_, until) | Self::Unavailable(_, until) => now >= *until,
        }
    }

    fn answer(&self) -> Result<Arc<[u8]>, WebhookError> {
        match self {
            Self::Certificate(der) => Ok(der.clone()),
            Self::Refused(why, _) => Err(WebhookError::Unauthorized(why)),
            Self::Unavailable(why, _) => Err(WebhookError::Unavailable(why.clone())),
        }
    }
}

/// A fetch of a certificate URL, on a task of its own (a request that stops waiting does not
/// stop it), awaited by every request with that URL; or the outcome of a request's own fetch.
type Fetch = futures_util::future::Shared<futures_util::future::BoxFuture<'static, Fetched>>;

/// Verifies SNS signatures and answers subscription handshakes.
pub struct SnsVerifier {
    /// The certificate pinned by `WEBHOOK_SNS_CERT` (DER); used instead of `SigningCertURL`.
    pinned: Option<Arc<[u8]>>,
    /// Fetches of certificates, by URL: under way (later requests wait for it), done, or
    /// failed a short while ago.
    fetched: Mutex<HashMap<String, Fetch>>,
    /// Permits for requests' own fetches ([`MAX_OWN_FETCHES`]).
    own_fetches: tokio::sync::Semaphore,
    client: reqwest::Client,
    /// Hosts besides `sns.*.amazonaws.com` whose `SubscribeURL` may be GET (tests).
    pub extra_confirm_hosts: Vec<String>,
}

/// The DER of the pinned SNS certificate in the PEM file `WEBHOOK_SNS_CERT` names.
pub fn pinned_cert(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading WEBHOOK_SNS_CERT {}", path.display()))?;
    pem_to_der(&pem)
        .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", path.display()))
}

impl SnsVerifier {
    pub fn from_settings(settings: &WebhookArgs) -> anyhow::Result<Self> {
        Self::new(settings.sns_cert.as_deref().map(pinned_cert).transpose()?)
    }

    pub fn new(pinned: Option<Vec<u8>>) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            pinned: pinned.map(Arc::from),
            fetched: Mutex::new(HashMap::new()),
            own_fetches: tokio::sync::Semaphore::new(MAX_OWN_FETCHES),
            client,
            extra_confirm_hosts: Vec::new(),
        })
    }

    async fn certificate(&self, url: &str, topic_arn: &str) -> Result<Arc<[u8]>, WebhookError> {
        if let Some(pinned) = &self.pinned {
            return Ok(pinned.clone());
        }
        if !is_certificate_url(url) || !on_region_host(url, topic_arn) {
            return Err(WebhookError::Unauthorized(
                "SigningCertURL is not an SNS certificate URL",
            ));
        }
        let fetch = {
            let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            match fetched.get(url) {
                Some(fetch) if !fetch.peek().is_some_and(|done| done.expired(now)) => {
                    Some(fetch.clone())
                }
                _ => {
                    fetched.remove(url);
                    make_room(&mut fetched);
                    let under_way = fetched.values().filter(|f| f.peek().is_none()).count();
                    if fetched.len() >= MAX_CERTIFICATE_URLS || under_way >= MAX_FETCHES {
                        None
                    } else {
                        let fetch = self.start_fetch(url);
                        fetched.insert(url.to_string(), fetch.clone());
                        Some(fetch)
                    }
                }
            }
        };
        if let Some(fetch) = fetch {
            return fetch.await.answer();
        }
        let Ok(Ok(_fetching)) =
            tokio::time::timeout(OWN_FETCH_WAIT, self.own_fetches.acquire()).await
        else {
            return Err(WebhookError::Unavailable(
                "too many SNS certificate fetches under way".into(),
            ));
        };
        // Another request's fetch may have ended while this one waited (a burst of deliveries
        // with one new URL, or of forged requests with one missing name): its outcome serves.
        let known = {
            let fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            fetched
                .get(url)
                .filter(|fetch| fetch.peek().is_some_and(|done| !done.expired(now)))
                .cloned()
        };
        if let Some(known) = known {
            return known.await.answer();
        }
        let done = Fetched::new(
            fetch_certificate(self.client.clone(), url.to_string()).await,
            Instant::now(),
        );
        self.remember(url, &done);
        done.answer()
    }

    /// Remembers what a request's own fetch of `url` gave, unless a shared fetch of it is under
    /// way, a certificate is kept for it, or no room is left once the failures are forgotten.
    fn remember(&self, url: &str, done: &Fetched) {
        let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        if fetched
            .get(url)
            .is_some_and(|fetch| matches!(fetch.peek(), None | Some(Fetched::Certificate(_))))
        {
            return;
        }
        fetched.remove(url);
        make_room(&mut fetched);
        if fetched.len() < MAX_CERTIFICATE_URLS {
            let done = futures_util::future::ready(done.clone()).boxed().shared();
            // Polled once, so that `peek` sees it done.
            let _ = done.clone().now_or_never();
            fetched.insert(url.to_string(), done);
        }
    }

    /// Starts fetching the certificate at `url`, an SNS certificate URL. The fetch is driven to
    /// its end by a task of its own, so its outcome is there to `Shared::peek` (expiry,
    /// eviction) once it ends, even when every request that waited for it is gone.
    fn start_fetch(&self, url: &str) -> Fetch {
        let fetch = tokio::spawn(fetch_certificate(self.client.clone(), url.to_string()));
        let fetch = async move {
            let fetched = fetch
                .await
                .unwrap_or_else(|e| Err(WebhookError::Unavailable(e.to_string())));
            Fetched::new(fetched, Instant::now())
        }
        .boxed()
        .shared();
        tokio::spawn(fetch.clone());
        fetch
    }

    /// Verifies the envelope's signature with its certificate. What can be refused without the
    /// certificate is refused first: a forged request fetched one from AWS, each time.
    pub async fn verify(&self, envelope: &Envelope) -> Result<(), WebhookError> {
        let algorithm: &dyn ring::signature::VerificationAlgorithm =
            match envelope.signature_version.as_str() {
                "1" => &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                "2" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                _ => return Err(WebhookError::Unauthorized("unknown SignatureVersion")),
            };
        // The signed string joins `Name\nvalue\n`: a line break in a value other than the
        // Message (which comes first) moves text between fields and keeps the signature valid.
        // A captured notification with a Subject verified again without it and with
        // `MessageId` = "<id>\nSubject\n<subject>", under a new id, so it counted twice.
        // SNS allows none there (a Subject is a line of printable ASCII; ids, times, ARNs,
        // URLs and tokens have none).
        let signed = [
            Some(&envelope.message_id),
            envelope.subject.as_ref(),
            Some(&envelope.timestamp),
            Some(&envelope.topic_arn),
            Some(&envelope.kind),
            envelope.subscribe_url.as_ref(),
            envelope.token.as_ref(),
        ];
        if signed
            .into_iter()
            .flatten()
            .any(|value| value.contains('\n'))
        {
            return Err(WebhookError::Unauthorized(
                "a line break in a signed field other than the Message",
            ));
        }
        let signature = STANDARD
            .decode(envelope.signature.trim())
            .map_err(|_| WebhookError::Unauthorized("bad signature"))?;
        // RSA keys of 2048 to 8192 bits, as the algorithms accept.
        if !(256..=1024).contains(&signature.len()) {
            return Err(WebhookError::Unauthorized("bad signature"));
        }
        let der = self
            .certificate(&envelope.signing_cert_url, &envelope.topic_arn)
            .await?;
        let certificate = Certificate::from_der(&der)
            .map_err(|_| WebhookError::Unauthorized("unreadable SNS certificate"))?;
        // A certificate past its validity vouches for nothing, fetched or pinned (AWS signs
        // with a new one, at a new URL, before the old one expires).
        let validity = &certificate.tbs_certificate.validity;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if now < validity.not_before.to_unix_duration()
            || now > validity.not_after.to_unix_duration()
        {
            return Err(WebhookError::Unauthorized(
                "the SNS certificate is expired or not yet valid",
            ));
        }
        let key = certificate
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
            .to_vec();
        ring::signature::UnparsedPublicKey::new(algorithm, key)
            .verify(canonical_string(envelope).as_bytes(), &signature)
            .map_err(|_| WebhookError::Unauthorized("bad signature"))
    }

    async fn confirm(&self, url: &str, topic_arn: &str) -> Result<(), WebhookError> {
        let allowed = (is_sns_url(url) && on_region_host(url, topic_arn))
            || url::Url::parse(url).is_ok_and(|u| {
                u.host_str()
                    .is_some_and(|h| self.extra_confirm_hosts.iter().any(|x| x == h))
            });
        if !allowed {
            return Err(WebhookError::BadRequest(
                "SubscribeURL is not an SNS URL; not confirmed".into(),
            ));
        }
        self.client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            // Without the URL: SubscribeURL holds the subscription's token, and this text goes
            // to the log and back to the caller.
            .map_err(|e| {
                WebhookError::Unavailable(format!(
                    "confirming the subscription: {}",
                    e.without_url()
                ))
            })?;
        tracing::info!("SNS subscription confirmed.");
        Ok(())
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, x509_cert::der::Error> {
    use x509_cert::der::Encode;
    Certificate::from_pem(pem.trim().as_bytes())?.to_der()
}

#[cfg(test)]
pub(crate) fn pem_der_for_tests(pem: &str) -> Vec<u8> {
    pem_to_der(pem).expect("a PEM certificate")
}

/// How old a signed SNS message may be: AWS gives up delivering one after an hour at most (the
/// longest HTTP/S delivery policy), so an older one is a replay. Its `MessageId` is remembered
/// for `DEDUP_RETENTION` only (at least this long when SNS is on): replayed later, it counted
/// again.
pub const MAX_MESSAGE_AGE: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// A signed `Timestamp` from `MAX_MESSAGE_AGE` ago to 5 minutes ahead (clock skew).
fn fresh(timestamp: &str, now: std::time::SystemTime) -> Result<(), WebhookError> {
    let signed = humantime::parse_rfc3339(timestamp)
        .map_err(|_| WebhookError::Unauthorized("the Timestamp is not an RFC 3339 time"))?;
    let too_old = now
        .checked_sub(MAX_MESSAGE_AGE)
        .is_some_and(|oldest| signed < oldest);
    let ahead = signed
        .duration_since(now)
        .is_ok_and(|ahead| ahead > std::time::Duration::from_secs(300));
    if too_old || ahead {
        return Err(WebhookError::Unauthorized(
            "the message's Timestamp is stale or ahead (a replay?)",
        ));
    }
    Ok(())
}

/// Verifies and handles one SNS request.
pub async fn handle(
    verifier: &SnsVerifier,
    topics: &[String],
    body: &[u8],
) -> Result<Parsed, WebhookError> {
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| super::bad_json("an SNS message", &e))?;
    if !topics.iter().any(|t| t == &envelope.topic_arn) {
        return Err(WebhookError::Unauthorized("topic not allowed"));
    }
    // Before the signature, whose certificate may have to be fetched.
    fresh(&envelope.timestamp, std::time::SystemTime::now())?;
    verifier.verify(&envelope).await?;
    let message_id = format!("{ID_PREFIX}{}", envelope.message_id);
    match envelope.kind.as_str() {
        "SubscriptionConfirmation" => {
            verifier
                .confirm(
                    envelope.subscribe_url.as_deref().unwrap_or(""),
                    &envelope.topic_arn,
                )
                .await?;
            Ok(Parsed {
                message_id,
                ignored: 1,
                ..Parsed::default()
            })
        }
        "Notification" => parse_ses(&envelope.message, message_id),
        _ => Ok(Parsed {
            message_id,
            ignored: 1,
            ..Parsed::default()
        }),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesNotification {
    #[serde(default)]
    notification_type: Option<String>,
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default)]
    bounce: Option<SesBounce>,
    #[serde(default)]
    delivery: Option<SesDelivery>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesBounce {
    bounce_type: String,
    #[serde(default)]
    bounce_sub_type: Option<String>,
    bounced_recipients: Vec<SesRecipient>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesRecipient {
    email_address: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    diagnostic_code: Option<String>,
}

#[derive(Deserialize)]
struct SesDelivery {
    recipients: Vec<String>,
}

/// Parses the SES notification carried in an SNS `Message`.
pub fn parse_ses(message: &str, message_id: String) -> Result<Parsed, WebhookError> {
    let ses: SesNotification =
        serde_json::from_str(message).map_err(|e| super::bad_json("an SES notification", &e))?;
    let mut parsed = Parsed {
        message_id,
        ..Parsed::default()
    };
    let kind = ses.notification_type.or(ses.event_type).unwrap_or_default();
    match (kind.as_str(), ses.bounce, ses.delivery) {
        ("Delivery", _, Some(delivery)) => {
            for address in &delivery.recipients {
                match event_for(address, EventType::Delivered) {
                    Some(e) => parsed.events.push(e),
                    None => parsed.ignored += 1,
                }
            }
        }
        ("Bounce", Some(bounce), _) => {
            let sub_type = bounce.bounce_sub_type.as_deref().unwrap_or("");
            if matches!(sub_type, "Suppressed" | "OnAccountSuppressionList") {
                parsed.ignored += bounce.bounced_recipients.len();
                return Ok(parsed);
            }
            for recipient in &bounce.bounced_recipients {
                let Some(event) = event_for(&recipient.email_address, EventType::Bounced) else {
                    parsed.ignored += 1;
                    continue;
                };
                let text = recipient.diagnostic_code.as_deref().unwrap_or("").trim();
                let (smtp_code, text_code) = codes_in_text(text);
                let code = recipient
                    .status
                    .as_deref()
                    .and_then(EnhancedCode::parse)
                    .or(text_code);
                // A code that names no cause (`5.0.0`) with no reply or text says less than
                // SES's own sub-type: `Permanent/NoEmail` stays proof.
                let vague = smtp_code.is_none()
                    && text.is_empty()
                    && code.is_some_and(crate::bounce::names_no_cause);
                let evidence = if (code.is_some() || smtp_code.is_some()) && !vague {
                    Evidence {
                        code,
                        smtp_code,
                        diagnostic: (!text.is_empty()).then(|| text.to_string()),
                    }
                } else if bounce.bounce_type == "Permanent" && sub_type == "NoEmail" {
                    // SES: the recipient's server said the address does not exist.
                    Evidence::default()
                } else {
                    Evidence {
                        diagnostic: Some(format!("ses {}/{sub_type}", bounce.bounce_type)),
                        ..Evidence::default()
                    }
                };
                parsed.events.push(event.with_evidence(evidence));
            }
        }
        _ => parsed.ignored += 1,
    }
    Ok(parsed)
}

/// The DER of the certificate at `url`, an SNS certificate URL.
async fn fetch_certificate(client: reqwest::Client, url: String) -> Result<Vec<u8>, WebhookError> {
    let fetch = async {
        let mut response = client.get(&url).send().await?.error_for_status()?;
        // Redirects are not followed: a 3xx is no certificate, and not the URL's fault.
        if !response.status().is_success() {
            return Ok(Err(response.status()));
        }
        let mut pem = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            pem.extend_from_slice(&chunk);
            if pem.len() > MAX_CERTIFICATE_BYTES {
                return Ok(Ok(None));
            }
        }
        Ok(Ok(Some(pem)))
    };
    let pem = fetch
        .await
        .map_err(|e: reqwest::Error| certificate_fetch_error(e.status(), &e))?
        .map_err(|status| {
            WebhookError::Unavailable(format!("fetching the SNS certificate: {status}"))
        })?
        .ok_or(WebhookError::Unauthorized(
            "SigningCertURL serves more than a certificate",
        ))?;
    let pem = String::from_utf8(pem)
        .map_err(|_| WebhookError::Unauthorized("SigningCertURL is not a certificate"))?;
    pem_to_der(&pem).map_err(|_| WebhookError::Unauthorized("SigningCertURL is not a certificate"))
}

/// What a failed fetch of the SigningCertURL certificate answers: no such certificate (400,
/// 404, 410) is the caller's doing (the URL's path is theirs to choose), so the message is
/// refused (401); anything else (a network error, a 5xx, or a 403, 408 or 429 of AWS's
/// throttling) is no word on the certificate, so the sender should retry (503).
fn certificate_fetch_error(
    status: Option<reqwest::StatusCode>,
    error: &dyn std::fmt::Display,
) -> WebhookError {
    match status.map(|status| status.as_u16()) {
        Some(400 | 404 | 410) => {
            WebhookError::Unauthorized("SigningCertURL does not serve a certificate")
        }
        _ => WebhookError::Unavailable(format!("fetching the SNS certificate: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Tally;
    use crate::webhooks::tests::{fixture, sns_envelope, test_cert_der, test_cert_pem};

    /// Requests a [`serve_sns_host`] answered, by path.
    type Requests = Arc<Mutex<HashMap<String, usize>>>;

    /// An HTTPS server on 127.0.0.1 with a certificate for `sns.us-west-2.amazonaws.com` (AWS is
    /// out of reach here), and a verifier (no pinned certificate) whose client reaches it under
    /// that name. It serves the test
    /// certificate at `/SimpleNotificationService-good.pem` once `gate` has a permit, 503 at
    /// `…-down.pem`, 404 elsewhere, and counts the requests by path.
    async fn serve_sns_host(gate: Arc<tokio::sync::Semaphore>) -> (Arc<SnsVerifier>, Requests) {
        use hyper::service::service_fn;
        let host = "sns.us-west-2.amazonaws.com";
        let tls = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![tls.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(tls.signing_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Requests::default();
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, requests, gate) = (acceptor.clone(), counted.clone(), gate.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |request: hyper::Request<_>| {
                        let (requests, gate) = (requests.clone(), gate.clone());
                        async move {
                            let path = request.uri().path().to_string();
                            *requests.lock().unwrap().entry(path.clone()).or_default() += 1;
                            let (status, body) = match path.as_str() {
                                "/SimpleNotificationService-good.pem" => {
                                    drop(gate.acquire().await);
                                    (200, test_cert_pem())
                                }
                                "/SimpleNotificationService-down.pem" => (503, String::new()),
                                "/SimpleNotificationService-now.pem" => (200, test_cert_pem()),
                                held if held.starts_with("/SimpleNotificationService-slow") => {
                                    drop(gate.acquire().await);
                                    (404, String::new())
                                }
                                _ => (404, String::new()),
                            };
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let client = reqwest::Client::builder()
            .resolve(host, address)
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_der(tls.cert.der()).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let mut verifier = SnsVerifier::new(None).unwrap();
        verifier.client = client;
        (Arc::new(verifier), requests)
    }

    /// `body`, an SNS envelope, with its SigningCertURL at `SimpleNotificationService-{name}.pem`.
    fn signed_at(body: &str, name: &str) -> Envelope {
        let mut envelope: serde_json::Value = serde_json::from_str(body).unwrap();
        envelope["SigningCertURL"] =
            format!("https://sns.us-west-2.amazonaws.com/SimpleNotificationService-{name}.pem")
                .into();
        serde_json::from_value(envelope).unwrap()
    }

    /// The requests the server had for `SimpleNotificationService-{name}.pem`.
    fn fetches(requests: &Requests, name: &str) -> usize {
        let path = format!("/SimpleNotificationService-{name}.pem");
        requests.lock().unwrap().get(&path).copied().unwrap_or(0)
    }

    /// With every shared fetch busy (forged requests with new URLs whose answers AWS holds), a
    /// request fetches on its own and what it gets is remembered: it was answered 503, so such
    /// a flood made every certificate not fetched yet fail, AWS's next one included.
    #[tokio::test]
    async fn with_every_shared_fetch_busy_a_request_fetches_on_its_own() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (verifier, requests) = serve_sns_host(gate.clone()).await;
        let body = sns_envelope("Notification", &fixture("ses-delivery.json"), "2");
        let busy: Vec<_> = (0..MAX_FETCHES)
            .map(|i| {
                let (verifier, envelope) =
                    (verifier.clone(), signed_at(&body, &format!("slow{i}")));
                tokio::spawn(async move { verifier.verify(&envelope).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while (0..MAX_FETCHES).any(|i| fetches(&requests, &format!("slow{i}")) == 0) {
            assert!(
                Instant::now() < deadline,
                "the shared fetches did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        verifier
            .verify(&signed_at(&body, "now"))
            .await
            .expect("verified with a certificate fetched on its own");
        verifier
            .verify(&signed_at(&body, "now"))
            .await
            .expect("verified with the certificate remembered");
        assert_eq!(fetches(&requests, "now"), 1);
        let under_way = verifier
            .fetched
            .lock()
            .unwrap()
            .values()
            .filter(|fetch| fetch.peek().is_none())
            .count();
        assert_eq!(under_way, MAX_FETCHES, "every shared fetch is busy");
        // A failure of a request's own fetch is remembered too (each forged request fetched).
        for _ in 0..3 {
            assert!(matches!(
                verifier.verify(&signed_at(&body, "nothere")).await,
                Err(WebhookError::Unauthorized(_))
            ));
        }
        assert_eq!(fetches(&requests, "nothere"), 1);
        // Concurrent requests with one missing name: those that waited for a place use what
        // the first ones' fetches gave (each fetched in turn).
        let burst: Vec<_> = (0..MAX_OWN_FETCHES + 16)
            .map(|_| {
                let (verifier, envelope) = (verifier.clone(), signed_at(&body, "missing"));
                tokio::spawn(async move { verifier.verify(&envelope).await })
            })
            .collect();
        for refused in burst {
            assert!(matches!(
                refused.await.unwrap(),
                Err(WebhookError::Unauthorized(_))
            ));
        }
        assert!(
            fetches(&requests, "missing") <= MAX_OWN_FETCHES,
            "{} fetches for {} requests",
            fetches(&requests, "missing"),
            MAX_OWN_FETCHES + 16
        );
        gate.add_permits(1);
        for refused in busy {
            assert!(matches!(
                refused.await.unwrap(),
                Err(WebhookError::Unauthorized(_))
            ));
        }
    }

    /// Concurrent requests with one SigningCertURL share one fetch of it, and a URL that failed
    /// is not fetched again at once: each request fetched it, so a forger could have the worker
    /// fetch from AWS as often as they liked with one URL.
    #[tokio::test]
    async fn a_certificate_url_is_fetched_once_at_a_time_and_failures_are_remembered() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (verifier, requests) = serve_sns_host(gate.clone()).await;
        let body = sns_envelope("Notification", &fixture("ses-delivery.json"), "2");
        let at = |name: &str| signed_at(&body, name);
        let count = |name: &str| fetches(&requests, name);

        // A request that stops waiting (its client gone) leaves the fetch to end alone: its
        // outcome is kept (it stayed "under way" for ever, never expired nor evicted).
        let gone = {
            let (verifier, envelope) = (verifier.clone(), at("slow"));
            tokio::spawn(async move { verifier.verify(&envelope).await })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while count("slow") == 0 {
            assert!(Instant::now() < deadline, "no fetch of the slow URL");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gone.abort();
        let _ = gone.await;

        let verifying: Vec<_> = (0..8)
            .map(|_| {
                let (verifier, envelope) = (verifier.clone(), at("good"));
                tokio::spawn(async move { verifier.verify(&envelope).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while count("good") == 0 {
            assert!(Instant::now() < deadline, "no fetch of the certificate");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The other seven wait for that fetch rather than send their own (they reached the
        // server within this time when each fetched).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(count("good"), 1, "requests for the certificate under way");
        gate.add_permits(1);
        for verified in verifying {
            verified
                .await
                .unwrap()
                .expect("verified with the fetched certificate");
        }
        verifier.verify(&at("good")).await.expect("verified");
        assert_eq!(count("good"), 1, "the certificate is kept");

        for _ in 0..3 {
            assert!(matches!(
                verifier.verify(&at("nothere")).await,
                Err(WebhookError::Unauthorized(
                    "SigningCertURL does not serve a certificate"
                ))
            ));
            assert!(matches!(
                verifier.verify(&at("down")).await,
                Err(WebhookError::Unavailable(_))
            ));
        }
        assert_eq!(
            (count("nothere"), count("down")),
            (1, 1),
            "failed fetches are remembered"
        );
        let slow = "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-slow.pem";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = verifier.fetched.lock().unwrap()[slow].peek().is_some();
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "the abandoned fetch never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(
            verifier.verify(&at("slow")).await,
            Err(WebhookError::Unauthorized(_))
        ));
        assert_eq!(count("slow"), 1, "the abandoned fetch's outcome is kept");
    }

    fn tallies(name: &str) -> (Vec<(String, Tally)>, usize) {
        let parsed = parse_ses(&fixture(name), "sns:x".into()).expect(name);
        let got = parsed
            .events
            .iter()
            .map(|e| (e.domain.clone(), e.tally()))
            .collect();
        (got, parsed.ignored)
    }

    #[test]
    fn ses_notifications_map_onto_our_counters() {
        let d = |t| ("example.com".to_string(), t);
        assert_eq!(
            tallies("ses-delivery.json"),
            (vec![d(Tally::Delivered), d(Tally::Delivered)], 0)
        );
        assert_eq!(
            tallies("ses-bounce-permanent.json"),
            (vec![d(Tally::Bounced), d(Tally::Bounced)], 0)
        );
        assert_eq!(
            tallies("ses-bounce-transient.json"),
            (vec![d(Tally::OtherBounced)], 0)
        );
        assert_eq!(tallies("ses-bounce-suppressed.json"), (vec![], 1));
        assert_eq!(
            tallies("ses-event-bounce.json"),
            (vec![d(Tally::Bounced)], 0)
        );
        assert_eq!(tallies("ses-complaint.json"), (vec![], 1));
    }

    /// `Permanent/NoEmail` (SES: the address does not exist) with only a code that names no
    /// cause (`5.0.0`, no text) stays proof; it was judged by the code alone, `other_bounced`.
    /// With a text, the text decides.
    #[test]
    fn no_email_with_a_code_that_names_no_cause_is_proof() {
        let mut record: serde_json::Value =
            serde_json::from_str(&fixture("ses-bounce-permanent.json")).expect("fixture");
        record["bounce"]["bounceSubType"] = "NoEmail".into();
        for (diagnostic, want) in [
            (None, Tally::Bounced),
            (Some("smtp; 550 5.0.0 Recipient not found"), Tally::Bounced),
            (
                Some("smtp; 550 5.0.0 Message rejected as spam"),
                Tally::OtherBounced,
            ),
        ] {
            for recipient in record["bounce"]["bouncedRecipients"]
                .as_array_mut()
                .expect("recipients")
            {
                recipient["status"] = "5.0.0".into();
                match diagnostic {
                    Some(text) => recipient["diagnosticCode"] = text.into(),
                    None => {
                        recipient
                            .as_object_mut()
                            .expect("a recipient")
                            .remove("diagnosticCode");
                    }
                }
            }
            let parsed = parse_ses(&record.to_string(), "sns:x".into()).expect("parses");
            let got: Vec<_> = parsed.events.iter().map(|e| e.tally()).collect();
            assert_eq!(got, vec![want, want], "{diagnostic:?}");
        }
    }

    /// A signed notification older than two hours is a replay (AWS retries an hour at most):
    /// its id may have left the dedup table, and it counted again.
    #[test]
    fn stale_or_future_timestamps_are_refused() {
        let now = humantime::parse_rfc3339("2026-12-05T12:00:00Z").unwrap();
        for (timestamp, ok) in [
            ("2026-12-05T11:59:59.719Z", true),
            ("2026-12-05T10:00:01Z", true),
            ("2026-12-05T09:59:59Z", false),
            ("2012-05-02T00:54:06.655Z", false),
            ("2026-12-05T12:04:00Z", true),
            ("2026-12-05T12:06:00Z", false),
            ("yesterday", false),
        ] {
            assert_eq!(fresh(timestamp, now).is_ok(), ok, "{timestamp}");
        }
    }

    #[test]
    fn only_sns_hosts_are_trusted() {
        assert!(is_sns_url(
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"
        ));
        assert!(is_sns_url("https://sns.cn-north-1.amazonaws.com.cn/x.pem"));
        for bad in [
            "http://sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com.evil.example/x.pem",
            "https://evil.example/sns.us-east-1.amazonaws.com/x.pem",
            "https://user@sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com:8443/x.pem",
            "https://s3.amazonaws.com/x.pem",
            "https://sns.s3.amazonaws.com/x.pem",
            "https://sns.a.b.amazonaws.com/x.pem",
            "https://sns.amazonaws.com/x.pem",
            "https://sns..amazonaws.com/x.pem",
            "not a url",
        ] {
            assert!(!is_sns_url(bad), "{bad}");
        }
    }

    /// The host must be the SNS host of the topic's region: S3 hosts of the same shape (the
    /// bucket `sns` under S3's certificates) and other regions are refused.
    #[test]
    fn certificates_come_from_the_topic_s_region() {
        let topic = "arn:aws:sns:us-west-2:123456789012:MyTopic";
        let path = "/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem";
        assert!(on_region_host(
            &format!("https://sns.us-west-2.amazonaws.com{path}"),
            topic
        ));
        for host in [
            "sns.s3-accelerate.amazonaws.com",
            "sns.s3-us-west-2.amazonaws.com",
            "sns.s3-external-1.amazonaws.com",
            "sns.us-east-1.amazonaws.com",
        ] {
            assert!(
                is_sns_url(&format!("https://{host}{path}")),
                "{host}: the shape passes"
            );
            assert!(
                !on_region_host(&format!("https://{host}{path}"), topic),
                "{host}"
            );
        }
        assert_eq!(
            region_host("arn:aws-cn:sns:cn-north-1:1:T").as_deref(),
            Some("sns.cn-north-1.amazonaws.com.cn")
        );
        assert_eq!(region_host("not an arn"), None);
        assert!(!on_region_host(
            "https://sns.x.amazonaws.com/a.pem",
            "not an arn"
        ));
    }

    #[test]
    fn only_certificate_urls_are_fetched() {
        let good = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-a86cb10b4e1f29c941702d737128f7b6.pem";
        assert!(is_certificate_url(good));
        for bad in [
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem?n=1.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem#1.pem",
            "https://sns.us-east-1.amazonaws.com/other.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x/y.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.txt",
            "https://sns.s3.amazonaws.com/SimpleNotificationService-x.pem",
            // Other spellings of one URL: each was a fetch and a cache entry of its own.
            "https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-x.pem",
            "https://sns.us-east-1.amazonaws.com/y/../SimpleNotificationService-x.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-\tx.pem",
            "https://SNS.us-east-1.amazonaws.com/SimpleNotificationService-x.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-%78.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-.pem",
            &format!(
                "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-{}.pem",
                "a".repeat(256)
            ),
        ] {
            assert!(!is_certificate_url(bad), "{bad}");
        }
    }

    /// A certificate outside its validity is refused, whatever it signed: it was trusted for
    /// ever once fetched (and pinned ones too). The same key, certified for a day in 2020 and
    /// for a day in 2100, signs a message that the current certificate verifies.
    #[tokio::test]
    async fn a_certificate_outside_its_validity_is_refused() {
        let topics = vec!["arn:aws:sns:us-west-2:123456789012:MyTopic".to_string()];
        let body = sns_envelope("Notification", &fixture("ses-delivery.json"), "2");
        let current = SnsVerifier::new(Some(test_cert_der())).unwrap();
        handle(&current, &topics, body.as_bytes())
            .await
            .expect("the current certificate verifies");
        let key = {
            use base64::Engine;
            let pem = crate::webhooks::tests::test_key_pem();
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("a PEM key");
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
                &rustls::pki_types::PrivatePkcs8KeyDer::from(der),
                &rcgen::PKCS_RSA_SHA256,
            )
            .expect("the test key (PKCS #8)")
        };
        for (from, until) in [
            (
                rcgen::date_time_ymd(2020, 1, 1),
                rcgen::date_time_ymd(2020, 1, 2),
            ),
            (
                rcgen::date_time_ymd(2100, 1, 1),
                rcgen::date_time_ymd(2100, 1, 2),
            ),
        ] {
            let mut params =
                rcgen::CertificateParams::new(vec!["sns.us-west-2.amazonaws.com".into()]).unwrap();
            (params.not_before, params.not_after) = (from, until);
            let certificate = params.self_signed(&key).expect("a certificate");
            let verifier = SnsVerifier::new(Some(certificate.der().to_vec())).unwrap();
            let refused = handle(&verifier, &topics, body.as_bytes()).await;
            assert!(
                matches!(
                    refused,
                    Err(WebhookError::Unauthorized(
                        "the SNS certificate is expired or not yet valid"
                    ))
                ),
                "valid from {from} until {until}: {refused:?}"
            );
        }
    }

    #[tokio::test]
    async fn signatures_v1_and_v2_verify_and_forgeries_do_not() {
        let verifier = SnsVerifier::new(Some(test_cert_der())).unwrap();
        let topics = vec!["arn:aws:sns:us-west-2:123456789012:MyTopic".to_string()];
        for version in ["1", "2"] {
            let body = sns_envelope(
                "Notification",
                &fixture("ses-bounce-permanent.json"),
                version,
            );
            let parsed = handle(&verifier, &topics, body.as_bytes())
                .await
                .expect(version);
            assert_eq!(parsed.events.len(), 2, "v{version}");
            let mut forged: serde_json::Value = serde_json::from_str(&body).unwrap();
            forged["Message"] = fixture("ses-delivery.json").into();
            let refused = handle(&verifier, &topics, forged.to_string().as_bytes()).await;
            assert!(
                matches!(refused, Err(WebhookError::Unauthorized("bad signature"))),
                "v{version}"
            );
        }
        let body = sns_envelope("Notification", &fixture("ses-delivery.json"), "2");
        let other_topic = handle(
            &verifier,
            &["arn:aws:sns:us-west-2:1:Other".to_string()],
            body.as_bytes(),
        )
        .await;
        assert!(matches!(
            other_topic,
            Err(WebhookError::Unauthorized("topic not allowed"))
        ));
        // A line break moved between signed fields keeps the signed string, and so the
        // signature: refused (it verified, under a new id).
        let mut shifted: serde_json::Value = serde_json::from_str(&body).unwrap();
        let subject = shifted["Subject"]
            .as_str()
            .expect("the fixture has a Subject")
            .to_string();
        let id = shifted["MessageId"].as_str().unwrap().to_string();
        shifted.as_object_mut().unwrap().remove("Subject");
        shifted["MessageId"] = format!("{id}\nSubject\n{subject}").into();
        let envelope: Envelope = serde_json::from_value(shifted.clone()).unwrap();
        let original: Envelope = serde_json::from_str(&body).unwrap();
        assert_eq!(canonical_string(&envelope), canonical_string(&original));
        assert!(matches!(
            handle(&verifier, &topics, shifted.to_string().as_bytes()).await,
            Err(WebhookError::Unauthorized(
                "a line break in a signed field other than the Message"
            ))
        ));
        // Without a pinned certificate, a signature that cannot be one is refused before any
        // fetch of the certificate (each forged request fetched it: 503 with no network here).
        let unpinned = SnsVerifier::new(None).unwrap();
        let mut junk: serde_json::Value = serde_json::from_str(&body).unwrap();
        junk["SigningCertURL"] =
            "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-nothere.pem".into();
        for signature in ["!!", "AAAA"] {
            junk["Signature"] = signature.into();
            let envelope: Envelope = serde_json::from_value(junk.clone()).unwrap();
            assert!(matches!(
                unpinned.verify(&envelope).await,
                Err(WebhookError::Unauthorized("bad signature"))
            ));
        }
        // Without a pinned certificate, a certificate URL off SNS is refused before any fetch.
        let unpinned = SnsVerifier::new(None).unwrap();
        let mut elsewhere: serde_json::Value = serde_json::from_str(&body).unwrap();
        elsewhere["SigningCertURL"] = "https://evil.example/cert.pem".into();
        let envelope: Envelope = serde_json::from_value(elsewhere).unwrap();
        assert!(matches!(
            unpinned.verify(&envelope).await,
            Err(WebhookError::Unauthorized(_))
        ));
    }

    /// No certificate at the URL (a path the caller chose: 400, 404, 410) is refused, 401; a
    /// network error, a 5xx or AWS's throttling (403, 408, 429) stays 503, for the sender to
    /// retry (a 4xx was refused, and SNS does not retry a 4xx: the notification was lost).
    #[test]
    fn a_missing_certificate_is_refused_other_failures_are_unavailable() {
        use axum::http::StatusCode;
        let answer = |status: Option<u16>| {
            certificate_fetch_error(
                status.map(|s| reqwest::StatusCode::from_u16(s).unwrap()),
                &"failed",
            )
        };
        for status in [400, 404, 410] {
            let error = answer(Some(status));
            assert!(
                matches!(error, WebhookError::Unauthorized(_)),
                "{status}: {error:?}"
            );
            assert_eq!(
                (error.status(), error.outcome()),
                (StatusCode::UNAUTHORIZED, "refused")
            );
        }
        for status in [Some(403), Some(408), Some(429), Some(500), Some(503), None] {
            let error = answer(status);
            assert!(
                matches!(error, WebhookError::Unavailable(_)),
                "{status:?}: {error:?}"
            );
            assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}
