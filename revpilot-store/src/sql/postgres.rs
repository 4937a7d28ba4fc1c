//! PostgreSQL: ids UUID, instants TIMESTAMPTZ, money NUMERIC, dates DATE. A write locks the rows
//! it read (`FOR UPDATE`): usage against a limit locks the user's profile row, so one user's usage
//! writes are serialized while other users' run in parallel.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use revpilot_core::ports::{StoreError, StoreResult};
use rust_decimal::Decimal;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Decode, Row, Type};
use uuid::Uuid;

use super::{Backend, Dialect, Fut, Query, SqlStore, sealed};
use crate::crypto::KeyRing;
use crate::{Error, redact};

/// The migrations, embedded from `migrations/postgres/` (`NNNN_description.sql`): a database
/// created by an older version migrates forward on connect.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL [`Dialect`]: [`PgStore`](crate::PgStore) is `SqlStore<Postgres>`, shared by any
/// number of servers and workers.
#[derive(Clone, Copy, Debug)]
pub struct Postgres;

impl sealed::Sealed for Postgres {}

impl Backend for Postgres {
    type Db = sqlx::Postgres;
}

super::plain_types!(Postgres);

fn get<T>(row: &PgRow, i: usize) -> StoreResult<T>
where
    T: for<'r> Decode<'r, sqlx::Postgres> + Type<sqlx::Postgres>,
{
    row.try_get(i).map_err(super::backend)
}

/// A derivation's version (a 32-bit hash of the rebuild) as the `INTEGER` column holds it: the
/// same 32 bits, read as signed. A hash above `i32::MAX` is as valid as any other.
fn version_to_db(version: u32) -> i32 {
    i32::from_be_bytes(version.to_be_bytes())
}

/// The inverse of [`version_to_db`].
fn version_of_db(stored: i32) -> u32 {
    u32::from_be_bytes(stored.to_be_bytes())
}

impl Dialect for Postgres {
    const BEGIN_WRITE: &'static str = "BEGIN";
    const ONE_WRITER: bool = false;
    const FOR_UPDATE: &'static str = " FOR UPDATE";

    fn all(c: &mut PgConnection, q: Query<Self>) -> Fut<'_, sqlx::Result<Vec<PgRow>>> {
        Box::pin(q.fetch_all(c))
    }

    fn optional(c: &mut PgConnection, q: Query<Self>) -> Fut<'_, sqlx::Result<Option<PgRow>>> {
        Box::pin(q.fetch_optional(c))
    }

    fn run(c: &mut PgConnection, q: Query<Self>) -> Fut<'_, sqlx::Result<u64>> {
        Box::pin(async move { Ok(q.execute(c).await?.rows_affected()) })
    }

    fn bind_id(q: Query<Self>, v: Option<Uuid>) -> Query<Self> {
        q.bind(v)
    }

    fn get_id(row: &PgRow, i: usize) -> StoreResult<Option<Uuid>> {
        get(row, i)
    }

    fn bind_at(q: Query<Self>, v: Option<DateTime<Utc>>) -> Query<Self> {
        q.bind(v)
    }

    fn get_at(row: &PgRow, i: usize) -> StoreResult<Option<DateTime<Utc>>> {
        get(row, i)
    }

    fn bind_money(q: Query<Self>, v: Option<Decimal>) -> Query<Self> {
        q.bind(v)
    }

    fn get_money(row: &PgRow, i: usize) -> StoreResult<Option<Decimal>> {
        get(row, i)
    }

    fn bind_date(q: Query<Self>, v: NaiveDate) -> Query<Self> {
        q.bind(v)
    }

    fn get_date(row: &PgRow, i: usize) -> StoreResult<NaiveDate> {
        get(row, i)
    }

    fn bind_int(q: Query<Self>, v: Option<u32>) -> StoreResult<Query<Self>> {
        let v = v
            .map(|x| {
                i32::try_from(x)
                    .map_err(|_| StoreError::Invalid(format!("number {x} is too large")))
            })
            .transpose()?;
        Ok(q.bind(v))
    }

    fn get_int(row: &PgRow, i: usize) -> StoreResult<Option<u32>> {
        get::<Option<i32>>(row, i)?
            .map(|x| {
                u32::try_from(x)
                    .map_err(|_| StoreError::Invalid(format!("stored number {x} is out of range")))
            })
            .transpose()
    }

    fn bind_version(q: Query<Self>, v: u32) -> Query<Self> {
        q.bind(version_to_db(v))
    }

    fn get_version(row: &PgRow, i: usize) -> StoreResult<u32> {
        get(row, i).map(version_of_db)
    }

    fn bind_list(q: Query<Self>, values: &[&str]) -> Query<Self> {
        q.bind(values.to_vec())
    }

    fn one_of(column: &str, n: usize, _len: usize) -> String {
        // One array parameter: a list of hundreds of parameters can get a generic plan that
        // scans the whole table (each call then costs more as the cache grows).
        format!("{column} = ANY(${n})")
    }

    fn typed(n: usize, ty: &str) -> String {
        format!("${n}::{ty}")
    }

    fn email_is(column: &str, n: usize) -> String {
        format!("lower({column}) = lower(${n})")
    }

    fn written_since(table: &str) -> Option<String> {
        // The ids come from the write-time index first (a materialised CTE): ordered by id with a
        // limit, the planner would walk the primary key through every object of the connection
        // to find the few written since.
        Some(format!(
            "WITH w AS MATERIALIZED (
               SELECT stripe_id FROM {table}
               WHERE stripe_connection_id = $1 AND written_at >= $3 AND stripe_id > $4)
             SELECT o.stripe_id, o.version, o.data, o.customer_id FROM w
             JOIN {table} o ON o.stripe_connection_id = $1 AND o.stripe_id = w.stripe_id
             JOIN stripe_connections c ON c.id = o.stripe_connection_id
             WHERE c.user_id = $2
             ORDER BY o.stripe_id LIMIT $5"
        ))
    }

    fn read_by(table: &str, _column: &str) -> String {
        format!("{table} o")
    }
}

