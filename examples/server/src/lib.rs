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
pub mod jwks;
pub mod openapi;
pub mod pages;
pub mod serve;
pub mod telemetry;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use revpilot_core::billing::Catalog;
use revpilot_core::insights::narrative::{LlmProvider, LocalProvider};
use revpilot_core::ports::UserId;
use revpilot_stripe::accounts::SharedAccounts;
use revpilot_stripe::billing::{Receipt, WebhookConfig, receive};
use revpilot_stripe::client::Client;
use revpilot_stripe::jobs::RunAtOnce;
use serde_json::json;
use tokio::sync::Notify;
use url::Url;

pub use revpilot_worker::{Clock, Job, Store};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Arc<dyn Store>,
    /// The billing webhook endpoint's secrets and mode; `None` refuses every billing webhook.
    pub billing_webhook: Option<WebhookConfig>,
    /// Woken when an event is stored, so an in-process billing worker
    /// (`revpilot_stripe::billing::Processor::spawn`) applies it at once; with a queue, an inbox
    /// job does.
    pub billing_wake: Arc<Notify>,
    /// Now.
    pub clock: Clock,
    /// HS256 session tokens (built-in accounts, or a Supabase project's shared secret); `None`
    /// refuses HS256 tokens and disables sign-up and log-in.
    pub jwt: Option<Arc<auth::Jwt>>,
    /// Supabase's asymmetric signing keys (RS256/ES256); `None` refuses such tokens.
    pub jwks: Option<Arc<jwks::Jwks>>,
    /// The tiers.
    pub catalog: Arc<Catalog>,
    /// The insights narrator (the local templates by default).
    pub llm: Arc<dyn LlmProvider>,
    /// How long one insight generation may wait for the narrator, every ask and retry
    /// together (`REVPILOT_INSIGHT_DEADLINE_SECS`, default [`INSIGHT_DEADLINE`]); past it the
    /// local narrative stands in.
    pub insight_deadline: std::time::Duration,
    /// The company's own Stripe account (checkout); `None` when billing is not configured.
    pub stripe: Option<Client>,
    /// Where the app is served (Checkout's return URLs).
    pub app_url: Url,
    /// Per-user budget on the expensive routes (insights, scenarios).
    pub expensive: Arc<guard::KeyedBudget<UserId>>,
    /// Budget of sign-up and log-in attempts, per client address and per email: each attempt
    /// costs an argon2 hash, and a password is not to be guessed at speed. Its map of keys is
    /// bounded ([`guard::KeyedBudget`]).
    pub attempts: Arc<guard::KeyedBudget<String>>,
    /// Password hashing: how many argon2 hashes run at once, and how long a sign-up or log-in
    /// waits for a slot.
    pub passwords: auth::Passwords,
    /// Reverse proxies whose `X-Forwarded-For` names the client (`REVPILOT_TRUSTED_PROXIES`);
    /// empty by default: the TCP peer is the client.
    pub trusted_proxies: Arc<Vec<std::net::IpAddr>>,
    /// Series computations that no memo answers, at once (`/api/metrics`' expensive ranges).
    pub series_slots: Arc<tokio::sync::Semaphore>,
    /// Connect OAuth; `None` when not configured.
    pub connect: Option<Arc<revpilot_stripe::connect::Connect>>,
    /// The Connect webhook's secrets; `None` refuses it.
    pub connect_webhook_secrets: Option<Vec<secrecy::SecretString>>,
    /// Stripe's API base for syncing connected accounts.
    pub stripe_api_base: Url,
    /// Where background jobs go: the persistent queue (run by `revpilot-worker`s, or by this
    /// process with `--with-worker`). `None` runs each job at once on a task of this process,
    /// as tests of the router alone do.
    pub jobs: Option<Arc<dyn revpilot_worker::Enqueue>>,
    /// The cron's bearer secret for `POST /api/stripe/sync`; `None` refuses every call.
    pub cron_secret: Option<secrecy::SecretString>,
    /// The connections' rebuilt accounts, kept until their next sync.
    pub accounts: Arc<revpilot_stripe::accounts::Accounts>,
    /// Demo mode's login, shown on the log-in page; `None` outside demo mode.
    pub demo: Option<DemoLogin>,
    /// Users known to have a profile.
    pub known_users: Arc<auth::KnownUsers>,
    /// Sessions found live within the last second (shared by clones of the state).
    pub sessions: revpilot_store::auth::LiveSessions,
}

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

/// The default deadline of one insight generation: a user never waits longer for a model.
pub const INSIGHT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Sign-up and log-in attempts per minute, per client address and per email.
pub const ATTEMPTS_PER_MINUTE: u32 = 10;

/// Calls per user and minute on the expensive routes.
pub const EXPENSIVE_PER_MINUTE: u32 = 30;

/// Keys (client addresses and emails) the sign-up and log-in budget remembers at most.
pub const ATTEMPT_KEYS: usize = 100_000;

