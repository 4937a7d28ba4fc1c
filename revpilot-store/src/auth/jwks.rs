//! Supabase-issued session tokens signed with asymmetric keys, verified against the project's
//! JWKS (`SUPABASE_JWKS_URL`, e.g. `https://<ref>.supabase.co/auth/v1/.well-known/jwks.json`).
//!
//! Only RS256 and ES256 are accepted, and only with a key of the JWKS whose `kid` the token
//! names (and whose `alg`, when the key states one, is the token's): an `alg: none` token, an
//! HS256 token "signed" with a public key, or a key of the wrong family never verifies. The
//! claims are checked as for HS256 sessions (the same function). An unknown `kid`
//! fetches the set again (a rotated key), at most once every [`REFETCH_AFTER`].

use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use revpilot_core::ports::UserId;
use url::Url;

use super::{AuthError, Claims, Verified, check_claims};

/// The algorithms accepted from a JWKS.
pub const ALLOWED: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

/// The least time between two fetches of the set.
pub const REFETCH_AFTER: Duration = Duration::from_secs(30);

/// A JWKS-backed verifier.
#[derive(Debug)]
pub struct Jwks {
    url: Url,
    issuer: Option<String>,
    http: reqwest::Client,
    set: RwLock<JwkSet>,
    fetched: Mutex<Option<Instant>>,
    verified: Verified,
}

fn same(key: KeyAlgorithm, alg: Algorithm) -> bool {
    matches!(
        (key, alg),
        (KeyAlgorithm::RS256, Algorithm::RS256) | (KeyAlgorithm::ES256, Algorithm::ES256)
    )
}

impl Jwks {
    /// A verifier of the keys at `url`, requiring `iss` = `issuer` when given. The set is fetched
    /// on first use.
    ///
    /// # Errors
    /// [`AuthError`] when no HTTP client can be built.
    pub fn new(url: Url, issuer: Option<String>) -> Result<Jwks, AuthError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| AuthError(format!("JWKS client: {e}")))?;
        Ok(Jwks {
            url,
            issuer,
            http,
            set: RwLock::new(JwkSet { keys: Vec::new() }),
            fetched: Mutex::new(None),
            verified: Verified::default(),
        })
    }

    fn key(&self, kid: &str) -> Option<Jwk> {
        self.set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .find(kid)
            .cloned()
    }

    /// Fetches the set again unless it was fetched less than [`REFETCH_AFTER`] ago.
    async fn refresh(&self) -> Result<(), AuthError> {
        {
            let mut fetched = self.fetched.lock().unwrap_or_else(PoisonError::into_inner);
            if fetched.is_some_and(|at| at.elapsed() < REFETCH_AFTER) {
                return Ok(());
            }
            *fetched = Some(Instant::now());
        }
        let set: JwkSet = self
            .http
            .get(self.url.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| AuthError(format!("JWKS fetch: {e}")))?
            .json()
            .await
            .map_err(|e| AuthError(format!("JWKS unreadable: {e}")))?;
        tracing::info!(keys = set.keys.len(), "JWKS fetched");
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = set;
        Ok(())
    }

    /// The verified claims of `token` at `now` (unix seconds).
    ///
    /// # Errors
    /// [`AuthError`] naming the problem: header, algorithm, key, signature or claims.
    pub async fn verify(&self, token: &str, now: i64) -> Result<(UserId, Claims), AuthError> {
        if let Some(verdict) = self.verified.get(token, now) {
            return verdict;
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError(format!("header: {e}")))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(AuthError(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError("the token names no key (kid)".into()))?;
        let jwk = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refresh().await?;
                self.key(&kid)
                    .ok_or_else(|| AuthError(format!("no key {kid:?} in the JWKS")))?
            }
        };
        if let Some(stated) = jwk.common.key_algorithm
            && !same(stated, header.alg)
        {
            return Err(AuthError(format!(
                "key {kid:?} is for {stated:?}, the token is {:?}",
                header.alg
            )));
        }
        let key =
            DecodingKey::from_jwk(&jwk).map_err(|e| AuthError(format!("key {kid:?}: {e}")))?;
        let verified = check_claims(token, &key, header.alg, self.issuer.as_deref(), now)?;
        self.verified.put(token, &verified);
        Ok(verified)
    }
}
