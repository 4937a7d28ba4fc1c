//! SQLite: ids as text, instants as microseconds since the epoch, money as decimal text, dates as
//! `YYYY-MM-DD`. A write takes the database's single write lock before it reads (`BEGIN
//! IMMEDIATE`), so concurrent writers queue instead of deciding on stale data: a store's own
//! writers in the process, in turn ([`SqlStore::write`](super::SqlStore)), other processes up to
//! the busy timeout.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use revpilot_core::ports::{StoreError, StoreResult};
use rust_decimal::Decimal;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Decode, Row, Type};
use uuid::Uuid;

use super::{Backend, Dialect, Fut, Query, SqlStore, sealed};
use crate::crypto::KeyRing;
use crate::{Error, redact};

/// The migrations, embedded from `migrations/sqlite/` (`NNNN_description.sql`): a database
/// created by an older version migrates forward on connect.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite [`Dialect`]: [`SqliteStore`](crate::SqliteStore) is `SqlStore<Sqlite>`.
#[derive(Clone, Copy, Debug)]
pub struct Sqlite;

impl sealed::Sealed for Sqlite {}

impl Backend for Sqlite {
    type Db = sqlx::Sqlite;
}

super::plain_types!(Sqlite);

fn get<T>(row: &SqliteRow, i: usize) -> StoreResult<T>
where
    T: for<'r> Decode<'r, sqlx::Sqlite> + Type<sqlx::Sqlite>,
{
    row.try_get(i).map_err(super::backend)
}

impl Dialect for Sqlite {
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const ONE_WRITER: bool = true;
    const FOR_UPDATE: &'static str = "";

    fn all(c: &mut SqliteConnection, q: Query<Self>) -> Fut<'_, sqlx::Result<Vec<SqliteRow>>> {
        Box::pin(q.fetch_all(c))
    }

    fn optional(
        c: &mut SqliteConnection,
        q: Query<Self>,
    ) -> Fut<'_, sqlx::Result<Option<SqliteRow>>> {
        Box::pin(q.fetch_optional(c))
    }

    fn run(c: &mut SqliteConnection, q: Query<Self>) -> Fut<'_, sqlx::Result<u64>> {
        Box::pin(async move { Ok(q.execute(c).await?.rows_affected()) })
    }

    fn bind_id(q: Query<Self>, v: Option<Uuid>) -> Query<Self> {
        q.bind(v.map(|v| v.to_string()))
    }

    fn get_id(row: &SqliteRow, i: usize) -> StoreResult<Option<Uuid>> {
        get::<Option<String>>(row, i)?
            .map(|s| {
                Uuid::parse_str(&s)
                    .map_err(|_| StoreError::Invalid(format!("stored id {s:?} is not a UUID")))
            })
            .transpose()
    }

    fn bind_at(q: Query<Self>, v: Option<DateTime<Utc>>) -> Query<Self> {
        q.bind(v.map(|t| t.timestamp_micros()))
    }

    fn get_at(row: &SqliteRow, i: usize) -> StoreResult<Option<DateTime<Utc>>> {
        get::<Option<i64>>(row, i)?
            .map(|v| {
                DateTime::from_timestamp_micros(v).ok_or_else(|| {
                    StoreError::Invalid(format!("stored instant {v} is out of range"))
                })
            })
            .transpose()
    }

    fn bind_money(q: Query<Self>, v: Option<Decimal>) -> Query<Self> {
        q.bind(v.map(|d| d.to_string()))
    }

    fn get_money(row: &SqliteRow, i: usize) -> StoreResult<Option<Decimal>> {
        get::<Option<String>>(row, i)?
            .map(|s| {
                Decimal::from_str(&s).map_err(|_| {
                    StoreError::Invalid(format!("stored amount {s:?} is not a decimal"))
                })
            })
            .transpose()
    }

    fn bind_date(q: Query<Self>, v: NaiveDate) -> Query<Self> {
        q.bind(v.to_string())
    }

    fn get_date(row: &SqliteRow, i: usize) -> StoreResult<NaiveDate> {
        let v: String = get(row, i)?;
        NaiveDate::parse_from_str(&v, "%Y-%m-%d")
            .map_err(|_| StoreError::Invalid(format!("stored date {v:?}")))
    }

    fn bind_int(q: Query<Self>, v: Option<u32>) -> StoreResult<Query<Self>> {
        Ok(q.bind(v.map(i64::from)))
    }

    fn get_int(row: &SqliteRow, i: usize) -> StoreResult<Option<u32>> {
        get::<Option<i64>>(row, i)?
            .map(|x| {
                u32::try_from(x)
                    .map_err(|_| StoreError::Invalid(format!("stored number {x} is out of range")))
            })
            .transpose()
    }

    fn bind_version(q: Query<Self>, v: u32) -> Query<Self> {
        q.bind(i64::from(v))
    }

    fn get_version(row: &SqliteRow, i: usize) -> StoreResult<u32> {
        let v: i64 = get(row, i)?;
        u32::try_from(v).map_err(|_| StoreError::Invalid(format!("derived version {v}")))
    }

    fn bind_list(mut q: Query<Self>, values: &[&str]) -> Query<Self> {
        for v in values {
            q = q.bind(v.to_string());
        }
        q
    }

    fn one_of(column: &str, n: usize, len: usize) -> String {
        let params: Vec<String> = (n..n + len).map(|i| format!("${i}")).collect();
        format!("{column} IN ({})", params.join(", "))
    }

    fn typed(n: usize, _ty: &str) -> String {
        format!("${n}")
    }

    fn email_is(column: &str, n: usize) -> String {
        // The column is `COLLATE NOCASE`.
        format!("{column} = ${n}")
    }

    fn statement(text: String) -> String {
        anonymous(text)
    }

    fn written_since(_table: &str) -> Option<String> {
        None
    }

    fn read_by(table: &str, column: &str) -> String {
        match column {
            // The planner, without statistics, would walk the primary key for a long `IN` list.
            "customer_id" => format!("{table} o INDEXED BY {table}_customer"),
            // The primary key would walk every object of the connection to find the few
            // written since.
            "written_at" => format!("{table} o INDEXED BY {table}_written"),
            _ => format!("{table} o"),
        }
    }
}

