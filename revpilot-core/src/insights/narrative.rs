//! The narrative: the [`LlmProvider`] port, the rules an answer must satisfy, the offline
//! template narrative, and [`generate`], which meters, asks, validates, falls back and stores.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Analysis, Figure, InsightKind, Unit};
use crate::billing::{Catalog, UsageError, commit_insight, release_insight, reserve_insight};
use crate::money::Currency;
use crate::ports::{ConnectionId, InsightRecord, InsightStore, UsageStore, UserId, UserStore};

/// What a provider may see: aggregates only. No customer ids, names, emails or metadata ever
/// reach it, nor any plan's Stripe price id: plans are "plan 1", "plan 2", ... in the labels
/// ([`Analysis::facts`]), and the stored records carry the full labels for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// Reporting currency.
    pub currency: Currency,
    /// The day analysed.
    pub as_of: NaiveDate,
    /// Every citable figure.
    pub figures: Vec<Figure>,
    /// The figures of each insight kind.
    pub figures_by_kind: BTreeMap<InsightKind, Vec<String>>,
}

impl Analysis {
    /// The aggregates a provider may see. A plan's figures are labelled by its rank only
    /// (`plan 2: MRR`): its price id is text from Stripe, which anyone who can create a price
    /// on the connected account chooses (`plan_IGNORE_ALL_PREVIOUS_INSTRUCTIONS`), so it never
    /// reaches a model. [`Analysis::figures`] keep the full labels, which the stored records
    /// carry for display.
    pub fn facts(&self) -> Facts {
        let figures = self
            .figures
            .iter()
            .map(|f| Figure {
                label: self.neutral_label(f),
                ..f.clone()
            })
            .collect();
        Facts {
            currency: self.currency,
            as_of: self.as_of,
            figures,
            figures_by_kind: self.figures_by_kind.clone(),
        }
    }

    /// `f`'s label without its plan's price id: `plan {n} ({price}): ...` becomes `plan {n}:
    /// ...`. The plan is found by the figure's id (`plan_{n}_...`), never by searching the text.
    fn neutral_label(&self, f: &Figure) -> String {
        let rank =
            f.id.strip_prefix("plan_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|n| n.parse::<usize>().ok());
        let Some(n) = rank else {
            return f.label.clone();
        };
        let Some(plan) = n.checked_sub(1).and_then(|i| self.plans.get(i)) else {
            return f.label.clone();
        };
        let named = format!("plan {n} ({}):", plan.plan);
        match f.label.strip_prefix(&named) {
            Some(rest) => format!("plan {n}:{rest}"),
            // Every plan figure's label starts so; anything else keeps no text of the plan's.
            None => format!("plan {n}"),
        }
    }
}

/// One insight as a provider writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insight {
    /// Its kind.
    pub kind: InsightKind,
    /// A short title.
    pub title: String,
    /// The narrative: explains and prioritises; every number in it is one of the cited figures.
    pub summary: String,
    /// The ids of the figures it rests on.
    pub figure_ids: Vec<String>,
}

/// Why a provider gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// The answer does not satisfy the schema or cites figures that do not exist (worth one
    /// more try).
    #[error("invalid answer: {0}")]
    Invalid(String),
    /// The provider could not be reached or kept failing (timeouts, 429, 5xx) after its retries.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

/// A narrative writer: the embedded local templates, or a language model.
///
/// With the `testing` feature, mockall's `MockLlmProvider` doubles it in tests.
#[cfg_attr(feature = "testing", mockall::automock)]
#[async_trait]
pub trait LlmProvider: Send + Sync {
    /// The name recorded on each insight (`local`, or the model).
    fn name(&self) -> String;

    /// One insight per kind about `facts`.
    async fn narrate(&self, facts: &Facts) -> Result<Vec<Insight>, LlmError>;
}

/// Longest title accepted.
pub const MAX_TITLE: usize = 120;
/// Longest summary accepted.
pub const MAX_SUMMARY: usize = 1_200;

