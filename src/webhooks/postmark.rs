//! Postmark's delivery and bounce webhooks, protected by the basic auth in the webhook URL
//! (`https://user:password@host/webhooks/postmark`; Postmark does not sign its webhooks).
//!
//! `RecordType` `Delivery` → delivered. `Bounce`: evidence from `Details` when it carries SMTP
//! codes, at its start (`smtp;550 5.1.1 …`) or in a delivery report's lines for the recipient,
//! whatever the bounce type; otherwise a `HardBounce` (Postmark: "unknown user, mailbox not
//! found") counts as proof, a type that is not a message bounced by the recipient's server
//! ([`NOT_BOUNCES`]: an auto-responder, a subscription change, an address deactivated by
//! hand…) is ignored, and every other type (`SoftBounce`, `Transient`, `SpamNotification`,
//! `Blocked`, `DnsError`…) is counted apart. Opens, clicks and spam complaints are ignored.

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
        "Bounce" => {
            let address = record.email.as_deref().unwrap_or_default();
            let details = record.details.as_deref().unwrap_or("").trim();
            // Codes decide whatever the type (Postmark files some NDRs as auto-responders);
            // without codes, a type that is not a bounce is ignored.
            match coded_evidence(details, address) {
                Some(evidence) => {
                    event_for(address, EventType::Bounced).map(|e| e.with_evidence(evidence))
                }
                None if NOT_BOUNCES.contains(&record.bounce_type.as_deref().unwrap_or("")) => None,
                None => event_for(address, EventType::Bounced)
                    .map(|e| e.with_evidence(uncoded_evidence(&record, details))),
            }
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

/// The SMTP codes `details` carries: at its start (`smtp;550 5.1.1 …`), or in the lines of a
/// delivery report for `recipient`.
fn coded_evidence(details: &str, recipient: &str) -> Option<Evidence> {
    let (smtp_code, code) = codes_in_text(details);
    if smtp_code.is_some() || code.is_some() {
        return Some(Evidence {
            code,
            smtp_code,
            diagnostic: Some(details.to_string()),
        });
    }
    report_fields(details, recipient)
}

/// A bounce without codes: Postmark's type decides.
fn uncoded_evidence(record: &Record, details: &str) -> Evidence {
    match record.bounce_type.as_deref() {
        // Postmark's own verdict: the address does not exist. No evidence = proof.
        Some("HardBounce") => Evidence::default(),
        other => Evidence {
            diagnostic: Some(format!("postmark {}: {details}", other.unwrap_or("bounce"))),
            ..Evidence::default()
        },
    }
}

/// One recipient's fields of a delivery report (RFC 3464).
#[derive(Default)]
struct ReportBlock {
    recipients: Vec<String>,
    status: Option<EnhancedCode>,
    diagnostic: Option<String>,
}

/// The evidence of a delivery report inside `details`, from the block of `recipient` (a report
/// about several recipients has one each; one that names only others gives none). The server's
/// reply in `Diagnostic-Code:` decides; the reporting server's `Status:` only when that reply
/// has no codes (an MTA makes one up for a reply without: `550 User unknown` → `5.2.0`).
fn report_fields(details: &str, recipient: &str) -> Option<Evidence> {
    let mut blocks = vec![ReportBlock::default()];
    // A line that begins with white space continues a Diagnostic-Code (RFC 5322 folding).
    let mut folding = false;
    for line in details.lines() {
        let Some(block) = blocks.last_mut() else {
            break;
        };
        if line.starts_with([' ', '\t']) {
            if let (true, Some(text)) = (folding, block.diagnostic.as_mut()) {
                text.push(' ');
                text.push_str(line.trim());
            }
            continue;
        }
        folding = false;
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        if key.eq_ignore_ascii_case("Final-Recipient")
            || key.eq_ignore_ascii_case("Original-Recipient")
        {
            // `rfc822; jo@example.com`
            let address = value.split_once(';').map_or(value, |(_, a)| a);
            let address = address.trim().trim_start_matches('<').trim_end_matches('>');
            if block.status.is_some() || block.diagnostic.is_some() {
                blocks.push(ReportBlock::default());
            }
            if let Some(block) = blocks.last_mut() {
                block.recipients.push(address.to_string());
            }
        } else if key.eq_ignore_ascii_case("Status") {
            if block.status.is_none() {
                block.status = value
                    .split_whitespace()
                    .next()
                    .and_then(EnhancedCode::parse);
            }
        } else if key.eq_ignore_ascii_case("Diagnostic-Code") && block.diagnostic.is_none() {
            block.diagnostic = Some(value.to_string());
            folding = true;
        }
    }
    let wanted = recipient
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let block = if blocks.iter().any(|b| !b.recipients.is_empty()) {
        blocks
            .iter()
            .find(|b| b.recipients.iter().any(|r| r.eq_ignore_ascii_case(wanted)))?
    } else {
        blocks.first()?
    };
    let (smtp_code, text_code) = block
        .diagnostic
        .as_deref()
        .map(codes_in_text)
        .unwrap_or_default();
    let code = if smtp_code.is_some() || text_code.is_some() {
        text_code
    } else {
        block.status
    };
    (code.is_some() || smtp_code.is_some()).then(|| Evidence {
        code,
        smtp_code,
        diagnostic: Some(
            block
                .diagnostic
                .clone()
                .unwrap_or_else(|| details.to_string()),
        ),
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
            let got = crate::webhooks::tests::tallies(&parsed);
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
        let block = |recipient: &str, status: &str, diagnostic: &str| {
            format!(
                "Final-Recipient: rfc822; {recipient}\nAction: failed\nStatus: {status}\n\
                 Diagnostic-Code: {diagnostic}\n"
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
            // The server's reply decides, not the status an MTA made up for it.
            (
                "HardBounce",
                block("john@example.com", "5.2.0", "smtp; 550 User unknown"),
                Some(Tally::Bounced),
            ),
            (
                "HardBounce",
                block(
                    "john@example.com",
                    "5.1.1",
                    "smtp; 550 5.7.1 rejected as spam",
                ),
                Some(Tally::OtherBounced),
            ),
            // Our recipient's block, not the first one.
            (
                "SoftBounce",
                format!(
                    "{}\n{}",
                    block("a@x.example", "5.1.1", "smtp; 550 5.1.1 no such user"),
                    block("John@Example.com", "5.2.2", "smtp; 552 5.2.2 mailbox full")
                ),
                Some(Tally::OtherBounced),
            ),
            // A folded Diagnostic-Code is read whole.
            (
                "SoftBounce",
                block(
                    "john@example.com",
                    "5.0.0",
                    "smtp; 550 Requested action not taken: mailbox\n unavailable",
                ),
                Some(Tally::Bounced),
            ),
            // An NDR Postmark filed as an auto-responder: its codes decide.
            (
                "AutoResponder",
                "smtp;550 5.1.1 user unknown".to_string(),
                Some(Tally::Bounced),
            ),
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
