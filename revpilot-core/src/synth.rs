//! A deterministic synthetic-account generator: a realistic SaaS with trials, coupons, upgrades,
//! downgrades, seat changes, failed payments, pauses, churn, reactivation and two currencies.
//!
//! The same [`SynthConfig`] always yields the same [`Account`] (each customer draws from its own
//! seeded generator), so benchmarks, tests and the demo share accounts without storing them.

use std::sync::Arc;

use chrono::{DateTime, Months, NaiveDate, TimeDelta, Utc};
use rust_decimal::Decimal;

use crate::fx::FxTable;
use crate::model::{
    Account, BillingScheme, Cancellation, Customer, Discount, DiscountOff, Duration, Interval,
    ItemPeriod, Metadata, Payment, Price, Refund, Status, StatusChange, Subscription, Tier,
    TiersMode, UsageType,
};
use crate::money::Currency;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of customers.
    pub customers: usize,
    /// Seed; the same seed gives the same account.
    pub seed: u64,
    /// First day customers can sign up.
    pub start: NaiveDate,
    /// Months of history.
    pub months: u32,
    /// Share of customers billed in EUR, in percent.
    pub eur_percent: u32,
    /// Generate succeeded charges (one per paid period) and some refunds.
    pub payments: bool,
}

impl SynthConfig {
    /// `customers` customers over two years from 2023-01-01, 20 % in EUR, with payments.
    pub fn new(customers: usize, seed: u64) -> Self {
        SynthConfig {
            customers,
            seed,
            start: NaiveDate::from_ymd_opt(2023, 1, 1).unwrap_or_default(),
            months: 24,
            eur_percent: 20,
            payments: true,
        }
    }

    /// The last day of the generated history.
    pub fn end(&self) -> NaiveDate {
        self.start
            .checked_add_months(Months::new(self.months))
            .and_then(|d| d.pred_opt())
            .unwrap_or(self.start)
    }
}

struct Plan {
    id: &'static str,
    amount: i64,
    interval: Interval,
    seats: bool,
    tiered: bool,
}

/// The catalog, cheapest first (upgrades move right, downgrades left).
const PLANS: [Plan; 6] = [
    Plan {
        id: "starter",
        amount: 2900,
        interval: Interval::Month,
        seats: false,
        tiered: false,
    },
    Plan {
        id: "team",
        amount: 1500,
        interval: Interval::Month,
        seats: true,
        tiered: false,
    },
    Plan {
        id: "pro",
        amount: 3900,
        interval: Interval::Month,
        seats: true,
        tiered: false,
    },
    Plan {
        id: "pro_annual",
        amount: 79000,
        interval: Interval::Year,
        seats: false,
        tiered: false,
    },
    Plan {
        id: "usage_volume",
        amount: 0,
        interval: Interval::Month,
        seats: true,
        tiered: true,
    },
    Plan {
        id: "business",
        amount: 6900,
        interval: Interval::Month,
        seats: true,
        tiered: false,
    },
];

/// Where an upgrade or a downgrade of each plan goes (the same index: none).
const UPGRADE: [usize; 6] = [2, 2, 5, 5, 5, 5];
const DOWNGRADE: [usize; 6] = [0, 1, 1, 2, 1, 2];

fn make_price(plan: &Plan, currency: Currency) -> Price {
    let scheme = if plan.tiered {
        BillingScheme::Tiered {
            mode: TiersMode::Volume,
            tiers: vec![
                Tier {
                    up_to: Some(10),
                    unit_amount: Decimal::from(1200),
                    flat_amount: Decimal::ZERO,
                },
                Tier {
                    up_to: Some(50),
                    unit_amount: Decimal::from(900),
                    flat_amount: Decimal::ZERO,
                },
                Tier {
                    up_to: None,
                    unit_amount: Decimal::from(700),
                    flat_amount: Decimal::from(5000),
                },
            ],
        }
    } else {
        BillingScheme::PerUnit
    };
    Price {
        id: format!("price_{}_{}", plan.id, currency),
        product: Some(format!("prod_{}", plan.id)),
        currency: Some(currency),
        unit_amount: Decimal::from(plan.amount),
        interval: Some(plan.interval),
        interval_count: 1,
        scheme,
        usage_type: UsageType::Licensed,
    }
}

/// Daily EUR->USD rates covering the config's history (and a year before it), moving smoothly
/// between about 1.05 and 1.15 with four decimals.
pub fn fx_table(config: &SynthConfig) -> FxTable {
    let mut table = FxTable::new();
    let first = config
        .start
        .checked_sub_months(Months::new(14))
        .unwrap_or(config.start);
    let last = config.end();
    for (i, day) in first.iter_days().take_while(|d| *d <= last).enumerate() {
        // A triangle wave with a 200-day period: deterministic, exact in four decimals.
        let phase = (i % 200) as i64;
        let tri = if phase < 100 { phase } else { 200 - phase };
        let rate = Decimal::new(10_500 + tri * 10, 4);
        table.insert(day, Currency::EUR, Currency::USD, rate);
    }
    table
}

