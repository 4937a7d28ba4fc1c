//! Usage periods, limits and the current usage of a user, over the storage ports.

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::{Bill, BillTooLarge, Catalog, Used, bill};
use crate::ports::{
    ConnectionId, Meter, Period, Recorded, StoreError, StoreResult, Tier, UsageRecord, UsageStore,
    UserId, UserProfile, UserStore,
};

/// Why usage cannot be recorded or reported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// There is no such user.
    #[error("user {0} not found")]
    UnknownUser(UserId),
    /// A hard-limited tier reached a limit: the action is refused until the next period or an
    /// upgrade.
    #[error(
        "upgrade required: the {tier} tier includes {limit} {meter} per period and {used} are used; \
         upgrade your plan or wait for the next period",
        tier = tier.as_str()
    )]
    UpgradeRequired {
        /// The user's tier.
        tier: Tier,
        /// The meter at its limit.
        meter: Meter,
        /// The limit.
        limit: u64,
        /// Used so far (committed and reserved).
        used: u64,
    },
    /// The bill does not fit in an amount.
    #[error(transparent)]
    Bill(#[from] BillTooLarge),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The usage period of a user at `now`: the current Stripe billing period while subscribed,
/// otherwise the calendar month (UTC).
///
/// A subscribed user whose stored period has ended (the renewal's webhook is late) gets the
/// following periods of the same length in months, so usage never falls outside any period.
pub fn usage_period(profile: &UserProfile, now: DateTime<Utc>) -> Period {
    let subscribed = profile.stripe_subscription_id.is_some()
        && matches!(
            profile.subscription_status.as_deref(),
            Some("active" | "trialing" | "past_due")
        );
    if let (true, Some(start), Some(end)) = (
        subscribed,
        profile.current_period_start,
        profile.current_period_end,
    ) && start <= now
        && start < end
    {
        if now < end {
            return Period { start, end };
        }
        let months = months_between(start, end).max(1);
        let mut period = Period { start, end };
        // Bounded: a period is at least a month, and the loop stops at the first that holds now.
        for _ in 0..1200 {
            let next_end = period.end.checked_add_months(Months::new(months));
            match next_end {
                Some(e) if period.end <= now => {
                    period = Period {
                        start: period.end,
                        end: e,
                    }
                }
                _ => break,
            }
        }
        if period.start <= now && now < period.end {
            return period;
        }
    }
    calendar_month(now)
}

/// The user's last billing period that ended at or before `at`: the one before the period
/// holding `at` ([`usage_period`]), of the same length in months. `None` only before the
/// calendar's first representable month.
pub fn ended_period(profile: &UserProfile, at: DateTime<Utc>) -> Option<Period> {
    let current = usage_period(profile, at);
    let months = months_between(current.start, current.end).max(1);
    let start = current.start.checked_sub_months(Months::new(months))?;
    Some(Period {
        start,
        end: current.start,
    })
}

fn months_between(start: DateTime<Utc>, end: DateTime<Utc>) -> u32 {
    let m = (end.year() - start.year()) * 12 + end.month0() as i32 - start.month0() as i32;
    u32::try_from(m).unwrap_or(1)
}

/// The calendar month (UTC) holding `now`.
fn calendar_month(now: DateTime<Utc>) -> Period {
    let start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now);
    Period {
        start,
        end: start
            .checked_add_months(Months::new(1))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    }
}

/// The limit the store enforces when recording `meter` for `profile`: the included amount on a
/// hard-limited tier, `None` (no refusal; overage accrues) on a tier that allows overage.
///
/// Scenarios have no overage: their limit is enforced on every tier.
pub fn recording_limit(catalog: &Catalog, profile: &UserProfile, meter: Meter) -> Option<u64> {
    if meter == Meter::Scenario {
        return profile.limits.scenarios.map(u64::from);
    }
    if catalog.plan(profile.tier).overage {
        return None;
    }
    match meter {
        Meter::AiInsight => profile.limits.ai_insights.map(u64::from),
        Meter::TransactionVolume => profile.limits.transaction_volume,
        Meter::Scenario => profile.limits.scenarios.map(u64::from),
    }
}

