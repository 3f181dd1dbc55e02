//! Traces: with an OTLP endpoint configured, the worker exports a span per HTTP request, with
//! its route, method and status, continuing the caller's W3C `traceparent`. The receiver is an
//! OTLP/HTTP endpoint inside the test that decodes what arrives with the OTLP protobuf types.

use crate::helpers::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every span received, with its resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on a free port; returns its `/v1/traces` URL and what it received.
async fn otlp_receiver() -> (String, Received) {
    async fn traces(State(received): State<Received>, body: Bytes) -> impl IntoResponse {
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
        };
        let mut received = received.lock().expect("lock");
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| string_value(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push((service.clone(), span));
                }
            }
        }
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response()
    }
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(received.clone());
    let url = format!("http://{}/v1/traces", serve(app).await);
    (url, received)
}

fn string_value(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_exported_as_spans_continuing_the_callers_trace() {
    let (endpoint, received) = otlp_receiver().await;
    // Before the worker starts, so that this is the process' subscriber (nextest runs each
    // test in a process of its own).
    let telemetry = catchall::telemetry::init_with(
        Some(catchall::config::LogFormat::Pretty),
        Some(Some(endpoint)),
    );
    assert!(telemetry.traces_enabled(), "traces are on");
    let (_db, _broker, worker) = started().await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let client = reqwest::Client::new();
    let response = client
        .get(worker.url("/domains/Example.COM"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .send()
        .await
        .expect("GET /domains/Example.COM");
    assert_eq!(response.status(), 200);
    let response = client
        .get(worker.url("/domains/not_a_domain"))
        .send()
        .await
        .expect("GET an invalid domain");
    assert_eq!(response.status(), 400);
    // A caller's "not sampled" flag does not drop our span (any client may send one, before
    // its token is checked), and its tracestate is not copied.
    let unsampled_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let response = client
        .get(worker.url("/domains/example.org"))
        .header(
            "traceparent",
            format!("00-{unsampled_trace}-{caller_span}-00"),
        )
        .header("tracestate", format!("caller={}", "x".repeat(200)))
        .send()
        .await
        .expect("GET with an unsampled traceparent");
    assert_eq!(response.status(), 200);
    // A long path is recorded cut, and a method of the caller's own is `_OTHER`.
    let long_path = format!("/{}", "p".repeat(5_000));
    let response = client
        .request(
            reqwest::Method::from_bytes(b"FROB").expect("a method"),
            worker.url(&long_path),
        )
        .send()
        .await
        .expect("FROB a long path");
    assert!(response.status().is_client_error(), "{}", response.status());

    telemetry.flush();
    let spans = wait_for(
        Duration::from_secs(20),
        "the request spans at the OTLP receiver",
        || {
            let received = received.clone();
            async move {
                let received = received.lock().expect("lock");
                let lookups: Vec<(String, Span)> = received
                    .iter()
                    .filter(|(_, span)| span.name == "GET /domains/{domain}" || span.name == "HTTP")
                    .cloned()
                    .collect();
                (lookups.len() >= 4).then_some(lookups)
            }
        },
    )
    .await;
    let (_, unsampled) = spans
        .iter()
        .find(|(_, span)| hex(&span.trace_id) == unsampled_trace)
        .expect("the span of the request whose caller did not sample");
    assert_eq!(hex(&unsampled.parent_span_id), caller_span);
    assert_eq!(
        unsampled.trace_state, "",
        "the caller's tracestate is not kept"
    );
    let (_, other) = spans
        .iter()
        .find(|(_, span)| span.name == "HTTP")
        .expect("the span of the FROB request");
    assert_eq!(
        attribute(other, "http.request.method"),
        Some(Value::StringValue("_OTHER".into()))
    );
    assert_eq!(
        attribute(other, "url.path"),
        Some(Value::StringValue(long_path[..256].to_string())),
        "the path cut to 256 bytes"
    );

    // The request that carried a traceparent continues that trace, as a child of the caller.
    let (service, continued) = spans
        .iter()
        .find(|(_, span)| hex(&span.trace_id) == trace_id)
        .expect("a span in the caller's trace");
    assert!(!service.is_empty(), "the resource names the service");
    assert_eq!(hex(&continued.parent_span_id), caller_span);
    assert_eq!(continued.kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(continued, "http.route"),
        Some(Value::StringValue("/domains/{domain}".into()))
    );
    assert_eq!(
        attribute(continued, "http.request.method"),
        Some(Value::StringValue("GET".into()))
    );
    assert_eq!(
        attribute(continued, "url.path"),
        Some(Value::StringValue("/domains/Example.COM".into()))
    );
    assert_eq!(
        attribute(continued, "http.response.status_code"),
        Some(Value::IntValue(200))
    );
    assert!(continued.end_time_unix_nano >= continued.start_time_unix_nano);

    // The request without one starts a trace of its own, and records its 400.
    let (_, fresh) = spans
        .iter()
        .find(|(_, span)| {
            span.name == "GET /domains/{domain}"
                && ![trace_id, unsampled_trace].contains(&hex(&span.trace_id).as_str())
        })
        .expect("a span in a new trace");
    assert!(fresh.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        attribute(fresh, "http.response.status_code"),
        Some(Value::IntValue(400))
    );

    worker.stop().await;
    telemetry.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_sends_the_traceparent_of_its_exported_publish_span() {
    // The base URL: the exporter appends `/v1/traces`.
    producer_exports_its_publish_spans(|endpoint| {
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            endpoint.trim_end_matches("/v1/traces").to_string(),
        )
    })
    .await;
}

/// The signal's own variable alone turns traces on (the OpenTelemetry specification's
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, the full URL, used as given).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traces_endpoint_variable_alone_turns_traces_on() {
    producer_exports_its_publish_spans(|endpoint| {
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.to_string())
    })
    .await;
}

/// Runs `catchall-producer send` with the variable `configure` returns for the receiver's
/// `…/v1/traces` URL (and no other endpoint variable), and checks each message's
/// `traceparent` names a `publish` span the receiver got.
async fn producer_exports_its_publish_spans(configure: impl Fn(&str) -> (&'static str, String)) {
    let (endpoint, received) = otlp_receiver().await;
    let (variable, value) = configure(&endpoint);
    let broker = TestBroker::new();
    let output = tokio::process::Command::new(binary("catchall-producer"))
        .envs(broker.env())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env(variable, value)
        .env_remove("OTEL_SERVICE_NAME")
        .args(["send", "example.com", "delivered", "--count", "2"])
        .output()
        .await
        .expect("run catchall-producer send");
    assert!(
        output.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // What a worker would read from each delivery.
    let (_connection, channel) = broker.channel().await;
    let mut parents = Vec::new();
    while let Some(message) = channel
        .basic_get(
            broker.queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let headers = message
            .properties
            .headers()
            .clone()
            .expect("the message carries headers");
        let parent =
            catchall::telemetry::remote_parent(&headers).expect("a valid traceparent header");
        use opentelemetry::trace::TraceContextExt;
        let span = parent.span().span_context().clone();
        parents.push((span.trace_id().to_string(), span.span_id().to_string()));
    }
    assert_eq!(parents.len(), 2, "both messages");
    assert_ne!(parents[0], parents[1], "a publish span per message");

    // The producer flushed its spans on exit: each header names an exported `publish` span.
    let received = received.lock().expect("lock");
    for (trace_id, span_id) in &parents {
        let (service, span) = received
            .iter()
            .find(|(_, span)| hex(&span.span_id) == *span_id)
            .unwrap_or_else(|| panic!("span {span_id} exported"));
        assert_eq!(service, "catchall-producer");
        assert_eq!(span.name, "publish");
        assert_eq!(hex(&span.trace_id), *trace_id);
        assert_eq!(span.kind, SpanKind::Producer as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_span_links_the_publishers_trace_and_carries_its_counts() {
    let (endpoint, received) = otlp_receiver().await;
    let telemetry = catchall::telemetry::init_with(
        Some(catchall::config::LogFormat::Pretty),
        Some(Some(endpoint)),
    );
    assert!(telemetry.traces_enabled(), "traces are on");
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let mut config = TestWorker::config(&db, &broker);
    // Only a full batch of 2 events closes one: the invalid message and the valid one (2
    // events) published after it are gathered into the same batch.
    config.batch_size = 2;
    config.batch_timeout_ms = 60_000;
    let worker = TestWorker::start(config).await;
    worker.ready().await;

    // One invalid message, then one with a publisher's traceparent, in one batch.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let publish_span = "b7ad6b7169203331";
    let (_connection, channel) = broker.channel().await;
    channel
        .basic_publish(
            broker.exchange.as_str().into(),
            "delivered".into(),
            lapin::options::BasicPublishOptions::default(),
            b"not json",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(format!("00-{trace_id}-{publish_span}-01").into()),
    );
    let properties = lapin::BasicProperties::default()
        .with_message_id("traced".into())
        .with_headers(headers);
    channel
        .basic_publish(
            broker.exchange.as_str().into(),
            "delivered".into(),
            lapin::options::BasicPublishOptions::default(),
            br#"[{"domain":"traced.example","type":"delivered"},{"domain":"traced.example","type":"bounced"}]"#,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    wait_for(Duration::from_secs(20), "the message counted", || async {
        db.counts()
            .await
            .contains_key("traced.example")
            .then_some(())
    })
    .await;

    let batch = wait_for(
        Duration::from_secs(20),
        "the batch span at the OTLP receiver",
        || {
            telemetry.flush();
            let received = received.clone();
            async move {
                let received = received.lock().expect("lock");
                received
                    .iter()
                    .map(|(_, span)| span)
                    .find(|span| {
                        span.name == "batch"
                            && span
                                .links
                                .iter()
                                .any(|link| hex(&link.trace_id) == trace_id)
                    })
                    .cloned()
            }
        },
    )
    .await;
    let link = batch
        .links
        .iter()
        .find(|link| hex(&link.trace_id) == trace_id)
        .expect("the publisher's trace linked");
    assert_eq!(
        hex(&link.span_id),
        publish_span,
        "linked to the publish span"
    );
    assert_eq!(batch.kind, SpanKind::Consumer as i32);
    assert_eq!(attribute(&batch, "messages"), Some(Value::IntValue(1)));
    assert_eq!(attribute(&batch, "events"), Some(Value::IntValue(2)));
    assert_eq!(attribute(&batch, "applied"), Some(Value::IntValue(1)));
    assert_eq!(attribute(&batch, "duplicates"), Some(Value::IntValue(0)));
    assert_eq!(attribute(&batch, "rejected"), Some(Value::IntValue(1)));

    // Its steps are its children.
    let received = received.lock().expect("lock").clone();
    let children: Vec<&str> = received
        .iter()
        .map(|(_, span)| span)
        .filter(|span| span.trace_id == batch.trace_id && span.parent_span_id == batch.span_id)
        .map(|span| span.name.as_str())
        .collect();
    for step in ["gather", "apply", "ack"] {
        assert!(children.contains(&step), "{step} in {children:?}");
    }
    worker.stop().await;
    telemetry.shutdown();
}

/// A collector that accepts connections and never answers holds the exit at most
/// `FLUSH_TIMEOUT` (2 s) after the stop: the SDK's default of 5 s came on top of
/// `SHUTDOWN_TIMEOUT` and used up compose's grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_does_not_answer_delays_the_exit_by_the_flush_timeout_at_most() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    // Bound and listening, never accepting: the kernel completes the handshakes, nothing answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}/v1/traces", silent.local_addr().expect("address"));
    let settings = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint),
        ("SHUTDOWN_TIMEOUT", "4s".into()),
    ];
    let (mut worker, port) = spawn_on_a_port(worker_command(&db, &broker, &settings)).await;
    // Spans to export: one per request.
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/domains/example.com"))
            .send()
            .await
            .expect("GET a status");
        assert_eq!(answer.status(), 200);
    }
    let (status, took) = sigterm(&mut worker, Duration::from_secs(15)).await;
    eprintln!("stopped in {took:?}");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < catchall::telemetry::FLUSH_TIMEOUT + Duration::from_millis(2500),
        "an idle worker's stop plus the flush took {took:?}"
    );
    // The exporter did try the collector (a worker exporting nothing would pass the above).
    silent.set_nonblocking(true).expect("non-blocking");
    assert!(
        silent.accept().is_ok(),
        "the exporter connected to the collector"
    );
}

