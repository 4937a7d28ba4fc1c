//! The sync against the fake Stripe and the in-memory store: completeness across pages and nested
//! lists, resume after a crash at every point, no double-counted usage, events, retries, 401s.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use revpilot_core::ports::{StoreResult, SyncRun};
use revpilot_core::testing::MemoryStore;
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::client::ClientConfig;
use crate::fake::{FakeStripe, Fault};

const T0: i64 = 1_700_000_000;

fn customers(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"id": format!("cus_{i:04}"), "object": "customer", "created": T0 + i as i64})).collect()
}

fn invoice(id: &str, lines: usize) -> Value {
    let data: Vec<Value> = (0..lines)
        .map(|l| json!({"id": format!("il_{id}_{l:02}"), "object": "line_item", "amount": 100, "quantity": 1,
                        "period": {"start": T0, "end": T0 + 1}}))
        .collect();
    json!({"id": id, "object": "invoice", "currency": "usd", "created": T0, "customer": "cus_0000",
           "lines": {"object": "list", "data": data}})
}

fn charge(id: &str, refunds: usize) -> Value {
    let data: Vec<Value> = (0..refunds)
        .map(|r| json!({"id": format!("re_{id}_{r:02}"), "object": "refund", "amount": 1, "created": T0, "charge": id}))
        .collect();
    json!({"id": id, "object": "charge", "amount": 1000, "currency": "usd", "created": T0, "status": "succeeded",
           "refunds": {"object": "list", "data": data}})
}

/// An account: 250 customers (3 pages), 2 prices, 120 subscriptions, 3 invoices (one with 25
/// lines), 105 charges (one with 13 refunds).
async fn account(rate: Option<u32>) -> FakeStripe {
    let fake = FakeStripe::start(rate).await;
    fake.set("/v1/customers", customers(250));
    fake.set(
        "/v1/prices",
        vec![
            json!({"id": "price_a", "object": "price", "currency": "usd", "unit_amount": 1000}),
            json!({"id": "price_b", "object": "price", "currency": "usd", "unit_amount": 2000}),
        ],
    );
    fake.set(
        "/v1/products",
        vec![json!({"id": "prod_a", "object": "product"})],
    );
    fake.set("/v1/coupons", vec![]);
    fake.set(
        "/v1/subscriptions",
        (0..120)
            .map(|i| {
                json!({"id": format!("sub_{i:04}"), "object": "subscription",
        "customer": format!("cus_{i:04}"), "currency": "usd", "status": "active", "created": T0})
            })
            .collect(),
    );
    fake.set(
        "/v1/invoices",
        vec![invoice("in_1", 25), invoice("in_2", 3), invoice("in_3", 10)],
    );
    let mut charges: Vec<Value> = (0..104).map(|i| charge(&format!("ch_{i:04}"), 0)).collect();
    charges.push(charge("ch_many", 13));
    fake.set("/v1/charges", charges);
    fake.set(
        "/v1/events",
        vec![
            json!({"id": "evt_0", "type": "customer.created", "created": T0,
        "data": {"object": {"id": "cus_0000", "object": "customer", "created": T0}}}),
        ],
    );
    fake
}

struct Env {
    store: Arc<MemoryStore>,
    user: UserId,
    conn: ConnectionId,
    period: Period,
}

async fn env() -> Env {
    let now = Utc::now();
    let (store, user, conn) = MemoryStore::with_connection("acct_1", now).await;
    let store = Arc::new(store);
    let period = Period {
        start: now - TimeDelta::days(1),
        end: now + TimeDelta::days(30),
    };
    Env {
        store,
        user,
        conn,
        period,
    }
}

fn client(uri: &str, rate: u32) -> Client {
    let mut cfg = ClientConfig::new(SecretString::from("sk_acct"))
        .with_api_base(uri)
        .unwrap();
    cfg.requests_per_second = NonZeroU32::new(rate).unwrap();
    cfg.min_delay = Duration::from_millis(5);
    cfg.max_delay = Duration::from_millis(20);
    cfg.max_attempts = 4;
    Client::new(cfg).unwrap()
}

/// The transaction volume recorded in the env's period.
async fn used(e: &Env) -> u64 {
    e.store
        .used(e.user, Meter::TransactionVolume, e.period)
        .await
        .unwrap()
}

fn ports(store: &Arc<MemoryStore>) -> SyncPorts {
    SyncPorts::from_store(store.clone())
}

