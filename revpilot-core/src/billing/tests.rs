#![allow(clippy::unwrap_used)]

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::ports::{Limits, Meter, Period, PlanChange, Tier, UserId, UserProfile, UserStore};
use crate::testing::MemoryStore;

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
}

const DEFAULT_TOML: &str = r#"
currency = "usd"

[overage.ai_insight]
unit_price = "1.00"

[overage.transaction_volume]
block = 1000
block_price = "0.10"

[tiers.starter]
price = "0"
scenarios = 0
ai_insights = 5
transaction_volume = 10000
overage = false

[tiers.professional]
price = "29.00"
scenarios = 3
ai_insights = 50
transaction_volume = 100000
overage = true

[tiers.business]
price = "99"
scenarios = "unlimited"
ai_insights = 200
transaction_volume = 500000
overage = true

[tiers.enterprise]
price = 299.00
scenarios = "unlimited"
ai_insights = "unlimited"
transaction_volume = "unlimited"
overage = true
"#;

#[test]
fn the_default_catalog_is_the_seeds_pricing() {
    let c = Catalog::default();
    let row = |t: Tier| {
        let p = c.plan(t);
        (
            p.limits.scenarios,
            p.limits.ai_insights,
            p.limits.transaction_volume,
            p.price,
            p.overage,
        )
    };
    assert_eq!(
        row(Tier::Starter),
        (Some(0), Some(5), Some(10_000), 0, false)
    );
    assert_eq!(
        row(Tier::Professional),
        (Some(3), Some(50), Some(100_000), 2_900, true)
    );
    assert_eq!(
        row(Tier::Business),
        (None, Some(200), Some(500_000), 9_900, true)
    );
    assert_eq!(row(Tier::Enterprise), (None, None, None, 29_900, true));
    assert_eq!(
        c.overage(),
        OverageRates {
            ai_insight_unit_price: 100,
            transaction_block: 1_000,
            transaction_block_price: 10
        }
    );
    assert_eq!(c.currency(), crate::Currency::USD);
}

#[test]
fn a_toml_file_replaces_the_catalog() {
    assert_eq!(
        Catalog::from_toml(DEFAULT_TOML).unwrap(),
        Catalog::default()
    );
    let cheaper = DEFAULT_TOML.replace("price = \"29.00\"", "price = \"19.50\"");
    assert_eq!(
        Catalog::from_toml(&cheaper)
            .unwrap()
            .plan(Tier::Professional)
            .price,
        1_950
    );
}

#[test]
fn invalid_catalogs_are_rejected_naming_the_field() {
    let cases = [
        (
            DEFAULT_TOML.replace("price = \"29.00\"", "price = \"29.001\""),
            "tiers.professional.price",
        ),
        (
            DEFAULT_TOML.replace("price = \"99\"", "price = \"-1\""),
            "tiers.business.price",
        ),
        (
            DEFAULT_TOML.replace("ai_insights = 200", "ai_insights = \"lots\""),
            "tiers.business.ai_insights",
        ),
        (
            DEFAULT_TOML.replace("ai_insights = 200", "ai_insights = -3"),
            "tiers.business.ai_insights",
        ),
        (
            DEFAULT_TOML.replace("block = 1000", "block = 0"),
            "overage.transaction_volume.block",
        ),
        (
            DEFAULT_TOML.replace("[tiers.business]", "[tiers.premium]"),
            "tiers.premium",
        ),
        (
            DEFAULT_TOML.replace("currency = \"usd\"", "currency = \"dollars\""),
            "currency",
        ),
    ];
    for (text, field) in cases {
        let err = Catalog::from_toml(&text).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        // Only the currency has an underlying error, kept as the source.
        let source = std::error::Error::source(&err);
        if field == "currency" {
            let source = source.expect("the currency's error is the source");
            assert_eq!(
                source.downcast_ref::<crate::money::InvalidCurrency>(),
                Some(&crate::money::InvalidCurrency("dollars".into()))
            );
            assert!(
                err.to_string()
                    .contains("invalid currency code \"dollars\""),
                "{err}"
            );
        } else {
            assert!(source.is_none(), "{field}: {err}");
        }
    }
    // A tier left out, a typo'd key, a missing key: the message names it and where.
    let no_enterprise = DEFAULT_TOML
        .split("[tiers.enterprise]")
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        Catalog::from_toml(&no_enterprise).unwrap_err().field,
        "tiers.enterprise"
    );
    let typo = DEFAULT_TOML.replace("overage = false", "overage = false\nai_insight = 5");
    let err = Catalog::from_toml(&typo).unwrap_err();
    assert!(err.to_string().contains("ai_insight"), "{err}");
    assert!(err.field.starts_with("line "), "{err}");
    let missing = DEFAULT_TOML.replace("ai_insights = 5\n", "");
    let err = Catalog::from_toml(&missing).unwrap_err();
    assert!(err.to_string().contains("ai_insights"), "{err}");
}

