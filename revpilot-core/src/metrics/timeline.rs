//! One subscription's MRR over time under a rule profile: the instants where it changes and by how
//! much, in native fixed point, attributed to the subscription's main price.

use super::compile::{COff, CSub, Compiled, NEVER, Secs, SubScratch, month_factor};
use crate::anomaly::Anomaly;
use crate::model::Status;
use crate::rules::{ChurnTiming, DiscountRule, Rules};

/// A change of one subscription's MRR.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Change<'a> {
    pub(crate) at: Secs,
    /// Global subscription index.
    pub(crate) sub: u32,
    /// The price id of the subscription's main item (the one with the largest MRR).
    pub(crate) price: &'a str,
    pub(crate) currency: u16,
    pub(crate) delta: i64,
}

/// Division rounding half to even; `den > 0`.
pub(crate) fn div_half_even(num: i128, den: i128) -> i128 {
    // i128 division is a slow library call; nearly every amount fits i64.
    if let (Ok(n), Ok(d)) = (i64::try_from(num), i64::try_from(den)) {
        let q = n.div_euclid(d);
        let r = n.rem_euclid(d);
        return i128::from(match (2 * i128::from(r)).cmp(&i128::from(d)) {
            std::cmp::Ordering::Greater => q + 1,
            std::cmp::Ordering::Equal if q % 2 != 0 => q + 1,
            _ => q,
        });
    }
    let q = num.div_euclid(den);
    let r = num.rem_euclid(den);
    match (2 * r).cmp(&den) {
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal if q % 2 != 0 => q + 1,
        _ => q,
    }
}

fn counts(status: Status, rules: &Rules) -> bool {
    match status {
        Status::Active => true,
        Status::PastDue => rules.past_due_counts,
        Status::Paused => rules.paused_counts,
        Status::Trialing
        | Status::Unpaid
        | Status::Incomplete
        | Status::IncompleteExpired
        | Status::Canceled => false,
    }
}

/// The instant from which a canceled subscription stops counting under `rules`.
fn end_of_service(sub: &CSub<'_>, rules: &Rules) -> Secs {
    match rules.churn_timing {
        ChurnTiming::AtEnd => sub.ends_at(),
        ChurnTiming::AtCancellation => sub.canceled_at().min(sub.ends_at()),
    }
}

/// The subscription's value (native, after discounts) and main price from `at` until its next
/// breakpoint; `live` says whether its status, trial and end of service let it count at all.
fn value_at<'a>(
    scratch: &SubScratch<'a>,
    rules: &Rules,
    live: bool,
    at: Secs,
) -> (i64, Option<&'a str>) {
    if !live {
        return (0, None);
    }
    let mut total: i128 = 0;
    let mut main: Option<usize> = None;
    for (i, item) in scratch.items.iter().enumerate() {
        if item.from <= at && at < item.to {
            total += i128::from(item.monthly);
            let better = match main {
                None => true,
                Some(m) => {
                    let m = &scratch.items[m];
                    item.monthly > m.monthly || (item.monthly == m.monthly && item.price < m.price)
                }
            };
            if better {
                main = Some(i);
            }
        }
    }
    let Some(main) = main else {
        return (0, None);
    };
    let main = &scratch.items[main];
    for d in &scratch.discounts {
        let end = match rules.discounts {
            DiscountRule::WhileApplicable => d.end_while_applicable,
            DiscountRule::ForeverOnly => match d.end_forever_only {
                Some(e) => e,
                None => continue,
            },
        };
        if at < d.start || at >= end {
            continue;
        }
        total = match d.off {
            COff::Percent { num, den } => div_half_even(total * num, den),
            COff::Amount(per_period) => {
                let (num, den) = month_factor(main.interval, main.count);
                (total - div_half_even(i128::from(per_period) * num, den)).max(0)
            }
        };
    }
    // Bounded by the item sum, which the compile-time magnitude check keeps in range; saturate
    // rather than wrap for an adversarial sum of many maximal items.
    (i64::try_from(total).unwrap_or(i64::MAX), Some(main.price))
}

impl<'a> Compiled<'a> {
    /// Appends subscription `s`'s changes under `rules` to `out`, using `scratch` as buffers and
    /// reporting unusable items and discounts to `anomalies`. Returns the subscription's
    /// magnitude bound (see [`CSub::load`]).
    pub(crate) fn emit_changes(
        &self,
        s: u32,
        rules: &Rules,
        out: &mut Vec<Change<'a>>,
        scratch: &mut SubScratch<'a>,
        anomalies: &mut Vec<Anomaly>,
    ) -> f64 {
        let sub = &self.subs[s as usize];
        let bound = sub.load(scratch, Some(anomalies));
        if scratch.statuses.is_empty() {
            return bound;
        }
        let trial_end = sub.trial_end();
        let service_end = end_of_service(sub, rules);
        let mut bps = std::mem::take(&mut scratch.breakpoints);
        bps.clear();
        bps.extend(scratch.statuses.iter().map(|(t, _)| *t));
        for item in &scratch.items {
            bps.push(item.from);
            bps.push(item.to);
        }
        for d in &scratch.discounts {
            bps.push(d.start);
            bps.push(d.end_while_applicable);
            if let Some(e) = d.end_forever_only {
                bps.push(e);
            }
        }
        bps.push(trial_end);
        bps.push(service_end);
        bps.sort_unstable();
        bps.dedup();

        let statuses = &scratch.statuses;
        let first = statuses[0].0;
        let mut status_idx = 0usize;
        let mut prev_value = 0i64;
        let mut prev_price: Option<&'a str> = None;
        let currency = sub.currency;
        for &at in &bps {
            if at == NEVER || at == i64::MIN || at < first {
                continue;
            }
            while status_idx + 1 < statuses.len() && statuses[status_idx + 1].0 <= at {
                status_idx += 1;
            }
            let live = counts(statuses[status_idx].1, rules) && at >= trial_end && at < service_end;
            let (value, price) = value_at(scratch, rules, live, at);
            if value == prev_value && (value == 0 || price == prev_price) {
                continue;
            }
            match (prev_price, price) {
                (Some(old), Some(new)) if prev_value > 0 && value > 0 && old != new => {
                    out.push(Change {
                        at,
                        sub: s,
                        price: old,
                        currency,
                        delta: -prev_value,
                    });
                    out.push(Change {
                        at,
                        sub: s,
                        price: new,
                        currency,
                        delta: value,
                    });
                }
                _ => {
                    let price = if value > 0 { price } else { prev_price };
                    out.push(Change {
                        at,
                        sub: s,
                        price: price.unwrap_or(""),
                        currency,
                        delta: value - prev_value,
                    });
                }
            }
            prev_value = value;
            prev_price = if value > 0 { price } else { None };
        }
        scratch.breakpoints = bps;
        bound
    }
}

#[cfg(test)]
mod tests {
    use super::div_half_even;

    #[test]
    fn half_even_division() {
        assert_eq!(div_half_even(5, 2), 2);
        assert_eq!(div_half_even(7, 2), 4);
        assert_eq!(div_half_even(-5, 2), -2);
        assert_eq!(div_half_even(10, 3), 3);
        assert_eq!(div_half_even(11, 3), 4);
        // Beyond i64: the i128 path. i64::MAX is odd, so its half rounds up.
        let max = i128::from(i64::MAX);
        assert_eq!(div_half_even(max * 4 + 1, 4), max);
        assert_eq!(div_half_even(max * 4 + 2, 4), max + 1);
        assert_eq!(div_half_even((max - 1) * 4 + 2, 4), max - 1);
    }
}
