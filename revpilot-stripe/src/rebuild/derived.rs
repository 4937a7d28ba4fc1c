//! A connection's account kept in the store, by customer ([`DerivedStore`]): derived once from
//! the object cache after a sync, then loaded by every process that needs it without re-reading
//! every cached Stripe object (a 100,000-customer account caches about 3 GB of JSON; its derived
//! rows are a small fraction of that).
//!
//! A derivation is current when it was built by this build's rebuild ([`RULES_VERSION`]) at the
//! connection's last sync. After a sync it is **updated**: only the customers whose cached
//! objects were written since it read the cache are rebuilt (with every price, coupon and
//! dispute) and their rows replaced, with the shared row of payments of no customer; a changed
//! price or coupon, or more than [`UPDATE_MAX_CUSTOMERS`] customers (see [`LoadOptions`]),
//! rebuild everything. An object never changes owner, except a charge of no customer given one
//! (Stripe allows that change only), which the shared row's rebuild covers. A full derivation writes its rows
//! under a new generation and publishes it at the end, so one killed half-way leaves the
//! previous one readable; an update rewrites rows of the published generation and publishes
//! only if that generation is still the published one. Killed, either leaves the derivation
//! stale, so the next load does it again.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use revpilot_core::model::{Account, Customer, Payment, Price, Subscription};
use revpilot_core::ports::{
    CachedObject, Connection, ConnectionId, DerivedRow, DerivedStamp, DerivedStore, ObjectCache,
    ObjectKind, StoreError, UserId,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::stream::{CACHE_PAGE, CachedRebuildError, Rebuilder, rebuild_cached};

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

/// An update rebuilds at most this many customers by default; more rebuild everything.
pub const UPDATE_MAX_CUSTOMERS: usize = 25_000;

/// How [`load_account_with`] updates a derivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Writes this long before a derivation read the cache may still have been in flight (or
    /// come from a clock that runs behind): an update reads back this far. Reading an object
    /// again changes nothing. Default 5 minutes.
    pub write_slack: TimeDelta,
    /// An update rebuilds at most this many customers; more rebuild everything. Default
    /// [`UPDATE_MAX_CUSTOMERS`].
    pub update_max_customers: usize,
    /// A full rebuild returns its account before storing it as the connection's derivation:
    /// the caller answers first and stores it afterwards with
    /// [`LoadedAccount::unwritten`]'s [`UnwrittenDerivation::write`] (at 100,000 customers
    /// the rows take seconds to write). Default `false`: the load stores it before returning.
    pub defer_derivation: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            write_slack: TimeDelta::minutes(5),
            update_max_customers: UPDATE_MAX_CUSTOMERS,
            defer_derivation: false,
        }
    }
}

/// Customers per read of their objects.
const CUSTOMERS_PER_READ: usize = 500;

/// A connection's account, and where it came from.
#[derive(Debug)]
pub struct LoadedAccount {
    /// The account: customers, subscriptions and payments each sorted by id.
    pub account: Account,
    /// The newest instant the cached objects carry (the data's as-of when nothing better is
    /// known).
    pub as_of: Option<DateTime<Utc>>,
    /// How it was made.
    pub source: Source,
    /// A full rebuild not yet stored as the connection's derivation (only with
    /// [`LoadOptions::defer_derivation`]): until it is written, loads that find no current
    /// derivation rebuild again.
    pub unwritten: Option<UnwrittenDerivation>,
}

/// An account a process already holds for a connection: the base an update patches.
#[derive(Debug, Clone)]
pub struct Held {
    /// The account, as loaded.
    pub account: Arc<Account>,
    /// The connection's last sync it was loaded at.
    pub synced_at: Option<DateTime<Utc>>,
}

/// A connection's account rebuilt from its whole cache and not yet stored as its derivation:
/// [`UnwrittenDerivation::write`] stores it. Dropped unwritten, or killed half-way, it leaves
/// the derivation published before readable (a stale one is not read: the next load that
/// finds no current derivation rebuilds).
#[derive(Debug)]
#[must_use = "the derivation is stored only when written"]
pub struct UnwrittenDerivation {
    connection: ConnectionId,
    stamp: DerivedStamp,
    /// The generation published when the rebuild began (`None`: none was).
    replacing: Option<Uuid>,
}