/// Counts timeline entries: status changes, item periods, discounts, trial ends and cancellations.
pub fn timeline_entries(account: &Account) -> usize {
    account
        .subscriptions
        .iter()
        .map(|s| {
            s.statuses.len()
                + s.items.len()
                + s.discounts.len()
                + usize::from(s.cancellation.is_some())
        })
        .sum()
}

struct Gen<'p> {
    prices: &'p Prices,
    rng: fastrand::Rng,
    end: DateTime<Utc>,
    currency: Currency,
    payments: bool,
}

impl Gen<'_> {
    fn price(&self, plan: usize) -> Arc<Price> {
        let table = if self.currency == Currency::EUR {
            &self.prices.eur
        } else {
            &self.prices.usd
        };
        Arc::clone(&table[plan])
    }

    fn chance(&mut self, percent: f64) -> bool {
        self.rng.f64() * 100.0 < percent
    }

    /// A random instant within `days` days after `t` (any second of the day).
    fn within(&mut self, t: DateTime<Utc>, days: u32) -> DateTime<Utc> {
        let secs = self.rng.i64(0..i64::from(days.max(1)) * 86_400);
        t + TimeDelta::seconds(secs)
    }

    fn plan_index(&mut self) -> usize {
        match self.rng.u32(0..100) {
            0..=34 => 0,
            35..=49 => 1,
            50..=74 => 2,
            75..=82 => 3,
            83..=89 => 4,
            _ => 5,
        }
    }

    /// The plan and quantity an upgrade, a downgrade or a seat change leads to, if `roll` draws
    /// one that the plan allows.
    fn plan_change(&mut self, roll: f64, plan: usize, qty: u64) -> Option<(usize, u64)> {
        if roll < 5.0 && UPGRADE[plan] != plan {
            Some((UPGRADE[plan], self.carry_quantity(plan, UPGRADE[plan], qty)))
        } else if roll < 6.0 && DOWNGRADE[plan] != plan {
            Some((
                DOWNGRADE[plan],
                self.carry_quantity(plan, DOWNGRADE[plan], qty),
            ))
        } else if roll < 30.0 && PLANS[plan].seats {
            let seats = if self.chance(65.0) {
                qty + self.rng.u64(1..5)
            } else {
                qty.saturating_sub(self.rng.u64(1..3)).max(1)
            };
            Some((plan, seats))
        } else {
            None
        }
    }

    /// Seats carry over between seat-based plans; otherwise the new plan's own quantity.
    fn carry_quantity(&mut self, from: usize, to: usize, qty: u64) -> u64 {
        if PLANS[from].seats && PLANS[to].seats {
            qty
        } else {
            self.quantity(&PLANS[to])
        }
    }

    fn quantity(&mut self, plan: &Plan) -> u64 {
        if plan.seats { self.rng.u64(1..25) } else { 1 }
    }

    /// One subscription life from `start`; returns the instant it ended, if it did.
    fn life(
        &mut self,
        customer: &str,
        sub_id: String,
        start: DateTime<Utc>,
        account: &mut Account,
    ) -> Option<DateTime<Utc>> {
        let mut plan_idx = self.plan_index();
        let mut qty = self.quantity(&PLANS[plan_idx]);
        let mut statuses = Vec::new();
        let mut discounts = Vec::new();
        let mut trial_end = None;
        let mut paid_from = start;
        if self.chance(30.0) {
            statuses.push(StatusChange {
                at: start,
                status: Status::Trialing,
            });
            let end = start + TimeDelta::days(14);
            trial_end = Some(end);
            if self.chance(30.0) || end >= self.end {
                // The trial never converts.
                let cancellation = Cancellation {
                    canceled_at: Some(end),
                    ended_at: Some(end),
                    ..Default::default()
                };
                statuses.push(StatusChange {
                    at: end,
                    status: Status::Canceled,
                });
                account.subscriptions.push(Subscription {
                    id: sub_id,
                    customer: customer.to_owned(),
                    currency: self.currency,
                    created: start,
                    statuses,
                    items: vec![ItemPeriod {
                        price: self.price(plan_idx),
                        quantity: qty,
                        from: start,
                        to: None,
                    }],
                    discounts,
                    cancellation: Some(cancellation),
                    trial_end,
                });
                return Some(end);
            }
            statuses.push(StatusChange {
                at: end,
                status: Status::Active,
            });
            paid_from = end;
        } else {
            statuses.push(StatusChange {
                at: start,
                status: Status::Active,
            });
        }
        if self.chance(15.0) {
            let (off, duration) = match self.rng.u32(0..3) {
                0 => (
                    DiscountOff::Percent(Decimal::from(20)),
                    Duration::Repeating { months: 3 },
                ),
                1 => (
                    DiscountOff::Amount {
                        amount: Decimal::from(1000),
                        currency: self.currency,
                    },
                    Duration::Once,
                ),
                _ => (DiscountOff::Percent(Decimal::from(10)), Duration::Forever),
            };
            discounts.push(Discount {
                coupon: "promo".into(),
                off,
                duration,
                start: paid_from,
                end: None,
            });
        }

        let mut items: Vec<ItemPeriod> = Vec::new();
        let mut item_from = start;
        let mut cancellation = None;
        let mut ended = None;
        let mut month_start = paid_from;
        let mut month_no = 0u32;
        while let Some(next) = month_start.checked_add_months(Months::new(1)) {
            if month_start >= self.end {
                break;
            }
            if self.payments
                && (PLANS[plan_idx].interval == Interval::Month || month_no.is_multiple_of(12))
            {
                self.charge(customer, month_start, &PLANS[plan_idx], qty, account);
            }
            month_no += 1;
            if next >= self.end {
                break;
            }
            let roll = self.rng.f64() * 100.0;
            let at = self.within(month_start, 27);
            if roll < 1.5 {
                // Churn: half at period end, half immediately.
                if self.chance(50.0) {
                    cancellation = Some(Cancellation {
                        canceled_at: Some(at),
                        cancel_at_period_end: true,
                        cancel_at: Some(next),
                        ended_at: Some(next),
                    });
                    statuses.push(StatusChange {
                        at: next,
                        status: Status::Canceled,
                    });
                    ended = Some(next);
                } else {
                    cancellation = Some(Cancellation {
                        canceled_at: Some(at),
                        ended_at: Some(at),
                        ..Default::default()
                    });
                    statuses.push(StatusChange {
                        at,
                        status: Status::Canceled,
                    });
                    ended = Some(at);
                }
                break;
            } else if let Some((new_plan, new_qty)) = self.plan_change(roll, plan_idx, qty) {
                items.push(ItemPeriod {
                    price: self.price(plan_idx),
                    quantity: qty,
                    from: item_from,
                    to: Some(at),
                });
                (plan_idx, qty, item_from) = (new_plan, new_qty, at);
            } else if roll < 34.0 {
                // A failed payment: past_due, then recovered or unpaid and canceled.
                statuses.push(StatusChange {
                    at,
                    status: Status::PastDue,
                });
                if self.chance(70.0) {
                    statuses.push(StatusChange {
                        at: at + TimeDelta::days(5),
                        status: Status::Active,
                    });
                } else {
                    let unpaid = at + TimeDelta::days(15);
                    let end = at + TimeDelta::days(25);
                    statuses.push(StatusChange {
                        at: unpaid,
                        status: Status::Unpaid,
                    });
                    statuses.push(StatusChange {
                        at: end,
                        status: Status::Canceled,
                    });
                    cancellation = Some(Cancellation {
                        canceled_at: Some(end),
                        ended_at: Some(end),
                        ..Default::default()
                    });
                    ended = Some(end);
                    break;
                }
            } else if roll < 34.5 {
                statuses.push(StatusChange {
                    at,
                    status: Status::Paused,
                });
                statuses.push(StatusChange {
                    at: at + TimeDelta::days(45),
                    status: Status::Active,
                });
            }
            month_start = next;
        }
        items.push(ItemPeriod {
            price: self.price(plan_idx),
            quantity: qty,
            from: item_from,
            to: None,
        });
        account.subscriptions.push(Subscription {
            id: sub_id,
            customer: customer.to_owned(),
            currency: self.currency,
            created: start,
            statuses,
            items,
            discounts,
            cancellation,
            trial_end,
        });
        ended
    }

    fn charge(
        &mut self,
        customer: &str,
        at: DateTime<Utc>,
        plan: &Plan,
        qty: u64,
        account: &mut Account,
    ) {
        let amount = Decimal::from(plan.amount.max(900)) * Decimal::from(qty);
        let refunds = if self.chance(2.0) {
            vec![Refund {
                at: at + TimeDelta::days(3),
                amount: amount / Decimal::from(2),
            }]
        } else {
            Vec::new()
        };
        account.payments.push(Payment {
            id: format!("ch_{}_{}", customer, account.payments.len()),
            customer: Some(customer.to_owned()),
            at: at + TimeDelta::minutes(5),
            amount,
            currency: self.currency,
            refunds,
            disputes: Vec::new(),
        });
    }
}

