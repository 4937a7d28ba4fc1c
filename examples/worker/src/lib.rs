//! The RevPilot example worker, as a library: the [`Job`]s, the [`Runner`] that executes one, and
//! the persistent [`Queue`] (apalis 1.0 on the store's own SQLite or PostgreSQL database) the
//! server pushes to and workers take from.
//!
//! - **Sync** a connection after it is connected and on the cron: under a per-connection
//!   [lease](revpilot_core::ports::LeaseStore), so two workers (or two processes) never sync one
//!   account at once.
//! - **Inbox**: apply the stored billing webhooks.
//! - **Snapshot**: the daily metric row of every active connection.
//! - **Close billing periods**: the ended period's overage of every billable user, one
//!   **Overage** job each, billed once (its queue key and Stripe's idempotency both hold it).
//!
//! Jobs survive restarts (they are rows), retry with exponential backoff, and a stopped worker
//! finishes the job in hand before it exits. [`Runner::try_execute_task`] runs one job the way
//! the worker does, so tests can step through the work.

pub mod queue;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Months, NaiveDate, Utc};
use revpilot_core::billing::{Catalog, metering, usage_period};
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::ports::{
    Connection, ConnectionId, Meter, Period, StoreError, UserId, UserProfile,
};
use revpilot_core::{Account, Currency, Rules};
use revpilot_stripe::billing::{Processor, invoice_overage, overage_key};
use revpilot_stripe::client::{Client, ClientConfig};
use revpilot_stripe::rebuild::derived::load_account;
use revpilot_stripe::sync::{SyncJob, SyncPorts, Syncer};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

pub use queue::{Queue, QueueError};

pub use revpilot_core::ports::{Clock, Store};

/// A unit of background work. Serialized as JSON in the queue's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// Sync one connection (incrementally once it has cursors).
    Sync {
        /// The owner.
        user: UserId,
        /// The connection.
        connection: ConnectionId,
        /// Its `acct_...`.
        stripe_account_id: String,
    },
    /// Apply the stored billing webhook events.
    Inbox,
    /// Store the metric row of `day` for every active connection.
    Snapshot {
        /// The day.
        day: NaiveDate,
    },
    /// Push an [`Job::Overage`] for every billable user's last ended period, as of `day`.
    CloseBillingPeriods {
        /// The day the walk runs for.
        day: NaiveDate,
    },
    /// Add a user's overage in an ended period to their next Stripe invoice.
    Overage {
        /// The user.
        user: UserId,
        /// First instant of the period.
        start: DateTime<Utc>,
        /// First instant after it.
        end: DateTime<Utc>,
    },
}

impl Job {
    /// The job's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Sync { .. } => "sync",
            Job::Inbox => "inbox",
            Job::Snapshot { .. } => "snapshot",
            Job::CloseBillingPeriods { .. } => "close_billing_periods",
            Job::Overage { .. } => "overage",
        }
    }
}

/// What a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// A sync ended with this status: `succeeded`, or `paused` at the plan's transaction
    /// limit (a failed sync is a [`JobError`], retried).
    Synced(String),
    /// Billing events applied and processed without change.
    Inbox {
        /// Applied.
        applied: usize,
        /// Processed without a change.
        unchanged: usize,
    },
    /// Snapshot rows written (one per active connection).
    Snapshots(usize),
    /// Overage jobs pushed.
    PeriodsClosed(usize),
    /// Overage billed (minor units; 0 when there was none).
    Overage(i64),
    /// Nothing to do, and why (the connection is gone, billing is not configured, ...).
    Skipped(String),
}

/// Why a job failed; every failure is retried with backoff until the job's attempts run out.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Another worker holds the connection's lease: this sync waits and runs after it.
    #[error("another worker is syncing connection {0}")]
    Busy(ConnectionId),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Stripe or the sync failed.
    #[error("stripe: {0}")]
    Stripe(String),
    /// The metrics engine refused the account.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The queue refused a push.
    #[error("queue: {0}")]
    Queue(String),
}

