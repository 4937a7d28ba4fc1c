//! RevPilot's application as use cases ([`App`]): what a server does for a signed-in user (the
//! connections, the metric series, insights, scenarios, usage, Checkout), for Stripe (the
//! billing and Connect webhooks) and for its cron, each one method over the ports that answers
//! a value or a [`Refusal`].
//!
//! A front end parses its request, calls one method and renders the answer; it maps the
//! refusal's [`RefusalKind`] to its protocol. Every method with a connection id answers
//! [`RefusalKind::NotFound`] for another user's connection exactly as for one that does not
//! exist. The causes of internal failures are logged here and never returned.

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, Utc};
use revpilot_core::billing::{Catalog, UsageError, check_scenario, current_usage};
use revpilot_core::guard::{KeyedBudget, Refusal, RefusalKind};
use revpilot_core::insights::analyze;
use revpilot_core::insights::narrative::{
    GenerateError, Generated, InsightRequest, LlmProvider, LocalProvider, generate,
};
use revpilot_core::insights::scenario::{RunError, Scenario, ScenarioRequest, run_metered};
use revpilot_core::metrics::{Granularity, SeriesRequest};
use revpilot_core::params::MetricsQuery;
use revpilot_core::ports::{Clock, Connection, ConnectionId, Store, Tier, UserId};
use revpilot_core::{Anomaly, billing::CurrentUsage};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;
use url::Url;
use uuid::Uuid;

use crate::accounts::{Accounts, Loaded, SharedAccounts};
use crate::billing::{CheckoutError, CheckoutSession, Receipt, ReturnUrls, WebhookConfig};
use crate::billing::{ReceiveError, create_checkout, receive};
use crate::client::Client;
use crate::connect::{Callback, Connect, ConnectError, receive_connect_event};
use crate::jobs::{Enqueue, Job, RunAtOnce, Runner};
use crate::rebuild::stream::CachedRebuildError;

/// The default deadline of one insight generation: a user never waits longer for a model.
pub const INSIGHT_DEADLINE: Duration = Duration::from_secs(30);

/// Calls per user and minute on the expensive use cases (insights, scenarios).
pub const EXPENSIVE_PER_MINUTE: u32 = 30;

/// Users the expensive use cases' budget remembers at most.
pub const EXPENSIVE_KEYS: usize = 100_000;

/// Series computed at once when no memo has them; others wait.
pub const SERIES_AT_ONCE: usize = 2;

/// How long a metrics request waits for a series-computation slot before [`RefusalKind::Busy`].
pub const SERIES_WAIT: Duration = Duration::from_secs(10);

/// The shortest cron secret accepted, bytes: a guessable one would let anyone trigger syncs.
pub const MIN_CRON_SECRET: usize = 32;

/// What the use cases share: the store, the tiers, the narrator, Stripe, the jobs' queue, the
/// connections' rebuilt accounts and the budgets of the expensive steps. Fields are public for
/// wiring; [`App::new`] gives the defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct App {
    /// The database.
    pub store: Arc<dyn Store>,
    /// Now.
    pub clock: Clock,
    /// The tiers.
    pub catalog: Arc<Catalog>,
    /// The insights narrator (the local templates by default).
    pub llm: Arc<dyn LlmProvider>,
    /// How long one insight generation may wait for the narrator, every ask and retry
    /// together; past it the local narrative stands in.
    pub insight_deadline: Duration,
    /// The company's own Stripe account (Checkout, billing events); `None` when not configured.
    pub billing: Option<Client>,
    /// The billing webhook's secrets and mode; `None` refuses every billing webhook.
    pub billing_webhook: Option<WebhookConfig>,
    /// Woken when a billing event is stored and no queue is set, so that an in-process
    /// [`crate::billing::Processor`] applies it at once.
    pub billing_wake: Arc<Notify>,
    /// Connect OAuth; `None` when not configured.
    pub connect: Option<Arc<Connect>>,
    /// The Connect webhook's secrets; `None` refuses it.
    pub connect_webhook_secrets: Option<Vec<SecretString>>,
    /// Stripe's API base for syncing connected accounts.
    pub stripe_api_base: Url,
    /// Where background jobs go; `None` runs each at once on a task of this process.
    pub jobs: Option<Arc<dyn Enqueue>>,
    /// The cron's bearer secret ([`App::sync_all`]); `None` refuses every call.
    pub cron_secret: Option<SecretString>,
    /// The connections' rebuilt accounts, kept until their next sync.
    pub accounts: Arc<Accounts>,
    /// Per-user budget on the expensive use cases.
    pub expensive: Arc<KeyedBudget<UserId>>,
    /// Series computations that no memo answers, at once.
    pub series_slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("stripe_api_base", &self.stripe_api_base.as_str())
            .finish_non_exhaustive()
    }
}

