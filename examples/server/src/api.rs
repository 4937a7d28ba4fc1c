//! The JSON API over the library: metrics, insights, scenarios, usage, checkout. Every route
//! takes an [`AuthUser`]; every route with a `connectionId` answers 404 for another user's
//! connection exactly as for one that does not exist.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{Duration, NaiveDate};
use revpilot_core::Anomaly;
use revpilot_core::billing::{UsageError, check_scenario, current_usage};
use revpilot_core::insights::analyze;
use revpilot_core::insights::narrative::{GenerateError, Generated, InsightRequest, generate};
use revpilot_core::insights::scenario::{RunError, Scenario, ScenarioRequest, run_metered};
use revpilot_core::metrics::{Granularity, SeriesRequest};
use revpilot_core::ports::{Connection, Tier, UserId};
use revpilot_stripe::billing::{CheckoutError, CheckoutSession, ReturnUrls, create_checkout};
use revpilot_stripe::rebuild::stream::CachedRebuildError;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use std::sync::Arc;

use crate::auth::AuthUser;
use crate::{AppState, error, internal};
use revpilot_stripe::accounts::Loaded;

pub use revpilot_core::params::{InsightsQuery, MAX_RANGE_DAYS, MetricsQuery};

/// How long a metrics request waits for a series-computation slot before answering 503.
pub const SERIES_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such connection")
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// A JSON error for a body that cannot be read, keeping the rejection's status (413 for a body
/// over the limit, 415 without a JSON content type, 400 or 422 otherwise).
fn body_error(e: &JsonRejection) -> Response {
    let status = e.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "payload_too_large"
    } else {
        "invalid_request"
    };
    error(status, code, format!("body: {}", e.body_text()))
}

/// Refuses a call past the user's per-minute budget on an expensive route.
pub(crate) fn rate_limited(state: &AppState, user: UserId) -> Option<Response> {
    (!state.expensive.check(&user)).then(|| {
        error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests on this route; try again in a minute",
        )
    })
}

/// The user's connection, or 404.
pub(crate) async fn owned(
    state: &AppState,
    user: UserId,
    id: &str,
) -> Result<Connection, Response> {
    let Some(id) = revpilot_core::params::connection_id(id) else {
        return Err(not_found());
    };
    let row = state
        .accounts
        .connection(state.store.as_ref(), user, id)
        .await;
    row.map_err(|e| internal(&e))?.ok_or_else(not_found)
}

/// The connection's account: this process's copy when it was built at the connection's last
/// sync, else the store's derivation at that sync, else rebuilt from what the sync cached (see
/// `revpilot_stripe::accounts` and `revpilot_stripe::rebuild::derived`).
pub(crate) async fn account(
    state: &AppState,
    user: UserId,
    connection: &Connection,
) -> Result<Arc<Loaded>, Response> {
    let store = state.store.as_ref();
    state
        .accounts
        .load(store, user, connection)
        .await
        .map_err(|e| {
            tracing::error!(connection = %connection.id, error = %e, "cached account unreadable");
            match e {
                CachedRebuildError::Store(e) => internal(&e),
                _ => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "unreadable_data",
                    "a synced Stripe object cannot be read; sync the connection again",
                ),
            }
        })
}

pub(crate) fn today(state: &AppState) -> NaiveDate {
    (state.clock)().date_naive()
}

/// `GET /api/connections`: the user's Stripe connections, with their last sync.
#[utoipa::path(get, path = "/api/connections", tag = "connect", security(("session" = [])),
    responses(
        (status = 200, description = "`{connections: [{id, stripeAccountId, businessName, currency, isActive, lastSyncedAt, syncStatus}]}`", body = Object),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody)))]
