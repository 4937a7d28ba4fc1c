//! The storage ports: what RevPilot needs from a database, as object-safe async traits.
//!
//! Each method is a contract; the adapters in `revpilot-store` (SQLite, PostgreSQL) and the
//! in-memory implementation behind the `testing` feature all pass the same conformance suite.
//! Application state holds `Arc<dyn UsageStore>` and friends.
//!
//! Tenant isolation is in the signatures: every read of a connection's data takes the owner's
//! [`UserId`], and a connection of another user reads exactly like one that does not exist.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::metrics::SeriesRow;

/// What a store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record a write needs does not exist (or belongs to another user).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The write would take something that belongs to another user.
    #[error("{0} is already connected to another user")]
    Conflict(String),
    /// Recording would pass the meter's limit for the period.
    #[error("the {meter} limit of {limit} for this period is reached ({used} used)")]
    LimitExceeded {
        /// The meter.
        meter: Meter,
        /// The limit.
        limit: u64,
        /// What was used before this attempt.
        used: u64,
    },
    /// A stored secret could not be decrypted: wrong or missing key, or altered ciphertext.
    #[error("stored secret cannot be decrypted: {0}")]
    Crypto(String),
    /// The input cannot be stored as given.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The database failed; the message is for logs, never for HTTP responses. The driver's
    /// error is kept as the source.
    #[error("database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// `Result` with a [`StoreError`].
pub type StoreResult<T> = Result<T, StoreError>;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A RevPilot user (the embedding product's account).
    UserId
);
id_type!(
    /// A connected Stripe account.
    ConnectionId
);

/// The plan tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Free, hard-limited.
    Starter,
    /// $29.
    Professional,
    /// $99.
    Business,
    /// $299.
    Enterprise,
}