/// How long a sync's lease lasts without renewal; a running sync renews it every third of this,
/// so a worker that dies frees its connection within one lease.
pub const LEASE: Duration = Duration::from_secs(120);

/// Executes jobs: what every worker (and the server's in-process one) runs.
pub struct Runner {
    /// The database.
    pub store: Arc<dyn Store>,
    /// The tiers.
    pub catalog: Arc<Catalog>,
    /// Now.
    pub clock: Clock,
    /// Stripe's API base for syncing connected accounts.
    pub stripe_api_base: Url,
    /// The company's own Stripe account: billing events fetch subscriptions from it and
    /// overage is invoiced on it; `None` skips those jobs.
    pub billing: Option<Client>,
    /// The prefix of the lease holders of this runner's jobs (each execution adds its own id).
    pub holder: String,
    /// Where pushed follow-up jobs go ([`Job::CloseBillingPeriods`] pushes [`Job::Overage`]);
    /// `None` runs them at once.
    pub queue: Option<Queue>,
    /// The lease length (tests shorten it).
    pub lease: Duration,
    /// Where jobs get a connection's account: the server's shared accounts when the worker
    /// runs in its process (one build for requests and jobs); `None` rebuilds from the cache.
    pub accounts: Option<Arc<dyn AccountSource>>,
}

/// A connection's rebuilt account, for the jobs that read it (the daily snapshot).
#[async_trait]
pub trait AccountSource: Send + Sync {
    /// The account of `connection` as of its last sync.
    ///
    /// # Errors
    /// [`JobError`] when the cache cannot be read or rebuilt.
    async fn account(&self, connection: &Connection) -> Result<Arc<Account>, JobError>;
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("holder", &self.holder)
            .field("stripe_api_base", &self.stripe_api_base.as_str())
            .field("billing", &self.billing.is_some())
            .finish_non_exhaustive()
    }
}

/// Billing events applied per round, and attempts before an event is left to an operator.
const INBOX_BATCH: usize = 100;
const INBOX_MAX_ATTEMPTS: u32 = 10;

impl Runner {
    /// A runner over `store` with the default catalog, the system clock, Stripe's API and no
    /// billing account; the lease holder is `holder` plus a random suffix.
    pub fn new(store: Arc<dyn Store>, holder: &str) -> Self {
        Runner {
            store,
            catalog: Arc::new(Catalog::default()),
            clock: Arc::new(Utc::now),
            stripe_api_base: Url::parse("https://api.stripe.com/")
                .unwrap_or_else(|_| unreachable!()),
            billing: None,
            holder: format!("{holder}:{}", uuid::Uuid::new_v4().simple()),
            queue: None,
            lease: LEASE,
            accounts: None,
        }
    }

    /// Runs one job to its end, exactly as a worker does (lease, sync, inbox, ...): the step
    /// tests take. A failure is what the queue retries.
    ///
    /// # Errors
    /// [`JobError`]; [`JobError::Busy`] when another holder syncs the connection.
    pub async fn try_execute_task(&self, job: &Job) -> Result<Done, JobError> {
        let started = std::time::Instant::now();
        let result = match job {
            Job::Sync {
                user,
                connection,
                stripe_account_id,
            } => self.sync(*user, *connection, stripe_account_id).await,
            Job::Inbox => self.inbox().await,
            Job::Snapshot { day } => self.snapshot(*day).await,
            Job::CloseBillingPeriods { day } => self.close_periods(*day).await,
            Job::Overage { user, start, end } => {
                self.overage(
                    *user,
                    Period {
                        start: *start,
                        end: *end,
                    },
                )
                .await
            }
        };
        let outcome = match &result {
            Ok(_) => "done",
            Err(JobError::Busy(_)) => "busy",
            Err(_) => "failed",
        };
        metrics::counter!("revpilot_jobs_total", "kind" => job.kind(), "outcome" => outcome)
            .increment(1);
        match &result {
            Ok(done) => {
                tracing::info!(
                    job = job.kind(),
                    ?done,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "job done"
                );
            }
            Err(e) => {
                tracing::warn!(job = job.kind(), error = %e, "job failed; it will be retried")
            }
        }
        result
    }

