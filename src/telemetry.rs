//! Logging and traces: key/value `tracing` events (JSON for machines, pretty for people), and
//! OpenTelemetry spans over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! Without either variable no exporter, propagator or span layer is installed, and the HTTP
//! middleware ([`crate::trace_http`]) creates no span: traces cost nothing unless asked for.

use crate::config::LogFormat;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The W3C Trace Context header (https://www.w3.org/TR/trace-context/).
pub const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

static TRACES_ON: AtomicBool = AtomicBool::new(false);

/// Errors setting traces up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid OTLP exporter configuration")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How long the spans left at exit may take to go out.
pub const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Telemetry {
    /// Whether spans are exported.
    pub fn traces_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans buffered so far (the batch exporter otherwise sends every few seconds).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            tracing::warn!(error = %error, "Flushing traces failed.");
        }
    }

    /// Flushes and stops the exporter (at the end of `main`), within [`FLUSH_TIMEOUT`]. The
    /// SDK's own default, 5 s, came after `SHUTDOWN_TIMEOUT`: with a collector that does not
    /// answer, a stop took 10 + 5 s, the whole of compose's 15 s grace before SIGKILL.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!(error = %error, "Stopping the trace exporter failed.");
        }
    }
}

/// Whether a span exporter is installed in this process (cheap; for hot paths).
pub fn traces_enabled() -> bool {
    TRACES_ON.load(Ordering::Relaxed)
}

/// Installs the global subscriber. `RUST_LOG` sets the levels (default `info`); traces go out
/// by OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set and not empty (the first wins, as the OpenTelemetry
/// specification says), with the other standard `OTEL_*` variables (`OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, …) honoured by the exporter.
pub fn init(format: Option<LogFormat>) -> Telemetry {
    let set = |name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let traces = (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .then_some(None);
    init_with(format, traces)
}

/// The log filter of `RUST_LOG`, `info` when it is unset or empty; an error naming it when it
/// does not parse (the binaries check it before [`init`], as a usage error: a bad directive
/// fell back to `info` silently).
pub fn log_filter() -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::INFO.into())
        .from_env()
        .map_err(|error| format!("RUST_LOG: {error}"))
}

/// [`init`] with the traces chosen by the caller: `None` for none, `Some(None)` for the
/// endpoint from the environment, `Some(Some(url))` for OTLP/HTTP to exactly `url` (the full
/// `…/v1/traces` URL; tests use it).
pub fn init_with(format: Option<LogFormat>, traces: Option<Option<String>>) -> Telemetry {
    let filter = log_filter().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // The endpoints the exporter may name in an error, to redact them (an endpoint it cannot
    // parse is quoted whole, with any password in it).
    let mut endpoints: Vec<String> = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|name| std::env::var(name).ok())
    .collect();
    endpoints.extend(traces.clone().flatten());
    let (provider, setup_error) = match traces.map(tracer_provider) {
        None => (None, None),
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(error)) => (None, Some(error)),
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
    });
    // A second init (tests embedding the worker) keeps the first subscriber.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    if let Some(error) = setup_error {
        tracing::error!(
            error = redact_endpoints(&format!("{:#}", anyhow::Error::new(error)), &endpoints),
            "Traces are off."
        );
    }
    if !installed {
        return Telemetry::default();
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        TRACES_ON.store(true, Ordering::Relaxed);
        tracing::info!("Exporting traces over OTLP/HTTP.");
    }
    Telemetry { provider }
}

fn tracer_provider(endpoint: Option<String>) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        // The binary's name: `catchall` or `catchall-producer`.
        let name = std::env::current_exe()
            .ok()
            .and_then(|path| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| env!("CARGO_PKG_NAME").to_string());
        resource = resource.with_service_name(name);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(Logged {
            inner: exporter.build()?,
            failing: AtomicU64::new(0),
        })
        .with_resource(resource.build())
        .build())
}

/// `text` with every one of `endpoints` in it replaced by its redacted form.
fn redact_endpoints(text: &str, endpoints: &[String]) -> String {
    endpoints
        .iter()
        .filter(|endpoint| !endpoint.is_empty())
        .fold(text.to_string(), |text, endpoint| {
            text.replace(endpoint.as_str(), &crate::config::redact_url(endpoint))
        })
}

/// How many failed exports in a row are logged once (about 5 minutes of the batch exporter's
/// 5 s schedule).
const EXPORT_FAILURES_PER_LOG: u64 = 60;

/// The OTLP exporter, its failures logged. The SDK's own log lines are compiled out (its
/// `internal-logs` feature is off), so a collector that refused every export (down, a 401 for a
/// wrong `OTEL_EXPORTER_OTLP_HEADERS`, a 404 for a wrong path) showed nothing after "Exporting
/// traces over OTLP/HTTP.". The first failure is logged, then one in
/// [`EXPORT_FAILURES_PER_LOG`], and the first success after them. The exporter's errors name no
/// URL ("network error", a status code).
#[derive(Debug)]
struct Logged<E> {
    inner: E,
    /// Failed exports since the last one that went through.
    failing: AtomicU64,
}