impl SqlStore<Postgres> {
    /// Opens the database at `url` (`postgres://` or `postgresql://`), runs the embedded
    /// migrations, and uses `keys` for the tokens it stores.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL this build cannot open; [`Error::Open`] when the server
    /// cannot be reached, the database is another application's, or is newer than this version.
    /// Nothing is written in either case.
    pub async fn connect(url: &str, keys: KeyRing) -> Result<Self, Error> {
        Self::connect_in_schema(url, None, keys).await
    }

    /// As [`SqlStore::connect`], with every table in `schema` (created when missing): several
    /// RevPilot databases, or parallel tests, on one server.
    ///
    /// # Errors
    /// As [`SqlStore::connect`]; a schema name must be letters, digits and `_`.
    pub async fn connect_in_schema(
        url: &str,
        schema: Option<&str>,
        keys: KeyRing,
    ) -> Result<Self, Error> {
        let shown = redact(url);
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(Error::InvalidUrl {
                url: shown,
                problem: "this store opens `postgres://` URLs".into(),
                source: None,
            });
        }
        let mut options = PgConnectOptions::from_str(url).map_err(|e| Error::InvalidUrl {
            url: shown.clone(),
            problem: e.to_string(),
            source: Some(e),
        })?;
        // `problem` repeats the driver's message: the error is often shown without its sources.
        let open = |problem: String, source: Option<sqlx::Error>| Error::Open {
            url: shown.clone(),
            problem,
            source,
        };
        let failed = |e: sqlx::Error| open(e.to_string(), Some(e));
        if let Some(schema) = schema {
            if schema.is_empty()
                || !schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(Error::InvalidUrl {
                    url: shown,
                    problem: format!("schema name {schema:?} must be letters, digits and _"),
                    source: None,
                });
            }
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
                .await
                .map_err(failed)?;
            sqlx::query(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}"
            )))
            .execute(&admin)
            .await
            .map_err(failed)?;
            admin.close().await;
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(failed)?;
        let foreign: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables t
             WHERE t.table_schema = current_schema() AND t.table_name = 'user_profiles'
               AND NOT EXISTS (SELECT 1 FROM information_schema.tables m
                               WHERE m.table_schema = current_schema() AND m.table_name = '_sqlx_migrations')",
        )
        .fetch_one(&pool)
        .await
        .map_err(failed)?;
        if foreign > 0 {
            return Err(open("it has RevPilot's tables but no migration history: another application's database?".into(), None));
        }
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| open(format!("migrations failed: {e}"), Some(e.into())))?;
        Ok(SqlStore::new(pool, keys))
    }
}
