//! A large account served by the example server as it runs by default (SQLite, the worker and
//! its scheduler in the process): the first `GET /api/metrics` over 24 months after a sync, and
//! the server's peak memory, measured from a second process.
//!
//! 1. Generates (once) a Stripe-shaped export of CUSTOMERS customers over 24 months under
//!    `target/bench-data/`, and seeds (once) a SQLite store with it: a user, a connection, and
//!    every object in the connection's cache (read from the file one batch at a time).
//! 2. Starts `target/release/revpilot-server` on that store; its scheduler queues the daily
//!    snapshot, which needs the same account as the first request.
//! 3. Times the first `/api/metrics` (nothing derived yet: rebuilt from the cache, then derived),
//!    a second one (served from the server's copy), how long after a sync that changed 1 % of
//!    the customers the answer reflects it (the derived account is updated with those customers
//!    only), and the first of a new server process (read from the derivation, as every load
//!    after a sync is: the worker updates the derivation when its sync ends); reads the server's
//!    peak RSS (`VmHWM`) and its RSS after each.
//!
//! `cargo build --release -p revpilot-server && cargo run --release -p revpilot-benches --bin account_load [-- CUSTOMERS]`
//! (default 100,000). Targets: the first answer within 10 s, the server's peak RSS at most 2 GiB.
//! With `REVPILOT_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test` the account is
//! stored in a schema of that PostgreSQL database instead, and the server runs on it.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use revpilot_core::ports::Store;
use revpilot_core::ports::{CachedObject, ConnectionId, ObjectKind, UserId};
use revpilot_server::auth::Jwt;
use revpilot_store::{KeyRing, PgStore, SqliteStore};
use revpilot_stripe::export::ExportError;
use revpilot_stripe::rebuild::stream::for_each_object;
use secrecy::SecretString;

const KEYS: &str = "bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const JWT_SECRET: &str = "a-bench-jwt-secret-of-32-bytes-or-more";
const MONTHS: u32 = 24;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn export_file(customers: usize) -> PathBuf {
    let dir = root().join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("export-{customers}x{MONTHS}.json"));
    if !path.exists() {
        let partial = path.with_extension("partial");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).unwrap());
        revpilot_stripe::synth::SynthExport {
            customers,
            months: MONTHS,
            seed: 1,
        }
        .write(&mut out)
        .unwrap();
        drop(out);
        std::fs::rename(&partial, &path).unwrap();
    }
    path
}

/// Where the account is stored: a SQLite file (the default), or a schema of the PostgreSQL
/// database at `REVPILOT_BENCH_POSTGRES_URL`.
enum Db {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
}

impl Db {
    fn new(customers: usize) -> Db {
        match std::env::var("REVPILOT_BENCH_POSTGRES_URL") {
            Ok(url) => Db::Postgres {
                url,
                schema: format!("bench_{customers}x{MONTHS}"),
            },
            Err(_) => {
                Db::Sqlite(root().join(format!("target/bench-data/store-{customers}x{MONTHS}.db")))
            }
        }
    }

    /// The server's `DATABASE_URL`.
    fn url(&self) -> String {
        match self {
            Db::Sqlite(path) => format!("sqlite://{}", path.display()),
            Db::Postgres { url, schema } => {
                format!("{url}?options=-c%20search_path%3D{schema}%2Cpublic")
            }
        }
    }

