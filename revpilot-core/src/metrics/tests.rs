//! Unit tests of the engine on hand-built accounts: request errors and the overflow guard.

use std::sync::Arc;

use chrono::{NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;

use super::{Engine, Error, Granularity, SeriesRequest};
use crate::anomaly::Anomaly;
use crate::model::{
    Account, Customer, ItemPeriod, Metadata, Price, Status, StatusChange, Subscription,
};
use crate::{Currency, Profile, Rules};

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

/// `subs` subscriptions of one customer, each one item of `unit_amount` cents a month.
fn account(subs: usize, unit_amount: Decimal) -> Account {
    account_in(subs, unit_amount, Currency::USD)
}

fn account_in(subs: usize, unit_amount: Decimal, currency: Currency) -> Account {
    let at = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
    let price = Arc::new(Price {
        id: "p".into(),
        product: None,
        currency: None,
        unit_amount,
        interval: Some(crate::model::Interval::Month),
        interval_count: 1,
        scheme: Default::default(),
        usage_type: Default::default(),
    });
    Account {
        customers: vec![Customer {
            id: "c".into(),
            created: at,
            country: None,
            metadata: Metadata::new(),
        }],
        subscriptions: (0..subs)
            .map(|i| Subscription {
                id: format!("s{i}"),
                customer: "c".into(),
                currency,
                created: at,
                statuses: vec![StatusChange {
                    at,
                    status: Status::Active,
                }],
                items: vec![ItemPeriod {
                    price: Arc::clone(&price),
                    quantity: 1,
                    from: at,
                    to: None,
                }],
                discounts: Vec::new(),
                cancellation: None,
                trial_end: None,
            })
            .collect(),
        payments: Vec::new(),
    }
}

#[test]
fn amounts_that_could_overflow_an_exact_sum_are_an_error_not_a_panic() {
    // Two items at the per-item limit (10^10 a month) converted at the largest rate accepted
    // (10^6): past the 10^16 bound, so the engine refuses before summing anything.
    let huge = account_in(2, Decimal::from(1_000_000_000_000i64), Currency::EUR);
    let mut fx = crate::FxTable::new();
    fx.insert_range(
        day(2022, 1, 1),
        day(2024, 12, 31),
        Currency::EUR,
        Currency::USD,
        Decimal::from(1_000_000),
    );
    let engine = Engine::new(&huge, Rules::default(), Currency::USD).with_fx(&fx);
    let req = SeriesRequest::new(day(2024, 1, 1), day(2024, 3, 31), Granularity::Day);
    let too_large = Some(Error::AmountsTooLarge(Currency::EUR));
    assert_eq!(engine.series(&req).err(), too_large);
    assert_eq!(
        engine.movements(day(2024, 1, 1), day(2024, 1, 31)).err(),
        too_large
    );
    let instant = Utc.with_ymd_and_hms(2024, 2, 1, 0, 0, 0).unwrap();
    assert_eq!(engine.mrr_at(instant).err(), too_large);
    assert_eq!(
        engine.cohorts(day(2024, 1, 1), day(2024, 2, 1)).err(),
        too_large
    );
    assert_eq!(
        engine
            .diff_profiles(&Profile::Stripe.rules(), day(2024, 2, 1))
            .err(),
        too_large
    );

    // The same items at a real rate are fine and exact: 2 x 10^10 EUR at 1.1.
    let mut real = crate::FxTable::new();
    real.insert_range(
        day(2022, 1, 1),
        day(2024, 12, 31),
        Currency::EUR,
        Currency::USD,
        Decimal::new(11, 1),
    );
    let ok = Engine::new(&huge, Rules::default(), Currency::USD).with_fx(&real);
    let report = ok.series(&req).unwrap();
    assert_eq!(
        report.rows.last().unwrap().mrr,
        Decimal::from(22_000_000_000i64)
    );
}

#[test]
fn an_item_over_the_per_item_limit_is_an_anomaly() {
    let absurd = account(1, Decimal::from(10_000_000_000_000i64)); // $10^11 a month
    let engine = Engine::new(&absurd, Rules::default(), Currency::USD);
    assert_eq!(
        engine.input_anomalies(),
        &[Anomaly::AmountOutOfRange { object: "p".into() }]
    );
    let report = engine
        .series(&SeriesRequest::new(
            day(2024, 2, 1),
            day(2024, 2, 29),
            Granularity::Month,
        ))
        .unwrap();
    assert_eq!(report.rows[0].mrr, Decimal::ZERO);
    assert_eq!(report.anomalies, engine.input_anomalies());
}

#[test]
fn bad_requests_are_errors() {
    let a = account(1, Decimal::from(100));
    let engine = Engine::new(&a, Rules::default(), Currency::USD);
    let inverted = SeriesRequest::new(day(2024, 2, 1), day(2024, 1, 1), Granularity::Day);
    assert!(matches!(
        engine.series(&inverted),
        Err(Error::InvalidRange { .. })
    ));
    let long = SeriesRequest::new(day(1900, 1, 1), day(2024, 1, 1), Granularity::Month);
    assert!(matches!(
        engine.series(&long),
        Err(Error::RangeTooLong { .. })
    ));
    let gold = Engine::new(&a, Rules::default(), Currency::parse("xau").unwrap());
    assert_eq!(
        gold.series(&SeriesRequest::new(
            day(2024, 1, 1),
            day(2024, 1, 2),
            Granularity::Day
        )),
        Err(Error::UnknownReportingCurrency(
            Currency::parse("xau").unwrap()
        ))
    );
    assert!(engine.movements(day(2024, 2, 1), day(2024, 1, 1)).is_err());
    assert!(engine.cohorts(day(2024, 2, 1), day(2024, 1, 1)).is_err());
    assert!(
        engine
            .series(&SeriesRequest::new(
                NaiveDate::MIN,
                NaiveDate::MIN,
                Granularity::Day
            ))
            .is_err()
    );
}

#[test]
fn an_owned_engine_answers_as_the_borrowing_one() {
    use crate::synth::{SynthConfig, fx_table, generate};
    let config = SynthConfig::new(300, 7);
    let account = Arc::new(generate(&config));
    let fx = fx_table(&config);
    let request = SeriesRequest::new(day(2024, 1, 1), config.end(), Granularity::Month);
    let borrowed = Engine::new(&account, Rules::default(), Currency::USD).with_fx(&fx);
    let owned = super::OwnedEngine::new(
        Arc::clone(&account),
        Some(Arc::new(fx.clone())),
        Rules::default(),
        Currency::USD,
    );
    let expected = borrowed.series(&request).unwrap();
    assert!(expected.rows.iter().any(|r| r.mrr != Decimal::ZERO));
    // Moved to another thread, away from the account's first owner.
    drop(borrowed);
    let got = std::thread::spawn(move || owned.engine().series(&request).unwrap())
        .join()
        .unwrap();
    assert_eq!(got, expected);
}
