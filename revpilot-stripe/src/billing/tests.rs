//! Billing webhooks, checkout and overage invoicing, on the in-memory store, a map of
//! subscriptions standing in for Stripe, and wiremock for the exact requests sent.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::TimeZone;
use revpilot_core::ports::{Limits, Meter, Period, Recorded, UsageRecord, UsageStore};
use revpilot_core::testing::MemoryStore;
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;
use crate::client::ClientConfig;
use crate::webhook::signature_header;
use url::Url;

const SECRET: &str = "whsec_test_billing";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 20, 12, 0, 0).unwrap()
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

fn config() -> WebhookConfig {
    WebhookConfig::new(SecretString::from(SECRET), false)
}

/// Subscriptions as Stripe has them now; counts fetches; fails while `down`.
#[derive(Default)]
struct Stripe {
    subs: Mutex<HashMap<String, Value>>,
    fetches: AtomicUsize,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl SubscriptionSource for Stripe {
    async fn subscription(&self, id: &str) -> Result<Subscription, ApiError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(ApiError::Rejected {
                status: 503,
                path: format!("/v1/subscriptions/{id}"),
                message: "down".into(),
            });
        }
        let v = self.subs.lock().unwrap().get(id).cloned();
        let v = v.ok_or_else(|| ApiError::Rejected {
            status: 404,
            path: format!("/v1/subscriptions/{id}"),
            message: "No such subscription".into(),
        })?;
        Ok(serde_json::from_value(v).unwrap())
    }
}

