//! RevPilot's own tolerant types for the Stripe objects it reads.
//!
//! async-stripe's generated types are pinned to one API version and reject both `localstripe`'s
//! objects and webhooks rendered in other versions. These read only the fields RevPilot needs,
//! default what Stripe may omit, and accept today's shapes (periods on subscription items, an
//! invoice's subscription under `parent.subscription_details`, a discount's coupon under
//! `source`) as well as the older ones (periods and `plan` on the subscription, top-level
//! `invoice.subscription`, `discount.coupon`). Expandable fields read as an id whether Stripe sent
//! the id or the expanded object.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use std::marker::PhantomData;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A Stripe list (`{"object": "list", "data": [...], "has_more": ...}`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct List<T> {
    /// The items of this page.
    #[serde(default = "Vec::new")]
    pub data: Vec<T>,
    /// More items exist beyond this page (nested lists stop at 10 without it).
    #[serde(default)]
    pub has_more: bool,
}

impl<T> Default for List<T> {
    fn default() -> Self {
        List {
            data: Vec::new(),
            has_more: false,
        }
    }
}

/// The ways serde reports JSON's `null` to a visitor, each read as `None` (an `Option`'s `Some`
/// is read as the value itself).
macro_rules! null_is_none {
    () => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    };
}

/// An expandable field: the id, whether Stripe sent it or the expanded object; `None` for null.
/// An expanded object is walked for its `id` (the last one, as a `Value` would keep), without
/// building it.
pub(crate) fn expandable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Expandable;
    impl Expandable {
        fn found<E: de::Error>(other: impl std::fmt::Display) -> Result<Option<String>, E> {
            Err(E::custom(format!(
                "expected an id or an expanded object, found {other}"
            )))
        }
    }
    impl<'de> Visitor<'de> for Expandable {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an id or an expanded object")
        }
        null_is_none!();
        fn visit_str<E: de::Error>(self, id: &str) -> Result<Self::Value, E> {
            Ok(Some(id.to_owned()))
        }
        fn visit_string<E: de::Error>(self, id: String) -> Result<Self::Value, E> {
            Ok(Some(id))
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
            Self::found(b)
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
            Self::found(n)
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Self::found(n)
        }
        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
            Self::found(n)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Self::found("an array")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            match At::<String>::field(map, &["id"])? {
                Some(id) => Ok(Some(id)),
                None => Err(de::Error::custom("expanded object without a string `id`")),
            }
        }
    }
    d.deserialize_any(Expandable)
}

/// A leaf [`At`] can read: `Value::as_bool` or `Value::as_str`.
trait Leaf: Sized {
    fn of_bool(_: bool) -> Option<Self> {
        None
    }
    fn of_str(_: &str) -> Option<Self> {
        None
    }
}

impl Leaf for bool {
    fn of_bool(b: bool) -> Option<Self> {
        Some(b)
    }
}

impl Leaf for String {
    fn of_str(s: &str) -> Option<Self> {
        Some(s.to_owned())
    }
}

/// The value at a path of object keys when it is a `L`, as `Value::pointer` and then `as_bool`
/// or `as_str` would read it, without building the `Value`: any other shape at any depth reads
/// as `None`, and of duplicate keys the last wins. Everything off the path is skipped.
struct At<'p, L> {
    path: &'p [&'p str],
    leaf: PhantomData<L>,
}

impl<'p, L: Leaf> At<'p, L> {
    fn new(path: &'p [&'p str]) -> Self {
        At {
            path,
            leaf: PhantomData,
        }
    }

    /// Reads the value at `path` in a map being visited.
    fn field<'de, A: de::MapAccess<'de>>(
        mut map: A,
        path: &'p [&'p str],
    ) -> Result<Option<L>, A::Error> {
        let Some((first, rest)) = path.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(None);
        };
        let mut found = None;
        while let Some(on_path) = map.next_key_seed(KeyIs(first))? {
            if on_path {
                found = map.next_value_seed(At::<L>::new(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn read<'de, D: Deserializer<'de>>(path: &'p [&'p str], d: D) -> Result<Option<L>, D::Error> {
        d.deserialize_any(At::<L>::new(path))
    }
}

impl<'de, L: Leaf> de::DeserializeSeed<'de> for At<'_, L> {
    type Value = Option<L>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, L: Leaf> Visitor<'de> for At<'_, L> {
    type Value = Option<L>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    null_is_none!();
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(if self.path.is_empty() {
            L::of_bool(b)
        } else {
            None
        })
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(if self.path.is_empty() {
            L::of_str(s)
        } else {
            None
        })
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Self::field(map, self.path)
    }
}

/// A map key compared with one name, without allocating it.
struct KeyIs<'p>(&'p str);

