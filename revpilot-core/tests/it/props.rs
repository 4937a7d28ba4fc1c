//! Property tests: the engine's series agree with independent computations (snapshots, the ledger
//! and a per-day revaluation) on arbitrary histories whose changes cluster around midnight UTC.

use std::sync::Arc;

use chrono::{DateTime, Duration as TimeDelta, NaiveDate, Utc};
use proptest::prelude::*;
use revpilot_core::fx::{FxRates, FxTable};
use revpilot_core::metrics::{Engine, Granularity, MovementKind, SeriesRequest};
use revpilot_core::model::{
    Account, BillingScheme, Cancellation, Customer, Discount, DiscountOff, Duration, Interval,
    ItemPeriod, Metadata, Price, Status, StatusChange, Subscription, UsageType,
};
use revpilot_core::{Currency, Profile, Rules};
use rust_decimal::Decimal;

const DAYS: i64 = 150;

#[derive(Debug, Clone)]
struct Ev {
    day: i64,
    /// Minutes from the day's midnight, within 90 minutes either side: changes cluster there.
    minute: i64,
    kind: u8,
    amount: usize,
    qty: u64,
}

#[derive(Debug, Clone)]
struct SubSpec {
    customer: u8,
    eur: bool,
    start_day: i64,
    start_minute: i64,
    events: Vec<Ev>,
}

fn ev() -> impl Strategy<Value = Ev> {
    (0..DAYS, -90i64..90, 0u8..10, 0usize..5, 1u64..5).prop_map(
        |(day, minute, kind, amount, qty)| Ev {
            day,
            minute,
            kind,
            amount,
            qty,
        },
    )
}

fn sub_spec() -> impl Strategy<Value = SubSpec> {
    (
        0u8..5,
        any::<bool>(),
        0..DAYS,
        -90i64..90,
        prop::collection::vec(ev(), 0..8),
    )
        .prop_map(|(customer, eur, start_day, start_minute, events)| SubSpec {
            customer,
            eur,
            start_day,
            start_minute,
            events,
        })
}

fn base() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(2024, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("valid date")
        .and_utc()
}

const PRICES: [(i64, Interval); 5] = [
    (900, Interval::Month),
    (29_000, Interval::Year),
    (1_200, Interval::Week),
    (4_900, Interval::Month),
    (150, Interval::Day),
];

fn price(idx: usize, currency: Currency) -> Arc<Price> {
    let (amount, interval) = PRICES[idx];
    Arc::new(Price {
        id: format!("p{idx}_{currency}"),
        product: None,
        currency: Some(currency),
        unit_amount: Decimal::from(amount),
        interval: Some(interval),
        interval_count: 1,
        scheme: BillingScheme::PerUnit,
        usage_type: UsageType::Licensed,
    })
}

fn build(specs: &[SubSpec]) -> Account {
    let mut account = Account::default();
    for c in 0..5u8 {
        account.customers.push(Customer {
            id: format!("c{c}"),
            created: base(),
            country: Some(["US", "FR"][usize::from(c % 2)].into()),
            metadata: Metadata::new(),
        });
    }
    for (i, spec) in specs.iter().enumerate() {
        let currency = if spec.eur {
            Currency::EUR
        } else {
            Currency::USD
        };
        let at = |day: i64, minute: i64| base() + TimeDelta::days(day) + TimeDelta::minutes(minute);
        let start = at(spec.start_day, spec.start_minute);
        let mut events = spec.events.clone();
        events.sort_by_key(|e| (e.day, e.minute));
        let mut statuses = vec![StatusChange {
            at: start,
            status: Status::Active,
        }];
        let mut items = Vec::new();
        let mut discounts = Vec::new();
        let mut cancellation = None;
        let (mut cur_price, mut cur_qty, mut item_from) = (0usize, 1u64, start);
        for e in events.iter().filter(|e| at(e.day, e.minute) > start) {
            let t = at(e.day, e.minute);
            let status = match e.kind {
                0 | 1 => Some(Status::Active),
                2 => Some(Status::PastDue),
                3 => Some(Status::Unpaid),
                4 => Some(Status::Paused),
                5 => Some(Status::Trialing),
                _ => None,
            };
            if let Some(status) = status {
                statuses.push(StatusChange { at: t, status });
            } else if e.kind <= 7 {
                items.push(ItemPeriod {
                    price: price(cur_price, currency),
                    quantity: cur_qty,
                    from: item_from,
                    to: Some(t),
                });
                (cur_price, cur_qty, item_from) = (e.amount, e.qty, t);
            } else if e.kind == 8 {
                let (off, duration) = match e.amount {
                    0 => (DiscountOff::Percent(Decimal::from(100)), Duration::Forever),
                    1 => (
                        DiscountOff::Percent(Decimal::new(125, 1)),
                        Duration::Repeating { months: 1 },
                    ),
                    2 => (
                        DiscountOff::Amount {
                            amount: Decimal::from(500),
                            currency,
                        },
                        Duration::Once,
                    ),
                    3 => (DiscountOff::Percent(Decimal::from(50)), Duration::Once),
                    _ => (
                        DiscountOff::Amount {
                            amount: Decimal::from(300),
                            currency,
                        },
                        Duration::Forever,
                    ),
                };
                discounts.push(Discount {
                    coupon: format!("k{}", e.amount),
                    off,
                    duration,
                    start: t,
                    end: None,
                });
            } else if cancellation.is_none() {
                // Cancel: immediately, or asked now and ended some hours later.
                let ended = t + TimeDelta::minutes(i64::from(e.qty as u8) * 37 * (e.amount as i64));
                statuses.push(StatusChange {
                    at: ended,
                    status: Status::Canceled,
                });
                cancellation = Some(Cancellation {
                    canceled_at: Some(t),
                    cancel_at_period_end: ended > t,
                    cancel_at: None,
                    ended_at: Some(ended),
                });
            }
        }
        items.push(ItemPeriod {
            price: price(cur_price, currency),
            quantity: cur_qty,
            from: item_from,
            to: None,
        });
        account.subscriptions.push(Subscription {
            id: format!("s{i}"),
            customer: format!("c{}", spec.customer),
            currency,
            created: start,
            statuses,
            items,
            discounts,
            cancellation,
            trial_end: None,
        });
    }
    account
}

