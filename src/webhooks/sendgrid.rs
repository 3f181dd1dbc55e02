//! SendGrid's signed event webhook: a JSON array of events, signed with ECDSA P-256 over
//! `timestamp + body` (headers `X-Twilio-Email-Event-Webhook-Signature`, base64 DER, and
//! `…-Timestamp`), verified with the base64 DER public key SendGrid shows.
//!
//! Events: `delivered` → delivered; `bounce` (both `type` `bounce` and `blocked`) → bounced
//! with `status` (enhanced code) and `reason` (the remote text) as evidence. `dropped` (SendGrid
//! did not send), `deferred`, `processed`, opens, clicks, spam reports… are ignored. An event
//! with an `sg_event_id` is published alone as `sendgrid:{sg_event_id}`: SendGrid may send an
//! event again in another batch, and says to deduplicate on that id (its Event Webhook
//! troubleshooting guide). Events without one go together under the SHA-256 of the signed
//! body: a retried batch is counted once.

/// How this provider's message ids begin (see [`super::ID_PREFIXES`]).
pub const ID_PREFIX: &str = "sendgrid:";

use super::{MAX_CLOCK_SKEW, Parsed, WebhookError, event_for, sha256_hex};
use crate::bounce::{EnhancedCode, codes_in_text};
use crate::event::{EventType, Evidence};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";

/// DER prefix of a P-256 SubjectPublicKeyInfo before its 65-byte uncompressed point.
pub const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// One event of the array. Its fields are strings in SendGrid's documentation; any other JSON
/// type reads as absent, so one odd field does not refuse a whole signed batch (SendGrid would
/// retry it, then drop every event in it).
#[derive(Deserialize)]
struct SgEvent {
    #[serde(default, deserialize_with = "super::lenient_string")]
    email: Option<String>,
    #[serde(default, deserialize_with = "super::lenient_string")]
    event: Option<String>,
    #[serde(default, deserialize_with = "super::lenient_string")]
    status: Option<String>,
    #[serde(default, deserialize_with = "super::lenient_string")]
    reason: Option<String>,
    /// A string in SendGrid's events; anything else is as if absent.
    #[serde(default)]
    sg_event_id: Option<serde_json::Value>,
}

impl SgEvent {
    fn id(&self) -> Option<String> {
        let id = self.sg_event_id.as_ref()?.as_str()?.trim();
        (!id.is_empty()).then(|| format!("{ID_PREFIX}{id}"))
    }
}

/// The uncompressed P-256 point of SendGrid's base64 DER key.
fn public_point(key_b64: &str) -> Result<Vec<u8>, WebhookError> {
    let der = STANDARD
        .decode(key_b64.trim())
        .map_err(|_| WebhookError::Unauthorized("the configured SendGrid key is not base64"))?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 => Ok(point.to_vec()),
        _ => Err(WebhookError::Unauthorized(
            "the configured SendGrid key is not a P-256 public key",
        )),
    }
}

/// Checks `WEBHOOK_SENDGRID_PUBLIC_KEY` at start.
pub fn check_key(key_b64: &str) -> anyhow::Result<()> {
    public_point(key_b64)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("WEBHOOK_SENDGRID_PUBLIC_KEY: {e}"))
}

/// Verifies and parses one request.
pub fn handle(
    key_b64: &str,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<Parsed, WebhookError> {
    let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
        return Err(WebhookError::Unauthorized("missing signature headers"));
    };
    let signature = STANDARD
        .decode(signature.trim())
        .map_err(|_| WebhookError::Unauthorized("bad signature"))?;
    let mut signed = timestamp.as_bytes().to_vec();
    signed.extend_from_slice(body);
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        public_point(key_b64)?,
    );
    key.verify(&signed, &signature)
        .map_err(|_| WebhookError::Unauthorized("bad signature"))?;
    let at: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| WebhookError::Unauthorized("bad timestamp"))?;
    if (now - at).unsigned_abs() > MAX_CLOCK_SKEW.as_secs() {
        return Err(WebhookError::Unauthorized("stale timestamp"));
    }
    parse(body)
}

