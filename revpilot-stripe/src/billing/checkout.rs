//! Checkout Sessions for upgrades, and overage invoice items at the end of a period.
//!
//! The requests to the company's own Stripe account are async-stripe's typed ones, sent through
//! RevPilot's [`Client`] ([`Client::request`]: its rate limit and retry rules); the answers are
//! read with RevPilot's own types (only the fields used).

use chrono::{DateTime, SecondsFormat, Utc};
use revpilot_core::billing::{Catalog, Used, bill};
use revpilot_core::ports::{Meter, Period, StoreError, Tier, UsageStore, UserId, UserStore};
use serde::{Deserialize, Serialize};
use url::Url;

use std::collections::HashMap;
use std::str::FromStr;

use stripe_billing::invoice_item::{CreateInvoiceItem, ListInvoiceItem};
use stripe_checkout::CheckoutSessionMode;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
};
use stripe_core::customer::CreateCustomer;

use crate::client::{ApiError, Client};

/// Why a checkout or an overage invoice could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckoutError {
    /// No such user.
    #[error("user {0} not found")]
    UnknownUser(UserId),
    /// The tier is free: there is nothing to check out.
    #[error("the {} tier is free: there is nothing to buy", .0.as_str())]
    FreeTier(Tier),
    /// The tier has no Stripe price configured.
    #[error("no Stripe price is configured for the {} tier: set {}", .0.as_str(), revpilot_core::billing::price_env_var(*.0))]
    NoPrice(Tier),
    /// The user has overage but no Stripe customer to bill.
    #[error("user {0} has overage to bill but no Stripe customer")]
    NoCustomer(UserId),
    /// The bill does not fit in an amount.
    #[error(transparent)]
    Bill(#[from] revpilot_core::billing::BillTooLarge),
    /// Stripe failed or refused.
    #[error(transparent)]
    Stripe(#[from] ApiError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A created Checkout Session: send the user to `url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutSession {
    /// `cs_...`.
    pub id: String,
    /// Stripe's hosted page.
    pub url: Option<String>,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

fn read<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        path: path.to_owned(),
        problem: e.to_string(),
    })
}

/// Where Stripe's Checkout sends the user back: pages of the embedding application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnUrls {
    /// After a completed payment (the example server's `/dashboard?upgraded=true`).
    pub success: Url,
    /// When the user cancels (the example server's `/pricing`).
    pub cancel: Url,
}

/// Starts an upgrade of `user` to `tier`: creates the user's Stripe customer if they have none
/// (idempotency key `customer:{user}`, so a retried or doubled request makes one), then a
/// Checkout Session in subscription mode for the tier's price, with `client_reference_id` = the
/// user id and the tier in the metadata. Stripe sends the user back to `urls`.
///
/// # Errors
/// [`CheckoutError`]: unknown user, a free tier, no configured price, Stripe or the store.
pub async fn create_checkout<S: UserStore + ?Sized>(
    client: &Client,
    store: &S,
    catalog: &Catalog,
    user: UserId,
    tier: Tier,
    urls: &ReturnUrls,
    now: DateTime<Utc>,
) -> Result<CheckoutSession, CheckoutError> {
    if catalog.plan(tier).price == 0 {
        return Err(CheckoutError::FreeTier(tier));
    }
    let price = catalog
        .price_id(tier)
        .ok_or(CheckoutError::NoPrice(tier))?
        .to_owned();
    let profile = store
        .user(user)
        .await?
        .ok_or(CheckoutError::UnknownUser(user))?;
    let customer = match profile.stripe_customer_id {
        Some(c) => c,
        None => {
            let mut create = CreateCustomer::new()
                .metadata(HashMap::from([("user_id".to_owned(), user.to_string())]));
            if let Some(email) = &profile.email {
                create = create.email(email.clone());
            }
            let body = client
                .request(&create, Some(&format!("customer:{user}")))
                .await?;
            let created: Created = read("/v1/customers", &body)?;
            // A concurrent request may have stored its customer first: use the stored one.
            store
                .set_stripe_customer(user, &created.id, now)
                .await?
                .stripe_customer_id
                .unwrap_or(created.id)
        }
    };
    let metadata = HashMap::from([
        ("tier".to_owned(), tier.as_str().to_owned()),
        ("user_id".to_owned(), user.to_string()),
    ]);
    let mut line = CreateCheckoutSessionLineItems::new();
    line.price = Some(price);
    line.quantity = Some(1);
    let mut subscription = CreateCheckoutSessionSubscriptionData::new();
    subscription.metadata = Some(metadata.clone());
    let session = CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Subscription)
        .customer(customer)
        .client_reference_id(user.to_string())
        .line_items(vec![line])
        .metadata(metadata)
        .subscription_data(subscription)
        .success_url(urls.success.as_str())
        .cancel_url(urls.cancel.as_str());
    let body = client.request(&session, None).await?;
    Ok(read("/v1/checkout/sessions", &body)?)
}

/// The idempotency key of a user's overage for a period:
/// `overage:{user}:{start}..{end}` (RFC 3339 instants). Each invoice item adds `:{meter}`,
/// since Stripe refuses one key for two different requests.
pub fn overage_key(user: UserId, period: Period) -> String {
    let t = |d: DateTime<Utc>| d.to_rfc3339_opts(SecondsFormat::Secs, true);
    format!("overage:{user}:{}..{}", t(period.start), t(period.end))
}

