//! Connecting a Stripe account (Connect OAuth): the redirect, the callback that stores the
//! connection and queues its first sync at once, the Connect webhook's deauthorization, and the
//! cron's trigger that queues a sync of every connection.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use revpilot_stripe::billing::ReceiveError;
use revpilot_stripe::connect::{Callback, ConnectError, receive_connect_event};
use revpilot_worker::Job;
use secrecy::ExposeSecret;

use crate::auth::AuthUser;
use crate::{AppState, error, internal};

/// `GET /api/stripe/connect`: a redirect to Stripe's authorize page, its `state` stored.
#[utoipa::path(get, path = "/api/stripe/connect", tag = "connect", security(("session" = [])),
    responses(
        (status = 303, description = "To Stripe's authorize page"),
        (status = 401, description = "No valid session", body = crate::openapi::ErrorBody),
        (status = 503, description = "Connect is not configured", body = crate::openapi::ErrorBody)))]
pub(crate) async fn start(State(state): State<AppState>, AuthUser(user): AuthUser) -> Response {
    let Some(connect) = &state.connect else {
        return not_configured();
    };
    match connect.authorize_url(user).await {
        Ok(url) => (StatusCode::SEE_OTHER, [(header::LOCATION, url.to_string())]).into_response(),
        Err(e) => internal(&e),
    }
}

fn not_configured() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "connect_not_configured",
        "Stripe Connect is not configured on this server (STRIPE_CLIENT_ID, STRIPE_SECRET_KEY)",
    )
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
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    query: Result<Query<Callback>, QueryRejection>,
) -> Response {
    let Some(connect) = &state.connect else {
        return not_configured();
    };
    let Query(cb) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    match connect.callback(user, &cb).await {
        Ok(connection) => {
            let (job, key) = Job::sync(&connection, "connect");
            if let Err(e) = state.jobs().enqueue(job, &key).await {
                // Connected all the same: the cron's next trigger syncs it.
                tracing::error!(connection = %connection.id, error = %e, "first sync not queued");
            }
            let to = format!("/dashboard?connected={}", connection.id);
            (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
        }
        Err(
            e @ (ConnectError::MissingState
            | ConnectError::InvalidState
            | ConnectError::StateMismatch
            | ConnectError::MissingCode),
        ) => error(StatusCode::BAD_REQUEST, "invalid_state", e.to_string()),
        Err(ConnectError::Denied(_)) => error(
            StatusCode::BAD_REQUEST,
            "connect_denied",
            "Stripe did not authorize the connection",
        ),
        Err(e @ ConnectError::AlreadyConnected(_)) => {
            error(StatusCode::CONFLICT, "already_connected", e.to_string())
        }
        Err(e @ (ConnectError::Exchange(_) | ConnectError::Api(_))) => {
            tracing::error!(error = %e, "connect");
            error(
                StatusCode::BAD_GATEWAY,
                "stripe_error",
                "Stripe could not complete the connection; try again",
            )
        }
        Err(e) => internal(&e),
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
pub(crate) async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(secrets) = &state.connect_webhook_secrets else {
        return error(
            StatusCode::BAD_REQUEST,
            "webhook_not_configured",
            "no Connect webhook secret is configured (STRIPE_CONNECT_WEBHOOK_SECRET)",
        );
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    match receive_connect_event(
        state.store.as_ref(),
        &body,
        signature,
        secrets,
        (state.clock)(),
    )
    .await
    {
        Ok(receipt) => {
            axum::Json(serde_json::json!({ "received": true, "event": receipt.event_id() }))
                .into_response()
        }
        // 5xx: Stripe delivers it again.
        Err(ReceiveError::Store(e)) => internal(&e),
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_webhook", e.to_string()),
    }
}

/// `POST /api/stripe/sync`, for the cron: `Authorization: Bearer $CRON_SECRET`, compared in
/// constant time; with no secret configured every call is refused. Queues a sync of every active
/// connection (the per-connection lease keeps two from running at once).
#[utoipa::path(post, path = "/api/stripe/sync", tag = "connect", security(("cron" = [])),
    responses(
        (status = 200, description = "Syncs queued, one per active connection: `{queued, trigger}`", body = Object),
        (status = 401, description = "Missing or wrong CRON_SECRET", body = crate::openapi::ErrorBody)))]
pub(crate) async fn cron(State(state): State<AppState>, headers: HeaderMap) -> Response {
    use subtle::ConstantTimeEq;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let allowed = state.cron_secret.as_ref().is_some_and(|secret| {
        let secret = secret.expose_secret().as_bytes();
        !secret.is_empty() && bool::from(secret.ct_eq(given.as_bytes()))
    });
    if !allowed {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the cron secret is missing or wrong",
        );
    }
    let connections = match state.store.active_connections().await {
        Ok(c) => c,
        Err(e) => return internal(&e),
    };
    // One trigger id for the call: each connection's job is pushed once however the call is
    // retried within it, and workers run each exactly once.
    let trigger = uuid::Uuid::new_v4().simple().to_string();
    let jobs = state.jobs();
    let mut queued = 0;
    for c in connections {
        let (job, key) = Job::sync(&c, &trigger);
        if let Err(e) = jobs.enqueue(job, &key).await {
            return internal(&e);
        }
        queued += 1;
    }
    axum::Json(serde_json::json!({ "queued": queued, "trigger": trigger })).into_response()
}
