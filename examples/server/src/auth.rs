//! Who is calling: a JWT in `Authorization: Bearer ...` or the session cookie, HS256 with a
//! shared secret (`JWT_SECRET`, which is also how Supabase signs its tokens when configured with
//! its JWT secret) or a JWKS key; the checks are `revpilot_store::auth`'s. A user seen for the
//! first time gets a starter profile. Built-in accounts: sign-up and log-in, rate-limited per
//! client address and email, with argon2id hashes on the library's bounded hashing threads.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::Algorithm;
use revpilot_core::billing::ensure_profile;
use revpilot_core::params::{client_behind, client_key};
use revpilot_core::ports::{StoreError, Tier, UserId};
use revpilot_store::auth::{PasswordError, session_id};
use serde::Deserialize;
use uuid::Uuid;

use crate::AppState;

pub use revpilot_store::auth::{
    AUDIENCE, AuthError, Claims, Jwt, LEEWAY_SECS, MAX_LIFETIME_SECS, Passwords,
};

/// The authenticated caller; every API route but the webhooks and health takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser(pub UserId);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let unauthorized = || {
            crate::error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid session token is required",
            )
        };
        let token = presented(&parts.headers).ok_or_else(unauthorized)?;
        let (user, claims) = verify(state, token).await.map_err(|e| {
            tracing::debug!(error = %e, "token refused");
            unauthorized()
        })?;
        let (now, session) = ((state.clock)(), session_id(token));
        match state.sessions.ended(&*state.store, &session, now).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::debug!("an ended session was presented");
                return Err(unauthorized());
            }
            Err(e) => return Err(crate::internal(&e)),
        }
        // First sight of a user: a starter profile. A user this process has seen has one.
        if state.known_users.contains(user) {
            return Ok(AuthUser(user));
        }
        let email = claims.email.as_deref();
        ensure_profile(state.store.as_ref(), &state.catalog, user, email, now)
            .await
            .map_err(|e| crate::internal(&e))?;
        state.known_users.insert(user);
        Ok(AuthUser(user))
    }
}

/// Users known to have a profile, so that a session's request does not read it again.
#[derive(Debug, Default)]
pub struct KnownUsers(std::sync::Mutex<std::collections::HashSet<UserId>>);

impl KnownUsers {
    /// Users remembered before the set starts over (a re-read is all forgetting costs).
    pub const CAPACITY: usize = 100_000;

    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<UserId>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn contains(&self, user: UserId) -> bool {
        self.set().contains(&user)
    }

    fn insert(&self, user: UserId) {
        let mut set = self.set();
        if set.len() >= Self::CAPACITY {
            set.clear();
        }
        set.insert(user);
    }
}

/// Verifies a session token: HS256 ones with `JWT_SECRET`, others with the JWKS
/// (`SUPABASE_JWKS_URL`), never one with the other's keys.
async fn verify(state: &AppState, token: &str) -> Result<(UserId, Claims), AuthError> {
    let now = (state.clock)().timestamp();
    // A session's later requests: its token was verified already.
    if let Some(verdict) = state.jwt.as_ref().and_then(|j| j.cached(token, now)) {
        return verdict;
    }
    let alg = jsonwebtoken::decode_header(token)
        .map_err(|e| AuthError(format!("header: {e}")))?
        .alg;
    match (alg, &state.jwt, &state.jwks) {
        (Algorithm::HS256, Some(jwt), _) => jwt.verify(token, now),
        (Algorithm::HS256, None, _) => Err(AuthError("HS256 tokens are not accepted".into())),
        (_, _, Some(jwks)) => jwks.verify(token, now).await,
        (other, _, None) => Err(AuthError(format!("{other:?} tokens are not accepted"))),
    }
}

/// The session cookie's name (set by sign-up and log-in, for browsers: the Connect callback and
/// the dashboard are plain navigations without an `Authorization` header).
pub const SESSION_COOKIE: &str = "revpilot_session";

/// The session token a request carries: `Authorization: Bearer`, else the session cookie.
fn presented(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| session_cookie(headers))
        .map(str::trim)
}

fn session_cookie(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

/// How long a built-in session lasts, seconds.
pub const SESSION_SECS: i64 = 12 * 3600;

/// `POST /api/auth/signup` and `/api/auth/login` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Email.
    pub email: String,
    /// Password (10 to 1024 characters).
    pub password: String,
}

/// The trimmed email, or what is wrong with the credentials.
fn check(c: &Credentials) -> Result<String, &'static str> {
    let email = c.email.trim();
    let at = email.find('@');
    if email.len() > 254 || at.is_none_or(|i| i == 0 || i + 1 == email.len()) {
        return Err("email must look like name@domain (at most 254 characters)");
    }
    let n = c.password.chars().count();
    if !(10..=1024).contains(&n) {
        return Err("the password must have 10 to 1024 characters");
    }
    Ok(email.to_owned())
}