/// A subscription in today's shape (periods on the item).
fn sub(id: &str, customer: &str, price: &str, status: &str) -> Value {
    json!({
        "id": id, "object": "subscription", "customer": customer, "status": status,
        "created": 1_773_000_000, "currency": "usd",
        "items": {"object": "list", "data": [{
            "id": format!("si_{id}"), "quantity": 1,
            "current_period_start": 1_773_500_000, "current_period_end": 1_776_178_400,
            "price": {"id": price, "object": "price", "currency": "usd", "unit_amount": 2900,
                      "recurring": {"interval": "month", "interval_count": 1}}
        }], "has_more": false}
    })
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> String {
    json!({
        "id": id, "object": "event", "type": kind, "created": created, "livemode": false,
        "api_version": "2019-12-03", "data": {"object": object}
    })
    .to_string()
}

struct World {
    store: Arc<MemoryStore>,
    stripe: Arc<Stripe>,
    processor: Processor<MemoryStore>,
}

fn world() -> World {
    let store = Arc::new(MemoryStore::default());
    let stripe = Arc::new(Stripe::default());
    let processor = Processor::new(store.clone(), catalog(), stripe.clone());
    World {
        store,
        stripe,
        processor,
    }
}

impl World {
    async fn user(&self, email: &str) -> UserId {
        let user = UserId(Uuid::new_v4());
        self.store
            .create_user(
                user,
                Some(email),
                Tier::Starter,
                catalog().plan(Tier::Starter).limits,
                now(),
            )
            .await
            .unwrap();
        user
    }

    async fn deliver(&self, body: &str) -> Receipt {
        let header = signature_header(body.as_bytes(), SECRET, now().timestamp());
        receive(
            self.store.as_ref(),
            &config(),
            body.as_bytes(),
            Some(&header),
            now(),
        )
        .await
        .unwrap()
    }

    async fn run(&self) -> ProcessStats {
        self.processor.process_pending(100, 5, now()).await.unwrap()
    }

    async fn profile(&self, user: UserId) -> UserProfile {
        self.store.user(user).await.unwrap().unwrap()
    }

    async fn events(&self, user: UserId) -> Vec<SubscriptionEvent> {
        self.store.subscription_events(user).await.unwrap()
    }

    /// Stripe has `sub_1` of `cus_1` on `price`; a checkout of it completes with `payment`.
    async fn checkout(&self, user: Option<UserId>, email: &str, price: &str, payment: &str) {
        self.stripe_has(sub("sub_1", "cus_1", price, "active"));
        self.deliver(&event(
            "evt_c1",
            "checkout.session.completed",
            1_773_600_000,
            checkout_completed("cs_1", user, email, payment),
        ))
        .await;
    }

    fn stripe_has(&self, sub: Value) {
        let id = sub["id"].as_str().unwrap().to_owned();
        self.stripe.subs.lock().unwrap().insert(id, sub);
    }
}

fn checkout_completed(id: &str, user: Option<UserId>, email: &str, payment: &str) -> Value {
    json!({
        "id": id, "object": "checkout.session", "mode": "subscription",
        "client_reference_id": user.map(|u| u.to_string()),
        "customer": "cus_1", "customer_details": {"email": email},
        "subscription": "sub_1", "payment_status": payment, "metadata": {"tier": "professional"}
    })
}

#[tokio::test]
async fn receive_stores_verified_events_once_and_writes_nothing_for_bad_requests() {
    let w = world();
    let body = event(
        "evt_1",
        "customer.subscription.updated",
        1_773_600_000,
        json!({"id": "sub_1"}),
    );
    let stored = w.deliver(&body).await;
    assert_eq!(stored, Receipt::Stored("evt_1".into()));
    let duplicate = w.deliver(&body).await;
    assert_eq!(duplicate, Receipt::Duplicate("evt_1".into()));
    assert_eq!(
        [stored.outcome(), duplicate.outcome(), duplicate.event_id()],
        ["stored", "duplicate", "evt_1"]
    );

    let t = now().timestamp();
    let other = event(
        "evt_2",
        "invoice.paid",
        1_773_600_000,
        json!({"id": "in_1"}),
    );
    let cases: Vec<(Vec<u8>, Option<String>, &str)> = vec![
        (other.clone().into_bytes(), None, "missing"),
        (
            other.clone().into_bytes(),
            Some(signature_header(other.as_bytes(), "whsec_other", t)),
            "no v1 signature matches",
        ),
        (
            other.replace("in_1", "in_2").into_bytes(),
            Some(signature_header(other.as_bytes(), SECRET, t)),
            "no v1 signature matches",
        ),
        (
            other.clone().into_bytes(),
            Some(signature_header(other.as_bytes(), SECRET, t - 301)),
            "beyond the tolerance",
        ),
        (
            other.clone().into_bytes(),
            Some("t=abc,v1=00".into()),
            "cannot be read",
        ),
        (
            b"not json".to_vec(),
            Some(signature_header(b"not json", SECRET, t)),
            "not a Stripe event",
        ),
        (
            br#"{"id":"evt_3","type":"x","created":1,"livemode":false,"data":{"object":7}}"#
                .to_vec(),
            Some(signature_header(
                br#"{"id":"evt_3","type":"x","created":1,"livemode":false,"data":{"object":7}}"#,
                SECRET,
                t,
            )),
            "not an object",
        ),
    ];
    for (body, header, expected) in cases {
        let err = receive(w.store.as_ref(), &config(), &body, header.as_deref(), now())
            .await
            .unwrap_err();
        assert!(err.is_client_error());
        assert!(err.to_string().contains(expected), "{err} / {expected}");
    }
    let no_secret = WebhookConfig::new(SecretString::from(""), false);
    let header = signature_header(other.as_bytes(), SECRET, t);
    let err = receive(
        w.store.as_ref(),
        &no_secret,
        other.as_bytes(),
        Some(&header),
        now(),
    )
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        ReceiveError::Signature(SignatureError::MissingSecret)
    ));

    // A live event on a test server: answered, not stored.
    let live = body
        .replace("\"livemode\":false", "\"livemode\":true")
        .replace("evt_1", "evt_live");
    let ignored = w.deliver(&live).await;
    assert!(matches!(ignored, Receipt::Ignored { .. }));
    assert_eq!(
        (ignored.outcome(), ignored.event_id()),
        ("ignored", "evt_live")
    );

    let pending = w.store.pending(100, 5).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|p| p.event.event_id.as_str())
            .collect::<Vec<_>>(),
        ["evt_1"],
        "only the one verified event of this mode"
    );
    assert_eq!(
        pending[0].event.payload, body,
        "the body exactly as received"
    );
}