impl Tier {
    /// The snake_case name stored in databases.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Starter => "starter",
            Tier::Professional => "professional",
            Tier::Business => "business",
            Tier::Enterprise => "enterprise",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Tier> {
        [
            Tier::Starter,
            Tier::Professional,
            Tier::Business,
            Tier::Enterprise,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// Monthly limits; `None` is unlimited (never a magic number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// What-if scenarios.
    pub scenarios: Option<u32>,
    /// AI insights.
    pub ai_insights: Option<u32>,
    /// Transactions synced.
    pub transaction_volume: Option<u64>,
}

/// A user's profile: tier, Stripe billing ids and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProfile {
    /// The user.
    pub user_id: UserId,
    /// Email, when known.
    pub email: Option<String>,
    /// Current tier.
    pub tier: Tier,
    /// Stripe subscription status of the user's own plan, when subscribed.
    pub subscription_status: Option<String>,
    /// The user's Stripe customer (on the embedding company's own Stripe account).
    pub stripe_customer_id: Option<String>,
    /// The user's Stripe subscription.
    pub stripe_subscription_id: Option<String>,
    /// Start of the current billing period, when subscribed.
    pub current_period_start: Option<DateTime<Utc>>,
    /// End of the current billing period, when subscribed.
    pub current_period_end: Option<DateTime<Utc>>,
    /// The tier's limits.
    pub limits: Limits,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// A change of plan to apply to a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanChange {
    /// New tier.
    pub tier: Tier,
    /// New status.
    pub subscription_status: Option<String>,
    /// Stripe customer id (kept when `None`).
    pub stripe_customer_id: Option<String>,
    /// Stripe subscription id.
    pub stripe_subscription_id: Option<String>,
    /// Period start.
    pub current_period_start: Option<DateTime<Utc>>,
    /// Period end.
    pub current_period_end: Option<DateTime<Utc>>,
    /// The new tier's limits.
    pub limits: Limits,
}

/// Users and their profiles.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// Creates the profile of a new user on `tier` with `limits`, at `now`.
    ///
    /// # Errors
    /// MUST return [`StoreError::Conflict`] when the user exists or the email is taken.
    async fn create_user(
        &self,
        user: UserId,
        email: Option<&str>,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile>;

    /// The user's profile, `None` when there is none.
    async fn user(&self, user: UserId) -> StoreResult<Option<UserProfile>>;

    /// The user with this email (case-insensitive), if any.
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserProfile>>;

    /// The user whose Stripe customer this is, if any.
    async fn user_by_stripe_customer(&self, customer: &str) -> StoreResult<Option<UserProfile>>;

    /// The user whose Stripe subscription this is, if any.
    async fn user_by_stripe_subscription(
        &self,
        subscription: &str,
    ) -> StoreResult<Option<UserProfile>>;

    /// Applies a plan change at `now` and returns the new profile. A `None` customer id keeps
    /// the stored one.
    ///
    /// # Errors
    /// MUST return [`StoreError::NotFound`] for an unknown user.
    async fn set_plan(
        &self,
        user: UserId,
        change: &PlanChange,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile>;

    /// Sets the user's Stripe customer unless one is set already, and returns the profile: its
    /// `stripe_customer_id` is the one to use (the existing one when two requests raced).
    ///
    /// # Errors
    /// MUST return [`StoreError::NotFound`] for an unknown user and [`StoreError::Conflict`] when
    /// the customer belongs to another user.
    async fn set_stripe_customer(
        &self,
        user: UserId,
        customer: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile>;

    /// Every user with a Stripe customer (the only users an invoice can reach), in user id order:
    /// what end-of-period overage invoicing walks.
    async fn billable_users(&self) -> StoreResult<Vec<UserProfile>>;
}

/// A usage meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Meter {
    /// One per generated insight.
    AiInsight,
    /// One per synced charge.
    TransactionVolume,
    /// One per what-if scenario run (always hard-limited: scenarios have no overage).
    Scenario,
}

impl Meter {
    /// The stored `event_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::AiInsight => "ai_insight",
            Meter::TransactionVolume => "transaction_volume",
            Meter::Scenario => "scenario",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Meter> {
        [Meter::AiInsight, Meter::TransactionVolume, Meter::Scenario]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

impl fmt::Display for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A usage period, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Period {
    /// First instant.
    pub start: DateTime<Utc>,
    /// First instant after.
    pub end: DateTime<Utc>,
}

/// One unit (or several) of usage to record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Whose usage.
    pub user: UserId,
    /// Which meter.
    pub meter: Meter,
    /// The connection it concerns, if any.
    pub connection: Option<ConnectionId>,
    /// How many units.
    pub amount: u64,
    /// Unique per user, forever: the insight id, the Stripe charge id.
    pub idempotency_key: String,
    /// Free-form context.
    pub metadata: serde_json::Value,
    /// When it happened (decides the period).
    pub at: DateTime<Utc>,
}

/// The outcome of recording usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now.
    New,
    /// A record with this key exists (reserved or committed); nothing changed.
    Duplicate,
}

/// What [`UsageStore::record_all`] writes for a batch, decided from what is stored: the same
/// outcome as recording each in order ([`plan_usage`]).
#[derive(Debug)]
pub struct UsagePlan<'a> {
    /// Each record's outcome, up to the refused one.
    pub outcomes: Vec<Recorded>,
    /// The records to insert, in order.
    pub new: Vec<&'a UsageRecord>,
    /// The units to add to each meter's counter.
    pub added: Vec<(Meter, u64)>,
    /// The first record the limit refuses: it and the ones after it are not written.
    pub refused: Option<StoreError>,
}

/// Plans a batch of usage records as [`UsageStore::record`] would record them one by one: a key
/// already `stored` (or earlier in the batch) is a duplicate; a new record counts against
/// `limit` with the meter's `used` units (committed and reserved) and the batch's earlier ones,
/// and the first that would pass it stops the batch.
pub fn plan_usage<'a>(
    records: &'a [UsageRecord],
    stored: &std::collections::HashSet<String>,
    used: &[(Meter, u64)],
    limit: Option<u64>,
) -> UsagePlan<'a> {
    let mut seen = std::collections::HashSet::new();
    let mut plan = UsagePlan {
        outcomes: Vec::with_capacity(records.len()),
        new: Vec::new(),
        added: Vec::new(),
        refused: None,
    };
    for record in records {
        let key = record.idempotency_key.as_str();
        if stored.contains(key) || !seen.insert(key) {
            plan.outcomes.push(Recorded::Duplicate);
            continue;
        }
        let units = |of: &[(Meter, u64)]| {
            of.iter()
                .find(|(m, _)| *m == record.meter)
                .map_or(0, |(_, u)| *u)
        };
        if let Some(limit) = limit {
            let now = units(used).saturating_add(units(&plan.added));
            if now.saturating_add(record.amount) > limit {
                plan.refused = Some(StoreError::LimitExceeded {
                    meter: record.meter,
                    limit,
                    used: now,
                });
                break;
            }
        }
        match plan.added.iter_mut().find(|(m, _)| *m == record.meter) {
            Some((_, added)) => *added = added.saturating_add(record.amount),
            None if record.amount > 0 => plan.added.push((record.meter, record.amount)),
            None => {}
        }
        plan.new.push(record);
        plan.outcomes.push(Recorded::New);
    }
    plan
}