fn fx_from(rates: &[u8]) -> FxTable {
    let mut t = FxTable::new();
    let first = NaiveDate::from_ymd_opt(2022, 9, 1).expect("valid");
    for (i, day) in first.iter_days().take(700).enumerate() {
        // Rates with two decimals keep every product exact at the engine's output scale.
        let r = rates[i % rates.len()];
        t.insert(
            day,
            Currency::EUR,
            Currency::USD,
            Decimal::new(100 + i64::from(r), 2),
        );
    }
    t
}

/// The base rates, except that `day` uses the next day's rate: values yesterday's state at
/// today's rate.
struct Shifted<'a> {
    base: &'a FxTable,
    day: NaiveDate,
}

impl FxRates for Shifted<'_> {
    fn rate(&self, from: Currency, to: Currency, day: NaiveDate) -> Option<Decimal> {
        let d = if day == self.day {
            day.succ_opt()?
        } else {
            day
        };
        self.base.rate(from, to, d)
    }
}

fn end_of(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(23, 59, 59).expect("valid").and_utc()
}

fn check_series(
    account: &Account,
    fx: &FxTable,
    rules: Rules,
    granularity: Granularity,
) -> Result<(), TestCaseError> {
    let engine = Engine::new(account, rules, Currency::USD).with_fx(fx);
    let from = NaiveDate::from_ymd_opt(2024, 1, 20).expect("valid");
    let to = NaiveDate::from_ymd_opt(2024, 5, 20).expect("valid");
    let report = engine
        .series(&SeriesRequest::new(from, to, granularity))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let ledger_from = NaiveDate::from_ymd_opt(2023, 12, 1).expect("valid");
    let ledger = engine
        .movements(ledger_from, to)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let snap = |day: NaiveDate| engine.mrr_at(end_of(day)).expect("snapshot");
    for row in &report.rows {
        let before = row.period_start.pred_opt().expect("valid");
        let (s0, s1) = (snap(before), snap(row.date));
        prop_assert_eq!(row.mrr, s1.total, "mrr on {}", row.date);
        prop_assert_eq!(row.mrr_start, s0.total, "mrr_start on {}", row.date);
        prop_assert_eq!(row.arr, row.mrr * Decimal::from(12));
        prop_assert!(row.mrr >= Decimal::ZERO);
        prop_assert!(s1.customers.iter().all(|c| c.mrr > Decimal::ZERO));
        prop_assert_eq!(row.total_customers as usize, s1.customers.len());
        prop_assert_eq!(row.customers_start as usize, s0.customers.len());

        let in_window: Vec<_> = ledger
            .movements
            .iter()
            .filter(|m| m.date >= row.period_start && m.date <= row.date)
            .collect();
        let sum = |k: MovementKind| -> Decimal {
            in_window
                .iter()
                .filter(|m| m.kind == k)
                .map(|m| m.amount)
                .sum()
        };
        let count = |k: MovementKind| in_window.iter().filter(|m| m.kind == k).count() as i64;
        prop_assert_eq!(row.new_mrr, sum(MovementKind::New), "new on {}", row.date);
        prop_assert_eq!(row.reactivation_mrr, sum(MovementKind::Reactivation));
        prop_assert_eq!(row.expansion_mrr, sum(MovementKind::Expansion));
        prop_assert_eq!(row.contraction_mrr, sum(MovementKind::Contraction));
        prop_assert_eq!(
            row.churned_mrr,
            sum(MovementKind::Churn),
            "churn on {}",
            row.date
        );
        // The customer count at the end agrees with the period's movements.
        prop_assert_eq!(
            row.total_customers as i64,
            row.customers_start as i64
                + count(MovementKind::New)
                + count(MovementKind::Reactivation)
                - count(MovementKind::Churn)
        );

        // fx, independently: each day, yesterday's state revalued at today's rate.
        let mut fx_expected = Decimal::ZERO;
        let mut day = row.period_start;
        while day <= row.date {
            let prev = day.pred_opt().expect("valid");
            let shifted = Shifted {
                base: fx,
                day: prev,
            };
            let revalued = Engine::new(account, rules, Currency::USD)
                .with_fx(&shifted)
                .mrr_at(end_of(prev))
                .expect("snapshot");
            fx_expected += revalued.total - snap(prev).total;
            day = day.succ_opt().expect("valid");
        }
        prop_assert_eq!(row.fx_mrr, fx_expected, "fx on {}", row.date);
        // So the identity holds on values computed without the series.
        prop_assert_eq!(
            s1.total,
            s0.total
                + sum(MovementKind::New)
                + sum(MovementKind::Reactivation)
                + sum(MovementKind::Expansion)
                - sum(MovementKind::Contraction)
                - sum(MovementKind::Churn)
                + fx_expected
        );

        // Rates stay in their bounds.
        let unit = |r: Option<Decimal>| r.is_none_or(|r| r >= Decimal::ZERO && r <= Decimal::ONE);
        prop_assert!(
            unit(row.customer_churn_rate),
            "churn rate {:?}",
            row.customer_churn_rate
        );
        prop_assert!(unit(row.grr), "grr {:?}", row.grr);
        prop_assert!(row.churned_customers <= row.customers_start);
        for r in [
            row.nrr,
            row.revenue_churn_rate,
            row.quick_ratio,
            row.arpu,
            row.ltv,
        ] {
            prop_assert!(r.is_none_or(|r| r >= Decimal::ZERO));
        }
    }
    Ok(())
}

