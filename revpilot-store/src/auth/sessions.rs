//! Built-in accounts and sessions as use cases ([`Sessions`]): who a token is, sign-up and
//! log-in rate-limited per client address and per email before any hashing, sessions issued and
//! ended across every server sharing the store. A front end extracts the token (a header, a
//! cookie) and the client's address, calls one method and renders its answer or its
//! [`Refusal`].

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use jsonwebtoken::Algorithm;
use revpilot_core::billing::{Catalog, ensure_profile};
use revpilot_core::guard::{KeyedBudget, Refusal, RefusalKind};
use revpilot_core::params::client_key;
use revpilot_core::ports::{CredentialStore, StoreError, Tier, UserId, UserStore};
use uuid::Uuid;

use super::session_id;
use super::{AuthError, Claims, Jwt, LEEWAY_SECS, LiveSessions, PasswordError, Passwords};

/// How long a built-in session lasts, seconds.
pub const SESSION_SECS: i64 = 12 * 3600;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "revpilot_session";

/// The longest email accepted (RFC 5321's path limit).
pub const MAX_EMAIL: usize = 254;

/// Sign-up and log-in attempts per minute, per client address and per email.
pub const ATTEMPTS_PER_MINUTE: u32 = 10;

/// Keys (client addresses and emails) the sign-up and log-in budget remembers at most.
pub const ATTEMPT_KEYS: usize = 100_000;

/// A signed session: its token, user, email and expiry (unix seconds).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Session {
    /// The token (a bearer token, or the cookie's value).
    pub token: String,
    /// The user.
    pub user: UserId,
    /// The trimmed email.
    pub email: String,
    /// When the token expires, unix seconds.
    pub expires_at: i64,
}

/// Users known to have a profile, so that a session's request does not read it again; bounded.
#[derive(Debug, Default)]
struct KnownUsers(std::sync::Mutex<std::collections::HashSet<UserId>>);

impl KnownUsers {
    /// Users remembered before the set starts over (a re-read is all forgetting costs).
    const CAPACITY: usize = 100_000;

    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<UserId>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, user: UserId) {
        let mut set = self.set();
        if set.len() >= Self::CAPACITY {
            set.clear();
        }
        set.insert(user);
    }
}

/// Accounts and sessions: the token verifiers, the password hashers and the attempt budget.
#[derive(Debug, Clone)]
pub struct Sessions {
    /// HS256 session tokens (built-in accounts, or a Supabase project's shared secret); `None`
    /// refuses HS256 tokens and disables sign-up and log-in.
    pub jwt: Option<Arc<Jwt>>,
    /// Asymmetric keys of an identity provider (RS256/ES256); `None` refuses such tokens.
    #[cfg(feature = "jwks")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwks")))]
    pub jwks: Option<Arc<super::jwks::Jwks>>,
    /// Password hashing: how many argon2 hashes run at once and how long an attempt waits.
    pub passwords: Passwords,
    /// Sign-up and log-in attempts per client address and per email: each costs an argon2 hash,
    /// and a password is not to be guessed at speed. Its map of keys is bounded.
    pub attempts: Arc<KeyedBudget<String>>,
    live: LiveSessions,
    known: Arc<KnownUsers>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            jwt: None,
            #[cfg(feature = "jwks")]
            jwks: None,
            passwords: Passwords::default(),
            attempts: Arc::new(KeyedBudget::per_minute(ATTEMPTS_PER_MINUTE, ATTEMPT_KEYS)),
            live: LiveSessions::default(),
            known: Arc::default(),
        }
    }
}

fn unauthorized() -> Refusal {
    Refusal::new(
        RefusalKind::Unauthorized,
        "unauthorized",
        "a valid session token is required",
    )
}

fn unavailable() -> Refusal {
    Refusal::new(
        RefusalKind::Unavailable,
        "auth_not_configured",
        "sessions are not configured on this server (JWT_SECRET)",
    )
}

const BAD_EMAIL: &str = "email must look like name@domain (at most 254 characters)";

/// Logs an internal failure; the client is told only that one happened.
fn logged(e: &dyn std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "authentication failed internally");
    Refusal::internal()
}

fn hash_failure(e: PasswordError) -> Refusal {
    match e {
        PasswordError::Busy => Refusal::busy("the server is busy; try again in a few seconds"),
        e => logged(&e),
    }
}

