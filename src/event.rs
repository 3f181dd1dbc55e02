//! The wire format (SPEC §3): event types, message parsing and domain normalisation.
//!
//! Both binaries use this module, so the producer can never publish something the worker reads
//! differently.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest accepted message body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest accepted batch (a JSON array of events).
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Longest host name, in octets.
const MAX_DOMAIN_OCTETS: usize = 253;
/// Longest label of a host name, in octets.
const MAX_LABEL_OCTETS: usize = 63;

/// What happened to a message sent to a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Delivered,
    Bounced,
}

impl EventType {
    /// The name on the wire, also used as the routing key and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Delivered => "delivered",
            EventType::Bounced => "bounced",
        }
    }
}

impl std::str::FromStr for EventType {
    type Err = RejectReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "delivered" => Ok(EventType::Delivered),
            "bounced" => Ok(EventType::Bounced),
            _ => Err(RejectReason::UnknownType),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event, with its domain already normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Event {
    pub domain: String,
    #[serde(rename = "type")]
    pub kind: EventType,
}

impl Event {
    /// Builds an event, normalising the domain.
    pub fn new(domain: &str, kind: EventType) -> Result<Self, RejectReason> {
        Ok(Self {
            domain: normalize_domain(domain)?,
            kind,
        })
    }
}

/// Why a message was rejected. The label is a metric label, so the set is small and fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RejectReason {
    #[error("body is larger than 1 MiB")]
    TooLarge,
    #[error("body is not UTF-8")]
    NotUtf8,
    #[error("body is not valid JSON")]
    NotJson,
    #[error("body is not an event object or an array of event objects")]
    BadShape,
    #[error("event type is not \"delivered\" or \"bounced\"")]
    UnknownType,
    #[error("domain is not a valid host name")]
    InvalidDomain,
    #[error("batch is empty")]
    EmptyBatch,
    #[error("batch has more than 10000 events")]
    BatchTooLarge,
    #[error("message_id contains a NUL byte, which Postgres cannot store")]
    BadMessageId,
}

impl RejectReason {
    /// Every reason, for tests and for pre-registering metric labels.
    pub const ALL: [RejectReason; 9] = [
        RejectReason::TooLarge,
        RejectReason::NotUtf8,
        RejectReason::NotJson,
        RejectReason::BadShape,
        RejectReason::UnknownType,
        RejectReason::InvalidDomain,
        RejectReason::EmptyBatch,
        RejectReason::BatchTooLarge,
        RejectReason::BadMessageId,
    ];

    /// Stable snake_case name, used as the `reason` metric label and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::NotJson => "not_json",
            RejectReason::BadShape => "bad_shape",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::InvalidDomain => "invalid_domain",
            RejectReason::EmptyBatch => "empty_batch",
            RejectReason::BatchTooLarge => "batch_too_large",
            RejectReason::BadMessageId => "bad_message_id",
        }
    }
}

/// An event as it stands on the wire, before validation. Unknown fields are ignored.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    domain: std::borrow::Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

impl RawEvent<'_> {
    fn validate(&self) -> Result<Event, RejectReason> {
        let kind = self.kind.parse()?;
        Event::new(&self.domain, kind)
    }
}

/// Parses a message body: one event object or an array of 1 to 10,000 of them.
///
/// The message is valid whole or not at all: the first invalid event rejects it.
pub fn parse_message(body: &[u8]) -> Result<Vec<Event>, RejectReason> {
    if body.len() > MAX_BODY_BYTES {
        return Err(RejectReason::TooLarge);
    }
    let text = std::str::from_utf8(body).map_err(|_| RejectReason::NotUtf8)?;
    match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            let raw: Vec<RawEvent<'_>> = serde_json::from_str(text).map_err(json_error)?;
            if raw.is_empty() {
                return Err(RejectReason::EmptyBatch);
            }
            if raw.len() > MAX_BATCH_EVENTS {
                return Err(RejectReason::BatchTooLarge);
            }
            raw.iter().map(RawEvent::validate).collect()
        }
        Some(b'{') => {
            let raw: RawEvent<'_> = serde_json::from_str(text).map_err(json_error)?;
            Ok(vec![raw.validate()?])
        }
        _ => match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            // Valid JSON, but a number, string, null…
            Ok(_) => Err(RejectReason::BadShape),
            Err(_) => Err(RejectReason::NotJson),
        },
    }
}

fn json_error(e: serde_json::Error) -> RejectReason {
    match e.classify() {
        serde_json::error::Category::Data => RejectReason::BadShape,
        _ => RejectReason::NotJson,
    }
}

