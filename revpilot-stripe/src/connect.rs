//! Stripe Connect (OAuth): the authorize URL, the callback, deauthorization.
//!
//! The `state` is 256 random bits, stored through [`OAuthStateStore`] bound to the user for
//! [`ConnectConfig::state_ttl`] and consumed on first use. The callback checks it before anything
//! else and writes nothing when it is missing, unknown, expired, reused or another user's. The code
//! is exchanged with `POST /oauth/token` (async-stripe has no OAuth); the account's name and
//! default currency come from `GET /v1/account` with the new token; the tokens are stored
//! encrypted by the [`ConnectionStore`], which refuses to rebind an account connected to another
//! user.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use revpilot_core::ports::{
    Connection, ConnectionStore, NewConnection, OAuthStateStore, StoreError, Tokens, UserId,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::billing::{EventError, ReceiveError};
use crate::client::{ApiError, Client, ClientConfig, error_message, http_client};

/// Stripe's Connect base (authorize and token endpoints).
pub const STRIPE_CONNECT_BASE: &str = "https://connect.stripe.com";

/// The platform's Connect settings.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// The platform's `ca_...` client id.
    pub client_id: String,
    /// The platform's secret key (authenticates the token exchange).
    pub secret_key: SecretString,
    /// Where users authorize: `{connect_base}/oauth/authorize`.
    pub connect_base: Url,
    /// Where codes are exchanged: `{token_base}/oauth/token`.
    pub token_base: Url,
    /// The API base for reading the connected account.
    pub api_base: Url,
    /// The callback URL registered with Stripe, if not the default one.
    pub redirect_uri: Option<String>,
    /// `read_only` or `read_write`.
    pub scope: String,
    /// How long a `state` stays valid.
    pub state_ttl: Duration,
}

impl ConnectConfig {
    /// Stripe's URLs, `read_only` scope, states valid 10 minutes.
    pub fn new(client_id: impl Into<String>, secret_key: SecretString) -> Self {
        let base = Url::parse(STRIPE_CONNECT_BASE).unwrap_or_else(|_| unreachable!());
        ConnectConfig {
            client_id: client_id.into(),
            secret_key,
            connect_base: base.clone(),
            token_base: base,
            api_base: Url::parse(crate::client::STRIPE_API_BASE).unwrap_or_else(|_| unreachable!()),
            redirect_uri: None,
            scope: "read_only".to_owned(),
            state_ttl: Duration::from_secs(600),
        }
    }
}

/// Why connecting failed. Nothing was written for any of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The callback has no `state`.
    #[error("the callback has no state parameter")]
    MissingState,
    /// The `state` is unknown, expired or already used.
    #[error("the state is unknown, expired or already used; start connecting again")]
    InvalidState,
    /// The `state` was issued to another user.
    #[error("the state was issued to another user")]
    StateMismatch,
    /// The user declined (or Stripe reported an error) on the authorize page.
    #[error("Stripe did not authorize the connection: {0}")]
    Denied(String),
    /// The callback has no `code`.
    #[error("the callback has no code parameter")]
    MissingCode,
    /// The token exchange failed.
    #[error("the code could not be exchanged: {0}")]
    Exchange(String),
    /// The account is connected to another user.
    #[error("Stripe account {0} is already connected to another user")]
    AlreadyConnected(String),
    /// Reading the connected account failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Storage failed.
    #[error("storage: {0}")]
    Store(#[source] StoreError),
}

impl From<StoreError> for ConnectError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(account) => ConnectError::AlreadyConnected(account),
            other => ConnectError::Store(other),
        }
    }
}

/// The query of the OAuth callback.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Callback {
    /// The authorization code.
    #[serde(default)]
    pub code: Option<String>,
    /// The state sent to the authorize page.
    #[serde(default)]
    pub state: Option<String>,
    /// Set when the user declined.
    #[serde(default)]
    pub error: Option<String>,
    /// Stripe's explanation.
    #[serde(default)]
    pub error_description: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    stripe_user_id: String,
}

