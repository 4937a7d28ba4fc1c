//! Insights analytics: every figure an insight may cite, computed here, deterministically, from
//! the metrics engine. A language model (or the offline narrative) only explains and ranks these
//! figures; it never produces a number. Each figure has a stable id, so a narrative can cite it
//! and a dashboard can show why.
//!
//! The five kinds of the seed's insights page, plus what-if scenarios:
//! - revenue prediction: [`forecast`] (Holt's linear trend on month-end MRR, 3/6/12 months, with
//!   an approximate 95 % interval);
//! - churn risk: customers whose subscription is past due or unpaid, is set to cancel, or
//!   contracted in the last 30 days, with the MRR at risk (aggregated by reason and by plan);
//! - growth opportunities and pricing suggestions: per plan (main price), customers, MRR, ARPA
//!   quartiles, expansion, contraction and churn rates over the last 90 days, and discount
//!   leakage (list-price MRR less billed MRR);
//! - health score 0-100: four documented components of 25 points each;
//! - [`scenario`]: a price change, a churn change and a new-customer growth change, projected.
//!
//! Methods and the measured forecast error: `docs/insights.md`.

pub mod forecast;
pub mod narrative;
pub mod scenario;

use std::collections::{BTreeMap, HashMap};

use chrono::{Datelike, Months, NaiveDate, TimeZone, Utc};
use rust_decimal::{Decimal, MathematicalOps};
use serde::{Deserialize, Serialize};

use crate::metrics::{Engine, Error, Granularity, MovementKind, SeriesRequest, SeriesRow};
use crate::model::{Account, Status};
use crate::money::Currency;

/// What a figure measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// An amount in the analysis currency (per month unless the label says otherwise).
    Money,
    /// A percentage (5 means 5 %).
    Percent,
    /// A count.
    Count,
    /// A plain ratio.
    Ratio,
    /// Points of the health score.
    Points,
}

/// A computed number an insight may cite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figure {
    /// Stable id (`mrr`, `forecast_mrr_6m`, `plan_2_expansion_rate_90d`, ...).
    pub id: String,
    /// What it is, in words.
    pub label: String,
    /// The value, rounded for display (money to the currency's minor unit, rates to 0.01).
    pub value: Decimal,
    /// Its unit.
    pub unit: Unit,
}

/// The insight kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InsightKind {
    /// MRR forecast.
    RevenuePrediction,
    /// Customers and MRR at risk.
    ChurnRisk,
    /// Where MRR can grow.
    GrowthOpportunities,
    /// Plans whose price or packaging deserves a look.
    PricingSuggestions,
    /// The health score and its components.
    HealthScore,
}

impl InsightKind {
    /// Every kind, in display order.
    pub const ALL: [InsightKind; 5] = [
        InsightKind::RevenuePrediction,
        InsightKind::ChurnRisk,
        InsightKind::GrowthOpportunities,
        InsightKind::PricingSuggestions,
        InsightKind::HealthScore,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            InsightKind::RevenuePrediction => "revenue_prediction",
            InsightKind::ChurnRisk => "churn_risk",
            InsightKind::GrowthOpportunities => "growth_opportunities",
            InsightKind::PricingSuggestions => "pricing_suggestions",
            InsightKind::HealthScore => "health_score",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<InsightKind> {
        InsightKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Why a customer is at risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskReason {
    /// A subscription is `past_due` (a payment failed and is being retried).
    PastDue,
    /// A subscription is `unpaid` (retries exhausted, invoices open).
    Unpaid,
    /// A subscription is set to cancel.
    CancelScheduled,
    /// The customer's MRR contracted in the last 30 days.
    RecentContraction,
}

impl RiskReason {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RiskReason::PastDue => "past_due",
            RiskReason::Unpaid => "unpaid",
            RiskReason::CancelScheduled => "cancel_scheduled",
            RiskReason::RecentContraction => "recent_contraction",
        }
    }
}

/// A customer at risk (kept out of any prompt: only aggregates leave the engine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtRisk {
    /// Customer id.
    pub customer: String,
    /// Their MRR now.
    pub mrr: Decimal,
    /// Why.
    pub reasons: Vec<RiskReason>,
}