/// Normalises a domain: trim white space, drop one trailing dot, IDNA (UTS #46) to ASCII,
/// lower-case; then checks it is a valid host name (≤ 253 octets, labels of 1–63 letters,
/// digits and inner hyphens).
pub fn normalize_domain(input: &str) -> Result<String, RejectReason> {
    let trimmed = input.trim();
    let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
    if trimmed.is_empty() || trimmed.len() > 4 * MAX_DOMAIN_OCTETS {
        return Err(RejectReason::InvalidDomain);
    }
    // Fast path: plain ASCII host names need no IDNA processing (punycode labels still do, to
    // be validated).
    let ascii = if is_host_name(trimmed) && !has_punycode_label(trimmed) {
        trimmed.to_ascii_lowercase()
    } else {
        let mut ascii = idna::domain_to_ascii(trimmed).map_err(|_| RejectReason::InvalidDomain)?;
        ascii.make_ascii_lowercase();
        if !is_host_name(&ascii) {
            return Err(RejectReason::InvalidDomain);
        }
        ascii
    };
    Ok(ascii)
}

/// True if a label is an IDNA A-label (`xn--…`), which must be decoded to be validated.
fn has_punycode_label(s: &str) -> bool {
    s.split('.').any(|label| {
        label
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case("xn--"))
    })
}

/// True if `s` is a host name made of ASCII letters, digits and inner hyphens (any case).
fn is_host_name(s: &str) -> bool {
    s.len() <= MAX_DOMAIN_OCTETS
        && s.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= MAX_LABEL_OCTETS
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        })
}

/// A domain's verdict (SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    #[serde(rename = "catch-all")]
    CatchAll,
    #[serde(rename = "not catch-all")]
    NotCatchAll,
    #[serde(rename = "unknown")]
    Unknown,
}

