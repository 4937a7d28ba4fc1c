//! Every storage port, written once over SQL: [`SqlStore`] is generic over its backend's
//! [`Dialect`], which says how ids, instants, money and dates bind and read, how a write takes its
//! lock, and the few statements that must differ. SQLite ([`Sqlite`]) keeps ids as text, instants
//! as microseconds and money as decimal text; PostgreSQL ([`Postgres`]) keeps UUID, TIMESTAMPTZ
//! and NUMERIC. Both pass `revpilot_core::testing::conformance` unchanged.
//!
//! Writes that read before they write run in a write transaction ([`Dialect::BEGIN_WRITE`]) and
//! lock what they read ([`Dialect::FOR_UPDATE`]): SQLite takes its single write lock before the
//! read (`BEGIN IMMEDIATE`), PostgreSQL locks the rows read (`FOR UPDATE`), so one user's usage
//! writes are serialized while other users' run in parallel. Cache upserts carry a version guard
//! in the statement itself, so a concurrent older write can never win.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use revpilot_core::ports::{ConnectionId, StoreError, StoreResult, Tokens};
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool, SqlSafeStr, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::crypto::{KeyRing, Sealed};

mod billing;
mod cache;
mod connections;
mod insights;
mod users;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::Postgres;
#[cfg(feature = "sqlite")]
pub use sqlite::Sqlite;

/// A boxed future a dialect returns for a statement it runs.
pub(crate) type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A statement with its parameters, of dialect `D`.
pub(crate) type Query<D> =
    sqlx::query::Query<'static, <D as Backend>::Db, <<D as Backend>::Db as Database>::Arguments>;
/// A row of dialect `D`.
pub(crate) type Row<D> = <<D as Backend>::Db as Database>::Row;
/// A connection (or an open transaction) of dialect `D`.
pub(crate) type Conn<D> = <<D as Backend>::Db as Database>::Connection;

mod sealed {
    pub trait Sealed {}
}

/// The sqlx database a [`Dialect`] speaks. Implemented by [`Sqlite`] and [`Postgres`] only.
pub trait Backend: sealed::Sealed + Send + Sync + Sized + 'static {
    /// sqlx's database type.
    type Db: Database;
}

/// Binds a value of type `T` as the backend stores it.
#[doc(hidden)]
pub trait Bind<T>: Backend {
    fn bind(q: Query<Self>, v: T) -> Query<Self>;
}

/// Reads column `i` of a row as `T`.
#[doc(hidden)]
pub trait Get<T>: Backend {
    fn get(row: &Row<Self>, i: usize) -> sqlx::Result<T>;
}

