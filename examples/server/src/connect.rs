//! Connecting a Stripe account (Connect OAuth): the redirect, the callback that stores the
//! connection and queues its first sync at once, the Connect webhook's deauthorization, and the
//! cron's trigger that queues a sync of every connection. Each is one use case of
//! [`revpilot_stripe::app::App`].

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use revpilot_core::guard::Refusal;
use revpilot_stripe::connect::Callback;
use serde_json::json;

use crate::auth::AuthUser;
use crate::{Shared, answer, refused};

fn see_other(to: String) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

/// `GET /api/stripe/connect`: a redirect to Stripe's authorize page, its `state` stored.
#[utoipa::path(get, path = "/api/stripe/connect", tag = "connect", security(("session" = [])),
    responses(
        (status = 303, description = "To Stripe's authorize page"),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody),
        (status = 503, description = "Connect is not configured", body = crate::openapi::ErrorBody)))]
pub(crate) async fn start(State(s): Shared, AuthUser(user): AuthUser) -> Response {
    match s.app.connect_url(user).await {
        Ok(url) => see_other(url.to_string()),
        Err(r) => refused(&r),
    }
}

/// `GET /api/stripe/connect/callback`: exchanges the code, stores the connection, starts its
/// first sync and sends the user to the dashboard.
#[utoipa::path(get, path = "/api/stripe/connect/callback", tag = "connect",
    security(("session" = [])),
    params(("code" = Option<String>, Query, description = "Stripe's authorization code"),
           ("state" = String, Query, description = "The state the authorize redirect stored"),
           ("error" = Option<String>, Query, description = "Set when the user declined")),
    responses(
        (status = 303, description = "To the dashboard; the first sync has started"),
        (status = 400, description = "Unknown, used or expired state; declined", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody)))]
pub(crate) async fn callback(
    State(s): Shared,
    AuthUser(user): AuthUser,
    query: Result<Query<Callback>, QueryRejection>,
) -> Response {
    let Query(cb) = match query {
        Ok(q) => q,
        Err(e) => return refused(&Refusal::invalid(e.body_text())),
    };
    match s.app.connect_callback(user, &cb).await {
        Ok(connection) => see_other(format!("/dashboard?connected={connection}")),
        Err(r) => refused(&r),
    }
}

/// `POST /api/webhooks/stripe-connect`: events of connected accounts. A verified
/// `account.application.deauthorized` deactivates the account's connection and erases its
/// tokens; other events are acknowledged (the next sync reads them from the Events API).
#[utoipa::path(post, path = "/api/webhooks/stripe-connect", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature header")),
    request_body(content = String, content_type = "application/json", description = "The event, as Stripe sent it"),
    responses(
        (status = 200, description = "Received"),
        (status = 400, description = "Bad signature or body", body = crate::openapi::ErrorBody)))]
pub(crate) async fn webhook(State(s): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let event = s.app.connect_event(&body, crate::signature(&headers)).await;
    answer(event.map(|id| json!({ "received": true, "event": id })))
}

/// `POST /api/stripe/sync`, for the cron: `Authorization: Bearer $CRON_SECRET`. Queues a sync
/// of every active connection (the per-connection lease keeps two from running at once).
#[utoipa::path(post, path = "/api/stripe/sync", tag = "connect", security(("cron" = [])),
    responses(
        (status = 200, description = "Syncs queued, one per active connection: `{queued, trigger}`", body = Object),
        (status = 401, description = "Missing or wrong CRON_SECRET", body = crate::openapi::ErrorBody)))]
pub(crate) async fn cron(State(s): Shared, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let bearer = bearer.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    let queued = s.app.sync_all(bearer).await;
    answer(queued.map(|(queued, trigger)| json!({ "queued": queued, "trigger": trigger })))
}
