//! Compiling an [`Account`] once: customers indexed, subscriptions grouped by customer, cash
//! converted, and one validation pass that reports every anomaly and bounds every amount.
//!
//! Items, statuses and discounts are *not* copied into new arrays: each walk prices a
//! subscription straight from the source into small reused buffers ([`SubScratch`]). Copying
//! them would cost more than the work itself: a million-customer account would need ~250 MB of
//! fresh pages, and first-touching fresh pages is slower here than reading the source twice.
//! Nothing here depends on the rule profile, so one compiled account serves every profile.

use std::collections::hash_map::Entry;

use chrono::{DateTime, Months, TimeDelta, Utc};
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

use crate::anomaly::Anomaly;
use crate::model::{
    Account, BillingScheme, Customer, DiscountOff, Duration, Interval, Price, Status, Subscription,
    TiersMode, UsageType,
};
use crate::money::{Currency, MAX_ITEM_MAJOR, NATIVE_SCALE};

/// Seconds since the Unix epoch.
pub(crate) type Secs = i64;
/// "Never" as an instant.
pub(crate) const NEVER: Secs = i64::MAX;

pub(crate) fn secs(t: &DateTime<Utc>) -> Secs {
    t.timestamp()
}

/// A compiled customer.
pub(crate) struct CCustomer<'a> {
    pub(crate) id: &'a str,
    /// The customer object, absent for a customer only named by a subscription.
    pub(crate) src: Option<&'a Customer>,
}

/// A compiled subscription: its source, its customer and its currency.
pub(crate) struct CSub<'a> {
    pub(crate) src: &'a Subscription,
    pub(crate) customer: u32,
    pub(crate) currency: u16,
    pub(crate) digits: u32,
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
    pub(crate) currencies: Vec<Currency>,
    pub(crate) cash: Vec<CCash>,
    pub(crate) anomalies: Vec<Anomaly>,
    /// The sum of |cash amounts| per currency, in major units: the cash part of the bound that
    /// keeps every exact sum in range (the subscription part is counted as walks load them).
    pub(crate) cash_magnitude: Vec<f64>,
    /// Every anomaly of the account, computed on first request by [`Compiled::all_anomalies`].
    all_anomalies: std::sync::OnceLock<Vec<Anomaly>>,
}

/// An item period, priced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CItem<'a> {
    pub(crate) from: Secs,
    pub(crate) to: Secs,
    /// The price id: plan segmentation groups by it, ties between items break on it.
    pub(crate) price: &'a str,
    /// Normalised monthly native amount before discounts.
    pub(crate) monthly: i64,
    pub(crate) interval: Interval,
    pub(crate) count: u32,
}

/// What a compiled discount takes off.
#[derive(Clone, Copy, Debug)]
pub(crate) enum COff {
    /// Multiply by `num / den`.
    Percent { num: i128, den: i128 },
    /// Native amount per billing period.
    Amount(i64),
}

/// A compiled discount.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CDiscount {
    pub(crate) start: Secs,
    /// End when every coupon duration counts ([`crate::rules::DiscountRule::WhileApplicable`]).
    pub(crate) end_while_applicable: Secs,
    /// End when only `forever` counts: `NEVER` or Stripe's own `end`; `None` if not forever.
    pub(crate) end_forever_only: Option<Secs>,
    pub(crate) off: COff,
}

/// Reusable buffers holding one subscription, priced.
#[derive(Default)]
pub(crate) struct SubScratch<'a> {
    pub(crate) items: Vec<CItem<'a>>,
    pub(crate) statuses: Vec<(Secs, Status)>,
    pub(crate) discounts: Vec<CDiscount>,
    pub(crate) breakpoints: Vec<Secs>,
    overlap: Vec<(&'a str, Secs, Secs)>,
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
    let shift = NATIVE_SCALE.checked_sub(digits)?;
    let numerator = amount
        .mantissa()
        .checked_mul(i128::from(qty))?
        .checked_mul(10i128.checked_pow(shift)?)?
        .checked_mul(num)?;
    let denominator = 10i128.checked_pow(amount.scale())?.checked_mul(den)?;
    let v = super::timeline::div_half_even(numerator, denominator);
    let limit = i128::from(MAX_ITEM_MAJOR) * 10i128.pow(NATIVE_SCALE);
    if v.abs() > limit {
        return None;
    }
    i64::try_from(v).ok()
}

fn minor_to_native(minor: Decimal, digits: u32) -> Option<i64> {
    scaled_native(minor, 1, digits, 1, 1)
}

