//! Every storage port on SQLite.
//!
//! Writes that read before they write (usage against a limit, connection ownership, cache
//! versions) run in `BEGIN IMMEDIATE` transactions: SQLite takes its single write lock before the
//! read, so concurrent writers queue (up to the busy timeout) instead of deciding on stale data.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use revpilot_core::metrics::SeriesRow;
use revpilot_core::ports::{
    Applied, BillingStore, RunOutcome, SubscriptionEvent, SyncRun, SyncStateStore, SyncStatus,
    UserSubscription,
};
use revpilot_core::ports::{
    CachedObject, Connection, ConnectionId, ConnectionStore, InboxEvent, Inserted, Limits, Meter,
    NewConnection, OAuthStateStore, ObjectCache, ObjectKind, PendingEvent, Period, PlanChange,
    Recorded, SnapshotStore, StoreError, StoreResult, Tier, Tokens, UpsertStats, UsageRecord,
    UsageStore, UserId, UserProfile, UserStore, WebhookInbox,
};
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use crate::crypto::{KeyRing, Sealed};
use crate::{Error, redact};

/// The migrations, embedded from `migrations/sqlite/` (`NNNN_description.sql`): a database
/// created by an older version migrates forward on connect.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// RevPilot's storage on one SQLite database file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    keys: KeyRing,
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn is_unique(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

fn is_foreign_key(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_foreign_key_violation())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn instant(v: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| StoreError::Invalid(format!("stored instant {v} is out of range")))
}

fn opt_instant(v: Option<i64>) -> StoreResult<Option<DateTime<Utc>>> {
    v.map(instant).transpose()
}

fn decimal(s: &str) -> StoreResult<Decimal> {
    Decimal::from_str(s)
        .map_err(|_| StoreError::Invalid(format!("stored amount {s:?} is not a decimal")))
}

fn opt_decimal(s: Option<String>) -> StoreResult<Option<Decimal>> {
    s.as_deref().map(decimal).transpose()
}

fn uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| StoreError::Invalid(format!("stored id {s:?} is not a UUID")))
}

fn limit_to_db<T: Into<i64>>(v: Option<T>) -> Option<i64> {
    v.map(Into::into)
}

fn u32_limit(v: Option<i64>) -> StoreResult<Option<u32>> {
    v.map(|x| {
        u32::try_from(x)
            .map_err(|_| StoreError::Invalid(format!("stored limit {x} is out of range")))
    })
    .transpose()
}

/// Creates a new database file readable by its owner only (0600; SQLite gives its `-wal` and
/// `-shm` files the same mode): it holds encrypted Stripe tokens, password hashes and customers'
/// data. An existing file keeps its mode; an in-memory database has none, a read-only open
/// creates nothing, and a `file:` URI is left to SQLite.
fn create_private(options: &SqliteConnectOptions, url: &str) -> std::io::Result<()> {
    let path = options.get_filename();
    let name = path.to_string_lossy();
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let param = |p: &str| query.split('&').any(|kv| kv == p);
    let in_memory =
        name == ":memory:" || name.starts_with("file:sqlx-in-memory-") || param("mode=memory");
    let skip = name.is_empty() || name.starts_with("file:") || in_memory || param("mode=ro");
    if skip || path.exists() {
        return Ok(());
    }
    let mut new = std::fs::OpenOptions::new();
    new.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut new, 0o600);
    match new.open(path) {
        // Created meanwhile by another process: its mode stands.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map(drop),
    }
}

impl SqliteStore {
    /// Opens (creating if missing, readable by its owner only) the database at `url` (`sqlite://path`, `sqlite:path` or a
    /// plain path), runs the embedded migrations, and uses `keys` for the tokens it stores.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL this build cannot open; [`Error::Open`] when the file is
    /// not a database, is another application's database, or is newer than this version. Nothing
    /// is written in either case.
    pub async fn connect(url: &str, keys: KeyRing) -> Result<SqliteStore, Error> {
        let shown = redact(url);
        let options = if url.contains("://") || url.starts_with("sqlite:") {
            if !url.starts_with("sqlite:") {
                return Err(Error::InvalidUrl {
                    url: shown,
                    problem: "this store opens `sqlite:` URLs".into(),
                    source: None,
                });
            }
            SqliteConnectOptions::from_str(url).map_err(|e| Error::InvalidUrl {
                url: shown.clone(),
                problem: e.to_string(),
                source: Some(e),
            })?
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with synchronous=NORMAL survives a process crash (every committed transaction
            // is in the log); only an OS crash or power loss can lose the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // `problem` repeats the driver's message: the error is often shown without its sources.
        let open = |problem: String, source: Option<sqlx::Error>| Error::Open {
            url: shown.clone(),
            problem,
            source,
        };
        let failed = |e: sqlx::Error| open(e.to_string(), Some(e));
        create_private(&options, url)
            .map_err(|e| open(format!("cannot create the file: {e}"), Some(e.into())))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(failed)?;
        // A file that is not ours: tables of RevPilot's names but no migration history.
        let foreign: Option<(i64,)> = sqlx::query_as(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'user_profiles'
               AND NOT EXISTS (SELECT 1 FROM sqlite_master WHERE name = '_sqlx_migrations')",
        )
        .fetch_optional(&pool)
        .await
        .map_err(failed)?;
        if foreign.is_some_and(|(n,)| n > 0) {
            return Err(open("it has RevPilot's tables but no migration history: another application's database?".into(), None));
        }
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| open(format!("migrations failed: {e}"), Some(e.into())))?;
        Ok(SqliteStore { pool, keys })
    }

    /// The pool, for the tests and tools of this crate's users.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Re-encrypts every stored token with the current key (after adding a new key at the front of
    /// the ring). Returns how many connections were re-encrypted.
    ///
    /// # Errors
    /// [`StoreError::Crypto`] when a token cannot be decrypted with any configured key; nothing is
    /// changed then.
    pub async fn reencrypt_all(&self) -> StoreResult<usize> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let rows = sqlx::query(
            "SELECT id, user_id, access_token_enc, refresh_token_enc, token_key_id FROM stripe_connections
             WHERE access_token_enc IS NOT NULL AND token_key_id <> $1",
        )
        .bind(self.keys.current_id())
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        for row in &rows {
            let (id, user) = (
                row.try_get::<String, _>(0).map_err(backend)?,
                row.try_get::<String, _>(1).map_err(backend)?,
            );
            let tokens = self.open_tokens(row, &id, &user)?;
            let (access, refresh, key_id) = self.seal_tokens(&tokens, &id, &user)?;
            sqlx::query("UPDATE stripe_connections SET access_token_enc = $1, refresh_token_enc = $2, token_key_id = $3 WHERE id = $4")
                .bind(access)
                .bind(refresh)
                .bind(key_id)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(rows.len())
    }

    /// A write transaction on a connection's data, after checking the connection exists.
    async fn write_for_connection(
        &self,
        connection: ConnectionId,
    ) -> StoreResult<sqlx::Transaction<'static, Sqlite>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let known = sqlx::query("SELECT 1 FROM stripe_connections WHERE id = $1")
            .bind(connection.0.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        if known.is_none() {
            return Err(StoreError::NotFound("connection"));
        }
        Ok(tx)
    }

    fn context(id: &str, user: &str, field: &str) -> String {
        format!("revpilot/stripe_connections/{id}/{user}/{field}")
    }

    fn seal_tokens(
        &self,
        tokens: &Tokens,
        id: &str,
        user: &str,
    ) -> StoreResult<(String, Option<String>, String)> {
        let access = self
            .keys
            .seal(
                tokens.access_token.expose_secret(),
                &Self::context(id, user, "access"),
            )
            .map_err(StoreError::Crypto)?;
        let refresh = tokens
            .refresh_token
            .as_ref()
            .map(|r| {
                self.keys
                    .seal(r.expose_secret(), &Self::context(id, user, "refresh"))
            })
            .transpose()
            .map_err(StoreError::Crypto)?;
        Ok((access.data, refresh.map(|r| r.data), access.key_id))
    }

    /// Opens the tokens of a row `(id, user_id, access_token_enc, refresh_token_enc, token_key_id)`.
    fn open_tokens(&self, row: &SqliteRow, id: &str, user: &str) -> StoreResult<Tokens> {
        let key_id: String = row.try_get(4).map_err(backend)?;
        let open = |data: String, field: &str| -> StoreResult<SecretString> {
            self.keys
                .open(
                    &Sealed {
                        key_id: key_id.clone(),
                        data,
                    },
                    &Self::context(id, user, field),
                )
                .map(SecretString::from)
                .map_err(|e| StoreError::Crypto(format!("{field} token of connection {id}: {e}")))
        };
        let access: String = row.try_get(2).map_err(backend)?;
        let refresh: Option<String> = row.try_get(3).map_err(backend)?;
        Ok(Tokens {
            access_token: open(access, "access")?,
            refresh_token: refresh.map(|r| open(r, "refresh")).transpose()?,
        })
    }
}

const USER_COLUMNS: &str = "user_id, email, subscription_tier, subscription_status, stripe_customer_id, \
     stripe_subscription_id, subscription_current_period_end, monthly_scenario_limit, \
     monthly_ai_insights_limit, monthly_transaction_volume_limit, created_at, updated_at, \
     subscription_current_period_start";

fn user_row(row: &SqliteRow) -> StoreResult<UserProfile> {
    let get_s = |i: usize| row.try_get::<Option<String>, _>(i).map_err(backend);
    let get_i = |i: usize| row.try_get::<Option<i64>, _>(i).map_err(backend);
    let tier: String = row.try_get(2).map_err(backend)?;
    Ok(UserProfile {
        user_id: UserId(uuid(&row.try_get::<String, _>(0).map_err(backend)?)?),
        email: get_s(1)?,
        tier: Tier::parse(&tier)
            .ok_or_else(|| StoreError::Invalid(format!("stored tier {tier:?}")))?,
        subscription_status: get_s(3)?,
        stripe_customer_id: get_s(4)?,
        stripe_subscription_id: get_s(5)?,
        current_period_start: opt_instant(get_i(12)?)?,
        current_period_end: opt_instant(get_i(6)?)?,
        limits: Limits {
            scenarios: u32_limit(get_i(7)?)?,
            ai_insights: u32_limit(get_i(8)?)?,
            transaction_volume: get_i(9)?
                .map(|v| {
                    u64::try_from(v).map_err(|_| StoreError::Invalid(format!("stored limit {v}")))
                })
                .transpose()?,
        },
        created_at: instant(row.try_get(10).map_err(backend)?)?,
        updated_at: instant(row.try_get(11).map_err(backend)?)?,
    })
}

impl SqliteStore {
    async fn user_where(&self, condition: &str, value: &str) -> StoreResult<Option<UserProfile>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM user_profiles WHERE {condition} = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(value)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .as_ref()
            .map(user_row)
            .transpose()
    }
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_user(
        &self,
        user: UserId,
        email: Option<&str>,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        insert_user(&self.pool, user, email, tier, limits, now).await
    }

