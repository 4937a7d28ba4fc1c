//! The dashboard's charts as geometry for inline SVG: the server computes every coordinate, the
//! templates only place them, so the charts read without JavaScript. Every mark carries its value
//! (`data-*` attributes and a `<title>`), which the browser test compares with `/api/metrics`.

use chrono::NaiveDate;
use revpilot_core::Currency;
use revpilot_core::metrics::{CohortRow, SeriesRow};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

/// Chart width, SVG units.
pub const WIDTH: f64 = 720.0;
/// Chart height, SVG units.
pub const HEIGHT: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// An axis label.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    /// Position along its axis.
    pub at: f64,
    /// Text.
    pub label: String,
}

/// One point of the MRR line.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// X.
    pub x: f64,
    /// Y.
    pub y: f64,
    /// The row's day.
    pub date: NaiveDate,
    /// MRR, rounded to the currency's minor unit.
    pub value: Decimal,
}

/// The MRR line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    /// `x,y x,y ...` for a `<polyline>`.
    pub polyline: String,
    /// The points.
    pub points: Vec<Point>,
    /// Y axis labels.
    pub y_ticks: Vec<Tick>,
    /// X axis labels.
    pub x_ticks: Vec<Tick>,
}

/// One segment of a stacked bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Left.
    pub x: f64,
    /// Top.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
    /// The movement (`new`, `expansion`, `reactivation`, `contraction`, `churned`).
    pub kind: &'static str,
    /// The month's row day.
    pub date: NaiveDate,
    /// The amount, rounded; contraction and churn negative.
    pub value: Decimal,
}

/// The stacked MRR movements bar chart: gains above the zero line, losses below.
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    /// The segments.
    pub bars: Vec<Bar>,
    /// Y of the zero line.
    pub zero_y: f64,
    /// Y axis labels.
    pub y_ticks: Vec<Tick>,
    /// X axis labels.
    pub x_ticks: Vec<Tick>,
}

/// One cell of the cohort heat map.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Left.
    pub x: f64,
    /// Top.
    pub y: f64,
    /// `rgb(...)`, darker for higher retention.
    pub fill: String,
    /// Retention in percent, one decimal.
    pub percent: String,
    /// The cohort's month.
    pub cohort: NaiveDate,
    /// Months since the cohort's first.
    pub offset: usize,
}

/// The cohort heat map: a row per cohort month, a column per month since.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatMap {
    /// The cells with a retention.
    pub cells: Vec<Cell>,
    /// Row labels: `(y, "2026-01 (42)")`.
    pub rows: Vec<Tick>,
    /// Column labels: `(x, "M3")`.
    pub columns: Vec<Tick>,
    /// Cell size.
    pub cell: f64,
    /// The map's height.
    pub height: f64,
}

fn f(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(0.0)
}

/// A compact money label: `12.3k`, `1.2M`.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn y_ticks(lo: f64, hi: f64, y: impl Fn(f64) -> f64) -> Vec<Tick> {
    (0..=4)
        .map(|i| {
            let v = lo + (hi - lo) * f64::from(i) / 4.0;
            Tick {
                at: y(v),
                label: short(v),
            }
        })
        .collect()
}

fn x_ticks(dates: &[NaiveDate], x: impl Fn(usize) -> f64) -> Vec<Tick> {
    let step = dates.len().div_ceil(8).max(1);
    dates
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0)
        .map(|(i, d)| Tick {
            at: x(i),
            label: d.format("%Y-%m").to_string(),
        })
        .collect()
}

