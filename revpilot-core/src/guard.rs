//! What a client is told when a use case refuses its request ([`Refusal`]), and the per-key
//! budgets that bound what one client may ask for ([`KeyedBudget`]).
//!
//! The use cases of `revpilot-stripe` (`revpilot_stripe::app`) and `revpilot-store`
//! (`revpilot_store::auth::Sessions`) answer with a [`Refusal`]; a front end maps its
//! [`RefusalKind`] to its own protocol (an HTTP server to a status code) and shows the code and
//! message as they are. The message is RevPilot's own words, never a database's, Stripe's or a
//! model's text: the cause of an internal failure is logged by the use case, not returned.

use std::borrow::Cow;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// What kind of refusal: what an HTTP front end maps to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalKind {
    /// The request is malformed (400).
    Invalid,
    /// No valid session or secret (401).
    Unauthorized,
    /// The plan's allowance is used up (402).
    PaymentRequired,
    /// No such thing, or another user's (404).
    NotFound,
    /// It exists already (409).
    Conflict,
    /// Past the caller's budget (429).
    TooMany,
    /// Every slot stayed busy for the whole wait; try again shortly (503 with `Retry-After`).
    Busy,
    /// Not configured on this server (503).
    Unavailable,
    /// Stripe (or another upstream) refused or failed (502).
    Upstream,
    /// Something failed on the server; the cause was logged (500).
    Internal,
}

/// A use case's refusal as its client may see it: a kind, a stable machine code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
#[non_exhaustive]
pub struct Refusal {
    /// What kind.
    pub kind: RefusalKind,
    /// A stable code (`not_found`, `rate_limited`, ...).
    pub code: &'static str,
    /// What the client is told.
    pub message: Cow<'static, str>,
}

impl Refusal {
    /// A refusal of `kind` with `code` and `message`.
    pub fn new(
        kind: RefusalKind,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Refusal {
            kind,
            code,
            message: message.into(),
        }
    }

    /// A malformed request (`invalid_request`).
    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Refusal::new(RefusalKind::Invalid, "invalid_request", message)
    }

    /// No such thing (`not_found`).
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Refusal::new(RefusalKind::NotFound, "not_found", message)
    }

    /// An internal failure whose cause the caller logged (`internal`).
    pub fn internal() -> Self {
        Refusal::new(
            RefusalKind::Internal,
            "internal",
            "something went wrong on the server",
        )
    }

    /// Past the caller's per-minute budget on an expensive step (`rate_limited`).
    pub fn rate_limited(message: impl Into<Cow<'static, str>>) -> Self {
        Refusal::new(RefusalKind::TooMany, "rate_limited", message)
    }

    /// All slots busy (`busy`): try again in [`Refusal::retry_after`] seconds.
    pub fn busy(message: impl Into<Cow<'static, str>>) -> Self {
        Refusal::new(RefusalKind::Busy, "busy", message)
    }

    /// Seconds after which trying again makes sense, when the refusal says so.
    pub fn retry_after(&self) -> Option<u32> {
        (self.kind == RefusalKind::Busy).then_some(2)
    }
}

/// A keyed rate limiter whose key map stays bounded.
///
/// governor's keyed limiter keeps one entry per key it has seen, for ever. Here, whenever the
/// map holds more than half of `max_keys` (at most once a second), the keys whose budget has
/// fully come back are dropped (`retain_recent`, which changes no decision). If the map is still
/// full after that, it starts over: an attacker who can present `max_keys` distinct live keys
/// within one refill period gets a fresh budget for each key, which costs them `max_keys`
/// requests each time, and the memory stays bounded. Each start-over is logged (a warning) and
/// counted ([`KeyedBudget::restarts`]).
#[derive(Debug)]
pub struct KeyedBudget<K: Hash + Eq + Clone> {
    quota: Quota,
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<K>>>,
    max_keys: usize,
    last_prune: Mutex<Instant>,
    restarts: std::sync::atomic::AtomicU64,
}

impl<K: Hash + Eq + Clone> KeyedBudget<K> {
    /// `per_minute` calls a minute per key, at most `max_keys` keys remembered.
    pub fn per_minute(per_minute: u32, max_keys: usize) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN));
        KeyedBudget {
            quota,
            limiter: RwLock::new(Arc::new(RateLimiter::keyed(quota))),
            max_keys: max_keys.max(2),
            last_prune: Mutex::new(Instant::now()),
            restarts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn limiter(&self) -> Arc<DefaultKeyedRateLimiter<K>> {
        self.limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Spends one call of `key`'s budget: `true` when it had one left.
    pub fn check(&self, key: &K) -> bool {
        self.prune();
        self.limiter().check_key(key).is_ok()
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.limiter().len()
    }

    /// No key remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many times the map was full of live keys and started over.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn prune(&self) {
        let limiter = self.limiter();
        let len = limiter.len();
        if len < self.max_keys / 2 {
            return;
        }
        {
            let mut last = self
                .last_prune
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if len < self.max_keys && last.elapsed() < Duration::from_secs(1) {
                return;
            }
            *last = Instant::now();
        }
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() >= self.max_keys {
            tracing::warn!(
                keys = limiter.len(),
                "a rate-limit map is full of live keys: it starts over"
            );
            self.restarts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *self.limiter.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(RateLimiter::keyed(self.quota));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_forgets_refilled_keys_and_never_holds_more_than_its_cap() {
        let budget = KeyedBudget::<u32>::per_minute(3, 100);
        for key in 0..10_000 {
            assert!(budget.check(&key), "a fresh key has a budget");
            assert!(budget.len() <= 100, "{} keys", budget.len());
        }
        assert!(
            budget.restarts() > 0,
            "10,000 live keys overflow a cap of 100"
        );
        // A key spends its budget as before.
        let one = KeyedBudget::<u32>::per_minute(3, 100);
        assert!((0..3).all(|_| one.check(&7)));
        assert!(!one.check(&7));
        assert_eq!(one.restarts(), 0);
    }

    #[test]
    fn only_busy_refusals_say_when_to_try_again() {
        assert_eq!(Refusal::busy("b").retry_after(), Some(2));
        assert_eq!(Refusal::internal().retry_after(), None);
        assert_eq!(Refusal::not_found("x").to_string(), "not_found: x");
    }
}