impl<'de> de::DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

/// Metadata: Stripe sends strings; anything else is kept as its JSON text.
pub(crate) fn metadata<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = Option::<BTreeMap<String, Value>>::deserialize(d)?.unwrap_or_default();
    Ok(map
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

/// A JSON number read exactly as a `Decimal` (percent_off is a float in JSON: `25.5`), or a
/// decimal string.
fn exact_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    struct Exact;
    impl<'de> Visitor<'de> for Exact {
        type Value = Option<Decimal>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number")
        }
        null_is_none!();
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(Decimal::from(n)))
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
            Ok(Some(Decimal::from(n)))
        }
        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
            // As JSON writes it (`25.5`, `1e21`): the shortest text that reads back as `n`.
            let n = serde_json::Number::from_f64(n)
                .ok_or_else(|| E::custom(format!("number {n} is not finite")))?;
            let text = n.to_string();
            text.parse::<Decimal>()
                .or_else(|_| Decimal::from_scientific(&text))
                .map(Some)
                .map_err(|e| E::custom(format!("number {n}: {e}")))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.parse::<Decimal>()
                .map(Some)
                .map_err(|e| E::custom(format!("decimal {s:?}: {e}")))
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
            Err(E::custom(format!("expected a number, found {b}")))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom("expected a number, found an array"))
        }
        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom("expected a number, found an object"))
        }
    }
    d.deserialize_any(Exact)
}

/// A postal address (only the country is used, for segmentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Address {
    /// ISO 3166 country code.
    #[serde(default)]
    pub country: Option<String>,
}

/// A Stripe customer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Customer {
    /// `cus_...`.
    pub id: String,
    /// Unix seconds.
    pub created: i64,
    /// Email.
    #[serde(default)]
    pub email: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Default currency, once the customer has been charged.
    #[serde(default)]
    pub currency: Option<String>,
    /// Address.
    #[serde(default)]
    pub address: Option<Address>,
    /// Metadata.
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: BTreeMap<String, String>,
}

/// A price's recurrence.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Recurring {
    /// `day`, `week`, `month` or `year`.
    pub interval: String,
    /// Intervals per period.
    #[serde(default = "one")]
    pub interval_count: u32,
    /// `licensed` or `metered`.
    #[serde(default = "licensed")]
    pub usage_type: String,
}

fn one() -> u32 {
    1
}

fn licensed() -> String {
    "licensed".to_owned()
}

/// One tier of a tiered price.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Tier {
    /// Upper bound, `null` for the last tier (older API versions write `"inf"`).
    #[serde(default, deserialize_with = "up_to")]
    pub up_to: Option<u64>,
    /// Per-unit amount, minor units.
    #[serde(default, deserialize_with = "exact_decimal")]
    pub unit_amount: Option<Decimal>,
    /// Per-unit amount with decimals, as text.
    #[serde(default, deserialize_with = "exact_decimal")]
    pub unit_amount_decimal: Option<Decimal>,
    /// Flat amount, minor units.
    #[serde(default, deserialize_with = "exact_decimal")]
    pub flat_amount: Option<Decimal>,
}

fn up_to<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "inf" => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("tier bound {n} is not a count"))),
        Some(other) => Err(serde::de::Error::custom(format!("tier bound {other}"))),
    }
}

/// A price (today) or a plan (older API versions): the fields both share.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Price {
    /// `price_...` or `plan_...`.
    pub id: String,
    /// Currency.
    pub currency: String,
    /// Amount per unit, minor units (prices).
    #[serde(default, deserialize_with = "exact_decimal")]
    pub unit_amount: Option<Decimal>,
    /// Amount per unit with decimals (prices).
    #[serde(default, deserialize_with = "exact_decimal")]
    pub unit_amount_decimal: Option<Decimal>,
    /// Amount per unit (plans).
    #[serde(default, deserialize_with = "exact_decimal")]
    pub amount: Option<Decimal>,
    /// Amount with decimals (plans).
    #[serde(default, deserialize_with = "exact_decimal")]
    pub amount_decimal: Option<Decimal>,
    /// `per_unit` or `tiered`.
    #[serde(default)]
    pub billing_scheme: Option<String>,
    /// `volume` or `graduated`.
    #[serde(default)]
    pub tiers_mode: Option<String>,
    /// Tiers, when expanded.
    #[serde(default)]
    pub tiers: Option<Vec<Tier>>,
    /// Recurrence (prices); `None` for one-off prices.
    #[serde(default)]
    pub recurring: Option<Recurring>,
    /// Interval (plans).
    #[serde(default)]
    pub interval: Option<String>,
    /// Interval count (plans).
    #[serde(default)]
    pub interval_count: Option<u32>,
    /// Usage type (plans).
    #[serde(default)]
    pub usage_type: Option<String>,
    /// The product's id.
    #[serde(default, deserialize_with = "expandable")]
    pub product: Option<String>,
}

