//! Mailgun webhooks (v3 JSON): `{"signature": {timestamp, token, signature}, "event-data": {…}}`.
//!
//! The signature is the hex HMAC-SHA256 of `timestamp + token` under the webhook signing key.
//! A request is refused (401) when it does not verify, its timestamp is more than
//! [`MAX_CLOCK_SKEW`] from now, or its token was already used (a replay).
//!
//! Events: `delivered` → delivered; `failed` with `severity: permanent` → bounced, with
//! `delivery-status` (`code`, `enhanced-code`, `message`/`description`) as evidence. A
//! `failed` that Mailgun did not attempt (`reason` `suppress-*`: the address is on a
//! suppression list) and a temporary failure (Mailgun retries) are ignored, like every other
//! event (`opened`, `clicked`, `complained`, `unsubscribed`, `accepted`…).

/// How this provider's message ids begin (see [`super::ID_PREFIXES`]).
pub const ID_PREFIX: &str = "mailgun:";

use super::{MAX_CLOCK_SKEW, Parsed, ReplayCache, WebhookError, event_for};
use crate::bounce::{EnhancedCode, codes_in_text};
use crate::event::{EventType, Evidence};
use serde::Deserialize;

#[derive(Deserialize)]
struct Body {
    signature: Signature,
    #[serde(rename = "event-data")]
    event_data: EventData,
}

#[derive(Deserialize)]
struct Signature {
    timestamp: String,
    token: String,
    signature: String,
    /// On an event of a subaccount's domain, the same HMAC under the primary account's key
    /// (`signature` is under the subaccount's), so one key verifies every subaccount.
    #[serde(rename = "parent-signature", default)]
    parent_signature: Option<String>,
}

#[derive(Deserialize)]
struct EventData {
    event: String,
    #[serde(default)]
    id: Option<String>,
    /// When the event happened, in Unix seconds (`1521472262.908181`), kept as JSON text: a
    /// number serde_json cannot hold (`1e400`) must not refuse the request.
    #[serde(default)]
    timestamp: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    recipient: Option<String>,
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(rename = "delivery-status", default)]
    delivery_status: Option<DeliveryStatus>,
}

