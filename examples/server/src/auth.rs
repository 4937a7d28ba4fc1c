//! Who is calling: a JWT in `Authorization: Bearer ...`, HS256 with a shared secret
//! (`JWT_SECRET`, which is also how Supabase signs its tokens when configured with its JWT
//! secret). The algorithm is pinned (`alg: none` and any other algorithm, including the RS256 /
//! HS256 confusion, are refused), `exp` and `sub` are required, `aud` must be `authenticated`,
//! and `iss` is checked when configured. The user is `sub`, a UUID; a user seen for the first
//! time gets a starter profile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use revpilot_core::ports::{StoreError, Tier, UserId};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AppState;

/// Clock skew allowed on `exp`, seconds.
pub const LEEWAY_SECS: i64 = 30;

/// The furthest in the future a token may expire, seconds from now (a week: built-in sessions
/// last 12 h, Supabase's an hour by default and at most a week). A token valid for years is a
/// leaked signing key's or a mistake's, not a session's.
pub const MAX_LIFETIME_SECS: i64 = 7 * 24 * 3600;

/// The audience every accepted token carries (Supabase's).
pub const AUDIENCE: &str = "authenticated";

/// The claims read from a session token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id (UUID).
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Audience.
    pub aud: String,
    /// Issuer, when the deployment sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Email, when the issuer includes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Not before, unix seconds, when the issuer sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// A random id: two sessions of one user issued in the same second are still two tokens,
    /// so that logging one out leaves the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// Verifies (and, for built-in sessions and tests, issues) session tokens.
#[derive(Clone)]
pub struct Jwt {
    secret: SecretString,
    issuer: Option<String>,
    verified: Verified,
}

/// Verified tokens kept before the cache starts over.
pub const VERIFIED_TOKENS: usize = 10_000;

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused (the message is for logs; callers get a plain 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

impl Jwt {
    /// HS256 with `secret`; `issuer` checked when given.
    ///
    /// # Errors
    /// [`AuthError`] for a secret shorter than 32 bytes.
    pub fn new(secret: SecretString, issuer: Option<String>) -> Result<Jwt, AuthError> {
        if secret.expose_secret().len() < 32 {
            return Err(AuthError("JWT_SECRET must be at least 32 bytes".to_owned()));
        }
        Ok(Jwt {
            secret,
            issuer,
            verified: Verified::default(),
        })
    }

    /// A token for `user` valid until `exp` (unix seconds).
    ///
    /// # Errors
    /// [`AuthError`] when signing fails.
    pub fn issue(&self, user: UserId, email: Option<&str>, exp: i64) -> Result<String, AuthError> {
        let claims = Claims {
            sub: user.to_string(),
            exp,
            aud: AUDIENCE.to_owned(),
            iss: self.issuer.clone(),
            email: email.map(str::to_owned),
            nbf: None,
            jti: Some(Uuid::new_v4().simple().to_string()),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(self.secret.expose_secret().as_bytes()),
        )
        .map_err(|e| AuthError(e.to_string()))
    }

    /// The verified claims of `token` at `now` (unix seconds; the server's injectable clock).
    ///
    /// # Errors
    /// [`AuthError`] naming the problem: signature, algorithm, expiry, audience, issuer, subject.
    pub fn verify(&self, token: &str, now: i64) -> Result<(UserId, Claims), AuthError> {
        if let Some(verdict) = self.verified.get(token, now) {
            return verdict;
        }
        let verified = self.verify_uncached(token, now)?;
        self.verified.put(token, &verified);
        Ok(verified)
    }

    fn verify_uncached(&self, token: &str, now: i64) -> Result<(UserId, Claims), AuthError> {
        check_claims(
            token,
            &DecodingKey::from_secret(self.secret.expose_secret().as_bytes()),
            Algorithm::HS256,
            self.issuer.as_deref(),
            now,
        )
    }
}

/// Decodes `token`, which must be signed with `alg` under `key`, and checks its claims at `now`:
/// `exp` (with [`LEEWAY_SECS`]), `aud` = [`AUDIENCE`], a `sub` that is a user id, and `iss` when
/// `issuer` is given.
///
/// # Errors
/// [`AuthError`] naming the problem.
pub(crate) fn check_claims(
    token: &str,
    key: &DecodingKey,
    alg: Algorithm,
    issuer: Option<&str>,
    now: i64,
) -> Result<(UserId, Claims), AuthError> {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    // Expiry is checked below against `now`, not the system clock.
    v.validate_exp = false;
    if let Some(iss) = issuer {
        // Without `iss` among the required claims, a token lacking it would pass.
        v.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        v.set_issuer(&[iss]);
    }
    let data = decode::<Claims>(token, key, &v).map_err(|e| AuthError(e.to_string()))?;
    if data.claims.exp + LEEWAY_SECS < now {
        return Err(AuthError("the token has expired".into()));
    }
    if data.claims.exp > now.saturating_add(MAX_LIFETIME_SECS) {
        return Err(AuthError("the token expires implausibly late".into()));
    }
    if data.claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECS) {
        return Err(AuthError("the token is not valid yet".into()));
    }
    let user =
        Uuid::parse_str(&data.claims.sub).map_err(|_| AuthError("sub is not a user id".into()))?;
    Ok((UserId(user), data.claims))
}