/// The period and enforced limit to record `meter` with for `profile` at `now`: what a sync job
/// passes for `transaction_volume` ([`usage_period`] and [`recording_limit`] together).
pub fn metering(
    catalog: &Catalog,
    profile: &UserProfile,
    meter: Meter,
    now: DateTime<Utc>,
) -> (Period, Option<u64>) {
    (
        usage_period(profile, now),
        recording_limit(catalog, profile, meter),
    )
}

/// One meter of [`CurrentUsage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterUsage {
    /// The meter.
    pub meter: Meter,
    /// Committed units this period.
    pub used: u64,
    /// Included units; `None` is unlimited.
    pub limit: Option<u64>,
    /// Included units left; `None` is unlimited.
    pub remaining: Option<u64>,
    /// Whether reaching the limit refuses more (hard-limited tier) or accrues overage.
    pub hard_limit: bool,
}

/// A user's usage this period and what it costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentUsage {
    /// The user.
    pub user: UserId,
    /// Their tier.
    pub tier: Tier,
    /// The period counted.
    pub period: Period,
    /// AI insights.
    pub ai_insight: MeterUsage,
    /// Transaction volume.
    pub transaction_volume: MeterUsage,
    /// What-if scenario runs: always a hard limit (scenarios have no overage).
    pub scenario: MeterUsage,
    /// The bill so far.
    pub bill: Bill,
}

async fn profile<S: UserStore + ?Sized>(
    store: &S,
    user: UserId,
) -> Result<UserProfile, UsageError> {
    store.user(user).await?.ok_or(UsageError::UnknownUser(user))
}

