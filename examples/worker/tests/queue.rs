//! The job queue on SQLite and on PostgreSQL: jobs survive a restart, a key is one job, a
//! busy lease is retried with backoff until the other holder is done, a stopped worker finishes
//! the job in hand, and the runner's jobs (sync, snapshot, billing periods) do their work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use revpilot_core::ports::{ConnectionId, Limits, Tier, UserId};
use revpilot_store::{KeyRing, PgStore, SqliteStore};
use revpilot_stripe::fake::FakeStripe;
use revpilot_worker::{Done, Job, JobError, Queue, Runner, Store};
use secrecy::SecretString;
use serde_json::json;
use uuid::Uuid;

mod common;

use common::{KEY, connection, slow_stripe, stripe};

fn keys() -> KeyRing {
    KeyRing::parse(KEY).unwrap()
}

/// Opens the store and queue again (a restart).
type Reopen = Box<dyn Fn() -> futures::future::BoxFuture<'static, (Arc<dyn Store>, Queue)>>;

/// A store and a queue in one database, with a unique queue name.
struct Db {
    store: Arc<dyn Store>,
    queue: Queue,
    /// Reopens the store and queue (a restart).
    reopen: Reopen,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db").display().to_string();
    let name = format!("test-{}", Uuid::new_v4().simple());
    let open = move || {
        let (path, name) = (path.clone(), name.clone());
        Box::pin(async move {
            let s = SqliteStore::connect(&path, keys()).await.unwrap();
            let q = Queue::sqlite(s.pool(), &name).await.unwrap();
            (Arc::new(s) as Arc<dyn Store>, q)
        }) as futures::future::BoxFuture<'static, _>
    };
    let (store, queue) = open().await;
    Db {
        store,
        queue,
        reopen: Box::new(open),
        _dir: Some(dir),
    }
}

/// `None` (the test says it was skipped) without `REVPILOT_TEST_POSTGRES_URL`.
async fn postgres() -> Option<Db> {
    let Ok(url) = std::env::var("REVPILOT_TEST_POSTGRES_URL") else {
        eprintln!("skipped on PostgreSQL: REVPILOT_TEST_POSTGRES_URL is not set");
        return None;
    };
    let schema = format!("w_{}", Uuid::new_v4().simple());
    let name = format!("test-{}", Uuid::new_v4().simple());
    let open = move || {
        let (url, schema, name) = (url.clone(), schema.clone(), name.clone());
        Box::pin(async move {
            let s = PgStore::connect_in_schema(&url, Some(&schema), keys())
                .await
                .unwrap();
            // The queue lives in the `apalis` schema whatever the store's search path is; its
            // set-up runs on a plain pool so the extensions it creates land in `public`.
            let plain = sqlx::PgPool::connect(&url).await.unwrap();
            let q = Queue::postgres(&plain, &name).await.unwrap();
            (Arc::new(s) as Arc<dyn Store>, q)
        }) as futures::future::BoxFuture<'static, _>
    };
    let (store, queue) = open().await;
    Some(Db {
        store,
        queue,
        reopen: Box::new(open),
        _dir: None,
    })
}

fn runner(store: Arc<dyn Store>, fake: &FakeStripe, holder: &str) -> Runner {
    let mut r = Runner::new(store, holder);
    r.stripe_api_base = url::Url::parse(&fake.uri()).unwrap();
    r
}