/// `(num, den)` with monthly = per-period x num / den (the engine's normalisation).
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

/// Why an item or discount cannot be used.
enum Problem {
    Negative,
    InvalidTiers,
    InvalidIntervalCount,
    CurrencyMismatch,
    OutOfRange,
    InvalidPercent,
}

/// The normalised monthly amount of `quantity` of `price`, `Ok(None)` when the price never counts
/// in MRR (one-off or metered).
fn price_item(
    price: &Price,
    quantity: u64,
    digits: u32,
    currency: Currency,
) -> Result<Option<(i64, Interval, u32)>, Problem> {
    let Some(interval) = price.interval else {
        return Ok(None); // One-off prices never count in MRR.
    };
    if price.usage_type == UsageType::Metered {
        return Ok(None); // Metered items are excluded from MRR by definition.
    }
    if price.interval_count == 0 {
        return Err(Problem::InvalidIntervalCount);
    }
    if price.currency.is_some_and(|c| c != currency) {
        return Err(Problem::CurrencyMismatch);
    }
    let (num, den) = month_factor(interval, price.interval_count);
    let monthly = match &price.scheme {
        BillingScheme::PerUnit => {
            if price.unit_amount < Decimal::ZERO {
                return Err(Problem::Negative);
            }
            scaled_native(price.unit_amount, quantity, digits, num, den)
        }
        BillingScheme::Tiered { mode, tiers } => {
            let sorted = tiers.windows(2).all(|w| match (w[0].up_to, w[1].up_to) {
                (Some(a), Some(b)) => a < b,
                (Some(_), None) => true,
                (None, _) => false,
            });
            if !sorted || tiers.last().is_none_or(|t| t.up_to.is_some()) {
                return Err(Problem::InvalidTiers);
            }
            if tiers
                .iter()
                .any(|t| t.unit_amount < Decimal::ZERO || t.flat_amount < Decimal::ZERO)
            {
                return Err(Problem::Negative);
            }
            let q = Decimal::from(quantity);
            let total = if quantity == 0 {
                Some(Decimal::ZERO)
            } else {
                match mode {
                    TiersMode::Volume => tiers
                        .iter()
                        .find(|t| t.up_to.is_none_or(|u| quantity <= u))
                        .and_then(|t| t.unit_amount.checked_mul(q)?.checked_add(t.flat_amount)),
                    TiersMode::Graduated => {
                        let mut total = Some(Decimal::ZERO);
                        let mut lower = 0u64;
                        for tier in tiers {
                            if quantity <= lower {
                                break;
                            }
                            let upper = tier.up_to.unwrap_or(u64::MAX).min(quantity);
                            let units = Decimal::from(upper - lower);
                            total = total.and_then(|t| {
                                t.checked_add(tier.unit_amount.checked_mul(units)?)?
                                    .checked_add(tier.flat_amount)
                            });
                            lower = upper;
                        }
                        total
                    }
                }
            };
            total.and_then(|t| scaled_native(t, 1, digits, num, den))
        }
    };
    monthly
        .map(|m| Some((m, interval, price.interval_count)))
        .ok_or(Problem::OutOfRange)
}

impl<'a> CSub<'a> {
    /// End of the trial: nothing counts before it.
    pub(crate) fn trial_end(&self) -> Secs {
        self.src.trial_end.as_ref().map_or(i64::MIN, secs)
    }

    /// End of service: `ended_at`, else the scheduled `cancel_at`, else an immediate cancellation.
    pub(crate) fn ends_at(&self) -> Secs {
        let c = self.src.cancellation.unwrap_or_default();
        c.ended_at
            .as_ref()
            .or(c.cancel_at.as_ref())
            .map(secs)
            .unwrap_or(if c.cancel_at_period_end {
                NEVER
            } else {
                self.canceled_at()
            })
    }

    /// When the cancellation was requested, if it was.
    pub(crate) fn canceled_at(&self) -> Secs {
        self.src
            .cancellation
            .and_then(|c| c.canceled_at)
            .as_ref()
            .map_or(NEVER, secs)
    }

