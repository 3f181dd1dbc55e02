//! The producer's retries: a nack waits before the message goes out again, and giving up still
//! writes the `--expect` CSV of what was confirmed. `publish -` reads NDJSON from stdin.

use crate::helpers::*;
use crate::proxy::Proxy;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_is_retried_with_backoff() {
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    let full = nacking_queue(&broker, &channel).await;
    let started = Instant::now();
    let output = tokio::process::Command::new(binary("catchall-producer"))
        .envs(broker.env())
        .args(["send", "a.example", "delivered", "--max-attempts", "4"])
        .output()
        .await
        .expect("run the producer");
    let took = started.elapsed();
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
    assert!(
        !output.status.success(),
        "nacked 4 times: the producer fails"
    );
    // Three waits between four attempts: at least 100 + 200 + 400 ms.
    assert!(
        took >= Duration::from_millis(700),
        "the retries were spaced by a backoff, not burnt at once ({took:?})"
    );
}

/// Binds a queue that refuses every message to the broker's exchange: the broker nacks each
/// publish. Returns its name (delete it after).
async fn nacking_queue(broker: &TestBroker, channel: &lapin::Channel) -> String {
    let full = format!("{}.full", broker.queue);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare the full queue");
    channel
        .queue_bind(
            full.as_str().into(),
            broker.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the full queue");
    full
}

/// A broker that nacks every publish (a full queue with `overflow: reject-publish`): messages
/// waiting for a retry count against `--window` like those waiting for a confirm, so the
/// producer stops reading its input. They stood outside it: each nack freed a slot for a new
/// message, and the producer read its input into the retry queue (hundreds of MB in seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_count_against_the_window_when_every_publish_is_nacked() {
    const WATCHED: Duration = Duration::from_secs(8);
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    let full = nacking_queue(&broker, &channel).await;
    let (mut child, mut lines) = logging_producer(
        &broker,
        &["--window", "100"],
        &["generate", "--events", "20000000", "--batch", "100"],
    );
    let pid = child.id().expect("the producer's pid");
    let started = Instant::now();
    // The broker nacks (a producer that never got that far would stay small too).
    await_nacks(&mut lines, 100).await;
    // Then watched for 8 s in all, its log read on (a full pipe would stop the producer).
    let _ = tokio::time::timeout(WATCHED.saturating_sub(started.elapsed()), async {
        while let Ok(Some(_)) = lines.next_line().await {}
    })
    .await;
    // VmHWM: the peak over the whole run.
    let peak = peak_rss_bytes(pid);
    let _ = child.kill().await;
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
    eprintln!("peak RSS of the producer: {} MiB", peak >> 20);
    assert!(
        peak < 64 << 20,
        "the producer held {} MiB: its input went into the retry queue",
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_still_writes_what_was_confirmed() {
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let (proxy, producer) = through_a_proxy(
        &broker,
        &[
            "--give-up-after",
            "1s",
            "--confirm-timeout",
            "1s",
            "--events",
            "1000000",
            "--rate",
            "5000",
            "--seed",
            "8",
        ],
    )
    .await;
    // Well past 1000 queued: the confirms of the last messages the broker took may die with the
    // cut, and the CSV must still hold 1000.
    wait_for(Duration::from_secs(30), "some events confirmed", || async {
        (broker.depth(&broker.queue).await >= 2000).then_some(())
    })
    .await;
    proxy.cut();
    let (output, confirmed) = producer.exit(Duration::from_secs(60)).await;
    assert!(!output.status.success(), "giving up is a failure");
    let queued = i64::from(broker.depth(&broker.queue).await);
    eprintln!(
        "{}; {confirmed} events in the CSV, {queued} messages queued",
        String::from_utf8_lossy(&output.stdout).trim()
    );
    assert!(confirmed >= 1000, "the CSV holds what was confirmed");
    assert!(confirmed <= queued, "only what the broker took");
}

/// A stop while the broker takes messages but its confirms do not come back: what is still
/// unsettled when the stop's confirm timeout ends is counted as failed (the broker holds it,
/// and the CSV does not). It was left out of the summary, which said "0 failed" while the queue
/// held more than the CSV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_counts_what_stays_unconfirmed_as_failed() {
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let (proxy, producer) = through_a_proxy(
        &broker,
        &[
            "--confirm-timeout",
            "1s",
            "--events",
            "1000000",
            "--rate",
            "2000",
            "--seed",
            "12",
        ],
    )
    .await;
    wait_for(Duration::from_secs(30), "some events queued", || async {
        (broker.depth(&broker.queue).await >= 500).then_some(())
    })
    .await;
    proxy.swallow_replies();
    let swallowed_at = broker.depth(&broker.queue).await;
    wait_for(
        Duration::from_secs(30),
        "messages taken without a confirm",
        || async { (broker.depth(&broker.queue).await >= swallowed_at + 200).then_some(()) },
    )
    .await;
    let (status, summary, counts) = producer.stop().await;
    assert_eq!(status.code(), Some(1), "a stopped run exits 1");
    let confirmed: i64 = counts.values().map(|(d, b)| d + b).sum();
    let queued = i64::from(broker.depth(&broker.queue).await);
    let failed: i64 = summary
        .split(", ")
        .find_map(|part| {
            part.strip_suffix(" failed")?
                .split(' ')
                .next_back()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("a failed count in the summary: {summary}"));
    eprintln!("{confirmed} events in the CSV, {queued} messages queued, {failed} failed");
    assert!(
        confirmed < queued,
        "the broker holds more than was confirmed"
    );
    assert!(
        failed > 0,
        "what the broker took without a confirm is counted as failed: {summary}"
    );
}

/// `publish -`: NDJSON from stdin (CRLF too, and a leading byte order mark), blank lines
/// skipped, an invalid line (one not UTF-8 included) named on stderr and the exit non-zero,
/// every valid event published and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reads_ndjson_from_stdin_and_names_a_bad_line() {
    use tokio::io::AsyncWriteExt;
    let (db, broker, worker) = started().await;
    let mut child = tokio::process::Command::new(binary("catchall-producer"))
        .envs(broker.env())
        .args(["publish", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start catchall-producer publish");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(
            b"\xEF\xBB\xBF{\"domain\":\"stdin.example\",\"type\":\"delivered\"}\n\n\
              {\"domain\":\"stdin.example\",\"type\":\"nope\"}\n\
              {\"domain\":\"stdin\xff.example\",\"type\":\"delivered\"}\r\n\
              {\"domain\":\"stdin.example\",\"type\":\"bounced\"}\r\n",
        )
        .await
        .expect("write stdin");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the producer finishes")
        .expect("wait for the producer");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an invalid line fails the run");
    assert!(!stderr.contains("-:1:"), "{stderr}");
    assert!(stderr.contains("-:3: skipped"), "{stderr}");
    // A line that is not UTF-8 is skipped too, and the lines after it are read.
    assert!(stderr.contains("-:4: skipped"), "{stderr}");
    wait_for(
        Duration::from_secs(30),
        "both valid events counted",
        || async {
            let counts = db.counts().await;
            (counts.get("stdin.example") == Some(&(1, 1))).then_some(())
        },
    )
    .await;
    worker.stop().await;
}

/// SIGTERM to `generate` stops it sending, settles what it sent, prints the summary and writes
/// the `--expect` CSV of what the broker confirmed, then exits 1 (the run is not complete). It
/// died on the spot, with neither, so a run could not be reconciled with what the worker
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_generate_still_writes_what_was_confirmed() {
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let producer = Producer::spawn(
        broker.env(),
        &[
            "--events", "1000000", "--rate", "5000", "--batch", "1", "--seed", "9",
        ],
    );
    wait_for(Duration::from_secs(30), "some events queued", || async {
        (broker.depth(&broker.queue).await >= 1000).then_some(())
    })
    .await;
    // SAFETY: kill(2) on our own child process, which has not been reaped yet.
    assert_eq!(
        unsafe { libc::kill(producer.pid(), libc::SIGTERM) },
        0,
        "send SIGTERM"
    );
    let (output, confirmed) = producer.exit(Duration::from_secs(30)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("confirmed"), "the summary: {stdout}");
    let queued = i64::from(broker.depth(&broker.queue).await);
    eprintln!("{}; {confirmed} in the CSV, {queued} queued", stdout.trim());
    assert!(confirmed >= 1000, "{confirmed} events in the CSV");
    assert_eq!(confirmed, queued, "the CSV holds what the broker took");
}

/// `publish -` on a pipe that stays open, with RabbitMQ gone past `--give-up-after`: it stops
/// reading and exits 1. It read on, counting every later line as failed without trying it,
/// for as long as the pipe stayed open (for `journalctl -f | …`, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_from_an_open_pipe_exits_once_it_gives_up() {
    use tokio::io::AsyncWriteExt;
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let mut env = broker.env();
    env.push(("AMQP_URL", format!("amqp://guest:guest@{}/%2f", proxy.addr)));
    let mut child = tokio::process::Command::new(binary("catchall-producer"))
        .envs(env)
        .args(["--give-up-after", "1s", "--confirm-timeout", "1s"])
        .args(["publish", "-", "--batch", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the producer");
    let mut stdin = child.stdin.take().expect("its stdin");
    let line = b"{\"domain\":\"pipe.example\",\"type\":\"delivered\"}\n";
    stdin.write_all(line).await.expect("write a line");
    wait_for(Duration::from_secs(30), "the first line queued", || async {
        (broker.depth(&broker.queue).await == 1).then_some(())
    })
    .await;
    proxy.cut();
    // A line now and then, the pipe kept open: the producer must end by itself.
    let exited = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(status) = child.try_wait().expect("poll the producer") {
                return status;
            }
            let _ = stdin.write_all(line).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the producer exits within 60 s of the cut, its input still open");
    assert_eq!(exited.code(), Some(1), "giving up is a failure");
}

/// SIGTERM while every publish is nacked (the window full of messages waiting for a retry):
/// the producer stops within a confirm timeout, exit 1. A stop was honoured only between
/// sends, and a send waiting for room in the window waited until messages ran out of their 50
/// attempts (minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_a_window_of_nacked_messages() {
    const WINDOW: usize = 50;
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    let full = nacking_queue(&broker, &channel).await;
    let window = WINDOW.to_string();
    let args = ["--window", &window, "--confirm-timeout", "2s"];
    let (child, mut lines) = logging_producer(&broker, &args, &["generate", "--events", "1000000"]);
    // The window full of nacked messages waiting for their retry.
    await_nacks(&mut lines, WINDOW).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stopped = Instant::now();
    let pid = child.id().expect("the producer's pid") as i32;
    // SAFETY: kill(2) on our own child process, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "send SIGTERM");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the producer stops within 60 s")
        .expect("wait for the producer");
    let took = stopped.elapsed();
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("stopped in {took:?}: {}", stdout.trim());
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("confirmed 0 events"), "{stdout}");
    assert!(
        took < Duration::from_secs(20),
        "the stop took {took:?}, far more than a confirm timeout (2 s)"
    );
}

/// `publish -` on a pipe that stays open and quiet (`journalctl -f | …`): what it sent is settled
/// meanwhile (a nacked line is retried; it waited for the window to fill or the input to end, so
/// a nack was never retried and a confirm never counted while the pipe was quiet), and SIGTERM
/// ends it (it printed its summary, then hung until killed: the read of stdin on tokio's
/// blocking pool held the runtime's shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_on_a_quiet_pipe_settles_what_it_sent_and_stops() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    let full = nacking_queue(&broker, &channel).await;
    let (mut child, mut stdin) = piped_producer(
        &broker,
        &["--confirm-timeout", "2s", "publish", "-"],
        std::process::Stdio::piped(),
    );
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    stdin
        .write_all(b"{\"domain\":\"pipe.example\",\"type\":\"delivered\"}\n")
        .await
        .expect("write a line");
    // Nothing more is written: the nacked line is retried all the same.
    await_nacks(&mut lines, 3).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (status, took) = sigterm(&mut child, Duration::from_secs(30)).await;
    eprintln!("stopped in {took:?}");
    assert_eq!(status.code(), Some(1), "stopped by a signal: exit 1");
    drop(stdin);
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
}