/// One of a user's connections as a client sees it (never its tokens), with its last sync's
/// status.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSummary {
    /// Id.
    pub id: ConnectionId,
    /// `acct_...`.
    pub stripe_account_id: String,
    /// The account's business name.
    pub business_name: Option<String>,
    /// Its default currency.
    pub currency: Option<String>,
    /// Whether it syncs.
    pub is_active: bool,
    /// Its last completed sync.
    pub last_synced_at: Option<chrono::DateTime<Utc>>,
    /// The last sync's status (`running`, `succeeded`, `failed`), if any ran.
    pub sync_status: Option<&'static str>,
}

/// Logs an internal failure; the client is told only that one happened.
fn internal(e: &dyn std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "internal error");
    Refusal::internal()
}

fn no_connection() -> Refusal {
    Refusal::not_found("no such connection")
}

fn usage_refusal(e: &UsageError) -> Refusal {
    match e {
        UsageError::UpgradeRequired { .. } => Refusal::new(
            RefusalKind::PaymentRequired,
            "upgrade_required",
            e.to_string(),
        ),
        UsageError::UnknownUser(_) => Refusal::not_found("no such user"),
        other => internal(other),
    }
}

/// Stripe failed `what` (logged with its cause); the client is told `message`.
fn upstream(what: &str, e: &dyn std::fmt::Display, message: &'static str) -> Refusal {
    tracing::error!(error = %e, "{what}");
    Refusal::new(RefusalKind::Upstream, "stripe_error", message)
}

fn not_configured(code: &'static str, what: &'static str) -> Refusal {
    Refusal::new(RefusalKind::Unavailable, code, what)
}

impl App {
    /// The use cases over `store`, with the system clock, the default tiers, the local narrator
    /// and nothing of Stripe configured.
    pub fn new(store: Arc<dyn Store>) -> Self {
        App {
            store,
            clock: Arc::new(Utc::now),
            catalog: Arc::new(Catalog::default()),
            llm: Arc::new(LocalProvider),
            insight_deadline: INSIGHT_DEADLINE,
            billing: None,
            billing_webhook: None,
            billing_wake: Arc::new(Notify::new()),
            connect: None,
            connect_webhook_secrets: None,
            stripe_api_base: Url::parse("https://api.stripe.com/")
                .unwrap_or_else(|_| unreachable!()),
            jobs: None,
            cron_secret: None,
            accounts: Arc::default(),
            expensive: Arc::new(KeyedBudget::per_minute(
                EXPENSIVE_PER_MINUTE,
                EXPENSIVE_KEYS,
            )),
            series_slots: Arc::new(tokio::sync::Semaphore::new(SERIES_AT_ONCE)),
        }
    }

