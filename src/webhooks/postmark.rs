//! Postmark's delivery and bounce webhooks, protected by the basic auth in the webhook URL
//! (`https://user:password@host/webhooks/postmark`; Postmark does not sign its webhooks).
//!
//! `RecordType` `Delivery` → delivered. `Bounce`: evidence from `Details` when it carries SMTP
//! codes, at its start (`smtp;550 5.1.1 …`) or in a delivery report's `Status:` and
//! `Diagnostic-Code:` lines; otherwise a `HardBounce` (Postmark: "unknown user, mailbox not
//! found") counts as proof, and every other bounce type (`SoftBounce`, `Transient`,
//! `SpamNotification`, `Blocked`, `DnsError`…) is counted apart. Bounce records that are not a
//! message bounced by the recipient's server ([`NOT_BOUNCES`]: an auto-responder, a
//! subscription change, an address deactivated by hand…), opens, clicks and spam complaints are
//! ignored.

/// How this provider's message ids begin (see [`super::ID_PREFIXES`]).
pub const ID_PREFIX: &str = "postmark:";

use super::{Parsed, WebhookError, event_for};
use crate::bounce::{EnhancedCode, codes_in_text};
use crate::event::{EventType, Evidence};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

/// Postmark bounce types that are not a message bounced by the recipient's server: a reply
/// (the mailbox exists), a subscription or address change, a test, a message never sent.
pub const NOT_BOUNCES: &[&str] = &[
    "AutoResponder",
    "Subscribe",
    "Unsubscribe",
    "AddressChange",
    "ChallengeVerification",
    "OpenRelayTest",
    "VirusNotification",
    "ManuallyDeactivated",
    "Unconfirmed",
    "SMTPApiError",
    "InboundError",
    "TemplateRenderingFailed",
];

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
        "Bounce" if NOT_BOUNCES.contains(&record.bounce_type.as_deref().unwrap_or("")) => None,
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
    if let Some(evidence) = report_fields(details) {
        return evidence;
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

/// The codes of a delivery report's lines inside `details` (RFC 3464: `Status: 5.1.1`,
/// `Diagnostic-Code: smtp; 550 5.1.1 …`), if it has any.
fn report_fields(details: &str) -> Option<Evidence> {
    let field = |name: &str| {
        details.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    let diagnostic = field("Diagnostic-Code");
    let (smtp_code, text_code) = diagnostic.as_deref().map(codes_in_text).unwrap_or_default();
    let status = field("Status").and_then(|s| EnhancedCode::parse(s.split_whitespace().next()?));
    let code = status.or(text_code);
    (code.is_some() || smtp_code.is_some()).then(|| Evidence {
        code,
        smtp_code,
        diagnostic: Some(diagnostic.unwrap_or_else(|| details.to_string())),
    })
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

    /// A delivery report inside `Details` decides by its codes, whatever the bounce type (a
    /// `HardBounce` whose report says `5.7.1` was proof, a `SoftBounce` saying `5.1.1` was
    /// not); bounce records that are not bounces are ignored (they counted as other bounces).
    #[test]
    fn a_report_in_details_decides_and_records_that_are_not_bounces_are_ignored() {
        let fixture = crate::webhooks::tests::fixture("postmark-hard-bounce.json");
        let mut record: serde_json::Value = serde_json::from_str(&fixture).expect("fixture");
        let report = |status: &str| {
            format!(
                "Reporting-MTA: dns; mx.example.com\nFinal-Recipient: rfc822; john@example.com\n\
                 Action: failed\nStatus: {status}\nDiagnostic-Code: smtp; 550 {status} refused"
            )
        };
        for (kind, details, want) in [
            ("HardBounce", report("5.7.1"), Some(Tally::OtherBounced)),
            ("SoftBounce", report("5.1.1"), Some(Tally::Bounced)),
            (
                "HardBounce",
                "Test bounce details".to_string(),
                Some(Tally::Bounced),
            ),
            ("AutoResponder", "Out of office".to_string(), None),
            ("ManuallyDeactivated", String::new(), None),
        ] {
            record["Type"] = kind.into();
            record["Details"] = details.clone().into();
            let parsed = parse(record.to_string().as_bytes()).expect(kind);
            let got: Vec<_> = parsed.events.iter().map(|e| e.tally()).collect();
            match want {
                Some(tally) => assert_eq!(got, vec![tally], "{kind} {details:?}"),
                None => assert_eq!((got.len(), parsed.ignored), (0, 1), "{kind}"),
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
