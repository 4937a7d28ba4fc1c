//! The connections' accounts a process keeps, loaded once per sync instead of once per request.
//!
//! Loading an account means reading the connection's derivation (or rebuilding it from the
//! cache, [`crate::rebuild::derived::load_account`]); a dashboard and an API ask for the same
//! account many times between two syncs. [`Accounts`] keeps the account of each connection
//! together with the `last_synced_at` it was loaded at: a caller that reads the connection's row
//! and finds another stamp loads it again ([`Accounts::load`]: one load per connection at a
//! time, whoever else asks meanwhile waits for it). Because the stamp lives in the database, a
//! sync finished by any worker or server invalidates every process's copy without a message
//! between them. The kept accounts are bounded in bytes.
//!
//! Each account is compiled for the engine once, when it is loaded ([`Loaded`]), and counted
//! with its compiled form against the budget. Series reports computed from it are kept beside it (a bounded memo keyed by range and
//! granularity), so a dashboard reloaded a hundred times computes its series once per sync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use revpilot_core::fx::{FxRates, FxTable};
use revpilot_core::metrics::{
    CohortTable, Engine, Error as MetricsError, Granularity, OwnedEngine, SeriesReport,
    SeriesRequest,
};
use revpilot_core::model::Account;
use revpilot_core::ports::{
    Connection, ConnectionId, ConnectionStore, DerivedStore, ObjectCache, Store, StoreError, UserId,
};
use revpilot_core::{Currency, Rules};

use crate::jobs::{AccountSource, JobError};
use crate::rebuild::derived::{Held, LoadOptions, load_account_with};
use crate::rebuild::stream::CachedRebuildError;

/// Accounts kept per process before the oldest goes.
pub const MAX_ACCOUNTS: usize = 256;

/// Series reports kept per connection before the memo starts over.
pub const MEMO_REPORTS: usize = 64;

/// Rows of the longest series the memo keeps (a year of days). Longer ranges are computed for
/// their request and dropped: 64 ten-year daily series and their bodies would hold hundreds of
/// megabytes for one connection.
pub const MEMO_MAX_ROWS: usize = 400;

/// One connection's account, compiled for the engine once, when it is made.
#[derive(Debug)]
pub struct Loaded {
    /// The timeline (shared with the jobs that read it).
    pub account: Arc<Account>,
    /// Reporting currency.
    pub currency: Currency,
    /// The account compiled, with its exchange rates: every query shares it.
    compiled: OwnedEngine,
    /// The instant the data runs to (the connection's last sync, else the newest object): no
    /// row reaches past it.
    pub as_of: Option<DateTime<Utc>>,
    reports: Mutex<HashMap<SeriesKey, Arc<SeriesReport>>>,
    bodies: Mutex<HashMap<SeriesKey, Bytes>>,
    cohorts: Mutex<HashMap<(NaiveDate, NaiveDate), Arc<CohortTable>>>,
}

type SeriesKey = (NaiveDate, NaiveDate, Granularity);

impl Loaded {
    /// An account ready for queries, with exchange rates for foreign-currency revenue when
    /// known. Compiles it (about 0.4 s for 100,000 customers): off the async runtime's threads.
    pub fn new(account: Account, currency: Currency, fx: Option<FxTable>) -> Self {
        Loaded::compile(Arc::new(account), currency, fx)
    }

    /// [`Loaded::new`] of an account already shared.
    pub fn compile(account: Arc<Account>, currency: Currency, fx: Option<FxTable>) -> Self {
        let fx = fx.map(|fx| Arc::new(fx) as Arc<dyn FxRates + Send + Sync>);
        Loaded {
            compiled: OwnedEngine::new(Arc::clone(&account), fx, Rules::default(), currency),
            account,
            currency,
            as_of: None,
            reports: Mutex::default(),
            bodies: Mutex::default(),
            cohorts: Mutex::default(),
        }
    }

    /// The same account, known up to `as_of`.
    #[must_use]
    pub fn with_as_of(mut self, as_of: Option<DateTime<Utc>>) -> Self {
        self.as_of = as_of;
        self
    }

