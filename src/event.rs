//! The wire format (SPEC §3): event types, message parsing and domain normalisation.
//!
//! Both binaries use this module, so the producer can never publish something the worker reads
//! differently.

use crate::bounce::{BounceKind, EnhancedCode};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// Largest accepted message body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest accepted batch (a JSON array of events).
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// The most of a bounce's diagnostic kept (an SMTP reply line is at most 512 octets, RFC 5321
/// §4.5.3.1.5; a multi-line one says why in its first lines). Each event is classified on its
/// text and carries it when republished: a KumoMTA batch record of 10,000 recipients and a
/// 900 KB response scanned and serialized the 900 KB once per recipient (about 9 GB).
pub const MAX_DIAGNOSTIC_BYTES: usize = 2048;
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Event {
    pub domain: String,
    pub kind: EventType,
    /// Why a bounce bounced, when the source said (SPEC §3); behind a pointer so plain events
    /// stay small, shared so the recipients of one KumoMTA batch record share one copy (each
    /// had its own: a 1 MiB record of 10,000 recipients and a 900 KB response was 9 GB).
    pub evidence: Option<Arc<Evidence>>,
}

/// A bounce's evidence: the optional `code`, `smtp_code` and `diagnostic` fields on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Evidence {
    /// RFC 3463 enhanced status code (`"5.1.1"`).
    pub code: Option<EnhancedCode>,
    /// SMTP reply code (`550`).
    pub smtp_code: Option<u16>,
    /// The remote server's text.
    pub diagnostic: Option<String>,
}

impl Evidence {
    /// `None` when every field is empty, so an event without evidence carries none. A
    /// diagnostic is kept to its first [`MAX_DIAGNOSTIC_BYTES`] (at a character boundary).
    pub fn shared(mut self) -> Option<Arc<Self>> {
        if let Some(diagnostic) = &mut self.diagnostic
            && diagnostic.len() > MAX_DIAGNOSTIC_BYTES
        {
            let mut end = MAX_DIAGNOSTIC_BYTES;
            while !diagnostic.is_char_boundary(end) {
                end -= 1;
            }
            diagnostic.truncate(end);
        }
        (self.code.is_some() || self.smtp_code.is_some() || self.diagnostic.is_some())
            .then(|| Arc::new(self))
    }
}

/// Which counter an event adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tally {
    Delivered,
    /// A bounce that proves the recipient does not exist (or carries no evidence).
    Bounced,
    /// Any other bounce: counted apart, never changes the status.
    OtherBounced,
}

impl Event {
    /// Builds an event, normalising the domain.
    pub fn new(domain: &str, kind: EventType) -> Result<Self, RejectReason> {
        Ok(Self {
            domain: normalize_domain(domain)?,
            kind,
            evidence: None,
        })
    }

    /// Adds bounce evidence (dropped when empty).
    pub fn with_evidence(mut self, evidence: Evidence) -> Self {
        self.evidence = evidence.shared();
        self
    }

    /// The counter this event adds to (SPEC §3, the table in the README).
    pub fn tally(&self) -> Tally {
        match (self.kind, self.evidence.as_deref()) {
            (EventType::Delivered, _) => Tally::Delivered,
            (EventType::Bounced, None) => Tally::Bounced,
            (EventType::Bounced, Some(e)) => {
                match crate::bounce::classify(e.code, e.smtp_code, e.diagnostic.as_deref()) {
                    BounceKind::NoSuchRecipient => Tally::Bounced,
                    BounceKind::Other => Tally::OtherBounced,
                }
            }
        }
    }
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let evidence = self.evidence.as_deref();
        let extra = evidence.map_or(0, |e| {
            usize::from(e.code.is_some())
                + usize::from(e.smtp_code.is_some())
                + usize::from(e.diagnostic.is_some())
        });
        let mut map = serializer.serialize_map(Some(2 + extra))?;
        map.serialize_entry("domain", &self.domain)?;
        map.serialize_entry("type", &self.kind)?;
        if let Some(e) = evidence {
            if let Some(code) = e.code {
                map.serialize_entry("code", &code.to_string())?;
            }
            if let Some(smtp_code) = e.smtp_code {
                map.serialize_entry("smtp_code", &smtp_code)?;
            }
            if let Some(diagnostic) = &e.diagnostic {
                map.serialize_entry("diagnostic", diagnostic)?;
            }
        }
        map.end()
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
    #[error(
        "bounce evidence is invalid: code must be an RFC 3463 code like \"5.1.1\", smtp_code 200-599"
    )]
    InvalidEvidence,
}

