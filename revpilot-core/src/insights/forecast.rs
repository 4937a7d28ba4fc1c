//! MRR forecast: Holt's linear trend (double exponential smoothing) on month-end MRR, with the
//! smoothing parameters chosen by the least squared one-step-ahead error on a fixed grid, and an
//! approximate 95 % prediction interval. Decimal arithmetic throughout: no floats touch money.

use rust_decimal::{Decimal, MathematicalOps};
use serde::{Deserialize, Serialize};

/// The grid of level smoothing values tried.
const ALPHAS: [u32; 9] = [10, 20, 30, 40, 50, 60, 70, 80, 90];
/// The grid of trend smoothing values tried.
const BETAS: [u32; 6] = [5, 10, 20, 30, 50, 70];
/// z for a two-sided 95 % interval.
const Z95: Decimal = Decimal::from_parts(196, 0, 0, false, 2);

/// A fitted model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holt {
    /// Level smoothing.
    pub alpha: Decimal,
    /// Trend smoothing.
    pub beta: Decimal,
    /// Last level.
    pub level: Decimal,
    /// Last trend, per month.
    pub trend: Decimal,
    /// Root mean squared one-step-ahead error (the interval's scale).
    pub rmse: Decimal,
}

/// One forecast horizon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Months ahead.
    pub months: u32,
    /// Expected MRR (never below 0).
    pub mrr: Decimal,
    /// Lower bound of the 95 % interval (never below 0).
    pub low: Decimal,
    /// Upper bound.
    pub high: Decimal,
}

fn pct(p: u32) -> Decimal {
    Decimal::new(i64::from(p), 2)
}

/// Runs the smoothing over `y` and returns (level, trend, sum of squared one-step errors).
fn smooth(y: &[Decimal], alpha: Decimal, beta: Decimal) -> (Decimal, Decimal, Decimal) {
    let mut level = y[0];
    let mut trend = y[1] - y[0];
    let mut sse = Decimal::ZERO;
    for &v in &y[1..] {
        let predicted = level + trend;
        let e = v - predicted;
        sse += e * e;
        let new_level = alpha * v + (Decimal::ONE - alpha) * (level + trend);
        trend = beta * (new_level - level) + (Decimal::ONE - beta) * trend;
        level = new_level;
    }
    (level, trend, sse)
}

impl Holt {
    /// Fits the model to monthly values, oldest first. `None` with fewer than 3 values.
    pub fn fit(y: &[Decimal]) -> Option<Holt> {
        if y.len() < 3 {
            return None;
        }
        let mut best: Option<(Decimal, Holt)> = None;
        for a in ALPHAS {
            for b in BETAS {
                let (alpha, beta) = (pct(a), pct(b));
                let (level, trend, sse) = smooth(y, alpha, beta);
                if best.as_ref().is_none_or(|(s, _)| sse < *s) {
                    let n = Decimal::from(y.len() - 1);
                    let rmse = (sse / n).sqrt().unwrap_or(Decimal::ZERO);
                    best = Some((
                        sse,
                        Holt {
                            alpha,
                            beta,
                            level,
                            trend,
                            rmse,
                        },
                    ));
                }
            }
        }
        best.map(|(_, h)| h)
    }

    /// The forecast `months` ahead. The interval is `±1.96 x rmse x sqrt(months)`: the one-step
    /// error's spread, widening as a random walk's would (an approximation; see
    /// `docs/insights.md`).
    pub fn forecast(&self, months: u32) -> Point {
        let h = Decimal::from(months);
        let mrr = (self.level + self.trend * h).max(Decimal::ZERO);
        let spread = Z95 * self.rmse * h.sqrt().unwrap_or(Decimal::ONE);
        Point {
            months,
            mrr,
            low: (mrr - spread).max(Decimal::ZERO),
            high: mrr + spread,
        }
    }
}

/// Mean absolute percentage error of the forecast `months` ahead, refitting at every origin
/// from `min_train` values on (months whose actual MRR is 0 are skipped). `None` when no
/// origin can be tested.
pub fn backtest_mape(y: &[Decimal], min_train: usize, months: u32) -> Option<Decimal> {
    let h = usize::try_from(months).ok()?;
    let mut total = Decimal::ZERO;
    let mut count = 0u32;
    for origin in min_train.max(3)..=y.len().saturating_sub(h) {
        let Some(model) = Holt::fit(&y[..origin]) else {
            continue;
        };
        let actual = y[origin + h - 1];
        if actual.is_zero() {
            continue;
        }
        total += ((model.forecast(months).mrr - actual) / actual).abs();
        count += 1;
    }
    (count > 0).then(|| total / Decimal::from(count) * Decimal::ONE_HUNDRED)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(v: i64) -> Decimal {
        Decimal::from(v)
    }

    #[test]
    fn a_straight_line_is_forecast_exactly() {
        let y: Vec<Decimal> = (0..12).map(|i| d(1_000 + 100 * i)).collect();
        let m = Holt::fit(&y).unwrap();
        assert_eq!(m.rmse, Decimal::ZERO);
        let p = m.forecast(3);
        assert_eq!((p.mrr, p.low, p.high), (d(2_400), d(2_400), d(2_400)));
        assert_eq!(m.forecast(12).mrr, d(3_300));
        assert_eq!(backtest_mape(&y, 6, 3), Some(Decimal::ZERO));
    }

    #[test]
    fn noise_widens_the_interval_with_the_horizon_and_mrr_stays_positive() {
        let y: Vec<Decimal> = [100, 120, 90, 130, 95, 140, 100, 150, 105, 155]
            .into_iter()
            .map(d)
            .collect();
        let m = Holt::fit(&y).unwrap();
        let (p3, p12) = (m.forecast(3), m.forecast(12));
        assert!(p3.low <= p3.mrr && p3.mrr <= p3.high);
        assert!(p12.high - p12.low > p3.high - p3.low);
        let falling: Vec<Decimal> = (0..8).map(|i| d(1_000 - 150 * i)).collect();
        let p = Holt::fit(&falling).unwrap().forecast(12);
        assert_eq!((p.mrr, p.low), (Decimal::ZERO, Decimal::ZERO));
        assert!(Holt::fit(&[d(1), d(2)]).is_none());
    }
}