/// Checks an answer: exactly one insight of each of the five kinds, non-empty title and summary
/// within their lengths, at least one cited figure, every cited id one of `facts`' figures, and
/// every number in the title and summary one of the cited figures' values as displayed (or an
/// [`ALLOWED_NUMBERS`] horizon, a plan's rank, the day analysed): a model that cites `mrr`
/// and writes another MRR is refused.
///
/// # Errors
/// [`LlmError::Invalid`] naming the first problem.
pub fn validate(insights: &[Insight], facts: &Facts) -> Result<(), LlmError> {
    let ids: HashSet<&str> = facts.figures.iter().map(|f| f.id.as_str()).collect();
    let mut seen = HashSet::new();
    for i in insights {
        let k = i.kind.as_str();
        if !seen.insert(i.kind) {
            return Err(LlmError::Invalid(format!("two {k} insights")));
        }
        if i.title.trim().is_empty() || i.title.chars().count() > MAX_TITLE {
            return Err(LlmError::Invalid(format!(
                "{k}: the title must have 1 to {MAX_TITLE} characters"
            )));
        }
        if i.summary.trim().is_empty() || i.summary.chars().count() > MAX_SUMMARY {
            return Err(LlmError::Invalid(format!(
                "{k}: the summary must have 1 to {MAX_SUMMARY} characters"
            )));
        }
        if i.figure_ids.is_empty() {
            return Err(LlmError::Invalid(format!("{k}: cites no figure")));
        }
        if let Some(bad) = i.figure_ids.iter().find(|id| !ids.contains(id.as_str())) {
            return Err(LlmError::Invalid(format!(
                "{k}: cites {}, which is not a computed figure",
                quoted_id(bad)
            )));
        }
        let cited: Vec<&Figure> = facts
            .figures
            .iter()
            .filter(|f| i.figure_ids.contains(&f.id))
            .collect();
        for text in [&i.title, &i.summary] {
            check_numbers(text, &cited, facts)
                .map_err(|why| LlmError::Invalid(format!("{k}: {why}")))?;
        }
    }
    if let Some(missing) = InsightKind::ALL.into_iter().find(|k| !seen.contains(k)) {
        return Err(LlmError::Invalid(format!(
            "no {} insight",
            missing.as_str()
        )));
    }
    Ok(())
}

/// A cited id as the error names it: quoted when it looks like an id, otherwise not at all
/// (the error reaches the stored note, and a model's text is not to be shown there).
fn quoted_id(id: &str) -> String {
    if id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        format!("{id:?}")
    } else {
        "an id".to_owned()
    }
}

/// Numbers an insight may write without citing them: the horizons and windows the engine
/// computes over (3, 6 and 12 months; 30 and 90 days), the interval's level (95 %), the
/// percentiles it reports (25th, 50th, 75th) and the health score's scale (of 100). Plan ranks
/// ("plan 2") are allowed up to the number of plans, and the day analysed as `YYYY-MM-DD`.
pub const ALLOWED_NUMBERS: [u32; 10] = [3, 6, 12, 25, 30, 50, 75, 90, 95, 100];

/// Words that scale a number; a narrative that uses one is refused, whatever its numbers.
const SCALE_WORDS: [&str; 6] = [
    "hundred", "thousand", "million", "billion", "trillion", "lakh",
];

/// Letters that may follow a number directly: ordinals (`25th`) and multiples (`3x`).
const NUMBER_SUFFIXES: [&str; 5] = ["st", "nd", "rd", "th", "x"];