/// Serves `app` on a free port of 127.0.0.1 in the background; its address.
async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A worker binary on `settings`, and its log's lines.
fn logging_worker(
    db: &TestDb,
    broker: &TestBroker,
    settings: &[(&str, String)],
) -> (tokio::process::Child, LogLines) {
    let mut worker = worker_command(db, broker, settings)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the worker binary");
    let lines = stderr_lines(&mut worker);
    (worker, lines)
}

/// A collector that refuses every export is logged: the SDK's own log lines are compiled out,
/// so before, nothing followed "Exporting traces over OTLP/HTTP.".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_exports_are_logged() {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(|| async { StatusCode::UNAUTHORIZED }),
    );
    let endpoint = format!("http://{}/v1/traces", serve(app).await);
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let settings = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)];
    let (mut worker, mut log) = logging_worker(&db, &broker, &settings);
    let started = log_line(&mut log, "Worker starting.", None, Duration::from_secs(30)).await;
    let http = serde_json::from_str::<serde_json::Value>(&started).expect("a JSON line")["http"]
        .as_str()
        .expect("the HTTP address")
        .to_string();
    // Spans to export: one per request.
    for _ in 0..3 {
        let answer = reqwest::get(format!("http://{http}/domains/example.com"))
            .await
            .expect("GET a status");
        assert_eq!(answer.status(), 200);
    }
    let line = log_line(
        &mut log,
        "Exporting traces failed",
        None,
        Duration::from_secs(30),
    )
    .await;
    assert!(line.contains("401"), "the status named: {line}");
    let _ = worker.kill().await;
}

/// An OTLP endpoint the exporter cannot parse is named in its error, redacted: the password
/// in it was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_otlp_endpoint_is_logged_without_its_password() {
    let db = TestDb::create().await;
    let broker = TestBroker::new();
    let settings = [(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://collector:pa ss-word@otel.example:4318".to_string(),
    )];
    let (mut worker, mut log) = logging_worker(&db, &broker, &settings);
    let line = log_line(
        &mut log,
        "Traces are off.",
        Some("pa ss-word"),
        Duration::from_secs(30),
    )
    .await;
    assert!(line.contains("collector:***@otel.example"), "{line}");
    let _ = worker.kill().await;
}
