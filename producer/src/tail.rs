//! `tail FILE --format postfix|exim` (SPEC §7): follows an MTA's log like `tail -F` and turns
//! its delivery lines into events.
//!
//! - **Rotation by rename** (`postfix logrotate`, logrotate without `copytruncate`): the open
//!   file is read to its end, then the new file at the path is followed from its start. The old
//!   file is finished once the writer has moved on (the new file has data) or after a grace
//!   period, so lines written just before the writer reopened are not lost.
//! - **Truncation** (`copytruncate`): a file shorter than the position, or whose bytes just
//!   before the position are no longer those read there (emptied and written again past the
//!   position, while stopped or between two looks), is read again from 0.
//! - **Restarts**: the position (device, inode, offset) is saved in the state file after each
//!   chunk of lines is confirmed by the broker. On start, the file with the saved identity is
//!   found again — at the path, or renamed beside it — and read on from the saved offset, so a
//!   restart skips nothing.
//! - **Nothing counted twice**: each event's `message_id` is a UUIDv5 of the file identity, the
//!   line's offset and its content, so a line published again (a crash between the confirm and
//!   the state write, a state file lost) is skipped by the worker's deduplication.

use crate::publisher::{Outgoing, Publisher};
use anyhow::Context;
use catchall::bounce::{EnhancedCode, codes_in_text};
use catchall::event::{Event, EventType, Evidence};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Which MTA wrote the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Postfix `to=<…>, … dsn=…, status=sent|bounced (…)` lines.
    Postfix,
    /// Exim main log `=>`/`->` (delivered) and `**` (bounced) lines.
    Exim,
}

/// What `tail` follows and where it keeps its position.
#[derive(Debug, Clone)]
pub struct TailSettings {
    pub file: PathBuf,
    pub format: LogFormat,
    /// Where the position is saved; without one, every start reads the file from its start
    /// (deduplication still counts each line once).
    pub state: Option<PathBuf>,
    /// How often the file is checked for new lines, rotation and truncation at its end.
    pub poll: Duration,
    /// Count hops to a loopback address too (see [`is_loopback_hop`]): for a test bench whose
    /// receiving servers run on this host.
    pub count_loopback: bool,
}

/// Longest read at once; a line longer than this is skipped.
const CHUNK_BYTES: usize = 256 * 1024;
/// How long a rotated file is still read after a new file appeared that stays empty.
const ROTATION_GRACE: Duration = Duration::from_secs(5);
/// Namespace of the line ids (UUIDv5), fixed so ids are stable across versions and hosts.
const LINE_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6361_7463_6861_6c6c_2d74_6169_6c2d_6964);

/// The `message_id` of a log line: stable for the same line at the same place in the same file.
pub fn line_id(dev: u64, ino: u64, offset: u64, line: &[u8]) -> String {
    let mut name = format!("{dev}:{ino}:{offset}:").into_bytes();
    name.extend_from_slice(line);
    uuid::Uuid::new_v5(&LINE_NAMESPACE, &name).to_string()
}

/// The delivery or bounce a log line records, and whether it was a hop to a loopback address
/// ([`is_loopback_hop`]).
fn parse_hop(format: LogFormat, line: &str) -> Option<(Event, bool)> {
    match format {
        LogFormat::Postfix => parse_postfix(line),
        LogFormat::Exim => parse_exim(line),
    }
}

/// The domain of an address (`user@Example.com` → `example.com`), if valid.
fn event_for(address: &str, kind: EventType) -> Option<Event> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (_, domain) = address.rsplit_once('@')?;
    Event::new(domain, kind).ok()
}

/// `… postfix/smtp[123]: 4Qk1ABC: to=<a@b.example>, relay=…, dsn=5.1.1, status=bounced (host
/// … said: 550 5.1.1 … (in reply to RCPT TO command))`. `orig_to=<…>` is not the recipient.
///
/// Only a delivery agent's line counts: right after the program's `name[pid]: ` come a queue id
/// and `to=<`, and the fields are read in their order, each address to its closing `>` outside
/// quotes. Everything else a sender can put in the log (a `from=<…>` or a refused `to=<…>` of an
/// `NOQUEUE: reject:` line, a quoted local part such as `"x, status=sent y"@d`) is never read as
/// a field, so it cannot forge a delivery or turn a bounce into one.
fn parse_postfix(line: &str) -> Option<(Event, bool)> {
    let message = match syslog_5424(line)? {
        // Never also read as RFC 3164: its `]: ` could be found in a sender's address.
        Some(message) => message,
        // RFC 3164, also behind a `<PRI>` (rsyslog's `%rawmsg%`, forwarding templates).
        None => {
            let line = line
                .strip_prefix('<')
                .and_then(|rest| rest.split_once('>'))
                .filter(|(pri, _)| is_pri(pri))
                .map_or(line, |(_, rest)| rest);
            &line[line.find("]: ")? + "]: ".len()..]
        }
    };
    let (queue_id, fields) = message.split_once(": to=<")?;
    if queue_id.is_empty() || !queue_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    // Postfix before 3.5 (and `info_log_address_format = internal`) logs a local part
    // unquoted. Postfix writes its own fields right after the address's `>`: `, orig_to=<…>`,
    // then `, relay=` first and `, status=` last. So:
    // - A `"` with no partner (`a"@evil.example`) makes an address run on past Postfix's `>`
    //   and fields, into the remote server's text: an address holding `>, relay=` or
    //   `>, orig_to=<` is such a run-on.
    // - A sender's `>` (`a@victim.example>, relay=x, status=sent x"@evil.example`) closes the
    //   address early: its forged fields are then followed by Postfix's own `>, relay=`, which
    //   may not come before the last `, status=`.
    // The remote server's text after the status may hold `, relay=`, `, status=` and `, dsn=`:
    // it is only read as text (unless it also holds `>, relay=` before a `, status=`).
    let run_on = |address: &str| address.contains(">, relay=") || address.contains(">, orig_to=<");
    let (recipient, mut rest) = address_until(fields, |c| c == '>')?;
    if run_on(recipient) {
        return None;
    }
    if let Some(after) = rest.strip_prefix(", orig_to=<") {
        let (original, after) = address_until(after, |c| c == '>')?;
        if run_on(original) {
            return None;
        }
        rest = after;
    }
    let last_status = rest.rfind(", status=")?;
    if !rest.starts_with(", relay=") || rest[..last_status].contains(">, relay=") {
        return None;
    }
    // relay=, delay=, delays=, dsn= are Postfix's own (host names, numbers): the first
    // `status=` field after the addresses is the status.
    let status_at = rest.find(", status=")? + ", status=".len();
    let status = &rest[status_at..];
    let (word, text) = status.split_once(' ').unwrap_or((status, ""));
    let kind = match word {
        "sent" => EventType::Delivered,
        "bounced" => EventType::Bounced,
        _ => return None, // deferred, expired, undeliverable (address verification)…
    };
    let relay = rest[..status_at]
        .split(", ")
        .find_map(|field| field.strip_prefix("relay="));
    let loopback = relay.is_some_and(is_loopback_hop);
    // `postfix/discard` logs a message it threw away as sent to `relay=none`: not delivered.
    if kind == EventType::Delivered && relay == Some("none") {
        return None;
    }
    let event = event_for(recipient, kind)?;
    if kind == EventType::Delivered {
        return Some((event, loopback));
    }
    let code = rest[..status_at]
        .find(", dsn=")
        .map(|at| &rest[at + ", dsn=".len()..])
        .and_then(|dsn| dsn.split(',').next())
        .and_then(EnhancedCode::parse);
    let text = text.trim();
    let text = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(text);
    // The remote server's words follow "said: "; otherwise the text is Postfix's own.
    let diagnostic = text.split_once(" said: ").map_or(text, |(_, said)| said);
    let (smtp_code, _) = codes_in_text(diagnostic);
    let evidence = Evidence {
        code,
        smtp_code,
        diagnostic: (!diagnostic.is_empty()).then(|| diagnostic.to_string()),
    };
    Some((event.with_evidence(evidence), loopback))
}

