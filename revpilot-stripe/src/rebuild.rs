//! History rebuild: an account's Stripe objects -> the core's [`Account`] timeline. Pure: no I/O.
//!
//! - **Items.** The subscription object only tells the present. The past comes from invoice lines:
//!   each invoice's regular (non-proration) licensed lines give the prices and quantities billed
//!   for the period starting at their `period.start`; a proration line marks the instant of a
//!   mid-period change (`period.start`): a negative one takes its price and quantity away, a
//!   positive one adds them. Events (`customer.subscription.*`, the last 30 days) give the state
//!   right after a change at its exact instant and take precedence over a proration within a
//!   minute of them. The current items hold from the newest of those instants; a change that no
//!   invoice or event dates is reported as an [`Issue`] and placed at the export's newest instant.
//! - **Statuses.** Trialing from `trial_start` to `trial_end`, then active; `incomplete*` from the
//!   start; status changes from events; otherwise the current status from the instant the objects
//!   date it (`ended_at` for canceled, the failing invoice for past_due/unpaid, `trial_end` for
//!   paused). `pause_collection` pauses from the event that set it, else from the current period
//!   start (reported).
//! - **Discounts** from the subscription's and its invoices' discount objects (expanded), their
//!   coupons from the export's coupons; a discount known only by id is reported and left out.
//! - **Cash** from succeeded charges and their refunds.
//!
//! Anything that cannot be read is an [`Issue`]: the object is left out or placed as the issue
//! says, never guessed silently.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use chrono::DateTime;
use revpilot_core::model::{
    self, BillingScheme, Cancellation, DiscountOff, Duration, Interval, ItemPeriod, Metadata,
    Status, StatusChange, TiersMode, UsageType,
};
use revpilot_core::{Account, Currency};
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::export::Export;
use crate::objects::{self, CouponRef, DiscountRef};

/// Something in the export that could not be read as it stands, and what was done instead.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    /// The Stripe object (`sub_...`, `price_...`, `ch_...`, ...).
    pub object: String,
    /// What is wrong and what the rebuild did.
    pub problem: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.problem)
    }
}

/// The rebuilt account and what could not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rebuilt {
    /// The timeline the metrics engine reads.
    pub account: Account,
    /// What could not be read, in input order.
    pub issues: Vec<Issue>,
    /// The newest instant any object or event carries: what the data is known up to when
    /// nothing better (a sync's time, an export's) is known. `None` for an empty account.
    pub as_of: Option<model::Instant>,
}

/// Events within this many seconds of a proration describe the same change.
const SAME_CHANGE_SECS: i64 = 60;

fn instant(secs: i64) -> Option<model::Instant> {
    DateTime::from_timestamp(secs, 0)
}

struct Ctx<'a> {
    prices: HashMap<&'a str, Arc<model::Price>>,
    /// Price ids known but unusable (already reported).
    bad_prices: HashSet<&'a str>,
    coupons: HashMap<&'a str, &'a objects::Coupon>,
    issues: Vec<Issue>,
    /// The newest instant anything in the export carries.
    as_of: i64,
}

impl Ctx<'_> {
    fn issue(&mut self, object: &str, problem: impl Into<String>) {
        self.issues.push(Issue {
            object: object.to_owned(),
            problem: problem.into(),
        });
    }
}

/// Converts a Stripe price (or plan) into the core's price.
///
/// # Errors
/// A description of what the price lacks.
pub fn convert_price(p: &objects::Price) -> Result<model::Price, String> {
    let currency = Currency::parse(&p.currency).map_err(|e| e.to_string())?;
    let (interval, interval_count, usage) = match (&p.recurring, &p.interval) {
        (Some(r), _) => (Some(&r.interval), r.interval_count, Some(&r.usage_type)),
        (None, Some(i)) => (
            Some(i),
            p.interval_count.unwrap_or(1),
            p.usage_type.as_ref(),
        ),
        (None, None) => (None, 1, None),
    };
    let interval = match interval.map(String::as_str) {
        None => None,
        Some("day") => Some(Interval::Day),
        Some("week") => Some(Interval::Week),
        Some("month") => Some(Interval::Month),
        Some("year") => Some(Interval::Year),
        Some(other) => return Err(format!("unknown interval {other:?}")),
    };
    let usage_type = match usage.map(String::as_str) {
        None | Some("licensed") => UsageType::Licensed,
        Some("metered") => UsageType::Metered,
        Some(other) => return Err(format!("unknown usage_type {other:?}")),
    };
    let unit = p
        .unit_amount_decimal
        .or(p.unit_amount)
        .or(p.amount_decimal)
        .or(p.amount);
    let (scheme, unit_amount) = match p.billing_scheme.as_deref() {
        Some("tiered") => {
            let mode = match p.tiers_mode.as_deref() {
                Some("volume") => TiersMode::Volume,
                Some("graduated") => TiersMode::Graduated,
                other => return Err(format!("tiered price with tiers_mode {other:?}")),
            };
            let Some(tiers) = &p.tiers else {
                return Err("tiered price without `tiers` (expand data.tiers)".to_owned());
            };
            let tiers = tiers
                .iter()
                .map(|t| model::Tier {
                    up_to: t.up_to,
                    unit_amount: t.unit_amount_decimal.or(t.unit_amount).unwrap_or_default(),
                    flat_amount: t.flat_amount.unwrap_or_default(),
                })
                .collect();
            (BillingScheme::Tiered { mode, tiers }, Decimal::ZERO)
        }
        None | Some("per_unit") => match unit {
            Some(u) => (BillingScheme::PerUnit, u),
            None => return Err("per-unit price without an amount".to_owned()),
        },
        Some(other) => return Err(format!("unknown billing_scheme {other:?}")),
    };
    Ok(model::Price {
        id: p.id.clone(),
        product: p.product.clone(),
        currency: Some(currency),
        unit_amount,
        interval,
        interval_count,
        scheme,
        usage_type,
    })
}

