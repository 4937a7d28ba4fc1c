//! In-memory implementations of every storage port, for unit tests of the layers above and as the
//! reference the database adapters are checked against (feature `testing`).
//!
//! One [`MemoryStore`] implements every port; each method takes one lock, so each call is atomic
//! exactly as the database implementations' transactions are.

pub mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::metrics::SeriesRow;
use crate::ports::{
    Applied, BillingStore, RunOutcome, SubscriptionEvent, SyncRun, SyncStateStore, SyncStatus,
    UserSubscription,
};
use crate::ports::{
    CachedObject, Connection, ConnectionId, ConnectionStore, InboxEvent, Inserted, Limits, Meter,
    NewConnection, OAuthStateStore, ObjectCache, ObjectKind, PendingEvent, Period, PlanChange,
    Recorded, SnapshotStore, StoreError, StoreResult, Tier, Tokens, UpsertStats, UsageRecord,
    UsageStore, UserId, UserProfile, UserStore, WebhookInbox,
};

#[derive(Clone)]
struct Usage {
    record: UsageRecord,
    committed: bool,
}

#[derive(Clone)]
struct StoredConnection {
    connection: Connection,
    tokens: Option<(String, Option<String>)>,
}

#[derive(Default)]
struct State {
    users: BTreeMap<UserId, UserProfile>,
    usage: HashMap<(UserId, String), Usage>,
    inbox: BTreeMap<String, PendingEvent>,
    processed: BTreeMap<String, DateTime<Utc>>,
    objects: BTreeMap<(ConnectionId, ObjectKind, String), CachedObject>,
    /// When each cached object was last inserted or changed.
    written: HashMap<(ConnectionId, ObjectKind, String), DateTime<Utc>>,
    snapshots: BTreeMap<(ConnectionId, NaiveDate), SeriesRow>,
    derived: BTreeMap<(ConnectionId, Uuid, String), String>,
    derived_stamps: BTreeMap<ConnectionId, crate::ports::DerivedStamp>,
    connections: BTreeMap<ConnectionId, StoredConnection>,
    states: HashMap<String, (UserId, DateTime<Utc>)>,
    cursors: BTreeMap<(ConnectionId, String), String>,
    runs: BTreeMap<Uuid, SyncRun>,
    subscriptions: BTreeMap<UserId, (UserSubscription, DateTime<Utc>)>,
    events: Vec<(UserId, SubscriptionEvent)>,
    insights: Vec<crate::ports::InsightRecord>,
    passwords: BTreeMap<UserId, String>,
    ended_sessions: BTreeMap<String, DateTime<Utc>>,
    leases: HashMap<String, (String, DateTime<Utc>)>,
}

impl MemoryStore {
    /// A store holding one user (starter tier, no limits) with a connection of
    /// `stripe_account_id`, the setup of most sync tests and benchmarks.
    ///
    /// # Panics
    /// Never for a fresh store; it is a test helper.
    pub async fn with_connection(
        stripe_account_id: &str,
        now: DateTime<Utc>,
    ) -> (Self, UserId, ConnectionId) {
        let store = MemoryStore::new();
        let user = UserId(Uuid::new_v4());
        let created = store
            .create_user(user, None, Tier::Starter, Limits::default(), now)
            .await;
        let connection = store
            .save_connection(
                NewConnection {
                    user,
                    stripe_account_id: stripe_account_id.to_owned(),
                    business_name: None,
                    currency: None,
                    tokens: Tokens {
                        access_token: SecretString::from("sk_test_token"),
                        refresh_token: None,
                    },
                },
                now,
            )
            .await;
        match (created, connection) {
            (Ok(_), Ok(c)) => (store, user, c.id),
            (a, b) => unreachable!("a fresh store takes a user and a connection: {a:?} {b:?}"),
        }
    }
}

/// Every port, in memory.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> StoreResult<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| StoreError::Backend("in-memory store poisoned by a panic".into()))
    }
}

impl State {
    fn owns(&self, user: UserId, connection: ConnectionId) -> bool {
        self.connections
            .get(&connection)
            .is_some_and(|c| c.connection.user == user)
    }