/// [`UsageStore::record_all`] one record at a time: what a store without a batched write does,
/// and what the SQL stores do with records of several users.
///
/// # Errors
/// The first record's error.
pub async fn record_each<S: UsageStore + ?Sized>(
    store: &S,
    records: &[UsageRecord],
    period: Period,
    limit: Option<u64>,
) -> StoreResult<Vec<Recorded>> {
    let mut done = Vec::with_capacity(records.len());
    for record in records {
        done.push(store.record(record, period, limit).await?);
    }
    Ok(done)
}

/// Usage events, counted exactly once and recorded against limits atomically.
#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Records `record` as committed usage unless its key exists, in one atomic step that checks
    /// the meter's usage in `period` (committed and reserved) against `limit`.
    ///
    /// # Errors
    /// MUST return [`StoreError::LimitExceeded`], writing nothing, when `limit` is `Some` and the
    /// usage plus `record.amount` would pass it. Concurrent calls MUST NOT together pass it.
    async fn record(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded>;

    /// Records each of `records` in order, as [`UsageStore::record`] would, until the first
    /// error: the records before it stay recorded, it and the ones after it are not.
    /// A store records them in one transaction (a sync records a page of charges at once).
    ///
    /// # Errors
    /// The first record's error, as [`UsageStore::record`] returns it.
    async fn record_all(
        &self,
        records: &[UsageRecord],
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Vec<Recorded>> {
        record_each(self, records, period, limit).await
    }

    /// As [`UsageStore::record`], but the units are only reserved: they count against the limit
    /// until [`UsageStore::commit`] or [`UsageStore::release`].
    async fn reserve(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded>;

    /// Turns a reservation into committed usage.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no reservation with this key.
    async fn commit(&self, user: UserId, idempotency_key: &str) -> StoreResult<()>;

    /// Drops a reservation (the work it paid for failed); committed usage is never released.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no reservation with this key.
    async fn release(&self, user: UserId, idempotency_key: &str) -> StoreResult<()>;

    /// Committed units of `meter` in `period`.
    async fn used(&self, user: UserId, meter: Meter, period: Period) -> StoreResult<u64>;
}

/// A verified webhook event for the inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEvent {
    /// Stripe's event id (`evt_...`), unique.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// Stripe's `created`.
    pub created: DateTime<Utc>,
    /// Live or test mode.
    pub livemode: bool,
    /// The verified body, exactly as received.
    pub payload: String,
    /// When it was received.
    pub received_at: DateTime<Utc>,
}

/// An inbox entry waiting to be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEvent {
    /// The event.
    pub event: InboxEvent,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
}

/// Whether an inbox insert was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Stored now.
    New,
    /// An event with this id was already stored; nothing changed.
    Duplicate,
}

/// The webhook inbox: durable first, processed after, never lost.
#[async_trait]
pub trait WebhookInbox: Send + Sync {
    /// Stores a verified event.
    async fn insert(&self, event: &InboxEvent) -> StoreResult<Inserted>;

    /// Up to `limit` unprocessed events with fewer than `max_attempts` failures, oldest
    /// `created` first.
    async fn pending(&self, limit: usize, max_attempts: u32) -> StoreResult<Vec<PendingEvent>>;

