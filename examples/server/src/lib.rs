//! The RevPilot example server, as a library: [`app`] builds the router over an [`AppState`], so
//! tests drive it without a socket and `main.rs` only reads configuration and serves it.
//!
//! It serves the JSON API over the library (`/api/metrics`, `/api/insights`, `/api/scenarios`,
//! `/api/usage/current`, `/api/create-checkout`, Connect, the cron's sync trigger), the Stripe
//! billing webhook (`POST /api/webhooks/stripe-billing`), built-in accounts and JWT sessions,
//! the dashboard pages, and the demo; by default the worker runs in the same process.

pub mod api;
pub mod auth;
pub mod charts;
pub mod connect;
pub mod demo;
pub mod guard;
pub mod openapi;
pub mod pages;
pub mod serve;
pub mod telemetry;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use revpilot_core::guard::{Refusal, RefusalKind};
use revpilot_core::ports::UserId;
use revpilot_store::auth::Sessions;
use revpilot_stripe::App;
use revpilot_stripe::billing::WebhookConfig;
use serde_json::json;
use url::Url;

pub use revpilot_store::auth::sessions::ATTEMPTS_PER_MINUTE;
pub use revpilot_worker::{Clock, Job, Store};

/// What the handlers share: the library's use cases, accounts and sessions, and what is the
/// server's own (its URL, its proxies, demo mode). Clones share the library's state.
#[derive(Clone)]
pub struct AppState {
    /// The use cases ([`revpilot_stripe::app`]).
    pub app: App,
    /// Accounts and sessions ([`revpilot_store::auth::Sessions`]).
    pub sessions: Sessions,
    /// Where the app is served: the origin its pages post from, Checkout's and Connect's
    /// return URLs.
    pub app_url: Url,
    /// Reverse proxies whose `X-Forwarded-For` names the client (`REVPILOT_TRUSTED_PROXIES`);
    /// empty by default: the TCP peer is the client.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Demo mode's login, shown on the log-in page; `None` outside demo mode.
    pub demo: Option<DemoLogin>,
}

/// The state as the handlers hold it.
pub type Shared = State<Arc<AppState>>;

/// The demo user's credentials (demo mode prints them; `GET /demo` logs in as them).
#[derive(Debug, Clone)]
pub struct DemoLogin {
    /// The user.
    pub user: UserId,
    /// Email.
    pub email: String,
    /// Password.
    pub password: String,
}

impl AppState {
    /// State over `store` with the system clock and the library's defaults.
    pub fn new(store: Arc<dyn Store>, billing_webhook: Option<WebhookConfig>) -> Self {
        let mut app = App::new(store);
        app.billing_webhook = billing_webhook;
        AppState {
            app,
            sessions: Sessions::default(),
            app_url: Url::parse("http://127.0.0.1:3000/").unwrap_or_else(|_| unreachable!()),
            trusted_proxies: Vec::new(),
            demo: None,
        }
    }

    /// Whether the app is served over https (`REVPILOT_APP_URL`): its cookies are then `Secure`.
    pub fn https(&self) -> bool {
        self.app_url.scheme() == "https"
    }
}

/// The largest request body accepted (Stripe events are far smaller).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The router. Installs the Prometheus recorder (once per process), so that every request is
/// counted from the start.
pub fn app(state: impl Into<Arc<AppState>>) -> Router {
    let state = state.into();
    let _ = telemetry::prometheus();
    let headers = guard::security_headers().map(|(name, value)| {
        tower_http::set_header::SetResponseHeaderLayer::if_not_present(name, value)
    });
    let [csp, frames, sniff, referrer] = headers;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/webhooks/stripe-billing", post(stripe_billing))
        .route("/api/auth/signup", post(auth::signup))
        .route("/api/auth/login", post(auth::login))
        .route("/api/stripe/connect", get(connect::start))
        .route("/api/stripe/connect/callback", get(connect::callback))
        .route("/api/webhooks/stripe-connect", post(connect::webhook))
        .route("/api/stripe/sync", post(connect::cron))
        .route("/api/connections", get(api::connections))
        .route("/api/metrics", get(api::metrics))
        .route("/api/insights", post(api::insights))
        .route("/api/scenarios", post(api::scenarios))
        .route("/api/usage/current", get(api::usage))
        .route("/api/create-checkout", post(api::checkout))
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/dashboard") }),
        )
        .route("/login", get(pages::login_form).post(pages::login_submit))
        .route(
            "/signup",
            get(pages::signup_form).post(pages::signup_submit),
        )
        .route("/logout", post(pages::logout))
        .route("/demo", get(pages::demo_login))
        .route("/dashboard", get(pages::dashboard))
        .route("/insights", get(pages::insights).post(pages::generate))
        .route("/usage", get(pages::usage))
        .route("/pricing", get(pages::pricing))
        .route("/pricing/checkout", post(pages::upgrade))
        .route("/metrics", get(telemetry::render))
        .route("/api/openapi.json", get(openapi::document))
        .route_layer(axum::middleware::from_fn(telemetry::track))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::same_origin,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(csp)
        .layer(frames)
        .layer(sniff)
        .layer(referrer)
        .with_state(state)
}

/// A JSON error `{error: {code, message}}`. The message is ours, never a database's, Stripe's
/// or a model's text.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message.into() } })),
    )
        .into_response()
}

/// The HTTP status of a refusal.
pub fn status(kind: RefusalKind) -> StatusCode {
    match kind {
        RefusalKind::Invalid => StatusCode::BAD_REQUEST,
        RefusalKind::Unauthorized => StatusCode::UNAUTHORIZED,
        RefusalKind::PaymentRequired => StatusCode::PAYMENT_REQUIRED,
        RefusalKind::NotFound => StatusCode::NOT_FOUND,
        RefusalKind::Conflict => StatusCode::CONFLICT,
        RefusalKind::TooMany => StatusCode::TOO_MANY_REQUESTS,
        RefusalKind::Busy | RefusalKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        RefusalKind::Upstream => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A library refusal as a JSON error, with `Retry-After` when it says when.
pub fn refused(r: &Refusal) -> Response {
    let mut response = error(status(r.kind), r.code, r.message.clone());
    if let Some(secs) = r.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.into());
    }
    response
}

/// A use case's answer as JSON, or its refusal.
pub fn answer<T: serde::Serialize>(result: Result<T, Refusal>) -> Response {
    result.map_or_else(|r| refused(&r), |v| axum::Json(v).into_response())
}

/// A request's `Stripe-Signature` header.
pub(crate) fn signature(headers: &HeaderMap) -> Option<&str> {
    headers.get("stripe-signature")?.to_str().ok()
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{status: ok}`", body = Object)))]
async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// `POST /api/webhooks/stripe-billing`: verify, store in the inbox, answer; apply after.
#[utoipa::path(post, path = "/api/webhooks/stripe-billing", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature header")),
    request_body(content = String, content_type = "application/json", description = "The event, as Stripe sent it"),
    responses(
        (status = 200, description = "Stored (or a duplicate, or ignored), to be applied", body = Object),
        (status = 400, description = "Bad signature or body; nothing stored", body = openapi::ErrorBody),
        (status = 500, description = "Not stored; Stripe delivers it again", body = openapi::ErrorBody)))]
async fn stripe_billing(State(s): Shared, headers: HeaderMap, body: Bytes) -> Response {
    answer(s.app.billing_event(&body, signature(&headers)).await)
}