    /// The engine over the account (its compiled form is shared), cut at its as-of instant.
    pub fn engine(&self) -> Engine<'_> {
        let engine = self.compiled.engine().clone();
        match self.as_of {
            Some(at) => engine.with_as_of(at),
            None => engine,
        }
    }

    /// The bytes it holds: the account and its compiled form (what [`Accounts`] counts).
    pub fn heap_bytes(&self) -> usize {
        self.compiled.heap_bytes()
    }

    /// The series from `from` to `to`, computed once per account and range.
    ///
    /// # Errors
    /// The engine's (an invalid range, a missing rate).
    pub fn series(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        granularity: Granularity,
    ) -> Result<Arc<SeriesReport>, MetricsError> {
        let key = (from, to, granularity);
        if let Some(r) = self.memo().get(&key) {
            return Ok(r.clone());
        }
        let report = Arc::new(
            self.engine()
                .series(&SeriesRequest::new(from, to, granularity))?,
        );
        if report.rows.len() > MEMO_MAX_ROWS {
            return Ok(report);
        }
        let mut memo = self.memo();
        if memo.len() >= MEMO_REPORTS {
            memo.clear();
        }
        memo.insert(key, report.clone());
        Ok(report)
    }

    /// A response body made from the series, made once per account and range (the account
    /// and its stamp fix everything a series response says).
    ///
    /// # Errors
    /// As [`Loaded::series`].
    pub fn series_body(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        granularity: Granularity,
        make: impl FnOnce(&SeriesReport) -> Vec<u8>,
    ) -> Result<Bytes, MetricsError> {
        let key = (from, to, granularity);
        let bodies = || self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = bodies().get(&key) {
            return Ok(b.clone());
        }
        let report = self.series(from, to, granularity)?;
        let body = Bytes::from(make(&report));
        if report.rows.len() > MEMO_MAX_ROWS {
            return Ok(body);
        }
        let mut memo = bodies();
        if memo.len() >= MEMO_REPORTS {
            memo.clear();
        }
        memo.insert(key, body.clone());
        Ok(body)
    }

    /// Whether the response body of this series is made already (then answering costs nothing).
    pub fn has_series_body(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        granularity: Granularity,
    ) -> bool {
        self.bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&(from, to, granularity))
    }

    /// The cohort table for cohort months from `from` to `to`, computed once per account and
    /// range (the dashboard's heat map).
    ///
    /// # Errors
    /// The engine's.
    pub fn cohorts(
        &self,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Arc<CohortTable>, MetricsError> {
        let memo = || self.cohorts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = memo().get(&(from, to)) {
            return Ok(t.clone());
        }
        let table = Arc::new(self.engine().cohorts(from, to)?);
        let mut m = memo();
        if m.len() >= MEMO_REPORTS {
            m.clear();
        }
        m.insert((from, to), table.clone());
        Ok(table)
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, HashMap<SeriesKey, Arc<SeriesReport>>> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    user: UserId,
    stamp: Option<DateTime<Utc>>,
    pinned: bool,
    loaded: Arc<Loaded>,
    /// The account's size with its compiled form ([`Loaded::heap_bytes`]), counted against the
    /// budget.
    bytes: usize,
    /// When it was put: the oldest goes first when the budget is full.
    order: u64,
}

/// The bytes of accounts a process keeps by default (the example server's `REVPILOT_ACCOUNTS_MB`),
/// each counted with its compiled form (about a tenth more): past it the oldest accounts are
/// dropped and rebuilt on their next request.
pub const DEFAULT_BUDGET_BYTES: usize = 1 << 30;

/// The rebuilt accounts, by connection (see the module's documentation).
#[derive(Debug)]
pub struct Accounts {
    entries: Mutex<HashMap<ConnectionId, Entry>>,
    /// One load at a time per connection: whoever comes while it runs waits for its result.
    gates: Mutex<HashMap<ConnectionId, Weak<tokio::sync::Mutex<()>>>>,
    builds: std::sync::atomic::AtomicU64,
    budget: usize,
    puts: std::sync::atomic::AtomicU64,
    rows: Mutex<HashMap<ConnectionId, (Instant, Connection)>>,
    row_ttl: Duration,
    options: LoadOptions,
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts::with_row_ttl(ROW_TTL)
    }
}