/// Parses a (verified) event array.
pub fn parse(body: &[u8]) -> Result<Parsed, WebhookError> {
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| super::bad_json("a SendGrid event array", &e))?;
    let mut parsed = Parsed {
        message_id: format!("{ID_PREFIX}{}", sha256_hex(body)),
        ..Parsed::default()
    };
    for event in events {
        // An element that is not an object is ignored, not the whole array.
        let Ok(event) = serde_json::from_value::<SgEvent>(event) else {
            parsed.ignored += 1;
            continue;
        };
        let address = event.email.as_deref().unwrap_or_default();
        let mapped = match event.event.as_deref() {
            Some("delivered") => event_for(address, EventType::Delivered),
            Some("bounce") => event_for(address, EventType::Bounced).map(|e| {
                let text = event.reason.as_deref().unwrap_or("").trim();
                let (smtp_code, text_code) = codes_in_text(text);
                e.with_evidence(Evidence {
                    code: event
                        .status
                        .as_deref()
                        .and_then(EnhancedCode::parse)
                        .or(text_code),
                    smtp_code,
                    diagnostic: Some(
                        if text.is_empty() {
                            "sendgrid bounce"
                        } else {
                            text
                        }
                        .to_string(),
                    ),
                })
            }),
            _ => None,
        };
        match mapped {
            Some(e) => {
                parsed.events.push(e);
                parsed.event_ids.push(event.id());
            }
            None => parsed.ignored += 1,
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Tally;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    /// A generated key pair and its public key as SendGrid shows it (base64 DER SPKI).
    fn key() -> (EcdsaKeyPair, String) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        (pair, STANDARD.encode(spki))
    }

    pub fn sign(pair: &EcdsaKeyPair, timestamp: &str, body: &[u8]) -> String {
        let mut signed = timestamp.as_bytes().to_vec();
        signed.extend_from_slice(body);
        STANDARD.encode(pair.sign(&SystemRandom::new(), &signed).unwrap().as_ref())
    }

    #[test]
    fn signed_events_map_onto_our_counters() {
        let (pair, public) = key();
        let body = crate::webhooks::tests::fixture("sendgrid-events.json");
        let now = 1_700_000_000;
        let ts = now.to_string();
        let parsed = handle(
            &public,
            Some(&sign(&pair, &ts, body.as_bytes())),
            Some(&ts),
            body.as_bytes(),
            now,
        )
        .expect("verifies");
        let got = crate::webhooks::tests::tallies(&parsed);
        assert_eq!(
            got,
            vec![
                ("example.com", Tally::Delivered),
                ("example.com", Tally::OtherBounced), // 500 unknown recipient, 5.0.0: not 550
                ("example.com", Tally::OtherBounced), // 5.2.2
                ("example.com", Tally::Bounced),      // 5.1.1
                ("example.com", Tally::OtherBounced), // blocked 5.7.1
            ]
        );
        assert_eq!(
            parsed.ignored, 5,
            "processed, deferred, dropped, open, spamreport"
        );
        // Each counted event goes alone under its `sg_event_id`.
        assert_eq!(
            parsed.event_ids,
            [
                "rWVYmVk90MjZJ9iohOBa3w==",
                "6g4ZI7SA-xmRDv57GoPIPw==",
                "7h5aJ8TB-ynSEw68HpQJQx==",
                "8i6bK9UC-zoTFx79IqRKRy==",
                "9j7cL0VD-apUGy80JrSLSz==",
            ]
            .map(|id| Some(format!("{ID_PREFIX}{id}")))
        );
        let without = parse(
            br#"[{"email":"a@x.example","event":"delivered","sg_event_id":7},
            {"email":"a@x.example","event":"delivered","sg_event_id":" "}]"#,
        )
        .expect("parses");
        assert_eq!(without.event_ids, [None, None]);
    }

    /// A field of another JSON type than SendGrid documents, or an element that is not an
    /// object, costs that event only: the whole signed batch was refused (400), and SendGrid
    /// drops a batch after its retries.
    #[test]
    fn an_odd_event_does_not_refuse_the_batch() {
        let parsed = parse(
            br#"[{"email":"a@x.example","event":"delivered"},
            {"email":"b@y.example","event":"bounce","status":511,"reason":["550"]},
            {"email":7,"event":"delivered"},
            "not an event",
            {"email":"c@z.example","event":"bounce","status":"5.1.1","reason":"550 5.1.1 no such user"}]"#,
        )
        .expect("parses");
        let got = crate::webhooks::tests::tallies(&parsed);
        assert_eq!(
            got,
            vec![
                ("x.example", Tally::Delivered),
                ("y.example", Tally::OtherBounced),
                ("z.example", Tally::Bounced),
            ]
        );
        assert_eq!(parsed.ignored, 2);
    }

    #[test]
    fn bad_signatures_are_refused() {
        let (pair, public) = key();
        let (_, other_public) = key();
        let body = br#"[{"email":"a@example.com","event":"delivered"}]"#;
        let now = 1_700_000_000;
        let ts = now.to_string();
        let good = sign(&pair, &ts, body);
        assert!(handle(&public, Some(&good), Some(&ts), body, now).is_ok());
        let refused =
            |r: Result<Parsed, WebhookError>| matches!(r, Err(WebhookError::Unauthorized(_)));
        assert!(
            refused(handle(&other_public, Some(&good), Some(&ts), body, now)),
            "other key"
        );
        assert!(
            refused(handle(
                &public,
                Some(&good),
                Some(&ts),
                br#"[{"email":"b@example.com","event":"delivered"}]"#,
                now
            )),
            "other body"
        );
        assert!(
            refused(handle(&public, Some(&good), Some("1700000001"), body, now)),
            "other timestamp"
        );
        assert!(
            refused(handle(&public, None, Some(&ts), body, now)),
            "no signature"
        );
        assert!(
            refused(handle(&public, Some("!!"), Some(&ts), body, now)),
            "not base64"
        );
        let old = (now - 3600).to_string();
        assert!(
            refused(handle(
                &public,
                Some(&sign(&pair, &old, body)),
                Some(&old),
                body,
                now
            )),
            "stale"
        );
    }
}
