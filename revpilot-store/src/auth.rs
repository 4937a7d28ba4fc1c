//! Sessions and passwords for an application's own accounts (feature `auth`): HS256 session
//! tokens ([`Jwt`], [`check_claims`] for any key), the ids ended sessions are stored under
//! ([`session_id`], for `CredentialStore::end_session`), and argon2id password hashes computed on
//! a bounded set of threads ([`Passwords`]).
//!
//! Tokens: the algorithm is pinned (`alg: none` and any other algorithm, including the RS256 /
//! HS256 confusion, are refused), `exp` and `sub` are required, `aud` must be `authenticated`,
//! `iss` is checked when configured, `nbf` is honoured, and a token expiring more than a week
//! ahead is refused. The user is `sub`, a UUID.

#[cfg(feature = "jwks")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwks")))]
pub mod jwks;
pub mod sessions;

pub use sessions::{SESSION_COOKIE, SESSION_SECS, Session, Sessions, presented};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use revpilot_core::ports::{CredentialStore, StoreResult, UserId};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

    /// The verdict on `token` if it was verified before (its expiry checked at `now`): a
    /// session's later requests skip decoding it.
    pub fn cached(&self, token: &str, now: i64) -> Option<Result<(UserId, Claims), AuthError>> {
        self.verified.get(token, now)
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
pub fn check_claims(
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
pub struct Verified(Arc<Mutex<HashMap<String, (UserId, Claims)>>>);

impl Verified {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (UserId, Claims)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verdict on a token verified before, its expiry checked at `now`.
    pub fn get(&self, token: &str, now: i64) -> Option<Result<(UserId, Claims), AuthError>> {
        let found = self.lock().get(token).cloned()?;
        Some(if found.1.exp + LEEWAY_SECS < now {
            Err(AuthError("the token has expired".into()))
        } else {
            Ok(found)
        })
    }

    /// Keeps a verified token.
    pub fn put(&self, token: &str, verified: &(UserId, Claims)) {
        let mut cache = self.lock();
        if cache.len() >= VERIFIED_TOKENS {
            cache.clear();
        }
        cache.insert(token.to_owned(), verified.clone());
    }
}

/// How long a session found live is believed without asking the store again: how long a logout
/// on another server sharing the store may take to reach this one. A logout on this server
/// reaches it at once ([`LiveSessions::forget`]).
pub const LIVE_SESSION_TTL: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// Sessions found live (not ended) less than [`LIVE_SESSION_TTL`] ago, so that a session's
/// requests ask the store whether it ended about once a second instead of on every request
/// (that read halved `/api/metrics`' throughput). Keyed by the [`session_id`] of verified tokens
/// only, and bounded as [`Verified`] is.
#[derive(Debug, Default, Clone)]
pub struct LiveSessions(Arc<Mutex<HashMap<String, DateTime<Utc>>>>);

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DateTime<Utc>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `session` was ended, at `now`: live without asking when it was found live within
    /// [`LIVE_SESSION_TTL`] before `now`, otherwise the store's answer.
    ///
    /// # Errors
    /// The store's.
    pub async fn ended<S: CredentialStore + ?Sized>(
        &self,
        store: &S,
        session: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let fresh = |seen: &DateTime<Utc>| *seen <= now && now - *seen < LIVE_SESSION_TTL;
        if self.lock().get(session).is_some_and(fresh) {
            return Ok(false);
        }
        let ended = store.session_ended(session).await?;
        let mut live = self.lock();
        if ended {
            live.remove(session);
        } else {
            if live.len() >= VERIFIED_TOKENS {
                live.clear();
            }
            live.insert(session.to_owned(), now);
        }
        Ok(ended)
    }

    /// Forgets a session this process ended, so that its next request asks the store.
    pub fn forget(&self, session: &str) {
        self.lock().remove(session);
    }
}

/// The id a session is ended under: the SHA-256 of its token, hex (64 bytes, whatever the token's
/// length).
pub fn session_id(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
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
    /// with two hashing threads. Reused, it is [`Passwords`]' concurrency x 19 MiB for good.
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
pub fn hash_password(password: &str) -> Result<String, String> {
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
/// A hash whose memory cost is above the default's is not verified: this crate never writes
/// one, and verifying it would grow the thread's memory for good.
pub fn password_matches(password: &str, hash: &str) -> bool {
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

/// Why a password could not be hashed or verified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PasswordError {
    /// Every hashing slot stayed busy for the whole wait: try again shortly.
    #[error("every password hashing slot is busy")]
    Busy,
    /// The hash could not be computed.
    #[error("password hashing failed: {0}")]
    Failed(String),
}

type HashJob = Box<dyn FnOnce() + Send>;

/// Password hashing and verification (argon2id), on a fixed set of dedicated threads behind a
/// semaphore: `concurrency` computations at once (~19 MiB and tens of milliseconds each), each
/// caller waiting at most `wait` for a slot. However many clients try at once, memory and
/// threads stay bounded, and the ones that cannot be served soon are told so
/// ([`PasswordError::Busy`]).
///
/// The threads are dedicated, not tokio's blocking pool: each keeps its 19 MiB of argon2 memory
/// for good, so there must be exactly as many as slots (measured: 657 MiB after 200 logins with
/// 2 slots on the blocking pool, when each hash allocated its own). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Passwords {
    /// The slots (one per hashing thread).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The longest wait for a slot before [`PasswordError::Busy`].
    pub wait: std::time::Duration,
    threads: usize,
    pool: Arc<std::sync::OnceLock<std::sync::mpsc::Sender<HashJob>>>,
}

impl Passwords {
    /// `concurrency` hashes at once, waiting at most `wait`.
    pub fn new(concurrency: usize, wait: std::time::Duration) -> Self {
        Passwords {
            slots: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            wait,
            threads: concurrency.max(1),
            pool: Arc::default(),
        }
    }

    /// A PHC string of `password` (argon2id, default parameters, a fresh salt).
    ///
    /// # Errors
    /// [`PasswordError::Busy`] when no slot frees within the wait; [`PasswordError::Failed`].
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        self.run(move || hash_password(&password))
            .await?
            .map_err(PasswordError::Failed)
    }

    /// Whether `password` is the one `hash` was made from. Without a hash (an unknown email),
    /// a placeholder is verified instead, so that a wrong email costs what a wrong password does.
    ///
    /// # Errors
    /// [`PasswordError::Busy`] when no slot frees within the wait; [`PasswordError::Failed`].
    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, PasswordError> {
        // The placeholder hash, too, is made in a hashing slot (once, on first use).
        self.run(move || password_matches(&password, hash.as_deref().unwrap_or(&DUMMY_HASH)))
            .await
    }

    /// Runs `f` on one of the hashing threads once a slot is free, waiting at most `wait`.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let waited = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await;
        let Ok(Ok(slot)) = waited else {
            return Err(PasswordError::Busy);
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: HashJob = Box::new(move || {
            let out = f();
            // Freed before the answer goes out, so the caller's next request finds it.
            drop(slot);
            let _ = tx.send(out);
        });
        if self.pool().send(job).is_err() {
            return Err(PasswordError::Failed("the hashing threads are gone".into()));
        }
        rx.await.map_err(|e| PasswordError::Failed(e.to_string()))
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

impl Default for Passwords {
    /// One slot per core (at least two), two seconds' wait.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Passwords::new(cores.max(2), std::time::Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session found live is believed for [`LIVE_SESSION_TTL`]: a logout elsewhere (written to
    /// the store directly) shows after it, one here at once, and the map stays bounded.
    #[tokio::test]
    async fn a_live_session_is_asked_again_after_a_second_or_at_once_when_ended_here() {
        let store = revpilot_core::testing::MemoryStore::new();
        let live = LiveSessions::default();
        let t0 = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let ms = chrono::TimeDelta::milliseconds;
        let expires = t0 + chrono::TimeDelta::hours(1);
        assert!(!live.ended(&store, "a", t0).await.unwrap_or(true));
        // Another server ends it: believed live until the second is over, then refused.
        store
            .end_session("a", expires, t0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!live.ended(&store, "a", t0 + ms(999)).await.unwrap_or(true));
        assert!(
            live.ended(&store, "a", t0 + ms(1000))
                .await
                .unwrap_or(false)
        );
        // A clock that went back does not extend a session's credit.
        assert!(!live.ended(&store, "b", t0).await.unwrap_or(true));
        store
            .end_session("b", expires, t0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(live.ended(&store, "b", t0 - ms(1)).await.unwrap_or(false));
        // Ended by this process: forgotten, so the very next request asks.
        assert!(!live.ended(&store, "c", t0).await.unwrap_or(true));
        store
            .end_session("c", expires, t0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        live.forget("c");
        assert!(live.ended(&store, "c", t0).await.unwrap_or(false));
        // Bounded by the number of verified tokens kept.
        for n in 0..=VERIFIED_TOKENS {
            assert!(
                !live
                    .ended(&store, &format!("s{n}"), t0)
                    .await
                    .unwrap_or(true)
            );
        }
        assert!(live.lock().len() <= VERIFIED_TOKENS);
    }

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

    #[tokio::test]
    async fn with_every_slot_busy_a_caller_is_told_so_instead_of_queued() {
        let passwords = Passwords::new(1, std::time::Duration::ZERO);
        let hash = hash_password("correct horse battery").unwrap_or_default();
        // The first takes the only slot; the second finds none and may not wait.
        let (first, second) = tokio::join!(
            passwords.verify("correct horse battery".into(), Some(hash.clone())),
            passwords.verify("wrong horse battery".into(), Some(hash.clone())),
        );
        assert!(matches!(first, Ok(true)), "{first:?}");
        assert!(matches!(second, Err(PasswordError::Busy)), "{second:?}");
        // Freed, the slot serves the next one; an unknown user costs a verification too.
        let unknown = passwords.verify("correct horse battery".into(), None).await;
        assert!(matches!(unknown, Ok(false)), "{unknown:?}");
        let made = passwords.hash("another good password".into()).await;
        assert!(made.is_ok_and(|h| password_matches("another good password", &h)));
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
