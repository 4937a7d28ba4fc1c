//! The conformance suite every storage backend runs: one async function per guarantee, each
//! panicking with a message when the store breaks its contract. Concurrency is real: the calls of
//! a test are in flight together (`join_all`), which for a database means many connections.
//!
//! Each function needs a fresh, empty store.

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use futures::future::join_all;
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::metrics::SeriesRow;
use crate::ports::{
    Applied, BillingStore, RunOutcome, SubscriptionEvent, SyncStateStore, SyncStatus,
    UserSubscription,
};
use crate::ports::{
    CachedObject, ConnectionId, ConnectionStore, InboxEvent, Inserted, Limits, Meter,
    NewConnection, OAuthStateStore, ObjectCache, ObjectKind, Period, PlanChange, Recorded,
    SnapshotStore, StoreError, Tier, Tokens, UpsertStats, UsageRecord, UsageStore, UserId,
    UserStore, WebhookInbox,
};

fn t(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, day, hour, 0, 0)
        .single()
        .expect("valid instant")
}

fn march() -> Period {
    Period {
        start: t(1, 0),
        end: Utc
            .with_ymd_and_hms(2024, 4, 1, 0, 0, 0)
            .single()
            .expect("valid instant"),
    }
}

fn starter() -> Limits {
    Limits {
        scenarios: Some(0),
        ai_insights: Some(5),
        transaction_volume: Some(10_000),
    }
}

fn usage(user: UserId, key: &str, at: DateTime<Utc>) -> UsageRecord {
    UsageRecord {
        user,
        meter: Meter::AiInsight,
        connection: None,
        amount: 1,
        idempotency_key: key.to_owned(),
        metadata: serde_json::json!({"insight": key}),
        at,
    }
}

async fn new_user<S: UserStore + ?Sized>(store: &S, email: &str) -> UserId {
    let user = UserId(Uuid::new_v4());
    store
        .create_user(user, Some(email), Tier::Starter, starter(), t(1, 0))
        .await
        .expect("create user");
    user
}

fn tokens(access: &str) -> Tokens {
    Tokens {
        access_token: SecretString::from(access.to_owned()),
        refresh_token: Some(SecretString::from(format!("{access}-refresh"))),
    }
}

async fn new_connection<S: ConnectionStore + ?Sized>(
    store: &S,
    user: UserId,
    account: &str,
) -> ConnectionId {
    store
        .save_connection(
            NewConnection {
                user,
                stripe_account_id: account.to_owned(),
                business_name: Some("Acme".into()),
                currency: Some("usd".into()),
                tokens: tokens("sk_access"),
            },
            t(2, 0),
        )
        .await
        .expect("save connection")
        .id
}

/// Profiles: creation, lookups, plan changes, unlimited as `None`.
pub async fn users<S: UserStore + ?Sized>(store: &S) {
    let user = new_user(store, "Ada@Example.com").await;
    let again = store
        .create_user(
            user,
            Some("other@example.com"),
            Tier::Starter,
            starter(),
            t(1, 0),
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict(_))),
        "an existing user is a conflict: {again:?}"
    );
    let email_taken = store
        .create_user(
            UserId(Uuid::new_v4()),
            Some("ada@example.com"),
            Tier::Starter,
            starter(),
            t(1, 0),
        )
        .await;
    assert!(
        matches!(email_taken, Err(StoreError::Conflict(_))),
        "emails are unique, case-insensitively"
    );

    let found = store
        .user_by_email("ADA@example.com")
        .await
        .expect("lookup")
        .expect("found by email");
    assert_eq!(found.user_id, user);
    assert_eq!(found.tier, Tier::Starter);
    assert_eq!(found.limits, starter());
    assert!(
        store
            .user(UserId(Uuid::new_v4()))
            .await
            .expect("lookup")
            .is_none()
    );
    assert!(
        store
            .user_by_stripe_customer("cus_nobody")
            .await
            .expect("lookup")
            .is_none()
    );

    let unlimited = Limits {
        scenarios: None,
        ai_insights: None,
        transaction_volume: None,
    };
    let change = PlanChange {
        tier: Tier::Enterprise,
        subscription_status: Some("active".into()),
        stripe_customer_id: Some("cus_1".into()),
        stripe_subscription_id: Some("sub_1".into()),
        current_period_start: Some(t(1, 0)),
        current_period_end: Some(t(31, 0)),
        limits: unlimited,
    };
    let p = store
        .set_plan(user, &change, t(3, 0))
        .await
        .expect("set plan");
    assert_eq!(
        (p.tier, p.limits, p.updated_at),
        (Tier::Enterprise, unlimited, t(3, 0))
    );
    assert_eq!(
        (p.current_period_start, p.current_period_end),
        (Some(t(1, 0)), Some(t(31, 0)))
    );
    assert_eq!(
        store
            .user_by_stripe_customer("cus_1")
            .await
            .expect("lookup")
            .map(|p| p.user_id),
        Some(user)
    );
    assert_eq!(
        store
            .user_by_stripe_subscription("sub_1")
            .await
            .expect("lookup")
            .map(|p| p.user_id),
        Some(user)
    );
    // A downgrade without a customer id keeps the stored one.
    let down = PlanChange {
        tier: Tier::Starter,
        subscription_status: Some("canceled".into()),
        stripe_customer_id: None,
        stripe_subscription_id: None,
        current_period_start: None,
        current_period_end: None,
        limits: starter(),
    };
    let p = store
        .set_plan(user, &down, t(4, 0))
        .await
        .expect("set plan");
    assert_eq!(p.stripe_customer_id.as_deref(), Some("cus_1"));
    assert_eq!(
        (p.tier, p.stripe_subscription_id.as_deref()),
        (Tier::Starter, None)
    );
    let missing = store.set_plan(UserId(Uuid::new_v4()), &down, t(4, 0)).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));

    // The Stripe customer is set once: a second (racing) request gets the first one's id.
    let other = new_user(store, "other-customer@example.com").await;
    let p = store
        .set_stripe_customer(other, "cus_2", t(5, 0))
        .await
        .expect("set customer");
    assert_eq!(p.stripe_customer_id.as_deref(), Some("cus_2"));
    let p = store
        .set_stripe_customer(other, "cus_3", t(5, 1))
        .await
        .expect("set customer");
    assert_eq!(
        p.stripe_customer_id.as_deref(),
        Some("cus_2"),
        "first one kept"
    );
    let taken = store
        .set_stripe_customer(new_user(store, "third@example.com").await, "cus_2", t(5, 2))
        .await;
    assert!(matches!(taken, Err(StoreError::Conflict(_))), "{taken:?}");
    let missing = store
        .set_stripe_customer(UserId(Uuid::new_v4()), "cus_9", t(5, 3))
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));
}

