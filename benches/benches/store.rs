//! Run with: `cargo bench -p revpilot-benches --bench store`
//!
//! The store's targets: bulk upsert of 100,000 cached subscriptions at >= 20,000 rows/s on SQLite
//! and PostgreSQL, and a usage limit check-and-record under 1 ms median on SQLite. Each is
//! measured against a baseline in the same run: one `SELECT 1` round trip on the same pool.
//! PostgreSQL is measured when `REVPILOT_TEST_POSTGRES_URL` is set.

use std::hint::black_box;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use revpilot_core::ports::{
    CachedObject, ConnectionId, ConnectionStore, Limits, Meter, NewConnection, ObjectCache,
    ObjectKind, Period, Tier, Tokens, UsageRecord, UsageStore, UserId, UserStore,
};
use revpilot_store::{KeyRing, PgStore, SqliteStore};
use secrecy::SecretString;
use uuid::Uuid;

const ROWS: usize = 100_000;
/// Objects per upsert call (one transaction each), as a sync writes a few pages at a time.
const PER_CALL: usize = 5_000;

fn keys() -> KeyRing {
    // A fixed test key: benchmarks store no real secret.
    KeyRing::parse("bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").expect("valid key")
}

async fn connection<S: UserStore + ConnectionStore>(store: &S) -> (UserId, ConnectionId) {
    let user = UserId(Uuid::new_v4());
    let now = Utc
        .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .single()
        .expect("valid");
    store
        .create_user(user, None, Tier::Business, Limits::default(), now)
        .await
        .expect("user");
    let c = store
        .save_connection(
            NewConnection {
                user,
                stripe_account_id: format!("acct_{}", Uuid::new_v4().simple()),
                business_name: None,
                currency: None,
                tokens: Tokens {
                    access_token: SecretString::from("sk_bench".to_owned()),
                    refresh_token: None,
                },
            },
            now,
        )
        .await
        .expect("connection");
    (user, c.id)
}

fn subscriptions() -> Vec<CachedObject> {
    let version = Utc
        .with_ymd_and_hms(2024, 1, 2, 0, 0, 0)
        .single()
        .expect("valid");
    (0..ROWS)
        .map(|i| CachedObject {
            kind: ObjectKind::Subscription,
            stripe_id: format!("sub_{i:08}"),
            version,
            // About the size of a real subscription's JSON.
            data: format!(
                r#"{{"id":"sub_{i:08}","object":"subscription","customer":"cus_{i:08}","status":"active","items":{{"data":[{{"price":{{"id":"price_pro","unit_amount":2900,"recurring":{{"interval":"month"}}}},"quantity":{}}}]}},"metadata":{{}},"pad":"{}"}}"#,
                i % 20 + 1,
                "x".repeat(400)
            ),
            customer: Some(format!("cus_{i:08}")),
        })
        .collect()
}

fn bench_store<S>(c: &mut Criterion, name: &str, rt: &tokio::runtime::Runtime, store: &S)
where
    S: UserStore + ConnectionStore + ObjectCache + UsageStore,
{
    let objects = subscriptions();
    let mut group = c.benchmark_group(format!("store_{name}"));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    group.bench_function("baseline_select_1", |b| {
        b.iter(|| {
            rt.block_on(async { black_box(store.user(UserId(Uuid::nil())).await.expect("query")) })
        })
    });
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("bulk_upsert_100k_subscriptions", |b| {
        b.iter_batched(
            || rt.block_on(connection(store)).1,
            |conn| {
                rt.block_on(async {
                    for chunk in objects.chunks(PER_CALL) {
                        store.upsert_objects(conn, chunk).await.expect("upsert");
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn bench_usage<S: UserStore + ConnectionStore + UsageStore>(
    c: &mut Criterion,
    name: &str,
    rt: &tokio::runtime::Runtime,
    store: &S,
) {
    let (user, _) = rt.block_on(connection(store));
    let period = Period {
        start: Utc
            .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
            .single()
            .expect("valid"),
        end: Utc
            .with_ymd_and_hms(2024, 2, 1, 0, 0, 0)
            .single()
            .expect("valid"),
    };
    let at = Utc
        .with_ymd_and_hms(2024, 1, 15, 0, 0, 0)
        .single()
        .expect("valid");
    let mut n = 0u64;
    let mut group = c.benchmark_group(format!("store_{name}"));
    group.sample_size(50);
    group.bench_function("usage_check_and_record", |b| {
        b.iter(|| {
            n += 1;
            let record = UsageRecord {
                user,
                meter: Meter::TransactionVolume,
                connection: None,
                amount: 1,
                idempotency_key: format!("ch_{n}"),
                metadata: serde_json::Value::Null,
                at,
            };
            rt.block_on(async {
                black_box(
                    store
                        .record(&record, period, Some(u64::MAX / 2))
                        .await
                        .expect("record"),
                )
            })
        })
    });
    group.finish();
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.db");
    let sqlite = rt
        .block_on(SqliteStore::connect(
            path.to_str().expect("utf-8 path"),
            keys(),
        ))
        .expect("sqlite");
    bench_store(c, "sqlite", &rt, &sqlite);
    bench_usage(c, "sqlite", &rt, &sqlite);
    match std::env::var("REVPILOT_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => {
            let schema = format!("bench_{}", Uuid::new_v4().simple());
            let pg = rt
                .block_on(PgStore::connect_in_schema(&url, Some(&schema), keys()))
                .expect("postgres");
            bench_store(c, "postgres", &rt, &pg);
            bench_usage(c, "postgres", &rt, &pg);
            rt.block_on(async {
                let _ = sqlx_drop(&url, &schema).await;
            });
        }
        _ => eprintln!("skipped: REVPILOT_TEST_POSTGRES_URL is not set, PostgreSQL not measured"),
    }
}

async fn sqlx_drop(url: &str, schema: &str) -> Result<(), sqlx::Error> {
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pool)
    .await?;
    Ok(())
}

criterion_group!(benches, store);
criterion_main!(benches);