#[derive(Deserialize, Default)]
struct AccountInfo {
    #[serde(default)]
    default_currency: Option<String>,
    #[serde(default)]
    business_profile: Option<BusinessProfile>,
    #[serde(default)]
    settings: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct BusinessProfile {
    #[serde(default)]
    name: Option<String>,
}

/// Connect OAuth for a platform.
pub struct Connect {
    config: ConnectConfig,
    http: reqwest::Client,
    states: Arc<dyn OAuthStateStore>,
    connections: Arc<dyn ConnectionStore>,
    clock: fn() -> DateTime<Utc>,
}

impl Connect {
    /// Connect with the given settings and stores.
    ///
    /// # Errors
    /// [`ConnectError::Api`] when the HTTP client cannot be built.
    pub fn new(
        config: ConnectConfig,
        states: Arc<dyn OAuthStateStore>,
        connections: Arc<dyn ConnectionStore>,
    ) -> Result<Self, ConnectError> {
        Ok(Connect {
            http: http_client(Duration::from_secs(30))?,
            config,
            states,
            connections,
            clock: Utc::now,
        })
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: fn() -> DateTime<Utc>) -> Self {
        self.clock = clock;
        self
    }

    /// A fresh authorize URL for `user`, its `state` stored.
    ///
    /// # Errors
    /// [`ConnectError::Store`] when the state cannot be stored.
    pub async fn authorize_url(&self, user: UserId) -> Result<Url, ConnectError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| {
            ConnectError::Store(StoreError::Backend(format!("no randomness: {e}").into()))
        })?;
        let state = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let ttl =
            chrono::TimeDelta::from_std(self.config.state_ttl).unwrap_or(chrono::TimeDelta::MAX);
        self.states
            .put_state(&state, user, (self.clock)() + ttl)
            .await?;
        let mut url = self
            .config
            .connect_base
            .join("/oauth/authorize")
            .map_err(|source| ApiError::Url {
                what: "/oauth/authorize".into(),
                source,
            })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &self.config.client_id)
                .append_pair("scope", &self.config.scope)
                .append_pair("state", &state);
            if let Some(r) = &self.config.redirect_uri {
                q.append_pair("redirect_uri", r);
            }
        }
        Ok(url)
    }

    /// Handles the callback for the signed-in `user`: checks the state, exchanges the code, reads
    /// the account and stores the connection.
    ///
    /// # Errors
    /// See [`ConnectError`]; nothing is written on any of them.
    pub async fn callback(&self, user: UserId, cb: &Callback) -> Result<Connection, ConnectError> {
        let state = cb
            .state
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or(ConnectError::MissingState)?;
        let owner = self
            .states
            .take_state(state, user, (self.clock)())
            .await?
            .ok_or(ConnectError::InvalidState)?;
        if owner != user {
            return Err(ConnectError::StateMismatch);
        }
        if let Some(error) = &cb.error {
            return Err(ConnectError::Denied(
                cb.error_description
                    .clone()
                    .unwrap_or_else(|| error.clone()),
            ));
        }
        let code = cb
            .code
            .as_deref()
            .filter(|c| !c.is_empty())
            .ok_or(ConnectError::MissingCode)?;
        let token = self.exchange(code).await?;
        let info = self.account_info(&token.access_token).await?;
        let business_name = info.business_profile.and_then(|b| b.name).or_else(|| {
            info.settings
                .as_ref()?
                .pointer("/dashboard/display_name")?
                .as_str()
                .map(str::to_owned)
        });
        let connection = self
            .connections
            .save_connection(
                NewConnection {
                    user,
                    stripe_account_id: token.stripe_user_id,
                    business_name,
                    currency: info.default_currency,
                    tokens: Tokens {
                        access_token: SecretString::from(token.access_token),
                        refresh_token: token.refresh_token.map(SecretString::from),
                    },
                },
                (self.clock)(),
            )
            .await?;
        Ok(connection)
    }

    /// `account.application.deauthorized` (or a 401): marks the account's connection inactive and
    /// erases its tokens. Returns it, `None` for an unknown account.
    ///
    /// # Errors
    /// [`ConnectError::Store`] when storage fails.
    pub async fn deauthorize(
        &self,
        stripe_account_id: &str,
    ) -> Result<Option<Connection>, ConnectError> {
        Ok(self
            .connections
            .deactivate(stripe_account_id, (self.clock)())
            .await?)
    }

    async fn exchange(&self, code: &str) -> Result<TokenResponse, ConnectError> {
        // Not an async-stripe request: it has none for Connect's OAuth token exchange (which is
        // on connect.stripe.com, not the API), so the form is posted here.
        let url = self
            .config
            .token_base
            .join("/oauth/token")
            .map_err(|source| ApiError::Url {
                what: "/oauth/token".into(),
                source,
            })?;
        let resp = self
            .http
            .post(url)
            .basic_auth(self.config.secret_key.expose_secret(), Some(""))
            .form(&[("grant_type", "authorization_code"), ("code", code)])
            .send()
            .await
            .map_err(|e| ConnectError::Exchange(format!("connection error: {e}")))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| ConnectError::Exchange(format!("connection error: {e}")))?;
        if !status.is_success() {
            return Err(ConnectError::Exchange(format!(
                "{}: {}",
                status.as_u16(),
                error_message(&body)
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ConnectError::Exchange(format!("unreadable token response: {e}")))
    }

    async fn account_info(&self, access_token: &str) -> Result<AccountInfo, ConnectError> {
        let mut cfg = ClientConfig::new(SecretString::from(access_token.to_owned()));
        cfg.api_base = self.config.api_base.clone();
        // A connected account's call, not the company's own: read like the sync's objects
        // (tolerantly), not through async-stripe's strict types.
        let body = Client::new(cfg)?.get("/v1/account", &[]).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ConnectError::Api(ApiError::Invalid {
                path: "/v1/account".into(),
                problem: e.to_string(),
            })
        })
    }
}