    /// Marks an event processed at `now`.
    async fn mark_processed(&self, event_id: &str, now: DateTime<Utc>) -> StoreResult<()>;

    /// Records a failed attempt; the event stays pending.
    async fn mark_failed(&self, event_id: &str, error: &str) -> StoreResult<()>;
}

/// Kinds of cached Stripe objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// `customer`.
    Customer,
    /// `subscription`.
    Subscription,
    /// `invoice`.
    Invoice,
    /// `charge`.
    Charge,
    /// `price`.
    Price,
    /// `product`.
    Product,
    /// `coupon`.
    Coupon,
    /// `dispute`: a charge's dispute, for cash (lost ones take money back).
    Dispute,
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 8] = [
        ObjectKind::Customer,
        ObjectKind::Subscription,
        ObjectKind::Invoice,
        ObjectKind::Charge,
        ObjectKind::Price,
        ObjectKind::Product,
        ObjectKind::Coupon,
        ObjectKind::Dispute,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Customer => "customer",
            ObjectKind::Subscription => "subscription",
            ObjectKind::Invoice => "invoice",
            ObjectKind::Charge => "charge",
            ObjectKind::Price => "price",
            ObjectKind::Product => "product",
            ObjectKind::Coupon => "coupon",
            ObjectKind::Dispute => "dispute",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<ObjectKind> {
        ObjectKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A cached Stripe object: the raw JSON and the version it was seen at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedObject {
    /// Kind.
    pub kind: ObjectKind,
    /// Stripe id.
    pub stripe_id: String,
    /// The version: the event's `created`, or when it was fetched. An older version never
    /// overwrites a newer one.
    pub version: DateTime<Utc>,
    /// The object as Stripe sent it.
    pub data: String,
    /// The customer the object belongs to, when it has one: a customer's own id; a
    /// subscription's, invoice's or charge's `customer`. The cache indexes it, so that one
    /// customer's objects can be read without the rest.
    #[serde(default)]
    pub customer: Option<String>,
}

/// What a bulk upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpsertStats {
    /// New objects.
    pub inserted: usize,
    /// Objects replaced by a newer version with different data.
    pub updated: usize,
    /// Same or older version, or identical data: nothing written.
    pub skipped: usize,
}

/// Cached Stripe objects of connections.
#[async_trait]
pub trait ObjectCache: Send + Sync {
    /// Upserts `objects` of a connection in one transaction. An object whose stored version is
    /// newer, or whose data is unchanged, is left alone (nothing written).
    async fn upsert_objects(
        &self,
        connection: ConnectionId,
        objects: &[CachedObject],
    ) -> StoreResult<UpsertStats>;

    /// The cached objects of `kind` of the user's connection, by Stripe id; empty for another
    /// user's connection.
    async fn objects(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
    ) -> StoreResult<Vec<CachedObject>>;

    /// At most `limit` cached objects of `kind` of the user's connection whose Stripe id sorts
    /// after `after` (from the first when `None`), by Stripe id: a rebuild reads a connection
    /// page by page, so no process ever holds every object of an account. Empty for another
    /// user's connection.
    async fn objects_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<CachedObject>>;

    /// At most `limit` cached objects of `kind` of the user's connection inserted or changed at
    /// or after `since` (the store's clock when it wrote them), by Stripe id after `after`:
    /// what a sync changed since a derivation read the cache. Empty for another user's
    /// connection.
    async fn objects_written_since(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        since: DateTime<Utc>,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<CachedObject>>;

    /// The cached objects of `kind` of the user's connection that belong to one of
    /// `customers` (`""` stands for objects of no customer), by Stripe id. Empty for another
    /// user's connection.
    async fn objects_of_customers(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        customers: &[String],
    ) -> StoreResult<Vec<CachedObject>>;

    /// The cached objects of `kind` of the user's connection with one of these Stripe ids, by
    /// Stripe id. Empty for another user's connection.
    async fn objects_by_ids(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        ids: &[String],
    ) -> StoreResult<Vec<CachedObject>>;
}

/// What a stored derivation of a connection's account was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerivedStamp {
    /// The generation its rows were written under: rows of other generations are never read.
    pub generation: Uuid,
    /// The rebuild's rules version when it was written: another version is rebuilt.
    pub version: u32,
    /// The connection's last sync at the time (`None`: never synced).
    pub synced_at: Option<DateTime<Utc>>,
    /// The newest instant the cached objects carried.
    pub as_of: Option<DateTime<Utc>>,
    /// When the derivation began reading the cache: objects written after it (less a margin
    /// for writes in flight) are what a later update rebuilds.
    pub cache_read_at: DateTime<Utc>,
}

/// One row of a derived account: the compact history of one customer (`key` is its id; `""`
/// holds what belongs to no customer), as the adapter that derived it serialised it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerivedRow {
    /// Customer id.
    pub key: String,
    /// The serialised history.
    pub data: String,
}