/// How long a connection's row read for one request serves the next ones: a sync finished or a
/// connection deactivated by another process shows within this time. A tenth of a second adds
/// little to the time a sync's end takes to show (the update of the changed customers is most of
/// it), while a burst of requests (a dashboard's page asks several routes at once) shares one
/// read.
pub const ROW_TTL: Duration = Duration::from_millis(100);

impl Accounts {
    /// Accounts whose connection rows are re-read after `ttl` (zero: on every request).
    pub fn with_row_ttl(ttl: Duration) -> Self {
        Accounts {
            entries: Mutex::default(),
            gates: Mutex::default(),
            builds: std::sync::atomic::AtomicU64::new(0),
            budget: DEFAULT_BUDGET_BYTES,
            puts: std::sync::atomic::AtomicU64::new(0),
            rows: Mutex::default(),
            row_ttl: ttl,
            options: LoadOptions::default(),
        }
    }

    /// The account of the user's `connection` as of its row's `last_synced_at`: the one kept
    /// at that stamp, else loaded once (single flight: whoever asks while it loads waits for
    /// it and takes it) from the derivation in `store`, updated from the account kept at an
    /// older stamp when there is one, and kept. Reported in `currency` (the connection's, else
    /// USD) and known up to the sync (else the newest object).
    ///
    /// An account rebuilt from the whole cache is answered before it is stored as the
    /// connection's derivation: a task stores it afterwards, holding the connection's gate, so
    /// the next load of that connection (a later sync's update) waits for it and finds it.
    /// [`Accounts::settled`] waits for it.
    ///
    /// The load runs in a task of its own: a caller that gives up (a request whose client went
    /// away) does not stop a load that others wait for, nor throw away its work.
    ///
    /// # Errors
    /// [`CachedRebuildError`]: the store failed, or a cached object cannot be read.
    pub async fn load<S>(
        self: &Arc<Self>,
        store: &Arc<S>,
        user: UserId,
        connection: &Connection,
    ) -> Result<Arc<Loaded>, CachedRebuildError>
    where
        S: ObjectCache + DerivedStore + ?Sized + Send + Sync + 'static,
    {
        if let Some(loaded) = self.get(user, connection.id, connection.last_synced_at) {
            return Ok(loaded);
        }
        let (this, store, connection) = (Arc::clone(self), Arc::clone(store), connection.clone());
        let loading = tokio::spawn(async move { this.load_once(&store, user, &connection).await });
        match loading.await {
            Ok(loaded) => loaded,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(CachedRebuildError::Cancelled),
        }
    }

    /// [`Accounts::load`] in its task: under the connection's gate.
    async fn load_once<S>(
        &self,
        store: &Arc<S>,
        user: UserId,
        connection: &Connection,
    ) -> Result<Arc<Loaded>, CachedRebuildError>
    where
        S: ObjectCache + DerivedStore + ?Sized + Send + Sync + 'static,
    {
        let stamp = connection.last_synced_at;
        let loading = self.gate(connection.id).lock_owned().await;
        if let Some(loaded) = self.get(user, connection.id, stamp) {
            return Ok(loaded);
        }
        // The account kept at an older stamp is the base of an update: taken out, so that
        // when no request or job still holds it, the update patches it in place instead of
        // copying it (with its compiled form dropped first).
        let previous = self
            .take_previous(user, connection.id)
            .map(|(p, synced_at)| Held {
                account: match Arc::try_unwrap(p) {
                    Ok(loaded) => loaded.account,
                    Err(shared) => Arc::clone(&shared.account),
                },
                synced_at,
            });
        let started = Instant::now();
        let options = LoadOptions {
            defer_derivation: true,
            ..self.options
        };
        let mut loaded =
            load_account_with(store.as_ref(), user, connection, previous, &options).await?;
        tracing::info!(
            connection = %connection.id,
            source = ?loaded.source,
            ms = started.elapsed().as_millis() as u64,
            "account loaded"
        );
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let currency = connection.reporting_currency();
        let as_of = stamp.or(loaded.as_of);
        let unwritten = loaded.unwritten.take();
        let account = Arc::new(loaded.account);
        let compiling = Arc::clone(&account);
        let compiled =
            tokio::task::spawn_blocking(move || Loaded::compile(compiling, currency, None))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let loaded = Arc::new(compiled.with_as_of(as_of));
        self.put(user, connection.id, stamp, loaded.clone());
        if let Some(unwritten) = unwritten {
            let (store, id) = (Arc::clone(store), connection.id);
            tokio::spawn(async move {
                // The tasks waiting for this load (the answer) run first.
                tokio::task::yield_now().await;
                let started = Instant::now();
                let written = unwritten.write(store.as_ref(), &account).await;
                // The account first: a load waiting at the gate may then patch it in place.
                drop(account);
                drop(loading);
                match written {
                    Ok(published) => tracing::info!(
                        connection = %id,
                        ms = started.elapsed().as_millis() as u64,
                        published,
                        "derivation stored"
                    ),
                    // This process keeps serving the account; the next load that finds no
                    // current derivation (after the next sync) rebuilds everything again.
                    Err(e) => tracing::warn!(
                        connection = %id,
                        error = &e as &dyn std::error::Error,
                        "derivation not stored"
                    ),
                }
            });
        }
        Ok(loaded)
    }