    fn used(&self, user: UserId, meter: Meter, period: Period, include_reserved: bool) -> u64 {
        self.usage
            .iter()
            .filter(|((u, _), e)| {
                *u == user
                    && e.record.meter == meter
                    && e.record.at >= period.start
                    && e.record.at < period.end
                    && (include_reserved || e.committed)
            })
            .map(|(_, e)| e.record.amount)
            .sum()
    }

    fn add_usage(
        &mut self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
        committed: bool,
    ) -> StoreResult<Recorded> {
        let key = (record.user, record.idempotency_key.clone());
        if self.usage.contains_key(&key) {
            return Ok(Recorded::Duplicate);
        }
        if let Some(limit) = limit {
            let used = self.used(record.user, record.meter, period, true);
            if used.saturating_add(record.amount) > limit {
                return Err(StoreError::LimitExceeded {
                    meter: record.meter,
                    limit,
                    used,
                });
            }
        }
        self.usage.insert(
            key,
            Usage {
                record: record.clone(),
                committed,
            },
        );
        Ok(Recorded::New)
    }
}

#[async_trait]
impl UserStore for MemoryStore {
    async fn create_user(
        &self,
        user: UserId,
        email: Option<&str>,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let mut s = self.lock()?;
        if s.users.contains_key(&user) {
            return Err(StoreError::Conflict(format!("user {user}")));
        }
        if let Some(e) = email
            && s.users.values().any(|p| {
                p.email
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(e))
            })
        {
            return Err(StoreError::Conflict(format!("email {e}")));
        }
        let profile = UserProfile {
            user_id: user,
            email: email.map(str::to_owned),
            tier,
            subscription_status: None,
            stripe_customer_id: None,
            stripe_subscription_id: None,
            current_period_start: None,
            current_period_end: None,
            limits,
            created_at: now,
            updated_at: now,
        };
        s.users.insert(user, profile.clone());
        Ok(profile)
    }

    async fn user(&self, user: UserId) -> StoreResult<Option<UserProfile>> {
        Ok(self.lock()?.users.get(&user).cloned())
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserProfile>> {
        Ok(self
            .lock()?
            .users
            .values()
            .find(|p| {
                p.email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(email))
            })
            .cloned())
    }

    async fn user_by_stripe_customer(&self, customer: &str) -> StoreResult<Option<UserProfile>> {
        Ok(self
            .lock()?
            .users
            .values()
            .find(|p| p.stripe_customer_id.as_deref() == Some(customer))
            .cloned())
    }

    async fn user_by_stripe_subscription(
        &self,
        subscription: &str,
    ) -> StoreResult<Option<UserProfile>> {
        Ok(self
            .lock()?
            .users
            .values()
            .find(|p| p.stripe_subscription_id.as_deref() == Some(subscription))
            .cloned())
    }

    async fn set_plan(
        &self,
        user: UserId,
        change: &PlanChange,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        self.lock()?.set_plan(user, change, now)
    }

    async fn set_stripe_customer(
        &self,
        user: UserId,
        customer: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let mut s = self.lock()?;
        if s.users
            .values()
            .any(|p| p.user_id != user && p.stripe_customer_id.as_deref() == Some(customer))
        {
            return Err(StoreError::Conflict(format!("Stripe customer {customer}")));
        }
        let p = s.users.get_mut(&user).ok_or(StoreError::NotFound("user"))?;
        if p.stripe_customer_id.is_none() {
            p.stripe_customer_id = Some(customer.to_owned());
            p.updated_at = now;
        }
        Ok(p.clone())
    }

    async fn billable_users(&self) -> StoreResult<Vec<UserProfile>> {
        Ok(self
            .lock()?
            .users
            .values()
            .filter(|p| p.stripe_customer_id.is_some())
            .cloned()
            .collect())
    }
}

#[async_trait]
impl crate::ports::LeaseStore for MemoryStore {
    async fn acquire_lease(
        &self,
        key: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut s = self.lock()?;
        match s.leases.get(key) {
            Some((h, deadline)) if h != holder && *deadline > now => Ok(false),
            _ => {
                s.leases.insert(key.to_owned(), (holder.to_owned(), until));
                Ok(true)
            }
        }
    }