impl RejectReason {
    /// Every reason, for tests and for pre-registering metric labels.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::TooLarge,
        RejectReason::NotUtf8,
        RejectReason::NotJson,
        RejectReason::BadShape,
        RejectReason::UnknownType,
        RejectReason::InvalidDomain,
        RejectReason::EmptyBatch,
        RejectReason::BatchTooLarge,
        RejectReason::BadMessageId,
        RejectReason::InvalidEvidence,
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
            RejectReason::InvalidEvidence => "invalid_evidence",
        }
    }
}

/// An event as it stands on the wire, before validation. Unknown fields are ignored.
///
/// The same shape reads our events (`domain`, `type`, evidence) and KumoMTA log records
/// (`type`, `recipient`, `response`), which share the `type` field. KumoMTA's two fields are
/// kept raw and read only for a KumoMTA record, so in one of our events they are unknown fields
/// like any other, whatever their JSON type (a publisher's own `"response": "250 OK"`). The
/// evidence is kept raw too and read only for a bounce: on a delivery it is ignored whatever its
/// JSON type (a publisher's own `"code": 250` dead-lettered the event as `bad_shape`), and on a
/// bounce a wrong type is `invalid_evidence`, like a wrong value.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow, default)]
    domain: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
    #[serde(borrow, default)]
    smtp_code: Option<&'a RawValue>,
    #[serde(borrow, default)]
    diagnostic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    recipient: Option<&'a RawValue>,
    #[serde(borrow, default)]
    response: Option<&'a RawValue>,
}

/// The `response` of a KumoMTA log record (docs.kumomta.com/reference/log_record).
#[derive(Deserialize)]
struct KumoResponse<'a> {
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    enhanced_code: Option<KumoEnhancedCode>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct KumoEnhancedCode {
    class: u16,
    subject: u16,
    detail: u16,
}

/// KumoMTA record types (docs.kumomta.com/reference/log_record): only `Delivery` and `Bounce`
/// are counted; the others are acknowledged and ignored.
pub const KUMO_DELIVERY: &str = "Delivery";
pub const KUMO_BOUNCE: &str = "Bounce";

/// A KumoMTA record's `recipient`: one address, or, with `batch_handling = "BatchByDomain"`
/// (KumoMTA 2025.12.02 and later), the list of the batch's recipients.
#[derive(Deserialize)]
#[serde(untagged)]
enum KumoRecipients<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