/// The licensed state of a subscription's items: price id -> quantity.
type State<'a> = BTreeMap<&'a str, u64>;

/// What is known to have happened at one instant.
#[derive(Default)]
struct Fact<'a> {
    /// The complete state right after the instant (from an event or a regular invoice).
    full: Option<State<'a>>,
    /// Prorations: (price, quantity) taken away and added.
    removed: Vec<(&'a str, u64)>,
    added: Vec<(&'a str, u64)>,
    /// The invoice whose regular lines gave `full` (none when an event gave it).
    full_from: Option<&'a str>,
    /// A status change (from an event).
    status: Option<Status>,
    /// Collection was paused (from an event).
    paused: bool,
}

fn parse_status(s: &str) -> Option<Status> {
    Some(match s {
        "trialing" => Status::Trialing,
        "active" => Status::Active,
        "past_due" => Status::PastDue,
        "unpaid" => Status::Unpaid,
        "paused" => Status::Paused,
        "incomplete" => Status::Incomplete,
        "incomplete_expired" => Status::IncompleteExpired,
        "canceled" => Status::Canceled,
        _ => return None,
    })
}

/// Rebuilds the account's history from its Stripe objects, all held in memory.
///
/// This is the simple path, kept as the oracle of [`stream`]'s tests: [`stream::rebuild_reader`]
/// yields exactly the same [`Rebuilt`] without ever holding every object.
///
/// An object that appears more than once (an export listed while the account changed) counts
/// once, as its last occurrence; prices are the exception, the first readable definition of a
/// price id wins, whoever embeds it (the price list, then subscription items, then invoice lines).
pub fn rebuild(export: &Export) -> Rebuilt {
    let mut cx = Ctx {
        prices: HashMap::new(),
        bad_prices: HashSet::new(),
        coupons: HashMap::new(),
        issues: Vec::new(),
        as_of: newest_instant(export),
    };
    collect_prices(export, &mut cx);
    for c in &export.coupons {
        cx.coupons.insert(&c.id, c);
    }
    let mut account = Account::default();
    for c in latest(&export.customers, |c| &c.id) {
        if let Some(c) = customer(c, &mut cx.issues) {
            account.customers.push(c);
        }
    }
    let mut names = Names::default();
    let mut invoices: HashMap<&str, Vec<InvoiceDigest>> = HashMap::new();
    for inv in latest(&export.invoices, |i| &i.id) {
        if let Some(sub) = inv.subscription_id() {
            invoices
                .entry(sub)
                .or_default()
                .push(InvoiceDigest::of(inv, &mut names));
        }
    }
    let mut events: HashMap<String, Vec<(&objects::Event, objects::Subscription)>> = HashMap::new();
    for e in latest(&export.events, |e| &e.id) {
        if let Some(sub) = event_subscription(e, &mut cx.issues) {
            events.entry(sub.id.clone()).or_default().push((e, sub));
        }
    }
    for sub in latest(&export.subscriptions, |s| &s.id) {
        let invs = invoices.remove(sub.id.as_str()).unwrap_or_default();
        let evs = events.remove(&sub.id).unwrap_or_default();
        if let Some(s) = rebuild_one(sub, invs, evs, &mut cx) {
            account.subscriptions.push(s);
        }
    }
    for ch in latest(&export.charges, |c| &c.id) {
        if let Some(p) = payment(ch, &mut cx.issues) {
            account.payments.push(p);
        }
    }
    attach_disputes(
        &mut account.payments,
        latest(&export.disputes, |d| &d.id),
        &mut cx.issues,
    );
    Rebuilt {
        account,
        issues: cx.issues,
        as_of: export
            .exported_at
            .and_then(instant)
            .or_else(|| (cx.as_of > 0).then(|| instant(cx.as_of)).flatten()),
    }
}

/// The last occurrence of each id, in the order of those occurrences.
fn latest<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<&T> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    for (i, t) in items.iter().enumerate() {
        last.insert(id(t), i);
    }
    items
        .iter()
        .enumerate()
        .filter(|(i, t)| last.get(id(t)) == Some(i))
        .map(|(_, t)| t)
        .collect()
}