fn job(e: &Env, limit: Option<u64>) -> SyncJob {
    SyncJob {
        user: e.user,
        connection: e.conn,
        stripe_account_id: "acct_1".into(),
        usage: Some((e.period, limit)),
    }
}

/// Every cached object of every kind: (kind, id, data).
async fn snapshot(e: &Env) -> Vec<(ObjectKind, String, String)> {
    let mut all = Vec::new();
    for kind in ObjectKind::ALL {
        for o in e.store.objects(e.user, e.conn, kind).await.unwrap() {
            all.push((kind, o.stripe_id, o.data));
        }
    }
    all
}

fn quiet() -> impl Fn(&Progress) + Send + Sync {
    |_: &Progress| {}
}

#[tokio::test]
async fn a_backfill_stores_every_object_once_with_complete_nested_lists() {
    let fake = account(None).await;
    let e = env().await;
    let pages = std::sync::Mutex::new(Vec::new());
    let progress = |p: &Progress| pages.lock().unwrap().push(p.clone());
    let (status, outcome) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
        .run(&job(&e, None), &progress)
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    let counts: Vec<(String, u64)> = outcome.objects.clone().into_iter().collect();
    assert_eq!(
        counts,
        vec![
            ("charge".into(), 105),
            ("coupon".into(), 0),
            ("customer".into(), 250),
            ("invoice".into(), 3),
            ("price".into(), 2),
            ("product".into(), 1),
            ("subscription".into(), 120)
        ]
    );
    // Discounts come expanded where the server can (the rebuild needs the objects).
    let urls = fake.received().await;
    for list in ["/v1/subscriptions?", "/v1/invoices?"] {
        assert!(
            urls.iter()
                .any(|u| u.starts_with(list) && u.contains("expand%5B%5D=data.discounts")),
            "{urls:?}"
        );
    }
    let snap = snapshot(&e).await;
    assert_eq!(
        snap.iter().filter(|o| o.0 == ObjectKind::Customer).count(),
        250
    );
    let in1 = snap.iter().find(|o| o.1 == "in_1").unwrap();
    let inv: crate::objects::Invoice = serde_json::from_str(&in1.2).unwrap();
    assert_eq!(
        inv.lines.data.len(),
        25,
        "lines beyond the embedded 10 are fetched"
    );
    assert!(!inv.lines.has_more);
    let ch: crate::objects::Charge =
        serde_json::from_str(&snap.iter().find(|o| o.1 == "ch_many").unwrap().2).unwrap();
    assert_eq!(ch.refunds.unwrap().data.len(), 13);
    assert_eq!(used(&e).await, 105);
    assert!(pages.lock().unwrap().contains(&Progress::StreamDone {
        stream: "customer",
        total: 250
    }));
    let run: SyncRun = e.store.last_run(e.user, e.conn).await.unwrap().unwrap();
    assert_eq!(run.status, SyncStatus::Succeeded);
    assert_eq!(run.outcome.requests, outcome.requests);
    assert!(
        e.store
            .connection(e.user, e.conn)
            .await
            .unwrap()
            .unwrap()
            .last_synced_at
            .is_some()
    );
}

#[tokio::test]
async fn a_sync_stopped_at_any_request_resumes_to_the_same_data_without_double_counting() {
    // The reference: one clean run.
    let fake = account(None).await;
    let clean = env().await;
    let (status, _) = Syncer::new(client(&fake.uri(), 1000), ports(&clean.store))
        .run(&job(&clean, None), &quiet())
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Succeeded);
    let want = snapshot(&clean).await;
    let requests = fake.requests().0;
    assert!(requests >= 14, "{requests} requests");
    let mut stopped = 0;
    for stop_at in 1..=requests {
        let fake = account(None).await;
        let e = env().await;
        // The n-th list request fails (reading the account's details and probing for `created`
        // filters are not list requests).
        let lists = Arc::new(AtomicU64::new(0));
        let seen = lists.clone();
        fake.faults(move |_, url| {
            if url.starts_with("/v1/account") || url.contains("?limit=1&") {
                return None;
            }
            (seen.fetch_add(1, Ordering::SeqCst) + 1 == stop_at).then_some(Fault {
                status: 400,
                should_retry: None,
            })
        });
        let syncer = Syncer::new(client(&fake.uri(), 1000), ports(&e.store));
        let (status, outcome) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
        if status == SyncStatus::Succeeded {
            // Lanes split ranges as timing allows, so a run may need fewer requests than the
            // reference did; then this one never came.
            assert!(
                lists.load(Ordering::SeqCst) < stop_at,
                "request {stop_at} failed but the run succeeded"
            );
            continue;
        }
        assert_eq!(status, SyncStatus::Failed, "stopped at request {stop_at}");
        assert!(
            outcome.error.as_deref().unwrap_or_default().contains("400"),
            "{outcome:?}"
        );
        stopped += 1;
        fake.clear_faults();
        let (status, _) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
        assert_eq!(
            status,
            SyncStatus::Succeeded,
            "resumed after request {stop_at}"
        );
        assert_eq!(
            snapshot(&e).await.len(),
            want.len(),
            "stopped at request {stop_at}"
        );
        assert_eq!(
            snapshot(&e)
                .await
                .iter()
                .map(|o| (&o.0, &o.1))
                .collect::<Vec<_>>(),
            want.iter().map(|o| (&o.0, &o.1)).collect::<Vec<_>>()
        );
        assert_eq!(used(&e).await, 105, "stopped at request {stop_at}");
    }
    assert!(
        stopped * 10 >= requests * 8,
        "only {stopped} of {requests} stops happened"
    );
}