/// A connection's rebuilt account, kept by customer: derived from the object cache so that a
/// process loads the compact account instead of re-reading every cached Stripe object. A
/// derivation is written under a new generation and becomes visible only when published, so a
/// writer killed half-way leaves the previous one readable.
#[async_trait]
pub trait DerivedStore: Send + Sync {
    /// The published derivation's stamp, if any.
    async fn derived_stamp(&self, connection: ConnectionId) -> StoreResult<Option<DerivedStamp>>;

    /// Writes rows under `generation` (not yet visible); a row written again replaces itself.
    async fn write_derived(
        &self,
        connection: ConnectionId,
        generation: Uuid,
        rows: &[DerivedRow],
    ) -> StoreResult<()>;

    /// Makes `stamp`'s generation the published one, and deletes the rows of every other
    /// generation, in one transaction, only when `replacing` is the generation published now
    /// (`None`: only when none is). Returns whether it published: a writer whose generation was
    /// replaced meanwhile does not publish, since the replacing publish deleted its rows.
    async fn publish_derived(
        &self,
        connection: ConnectionId,
        stamp: &DerivedStamp,
        replacing: Option<Uuid>,
    ) -> StoreResult<bool>;

    /// At most `limit` rows of `generation` of the user's connection whose key sorts after
    /// `after`, by key; empty for another user's connection.
    async fn derived_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        generation: Uuid,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<DerivedRow>>;
}

/// Metric snapshots: one series row per connection and day.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Inserts or replaces the rows (by `date`) of a connection; returns how many were written.
    async fn upsert_snapshots(
        &self,
        connection: ConnectionId,
        rows: &[SeriesRow],
    ) -> StoreResult<usize>;

    /// Rows from `from` to `to` inclusive, oldest first; empty for another user's connection.
    async fn snapshots(
        &self,
        user: UserId,
        connection: ConnectionId,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<SeriesRow>>;
}

/// A connection's OAuth tokens, in clear (only ever held in memory).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Access token.
    pub access_token: SecretString,
    /// Refresh token, when Stripe gave one.
    pub refresh_token: Option<SecretString>,
}

/// A new or renewed connection.
#[derive(Debug, Clone)]
pub struct NewConnection {
    /// The owner.
    pub user: UserId,
    /// `acct_...`.
    pub stripe_account_id: String,
    /// Business name.
    pub business_name: Option<String>,
    /// Default currency.
    pub currency: Option<String>,
    /// Tokens, stored encrypted.
    pub tokens: Tokens,
}

/// A stored connection (never with its tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// Id.
    pub id: ConnectionId,
    /// Owner.
    pub user: UserId,
    /// `acct_...`.
    pub stripe_account_id: String,
    /// Business name.
    pub business_name: Option<String>,
    /// Default currency.
    pub currency: Option<String>,
    /// False once deauthorized.
    pub is_active: bool,
    /// Last successful sync.
    pub last_synced_at: Option<DateTime<Utc>>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

impl Connection {
    /// The currency its metrics are reported in: the account's default, else USD (a code the
    /// account has none of, or one that is not a currency code, reports in USD too).
    pub fn reporting_currency(&self) -> crate::Currency {
        self.currency
            .as_deref()
            .and_then(|c| crate::Currency::parse(c).ok())
            .unwrap_or(crate::Currency::USD)
    }
}