#[tokio::test]
async fn a_paid_checkout_upgrades_the_user_with_the_subscriptions_price() {
    let w = world();
    let user = w.user("ada@example.com").await;
    w.checkout(Some(user), "ada@example.com", "price_pro", "paid")
        .await;
    assert_eq!(
        w.run().await,
        ProcessStats {
            applied: 1,
            unchanged: 0,
            failed: 0
        }
    );
    let p = w.profile(user).await;
    assert_eq!(p.tier, Tier::Professional);
    assert_eq!(p.subscription_status.as_deref(), Some("active"));
    assert_eq!(p.stripe_customer_id.as_deref(), Some("cus_1"));
    assert_eq!(p.stripe_subscription_id.as_deref(), Some("sub_1"));
    assert_eq!(p.limits, catalog().plan(Tier::Professional).limits);
    assert_eq!(
        p.current_period_start.map(|d| d.timestamp()),
        Some(1_773_500_000)
    );
    assert_eq!(
        p.current_period_end.map(|d| d.timestamp()),
        Some(1_776_178_400)
    );
    let sub = w.store.user_subscription(user).await.unwrap().unwrap();
    assert_eq!(
        (sub.tier, sub.price_id.as_deref()),
        (Tier::Professional, Some("price_pro"))
    );
    let events = w.events(user).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "checkout.session.completed");
    assert!(
        w.store.pending(10, 5).await.unwrap().is_empty(),
        "processed"
    );
}

#[tokio::test]
async fn an_unpaid_checkout_waits_for_the_async_payment() {
    let w = world();
    let user = w.user("ada@example.com").await;
    w.checkout(Some(user), "ada@example.com", "price_biz", "unpaid")
        .await;
    w.run().await;
    assert_eq!(w.profile(user).await.tier, Tier::Starter);
    assert!(w.events(user).await.is_empty());
    w.deliver(&event(
        "evt_c2",
        "checkout.session.async_payment_succeeded",
        1_773_600_100,
        checkout_completed("cs_1", Some(user), "ada@example.com", "paid"),
    ))
    .await;
    w.run().await;
    assert_eq!(w.profile(user).await.tier, Tier::Business);
}

#[tokio::test]
async fn a_checkout_without_reference_finds_the_user_by_email() {
    let w = world();
    let user = w.user("Grace@Example.com").await;
    w.checkout(None, "grace@example.com", "price_ent", "paid")
        .await;
    w.run().await;
    let p = w.profile(user).await;
    assert_eq!(p.tier, Tier::Enterprise);
    assert_eq!(p.limits, Limits::default(), "enterprise is unlimited: None");
}

#[tokio::test]
async fn an_unknown_price_is_starter_and_the_event_says_so() {
    let w = world();
    let user = w.user("ada@example.com").await;
    w.checkout(Some(user), "ada@example.com", "price_mystery", "paid")
        .await;
    w.run().await;
    assert_eq!(w.profile(user).await.tier, Tier::Starter);
    let note = w.events(user).await[0].note.clone().unwrap();
    assert!(note.contains("price_mystery"), "{note}");
}

async fn subscribed(w: &World) -> UserId {
    let user = w.user("ada@example.com").await;
    w.checkout(Some(user), "ada@example.com", "price_pro", "paid")
        .await;
    w.run().await;
    user
}

#[tokio::test]
async fn subscription_events_apply_in_created_order_whatever_the_arrival_order() {
    let w = world();
    let user = subscribed(&w).await;
    let upgrade = event(
        "evt_u2",
        "customer.subscription.updated",
        1_773_600_200,
        sub("sub_1", "cus_1", "price_ent", "active"),
    );
    let older = event(
        "evt_u1",
        "customer.subscription.updated",
        1_773_600_100,
        sub("sub_1", "cus_1", "price_biz", "active"),
    );
    w.deliver(&upgrade).await;
    w.run().await;
    w.deliver(&older).await;
    let stats = w.run().await;
    assert_eq!((stats.applied, stats.unchanged), (0, 1));
    assert_eq!(
        w.profile(user).await.tier,
        Tier::Enterprise,
        "older never overwrites"
    );
    assert_eq!(w.events(user).await.len(), 2);
}

