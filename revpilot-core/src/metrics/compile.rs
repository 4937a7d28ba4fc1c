//! Compiling an [`Account`] once into flat, indexed arrays: customers, subscriptions grouped by
//! customer, items priced to a monthly native amount, discounts and cash. Everything here is
//! independent of the rule profile, so one compiled account serves every profile.

use std::collections::hash_map::Entry;

use chrono::{DateTime, Months, TimeDelta, Utc};
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

use crate::anomaly::Anomaly;
use crate::model::{
    Account, BillingScheme, Customer, DiscountOff, Duration, Interval, Price, Status, Subscription,
    TiersMode, UsageType,
};
use crate::money::Currency;

/// Seconds since the Unix epoch.
pub(crate) type Secs = i64;
/// "Never" as an instant.
pub(crate) const NEVER: Secs = i64::MAX;

/// A compiled customer.
pub(crate) struct CCustomer<'a> {
    pub(crate) id: &'a str,
    /// The customer object, absent for a customer only named by a subscription.
    pub(crate) src: Option<&'a Customer>,
}

/// A compiled subscription item period.
#[derive(Clone, Copy)]
pub(crate) struct CItem {
    pub(crate) from: Secs,
    pub(crate) to: Secs,
    /// Interned price id.
    pub(crate) price: u32,
    /// Normalised monthly native amount before discounts.
    pub(crate) monthly: i64,
    pub(crate) interval: Interval,
    pub(crate) count: u32,
}

/// What a compiled discount takes off.
#[derive(Clone, Copy)]
pub(crate) enum COff {
    /// Multiply by `num / den`.
    Percent { num: i128, den: i128 },
    /// Native amount per billing period.
    Amount(i64),
}

/// A compiled discount.
#[derive(Clone, Copy)]
pub(crate) struct CDiscount {
    pub(crate) start: Secs,
    /// End when every coupon duration counts ([`crate::rules::DiscountRule::WhileApplicable`]).
    pub(crate) end_while_applicable: Secs,
    /// End when only `forever` counts: `NEVER` or Stripe's own `end`; `None` if not forever.
    pub(crate) end_forever_only: Option<Secs>,
    pub(crate) off: COff,
}

/// A compiled subscription.
pub(crate) struct CSub<'a> {
    pub(crate) src: &'a Subscription,
    pub(crate) customer: u32,
    pub(crate) currency: u16,
    pub(crate) items: std::ops::Range<u32>,
    pub(crate) statuses: std::ops::Range<u32>,
    pub(crate) discounts: std::ops::Range<u32>,
    pub(crate) trial_end: Secs,
    /// End of service: `ended_at`, else the scheduled `cancel_at`, else an immediate cancellation.
    pub(crate) ends_at: Secs,
    /// When the cancellation was requested, if it was.
    pub(crate) canceled_at: Secs,
}

/// A cash movement: a payment (positive) or a refund (negative).
#[derive(Clone, Copy)]
pub(crate) struct CCash {
    pub(crate) at: Secs,
    pub(crate) currency: u16,
    pub(crate) amount: i64,
}

/// The compiled account.
pub(crate) struct Compiled<'a> {
    pub(crate) customers: Vec<CCustomer<'a>>,
    /// `subs[cust_offsets[c]..cust_offsets[c + 1]]` are customer `c`'s subscriptions.
    pub(crate) cust_offsets: Vec<u32>,
    pub(crate) subs: Vec<CSub<'a>>,
    pub(crate) items: Vec<CItem>,
    pub(crate) statuses: Vec<(Secs, Status)>,
    pub(crate) discounts: Vec<CDiscount>,
    pub(crate) prices: Vec<&'a str>,
    pub(crate) currencies: Vec<Currency>,
    pub(crate) cash: Vec<CCash>,
    pub(crate) anomalies: Vec<Anomaly>,
    /// An upper bound, in major units of each currency, of every amount the engine may sum:
    /// the sum over items of |monthly| times (1 + the number of changes of its subscription).
    pub(crate) magnitude: Vec<f64>,
}

