//! The embedding company's own billing on Stripe: the billing webhooks (verified, durable first,
//! idempotent and order-safe), Checkout for upgrades and end-of-period overage invoicing.
//!
//! A webhook goes through two steps:
//! 1. [`receive`]: the signature is checked, the event parsed into RevPilot's own tolerant
//!    envelope (the endpoint's API version may differ from this library's) and stored in the
//!    inbox (unique event id) before the 2xx. Nothing is written for a request that fails.
//! 2. [`Processor::process_pending`]: each stored event is applied to the user's plan in one
//!    transaction ([`BillingStore::apply_plan_event`]); a failure leaves it pending, to be
//!    retried, never lost.
//!
//! Order: an event older than the last one applied for a user changes nothing; one with the
//! same `created` re-fetches the subscription from Stripe and applies that.

mod checkout;

pub use checkout::{
    CheckoutError, CheckoutSession, OverageInvoiced, ReturnUrls, create_checkout, invoice_overage,
    overage_key,
};

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use revpilot_core::billing::Catalog;
use revpilot_core::ports::{
    Applied, BillingStore, InboxEvent, Inserted, PlanChange, StoreError, SubscriptionEvent, Tier,
    UserId, UserProfile, UserStore, UserSubscription, WebhookInbox,
};
use secrecy::SecretString;
use serde::Deserialize;
use uuid::Uuid;

use crate::client::{ApiError, Client};
use crate::objects::{Event, Invoice, Subscription};
use crate::webhook::{SignatureError, TOLERANCE_SECS, verify};

/// An event body that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the webhook body is not a Stripe event: {0}")]
pub struct EventError(pub String);

/// Parses a webhook body into RevPilot's own tolerant [`Event`] (only what processing needs;
/// unknown fields ignored, since the endpoint's API version may differ from this library's).
///
/// # Errors
/// [`EventError`] naming what is missing or malformed.
pub fn parse_event(payload: &[u8]) -> Result<Event, EventError> {
    let event: Event = serde_json::from_slice(payload).map_err(|e| EventError(e.to_string()))?;
    if event.id.is_empty() || event.event_type.is_empty() {
        return Err(EventError("empty id or type".into()));
    }
    if !event.data.object.is_object() {
        return Err(EventError(format!(
            "event {}: data.object is not an object",
            event.id
        )));
    }
    DateTime::<Utc>::from_timestamp(event.created, 0)
        .ok_or_else(|| EventError(format!("event {}: created is out of range", event.id)))?;
    Ok(event)
}

/// The endpoint's settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Endpoint secrets (`whsec_...`); more than one while rotating.
    pub secrets: Vec<SecretString>,
    /// The server's mode: events of the other mode change nothing.
    pub livemode: bool,
    /// Signature tolerance, seconds.
    pub tolerance: i64,
}

impl WebhookConfig {
    /// One secret, Stripe's tolerance.
    pub fn new(secret: SecretString, livemode: bool) -> Self {
        WebhookConfig {
            secrets: vec![secret],
            livemode,
            tolerance: TOLERANCE_SECS,
        }
    }
}

/// What [`receive`] did with a verified request; every variant answers 2xx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// Stored in the inbox for processing.
    Stored(String),
    /// Stored before: nothing changed.
    Duplicate(String),
    /// Not stored, on purpose (the other mode): nothing changed.
    Ignored {
        /// The event.
        event_id: String,
        /// Why.
        reason: String,
    },
}

impl Receipt {
    /// The outcome as a short label (`stored`, `duplicate`, `ignored`), for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Receipt::Stored(_) => "stored",
            Receipt::Duplicate(_) => "duplicate",
            Receipt::Ignored { .. } => "ignored",
        }
    }

    /// The event's id.
    pub fn event_id(&self) -> &str {
        match self {
            Receipt::Stored(id) | Receipt::Duplicate(id) => id,
            Receipt::Ignored { event_id, .. } => event_id,
        }
    }
}

/// Why [`receive`] refused a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// Bad or missing signature: answer 400, nothing written.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// Signed but not an event: answer 400, nothing written.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The inbox failed: answer 5xx so Stripe retries.
    #[error("the webhook inbox failed: {0}")]
    Store(#[from] StoreError),
}

impl ReceiveError {
    /// Whether the request is at fault (400) rather than the server (500).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, ReceiveError::Store(_))
    }
}

