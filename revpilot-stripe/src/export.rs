//! The export file: one JSON object whose keys (`customers`, `subscriptions`, `invoices`,
//! `charges`, `prices`, `coupons`, `events`, `disputes`) each hold a list of Stripe API objects exactly as
//! Stripe's list endpoints return them. A missing key is an empty list; `exported_at` (unix
//! seconds, written by `revpilot export`) dates the data; other keys are ignored.
//!
//! Reading never builds a JSON tree of the whole file: the top level is split into borrowed raw
//! slices, and each object is parsed into its tolerant type on its own, on every core, so an
//! error names the object's kind and id.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::objects::{
    self, Charge, Coupon, Customer, Dispute, Event, Invoice, ParseError, Price, Subscription,
};

/// Every object of one account, as read from an export file or fetched by a sync.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Export {
    /// Customers.
    pub customers: Vec<Customer>,
    /// Subscriptions of every status.
    pub subscriptions: Vec<Subscription>,
    /// Invoices with all their lines.
    pub invoices: Vec<Invoice>,
    /// Charges with their refunds.
    pub charges: Vec<Charge>,
    /// Prices and plans.
    pub prices: Vec<Price>,
    /// Coupons.
    pub coupons: Vec<Coupon>,
    /// Events (Stripe keeps the last 30 days).
    pub events: Vec<Event>,
    /// Disputes of the charges, with their balance transactions.
    pub disputes: Vec<Dispute>,
    /// When the export was made (unix seconds), if it says: what the data is known up to.
    pub exported_at: Option<i64>,
}

/// Why an export cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The file is not a JSON object of lists.
    #[error("not an export (a JSON object of lists): {0}")]
    Shape(String),
    /// The file is not a JSON object of lists, as the JSON parser found.
    #[error("not an export (a JSON object of lists): {}{source}", json_context(*offset, *what))]
    Json {
        /// Where the value at fault starts in the input, when the reader knows.
        offset: Option<u64>,
        /// What that value should have been, when it is one value (`"exported_at" is not unix
        /// seconds`).
        what: Option<&'static str>,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// One object cannot be read.
    #[error(transparent)]
    Object(#[from] ParseError),
    /// The input ends inside the export.
    #[error("the export is cut off at byte {offset}{}", kind.map(|k| format!(", inside the list of {k}s")).unwrap_or_default())]
    Truncated {
        /// The list being read, if any.
        kind: Option<&'static str>,
        /// The input's length.
        offset: u64,
    },
    /// The input cannot be read.
    #[error("reading the export: {0}")]
    Read(#[source] std::io::Error),
}

/// The start of [`ExportError::Json`]'s message: `at byte 9: ` and what the value should be.
fn json_context(offset: Option<u64>, what: Option<&str>) -> String {
    let mut context = offset
        .map(|at| format!("at byte {at}: "))
        .unwrap_or_default();
    if let Some(what) = what {
        context.push_str(what);
        context.push_str(": ");
    }
    context
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow, default)]
    customers: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    subscriptions: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    invoices: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    charges: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    prices: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    coupons: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    events: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    disputes: Vec<&'a RawValue>,
    #[serde(default)]
    exported_at: Option<i64>,
}

/// Parses `raws` into `T`s on up to `threads` threads, keeping their order; the first error (in
/// input order) wins.
fn parse_all<T: serde::de::DeserializeOwned + Send>(
    kind: &'static str,
    raws: &[&RawValue],
    threads: usize,
) -> Result<Vec<T>, ParseError> {
    let one = |r: &&RawValue| objects::parse::<T>(kind, r.get().as_bytes());
    if threads <= 1 || raws.len() < 1024 {
        return raws.iter().map(one).collect();
    }
    let chunk = raws.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = raws
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(one).collect::<Result<Vec<T>, _>>()))
            .collect();
        let mut out = Vec::with_capacity(raws.len());
        for handle in handles {
            match handle.join() {
                Ok(part) => out.extend(part?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(out)
    })
}