/// The message of an RFC 5424 syslog line (`<22>1 2026-11-25T02:38:01.123+00:00 mx1
/// postfix/smtp 14877 - - 843D3990178: to=<…>`, rsyslog's `RSYSLOG_SyslogProtocol23Format`):
/// the header read field by field, structured data (`-`, or `[id key="value"]…` with `\"`,
/// `\\` and `\]` escaped in values) passed over. It used to be read as RFC 3164, which found no
/// `]: ` (every line skipped), or one in a sender's address.
///
/// `Some(None)` when the line is not RFC 5424 (no `<PRI>1 `); `None` when it is one whose
/// header does not parse (the line is skipped).
fn syslog_5424(line: &str) -> Option<Option<&str>> {
    let Some(rest) = line
        .strip_prefix('<')
        .and_then(|rest| rest.split_once('>'))
        .filter(|(pri, _)| is_pri(pri))
        .and_then(|(_, rest)| rest.strip_prefix("1 "))
    else {
        return Some(None);
    };
    rfc5424_message(rest).map(Some)
}

/// A syslog priority: one to three digits.
fn is_pri(pri: &str) -> bool {
    !pri.is_empty() && pri.len() <= 3 && pri.bytes().all(|b| b.is_ascii_digit())
}

/// The message of an RFC 5424 line after its `<PRI>1 `.
fn rfc5424_message(rest: &str) -> Option<&str> {
    // TIMESTAMP HOSTNAME APP-NAME PROCID MSGID: no spaces in any of them.
    let mut fields = rest.splitn(6, ' ');
    for _ in 0..5 {
        fields.next().filter(|field| !field.is_empty())?;
    }
    let mut rest = fields.next()?;
    if let Some(after) = rest.strip_prefix('-') {
        rest = after;
    } else {
        // `[id key="value"]…`: values quoted, with `\"`, `\\` and `\]` escaped.
        while let Some(element) = rest.strip_prefix('[') {
            rest = address_until(element, |c| c == ']')?.1;
        }
    }
    // rsyslog's own message text starts with a space of its own: two after the header.
    let message = rest.trim_start_matches(' ');
    Some(message.strip_prefix('\u{feff}').unwrap_or(message))
}

/// An address that ends at the first character `end` accepts outside double quotes (`>` for
/// Postfix, a space or comma for Exim: both log a quoted local part as it was given), and what
/// follows that character. `None` when no such character comes.
fn address_until(text: &str, end: impl Fn(char) -> bool) -> Option<(&str, &str)> {
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if !quoted && end(c) => return Some((&text[..at], &text[at + c.len_utf8()..])),
            _ => {}
        }
    }
    None
}