/// Tokens whose signature and claims were verified. A token's verdict depends only on it, the
/// keys and the issuer (fixed for a verifier) and the time, which is checked again on every use;
/// this saves the decoding and the signature check on a session's later requests.
#[derive(Debug, Default, Clone)]
pub(crate) struct Verified(Arc<Mutex<HashMap<String, (UserId, Claims)>>>);

impl Verified {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (UserId, Claims)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verdict on a token verified before, its expiry checked at `now`.
    pub(crate) fn get(&self, token: &str, now: i64) -> Option<Result<(UserId, Claims), AuthError>> {
        let found = self.lock().get(token).cloned()?;
        Some(if found.1.exp + LEEWAY_SECS < now {
            Err(AuthError("the token has expired".into()))
        } else {
            Ok(found)
        })
    }

    /// Keeps a verified token.
    pub(crate) fn put(&self, token: &str, verified: &(UserId, Claims)) {
        let mut cache = self.lock();
        if cache.len() >= VERIFIED_TOKENS {
            cache.clear();
        }
        cache.insert(token.to_owned(), verified.clone());
    }
}

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
        match state.store.session_ended(&session_id(token)).await {
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
        match state.store.user(user).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let limits = state.catalog.plan(Tier::Starter).limits;
                let now = (state.clock)();
                let created = match state
                    .store
                    .create_user(user, claims.email.as_deref(), Tier::Starter, limits, now)
                    .await
                {
                    // The email belongs to another profile: this one goes without it.
                    Err(StoreError::Conflict(_)) if claims.email.is_some() => {
                        state
                            .store
                            .create_user(user, None, Tier::Starter, limits, now)
                            .await
                    }
                    other => other,
                };
                match created {
                    // Conflict: a concurrent request created it first.
                    Ok(_) | Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(crate::internal(&e)),
                }
            }
            Err(e) => return Err(crate::internal(&e)),
        }
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
    if let Some(verdict) = state.jwt.as_ref().and_then(|j| j.verified.get(token, now)) {
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

/// A PHC hash of an unguessable password, verified when the email is unknown so that a wrong
/// email costs what a wrong password does.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    hash_password("an unguessable placeholder password").unwrap_or_default()
});

thread_local! {
    /// The argon2 memory of this hashing thread (~19 MiB with the default parameters),
    /// allocated on its first hash and reused by every later one. Allocating it per hash (what
    /// `Argon2::hash_password` does) let the allocator keep up to three freed copies per arena
    /// once other threads' small allocations split them: a storm of wrong logins left ~390 MiB
    /// with two hashing threads. Reused, it is `REVPILOT_AUTH_CONCURRENCY` x 19 MiB for good.
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `blocks` blocks of this thread's argon2 memory.
fn with_argon2_memory<T>(blocks: usize, f: impl FnOnce(&mut [argon2::Block]) -> T) -> T {
    ARGON2_MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::new());
        }
        f(&mut memory[..blocks])
    })
}

/// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) of `password` with argon2's
/// default parameters and a fresh salt.
fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
    let argon2 = argon2::Argon2::default();
    let params = argon2.params();
    let salt = argon2::password_hash::try_generate_salt().map_err(|e| e.to_string())?;
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    with_argon2_memory(params.block_count(), |memory| {
        argon2.hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, memory)
    })
    .map_err(|e| e.to_string())?;
    let phc = PasswordHash {
        algorithm: argon2::Algorithm::default().ident(),
        version: Some(argon2::Version::default().into()),
        params: ParamsString::try_from(params).map_err(|e| e.to_string())?,
        salt: Some(Salt::new(&salt).map_err(|e| e.to_string())?),
        hash: Some(Output::new(&out).map_err(|e| e.to_string())?),
    };
    Ok(phc.to_string())
}

