//! The sync engine: one connection's Stripe account into the object cache, completely and
//! resumably.
//!
//! A first run backfills every stream (prices, products, coupons, customers, subscriptions of all
//! statuses, invoices with every line, charges with every refund) with `limit=100` pages. After
//! each page it writes the objects, records one `transaction_volume` unit per charge (keyed by the
//! charge id) and only then saves the stream's cursor: a run killed anywhere and started again
//! re-reads at most the pages that were in flight, which the cache and the usage store take as no
//! change. Before the
//! backfill it notes the newest event; later runs read the Events API from that cursor (a cursor
//! older than Stripe's 30 days of events starts a new backfill).
//!
//! Streams run side by side on the connection's token bucket, and within a stream lanes page
//! disjoint `created` ranges (see `plan`). Two `limit=1` probes ask first whether the server
//! filters by `created` and expands discounts in lists; where it does not (localstripe), a stream
//! is one plain lane and discounts stay ids (the rebuild reports them).
//!
//! Every run is recorded (start, end, objects per stream, requests, retries, error). A 401 means
//! the account revoked access: the connection is deactivated (tokens erased) and the run fails.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use revpilot_core::ports::{
    CachedObject, ConnectionId, ConnectionStore, Meter, ObjectCache, ObjectKind, Period,
    RunOutcome, StoreError, SyncStateStore, SyncStatus, UsageRecord, UsageStore, UserId,
};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::client::{ApiError, Client};
use crate::export::{RawExport, cached_object};

mod plan;
use plan::{Plan, Take};

/// Stripe keeps events this long.
pub const EVENT_RETENTION: TimeDelta = TimeDelta::days(30);

/// The storage a sync writes to.
#[derive(Clone)]
pub struct SyncPorts {
    /// Objects.
    pub cache: Arc<dyn ObjectCache>,
    /// Cursors and run records.
    pub state: Arc<dyn SyncStateStore>,
    /// Usage (transaction volume).
    pub usage: Arc<dyn UsageStore>,
    /// Connections (deactivated on a 401).
    pub connections: Arc<dyn ConnectionStore>,
}

impl SyncPorts {
    /// Every port from one store that implements them all (the SQLite, PostgreSQL and in-memory
    /// stores do).
    pub fn from_store<S>(store: Arc<S>) -> Self
    where
        S: ObjectCache + SyncStateStore + UsageStore + ConnectionStore + 'static,
    {
        SyncPorts {
            cache: store.clone(),
            state: store.clone(),
            usage: store.clone(),
            connections: store,
        }
    }
}

/// Which connection to sync, and where its usage counts.
#[derive(Debug, Clone)]
pub struct SyncJob {
    /// The owner.
    pub user: UserId,
    /// The connection.
    pub connection: ConnectionId,
    /// Its `acct_...` (for deactivation on a 401).
    pub stripe_account_id: String,
    /// The user's current usage period and `transaction_volume` limit, if usage is metered:
    /// `revpilot_core::billing::metering(catalog, profile, Meter::TransactionVolume, now)`.
    pub usage: Option<(Period, Option<u64>)>,
}

/// Progress, reported through the callback as the sync goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A page of a stream was stored.
    Page {
        /// The stream (`customer`, ..., `event`).
        stream: &'static str,
        /// Objects of the stream stored so far in this run.
        total: u64,
    },
    /// A stream is complete.
    StreamDone {
        /// The stream.
        stream: &'static str,
        /// Objects stored in this run.
        total: u64,
    },
}

