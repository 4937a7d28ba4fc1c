//! The billing webhook endpoint on SQLite: signatures from the official Python SDK, concurrent
//! and shuffled deliveries, and webhooks that localstripe itself signs and delivers.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use http_body_util::BodyExt;
use revpilot_core::billing::Catalog;
use revpilot_core::ports::{BillingStore, Tier, UserId, UserStore, WebhookInbox};
use revpilot_core::testing::MemoryStore;
use revpilot_server::{AppState, Store, app};
use revpilot_store::{KeyRing, SqliteStore};
use revpilot_stripe::billing::{
    MockSubscriptionSource, Processor, SubscriptionSource, WebhookConfig,
};
use revpilot_stripe::client::{Client, ClientConfig, idempotency_key};
use revpilot_stripe::fake::{LocalStripe, sdk_signature_header};
use revpilot_stripe::webhook::signature_header;
use secrecy::SecretString;
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;
use uuid::Uuid;

const SECRET: &str = "whsec_server_tests";

/// A subscription source for tests whose events should not need Stripe: every fetch fails with
/// Stripe's 404 (concurrent deliveries may still ask while another applies the same event).
fn no_stripe() -> Arc<MockSubscriptionSource> {
    let mut stripe = MockSubscriptionSource::new();
    stripe.expect_subscription().returning(|id| {
        Err(revpilot_stripe::client::ApiError::Rejected {
            status: 404,
            path: format!("/v1/subscriptions/{id}"),
            message: "not asked in this test".into(),
        })
    });
    Arc::new(stripe)
}

fn catalog() -> Catalog {
    Catalog::default()
        .with_price_ids_from(|name| match name {
            "STRIPE_PROFESSIONAL_PRICE_ID" => Some("price_pro".into()),
            "STRIPE_BUSINESS_PRICE_ID" => Some("price_biz".into()),
            "STRIPE_ENTERPRISE_PRICE_ID" => Some("price_ent".into()),
            _ => None,
        })
        .unwrap()
}

fn keys() -> KeyRing {
    KeyRing::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
}

async fn sqlite(dir: &TempDir) -> Arc<SqliteStore> {
    let path = dir.path().join("server.db");
    Arc::new(
        SqliteStore::connect(path.to_str().unwrap(), keys())
            .await
            .unwrap(),
    )
}

fn state(store: Arc<dyn Store>, now: DateTime<Utc>) -> AppState {
    let mut s = AppState::new(
        store,
        Some(WebhookConfig::new(SecretString::from(SECRET), false)),
    );
    s.app.clock = Arc::new(move || now);
    s
}