pub(crate) fn secs(t: &DateTime<Utc>) -> Secs {
    t.timestamp()
}

impl<'a> Compiled<'a> {
    pub(crate) fn subs_of(&self, customer: u32) -> std::ops::Range<usize> {
        let c = customer as usize;
        self.cust_offsets[c] as usize..self.cust_offsets[c + 1] as usize
    }

    pub(crate) fn new(account: &'a Account) -> Self {
        let mut b = Builder::default();
        // Exact capacities: growing by doubling would touch about twice the memory in fresh
        // pages, which costs more here than the work itself.
        let (mut n_items, mut n_statuses, mut n_discounts) = (0, 0, 0);
        for s in &account.subscriptions {
            n_items += s.items.len();
            n_statuses += s.statuses.len();
            n_discounts += s.discounts.len();
        }
        b.items.reserve_exact(n_items);
        b.statuses.reserve_exact(n_statuses);
        b.discounts.reserve_exact(n_discounts);
        let mut customers: Vec<CCustomer<'a>> = Vec::with_capacity(account.customers.len());
        let mut cust_index: FxHashMap<&'a str, u32> = FxHashMap::default();
        cust_index.reserve(account.customers.len());
        for c in &account.customers {
            match cust_index.entry(c.id.as_str()) {
                Entry::Occupied(_) => b.anomalies.push(Anomaly::DuplicateId { id: c.id.clone() }),
                Entry::Vacant(v) => {
                    v.insert(customers.len() as u32);
                    customers.push(CCustomer {
                        id: &c.id,
                        src: Some(c),
                    });
                }
            }
        }

        // Place each subscription under its customer, then lay them out grouped by customer.
        let mut placed: Vec<(u32, &'a Subscription)> =
            Vec::with_capacity(account.subscriptions.len());
        for s in &account.subscriptions {
            if b.digits(s.currency).is_none() {
                b.anomalies.push(Anomaly::UnknownCurrency {
                    object: s.id.clone(),
                    currency: s.currency,
                });
                continue;
            }
            let cust = match cust_index.get(s.customer.as_str()) {
                Some(c) => *c,
                None => {
                    b.anomalies.push(Anomaly::UnknownCustomer {
                        object: s.id.clone(),
                        customer: s.customer.clone(),
                    });
                    let idx = customers.len() as u32;
                    cust_index.insert(&s.customer, idx);
                    customers.push(CCustomer {
                        id: &s.customer,
                        src: None,
                    });
                    idx
                }
            };
            placed.push((cust, s));
        }
        // Counting sort by customer keeps each customer's subscriptions in input order.
        let mut cust_offsets = vec![0u32; customers.len() + 1];
        for (c, _) in &placed {
            cust_offsets[*c as usize + 1] += 1;
        }
        for i in 0..customers.len() {
            cust_offsets[i + 1] += cust_offsets[i];
        }
        let mut next = cust_offsets.clone();
        let mut order: Vec<Option<(u32, &'a Subscription)>> = vec![None; placed.len()];
        for (c, s) in placed {
            let slot = &mut next[c as usize];
            order[*slot as usize] = Some((c, s));
            *slot += 1;
        }
        // A subscription listed twice (say, by overlapping export pages) is the same object under
        // the same customer, so duplicates are looked for within each customer's group.
        let mut subs: Vec<CSub<'a>> = Vec::with_capacity(order.len());
        for c in 0..customers.len() {
            let group = cust_offsets[c] as usize..cust_offsets[c + 1] as usize;
            let first = subs.len();
            for (cust, s) in order[group].iter().flatten() {
                if subs[first..].iter().any(|x| x.src.id == s.id) {
                    b.anomalies.push(Anomaly::DuplicateId { id: s.id.clone() });
                    continue;
                }
                subs.push(b.compile_sub(*cust, s));
            }
            cust_offsets[c] = first as u32;
        }
        cust_offsets[customers.len()] = subs.len() as u32;

        let mut cash = Vec::with_capacity(account.payments.len());
        let mut payment_ids: FxHashMap<&'a str, ()> = FxHashMap::default();
        for p in &account.payments {
            if payment_ids.insert(p.id.as_str(), ()).is_some() {
                b.anomalies.push(Anomaly::DuplicateId { id: p.id.clone() });
                continue;
            }
            let Some(digits) = b.digits(p.currency) else {
                b.anomalies.push(Anomaly::UnknownCurrency {
                    object: p.id.clone(),
                    currency: p.currency,
                });
                continue;
            };
            if let Some(c) = &p.customer
                && !cust_index.contains_key(c.as_str())
            {
                b.anomalies.push(Anomaly::UnknownCustomer {
                    object: p.id.clone(),
                    customer: c.clone(),
                });
            }
            let amounts = std::iter::once((secs(&p.at), p.amount))
                .chain(p.refunds.iter().map(|r| (secs(&r.at), -r.amount)));
            if p.amount < Decimal::ZERO || p.refunds.iter().any(|r| r.amount < Decimal::ZERO) {
                b.anomalies.push(Anomaly::NegativeAmount {
                    object: p.id.clone(),
                });
                continue;
            }
            let refunded: Decimal = p.refunds.iter().map(|r| r.amount).sum();
            if refunded > p.amount {
                b.anomalies.push(Anomaly::OverRefunded {
                    payment: p.id.clone(),
                });
            }
            let currency = b.currency(p.currency);
            let mut converted = Vec::new();
            for (at, minor) in amounts {
                match minor_to_native(minor, digits) {
                    Some(amount) => converted.push(CCash {
                        at,
                        currency,
                        amount,
                    }),
                    None => {
                        b.anomalies.push(Anomaly::AmountOutOfRange {
                            object: p.id.clone(),
                        });
                        converted.clear();
                        break;
                    }
                }
            }
            for c in &converted {
                b.magnitude[c.currency as usize] += (c.amount as f64).abs() / 1e8;
            }
            cash.extend(converted);
        }

        b.anomalies.sort();
        b.anomalies.dedup();
        Compiled {
            customers,
            cust_offsets,
            subs,
            items: b.items,
            statuses: b.statuses,
            discounts: b.discounts,
            prices: b.prices,
            currencies: b.currencies,
            cash,
            anomalies: b.anomalies,
            magnitude: b.magnitude,
        }
    }
}

/// A price's amount for one period: per unit (times the quantity) or already a total.
enum PeriodAmount {
    PerUnit(Decimal),
    Total(Decimal),
}

#[derive(Default)]
struct Builder<'a> {
    digits_cache: Vec<(Currency, Option<u32>)>,
    price_by_ptr: FxHashMap<usize, u32>,
    scratch: Vec<(u32, Secs, Secs)>,
    items: Vec<CItem>,
    statuses: Vec<(Secs, Status)>,
    discounts: Vec<CDiscount>,
    prices: Vec<&'a str>,
    price_index: FxHashMap<&'a str, u32>,
    currencies: Vec<Currency>,
    magnitude: Vec<f64>,
    anomalies: Vec<Anomaly>,
}

/// `amount` minor units times `qty`, times `num / den`, as native fixed point: one exact rational
/// computation rounded half-even once. `None` when it is out of range.
pub(crate) fn scaled_native(
    amount: Decimal,
    qty: u64,
    digits: u32,
    num: i128,
    den: i128,
) -> Option<i64> {
    let shift = crate::money::NATIVE_SCALE.checked_sub(digits)?;
    let numerator = amount
        .mantissa()
        .checked_mul(i128::from(qty))?
        .checked_mul(10i128.checked_pow(shift)?)?
        .checked_mul(num)?;
    let denominator = 10i128.checked_pow(amount.scale())?.checked_mul(den)?;
    let v = super::timeline::div_half_even(numerator, denominator);
    let limit = i128::from(crate::money::MAX_ITEM_MAJOR) * 10i128.pow(crate::money::NATIVE_SCALE);
    if v.abs() > limit {
        return None;
    }
    i64::try_from(v).ok()
}

fn minor_to_native(minor: Decimal, digits: u32) -> Option<i64> {
    scaled_native(minor, 1, digits, 1, 1)
}

/// `(num, den)` with monthly = per-period x num / den (issue #2's normalisation).
pub(crate) fn month_factor(interval: Interval, count: u32) -> (i128, i128) {
    let c = i128::from(count.max(1));
    match interval {
        Interval::Day => (365, 12 * c),
        Interval::Week => (52, 12 * c),
        Interval::Month => (1, c),
        Interval::Year => (1, 12 * c),
    }
}

fn add_interval(t: DateTime<Utc>, interval: Interval, count: u32) -> Option<DateTime<Utc>> {
    match interval {
        Interval::Day => t.checked_add_signed(TimeDelta::try_days(i64::from(count))?),
        Interval::Week => t.checked_add_signed(TimeDelta::try_weeks(i64::from(count))?),
        Interval::Month => t.checked_add_months(Months::new(count)),
        Interval::Year => t.checked_add_months(Months::new(count.checked_mul(12)?)),
    }
}

impl<'a> Builder<'a> {
    /// ISO minor digits, cached (the ISO table lookup is a linear scan).
    fn digits(&mut self, c: Currency) -> Option<u32> {
        if let Some((_, d)) = self.digits_cache.iter().find(|(k, _)| *k == c) {
            return *d;
        }
        let d = c.minor_digits();
        self.digits_cache.push((c, d));
        d
    }

