//! Exchange rates: the [`FxRates`] source the engine asks, and [`FxTable`], an in-memory one.
//!
//! A rate converts one unit of `from` into `to` on a day. A missing rate is never guessed: the
//! engine reports it as an [`crate::Anomaly::MissingFxRate`].

use std::collections::BTreeMap;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use crate::money::{Currency, InvalidCurrency};

/// A source of daily exchange rates.
pub trait FxRates {
    /// How many units of `to` one unit of `from` was worth on `day`, or `None` when unknown.
    /// Implementations MUST return `Some(1)` when `from == to`.
    fn rate(&self, from: Currency, to: Currency, day: NaiveDate) -> Option<Decimal>;
}

/// Rates for a single-currency account: 1 for the same currency, unknown otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFx;

impl FxRates for NoFx {
    fn rate(&self, from: Currency, to: Currency, _day: NaiveDate) -> Option<Decimal> {
        (from == to).then_some(Decimal::ONE)
    }
}

/// Daily rates held in memory. A rate for `(from, to)` also answers `(to, from)` as its inverse.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FxTable {
    rates: BTreeMap<(Currency, Currency), BTreeMap<NaiveDate, Decimal>>,
}

/// The error for a rates file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rates line {line}: {problem}")]
#[non_exhaustive]
pub struct FxParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
    /// The currency code's error, when that is what is wrong (`problem` repeats its message).
    #[source]
    pub source: Option<InvalidCurrency>,
}

impl FxTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the rate of `from` in `to` on `day`.
    pub fn insert(&mut self, day: NaiveDate, from: Currency, to: Currency, rate: Decimal) {
        self.rates.entry((from, to)).or_default().insert(day, rate);
    }

    /// Sets the same rate for every day from `first` to `last` inclusive.
    pub fn insert_range(
        &mut self,
        first: NaiveDate,
        last: NaiveDate,
        from: Currency,
        to: Currency,
        rate: Decimal,
    ) {
        for day in first.iter_days().take_while(|d| *d <= last) {
            self.insert(day, from, to, rate);
        }
    }

    /// Reads CSV text with the header `date,from,to,rate` (e.g. `2024-01-31,eur,usd,1.0832`).
    ///
    /// # Errors
    /// [`FxParseError`] naming the line of the first malformed row.
    pub fn from_csv(text: &str) -> Result<Self, FxParseError> {
        let mut table = FxTable::new();
        let mut lines = text.lines().enumerate();
        let header_ok = lines
            .next()
            .map(|(_, h)| h.trim().eq_ignore_ascii_case("date,from,to,rate"))
            .unwrap_or(false);
        if !header_ok {
            return Err(FxParseError {
                line: 1,
                problem: "expected the header date,from,to,rate".into(),
                source: None,
            });
        }
        for (i, line) in lines {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let err = |problem: String| FxParseError {
                line: line_no,
                problem,
                source: None,
            };
            let currency = |e: InvalidCurrency| FxParseError {
                line: line_no,
                problem: e.to_string(),
                source: Some(e),
            };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [date, from, to, rate] = fields[..] else {
                return Err(err(format!("expected 4 fields, found {}", fields.len())));
            };
            let day = NaiveDate::parse_from_str(date, "%Y-%m-%d")
                .map_err(|e| err(format!("date {date:?}: {e}")))?;
            let from = Currency::parse(from).map_err(currency)?;
            let to = Currency::parse(to).map_err(currency)?;
            let rate: Decimal = rate
                .parse()
                .map_err(|e| err(format!("rate {rate:?}: {e}")))?;
            if rate <= Decimal::ZERO {
                return Err(err(format!("rate {rate} is not positive")));
            }
            table.insert(day, from, to, rate);
        }
        Ok(table)
    }
}

impl FxRates for FxTable {
    fn rate(&self, from: Currency, to: Currency, day: NaiveDate) -> Option<Decimal> {
        if from == to {
            return Some(Decimal::ONE);
        }
        if let Some(r) = self.rates.get(&(from, to)).and_then(|m| m.get(&day)) {
            return Some(*r);
        }
        let inverse = self.rates.get(&(to, from)).and_then(|m| m.get(&day))?;
        Decimal::ONE.checked_div(*inverse)
    }
}

impl<T: FxRates + ?Sized> FxRates for &T {
    fn rate(&self, from: Currency, to: Currency, day: NaiveDate) -> Option<Decimal> {
        (**self).rate(from, to, day)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn csv_and_lookups() {
        let t = FxTable::from_csv(
            "date,from,to,rate\n2024-01-01,EUR,usd,1.10\n\n2024-01-02,eur,usd,1.20\n",
        )
        .unwrap();
        assert_eq!(
            t.rate(Currency::EUR, Currency::USD, d("2024-01-02")),
            Some(Decimal::new(12, 1))
        );
        assert_eq!(
            t.rate(Currency::USD, Currency::USD, d("1999-01-01")),
            Some(Decimal::ONE)
        );
        assert_eq!(t.rate(Currency::EUR, Currency::USD, d("2024-01-03")), None);
        let inv = t
            .rate(Currency::USD, Currency::EUR, d("2024-01-01"))
            .unwrap();
        assert_eq!(inv.round_dp(6).to_string(), "0.909091");
    }

    #[test]
    fn csv_errors_name_the_line() {
        let e = FxTable::from_csv("date,from,to,rate\n2024-01-01,eur,usd\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = FxTable::from_csv("day,rate\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = FxTable::from_csv("date,from,to,rate\n2024-13-01,eur,usd,1\n").unwrap_err();
        assert!(e.to_string().starts_with("rates line 2: date"), "{e}");
        let e = FxTable::from_csv("date,from,to,rate\n2024-01-01,eur,usd,-1\n").unwrap_err();
        assert!(e.problem.contains("not positive"));
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn a_bad_currency_is_kept_as_the_source() {
        let e = FxTable::from_csv("date,from,to,rate\n2024-01-01,eur,dollars,1\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(
            e.to_string(),
            "rates line 2: invalid currency code \"dollars\": expected three ASCII letters such as \"usd\""
        );
        let source = std::error::Error::source(&e).expect("the currency's error is the source");
        assert_eq!(
            source.downcast_ref::<InvalidCurrency>(),
            Some(&InvalidCurrency("dollars".into()))
        );
    }
}