/// One subscription with its invoices (any order) and its events (any order).
fn rebuild_one(
    sub: &objects::Subscription,
    mut invoices: Vec<InvoiceDigest>,
    mut events: Vec<(&objects::Event, objects::Subscription)>,
    cx: &mut Ctx<'_>,
) -> Option<model::Subscription> {
    invoices.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    events.sort_by(|a, b| (a.0.created, &a.0.id).cmp(&(b.0.created, &b.0.id)));
    let invs: Vec<&InvoiceDigest> = invoices.iter().collect();
    rebuild_subscription(sub, &invs, &events, cx)
}

/// A customer, or `None` (with an issue) when it cannot be placed in time.
fn customer(c: &objects::Customer, issues: &mut Vec<Issue>) -> Option<model::Customer> {
    let Some(created) = instant(c.created) else {
        issues.push(Issue {
            object: c.id.clone(),
            problem: format!("created {} is not a valid time; left out", c.created),
        });
        return None;
    };
    Some(model::Customer {
        id: c.id.clone(),
        created,
        country: c.address.as_ref().and_then(|a| a.country.clone()),
        metadata: c
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Metadata>(),
    })
}

/// The subscription a `customer.subscription.*` event carries; `None` for other events, and
/// for an unreadable one (with an issue).
fn event_subscription(
    e: &objects::Event,
    issues: &mut Vec<Issue>,
) -> Option<objects::Subscription> {
    if !e.event_type.starts_with("customer.subscription.") {
        return None;
    }
    match objects::Subscription::deserialize(&e.data.object) {
        Ok(sub) => Some(sub),
        Err(err) => {
            issues.push(Issue {
                object: e.id.clone(),
                problem: format!("subscription in event unreadable ({err}); event ignored"),
            });
            None
        }
    }
}

/// Interned names (price and subscription ids): a million invoice lines share a few strings.
#[derive(Default)]
pub(crate) struct Names(HashSet<Arc<str>>);

impl Names {
    pub(crate) fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.0.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.0.insert(n.clone());
        n
    }
}

/// What the rebuild reads of one invoice, a small fraction of the parsed object: the streaming
/// rebuild keeps these, grouped by subscription, until the subscriptions are rebuilt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InvoiceDigest {
    pub(crate) id: Box<str>,
    pub(crate) created: i64,
    /// `open` or `uncollectible`: it dates a past_due or unpaid status.
    unpaid: bool,
    lines_has_more: bool,
    /// The lines that name a price and a period, in order.
    lines: Vec<LineDigest>,
    discount: Option<Box<objects::Discount>>,
    discounts: Vec<DiscountRef>,
}

#[derive(Debug, Clone, PartialEq)]
struct LineDigest {
    price: Arc<str>,
    period_start: i64,
    quantity: u64,
    proration: bool,
    /// A negative amount: a proration taking its price away.
    negative: bool,
}

impl InvoiceDigest {
    pub(crate) fn of(inv: &objects::Invoice, names: &mut Names) -> Self {
        InvoiceDigest {
            id: inv.id.as_str().into(),
            created: inv.created,
            unpaid: matches!(inv.status.as_deref(), Some("open" | "uncollectible")),
            lines_has_more: inv.lines.has_more,
            lines: inv
                .lines
                .data
                .iter()
                .filter_map(|line| {
                    Some(LineDigest {
                        price: names.get(line.price_id()?),
                        period_start: line.period?.start,
                        quantity: line.quantity.unwrap_or(1),
                        proration: line.is_proration(),
                        negative: line.amount.is_some_and(|a| a < Decimal::ZERO),
                    })
                })
                .collect(),
            discount: inv.discount.clone().map(Box::new),
            discounts: inv.discounts.clone(),
        }
    }
}

