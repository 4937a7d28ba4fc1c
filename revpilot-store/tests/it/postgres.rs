//! The PostgreSQL half: the conformance suite and the guarantees across several pools (as
//! several servers would be). Runs whenever `REVPILOT_TEST_POSTGRES_URL` is set (CI always sets
//! it); each store lives in its own schema, so tests run in parallel.

use chrono::{TimeZone, Utc};
use futures::future::join_all;
use revpilot_core::ports::{
    Limits, Meter, Period, Recorded, StoreError, Tier, UsageRecord, UsageStore, UserId, UserStore,
};
use revpilot_core::testing::conformance;
use revpilot_store::{Error, PgStore};
use uuid::Uuid;

use crate::keys;

fn url() -> Option<String> {
    let url = std::env::var("REVPILOT_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!(
            "skipped: REVPILOT_TEST_POSTGRES_URL is not set, so the PostgreSQL tests did not run"
        );
    }
    url
}

fn schema() -> String {
    format!("t_{}", Uuid::new_v4().simple())
}

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    let Some(url) = url() else { return };
    let created = std::sync::Mutex::new(Vec::new());
    conformance::run_all(|| async {
        let name = schema();
        created.lock().unwrap().push(name.clone());
        PgStore::connect_in_schema(&url, Some(&name), keys())
            .await
            .unwrap()
    })
    .await;
    drop_schemas(&url, &created.into_inner().unwrap()).await;
}

/// Removes the schemas a test made (only after it passed: a failure leaves them to look at).
async fn drop_schemas(url: &str, names: &[String]) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    for name in names {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn usage_limit_holds_across_two_servers() {
    let Some(url) = url() else { return };
    let schema = schema();
    let a = PgStore::connect_in_schema(&url, Some(&schema), keys())
        .await
        .unwrap();
    let b = PgStore::connect_in_schema(&url, Some(&schema), keys())
        .await
        .unwrap();
    let user = UserId(Uuid::new_v4());
    let t = Utc.with_ymd_and_hms(2024, 3, 5, 0, 0, 0).unwrap();
    a.create_user(user, None, Tier::Starter, Limits::default(), t)
        .await
        .unwrap();
    let period = Period {
        start: Utc.with_ymd_and_hms(2024, 3, 1, 0, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2024, 4, 1, 0, 0, 0).unwrap(),
    };
    let records: Vec<UsageRecord> = (0..50)
        .map(|i| UsageRecord {
            user,
            meter: Meter::AiInsight,
            connection: None,
            amount: 1,
            idempotency_key: format!("insight-{i}"),
            metadata: serde_json::json!({}),
            at: t,
        })
        .collect();
    let results = join_all(records.iter().enumerate().map(|(i, r)| {
        let store = if i % 2 == 0 { &a } else { &b };
        store.record(r, period, Some(10))
    }))
    .await;
    let ok = results
        .iter()
        .filter(|r| matches!(r, Ok(Recorded::New)))
        .count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::LimitExceeded { .. })))
        .count();
    assert_eq!((ok, refused), (10, 40));
    assert_eq!(b.used(user, Meter::AiInsight, period).await.unwrap(), 10);
    drop_schemas(&url, &[schema]).await;
}

/// Two users connecting one new Stripe account at the same moment, on two servers: no row exists
/// yet for `FOR UPDATE` to lock, so both insert; the one the unique account id refuses is told
/// the account is another user's (a `Conflict`), never a database error.
#[tokio::test]
async fn one_new_account_connected_by_two_users_at_once_is_a_conflict_for_one() {
    use revpilot_core::ports::{ConnectionStore, NewConnection, Tokens};
    let Some(url) = url() else { return };
    let schema = schema();
    let a = PgStore::connect_in_schema(&url, Some(&schema), keys())
        .await
        .unwrap();
    let b = PgStore::connect_in_schema(&url, Some(&schema), keys())
        .await
        .unwrap();
    let t = Utc.with_ymd_and_hms(2024, 3, 5, 0, 0, 0).unwrap();
    let (u1, u2) = (UserId(Uuid::new_v4()), UserId(Uuid::new_v4()));
    for u in [u1, u2] {
        a.create_user(u, None, Tier::Starter, Limits::default(), t)
            .await
            .unwrap();
    }
    let new = |user, account: &str| NewConnection {
        user,
        stripe_account_id: account.to_owned(),
        business_name: None,
        currency: None,
        tokens: Tokens {
            access_token: "sk_test_x".to_owned().into(),
            refresh_token: None,
        },
    };
    for round in 0..20 {
        let account = format!("acct_race{round}");
        let (x, y) = futures::join!(
            a.save_connection(new(u1, &account), t),
            b.save_connection(new(u2, &account), t)
        );
        let conflicts = [&x, &y]
            .iter()
            .filter(|r| matches!(r, Err(StoreError::Conflict(_))))
            .count();
        assert!(
            x.is_ok() != y.is_ok() && conflicts == 1,
            "round {round}: {x:?} / {y:?}"
        );
    }
    drop_schemas(&url, &[schema]).await;
}

#[tokio::test]
async fn bad_postgres_input_gets_clear_errors() {
    let Some(url) = url() else { return };
    let err = PgStore::connect_in_schema(&url, Some("bad-name; DROP"), keys())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    let err = PgStore::connect("postgres://postgres:hunter2@127.0.0.1:1/none", keys())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    let source = std::error::Error::source(&err).expect("the driver's error is the source");
    assert!(source.downcast_ref::<sqlx::Error>().is_some(), "{source:?}");
    let err = PgStore::connect("sqlite://x.db", keys()).await.unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
}