#[test]
fn the_builder_validates() {
    let base = CatalogBuilder::from_catalog(&Catalog::default());
    let mut plan = Catalog::default().plan(Tier::Business).clone();
    plan.price = -5;
    let err = base.clone().tier(plan).build().unwrap_err();
    assert_eq!(err.field, "tiers.business.price");
    let mut plan = Catalog::default().plan(Tier::Business).clone();
    plan.stripe_price_id = Some("  ".into());
    let err = base.clone().tier(plan).build().unwrap_err();
    assert_eq!(err.field, "tiers.business.stripe_price_id");
    let err = CatalogBuilder::new(crate::Currency::USD)
        .tier(Catalog::default().plan(Tier::Starter).clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field, "overage");
}

#[test]
fn prices_map_to_tiers_from_the_environment() {
    let env = |name: &str| match name {
        "STRIPE_PROFESSIONAL_PRICE_ID" => Some("price_pro".to_owned()),
        "STRIPE_BUSINESS_PRICE_ID" => Some(" price_biz ".to_owned()),
        "STRIPE_ENTERPRISE_PRICE_ID" => Some(String::new()),
        _ => None,
    };
    let c = Catalog::default().with_price_ids_from(env).unwrap();
    assert_eq!(c.price_id(Tier::Professional), Some("price_pro"));
    assert_eq!(c.price_id(Tier::Business), Some("price_biz"));
    assert_eq!(c.price_id(Tier::Enterprise), None, "empty is filtered out");
    assert_eq!(c.price_id(Tier::Starter), None, "missing is filtered out");
    assert_eq!(
        c.tier_for_price(Some("price_biz")),
        PriceTier {
            tier: Tier::Business,
            note: None
        }
    );
    // An empty value never matches a subscription without a price.
    let unknown = c.tier_for_price(Some("price_other"));
    assert_eq!(unknown.tier, Tier::Starter);
    assert!(unknown.note.unwrap().contains("price_other"));
    assert_eq!(c.tier_for_price(None).tier, Tier::Starter);
    assert!(c.tier_for_price(Some("")).note.is_some());

    let same = |name: &str| {
        (name == "STRIPE_PROFESSIONAL_PRICE_ID" || name == "STRIPE_BUSINESS_PRICE_ID")
            .then(|| "price_x".to_owned())
    };
    let err = Catalog::default().with_price_ids_from(same).unwrap_err();
    assert!(err.field.ends_with("stripe_price_id"), "{err}");
}

fn bill_of(tier: Tier, ai: u64, tx: u64) -> Bill {
    let c = Catalog::default();
    bill(
        &c,
        tier,
        &c.plan(tier).limits,
        Used {
            ai_insights: ai,
            transactions: tx,
        },
    )
    .unwrap()
}

#[test]
fn overage_is_billed_per_unit_and_per_started_block() {
    let b = bill_of(Tier::Professional, 50, 100_000);
    assert_eq!(
        (b.overage(), b.total),
        (0, 2_900),
        "at the limit: no overage"
    );
    let b = bill_of(Tier::Professional, 51, 100_001);
    assert_eq!(
        (
            b.ai_insight_overage_units,
            b.ai_insight_overage,
            b.transaction_volume_overage_blocks,
            b.transaction_volume_overage,
            b.total
        ),
        (1, 100, 1, 10, 3_010)
    );
    let b = bill_of(Tier::Business, 200, 502_000);
    assert_eq!(
        (b.transaction_volume_overage_blocks, b.total),
        (2, 9_920),
        "exactly two blocks"
    );
    let b = bill_of(Tier::Business, 200, 502_001);
    assert_eq!(
        b.transaction_volume_overage_blocks, 3,
        "a started block counts"
    );
    let b = bill_of(Tier::Enterprise, 1_000_000, u64::MAX);
    assert_eq!((b.overage(), b.total), (0, 29_900), "unlimited");
    let b = bill_of(Tier::Starter, 9, 20_000);
    assert_eq!(b.total, 0, "a hard-limited tier never bills overage");
}

