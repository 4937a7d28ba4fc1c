//! The HTTP transport to Stripe's API: the key, `Stripe-Account` for a connected account, a
//! client-side token bucket, retries and idempotency keys.
//!
//! Responses come back as bytes, read by [`crate::objects`]' tolerant types. (async-stripe reads
//! only into its own strict generated types and hides the `Stripe-Should-Retry` header, which the
//! retry rules below need; so the sync and export paths talk HTTP through reqwest directly.)
//!
//! Retries: `Stripe-Should-Retry: true|false` decides when Stripe sends it; otherwise 409, 429,
//! 5xx and connection errors (refused, reset, timed out, a body cut short) are retried with
//! exponential backoff (0.5 s doubling, capped at 5 s, jittered) up to
//! [`ClientConfig::max_attempts`]; any other 4xx is returned at once. Every attempt, retries
//! included, first takes a token from the bucket.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;

/// How to reach Stripe and how politely.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// API base, `https://api.stripe.com` by default; a local fake in tests.
    pub api_base: Url,
    /// Secret key or the connected account's access token.
    pub api_key: SecretString,
    /// `Stripe-Account` header: act on this connected account.
    pub account: Option<String>,
    /// Token bucket rate, requests per second (bursts up to a tenth of it).
    pub requests_per_second: NonZeroU32,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First backoff delay.
    pub min_delay: Duration,
    /// Backoff cap.
    pub max_delay: Duration,
    /// Per-attempt timeout.
    pub timeout: Duration,
}

/// Stripe's default API base.
pub const STRIPE_API_BASE: &str = "https://api.stripe.com";

impl ClientConfig {
    /// Defaults: Stripe's API, 25 requests/s, 6 attempts, 0.5 s to 5 s backoff, 60 s timeout.
    pub fn new(api_key: SecretString) -> Self {
        ClientConfig {
            api_base: Url::parse(STRIPE_API_BASE).unwrap_or_else(|_| unreachable!()),
            api_key,
            account: None,
            requests_per_second: NonZeroU32::new(25).unwrap_or(NonZeroU32::MIN),
            max_attempts: 6,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
        }
    }

    /// Whether the key is a live-mode one (`sk_live_...`, `rk_live_...`): a server in live mode
    /// ignores test events and the other way round.
    pub fn is_live(&self) -> bool {
        let key = self.api_key.expose_secret();
        key.starts_with("sk_live_") || key.starts_with("rk_live_")
    }

    /// Sets the API base from a string such as `http://127.0.0.1:12111`.
    ///
    /// # Errors
    /// [`ApiError::Url`] when it is not a URL, [`ApiError::Config`] when it is not http(s).
    pub fn with_api_base(mut self, base: &str) -> Result<Self, ApiError> {
        let url = Url::parse(base).map_err(|source| ApiError::Url {
            what: format!("api base {base:?}"),
            source,
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ApiError::Config(format!("api base {base:?}: not http(s)")));
        }
        self.api_base = url;
        Ok(self)
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 401: the key or token is invalid or was revoked.
    #[error("Stripe refused the credentials (401): {message}")]
    Unauthorized {
        /// Stripe's message.
        message: String,
    },
    /// A 4xx that retrying cannot fix (or `Stripe-Should-Retry: false`).
    #[error("Stripe answered {status} to {path}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The request path.
        path: String,
        /// Stripe's message.
        message: String,
    },
    /// Retryable failures until the attempts ran out.
    #[error("{path} failed after {attempts} attempts: {last}")]
    GaveUp {
        /// The request path.
        path: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A 2xx whose body is not what Stripe sends.
    #[error("unreadable answer from {path}: {problem}")]
    Invalid {
        /// The request path.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The client cannot be built.
    #[error("client configuration: {0}")]
    Config(String),
    /// A URL the client is given, or builds from its base, cannot be parsed.
    #[error("client configuration: {what}: {source}")]
    Url {
        /// The URL or path at fault (`api base "..."`, `/v1/customers`).
        what: String,
        /// The parser's error.
        #[source]
        source: url::ParseError,
    },
    /// The HTTP client cannot be built (its TLS backend cannot start).
    #[error("client configuration: {0}")]
    Http(#[source] reqwest::Error),
}

impl ApiError {
    /// Whether this is a 404 (an endpoint or object that does not exist).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Rejected { status: 404, .. })
    }
}

/// One attempt's failure, and whether to try again.
struct Attempt {
    retry: bool,
    error: ApiError,
}

/// A page of a Stripe list, items kept raw.
#[derive(Debug, Deserialize)]
pub struct RawPage {
    /// The items.
    #[serde(default)]
    pub data: Vec<Box<RawValue>>,
    /// More items after the last one.
    #[serde(default)]
    pub has_more: bool,
}

/// A Stripe API client for one key (and optionally one connected account).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    limiter: DefaultDirectRateLimiter,
    requests: AtomicU64,
    retries: AtomicU64,
    backing_off: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("api_base", &self.inner.config.api_base.as_str())
            .field("account", &self.inner.config.account)
            .finish_non_exhaustive()
    }
}