#[tokio::test]
async fn an_event_of_the_same_second_asks_stripe() {
    let w = world();
    let user = subscribed(&w).await;
    let fetches = w.stripe.fetches.load(Ordering::SeqCst);
    // Same `created` as the checkout: the payload says business, Stripe says enterprise now.
    w.stripe_has(sub("sub_1", "cus_1", "price_ent", "active"));
    w.deliver(&event(
        "evt_u1",
        "customer.subscription.updated",
        1_773_600_000,
        sub("sub_1", "cus_1", "price_biz", "active"),
    ))
    .await;
    w.run().await;
    assert_eq!(w.stripe.fetches.load(Ordering::SeqCst), fetches + 1);
    assert_eq!(w.profile(user).await.tier, Tier::Enterprise);
}

#[tokio::test]
async fn deletion_downgrades_to_starter_and_only_for_the_current_subscription() {
    let w = world();
    let user = subscribed(&w).await;
    // The user moved to a new subscription; the old one's deletion changes nothing.
    w.deliver(&event(
        "evt_u1",
        "customer.subscription.created",
        1_773_600_100,
        sub("sub_2", "cus_1", "price_biz", "active"),
    ))
    .await;
    w.deliver(&event(
        "evt_d1",
        "customer.subscription.deleted",
        1_773_600_200,
        sub("sub_1", "cus_1", "price_pro", "canceled"),
    ))
    .await;
    w.run().await;
    let p = w.profile(user).await;
    assert_eq!(
        (p.tier, p.stripe_subscription_id.as_deref()),
        (Tier::Business, Some("sub_2"))
    );
    w.deliver(&event(
        "evt_d2",
        "customer.subscription.deleted",
        1_773_600_300,
        sub("sub_2", "cus_1", "price_biz", "canceled"),
    ))
    .await;
    w.run().await;
    let p = w.profile(user).await;
    assert_eq!(p.tier, Tier::Starter);
    assert_eq!(p.subscription_status.as_deref(), Some("canceled"));
    assert_eq!(p.limits, catalog().plan(Tier::Starter).limits);
    assert_eq!(p.stripe_subscription_id, None);
    assert_eq!(
        p.stripe_customer_id.as_deref(),
        Some("cus_1"),
        "kept for the next checkout"
    );
}

#[tokio::test]
async fn invoices_set_the_status_and_incomplete_subscriptions_grant_nothing() {
    let w = world();
    let user = subscribed(&w).await;
    let invoice = |id: &str| {
        json!({"id": id, "object": "invoice", "customer": "cus_1", "currency": "usd",
               "created": 1_773_600_000,
               "parent": {"type": "subscription_details",
                          "subscription_details": {"subscription": "sub_1"}}})
    };
    w.deliver(&event(
        "evt_i1",
        "invoice.payment_failed",
        1_773_600_100,
        invoice("in_1"),
    ))
    .await;
    w.run().await;
    let p = w.profile(user).await;
    assert_eq!(
        (p.tier, p.subscription_status.as_deref()),
        (Tier::Professional, Some("past_due"))
    );
    w.deliver(&event(
        "evt_i2",
        "invoice.paid",
        1_773_600_200,
        invoice("in_2"),
    ))
    .await;
    w.run().await;
    assert_eq!(
        w.profile(user).await.subscription_status.as_deref(),
        Some("active")
    );

    w.deliver(&event(
        "evt_u3",
        "customer.subscription.updated",
        1_773_600_300,
        sub("sub_1", "cus_1", "price_ent", "incomplete"),
    ))
    .await;
    w.run().await;
    assert_eq!(w.profile(user).await.tier, Tier::Starter, "not paid for");
}