/// A subscription item.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SubscriptionItem {
    /// `si_...`.
    pub id: String,
    /// The price (today).
    #[serde(default)]
    pub price: Option<Price>,
    /// The plan (older API versions).
    #[serde(default)]
    pub plan: Option<Price>,
    /// Quantity (absent for metered prices).
    #[serde(default)]
    pub quantity: Option<u64>,
    /// Current period start (today's API keeps periods on items).
    #[serde(default)]
    pub current_period_start: Option<i64>,
    /// Current period end.
    #[serde(default)]
    pub current_period_end: Option<i64>,
    /// Unix seconds.
    #[serde(default)]
    pub created: Option<i64>,
}

impl SubscriptionItem {
    /// The price, from either shape.
    pub fn price(&self) -> Option<&Price> {
        self.price.as_ref().or(self.plan.as_ref())
    }
}

/// A coupon.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Coupon {
    /// Coupon id.
    pub id: String,
    /// Amount off per period, minor units of `currency`.
    #[serde(default, deserialize_with = "exact_decimal")]
    pub amount_off: Option<Decimal>,
    /// Percent off (0-100).
    #[serde(default, deserialize_with = "exact_decimal")]
    pub percent_off: Option<Decimal>,
    /// Currency of `amount_off`.
    #[serde(default)]
    pub currency: Option<String>,
    /// `forever`, `once` or `repeating`.
    pub duration: String,
    /// Months, for `repeating`.
    #[serde(default)]
    pub duration_in_months: Option<u32>,
}

/// Where a discount's coupon is (today's shape).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DiscountSource {
    /// The coupon, when expanded.
    #[serde(default)]
    pub coupon: Option<CouponRef>,
}

/// A coupon reference: an id or the expanded coupon.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum CouponRef {
    /// The expanded coupon.
    Coupon(Coupon),
    /// Just its id.
    Id(String),
}

/// A discount: a coupon applied from `start` to `end`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Discount {
    /// `di_...`.
    #[serde(default)]
    pub id: Option<String>,
    /// The coupon (older shape).
    #[serde(default)]
    pub coupon: Option<CouponRef>,
    /// Where the coupon is (today's shape).
    #[serde(default)]
    pub source: Option<DiscountSource>,
    /// Unix seconds.
    #[serde(default)]
    pub start: Option<i64>,
    /// Unix seconds, for coupons that end.
    #[serde(default)]
    pub end: Option<i64>,
}

impl Discount {
    /// The coupon from either shape.
    pub fn coupon(&self) -> Option<&CouponRef> {
        self.coupon
            .as_ref()
            .or_else(|| self.source.as_ref().and_then(|s| s.coupon.as_ref()))
    }
}

/// A subscription's discounts list entry: an id (not expanded) or the discount.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum DiscountRef {
    /// The discount.
    Discount(Box<Discount>),
    /// Its id only (expand `discounts` to read it).
    Id(String),
}

/// Paused collection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PauseCollection {
    /// `keep_as_draft`, `mark_uncollectible` or `void`.
    pub behavior: String,
    /// When collection resumes.
    #[serde(default)]
    pub resumes_at: Option<i64>,
}

/// A subscription.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Subscription {
    /// `sub_...`.
    pub id: String,
    /// The customer's id.
    #[serde(deserialize_with = "expandable")]
    pub customer: Option<String>,
    /// Currency (older API versions and localstripe leave it to the plan: see
    /// [`Subscription::currency`]).
    #[serde(default, rename = "currency")]
    pub own_currency: Option<String>,
    /// Status.
    pub status: String,
    /// Unix seconds.
    pub created: i64,
    /// When it started.
    #[serde(default)]
    pub start_date: Option<i64>,
    /// Trial start.
    #[serde(default)]
    pub trial_start: Option<i64>,
    /// Trial end.
    #[serde(default)]
    pub trial_end: Option<i64>,
    /// Scheduled cancellation.
    #[serde(default)]
    pub cancel_at: Option<i64>,
    /// Cancels when the period ends.
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// When the cancellation was requested.
    #[serde(default)]
    pub canceled_at: Option<i64>,
    /// When it ended.
    #[serde(default)]
    pub ended_at: Option<i64>,
    /// Paused collection, if any.
    #[serde(default)]
    pub pause_collection: Option<PauseCollection>,
    /// The items (first page).
    #[serde(default)]
    pub items: List<SubscriptionItem>,
    /// Discounts (today).
    #[serde(default)]
    pub discounts: Vec<DiscountRef>,
    /// The discount (older API versions).
    #[serde(default)]
    pub discount: Option<Discount>,
    /// Current period start (older API versions keep it here).
    #[serde(default)]
    pub current_period_start: Option<i64>,
    /// Current period end (older API versions).
    #[serde(default)]
    pub current_period_end: Option<i64>,
    /// Metadata.
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: BTreeMap<String, String>,
}

