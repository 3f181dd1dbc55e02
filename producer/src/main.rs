//! `catchall-producer`: publishes delivered/bounced events onto RabbitMQ with publisher confirms.

mod generate;
mod publisher;
mod tail;

use anyhow::Context;
use catchall::config::AmqpArgs;
use catchall::event::{Event, EventType, parse_message};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use publisher::{Outgoing, Publisher, PublisherSettings};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(
    name = "catchall-producer",
    version,
    about = "Publishes delivered/bounced events for \
catchall onto RabbitMQ, with publisher confirms and retries."
)]
struct Cli {
    #[command(flatten)]
    amqp: AmqpArgs,

    /// Most publishes awaiting a broker confirm at once.
    #[arg(long, global = true, env = "PRODUCER_WINDOW", visible_alias = "producer-window", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    window: u32,

    /// Most bytes of messages (bodies and events) awaiting a confirm or a retry at once (`B`,
    /// `KiB`, `MiB`, `GiB`); a message is always let through when the window is empty.
    #[arg(long, global = true, env = "PRODUCER_WINDOW_BYTES", visible_alias = "producer-window-bytes", default_value = "64MiB", value_parser = window_bytes)]
    window_bytes: u64,

    /// How long to wait for a confirm before publishing the message again (same message_id).
    #[arg(long, global = true, env = "PRODUCER_CONFIRM_TIMEOUT", visible_alias = "producer-confirm-timeout", default_value = "10s", value_parser = catchall::config::timeout)]
    confirm_timeout: Duration,

    /// Attempts per message before the producer gives up on it (and exits non-zero).
    #[arg(long, global = true, env = "PRODUCER_MAX_ATTEMPTS", visible_alias = "producer-max-attempts", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,

