//! `catchall-producer tail` on the log of a real Postfix (SPEC §7): Postfix relays to an SMTP
//! sink in this test that accepts some recipients and refuses others with `550 5.1.1`,
//! `552 5.2.2` and `554 5.7.1`; the tailer feeds catchall; the counters must equal what the sink
//! decided, across a log rotation and tailer restarts.
//!
//! Postfix (Debian package `postfix`, installed by `.ci/postfix.sh`) runs as its own instance:
//! its own config, queue and data directories under a temporary directory (`postfix -c DIR`),
//! no inet listener, logging to a file (`maillog_file`, `postlogd`). It never touches a system
//! Postfix.

use crate::bounce::{all_events, status};
use crate::helpers::*;
use crate::proxy::Proxy;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the sink decided, per domain: (delivered, refused 5.1.1, refused otherwise).
type Decisions = Arc<Mutex<HashMap<String, (i64, i64, i64)>>>;

/// An SMTP server that decides by the recipient's local part: `unknown…` → `550 5.1.1`,
/// `full…` → `552 5.2.2`, `spam…` → `554 5.7.1`, anything else accepted.
struct Sink {
    port: u16,
    decisions: Decisions,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the sink");
        let port = listener.local_addr().expect("sink address").port();
        let decisions = Decisions::default();
        let shared = decisions.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let decisions = shared.clone();
                tokio::spawn(async move {
                    let _ = session(stream, decisions).await;
                });
            }
        });
        Self {
            port,
            decisions,
            task,
        }
    }

    fn decided(&self) -> i64 {
        let decisions = self.decisions.lock().expect("decisions");
        decisions.values().map(|(d, u, o)| d + u + o).sum()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One SMTP session. Deliveries count once the message data is accepted.
async fn session(stream: tokio::net::TcpStream, decisions: Decisions) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 sink.test ESMTP\r\n").await?;
    let mut accepted: Vec<String> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            "250 sink.test".into()
        } else if upper.starts_with("MAIL FROM") || upper.starts_with("RSET") {
            accepted.clear();
            "250 2.1.0 Ok".into()
        } else if upper.starts_with("RCPT TO:") {
            let address = line[8..].trim().trim_start_matches('<');
            let address = address.split('>').next().unwrap_or_default().to_string();
            let (local, domain) = address.rsplit_once('@').unwrap_or(("", ""));
            let domain = domain.to_ascii_lowercase();
            let mut decisions = decisions.lock().expect("decisions");
            let entry = decisions.entry(domain).or_default();
            if local.starts_with("unknown") {
                entry.1 += 1;
                format!("550 5.1.1 <{address}>: Recipient address rejected: User unknown")
            } else if local.starts_with("full") {
                entry.2 += 1;
                format!("552 5.2.2 <{address}>: Mailbox full")
            } else if local.starts_with("spam") {
                entry.2 += 1;
                "554 5.7.1 Message rejected as spam".into()
            } else {
                accepted.push(address);
                "250 2.1.5 Ok".into()
            }
        } else if upper == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            while let Some(data) = lines.next_line().await? {
                if data == "." {
                    break;
                }
            }
            let mut decisions = decisions.lock().expect("decisions");
            for address in accepted.drain(..) {
                let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
                decisions.entry(domain.to_ascii_lowercase()).or_default().0 += 1;
            }
            "250 2.0.0 Ok: queued".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "250 2.0.0 Ok".into()
        };
        write.write_all(format!("{reply}\r\n").as_bytes()).await?;
    }
    Ok(())
}

/// A Postfix instance of this test's own, relaying everything to the sink.
struct Postfix {
    dir: PathBuf,
}