impl Export {
    /// Reads an export from its JSON bytes.
    ///
    /// # Errors
    /// [`ExportError::Shape`] or [`ExportError::Json`] when the bytes are not a JSON object of
    /// lists, [`ExportError::Object`] naming the first object (kind and id) that cannot be read.
    pub fn from_json(json: &[u8]) -> Result<Self, ExportError> {
        // serde would read a JSON array as the struct's fields in order.
        if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ExportError::Shape(
                "expected a JSON object with keys such as \"customers\" and \"subscriptions\""
                    .into(),
            ));
        }
        let raw: Raw<'_> = serde_json::from_slice(json).map_err(|source| ExportError::Json {
            offset: None,
            what: None,
            source,
        })?;
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(Export {
            customers: parse_all("customer", &raw.customers, threads)?,
            subscriptions: parse_all("subscription", &raw.subscriptions, threads)?,
            invoices: parse_all("invoice", &raw.invoices, threads)?,
            charges: parse_all("charge", &raw.charges, threads)?,
            prices: parse_all("price", &raw.prices, threads)?,
            coupons: parse_all("coupon", &raw.coupons, threads)?,
            events: parse_all("event", &raw.events, threads)?,
            disputes: parse_all("dispute", &raw.disputes, threads)?,
            exported_at: raw.exported_at,
        })
    }
}

impl Export {
    /// The export of objects a sync cached (`revpilot_core::ports::ObjectCache`), for the
    /// rebuild: each is parsed by its kind; products, which the rebuild does not read, are
    /// skipped. The cache keeps no events, so changes without proration are dated by invoices
    /// only.
    ///
    /// # Errors
    /// [`ExportError::Object`] naming the first object (kind and id) that cannot be read.
    pub fn from_cached(
        objects: &[revpilot_core::ports::CachedObject],
    ) -> Result<Self, ExportError> {
        use revpilot_core::ports::ObjectKind;
        let mut by_kind: std::collections::HashMap<ObjectKind, Vec<&RawValue>> =
            std::collections::HashMap::new();
        let mut owned: Vec<Box<RawValue>> = Vec::with_capacity(objects.len());
        for o in objects {
            let raw = RawValue::from_string(o.data.clone()).map_err(|e| {
                ExportError::Object(ParseError {
                    kind: o.kind.as_str(),
                    id: o.stripe_id.clone(),
                    problem: e.to_string(),
                })
            })?;
            owned.push(raw);
        }
        for (o, raw) in objects.iter().zip(&owned) {
            by_kind.entry(o.kind).or_default().push(raw);
        }
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let of = |k: ObjectKind| by_kind.get(&k).map_or(&[][..], Vec::as_slice);
        Ok(Export {
            customers: parse_all("customer", of(ObjectKind::Customer), threads)?,
            subscriptions: parse_all("subscription", of(ObjectKind::Subscription), threads)?,
            invoices: parse_all("invoice", of(ObjectKind::Invoice), threads)?,
            charges: parse_all("charge", of(ObjectKind::Charge), threads)?,
            prices: parse_all("price", of(ObjectKind::Price), threads)?,
            coupons: parse_all("coupon", of(ObjectKind::Coupon), threads)?,
            events: Vec::new(),
            disputes: parse_all("dispute", of(ObjectKind::Dispute), threads)?,
            exported_at: None,
        })
    }
}

/// An export as raw Stripe JSON objects, the shape `revpilot export` writes: each object exactly
/// as Stripe sent it, nothing dropped.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawExport {
    /// Customers.
    #[serde(default)]
    pub customers: Vec<Box<RawValue>>,
    /// Subscriptions.
    #[serde(default)]
    pub subscriptions: Vec<Box<RawValue>>,
    /// Invoices, each with all its lines.
    #[serde(default)]
    pub invoices: Vec<Box<RawValue>>,
    /// Charges.
    #[serde(default)]
    pub charges: Vec<Box<RawValue>>,
    /// Prices.
    #[serde(default)]
    pub prices: Vec<Box<RawValue>>,
    /// Coupons.
    #[serde(default)]
    pub coupons: Vec<Box<RawValue>>,
    /// Events.
    #[serde(default)]
    pub events: Vec<Box<RawValue>>,
    /// Disputes.
    #[serde(default)]
    pub disputes: Vec<Box<RawValue>>,
    /// When the export was made (unix seconds): the data's as-of instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_at: Option<i64>,
}

