//! Plans, usage and billing math: the tier catalog, usage periods, limits, the bill.
//!
//! Amounts are integers in the catalog currency's minor units (cents), as Stripe takes them:
//! every charge here is a whole number of cents by construction, so nothing is rounded.
//!
//! ```
//! use revpilot_core::billing::{Catalog, Used, bill};
//! use revpilot_core::ports::Tier;
//!
//! let catalog = Catalog::default();
//! let plan = catalog.plan(Tier::Professional);
//! // 52 insights (2 over 50) and 100,001 transactions (1 started block over 100,000).
//! let b = bill(&catalog, Tier::Professional, &plan.limits, Used { ai_insights: 52, transactions: 100_001 })
//!     .unwrap();
//! assert_eq!((b.base, b.ai_insight_overage, b.transaction_volume_overage, b.total), (2_900, 200, 10, 3_110));
//! ```

mod catalog;
mod usage;

pub use catalog::{
    Catalog, CatalogBuilder, CatalogError, OverageRates, PriceTier, TIERS, TierPlan, price_env_var,
};
pub use usage::{
    CurrentUsage, MeterUsage, UsageError, check_scenario, commit_insight, current_usage,
    ended_period, ensure_profile, metering, record_scenario, recording_limit, release_insight,
    reserve_insight, usage_period,
};

use serde::{Deserialize, Serialize};

use crate::money::Currency;
use crate::ports::{Limits, Meter, Tier};

/// Usage in a period, per meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Used {
    /// AI insights generated.
    pub ai_insights: u64,
    /// Transactions synced.
    pub transactions: u64,
}

/// What a period costs, in minor units of `currency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bill {
    /// Currency of every amount.
    pub currency: Currency,
    /// The tier's base charge.
    pub base: i64,
    /// AI insights past the included amount: how many.
    pub ai_insight_overage_units: u64,
    /// Their charge.
    pub ai_insight_overage: i64,
    /// Started blocks of transactions past the included amount: how many.
    pub transaction_volume_overage_blocks: u64,
    /// Their charge.
    pub transaction_volume_overage: i64,
    /// `base + ai_insight_overage + transaction_volume_overage`.
    pub total: i64,
}

impl Bill {
    /// The overage part: what is added to the next invoice at the end of the period.
    pub fn overage(&self) -> i64 {
        self.ai_insight_overage + self.transaction_volume_overage
    }
}

/// A bill too large for 64-bit cents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {meter} overage of {units} units does not fit in an amount")]
pub struct BillTooLarge {
    /// The meter.
    pub meter: Meter,
    /// Its overage units.
    pub units: u64,
}

/// The bill for `used` on `tier` with the `limits` the user was sold (as stored on the profile).
///
/// Overage accrues only on tiers that allow it and only past a finite limit: an unlimited meter
/// never bills overage, and a hard-limited tier never bills any (its usage is refused instead).
/// AI insights cost the unit price each; transactions cost the block price per *started* block.
///
/// # Errors
/// [`BillTooLarge`] when an amount does not fit in `i64` cents.
pub fn bill(
    catalog: &Catalog,
    tier: Tier,
    limits: &Limits,
    used: Used,
) -> Result<Bill, BillTooLarge> {
    let plan = catalog.plan(tier);
    let rates = catalog.overage();
    let over = |used: u64, limit: Option<u64>| match limit {
        Some(l) if plan.overage => used.saturating_sub(l),
        _ => 0,
    };
    let ai_units = over(used.ai_insights, limits.ai_insights.map(u64::from));
    let tx_over = over(used.transactions, limits.transaction_volume);
    let tx_blocks = tx_over.div_ceil(rates.transaction_block);
    let charge = |meter: Meter, units: u64, price: i64| -> Result<i64, BillTooLarge> {
        i64::try_from(units)
            .ok()
            .and_then(|u| u.checked_mul(price))
            .ok_or(BillTooLarge { meter, units })
    };
    let ai = charge(Meter::AiInsight, ai_units, rates.ai_insight_unit_price)?;
    let tx = charge(
        Meter::TransactionVolume,
        tx_blocks,
        rates.transaction_block_price,
    )?;
    let total = plan
        .price
        .checked_add(ai)
        .and_then(|t| t.checked_add(tx))
        .ok_or(BillTooLarge {
            meter: Meter::TransactionVolume,
            units: tx_blocks,
        })?;
    Ok(Bill {
        currency: catalog.currency(),
        base: plan.price,
        ai_insight_overage_units: ai_units,
        ai_insight_overage: ai,
        transaction_volume_overage_blocks: tx_blocks,
        transaction_volume_overage: tx,
        total,
    })
}

#[cfg(test)]
mod tests;