fn newest_instant(export: &Export) -> i64 {
    let subs = export.subscriptions.iter().flat_map(|s| {
        [
            Some(s.created),
            s.canceled_at,
            s.ended_at,
            s.current_period_start,
        ]
        .into_iter()
        .flatten()
        .chain(s.items.data.iter().filter_map(|i| i.current_period_start))
    });
    export
        .customers
        .iter()
        .map(|c| c.created)
        .chain(subs)
        .chain(export.invoices.iter().map(|i| i.created))
        .chain(export.charges.iter().map(|c| c.created))
        .chain(export.events.iter().map(|e| e.created))
        .chain(export.disputes.iter().map(|d| d.created))
        .max()
        .unwrap_or(0)
}

fn collect_prices<'a>(export: &'a Export, cx: &mut Ctx<'a>) {
    let embedded = export
        .subscriptions
        .iter()
        .flat_map(|s| s.items.data.iter().filter_map(|i| i.price()))
        .chain(export.invoices.iter().flat_map(|i| {
            i.lines
                .data
                .iter()
                .filter_map(|l| l.price.as_ref().or(l.plan.as_ref()))
        }));
    for p in export.prices.iter().chain(embedded) {
        consider_price(p, cx);
    }
}

/// The first definition of a price id wins, readable or not.
fn consider_price<'a>(p: &'a objects::Price, cx: &mut Ctx<'a>) {
    if cx.prices.contains_key(p.id.as_str()) || cx.bad_prices.contains(p.id.as_str()) {
        return;
    }
    match convert_price(p) {
        Ok(price) => {
            cx.prices.insert(&p.id, Arc::new(price));
        }
        Err(problem) => {
            cx.bad_prices.insert(&p.id);
            cx.issue(&p.id, format!("{problem}; items billing it are left out"));
        }
    }
}

fn is_licensed(cx: &Ctx<'_>, price: &str) -> bool {
    cx.prices
        .get(price)
        .is_none_or(|p| p.usage_type == UsageType::Licensed)
}

fn items_state<'a>(sub: &'a objects::Subscription, cx: &Ctx<'_>) -> State<'a> {
    let mut state = State::new();
    for item in &sub.items.data {
        if let Some(p) = item.price()
            && is_licensed(cx, &p.id)
        {
            *state.entry(p.id.as_str()).or_default() += item.quantity.unwrap_or(1);
        }
    }
    state
}

fn rebuild_subscription(
    sub: &objects::Subscription,
    invoices: &[&InvoiceDigest],
    events: &[(&objects::Event, objects::Subscription)],
    cx: &mut Ctx<'_>,
) -> Option<model::Subscription> {
    let Some(code) = sub.currency() else {
        cx.issue(
            &sub.id,
            "no currency on the subscription or its prices; subscription left out",
        );
        return None;
    };
    let currency = match Currency::parse(code) {
        Ok(c) => c,
        Err(e) => {
            cx.issue(&sub.id, format!("{e}; subscription left out"));
            return None;
        }
    };
    let Some(customer) = sub.customer.clone() else {
        cx.issue(&sub.id, "no customer; subscription left out");
        return None;
    };
    let start_secs = sub.start_date.unwrap_or(sub.created);
    let (Some(created), Some(_)) = (instant(sub.created), instant(start_secs)) else {
        cx.issue(
            &sub.id,
            "created or start_date is not a valid time; subscription left out",
        );
        return None;
    };
    if sub.items.has_more {
        cx.issue(
            &sub.id,
            "more than the embedded items (has_more): only those listed are counted",
        );
    }

    // Facts keyed by instant.
    let mut facts: BTreeMap<i64, Fact<'_>> = BTreeMap::new();
    for inv in invoices {
        if inv.lines_has_more {
            cx.issue(
                &inv.id,
                "lines cut at the embedded page (has_more); the rest are missing",
            );
        }
        let mut regular: Option<(i64, State<'_>)> = None;
        for line in &inv.lines {
            let price = &*line.price;
            if !is_licensed(cx, price) {
                continue;
            }
            let (qty, start) = (line.quantity, line.period_start);
            if line.proration {
                let fact = facts.entry(start).or_default();
                if line.negative {
                    fact.removed.push((price, qty));
                } else {
                    fact.added.push((price, qty));
                }
            } else {
                let (at, state) = regular.get_or_insert_with(|| (start, State::new()));
                *at = (*at).min(start);
                *state.entry(price).or_default() += qty;
            }
        }
        if let Some((at, state)) = regular {
            let fact = facts.entry(at).or_default();
            if fact.full.is_none() {
                fact.full = Some(state);
                fact.full_from = Some(&*inv.id);
            }
        }
    }
    for (e, obj) in events {
        let Some(prev) = e.data.previous_attributes.as_ref() else {
            if e.event_type == "customer.subscription.created" {
                let fact = facts.entry(e.created).or_default();
                fact.full = Some(items_state_owned(obj, cx));
                fact.full_from = None;
            }
            continue;
        };
        let fact = facts.entry(e.created).or_default();
        if prev.get("items").is_some()
            || prev.get("quantity").is_some()
            || prev.get("plan").is_some()
        {
            fact.full = Some(items_state_owned(obj, cx));
            fact.full_from = None;
        }
        if prev.get("status").is_some() {
            fact.status = parse_status(&obj.status);
        }
        if prev.get("pause_collection").is_some() && obj.pause_collection.is_some() {
            fact.paused = true;
        }
    }
    // A full state from an event within a minute supersedes prorations.
    let event_instants: Vec<i64> = events.iter().map(|(e, _)| e.created).collect();
    for (at, fact) in &mut facts {
        if fact.full.is_none()
            && event_instants
                .iter()
                .any(|e| (e - at).abs() <= SAME_CHANGE_SECS && *e != *at)
        {
            fact.removed.clear();
            fact.added.clear();
        }
    }

    let items = item_periods(sub, start_secs, &facts, &event_instants, cx);
    let statuses = statuses(sub, start_secs, invoices, &facts, cx);
    let discounts = discounts(sub, invoices, currency, cx);
    let cancellation = (sub.canceled_at.is_some()
        || sub.cancel_at_period_end
        || sub.cancel_at.is_some()
        || sub.ended_at.is_some())
    .then(|| Cancellation {
        canceled_at: sub.canceled_at.and_then(instant),
        cancel_at_period_end: sub.cancel_at_period_end,
        cancel_at: sub.cancel_at.and_then(instant),
        ended_at: sub.ended_at.and_then(instant),
    });
    Some(model::Subscription {
        id: sub.id.clone(),
        customer,
        currency,
        created,
        statuses,
        items,
        discounts,
        cancellation,
        trial_end: sub.trial_end.and_then(instant),
    })
}

/// Owned-key state for an event's subscription object (whose ids live in the event).
fn items_state_owned<'a>(obj: &objects::Subscription, cx: &Ctx<'a>) -> State<'a> {
    let mut state = State::new();
    for item in &obj.items.data {
        if let Some(p) = item.price() {
            // Keys borrow from the price table so the state outlives the event's clone.
            if let Some((k, price)) = cx.prices.get_key_value(p.id.as_str())
                && price.usage_type == UsageType::Licensed
            {
                *state.entry(*k).or_default() += item.quantity.unwrap_or(1);
            }
        }
    }
    state
}