    /// Waits until no load of `connection` is in flight, nor the storing of a derivation one
    /// rebuilt (see [`Accounts::load`]).
    pub async fn settled(&self, connection: ConnectionId) {
        drop(self.gate(connection).lock().await);
    }

    /// The user's connection: as read less than the row TTL ago, else read from `store` (and
    /// kept). `None` for another user's connection exactly as for one that does not exist.
    ///
    /// # Errors
    /// The store's.
    pub async fn connection<S: ConnectionStore + ?Sized>(
        &self,
        store: &S,
        user: UserId,
        connection: ConnectionId,
    ) -> Result<Option<Connection>, StoreError> {
        if let Some(c) = self.recent_row(user, connection) {
            return Ok(Some(c));
        }
        let row = store.connection(user, connection).await?;
        if let Some(c) = &row {
            self.keep_row(c);
        }
        Ok(row)
    }

    /// The user's connection as read less than the row TTL ago.
    pub fn recent_row(&self, user: UserId, connection: ConnectionId) -> Option<Connection> {
        if self.row_ttl.is_zero() {
            return None;
        }
        let rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        rows.get(&connection)
            .filter(|(at, c)| c.user == user && at.elapsed() < self.row_ttl)
            .map(|(_, c)| c.clone())
    }

    /// Keeps a connection's row just read.
    pub fn keep_row(&self, connection: &Connection) {
        if self.row_ttl.is_zero() {
            return;
        }
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        if rows.len() >= 10_000 {
            rows.retain(|_, (at, _)| at.elapsed() < self.row_ttl);
        }
        rows.insert(connection.id, (Instant::now(), connection.clone()));
    }

