//! The other views of the engine: MRR at an instant, the movement ledger, cohorts, segmentation
//! and the per-customer diff between two rule profiles.

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::compile::{Compiled, Secs};
use super::series::{SeriesReport, SeriesRequest};
use super::timeline::Change;
use super::walk::{Group, RateTable, Scratch, Sink, Walker};
use super::{
    Engine, Error, MovementKind, SECONDS_PER_DAY, check_range, date_of, decimal_ratio, epoch_day,
};
use crate::anomaly::Anomaly;
use crate::money::{Currency, report_to_decimal};
use crate::rules::{RuleSwitch, Rules};

/// One customer's MRR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerMrr {
    /// Customer id.
    pub customer: String,
    /// MRR in the reporting currency, unrounded.
    pub mrr: Decimal,
}

/// MRR at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MrrSnapshot {
    /// Reporting currency.
    pub currency: Currency,
    /// Total MRR.
    pub total: Decimal,
    /// Every paying customer (MRR > 0), by id.
    pub customers: Vec<CustomerMrr>,
    /// Odd input, worked around.
    pub anomalies: Vec<Anomaly>,
}

/// One movement of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    /// Customer id.
    pub customer: String,
    /// Instant of the first change netted into the movement.
    pub at: DateTime<Utc>,
    /// The movement's UTC day.
    pub date: NaiveDate,
    /// Kind.
    pub kind: MovementKind,
    /// Size, positive for every kind (churn and contraction are losses of this size).
    pub amount: Decimal,
    /// Customer MRR before, at the day's rate.
    pub mrr_before: Decimal,
    /// Customer MRR after, at the day's rate.
    pub mrr_after: Decimal,
    /// Subscriptions whose MRR changed, sorted.
    pub subscriptions: Vec<String>,
}

/// Every movement in a date range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Reporting currency.
    pub currency: Currency,
    /// Movements ordered by day, then customer id, then instant.
    pub movements: Vec<Movement>,
    /// Odd input, worked around.
    pub anomalies: Vec<Anomaly>,
}

/// One cohort: customers whose first month with MRR > 0 is `cohort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CohortRow {
    /// First day of the cohort's month.
    pub cohort: NaiveDate,
    /// Customers in the cohort.
    pub customers: u64,
    /// `mrr[k]`: the cohort's MRR at the end of month `cohort + k`, at that month-end's rate.
    pub mrr: Vec<Decimal>,
    /// `paying[k]`: cohort customers still paying at the end of month `cohort + k`.
    pub paying: Vec<u64>,
    /// `mrr_retention[k]`: `mrr[k]` / month-0 MRR, both at month `k`'s rate (constant currency).
    pub mrr_retention: Vec<Option<Decimal>>,
}

/// Customers by month of first payment, and their MRR retention by month offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CohortTable {
    /// Reporting currency.
    pub currency: Currency,
    /// One row per month in the range, oldest first (empty cohorts included).
    pub rows: Vec<CohortRow>,
    /// Odd input, worked around.
    pub anomalies: Vec<Anomaly>,
}

/// What to segment a series by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Segmentation {
    /// By price: a subscription's MRR counts under its main price (its largest item), so a plan
    /// change moves the subscription between segments.
    Plan,
    /// By subscription currency.
    Currency,
    /// By customer country (`(none)` when unknown).
    Country,
    /// By a customer metadata key (`(none)` when absent).
    Metadata(String),
}

/// One segment's series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The segment's value (price id, currency, country or metadata value).
    pub key: String,
    /// The series restricted to the segment.
    pub report: SeriesReport,
}

/// One customer whose MRR differs between two profiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerDiff {
    /// Customer id.
    pub customer: String,
    /// MRR under the first profile.
    pub mrr_a: Decimal,
    /// MRR under the second profile.
    pub mrr_b: Decimal,
    /// The switches that, taken alone from the second profile, change this customer's MRR. When
    /// no single switch does (the difference needs several together), all differing switches.
    pub causes: Vec<RuleSwitch>,
}

