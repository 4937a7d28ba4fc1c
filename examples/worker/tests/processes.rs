//! Two `revpilot-server` and two `revpilot-worker` processes on one PostgreSQL database: 20
//! connections, a cron trigger through each server, and every connection synced exactly once
//! per trigger, never twice at once, by both workers, with no job lost or run twice; the
//! workers' schedulers push each day's jobs once between them. And a server whose billing-inbox
//! jobs keep failing, signalled while they are retried with both cores busy: it exits within
//! its grace period with no job left held, and a second SIGTERM exits at once.
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

// At least 32 bytes, as the server requires.
const CRON: &str = "cron-secret-processes-0123456789abcdef";
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

/// One `revpilot-server --with-worker` on SQLite whose billing-inbox jobs keep failing (every
/// subscription fetch answers 500 after a pause), with both cores kept busy by spinning
/// threads: a SIGTERM while the jobs are being retried ends the process within its grace
/// period, and the jobs it held are back in the queue, not left running for a dead worker. A
/// second SIGTERM ends a shutdown that would otherwise wait out a long grace period at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_retried_jobs_ends_the_server_within_its_grace_and_a_second_at_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use revpilot_store::SqliteStore;
    use wiremock::matchers::{method, path_regex};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const SECRET: &str = "whsec_shutdown";
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shutdown.db");
    let database_url = format!("sqlite://{}", file.display());
    // A user whose Stripe customer the events name.
    let store = SqliteStore::connect(file.to_str().unwrap(), KeyRing::parse(KEY).unwrap())
        .await
        .unwrap();
    let user = UserId(Uuid::new_v4());
    store
        .create_user(user, None, Tier::Starter, Limits::default(), Utc::now())
        .await
        .unwrap();
    store
        .set_stripe_customer(user, "cus_shutdown", Utc::now())
        .await
        .unwrap();
    drop(store);
    // Stripe cannot return the subscriptions yet.
    let stripe = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path_regex("^/v1/subscriptions/"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_string("{\"error\":{\"type\":\"api_error\"}}")
                .set_delay(Duration::from_millis(1500)),
        )
        .mount(&stripe)
        .await;

    // Both cores busy for the whole test.
    let spin = Arc::new(AtomicBool::new(true));
    let spinners: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()))
        .map(|_| {
            let spin = Arc::clone(&spin);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while spin.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) + 1);
                }
            })
        })
        .collect();

    let http = reqwest::Client::new();
    let start = |grace: u64| {
        let port = free_port();
        let child = Command::new(server_binary())
            .env("DATABASE_URL", &database_url)
            .env("REVPILOT_ENCRYPTION_KEY", KEY)
            .env("STRIPE_SECRET_KEY", "sk_test_shutdown")
            .env("STRIPE_WEBHOOK_SECRET", SECRET)
            .env("STRIPE_API_BASE", stripe.uri())
            .env("REVPILOT_SHUTDOWN_GRACE_SECS", grace.to_string())
            .env("RUST_LOG", "warn")
            .args(["--bind", &format!("127.0.0.1:{port}"), "--with-worker"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        (child, format!("http://127.0.0.1:{port}"))
    };
    let wait_up = async |server: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.get(format!("{server}/healthz")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let post_events = async |server: &str, from: usize| {
        for i in from..from + 6 {
            let event = serde_json::json!({
                "id": format!("evt_shutdown_{i}"), "object": "event", "type": "invoice.paid",
                "created": Utc::now().timestamp(), "livemode": false,
                "data": {"object": {"id": format!("in_{i}"), "object": "invoice",
                    "customer": "cus_shutdown", "subscription": format!("sub_{i}"),
                    "currency": "usd", "created": Utc::now().timestamp(), "status": "paid",
                    "lines": {"object": "list", "data": [], "has_more": false}}}
            })
            .to_string();
            let header = revpilot_stripe::webhook::signature_header(
                event.as_bytes(),
                SECRET,
                Utc::now().timestamp(),
            );
            let res = http
                .post(format!("{server}/api/webhooks/stripe-billing"))
                .header("stripe-signature", header)
                .header("content-type", "application/json")
                .body(event)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
        }
    };
    let fetches = async || stripe.received_requests().await.unwrap_or_default().len();
    let term = |child: &std::process::Child| {
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM");
    };
    let exits_within = |child: &mut std::process::Child, within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // Three shutdowns with a 3 s grace, each while the inbox jobs are failing and retried.
    let grace = Duration::from_secs(3);
    for round in 0..3 {
        let (child, server) = start(grace.as_secs());
        let mut children = Processes(vec![child]);
        wait_up(&server).await;
        let before = fetches().await;
        post_events(&server, round * 6).await;
        // Retrying: several fetches have failed since the events arrived. A job held back by
        // the queue's retry backoff (up to a minute) may start late on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(180);
        while fetches().await < before + 3 {
            assert!(Instant::now() < deadline, "the inbox jobs did not run");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let signalled = Instant::now();
        term(&children.0[0]);
        let status = exits_within(&mut children.0[0], grace + Duration::from_secs(3));
        let took = signalled.elapsed();
        assert!(
            status.is_some(),
            "round {round}: still running {took:?} after SIGTERM (grace {grace:?})"
        );
        // The jobs it held are back in the queue for another worker, not left running.
        let pool = sqlx::SqlitePool::connect(&database_url).await.unwrap();
        let held: Vec<(String, String)> = sqlx::query_as(
            "SELECT status, lock_by FROM Jobs WHERE status IN ('Running', 'Queued')",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(held.is_empty(), "round {round}: jobs left held: {held:?}");
        pool.close().await;
    }

    // A second SIGTERM ends a shutdown whose grace (120 s) would let a stalled job run on.
    stripe.reset().await;
    Mock::given(method("GET"))
        .and(path_regex("^/v1/subscriptions/"))
        .respond_with(ResponseTemplate::new(500).set_delay(Duration::from_secs(90)))
        .mount(&stripe)
        .await;
    let (child, server) = start(120);
    let mut children = Processes(vec![child]);
    wait_up(&server).await;
    let before = fetches().await;
    post_events(&server, 100).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    while fetches().await < before + 1 {
        assert!(Instant::now() < deadline, "the inbox jobs did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    term(&children.0[0]);
    std::thread::sleep(Duration::from_millis(300));
    let second = Instant::now();
    term(&children.0[0]);
    let status = exits_within(&mut children.0[0], Duration::from_secs(3));
    assert!(
        status.is_some(),
        "still running {:?} after the second SIGTERM",
        second.elapsed()
    );

    spin.store(false, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
}
