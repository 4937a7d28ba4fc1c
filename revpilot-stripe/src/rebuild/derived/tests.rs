//! Derived accounts against the rebuild from the cache: the same account, read back only while
//! current, a half-written derivation never read, an unreadable one rebuilt.

use chrono::{TimeDelta, Utc};
use revpilot_core::ports::{ConnectionId, ConnectionStore, ObjectCache};
use revpilot_core::testing::MemoryStore;

use super::*;
use crate::export::RawExport;
use crate::synth::SynthExport;

async fn seeded(customers: usize) -> (MemoryStore, UserId, ConnectionId) {
    let now = Utc::now();
    let (store, user, conn) = MemoryStore::with_connection("acct_derived", now).await;
    let mut bytes = Vec::new();
    SynthExport {
        customers,
        months: 8,
        seed: 5,
    }
    .write(&mut bytes)
    .expect("synth writes");
    let raw: RawExport = serde_json::from_slice(&bytes).expect("synth export");
    store
        .upsert_objects(conn, &raw.cached(now).expect("ids"))
        .await
        .expect("seeded");
    store.set_last_synced(conn, now).await.expect("synced");
    (store, user, conn)
}

/// Updates that read back exactly to the derivation's read (the tests' writes are ordered).
fn exact() -> LoadOptions {
    LoadOptions {
        write_slack: TimeDelta::zero(),
        ..LoadOptions::default()
    }
}

async fn connection(store: &MemoryStore, user: UserId, conn: ConnectionId) -> Connection {
    store
        .connection(user, conn)
        .await
        .expect("read")
        .expect("exists")
}

/// What the rebuild from the cache makes, sorted as a derivation reads back.
async fn oracle(store: &MemoryStore, user: UserId, conn: ConnectionId) -> Account {
    let mut account = rebuild_cached(store, user, conn, 7)
        .await
        .expect("rebuilt")
        .account;
    sort(&mut account);
    account
}