    /// Sets the cron's bearer secret ([`App::sync_all`]); an empty or absent one refuses every
    /// call.
    ///
    /// # Errors
    /// A secret shorter than [`MIN_CRON_SECRET`] bytes, in words.
    pub fn set_cron_secret(&mut self, secret: Option<&str>) -> Result<(), String> {
        let secret = secret.filter(|s| !s.is_empty());
        if secret.is_some_and(|s| s.len() < MIN_CRON_SECRET) {
            let hint = "e.g. openssl rand -hex 32";
            return Err(format!("must be at least {MIN_CRON_SECRET} bytes ({hint})"));
        }
        self.cron_secret = secret.map(|s| SecretString::from(s.to_owned()));
        Ok(())
    }

    /// Today, by the clock.
    pub fn today(&self) -> NaiveDate {
        (self.clock)().date_naive()
    }

    /// Where jobs go: the queue, or without one, a task of this process each.
    pub fn jobs(&self) -> Arc<dyn Enqueue> {
        match &self.jobs {
            Some(q) => q.clone(),
            None => Arc::new(RunAtOnce::new(Arc::new(self.runner("server")))),
        }
    }

    /// A job runner over this app's store, tiers, clock, Stripe settings and accounts (what an
    /// in-process worker runs), leasing as `holder`.
    pub fn runner(&self, holder: &str) -> Runner {
        let mut runner = Runner::new(self.store.clone(), holder);
        runner.catalog = self.catalog.clone();
        runner.clock = self.clock.clone();
        runner.stripe_api_base = self.stripe_api_base.clone();
        runner.billing = self.billing.clone();
        let shared = SharedAccounts::new(self.accounts.clone(), self.store.clone());
        runner.accounts = Some(Arc::new(shared));
        runner
    }

    fn spend_expensive(&self, user: UserId) -> Result<(), Refusal> {
        if self.expensive.check(&user) {
            return Ok(());
        }
        Err(Refusal::rate_limited(
            "too many requests on this route; try again in a minute",
        ))
    }

    /// The user's connections, each with its last sync's status.
    ///
    /// # Errors
    /// [`RefusalKind::Internal`].
    pub async fn connections(&self, user: UserId) -> Result<Vec<ConnectionSummary>, Refusal> {
        let all = self
            .store
            .connections(user)
            .await
            .map_err(|e| internal(&e))?;
        let mut out = Vec::with_capacity(all.len());
        for c in all {
            let run = self.store.last_run(user, c.id).await;
            let run = run.map_err(|e| internal(&e))?;
            out.push(ConnectionSummary {
                id: c.id,
                stripe_account_id: c.stripe_account_id,
                business_name: c.business_name,
                currency: c.currency,
                is_active: c.is_active,
                last_synced_at: c.last_synced_at,
                sync_status: run.map(|r| r.status.as_str()),
            });
        }
        Ok(out)
    }

    /// The user's connection `id` (as the client wrote it).
    ///
    /// # Errors
    /// [`RefusalKind::NotFound`] for a malformed id, an unknown one or another user's.
    pub async fn connection(&self, user: UserId, id: &str) -> Result<Connection, Refusal> {
        let id = revpilot_core::params::connection_id(id).ok_or_else(no_connection)?;
        let row = self
            .accounts
            .connection(self.store.as_ref(), user, id)
            .await;
        row.map_err(|e| internal(&e))?.ok_or_else(no_connection)
    }

    /// The connection's account: this process's copy when it was built at the connection's
    /// last sync, else the store's derivation at that sync, else rebuilt from the sync's cache.
    ///
    /// # Errors
    /// Not found for another user's connection; `unreadable_data` when a cached Stripe object
    /// cannot be read; internal.
    pub async fn account(&self, user: UserId, c: &Connection) -> Result<Arc<Loaded>, Refusal> {
        if c.user != user {
            return Err(no_connection());
        }
        let loaded = self.accounts.load(&self.store, user, c).await;
        loaded.map_err(|e| {
            tracing::error!(connection = %c.id, error = %e, "cached account unreadable");
            match e {
                CachedRebuildError::Store(e) => internal(&e),
                CachedRebuildError::Cancelled => Refusal::internal(),
                _ => Refusal::new(
                    RefusalKind::Internal,
                    "unreadable_data",
                    "a synced Stripe object cannot be read; sync the connection again",
                ),
            }
        })
    }

