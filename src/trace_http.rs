//! A span per HTTP request (OpenTelemetry HTTP server conventions), continuing the caller's
//! trace when the request carries a W3C `traceparent` header. A no-op unless traces are on.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry_http::HeaderExtractor;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Axum middleware: `router.layer(axum::middleware::from_fn(trace_http::trace))`. The span is
/// named after the route template (`GET /domains/{domain}`), never the raw path, and the query
/// string (which could hold a token) is not recorded.
pub async fn trace(request: Request, next: Next) -> Response {
    if !crate::telemetry::traces_enabled() {
        return next.run(request).await;
    }
    // A method of the caller's own spelling is `_OTHER` (the HTTP conventions): a span name
    // and attribute are not the caller's to choose.
    let method = match request.method().as_str() {
        known @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
        | "PATCH") => known.to_owned(),
        _ => "_OTHER".to_owned(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    // The HTTP conventions: `{method} {route}`, the method alone without a route, and `HTTP`
    // for an `_OTHER` method.
    let name = match &route {
        _ if method == "_OTHER" => "HTTP".to_owned(),
        Some(route) => format!("{method} {route}"),
        None => method.clone(),
    };
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = route.as_deref().unwrap_or(""),
        url.path = %truncated(request.uri().path(), MAX_PATH),
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(parent) = crate::telemetry::remote_context(&HeaderExtractor(request.headers())) {
        let _ = span.set_parent(parent);
    }
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// The most of a request's path a span records: hyper takes request lines up to the header
/// limit (64 KiB), and a span waits in the exporter's queue (2,048 of them) while a collector is
/// slow, so a path of the caller's length made each unanswered request hold its whole path.
const MAX_PATH: usize = 256;

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_paths_are_cut_at_a_character_boundary() {
        assert_eq!(super::truncated("/domains/a.com", 256), "/domains/a.com");
        assert_eq!(super::truncated("/éé", 2), "/");
        assert_eq!(super::truncated("/éé", 3), "/é");
        assert_eq!(super::truncated(&"x".repeat(70_000), 256).len(), 256);
    }
}