/// The same idempotency key recorded five times at once is one event.
pub async fn usage_is_idempotent_under_concurrency<S: UserStore + UsageStore + ?Sized>(store: &S) {
    let user = new_user(store, "idem@example.com").await;
    let record = usage(user, "insight-1", t(5, 0));
    let results = join_all((0..5).map(|_| store.record(&record, march(), Some(100)))).await;
    let new = results
        .iter()
        .filter(|r| matches!(r, Ok(Recorded::New)))
        .count();
    let dup = results
        .iter()
        .filter(|r| matches!(r, Ok(Recorded::Duplicate)))
        .count();
    assert_eq!(
        (new, dup),
        (1, 4),
        "one event, four duplicates: {results:?}"
    );
    assert_eq!(
        store
            .used(user, Meter::AiInsight, march())
            .await
            .expect("used"),
        1
    );
    // No expiry: the key is a duplicate next year too, and in another period.
    let later = usage(user, "insight-1", t(20, 0) + Duration::days(365));
    assert_eq!(
        store.record(&later, march(), None).await.expect("record"),
        Recorded::Duplicate
    );
    // Keys are per user.
    let other = new_user(store, "other-idem@example.com").await;
    assert_eq!(
        store
            .record(&usage(other, "insight-1", t(5, 0)), march(), None)
            .await
            .expect("record"),
        Recorded::New
    );
}

/// A batch records as its records would one by one: a stored key and a key repeated in the
/// batch are duplicates, and the first record past the limit stops the batch, the ones before
/// it kept, it and the ones after it not written.
pub async fn usage_batches<S: UserStore + UsageStore + ?Sized>(store: &S) {
    let user = new_user(store, "batch@example.com").await;
    assert_eq!(
        store
            .record(&usage(user, "b0", t(5, 0)), march(), None)
            .await
            .expect("record"),
        Recorded::New
    );
    let batch: Vec<UsageRecord> = ["b0", "b1", "b2", "b1", "b3"]
        .iter()
        .map(|k| usage(user, k, t(5, 1)))
        .collect();
    assert_eq!(
        store
            .record_all(&batch, march(), Some(10))
            .await
            .expect("batch"),
        vec![
            Recorded::Duplicate,
            Recorded::New,
            Recorded::New,
            Recorded::Duplicate,
            Recorded::New
        ]
    );
    async fn used<S: UsageStore + ?Sized>(store: &S, user: UserId) -> u64 {
        store
            .used(user, Meter::AiInsight, march())
            .await
            .expect("used")
    }
    assert_eq!(used(store, user).await, 4);
    // Limit 6 with 4 used: c0 and c1 fit, c2 is refused, c3 is never tried.
    let batch: Vec<UsageRecord> = ["c0", "b2", "c1", "c2", "c3"]
        .iter()
        .map(|k| usage(user, k, t(5, 2)))
        .collect();
    let refused = store.record_all(&batch, march(), Some(6)).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::LimitExceeded {
                meter: Meter::AiInsight,
                limit: 6,
                used: 6
            })
        ),
        "{refused:?}"
    );
    assert_eq!(used(store, user).await, 6, "c0 and c1 kept");
    // Without a limit, c2 and c3 were never written: they are new now, c0 is not.
    let again: Vec<UsageRecord> = ["c2", "c3", "c0"]
        .iter()
        .map(|k| usage(user, k, t(5, 3)))
        .collect();
    assert_eq!(
        store
            .record_all(&again, march(), None)
            .await
            .expect("batch"),
        vec![Recorded::New, Recorded::New, Recorded::Duplicate]
    );
    assert_eq!(used(store, user).await, 8);
    // Records of two users in one batch: each user's keys and counters.
    let other = new_user(store, "batch-other@example.com").await;
    let mixed = vec![usage(other, "b0", t(5, 4)), usage(user, "b0", t(5, 4))];
    assert_eq!(
        store
            .record_all(&mixed, march(), None)
            .await
            .expect("batch"),
        vec![Recorded::New, Recorded::Duplicate]
    );
    assert_eq!(used(store, user).await, 8);
    assert!(
        store
            .record_all(&[], march(), Some(0))
            .await
            .expect("empty")
            .is_empty()
    );
}

/// With a limit of 10 and 50 concurrent attempts, exactly 10 succeed.
pub async fn usage_limit_holds_under_concurrency<S: UserStore + UsageStore + ?Sized>(store: &S) {
    let user = new_user(store, "limit@example.com").await;
    let records: Vec<UsageRecord> = (0..50)
        .map(|i| usage(user, &format!("k{i}"), t(6, 0)))
        .collect();
    let results = join_all(records.iter().map(|r| store.record(r, march(), Some(10)))).await;
    let ok = results
        .iter()
        .filter(|r| matches!(r, Ok(Recorded::New)))
        .count();
    let refused = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(StoreError::LimitExceeded {
                    meter: Meter::AiInsight,
                    limit: 10,
                    ..
                })
            )
        })
        .count();
    assert_eq!(
        (ok, refused),
        (10, 40),
        "{:?}",
        results
            .iter()
            .find(|r| !matches!(r, Ok(_) | Err(StoreError::LimitExceeded { .. })))
    );
    assert_eq!(
        store
            .used(user, Meter::AiInsight, march())
            .await
            .expect("used"),
        10
    );
    // Usage outside the period does not count against it.
    let april = usage(
        user,
        "april",
        Utc.with_ymd_and_hms(2024, 4, 2, 0, 0, 0)
            .single()
            .expect("valid"),
    );
    let april_period = Period {
        start: march().end,
        end: Utc
            .with_ymd_and_hms(2024, 5, 1, 0, 0, 0)
            .single()
            .expect("valid"),
    };
    assert_eq!(
        store
            .record(&april, april_period, Some(10))
            .await
            .expect("record"),
        Recorded::New
    );
    // A different meter has its own count.
    let mut volume = usage(user, "ch_1", t(6, 0));
    volume.meter = Meter::TransactionVolume;
    volume.amount = 7;
    assert_eq!(
        store
            .record(&volume, march(), Some(10))
            .await
            .expect("record"),
        Recorded::New
    );
    assert_eq!(
        store
            .used(user, Meter::TransactionVolume, march())
            .await
            .expect("used"),
        7
    );
}

/// Reservations count against the limit until committed or released.
pub async fn usage_reservations<S: UserStore + UsageStore + ?Sized>(store: &S) {
    let user = new_user(store, "reserve@example.com").await;
    let a = usage(user, "a", t(7, 0));
    let b = usage(user, "b", t(7, 1));
    assert_eq!(
        store.reserve(&a, march(), Some(1)).await.expect("reserve"),
        Recorded::New
    );
    let full = store.reserve(&b, march(), Some(1)).await;
    assert!(
        matches!(full, Err(StoreError::LimitExceeded { used: 1, .. })),
        "a reservation holds its unit: {full:?}"
    );
    assert_eq!(
        store
            .used(user, Meter::AiInsight, march())
            .await
            .expect("used"),
        0,
        "reserved is not used"
    );
    store.release(user, "a").await.expect("release");
    assert_eq!(
        store.reserve(&b, march(), Some(1)).await.expect("reserve"),
        Recorded::New
    );
    store.commit(user, "b").await.expect("commit");
    assert_eq!(
        store
            .used(user, Meter::AiInsight, march())
            .await
            .expect("used"),
        1
    );
    assert!(
        matches!(store.release(user, "b").await, Err(StoreError::NotFound(_))),
        "committed usage is never released"
    );
    assert!(
        matches!(store.commit(user, "b").await, Err(StoreError::NotFound(_))),
        "a commit happens once"
    );
    assert!(matches!(
        store.commit(user, "nothing").await,
        Err(StoreError::NotFound(_))
    ));
    // A released key may be reserved again (the work is retried).
    assert_eq!(
        store.reserve(&a, march(), Some(2)).await.expect("reserve"),
        Recorded::New
    );
}