    /// The account built at `stamp` for the user's connection, or at a later sync (a caller
    /// whose connection row was read before a sync ended is served the newer account), if this
    /// process has it.
    pub fn get(
        &self,
        user: UserId,
        connection: ConnectionId,
        stamp: Option<DateTime<Utc>>,
    ) -> Option<Arc<Loaded>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&connection)
            .filter(|e| e.user == user && (e.pinned || e.stamp >= stamp))
            .map(|e| e.loaded.clone())
    }

    /// The account this process holds for the user's connection and the sync it was built
    /// at, no longer kept: the base a derivation's update patches. Should the update fail, the
    /// next load reads the derivation back instead of patching.
    fn take_previous(
        &self,
        user: UserId,
        connection: ConnectionId,
    ) -> Option<(Arc<Loaded>, Option<DateTime<Utc>>)> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if !entries
            .get(&connection)
            .is_some_and(|e| e.user == user && !e.pinned)
        {
            return None;
        }
        entries.remove(&connection).map(|e| (e.loaded, e.stamp))
    }

    /// Keeps the account built at `stamp`, replacing an older one.
    pub fn put(
        &self,
        user: UserId,
        connection: ConnectionId,
        stamp: Option<DateTime<Utc>>,
        loaded: Arc<Loaded>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.get(&connection).is_some_and(|e| e.pinned) {
            return;
        }
        entries.remove(&connection);
        let bytes = loaded.heap_bytes();
        if bytes > self.budget {
            // Larger than the whole budget: served to this request, never kept.
            return;
        }
        // Bounded memory: the oldest accounts go first (the pinned demo account stays); a dropped
        // account is rebuilt on its next request.
        let mut held: usize = entries
            .values()
            .filter(|e| !e.pinned)
            .map(|e| e.bytes)
            .sum();
        while held + bytes > self.budget || entries.len() >= MAX_ACCOUNTS {
            let Some((&oldest, e)) = entries
                .iter()
                .filter(|(_, e)| !e.pinned)
                .min_by_key(|(_, e)| e.order)
            else {
                break;
            };
            held -= e.bytes;
            entries.remove(&oldest);
        }
        let order = self.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        entries.insert(
            connection,
            Entry {
                user,
                stamp,
                pinned: false,
                loaded,
                bytes,
                order,
            },
        );
    }

    /// The same cache bounded to `bytes` of accounts (see [`DEFAULT_BUDGET_BYTES`]).
    #[must_use]
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.budget = bytes;
        self
    }

    /// Loads with `options` (how an update reads back and how many customers it rebuilds at
    /// most; a full rebuild is always stored after answering).
    #[must_use]
    pub fn with_load_options(mut self, options: LoadOptions) -> Self {
        self.options = options;
        self
    }

    /// The bytes of the accounts kept now (the pinned demo account included).
    pub fn held_bytes(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.values().map(|e| e.bytes).sum()
    }

    /// How many accounts this process loaded (each under its gate).
    pub fn builds(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The connection's load gate: a load holds it, so requests and jobs that need the same
    /// account while it is built wait for that one build (single flight) instead of each
    /// building their own.
    fn gate(&self, connection: ConnectionId) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(gate) = gates.get(&connection).and_then(Weak::upgrade) {
            return gate;
        }
        // Gates nobody holds are dropped, so the map stays as small as the loads in flight.
        gates.retain(|_, g| g.strong_count() > 0);
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        gates.insert(connection, Arc::downgrade(&gate));
        gate
    }

    /// Serves `loaded` for the connection whatever its sync stamp: the demo's account, which no
    /// sync rebuilds.
    pub fn pin(&self, user: UserId, connection: ConnectionId, loaded: Arc<Loaded>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.insert(
            connection,
            Entry {
                user,
                stamp: None,
                pinned: true,
                bytes: loaded.heap_bytes(),
                loaded,
                order: 0,
            },
        );
    }
}

/// A process's kept accounts as the source of its in-process jobs' accounts: a job and a request
/// that need the same account share one load.
pub struct SharedAccounts {
    accounts: Arc<Accounts>,
    store: Arc<dyn Store>,
}

impl SharedAccounts {
    /// The accounts `accounts` keeps, loaded from `store`.
    pub fn new(accounts: Arc<Accounts>, store: Arc<dyn Store>) -> Self {
        SharedAccounts { accounts, store }
    }
}

