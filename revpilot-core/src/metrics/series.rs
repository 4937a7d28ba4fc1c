//! Daily and monthly metric series.
//!
//! One walk over all customers scatters movements into per-day, per-currency arrays; per-customer
//! interval arithmetic turns churn windows and the NRR/GRR cohort into difference arrays. Rows are
//! then read off prefix sums, so the cost is O(E log k + days x currencies).

use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::walk::{Group, RateTable, Scratch, Sink, Walker};
use super::{
    Engine, Error, MovementKind, check_range, date_of, decimal_ratio, epoch_day, year_before,
};
use crate::anomaly::Anomaly;
use crate::money::{Currency, report_to_decimal};
use crate::rules::{ChurnRateRule, LtvChurn, Rules};

/// Row granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One row per day; movement sums, rates and revenue cover the trailing 30 days.
    Day,
    /// One row per calendar month; sums and rates cover the month (up to `to` for the last one).
    Month,
}

/// The trailing window of a daily row, in days.
pub const TRAILING_DAYS: i64 = 30;

/// What series to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesRequest {
    /// First day (inclusive).
    pub from: NaiveDate,
    /// Last day (inclusive).
    pub to: NaiveDate,
    /// Daily or monthly rows.
    pub granularity: Granularity,
}

impl SeriesRequest {
    /// A request for `from..=to` at `granularity`.
    pub fn new(from: NaiveDate, to: NaiveDate, granularity: Granularity) -> Self {
        SeriesRequest {
            from,
            to,
            granularity,
        }
    }
}

/// One row of a series: the `metrics_snapshots` columns and more.
///
/// Money is in the reporting currency's major units, unrounded (12 decimals); use
/// [`Currency::round`] for display. `MRR = mrr_start + new + reactivation + expansion -
/// contraction - churned + fx` holds exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesRow {
    /// The row's day: the end of its period.
    pub date: NaiveDate,
    /// First day of the period the sums and rates cover.
    pub period_start: NaiveDate,
    /// MRR at the end of the day before `period_start`.
    pub mrr_start: Decimal,
    /// MRR at the end of `date`.
    pub mrr: Decimal,
    /// 12 x MRR.
    pub arr: Decimal,
    /// Cash: succeeded payments minus refunds in the period.
    pub total_revenue: Decimal,
    /// Paying customers (MRR > 0) at the end of the day before `period_start`.
    pub customers_start: u64,
    /// Paying customers at the end of `date`.
    pub total_customers: u64,
    /// Subscriptions contributing MRR > 0 at the end of `date`.
    pub active_subscriptions: u64,
    /// Customers counted in the customer churn rate's numerator.
    pub churned_customers: u64,
    /// ARPA: MRR / paying customers.
    pub arpu: Option<Decimal>,
    /// ARPA / customer churn rate, the rate chosen by [`Rules::ltv_churn`] (by default the
    /// trailing six months'); `None` when that rate is 0 or not yet known.
    pub ltv: Option<Decimal>,
    /// Churned customers / `customers_start`.
    pub customer_churn_rate: Option<Decimal>,
    /// Gross revenue churn: (churned + contraction) / `mrr_start`.
    pub revenue_churn_rate: Option<Decimal>,
    /// Net revenue churn: (churned + contraction - expansion - reactivation) / `mrr_start`.
    pub net_revenue_churn_rate: Option<Decimal>,
    /// MRR from new customers.
    pub new_mrr: Decimal,
    /// MRR added by existing customers.
    pub expansion_mrr: Decimal,
    /// MRR lost by customers who stay (a positive number).
    pub contraction_mrr: Decimal,
    /// MRR lost by customers who left (a positive number).
    pub churned_mrr: Decimal,
    /// MRR from customers who came back.
    pub reactivation_mrr: Decimal,
    /// MRR change from exchange rates alone.
    pub fx_mrr: Decimal,
    /// (new + expansion + reactivation) / (contraction + churned); `None` when nothing was lost.
    pub quick_ratio: Option<Decimal>,
    /// Net revenue retention over the trailing 12 months.
    pub nrr: Option<Decimal>,
    /// Gross revenue retention over the trailing 12 months.
    pub grr: Option<Decimal>,
    /// The row's period (its day, or its calendar month) ends after the account's as-of
    /// instant: the figures so far, not the period's.
    #[serde(default)]
    pub partial: bool,
}

