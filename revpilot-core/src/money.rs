//! Currencies and the exact fixed-point amounts the metrics engine computes with.
//!
//! Money crosses the public API as [`rust_decimal::Decimal`] plus a [`Currency`]. Inside the
//! engine, amounts are integers at a fixed scale (see [`NATIVE_SCALE`], [`RATE_SCALE`],
//! [`REPORT_SCALE`]) so that sums and products are exact and fast; conversion back to `Decimal`
//! happens only at the edges.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An ISO 4217 currency code, stored lowercase as Stripe writes it (`"usd"`).
///
/// Any three ASCII letters parse; whether the code is a known ISO currency (and how many minor
/// units it has) is asked of [`Currency::minor_digits`], so an unknown code becomes an anomaly in a
/// report instead of a failure to read the account.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// The error for a currency code that is not three ASCII letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid currency code {0:?}: expected three ASCII letters such as \"usd\"")]
pub struct InvalidCurrency(pub String);

impl Currency {
    /// US dollar.
    pub const USD: Currency = Currency(*b"usd");
    /// Euro.
    pub const EUR: Currency = Currency(*b"eur");
    /// Pound sterling.
    pub const GBP: Currency = Currency(*b"gbp");
    /// Japanese yen (no minor unit).
    pub const JPY: Currency = Currency(*b"jpy");