/// One plan's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStats {
    /// The main price id.
    pub plan: String,
    /// Paying customers on it now.
    pub customers: u64,
    /// MRR on it now.
    pub mrr: Decimal,
    /// ARPA quartiles (25th, median, 75th percentile of MRR per customer).
    pub arpa_quartiles: [Decimal; 3],
    /// Expansion (and reactivation) MRR over 90 days / MRR 90 days ago, in %.
    pub expansion_rate: Option<Decimal>,
    /// Contraction MRR over 90 days / MRR 90 days ago, in %.
    pub contraction_rate: Option<Decimal>,
    /// Churned MRR over 90 days / MRR 90 days ago, in %.
    pub churn_rate: Option<Decimal>,
    /// List-price MRR less billed MRR of its customers now: what discounts cost.
    pub discount_leakage: Decimal,
}

/// One component of the health score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthComponent {
    /// `growth`, `nrr`, `churn` or `quick_ratio`.
    pub name: String,
    /// The measured input (%, or the ratio for `quick_ratio`), when there is data.
    pub input: Option<Decimal>,
    /// Points, 0-25 (a missing input scores the midpoint, 12.5).
    pub points: Decimal,
}

/// Everything the insights rest on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    /// Reporting currency.
    pub currency: Currency,
    /// The day analysed.
    pub as_of: NaiveDate,
    /// Month-end MRR, oldest first (the forecast's input).
    pub monthly_mrr: Vec<(NaiveDate, Decimal)>,
    /// The forecast at 3, 6 and 12 months, when there are at least 3 months.
    pub forecast: Vec<forecast::Point>,
    /// Customers at risk, largest MRR first.
    pub at_risk: Vec<AtRisk>,
    /// Per plan, largest MRR first.
    pub plans: Vec<PlanStats>,
    /// The health score's components.
    pub health: Vec<HealthComponent>,
    /// The health score, 0-100.
    pub health_score: Decimal,
    /// Every figure an insight may cite.
    pub figures: Vec<Figure>,
    /// Which figures belong to which insight kind.
    pub figures_by_kind: BTreeMap<InsightKind, Vec<String>>,
}

impl Analysis {
    /// The figure with this id.
    pub fn figure(&self, id: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.id == id)
    }
}

/// Months of history the forecast and the trend rates read.
pub const HISTORY_MONTHS: u32 = 24;

/// Maps `input` linearly from `[zero_at, full_at]` onto `[0, 25]` points, clamped (either
/// direction: `zero_at > full_at` scores lower inputs higher).
fn scale(input: Option<Decimal>, zero_at: Decimal, full_at: Decimal) -> Decimal {
    let Some(x) = input else {
        return Decimal::new(125, 1);
    };
    let t = (x - zero_at) / (full_at - zero_at);
    (t.clamp(Decimal::ZERO, Decimal::ONE) * Decimal::from(25)).round_dp(2)
}

fn pct(v: Decimal) -> Decimal {
    (v * Decimal::ONE_HUNDRED).round_dp(2)
}

fn ratio(num: Decimal, den: Decimal) -> Option<Decimal> {
    (!den.is_zero()).then(|| num / den)
}

fn quartiles(mut v: Vec<Decimal>) -> [Decimal; 3] {
    if v.is_empty() {
        return [Decimal::ZERO; 3];
    }
    v.sort();
    let at = |q: usize| v[(v.len() - 1) * q / 4];
    [at(1), at(2), at(3)]
}

/// The subscription's status at `at` (its last change at or before).
fn status_at(statuses: &[crate::model::StatusChange], at: crate::model::Instant) -> Option<Status> {
    statuses
        .iter()
        .filter(|s| s.at <= at)
        .max_by_key(|s| s.at)
        .map(|s| s.status)
}