/// What differs between the SQL backends: how values bind and read, how a write locks, and the
/// statements one of them plans badly. Implemented by [`Sqlite`] and [`Postgres`] only.
pub trait Dialect:
    Backend
    + Bind<i64>
    + Bind<Option<i64>>
    + Bind<bool>
    + Bind<String>
    + Bind<Option<String>>
    + for<'a> Bind<&'a str>
    + for<'a> Bind<Option<&'a str>>
    + Bind<serde_json::Value>
    + Get<i64>
    + Get<Option<i64>>
    + Get<bool>
    + Get<String>
    + Get<Option<String>>
    + Get<serde_json::Value>
{
    /// Opens a transaction that will write.
    #[doc(hidden)]
    const BEGIN_WRITE: &'static str;
    /// The database lets one transaction write at a time (SQLite): the store's own writers
    /// take turns in the process before they begin, instead of in the database's busy handler.
    #[doc(hidden)]
    const ONE_WRITER: bool;
    /// Follows a `SELECT` whose rows the transaction goes on to write.
    #[doc(hidden)]
    const FOR_UPDATE: &'static str;
    /// Runs a statement for its rows.
    #[doc(hidden)]
    fn all(c: &mut Conn<Self>, q: Query<Self>) -> Fut<'_, sqlx::Result<Vec<Row<Self>>>>;
    /// Runs a statement for at most one row.
    #[doc(hidden)]
    fn optional(c: &mut Conn<Self>, q: Query<Self>) -> Fut<'_, sqlx::Result<Option<Row<Self>>>>;
    /// Runs a statement for the rows it affected.
    #[doc(hidden)]
    fn run(c: &mut Conn<Self>, q: Query<Self>) -> Fut<'_, sqlx::Result<u64>>;
    #[doc(hidden)]
    fn bind_id(q: Query<Self>, v: Option<Uuid>) -> Query<Self>;
    #[doc(hidden)]
    fn get_id(row: &Row<Self>, i: usize) -> StoreResult<Option<Uuid>>;
    #[doc(hidden)]
    fn bind_at(q: Query<Self>, v: Option<DateTime<Utc>>) -> Query<Self>;
    #[doc(hidden)]
    fn get_at(row: &Row<Self>, i: usize) -> StoreResult<Option<DateTime<Utc>>>;
    #[doc(hidden)]
    fn bind_money(q: Query<Self>, v: Option<Decimal>) -> Query<Self>;
    #[doc(hidden)]
    fn get_money(row: &Row<Self>, i: usize) -> StoreResult<Option<Decimal>>;
    #[doc(hidden)]
    fn bind_date(q: Query<Self>, v: NaiveDate) -> Query<Self>;
    #[doc(hidden)]
    fn get_date(row: &Row<Self>, i: usize) -> StoreResult<NaiveDate>;
    /// A 32-bit column (limits, attempts).
    #[doc(hidden)]
    fn bind_int(q: Query<Self>, v: Option<u32>) -> StoreResult<Query<Self>>;
    #[doc(hidden)]
    fn get_int(row: &Row<Self>, i: usize) -> StoreResult<Option<u32>>;
    /// A derivation's version (a 32-bit hash).
    #[doc(hidden)]
    fn bind_version(q: Query<Self>, v: u32) -> Query<Self>;
    #[doc(hidden)]
    fn get_version(row: &Row<Self>, i: usize) -> StoreResult<u32>;
    /// Strings `values` as parameter `n` on, for [`Dialect::one_of`].
    #[doc(hidden)]
    fn bind_list(q: Query<Self>, values: &[&str]) -> Query<Self>;
    /// `column` is one of the `len` values bound from parameter `n` by [`Dialect::bind_list`].
    #[doc(hidden)]
    fn one_of(column: &str, n: usize, len: usize) -> String;
    /// Parameter `n`, typed for a `$n IS NULL` test: `"uuid"` or `"text"`.
    #[doc(hidden)]
    fn typed(n: usize, ty: &str) -> String;
    /// `column` equals parameter `n` as an email address (case-insensitively).
    #[doc(hidden)]
    fn email_is(column: &str, n: usize) -> String;
    /// Objects of a connection written since an instant, by Stripe id (`$1` connection, `$2`
    /// user, `$3` since, `$4` after, `$5` limit), where the backend needs its own statement;
    /// `None` reads through [`Dialect::read_by`] of `written_at`.
    #[doc(hidden)]
    fn written_since(table: &str) -> Option<String>;
    /// How the cache `table` is read by `column` (an index hint, where the planner needs one).
    #[doc(hidden)]
    fn read_by(table: &str, column: &str) -> String;
    /// A statement built at run time (long value lists), as the backend best runs it.
    #[doc(hidden)]
    fn statement(text: String) -> String {
        text
    }
}

/// RevPilot's storage on one SQL database: every storage port of `revpilot-core`.
/// [`SqliteStore`](crate::SqliteStore) and [`PgStore`](crate::PgStore) name its two backends.
pub struct SqlStore<D: Dialect> {
    pool: Pool<D::Db>,
    keys: KeyRing,
    /// The write turn of a one-writer database ([`Dialect::ONE_WRITER`]).
    turn: Option<Arc<Semaphore>>,
}

impl<D: Dialect> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            keys: self.keys.clone(),
            turn: self.turn.clone(),
        }
    }
}

/// A write's transaction ([`SqlStore::write`]) or connection ([`SqlStore::write_conn`]), holding
/// the store's write turn where the database has one writer until it is dropped. A transaction
/// dropped without [`Turned::commit`] rolls back.
pub(crate) struct Turned<T> {
    inner: T,
    _turn: Option<OwnedSemaphorePermit>,
}

/// A write transaction in its turn.
pub(crate) type Write<D> = Turned<Transaction<'static, <D as Backend>::Db>>;

impl<DB: Database> Turned<Transaction<'static, DB>> {
    pub(crate) async fn commit(self) -> sqlx::Result<()> {
        self.inner.commit().await
    }
}

impl<T> Deref for Turned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for Turned<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<D: Dialect> fmt::Debug for SqlStore<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("pool", &self.pool)
            .field("keys", &self.keys)
            .finish()
    }
}

pub(crate) fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

pub(crate) fn is_unique(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

pub(crate) fn is_foreign_key(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_foreign_key_violation())
}