/// Waits until the connection's latest run finished; its status.
async fn finished(store: &dyn Store, user: UserId, c: ConnectionId, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(run) = store
            .last_run(user, c)
            .await
            .unwrap()
            .filter(|r| r.finished_at.is_some())
        {
            return run.status.as_str().to_owned();
        }
        assert!(Instant::now() < deadline, "the sync did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn queue_survives_restarts_and_retries_a_busy_lease(db: Db) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = stripe(3).await;
    let (user, c) = connection(db.store.as_ref(), "acct_1").await;
    let job = Job::Sync {
        user,
        connection: c,
        stripe_account_id: "acct_1".into(),
    };
    // Pushed twice under one key, with no worker running: one job.
    db.queue.push(&job, "sync:test:1").await.unwrap();
    db.queue.push(&job, "sync:test:1").await.unwrap();
    // Another holder syncs the connection for the next 1.5 s.
    let now = Utc::now();
    assert!(
        db.store
            .acquire_lease(
                &format!("sync:{c}"),
                "someone-else",
                now + chrono::Duration::milliseconds(1500),
                now
            )
            .await
            .unwrap()
    );
    // A restart: the store and queue opened again, then a worker.
    drop(db.queue);
    let (store, queue) = (db.reopen)().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(queue.clone().run(
        Arc::new(runner(store.clone(), &fake, "w1")),
        "w1".to_owned(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    // Busy at first: retried with backoff, and run once the lease ran out.
    assert_eq!(
        finished(store.as_ref(), user, c, Duration::from_secs(30)).await,
        "succeeded"
    );
    let run = store.last_run(user, c).await.unwrap().unwrap();
    assert!(
        run.started_at >= now + chrono::Duration::milliseconds(1500),
        "the sync waited for the other holder's lease: started {} (lease until {})",
        run.started_at,
        now + chrono::Duration::milliseconds(1500)
    );
    // Exactly one sync for the key pushed twice: no second run appears.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.last_run(user, c).await.unwrap().unwrap().id, run.id);
    let received = fake.received().await;
    assert_eq!(
        received
            .iter()
            .filter(|r| r.starts_with("/v1/account?"))
            .count(),
        1,
        "one sync's requests: {received:?}"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_queue_survives_restarts_and_retries_a_busy_lease() {
    queue_survives_restarts_and_retries_a_busy_lease(sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_queue_survives_restarts_and_retries_a_busy_lease() {
    if let Some(db) = postgres().await {
        queue_survives_restarts_and_retries_a_busy_lease(db).await;
    }
}

/// A worker told to stop while a sync is in hand finishes it before it returns.
async fn a_stopped_worker_finishes_the_job_in_hand(db: Db) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let slow = slow_stripe("acct_slow", Duration::from_secs(2)).await;
    let (user, c) = connection(db.store.as_ref(), "acct_slow").await;
    let mut r = Runner::new(db.store.clone(), "w-stop");
    r.stripe_api_base = url::Url::parse(&slow.uri()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(db.queue.clone().run(
        Arc::new(r),
        "w-stop".into(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    db.queue
        .push(
            &Job::Sync {
                user,
                connection: c,
                stripe_account_id: "acct_slow".into(),
            },
            "sync:slow",
        )
        .await
        .unwrap();
    // Wait until the account request is in flight, then stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    while slow
        .received_requests()
        .await
        .unwrap_or_default()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the job did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap();
    let run = db.store.last_run(user, c).await.unwrap().unwrap();
    assert!(
        run.finished_at.is_some(),
        "the job in hand was finished before the worker returned: {run:?}"
    );
    assert_eq!(run.status.as_str(), "succeeded", "{:?}", run.outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_stopped_worker_finishes_the_job_in_hand() {
    a_stopped_worker_finishes_the_job_in_hand(sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_stopped_worker_finishes_the_job_in_hand() {
    if let Some(db) = postgres().await {
        a_stopped_worker_finishes_the_job_in_hand(db).await;
    }
}

/// A worker told to stop while its job stalls past the drain hands the job back to the queue
/// and returns; another worker then takes it and finishes it.
async fn a_job_stalled_past_the_drain_goes_back_to_the_queue(db: Db) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The account's first request stalls for a minute; the next ones answer at once.
    let stripe = MockServer::start().await;
    let account = json!({"id": "acct_stall", "object": "account"});
    Mock::given(method("GET"))
        .and(path("/v1/account"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(account.clone())
                .set_delay(Duration::from_secs(60)),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/account"))
        .respond_with(ResponseTemplate::new(200).set_body_json(account))
        .with_priority(2)
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .with_priority(3)
        .mount(&stripe)
        .await;
    let (user, c) = connection(db.store.as_ref(), "acct_stall").await;
    let runner = |name: &str| {
        let mut r = Runner::new(db.store.clone(), name);
        r.stripe_api_base = url::Url::parse(&stripe.uri()).unwrap();
        // A lease long enough that the next worker could not wait it out: the dropped sync
        // must release it.
        r.lease = Duration::from_secs(600);
        Arc::new(r)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let drain = Duration::from_millis(800);
    let worker = tokio::spawn(db.queue.clone().run(
        runner("w-stall"),
        "w-stall".into(),
        async move {
            let _ = stopped.await;
        },
        drain,
    ));
    db.queue
        .push(
            &Job::Sync {
                user,
                connection: c,
                stripe_account_id: "acct_stall".into(),
            },
            "sync:stall",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stripe
        .received_requests()
        .await
        .unwrap_or_default()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the job did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopping = Instant::now();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker returns after its drain, not after the stalled call")
        .unwrap()
        .unwrap();
    let took = stopping.elapsed();
    assert!(
        took < drain + Duration::from_secs(2),
        "stopping took {took:?}"
    );
    assert!(
        db.store
            .last_run(user, c)
            .await
            .unwrap()
            .is_none_or(|r| r.finished_at.is_none()),
        "the stalled sync did not finish in the first worker"
    );
    // Another worker takes the job handed back and finishes it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let other = tokio::spawn(db.queue.clone().run(
        runner("w-next"),
        "w-next".into(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    assert_eq!(
        finished(db.store.as_ref(), user, c, Duration::from_secs(20)).await,
        "succeeded"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), other)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_job_stalled_past_the_drain_goes_back_to_the_queue() {
    a_job_stalled_past_the_drain_goes_back_to_the_queue(sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_job_stalled_past_the_drain_goes_back_to_the_queue() {
    if let Some(db) = postgres().await {
        a_job_stalled_past_the_drain_goes_back_to_the_queue(db).await;
    }
}

/// Stepping with `try_execute_task`: a held lease answers Busy; the sync, then the day's
/// snapshot row of the synced account; billing jobs skip without a billing account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_execute_task_steps_through_the_jobs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = sqlite().await;
    let fake = stripe(3).await;
    let (user, c) = connection(db.store.as_ref(), "acct_1").await;
    let r = runner(db.store.clone(), &fake, "stepper");
    let sync = Job::Sync {
        user,
        connection: c,
        stripe_account_id: "acct_1".into(),
    };
    let now = Utc::now();
    db.store
        .acquire_lease(
            &format!("sync:{c}"),
            "other",
            now + chrono::Duration::minutes(1),
            now,
        )
        .await
        .unwrap();
    assert!(matches!(
        r.try_execute_task(&sync).await,
        Err(JobError::Busy(id)) if id == c
    ));
    db.store
        .release_lease(&format!("sync:{c}"), "other")
        .await
        .unwrap();
    // Stripe fails the customers list: the sync fails and the job is an error (retried).
    fake.faults(|_, path| {
        path.starts_with("/v1/customers")
            .then_some(revpilot_stripe::fake::Fault {
                status: 400,
                should_retry: None,
            })
    });
    assert!(matches!(
        r.try_execute_task(&sync).await,
        Err(JobError::Sync(_))
    ));
    fake.clear_faults();
    assert_eq!(
        r.try_execute_task(&sync).await.unwrap(),
        Done::Synced("succeeded".into())
    );
    // The synced account was derived at the sync's time: the next load reads it.
    let synced = db.store.connection(user, c).await.unwrap().unwrap();
    let stamp = revpilot_core::ports::DerivedStore::derived_stamp(db.store.as_ref(), c)
        .await
        .unwrap()
        .expect("derived after the sync");
    assert_eq!(stamp.synced_at, synced.last_synced_at);
    assert!(
        revpilot_stripe::rebuild::derived::load_account(db.store.as_ref(), user, &synced, None)
            .await
            .unwrap()
            .source
            == revpilot_stripe::rebuild::derived::Source::Derived
    );
    // The lease was given back: another holder takes it at once.
    assert!(
        db.store
            .acquire_lease(&format!("sync:{c}"), "other", now, now)
            .await
            .unwrap()
    );
    let day = Utc::now().date_naive();
    assert_eq!(
        r.try_execute_task(&Job::Snapshot { day }).await.unwrap(),
        Done::Snapshots(1)
    );
    let rows = db.store.snapshots(user, c, day, day).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].date, day);
    assert!(rows[0].partial, "today is known only up to the sync");
    let yesterday = day.pred_opt().unwrap();
    r.try_execute_task(&Job::Snapshot { day: yesterday })
        .await
        .unwrap();
    let rows = db
        .store
        .snapshots(user, c, yesterday, yesterday)
        .await
        .unwrap();
    assert!(!rows[0].partial, "yesterday ended before the sync");
    // A day the data does not reach yet has no row.
    let tomorrow = day.succ_opt().unwrap();
    assert_eq!(
        r.try_execute_task(&Job::Snapshot { day: tomorrow })
            .await
            .unwrap(),
        Done::Snapshots(0)
    );
    // No billing account: the billing jobs say so and do nothing.
    for job in [Job::Inbox, Job::CloseBillingPeriods { day }] {
        assert!(matches!(
            r.try_execute_task(&job).await.unwrap(),
            Done::Skipped(_)
        ));
    }
    // A connection that is gone is skipped, not retried for ever.
    db.store.deactivate("acct_1", Utc::now()).await.unwrap();
    assert!(matches!(
        r.try_execute_task(&sync).await.unwrap(),
        Done::Skipped(_)
    ));
}

/// An inbox job whose event cannot be applied yet (Stripe does not answer the subscription)
/// fails, so the queue retries it; once Stripe answers, the retry applies the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_job_fails_until_its_events_apply() {
    use revpilot_core::ports::InboxEvent;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = sqlite().await;
    let user = UserId(Uuid::new_v4());
    let now = Utc::now();
    db.store
        .create_user(user, None, Tier::Starter, Limits::default(), now)
        .await
        .unwrap();
    db.store
        .set_stripe_customer(user, "cus_1", now)
        .await
        .unwrap();
    let payload = json!({"id": "evt_1", "object": "event", "type": "checkout.session.completed",
        "created": now.timestamp(), "livemode": false,
        "data": {"object": {"id": "cs_1", "object": "checkout.session", "mode": "subscription",
            "payment_status": "paid", "customer": "cus_1", "subscription": "sub_1",
            "client_reference_id": user.to_string()}}});
    db.store
        .insert(&InboxEvent {
            event_id: "evt_1".into(),
            event_type: "checkout.session.completed".into(),
            created: now,
            livemode: false,
            payload: payload.to_string(),
            received_at: now,
        })
        .await
        .unwrap();
    let stripe = MockServer::start().await;
    let mut r = Runner::new(db.store.clone(), "inbox");
    r.catalog = Arc::new(
        revpilot_core::billing::Catalog::default()
            .with_price_ids_from(|n| {
                (n == "STRIPE_PROFESSIONAL_PRICE_ID").then(|| "price_pro".to_owned())
            })
            .unwrap(),
    );
    let config = revpilot_stripe::client::ClientConfig::new(SecretString::from("sk_test_1"))
        .with_api_base(&stripe.uri())
        .unwrap();
    r.billing = Some(revpilot_stripe::client::Client::new(config).unwrap());
    // Stripe has no such subscription yet: the job fails and the event stays pending.
    assert!(matches!(
        r.try_execute_task(&Job::Inbox).await,
        Err(JobError::Inbox { failed: 1 })
    ));
    assert_eq!(
        db.store.user(user).await.unwrap().unwrap().tier,
        Tier::Starter
    );
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
            "created": now.timestamp() - 10,
            "current_period_start": now.timestamp() - 10,
            "current_period_end": now.timestamp() + 30 * 86_400,
            "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                "quantity": 1, "price": {"id": "price_pro", "object": "price",
                "unit_amount": 2900, "currency": "usd",
                "recurring": {"interval": "month", "interval_count": 1}}}]}})))
        .mount(&stripe)
        .await;
    assert_eq!(
        r.try_execute_task(&Job::Inbox).await.unwrap(),
        Done::Inbox {
            applied: 1,
            unchanged: 0
        }
    );
    assert_eq!(
        db.store.user(user).await.unwrap().unwrap().tier,
        Tier::Professional
    );
}

/// A worker process killed in the middle of a sync and started again under the same name: its
/// new life has a new id, so once the old one misses its heartbeats the job is queued again, and
/// once the dead sync's lease runs out, the connection is synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_job_runs_again_after_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.db").display().to_string();
    let name = format!("test-{}", Uuid::new_v4().simple());
    let sqlite = SqliteStore::connect(&file, keys()).await.unwrap();
    let queue = Queue::sqlite(sqlite.pool(), &name)
        .await
        .unwrap()
        .with_heartbeat(Duration::from_secs(1));
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let slow = slow_stripe("acct_k", Duration::from_secs(3)).await;
    let (user, c) = connection(store.as_ref(), "acct_k").await;
    let worker = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_revpilot-worker"))
            .env("DATABASE_URL", format!("sqlite://{file}"))
            .env("REVPILOT_ENCRYPTION_KEY", KEY)
            .env("STRIPE_API_BASE", slow.uri())
            .env("REVPILOT_QUEUE", &name)
            .env("REVPILOT_WORKER_NAME", "worker")
            .env("REVPILOT_WORKER_HEARTBEAT_SECS", "1")
            .env("REVPILOT_SYNC_LEASE_SECS", "3")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut doomed = worker();
    queue
        .push(
            &Job::Sync {
                user,
                connection: c,
                stripe_account_id: "acct_k".into(),
            },
            "sync:killed",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while slow
        .received_requests()
        .await
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the doomed worker did not start the job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{file}"))
        .await
        .unwrap();
    let job = || async {
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT status, lock_by FROM Jobs WHERE job_type = ? AND idempotency_key = 'sync:killed'",
        )
        .bind(&name)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let first_life = job().await.1.unwrap();
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let killed_at = Utc::now();
    let mut restarted = worker();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = store.last_run(user, c).await.unwrap().unwrap();
        if run.started_at > killed_at && run.finished_at.is_some() {
            assert_eq!(run.status.as_str(), "succeeded", "{:?}", run.outcome);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed worker's job did not run again: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The job is acknowledged just after the sync's run is recorded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let holder = loop {
        let (status, holder) = job().await;
        if status == "Done" {
            break holder.unwrap();
        }
        assert!(Instant::now() < deadline, "the job is {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    restarted.kill().unwrap();
    restarted.wait().unwrap();
    assert!(
        holder.starts_with("worker-") && holder != first_life,
        "run by the restarted worker ({holder}), not the dead one ({first_life})"
    );
}

/// End of a billing period through the queue, against localstripe: the day's
/// `close_billing_periods` job (pushed twice under one key) pushes the user's `overage` job, which
/// puts the last month's overage on the customer as one invoice item; running it again bills
/// nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ended_periods_overage_is_invoiced_once_through_the_queue() {
    use revpilot_core::billing::Catalog;
    use revpilot_core::ports::{Meter, Period, UsageRecord};
    let Some(ls) = revpilot_stripe::fake::LocalStripe::start() else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = sqlite().await;
    let config = revpilot_stripe::client::ClientConfig::new(SecretString::from("sk_test_ls"))
        .with_api_base(&ls.base)
        .unwrap();
    let client = revpilot_stripe::client::Client::new(config).unwrap();
    let created = client
        .post(
            "/v1/customers",
            &[("email", "pro@example.com".to_owned())],
            "customer:overage",
        )
        .await
        .unwrap();
    let customer: serde_json::Value = serde_json::from_slice(&created).unwrap();
    let customer = customer["id"].as_str().unwrap().to_owned();
    let catalog = Catalog::default();
    let user = UserId(Uuid::new_v4());
    let now = Utc::now();
    db.store
        .create_user(
            user,
            Some("pro@example.com"),
            Tier::Professional,
            catalog.plan(Tier::Professional).limits,
            now,
        )
        .await
        .unwrap();
    db.store
        .set_stripe_customer(user, &customer, now)
        .await
        .unwrap();
    // Last calendar month (no subscription period: calendar months): 52 insights, 2 over the
    // professional tier's 50, at $1.00 each.
    let profile = db.store.user(user).await.unwrap().unwrap();
    let ended = revpilot_core::billing::ended_period(&profile, now).unwrap();
    db.store
        .record(
            &UsageRecord {
                user,
                meter: Meter::AiInsight,
                connection: None,
                amount: 52,
                idempotency_key: "insights-last-month".into(),
                metadata: json!({}),
                at: ended.start + chrono::Duration::days(3),
            },
            ended,
            None,
        )
        .await
        .unwrap();
    let mut r = Runner::new(db.store.clone(), "billing");
    r.billing = Some(client.clone());
    r.queue = Some(Arc::new(db.queue.clone()));
    let r = Arc::new(r);
    let day = now.date_naive();
    let close = Job::CloseBillingPeriods { day };
    db.queue.push(&close, "close:test").await.unwrap();
    db.queue.push(&close, "close:test").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(db.queue.clone().run(
        r.clone(),
        "billing".into(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    let items = || async {
        let body = client
            .get("/v1/invoiceitems", &[("customer", customer.clone())])
            .await
            .unwrap();
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
        page["data"].as_array().unwrap().clone()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while items().await.is_empty() {
        assert!(Instant::now() < deadline, "no overage invoiced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // A rerun of the period's job (past the queue's key) finds the item and bills nothing more.
    let Period { start, end } = ended;
    assert_eq!(
        r.try_execute_task(&Job::Overage { user, start, end })
            .await
            .unwrap(),
        Done::Overage(200)
    );
    let items = items().await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["amount"], 200);
    assert_eq!(items[0]["currency"], "usd");
    assert_eq!(
        items[0]["metadata"]["revpilot_overage_key"],
        format!(
            "{}:ai_insight",
            revpilot_stripe::billing::overage_key(user, ended)
        )
    );
}