    async fn release_lease(&self, key: &str, holder: &str) -> StoreResult<()> {
        let mut s = self.lock()?;
        if s.leases.get(key).is_some_and(|(h, _)| h == holder) {
            s.leases.remove(key);
        }
        Ok(())
    }
}

impl State {
    fn set_plan(
        &mut self,
        user: UserId,
        change: &PlanChange,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let p = self
            .users
            .get_mut(&user)
            .ok_or(StoreError::NotFound("user"))?;
        p.tier = change.tier;
        p.subscription_status
            .clone_from(&change.subscription_status);
        if change.stripe_customer_id.is_some() {
            p.stripe_customer_id.clone_from(&change.stripe_customer_id);
        }
        p.stripe_subscription_id
            .clone_from(&change.stripe_subscription_id);
        p.current_period_start = change.current_period_start;
        p.current_period_end = change.current_period_end;
        p.limits = change.limits;
        p.updated_at = now;
        Ok(p.clone())
    }
}

#[async_trait]
impl UsageStore for MemoryStore {
    async fn record(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded> {
        self.lock()?.add_usage(record, period, limit, true)
    }

    async fn reserve(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded> {
        self.lock()?.add_usage(record, period, limit, false)
    }

    async fn commit(&self, user: UserId, idempotency_key: &str) -> StoreResult<()> {
        let mut s = self.lock()?;
        match s.usage.get_mut(&(user, idempotency_key.to_owned())) {
            Some(e) if !e.committed => {
                e.committed = true;
                Ok(())
            }
            _ => Err(StoreError::NotFound("usage reservation")),
        }
    }

    async fn release(&self, user: UserId, idempotency_key: &str) -> StoreResult<()> {
        let mut s = self.lock()?;
        let key = (user, idempotency_key.to_owned());
        match s.usage.get(&key) {
            Some(e) if !e.committed => {
                s.usage.remove(&key);
                Ok(())
            }
            _ => Err(StoreError::NotFound("usage reservation")),
        }
    }

    async fn used(&self, user: UserId, meter: Meter, period: Period) -> StoreResult<u64> {
        Ok(self.lock()?.used(user, meter, period, false))
    }
}

#[async_trait]
impl WebhookInbox for MemoryStore {
    async fn insert(&self, event: &InboxEvent) -> StoreResult<Inserted> {
        let mut s = self.lock()?;
        if s.inbox.contains_key(&event.event_id) || s.processed.contains_key(&event.event_id) {
            return Ok(Inserted::Duplicate);
        }
        s.inbox.insert(
            event.event_id.clone(),
            PendingEvent {
                event: event.clone(),
                attempts: 0,
                last_error: None,
            },
        );
        Ok(Inserted::New)
    }

    async fn pending(&self, limit: usize, max_attempts: u32) -> StoreResult<Vec<PendingEvent>> {
        let s = self.lock()?;
        let mut out: Vec<PendingEvent> = s
            .inbox
            .values()
            .filter(|p| p.attempts < max_attempts)
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            (a.event.created, &a.event.event_id).cmp(&(b.event.created, &b.event.event_id))
        });
        out.truncate(limit);
        Ok(out)
    }

    async fn mark_processed(&self, event_id: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut s = self.lock()?;
        s.inbox
            .remove(event_id)
            .ok_or(StoreError::NotFound("webhook event"))?;
        s.processed.insert(event_id.to_owned(), now);
        Ok(())
    }

    async fn mark_failed(&self, event_id: &str, error: &str) -> StoreResult<()> {
        let mut s = self.lock()?;
        let p = s
            .inbox
            .get_mut(event_id)
            .ok_or(StoreError::NotFound("webhook event"))?;
        p.attempts += 1;
        p.last_error = Some(error.to_owned());
        Ok(())
    }
}