/// `e` as `found` when it is a foreign-key violation (a row refers to one that is not there).
pub(crate) fn missing(found: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| {
        if is_foreign_key(&e) {
            StoreError::NotFound(found)
        } else {
            backend(e)
        }
    }
}

/// `Ok` when a statement changed a row, else [`StoreError::NotFound`] naming `what`.
pub(crate) fn changed(rows: u64, what: &'static str) -> StoreResult<()> {
    if rows == 0 {
        Err(StoreError::NotFound(what))
    } else {
        Ok(())
    }
}

/// A count as the databases store it.
pub(crate) fn count(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("count {v} is too large")))
}

/// A row limit as a parameter.
pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `($n, …), (…)`: `rows` tuples of `cols` parameters numbered from `first`.
pub(crate) fn tuples(rows: usize, cols: usize, first: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        out.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("${}", first + r * cols + c));
        }
        out.push(')');
    }
    out
}

/// Rows per statement of a bulk write (at most 11 parameters each, well under SQLite's limit).
pub(crate) const BATCH: usize = 500;

/// A statement of dialect `D` being bound.
pub(crate) struct Q<D: Dialect>(Query<D>);

/// The statement `text`.
pub(crate) fn sql<D: Dialect>(text: impl SqlSafeStr) -> Q<D> {
    Q(sqlx::query(text))
}

/// The statement made by `format!`.
pub(crate) fn sql_owned<D: Dialect>(text: String) -> Q<D> {
    Q(sqlx::query(sqlx::AssertSqlSafe(D::statement(text))))
}

impl<D: Dialect> Q<D> {
    pub(crate) fn bind<T>(self, v: T) -> Self
    where
        D: Bind<T>,
    {
        Q(D::bind(self.0, v))
    }

    pub(crate) fn id(self, v: Uuid) -> Self {
        Q(D::bind_id(self.0, Some(v)))
    }

    pub(crate) fn opt_id(self, v: Option<Uuid>) -> Self {
        Q(D::bind_id(self.0, v))
    }

    pub(crate) fn at(self, v: DateTime<Utc>) -> Self {
        Q(D::bind_at(self.0, Some(v)))
    }

    pub(crate) fn opt_at(self, v: Option<DateTime<Utc>>) -> Self {
        Q(D::bind_at(self.0, v))
    }

    pub(crate) fn money(self, v: Decimal) -> Self {
        Q(D::bind_money(self.0, Some(v)))
    }

    pub(crate) fn opt_money(self, v: Option<Decimal>) -> Self {
        Q(D::bind_money(self.0, v))
    }

    pub(crate) fn date(self, v: NaiveDate) -> Self {
        Q(D::bind_date(self.0, v))
    }

    pub(crate) fn int(self, v: Option<u32>) -> StoreResult<Self> {
        D::bind_int(self.0, v).map(Q)
    }

    pub(crate) fn version(self, v: u32) -> Self {
        Q(D::bind_version(self.0, v))
    }

    pub(crate) fn list(self, values: &[&str]) -> Self {
        Q(D::bind_list(self.0, values))
    }

    pub(crate) async fn all(self, c: &mut Conn<D>) -> StoreResult<Vec<Row<D>>> {
        D::all(c, self.0).await.map_err(backend)
    }

    pub(crate) async fn opt(self, c: &mut Conn<D>) -> StoreResult<Option<Row<D>>> {
        D::optional(c, self.0).await.map_err(backend)
    }

    pub(crate) async fn one(self, c: &mut Conn<D>) -> StoreResult<Row<D>> {
        self.opt(c)
            .await?
            .ok_or_else(|| backend(sqlx::Error::RowNotFound))
    }

    pub(crate) async fn run(self, c: &mut Conn<D>) -> StoreResult<u64> {
        D::run(c, self.0).await.map_err(backend)
    }

    /// As [`Q::opt`], with the driver's error for the caller to name.
    pub(crate) async fn try_opt(self, c: &mut Conn<D>) -> sqlx::Result<Option<Row<D>>> {
        D::optional(c, self.0).await
    }

    /// As [`Q::run`], with the driver's error for the caller to name.
    pub(crate) async fn try_run(self, c: &mut Conn<D>) -> sqlx::Result<u64> {
        D::run(c, self.0).await
    }
}

