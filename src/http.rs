//! The HTTP server (SPEC §5): domain status, bulk look-ups and listings, HTTP ingest, health,
//! readiness and metrics, behind limits that protect it (bodies, header and request timeouts,
//! a cap on concurrent requests).

use crate::config::Tokens;
use crate::event::{
    ArrayItems, Event, EventType, MAX_BATCH_EVENTS, MAX_BODY_BYTES, Parsed, Status, TOO_MANY_ITEMS,
    normalize_domain, parse_body,
};
use crate::health::Health;
use crate::ingest::{Ingest, IngestError};
use crate::metrics;
use crate::store::{Store, StoreError};
use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{BoxError, Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Where look-ups and listings read: `DATABASE_URL`, or the replica of
    /// `STATUS_DATABASE_URL`.
    pub store: Store,
    /// Single look-ups, grouped into bulk queries under load (see [`crate::lookups`]).
    pub lookups: crate::lookups::Lookups,
    /// With a replica: the primary's look-up pool, read while the replica is too far behind or
    /// does not answer (see [`crate::replica::lag_loop`]).
    pub primary: Option<(Store, crate::lookups::Lookups, crate::replica::Fallback)>,
    /// The servers `/readyz` pings, each on a pool of its own (see [`ReadyProbe`]). Shared:
    /// the state is cloned for every request.
    pub ready_probes: Arc<[ReadyProbe]>,
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    /// Deliveries above which a never-bounced domain is catch-all.
    pub threshold: i64,
    /// The ingest publisher and the tokens that may use it; `None`: the ingest routes are off.
    pub ingest: Option<(Ingest, Tokens)>,
    /// Tokens required for look-ups; `None`: look-ups are open.
    pub query_tokens: Option<Tokens>,
    /// The ESP webhook routes (each on only with its provider's setting); `None`: none is set.
    pub webhooks: Option<crate::webhooks::WebhookState>,
    /// Room for the large answers held at once (`HTTP_ANSWER_BUDGET`).
    pub answers: AnswerBudget,
}

/// The large answers (listings, bulk look-ups) a worker holds at once, in bytes
/// (`HTTP_ANSWER_BUDGET`). An answer takes room for the most it can be before it is read from
/// Postgres, keeps what it turned out to be, and gives it back once the kernel has taken its
/// last byte ([`budgeted_json`]). Without it, clients that ask and do not read held an answer
/// each, up to `HTTP_MAX_CONNECTIONS` of them (a megabyte or more each: in the socket's send
/// buffer or in hyper's), whatever the worker's memory. The price: such clients hold their
/// room for as long as their connection lives (about 80 s at most), and large answers to
/// others wait, then get 503, meanwhile.
#[derive(Clone)]
pub struct AnswerBudget {
    room: Arc<tokio::sync::Semaphore>,
    /// All of it, in bytes (the most one answer takes).
    total: u32,
    /// How long an answer waits for room before it is refused (503).
    wait: Duration,
}

impl AnswerBudget {
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let total = bytes.min(u64::from(u32::MAX)) as u32;
        Self {
            room: Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
            wait,
        }
    }

    /// Room for an answer of at most `most` bytes (all of the budget if it is larger), or 503
    /// once `wait` has passed without it.
    async fn take(&self, most: usize) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let bytes = most.clamp(1, self.total as usize) as u32;
        match tokio::time::timeout(self.wait, self.room.clone().acquire_many_owned(bytes)).await {
            Ok(Ok(room)) => Ok(room),
            _ => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many large answers are being sent; try again",
            )),
        }
    }
}

/// About the most an accepted connection's socket holds unsent (`TCP_NOTSENT_LOWAT`; the kernel
/// checks it before each segment, so up to a segment more): by default its send buffer grows
/// to 4 MiB (`tcp_wmem`) for a client that does not read.
#[cfg(any(target_os = "linux", target_os = "android"))]
const NOT_SENT_MOST: u32 = 64 * 1024;

/// The most one entry of a listing or a look-up answer takes in JSON: a domain of 253 bytes,
/// the longest status, three counters of 20 digits, and the names around them.
const ENTRY_JSON_MOST: usize = 400;

/// What a listing or look-up answer takes besides its entries (`{"results":[…]}`,
/// `{"domains":[…],"next":"<a domain>"}`).
const ANSWER_JSON_MOST: usize = 300;

/// Room in the [`AnswerBudget`] for the answer of a bulk look-up, taken before its body is read
/// (an extractor ahead of the body's): a look-up waiting for room holds neither body room nor
/// a parsed body. For the most a body of its `Content-Length` (1 MiB without one) can ask:
/// an entry takes 3 bytes of the body at least and at most 400 of the answer, and an invalid
/// one is echoed no longer than it was sent (what JSON escapes came escaped).
pub struct BulkAnswerRoom(tokio::sync::OwnedSemaphorePermit);

impl axum::extract::FromRequestParts<AppState> for BulkAnswerRoom {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let body = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|length| length.to_str().ok()?.parse::<usize>().ok())
            .map_or(MAX_BODY_BYTES, |length| length.min(MAX_BODY_BYTES));
        let entries = (body / 3).min(MAX_BATCH_EVENTS);
        let most = entries * ENTRY_JSON_MOST + body + ANSWER_JSON_MOST;
        Ok(Self(state.answers.take(most).await?))
    }
}

/// `value` as a JSON answer that holds `room` (shrunk to its size) for as long as any of its
/// bytes are: hyper holds the answer without copying it until the kernel has taken the last
/// byte, so a client that does not read keeps it counted.
fn budgeted_json<T: Serialize>(
    value: &T,
    mut room: tokio::sync::OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let mut json = serde_json::to_vec(value).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {error}"),
        )
    })?;
    // serde_json grows its buffer by doubling: up to twice the answer.
    json.shrink_to_fit();
    // An answer larger than it was thought to be keeps what it has (at most the whole budget).
    let keep = json.len().clamp(1, room.num_permits());
    drop(room.split(room.num_permits() - keep));
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from_owner(Answer { json, _room: room }),
    )
        .into_response())
}

/// An answer's bytes with its room in the [`AnswerBudget`], given back with them.
struct Answer {
    json: Vec<u8>,
    _room: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Answer {
    fn as_ref(&self) -> &[u8] {
        &self.json
    }
}

impl AppState {
    /// The store and grouped look-ups to read from now: the replica's, or the primary's while
    /// the replica is too far behind.
    fn reader(&self) -> (&Store, &crate::lookups::Lookups) {
        match &self.primary {
            Some((store, lookups, fallback)) if fallback.is_active() => (store, lookups),
            _ => (&self.store, &self.lookups),
        }
    }
}

/// Every route, with request metrics around them. Ingest routes exist only when ingest is on.
pub fn router(state: AppState) -> Router {
    let queries = Router::new()
        .route("/domains/{domain}", get(domain_status))
        .route("/v1/domain/{domain}", get(domain_status))
        .route("/domains", get(list_domains))
        .route(
            "/domains/lookup",
            post(lookup_domains).get(lookup_domain_status),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_query_token,
        ));
    let mut app = Router::new().merge(queries).merge(probes());
    if state.ingest.is_some() {
        let ingest = Router::new()
            .route("/events/{domain}/{kind}", put(put_event))
            .route("/v1/events/{domain}/{kind}", put(put_event))
            .route("/events", post(post_events))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_ingest_token,
            ));
        app = app.merge(ingest);
    }
    let webhooks = state.webhooks.clone();
    let mut app: Router = app.with_state(state);
    if let Some(webhooks) = webhooks {
        app = app.merge(crate::webhooks::router(webhooks));
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(track))
        .layer(middleware::from_fn(crate::trace_http::trace))
}

/// The probes and the metrics ([`PROBES`]), on `HTTP_ADDR` and on `ADMIN_ADDR`.
fn probes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/readyz/lookups", get(readyz_lookups))
        .route("/metrics", get(render_metrics))
}

/// The paths of [`probes`], which [`serve`] exempts from the concurrency cap and the request
/// timeout.
const PROBES: [&str; 4] = ["/healthz", "/readyz", "/readyz/lookups", "/metrics"];

/// What a starting worker waits for (Postgres, the migrations), which `/readyz` and every route
/// but `/healthz` and `/metrics` say while [`starting_router`] serves.
#[derive(Clone, Default)]
pub struct StartPhase(Arc<std::sync::Mutex<String>>);