pub(crate) async fn connections(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Response {
    let all = match state.store.connections(user).await {
        Ok(c) => c,
        Err(e) => return internal(&e),
    };
    let mut out = Vec::with_capacity(all.len());
    for c in all {
        let run = match state.store.last_run(user, c.id).await {
            Ok(r) => r,
            Err(e) => return internal(&e),
        };
        out.push(json!({
            "id": c.id,
            "stripeAccountId": c.stripe_account_id,
            "businessName": c.business_name,
            "currency": c.currency,
            "isActive": c.is_active,
            "lastSyncedAt": c.last_synced_at,
            "syncStatus": run.map(|r| r.status.as_str()),
        }));
    }
    Json(json!({ "connections": out })).into_response()
}

/// `GET /api/metrics?connectionId=...&from=&to=&granularity=day|month`. The query and its
/// checks are [`revpilot_core::params::MetricsQuery`] (plain code the fuzz target runs).
#[utoipa::path(get, path = "/api/metrics", tag = "metrics",
    params(("connectionId" = String, Query, description = "The connection"),
           ("from" = Option<NaiveDate>, Query, description = "First day (default: 89 days before `to`)"),
           ("to" = Option<NaiveDate>, Query, description = "Last day (default: today)"),
           ("granularity" = Option<String>, Query, description = "`day` (default) or `month`")),
    security(("session" = [])),
    responses(
        (status = 200, description = "The series: one row per day or month, with MRR, ARR, the five movements, churn, NRR/GRR, ARPU, LTV", body = Object),
        (status = 400, description = "Invalid range or granularity", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such connection (or another user's)", body = crate::openapi::ErrorBody)))]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    query: Result<Query<MetricsQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return bad_request(format!("query: {}", e.body_text())),
    };
    let connection = match owned(&state, user, &q.connection_id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let SeriesRequest {
        from,
        to,
        granularity,
    } = match q.request(today(&state)) {
        Ok(r) => r,
        Err(e) => return bad_request(e.to_string()),
    };
    let loaded = match account(&state, user, &connection).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    // A series no memo holds is computed in one of a few slots: however many long ranges
    // arrive at once, only that many are in memory at once.
    let _slot = if loaded.has_series_body(from, to, granularity) {
        None
    } else {
        match tokio::time::timeout(SERIES_WAIT, state.series_slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Some(slot),
            Ok(Err(_)) | Err(_) => {
                metrics::counter!("revpilot_metrics_busy_total").increment(1);
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "the server is busy computing other series; try again in a few seconds",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
                return r;
            }
        }
    };
    let body = loaded.series_body(from, to, granularity, |report| {
        // A range reaching past the data's as-of instant is cut there, and the answer says so.
        let cut = report
            .anomalies
            .iter()
            .find(|a| matches!(a, Anomaly::CutAtAsOf { .. }))
            .map(ToString::to_string);
        json!({
            "connectionId": connection.id,
            "currency": loaded.currency,
            "from": from,
            "to": report.rows.last().map_or(to, |r| r.date.min(to)),
            "requestedTo": to,
            "asOf": loaded.as_of,
            "cut": cut,
            "granularity": if granularity == Granularity::Day { "day" } else { "month" },
            "lastSyncedAt": connection.last_synced_at,
            "rows": report.rows,
            "anomalies": report.anomalies.len(),
        })
        .to_string()
        .into_bytes()
    });
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => bad_request(e.to_string()),
    }
}

pub(crate) fn usage_error(e: &UsageError) -> Response {
    match e {
        UsageError::UpgradeRequired { .. } => error(
            StatusCode::PAYMENT_REQUIRED,
            "upgrade_required",
            e.to_string(),
        ),
        UsageError::UnknownUser(_) => error(StatusCode::NOT_FOUND, "not_found", "no such user"),
        other => internal(other),
    }
}

/// Generates, stores and returns one set of insights for the user's connection (the API route
/// and the dashboard's button).
pub(crate) async fn generate_insights(
    state: &AppState,
    user: UserId,
    connection_id: &str,
) -> Result<Generated, Response> {
    if let Some(r) = rate_limited(state, user) {
        return Err(r);
    }
    let connection = owned(state, user, connection_id).await?;
    let loaded = account(state, user, &connection).await?;
    let analysis = analyze(&loaded.engine(), &loaded.account, today(state))
        .map_err(|e| bad_request(e.to_string()))?;
    generate(
        state.store.as_ref(),
        &state.catalog,
        state.llm.as_ref(),
        InsightRequest::new(user, &analysis, Uuid::new_v4(), (state.clock)())
            .of_connection(connection.id),
        tokio::time::sleep(state.insight_deadline),
    )
    .await
    .inspect(|g| {
        let provider = if g.fallback.is_some() {
            "local_fallback"
        } else {
            "provider"
        };
        metrics::counter!("revpilot_insight_generations_total", "provider" => provider)
            .increment(1);
    })
    .map_err(|e| match e {
        GenerateError::Usage(e) => usage_error(&e),
        other => internal(&other),
    })
}

/// `POST /api/insights?connectionId=...`: generates, stores and returns one set of insights.
#[utoipa::path(post, path = "/api/insights", tag = "insights",
    params(("connectionId" = String, Query, description = "The connection")),
    security(("session" = [])),
    responses(
        (status = 200, description = "One insight per kind, each with the computed figures it cites", body = Object),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody),
        (status = 402, description = "The plan's AI insights are used up", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such connection", body = crate::openapi::ErrorBody),
        (status = 429, description = "Per-user rate limit", body = crate::openapi::ErrorBody)))]