/// The [`Bind`] and [`Get`] impls of a dialect, for the plain types every backend stores alike.
macro_rules! plain_types {
    ($dialect:ty) => {
        $crate::sql::plain_types!(@bind $dialect: i64, Option<i64>, bool, String, Option<String>,
            serde_json::Value);
        $crate::sql::plain_types!(@get $dialect: i64, Option<i64>, bool, String, Option<String>,
            serde_json::Value);
        impl<'a> $crate::sql::Bind<&'a str> for $dialect {
            fn bind(q: $crate::sql::Query<Self>, v: &'a str) -> $crate::sql::Query<Self> {
                q.bind(v)
            }
        }
        impl<'a> $crate::sql::Bind<Option<&'a str>> for $dialect {
            fn bind(q: $crate::sql::Query<Self>, v: Option<&'a str>) -> $crate::sql::Query<Self> {
                q.bind(v)
            }
        }
    };
    (@bind $dialect:ty: $($t:ty),*) => {$(
        impl $crate::sql::Bind<$t> for $dialect {
            fn bind(q: $crate::sql::Query<Self>, v: $t) -> $crate::sql::Query<Self> {
                q.bind(v)
            }
        }
    )*};
    (@get $dialect:ty: $($t:ty),*) => {$(
        impl $crate::sql::Get<$t> for $dialect {
            fn get(row: &$crate::sql::Row<Self>, i: usize) -> sqlx::Result<$t> {
                sqlx::Row::try_get(row, i)
            }
        }
    )*};
}
pub(crate) use plain_types;

/// A row of dialect `D`, read by column.
pub(crate) struct R<'r, D: Dialect>(pub(crate) &'r Row<D>);

fn null(what: &str, i: usize) -> StoreError {
    StoreError::Invalid(format!("stored {what} in column {i} is NULL"))
}

impl<D: Dialect> R<'_, D> {
    pub(crate) fn get<T>(&self, i: usize) -> StoreResult<T>
    where
        D: Get<T>,
    {
        D::get(self.0, i).map_err(backend)
    }

    pub(crate) fn id(&self, i: usize) -> StoreResult<Uuid> {
        D::get_id(self.0, i)?.ok_or_else(|| null("id", i))
    }

    pub(crate) fn opt_id(&self, i: usize) -> StoreResult<Option<Uuid>> {
        D::get_id(self.0, i)
    }

    pub(crate) fn at(&self, i: usize) -> StoreResult<DateTime<Utc>> {
        D::get_at(self.0, i)?.ok_or_else(|| null("instant", i))
    }

    pub(crate) fn opt_at(&self, i: usize) -> StoreResult<Option<DateTime<Utc>>> {
        D::get_at(self.0, i)
    }

    pub(crate) fn money(&self, i: usize) -> StoreResult<Decimal> {
        D::get_money(self.0, i)?.ok_or_else(|| null("amount", i))
    }

    pub(crate) fn opt_money(&self, i: usize) -> StoreResult<Option<Decimal>> {
        D::get_money(self.0, i)
    }

    pub(crate) fn date(&self, i: usize) -> StoreResult<NaiveDate> {
        D::get_date(self.0, i)
    }

    pub(crate) fn int(&self, i: usize) -> StoreResult<Option<u32>> {
        D::get_int(self.0, i)
    }

    pub(crate) fn version(&self, i: usize) -> StoreResult<u32> {
        D::get_version(self.0, i)
    }

    /// A non-negative count.
    pub(crate) fn count(&self, i: usize) -> StoreResult<u64> {
        let v: i64 = self.get(i)?;
        u64::try_from(v).map_err(|_| StoreError::Invalid(format!("stored count {v}")))
    }
}

impl<D: Dialect> SqlStore<D> {
    /// The pool, for the tests and tools of this crate's users.
    pub fn pool(&self) -> &Pool<D::Db> {
        &self.pool
    }

    /// A connection of the pool, for statements outside a transaction.
    pub(crate) async fn conn(&self) -> StoreResult<PoolConnection<D::Db>> {
        self.pool.acquire().await.map_err(backend)
    }

    /// A store on `pool`.
    pub(crate) fn new(pool: Pool<D::Db>, keys: KeyRing) -> Self {
        SqlStore {
            pool,
            keys,
            turn: D::ONE_WRITER.then(|| Arc::new(Semaphore::new(1))),
        }
    }

