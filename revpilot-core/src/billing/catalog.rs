//! The tier catalog: what each tier includes, costs and allows, and which Stripe price sells it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{Currency, InvalidCurrency};
use crate::ports::{Limits, Meter, Tier};

/// Every tier, cheapest first.
pub const TIERS: [Tier; 4] = [
    Tier::Starter,
    Tier::Professional,
    Tier::Business,
    Tier::Enterprise,
];

/// The environment variable that names the Stripe price of `tier`.
pub fn price_env_var(tier: Tier) -> &'static str {
    match tier {
        Tier::Starter => "STRIPE_STARTER_PRICE_ID",
        Tier::Professional => "STRIPE_PROFESSIONAL_PRICE_ID",
        Tier::Business => "STRIPE_BUSINESS_PRICE_ID",
        Tier::Enterprise => "STRIPE_ENTERPRISE_PRICE_ID",
    }
}

/// A catalog that cannot be used, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tier catalog: {field}: {problem}")]
#[non_exhaustive]
pub struct CatalogError {
    /// The field, as a dotted path (`tiers.professional.price`).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
    /// The currency code's error, when that is what is wrong (`problem` repeats its message).
    #[source]
    pub source: Option<InvalidCurrency>,
}

impl CatalogError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        CatalogError {
            field: field.into(),
            problem: problem.into(),
            source: None,
        }
    }

    fn currency(field: impl Into<String>, source: InvalidCurrency) -> Self {
        CatalogError {
            field: field.into(),
            problem: source.to_string(),
            source: Some(source),
        }
    }
}

/// One tier's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierPlan {
    /// The tier.
    pub tier: Tier,
    /// Base charge per period, in the catalog currency's minor units (cents).
    pub price: i64,
    /// Included amounts per period; `None` is unlimited.
    pub limits: Limits,
    /// Whether usage past the included amounts accrues overage (paid tiers) or is refused with
    /// an upgrade error (a hard-limited tier).
    pub overage: bool,
    /// The Stripe price that sells this tier, when configured.
    pub stripe_price_id: Option<String>,
}

impl TierPlan {
    /// The included amount of `meter`; `None` is unlimited.
    pub fn included(&self, meter: Meter) -> Option<u64> {
        match meter {
            Meter::AiInsight => self.limits.ai_insights.map(u64::from),
            Meter::TransactionVolume => self.limits.transaction_volume,
            Meter::Scenario => self.limits.scenarios.map(u64::from),
        }
    }
}

/// Overage prices, in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverageRates {
    /// Per AI insight past the included amount.
    pub ai_insight_unit_price: i64,
    /// Transactions per billed block.
    pub transaction_block: u64,
    /// Per started block of transactions past the included amount.
    pub transaction_block_price: i64,
}

/// The tier catalog. [`Catalog::default`] is the seed's pricing; a TOML file
/// ([`Catalog::from_toml`]) or [`CatalogBuilder`] replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Catalog {
    currency: Currency,
    tiers: BTreeMap<TierKey, TierPlan>,
    overage: OverageRates,
}

/// `Tier` ordered cheapest first, for the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
struct TierKey(u8);

fn key(tier: Tier) -> TierKey {
    TierKey(match tier {
        Tier::Starter => 0,
        Tier::Professional => 1,
        Tier::Business => 2,
        Tier::Enterprise => 3,
    })
}

/// How a Stripe price maps to a tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTier {
    /// The tier.
    pub tier: Tier,
    /// Set when the price is not in the catalog and fell back to starter: what the operator
    /// should see on the subscription event.
    pub note: Option<String>,
}

