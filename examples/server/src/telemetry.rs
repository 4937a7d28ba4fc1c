//! Prometheus metrics: every matched route's requests by method, route template and status, and
//! their latency as a histogram; plus the domain's counters (billing webhooks by outcome, syncs
//! by status, insight generations by provider). `GET /metrics` renders them. Route templates,
//! never paths, are labels: no user or connection id reaches the metrics.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, seconds.
const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use ([`crate::app`] makes that the
/// router's construction, before any request); `None` when another recorder was installed first
/// (an embedding application's): then `/metrics` says so.
pub fn prometheus() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no Prometheus recorder: /metrics is unavailable");
                    None
                }
            }
        })
        .clone()
}

/// Every metric's `# HELP` line (the recorder renders what is described to it).
fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_histogram!(
        "revpilot_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to answer a request, by method and route template."
    );
    describe_counter!(
        "revpilot_http_requests_total",
        "Requests answered, by method, route template and status."
    );
    describe_counter!(
        "revpilot_cross_origin_refused_total",
        "State-changing requests refused because they came from another site."
    );
    describe_counter!(
        "revpilot_auth_busy_total",
        "Sign-ups and log-ins answered 503 because every password-hashing slot stayed busy."
    );
    revpilot_stripe::describe_metrics();
}

/// The method as a label: one of the standard methods or `other`, so that a client inventing
/// methods cannot add series to the metrics.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    let known = STANDARD.into_iter().find(|m| *m == method.as_str());
    known.unwrap_or("other")
}

/// Counts and times one request (a `route_layer`, so the route template is known).
pub(crate) async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(
        "revpilot_http_request_duration_seconds",
        "method" => method,
        "route" => route.clone()
    )
    .record(start.elapsed().as_secs_f64());
    metrics::counter!(
        "revpilot_http_requests_total",
        "method" => method,
        "route" => route,
        "status" => status
    )
    .increment(1);
    response
}

/// `GET /metrics`: the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 503, description = "Another recorder is installed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn render() -> Response {
    match prometheus() {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => crate::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics_unavailable",
            "another metrics recorder is installed in this process",
        ),
    }
}
