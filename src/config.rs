//! Configuration (SPEC §6): every setting is a flag with an environment variable beside it.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::time::Duration;

/// The worker's command line.
#[derive(Debug, Parser)]
#[command(
    name = "catchall",
    version,
    about = "Learns which email domains are catch-all from \
delivered/bounced events on RabbitMQ, and serves their status over HTTP.",
    after_help = "From the environment only, as their ecosystems read them: RUST_LOG (log levels, \
default info; one that does not parse is a usage error) and OTEL_EXPORTER_OTLP_ENDPOINT with the \
other standard OTEL_* variables (traces over OTLP/HTTP; unset, none)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations and exit (the worker also applies them at start).
    Migrate,
    /// Ask the worker listening on ADMIN_ADDR when set, else HTTP_ADDR, whether it is healthy:
    /// exit 0 on a 2xx answer, 1 otherwise (a container HEALTHCHECK without curl).
    Healthcheck(HealthcheckArgs),
    /// Write the domains of one status as CSV (domain,delivered,bounced,status) and exit.
    Export(crate::export::ExportArgs),
}

/// What `catchall healthcheck` asks.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// Path to GET: `/healthz` (the process runs) or `/readyz` (it consumes and Postgres answers).
    #[arg(long, default_value = "/healthz")]
    pub path: String,
    /// How long the whole check may take.
    #[arg(long, default_value = "3s", value_parser = timeout)]
    pub timeout: Duration,
}

/// The broker and the topology (SPEC §3); shared with the producer, which declares the same
/// topology so that events published before any worker starts are kept. Global: the flags go
/// before or after a subcommand (`catchall-producer generate --exchange x`).
#[derive(Clone, Args)]
pub struct AmqpArgs {
    /// RabbitMQ URL; several nodes of one cluster separated by commas, tried in turn at every
    /// (re)connection. `amqps://` is TLS, with RabbitMQ's `cacertfile`, `certfile`, `keyfile`,
    /// `server_name_indication` and `auth_mechanism=external`; the server certificate is always
    /// verified. `heartbeat=` defaults to 10 s. Its password is never logged.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Topic exchange events are published to. Its dead-letter exchange is `<exchange>.dlx`.
    #[arg(
        long = "exchange",
        global = true,
        visible_alias = "catchall-exchange",
        env = "CATCHALL_EXCHANGE",
        default_value = "catchall.events",
        value_parser = broker_name
    )]
    pub exchange: String,

    /// Durable quorum queue the workers share. Rejected messages go to `<queue>.dead`.
    #[arg(
        long = "queue",
        global = true,
        visible_alias = "catchall-queue",
        env = "CATCHALL_QUEUE",
        default_value = "catchall.events",
        value_parser = broker_name
    )]
    pub queue: String,

    /// Deliveries after which the quorum queue dead-letters a message that keeps failing (at
    /// least 1: with 0 a message returned once, by a restart, was dead-lettered).
    #[arg(
        long,
        global = true,
        env = "DELIVERY_LIMIT",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX))
    )]
    pub delivery_limit: u32,
}

