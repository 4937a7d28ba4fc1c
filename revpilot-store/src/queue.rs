//! The persistent job queue (feature `queue`): apalis 1.0 with its SQLite or PostgreSQL
//! storage, in the store's own database (`Jobs`/`Workers` tables on SQLite, the `apalis` schema on PostgreSQL, which
//! claims jobs with `FOR UPDATE SKIP LOCKED`). apalis's migration history is kept apart from the
//! store's (`_apalis_migrations`, `apalis._migrations`), so the two never see each other's
//! versions.
//!
//! [`Queue`] implements core's [`Enqueue`] port (a server pushes to it) and runs a worker over any
//! [`ExecuteJob`] (`revpilot_stripe::Runner` in the examples): [`Queue::run`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn demo<R: revpilot_core::jobs::ExecuteJob + 'static>(runner: Arc<R>) -> Result<(), Box<dyn std::error::Error>> {
//! use revpilot_store::{KeyRing, queue};
//! let keys = KeyRing::parse(&std::env::var("REVPILOT_ENCRYPTION_KEY")?)?;
//! let (store, jobs) = queue::open("sqlite://revpilot.db", keys, queue::QUEUE).await?;
//! let stop = std::future::pending::<()>(); // a shutdown signal, in a real worker
//! jobs.run(runner, "worker-1".into(), stop, std::time::Duration::from_secs(20)).await?;
//! # let _ = store; Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::layers::retry::HasherRng;
use apalis::layers::retry::backoff::{ExponentialBackoffMaker, MakeBackoff};
use apalis::prelude::*;
use apalis_core::backend::BackendConfig;
use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy, PollWith};
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use async_trait::async_trait;
use revpilot_core::jobs::{Enqueue, EnqueueError, ExecuteJob, Job};
use revpilot_core::ports::Store;
use sqlx::{PgPool, SqlitePool};

/// How often an idle worker looks for jobs.
pub const POLL: Duration = Duration::from_millis(250);

/// Jobs a worker runs at once.
pub const CONCURRENCY: usize = 4;

/// Attempts of a job (each retried with exponential backoff, 0.5 s doubling to 60 s) before it
/// is left failed in the table for an operator.
pub const MAX_ATTEMPTS: usize = 12;

/// Why the queue could not be set up, pushed to or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue's tables could not be created or migrated.
    #[error("job queue migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A push, or handing jobs back, failed; the database's error is the source.
    #[error("job queue push: {0}")]
    Push(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The worker stopped on an error.
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
}

#[async_trait]
impl Enqueue for Queue {
    async fn enqueue(&self, job: Job, key: &str) -> Result<(), EnqueueError> {
        self.push(&job, key)
            .await
            .map_err(|e| EnqueueError(Box::new(e)))
    }
}

/// A named queue of [`Job`]s in the store's database. Cheap to clone.
#[derive(Clone)]
pub enum Queue {
    /// On SQLite.
    Sqlite(SqliteStorage<Job>),
    /// On PostgreSQL.
    Postgres(PostgresStorage<Job>),
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Queue::Sqlite(_) => f.write_str("Queue::Sqlite"),
            Queue::Postgres(_) => f.write_str("Queue::Postgres"),
        }
    }
}

/// The queue's default name.
pub const QUEUE: &str = "revpilot";

/// Why [`open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The store.
    #[error("database: {0}")]
    Store(#[from] crate::Error),
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
    keys: crate::KeyRing,
    queue: &str,
) -> Result<(Arc<dyn Store>, Queue), OpenError> {
    if database_url.starts_with("postgres") {
        let store = crate::PgStore::connect(database_url, keys).await?;
        let q = Queue::postgres(store.pool(), queue).await?;
        Ok((Arc::new(store), q))
    } else {
        let store = crate::SqliteStore::connect(database_url, keys).await?;
        let q = Queue::sqlite(store.pool(), queue).await?;
        Ok((Arc::new(store), q))
    }
}