fn shuffled(account: &Account, seed: u64) -> Account {
    // A deterministic permutation without a random-number crate: sort by a keyed hash.
    fn key(seed: u64, s: &str) -> u64 {
        s.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }
    let mut a = account.clone();
    a.customers.sort_by_key(|c| key(seed, &c.id));
    a.subscriptions.sort_by_key(|s| key(seed, &s.id));
    for s in &mut a.subscriptions {
        s.items.reverse();
        s.statuses.reverse();
    }
    a
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Daily rows (trailing 30 days) agree with snapshots, the ledger and the revaluation, for
    /// every day of the range; so the identity holds every day.
    #[test]
    fn daily_rows_agree_with_independent_computations(
        specs in prop::collection::vec(sub_spec(), 1..7),
        rates in prop::collection::vec(0u8..40, 1..20),
    ) {
        let account = build(&specs);
        check_series(&account, &fx_from(&rates), Rules::default(), Granularity::Day)?;
    }

    /// Monthly rows, under every profile.
    #[test]
    fn monthly_rows_agree_with_independent_computations(
        specs in prop::collection::vec(sub_spec(), 1..7),
        rates in prop::collection::vec(0u8..40, 1..20),
        profile in prop::sample::select(Profile::ALL.to_vec()),
    ) {
        let account = build(&specs);
        check_series(&account, &fx_from(&rates), profile.rules(), Granularity::Month)?;
    }

    /// Neither the order of customers, subscriptions, items nor statuses changes any number.
    #[test]
    fn result_does_not_depend_on_input_order(
        specs in prop::collection::vec(sub_spec(), 1..7),
        rates in prop::collection::vec(0u8..40, 1..20),
        seed in any::<u64>(),
    ) {
        let account = build(&specs);
        let other = shuffled(&account, seed);
        let fx = fx_from(&rates);
        let from = NaiveDate::from_ymd_opt(2024, 1, 1).expect("valid");
        let to = NaiveDate::from_ymd_opt(2024, 5, 31).expect("valid");
        for g in [Granularity::Day, Granularity::Month] {
            let req = SeriesRequest::new(from, to, g);
            let a = Engine::new(&account, Rules::default(), Currency::USD).with_fx(&fx).series(&req).expect("series");
            let b = Engine::new(&other, Rules::default(), Currency::USD).with_fx(&fx).series(&req).expect("series");
            if let Some((x, y)) = a.rows.iter().zip(&b.rows).find(|(x, y)| x != y) {
                prop_assert!(false, "rows differ:\n{x:?}\n{y:?}\naccount: {:#?}", account.subscriptions);
            }
            prop_assert_eq!(a.anomalies, b.anomalies);
        }
        let a = Engine::new(&account, Rules::default(), Currency::USD).with_fx(&fx).movements(from, to).expect("ledger");
        let b = Engine::new(&other, Rules::default(), Currency::USD).with_fx(&fx).movements(from, to).expect("ledger");
        prop_assert_eq!(a.movements, b.movements);
    }

    /// The profile diff is empty for equal profiles.
    #[test]
    fn profile_diff_is_empty_for_equal_profiles(
        specs in prop::collection::vec(sub_spec(), 1..7),
        day in 0i64..DAYS,
        profile in prop::sample::select(Profile::ALL.to_vec()),
    ) {
        let account = build(&specs);
        let fx = fx_from(&[10]);
        let date = (base() + TimeDelta::days(day)).date_naive();
        let engine = Engine::new(&account, profile.rules(), Currency::USD).with_fx(&fx);
        let diff = engine.diff_profiles(&profile.rules(), date).expect("diff");
        prop_assert!(diff.customers.is_empty());
        prop_assert_eq!(diff.total_a, diff.total_b);
    }
}