#[tokio::test]
async fn events_for_unknown_users_are_recorded_and_change_nothing() {
    let w = world();
    let user = w.user("ada@example.com").await;
    let before = w.profile(user).await;
    for (id, kind, object) in [
        (
            "evt_n1",
            "customer.subscription.updated",
            sub("sub_9", "cus_9", "price_pro", "active"),
        ),
        (
            "evt_n2",
            "customer.subscription.deleted",
            sub("sub_9", "cus_9", "price_pro", "canceled"),
        ),
        (
            "evt_n3",
            "checkout.session.completed",
            checkout_completed(
                "cs_9",
                Some(UserId(Uuid::new_v4())),
                "nobody@example.com",
                "paid",
            ),
        ),
        ("evt_n4", "customer.created", json!({"id": "cus_9"})),
    ] {
        w.deliver(&event(id, kind, 1_773_600_000, object)).await;
    }
    let stats = w.run().await;
    assert_eq!(
        stats,
        ProcessStats {
            applied: 0,
            unchanged: 4,
            failed: 0
        }
    );
    assert_eq!(w.profile(user).await, before);
    assert!(
        w.store.pending(10, 5).await.unwrap().is_empty(),
        "answered, not retried forever"
    );
}

#[tokio::test]
async fn a_failed_processing_is_retried_not_lost() {
    let w = world();
    let user = w.user("ada@example.com").await;
    w.stripe_has(sub("sub_1", "cus_1", "price_pro", "active"));
    w.stripe.down.store(true, Ordering::SeqCst);
    w.deliver(&event(
        "evt_c1",
        "checkout.session.completed",
        1_773_600_000,
        checkout_completed("cs_1", Some(user), "ada@example.com", "paid"),
    ))
    .await;
    assert_eq!(w.run().await.failed, 1);
    assert_eq!(w.run().await.failed, 1);
    let pending = w.store.pending(10, 5).await.unwrap();
    assert_eq!(pending[0].attempts, 2);
    assert!(pending[0].last_error.as_deref().unwrap().contains("503"));
    assert_eq!(w.profile(user).await.tier, Tier::Starter);
    w.stripe.down.store(false, Ordering::SeqCst);
    assert_eq!(w.run().await.applied, 1);
    assert_eq!(w.profile(user).await.tier, Tier::Professional);
}

#[tokio::test]
async fn the_same_webhook_five_times_at_once_is_one_subscription_event() {
    let w = world();
    let user = subscribed(&w).await;
    let body = event(
        "evt_u5",
        "customer.subscription.updated",
        1_773_600_500,
        sub("sub_1", "cus_1", "price_biz", "active"),
    );
    let receipts = futures::future::join_all((0..5).map(|_| w.deliver(&body))).await;
    assert_eq!(
        receipts
            .iter()
            .filter(|r| matches!(r, Receipt::Stored(_)))
            .count(),
        1
    );
    // Two processors racing over the same inbox still apply it once.
    let stored = w.store.pending(10, 5).await.unwrap()[0].event.clone();
    let (a, b) = tokio::join!(
        w.processor.process(&stored, now()),
        w.processor.process(&stored, now())
    );
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Applied { .. }))
            .count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(w.events(user).await.len(), 2, "checkout + one update");
    assert_eq!(w.profile(user).await.tier, Tier::Business);
}

// ---- checkout and overage against wiremock: the exact requests sent.

fn client(server: &MockServer) -> Client {
    let mut c = ClientConfig::new(SecretString::from("sk_test_x"))
        .with_api_base(&server.uri())
        .unwrap();
    c.min_delay = Duration::from_millis(5);
    c.max_delay = Duration::from_millis(20);
    c.requests_per_second = NonZeroU32::new(1000).unwrap();
    Client::new(c).unwrap()
}

