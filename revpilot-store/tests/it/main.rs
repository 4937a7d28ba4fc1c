//! Integration tests of `revpilot-store` against real SQLite database files.

// A failed unwrap in a test is a failed test, which is the point (helpers included).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use base64::Engine as _;
use chrono::{TimeZone, Utc};
use revpilot_core::ports::{
    CachedObject, ConnectionId, ConnectionStore, Limits, NewConnection, ObjectCache, ObjectKind,
    StoreError, Tier, Tokens, UserId, UserStore,
};
use revpilot_core::testing::conformance;
use revpilot_store::{Error, KeyError, KeyRing, SqliteStore};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{AssertSqlSafe, Row};
use tempfile::TempDir;
use uuid::Uuid;

#[cfg(feature = "postgres")]
mod postgres;

fn key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

pub(crate) fn keys() -> KeyRing {
    KeyRing::parse(&format!("k1:{}", key(7))).unwrap()
}

async fn fresh(dir: &TempDir) -> SqliteStore {
    let path = dir.path().join(format!("{}.db", Uuid::new_v4()));
    SqliteStore::connect(path.to_str().unwrap(), keys())
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_passes_the_conformance_suite() {
    let dir = TempDir::new().unwrap();
    conformance::run_all(|| fresh(&dir)).await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_new_database_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new().unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let url = format!("sqlite://{}", dir.path().join("new.db").display());
    let store = SqliteStore::connect(&url, keys()).await.unwrap();
    sqlx::query("CREATE TABLE t (x INTEGER)")
        .execute(store.pool())
        .await
        .unwrap();
    for name in ["new.db", "new.db-wal", "new.db-shm"] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    // An existing file keeps the mode its owner gave it.
    let shared = dir.path().join("shared.db");
    std::fs::write(&shared, b"").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
    let url = format!("sqlite://{}", shared.display());
    drop(SqliteStore::connect(&url, keys()).await.unwrap());
    assert_eq!(mode("shared.db"), 0o640);
    // A path that merely names memory is a file like any other.
    let url = format!("sqlite://{}", dir.path().join("memory.db").display());
    drop(SqliteStore::connect(&url, keys()).await.unwrap());
    assert_eq!(mode("memory.db"), 0o600);
    // In memory: no file.
    let memory = SqliteStore::connect("sqlite::memory:", keys()).await;
    assert!(memory.is_ok());
}

#[tokio::test]
async fn a_database_failure_keeps_the_drivers_error_as_its_source() {
    let dir = TempDir::new().unwrap();
    let store = fresh(&dir).await;
    store.pool().close().await;
    let failed = store.user(UserId(Uuid::new_v4())).await.unwrap_err();
    assert!(matches!(failed, StoreError::Backend(_)), "{failed:?}");
    let source = std::error::Error::source(&failed).expect("the driver's error");
    assert!(
        matches!(
            source.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolClosed)
        ),
        "{source:?}"
    );
}

async fn owner_with_connection(
    store: &SqliteStore,
    account: &str,
    token: &str,
) -> (UserId, ConnectionId) {
    let user = UserId(Uuid::new_v4());
    let now = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
    store
        .create_user(user, None, Tier::Starter, Limits::default(), now)
        .await
        .unwrap();
    let c = store
        .save_connection(
            NewConnection {
                user,
                stripe_account_id: account.into(),
                business_name: None,
                currency: None,
                tokens: Tokens {
                    access_token: SecretString::from(token.to_owned()),
                    refresh_token: None,
                },
            },
            now,
        )
        .await
        .unwrap();
    (user, c.id)
}