/// Makes sure `user` has a profile: a user seen for the first time (say, a new session of the
/// embedding product's auth) gets the starter tier, with `email` unless another profile has it.
/// Concurrent first requests are fine: a creation that conflicts means the profile exists.
///
/// # Errors
/// The store's.
pub async fn ensure_profile<S: UserStore + ?Sized>(
    store: &S,
    catalog: &Catalog,
    user: UserId,
    email: Option<&str>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    if store.user(user).await?.is_some() {
        return Ok(());
    }
    let limits = catalog.plan(Tier::Starter).limits;
    let created = match store
        .create_user(user, email, Tier::Starter, limits, now)
        .await
    {
        // The email belongs to another profile: this one goes without it.
        Err(StoreError::Conflict(_)) if email.is_some() => {
            store
                .create_user(user, None, Tier::Starter, limits, now)
                .await
        }
        other => other,
    };
    match created {
        Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The user's usage, limits and bill in the current period at `now`.
///
/// # Errors
/// [`UsageError::UnknownUser`], or the store's error.
pub async fn current_usage<S: UserStore + UsageStore + ?Sized>(
    store: &S,
    catalog: &Catalog,
    user: UserId,
    now: DateTime<Utc>,
) -> Result<CurrentUsage, UsageError> {
    let profile = profile(store, user).await?;
    let period = usage_period(&profile, now);
    let hard = !catalog.plan(profile.tier).overage;
    let meter =
        async |meter: Meter, limit: Option<u64>, hard: bool| -> Result<MeterUsage, UsageError> {
            let used = store.used(user, meter, period).await?;
            Ok(MeterUsage {
                meter,
                used,
                limit,
                remaining: limit.map(|l| l.saturating_sub(used)),
                hard_limit: hard && limit.is_some(),
            })
        };
    let ai = meter(
        Meter::AiInsight,
        profile.limits.ai_insights.map(u64::from),
        hard,
    )
    .await?;
    let tx = meter(
        Meter::TransactionVolume,
        profile.limits.transaction_volume,
        hard,
    )
    .await?;
    let scenario = meter(
        Meter::Scenario,
        profile.limits.scenarios.map(u64::from),
        true,
    )
    .await?;
    let bill = bill(
        catalog,
        profile.tier,
        &profile.limits,
        Used {
            ai_insights: ai.used,
            transactions: tx.used,
        },
    )?;
    Ok(CurrentUsage {
        user,
        tier: profile.tier,
        period,
        ai_insight: ai,
        transaction_volume: tx,
        scenario,
        bill,
    })
}

/// Reserves one AI insight, keyed by `insight_id`, before the insight is generated: it counts
/// against the limit at once, so concurrent requests cannot together pass it. Call
/// [`commit_insight`] when the insight succeeded, [`release_insight`] when it failed.
///
/// # Errors
/// [`UsageError::UpgradeRequired`] on a hard-limited tier at its limit (nothing is written);
/// [`UsageError::UnknownUser`]; the store's error.
pub async fn reserve_insight<S: UserStore + UsageStore + ?Sized>(
    store: &S,
    catalog: &Catalog,
    user: UserId,
    insight_id: &str,
    connection: Option<ConnectionId>,
    now: DateTime<Utc>,
) -> Result<Recorded, UsageError> {
    meter_one(
        store,
        catalog,
        Meter::AiInsight,
        user,
        insight_id,
        connection,
        now,
        true,
    )
    .await
}

/// Records one what-if scenario run, keyed by `run_id`, against the user's monthly scenario
/// limit (starter 0, professional 3, business and enterprise unlimited by default). Scenarios
/// have no overage: the limit holds on every tier.
///
/// # Errors
/// [`UsageError::UpgradeRequired`] at the limit (nothing is written);
/// [`UsageError::UnknownUser`]; the store's error.
pub async fn record_scenario<S: UserStore + UsageStore + ?Sized>(
    store: &S,
    catalog: &Catalog,
    user: UserId,
    run_id: &str,
    connection: Option<ConnectionId>,
    now: DateTime<Utc>,
) -> Result<Recorded, UsageError> {
    meter_one(
        store,
        catalog,
        Meter::Scenario,
        user,
        run_id,
        connection,
        now,
        false,
    )
    .await
}

/// Whether the user may run one more what-if scenario now, without recording anything: the
/// limit answers before the scenario's own data is looked at, so a user with no scenarios
/// left hears "upgrade" rather than, say, "not enough history". [`record_scenario`] still
/// enforces the limit atomically.
///
/// # Errors
/// [`UsageError::UpgradeRequired`] at the limit; [`UsageError::UnknownUser`]; the store's
/// error.
pub async fn check_scenario<S: UserStore + UsageStore + ?Sized>(
    store: &S,
    user: UserId,
    now: DateTime<Utc>,
) -> Result<(), UsageError> {
    let profile = profile(store, user).await?;
    let Some(limit) = profile.limits.scenarios.map(u64::from) else {
        return Ok(());
    };
    let used = store
        .used(user, Meter::Scenario, usage_period(&profile, now))
        .await?;
    if used >= limit {
        return Err(UsageError::UpgradeRequired {
            tier: profile.tier,
            meter: Meter::Scenario,
            limit,
            used,
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn meter_one<S: UserStore + UsageStore + ?Sized>(
    store: &S,
    catalog: &Catalog,
    meter: Meter,
    user: UserId,
    key: &str,
    connection: Option<ConnectionId>,
    now: DateTime<Utc>,
    reserve: bool,
) -> Result<Recorded, UsageError> {
    let profile = profile(store, user).await?;
    let record = UsageRecord {
        user,
        meter,
        connection,
        amount: 1,
        idempotency_key: key.to_owned(),
        metadata: serde_json::json!({ "tier": profile.tier.as_str() }),
        at: now,
    };
    let limit = recording_limit(catalog, &profile, meter);
    let period = usage_period(&profile, now);
    let result = if reserve {
        store.reserve(&record, period, limit).await
    } else {
        store.record(&record, period, limit).await
    };
    result.map_err(|e| match e {
        StoreError::LimitExceeded { meter, limit, used } => UsageError::UpgradeRequired {
            tier: profile.tier,
            meter,
            limit,
            used,
        },
        other => UsageError::Store(other),
    })
}

/// Commits the reservation of a generated insight.
///
/// # Errors
/// The store's error ([`StoreError::NotFound`] without a reservation).
pub async fn commit_insight<S: UsageStore + ?Sized>(
    store: &S,
    user: UserId,
    insight_id: &str,
) -> Result<(), UsageError> {
    Ok(store.commit(user, insight_id).await?)
}

/// Releases the reservation of an insight that failed: it is not counted.
///
/// # Errors
/// The store's error ([`StoreError::NotFound`] without a reservation).
pub async fn release_insight<S: UsageStore + ?Sized>(
    store: &S,
    user: UserId,
    insight_id: &str,
) -> Result<(), UsageError> {
    Ok(store.release(user, insight_id).await?)
}