/// The MRR line over `rows`.
pub fn mrr_line(rows: &[SeriesRow], currency: Currency) -> LineChart {
    let values: Vec<Decimal> = rows.iter().map(|r| currency.round(r.mrr)).collect();
    let hi = values.iter().copied().map(f).fold(0.0, f64::max).max(1.0) * 1.1;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let n = rows.len().max(2) - 1;
    let x = |i: usize| LEFT + plot_w * i as f64 / n as f64;
    let y = |v: f64| TOP + plot_h * (1.0 - v / hi);
    let points: Vec<Point> = rows
        .iter()
        .zip(&values)
        .enumerate()
        .map(|(i, (r, v))| Point {
            x: x(i),
            y: y(f(*v)),
            date: r.date,
            value: *v,
        })
        .collect();
    let polyline = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", p.x, p.y))
        .collect::<Vec<_>>()
        .join(" ");
    let dates: Vec<NaiveDate> = rows.iter().map(|r| r.date).collect();
    LineChart {
        polyline,
        points,
        y_ticks: y_ticks(0.0, hi, y),
        x_ticks: x_ticks(&dates, x),
    }
}

/// The stacked movements per row (month).
pub fn movements(rows: &[SeriesRow], currency: Currency) -> BarChart {
    let gains = |r: &SeriesRow| {
        [
            ("new", currency.round(r.new_mrr)),
            ("expansion", currency.round(r.expansion_mrr)),
            ("reactivation", currency.round(r.reactivation_mrr)),
        ]
    };
    let losses = |r: &SeriesRow| {
        [
            ("contraction", -currency.round(r.contraction_mrr)),
            ("churned", -currency.round(r.churned_mrr)),
        ]
    };
    let hi = rows
        .iter()
        .map(|r| gains(r).iter().map(|(_, v)| f(*v)).sum::<f64>())
        .fold(0.0, f64::max)
        .max(1.0);
    let lo = rows
        .iter()
        .map(|r| losses(r).iter().map(|(_, v)| f(*v)).sum::<f64>())
        .fold(0.0, f64::min);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let span = hi - lo;
    let y = |v: f64| TOP + plot_h * (hi - v) / span;
    let slot = plot_w / rows.len().max(1) as f64;
    let w = (slot * 0.7).max(1.0);
    let x = |i: usize| LEFT + slot * i as f64 + (slot - w) / 2.0;
    let mut bars = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let mut up = 0.0;
        for (kind, v) in gains(r) {
            let h = f(v);
            if h > 0.0 {
                bars.push(Bar {
                    x: x(i),
                    y: y(up + h),
                    w,
                    h: y(up) - y(up + h),
                    kind,
                    date: r.date,
                    value: v,
                });
                up += h;
            }
        }
        let mut down = 0.0;
        for (kind, v) in losses(r) {
            let h = f(v);
            if h < 0.0 {
                bars.push(Bar {
                    x: x(i),
                    y: y(down),
                    w,
                    h: y(down + h) - y(down),
                    kind,
                    date: r.date,
                    value: v,
                });
                down += h;
            }
        }
    }
    let dates: Vec<NaiveDate> = rows.iter().map(|r| r.date).collect();
    BarChart {
        bars,
        zero_y: y(0.0),
        y_ticks: y_ticks(lo, hi, y),
        x_ticks: x_ticks(&dates, |i| x(i) + w / 2.0),
    }
}

