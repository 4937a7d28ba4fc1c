//! Connecting a Stripe account (Connect OAuth) and syncing it: the redirect, the callback that
//! stores the connection and starts its first sync at once, the Connect webhook's
//! deauthorization, and the in-process sync runner (one sync at a time per connection).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use revpilot_core::billing::metering;
use revpilot_core::ports::{
    ConnectionId, ConnectionStore, Meter, ObjectCache, SyncStateStore, UsageStore, UserId,
};
use revpilot_stripe::billing::parse_event;
use revpilot_stripe::client::{Client, ClientConfig};
use revpilot_stripe::connect::{Callback, ConnectError};
use revpilot_stripe::sync::{SyncJob, SyncPorts, Syncer};
use revpilot_stripe::webhook::{TOLERANCE_SECS, verify};
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

use crate::auth::AuthUser;
use crate::{AppState, error, internal};

/// Connections being synced in this process (a second trigger while one runs is skipped).
pub type Syncing = Arc<Mutex<HashSet<ConnectionId>>>;

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
            spawn_sync(
                &state,
                user,
                connection.id,
                connection.stripe_account_id.clone(),
            );
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

/// Starts a sync of the connection in this process unless one is running; returns its handle.
pub fn spawn_sync(
    state: &AppState,
    user: UserId,
    connection: ConnectionId,
    stripe_account_id: String,
) -> Option<JoinHandle<()>> {
    {
        let mut running = state.syncing.lock().ok()?;
        if !running.insert(connection) {
            tracing::info!(%connection, "a sync of this connection is running; not starting another");
            return None;
        }
    }
    let state = state.clone();
    Some(tokio::spawn(async move {
        if let Err(e) = sync_once(&state, user, connection, stripe_account_id).await {
            tracing::error!(%connection, error = %e, "sync could not run");
        }
        if let Ok(mut running) = state.syncing.lock() {
            running.remove(&connection);
        }
    }))
}

async fn sync_once(
    state: &AppState,
    user: UserId,
    connection: ConnectionId,
    stripe_account_id: String,
) -> Result<(), String> {
    let tokens = state
        .store
        .tokens(user, connection)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the connection is gone or inactive")?;
    let profile = state
        .store
        .user(user)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the user is gone")?;
    let config = ClientConfig::new(SecretString::from(
        tokens.access_token.expose_secret().to_owned(),
    ))
    .with_api_base(state.stripe_api_base.as_str())
    .map_err(|e| e.to_string())?;
    let client = Client::new(config).map_err(|e| e.to_string())?;
    let store = state.store.clone();
    let cache: Arc<dyn ObjectCache> = store.clone();
    let sync_state: Arc<dyn SyncStateStore> = store.clone();
    let usage: Arc<dyn UsageStore> = store.clone();
    let connections: Arc<dyn ConnectionStore> = store;
    let ports = SyncPorts {
        cache,
        state: sync_state,
        usage,
        connections,
    };
    let job = SyncJob {
        user,
        connection,
        stripe_account_id,
        usage: Some(metering(
            &state.catalog,
            &profile,
            Meter::TransactionVolume,
            (state.clock)(),
        )),
    };
    let (status, outcome) = Syncer::new(client, ports)
        .run(&job, &|_| {})
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(%connection, status = status.as_str(), requests = outcome.requests, "sync finished");
    metrics::counter!("revpilot_syncs_total", "status" => status.as_str()).increment(1);
    Ok(())
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
    let now = (state.clock)().timestamp();
    if let Err(e) = verify(&body, signature, secrets, now, TOLERANCE_SECS) {
        return error(StatusCode::BAD_REQUEST, "invalid_webhook", e.to_string());
    }
    let event = match parse_event(&body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_webhook", e.to_string()),
    };
    if event.event_type == "account.application.deauthorized" {
        let Some(account) = event.account.as_deref() else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_webhook",
                "a deauthorization without an account",
            );
        };
        if let Err(e) = state.store.deactivate(account, (state.clock)()).await {
            // 5xx: Stripe delivers it again.
            return internal(&e);
        }
    }
    axum::Json(serde_json::json!({ "received": true, "event": event.id })).into_response()
}

/// `POST /api/stripe/sync`, for the cron: `Authorization: Bearer $CRON_SECRET`, compared in
/// constant time; with no secret configured every call is refused. Starts a sync of every active
/// connection that is not already syncing.
#[utoipa::path(post, path = "/api/stripe/sync", tag = "connect", security(("cron" = [])),
    responses(
        (status = 200, description = "Syncs started: `{started, alreadyRunning}`", body = Object),
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
    let (mut started, mut skipped) = (0, 0);
    for c in connections {
        match spawn_sync(&state, c.user, c.id, c.stripe_account_id.clone()) {
            Some(_) => started += 1,
            None => skipped += 1,
        }
    }
    axum::Json(serde_json::json!({ "started": started, "alreadyRunning": skipped })).into_response()
}