impl UnwrittenDerivation {
    /// Stores `account` (the [`LoadedAccount`]'s, unchanged) as the connection's derivation,
    /// row by row under a new generation, and publishes it, unless another derivation was
    /// published since the rebuild began (another process's: its publish deleted these rows,
    /// and it is read instead). Returns whether it published.
    ///
    /// # Errors
    /// The store's, or a customer that cannot be serialised.
    pub async fn write<S: DerivedStore + ?Sized>(
        self,
        store: &S,
        account: &Account,
    ) -> Result<bool, StoreError> {
        let started = Utc::now();
        let rows = shares(account);
        for chunk in rows.chunks(DERIVED_PAGE) {
            let serialised = chunk
                .iter()
                .map(|(key, share)| {
                    serde_json::to_string(share)
                        .map(|data| DerivedRow {
                            key: (*key).to_owned(),
                            data,
                        })
                        .map_err(|e| {
                            StoreError::Invalid(format!("serialising customer {key}: {e}"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            store
                .write_derived(self.connection, self.stamp.generation, &serialised)
                .await?;
        }
        drop(rows);
        tracing::debug!(ms = ms(started), "derivation: rows written");
        store
            .publish_derived(self.connection, &self.stamp, self.replacing)
            .await
    }
}

/// How a [`LoadedAccount`] was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Read from the current derivation.
    Derived,
    /// The derivation was updated: this many customers were rebuilt from the cache.
    Updated {
        /// Customers rebuilt.
        customers: usize,
    },
    /// Rebuilt from the whole cache, and derived again.
    Rebuilt,
}

/// One customer's share of the account, as a row stores it.
#[derive(Default, Serialize)]
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

/// The account of the user's `connection`: its current derivation when there is one, else the
/// derivation updated with what changed since (see the module's documentation), else rebuilt
/// from the cache (and derived for the next load).
///
/// `previous` is the account this process already holds for the connection, if any (it need
/// not be current): an update patches it instead of reading every derived row back, in place
/// when the caller holds the only reference to it, else a copy.
///
/// # Errors
/// [`CachedRebuildError`]: the store failed, or a cached object cannot be read.
pub async fn load_account<S: ObjectCache + DerivedStore + ?Sized>(
    store: &S,
    user: UserId,
    connection: &Connection,
    previous: Option<Held>,
) -> Result<LoadedAccount, CachedRebuildError> {
    load_account_with(store, user, connection, previous, &LoadOptions::default()).await
}

/// [`load_account`] with its options.
///
/// # Errors
/// [`CachedRebuildError`]: the store failed, or a cached object cannot be read.
pub async fn load_account_with<S: ObjectCache + DerivedStore + ?Sized>(
    store: &S,
    user: UserId,
    connection: &Connection,
    mut previous: Option<Held>,
    options: &LoadOptions,
) -> Result<LoadedAccount, CachedRebuildError> {
    for _ in 0..3 {
        let Some(stamp) = store.derived_stamp(connection.id).await? else {
            break;
        };
        // Only this build's derivation is read; a connection never synced has none (its cache
        // may be seeded by other means). Current when made at the connection's last sync.
        if stamp.version != RULES_VERSION || connection.last_synced_at.is_none() {
            break;
        }
        // Older than the connection's row: updated. Newer (the row was read before another
        // process's sync ended): read as it is, never published back at the older sync.
        if stamp.synced_at < connection.last_synced_at {
            match update(store, user, connection, &stamp, previous.take(), options).await? {
                Some(loaded) => return Ok(loaded),
                None => break,
            }
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
            source: Source::Derived,
            unwritten: None,
        });
    }
    if options.defer_derivation {
        rebuild_account(store, user, connection).await
    } else {
        derive_account(store, user, connection).await
    }
}

/// Brings the published derivation `stamp` up to the connection's last sync by rebuilding only
/// the customers whose objects were written since it read the cache. `None` when everything
/// must be rebuilt instead (or another process published a new derivation meanwhile).
async fn update<S: ObjectCache + DerivedStore + ?Sized>(
    store: &S,
    user: UserId,
    connection: &Connection,
    stamp: &DerivedStamp,
    previous: Option<Held>,
    options: &LoadOptions,
) -> Result<Option<LoadedAccount>, CachedRebuildError> {
    // Patched only when it holds every change up to the derivation's read: one kept from
    // before another process's update would miss that update's changes.
    let previous = previous
        .filter(|held| held.synced_at >= stamp.synced_at)
        .map(|held| held.account);
    let started = Utc::now();
    let since = stamp.cache_read_at - options.write_slack;
    // A changed price or coupon can change any customer.
    for kind in [ObjectKind::Price, ObjectKind::Coupon] {
        if !store
            .objects_written_since(user, connection.id, kind, since, None, 1)
            .await?
            .is_empty()
        {
            return Ok(None);
        }
    }
    // The shared row is always rebuilt: a charge of no customer may since have been given one
    // (the only change of owner Stripe allows), and it must leave that row.
    let mut dirty: BTreeSet<String> = BTreeSet::from([String::new()]);
    let mut disputed: Vec<String> = Vec::new();
    for kind in [
        ObjectKind::Customer,
        ObjectKind::Subscription,
        ObjectKind::Invoice,
        ObjectKind::Charge,
        ObjectKind::Dispute,
    ] {
        let mut after: Option<String> = None;
        loop {
            let page = store
                .objects_written_since(
                    user,
                    connection.id,
                    kind,
                    since,
                    after.as_deref(),
                    CACHE_PAGE,
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.stripe_id.clone());
            for o in &page {
                if kind == ObjectKind::Dispute {
                    disputed.extend(charge_of(o));
                    continue;
                }
                // A charge of no customer lives in the shared row `""`.
                dirty.insert(o.customer.clone().unwrap_or_default());
            }
            if dirty.len() > options.update_max_customers {
                return Ok(None);
            }
            if page.len() < CACHE_PAGE {
                break;
            }
        }
    }
    // A dispute changes its charge's customer.
    for ids in disputed.chunks(CUSTOMERS_PER_READ) {
        for charge in store
            .objects_by_ids(user, connection.id, ObjectKind::Charge, ids)
            .await?
        {
            dirty.insert(charge.customer.unwrap_or_default());
        }
    }
    if dirty.len() > options.update_max_customers {
        return Ok(None);
    }
    tracing::debug!(
        customers = dirty.len(),
        ms = ms(started),
        "derived update: changes found"
    );
    // The dirty customers, rebuilt with every price, coupon and dispute.
    let mut rebuilder = Rebuilder::new();
    for kind in [ObjectKind::Price, ObjectKind::Coupon, ObjectKind::Dispute] {
        let mut after: Option<String> = None;
        loop {
            let page = store
                .objects_page(user, connection.id, kind, after.as_deref(), CACHE_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.stripe_id.clone());
            add(&mut rebuilder, &page)?;
            if page.len() < CACHE_PAGE {
                break;
            }
        }
    }
    let keys: Vec<String> = dirty.into_iter().collect();
    for chunk in keys.chunks(CUSTOMERS_PER_READ) {
        for kind in [
            ObjectKind::Customer,
            ObjectKind::Subscription,
            ObjectKind::Invoice,
            ObjectKind::Charge,
        ] {
            let objects = store
                .objects_of_customers(user, connection.id, kind, chunk)
                .await?;
            add(&mut rebuilder, &objects)?;
        }
    }
    let rebuilt = rebuilder.finish();
    tracing::debug!(ms = ms(started), "derived update: customers rebuilt");
    let mut part = rebuilt.account;
    sort(&mut part);
    // Their rows, an empty one for a customer with nothing left, in place.
    let shares: HashMap<&str, Share<'_>> = shares(&part).into_iter().collect();
    let mut rows = Vec::with_capacity(keys.len());
    for key in &keys {
        let data = match shares.get(key.as_str()) {
            Some(share) => serde_json::to_string(share),
            None => serde_json::to_string(&Share::default()),
        }
        .map_err(|e| StoreError::Invalid(format!("serialising customer {key}: {e}")))?;
        rows.push(DerivedRow {
            key: key.clone(),
            data,
        });
    }
    drop(shares);
    for chunk in rows.chunks(DERIVED_PAGE) {
        store
            .write_derived(connection.id, stamp.generation, chunk)
            .await?;
    }
    drop(rows);
    tracing::debug!(ms = ms(started), "derived update: rows written");
    let updated = keys.iter().filter(|k| !k.is_empty()).count();
    let account = match previous {
        // Patched in place when no one else holds it, else a copy; off the runtime's threads:
        // at 100,000 customers the patch takes a large part of a second.
        Some(previous) => tokio::task::spawn_blocking(move || {
            let account = Arc::try_unwrap(previous).unwrap_or_else(|shared| (*shared).clone());
            patch(account, &keys, part)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        None => match read(store, user, connection, stamp).await? {
            Some(account) => account,
            None => return Ok(None),
        },
    };
    tracing::debug!(ms = ms(started), "derived update: account patched");
    let as_of = stamp.as_of.max(rebuilt.as_of);
    let published = store
        .publish_derived(
            connection.id,
            &DerivedStamp {
                generation: stamp.generation,
                version: RULES_VERSION,
                synced_at: connection.last_synced_at,
                as_of,
                cache_read_at: started,
            },
            Some(stamp.generation),
        )
        .await?;
    if !published {
        return Ok(None);
    }
    Ok(Some(LoadedAccount {
        account,
        as_of,
        source: Source::Updated { customers: updated },
        unwritten: None,
    }))
}

fn ms(since: DateTime<Utc>) -> i64 {
    (Utc::now() - since).num_milliseconds()
}

fn add(rebuilder: &mut Rebuilder, objects: &[CachedObject]) -> Result<(), CachedRebuildError> {
    for o in objects {
        rebuilder.add(o.kind, o.data.as_bytes())?;
    }
    Ok(())
}

/// The charge a cached dispute is of.
fn charge_of(dispute: &CachedObject) -> Option<String> {
    #[derive(Deserialize)]
    struct D {
        #[serde(default, deserialize_with = "crate::objects::expandable")]
        charge: Option<String>,
    }
    serde_json::from_str::<D>(&dispute.data).ok()?.charge
}

/// `account` with the customers `keys` replaced by what `part` holds of them, sorted as
/// [`sort`] leaves an account: the rest is not copied (it is sorted already, so the sort
/// merges the few new items in).
fn patch(mut account: Account, keys: &[String], part: Account) -> Account {
    let dirty: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    account.customers.retain(|c| !dirty.contains(c.id.as_str()));
    account
        .subscriptions
        .retain(|s| !dirty.contains(s.customer.as_str()));
    account
        .payments
        .retain(|p| !dirty.contains(p.customer.as_deref().unwrap_or("")));
    account.customers.extend(part.customers);
    account.subscriptions.extend(part.subscriptions);
    account.payments.extend(part.payments);
    sort(&mut account);
    account
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
    let mut loaded = rebuild_account(store, user, connection).await?;
    if let Some(unwritten) = loaded.unwritten.take() {
        unwritten.write(store, &loaded.account).await?;
    }
    Ok(loaded)
}

/// Rebuilds the account of the user's `connection` from the whole cache, sorted, with the
/// derivation still to be written.
async fn rebuild_account<S: ObjectCache + DerivedStore + ?Sized>(
    store: &S,
    user: UserId,
    connection: &Connection,
) -> Result<LoadedAccount, CachedRebuildError> {
    let replacing = store
        .derived_stamp(connection.id)
        .await?
        .map(|s| s.generation);
    let started = Utc::now();
    let rebuilt = rebuild_cached(store, user, connection.id, CACHE_PAGE).await?;
    tracing::debug!(ms = ms(started), "derivation: cache rebuilt");
    let mut account = rebuilt.account;
    sort(&mut account);
    Ok(LoadedAccount {
        account,
        as_of: rebuilt.as_of,
        source: Source::Rebuilt,
        unwritten: Some(UnwrittenDerivation {
            connection: connection.id,
            stamp: DerivedStamp {
                generation: Uuid::new_v4(),
                version: RULES_VERSION,
                synced_at: connection.last_synced_at,
                as_of: rebuilt.as_of,
                cache_read_at: started,
            },
            replacing,
        }),
    })
}

/// Customers, subscriptions and payments by id: the order a derivation reads back in.
fn sort(account: &mut Account) {
    sort_customers(&mut account.customers);
    sort_subscriptions(&mut account.subscriptions);
    sort_payments(&mut account.payments);
}

fn sort_customers(customers: &mut [revpilot_core::model::Customer]) {
    customers.sort_by(|a, b| a.id.cmp(&b.id));
}

fn sort_subscriptions(subscriptions: &mut [revpilot_core::model::Subscription]) {
    subscriptions.sort_by(|a, b| a.id.cmp(&b.id));
}

fn sort_payments(payments: &mut [revpilot_core::model::Payment]) {
    payments.sort_by(|a, b| a.id.cmp(&b.id));
}

/// The account cut by customer id (`""`: payments of no customer), by key.
fn shares(account: &Account) -> Vec<(&str, Share<'_>)> {
    let mut by: HashMap<&str, Share<'_>> = HashMap::new();
    for c in &account.customers {
        by.entry(c.id.as_str()).or_default().customers.push(c);
    }
    for s in &account.subscriptions {
        by.entry(s.customer.as_str())
            .or_default()
            .subscriptions
            .push(s);
    }
    for p in &account.payments {
        by.entry(p.customer.as_deref().unwrap_or(""))
            .or_default()
            .payments
            .push(p);
    }
    let mut rows: Vec<(&str, Share<'_>)> = by.into_iter().collect();
    rows.sort_unstable_by_key(|(key, _)| *key);
    rows
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