fn item_periods(
    sub: &objects::Subscription,
    start: i64,
    facts: &BTreeMap<i64, Fact<'_>>,
    event_instants: &[i64],
    cx: &mut Ctx<'_>,
) -> Vec<ItemPeriod> {
    // Walk the facts into a sequence of (instant, state).
    let mut steps: Vec<(i64, State<'_>)> = Vec::new();
    let mut state: State<'_> = State::new();
    for (&at, fact) in facts {
        if let Some(full) = &fact.full {
            // A regular invoice billing other items than the state before it, with no proration
            // or event dating the change: the change is dated by that invoice's period start,
            // though it happened at some unknown instant of the period before.
            if let (Some(invoice), Some((prev_at, _))) = (fact.full_from, steps.last())
                && *full != state
                && fact.removed.is_empty()
                && fact.added.is_empty()
                && !event_instants
                    .iter()
                    .any(|e| (e - at).abs() <= SAME_CHANGE_SECS)
            {
                let problem = format!(
                    "items changed between {} and {} with no proration or event to date the change; \
                     dated by invoice {invoice}, whose period starts {}",
                    fmt_secs(*prev_at),
                    fmt_secs(at),
                    fmt_secs(at)
                );
                cx.issue(&sub.id, problem);
            }
            state = full.clone();
        } else if fact.removed.is_empty() && fact.added.is_empty() {
            continue;
        } else {
            for (p, q) in &fact.removed {
                match state.get_mut(p) {
                    Some(have) if *have > *q => *have -= q,
                    Some(_) => {
                        state.remove(p);
                    }
                    None => {}
                }
            }
            for (p, q) in &fact.added {
                *state.entry(p).or_default() += q;
            }
        }
        steps.push((at.max(start), state.clone()));
    }
    let current = items_state(sub, cx);
    let ended = sub.ended_at.is_some() || sub.status == "canceled";
    match steps.last() {
        None => steps.push((start, current)),
        Some((last_at, last)) if *last != current && !ended => {
            let last_at = *last_at;
            let added_at = sub
                .items
                .data
                .iter()
                .filter(|i| {
                    i.price()
                        .is_some_and(|p| last.get(p.id.as_str()) != current.get(p.id.as_str()))
                })
                .filter_map(|i| i.created)
                .max()
                .filter(|&c| c > last_at);
            let at = match added_at {
                Some(c) => c,
                None => {
                    let at = cx.as_of.max(last_at);
                    cx.issue(
                        &sub.id,
                        format!(
                            "items changed after {} with no proration or event to date the change; \
                             placed at {}",
                            fmt_secs(last_at),
                            fmt_secs(at)
                        ),
                    );
                    at
                }
            };
            steps.push((at, current));
        }
        Some(_) => {}
    }
    // Steps -> periods.
    let mut open: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    let mut out: Vec<(String, u64, i64, Option<i64>)> = Vec::new();
    for (at, state) in &steps {
        let closing: Vec<&str> = open
            .iter()
            .filter(|(p, (q, _))| state.get(*p) != Some(q))
            .map(|(p, _)| *p)
            .collect();
        for p in closing {
            if let Some((q, from)) = open.remove(p)
                && *at > from
            {
                out.push((p.to_owned(), q, from, Some(*at)));
            }
        }
        for (p, q) in state {
            open.entry(p).or_insert((*q, *at));
        }
    }
    for (p, (q, from)) in open {
        out.push((p.to_owned(), q, from, None));
    }
    out.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
    let mut periods = Vec::new();
    for (price, quantity, from, to) in out {
        let Some(p) = cx.prices.get(price.as_str()).cloned() else {
            if !cx.bad_prices.contains(price.as_str()) {
                cx.issue(
                    &sub.id,
                    format!("price {price} is not in the export; its item is left out"),
                );
            }
            continue;
        };
        let (Some(from), to) = (instant(from), to.and_then(instant)) else {
            continue;
        };
        if quantity == 0 {
            continue;
        }
        periods.push(ItemPeriod {
            price: p,
            quantity,
            from,
            to,
        });
    }
    periods
}

fn fmt_secs(secs: i64) -> String {
    instant(secs).map_or_else(|| secs.to_string(), |t| t.to_rfc3339())
}

fn statuses(
    sub: &objects::Subscription,
    start: i64,
    invoices: &[&InvoiceDigest],
    facts: &BTreeMap<i64, Fact<'_>>,
    cx: &mut Ctx<'_>,
) -> Vec<StatusChange> {
    let mut out: Vec<(i64, Status)> = Vec::new();
    let current = parse_status(&sub.status);
    if current.is_none() {
        cx.issue(
            &sub.id,
            format!("unknown status {:?}; read as active", sub.status),
        );
    }
    let current = current.unwrap_or(Status::Active);
    match current {
        Status::Incomplete | Status::IncompleteExpired => out.push((start, current)),
        _ => match (sub.trial_start, sub.trial_end) {
            (ts, Some(te)) if te > start => {
                out.push((ts.unwrap_or(start).max(start), Status::Trialing));
                if current != Status::Trialing {
                    out.push((te, Status::Active));
                }
            }
            _ => out.push((start, Status::Active)),
        },
    }
    for (&at, fact) in facts {
        if let Some(s) = fact.status {
            out.push((at, s));
        }
    }
    out.sort_by_key(|(at, _)| *at);
    let last = out.last().map(|(_, s)| *s);
    if last != Some(current) {
        let dated = match current {
            Status::Canceled => sub.ended_at.or(sub.canceled_at),
            Status::PastDue | Status::Unpaid => {
                invoices.iter().rev().find(|i| i.unpaid).map(|i| i.created)
            }
            Status::Paused => sub.trial_end,
            _ => None,
        };
        let at = match dated {
            Some(at) => at,
            None => {
                let at = cx.as_of;
                cx.issue(
                    &sub.id,
                    format!(
                        "status {} with no object or event to date it; placed at {}",
                        sub.status,
                        fmt_secs(at)
                    ),
                );
                at
            }
        };
        out.push((at, current));
    } else if current == Status::Canceled {
        // An event said canceled; the end of service is still `ended_at`.
    }
    if let Some(pause) = &sub.pause_collection {
        let from_event = facts
            .iter()
            .rev()
            .find(|(_, f)| f.paused)
            .map(|(at, _)| *at);
        let period_start = sub.current_period_start.or_else(|| {
            sub.items
                .data
                .iter()
                .filter_map(|i| i.current_period_start)
                .max()
        });
        let at = match (from_event, period_start) {
            (Some(at), _) => at,
            (None, Some(at)) => {
                cx.issue(
                    &sub.id,
                    format!(
                        "collection paused ({}) with no event dating the pause; paused from the current period start {}",
                        pause.behavior,
                        fmt_secs(at)
                    ),
                );
                at
            }
            (None, None) => {
                cx.issue(
                    &sub.id,
                    format!(
                        "collection paused ({}) with no date; paused from {}",
                        pause.behavior,
                        fmt_secs(cx.as_of)
                    ),
                );
                cx.as_of
            }
        };
        out.push((at, Status::Paused));
        if let Some(resume) = pause.resumes_at.filter(|r| *r > at) {
            out.push((resume, current));
        }
    }
    out.sort_by_key(|(at, _)| *at);
    out.dedup_by(|b, a| a.1 == b.1);
    out.into_iter()
        .filter_map(|(at, status)| {
            Some(StatusChange {
                at: instant(at)?,
                status,
            })
        })
        .collect()
}

fn discounts(
    sub: &objects::Subscription,
    invoices: &[&InvoiceDigest],
    currency: Currency,
    cx: &mut Ctx<'_>,
) -> Vec<model::Discount> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let refs = sub
        .discount
        .iter()
        .map(|d| (sub.id.as_str(), Some(d), None))
        .chain(
            sub.discounts
                .iter()
                .map(|r| (sub.id.as_str(), disc(r), id_of(r))),
        )
        .chain(invoices.iter().flat_map(|i| {
            i.discount
                .iter()
                .map(move |d| (&*i.id, Some(&**d), None))
                .chain(i.discounts.iter().map(move |r| (&*i.id, disc(r), id_of(r))))
        }))
        .collect::<Vec<_>>();
    for (holder, d, id) in refs {
        let Some(d) = d else {
            let id = id.unwrap_or("(no id)");
            if seen.insert(id.to_owned()) {
                cx.issue(
                    holder,
                    format!("discount {id} is not expanded (expand discounts); left out"),
                );
            }
            continue;
        };
        let coupon = match d.coupon() {
            Some(CouponRef::Coupon(c)) => Some(c),
            Some(CouponRef::Id(id)) => cx.coupons.get(id.as_str()).copied(),
            None => None,
        };
        let Some(coupon) = coupon else {
            cx.issue(
                holder,
                "discount whose coupon is not in the export; left out",
            );
            continue;
        };
        let key =
            d.id.clone()
                .unwrap_or_else(|| format!("{}@{}", coupon.id, d.start.unwrap_or_default()));
        if !seen.insert(key) {
            continue;
        }
        let Some(start) = d.start.and_then(instant) else {
            cx.issue(
                holder,
                format!("discount of coupon {} without a start; left out", coupon.id),
            );
            continue;
        };
        let off = match (coupon.percent_off, coupon.amount_off) {
            (Some(p), _) => DiscountOff::Percent(p),
            (None, Some(a)) => {
                let cur = coupon
                    .currency
                    .as_deref()
                    .map_or(Ok(currency), Currency::parse);
                match cur {
                    Ok(c) => DiscountOff::Amount {
                        amount: a,
                        currency: c,
                    },
                    Err(e) => {
                        cx.issue(&coupon.id, format!("{e}; discount left out"));
                        continue;
                    }
                }
            }
            (None, None) => {
                cx.issue(
                    &coupon.id,
                    "coupon with neither percent_off nor amount_off; left out",
                );
                continue;
            }
        };
        let duration = match coupon.duration.as_str() {
            "forever" => Duration::Forever,
            "once" => Duration::Once,
            "repeating" => match coupon.duration_in_months {
                Some(m) => Duration::Repeating { months: m },
                None => {
                    cx.issue(
                        &coupon.id,
                        "repeating coupon without duration_in_months; left out",
                    );
                    continue;
                }
            },
            other => {
                cx.issue(
                    &coupon.id,
                    format!("unknown coupon duration {other:?}; left out"),
                );
                continue;
            }
        };
        out.push(model::Discount {
            coupon: coupon.id.clone(),
            off,
            duration,
            start,
            end: d.end.and_then(instant),
        });
    }
    out.sort_by_key(|d| d.start);
    out
}