impl Postfix {
    async fn start(relay_port: u16) -> Self {
        assert!(
            Path::new("/usr/sbin/postfix").exists(),
            "Postfix is missing: run `bash .ci/postfix.sh` (make test does)"
        );
        let dir = std::env::temp_dir().join(format!("catchall-postfix-{}", uuid::Uuid::now_v7()));
        for sub in ["queue", "data"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create the Postfix directories");
        }
        let d = dir.display();
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = catchall-test.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_transport = error:local delivery disabled
relayhost = [127.0.0.1]:{relay_port}
inet_interfaces = loopback-only
inet_protocols = ipv4
master_service_disable = inet
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
smtp_tls_security_level = none
alias_maps =
alias_database =
biff = no
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"
        );
        std::fs::write(dir.join("main.cf"), main_cf).expect("write main.cf");
        std::fs::write(dir.join("master.cf"), MASTER_CF).expect("write master.cf");
        let status = std::process::Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()
            .expect("chown");
        assert!(status.success(), "chown the data directory to postfix");
        let postfix = Self { dir };
        postfix.command(&["start"]).await;
        postfix
    }

    fn maillog(&self) -> PathBuf {
        self.dir.join("maillog")
    }

    async fn command(&self, args: &[&str]) {
        let output = tokio::process::Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(&self.dir)
            .args(args)
            .output()
            .await
            .expect("run postfix");
        assert!(
            output.status.success(),
            "postfix {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Injects one message for `recipients` with Postfix's own `sendmail`; `-N never` so the
    /// refused recipients cause no bounce message.
    async fn sendmail(&self, recipients: &[String]) {
        let mut child = tokio::process::Command::new("/usr/sbin/sendmail")
            .arg("-C")
            .arg(&self.dir)
            .args(["-N", "never", "-f", "sender@sender.test"])
            .args(recipients)
            .stdin(Stdio::piped())
            .spawn()
            .expect("run sendmail");
        let mut stdin = child.stdin.take().expect("sendmail stdin");
        stdin
            .write_all(b"Subject: catchall tail test\r\n\r\nHello.\r\n")
            .await
            .expect("write the message");
        drop(stdin);
        assert!(
            child.wait().await.expect("sendmail").success(),
            "sendmail failed"
        );
    }

    /// Delivery lines (`status=sent|bounced`) in the current log.
    fn logged(&self) -> usize {
        std::fs::read_to_string(self.maillog())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("status=sent") || l.contains("status=bounced"))
            .count()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = std::process::Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(&self.dir)
            .arg("stop")
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// `catchall-producer tail` running in the background.
struct Tailer {
    child: tokio::process::Child,
}

impl Tailer {
    fn start(broker: &TestBroker, log: &Path, state: &Path) -> Self {
        Self::spawn(broker, log, state, &[], &[])
    }

    /// For the real Postfix, whose "remote" server (the sink) listens on 127.0.0.1: its
    /// deliveries are hops to a loopback address, which `tail` skips unless told.
    fn start_on_loopback(broker: &TestBroker, log: &Path, state: &Path) -> Self {
        Self::spawn(broker, log, state, &[], &["--count-loopback"])
    }

    /// With `env` set over the broker's (an `AMQP_URL` through a proxy, producer settings).
    fn start_with(
        broker: &TestBroker,
        log: &Path,
        state: &Path,
        env: &[(&'static str, String)],
    ) -> Self {
        Self::spawn(broker, log, state, env, &[])
    }

    fn spawn(
        broker: &TestBroker,
        log: &Path,
        state: &Path,
        env: &[(&'static str, String)],
        args: &[&str],
    ) -> Self {
        let child = tokio::process::Command::new(binary("catchall-producer"))
            .envs(broker.env())
            .envs(env.iter().cloned())
            .arg("tail")
            .arg(log)
            .args(["--format", "postfix", "--poll", "100ms", "--state"])
            .arg(state)
            .args(args)
            // Its summary, for the tests that read it (a few lines: the pipe never fills).
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start catchall-producer tail");
        Self { child }
    }

    /// SIGTERM, then a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("tailer pid") as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("the tailer stops within 15 s")
            .expect("wait for the tailer");
        assert!(status.success(), "the tailer exited with {status}");
    }
}

/// One message of each kind for each domain, `round` making the addresses unique.
fn recipients(round: usize) -> Vec<String> {
    let mut all = Vec::new();
    for i in 0..3 {
        all.push(format!("ok{round}-{i}@accepts.test"));
        all.push(format!("ok{round}-{i}@mixed.test"));
        all.push(format!("ok{round}-{i}@full.test"));
        all.push(format!("ok{round}-{i}@spam.test"));
    }
    all.push(format!("unknown{round}@mixed.test"));
    all.push(format!("full{round}@full.test"));
    all.push(format!("spam{round}@spam.test"));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_of_a_real_postfix_log_counts_what_the_sink_decided() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    config.threshold = 5;
    let worker = TestWorker::start(config).await;
    worker.ready().await;
    let sink = Sink::start().await;
    let postfix = Postfix::start(sink.port).await;
    let state = postfix.dir.join("tail.state");
    let per_round = recipients(0).len();

    let wait_counted = |n: usize| {
        let db = &db;
        async move {
            wait_for(
                Duration::from_secs(60),
                "the tailer's events to be counted",
                || async {
                    let counted = all_events(db).await;
                    assert!(
                        counted <= n as i64,
                        "counted {counted} events, more than {n}"
                    );
                    (counted == n as i64).then_some(())
                },
            )
            .await
        }
    };

    // Round 1 with the tailer running; then the log is rotated mid-run (rename by
    // `postfix logrotate`), and round 2 goes to the new file.
    let tailer = Tailer::start_on_loopback(&broker, &postfix.maillog(), &state);
    postfix.sendmail(&recipients(0)).await;
    postfix.sendmail(&recipients(1)).await;
    wait_counted(2 * per_round).await;
    postfix.command(&["logrotate"]).await;
    postfix.sendmail(&recipients(2)).await;
    wait_counted(3 * per_round).await;

    // The tailer stops; mail goes on; a new tailer resumes from the state file.
    tailer.stop().await;
    postfix.sendmail(&recipients(3)).await;
    wait_for(
        Duration::from_secs(60),
        "Postfix to log round 4",
        || async {
            (sink.decided() == 4 * per_round as i64 && postfix.logged() == 2 * per_round)
                .then_some(())
        },
    )
    .await;
    let tailer = Tailer::start_on_loopback(&broker, &postfix.maillog(), &state);
    wait_counted(4 * per_round).await;
    tailer.stop().await;

    // A tailer without the state re-reads the current file: every line is a duplicate.
    let duplicates_before = worker
        .metric("catchall_messages_total{outcome=\"duplicate\"}")
        .await;
    let fresh_state = postfix.dir.join("fresh.state");
    let tailer = Tailer::start_on_loopback(&broker, &postfix.maillog(), &fresh_state);
    wait_for(
        Duration::from_secs(30),
        "the re-read lines to be skipped",
        || async {
            let duplicates = worker
                .metric("catchall_messages_total{outcome=\"duplicate\"}")
                .await;
            (duplicates - duplicates_before == (2 * per_round) as f64).then_some(())
        },
    )
    .await;
    tailer.stop().await;

    // Every counter equals what the sink decided.
    let decided = sink.decisions.lock().expect("decisions").clone();
    assert_eq!(
        all_events(&db).await,
        4 * per_round as i64,
        "nothing doubled"
    );
    let counted: HashMap<String, (i64, i64, i64)> = db
        .client()
        .await
        .query(
            "SELECT domain, delivered, bounced, other_bounced FROM domains",
            &[],
        )
        .await
        .expect("read counters")
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
        .collect();
    assert_eq!(counted, decided);
    let verdicts = [
        ("accepts.test", "catch-all"),
        ("mixed.test", "not catch-all"),
        ("full.test", "catch-all"),
        ("spam.test", "catch-all"),
    ];
    for (domain, verdict) in verdicts {
        assert_eq!(status(&worker, domain).await["status"], verdict, "{domain}");
    }
    worker.stop().await;
}

/// [`postfix_line`]s numbered `range`, for `{local}{n}@{domain}`.
fn postfix_lines(
    range: std::ops::Range<usize>,
    local: &str,
    domain: &str,
    sent: bool,
) -> Vec<String> {
    range
        .map(|n| postfix_line(n, &format!("{local}{n}@{domain}"), sent))
        .collect()
}

/// A Postfix delivery line for `address`: `sent`, or `bounced` with `550 5.1.1`.
fn postfix_line(n: usize, address: &str, sent: bool) -> String {
    if sent {
        format!(
            "Nov 25 02:38:{:02} mx1 postfix/smtp[{n}]: Q{n:08}: to=<{address}>, relay=mx[192.0.2.1]:25, delay=0.1, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok)\n",
            n % 60
        )
    } else {
        format!(
            "Nov 25 02:38:{:02} mx1 postfix/smtp[{n}]: Q{n:08}: to=<{address}>, relay=mx[192.0.2.1]:25, delay=0.1, delays=0/0/0/0.1, dsn=5.1.1, status=bounced (host mx[192.0.2.1] said: 550 5.1.1 User unknown (in reply to RCPT TO command))\n",
            n % 60
        )
    }
}

fn append(path: &Path, lines: &[String]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the log");
    for line in lines {
        file.write_all(line.as_bytes()).expect("append");
    }
}

/// A fresh directory, and the paths of the log and the state file in it.
fn log_files() -> (LogDir, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("catchall-tail-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let (log, state) = (dir.join("maillog"), dir.join("tail.state"));
    (LogDir(dir), log, state)
}

/// A test's log directory, removed on drop (also when the test fails).
struct LogDir(PathBuf);

impl LogDir {
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until exactly `n` events are counted (never more).
async fn counted(db: &TestDb, n: i64) {
    wait_for(
        Duration::from_secs(30),
        "the log's events to be counted",
        || async {
            let counted = all_events(db).await;
            assert!(counted <= n, "counted {counted} events, more than {n}");
            (counted == n).then_some(())
        },
    )
    .await
}

/// Truncation in place (`copytruncate`) while the tailer runs, then two rotations by rename
/// while it is stopped: the restarted tailer finds the twice-renamed file by its identity,
/// finishes it from the saved offset, then reads the file rotated between, then follows the new
/// file; an older rotation and a copy beside them are not read. Nothing skipped, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_a_truncation_and_two_rotations_while_stopped() {
    let (db, broker, worker) = started().await;
    let (dir, log, state) = log_files();
    let counted = |n: i64| counted(&db, n);
    // A rotation older than anything the tailer reads.
    append(
        &dir.join("maillog.3"),
        &[postfix_line(90, "old@old.test", true)],
    );

    let first = postfix_lines(0..6, "u", "a.test", true);
    append(&log, &first);
    let tailer = Tailer::start(&broker, &log, &state);
    counted(6).await;

    // copytruncate: the file is emptied in place and written again, shorter than before.
    std::fs::File::create(&log).expect("truncate");
    let second = postfix_lines(10..12, "x", "b.test", false);
    append(&log, &second);
    counted(8).await;
    tailer.stop().await;

    // While stopped: more lines in the old file, then it is renamed and a new one started.
    let third = postfix_lines(20..23, "u", "c.test", true);
    append(&log, &third);
    std::fs::rename(&log, dir.join("maillog.1")).expect("rotate");
    let between = postfix_lines(40..42, "u", "e.test", true);
    append(&log, &between);
    std::fs::rename(dir.join("maillog.1"), dir.join("maillog.2")).expect("rotate again");
    std::fs::rename(&log, dir.join("maillog.1")).expect("rotate again");
    let fourth = postfix_lines(30..34, "u", "d.test", true);
    append(&log, &fourth);
    // A copy is not a rotation: its lines were read as the log's.
    std::fs::copy(dir.join("maillog.1"), dir.join("maillog.bak")).expect("copy");
    let tailer = Tailer::start(&broker, &log, &state);
    counted(17).await;
    tailer.stop().await;

    let rows = db
        .client()
        .await
        .query(
            "SELECT domain, delivered, bounced, other_bounced FROM domains ORDER BY domain",
            &[],
        )
        .await
        .expect("read counters");
    let got: Vec<(String, i64, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let want = [
        ("a.test", 6, 0, 0),
        ("b.test", 0, 2, 0),
        ("c.test", 3, 0, 0),
        ("d.test", 4, 0, 0),
        ("e.test", 2, 0, 0),
    ];
    let want: Vec<(String, i64, i64, i64)> = want
        .iter()
        .map(|(d, a, b, c)| (d.to_string(), *a, *b, *c))
        .collect();
    assert_eq!(got, want);
    worker.stop().await;
}

/// `copytruncate` while the tailer is stopped, and the emptied log written again past the saved
/// position before it starts: the restarted tailer sees that the bytes before its position are
/// not those it read, and reads the file from its start. It used to resume at the saved offset
/// (the file had the same identity and was long enough): the new lines before it were never
/// counted, and the first one after it was read from its middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_emptied_and_written_again_past_the_position_while_stopped_is_read_from_its_start() {
    let (db, broker, worker) = started().await;
    let (_dir, log, state) = log_files();
    let first = postfix_lines(0..6, "u", "a.test", true);
    append(&log, &first);
    let tailer = Tailer::start(&broker, &log, &state);
    counted(&db, 6).await;
    tailer.stop().await;

    // Emptied in place, then more lines than before: the file is longer than the position.
    std::fs::File::create(&log).expect("truncate");
    let second = postfix_lines(10..30, "x", "b.test", true);
    append(&log, &second);
    let tailer = Tailer::start(&broker, &log, &state);
    counted(&db, 26).await;
    tailer.stop().await;
    let counts = db.counts().await;
    assert_eq!(
        counts.get("b.test"),
        Some(&(20, 0)),
        "every new line counted"
    );
    assert_eq!(counts.get("a.test"), Some(&(6, 0)));
    worker.stop().await;
}

/// `copytruncate` while the tailer is stopped, with lines written after the saved position
/// before the copy: those lines are only in the copy (`maillog.1`). The restarted tailer finds
/// the copy by the bytes before its position, reads it from there, then the emptied log from
/// its start. It used to read only the emptied log: the lines in the copy were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lines_a_copytruncate_copied_while_stopped_are_read_from_the_copy() {
    let (db, broker, worker) = started().await;
    let (dir, log, state) = log_files();
    append(&log, &postfix_lines(0..6, "u", "a.test", true));
    let tailer = Tailer::start(&broker, &log, &state);
    counted(&db, 6).await;
    tailer.stop().await;

    // Stopped: more lines, then logrotate's copytruncate, then new lines in the emptied log.
    append(&log, &postfix_lines(10..14, "u", "c.test", true));
    std::fs::copy(&log, dir.join("maillog.1")).expect("copy");
    std::fs::File::create(&log).expect("truncate");
    append(&log, &postfix_lines(20..25, "u", "d.test", true));
    let tailer = Tailer::start(&broker, &log, &state);
    counted(&db, 15).await;
    tailer.stop().await;
    let counts = db.counts().await;
    assert_eq!(
        (
            counts.get("a.test"),
            counts.get("c.test"),
            counts.get("d.test")
        ),
        (Some(&(6, 0)), Some(&(4, 0)), Some(&(5, 0)))
    );
    worker.stop().await;
}

/// The tailer stopped after publishing lines but before saving its position past them (killed
/// between a chunk's confirm and the save), then a `copytruncate` while it was down: the
/// restarted tailer reads those lines again from the copy, under the ids they were published
/// with, so they count once. Their ids were made of the copy's inode, and they counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_read_again_from_a_copy_after_a_crash_count_once() {
    let (db, broker, worker) = started().await;
    let (dir, log, state) = log_files();
    let lines = postfix_lines(0..6, "u", "a.test", true);
    append(&log, &lines);
    let tailer = Tailer::start(&broker, &log, &state);
    counted(&db, 6).await;
    tailer.stop().await;

    // The position as a crash would have left it: after the first three lines, which the
    // broker had confirmed with the other three.
    let offset: usize = lines[..3].iter().map(String::len).sum();
    let content = std::fs::read(&log).expect("read the log");
    let before = &content[offset.saturating_sub(64)..offset];
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("read the state"))
            .expect("the state is JSON");
    saved["offset"] = offset.into();
    saved["before"] = before
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into();
    std::fs::write(&state, saved.to_string()).expect("rewind the state");

    // While stopped: logrotate's copytruncate, then new lines in the emptied log.
    std::fs::copy(&log, dir.join("maillog.1")).expect("copy");
    std::fs::File::create(&log).expect("truncate");
    append(&log, &postfix_lines(20..25, "u", "d.test", true));
    let tailer = Tailer::start(&broker, &log, &state);
    counted(&db, 11).await;
    tailer.stop().await;
    wait_for(Duration::from_secs(30), "the queue to drain", || async {
        (broker.depth(&broker.queue).await == 0).then_some(())
    })
    .await;
    let counts = db.counts().await;
    assert_eq!(
        (counts.get("a.test"), counts.get("d.test")),
        (Some(&(6, 0)), Some(&(5, 0))),
        "the lines read again from the copy count once"
    );
    // The queue counts only ready messages: the last ones may still be in the worker's batch.
    wait_for(Duration::from_secs(30), "three duplicates", || async {
        (worker.stats().duplicates >= 3).then_some(())
    })
    .await;
    assert_eq!(worker.stats().duplicates, 3, "the three lines read again");
    worker.stop().await;
}

/// RabbitMQ unreachable past `--give-up-after` while lines arrive: the tailer exits non-zero
/// with its saved position still before the lines it could not publish, and the restarted
/// tailer publishes them. (It used to save the position past them and read on, publishing
/// nothing: every line after the outage was lost, and a restart skipped them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tailer_that_gives_up_on_rabbitmq_keeps_its_position_before_the_lines_it_lost() {
    let (db, broker, worker) = started().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let (_dir, log, state) = log_files();
    let counted = |n: i64| counted(&db, n);

    let before = postfix_lines(0..3, "u", "a.test", true);
    append(&log, &before);
    let through_proxy = [
        ("AMQP_URL", format!("amqp://guest:guest@{}/%2f", proxy.addr)),
        ("PRODUCER_GIVE_UP_AFTER", "1s".to_string()),
    ];
    let tailer = Tailer::start_with(&broker, &log, &state, &through_proxy);
    counted(3).await;

    proxy.cut();
    let during = postfix_lines(10..14, "u", "b.test", true);
    append(&log, &during);
    let output = tokio::time::timeout(Duration::from_secs(30), tailer.child.wait_with_output())
        .await
        .expect("the tailer exits once it gives up on RabbitMQ")
        .expect("wait for the tailer");
    assert!(
        !output.status.success(),
        "the tailer exited with {}",
        output.status
    );
    // Its summary still says what was confirmed (it printed the error alone).
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("confirmed 3 events"), "{stdout}");
    assert!(stdout.contains("tail: "), "{stdout}");

    proxy.restore();
    a_new_tailer_counts_every_line_once(&db, &broker, worker, &log, &state, 7).await;
}

/// A tailer started again from the saved state: the log's `n` events are counted, and still
/// `n` once it and the worker stopped (a line published twice would count later).
async fn a_new_tailer_counts_every_line_once(
    db: &TestDb,
    broker: &TestBroker,
    worker: TestWorker,
    log: &Path,
    state: &Path,
    n: i64,
) {
    let tailer = Tailer::start(broker, log, state);
    counted(db, n).await;
    tailer.stop().await;
    worker.stop().await;
    assert_eq!(
        all_events(db).await,
        n,
        "counted once, also after both stopped"
    );
}

/// A stop while a chunk waits for a broker that is gone ends the tailer at once (exit 0, within
/// a confirm timeout), its position before that chunk, and the next run counts the chunk's
/// lines once. It waited for `--give-up-after` (120 s here), then exited 1: a supervisor's
/// grace period killed it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_broker_is_gone_ends_the_tailer_and_loses_nothing() {
    let (db, broker, worker) = started().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let (_dir, log, state) = log_files();
    let counted = |n: i64| counted(&db, n);

    append(&log, &postfix_lines(0..3, "u", "a.test", true));
    let through_proxy = [
        ("AMQP_URL", format!("amqp://guest:guest@{}/%2f", proxy.addr)),
        ("PRODUCER_GIVE_UP_AFTER", "120s".to_string()),
        ("PRODUCER_CONFIRM_TIMEOUT", "3s".to_string()),
    ];
    let tailer = Tailer::start_with(&broker, &log, &state, &through_proxy);
    counted(3).await;

    proxy.cut();
    let refused = proxy.refused();
    append(&log, &postfix_lines(10..14, "u", "b.test", true));
    // The tailer read the new lines and tries to reach the broker again.
    wait_for(
        Duration::from_secs(30),
        "the tailer to try the broker again",
        || async { (proxy.refused() > refused).then_some(()) },
    )
    .await;
    tailer.stop().await;

    proxy.restore();
    a_new_tailer_counts_every_line_once(&db, &broker, worker, &log, &state, 7).await;
}