/// Checks that every number in `text` is one of `cited`'s values as displayed (money rounded to
/// the currency's minor unit, the sign aside), one of [`ALLOWED_NUMBERS`], a plan's rank after
/// "plan", or the day analysed. Thousands separators (`1,234.50`) are read as such. A number
/// with a scale (`3k`, `2 million`) or a digit outside ASCII is refused.
fn check_numbers(text: &str, cited: &[&Figure], facts: &Facts) -> Result<(), String> {
    // Figure ids (`plan_2_churn_rate_90d`) and the day analysed hold digits that are not
    // claims; both are the engine's own text.
    let mut text = text.to_owned();
    let mut ids: Vec<&str> = facts.figures.iter().map(|f| f.id.as_str()).collect();
    ids.sort_by_key(|id| std::cmp::Reverse(id.len()));
    for id in ids {
        if text.contains(id) {
            text = text.replace(id, " ");
        }
    }
    let day = facts.as_of.format("%Y-%m-%d").to_string();
    let text = text.replace(&day, " ");
    if let Some(c) = text.chars().find(|c| c.is_numeric() && !c.is_ascii_digit()) {
        return Err(format!(
            "writes the digit {c:?}, which is not a computed figure"
        ));
    }
    let lower = text.to_ascii_lowercase();
    if let Some(w) = lower
        .split(|c: char| !c.is_ascii_alphabetic())
        .find(|w| SCALE_WORDS.contains(w))
    {
        return Err(format!(
            "writes {w:?}: numbers must be written as the figures are"
        ));
    }
    let plans = plan_count(facts);
    let shown: Vec<Decimal> = cited
        .iter()
        .flat_map(|f| {
            let v = f.value.abs().normalize();
            match f.unit {
                Unit::Money => [v, facts.currency.round(f.value).abs().normalize()],
                _ => [v, v],
            }
        })
        .collect();
    let b = lower.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = String::new();
        while i < b.len() && b[i].is_ascii_digit() {
            digits.push(b[i] as char);
            i += 1;
        }
        // Thousands groups: a comma and exactly three digits.
        while b.get(i) == Some(&b',')
            && b.get(i + 1..i + 4)
                .is_some_and(|g| g.iter().all(u8::is_ascii_digit))
            && !b.get(i + 4).is_some_and(u8::is_ascii_digit)
        {
            digits.push_str(&lower[i + 1..i + 4]);
            i += 4;
        }
        if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            digits.push('.');
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                digits.push(b[i] as char);
                i += 1;
            }
        }
        let suffix: String = lower[i..]
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        if !suffix.is_empty() && !NUMBER_SUFFIXES.contains(&suffix.as_str()) {
            return Err(format!(
                "writes {}{suffix}: numbers must be written as the figures are",
                clip(&digits)
            ));
        }
        let value = digits.parse::<Decimal>().ok().map(|d| d.normalize());
        let ok = value.is_some_and(|v| {
            shown.contains(&v)
                || ALLOWED_NUMBERS.iter().any(|a| Decimal::from(*a) == v)
                || (lower[..start].trim_end().ends_with("plan")
                    && v.fract().is_zero()
                    && v >= Decimal::ONE
                    && v <= Decimal::from(plans))
        });
        if !ok {
            return Err(format!(
                "writes {}, which is not one of the figures it cites",
                clip(&digits)
            ));
        }
    }
    Ok(())
}

/// The number of plans: the figures `plan_{n}_mrr`.
fn plan_count(facts: &Facts) -> usize {
    facts
        .figures
        .iter()
        .filter(|f| {
            f.id.strip_prefix("plan_")
                .and_then(|r| r.strip_suffix("_mrr"))
                .is_some_and(|n| n.parse::<usize>().is_ok())
        })
        .count()
}

/// At most 24 characters of a number, for an error message.
fn clip(s: &str) -> String {
    if s.len() <= 24 {
        s.to_owned()
    } else {
        format!("{}...", &s[..24])
    }
}

/// A figure's value as text: money with the currency code, percentages with `%`.
pub fn show(f: &Figure, currency: Currency) -> String {
    let v = f.value.normalize();
    match f.unit {
        Unit::Money => format!(
            "{} {}",
            currency.round(f.value),
            currency.as_str().to_uppercase()
        ),
        Unit::Percent => format!("{v} %"),
        Unit::Points => format!("{v} points"),
        Unit::Count | Unit::Ratio => v.to_string(),
    }
}