impl Queue {
    /// The queue `name` on a SQLite pool; creates or migrates its tables.
    ///
    /// # Errors
    /// [`QueueError::Migrate`].
    pub async fn sqlite(pool: &SqlitePool, name: &str) -> Result<Queue, QueueError> {
        let mut migrator = SqliteStorage::migrations();
        migrator.dangerous_set_table_name("_apalis_migrations");
        migrator.run(pool).await?;
        let config = apalis_sqlite::Config::default()
            .queue(name)
            .batch_size(CONCURRENCY);
        Ok(Queue::Sqlite(SqliteStorage::new(pool).with_config(config)))
    }

    /// The queue `name` on a PostgreSQL pool; creates or migrates the `apalis` schema.
    ///
    /// # Errors
    /// [`QueueError::Migrate`].
    pub async fn postgres(pool: &PgPool, name: &str) -> Result<Queue, QueueError> {
        let mut migrator = PostgresStorage::migrations();
        migrator.create_schema("apalis");
        migrator.dangerous_set_table_name("apalis._migrations");
        migrator.run(pool).await?;
        let config = apalis_postgres::Config::default()
            .queue(name)
            .batch_size(CONCURRENCY);
        Ok(Queue::Postgres(
            PostgresStorage::new(pool).with_config(config),
        ))
    }

    /// The same queue with workers heartbeating every `every` (default 30 s). A worker that
    /// misses two heartbeats is dead: the jobs it held are queued again (for the others, or for
    /// itself after a restart under a new id).
    #[must_use]
    pub fn with_heartbeat(self, every: Duration) -> Queue {
        match self {
            Queue::Sqlite(s) => {
                let config = s.config().clone().heartbeat_interval(every);
                Queue::Sqlite(s.with_config(config))
            }
            Queue::Postgres(s) => {
                let config = s.config().clone().heartbeat_interval(every);
                Queue::Postgres(s.with_config(config))
            }
        }
    }

    /// Pushes `job` under `key`. A key pushed before is a no-op (a unique index holds it), so
    /// a trigger delivered twice, or by two servers, is one job.
    ///
    /// # Errors
    /// [`QueueError::Push`] when the database refuses.
    pub async fn push(&self, job: &Job, key: &str) -> Result<(), QueueError> {
        let task = TaskBuilder::new(job.clone())
            .idempotency_key(key)
            .max_attempts(MAX_ATTEMPTS)
            .build();
        type Boxed = Box<dyn std::error::Error + Send + Sync>;
        let pushed = match self {
            Queue::Sqlite(s) => s.clone().push_task(task).await.map_err(Boxed::from),
            Queue::Postgres(s) => s.clone().push_task(task).await.map_err(Boxed::from),
        };
        match pushed {
            Ok(()) => Ok(()),
            // PostgreSQL refuses a second push of a key (SQLite ignores it): already queued.
            Err(e) if e.to_string().contains("idx_jobs_idempotency_key") => Ok(()),
            Err(e) => Err(QueueError::Push(e)),
        }
    }