impl<E: SpanExporter> SpanExporter for Logged<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                let failed = self.failing.swap(0, Ordering::Relaxed);
                if failed > 0 {
                    tracing::info!(failed_exports = failed, "Exporting traces again.");
                }
            }
            Err(error) => {
                let failed = self.failing.fetch_add(1, Ordering::Relaxed) + 1;
                if failed % EXPORT_FAILURES_PER_LOG == 1 {
                    tracing::warn!(
                        error = %error,
                        spans,
                        failed_exports = failed,
                        "Exporting traces failed: these spans are lost."
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The publisher's trace context carried by a message's `traceparent` header, so the work on
/// the message continues the publisher's trace. `None` when the header is absent, not a
/// string, not UTF-8 or not a valid W3C `traceparent`. As [`remote_context`] keeps it.
pub fn remote_parent(headers: &FieldTable) -> Option<Context> {
    remote_context(&AmqpHeaders(headers))
}

/// A caller's W3C trace context (an HTTP request's or a message's headers) as the parent of
/// our spans: its trace and span ids only. Its sampled flag is not obeyed: the sampler follows
/// the parent, so a `traceparent` ending in `-00`, which any HTTP client may send before its
/// token is checked, dropped the request's spans (a forged webhook could hide its own). Its
/// `tracestate` is not kept: up to 32 entries of the caller's choosing (about 16 KiB), copied
/// into every span and link while the exporter's queue holds them.
pub fn remote_context(headers: &dyn Extractor) -> Option<Context> {
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
    let extracted = TraceContextPropagator::new().extract(headers);
    let caller = extracted.span().span_context().clone();
    caller.is_valid().then(|| {
        Context::new().with_remote_span_context(SpanContext::new(
            caller.trace_id(),
            caller.span_id(),
            TraceFlags::SAMPLED,
            true,
            TraceState::NONE,
        ))
    })
}

/// Headers for a message this process publishes: a `publish` span (a child of the current span,
/// if any) is started and its W3C `traceparent` (and `tracestate`) returned, so the consumer's
/// work continues this trace. `None` when traces are off.
pub fn trace_headers() -> Option<FieldTable> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !traces_enabled() {
        return None;
    }
    let span = tracing::info_span!("publish", otel.kind = "producer");
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut injected = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut injected);
    let mut headers = FieldTable::default();
    for (key, value) in injected {
        headers.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    Some(headers)
}

/// Reads W3C trace headers from AMQP message headers.
struct AmqpHeaders<'a>(&'a FieldTable);

impl Extractor for AmqpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self
            .0
            .inner()
            .iter()
            .find(|(name, _)| name.as_str().eq_ignore_ascii_case(key))
            .map(|(_, value)| value)?;
        let bytes: &[u8] = match value {
            AMQPValue::LongString(text) => text.as_bytes(),
            AMQPValue::ShortString(text) => text.as_str().as_bytes(),
            _ => return None,
        };
        std::str::from_utf8(bytes).ok()
    }

    fn keys(&self) -> Vec<&str> {
        [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter(|key| self.get(key).is_some())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(TRACEPARENT.into(), value);
        table
    }

    #[test]
    fn a_valid_traceparent_becomes_the_remote_parent() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote_parent(&headers(AMQPValue::LongString(header.into())))
            .expect("a valid traceparent");
        let span = context.span().span_context().clone();
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_remote() && span.is_sampled());
        let short = remote_parent(&headers(AMQPValue::ShortString(header.into())));
        assert!(short.is_some(), "a short string works too");
    }

    #[test]
    fn a_callers_sampled_flag_and_tracestate_are_not_kept() {
        let mut table = headers(AMQPValue::LongString(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into(),
        ));
        table.insert(
            TRACESTATE.into(),
            AMQPValue::LongString(format!("big={}", "x".repeat(200)).into()),
        );
        let context = remote_parent(&table).expect("a valid traceparent");
        let span = context.span().span_context().clone();
        assert_eq!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_sampled(), "sampled whatever the caller says");
        assert_eq!(span.trace_state().header(), "", "no tracestate");
    }

    #[test]
    fn endpoints_in_errors_are_redacted() {
        let endpoint = "http://u:pa ss@collector:4318".to_string();
        let error = format!("invalid endpoint '{endpoint}': invalid uri character");
        let redacted = redact_endpoints(&error, &[endpoint, String::new()]);
        assert!(!redacted.contains("pa ss"), "{redacted}");
        assert!(redacted.contains("u:***@collector:4318"), "{redacted}");
    }

    #[test]
    fn anything_else_is_no_parent() {
        assert!(remote_parent(&FieldTable::default()).is_none());
        for bad in [
            AMQPValue::LongString("not a traceparent".into()),
            AMQPValue::LongString("00-00000000000000000000000000000000-00f067aa0ba902b7-01".into()),
            AMQPValue::LongString(
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-\xff\xfe-01"
                    .to_vec()
                    .into(),
            ),
            AMQPValue::LongLongInt(42),
            AMQPValue::Boolean(true),
        ] {
            assert!(remote_parent(&headers(bad.clone())).is_none(), "{bad:?}");
        }
    }
}