/// A series and what the engine noticed while computing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesReport {
    /// Reporting currency.
    pub currency: Currency,
    /// Rules applied.
    pub rules: Rules,
    /// The rows, oldest first.
    pub rows: Vec<SeriesRow>,
    /// Odd input, worked around.
    pub anomalies: Vec<Anomaly>,
}

/// Day-index geometry of one series computation.
pub(crate) struct Frame {
    pub(crate) base_day: i64,
    pub(crate) days: usize,
    /// `lag[d]`: the day index of date(d) minus 12 months (may be negative).
    pub(crate) lag: Vec<i64>,
    /// `first_with_lag_at_least[x]`: the first d with `lag[d] >= x` (or `days`).
    pub(crate) lag_inverse: Vec<usize>,
    /// Periods `(start, end)` of the rows, inclusive day indices.
    pub(crate) periods: Vec<(usize, usize)>,
}

impl Frame {
    pub(crate) fn new(req: &SeriesRequest) -> Result<Frame, Error> {
        let (from_day, to_day) = check_range(req.from, req.to)?;
        let early = req
            .from
            .checked_sub_days(chrono::Days::new(62))
            .ok_or(super::Error::DateOutOfRange(req.from))?;
        let base_day = epoch_day(year_before(early)?);
        let days = (to_day - base_day + 1) as usize;
        let mut lag = Vec::with_capacity(days);
        for d in 0..days {
            let date = date_of(base_day + d as i64);
            lag.push(epoch_day(year_before(date)?) - base_day);
        }
        let mut lag_inverse = vec![days; days];
        let mut d = 0usize;
        for (x, slot) in lag_inverse.iter_mut().enumerate() {
            while d < days && lag[d] < x as i64 {
                d += 1;
            }
            *slot = d;
        }
        let idx = |day: i64| (day - base_day) as usize;
        let periods = match req.granularity {
            Granularity::Day => (from_day..=to_day)
                .map(|d| (idx(d - TRAILING_DAYS + 1), idx(d)))
                .collect(),
            Granularity::Month => {
                let mut out = Vec::new();
                let mut month = req
                    .from
                    .with_day(1)
                    .ok_or(Error::DateOutOfRange(req.from))?;
                while month <= req.to {
                    let next = month
                        .checked_add_months(chrono::Months::new(1))
                        .ok_or(Error::DateOutOfRange(month))?;
                    let end = epoch_day(next) - 1;
                    out.push((idx(epoch_day(month)), idx(end.min(to_day))));
                    month = next;
                }
                out
            }
        };
        Ok(Frame {
            base_day,
            days,
            lag,
            lag_inverse,
            periods,
        })
    }
}

/// Inclusive day intervals, sorted and disjoint.
type Intervals = Vec<(usize, usize)>;

fn union_of_windows(points: &[usize], width: usize, last: usize, out: &mut Intervals) {
    out.clear();
    for &p in points {
        let end = (p + width - 1).min(last);
        match out.last_mut() {
            Some(l) if p <= l.1 + 1 => l.1 = l.1.max(end),
            _ => out.push((p, end)),
        }
    }
}

fn intersect(a: &Intervals, b: &Intervals, out: &mut Intervals) {
    out.clear();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo <= hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 { i += 1 } else { j += 1 }
    }
}