#[async_trait::async_trait]
impl AccountSource for SharedAccounts {
    async fn account(&self, connection: &Connection) -> Result<Arc<Account>, JobError> {
        let loaded = self
            .accounts
            .load(&self.store, connection.user, connection)
            .await
            .map_err(|e| JobError::Account(Box::new(e)))?;
        // The job's row is fresh (its sync just recorded its finish): requests use it at once
        // instead of the row they keep for the row TTL.
        self.accounts.keep_row(connection);
        Ok(loaded.account.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn loaded() -> Arc<Loaded> {
        Arc::new(Loaded::new(Account::default(), Currency::USD, None))
    }

    fn ids() -> (UserId, ConnectionId) {
        (UserId(Uuid::new_v4()), ConnectionId(Uuid::new_v4()))
    }

    #[test]
    fn an_account_serves_its_owner_at_its_stamp_and_earlier_ones_only() {
        let accounts = Accounts::default();
        let (user, conn) = ids();
        let at = DateTime::from_timestamp(1_700_000_000, 0);
        let a = loaded();
        accounts.put(user, conn, at, a.clone());
        assert!(
            accounts
                .get(user, conn, at)
                .is_some_and(|l| Arc::ptr_eq(&l, &a))
        );
        assert!(
            accounts
                .get(user, conn, at.map(|t| t + chrono::TimeDelta::seconds(1)))
                .is_none(),
            "a later sync"
        );
        // A caller whose row was read before that sync ended is served the newer account.
        assert!(accounts.get(user, conn, None).is_some(), "an earlier sync");
        assert!(
            accounts
                .get(user, conn, at.map(|t| t - chrono::TimeDelta::seconds(1)))
                .is_some(),
            "an earlier sync"
        );
        assert!(
            accounts.get(UserId(Uuid::new_v4()), conn, at).is_none(),
            "another user"
        );
    }

    #[test]
    fn the_pinned_demo_account_outlives_stamps_and_the_bound() {
        let accounts = Accounts::default();
        let (user, demo) = ids();
        let pinned = loaded();
        accounts.pin(user, demo, pinned.clone());
        accounts.put(user, demo, None, loaded());
        assert!(
            accounts
                .get(user, demo, DateTime::from_timestamp(5, 0))
                .is_some_and(|l| Arc::ptr_eq(&l, &pinned))
        );
        let (other, first) = ids();
        accounts.put(other, first, None, loaded());
        for _ in 0..MAX_ACCOUNTS {
            let (u, c) = ids();
            accounts.put(u, c, None, loaded());
        }
        let kept = accounts
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert!(kept <= MAX_ACCOUNTS, "bounded: {kept}");
        assert!(accounts.get(other, first, None).is_none(), "evicted");
        assert!(accounts.get(user, demo, None).is_some(), "the demo stays");
    }

    fn sized(customers: usize) -> Arc<Loaded> {
        let mut account = Account::default();
        for i in 0..customers {
            account.customers.push(revpilot_core::model::Customer {
                id: format!("cus_{i:08}"),
                created: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
                country: None,
                metadata: revpilot_core::model::Metadata::new(),
            });
        }
        Arc::new(Loaded::new(account, Currency::USD, None))
    }

    #[test]
    fn the_accounts_kept_stay_within_the_byte_budget_oldest_out_first() {
        let one = sized(1_000).heap_bytes();
        let accounts = Accounts::default().with_budget(one * 3);
        let kept: Vec<_> = (0..5)
            .map(|_| {
                let (u, c) = ids();
                accounts.put(u, c, None, sized(1_000));
                (u, c)
            })
            .collect();
        assert!(
            accounts.held_bytes() <= one * 3,
            "{}",
            accounts.held_bytes()
        );
        let present: Vec<bool> = kept
            .iter()
            .map(|(u, c)| accounts.get(*u, *c, None).is_some())
            .collect();
        assert_eq!(
            present,
            [false, false, true, true, true],
            "the oldest went first"
        );
        // An account larger than the whole budget is served, never kept.
        let (u, c) = ids();
        accounts.put(u, c, None, sized(4_000));
        assert!(accounts.get(u, c, None).is_none());
        assert!(accounts.held_bytes() <= one * 3);
    }

    #[test]
    fn a_series_is_computed_once_per_range() {
        let l = loaded();
        let d = |day| NaiveDate::from_ymd_opt(2026, 1, day).unwrap_or_default();
        let a = l.series(d(1), d(10), Granularity::Day);
        let b = l.series(d(1), d(10), Granularity::Day);
        assert!(matches!((a, b), (Ok(a), Ok(b)) if Arc::ptr_eq(&a, &b)));
        let mut made = 0;
        for _ in 0..3 {
            let body = l.series_body(d(1), d(10), Granularity::Day, |r| {
                made += 1;
                r.rows.len().to_string().into_bytes()
            });
            assert_eq!(body.ok().as_deref(), Some(&b"10"[..]));
        }
        assert_eq!(made, 1);
    }
}