/// Whether `password` is the one `hash` (a PHC string from [`hash_password`]) was made from.
/// A hash whose memory cost is above the default's is not verified: this server never writes
/// one, and verifying it would grow the thread's memory for good.
fn password_matches(password: &str, hash: &str) -> bool {
    use argon2::password_hash::phc::{Output, PasswordHash};
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        argon2::Algorithm::try_from(parsed.algorithm.as_str()),
        argon2::Params::try_from(&parsed),
    ) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let blocks = params.block_count();
    if blocks > argon2::Params::default().block_count() {
        tracing::error!(
            blocks,
            "a stored password hash costs more memory than allowed"
        );
        return false;
    }
    let mut out = vec![0u8; expected.len()];
    let argon2 = argon2::Argon2::new(algorithm, version, params);
    let hashed = with_argon2_memory(blocks, |memory| {
        argon2.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, memory)
    });
    // `Output`'s equality is constant-time.
    hashed.is_ok() && Output::new(&out).is_ok_and(|computed| computed == *expected)
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
    if let Err(e) = state
        .store
        .end_session(&session_id(token), expires, (state.clock)())
        .await
    {
        // The cookie is cleared all the same; the token stays valid until it expires.
        tracing::error!(error = %e, "an ended session could not be recorded");
    }
}