/// True for a hop to this host's own loopback address (`relay=localhost[127.0.0.1]:10024`,
/// Exim's `H=127.0.0.1 [127.0.0.1]:10024`): a content filter such as amavis or a DKIM proxy,
/// which hands the message back to the MTA, whose delivery onwards is logged again. Counting the
/// hop as well would count the recipient twice, and a filter's refusal is not the recipient
/// domain's answer. `host` is the field's value; the address is the first `[…]` in it.
fn is_loopback_hop(host: &str) -> bool {
    let Some((_, after)) = host.split_once('[') else {
        return false;
    };
    let Some((address, _)) = after.split_once(']') else {
        return false;
    };
    let address = address
        .strip_prefix("IPv6:")
        .or_else(|| address.strip_prefix("ipv6:"))
        .unwrap_or(address);
    address
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// True for an Exim message id: `1tFxyz-0001ab-Cd` (or the longer 4.97+ form).
fn is_exim_id(token: &str) -> bool {
    let parts: Vec<&str> = token.split('-').collect();
    parts.len() == 3
        && parts[0].len() == 6
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// `2026-11-25 02:40:00 [pid] 1tFxyz-0001ab-Cd => a@b.example R=… C="250 …"` (delivered),
/// `->` (another address delivered in the same transaction), `** a@b.example R=… : SMTP error
/// from remote mail server after RCPT TO:<a@b.example>: 550 5.1.1 …` (bounced).
fn parse_exim(line: &str) -> Option<(Event, bool)> {
    let tokens: Vec<&str> = line.splitn(8, ' ').collect();
    let at = (1..tokens.len().min(6))
        .find(|&i| matches!(tokens[i], "=>" | "->" | "**") && is_exim_id(tokens[i - 1]))?;
    // Only the time stamp (date, time, zone) and `[pid]` may come before the message id: a
    // reject line's `H=… F=<…>` holds what a sender chose, which may look like an id and a marker.
    let stamp = |token: &str| {
        token
            .bytes()
            .all(|b| b.is_ascii_digit() || b"-:.+[]".contains(&b))
    };
    if !tokens[..at - 1].iter().all(|t| stamp(t)) {
        return None;
    }
    let kind = if tokens[at] == "**" {
        EventType::Bounced
    } else {
        EventType::Delivered
    };
    let marker = line.find(&format!("{} {} ", tokens[at - 1], tokens[at]))?
        + tokens[at - 1].len()
        + tokens[at].len()
        + 2;
    let rest = &line[marker..];
    // The address up to a space or comma outside quotes: a quoted local part such as
    // `"x@target.example y"@evil.example` is one address, at evil.example. A quote never
    // closed: not an address.
    let (address, mut fields) = match address_until(rest, |c| c == ' ' || c == ',') {
        Some(split) => split,
        None if !rest.contains('"') => (rest, ""),
        None => return None,
    };
    // `** a@b.example: Unrouteable address`: the reason follows the address.
    let reason_follows = address.ends_with(':');
    let address = address.trim_end_matches(':');
    // Before the fields Exim writes itself (`R=… T=… H=host [ip]:port`) may come addresses
    // holding anything a sender chose: parents (`<pat@alias.example>`, several with
    // `+all_parents`), `F=<sender>` and `P=<return path>` (`+sender_on_delivery`,
    // `+return_path_on_delivery`). Each is passed over to its `>` outside quotes.
    loop {
        fields = fields.trim_start();
        let Some(quoted) = ["<", "F=<", "P=<"]
            .iter()
            .find_map(|opening| fields.strip_prefix(opening))
        else {
            break;
        };
        fields = address_until(quoted, |c| c == '>').map_or("", |(_, after)| after);
    }
    let mut tokens = fields.split(' ');
    let host = tokens
        .by_ref()
        .find_map(|token| token.strip_prefix("H="))
        .map(|name| format!("{name} {}", tokens.next().unwrap_or("")));
    let loopback = host.as_deref().is_some_and(is_loopback_hop);
    let event = event_for(address, kind)?;
    if kind == EventType::Delivered {
        return Some((event, loopback));
    }
    // The reason, read past the addresses passed over above (a sender's `F=<…>` may hold any
    // text, "SMTP error from remote mail server after …: 550 5.1.1" included): after the
    // address's own `:`, or after Exim's fields (`R=… T=… H=host [ip]: reason`).
    let reason = if reason_follows {
        fields
    } else {
        after_colon_outside_quotes(fields)
    };
    const REMOTE: &str = "SMTP error from remote mail server after ";
    let diagnostic = match reason.trim_start().strip_prefix(REMOTE) {
        // `MAIL FROM:<…> SIZE=1234: 553 …`, `RCPT TO:<…>: 550 …`, `end of data: 554 …`.
        Some(command) => after_command(command),
        None => reason,
    }
    .trim();
    // A bounce logged without a reason (`** a@b.example R=virtual_aliases:`) proves nothing:
    // what Exim wrote is its evidence, so it is not counted as the bare old format's proof.
    let diagnostic = match diagnostic {
        "" => fields.trim().trim_end_matches(':').trim(),
        text => text,
    };
    let diagnostic = if diagnostic.is_empty() {
        "no reason logged"
    } else {
        diagnostic
    };
    let (smtp_code, code) = codes_in_text(diagnostic);
    let evidence = Evidence {
        code,
        smtp_code,
        diagnostic: Some(diagnostic.to_string()),
    };
    Some((event.with_evidence(evidence), loopback))
}

/// What follows the first `: ` outside double quotes (`DN="O=Acme: Mail"` with Exim's
/// `+tls_peerdn` comes before the reason), or `""`.
fn after_colon_outside_quotes(mut text: &str) -> &str {
    while let Some((_, after)) = address_until(text, |c| c == ':') {
        if let Some(reason) = after.strip_prefix(' ') {
            return reason;
        }
        text = after;
    }
    ""
}

/// What follows the SMTP command an Exim remote error names: past its first `: ` outside an
/// address in `<…>` (whose local part a sender chose and may hold `: 550 5.1.1`).
fn after_command(mut command: &str) -> &str {
    loop {
        let colon = command.find(": ");
        match command.find('<') {
            Some(open) if colon.is_none_or(|colon| open < colon) => {
                match address_until(&command[open + 1..], |c| c == '>') {
                    Some((_, after)) => command = after,
                    None => return "",
                }
            }
            _ => return colon.map_or("", |colon| &command[colon + 2..]),
        }
    }
}

/// Bytes of the file kept from just before the position (see [`Source::rewritten`]).
const PRINT_BYTES: usize = 64;

/// The file being read and where.
struct Source {
    file: std::fs::File,
    dev: u64,
    ino: u64,
    /// The file identity its lines' ids are made of ([`line_id`]): its own, except for a copy
    /// finishing the file it copied (a `copytruncate`), and a file resumed by its inode alone
    /// (its device numbered anew), which keep the identity the lines were read under before. So
    /// a line read again after a restart (the tailer stopped between a chunk's confirm and the
    /// save of its position) has the id it was published under, and counts once; read from the
    /// copy, or under the new device number, it had a new id and counted twice.
    ids: (u64, u64),
    offset: u64,
    /// The last bytes read, up to [`PRINT_BYTES`], ending at `offset` (empty: not known).
    before: Vec<u8>,
}

impl Source {
    fn open(path: &Path, offset: u64) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        Ok(Self {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            ids: (meta.dev(), meta.ino()),
            offset,
            before: Vec::new(),
        })
    }

    fn is(&self, meta: &std::fs::Metadata) -> bool {
        (meta.dev(), meta.ino()) == (self.dev, self.ino)
    }

    /// True when the bytes before the position are no longer those read there: the file was
    /// emptied in place and written again past the position (`copytruncate` while the tailer
    /// was stopped, or between two of its looks), or its identity is another file's now (an
    /// inode reused). Reading on at the position would skip the new lines before it and start
    /// in the middle of one.
    fn rewritten(&self) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let Some(start) = self.offset.checked_sub(self.before.len() as u64) else {
            return Ok(true);
        };
        if self.before.is_empty() {
            return Ok(false);
        }
        let mut found = vec![0; self.before.len()];
        match self.file.read_exact_at(&mut found, start) {
            Ok(()) => Ok(found != self.before),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Moves the position past `read`, the bytes that followed it.
    fn advance(&mut self, read: &[u8]) {
        self.before.extend_from_slice(read);
        let excess = self.before.len().saturating_sub(PRINT_BYTES);
        self.before.drain(..excess);
        self.offset += read.len() as u64;
    }

    /// Back to the start of the file.
    fn rewind(&mut self) {
        self.offset = 0;
        self.before.clear();
    }
}

/// Counts of one run, for the summary line.
#[derive(Debug, Default, Clone, Copy)]
pub struct TailStats {
    pub lines: u64,
    pub events: u64,
    pub rotations: u64,
    pub truncations: u64,
    /// Deliveries and bounces to a loopback address, not counted (content-filter hops).
    pub loopback_hops: u64,
}

/// A saved position: device, inode, offset, and the bytes before it (hex; empty in a state
/// file written before they were kept).
/// A saved position: the file (device, inode), the offset, the bytes before it, and the
/// identity the file's line ids are made of ([`Source::ids`]; its own in state files of older
/// releases).
#[derive(Debug, PartialEq, Eq)]
struct Saved {
    dev: u64,
    ino: u64,
    offset: u64,
    before: Vec<u8>,
    ids: (u64, u64),
}

fn load_state(path: &Path) -> anyhow::Result<Option<Saved>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a tail state file", path.display()))?;
    let field = |name: &str| {
        value[name]
            .as_u64()
            .with_context(|| format!("{}: no `{name}`", path.display()))
    };
    let before = match value["before"].as_str() {
        Some(hex) => catchall::hex::decode(hex)
            .with_context(|| format!("{}: `before` is not hex", path.display()))?,
        None => Vec::new(),
    };
    let (dev, ino) = (field("dev")?, field("ino")?);
    let ids = match (value["id_dev"].as_u64(), value["id_ino"].as_u64()) {
        (Some(id_dev), Some(id_ino)) => (id_dev, id_ino),
        _ => (dev, ino),
    };
    Ok(Some(Saved {
        dev,
        ino,
        offset: field("offset")?,
        before,
        ids,
    }))
}

fn save_state(path: &Path, source: &Source) -> anyhow::Result<()> {
    let text = serde_json::json!({
        "dev": source.dev,
        "ino": source.ino,
        // Saved too: a copy's lines keep the ids of the file it copied after a restart (they
        // were made of the copy's own identity then, and a chunk read again counted twice).
        "id_dev": source.ids.0,
        "id_ino": source.ids.1,
        "offset": source.offset,
        "before": catchall::hex::encode(&source.before),
    })
    .to_string();
    // `<state>.tmp` (not `with_extension`: `mail.postfix` and `mail.exim` would share
    // `mail.tmp`), synced before the rename and the directory after it, so a power loss leaves
    // the old position or the new one, never an empty file.
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let dir = dir_of(path);
    std::fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Finds the file a saved state points to: the path itself, or a file renamed beside it. Its
/// device and inode first; then the inode alone, as the files are in one directory, so on one
/// file system, whose device number may have changed since (btrfs, LVM and NFS may number
/// theirs anew at each mount): it was not found after such a reboot, and the current file was
/// read again from its start under new ids, every line counted twice. (An inode reused by
/// another file is told by the bytes before the position, [`Source::rewritten`].)
fn find_saved(path: &Path, dev: u64, ino: u64, by_inode: bool) -> Option<PathBuf> {
    let beside = || {
        std::fs::read_dir(dir_of(path))
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
    };
    let find = |same: &dyn Fn(&std::fs::Metadata) -> bool| {
        std::iter::once(path.to_path_buf())
            .chain(beside())
            .find(|candidate| std::fs::metadata(candidate).is_ok_and(|meta| same(&meta)))
    };
    find(&|meta| (meta.dev(), meta.ino()) == (dev, ino)).or_else(|| {
        by_inode
            .then(|| find(&|meta| meta.is_file() && meta.ino() == ino))
            .flatten()
    })
}

/// `current` was found emptied (`how`) while followed: its copy to finish first, saved as the
/// position (see [`copy_of`]), or else `current` rewound to its start.
fn truncated(
    path: &Path,
    current: &mut Source,
    settings: &TailSettings,
    stats: &mut TailStats,
    how: &str,
) -> anyhow::Result<Option<Source>> {
    stats.truncations += 1;
    if let Some(copy) = copy_of(path, current)? {
        persist(settings, &copy)?;
        return Ok(Some(copy));
    }
    tracing::info!(file = %path.display(), "Log {how}; reading it from its start.");
    current.rewind();
    persist(settings, current)?;
    Ok(None)
}

/// `current` truncated: its copy (see [`find_copy`]) opened at the position, to be finished
/// before the emptied file is read from its start (lines written after the last read and
/// before a `copytruncate` are only there).
fn copy_of(path: &Path, current: &Source) -> anyhow::Result<Option<Source>> {
    let Some(copy) = find_copy(path, current.offset, &current.before) else {
        return Ok(None);
    };
    tracing::info!(
        file = %path.display(),
        copy = %copy.display(),
        offset = current.offset,
        "Log emptied (copytruncate); finishing its copy first."
    );
    let mut resumed = Source::open(&copy, current.offset)
        .with_context(|| format!("opening {}", copy.display()))?;
    resumed.before = current.before.clone();
    resumed.ids = current.ids;
    Ok(Some(resumed))
}

/// A rotation beside the path (`maillog.1`, `maillog-20261205`) that holds, just before
/// `offset`, the bytes read there: the copy a `copytruncate` made of the file read, whose
/// lines after `offset` were never read (they were lost: the emptied file was read from its
/// start). The newest such copy if several match.
fn find_copy(path: &Path, offset: u64, before: &[u8]) -> Option<PathBuf> {
    use std::os::unix::fs::FileExt;
    let start = offset.checked_sub(before.len() as u64)?;
    if before.is_empty() {
        return None;
    }
    let holds_the_bytes = |copy: &Path| {
        let mut found = vec![0; before.len()];
        std::fs::File::open(copy)
            .and_then(|file| file.read_exact_at(&mut found, start))
            .is_ok_and(|()| found == before)
    };
    rotations(path)
        .into_iter()
        .filter(|(_, copy, _)| holds_the_bytes(copy))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, copy, _)| copy)
}