#[tokio::test]
async fn tokens_are_stored_only_encrypted_and_bound_to_their_connection() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tokens.db");
    let store = SqliteStore::connect(path.to_str().unwrap(), keys())
        .await
        .unwrap();
    let (alice, a) = owner_with_connection(&store, "acct_a", "sk_live_ALICE_SECRET").await;
    let (bob, b) = owner_with_connection(&store, "acct_b", "sk_live_BOB_SECRET").await;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(store.pool())
        .await
        .unwrap();
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(file.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("ALICE_SECRET") && !text.contains("BOB_SECRET"),
            "a token in clear on disk"
        );
    }

    // Swap the two ciphertexts: each now fails to decrypt, with a clear error.
    let pool = store.pool();
    let enc = |id: ConnectionId| async move {
        sqlx::query("SELECT access_token_enc FROM stripe_connections WHERE id = $1")
            .bind(id.0.to_string())
            .fetch_one(pool)
            .await
            .unwrap()
            .get::<String, _>(0)
    };
    let (ea, eb) = (enc(a).await, enc(b).await);
    for (id, data) in [(a, &eb), (b, &ea)] {
        sqlx::query("UPDATE stripe_connections SET access_token_enc = $1 WHERE id = $2")
            .bind(data)
            .bind(id.0.to_string())
            .execute(pool)
            .await
            .unwrap();
    }
    let err = store.tokens(alice, a).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Crypto(m) if m.contains("failed authentication")),
        "{err}"
    );
    assert!(store.tokens(bob, b).await.is_err());

    // An altered ciphertext fails too.
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(&ea)
        .unwrap();
    raw[15] ^= 0x40;
    sqlx::query("UPDATE stripe_connections SET access_token_enc = $1 WHERE id = $2")
        .bind(base64::engine::general_purpose::STANDARD.encode(raw))
        .bind(a.0.to_string())
        .execute(pool)
        .await
        .unwrap();
    assert!(matches!(
        store.tokens(alice, a).await,
        Err(StoreError::Crypto(_))
    ));
}

#[tokio::test]
async fn keys_rotate_and_everything_reencrypts() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("rotate.db");
    let path = path.to_str().unwrap();
    let old = KeyRing::parse(&format!("old:{}", key(1))).unwrap();
    let store = SqliteStore::connect(path, old).await.unwrap();
    let (user, id) = owner_with_connection(&store, "acct_r", "sk_rotate").await;
    drop(store);

    let both = KeyRing::parse(&format!("new:{},old:{}", key(2), key(1))).unwrap();
    let store = SqliteStore::connect(path, both).await.unwrap();
    assert_eq!(
        store
            .tokens(user, id)
            .await
            .unwrap()
            .unwrap()
            .access_token
            .expose_secret(),
        "sk_rotate"
    );
    assert_eq!(store.reencrypt_all().await.unwrap(), 1);
    assert_eq!(
        store.reencrypt_all().await.unwrap(),
        0,
        "already on the current key"
    );
    drop(store);

    let only_new = KeyRing::parse(&format!("new:{}", key(2))).unwrap();
    let store = SqliteStore::connect(path, only_new).await.unwrap();
    assert_eq!(
        store
            .tokens(user, id)
            .await
            .unwrap()
            .unwrap()
            .access_token
            .expose_secret(),
        "sk_rotate"
    );
    // Without the key a token was sealed with, the error names the key.
    drop(store);
    let wrong = KeyRing::parse(&format!("other:{}", key(3))).unwrap();
    let store = SqliteStore::connect(path, wrong).await.unwrap();
    let err = store.tokens(user, id).await.unwrap_err().to_string();
    assert!(err.contains("\"new\" is not configured"), "{err}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_writes_nothing() {
    let dir = TempDir::new().unwrap();

    assert!(matches!(KeyRing::parse(""), Err(KeyError::Missing)));

    let garbage = dir.path().join("garbage.db");
    std::fs::write(
        &garbage,
        b"this is not a database, just text long enough to look like a header......",
    )
    .unwrap();
    let before = std::fs::read(&garbage).unwrap();
    let err = SqliteStore::connect(garbage.to_str().unwrap(), keys())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(err.to_string().contains("not a database"), "{err}");
    assert_eq!(std::fs::read(&garbage).unwrap(), before, "nothing written");

    // Another application's database that happens to use our table names.
    let foreign = dir.path().join("foreign.db");
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&foreign)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    sqlx::query("CREATE TABLE user_profiles (id INTEGER PRIMARY KEY, name TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let err = SqliteStore::connect(foreign.to_str().unwrap(), keys())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("another application's database"),
        "{err}"
    );
    assert!(
        std::error::Error::source(&err).is_none(),
        "no driver error caused it: {err:?}"
    );

    let err = SqliteStore::connect("postgres://u:hunter2@127.0.0.1/db", keys())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    assert!(
        !err.to_string().contains("hunter2"),
        "passwords never appear in errors: {err}"
    );
    let err = SqliteStore::connect("/nonexistent-dir/revpilot.db", keys())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    // The driver's error is kept as the source, not only as text.
    let source = std::error::Error::source(&err).expect("the driver's error is the source");
    assert!(source.downcast_ref::<sqlx::Error>().is_some(), "{source:?}");
    let err = SqliteStore::connect("sqlite://x.db?mode=nonsense", keys())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    let source = std::error::Error::source(&err).expect("the driver's error is the source");
    assert!(source.downcast_ref::<sqlx::Error>().is_some(), "{source:?}");
}