fn subtract(a: &Intervals, b: &Intervals, out: &mut Intervals) {
    out.clear();
    let mut j = 0;
    for &(s, e) in a {
        let mut s = s;
        while j < b.len() && b[j].1 < s {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 <= e {
            if b[k].0 > s {
                out.push((s, b[k].0 - 1));
            }
            s = s.max(b[k].1 + 1);
            k += 1;
        }
        if s <= e {
            out.push((s, e));
        }
    }
}

/// Index of the last record with `day <= x`.
fn record_at(s: &Scratch, x: usize) -> Option<usize> {
    s.records.partition_point(|r| r.day <= x).checked_sub(1)
}

fn paying_at(s: &Scratch, x: i64) -> bool {
    x >= 0 && record_at(s, x as usize).is_some_and(|r| s.records[r].paying)
}

fn value_at(s: &Scratch, k: usize, x: i64) -> i128 {
    if x < 0 {
        return 0;
    }
    record_at(s, x as usize).map_or(0, |r| s.record_values[s.records[r].values_at + k])
}

/// Accumulates everything the rows need.
pub(crate) struct SeriesSink<'f> {
    frame: &'f Frame,
    churn_rule: ChurnRateRule,
    granularity: Granularity,
    currencies: usize,
    /// `[kind][currency][day]` native deltas.
    movements: Vec<i128>,
    customers: Vec<i64>,
    subscriptions: Vec<i64>,
    churned: Vec<i64>,
    nrr: Vec<i128>,
    grr: Vec<i128>,
    tmp: [Intervals; 4],
    candidates: Vec<usize>,
}

impl<'f> SeriesSink<'f> {
    pub(crate) fn new(
        frame: &'f Frame,
        rules: &Rules,
        granularity: Granularity,
        currencies: usize,
    ) -> Self {
        let n = frame.days;
        SeriesSink {
            frame,
            churn_rule: rules.churn_rate,
            granularity,
            currencies,
            movements: vec![0; MovementKind::ALL.len() * currencies * n],
            customers: vec![0; n + 1],
            subscriptions: vec![0; n + 1],
            churned: vec![0; n + 1],
            nrr: vec![0; currencies * (n + 1)],
            grr: vec![0; currencies * (n + 1)],
            tmp: Default::default(),
            candidates: Vec::new(),
        }
    }

    fn slot(&self, kind: MovementKind, currency: u16, day: usize) -> usize {
        ((kind as usize) * self.currencies + currency as usize) * self.frame.days + day
    }

    fn churn_counts(&mut self, s: &Scratch<'_>) {
        if s.churn_days.is_empty() {
            return;
        }
        let last = self.frame.days - 1;
        match self.granularity {
            Granularity::Day => {
                let w = super::series::TRAILING_DAYS as usize;
                let [windows, gate, out, tmp] = &mut self.tmp;
                union_of_windows(&s.churn_days, w, last, windows);
                match self.churn_rule {
                    ChurnRateRule::PayingAtStart => {
                        // Paying at the end of day D - 30, as intervals of D.
                        gate.clear();
                        for (i, r) in s.records.iter().enumerate() {
                            if !r.paying {
                                continue;
                            }
                            let end = s.records.get(i + 1).map_or(last, |n| n.day - 1);
                            let (lo, hi) = (r.day + w, end.saturating_add(w).min(last));
                            if lo <= hi {
                                match gate.last_mut() {
                                    Some(g) if lo <= g.1 + 1 => g.1 = g.1.max(hi),
                                    _ => gate.push((lo, hi)),
                                }
                            }
                        }
                        intersect(windows, gate, out);
                    }
                    ChurnRateRule::ExcludeStartedInPeriod => {
                        union_of_windows(&s.start_days, w, last, tmp);
                        subtract(windows, tmp, out);
                    }
                }
                for &(lo, hi) in out.iter() {
                    self.churned[lo] += 1;
                    self.churned[hi + 1] -= 1;
                }
            }
            Granularity::Month => {
                for (m, &(start, end)) in self.frame.periods.iter().enumerate() {
                    let churned = s.churn_days.iter().any(|d| (start..=end).contains(d));
                    if !churned {
                        continue;
                    }
                    let counted = match self.churn_rule {
                        ChurnRateRule::PayingAtStart => paying_at(s, start as i64 - 1),
                        ChurnRateRule::ExcludeStartedInPeriod => {
                            !s.start_days.iter().any(|d| (start..=end).contains(d))
                        }
                    };
                    if counted {
                        // Month rows read `churned[m]` directly.
                        self.churned[m] += 1;
                    }
                }
            }
        }
    }