#[test]
fn a_bill_too_large_is_an_error_not_a_wrap() {
    let c = Catalog::default();
    let err = bill(
        &c,
        Tier::Professional,
        &c.plan(Tier::Professional).limits,
        Used {
            ai_insights: u64::MAX,
            transactions: 0,
        },
    )
    .unwrap_err();
    assert_eq!(err.meter, Meter::AiInsight);
}

proptest! {
    #[test]
    fn the_bill_is_monotone_in_usage(
        tier in prop::sample::select(TIERS.to_vec()),
        ai in 0u64..100_000, tx in 0u64..10_000_000,
        more_ai in 0u64..1_000, more_tx in 0u64..1_000_000,
    ) {
        let a = bill_of(tier, ai, tx);
        let b = bill_of(tier, ai + more_ai, tx + more_tx);
        prop_assert!(b.total >= a.total);
        prop_assert!(b.ai_insight_overage >= a.ai_insight_overage);
        prop_assert!(b.transaction_volume_overage >= a.transaction_volume_overage);
    }

    #[test]
    fn totals_add_up_to_the_cent(
        tier in prop::sample::select(TIERS.to_vec()),
        ai in 0u64..1_000_000, tx in 0u64..100_000_000,
    ) {
        let b = bill_of(tier, ai, tx);
        prop_assert_eq!(b.total, b.base + b.ai_insight_overage + b.transaction_volume_overage);
        let rates = Catalog::default().overage();
        prop_assert_eq!(b.ai_insight_overage, b.ai_insight_overage_units as i64 * rates.ai_insight_unit_price);
        prop_assert_eq!(
            b.transaction_volume_overage,
            b.transaction_volume_overage_blocks as i64 * rates.transaction_block_price
        );
        // A started block is billed, and only a started one.
        let limit = Catalog::default().plan(tier).limits.transaction_volume;
        if let (Some(l), true) = (limit, Catalog::default().plan(tier).overage) {
            let over = tx.saturating_sub(l);
            prop_assert!(b.transaction_volume_overage_blocks * 1_000 >= over);
            prop_assert!(b.transaction_volume_overage_blocks * 1_000 < over + 1_000);
        }
    }

    #[test]
    fn unlimited_never_bills_overage(
        ai in any::<u64>(), tx in any::<u64>(), price in 0i64..1_000_000,
        ai_limit in prop::option::of(0u32..1_000), tx_limit in prop::option::of(0u64..1_000_000),
    ) {
        let c = Catalog::default();
        let limits = Limits { scenarios: None, ai_insights: None, transaction_volume: None };
        let mut plan = c.plan(Tier::Business).clone();
        plan.price = price;
        let c = CatalogBuilder::from_catalog(&c).tier(plan).build().unwrap();
        let b = bill(&c, Tier::Business, &limits, Used { ai_insights: ai, transactions: tx }).unwrap();
        prop_assert_eq!((b.overage(), b.total), (0, price));
        // Each meter on its own: an unlimited one bills nothing whatever the other does.
        let one = Limits { scenarios: None, ai_insights: ai_limit, transaction_volume: None };
        if let Ok(b) = bill(&c, Tier::Business, &one, Used { ai_insights: ai % 1_000_000, transactions: tx }) {
            prop_assert_eq!(b.transaction_volume_overage, 0);
        }
        let one = Limits { scenarios: None, ai_insights: None, transaction_volume: tx_limit };
        let b = bill(&c, Tier::Business, &one, Used { ai_insights: ai, transactions: tx % 1_000_000_000 }).unwrap();
        prop_assert_eq!(b.ai_insight_overage, 0);
    }
}

fn profile(tier: Tier) -> UserProfile {
    UserProfile {
        user_id: UserId(Uuid::nil()),
        email: None,
        tier,
        subscription_status: None,
        stripe_customer_id: None,
        stripe_subscription_id: None,
        current_period_start: None,
        current_period_end: None,
        limits: Catalog::default().plan(tier).limits,
        created_at: at(2024, 1, 1),
        updated_at: at(2024, 1, 1),
    }
}

