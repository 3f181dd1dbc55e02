//! What `make bench` measures with (issue 13): the CPU time of every process that does the work,
//! read from `/proc` over each timed window, and statistics over interleaved repeats.
//!
//! CPU-µs per event drifts far less than wall-clock rates on a shared machine: another process
//! taking a core slows a stage down but does not make its events cost more CPU.

use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the sampler reads `/proc` during a window (processes that exit between two reads
/// lose at most this much of their CPU time).
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The processes of the main services, found by the TCP port they listen on (several brokers
/// and Postgres clusters may run on this machine: the TLS, cluster and replica tests' own).
#[derive(Clone, Debug)]
pub struct Services {
    /// beam.smp of the RabbitMQ listening on 5672.
    pub broker: Option<i32>,
    /// The postmaster listening on 5432; its children are the backends and server processes.
    pub postmaster: Option<i32>,
}

impl Services {
    /// Both processes, or an error: without them every CPU-derived figure (the single-message
    /// limit, `dedup_overhead`, CPU-µs per event) would silently leave out their CPU.
    pub fn find() -> anyhow::Result<Self> {
        let services = Self {
            broker: pid_listening_on(5672),
            postmaster: pid_listening_on(5432),
        };
        if services.broker.is_none() || services.postmaster.is_none() {
            anyhow::bail!(
                "bench: CPU sampling cannot find the process listening on {} (needs to read \
                 /proc/<pid>/fd of the services: run as their user or root, with RabbitMQ on \
                 5672 and Postgres on 5432 running); without it the CPU-derived figures would \
                 be wrong",
                match (services.broker, services.postmaster) {
                    (None, None) => "5672 (RabbitMQ) and 5432 (Postgres)",
                    (None, _) => "5672 (RabbitMQ)",
                    _ => "5432 (Postgres)",
                }
            );
        }
        Ok(services)
    }
}

/// Inodes of the sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Ok(inode) = fields[9].parse()
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The lowest pid holding a socket that listens on `port`.
fn pid_listening_on(port: u16) -> Option<i32> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    let mut pids = pids();
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .any(|target| {
                    target
                        .to_str()
                        .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']'))
                        .and_then(|inode| inode.parse::<u64>().ok())
                        .is_some_and(|inode| inodes.contains(&inode))
                })
        })
    })
}

/// (ppid, utime + stime in clock ticks) of a process.
fn stat(pid: i32) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces and parentheses: the fields start after the last ')'.
    let rest: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Busy and total jiffies of the whole machine (`/proc/stat`, all CPUs).
fn machine() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle + iowait
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

pub fn cores() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64
}

/// Which processes a window charges, and under which name.
#[derive(Clone, Default)]
pub struct Watch {
    /// The worker when it runs as a child process (in-process, it is part of `bench`).
    pub worker: Option<i32>,
    /// A producer process, when one publishes.
    pub producer: Option<i32>,
    /// Postgres backends whose process title names one of these databases are the stage's own;
    /// other clients' backends (other tests on this machine) are not counted at all.
    pub databases: Vec<String>,
}

struct Tracked {
    group: &'static str,
    first: u64,
    last: u64,
}

/// A window being sampled; [`Sampler::stop`] ends it.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    tracked: Arc<Mutex<HashMap<i32, Tracked>>>,
    machine: (u64, u64),
}

/// The CPU time of every tracked process at one moment of a window ([`Sampler::mark`]), to
/// measure the rest of the window apart ([`Sampler::stop_since`]).
pub struct Mark {
    ticks: HashMap<i32, u64>,
    machine: (u64, u64),
}

/// CPU time per process group over one window.
#[derive(Clone, Debug, Default)]
pub struct CpuWindow {
    /// CPU-µs per group: `rabbitmq`, `postgres_backends`, `postgres_server`, `worker`,
    /// `bench` (the bench process: publishers, pollers, the no-op consumer, an in-process
    /// worker), `producer`.
    pub cpu_us: BTreeMap<String, f64>,
    /// Cores the whole machine kept busy on average (other helpers' work included).
    pub machine_busy_cores: f64,
}