    /// Runs a worker named `name` on this queue until `shutdown` completes; then it takes no
    /// new job and lets the ones in hand finish for at most `drain`. Jobs still in hand then
    /// (a stalled call, a retry waiting out its backoff) are dropped and handed back to the
    /// queue at once ([`Queue::requeue_held`]), for another worker or the next start. A job
    /// that fails is retried with exponential backoff; one that a killed worker held is taken
    /// again by another once the dead worker's heartbeat is missed.
    ///
    /// # Errors
    /// [`QueueError::Worker`] when the backend fails; [`QueueError::Push`] when jobs cannot be
    /// handed back.
    pub async fn run<R, F>(
        self,
        runner: Arc<R>,
        name: String,
        shutdown: F,
        drain: Duration,
    ) -> Result<(), QueueError>
    where
        R: ExecuteJob + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            let _ = stopping.send(());
        };
        let mut worker = Box::pin(self.clone().work(runner, name.clone(), signal));
        tokio::select! {
            done = &mut worker => return done,
            _ = stopped => {}
        }
        match tokio::time::timeout(drain, &mut worker).await {
            Ok(done) => done,
            Err(_) => {
                // Dropping the worker drops the jobs in hand (apalis polls them within it).
                drop(worker);
                let n = self.requeue_held(&name).await?;
                tracing::warn!(
                    jobs = n,
                    drain_secs = drain.as_secs_f64(),
                    "jobs still in hand at the end of the drain were handed back to the queue"
                );
                Ok(())
            }
        }
    }

    /// Hands the jobs that the worker `name` holds (taken or running) back to the queue as
    /// pending, at once, without counting an attempt: a shutdown is not the job's failure.
    /// Every job is safe to run again (ARCHITECTURE.md: cursors, idempotency keys). Returns
    /// how many.
    ///
    /// # Errors
    /// [`QueueError::Push`] when the database refuses.
    pub async fn requeue_held(&self, name: &str) -> Result<u64, QueueError> {
        let done = match self {
            Queue::Sqlite(s) => sqlx::query(
                "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, \
                 done_at = NULL, last_result = '{\"Err\": \"Handed back at shutdown\"}' \
                 WHERE lock_by = ?1 AND status IN ('Running', 'Queued')",
            )
            .bind(name)
            .execute(s.pool())
            .await
            .map(|r| r.rows_affected()),
            Queue::Postgres(s) => sqlx::query(
                "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, \
                 done_at = NULL, last_result = '{\"Err\": \"Handed back at shutdown\"}' \
                 WHERE lock_by = $1 AND status IN ('Running', 'Queued')",
            )
            .bind(name)
            .execute(s.pool())
            .await
            .map(|r| r.rows_affected()),
        };
        done.map_err(|e| QueueError::Push(Box::new(e)))
    }

    /// The apalis worker itself, until `shutdown`, then until its jobs in hand are done.
    async fn work<R, F>(self, runner: Arc<R>, name: String, shutdown: F) -> Result<(), QueueError>
    where
        R: ExecuteJob + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let signal = async move {
            shutdown.await;
            Ok::<(), WorkerError>(())
        };
        let backoff = ExponentialBackoffMaker::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            0.5,
            HasherRng::default(),
        )
        .map_err(|e| QueueError::Push(Box::new(e)))?
        .make_backoff();
        let retry = RetryPolicy::retries(MAX_ATTEMPTS).with_backoff(backoff);
        match self {
            Queue::Sqlite(s) => {
                WorkerBuilder::new(name.as_str())
                    .backend(PollWith::new(s, Every::new(POLL)))
                    .data(runner)
                    .concurrency(CONCURRENCY)
                    .retry(retry)
                    .build(handle::<R>)
                    .run_until(signal)
                    .await?
            }
            Queue::Postgres(s) => {
                WorkerBuilder::new(name.as_str())
                    .backend(PollWith::new(s, Every::new(POLL)))
                    .data(runner)
                    .concurrency(CONCURRENCY)
                    .retry(retry)
                    .build(handle::<R>)
                    .run_until(signal)
                    .await?
            }
        }
        Ok(())
    }
}

/// The worker's task function: one job through the [`ExecuteJob`].
async fn handle<R: ExecuteJob>(job: Job, runner: Data<Arc<R>>) -> Result<(), BoxDynError> {
    runner.execute(&job).await
}

/// Polls every `every`, re-arming its timer as soon as it fires. apalis 1.0's
/// `poll_with_interval` replaces its timer without polling it, so nothing wakes an idle worker
/// for the next tick: it looked for new jobs only at its next heartbeat (30 s), and a billing
/// event waited that long to apply.
struct Every {
    every: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Every {
    fn new(every: Duration) -> Self {
        Every { every, sleep: None }
    }
}

impl PollStrategy for Every {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let every = self.every;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // The next tick, polled once so that it wakes this task when it fires.
        let mut next = Box::pin(tokio::time::sleep(every));
        let _ = next.as_mut().poll(cx);
        self.sleep = Some(next);
        Poll::Ready(Some(()))
    }
}