impl StartPhase {
    pub fn set(&self, phase: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|poison| poison.into_inner()) = phase.into();
    }

    pub fn get(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

/// What `HTTP_ADDR` and `ADMIN_ADDR` serve while the worker connects to Postgres and migrates
/// (SPEC §5: `/healthz` answers while the process runs): `/healthz` 200, `/metrics`, 503 with
/// what it waits for on `/readyz` and `/readyz/lookups`, and 503 `starting` on every other
/// path, with `Retry-After`.
pub fn starting_router(phase: StartPhase, metrics: PrometheusHandle) -> Router {
    // What it waits for (the server's host:port/db) only where the probes look, as `/readyz`
    // says it once started; every other path just says it is starting.
    let waiting = move || {
        let phase = phase.clone();
        async move {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("starting: {}", phase.get()),
            )
        }
    };
    let starting = || async { ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "starting") };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(waiting.clone()))
        .route("/readyz/lookups", get(waiting))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics_answer(&metrics) }
            }),
        )
        .fallback(starting)
        .layer(middleware::from_fn(track))
}

/// What a listener serves: [`starting_router`] until [`Switch::start`] sets the worker's
/// router. One server per listener for the worker's whole life, from before Postgres answers:
/// no hand-over between servers, one connection cap, and keep-alive connections carry on.
/// Once the start is done ([`Switch::started_soon`]), requests wait for the worker's router
/// (set as `App::run` begins) rather than be told the worker is starting.
#[derive(Clone)]
pub struct Switch {
    starting: Router,
    started: Arc<tokio::sync::watch::Sender<Option<Router>>>,
    soon: Arc<AtomicBool>,
}

/// The longest a request waits for the worker's router once the start is done (an `App` that
/// is never run).
const SWITCH_WAIT: Duration = Duration::from_secs(5);

impl Switch {
    pub fn new(starting: Router) -> Self {
        Self {
            starting,
            started: Arc::new(tokio::sync::watch::Sender::new(None)),
            soon: Arc::default(),
        }
    }

    /// The start is done: requests wait (up to [`SWITCH_WAIT`]) for [`Switch::start`].
    pub fn started_soon(&self) {
        self.soon.store(true, Ordering::Release);
    }

    /// Serves `app` from now on (requests under way end on the start's router).
    pub fn start(&self, app: Router) {
        self.started.send_replace(Some(app));
    }

    /// The router to [`serve`].
    pub fn router(&self) -> Router {
        Router::new().fallback_service(self.clone())
    }
}

impl tower::Service<Request> for Switch {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures_util::FutureExt;
        use tower::ServiceExt;
        if let Some(router) = self.started.borrow().clone() {
            return router.oneshot(request).boxed();
        }
        if !self.soon.load(Ordering::Acquire) {
            return self.starting.clone().oneshot(request).boxed();
        }
        let (mut started, starting) = (self.started.subscribe(), self.starting.clone());
        async move {
            let router = tokio::time::timeout(SWITCH_WAIT, started.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(|router| router.ok().and_then(|router| router.clone()));
            router.unwrap_or(starting).oneshot(request).await
        }
        .boxed()
    }
}

/// What `ADMIN_ADDR` serves: the probes and the metrics, nothing that reads a body or counts.
pub fn admin_router(state: AppState) -> Router {
    probes()
        .with_state(state)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track))
}

/// An error answer: `{"error": "…"}` with a status code (and `Retry-After` on a 503, a bearer
/// challenge on a 401).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        if let IngestError::TooLarge(_) = error {
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, error.to_string());
        }
        tracing::debug!(error = %error, "Ingest not confirmed; answering 503.");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "events not accepted: the broker did not confirm them; retry later",
        )
    }
}

fn database_unavailable<E>(error: E) -> ApiError
where
    E: std::error::Error + Send + Sync + 'static,
{
    static LOG: crate::metrics::LogBudget = crate::metrics::LogBudget::new();
    if let Some(suppressed) = LOG.take() {
        tracing::warn!(
            error = format!("{:#}", anyhow::Error::new(error)),
            suppressed,
            "Look-up failed."
        );
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the database is unavailable",
    )
}

#[derive(Debug, Serialize)]
struct DomainStatus {
    domain: String,
    status: Status,
    delivered: i64,
    bounced: i64,
    /// Bounces that prove nothing about catch-all (mailbox full, policy…): shown, never decisive.
    other_bounced: i64,
}

async fn domain_status(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DomainStatus>, ApiError> {
    let Path(raw) = path.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid path: {}", rejection.body_text()),
        )
    })?;
    status_of(&state, &raw).await
}

/// `GET /domains/lookup`: the status of the single-label domain `lookup`, whose path is the
/// bulk look-up's (a POST). It was 405, while `/domains/LOOKUP` answered.
async fn lookup_domain_status(
    State(state): State<AppState>,
) -> Result<Json<DomainStatus>, ApiError> {
    status_of(&state, "lookup").await
}

async fn status_of(state: &AppState, raw: &str) -> Result<Json<DomainStatus>, ApiError> {
    let domain = normalize_domain(raw).map_err(|reason| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid domain: {reason}"))
    })?;
    let counts = state
        .reader()
        .1
        .lookup(domain.clone())
        .await
        .map_err(|error| match *error {
            // Postgres answers; this worker has more look-ups waiting than it queues.
            StoreError::Busy => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many look-ups waiting")
            }
            _ => database_unavailable(error),
        })?;
    Ok(Json(DomainStatus {
        status: Status::classify(counts.delivered, counts.bounced, state.threshold),
        domain,
        delivered: counts.delivered,
        bounced: counts.bounced,
        other_bounced: counts.other_bounced,
    }))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the consumer runs, the last batch committed, and Postgres answers now.
async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let unavailable = |message: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message);
    if !state.health.consuming() {
        return Err(unavailable(match state.health.broker_error() {
            Some(error) => format!("not consuming from RabbitMQ: {error}"),
            None => "not consuming from RabbitMQ".into(),
        }));
    }
    if let Some(error) = state.health.db_error() {
        return Err(unavailable(format!("Postgres: {error}")));
    }
    // With a replica, the primary (writes) and the replica (look-ups) must both answer.
    ping(state.ready_probes.iter()).await?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

/// Ready to serve look-ups: the server they read now answers (the replica when
/// `STATUS_DATABASE_URL` is set, the primary while the replica is too far behind or down),
/// whatever the consumer does. Kubernetes' readiness probe: every replica loses the one broker
/// at once, and gating the Service on `/readyz` would take the whole look-up API down with it
/// while Postgres answers.
async fn readyz_lookups(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let from_primary = state
        .primary
        .as_ref()
        .is_some_and(|(_, _, fallback)| fallback.is_active());
    ping(
        state
            .ready_probes
            .iter()
            .filter(|probe| probe.serves_lookups != from_primary),
    )
    .await?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

/// Checks each server (see [`ReadyProbe::check`]): 503 with a short reason for the first that
/// does not answer.
async fn ping(probes: impl Iterator<Item = &ReadyProbe>) -> Result<(), ApiError> {
    for probe in probes {
        probe
            .check()
            .await
            .map_err(|reason| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason))?;
    }
    Ok(())
}

/// When a readiness ping ended, and its outcome (`Err`: the short reason for the client).
type Pinged = (Instant, Result<(), String>);

/// How long a readiness ping's outcome answers the probes that follow it.
const PING_FRESH: Duration = Duration::from_secs(1);

/// A server `/readyz` pings, on a pool of its own (one connection): a flood of look-ups that
/// exhausts the look-up pool must not make every replica unready.
#[derive(Clone)]
pub struct ReadyProbe {
    /// `Postgres HOST:PORT/DB` or `Postgres replica HOST:PORT/DB` (no password).
    pub name: String,
    pub store: Store,
    /// The server look-ups read (`/readyz/lookups` pings only these): the replica when there
    /// is one (the primary, the other, while look-ups fall back to it), else the primary.
    pub serves_lookups: bool,
    /// The last ping: when it ended and its outcome (see [`ReadyProbe::check`]).
    last: Arc<tokio::sync::Mutex<Option<Pinged>>>,
}

impl ReadyProbe {
    pub fn new(name: String, store: Store, serves_lookups: bool) -> Self {
        Self {
            name,
            store,
            serves_lookups,
            last: Arc::default(),
        }
    }