impl RawExport {
    /// The objects as a sync would cache them, each at `version` (to seed a store from an
    /// export: demos, tests). Events are not cached.
    ///
    /// # Errors
    /// [`ExportError::Object`] for an object without a string `id`.
    pub fn cached(
        &self,
        version: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<revpilot_core::ports::CachedObject>, ExportError> {
        use revpilot_core::ports::ObjectKind;
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let lists = [
            (ObjectKind::Customer, &self.customers),
            (ObjectKind::Subscription, &self.subscriptions),
            (ObjectKind::Invoice, &self.invoices),
            (ObjectKind::Charge, &self.charges),
            (ObjectKind::Price, &self.prices),
            (ObjectKind::Coupon, &self.coupons),
            (ObjectKind::Dispute, &self.disputes),
        ];
        let mut out = Vec::new();
        for (kind, list) in lists {
            for raw in list {
                let id: Id = serde_json::from_str(raw.get()).map_err(|e| {
                    ExportError::Object(ParseError {
                        kind: kind.as_str(),
                        id: "(no id)".into(),
                        problem: e.to_string(),
                    })
                })?;
                out.push(cached_object(kind, id.id, version, raw.get().to_owned()));
            }
        }
        Ok(out)
    }
}

/// A Stripe object as the cache keeps it, with the customer it belongs to (see
/// [`customer_of`]).
pub fn cached_object(
    kind: revpilot_core::ports::ObjectKind,
    stripe_id: String,
    version: chrono::DateTime<chrono::Utc>,
    data: String,
) -> revpilot_core::ports::CachedObject {
    let customer = customer_of(kind, &stripe_id, &data);
    revpilot_core::ports::CachedObject {
        kind,
        stripe_id,
        version,
        data,
        customer,
    }
}

/// The customer an object belongs to: a customer's own id; a subscription's, invoice's or
/// charge's `customer` (an id, or an expanded customer); nothing for the other kinds or when the
/// field is absent or unreadable.
pub fn customer_of(
    kind: revpilot_core::ports::ObjectKind,
    stripe_id: &str,
    json: &str,
) -> Option<String> {
    use revpilot_core::ports::ObjectKind;
    #[derive(Deserialize)]
    struct Owner {
        #[serde(default, deserialize_with = "crate::objects::expandable")]
        customer: Option<String>,
    }
    match kind {
        ObjectKind::Customer => Some(stripe_id.to_owned()),
        ObjectKind::Subscription | ObjectKind::Invoice | ObjectKind::Charge => {
            serde_json::from_str::<Owner>(json).ok()?.customer
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_are_empty_and_unknown_keys_ignored() {
        let e = Export::from_json(br#"{"customers": [{"id": "cus_1", "created": 1}], "x": 1}"#)
            .unwrap();
        assert_eq!(e.customers.len(), 1);
        assert!(e.subscriptions.is_empty() && e.events.is_empty());
    }

    #[test]
    fn errors_name_the_object() {
        let err =
            Export::from_json(br#"{"charges": [{"id": "ch_9", "currency": "usd"}]}"#).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("charge ch_9"), "{text}");
        let err = Export::from_json(b"[1, 2]").unwrap_err();
        assert!(matches!(err, ExportError::Shape(_)), "{err}");
    }

    #[test]
    fn a_json_error_is_kept_as_the_source() {
        let err = Export::from_json(br#"{"customers": 5}"#).unwrap_err();
        assert!(
            matches!(err, ExportError::Json { offset: None, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with("not an export (a JSON object of lists): invalid type"),
            "{text}"
        );
        let source = std::error::Error::source(&err).expect("the parser's error is the source");
        let json = source
            .downcast_ref::<serde_json::Error>()
            .expect("a serde_json::Error");
        assert!(json.is_data(), "{json}");
    }

    #[test]
    fn parallel_parse_keeps_order_and_reports_the_first_error() {
        let mut json = String::from(r#"{"customers": ["#);
        for i in 0..3000 {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&format!(r#"{{"id": "cus_{i}", "created": {i}}}"#));
        }
        json.push_str("]}");
        let e = Export::from_json(json.as_bytes()).unwrap();
        assert!(
            e.customers
                .iter()
                .enumerate()
                .all(|(i, c)| c.id == format!("cus_{i}"))
        );
        let bad = json.replace(r#""created": 2500}"#, r#""created": "x"}"#);
        let err = Export::from_json(bad.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("cus_2500"), "{err}");
    }
}