/// Every setting of the worker.
#[derive(Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub amqp: AmqpArgs,

    /// Postgres URL (or libpq `key=value` string), with libpq's TLS parameters: `sslmode`
    /// (disable, allow, prefer, require, verify-ca, verify-full), `sslrootcert`, `sslcert`,
    /// `sslkey`. Its password is never logged.
    // Global, like the others `migrate`, `export` and `healthcheck` read: after a subcommand
    // (`catchall migrate --database-url …`) it was "unexpected argument".
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/catchall",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Postgres that status look-ups, bulk look-ups and listings read from (a streaming replica);
    /// unset, they read from DATABASE_URL. Writes and the consumer's readiness stay on
    /// DATABASE_URL. Takes libpq's TLS parameters too. Its password is never logged.
    #[arg(long, env = "STATUS_DATABASE_URL", hide_env_values = true)]
    pub status_database_url: Option<String>,

    /// With STATUS_DATABASE_URL: while the replica is further behind than this (or does not
    /// answer), look-ups and listings read from DATABASE_URL instead, so they never answer from
    /// a replica cut off from its primary.
    #[arg(long, env = "MAX_REPLICA_LAG", default_value = "30s", value_parser = timeout)]
    pub max_replica_lag: Duration,

    /// Address of the HTTP server (status, health, metrics). Port 0 picks a free port.
    #[arg(
        long,
        global = true,
        env = "HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,

    /// A second address that serves only /healthz, /readyz, /readyz/lookups and /metrics, out
    /// of reach of HTTP_ADDR's connection cap (for probes and scrapes). Unset: none; they are
    /// served on HTTP_ADDR only.
    #[arg(long, global = true, env = "ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// A domain with no bounce and strictly more deliveries than this is catch-all.
    #[arg(
        long = "threshold",
        global = true,
        visible_alias = "catchall-threshold",
        env = "CATCHALL_THRESHOLD",
        default_value_t = 1000,
        // Negative, a domain never seen (0 deliveries) would be catch-all, not unknown.
        value_parser = clap::value_parser!(i64).range(0..)
    )]
    pub threshold: i64,

    /// Events applied in one database transaction: a batch closes once it holds this many (a
    /// message is never split, so a batch of 100-event messages closes at the first multiple
    /// of 100 at or above it).
    #[arg(long, env = "BATCH_SIZE", default_value_t = 2500, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,

    /// How long a batch waits to fill after its first message, in milliseconds; at most a
    /// minute. Its messages are unacked meanwhile, and RabbitMQ closes the channel of a consumer
    /// that holds one unacked past `consumer_timeout` (30 min by default): with a day allowed, a
    /// quiet queue's first message would come back at each close, counted against
    /// DELIVERY_LIMIT each time, until it was dead-lettered.
    #[arg(long, env = "BATCH_TIMEOUT_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub batch_timeout_ms: u64,

    /// Unacknowledged messages the broker may hand this worker; at least the batch size. The
    /// default holds the batches in flight (IN_FLIGHT × BATCH_SIZE) and two more filling
    /// behind them, so a freed slot finds its next batch ready (README "Performance"). The
    /// bodies held are bounded by PREFETCH_BYTES (the prefetch reaches PREFETCH only once the
    /// bodies are seen to be small, and the connection stops reading at the budget).
    #[arg(long, env = "PREFETCH", default_value_t = 10000, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Batches committing at once (each on its own connection) while the next one gathers.
    #[arg(long, env = "IN_FLIGHT", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub in_flight: u32,

    /// Postgres connections for status look-ups and health checks (batch commits have a small
    /// pool of their own, so look-ups cannot starve them).
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,

    /// How long applied message ids are remembered for deduplication (e.g. `7d`, `12h`).
    #[arg(long, env = "DEDUP_RETENTION", default_value = "7d", value_parser = retention)]
    pub dedup_retention: Duration,

    /// How close to UTC midnight (a bound of the applied ids' partitions) a claim writes its ids
    /// on both sides of it. Keep the default: it must outlast a batch transaction (at least
    /// DB_TIMEOUT), or two attempts of one id on either side of midnight both count. 0 (tests
    /// only, warned at start) turns it off; 13h at most (benches, to take the path at any hour).
    #[arg(long, env = "CLAIM_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub claim_window: Duration,

    /// How long a stop (SIGTERM/SIGINT) may take to commit and ack what is in flight.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = shutdown_timeout)]
    pub shutdown_timeout: Duration,

    /// ESP webhooks (issue 11): each route is off until its setting is set.
    #[command(flatten)]
    pub webhooks: crate::webhooks::WebhookArgs,

    /// Bytes of message bodies this worker may hold unacknowledged (e.g. `64MiB`): the consumer's
    /// connection stops reading the socket while that many are held, and the prefetch starts at
    /// PREFETCH_BYTES / 1 MiB, so memory stays bounded whatever the sizes and however long
    /// Postgres is down (SPEC §4).
    #[arg(long, env = "PREFETCH_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub prefetch_bytes: u64,

    /// Client-side deadline of one attempt to apply a batch (e.g. `30s`): a Postgres that stops
    /// answering costs one deadline, then the batch is retried on a fresh connection.
    #[arg(long, env = "DB_TIMEOUT", default_value = "30s", value_parser = timeout)]
    pub db_timeout: Duration,

    /// Log format; by default `pretty` on a terminal and `json` otherwise. Levels come from RUST_LOG.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    // --- HTTP ingest, queries and the server's limits (SPEC §5) ---
    /// Bearer tokens that may use the ingest routes, comma-separated. Unset or empty: the ingest
    /// routes are off (404), never open. Never logged.
    #[arg(long, env = "INGEST_TOKENS", hide_env_values = true)]
    pub ingest_tokens: Option<Tokens>,

    /// Bearer tokens required for look-ups and listings, comma-separated. Unset or empty:
    /// look-ups are open (they are read-only). Never logged.
    #[arg(long, env = "QUERY_TOKENS", hide_env_values = true)]
    pub query_tokens: Option<Tokens>,

    /// How long a PUT without an Idempotency-Key waits for others to share its message, in ms.
    #[arg(long, env = "INGEST_PACK_WINDOW_MS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub ingest_pack_window_ms: u64,

    /// Most messages the ingest publisher (HTTP ingest and webhooks) has sent and RabbitMQ has not
    /// confirmed yet; past it, publishes are answered 503 at once. A broker that holds confirms
    /// back (a quorum queue without its majority) otherwise left one waiting confirm per
    /// request, for as long as clients retried.
    #[arg(long, env = "INGEST_MAX_UNCONFIRMED", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub ingest_max_unconfirmed: u32,

    /// Requests served at once; past it requests get 503 with Retry-After instead of queueing.
    #[arg(long, env = "HTTP_MAX_CONCURRENCY", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_concurrency: u32,

    /// Connections held open at once; past it new connections wait in the listen backlog
    /// until one closes (a client holding many connections cannot exhaust the worker).
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,

    /// Request bodies held at once (each up to 1 MiB); past it, requests with a body wait for
    /// room (within HTTP_REQUEST_TIMEOUT). At least 1MiB.
    #[arg(long, env = "HTTP_BODY_BUDGET", default_value = "32MiB", value_parser = parse_bytes)]
    pub http_body_budget: u64,

    /// Large answers (listings, bulk look-ups) held at once until they are sent: room for one
    /// is taken before it is read from Postgres, for at most a third of HTTP_REQUEST_TIMEOUT
    /// (then 503), and given back once the kernel has taken its last byte. At least 1MiB.
    #[arg(long, env = "HTTP_ANSWER_BUDGET", default_value = "32MiB", value_parser = parse_bytes)]
    pub http_answer_budget: u64,

    /// How long a request may take from its headers to its answer (slower ones get 408).
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT", default_value = "15s", value_parser = timeout)]
    pub http_request_timeout: Duration,

    /// How long a client may take to send a request's headers, or on a kept-alive connection to
    /// start its next request, before the connection is closed.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "5s", value_parser = timeout)]
    pub http_header_timeout: Duration,
}