impl Status {
    /// Classifies a domain from its counters: any bounce means not catch-all; strictly more than
    /// `threshold` deliveries and no bounce means catch-all; anything else is unknown.
    pub fn classify(delivered: i64, bounced: i64, threshold: i64) -> Self {
        if bounced >= 1 {
            Status::NotCatchAll
        } else if delivered > threshold {
            Status::CatchAll
        } else {
            Status::Unknown
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::CatchAll => "catch-all",
            Status::NotCatchAll => "not catch-all",
            Status::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_edges() {
        assert_eq!(Status::classify(0, 0, 1000), Status::Unknown, "never seen");
        assert_eq!(
            Status::classify(1000, 0, 1000),
            Status::Unknown,
            "1000 is not > 1000"
        );
        assert_eq!(Status::classify(1001, 0, 1000), Status::CatchAll);
        assert_eq!(Status::classify(1_000_000, 1, 1000), Status::NotCatchAll);
        assert_eq!(Status::classify(0, 1, 1000), Status::NotCatchAll);
        assert_eq!(
            Status::classify(5, 0, 4),
            Status::CatchAll,
            "threshold is a setting"
        );
        assert_eq!(Status::CatchAll.as_str(), "catch-all");
        assert_eq!(
            serde_json::to_string(&Status::NotCatchAll).unwrap(),
            "\"not catch-all\""
        );
    }

    #[test]
    fn normalises_valid_domains() {
        let cases = [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("EXAMPLE.com", "example.com"),
            ("  example.com\t\n", "example.com"),
            (" example.com. ", "example.com"),
            ("bücher.de", "xn--bcher-kva.de"),
            ("BÜCHER.de", "xn--bcher-kva.de"),
            ("xn--bcher-kva.de", "xn--bcher-kva.de"),
            ("例え.jp", "xn--r8jz45g.jp"),
            ("localhost", "localhost"),
            ("a-b.c0.io", "a-b.c0.io"),
            ("123.45", "123.45"),
            (
                &format!("{}.com", "a".repeat(63)),
                &format!("{}.com", "a".repeat(63)),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize_domain(input).as_deref(),
                Ok(want),
                "input {input:?}"
            );
        }
        let longest = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(longest.len(), 253);
        assert_eq!(normalize_domain(&longest), Ok(longest.clone()));
    }

    #[test]
    fn rejects_invalid_domains() {
        let too_long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        assert_eq!(too_long.len(), 254);
        let cases = [
            "".to_string(),
            "   ".to_string(),
            ".".to_string(),
            "..".to_string(),
            "example..com".to_string(),
            ".example.com".to_string(),
            "example.com..".to_string(),
            "-example.com".to_string(),
            "example-.com".to_string(),
            "exa mple.com".to_string(),
            "exa_mple.com".to_string(),
            "user@example.com".to_string(),
            "example.com/path".to_string(),
            "http://example.com".to_string(),
            "example.com:25".to_string(),
            format!("{}.com", "a".repeat(64)),
            too_long,
            "xn--a.com".to_string(),
            "\u{0}.com".to_string(),
        ];
        for input in cases {
            assert_eq!(
                normalize_domain(&input),
                Err(RejectReason::InvalidDomain),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn parses_single_events_and_batches() {
        let one = parse_message(br#"{"domain": "Example.COM.", "type": "delivered"}"#).unwrap();
        assert_eq!(
            one,
            vec![Event::new("example.com", EventType::Delivered).unwrap()]
        );

        let extra =
            parse_message(br#" {"type":"bounced","domain":"a.io","id":7,"x":{"y":[1]}}"#).unwrap();
        assert_eq!(extra, vec![Event::new("a.io", EventType::Bounced).unwrap()]);

        let batch = parse_message(
            br#"[{"domain":"a.io","type":"delivered"},{"domain":"B.io","type":"bounced"}]"#,
        )
        .unwrap();
        assert_eq!(
            batch,
            vec![
                Event::new("a.io", EventType::Delivered).unwrap(),
                Event::new("b.io", EventType::Bounced).unwrap(),
            ]
        );

        let escaped =
            parse_message(r#"{"domain":"b\u00fccher.de","type":"delivered"}"#.as_bytes()).unwrap();
        assert_eq!(escaped[0].domain, "xn--bcher-kva.de");

        let max: Vec<_> = (0..MAX_BATCH_EVENTS)
            .map(|i| serde_json::json!({"domain": format!("d{i}.com"), "type": "delivered"}))
            .collect();
        let body = serde_json::to_vec(&max).unwrap();
        assert_eq!(parse_message(&body).unwrap().len(), MAX_BATCH_EVENTS);
    }

    #[test]
    fn rejects_each_invalid_body() {
        let over_max: Vec<_> = (0..=MAX_BATCH_EVENTS)
            .map(|_| serde_json::json!({"domain": "a.com", "type": "delivered"}))
            .collect();
        let over_max = serde_json::to_vec(&over_max).unwrap();
        let mut huge = br#"{"domain":"a.com","type":"delivered","pad":""#.to_vec();
        huge.resize(MAX_BODY_BYTES + 1, b'x');
        huge.extend_from_slice(b"\"}");
        let cases: Vec<(&[u8], RejectReason)> = vec![
            (b"", RejectReason::NotJson),
            (b"not json", RejectReason::NotJson),
            (b"{\"domain\":", RejectReason::NotJson),
            (b"[{\"domain\":\"a.com\",\"type\":\"delivered\"}", RejectReason::NotJson),
            (b"\xff\xfe{}", RejectReason::NotUtf8),
            (b"{\"domain\":\"a\xff.com\",\"type\":\"delivered\"}", RejectReason::NotUtf8),
            (b"42", RejectReason::BadShape),
            (b"\"a.com\"", RejectReason::BadShape),
            (b"null", RejectReason::BadShape),
            (b"{}", RejectReason::BadShape),
            (b"{\"domain\":\"a.com\"}", RejectReason::BadShape),
            (b"{\"type\":\"delivered\"}", RejectReason::BadShape),
            (b"{\"domain\":7,\"type\":\"delivered\"}", RejectReason::BadShape),
            (b"[1,2]", RejectReason::BadShape),
            (b"{\"domain\":\"a.com\",\"type\":\"opened\"}", RejectReason::UnknownType),
            (b"{\"domain\":\"a.com\",\"type\":\"Delivered\"}", RejectReason::UnknownType),
            (b"{\"domain\":\"a..com\",\"type\":\"delivered\"}", RejectReason::InvalidDomain),
            (b"[]", RejectReason::EmptyBatch),
            (
                b"[{\"domain\":\"a.com\",\"type\":\"delivered\"},{\"domain\":\"\",\"type\":\"bounced\"}]",
                RejectReason::InvalidDomain,
            ),
            (&over_max, RejectReason::BatchTooLarge),
            (&huge, RejectReason::TooLarge),
        ];
        for (body, want) in cases {
            let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
            assert_eq!(parse_message(body), Err(want), "body {shown:?}");
        }
    }

    #[test]
    fn reason_labels_are_unique() {
        let labels: std::collections::HashSet<_> =
            RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }
}