/// The reqwest client every adapter here shares: rustls with the ring provider.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, ApiError> {
    // Installing twice is harmless: the first provider stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("revpilot/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(ApiError::Http)
}

/// Stripe's error body's message, or the body's start.
pub(crate) fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: Inner2,
    }
    #[derive(Deserialize)]
    struct Inner2 {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        error_description: Option<String>,
    }
    if let Ok(b) = serde_json::from_slice::<Body>(body)
        && let Some(m) = b.error.message.or(b.error.error_description)
    {
        return m;
    }
    let text = String::from_utf8_lossy(body);
    text.chars().take(200).collect()
}

impl Client {
    /// The client of the account whose secret key is `key` (an empty key is none), at
    /// `api_base` when given (a fake in tests): what `STRIPE_SECRET_KEY` and `STRIPE_API_BASE`
    /// configure in every RevPilot program. `None` without a key.
    ///
    /// # Errors
    /// [`ApiError::Url`] or [`ApiError::Config`] for the base; [`ApiError::Http`].
    pub fn from_key(key: Option<&str>, api_base: Option<&str>) -> Result<Option<Self>, ApiError> {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Ok(None);
        };
        let mut config = ClientConfig::new(SecretString::from(key.to_owned()));
        if let Some(base) = api_base {
            config = config.with_api_base(base)?;
        }
        Client::new(config).map(Some)
    }

    /// Whether the client's key is a live-mode one ([`ClientConfig::is_live`]).
    pub fn is_live(&self) -> bool {
        self.inner.config.is_live()
    }

    /// Builds a client.
    ///
    /// # Errors
    /// [`ApiError::Http`] when the HTTP client cannot be built.
    pub fn new(config: ClientConfig) -> Result<Self, ApiError> {
        let http = http_client(config.timeout)?;
        // Bursts of a tenth of a second's budget at most: a server-side bucket of a second's
        // capacity (Stripe's) never sees more than the rate.
        let burst =
            NonZeroU32::new(config.requests_per_second.get() / 10).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(config.requests_per_second).allow_burst(burst);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                limiter: RateLimiter::direct(quota),
                config,
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                backing_off: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// Requests sent so far (every attempt) and how many of them were retries.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.inner.requests.load(Ordering::Relaxed),
            self.inner.retries.load(Ordering::Relaxed),
        )
    }

    /// Requests now waiting out a backoff before their next attempt.
    pub fn backing_off(&self) -> usize {
        self.inner.backing_off.load(Ordering::Relaxed)
    }

    /// The connected account this client acts on.
    pub fn account(&self) -> Option<&str> {
        self.inner.config.account.as_deref()
    }

    /// `GET path?query`, returning the body.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Vec<u8>, ApiError> {
        self.send(reqwest::Method::GET, path, query, &[], None)
            .await
    }

    /// `POST path` with a form body and an idempotency key (reused on every retry).
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn post(
        &self,
        path: &str,
        form: &[(&str, String)],
        idempotency_key: &str,
    ) -> Result<Vec<u8>, ApiError> {
        self.send(
            reqwest::Method::POST,
            path,
            &[],
            form,
            Some(idempotency_key),
        )
        .await
    }

    /// `DELETE path` (cancel a subscription, delete an object), returning the body.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn delete(&self, path: &str) -> Result<Vec<u8>, ApiError> {
        self.send(reqwest::Method::DELETE, path, &[], &[], None)
            .await
    }

    /// Sends an async-stripe request (its typed parameters, encoded by async-stripe) through
    /// this client: its token bucket, Stripe's retry rules and, for a POST, `idempotency_key`
    /// (a fresh one when `None`), reused on every retry. Returns the answer's bytes, which
    /// RevPilot reads with its own tolerant types: async-stripe's response types are strict and
    /// generated for one API version, while the account answers in its own (`objects`).
    ///
    /// # Errors
    /// As [`Client::get`] and [`Client::post`].
    pub async fn request<R: stripe_client_core::StripeRequest>(
        &self,
        request: &R,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, ApiError> {
        use stripe_client_core::StripeMethod;
        let built = request.build();
        let path = format!("/v1{}", built.path);
        let pairs = |encoded: Option<String>| -> Vec<(String, String)> {
            encoded
                .map(|e| {
                    url::form_urlencoded::parse(e.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default()
        };
        fn borrowed(pairs: &[(String, String)]) -> Vec<(&str, String)> {
            pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
        }
        match built.method {
            StripeMethod::Get => self.get(&path, &borrowed(&pairs(built.query))).await,
            StripeMethod::Post => {
                let key = idempotency_key.map_or_else(self::idempotency_key, str::to_owned);
                self.post(&path, &borrowed(&pairs(built.body)), &key).await
            }
            StripeMethod::Delete => self.delete(&path).await,
        }
    }

    /// One page of a list endpoint (`limit=100`), after `starting_after` when given.
    ///
    /// # Errors
    /// See [`ApiError`]; [`ApiError::Invalid`] when the body is not a list.
    pub async fn list_page(
        &self,
        path: &str,
        params: &[(&str, String)],
        starting_after: Option<&str>,
    ) -> Result<RawPage, ApiError> {
        let mut query: Vec<(&str, String)> = params.to_vec();
        query.push(("limit", "100".to_owned()));
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_owned()));
        }
        let body = self.get(path, &query).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid {
            path: path.to_owned(),
            problem: format!("not a list: {e}"),
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, ApiError> {
        let cfg = &self.inner.config;
        let url = cfg.api_base.join(path).map_err(|source| ApiError::Url {
            what: path.to_owned(),
            source,
        })?;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(cfg.min_delay)
            .with_max_delay(cfg.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(cfg.max_attempts.saturating_sub(1) as usize);
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let once = || async {
            if attempts.fetch_add(1, Ordering::Relaxed) > 0 {
                self.inner.backing_off.fetch_sub(1, Ordering::Relaxed);
            }
            self.inner.limiter.until_ready().await;
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            self.attempt(
                method.clone(),
                url.clone(),
                path,
                query,
                form,
                idempotency_key,
            )
            .await
        };
        once.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|a: &Attempt| a.retry)
            .notify(|a: &Attempt, delay| {
                self.inner.retries.fetch_add(1, Ordering::Relaxed);
                self.inner.backing_off.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(path, ?delay, error = %a.error, "retrying");
            })
            .await
            .map_err(|a| {
                if a.retry {
                    ApiError::GaveUp {
                        path: path.to_owned(),
                        attempts: attempts.load(Ordering::Relaxed),
                        last: a.error.to_string(),
                    }
                } else {
                    a.error
                }
            })
    }

    async fn attempt(
        &self,
        method: reqwest::Method,
        url: Url,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, Attempt> {
        let cfg = &self.inner.config;
        let mut req = self
            .inner
            .http
            .request(method, url)
            .bearer_auth(cfg.api_key.expose_secret());
        if !query.is_empty() {
            req = req.query(query);
        }
        if !form.is_empty() {
            req = req.form(form);
        }
        if let Some(account) = &cfg.account {
            req = req.header("Stripe-Account", account);
        }
        if let Some(key) = idempotency_key {
            req = req.header("Idempotency-Key", key);
        }
        let transport = |e: reqwest::Error| Attempt {
            retry: true,
            error: ApiError::GaveUp {
                path: path.to_owned(),
                attempts: 1,
                last: format!("connection error: {e}"),
            },
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let should_retry = resp
            .headers()
            .get("Stripe-Should-Retry")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.eq_ignore_ascii_case("true"));
        let body = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            return Ok(body.to_vec());
        }
        let message = error_message(&body);
        let code = status.as_u16();
        let retry = should_retry.unwrap_or(code == 409 || code == 429 || status.is_server_error());
        let error = if code == 401 {
            ApiError::Unauthorized { message }
        } else if retry {
            ApiError::GaveUp {
                path: path.to_owned(),
                attempts: 1,
                last: format!("{code}: {message}"),
            }
        } else {
            ApiError::Rejected {
                status: code,
                path: path.to_owned(),
                message,
            }
        };
        Err(Attempt {
            retry: retry && code != 401,
            error,
        })
    }
}

/// A fresh idempotency key for one logical POST.
pub fn idempotency_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests;
