//! Who is calling: a JWT in `Authorization: Bearer ...` or the session cookie, checked by
//! [`revpilot_store::auth::Sessions`] (HS256 with `JWT_SECRET`, which is also how Supabase signs
//! its tokens when configured with its JWT secret, or a JWKS key). A user seen for the first
//! time gets a starter profile. Built-in accounts: sign-up and log-in, rate-limited per client
//! address and email, with argon2id hashes on the library's bounded hashing threads.

use axum::extract::FromRequestParts;
use axum::extract::rejection::JsonRejection;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use revpilot_core::guard::{Refusal, RefusalKind};
use revpilot_core::params::client_behind;
use revpilot_core::ports::UserId;
use revpilot_store::auth::Session;
use serde::Deserialize;
use std::sync::Arc;

use crate::{AppState, Shared, refused};

pub use revpilot_store::auth::{Jwt, Passwords};

/// The authenticated caller; every API route but the webhooks and health takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser(pub UserId);

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<AppState>) -> Result<Self, Response> {
        let token = presented(&parts.headers).unwrap_or_default();
        let user = s
            .sessions
            .user(s.app.store.as_ref(), &s.app.catalog, token, (s.app.clock)());
        user.await.map(AuthUser).map_err(|r| refused(&r))
    }
}

/// The session token a request carries: `Authorization: Bearer`, else the session cookie.
pub(crate) fn presented(headers: &HeaderMap) -> Option<&str> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    revpilot_store::auth::presented(authorization, cookies)
}

/// `POST /api/auth/signup` and `/api/auth/login` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Email.
    pub email: String,
    /// Password (10 to 1024 characters).
    pub password: String,
}

/// The client's address, when the server was started with connection info (`main.rs` is).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl FromRequestParts<Arc<AppState>> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        s: &Arc<AppState>,
    ) -> Result<Self, std::convert::Infallible> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        let forwarded = parts.headers.get_all("x-forwarded-for");
        let forwarded = forwarded.iter().filter_map(|v| v.to_str().ok());
        let client = peer.map(|p| client_behind(p.0.ip(), forwarded, &s.trusted_proxies));
        Ok(ClientAddr(client))
    }
}

/// Counts a sign-up or log-in refused for want of a hashing slot.
pub(crate) fn counted(r: Refusal) -> Refusal {
    if r.kind == RefusalKind::Busy {
        metrics::counter!("revpilot_auth_busy_total").increment(1);
    }
    r
}

/// Signs up (`signup`) or logs in a client, by the library's rules.
pub(crate) async fn enter(
    s: &AppState,
    client: ClientAddr,
    c: Credentials,
    signup: bool,
) -> Result<Session, Refusal> {
    let (store, now) = (s.app.store.as_ref(), (s.app.clock)());
    let entered = if signup {
        s.sessions
            .sign_up(store, &s.app.catalog, client.0, &c.email, c.password, now)
            .await
    } else {
        s.sessions
            .log_in(store, client.0, &c.email, c.password, now)
            .await
    };
    entered.map_err(counted)
}

/// `{token, user, expiresAt}` with the session cookie, or the refusal.
fn session(s: &AppState, entered: Result<Session, Refusal>, status: StatusCode) -> Response {
    let session = match entered {
        Ok(session) => session,
        Err(r) => return refused(&r),
    };
    let body = serde_json::json!({
        "token": session.token,
        "user": session.user,
        "expiresAt": session.expires_at,
    });
    let cookie = [(header::SET_COOKIE, session.cookie(s.https()))];
    (status, cookie, axum::Json(body)).into_response()
}

/// A sign-up's or log-in's answer: the body's refusal (no secret first), or the session.
async fn json_entry(
    s: &AppState,
    client: ClientAddr,
    body: Result<axum::Json<Credentials>, JsonRejection>,
    signup: bool,
) -> Response {
    if let Err(r) = s.sessions.available() {
        return refused(&r);
    }
    let axum::Json(c) = match body {
        Ok(b) => b,
        Err(e) => return crate::error(e.status(), "invalid_request", e.body_text()),
    };
    let status = if signup {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    session(s, enter(s, client, c, signup).await, status)
}

/// `POST /api/auth/signup`: a built-in account on the starter tier, and a session.
#[utoipa::path(post, path = "/api/auth/signup", tag = "auth", request_body = Credentials,
    responses(
        (status = 201, description = "`{token, user, expiresAt}`, and the session cookie", body = Object),
        (status = 400, description = "Malformed email or password", body = crate::openapi::ErrorBody),
        (status = 409, description = "The email has an account", body = crate::openapi::ErrorBody),
        (status = 429, description = "Too many attempts from this address or for this email", body = crate::openapi::ErrorBody)))]
pub(crate) async fn signup(
    axum::extract::State(s): Shared,
    client: ClientAddr,
    body: Result<axum::Json<Credentials>, JsonRejection>,
) -> Response {
    json_entry(&s, client, body, true).await
}

/// `POST /api/auth/login`: a session for the right email and password.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = Credentials,
    responses(
        (status = 200, description = "`{token, user, expiresAt}`, and the session cookie", body = Object),
        (status = 401, description = "Wrong email or password", body = crate::openapi::ErrorBody),
        (status = 429, description = "Too many attempts from this address or for this email", body = crate::openapi::ErrorBody)))]
pub(crate) async fn login(
    axum::extract::State(s): Shared,
    client: ClientAddr,
    body: Result<axum::Json<Credentials>, JsonRejection>,
) -> Response {
    json_entry(&s, client, body, false).await
}
