//! Walking one customer's changes in time order, netting those inside the grouping window (and on
//! the same UTC day) into movements, and handing each movement to a [`Sink`].

use super::compile::{Compiled, Secs, SubScratch};
use super::timeline::Change;
use super::{Error, MovementKind};
use crate::anomaly::Anomaly;
use crate::rules::Rules;

pub(crate) const DAY: Secs = 86_400;

/// Daily exchange rates into the reporting currency, `[currency][day]`, fixed point; 0 = missing.
pub(crate) struct RateTable {
    pub(crate) rates: Vec<Vec<i64>>,
    /// The largest rate of each currency over the table, as a plain multiplier.
    pub(crate) max: Vec<f64>,
}

/// The most, in major units of the reporting currency, that the amounts a walk sums may add up
/// to. Far above any real account (10^16 a month), far below where an `i128` at 10^-20 could
/// overflow (1.7 x 10^18) even after summing movements over every day of a series.
const MAGNITUDE_LIMIT: f64 = 1e16;

impl RateTable {
    #[inline]
    pub(crate) fn get(&self, currency: u16, day: usize) -> i64 {
        self.rates[currency as usize][day]
    }
}

/// Which changes count: a segment of the account.
pub(crate) type Filter<'f> = &'f (dyn Fn(&Compiled<'_>, &Change<'_>) -> bool + Sync);

/// A netted movement of one customer, as the walker hands it to a sink.
pub(crate) struct Group<'s, 'a> {
    pub(crate) customer: u32,
    pub(crate) at: Secs,
    /// Day index relative to the walk's base day (clamped to 0 for earlier history).
    pub(crate) day: usize,
    pub(crate) kind: MovementKind,
    /// `(currency, before, after)` native values of the customer, for every currency it has.
    pub(crate) values: &'s [(u16, i128, i128)],
    /// The changes netted into this movement.
    pub(crate) changes: &'s [Change<'a>],
}

/// A customer's state at the end of a day on which it changed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DayRecord {
    pub(crate) day: usize,
    pub(crate) paying: bool,
    /// Offset into [`Scratch::record_values`]; one value per entry of [`Scratch::currencies`].
    pub(crate) values_at: usize,
}

/// Per-customer working memory, reused across customers.
#[derive(Default)]
pub(crate) struct Scratch<'a> {
    pub(crate) changes: Vec<Change<'a>>,
    sub: SubScratch<'a>,
    /// The customer's currencies and running native values.
    pub(crate) state: Vec<(u16, i128)>,
    group_values: Vec<(u16, i128, i128)>,
    sub_values: Vec<(u32, i64)>,
    pub(crate) currencies: Vec<u16>,
    pub(crate) records: Vec<DayRecord>,
    pub(crate) record_values: Vec<i128>,
    pub(crate) churn_days: Vec<usize>,
    pub(crate) start_days: Vec<usize>,
    /// Anomalies of the subscriptions loaded so far.
    pub(crate) anomalies: Vec<Anomaly>,
    /// Running bound of every amount summed so far (see [`MAGNITUDE_LIMIT`]).
    magnitude: f64,
}

/// Receives what the walker finds.
pub(crate) trait Sink {
    /// A netted movement.
    fn movement(&mut self, group: &Group<'_, '_>, rates: &RateTable);
    /// A subscription started (+1) or stopped (-1) contributing MRR on `day`.
    fn subscription(&mut self, _day: usize, _delta: i32) {}
    /// The customer's walk is over; `scratch` holds its day records and movement days.
    fn customer_done(&mut self, _customer: u32, _scratch: &Scratch<'_>) {}
}

/// Walks customers under one rule profile up to an instant.
pub(crate) struct Walker<'e, 'a> {
    pub(crate) compiled: &'e Compiled<'a>,
    pub(crate) rules: Rules,
    /// Epoch day of day index 0.
    pub(crate) base_day: i64,
    /// Changes at or after this instant are ignored.
    pub(crate) horizon: Secs,
    pub(crate) rates: &'e RateTable,
    pub(crate) filter: Option<Filter<'e>>,
}

impl<'a> Walker<'_, 'a> {
    #[inline]
    pub(crate) fn day_index(&self, at: Secs) -> usize {
        (at.div_euclid(DAY) - self.base_day).max(0) as usize
    }

    /// Value of native amounts in the reporting currency on `day`, exactly.
    pub(crate) fn report_value(
        &self,
        values: impl Iterator<Item = (u16, i128)>,
        day: usize,
    ) -> i128 {
        values
            .map(|(c, v)| v * i128::from(self.rates.get(c, day)))
            .sum()
    }