/// Why a sync stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Stripe failed (after retries, where retrying made sense).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Storage failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// Stripe sent an object RevPilot cannot store.
    #[error("{stream}: {problem}")]
    Invalid {
        /// The stream.
        stream: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// One backfill stream.
struct Stream {
    name: &'static str,
    kind: ObjectKind,
    path: &'static str,
    /// Older API shape served where `path` 404s (localstripe has plans, not prices).
    fallback: Option<&'static str>,
    /// A server without this list (its first page 404s) has none of these objects: localstripe
    /// has no disputes. Stripe itself always has the list.
    optional: bool,
    params: &'static [(&'static str, &'static str)],
}

const STREAMS: [Stream; 8] = [
    Stream {
        name: "price",
        kind: ObjectKind::Price,
        path: "/v1/prices",
        fallback: Some("/v1/plans"),
        optional: false,
        params: &[("expand[]", "data.tiers")],
    },
    Stream {
        name: "product",
        kind: ObjectKind::Product,
        path: "/v1/products",
        fallback: None,
        optional: false,
        params: &[],
    },
    Stream {
        name: "coupon",
        kind: ObjectKind::Coupon,
        path: "/v1/coupons",
        fallback: None,
        optional: false,
        params: &[],
    },
    Stream {
        name: "customer",
        kind: ObjectKind::Customer,
        path: "/v1/customers",
        fallback: None,
        optional: false,
        params: &[],
    },
    Stream {
        name: "subscription",
        kind: ObjectKind::Subscription,
        path: "/v1/subscriptions",
        fallback: None,
        optional: false,
        params: &[("status", "all")],
    },
    Stream {
        name: "invoice",
        kind: ObjectKind::Invoice,
        path: "/v1/invoices",
        fallback: None,
        optional: false,
        params: &[],
    },
    Stream {
        name: "charge",
        kind: ObjectKind::Charge,
        path: "/v1/charges",
        fallback: None,
        optional: false,
        params: &[],
    },
    Stream {
        name: "dispute",
        kind: ObjectKind::Dispute,
        path: "/v1/disputes",
        fallback: None,
        optional: true,
        params: &[],
    },
];

const DONE: &str = "done";
const BACKFILL: &str = "backfill";
const EVENTS: &str = "event";
const ANCHOR: &str = "event_anchor";
/// Events created this close to a run's start may not be listed yet; the cursor stays this far
/// behind (re-reading an event changes nothing).
const CURSOR_SLACK_SECS: i64 = 300;

/// An object's id and (when it has one) `created`.
#[derive(Deserialize)]
struct Head {
    id: String,
    #[serde(default)]
    created: i64,
}

/// What the streams of one backfill share.
struct Run<'a> {
    job: &'a SyncJob,
    /// Objects stored per stream.
    tally: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Pages in flight across the streams.
    active: std::sync::atomic::AtomicUsize,
    /// The account's creation, where known.
    floor: Option<i64>,
    /// The server filters lists by `created`.
    filters: bool,
    /// The server expands subscriptions' and invoices' discounts in lists.
    expand: bool,
    progress: &'a (dyn Fn(&Progress) + Send + Sync),
}

/// What the lanes of one stream share.
struct StreamRun<'a> {
    stream: &'a Stream,
    /// The stream's cursor key.
    key: String,
    plan: std::sync::Mutex<Plan>,
    /// The version of the plan last saved: saves happen in the order the plan changed, never an
    /// older plan over a newer one.
    saved: tokio::sync::Mutex<u64>,
    version: std::sync::atomic::AtomicU64,
    /// Objects stored by this stream in this run.
    total: std::sync::atomic::AtomicU64,
}

/// Lanes per stream in a backfill.
const LANES: usize = 4;
/// Below this many pages in flight (not backing off) across the streams, idle lanes split.
const MIN_IN_FLIGHT: usize = 1;

/// Counts a page in flight until dropped (errors and cancellation included).
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Deserialize)]
struct EventHead {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    created: i64,
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    object: Box<RawValue>,
}

/// Reads one connection's Stripe account into the ports.
pub struct Syncer {
    client: Client,
    ports: SyncPorts,
}

impl Syncer {
    /// A syncer talking to Stripe through `client` (keyed for the connected account).
    pub fn new(client: Client, ports: SyncPorts) -> Self {
        Syncer { client, ports }
    }