    /// How long RabbitMQ may stay unreachable mid-run before the producer gives up (exit 1).
    #[arg(long, global = true, env = "PRODUCER_GIVE_UP_AFTER", visible_alias = "producer-give-up-after", default_value = "60s", value_parser = catchall::config::timeout)]
    give_up_after: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A synthetic stream shaped like the original assignment's generator.
    Generate {
        /// Events to publish.
        #[arg(long)]
        events: u64,
        /// Cap on events per second (default: as fast as the broker confirms).
        #[arg(long)]
        rate: Option<u64>,
        /// Events per message (1 publishes single-event messages).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
        /// Seed of the stream; the same seed gives the same events.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the confirmed per-domain counts here, as CSV `domain,delivered,bounced`.
        #[arg(long)]
        expect: Option<PathBuf>,
    },
    /// Publish N copies of one event (each its own message).
    Send {
        /// Recipient domain (normalised before publishing).
        domain: String,
        /// `delivered` or `bounced`.
        #[arg(value_parser = event_type)]
        kind: EventType,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Publish NDJSON events (one `{"domain":…,"type":…}` per line) from a file or stdin (`-`).
    Publish {
        #[arg(default_value = "-")]
        file: String,
        /// Events per message.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
    /// Follow an MTA's log like `tail -F` (rotation, truncation) and publish its delivery and
    /// bounce lines as events, each with a `message_id` derived from the line; runs until
    /// SIGINT/SIGTERM.
    Tail {
        /// The log file (Postfix `maillog_file` or syslog mail log, Exim `mainlog`).
        file: PathBuf,
        /// Which MTA writes it.
        #[arg(long, value_enum)]
        format: tail::LogFormat,
        /// Saves the position here after each confirmed chunk, so a restart neither skips nor
        /// repeats a line. Without it every start reads the file from its beginning (the
        /// derived ids still count each line once while the worker remembers them).
        #[arg(long)]
        state: Option<PathBuf>,
        /// How often to look for new lines, rotation and truncation at the end of the file.
        #[arg(long, default_value = "250ms", value_parser = catchall::config::timeout)]
        poll: Duration,
        /// Count deliveries to a loopback address too. By default they are content-filter hops
        /// (amavis on 127.0.0.1:10024) whose delivery onwards is logged and counted; this is
        /// for a test bench whose receiving servers run on this host.
        #[arg(long)]
        count_loopback: bool,
    },
}

fn event_type(s: &str) -> Result<EventType, String> {
    s.parse()
        .map_err(|_| "must be `delivered` or `bounced`".to_string())
}

/// Counts what the broker confirmed, per domain, and drives the progress bar.
#[derive(Default)]
struct Tally {
    events: u64,
    messages: u64,
    per_domain: HashMap<String, (u64, u64)>,
    keep_domains: bool,
}

impl Tally {
    fn confirmed(&mut self, message: &Outgoing) {
        self.messages += 1;
        self.events += message.events.len() as u64;
        if self.keep_domains {
            for event in &message.events {
                let entry = self.per_domain.entry(event.domain.clone()).or_default();
                match event.kind {
                    EventType::Delivered => entry.0 += 1,
                    EventType::Bounced => entry.1 += 1,
                }
            }
        }
    }

    fn write_csv(&self, path: &PathBuf) -> anyhow::Result<()> {
        let mut rows: Vec<_> = self.per_domain.iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "domain,delivered,bounced")?;
        for (domain, (delivered, bounced)) in rows {
            writeln!(out, "{domain},{delivered},{bounced}")?;
        }
        out.flush()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = catchall::telemetry::log_filter() {
        catchall::config::exit_usage(&error);
    }
    let telemetry = catchall::telemetry::init(None);
    let code = match run(cli).await {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(error) => {
            eprintln!("catchall-producer: {error:#}");
            1
        }
    };
    telemetry.shutdown();
    // `publish -` may still read stdin on tokio's blocking pool.
    catchall::signals::exit(code)
}

/// Returns whether every event was confirmed.
/// `--rate`: when the next chunk may go out. On schedule from the start, catching up on a lag
/// of up to a second (timer and scheduling jitter) so the average holds; after a longer stall (a
/// reconnect, a full confirm window) the schedule starts again from now instead of sending the
/// whole lag at once: `--rate` is a cap (SPEC §7).
struct Pace {
    rate: f64,
    base: Instant,
    sent: u64,
}

impl Pace {
    const MAX_CATCH_UP: Duration = Duration::from_secs(1);

    fn new(rate: u64, start: Instant) -> Self {
        Self {
            rate: rate as f64,
            base: start,
            sent: 0,
        }
    }

    fn due(&mut self, now: Instant) -> Instant {
        let due = self.base + Duration::from_secs_f64(self.sent as f64 / self.rate);
        if now.saturating_duration_since(due) > Self::MAX_CATCH_UP {
            self.base = now;
            self.sent = 0;
            return now;
        }
        due
    }

    fn sent(&mut self, events: u64) {
        self.sent += events;
    }
}

/// A byte size of at least 1 KiB (see [`catchall::config::parse_bytes`]).
fn window_bytes(text: &str) -> Result<u64, String> {
    let bytes = catchall::config::parse_bytes(text)?;
    if bytes < 1024 {
        return Err("must be at least 1KiB".into());
    }
    Ok(bytes)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let settings = PublisherSettings {
        window: cli.window as usize,
        window_bytes: usize::try_from(cli.window_bytes).unwrap_or(usize::MAX),
        confirm_timeout: cli.confirm_timeout,
        max_attempts: cli.max_attempts,
        give_up_after: cli.give_up_after,
    };
    let (total, expect) = match &cli.command {
        Command::Generate { events, expect, .. } => (Some(*events), expect.clone()),
        Command::Send { count, .. } => (Some(*count), None),
        Command::Publish { .. } | Command::Tail { .. } => (None, None),
    };
    let progress = progress_bar(total);
    // SIGINT/SIGTERM: `tail` stops where it is (its normal end); the other commands stop
    // sending, settle what was sent (for one confirm timeout at most), print the summary and
    // write the --expect CSV of what was confirmed, and exit 1. They used to die on the spot,
    // without the summary or the CSV.
    // A second signal ends the process at once (130 or 143), CSV or not.
    let stop = catchall::signals::Stop::install().token();
    let is_tail = matches!(cli.command, Command::Tail { .. });
    let confirm_timeout = cli.confirm_timeout;
    let mut tally = Tally {
        keep_domains: expect.is_some(),
        ..Tally::default()
    };
    let started = Instant::now();
    let mut publisher = Publisher::connect(cli.amqp.clone(), settings, |message: &Outgoing| {
        tally.confirmed(message);
        progress.inc(message.events.len() as u64);
    })
    .await?;
    if !is_tail {
        publisher.stop_on(stop.clone());
    }

    let mut invalid_lines = 0u64;
    let mut tail_stats = None;
    // An error `tail` ended on: reported after its summary (it printed the error alone).
    let mut tail_error = None;
    match cli.command {
        Command::Generate {
            events,
            rate,
            batch,
            seed,
            ..
        } => {
            let mut stream = generate::Generator::new(seed)
                .take(events as usize)
                .peekable();
            // Paced from now: the connect is not lag to catch up on (it sent that much at once).
            let mut pace = rate
                .filter(|r| *r > 0)
                .map(|rate| Pace::new(rate, Instant::now()));
            // Once the publisher gave up (RabbitMQ unreachable too long), stop generating.
            while stream.peek().is_some() && !publisher.gave_up && !stop.is_cancelled() {
                let chunk: Vec<Event> = stream.by_ref().take(batch as usize).collect();
                if let Some(pace) = pace.as_mut() {
                    let due = pace.due(Instant::now());
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = stop.cancelled() => break,
                    }
                    pace.sent(chunk.len() as u64);
                }
                publisher.send_all(Outgoing::batches(chunk)).await?;
            }
        }
        Command::Send {
            domain,
            kind,
            count,
        } => {
            let event = Event::new(&domain, kind)
                .map_err(|reason| anyhow::anyhow!("{domain:?}: {reason}"))?;
            for _ in 0..count {
                if publisher.gave_up || stop.is_cancelled() {
                    break;
                }
                publisher.send(Outgoing::single(event.clone())).await?;
            }
        }
        Command::Tail {
            file,
            format,
            state,
            poll,
            count_loopback,
        } => {
            let settings = tail::TailSettings {
                file,
                format,
                state,
                poll,
                count_loopback,
            };
            let (stats, outcome) = tail::run(&mut publisher, &settings, &stop).await;
            tail_stats = Some(stats);
            tail_error = outcome.err();
        }
        Command::Publish { file, batch } => {
            let reader: Box<dyn tokio::io::AsyncRead + Unpin> = if file == "-" {
                Box::new(tokio::io::stdin())
            } else {
                Box::new(
                    tokio::fs::File::open(&file)
                        .await
                        .with_context(|| format!("opening {file}"))?,
                )
            };
            // Lines as bytes: one that is not UTF-8 is skipped like any other bad line.
            let mut lines = tokio::io::BufReader::new(reader);
            let mut line = Vec::new();
            let mut chunk = Vec::with_capacity(batch as usize);
            let mut number = 0u64;
            // `line` holds a whole line, handled: cleared before the next is read.
            let mut taken = false;
            // Every SETTLE_EVERY, however the lines come (a pipe fed a line every 40 ms never
            // let a per-wait timer fire): a partial `--batch` that waited that long goes out,
            // and what was sent is settled.
            let mut settle = tokio::time::interval(SETTLE_EVERY);
            settle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut chunk_since: Option<Instant> = None;
            loop {
                // Once the publisher gave up, the rest would only be counted as failed (it
                // read on to the end of its input, which for a pipe is never).
                if publisher.gave_up {
                    break;
                }
                if std::mem::take(&mut taken) {
                    line.clear();
                }
                let read = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    // On a pipe whose lines come slowly, a partial `--batch` goes out and what
                    // was sent is settled all the same: confirms counted, nacks retried,
                    // `--give-up-after` kept. They waited for the window (or the batch) to fill
                    // or the input to end.
                    _ = settle.tick(), if publisher.unsettled() > 0 || !chunk.is_empty() => {
                        if chunk_since.is_some_and(|since| since.elapsed() >= SETTLE_EVERY) {
                            chunk_since = None;
                            publisher
                                .send_all(Outgoing::batches(std::mem::take(&mut chunk)))
                                .await?;
                        }
                        publisher.settle_ready().await?;
                        continue;
                    }
                    read = next_line(&mut lines, &mut line) => read.with_context(|| format!("reading {file}"))?,
                };
                if !read {
                    break;
                }
                taken = true;
                number += 1;
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                // A file saved with a byte order mark (RFC 8259 §8.1).
                let line = match number {
                    1 => line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line),
                    _ => line,
                };
                let Some(first) = line.iter().find(|b| !b.is_ascii_whitespace()) else {
                    continue;
                };
                match parse_message(line) {
                    Ok(events) if *first == b'{' => {
                        // A record that holds no event (KumoMTA's `Reception`) starts no batch.
                        if !events.is_empty() {
                            chunk_since.get_or_insert_with(Instant::now);
                            chunk.extend(events);
                        }
                    }
                    Ok(_) => {
                        invalid_lines += 1;
                        eprintln!("{file}:{number}: skipped: expected one event object per line");
                    }
                    Err(reason) => {
                        invalid_lines += 1;
                        eprintln!("{file}:{number}: skipped: {reason}");
                    }
                }
                if chunk.len() >= batch as usize {
                    chunk_since = None;
                    publisher
                        .send_all(Outgoing::batches(std::mem::take(&mut chunk)))
                        .await?;
                }
            }
            if !chunk.is_empty() {
                publisher.send_all(Outgoing::batches(chunk)).await?;
            }
        }
    }
    if let Some(stats) = tail_stats {
        println!(
            "tail: {} lines read, {} events, {} rotations, {} truncations, {} loopback hops \
             not counted",
            stats.lines, stats.events, stats.rotations, stats.truncations, stats.loopback_hops
        );
    }
    // A stop (before or while the last confirms are awaited) waits for them one confirm
    // timeout at most.
    let stopped = if is_tail {
        // `tail` ends at a stop or an error. What it left unconfirmed is before its saved
        // position, for the next run to publish again: one confirm timeout for it at most, and
        // not failed, even if the publisher gives up on it meanwhile.
        if stop.is_cancelled() || tail_error.is_some() {
            let failed = publisher.failed;
            let _ = tokio::time::timeout(confirm_timeout, publisher.finish()).await;
            publisher.failed = failed;
        } else {
            publisher.finish().await?;
        }
        false
    } else {
        stop.is_cancelled()
            || tokio::select! {
                finished = publisher.finish() => { finished?; false }
                _ = stop.cancelled() => true,
            }
    };
    if stopped {
        tracing::warn!("Stopped by a signal before every event was sent.");
        if tokio::time::timeout(confirm_timeout, publisher.finish())
            .await
            .is_err()
        {
            // Sent and not settled: the broker may or may not hold them, so they are failed
            // (not in the summary's confirmed events, nor in the --expect CSV).
            let unsettled = publisher.unsettled();
            publisher.failed += unsettled as u64;
            tracing::warn!(
                "Not every confirm came within {confirm_timeout:?}: {unsettled} messages counted as failed (the broker may hold them)."
            );
        }
    }
    let (failed, retries) = (publisher.failed, publisher.retries);
    drop(publisher);
    progress.finish_and_clear();

    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "confirmed {} events in {} messages in {:.2} s ({:.0} events/s); {} retried, {} failed, {} invalid lines",
        tally.events,
        tally.messages,
        elapsed,
        tally.events as f64 / elapsed.max(1e-9),
        retries,
        failed,
        invalid_lines,
    );
    if let Some(path) = expect {
        tally.write_csv(&path)?;
    }
    if let Some(error) = tail_error {
        return Err(error);
    }
    Ok(failed == 0 && invalid_lines == 0 && !stopped)
}