    /// The metric series of the query as a JSON document (`connectionId`, `currency`, `from`,
    /// `to`, `requestedTo`, `asOf`, `cut`, `granularity`, `lastSyncedAt`, `rows`, `anomalies`).
    /// A range no memo holds is computed in one of [`App::series_slots`]: however many long
    /// ranges arrive at once, only that many are in memory at once.
    ///
    /// # Errors
    /// Not found, an invalid range, [`RefusalKind::Busy`] after [`SERIES_WAIT`], internal.
    pub async fn metrics(&self, user: UserId, q: &MetricsQuery) -> Result<bytes::Bytes, Refusal> {
        let connection = self.connection(user, &q.connection_id).await?;
        let SeriesRequest {
            from,
            to,
            granularity,
        } = q
            .request(self.today())
            .map_err(|e| Refusal::invalid(e.to_string()))?;
        let loaded = self.account(user, &connection).await?;
        let _slot = if loaded.has_series_body(from, to, granularity) {
            None
        } else {
            let slot = self.series_slots.clone().acquire_owned();
            match tokio::time::timeout(SERIES_WAIT, slot).await {
                Ok(Ok(slot)) => Some(slot),
                Ok(Err(_)) | Err(_) => {
                    metrics::counter!("revpilot_metrics_busy_total").increment(1);
                    return Err(Refusal::busy(
                        "the server is busy computing other series; try again in a few seconds",
                    ));
                }
            }
        };
        let body = loaded.series_body(from, to, granularity, |report| {
            // A range reaching past the data's as-of instant is cut there, and the answer says so.
            let cut = report
                .anomalies
                .iter()
                .find(|a| matches!(a, Anomaly::CutAtAsOf { .. }))
                .map(ToString::to_string);
            json!({
                "connectionId": connection.id,
                "currency": loaded.currency,
                "from": from,
                "to": report.rows.last().map_or(to, |r| r.date.min(to)),
                "requestedTo": to,
                "asOf": loaded.as_of,
                "cut": cut,
                "granularity": if granularity == Granularity::Day { "day" } else { "month" },
                "lastSyncedAt": connection.last_synced_at,
                "rows": report.rows,
                "anomalies": report.anomalies.len(),
            })
            .to_string()
            .into_bytes()
        });
        body.map_err(|e| Refusal::invalid(e.to_string()))
    }

    /// Generates, stores and returns one set of insights for the user's connection, within the
    /// user's per-minute budget and the plan's allowance.
    ///
    /// # Errors
    /// Rate-limited, not found, upgrade required, internal.
    pub async fn insights(&self, user: UserId, connection_id: &str) -> Result<Generated, Refusal> {
        self.spend_expensive(user)?;
        let connection = self.connection(user, connection_id).await?;
        let loaded = self.account(user, &connection).await?;
        let analysis = analyze(&loaded.engine(), &loaded.account, self.today())
            .map_err(|e| Refusal::invalid(e.to_string()))?;
        let request = InsightRequest::new(user, &analysis, Uuid::new_v4(), (self.clock)())
            .of_connection(connection.id);
        let deadline = tokio::time::sleep(self.insight_deadline);
        let generated = generate(
            self.store.as_ref(),
            &self.catalog,
            self.llm.as_ref(),
            request,
            deadline,
        )
        .await;
        let g = generated.map_err(|e| match e {
            GenerateError::Usage(e) => usage_refusal(&e),
            other => internal(&other),
        })?;
        let provider = match g.fallback {
            Some(_) => "local_fallback",
            None => "provider",
        };
        metrics::counter!("revpilot_insight_generations_total", "provider" => provider)
            .increment(1);
        Ok(g)
    }