    async fn user(&self, user: UserId) -> StoreResult<Option<UserProfile>> {
        self.user_where("user_id", &user.0.to_string()).await
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserProfile>> {
        self.user_where("email", email).await
    }

    async fn user_by_stripe_customer(&self, customer: &str) -> StoreResult<Option<UserProfile>> {
        self.user_where("stripe_customer_id", customer).await
    }

    async fn user_by_stripe_subscription(
        &self,
        subscription: &str,
    ) -> StoreResult<Option<UserProfile>> {
        self.user_where("stripe_subscription_id", subscription)
            .await
    }

    async fn set_plan(
        &self,
        user: UserId,
        change: &PlanChange,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        update_plan(&self.pool, user, change, now).await
    }

    async fn set_stripe_customer(
        &self,
        user: UserId,
        customer: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let sql = format!(
            "UPDATE user_profiles SET stripe_customer_id = COALESCE(stripe_customer_id, $1),
               updated_at = CASE WHEN stripe_customer_id IS NULL THEN $2 ELSE updated_at END
             WHERE user_id = $3 RETURNING {USER_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(customer)
            .bind(micros(now))
            .bind(user.0.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| {
                if is_unique(&e) {
                    StoreError::Conflict(format!("Stripe customer {customer}"))
                } else {
                    backend(e)
                }
            })?;
        row.as_ref()
            .map(user_row)
            .transpose()?
            .ok_or(StoreError::NotFound("user"))
    }

    async fn billable_users(&self) -> StoreResult<Vec<UserProfile>> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM user_profiles WHERE stripe_customer_id IS NOT NULL ORDER BY user_id"
        );
        sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?
            .iter()
            .map(user_row)
            .collect()
    }
}

/// The profile INSERT of [`UserStore::create_user`], on any connection or transaction.
async fn insert_user<'e, E>(
    ex: E,
    user: UserId,
    email: Option<&str>,
    tier: Tier,
    limits: Limits,
    now: DateTime<Utc>,
) -> StoreResult<UserProfile>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let sql = format!(
        "INSERT INTO user_profiles (user_id, email, subscription_tier, monthly_scenario_limit,
           monthly_ai_insights_limit, monthly_transaction_volume_limit, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING {USER_COLUMNS}"
    );
    let volume = crate::volume_to_db(&limits)?;
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(user.0.to_string())
        .bind(email)
        .bind(tier.as_str())
        .bind(limit_to_db(limits.scenarios))
        .bind(limit_to_db(limits.ai_insights))
        .bind(volume)
        .bind(micros(now))
        .fetch_one(ex)
        .await
        .map_err(|e| {
            if is_unique(&e) {
                StoreError::Conflict(format!("user {user} or email"))
            } else {
                backend(e)
            }
        })?;
    user_row(&row)
}

/// The plan UPDATE of [`UserStore::set_plan`], on any connection or transaction.
async fn update_plan<'e, E>(
    ex: E,
    user: UserId,
    change: &PlanChange,
    now: DateTime<Utc>,
) -> StoreResult<UserProfile>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let sql = format!(
        "UPDATE user_profiles SET subscription_tier = $1, subscription_status = $2,
           stripe_customer_id = COALESCE($3, stripe_customer_id), stripe_subscription_id = $4,
           subscription_current_period_end = $5, monthly_scenario_limit = $6,
           monthly_ai_insights_limit = $7, monthly_transaction_volume_limit = $8, updated_at = $9,
           subscription_current_period_start = $11
         WHERE user_id = $10 RETURNING {USER_COLUMNS}"
    );
    let volume = crate::volume_to_db(&change.limits)?;
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(change.tier.as_str())
        .bind(change.subscription_status.as_deref())
        .bind(change.stripe_customer_id.as_deref())
        .bind(change.stripe_subscription_id.as_deref())
        .bind(change.current_period_end.map(micros))
        .bind(limit_to_db(change.limits.scenarios))
        .bind(limit_to_db(change.limits.ai_insights))
        .bind(volume)
        .bind(micros(now))
        .bind(user.0.to_string())
        .bind(change.current_period_start.map(micros))
        .fetch_optional(ex)
        .await
        .map_err(|e| {
            if is_unique(&e) {
                StoreError::Conflict("Stripe customer or subscription of another user".into())
            } else {
                backend(e)
            }
        })?;
    row.as_ref()
        .map(user_row)
        .transpose()?
        .ok_or(StoreError::NotFound("user"))
}