    /// Parses a three-letter code, case-insensitively.
    ///
    /// # Errors
    /// [`InvalidCurrency`] when `code` is not exactly three ASCII letters.
    pub fn parse(code: &str) -> Result<Self, InvalidCurrency> {
        let bytes = code.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_alphabetic) {
            return Err(InvalidCurrency(code.to_owned()));
        }
        Ok(Currency([
            bytes[0].to_ascii_lowercase(),
            bytes[1].to_ascii_lowercase(),
            bytes[2].to_ascii_lowercase(),
        ]))
    }

    /// The lowercase code, e.g. `"usd"`.
    pub fn as_str(&self) -> &str {
        // The bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Number of minor-unit digits (2 for USD, 0 for JPY, 3 for KWD) from the ISO 4217 table, or
    /// `None` for a code ISO does not define or that has no minor unit (gold, SDR, ...).
    pub fn minor_digits(&self) -> Option<u32> {
        let upper = self.as_str().to_ascii_uppercase();
        iso_currency::Currency::from_code(&upper)
            .and_then(|c| c.exponent())
            .map(u32::from)
    }

    /// `amount` (major units) rounded to the minor unit, for machines and CSV: `1234567.89`,
    /// and `0.00`, never `-0.00`.
    pub fn plain(&self, amount: Decimal) -> String {
        let mut r = self.round(amount);
        if r.is_zero() {
            r.set_sign_positive(true);
        }
        r.to_string()
    }

    /// `amount` (major units) for people: rounded to the minor unit, thousands grouped, the
    /// code after: `1,234,567.89 USD`, `123,456 JPY`, `-999.50 EUR`.
    pub fn display(&self, amount: Decimal) -> String {
        let v = self.round(amount);
        let digits = self.minor_digits().unwrap_or(2) as usize;
        let text = format!("{:.*}", digits, v.abs());
        let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
        let mut out = String::with_capacity(text.len() + text.len() / 3 + 5);
        if v.is_sign_negative() && !v.is_zero() {
            out.push('-');
        }
        for (i, c) in int.chars().enumerate() {
            if i > 0 && (int.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
        out.push(' ');
        out.push_str(&self.as_str().to_uppercase());
        out
    }

    /// Rounds `amount` (in major units) half-even to this currency's minor unit, the one rounding
    /// reports apply. Unknown currencies round to two digits.
    pub fn round(&self, amount: Decimal) -> Decimal {
        amount.round_dp_with_strategy(
            self.minor_digits().unwrap_or(2),
            RoundingStrategy::MidpointNearestEven,
        )
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

impl FromStr for Currency {
    type Err = InvalidCurrency;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::parse(s)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Currency::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Native amounts (one currency, major units) are `i64` counts of 10^-8 of a major unit.
///
/// 365/12 is not a finite decimal, so a normalised item MRR is rounded half-even once, to 10^-8
/// of a major unit (10^-6 of a cent), when an item is priced. Every later sum is exact.
pub const NATIVE_SCALE: u32 = 8;
/// Exchange rates are `i64` counts of 10^-12.
pub const RATE_SCALE: u32 = 12;
/// Reporting-currency amounts are `i128` counts of 10^-20 of a major unit: a native amount times
/// a rate, exactly.
pub const REPORT_SCALE: u32 = NATIVE_SCALE + RATE_SCALE;
/// The scale of the `Decimal`s the engine hands out: enough to carry every native amount exactly.
pub const OUTPUT_SCALE: u32 = 12;

/// The largest native amount one item may contribute, in major units. Larger amounts are reported
/// as anomalies and left out, which keeps every internal sum far from overflow.
pub const MAX_ITEM_MAJOR: i64 = 10_000_000_000;

/// Converts a rate to fixed point at [`RATE_SCALE`], rounding half-even; `None` for rates that are
/// not positive or do not fit.
pub(crate) fn to_rate(rate: Decimal) -> Option<i64> {
    if rate <= Decimal::ZERO || rate > Decimal::from(1_000_000) {
        return None;
    }
    let scaled = rate.round_dp_with_strategy(RATE_SCALE, RoundingStrategy::MidpointNearestEven);
    let factor = 10i128.checked_pow(RATE_SCALE - scaled.scale())?;
    i64::try_from(scaled.mantissa().checked_mul(factor)?).ok()
}

/// One unit of a rate in fixed point (a rate of exactly 1).
#[cfg(test)]
pub(crate) const RATE_ONE: i64 = 1_000_000_000_000;

/// Converts an exact reporting amount to a `Decimal` at [`OUTPUT_SCALE`], rounding half-even.
pub(crate) fn report_to_decimal(value: i128) -> Decimal {
    let drop = 10i128.pow(REPORT_SCALE - OUTPUT_SCALE);
    let q = value.div_euclid(drop);
    let r = value.rem_euclid(drop);
    let half = drop / 2;
    let q = if r > half || (r == half && q % 2 != 0) {
        q + 1
    } else {
        q
    };
    // |q| is below 2^96 for any account within MAX_ITEM_MAJOR bounds; saturate rather than panic.
    Decimal::try_from_i128_with_scale(q, OUTPUT_SCALE).unwrap_or(if q < 0 {
        Decimal::MIN
    } else {
        Decimal::MAX
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_written_for_people_and_for_machines() {
        let d = |s: &str| s.parse::<Decimal>().unwrap_or_default();
        assert_eq!(Currency::USD.display(d("1234567.891")), "1,234,567.89 USD");
        assert_eq!(Currency::EUR.display(d("-999.5")), "-999.50 EUR");
        assert_eq!(Currency::USD.display(d("-0.001")), "0.00 USD");
        assert_eq!(Currency::JPY.display(d("123456")), "123,456 JPY");
        assert_eq!(Currency::USD.plain(d("1234567.891")), "1234567.89");
        assert_eq!(Currency::USD.plain(d("-0.001")), "0.00");
        assert_eq!(Currency::JPY.plain(d("-12.5")), "-12");
    }

    #[test]
    fn currency_codes() {
        assert_eq!(Currency::parse("USD").unwrap(), Currency::USD);
        assert_eq!(Currency::USD.minor_digits(), Some(2));
        assert_eq!(Currency::JPY.minor_digits(), Some(0));
        assert_eq!(Currency::parse("kwd").unwrap().minor_digits(), Some(3));
        assert_eq!(Currency::parse("zzz").unwrap().minor_digits(), None);
        assert!(Currency::parse("us").is_err());
        assert!(Currency::parse("u$d").is_err());
        assert!(Currency::parse("usdd").is_err());
    }

    #[test]
    fn rounding_is_half_even_to_the_minor_unit() {
        assert_eq!(
            Currency::USD.round(Decimal::new(12345, 3)).to_string(),
            "12.34"
        );
        assert_eq!(
            Currency::USD.round(Decimal::new(12355, 3)).to_string(),
            "12.36"
        );
        assert_eq!(Currency::JPY.round(Decimal::new(25, 1)).to_string(), "2");
    }

    #[test]
    fn fixed_point_round_trips() {
        let v: i64 = 29 * 100_000_000;
        assert_eq!(
            report_to_decimal(i128::from(v) * i128::from(RATE_ONE)),
            Decimal::new(29, 0)
        );
        assert_eq!(to_rate(Decimal::ONE), Some(RATE_ONE));
        assert_eq!(to_rate(Decimal::ZERO), None);
        let r = i128::from(v) * i128::from(RATE_ONE);
        assert_eq!(report_to_decimal(r), Decimal::new(29, 0));
        assert_eq!(report_to_decimal(-5 * 10i128.pow(7)), Decimal::ZERO); // -0.5e-12 -> -0 (even)
        assert_eq!(
            report_to_decimal(15 * 10i128.pow(7)).to_string(),
            "0.000000000002"
        );
    }
}
