//! The revenue-metrics engine: MRR at any instant, the movement ledger, daily and monthly series,
//! cohorts, segmentation and the per-customer diff between two rule profiles.
//!
//! Definitions are in `docs/metrics.md`; this module implements them exactly. The engine works in
//! integer fixed point (see [`crate::money`]), so the identity
//! `MRR_end = MRR_start + new + reactivation + expansion - contraction - churn + fx` holds to the
//! last digit on every row, and computation costs O(E log k + days) for E timeline entries
//! (k = entries per customer), never days x customers.

mod compile;
mod owned;
mod series;
mod timeline;
mod views;
mod walk;

use std::sync::Arc;

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::anomaly::Anomaly;
use crate::fx::{FxRates, NoFx};
use crate::model::Account;
use crate::money::{Currency, to_rate};
use crate::rules::Rules;
use compile::Compiled;
use walk::{DAY, RateTable};

pub use owned::OwnedEngine;
pub use series::{Granularity, SeriesReport, SeriesRequest, SeriesRow, TRAILING_DAYS};
pub use views::{
    CohortRow, CohortTable, CustomerDiff, CustomerMrr, Ledger, Movement, MrrSnapshot, ProfileDiff,
    Segment, Segmentation,
};

/// The kind of an MRR movement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovementKind {
    /// 0 -> >0 for a customer who never paid before.
    New,
    /// 0 -> >0 for a customer who paid before.
    Reactivation,
    /// >0 -> larger.
    Expansion,
    /// >0 -> smaller >0.
    Contraction,
    /// >0 -> 0, valued at the MRR before.
    Churn,
}

impl MovementKind {
    pub(crate) const ALL: [MovementKind; 5] = [
        MovementKind::New,
        MovementKind::Reactivation,
        MovementKind::Expansion,
        MovementKind::Contraction,
        MovementKind::Churn,
    ];

    /// The snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            MovementKind::New => "new",
            MovementKind::Reactivation => "reactivation",
            MovementKind::Expansion => "expansion",
            MovementKind::Contraction => "contraction",
            MovementKind::Churn => "churn",
        }
    }
}

/// What a metrics request can get wrong. Odd *data* is never an error: it is an [`Anomaly`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `from` is after `to`.
    #[error("invalid date range: {from} is after {to}")]
    InvalidRange {
        /// Start of the range.
        from: NaiveDate,
        /// End of the range.
        to: NaiveDate,
    },
    /// The range is longer than the engine's limit of 100 years.
    #[error("date range {from}..{to} is longer than 100 years")]
    RangeTooLong {
        /// Start of the range.
        from: NaiveDate,
        /// End of the range.
        to: NaiveDate,
    },
    /// The date is outside what the calendar arithmetic supports.
    #[error("date {0} is out of range")]
    DateOutOfRange(NaiveDate),
    /// The reporting currency is not an ISO 4217 currency with a minor unit.
    #[error("unknown reporting currency {0}")]
    UnknownReportingCurrency(Currency),
    /// The range starts after the account's as-of instant: nothing is known about it yet.
    #[error(
        "no data after {as_of}: the range starting {from} is wholly after the account's as-of instant"
    )]
    AfterAsOf {
        /// Start of the range.
        from: NaiveDate,
        /// The instant the account's data runs to.
        as_of: DateTime<Utc>,
    },
    /// The account's amounts are so large that exact sums could overflow.
    #[error("amounts in {0} are too large to be summed exactly (over 10^16 a month)")]
    AmountsTooLarge(Currency),
}

static NO_FX: NoFx = NoFx;

/// The metrics engine over one account, one rule profile and one reporting currency.
///
/// Building it compiles the account once (indexing, pricing every item); every query after that
/// is a pass over the compiled data. [`Engine::with_rules`] shares the compiled account.
#[derive(Clone)]
pub struct Engine<'a> {
    compiled: Arc<Compiled<'a>>,
    rules: Rules,
    currency: Currency,
    fx: &'a (dyn FxRates + Sync),
    /// Unix seconds the account's data runs to; nothing is reported past it.
    as_of: Option<i64>,
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("rules", &self.rules)
            .field("currency", &self.currency)
            .field("as_of", &self.as_of)
            .field("customers", &self.compiled.customers.len())
            .field("subscriptions", &self.compiled.subs.len())
            .finish()
    }
}

pub(crate) fn epoch_day(d: NaiveDate) -> i64 {
    i64::from(d.num_days_from_ce()) - 719_163
}

pub(crate) fn date_of(epoch_day: i64) -> NaiveDate {
    i32::try_from(epoch_day + 719_163)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .unwrap_or(NaiveDate::MAX)
}

impl<'a> Engine<'a> {
    /// Compiles `account` for queries under `rules`, reporting in `currency`, with no exchange
    /// rates (foreign-currency revenue is then reported as missing rates).
    pub fn new(account: &'a Account, rules: Rules, currency: Currency) -> Self {
        Engine {
            compiled: Arc::new(Compiled::new(account)),
            rules,
            currency,
            fx: &NO_FX,
            as_of: None,
        }
    }