impl Default for Catalog {
    /// The seed's tiers: starter $0 (hard-limited), professional $29, business $99, enterprise
    /// $299; overage $1.00 per AI insight and $0.10 per started 1,000 transactions.
    fn default() -> Self {
        let plan = |tier, price, scenarios, ai_insights, transaction_volume, overage| TierPlan {
            tier,
            price,
            limits: Limits {
                scenarios,
                ai_insights,
                transaction_volume,
            },
            overage,
            stripe_price_id: None,
        };
        CatalogBuilder::new(Currency::USD)
            .tier(plan(
                Tier::Starter,
                0,
                Some(0),
                Some(5),
                Some(10_000),
                false,
            ))
            .tier(plan(
                Tier::Professional,
                2_900,
                Some(3),
                Some(50),
                Some(100_000),
                true,
            ))
            .tier(plan(
                Tier::Business,
                9_900,
                None,
                Some(200),
                Some(500_000),
                true,
            ))
            .tier(plan(Tier::Enterprise, 29_900, None, None, None, true))
            .overage(OverageRates {
                ai_insight_unit_price: 100,
                transaction_block: 1_000,
                transaction_block_price: 10,
            })
            .build()
            .unwrap_or_else(|e| unreachable!("the default catalog is valid: {e}"))
    }
}

impl Catalog {
    /// The currency of every price.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The overage prices.
    pub fn overage(&self) -> OverageRates {
        self.overage
    }

    /// The terms of `tier` (every tier is present in a built catalog).
    pub fn plan(&self, tier: Tier) -> &TierPlan {
        // A built catalog holds all four tiers; `build` refuses one that does not.
        &self.tiers[&key(tier)]
    }

    /// Every tier's terms, cheapest first.
    pub fn plans(&self) -> impl Iterator<Item = &TierPlan> {
        self.tiers.values()
    }