#[tokio::test]
async fn a_derivation_reads_back_the_rebuilt_account_while_current() {
    let (store, user, conn) = seeded(60).await;
    let c = connection(&store, user, conn).await;
    let first = load_account(&store, user, &c, None).await.expect("loaded");
    assert_eq!(first.source, Source::Rebuilt, "nothing derived yet");
    let expected = oracle(&store, user, conn).await;
    assert!(!expected.subscriptions.is_empty());
    assert_eq!(first.account, expected);
    let second = load_account(&store, user, &c, None).await.expect("loaded");
    assert_eq!(second.source, Source::Derived);
    assert_eq!(second.account, expected);
    assert_eq!(second.as_of, first.as_of);
    // Prices are shared again, as the rebuild shares them.
    let mut ptrs: HashMap<&str, *const Price> = HashMap::new();
    for s in &second.account.subscriptions {
        for item in &s.items {
            let p = Arc::as_ptr(&item.price);
            assert_eq!(*ptrs.entry(item.price.id.as_str()).or_insert(p), p);
        }
    }
    // Another user reads nothing of it: the rows are the owner's only.
    let stamp = store.derived_stamp(conn).await.unwrap().unwrap();
    assert!(
        store
            .derived_page(UserId(Uuid::new_v4()), conn, stamp.generation, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_sync_or_another_rebuild_makes_it_stale() {
    let (store, user, conn) = seeded(20).await;
    let c = connection(&store, user, conn).await;
    load_account(&store, user, &c, None).await.expect("derived");
    std::thread::sleep(std::time::Duration::from_millis(3));
    // A later sync changed a customer: the next load rebuilds and sees it.
    let later = Utc::now() + TimeDelta::seconds(5);
    let mut customer = store
        .objects_page(
            user,
            conn,
            revpilot_core::ports::ObjectKind::Customer,
            None,
            1,
        )
        .await
        .unwrap()
        .remove(0);
    let mut value: serde_json::Value = serde_json::from_str(&customer.data).unwrap();
    value["address"] = serde_json::json!({"country": "NZ"});
    customer.data = value.to_string();
    customer.version = later;
    store
        .upsert_objects(conn, &[customer.clone()])
        .await
        .unwrap();
    store.set_last_synced(conn, later).await.unwrap();
    let c = connection(&store, user, conn).await;
    let after = load_account_with(&store, user, &c, None, &exact())
        .await
        .expect("loaded");
    assert_eq!(
        after.source,
        Source::Updated { customers: 1 },
        "stale at the new sync: the changed customer is rebuilt"
    );
    assert_eq!(after.account, oracle(&store, user, conn).await);
    let changed = after
        .account
        .customers
        .iter()
        .find(|x| x.id == customer.stripe_id)
        .unwrap();
    assert_eq!(changed.country.as_deref(), Some("NZ"));
    assert_eq!(
        load_account(&store, user, &c, None).await.unwrap().source,
        Source::Derived
    );
    // A derivation written by another build of the rebuild is not read.
    let mut stamp = store.derived_stamp(conn).await.unwrap().unwrap();
    stamp.version = RULES_VERSION.wrapping_add(1);
    assert!(
        store
            .publish_derived(conn, &stamp, Some(stamp.generation))
            .await
            .unwrap()
    );
    assert_eq!(
        load_account(&store, user, &c, None).await.unwrap().source,
        Source::Rebuilt
    );
}

#[tokio::test]
async fn a_half_written_derivation_is_never_read_and_a_broken_one_is_rebuilt() {
    let (store, user, conn) = seeded(20).await;
    let c = connection(&store, user, conn).await;
    load_account(&store, user, &c, None).await.expect("derived");
    let expected = oracle(&store, user, conn).await;
    // A writer killed after its first rows: never published, so the published one stands.
    store
        .write_derived(
            conn,
            Uuid::new_v4(),
            &[DerivedRow {
                key: "cus_half".into(),
                data: "{}".into(),
            }],
        )
        .await
        .unwrap();
    let read = load_account(&store, user, &c, None).await.unwrap();
    assert_eq!(read.source, Source::Derived);
    assert_eq!(read.account, expected);
    // A row that cannot be read (written by an incompatible build): rebuilt from the cache.
    let stamp = store.derived_stamp(conn).await.unwrap().unwrap();
    store
        .write_derived(
            conn,
            stamp.generation,
            &[DerivedRow {
                key: "cus_broken".into(),
                data: "{\"customers\": 7}".into(),
            }],
        )
        .await
        .unwrap();
    let read = load_account(&store, user, &c, None).await.unwrap();
    assert_eq!(read.source, Source::Rebuilt);
    assert_eq!(read.account, expected);
    assert_eq!(
        load_account(&store, user, &c, None).await.unwrap().source,
        Source::Derived
    );
}

#[tokio::test]
async fn a_connection_never_synced_is_always_rebuilt() {
    let now = Utc::now();
    let (store, user, conn) = MemoryStore::with_connection("acct_new", now).await;
    let c = connection(&store, user, conn).await;
    assert!(c.last_synced_at.is_none());
    for _ in 0..2 {
        assert_eq!(
            load_account(&store, user, &c, None).await.unwrap().source,
            Source::Rebuilt
        );
    }
}

/// One change a sync can bring.
#[derive(Debug, Clone)]
enum Change {
    /// A customer moves country.
    Country(usize),
    /// A subscription ends, `days` after its start.
    Cancel(usize, i64),
    /// A customer pays again (a copy of one of their charges, a month later).
    Charge(usize),
    /// A new customer with a copy of another's subscription.
    NewCustomer(usize),
    /// A charge is disputed and lost.
    Dispute(usize),
    /// A price's nickname changes: every customer may change.
    Price(usize),
    /// A payment of no customer (a copy of a charge, without its customer).
    Guest(usize),
}

fn change() -> impl proptest::strategy::Strategy<Value = Change> {
    use proptest::prelude::*;
    prop_oneof![
        (0usize..1000).prop_map(Change::Country),
        (0usize..1000, 1i64..200).prop_map(|(i, d)| Change::Cancel(i, d)),
        (0usize..1000).prop_map(Change::Charge),
        (0usize..1000).prop_map(Change::NewCustomer),
        (0usize..1000).prop_map(Change::Dispute),
        (0usize..1000).prop_map(Change::Price),
        (0usize..1000).prop_map(Change::Guest),
    ]
}

/// The objects `changes` write, from what the cache holds.
async fn apply(
    store: &MemoryStore,
    user: UserId,
    conn: ConnectionId,
    changes: &[Change],
    version: DateTime<Utc>,
    round: usize,
) -> bool {
    use revpilot_core::ports::ObjectKind as K;
    use serde_json::{Value, json};
    let all = |kind| async move {
        store
            .objects(user, conn, kind)
            .await
            .expect("read")
            .into_iter()
            .map(|o| serde_json::from_str::<Value>(&o.data).expect("json"))
            .collect::<Vec<Value>>()
    };
    let (customers, subs, charges, prices) = (
        all(K::Customer).await,
        all(K::Subscription).await,
        all(K::Charge).await,
        all(K::Price).await,
    );
    let pick = |list: &[Value], i: usize| list[i % list.len()].clone();
    let mut out: Vec<(K, Value)> = Vec::new();
    let mut global = false;
    for (i, c) in changes.iter().enumerate() {
        // Ids are new in every round: Stripe never reuses one.
        let n = format!("{round}_{i}");
        match c {
            Change::Country(i) => {
                let mut x = pick(&customers, *i);
                let country = ["NZ", "FR", "BR"][i % 3];
                x["address"] = json!({ "country": country });
                out.push((K::Customer, x));
            }
            Change::Cancel(i, days) => {
                let mut x = pick(&subs, *i);
                let at = x["start_date"]
                    .as_i64()
                    .or(x["created"].as_i64())
                    .unwrap_or(0)
                    + days * 86_400;
                x["status"] = json!("canceled");
                x["canceled_at"] = json!(at);
                x["ended_at"] = json!(at);
                out.push((K::Subscription, x));
            }
            Change::Charge(i) => {
                let mut x = pick(&charges, *i);
                x["id"] = json!(format!("ch_new_{n}"));
                x["created"] = json!(x["created"].as_i64().unwrap_or(0) + 30 * 86_400);
                out.push((K::Charge, x));
            }
            Change::NewCustomer(i) => {
                let mut s = pick(&subs, *i);
                let mut x = customers
                    .iter()
                    .find(|c| c["id"] == s["customer"])
                    .cloned()
                    .expect("the subscription's customer");
                let id = format!("cus_new_{n}");
                x["id"] = json!(id);
                s["id"] = json!(format!("sub_new_{n}"));
                s["customer"] = json!(id);
                out.push((K::Customer, x));
                out.push((K::Subscription, s));
            }
            Change::Dispute(i) => {
                let ch = pick(&charges, *i);
                out.push((
                    K::Dispute,
                    json!({"id": format!("dp_{n}"), "object": "dispute", "charge": ch["id"],
                           "amount": ch["amount"], "currency": ch["currency"],
                           "created": ch["created"].as_i64().unwrap_or(0) + 86_400,
                           "status": "lost", "balance_transactions": []}),
                ));
            }
            Change::Guest(i) => {
                let mut x = pick(&charges, *i);
                x["id"] = json!(format!("ch_guest_{n}"));
                x["customer"] = Value::Null;
                out.push((K::Charge, x));
            }
            Change::Price(i) => {
                let mut x = pick(&prices, *i);
                x["nickname"] = json!(format!("renamed {n}"));
                out.push((K::Price, x));
                global = true;
            }
        }
    }
    let objects: Vec<CachedObject> = out
        .into_iter()
        .map(|(kind, v)| {
            let id = v["id"].as_str().expect("id").to_owned();
            crate::export::cached_object(kind, id, version, v.to_string())
        })
        .collect();
    store.upsert_objects(conn, &objects).await.expect("written");
    global
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// After any changes a sync brings, the updated derivation is exactly the account a full
    /// rebuild makes, whether the update patches the account in hand or reads its rows back.
    #[test]
    fn an_update_after_a_sync_equals_a_full_rebuild(
        customers in 3usize..30,
        rounds in proptest::collection::vec(proptest::collection::vec(change(), 1..6), 1..4),
        in_hand in 0u8..3,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let (store, user, conn) = seeded(customers).await;
            let c = connection(&store, user, conn).await;
            let mut held = Arc::new(load_account(&store, user, &c, None).await.expect("derived").account);
            let mut held_at = c.last_synced_at;
            let mut synced = Utc::now();
            for (round, changes) in rounds.iter().enumerate() {
                std::thread::sleep(std::time::Duration::from_millis(2));
                synced += TimeDelta::seconds(10);
                let global = apply(&store, user, conn, changes, synced, round).await;
                store.set_last_synced(conn, synced).await.expect("synced");
                let c = connection(&store, user, conn).await;
                // None: the rows are read back; still held here too: a copy is patched; given
                // away (the only reference): it is patched in place.
                let previous = match in_hand {
                    0 => None,
                    1 => Some(Arc::clone(&held)),
                    _ => Some(std::mem::take(&mut held)),
                }
                .map(|account| Held { account, synced_at: held_at });
                let loaded = load_account_with(&store, user, &c, previous, &exact())
                    .await
                    .expect("updated");
                assert_eq!(loaded.account, oracle(&store, user, conn).await, "{changes:?}");
                if global {
                    assert_eq!(loaded.source, Source::Rebuilt);
                } else {
                    assert!(matches!(loaded.source, Source::Updated { .. }), "{:?}", loaded.source);
                }
                let again = load_account(&store, user, &c, None).await.expect("read");
                assert_eq!(again.source, Source::Derived);
                assert_eq!(again.account, loaded.account);
                held = Arc::new(loaded.account);
                held_at = c.last_synced_at;
            }
        });
    }
}

#[tokio::test]
async fn an_update_killed_half_way_is_done_again_by_the_next_load() {
    let (store, user, conn) = seeded(12).await;
    let c = connection(&store, user, conn).await;
    load_account(&store, user, &c, None).await.expect("derived");
    std::thread::sleep(std::time::Duration::from_millis(3));
    let later = Utc::now() + TimeDelta::seconds(5);
    assert!(
        !apply(
            &store,
            user,
            conn,
            &[Change::Cancel(3, 40), Change::Charge(5)],
            later,
            0
        )
        .await
    );
    store.set_last_synced(conn, later).await.unwrap();
    // The killed update had rewritten one customer's row (here: emptied it) and published
    // nothing: the derivation is stale, and the next load does the update again.
    let stamp = store.derived_stamp(conn).await.unwrap().unwrap();
    let victim = oracle(&store, user, conn).await.customers[3].id.clone();
    store
        .write_derived(
            conn,
            stamp.generation,
            &[DerivedRow {
                key: victim,
                data: "{}".into(),
            }],
        )
        .await
        .unwrap();
    let c = connection(&store, user, conn).await;
    let loaded = load_account_with(&store, user, &c, None, &exact())
        .await
        .unwrap();
    assert!(
        matches!(loaded.source, Source::Updated { .. }),
        "{:?}",
        loaded.source
    );
    assert_eq!(loaded.account, oracle(&store, user, conn).await);
}

/// A process's first load rebuilds from the cache and answers before it stores the
/// derivation; the next load of the connection (a later sync's) waits for the store and
/// updates it instead of rebuilding again.
#[tokio::test]
async fn a_rebuilt_account_is_answered_then_stored_and_the_next_load_waits_for_it() {
    use crate::accounts::Accounts;

    let (store, user, conn) = seeded(20).await;
    let store = Arc::new(store);
    let c = connection(&store, user, conn).await;
    let accounts = Arc::new(Accounts::default().with_load_options(exact()));
    let first = accounts.load(&store, user, &c).await.expect("rebuilt");
    // This test's runtime has one thread: the task storing it has not run yet.
    assert_eq!(store.derived_stamp(conn).await.expect("read"), None);

    // A sync ends before the derivation is stored: its load waits for it, then updates it.
    let synced = Utc::now() + TimeDelta::seconds(10);
    store.set_last_synced(conn, synced).await.expect("synced");
    let c = connection(&store, user, conn).await;
    assert_eq!(store.derived_stamp(conn).await.expect("read"), None);
    let second = accounts.load(&store, user, &c).await.expect("updated");
    assert_eq!(second.account, first.account);
    assert_eq!(*first.account, oracle(&store, user, conn).await);
    let stamp = store
        .derived_stamp(conn)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stamp.synced_at, Some(synced));
    assert_eq!(accounts.builds(), 2);
    // Updated under the generation the first load stored, not rebuilt under a new one.
    accounts.settled(conn).await;
    let again = load_account(store.as_ref(), user, &c, None)
        .await
        .expect("read");
    assert_eq!(again.source, Source::Derived);
    assert_eq!(
        store
            .derived_stamp(conn)
            .await
            .expect("read")
            .map(|s| s.generation),
        Some(stamp.generation)
    );
}

