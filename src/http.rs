//! The HTTP server (SPEC §5): domain status, health, readiness and metrics.

use crate::event::{Status, normalize_domain};
use crate::health::Health;
use crate::metrics;
use crate::store::Store;
use axum::extract::rejection::PathRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Set when `store` is a replica (`STATUS_DATABASE_URL`).
    pub replica: Option<crate::replica::ReadFromReplica>,
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    /// Deliveries above which a never-bounced domain is catch-all.
    pub threshold: i64,
}

/// Every route, with request metrics around them.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/domains/{domain}", get(domain_status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track))
        .layer(middleware::from_fn(crate::trace_http::trace))
        .with_state(state)
}

/// An error answer: `{"error": "…"}` with a status code.
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
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
    let domain = normalize_domain(&raw).map_err(|reason| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid domain: {reason}"))
    })?;
    let counts = state.store.lookup(&domain).await.map_err(|error| {
        tracing::warn!(
            error = format!("{:#}", anyhow::Error::new(error)),
            "Status look-up failed."
        );
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is unavailable",
        )
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
    let mut servers = Vec::new();
    if let Some(replica) = &state.replica {
        servers.push(("Postgres".to_string(), &replica.primary));
        servers.push((format!("Postgres replica {}", replica.name), &state.store));
    } else {
        servers.push(("Postgres".to_string(), &state.store));
    }
    for (name, store) in servers {
        match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(unavailable(format!(
                    "{name}: {:#}",
                    anyhow::Error::new(error)
                )));
            }
            Err(_) => return Err(unavailable(format!("{name}: no answer within 2 s"))),
        }
    }
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
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
