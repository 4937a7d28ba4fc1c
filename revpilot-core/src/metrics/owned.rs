//! [`OwnedEngine`]: an engine that owns its account, for state shared across requests.

use std::sync::Arc;

use self_cell::self_cell;

use super::Engine;
use crate::fx::FxRates;
use crate::model::Account;
use crate::money::Currency;
use crate::rules::Rules;

/// What an [`OwnedEngine`] owns: the account and its exchange rates.
struct Owner {
    account: Arc<Account>,
    fx: Option<Arc<dyn FxRates + Send + Sync>>,
}

self_cell!(
    struct Cell {
        owner: Owner,
        #[covariant]
        dependent: Engine,
    }
);

/// An [`Engine`] that owns its account (an `Arc<Account>`) and exchange rates, so it can live in
/// an application's shared state (`Arc<OwnedEngine>`, a field of an axum `State`) instead of
/// borrowing from a local. The account is compiled once, when it is made; every query after that
/// is a pass over the compiled data.
///
/// ```
/// use std::sync::Arc;
/// use revpilot_core::metrics::{Granularity, OwnedEngine, SeriesRequest};
/// use revpilot_core::{Account, Currency, Rules};
/// use chrono::NaiveDate;
///
/// let account: Arc<Account> = Arc::new(serde_json::from_str(r#"{"customers": []}"#).unwrap());
/// let engine = Arc::new(OwnedEngine::new(account, None, Rules::default(), Currency::USD));
/// let shared = Arc::clone(&engine);
/// let day = NaiveDate::from_ymd_opt(2024, 1, 31).unwrap();
/// let report = std::thread::spawn(move || {
///     shared.engine().series(&SeriesRequest::new(day, day, Granularity::Month))
/// }).join().unwrap().unwrap();
/// assert_eq!(report.rows.len(), 1);
/// ```
pub struct OwnedEngine(Cell);

impl OwnedEngine {
    /// Compiles `account` under `rules`, reporting in `currency`, with exchange rates from `fx`
    /// (none: foreign-currency revenue is reported as missing rates).
    pub fn new(
        account: Arc<Account>,
        fx: Option<Arc<dyn FxRates + Send + Sync>>,
        rules: Rules,
        currency: Currency,
    ) -> Self {
        OwnedEngine(Cell::new(Owner { account, fx }, |owner| {
            let engine = Engine::new(&owner.account, rules, currency);
            match &owner.fx {
                Some(fx) => engine.with_fx(fx.as_ref()),
                None => engine,
            }
        }))
    }

    /// The engine. Its `with_rules`, `with_as_of` and clones share the compiled account.
    pub fn engine(&self) -> &Engine<'_> {
        self.0.borrow_dependent()
    }

    /// The account it owns.
    pub fn account(&self) -> &Arc<Account> {
        &self.0.borrow_owner().account
    }

    /// The bytes it holds: the account's ([`Account::heap_bytes`]) and its compiled form's.
    pub fn heap_bytes(&self) -> usize {
        self.account().heap_bytes() + self.engine().compiled.heap_bytes()
    }
}

impl std::fmt::Debug for OwnedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OwnedEngine").field(self.engine()).finish()
    }
}