impl SqliteStore {
    async fn add_usage(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
        status: &str,
    ) -> StoreResult<Recorded> {
        let amount = i64::try_from(record.amount)
            .map_err(|_| StoreError::Invalid("usage amount too large".into()))?;
        let user = record.user.0.to_string();
        let (start, end) = (micros(period.start), micros(period.end));
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        // The unique (user, key) decides duplicates; a refused record rolls back with the tx.
        let inserted = sqlx::query(
            "INSERT INTO usage_events (id, user_id, event_type, stripe_connection_id, amount,
               idempotency_key, status, metadata, created_at, period_start, period_end)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (user_id, idempotency_key) DO NOTHING",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(&user)
        .bind(record.meter.as_str())
        .bind(record.connection.map(|c| c.0.to_string()))
        .bind(amount)
        .bind(&record.idempotency_key)
        .bind(status)
        .bind(record.metadata.to_string())
        .bind(micros(record.at))
        .bind(start)
        .bind(end)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_foreign_key(&e) {
                StoreError::NotFound("user or connection")
            } else {
                backend(e)
            }
        })?;
        if inserted.rows_affected() == 0 {
            return Ok(Recorded::Duplicate);
        }
        if let Some(limit) = limit {
            let used = counted(&mut tx, &user, record.meter, start, end).await?;
            if used.saturating_add(record.amount) > limit {
                return Err(StoreError::LimitExceeded {
                    meter: record.meter,
                    limit,
                    used,
                });
            }
        }
        add_to_counter(&mut tx, &user, record.meter, start, end, amount).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Recorded::New)
    }
}

/// The units of `meter` counted for the user in the period (committed and reserved).
async fn counted(
    tx: &mut sqlx::SqliteConnection,
    user: &str,
    meter: Meter,
    start: i64,
    end: i64,
) -> StoreResult<u64> {
    let used: Option<i64> = sqlx::query_scalar(
        "SELECT used FROM usage_counters
         WHERE user_id = $1 AND event_type = $2 AND period_start = $3 AND period_end = $4",
    )
    .bind(user)
    .bind(meter.as_str())
    .bind(start)
    .bind(end)
    .fetch_optional(&mut *tx)
    .await
    .map_err(backend)?;
    Ok(used.and_then(|u| u64::try_from(u).ok()).unwrap_or(0))
}

/// Adds `units` to the user's counter of `meter` in the period.
async fn add_to_counter(
    tx: &mut sqlx::SqliteConnection,
    user: &str,
    meter: Meter,
    start: i64,
    end: i64,
    units: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO usage_counters (user_id, event_type, period_start, period_end, used)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (user_id, event_type, period_start, period_end)
         DO UPDATE SET used = usage_counters.used + excluded.used",
    )
    .bind(user)
    .bind(meter.as_str())
    .bind(start)
    .bind(end)
    .bind(units)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl UsageStore for SqliteStore {
    async fn record(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded> {
        self.add_usage(record, period, limit, "committed").await
    }

    async fn record_all(
        &self,
        records: &[UsageRecord],
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Vec<Recorded>> {
        let Some(user) = records.first().map(|r| r.user) else {
            return Ok(Vec::new());
        };
        if records.iter().any(|r| r.user != user) {
            // Keys and counters are per user: several users' records go one by one.
            return revpilot_core::ports::record_each(self, records, period, limit).await;
        }
        for r in records {
            i64::try_from(r.amount)
                .map_err(|_| StoreError::Invalid("usage amount too large".into()))?;
        }
        let (start, end) = (micros(period.start), micros(period.end));
        let user_id = user.0.to_string();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        // One statement per batch of keys, one per meter, one insert: the whole page in a
        // few statements instead of three per record.
        let mut stored = std::collections::HashSet::new();
        for chunk in records.chunks(BATCH) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT idempotency_key FROM usage_events WHERE user_id = ");
            qb.push_bind(&user_id).push(" AND idempotency_key IN (");
            let mut keys = qb.separated(", ");
            for r in chunk {
                keys.push_bind(&r.idempotency_key);
            }
            keys.push_unseparated(")");
            for row in qb.build().fetch_all(&mut *tx).await.map_err(backend)? {
                stored.insert(row.try_get::<String, _>(0).map_err(backend)?);
            }
        }
        let mut used: Vec<(Meter, u64)> = Vec::new();
        if limit.is_some() {
            for r in records {
                if !used.iter().any(|(m, _)| *m == r.meter) {
                    used.push((
                        r.meter,
                        counted(&mut tx, &user_id, r.meter, start, end).await?,
                    ));
                }
            }
        }
        let plan = revpilot_core::ports::plan_usage(records, &stored, &used, limit);
        for chunk in plan.new.chunks(BATCH) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO usage_events (id, user_id, event_type, stripe_connection_id, amount,
                   idempotency_key, status, metadata, created_at, period_start, period_end) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(Uuid::new_v4().to_string())
                    .push_bind(&user_id)
                    .push_bind(r.meter.as_str())
                    .push_bind(r.connection.map(|c| c.0.to_string()))
                    .push_bind(i64::try_from(r.amount).unwrap_or(i64::MAX))
                    .push_bind(&r.idempotency_key)
                    .push_bind("committed")
                    .push_bind(r.metadata.to_string())
                    .push_bind(micros(r.at))
                    .push_bind(start)
                    .push_bind(end);
            });
            qb.build().execute(&mut *tx).await.map_err(|e| {
                if is_foreign_key(&e) {
                    StoreError::NotFound("user or connection")
                } else {
                    backend(e)
                }
            })?;
        }
        for (meter, units) in &plan.added {
            let units = i64::try_from(*units).unwrap_or(i64::MAX);
            add_to_counter(&mut tx, &user_id, *meter, start, end, units).await?;
        }
        tx.commit().await.map_err(backend)?;
        match plan.refused {
            Some(refused) => Err(refused),
            None => Ok(plan.outcomes),
        }
    }

    async fn reserve(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded> {
        self.add_usage(record, period, limit, "reserved").await
    }

    async fn commit(&self, user: UserId, idempotency_key: &str) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE usage_events SET status = 'committed'
             WHERE user_id = $1 AND idempotency_key = $2 AND status = 'reserved'",
        )
        .bind(user.0.to_string())
        .bind(idempotency_key)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("usage reservation"));
        }
        Ok(())
    }

    async fn release(&self, user: UserId, idempotency_key: &str) -> StoreResult<()> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let gone: Option<(String, i64, i64, i64)> = sqlx::query_as(
            "DELETE FROM usage_events WHERE user_id = $1 AND idempotency_key = $2 AND status = 'reserved'
             RETURNING event_type, amount, period_start, period_end",
        )
        .bind(user.0.to_string())
        .bind(idempotency_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some((event_type, amount, start, end)) = gone else {
            return Err(StoreError::NotFound("usage reservation"));
        };
        sqlx::query(
            "UPDATE usage_counters SET used = used - $1
             WHERE user_id = $2 AND event_type = $3 AND period_start = $4 AND period_end = $5",
        )
        .bind(amount)
        .bind(user.0.to_string())
        .bind(event_type)
        .bind(start)
        .bind(end)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(())
    }

    async fn used(&self, user: UserId, meter: Meter, period: Period) -> StoreResult<u64> {
        let used: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(amount), 0) FROM usage_events WHERE user_id = $1 AND event_type = $2
               AND status = 'committed' AND created_at >= $3 AND created_at < $4",
        )
        .bind(user.0.to_string())
        .bind(meter.as_str())
        .bind(micros(period.start))
        .bind(micros(period.end))
        .fetch_one(&self.pool)
        .await
        .map_err(backend)?;
        Ok(u64::try_from(used).unwrap_or(0))
    }
}

#[async_trait]
impl WebhookInbox for SqliteStore {
    async fn insert(&self, event: &InboxEvent) -> StoreResult<Inserted> {
        let done = sqlx::query(
            "INSERT INTO webhook_events (event_id, event_type, created, livemode, payload, received_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&event.event_id)
        .bind(&event.event_type)
        .bind(micros(event.created))
        .bind(i64::from(event.livemode))
        .bind(&event.payload)
        .bind(micros(event.received_at))
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(if done.rows_affected() == 1 {
            Inserted::New
        } else {
            Inserted::Duplicate
        })
    }

    async fn pending(&self, limit: usize, max_attempts: u32) -> StoreResult<Vec<PendingEvent>> {
        let rows = sqlx::query(
            "SELECT event_id, event_type, created, livemode, payload, received_at, attempts, last_error
             FROM webhook_events WHERE processed_at IS NULL AND attempts < $1
             ORDER BY created, event_id LIMIT $2",
        )
        .bind(i64::from(max_attempts))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|r| {
                Ok(PendingEvent {
                    event: InboxEvent {
                        event_id: r.try_get(0).map_err(backend)?,
                        event_type: r.try_get(1).map_err(backend)?,
                        created: instant(r.try_get(2).map_err(backend)?)?,
                        livemode: r.try_get::<i64, _>(3).map_err(backend)? != 0,
                        payload: r.try_get(4).map_err(backend)?,
                        received_at: instant(r.try_get(5).map_err(backend)?)?,
                    },
                    attempts: u32::try_from(r.try_get::<i64, _>(6).map_err(backend)?)
                        .unwrap_or(u32::MAX),
                    last_error: r.try_get(7).map_err(backend)?,
                })
            })
            .collect()
    }