    /// Runs one sync of `job` and records it. Returns how it ended; the run record says the same.
    ///
    /// # Errors
    /// Only when the run cannot even be recorded; a failed sync is an `Ok` outcome with
    /// [`SyncStatus::Failed`] and its error.
    pub async fn run(
        &self,
        job: &SyncJob,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<(SyncStatus, RunOutcome), StoreError> {
        let run = self
            .ports
            .state
            .start_run(job.connection, Utc::now())
            .await?;
        let (requests0, retries0) = self.client.counters();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let result = self.sync(job, &mut counts, progress).await;
        let (requests, retries) = self.client.counters();
        let mut outcome = RunOutcome {
            objects: counts,
            requests: requests - requests0,
            retries: retries - retries0,
            error: None,
        };
        let status = match result {
            Ok(()) => SyncStatus::Succeeded,
            Err(SyncError::Store(StoreError::LimitExceeded { .. })) => {
                outcome.error = Some("transaction_volume limit reached; sync paused until the next period or an upgrade".into());
                SyncStatus::Paused
            }
            Err(SyncError::Api(ApiError::Unauthorized { message })) => {
                self.ports
                    .connections
                    .deactivate(&job.stripe_account_id, Utc::now())
                    .await?;
                outcome.error = Some(format!(
                    "Stripe refused the connection's token ({message}); the connection is now inactive and must be reconnected"
                ));
                SyncStatus::Failed
            }
            Err(e) => {
                outcome.error = Some(e.to_string());
                SyncStatus::Failed
            }
        };
        if status == SyncStatus::Succeeded {
            self.ports
                .connections
                .set_last_synced(job.connection, Utc::now())
                .await?;
        }
        self.ports
            .state
            .finish_run(run, status, &outcome, Utc::now())
            .await?;
        Ok((status, outcome))
    }

    async fn sync(
        &self,
        job: &SyncJob,
        counts: &mut BTreeMap<String, u64>,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<(), SyncError> {
        let state = &self.ports.state;
        if state.cursor(job.connection, BACKFILL).await?.as_deref() == Some(DONE) {
            let cursor = state.cursor(job.connection, EVENTS).await?;
            let fresh = cursor
                .as_deref()
                .and_then(parse_event_cursor)
                .is_some_and(|(_, created)| created > (Utc::now() - EVENT_RETENTION).timestamp());
            if fresh {
                return self.events(job, counts, progress).await;
            }
            tracing::info!(connection = %job.connection.0, "event cursor older than 30 days: backfilling again");
            state.clear_cursors(job.connection).await?;
        }
        self.backfill(job, counts, progress).await
    }

    async fn backfill(
        &self,
        job: &SyncJob,
        counts: &mut BTreeMap<String, u64>,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<(), SyncError> {
        let state = &self.ports.state;
        let conn = job.connection;
        // Where the events stream starts once the backfill is complete.
        if state.cursor(conn, ANCHOR).await?.is_none() {
            let floor = Utc::now().timestamp() - CURSOR_SLACK_SECS;
            let page = self.client.list_page("/v1/events", &[], None).await?;
            let anchor = match page.data.first() {
                Some(raw) => {
                    let head: EventHead = parse_raw("event", raw)?;
                    format!("{}@{}", head.id, head.created.max(floor))
                }
                None => format!("@{floor}"),
            };
            state.set_cursor(conn, ANCHOR, &anchor, Utc::now()).await?;
        }
        // The streams run side by side on the connection's one token bucket: while one waits
        // out a backoff, the others use the budget.
        // The account's creation bounds its objects' (where the server tells it).
        let floor = match self.client.get("/v1/account", &[]).await {
            Ok(body) => serde_json::from_slice::<Head>(&body)
                .ok()
                .map(|h| h.created)
                .filter(|c| *c > 0),
            Err(ApiError::Unauthorized { message }) => {
                return Err(ApiError::Unauthorized { message }.into());
            }
            Err(_) => None,
        };
        // Whether the server filters lists by `created` (localstripe refuses it): without, each
        // stream is one plain lane.
        let filters = match self
            .client
            .get(
                "/v1/customers",
                &[("limit", "1".to_owned()), ("created[gte]", "0".to_owned())],
            )
            .await
        {
            Ok(_) => true,
            Err(ApiError::Rejected { status: 400, .. }) => false,
            Err(e) => return Err(e.into()),
        };
        // Whether it expands discounts in lists (localstripe refuses): the rebuild needs the
        // discount objects, not their ids.
        let expand = match self
            .client
            .get(
                "/v1/subscriptions",
                &[
                    ("limit", "1".to_owned()),
                    ("expand[]", "data.discounts".to_owned()),
                ],
            )
            .await
        {
            Ok(_) => true,
            Err(ApiError::Rejected { status: 400, .. }) => false,
            Err(e) => return Err(e.into()),
        };
        let run = Run {
            job,
            tally: std::sync::Mutex::new(BTreeMap::new()),
            active: std::sync::atomic::AtomicUsize::new(0),
            floor: floor.filter(|_| filters),
            filters,
            expand,
            progress,
        };
        let result =
            futures::future::try_join_all(STREAMS.iter().map(|s| self.backfill_stream(&run, s)))
                .await;
        for (k, v) in run
            .tally
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            *counts.entry(k).or_default() += v;
        }
        result?;
        let anchor = state.cursor(conn, ANCHOR).await?.unwrap_or_default();
        state.set_cursor(conn, EVENTS, &anchor, Utc::now()).await?;
        state.set_cursor(conn, BACKFILL, DONE, Utc::now()).await?;
        Ok(())
    }

    /// One stream's backfill: [`LANES`] lanes page the stream's plan side by side; each page is
    /// stored (objects, then usage) before the plan that records it is saved as the cursor.
    async fn backfill_stream(&self, run: &Run<'_>, stream: &Stream) -> Result<(), SyncError> {
        let key = format!("{BACKFILL}:{}", stream.name);
        let cursor = self.ports.state.cursor(run.job.connection, &key).await?;
        let mut plan = Plan::load(cursor.as_deref(), Utc::now().timestamp(), run.floor);
        plan.plain |= !run.filters;
        let s = StreamRun {
            stream,
            key,
            plan: std::sync::Mutex::new(plan),
            saved: tokio::sync::Mutex::new(0),
            version: std::sync::atomic::AtomicU64::new(0),
            total: std::sync::atomic::AtomicU64::new(0),
        };
        futures::future::try_join_all((0..LANES).map(|_| self.lane(run, &s))).await?;
        let total = s.total.load(std::sync::atomic::Ordering::Relaxed);
        (run.progress)(&Progress::StreamDone {
            stream: stream.name,
            total,
        });
        Ok(())
    }

    /// One lane: takes a segment of the stream's plan, reads its next page, stores it, saves the
    /// plan; until the plan is finished.
    async fn lane(&self, run: &Run<'_>, s: &StreamRun<'_>) -> Result<(), SyncError> {
        use std::sync::atomic::Ordering::SeqCst;
        let (job, stream, key, progress) = (run.job, s.stream, s.key.as_str(), run.progress);
        let (plan, saved, version, total) = (&s.plan, &s.saved, &s.version, &s.total);
        let (tally, active) = (&run.tally, &run.active);
        let lock = || {
            plan.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        loop {
            let (i, seg, plain, path) = {
                let mut p = lock();
                // Ranges are split only when too few pages are in flight (not waiting out a
                // backoff) across all streams:
                // every split costs a partial page and, at first, a probe of an empty range.
                let ready = active
                    .load(SeqCst)
                    .saturating_sub(self.client.backing_off());
                match p.take(ready < MIN_IN_FLIGHT) {
                    Take::Finished => return Ok(()),
                    Take::Wait => None,
                    Take::Work(i) => {
                        let path = p.path.clone().unwrap_or_else(|| stream.path.to_owned());
                        Some((i, p.segments[i].clone(), p.plain, path))
                    }
                }
            }
            .map_or(
                (usize::MAX, None, false, String::new()),
                |(i, s, plain, path)| (i, Some(s), plain, path),
            );
            let Some(seg) = seg else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            active.fetch_add(1, SeqCst);
            let _in_flight = InFlight(active);
            let mut params: Vec<(&str, String)> = stream
                .params
                .iter()
                .map(|(k, v)| (*k, (*v).to_owned()))
                .collect();
            if !plain {
                params.push(("created[gte]", seg.lo.to_string()));
                params.push(("created[lt]", seg.hi.to_string()));
            }
            if run.expand && matches!(stream.kind, ObjectKind::Subscription | ObjectKind::Invoice) {
                params.push(("expand[]", "data.discounts".to_owned()));
            }
            let page = match self
                .client
                .list_page(&path, &params, seg.after.as_deref())
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    let mut p = lock();
                    let first = p.segments.len() == 1 && seg.after.is_none();
                    if e.is_not_found() && first && stream.optional {
                        p.page_done(i, None, false);
                        continue;
                    }
                    p.release(i);
                    if e.is_not_found()
                        && first
                        && p.path.is_none()
                        && let Some(fallback) = stream.fallback
                    {
                        p.path = Some(fallback.to_owned());
                        continue;
                    }
                    return Err(e.into());
                }
            };
            let now = Utc::now();
            let mut objects = Vec::with_capacity(page.data.len());
            let mut last = None;
            for raw in &page.data {
                let data = self.complete(stream.kind, raw).await?;
                let head: Head = parse_raw(stream.name, raw)?;
                last = Some((head.id.clone(), head.created));
                objects.push(cached_object(stream.kind, head.id, now, data));
            }
            let stored = match self.store(job, &objects).await {
                Ok(n) => n,
                Err(e) => {
                    lock().release(i);
                    return Err(e);
                }
            };
            *tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(stream.name.to_owned())
                .or_default() += stored;
            let (snapshot, v) = {
                let mut p = lock();
                p.page_done(i, last, page.has_more);
                (p.save(), version.fetch_add(1, SeqCst) + 1)
            };
            {
                let mut last_saved = saved.lock().await;
                if v > *last_saved {
                    self.ports
                        .state
                        .set_cursor(job.connection, key, &snapshot, Utc::now())
                        .await?;
                    *last_saved = v;
                }
            }
            let t = total.fetch_add(stored, SeqCst) + stored;
            progress(&Progress::Page {
                stream: stream.name,
                total: t,
            });
        }
    }

    /// Events since the cursor, applied oldest first; the cursor moves after each page applied.
    async fn events(
        &self,
        job: &SyncJob,
        counts: &mut BTreeMap<String, u64>,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<(), SyncError> {
        let state = &self.ports.state;
        let floor = Utc::now().timestamp() - CURSOR_SLACK_SECS;
        let cursor = state
            .cursor(job.connection, EVENTS)
            .await?
            .unwrap_or_default();
        let (seen_id, since) = parse_event_cursor(&cursor).unwrap_or(("", 0));
        // Stripe lists newest first; gather back to the cursor, then apply in time order. (A
        // server listing oldest first is read to its end; the version check keeps it correct.)
        let mut fresh: Vec<(EventHead, Box<RawValue>)> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .client
                .list_page("/v1/events", &[], after.as_deref())
                .await?;
            let mut all_older = !page.data.is_empty();
            for raw in &page.data {
                let head: EventHead = parse_raw("event", raw)?;
                after = Some(head.id.clone());
                if head.created < since || head.id == seen_id {
                    continue;
                }
                all_older = false;
                fresh.push((head, raw.clone()));
            }
            let descending = page
                .data
                .windows(2)
                .all(|w| created_of(&w[0]) >= created_of(&w[1]));
            if !page.has_more || (all_older && descending) {
                break;
            }
        }
        fresh.sort_by(|a, b| (a.0.created, &a.0.id).cmp(&(b.0.created, &b.0.id)));
        let mut total = 0u64;
        for (head, _) in &fresh {
            if head.event_type == "account.application.deauthorized" {
                return Err(ApiError::Unauthorized {
                    message: "account.application.deauthorized".into(),
                }
                .into());
            }
            let Some(kind) = kind_of(&head.data.object) else {
                continue;
            };
            let version = DateTime::from_timestamp(head.created, 0).unwrap_or_else(Utc::now);
            let data = self.complete(kind, &head.data.object).await?;
            let id: Head = parse_raw("event object", &head.data.object)?;
            self.store(job, &[cached_object(kind, id.id, version, data)])
                .await?;
            total += 1;
            state
                .set_cursor(
                    job.connection,
                    EVENTS,
                    &format!("{}@{}", head.id, head.created),
                    Utc::now(),
                )
                .await?;
        }
        // Every event up to now was listed: a quiet account's cursor stays fresh.
        let (last_id, last_created) = fresh.last().map_or((seen_id.to_owned(), since), |(h, _)| {
            (h.id.clone(), h.created)
        });
        state
            .set_cursor(
                job.connection,
                EVENTS,
                &format!("{last_id}@{}", last_created.max(floor)),
                Utc::now(),
            )
            .await?;
        *counts.entry(EVENTS.to_owned()).or_default() += total;
        progress(&Progress::StreamDone {
            stream: "event",
            total,
        });
        Ok(())
    }

    /// Stores a page and records usage for its charges, in that order. Returns how many objects
    /// were new or changed.
    async fn store(&self, job: &SyncJob, objects: &[CachedObject]) -> Result<u64, SyncError> {
        if objects.is_empty() {
            return Ok(0);
        }
        let stats = self
            .ports
            .cache
            .upsert_objects(job.connection, objects)
            .await?;
        let stored = (stats.inserted + stats.updated) as u64;
        let Some((period, limit)) = job.usage else {
            return Ok(stored);
        };
        // A page's charges in one step (one transaction), each counted once by its id.
        let records: Vec<UsageRecord> = objects
            .iter()
            .filter(|o| o.kind == ObjectKind::Charge)
            .map(|o| UsageRecord {
                user: job.user,
                meter: Meter::TransactionVolume,
                connection: Some(job.connection),
                amount: 1,
                idempotency_key: o.stripe_id.clone(),
                metadata: Value::Null,
                at: Utc::now(),
            })
            .collect();
        if !records.is_empty() {
            self.ports.usage.record_all(&records, period, limit).await?;
        }
        Ok(stored)
    }

    async fn complete(&self, kind: ObjectKind, raw: &RawValue) -> Result<String, SyncError> {
        complete(&self.client, kind, raw).await
    }
}

/// An object with its nested lists complete: an invoice's lines and a charge's refunds beyond the
/// embedded page are fetched and spliced in.
async fn complete(client: &Client, kind: ObjectKind, raw: &RawValue) -> Result<String, SyncError> {
    let (field, path, filter) = match kind {
        ObjectKind::Invoice => ("lines", "lines", None),
        ObjectKind::Charge => ("refunds", "/v1/refunds", Some("charge")),
        _ => return Ok(raw.get().to_owned()),
    };
    #[derive(Deserialize)]
    struct Nested {
        id: String,
        #[serde(default)]
        lines: Option<crate::objects::List<IgnoredAny>>,
        #[serde(default)]
        refunds: Option<crate::objects::List<IgnoredAny>>,
    }
    #[derive(Deserialize)]
    struct IgnoredAny {}
    let head: Nested = parse_raw(kind.as_str(), raw)?;
    let more = match kind {
        ObjectKind::Invoice => head.lines.is_some_and(|l| l.has_more),
        _ => head.refunds.is_some_and(|l| l.has_more),
    };
    if !more {
        return Ok(raw.get().to_owned());
    }
    let mut value: Value = serde_json::from_str(raw.get()).map_err(|e| SyncError::Invalid {
        stream: kind.as_str(),
        problem: e.to_string(),
    })?;
    let list_path = if path == "lines" {
        format!("/v1/invoices/{}/lines", head.id)
    } else {
        path.to_owned()
    };
    let params: Vec<(&str, String)> = filter.map(|f| (f, head.id.clone())).into_iter().collect();
    let mut items: Vec<Value> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = client
            .list_page(&list_path, &params, after.as_deref())
            .await?;
        for r in &page.data {
            let id: Head = parse_raw(field, r)?;
            after = Some(id.id);
            items.push(
                serde_json::from_str(r.get()).map_err(|e| SyncError::Invalid {
                    stream: kind.as_str(),
                    problem: e.to_string(),
                })?,
            );
        }
        if !page.has_more || page.data.is_empty() {
            break;
        }
    }
    value[field]["data"] = Value::Array(items);
    value[field]["has_more"] = Value::Bool(false);
    Ok(value.to_string())
}