/// What [`invoice_overage`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverageInvoiced {
    /// Invoice items created now, by meter.
    pub created: Vec<(Meter, String)>,
    /// Meters whose item existed already (an earlier run): not billed again.
    pub existing: Vec<Meter>,
    /// The overage total, minor units.
    pub amount: i64,
}

#[derive(Deserialize)]
struct ItemPage {
    data: Vec<PendingItem>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Deserialize)]
struct PendingItem {
    id: String,
    #[serde(default, deserialize_with = "crate::objects::metadata")]
    metadata: std::collections::BTreeMap<String, String>,
}

/// Adds the user's overage in the ended `period` to their next Stripe invoice, as one invoice
/// item per meter with overage. Each request carries the key [`overage_key`]`:{meter}`, so a
/// rerun within Stripe's 24 hours of idempotency replays; the key is also in the item's
/// metadata, and a rerun after that finds the item (pending or invoiced) and does not bill it
/// again.
///
/// # Errors
/// [`CheckoutError`]: unknown user, overage without a customer, Stripe or the store.
pub async fn invoice_overage<S: UserStore + UsageStore + ?Sized>(
    client: &Client,
    store: &S,
    catalog: &Catalog,
    user: UserId,
    period: Period,
) -> Result<OverageInvoiced, CheckoutError> {
    let profile = store
        .user(user)
        .await?
        .ok_or(CheckoutError::UnknownUser(user))?;
    let used = Used {
        ai_insights: store.used(user, Meter::AiInsight, period).await?,
        transactions: store.used(user, Meter::TransactionVolume, period).await?,
    };
    let b = bill(catalog, profile.tier, &profile.limits, used)?;
    let mut out = OverageInvoiced {
        amount: b.overage(),
        ..OverageInvoiced::default()
    };
    if b.overage() == 0 {
        return Ok(out);
    }
    let customer = profile
        .stripe_customer_id
        .ok_or(CheckoutError::NoCustomer(user))?;
    let key = overage_key(user, period);
    let existing = existing_keys(client, &customer, &key).await?;
    let rates = catalog.overage();
    let money = |minor: i64| {
        let digits = catalog.currency().minor_digits().unwrap_or(2);
        let scale = 10_i64.pow(digits);
        format!(
            "{}.{:0width$}",
            minor / scale,
            minor % scale,
            width = digits as usize
        )
    };
    let span = format!(
        "{} to {}",
        period.start.format("%Y-%m-%d"),
        period.end.format("%Y-%m-%d")
    );
    let lines = [
        (
            Meter::AiInsight,
            b.ai_insight_overage,
            format!(
                "AI insights over the plan: {} x {} {} ({span})",
                b.ai_insight_overage_units,
                money(rates.ai_insight_unit_price),
                catalog.currency().as_str().to_uppercase()
            ),
        ),
        (
            Meter::TransactionVolume,
            b.transaction_volume_overage,
            format!(
                "Transactions over the plan: {} started blocks of {} x {} {} ({span})",
                b.transaction_volume_overage_blocks,
                rates.transaction_block,
                money(rates.transaction_block_price),
                catalog.currency().as_str().to_uppercase()
            ),
        ),
    ];
    // An unknown code still goes out as written (async-stripe keeps it as `Unknown`).
    let currency = stripe_types::Currency::from_str(catalog.currency().as_str())
        .unwrap_or_else(|_| stripe_types::Currency::Unknown(catalog.currency().to_string()));
    for (meter, amount, description) in lines {
        if amount == 0 {
            continue;
        }
        let item_key = format!("{key}:{meter}");
        if existing.contains(&item_key) {
            out.existing.push(meter);
            continue;
        }
        let item = CreateInvoiceItem::new()
            .customer(customer.clone())
            .amount(amount)
            .currency(currency.clone())
            .description(description)
            .metadata(HashMap::from([
                ("revpilot_overage_key".to_owned(), item_key.clone()),
                ("user_id".to_owned(), user.to_string()),
                ("meter".to_owned(), meter.as_str().to_owned()),
            ]));
        let body = client.request(&item, Some(&item_key)).await?;
        let created: Created = read("/v1/invoiceitems", &body)?;
        out.created.push((meter, created.id));
    }
    Ok(out)
}

/// The overage keys of the customer's invoice items that start with `key`.
async fn existing_keys(
    client: &Client,
    customer: &str,
    key: &str,
) -> Result<Vec<String>, ApiError> {
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        // All of the customer's items, not only pending ones: an item already on an invoice
        // was billed too.
        let mut list = ListInvoiceItem::new().customer(customer).limit(100);
        if let Some(a) = &after {
            list = list.starting_after(a.clone());
        }
        let body = client.request(&list, None).await?;
        let page: ItemPage = read("/v1/invoiceitems", &body)?;
        keys.extend(
            page.data
                .iter()
                .filter_map(|i| i.metadata.get("revpilot_overage_key"))
                .filter(|k| k.starts_with(key))
                .cloned(),
        );
        match (page.has_more, page.data.last()) {
            (true, Some(last)) => after = Some(last.id.clone()),
            _ => return Ok(keys),
        }
    }
}
