//! What-if scenarios: change prices by x %, churn by y points, new-customer growth by z %, and
//! see the MRR 3, 6 and 12 months out against the baseline.
//!
//! The projection is a flow model over the last three months' rates (as shares of the months'
//! starting MRR): each month `m' = m x (1 + new + expansion + reactivation - contraction -
//! churn)`. A scenario changes the starting MRR by the price change (every subscription
//! repriced at once, no elasticity: customers are assumed to stay), adds y points to the monthly
//! churn rate (floored at 0), and scales the new-MRR rate by (1 + z %).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::metrics::SeriesRow;

/// A scenario's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Scenario {
    /// Price change in % (10 is +10 %). At least -100.
    pub price_change_pct: Decimal,
    /// Monthly churn rate change in percentage points (1 is +1 point).
    pub churn_change_points: Decimal,
    /// New-customer MRR growth change in % (20 is +20 % new MRR). At least -100.
    pub new_growth_pct: Decimal,
}

/// A scenario that cannot be projected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// A change out of range.
    #[error("{field} must be between {min} and {max}, got {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Lowest accepted.
        min: Decimal,
        /// Highest accepted.
        max: Decimal,
        /// Given.
        value: Decimal,
    },
    /// No month with starting MRR to take rates from.
    #[error("not enough history: no month with MRR to take rates from")]
    NoHistory,
}

/// The monthly rates the projection uses, as fractions of the starting MRR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    /// New MRR.
    pub new: Decimal,
    /// Expansion and reactivation MRR.
    pub expansion: Decimal,
    /// Contraction MRR.
    pub contraction: Decimal,
    /// Churned MRR.
    pub churn: Decimal,
}

impl Rates {
    /// The rates of `rows` (monthly rows; the last three with starting MRR are used).
    ///
    /// # Errors
    /// [`ScenarioError::NoHistory`] when no row has starting MRR.
    pub fn from_rows(rows: &[SeriesRow]) -> Result<Rates, ScenarioError> {
        let recent: Vec<&SeriesRow> = rows
            .iter()
            .rev()
            .filter(|r| !r.mrr_start.is_zero())
            .take(3)
            .collect();
        let base: Decimal = recent.iter().map(|r| r.mrr_start).sum();
        if base.is_zero() {
            return Err(ScenarioError::NoHistory);
        }
        let sum = |f: fn(&SeriesRow) -> Decimal| {
            recent.iter().map(|r| f(r).abs()).sum::<Decimal>() / base
        };
        Ok(Rates {
            new: sum(|r| r.new_mrr),
            expansion: sum(|r| r.expansion_mrr + r.reactivation_mrr),
            contraction: sum(|r| r.contraction_mrr),
            churn: sum(|r| r.churned_mrr),
        })
    }
}

/// One horizon of a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projected {
    /// Months ahead.
    pub months: u32,
    /// Baseline MRR.
    pub baseline: Decimal,
    /// Scenario MRR.
    pub scenario: Decimal,
    /// `scenario - baseline`.
    pub delta: Decimal,
}

fn project(start: Decimal, r: &Rates, months: u32) -> Decimal {
    let step = Decimal::ONE + r.new + r.expansion - r.contraction - r.churn;
    let mut m = start;
    for _ in 0..months {
        m = (m * step).max(Decimal::ZERO);
    }
    m
}

fn check(field: &'static str, value: Decimal, min: i64, max: i64) -> Result<(), ScenarioError> {
    let (lo, hi) = (Decimal::from(min), Decimal::from(max));
    if value < lo || value > hi {
        return Err(ScenarioError::OutOfRange {
            field,
            min: lo,
            max: hi,
            value,
        });
    }
    Ok(())
}

/// Projects `scenario` against the baseline from MRR `start` with `rates`, at 3, 6 and 12 months
/// (amounts unrounded; round for display).
///
/// # Errors
/// [`ScenarioError::OutOfRange`]: prices from -100 % to +1000 %, churn from -100 to +100
/// points, new growth from -100 % to +1000 %.
pub fn run(
    start: Decimal,
    rates: &Rates,
    scenario: &Scenario,
) -> Result<Vec<Projected>, ScenarioError> {
    check("price_change_pct", scenario.price_change_pct, -100, 1_000)?;
    check(
        "churn_change_points",
        scenario.churn_change_points,
        -100,
        100,
    )?;
    check("new_growth_pct", scenario.new_growth_pct, -100, 1_000)?;
    let hundred = Decimal::ONE_HUNDRED;
    let changed = Rates {
        churn: (rates.churn + scenario.churn_change_points / hundred).max(Decimal::ZERO),
        new: rates.new * (Decimal::ONE + scenario.new_growth_pct / hundred),
        ..*rates
    };
    let scenario_start = start * (Decimal::ONE + scenario.price_change_pct / hundred);
    Ok([3, 6, 12]
        .into_iter()
        .map(|months| {
            let baseline = project(start, rates, months);
            let s = project(scenario_start, &changed, months);
            Projected {
                months,
                baseline,
                scenario: s,
                delta: s - baseline,
            }
        })
        .collect())
}