/// Every object of the account behind `client`, as `revpilot export` writes it: each list
/// complete (nested lines and refunds included), discounts expanded where the server can, and
/// `exported_at` the instant the listing began (the data's as-of instant).
///
/// # Errors
/// [`SyncError::Api`] when Stripe fails after retries; [`SyncError::Invalid`] for an object
/// without an id.
pub async fn export_account(
    client: &Client,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<RawExport, SyncError> {
    // Everything up to the start of the listing is in it; later changes may be missed by lists
    // already read.
    let mut out = RawExport {
        exported_at: Some(Utc::now().timestamp()),
        ..RawExport::default()
    };
    for stream in STREAMS.iter().filter(|s| s.kind != ObjectKind::Product) {
        let mut params: Vec<(&str, String)> = stream
            .params
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect();
        if matches!(stream.kind, ObjectKind::Subscription | ObjectKind::Invoice) {
            params.push(("expand[]", "data.discounts".to_owned()));
        }
        let mut path = stream.path;
        let mut after: Option<String> = None;
        let mut items: Vec<Box<RawValue>> = Vec::new();
        loop {
            let page = match client.list_page(path, &params, after.as_deref()).await {
                Err(e) if e.is_not_found() && stream.fallback.is_some() && path == stream.path => {
                    path = stream.fallback.unwrap_or(stream.path);
                    continue;
                }
                Err(e) if e.is_not_found() && stream.optional && after.is_none() => break,
                // A server that cannot expand discounts (localstripe) lists them as ids.
                Err(ApiError::Rejected { status: 400, .. })
                    if params.len() > stream.params.len() && after.is_none() =>
                {
                    params.truncate(stream.params.len());
                    continue;
                }
                other => other?,
            };
            for raw in &page.data {
                let id: Head = parse_raw(stream.name, raw)?;
                after = Some(id.id);
                let data = complete(client, stream.kind, raw).await?;
                items.push(RawValue::from_string(data).map_err(|e| SyncError::Invalid {
                    stream: stream.name,
                    problem: e.to_string(),
                })?);
            }
            progress(&Progress::Page {
                stream: stream.name,
                total: items.len() as u64,
            });
            if !page.has_more || page.data.is_empty() {
                break;
            }
        }
        progress(&Progress::StreamDone {
            stream: stream.name,
            total: items.len() as u64,
        });
        match stream.kind {
            ObjectKind::Price => out.prices = items,
            ObjectKind::Coupon => out.coupons = items,
            ObjectKind::Customer => out.customers = items,
            ObjectKind::Subscription => out.subscriptions = items,
            ObjectKind::Invoice => out.invoices = items,
            ObjectKind::Charge => out.charges = items,
            ObjectKind::Dispute => out.disputes = items,
            ObjectKind::Product => {}
        }
    }
    let mut after: Option<String> = None;
    loop {
        let page = client
            .list_page("/v1/events", &[], after.as_deref())
            .await?;
        let more = page.has_more && !page.data.is_empty();
        for raw in page.data {
            let id: Head = parse_raw("event", &raw)?;
            after = Some(id.id);
            out.events.push(raw);
        }
        if !more {
            break;
        }
    }
    progress(&Progress::StreamDone {
        stream: "event",
        total: out.events.len() as u64,
    });
    Ok(out)
}

fn created_of(raw: &RawValue) -> i64 {
    #[derive(Deserialize)]
    struct C {
        #[serde(default)]
        created: i64,
    }
    serde_json::from_str::<C>(raw.get())
        .map(|c| c.created)
        .unwrap_or(0)
}

fn kind_of(raw: &RawValue) -> Option<ObjectKind> {
    #[derive(Deserialize)]
    struct O {
        #[serde(default)]
        object: String,
    }
    let o: O = serde_json::from_str(raw.get()).ok()?;
    match o.object.as_str() {
        "plan" => Some(ObjectKind::Price),
        other => ObjectKind::parse(other),
    }
}

fn parse_event_cursor(cursor: &str) -> Option<(&str, i64)> {
    let (id, created) = cursor.rsplit_once('@')?;
    Some((id, created.parse().ok()?))
}

fn parse_raw<'a, T: Deserialize<'a>>(
    stream: &'static str,
    raw: &'a RawValue,
) -> Result<T, SyncError> {
    serde_json::from_str(raw.get()).map_err(|e| SyncError::Invalid {
        stream,
        problem: format!("{e} in {}", raw.get().chars().take(120).collect::<String>()),
    })
}

#[cfg(test)]
mod tests;