/// The cohorts' MRR retention.
pub fn cohorts(rows: &[CohortRow]) -> HeatMap {
    const CELL: f64 = 30.0;
    const LABEL_W: f64 = 96.0;
    const HEAD: f64 = 18.0;
    let mut cells = Vec::new();
    let mut labels = Vec::new();
    let mut widest = 0;
    for (r, row) in rows.iter().enumerate() {
        let y = HEAD + CELL * r as f64;
        labels.push(Tick {
            at: y + CELL / 2.0,
            label: format!("{} ({})", row.cohort.format("%Y-%m"), row.customers),
        });
        for (k, retention) in row.mrr_retention.iter().enumerate() {
            let Some(ratio) = retention else { continue };
            widest = widest.max(k + 1);
            let p = f(*ratio).clamp(0.0, 1.5);
            // From pale (50 % and less) to deep blue (100 % and more): the range retention
            // lives in, so differences between cohorts show.
            let t = ((p - 0.5) / 0.5).clamp(0.0, 1.0);
            let shade = |from: f64, to: f64| (from + (to - from) * t).round() as u8;
            cells.push(Cell {
                x: LABEL_W + CELL * k as f64,
                y,
                fill: format!(
                    "rgb({},{},{})",
                    shade(239.0, 30.0),
                    shade(246.0, 90.0),
                    shade(255.0, 200.0)
                ),
                percent: format!("{:.1}", f(*ratio) * 100.0),
                cohort: row.cohort,
                offset: k,
            });
        }
    }
    let columns = (0..widest)
        .map(|k| Tick {
            at: LABEL_W + CELL * k as f64 + CELL / 2.0,
            label: format!("M{k}"),
        })
        .collect();
    HeatMap {
        cells,
        rows: labels,
        columns,
        cell: CELL,
        height: HEAD + CELL * rows.len() as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(date: NaiveDate, mrr: i64, new: i64, churned: i64) -> SeriesRow {
        SeriesRow {
            date,
            period_start: date,
            mrr_start: Decimal::ZERO,
            mrr: Decimal::from(mrr),
            arr: Decimal::from(mrr * 12),
            total_revenue: Decimal::ZERO,
            customers_start: 0,
            total_customers: 0,
            active_subscriptions: 0,
            churned_customers: 0,
            arpu: None,
            ltv: None,
            customer_churn_rate: None,
            revenue_churn_rate: None,
            net_revenue_churn_rate: None,
            new_mrr: Decimal::from(new),
            expansion_mrr: Decimal::ZERO,
            contraction_mrr: Decimal::ZERO,
            churned_mrr: Decimal::from(churned),
            reactivation_mrr: Decimal::ZERO,
            fx_mrr: Decimal::ZERO,
            quick_ratio: None,
            nrr: None,
            grr: None,
            partial: false,
        }
    }

    fn day(m: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, m, 28).unwrap_or_default()
    }

    #[test]
    fn the_line_rises_with_mrr_and_stays_inside_the_plot() {
        let rows = [
            row(day(1), 0, 0, 0),
            row(day(2), 500, 0, 0),
            row(day(3), 1000, 0, 0),
        ];
        let c = mrr_line(&rows, Currency::USD);
        assert_eq!(c.points.len(), 3);
        assert!(c.points[0].y > c.points[1].y && c.points[1].y > c.points[2].y);
        assert!(
            c.points
                .iter()
                .all(|p| p.y >= TOP && p.y <= HEIGHT - BOTTOM)
        );
        assert_eq!(c.points[2].value, Decimal::from(1000));
        assert_eq!(c.polyline.split(' ').count(), 3);
    }

    #[test]
    fn gains_stand_above_the_zero_line_and_losses_below() {
        let rows = [row(day(1), 0, 300, 100), row(day(2), 0, 0, 0)];
        let c = movements(&rows, Currency::USD);
        assert_eq!(c.bars.len(), 2, "an empty month draws nothing");
        let new = &c.bars[0];
        let churned = &c.bars[1];
        assert_eq!((new.kind, churned.kind), ("new", "churned"));
        assert!((new.y + new.h - c.zero_y).abs() < 1e-9);
        assert!((churned.y - c.zero_y).abs() < 1e-9);
        assert!(
            (new.h / churned.h - 3.0).abs() < 1e-9,
            "heights in proportion"
        );
        assert_eq!(churned.value, Decimal::from(-100));
    }

    #[test]
    fn each_known_retention_is_one_cell() {
        let rows = [CohortRow {
            cohort: day(1),
            customers: 4,
            mrr: vec![Decimal::ONE; 3],
            paying: vec![4, 3, 3],
            mrr_retention: vec![Some(Decimal::ONE), Some(Decimal::new(75, 2)), None],
        }];
        let h = cohorts(&rows);
        assert_eq!(h.cells.len(), 2);
        assert_eq!(h.cells[1].percent, "75.0");
        assert_eq!(h.columns.len(), 2);
        assert_eq!(h.rows[0].label, "2026-01 (4)");
    }
}