/// Stripe connections, with their tokens stored encrypted.
#[async_trait]
pub trait ConnectionStore: Send + Sync {
    /// Stores a connection, or renews the user's existing connection of the same account
    /// (new tokens, active again).
    ///
    /// # Errors
    /// MUST return [`StoreError::Conflict`], writing nothing, when the account is connected to
    /// another user.
    async fn save_connection(
        &self,
        connection: NewConnection,
        now: DateTime<Utc>,
    ) -> StoreResult<Connection>;

    /// The user's connection; `None` for another user's.
    async fn connection(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Connection>>;

    /// The user's connections.
    async fn connections(&self, user: UserId) -> StoreResult<Vec<Connection>>;

    /// Every active connection (for the sync cron).
    async fn active_connections(&self) -> StoreResult<Vec<Connection>>;

    /// The decrypted tokens of the user's active connection; `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Crypto`] when the stored ciphertext cannot be decrypted.
    async fn tokens(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Tokens>>;

    /// Deauthorization: marks the account's connection inactive and erases its tokens. Returns
    /// the connection, `None` when the account is unknown.
    async fn deactivate(
        &self,
        stripe_account_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Connection>>;

    /// Records a successful sync.
    async fn set_last_synced(&self, id: ConnectionId, at: DateTime<Utc>) -> StoreResult<()>;
}

/// Short-lived, single-use OAuth `state` values.
#[async_trait]
pub trait OAuthStateStore: Send + Sync {
    /// Stores `state` for `user` until `expires_at`.
    async fn put_state(
        &self,
        state: &str,
        user: UserId,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// `user` presents `state`: returns the state's user when it exists and has not expired at
    /// `now`. When that user is `user`, the state is consumed: it can never be taken again (even
    /// concurrently). Presented by another user, it is left for its own (a wrong user cannot
    /// spoil another's connection). Expired states are deleted.
    async fn take_state(
        &self,
        state: &str,
        user: UserId,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<UserId>>;
}

/// A sync run's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    /// In progress.
    Running,
    /// Finished with everything fetched.
    Succeeded,
    /// Stopped by an error (see `error`).
    Failed,
    /// Stopped by a hard usage limit until the next period or an upgrade.
    Paused,
}

impl SyncStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Running => "running",
            SyncStatus::Succeeded => "succeeded",
            SyncStatus::Failed => "failed",
            SyncStatus::Paused => "paused",
        }
    }

    /// Checks that a run can end with this status.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for [`SyncStatus::Running`], which is not how a run ends.
    pub fn ensure_final(self) -> StoreResult<()> {
        if self == SyncStatus::Running {
            return Err(StoreError::Invalid(
                "a finished run cannot be running".into(),
            ));
        }
        Ok(())
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<SyncStatus> {
        [
            SyncStatus::Running,
            SyncStatus::Succeeded,
            SyncStatus::Failed,
            SyncStatus::Paused,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// How a sync run ended.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunOutcome {
    /// Objects fetched per stream (`customer`, `subscription`, ..., `event`).
    pub objects: std::collections::BTreeMap<String, u64>,
    /// Requests sent.
    pub requests: u64,
    /// Of which retries.
    pub retries: u64,
    /// Why it failed or paused.
    pub error: Option<String>,
}

/// A recorded sync run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRun {
    /// Run id.
    pub id: Uuid,
    /// The connection synced.
    pub connection: ConnectionId,
    /// Started.
    pub started_at: DateTime<Utc>,
    /// Finished, unless running.
    pub finished_at: Option<DateTime<Utc>>,
    /// Status.
    pub status: SyncStatus,
    /// Counts and error.
    pub outcome: RunOutcome,
}

/// Sync cursors (one per connection and stream, persisted after every page) and run records.
#[async_trait]
pub trait SyncStateStore: Send + Sync {
    /// The stream's cursor, `None` before its first page.
    async fn cursor(&self, connection: ConnectionId, stream: &str) -> StoreResult<Option<String>>;

    /// Saves the stream's cursor.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown connection.
    async fn set_cursor(
        &self,
        connection: ConnectionId,
        stream: &str,
        cursor: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Forgets every cursor of the connection (a full backfill follows).
    async fn clear_cursors(&self, connection: ConnectionId) -> StoreResult<()>;

    /// Records the start of a run and returns its id.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown connection.
    async fn start_run(&self, connection: ConnectionId, now: DateTime<Utc>) -> StoreResult<Uuid>;

    /// Records how a running run ended.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when no running run has this id; [`StoreError::Invalid`] for
    /// `Running` as a final status.
    async fn finish_run(
        &self,
        run: Uuid,
        status: SyncStatus,
        outcome: &RunOutcome,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// The user's connection's latest run; `None` for another user's connection.
    async fn last_run(
        &self,
        user: UserId,
        connection: ConnectionId,
    ) -> StoreResult<Option<SyncRun>>;
}

/// The user's own subscription (to the embedding company's plans), as last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSubscription {
    /// Stripe subscription id.
    pub stripe_subscription_id: String,
    /// Stripe customer id.
    pub stripe_customer_id: Option<String>,
    /// Tier it maps to.
    pub tier: Tier,
    /// Stripe status.
    pub status: Option<String>,
    /// The price that decided the tier.
    pub price_id: Option<String>,
    /// End of the current period.
    pub current_period_end: Option<DateTime<Utc>>,
}

/// A billing event as recorded for a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionEvent {
    /// Stripe's event id, when it came from a webhook.
    pub stripe_event_id: Option<String>,
    /// Event type (`customer.subscription.updated`, ...).
    pub event_type: String,
    /// Tier after the event.
    pub tier: Tier,
    /// Status after the event.
    pub status: Option<String>,
    /// What the operator should know (an unknown price mapped to starter, ...).
    pub note: Option<String>,
    /// Stripe's `created` of the event: the order events are applied in.
    pub created: DateTime<Utc>,
}

/// Whether a plan event changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Profile, subscription and event log updated together.
    Applied,
    /// A newer event was already applied for this user; nothing changed.
    Stale,
    /// This Stripe event was already applied; nothing changed.
    Duplicate,
}

/// The billing state of users: their subscription and the events applied to it.
#[async_trait]
pub trait BillingStore: Send + Sync {
    /// In one transaction: unless an event newer than `event.created` was already applied for
    /// `user` ([`Applied::Stale`]) or this `stripe_event_id` was applied before
    /// ([`Applied::Duplicate`]), applies `change` to the profile, upserts the user's subscription, and appends
    /// `event` to the log.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown user.
    async fn apply_plan_event(
        &self,
        user: UserId,
        change: &PlanChange,
        subscription: &UserSubscription,
        event: &SubscriptionEvent,
        now: DateTime<Utc>,
    ) -> StoreResult<Applied>;

    /// The user's subscription as last applied.
    async fn user_subscription(&self, user: UserId) -> StoreResult<Option<UserSubscription>>;

    /// The user's applied events, in order of `created`.
    async fn subscription_events(&self, user: UserId) -> StoreResult<Vec<SubscriptionEvent>>;

    /// The `created` of the user's last applied event (what a new event is ordered against on
    /// every webhook). The default reads every event; stores answer from an index.
    async fn last_subscription_event(&self, user: UserId) -> StoreResult<Option<DateTime<Utc>>> {
        Ok(self
            .subscription_events(user)
            .await?
            .iter()
            .map(|e| e.created)
            .max())
    }
}

/// A stored insight: the narrative and the computed figures it cites, so a dashboard can show
/// why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InsightRecord {
    /// Id.
    pub id: Uuid,
    /// The generation it came from (one request makes one insight per kind).
    pub generation: Uuid,
    /// Whose.
    pub user: UserId,
    /// The connection analysed.
    pub connection: Option<ConnectionId>,
    /// Its kind.
    pub kind: crate::insights::InsightKind,
    /// Title.
    pub title: String,
    /// The narrative.
    pub summary: String,
    /// The figures it cites, with their values when generated.
    pub figures: Vec<crate::insights::Figure>,
    /// Which provider wrote it (`local`, or the model's name).
    pub provider: String,
    /// Why the local narrative stood in, when it did.
    pub note: Option<String>,
    /// Generated.
    pub created_at: DateTime<Utc>,
}

/// Generated insights.
#[async_trait]
pub trait InsightStore: Send + Sync {
    /// Stores the records (one generation) in one transaction.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown user or connection.
    async fn save_insights(&self, records: &[InsightRecord]) -> StoreResult<()>;