/// Every plan's price in each currency, shared by the items that bill it.
struct Prices {
    usd: Vec<Arc<Price>>,
    eur: Vec<Arc<Price>>,
    addon_usd: Arc<Price>,
    addon_eur: Arc<Price>,
}

fn addon_price(currency: Currency) -> Arc<Price> {
    Arc::new(Price {
        id: format!("price_addon_{currency}"),
        product: Some("prod_addon".into()),
        currency: Some(currency),
        unit_amount: Decimal::from(900),
        interval: Some(Interval::Month),
        interval_count: 1,
        scheme: BillingScheme::PerUnit,
        usage_type: UsageType::Licensed,
    })
}

/// Generates the account `config` describes.
pub fn generate(config: &SynthConfig) -> Account {
    let prices = Prices {
        usd: PLANS
            .iter()
            .map(|p| Arc::new(make_price(p, Currency::USD)))
            .collect(),
        eur: PLANS
            .iter()
            .map(|p| Arc::new(make_price(p, Currency::EUR)))
            .collect(),
        addon_usd: addon_price(Currency::USD),
        addon_eur: addon_price(Currency::EUR),
    };
    let start = config
        .start
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    let end = config
        .end()
        .and_hms_opt(23, 59, 59)
        .unwrap_or_default()
        .and_utc();
    let span_days = (end - start).num_days().max(1) as u32;
    let mut account = Account::default();
    account.customers.reserve(config.customers);
    account.subscriptions.reserve(config.customers * 13 / 10);
    for i in 0..config.customers {
        // One generator per customer: customer i is the same whatever the account's size.
        let mut rng =
            fastrand::Rng::with_seed(config.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let currency = if rng.u32(0..100) < config.eur_percent {
            Currency::EUR
        } else {
            Currency::USD
        };
        let mut g = Gen {
            prices: &prices,
            rng,
            end,
            currency,
            payments: config.payments,
        };
        let id = format!("cus_{i:07}");
        let created = g.within(start, span_days);
        let mut metadata = Metadata::new();
        metadata.insert("channel", ["ads", "organic", "partner"][g.rng.usize(0..3)]);
        account.customers.push(Customer {
            id: id.clone(),
            created,
            country: Some(["US", "GB", "DE", "FR", "CA"][g.rng.usize(0..5)].to_owned()),
            metadata,
        });
        let mut life_start = created;
        let mut n = 0;
        while let Some(ended) = g.life(&id, format!("sub_{i:07}_{n}"), life_start, &mut account) {
            n += 1;
            // Some churned customers come back a few months later.
            if !g.chance(15.0) || n > 3 {
                break;
            }
            let back = g.within(ended + TimeDelta::days(30), 150);
            if back >= end {
                break;
            }
            life_start = back;
        }
        if g.chance(30.0) {
            // An add-on subscription beside the main one.
            let at = g.within(created, 60);
            if at < end {
                let addon = Subscription {
                    id: format!("sub_{i:07}_addon"),
                    customer: id.clone(),
                    currency,
                    created: at,
                    statuses: vec![StatusChange {
                        at,
                        status: Status::Active,
                    }],
                    items: vec![ItemPeriod {
                        price: if currency == Currency::EUR {
                            Arc::clone(&prices.addon_eur)
                        } else {
                            Arc::clone(&prices.addon_usd)
                        },
                        quantity: 1,
                        from: at,
                        to: None,
                    }],
                    discounts: Vec::new(),
                    cancellation: None,
                    trial_end: None,
                };
                account.subscriptions.push(addon);
            }
        }
    }
    account
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_realistic() {
        let config = SynthConfig::new(2_000, 7);
        let a = generate(&config);
        assert_eq!(a, generate(&config));
        assert_eq!(a.customers.len(), 2_000);
        let entries = timeline_entries(&a);
        assert!(
            (12_000..=20_000).contains(&entries),
            "entries per customer off: {entries}"
        );
        let eur = a
            .subscriptions
            .iter()
            .filter(|s| s.currency == Currency::EUR)
            .count();
        assert!(eur * 100 / a.subscriptions.len() > 10);
        for status in [
            Status::Trialing,
            Status::PastDue,
            Status::Unpaid,
            Status::Paused,
            Status::Canceled,
        ] {
            assert!(
                a.subscriptions
                    .iter()
                    .any(|s| s.statuses.iter().any(|c| c.status == status)),
                "no {status:?} in the synthetic account"
            );
        }
        assert!(a.subscriptions.iter().any(|s| !s.discounts.is_empty()));
        assert!(a.payments.iter().any(|p| !p.refunds.is_empty()));
        // Customer i does not depend on the account's size.
        let small = generate(&SynthConfig::new(10, 7));
        assert_eq!(small.customers[..], a.customers[..10]);
    }
}
