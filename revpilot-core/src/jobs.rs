//! Background work as data: the [`Job`]s a RevPilot deployment runs, the periodic ones and
//! their keys, and the two ports a queue meets — [`Enqueue`] (something jobs can be handed to)
//! and [`ExecuteJob`] (something that runs one). `revpilot-stripe`'s `Runner` executes jobs;
//! `revpilot-store`'s `queue` feature is a persistent queue in the store's own database; an
//! embedder may bring its own of either.

use std::error::Error as StdError;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::ports::{Connection, ConnectionId, UserId};

/// A unit of background work. Serialized as JSON in a queue's table.
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
    /// Push a [`Job::Overage`] for every billable user's last ended period, as of `day`.
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
    /// A sync of `connection` and its queue key for `trigger` (the connect callback, one cron
    /// call): pushed twice for one trigger, it runs once.
    pub fn sync(connection: &Connection, trigger: &str) -> (Job, String) {
        let job = Job::Sync {
            user: connection.user,
            connection: connection.id,
            stripe_account_id: connection.stripe_account_id.clone(),
        };
        (job, format!("sync:{}:{trigger}", connection.id))
    }

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

/// A queue refused a job; the queue's own error is the source.
#[derive(Debug, thiserror::Error)]
#[error("the queue refused the job: {0}")]
pub struct EnqueueError(#[source] pub Box<dyn StdError + Send + Sync>);

/// Something jobs can be handed to: a persistent queue (`revpilot_store::queue`), or an
/// embedder's own.
#[async_trait]
pub trait Enqueue: Send + Sync {
    /// Hands `job` over under `key`: a second push with a key already used is a no-op, so a
    /// trigger delivered twice (two servers, a retried cron) runs once.
    ///
    /// # Errors
    /// [`EnqueueError`] when the queue refuses.
    async fn enqueue(&self, job: Job, key: &str) -> Result<(), EnqueueError>;
}

/// Something that runs a job to its end: what a queue's worker calls for each job it takes.
/// An error is the job's failure, which the queue retries.
#[async_trait]
pub trait ExecuteJob: Send + Sync {
    /// Runs `job`.
    ///
    /// # Errors
    /// Whatever made the job fail, kept as the error (a queue logs and retries it).
    async fn execute(&self, job: &Job) -> Result<(), Box<dyn StdError + Send + Sync>>;
}

/// The periodic jobs due at `now`, each with its queue key: yesterday's [`Job::Snapshot`],
/// today's [`Job::CloseBillingPeriods`], and a [`Job::Inbox`] sweep (billing events whose own job
/// could not be queued). The keys name the day (the sweep's, its `every` bucket), so any number
/// of workers and servers may push them: each runs once.
pub fn periodic_jobs(now: DateTime<Utc>, every: Duration) -> Vec<(Job, String)> {
    let today = now.date_naive();
    let mut jobs = Vec::with_capacity(3);
    if let Some(day) = today.pred_opt() {
        jobs.push((Job::Snapshot { day }, format!("snapshot:{day}")));
    }
    jobs.push((
        Job::CloseBillingPeriods { day: today },
        format!("close-billing-periods:{today}"),
    ));
    let bucket = now.timestamp() / i64::try_from(every.as_secs().max(1)).unwrap_or(1);
    jobs.push((Job::Inbox, format!("inbox-sweep:{bucket}")));
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_jobs_are_keyed_by_their_day_and_the_sweep_by_its_bucket() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap_or_default();
        let keys = |now| -> Vec<String> {
            periodic_jobs(now, Duration::from_secs(600))
                .into_iter()
                .map(|(_, k)| k)
                .collect()
        };
        let noon = keys(at("2026-03-10T12:00:00Z"));
        assert_eq!(
            noon,
            [
                "snapshot:2026-03-09",
                "close-billing-periods:2026-03-10",
                "inbox-sweep:2955240"
            ]
        );
        // Later the same day: the same day's keys (pushed once), a new sweep bucket.
        let later = keys(at("2026-03-10T12:10:00Z"));
        assert_eq!(later[..2], noon[..2]);
        assert_ne!(later[2], noon[2]);
    }

    #[test]
    fn a_job_is_stored_as_tagged_json() {
        let job = Job::Snapshot {
            day: NaiveDate::from_ymd_opt(2026, 3, 9).unwrap_or_default(),
        };
        let json = serde_json::to_string(&job).unwrap_or_default();
        assert_eq!(json, r#"{"job":"snapshot","day":"2026-03-09"}"#);
        assert_eq!(serde_json::from_str::<Job>(&json).ok(), Some(job));
    }
}