fn disc(r: &DiscountRef) -> Option<&objects::Discount> {
    match r {
        DiscountRef::Discount(d) => Some(d),
        DiscountRef::Id(_) => None,
    }
}

fn id_of(r: &DiscountRef) -> Option<&str> {
    match r {
        DiscountRef::Discount(d) => d.id.as_deref(),
        DiscountRef::Id(id) => Some(id),
    }
}

/// A succeeded charge as cash, with its succeeded refunds.
fn payment(ch: &objects::Charge, issues: &mut Vec<Issue>) -> Option<model::Payment> {
    let mut issue = |object: &str, problem: String| {
        issues.push(Issue {
            object: object.to_owned(),
            problem,
        });
    };
    if ch.status != "succeeded" {
        return None;
    }
    let currency = match Currency::parse(&ch.currency) {
        Ok(c) => c,
        Err(e) => {
            issue(&ch.id, format!("{e}; charge left out"));
            return None;
        }
    };
    let Some(at) = instant(ch.created) else {
        issue(
            &ch.id,
            "created is not a valid time; charge left out".to_owned(),
        );
        return None;
    };
    let amount = ch
        .amount_captured
        .filter(|a| *a > Decimal::ZERO)
        .unwrap_or(ch.amount);
    let mut refunds = Vec::new();
    let mut listed = Decimal::ZERO;
    if let Some(list) = &ch.refunds {
        for r in &list.data {
            if r.status.as_deref().is_some_and(|s| s != "succeeded") {
                continue;
            }
            let Some(at) = instant(r.created) else {
                issue(
                    &r.id,
                    "created is not a valid time; refund left out".to_owned(),
                );
                continue;
            };
            listed += r.amount;
            refunds.push(model::Refund {
                at,
                amount: r.amount,
            });
        }
    }
    if let Some(total) = ch.amount_refunded
        && total > listed
    {
        issue(
            &ch.id,
            format!(
                "amount_refunded {total} exceeds the refunds listed ({listed}): list the charge's refunds in full"
            ),
        );
    }
    Some(model::Payment {
        id: ch.id.clone(),
        customer: ch.customer.clone(),
        at,
        amount,
        currency,
        refunds,
        disputes: Vec::new(),
    })
}