fn form(req: &Request) -> HashMap<String, String> {
    url::form_urlencoded::parse(&req.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn idem(req: &Request) -> String {
    req.headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn checkout_creates_the_customer_once_then_a_subscription_session() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "cus_new"})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"id": "cs_1", "url": "https://checkout.stripe.com/c/pay/cs_1"}),
            ),
        )
        .mount(&server)
        .await;
    let w = world();
    let user = w.user("ada@example.com").await;
    let app = urls();
    let c = client(&server);
    let session = create_checkout(
        &c,
        w.store.as_ref(),
        &catalog(),
        user,
        Tier::Business,
        &app,
        now(),
    )
    .await
    .unwrap();
    assert_eq!(
        session.url.as_deref(),
        Some("https://checkout.stripe.com/c/pay/cs_1")
    );
    create_checkout(
        &c,
        w.store.as_ref(),
        &catalog(),
        user,
        Tier::Professional,
        &app,
        now(),
    )
    .await
    .unwrap();

    let requests = server.received_requests().await.unwrap();
    let customers: Vec<_> = requests
        .iter()
        .filter(|r| r.url.path() == "/v1/customers")
        .collect();
    assert_eq!(customers.len(), 1, "the customer is created once");
    assert_eq!(idem(customers[0]), format!("customer:{user}"));
    let f = form(customers[0]);
    assert_eq!(f["email"], "ada@example.com");
    assert_eq!(f["metadata[user_id]"], user.to_string());
    assert_eq!(
        w.profile(user).await.stripe_customer_id.as_deref(),
        Some("cus_new")
    );

    let sessions: Vec<_> = requests
        .iter()
        .filter(|r| r.url.path() == "/v1/checkout/sessions")
        .collect();
    let expected = |price: &str, tier: &str| -> HashMap<String, String> {
        [
            ("mode", "subscription"),
            ("customer", "cus_new"),
            ("client_reference_id", &user.to_string()),
            ("line_items[0][price]", price),
            ("line_items[0][quantity]", "1"),
            ("metadata[tier]", tier),
            ("metadata[user_id]", &user.to_string()),
            ("subscription_data[metadata][tier]", tier),
            ("subscription_data[metadata][user_id]", &user.to_string()),
            (
                "success_url",
                "https://app.example.com/dashboard?upgraded=true",
            ),
            ("cancel_url", "https://app.example.com/pricing"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    assert_eq!(form(sessions[0]), expected("price_biz", "business"));
    assert_eq!(form(sessions[1]), expected("price_pro", "professional"));
    assert_ne!(
        idem(sessions[0]),
        idem(sessions[1]),
        "each click is its own session"
    );

    let err = create_checkout(
        &c,
        w.store.as_ref(),
        &catalog(),
        user,
        Tier::Starter,
        &app,
        now(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CheckoutError::FreeTier(Tier::Starter)));
    let err = create_checkout(
        &c,
        w.store.as_ref(),
        &Catalog::default(),
        user,
        Tier::Business,
        &app,
        now(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("STRIPE_BUSINESS_PRICE_ID"),
        "{err}"
    );
    let err = create_checkout(
        &c,
        w.store.as_ref(),
        &catalog(),
        UserId(Uuid::new_v4()),
        Tier::Business,
        &app,
        now(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CheckoutError::UnknownUser(_)));
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        3,
        "refusals send nothing"
    );
}

async fn professional_with_usage(
    w: &World,
    insights: u64,
    transactions: u64,
    period: Period,
) -> UserId {
    let user = w.user("ada@example.com").await;
    w.store
        .set_stripe_customer(user, "cus_1", now())
        .await
        .unwrap();
    w.store
        .set_plan(
            user,
            &PlanChange {
                tier: Tier::Professional,
                subscription_status: Some("active".into()),
                stripe_customer_id: None,
                stripe_subscription_id: Some("sub_1".into()),
                current_period_start: Some(period.start),
                current_period_end: Some(period.end),
                limits: catalog().plan(Tier::Professional).limits,
            },
            now(),
        )
        .await
        .unwrap();
    for (meter, amount, key) in [
        (Meter::AiInsight, insights, "ins"),
        (Meter::TransactionVolume, transactions, "ch"),
    ] {
        if amount == 0 {
            continue;
        }
        let r = UsageRecord {
            user,
            meter,
            connection: None,
            amount,
            idempotency_key: key.into(),
            metadata: json!({}),
            at: period.start,
        };
        assert_eq!(
            w.store.record(&r, period, None).await.unwrap(),
            Recorded::New
        );
    }
    user
}

#[tokio::test]
async fn overage_is_invoiced_once_per_period() {
    let server = MockServer::start().await;
    let created: Arc<Mutex<Vec<Value>>> = Arc::default();
    let list = created.clone();
    Mock::given(method("GET"))
        .and(path("/v1/invoiceitems"))
        .and(query_param("customer", "cus_1"))
        .respond_with(move |_: &Request| {
            ResponseTemplate::new(200).set_body_json(
                json!({"object": "list", "data": list.lock().unwrap().clone(), "has_more": false}),
            )
        })
        .mount(&server)
        .await;
    let store_items = created.clone();
    Mock::given(method("POST"))
        .and(path("/v1/invoiceitems"))
        .and(body_string_contains("customer=cus_1"))
        .respond_with(move |req: &Request| {
            let f = form(req);
            let item = json!({"id": format!("ii_{}", f["metadata[meter]"]),
                              "metadata": {"revpilot_overage_key": f["metadata[revpilot_overage_key]"]}});
            store_items.lock().unwrap().push(item.clone());
            ResponseTemplate::new(200).set_body_json(item)
        })
        .mount(&server)
        .await;
    let w = world();
    let period = Period {
        start: Utc.with_ymd_and_hms(2026, 2, 14, 9, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2026, 3, 14, 9, 0, 0).unwrap(),
    };
    // 53 insights (3 over 50) and 102,001 transactions (3 started blocks over 100,000).
    let user = professional_with_usage(&w, 53, 102_001, period).await;
    let c = client(&server);
    let done = invoice_overage(&c, w.store.as_ref(), &catalog(), user, period)
        .await
        .unwrap();
    assert_eq!(done.amount, 330);
    assert_eq!(done.created.len(), 2);
    let posts: Vec<Request> = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method.as_str() == "POST")
        .collect();
    let key = format!("overage:{user}:2026-02-14T09:00:00Z..2026-03-14T09:00:00Z");
    assert_eq!(key, overage_key(user, period));
    let got: Vec<_> = posts
        .iter()
        .map(|r| {
            let f = form(r);
            (
                idem(r),
                f["amount"].clone(),
                f["currency"].clone(),
                f["metadata[revpilot_overage_key]"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                format!("{key}:ai_insight"),
                "300".into(),
                "usd".into(),
                format!("{key}:ai_insight")
            ),
            (
                format!("{key}:transaction_volume"),
                "30".into(),
                "usd".into(),
                format!("{key}:transaction_volume")
            ),
        ]
    );
    assert!(form(&posts[0])["description"].contains("3 x 1.00 USD"));

    // A rerun (days later, past Stripe's idempotency window) bills nothing again.
    let again = invoice_overage(&c, w.store.as_ref(), &catalog(), user, period)
        .await
        .unwrap();
    assert!(again.created.is_empty());
    assert_eq!(again.existing, [Meter::AiInsight, Meter::TransactionVolume]);
    let posts_after = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .count();
    assert_eq!(posts_after, 2);
}

#[tokio::test]
async fn no_overage_sends_nothing() {
    let server = MockServer::start().await;
    let w = world();
    let period = Period {
        start: Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap(),
        end: Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap(),
    };
    let user = professional_with_usage(&w, 50, 100_000, period).await;
    let done = invoice_overage(&client(&server), w.store.as_ref(), &catalog(), user, period)
        .await
        .unwrap();
    assert_eq!(done, OverageInvoiced::default());
    assert!(server.received_requests().await.unwrap().is_empty());
}

/// The example server's return pages.
fn urls() -> ReturnUrls {
    ReturnUrls {
        success: Url::parse("https://app.example.com/dashboard?upgraded=true").unwrap(),
        cancel: Url::parse("https://app.example.com/pricing").unwrap(),
    }
}