impl Sessions {
    /// These sessions with HS256 tokens signed with `secret` (at least 32 bytes; an empty or
    /// absent one leaves them off), requiring `iss` = `issuer` when given.
    ///
    /// # Errors
    /// [`AuthError`] for a secret too short.
    pub fn with_secret(
        mut self,
        secret: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<Self, AuthError> {
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            let secret = secrecy::SecretString::from(secret.to_owned());
            self.jwt = Some(Arc::new(Jwt::new(secret, issuer.map(str::to_owned))?));
        }
        Ok(self)
    }

    /// These sessions also accepting tokens signed with the keys of the JWKS at `url` (an
    /// empty or absent one leaves them off), requiring `iss` = `issuer` when given.
    ///
    /// # Errors
    /// [`AuthError`] for a URL that is not one, or no HTTP client.
    #[cfg(feature = "jwks")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwks")))]
    pub fn with_jwks(mut self, url: Option<&str>, issuer: Option<&str>) -> Result<Self, AuthError> {
        if let Some(url) = url.filter(|s| !s.is_empty()) {
            let parsed = url::Url::parse(url).map_err(|e| AuthError(format!("{url:?}: {e}")))?;
            let jwks = super::jwks::Jwks::new(parsed, issuer.map(str::to_owned))?;
            self.jwks = Some(Arc::new(jwks));
        }
        Ok(self)
    }

    /// Whether built-in accounts are available (a secret to sign sessions with is configured).
    ///
    /// # Errors
    /// [`RefusalKind::Unavailable`] without one.
    pub fn available(&self) -> Result<(), Refusal> {
        self.jwt.as_ref().map(|_| ()).ok_or_else(unavailable)
    }