#[tokio::test]
async fn a_database_of_an_older_version_migrates_forward() {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("old.db");
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let first = Migration::new(
        1,
        "init".into(),
        MigrationType::Simple,
        sqlx::SqlSafeStr::into_sql_str(include_str!("../../migrations/sqlite/0001_init.sql")),
        false,
    );
    Migrator::with_migrations(vec![first])
        .run(&pool)
        .await
        .unwrap();
    // Usage recorded by the old version: 4 insights on 2024-03-10.
    let user = Uuid::new_v4();
    let at = Utc
        .with_ymd_and_hms(2024, 3, 10, 12, 0, 0)
        .unwrap()
        .timestamp_micros();
    sqlx::query("INSERT INTO user_profiles (user_id, created_at, updated_at) VALUES ($1, 0, 0)")
        .bind(user.to_string())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO usage_events (id, user_id, event_type, amount, idempotency_key, status, created_at)
         VALUES ('e1', $1, 'ai_insight', 4, 'old-key', 'committed', $2)",
    )
    .bind(user.to_string())
    .bind(at)
    .execute(&pool)
    .await
    .unwrap();
    // Objects cached by the old version: their customer is read out of their JSON.
    let conn = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO stripe_connections (id, user_id, stripe_account_id, created_at, updated_at)
         VALUES ($1, $2, 'acct_old', 0, 0)",
    )
    .bind(conn.to_string())
    .bind(user.to_string())
    .execute(&pool)
    .await
    .unwrap();
    for (table, id, data) in [
        ("customers_cache", "cus_old", r#"{"id":"cus_old"}"#),
        (
            "subscriptions_cache",
            "sub_old",
            r#"{"id":"sub_old","customer":"cus_old"}"#,
        ),
        (
            "charges_cache",
            "ch_old",
            r#"{"id":"ch_old","customer":{"id":"cus_old"}}"#,
        ),
        (
            "charges_cache",
            "ch_guest",
            r#"{"id":"ch_guest","customer":null}"#,
        ),
    ] {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} (stripe_connection_id, stripe_id, version, data) VALUES ($1, $2, 0, $3)"
        )))
        .bind(conn.to_string())
        .bind(id)
        .bind(data)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;

    let store = SqliteStore::connect(path.to_str().unwrap(), keys())
        .await
        .unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    // The cache tables hold their rows by rowid now (the objects above are read back below).
    let (caches, without_rowid): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE sql LIKE '%WITHOUT ROWID%') FROM sqlite_master
         WHERE type = 'table' AND name GLOB '*_cache'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((caches, without_rowid), (8, 0));
    // The old usage is counted: with a limit of 5 in March, one more fits and a second does not.
    use revpilot_core::ports::{Meter, Period, Recorded, UsageRecord, UsageStore};
    let march = Period {
        start: Utc.with_ymd_and_hms(2024, 3, 1, 0, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2024, 4, 1, 0, 0, 0).unwrap(),
    };
    let record = |key: &str| UsageRecord {
        user: UserId(user),
        meter: Meter::AiInsight,
        connection: None,
        amount: 1,
        idempotency_key: key.into(),
        metadata: serde_json::json!({}),
        at: Utc.with_ymd_and_hms(2024, 3, 20, 0, 0, 0).unwrap(),
    };
    assert_eq!(
        store
            .record(&record("new-1"), march, Some(5))
            .await
            .unwrap(),
        Recorded::New
    );
    assert!(matches!(
        store.record(&record("new-2"), march, Some(5)).await,
        Err(StoreError::LimitExceeded { used: 5, .. })
    ));
    assert_eq!(
        store
            .record(&record("old-key"), march, Some(5))
            .await
            .unwrap(),
        Recorded::Duplicate
    );
    let index: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE name = 'usage_events_connection'")
            .fetch_optional(store.pool())
            .await
            .unwrap();
    assert!(index.is_some());
    let store = &store;
    let of = |kind, customer: &'static str| async move {
        store
            .objects_of_customers(
                UserId(user),
                ConnectionId(conn),
                kind,
                &[customer.to_owned()],
            )
            .await
    };
    let ids = |objects: Vec<CachedObject>| -> Vec<String> {
        objects.into_iter().map(|o| o.stripe_id).collect()
    };
    assert_eq!(
        ids(of(ObjectKind::Customer, "cus_old").await.unwrap()),
        ["cus_old"]
    );
    assert_eq!(
        ids(of(ObjectKind::Subscription, "cus_old").await.unwrap()),
        ["sub_old"]
    );
    assert_eq!(
        ids(of(ObjectKind::Charge, "cus_old").await.unwrap()),
        ["ch_old"]
    );
    assert_eq!(ids(of(ObjectKind::Charge, "").await.unwrap()), ["ch_guest"]);
}