/// A steady account: `base` customers paying 50.00 a month from the start, each leaving in any
/// month with probability `churn_pct`%, and as many newcomers a month as leave on average.
fn steady_account(seed: u64, base: usize, churn_pct: u64) -> Account {
    // A small deterministic generator (SplitMix64): the account is a function of the seed.
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let price = Arc::new(Price {
        id: "p_steady".into(),
        product: None,
        currency: Some(Currency::USD),
        unit_amount: Decimal::from(5_000),
        interval: Some(Interval::Month),
        interval_count: 1,
        scheme: BillingScheme::PerUnit,
        usage_type: UsageType::Licensed,
    });
    let start = NaiveDate::from_ymd_opt(2022, 1, 1).expect("date");
    let months = 36u32;
    let arrivals_per_month = base as u64 * churn_pct / 100;
    let mut starts: Vec<NaiveDate> = vec![start; base];
    for m in 0..months {
        let month = start + chrono::Months::new(m);
        for _ in 0..arrivals_per_month {
            starts.push(month + chrono::Days::new(next() % 28));
        }
    }
    let mut account = Account::default();
    for (i, from) in starts.into_iter().enumerate() {
        // Months survived: each month ends the subscription with probability churn_pct%.
        let mut end = None;
        let mut at = from;
        while at < start + chrono::Months::new(months) {
            at = at + chrono::Months::new(1);
            if next() % 100 < churn_pct {
                end = Some(at);
                break;
            }
        }
        let inst = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        let id = format!("c{i}");
        account.customers.push(Customer {
            id: id.clone(),
            created: inst(from),
            country: None,
            metadata: Metadata::default(),
        });
        let mut statuses = vec![StatusChange {
            at: inst(from),
            status: Status::Active,
        }];
        if let Some(e) = end {
            statuses.push(StatusChange {
                at: inst(e),
                status: Status::Canceled,
            });
        }
        account.subscriptions.push(Subscription {
            id: format!("s{i}"),
            customer: id,
            currency: Currency::USD,
            created: inst(from),
            statuses,
            items: vec![ItemPeriod {
                price: price.clone(),
                quantity: 1,
                from: inst(from),
                to: end.map(inst),
            }],
            discounts: Vec::new(),
            cancellation: end.map(|e| Cancellation {
                canceled_at: Some(inst(e)),
                cancel_at_period_end: false,
                cancel_at: None,
                ended_at: Some(inst(e)),
            }),
            trial_end: None,
        });
    }
    account
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// On a steady account, LTV (ARPA over the trailing six months' churn) moves
    /// less than 20 % from one month to the next, where the row rate's LTV swings with each
    /// month's noise.
    #[test]
    fn ltv_is_stable_on_a_steady_account(seed in any::<u64>(), churn_pct in 2u64..6) {
        let account = steady_account(seed, 3_000, churn_pct);
        let engine = Engine::new(&account, Rules::default(), Currency::USD);
        let from = NaiveDate::from_ymd_opt(2023, 1, 1).expect("date");
        let to = NaiveDate::from_ymd_opt(2024, 12, 31).expect("date");
        let report = engine
            .series(&SeriesRequest::new(from, to, Granularity::Month))
            .expect("series");
        let ltv: Vec<Decimal> = report.rows.iter().map(|r| r.ltv.expect("LTV known")).collect();
        for pair in ltv.windows(2) {
            let change = ((pair[1] - pair[0]) / pair[0]).abs();
            prop_assert!(
                change < Decimal::new(20, 2),
                "LTV moved {change} from {} to {}", pair[0], pair[1]
            );
        }
    }
}