    async fn sync(
        &self,
        user: UserId,
        connection: ConnectionId,
        stripe_account_id: &str,
    ) -> Result<Done, JobError> {
        let key = format!("sync:{connection}");
        // One holder per execution: two jobs of one connection in one worker exclude each other
        // too.
        let holder = format!("{}/{}", self.holder, uuid::Uuid::new_v4().simple());
        let until = |now: DateTime<Utc>| {
            now + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::MAX)
        };
        let now = (self.clock)();
        if !self
            .store
            .acquire_lease(&key, &holder, until(now), now)
            .await?
        {
            return Err(JobError::Busy(connection));
        }
        // Renew the lease while the sync runs; stop renewing when it ends, also when the sync
        // is dropped mid-way (a shutdown past its drain): the guard's drop stops the renewal
        // and releases the lease, which otherwise stayed held as long as the process lived.
        let renew = {
            let store = self.store.clone();
            let (key, holder, clock, lease) =
                (key.clone(), holder.clone(), self.clock.clone(), self.lease);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    let now = clock();
                    let until =
                        now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
                    match store.acquire_lease(&key, &holder, until, now).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::error!(%key, "the sync's lease was taken over");
                            break;
                        }
                        Err(e) => tracing::warn!(%key, error = %e, "lease not renewed"),
                    }
                }
            })
        };
        let mut guard = LeaseGuard {
            renew,
            release: Some((self.store.clone(), key, holder)),
        };
        let result = self.sync_held(user, connection, stripe_account_id).await;
        guard.renew.abort();
        if let Some((store, key, holder)) = guard.release.take()
            && let Err(e) = store.release_lease(&key, &holder).await
        {
            tracing::warn!(%key, error = %e, "lease not released; it runs out by itself");
        }
        if matches!(&result, Ok(Done::Synced(s)) if s == "succeeded")
            && let Some(c) = self.store.connection(user, connection).await?
        {
            // Derived now (updated with what the sync changed), so that the next request reads
            // the compact account instead of rebuilding it from every cached object. After the
            // lease is given back: the next sync need not wait for it, and an update tolerates
            // writes made while it runs. A failure here costs only that: the next load does it.
            let derived = match &self.accounts {
                Some(accounts) => accounts.account(&c).await.map(drop),
                None => load_account(self.store.as_ref(), user, &c, None)
                    .await
                    .map(drop)
                    .map_err(|e| JobError::Metrics(e.to_string())),
            };
            if let Err(e) = derived {
                tracing::warn!(%connection, error = %e, "the synced account was not derived");
            }
        }
        result
    }

    async fn sync_held(
        &self,
        user: UserId,
        connection: ConnectionId,
        stripe_account_id: &str,
    ) -> Result<Done, JobError> {
        let Some(tokens) = self.store.tokens(user, connection).await? else {
            return Ok(Done::Skipped(format!(
                "connection {connection} is gone or deauthorized"
            )));
        };
        let Some(profile) = self.store.user(user).await? else {
            return Ok(Done::Skipped(format!("user {user} is gone")));
        };
        let config = ClientConfig::new(SecretString::from(
            tokens.access_token.expose_secret().to_owned(),
        ))
        .with_api_base(self.stripe_api_base.as_str())
        .map_err(|e| JobError::Stripe(e.to_string()))?;
        let client = Client::new(config).map_err(|e| JobError::Stripe(e.to_string()))?;
        let store = self.store.clone();
        let ports = SyncPorts {
            cache: store.clone(),
            state: store.clone(),
            usage: store.clone(),
            connections: store,
        };
        let job = SyncJob {
            user,
            connection,
            stripe_account_id: stripe_account_id.to_owned(),
            usage: Some(metering(
                &self.catalog,
                &profile,
                Meter::TransactionVolume,
                (self.clock)(),
            )),
        };
        let (status, outcome) = Syncer::new(client, ports)
            .run(&job, &|_| {})
            .await
            .map_err(|e| JobError::Stripe(e.to_string()))?;
        tracing::info!(%connection, status = status.as_str(), requests = outcome.requests, "sync finished");
        metrics::counter!("revpilot_syncs_total", "status" => status.as_str()).increment(1);
        if status == revpilot_core::ports::SyncStatus::Failed {
            // Retried: the next attempt resumes from the cursors this one saved (or skips, when
            // Stripe refused the token and the connection was deactivated).
            return Err(JobError::Stripe(
                outcome.error.unwrap_or_else(|| "the sync failed".into()),
            ));
        }
        Ok(Done::Synced(status.as_str().to_owned()))
    }

    async fn inbox(&self) -> Result<Done, JobError> {
        let Some(client) = &self.billing else {
            return Ok(Done::Skipped(
                "billing is not configured (STRIPE_SECRET_KEY)".into(),
            ));
        };
        let processor = Processor::new(
            self.store.clone(),
            (*self.catalog).clone(),
            Arc::new(client.clone()),
        );
        let (mut applied, mut unchanged, mut failed) = (0, 0, 0);
        loop {
            let stats = processor
                .process_pending(INBOX_BATCH, INBOX_MAX_ATTEMPTS, (self.clock)())
                .await?;
            applied += stats.applied;
            unchanged += stats.unchanged;
            failed += stats.failed;
            if stats.applied + stats.unchanged < INBOX_BATCH {
                break;
            }
        }
        if failed > 0 {
            // They stay pending with their attempt counted: the job's retry tries them again.
            return Err(JobError::Stripe(format!(
                "{failed} billing event(s) could not be applied yet"
            )));
        }
        Ok(Done::Inbox { applied, unchanged })
    }

    async fn snapshot(&self, day: NaiveDate) -> Result<Done, JobError> {
        let mut written = 0;
        for connection in self.store.active_connections().await? {
            let rows = self.snapshot_rows(&connection, day).await?;
            written += self.store.upsert_snapshots(connection.id, &rows).await?;
        }
        Ok(Done::Snapshots(written))
    }

    async fn snapshot_rows(
        &self,
        connection: &Connection,
        day: NaiveDate,
    ) -> Result<Vec<revpilot_core::metrics::SeriesRow>, JobError> {
        let account = match &self.accounts {
            Some(accounts) => accounts.account(connection).await?,
            None => Arc::new(
                load_account(self.store.as_ref(), connection.user, connection, None)
                    .await
                    .map_err(|e| JobError::Metrics(e.to_string()))?
                    .account,
            ),
        };
        let currency = connection
            .currency
            .as_deref()
            .and_then(|c| Currency::parse(c).ok())
            .unwrap_or(Currency::USD);
        // The day's row is known only up to the last sync: a day it does not reach has no row
        // yet, and one it reaches only in part is stored as partial.
        let mut engine = Engine::new(&account, Rules::default(), currency);
        if let Some(at) = connection.last_synced_at {
            engine = engine.with_as_of(at);
        }
        match engine.series(&SeriesRequest::new(day, day, Granularity::Day)) {
            Ok(report) => Ok(report.rows),
            Err(revpilot_core::metrics::Error::AfterAsOf { .. }) => Ok(Vec::new()),
            Err(e) => Err(JobError::Metrics(e.to_string())),
        }
    }

    async fn close_periods(&self, day: NaiveDate) -> Result<Done, JobError> {
        if self.billing.is_none() {
            return Ok(Done::Skipped(
                "billing is not configured (STRIPE_SECRET_KEY)".into(),
            ));
        }
        let at = day
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc())
            .unwrap_or_else(|| (self.clock)());
        let mut pushed = 0;
        for profile in self.store.billable_users().await? {
            let Some(period) = ended_period(&profile, at) else {
                continue;
            };
            let job = Job::Overage {
                user: profile.user_id,
                start: period.start,
                end: period.end,
            };
            let key = overage_key(profile.user_id, period);
            match &self.queue {
                Some(q) => q.push(&job, &key).await?,
                None => {
                    Box::pin(self.try_execute_task(&job)).await?;
                }
            }
            pushed += 1;
        }
        Ok(Done::PeriodsClosed(pushed))
    }

    async fn overage(&self, user: UserId, period: Period) -> Result<Done, JobError> {
        let Some(client) = &self.billing else {
            return Ok(Done::Skipped(
                "billing is not configured (STRIPE_SECRET_KEY)".into(),
            ));
        };
        let invoiced = invoice_overage(client, self.store.as_ref(), &self.catalog, user, period)
            .await
            .map_err(|e| JobError::Stripe(e.to_string()))?;
        Ok(Done::Overage(invoiced.amount))
    }
}