    async fn mark_processed(&self, event_id: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE webhook_events SET processed_at = $1 WHERE event_id = $2 AND processed_at IS NULL")
            .bind(micros(now))
            .bind(event_id)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("webhook event"));
        }
        Ok(())
    }

    async fn mark_failed(&self, event_id: &str, error: &str) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE webhook_events SET attempts = attempts + 1, last_error = $1
             WHERE event_id = $2 AND processed_at IS NULL",
        )
        .bind(error)
        .bind(event_id)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("webhook event"));
        }
        Ok(())
    }
}

fn cache_table(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Customer => "customers_cache",
        ObjectKind::Subscription => "subscriptions_cache",
        ObjectKind::Invoice => "invoices_cache",
        ObjectKind::Charge => "charges_cache",
        ObjectKind::Price => "prices_cache",
        ObjectKind::Product => "products_cache",
        ObjectKind::Coupon => "coupons_cache",
        ObjectKind::Dispute => "disputes_cache",
    }
}

/// Rows per statement of a bulk write (4 parameters each, well under SQLite's limit).
const BATCH: usize = 500;

#[async_trait]
impl ObjectCache for SqliteStore {
    async fn upsert_objects(
        &self,
        connection: ConnectionId,
        objects: &[CachedObject],
    ) -> StoreResult<UpsertStats> {
        let conn = connection.0.to_string();
        let mut tx = self.write_for_connection(connection).await?;
        let mut stats = UpsertStats::default();
        for kind in ObjectKind::ALL {
            let table = cache_table(kind);
            let of_kind: Vec<&CachedObject> = objects.iter().filter(|o| o.kind == kind).collect();
            for chunk in of_kind.chunks(BATCH) {
                // What is stored now, to decide each object here: no write for unchanged data.
                let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
                    "SELECT stripe_id, version, data FROM {table} WHERE stripe_connection_id = "
                ));
                qb.push_bind(&conn).push(" AND stripe_id IN (");
                let mut ids = qb.separated(", ");
                for o in chunk {
                    ids.push_bind(&o.stripe_id);
                }
                ids.push_unseparated(")");
                let stored: HashMap<String, (i64, String)> = qb
                    .build()
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(backend)?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?))))
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(backend)?;
                let mut latest: HashMap<&str, (i64, &str)> = HashMap::new();
                let mut write: Vec<&CachedObject> = Vec::new();
                for o in chunk {
                    let version = micros(o.version);
                    let current = latest
                        .get(o.stripe_id.as_str())
                        .copied()
                        .or_else(|| stored.get(&o.stripe_id).map(|(v, d)| (*v, d.as_str())));
                    match current {
                        None => stats.inserted += 1,
                        Some((v, d)) if version > v && d != o.data => stats.updated += 1,
                        Some(_) => {
                            stats.skipped += 1;
                            continue;
                        }
                    }
                    latest.insert(&o.stripe_id, (version, &o.data));
                    write.push(o);
                }
                // Within one chunk an id may be written twice; keep the last (newest) write.
                let mut last: HashMap<&str, &CachedObject> = HashMap::new();
                for o in &write {
                    last.insert(&o.stripe_id, o);
                }
                if last.is_empty() {
                    continue;
                }
                let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
                    "INSERT INTO {table} (stripe_connection_id, stripe_id, version, data, customer_id, written_at) "
                ));
                let written = micros(Utc::now());
                qb.push_values(last.values(), |mut b, o| {
                    b.push_bind(&conn)
                        .push_bind(&o.stripe_id)
                        .push_bind(micros(o.version))
                        .push_bind(&o.data)
                        .push_bind(&o.customer)
                        .push_bind(written);
                });
                qb.push(
                    " ON CONFLICT (stripe_connection_id, stripe_id) DO UPDATE SET version = excluded.version, data = excluded.data, \
                     customer_id = excluded.customer_id, written_at = excluded.written_at",
                );
                qb.build().execute(&mut *tx).await.map_err(backend)?;
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(stats)
    }

    async fn objects(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
    ) -> StoreResult<Vec<CachedObject>> {
        let sql = format!(
            "SELECT o.stripe_id, o.version, o.data, o.customer_id FROM {} o
             JOIN stripe_connections c ON c.id = o.stripe_connection_id
             WHERE o.stripe_connection_id = $1 AND c.user_id = $2 ORDER BY o.stripe_id",
            cache_table(kind)
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(connection.0.to_string())
            .bind(user.0.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        cached_objects(&rows, kind)
    }

    async fn objects_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<CachedObject>> {
        // Keyset pages on the primary key (connection, stripe id).
        let sql = format!(
            "SELECT o.stripe_id, o.version, o.data, o.customer_id FROM {} o
             JOIN stripe_connections c ON c.id = o.stripe_connection_id
             WHERE o.stripe_connection_id = $1 AND c.user_id = $2 AND o.stripe_id > $3
             ORDER BY o.stripe_id LIMIT $4",
            cache_table(kind)
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(connection.0.to_string())
            .bind(user.0.to_string())
            .bind(after.unwrap_or(""))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        cached_objects(&rows, kind)
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
        let sql = format!(
            // By the write-time index: the primary key would walk every object of the
            // connection to find the few written since.
            "SELECT o.stripe_id, o.version, o.data, o.customer_id FROM {table} o
             INDEXED BY {table}_written
             JOIN stripe_connections c ON c.id = o.stripe_connection_id
             WHERE o.stripe_connection_id = $1 AND c.user_id = $2 AND o.written_at >= $3
               AND o.stripe_id > $4
             ORDER BY o.stripe_id LIMIT $5",
            table = cache_table(kind)
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(connection.0.to_string())
            .bind(user.0.to_string())
            .bind(micros(since))
            .bind(after.unwrap_or(""))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        cached_objects(&rows, kind)
    }

    async fn objects_of_customers(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        customers: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        self.objects_where(user, connection, kind, "customer_id", customers)
            .await
    }

    async fn objects_by_ids(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        ids: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        self.objects_where(user, connection, kind, "stripe_id", ids)
            .await
    }
}

impl SqliteStore {
    /// The user's cached objects of `kind` whose `column` is one of `values` (for
    /// `customer_id`, `""` stands for none), by Stripe id.
    async fn objects_where(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        column: &str,
        values: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        let table = cache_table(kind);
        // The planner, without statistics, would walk the primary key for a long `IN` list.
        let index = if column == "customer_id" {
            format!(" INDEXED BY {table}_customer")
        } else {
            String::new()
        };
        let select = |qb: &mut QueryBuilder<Sqlite>| {
            qb.push_bind(connection.0.to_string())
                .push(" AND c.user_id = ")
                .push_bind(user.0.to_string());
        };
        let head = format!(
            "SELECT o.stripe_id, o.version, o.data, o.customer_id FROM {table} o{index}
             JOIN stripe_connections c ON c.id = o.stripe_connection_id
             WHERE o.stripe_connection_id = "
        );
        let mut out = Vec::new();
        let none = column == "customer_id" && values.iter().any(String::is_empty);
        let values: Vec<&String> = values
            .iter()
            .filter(|v| column != "customer_id" || !v.is_empty())
            .collect();
        for chunk in values.chunks(BATCH) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(&head);
            select(&mut qb);
            qb.push(format!(" AND o.{column} IN ("));
            let mut list = qb.separated(", ");
            for v in chunk {
                list.push_bind(*v);
            }
            list.push_unseparated(")");
            let rows = qb.build().fetch_all(&self.pool).await.map_err(backend)?;
            out.extend(cached_objects(&rows, kind)?);
        }
        if none {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(&head);
            select(&mut qb);
            qb.push(" AND o.customer_id IS NULL");
            let rows = qb.build().fetch_all(&self.pool).await.map_err(backend)?;
            out.extend(cached_objects(&rows, kind)?);
        }
        out.sort_by(|a, b| a.stripe_id.cmp(&b.stripe_id));
        out.dedup_by(|a, b| a.stripe_id == b.stripe_id);
        Ok(out)
    }
}

/// Rows of `stripe_id, version, data` as cached objects of `kind`.
fn cached_objects(rows: &[SqliteRow], kind: ObjectKind) -> StoreResult<Vec<CachedObject>> {
    rows.iter()
        .map(|r| {
            Ok(CachedObject {
                kind,
                stripe_id: r.try_get(0).map_err(backend)?,
                version: instant(r.try_get(1).map_err(backend)?)?,
                data: r.try_get(2).map_err(backend)?,
                customer: r.try_get(3).map_err(backend)?,
            })
        })
        .collect()
}

const SNAPSHOT_COLUMNS: &str = "snapshot_date, period_start, mrr_start, mrr, arr, total_revenue, customers_start, \
     total_customers, active_subscriptions, churned_customers, arpu, ltv, customer_churn_rate, \
     revenue_churn_rate, net_revenue_churn_rate, new_mrr, expansion_mrr, contraction_mrr, churned_mrr, \
     reactivation_mrr, fx_mrr, quick_ratio, nrr, grr, partial";

fn snapshot_row(r: &SqliteRow) -> StoreResult<SeriesRow> {
    let s = |i: usize| r.try_get::<String, _>(i).map_err(backend);
    let o = |i: usize| r.try_get::<Option<String>, _>(i).map_err(backend);
    let n = |i: usize| -> StoreResult<u64> {
        let v: i64 = r.try_get(i).map_err(backend)?;
        u64::try_from(v).map_err(|_| StoreError::Invalid(format!("stored count {v}")))
    };
    let day = |i: usize| -> StoreResult<NaiveDate> {
        let v = s(i)?;
        NaiveDate::parse_from_str(&v, "%Y-%m-%d")
            .map_err(|_| StoreError::Invalid(format!("stored date {v:?}")))
    };
    Ok(SeriesRow {
        date: day(0)?,
        period_start: day(1)?,
        mrr_start: decimal(&s(2)?)?,
        mrr: decimal(&s(3)?)?,
        arr: decimal(&s(4)?)?,
        total_revenue: decimal(&s(5)?)?,
        customers_start: n(6)?,
        total_customers: n(7)?,
        active_subscriptions: n(8)?,
        churned_customers: n(9)?,
        arpu: opt_decimal(o(10)?)?,
        ltv: opt_decimal(o(11)?)?,
        customer_churn_rate: opt_decimal(o(12)?)?,
        revenue_churn_rate: opt_decimal(o(13)?)?,
        net_revenue_churn_rate: opt_decimal(o(14)?)?,
        new_mrr: decimal(&s(15)?)?,
        expansion_mrr: decimal(&s(16)?)?,
        contraction_mrr: decimal(&s(17)?)?,
        churned_mrr: decimal(&s(18)?)?,
        reactivation_mrr: decimal(&s(19)?)?,
        fx_mrr: decimal(&s(20)?)?,
        quick_ratio: opt_decimal(o(21)?)?,
        nrr: opt_decimal(o(22)?)?,
        grr: opt_decimal(o(23)?)?,
        partial: r.try_get::<i64, _>(24).map_err(backend)? != 0,
    })
}

fn count(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("count {v} is too large")))
}

