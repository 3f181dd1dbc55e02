//! Bounce evidence (SPEC §3): which bounces prove that a recipient address does not exist.
//!
//! Only such a bounce says a domain is not catch-all: a catch-all domain accepts every address,
//! so it never answers "no such user". A full mailbox, a spam or policy block or a temporary
//! failure says nothing about catch-all, so those bounces are counted apart and never change a
//! domain's status. The table and its reasoning (RFC 3463, RFC 5321) are in the README.

/// How a bounce counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BounceKind {
    /// The recipient does not exist (`5.1.x` but those of [`NOT_THE_RECIPIENT`], a reply of
    /// 550, 551, 553 or 554 saying so, a provider's known reply), or the bounce carries no
    /// evidence at all (the original wire format): counts toward `not catch-all`.
    NoSuchRecipient,
    /// Any other bounce (mailbox full, policy, spam, temporary): counted apart.
    Other,
}

/// An RFC 3463 enhanced status code `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    pub class: u16,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    /// Parses `"5.1.1"`: class 2, 4 or 5, subject and detail of 1–3 digits (RFC 3463 §2).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let class = number(parts.next()?, 1)?;
        let subject = number(parts.next()?, 3)?;
        let detail = number(parts.next()?, 3)?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Self {
            class,
            subject,
            detail,
        })
    }
}

impl std::fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