    /// Pings the server within 2 s, once at a time: a probe that comes while a ping runs
    /// waits for it, and one within [`PING_FRESH`] of its end takes its outcome. Every probe
    /// used to ping on the one connection, so a flood of `/readyz` requests (the port needs no
    /// token) queued Kubernetes' probe behind them past its timeout, and the pod left the
    /// Service. `Err` is the short reason for the client.
    async fn check(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, outcome)) = last.as_ref()
            && at.elapsed() < PING_FRESH
        {
            return outcome.clone();
        }
        let name = &self.name;
        let outcome = match self.store.ping_within(Duration::from_secs(2)).await {
            Ok(()) => Ok(()),
            Err(StoreError::Timeout(_)) => Err(format!("{name}: no answer within 2 s")),
            Err(error) => {
                // The client gets a short reason; the log gets the whole error (which can
                // carry the server's message text).
                let reason = ready_reason(&error);
                tracing::warn!(
                    server = %name,
                    error = format!("{:#}", anyhow::Error::new(error)),
                    "Readiness check: Postgres does not answer."
                );
                Err(format!("{name}: {reason}"))
            }
        };
        *last = Some((Instant::now(), outcome.clone()));
        outcome
    }
}

/// Why a readiness ping failed, fit for any client: a TLS verification failure in our own
/// words (host and reason, as `crate::tls` explains it), else the kind of failure and the
/// SQLSTATE ([`crate::store::StoreError::short_reason`]), never the server's message text.
fn ready_reason(error: &crate::store::StoreError) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        // tokio-rustls wraps the rustls error in an io::Error, whose `source()` skips it.
        let inner = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(current), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                return match tls {
                    rustls::Error::Other(explained) => {
                        format!("TLS verification failed: {}", explained.0)
                    }
                    other => format!("TLS failed: {other}"),
                };
            }
        }
        source = current.source();
    }
    error.short_reason()
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    metrics_answer(&state.metrics)
}

fn metrics_answer(metrics: &PrometheusHandle) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// Counts each request by route template (never the raw path, so labels stay few) and code.
async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::http_request(&route, response.status().as_u16(), started.elapsed());
    response
}

// --- Bearer tokens ---

/// The token of an `Authorization: Bearer …` header, if there is one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// 401 unless the request carries one of `tokens`. The answer never repeats what was sent.
fn check_token(tokens: &Tokens, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer(headers) {
        Some(token) if tokens.accepts(token) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not valid",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer token",
        )),
    }
}

async fn require_ingest_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match &state.ingest {
        Some((_, tokens)) => match check_token(tokens, request.headers()) {
            Ok(()) => next.run(request).await,
            Err(error) => error.into_response(),
        },
        None => not_found().await.into_response(),
    }
}

async fn require_query_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(tokens) = &state.query_tokens
        && let Err(error) = check_token(tokens, request.headers())
    {
        return error.into_response();
    }
    next.run(request).await
}

// --- Ingest ---

/// The `Idempotency-Key` header, which becomes the message id: 1–255 visible ASCII characters
/// (an AMQP short string that Postgres can store), not beginning as a webhook's ids do
/// ([`crate::webhooks::ID_PREFIXES`]).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    let key = String::from_utf8_lossy(bytes).into_owned();
    if let Some(prefix) = crate::webhooks::ID_PREFIXES
        .iter()
        .find(|prefix| key.starts_with(*prefix))
    {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key may not begin with {prefix:?}: the webhooks' message ids do"
        )));
    }
    Ok(Some(key))
}

fn accepted(events: usize) -> Response {
    accepted_ignoring(events, 0)
}

/// 202 with the events published and, when there were any, the KumoMTA records of uncounted
/// types that were acknowledged without publishing (SPEC §3: ignored, counted in a metric).
fn accepted_ignoring(events: usize, ignored: usize) -> Response {
    let body = if ignored == 0 {
        serde_json::json!({ "accepted": events })
    } else {
        serde_json::json!({ "accepted": events, "ignored": ignored })
    };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

fn ingest(state: &AppState) -> Result<&Ingest, ApiError> {
    state
        .ingest
        .as_ref()
        .map(|(ingest, _)| ingest)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such route"))
}

/// `PUT /events/{domain}/{delivered|bounced}` (and `/v1/events/…`): one event, 202 once confirmed.
async fn put_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((raw_domain, raw_kind)) = path.map_err(|rejection| {
        ApiError::bad_request(format!("invalid path: {}", rejection.body_text()))
    })?;
    let kind: EventType = raw_kind
        .parse()
        .map_err(|_| ApiError::bad_request("event type must be \"delivered\" or \"bounced\""))?;
    let event = Event::new(&raw_domain, kind)
        .map_err(|reason| ApiError::bad_request(format!("invalid domain: {reason}")))?;
    let key = idempotency_key(&headers)?;
    ingest(&state)?.publish_one(event, key).await?;
    Ok(accepted(1))
}

/// `POST /events`: a JSON array or NDJSON of events, published as one message, 202 once
/// confirmed. Nothing of a request with any bad event is published.
async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        let (status, text) = body_rejection(&rejection);
        ApiError::new(status, text)
    })?;
    let key = idempotency_key(&headers)?;
    let parsed = parse_events(&body).map_err(ApiError::bad_request)?;
    let ingest = ingest(&state)?;
    if !parsed.events.is_empty() {
        ingest.publish_many(&parsed.events, key).await?;
    }
    if parsed.ignored > 0 {
        metrics::records_ignored(parsed.ignored);
    }
    Ok(accepted_ignoring(parsed.events.len(), parsed.ignored))
}

/// Parses a JSON array of events, NDJSON (one event object per line, blank lines ignored), or
/// one event object over several lines (pretty-printed, as the queue's format allows too).
/// The error names the first bad event (array index or line number, from 1). KumoMTA records
/// of uncounted types are counted in `ignored`, as the consumer does with them.
pub fn parse_events(body: &[u8]) -> Result<Parsed, String> {
    let text = crate::event::strip_bom(
        std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?,
    );
    let trimmed = text.trim();
    if trimmed.starts_with('{')
        && trimmed.contains('\n')
        && let Ok(one) = serde_json::from_str::<&serde_json::value::RawValue>(trimmed)
    {
        // As NDJSON its first line (`{`) was refused as invalid JSON.
        return one_event(one.get().as_bytes(), true)
            .map_err(|reason| format!("event 1: {reason}"));
    }
    let parsed = match text.trim_start().as_bytes().first() {
        None => return Err("body is empty: send a JSON array or NDJSON of events".into()),
        Some(b'[') => {
            let items: ArrayItems<&serde_json::value::RawValue> = serde_json::from_str(text)
                .map_err(|e| {
                    if e.to_string().starts_with(TOO_MANY_ITEMS) {
                        too_many_events()
                    } else {
                        format!("body is not a valid JSON array: {e}")
                    }
                })?;
            let mut parsed = Parsed {
                events: Vec::with_capacity(items.0.len()),
                ignored: 0,
            };
            for (index, item) in items.0.iter().enumerate() {
                let item = item.get();
                // A KumoMTA record of a batch adds an event per recipient.
                parsed
                    .append(
                        one_event(item.as_bytes(), item.starts_with('{'))
                            .map_err(|reason| format!("event {}: {reason}", index + 1))?,
                    )
                    .map_err(|_| too_many_events())?;
            }
            parsed
        }
        Some(_) => {
            let mut parsed = Parsed::default();
            let mut records = 0;
            for (number, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                // Records (lines), as the array's items are counted; the events too, as a
                // KumoMTA record of a batch adds one per recipient (and one without a domain
                // none).
                if records == MAX_BATCH_EVENTS {
                    return Err(too_many_events());
                }
                records += 1;
                let is_object = line.trim_start().starts_with('{');
                parsed
                    .append(
                        one_event(line.as_bytes(), is_object)
                            .map_err(|reason| format!("line {}: {reason}", number + 1))?,
                    )
                    .map_err(|_| too_many_events())?;
            }
            parsed
        }
    };
    if parsed.events.is_empty() && parsed.ignored == 0 {
        return Err("no events in the body".into());
    }
    Ok(parsed)
}

fn too_many_events() -> String {
    format!("more than {MAX_BATCH_EVENTS} events")
}

/// One event object, parsed and normalised by the wire format's own rules: its event, or a
/// KumoMTA record's, one per recipient (none, and `ignored`, for an uncounted type).
fn one_event(json: &[u8], is_object: bool) -> Result<Parsed, String> {
    if !is_object {
        return Err("not an event object".into());
    }
    parse_body(json).map_err(|reason| reason.to_string())
}

// --- Bulk look-up and listing ---

#[derive(Deserialize)]
struct LookupRequest {
    /// Bounded while parsed: a 1 MiB body of 349,000 `""` was built whole (about 15 MB) before
    /// the 10,000 limit refused it.
    domains: ArrayItems<String>,
}