/// The file rotated after `current` when the log was rotated more than once since `current`
/// was written (the tailer was stopped meanwhile): `current` is found among the files beside
/// the path named like its rotations, and the next newer of them is returned. `None` (the path
/// itself is next) when there is none, or when `current` is not among them (deleted,
/// compressed).
fn next_rotated(path: &Path, current: &Source) -> Option<PathBuf> {
    let rotations = rotations(path);
    let (at, _, _) = rotations.iter().find(|(_, _, meta)| current.is(meta))?;
    rotations
        .iter()
        .filter(|(rank, _, _)| rank > at)
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, path, _)| path.clone())
}

/// The regular files beside the log `path` named like its rotations, with their place among
/// them ([`rotation_rank`]) and their metadata.
fn rotations(path: &Path) -> Vec<((i64, String), PathBuf, std::fs::Metadata)> {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return Vec::new();
    };
    std::fs::read_dir(dir_of(path))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let rank = rotation_rank(name, entry.file_name().to_str()?)?;
            let meta = entry.metadata().ok()?;
            meta.is_file().then(|| (rank, entry.path(), meta))
        })
        .collect()
}

/// The directory `path` is in (`.` for a bare file name: `tail maillog` run in its directory).
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Where a file named `file_name` stands among the rotations of the log `name`, oldest first:
/// `maillog.3` before `maillog.2` before `maillog.1` (logrotate's numbers count back), dated
/// names (`maillog-20261205`, `maillog.20261205-101500`) in the order of their dates and after
/// numbered ones. `None` when it is not named like a rotation: compressed (`maillog.2.gz`), a
/// copy (`maillog.bak`), another log.
fn rotation_rank(name: &str, file_name: &str) -> Option<(i64, String)> {
    let suffix = file_name.strip_prefix(name)?;
    let stamp = suffix
        .strip_prefix('.')
        .or_else(|| suffix.strip_prefix('-'))?;
    if stamp.is_empty()
        || !stamp
            .bytes()
            .all(|b| b.is_ascii_digit() || b"-._".contains(&b))
    {
        return None;
    }
    match stamp.parse::<u32>() {
        Ok(number) if stamp.len() < 6 => Some((-i64::from(number), String::new())),
        _ => Some((0, stamp.to_string())),
    }
}

/// Follows the log until `cancel` fires, publishing each delivery line as one event. What it
/// read is returned with the outcome, so an error exit reports it too.
pub async fn run<F: FnMut(&Outgoing)>(
    publisher: &mut Publisher<F>,
    settings: &TailSettings,
    cancel: &CancellationToken,
) -> (TailStats, anyhow::Result<()>) {
    let mut stats = TailStats::default();
    let outcome = follow(publisher, settings, cancel, &mut stats).await;
    (stats, outcome)
}

