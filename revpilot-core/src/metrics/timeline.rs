//! One subscription's MRR over time under a rule profile: the instants where it changes and by how
//! much, in native fixed point, attributed to the subscription's main price.

use super::compile::{COff, CSub, Compiled, NEVER, Secs, month_factor};
use crate::model::Status;
use crate::rules::{ChurnTiming, DiscountRule, Rules};

/// A change of one subscription's MRR.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Change {
    pub(crate) at: Secs,
    /// Global subscription index.
    pub(crate) sub: u32,
    /// Interned price id of the subscription's main item (the one with the largest MRR).
    pub(crate) price: u32,
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
        ChurnTiming::AtEnd => sub.ends_at,
        ChurnTiming::AtCancellation => sub.canceled_at.min(sub.ends_at),
    }
}

impl Compiled<'_> {
    /// The subscription's value (native, after discounts) and main price from `at` until its next
    /// breakpoint.
    fn value_at(
        &self,
        sub: &CSub<'_>,
        rules: &Rules,
        status: Option<Status>,
        at: Secs,
    ) -> (i64, u32) {
        let live = status.is_some_and(|s| counts(s, rules))
            && at >= sub.trial_end
            && at < end_of_service(sub, rules);
        if !live {
            return (0, u32::MAX);
        }
        let mut total: i128 = 0;
        let mut main: Option<(i64, u32, usize)> = None;
        for i in sub.items.start as usize..sub.items.end as usize {
            let item = &self.items[i];
            if item.from <= at && at < item.to {
                total += i128::from(item.monthly);
                let better = match main {
                    None => true,
                    Some((m, p, _)) => {
                        item.monthly > m
                            || (item.monthly == m
                                && self.prices[item.price as usize] < self.prices[p as usize])
                    }
                };
                if better {
                    main = Some((item.monthly, item.price, i));
                }
            }
        }
        let Some((_, price, main_item)) = main else {
            return (0, u32::MAX);
        };
        for d in &self.discounts[sub.discounts.start as usize..sub.discounts.end as usize] {
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
                    let item = &self.items[main_item];
                    let (num, den) = month_factor(item.interval, item.count);
                    (total - div_half_even(i128::from(per_period) * num, den)).max(0)
                }
            };
        }
        // Bounded by the item sum, which fits i64 per the compile-time range check; saturate
        // rather than wrap for an adversarial sum of many maximal items.
        (i64::try_from(total).unwrap_or(i64::MAX), price)
    }

    /// Appends subscription `s`'s changes under `rules` to `out`. `scratch` is a reusable buffer.
    pub(crate) fn emit_changes(
        &self,
        s: u32,
        rules: &Rules,
        out: &mut Vec<Change>,
        scratch: &mut Vec<Secs>,
    ) {
        let sub = &self.subs[s as usize];
        let statuses = &self.statuses[sub.statuses.start as usize..sub.statuses.end as usize];
        if statuses.is_empty() {
            return;
        }
        scratch.clear();
        scratch.extend(statuses.iter().map(|(t, _)| *t));
        for item in &self.items[sub.items.start as usize..sub.items.end as usize] {
            scratch.push(item.from);
            scratch.push(item.to);
        }
        for d in &self.discounts[sub.discounts.start as usize..sub.discounts.end as usize] {
            scratch.push(d.start);
            scratch.push(d.end_while_applicable);
            if let Some(e) = d.end_forever_only {
                scratch.push(e);
            }
        }
        scratch.push(sub.trial_end);
        scratch.push(end_of_service(sub, rules));
        scratch.sort_unstable();
        scratch.dedup();

        let mut status_idx = 0usize;
        let mut prev_value = 0i64;
        let mut prev_price = u32::MAX;
        for &at in scratch.iter() {
            if at == NEVER || at == i64::MIN || at < statuses[0].0 {
                continue;
            }
            while status_idx + 1 < statuses.len() && statuses[status_idx + 1].0 <= at {
                status_idx += 1;
            }
            let status = Some(statuses[status_idx].1);
            let (value, price) = self.value_at(sub, rules, status, at);
            if value == prev_value && (value == 0 || price == prev_price) {
                continue;
            }
            let currency = sub.currency;
            if prev_value > 0 && value > 0 && price != prev_price {
                out.push(Change {
                    at,
                    sub: s,
                    price: prev_price,
                    currency,
                    delta: -prev_value,
                });
                out.push(Change {
                    at,
                    sub: s,
                    price,
                    currency,
                    delta: value,
                });
            } else {
                let price = if value > 0 { price } else { prev_price };
                out.push(Change {
                    at,
                    sub: s,
                    price,
                    currency,
                    delta: value - prev_value,
                });
            }
            prev_value = value;
            prev_price = if value > 0 { price } else { u32::MAX };
        }
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
    }
}