    /// NRR/GRR numerators: for day D, the customer's MRR at D (NRR) or min(MRR at D, MRR at
    /// lag D) (GRR) if the customer was paying at lag D, per currency, as difference arrays.
    fn retention(&mut self, s: &Scratch<'_>) {
        if s.records.is_empty() {
            return;
        }
        let n = self.frame.days;
        self.candidates.clear();
        for r in &s.records {
            self.candidates.push(r.day);
            self.candidates.push(self.frame.lag_inverse[r.day]);
        }
        self.candidates.sort_unstable();
        self.candidates.dedup();
        for (k, &cur) in s.currencies.iter().enumerate() {
            let (mut prev_f, mut prev_g) = (0i128, 0i128);
            for &d in &self.candidates {
                if d >= n {
                    break;
                }
                let lag = self.frame.lag[d];
                let (f, g) = if paying_at(s, lag) {
                    let now = value_at(s, k, d as i64);
                    (now, now.min(value_at(s, k, lag)))
                } else {
                    (0, 0)
                };
                let base = cur as usize * (n + 1);
                self.nrr[base + d] += f - prev_f;
                self.grr[base + d] += g - prev_g;
                prev_f = f;
                prev_g = g;
            }
        }
    }
}

impl Sink for SeriesSink<'_> {
    fn movement(&mut self, g: &Group<'_, '_>, _rates: &RateTable) {
        let delta: i32 = match g.kind {
            MovementKind::New | MovementKind::Reactivation => 1,
            MovementKind::Churn => -1,
            _ => 0,
        };
        self.customers[g.day] += i64::from(delta);
        for &(cur, before, after) in g.values {
            if before != after {
                let slot = self.slot(g.kind, cur, g.day);
                self.movements[slot] += after - before;
            }
        }
    }

    fn subscription(&mut self, day: usize, delta: i32) {
        self.subscriptions[day] += i64::from(delta);
    }

    fn customer_done(&mut self, _customer: u32, s: &Scratch<'_>) {
        self.churn_counts(s);
        self.retention(s);
    }
}

fn prefix_i64(v: &[i64]) -> Vec<i64> {
    let mut acc = 0;
    v.iter()
        .map(|x| {
            acc += x;
            acc
        })
        .collect()
}

/// Periods the trailing LTV rate covers: the row's and the five before it.
const LTV_PERIODS: usize = 6;

/// The start of the widened request the trailing LTV needs, and how many lead-in rows it adds;
/// `None` when the calendar or the range limit does not allow it (the first rows then have no
/// LTV).
fn lead_in(req: &SeriesRequest) -> Option<(NaiveDate, usize)> {
    let lead = LTV_PERIODS - 1;
    let from = match req.granularity {
        Granularity::Month => req
            .from
            .with_day(1)?
            .checked_sub_months(chrono::Months::new(lead as u32))?,
        Granularity::Day => req
            .from
            .checked_sub_days(chrono::Days::new(lead as u64 * TRAILING_DAYS as u64))?,
    };
    check_range(from, req.to).ok()?;
    let rows = match req.granularity {
        Granularity::Month => lead,
        Granularity::Day => lead * TRAILING_DAYS as usize,
    };
    Some((from, rows))
}

/// LTV = ARPA / the trailing six months' customer churn: the churned customers of six
/// consecutive periods (calendar months, or 30-day windows 30 days apart) over the customers
/// paying at the start of each. `None` when a period had nobody paying at its start (not enough
/// history) or nobody churned in all six.
fn trailing_ltv(rows: &mut [SeriesRow], granularity: Granularity) {
    let step = match granularity {
        Granularity::Month => 1,
        Granularity::Day => TRAILING_DAYS as usize,
    };
    let span = (LTV_PERIODS - 1) * step;
    let ltv: Vec<Option<Decimal>> = (0..rows.len())
        .map(|i| {
            let first = i.checked_sub(span)?;
            let periods = (first..=i).step_by(step).map(|j| &rows[j]);
            let (mut churned, mut start) = (0u64, 0u64);
            for p in periods {
                if p.customers_start == 0 {
                    return None;
                }
                churned += p.churned_customers;
                start += p.customers_start;
            }
            let arpu = rows[i].arpu?;
            decimal_ratio(arpu * Decimal::from(start), Decimal::from(churned))
        })
        .collect();
    for (row, ltv) in rows.iter_mut().zip(ltv) {
        row.ltv = ltv;
    }
}