#[derive(Deserialize)]
struct DeliveryStatus {
    /// A number or a string, kept as JSON text: the body is parsed before its signature is
    /// checked, and as a `Value` any JSON an unsigned request put here was built whole (a 1 MiB
    /// array of `{"":0}` is about 100 MB of maps).
    #[serde(default)]
    code: Option<Box<serde_json::value::RawValue>>,
    #[serde(rename = "enhanced-code", default)]
    enhanced_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

/// The signature Mailgun computes: hex HMAC-SHA256(key, timestamp + token).
pub fn sign(key: &str, timestamp: &str, token: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{timestamp}{token}").as_bytes());
    crate::hex::encode(tag.as_ref())
}

/// Verifies and parses one webhook request.
pub fn handle(
    key: &str,
    body: &[u8],
    now: i64,
    replays: &ReplayCache,
) -> Result<Parsed, WebhookError> {
    let body: Body =
        serde_json::from_slice(body).map_err(|e| super::bad_json("a Mailgun webhook", &e))?;
    let signature = &body.signature;
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let signed = format!("{}{}", signature.timestamp, signature.token);
    let verifies = |hex: &str| {
        crate::hex::decode(hex)
            .is_some_and(|given| ring::hmac::verify(&hmac_key, signed.as_bytes(), &given).is_ok())
    };
    // The key configured may be the subaccount's (`signature`) or the primary account's
    // (`parent-signature`): with the primary's, every subaccount's event was refused (401).
    if !verifies(&signature.signature)
        && !signature.parent_signature.as_deref().is_some_and(verifies)
    {
        return Err(WebhookError::Unauthorized("bad signature"));
    }
    let timestamp: i64 = signature
        .timestamp
        .parse()
        .map_err(|_| WebhookError::Unauthorized("bad timestamp"))?;
    if (now - timestamp).unsigned_abs() > MAX_CLOCK_SKEW.as_secs() {
        return Err(WebhookError::Unauthorized("stale timestamp"));
    }
    if !replays.first_use(&signature.token, timestamp, now) {
        return Err(WebhookError::Unauthorized("replayed token"));
    }
    Ok(parse(&body.event_data, &signature.token))
}

/// The signature's token of a Mailgun request body, if it has one.
pub fn token(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<Body>(body)
        .ok()
        .map(|body| body.signature.token)
}

/// The message id an event is published under: its event id with the UTC day it happened
/// (`mailgun:2018-03-19:CPgfbmQMTCKtHW6uIWtuVe`), as Mailgun's ids are unique within a day
/// only, and deduplication keeps ids longer than that. A retry of the same event carries the
/// same id and timestamp, so the same message id. Without an id, the request's token.
fn message_id(data: &EventData, token: &str) -> String {
    let timestamp = data
        .timestamp
        .as_deref()
        .map(serde_json::value::RawValue::get);
    match (data.id.as_deref(), timestamp.and_then(event_day)) {
        (Some(id), Some(day)) => format!("{ID_PREFIX}{day}:{id}"),
        (Some(id), None) => format!("{ID_PREFIX}{id}"),
        (None, _) => format!("{ID_PREFIX}{token}"),
    }
}

/// The UTC day (`2018-03-19`) of a Unix time in seconds, written as a JSON number or string.
fn event_day(json: &str) -> Option<String> {
    let text = match serde_json::from_str::<String>(json) {
        Ok(text) => text,
        Err(_) => json.to_string(),
    };
    let seconds: f64 = text.trim().parse().ok()?;
    // Up to the end of year 9999, which RFC 3339 can write.
    if !(0.0..253_402_300_800.0).contains(&seconds) {
        return None;
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds as u64);
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.get(..10).map(str::to_string)
}

fn parse(data: &EventData, token: &str) -> Parsed {
    let message_id = message_id(data, token);
    let ignored = || Parsed {
        events: Vec::new(),
        message_id: message_id.clone(),
        ignored: 1,
        ..Parsed::default()
    };
    let recipient = data.recipient.as_deref().unwrap_or_default();
    let event = match data.event.as_str() {
        "delivered" => event_for(recipient, EventType::Delivered),
        "failed"
            if data.severity.as_deref() == Some("permanent")
                && !data.reason.as_deref().unwrap_or("").starts_with("suppress") =>
        {
            event_for(recipient, EventType::Bounced).map(|e| e.with_evidence(evidence(data)))
        }
        _ => None,
    };
    match event {
        Some(event) => Parsed {
            events: vec![event],
            message_id,
            ignored: 0,
            ..Parsed::default()
        },
        None => ignored(),
    }
}

fn evidence(data: &EventData) -> Evidence {
    let Some(status) = &data.delivery_status else {
        return Evidence {
            diagnostic: Some(format!(
                "mailgun failed: {}",
                data.reason.as_deref().unwrap_or("?")
            )),
            ..Evidence::default()
        };
    };
    let text = status
        .message
        .as_deref()
        .filter(|m| !m.trim().is_empty())
        .or(status.description.as_deref())
        .unwrap_or("")
        .trim();
    let (text_smtp, text_code) = codes_in_text(text);
    let smtp_code = status
        .code
        .as_deref()
        .map(serde_json::value::RawValue::get)
        .and_then(|c| {
            serde_json::from_str::<u64>(c)
                .ok()
                .or_else(|| serde_json::from_str::<String>(c).ok()?.trim().parse().ok())
        })
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (200..600).contains(c))
        .or(text_smtp);
    let code = status
        .enhanced_code
        .as_deref()
        .and_then(EnhancedCode::parse)
        .or(text_code);
    Evidence {
        code,
        smtp_code,
        diagnostic: Some(if text.is_empty() {
            format!("mailgun failed: {}", data.reason.as_deref().unwrap_or("?"))
        } else {
            text.to_string()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Tally;

    /// `delivery-status.code` is read as a number or a numeric string; any other JSON there is
    /// no code (and stays text: it was built as a `Value` before the signature was checked).
    #[test]
    fn a_delivery_code_is_a_number_or_a_numeric_string() {
        let code = |code: &str| {
            let data: EventData = serde_json::from_str(&format!(
                r#"{{"event":"failed","delivery-status":{{"code":{code},"message":"no"}}}}"#
            ))
            .unwrap();
            evidence(&data).smtp_code
        };
        assert_eq!(code("550"), Some(550));
        assert_eq!(code(r#"" 550""#), Some(550));
        assert_eq!(code("605"), None);
        let junk = format!("[{}]", vec![r#"{"":0}"#; 10_000].join(","));
        for other in [r#""x""#, "null", "5.5", junk.as_str()] {
            assert_eq!(code(other), None, "{other}");
        }
        // Kept as the request's text, not built.
        let status: DeliveryStatus = serde_json::from_str(r#"{"code":[1, {"a":2}]}"#).unwrap();
        assert_eq!(status.code.unwrap().get(), r#"[1, {"a":2}]"#);
    }

    const KEY: &str = "key-test-signing-0123456789abcdef";

    /// A fixture with a fresh signature (tests sign with their own key).
    fn signed(name: &str, token: &str, timestamp: i64) -> Vec<u8> {
        let mut body: serde_json::Value =
            serde_json::from_str(&crate::webhooks::tests::fixture(name)).expect("fixture");
        let ts = timestamp.to_string();
        body["signature"] = serde_json::json!({
            "timestamp": ts, "token": token, "signature": sign(KEY, &ts, token)
        });
        serde_json::to_vec(&body).expect("json")
    }

    fn run(name: &str, token: &str) -> Result<Parsed, WebhookError> {
        let now = 1_700_000_000;
        handle(
            KEY,
            &signed(name, token, now - 10),
            now,
            &ReplayCache::default(),
        )
    }

    fn tallies(parsed: &Parsed) -> Vec<(String, Tally)> {
        parsed
            .events
            .iter()
            .map(|e| (e.domain.clone(), e.tally()))
            .collect()
    }

    #[test]
    fn payloads_map_onto_our_counters() {
        let cases = [
            ("mailgun-delivered.json", Some(Tally::Delivered)),
            ("mailgun-failed-permanent.json", Some(Tally::Bounced)),
            (
                "mailgun-failed-mailbox-full.json",
                Some(Tally::OtherBounced),
            ),
            ("mailgun-failed-temporary.json", None),
            ("mailgun-failed-suppressed.json", None),
            ("mailgun-complained.json", None),
        ];
        for (i, (name, want)) in cases.into_iter().enumerate() {
            let parsed = run(name, &format!("token{i}")).unwrap_or_else(|e| panic!("{name}: {e}"));
            match want {
                Some(tally) => assert_eq!(
                    tallies(&parsed),
                    vec![("example.com".to_string(), tally)],
                    "{name}"
                ),
                None => assert_eq!((parsed.events.len(), parsed.ignored), (0, 1), "{name}"),
            }
            assert!(parsed.message_id.starts_with("mailgun:"), "{name}");
        }
    }

    /// Mailgun's event ids are unique within a day only: the same id on another day is another
    /// event (published under another message id, so not dropped as a duplicate), and a retry
    /// of one event (a new token, the same event data) is the same message.
    #[test]
    fn an_event_id_is_read_with_the_day_of_its_event() {
        let now = 1_700_000_000;
        let replays = ReplayCache::default();
        let body = |token: &str, event_time: serde_json::Value| {
            let mut body: serde_json::Value =
                serde_json::from_slice(&signed("mailgun-delivered.json", token, now)).unwrap();
            body["event-data"]["timestamp"] = event_time;
            serde_json::to_vec(&body).unwrap()
        };
        let id = |token: &str, event_time: serde_json::Value| {
            handle(KEY, &body(token, event_time), now, &replays)
                .unwrap_or_else(|e| panic!("{token}: {e}"))
                .message_id
        };
        let monday = id("t1", serde_json::json!(1_521_472_262.908_181));
        assert_eq!(monday, "mailgun:2018-03-19:CPgfbmQMTCKtHW6uIWtuVe");
        assert_eq!(id("t2", serde_json::json!(1_521_472_262.908_181)), monday);
        assert_eq!(id("t3", serde_json::json!("1521472262.908181")), monday);
        let tuesday = id("t4", serde_json::json!(1_521_472_262.908_181 + 86_400.0));
        assert_eq!(tuesday, "mailgun:2018-03-20:CPgfbmQMTCKtHW6uIWtuVe");
        // No usable timestamp: the id alone, as before.
        for (token, odd) in [
            ("t5", serde_json::json!(null)),
            ("t6", serde_json::json!(-1)),
            ("t7", serde_json::json!("soon")),
            ("t8", serde_json::json!({"s": 1})),
            ("t9", serde_json::json!("NaN")),
        ] {
            assert_eq!(id(token, odd), "mailgun:CPgfbmQMTCKtHW6uIWtuVe", "{token}");
        }
        // A number serde_json cannot hold is not a reason to refuse the event.
        let text = String::from_utf8(body("t10", serde_json::json!("x"))).unwrap();
        let huge = text.replace(r#""timestamp":"x""#, r#""timestamp":1e400"#);
        assert_ne!(huge, text);
        let parsed = handle(KEY, huge.as_bytes(), now, &replays).expect("1e400");
        assert_eq!(parsed.message_id, "mailgun:CPgfbmQMTCKtHW6uIWtuVe");
    }

    /// An event of a subaccount's domain is signed twice: `signature` under the subaccount's
    /// key, `parent-signature` under the primary account's. Either key verifies it (with the
    /// primary's, it was refused: 401 "bad signature"); a forged parent signature does not.
    #[test]
    fn a_subaccount_event_verifies_with_the_primary_accounts_key() {
        let now = 1_700_000_000;
        let replays = ReplayCache::default();
        let body = |token: &str, parent: &str| {
            let mut body: serde_json::Value =
                serde_json::from_slice(&signed("mailgun-delivered.json", token, now)).unwrap();
            let ts = now.to_string();
            body["signature"]["signature"] = sign("subaccount-key", &ts, token).into();
            body["signature"]["parent-signature"] = sign(parent, &ts, token).into();
            serde_json::to_vec(&body).unwrap()
        };
        let parsed = handle(KEY, &body("t1", KEY), now, &replays).expect("the primary's key");
        assert_eq!(
            tallies(&parsed),
            vec![("example.com".to_string(), Tally::Delivered)]
        );
        let parsed = handle("subaccount-key", &body("t2", KEY), now, &replays)
            .expect("the subaccount's key");
        assert_eq!(parsed.events.len(), 1);
        assert!(matches!(
            handle(KEY, &body("t3", "another-key"), now, &replays),
            Err(WebhookError::Unauthorized("bad signature"))
        ));
    }

    #[test]
    fn forged_stale_and_replayed_requests_are_refused() {
        let now = 1_700_000_000;
        let replays = ReplayCache::default();
        let good = signed("mailgun-delivered.json", "tok", now);
        assert!(handle(KEY, &good, now, &replays).is_ok());
        assert!(matches!(
            handle(KEY, &good, now, &replays),
            Err(WebhookError::Unauthorized("replayed token"))
        ));
        let other_key = handle(
            "another-key",
            &signed("mailgun-delivered.json", "t2", now),
            now,
            &replays,
        );
        assert!(matches!(
            other_key,
            Err(WebhookError::Unauthorized("bad signature"))
        ));
        let stale = signed("mailgun-delivered.json", "t3", now - 3600);
        assert!(matches!(
            handle(KEY, &stale, now, &replays),
            Err(WebhookError::Unauthorized("stale timestamp"))
        ));
        let mut tampered: serde_json::Value =
            serde_json::from_slice(&signed("mailgun-delivered.json", "t4", now)).unwrap();
        tampered["signature"]["token"] = "t5".into();
        assert!(matches!(
            handle(KEY, &serde_json::to_vec(&tampered).unwrap(), now, &replays),
            Err(WebhookError::Unauthorized(_))
        ));
        assert!(matches!(
            handle(KEY, b"not json", now, &replays),
            Err(WebhookError::BadRequest(_))
        ));
    }
}