    fn currency(&mut self, c: Currency) -> u16 {
        if let Some(i) = self.currencies.iter().position(|x| *x == c) {
            return i as u16;
        }
        self.currencies.push(c);
        self.magnitude.push(0.0);
        (self.currencies.len() - 1) as u16
    }

    fn price(&mut self, id: &'a str) -> u32 {
        let next = self.prices.len() as u32;
        *self.price_index.entry(id).or_insert_with(|| {
            self.prices.push(id);
            next
        })
    }

    /// The per-period amount of `price` at `quantity`, in minor units; `None` with an anomaly
    /// pushed when the price is unusable.
    fn period_amount(&mut self, price: &Price, quantity: u64) -> Option<PeriodAmount> {
        let q = Decimal::from(quantity);
        match &price.scheme {
            BillingScheme::PerUnit => {
                if price.unit_amount < Decimal::ZERO {
                    self.anomalies.push(Anomaly::NegativeAmount {
                        object: price.id.clone(),
                    });
                    return None;
                }
                Some(PeriodAmount::PerUnit(price.unit_amount))
            }
            BillingScheme::Tiered { mode, tiers } => {
                let sorted = tiers.windows(2).all(|w| {
                    matches!((w[0].up_to, w[1].up_to), (Some(a), Some(b)) if a < b)
                        || matches!((w[0].up_to, w[1].up_to), (Some(_), None))
                });
                let closed = tiers.last().is_some_and(|t| t.up_to.is_none());
                if !sorted || !closed {
                    self.anomalies.push(Anomaly::InvalidTiers {
                        price: price.id.clone(),
                    });
                    return None;
                }
                if tiers
                    .iter()
                    .any(|t| t.unit_amount < Decimal::ZERO || t.flat_amount < Decimal::ZERO)
                {
                    self.anomalies.push(Anomaly::NegativeAmount {
                        object: price.id.clone(),
                    });
                    return None;
                }
                if quantity == 0 {
                    return Some(PeriodAmount::Total(Decimal::ZERO));
                }
                let total = match mode {
                    TiersMode::Volume => {
                        let tier = tiers
                            .iter()
                            .find(|t| t.up_to.is_none_or(|u| quantity <= u))?;
                        tier.unit_amount
                            .checked_mul(q)?
                            .checked_add(tier.flat_amount)
                    }
                    TiersMode::Graduated => (|| {
                        let mut total = Decimal::ZERO;
                        let mut lower = 0u64;
                        for tier in tiers {
                            if quantity <= lower {
                                break;
                            }
                            let upper = tier.up_to.unwrap_or(u64::MAX).min(quantity);
                            let units = Decimal::from(upper - lower);
                            total = total
                                .checked_add(tier.unit_amount.checked_mul(units)?)?
                                .checked_add(tier.flat_amount)?;
                            lower = upper;
                        }
                        Some(total)
                    })(),
                };
                total.map(PeriodAmount::Total)
            }
        }
    }