/// Why a metered scenario run was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The scenario is invalid (nothing is counted).
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The monthly limit (an upgrade is required), an unknown user, or the store.
    #[error(transparent)]
    Usage(#[from] crate::billing::UsageError),
}

/// One metered scenario run, as [`run_metered`] is asked for it.
#[derive(Debug, Clone, Copy)]
pub struct ScenarioRequest<'a> {
    /// Who runs it (their monthly scenario limit counts it).
    pub user: crate::ports::UserId,
    /// The connection the rows are of, recorded with the usage.
    pub connection: Option<crate::ports::ConnectionId>,
    /// The account's monthly rows; the last one's MRR is the start.
    pub rows: &'a [SeriesRow],
    /// The changes to project.
    pub scenario: &'a Scenario,
    /// The run's idempotency key: a retried run is counted once.
    pub run_id: &'a str,
    /// Now.
    pub now: chrono::DateTime<chrono::Utc>,
}

/// Runs the request's `scenario` for its `user` on the monthly `rows` of their account, counted against their
/// monthly scenario limit under `run_id`: checked first (an invalid scenario is not counted),
/// then recorded, then projected from the last row's MRR.
///
/// # Errors
/// [`RunError`].
pub async fn run_metered<S>(
    store: &S,
    catalog: &crate::billing::Catalog,
    request: ScenarioRequest<'_>,
) -> Result<Vec<Projected>, RunError>
where
    S: crate::ports::UserStore + crate::ports::UsageStore + ?Sized,
{
    let ScenarioRequest {
        user,
        connection,
        rows,
        scenario,
        run_id,
        now,
    } = request;
    // The limit first: a user with no runs left is told to upgrade, whatever the data.
    crate::billing::check_scenario(store, user, now).await?;
    let rates = Rates::from_rows(rows)?;
    let start = rows.last().map(|r| r.mrr).unwrap_or_default();
    // Validates before anything is counted.
    run(start, &rates, scenario)?;
    crate::billing::record_scenario(store, catalog, user, run_id, connection, now).await?;
    Ok(run(start, &rates, scenario)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(v: &str) -> Decimal {
        v.parse().unwrap()
    }

    fn rates() -> Rates {
        Rates {
            new: d("0.05"),
            expansion: d("0.02"),
            contraction: d("0.01"),
            churn: d("0.03"),
        }
    }

    #[test]
    fn the_baseline_compounds_the_net_rate_and_no_change_is_no_delta() {
        let p = run(d("1000"), &rates(), &Scenario::default()).unwrap();
        // 1.03^3 = 1.092727
        assert_eq!(p[0].baseline, d("1092.727000"));
        assert!(p.iter().all(|x| x.delta.is_zero()));
    }

    #[test]
    fn each_lever_moves_the_projection_the_right_way() {
        let up = run(
            d("1000"),
            &rates(),
            &Scenario {
                price_change_pct: d("10"),
                ..Scenario::default()
            },
        )
        .unwrap();
        // +10 % prices: every horizon is exactly 10 % above the baseline.
        assert!(up.iter().all(|x| x.scenario == x.baseline * d("1.1")));
        let churn = run(
            d("1000"),
            &rates(),
            &Scenario {
                churn_change_points: d("2"),
                ..Scenario::default()
            },
        )
        .unwrap();
        // 1.01^3 = 1.030301
        assert_eq!(churn[0].scenario, d("1030.301000"));
        let growth = run(
            d("1000"),
            &rates(),
            &Scenario {
                new_growth_pct: d("-100"),
                ..Scenario::default()
            },
        )
        .unwrap();
        // No new MRR: 0.98^3 = 0.941192
        assert_eq!(growth[0].scenario, d("941.192000"));
        assert!(growth[2].delta < growth[1].delta && growth[1].delta < growth[0].delta);
    }

    #[test]
    fn out_of_range_changes_name_the_field() {
        let err = run(
            d("1000"),
            &rates(),
            &Scenario {
                price_change_pct: d("-101"),
                ..Scenario::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("price_change_pct"), "{err}");
        assert_eq!(Rates::from_rows(&[]), Err(ScenarioError::NoHistory));
    }
}