#[async_trait]
impl SnapshotStore for SqliteStore {
    async fn upsert_snapshots(
        &self,
        connection: ConnectionId,
        rows: &[SeriesRow],
    ) -> StoreResult<usize> {
        let conn = connection.0.to_string();
        let now = micros(Utc::now());
        let mut tx = self.write_for_connection(connection).await?;
        let d = |v: Decimal| v.to_string();
        let od = |v: Option<Decimal>| v.map(|x| x.to_string());
        for r in rows {
            let sql = format!(
                "INSERT INTO metrics_snapshots (id, stripe_connection_id, created_at, {SNAPSHOT_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                         $19, $20, $21, $22, $23, $24, $25, $26, $27, $28)
                 ON CONFLICT (stripe_connection_id, snapshot_date) DO UPDATE SET
                   period_start = excluded.period_start, mrr_start = excluded.mrr_start, mrr = excluded.mrr,
                   arr = excluded.arr, total_revenue = excluded.total_revenue,
                   customers_start = excluded.customers_start, total_customers = excluded.total_customers,
                   active_subscriptions = excluded.active_subscriptions,
                   churned_customers = excluded.churned_customers, arpu = excluded.arpu, ltv = excluded.ltv,
                   customer_churn_rate = excluded.customer_churn_rate,
                   revenue_churn_rate = excluded.revenue_churn_rate,
                   net_revenue_churn_rate = excluded.net_revenue_churn_rate, new_mrr = excluded.new_mrr,
                   expansion_mrr = excluded.expansion_mrr, contraction_mrr = excluded.contraction_mrr,
                   churned_mrr = excluded.churned_mrr, reactivation_mrr = excluded.reactivation_mrr,
                   fx_mrr = excluded.fx_mrr, quick_ratio = excluded.quick_ratio, nrr = excluded.nrr,
                   grr = excluded.grr, partial = excluded.partial, created_at = excluded.created_at"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(Uuid::new_v4().to_string())
                .bind(&conn)
                .bind(now)
                .bind(r.date.to_string())
                .bind(r.period_start.to_string())
                .bind(d(r.mrr_start))
                .bind(d(r.mrr))
                .bind(d(r.arr))
                .bind(d(r.total_revenue))
                .bind(count(r.customers_start)?)
                .bind(count(r.total_customers)?)
                .bind(count(r.active_subscriptions)?)
                .bind(count(r.churned_customers)?)
                .bind(od(r.arpu))
                .bind(od(r.ltv))
                .bind(od(r.customer_churn_rate))
                .bind(od(r.revenue_churn_rate))
                .bind(od(r.net_revenue_churn_rate))
                .bind(d(r.new_mrr))
                .bind(d(r.expansion_mrr))
                .bind(d(r.contraction_mrr))
                .bind(d(r.churned_mrr))
                .bind(d(r.reactivation_mrr))
                .bind(d(r.fx_mrr))
                .bind(od(r.quick_ratio))
                .bind(od(r.nrr))
                .bind(od(r.grr))
                .bind(i64::from(r.partial))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(rows.len())
    }

    async fn snapshots(
        &self,
        user: UserId,
        connection: ConnectionId,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<SeriesRow>> {
        let sql = format!(
            "SELECT {} FROM metrics_snapshots s JOIN stripe_connections c ON c.id = s.stripe_connection_id
             WHERE s.stripe_connection_id = $1 AND c.user_id = $2 AND s.snapshot_date BETWEEN $3 AND $4
             ORDER BY s.snapshot_date",
            SNAPSHOT_COLUMNS
                .split(", ")
                .map(|c| format!("s.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(connection.0.to_string())
            .bind(user.0.to_string())
            .bind(from.to_string())
            .bind(to.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(snapshot_row).collect()
    }
}

const CONNECTION_COLUMNS: &str = "id, user_id, stripe_account_id, business_name, currency, is_active, last_synced_at, created_at, updated_at";

fn connection_row(r: &SqliteRow) -> StoreResult<Connection> {
    Ok(Connection {
        id: ConnectionId(uuid(&r.try_get::<String, _>(0).map_err(backend)?)?),
        user: UserId(uuid(&r.try_get::<String, _>(1).map_err(backend)?)?),
        stripe_account_id: r.try_get(2).map_err(backend)?,
        business_name: r.try_get(3).map_err(backend)?,
        currency: r.try_get(4).map_err(backend)?,
        is_active: r.try_get::<i64, _>(5).map_err(backend)? != 0,
        last_synced_at: opt_instant(r.try_get(6).map_err(backend)?)?,
        created_at: instant(r.try_get(7).map_err(backend)?)?,
        updated_at: instant(r.try_get(8).map_err(backend)?)?,
    })
}

#[async_trait]
impl ConnectionStore for SqliteStore {
    async fn save_connection(
        &self,
        new: NewConnection,
        now: DateTime<Utc>,
    ) -> StoreResult<Connection> {
        let user = new.user.0.to_string();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let existing: Option<(String, String)> = sqlx::query_as(
            "SELECT id, user_id FROM stripe_connections WHERE stripe_account_id = $1",
        )
        .bind(&new.stripe_account_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let id = match existing {
            Some((_, owner)) if owner != user => {
                return Err(StoreError::Conflict(format!(
                    "Stripe account {}",
                    new.stripe_account_id
                )));
            }
            Some((id, _)) => id,
            None => Uuid::new_v4().to_string(),
        };
        let (access, refresh, key_id) = self.seal_tokens(&new.tokens, &id, &user)?;
        let sql = format!(
            "INSERT INTO stripe_connections (id, user_id, stripe_account_id, access_token_enc, refresh_token_enc,
               token_key_id, business_name, currency, is_active, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9)
             ON CONFLICT (id) DO UPDATE SET access_token_enc = excluded.access_token_enc,
               refresh_token_enc = excluded.refresh_token_enc, token_key_id = excluded.token_key_id,
               business_name = excluded.business_name, currency = excluded.currency, is_active = 1,
               updated_at = excluded.updated_at
             RETURNING {CONNECTION_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(&id)
            .bind(&user)
            .bind(&new.stripe_account_id)
            .bind(access)
            .bind(refresh)
            .bind(key_id)
            .bind(new.business_name.as_deref())
            .bind(new.currency.as_deref())
            .bind(micros(now))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                if is_foreign_key(&e) {
                    StoreError::NotFound("user")
                } else {
                    backend(e)
                }
            })?;
        let connection = connection_row(&row)?;
        tx.commit().await.map_err(backend)?;
        Ok(connection)
    }

    async fn connection(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Connection>> {
        let sql = format!(
            "SELECT {CONNECTION_COLUMNS} FROM stripe_connections WHERE id = $1 AND user_id = $2"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(id.0.to_string())
            .bind(user.0.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .as_ref()
            .map(connection_row)
            .transpose()
    }

    async fn connections(&self, user: UserId) -> StoreResult<Vec<Connection>> {
        let sql = format!(
            "SELECT {CONNECTION_COLUMNS} FROM stripe_connections WHERE user_id = $1 ORDER BY created_at, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(user.0.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(connection_row).collect()
    }

    async fn active_connections(&self) -> StoreResult<Vec<Connection>> {
        let sql = format!(
            "SELECT {CONNECTION_COLUMNS} FROM stripe_connections WHERE is_active = 1 ORDER BY created_at, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(connection_row).collect()
    }

    async fn tokens(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Tokens>> {
        let (id, user) = (id.0.to_string(), user.0.to_string());
        let row = sqlx::query(
            "SELECT id, user_id, access_token_enc, refresh_token_enc, token_key_id FROM stripe_connections
             WHERE id = $1 AND user_id = $2 AND is_active = 1 AND access_token_enc IS NOT NULL",
        )
        .bind(&id)
        .bind(&user)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        row.map(|r| self.open_tokens(&r, &id, &user)).transpose()
    }

    async fn deactivate(
        &self,
        stripe_account_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Connection>> {
        let sql = format!(
            "UPDATE stripe_connections SET is_active = 0, access_token_enc = NULL, refresh_token_enc = NULL,
               token_key_id = NULL, updated_at = $1
             WHERE stripe_account_id = $2 RETURNING {CONNECTION_COLUMNS}"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(micros(now))
            .bind(stripe_account_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .as_ref()
            .map(connection_row)
            .transpose()
    }

    async fn set_last_synced(&self, id: ConnectionId, at: DateTime<Utc>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE stripe_connections SET last_synced_at = $1 WHERE id = $2")
            .bind(micros(at))
            .bind(id.0.to_string())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("connection"));
        }
        Ok(())
    }
}

#[async_trait]
impl OAuthStateStore for SqliteStore {
    async fn put_state(
        &self,
        state: &str,
        user: UserId,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        // Expired states go as new ones come, whether or not their callback ever does.
        sqlx::query("DELETE FROM oauth_states WHERE expires_at <= $1")
            .bind(micros(Utc::now()))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        sqlx::query("INSERT INTO oauth_states (state, user_id, expires_at) VALUES ($1, $2, $3)")
            .bind(state)
            .bind(user.0.to_string())
            .bind(micros(expires_at))
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_unique(&e) {
                    StoreError::Conflict("OAuth state".into())
                } else if is_foreign_key(&e) {
                    StoreError::NotFound("user")
                } else {
                    backend(e)
                }
            })?;
        Ok(())
    }

    async fn take_state(
        &self,
        state: &str,
        user: UserId,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<UserId>> {
        sqlx::query("DELETE FROM oauth_states WHERE expires_at <= $1")
            .bind(micros(now))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        // Deleting is the single use: of concurrent takes, one deletes the row, the others find
        // nothing. Only the state's own user deletes it.
        let row: Option<(String, i64)> = sqlx::query_as(
            "DELETE FROM oauth_states WHERE state = $1 AND user_id = $2 RETURNING user_id, expires_at",
        )
        .bind(state)
        .bind(user.0.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        if let Some((owner, expires)) = row {
            return Ok((micros(now) < expires).then_some(UserId(uuid(&owner)?)));
        }
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT user_id FROM oauth_states WHERE state = $1 AND expires_at > $2",
        )
        .bind(state)
        .bind(micros(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        owner.map(|o| uuid(&o).map(UserId)).transpose()
    }
}

#[async_trait]
impl SyncStateStore for SqliteStore {
    async fn cursor(&self, connection: ConnectionId, stream: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar(
            "SELECT cursor FROM sync_cursors WHERE stripe_connection_id = $1 AND object_kind = $2",
        )
        .bind(connection.0.to_string())
        .bind(stream)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)
    }

    async fn set_cursor(
        &self,
        connection: ConnectionId,
        stream: &str,
        cursor: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO sync_cursors (stripe_connection_id, object_kind, cursor, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (stripe_connection_id, object_kind) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
        )
        .bind(connection.0.to_string())
        .bind(stream)
        .bind(cursor)
        .bind(micros(now))
        .execute(&self.pool)
        .await
        .map_err(|e| if is_foreign_key(&e) { StoreError::NotFound("connection") } else { backend(e) })?;
        Ok(())
    }

    async fn clear_cursors(&self, connection: ConnectionId) -> StoreResult<()> {
        sqlx::query("DELETE FROM sync_cursors WHERE stripe_connection_id = $1")
            .bind(connection.0.to_string())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn start_run(&self, connection: ConnectionId, now: DateTime<Utc>) -> StoreResult<Uuid> {
        let id = Uuid::new_v4();
        sqlx::query("INSERT INTO sync_runs (id, stripe_connection_id, started_at, status) VALUES ($1, $2, $3, 'running')")
            .bind(id.to_string())
            .bind(connection.0.to_string())
            .bind(micros(now))
            .execute(&self.pool)
            .await
            .map_err(|e| if is_foreign_key(&e) { StoreError::NotFound("connection") } else { backend(e) })?;
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
        let count = |v: u64| {
            i64::try_from(v).map_err(|_| StoreError::Invalid(format!("count {v} is too large")))
        };
        let objects = crate::counts_json(&outcome.objects);
        let done = sqlx::query(
            "UPDATE sync_runs SET finished_at = $1, status = $2, objects = $3, requests = $4, retries = $5, error = $6
             WHERE id = $7 AND status = 'running'",
        )
        .bind(micros(now))
        .bind(status.as_str())
        .bind(objects.to_string())
        .bind(count(outcome.requests)?)
        .bind(count(outcome.retries)?)
        .bind(outcome.error.as_deref())
        .bind(run.to_string())
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("running sync run"));
        }
        Ok(())
    }

    async fn last_run(
        &self,
        user: UserId,
        connection: ConnectionId,
    ) -> StoreResult<Option<SyncRun>> {
        let row = sqlx::query(
            "SELECT r.id, r.started_at, r.finished_at, r.status, r.objects, r.requests, r.retries, r.error
             FROM sync_runs r JOIN stripe_connections c ON c.id = r.stripe_connection_id
             WHERE r.stripe_connection_id = $1 AND c.user_id = $2
             ORDER BY r.started_at DESC, r.id DESC LIMIT 1",
        )
        .bind(connection.0.to_string())
        .bind(user.0.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        let Some(r) = row else { return Ok(None) };
        let status: String = r.try_get(3).map_err(backend)?;
        let objects: String = r.try_get(4).map_err(backend)?;
        let count = |i: usize| -> StoreResult<u64> {
            let v: i64 = r.try_get(i).map_err(backend)?;
            u64::try_from(v).map_err(|_| StoreError::Invalid(format!("stored count {v}")))
        };
        Ok(Some(SyncRun {
            id: uuid(&r.try_get::<String, _>(0).map_err(backend)?)?,
            connection,
            started_at: instant(r.try_get(1).map_err(backend)?)?,
            finished_at: opt_instant(r.try_get(2).map_err(backend)?)?,
            status: SyncStatus::parse(&status)
                .ok_or_else(|| StoreError::Invalid(format!("stored status {status:?}")))?,
            outcome: RunOutcome {
                objects: serde_json::from_str(&objects)
                    .map_err(|e| StoreError::Invalid(format!("stored run objects: {e}")))?,
                requests: count(5)?,
                retries: count(6)?,
                error: r.try_get(7).map_err(backend)?,
            },
        }))
    }
}

#[async_trait]
impl BillingStore for SqliteStore {
    async fn apply_plan_event(
        &self,
        user: UserId,
        change: &PlanChange,
        subscription: &UserSubscription,
        event: &SubscriptionEvent,
        now: DateTime<Utc>,
    ) -> StoreResult<Applied> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        // Locks the user (and finds out whether there is one): one user's events apply in turn.
        let known = sqlx::query("SELECT 1 FROM user_profiles WHERE user_id = $1")
            .bind(user.0.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        if known.is_none() {
            return Err(StoreError::NotFound("user"));
        }
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(last_event_created) FROM user_subscriptions WHERE user_id = $1",
        )
        .bind(user.0.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        if last.is_some_and(|l| l > micros(event.created)) {
            return Ok(Applied::Stale);
        }
        if let Some(id) = &event.stripe_event_id {
            let seen = sqlx::query("SELECT 1 FROM subscription_events WHERE stripe_event_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
            if seen.is_some() {
                return Ok(Applied::Duplicate);
            }
        }
        update_plan(&mut *tx, user, change, now).await?;
        sqlx::query(
            "INSERT INTO user_subscriptions (user_id, stripe_subscription_id, stripe_customer_id, tier, status, price_id,
               current_period_end, last_event_created, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
             ON CONFLICT (stripe_subscription_id) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id,
               tier = excluded.tier, status = excluded.status, price_id = excluded.price_id,
               current_period_end = excluded.current_period_end, last_event_created = excluded.last_event_created,
               updated_at = excluded.updated_at
             WHERE user_subscriptions.user_id = excluded.user_id",
        )
        .bind(user.0.to_string())
        .bind(&subscription.stripe_subscription_id)
        .bind(subscription.stripe_customer_id.as_deref())
        .bind(subscription.tier.as_str())
        .bind(subscription.status.as_deref())
        .bind(subscription.price_id.as_deref())
        .bind(subscription.current_period_end.map(micros))
        .bind(micros(event.created))
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        sqlx::query(
            "INSERT INTO subscription_events (id, user_id, stripe_event_id, event_type, tier, status, note, created, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(user.0.to_string())
        .bind(event.stripe_event_id.as_deref())
        .bind(&event.event_type)
        .bind(event.tier.as_str())
        .bind(event.status.as_deref())
        .bind(event.note.as_deref())
        .bind(micros(event.created))
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(Applied::Applied)
    }

    async fn user_subscription(&self, user: UserId) -> StoreResult<Option<UserSubscription>> {
        let row = sqlx::query(
            "SELECT stripe_subscription_id, stripe_customer_id, tier, status, price_id, current_period_end
             FROM user_subscriptions WHERE user_id = $1 ORDER BY last_event_created DESC, updated_at DESC LIMIT 1",
        )
        .bind(user.0.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        let Some(r) = row else { return Ok(None) };
        let tier: String = r.try_get(2).map_err(backend)?;
        Ok(Some(UserSubscription {
            stripe_subscription_id: r.try_get(0).map_err(backend)?,
            stripe_customer_id: r.try_get(1).map_err(backend)?,
            tier: Tier::parse(&tier)
                .ok_or_else(|| StoreError::Invalid(format!("stored tier {tier:?}")))?,
            status: r.try_get(3).map_err(backend)?,
            price_id: r.try_get(4).map_err(backend)?,
            current_period_end: opt_instant(r.try_get(5).map_err(backend)?)?,
        }))
    }

    async fn last_subscription_event(&self, user: UserId) -> StoreResult<Option<DateTime<Utc>>> {
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(created) FROM subscription_events WHERE user_id = $1")
                .bind(user.0.to_string())
                .fetch_one(&self.pool)
                .await
                .map_err(backend)?;
        opt_instant(last)
    }

    async fn subscription_events(&self, user: UserId) -> StoreResult<Vec<SubscriptionEvent>> {
        let rows = sqlx::query(
            "SELECT stripe_event_id, event_type, tier, status, note, created FROM subscription_events
             WHERE user_id = $1 ORDER BY created, recorded_at",
        )
        .bind(user.0.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|r| {
                let tier: String = r.try_get(2).map_err(backend)?;
                Ok(SubscriptionEvent {
                    stripe_event_id: r.try_get(0).map_err(backend)?,
                    event_type: r.try_get(1).map_err(backend)?,
                    tier: Tier::parse(&tier)
                        .ok_or_else(|| StoreError::Invalid(format!("stored tier {tier:?}")))?,
                    status: r.try_get(3).map_err(backend)?,
                    note: r.try_get(4).map_err(backend)?,
                    created: instant(r.try_get(5).map_err(backend)?)?,
                })
            })
            .collect()
    }
}

fn insight_row(r: &SqliteRow) -> StoreResult<revpilot_core::ports::InsightRecord> {
    use revpilot_core::insights::InsightKind;
    let get_s = |i: usize| r.try_get::<String, _>(i).map_err(backend);
    let kind = get_s(4)?;
    let connection: Option<String> = r.try_get(3).map_err(backend)?;
    Ok(revpilot_core::ports::InsightRecord {
        id: uuid(&get_s(0)?)?,
        generation: uuid(&get_s(1)?)?,
        user: UserId(uuid(&get_s(2)?)?),
        connection: connection.map(|c| uuid(&c).map(ConnectionId)).transpose()?,
        kind: InsightKind::parse(&kind)
            .ok_or_else(|| StoreError::Invalid(format!("stored insight kind {kind:?}")))?,
        title: get_s(5)?,
        summary: get_s(6)?,
        figures: serde_json::from_str(&get_s(7)?)
            .map_err(|e| StoreError::Invalid(format!("stored insight figures: {e}")))?,
        provider: get_s(8)?,
        note: r.try_get(9).map_err(backend)?,
        created_at: instant(r.try_get(10).map_err(backend)?)?,
    })
}

#[async_trait]
impl revpilot_core::ports::InsightStore for SqliteStore {
    async fn save_insights(
        &self,
        records: &[revpilot_core::ports::InsightRecord],
    ) -> StoreResult<()> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        for r in records {
            let user = r.user.0.to_string();
            let known = sqlx::query("SELECT 1 FROM user_profiles WHERE user_id = $1")
                .bind(&user)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
            if known.is_none() {
                return Err(StoreError::NotFound("user"));
            }
            if let Some(c) = r.connection {
                let owned =
                    sqlx::query("SELECT 1 FROM stripe_connections WHERE id = $1 AND user_id = $2")
                        .bind(c.0.to_string())
                        .bind(&user)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(backend)?;
                if owned.is_none() {
                    return Err(StoreError::NotFound("connection"));
                }
            }
            let figures = serde_json::to_string(&r.figures)
                .map_err(|e| StoreError::Invalid(format!("insight figures: {e}")))?;
            sqlx::query(
                "INSERT INTO insights (id, generation_id, user_id, stripe_connection_id, kind, title,
                   summary, figures, provider, note, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(r.id.to_string())
            .bind(r.generation.to_string())
            .bind(&user)
            .bind(r.connection.map(|c| c.0.to_string()))
            .bind(r.kind.as_str())
            .bind(&r.title)
            .bind(&r.summary)
            .bind(figures)
            .bind(&r.provider)
            .bind(r.note.as_deref())
            .bind(micros(r.created_at))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn insights(
        &self,
        user: UserId,
        connection: Option<ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<revpilot_core::ports::InsightRecord>> {
        let rows = sqlx::query(
            "SELECT id, generation_id, user_id, stripe_connection_id, kind, title, summary, figures,
               provider, note, created_at
             FROM insights WHERE user_id = $1 AND ($2 IS NULL OR stripe_connection_id = $2)
             ORDER BY created_at DESC, kind LIMIT $3",
        )
        .bind(user.0.to_string())
        .bind(connection.map(|c| c.0.to_string()))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.iter().map(insight_row).collect()
    }
}

#[async_trait]
impl revpilot_core::ports::CredentialStore for SqliteStore {
    async fn create_account(
        &self,
        user: UserId,
        email: &str,
        password_hash: &str,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let profile = insert_user(&mut *tx, user, Some(email), tier, limits, now).await?;
        sqlx::query(
            "INSERT INTO user_credentials (user_id, password_hash, created_at) VALUES ($1, $2, $3)",
        )
        .bind(user.0.to_string())
        .bind(password_hash)
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(profile)
    }

    async fn credentials(&self, email: &str) -> StoreResult<Option<(UserId, String)>> {
        let row = sqlx::query(
            "SELECT p.user_id, c.password_hash FROM user_profiles p
             JOIN user_credentials c ON c.user_id = p.user_id WHERE p.email = $1",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        row.map(|r| {
            let id: String = r.try_get(0).map_err(backend)?;
            Ok((UserId(uuid(&id)?), r.try_get(1).map_err(backend)?))
        })
        .transpose()
    }

    async fn end_session(
        &self,
        session: &str,
        expires: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        revpilot_core::ports::check_session_id(session)?;
        sqlx::query("DELETE FROM ended_sessions WHERE expires_at < $1")
            .bind(micros(now))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        sqlx::query(
            "INSERT INTO ended_sessions (session_id, expires_at) VALUES ($1, $2)
             ON CONFLICT (session_id) DO NOTHING",
        )
        .bind(session)
        .bind(micros(expires))
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn session_ended(&self, session: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM ended_sessions WHERE session_id = $1")
            .bind(session)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(row.is_some())
    }
}

#[async_trait]
impl revpilot_core::ports::LeaseStore for SqliteStore {
    async fn acquire_lease(
        &self,
        key: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        // One statement: insert, or take over an expired lease, or extend one's own; a live
        // lease of another holder matches no row.
        let done = sqlx::query(
            "INSERT INTO leases (key, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
        )
        .bind(key)
        .bind(holder)
        .bind(micros(until))
        .bind(micros(now))
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(&self, key: &str, holder: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM leases WHERE key = $1 AND holder = $2")
            .bind(key)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait]
impl revpilot_core::ports::DerivedStore for SqliteStore {
    async fn derived_stamp(
        &self,
        connection: ConnectionId,
    ) -> StoreResult<Option<revpilot_core::ports::DerivedStamp>> {
        let row: Option<(String, i64, Option<i64>, Option<i64>, i64)> = sqlx::query_as(
            "SELECT generation, version, synced_at, as_of, cache_read_at FROM derived_accounts
             WHERE stripe_connection_id = $1",
        )
        .bind(connection.0.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        row.map(|(generation, version, synced_at, as_of, read_at)| {
            Ok(revpilot_core::ports::DerivedStamp {
                generation: uuid(&generation)?,
                version: u32::try_from(version)
                    .map_err(|_| StoreError::Invalid(format!("derived version {version}")))?,
                synced_at: opt_instant(synced_at)?,
                as_of: opt_instant(as_of)?,
                cache_read_at: instant(read_at)?,
            })
        })
        .transpose()
    }

    async fn write_derived(
        &self,
        connection: ConnectionId,
        generation: Uuid,
        rows: &[revpilot_core::ports::DerivedRow],
    ) -> StoreResult<()> {
        let (conn, generation) = (connection.0.to_string(), generation.to_string());
        let mut tx = self.write_for_connection(connection).await?;
        for chunk in rows.chunks(BATCH) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO derived_customers (stripe_connection_id, generation, key, data) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(&conn)
                    .push_bind(&generation)
                    .push_bind(&r.key)
                    .push_bind(&r.data);
            });
            qb.push(
                " ON CONFLICT (stripe_connection_id, generation, key) DO UPDATE SET data = excluded.data",
            );
            qb.build().execute(&mut *tx).await.map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn publish_derived(
        &self,
        connection: ConnectionId,
        stamp: &revpilot_core::ports::DerivedStamp,
        replacing: Option<Uuid>,
    ) -> StoreResult<bool> {
        let (conn, generation) = (connection.0.to_string(), stamp.generation.to_string());
        let mut tx = self.write_for_connection(connection).await?;
        if let Some(g) = replacing {
            let current = sqlx::query(
                "SELECT 1 FROM derived_accounts WHERE stripe_connection_id = $1 AND generation = $2",
            )
            .bind(&conn)
            .bind(g.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
            if current.is_none() {
                return Ok(false);
            }
        }
        sqlx::query(
            "INSERT INTO derived_accounts
               (stripe_connection_id, generation, version, synced_at, as_of, cache_read_at,
                published_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (stripe_connection_id) DO UPDATE SET generation = excluded.generation,
               version = excluded.version, synced_at = excluded.synced_at, as_of = excluded.as_of,
               cache_read_at = excluded.cache_read_at, published_at = excluded.published_at",
        )
        .bind(&conn)
        .bind(&generation)
        .bind(i64::from(stamp.version))
        .bind(stamp.synced_at.map(micros))
        .bind(stamp.as_of.map(micros))
        .bind(micros(stamp.cache_read_at))
        .bind(micros(Utc::now()))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        sqlx::query(
            "DELETE FROM derived_customers WHERE stripe_connection_id = $1 AND generation <> $2",
        )
        .bind(&conn)
        .bind(&generation)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn derived_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        generation: Uuid,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<revpilot_core::ports::DerivedRow>> {
        // Keyset pages on the primary key; an empty key sorts first, so the first page starts
        // below it.
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT d.key, d.data FROM derived_customers d
             JOIN stripe_connections c ON c.id = d.stripe_connection_id
             WHERE d.stripe_connection_id = $1 AND c.user_id = $2 AND d.generation = $3
               AND ($4 IS NULL OR d.key > $4)
             ORDER BY d.key LIMIT $5",
        )
        .bind(connection.0.to_string())
        .bind(user.0.to_string())
        .bind(generation.to_string())
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        Ok(rows
            .into_iter()
            .map(|(key, data)| revpilot_core::ports::DerivedRow { key, data })
            .collect())
    }
}
