//! Postmark's delivery and bounce webhooks, protected by the basic auth in the webhook URL
//! (`https://user:password@host/webhooks/postmark`; Postmark does not sign its webhooks).
//!
//! `RecordType` `Delivery` → delivered. `Bounce`: evidence from `Details` when it carries SMTP
//! codes (`smtp;550 5.1.1 …`); otherwise a `HardBounce` (Postmark: "unknown user, mailbox not
//! found") counts as proof, and every other bounce type (`SoftBounce`, `Transient`,
//! `SpamNotification`, `Blocked`, `DnsError`, `AutoResponder`…) is counted apart. Opens,
//! clicks, spam complaints and subscription changes are ignored.

/// How this provider's message ids begin (see [`super::ID_PREFIXES`]).
pub const ID_PREFIX: &str = "postmark:";

use super::{Parsed, WebhookError, event_for};
use crate::bounce::codes_in_text;
use crate::event::{EventType, Evidence};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Record {
    record_type: String,
    #[serde(default, rename = "ID")]
    id: Option<serde_json::Value>,
    #[serde(default, rename = "MessageID")]
    message_id: Option<String>,
    #[serde(default)]
    recipient: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default, rename = "Type")]
    bounce_type: Option<String>,
    #[serde(default)]
    details: Option<String>,
}

/// Checks `Authorization: Basic …` against the configured `user:password`, in constant time.
pub fn check_auth(configured: &str, given: Option<&str>) -> Result<(), WebhookError> {
    let given = given
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b64| STANDARD.decode(b64.trim()).ok())
        .ok_or(WebhookError::Unauthorized("basic auth required"))?;
    let expected = ring::digest::digest(&ring::digest::SHA256, configured.as_bytes());
    let given = ring::digest::digest(&ring::digest::SHA256, &given);
    // Equal-length digests compared without an early exit.
    let differ = expected
        .as_ref()
        .iter()
        .zip(given.as_ref())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if differ == 0 {
        Ok(())
    } else {
        Err(WebhookError::Unauthorized("wrong credentials"))
    }
}

/// Parses one (authenticated) webhook record.
pub fn parse(body: &[u8]) -> Result<Parsed, WebhookError> {
    let record: Record =
        serde_json::from_slice(body).map_err(|e| super::bad_json("a Postmark webhook", &e))?;
    // A record without an `ID` (a delivery) is one message's to one recipient: a message to
    // several recipients has one delivery record each, under one `MessageID`.
    let recipient = record.recipient.as_deref().or(record.email.as_deref());
    let id = record
        .id
        .as_ref()
        .map(|v| v.to_string())
        .or_else(|| {
            let message = record.message_id.as_deref()?;
            Some(format!(
                "{message}:{}",
                recipient.unwrap_or_default().to_lowercase()
            ))
        })
        .unwrap_or_else(|| super::sha256_hex(body));
    let message_id = format!("{ID_PREFIX}{}:{id}", record.record_type);
    let event = match record.record_type.as_str() {
        "Delivery" => event_for(
            record.recipient.as_deref().unwrap_or_default(),
            EventType::Delivered,
        ),
        "Bounce" => {
            let address = record.email.as_deref().unwrap_or_default();
            event_for(address, EventType::Bounced).map(|e| e.with_evidence(evidence(&record)))
        }
        _ => None,
    };
    Ok(match event {
        Some(event) => Parsed {
            events: vec![event],
            message_id,
            ignored: 0,
            ..Parsed::default()
        },
        None => Parsed {
            events: Vec::new(),
            message_id,
            ignored: 1,
            ..Parsed::default()
        },
    })
}

fn evidence(record: &Record) -> Evidence {
    let details = record.details.as_deref().unwrap_or("").trim();
    let (smtp_code, code) = codes_in_text(details);
    if smtp_code.is_some() || code.is_some() {
        return Evidence {
            code,
            smtp_code,
            diagnostic: Some(details.to_string()),
        };
    }
    match record.bounce_type.as_deref() {
        // Postmark's own verdict: the address does not exist. No evidence = proof.
        Some("HardBounce") => Evidence::default(),
        other => Evidence {
            diagnostic: Some(format!("postmark {}: {details}", other.unwrap_or("bounce"))),
            ..Evidence::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Tally;

    #[test]
    fn records_map_onto_our_counters() {
        let cases = [
            ("postmark-delivery.json", Some(Tally::Delivered)),
            ("postmark-hard-bounce.json", Some(Tally::Bounced)),
            ("postmark-soft-bounce.json", Some(Tally::OtherBounced)),
            ("postmark-spam-complaint.json", None),
            ("postmark-open.json", None),
        ];
        for (name, want) in cases {
            let parsed = parse(crate::webhooks::tests::fixture(name).as_bytes()).expect(name);
            let got: Vec<_> = parsed
                .events
                .iter()
                .map(|e| (e.domain.as_str(), e.tally()))
                .collect();
            match want {
                Some(tally) => assert_eq!(got, vec![("example.com", tally)], "{name}"),
                None => assert_eq!((got.len(), parsed.ignored), (0, 1), "{name}"),
            }
        }
    }

    /// One message to two recipients has a delivery record for each: both count. They shared
    /// one id (`MessageID`), so the second was skipped as a duplicate.
    #[test]
    fn deliveries_to_each_recipient_of_a_message_have_ids_of_their_own() {
        let fixture = crate::webhooks::tests::fixture("postmark-delivery.json");
        let mut record: serde_json::Value = serde_json::from_str(&fixture).expect("fixture");
        let mut ids = Vec::new();
        for recipient in ["a@example.com", "b@example.net", "A@Example.com"] {
            record["Recipient"] = recipient.into();
            let parsed = parse(record.to_string().as_bytes()).expect(recipient);
            assert_eq!(parsed.events.len(), 1, "{recipient}");
            ids.push(parsed.message_id);
        }
        assert_ne!(ids[0], ids[1], "two recipients, two ids");
        assert_eq!(ids[0], ids[2], "one recipient however spelled, one id");
    }

    #[test]
    fn basic_auth_is_checked() {
        let header = format!("Basic {}", STANDARD.encode("hook:s3cret"));
        assert!(check_auth("hook:s3cret", Some(&header)).is_ok());
        let wrong = format!("Basic {}", STANDARD.encode("hook:guess"));
        for given in [
            None,
            Some("Bearer x"),
            Some(wrong.as_str()),
            Some("Basic !!"),
        ] {
            assert!(
                matches!(
                    check_auth("hook:s3cret", given),
                    Err(WebhookError::Unauthorized(_))
                ),
                "{given:?}"
            );
        }
    }
}