/// Two processes rebuild everything at once (a deploy that changed the rules): the first to
/// store its derivation publishes it; the second, whose rows that publish deleted, does not.
#[tokio::test]
async fn of_two_full_rebuilds_at_once_only_the_first_stored_is_published() {
    let (store, user, conn) = seeded(20).await;
    let c = connection(&store, user, conn).await;
    let deferred = LoadOptions {
        defer_derivation: true,
        ..exact()
    };
    let mut a = load_account_with(&store, user, &c, None, &deferred)
        .await
        .expect("rebuilt");
    let mut b = load_account_with(&store, user, &c, None, &deferred)
        .await
        .expect("rebuilt");
    let (wa, wb) = (a.unwritten.take(), b.unwritten.take());
    assert!(
        wa.expect("unwritten")
            .write(&store, &a.account)
            .await
            .expect("written")
    );
    assert!(
        !wb.expect("unwritten")
            .write(&store, &b.account)
            .await
            .expect("written")
    );
    let read = load_account(&store, user, &c, None).await.expect("read");
    assert_eq!(read.source, Source::Derived);
    assert_eq!(read.account, oracle(&store, user, conn).await);
}

/// An account this process kept from before another process's update is not patched: it
/// lacks that update's changes, which the next update does not rebuild again.
#[tokio::test]
async fn an_account_kept_from_before_another_update_is_not_patched() {
    let (store, user, conn) = seeded(12).await;
    let c = connection(&store, user, conn).await;
    let kept = Held {
        account: Arc::new(
            load_account(&store, user, &c, None)
                .await
                .expect("derived")
                .account,
        ),
        synced_at: c.last_synced_at,
    };
    let mut at = Utc::now();
    for (round, change) in [Change::Cancel(3, 40), Change::Country(5)]
        .into_iter()
        .enumerate()
    {
        std::thread::sleep(std::time::Duration::from_millis(3));
        at += TimeDelta::seconds(10);
        assert!(!apply(&store, user, conn, &[change], at, round).await);
        store.set_last_synced(conn, at).await.expect("synced");
        let c = connection(&store, user, conn).await;
        // The first change is another process's update; the second is this one's.
        let previous = (round == 1).then(|| kept.clone());
        let loaded = load_account_with(&store, user, &c, previous, &exact())
            .await
            .expect("updated");
        assert!(
            matches!(loaded.source, Source::Updated { .. }),
            "{:?}",
            loaded.source
        );
        assert_eq!(
            loaded.account,
            oracle(&store, user, conn).await,
            "round {round}"
        );
    }
}

/// A caller that gives up on a load (a request whose client went away) does not stop it: the
/// account is loaded and kept for the next caller.
#[tokio::test]
async fn a_load_whose_caller_gives_up_still_finishes() {
    use crate::accounts::Accounts;

    let (store, user, conn) = seeded(20).await;
    let store = Arc::new(store);
    let c = connection(&store, user, conn).await;
    let accounts = Arc::new(Accounts::default());
    let gave_up =
        tokio::time::timeout(std::time::Duration::ZERO, accounts.load(&store, user, &c)).await;
    assert!(gave_up.is_err(), "the caller gave up before the load ended");
    for _ in 0..500 {
        if accounts.builds() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(accounts.builds(), 1, "the load went on without its caller");
    assert!(accounts.get(user, conn, c.last_synced_at).is_some());
}