    /// A transaction that will write. On a one-writer database the process's writers take
    /// turns here, in order, and the next begins only once the last has committed, which in
    /// SQLite includes its automatic checkpoint. Queued in SQLite's busy handler instead, each
    /// waiting writer held a connection and polled, and one began writing while the last one's
    /// checkpoint was still copying, so the log could never start over: it grew to 334 MB in
    /// a 20,000-customer backfill, each commit past the threshold checkpointing again
    /// (1,583-2,833 `fsync` calls in `sync_backfill unlimited`; 258-261 with every write in
    /// turn, the log near 40-60 MB). Other processes still meet in the busy handler.
    pub(crate) async fn write(&self) -> StoreResult<Write<D>> {
        let turn = self.turn().await?;
        let tx = self
            .pool
            .begin_with(D::BEGIN_WRITE)
            .await
            .map_err(backend)?;
        Ok(Turned {
            inner: tx,
            _turn: turn,
        })
    }

    /// A connection for a write outside a transaction (one statement): it takes its turn as
    /// [`Self::write`] does, so a one-statement write (a lease renewal, a sync's cursor) queues
    /// with the transactions instead of polling in SQLite's busy handler, where writers that
    /// hand the lock on in turn could keep it out until its timeout.
    pub(crate) async fn write_conn(&self) -> StoreResult<Turned<PoolConnection<D::Db>>> {
        let turn = self.turn().await?;
        let conn = self.conn().await?;
        Ok(Turned {
            inner: conn,
            _turn: turn,
        })
    }

    async fn turn(&self) -> StoreResult<Option<OwnedSemaphorePermit>> {
        match &self.turn {
            Some(turn) => Arc::clone(turn)
                .acquire_owned()
                .await
                .map(Some)
                .map_err(|e| StoreError::Backend(Box::new(e))),
            None => Ok(None),
        }
    }

    /// A write transaction on a connection's data, after checking the connection exists.
    pub(crate) async fn write_for_connection(
        &self,
        connection: ConnectionId,
    ) -> StoreResult<Write<D>> {
        let mut tx = self.write().await?;
        let known = sql::<D>("SELECT 1 FROM stripe_connections WHERE id = $1")
            .id(connection.0)
            .opt(&mut tx)
            .await?;
        if known.is_none() {
            return Err(StoreError::NotFound("connection"));
        }
        Ok(tx)
    }

    /// Re-encrypts every stored token with the current key (after adding a new key at the front of
    /// the ring). Returns how many connections were re-encrypted.
    ///
    /// # Errors
    /// [`StoreError::Crypto`] when a token cannot be decrypted with any configured key; nothing is
    /// changed then.
    pub async fn reencrypt_all(&self) -> StoreResult<usize> {
        let mut tx = self.write().await?;
        // Locked, so a connection deactivated meanwhile does not get its tokens back.
        let rows = sql_owned::<D>(format!(
            "SELECT id, user_id, access_token_enc, refresh_token_enc, token_key_id FROM stripe_connections
             WHERE access_token_enc IS NOT NULL AND token_key_id <> $1{}",
            D::FOR_UPDATE
        ))
        .bind(self.keys.current_id())
        .all(&mut tx)
        .await?;
        for row in &rows {
            let r = R::<D>(row);
            let (id, user) = (r.id(0)?, r.id(1)?);
            let tokens = self.open_tokens(&r, id, user)?;
            let (access, refresh, key_id) = self.seal_tokens(&tokens, id, user)?;
            sql::<D>("UPDATE stripe_connections SET access_token_enc = $1, refresh_token_enc = $2, token_key_id = $3 WHERE id = $4")
                .bind(access)
                .bind(refresh)
                .bind(key_id)
                .id(id)
                .run(&mut tx)
                .await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(rows.len())
    }

    fn context(id: Uuid, user: Uuid, field: &str) -> String {
        format!("revpilot/stripe_connections/{id}/{user}/{field}")
    }

    pub(crate) fn seal_tokens(
        &self,
        tokens: &Tokens,
        id: Uuid,
        user: Uuid,
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
    pub(crate) fn open_tokens(&self, row: &R<'_, D>, id: Uuid, user: Uuid) -> StoreResult<Tokens> {
        let key_id: String = row.get(4)?;
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
        let access: String = row.get(2)?;
        let refresh: Option<String> = row.get(3)?;
        Ok(Tokens {
            access_token: open(access, "access")?,
            refresh_token: refresh.map(|r| open(r, "refresh")).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tuples_number_their_parameters_in_order() {
        assert_eq!(super::tuples(2, 3, 2), "($2, $3, $4), ($5, $6, $7)");
        assert_eq!(super::tuples(1, 1, 1), "($1)");
        assert_eq!(super::tuples(0, 4, 1), "");
    }
}