#[async_trait]
impl ObjectCache for MemoryStore {
    async fn upsert_objects(
        &self,
        connection: ConnectionId,
        objects: &[CachedObject],
    ) -> StoreResult<UpsertStats> {
        let mut s = self.lock()?;
        if !s.connections.contains_key(&connection) {
            return Err(StoreError::NotFound("connection"));
        }
        let mut stats = UpsertStats::default();
        for o in objects {
            let key = (connection, o.kind, o.stripe_id.clone());
            match s.objects.get(&key) {
                None => {
                    s.written.insert(key.clone(), Utc::now());
                    s.objects.insert(key, o.clone());
                    stats.inserted += 1;
                }
                Some(old) if o.version > old.version && o.data != old.data => {
                    s.written.insert(key.clone(), Utc::now());
                    s.objects.insert(key, o.clone());
                    stats.updated += 1;
                }
                Some(_) => stats.skipped += 1,
            }
        }
        Ok(stats)
    }

    async fn objects(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
    ) -> StoreResult<Vec<CachedObject>> {
        let s = self.lock()?;
        if !s.owns(user, connection) {
            return Ok(Vec::new());
        }
        Ok(s.objects
            .iter()
            .filter(|((c, k, _), _)| *c == connection && *k == kind)
            .map(|(_, o)| o.clone())
            .collect())
    }

    async fn objects_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<CachedObject>> {
        use std::ops::Bound;
        let s = self.lock()?;
        if !s.owns(user, connection) {
            return Ok(Vec::new());
        }
        let from = match after {
            Some(id) => Bound::Excluded((connection, kind, id.to_owned())),
            None => Bound::Included((connection, kind, String::new())),
        };
        Ok(s.objects
            .range((from, Bound::Unbounded))
            .take_while(|((c, k, _), _)| *c == connection && *k == kind)
            .take(limit)
            .map(|(_, o)| o.clone())
            .collect())
    }

    async fn objects_written_since(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        since: DateTime<Utc>,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<CachedObject>> {
        let s = self.lock()?;
        if !s.owns(user, connection) {
            return Ok(Vec::new());
        }
        Ok(s.objects
            .iter()
            .filter(|((c, k, id), _)| {
                *c == connection && *k == kind && after.is_none_or(|a| id.as_str() > a)
            })
            .filter(|(key, _)| s.written.get(*key).is_some_and(|w| *w >= since))
            .take(limit)
            .map(|(_, o)| o.clone())
            .collect())
    }

    async fn objects_of_customers(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        customers: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        let s = self.lock()?;
        if !s.owns(user, connection) {
            return Ok(Vec::new());
        }
        Ok(s.objects
            .iter()
            .filter(|((c, k, _), o)| {
                *c == connection
                    && *k == kind
                    && customers
                        .iter()
                        .any(|x| *x == o.customer.as_deref().unwrap_or(""))
            })
            .map(|(_, o)| o.clone())
            .collect())
    }

    async fn objects_by_ids(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        ids: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        let s = self.lock()?;
        if !s.owns(user, connection) {
            return Ok(Vec::new());
        }
        let mut ids: Vec<&String> = ids.iter().collect();
        ids.sort();
        ids.dedup();
        Ok(ids
            .into_iter()
            .filter_map(|id| s.objects.get(&(connection, kind, id.clone())).cloned())
            .collect())
    }
}

#[async_trait]
impl crate::ports::DerivedStore for MemoryStore {
    async fn derived_stamp(
        &self,
        connection: ConnectionId,
    ) -> StoreResult<Option<crate::ports::DerivedStamp>> {
        Ok(self.lock()?.derived_stamps.get(&connection).cloned())
    }

    async fn write_derived(
        &self,
        connection: ConnectionId,
        generation: Uuid,
        rows: &[crate::ports::DerivedRow],
    ) -> StoreResult<()> {
        let mut s = self.lock()?;
        if !s.connections.contains_key(&connection) {
            return Err(StoreError::NotFound("connection"));
        }
        for r in rows {
            s.derived
                .insert((connection, generation, r.key.clone()), r.data.clone());
        }
        Ok(())
    }