    /// The verified claims of `token` at `now`: HS256 ones with the shared secret, others with
    /// the JWKS, never one with the other's keys.
    ///
    /// # Errors
    /// [`AuthError`] naming the problem.
    pub async fn verify(&self, token: &str, now: i64) -> Result<(UserId, Claims), AuthError> {
        // A session's later requests: its token was verified already.
        if let Some(verdict) = self.jwt.as_ref().and_then(|j| j.cached(token, now)) {
            return verdict;
        }
        let alg = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError(format!("header: {e}")))?
            .alg;
        match (alg, &self.jwt) {
            (Algorithm::HS256, Some(jwt)) => return jwt.verify(token, now),
            (Algorithm::HS256, None) => {
                return Err(AuthError("HS256 tokens are not accepted".into()));
            }
            _ => {}
        }
        #[cfg(feature = "jwks")]
        if let Some(jwks) = &self.jwks {
            return jwks.verify(token, now).await;
        }
        Err(AuthError(format!("{alg:?} tokens are not accepted")))
    }

    /// The user a session token stands for at `now`: verified, not ended (asked of the store at
    /// most once a second per session), and with a profile (a starter one on first sight).
    ///
    /// # Errors
    /// [`RefusalKind::Unauthorized`]; [`RefusalKind::Internal`] when the store fails (logged).
    pub async fn user<S>(
        &self,
        store: &S,
        catalog: &Catalog,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<UserId, Refusal>
    where
        S: CredentialStore + UserStore + ?Sized,
    {
        let (user, claims) = self.verify(token, now.timestamp()).await.map_err(|e| {
            tracing::debug!(error = %e, "token refused");
            unauthorized()
        })?;
        if self
            .live
            .ended(store, &session_id(token), now)
            .await
            .map_err(|e| logged(&e))?
        {
            tracing::debug!("an ended session was presented");
            return Err(unauthorized());
        }
        if self.known.set().contains(&user) {
            return Ok(user);
        }
        ensure_profile(store, catalog, user, claims.email.as_deref(), now)
            .await
            .map_err(|e| logged(&e))?;
        self.known.insert(user);
        Ok(user)
    }

    /// Refuses without a secret; otherwise spends one attempt of the client's budget, then (for
    /// an email of a possible length only) one of the email's, all before any hashing. An IPv6
    /// client is keyed by its /64, which one host usually holds whole.
    fn attempt(&self, client: Option<IpAddr>, email: &str) -> Result<Arc<Jwt>, Refusal> {
        let jwt = self.jwt.clone().ok_or_else(unavailable)?;
        let too_many = || Refusal::rate_limited("too many attempts; try again in a minute");
        if let Some(ip) = client
            && !self.attempts.check(&client_key(ip))
        {
            return Err(too_many());
        }
        let email = email.trim();
        if email.len() > MAX_EMAIL {
            return Err(Refusal::invalid(BAD_EMAIL));
        }
        if !self
            .attempts
            .check(&format!("email:{}", email.to_lowercase()))
        {
            return Err(too_many());
        }
        Ok(jwt)
    }

    /// Creates a built-in account on the starter tier for a client at `client`, and its session.
    ///
    /// # Errors
    /// Rate limits, a malformed email or password, a taken email, busy hashers, no secret.
    pub async fn sign_up<S: CredentialStore + ?Sized>(
        &self,
        store: &S,
        catalog: &Catalog,
        client: Option<IpAddr>,
        email: &str,
        password: String,
        now: DateTime<Utc>,
    ) -> Result<Session, Refusal> {
        let jwt = self.attempt(client, email)?;
        let email = email.trim();
        let at = email.find('@');
        if at.is_none_or(|i| i == 0 || i + 1 == email.len()) {
            return Err(Refusal::invalid(BAD_EMAIL));
        }
        if !(10..=1024).contains(&password.chars().count()) {
            return Err(Refusal::invalid(
                "the password must have 10 to 1024 characters",
            ));
        }
        let hash = self.passwords.hash(password).await.map_err(hash_failure)?;
        let user = UserId(Uuid::new_v4());
        let limits = catalog.plan(Tier::Starter).limits;
        match store
            .create_account(user, email, &hash, Tier::Starter, limits, now)
            .await
        {
            Ok(_) => issue(&jwt, user, email, now),
            Err(StoreError::Conflict(_)) => Err(Refusal::new(
                RefusalKind::Conflict,
                "email_taken",
                "an account with this email exists; log in instead",
            )),
            Err(e) => Err(logged(&e)),
        }
    }

    /// A session for the right email and password. A wrong email costs what a wrong password
    /// does.
    ///
    /// # Errors
    /// Rate limits, wrong credentials, busy hashers, no secret.
    pub async fn log_in<S: CredentialStore + ?Sized>(
        &self,
        store: &S,
        client: Option<IpAddr>,
        email: &str,
        password: String,
        now: DateTime<Utc>,
    ) -> Result<Session, Refusal> {
        let jwt = self.attempt(client, email)?;
        let email = email.trim();
        let found = store.credentials(email).await.map_err(|e| logged(&e))?;
        let (user, hash) = found.map_or((None, None), |(u, h)| (Some(u), Some(h)));
        let ok = self.passwords.verify(password, hash).await;
        match (user, ok.map_err(hash_failure)?) {
            (Some(user), true) => issue(&jwt, user, email, now),
            _ => Err(Refusal::new(
                RefusalKind::Unauthorized,
                "invalid_credentials",
                "wrong email or password",
            )),
        }
    }

    /// A session for a user whose identity the caller established (demo mode's log-in).
    ///
    /// # Errors
    /// No secret; the token could not be signed (logged).
    pub fn session_for(
        &self,
        user: UserId,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<Session, Refusal> {
        let jwt = self.jwt.as_ref().ok_or_else(unavailable)?;
        issue(jwt, user, email, now)
    }

    /// Ends the session of `token`, when it is a valid one: the store keeps its id until the
    /// token would have expired, and every server sharing the store refuses it from then on. A
    /// store failure is logged (the token then stays valid until it expires).
    pub async fn log_out<S: CredentialStore + ?Sized>(
        &self,
        store: &S,
        token: &str,
        now: DateTime<Utc>,
    ) {
        let Ok((_, claims)) = self.verify(token, now.timestamp()).await else {
            return;
        };
        let Some(expires) = DateTime::from_timestamp(claims.exp + LEEWAY_SECS, 0) else {
            return;
        };
        let session = session_id(token);
        self.live.forget(&session);
        if let Err(e) = store.end_session(&session, expires, now).await {
            tracing::error!(error = %e, "an ended session could not be recorded");
        }
    }
}

fn secure(https: bool) -> &'static str {
    if https { "; Secure" } else { "" }
}

impl Session {
    /// The `Set-Cookie` value that carries this session: `HttpOnly`, `SameSite=Lax`, and
    /// `Secure` when the app is served over `https` (the browser then never sends it over
    /// plain http).
    pub fn cookie(&self, https: bool) -> String {
        format!(
            "{SESSION_COOKIE}={}; HttpOnly; SameSite=Lax; Path=/; Max-Age={SESSION_SECS}{}",
            self.token,
            secure(https)
        )
    }

    /// The `Set-Cookie` value that ends a browser session (`Secure` as the session's is).
    pub fn clear_cookie(https: bool) -> String {
        format!(
            "{SESSION_COOKIE}=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0{}",
            secure(https)
        )
    }
}