pub(crate) async fn insights(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    query: Result<Query<InsightsQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return bad_request(format!("query: {}", e.body_text())),
    };
    match generate_insights(&state, user, &q.connection_id).await {
        Ok(g) => Json(json!({
            "generation": g.generation,
            "fallback": g.fallback,
            "insights": g.records,
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// `POST /api/scenarios` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScenarioBody {
    /// The connection.
    pub connection_id: String,
    /// Price change, %.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "10")]
    pub price_change_pct: Decimal,
    /// Churn change, points.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "-0.5")]
    pub churn_change_points: Decimal,
    /// New-customer growth change, %.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "0")]
    pub new_growth_pct: Decimal,
}

/// `POST /api/scenarios`: one metered what-if run.
#[utoipa::path(post, path = "/api/scenarios", tag = "insights", request_body = ScenarioBody,
    security(("session" = [])),
    responses(
        (status = 200, description = "Baseline and scenario MRR at 3, 6 and 12 months", body = Object),
        (status = 400, description = "Invalid body", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody),
        (status = 402, description = "The plan's scenarios are used up", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such connection", body = crate::openapi::ErrorBody),
        (status = 429, description = "Per-user rate limit", body = crate::openapi::ErrorBody)))]
pub(crate) async fn scenarios(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    body: Result<Json<ScenarioBody>, JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return body_error(&e),
    };
    if let Some(r) = rate_limited(&state, user) {
        return r;
    }
    let connection = match owned(&state, user, &b.connection_id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    // The limit answers before the account is built or its history read (402, not 400).
    if let Err(e) = check_scenario(state.store.as_ref(), user, (state.clock)()).await {
        return usage_error(&e);
    }
    let loaded = match account(&state, user, &connection).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let currency = loaded.currency;
    let to = today(&state);
    let rows = match loaded.series(to - Duration::days(120), to, Granularity::Month) {
        Ok(r) => r.rows.clone(),
        Err(e) => return bad_request(e.to_string()),
    };
    let scenario = Scenario {
        price_change_pct: b.price_change_pct,
        churn_change_points: b.churn_change_points,
        new_growth_pct: b.new_growth_pct,
    };
    let run_id = Uuid::new_v4().to_string();
    match run_metered(
        state.store.as_ref(),
        &state.catalog,
        ScenarioRequest {
            user,
            connection: Some(connection.id),
            rows: &rows,
            scenario: &scenario,
            run_id: &run_id,
            now: (state.clock)(),
        },
    )
    .await
    {
        Ok(projection) => Json(json!({
            "currency": currency,
            "scenario": scenario,
            "projection": projection.iter().map(|p| json!({
                "months": p.months,
                "baseline": currency.round(p.baseline),
                "scenario": currency.round(p.scenario),
                "delta": currency.round(p.delta),
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(RunError::Scenario(e)) => bad_request(e.to_string()),
        Err(RunError::Usage(e)) => usage_error(&e),
        Err(other) => internal(&other),
    }
}

/// `GET /api/usage/current`.
#[utoipa::path(get, path = "/api/usage/current", tag = "billing", security(("session" = [])),
    responses(
        (status = 200, description = "Tier, period, used/limit/remaining per meter, and the bill so far in cents", body = Object),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody)))]
pub(crate) async fn usage(State(state): State<AppState>, AuthUser(user): AuthUser) -> Response {
    match current_usage(state.store.as_ref(), &state.catalog, user, (state.clock)()).await {
        Ok(u) => Json(u).into_response(),
        Err(e) => usage_error(&e),
    }
}

/// `POST /api/create-checkout` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// The tier to buy: `professional`, `business` or `enterprise`.
    #[schema(value_type = String, example = "professional")]
    pub tier: Tier,
}

/// A Checkout Session for an upgrade of the user to `tier` (the API route and the pricing page).
pub(crate) async fn checkout_session(
    state: &AppState,
    user: UserId,
    tier: Tier,
) -> Result<CheckoutSession, Response> {
    let Some(stripe) = &state.stripe else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stripe_not_configured",
            "billing is not configured on this server (STRIPE_SECRET_KEY)",
        ));
    };
    create_checkout(
        stripe,
        state.store.as_ref(),
        &state.catalog,
        user,
        tier,
        &ReturnUrls {
            success: app_page(&state.app_url, "/dashboard?upgraded=true"),
            cancel: app_page(&state.app_url, "/pricing"),
        },
        (state.clock)(),
    )
    .await
    .map_err(|e| match e {
        e @ (CheckoutError::FreeTier(_) | CheckoutError::NoPrice(_)) => bad_request(e.to_string()),
        CheckoutError::UnknownUser(_) => error(StatusCode::NOT_FOUND, "not_found", "no such user"),
        CheckoutError::Stripe(e) => {
            tracing::error!(error = %e, "checkout");
            error(
                StatusCode::BAD_GATEWAY,
                "stripe_error",
                "Stripe could not create the checkout session; try again",
            )
        }
        e => internal(&e),
    })
}

/// `POST /api/create-checkout`: a Checkout Session URL for an upgrade.
#[utoipa::path(post, path = "/api/create-checkout", tag = "billing", request_body = CheckoutBody,
    security(("session" = [])),
    responses(
        (status = 200, description = "`{id, url}` of the Checkout Session", body = Object),
        (status = 400, description = "A free tier or one without a price", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody),
        (status = 502, description = "Stripe refused", body = crate::openapi::ErrorBody),
        (status = 503, description = "Billing is not configured", body = crate::openapi::ErrorBody)))]
pub(crate) async fn checkout(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    body: Result<Json<CheckoutBody>, JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return body_error(&e),
    };
    match checkout_session(&state, user, b.tier).await {
        Ok(session) => Json(json!({ "id": session.id, "url": session.url })).into_response(),
        Err(r) => r,
    }
}

/// A page of this app at `path` (a query allowed).
fn app_page(app_url: &url::Url, path: &str) -> url::Url {
    app_url.join(path).unwrap_or_else(|_| app_url.clone())
}