/// A signed session for `user` and its `Set-Cookie` value: `(token, expires_at, cookie)`.
pub(crate) fn issue_session(
    state: &AppState,
    jwt: &Jwt,
    user: UserId,
    email: &str,
) -> Result<(String, i64, String), AuthError> {
    let exp = (state.clock)().timestamp() + SESSION_SECS;
    let token = jwt.issue(user, Some(email), exp)?;
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Lax; Path=/; Max-Age={SESSION_SECS}{}",
        secure(state)
    );
    Ok((token, exp, cookie))
}

/// `; Secure` when the app is served over https (`REVPILOT_APP_URL`): the browser then never
/// sends the session over plain http.
fn secure(state: &AppState) -> &'static str {
    if state.app_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    }
}

/// The `Set-Cookie` value that ends a browser session.
pub const CLEAR_SESSION_COOKIE: &str =
    "revpilot_session=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0";

/// [`CLEAR_SESSION_COOKIE`], `Secure` as the session cookie is.
pub(crate) fn clear_session_cookie(state: &AppState) -> String {
    format!("{CLEAR_SESSION_COOKIE}{}", secure(state))
}

/// Ends the session the request carries (bearer or cookie), when it is a valid one: the store
/// keeps its id until the token would have expired, and every server sharing the store refuses
/// the token from then on.
pub(crate) async fn end_session(state: &AppState, headers: &axum::http::HeaderMap) {
    let Some(token) = presented(headers) else {
        return;
    };
    let Ok((_, claims)) = verify(state, token).await else {
        return;
    };
    let Some(expires) = chrono::DateTime::from_timestamp(claims.exp + LEEWAY_SECS, 0) else {
        return;
    };
    state.sessions.forget(&session_id(token));
    if let Err(e) = state
        .store
        .end_session(&session_id(token), expires, (state.clock)())
        .await
    {
        // The cookie is cleared all the same; the token stays valid until it expires.
        tracing::error!(error = %e, "an ended session could not be recorded");
    }
}

fn session(state: &AppState, jwt: &Jwt, user: UserId, email: &str) -> Response {
    match issue_session(state, jwt, user, email) {
        Ok((token, exp, cookie)) => (
            [(axum::http::header::SET_COOKIE, cookie)],
            axum::Json(serde_json::json!({
                "token": token,
                "user": user,
                "expiresAt": exp,
            })),
        )
            .into_response(),
        Err(e) => crate::internal(&e),
    }
}

/// The client's address, when the server was started with connection info (`main.rs` is).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, std::convert::Infallible> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let forwarded = parts.headers.get_all("x-forwarded-for");
        let forwarded = forwarded.iter().filter_map(|v| v.to_str().ok());
        Ok(ClientAddr(peer.map(|p| {
            client_behind(p, forwarded, &state.trusted_proxies)
        })))
    }
}

/// The longest email accepted (RFC 5321's path limit).
pub const MAX_EMAIL: usize = 254;

/// Refuses sign-up and log-in without `JWT_SECRET`; otherwise spends one attempt of the client's
/// budget, then (for an email of a possible length only: the key is built after the check) one of
/// the email's, all before any hashing. An IPv6 client is keyed by its /64, which one host
/// usually holds whole.
fn attempt(state: &AppState, client: ClientAddr, email: &str) -> Result<(), AuthFailure> {
    if state.jwt.is_none() {
        return Err(AuthFailure::Unavailable);
    }
    if let Some(ip) = client.0
        && !state.attempts.check(&client_key(ip))
    {
        return Err(AuthFailure::TooMany);
    }
    let email = email.trim();
    if email.len() > MAX_EMAIL {
        return Err(AuthFailure::Invalid(
            "email must look like name@domain (at most 254 characters)",
        ));
    }
    if !state
        .attempts
        .check(&format!("email:{}", email.to_lowercase()))
    {
        return Err(AuthFailure::TooMany);
    }
    Ok(())
}

/// Why sign-up or log-in did not give a session.
#[derive(Debug)]
pub(crate) enum AuthFailure {
    /// Too many attempts from this address or for this email.
    TooMany,
    /// Every hashing slot stayed busy for the whole wait.
    Busy,
    /// No `JWT_SECRET`.
    Unavailable,
    /// Malformed email or password.
    Invalid(&'static str),
    /// The email has an account.
    Taken,
    /// Wrong email or password.
    Wrong,
    /// The store or the hasher failed (logged).
    Internal,
}

impl AuthFailure {
    /// Status, code and message (never the cause of an internal failure).
    pub(crate) fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            AuthFailure::TooMany => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many attempts; try again in a minute",
            ),
            AuthFailure::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the server is busy; try again in a few seconds",
            ),
            AuthFailure::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_not_configured",
                "sessions are not configured on this server (JWT_SECRET)",
            ),
            AuthFailure::Invalid(why) => (StatusCode::BAD_REQUEST, "invalid_request", why),
            AuthFailure::Taken => (
                StatusCode::CONFLICT,
                "email_taken",
                "an account with this email exists; log in instead",
            ),
            AuthFailure::Wrong => (
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "wrong email or password",
            ),
            AuthFailure::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "something went wrong on the server",
            ),
        }
    }

    fn response(&self) -> Response {
        let (status, code, message) = self.parts();
        let mut r = crate::error(status, code, message);
        if matches!(self, AuthFailure::Busy) {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("2"),
            );
        }
        r
    }
}