/// Gives each payment the cash its disputes moved (in the disputes' order); a dispute whose
/// charge is not a succeeded payment of the account, or in another currency, is an issue.
pub(crate) fn attach_disputes<'d>(
    payments: &mut [model::Payment],
    disputes: impl IntoIterator<Item = &'d objects::Dispute>,
    issues: &mut Vec<Issue>,
) {
    let mut by_charge: HashMap<&str, Vec<&objects::Dispute>> = HashMap::new();
    for d in disputes {
        match d.charge.as_deref() {
            Some(ch) => by_charge.entry(ch).or_default().push(d),
            None => issues.push(Issue {
                object: d.id.clone(),
                problem: "dispute without a charge; left out".to_owned(),
            }),
        }
    }
    if by_charge.is_empty() {
        return;
    }
    for p in payments.iter_mut() {
        let Some(ds) = by_charge.remove(p.id.as_str()) else {
            continue;
        };
        for d in ds {
            p.disputes.extend(dispute_moves(d, p.currency, issues));
        }
    }
    let mut left: Vec<&objects::Dispute> = by_charge.into_values().flatten().collect();
    left.sort_by(|a, b| a.id.cmp(&b.id));
    for d in left {
        issues.push(Issue {
            object: d.id.clone(),
            problem: format!(
                "dispute of charge {} which is not a succeeded charge of the account; left out",
                d.charge.as_deref().unwrap_or_default()
            ),
        });
    }
}