/// `publish - --batch 100` on a pipe that stays open: a line is published once the pipe is quiet,
/// not held until 99 more come (or the input ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_a_partial_batch_when_its_pipe_is_quiet() {
    use tokio::io::AsyncWriteExt;
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let (mut child, mut stdin) = piped_producer(
        &broker,
        &["publish", "-", "--batch", "100"],
        std::process::Stdio::null(),
    );
    stdin
        .write_all(b"{\"domain\":\"quiet.example\",\"type\":\"delivered\"}\n")
        .await
        .expect("write a line");
    wait_for(Duration::from_secs(30), "the line in the queue", || async {
        (broker.depth(&broker.queue).await == 1).then_some(())
    })
    .await;
    let (status, _) = sigterm(&mut child, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "stopped by a signal: exit 1");
    drop(stdin);
}

/// `publish - --batch 100` fed a line every 20 ms (a busy log): partial batches go out while the
/// lines keep coming. A timer restarted at every line never fired at that pace, so nothing was
/// published before the 100th line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_partial_batches_while_lines_keep_coming() {
    use tokio::io::AsyncWriteExt;
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let (mut child, mut stdin) = piped_producer(
        &broker,
        &["publish", "-", "--batch", "100"],
        std::process::Stdio::null(),
    );
    let mut written = 0;
    // The input's pace, not a wait for an outcome: a line every 20 ms until one is queued.
    while broker.depth(&broker.queue).await == 0 && written < 300 {
        stdin
            .write_all(b"{\"domain\":\"busy.example\",\"type\":\"delivered\"}\n")
            .await
            .expect("write a line");
        written += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        written < 100,
        "the first line reached the queue after {written} lines were written"
    );
    let (status, _) = sigterm(&mut child, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "stopped by a signal: exit 1");
    drop(stdin);
}