    /// Fills `scratch` with this subscription's statuses (sorted), priced items and discounts.
    /// Unusable items and discounts are left out; with `anomalies`, each is reported there.
    ///
    /// Returns a bound, in major units, of every amount this subscription can add to a sum:
    /// the sum of |item MRR| times (1 + its number of breakpoints).
    pub(crate) fn load(
        &self,
        scratch: &mut SubScratch<'a>,
        mut anomalies: Option<&mut Vec<Anomaly>>,
    ) -> f64 {
        let s = self.src;
        scratch.statuses.clear();
        scratch
            .statuses
            .extend(s.statuses.iter().map(|c| (secs(&c.at), c.status)));
        if !scratch.statuses.is_sorted_by_key(|(t, st)| (*t, *st as u8)) {
            // Ties (two statuses at one instant) are broken by status, not input order, so the
            // result never depends on the order the input lists them in.
            scratch
                .statuses
                .sort_unstable_by_key(|(t, st)| (*t, *st as u8));
        }

        let collecting = anomalies.is_some();
        let mut report = |a: &dyn Fn() -> Anomaly| {
            if let Some(out) = anomalies.as_deref_mut() {
                out.push(a());
            }
        };
        scratch.items.clear();
        for item in &s.items {
            let from = secs(&item.from);
            let to = item.to.as_ref().map_or(NEVER, secs);
            if to < from {
                report(&|| Anomaly::InvertedPeriod {
                    subscription: s.id.clone(),
                });
                continue;
            }
            let p = &*item.price;
            match price_item(p, item.quantity, self.digits, s.currency) {
                Ok(Some((monthly, interval, count))) => scratch.items.push(CItem {
                    from,
                    to,
                    price: &p.id,
                    monthly,
                    interval,
                    count,
                }),
                Ok(None) => {}
                Err(problem) => report(&|| match problem {
                    Problem::Negative => Anomaly::NegativeAmount {
                        object: p.id.clone(),
                    },
                    Problem::InvalidTiers => Anomaly::InvalidTiers {
                        price: p.id.clone(),
                    },
                    Problem::InvalidIntervalCount => Anomaly::InvalidIntervalCount {
                        price: p.id.clone(),
                    },
                    Problem::CurrencyMismatch => Anomaly::CurrencyMismatch {
                        subscription: s.id.clone(),
                        object: p.id.clone(),
                    },
                    _ => Anomaly::AmountOutOfRange {
                        object: p.id.clone(),
                    },
                }),
            }
        }

        scratch.discounts.clear();
        for d in &s.discounts {
            let off = match &d.off {
                DiscountOff::Percent(p) if *p < Decimal::ZERO || *p > Decimal::ONE_HUNDRED => {
                    Err(Problem::InvalidPercent)
                }
                DiscountOff::Percent(p) => {
                    let p = p.round_dp(10);
                    let den = 100 * 10i128.pow(p.scale());
                    Ok(COff::Percent {
                        num: den - p.mantissa(),
                        den,
                    })
                }
                DiscountOff::Amount { currency, .. } if *currency != s.currency => {
                    Err(Problem::CurrencyMismatch)
                }
                DiscountOff::Amount { amount, .. } if *amount < Decimal::ZERO => {
                    Err(Problem::Negative)
                }
                DiscountOff::Amount { amount, .. } => minor_to_native(*amount, self.digits)
                    .map(COff::Amount)
                    .ok_or(Problem::OutOfRange),
            };
            let off = match off {
                Ok(off) => off,
                Err(problem) => {
                    report(&|| match problem {
                        Problem::InvalidPercent => Anomaly::InvalidPercentOff {
                            subscription: s.id.clone(),
                            coupon: d.coupon.clone(),
                        },
                        Problem::CurrencyMismatch => Anomaly::CurrencyMismatch {
                            subscription: s.id.clone(),
                            object: d.coupon.clone(),
                        },
                        Problem::Negative => Anomaly::NegativeAmount {
                            object: d.coupon.clone(),
                        },
                        _ => Anomaly::AmountOutOfRange {
                            object: d.coupon.clone(),
                        },
                    });
                    continue;
                }
            };
            let start = secs(&d.start);
            let given_end = d.end.as_ref().map(secs);
            let derived_end = match d.duration {
                Duration::Forever => None,
                Duration::Once => {
                    // One billing period of the subscription's main item when the coupon starts
                    // (the largest MRR, ties by price id), else of its earliest item: never of
                    // whichever item the input happens to list first.
                    let items = &scratch.items;
                    let main = items
                        .iter()
                        .filter(|i| i.from <= start && start < i.to)
                        .max_by(|a, b| a.monthly.cmp(&b.monthly).then_with(|| b.price.cmp(a.price)))
                        .or_else(|| {
                            items.iter().min_by(|a, b| {
                                a.from.cmp(&b.from).then_with(|| a.price.cmp(b.price))
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
                report(&|| Anomaly::InvertedPeriod {
                    subscription: s.id.clone(),
                });
                continue;
            }
            scratch.discounts.push(CDiscount {
                start,
                end_while_applicable,
                end_forever_only: matches!(d.duration, Duration::Forever)
                    .then(|| given_end.unwrap_or(NEVER)),
                off,
            });
        }

        if collecting && scratch.items.len() > 1 {
            // Overlapping periods of one price: reported, counted as given.
            scratch.overlap.clear();
            scratch
                .overlap
                .extend(scratch.items.iter().map(|i| (i.price, i.from, i.to)));
            scratch.overlap.sort_unstable();
            for k in 1..scratch.overlap.len() {
                let (prev, cur) = (scratch.overlap[k - 1], scratch.overlap[k]);
                if prev.0 == cur.0 && cur.1 < prev.2 {
                    report(&|| Anomaly::OverlappingItemPeriods {
                        subscription: s.id.clone(),
                        price: cur.0.to_owned(),
                    });
                }
            }
        }
        let size: f64 = scratch
            .items
            .iter()
            .map(|it| (it.monthly as f64).abs() / 1e8)
            .sum();
        let changes =
            scratch.items.len() * 2 + scratch.statuses.len() + scratch.discounts.len() * 2 + 3;
        size * changes as f64
    }
}

impl<'a> Compiled<'a> {
    /// The bytes its vectors hold (capacities; anomalies at their inline size): what a cache that
    /// keeps a compiled account counts beside the account.
    pub(crate) fn heap_bytes(&self) -> usize {
        fn held<T>(v: &Vec<T>) -> usize {
            v.capacity() * std::mem::size_of::<T>()
        }
        held(&self.customers)
            + held(&self.cust_offsets)
            + held(&self.subs)
            + held(&self.currencies)
            + held(&self.cash)
            + held(&self.anomalies)
            + held(&self.cash_magnitude)
    }

    /// Every anomaly: those found while compiling and those of every subscription's items and
    /// discounts (one validation pass, run once and kept).
    pub(crate) fn all_anomalies(&self) -> &[Anomaly] {
        self.all_anomalies.get_or_init(|| {
            let mut out = self.anomalies.clone();
            let mut scratch = SubScratch::default();
            for sub in &self.subs {
                sub.load(&mut scratch, Some(&mut out));
            }
            out.sort();
            out.dedup();
            out
        })
    }

    pub(crate) fn subs_of(&self, customer: u32) -> std::ops::Range<usize> {
        let c = customer as usize;
        self.cust_offsets[c] as usize..self.cust_offsets[c + 1] as usize
    }

    fn currency(&mut self, c: Currency) -> u16 {
        if let Some(i) = self.currencies.iter().position(|x| *x == c) {
            return i as u16;
        }
        self.currencies.push(c);
        self.cash_magnitude.push(0.0);
        (self.currencies.len() - 1) as u16
    }

    pub(crate) fn new(account: &'a Account) -> Self {
        let mut c = Compiled {
            customers: Vec::with_capacity(account.customers.len()),
            cust_offsets: Vec::new(),
            subs: Vec::new(),
            currencies: Vec::new(),
            cash: Vec::with_capacity(account.payments.len()),
            anomalies: Vec::new(),
            cash_magnitude: Vec::new(),
            all_anomalies: std::sync::OnceLock::new(),
        };
        // ISO minor digits, cached: the ISO table lookup is a linear scan.
        let mut digits_cache: Vec<(Currency, Option<u32>)> = Vec::new();
        let mut digits = |cur: Currency| -> Option<u32> {
            if let Some((_, d)) = digits_cache.iter().find(|(k, _)| *k == cur) {
                return *d;
            }
            let d = cur.minor_digits();
            digits_cache.push((cur, d));
            d
        };

        let mut cust_index: FxHashMap<&'a str, u32> = FxHashMap::default();
        cust_index.reserve(account.customers.len());
        for cu in &account.customers {
            match cust_index.entry(cu.id.as_str()) {
                Entry::Occupied(_) => c.anomalies.push(Anomaly::DuplicateId { id: cu.id.clone() }),
                Entry::Vacant(v) => {
                    v.insert(c.customers.len() as u32);
                    c.customers.push(CCustomer {
                        id: &cu.id,
                        src: Some(cu),
                    });
                }
            }
        }

        // Each subscription's customer, in input order.
        let mut placed: Vec<(u32, u32)> = Vec::with_capacity(account.subscriptions.len());
        for (i, s) in account.subscriptions.iter().enumerate() {
            if digits(s.currency).is_none() {
                c.anomalies.push(Anomaly::UnknownCurrency {
                    object: s.id.clone(),
                    currency: s.currency,
                });
                continue;
            }
            let cust = match cust_index.get(s.customer.as_str()) {
                Some(x) => *x,
                None => {
                    c.anomalies.push(Anomaly::UnknownCustomer {
                        object: s.id.clone(),
                        customer: s.customer.clone(),
                    });
                    let idx = c.customers.len() as u32;
                    cust_index.insert(&s.customer, idx);
                    c.customers.push(CCustomer {
                        id: &s.customer,
                        src: None,
                    });
                    idx
                }
            };
            placed.push((cust, i as u32));
        }
        // Counting sort by customer keeps each customer's subscriptions in input order.
        let n = c.customers.len();
        let mut offsets = vec![0u32; n + 1];
        for (cust, _) in &placed {
            offsets[*cust as usize + 1] += 1;
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let mut next = offsets.clone();
        let mut order = vec![0u32; placed.len()];
        for (cust, i) in &placed {
            let slot = &mut next[*cust as usize];
            order[*slot as usize] = *i;
            *slot += 1;
        }
        drop(placed);
        drop(next);

        // A subscription listed twice (say, by overlapping export pages) is the same object under
        // the same customer, so duplicates are looked for within each customer's group. Items are
        // not read here: walks price and validate them as they load each subscription.
        c.subs.reserve(order.len());
        let mut anomalies = std::mem::take(&mut c.anomalies);
        for cust in 0..n {
            let first = c.subs.len();
            for &i in &order[offsets[cust] as usize..offsets[cust + 1] as usize] {
                let s = &account.subscriptions[i as usize];
                if c.subs[first..].iter().any(|x| x.src.id == s.id) {
                    anomalies.push(Anomaly::DuplicateId { id: s.id.clone() });
                    continue;
                }
                let currency = c.currency(s.currency);
                c.subs.push(CSub {
                    src: s,
                    customer: cust as u32,
                    currency,
                    digits: digits(s.currency).unwrap_or(2),
                });
            }
            offsets[cust] = first as u32;
        }
        offsets[n] = c.subs.len() as u32;
        c.cust_offsets = offsets;

        let mut payment_ids: FxHashMap<&'a str, ()> = FxHashMap::default();
        for p in &account.payments {
            if payment_ids.insert(p.id.as_str(), ()).is_some() {
                anomalies.push(Anomaly::DuplicateId { id: p.id.clone() });
                continue;
            }
            let Some(d) = digits(p.currency) else {
                anomalies.push(Anomaly::UnknownCurrency {
                    object: p.id.clone(),
                    currency: p.currency,
                });
                continue;
            };
            if let Some(cu) = &p.customer
                && !cust_index.contains_key(cu.as_str())
            {
                anomalies.push(Anomaly::UnknownCustomer {
                    object: p.id.clone(),
                    customer: cu.clone(),
                });
            }
            if p.amount < Decimal::ZERO || p.refunds.iter().any(|r| r.amount < Decimal::ZERO) {
                anomalies.push(Anomaly::NegativeAmount {
                    object: p.id.clone(),
                });
                continue;
            }
            if p.refunds.iter().map(|r| r.amount).sum::<Decimal>() > p.amount {
                anomalies.push(Anomaly::OverRefunded {
                    payment: p.id.clone(),
                });
            }
            let currency = c.currency(p.currency);
            let events: Option<Vec<CCash>> = std::iter::once((secs(&p.at), p.amount))
                .chain(p.refunds.iter().map(|r| (secs(&r.at), -r.amount)))
                .chain(p.disputes.iter().map(|d| (secs(&d.at), d.amount)))
                .map(|(at, minor)| {
                    minor_to_native(minor, d).map(|amount| CCash {
                        at,
                        currency,
                        amount,
                    })
                })
                .collect();
            match events {
                Some(events) => {
                    for e in &events {
                        c.cash_magnitude[currency as usize] += (e.amount as f64).abs() / 1e8;
                    }
                    c.cash.extend(events);
                }
                None => anomalies.push(Anomaly::AmountOutOfRange {
                    object: p.id.clone(),
                }),
            }
        }

        anomalies.sort();
        anomalies.dedup();
        c.anomalies = anomalies;
        c
    }
}