/// A state store that dies on its n-th `set_cursor`, after the page's objects and usage are written.
struct CrashingCursor {
    inner: Arc<MemoryStore>,
    crash_at: u64,
    calls: AtomicU64,
}

#[async_trait]
impl SyncStateStore for CrashingCursor {
    async fn cursor(&self, c: ConnectionId, s: &str) -> StoreResult<Option<String>> {
        self.inner.cursor(c, s).await
    }
    async fn set_cursor(
        &self,
        c: ConnectionId,
        s: &str,
        v: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.crash_at {
            return Err(StoreError::Backend("killed".into()));
        }
        self.inner.set_cursor(c, s, v, now).await
    }
    async fn clear_cursors(&self, c: ConnectionId) -> StoreResult<()> {
        self.inner.clear_cursors(c).await
    }
    async fn start_run(&self, c: ConnectionId, now: DateTime<Utc>) -> StoreResult<Uuid> {
        self.inner.start_run(c, now).await
    }
    async fn finish_run(
        &self,
        r: Uuid,
        s: SyncStatus,
        o: &RunOutcome,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.inner.finish_run(r, s, o, now).await
    }
    async fn last_run(&self, u: UserId, c: ConnectionId) -> StoreResult<Option<SyncRun>> {
        self.inner.last_run(u, c).await
    }
}

#[tokio::test]
async fn a_crash_between_writing_a_page_and_saving_its_cursor_loses_and_doubles_nothing() {
    let fake = account(None).await;
    for crash_at in 1..=14 {
        let e = env().await;
        let mut p = ports(&e.store);
        p.state = Arc::new(CrashingCursor {
            inner: e.store.clone(),
            crash_at,
            calls: AtomicU64::new(0),
        });
        let (status, _) = Syncer::new(client(&fake.uri(), 1000), p)
            .run(&job(&e, None), &quiet())
            .await
            .unwrap();
        assert_eq!(
            status,
            SyncStatus::Failed,
            "crash at cursor write {crash_at}"
        );
        let (status, _) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
            .run(&job(&e, None), &quiet())
            .await
            .unwrap();
        assert_eq!(status, SyncStatus::Succeeded);
        assert_eq!(
            snapshot(&e).await.len(),
            250 + 2 + 1 + 120 + 3 + 105,
            "crash at {crash_at}"
        );
        assert_eq!(used(&e).await, 105, "crash at {crash_at}");
    }
}

#[tokio::test]
async fn injected_429s_and_5xx_are_retried_and_recorded() {
    let fake = account(None).await;
    // Every distinct request fails once (429 or 503, alternating), then passes.
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    fake.faults(move |n, url| {
        seen.lock()
            .unwrap()
            .insert(url.to_owned())
            .then_some(Fault {
                status: if n % 2 == 0 { 429 } else { 503 },
                should_retry: None,
            })
    });
    let e = env().await;
    let (status, outcome) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
        .run(&job(&e, None), &quiet())
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.retries * 2, outcome.requests, "{outcome:?}");
    assert_eq!(snapshot(&e).await.len(), 481);
}

#[tokio::test]
async fn a_500_that_stripe_says_not_to_retry_fails_the_run_with_its_reason() {
    let fake = account(None).await;
    fake.faults(|n, _| {
        (n == 3).then_some(Fault {
            status: 500,
            should_retry: Some(false),
        })
    });
    let e = env().await;
    let (status, outcome) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
        .run(&job(&e, None), &quiet())
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Failed);
    assert_eq!(outcome.retries, 0);
    let run = e.store.last_run(e.user, e.conn).await.unwrap().unwrap();
    assert!(run.outcome.error.unwrap().contains("500"));
}

