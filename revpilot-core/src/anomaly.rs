//! Anomalies: odd input the engine worked around, returned beside every report.
//!
//! Metric computation never fails on odd data and never drops it silently: whatever it could not
//! use is named here, with the object it came from.

use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::money::Currency;

/// One problem found in the input, and what the engine did about it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Anomaly {
    /// A currency ISO 4217 does not define; the subscription or payment is left out.
    UnknownCurrency {
        /// The object (subscription or payment id).
        object: String,
        /// The code.
        currency: Currency,
    },
    /// No exchange rate for a day on which the currency had revenue: that currency counts 0 in the
    /// reporting currency on those days (the change shows in the fx line), nothing is guessed.
    MissingFxRate {
        /// The currency without a rate.
        currency: Currency,
        /// First day without a rate.
        from: NaiveDate,
        /// Last day without a rate (inclusive).
        to: NaiveDate,
    },
    /// Two periods of the same price on one subscription overlap; both are counted as given.
    OverlappingItemPeriods {
        /// The subscription.
        subscription: String,
        /// The price.
        price: String,
    },
    /// A negative amount (price, tier, discount, payment or refund); the object is left out.
    NegativeAmount {
        /// The object (subscription, price or payment id).
        object: String,
    },
    /// An amount too large to be real (over 10^10 major units a month for one item); left out.
    AmountOutOfRange {
        /// The object.
        object: String,
    },
    /// A price whose currency differs from its subscription's; the item is left out.
    CurrencyMismatch {
        /// The subscription.
        subscription: String,
        /// The price or coupon.
        object: String,
    },
    /// A tiered price whose tiers are empty, unsorted, or not closed by an open tier; left out.
    InvalidTiers {
        /// The price.
        price: String,
    },
    /// An interval count of zero; the item is left out.
    InvalidIntervalCount {
        /// The price.
        price: String,
    },
    /// A percent discount outside 0-100; the discount is left out.
    InvalidPercentOff {
        /// The subscription.
        subscription: String,
        /// The coupon.
        coupon: String,
    },
    /// A subscription whose customer is not in the account; it is counted under that customer id.
    UnknownCustomer {
        /// The subscription or payment.
        object: String,
        /// The customer id it names.
        customer: String,
    },
    /// An id that appears twice; the second object is left out.
    DuplicateId {
        /// The id.
        id: String,
    },
    /// A period ends before it starts; the period is left out.
    InvertedPeriod {
        /// The subscription.
        subscription: String,
    },
    /// Refunds larger than the payment they refund; counted as given.
    OverRefunded {
        /// The payment.
        payment: String,
    },
    /// The request reached past the account's as-of instant (its last sync, the export's
    /// newest object): it was cut at the as-of day, and nothing later is reported.
    CutAtAsOf {
        /// The last day asked for.
        requested_to: NaiveDate,
        /// The instant the data runs to.
        as_of: DateTime<Utc>,
    },
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::UnknownCurrency { object, currency } => {
                write!(f, "{object}: unknown currency {currency}; left out")
            }
            Anomaly::MissingFxRate { currency, from, to } => write!(
                f,
                "no {currency} exchange rate from {from} to {to}; {currency} counts 0 on those days"
            ),
            Anomaly::OverlappingItemPeriods {
                subscription,
                price,
            } => write!(
                f,
                "{subscription}: overlapping periods of price {price}; both counted"
            ),
            Anomaly::NegativeAmount { object } => write!(f, "{object}: negative amount; left out"),
            Anomaly::AmountOutOfRange { object } => {
                write!(f, "{object}: amount out of range; left out")
            }
            Anomaly::CurrencyMismatch {
                subscription,
                object,
            } => write!(
                f,
                "{subscription}: {object} is in another currency than the subscription; left out"
            ),
            Anomaly::InvalidTiers { price } => write!(f, "{price}: invalid tiers; left out"),
            Anomaly::InvalidIntervalCount { price } => {
                write!(f, "{price}: interval_count is 0; left out")
            }
            Anomaly::InvalidPercentOff {
                subscription,
                coupon,
            } => write!(
                f,
                "{subscription}: coupon {coupon} has percent_off outside 0-100; left out"
            ),
            Anomaly::UnknownCustomer { object, customer } => write!(
                f,
                "{object}: customer {customer} is not in the account; counted under that id"
            ),
            Anomaly::DuplicateId { id } => write!(f, "{id}: duplicate id; the second is left out"),
            Anomaly::InvertedPeriod { subscription } => {
                write!(
                    f,
                    "{subscription}: a period ends before it starts; left out"
                )
            }
            Anomaly::OverRefunded { payment } => {
                write!(f, "{payment}: refunds exceed the payment; counted as given")
            }
            Anomaly::CutAtAsOf {
                requested_to,
                as_of,
            } => write!(
                f,
                "the data runs to {}: rows after {} are not reported (asked up to {requested_to})",
                as_of.format("%Y-%m-%d %H:%M UTC"),
                as_of.date_naive()
            ),
        }
    }
}