/// A password computation's failure: busy (counted), else internal (logged).
fn hash_failure(e: PasswordError) -> AuthFailure {
    match e {
        PasswordError::Busy => {
            metrics::counter!("revpilot_auth_busy_total").increment(1);
            AuthFailure::Busy
        }
        e => logged(&e),
    }
}

fn logged(e: &dyn std::fmt::Display) -> AuthFailure {
    tracing::error!(error = %e, "authentication failed internally");
    AuthFailure::Internal
}

/// Creates a built-in account on the starter tier; its user and trimmed email.
pub(crate) async fn create_account(
    state: &AppState,
    client: ClientAddr,
    c: Credentials,
) -> Result<(UserId, String), AuthFailure> {
    attempt(state, client, &c.email)?;
    let email = check(&c).map_err(AuthFailure::Invalid)?;
    let hash = state
        .passwords
        .hash(c.password)
        .await
        .map_err(hash_failure)?;
    let user = UserId(Uuid::new_v4());
    let limits = state.catalog.plan(Tier::Starter).limits;
    match state
        .store
        .create_account(user, &email, &hash, Tier::Starter, limits, (state.clock)())
        .await
    {
        Ok(_) => Ok((user, email)),
        Err(StoreError::Conflict(_)) => Err(AuthFailure::Taken),
        Err(e) => Err(logged(&e)),
    }
}

/// The user whose email and password these are.
pub(crate) async fn authenticate(
    state: &AppState,
    client: ClientAddr,
    c: Credentials,
) -> Result<(UserId, String), AuthFailure> {
    attempt(state, client, &c.email)?;
    let email = c.email.trim().to_owned();
    let found = state
        .store
        .credentials(&email)
        .await
        .map_err(|e| logged(&e))?;
    let (user, hash) = match found {
        Some((u, h)) => (Some(u), Some(h)),
        None => (None, None),
    };
    let ok = state.passwords.verify(c.password, hash).await;
    let ok = ok.map_err(hash_failure)?;
    match (user, ok) {
        (Some(user), true) => Ok((user, email)),
        _ => Err(AuthFailure::Wrong),
    }
}

/// `POST /api/auth/signup`: a built-in account on the starter tier, and a session.
#[utoipa::path(post, path = "/api/auth/signup", tag = "auth", request_body = Credentials,
    responses(
        (status = 201, description = "`{token, user, expiresAt}`, and the session cookie", body = Object),
        (status = 400, description = "Malformed email or password", body = crate::openapi::ErrorBody),
        (status = 409, description = "The email has an account", body = crate::openapi::ErrorBody),
        (status = 429, description = "Too many attempts from this address or for this email", body = crate::openapi::ErrorBody)))]
pub(crate) async fn signup(
    axum::extract::State(state): axum::extract::State<AppState>,
    client: ClientAddr,
    body: Result<axum::Json<Credentials>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(jwt) = state.jwt.clone() else {
        return AuthFailure::Unavailable.response();
    };
    let axum::Json(c) = match body {
        Ok(b) => b,
        Err(e) => return crate::error(e.status(), "invalid_request", e.body_text()),
    };
    match create_account(&state, client, c).await {
        Ok((user, email)) => {
            let mut r = session(&state, &jwt, user, &email);
            *r.status_mut() = StatusCode::CREATED;
            r
        }
        Err(f) => f.response(),
    }
}

/// `POST /api/auth/login`: a session for the right email and password.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = Credentials,
    responses(
        (status = 200, description = "`{token, user, expiresAt}`, and the session cookie", body = Object),
        (status = 401, description = "Wrong email or password", body = crate::openapi::ErrorBody),
        (status = 429, description = "Too many attempts from this address or for this email", body = crate::openapi::ErrorBody)))]
pub(crate) async fn login(
    axum::extract::State(state): axum::extract::State<AppState>,
    client: ClientAddr,
    body: Result<axum::Json<Credentials>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(jwt) = state.jwt.clone() else {
        return AuthFailure::Unavailable.response();
    };
    let axum::Json(c) = match body {
        Ok(b) => b,
        Err(e) => return crate::error(e.status(), "invalid_request", e.body_text()),
    };
    match authenticate(&state, client, c).await {
        Ok((user, email)) => session(&state, &jwt, user, &email),
        Err(f) => f.response(),
    }
}
