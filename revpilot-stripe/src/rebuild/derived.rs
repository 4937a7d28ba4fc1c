//! A connection's account kept in the store, by customer ([`DerivedStore`]): derived once from
//! the object cache after a sync, then loaded by every process that needs it without re-reading
//! every cached Stripe object (a 100,000-customer account caches about 3 GB of JSON; its derived
//! rows are a small fraction of that).
//!
//! A derivation is current when it was built by this build's rebuild ([`RULES_VERSION`]) at the
//! connection's last sync; otherwise [`load_account`] rebuilds from the cache and derives again.
//! Rows are written under a new generation and published at the end, so a derivation killed
//! half-way leaves the previous one readable (and stale, so the next load derives again).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use revpilot_core::model::{Account, Customer, Payment, Price, Subscription};
use revpilot_core::ports::{
    Connection, DerivedRow, DerivedStamp, DerivedStore, ObjectCache, StoreError, UserId,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::stream::{CACHE_PAGE, CachedRebuildError, rebuild_cached};

/// The version of what the rebuild builds from the same objects: a hash of its source, so any
/// change to the rebuild makes every stored derivation stale (it is derived again on its next
/// load) without anyone having to remember to bump a number.
pub const RULES_VERSION: u32 = {
    let a = fnv1a(include_bytes!("../rebuild.rs"), 0x811c_9dc5);
    let b = fnv1a(include_bytes!("stream.rs"), a);
    fnv1a(include_bytes!("../objects.rs"), b)
};

const fn fnv1a(bytes: &[u8], mut hash: u32) -> u32 {
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

/// Derived rows written per store call.
const DERIVED_PAGE: usize = 2_000;

/// A connection's account, and where it came from.
#[derive(Debug)]
pub struct LoadedAccount {
    /// The account: customers, subscriptions and payments each sorted by id.
    pub account: Account,
    /// The newest instant the cached objects carry (the data's as-of when nothing better is
    /// known).
    pub as_of: Option<DateTime<Utc>>,
    /// Read from a current derivation (`false`: rebuilt from the cache and derived again).
    pub derived: bool,
}

/// One customer's share of the account, as a row stores it.
#[derive(Serialize)]
struct Share<'a> {
    customers: Vec<&'a Customer>,
    subscriptions: Vec<&'a Subscription>,
    payments: Vec<&'a Payment>,
}

#[derive(Deserialize)]
struct OwnedShare {
    #[serde(default)]
    customers: Vec<Customer>,
    #[serde(default)]
    subscriptions: Vec<Subscription>,
    #[serde(default)]
    payments: Vec<Payment>,
}

/// The account of the user's `connection`: its current derivation when there is one, else
/// rebuilt from the cache (and derived for the next load).
///
/// # Errors
/// [`CachedRebuildError`]: the store failed, or a cached object cannot be read.
pub async fn load_account<S: ObjectCache + DerivedStore + ?Sized>(
    store: &S,
    user: UserId,
    connection: &Connection,
) -> Result<LoadedAccount, CachedRebuildError> {
    for _ in 0..3 {
        let Some(stamp) = store.derived_stamp(connection.id).await? else {
            break;
        };
        if !is_current(&stamp, connection) {
            break;
        }
        let Some(account) = read(store, user, connection, &stamp).await? else {
            break;
        };
        // Published again while it was read (its rows may be gone): read the new one.
        if store.derived_stamp(connection.id).await?.as_ref() != Some(&stamp) {
            continue;
        }
        return Ok(LoadedAccount {
            account,
            as_of: stamp.as_of,
            derived: true,
        });
    }
    derive_account(store, user, connection).await
}

/// Rebuilds the account of the user's `connection` from the cache and stores it as the
/// connection's derivation at its last sync.
///
/// # Errors
/// [`CachedRebuildError`]: the store failed, or a cached object cannot be read.
pub async fn derive_account<S: ObjectCache + DerivedStore + ?Sized>(
    store: &S,
    user: UserId,
    connection: &Connection,
) -> Result<LoadedAccount, CachedRebuildError> {
    let rebuilt = rebuild_cached(store, user, connection.id, CACHE_PAGE).await?;
    let mut account = rebuilt.account;
    sort(&mut account);
    let generation = Uuid::new_v4();
    let rows = shares(&account);
    for chunk in rows.chunks(DERIVED_PAGE) {
        let serialised = chunk
            .iter()
            .map(|(key, share)| {
                serde_json::to_string(share)
                    .map(|data| DerivedRow {
                        key: (*key).to_owned(),
                        data,
                    })
                    .map_err(|e| StoreError::Invalid(format!("serialising customer {key}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        store
            .write_derived(connection.id, generation, &serialised)
            .await?;
    }
    drop(rows);
    store
        .publish_derived(
            connection.id,
            &DerivedStamp {
                generation,
                version: RULES_VERSION,
                synced_at: connection.last_synced_at,
                as_of: rebuilt.as_of,
            },
        )
        .await?;
    Ok(LoadedAccount {
        account,
        as_of: rebuilt.as_of,
        derived: false,
    })
}

/// Whether `stamp` is this build's derivation of the connection at its last sync. A connection
/// never synced has no current derivation: its cache may be seeded by other means.
fn is_current(stamp: &DerivedStamp, connection: &Connection) -> bool {
    stamp.version == RULES_VERSION
        && connection.last_synced_at.is_some()
        && stamp.synced_at == connection.last_synced_at
}

/// Customers, subscriptions and payments by id: the order a derivation reads back in.
fn sort(account: &mut Account) {
    account.customers.sort_by(|a, b| a.id.cmp(&b.id));
    account.subscriptions.sort_by(|a, b| a.id.cmp(&b.id));
    account.payments.sort_by(|a, b| a.id.cmp(&b.id));
}

/// The account cut by customer id (`""`: payments of no customer), by key.
fn shares(account: &Account) -> Vec<(&str, Share<'_>)> {
    let mut by: HashMap<&str, Share<'_>> = HashMap::new();
    for c in &account.customers {
        by.entry(c.id.as_str())
            .or_insert_with(empty)
            .customers
            .push(c);
    }
    for s in &account.subscriptions {
        by.entry(s.customer.as_str())
            .or_insert_with(empty)
            .subscriptions
            .push(s);
    }
    for p in &account.payments {
        by.entry(p.customer.as_deref().unwrap_or(""))
            .or_insert_with(empty)
            .payments
            .push(p);
    }
    let mut rows: Vec<(&str, Share<'_>)> = by.into_iter().collect();
    rows.sort_unstable_by_key(|(key, _)| *key);
    rows
}

fn empty<'a>() -> Share<'a> {
    Share {
        customers: Vec::new(),
        subscriptions: Vec::new(),
        payments: Vec::new(),
    }
}

/// The rows of `stamp`'s generation as an account, pages parsed on blocking threads while the
/// next is read; `None` when a row cannot be read (the derivation is then rebuilt).
async fn read<S: DerivedStore + ?Sized>(
    store: &S,
    user: UserId,
    connection: &Connection,
    stamp: &DerivedStamp,
) -> Result<Option<Account>, StoreError> {
    type Parsed = Option<Vec<OwnedShare>>;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut parsing: VecDeque<tokio::task::JoinHandle<Parsed>> = VecDeque::new();
    let mut shares: Vec<OwnedShare> = Vec::new();
    let mut after: Option<String> = None;
    let collect =
        |done: Result<Parsed, tokio::task::JoinError>, shares: &mut Vec<OwnedShare>| match done {
            Ok(Some(page)) => {
                shares.extend(page);
                true
            }
            Ok(None) => false,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
    loop {
        let rows = store
            .derived_page(
                user,
                connection.id,
                stamp.generation,
                after.as_deref(),
                DERIVED_PAGE,
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.key.clone());
        let full = rows.len() == DERIVED_PAGE;
        while parsing.len() >= threads {
            if let Some(done) = parsing.pop_front()
                && !collect(done.await, &mut shares)
            {
                return Ok(None);
            }
        }
        parsing.push_back(tokio::task::spawn_blocking(move || {
            rows.iter()
                .map(|r| serde_json::from_str::<OwnedShare>(&r.data).ok())
                .collect()
        }));
        if !full {
            break;
        }
    }
    while let Some(done) = parsing.pop_front() {
        if !collect(done.await, &mut shares) {
            return Ok(None);
        }
    }
    let mut account = Account::default();
    for s in shares {
        account.customers.extend(s.customers);
        account.subscriptions.extend(s.subscriptions);
        account.payments.extend(s.payments);
    }
    intern_prices(&mut account);
    sort(&mut account);
    Ok(Some(account))
}

/// One shared `Price` per definition, as the rebuild makes them (each row carries its own copy).
fn intern_prices(account: &mut Account) {
    let mut seen: HashMap<String, Vec<Arc<Price>>> = HashMap::new();
    for s in &mut account.subscriptions {
        for item in &mut s.items {
            let same = seen.entry(item.price.id.clone()).or_default();
            match same.iter().find(|p| ***p == *item.price) {
                Some(p) => item.price = Arc::clone(p),
                None => same.push(Arc::clone(&item.price)),
            }
        }
    }
}

#[cfg(test)]
mod tests;