/// Expired OAuth states go as new ones are stored, though no callback ever came for them.
#[tokio::test]
async fn expired_oauth_states_are_deleted_without_their_callbacks() {
    use revpilot_core::ports::OAuthStateStore;
    let dir = TempDir::new().unwrap();
    let store = fresh(&dir).await;
    let (user, _) = owner_with_connection(&store, "acct_states", "sk_states").await;
    let gone = Utc::now() - chrono::Duration::minutes(1);
    for n in 0..1_000 {
        store
            .put_state(&format!("old-{n}"), user, gone)
            .await
            .unwrap();
    }
    store
        .put_state("fresh", user, Utc::now() + chrono::Duration::minutes(10))
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM oauth_states")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(left, 1, "only the state that can still be used is kept");
}

const CRASH_ENV: &str = "REVPILOT_CRASH_CHILD_DB";
const CRASH_BATCH: usize = 2_000;

/// The child side of the crash test: bulk-upserts batches forever, announcing each commit.
#[tokio::test]
async fn crash_child() {
    let Ok(path) = std::env::var(CRASH_ENV) else {
        return; // Only does something when the crash test starts it as a child process.
    };
    let store = SqliteStore::connect(&path, keys()).await.unwrap();
    let (_, conn) = owner_with_connection(&store, "acct_crash", "sk_crash").await;
    println!("connection {}", conn.0);
    for batch in 0.. {
        let objects: Vec<CachedObject> = (0..CRASH_BATCH)
            .map(|i| CachedObject {
                kind: ObjectKind::Subscription,
                stripe_id: format!("sub_{batch:05}_{i:05}"),
                version: Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap(),
                data: format!(r#"{{"batch":{batch},"i":{i},"pad":"{}"}}"#, "x".repeat(200)),
                customer: None,
            })
            .collect();
        store.upsert_objects(conn, &objects).await.unwrap();
        println!("committed {batch}");
    }
}

/// A child killed with SIGKILL in the middle of bulk upserts leaves the database consistent, with
/// every batch it reported committed present, whole.
#[tokio::test]
async fn a_crash_mid_bulk_upsert_loses_no_committed_batch() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("crash.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut conn = None;
    let mut committed = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        // The test harness prints its own words on the same line as the first message.
        if let Some((_, id)) = line.split_once("connection ") {
            conn = Some(ConnectionId(Uuid::parse_str(id.trim()).unwrap()));
        }
        if let Some((_, n)) = line.split_once("committed ") {
            committed = n.trim().parse::<usize>().unwrap() + 1;
            if committed == 4 {
                break; // The fifth batch is being written now.
            }
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix.
    child.wait().unwrap();
    assert_eq!(committed, 4);

    let store = SqliteStore::connect(path.to_str().unwrap(), keys())
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");
    let conn = conn.unwrap();
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT stripe_id FROM subscriptions_cache WHERE stripe_connection_id = $1",
    )
    .bind(conn.0.to_string())
    .fetch_all(store.pool())
    .await
    .unwrap();
    // Every reported batch whole, and any later batch either whole or absent (one transaction).
    assert_eq!(
        stored.len() % CRASH_BATCH,
        0,
        "a partial batch survived: {}",
        stored.len()
    );
    assert!(
        stored.len() >= committed * CRASH_BATCH,
        "lost a committed batch: {}",
        stored.len()
    );
    for batch in 0..committed {
        for i in [0, CRASH_BATCH / 2, CRASH_BATCH - 1] {
            assert!(stored.contains(&format!("sub_{batch:05}_{i:05}")));
        }
    }
}