    /// The user's newest records (of `connection` when given), newest first, at most `limit`;
    /// empty for another user's connection.
    async fn insights(
        &self,
        user: UserId,
        connection: Option<ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<InsightRecord>>;
}

/// Built-in accounts: a password hash per user (the server hashes; the store never sees a
/// password).
#[async_trait]
pub trait CredentialStore: Send + Sync {
    /// Creates the profile of a new user with `email` and their password hash, in one
    /// transaction.
    ///
    /// # Errors
    /// MUST return [`StoreError::Conflict`], writing nothing, when the user exists or the email
    /// is taken (case-insensitively).
    #[allow(clippy::too_many_arguments)]
    async fn create_account(
        &self,
        user: UserId,
        email: &str,
        password_hash: &str,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile>;

    /// The user with this email (case-insensitive) and their password hash; `None` when there is
    /// no such user or they have no password (a user of an external identity provider).
    async fn credentials(&self, email: &str) -> StoreResult<Option<(UserId, String)>>;

    /// Ends the session `session` (an opaque id of at most [`SESSION_ID_MAX`] bytes the server
    /// derives from its token) until `expires`, when its token would have expired anyway. Every
    /// process sharing the store refuses it from then on. Ending one twice is not an error.
    ///
    /// Ended sessions whose `expires` is before `now` are forgotten, so the list holds only
    /// sessions that could still be presented.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for an empty id or one longer than [`SESSION_ID_MAX`].
    async fn end_session(
        &self,
        session: &str,
        expires: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Whether `session` was ended (by any process sharing the store).
    async fn session_ended(&self, session: &str) -> StoreResult<bool>;
}

/// The longest session id [`CredentialStore::end_session`] takes.
pub const SESSION_ID_MAX: usize = 128;

/// Refuses a session id [`CredentialStore::end_session`] must not store.
///
/// # Errors
/// [`StoreError::Invalid`] naming the problem.
pub fn check_session_id(session: &str) -> StoreResult<()> {
    if session.is_empty() || session.len() > SESSION_ID_MAX {
        return Err(StoreError::Invalid(format!(
            "a session id is 1 to {SESSION_ID_MAX} bytes, not {}",
            session.len()
        )));
    }
    Ok(())
}

/// Leases: a named claim one holder keeps until a deadline, so that two workers (processes or
/// machines sharing a database) never run the same work at once, and work whose holder died is
/// free again once its lease runs out.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes the lease `key` for `holder` until `until`, or extends it when `holder` holds it
    /// already. `true` when `holder` holds it now; `false` while another holder's lease is live
    /// (its deadline is after `now`).
    ///
    /// Atomic: of concurrent calls for one free key, exactly one holder gets it.
    async fn acquire_lease(
        &self,
        key: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Gives the lease up if `holder` holds it (another holder's lease is left alone).
    async fn release_lease(&self, key: &str, holder: &str) -> StoreResult<()>;
}

/// Every storage port, as one object: `Arc<dyn Store>` holds any store that implements them
/// all (`revpilot_store`'s SQLite or PostgreSQL store, the `testing` feature's `MemoryStore`), which
/// is what a server or a worker passes around.
pub trait Store:
    UserStore
    + UsageStore
    + WebhookInbox
    + BillingStore
    + ConnectionStore
    + ObjectCache
    + DerivedStore
    + SyncStateStore
    + SnapshotStore
    + InsightStore
    + CredentialStore
    + OAuthStateStore
    + LeaseStore
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: UserStore
        + UsageStore
        + WebhookInbox
        + BillingStore
        + ConnectionStore
        + ObjectCache
        + DerivedStore
        + SyncStateStore
        + SnapshotStore
        + InsightStore
        + CredentialStore
        + OAuthStateStore
        + LeaseStore
        + Send
        + Sync
        + 'static
{
}

/// The clock use cases read (injectable for tests).
pub type Clock = std::sync::Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;