/// One entry of a bulk answer: the status, or why the domain is invalid.
#[derive(Serialize)]
#[serde(untagged)]
enum LookupEntry {
    Found(DomainStatus),
    Invalid { domain: String, error: String },
}

/// `POST /domains/lookup`: every domain's status in one round trip to Postgres, in the order
/// asked. Invalid domains are reported in their entry, not by failing the whole request.
async fn lookup_domains(
    State(state): State<AppState>,
    BulkAnswerRoom(room): BulkAnswerRoom,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        let (status, text) = body_rejection(&rejection);
        ApiError::new(status, text)
    })?;
    let shape = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!(
            "body must be {{\"domains\": [\"example.com\", …]}}: {e}"
        ))
    };
    // A leading byte order mark (a file saved by a Windows tool) is ignored, as by POST /events.
    let text = std::str::from_utf8(&body).map_err(|_| shape(&"the body is not UTF-8"))?;
    let request: LookupRequest =
        serde_json::from_str(crate::event::strip_bom(text)).map_err(|e| {
            if e.to_string().starts_with(TOO_MANY_ITEMS) {
                ApiError::bad_request(format!("more than {MAX_BATCH_EVENTS} domains"))
            } else {
                shape(&e)
            }
        })?;
    let domains = request.domains.0;
    drop(body);
    let normalised: Vec<Result<String, String>> = domains
        .iter()
        .map(|raw| normalize_domain(raw).map_err(|reason| format!("invalid domain: {reason}")))
        .collect();
    let mut valid: Vec<String> = normalised
        .iter()
        .filter_map(|n| n.as_ref().ok().cloned())
        .collect();
    valid.sort_unstable();
    valid.dedup();
    let found = state
        .reader()
        .0
        .lookup_many(&valid)
        .await
        .map_err(database_unavailable)?;
    let results: Vec<LookupEntry> = domains
        .into_iter()
        .zip(normalised)
        .map(|(raw, normalised)| match normalised {
            Ok(domain) => {
                let counts = found.get(&domain).copied().unwrap_or_default();
                LookupEntry::Found(DomainStatus {
                    status: Status::classify(counts.delivered, counts.bounced, state.threshold),
                    domain,
                    delivered: counts.delivered,
                    bounced: counts.bounced,
                    other_bounced: counts.other_bounced,
                })
            }
            Err(error) => LookupEntry::Invalid { domain: raw, error },
        })
        .collect();
    budgeted_json(&LookupAnswer { results }, room)
}

/// The answer of `POST /domains/lookup` (serialised straight from the structs, no JSON tree).
#[derive(Serialize)]
struct LookupAnswer {
    results: Vec<LookupEntry>,
}

/// A page of `GET /domains`.
#[derive(Serialize)]
struct ListPage {
    domains: Vec<DomainStatus>,
    /// The `after` of the next page; `None` (null) on the last one.
    next: Option<String>,
}

/// Default and largest page of `GET /domains`.
pub const DEFAULT_PAGE: u32 = 1000;
pub const MAX_PAGE: u32 = 10_000;

/// Unknown parameters are refused (400): a client paging with another API's `cursor` or
/// `offset` would otherwise get the first page again for ever.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

/// A status as written in a query or on the command line: `catch-all`, `not-catch-all` (or
/// `not catch-all`), `unknown`.
pub fn parse_status(raw: &str) -> Result<Status, String> {
    match raw.trim() {
        "catch-all" => Ok(Status::CatchAll),
        "not-catch-all" | "not catch-all" => Ok(Status::NotCatchAll),
        "unknown" => Ok(Status::Unknown),
        _ => Err("status must be catch-all, not-catch-all or unknown".into()),
    }
}

/// `GET /domains?status=…&after=…&limit=…`: domains in byte order after the cursor `after`
/// (keyset pagination: each page is one index range scan, so pages stay fast however deep, and
/// a domain is never listed twice even while counters change). `next` is the cursor of the
/// next page, `null` on the last one.
async fn list_domains(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|rejection| {
        ApiError::bad_request(format!("invalid query: {}", rejection.body_text()))
    })?;
    let status = params
        .status
        .as_deref()
        .map(parse_status)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let after = params.after.unwrap_or_default();
    if after.len() > 1024 {
        return Err(ApiError::bad_request(
            "after is longer than a domain can be",
        ));
    }
    // No normalised domain holds a control character, and Postgres text cannot hold a NUL
    // (it would fail the query: a 5xx caused by input).
    if after.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "after must be a domain (a previous page's next), without control characters",
        ));
    }
    let room = state
        .answers
        .take(limit as usize * ENTRY_JSON_MOST + ANSWER_JSON_MOST)
        .await?;
    let page = state
        .reader()
        .0
        .list_domains(status, state.threshold, &after, limit)
        .await
        .map_err(database_unavailable)?;
    let next = (page.len() == limit as usize)
        .then(|| page.last().map(|row| row.domain.clone()))
        .flatten();
    let domains: Vec<DomainStatus> = page
        .into_iter()
        .map(|row| DomainStatus {
            status: Status::classify(row.delivered, row.bounced, state.threshold),
            domain: row.domain,
            delivered: row.delivered,
            bounced: row.bounced,
            other_bounced: row.other_bounced,
        })
        .collect();
    budgeted_json(&ListPage { domains, next }, room)
}

// --- The server ---

/// The limits the server protects itself with.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Requests served at once; more get 503 with `Retry-After`.
    pub max_concurrency: usize,
    /// From a request's headers to its answer; slower requests get 408.
    pub request_timeout: Duration,
    /// For a client to send a request's headers; slower connections are closed.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers); larger get 431 and the connection closes.
    pub max_header_bytes: usize,
    /// After a stop, how long open connections may take to finish their requests before they
    /// are dropped: a margin before SHUTDOWN_TIMEOUT, so a request stuck on a frozen dependency
    /// cannot make the stop overrun it.
    pub drain_timeout: Duration,
    /// Connections held open at once; past it `accept` waits until one closes.
    pub max_connections: usize,
    /// How long a connection lives (idle, reading or writing; a slow reader holding a large
    /// response counts too): then its answers say `Connection: close`, so it closes after the
    /// next one; `header_timeout` later it is shut down gracefully (closed once the answer in
    /// progress is written), and dropped if that takes longer than `request_timeout`. (An idle
    /// connection is closed by hyper's header timer `header_timeout` after its last answer.)
    pub connection_timeout: Duration,
    /// Request bodies held at once, in bytes (HTTP_BODY_BUDGET): a request with a body reserves
    /// its declared size (without one, the most a body may be) before it is read, and waits
    /// while the budget is spent. At least [`MAX_BODY_BYTES`].
    pub body_budget: usize,
}

impl ServerLimits {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_concurrency: config.http_max_concurrency as usize,
            request_timeout: config.http_request_timeout,
            header_timeout: config.http_header_timeout,
            max_header_bytes: 64 * 1024,
            drain_timeout: config
                .shutdown_timeout
                .saturating_sub(Duration::from_secs(2))
                .max(config.shutdown_timeout / 2),
            max_connections: config.http_max_connections as usize,
            body_budget: config.http_body_budget as usize,
            connection_timeout: config
                .http_request_timeout
                .saturating_mul(4)
                .max(Duration::from_secs(60)),
        }
    }
}

/// The 503 (overload) and 408 (timeout) answers of the protective layers, as JSON, counted in
/// the request metrics (route `overloaded` or `timeout`: the request never reached, or never
/// left, the router that names routes; a timed-out request took `request_timeout`).
async fn protection_error(error: BoxError, request_timeout: Duration) -> Response {
    if error.is::<tower::load_shed::error::Overloaded>() {
        metrics::http_request("overloaded", 503, Duration::ZERO);
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests at once; retry later",
        )
        .into_response()
    } else if error.is::<tower::timeout::error::Elapsed>() {
        metrics::http_request("timeout", 408, request_timeout);
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request took too long").into_response()
    } else {
        tracing::warn!(error = %error, "HTTP middleware failed.");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
    }
}

