//! The sync and the export against localstripe, a stateful fake Stripe (PyPI), started by this
//! harness on a free loopback port from the virtualenv `scripts/test` creates.
//!
//! localstripe has plans but no `/v1/prices` (the sync falls back to `/v1/plans`), cannot expand
//! discounts (the export falls back to ids), keeps no trials and sends no
//! `customer.subscription.updated`; those parts are covered by the fixture tests of the rebuild
//! and by the fake server the unit tests own.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chrono::Utc;
use revpilot_core::metrics::Engine;
use revpilot_core::ports::SyncStatus;
use revpilot_core::ports::{Meter, ObjectCache, ObjectKind, Period, UsageStore};
use revpilot_core::testing::MemoryStore;
use revpilot_core::{Currency, Rules};
use revpilot_stripe::client::{Client, ClientConfig, idempotency_key};
use revpilot_stripe::export::Export;
use revpilot_stripe::fake::LocalStripe;
use revpilot_stripe::rebuild::rebuild;
use revpilot_stripe::sync::{SyncJob, SyncPorts, Syncer, export_account};
use secrecy::SecretString;
use serde_json::Value;

fn client(base: &str) -> Client {
    let mut cfg = ClientConfig::new(SecretString::from("sk_test_localstripe"))
        .with_api_base(base)
        .unwrap();
    cfg.requests_per_second = std::num::NonZeroU32::new(500).unwrap();
    Client::new(cfg).unwrap()
}