fn issue(jwt: &Jwt, user: UserId, email: &str, now: DateTime<Utc>) -> Result<Session, Refusal> {
    let expires_at = now.timestamp() + SESSION_SECS;
    let token = jwt
        .issue(user, Some(email), expires_at)
        .map_err(|e| logged(&e))?;
    Ok(Session {
        token,
        user,
        email: email.to_owned(),
        expires_at,
    })
}

/// The session token in an `Authorization: Bearer` value, else in a `Cookie` header's values.
pub fn presented<'a>(
    authorization: Option<&'a str>,
    cookies: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| {
            cookies
                .into_iter()
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| *k == SESSION_COOKIE)
                .map(|(_, v)| v)
        })
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use revpilot_core::testing::MemoryStore;

    fn sessions() -> Sessions {
        let secret = Some("a-test-secret-of-at-least-32-bytes!!");
        let s = Sessions::default().with_secret(secret, None).unwrap();
        Sessions {
            passwords: Passwords::new(1, std::time::Duration::from_secs(5)),
            ..s
        }
    }

    #[tokio::test]
    async fn an_account_signs_up_logs_in_and_its_ended_session_is_refused() {
        let (store, catalog, now) = (MemoryStore::new(), Catalog::default(), Utc::now());
        let s = sessions();
        let pw = || "a good long password".to_owned();
        let up = s
            .sign_up(&store, &catalog, None, " a@b.example ", pw(), now)
            .await
            .unwrap();
        assert_eq!(up.email, "a@b.example");
        let again = s
            .sign_up(&store, &catalog, None, "a@b.example", pw(), now)
            .await;
        assert_eq!(again.unwrap_err().code, "email_taken");
        let wrong = s
            .log_in(&store, None, "a@b.example", "not it at all".into(), now)
            .await;
        assert_eq!(wrong.unwrap_err().kind, RefusalKind::Unauthorized);
        let session = s
            .log_in(&store, None, "a@b.example", pw(), now)
            .await
            .unwrap();
        assert_eq!(session.user, up.user);
        assert_eq!(
            s.user(&store, &catalog, &session.token, now).await,
            Ok(up.user)
        );
        s.log_out(&store, &session.token, now).await;
        let refused = s
            .user(&store, &catalog, &session.token, now)
            .await
            .unwrap_err();
        assert_eq!(refused.kind, RefusalKind::Unauthorized);
        // The other session of the same user goes on.
        assert_eq!(s.user(&store, &catalog, &up.token, now).await, Ok(up.user));
        let garbage = s.user(&store, &catalog, "not.a.token", now).await;
        assert_eq!(garbage.unwrap_err().code, "unauthorized");
    }

    #[tokio::test]
    async fn malformed_credentials_and_too_many_attempts_are_refused_before_any_hash() {
        let (store, catalog, now) = (MemoryStore::new(), Catalog::default(), Utc::now());
        let s = sessions();
        let short = s.sign_up(&store, &catalog, None, "a@b.example", "short".into(), now);
        assert_eq!(short.await.unwrap_err().kind, RefusalKind::Invalid);
        let long = "x".repeat(MAX_EMAIL) + "@b.example";
        let long = s
            .log_in(&store, None, &long, "whatever it is".into(), now)
            .await;
        assert_eq!(long.unwrap_err().kind, RefusalKind::Invalid);
        let client = Some(IpAddr::from([203, 0, 113, 7]));
        let mut refused = 0;
        for i in 0..=ATTEMPTS_PER_MINUTE {
            let email = format!("u{i}@b.example");
            let r = s
                .log_in(&store, client, &email, "whatever it is".into(), now)
                .await;
            refused += usize::from(r.is_err_and(|r| r.kind == RefusalKind::TooMany));
        }
        assert_eq!(refused, 1, "one attempt past the client's budget");
        let off = Sessions::default();
        let r = off
            .log_in(&store, None, "a@b.example", "whatever it is".into(), now)
            .await;
        assert_eq!(r.unwrap_err().code, "auth_not_configured");
    }

    #[test]
    fn the_token_is_the_bearer_else_the_session_cookie() {
        let cookies = ["theme=dark; revpilot_session=abc ", "other=1"];
        assert_eq!(presented(Some("Bearer xyz"), cookies), Some("xyz"));
        assert_eq!(presented(None, cookies), Some("abc"));
        assert_eq!(presented(Some("Basic xyz"), ["x=1"]), None);
        let session = Session {
            token: "t".into(),
            user: UserId(Uuid::nil()),
            email: String::new(),
            expires_at: 0,
        };
        assert!(session.cookie(true).ends_with("; Secure"));
        assert!(!session.cookie(false).contains("Secure"));
        assert!(Session::clear_cookie(false).contains("Max-Age=0"));
    }
}