impl RawEvent<'_> {
    /// Adds the record to `parsed`: its event, or for a KumoMTA record one event per recipient
    /// (or an ignored record, for a type that is not counted).
    fn validate_into(&self, parsed: &mut Parsed) -> Result<(), RejectReason> {
        match self.kind.as_ref() {
            "delivered" | "bounced" => {
                let kind = self.kind.parse()?;
                let domain = self.domain.as_deref().ok_or(RejectReason::BadShape)?;
                let mut event = Event::new(domain, kind)?;
                if kind == EventType::Bounced {
                    event.evidence = self.evidence()?.shared();
                }
                parsed.push(event)
            }
            kind if self.is_kumo_record() => {
                let kind = match kind {
                    KUMO_DELIVERY => EventType::Delivered,
                    KUMO_BOUNCE => EventType::Bounced,
                    _ => {
                        parsed.ignored += 1;
                        return Ok(());
                    }
                };
                let recipients = match self.recipient {
                    Some(raw) => {
                        serde_json::from_str(raw.get()).map_err(|_| RejectReason::BadShape)?
                    }
                    None => KumoRecipients::One(Cow::Borrowed("")),
                };
                let recipients = match &recipients {
                    KumoRecipients::One(recipient) => std::slice::from_ref(recipient),
                    // No recipient at all, as a blank one.
                    KumoRecipients::Many(list) if list.is_empty() => {
                        return Err(RejectReason::InvalidDomain);
                    }
                    KumoRecipients::Many(list) => list.as_slice(),
                };
                // Read once a recipient is counted (a bounce to `postmaster` alone is ignored
                // whatever its response).
                let mut evidence = None;
                for recipient in recipients {
                    // A recipient without a domain to count under, a local `postmaster` (RFC
                    // 5321) or an address literal (`u@[192.0.2.1]`), is ignored like the record
                    // types we do not count; it was counted under the domain `postmaster`, or
                    // dead-lettered.
                    let domain = match recipient.rsplit_once('@') {
                        None if recipient.trim().is_empty() => {
                            return Err(RejectReason::InvalidDomain);
                        }
                        Some((_, domain)) if !domain.trim_start().starts_with('[') => domain,
                        _ => {
                            parsed.ignored += 1;
                            continue;
                        }
                    };
                    let mut event = Event::new(domain, kind)?;
                    if kind == EventType::Bounced {
                        if evidence.is_none() {
                            evidence = Some(self.kumo_evidence()?.shared());
                        }
                        event.evidence = evidence.clone().flatten();
                    }
                    parsed.push(event)?;
                }
                Ok(())
            }
            _ => Err(RejectReason::UnknownType),
        }
    }

    /// A KumoMTA log record: a capitalised `type`, a `recipient` and a `response`, and no
    /// `domain`. With only the first two, one of our events whose publisher capitalised its
    /// type and added a field of its own (`"type": "Delivered", "recipient": …`) was
    /// acknowledged as an ignored KumoMTA record: neither counted nor dead-lettered.
    fn is_kumo_record(&self) -> bool {
        self.domain.is_none()
            && self.recipient.is_some()
            && self.response.is_some()
            && self.kind.starts_with(|c: char| c.is_ascii_uppercase())
    }

    /// A blank `code` or `diagnostic` and an `smtp_code` of 0 are absent, not invalid: what
    /// publishers that cannot leave a field out send (a Go struct without `omitempty`). Such a
    /// bounce was dead-lettered, or counted as no proof.
    fn evidence(&self) -> Result<Evidence, RejectReason> {
        let code: Option<Cow<'_, str>> = evidence_field(self.code)?;
        let code = match code.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(code) => Some(EnhancedCode::parse(code).ok_or(RejectReason::InvalidEvidence)?),
        };
        let smtp_code = evidence_field::<u16>(self.smtp_code)?.filter(|&c| c != 0);
        if smtp_code.is_some_and(|c| !(200..600).contains(&c)) {
            return Err(RejectReason::InvalidEvidence);
        }
        let diagnostic: Option<Cow<'_, str>> = evidence_field(self.diagnostic)?;
        Ok(Evidence {
            code,
            smtp_code,
            diagnostic: non_blank(diagnostic.as_deref()),
        })
    }

    fn kumo_evidence(&self) -> Result<Evidence, RejectReason> {
        let Some(raw) = self.response else {
            return Ok(Evidence::default());
        };
        let response: KumoResponse<'_> =
            serde_json::from_str(raw.get()).map_err(|_| RejectReason::BadShape)?;
        // KumoMTA reports its own failures (no MX, connection refused) as 500/400-class
        // responses without an enhanced code; those fall to the reply-code-and-text rule.
        let code = response
            .enhanced_code
            .as_ref()
            .and_then(|c| EnhancedCode::parse(&format!("{}.{}.{}", c.class, c.subject, c.detail)));
        Ok(Evidence {
            code,
            smtp_code: response.code.filter(|c| (200..600).contains(c)),
            diagnostic: non_blank(response.content.as_deref()),
        })
    }
}

/// A bounce's evidence field: absent or `null` is `None`; a value of the wrong JSON type (a
/// number for `code`, a string for `smtp_code`) is invalid evidence.
fn evidence_field<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
) -> Result<Option<T>, RejectReason> {
    match raw {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| RejectReason::InvalidEvidence),
    }
}