async fn post(c: &Client, path: &str, form: &[(&str, &str)]) -> Value {
    let form: Vec<(&str, String)> = form.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    let body = c
        .post(path, &form, &idempotency_key())
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn localstripe_account_syncs_completely_and_rebuilds() {
    let Some(ls) = LocalStripe::start() else {
        return;
    };
    let c = client(&ls.base);
    let product = post(&c, "/v1/products", &[("name", "Pro"), ("type", "service")]).await;
    let prod = product["id"].as_str().unwrap();
    post(
        &c,
        "/v1/plans",
        &[
            ("id", "plan_monthly"),
            ("amount", "2900"),
            ("currency", "usd"),
            ("interval", "month"),
            ("product", prod),
        ],
    )
    .await;
    post(
        &c,
        "/v1/plans",
        &[
            ("id", "plan_annual"),
            ("amount", "24000"),
            ("currency", "usd"),
            ("interval", "year"),
            ("product", prod),
        ],
    )
    .await;
    // 230 customers (3 pages); 120 of them subscribe (2 pages), some with seats, some cancel.
    let mut expected_cents_x12: i64 = 0;
    for i in 0..230 {
        let cus = post(
            &c,
            "/v1/customers",
            &[("email", &format!("c{i}@example.com"))],
        )
        .await;
        let id = cus["id"].as_str().unwrap().to_owned();
        if i >= 120 {
            continue;
        }
        post(
            &c,
            &format!("/v1/customers/{id}/sources"),
            &[
                ("source[object]", "card"),
                ("source[number]", "4242424242424242"),
                ("source[exp_month]", "12"),
                ("source[exp_year]", "2030"),
                ("source[cvc]", "123"),
            ],
        )
        .await;
        let (plan, qty) = if i % 4 == 0 {
            ("plan_annual", "1")
        } else {
            ("plan_monthly", if i % 3 == 0 { "3" } else { "1" })
        };
        let sub = post(
            &c,
            "/v1/subscriptions",
            &[
                ("customer", &id),
                ("items[0][plan]", plan),
                ("items[0][quantity]", qty),
            ],
        )
        .await;
        let sub_id = sub["id"].as_str().unwrap().to_owned();
        let q: i64 = qty.parse().unwrap();
        if i % 10 == 5 {
            // Canceled now: no MRR.
            c.delete(&format!("/v1/subscriptions/{sub_id}"))
                .await
                .unwrap();
        } else if i % 10 == 7 {
            // Cancels at period end: still paying.
            post(
                &c,
                &format!("/v1/subscriptions/{sub_id}"),
                &[("cancel_at_period_end", "true")],
            )
            .await;
            expected_cents_x12 += if plan == "plan_annual" {
                24000
            } else {
                2900 * 12 * q
            };
        } else {
            expected_cents_x12 += if plan == "plan_annual" {
                24000
            } else {
                2900 * 12 * q
            };
        }
    }

    let now = Utc::now();
    let (store, user, conn) = MemoryStore::with_connection("acct_ls", now).await;
    let store = Arc::new(store);
    let period = Period {
        start: now - chrono::TimeDelta::days(1),
        end: now + chrono::TimeDelta::days(30),
    };
    let ports = SyncPorts::from_store(store.clone());
    let job = SyncJob {
        user,
        connection: conn,
        stripe_account_id: "acct_ls".into(),
        usage: Some((period, None)),
    };
    let syncer = Syncer::new(client(&ls.base), ports);
    let (status, outcome) = syncer.run(&job, &|_| {}).await.unwrap();
    assert_eq!(status, SyncStatus::Succeeded, "{outcome:?}");
    let count = |k: ObjectKind| {
        let store = store.clone();
        async move { store.objects(user, conn, k).await.unwrap() }
    };
    let customers = count(ObjectKind::Customer).await;
    assert_eq!(customers.len(), 230);
    let mut ids: Vec<&str> = customers.iter().map(|o| o.stripe_id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 230, "each customer exactly once");
    assert_eq!(
        count(ObjectKind::Subscription).await.len(),
        120,
        "every status, canceled included"
    );
    assert_eq!(
        count(ObjectKind::Price).await.len(),
        2,
        "plans, where /v1/prices is missing"
    );
    let charges = count(ObjectKind::Charge).await.len();
    assert!(charges >= 120, "{charges} charges");
    assert_eq!(outcome.objects["customer"], 230);
    assert_eq!(
        store
            .used(user, Meter::TransactionVolume, period)
            .await
            .unwrap(),
        charges as u64
    );

    // Again: events only, nothing counted twice.
    let (status, _) = syncer.run(&job, &|_| {}).await.unwrap();
    assert_eq!(status, SyncStatus::Succeeded);
    assert_eq!(count(ObjectKind::Customer).await.len(), 230);
    assert_eq!(
        store
            .used(user, Meter::TransactionVolume, period)
            .await
            .unwrap(),
        charges as u64
    );

    // What the sync cached rebuilds to the MRR the subscriptions say.
    let mut cached = Vec::new();
    for kind in ObjectKind::ALL {
        cached.extend(count(kind).await);
    }
    let from_cache = rebuild(&Export::from_cached(&cached).unwrap());
    let mrr = Engine::new(&from_cache.account, Rules::default(), Currency::USD)
        .mrr_at(Utc::now() + chrono::TimeDelta::minutes(1))
        .unwrap()
        .total;
    assert_eq!(
        Currency::USD.round(mrr * rust_decimal::Decimal::from(1200)),
        rust_decimal::Decimal::from(expected_cents_x12),
        "from the cache; issues: {:?}",
        from_cache.issues
    );

    // The export of the same account rebuilds to the MRR the subscriptions say.
    let raw = export_account(&client(&ls.base), &|_| {}).await.unwrap();
    let export = Export::from_json(serde_json::to_string(&raw).unwrap().as_bytes()).unwrap();
    assert_eq!(export.customers.len(), 230);
    let rebuilt = rebuild(&export);
    let mrr = Engine::new(&rebuilt.account, Rules::default(), Currency::USD)
        .mrr_at(Utc::now() + chrono::TimeDelta::minutes(1))
        .unwrap()
        .total;
    assert_eq!(
        Currency::USD.round(mrr * rust_decimal::Decimal::from(1200)),
        rust_decimal::Decimal::from(expected_cents_x12),
        "issues: {:?}",
        rebuilt.issues
    );
}

/// Checkout's customer and the overage invoice items against localstripe, which has customers
/// and invoice items (and no Checkout Sessions: that part is the wiremock test's).
#[tokio::test]
async fn localstripe_takes_the_checkout_customer_and_the_overage_items_once() {
    use revpilot_core::billing::Catalog;
    use revpilot_core::ports::{PlanChange, Recorded, Tier, UsageRecord, UserId, UserStore};
    use revpilot_stripe::billing::{CheckoutError, create_checkout, invoice_overage};

    let Some(ls) = LocalStripe::start() else {
        return;
    };
    let c = client(&ls.base);
    let store = MemoryStore::default();
    let now = Utc::now();
    let user = UserId(uuid::Uuid::new_v4());
    let catalog = Catalog::default()
        .with_price_ids_from(|name| {
            (name == "STRIPE_PROFESSIONAL_PRICE_ID").then(|| "price_pro".to_owned())
        })
        .unwrap();
    store
        .create_user(
            user,
            Some("ada@example.com"),
            Tier::Starter,
            catalog.plan(Tier::Starter).limits,
            now,
        )
        .await
        .unwrap();

    // The customer is created (with the user's email and id); the session endpoint is missing.
    let app = revpilot_stripe::billing::ReturnUrls {
        success: url::Url::parse("http://127.0.0.1:3000/dashboard?upgraded=true").unwrap(),
        cancel: url::Url::parse("http://127.0.0.1:3000/pricing").unwrap(),
    };
    let err = create_checkout(&c, &store, &catalog, user, Tier::Professional, &app, now)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CheckoutError::Stripe(e) if e.is_not_found()),
        "{err}"
    );
    let profile = store.user(user).await.unwrap().unwrap();
    let customer = profile.stripe_customer_id.clone().unwrap();
    let got: Value = serde_json::from_slice(
        &c.get(&format!("/v1/customers/{customer}"), &[])
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(got["email"], "ada@example.com");
    assert_eq!(got["metadata"]["user_id"], user.to_string());

    // A professional period with 3 insights and 2,500 transactions over the plan.
    let period = Period {
        start: now - chrono::TimeDelta::days(30),
        end: now,
    };
    store
        .set_plan(
            user,
            &PlanChange {
                tier: Tier::Professional,
                subscription_status: Some("active".into()),
                stripe_customer_id: None,
                stripe_subscription_id: Some("sub_x".into()),
                current_period_start: Some(period.start),
                current_period_end: Some(period.end),
                limits: catalog.plan(Tier::Professional).limits,
            },
            now,
        )
        .await
        .unwrap();
    for (meter, amount) in [(Meter::AiInsight, 53), (Meter::TransactionVolume, 102_500)] {
        let r = UsageRecord {
            user,
            meter,
            connection: None,
            amount,
            idempotency_key: meter.as_str().into(),
            metadata: serde_json::json!({}),
            at: period.start,
        };
        assert_eq!(store.record(&r, period, None).await.unwrap(), Recorded::New);
    }
    let first = invoice_overage(&c, &store, &catalog, user, period)
        .await
        .unwrap();
    assert_eq!((first.amount, first.created.len()), (300 + 30, 2));
    let again = invoice_overage(&c, &store, &catalog, user, period)
        .await
        .unwrap();
    assert!(again.created.is_empty(), "{again:?}");
    let items: Value = serde_json::from_slice(
        &c.get("/v1/invoiceitems", &[("customer", customer.clone())])
            .await
            .unwrap(),
    )
    .unwrap();
    let mut amounts: Vec<i64> = items["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["amount"].as_i64().unwrap())
        .collect();
    amounts.sort_unstable();
    assert_eq!(amounts, [30, 300], "billed once, to the cent");
}