fn inbox_event(id: &str, created: DateTime<Utc>) -> InboxEvent {
    InboxEvent {
        event_id: id.to_owned(),
        event_type: "customer.subscription.updated".into(),
        created,
        livemode: false,
        payload: format!(r#"{{"id":"{id}"}}"#),
        received_at: created + Duration::seconds(2),
    }
}

/// The inbox stores each event id once, keeps failed events pending, never loses one.
pub async fn webhook_inbox<S: WebhookInbox + ?Sized>(store: &S) {
    let first = inbox_event("evt_1", t(8, 2));
    let results = join_all((0..5).map(|_| store.insert(&first))).await;
    let new = results
        .iter()
        .filter(|r| matches!(r, Ok(Inserted::New)))
        .count();
    assert_eq!(
        new, 1,
        "one of five concurrent deliveries is new: {results:?}"
    );
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(
        store
            .insert(&inbox_event("evt_0", t(8, 1)))
            .await
            .expect("insert"),
        Inserted::New
    );

    let pending = store.pending(10, 3).await.expect("pending");
    let ids: Vec<&str> = pending.iter().map(|p| p.event.event_id.as_str()).collect();
    assert_eq!(ids, ["evt_0", "evt_1"], "oldest created first");
    assert_eq!(
        pending[1].event,
        inbox_event("evt_1", t(8, 2)),
        "stored exactly"
    );

    store
        .mark_failed("evt_0", "boom")
        .await
        .expect("mark failed");
    let p = store.pending(10, 3).await.expect("pending");
    assert_eq!(
        (p[0].attempts, p[0].last_error.as_deref()),
        (1, Some("boom"))
    );
    store
        .mark_failed("evt_0", "boom again")
        .await
        .expect("mark failed");
    assert_eq!(
        store.pending(10, 2).await.expect("pending").len(),
        1,
        "events at max attempts wait"
    );

    store
        .mark_processed("evt_1", t(8, 3))
        .await
        .expect("processed");
    assert!(
        store
            .pending(10, 3)
            .await
            .expect("pending")
            .iter()
            .all(|p| p.event.event_id != "evt_1")
    );
    assert_eq!(
        store
            .insert(&inbox_event("evt_1", t(8, 2)))
            .await
            .expect("insert"),
        Inserted::Duplicate,
        "a processed event stays a duplicate"
    );
    assert!(matches!(
        store.mark_processed("evt_missing", t(8, 3)).await,
        Err(StoreError::NotFound(_))
    ));
}

fn object(kind: ObjectKind, id: &str, version: DateTime<Utc>, data: &str) -> CachedObject {
    CachedObject {
        kind,
        stripe_id: id.to_owned(),
        version,
        data: data.to_owned(),
        customer: None,
    }
}

/// What a sync changed, one customer's objects, objects by id: each read takes the owner.
pub async fn object_cache_reads<S: UserStore + ConnectionStore + ObjectCache + ?Sized>(store: &S) {
    let owner = new_user(store, "reads@example.com").await;
    let stranger = new_user(store, "reads-stranger@example.com").await;
    let conn = new_connection(store, owner, "acct_reads").await;
    let of = |kind, id: &str, customer: Option<&str>, data: &str| CachedObject {
        customer: customer.map(str::to_owned),
        ..object(kind, id, t(9, 1), data)
    };
    let first = vec![
        of(ObjectKind::Customer, "cus_a", Some("cus_a"), "{}"),
        of(ObjectKind::Customer, "cus_b", Some("cus_b"), "{}"),
        of(ObjectKind::Charge, "ch_1", Some("cus_a"), "{}"),
        of(ObjectKind::Charge, "ch_2", Some("cus_b"), "{}"),
        of(ObjectKind::Charge, "ch_3", None, "{}"),
        of(ObjectKind::Charge, "ch_4", Some("cus_a"), "{}"),
    ];
    store.upsert_objects(conn, &first).await.expect("upsert");
    let ids = |objects: Vec<CachedObject>| -> Vec<String> {
        objects.into_iter().map(|o| o.stripe_id).collect()
    };
    let mine = store
        .objects_of_customers(owner, conn, ObjectKind::Charge, &["cus_a".to_owned()])
        .await
        .expect("read");
    assert_eq!(
        mine.iter()
            .map(|o| o.customer.as_deref())
            .collect::<Vec<_>>(),
        vec![Some("cus_a"), Some("cus_a")],
        "the customer reads back"
    );
    assert_eq!(ids(mine), ["ch_1", "ch_4"]);
    assert_eq!(
        ids(store
            .objects_by_ids(
                owner,
                conn,
                ObjectKind::Charge,
                &["ch_3".into(), "ch_9".into(), "ch_2".into()]
            )
            .await
            .expect("read")),
        ["ch_2", "ch_3"]
    );
    // Written since: only what a later write inserted or changed, paged by id.
    let mark = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut later = vec![
        of(
            ObjectKind::Charge,
            "ch_2",
            Some("cus_b"),
            r#"{"refunded":true}"#,
        ),
        of(ObjectKind::Charge, "ch_5", Some("cus_b"), "{}"),
        of(ObjectKind::Charge, "ch_6", Some("cus_c"), "{}"),
        // Unchanged: not written again.
        of(ObjectKind::Charge, "ch_1", Some("cus_a"), "{}"),
    ];
    for o in &mut later {
        o.version = t(9, 2);
    }
    store.upsert_objects(conn, &later).await.expect("upsert");
    let since = |after: Option<&'static str>, limit| {
        store.objects_written_since(owner, conn, ObjectKind::Charge, mark, after, limit)
    };
    assert_eq!(ids(since(None, 2).await.expect("read")), ["ch_2", "ch_5"]);
    assert_eq!(ids(since(Some("ch_5"), 10).await.expect("read")), ["ch_6"]);
    assert!(
        store
            .objects_written_since(owner, conn, ObjectKind::Customer, mark, None, 10)
            .await
            .expect("read")
            .is_empty()
    );
    for read in [
        store
            .objects_written_since(stranger, conn, ObjectKind::Charge, mark, None, 10)
            .await,
        store
            .objects_of_customers(stranger, conn, ObjectKind::Charge, &["cus_a".to_owned()])
            .await,
        store
            .objects_by_ids(stranger, conn, ObjectKind::Charge, &["ch_1".to_owned()])
            .await,
    ] {
        assert!(read.expect("read").is_empty());
    }
}

