//! The Stripe-agnostic input model: customers, subscriptions with their history, and payments.
//!
//! An adapter (the Stripe sync, a CSV import, a test) builds an [`Account`]; the metrics engine
//! reads it. Every type is serde-serialisable, and fields Stripe may omit have defaults, so a JSON
//! account can be written by hand. Amounts are [`Decimal`]s in the currency's **minor units**
//! (cents), as Stripe sends them; the engine reports in major units.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::Currency;

/// An instant, always UTC.
pub type Instant = DateTime<Utc>;

/// Everything the engine needs to know about one business's revenue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Customers, each once.
    #[serde(default)]
    pub customers: Vec<Customer>,
    /// Subscriptions with their full history.
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    /// Succeeded payments (charges) and their refunds: cash revenue, kept apart from MRR.
    #[serde(default)]
    pub payments: Vec<Payment>,
}

impl Account {
    /// The bytes the account holds, its own and on the heap, counted from its vectors' and
    /// strings' capacities (shared prices once per item, as a pointer): what a cache of accounts
    /// bounds itself by. An estimate of the allocations, not of the allocator's overhead.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let s = String::capacity;
        let o = |v: &Option<String>| v.as_ref().map_or(0, String::capacity);
        let customers: usize = self
            .customers
            .iter()
            .map(|c| {
                s(&c.id)
                    + o(&c.country)
                    + c.metadata.0.capacity() * size_of::<(String, String)>()
                    + c.metadata.0.iter().map(|(k, v)| s(k) + s(v)).sum::<usize>()
            })
            .sum();
        let subscriptions: usize = self
            .subscriptions
            .iter()
            .map(|x| {
                s(&x.id)
                    + s(&x.customer)
                    + x.statuses.capacity() * size_of::<StatusChange>()
                    + x.items.capacity() * size_of::<ItemPeriod>()
                    + x.discounts.capacity() * size_of::<Discount>()
                    + x.discounts.iter().map(|d| s(&d.coupon)).sum::<usize>()
            })
            .sum();
        let payments: usize = self
            .payments
            .iter()
            .map(|p| s(&p.id) + o(&p.customer) + p.refunds.capacity() * size_of::<Refund>())
            .sum();
        size_of::<Account>()
            + self.customers.capacity() * size_of::<Customer>()
            + self.subscriptions.capacity() * size_of::<Subscription>()
            + self.payments.capacity() * size_of::<Payment>()
            + customers
            + subscriptions
            + payments
    }
}

/// A paying (or prospective) customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// The customer's id, unique in the account (`cus_...` for Stripe).
    pub id: String,
    /// When the customer was created.
    pub created: Instant,
    /// ISO 3166 country code, when known; used for segmentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Free-form metadata; any key can segment a series.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

/// A subscription and its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// The subscription's id (`sub_...`).
    pub id: String,
    /// The id of the customer who holds it.
    pub customer: String,
    /// The currency every item and amount discount of the subscription is billed in.
    pub currency: Currency,
    /// When the subscription was created.
    pub created: Instant,
    /// Status changes over time. Before the first change the subscription does not exist; each
    /// status holds until the next change.
    #[serde(default)]
    pub statuses: Vec<StatusChange>,
    /// Item periods: which price, at which quantity, from when to when.
    #[serde(default)]
    pub items: Vec<ItemPeriod>,
    /// Discounts applied to the whole subscription, in the order Stripe applies them.
    #[serde(default)]
    pub discounts: Vec<Discount>,
    /// How and when the subscription was canceled, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation: Option<Cancellation>,
    /// End of the trial, if there was one: nothing counts before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_end: Option<Instant>,
}

/// A subscription's status from `at` until the next change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// When the subscription entered `status`.
    pub at: Instant,
    /// The status it entered.
    pub status: Status,
}

/// Stripe's subscription statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// In a free trial: counts 0.
    Trialing,
    /// Paid up: counts.
    Active,
    /// The latest invoice failed and Stripe is retrying: counts (the customer still has access).
    PastDue,
    /// Retries exhausted, invoices left open: counts 0.
    Unpaid,
    /// Collection paused: counts 0 unless [`crate::Rules::paused_counts`].
    Paused,
    /// First payment not yet made: counts 0.
    Incomplete,
    /// First payment never made: counts 0.
    IncompleteExpired,
    /// Ended: counts 0.
    Canceled,
}

/// A price at a quantity over a period of a subscription's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemPeriod {
    /// The price billed. Shared: many items bill the same price, as in Stripe.
    pub price: Arc<Price>,
    /// The quantity (seats, units); 1 when omitted.
    #[serde(default = "one")]
    pub quantity: u64,
    /// When this price and quantity started to apply.
    pub from: Instant,
    /// When they stopped applying (exclusive); open-ended when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Instant>,
}

fn one() -> u64 {
    1
}

fn one_u32() -> u32 {
    1
}

/// A price: what one period of an item costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Price {
    /// The price id (`price_...`); plan segmentation groups by it.
    pub id: String,
    /// The product the price belongs to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// The price's currency when given; it must match the subscription's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<Currency>,
    /// Amount per unit per period in minor units, for the per-unit scheme.
    #[serde(default)]
    pub unit_amount: Decimal,
    /// Billing interval; `None` for a one-off price, which never counts in MRR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Interval>,
    /// Number of intervals per billing period (3 with `month` is quarterly).
    #[serde(default = "one_u32")]
    pub interval_count: u32,
    /// Per-unit or tiered.
    #[serde(default)]
    pub scheme: BillingScheme,
    /// Licensed (a fixed quantity) or metered (billed on reported usage).
    #[serde(default)]
    pub usage_type: UsageType,
}