/// The ended billing period: the one before the period holding `at`, for a subscriber (from
/// their period, rolled forward when the renewal is late) and a free user (calendar months).
#[test]
fn the_ended_period_is_the_one_before_the_current() {
    let mut p = profile(Tier::Professional);
    p.stripe_subscription_id = Some("sub_1".into());
    p.subscription_status = Some("active".into());
    p.current_period_start = Some(at(2026, 3, 15));
    p.current_period_end = Some(at(2026, 4, 15));
    let e = ended_period(&p, at(2026, 3, 20)).unwrap();
    assert_eq!((e.start, e.end), (at(2026, 2, 15), at(2026, 3, 15)));
    let e = ended_period(&p, at(2026, 5, 1)).unwrap();
    assert_eq!((e.start, e.end), (at(2026, 3, 15), at(2026, 4, 15)));
    p.current_period_start = None;
    p.current_period_end = None;
    let e = ended_period(&p, at(2026, 3, 20)).unwrap();
    assert_eq!((e.start, e.end), (at(2026, 2, 1), at(2026, 3, 1)));
}

#[test]
fn the_usage_period_is_the_billing_period_when_subscribed_else_the_month() {
    let now = Utc.with_ymd_and_hms(2024, 3, 20, 15, 0, 0).unwrap();
    let free = profile(Tier::Starter);
    assert_eq!(
        usage_period(&free, now),
        Period {
            start: at(2024, 3, 1),
            end: at(2024, 4, 1)
        }
    );
    let mut paid = profile(Tier::Professional);
    paid.stripe_subscription_id = Some("sub_1".into());
    paid.subscription_status = Some("active".into());
    paid.current_period_start = Some(at(2024, 3, 14));
    paid.current_period_end = Some(at(2024, 4, 14));
    let billing = Period {
        start: at(2024, 3, 14),
        end: at(2024, 4, 14),
    };
    assert_eq!(usage_period(&paid, now), billing);
    // The end is exclusive.
    assert_eq!(usage_period(&paid, at(2024, 4, 14)).start, at(2024, 4, 14));
    // A late renewal webhook: the next period of the same length.
    assert_eq!(
        usage_period(&paid, at(2024, 5, 20)),
        Period {
            start: at(2024, 5, 14),
            end: at(2024, 6, 14)
        }
    );
    // Canceled: back to calendar months.
    paid.subscription_status = Some("canceled".into());
    assert_eq!(usage_period(&paid, now).start, at(2024, 3, 1));
    // December rolls into January.
    assert_eq!(
        usage_period(&free, at(2024, 12, 31)),
        Period {
            start: at(2024, 12, 1),
            end: at(2025, 1, 1)
        }
    );
}

#[test]
fn only_hard_limited_tiers_refuse() {
    let c = Catalog::default();
    assert_eq!(
        recording_limit(&c, &profile(Tier::Starter), Meter::AiInsight),
        Some(5)
    );
    assert_eq!(
        recording_limit(&c, &profile(Tier::Starter), Meter::TransactionVolume),
        Some(10_000)
    );
    let now = at(2024, 3, 20);
    assert_eq!(
        metering(&c, &profile(Tier::Starter), Meter::TransactionVolume, now),
        (
            Period {
                start: at(2024, 3, 1),
                end: at(2024, 4, 1)
            },
            Some(10_000)
        )
    );
    for tier in [Tier::Professional, Tier::Business, Tier::Enterprise] {
        assert_eq!(
            recording_limit(&c, &profile(tier), Meter::AiInsight),
            None,
            "{tier:?}"
        );
    }
}