/// The user's last billing period that ended at or before `at`: the one before the period
/// holding `at`, of the same length in months.
pub fn ended_period(profile: &UserProfile, at: DateTime<Utc>) -> Option<Period> {
    use chrono::Datelike;
    let current = usage_period(profile, at);
    let months = (current.end.year() - current.start.year()) * 12 + current.end.month0() as i32
        - current.start.month0() as i32;
    let months = u32::try_from(months).ok().filter(|m| *m > 0).unwrap_or(1);
    let start = current.start.checked_sub_months(Months::new(months))?;
    Some(Period {
        start,
        end: current.start,
    })
}

/// Something jobs can be handed to: the persistent [`Queue`], or an embedder's own.
#[async_trait]
pub trait Enqueue: Send + Sync {
    /// Hands `job` over under `key`: a second push with a key already used is a no-op, so a
    /// trigger delivered twice (two servers, a retried cron) runs once.
    async fn enqueue(&self, job: Job, key: &str) -> Result<(), JobError>;
}

#[async_trait]
impl Enqueue for Queue {
    async fn enqueue(&self, job: Job, key: &str) -> Result<(), JobError> {
        self.push(&job, key).await
    }
}

/// The tier catalog: the TOML file at `path` (`REVPILOT_CATALOG`) or the default tiers, with
/// the Stripe price ids from `STRIPE_<TIER>_PRICE_ID`. The server and the worker read it alike.
///
/// # Errors
/// A message naming the file or the field at fault.
pub fn load_catalog(path: Option<&std::path::Path>) -> Result<Catalog, String> {
    let catalog = match path {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Catalog::from_toml(&text),
            Err(e) => return Err(format!("REVPILOT_CATALOG {}: {e}", path.display())),
        },
        None => Ok(Catalog::default()),
    };
    catalog
        .and_then(|c| c.with_price_ids_from(|name| std::env::var(name).ok()))
        .map_err(|e| e.to_string())
}