    /// Working memory for a walk, its magnitude bound starting with the account's cash.
    pub(crate) fn scratch(&self) -> Scratch<'a> {
        let cash: f64 = self
            .compiled
            .cash_magnitude
            .iter()
            .zip(&self.rates.max)
            .map(|(m, r)| m * r)
            .sum();
        Scratch {
            magnitude: cash,
            ..Scratch::default()
        }
    }

    /// Walks every customer into `sink`; returns the anomalies of the subscriptions walked.
    ///
    /// # Errors
    /// [`Error::AmountsTooLarge`] when the account's amounts could overflow an exact sum; the sink
    /// has then seen only customers whose amounts were within bounds.
    pub(crate) fn walk_all(&self, sink: &mut impl Sink) -> Result<Vec<Anomaly>, Error> {
        let mut scratch = self.scratch();
        for c in 0..self.compiled.customers.len() as u32 {
            self.walk(c, &mut scratch, sink)?;
        }
        Ok(scratch.anomalies)
    }

    /// Walks one customer into `sink`.
    ///
    /// # Errors
    /// [`Error::AmountsTooLarge`], before anything of this customer reaches the sink.
    pub(crate) fn walk(
        &self,
        customer: u32,
        s: &mut Scratch<'a>,
        sink: &mut impl Sink,
    ) -> Result<(), Error> {
        s.changes.clear();
        for sub in self.compiled.subs_of(customer) {
            let before = s.changes.len();
            let bound = self.compiled.emit_changes(
                sub as u32,
                &self.rules,
                &mut s.changes,
                &mut s.sub,
                &mut s.anomalies,
            );
            let currency = self.compiled.subs[sub].currency as usize;
            s.magnitude += bound * self.rates.max[currency];
            if s.magnitude > MAGNITUDE_LIMIT {
                return Err(Error::AmountsTooLarge(self.compiled.currencies[currency]));
            }
            let mut kept = before;
            for i in before..s.changes.len() {
                let ch = s.changes[i];
                if ch.at < self.horizon && self.filter.is_none_or(|f| f(self.compiled, &ch)) {
                    s.changes[kept] = ch;
                    kept += 1;
                }
            }
            s.changes.truncate(kept);
        }
        s.state.clear();
        s.sub_values.clear();
        s.currencies.clear();
        s.records.clear();
        s.record_values.clear();
        s.churn_days.clear();
        s.start_days.clear();
        if s.changes.is_empty() {
            sink.customer_done(customer, s);
            return Ok(());
        }
        s.changes
            .sort_unstable_by_key(|c| (c.at, c.sub, c.price, c.delta));
        for ch in &s.changes {
            if !s.currencies.contains(&ch.currency) {
                s.currencies.push(ch.currency);
                s.state.push((ch.currency, 0));
            }
        }

        let window = i64::from(self.rules.grouping_window_minutes) * 60;
        let mut paid_before = false;
        let mut i = 0;
        let n = s.changes.len();
        while i < n {
            let t0 = s.changes[i].at;
            let day0 = t0.div_euclid(DAY);
            let mut j = i;
            while j < n && s.changes[j].at - t0 <= window && s.changes[j].at.div_euclid(DAY) == day0
            {
                j += 1;
            }
            let day = self.day_index(t0);
            s.group_values.clear();
            s.group_values
                .extend(s.state.iter().map(|(c, v)| (*c, *v, *v)));
            for k in i..j {
                let ch = s.changes[k];
                if let Some(g) = s.group_values.iter_mut().find(|g| g.0 == ch.currency) {
                    g.2 += i128::from(ch.delta);
                }
                let sv = match s.sub_values.iter_mut().find(|(sub, _)| *sub == ch.sub) {
                    Some((_, v)) => v,
                    None => {
                        s.sub_values.push((ch.sub, 0));
                        &mut s.sub_values.last_mut().expect("just pushed").1
                    }
                };
                let was = *sv > 0;
                *sv += ch.delta;
                let is = *sv > 0;
                if was != is {
                    sink.subscription(self.day_index(ch.at), if is { 1 } else { -1 });
                }
            }
            for (st, g) in s.state.iter_mut().zip(&s.group_values) {
                st.1 = g.2;
            }
            let paying_before = s.group_values.iter().any(|g| g.1 > 0);
            let paying_after = s.group_values.iter().any(|g| g.2 > 0);
            let changed = s.group_values.iter().any(|g| g.1 != g.2);
            let kind = match (paying_before, paying_after) {
                (false, true) if paid_before => Some(MovementKind::Reactivation),
                (false, true) => Some(MovementKind::New),
                (true, false) => Some(MovementKind::Churn),
                (true, true) if changed => {
                    let delta = if s.group_values.len() == 1 {
                        s.group_values[0].2 - s.group_values[0].1
                    } else {
                        let d =
                            self.report_value(s.group_values.iter().map(|g| (g.0, g.2 - g.1)), day);
                        if d != 0 {
                            d
                        } else {
                            s.group_values.iter().map(|g| g.2 - g.1).sum()
                        }
                    };
                    Some(if delta >= 0 {
                        MovementKind::Expansion
                    } else {
                        MovementKind::Contraction
                    })
                }
                _ => None,
            };
            if let Some(kind) = kind {
                sink.movement(
                    &Group {
                        customer,
                        at: t0,
                        day,
                        kind,
                        values: &s.group_values,
                        changes: &s.changes[i..j],
                    },
                    self.rates,
                );
                match kind {
                    MovementKind::Churn => s.churn_days.push(day),
                    MovementKind::New | MovementKind::Reactivation => s.start_days.push(day),
                    _ => {}
                }
            }
            paid_before |= paying_after;
            if changed {
                let values_at = match s.records.last() {
                    Some(r) if r.day == day => r.values_at,
                    _ => {
                        let at = s.record_values.len();
                        s.record_values.resize(at + s.state.len(), 0);
                        s.records.push(DayRecord {
                            day,
                            paying: false,
                            values_at: at,
                        });
                        at
                    }
                };
                for (k, st) in s.state.iter().enumerate() {
                    s.record_values[values_at + k] = st.1;
                }
                if let Some(r) = s.records.last_mut() {
                    r.paying = paying_after;
                }
            }
            i = j;
        }
        sink.customer_done(customer, s);
        Ok(())
    }
}
