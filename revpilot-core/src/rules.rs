//! Rule profiles: the switches where revenue-analytics vendors compute MRR differently, and named
//! presets. `docs/metrics.md` documents each switch and which vendor does what.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which discounts lower MRR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscountRule {
    /// Every discount lowers MRR while it applies (once, repeating or forever). ChartMogul-like.
    WhileApplicable,
    /// Only `forever` discounts lower MRR; temporary ones are treated as one-off concessions.
    ForeverOnly,
}

/// When a cancellation removes a subscription's MRR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChurnTiming {
    /// When the subscription actually ends (`ended_at`, or the scheduled `cancel_at`).
    AtEnd,
    /// When the cancellation is requested (`canceled_at`), even if service runs to period end.
    AtCancellation,
}

/// Which customers a period's customer churn rate counts in its numerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChurnRateRule {
    /// Customers paying at the start of the period with at least one churn movement in it, each
    /// once.
    PayingAtStart,
    /// Customers with a churn movement in the period and no new or reactivation movement in it:
    /// anyone who (re)started inside the period is ignored, even if they were also paying at its
    /// start.
    ExcludeStartedInPeriod,
}

/// Which customer churn rate LTV divides ARPA by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LtvChurn {
    /// The trailing six months' customer churn: the churned customers of the row's period and
    /// the five periods before it over the customers paying at the start of each (a
    /// customer-weighted average of six monthly rates). `None` until six periods of paying
    /// customers exist, and when nobody churned in them. Stable by construction: two
    /// consecutive rows share five of their six periods. ChartMogul-like.
    #[default]
    TrailingSixMonths,
    /// The row's own customer churn rate (a calendar month, or the trailing 30 days): swings
    /// with every month's noise. Kept for parity with tools that divide by the latest rate.
    Period,
}

/// The switches where vendors differ. Build one from a [`Profile`] or set fields directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rules {
    /// Which discounts lower MRR.
    pub discounts: DiscountRule,
    /// When a cancellation removes MRR.
    pub churn_timing: ChurnTiming,
    /// Whether a `paused` subscription keeps its MRR.
    pub paused_counts: bool,
    /// Whether a `past_due` subscription keeps its MRR.
    pub past_due_counts: bool,
    /// Which churned customers the customer churn rate counts.
    pub churn_rate: ChurnRateRule,
    /// Changes of one customer within this many minutes of the first (and on the same UTC day)
    /// are netted into one movement.
    pub grouping_window_minutes: u32,
    /// Which churn rate LTV divides ARPA by (read by LTV only; MRR never depends on it).
    #[serde(default)]
    pub ltv_churn: LtvChurn,
}

impl Default for Rules {
    fn default() -> Self {
        Profile::Default.rules()
    }
}

/// One switch of [`Rules`], named; used to explain why two profiles disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleSwitch {
    /// [`Rules::discounts`].
    Discounts,
    /// [`Rules::churn_timing`].
    ChurnTiming,
    /// [`Rules::paused_counts`].
    PausedCounts,
    /// [`Rules::past_due_counts`].
    PastDueCounts,
    /// [`Rules::churn_rate`].
    ChurnRate,
    /// [`Rules::grouping_window_minutes`].
    GroupingWindow,
    /// [`Rules::ltv_churn`].
    LtvChurn,
}

impl RuleSwitch {
    /// Every switch, in declaration order.
    pub const ALL: [RuleSwitch; 7] = [
        RuleSwitch::Discounts,
        RuleSwitch::ChurnTiming,
        RuleSwitch::PausedCounts,
        RuleSwitch::PastDueCounts,
        RuleSwitch::ChurnRate,
        RuleSwitch::GroupingWindow,
        RuleSwitch::LtvChurn,
    ];

    /// The snake_case name used in docs and output.
    pub fn name(self) -> &'static str {
        match self {
            RuleSwitch::Discounts => "discounts",
            RuleSwitch::ChurnTiming => "churn_timing",
            RuleSwitch::PausedCounts => "paused_counts",
            RuleSwitch::PastDueCounts => "past_due_counts",
            RuleSwitch::ChurnRate => "churn_rate",
            RuleSwitch::GroupingWindow => "grouping_window_minutes",
            RuleSwitch::LtvChurn => "ltv_churn",
        }
    }
}