    /// One metered what-if run over the connection's last four months: baseline and scenario
    /// MRR at 3, 6 and 12 months, in the account's currency, as a JSON document.
    ///
    /// # Errors
    /// Rate-limited, not found, upgrade required (before the account is built), invalid.
    pub async fn scenario(
        &self,
        user: UserId,
        connection_id: &str,
        scenario: Scenario,
    ) -> Result<serde_json::Value, Refusal> {
        self.spend_expensive(user)?;
        let connection = self.connection(user, connection_id).await?;
        // The limit answers before the account is built or its history read.
        check_scenario(self.store.as_ref(), user, (self.clock)())
            .await
            .map_err(|e| usage_refusal(&e))?;
        let loaded = self.account(user, &connection).await?;
        let to = self.today();
        let rows = loaded
            .series(to - chrono::Duration::days(120), to, Granularity::Month)
            .map_err(|e| Refusal::invalid(e.to_string()))?
            .rows
            .clone();
        let run_id = Uuid::new_v4().to_string();
        let request = ScenarioRequest {
            user,
            connection: Some(connection.id),
            rows: &rows,
            scenario: &scenario,
            run_id: &run_id,
            now: (self.clock)(),
        };
        let currency = loaded.currency;
        match run_metered(self.store.as_ref(), &self.catalog, request).await {
            Ok(projection) => Ok(json!({
                "currency": currency,
                "scenario": scenario,
                "projection": projection.iter().map(|p| json!({
                    "months": p.months,
                    "baseline": currency.round(p.baseline),
                    "scenario": currency.round(p.scenario),
                    "delta": currency.round(p.delta),
                })).collect::<Vec<_>>(),
            })),
            Err(RunError::Scenario(e)) => Err(Refusal::invalid(e.to_string())),
            Err(RunError::Usage(e)) => Err(usage_refusal(&e)),
            Err(other) => Err(internal(&other)),
        }
    }

    /// The user's tier, period, use of each meter and bill so far.
    ///
    /// # Errors
    /// Not found (no such user), internal.
    pub async fn usage(&self, user: UserId) -> Result<CurrentUsage, Refusal> {
        let now = (self.clock)();
        let usage = current_usage(self.store.as_ref(), &self.catalog, user, now).await;
        usage.map_err(|e| usage_refusal(&e))
    }

    /// A Checkout Session upgrading the user to `tier`, returning to `urls`.
    ///
    /// # Errors
    /// Billing not configured, a free tier or one without a price, Stripe's refusal.
    pub async fn checkout(
        &self,
        user: UserId,
        tier: Tier,
        urls: &ReturnUrls,
    ) -> Result<CheckoutSession, Refusal> {
        let stripe = self.billing.as_ref().ok_or_else(|| {
            not_configured(
                "stripe_not_configured",
                "billing is not configured on this server (STRIPE_SECRET_KEY)",
            )
        })?;
        let now = (self.clock)();
        let session = create_checkout(
            stripe,
            self.store.as_ref(),
            &self.catalog,
            user,
            tier,
            urls,
            now,
        );
        session.await.map_err(|e| match e {
            e @ (CheckoutError::FreeTier(_) | CheckoutError::NoPrice(_)) => {
                Refusal::invalid(e.to_string())
            }
            CheckoutError::UnknownUser(_) => Refusal::not_found("no such user"),
            CheckoutError::Stripe(e) => upstream(
                "checkout",
                &e,
                "Stripe could not create the checkout session; try again",
            ),
            e => internal(&e),
        })
    }

    fn connect(&self) -> Result<&Connect, Refusal> {
        self.connect.as_deref().ok_or_else(|| {
            not_configured(
                "connect_not_configured",
                "Stripe Connect is not configured on this server (STRIPE_CLIENT_ID, STRIPE_SECRET_KEY)",
            )
        })
    }

    /// Stripe's authorize page for the user, its `state` stored.
    ///
    /// # Errors
    /// Connect not configured; internal.
    pub async fn connect_url(&self, user: UserId) -> Result<Url, Refusal> {
        let url = self.connect()?.authorize_url(user).await;
        url.map_err(|e| internal(&e))
    }