impl Sampler {
    pub fn start(services: &Services, watch: Watch) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let services = services.clone();
        let machine_before = machine();
        let shared: Arc<Mutex<HashMap<i32, Tracked>>> = Arc::default();
        let table = shared.clone();
        let thread = std::thread::spawn(move || {
            let own = std::process::id() as i32;
            // Pids seen and not ours (other clients' backends), so they are not re-read.
            let mut ignored: HashSet<i32> = HashSet::new();
            let mut first_pass = true;
            loop {
                let done = flag.load(Ordering::Relaxed);
                for pid in pids() {
                    if ignored.contains(&pid) {
                        continue;
                    }
                    let Some((ppid, ticks)) = stat(pid) else {
                        continue;
                    };
                    let mut tracked = table.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(t) = tracked.get_mut(&pid) {
                        t.last = ticks;
                        continue;
                    }
                    let group = if pid == own {
                        Some("bench")
                    } else if Some(pid) == watch.worker {
                        Some("worker")
                    } else if Some(pid) == watch.producer {
                        Some("producer")
                    } else if Some(pid) == services.broker {
                        Some("rabbitmq")
                    } else if Some(pid) == services.postmaster {
                        Some("postgres_server")
                    } else if services.postmaster.is_some() && Some(ppid) == services.postmaster {
                        let title = cmdline(pid);
                        if !title.starts_with("postgres:") {
                            // Just forked: the title is still the postmaster's command line.
                            // Classify it on a later pass, when it says whose it is.
                            continue;
                        }
                        if watch.databases.iter().any(|db| title.contains(db.as_str())) {
                            Some("postgres_backends")
                        } else if title.contains('(')
                            || title.contains("[local]")
                            || title.contains("autovacuum worker")
                        {
                            // Another client's backend.
                            None
                        } else {
                            Some("postgres_server")
                        }
                    } else {
                        None
                    };
                    match group {
                        Some(group) => {
                            // A process born during the window spent all its CPU inside it.
                            let first = if first_pass { ticks } else { 0 };
                            tracked.insert(
                                pid,
                                Tracked {
                                    group,
                                    first,
                                    last: ticks,
                                },
                            );
                        }
                        None => {
                            ignored.insert(pid);
                        }
                    }
                }
                first_pass = false;
                if done {
                    return;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Self {
            stop,
            thread: Some(thread),
            tracked: shared,
            machine: machine_before,
        }
    }

    /// The CPU time of every process tracked so far, read now: [`Sampler::stop_since`] measures
    /// from here. A process first tracked later is charged its whole life (it was born after
    /// the mark, or too shortly before it to be classified: a backend still titled as the
    /// postmaster).
    pub fn mark(&self) -> Mark {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        let ticks = tracked
            .iter_mut()
            .map(|(pid, t)| {
                if let Some((_, ticks)) = stat(*pid) {
                    t.last = ticks;
                }
                (*pid, t.last)
            })
            .collect();
        Mark {
            ticks,
            machine: machine(),
        }
    }

    pub fn stop(self) -> CpuWindow {
        let start = Mark {
            ticks: HashMap::new(),
            machine: self.machine,
        };
        self.stop_since(&start)
    }

    /// Ends the window and measures it from `mark` on.
    pub fn stop_since(mut self, mark: &Mark) -> CpuWindow {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let tracked = std::mem::take(&mut *self.tracked.lock().unwrap_or_else(|e| e.into_inner()));
        let (busy, total) = machine();
        let busy_share = (busy.saturating_sub(mark.machine.0)) as f64
            / (total.saturating_sub(mark.machine.1)).max(1) as f64;
        let us_per_tick = 1e6 / clock_ticks();
        let mut cpu_us = BTreeMap::new();
        for (pid, t) in &tracked {
            let first = mark.ticks.get(pid).copied().unwrap_or(t.first);
            *cpu_us.entry(t.group.to_string()).or_insert(0.0) +=
                t.last.saturating_sub(first) as f64 * us_per_tick;
        }
        CpuWindow {
            cpu_us,
            machine_busy_cores: busy_share * cores(),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl CpuWindow {
    /// The window's CPU times `factor` (busy cores unchanged): a part of a stage's events
    /// taken for all of them.
    pub fn scaled(mut self, factor: f64) -> Self {
        for value in self.cpu_us.values_mut() {
            *value *= factor;
        }
        self
    }

    /// CPU-µs per event of each group, and `total`.
    pub fn per_event(&self, events: f64) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = self
            .cpu_us
            .iter()
            .map(|(k, v)| (k.clone(), v / events))
            .collect();
        out.insert("total".into(), self.cpu_us.values().sum::<f64>() / events);
        out
    }

    /// CPU-µs per event of the Postgres processes alone.
    pub fn postgres_per_event(&self, events: f64) -> f64 {
        ["postgres_backends", "postgres_server"]
            .iter()
            .filter_map(|g| self.cpu_us.get(*g))
            .sum::<f64>()
            / events
    }

    pub fn total_per_event(&self, events: f64) -> f64 {
        self.cpu_us.values().sum::<f64>() / events
    }

    /// CPU-µs per event of every group but the broker: what applying events in Postgres costs
    /// (the floors send nothing through RabbitMQ, whose own upkeep would only add noise).
    pub fn without_broker_per_event(&self, events: f64) -> f64 {
        self.cpu_us
            .iter()
            .filter(|(group, _)| group.as_str() != "rabbitmq")
            .map(|(_, us)| us)
            .sum::<f64>()
            / events
    }
}

/// Median and spread of repeated runs.
#[derive(Clone, Debug)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p25: f64,
    pub p75: f64,
    pub runs: Vec<f64>,
}

impl Summary {
    pub fn of(runs: &[f64]) -> Self {
        let mut sorted = runs.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| quantile(&sorted, q);
        Self {
            median: at(0.5),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            p25: at(0.25),
            p75: at(0.75),
            runs: runs.to_vec(),
        }
    }

    pub fn json(&self, digits: i32) -> Value {
        let r = |x: f64| {
            let f = 10f64.powi(digits);
            (x * f).round() / f
        };
        json!({
            "median": r(self.median),
            "min": r(self.min),
            "max": r(self.max),
            "iqr": [r(self.p25), r(self.p75)],
            "runs": self.runs.iter().map(|x| r(*x)).collect::<Vec<_>>(),
        })
    }
}

/// Linear-interpolated quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q * (n - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// Median per group of several windows' CPU-µs per event.
pub fn median_per_event(windows: &[(CpuWindow, f64)]) -> BTreeMap<String, f64> {
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (window, events) in windows {
        for (group, us) in window.per_event(*events) {
            groups.entry(group).or_default().push(us);
        }
    }
    groups
        .into_iter()
        .map(|(g, v)| (g, (Summary::of(&v).median * 100.0).round() / 100.0))
        .collect()
}

/// Polls `GET {base}/readyz` until it answers 2xx; an error naming `what` after `timeout`.
pub async fn wait_ready(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let ready_by = std::time::Instant::now() + timeout;
    while !http
        .get(format!("{base}/readyz"))
        .timeout(crate::HTTP_TIMEOUT)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if std::time::Instant::now() > ready_by {
            anyhow::bail!("{what}: the worker was not ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