/// The offline narrative: one insight per kind from templates over the figures. Deterministic.
pub fn local_narrative(facts: &Facts) -> Vec<Insight> {
    let get = |id: &str| facts.figures.iter().find(|f| f.id == id);
    let val = |id: &str| get(id).map(|f| show(f, facts.currency));
    let cite = |ids: &[&str]| -> Vec<String> {
        ids.iter()
            .filter(|id| get(id).is_some())
            .map(|id| (*id).to_owned())
            .collect()
    };
    let mut out = Vec::new();

    let prediction = match (val("mrr"), val("forecast_mrr_3m"), val("forecast_mrr_12m")) {
        (Some(now), Some(m3), Some(m12)) => format!(
            "MRR is {now}. On the trend of the last months it is expected at {m3} in 3 months \
             (95 % interval {} to {}) and {m12} in 12 months.",
            val("forecast_mrr_3m_low").unwrap_or_default(),
            val("forecast_mrr_3m_high").unwrap_or_default(),
        ),
        (Some(now), _, _) => {
            format!("MRR is {now}. There are fewer than 3 months of history to forecast from.")
        }
        _ => "There is no MRR yet.".to_owned(),
    };
    out.push(Insight {
        kind: InsightKind::RevenuePrediction,
        title: "Revenue forecast".into(),
        summary: prediction,
        figure_ids: cite(&[
            "mrr",
            "forecast_mrr_3m",
            "forecast_mrr_3m_low",
            "forecast_mrr_3m_high",
            "forecast_mrr_12m",
        ]),
    });

    let reasons = [
        ("past_due", "past due"),
        ("unpaid", "unpaid"),
        ("cancel_scheduled", "set to cancel"),
        ("recent_contraction", "contracted in the last 30 days"),
    ];
    let mut parts = Vec::new();
    let mut risk_ids = vec!["customers_at_risk", "mrr_at_risk", "mrr_at_risk_share"];
    for (r, words) in reasons {
        let n = get(&format!("at_risk_{r}_customers")).map(|f| f.value);
        if n.is_some_and(|n| n > Decimal::ZERO) {
            parts.push(format!(
                "{} {words} ({})",
                val(&format!("at_risk_{r}_customers")).unwrap_or_default(),
                val(&format!("at_risk_{r}_mrr")).unwrap_or_default()
            ));
        }
    }
    let risk = match val("customers_at_risk") {
        Some(n) if !parts.is_empty() => format!(
            "{n} paying customers are at risk, with {} of MRR ({} of the total): {}.",
            val("mrr_at_risk").unwrap_or_default(),
            val("mrr_at_risk_share").unwrap_or_default(),
            parts.join("; ")
        ),
        _ => "No paying customer shows a sign of churn risk.".to_owned(),
    };
    let risk_reason_ids: Vec<String> = reasons
        .iter()
        .flat_map(|(r, _)| [format!("at_risk_{r}_customers"), format!("at_risk_{r}_mrr")])
        .collect();
    risk_ids.extend(risk_reason_ids.iter().map(String::as_str));
    out.push(Insight {
        kind: InsightKind::ChurnRisk,
        title: "Churn risk".into(),
        summary: risk,
        figure_ids: cite(&risk_ids),
    });

    // Plans by expansion rate.
    let plan_count = plan_count(facts);
    let mut best: Option<(usize, Decimal)> = None;
    for n in 1..=plan_count {
        if let Some(f) = get(&format!("plan_{n}_expansion_rate_90d"))
            && best.is_none_or(|(_, b)| f.value > b)
        {
            best = Some((n, f.value));
        }
    }
    let (growth, growth_ids) = match best {
        Some((n, _)) => (
            format!(
                "Plan {n} expands most: {} of its MRR 90 days ago came back as expansion; its \
                 customers are the first to offer more seats or a higher tier. The quick ratio \
                 of the last 3 months is {}.",
                val(&format!("plan_{n}_expansion_rate_90d")).unwrap_or_default(),
                val("quick_ratio_3m").unwrap_or_else(|| "not defined (nothing lost)".into())
            ),
            vec![
                format!("plan_{n}_expansion_rate_90d"),
                format!("plan_{n}_mrr"),
                "quick_ratio_3m".to_owned(),
            ],
        ),
        None => (
            "No plan has enough history to compare expansion.".to_owned(),
            vec!["mrr".to_owned()],
        ),
    };
    out.push(Insight {
        kind: InsightKind::GrowthOpportunities,
        title: "Growth opportunities".into(),
        summary: growth,
        figure_ids: cite(&growth_ids.iter().map(String::as_str).collect::<Vec<_>>()),
    });

    let mut worst: Option<(usize, Decimal)> = None;
    for n in 1..=plan_count {
        let c = get(&format!("plan_{n}_contraction_rate_90d")).map(|f| f.value);
        let ch = get(&format!("plan_{n}_churn_rate_90d")).map(|f| f.value);
        let loss = c.unwrap_or_default() + ch.unwrap_or_default();
        if (c.is_some() || ch.is_some()) && worst.is_none_or(|(_, w)| loss > w) {
            worst = Some((n, loss));
        }
    }
    let (pricing, pricing_ids) = match worst {
        Some((n, _)) => (
            format!(
                "Plan {n} loses the most: {} of its MRR contracted and {} churned in 90 days. \
                 Its customers pay a median of {} (25th to 75th percentile {} to {}); check \
                 whether its price or packaging fits them. Discounts cost {} of MRR ({} of \
                 list price).",
                val(&format!("plan_{n}_contraction_rate_90d")).unwrap_or_else(|| "none".into()),
                val(&format!("plan_{n}_churn_rate_90d")).unwrap_or_else(|| "none".into()),
                val(&format!("plan_{n}_arpa_median")).unwrap_or_default(),
                val(&format!("plan_{n}_arpa_p25")).unwrap_or_default(),
                val(&format!("plan_{n}_arpa_p75")).unwrap_or_default(),
                val("discount_leakage_mrr").unwrap_or_default(),
                val("discount_leakage_share").unwrap_or_else(|| "none".into()),
            ),
            vec![
                format!("plan_{n}_contraction_rate_90d"),
                format!("plan_{n}_churn_rate_90d"),
                format!("plan_{n}_arpa_median"),
                format!("plan_{n}_arpa_p25"),
                format!("plan_{n}_arpa_p75"),
                "discount_leakage_mrr".to_owned(),
                "discount_leakage_share".to_owned(),
            ],
        ),
        None => (
            "No plan has enough history to compare losses.".to_owned(),
            vec!["mrr".to_owned()],
        ),
    };
    out.push(Insight {
        kind: InsightKind::PricingSuggestions,
        title: "Pricing suggestions".into(),
        summary: pricing,
        figure_ids: cite(&pricing_ids.iter().map(String::as_str).collect::<Vec<_>>()),
    });

    let components = ["growth", "nrr", "churn", "quick_ratio"];
    let detail: Vec<String> = components
        .iter()
        .map(|c| {
            format!(
                "{c} {} ({})",
                val(&format!("health_{c}_points")).unwrap_or_default(),
                val(&format!("health_{c}_input")).unwrap_or_else(|| "no data".into())
            )
        })
        .collect();
    let mut health_ids = vec!["health_score".to_owned()];
    for c in components {
        health_ids.push(format!("health_{c}_points"));
        health_ids.push(format!("health_{c}_input"));
    }
    out.push(Insight {
        kind: InsightKind::HealthScore,
        title: "Health score".into(),
        summary: format!(
            "The health score is {} of 100: {}.",
            val("health_score").unwrap_or_default(),
            detail.join(", ")
        ),
        figure_ids: cite(&health_ids.iter().map(String::as_str).collect::<Vec<_>>()),
    });
    out
}