fn number(text: &str, max_digits: usize) -> Option<u16> {
    if text.is_empty() || text.len() > max_digits || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Texts that servers without enhanced codes send when the recipient does not exist (lower
/// case; matched as substrings).
pub const UNKNOWN_RECIPIENT_TEXTS: &[&str] = &[
    "user unknown",
    "unknown user",
    "no such user",
    "no such mailbox",
    "no such recipient",
    "no such address",
    "unknown recipient",
    "recipient unknown",
    "invalid recipient",
    "invalid mailbox",
    "mailbox unavailable",
    "mailbox not found",
    "does not exist",
    "doesn't exist",
    "not a valid mailbox",
    "recipient rejected",
    "address rejected",
    "user not found",
    "unrouteable address",
    "recipient not found",
    "not a valid recipient",
    "no mailbox here",
    "unknown local part",
    // Yahoo and AOL: `554 delivery error: dd This user doesn't have a yahoo.com account`.
    "user doesn't have a",
];

/// Texts that mark a rejection as a policy decision even when they also match an
/// unknown-recipient text ("Recipient address rejected: Access denied").
pub const POLICY_TEXTS: &[&str] = &[
    "spam",
    "blocked",
    "blacklist",
    "blocklist",
    "denylist",
    "policy",
    "denied",
    "greylist",
    "graylist",
    "reputation",
    "rate limit",
    "too many",
    "quota",
    "full",
    // The sender's address refused, not the recipient's: Postfix's `Sender address rejected:
    // Domain not found`, Exim's `Sender verify failed`.
    "sender address",
    "sender verify",
    "sender domain",
    "sender's",
    "sender rejected",
    // The sending host refused, not the address: `550 Reverse DNS for your IP does not exist`,
    // `SPF check failed: domain does not exist`.
    "reverse dns",
    "rdns",
    "ptr",
    "spf",
    "dkim",
    "dmarc",
    "helo",
    "client host",
    "your ip",
];

/// True if `text` says the recipient does not exist, and not that a policy refused it. The
/// policy words count anywhere but inside the addresses of the text
/// (`<jo@fullstack.example>: … User unknown` is not a full mailbox); a host name or a URL keeps
/// them (`see https://www.spamhaus.org/…` is a block).
pub fn says_unknown_recipient(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    if !UNKNOWN_RECIPIENT_TEXTS.iter().any(|t| text.contains(t)) {
        return false;
    }
    let outside = without_addresses(&text);
    !POLICY_TEXTS.iter().any(|t| outside.contains(t))
}

/// `text` without its addresses: each `<…>` (closed) and each word holding an `@`, replaced by
/// a space.
fn without_addresses(text: &str) -> String {
    let mut kept = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        kept.push_str(&rest[..open]);
        kept.push(' ');
        rest = &rest[open + close + 1..];
    }
    kept.push_str(rest);
    kept.split_whitespace()
        .filter(|word| !word.contains('@'))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replies known to say "no such recipient" under an enhanced code that, by RFC 3463, says
/// something else: the code and a text it comes with (lower case, a substring).
///
/// - Microsoft 365's Directory-Based Edge Blocking, `550 5.4.1 Recipient address rejected:
///   Access denied. AS(201806281)`: the recipient is not in the tenant's directory.
pub const PROVIDER_UNKNOWN_RECIPIENT: &[(EnhancedCode, &str)] = &[(
    EnhancedCode {
        class: 5,
        subject: 4,
        detail: 1,
    },
    "as(201806281)",
)];

/// Reads a leading `"550 5.1.1 …"` or `"550-5.1.1 …"` from a server's text: the SMTP reply code
/// and the enhanced code, where present.
pub fn codes_in_text(text: &str) -> (Option<u16>, Option<EnhancedCode>) {
    let text = text.trim_start();
    // A DSN Diagnostic-Code (`smtp; 550 5.1.1 …`, as SES and Postmark pass it on).
    let text = match text.get(..5) {
        Some(prefix) if prefix.eq_ignore_ascii_case("smtp;") => text[5..].trim_start(),
        _ => text,
    };
    let mut smtp = None;
    let mut rest = text;
    if text.len() >= 3 && text.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
        let after = &text[3..];
        if after.is_empty() || after.starts_with([' ', '-']) {
            smtp = text[..3].parse().ok().filter(|c| (200..600).contains(c));
            rest = after.get(1..).unwrap_or("").trim_start();
        }
    }
    let enhanced = rest
        .split(|c: char| c.is_whitespace())
        .next()
        .and_then(EnhancedCode::parse);
    (smtp, enhanced)
}

/// The `5.1.x` details that do not say the recipient's address does not exist (RFC 3463,
/// RFC 3886): `5.1.3` bad address syntax and `5.1.4` ambiguous address (a catch-all domain's
/// server refuses those too), `5.1.5` destination address valid, `5.1.7` bad sender's mailbox
/// syntax, `5.1.8` bad sender's system address, `5.1.9` relayed to a non-compliant mailer. One
/// DNS fault on the sender's domain made every domain behind a `reject_unknown_sender_domain`
/// server `not catch-all`.
pub const NOT_THE_RECIPIENT: &[u16] = &[3, 4, 5, 7, 8, 9];

/// Codes that name no cause: `5.0.x` (other or undefined status), `5.1.0` (other address
/// status: Postfix sends it for an unknown *sender* too) and `5.5.0` (other protocol status:
/// Outlook.com answers an unknown recipient `550 5.5.0 Requested action not taken: mailbox
/// unavailable`). The reply code and the text decide, and a more precise code in the text wins
/// over such a code in a field (SendGrid's `status: "5.0.0"` beside `550 5.1.10 …`).
pub fn names_no_cause(code: EnhancedCode) -> bool {
    code.class == 5 && (code.subject == 0 || (code.detail == 0 && matches!(code.subject, 1 | 5)))
}

/// Classifies a bounce from its evidence (SPEC §3):
///
/// - no evidence at all → [`BounceKind::NoSuchRecipient`] (the original wire format);
/// - an enhanced code `5.1.x` → `NoSuchRecipient` (but the details of [`NOT_THE_RECIPIENT`]
///   → `Other`); a code and text of [`PROVIDER_UNKNOWN_RECIPIENT`] → `NoSuchRecipient`; any
///   other defined code (`4.x.x`, `5.2.x` mailbox full, `5.7.x` policy…) →
///   [`BounceKind::Other`]; a code that names no cause ([`names_no_cause`]: `5.0.x`, `5.1.0`,
///   `5.5.0`) leaves it to the reply code and text;
/// - otherwise a 550, 551, 553 or 554 reply whose text says the user is unknown →
///   `NoSuchRecipient`; anything else → `Other`.
///
/// Codes missing from the fields are read from the start of the text (`"550 5.1.1 …"`).
pub fn classify(
    code: Option<EnhancedCode>,
    smtp_code: Option<u16>,
    diagnostic: Option<&str>,
) -> BounceKind {
    if code.is_none() && smtp_code.is_none() && diagnostic.is_none() {
        return BounceKind::NoSuchRecipient;
    }
    let (text_smtp, text_code) = diagnostic.map(codes_in_text).unwrap_or_default();
    let smtp_code = smtp_code.or(text_smtp);
    let code = match code {
        Some(c) if names_no_cause(c) => text_code.or(code),
        _ => code.or(text_code),
    };
    match code {
        Some(c) if names_no_cause(c) => {}
        Some(c) if c.class == 5 && c.subject == 1 && !NOT_THE_RECIPIENT.contains(&c.detail) => {
            return BounceKind::NoSuchRecipient;
        }
        Some(c)
            if PROVIDER_UNKNOWN_RECIPIENT.iter().any(|(known, words)| {
                *known == c
                    && diagnostic.is_some_and(|text| text.to_ascii_lowercase().contains(words))
            }) =>
        {
            return BounceKind::NoSuchRecipient;
        }
        Some(_) => return BounceKind::Other,
        None => {}
    }
    match (smtp_code, diagnostic) {
        (Some(550 | 551 | 553 | 554), Some(text)) if says_unknown_recipient(text) => {
            BounceKind::NoSuchRecipient
        }
        _ => BounceKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BounceKind::*;

    fn code(s: &str) -> Option<EnhancedCode> {
        Some(EnhancedCode::parse(s).expect("valid code"))
    }

    #[test]
    fn parses_enhanced_codes() {
        assert_eq!(
            EnhancedCode::parse("5.1.1"),
            Some(EnhancedCode {
                class: 5,
                subject: 1,
                detail: 1
            })
        );
        assert_eq!(
            EnhancedCode::parse(" 4.7.123 ").unwrap().to_string(),
            "4.7.123"
        );
        for bad in [
            "", "5", "5.1", "5.1.1.1", "3.1.1", "55.1.1", "5.1234.1", "5.a.1", "5..1",
        ] {
            assert_eq!(EnhancedCode::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_codes_from_text() {
        assert_eq!(
            codes_in_text("550 5.1.1 <a@b.c>: Recipient address rejected"),
            (Some(550), code("5.1.1"))
        );
        assert_eq!(
            codes_in_text("550-5.7.1 blocked"),
            (Some(550), code("5.7.1"))
        );
        assert_eq!(codes_in_text("550 User unknown"), (Some(550), None));
        assert_eq!(codes_in_text("host said: no"), (None, None));
        assert_eq!(
            codes_in_text("smtp; 550 5.1.1 user unknown"),
            (Some(550), code("5.1.1"))
        );
        assert_eq!(codes_in_text("5.2.2 mailbox full"), (None, code("5.2.2")));
    }

    #[test]
    fn classifies_per_the_table() {
        type Case = (
            Option<&'static str>,
            Option<u16>,
            Option<&'static str>,
            BounceKind,
        );
        let cases: &[Case] = &[
            (None, None, None, NoSuchRecipient),
            (
                Some("5.1.1"),
                Some(550),
                Some("user unknown"),
                NoSuchRecipient,
            ),
            (Some("5.1.1"), None, None, NoSuchRecipient),
            (Some("5.1.2"), None, None, NoSuchRecipient),
            (Some("5.1.10"), None, None, NoSuchRecipient),
            (Some("5.1.6"), None, None, NoSuchRecipient),
            // Bad syntax or an ambiguous address: a catch-all domain refuses those too.
            (
                Some("5.1.3"),
                Some(553),
                Some(
                    "The recipient address <jo..doe@acme.example> is not a valid RFC-5321 address",
                ),
                Other,
            ),
            (Some("5.1.4"), None, None, Other),
            // Outlook.com's unknown recipient under 5.5.0; 5.5.0 for anything else.
            (
                Some("5.5.0"),
                Some(550),
                Some("Requested action not taken: mailbox unavailable (S2017062302)"),
                NoSuchRecipient,
            ),
            (Some("5.5.0"), Some(554), Some("Transaction failed"), Other),
            // Microsoft 365's Directory-Based Edge Blocking, and 5.4.1 without its tag.
            (
                Some("5.4.1"),
                Some(550),
                Some("5.4.1 Recipient address rejected: Access denied. AS(201806281)"),
                NoSuchRecipient,
            ),
            (
                Some("5.4.1"),
                Some(550),
                Some("Recipient address rejected: Access denied"),
                Other,
            ),
            // Yahoo and AOL: a 554 without an enhanced code (Postfix logs dsn=5.0.0).
            (
                Some("5.0.0"),
                Some(554),
                Some(
                    "delivery error: dd This user doesn't have a yahoo.com account (jo@yahoo.com) [0] - mta1",
                ),
                NoSuchRecipient,
            ),
            (
                None,
                Some(554),
                Some(
                    "delivery error: dd Sorry your message to jo@yahoo.com cannot be delivered. This mailbox is disabled (554.30)",
                ),
                Other,
            ),
            // A code that names no cause in a field, a precise one in the text: the text's.
            (
                Some("5.0.0"),
                Some(550),
                Some(
                    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
                ),
                NoSuchRecipient,
            ),
            (
                Some("5.0.0"),
                None,
                Some("smtp; 550 5.2.2 user unknown: mailbox full"),
                Other,
            ),
            // Policy words inside an address are not policy.
            (
                Some("5.1.0"),
                Some(550),
                Some("<jo@fullstack.example>: Recipient address rejected: User unknown"),
                NoSuchRecipient,
            ),
            (
                None,
                Some(550),
                Some("No such user: jo@spam-free.example"),
                NoSuchRecipient,
            ),
            // A block named only by a host name or a URL is still a block.
            (
                None,
                Some(550),
                Some("Recipient rejected - see https://www.spamhaus.org/query/ip/203.0.113.9"),
                Other,
            ),
            (
                None,
                Some(550),
                Some("mailbox unavailable: 203.0.113.9 listed at zen.spamhaus.org"),
                Other,
            ),
            (
                None,
                Some(550),
                Some("size < 10MB; user unknown: mailbox full"),
                Other,
            ),
            (
                None,
                Some(550),
                Some("User unknown (antispam gateway)"),
                Other,
            ),
            // The sending host refused, not the address.
            (
                None,
                Some(550),
                Some("Reverse DNS for your IP does not exist"),
                Other,
            ),
            (
                None,
                Some(550),
                Some("SPF check failed: domain does not exist"),
                Other,
            ),
            (
                None,
                Some(550),
                Some("Recipient not found"),
                NoSuchRecipient,
            ),
            // The sender's address refused, or the recipient's valid: no proof.
            (
                Some("5.1.8"),
                Some(550),
                Some("<b@esp.example>: Sender address rejected: Domain not found"),
                Other,
            ),
            (Some("5.1.7"), Some(553), None, Other),
            (Some("5.1.5"), None, None, Other),
            (
                None,
                Some(550),
                Some("<b@esp.example>: Sender address rejected: Domain not found"),
                Other,
            ),
            (None, Some(550), Some("Sender verify failed"), Other),
            (
                None,
                Some(550),
                Some("The sender's domain does not exist"),
                Other,
            ),
            (
                None,
                Some(550),
                Some("Sender rejected: user unknown"),
                Other,
            ),
            (
                Some("5.1.0"),
                Some(550),
                Some(
                    "<b@esp.example>: Sender address rejected: User unknown in virtual mailbox table",
                ),
                Other,
            ),
            (
                None,
                None,
                Some("550 5.1.0 <b@esp.example>: Sender address rejected: User unknown"),
                Other,
            ),
            (
                Some("5.1.0"),
                Some(550),
                Some("<jo@example.com>: Recipient address rejected: User unknown"),
                NoSuchRecipient,
            ),
            (
                Some("5.1.0"),
                Some(550),
                Some("Address rejected"),
                NoSuchRecipient,
            ),
            (Some("5.1.0"), Some(554), Some("Rejected"), Other),
            // "sender" alone is not the sender's refusal.
            (
                None,
                Some(550),
                Some("No such user here (sender b@esp.example notified)"),
                NoSuchRecipient,
            ),
            (Some("5.2.2"), Some(552), Some("Mailbox full"), Other),
            (Some("5.7.1"), Some(554), Some("spam"), Other),
            (Some("4.1.1"), Some(450), None, Other),
            (Some("4.2.2"), None, None, Other),
            (Some("5.4.4"), None, None, Other),
            (
                Some("5.0.0"),
                Some(550),
                Some("User unknown"),
                NoSuchRecipient,
            ),
            (Some("5.0.0"), Some(550), Some("message rejected"), Other),
            (None, Some(550), Some("User unknown"), NoSuchRecipient),
            (
                None,
                Some(550),
                Some("Requested action not taken: mailbox unavailable"),
                NoSuchRecipient,
            ),
            (
                None,
                Some(551),
                Some("User not local; no such user"),
                NoSuchRecipient,
            ),
            (
                None,
                Some(553),
                Some("sorry, that address does not exist"),
                NoSuchRecipient,
            ),
            (
                None,
                Some(550),
                Some("Recipient address rejected: Access denied"),
                Other,
            ),
            (None, Some(550), Some("rejected as spam"), Other),
            (None, Some(552), Some("user unknown"), Other),
            (None, Some(450), Some("user unknown"), Other),
            (None, Some(550), None, Other),
            (
                None,
                None,
                Some("550 5.1.1 The email account does not exist"),
                NoSuchRecipient,
            ),
            (None, None, Some("550 no such user here"), NoSuchRecipient),
            (None, None, Some("552 5.2.2 over quota"), Other),
            (None, None, Some("connection timed out"), Other),
        ];
        for (c, smtp, text, want) in cases {
            let c = c.and_then(EnhancedCode::parse);
            assert_eq!(classify(c, *smtp, *text), *want, "{c:?} {smtp:?} {text:?}");
        }
    }
}