    fn compile_sub(&mut self, customer: u32, s: &'a Subscription) -> CSub<'a> {
        let currency = self.currency(s.currency);
        let digits = self.digits(s.currency).unwrap_or(2);
        let items_start = self.items.len() as u32;
        let mut magnitude = 0.0f64;
        for item in &s.items {
            let from = secs(&item.from);
            let to = item.to.as_ref().map_or(NEVER, secs);
            if to < from {
                self.anomalies.push(Anomaly::InvertedPeriod {
                    subscription: s.id.clone(),
                });
                continue;
            }
            let p = &item.price;
            let Some(interval) = p.interval else {
                continue; // One-off prices never count in MRR.
            };
            if p.usage_type == UsageType::Metered {
                continue; // Metered items are excluded from MRR by definition.
            }
            if p.interval_count == 0 {
                self.anomalies.push(Anomaly::InvalidIntervalCount {
                    price: p.id.clone(),
                });
                continue;
            }
            if p.currency.is_some_and(|c| c != s.currency) {
                self.anomalies.push(Anomaly::CurrencyMismatch {
                    subscription: s.id.clone(),
                    object: p.id.clone(),
                });
                continue;
            }
            let Some(per_period) = self.period_amount(p, item.quantity) else {
                continue;
            };
            let (num, den) = month_factor(interval, p.interval_count);
            let monthly = match per_period {
                PeriodAmount::PerUnit(unit) => scaled_native(unit, item.quantity, digits, num, den),
                PeriodAmount::Total(total) => scaled_native(total, 1, digits, num, den),
            };
            let Some(monthly) = monthly else {
                self.anomalies.push(Anomaly::AmountOutOfRange {
                    object: p.id.clone(),
                });
                continue;
            };
            let price = match self
                .price_by_ptr
                .get(&(std::sync::Arc::as_ptr(&item.price) as usize))
            {
                Some(i) => *i,
                None => {
                    let i = self.price(&p.id);
                    self.price_by_ptr
                        .insert(std::sync::Arc::as_ptr(&item.price) as usize, i);
                    i
                }
            };
            magnitude += monthly as f64 / 1e8;
            self.items.push(CItem {
                from,
                to,
                price,
                monthly,
                interval,
                count: p.interval_count,
            });
        }
        let items_end = self.items.len() as u32;
        // Overlapping periods of one price: reported, counted as given.
        if items_end - items_start > 1 {
            self.scratch.clear();
            self.scratch.extend(
                self.items[items_start as usize..]
                    .iter()
                    .map(|i| (i.price, i.from, i.to)),
            );
            self.scratch.sort_unstable();
            for k in 1..self.scratch.len() {
                let (prev, cur) = (self.scratch[k - 1], self.scratch[k]);
                if prev.0 == cur.0 && cur.1 < prev.2 {
                    self.anomalies.push(Anomaly::OverlappingItemPeriods {
                        subscription: s.id.clone(),
                        price: self.prices[cur.0 as usize].to_owned(),
                    });
                }
            }
        }

        let statuses_start = self.statuses.len() as u32;
        self.statuses
            .extend(s.statuses.iter().map(|c| (secs(&c.at), c.status)));
        // Ties (two statuses at one instant) are broken by status, not input order, so the
        // result never depends on the order the input lists them in.
        self.statuses[statuses_start as usize..].sort_unstable_by_key(|(t, st)| (*t, *st as u8));
        let statuses_end = self.statuses.len() as u32;

        let discounts_start = self.discounts.len() as u32;
        for d in &s.discounts {
            let off = match &d.off {
                DiscountOff::Percent(p) => {
                    if *p < Decimal::ZERO || *p > Decimal::ONE_HUNDRED {
                        self.anomalies.push(Anomaly::InvalidPercentOff {
                            subscription: s.id.clone(),
                            coupon: d.coupon.clone(),
                        });
                        continue;
                    }
                    let p = p.round_dp(10);
                    let den = 100 * 10i128.pow(p.scale());
                    COff::Percent {
                        num: den - p.mantissa(),
                        den,
                    }
                }
                DiscountOff::Amount { amount, currency } => {
                    if *currency != s.currency {
                        self.anomalies.push(Anomaly::CurrencyMismatch {
                            subscription: s.id.clone(),
                            object: d.coupon.clone(),
                        });
                        continue;
                    }
                    if *amount < Decimal::ZERO {
                        self.anomalies.push(Anomaly::NegativeAmount {
                            object: d.coupon.clone(),
                        });
                        continue;
                    }
                    match minor_to_native(*amount, digits) {
                        Some(v) => COff::Amount(v),
                        None => {
                            self.anomalies.push(Anomaly::AmountOutOfRange {
                                object: d.coupon.clone(),
                            });
                            continue;
                        }
                    }
                }
            };
            let start = secs(&d.start);
            let given_end = d.end.as_ref().map(secs);
            let derived_end = match d.duration {
                Duration::Forever => None,
                Duration::Once => {
                    // One billing period of the subscription's main item when the coupon starts
                    // (the largest MRR, ties by price id), else of its earliest item: never
                    // of whichever item the input happens to list first.
                    let start = secs(&d.start);
                    let items = &self.items[items_start as usize..items_end as usize];
                    let prices = &self.prices;
                    let main = items
                        .iter()
                        .filter(|i| i.from <= start && start < i.to)
                        .max_by(|a, b| {
                            a.monthly.cmp(&b.monthly).then_with(|| {
                                prices[b.price as usize].cmp(prices[a.price as usize])
                            })
                        })
                        .or_else(|| {
                            items.iter().min_by(|a, b| {
                                a.from.cmp(&b.from).then_with(|| {
                                    prices[a.price as usize].cmp(prices[b.price as usize])
                                })
                            })
                        });
                    let (interval, count) =
                        main.map_or((Interval::Month, 1), |i| (i.interval, i.count));
                    add_interval(d.start, interval, count)
                }
                Duration::Repeating { months } => d.start.checked_add_months(Months::new(months)),
            };
            let end_while_applicable = given_end
                .or(derived_end.as_ref().map(secs))
                .unwrap_or(NEVER);
            if end_while_applicable < start {
                self.anomalies.push(Anomaly::InvertedPeriod {
                    subscription: s.id.clone(),
                });
                continue;
            }
            let end_forever_only =
                matches!(d.duration, Duration::Forever).then(|| given_end.unwrap_or(NEVER));
            self.discounts.push(CDiscount {
                start,
                end_while_applicable,
                end_forever_only,
                off,
            });
        }
        let discounts_end = self.discounts.len() as u32;

        let c = s.cancellation.unwrap_or_default();
        let canceled_at = c.canceled_at.as_ref().map_or(NEVER, secs);
        let ends_at = c
            .ended_at
            .as_ref()
            .or(c.cancel_at.as_ref())
            .map(secs)
            .unwrap_or(if c.cancel_at_period_end {
                NEVER
            } else {
                canceled_at
            });
        let changes = (items_end - items_start) * 2
            + (statuses_end - statuses_start)
            + (discounts_end - discounts_start) * 2
            + 3;
        self.magnitude[currency as usize] += magnitude * f64::from(changes);
        CSub {
            src: s,
            customer,
            currency,
            items: items_start..items_end,
            statuses: statuses_start..statuses_end,
            discounts: discounts_start..discounts_end,
            trial_end: s.trial_end.as_ref().map_or(i64::MIN, secs),
            ends_at,
            canceled_at,
        }
    }
}