/// A diagnostic, unless blank: a blank one is no evidence, whichever path it came by (a
/// KumoMTA record's blank `content` counted as evidence over AMQP, and as none once `POST
/// /events` had republished it as our event).
fn non_blank(text: Option<&str>) -> Option<String> {
    text.filter(|text| !text.trim().is_empty())
        .map(str::to_string)
}

/// A parsed message body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub events: Vec<Event>,
    /// KumoMTA records of types that are not counted, and recipients without a domain to count
    /// under (one per recipient of a batch record): acknowledged, counted in a metric.
    pub ignored: usize,
}

impl Parsed {
    /// Adds one event, within [`MAX_BATCH_EVENTS`] a message (a KumoMTA record holds an event
    /// per recipient: refused as the limit is passed, not once they are all built).
    fn push(&mut self, event: Event) -> Result<(), RejectReason> {
        if self.events.len() >= MAX_BATCH_EVENTS {
            return Err(RejectReason::BatchTooLarge);
        }
        self.events.push(event);
        Ok(())
    }

    /// Adds the events and ignored records of `other`, within [`MAX_BATCH_EVENTS`] events.
    pub fn append(&mut self, mut other: Parsed) -> Result<(), RejectReason> {
        if self.events.len() + other.events.len() > MAX_BATCH_EVENTS {
            return Err(RejectReason::BatchTooLarge);
        }
        self.events.append(&mut other.events);
        self.ignored += other.ignored;
        Ok(())
    }
}

pub(crate) const TOO_MANY_ITEMS: &str = "too many items";

/// The items of a JSON array, refused as soon as there is one more than [`MAX_BATCH_EVENTS`]:
/// a 1 MiB body of half a million tiny items is not built first (a message's events; `POST
/// /events` takes each item as its own text, parsed as an event by the wire format's rules like
/// an NDJSON line; the bulk look-up takes strings). The consumer built a message's whole array
/// first: 87,000 `{"type":""}` in a 1 MiB body, about 25 MB, before refusing it.
pub(crate) struct ArrayItems<T>(pub(crate) Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ArrayItems<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Items<T> {
            type Value = ArrayItems<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX_BATCH_EVENTS {
                        return Err(serde::de::Error::custom(TOO_MANY_ITEMS));
                    }
                    items.push(item);
                }
                Ok(ArrayItems(items))
            }
        }
        deserializer.deserialize_seq(Items(std::marker::PhantomData))
    }
}

/// Parses a message body: one event object or an array of 1 to 10,000 of them.
///
/// The message is valid whole or not at all: the first invalid event rejects it.
pub fn parse_message(body: &[u8]) -> Result<Vec<Event>, RejectReason> {
    parse_body(body).map(|parsed| parsed.events)
}