/// The offline provider: [`local_narrative`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalProvider;

#[async_trait]
impl LlmProvider for LocalProvider {
    fn name(&self) -> String {
        "local".into()
    }

    async fn narrate(&self, facts: &Facts) -> Result<Vec<Insight>, LlmError> {
        Ok(local_narrative(facts))
    }
}

fn kind_offset(kind: InsightKind) -> u128 {
    InsightKind::ALL
        .iter()
        .position(|k| *k == kind)
        .map_or(0, |p| p as u128 + 1)
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generated {
    /// The generation id (the usage key).
    pub generation: Uuid,
    /// The stored records, one per kind.
    pub records: Vec<InsightRecord>,
    /// Set when the local narrative stood in for the provider, and why.
    pub fallback: Option<String>,
}

impl<'a> InsightRequest<'a> {
    /// The generation `generation` of `user` about `analysis` at `now`, of no connection.
    pub fn new(user: UserId, analysis: &'a Analysis, generation: Uuid, now: DateTime<Utc>) -> Self {
        InsightRequest {
            user,
            connection: None,
            analysis,
            generation,
            now,
        }
    }

    /// The same, about `connection`.
    #[must_use]
    pub fn of_connection(mut self, connection: ConnectionId) -> Self {
        self.connection = Some(connection);
        self
    }
}

/// Why [`generate`] produced nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// The usage limit (an upgrade is required), an unknown user, or the store.
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// One insight generation, as [`generate`] is asked for it.
#[derive(Debug, Clone, Copy)]
pub struct InsightRequest<'a> {
    /// Who asks (their usage is metered).
    pub user: UserId,
    /// The connection the analysis is of, recorded with the usage and the insights.
    pub connection: Option<ConnectionId>,
    /// What the narrative is about: its figures are the only numbers it may write.
    pub analysis: &'a Analysis,
    /// The generation's id: the metering key, and the insights' ids.
    pub generation: Uuid,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Generates and stores one set of insights for the request's user about its analysis. An invalid answer is
/// asked for once more; when the provider stays invalid or unavailable, or `deadline`
/// completes first (the whole generation's deadline: every ask and retry together), the local
/// narrative is used and `fallback` says why. The provider's call is dropped at the deadline,
/// so nobody waits for it.
///
/// Metering: one `ai_insight` (keyed by the generation id) is reserved before asking, so the
/// hard limit refuses before any provider call. It is committed when the provider's answer is
/// used, or when the provider *is* the local narrative ([`LocalProvider`], no model
/// configured). When the local narrative only stood in for a failed model, the reservation is
/// released: the user is not charged for a model answer they did not get (`docs/insights.md`).
/// It is released too when storing fails.
///
/// # Errors
/// [`GenerateError::Usage`]: the hard limit (nothing is asked), an unknown user, the store.
pub async fn generate<S: UserStore + UsageStore + InsightStore + ?Sized>(
    store: &S,
    catalog: &Catalog,
    provider: &dyn LlmProvider,
    request: InsightRequest<'_>,
    deadline: impl Future<Output = ()> + Send,
) -> Result<Generated, GenerateError> {
    let InsightRequest {
        user,
        connection,
        analysis,
        generation,
        now,
    } = request;
    let key = generation.to_string();
    reserve_insight(store, catalog, user, &key, connection, now).await?;
    let facts = analysis.facts();
    let asked = async {
        let mut why = String::new();
        for _ in 0..2 {
            match provider.narrate(&facts).await {
                Ok(insights) => match validate(&insights, &facts) {
                    Ok(()) => return Ok(insights),
                    Err(e) => why = e.to_string(),
                },
                Err(e @ LlmError::Invalid(_)) => why = e.to_string(),
                Err(e @ LlmError::Unavailable(_)) => return Err(e.to_string()),
            }
        }
        Err(why)
    };
    let answer = match within(asked, deadline).await {
        Some(answer) => answer,
        None => Err("no answer within the deadline".to_owned()),
    };
    let (insights, provider_name, fallback) = match answer {
        Ok(a) => (a, provider.name(), None),
        Err(why) => (local_narrative(&facts), "local".to_owned(), Some(why)),
    };
    let note = fallback.as_ref().map(|why| {
        format!(
            "the local narrative stood in for {}: {why}",
            provider.name()
        )
    });
    let records: Vec<InsightRecord> = insights
        .into_iter()
        .map(|i| InsightRecord {
            // One record per kind and generation: the generation id offset by the kind, so
            // ids are unique without a random source in this pure crate.
            id: Uuid::from_u128(generation.as_u128().wrapping_add(kind_offset(i.kind))),
            generation,
            user,
            connection,
            kind: i.kind,
            title: i.title,
            summary: i.summary,
            figures: i
                .figure_ids
                .iter()
                .filter_map(|id| analysis.figure(id).cloned())
                .collect(),
            provider: provider_name.clone(),
            note: note.clone(),
            created_at: now,
        })
        .collect();
    if let Err(e) = store.save_insights(&records).await {
        let _ = release_insight(store, user, &key).await;
        return Err(GenerateError::Usage(UsageError::Store(e)));
    }
    if note.is_some() {
        release_insight(store, user, &key).await?;
    } else {
        commit_insight(store, user, &key).await?;
    }
    Ok(Generated {
        generation,
        records,
        fallback: note,
    })
}

/// `work`'s output, or `None` when `deadline` completes first (`work` is then dropped). Both
/// are polled in turn by hand, since this crate has no runtime.
async fn within<T>(work: impl Future<Output = T>, deadline: impl Future<Output = ()>) -> Option<T> {
    let mut work = pin!(work);
    let mut deadline = pin!(deadline);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}