/// How often `publish` settles what it sent, and how long a partial batch waits for more lines.
const SETTLE_EVERY: Duration = Duration::from_millis(50);

/// Reads the next line of `reader` into `line`, without its `\n`; false at the end. Of a line
/// longer than a message may be, only the first `MAX_BODY_BYTES + 1` bytes are kept (enough
/// for it to be refused as too large): the rest is read and dropped, so one line of gigabytes
/// (a JSON array by mistake, an input without newlines) is not held whole.
async fn next_line(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<bool> {
    const KEEP: usize = catchall::event::MAX_BODY_BYTES + 1;
    // Cancel-safe (`publish` races it against settling): what a cancelled call read stays in
    // `line`, and the caller clears it once it took a whole line.
    let mut read_any = !line.is_empty();
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Ok(read_any);
        }
        read_any = true;
        let end = buffer.iter().position(|&b| b == b'\n');
        let part = &buffer[..end.unwrap_or(buffer.len())];
        let room = KEEP.saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        let used = end.map_or(buffer.len(), |end| end + 1);
        reader.consume(used);
        if end.is_some() {
            return Ok(true);
        }
    }
}

/// A progress bar on a terminal; nothing otherwise.
fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{bar:40} {pos}/{len} events confirmed ({per_sec}, eta {eta})"
    } else {
        "{spinner} {pos} events confirmed ({per_sec})"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as `publish` reads them: a long one is cut to what it takes to refuse it, and the
    /// next line is read whole after it; a last line without a newline counts.
    #[tokio::test]
    async fn lines_are_read_with_a_bound() {
        let long = vec![b'x'; 3 * catchall::event::MAX_BODY_BYTES];
        let mut input = b"one\r\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\ntwo\n\nlast");
        // A small buffer, so the long line spans many reads.
        let mut reader = tokio::io::BufReader::with_capacity(4096, &input[..]);
        let mut line = Vec::new();
        let mut read = Vec::new();
        while next_line(&mut reader, &mut line).await.expect("read") {
            read.push(std::mem::take(&mut line));
        }
        assert_eq!(read.len(), 5);
        assert_eq!(read[0], b"one\r");
        assert_eq!(read[1].len(), catchall::event::MAX_BODY_BYTES + 1);
        assert!(parse_message(&read[1]).is_err(), "refused as too large");
        assert_eq!(read[2..], [b"two".to_vec(), Vec::new(), b"last".to_vec()]);
    }

    /// A read cancelled mid-line (`publish` races it against settling confirms) keeps what it
    /// read: the next call finishes the line. It cleared the line first, and a line that came in
    /// two pieces around a settle lost its first piece.
    #[tokio::test]
    async fn a_cancelled_read_keeps_its_part_of_the_line() {
        use tokio::io::AsyncWriteExt;
        let (mut writer, pipe) = tokio::io::duplex(64);
        let mut reader = tokio::io::BufReader::new(pipe);
        let mut line = Vec::new();
        writer.write_all(b"{\"domain\":").await.unwrap();
        let cancelled =
            tokio::time::timeout(Duration::from_millis(50), next_line(&mut reader, &mut line))
                .await;
        assert!(cancelled.is_err(), "no whole line yet");
        writer.write_all(b"\"a.example\"}\nnext").await.unwrap();
        assert!(next_line(&mut reader, &mut line).await.unwrap());
        assert_eq!(line, br#"{"domain":"a.example"}"#);
    }

    /// The broker's flags go before or after the subcommand, as the producer's own do (after
    /// it, `--exchange` was refused as an unexpected argument).
    #[test]
    fn broker_flags_go_after_the_subcommand_too() {
        let cli = Cli::try_parse_from([
            "catchall-producer",
            "generate",
            "--events",
            "10",
            "--exchange",
            "x",
            "--amqp-url",
            "amqp://h/%2f",
        ])
        .expect("flags after the subcommand");
        assert_eq!(cli.amqp.exchange, "x");
        assert_eq!(cli.amqp.amqp_url, "amqp://h/%2f");
    }

    /// A zero confirm timeout republished every message at once until it gave up; a zero poll
    /// spun a core. Timeouts run from 1 ms to a day, as the worker's.
    #[test]
    fn zero_or_huge_timeouts_are_usage_errors() {
        for args in [
            [
                "catchall-producer",
                "--confirm-timeout",
                "0s",
                "generate",
                "--events",
                "1",
            ],
            [
                "catchall-producer",
                "--give-up-after",
                "400000000000d",
                "generate",
                "--events",
                "1",
            ],
        ] {
            let error = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
        let error = Cli::try_parse_from([
            "catchall-producer",
            "tail",
            "f",
            "--format",
            "postfix",
            "--poll",
            "0s",
        ])
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }

    /// On schedule, a short lag is caught up; after a stall of more than a second the
    /// schedule restarts at the rate instead of sending the stall's worth at once.
    #[test]
    fn rate_catches_up_jitter_but_not_a_stall() {
        let start = Instant::now();
        let mut pace = Pace::new(1000, start);
        assert_eq!(pace.due(start), start);
        pace.sent(500);
        assert_eq!(pace.due(start), start + Duration::from_millis(500));
        // 300 ms late: the next chunk goes at once (it is due in the past), on the same schedule.
        let late = start + Duration::from_millis(800);
        assert_eq!(pace.due(late), start + Duration::from_millis(500));
        pace.sent(500);
        // 5 s stall: the schedule starts again from now, at 1,000 events/s.
        let after_stall = start + Duration::from_secs(6);
        assert_eq!(pace.due(after_stall), after_stall);
        pace.sent(100);
        assert_eq!(
            pace.due(after_stall),
            after_stall + Duration::from_millis(100)
        );
    }
}
