//! Background work as library use cases: the [`Runner`] that executes a RevPilot deployment's
//! [`Job`]s (defined in `revpilot_core::jobs`) over the store's ports and Stripe, and the
//! scheduler of the periodic ones.
//!
//! - **Sync** a connection after it is connected and on the cron: under a per-connection
//!   [lease](revpilot_core::ports::LeaseStore), so two workers (or two processes) never sync one
//!   account at once; afterwards the connection's derived account is brought up to date.
//! - **Inbox**: apply the stored billing webhooks.
//! - **Snapshot**: the daily metric row of every active connection.
//! - **Close billing periods**: the ended period's overage of every billable user, one
//!   **Overage** job each, billed once (its queue key and Stripe's idempotency both hold it).
//!
//! A queue is the embedder's: anything implementing [`Enqueue`] takes follow-up jobs
//! (`revpilot_store::queue` is one, apalis in the store's database). [`Runner::try_execute_task`]
//! runs one job to its end, the step a queue's handler ([`ExecuteJob`]) and a test take.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use revpilot_core::billing::{Catalog, ended_period, metering};
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::ports::{
    Clock, Connection, ConnectionId, Meter, Period, Store, StoreError, UserId,
};
use revpilot_core::{Account, Rules};

pub use revpilot_core::jobs::{Enqueue, EnqueueError, ExecuteJob, Job, periodic_jobs};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::billing::{CheckoutError, ProcessStats, Processor, invoice_overage, overage_key};
use crate::client::{ApiError, Client, ClientConfig};
use crate::rebuild::derived::load_account;
use crate::sync::{SyncJob, SyncPorts, Syncer};

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
/// Each variant keeps its cause as the error's `source` (and in its message, for logs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Another worker holds the connection's lease: this sync waits and runs after it.
    #[error("another worker is syncing connection {0}")]
    Busy(ConnectionId),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The Stripe client could not be made, or Stripe refused a call.
    #[error("stripe: {0}")]
    Stripe(#[from] ApiError),
    /// The sync ran and ended failed, with the reason recorded on its run; the retry resumes
    /// from the cursors it saved.
    #[error("the sync failed: {0}")]
    Sync(String),
    /// Billing events could not be applied yet; they stay pending with the attempt counted.
    #[error("{failed} billing event(s) could not be applied yet")]
    Inbox {
        /// How many.
        failed: usize,
    },
    /// The connection's account could not be loaded (the cache, or an [`AccountSource`]).
    #[error("the account cannot be loaded: {0}")]
    Account(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The metrics engine refused the account.
    #[error("metrics: {0}")]
    Metrics(#[from] revpilot_core::metrics::Error),
    /// The overage could not be invoiced.
    #[error("overage: {0}")]
    Overage(#[from] CheckoutError),
    /// The queue refused a push.
    #[error("queue: {0}")]
    Queue(#[from] EnqueueError),
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
    pub queue: Option<Arc<dyn Enqueue>>,
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
                tracing::warn!(job = job.kind(), error = %e, "job failed")
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
                    .map_err(|e| JobError::Account(Box::new(e))),
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
        .with_api_base(self.stripe_api_base.as_str())?;
        let client = Client::new(config)?;
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
        let (status, outcome) = Syncer::new(client, ports).run(&job, &|_| {}).await?;
        tracing::info!(%connection, status = status.as_str(), requests = outcome.requests, "sync finished");
        metrics::counter!("revpilot_syncs_total", "status" => status.as_str()).increment(1);
        if status == revpilot_core::ports::SyncStatus::Failed {
            // Retried: the next attempt resumes from the cursors this one saved (or skips, when
            // Stripe refused the token and the connection was deactivated).
            return Err(JobError::Sync(
                outcome.error.unwrap_or_else(|| "no reason recorded".into()),
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
        let ProcessStats {
            applied,
            unchanged,
            failed,
        } = processor.process_all((self.clock)()).await?;
        if failed > 0 {
            // They stay pending with their attempt counted: the job's retry tries them again.
            return Err(JobError::Inbox { failed });
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
                    .map_err(|e| JobError::Account(Box::new(e)))?
                    .account,
            ),
        };
        let currency = connection.reporting_currency();
        // The day's row is known only up to the last sync: a day it does not reach has no row
        // yet, and one it reaches only in part is stored as partial.
        let mut engine = Engine::new(&account, Rules::default(), currency);
        if let Some(at) = connection.last_synced_at {
            engine = engine.with_as_of(at);
        }
        match engine.series(&SeriesRequest::new(day, day, Granularity::Day)) {
            Ok(report) => Ok(report.rows),
            Err(revpilot_core::metrics::Error::AfterAsOf { .. }) => Ok(Vec::new()),
            Err(e) => Err(JobError::Metrics(e)),
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
                Some(q) => q.enqueue(job, &key).await?,
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
        let invoiced =
            invoice_overage(client, self.store.as_ref(), &self.catalog, user, period).await?;
        Ok(Done::Overage(invoiced.amount))
    }
}

#[async_trait]
impl ExecuteJob for Runner {
    async fn execute(&self, job: &Job) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.try_execute_task(job)
            .await
            .map(|_| ())
            .map_err(Into::into)
    }
}

/// A stand-in for a queue in a process without one (tests of a router alone, a small embedding):
/// each job handed over runs at once on a task of this process. As [`Enqueue`] asks, a key
/// pushed before is a no-op (this value remembers the last [`RunAtOnce::KEYS`] keys); unlike a
/// queue, a failed job is logged, not retried, and nothing survives the process.
#[derive(Debug)]
pub struct RunAtOnce {
    runner: Arc<Runner>,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl RunAtOnce {
    /// Keys remembered before the set starts over.
    pub const KEYS: usize = 10_000;

    /// Runs jobs with `runner`.
    pub fn new(runner: Arc<Runner>) -> Self {
        RunAtOnce {
            runner,
            seen: std::sync::Mutex::default(),
        }
    }
}

#[async_trait]
impl Enqueue for RunAtOnce {
    async fn enqueue(&self, job: Job, key: &str) -> Result<(), EnqueueError> {
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.len() >= Self::KEYS {
                seen.clear();
            }
            if !seen.insert(key.to_owned()) {
                return Ok(());
            }
        }
        let runner = Arc::clone(&self.runner);
        let key = key.to_owned();
        tokio::spawn(async move {
            if let Err(e) = runner.try_execute_task(&job).await {
                tracing::warn!(job = job.kind(), %key, error = %e, "job run at once failed; not retried");
            }
        });
        Ok(())
    }
}

/// Pushes the [`periodic_jobs`] to `queue` now and every `every` after, until the task is
/// aborted. A push that fails is logged and tried again at the next round.
pub fn spawn_scheduler(
    queue: Arc<dyn Enqueue>,
    clock: Clock,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (job, key) in periodic_jobs(clock(), every) {
                let kind = job.kind();
                if let Err(e) = queue.enqueue(job, &key).await {
                    tracing::warn!(job = kind, error = %e, "periodic job not scheduled");
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use revpilot_core::testing::MemoryStore;

    #[tokio::test]
    async fn run_at_once_runs_a_key_once() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let jobs = RunAtOnce::new(Arc::new(Runner::new(store, "test")));
        for key in ["inbox:1", "inbox:1", "inbox:2"] {
            assert!(jobs.enqueue(Job::Inbox, key).await.is_ok());
        }
        let seen = jobs.seen.lock().map(|s| s.len()).unwrap_or_default();
        assert_eq!(seen, 2, "the second push of inbox:1 ran nothing");
    }
}