/// Which customers' MRR differs between two rule profiles on a day, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileDiff {
    /// The day (MRR at its end).
    pub date: NaiveDate,
    /// First profile.
    pub a: Rules,
    /// Second profile.
    pub b: Rules,
    /// Total MRR under `a`.
    pub total_a: Decimal,
    /// Total MRR under `b`.
    pub total_b: Decimal,
    /// The customers that differ, by id.
    pub customers: Vec<CustomerDiff>,
}

/// Each customer's MRR at one instant, and the anomalies met.
struct Snapshot {
    values: Vec<i128>,
    anomalies: Vec<Anomaly>,
}

/// A sink for walks that only need each customer's final state.
struct Noop;

impl Sink for Noop {
    fn movement(&mut self, _g: &Group<'_, '_>, _r: &RateTable) {}
}

impl Engine<'_> {
    /// Each customer's MRR (reporting fixed point) at `horizon` under `rules`, restricted to
    /// `only` when given (other customers read 0).
    fn snapshot_values(
        &self,
        rules: Rules,
        horizon: Secs,
        only: &[u32],
    ) -> Result<Snapshot, Error> {
        let day = (horizon - 1).div_euclid(SECONDS_PER_DAY);
        let rates = self.rate_table(day, 1)?;
        let c = &*self.compiled;
        let walker = Walker {
            compiled: c,
            rules,
            base_day: day,
            horizon,
            rates: &rates,
            filter: None,
        };
        let mut values = vec![0i128; c.customers.len()];
        let mut used = vec![false; c.currencies.len()];
        let mut scratch = walker.scratch();
        let mut visit = |cust: u32| -> Result<(), Error> {
            walker.walk(cust, &mut scratch, &mut Noop)?;
            values[cust as usize] = walker.report_value(scratch.state.iter().copied(), 0);
            for (cur, v) in &scratch.state {
                used[*cur as usize] |= *v != 0;
            }
            Ok(())
        };
        if only.is_empty() {
            (0..c.customers.len() as u32).try_for_each(&mut visit)?;
        } else {
            only.iter().copied().try_for_each(&mut visit)?;
        }
        let mut anomalies = c.anomalies.clone();
        anomalies.append(&mut scratch.anomalies);
        for (k, cur) in c.currencies.iter().enumerate() {
            if used[k] && rates.get(k as u16, 0) == 0 {
                let d = date_of(day);
                anomalies.push(Anomaly::MissingFxRate {
                    currency: *cur,
                    from: d,
                    to: d,
                });
            }
        }
        anomalies.sort();
        anomalies.dedup();
        Ok(Snapshot { values, anomalies })
    }

    pub(crate) fn snapshot_at(&self, horizon: Secs) -> Result<MrrSnapshot, Error> {
        let snap = self.snapshot_values(self.rules, horizon, &[])?;
        let c = &*self.compiled;
        let mut customers: Vec<CustomerMrr> = snap
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0)
            .map(|(i, v)| CustomerMrr {
                customer: c.customers[i].id.to_owned(),
                mrr: report_to_decimal(*v),
            })
            .collect();
        customers.sort_by(|a, b| a.customer.cmp(&b.customer));
        Ok(MrrSnapshot {
            currency: self.currency,
            total: report_to_decimal(snap.values.iter().sum()),
            customers,
            anomalies: snap.anomalies,
        })
    }

    /// Every movement dated `from..=to`, traceable to its customer and subscriptions.
    ///
    /// # Errors
    /// [`Error::InvalidRange`], [`Error::RangeTooLong`], [`Error::UnknownReportingCurrency`],
    /// [`Error::AmountsTooLarge`].
    pub fn movements(&self, from: NaiveDate, to: NaiveDate) -> Result<Ledger, Error> {
        self.check()?;
        check_range(from, to)?;
        let (to, cut) = self.cut(from, to)?;
        let (from_day, to_day) = check_range(from, to)?;
        let days = (to_day - from_day + 1) as usize;
        let rates = self.rate_table(from_day, days)?;
        let c = &*self.compiled;
        let walker = Walker {
            compiled: c,
            rules: self.rules,
            base_day: from_day,
            horizon: (to_day + 1) * SECONDS_PER_DAY,
            rates: &rates,
            filter: None,
        };
        struct LedgerSink<'c, 'a> {
            compiled: &'c Compiled<'a>,
            from: Secs,
            out: Vec<Movement>,
            used: Vec<(u16, usize)>,
        }
        impl Sink for LedgerSink<'_, '_> {
            fn movement(&mut self, g: &Group<'_, '_>, rates: &RateTable) {
                if g.at < self.from {
                    return;
                }
                let value = |pick: fn(&(u16, i128, i128)) -> i128| -> i128 {
                    g.values
                        .iter()
                        .map(|v| pick(v) * i128::from(rates.get(v.0, g.day)))
                        .sum()
                };
                let before = value(|v| v.1);
                let after = value(|v| v.2);
                for v in g.values {
                    if v.1 != v.2 || v.2 != 0 {
                        self.used.push((v.0, g.day));
                    }
                }
                let mut subscriptions: Vec<String> = g
                    .changes
                    .iter()
                    .map(|ch| self.compiled.subs[ch.sub as usize].src.id.clone())
                    .collect();
                subscriptions.sort();
                subscriptions.dedup();
                let at = DateTime::<Utc>::from_timestamp(g.at, 0).unwrap_or_default();
                self.out.push(Movement {
                    customer: self.compiled.customers[g.customer as usize].id.to_owned(),
                    at,
                    date: at.date_naive(),
                    kind: g.kind,
                    amount: report_to_decimal((after - before).abs()),
                    mrr_before: report_to_decimal(before),
                    mrr_after: report_to_decimal(after),
                    subscriptions,
                });
            }
        }
        let mut sink = LedgerSink {
            compiled: c,
            from: from_day * SECONDS_PER_DAY,
            out: Vec::new(),
            used: Vec::new(),
        };
        let walked = walker.walk_all(&mut sink)?;
        sink.out
            .sort_by(|a, b| (a.date, &a.customer, a.at).cmp(&(b.date, &b.customer, b.at)));
        let mut anomalies = c.anomalies.clone();
        anomalies.extend(walked);
        anomalies.extend(cut);
        sink.used.sort_unstable();
        sink.used.dedup();
        for (cur, day) in sink.used {
            if rates.get(cur, day) == 0 {
                let d = date_of(from_day + day as i64);
                anomalies.push(Anomaly::MissingFxRate {
                    currency: c.currencies[cur as usize],
                    from: d,
                    to: d,
                });
            }
        }
        anomalies.sort();
        anomalies.dedup();
        Ok(Ledger {
            currency: self.currency,
            movements: sink.out,
            anomalies,
        })
    }

    /// Cohorts of customers by month of first payment (first month with MRR > 0), for cohort
    /// months from `from`'s month to `to`'s month.
    ///
    /// # Errors
    /// As [`Engine::movements`].
    pub fn cohorts(&self, from: NaiveDate, to: NaiveDate) -> Result<CohortTable, Error> {
        self.check()?;
        check_range(from, to)?;
        // The month of the as-of instant is read at the as-of day, not at its end.
        let (to, cut) = self.cut(from, to)?;
        let last = self.as_of().map(|a| epoch_day(a.date_naive()));
        let first_month = from.with_day(1).ok_or(Error::DateOutOfRange(from))?;
        let mut month_ends = Vec::new(); // epoch days
        let mut month = first_month;
        while month <= to {
            let next = month
                .checked_add_months(Months::new(1))
                .ok_or(Error::DateOutOfRange(month))?;
            month_ends.push(last.map_or(epoch_day(next) - 1, |l| l.min(epoch_day(next) - 1)));
            month = next;
        }
        let base_day = epoch_day(first_month) - 1;
        let last_day = *month_ends.last().unwrap_or(&base_day);
        let days = (last_day - base_day + 1) as usize;
        let rates = self.rate_table(base_day, days)?;
        let c = &*self.compiled;
        let months = month_ends.len();
        let ncur = c.currencies.len();
        // Day index -> month index (day 0 is history before the first month).
        let mut month_of = vec![usize::MAX; days];
        let mut m = 0;
        for (d, slot) in month_of.iter_mut().enumerate().skip(1) {
            while base_day + d as i64 > month_ends[m] {
                m += 1;
            }
            *slot = m;
        }
        struct CohortSink<'m> {
            month_of: &'m [usize],
            months: usize,
            ncur: usize,
            members: Vec<u64>,
            /// `[cohort][currency][month]` native deltas.
            native: Vec<i128>,
            /// `[cohort][month]` paying deltas.
            paying: Vec<i64>,
        }
        impl Sink for CohortSink<'_> {
            fn movement(&mut self, _g: &Group<'_, '_>, _r: &RateTable) {}
            fn customer_done(&mut self, _customer: u32, s: &Scratch<'_>) {
                let Some(first) = s.records.iter().find(|r| r.paying) else {
                    return;
                };
                if first.day == 0 {
                    return; // First paid before the table's first month.
                }
                let cohort = self.month_of[first.day];
                self.members[cohort] += 1;
                let ncs = s.currencies.len();
                let mut prev_values = vec![0i128; ncs];
                let mut prev_paying = false;
                for r in &s.records {
                    let m = self.month_of[r.day.max(1)];
                    for (k, &cur) in s.currencies.iter().enumerate() {
                        let v = s.record_values[r.values_at + k];
                        let slot = (cohort * self.ncur + cur as usize) * self.months + m;
                        self.native[slot] += v - prev_values[k];
                        prev_values[k] = v;
                    }
                    if r.paying != prev_paying {
                        self.paying[cohort * self.months + m] += if r.paying { 1 } else { -1 };
                        prev_paying = r.paying;
                    }
                }
            }
        }
        let walker = Walker {
            compiled: c,
            rules: self.rules,
            base_day,
            horizon: (last_day + 1) * SECONDS_PER_DAY,
            rates: &rates,
            filter: None,
        };
        let mut sink = CohortSink {
            month_of: &month_of,
            months,
            ncur,
            members: vec![0; months],
            native: vec![0; months * ncur * months],
            paying: vec![0; months * months],
        };
        let walked = walker.walk_all(&mut sink)?;
        let mut rows = Vec::with_capacity(months);
        for cohort in 0..months {
            let mut totals = vec![0i128; ncur];
            let mut paying = 0i64;
            let mut row = CohortRow {
                cohort: date_of(if cohort == 0 {
                    base_day + 1
                } else {
                    month_ends[cohort - 1] + 1
                }),
                customers: sink.members[cohort],
                mrr: Vec::new(),
                paying: Vec::new(),
                mrr_retention: Vec::new(),
            };
            let mut base_native = vec![0i128; ncur];
            for (m, &end) in month_ends.iter().enumerate() {
                for (cur, total) in totals.iter_mut().enumerate() {
                    *total += sink.native[(cohort * ncur + cur) * months + m];
                }
                paying += sink.paying[cohort * months + m];
                if m < cohort {
                    continue;
                }
                if m == cohort {
                    base_native.clone_from(&totals);
                }
                let day = (end - base_day) as usize;
                let at_rate = |v: &[i128]| -> Decimal {
                    report_to_decimal(
                        v.iter()
                            .enumerate()
                            .map(|(cur, x)| x * i128::from(rates.get(cur as u16, day)))
                            .sum(),
                    )
                };
                let mrr = at_rate(&totals);
                row.mrr.push(mrr);
                row.paying.push(paying.max(0) as u64);
                row.mrr_retention
                    .push(decimal_ratio(mrr, at_rate(&base_native)));
            }
            rows.push(row);
        }
        let mut anomalies = c.anomalies.clone();
        anomalies.extend(walked);
        anomalies.extend(cut);
        anomalies.sort();
        anomalies.dedup();
        Ok(CohortTable {
            currency: self.currency,
            rows,
            anomalies,
        })
    }

    /// The series of each segment, segments ordered by key.
    ///
    /// # Errors
    /// As [`Engine::series`].
    pub fn segmented_series(
        &self,
        req: &SeriesRequest,
        by: &Segmentation,
    ) -> Result<Vec<Segment>, Error> {
        let c = &*self.compiled;
        const NONE: &str = "(none)";
        let mut out = Vec::new();
        match by {
            Segmentation::Plan => {
                let mut keys: Vec<&str> = c
                    .subs
                    .iter()
                    .flat_map(|s| s.src.items.iter().map(|i| i.price.id.as_str()))
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                for key in keys {
                    let f = move |_: &Compiled<'_>, ch: &Change<'_>| ch.price == key;
                    out.push(Segment {
                        key: key.to_owned(),
                        report: self.series_filtered(req, Some(&f))?,
                    });
                }
            }
            Segmentation::Currency => {
                let mut keys: Vec<(Currency, u16)> = c
                    .currencies
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (*k, i as u16))
                    .collect();
                keys.sort_unstable();
                for (key, cur) in keys {
                    if !c.subs.iter().any(|s| s.currency == cur) {
                        continue;
                    }
                    let f = move |_: &Compiled<'_>, ch: &Change<'_>| ch.currency == cur;
                    out.push(Segment {
                        key: key.to_string(),
                        report: self.series_filtered(req, Some(&f))?,
                    });
                }
            }
            Segmentation::Country | Segmentation::Metadata(_) => {
                let key_of = |i: usize| -> &str {
                    let src = c.customers[i].src;
                    match by {
                        Segmentation::Country => src.and_then(|s| s.country.as_deref()),
                        Segmentation::Metadata(k) => src.and_then(|s| s.metadata.get(k)),
                        _ => None,
                    }
                    .unwrap_or(NONE)
                };
                let mut keys: Vec<&str> = (0..c.customers.len()).map(key_of).collect();
                let per_customer = keys.clone();
                keys.sort_unstable();
                keys.dedup();
                let index: Vec<u32> = per_customer
                    .iter()
                    .map(|k| keys.binary_search(k).unwrap_or(0) as u32)
                    .collect();
                for (ki, key) in keys.iter().enumerate() {
                    let index = &index;
                    let f = move |c: &Compiled<'_>, ch: &Change<'_>| {
                        index[c.subs[ch.sub as usize].customer as usize] == ki as u32
                    };
                    out.push(Segment {
                        key: (*key).to_owned(),
                        report: self.series_filtered(req, Some(&f))?,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Which customers' MRR at the end of `date` differs between this engine's rules and `other`,
    /// and which switch causes each difference.
    ///
    /// # Errors
    /// [`Error::UnknownReportingCurrency`], [`Error::AmountsTooLarge`], [`Error::DateOutOfRange`].
    pub fn diff_profiles(&self, other: &Rules, date: NaiveDate) -> Result<ProfileDiff, Error> {
        self.check()?;
        let horizon = (epoch_day(date) + 1) * SECONDS_PER_DAY;
        let a = self.snapshot_values(self.rules, horizon, &[])?.values;
        let b = self.snapshot_values(*other, horizon, &[])?.values;
        let switches = self.rules.differences(other);
        let c = &*self.compiled;
        let differing: Vec<u32> = (0..a.len() as u32)
            .filter(|i| a[*i as usize] != b[*i as usize])
            .collect();
        let mut flipped = Vec::with_capacity(switches.len());
        if !differing.is_empty() {
            for s in &switches {
                let rules = self.rules.with_switch_from(*s, other);
                flipped.push(self.snapshot_values(rules, horizon, &differing)?.values);
            }
        }
        let mut customers = Vec::with_capacity(differing.len());
        for i in differing {
            let i = i as usize;
            let mut causes: Vec<RuleSwitch> = switches
                .iter()
                .zip(&flipped)
                .filter(|(_, v)| v[i] != a[i])
                .map(|(s, _)| *s)
                .collect();
            if causes.is_empty() {
                causes.clone_from(&switches);
            }
            customers.push(CustomerDiff {
                customer: c.customers[i].id.to_owned(),
                mrr_a: report_to_decimal(a[i]),
                mrr_b: report_to_decimal(b[i]),
                causes,
            });
        }
        customers.sort_by(|x, y| x.customer.cmp(&y.customer));
        Ok(ProfileDiff {
            date,
            a: self.rules,
            b: *other,
            total_a: report_to_decimal(a.iter().sum()),
            total_b: report_to_decimal(b.iter().sum()),
            customers,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn epoch_days_round_trip() {
        let d = chrono::NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        assert_eq!(super::date_of(super::epoch_day(d)), d);
    }
}