async fn follow<F: FnMut(&Outgoing)>(
    publisher: &mut Publisher<F>,
    settings: &TailSettings,
    cancel: &CancellationToken,
    stats: &mut TailStats,
) -> anyhow::Result<()> {
    let path = settings.file.as_path();
    let mut source: Option<Source> = None;
    if let Some(state) = &settings.state
        && let Some(Saved {
            dev,
            ino,
            offset,
            before,
            ids,
        }) = load_state(state)?
    {
        // By inode alone only with the bytes before the position saved, which tell another
        // file that reuses the inode (state files of older releases have none).
        match find_saved(path, dev, ino, !before.is_empty()) {
            Some(found) => {
                let mut saved = Source::open(&found, offset)?;
                saved.before = before;
                // The identity its lines were read under before the restart, even if the
                // file was found by its inode alone (a new device number).
                saved.ids = ids;
                if saved
                    .rewritten()
                    .with_context(|| format!("reading {}", found.display()))?
                {
                    stats.truncations += 1;
                    // A `copytruncate` while stopped: the lines after the position are in the
                    // copy now. Read there first, then the current file from its start.
                    match copy_of(path, &saved)? {
                        Some(copy) => source = Some(copy),
                        None => tracing::warn!(
                            file = %found.display(),
                            "The file of the saved position was written again since (truncated, \
                             or its inode reused); reading the current file from its start."
                        ),
                    }
                } else {
                    tracing::info!(file = %found.display(), offset, "Resuming from the state file.");
                    source = Some(saved);
                }
            }
            None => tracing::warn!(
                file = %path.display(),
                "The file of the saved position is gone; reading the current file from its start."
            ),
        }
    }
    let mut rotated_since: Option<Instant> = None;
    loop {
        let Some(current) = source.as_mut() else {
            match Source::open(path, 0) {
                Ok(opened) => {
                    source = Some(opened);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            }
            if wait(cancel, settings.poll).await {
                return Ok(());
            }
            continue;
        };
        // A stop is honoured between chunks too, not only at the end of the file (catching up
        // on a long log); the position saved is the last chunk's.
        if cancel.is_cancelled() {
            return Ok(());
        }
        if current
            .rewritten()
            .with_context(|| format!("reading {}", path.display()))?
        {
            if let Some(copy) = truncated(
                path,
                current,
                settings,
                stats,
                "truncated and written again",
            )? {
                source = Some(copy);
            }
            continue;
        }
        if read_chunk(current, settings, publisher, stats, cancel).await? {
            continue;
        }
        // Stopped within the chunk: its position stays before it.
        if cancel.is_cancelled() {
            return Ok(());
        }
        // At the end of the file: rotated, truncated, or simply nothing new yet.
        match std::fs::metadata(path) {
            Ok(meta) if current.is(&meta) => {
                rotated_since = None;
                if meta.len() < current.offset {
                    if let Some(copy) = truncated(path, current, settings, stats, "truncated")? {
                        source = Some(copy);
                    }
                    continue;
                }
            }
            Ok(meta) => {
                let since = *rotated_since.get_or_insert_with(Instant::now);
                // The writer moved on once the new file has data: finish the old one, switch.
                if meta.len() > 0 || since.elapsed() >= ROTATION_GRACE {
                    while !cancel.is_cancelled()
                        && read_chunk(current, settings, publisher, stats, cancel).await?
                    {
                    }
                    // Stopped before the old file's end: not switched, so a restart finishes it.
                    if cancel.is_cancelled() {
                        return Ok(());
                    }
                    // Rotated more than once since `current` was written (while stopped): the
                    // files between come first, oldest first.
                    let next = next_rotated(path, current).unwrap_or_else(|| path.to_path_buf());
                    tracing::info!(file = %next.display(), "Log rotated; following the next file.");
                    stats.rotations += 1;
                    let next = Source::open(&next, 0)
                        .with_context(|| format!("opening {}", next.display()))?;
                    persist(settings, &next)?;
                    source = Some(next);
                    rotated_since = None;
                    continue;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Renamed away; the new file is not there yet. Keep reading the old one.
            }
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        }
        if wait(cancel, settings.poll).await {
            return Ok(());
        }
    }
}

/// Sleeps for `poll`; true if `cancel` fired meanwhile.
async fn wait(cancel: &CancellationToken, poll: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(poll) => false,
    }
}

fn persist(settings: &TailSettings, source: &Source) -> anyhow::Result<()> {
    match &settings.state {
        Some(state) => save_state(state, source),
        None => Ok(()),
    }
}

/// Reads the complete lines after the position (at most [`CHUNK_BYTES`]), publishes their
/// events, waits for the broker's confirms, then saves the position after them. Returns false
/// at the end of the file (a partial last line is left for later), and when `cancel` fires
/// before the chunk is confirmed: the position stays before the chunk, and the caller ends (it
/// waited for a broker that was unreachable or kept nacking, up to `--give-up-after` or
/// `--max-attempts`, and a supervisor's grace period killed it first). An error if the publisher
/// gave up on any of them (RabbitMQ unreachable for `--give-up-after`, or a message past
/// `--max-attempts`): the position stays before them, so a restart publishes them again (each
/// line's `message_id` makes the lines that did arrive count once).
async fn read_chunk<F: FnMut(&Outgoing)>(
    source: &mut Source,
    settings: &TailSettings,
    publisher: &mut Publisher<F>,
    stats: &mut TailStats,
    cancel: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut buffer = Vec::with_capacity(CHUNK_BYTES);
    source
        .file
        .seek(SeekFrom::Start(source.offset))
        .and_then(|_| {
            (&mut source.file)
                .take(CHUNK_BYTES as u64)
                .read_to_end(&mut buffer)
        })
        .with_context(|| format!("reading {}", settings.file.display()))?;
    let complete = match buffer.iter().rposition(|b| *b == b'\n') {
        Some(last) => last + 1,
        // A line longer than a chunk: skipped whole (no MTA writes such delivery lines).
        None if buffer.len() == CHUNK_BYTES => buffer.len(),
        None => return Ok(false),
    };
    let mut offset = source.offset;
    let failed_before = publisher.failed;
    for line in buffer[..complete].split_inclusive(|b| *b == b'\n') {
        stats.lines += 1;
        let text = String::from_utf8_lossy(line);
        let event = match parse_hop(settings.format, text.trim_end()) {
            Some((_, true)) if !settings.count_loopback => {
                stats.loopback_hops += 1;
                if stats.loopback_hops == 1 {
                    tracing::info!(
                        line = %text.trim_end(),
                        "A delivery to a loopback address is not counted (a content filter's \
                         hop; --count-loopback counts them)."
                    );
                }
                None
            }
            hop => hop.map(|(event, _)| event),
        };
        if let Some(event) = event {
            stats.events += 1;
            let body = serde_json::to_vec(&event).context("serialising an event")?;
            let message = Outgoing {
                id: line_id(source.ids.0, source.ids.1, offset, line),
                routing_key: event.kind.as_str(),
                body,
                events: vec![event],
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(false),
                sent = publisher.send(message) => sent?,
            }
        }
        offset += line.len() as u64;
    }
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return Ok(false),
        flushed = publisher.flush() => flushed?,
    }
    let failed = publisher.failed - failed_before;
    if failed > 0 {
        anyhow::bail!(
            "{failed} events of {} (bytes {}..{offset}) were not confirmed by RabbitMQ; the saved \
             position stays at byte {}, so a restart publishes them again",
            settings.file.display(),
            source.offset,
            source.offset
        );
    }
    source.advance(&buffer[..complete]);
    persist(settings, source)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use catchall::event::Tally;

    /// A line as `tail` reads it by default.
    fn parse_line(format: LogFormat, line: &str) -> Option<Event> {
        parse_hop(format, line).and_then(|(event, loopback)| (!loopback).then_some(event))
    }

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mta")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// (domain, tally) of every event in a log.
    fn events(format: LogFormat, log: &str) -> Vec<(String, Tally)> {
        log.lines()
            .filter_map(|line| parse_line(format, line))
            .map(|e| (e.domain.clone(), e.tally()))
            .collect()
    }

    #[test]
    fn postfix_lines_become_events() {
        let got = events(LogFormat::Postfix, &fixture("postfix.log"));
        let want = [
            ("ok.example", Tally::Delivered),
            ("unknown.example", Tally::Bounced),
            ("full.example", Tally::OtherBounced),
            ("spam.example", Tally::OtherBounced),
            ("local.example", Tally::Delivered),
            ("plain.example", Tally::Bounced),
        ];
        let want: Vec<_> = want.iter().map(|(d, t)| (d.to_string(), *t)).collect();
        assert_eq!(got, want);
        let line = fixture("postfix.log")
            .lines()
            .find(|l| l.contains("unknown.example") && l.contains("status=bounced"))
            .map(str::to_string)
            .unwrap();
        let event = parse_line(LogFormat::Postfix, &line).unwrap();
        let evidence = event.evidence.unwrap();
        assert_eq!(evidence.code.unwrap().to_string(), "5.1.1");
        assert_eq!(evidence.smtp_code, Some(550));
        assert!(
            evidence
                .diagnostic
                .as_deref()
                .unwrap()
                .starts_with("550 5.1.1 ")
        );
    }

    /// What a sender controls in the log (its envelope addresses, a refused recipient) cannot
    /// forge a delivery or turn a bounce into one.
    #[test]
    fn postfix_lines_a_sender_shapes_are_not_misread() {
        let forged = [
            // smtpd refusing a relay attempt logs the sender's addresses as given.
            r#"Dec  4 10:00:00 mx1 postfix/smtpd[77]: NOQUEUE: reject: RCPT from evil[198.51.100.7]: 554 5.7.1 <x@target.example>: Relay access denied; from=<"a, status=sent b"@evil.example> to=<x@target.example> proto=ESMTP helo=<evil>"#,
            // qmgr logs the envelope sender of every message.
            r#"Dec  4 10:00:00 mx1 postfix/qmgr[78]: 4Qk1ABC: from=<"q: to=<x@target.example>, status=sent"@evil.example>, size=300, nrcpt=1 (queue active)"#,
            // A non-delivery notice names no recipient field.
            "Dec  4 10:00:00 mx1 postfix/bounce[79]: 4Qk1ABC: sender non-delivery notification: 4Qk1ABD",
        ];
        for line in forged {
            assert_eq!(parse_line(LogFormat::Postfix, line), None, "{line}");
        }
        // Unquoted (Postfix before 3.5): an address closed early by a sender's `>`, and a
        // discarded message (not delivered).
        for line in [
            "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<a@victim.example>, status=sent x@evil.example>, relay=mx.evil.example[192.0.2.9]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.7.1, status=bounced (host mx.evil.example[192.0.2.9] said: 554 5.7.1 spam (in reply to end of DATA command))",
            "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<a@victim.example>, relay=x, delay=1, delays=1, dsn=2.0.0, status=sent x@evil.example>, relay=mx.evil.example[192.0.2.9]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.7.1, status=bounced (host mx.evil.example[192.0.2.9] said: 554 5.7.1 spam (in reply to end of DATA command))",
            "Dec  4 10:00:00 mx1 postfix/discard[90]: 4Qk1ABJ: to=<x@blocked.example>, relay=none, delay=0.1, delays=0.1/0/0/0, dsn=2.0.0, status=sent (blocked.example)",
            "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<a@victim.example>, relay=x y@evil.example>, relay=mx.evil.example[192.0.2.9]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=2.0.0, status=sent (250 ok)",
            "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<a@victim.example>, relay=x, delay=1, delays=1, dsn=2.0.0, status=sent (ok)@evil.example>, relay=mx.evil.example[192.0.2.9]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.7.1, status=bounced (host mx.evil.example[192.0.2.9] said: 554 5.7.1 spam (in reply to end of DATA command))",
            // A `"` with no partner (RCPT TO:<"a\""@evil.example>): the address runs on into
            // the text of the sender's own server, which holds a delivery's fields.
            r#"Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<a"@evil.example>, relay=mx.evil.example[192.0.2.9]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.0.0, status=bounced (host mx.evil.example[192.0.2.9] said: 550 x"@victim.example>, relay=mx.victim.example[198.51.100.7]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok) (in reply to RCPT TO command))"#,
            r#"Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<b@evil.example>, orig_to=<a"@evil.example>, relay=mx.evil.example[192.0.2.9]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.0.0, status=bounced (host mx.evil.example[192.0.2.9] said: 550 x"@victim.example>, relay=mx.victim.example[198.51.100.7]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok) (in reply to RCPT TO command))"#,
            r#"Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<a"@evil.example>, relay=mx.evil.example[192.0.2.9]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=4.0.0, status=deferred (host mx.evil.example[192.0.2.9] said: 450 x"@victim.example>, relay=mx.victim.example[198.51.100.7]:25, delay=1, delays=0/0/0/1, dsn=5.1.1, status=bounced (550 5.1.1 no such user) (in reply to RCPT TO command))"#,
            // Server text that holds Postfix's own `>, relay=` before a `, status=` cannot be
            // told from a forgery on the line alone: skipped.
            "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<bob@b.example>, relay=mx.b.example[192.0.2.2]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.1.1, status=bounced (host mx.b.example[192.0.2.2] said: 550 5.1.1 <x@b.example>, relay=y, status=unknown (in reply to RCPT TO command))",
        ] {
            assert_eq!(parse_line(LogFormat::Postfix, line), None, "{line}");
        }
        // A quoted local part holding a fake status: the real status field still decides.
        let bounce = r#"Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<"x, status=sent y"@victim.example>, orig_to=<"o>, status=sent"@victim.example>, relay=mx.victim.example[192.0.2.1]:25, delay=0.1, delays=0/0/0/0.1, dsn=5.1.1, status=bounced (host mx.victim.example[192.0.2.1] said: 550 5.1.1 no such user (in reply to RCPT TO command))"#;
        let event = parse_line(LogFormat::Postfix, bounce).expect("a bounce");
        assert_eq!(event.domain, "victim.example");
        assert_eq!(event.kind, EventType::Bounced);
        assert_eq!(event.evidence.unwrap().code.unwrap().to_string(), "5.1.1");
    }

    /// The remote server's text after the status is its own: words in it that look like
    /// Postfix's fields (`, relay=`, `, status=`, `, dsn=`) do not make the line skipped, and the
    /// fields before it decide.
    #[test]
    fn postfix_fields_in_the_servers_text_are_only_text() {
        for (line, code) in [
            (
                "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<bob@b.example>, relay=mx.b.example[192.0.2.2]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.1.1, status=bounced (host mx.b.example[192.0.2.2] said: 550 5.1.1 <bob@b.example>: unknown user, relay=mx2.b.example refused (in reply to RCPT TO command))",
                "5.1.1",
            ),
            (
                "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<bob@b.example>, relay=mx.b.example[192.0.2.2]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.1.1, status=bounced (host mx.b.example[192.0.2.2] said: 550 5.1.1 user unknown, status=5.1.1, dsn=5.2.2 (in reply to RCPT TO command))",
                "5.1.1",
            ),
            (
                "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<bob@b.example>, relay=mx.b.example[192.0.2.2]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.7.1, status=bounced (host mx.b.example[192.0.2.2] said: 554 5.7.1 rejected, status=sent, relay=none (in reply to end of DATA command))",
                "5.7.1",
            ),
            (
                "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<bob@b.example>, relay=mx.b.example[192.0.2.2]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=5.7.1, status=bounced (host mx.b.example[192.0.2.2] said: 554 5.7.1 rejected, relay=denied, status=blocked (in reply to end of DATA command))",
                "5.7.1",
            ),
        ] {
            let event = parse_line(LogFormat::Postfix, line).expect(line);
            assert_eq!(event.domain, "b.example", "{line}");
            assert_eq!(event.kind, EventType::Bounced, "{line}");
            assert_eq!(
                event.evidence.unwrap().code.unwrap().to_string(),
                code,
                "{line}"
            );
        }
        let sent = "Dec  4 10:00:00 mx1 postfix/smtp[80]: 4Qk1ABC: to=<carol@c.example>, relay=mx.c.example[192.0.2.3]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok, status=queued, dsn=2.0.0, relay=next)";
        let event = parse_line(LogFormat::Postfix, sent).expect(sent);
        assert_eq!(
            (event.domain.as_str(), event.kind),
            ("c.example", EventType::Delivered)
        );
    }

    /// RFC 5424 lines (rsyslog's `RSYSLOG_SyslogProtocol23Format`) are read, with or without
    /// structured data; a `]: ` in a sender's address on such a line is never taken for the
    /// end of an RFC 3164 tag.
    #[test]
    fn rfc5424_lines_are_read() {
        let sent = "<22>1 2026-11-25T02:38:01.123456+00:00 mx1 postfix/smtp 14877 - - 843D3990178: to=<alice@ok.example>, relay=mx.ok.example[192.0.2.10]:25, delay=0.2, delays=0.02/0.01/0.1/0.07, dsn=2.0.0, status=sent (250 2.0.0 Ok)";
        let event = parse_line(LogFormat::Postfix, sent).expect("a delivery");
        assert_eq!(
            (event.domain.as_str(), event.tally()),
            ("ok.example", Tally::Delivered)
        );
        let with_sd = r#"<22>1 2026-11-25T02:38:02Z mx1 postfix/smtp 14878 - [meta sequenceId="1" note="a "b" c\]"][x y="z"] 843D3990179: to=<nobody@unknown.example>, relay=mx.unknown.example[192.0.2.11]:25, delay=0.1, delays=0/0/0.05/0.05, dsn=5.1.1, status=bounced (host mx.unknown.example[192.0.2.11] said: 550 5.1.1 no such user (in reply to RCPT TO command))"#;
        let event = parse_line(LogFormat::Postfix, with_sd).expect("a bounce");
        assert_eq!(
            (event.domain.as_str(), event.tally()),
            ("unknown.example", Tally::Bounced)
        );
        let forged = r#"<22>1 2026-11-25T02:38:03Z mx1 postfix/qmgr 14879 - - 843D3990180: from=<"x]: 843D3990181: to=<a@victim.example>, relay=r, delay=1, delays=1, dsn=2.0.0, status=sent (ok)"@evil.example>, size=300, nrcpt=1 (queue active)"#;
        assert_eq!(parse_line(LogFormat::Postfix, forged), None);
        // rsyslog's message text brings a space of its own; a `<PRI>` before an RFC 3164 line.
        for line in [
            sent.replace("- - 843D", "- -  843D"),
            "<22>Nov 25 02:38:01 mx1 postfix/smtp[14877]: 843D3990178: to=<alice@ok.example>, relay=mx.ok.example[192.0.2.10]:25, delay=0.2, delays=0.02/0.01/0.1/0.07, dsn=2.0.0, status=sent (250 2.0.0 Ok)".to_string(),
        ] {
            let event = parse_line(LogFormat::Postfix, &line).expect("a delivery");
            assert_eq!(event.domain, "ok.example", "{line}");
        }
    }

    #[test]
    fn rotations_are_ordered_oldest_first() {
        let rank = |file: &str| rotation_rank("maillog", file);
        assert!(rank("maillog.3") < rank("maillog.2") && rank("maillog.2") < rank("maillog.1"));
        assert!(rank("maillog.12") < rank("maillog.2"));
        assert!(rank("maillog-20261204") < rank("maillog-20261205"));
        assert!(rank("maillog.20261205-091500") < rank("maillog.20261205-101500"));
        for other in [
            "maillog",
            "maillog.2.gz",
            "maillog.bak",
            "maillog.",
            "mail.err",
            "maillogx",
        ] {
            assert_eq!(rank(other), None, "{other}");
        }
    }

    /// A content filter on the loopback address (amavis, a DKIM proxy) is a hop: the message
    /// comes back and its delivery onwards is what counts, once. Its refusal (spam) is not the
    /// recipient domain's answer either.
    #[test]
    fn loopback_hops_are_not_counted() {
        let postfix = [
            "Dec  5 10:00:00 mx1 postfix/smtp[81]: 4Qk1ABC: to=<alice@ok.example>, relay=127.0.0.1[127.0.0.1]:10024, delay=0.5, delays=0.01/0/0/0.49, dsn=2.0.0, status=sent (250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as 4Qk1ABD)",
            "Dec  5 10:00:01 mx1 postfix/smtp[82]: 4Qk1ABD: to=<alice@ok.example>, relay=mx.ok.example[192.0.2.10]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4Qk2XYZ)",
            "Dec  5 10:00:02 mx1 postfix/smtp[83]: 4Qk1ABE: to=<bob@victim.example>, relay=127.0.0.1[127.0.0.1]:10024, delay=0.5, delays=0.01/0/0/0.49, dsn=5.7.0, status=bounced (host 127.0.0.1[127.0.0.1] said: 554 5.7.0 Reject, id=12345-01 - spam (in reply to end of DATA command))",
            "Dec  5 10:00:03 mx1 postfix/lmtp[84]: 4Qk1ABF: to=<carol@ok.example>, relay=localhost[::1]:10024, delay=0.1, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok, id=12345-02, from MTA([127.0.0.1]:10025): 250 2.0.0 Ok: queued as 4Qk1ABG)",
            "Dec  5 10:00:04 mx1 postfix/smtp[85]: 4Qk1ABH: to=<dave@ok.example>, relay=localhost[::ffff:127.0.0.2]:10026, delay=0.1, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4Qk1ABI)",
        ];
        let got = events(LogFormat::Postfix, &postfix.join("\n"));
        assert_eq!(got, [("ok.example".to_string(), Tally::Delivered)]);
        // `--count-loopback` (a test bench whose receiving servers run on this host).
        let counted = postfix
            .iter()
            .filter(|line| parse_hop(LogFormat::Postfix, line).is_some())
            .count();
        assert_eq!(counted, postfix.len());
        let exim = [
            r#"2026-12-05 10:00:00 1tFxyz-0001ab-Cd => alice@ok.example R=amavis T=amavis_smtp H=127.0.0.1 [127.0.0.1]:10024 C="250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as 1tFxz0-0001ad-Gh""#,
            r#"2026-12-05 10:00:01 1tFxz0-0001ad-Gh => alice@ok.example R=dnslookup T=remote_smtp H=mx.ok.example [192.0.2.10] C="250 OK""#,
            r#"2026-12-05 10:00:02 1tFxz1-0001ae-Ij ** bob@victim.example R=amavis T=amavis_smtp H=localhost [::1]:10024: SMTP error from remote mail server after end of data: 554 5.7.0 Reject - spam"#,
            // A loopback host field in a parent, sender or return path address is a sender's
            // text, not Exim's (`+all_parents`, `+sender_on_delivery`,
            // `+return_path_on_delivery`).
            r#"2026-12-05 10:00:03 1tFxz2-0001af-Kl => erin@ok.example <"x H=127.0.0.1 [127.0.0.1] y"@alias.example> R=dnslookup T=remote_smtp H=mx.ok.example [192.0.2.10] C="250 OK""#,
            r#"2026-12-05 10:00:04 1tFxz3-0001ag-Mn => fay@ok.example <a@alias.example> <"> H=::1 [::1]"@alias2.example> F=<"x H=127.0.0.1 [127.0.0.1] y"@evil.example> P=<"z> H=127.0.0.1 [127.0.0.1]"@evil.example> R=dnslookup T=remote_smtp H=mx.ok.example [192.0.2.10] C="250 OK""#,
            r#"2026-12-05 10:00:05 1tFxz4-0001ah-Op ** gus@unknown.example F=<"x H=localhost [127.0.0.1]:25 y"@evil.example> R=dnslookup T=remote_smtp H=mx.unknown.example [192.0.2.11]: SMTP error from remote mail server after RCPT TO:<gus@unknown.example>: 550 5.1.1 User unknown"#,
        ];
        let got = events(LogFormat::Exim, &exim.join("\n"));
        let delivered = ("ok.example".to_string(), Tally::Delivered);
        let bounced = ("unknown.example".to_string(), Tally::Bounced);
        assert_eq!(
            got,
            [delivered.clone(), delivered.clone(), delivered, bounced]
        );
    }

    /// A sender's address in an Exim reject line cannot pass for a message id and a marker.
    #[test]
    fn exim_lines_a_sender_shapes_are_not_misread() {
        let forged = r#"2026-12-04 10:00:00 H=[198.51.100.7]:4242 F=<"x 1tFxyz-0001ab-Cd => y"@evil.example> rejected RCPT <x@target.example>: relay not permitted"#;
        assert_eq!(parse_line(LogFormat::Exim, forged), None);
        // A quoted local part holding another address is one address, at the real domain.
        let quoted = r#"2026-12-04 10:00:00 1tFxyz-0001ab-Cd => "x@target.example y"@evil.example R=dnslookup T=remote_smtp"#;
        let event = parse_line(LogFormat::Exim, quoted).expect("a delivery");
        assert_eq!(event.domain, "evil.example");
        let unclosed = r#"2026-12-04 10:00:00 1tFxyz-0001ab-Cd => "x@target.example R=dnslookup"#;
        assert_eq!(parse_line(LogFormat::Exim, unclosed), None);
        // A sender's address holding a remote error of its own: the real reply decides.
        for line in [
            r#"2026-12-05 10:00:06 1tFxz5-0001ai-Qr ** carol@victim.example R=dnslookup T=remote_smtp H=mx.victim.example [192.0.2.13]: SMTP error from remote mail server after MAIL FROM:<"x: 550 5.1.1 no such user"@evil.example> SIZE=1234: 553 5.7.1 Sender rejected"#,
            r#"2026-12-05 10:00:06 1tFxz5-0001ai-Qr ** carol@victim.example F=<"SMTP error from remote mail server after x: 550 5.1.1 no such user"@evil.example> R=dnslookup T=remote_smtp H=mx.victim.example [192.0.2.13]: SMTP error from remote mail server after end of data: 553 5.7.1 Sender rejected"#,
        ] {
            let event = parse_line(LogFormat::Exim, line).expect("a bounce");
            assert_eq!(
                (event.domain.as_str(), event.tally()),
                ("victim.example", Tally::OtherBounced),
                "{line}"
            );
        }
        // A TLS peer's DN (`+tls_peerdn`) with a `: ` before the reason.
        let dn = r#"2026-12-05 10:00:08 1tFxz7-0001ak-Uv ** nobody@unknown.example R=dnslookup T=remote_smtp H=mx.unknown.example [192.0.2.11] X=TLS1.3:TLS_AES_256_GCM_SHA384:256 CV=yes DN="O=Acme: Mail,CN=mx.unknown.example": SMTP error from remote mail server after RCPT TO:<nobody@unknown.example>: 550 5.1.1 User unknown"#;
        let event = parse_line(LogFormat::Exim, dn).expect("a bounce");
        assert_eq!(event.tally(), Tally::Bounced);
        // A bounce logged without a reason proves nothing.
        let bare = "2026-12-05 10:00:07 1tFxz6-0001aj-St ** info@x.example F=<a@b.example> R=virtual_aliases:";
        let event = parse_line(LogFormat::Exim, bare).expect("a bounce");
        assert_eq!(event.tally(), Tally::OtherBounced);
        for line in [
            "2026-12-04 10:00:00 1tFxyz-0001ab-Cd => a@ok.example R=dnslookup T=remote_smtp",
            "2026-12-04 10:00:00.123 +0000 [4242] 1tFxyz-0001ab-Cd => a@ok.example R=x T=y",
        ] {
            assert!(parse_line(LogFormat::Exim, line).is_some(), "{line}");
        }
    }

    #[test]
    fn exim_lines_become_events() {
        let got = events(LogFormat::Exim, &fixture("exim.log"));
        let want = [
            ("ok.example", Tally::Delivered),
            ("ok.example", Tally::Delivered),
            ("unknown.example", Tally::Bounced),
            ("full.example", Tally::OtherBounced),
            ("spam.example", Tally::OtherBounced),
            ("nowhere.example", Tally::OtherBounced),
            ("pid.example", Tally::Delivered),
        ];
        let want: Vec<_> = want.iter().map(|(d, t)| (d.to_string(), *t)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn line_ids_are_stable_and_distinct() {
        let a = line_id(1, 2, 0, b"x\n");
        assert_eq!(a, line_id(1, 2, 0, b"x\n"));
        assert_ne!(a, line_id(1, 2, 2, b"x\n"), "same text at another offset");
        assert_ne!(a, line_id(1, 3, 0, b"x\n"), "another file");
        assert_ne!(a, line_id(1, 2, 0, b"y\n"), "another line");
    }

    #[test]
    fn a_saved_position_is_found_after_a_rename() {
        let dir = std::env::temp_dir().join(format!("catchall-tail-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("maillog");
        std::fs::write(&log, "one\n").unwrap();
        let meta = std::fs::metadata(&log).unwrap();
        let state = dir.join("state");
        let mut source = Source::open(&log, 0).unwrap();
        source.advance(b"one\n");
        save_state(&state, &source).unwrap();
        assert_eq!(
            load_state(&state).unwrap(),
            Some(Saved {
                dev: meta.dev(),
                ino: meta.ino(),
                offset: 4,
                before: b"one\n".to_vec(),
                ids: (meta.dev(), meta.ino()),
            })
        );
        std::fs::rename(&log, dir.join("maillog.1")).unwrap();
        std::fs::write(&log, "new\n").unwrap();
        assert_eq!(
            find_saved(&log, meta.dev(), meta.ino(), true),
            Some(dir.join("maillog.1"))
        );
        // Given by its bare name (`tail maillog` in its directory), the renamed file is found
        // in the working directory.
        let cwd = std::env::current_dir().unwrap();
        std::env::set_current_dir(&dir).unwrap();
        let found = find_saved(Path::new("maillog"), meta.dev(), meta.ino(), true);
        std::env::set_current_dir(cwd).unwrap();
        assert_eq!(found, Some(Path::new(".").join("maillog.1")));
        // The file system numbered anew at the next mount (btrfs, LVM, NFS): found by its inode.
        assert_eq!(
            find_saved(&log, meta.dev() ^ 1, meta.ino(), true),
            Some(dir.join("maillog.1"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The bytes before the position tell a file written again from the one read: emptied and
    /// written again past the position, it is `rewritten`; grown at its end, it is not.
    #[test]
    fn a_file_written_again_past_the_position_is_told_from_one_that_grew() {
        let dir = std::env::temp_dir().join(format!("catchall-tail-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("maillog");
        let first = "a line the tailer read to its end, long enough to fill the print\n";
        std::fs::write(&log, first).unwrap();
        let mut source = Source::open(&log, 0).unwrap();
        assert!(!source.rewritten().unwrap(), "nothing read yet");
        source.advance(first.as_bytes());
        assert_eq!(source.before.len(), PRINT_BYTES);
        std::fs::write(&log, format!("{first}and a line after it\n")).unwrap();
        assert!(!source.rewritten().unwrap(), "grown at its end");
        std::fs::write(
            &log,
            "other lines, written after the file was emptied, longer\n".repeat(3),
        )
        .unwrap();
        assert!(
            source.rewritten().unwrap(),
            "written again past the position"
        );
        std::fs::write(&log, "short\n").unwrap();
        assert!(source.rewritten().unwrap(), "shorter than the position");
        source.rewind();
        assert!(!source.rewritten().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two tailers' state files side by side (`mail.postfix`, `mail.exim`) keep their own
    /// positions, and no temporary file is left behind.
    /// The identity of a copy's line ids (the file it copied) is saved with the position and
    /// read back; a state file without one (older releases) means the file's own.
    #[test]
    fn the_identity_of_the_line_ids_is_saved() {
        let dir = std::env::temp_dir().join(format!("catchall-tail-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let (log, state) = (dir.join("maillog.1"), dir.join("state"));
        std::fs::write(&log, "one\n").unwrap();
        let meta = std::fs::metadata(&log).unwrap();
        let mut copy = Source::open(&log, 4).unwrap();
        copy.ids = (7, 42);
        save_state(&state, &copy).unwrap();
        let saved = load_state(&state).unwrap().unwrap();
        assert_eq!(
            (saved.dev, saved.ino, saved.ids),
            (meta.dev(), meta.ino(), (7, 42))
        );
        std::fs::write(&state, r#"{"dev":1,"ino":2,"offset":3}"#).unwrap();
        assert_eq!(load_state(&state).unwrap().unwrap().ids, (1, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_files_beside_each_other_keep_their_own_positions() {
        let dir = std::env::temp_dir().join(format!("catchall-tail-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("maillog");
        std::fs::write(&log, "one\ntwo\n").unwrap();
        let meta = std::fs::metadata(&log).unwrap();
        for (name, offset) in [("mail.postfix", 4), ("mail.exim", 8)] {
            save_state(&dir.join(name), &Source::open(&log, offset).unwrap()).unwrap();
        }
        for (name, offset) in [("mail.postfix", 4), ("mail.exim", 8)] {
            assert_eq!(
                load_state(&dir.join(name)).unwrap(),
                Some(Saved {
                    dev: meta.dev(),
                    ino: meta.ino(),
                    offset,
                    before: Vec::new(),
                    ids: (meta.dev(), meta.ino()),
                }),
                "{name}"
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["mail.exim", "mail.postfix", "maillog"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