/// Caps the request bodies held at once (`HTTP_BODY_BUDGET`, one permit per byte): bodies of up
/// to 1 MiB at `HTTP_MAX_CONCURRENCY` requests at once (a flood of open `POST /domains/lookup`)
/// would otherwise take far more memory than SPEC §4's PREFETCH_BYTES + 64 MiB. A request
/// reserves its declared size (1 MiB without a `Content-Length`) when the first chunk of its
/// body arrives (while the budget is spent, it stops reading its body until room is made:
/// back-pressure on its client) and holds it until its answer is made, as the handler holds
/// the body until then. Connections that declare a body and send nothing hold nothing. While
/// other bodies wait for room, one that began must keep a pace that would bring its whole
/// reservation within the request timeout (after [`PACE_GRACE`]), else it is answered 408 and its
/// room is given back: a stalled reservation holds room others wait for about 2 s, not until its
/// request times out; with nobody waiting, a slow body harms nobody and is read on. A
/// request without a body goes straight through, nothing boxed (as `middleware::from_fn` it
/// cost look-ups ~5 % more CPU: benches/ab-lookups.sh).
#[derive(Clone)]
struct BodyBudget<S> {
    inner: S,
    budget: Arc<tokio::sync::Semaphore>,
    /// The request timeout, which sets a body's pace.
    timeout: Duration,
    /// Bodies waiting for room: a body behind its pace is cut only while there are any.
    waiters: Arc<std::sync::atomic::AtomicUsize>,
}

/// One body waiting for room, counted in [`BodyBudget::waiters`] until it has it or is dropped.
struct Waiter(Arc<std::sync::atomic::AtomicUsize>);

impl Waiter {
    fn new(waiters: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        waiters.fetch_add(1, Ordering::Relaxed);
        Self(waiters.clone())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a body may fall behind its pace once its first bytes arrived.
const PACE_GRACE: Duration = Duration::from_secs(2);
/// How often a body behind its pace looks again whether others wait for room.
const PACE_RECHECK: Duration = Duration::from_millis(250);

/// A request body that fell behind its pace (see [`BodyBudget`]): answered 408.
#[derive(Debug)]
struct SlowBody;

impl std::fmt::Display for SlowBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the request body came too slowly: it must arrive at a pace that completes it \
             within the request timeout",
        )
    }
}

impl std::error::Error for SlowBody {}

/// The status and text of a body that could not be read: 408 when it came too slowly, else
/// axum's (413 past the limit, 400).
pub(crate) fn body_rejection(rejection: &BytesRejection) -> (StatusCode, String) {
    let mut source = std::error::Error::source(rejection);
    while let Some(error) = source {
        if error.is::<SlowBody>() {
            return (StatusCode::REQUEST_TIMEOUT, SlowBody.to_string());
        }
        source = error.source();
    }
    (rejection.status(), rejection.body_text())
}

/// The wait for a request's room in the body budget.
type Acquiring = futures_util::future::BoxFuture<
    'static,
    Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
>;

/// What one request reserved, released when its answer is made.
type Held = Arc<std::sync::OnceLock<tokio::sync::OwnedSemaphorePermit>>;

impl<S> tower::Service<Request> for BodyBudget<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        S::Future,
        futures_util::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures_util::future::Either;
        let headers = request.headers();
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
        let bytes = match declared {
            Some(length) => length.min(MAX_BODY_BYTES),
            None if headers.contains_key(header::TRANSFER_ENCODING) => MAX_BODY_BYTES,
            None => 0,
        };
        if bytes == 0 {
            return Either::Left(self.inner.call(request));
        }
        let held = Held::default();
        let (parts, body) = request.into_parts();
        let body = axum::body::Body::new(BudgetBody {
            inner: body,
            budget: self.budget.clone(),
            held: held.clone(),
            reserve: u32::try_from(bytes).unwrap_or(u32::MAX),
            waiting: None,
            timeout: self.timeout,
            pace: None,
            waiters: self.waiters.clone(),
        });
        let answer = self.inner.call(Request::from_parts(parts, body));
        Either::Right(Box::pin(async move {
            let answer = answer.await;
            drop(held);
            answer
        }))
    }
}

/// A request body that reserves its whole declared size in the budget when its first chunk
/// arrives, before handing that chunk on; the later chunks pass. One reservation per request,
/// so no request holds part of the budget while it waits for more (reserving each chunk as it
/// came deadlocked requests against each other until their timeouts).
struct BudgetBody {
    inner: axum::body::Body,
    budget: Arc<tokio::sync::Semaphore>,
    held: Held,
    /// Bytes to reserve at the first chunk (0 once reserved).
    reserve: u32,
    /// The first chunk, waiting for its room in the budget.
    waiting: Option<(hyper::body::Frame<Bytes>, Acquiring, Waiter)>,
    /// Bodies waiting for room, this one's among them while it waits.
    waiters: Arc<std::sync::atomic::AtomicUsize>,
    /// The request timeout, in which the reservation must be able to arrive.
    timeout: Duration,
    /// Set once reserved: the deadline for the body's next bytes.
    pace: Option<Pace>,
}

/// A body's pace: by `PACE_GRACE` + `timeout × received / reserved` after its reservation it
/// must have sent more than `received`.
struct Pace {
    started: tokio::time::Instant,
    reserved: u32,
    received: u64,
    /// When the body falls behind, kept up to date chunk by chunk; `sleep` is set to it only
    /// when the body has nothing new (a reset per chunk would take the timer's lock each time).
    due: tokio::time::Instant,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Pace {
    fn start(reserved: u32) -> Self {
        let started = tokio::time::Instant::now();
        Self {
            started,
            reserved: reserved.max(1),
            received: 0,
            due: started + PACE_GRACE,
            sleep: Box::pin(tokio::time::sleep_until(started + PACE_GRACE)),
        }
    }

    fn received(&mut self, bytes: usize, timeout: Duration) {
        self.received += bytes as u64;
        let share = self.received as f64 / f64::from(self.reserved);
        self.due = self.started + PACE_GRACE + timeout.mul_f64(share.min(1.0));
    }

    /// Whether the body is behind its pace now; if not, the task is woken when it would be.
    fn poll_behind(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.sleep.deadline() != self.due {
            self.sleep.as_mut().reset(self.due);
        }
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

impl hyper::body::Body for BudgetBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if let Some((_, acquiring, _)) = self.waiting.as_mut() {
            let permit = match acquiring.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(permit)) => permit,
                Poll::Ready(Err(error)) => return Poll::Ready(Some(Err(axum::Error::new(error)))),
            };
            let _ = self.held.set(permit);
            let (frame, _, _) = self.waiting.take().expect("a chunk waits");
            let mut pace = Pace::start(std::mem::take(&mut self.reserve));
            pace.received(frame.data_ref().map_or(0, |data| data.len()), self.timeout);
            self.pace = Some(pace);
            return Poll::Ready(Some(Ok(frame)));
        }
        let frame = match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Pending => {
                let contended = self.waiters.load(Ordering::Relaxed) > 0;
                if let Some(pace) = self.pace.as_mut()
                    && pace.poll_behind(cx)
                {
                    if contended {
                        return Poll::Ready(Some(Err(axum::Error::new(SlowBody))));
                    }
                    // Behind its pace, but nobody waits for its room: look again shortly.
                    pace.due = tokio::time::Instant::now() + PACE_RECHECK;
                    let _ = pace.poll_behind(cx);
                }
                return Poll::Pending;
            }
            other => return other,
        };
        let bytes = frame.data_ref().map_or(0, |data| data.len());
        let timeout = self.timeout;
        if let Some(pace) = self.pace.as_mut() {
            pace.received(bytes, timeout);
            return Poll::Ready(Some(Ok(frame)));
        }
        if bytes == 0 {
            return Poll::Ready(Some(Ok(frame)));
        }
        // The declared size, at most the body limit (which the budget is at least); ready at
        // once when the budget has room.
        let acquiring = Box::pin(self.budget.clone().acquire_many_owned(self.reserve));
        self.waiting = Some((frame, acquiring, Waiter::new(&self.waiters)));
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP socket's listen backlog: connections the kernel completes before the server accepts
/// them. std and mio (`TcpListener::bind`) use 128; a burst of more new connections than that
/// (clients reconnecting at once; the bench's open-loop client opening one per request after a
/// stall) had the rest of its SYNs dropped and sent again by TCP a second later: 186 look-ups
/// timed out at 1 s in three bench runs, as many as the kernel's `TcpExtListenOverflows`.
/// Linux caps it at `net.core.somaxconn` (4096 since 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the HTTP address with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind`).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` on `listener` until `cancel` fires, then lets requests in flight finish.
///
/// hyper directly (not `axum::serve`), so a connection that does not send its headers within
/// `header_timeout` is closed and request heads are bounded; concurrency is capped with
/// load-shedding (503, never an unbounded queue) and every request has a deadline (408).
/// Connections are capped (`max_connections`: past it, accepting waits) and each lives about
/// `connection_timeout` (see [`ServerLimits`]), so slow readers cannot hold responses and
/// sockets without bound.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    serve_counting_waiters(listener, app, limits, cancel, Arc::default()).await
}