/// Users the expensive routes' budget remembers at most.
pub const EXPENSIVE_KEYS: usize = 100_000;

/// Series computed at once when no memo has them (`/api/metrics`); others wait.
pub const SERIES_AT_ONCE: usize = 2;

impl AppState {
    /// State over `store` with the system clock.
    pub fn new(store: Arc<dyn Store>, billing_webhook: Option<WebhookConfig>) -> Self {
        AppState {
            store,
            billing_webhook,
            billing_wake: Arc::new(Notify::new()),
            clock: Arc::new(Utc::now),
            jwt: None,
            jwks: None,
            catalog: Arc::new(Catalog::default()),
            llm: Arc::new(LocalProvider),
            insight_deadline: INSIGHT_DEADLINE,
            stripe: None,
            app_url: Url::parse("http://127.0.0.1:3000/").unwrap_or_else(|_| unreachable!()),
            expensive: Arc::new(guard::KeyedBudget::per_minute(
                EXPENSIVE_PER_MINUTE,
                EXPENSIVE_KEYS,
            )),
            attempts: Arc::new(guard::KeyedBudget::per_minute(
                ATTEMPTS_PER_MINUTE,
                ATTEMPT_KEYS,
            )),
            passwords: auth::Passwords::default(),
            trusted_proxies: Arc::default(),
            series_slots: Arc::new(tokio::sync::Semaphore::new(SERIES_AT_ONCE)),
            connect: None,
            connect_webhook_secrets: None,
            stripe_api_base: Url::parse("https://api.stripe.com/")
                .unwrap_or_else(|_| unreachable!()),
            jobs: None,
            cron_secret: None,
            accounts: Arc::default(),
            demo: None,
            known_users: Arc::default(),
            sessions: revpilot_store::auth::LiveSessions::default(),
        }
    }
}

/// The largest request body accepted (Stripe events are far smaller).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The router. Installs the Prometheus recorder (once per process), so that every request is
/// counted from the start.
pub fn app(state: AppState) -> Router {
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

/// A 500 whose message says nothing of the cause (logged instead): never SQL, Stripe or model
/// text in a response.
pub fn internal(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "internal error");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "something went wrong on the server",
    )
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
async fn stripe_billing(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(config) = &state.billing_webhook else {
        return error(
            StatusCode::BAD_REQUEST,
            "webhook_not_configured",
            "no webhook secret is configured (STRIPE_WEBHOOK_SECRET)",
        );
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    match receive(
        state.store.as_ref(),
        config,
        &body,
        signature,
        (state.clock)(),
    )
    .await
    {
        Ok(receipt) => {
            metrics::counter!("revpilot_billing_webhooks_total", "outcome" => receipt.outcome())
                .increment(1);
            let mut body = json!({ "received": true, "event": receipt.event_id() });
            match receipt {
                Receipt::Stored(id) => match &state.jobs {
                    // Stored all the same when not queued: the scheduler's inbox sweep applies it.
                    Some(jobs) => {
                        let queued = jobs.enqueue(Job::Inbox, &format!("inbox:{id}")).await;
                        if let Err(e) = queued {
                            tracing::warn!(error = %e, "billing inbox job not queued");
                        }
                    }
                    None => state.billing_wake.notify_one(),
                },
                Receipt::Duplicate(_) => body["duplicate"] = true.into(),
                Receipt::Ignored { reason, .. } => body["ignored"] = reason.into(),
            }
            axum::Json(body).into_response()
        }
        Err(e) if e.is_client_error() => {
            metrics::counter!("revpilot_billing_webhooks_total", "outcome" => "refused")
                .increment(1);
            error(StatusCode::BAD_REQUEST, "invalid_webhook", e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "billing webhook not stored");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the event could not be stored; Stripe will deliver it again",
            )
        }
    }
}

impl AppState {
    /// Where this state's jobs go: its queue, or without one, a task of this process each
    /// (`revpilot_stripe::jobs::RunAtOnce`), as tests of the router alone do.
    pub fn jobs(&self) -> Arc<dyn revpilot_worker::Enqueue> {
        match &self.jobs {
            Some(q) => q.clone(),
            None => Arc::new(RunAtOnce::new(Arc::new(self.runner("server")))),
        }
    }

    /// A job runner over this state's store, catalog, clock and Stripe settings (what the
    /// in-process worker runs).
    pub fn runner(&self, holder: &str) -> revpilot_worker::Runner {
        let mut runner = revpilot_worker::Runner::new(self.store.clone(), holder);
        runner.catalog = self.catalog.clone();
        runner.clock = self.clock.clone();
        runner.stripe_api_base = self.stripe_api_base.clone();
        runner.billing = self.stripe.clone();
        runner.accounts = Some(Arc::new(SharedAccounts::new(
            self.accounts.clone(),
            self.store.clone(),
        )));
        runner
    }
}