#[tokio::test]
async fn a_401_deactivates_the_connection_and_erases_its_tokens() {
    let fake = account(None).await;
    fake.faults(|n, _| {
        (n == 2).then_some(Fault {
            status: 401,
            should_retry: None,
        })
    });
    let e = env().await;
    let (status, outcome) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
        .run(&job(&e, None), &quiet())
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Failed);
    assert!(outcome.error.unwrap().contains("inactive"));
    let conn = e.store.connection(e.user, e.conn).await.unwrap().unwrap();
    assert!(!conn.is_active);
    assert!(e.store.tokens(e.user, e.conn).await.unwrap().is_none());
    assert!(
        e.store.active_connections().await.unwrap().is_empty(),
        "no more syncs"
    );
}

#[tokio::test]
async fn events_after_the_backfill_are_applied_and_new_charges_counted_once() {
    let fake = account(None).await;
    let e = env().await;
    let syncer = Syncer::new(client(&fake.uri(), 1000), ports(&e.store));
    assert_eq!(
        syncer.run(&job(&e, None), &quiet()).await.unwrap().0,
        SyncStatus::Succeeded
    );
    let later = Utc::now().timestamp() + 5;
    fake.push("/v1/events", vec![
        json!({"id": "evt_1", "type": "customer.updated", "created": later,
               "data": {"object": {"id": "cus_0001", "object": "customer", "created": T0, "email": "new@example.com"}}}),
        json!({"id": "evt_2", "type": "charge.succeeded", "created": later + 1,
               "data": {"object": charge("ch_new", 0)}}),
        json!({"id": "evt_3", "type": "invoice.created", "created": later + 2,
               "data": {"object": {"id": "in_big", "object": "invoice", "currency": "usd", "created": later,
                                    "lines": {"object": "list", "has_more": true, "data": []}}}}),
    ]);
    fake.set(
        "lines:in_big",
        (0..12)
            .map(|l| json!({"id": format!("il_big_{l}"), "amount": 1}))
            .collect(),
    );
    let (status, outcome) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.objects.get("event"), Some(&3));
    let customers = e
        .store
        .objects(e.user, e.conn, ObjectKind::Customer)
        .await
        .unwrap();
    assert!(
        customers
            .iter()
            .any(|c| c.stripe_id == "cus_0001" && c.data.contains("new@example.com"))
    );
    let invoices = e
        .store
        .objects(e.user, e.conn, ObjectKind::Invoice)
        .await
        .unwrap();
    let big: crate::objects::Invoice = serde_json::from_str(
        &invoices
            .iter()
            .find(|i| i.stripe_id == "in_big")
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(big.lines.data.len(), 12);
    assert_eq!(used(&e).await, 106);
    // Again: nothing new, nothing counted twice.
    let (_, outcome) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
    assert_eq!(outcome.objects.get("event"), Some(&0));
    assert_eq!(used(&e).await, 106);
}

#[tokio::test]
async fn a_cursor_older_than_thirty_days_backfills_again() {
    let fake = account(None).await;
    let e = env().await;
    let syncer = Syncer::new(client(&fake.uri(), 1000), ports(&e.store));
    syncer.run(&job(&e, None), &quiet()).await.unwrap();
    let old = (Utc::now() - TimeDelta::days(31)).timestamp();
    e.store
        .set_cursor(e.conn, EVENTS, &format!("evt_0@{old}"), Utc::now())
        .await
        .unwrap();
    let (status, outcome) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
    assert_eq!(status, SyncStatus::Succeeded);
    assert!(
        outcome.objects.contains_key("customer") && !outcome.objects.contains_key("event"),
        "a full backfill ran: {outcome:?}"
    );
    assert_eq!(used(&e).await, 105);
}

#[tokio::test]
async fn the_usage_limit_pauses_the_sync() {
    let fake = account(None).await;
    let e = env().await;
    let (status, outcome) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
        .run(&job(&e, Some(50)), &quiet())
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Paused);
    assert!(outcome.error.unwrap().contains("limit"));
    assert!(used(&e).await <= 50);
}