/// `text` with its parameters `$1, $2, …, $n` written `?` when each appears once, in order.
///
/// SQLite finds a numbered parameter's name by walking a list of all of them, and sqlx asks for
/// every parameter's name on every execution: with the thousands of parameters of a bulk write
/// that is quadratic, and it doubled the time of a 100,000-row cache upsert. Anonymous `?`
/// parameters have no name to look up. A statement that uses a parameter twice, or out of
/// order, keeps its numbers.
fn anonymous(text: String) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut expected, mut last) = (1usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let digits = bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            if digits > 0 {
                let n: usize = text[i + 1..i + 1 + digits].parse().unwrap_or(0);
                if n != expected {
                    return text;
                }
                out.push_str(&text[last..i]);
                out.push('?');
                expected += 1;
                i += 1 + digits;
                last = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&text[last..]);
    out
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

impl SqlStore<Sqlite> {
    /// Opens (creating if missing, readable by its owner only) the database at `url`
    /// (`sqlite://path`, `sqlite:path` or a plain path), runs the embedded migrations, and uses
    /// `keys` for the tokens it stores.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL this build cannot open; [`Error::Open`] when the file is
    /// not a database, is another application's database, or is newer than this version. Nothing
    /// is written in either case.
    pub async fn connect(url: &str, keys: KeyRing) -> Result<Self, Error> {
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
            .busy_timeout(Duration::from_secs(10))
            // A checkpoint every 10,000 WAL pages (about 40 MiB) instead of 1,000: a
            // 20,000-customer backfill made 3,110 `fsync` calls with 1,000 and 498 with 10,000,
            // and ran 4-18 % faster in two alternated pairs of runs.
            .pragma("wal_autocheckpoint", "10000")
            // Statement journals in memory: a multi-row upsert keeps the prior image of every
            // page it changes, and past 64 KiB SQLite spilled them to a temporary file. That
            // was a third of a 20,000-customer backfill's `pwrite` calls (3.23 million; 2.27
            // million in memory, `sync_backfill unlimited` under `perf stat`).
            .pragma("temp_store", "memory")
            // A query's rows run up to 2,000 ahead of the task reading them (sqlx's default is
            // 50): the connection's thread then hands rows over in runs instead of waking the
            // reader for nearly every one. A 100,000-customer account's first load (1.6 million
            // cached objects read in pages of 2,000) took 18.8-19.1 s with 50 and 12.7-16.5 s
            // with 2,000 (`account_load 100000`, eight runs).
            .row_buffer_size(2_000);
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
        Ok(SqlStore::new(pool, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::anonymous;
    use crate::{KeyRing, SqliteStore};

    /// The process's writers, transactions and one-statement writes alike, wait for their turn
    /// outside SQLite. Queued in its busy handler instead, each holds a connection and polls,
    /// and writers that begin the moment another commits leave its checkpoint no gap to finish
    /// in: a 20,000-customer backfill's log then grew to 334 MB (and up to 2,833 `fsync` calls)
    /// instead of staying near the 40 MB checkpoint.
    #[tokio::test]
    async fn writers_of_one_store_take_turns_outside_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turns.db");
        let keys = KeyRing::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let store = SqliteStore::connect(path.to_str().unwrap(), keys)
            .await
            .unwrap();
        let first = store.write().await.unwrap();
        let mut waiting: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.write().await.unwrap().commit().await })
            })
            .collect();
        // A one-statement write queues with them.
        let one = store.clone();
        waiting.push(tokio::spawn(async move {
            let mut c = one.write_conn().await.unwrap();
            sqlx::query("DELETE FROM leases WHERE key = 'none'")
                .execute(&mut **c)
                .await
                .map(drop)
        }));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let pool = store.pool();
        let in_use = pool.size() as usize - pool.num_idle();
        assert_eq!(
            in_use, 1,
            "only the writer whose turn it is holds a connection"
        );
        assert!(waiting.iter().all(|w| !w.is_finished()));
        first.commit().await.unwrap();
        for w in waiting {
            w.await.unwrap().unwrap();
        }
    }

    #[test]
    fn parameters_in_order_become_anonymous_and_others_keep_their_numbers() {
        let s = |t: &str| anonymous(t.to_owned());
        assert_eq!(
            s("INSERT INTO t VALUES ($1, $2), ($3, $4)"),
            "INSERT INTO t VALUES (?, ?), (?, ?)"
        );
        assert_eq!(
            s("a = $1 AND b IN ($2, $3, $10)"),
            "a = $1 AND b IN ($2, $3, $10)"
        );
        assert_eq!(s("a = $1 OR b = $1"), "a = $1 OR b = $1");
        assert_eq!(s("a = $2 AND b = $1"), "a = $2 AND b = $1");
        assert_eq!(s("json '$.customer' = $1"), "json '$.customer' = ?");
        assert_eq!(s("no parameters"), "no parameters");
        assert_eq!(s("x = $1$"), "x = ?$");
    }
}