/// Versioned upserts: an older version never overwrites a newer one; no change, no write.
pub async fn object_cache<S: UserStore + ConnectionStore + ObjectCache + ?Sized>(store: &S) {
    let owner = new_user(store, "cache@example.com").await;
    let stranger = new_user(store, "stranger@example.com").await;
    let conn = new_connection(store, owner, "acct_cache").await;
    let sub = |v: DateTime<Utc>, d: &str| object(ObjectKind::Subscription, "sub_1", v, d);

    let s = store
        .upsert_objects(conn, &[sub(t(9, 1), r#"{"status":"active"}"#)])
        .await
        .expect("upsert");
    assert_eq!(
        s,
        UpsertStats {
            inserted: 1,
            updated: 0,
            skipped: 0
        }
    );
    let s = store
        .upsert_objects(conn, &[sub(t(9, 3), r#"{"status":"past_due"}"#)])
        .await
        .expect("upsert");
    assert_eq!(s.updated, 1);
    let s = store
        .upsert_objects(conn, &[sub(t(9, 2), r#"{"status":"canceled"}"#)])
        .await
        .expect("upsert");
    assert_eq!(s.skipped, 1, "an older version is skipped");
    let s = store
        .upsert_objects(conn, &[sub(t(9, 4), r#"{"status":"past_due"}"#)])
        .await
        .expect("upsert");
    assert_eq!(s.skipped, 1, "identical data is not rewritten");
    let stored = store
        .objects(owner, conn, ObjectKind::Subscription)
        .await
        .expect("read");
    assert_eq!(stored, vec![sub(t(9, 3), r#"{"status":"past_due"}"#)]);

    // Tenant isolation: another user's read of this connection finds nothing.
    assert!(
        store
            .objects(stranger, conn, ObjectKind::Subscription)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(matches!(
        store
            .upsert_objects(ConnectionId(Uuid::new_v4()), &[sub(t(9, 1), "{}")])
            .await,
        Err(StoreError::NotFound(_))
    ));

    // A bulk upsert of thousands in one call, kinds kept apart.
    let many: Vec<CachedObject> = (0..2_500)
        .map(|i| {
            object(
                ObjectKind::Customer,
                &format!("cus_{i:05}"),
                t(10, 0),
                &format!(r#"{{"n":{i}}}"#),
            )
        })
        .collect();
    let s = store
        .upsert_objects(conn, &many)
        .await
        .expect("bulk upsert");
    assert_eq!(s.inserted, 2_500);
    let customers = store
        .objects(owner, conn, ObjectKind::Customer)
        .await
        .expect("read");
    assert_eq!(customers.len(), 2_500);
    // Read page by page, the same objects in the same order, each once; none for a stranger.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .objects_page(owner, conn, ObjectKind::Customer, after.as_deref(), 700)
            .await
            .expect("read a page");
        assert!(page.len() <= 700, "a page holds at most its limit");
        let Some(last) = page.last() else { break };
        after = Some(last.stripe_id.clone());
        paged.extend(page);
    }
    assert_eq!(paged, customers, "the pages cover every object once, by id");
    assert!(
        store
            .objects_page(stranger, conn, ObjectKind::Customer, None, 700)
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(
        store
            .objects_page(owner, conn, ObjectKind::Subscription, Some(""), 10)
            .await
            .expect("read")
            .len(),
        1,
        "kinds stay apart"
    );
    assert_eq!(
        store
            .objects(owner, conn, ObjectKind::Subscription)
            .await
            .expect("read")
            .len(),
        1
    );

    // Ten versions of one object upserted at once, in shuffled order: the newest survives.
    let versions: Vec<CachedObject> = (0..10u32)
        .map(|i| {
            let minute = i64::from((i * 3) % 10);
            object(
                ObjectKind::Invoice,
                "in_race",
                t(11, 0) + Duration::minutes(minute),
                &format!(r#"{{"v":{minute}}}"#),
            )
        })
        .collect();
    let results = join_all(
        versions
            .iter()
            .map(|o| store.upsert_objects(conn, std::slice::from_ref(o))),
    )
    .await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let stored = store
        .objects(owner, conn, ObjectKind::Invoice)
        .await
        .expect("read");
    assert_eq!(
        stored,
        vec![object(
            ObjectKind::Invoice,
            "in_race",
            t(11, 0) + Duration::minutes(9),
            r#"{"v":9}"#
        )]
    );
}

/// A series row for `date` with `mrr`, every other money column derived from it.
pub fn snapshot_row(date: NaiveDate, mrr: Decimal) -> SeriesRow {
    SeriesRow {
        date,
        period_start: date,
        mrr_start: mrr,
        mrr,
        arr: mrr * Decimal::from(12),
        total_revenue: Decimal::new(123_456, 2),
        customers_start: 3,
        total_customers: 3,
        active_subscriptions: 4,
        churned_customers: 0,
        arpu: Some(mrr / Decimal::from(3)),
        ltv: None,
        customer_churn_rate: Some(Decimal::ZERO),
        revenue_churn_rate: Some(Decimal::new(1, 3)),
        net_revenue_churn_rate: Some(Decimal::new(-25, 4)),
        new_mrr: Decimal::ZERO,
        expansion_mrr: Decimal::ZERO,
        contraction_mrr: Decimal::ZERO,
        churned_mrr: Decimal::ZERO,
        reactivation_mrr: Decimal::ZERO,
        fx_mrr: Decimal::ZERO,
        quick_ratio: None,
        nrr: Some(Decimal::new(1_0512, 4)),
        grr: Some(Decimal::new(9_731, 4)),
        partial: false,
    }
}

/// Derived accounts: rows of a generation are invisible until it is published, a publish drops
/// every other generation, pages follow the key, isolated by owner.
pub async fn derived<S: UserStore + ConnectionStore + crate::ports::DerivedStore + ?Sized>(
    store: &S,
) {
    use crate::ports::{DerivedRow, DerivedStamp};
    let owner = new_user(store, "derived@example.com").await;
    let stranger = new_user(store, "derived-stranger@example.com").await;
    let conn = new_connection(store, owner, "acct_derived").await;
    let row = |k: &str, d: &str| DerivedRow {
        key: k.to_owned(),
        data: d.to_owned(),
    };
    assert_eq!(store.derived_stamp(conn).await.expect("stamp"), None);
    let first = Uuid::new_v4();
    let rows = vec![
        row("", "{}"),
        row("cus_a", "a1"),
        row("cus_b", "b1"),
        row("cus_c", "c1"),
    ];
    store
        .write_derived(conn, first, &rows)
        .await
        .expect("write");
    let stamp = DerivedStamp {
        generation: first,
        version: 3,
        synced_at: Some(Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 0).unwrap()),
        as_of: Some(Utc.with_ymd_and_hms(2024, 3, 1, 11, 59, 58).unwrap()),
        cache_read_at: Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 1).unwrap(),
    };
    assert!(
        store
            .publish_derived(conn, &stamp, None)
            .await
            .expect("publish")
    );
    assert_eq!(
        store.derived_stamp(conn).await.expect("stamp"),
        Some(stamp.clone())
    );
    let page =
        |after: Option<&'static str>, limit| store.derived_page(owner, conn, first, after, limit);
    assert_eq!(page(None, 2).await.expect("page"), rows[..2].to_vec());
    assert_eq!(
        page(Some("cus_a"), 10).await.expect("page"),
        rows[2..].to_vec()
    );
    assert!(
        store
            .derived_page(stranger, conn, first, None, 10)
            .await
            .expect("page")
            .is_empty()
    );
    // A second generation, written half-way: the first stays published and readable.
    let second = Uuid::new_v4();
    store
        .write_derived(conn, second, &[row("cus_a", "a2")])
        .await
        .expect("write");
    assert_eq!(
        store.derived_stamp(conn).await.expect("stamp"),
        Some(stamp.clone())
    );
    assert_eq!(page(None, 10).await.expect("page"), rows);
    // Written again, a row replaces itself; published, the old generation is gone.
    store
        .write_derived(conn, second, &[row("cus_a", "a3"), row("cus_d", "d3")])
        .await
        .expect("write");
    // The rebuild's version is a 32-bit hash: every bit of it round-trips.
    let next = DerivedStamp {
        generation: second,
        version: 0x8765_4321,
        ..stamp
    };
    // An update in place of a generation no longer published does not publish, nor does a
    // derivation begun when none was published, now that one is.
    for replacing in [Some(Uuid::new_v4()), None] {
        assert!(
            !store
                .publish_derived(conn, &next, replacing)
                .await
                .expect("publish")
        );
    }
    assert_eq!(
        store.derived_stamp(conn).await.expect("stamp"),
        Some(stamp.clone())
    );
    assert!(
        store
            .publish_derived(conn, &next, Some(first))
            .await
            .expect("publish")
    );
    assert_eq!(store.derived_stamp(conn).await.expect("stamp"), Some(next));
    assert!(page(None, 10).await.expect("page").is_empty());
    assert_eq!(
        store
            .derived_page(owner, conn, second, None, 10)
            .await
            .expect("page"),
        vec![row("cus_a", "a3"), row("cus_d", "d3")]
    );
}

/// Snapshots upsert by (connection, date), read back exactly, isolated by owner.
pub async fn snapshots<S: UserStore + ConnectionStore + SnapshotStore + ?Sized>(store: &S) {
    let owner = new_user(store, "snap@example.com").await;
    let stranger = new_user(store, "snap-stranger@example.com").await;
    let conn = new_connection(store, owner, "acct_snap").await;
    let d = |n| NaiveDate::from_ymd_opt(2024, 3, n).expect("valid date");
    // Money is exact: twelve decimals survive the round trip.
    let exact = Decimal::new(1_234_567_890_123_456_789, 12);
    let rows: Vec<SeriesRow> = (1..=5)
        .map(|n| snapshot_row(d(n), exact + Decimal::from(n)))
        .collect();
    assert_eq!(
        store.upsert_snapshots(conn, &rows).await.expect("upsert"),
        5
    );
    assert_eq!(
        store
            .snapshots(owner, conn, d(2), d(4))
            .await
            .expect("read"),
        rows[1..4].to_vec()
    );
    // A row taken before its day was over says so, and a later one replaces it.
    let mut replaced = snapshot_row(d(3), Decimal::new(42, 0));
    replaced.partial = true;
    store
        .upsert_snapshots(conn, std::slice::from_ref(&replaced))
        .await
        .expect("upsert");
    let back = store
        .snapshots(owner, conn, d(1), d(5))
        .await
        .expect("read");
    assert_eq!(back.len(), 5);
    assert_eq!(back[2], replaced);
    assert!(
        store
            .snapshots(stranger, conn, d(1), d(5))
            .await
            .expect("read")
            .is_empty()
    );
}

/// Connections: renewal, refusing to rebind an account, encrypted tokens, deauthorization.
pub async fn connections<S: UserStore + ConnectionStore + ?Sized>(store: &S) {
    let owner = new_user(store, "conn@example.com").await;
    let stranger = new_user(store, "conn-stranger@example.com").await;
    let id = new_connection(store, owner, "acct_1").await;
    let c = store
        .connection(owner, id)
        .await
        .expect("read")
        .expect("found");
    assert!(c.is_active);
    assert!(
        store
            .connection(stranger, id)
            .await
            .expect("read")
            .is_none(),
        "another user's connection reads as absent"
    );
    assert!(store.tokens(stranger, id).await.expect("read").is_none());
    let tk = store
        .tokens(owner, id)
        .await
        .expect("read")
        .expect("tokens");
    assert_eq!(tk.access_token.expose_secret(), "sk_access");

    // Renewal by the owner keeps the id and replaces the tokens.
    let renewed = store
        .save_connection(
            NewConnection {
                user: owner,
                stripe_account_id: "acct_1".into(),
                business_name: Some("Acme Inc".into()),
                currency: Some("eur".into()),
                tokens: tokens("sk_new"),
            },
            t(3, 0),
        )
        .await
        .expect("renew");
    assert_eq!(renewed.id, id);
    assert_eq!(renewed.business_name.as_deref(), Some("Acme Inc"));
    // Another user cannot take the account, and nothing changes.
    let stolen = store
        .save_connection(
            NewConnection {
                user: stranger,
                stripe_account_id: "acct_1".into(),
                business_name: None,
                currency: None,
                tokens: tokens("sk_thief"),
            },
            t(3, 0),
        )
        .await;
    assert!(matches!(stolen, Err(StoreError::Conflict(_))), "{stolen:?}");
    let tk = store
        .tokens(owner, id)
        .await
        .expect("read")
        .expect("tokens");
    assert_eq!(tk.access_token.expose_secret(), "sk_new");
    assert_eq!(
        tk.refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_owned())
            .as_deref(),
        Some("sk_new-refresh")
    );
    assert!(store.connections(stranger).await.expect("read").is_empty());
    assert_eq!(store.connections(owner).await.expect("read").len(), 1);

    store.set_last_synced(id, t(4, 0)).await.expect("synced");
    assert_eq!(
        store
            .connection(owner, id)
            .await
            .expect("read")
            .and_then(|c| c.last_synced_at),
        Some(t(4, 0))
    );
    assert_eq!(store.active_connections().await.expect("read").len(), 1);
    let gone = store
        .deactivate("acct_1", t(5, 0))
        .await
        .expect("deactivate")
        .expect("known account");
    assert!(!gone.is_active);
    assert!(
        store.tokens(owner, id).await.expect("read").is_none(),
        "tokens are erased"
    );
    assert!(store.active_connections().await.expect("read").is_empty());
    assert!(
        store
            .deactivate("acct_unknown", t(5, 0))
            .await
            .expect("deactivate")
            .is_none()
    );
}

/// OAuth states are single-use, even when taken concurrently, and expire.
pub async fn oauth_states<S: UserStore + OAuthStateStore + ?Sized>(store: &S) {
    let user = new_user(store, "oauth@example.com").await;
    store
        .put_state("state-1", user, t(10, 1))
        .await
        .expect("put");
    // Another user's presentation does not consume it.
    let other = new_user(store, "oauth-other@example.com").await;
    assert_eq!(
        store
            .take_state("state-1", other, t(10, 0))
            .await
            .expect("take"),
        Some(user),
        "the state's owner is named, and the state stays"
    );
    let taken = join_all((0..5).map(|_| store.take_state("state-1", user, t(10, 0)))).await;
    let some = taken
        .iter()
        .filter(|r| matches!(r, Ok(Some(u)) if *u == user))
        .count();
    assert_eq!(some, 1, "exactly one take succeeds: {taken:?}");
    assert!(
        store
            .take_state("state-1", user, t(10, 0))
            .await
            .expect("take")
            .is_none()
    );
    store
        .put_state("state-2", user, t(10, 1))
        .await
        .expect("put");
    assert!(
        store
            .take_state("state-2", user, t(10, 2))
            .await
            .expect("take")
            .is_none(),
        "expired"
    );
    assert!(
        store
            .take_state("never-issued", user, t(10, 0))
            .await
            .expect("take")
            .is_none()
    );
}

/// Cursors per connection and stream; runs recorded and read back by their owner.
pub async fn sync_state<S: UserStore + ConnectionStore + SyncStateStore + ?Sized>(store: &S) {
    let owner = new_user(store, "sync@example.com").await;
    let stranger = new_user(store, "sync-stranger@example.com").await;
    let conn = new_connection(store, owner, "acct_sync").await;
    assert_eq!(store.cursor(conn, "customer").await.expect("cursor"), None);
    store
        .set_cursor(conn, "customer", "cus_100", t(11, 0))
        .await
        .expect("set");
    store
        .set_cursor(conn, "customer", "cus_200", t(11, 1))
        .await
        .expect("set");
    store
        .set_cursor(conn, "event", "evt_9", t(11, 1))
        .await
        .expect("set");
    assert_eq!(
        store
            .cursor(conn, "customer")
            .await
            .expect("cursor")
            .as_deref(),
        Some("cus_200")
    );
    assert_eq!(
        store
            .cursor(conn, "event")
            .await
            .expect("cursor")
            .as_deref(),
        Some("evt_9")
    );
    store.clear_cursors(conn).await.expect("clear");
    assert_eq!(store.cursor(conn, "event").await.expect("cursor"), None);
    let unknown = ConnectionId(Uuid::new_v4());
    assert!(matches!(
        store.set_cursor(unknown, "customer", "x", t(11, 0)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.start_run(unknown, t(11, 0)).await,
        Err(StoreError::NotFound(_))
    ));

    let first = store.start_run(conn, t(12, 0)).await.expect("start");
    let outcome = RunOutcome {
        objects: [
            ("customer".to_owned(), 250u64),
            ("subscription".to_owned(), 301),
        ]
        .into_iter()
        .collect(),
        requests: 9,
        retries: 2,
        error: None,
    };
    store
        .finish_run(first, SyncStatus::Succeeded, &outcome, t(12, 1))
        .await
        .expect("finish");
    assert!(
        matches!(
            store
                .finish_run(first, SyncStatus::Failed, &outcome, t(12, 2))
                .await,
            Err(StoreError::NotFound(_))
        ),
        "a run finishes once"
    );
    let second = store.start_run(conn, t(13, 0)).await.expect("start");
    assert!(matches!(
        store
            .finish_run(second, SyncStatus::Running, &outcome, t(13, 1))
            .await,
        Err(StoreError::Invalid(_))
    ));
    let last = store
        .last_run(owner, conn)
        .await
        .expect("last")
        .expect("a run");
    assert_eq!(
        (last.id, last.status, last.finished_at),
        (second, SyncStatus::Running, None)
    );
    let failed = RunOutcome {
        error: Some("429 storm".into()),
        ..RunOutcome::default()
    };
    store
        .finish_run(second, SyncStatus::Failed, &failed, t(13, 2))
        .await
        .expect("finish");
    let last = store
        .last_run(owner, conn)
        .await
        .expect("last")
        .expect("a run");
    assert_eq!(
        (last.status, last.outcome.error.as_deref(), last.finished_at),
        (SyncStatus::Failed, Some("429 storm"), Some(t(13, 2)))
    );
    assert!(
        store
            .last_run(stranger, conn)
            .await
            .expect("last")
            .is_none(),
        "another user's runs read as absent"
    );
}

fn plan_event(
    tier: Tier,
    status: &str,
    created: DateTime<Utc>,
    id: &str,
) -> (PlanChange, UserSubscription, SubscriptionEvent) {
    let limits = match tier {
        Tier::Starter => starter(),
        _ => Limits {
            scenarios: Some(3),
            ai_insights: Some(50),
            transaction_volume: Some(100_000),
        },
    };
    (
        PlanChange {
            tier,
            subscription_status: Some(status.to_owned()),
            stripe_customer_id: Some("cus_billing".into()),
            stripe_subscription_id: (status != "canceled").then(|| "sub_billing".to_owned()),
            current_period_start: Some(t(1, 0)),
            current_period_end: Some(t(31, 0)),
            limits,
        },
        UserSubscription {
            stripe_subscription_id: "sub_billing".into(),
            stripe_customer_id: Some("cus_billing".into()),
            tier,
            status: Some(status.to_owned()),
            price_id: Some(format!("price_{}", tier.as_str())),
            current_period_end: Some(t(31, 0)),
        },
        SubscriptionEvent {
            stripe_event_id: Some(id.to_owned()),
            event_type: "customer.subscription.updated".into(),
            tier,
            status: Some(status.to_owned()),
            note: None,
            created,
        },
    )
}

/// Plan events apply profile, subscription and log together; an older event never overwrites.
pub async fn billing<S: UserStore + BillingStore + ?Sized>(store: &S) {
    let user = new_user(store, "billing@example.com").await;
    let (c, sub, e) = plan_event(Tier::Professional, "active", t(14, 2), "evt_b2");
    assert_eq!(
        store
            .apply_plan_event(user, &c, &sub, &e, t(14, 3))
            .await
            .expect("apply"),
        Applied::Applied
    );
    let p = store.user(user).await.expect("read").expect("user");
    assert_eq!(
        (p.tier, p.limits.ai_insights),
        (Tier::Professional, Some(50))
    );
    assert_eq!(
        store.user_subscription(user).await.expect("read"),
        Some(sub.clone())
    );

    let (c_old, sub_old, e_old) = plan_event(Tier::Starter, "canceled", t(14, 1), "evt_b1");
    assert_eq!(
        store
            .apply_plan_event(user, &c_old, &sub_old, &e_old, t(14, 4))
            .await
            .expect("apply"),
        Applied::Stale
    );
    assert_eq!(
        store.user(user).await.expect("read").map(|p| p.tier),
        Some(Tier::Professional),
        "stale changes nothing"
    );
    assert_eq!(
        store.subscription_events(user).await.expect("read").len(),
        1
    );

    let (c_new, sub_new, e_new) = plan_event(Tier::Starter, "canceled", t(14, 5), "evt_b3");
    assert_eq!(
        store
            .apply_plan_event(user, &c_new, &sub_new, &e_new, t(14, 6))
            .await
            .expect("apply"),
        Applied::Applied
    );
    let events = store.subscription_events(user).await.expect("read");
    assert_eq!(
        events
            .iter()
            .map(|e| e.stripe_event_id.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["evt_b2", "evt_b3"]
    );
    assert_eq!(
        store.last_subscription_event(user).await.expect("read"),
        events.last().map(|e| e.created),
        "the last applied event, as the processor orders a new one against it"
    );
    let p = store.user(user).await.expect("read").expect("user");
    assert_eq!(
        (p.tier, p.stripe_customer_id.as_deref()),
        (Tier::Starter, Some("cus_billing"))
    );
    // The same Stripe event applied again (a second worker, a retry after a crash between
    // apply and mark): nothing changes.
    assert_eq!(
        store
            .apply_plan_event(user, &c_new, &sub_new, &e_new, t(14, 8))
            .await
            .expect("apply"),
        Applied::Duplicate
    );
    assert_eq!(
        store.subscription_events(user).await.expect("read").len(),
        2
    );
    let nobody = store
        .apply_plan_event(UserId(Uuid::new_v4()), &c, &sub, &e, t(14, 7))
        .await;
    assert!(matches!(nobody, Err(StoreError::NotFound(_))));

    // Ten events delivered at once, out of order: the newest wins, whatever the interleaving.
    let racer = new_user(store, "billing-race@example.com").await;
    let tiers = [
        Tier::Professional,
        Tier::Business,
        Tier::Enterprise,
        Tier::Starter,
    ];
    let events: Vec<_> = (0..10u32)
        .map(|i| {
            let created = t(15, 0) + Duration::minutes(i64::from((i * 7) % 10));
            let (mut c, mut s, e) = plan_event(
                tiers[(i % 4) as usize],
                "active",
                created,
                &format!("evt_r{i}"),
            );
            c.stripe_customer_id = None;
            s.stripe_customer_id = None;
            s.stripe_subscription_id = "sub_race".into();
            c.stripe_subscription_id = Some("sub_race".into());
            (c, s, e)
        })
        .collect();
    let results = join_all(
        events
            .iter()
            .map(|(c, s, e)| store.apply_plan_event(racer, c, s, e, t(15, 1))),
    )
    .await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let newest = events
        .iter()
        .max_by_key(|(_, _, e)| e.created)
        .map(|(c, _, _)| c.tier);
    assert_eq!(
        store.user(racer).await.expect("read").map(|p| p.tier),
        newest
    );
}

/// 50 insight requests at once against a hard limit of 10 (a starter tier including 10): exactly
/// 10 are reserved, 40 refused with an upgrade error; committing 10 and releasing none leaves
/// 10 used.
pub async fn insight_limit_holds_under_concurrency<S: UserStore + UsageStore + ?Sized>(store: &S) {
    use crate::billing::{Catalog, CatalogBuilder, UsageError, commit_insight, reserve_insight};
    let mut plan = Catalog::default().plan(Tier::Starter).clone();
    plan.limits.ai_insights = Some(10);
    let catalog = CatalogBuilder::from_catalog(&Catalog::default())
        .tier(plan.clone())
        .build()
        .expect("valid catalog");
    let user = UserId(Uuid::new_v4());
    store
        .create_user(user, None, Tier::Starter, plan.limits, t(1, 0))
        .await
        .expect("create user");
    let ids: Vec<String> = (0..50).map(|i| format!("insight-{i}")).collect();
    let results = join_all(
        ids.iter()
            .map(|id| reserve_insight(store, &catalog, user, id, None, t(9, 0))),
    )
    .await;
    let ok: Vec<&String> = ids
        .iter()
        .zip(&results)
        .filter(|(_, r)| matches!(r, Ok(Recorded::New)))
        .map(|(id, _)| id)
        .collect();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(UsageError::UpgradeRequired { limit: 10, .. })))
        .count();
    assert_eq!((ok.len(), refused), (10, 40), "{results:?}");
    for id in ok {
        commit_insight(store, user, id).await.expect("commit");
    }
    assert_eq!(
        store
            .used(user, Meter::AiInsight, march())
            .await
            .expect("used"),
        10
    );
}

/// Insight records: stored per generation with their figures, read newest first, per owner.
pub async fn insights<S: UserStore + ConnectionStore + crate::ports::InsightStore + ?Sized>(
    store: &S,
) {
    use crate::insights::{Figure, InsightKind, Unit};
    use crate::ports::InsightRecord;
    let user = new_user(store, "insights@example.com").await;
    let conn = new_connection(store, user, "acct_insights").await;
    let record = |kind: InsightKind, at: DateTime<Utc>, generation: Uuid| InsightRecord {
        id: Uuid::new_v4(),
        generation,
        user,
        connection: Some(conn),
        kind,
        title: format!("{} title", kind.as_str()),
        summary: "MRR is $1,234.50 <b>and</b> \"quoted\"".into(),
        figures: vec![Figure {
            id: "mrr".into(),
            label: "MRR now".into(),
            value: Decimal::new(123_450, 2),
            unit: Unit::Money,
        }],
        provider: "local".into(),
        note: Some("the model's answer cited a figure that does not exist".into()),
        created_at: at,
    };
    let (g1, g2) = (Uuid::new_v4(), Uuid::new_v4());
    let first = vec![
        record(InsightKind::RevenuePrediction, t(10, 0), g1),
        record(InsightKind::ChurnRisk, t(10, 0), g1),
    ];
    let second = vec![record(InsightKind::HealthScore, t(11, 0), g2)];
    store.save_insights(&first).await.expect("save");
    store.save_insights(&second).await.expect("save");
    let read = store.insights(user, Some(conn), 10).await.expect("read");
    assert_eq!(read.len(), 3);
    assert_eq!(read[0], second[0], "newest first, exactly as saved");
    assert!(read[1..].contains(&first[0]) && read[1..].contains(&first[1]));
    assert_eq!(store.insights(user, None, 2).await.expect("read").len(), 2);
    let other = new_user(store, "insights-other@example.com").await;
    assert!(
        store
            .insights(other, Some(conn), 10)
            .await
            .expect("read")
            .is_empty(),
        "another user's connection reads as empty"
    );
    let mut foreign = record(InsightKind::ChurnRisk, t(12, 0), Uuid::new_v4());
    foreign.user = other;
    assert!(matches!(
        store.save_insights(&[foreign]).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store
            .insights(user, Some(conn), 10)
            .await
            .expect("read")
            .len(),
        3
    );
}

/// Ended sessions: known to every reader of the store, forgotten once past their expiry, ids
/// bounded.
pub async fn ended_sessions<S: crate::ports::CredentialStore + ?Sized>(store: &S) {
    assert!(!store.session_ended("s1").await.expect("read"));
    store
        .end_session("s1", t(2, 0), t(1, 0))
        .await
        .expect("end s1");
    store
        .end_session("s1", t(2, 0), t(1, 1))
        .await
        .expect("ending one twice is not an error");
    store
        .end_session("s2", t(4, 0), t(1, 2))
        .await
        .expect("end s2");
    assert!(store.session_ended("s1").await.expect("read"));
    assert!(store.session_ended("s2").await.expect("read"));
    assert!(!store.session_ended("s3").await.expect("read"));
    // s1 expired on day 2: the next ending forgets it; s2 (expires on day 4) is kept.
    store
        .end_session("s3", t(5, 0), t(3, 0))
        .await
        .expect("end s3");
    assert!(
        !store.session_ended("s1").await.expect("read"),
        "expired: forgotten"
    );
    assert!(store.session_ended("s2").await.expect("read"));
    assert!(store.session_ended("s3").await.expect("read"));
    for bad in [String::new(), "x".repeat(crate::ports::SESSION_ID_MAX + 1)] {
        let refused = store.end_session(&bad, t(5, 0), t(3, 0)).await;
        assert!(
            matches!(refused, Err(StoreError::Invalid(_))),
            "{refused:?}"
        );
    }
    store
        .end_session(&"x".repeat(crate::ports::SESSION_ID_MAX), t(5, 0), t(3, 0))
        .await
        .expect("the longest id");
}

/// Built-in accounts: profile and hash together, one per email whatever its case.
pub async fn credentials<S: UserStore + crate::ports::CredentialStore + ?Sized>(store: &S) {
    let user = UserId(Uuid::new_v4());
    let p = store
        .create_account(
            user,
            "Ada@Example.com",
            "$argon2id$v=19$x",
            Tier::Starter,
            starter(),
            t(1, 0),
        )
        .await
        .expect("create account");
    assert_eq!(
        (p.tier, p.email.as_deref()),
        (Tier::Starter, Some("Ada@Example.com"))
    );
    assert_eq!(
        store.credentials("ada@example.COM").await.expect("read"),
        Some((user, "$argon2id$v=19$x".to_owned()))
    );
    let again = store
        .create_account(
            UserId(Uuid::new_v4()),
            "ADA@example.com",
            "$argon2id$v=19$y",
            Tier::Starter,
            starter(),
            t(1, 1),
        )
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(
        store
            .credentials("ada@example.com")
            .await
            .expect("read")
            .map(|c| c.1),
        Some("$argon2id$v=19$x".to_owned()),
        "the first account's hash, untouched"
    );
    assert_eq!(
        store.credentials("nobody@example.com").await.expect("read"),
        None
    );
    // A profile without a password (an external identity provider's user) has no credentials.
    new_user(store, "external@example.com").await;
    assert_eq!(
        store
            .credentials("external@example.com")
            .await
            .expect("read"),
        None
    );
}

/// Billable users: exactly those with a Stripe customer, in user id order.
pub async fn billable_users<S: UserStore + ?Sized>(store: &S) {
    assert!(store.billable_users().await.expect("list").is_empty());
    let a = new_user(store, "a@example.com").await;
    let b = new_user(store, "b@example.com").await;
    let _free = new_user(store, "free@example.com").await;
    store
        .set_stripe_customer(a, "cus_a", t(2, 0))
        .await
        .expect("customer");
    store
        .set_stripe_customer(b, "cus_b", t(2, 0))
        .await
        .expect("customer");
    let listed: Vec<_> = store
        .billable_users()
        .await
        .expect("list")
        .into_iter()
        .map(|p| (p.user_id, p.stripe_customer_id))
        .collect();
    let mut expected = vec![(a, Some("cus_a".to_owned())), (b, Some("cus_b".to_owned()))];
    expected.sort_by_key(|(u, _)| u.0);
    assert_eq!(listed, expected);
}

/// Leases: one holder at a time, renewable by its holder, free again after its deadline or its
/// release; of concurrent takers of a free lease exactly one wins.
pub async fn leases<S: crate::ports::LeaseStore + ?Sized>(store: &S) {
    let won = join_all((0..8).map(|i| {
        let holder = format!("worker-{i}");
        async move {
            store
                .acquire_lease("sync:1", &holder, t(10, 1), t(10, 0))
                .await
        }
    }))
    .await;
    let winners: Vec<usize> = won
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Ok(true)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one holder: {won:?}");
    let holder = format!("worker-{}", winners[0]);
    let other = if winners[0] == 0 {
        "worker-1"
    } else {
        "worker-0"
    };
    assert!(
        !store
            .acquire_lease("sync:1", other, t(10, 2), t(10, 0))
            .await
            .expect("acquire"),
        "held by another until its deadline"
    );
    assert!(
        store
            .acquire_lease("sync:1", &holder, t(10, 3), t(10, 0))
            .await
            .expect("renew"),
        "the holder renews"
    );
    assert!(
        !store
            .acquire_lease("sync:1", other, t(10, 3), t(10, 2))
            .await
            .expect("acquire"),
        "the renewal moved the deadline"
    );
    assert!(
        store
            .acquire_lease("sync:2", other, t(10, 1), t(10, 0))
            .await
            .expect("acquire"),
        "another key is independent"
    );
    // Another holder's release leaves the lease alone; the holder's frees it.
    store.release_lease("sync:1", other).await.expect("release");
    assert!(
        !store
            .acquire_lease("sync:1", other, t(10, 3), t(10, 0))
            .await
            .expect("acquire")
    );
    store
        .release_lease("sync:1", &holder)
        .await
        .expect("release");
    assert!(
        store
            .acquire_lease("sync:1", other, t(10, 3), t(10, 0))
            .await
            .expect("acquire"),
        "free after release"
    );
    // An expired lease is free.
    assert!(
        store
            .acquire_lease("sync:1", &holder, t(10, 5), t(10, 3))
            .await
            .expect("acquire"),
        "free after its deadline"
    );
}

/// Runs every test of the suite, each on a store from `fresh`.
pub async fn run_all<S, F, Fut>(fresh: F)
where
    S: UserStore
        + UsageStore
        + WebhookInbox
        + ObjectCache
        + SnapshotStore
        + ConnectionStore
        + OAuthStateStore
        + SyncStateStore
        + BillingStore
        + crate::ports::InsightStore
        + crate::ports::CredentialStore
        + crate::ports::LeaseStore
        + crate::ports::DerivedStore,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    users(&fresh().await).await;
    usage_is_idempotent_under_concurrency(&fresh().await).await;
    usage_limit_holds_under_concurrency(&fresh().await).await;
    insight_limit_holds_under_concurrency(&fresh().await).await;
    usage_reservations(&fresh().await).await;
    usage_batches(&fresh().await).await;
    webhook_inbox(&fresh().await).await;
    object_cache(&fresh().await).await;
    object_cache_reads(&fresh().await).await;
    snapshots(&fresh().await).await;
    derived(&fresh().await).await;
    connections(&fresh().await).await;
    oauth_states(&fresh().await).await;
    sync_state(&fresh().await).await;
    billing(&fresh().await).await;
    insights(&fresh().await).await;
    credentials(&fresh().await).await;
    ended_sessions(&fresh().await).await;
    billable_users(&fresh().await).await;
    leases(&fresh().await).await;
}