impl Subscription {
    /// The currency: the subscription's own, else its first item's price's.
    pub fn currency(&self) -> Option<&str> {
        self.own_currency.as_deref().or_else(|| {
            self.items
                .data
                .iter()
                .find_map(|i| i.price().map(|p| p.currency.as_str()))
        })
    }

    /// The current period end, from the subscription (older shape) or its items (today).
    pub fn current_period_end(&self) -> Option<i64> {
        self.current_period_end.or_else(|| {
            self.items
                .data
                .iter()
                .filter_map(|i| i.current_period_end)
                .max()
        })
    }
}

/// A period `[start, end]` in unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct LinePeriod {
    /// Start.
    pub start: i64,
    /// End.
    pub end: i64,
}

/// An invoice line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InvoiceLine {
    /// `il_...`.
    pub id: String,
    /// Amount, minor units (before discounts).
    #[serde(default, deserialize_with = "exact_decimal")]
    pub amount: Option<Decimal>,
    /// Currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// The period it bills.
    #[serde(default)]
    pub period: Option<LinePeriod>,
    /// Quantity.
    #[serde(default)]
    pub quantity: Option<u64>,
    /// Proration (older API versions).
    #[serde(default)]
    pub proration: Option<bool>,
    /// The price (older API versions).
    #[serde(default)]
    pub price: Option<Price>,
    /// The plan (older still).
    #[serde(default)]
    pub plan: Option<Price>,
    /// Proration (today: `parent.subscription_item_details.proration`; any other shape of
    /// `parent` reads as `None`).
    #[serde(default, rename = "parent", deserialize_with = "line_proration")]
    pub parent_proration: Option<bool>,
    /// The price's id (today: `pricing.price_details.price`; any other shape of `pricing` reads
    /// as `None`).
    #[serde(default, rename = "pricing", deserialize_with = "line_price")]
    pub pricing_price: Option<String>,
}

fn line_proration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    At::read(&["subscription_item_details", "proration"], d)
}

fn line_price<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    At::read(&["price_details", "price"], d)
}

fn invoice_subscription<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    At::read(&["subscription_details", "subscription"], d)
}

impl InvoiceLine {
    /// Whether the line is a proration, from either shape.
    pub fn is_proration(&self) -> bool {
        self.proration.unwrap_or(false) || self.parent_proration.unwrap_or(false)
    }

    /// The price id, from either shape.
    pub fn price_id(&self) -> Option<&str> {
        self.price
            .as_ref()
            .or(self.plan.as_ref())
            .map(|p| p.id.as_str())
            .or(self.pricing_price.as_deref())
    }
}

/// An invoice.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Invoice {
    /// `in_...`.
    pub id: String,
    /// The customer's id.
    #[serde(default, deserialize_with = "expandable")]
    pub customer: Option<String>,
    /// The subscription (older API versions).
    #[serde(default, deserialize_with = "expandable")]
    pub subscription: Option<String>,
    /// The subscription (today: `parent.subscription_details.subscription`; any other shape of
    /// `parent` reads as `None`).
    #[serde(default, rename = "parent", deserialize_with = "invoice_subscription")]
    pub parent_subscription: Option<String>,
    /// Status.
    #[serde(default)]
    pub status: Option<String>,
    /// Currency.
    pub currency: String,
    /// Unix seconds.
    pub created: i64,
    /// Lines (first page: follow `has_more` for the rest).
    #[serde(default)]
    pub lines: List<InvoiceLine>,
    /// Discounts applied to the invoice (ids unless expanded).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub discounts: Vec<DiscountRef>,
    /// The discount (older API versions).
    #[serde(default)]
    pub discount: Option<Discount>,
}