/// `publish -` given one line of 256 MiB (a JSON array by mistake, an input without newlines)
/// holds only what it takes to refuse it as too large: it held the whole line, and a line of
/// gigabytes took as much memory. The line is refused with its number, the next one published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_does_not_hold_a_huge_line_whole() {
    use tokio::io::AsyncWriteExt;
    const LONG: usize = 256 << 20;
    let broker = TestBroker::new();
    let (_connection, _channel) = broker.channel().await; // the topology
    let mut child = tokio::process::Command::new(binary("catchall-producer"))
        .envs(broker.env())
        .args(["publish", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the producer");
    let pid = child.id().expect("the producer's pid");
    let mut stdin = child.stdin.take().expect("its stdin");
    let block = vec![b'x'; 1 << 20];
    for _ in 0..LONG / block.len() {
        stdin.write_all(&block).await.expect("write the long line");
    }
    // Read by now but for what the pipe holds; the line is not over yet.
    let peak = peak_rss_bytes(pid);
    stdin
        .write_all(b"\n{\"domain\":\"after.example\",\"type\":\"delivered\"}\n")
        .await
        .expect("write the next line");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the producer ends within 60 s")
        .expect("wait for the producer");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("peak RSS {} MiB; {}", peak >> 20, stderr.trim());
    assert!(
        !output.status.success(),
        "a refused line makes the exit non-zero"
    );
    assert!(stderr.contains("-:1: skipped"), "{stderr}");
    assert_eq!(
        broker.depth(&broker.queue).await,
        1,
        "the next line published"
    );
    assert!(
        peak < 64 << 20,
        "the producer held {} MiB for a line of 256 MiB",
        peak >> 20
    );
}

/// `--batch 10000` (about 500 KB a message) while every publish is nacked: the window is bounded
/// by its bytes (`--window-bytes`, 64 MiB) as well as by its messages. Counting messages alone,
/// the default window of 1,000 filled with nacked batches waiting for their retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_is_bounded_by_its_bytes() {
    const NACKS: usize = 600;
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    let full = nacking_queue(&broker, &channel).await;
    let generate = ["generate", "--events", "20000000", "--batch", "10000"];
    let (mut child, mut lines) = logging_producer(&broker, &[], &generate);
    await_nacks(&mut lines, NACKS).await;
    let peak = peak_rss_bytes(child.id().expect("the producer's pid"));
    let _ = child.kill().await;
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
    eprintln!(
        "peak RSS of the producer after {NACKS} nacks: {} MiB",
        peak >> 20
    );
    assert!(
        peak < 160 << 20,
        "the producer held {} MiB of nacked batches: its window counts messages only",
        peak >> 20
    );
}