async fn post(router: &axum::Router, body: &str, signature: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::post("/api/webhooks/stripe-billing");
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn sub(id: &str, customer: &str, price: &str, status: &str) -> Value {
    json!({
        "id": id, "object": "subscription", "customer": customer, "status": status,
        "created": 1_773_000_000,
        "items": {"object": "list", "data": [{
            "id": format!("si_{id}"), "quantity": 1,
            "current_period_start": 1_773_500_000, "current_period_end": 1_776_178_400,
            "price": {"id": price, "object": "price", "currency": "usd", "unit_amount": 2900,
                      "recurring": {"interval": "month", "interval_count": 1}}
        }], "has_more": false}
    })
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> String {
    json!({"id": id, "object": "event", "type": kind, "created": created, "livemode": false,
           "data": {"object": object}})
    .to_string()
}

async fn user_with_customer(store: &dyn Store, customer: &str, now: DateTime<Utc>) -> UserId {
    let user = UserId(Uuid::new_v4());
    store
        .create_user(
            user,
            Some(&format!("{customer}@example.com")),
            Tier::Starter,
            catalog().plan(Tier::Starter).limits,
            now,
        )
        .await
        .unwrap();
    store
        .set_stripe_customer(user, customer, now)
        .await
        .unwrap();
    user
}

#[tokio::test]
async fn the_server_accepts_exactly_what_the_official_sdk_signs() {
    let Ok(venv) = std::env::var("REVPILOT_TEST_VENV") else {
        eprintln!("skipped: REVPILOT_TEST_VENV is not set (scripts/test sets it)");
        return;
    };
    let dir = TempDir::new().unwrap();
    let store = sqlite(&dir).await;
    let now = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
    let t = now.timestamp();
    let router = app(state(store.clone(), now));
    let body = event(
        "evt_sdk",
        "customer.subscription.updated",
        t,
        sub("sub_1", "cus_1", "price_pro", "active"),
    );
    let reserialised =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&body).unwrap()).unwrap();
    let header = sdk_signature_header(&venv, &body, SECRET, t);
    let refused = [
        (
            body.replace("price_pro", "price_ent"),
            header.clone(),
            "tampered",
        ),
        (reserialised, header.clone(), "re-serialised"),
        (
            body.clone(),
            sdk_signature_header(&venv, &body, SECRET, t - 301),
            "expired",
        ),
        (
            body.clone(),
            sdk_signature_header(&venv, &body, SECRET, t + 301),
            "from the future",
        ),
        (
            body.clone(),
            sdk_signature_header(&venv, &body, "whsec_other", t),
            "another secret",
        ),
    ];
    for (payload, sig, case) in &refused {
        let (status, json) = post(&router, payload, Some(sig)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{case}: {json}");
        assert_eq!(json["error"]["code"], "invalid_webhook", "{case}");
    }
    let (status, _) = post(&router, &body, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no header");
    assert!(
        store.pending(10, 5).await.unwrap().is_empty(),
        "nothing written"
    );

    let (status, json) = post(&router, &body, Some(&header)).await;
    assert_eq!(
        (status, &json["event"]),
        (StatusCode::OK, &json!("evt_sdk"))
    );
    let (status, json) = post(&router, &body, Some(&header)).await;
    assert_eq!((status, &json["duplicate"]), (StatusCode::OK, &json!(true)));
    assert_eq!(store.pending(10, 5).await.unwrap().len(), 1);

    // Without a configured secret every webhook is refused before anything is written.
    let mut no_secret = state(store.clone(), now);
    no_secret.app.billing_webhook = None;
    let other = body.replace("evt_sdk", "evt_sdk2");
    let (status, _) = post(
        &app(no_secret),
        &other,
        Some(&sdk_signature_header(&venv, &other, SECRET, t)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(store.pending(10, 5).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_webhook_five_times_at_once_is_one_event_and_the_right_tier() {
    let dir = TempDir::new().unwrap();
    let store = sqlite(&dir).await;
    let now = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
    let user = user_with_customer(store.as_ref(), "cus_5", now).await;
    let router = app(state(store.clone(), now));
    let body = event(
        "evt_five",
        "customer.subscription.created",
        now.timestamp(),
        sub("sub_5", "cus_5", "price_biz", "active"),
    );
    let sig = signature_header(body.as_bytes(), SECRET, now.timestamp());
    let answers = futures::future::join_all((0..5).map(|_| post(&router, &body, Some(&sig)))).await;
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::OK),
        "{answers:?}"
    );
    assert_eq!(
        answers
            .iter()
            .filter(|(_, j)| j["duplicate"] != json!(true))
            .count(),
        1
    );
    // Two processors at once (two workers) still apply it once.
    let processor = |s: Arc<SqliteStore>| Processor::new(s, catalog(), no_stripe());
    let (first, second) = (processor(store.clone()), processor(store.clone()));
    let (a, b) = tokio::join!(
        first.process_pending(10, 5, now),
        second.process_pending(10, 5, now)
    );
    assert_eq!(a.unwrap().applied + b.unwrap().applied, 1);
    let events = store.subscription_events(user).await.unwrap();
    assert_eq!(events.len(), 1);
    let p = store.user(user).await.unwrap().unwrap();
    assert_eq!(
        (p.tier, p.limits),
        (Tier::Business, catalog().plan(Tier::Business).limits)
    );
}

/// 10,000 events for 1,000 users, shuffled, with duplicates, processed while they arrive: the
/// final plans equal those of the same events delivered once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_duplicated_deliveries_end_where_in_order_delivery_does() {
    const USERS: usize = 1_000;
    const PER_USER: usize = 10;
    let dir = TempDir::new().unwrap();
    let store = sqlite(&dir).await;
    let reference = Arc::new(MemoryStore::default());
    let now = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
    let base = now.timestamp() - 200_000;
    let mut users = Vec::new();
    for i in 0..USERS {
        let customer = format!("cus_{i}");
        users.push((
            user_with_customer(store.as_ref(), &customer, now).await,
            user_with_customer(reference.as_ref(), &customer, now).await,
        ));
    }
    let mut rng = fastrand::Rng::with_seed(5);
    let prices = ["price_pro", "price_biz", "price_ent", "price_unknown"];
    let statuses = [
        "active",
        "active",
        "active",
        "past_due",
        "trialing",
        "incomplete",
        "canceled",
    ];
    let mut events: Vec<(i64, String)> = Vec::new();
    for i in 0..USERS {
        // Distinct seconds per user, in a random order of creation.
        let mut offsets: Vec<i64> = (0..PER_USER as i64).map(|k| k * 11).collect();
        rng.shuffle(&mut offsets);
        for (k, off) in offsets.into_iter().enumerate() {
            let created = base + (i as i64) * 150 + off;
            let kind = if k == PER_USER - 1 && rng.bool() {
                "customer.subscription.deleted"
            } else {
                "customer.subscription.updated"
            };
            let status = if kind.ends_with("deleted") {
                "canceled"
            } else {
                statuses[rng.usize(..statuses.len())]
            };
            let object = sub(
                &format!("sub_{i}"),
                &format!("cus_{i}"),
                prices[rng.usize(..prices.len())],
                status,
            );
            events.push((
                created,
                event(&format!("evt_{i}_{k}"), kind, created, object),
            ));
        }
    }

    // Reference: each event once, in `created` order, applied as it arrives.
    let mut in_order = events.clone();
    in_order.sort_by_key(|(c, _)| *c);
    let ref_router = app(state(reference.clone(), now));
    let ref_processor = Processor::new(reference.clone(), catalog(), no_stripe());
    for (c, body) in &in_order {
        let sig = signature_header(body.as_bytes(), SECRET, now.timestamp());
        assert_eq!(
            post(&ref_router, body, Some(&sig)).await.0,
            StatusCode::OK,
            "{c}"
        );
        ref_processor.process_pending(10, 5, now).await.unwrap();
    }

    // Shuffled, 20 % delivered twice, 16 at a time, processed in rounds meanwhile.
    let mut deliveries: Vec<String> = events.iter().map(|(_, b)| b.clone()).collect();
    let dups: Vec<String> = deliveries
        .iter()
        .filter(|_| rng.u8(..5) == 0)
        .cloned()
        .collect();
    deliveries.extend(dups);
    rng.shuffle(&mut deliveries);
    let router = app(state(store.clone(), now));
    let processor = Processor::new(store.clone(), catalog(), no_stripe());
    for chunk in deliveries.chunks(500) {
        let answers: Vec<StatusCode> = futures::stream::iter(chunk.iter().map(|body| {
            let router = router.clone();
            async move {
                let sig = signature_header(body.as_bytes(), SECRET, now.timestamp());
                post(&router, body, Some(&sig)).await.0
            }
        }))
        .buffer_unordered(16)
        .collect()
        .await;
        assert!(answers.iter().all(|s| *s == StatusCode::OK));
        processor
            .process_pending(usize::MAX >> 1, 5, now)
            .await
            .unwrap();
    }
    assert!(store.pending(10, 5).await.unwrap().is_empty());

    let mut differing = 0;
    let mut tiers = std::collections::HashMap::new();
    for (u, r) in &users {
        let got = store.user(*u).await.unwrap().unwrap();
        let want = reference.user(*r).await.unwrap().unwrap();
        let key = |p: &revpilot_core::ports::UserProfile| {
            (
                p.tier,
                p.subscription_status.clone(),
                p.stripe_subscription_id.clone(),
                p.limits,
                p.current_period_end,
            )
        };
        if key(&got) != key(&want) {
            differing += 1;
        }
        *tiers.entry(got.tier).or_insert(0) += 1;
        assert_eq!(
            store
                .subscription_events(*u)
                .await
                .unwrap()
                .iter()
                .map(|e| &e.stripe_event_id)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            store.subscription_events(*u).await.unwrap().len(),
            "no event applied twice"
        );
    }
    assert_eq!(differing, 0, "final plans differ from in-order delivery");
    assert!(tiers.len() == 4, "every tier is reached: {tiers:?}");
}

/// localstripe signs and delivers its own webhooks to the running server, which stores them,
/// answers 2xx and applies the subscription ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_that_localstripe_delivers_are_accepted_and_applied() {
    let Some(ls) = LocalStripe::start() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let store = sqlite(&dir).await;
    let mut cfg = ClientConfig::new(SecretString::from("sk_test_localstripe"))
        .with_api_base(&ls.base)
        .unwrap();
    cfg.requests_per_second = std::num::NonZeroU32::new(200).unwrap();
    let client = Client::new(cfg).unwrap();
    let mut st = AppState::new(
        store.clone(),
        Some(WebhookConfig::new(SecretString::from(SECRET), false)),
    );
    st.app.clock = Arc::new(Utc::now);
    let source: Arc<dyn SubscriptionSource> = Arc::new(client.clone());
    let processor = Arc::new(Processor::<dyn Store>::new(
        store.clone(),
        catalog(),
        source,
    ));
    processor.spawn(
        st.app.billing_wake.clone(),
        st.app.clock.clone(),
        Duration::from_millis(200),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, app(st)).into_future());

    // localstripe's configuration endpoint answers an empty body.
    client
        .post(
            "/_config/webhooks/revpilot",
            &[
                ("url", format!("http://{addr}/api/webhooks/stripe-billing")),
                ("secret", SECRET.to_owned()),
            ],
            &idempotency_key(),
        )
        .await
        .unwrap();
    let product = call(
        &client,
        "/v1/products",
        &[("name", "Pro"), ("type", "service")],
    )
    .await;
    call(
        &client,
        "/v1/plans",
        &[
            ("id", "price_pro"),
            ("amount", "2900"),
            ("currency", "usd"),
            ("interval", "month"),
            ("product", product["id"].as_str().unwrap()),
        ],
    )
    .await;
    let customer = call(&client, "/v1/customers", &[("email", "ls@example.com")]).await;
    let cus = customer["id"].as_str().unwrap().to_owned();
    let user = user_with_customer(store.as_ref(), &cus, Utc::now()).await;
    call(
        &client,
        &format!("/v1/customers/{cus}/sources"),
        &[
            ("source[object]", "card"),
            ("source[number]", "4242424242424242"),
            ("source[exp_month]", "12"),
            ("source[exp_year]", "2030"),
            ("source[cvc]", "123"),
        ],
    )
    .await;
    let subscription = call(
        &client,
        "/v1/subscriptions",
        &[("customer", &cus), ("items[0][plan]", "price_pro")],
    )
    .await;
    let sub_id = subscription["id"].as_str().unwrap().to_owned();

    let wait_for = |want: Tier, status: &'static str| {
        let store = store.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let p = store.user(user).await.unwrap().unwrap();
                if p.tier == want && p.subscription_status.as_deref() == Some(status) {
                    return p;
                }
                assert!(Instant::now() < deadline, "still {p:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let p = wait_for(Tier::Professional, "active").await;
    assert_eq!(p.stripe_subscription_id.as_deref(), Some(sub_id.as_str()));
    client
        .delete(&format!("/v1/subscriptions/{sub_id}"))
        .await
        .unwrap();
    wait_for(Tier::Starter, "canceled").await;
    let events = store.subscription_events(user).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        [
            "customer.subscription.created",
            "customer.subscription.deleted"
        ]
    );
    // Every delivery was verified and stored, the customer and invoice events included.
    let stored: i64 = sqlx_count(&store).await;
    assert!(stored >= 4, "{stored} events stored");
}

async fn call(client: &Client, path: &str, pairs: &[(&str, &str)]) -> Value {
    let form: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    let body = client
        .post(path, &form, &idempotency_key())
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_slice(&body).unwrap()
}

async fn sqlx_count(store: &SqliteStore) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM webhook_events")
        .fetch_one(store.pool())
        .await
        .unwrap()
}