impl Invoice {
    /// The subscription this invoice bills, from either shape.
    pub fn subscription_id(&self) -> Option<&str> {
        self.subscription
            .as_deref()
            .or(self.parent_subscription.as_deref())
    }
}

/// A refund.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Refund {
    /// `re_...`.
    pub id: String,
    /// Amount, minor units.
    #[serde(deserialize_with = "required_decimal")]
    pub amount: Decimal,
    /// Unix seconds.
    pub created: i64,
    /// Status (`succeeded`, `pending`, `failed`, ...).
    #[serde(default)]
    pub status: Option<String>,
}

/// A list Stripe may send as `null`.
fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn required_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    exact_decimal(d)?.ok_or_else(|| serde::de::Error::custom("amount is null"))
}

/// A charge.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Charge {
    /// `ch_...`.
    pub id: String,
    /// Amount, minor units.
    #[serde(deserialize_with = "required_decimal")]
    pub amount: Decimal,
    /// Amount captured.
    #[serde(default, deserialize_with = "exact_decimal")]
    pub amount_captured: Option<Decimal>,
    /// Currency.
    pub currency: String,
    /// Unix seconds.
    pub created: i64,
    /// The customer's id.
    #[serde(default, deserialize_with = "expandable")]
    pub customer: Option<String>,
    /// `succeeded`, `pending` or `failed`.
    pub status: String,
    /// Amount refunded in all, minor units.
    #[serde(default, deserialize_with = "exact_decimal")]
    pub amount_refunded: Option<Decimal>,
    /// Refunds (first page).
    #[serde(default)]
    pub refunds: Option<List<Refund>>,
}

/// A dispute of a charge (`/v1/disputes`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Dispute {
    /// `dp_...`.
    pub id: String,
    /// The disputed charge's id.
    #[serde(default, deserialize_with = "expandable")]
    pub charge: Option<String>,
    /// Amount disputed, minor units.
    #[serde(deserialize_with = "required_decimal")]
    pub amount: Decimal,
    /// Currency of `amount`.
    pub currency: String,
    /// Unix seconds.
    pub created: i64,
    /// `warning_needs_response`, `warning_under_review`, `warning_closed` (inquiries: no money
    /// moves), `needs_response`, `under_review`, `won` or `lost`.
    pub status: String,
    /// The money the dispute moved: the withdrawal (with the dispute fee) and, for a won
    /// dispute, the reinstatement.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub balance_transactions: Vec<DisputeBalance>,
}

/// A balance transaction of a dispute (expanded, as Stripe embeds them).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DisputeBalance {
    /// Gross amount, minor units: negative for the withdrawal, positive for a reinstatement.
    #[serde(deserialize_with = "required_decimal")]
    pub amount: Decimal,
    /// Fees, minor units (the dispute fee; negative when it is given back).
    #[serde(default, deserialize_with = "exact_decimal")]
    pub fee: Option<Decimal>,
    /// Currency of `amount` and `fee` (the balance's, which may differ from the dispute's).
    pub currency: String,
    /// Unix seconds.
    pub created: i64,
}

/// The `data` of an event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventData {
    /// The object as of the event, rendered in the endpoint's API version.
    pub object: Value,
    /// What changed, for `*.updated` events.
    #[serde(default)]
    pub previous_attributes: Option<Value>,
}

/// An event (from the Events API or a webhook).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// `evt_...`.
    pub id: String,
    /// Type (`customer.subscription.updated`, ...).
    #[serde(rename = "type")]
    pub event_type: String,
    /// Unix seconds.
    pub created: i64,
    /// Live or test mode.
    #[serde(default)]
    pub livemode: bool,
    /// The API version it was rendered in.
    #[serde(default)]
    pub api_version: Option<String>,
    /// The connected account, for Connect events.
    #[serde(default)]
    pub account: Option<String>,
    /// Payload.
    pub data: EventData,
}

/// Why an object cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {id}: {problem}")]
pub struct ParseError {
    /// Which kind of object was expected.
    pub kind: &'static str,
    /// Its id when the JSON has one, else `(no id)`.
    pub id: String,
    /// What is wrong.
    pub problem: String,
}

/// Reads one Stripe object of type `T` from JSON bytes, naming the object in any error.
///
/// # Errors
/// [`ParseError`] with the object's id (when it has one) and serde's message.
pub fn parse<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    json: &[u8],
) -> Result<T, ParseError> {
    serde_json::from_slice(json).map_err(|e| {
        let id = serde_json::from_slice::<Value>(json)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "(no id)".to_owned());
        ParseError {
            kind,
            id,
            problem: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests;