/// `text` without one leading byte order mark, which RFC 8259 §8.1 lets a parser ignore (files
/// saved by Windows tools start with one; it was `not_json`).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Like [`parse_message`], also saying how many KumoMTA records were ignored.
pub fn parse_body(body: &[u8]) -> Result<Parsed, RejectReason> {
    if body.len() > MAX_BODY_BYTES {
        return Err(RejectReason::TooLarge);
    }
    let text = strip_bom(std::str::from_utf8(body).map_err(|_| RejectReason::NotUtf8)?);
    let raw: Vec<RawEvent<'_>> = match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            let raw: ArrayItems<RawEvent<'_>> = serde_json::from_str(text).map_err(|e| {
                if e.to_string().starts_with(TOO_MANY_ITEMS) {
                    RejectReason::BatchTooLarge
                } else {
                    json_error(e)
                }
            })?;
            if raw.0.is_empty() {
                return Err(RejectReason::EmptyBatch);
            }
            raw.0
        }
        Some(b'{') => vec![serde_json::from_str(text).map_err(json_error)?],
        _ => {
            return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                // Valid JSON, but a number, string, null…
                Ok(_) => Err(RejectReason::BadShape),
                Err(_) => Err(RejectReason::NotJson),
            };
        }
    };
    let mut parsed = Parsed {
        events: Vec::with_capacity(raw.len()),
        ignored: 0,
    };
    for raw in &raw {
        raw.validate_into(&mut parsed)?;
    }
    Ok(parsed)
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
    let dotted = trimmed.ends_with('.');
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
        // A trailing ideographic full stop (`。`, `．`, `｡`) is the root's dot once mapped:
        // dropped like a `.` above, once.
        if !dotted && ascii.ends_with('.') {
            ascii.pop();
        }
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

    /// `recipient` and `response` are KumoMTA's: in one of our events they are unknown fields,
    /// ignored whatever their type; in a KumoMTA record they must have KumoMTA's shape.
    #[test]
    fn kumo_field_names_in_our_events_are_ignored() {
        let ours = br#"{"domain":"a.example","type":"delivered","response":"250 2.0.0 OK","recipient":["x@b.example"]}"#;
        let events = parse_message(ours).expect("an event with extra fields");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].domain, "a.example");
        assert_eq!(events[0].kind, EventType::Delivered);
        let bounce = br#"{"domain":"a.example","type":"bounced","code":"5.1.1","response":7}"#;
        assert_eq!(parse_message(bounce).expect("a bounce").len(), 1);
        let kumo = br#"{"type":"Delivery","recipient":"u@k.example","response":{"code":250,"content":"OK"}}"#;
        assert_eq!(
            parse_message(kumo).expect("a KumoMTA record")[0].domain,
            "k.example"
        );
        for bad in [
            br#"{"type":"Bounce","recipient":7,"response":{}}"#.as_slice(),
            br#"{"type":"Bounce","recipient":"u@k.example","response":"550 no"}"#,
        ] {
            assert_eq!(parse_message(bad), Err(RejectReason::BadShape));
        }
        // One of our events with a capitalised type and fields of its publisher's own is not a
        // KumoMTA record (those have a `response` and no `domain`): it is dead-lettered, not
        // acknowledged as an ignored record.
        for ours in [
            br#"{"domain":"a.com","type":"Delivered","recipient":"jo@a.com"}"#.as_slice(),
            br#"{"type":"Delivered","recipient":"jo@a.com"}"#,
            br#"{"domain":"a.com","type":"Delivered","recipient":"jo@a.com","response":{}}"#,
        ] {
            assert_eq!(
                parse_body(ours),
                Err(RejectReason::UnknownType),
                "{}",
                String::from_utf8_lossy(ours)
            );
        }
    }

    /// A field of the publisher's own nested past serde_json's recursion limit (128) is
    /// skipped like any unknown field (a review feared `not_json`).
    #[test]
    fn deep_nesting_in_an_unknown_field_is_skipped() {
        let deep = format!(
            r#"{{"domain":"a.com","type":"delivered","meta":{}{}}}"#,
            "[".repeat(1000),
            "]".repeat(1000)
        );
        assert_eq!(parse_message(deep.as_bytes()).map(|e| e.len()), Ok(1));
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
            // An ideographic full stop as the root's dot (UTS #46 maps it to `.`).
            ("example.com。", "example.com"),
            ("EXAMPLE.com．", "example.com"),
            ("例え.jp｡", "xn--r8jz45g.jp"),
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
        // One root dot, in whichever script: never two.
        for twice in ["example.com..", "example.com.。", "example.com。。"] {
            assert_eq!(
                normalize_domain(twice),
                Err(RejectReason::InvalidDomain),
                "{twice:?}"
            );
        }
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
        let cut_short =
            format!("[{}x]", r#"{"type":""},"#.repeat(MAX_BATCH_EVENTS + 1)).into_bytes();
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
            // Refused at its 10,001st item, before the rest is read (or built).
            (&cut_short, RejectReason::BatchTooLarge),
            (&huge, RejectReason::TooLarge),
        ];
        for (body, want) in cases {
            let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
            assert_eq!(parse_message(body), Err(want), "body {shown:?}");
        }
    }

    #[test]
    fn bounce_evidence_is_parsed_classified_and_written_back() {
        let bounce = |json: serde_json::Value| {
            let events = parse_message(&serde_json::to_vec(&json).unwrap()).unwrap();
            assert_eq!(events.len(), 1);
            events.into_iter().next().unwrap()
        };
        let old = bounce(serde_json::json!({"domain": "a.io", "type": "bounced"}));
        assert_eq!(
            (old.evidence.is_none(), old.tally()),
            (true, Tally::Bounced)
        );
        let unknown = bounce(serde_json::json!({"domain": "a.io", "type": "bounced",
            "code": "5.1.1", "smtp_code": 550, "diagnostic": "No such user"}));
        assert_eq!(unknown.tally(), Tally::Bounced);
        let full =
            bounce(serde_json::json!({"domain": "a.io", "type": "bounced", "code": "5.2.2"}));
        assert_eq!(full.tally(), Tally::OtherBounced);
        let text_only = bounce(
            serde_json::json!({"domain": "a.io", "type": "bounced", "smtp_code": 550, "diagnostic": "User unknown"}),
        );
        assert_eq!(text_only.tally(), Tally::Bounced);
        let spam = bounce(serde_json::json!({"domain": "a.io", "type": "bounced",
            "code": "5.7.1", "smtp_code": 554, "diagnostic": "rejected as spam"}));
        assert_eq!(spam.tally(), Tally::OtherBounced);
        // Evidence on a delivery is ignored, whatever its JSON type (a publisher's own
        // `"code": 250` was dead-lettered as `bad_shape`).
        for fields in [
            serde_json::json!({"code": "5.1.1"}),
            serde_json::json!({"code": 250, "smtp_code": "250", "diagnostic": {"text": "OK"}}),
            serde_json::json!({"smtp_code": 70000, "diagnostic": 7}),
        ] {
            let mut event = serde_json::json!({"domain": "a.io", "type": "delivered"});
            event
                .as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            let delivered = bounce(event);
            assert_eq!(
                (delivered.tally(), delivered.evidence),
                (Tally::Delivered, None),
                "{fields}"
            );
        }
        // `null` is absent.
        let nulls = bounce(serde_json::json!({"domain": "a.io", "type": "bounced",
            "code": null, "smtp_code": null, "diagnostic": null}));
        assert_eq!(
            (nulls.evidence.is_none(), nulls.tally()),
            (true, Tally::Bounced)
        );
        // What the producer writes reads back the same.
        let text = serde_json::to_string(&spam).unwrap();
        assert_eq!(
            text,
            r#"{"domain":"a.io","type":"bounced","code":"5.7.1","smtp_code":554,"diagnostic":"rejected as spam"}"#
        );
        assert_eq!(parse_message(text.as_bytes()).unwrap(), vec![spam]);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"domain":"a.io","type":"bounced"}"#
        );
        // A wrong value or a wrong JSON type on a bounce is invalid evidence (a wrong type
        // was `bad_shape`).
        for bad in [
            r#"{"domain":"a.io","type":"bounced","code":"5.1"}"#,
            r#"{"domain":"a.io","type":"bounced","code":"x"}"#,
            r#"{"domain":"a.io","type":"bounced","smtp_code":999}"#,
            r#"{"domain":"a.io","type":"bounced","smtp_code":"550"}"#,
            r#"{"domain":"a.io","type":"bounced","smtp_code":70000}"#,
            r#"{"domain":"a.io","type":"bounced","code":511}"#,
            r#"{"domain":"a.io","type":"bounced","diagnostic":["no such user"]}"#,
        ] {
            assert_eq!(
                parse_message(bad.as_bytes()),
                Err(RejectReason::InvalidEvidence),
                "{bad}"
            );
        }
        // Blank fields are absent (a publisher that cannot leave them out): the old format's
        // proof, not a dead letter; a blank diagnostic beside a code leaves the code to decide.
        let blank = bounce(serde_json::json!({"domain": "a.io", "type": "bounced",
            "code": "", "smtp_code": 0, "diagnostic": ""}));
        assert_eq!(
            (blank.evidence.is_none(), blank.tally()),
            (true, Tally::Bounced)
        );
        let blank_text = bounce(serde_json::json!({"domain": "a.io", "type": "bounced",
            "code": " ", "smtp_code": 550, "diagnostic": " "}));
        assert_eq!(blank_text.tally(), Tally::OtherBounced);
        let coded = bounce(serde_json::json!({"domain": "a.io", "type": "bounced",
            "code": "5.1.1", "smtp_code": 0, "diagnostic": ""}));
        assert_eq!(coded.tally(), Tally::Bounced);
    }

    #[test]
    fn kumomta_records_are_understood_as_they_are() {
        let record = |kind: &str, code: u16, enhanced: Option<(u16, u16, u16)>, content: &str| {
            serde_json::json!({
                "type": kind, "id": "1d98076abbbc11ed940250ebf67f93bd",
                "sender": "s@sender.example", "recipient": "User@Recipient.Example",
                "queue": "recipient.example", "site": "", "size": 1047,
                "response": {"code": code, "content": content, "command": "RCPT TO",
                    "enhanced_code": enhanced.map(|(class, subject, detail)|
                        serde_json::json!({"class": class, "subject": subject, "detail": detail}))},
                "timestamp": 1678069691, "meta": {}, "headers": {}
            })
            .to_string()
        };
        let parse = |body: String| parse_body(body.as_bytes()).unwrap();
        let delivered = parse(record("Delivery", 250, Some((2, 0, 0)), "OK"));
        assert_eq!(
            delivered.events,
            vec![Event::new("recipient.example", EventType::Delivered).unwrap()]
        );
        let unknown = parse(record("Bounce", 550, Some((5, 1, 1)), "user unknown"));
        assert_eq!(unknown.events[0].tally(), Tally::Bounced);
        assert_eq!(
            unknown.events[0]
                .evidence
                .as_ref()
                .unwrap()
                .code
                .unwrap()
                .to_string(),
            "5.1.1"
        );
        let full = parse(record("Bounce", 552, Some((5, 2, 2)), "mailbox full"));
        assert_eq!(full.events[0].tally(), Tally::OtherBounced);
        let plain = parse(record("Bounce", 550, None, "No such user here"));
        assert_eq!(plain.events[0].tally(), Tally::Bounced);
        for other in [
            "TransientFailure",
            "Reception",
            "Expiration",
            "AdminBounce",
            "OOB",
            "Feedback",
        ] {
            let parsed = parse(record(other, 451, Some((4, 7, 1)), "try later"));
            assert_eq!((parsed.events.len(), parsed.ignored), (0, 1), "{other}");
        }
        let bad = record("Delivery", 250, None, "OK").replace("User@Recipient.Example", "nobody@");
        assert_eq!(parse_body(bad.as_bytes()), Err(RejectReason::InvalidDomain));
        let bad = record("Delivery", 250, None, "OK").replace("User@Recipient.Example", "");
        assert_eq!(parse_body(bad.as_bytes()), Err(RejectReason::InvalidDomain));
        // No domain to count under: ignored, not counted under `postmaster` nor dead-lettered.
        for recipient in ["postmaster", "u@[192.0.2.1]", "u@[IPv6:2001:db8::1]"] {
            let record =
                record("Delivery", 250, None, "OK").replace("User@Recipient.Example", recipient);
            let parsed = parse(record);
            assert_eq!((parsed.events.len(), parsed.ignored), (0, 1), "{recipient}");
        }
        // A blank `content` is no evidence, as in our own events: the same count over AMQP as
        // once `POST /events` republished it as our event (it was `other_bounced` here).
        let blank = parse(
            r#"{"type":"Bounce","recipient":"u@k.example","response":{"content":" "}}"#.into(),
        );
        let ours = parse(r#"{"domain":"k.example","type":"bounced","diagnostic":" "}"#.into());
        assert_eq!(blank.events, ours.events);
        assert_eq!(blank.events[0].tally(), Tally::Bounced);
        // A capitalised type without a recipient is still an unknown type of ours.
        assert_eq!(
            parse_message(br#"{"domain":"a.com","type":"Delivery"}"#),
            Err(RejectReason::UnknownType)
        );
    }

    /// With `batch_handling = "BatchByDomain"` (KumoMTA 2025.12.02) a record's `recipient` is
    /// the list of the batch's recipients: an event each. It was `bad_shape` (dead-lettered).
    #[test]
    fn a_kumomta_record_of_a_batch_counts_each_recipient() {
        let record = |kind: &str, recipients: serde_json::Value| {
            serde_json::json!({"type": kind, "recipient": recipients, "queue": "k.example",
                "response": {"code": 550, "content": "user unknown",
                    "enhanced_code": {"class": 5, "subject": 1, "detail": 1}}})
            .to_string()
        };
        let parse = |body: String| parse_body(body.as_bytes());
        let delivered = parse(record(
            "Delivery",
            serde_json::json!(["a@K.example", "b@k.example"]),
        ))
        .unwrap();
        let one = Event::new("k.example", EventType::Delivered).unwrap();
        assert_eq!(delivered.events, vec![one.clone(), one]);
        let bounced = parse(record(
            "Bounce",
            serde_json::json!(["a@k.example", "b@k.example"]),
        ))
        .unwrap();
        assert_eq!(bounced.events.len(), 2);
        for event in &bounced.events {
            assert_eq!(event.tally(), Tally::Bounced);
            assert_eq!(
                event.evidence.as_ref().unwrap().code.unwrap().to_string(),
                "5.1.1"
            );
        }
        // Recipients without a domain are ignored, each; the others counted.
        let mixed = parse(record(
            "Delivery",
            serde_json::json!(["postmaster", "u@[192.0.2.1]", "c@k.example"]),
        ))
        .unwrap();
        assert_eq!((mixed.events.len(), mixed.ignored), (1, 2));
        // An uncounted type is one ignored record, whatever its recipients.
        let transient = parse(record(
            "TransientFailure",
            serde_json::json!(["a@k.example", "b@k.example"]),
        ))
        .unwrap();
        assert_eq!((transient.events.len(), transient.ignored), (0, 1));
        assert_eq!(
            parse(record("Delivery", serde_json::json!([]))),
            Err(RejectReason::InvalidDomain)
        );
        assert_eq!(
            parse(record("Delivery", serde_json::json!(["a@k.example", ""]))),
            Err(RejectReason::InvalidDomain)
        );
        assert_eq!(
            parse(record("Delivery", serde_json::json!([1, 2]))),
            Err(RejectReason::BadShape)
        );
        // One copy of the evidence for all recipients: a record of 10,000 recipients and a
        // 500 KB response made 10,000 copies of it (5 GB).
        let long = serde_json::json!({"type": "Bounce", "recipient": vec!["u@k.example"; 10_000],
            "response": {"code": 550, "content": "x".repeat(500_000)}})
        .to_string();
        let shared = parse(long).unwrap().events;
        assert_eq!(shared.len(), 10_000);
        let first = shared[0].evidence.as_ref().unwrap();
        assert!(
            shared
                .iter()
                .all(|event| Arc::ptr_eq(event.evidence.as_ref().unwrap(), first))
        );
        // The diagnostic is kept to its first 2 KiB (a character boundary): each recipient's
        // event is classified on it and carries it when republished.
        assert_eq!(
            first.diagnostic.as_deref().map(str::len),
            Some(MAX_DIAGNOSTIC_BYTES)
        );
        let wide = Evidence {
            diagnostic: Some(format!("a{}", "é".repeat(MAX_DIAGNOSTIC_BYTES))),
            ..Evidence::default()
        }
        .shared()
        .unwrap();
        let kept = wide.diagnostic.as_deref().unwrap();
        assert_eq!(
            (kept.len(), kept.chars().count()),
            (MAX_DIAGNOSTIC_BYTES - 1, 1024)
        );
        // Still 10,000 events a message at most.
        let many: Vec<String> = (0..=MAX_BATCH_EVENTS)
            .map(|i| format!("u{i}@k.example"))
            .collect();
        assert_eq!(
            parse(record("Delivery", serde_json::json!(many))),
            Err(RejectReason::BatchTooLarge)
        );
    }

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        let body = "\u{feff}{\"domain\":\"a.com\",\"type\":\"delivered\"}";
        assert_eq!(
            parse_message(body.as_bytes()),
            Ok(vec![Event::new("a.com", EventType::Delivered).unwrap()])
        );
        // Only a leading one.
        assert_eq!(
            parse_message("{\"domain\":\"a.com\",\"type\":\"delivered\"}\u{feff}".as_bytes()),
            Err(RejectReason::NotJson)
        );
    }

    #[test]
    fn reason_labels_are_unique() {
        let labels: std::collections::HashSet<_> =
            RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }
}