/// The cash a dispute moved. An inquiry (`warning_*`) moves none. With its balance
/// transactions, each is one move at its instant: the withdrawal (amount and fee, negative) and,
/// when won, the reinstatement (positive); one in another currency than the dispute moves the
/// dispute's amount, without its fee. Without them, a dispute not won took its amount on the
/// day it opened, and a won one gave back what it took (nothing in all).
fn dispute_moves(
    d: &objects::Dispute,
    currency: Currency,
    issues: &mut Vec<Issue>,
) -> Vec<model::DisputeMove> {
    if d.status.starts_with("warning_") {
        return Vec::new();
    }
    if Currency::parse(&d.currency).ok() != Some(currency) {
        issues.push(Issue {
            object: d.id.clone(),
            problem: format!(
                "dispute in {} of a charge in {}; left out",
                d.currency,
                currency.as_str()
            ),
        });
        return Vec::new();
    }
    let moves: Vec<(i64, Decimal)> = if d.balance_transactions.is_empty() {
        if d.status == "won" {
            Vec::new()
        } else {
            vec![(d.created, -d.amount)]
        }
    } else {
        d.balance_transactions
            .iter()
            .map(|b| {
                if b.currency.eq_ignore_ascii_case(&d.currency) {
                    (b.created, b.amount - b.fee.unwrap_or_default())
                } else if b.amount < Decimal::ZERO {
                    (b.created, -d.amount)
                } else {
                    (b.created, d.amount)
                }
            })
            .collect()
    };
    let mut out = Vec::with_capacity(moves.len());
    for (at, amount) in moves {
        match instant(at) {
            Some(at) => out.push(model::DisputeMove { at, amount }),
            None => issues.push(Issue {
                object: d.id.clone(),
                problem: "a balance transaction's created is not a valid time; left out".to_owned(),
            }),
        }
    }
    out
}

pub mod derived;
pub mod stream;

#[cfg(test)]
mod tests;