type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// The producer with `flags`, then `command`, logging at debug level to a pipe read line by
/// line (stdout piped too, for its summary).
fn logging_producer(
    broker: &TestBroker,
    flags: &[&str],
    command: &[&str],
) -> (tokio::process::Child, LogLines) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(binary("catchall-producer"))
        .envs(broker.env())
        .env("RUST_LOG", "catchall_producer=debug")
        .args(flags)
        .args(command)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the producer");
    let lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    (child, lines)
}

/// `catchall-producer ARGS` on `broker` reading a pipe the test writes (and closes by dropping
/// it), its log (debug, for [`await_nacks`]) to `stderr`, its summary dropped.
fn piped_producer(
    broker: &TestBroker,
    args: &[&str],
    stderr: std::process::Stdio,
) -> (tokio::process::Child, tokio::process::ChildStdin) {
    let mut child = tokio::process::Command::new(binary("catchall-producer"))
        .envs(broker.env())
        .env("RUST_LOG", "catchall_producer=debug")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("start the producer");
    let stdin = child.stdin.take().expect("its stdin");
    (child, stdin)
}

/// Waits (90 s at most) until the producer logged `nacks` nacks ("Publishing again").
async fn await_nacks(lines: &mut LogLines, nacks: usize) {
    let mut nacked = 0;
    tokio::time::timeout(Duration::from_secs(90), async {
        while nacked < nacks {
            match lines.next_line().await.expect("read the log") {
                Some(line) if line.contains("Publishing again") => nacked += 1,
                Some(_) => {}
                None => panic!("the producer exited"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{nacks} nacks within 90 s"));
}

/// `catchall-producer generate ARGS` on `broker`, connected through a proxy of its own.
async fn through_a_proxy(broker: &TestBroker, args: &[&str]) -> (Proxy, Producer) {
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let mut env = broker.env();
    env.push(("AMQP_URL", format!("amqp://guest:guest@{}/%2f", proxy.addr)));
    let producer = Producer::spawn(env, args);
    (proxy, producer)
}

/// A stop while a retry is being published again and RabbitMQ cannot be reached (the retry
/// waits between connection attempts): the wait was dropped with the message in hand, which
/// was then neither confirmed nor failed, and the summary accounted for one message fewer than
/// were sent: 49 of 50 failed, in 3 of 8 runs (whichever of the stop and the wait woke first
/// decided).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_a_retry_waits_for_the_broker_counts_it_as_failed() {
    let broker = TestBroker::new();
    let (connection, channel) = broker.channel().await;
    let full = nacking_queue(&broker, &channel).await;
    let (proxy, producer) = through_a_proxy(
        &broker,
        &["--events", "50", "--seed", "14", "--give-up-after", "120s"],
    )
    .await;
    // Each attempt leaves a copy in the broker's queue (the full one nacks it): past 50, the
    // nacked messages are being published again.
    wait_for(
        Duration::from_secs(30),
        "retries of nacked messages",
        || async { (broker.depth(&broker.queue).await > 50).then_some(()) },
    )
    .await;
    let refused = proxy.refused();
    proxy.cut();
    wait_for(
        Duration::from_secs(30),
        "a retry waiting for the broker",
        || async { (proxy.refused() > refused).then_some(()) },
    )
    .await;
    let (status, summary, counts) = producer.stop().await;
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "".into()).await;
    assert_eq!(status.code(), Some(1), "a stopped run exits 1");
    assert!(counts.is_empty(), "nothing confirmed: {summary}");
    assert!(
        summary.contains("; 50 failed") || summary.contains(", 50 failed"),
        "every message sent and not confirmed is failed: {summary}"
    );
}

/// Bounced events unroutable mid-run (the queue's `#` binding replaced by `delivered`), among
/// routed ones, at full speed: RabbitMQ answers a `basic.return` for each, and often acks
/// several messages with one multiple-ack. lapin attached the waiting return to whichever
/// confirm of that ack it settled first (a HashMap's order): a routed message was retried, and
/// the returned one reported confirmed, so the `--expect` CSV counted events the queue never
/// had. Every event the producer reports confirmed must reach the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_message_is_never_reported_confirmed() {
    let (db, broker, worker) = started().await;
    let producer = Producer::spawn(
        broker.env(),
        &[
            "--events",
            "40000",
            "--rate",
            "8000",
            "--seed",
            "15",
            "--max-attempts",
            "2",
        ],
    );
    wait_for(Duration::from_secs(30), "some events counted", || async {
        (db.total_events().await > 1_000).then_some(())
    })
    .await;
    let (connection, channel) = broker.channel().await;
    channel
        .queue_bind(
            broker.queue.as_str().into(),
            broker.exchange.as_str().into(),
            "delivered".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind delivered");
    channel
        .queue_unbind(
            broker.queue.as_str().into(),
            broker.exchange.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind #");
    let (output, confirmed) = producer.exit(Duration::from_secs(120)).await;
    let _ = connection.close(200, "".into()).await;
    let summary = String::from_utf8_lossy(&output.stdout);
    eprintln!("{}", summary.trim());
    assert!(
        !output.status.success(),
        "returned bounces failed: {summary}"
    );
    // What the worker counts is what reached the queue (a message published twice is counted
    // once, by its id).
    // (Polled to a deadline rather than `wait_for`, so a shortfall fails with both figures.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let counted = loop {
        let counted = db.total_events().await;
        if counted >= confirmed || Instant::now() > deadline {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        counted, confirmed,
        "the worker counted every event the producer reported confirmed, and no more"
    );
    worker.stop().await;
}