    /// Reads a catalog from TOML (see `docs/billing.md` for the format).
    ///
    /// # Errors
    /// [`CatalogError`] naming the field that is missing, unknown or invalid.
    pub fn from_toml(text: &str) -> Result<Catalog, CatalogError> {
        let file: file::CatalogFile = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .and_then(|span| text.get(..span.start))
                .map_or_else(
                    || "catalog".to_owned(),
                    |before| format!("line {}", before.matches('\n').count() + 1),
                );
            CatalogError::new(field, e.message().to_owned())
        })?;
        file.into_catalog()
    }

    /// Sets the Stripe price ids from `STRIPE_<TIER>_PRICE_ID` as read by `var` (for example
    /// `|name| std::env::var(name).ok()`); empty or missing values keep the catalog's own.
    ///
    /// # Errors
    /// [`CatalogError`] when two tiers end up with the same price.
    pub fn with_price_ids_from(
        mut self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Catalog, CatalogError> {
        for tier in TIERS {
            if let Some(id) = var(price_env_var(tier)).and_then(non_empty)
                && let Some(plan) = self.tiers.get_mut(&key(tier))
            {
                plan.stripe_price_id = Some(id);
            }
        }
        check_unique_prices(&self.tiers)?;
        Ok(self)
    }

    /// The Stripe price that sells `tier`, when configured.
    pub fn price_id(&self, tier: Tier) -> Option<&str> {
        self.plan(tier).stripe_price_id.as_deref()
    }

    /// The tier a Stripe price sells. An unknown (or missing) price falls back to starter, as the
    /// seed does, with a note saying so for the subscription event.
    pub fn tier_for_price(&self, price: Option<&str>) -> PriceTier {
        let found = price.and_then(|p| {
            self.tiers
                .values()
                .find(|t| t.stripe_price_id.as_deref() == Some(p))
        });
        match (found, price) {
            (Some(plan), _) => PriceTier {
                tier: plan.tier,
                note: None,
            },
            (None, Some(p)) => PriceTier {
                tier: Tier::Starter,
                note: Some(format!(
                    "unknown price {p}: not one of the configured tier prices, mapped to starter"
                )),
            },
            (None, None) => PriceTier {
                tier: Tier::Starter,
                note: Some("the subscription has no price: mapped to starter".into()),
            },
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

fn check_unique_prices(tiers: &BTreeMap<TierKey, TierPlan>) -> Result<(), CatalogError> {
    let mut seen: BTreeMap<&str, Tier> = BTreeMap::new();
    for plan in tiers.values() {
        if let Some(id) = plan.stripe_price_id.as_deref()
            && let Some(other) = seen.insert(id, plan.tier)
        {
            return Err(CatalogError::new(
                format!("tiers.{}.stripe_price_id", plan.tier.as_str()),
                format!("{id} is also the price of {}", other.as_str()),
            ));
        }
    }
    Ok(())
}

/// Builds a [`Catalog`] in code; [`CatalogBuilder::build`] validates it.
#[derive(Debug, Clone)]
pub struct CatalogBuilder {
    currency: Currency,
    tiers: Vec<TierPlan>,
    overage: Option<OverageRates>,
}

impl CatalogBuilder {
    /// A builder for prices in `currency`.
    pub fn new(currency: Currency) -> Self {
        CatalogBuilder {
            currency,
            tiers: Vec::new(),
            overage: None,
        }
    }

    /// A builder holding `catalog`'s terms, to change some of them.
    pub fn from_catalog(catalog: &Catalog) -> Self {
        CatalogBuilder {
            currency: catalog.currency,
            tiers: catalog.tiers.values().cloned().collect(),
            overage: Some(catalog.overage),
        }
    }

    /// Sets (or replaces) one tier's terms.
    #[must_use]
    pub fn tier(mut self, plan: TierPlan) -> Self {
        self.tiers.retain(|t| t.tier != plan.tier);
        self.tiers.push(plan);
        self
    }

    /// Sets the overage prices.
    #[must_use]
    pub fn overage(mut self, rates: OverageRates) -> Self {
        self.overage = Some(rates);
        self
    }

    /// Checks and builds the catalog.
    ///
    /// # Errors
    /// [`CatalogError`] naming the field: a missing tier or overage section, a negative price,
    /// a zero transaction block, an empty or shared Stripe price id, or a hard-limited tier
    /// that charges a base price without including anything (see `docs/billing.md`).
    pub fn build(self) -> Result<Catalog, CatalogError> {
        let overage = self
            .overage
            .ok_or_else(|| CatalogError::new("overage", "missing"))?;
        if overage.ai_insight_unit_price < 0 {
            return Err(CatalogError::new(
                "overage.ai_insight.unit_price",
                "must not be negative",
            ));
        }
        if overage.transaction_block_price < 0 {
            return Err(CatalogError::new(
                "overage.transaction_volume.block_price",
                "must not be negative",
            ));
        }
        if overage.transaction_block == 0 {
            return Err(CatalogError::new(
                "overage.transaction_volume.block",
                "must be at least 1",
            ));
        }
        let mut tiers = BTreeMap::new();
        for mut plan in self.tiers {
            let name = plan.tier.as_str();
            if plan.price < 0 {
                return Err(CatalogError::new(
                    format!("tiers.{name}.price"),
                    "must not be negative",
                ));
            }
            if let Some(id) = plan.stripe_price_id.take() {
                plan.stripe_price_id = Some(non_empty(id).ok_or_else(|| {
                    CatalogError::new(format!("tiers.{name}.stripe_price_id"), "is empty")
                })?);
            }
            tiers.insert(key(plan.tier), plan);
        }
        if let Some(missing) = TIERS.into_iter().find(|t| !tiers.contains_key(&key(*t))) {
            return Err(CatalogError::new(
                format!("tiers.{}", missing.as_str()),
                "missing: the catalog must define starter, professional, business and enterprise",
            ));
        }
        check_unique_prices(&tiers)?;
        Ok(Catalog {
            currency: self.currency,
            tiers,
            overage,
        })
    }
}

/// Converts a decimal major-unit amount (`"29.00"`) to minor units, exactly.
fn to_minor(field: &str, amount: Decimal, currency: Currency) -> Result<i64, CatalogError> {
    let digits = currency.minor_digits().unwrap_or(2);
    let scaled = amount * Decimal::from(10_i64.pow(digits));
    if scaled.fract() != Decimal::ZERO {
        return Err(CatalogError::new(
            field,
            format!("{amount} has more than {digits} decimals for {currency}"),
        ));
    }
    i64::try_from(scaled).map_err(|_| CatalogError::new(field, format!("{amount} is too large")))
}

/// The TOML file's shape.
mod file {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct CatalogFile {
        currency: Option<String>,
        tiers: BTreeMap<String, TierFile>,
        overage: OverageFile,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TierFile {
        price: Decimal,
        scenarios: LimitFile,
        ai_insights: LimitFile,
        transaction_volume: LimitFile,
        overage: bool,
        stripe_price_id: Option<String>,
    }

    /// A count, or the word `"unlimited"` (TOML has no null, and a missing key must not
    /// silently mean unlimited).
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum LimitFile {
        Count(i64),
        Word(String),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct OverageFile {
        ai_insight: AiOverageFile,
        transaction_volume: VolumeOverageFile,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct AiOverageFile {
        unit_price: Decimal,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct VolumeOverageFile {
        block: i64,
        block_price: Decimal,
    }

    fn limit(field: &str, value: LimitFile) -> Result<Option<u64>, CatalogError> {
        match value {
            LimitFile::Word(w) if w == "unlimited" => Ok(None),
            LimitFile::Word(w) => Err(CatalogError::new(
                field,
                format!("{w:?} is neither a count nor \"unlimited\""),
            )),
            LimitFile::Count(n) => u64::try_from(n)
                .map(Some)
                .map_err(|_| CatalogError::new(field, format!("{n} is negative"))),
        }
    }

    fn limit_u32(field: &str, value: LimitFile) -> Result<Option<u32>, CatalogError> {
        limit(field, value)?
            .map(|n| {
                u32::try_from(n).map_err(|_| CatalogError::new(field, format!("{n} is too large")))
            })
            .transpose()
    }

    impl CatalogFile {
        pub(super) fn into_catalog(self) -> Result<Catalog, CatalogError> {
            let currency = match self.currency {
                Some(c) => {
                    Currency::parse(&c).map_err(|e| CatalogError::currency("currency", e))?
                }
                None => Currency::USD,
            };
            let block = u64::try_from(self.overage.transaction_volume.block)
                .ok()
                .filter(|b| *b > 0)
                .ok_or_else(|| {
                    CatalogError::new("overage.transaction_volume.block", "must be at least 1")
                })?;
            let mut builder = CatalogBuilder::new(currency).overage(OverageRates {
                ai_insight_unit_price: to_minor(
                    "overage.ai_insight.unit_price",
                    self.overage.ai_insight.unit_price,
                    currency,
                )?,
                transaction_block: block,
                transaction_block_price: to_minor(
                    "overage.transaction_volume.block_price",
                    self.overage.transaction_volume.block_price,
                    currency,
                )?,
            });
            for (name, t) in self.tiers {
                let tier = Tier::parse(&name).ok_or_else(|| {
                    CatalogError::new(
                        format!("tiers.{name}"),
                        "unknown tier (expected starter, professional, business or enterprise)",
                    )
                })?;
                let f = |field: &str| format!("tiers.{name}.{field}");
                builder = builder.tier(TierPlan {
                    tier,
                    price: to_minor(&f("price"), t.price, currency)?,
                    limits: Limits {
                        scenarios: limit_u32(&f("scenarios"), t.scenarios)?,
                        ai_insights: limit_u32(&f("ai_insights"), t.ai_insights)?,
                        transaction_volume: limit(&f("transaction_volume"), t.transaction_volume)?,
                    },
                    overage: t.overage,
                    stripe_price_id: t.stripe_price_id,
                });
            }
            builder.build()
        }
    }
}