    /// Where the seeded user and connection are written down.
    fn ids(&self) -> PathBuf {
        match self {
            Db::Sqlite(path) => path.with_extension("ids"),
            Db::Postgres { schema, .. } => root().join(format!("target/bench-data/{schema}.ids")),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        let keys = KeyRing::parse(KEYS).unwrap();
        match self {
            Db::Sqlite(path) => Arc::new(
                SqliteStore::connect(path.to_str().unwrap(), keys)
                    .await
                    .unwrap(),
            ),
            Db::Postgres { url, schema } => Arc::new(
                PgStore::connect_in_schema(url, Some(schema), keys)
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Runs `sql` (in the right dialect) on the store.
    async fn exec(&self, sqlite: &str, postgres: &str) {
        let keys = KeyRing::parse(KEYS).unwrap();
        match self {
            Db::Sqlite(path) => {
                let store = SqliteStore::connect(path.to_str().unwrap(), keys)
                    .await
                    .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sqlite.to_owned()))
                    .execute(store.pool())
                    .await
                    .unwrap();
            }
            Db::Postgres { url, schema } => {
                let store = PgStore::connect_in_schema(url, Some(schema), keys)
                    .await
                    .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(postgres.to_owned()))
                    .execute(store.pool())
                    .await
                    .unwrap();
            }
        }
    }
}

/// The seeded store, the user and the connection.
async fn seed(customers: usize) -> (Db, UserId, ConnectionId) {
    let export = export_file(customers);
    let db = Db::new(customers);
    let ids = db.ids();
    if let Ok(text) = std::fs::read_to_string(&ids) {
        let (u, c) = text.trim().split_once(' ').unwrap();
        return (
            db,
            UserId(u.parse().unwrap()),
            ConnectionId(c.parse().unwrap()),
        );
    }
    match &db {
        Db::Sqlite(path) => {
            let _ = std::fs::remove_file(path);
        }
        Db::Postgres { schema, .. } => {
            db.exec("", &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await;
        }
    }
    let store = db.open().await;
    let (user, conn) = revpilot_benches::bench_connection(store.as_ref()).await;
    let now = Utc::now();
    // The file is split on a thread of its own; pages of objects go to the store as they come.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<CachedObject>>(4);
    let reading = std::thread::spawn(move || {
        #[derive(serde::Deserialize)]
        struct Id<'a> {
            #[serde(borrow)]
            id: std::borrow::Cow<'a, str>,
        }
        let mut page = Vec::new();
        let file = std::fs::File::open(&export).unwrap();
        for_each_object(file, |kind, json| {
            let Some(kind) = ObjectKind::parse(kind) else {
                return Ok(());
            };
            let id: Id<'_> =
                serde_json::from_slice(json).map_err(|e| ExportError::Shape(e.to_string()))?;
            page.push(revpilot_stripe::export::cached_object(
                kind,
                id.id.into_owned(),
                now,
                String::from_utf8_lossy(json).into_owned(),
            ));
            if page.len() == 5_000 {
                tx.blocking_send(std::mem::take(&mut page)).unwrap();
            }
            Ok(())
        })
        .unwrap();
        tx.blocking_send(page).unwrap();
    });
    let started = Instant::now();
    let mut stored = 0;
    while let Some(page) = rx.recv().await {
        stored += page.len();
        store.upsert_objects(conn, &page).await.unwrap();
    }
    reading.join().unwrap();
    store.set_last_synced(conn, now).await.unwrap();
    // As an account synced a day ago: its objects were written then, not within the minutes an
    // update reads back.
    for kind in ObjectKind::ALL {
        let table = format!("{}s_cache", kind.as_str());
        db.exec(
            &format!("UPDATE {table} SET written_at = written_at - 86400000000"),
            &format!("UPDATE {table} SET written_at = written_at - interval '1 day'"),
        )
        .await;
        // A day-old PostgreSQL table has been vacuumed and analysed since (the rows the update
        // above left dead would otherwise fill the write-time index).
        db.exec("SELECT 1", &format!("VACUUM ANALYZE {table}"))
            .await;
    }
    println!(
        "seeded {stored} objects in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(&ids, format!("{} {}", user.0, conn.0)).unwrap();
    (db, user, conn)
}

/// `VmHWM` and `VmRSS` of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 30)
}

/// Starts the server on the store `db`, and waits until it answers.
async fn start(binary: &Path, db: &Db) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server(
        Command::new(binary)
            .env("DATABASE_URL", db.url())
            .env("REVPILOT_BIND", format!("127.0.0.1:{port}"))
            .env("REVPILOT_ENCRYPTION_KEY", KEYS)
            .env("JWT_SECRET", JWT_SECRET)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(if std::env::var_os("RUST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (server, base)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let customers: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |c| c.parse().unwrap());
    // The job queue's migrations create extensions in the first schema of the server's search
    // path: made in `public` first, they stay usable by every other schema of the database.
    if let db @ Db::Postgres { .. } = Db::new(customers) {
        for extension in ["hstore", "pgcrypto"] {
            let sql = format!("CREATE EXTENSION IF NOT EXISTS {extension} SCHEMA public");
            db.exec("", &sql).await;
        }
    }
    let (db, user, conn) = seed(customers).await;
    // Nothing derived yet, as on the first start after an upgrade: the first request rebuilds.
    for table in ["derived_accounts", "derived_customers"] {
        let sql = format!("DELETE FROM {table}");
        db.exec(&sql, &sql).await;
    }
    // The changes an earlier run made a day old too: only this run's sync is this run's change.
    let day_ago = Utc::now() - chrono::TimeDelta::days(1);
    for kind in ObjectKind::ALL {
        let table = format!("{}s_cache", kind.as_str());
        db.exec(
            &format!(
                "UPDATE {table} SET written_at = written_at - 86400000000
                   WHERE stripe_connection_id = '{}' AND written_at > {}",
                conn.0,
                day_ago.timestamp_micros()
            ),
            &format!(
                "UPDATE {table} SET written_at = written_at - interval '1 day'
                   WHERE stripe_connection_id = '{}' AND written_at > '{}'",
                conn.0,
                day_ago.to_rfc3339()
            ),
        )
        .await;
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let binary = target.join("release/revpilot-server");
    assert!(
        binary.exists(),
        "build it first: cargo build --release -p revpilot-server"
    );
    let (server, base) = start(&binary, &db).await;
    let pid = server.0.id();
    let client = reqwest::Client::new();
    let (_, idle) = memory(pid);
    let token = Jwt::new(SecretString::from(JWT_SECRET), None)
        .unwrap()
        .issue(user, None, Utc::now().timestamp() + 3_600)
        .unwrap();
    let url = |base: &str| {
        format!(
            "{base}/api/metrics?connectionId={}&from=2023-01-01&to=2024-12-31&granularity=month",
            conn.0
        )
    };
    let (client, token, url) = (&client, &token, &url);
    let get = |base: String| async move {
        let started = Instant::now();
        let r = client
            .get(url(&base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let body: serde_json::Value = r.json().await.unwrap();
        let rows = body["rows"].as_array().map_or(0, Vec::len);
        (
            started.elapsed().as_secs_f64(),
            rows,
            body["rows"][rows.saturating_sub(1)]["mrr"].clone(),
        )
    };
    println!(
        "{customers} customers over {MONTHS} months; server RSS when ready {:.2} GiB",
        gib(idle)
    );
    let (first, rows, mrr_before) = get(base.clone()).await;
    let (peak, rss) = memory(pid);
    println!(
        "first /api/metrics:  {first:6.2} s ({rows} rows)   server peak RSS {:.2} GiB, RSS after {:.2} GiB",
        gib(peak),
        gib(rss)
    );
    let (second, ..) = get(base.clone()).await;
    println!("second /api/metrics: {second:6.3} s");

    // A sync that changed 1 % of the customers (their subscriptions canceled today): the next
    // requests see it once the server's connection row is re-read (`ROW_TTL`) and the derived
    // account is updated with those customers only.
    let store = db.open().await;
    // The first load answered before storing the derivation; the sync below comes after it.
    let stored = Instant::now();
    while store.derived_stamp(conn).await.unwrap().is_none() {
        assert!(stored.elapsed() < Duration::from_secs(300), "never derived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "derivation stored {:6.2} s after the second answer",
        stored.elapsed().as_secs_f64()
    );
    let now = Utc::now();
    // A different 1 % each run, canceled within the reported range.
    let from = format!("sub_{:07}", fastrand::usize(..customers * 98 / 100));
    let ended = chrono::TimeZone::with_ymd_and_hms(&Utc, 2024, 6, 1, 0, 0, 0)
        .unwrap()
        .timestamp()
        + fastrand::i64(0..86_400 * 90);
    // Active ones begun before the cancellation, from a random id on (wrapping around): one
    // that had already ended, or that begins later, may leave the last month's MRR as it was,
    // and the change never shows. Ids follow creation, so a late start finds few at first.
    let mut changed: Vec<CachedObject> = Vec::new();
    let (mut after, mut wrapped) = (Some(from.clone()), false);
    while changed.len() < customers / 100 {
        let page = store
            .objects_page(
                user,
                conn,
                ObjectKind::Subscription,
                after.as_deref(),
                2_000,
            )
            .await
            .unwrap();
        let full = page.len() == 2_000;
        after = page.last().map(|o| o.stripe_id.clone());
        for o in page {
            let mut v: serde_json::Value = serde_json::from_str(&o.data).unwrap();
            if changed.len() < customers / 100
                && v["status"] == "active"
                && v["created"].as_i64() < Some(ended)
            {
                v["status"] = "canceled".into();
                v["canceled_at"] = ended.into();
                v["ended_at"] = ended.into();
                changed.push(revpilot_stripe::export::cached_object(
                    o.kind,
                    o.stripe_id,
                    now,
                    v.to_string(),
                ));
            }
        }
        if !full {
            if wrapped {
                break;
            }
            (after, wrapped) = (None, true);
        }
    }
    assert!(
        !changed.is_empty(),
        "no active subscription begun before {ended}"
    );
    store.upsert_objects(conn, &changed).await.unwrap();
    store.set_last_synced(conn, Utc::now()).await.unwrap();
    let synced = Instant::now();
    let (update, reflected) = loop {
        let (took, _, mrr) = get(base.clone()).await;
        if mrr != mrr_before {
            break (took, synced.elapsed().as_secs_f64());
        }
        assert!(
            synced.elapsed() < Duration::from_secs(300),
            "the change never showed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (peak, rss) = memory(pid);
    println!(
        "after a sync changing {} customers: reflected {reflected:6.2} s after it ended (the updating request {update:6.2} s; connection rows are re-read after {:.1} s)   server peak RSS {:.2} GiB, RSS after {:.2} GiB",
        changed.len(),
        revpilot_stripe::accounts::ROW_TTL.as_secs_f64(),
        gib(peak),
        gib(rss)
    );
    drop(server);

    // A new server process on the same store: the account derived at that sync is read back.
    let (server, base) = start(&binary, &db).await;
    let pid = server.0.id();
    let (derived, rows, _) = get(base.clone()).await;
    let (peak, rss) = memory(pid);
    println!(
        "new server, derived: {derived:6.2} s ({rows} rows)   server peak RSS {:.2} GiB, RSS after {:.2} GiB",
        gib(peak),
        gib(rss)
    );
    drop(server);
}
