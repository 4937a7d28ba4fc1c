//! The JSON API over the library's use cases ([`revpilot_stripe::app::App`]): connections,
//! metrics, insights, scenarios, usage, checkout. Every route takes an [`AuthUser`]; every route
//! with a `connectionId` answers 404 for another user's connection exactly as for one that does
//! not exist.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use revpilot_core::guard::Refusal;
use revpilot_core::insights::scenario::Scenario;
use revpilot_core::ports::Tier;
use revpilot_stripe::billing::ReturnUrls;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;

use crate::auth::AuthUser;
use crate::{AppState, Shared, answer, error, refused};

pub use revpilot_core::params::{InsightsQuery, MAX_RANGE_DAYS, MetricsQuery};

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

fn query_error(e: &QueryRejection) -> Response {
    refused(&Refusal::invalid(format!("query: {}", e.body_text())))
}

/// `GET /api/connections`: the user's Stripe connections, with their last sync.
#[utoipa::path(get, path = "/api/connections", tag = "connect", security(("session" = [])),
    responses(
        (status = 200, description = "`{connections: [{id, stripeAccountId, businessName, currency, isActive, lastSyncedAt, syncStatus}]}`", body = Object),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody)))]
pub(crate) async fn connections(State(s): Shared, AuthUser(user): AuthUser) -> Response {
    answer(
        s.app
            .connections(user)
            .await
            .map(|c| json!({ "connections": c })),
    )
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
    State(s): Shared,
    AuthUser(user): AuthUser,
    query: Result<Query<MetricsQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return query_error(&e),
    };
    match s.app.metrics(user, &q).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(r) => refused(&r),
    }
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
    State(s): Shared,
    AuthUser(user): AuthUser,
    query: Result<Query<InsightsQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return query_error(&e),
    };
    answer(s.app.insights(user, &q.connection_id).await.map(
        |g| json!({ "generation": g.generation, "fallback": g.fallback, "insights": g.records }),
    ))
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
    State(s): Shared,
    AuthUser(user): AuthUser,
    body: Result<Json<ScenarioBody>, JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return body_error(&e),
    };
    let scenario = Scenario {
        price_change_pct: b.price_change_pct,
        churn_change_points: b.churn_change_points,
        new_growth_pct: b.new_growth_pct,
    };
    answer(s.app.scenario(user, &b.connection_id, scenario).await)
}

/// `GET /api/usage/current`.
#[utoipa::path(get, path = "/api/usage/current", tag = "billing", security(("session" = [])),
    responses(
        (status = 200, description = "Tier, period, used/limit/remaining per meter, and the bill so far in cents", body = Object),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody)))]
pub(crate) async fn usage(State(s): Shared, AuthUser(user): AuthUser) -> Response {
    answer(s.app.usage(user).await)
}

/// `POST /api/create-checkout` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// The tier to buy: `professional`, `business` or `enterprise`.
    #[schema(value_type = String, example = "professional")]
    pub tier: Tier,
}

/// Checkout's return pages on this app: the dashboard after a payment, the pricing page on
/// cancel.
pub(crate) fn return_urls(s: &AppState) -> ReturnUrls {
    let page = |path| s.app_url.join(path).unwrap_or_else(|_| s.app_url.clone());
    ReturnUrls {
        success: page("/dashboard?upgraded=true"),
        cancel: page("/pricing"),
    }
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
    State(s): Shared,
    AuthUser(user): AuthUser,
    body: Result<Json<CheckoutBody>, JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return body_error(&e),
    };
    let session = s.app.checkout(user, b.tier, &return_urls(&s)).await;
    answer(session.map(|c| json!({ "id": c.id, "url": c.url })))
}