/// [`serve`], counting in `waiters` the request bodies that wait for room in the body budget
/// (the tests watch it to know a body waits).
async fn serve_counting_waiters(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    cancel: CancellationToken,
    waiters: Arc<std::sync::atomic::AtomicUsize>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let budget = Arc::new(tokio::sync::Semaphore::new(
        limits.body_budget.max(MAX_BODY_BYTES),
    ));
    let limited = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(move |error| {
            protection_error(error, limits.request_timeout)
        }))
        .load_shed()
        .concurrency_limit(limits.max_concurrency)
        .timeout(limits.request_timeout)
        .layer(tower::layer::layer_fn(move |inner| BodyBudget {
            inner,
            budget: budget.clone(),
            timeout: limits.request_timeout,
            waiters: waiters.clone(),
        }))
        .service(app.clone());
    // Probes and metrics bypass the cap: an overloaded worker must not look dead to its
    // orchestrator (and be restarted) or go dark to its monitoring.
    // The outer router sets the probe's `MatchedPath`, and the app's own router would append
    // its match to it (`/healthz/healthz` in the request metrics): it is removed first.
    let unlimited = ServiceBuilder::new()
        .map_request(|mut request: Request| {
            request.extensions_mut().remove::<MatchedPath>();
            request
        })
        .service(app.into_service::<axum::body::Body>());
    let service = PROBES
        .iter()
        .fold(Router::new(), |service, path| {
            service.route_service(path, unlimited.clone())
        })
        .fallback_service(limited);
    let connections = tokio_util::task::TaskTracker::new();
    // Fired when the drain after a stop overruns `drain_timeout`: open connections are dropped.
    let abandon = CancellationToken::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        // At the connection cap, wait for one to close before accepting (new connections wait
        // in the kernel's listen backlog).
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = cancel.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %error, "Accepting an HTTP connection failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        // What the kernel holds unsent for a client that does not read: an answer handed to it
        // leaves the answer budget. Not SO_SNDBUF, which would also cap what is in flight to a
        // client that reads (and its throughput far away).
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(NOT_SENT_MOST);
        // Set at the connection's lifetime: from then on every answer says `Connection: close`.
        let last_call = Arc::new(AtomicBool::new(false));
        let service = TowerToHyperService::new(
            ServiceBuilder::new()
                .map_response({
                    let last_call = last_call.clone();
                    move |mut response: Response| {
                        if last_call.load(Ordering::Relaxed) {
                            response
                                .headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                        response
                    }
                })
                .service(service.clone()),
        );
        let (cancel, abandon) = (cancel.clone(), abandon.clone());
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                // Answers are queued as they are, never copied into hyper's buffer: the room of
                // a large one lives in its bytes (see `budgeted_json`). TCP writes vectored, so
                // this is hyper's choice anyway; said here so that a wrapper cannot change it.
                .writev(true)
                .header_read_timeout(limits.header_timeout)
                .max_header_size(limits.max_header_bytes);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let _slot = slot;
            let mut stopped = tokio::select! {
                result = connection.as_mut() => return log_end(result),
                _ = tokio::time::sleep(limits.connection_timeout) => false,
                _ = cancel.cancelled() => true,
            };
            if !stopped {
                // Past its lifetime the connection is not closed while idle: a request the
                // client sent meanwhile would be dropped unanswered (hyper closes an idle
                // connection at once, and the kernel resets what the client wrote). Its next
                // answer says `Connection: close` instead and hyper closes after it; a client
                // that sends nothing within `header_timeout` is shut down as below.
                last_call.store(true, Ordering::Relaxed);
                stopped = tokio::select! {
                    result = connection.as_mut() => return log_end(result),
                    _ = tokio::time::sleep(limits.header_timeout) => false,
                    _ = cancel.cancelled() => true,
                };
            }
            // Idle: closed now; mid-request: closed after its answer. After a stop it may take
            // until the drain deadline, else one `request_timeout` (a slow reader of a large
            // answer), then it is dropped.
            connection.as_mut().graceful_shutdown();
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = tokio::time::sleep(limits.request_timeout), if !stopped => return,
                _ = abandon.cancelled() => return,
            };
            log_end(result)
        });
    }
    connections.close();
    if tokio::time::timeout(limits.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "HTTP connections still open at the drain deadline after a stop; dropping them."
        );
        abandon.cancel();
        connections.wait().await;
    }
    Ok(())
}