/// A timeout (`30s`, `500ms`): more than 0 (every attempt, request or check would time out at
/// once) and at most a day (deadlines past that overflow the clock's arithmetic).
pub fn timeout(text: &str) -> Result<Duration, String> {
    duration_within(text, Duration::from_millis(1), DAY)
}

/// An exchange or queue name: not empty (an empty line in an env file declared RabbitMQ's default
/// exchange, or asked for a server-named queue, and the worker retried for ever), not `amq.`
/// (RabbitMQ's own), and at most 250 bytes, so `.dlx` and `.dead` still fit in 255.
pub fn broker_name(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if text.trim() != text {
        return Err("must not begin or end with white space (it would name another one)".into());
    }
    if text.starts_with("amq.") {
        return Err("names beginning with `amq.` are RabbitMQ's own".into());
    }
    if text.len() > 250 {
        return Err(format!("{} bytes; at most 250", text.len()));
    }
    Ok(text.to_string())
}

/// `SHUTDOWN_TIMEOUT`: at least 4 s, since a stop keeps up to 3 s for an attempt it abandons and
/// the broker's close, and at most a day.
pub fn shutdown_timeout(text: &str) -> Result<Duration, String> {
    duration_within(text, Duration::from_secs(4), DAY)
}

/// `DEDUP_RETENTION`: more than 0 and at most ten years.
pub fn retention(text: &str) -> Result<Duration, String> {
    duration_within(text, Duration::from_secs(1), 3650 * DAY)
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn duration_within(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration < min || duration > max {
        return Err(format!(
            "must be from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(duration)
}

/// A byte size: a number with an optional unit (`B`, `KiB`, `MiB`, `GiB`; `KB`, `MB`, `GB` are
/// read as the binary units too), e.g. `64MiB` or `1048576`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a byte size like 64MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown byte unit {other:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    match number.checked_mul(scale) {
        Some(0) | None => Err(format!("{text:?} must be between 1 byte and 2^64")),
        Some(bytes) => Ok(bytes),
    }
}

/// Debug shows the URL without its password (a derived Debug showed it, so one `?config` in
/// a log line would have leaked it).
impl std::fmt::Debug for AmqpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpArgs")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("exchange", &self.exchange)
            .field("queue", &self.queue)
            .field("delivery_limit", &self.delivery_limit)
            .finish()
    }
}