/// Analyses `account` through `engine` as of the end of `as_of`.
///
/// # Errors
/// The engine's [`Error`] (an unknown reporting currency, amounts too large).
pub fn analyze(
    engine: &Engine<'_>,
    account: &Account,
    as_of: NaiveDate,
) -> Result<Analysis, Error> {
    let currency = engine.currency();
    let money = |v: Decimal| currency.round(v);
    let first = as_of
        .checked_sub_months(Months::new(HISTORY_MONTHS - 1))
        .and_then(|d| d.with_day(1))
        .unwrap_or(as_of);
    let monthly = engine.series(&SeriesRequest::new(first, as_of, Granularity::Month))?;
    let rows: Vec<&SeriesRow> = monthly.rows.iter().collect();
    // Months before the first paying customer say nothing about the trend.
    let start = rows
        .iter()
        .position(|r| !r.mrr.is_zero())
        .unwrap_or(rows.len());
    let monthly_mrr: Vec<(NaiveDate, Decimal)> =
        rows[start..].iter().map(|r| (r.date, r.mrr)).collect();
    let values: Vec<Decimal> = monthly_mrr.iter().map(|(_, v)| *v).collect();
    let forecast: Vec<forecast::Point> = forecast::Holt::fit(&values)
        .map(|m| [3, 6, 12].into_iter().map(|h| m.forecast(h)).collect())
        .unwrap_or_default();

    let end = Utc.from_utc_datetime(&as_of.and_hms_opt(23, 59, 59).unwrap_or_default());
    let now = engine.mrr_at(end)?;
    let mrr_of: HashMap<&str, Decimal> = now
        .customers
        .iter()
        .map(|c| (c.customer.as_str(), c.mrr))
        .collect();

    // Discount leakage: the same account at list prices, less what it bills.
    let mut list_account = account.clone();
    for sub in &mut list_account.subscriptions {
        sub.discounts.clear();
    }
    let list = engine.for_account(&list_account).mrr_at(end)?;
    let list_of: HashMap<&str, Decimal> = list
        .customers
        .iter()
        .map(|c| (c.customer.as_str(), c.mrr))
        .collect();

    // The last 90 days' movements.
    let d90 = as_of - chrono::Duration::days(90);
    let d30 = as_of - chrono::Duration::days(30);
    let ledger = engine.movements(d90 + chrono::Duration::days(1), as_of)?;

    // Churn risk.
    let instant = end;
    let mut reasons: BTreeMap<&str, Vec<RiskReason>> = BTreeMap::new();
    for sub in &account.subscriptions {
        if !mrr_of.contains_key(sub.customer.as_str()) {
            continue;
        }
        let mut add = |r: RiskReason| {
            let v = reasons.entry(sub.customer.as_str()).or_default();
            if !v.contains(&r) {
                v.push(r);
            }
        };
        match status_at(&sub.statuses, instant) {
            Some(Status::PastDue) => add(RiskReason::PastDue),
            Some(Status::Unpaid) => add(RiskReason::Unpaid),
            _ => {}
        }
        if let Some(c) = &sub.cancellation {
            let scheduled = c.cancel_at_period_end || c.cancel_at.is_some_and(|t| t > instant);
            let ended = c.ended_at.is_some_and(|t| t <= instant);
            if scheduled && !ended {
                add(RiskReason::CancelScheduled);
            }
        }
    }
    for m in &ledger.movements {
        if m.kind == MovementKind::Contraction
            && m.date > d30
            && mrr_of.contains_key(m.customer.as_str())
        {
            let v = reasons.entry(m.customer.as_str()).or_default();
            if !v.contains(&RiskReason::RecentContraction) {
                v.push(RiskReason::RecentContraction);
            }
        }
    }
    let mut at_risk: Vec<AtRisk> = reasons
        .into_iter()
        .map(|(customer, mut reasons)| {
            reasons.sort();
            AtRisk {
                mrr: mrr_of.get(customer).copied().unwrap_or_default(),
                customer: customer.to_owned(),
                reasons,
            }
        })
        .collect();
    at_risk.sort_by(|a, b| b.mrr.cmp(&a.mrr).then_with(|| a.customer.cmp(&b.customer)));

    // Plans: each paying customer under the main price of their largest subscription item.
    let mut plan_of_sub: HashMap<&str, &str> = HashMap::new();
    let mut plan_of_customer: HashMap<&str, (&str, Decimal)> = HashMap::new();
    for sub in &account.subscriptions {
        let main = sub
            .items
            .iter()
            .filter(|i| i.from <= instant && i.to.is_none_or(|t| t > instant))
            .max_by(|a, b| {
                (a.price.unit_amount * Decimal::from(a.quantity))
                    .cmp(&(b.price.unit_amount * Decimal::from(b.quantity)))
                    .then_with(|| b.price.id.cmp(&a.price.id))
            })
            .or_else(|| sub.items.last());
        if let Some(item) = main {
            plan_of_sub.insert(sub.id.as_str(), item.price.id.as_str());
            let weight = item.price.unit_amount * Decimal::from(item.quantity);
            let e = plan_of_customer
                .entry(sub.customer.as_str())
                .or_insert((item.price.id.as_str(), weight));
            if weight > e.1 {
                *e = (item.price.id.as_str(), weight);
            }
        }
    }
    let mut per_plan: BTreeMap<&str, (Vec<Decimal>, [Decimal; 4], Decimal)> = BTreeMap::new();
    for (customer, mrr) in &mrr_of {
        if let Some((plan, _)) = plan_of_customer.get(customer) {
            let e = per_plan.entry(plan).or_default();
            e.0.push(*mrr);
            e.2 += list_of.get(customer).copied().unwrap_or(*mrr) - *mrr;
        }
    }
    for m in &ledger.movements {
        let Some(plan) = m
            .subscriptions
            .iter()
            .find_map(|s| plan_of_sub.get(s.as_str()))
            .or_else(|| plan_of_customer.get(m.customer.as_str()).map(|(p, _)| p))
        else {
            continue;
        };
        let e = &mut per_plan.entry(plan).or_default().1;
        match m.kind {
            MovementKind::Expansion | MovementKind::Reactivation => e[0] += m.amount,
            MovementKind::Contraction => e[1] += m.amount,
            MovementKind::Churn => e[2] += m.amount,
            MovementKind::New => {}
        }
        // Reconstruct the plan's MRR 90 days ago: now minus the net movements since.
        e[3] += m.mrr_after - m.mrr_before;
    }
    let mut plans: Vec<PlanStats> = per_plan
        .into_iter()
        .map(|(plan, (mrrs, [exp, con, churn, net], leak))| {
            let mrr: Decimal = mrrs.iter().copied().sum();
            let before = mrr - net;
            PlanStats {
                plan: plan.to_owned(),
                customers: mrrs.len() as u64,
                mrr,
                arpa_quartiles: quartiles(mrrs).map(money),
                expansion_rate: ratio(exp, before).map(pct),
                contraction_rate: ratio(con, before).map(pct),
                churn_rate: ratio(churn, before).map(pct),
                discount_leakage: money(leak),
            }
        })
        .collect();
    plans.sort_by(|a, b| b.mrr.cmp(&a.mrr).then_with(|| a.plan.cmp(&b.plan)));

    // Health: the last three months.
    let last = rows.last().copied();
    let three = rows.len().saturating_sub(3);
    let recent = &rows[three.max(start)..];
    let sum = |f: fn(&SeriesRow) -> Decimal| recent.iter().map(|r| f(r)).sum::<Decimal>();
    let base: Decimal = recent.iter().map(|r| r.mrr_start).sum();
    let growth = match (recent.first(), last) {
        (Some(f), Some(l)) if !f.mrr_start.is_zero() && !recent.is_empty() => {
            // Compound monthly growth over the recent months.
            let total = l.mrr / f.mrr_start;
            let n = Decimal::from(recent.len() as u64);
            total
                .powd(Decimal::ONE / n)
                .checked_sub(Decimal::ONE)
                .map(pct)
        }
        _ => None,
    };
    let gained = sum(|r| r.new_mrr + r.expansion_mrr + r.reactivation_mrr);
    let lost = sum(|r| r.contraction_mrr.abs() + r.churned_mrr.abs());
    let nrr = ratio(
        base + sum(|r| r.expansion_mrr) - sum(|r| r.contraction_mrr.abs() + r.churned_mrr.abs()),
        base,
    )
    .map(pct);
    let churn = ratio(sum(|r| r.churned_mrr.abs()), base).map(pct);
    let quick = ratio(gained, lost).map(|q| q.round_dp(2));
    let health = vec![
        HealthComponent {
            name: "growth".into(),
            input: growth,
            points: scale(growth, Decimal::from(-5), Decimal::from(10)),
        },
        HealthComponent {
            name: "nrr".into(),
            input: nrr,
            points: scale(nrr, Decimal::from(97), Decimal::from(102)),
        },
        HealthComponent {
            name: "churn".into(),
            input: churn,
            points: scale(churn, Decimal::from(8), Decimal::ONE),
        },
        HealthComponent {
            name: "quick_ratio".into(),
            input: quick,
            points: scale(quick, Decimal::ONE, Decimal::from(4)),
        },
    ];
    let health_score: Decimal = health.iter().map(|c| c.points).sum::<Decimal>().round();

    // The figures, by kind.
    let mut figures = Vec::new();
    let mut by_kind: BTreeMap<InsightKind, Vec<String>> = BTreeMap::new();
    let mut fig = |kind: InsightKind, id: String, label: String, value: Decimal, unit: Unit| {
        by_kind.entry(kind).or_default().push(id.clone());
        figures.push(Figure {
            id,
            label,
            value: value.normalize(),
            unit,
        });
    };
    use InsightKind as K;
    let mrr_now = money(now.total);
    fig(
        K::RevenuePrediction,
        "mrr".into(),
        "MRR now".into(),
        mrr_now,
        Unit::Money,
    );
    fig(
        K::RevenuePrediction,
        "arr".into(),
        "ARR now (12 x MRR)".into(),
        money(now.total * Decimal::from(12)),
        Unit::Money,
    );
    fig(
        K::RevenuePrediction,
        "paying_customers".into(),
        "paying customers now".into(),
        Decimal::from(now.customers.len() as u64),
        Unit::Count,
    );
    for p in &forecast {
        let m = p.months;
        fig(
            K::RevenuePrediction,
            format!("forecast_mrr_{m}m"),
            format!("forecast MRR in {m} months"),
            money(p.mrr),
            Unit::Money,
        );
        fig(
            K::RevenuePrediction,
            format!("forecast_mrr_{m}m_low"),
            format!("forecast MRR in {m} months, 95 % interval low"),
            money(p.low),
            Unit::Money,
        );
        fig(
            K::RevenuePrediction,
            format!("forecast_mrr_{m}m_high"),
            format!("forecast MRR in {m} months, 95 % interval high"),
            money(p.high),
            Unit::Money,
        );
    }
    let risk_mrr: Decimal = at_risk.iter().map(|a| a.mrr).sum();
    fig(
        K::ChurnRisk,
        "customers_at_risk".into(),
        "paying customers at risk".into(),
        Decimal::from(at_risk.len() as u64),
        Unit::Count,
    );
    fig(
        K::ChurnRisk,
        "mrr_at_risk".into(),
        "MRR of the customers at risk".into(),
        money(risk_mrr),
        Unit::Money,
    );
    if let Some(share) = ratio(risk_mrr, now.total) {
        fig(
            K::ChurnRisk,
            "mrr_at_risk_share".into(),
            "share of MRR at risk".into(),
            pct(share),
            Unit::Percent,
        );
    }
    for reason in [
        RiskReason::PastDue,
        RiskReason::Unpaid,
        RiskReason::CancelScheduled,
        RiskReason::RecentContraction,
    ] {
        let with: Vec<&AtRisk> = at_risk
            .iter()
            .filter(|a| a.reasons.contains(&reason))
            .collect();
        let r = reason.as_str();
        fig(
            K::ChurnRisk,
            format!("at_risk_{r}_customers"),
            format!("customers at risk: {r}"),
            Decimal::from(with.len() as u64),
            Unit::Count,
        );
        fig(
            K::ChurnRisk,
            format!("at_risk_{r}_mrr"),
            format!("MRR at risk: {r}"),
            money(with.iter().map(|a| a.mrr).sum()),
            Unit::Money,
        );
    }
    if let Some(c) = churn {
        fig(
            K::ChurnRisk,
            "revenue_churn_3m".into(),
            "churned MRR over the last 3 months / their starting MRR".into(),
            c,
            Unit::Percent,
        );
    }
    for (i, p) in plans.iter().enumerate() {
        let n = i + 1;
        let name = &p.plan;
        fig(
            K::GrowthOpportunities,
            format!("plan_{n}_mrr"),
            format!("plan {n} ({name}): MRR"),
            money(p.mrr),
            Unit::Money,
        );
        fig(
            K::GrowthOpportunities,
            format!("plan_{n}_customers"),
            format!("plan {n} ({name}): paying customers"),
            Decimal::from(p.customers),
            Unit::Count,
        );
        if let Some(r) = p.expansion_rate {
            fig(
                K::GrowthOpportunities,
                format!("plan_{n}_expansion_rate_90d"),
                format!("plan {n} ({name}): expansion MRR over 90 days, % of its MRR then"),
                r,
                Unit::Percent,
            );
        }
        fig(
            K::PricingSuggestions,
            format!("plan_{n}_arpa_median"),
            format!("plan {n} ({name}): median MRR per customer"),
            p.arpa_quartiles[1],
            Unit::Money,
        );
        fig(
            K::PricingSuggestions,
            format!("plan_{n}_arpa_p25"),
            format!("plan {n} ({name}): 25th percentile MRR per customer"),
            p.arpa_quartiles[0],
            Unit::Money,
        );
        fig(
            K::PricingSuggestions,
            format!("plan_{n}_arpa_p75"),
            format!("plan {n} ({name}): 75th percentile MRR per customer"),
            p.arpa_quartiles[2],
            Unit::Money,
        );
        if let Some(r) = p.contraction_rate {
            fig(
                K::PricingSuggestions,
                format!("plan_{n}_contraction_rate_90d"),
                format!("plan {n} ({name}): contraction MRR over 90 days, % of its MRR then"),
                r,
                Unit::Percent,
            );
        }
        if let Some(r) = p.churn_rate {
            fig(
                K::PricingSuggestions,
                format!("plan_{n}_churn_rate_90d"),
                format!("plan {n} ({name}): churned MRR over 90 days, % of its MRR then"),
                r,
                Unit::Percent,
            );
        }
    }
    let leak_total = list.total - now.total;
    fig(
        K::PricingSuggestions,
        "discount_leakage_mrr".into(),
        "MRR given away in discounts now (list price less billed)".into(),
        money(leak_total),
        Unit::Money,
    );
    if let Some(share) = ratio(leak_total, list.total) {
        fig(
            K::PricingSuggestions,
            "discount_leakage_share".into(),
            "discounts as a share of list-price MRR".into(),
            pct(share),
            Unit::Percent,
        );
    }
    for (i, p) in plans.iter().enumerate() {
        let n = i + 1;
        fig(
            K::PricingSuggestions,
            format!("plan_{n}_discount_leakage_mrr"),
            format!("plan {n} ({}): MRR given away in discounts", p.plan),
            p.discount_leakage,
            Unit::Money,
        );
    }
    if let Some(q) = quick {
        fig(
            K::GrowthOpportunities,
            "quick_ratio_3m".into(),
            "quick ratio over the last 3 months".into(),
            q,
            Unit::Ratio,
        );
    }
    fig(
        K::HealthScore,
        "health_score".into(),
        "health score (0-100)".into(),
        health_score,
        Unit::Points,
    );
    for c in &health {
        let unit = if c.name == "quick_ratio" {
            Unit::Ratio
        } else {
            Unit::Percent
        };
        if let Some(v) = c.input {
            fig(
                K::HealthScore,
                format!("health_{}_input", c.name),
                format!("health input: {}", c.name),
                v,
                unit,
            );
        }
        fig(
            K::HealthScore,
            format!("health_{}_points", c.name),
            format!("health points: {} (of 25)", c.name),
            c.points,
            Unit::Points,
        );
    }
    Ok(Analysis {
        currency,
        as_of,
        monthly_mrr,
        forecast,
        at_risk,
        plans,
        health,
        health_score,
        figures,
        figures_by_kind: by_kind,
    })
}

#[cfg(test)]
mod tests;
