//! The tier catalog: arbitrary bytes as TOML to `Catalog::from_toml`, and a catalog that loads
//! bills every tier at no usage, at its limits, just past them and at the most there can be.
//! Errors are fine (a bill too large is one), panics are not.

use revpilot_core::billing::{Catalog, Used, bill};

/// One input, as the `catalog` target and the regression replay run it.
pub(crate) fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(catalog) = Catalog::from_toml(text) else {
        return;
    };
    for plan in catalog.plans() {
        let limits = plan.limits;
        let ai = u64::from(limits.ai_insights.unwrap_or_default());
        let tx = limits.transaction_volume.unwrap_or_default();
        for used in [
            Used::default(),
            Used {
                ai_insights: ai,
                transactions: tx,
            },
            Used {
                ai_insights: ai.saturating_add(1),
                transactions: tx.saturating_add(1),
            },
            Used {
                ai_insights: u64::MAX,
                transactions: u64::MAX,
            },
        ] {
            let _ = bill(&catalog, plan.tier, &limits, used);
        }
        let _ = catalog.tier_for_price(plan.stripe_price_id.as_deref());
    }
}