impl fmt::Display for RuleSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Rules {
    /// The switches on which `self` and `other` differ.
    pub fn differences(&self, other: &Rules) -> Vec<RuleSwitch> {
        RuleSwitch::ALL
            .into_iter()
            .filter(|s| self.with_switch_from(*s, other) != *self)
            .collect()
    }

    /// `self` with one switch taken from `other`.
    pub fn with_switch_from(&self, switch: RuleSwitch, other: &Rules) -> Rules {
        let mut r = *self;
        match switch {
            RuleSwitch::Discounts => r.discounts = other.discounts,
            RuleSwitch::ChurnTiming => r.churn_timing = other.churn_timing,
            RuleSwitch::PausedCounts => r.paused_counts = other.paused_counts,
            RuleSwitch::PastDueCounts => r.past_due_counts = other.past_due_counts,
            RuleSwitch::ChurnRate => r.churn_rate = other.churn_rate,
            RuleSwitch::GroupingWindow => r.grouping_window_minutes = other.grouping_window_minutes,
            RuleSwitch::LtvChurn => r.ltv_churn = other.ltv_churn,
        }
        r
    }
}

/// The named presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// RevPilot's reference definitions, modelled on ChartMogul; `chartmogul` is its alias on
    /// the command line and in the API.
    #[serde(alias = "chartmogul")]
    Default,
    /// Stripe Billing analytics-like.
    Stripe,
    /// ProfitWell-like.
    Profitwell,
}

impl Profile {
    /// Every preset.
    pub const ALL: [Profile; 3] = [Profile::Default, Profile::Stripe, Profile::Profitwell];

    /// The preset's switches.
    pub fn rules(self) -> Rules {
        let default = Rules {
            discounts: DiscountRule::WhileApplicable,
            churn_timing: ChurnTiming::AtEnd,
            paused_counts: false,
            past_due_counts: true,
            churn_rate: ChurnRateRule::PayingAtStart,
            grouping_window_minutes: 60,
            ltv_churn: LtvChurn::TrailingSixMonths,
        };
        match self {
            Profile::Default => default,
            Profile::Stripe => Rules {
                discounts: DiscountRule::ForeverOnly,
                churn_timing: ChurnTiming::AtCancellation,
                ..default
            },
            Profile::Profitwell => Rules {
                churn_rate: ChurnRateRule::ExcludeStartedInPeriod,
                ..default
            },
        }
    }

    /// Other names the preset answers to.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Profile::Default => &["chartmogul"],
            Profile::Stripe | Profile::Profitwell => &[],
        }
    }

    /// The preset's name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Default => "default",
            Profile::Stripe => "stripe",
            Profile::Profitwell => "profitwell",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error for an unknown profile name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown rule profile {0:?}: expected default (alias chartmogul), stripe or profitwell")]
pub struct UnknownProfile(pub String);

impl FromStr for Profile {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|p| {
                p.name().eq_ignore_ascii_case(s)
                    || p.aliases().iter().any(|a| a.eq_ignore_ascii_case(s))
            })
            .ok_or_else(|| UnknownProfile(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_differ_where_documented() {
        let d = Profile::Default.rules();
        assert_eq!(
            d.differences(&Profile::Stripe.rules()),
            vec![RuleSwitch::Discounts, RuleSwitch::ChurnTiming]
        );
        assert_eq!(
            d.differences(&Profile::Profitwell.rules()),
            vec![RuleSwitch::ChurnRate]
        );
        assert!(d.differences(&d).is_empty());
        assert_eq!("Stripe".parse::<Profile>().unwrap(), Profile::Stripe);
        assert_eq!(
            "ChartMogul".parse::<Profile>().unwrap(),
            Profile::Default,
            "chartmogul names the default"
        );
        assert!("baremetrics".parse::<Profile>().is_err());
    }
}
