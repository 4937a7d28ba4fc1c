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
    let first = load_account(&store, user, &c).await.expect("loaded");
    assert!(!first.derived, "nothing derived yet: rebuilt");
    let expected = oracle(&store, user, conn).await;
    assert!(!expected.subscriptions.is_empty());
    assert_eq!(first.account, expected);
    let second = load_account(&store, user, &c).await.expect("loaded");
    assert!(second.derived, "read from the derivation");
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
    load_account(&store, user, &c).await.expect("derived");
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
    let after = load_account(&store, user, &c).await.expect("loaded");
    assert!(!after.derived, "stale at the new sync: rebuilt");
    let changed = after
        .account
        .customers
        .iter()
        .find(|x| x.id == customer.stripe_id)
        .unwrap();
    assert_eq!(changed.country.as_deref(), Some("NZ"));
    assert!(load_account(&store, user, &c).await.unwrap().derived);
    // A derivation written by another build of the rebuild is not read.
    let mut stamp = store.derived_stamp(conn).await.unwrap().unwrap();
    stamp.version = RULES_VERSION.wrapping_add(1);
    store.publish_derived(conn, &stamp).await.unwrap();
    assert!(!load_account(&store, user, &c).await.unwrap().derived);
}

#[tokio::test]
async fn a_half_written_derivation_is_never_read_and_a_broken_one_is_rebuilt() {
    let (store, user, conn) = seeded(20).await;
    let c = connection(&store, user, conn).await;
    load_account(&store, user, &c).await.expect("derived");
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
    let read = load_account(&store, user, &c).await.unwrap();
    assert!(read.derived);
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
    let read = load_account(&store, user, &c).await.unwrap();
    assert!(!read.derived);
    assert_eq!(read.account, expected);
    assert!(load_account(&store, user, &c).await.unwrap().derived);
}

#[tokio::test]
async fn a_connection_never_synced_is_always_rebuilt() {
    let now = Utc::now();
    let (store, user, conn) = MemoryStore::with_connection("acct_new", now).await;
    let c = connection(&store, user, conn).await;
    assert!(c.last_synced_at.is_none());
    assert!(!load_account(&store, user, &c).await.unwrap().derived);
    assert!(!load_account(&store, user, &c).await.unwrap().derived);
}