/// Verifies, parses and durably stores a webhook at `now`, before the 2xx.
///
/// # Errors
/// [`ReceiveError`]; nothing is written for any of them.
pub async fn receive<I: WebhookInbox + ?Sized>(
    inbox: &I,
    config: &WebhookConfig,
    payload: &[u8],
    signature: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Receipt, ReceiveError> {
    verify(
        payload,
        signature,
        &config.secrets,
        now.timestamp(),
        config.tolerance,
    )?;
    let event = parse_event(payload)?;
    if event.livemode != config.livemode {
        let mode = |live: bool| if live { "live" } else { "test" };
        let reason = format!(
            "a {} mode event on a {} mode server",
            mode(event.livemode),
            mode(config.livemode)
        );
        tracing::warn!(event = %event.id, %reason, "webhook ignored");
        return Ok(Receipt::Ignored {
            event_id: event.id,
            reason,
        });
    }
    let payload = std::str::from_utf8(payload)
        .map_err(|_| EventError("the body is not UTF-8".into()))?
        .to_owned();
    let stored = InboxEvent {
        created: DateTime::<Utc>::from_timestamp(event.created, 0).unwrap_or(now),
        event_id: event.id.clone(),
        event_type: event.event_type,
        livemode: event.livemode,
        payload,
        received_at: now,
    };
    Ok(match inbox.insert(&stored).await? {
        Inserted::New => Receipt::Stored(event.id),
        Inserted::Duplicate => Receipt::Duplicate(event.id),
    })
}

/// Where processing gets a subscription's current state (Stripe, or a test's map). With the
/// `fake` feature, mockall's `MockSubscriptionSource` doubles it.
#[cfg_attr(feature = "fake", mockall::automock)]
#[async_trait]
pub trait SubscriptionSource: Send + Sync {
    /// The subscription as Stripe has it now.
    async fn subscription(&self, id: &str) -> Result<Subscription, ApiError>;
}

#[async_trait]
impl SubscriptionSource for Client {
    async fn subscription(&self, id: &str) -> Result<Subscription, ApiError> {
        let path = format!("/v1/subscriptions/{id}");
        let retrieve = stripe_billing::subscription::RetrieveSubscription::new(id);
        let body = self.request(&retrieve, None).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid {
            path,
            problem: e.to_string(),
        })
    }
}

/// What processing one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The user's plan changed.
    Applied {
        /// The user.
        user: UserId,
        /// Their tier now.
        tier: Tier,
    },
    /// A newer event was applied already: nothing changed.
    Stale,
    /// This event was applied already: nothing changed.
    Duplicate,
    /// No user matches: recorded in the inbox, nothing else changed.
    NoUser(String),
    /// Not an event this processor acts on, or one that asks for nothing.
    Ignored(String),
}

