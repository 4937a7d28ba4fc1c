//! RevPilot inside an app of your own, through the library alone: Stripe Connect, the sync, MRR
//! and billing webhooks mounted on your axum router. Your users, your auth (a stub here), your
//! store (any [`Store`]); RevPilot's use cases do the rest. `src/main.rs` serves it.

use std::{fmt::Display, sync::Arc};

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, request::Parts};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Json, Router, body::Bytes, routing::get, routing::post};
use chrono::{NaiveDate, Utc};
use revpilot_core::billing::Catalog;
use revpilot_core::ports::{ConnectionId, Tier, UserId};
use revpilot_core::{Engine, Granularity::Month, Rules, SeriesRequest, Store};
use revpilot_stripe::connect::Callback;
use revpilot_stripe::{Connect, Job, Receipt, Runner, WebhookConfig, load_account, receive};
use serde_json::json;

/// What RevPilot's routes share.
pub struct Revpilot {
    /// Your database, through RevPilot's ports.
    pub store: Arc<dyn Store>,
    /// Stripe Connect (your platform's client id and key).
    pub connect: Connect,
    /// Runs syncs and billing jobs (inline here; a real app hands them to its queue).
    pub runner: Runner,
    /// The billing webhook's signing secret.
    pub billing_webhook: WebhookConfig,
}

/// RevPilot's routes, to `merge` or `nest` into your router.
pub fn router(revpilot: Revpilot) -> Router {
    Router::new()
        .route("/connect", get(connect))
        .route("/connect/callback", get(callback))
        .route("/connections/{id}/mrr", get(mrr))
        .route("/webhooks/billing", post(billing))
        .with_state(Arc::new(revpilot))
}

type Shared = State<Arc<Revpilot>>;
type Answer = Result<Response, (StatusCode, Json<serde_json::Value>)>;

/// An error answered with `status` as `{"error": "..."}`.
fn fail(status: StatusCode) -> impl Fn(&dyn Display) -> (StatusCode, Json<serde_json::Value>) {
    move |e| (status, Json(json!({ "error": e.to_string() })))
}

fn internal(e: impl Display) -> (StatusCode, Json<serde_json::Value>) {
    fail(StatusCode::INTERNAL_SERVER_ERROR)(&e)
}

/// The signed-in user. Your authentication goes here: this stub trusts an `X-User` header.
/// RevPilot keeps a profile (plan, limits) beside each of your users, made on first sight.
pub struct Me(pub UserId);

impl FromRequestParts<Arc<Revpilot>> for Me {
    type Rejection = (StatusCode, Json<serde_json::Value>);
    async fn from_request_parts(
        parts: &mut Parts,
        r: &Arc<Revpilot>,
    ) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get("x-user")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let user = UserId(
            id.ok_or_else(|| fail(StatusCode::UNAUTHORIZED)(&"X-User must hold a user id"))?,
        );
        if r.store.user(user).await.map_err(internal)?.is_none() {
            let limits = Catalog::default().plan(Tier::Starter).limits;
            let created = r
                .store
                .create_user(user, None, Tier::Starter, limits, Utc::now());
            created.await.map_err(internal)?;
        }
        Ok(Me(user))
    }
}

/// Off to Stripe's authorize page.
async fn connect(State(r): Shared, Me(user): Me) -> Answer {
    let url = r.connect.authorize_url(user).await;
    let url = url.map_err(|e| fail(StatusCode::BAD_GATEWAY)(&e))?;
    Ok(Redirect::to(url.as_str()).into_response())
}

/// Back from Stripe: the connection is stored, then synced before answering.
async fn callback(State(r): Shared, Me(user): Me, Query(cb): Query<Callback>) -> Answer {
    let c = r.connect.callback(user, &cb).await;
    let c = c.map_err(|e| fail(StatusCode::BAD_REQUEST)(&e))?;
    let (connection, stripe_account_id) = (c.id, c.stripe_account_id);
    let job = Job::Sync {
        user,
        connection,
        stripe_account_id,
    };
    let done = r.runner.try_execute_task(&job).await;
    let done = done.map_err(|e| fail(StatusCode::BAD_GATEWAY)(&e))?;
    Ok(Json(json!({ "connection": connection, "sync": format!("{done:?}") })).into_response())
}

/// Monthly MRR and its movements from `from` to `to` (`?from=2025-01-01&to=2025-12-31`).
async fn mrr(
    State(r): Shared,
    Me(user): Me,
    Path(id): Path<ConnectionId>,
    q: Query<Range>,
) -> Answer {
    let c = r.store.connection(user, id).await.map_err(internal)?;
    let c = c.ok_or_else(|| fail(StatusCode::NOT_FOUND)(&"no such connection"))?;
    let loaded = load_account(r.store.as_ref(), user, &c, None).await;
    let account = loaded.map_err(internal)?.account;
    let engine = Engine::new(&account, Rules::default(), c.reporting_currency());
    let engine = engine.with_as_of(c.last_synced_at.unwrap_or_else(Utc::now));
    let report = engine.series(&SeriesRequest::new(q.from, q.to, Month));
    Ok(Json(report.map_err(|e| fail(StatusCode::BAD_REQUEST)(&e))?.rows).into_response())
}

#[derive(serde::Deserialize)]
struct Range {
    from: NaiveDate,
    to: NaiveDate,
}

/// Stripe's billing events: verified and stored before the 200, then applied to plans.
async fn billing(State(r): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let (hook, now) = (&r.billing_webhook, Utc::now());
    let received = receive(r.store.as_ref(), hook, &body, signature, now).await;
    let received = received.map_err(|e| match e.is_client_error() {
        true => fail(StatusCode::BAD_REQUEST)(&e),
        false => internal(e),
    })?;
    let Receipt::Stored(event) = received else {
        return Ok(Json(json!({ "received": true })).into_response());
    };
    // A failure leaves the event stored: the next inbox job applies it.
    let done = r.runner.try_execute_task(&Job::Inbox).await;
    Ok(Json(json!({ "event": event, "applied": format!("{done:?}") })).into_response())
}