#[tokio::test]
async fn localstripe_style_plans_are_read_where_prices_404() {
    let fake = account(None).await;
    fake.set("/v1/plans", vec![json!({"id": "plan_x", "object": "plan", "currency": "usd", "amount": 500, "interval": "month"})]);
    // Remove /v1/prices by pointing it at a path nobody serves.
    let e = env().await;
    fake.faults(|_, path| {
        path.starts_with("/v1/prices?").then_some(Fault {
            status: 404,
            should_retry: None,
        })
    });
    let (status, outcome) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
        .run(&job(&e, None), &quiet())
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    let prices = e
        .store
        .objects(e.user, e.conn, ObjectKind::Price)
        .await
        .unwrap();
    assert_eq!(prices.len(), 1);
    assert_eq!(prices[0].stripe_id, "plan_x");
}

#[tokio::test]
async fn a_deauthorization_event_deactivates_the_connection() {
    let fake = account(None).await;
    let e = env().await;
    let syncer = Syncer::new(client(&fake.uri(), 1000), ports(&e.store));
    assert_eq!(
        syncer.run(&job(&e, None), &quiet()).await.unwrap().0,
        SyncStatus::Succeeded
    );
    fake.push(
        "/v1/events",
        vec![
            json!({"id": "evt_bye", "type": "account.application.deauthorized",
                     "created": Utc::now().timestamp() + 5,
                     "data": {"object": {"id": "ca_platform", "object": "application"}}}),
        ],
    );
    let (status, outcome) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
    assert_eq!(status, SyncStatus::Failed);
    assert!(outcome.error.unwrap().contains("inactive"));
    assert!(
        !e.store
            .connection(e.user, e.conn)
            .await
            .unwrap()
            .unwrap()
            .is_active
    );
    assert!(e.store.tokens(e.user, e.conn).await.unwrap().is_none());
}

#[tokio::test]
async fn disputes_are_synced_and_a_lost_one_takes_its_cash_back() {
    let fake = account(None).await;
    let dispute = |status: &str, balance: Value| {
        json!({"id": "dp_1", "object": "dispute", "charge": "ch_0000", "amount": 1000,
               "currency": "usd", "created": T0 + 100, "status": status,
               "balance_transactions": balance})
    };
    fake.set("/v1/disputes", vec![dispute("needs_response", json!([]))]);
    let e = env().await;
    let syncer = Syncer::new(client(&fake.uri(), 1000), ports(&e.store));
    let (status, outcome) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.objects.get("dispute"), Some(&1));
    let cash = |rebuilt: &crate::rebuild::Rebuilt| -> Vec<(i64, String)> {
        rebuilt
            .account
            .payments
            .iter()
            .find(|p| p.id == "ch_0000")
            .unwrap()
            .disputes
            .iter()
            .map(|m| (m.at.timestamp(), m.amount.to_string()))
            .collect()
    };
    let open = crate::rebuild::stream::rebuild_cached(e.store.as_ref(), e.user, e.conn, 100)
        .await
        .unwrap();
    assert_eq!(
        cash(&open),
        vec![(T0 + 100, "-1000".to_owned())],
        "Stripe withdraws a disputed amount when the dispute opens"
    );
    // The dispute is lost: the event carries it with its withdrawal and fee.
    let later = Utc::now().timestamp() + 5;
    let lost = dispute(
        "lost",
        json!([{"id": "txn_dp", "object": "balance_transaction", "amount": -1000, "fee": 1500,
                "currency": "usd", "created": T0 + 200}]),
    );
    fake.push(
        "/v1/events",
        vec![
            json!({"id": "evt_dp", "type": "charge.dispute.closed", "created": later,
                    "data": {"object": lost}}),
        ],
    );
    let (status, outcome) = syncer.run(&job(&e, None), &quiet()).await.unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.objects.get("event"), Some(&1));
    let closed = crate::rebuild::stream::rebuild_cached(e.store.as_ref(), e.user, e.conn, 100)
        .await
        .unwrap();
    assert_eq!(cash(&closed), vec![(T0 + 200, "-2500".to_owned())]);
}

#[tokio::test]
async fn a_server_without_disputes_syncs_everything_else() {
    // localstripe has no /v1/disputes: the list 404s, and the account simply has none.
    let fake = account(None).await;
    let e = env().await;
    let (status, outcome) = Syncer::new(client(&fake.uri(), 1000), ports(&e.store))
        .run(&job(&e, None), &quiet())
        .await
        .unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    assert!(
        fake.received()
            .await
            .iter()
            .any(|u| u.starts_with("/v1/disputes")),
        "the disputes list was asked for"
    );
    assert_eq!(outcome.objects.get("customer"), Some(&250));
}