/// The id a session is ended under: the SHA-256 of its token, hex (64 bytes, whatever the token's
/// length).
fn session_id(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
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

/// The client's address: the TCP peer's, unless the peer is one of the trusted proxies
/// (`REVPILOT_TRUSTED_PROXIES`, none by default): then the address its `X-Forwarded-For` names,
/// read from the right past every trusted proxy (a client can put anything at the left of that
/// header, never at its right). With no trusted proxy the header is ignored.
pub fn client_behind(
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[std::net::IpAddr],
) -> std::net::IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        match hop.trim().parse::<std::net::IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            // Garbage: the last trusted hop's view is all there is.
            Err(_) => break,
        }
    }
    client
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
        Ok(ClientAddr(peer.map(|p| {
            client_behind(p, &parts.headers, &state.trusted_proxies)
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

/// The rate-limit key of a client address.
fn client_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("ip:{v4}"),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Runs `f` (an argon2 hash or verification: ~19 MiB and tens of milliseconds each) on one of
/// the server's hashing threads once one is free (`REVPILOT_AUTH_CONCURRENCY` of them), waiting
/// at most `REVPILOT_AUTH_WAIT_MS`: however many clients try at once, memory and threads stay
/// bounded, and the ones that cannot be served soon are told to come back.
///
/// The threads are dedicated, not tokio's blocking pool: each keeps its 19 MiB of argon2 memory
/// for good (see `ARGON2_MEMORY`), so there must be exactly as many as slots (measured: 657 MiB
/// after 200 logins with 2 slots on the blocking pool, when each hash allocated its own).
async fn hashing<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AuthFailure> {
    let limits = &state.auth_limits;
    let slot = match tokio::time::timeout(limits.wait, limits.slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) | Err(_) => {
            metrics::counter!("revpilot_auth_busy_total").increment(1);
            return Err(AuthFailure::Busy);
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: HashJob = Box::new(move || {
        let _ = tx.send(f());
        drop(slot);
    });
    if limits.pool().send(job).is_err() {
        return Err(logged(&"the hashing threads are gone"));
    }
    rx.await.map_err(|e| logged(&e))
}

type HashJob = Box<dyn FnOnce() + Send>;

/// How many argon2 computations run at once, and how long a request waits for a slot.
#[derive(Debug, Clone)]
pub struct AuthLimits {
    /// The slots (one per hashing thread).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The longest wait for a slot before answering 503.
    pub wait: std::time::Duration,
    threads: usize,
    pool: Arc<std::sync::OnceLock<std::sync::mpsc::Sender<HashJob>>>,
}

impl AuthLimits {
    /// `concurrency` hashes at once, waiting at most `wait`.
    pub fn new(concurrency: usize, wait: std::time::Duration) -> Self {
        AuthLimits {
            slots: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            wait,
            threads: concurrency.max(1),
            pool: Arc::default(),
        }
    }

    /// The hashing threads' queue, started on first use.
    fn pool(&self) -> &std::sync::mpsc::Sender<HashJob> {
        self.pool.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..self.threads {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("revpilot-hash-{i}"))
                    .spawn(move || {
                        loop {
                            let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                            match job {
                                Ok(job) => job(),
                                // Every sender is gone: the state was dropped.
                                Err(_) => break,
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "a hashing thread did not start");
                }
            }
            tx
        })
    }
}

impl Default for AuthLimits {
    /// One slot per core (at least two), two seconds' wait.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        AuthLimits::new(cores.max(2), std::time::Duration::from_secs(2))
    }
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
    let hash = match hashing(state, move || hash_password(&c.password)).await? {
        Ok(h) => h,
        Err(e) => return Err(logged(&e)),
    };
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
    let password = c.password;
    // The placeholder hash, too, is made in a hashing slot (once, on first use).
    let ok = hashing(state, move || {
        password_matches(&password, hash.as_deref().unwrap_or(&DUMMY_HASH))
    })
    .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(issuer: Option<&str>) -> Jwt {
        Jwt::new(
            SecretString::from("a-unit-test-secret-of-32-bytes-or-more"),
            issuer.map(str::to_owned),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn password_hashes_are_standard_phc_and_reuse_the_threads_memory() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let ours = hash_password("correct horse battery").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        // argon2's own verifier takes it, and ours takes argon2's own hashes (older accounts).
        assert!(
            argon2::Argon2::default()
                .verify_password(b"correct horse battery", ours.as_str())
                .is_ok()
        );
        let theirs = argon2::Argon2::default()
            .hash_password(b"correct horse battery")
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string();
        for hash in [&ours, &theirs] {
            assert!(password_matches("correct horse battery", hash));
            assert!(!password_matches("correct horse battery!", hash));
        }
        assert_ne!(
            ours,
            hash_password("correct horse battery").unwrap_or_default(),
            "salted"
        );
        // One thread's memory, allocated once.
        let len = ARGON2_MEMORY.with_borrow(Vec::len);
        assert_eq!(len, argon2::Params::default().block_count());
        // Not hashes, or hashes asking for more memory than the default, never match.
        let costly = "$argon2id$v=19$m=262144,t=2,p=1$c2FsdHNhbHRzYWx0$MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI";
        for bad in ["", "plain", "$argon2id$v=19$m=19456,t=2,p=1$", costly] {
            assert!(!password_matches("correct horse battery", bad), "{bad}");
        }
        assert_eq!(ARGON2_MEMORY.with_borrow(Vec::len), len);
    }

    #[test]
    fn a_verified_token_still_expires_and_the_issuer_is_checked() {
        let j = jwt(None);
        let user = UserId(Uuid::new_v4());
        let token = j.issue(user, None, 1_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.verify(&token, 900).map(|v| v.0), Ok(user));
        // Served from the cache, still checked against the time.
        assert_eq!(j.verify(&token, 1_000 + LEEWAY_SECS).map(|v| v.0), Ok(user));
        assert!(j.verify(&token, 1_001 + LEEWAY_SECS).is_err());

        // JWT_ISSUER: a token without it, or from another issuer, is refused.
        let strict = jwt(Some("https://auth.example"));
        assert!(strict.verify(&token, 900).is_err(), "no iss");
        let other = jwt(Some("https://other.example"))
            .issue(user, None, 1_000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(strict.verify(&other, 900).is_err(), "another iss");
        let own = strict
            .issue(user, None, 1_000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(strict.verify(&own, 900).map(|v| v.0), Ok(user));
    }

    #[test]
    fn a_token_not_valid_yet_or_valid_for_ever_is_refused() {
        let j = jwt(None);
        let user = UserId(Uuid::new_v4());
        let now = 1_700_000_000;
        let sign = |exp: i64, nbf: Option<i64>| {
            encode(
                &Header::new(Algorithm::HS256),
                &Claims {
                    sub: user.to_string(),
                    exp,
                    aud: AUDIENCE.to_owned(),
                    iss: None,
                    email: None,
                    nbf,
                    jti: None,
                },
                &EncodingKey::from_secret(b"a-unit-test-secret-of-32-bytes-or-more"),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(j.verify(&sign(now + 3_600, None), now).is_ok());
        assert!(j.verify(&sign(now + 3_600, Some(now)), now).is_ok());
        assert!(
            j.verify(&sign(now + 3_600, Some(now + 600)), now).is_err(),
            "nbf in the future"
        );
        // exp in 9999.
        assert!(j.verify(&sign(253_402_300_799, None), now).is_err());
        assert!(
            j.verify(&sign(now + MAX_LIFETIME_SECS + 60, None), now)
                .is_err()
        );
    }
}
