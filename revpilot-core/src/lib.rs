//! RevPilot's pure domain logic: a Stripe-agnostic account model, an exact revenue-metrics engine
//! with switchable vendor rule profiles, tiers, usage, billing math, insights and scenarios, and
//! the ports adapters implement.
//!
//! This crate does no I/O: no async runtime, no HTTP, no SQL. Everything here is a plain function
//! over data, so any number it produces can be reproduced from its inputs.
//!
//! ```
//! use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
//! use revpilot_core::{Account, Currency, Rules};
//! use chrono::NaiveDate;
//!
//! let account: Account = serde_json::from_str(r#"{
//!   "customers": [{"id": "cus_1", "created": "2024-01-01T00:00:00Z"}],
//!   "subscriptions": [{
//!     "id": "sub_1", "customer": "cus_1", "currency": "usd", "created": "2024-01-01T00:00:00Z",
//!     "statuses": [{"at": "2024-01-01T00:00:00Z", "status": "active"}],
//!     "items": [{"price": {"id": "price_pro", "unit_amount": "2900", "interval": "month"},
//!                "quantity": 2, "from": "2024-01-01T00:00:00Z"}]
//!   }]
//! }"#).unwrap();
//! let engine = Engine::new(&account, Rules::default(), Currency::USD);
//! let day = NaiveDate::from_ymd_opt(2024, 1, 31).unwrap();
//! let report = engine.series(&SeriesRequest::new(day, day, Granularity::Month)).unwrap();
//! assert_eq!(Currency::USD.round(report.rows[0].mrr).to_string(), "58.00"); // 2 x $29
//! ```
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `synth` | a deterministic synthetic-account generator ([`synth`]) shared by tests, benches and the demo |
//! | `testing` | in-memory implementations of every storage port ([`testing::MemoryStore`]) and the conformance suite adapters run |
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod anomaly;
pub mod billing;
pub mod fx;
pub mod guard;
pub mod insights;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod money;
pub mod params;
pub mod ports;
pub mod rules;
#[cfg(feature = "synth")]
#[cfg_attr(docsrs, doc(cfg(feature = "synth")))]
pub mod synth;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use anomaly::Anomaly;
pub use fx::{FxRates, FxTable};
pub use metrics::{Engine, Granularity, OwnedEngine, SeriesReport, SeriesRequest, SeriesRow};
pub use model::Account;
pub use money::Currency;
pub use ports::{Clock, Store};
pub use rules::{LtvChurn, Profile, Rules};