/// How a served connection ended: an error (a client gone mid-request, say) is logged at debug.
fn log_end(result: hyper::Result<()>) {
    if let Err(error) = result {
        tracing::debug!(error = %error, "HTTP connection ended with an error.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET `path` on `stream`, keeping the connection open; what came back in one read, in
    /// lower case ("" when the server closed the connection instead of answering).
    async fn get_on(stream: &mut tokio::net::TcpStream, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = vec![0; 1024];
        let n = stream.read(&mut buffer).await.unwrap_or(0);
        String::from_utf8_lossy(&buffer[..n]).to_lowercase()
    }

    /// A server on 127.0.0.1 with `bind`, holding one connection at a time.
    fn one_connection_server() -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        server(ServerLimits {
            max_concurrency: 8,
            request_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(1),
            max_connections: 1,
            connection_timeout: Duration::from_secs(60),
            body_budget: MAX_BODY_BYTES,
        })
    }

    /// A server on 127.0.0.1 with `bind` and `limits`, answering `GET /` with "ok" at once and
    /// `GET /slow` with "slow" after three seconds.
    fn server(
        limits: ServerLimits,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "slow"
                }),
            );
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, limits, cancel.clone()));
        (addr, cancel, server)
    }

    /// Waits (5 s at most) until `n` request bodies wait for room in the body budget.
    async fn waiting_bodies(
        waiters: &std::sync::atomic::AtomicUsize,
        n: usize,
    ) -> Result<(), tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_secs(5), async {
            while waiters.load(Ordering::Relaxed) != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// Serves `app` with [`one_body_limits`], counting the bodies that wait for room.
    fn serve_one_body(
        listener: TcpListener,
        app: Router,
    ) -> (
        CancellationToken,
        Arc<std::sync::atomic::AtomicUsize>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let cancel = CancellationToken::new();
        let waiters = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = tokio::spawn(serve_counting_waiters(
            listener,
            app,
            one_body_limits(),
            cancel.clone(),
            waiters.clone(),
        ));
        (cancel, waiters, server)
    }

    /// Limits for the body-budget tests: a budget of one largest body, a 10 s request timeout.
    fn one_body_limits() -> ServerLimits {
        ServerLimits {
            max_concurrency: 8,
            request_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(1),
            max_connections: 8,
            connection_timeout: Duration::from_secs(60),
            body_budget: MAX_BODY_BYTES,
        }
    }

    /// Bodies held at once stay within the body budget (here one largest body), reserved when
    /// their first bytes arrive: a request that declared 1 MiB and sent nothing holds nothing
    /// (a few idle connections must not block every request with a body); once a 1 MiB body
    /// has begun to arrive, another request's 3 bytes wait until that request is answered, and
    /// its own last byte does not wait behind them; a request without a body is answered
    /// meanwhile.
    #[tokio::test]
    async fn requests_with_bodies_wait_for_the_body_budget() {
        use futures_util::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // The handler reports when it has received all but the last byte of a 1 MiB body.
        let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
        let body_length = move |request: Request| {
            let arrived = arrived_tx.clone();
            async move {
                let mut chunks = request.into_body().into_data_stream();
                let mut received = 0;
                while let Some(Ok(chunk)) = chunks.next().await {
                    received += chunk.len();
                    if received == MAX_BODY_BYTES - 1 {
                        let _ = arrived.send(());
                    }
                }
                received.to_string()
            }
        };
        let app = Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route("/body", axum::routing::post(body_length));
        let (cancel, waiters, server) = serve_one_body(listener, app);
        let post = |length: usize| {
            format!("POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n")
        };
        let answer = |mut stream: tokio::net::TcpStream| async move {
            // Up to the end of the body, whose length the answer's text is.
            let mut text = Vec::new();
            let mut buffer = vec![0; 1024];
            while !text.ends_with(b"\r\n\r\n") || !text.last().is_some_and(u8::is_ascii_digit) {
                let n = stream.read(&mut buffer).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&buffer[..n]);
                if text.windows(4).any(|w| w == b"\r\n\r\n")
                    && text.last().is_some_and(u8::is_ascii_digit)
                {
                    break;
                }
            }
            String::from_utf8_lossy(&text).to_lowercase()
        };
        let small = |addr| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(post(3).as_bytes()).await.unwrap();
            stream.write_all(b"abc").await.unwrap();
            stream
        };

        // Declared 1 MiB, sent nothing: holds nothing, a small body is answered at once.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(post(MAX_BODY_BYTES).as_bytes())
            .await
            .unwrap();
        let quick = tokio::time::timeout(Duration::from_secs(5), answer(small(addr).await))
            .await
            .expect("a small body is not held up by a body that never came");
        assert!(
            quick.starts_with("http/1.1 200") && quick.ends_with("\r\n3"),
            "{quick}"
        );
        drop(idle);

        // 1 MiB − 1 arrived: the budget is spent, a small body waits.
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        first
            .write_all(post(MAX_BODY_BYTES).as_bytes())
            .await
            .unwrap();
        first
            .write_all(&vec![b'a'; MAX_BODY_BYTES - 1])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), arrived.recv())
            .await
            .expect("the first body arrives but for its last byte");
        assert_eq!(waiters.load(Ordering::Relaxed), 0, "nobody waits yet");
        let second = tokio::spawn(answer(small(addr).await));
        waiting_bodies(&waiters, 1)
            .await
            .expect("the second body waits for the budget");
        let mut other = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            get_on(&mut other, "/").await.contains("200"),
            "no body, no wait"
        );
        assert!(!second.is_finished(), "the second body is not answered yet");

        first.write_all(b"a").await.unwrap();
        let first = answer(first).await;
        assert!(
            first.starts_with("http/1.1 200") && first.ends_with("1048576"),
            "{first}"
        );
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("answered once the first is")
            .unwrap();
        assert!(
            second.starts_with("http/1.1 200") && second.ends_with("\r\n3"),
            "{second}"
        );
        cancel.cancel();
        server.await.unwrap().unwrap();
    }

    /// While another body waits for room, a body that stops after its first bytes gives its room
    /// back at its pace deadline (about 2 s), long before the request timeout (10 s); a body that
    /// keeps its pace is read whole meanwhile; and with nobody waiting, a body that pauses past
    /// its pace is read on.
    #[tokio::test]
    async fn a_body_behind_its_pace_gives_its_room_back() {
        use futures_util::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // `/began` reports its first chunk (so the test knows the budget is reserved).
        let (began_tx, mut began) = tokio::sync::mpsc::unbounded_channel();
        let streamed = move |request: Request| {
            let began = began_tx.clone();
            async move {
                let mut chunks = request.into_body().into_data_stream();
                let mut received = 0;
                while let Some(chunk) = chunks.next().await {
                    match chunk {
                        Ok(chunk) => received += chunk.len(),
                        Err(_) => return "cut".to_string(),
                    }
                    let _ = began.send(());
                }
                received.to_string()
            }
        };
        let whole = |body: Result<Bytes, BytesRejection>| async move {
            match body {
                Ok(bytes) => bytes.len().to_string().into_response(),
                Err(rejection) => {
                    let (status, text) = body_rejection(&rejection);
                    ApiError::new(status, text).into_response()
                }
            }
        };
        let app = Router::new()
            .route("/began", axum::routing::post(streamed))
            .route("/body", axum::routing::post(whole));
        let (cancel, waiters, server) = serve_one_body(listener, app);
        let send = |path: &'static str, length: usize, first: Vec<u8>| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&first).await.unwrap();
            stream
        };
        let answer = |mut stream: tokio::net::TcpStream| async move {
            let mut text = Vec::new();
            let _ = stream.read_to_end(&mut text).await;
            String::from_utf8_lossy(&text).to_lowercase()
        };

        // 10 bytes of a declared 1 MiB, then nothing: the whole budget is reserved, and a small
        // body waits for it — until the stalled body falls behind its pace (about 2 s).
        let stalled = send("/began", MAX_BODY_BYTES, b"0123456789".to_vec()).await;
        tokio::time::timeout(Duration::from_secs(5), began.recv())
            .await
            .expect("the stalled body's first bytes arrive");
        let waited = std::time::Instant::now();
        let small = send("/body", 3, b"abc".to_vec()).await;
        waiting_bodies(&waiters, 1)
            .await
            .expect("the small body waits for the stalled body's room");
        let small = tokio::time::timeout(Duration::from_secs(6), answer(small))
            .await
            .expect("the stalled body gives its room back before the request timeout (10 s)");
        assert!(
            small.starts_with("http/1.1 200") && small.ends_with("\r\n\r\n3"),
            "{small}"
        );
        assert!(
            waited.elapsed() >= Duration::from_secs(1),
            "the small body waited for the room: {:?}",
            waited.elapsed()
        );
        let stalled = answer(stalled).await;
        assert!(stalled.ends_with("\r\n\r\ncut"), "{stalled}");

        // 1 MiB in four parts 0.5 s apart keeps its pace (1 MiB in 10 s) while a small body
        // waits for its room: it is read whole, then the small body is answered.
        let quarter = MAX_BODY_BYTES / 4;
        let mut steady = send("/began", MAX_BODY_BYTES, vec![b'a'; quarter]).await;
        tokio::time::timeout(Duration::from_secs(5), began.recv())
            .await
            .expect("the steady body's first bytes arrive");
        let small = send("/body", 3, b"abc".to_vec()).await;
        waiting_bodies(&waiters, 1)
            .await
            .expect("the small body waits for the steady body's room");
        for _ in 1..4 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            steady.write_all(&vec![b'a'; quarter]).await.unwrap();
        }
        let steady = answer(steady).await;
        assert!(
            steady.ends_with(&format!("\r\n\r\n{MAX_BODY_BYTES}")),
            "{steady}"
        );
        let small = answer(small).await;
        assert!(small.ends_with("\r\n\r\n3"), "{small}");
        assert_eq!(waiters.load(Ordering::Relaxed), 0, "nobody waits any more");

        // Nobody waits: a body that pauses past its pace (due 3 s after its first bytes) is
        // read on when the rest comes.
        let mut paused = send("/body", 100, vec![b'p'; 10]).await;
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        paused.write_all(&[b'p'; 90]).await.unwrap();
        let paused = answer(paused).await;
        assert!(
            paused.starts_with("http/1.1 200") && paused.ends_with("\r\n\r\n100"),
            "{paused}"
        );
        cancel.cancel();
        server.await.unwrap().unwrap();
    }

    /// A body cut for its pace is a 408 with its reason in every handler's mapping; other body
    /// failures keep axum's status.
    #[tokio::test]
    async fn a_slow_body_maps_to_408() {
        use axum::extract::FromRequest;
        let rejection = |error: Box<dyn std::error::Error + Send + Sync>| async move {
            let body =
                axum::body::Body::from_stream(futures_util::stream::iter([Err::<Bytes, _>(error)]));
            let request = Request::builder().body(body).expect("a request");
            Bytes::from_request(request, &())
                .await
                .expect_err("the body fails")
        };
        assert_eq!(
            body_rejection(&rejection(Box::new(SlowBody)).await),
            (StatusCode::REQUEST_TIMEOUT, SlowBody.to_string())
        );
        let reset = rejection(Box::new(std::io::Error::other("connection reset"))).await;
        assert_eq!(body_rejection(&reset).0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_burst_of_new_connections_past_128_waits_in_the_backlog() {
        let (addr, cancel, server) = one_connection_server();
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(get_on(&mut first, "/").await.contains("200"));
        // The kernel caps the backlog at net.core.somaxconn (4096 by default since Linux 5.4);
        // below 300 this test cannot tell our backlog from mio's 128.
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            somaxconn >= 300,
            "net.core.somaxconn is {somaxconn}: this test needs at least 300"
        );
        let n = 600.min(somaxconn);
        // The listener's backlog as the kernel holds it. With mio's 128 the SYNs past it were
        // dropped, and their connects waited for TCP's retransmission a second later (timed
        // here before, which a loaded machine can blur).
        let (_, backlog) = listen_queue(addr);
        assert!(backlog >= n, "a backlog of {backlog}, below {n}");
        // The server accepts nothing while `first` is open: n connections at once are all
        // completed by the kernel.
        let connects = (0..n).map(|_| {
            tokio::time::timeout(
                Duration::from_secs(30),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let results = futures_util::future::join_all(connects).await;
        let connected = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        let failed = results.iter().find_map(|r| match r {
            Ok(Err(error)) => Some(error.to_string()),
            _ => None,
        });
        assert_eq!(
            connected, n,
            "connected at once: {connected} of {n} (the rest timed out; a connect error: {failed:?})"
        );
        drop(results);
        drop(first);
        cancel.cancel();
        server.await.unwrap().unwrap();
    }

    /// A listening socket's queue as the kernel holds it (`ss`): connections completed and not
    /// accepted yet (Recv-Q), and the backlog (Send-Q).
    fn listen_queue(addr: std::net::SocketAddr) -> (usize, usize) {
        let ss = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{}", addr.port())])
            .output()
            .expect("run ss (Debian: iproute2)");
        let listing = String::from_utf8_lossy(&ss.stdout);
        let columns: Vec<usize> = listing
            .lines()
            .find(|line| line.contains(&addr.to_string()))
            .map(|line| {
                line.split_whitespace()
                    .skip(1)
                    .take(2)
                    .filter_map(|q| q.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        match columns[..] {
            [accept_queue, backlog] => (accept_queue, backlog),
            _ => panic!("no listener on {addr} in ss's output: {listing:?}"),
        }
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_until_one_closes() {
        let (addr, cancel, server) = one_connection_server();

        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(get_on(&mut first, "/").await.contains("200"));
        assert_eq!(listen_queue(addr).0, 0, "nothing waits to be accepted yet");
        // The second connection is in the backlog, not served, while the first stays open:
        // the server does not accept it (it would leave the kernel's queue), and its request
        // gets no answer.
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        second
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while listen_queue(addr).0 != 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the second connection waits in the kernel's queue");
        let waiting = tokio::time::timeout(Duration::from_millis(500), second.readable()).await;
        assert!(waiting.is_err(), "served past the cap: {waiting:?}");
        assert_eq!(listen_queue(addr).0, 1, "still not accepted");
        drop(first);
        let served = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buffer = vec![0; 1024];
            use tokio::io::AsyncReadExt;
            let n = second.read(&mut buffer).await.unwrap();
            String::from_utf8_lossy(&buffer[..n]).into_owned()
        })
        .await
        .expect("served once the first connection closed");
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        cancel.cancel();
        server.await.unwrap().unwrap();
    }

    /// A connection past its lifetime still answers the request its client sends next, with
    /// `Connection: close`, and then closes; a request still running when the server shuts the
    /// connection down `header_timeout` after its lifetime is answered too. Before, the server
    /// closed it at the lifetime even when idle, so a keep-alive client that reused it then had
    /// its request dropped unanswered ("closed without response": 4 of 177,695 requests of 24
    /// clients polling every 2 ms for 130 s). (A connection idle for `header_timeout` is closed
    /// by hyper's header timer, at any age.)
    #[tokio::test]
    async fn a_connection_past_its_lifetime_answers_the_next_request_then_closes() {
        use tokio::io::AsyncReadExt;
        let lifetime = Duration::from_millis(300);
        let (addr, cancel, server) = server(ServerLimits {
            max_concurrency: 8,
            request_timeout: Duration::from_secs(10),
            // Well past the idle wait below, however late a loaded machine wakes the test.
            header_timeout: Duration::from_secs(2),
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(1),
            max_connections: 8,
            connection_timeout: lifetime,
            body_budget: MAX_BODY_BYTES,
        });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = get_on(&mut stream, "/").await;
        assert!(first.starts_with("http/1.1 200"), "{first}");
        assert!(!first.contains("connection: close"), "{first}");
        // Idle past the lifetime but not for the header timeout, after which hyper closes an
        // idle connection at any age (the thing under test is the clock), then a request.
        tokio::time::sleep(lifetime * 2).await;
        let next = get_on(&mut stream, "/").await;
        assert!(
            next.starts_with("http/1.1 200"),
            "the request after the lifetime was answered: {next:?}"
        );
        assert!(next.contains("connection: close"), "{next}");
        let mut rest = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0))), "closed after it: {closed:?}");

        // A request that runs past the lifetime and the header timeout after it (3 s against
        // 300 ms + 2 s): the shutdown then waits for its answer, which says close.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let slow = get_on(&mut stream, "/slow").await;
        assert!(slow.starts_with("http/1.1 200"), "{slow}");
        assert!(slow.contains("connection: close"), "{slow}");
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0))), "closed after it: {closed:?}");
        cancel.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn events_parse_as_array_or_ndjson_and_name_the_first_bad_one() {
        let array = br#"[{"domain":"A.example.","type":"delivered"},{"domain":"b.example","type":"bounced","extra":1}]"#;
        let events = parse_events(array).unwrap().events;
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].domain, "a.example");
        let ndjson = b"{\"domain\":\"a.example\",\"type\":\"delivered\"}\n\n{\"domain\":\"b.example\",\"type\":\"bounced\"}\n";
        assert_eq!(parse_events(ndjson).unwrap().events.len(), 2);
        // A file saved with a byte order mark (RFC 8259 §8.1): its first line was refused.
        let with_bom = [b"\xEF\xBB\xBF".as_slice(), ndjson].concat();
        assert_eq!(parse_events(&with_bom).unwrap().events.len(), 2);
        let bad = b"{\"domain\":\"a.example\",\"type\":\"delivered\"}\n[1]\n";
        assert!(parse_events(bad).unwrap_err().starts_with("line 2"));
        // One object over several lines (`curl -d @event.json`): one event, not "line 1: …".
        let pretty = b"{\n  \"domain\": \"a.example\",\n  \"type\": \"bounced\"\n}\n";
        let events = parse_events(pretty).unwrap().events;
        assert_eq!((events.len(), events[0].domain.as_str()), (1, "a.example"));
        let pretty_bad = b"{\n  \"domain\": \"a.example\",\n  \"type\": \"x\"\n}";
        assert!(parse_events(pretty_bad).unwrap_err().starts_with("event 1"));
        assert!(
            parse_events(br#"[{"domain":"a.example","type":"x"}]"#)
                .unwrap_err()
                .starts_with("event 1")
        );
        assert!(parse_events(b"  ").is_err());
        assert!(parse_events(b"[[{\"domain\":\"a.example\",\"type\":\"delivered\"}]]").is_err());
        // An array is refused at its 10,001st item, before the rest is read; at 10,000 it is
        // parsed as usual.
        let event = r#"{"domain":"a.example","type":"delivered"}"#;
        let many = |n: usize, item: &str| format!("[{}]", vec![item; n].join(","));
        assert_eq!(
            parse_events(many(10_000, event).as_bytes())
                .unwrap()
                .events
                .len(),
            10_000
        );
        for (n, item) in [(10_001, event), (500_000, "0")] {
            assert_eq!(
                parse_events(many(n, item).as_bytes()).unwrap_err(),
                "more than 10000 events"
            );
        }
        // The same rules as NDJSON and the wire format: a repeated key is an error.
        let repeated = br#"[{"domain":"a.example","type":"delivered","type":"bounced"}]"#;
        assert!(parse_events(repeated).unwrap_err().starts_with("event 1"));
        // A KumoMTA record of a batch (`BatchByDomain`): an event per recipient, on each path
        // (only the last recipient's was kept); past 10,000 events in all, refused.
        let batch = r#"{"type":"Delivery","recipient":["a@k.example","b@k.example"],"response":{"code":250}}"#;
        for body in [
            format!("{batch}\n{event}\n"),
            format!("[{batch},{event}]"),
            batch.replace(',', ",\n"),
        ] {
            let events = parse_events(body.as_bytes()).unwrap().events;
            assert!(events.len() >= 2, "{body}: {events:?}");
            assert_eq!(events[0].domain, "k.example", "{body}");
            assert_eq!(events[1].domain, "k.example", "{body}");
        }
        let body = format!("{}\n{batch}\n", vec![event; 9_999].join("\n"));
        assert_eq!(
            parse_events(body.as_bytes()).unwrap_err(),
            "more than 10000 events"
        );
        // Records without a domain are no events: 10,000 such recipients and one event are
        // one event, as NDJSON and as an array (NDJSON counted them, and refused the body).
        let nobody =
            serde_json::json!({"type": "Delivery", "recipient": vec!["postmaster"; 10_000],
            "response": {"code": 250}})
            .to_string();
        for body in [
            format!("{nobody}\n{event}\n"),
            format!("[{nobody},{event}]"),
        ] {
            let parsed = parse_events(body.as_bytes()).unwrap();
            assert_eq!((parsed.events.len(), parsed.ignored), (1, 10_000));
        }
    }

    #[test]
    fn statuses_parse_in_both_spellings() {
        assert_eq!(parse_status("catch-all"), Ok(Status::CatchAll));
        assert_eq!(parse_status("not-catch-all"), Ok(Status::NotCatchAll));
        assert_eq!(parse_status("not catch-all"), Ok(Status::NotCatchAll));
        assert_eq!(parse_status("unknown"), Ok(Status::Unknown));
        assert!(parse_status("catchall").is_err());
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }
}
