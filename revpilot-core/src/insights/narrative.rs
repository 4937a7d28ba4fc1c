//! The narrative: the [`LlmProvider`] port, the rules an answer must satisfy, the offline
//! template narrative, and [`generate`], which meters, asks, validates, falls back and stores.

use std::collections::{BTreeMap, HashSet};

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
/// reach it; plan ids (Stripe price ids) appear only inside figure labels.
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
    /// The aggregates a provider may see.
    pub fn facts(&self) -> Facts {
        Facts {
            currency: self.currency,
            as_of: self.as_of,
            figures: self.figures.clone(),
            figures_by_kind: self.figures_by_kind.clone(),
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
/// within their lengths, at least one cited figure, and every cited id one of `facts`' figures.
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
                "{k}: cites {bad:?}, which is not a computed figure"
            )));
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
    let plan_count = facts
        .figures
        .iter()
        .filter(|f| f.id.starts_with("plan_") && f.id.ends_with("_mrr"))
        .count();
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
                val(&format!("plan_{n}_contraction_rate_90d")).unwrap_or_else(|| "0 %".into()),
                val(&format!("plan_{n}_churn_rate_90d")).unwrap_or_else(|| "0 %".into()),
                val(&format!("plan_{n}_arpa_median")).unwrap_or_default(),
                val(&format!("plan_{n}_arpa_p25")).unwrap_or_default(),
                val(&format!("plan_{n}_arpa_p75")).unwrap_or_default(),
                val("discount_leakage_mrr").unwrap_or_default(),
                val("discount_leakage_share").unwrap_or_else(|| "0 %".into()),
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

/// Why [`generate`] produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The usage limit (an upgrade is required), an unknown user, or the store.
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// Generates and stores one set of insights for `user` about `analysis`, metered as one
/// `ai_insight` (keyed by the generation id): reserved before asking, committed once stored,
/// released when storing fails. An invalid answer is asked for once more; when the provider
/// stays invalid or unavailable, the local narrative is used and `fallback` says why.
///
/// # Errors
/// [`GenerateError::Usage`]: the hard limit (nothing is asked), an unknown user, the store.
#[allow(clippy::too_many_arguments)]
pub async fn generate<S: UserStore + UsageStore + InsightStore + ?Sized>(
    store: &S,
    catalog: &Catalog,
    provider: &dyn LlmProvider,
    user: UserId,
    connection: Option<ConnectionId>,
    analysis: &Analysis,
    generation: Uuid,
    now: DateTime<Utc>,
) -> Result<Generated, GenerateError> {
    let key = generation.to_string();
    reserve_insight(store, catalog, user, &key, connection, now).await?;
    let facts = analysis.facts();
    let mut fallback = None;
    let mut answer = None;
    for _ in 0..2 {
        match provider.narrate(&facts).await {
            Ok(insights) => match validate(&insights, &facts) {
                Ok(()) => {
                    answer = Some(insights);
                    break;
                }
                Err(e) => fallback = Some(e.to_string()),
            },
            Err(e @ LlmError::Invalid(_)) => fallback = Some(e.to_string()),
            Err(e @ LlmError::Unavailable(_)) => {
                fallback = Some(e.to_string());
                break;
            }
        }
    }
    let (insights, provider_name) = match answer {
        Some(a) => {
            fallback = None;
            (a, provider.name())
        }
        None => (local_narrative(&facts), "local".to_owned()),
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
    commit_insight(store, user, &key).await?;
    Ok(Generated {
        generation,
        records,
        fallback: note,
    })
}