    /// Back from Stripe's authorize page: exchanges the code, stores the connection and queues
    /// its first sync (a connection whose sync cannot be queued is synced by the cron's next
    /// trigger).
    ///
    /// # Errors
    /// An unknown, used or expired state; declined; already connected; Stripe's failure.
    pub async fn connect_callback(
        &self,
        user: UserId,
        callback: &Callback,
    ) -> Result<ConnectionId, Refusal> {
        let connection = self.connect()?.callback(user, callback).await;
        let connection = connection.map_err(|e| match e {
            e @ (ConnectError::MissingState
            | ConnectError::InvalidState
            | ConnectError::StateMismatch
            | ConnectError::MissingCode) => {
                Refusal::new(RefusalKind::Invalid, "invalid_state", e.to_string())
            }
            ConnectError::Denied(_) => Refusal::new(
                RefusalKind::Invalid,
                "connect_denied",
                "Stripe did not authorize the connection",
            ),
            e @ ConnectError::AlreadyConnected(_) => {
                Refusal::new(RefusalKind::Conflict, "already_connected", e.to_string())
            }
            e @ (ConnectError::Exchange(_) | ConnectError::Api(_)) => upstream(
                "connect",
                &e,
                "Stripe could not complete the connection; try again",
            ),
            e => internal(&e),
        })?;
        let (job, key) = Job::sync(&connection, "connect");
        if let Err(e) = self.jobs().enqueue(job, &key).await {
            tracing::error!(connection = %connection.id, error = %e, "first sync not queued");
        }
        Ok(connection.id)
    }