/// A billing interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    /// Daily.
    Day,
    /// Weekly.
    Week,
    /// Monthly.
    Month,
    /// Yearly.
    Year,
}

/// How a price turns a quantity into an amount.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum BillingScheme {
    /// `unit_amount` x quantity.
    #[default]
    PerUnit,
    /// Tiered pricing.
    Tiered {
        /// Volume or graduated.
        mode: TiersMode,
        /// The tiers, ascending by `up_to`; the last one open (`up_to: null`).
        tiers: Vec<Tier>,
    },
}

/// Tiered pricing modes, as Stripe defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TiersMode {
    /// The whole quantity is priced at the tier it falls in.
    Volume,
    /// Each unit is priced at the tier it falls in.
    Graduated,
}

/// One pricing tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    /// Upper bound of the tier (inclusive); `None` for the last, open tier.
    #[serde(default)]
    pub up_to: Option<u64>,
    /// Amount per unit in this tier, minor units.
    #[serde(default)]
    pub unit_amount: Decimal,
    /// Flat amount for reaching this tier, minor units.
    #[serde(default)]
    pub flat_amount: Decimal,
}

/// Licensed or metered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageType {
    /// A fixed quantity billed in advance: counts in MRR.
    #[default]
    Licensed,
    /// Billed on reported usage: excluded from MRR.
    Metered,
}

/// A coupon applied to a subscription from `start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discount {
    /// The coupon's id.
    #[serde(default)]
    pub coupon: String,
    /// Percent or amount off.
    pub off: DiscountOff,
    /// How long the coupon lasts.
    pub duration: Duration,
    /// When it started to apply.
    pub start: Instant,
    /// When it stops applying, if Stripe said so (it does for `repeating`); otherwise derived from
    /// `duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Instant>,
}

/// What a coupon takes off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscountOff {
    /// A percentage (0-100) of the subscription's amount.
    Percent(Decimal),
    /// A fixed amount per billing period, in minor units of `currency`.
    Amount {
        /// Amount off per billing period, minor units.
        amount: Decimal,
        /// Currency of the amount; must be the subscription's.
        currency: Currency,
    },
}

/// How long a coupon lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Duration {
    /// Applies to every invoice.
    Forever,
    /// Applies to the first billing period only.
    Once,
    /// Applies for a number of months.
    Repeating {
        /// How many months.
        months: u32,
    },
}

/// A cancellation, immediate or at period end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancellation {
    /// When the customer (or the merchant) asked for the cancellation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canceled_at: Option<Instant>,
    /// The subscription runs until the end of the paid period.
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// When a scheduled cancellation will take effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_at: Option<Instant>,
    /// When the subscription actually ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Instant>,
}

/// A succeeded charge and its refunds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    /// The charge id (`ch_...`).
    pub id: String,
    /// The paying customer's id, when the charge has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// When it succeeded.
    pub at: Instant,
    /// Amount captured, minor units.
    pub amount: Decimal,
    /// The charge's currency.
    pub currency: Currency,
    /// Refunds of this charge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refunds: Vec<Refund>,
    /// Money disputes took from the payment (negative) or gave back (positive), with their
    /// fees: cash like refunds (see `docs/metrics.md`, "Cash").
    #[serde(default)]
    pub disputes: Vec<DisputeMove>,
}

/// A refund of (part of) a payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refund {
    /// When it was refunded.
    pub at: Instant,
    /// Amount refunded, minor units of the payment's currency.
    pub amount: Decimal,
}

/// Cash a dispute moved, at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisputeMove {
    /// When the money moved.
    pub at: Instant,
    /// Minor units of the payment's currency: negative when taken (the withdrawal and its
    /// fee), positive when given back (a won dispute).
    pub amount: Decimal,
}

/// Key-value metadata, kept as a sorted vector: a customer has a handful of keys, and a million
/// customers must not each pay for a tree node. Serialises as a JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    /// No entries.
    pub fn new() -> Self {
        Metadata(Vec::new())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        let key = key.into();
        let value = value.into();
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut m = Metadata::new();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = std::collections::BTreeMap::<String, String>::deserialize(d)?;
        Ok(Metadata(map.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_round_trip_through_json() {
        let account = crate::synth::generate(&crate::synth::SynthConfig::new(50, 3));
        let json = serde_json::to_string(&account).unwrap();
        let back: Account = serde_json::from_str(&json).unwrap();
        assert_eq!(back, account);
        // Metadata is a JSON object; missing optional fields read as their defaults.
        let c: Customer = serde_json::from_str(
            r#"{"id":"cus_1","created":"2024-01-01T00:00:00Z","metadata":{"b":"2","a":"1"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.metadata.iter().collect::<Vec<_>>(),
            vec![("a", "1"), ("b", "2")]
        );
        assert_eq!(c.metadata.get("b"), Some("2"));
        assert_eq!(c.country, None);
        assert!(serde_json::from_str::<Subscription>(r#"{"id":"sub_1"}"#).is_err());
    }
}