/// What a verified Connect webhook did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectReceipt {
    /// `account.application.deauthorized`: the account's connection is deactivated and its
    /// tokens erased.
    Deauthorized {
        /// The event.
        event_id: String,
        /// The `acct_...` that revoked access.
        account: String,
    },
    /// Any other event: acknowledged (the next sync reads it from the Events API).
    Acknowledged {
        /// The event.
        event_id: String,
    },
}

impl ConnectReceipt {
    /// The event's id.
    pub fn event_id(&self) -> &str {
        match self {
            ConnectReceipt::Deauthorized { event_id, .. }
            | ConnectReceipt::Acknowledged { event_id } => event_id,
        }
    }
}

/// Verifies a Connect webhook (signed with any of `secrets`, within Stripe's tolerance at `now`)
/// and applies what RevPilot acts on: a deauthorization deactivates the account's connection
/// and erases its tokens, before the 2xx.
///
/// # Errors
/// [`ReceiveError`]: a bad signature or body (answer 400, nothing written), or the store (answer
/// 5xx so Stripe delivers it again).
pub async fn receive_connect_event<C: ConnectionStore + ?Sized>(
    connections: &C,
    payload: &[u8],
    signature: Option<&str>,
    secrets: &[SecretString],
    now: DateTime<Utc>,
) -> Result<ConnectReceipt, ReceiveError> {
    crate::webhook::verify(
        payload,
        signature,
        secrets,
        now.timestamp(),
        crate::webhook::TOLERANCE_SECS,
    )?;
    let event = crate::billing::parse_event(payload)?;
    if event.event_type != "account.application.deauthorized" {
        return Ok(ConnectReceipt::Acknowledged { event_id: event.id });
    }
    let Some(account) = event.account else {
        return Err(EventError("a deauthorization without an account".into()).into());
    };
    connections.deactivate(&account, now).await?;
    Ok(ConnectReceipt::Deauthorized {
        event_id: event.id,
        account,
    })
}

#[cfg(test)]
mod tests;