    async fn publish_derived(
        &self,
        connection: ConnectionId,
        stamp: &crate::ports::DerivedStamp,
        replacing: Option<Uuid>,
    ) -> StoreResult<bool> {
        let mut s = self.lock()?;
        if !s.connections.contains_key(&connection) {
            return Err(StoreError::NotFound("connection"));
        }
        if s.derived_stamps.get(&connection).map(|x| x.generation) != replacing {
            return Ok(false);
        }
        s.derived
            .retain(|(c, g, _), _| *c != connection || *g == stamp.generation);
        s.derived_stamps.insert(connection, stamp.clone());
        Ok(true)
    }

    async fn derived_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        generation: Uuid,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<crate::ports::DerivedRow>> {
        use std::ops::Bound;
        let s = self.lock()?;
        if !s.owns(user, connection) {
            return Ok(Vec::new());
        }
        let from = match after {
            Some(k) => Bound::Excluded((connection, generation, k.to_owned())),
            None => Bound::Included((connection, generation, String::new())),
        };
        Ok(s.derived
            .range((from, Bound::Unbounded))
            .take_while(|((c, g, _), _)| *c == connection && *g == generation)
            .take(limit)
            .map(|((_, _, key), data)| crate::ports::DerivedRow {
                key: key.clone(),
                data: data.clone(),
            })
            .collect())
    }
}

#[async_trait]
impl SnapshotStore for MemoryStore {
    async fn upsert_snapshots(
        &self,
        connection: ConnectionId,
        rows: &[SeriesRow],
    ) -> StoreResult<usize> {
        let mut s = self.lock()?;
        if !s.connections.contains_key(&connection) {
            return Err(StoreError::NotFound("connection"));
        }
        for r in rows {
            s.snapshots.insert((connection, r.date), r.clone());
        }
        Ok(rows.len())
    }

    async fn snapshots(
        &self,
        user: UserId,
        connection: ConnectionId,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<SeriesRow>> {
        let s = self.lock()?;
        if !s.owns(user, connection) || from > to {
            return Ok(Vec::new());
        }
        Ok(s.snapshots
            .range((connection, from)..=(connection, to))
            .map(|(_, r)| r.clone())
            .collect())
    }
}

fn expose(t: &Tokens) -> (String, Option<String>) {
    (
        t.access_token.expose_secret().to_owned(),
        t.refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_owned()),
    )
}

#[async_trait]
impl ConnectionStore for MemoryStore {
    async fn save_connection(
        &self,
        new: NewConnection,
        now: DateTime<Utc>,
    ) -> StoreResult<Connection> {
        let mut s = self.lock()?;
        let existing = s
            .connections
            .values_mut()
            .find(|c| c.connection.stripe_account_id == new.stripe_account_id);
        match existing {
            Some(c) if c.connection.user != new.user => Err(StoreError::Conflict(format!(
                "Stripe account {}",
                new.stripe_account_id
            ))),
            Some(c) => {
                c.connection.business_name = new.business_name;
                c.connection.currency = new.currency;
                c.connection.is_active = true;
                c.connection.updated_at = now;
                c.tokens = Some(expose(&new.tokens));
                Ok(c.connection.clone())
            }
            None => {
                let connection = Connection {
                    id: ConnectionId(Uuid::new_v4()),
                    user: new.user,
                    stripe_account_id: new.stripe_account_id,
                    business_name: new.business_name,
                    currency: new.currency,
                    is_active: true,
                    last_synced_at: None,
                    created_at: now,
                    updated_at: now,
                };
                s.connections.insert(
                    connection.id,
                    StoredConnection {
                        connection: connection.clone(),
                        tokens: Some(expose(&new.tokens)),
                    },
                );
                Ok(connection)
            }
        }
    }