    /// The same engine with exchange rates from `fx`.
    pub fn with_fx(mut self, fx: &'a (dyn FxRates + Sync)) -> Self {
        self.fx = fx;
        self
    }

    /// An engine over another account with these rules, currency and exchange rates (for a
    /// variant of the same account, such as one without discounts).
    pub fn for_account<'b>(&self, account: &'b Account) -> Engine<'b>
    where
        'a: 'b,
    {
        Engine {
            compiled: Arc::new(Compiled::new(account)),
            rules: self.rules,
            currency: self.currency,
            fx: self.fx,
            as_of: self.as_of,
        }
    }

    /// The same compiled account under other rules.
    pub fn with_rules(&self, rules: Rules) -> Self {
        Engine {
            rules,
            ..self.clone()
        }
    }

    /// The same engine, told that the account's data runs to `as_of` (a sync's time, an
    /// export's): no row, movement or rate is reported past it. A range reaching past it is cut
    /// at its day with [`Anomaly::CutAtAsOf`], a range wholly after it is
    /// [`Error::AfterAsOf`], and a row whose period ends after it is flagged
    /// [`SeriesRow::partial`].
    pub fn with_as_of(mut self, as_of: DateTime<Utc>) -> Self {
        self.as_of = Some(as_of.timestamp());
        self
    }

    /// The instant the account's data runs to, when known.
    pub fn as_of(&self) -> Option<DateTime<Utc>> {
        self.as_of.and_then(|s| DateTime::from_timestamp(s, 0))
    }

    /// `to`, cut at the as-of day (with the anomaly saying so); an error when `from` is after it.
    pub(crate) fn cut(
        &self,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<(NaiveDate, Option<Anomaly>), Error> {
        let Some(as_of) = self.as_of() else {
            return Ok((to, None));
        };
        let last = as_of.date_naive();
        if from > last {
            return Err(Error::AfterAsOf { from, as_of });
        }
        if to > last {
            return Ok((
                last,
                Some(Anomaly::CutAtAsOf {
                    requested_to: to,
                    as_of,
                }),
            ));
        }
        Ok((to, None))
    }

    /// Whether a period ending at the start of epoch day `end_day` (exclusive) reaches past the
    /// as-of instant.
    pub(crate) fn is_partial(&self, end_day: i64) -> bool {
        self.as_of
            .is_some_and(|s| s < end_day.saturating_mul(SECONDS_PER_DAY))
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The reporting currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// Every anomaly of the account's data, independent of any query (one validation pass, run
    /// on the first call and kept). Each report also lists the anomalies it met.
    pub fn input_anomalies(&self) -> &[Anomaly] {
        self.compiled.all_anomalies()
    }

    fn check(&self) -> Result<(), Error> {
        if self.currency.minor_digits().is_none() {
            return Err(Error::UnknownReportingCurrency(self.currency));
        }
        Ok(())
    }

    /// Rates for days `base_day..base_day + days`.
    fn rate_table(&self, base_day: i64, days: usize) -> Result<RateTable, Error> {
        let c = &self.compiled;
        let mut rates = Vec::with_capacity(c.currencies.len());
        let mut max = Vec::with_capacity(c.currencies.len());
        for cur in &c.currencies {
            let row: Vec<i64> = (0..days)
                .map(|d| {
                    self.fx
                        .rate(*cur, self.currency, date_of(base_day + d as i64))
                        .and_then(to_rate)
                        .unwrap_or(0)
                })
                .collect();
            max.push(row.iter().copied().max().unwrap_or(0) as f64 / 1e12);
            rates.push(row);
        }
        Ok(RateTable { rates, max })
    }

    /// MRR of every paying customer, and in total, at the instant `at` (after every change at or
    /// before `at`), valued at that day's rate.
    ///
    /// # Errors
    /// [`Error::UnknownReportingCurrency`], [`Error::AmountsTooLarge`].
    pub fn mrr_at(&self, at: DateTime<Utc>) -> Result<MrrSnapshot, Error> {
        self.check()?;
        self.snapshot_at(at.timestamp() + 1)
    }
}

/// Range checks shared by the queries; returns `(from_day, to_day)` as epoch days.
pub(crate) fn check_range(from: NaiveDate, to: NaiveDate) -> Result<(i64, i64), Error> {
    if from > to {
        return Err(Error::InvalidRange { from, to });
    }
    let (f, t) = (epoch_day(from), epoch_day(to));
    if t - f > 36_525 {
        return Err(Error::RangeTooLong { from, to });
    }
    Ok((f, t))
}

/// `d` minus 12 calendar months (Feb 29 -> Feb 28).
pub(crate) fn year_before(d: NaiveDate) -> Result<NaiveDate, Error> {
    d.checked_sub_months(Months::new(12))
        .ok_or(Error::DateOutOfRange(d))
}

pub(crate) fn decimal_ratio(num: Decimal, den: Decimal) -> Option<Decimal> {
    if den.is_zero() {
        return None;
    }
    num.checked_div(den).map(|r| {
        r.round_dp_with_strategy(12, rust_decimal::RoundingStrategy::MidpointNearestEven)
            .normalize()
    })
}

pub(crate) const SECONDS_PER_DAY: i64 = DAY;

#[cfg(test)]
mod tests;