/// Debug shows where the worker connects, without passwords, and no other setting.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("amqp", &self.amqp)
            .field("database_url", &redact_url(&self.database_url))
            .field(
                "status_database_url",
                &self.status_database_url.as_deref().map(redact_url),
            )
            .field("http_addr", &self.http_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl AmqpArgs {
    /// The exchanges and queues these settings name.
    pub fn topology(&self) -> crate::amqp::Topology {
        crate::amqp::Topology::new(&self.exchange, &self.queue, self.delivery_limit)
    }
}

/// Bearer tokens from a comma-separated list. Debug never shows them; cheap to clone (the HTTP
/// state is cloned per request).
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens(std::sync::Arc<[String]>);

impl Tokens {
    /// True if `candidate` is one of the tokens, compared in constant time (per token). The
    /// SHA-256 digests are compared, not the strings: `ct_eq` of slices returns early when the
    /// lengths differ, which would leak a token's length.
    pub fn accepts(&self, candidate: &str) -> bool {
        use ring::digest::{SHA256, digest};
        use subtle::ConstantTimeEq;
        let candidate = digest(&SHA256, candidate.as_bytes());
        self.0.iter().fold(false, |found, token| {
            let token = digest(&SHA256, token.as_bytes());
            found | bool::from(token.as_ref().ct_eq(candidate.as_ref()))
        })
    }
}

impl Tokens {
    /// The tokens, or `None` for an empty list (`INGEST_TOKENS=` in an env file means unset).
    pub fn configured(tokens: &Option<Tokens>) -> Option<Tokens> {
        tokens.clone().filter(|t| !t.0.is_empty())
    }
}

impl Tokens {
    /// Why no request could use the list, naming the token by its place only. A header's value
    /// is read as visible ASCII, spaces and tabs (`HeaderValue::to_str`): a token with another
    /// character (`tökén`, a control character) could never match, and the route was on yet
    /// unusable. Checked by [`Config::validate`], not while parsing: clap's error for a value
    /// that does not parse quotes the value, and so printed every token of the list.
    fn unusable(&self) -> Option<String> {
        let position = self.0.iter().position(|t| {
            !t.bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t')
        })?;
        Some(format!(
            "token {} of the list has a character an Authorization header cannot carry \
             (only visible ASCII, spaces and tabs)",
            position + 1
        ))
    }
}

impl std::str::FromStr for Tokens {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let tokens: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        Ok(Self(tokens.into()))
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl Config {
    /// The configuration with every default and the given database, queue and exchange; for tests
    /// and benchmarks that run the worker in-process.
    pub fn with_names(database_url: &str, exchange: &str, queue: &str) -> Self {
        let mut config = Cli::parse_from(["catchall"]).config;
        config.database_url = database_url.to_string();
        config.amqp.exchange = exchange.to_string();
        config.amqp.queue = queue.to_string();
        config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config
    }

    pub fn batch_timeout(&self) -> Duration {
        Duration::from_millis(self.batch_timeout_ms)
    }

    /// Checks what clap cannot check alone.
    /// Checks `AMQP_URL` as a connection would read it, TLS files included (the worker only:
    /// `migrate` and `export` never connect to RabbitMQ).
    pub fn check_amqp_url(&self) -> Result<(), String> {
        crate::amqp::check_urls(&self.amqp.amqp_url)
            .map_err(|error| format!("{:#}", anyhow::Error::new(error)))
    }

    /// `STATUS_DATABASE_URL`, unless unset or empty (`STATUS_DATABASE_URL=` in an env file): as
    /// a replica URL an empty one named no host, and the worker was never ready.
    pub fn replica_url(&self) -> Option<&str> {
        self.status_database_url
            .as_deref()
            .filter(|url| !url.trim().is_empty())
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, tokens) in [
            ("INGEST_TOKENS", &self.ingest_tokens),
            ("QUERY_TOKENS", &self.query_tokens),
        ] {
            if let Some(why) = tokens.as_ref().and_then(Tokens::unusable) {
                return Err(format!("{name}: {why}"));
            }
        }
        if u32::from(self.prefetch) < self.batch_size {
            return Err(format!(
                "PREFETCH ({}) must be at least BATCH_SIZE ({}), or batches could never fill",
                self.prefetch, self.batch_size
            ));
        }
        // Only PUT /events waits in the pack window: with ingest off, it is never used.
        if Tokens::configured(&self.ingest_tokens).is_some()
            && Duration::from_millis(self.ingest_pack_window_ms) >= self.http_request_timeout
        {
            return Err(format!(
                "INGEST_PACK_WINDOW_MS ({} ms) must be shorter than HTTP_REQUEST_TIMEOUT ({}), \
                 or every PUT without an Idempotency-Key would time out while it waits to be packed",
                self.ingest_pack_window_ms,
                humantime::format_duration(self.http_request_timeout)
            ));
        }
        const TIB: u64 = 1 << 40;
        for (name, bytes) in [
            ("HTTP_BODY_BUDGET", self.http_body_budget),
            ("HTTP_ANSWER_BUDGET", self.http_answer_budget),
            ("PREFETCH_BYTES", self.prefetch_bytes),
        ] {
            if bytes > TIB {
                return Err(format!("{name} ({bytes} bytes) must be at most 1TiB"));
            }
        }
        if self.http_body_budget < crate::event::MAX_BODY_BYTES as u64 {
            return Err(format!(
                "HTTP_BODY_BUDGET ({} bytes) must be at least 1MiB, the largest body a request may have",
                self.http_body_budget
            ));
        }
        if self.http_answer_budget < 1 << 20 {
            return Err(format!(
                "HTTP_ANSWER_BUDGET ({} bytes) must be at least 1MiB",
                self.http_answer_budget
            ));
        }
        let webhooks = self.webhooks.clone().normalized();
        // SNS messages are refused past MAX_MESSAGE_AGE: their ids must be remembered as long.
        if !webhooks.sns_topic_arns.is_empty()
            && self.dedup_retention < crate::webhooks::sns::MAX_MESSAGE_AGE
        {
            return Err(format!(
                "DEDUP_RETENTION ({}) must be at least 2h with WEBHOOK_SNS_TOPIC_ARNS set: SNS \
                 messages up to 2 h old are accepted, and one replayed after its id was \
                 forgotten would count again",
                humantime::format_duration(self.dedup_retention)
            ));
        }
        if !self.claim_window.is_zero() && self.claim_window < self.db_timeout {
            return Err(format!(
                "CLAIM_WINDOW ({}) must be at least DB_TIMEOUT ({}), the longest a batch's \
                 transaction lasts: shorter, two attempts of one message on either side of UTC \
                 midnight could both count. Lower DB_TIMEOUT, or raise CLAIM_WINDOW (13h at most)",
                humantime::format_duration(self.claim_window),
                humantime::format_duration(self.db_timeout)
            ));
        }
        if self.claim_window > Duration::from_secs(13 * 3600) {
            return Err(format!(
                "CLAIM_WINDOW ({}) must be at most 13h (which runs the window's path at any \
                 hour): claims more than a day apart could wait for each other in two orders",
                humantime::format_duration(self.claim_window)
            ));
        }
        // Two listeners on one port: found once the worker had connected and migrated, the
        // second bind stopped it with exit 1 instead of a usage error.
        if let Some(admin) = self.admin_addr {
            let http = self.http_addr;
            // A wildcard takes the port of every address of its family, `[::]` of IPv4's too
            // (the listener does not set IPV6_V6ONLY).
            let covers = |wild: std::net::IpAddr, other: std::net::IpAddr| {
                wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
            };
            if admin.port() != 0
                && admin.port() == http.port()
                && (admin.ip() == http.ip()
                    || covers(admin.ip(), http.ip())
                    || covers(http.ip(), admin.ip()))
            {
                return Err(format!(
                    "ADMIN_ADDR ({admin}) and HTTP_ADDR ({http}) would listen on the same port"
                ));
            }
        }
        // Webhook settings no request could use: found once the worker had connected,
        // migrated and bound its ports, they stopped it with exit 1 instead of a usage error.
        if webhooks
            .postmark_auth
            .as_deref()
            .is_some_and(|auth| !auth.contains(':'))
        {
            return Err(
                "WEBHOOK_POSTMARK_AUTH must be USER:PASSWORD (basic auth always sends \
                        both, so a value without a colon matches no request)"
                    .to_string(),
            );
        }
        if let Some(arn) = webhooks
            .sns_topic_arns
            .iter()
            .find(|arn| !crate::webhooks::sns::is_topic_arn(arn))
        {
            return Err(format!(
                "WEBHOOK_SNS_TOPIC_ARNS: {arn:?} is not an SNS topic ARN \
                 (arn:aws:sns:REGION:ACCOUNT:TOPIC)"
            ));
        }
        if let Some(key) = &webhooks.sendgrid_public_key {
            crate::webhooks::sendgrid::check_key(key)
                .map_err(|error| format!("WEBHOOK_SENDGRID_PUBLIC_KEY: {error:#}"))?;
        }
        if let Some(path) = &webhooks.sns_cert {
            crate::webhooks::sns::pinned_cert(path)
                .map_err(|error| format!("WEBHOOK_SNS_CERT: {error:#}"))?;
        }
        Ok(())
    }
}

/// Exits as clap does on a bad flag: the message on stderr, status 2.
pub fn exit_usage(message: &str) -> ! {
    clap::Error::raw(
        clap::error::ErrorKind::ValueValidation,
        format!("{message}\n"),
    )
    .exit()
}

/// A URL with its password replaced by `***`, for logs. A comma-separated list of nodes
/// (`AMQP_URL` of a cluster) is redacted node by node; a node starts only at a comma followed
/// by a scheme (`,amqps://`), so a comma inside a password does not split it (split there, the
/// rest of the password was printed as a URL of its own: `<unparsable url>,horse:battery@db`).
pub fn redact_url(raw: &str) -> String {
    let nodes = split_urls(raw);
    if nodes.len() > 1 {
        return nodes
            .into_iter()
            .map(|node| redact_node(node.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_node(raw)
}

/// The URLs of a comma-separated list, untrimmed, blank ones left out. A URL starts only at a
/// comma followed by a scheme (`,amqps://`), and a comma followed by nothing more ends one: RFC
/// 3986 allows a comma unescaped in a password, never at the end of a URL.
pub fn split_urls(raw: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut from = 0;
    for (at, _) in raw.match_indices(',') {
        let after = &raw[at + 1..];
        if starts_with_scheme(after) || after.trim().is_empty() {
            urls.push(&raw[from..at]);
            from = at + 1;
        }
    }
    urls.push(&raw[from..]);
    urls.retain(|url| !url.trim().is_empty());
    urls
}

/// `scheme://…` (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`).
fn starts_with_scheme(text: &str) -> bool {
    let text = text.trim_start();
    text.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

/// One URL with its password replaced, by its text: everything between the user name and the
/// last `@` is hidden, and the value of every query key naming a password or secret
/// (`password`, `sslpassword`, …). By text, not by a URL parser: the `url` crate ends the
/// authority at the first `/`, `?` or `#`, so it read no password in `u:#Xk9p@db` (which
/// tokio-postgres connects with) and printed it whole.
fn redact_node(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://").map(|at| at + 3) else {
        return "<unparsable url>".to_string();
    };
    let (head, rest) = raw.split_at(scheme_end);
    let (credentials, tail) = match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            let hidden = if rest[..at].contains(':') { ":***" } else { "" };
            (format!("{user}{hidden}"), &rest[at..])
        }
        None => (String::new(), rest),
    };
    // The query's secret pairs, read from the first `?` of the whole URL, not of what follows
    // the last `@`: a path holding an `@` (a systemd unit's `/run/credentials/x@1.service/ca.pem`)
    // moved that split into the query, and a `password=` after it was printed.
    mask_secret_pairs(&format!("{head}{credentials}{tail}"))
}

/// `text` with the value of every `key=value` pair after its first `?` whose key is a secret
/// ([`is_secret_key`]) as `***`, up to the next `&` (where tokio-postgres ends a value: a `?`
/// inside it is the password's).
fn mask_secret_pairs(text: &str) -> String {
    let Some((before, query)) = text.split_once('?') else {
        return text.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{before}?{}", pairs.join("&"))
}

/// A query key whose value is a secret: libpq's `password` and `sslpassword`, and any other
/// key naming a password or a secret, also percent-encoded (`pass%77ord`, which tokio-postgres
/// decodes).
fn is_secret_key(key: &str) -> bool {
    let key = percent_encoding::percent_decode_str(key)
        .decode_utf8_lossy()
        .to_ascii_lowercase();
    key.contains("password") || key.contains("secret")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let config = Cli::try_parse_from(["catchall"]).unwrap().config;
        assert_eq!(
            config.amqp.amqp_url,
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            config.database_url,
            "postgres://postgres@127.0.0.1:5432/catchall"
        );
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.amqp.exchange, "catchall.events");
        assert_eq!(config.amqp.queue, "catchall.events");
        assert_eq!(config.threshold, 1000);
        assert_eq!(config.dedup_retention, Duration::from_secs(7 * 24 * 3600));
        // The setting's default is the store's own.
        assert_eq!(config.claim_window, crate::store::CLAIM_WINDOW);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.prefetch_bytes, 64 << 20);
        assert_eq!(config.db_timeout, Duration::from_secs(30));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("2 GiB"), Ok(2 << 30));
        assert!(parse_bytes("0").is_err() && parse_bytes("64 parsecs").is_err());
        assert!(config.validate().is_ok());
    }

    /// SPEC §6: every setting is a flag named like its environment variable
    /// (`WEBHOOK_SNS_CERT`: `--webhook-sns-cert`), as its long name or an alias.
    #[test]
    fn every_variable_is_also_a_flag_of_the_same_name() {
        use clap::CommandFactory;
        let command = Cli::command();
        let mut checked = 0;
        let subcommands = command
            .get_subcommands()
            .flat_map(|sub| sub.get_arguments());
        for arg in command.get_arguments().chain(subcommands) {
            let Some(env) = arg.get_env() else { continue };
            let name = env.to_string_lossy().to_lowercase().replace('_', "-");
            let long = arg.get_long().into_iter();
            let aliases = arg.get_all_aliases().unwrap_or_default().into_iter();
            assert!(
                long.chain(aliases).any(|flag| flag == name),
                "{env:?} has no flag --{name}"
            );
            checked += 1;
        }
        assert!(checked > 30, "only {checked} settings read a variable");
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            vec!["catchall", "--batch-size", "0"],
            vec!["catchall", "--threshold", "many"],
            vec!["catchall", "--threshold=-1"],
            vec!["catchall", "--dedup-retention", "forever"],
            vec!["catchall", "--http-addr", "nowhere"],
            vec!["catchall", "--log-format", "xml"],
            vec!["catchall", "--no-such-flag"],
            // Zero timeouts timed out every attempt; huge ones overflowed deadlines (panics).
            vec!["catchall", "--db-timeout", "0s"],
            vec!["catchall", "--db-timeout", "10000000000000000000s"],
            vec!["catchall", "--shutdown-timeout", "0s"],
            vec!["catchall", "--shutdown-timeout", "3s"],
            vec!["catchall", "--http-request-timeout", "0s"],
            vec!["catchall", "--http-header-timeout", "400000000000d"],
            vec!["catchall", "--dedup-retention", "0s"],
            vec!["catchall", "--dedup-retention", "99999999999d"],
            vec!["catchall", "--batch-timeout-ms", "18446744073709551615"],
            // Past RabbitMQ's consumer_timeout a batch's first message would come back at each
            // close of the channel, until the delivery limit dead-lettered it.
            vec!["catchall", "--batch-timeout-ms", "3600000"],
            vec!["catchall", "healthcheck", "--timeout", "0s"],
            // An empty name declared RabbitMQ's default exchange or a server-named queue; a
            // delivery limit of 0 dead-lettered a message returned once.
            vec!["catchall", "--queue", ""],
            vec!["catchall", "--exchange", " "],
            vec!["catchall", "--exchange", "amq.topic"],
            vec!["catchall", "--delivery-limit", "0"],
            vec!["catchall", "--delivery-limit", "4294967295"],
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let long = "q".repeat(251);
        assert!(Cli::try_parse_from(["catchall", "--queue", long.as_str()]).is_err());
        assert!(Cli::try_parse_from(["catchall", "--queue", "catchall.events "]).is_err());
        // The limits themselves are accepted.
        let longest = "q".repeat(250);
        let config = Cli::try_parse_from([
            "catchall",
            "--queue",
            longest.as_str(),
            "--delivery-limit",
            "2147483647",
        ])
        .unwrap()
        .config;
        assert_eq!(
            (config.amqp.queue.len(), config.amqp.delivery_limit),
            (250, 2147483647)
        );
        // An empty replica URL (an env file's `STATUS_DATABASE_URL=`) is no replica.
        let config = Cli::try_parse_from(["catchall", "--status-database-url", " "])
            .unwrap()
            .config;
        assert_eq!(config.replica_url(), None);
        let refused = |args: &[&str]| {
            Cli::try_parse_from(args)
                .unwrap()
                .config
                .validate()
                .unwrap_err()
        };
        let bad_amqp = |url: &str| {
            Cli::try_parse_from(["catchall", "--amqp-url", url])
                .unwrap()
                .config
                .check_amqp_url()
                .unwrap_err()
        };
        // An AMQP_URL no connection could use was retried for ever as if the broker were down.
        for (url, says) in [
            ("amqps://h/%2f?verify=verify_none", "verify=verify_none"),
            (
                "amqp://h/%2f?cacertfile=/ca.pem",
                "cacertfile needs an amqps",
            ),
            (
                "amqps://h/%2f?certfile=/c.pem",
                "certfile and keyfile go together",
            ),
            (
                "amqps://h/%2f?cacertfile=/no/such/ca.pem",
                "TLS settings of h:5671",
            ),
            ("amqp://h:port/%2f", "invalid AMQP_URL (node 1)"),
            // Logging in by certificate without one, or over plain AMQP: never logs in.
            (
                "amqps://h/%2f?auth_mechanism=external",
                "auth_mechanism=external",
            ),
            (
                "amqp://h/%2f?auth_mechanism=external",
                "auth_mechanism=external",
            ),
            ("amqp://h/%2f,amqp://", "invalid AMQP_URL (node 2)"),
        ] {
            let error = bad_amqp(url);
            assert!(error.contains(says), "{url}: {error}");
        }
        // Webhook settings that cannot work, before anything connects.
        let error = refused(&["catchall", "--sendgrid-public-key", "not-a-key"]);
        assert!(error.contains("WEBHOOK_SENDGRID_PUBLIC_KEY"), "{error}");
        let error = refused(&["catchall", "--sns-cert", "/no/such/sns.pem"]);
        assert!(error.contains("/no/such/sns.pem"), "{error}");
        let error = refused(&["catchall", "--prefetch-bytes", "2048GiB"]);
        assert!(error.contains("PREFETCH_BYTES"), "{error}");
        let error = refused(&["catchall", "--http-body-budget", "2048GiB"]);
        assert!(error.contains("HTTP_BODY_BUDGET"), "{error}");
        let error = refused(&["catchall", "--claim-window", "10s"]);
        assert!(error.contains("at least DB_TIMEOUT"), "{error}");
        let error = refused(&[
            "catchall",
            "--sns-topic-arns",
            "arn:aws:sns:us-east-1:1:t",
            "--dedup-retention",
            "1h",
        ]);
        assert!(error.contains("at least 2h"), "{error}");
        let config = Cli::try_parse_from(["catchall", "--batch-size", "600", "--prefetch", "500"])
            .unwrap()
            .config;
        assert!(config.validate().unwrap_err().contains("PREFETCH"));
        let window = |w: &str| {
            Cli::try_parse_from(["catchall", "--claim-window", w])
                .unwrap()
                .config
                .validate()
        };
        assert!(window("13h").is_ok() && window("0s").is_ok());
        assert!(window("14h").unwrap_err().contains("CLAIM_WINDOW"));
        let pack = |window: &str, timeout: &str| {
            Cli::try_parse_from([
                "catchall",
                "--ingest-tokens",
                "t",
                "--ingest-pack-window-ms",
                window,
                "--http-request-timeout",
                timeout,
            ])
            .unwrap()
            .config
            .validate()
        };
        assert!(pack("2", "15s").is_ok() && pack("14999", "15s").is_ok());
        let budget = Cli::try_parse_from(["catchall", "--http-body-budget", "1000"]);
        let refused = budget.unwrap().config.validate().unwrap_err();
        assert!(refused.contains("HTTP_BODY_BUDGET"), "{refused}");
        // Without ingest the window is never used, so it is not checked.
        let no_ingest = Cli::try_parse_from(["catchall", "--http-request-timeout", "1ms"]);
        assert!(no_ingest.unwrap().config.validate().is_ok());
        assert!(
            pack("15000", "15s")
                .unwrap_err()
                .contains("INGEST_PACK_WINDOW_MS")
        );
        assert!(
            pack("3000", "2s")
                .unwrap_err()
                .contains("HTTP_REQUEST_TIMEOUT")
        );
    }

    #[test]
    fn tokens_parse_compare_and_hide() {
        let tokens: Tokens = " alpha, beta ,,".parse().unwrap();
        assert!(tokens.accepts("alpha") && tokens.accepts("beta"));
        assert!(!tokens.accepts("alph") && !tokens.accepts("") && !tokens.accepts("alpha "));
        assert!(!format!("{tokens:?}").contains("alpha"));
        let empty: Tokens = " , ".parse().unwrap();
        assert!(!empty.accepts("") && !empty.accepts(","));
        assert_eq!(Tokens::configured(&Some(empty)), None);
        assert_eq!(Tokens::configured(&Some(tokens.clone())), Some(tokens));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://user:s3cret@host:5672/%2f"),
            "amqp://user:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/catchall"),
            "postgres://postgres@127.0.0.1/catchall"
        );
        assert!(!redact_url("postgres://u:pw@h/db").contains("pw"));
        assert_eq!(
            redact_url("amqp://u:s1@a:5672/%2f,amqp://u:s2@b:5672/%2f"),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
        );
        // A comma in a password does not split the URL (the rest of the password was printed).
        for url in [
            "postgres://catchall:Tr0ub4dor,horse:battery@db:5432/catchall",
            "amqp://u:a,amqp:b@h/%2f",
            "postgres://u:Tr0ub4dor,horse:battery@h1:5432,h2:5432/db",
        ] {
            let redacted = redact_url(url);
            assert!(
                !redacted.contains("battery")
                    && !redacted.contains("horse")
                    && !redacted.contains(":b@"),
                "{redacted}"
            );
        }
        assert_eq!(
            redact_url("postgres://u:pw@h1:5432,h2:5432/db"),
            "postgres://u:***@h1:5432,h2:5432/db"
        );
        // A path with an `@` before the password pair (a systemd credentials directory).
        let url = "postgres://u@db/c?sslrootcert=/run/credentials/catchall@1.service/ca.pem&password=hunter2";
        let redacted = redact_url(url);
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert!(redacted.ends_with("ca.pem&password=***"), "{redacted}");
        // The same with a `?` in the password (tokio-postgres ends a value at `&` only), and a
        // percent-encoded key (which tokio-postgres decodes).
        for (url, secret) in [
            (
                "postgres://u@db/c?sslrootcert=/run/x@1.service/ca.pem&password=ab?cd",
                "cd",
            ),
            ("postgres://u@db/c?pass%77ord=hunter2", "hunter2"),
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains(secret), "{redacted}");
        }
        // A password in the query of a URL with several hosts is not printed either.
        assert_eq!(
            redact_url("postgres://catchall@h1:5432,h2:5432/catchall?password=s3cret"),
            "postgres://catchall@h1:5432,h2:5432/catchall?password=***"
        );
        // Passwords the url crate reads as no userinfo (a `#`, `/` or `?` in them), libpq's
        // `sslpassword`, and a URL without `//`: none is printed.
        for (url, secret) in [
            ("postgres://catchall:#Xk9p@db/catchall", "Xk9p"),
            ("amqp://u:#Xk9p@rmq/%2f", "Xk9p"),
            (
                "postgres://catchall:Zq?9vT@db/catchall?sslmode=require",
                "9vT",
            ),
            ("postgres://catchall:a/b@db/catchall", "a/b"),
            (
                "postgres://c@db/c?sslmode=verify-full&sslkey=/k.pem&sslpassword=KeyPass1",
                "KeyPass1",
            ),
            ("amqp:u:p4ss@h", "p4ss"),
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains(secret), "{url} → {redacted}");
        }
        assert_eq!(
            redact_url("postgres://catchall:#Xk9p@db:5432/catchall?sslmode=require"),
            "postgres://catchall:***@db:5432/catchall?sslmode=require"
        );
        let query = redact_url("postgres://u@h/db?sslmode=disable&password=hunter2");
        assert!(
            !query.contains("hunter2") && query.contains("sslmode=disable"),
            "{query}"
        );
    }

    /// Settings no request could use are usage errors at start, and the webhooks' lists and
    /// secrets are trimmed. Before: a topic after `, ` refused every notification from it
    /// (401), Postmark credentials without a colon and a token no header can carry were
    /// accepted and matched nothing, and two listeners on one port failed after the start.
    #[test]
    fn settings_no_request_could_use_are_refused_and_lists_are_trimmed() {
        let config = |args: &[&str]| {
            let mut all = vec!["catchall"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().config
        };
        let webhooks = config(&[
            "--sns-topic-arns",
            "arn:aws:sns:us-east-1:1:a, arn:aws:sns:us-east-1:1:b ,",
            "--mailgun-signing-key",
            "key-1\n",
            "--postmark-auth",
            " user:pass\n",
        ])
        .webhooks
        .normalized();
        assert_eq!(
            webhooks.sns_topic_arns,
            ["arn:aws:sns:us-east-1:1:a", "arn:aws:sns:us-east-1:1:b"]
        );
        assert_eq!(webhooks.mailgun_signing_key.as_deref(), Some("key-1"));
        assert_eq!(webhooks.postmark_auth.as_deref(), Some("user:pass"));

        for (args, says) in [
            (vec!["--postmark-auth", "s3cret"], "USER:PASSWORD"),
            (vec!["--sns-topic-arns", "my-topic"], "not an SNS topic ARN"),
            (
                vec!["--sns-topic-arns", "arn:aws:sqs:us-east-1:1:q"],
                "not an SNS topic ARN",
            ),
            (
                vec![
                    "--http-addr",
                    "127.0.0.1:9000",
                    "--admin-addr",
                    "127.0.0.1:9000",
                ],
                "same port",
            ),
            (
                vec![
                    "--http-addr",
                    "0.0.0.0:9000",
                    "--admin-addr",
                    "127.0.0.1:9000",
                ],
                "same port",
            ),
            (
                vec!["--http-addr", "127.0.0.1:9000", "--admin-addr", "[::]:9000"],
                "same port",
            ),
        ] {
            let error = config(&args).validate().unwrap_err();
            assert!(error.contains(says), "{args:?}: {error}");
        }
        for args in [
            vec!["--http-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"],
            // An IPv4 wildcard leaves IPv6 loopback's port free.
            vec!["--http-addr", "0.0.0.0:9000", "--admin-addr", "[::1]:9000"],
            // A header carries spaces and tabs: such a token matched, and still does.
            vec!["--ingest-tokens", "a b,c\td"],
            vec![
                "--http-addr",
                "127.0.0.1:9000",
                "--admin-addr",
                "127.0.0.2:9000",
            ],
            vec![
                "--postmark-auth",
                "user:pa:ss",
                "--sns-topic-arns",
                "arn:aws-cn:sns:cn-north-1:1:t",
            ],
        ] {
            assert_eq!(config(&args).validate(), Ok(()), "{args:?}");
        }
        // Refused at start (exit 2), naming the setting and the token's place, never a token:
        // clap's error quoted the whole list, the good tokens with it.
        for tokens in [
            "prod-s3cret,tökén",
            "prod-s3cret,ctl\u{1}x",
            "prod-s3cret,nul\u{0}",
        ] {
            for (flag, name) in [
                ("--ingest-tokens", "INGEST_TOKENS"),
                ("--query-tokens", "QUERY_TOKENS"),
            ] {
                let error = config(&[flag, tokens]).validate().unwrap_err();
                assert!(
                    error.starts_with(name) && error.contains("token 2 of the list"),
                    "{error}"
                );
                assert!(!error.contains("s3cret"), "{error}");
            }
        }
    }

    /// The settings `migrate`, `export` and `healthcheck` read go after the subcommand too
    /// (`catchall migrate --database-url …` was "unexpected argument", exit 2).
    #[test]
    fn subcommands_take_the_settings_they_read() {
        let cli = Cli::try_parse_from([
            "catchall",
            "migrate",
            "--database-url",
            "postgres://u@db/c",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.config.database_url, "postgres://u@db/c");
        let cli = Cli::try_parse_from([
            "catchall",
            "export",
            "--status",
            "unknown",
            "--database-url",
            "postgres://u@db/c",
            "--threshold",
            "7",
        ])
        .unwrap();
        assert_eq!(
            (cli.config.database_url.as_str(), cli.config.threshold),
            ("postgres://u@db/c", 7)
        );
        let cli = Cli::try_parse_from([
            "catchall",
            "healthcheck",
            "--http-addr",
            "127.0.0.1:9",
            "--admin-addr",
            "127.0.0.1:10",
        ])
        .unwrap();
        assert_eq!(cli.config.admin_addr.map(|a| a.port()), Some(10));
    }

    /// Debug never shows a URL's password (a derived Debug did: one `?config` in a log line
    /// would have leaked it).
    #[test]
    fn debug_output_has_no_passwords() {
        let config = Cli::try_parse_from([
            "catchall",
            "--database-url",
            "postgres://u:hunter2@db/c",
            "--status-database-url",
            "postgres://u:hunter3@replica/c",
            "--amqp-url",
            "amqp://u:s3cret@h/%2f",
        ])
        .unwrap()
        .config;
        let ingest =
            crate::ingest::IngestSettings::new(&config.amqp.amqp_url, config.amqp.topology());
        let shown = format!("{config:?} {:?} {ingest:?}", config.amqp);
        for secret in ["hunter2", "hunter3", "s3cret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("db/c") && shown.contains("h/%2f"), "{shown}");
    }
}