    async fn connection(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Connection>> {
        let s = self.lock()?;
        Ok(s.connections
            .get(&id)
            .filter(|c| c.connection.user == user)
            .map(|c| c.connection.clone()))
    }

    async fn connections(&self, user: UserId) -> StoreResult<Vec<Connection>> {
        let s = self.lock()?;
        let mut out: Vec<Connection> = s
            .connections
            .values()
            .filter(|c| c.connection.user == user)
            .map(|c| c.connection.clone())
            .collect();
        out.sort_by_key(|c| c.created_at);
        Ok(out)
    }

    async fn active_connections(&self) -> StoreResult<Vec<Connection>> {
        let s = self.lock()?;
        Ok(s.connections
            .values()
            .filter(|c| c.connection.is_active)
            .map(|c| c.connection.clone())
            .collect())
    }

    async fn tokens(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Tokens>> {
        let s = self.lock()?;
        Ok(s.connections
            .get(&id)
            .filter(|c| c.connection.user == user && c.connection.is_active)
            .and_then(|c| c.tokens.clone())
            .map(|(a, r)| Tokens {
                access_token: SecretString::from(a),
                refresh_token: r.map(SecretString::from),
            }))
    }

    async fn deactivate(
        &self,
        stripe_account_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Connection>> {
        let mut s = self.lock()?;
        Ok(s.connections
            .values_mut()
            .find(|c| c.connection.stripe_account_id == stripe_account_id)
            .map(|c| {
                c.connection.is_active = false;
                c.connection.updated_at = now;
                c.tokens = None;
                c.connection.clone()
            }))
    }

    async fn set_last_synced(&self, id: ConnectionId, at: DateTime<Utc>) -> StoreResult<()> {
        let mut s = self.lock()?;
        let c = s
            .connections
            .get_mut(&id)
            .ok_or(StoreError::NotFound("connection"))?;
        c.connection.last_synced_at = Some(at);
        Ok(())
    }
}

#[async_trait]
impl OAuthStateStore for MemoryStore {
    async fn put_state(
        &self,
        state: &str,
        user: UserId,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut s = self.lock()?;
        let now = Utc::now();
        s.states.retain(|_, (_, expires)| *expires > now);
        if s.states.contains_key(state) {
            return Err(StoreError::Conflict("OAuth state".into()));
        }
        s.states.insert(state.to_owned(), (user, expires_at));
        Ok(())
    }

    async fn take_state(
        &self,
        state: &str,
        user: UserId,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<UserId>> {
        let mut s = self.lock()?;
        s.states.retain(|_, (_, e)| now < *e);
        match s.states.get(state) {
            Some((owner, _)) if *owner == user => {
                s.states.remove(state);
                Ok(Some(user))
            }
            Some((owner, _)) => Ok(Some(*owner)),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl SyncStateStore for MemoryStore {
    async fn cursor(&self, connection: ConnectionId, stream: &str) -> StoreResult<Option<String>> {
        Ok(self
            .lock()?
            .cursors
            .get(&(connection, stream.to_owned()))
            .cloned())
    }

    async fn set_cursor(
        &self,
        connection: ConnectionId,
        stream: &str,
        cursor: &str,
        _now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut s = self.lock()?;
        if !s.connections.contains_key(&connection) {
            return Err(StoreError::NotFound("connection"));
        }
        s.cursors
            .insert((connection, stream.to_owned()), cursor.to_owned());
        Ok(())
    }

    async fn clear_cursors(&self, connection: ConnectionId) -> StoreResult<()> {
        self.lock()?.cursors.retain(|(c, _), _| *c != connection);
        Ok(())
    }

    async fn start_run(&self, connection: ConnectionId, now: DateTime<Utc>) -> StoreResult<Uuid> {
        let mut s = self.lock()?;
        if !s.connections.contains_key(&connection) {
            return Err(StoreError::NotFound("connection"));
        }
        let id = Uuid::new_v4();
        s.runs.insert(
            id,
            SyncRun {
                id,
                connection,
                started_at: now,
                finished_at: None,
                status: SyncStatus::Running,
                outcome: RunOutcome::default(),
            },
        );
        Ok(id)
    }

    async fn finish_run(
        &self,
        run: Uuid,
        status: SyncStatus,
        outcome: &RunOutcome,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        status.ensure_final()?;
        let mut s = self.lock()?;
        match s.runs.get_mut(&run) {
            Some(r) if r.status == SyncStatus::Running => {
                r.status = status;
                r.finished_at = Some(now);
                r.outcome = outcome.clone();
                Ok(())
            }
            _ => Err(StoreError::NotFound("running sync run")),
        }
    }

    async fn last_run(
        &self,
        user: UserId,
        connection: ConnectionId,
    ) -> StoreResult<Option<SyncRun>> {
        let s = self.lock()?;
        if !s.owns(user, connection) {
            return Ok(None);
        }
        Ok(s.runs
            .values()
            .filter(|r| r.connection == connection)
            .max_by_key(|r| (r.started_at, r.id))
            .cloned())
    }
}

#[async_trait]
impl BillingStore for MemoryStore {
    async fn apply_plan_event(
        &self,
        user: UserId,
        change: &PlanChange,
        subscription: &UserSubscription,
        event: &SubscriptionEvent,
        now: DateTime<Utc>,
    ) -> StoreResult<Applied> {
        let mut s = self.lock()?;
        if !s.users.contains_key(&user) {
            return Err(StoreError::NotFound("user"));
        }
        if s.subscriptions
            .get(&user)
            .is_some_and(|(_, last)| *last > event.created)
        {
            return Ok(Applied::Stale);
        }
        if let Some(id) = &event.stripe_event_id
            && s.events
                .iter()
                .any(|(_, e)| e.stripe_event_id.as_ref() == Some(id))
        {
            return Ok(Applied::Duplicate);
        }
        s.set_plan(user, change, now)?;
        s.subscriptions
            .insert(user, (subscription.clone(), event.created));
        s.events.push((user, event.clone()));
        Ok(Applied::Applied)
    }

    async fn user_subscription(&self, user: UserId) -> StoreResult<Option<UserSubscription>> {
        Ok(self
            .lock()?
            .subscriptions
            .get(&user)
            .map(|(sub, _)| sub.clone()))
    }

    async fn subscription_events(&self, user: UserId) -> StoreResult<Vec<SubscriptionEvent>> {
        let s = self.lock()?;
        let mut out: Vec<SubscriptionEvent> = s
            .events
            .iter()
            .filter(|(u, _)| *u == user)
            .map(|(_, e)| e.clone())
            .collect();
        out.sort_by_key(|e| e.created);
        Ok(out)
    }
}

#[async_trait]
impl crate::ports::InsightStore for MemoryStore {
    async fn save_insights(&self, records: &[crate::ports::InsightRecord]) -> StoreResult<()> {
        let mut s = self.lock()?;
        for r in records {
            if !s.users.contains_key(&r.user) {
                return Err(StoreError::NotFound("user"));
            }
            if let Some(c) = r.connection
                && !s.owns(r.user, c)
            {
                return Err(StoreError::NotFound("connection"));
            }
        }
        s.insights.extend(records.iter().cloned());
        Ok(())
    }

    async fn insights(
        &self,
        user: UserId,
        connection: Option<ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<crate::ports::InsightRecord>> {
        let s = self.lock()?;
        let mut out: Vec<crate::ports::InsightRecord> = s
            .insights
            .iter()
            .filter(|r| r.user == user && (connection.is_none() || r.connection == connection))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.kind.cmp(&b.kind)));
        out.truncate(limit);
        Ok(out)
    }
}

#[async_trait]
impl crate::ports::CredentialStore for MemoryStore {
    async fn create_account(
        &self,
        user: UserId,
        email: &str,
        password_hash: &str,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let profile = self
            .create_user(user, Some(email), tier, limits, now)
            .await?;
        self.lock()?
            .passwords
            .insert(user, password_hash.to_owned());
        Ok(profile)
    }

    async fn credentials(&self, email: &str) -> StoreResult<Option<(UserId, String)>> {
        let s = self.lock()?;
        Ok(s.users
            .values()
            .find(|p| {
                p.email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(email))
            })
            .and_then(|p| s.passwords.get(&p.user_id).map(|h| (p.user_id, h.clone()))))
    }

    async fn end_session(
        &self,
        session: &str,
        expires: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        crate::ports::check_session_id(session)?;
        let mut s = self.lock()?;
        s.ended_sessions.retain(|_, e| *e >= now);
        s.ended_sessions.insert(session.to_owned(), expires);
        Ok(())
    }

    async fn session_ended(&self, session: &str) -> StoreResult<bool> {
        Ok(self.lock()?.ended_sessions.contains_key(session))
    }
}