#[tokio::test]
async fn insights_are_reserved_committed_released_and_refused_at_the_hard_limit() {
    let store = MemoryStore::default();
    let c = Catalog::default();
    let user = UserId(Uuid::new_v4());
    let now = at(2024, 3, 10);
    store
        .create_user(user, None, Tier::Starter, c.plan(Tier::Starter).limits, now)
        .await
        .unwrap();
    for i in 0..5 {
        reserve_insight(&store, &c, user, &format!("ins_{i}"), None, now)
            .await
            .unwrap();
    }
    let err = reserve_insight(&store, &c, user, "ins_5", None, now)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            UsageError::UpgradeRequired {
                tier: Tier::Starter,
                meter: Meter::AiInsight,
                limit: 5,
                used: 5
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
    // A failed insight frees its unit; a succeeded one is counted.
    release_insight(&store, user, "ins_0").await.unwrap();
    commit_insight(&store, user, "ins_1").await.unwrap();
    reserve_insight(&store, &c, user, "ins_5", None, now)
        .await
        .unwrap();
    let u = current_usage(&store, &c, user, now).await.unwrap();
    assert_eq!(
        (
            u.ai_insight.used,
            u.ai_insight.limit,
            u.ai_insight.remaining
        ),
        (1, Some(5), Some(4))
    );
    assert!(u.ai_insight.hard_limit);
    assert_eq!(u.bill.total, 0);

    // Upgraded: overage accrues instead of a refusal, and is billed.
    store
        .set_plan(
            user,
            &PlanChange {
                tier: Tier::Professional,
                subscription_status: None,
                stripe_customer_id: None,
                stripe_subscription_id: None,
                current_period_start: None,
                current_period_end: None,
                limits: Limits {
                    ai_insights: Some(2),
                    ..c.plan(Tier::Professional).limits
                },
            },
            now,
        )
        .await
        .unwrap();
    for i in 10..13 {
        let key = format!("ins_{i}");
        reserve_insight(&store, &c, user, &key, None, now)
            .await
            .unwrap();
        commit_insight(&store, user, &key).await.unwrap();
    }
    let u = current_usage(&store, &c, user, now).await.unwrap();
    assert_eq!((u.ai_insight.used, u.ai_insight.remaining), (4, Some(0)));
    assert!(!u.ai_insight.hard_limit);
    assert_eq!(
        (u.bill.base, u.bill.ai_insight_overage, u.bill.total),
        (2_900, 200, 3_100)
    );
    let nobody = current_usage(&store, &c, UserId(Uuid::new_v4()), now).await;
    assert!(matches!(nobody, Err(UsageError::UnknownUser(_))));
}

#[tokio::test]
async fn scenario_runs_count_against_the_monthly_limit_on_every_tier() {
    let store = MemoryStore::default();
    let c = Catalog::default();
    let now = at(2024, 3, 10);
    for (tier, allowed) in [
        (Tier::Starter, Some(0u32)),
        (Tier::Professional, Some(3)),
        (Tier::Business, None),
        (Tier::Enterprise, None),
    ] {
        let user = UserId(Uuid::new_v4());
        store
            .create_user(user, None, tier, c.plan(tier).limits, now)
            .await
            .unwrap();
        let runs = 12;
        let mut ok = 0;
        for i in 0..runs {
            match record_scenario(&store, &c, user, &format!("run_{i}"), None, now).await {
                Ok(_) => ok += 1,
                Err(UsageError::UpgradeRequired {
                    meter: Meter::Scenario,
                    limit,
                    ..
                }) => assert_eq!(Some(limit), allowed.map(u64::from)),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(Some(ok), Some(allowed.unwrap_or(runs)), "{tier:?}");
        // The usage shows the meter, always as a hard limit, and check_scenario agrees.
        let u = current_usage(&store, &c, user, now).await.unwrap();
        assert_eq!(
            (u.scenario.used, u.scenario.limit, u.scenario.remaining),
            (
                u64::from(allowed.unwrap_or(runs)),
                allowed.map(u64::from),
                allowed.map(|_| 0)
            ),
            "{tier:?}"
        );
        assert_eq!(u.scenario.hard_limit, allowed.is_some(), "{tier:?}");
        assert_eq!(
            check_scenario(&store, user, now).await.is_ok(),
            allowed.is_none(),
            "{tier:?}"
        );
        // The next month starts again.
        let april = at(2024, 4, 2);
        let next = record_scenario(&store, &c, user, "april", None, april).await;
        assert_eq!(next.is_ok(), allowed != Some(0), "{tier:?}");
    }
}

#[tokio::test]
async fn a_user_seen_for_the_first_time_gets_a_starter_profile_once() {
    let store = MemoryStore::default();
    let catalog = Catalog::default();
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
    let (a, b) = (UserId(Uuid::new_v4()), UserId(Uuid::new_v4()));
    ensure_profile(&store, &catalog, a, Some("a@example.com"), now)
        .await
        .unwrap();
    let profile = store.user(a).await.unwrap().unwrap();
    assert_eq!(profile.tier, Tier::Starter);
    assert_eq!(profile.limits, catalog.plan(Tier::Starter).limits);
    assert_eq!(profile.email.as_deref(), Some("a@example.com"));
    // Seen again: nothing changes.
    ensure_profile(&store, &catalog, a, None, now)
        .await
        .unwrap();
    assert_eq!(store.user(a).await.unwrap(), Some(profile));
    // Another user presenting a's email gets a profile without it.
    ensure_profile(&store, &catalog, b, Some("a@example.com"), now)
        .await
        .unwrap();
    let other = store.user(b).await.unwrap().unwrap();
    assert_eq!((other.tier, other.email), (Tier::Starter, None));
}