impl Engine<'_> {
    /// Computes a daily or monthly series.
    ///
    /// # Errors
    /// [`Error::InvalidRange`], [`Error::RangeTooLong`], [`Error::UnknownReportingCurrency`],
    /// [`Error::AmountsTooLarge`].
    pub fn series(&self, req: &SeriesRequest) -> Result<SeriesReport, Error> {
        self.series_filtered(req, None)
    }

    /// The series, cut at the as-of instant, with LTV from the rate [`Rules::ltv_churn`] picks:
    /// for the trailing rate the rows are computed from six periods earlier, and those lead-in
    /// rows dropped.
    pub(crate) fn series_filtered(
        &self,
        req: &SeriesRequest,
        filter: Option<super::walk::Filter<'_>>,
    ) -> Result<SeriesReport, Error> {
        self.check()?;
        check_range(req.from, req.to)?;
        let (to, cut) = self.cut(req.from, req.to)?;
        let req = SeriesRequest { to, ..*req };
        let trailing = self.rules.ltv_churn == LtvChurn::TrailingSixMonths;
        let lead = if trailing { lead_in(&req) } else { None };
        let (wide, lead_rows) = match lead {
            Some((from, rows)) => (SeriesRequest { from, ..req }, rows),
            None => (req, 0),
        };
        let mut report = self.series_rows(&wide, filter)?;
        if trailing {
            trailing_ltv(&mut report.rows, req.granularity);
        }
        report.rows.drain(..lead_rows.min(report.rows.len()));
        for row in &mut report.rows {
            let end = match req.granularity {
                Granularity::Day => row.date.succ_opt(),
                Granularity::Month => row.period_start.checked_add_months(chrono::Months::new(1)),
            };
            row.partial = self.is_partial(end.map_or(i64::MAX, epoch_day));
        }
        if let Some(a) = cut {
            report.anomalies.push(a);
            report.anomalies.sort();
        }
        Ok(report)
    }

    fn series_rows(
        &self,
        req: &SeriesRequest,
        filter: Option<super::walk::Filter<'_>>,
    ) -> Result<SeriesReport, Error> {
        let frame = Frame::new(req)?;
        let rates = self.rate_table(frame.base_day, frame.days)?;
        let c = &*self.compiled;
        let ncur = c.currencies.len();
        let n = frame.days;
        let walker = Walker {
            compiled: c,
            rules: self.rules,
            base_day: frame.base_day,
            horizon: (frame.base_day + n as i64) * super::SECONDS_PER_DAY,
            rates: &rates,
            filter,
        };
        let mut sink = SeriesSink::new(&frame, &self.rules, req.granularity, ncur);
        let walked = walker.walk_all(&mut sink)?;

        // Native MRR per currency per day, and reporting values per day.
        let kinds = MovementKind::ALL.len();
        let mut totals = vec![0i128; ncur * n];
        let mut per_kind = vec![0i128; kinds * n];
        for cur in 0..ncur {
            let mut acc = 0i128;
            for d in 0..n {
                for k in 0..kinds {
                    let v = sink.movements[(k * ncur + cur) * n + d];
                    acc += v;
                    per_kind[k * n + d] += v * i128::from(rates.get(cur as u16, d));
                }
                totals[cur * n + d] = acc;
            }
        }
        let mut cash = vec![0i128; n];
        for ev in &c.cash {
            let day = ev.at.div_euclid(super::SECONDS_PER_DAY) - frame.base_day;
            if (0..n as i64).contains(&day) {
                let d = day as usize;
                cash[d] += i128::from(ev.amount) * i128::from(rates.get(ev.currency, d));
            }
        }
        let mrr_rep = |d: usize| -> i128 {
            (0..ncur)
                .map(|cur| totals[cur * n + d] * i128::from(rates.get(cur as u16, d)))
                .sum()
        };
        let prefix = |v: &[i128]| -> Vec<i128> {
            let mut acc = 0;
            v.iter()
                .map(|x| {
                    acc += x;
                    acc
                })
                .collect()
        };
        let kind_prefix: Vec<Vec<i128>> = (0..kinds)
            .map(|k| prefix(&per_kind[k * n..(k + 1) * n]))
            .collect();
        let cash_prefix = prefix(&cash);
        let range_sum = |p: &[i128], a: usize, b: usize| p[b] - if a == 0 { 0 } else { p[a - 1] };
        let customers = prefix_i64(&sink.customers[..n]);
        let subscriptions = prefix_i64(&sink.subscriptions[..n]);
        let churned_daily = prefix_i64(&sink.churned[..n]);
        let nrr_prefix: Vec<Vec<i128>> = (0..ncur)
            .map(|cur| prefix(&sink.nrr[cur * (n + 1)..cur * (n + 1) + n]))
            .collect();
        let grr_prefix: Vec<Vec<i128>> = (0..ncur)
            .map(|cur| prefix(&sink.grr[cur * (n + 1)..cur * (n + 1) + n]))
            .collect();

        let mut rows = Vec::with_capacity(frame.periods.len());
        let mut need_from = n;
        for (p, &(a, b)) in frame.periods.iter().enumerate() {
            let lag = frame.lag[b];
            need_from = need_from.min(a - 1).min(lag.max(0) as usize);
            let sum =
                |k: MovementKind| report_to_decimal(range_sum(&kind_prefix[k as usize], a, b));
            let mrr_start = report_to_decimal(mrr_rep(a - 1));
            let mrr = report_to_decimal(mrr_rep(b));
            let new = sum(MovementKind::New);
            let reactivation = sum(MovementKind::Reactivation);
            let expansion = sum(MovementKind::Expansion);
            let contraction = -sum(MovementKind::Contraction);
            let churned = -sum(MovementKind::Churn);
            // The remainder is the exchange-rate effect; computed from the rounded figures so the
            // identity holds exactly on what the row shows.
            let fx = mrr - mrr_start - new - reactivation - expansion + contraction + churned;
            let customers_start = customers[a - 1].max(0) as u64;
            let total_customers = customers[b].max(0) as u64;
            let churned_customers = match req.granularity {
                Granularity::Day => churned_daily[b],
                Granularity::Month => sink.churned[p],
            }
            .max(0) as u64;
            let customer_churn_rate = decimal_ratio(
                Decimal::from(churned_customers),
                Decimal::from(customers_start),
            );
            let arpu = decimal_ratio(mrr, Decimal::from(total_customers));
            let ltv = match (arpu, customer_churn_rate) {
                (Some(arpu), Some(rate)) if !rate.is_zero() => decimal_ratio(arpu, rate),
                _ => None,
            };
            let lost = churned + contraction;
            let gained = new + expansion + reactivation;
            let lag_rep = |d: usize| -> Decimal {
                report_to_decimal(
                    (0..ncur)
                        .map(|cur| {
                            let then = if lag >= 0 {
                                totals[cur * n + lag as usize]
                            } else {
                                0
                            };
                            then * i128::from(rates.get(cur as u16, d))
                        })
                        .sum(),
                )
            };
            let retained = |pre: &[Vec<i128>]| -> Decimal {
                report_to_decimal(
                    (0..ncur)
                        .map(|cur| pre[cur][b] * i128::from(rates.get(cur as u16, b)))
                        .sum(),
                )
            };
            let base = lag_rep(b);
            rows.push(SeriesRow {
                date: date_of(frame.base_day + b as i64),
                period_start: date_of(frame.base_day + a as i64),
                mrr_start,
                mrr,
                arr: mrr * Decimal::from(12),
                total_revenue: report_to_decimal(range_sum(&cash_prefix, a, b)),
                customers_start,
                total_customers,
                active_subscriptions: subscriptions[b].max(0) as u64,
                churned_customers,
                arpu,
                ltv,
                customer_churn_rate,
                revenue_churn_rate: decimal_ratio(lost, mrr_start),
                net_revenue_churn_rate: decimal_ratio(lost - expansion - reactivation, mrr_start),
                new_mrr: new,
                expansion_mrr: expansion,
                contraction_mrr: contraction,
                churned_mrr: churned,
                reactivation_mrr: reactivation,
                fx_mrr: fx,
                quick_ratio: decimal_ratio(gained, lost),
                nrr: decimal_ratio(retained(&nrr_prefix), base),
                grr: decimal_ratio(retained(&grr_prefix), base),
                partial: false,
            });
        }

        let mut anomalies = c.anomalies.clone();
        anomalies.extend(walked);
        self.missing_rate_anomalies(
            &frame,
            &rates,
            &totals,
            &sink.movements,
            need_from,
            &mut anomalies,
        );
        anomalies.sort();
        anomalies.dedup();
        Ok(SeriesReport {
            currency: self.currency,
            rules: self.rules,
            rows,
            anomalies,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn missing_rate_anomalies(
        &self,
        frame: &Frame,
        rates: &RateTable,
        totals: &[i128],
        movements: &[i128],
        need_from: usize,
        out: &mut Vec<Anomaly>,
    ) {
        let c = &*self.compiled;
        let n = frame.days;
        let ncur = c.currencies.len();
        let mut cash_used = vec![false; ncur * n];
        for ev in &c.cash {
            let day = ev.at.div_euclid(super::SECONDS_PER_DAY) - frame.base_day;
            if (0..n as i64).contains(&day) {
                cash_used[ev.currency as usize * n + day as usize] = true;
            }
        }
        for cur in 0..ncur {
            let mut open: Option<(usize, usize)> = None;
            let flush = |r: Option<(usize, usize)>, out: &mut Vec<Anomaly>| {
                if let Some((s, e)) = r {
                    out.push(Anomaly::MissingFxRate {
                        currency: c.currencies[cur],
                        from: date_of(frame.base_day + s as i64),
                        to: date_of(frame.base_day + e as i64),
                    });
                }
            };
            for d in need_from..n {
                let used = totals[cur * n + d] != 0
                    || (0..MovementKind::ALL.len())
                        .any(|k| movements[(k * ncur + cur) * n + d] != 0)
                    || cash_used[cur * n + d];
                if used && rates.get(cur as u16, d) == 0 {
                    open = match open {
                        Some((s, e)) if e + 1 == d => Some((s, d)),
                        other => {
                            flush(other, out);
                            Some((d, d))
                        }
                    };
                }
            }
            flush(open, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_algebra() {
        let mut out = Vec::new();
        union_of_windows(&[0, 10, 35], 30, 100, &mut out);
        assert_eq!(
            out,
            vec![(0, 39), (35, 64)]
                .into_iter()
                .fold(Vec::new(), |mut v: Intervals, x| {
                    match v.last_mut() {
                        Some(l) if x.0 <= l.1 + 1 => l.1 = l.1.max(x.1),
                        _ => v.push(x),
                    }
                    v
                })
        );
        assert_eq!(out, vec![(0, 64)]);
        let mut i = Vec::new();
        intersect(&vec![(0, 10), (20, 30)], &vec![(5, 25)], &mut i);
        assert_eq!(i, vec![(5, 10), (20, 25)]);
        let mut s = Vec::new();
        subtract(&vec![(0, 30)], &vec![(5, 10), (20, 40)], &mut s);
        assert_eq!(s, vec![(0, 4), (11, 19)]);
        subtract(&vec![(0, 3), (8, 9)], &vec![], &mut s);
        assert_eq!(s, vec![(0, 3), (8, 9)]);
    }
}