/// Why processing an event failed; it stays pending and is retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The stored payload cannot be read (not retried usefully, but kept).
    #[error(transparent)]
    Event(#[from] EventError),
    /// Stripe could not be asked.
    #[error("fetching from Stripe: {0}")]
    Stripe(#[from] ApiError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Billing events [`Processor::process_all`] applies per round.
pub const INBOX_BATCH: usize = 100;

/// Failures after which [`Processor::process_all`] leaves an event to an operator.
pub const INBOX_MAX_ATTEMPTS: u32 = 10;

/// Counts of one [`Processor::process_pending`] round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessStats {
    /// Events that changed a plan.
    pub applied: usize,
    /// Events processed without a change (stale, duplicate, no user, ignored).
    pub unchanged: usize,
    /// Events whose processing failed (still pending).
    pub failed: usize,
}

/// Applies stored billing events to users' plans.
pub struct Processor<S: ?Sized> {
    store: Arc<S>,
    catalog: Catalog,
    stripe: Arc<dyn SubscriptionSource>,
}

impl<S> Processor<S>
where
    S: UserStore + BillingStore + WebhookInbox + ?Sized,
{
    /// A processor over `store`, mapping prices to tiers with `catalog` and asking `stripe` for
    /// subscriptions.
    pub fn new(store: Arc<S>, catalog: Catalog, stripe: Arc<dyn SubscriptionSource>) -> Self {
        Processor {
            store,
            catalog,
            stripe,
        }
    }

    /// Processes up to `limit` pending events (oldest `created` first) with fewer than
    /// `max_attempts` failures; each is marked processed or failed.
    ///
    /// # Errors
    /// Only when the inbox itself cannot be read or marked.
    pub async fn process_pending(
        &self,
        limit: usize,
        max_attempts: u32,
        now: DateTime<Utc>,
    ) -> Result<ProcessStats, StoreError> {
        let mut stats = ProcessStats::default();
        for pending in self.store.pending(limit, max_attempts).await? {
            let id = &pending.event.event_id;
            match self.process(&pending.event, now).await {
                Ok(outcome) => {
                    match &outcome {
                        Outcome::Applied { .. } => stats.applied += 1,
                        Outcome::NoUser(why) => {
                            tracing::warn!(event = %id, %why, "billing event for no known user");
                            stats.unchanged += 1;
                        }
                        _ => stats.unchanged += 1,
                    }
                    // Another processor may have marked it first: it is processed either way.
                    match self.store.mark_processed(id, now).await {
                        Ok(()) | Err(StoreError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    tracing::warn!(event = %id, error = %e, "billing event failed; will retry");
                    stats.failed += 1;
                    match self.store.mark_failed(id, &e.to_string()).await {
                        Ok(()) | Err(StoreError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(stats)
    }

    /// Applies stored events on a task of its own, for a process without a job queue: at once
    /// when `wake` is notified (a webhook was stored), and every `interval` for the retries.
    /// Each round is [`Processor::process_all`] as of `clock()`. Stops when the task is aborted.
    pub fn spawn(
        self: Arc<Self>,
        wake: Arc<tokio::sync::Notify>,
        clock: revpilot_core::ports::Clock,
        interval: std::time::Duration,
    ) -> tokio::task::JoinHandle<()>
    where
        S: Send + Sync + 'static,
    {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.process_all(clock()).await {
                    tracing::error!(error = %e, "billing inbox unreadable");
                }
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(interval) => {}
                }
            }
        })
    }

    /// Processes every pending event, [`INBOX_BATCH`] at a time, until a round finds fewer
    /// (events that failed [`INBOX_MAX_ATTEMPTS`] times stay in the inbox for an operator). The
    /// counts are summed over the rounds; `failed` ones stay pending with their attempt counted.
    ///
    /// # Errors
    /// Only when the inbox itself cannot be read or marked.
    pub async fn process_all(&self, now: DateTime<Utc>) -> Result<ProcessStats, StoreError> {
        let mut total = ProcessStats::default();
        loop {
            let round = self
                .process_pending(INBOX_BATCH, INBOX_MAX_ATTEMPTS, now)
                .await?;
            total.applied += round.applied;
            total.unchanged += round.unchanged;
            total.failed += round.failed;
            if round.applied + round.unchanged < INBOX_BATCH {
                return Ok(total);
            }
        }
    }

    /// Applies one event.
    ///
    /// # Errors
    /// [`ProcessError`]; nothing is changed for any of them.
    pub async fn process(
        &self,
        stored: &InboxEvent,
        now: DateTime<Utc>,
    ) -> Result<Outcome, ProcessError> {
        let event = parse_event(stored.payload.as_bytes())?;
        let object = event.data.object.clone();
        let event_id = event.id.clone();
        let read = |what: &'static str| {
            let id = event_id.clone();
            move |e: serde_json::Error| EventError(format!("event {id}: {what}: {e}"))
        };
        match event.event_type.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                let session: CheckoutObject =
                    serde_json::from_value(object).map_err(read("checkout session"))?;
                self.checkout(&event, session, now).await
            }
            "customer.subscription.created" | "customer.subscription.updated" => {
                let sub: Subscription =
                    serde_json::from_value(object).map_err(read("subscription"))?;
                let Some(customer) = sub.customer.clone() else {
                    return Ok(Outcome::Ignored("the subscription has no customer".into()));
                };
                let Some(user) = self.store.user_by_stripe_customer(&customer).await? else {
                    return Ok(Outcome::NoUser(format!("no user has customer {customer}")));
                };
                self.apply_subscription(&event, &user, sub, None, now).await
            }
            "customer.subscription.deleted" => {
                let sub: Subscription =
                    serde_json::from_value(object).map_err(read("subscription"))?;
                // By the subscription; else by the customer, when the user has no current
                // subscription (an earlier event ended it). A user who moved to another
                // subscription keeps it.
                let user = match self.store.user_by_stripe_subscription(&sub.id).await? {
                    Some(u) => Some(u),
                    None => match sub.customer.as_deref() {
                        Some(c) => self.store.user_by_stripe_customer(c).await?,
                        None => None,
                    },
                };
                let Some(user) = user else {
                    return Ok(Outcome::NoUser(format!(
                        "no user has subscription {} or its customer",
                        sub.id
                    )));
                };
                if let Some(current) = user
                    .stripe_subscription_id
                    .as_deref()
                    .filter(|c| *c != sub.id)
                {
                    return Ok(Outcome::Ignored(format!(
                        "{} is not the user's current subscription ({current})",
                        sub.id
                    )));
                }
                self.downgrade(&event, &user, &sub, now).await
            }
            "invoice.paid" | "invoice.payment_failed" => {
                let invoice: Invoice = serde_json::from_value(object).map_err(read("invoice"))?;
                let Some(sub_id) = invoice.subscription_id().map(str::to_owned) else {
                    return Ok(Outcome::Ignored("not a subscription invoice".into()));
                };
                let user = match self.store.user_by_stripe_subscription(&sub_id).await? {
                    Some(u) => Some(u),
                    None => match invoice.customer.as_deref() {
                        Some(c) => self.store.user_by_stripe_customer(c).await?,
                        None => None,
                    },
                };
                let Some(user) = user else {
                    return Ok(Outcome::NoUser(format!(
                        "no user has subscription {sub_id} or the invoice's customer"
                    )));
                };
                let sub = self.stripe.subscription(&sub_id).await?;
                let status = (event.event_type == "invoice.payment_failed"
                    && sub.status == "active")
                    .then(|| "past_due".to_owned());
                self.apply_subscription(&event, &user, sub, status, now)
                    .await
            }
            other => Ok(Outcome::Ignored(format!("{other} is not a billing event"))),
        }
    }

    async fn checkout(
        &self,
        event: &Event,
        session: CheckoutObject,
        now: DateTime<Utc>,
    ) -> Result<Outcome, ProcessError> {
        if event.event_type == "checkout.session.completed"
            && !matches!(
                session.payment_status.as_deref(),
                Some("paid" | "no_payment_required")
            )
        {
            return Ok(Outcome::Ignored(format!(
                "payment_status {:?}: waiting for checkout.session.async_payment_succeeded",
                session.payment_status.as_deref().unwrap_or("missing")
            )));
        }
        let Some(sub_id) = session.subscription.clone() else {
            return Ok(Outcome::Ignored("not a subscription checkout".into()));
        };
        let by_reference = match session
            .client_reference_id
            .as_deref()
            .and_then(|r| Uuid::parse_str(r).ok())
        {
            Some(id) => self.store.user(UserId(id)).await?,
            None => None,
        };
        let user = match by_reference {
            Some(u) => Some(u),
            None => match session.email() {
                Some(email) => self.store.user_by_email(email).await?,
                None => None,
            },
        };
        let Some(user) = user else {
            return Ok(Outcome::NoUser(format!(
                "checkout session {}: no user by client_reference_id or email",
                session.id
            )));
        };
        // The session does not say which price was bought: the subscription does.
        let sub = self.stripe.subscription(&sub_id).await?;
        self.apply_subscription(event, &user, sub, None, now).await
    }

    async fn apply_subscription(
        &self,
        event: &Event,
        user: &UserProfile,
        mut sub: Subscription,
        status_override: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, ProcessError> {
        let created = DateTime::<Utc>::from_timestamp(event.created, 0).unwrap_or(now);
        match self.store.last_subscription_event(user.user_id).await? {
            Some(last) if last > created => return Ok(Outcome::Stale),
            // Two events of the same second: their order is unknown, so Stripe decides.
            Some(last)
                if last == created && event.event_type.starts_with("customer.subscription.") =>
            {
                sub = self.stripe.subscription(&sub.id).await?;
            }
            _ => {}
        }
        let price = sub
            .items
            .data
            .first()
            .and_then(|i| i.price())
            .map(|p| p.id.clone());
        let mapped = self.catalog.tier_for_price(price.as_deref());
        if let Some(note) = &mapped.note {
            tracing::warn!(event = %event.id, user = %user.user_id, %note, "subscription price");
        }
        let status = status_override.unwrap_or_else(|| sub.status.clone());
        // Only a subscription that is paid for (or in its trial, or being retried) grants its
        // tier; incomplete, unpaid and canceled ones are the free tier.
        let tier = if matches!(status.as_str(), "active" | "trialing" | "past_due") {
            mapped.tier
        } else {
            Tier::Starter
        };
        let item = sub.items.data.first();
        let at = |s: Option<i64>| s.and_then(|s| DateTime::<Utc>::from_timestamp(s, 0));
        let start = at(sub
            .current_period_start
            .or_else(|| item.and_then(|i| i.current_period_start)));
        let end = at(sub
            .current_period_end
            .or_else(|| item.and_then(|i| i.current_period_end)));
        let ended = tier == Tier::Starter && status == "canceled";
        let change = PlanChange {
            tier,
            subscription_status: Some(status.clone()),
            stripe_customer_id: sub.customer.clone(),
            stripe_subscription_id: (!ended).then(|| sub.id.clone()),
            current_period_start: start.filter(|_| !ended),
            current_period_end: end.filter(|_| !ended),
            limits: self.catalog.plan(tier).limits,
        };
        let subscription = UserSubscription {
            stripe_subscription_id: sub.id.clone(),
            stripe_customer_id: sub.customer.clone(),
            tier,
            status: Some(status.clone()),
            price_id: price,
            current_period_end: end,
        };
        self.apply(
            event,
            user.user_id,
            &change,
            &subscription,
            mapped.note,
            now,
        )
        .await
    }

    async fn downgrade(
        &self,
        event: &Event,
        user: &UserProfile,
        sub: &Subscription,
        now: DateTime<Utc>,
    ) -> Result<Outcome, ProcessError> {
        let change = PlanChange {
            tier: Tier::Starter,
            subscription_status: Some("canceled".into()),
            stripe_customer_id: sub.customer.clone(),
            stripe_subscription_id: None,
            current_period_start: None,
            current_period_end: None,
            limits: self.catalog.plan(Tier::Starter).limits,
        };
        let subscription = UserSubscription {
            stripe_subscription_id: sub.id.clone(),
            stripe_customer_id: sub.customer.clone(),
            tier: Tier::Starter,
            status: Some("canceled".into()),
            price_id: sub
                .items
                .data
                .first()
                .and_then(|i| i.price())
                .map(|p| p.id.clone()),
            current_period_end: None,
        };
        self.apply(event, user.user_id, &change, &subscription, None, now)
            .await
    }

    async fn apply(
        &self,
        event: &Event,
        user: UserId,
        change: &PlanChange,
        subscription: &UserSubscription,
        note: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, ProcessError> {
        let record = SubscriptionEvent {
            stripe_event_id: Some(event.id.clone()),
            event_type: event.event_type.clone(),
            tier: change.tier,
            status: change.subscription_status.clone(),
            note,
            created: DateTime::<Utc>::from_timestamp(event.created, 0).unwrap_or(now),
        };
        Ok(
            match self
                .store
                .apply_plan_event(user, change, subscription, &record, now)
                .await?
            {
                Applied::Applied => Outcome::Applied {
                    user,
                    tier: change.tier,
                },
                Applied::Stale => Outcome::Stale,
                Applied::Duplicate => Outcome::Duplicate,
            },
        )
    }
}

/// The parts of a Checkout Session processing reads.
#[derive(Debug, Clone, Deserialize)]
struct CheckoutObject {
    id: String,
    #[serde(default)]
    client_reference_id: Option<String>,
    #[serde(default)]
    customer_email: Option<String>,
    #[serde(default)]
    customer_details: Option<CustomerDetails>,
    #[serde(default, deserialize_with = "crate::objects::expandable")]
    subscription: Option<String>,
    #[serde(default)]
    payment_status: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct CustomerDetails {
    #[serde(default)]
    email: Option<String>,
}

impl CheckoutObject {
    fn email(&self) -> Option<&str> {
        self.customer_details
            .as_ref()
            .and_then(|d| d.email.as_deref())
            .or(self.customer_email.as_deref())
    }
}

#[cfg(test)]
mod tests;
