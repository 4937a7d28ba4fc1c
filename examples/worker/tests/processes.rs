//! Two `revpilot-server` and two `revpilot-worker` processes on one PostgreSQL database: 20
//! connections, a cron trigger through each server, and every connection synced exactly once
//! per trigger, never twice at once, by both workers, with no job lost or run twice; the
//! workers' schedulers push each day's jobs once between them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use revpilot_core::ports::{
    ConnectionStore, Limits, NewConnection, Tier, Tokens, UserId, UserStore,
};
use revpilot_store::{KeyRing, PgStore};
use revpilot_worker::Queue;
use secrecy::SecretString;
use uuid::Uuid;

const CRON: &str = "cron-secret-of-the-process-test-0123456789";
const CONNECTIONS: usize = 20;

mod common;

use common::{KEY, Processes, free_port, server_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_and_two_workers_sync_each_connection_once_per_trigger() {
    let Ok(url) = std::env::var("REVPILOT_TEST_POSTGRES_URL") else {
        eprintln!("skipped: REVPILOT_TEST_POSTGRES_URL is not set");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let schema = format!("p_{}", Uuid::new_v4().simple());
    let queue = format!("processes-{}", Uuid::new_v4().simple());
    // The queue's schema first, on a plain pool; then the store in its own schema, holding 20
    // connections.
    let plain = sqlx::PgPool::connect(&url).await.unwrap();
    Queue::postgres(&plain, &queue).await.unwrap();
    let store = PgStore::connect_in_schema(&url, Some(&schema), KeyRing::parse(KEY).unwrap())
        .await
        .unwrap();
    let mut connections = Vec::new();
    for i in 0..CONNECTIONS {
        let user = UserId(Uuid::new_v4());
        store
            .create_user(user, None, Tier::Starter, Limits::default(), Utc::now())
            .await
            .unwrap();
        let c = store
            .save_connection(
                NewConnection {
                    user,
                    stripe_account_id: format!("acct_{i}"),
                    business_name: None,
                    currency: Some("usd".into()),
                    tokens: Tokens {
                        access_token: SecretString::from(format!("sk_token_{i}")),
                        refresh_token: None,
                    },
                },
                Utc::now(),
            )
            .await
            .unwrap();
        connections.push(c.id.0);
    }
    let fake = common::stripe(5).await;

    let database_url = format!("{url}?options=-c%20search_path%3D{schema}%2Cpublic");
    let env = |c: &mut Command| {
        c.env("DATABASE_URL", &database_url)
            .env("REVPILOT_ENCRYPTION_KEY", KEY)
            .env("STRIPE_API_BASE", fake.uri())
            .env("REVPILOT_QUEUE", &queue)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
    };
    let mut children = Processes(Vec::new());
    let ports = [free_port(), free_port()];
    for port in ports {
        let mut c = Command::new(server_binary());
        env(&mut c);
        c.args(["--bind", &format!("127.0.0.1:{port}"), "--without-worker"])
            .env("CRON_SECRET", CRON);
        children.0.push(c.spawn().unwrap());
    }
    for name in ["worker-a", "worker-b"] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_revpilot-worker"));
        env(&mut c);
        c.env("REVPILOT_WORKER_NAME", name);
        children.0.push(c.spawn().unwrap());
    }
    let http = reqwest::Client::new();
    for port in ports {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "server on {port} did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One trigger through each server.
    for port in ports {
        let res = http
            .post(format!("http://127.0.0.1:{port}/api/stripe/sync"))
            .bearer_auth(CRON)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["queued"], CONNECTIONS, "{body}");
    }

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await
        .unwrap();
    type Run = (Uuid, DateTime<Utc>, Option<DateTime<Utc>>, String);
    let runs = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, Run>(
            "SELECT stripe_connection_id, started_at, finished_at, status FROM sync_runs",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = runs(pool.clone()).await;
        if all.len() >= 2 * CONNECTIONS && all.iter().all(|r| r.2.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} syncs finished",
            all.iter().filter(|r| r.2.is_some()).count(),
            2 * CONNECTIONS
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing more runs: no job was duplicated.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = runs(pool.clone()).await;
    assert_eq!(all.len(), 2 * CONNECTIONS);
    type Span = (DateTime<Utc>, DateTime<Utc>);
    let mut by_connection: BTreeMap<Uuid, Vec<Span>> = BTreeMap::new();
    for (c, started, finished, status) in &all {
        assert_eq!(status, "succeeded");
        by_connection
            .entry(*c)
            .or_default()
            .push((*started, finished.unwrap()));
    }
    assert_eq!(by_connection.len(), CONNECTIONS);
    for (c, mut spans) in by_connection {
        assert!(connections.contains(&c));
        assert_eq!(spans.len(), 2, "connection {c}: one sync per trigger");
        spans.sort();
        assert!(
            spans[0].1 <= spans[1].0,
            "connection {c} was synced twice at once: {spans:?}"
        );
    }
    // Every job is done, and both workers took some.
    let jobs: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT status, lock_by, idempotency_key FROM apalis.jobs WHERE job_type = $1",
    )
    .bind(&queue)
    .fetch_all(&plain)
    .await
    .unwrap();
    let kind = |prefix: &str| {
        jobs.iter()
            .filter(|(_, _, key)| key.starts_with(prefix))
            .collect::<Vec<_>>()
    };
    let syncs = kind("sync:");
    assert_eq!(
        syncs.len(),
        2 * CONNECTIONS,
        "one job per connection and trigger"
    );
    assert!(syncs.iter().all(|(s, _, _)| s == "Done"), "{syncs:?}");
    let holders: std::collections::BTreeSet<_> =
        syncs.iter().filter_map(|(_, w, _)| w.clone()).collect();
    assert_eq!(holders.len(), 2, "both workers ran syncs: {holders:?}");
    // Both workers' schedulers pushed the day's jobs under the same keys: once each.
    assert_eq!(kind("snapshot:").len(), 1, "{jobs:?}");
    assert_eq!(kind("close-billing-periods:").len(), 1, "{jobs:?}");
    drop(children);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&plain)
        .await
        .unwrap();
}