    /// An event of connected accounts, verified: `account.application.deauthorized`
    /// deactivates the account's connection and erases its tokens; others are acknowledged.
    /// Answers the event's id.
    ///
    /// # Errors
    /// Not configured, a bad signature or body ([`RefusalKind::Invalid`]), or the store
    /// ([`RefusalKind::Internal`]: Stripe delivers it again).
    pub async fn connect_event(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<String, Refusal> {
        let secrets = self.connect_webhook_secrets.as_ref().ok_or_else(|| {
            Refusal::new(
                RefusalKind::Invalid,
                "webhook_not_configured",
                "no Connect webhook secret is configured (STRIPE_CONNECT_WEBHOOK_SECRET)",
            )
        })?;
        let now = (self.clock)();
        match receive_connect_event(self.store.as_ref(), body, signature, secrets, now).await {
            Ok(receipt) => Ok(receipt.event_id().to_owned()),
            Err(ReceiveError::Store(e)) => Err(internal(&e)),
            Err(e) => Err(Refusal::new(
                RefusalKind::Invalid,
                "invalid_webhook",
                e.to_string(),
            )),
        }
    }

    /// A billing event from Stripe: verified and stored before the answer, then applied by an
    /// inbox job (queued, or the in-process processor woken). Answers `{received, event}` and
    /// `duplicate` or `ignored` when so.
    ///
    /// # Errors
    /// Not configured or a bad signature or body ([`RefusalKind::Invalid`], nothing stored);
    /// the store ([`RefusalKind::Internal`]: Stripe delivers it again).
    pub async fn billing_event(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<serde_json::Value, Refusal> {
        let config = self.billing_webhook.as_ref().ok_or_else(|| {
            Refusal::new(
                RefusalKind::Invalid,
                "webhook_not_configured",
                "no webhook secret is configured (STRIPE_WEBHOOK_SECRET)",
            )
        })?;
        let counted = |outcome: &'static str| {
            metrics::counter!("revpilot_billing_webhooks_total", "outcome" => outcome).increment(1);
        };
        let now = (self.clock)();
        let receipt = match receive(self.store.as_ref(), config, body, signature, now).await {
            Ok(r) => r,
            Err(e) if e.is_client_error() => {
                counted("refused");
                return Err(Refusal::new(
                    RefusalKind::Invalid,
                    "invalid_webhook",
                    e.to_string(),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "billing webhook not stored");
                let message = "the event could not be stored; Stripe will deliver it again";
                return Err(Refusal::new(RefusalKind::Internal, "internal", message));
            }
        };
        counted(receipt.outcome());
        let mut answer = json!({ "received": true, "event": receipt.event_id() });
        match receipt {
            Receipt::Stored(id) => match &self.jobs {
                // Stored all the same when not queued: the scheduler's inbox sweep applies it.
                Some(jobs) => {
                    if let Err(e) = jobs.enqueue(Job::Inbox, &format!("inbox:{id}")).await {
                        tracing::warn!(error = %e, "billing inbox job not queued");
                    }
                }
                None => self.billing_wake.notify_one(),
            },
            Receipt::Duplicate(_) => answer["duplicate"] = true.into(),
            Receipt::Ignored { reason, .. } => answer["ignored"] = reason.into(),
        }
        Ok(answer)
    }

    /// Demo mode: a connection of `user` whose account is the synthetic generator's
    /// `customers` customers over the 24 months up to today, pinned in [`App::accounts`]
    /// (nothing syncs it, and no Stripe object is stored for it). Answers the connection.
    ///
    /// # Errors
    /// Internal (the store's failure, logged).
    #[cfg(feature = "synth")]
    #[cfg_attr(docsrs, doc(cfg(feature = "synth")))]
    pub async fn seed_demo(&self, user: UserId, customers: usize) -> Result<ConnectionId, Refusal> {
        use revpilot_core::ports::{NewConnection, Tokens};
        use revpilot_core::synth::{fx_table, generate};
        let now = (self.clock)();
        let connection = NewConnection {
            user,
            stripe_account_id: "acct_demo".to_owned(),
            business_name: Some("Demo SaaS (synthetic data)".to_owned()),
            currency: Some("usd".to_owned()),
            tokens: Tokens {
                access_token: SecretString::from("demo: no Stripe account".to_owned()),
                refresh_token: None,
            },
        };
        let connection = self.store.save_connection(connection, now).await;
        let connection = connection.map_err(|e| internal(&e))?;
        let synced = self.store.set_last_synced(connection.id, now).await;
        synced.map_err(|e| internal(&e))?;
        let config = demo_config(customers, now.date_naive());
        let (account, fx) = (generate(&config), Some(fx_table(&config)));
        let loaded = Loaded::new(account, revpilot_core::Currency::USD, fx).with_as_of(Some(now));
        self.accounts.pin(user, connection.id, Arc::new(loaded));
        Ok(connection.id)
    }

    /// The cron's trigger: with the right bearer secret (compared in constant time; none
    /// configured refuses every call), queues a sync of every active connection under one
    /// trigger id, so a retried call pushes each job once. Answers how many and the trigger.
    ///
    /// # Errors
    /// [`RefusalKind::Unauthorized`]; internal.
    pub async fn sync_all(&self, bearer: &str) -> Result<(usize, String), Refusal> {
        use subtle::ConstantTimeEq;
        let allowed = self.cron_secret.as_ref().is_some_and(|secret| {
            let secret = secret.expose_secret().as_bytes();
            !secret.is_empty() && bool::from(secret.ct_eq(bearer.as_bytes()))
        });
        if !allowed {
            let message = "the cron secret is missing or wrong";
            return Err(Refusal::new(
                RefusalKind::Unauthorized,
                "unauthorized",
                message,
            ));
        }
        let connections = self.store.active_connections().await;
        let connections = connections.map_err(|e| internal(&e))?;
        let trigger = Uuid::new_v4().simple().to_string();
        let jobs = self.jobs();
        for c in &connections {
            let (job, key) = Job::sync(c, &trigger);
            jobs.enqueue(job, &key).await.map_err(|e| internal(&e))?;
        }
        Ok((connections.len(), trigger))
    }
}

/// The demo's synthetic account: `customers` customers over the 24 months up to `today`'s month.
#[cfg(feature = "synth")]
#[cfg_attr(docsrs, doc(cfg(feature = "synth")))]
pub fn demo_config(customers: usize, today: NaiveDate) -> revpilot_core::synth::SynthConfig {
    use chrono::{Datelike, Months};
    let start = today
        .with_day(1)
        .and_then(|d| d.checked_sub_months(Months::new(23)))
        .unwrap_or(today);
    revpilot_core::synth::SynthConfig {
        start,
        months: 24,
        ..revpilot_core::synth::SynthConfig::new(customers, 2026)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use revpilot_core::testing::MemoryStore;

    #[tokio::test]
    async fn the_use_cases_answer_values_or_refusals_a_client_may_see() {
        let now = Utc::now();
        let (store, user, connection) = MemoryStore::with_connection("acct_1", now).await;
        let mut app = App::new(Arc::new(store));
        app.expensive = Arc::new(KeyedBudget::per_minute(1, 10));
        let stranger = UserId(Uuid::new_v4());
        let id = connection.to_string();
        let found = app.connection(user, &id).await.unwrap();
        assert_eq!(found.id, connection);
        for (who, id) in [(stranger, id.as_str()), (user, "not-an-id")] {
            let r = app.connection(who, id).await.unwrap_err();
            assert_eq!((r.kind, r.code), (RefusalKind::NotFound, "not_found"));
        }
        let listed = app.connections(user).await.unwrap();
        assert_eq!(listed.len(), 1);
        let json = serde_json::to_value(&listed[0]).unwrap();
        assert_eq!(json["stripeAccountId"], "acct_1");
        assert!(json.get("tokens").is_none() && json.get("accessToken").is_none());
        // The per-minute budget is spent before anything else is looked at.
        let _ = app.insights(stranger, &id).await;
        let r = app.insights(stranger, &id).await.unwrap_err();
        assert_eq!(r.kind, RefusalKind::TooMany);
        let r = app.billing_event(b"{}", None).await.unwrap_err();
        assert_eq!(r.code, "webhook_not_configured");
        let r = app
            .checkout(user, Tier::Business, &urls())
            .await
            .unwrap_err();
        assert_eq!(r.code, "stripe_not_configured");
        assert_eq!(
            app.sync_all("").await.unwrap_err().kind,
            RefusalKind::Unauthorized
        );
        assert!(app.set_cron_secret(Some("too short")).is_err());
        let secret = "a-cron-secret-of-at-least-32-bytes!";
        app.set_cron_secret(Some(secret)).unwrap();
        assert_eq!(
            app.sync_all("wrong").await.unwrap_err().kind,
            RefusalKind::Unauthorized
        );
        let (queued, _) = app.sync_all(secret).await.unwrap();
        assert_eq!(queued, 1);
    }

    fn urls() -> ReturnUrls {
        let url = Url::parse("http://app.example/").unwrap();
        ReturnUrls {
            success: url.clone(),
            cancel: url,
        }
    }

    #[tokio::test]
    async fn the_demo_account_answers_its_metric_series() {
        let now = Utc::now();
        let (store, user, _) = MemoryStore::with_connection("acct_1", now).await;
        let app = App::new(Arc::new(store));
        let demo = app.seed_demo(user, 40).await.unwrap();
        let query = MetricsQuery {
            connection_id: demo.to_string(),
            from: None,
            to: None,
            granularity: Some("month".into()),
        };
        let body = app.metrics(user, &query).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["granularity"], "month");
        assert!(!body["rows"].as_array().unwrap().is_empty());
        let query = MetricsQuery {
            granularity: Some("week".into()),
            ..query
        };
        let r = app.metrics(user, &query).await.unwrap_err();
        assert_eq!(r.kind, RefusalKind::Invalid);
    }
}