/// Why [`open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store.
    #[error("database: {0}")]
    Store(#[from] revpilot_store::Error),
    /// The queue's tables.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Opens the store at `database_url` (`postgres://...`, else SQLite) and the job queue `queue`
/// in the same database.
///
/// # Errors
/// [`OpenError`].
pub async fn open(
    database_url: &str,
    keys: revpilot_store::KeyRing,
    queue: &str,
) -> Result<(Arc<dyn Store>, Queue), OpenError> {
    if database_url.starts_with("postgres") {
        let store = revpilot_store::PgStore::connect(database_url, keys).await?;
        let q = Queue::postgres(store.pool(), queue).await?;
        Ok((Arc::new(store), q))
    } else {
        let store = revpilot_store::SqliteStore::connect(database_url, keys).await?;
        let q = Queue::sqlite(store.pool(), queue).await?;
        Ok((Arc::new(store), q))
    }
}

/// Pushes the periodic jobs every `every`: yesterday's [`Job::Snapshot`], today's
/// [`Job::CloseBillingPeriods`], and an [`Job::Inbox`] sweep (billing events whose own job could
/// not be queued). Their keys name the day (the sweep's, the time bucket), so any number of
/// workers and servers may run this: each is pushed once.
pub fn spawn_scheduler(queue: Queue, clock: Clock, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let today = clock().date_naive();
            if let Some(day) = today.pred_opt()
                && let Err(e) = queue
                    .push(&Job::Snapshot { day }, &format!("snapshot:{day}"))
                    .await
            {
                tracing::warn!(error = %e, "daily snapshot not scheduled");
            }
            if let Err(e) = queue
                .push(
                    &Job::CloseBillingPeriods { day: today },
                    &format!("close-billing-periods:{today}"),
                )
                .await
            {
                tracing::warn!(error = %e, "billing periods not scheduled");
            }
            let bucket = clock().timestamp() / i64::try_from(every.as_secs().max(1)).unwrap_or(1);
            if let Err(e) = queue
                .push(&Job::Inbox, &format!("inbox-sweep:{bucket}"))
                .await
            {
                tracing::warn!(error = %e, "billing inbox sweep not scheduled");
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// A sync's lease while it runs: dropped before the sync ends (the job was cancelled), it stops
/// the renewal and releases the lease on a task of its own.
struct LeaseGuard {
    renew: tokio::task::JoinHandle<()>,
    /// The store, key and holder, until released.
    release: Option<(Arc<dyn Store>, String, String)>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renew.abort();
        if let Some((store, key, holder)) = self.release.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = store.release_lease(&key, &holder).await;
            });
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// The default grace period of a shutdown (`REVPILOT_SHUTDOWN_GRACE_SECS`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Exit status of a process ended by a second signal or by its grace period running out.
pub const FORCED_EXIT: i32 = 1;

/// Bounds a process's shutdown, whatever state its runtime is in. Installed once at start:
/// - a **second** SIGTERM or Ctrl-C ends the process at once: the exit is made in the signal
///   handler itself (signal-hook), so it works even when every runtime thread is stuck;
/// - once the first signal has arrived, a plain thread (not a task: it needs no runtime) ends
///   the process [`grace`](Self::grace) later if it is still running.
///
/// The orderly part (stop serving, let the jobs in hand finish or hand them back to the queue:
/// [`Queue::run`]) happens within that time; this is what guarantees the end.
#[derive(Debug, Clone)]
pub struct ShutdownGuard {
    signalled: Arc<std::sync::atomic::AtomicBool>,
    grace: Duration,
}

impl ShutdownGuard {
    /// Registers the signal actions and starts the watchdog thread.
    ///
    /// # Errors
    /// The system's error when a signal action cannot be registered.
    pub fn install(grace: Duration) -> std::io::Result<ShutdownGuard> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let signalled = Arc::new(AtomicBool::new(false));
        #[cfg(unix)]
        for sig in signal_hook::consts::TERM_SIGNALS {
            // Order matters: the exit checks the flag before the flag is set, so the first
            // signal only arms it and the second one exits.
            signal_hook::flag::register_conditional_shutdown(
                *sig,
                FORCED_EXIT,
                Arc::clone(&signalled),
            )?;
            signal_hook::flag::register(*sig, Arc::clone(&signalled))?;
        }
        let flag = Arc::clone(&signalled);
        std::thread::Builder::new()
            .name("shutdown-watchdog".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(grace);
                eprintln!(
                    "shutdown: still running {} s after the signal; exiting",
                    grace.as_secs_f64()
                );
                std::process::exit(FORCED_EXIT);
            })?;
        Ok(ShutdownGuard { signalled, grace })
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Whether the first signal has arrived.
    pub fn signalled(&self) -> bool {
        self.signalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How long the orderly part may let jobs in hand run before handing them back: most of
    /// the grace period, leaving time to hand them back and exit before the watchdog fires.
    pub fn drain(&self) -> Duration {
        self.grace.mul_f64(0.8)
    }
}
