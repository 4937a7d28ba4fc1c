//! A small text format for metric cases: an account's history in, commands whose rendered output
//! is the snapshot. Adding a case is adding a few lines (see `tests/cases/README.md`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use revpilot_core::fx::FxTable;
use revpilot_core::metrics::{Engine, Granularity, Segmentation, SeriesRequest, SeriesRow};
use revpilot_core::model::{
    Account, BillingScheme, Cancellation, Customer, Discount, DiscountOff, DisputeMove, Duration,
    Interval, ItemPeriod, Payment, Price, Refund, Status, StatusChange, Subscription, Tier,
    TiersMode, UsageType,
};
use revpilot_core::{Currency, LtvChurn, Profile, Rules};
use rust_decimal::Decimal;

pub(crate) fn instant(s: &str) -> Result<DateTime<Utc>, String> {
    let full = match s.len() {
        10 => format!("{s}T00:00:00"),
        16 => format!("{s}:00"),
        _ => s.to_owned(),
    };
    NaiveDateTime::parse_from_str(&full, "%Y-%m-%dT%H:%M:%S")
        .map(|t| t.and_utc())
        .map_err(|e| format!("bad instant {s:?}: {e}"))
}

pub(crate) fn date(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|e| format!("bad date {s:?}: {e}"))
}

fn range<T>(s: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<(T, Option<T>), String> {
    match s.split_once("..") {
        Some((a, b)) => Ok((f(a)?, Some(f(b)?))),
        None => Ok((f(s)?, None)),
    }
}

fn dec(s: &str) -> Result<Decimal, String> {
    s.parse().map_err(|e| format!("bad number {s:?}: {e}"))
}

fn kv<'a>(words: &[&'a str]) -> BTreeMap<&'a str, &'a str> {
    words
        .iter()
        .map(|w| w.split_once('=').unwrap_or((w, "")))
        .collect()
}

fn rules_of(opts: &BTreeMap<&str, &str>) -> Result<Rules, String> {
    let mut rules = match opts.get("profile") {
        Some(p) => p.parse::<Profile>().map_err(|e| e.to_string())?.rules(),
        None => Rules::default(),
    };
    if opts.contains_key("paused_counts") {
        rules.paused_counts = true;
    }
    if opts.contains_key("past_due_excluded") {
        rules.past_due_counts = false;
    }
    match opts.get("ltv") {
        None | Some(&"trailing") => {}
        Some(&"period") => rules.ltv_churn = LtvChurn::Period,
        Some(other) => return Err(format!("ltv={other}: expected trailing or period")),
    }
    Ok(rules)
}

fn parse_status(s: &str) -> Result<Status, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("unknown status {s:?}"))
}

/// `2900/month`, `120000/year`, `1500/monthx3`.
fn parse_price(id: &str, spec: &str, extra: &[&str]) -> Result<Price, String> {
    let (amount, per) = spec
        .split_once('/')
        .ok_or(format!("price {spec:?}: want AMOUNT/INTERVAL"))?;
    let (interval, count) = match per.split_once('x') {
        Some((i, c)) => (i, c.parse::<u32>().map_err(|e| e.to_string())?),
        None => (per, 1),
    };
    let interval = match interval {
        "day" => Some(Interval::Day),
        "week" => Some(Interval::Week),
        "month" => Some(Interval::Month),
        "year" => Some(Interval::Year),
        "once" => None,
        other => return Err(format!("unknown interval {other:?}")),
    };
    let mut price = Price {
        id: id.to_owned(),
        product: None,
        currency: None,
        unit_amount: dec(amount)?,
        interval,
        interval_count: count,
        scheme: BillingScheme::PerUnit,
        usage_type: UsageType::Licensed,
    };
    let opts = kv(extra);
    if opts.contains_key("metered") {
        price.usage_type = UsageType::Metered;
    }
    if let Some(c) = opts.get("price_currency") {
        price.currency = Some(Currency::parse(c).map_err(|e| e.to_string())?);
    }
    for mode in ["volume", "graduated"] {
        if let Some(tiers) = opts.get(mode) {
            // UPTO:UNIT+FLAT,...; UPTO "inf" for the open tier.
            let mut out = Vec::new();
            for t in tiers.split(',') {
                let (up, rest) = t.split_once(':').ok_or(format!("tier {t:?}"))?;
                let (unit, flat) = rest.split_once('+').unwrap_or((rest, "0"));
                out.push(Tier {
                    up_to: if up == "inf" {
                        None
                    } else {
                        Some(up.parse().map_err(|e| format!("{e}"))?)
                    },
                    unit_amount: dec(unit)?,
                    flat_amount: dec(flat)?,
                });
            }
            price.scheme = BillingScheme::Tiered {
                mode: if mode == "volume" {
                    TiersMode::Volume
                } else {
                    TiersMode::Graduated
                },
                tiers: out,
            };
        }
    }
    Ok(price)
}

/// A parsed case: the account, rates, and the commands to render.
pub(crate) struct Case {
    pub account: Account,
    pub fx: FxTable,
    pub commands: Vec<Vec<String>>,
}

pub(crate) fn parse(text: &str) -> Result<Case, String> {
    let mut account = Account::default();
    let mut fx = FxTable::new();
    let mut commands = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let err = |e: String| format!("line {}: {e}: {raw}", n + 1);
        let sub = |account: &mut Account| -> Result<usize, String> {
            account
                .subscriptions
                .len()
                .checked_sub(1)
                .ok_or_else(|| "no subscription yet".to_owned())
        };
        match words[0] {
            "customer" => {
                let opts = kv(&words[2..]);
                account.customers.push(Customer {
                    id: words[1].to_owned(),
                    created: instant(opts.get("created").unwrap_or(&"2020-01-01")).map_err(err)?,
                    country: opts.get("country").map(|s| (*s).to_owned()),
                    metadata: opts
                        .iter()
                        .filter_map(|(k, v)| {
                            k.strip_prefix("meta.")
                                .map(|k| (k.to_owned(), (*v).to_owned()))
                        })
                        .collect(),
                });
            }
            "sub" => {
                let [_, id, customer, currency, ..] = words[..] else {
                    return Err(err("sub ID CUSTOMER CURRENCY".into()));
                };
                account.subscriptions.push(Subscription {
                    id: id.to_owned(),
                    customer: customer.to_owned(),
                    currency: Currency::parse(currency).map_err(|e| err(e.to_string()))?,
                    created: instant("2020-01-01").map_err(err)?,
                    statuses: Vec::new(),
                    items: Vec::new(),
                    discounts: Vec::new(),
                    cancellation: None,
                    trial_end: None,
                });
            }
            "status" => {
                let i = sub(&mut account).map_err(err)?;
                account.subscriptions[i].statuses.push(StatusChange {
                    at: instant(words[1]).map_err(err)?,
                    status: parse_status(words[2]).map_err(err)?,
                });
            }
            "item" => {
                let i = sub(&mut account).map_err(err)?;
                let (from, to) = range(words[1], instant).map_err(err)?;
                let price = parse_price(words[2], words[3], &words[4..]).map_err(err)?;
                let opts = kv(&words[4..]);
                let quantity = match opts.get("qty") {
                    Some(q) => q.parse().map_err(|e| err(format!("{e}")))?,
                    None => 1,
                };
                account.subscriptions[i].items.push(ItemPeriod {
                    price: price.into(),
                    quantity,
                    from,
                    to,
                });
            }
            "discount" => {
                let i = sub(&mut account).map_err(err)?;
                let (start, end) = range(words[1], instant).map_err(err)?;
                let opts = kv(&words[2..]);
                let currency = account.subscriptions[i].currency;
                let off = if let Some(p) = opts.get("percent") {
                    DiscountOff::Percent(dec(p).map_err(err)?)
                } else if let Some(a) = opts.get("amount") {
                    DiscountOff::Amount {
                        amount: dec(a).map_err(err)?,
                        currency,
                    }
                } else {
                    return Err(err("discount needs percent= or amount=".into()));
                };
                let duration = if opts.contains_key("forever") {
                    Duration::Forever
                } else if opts.contains_key("once") {
                    Duration::Once
                } else if let Some(m) = opts.get("repeating") {
                    Duration::Repeating {
                        months: m.parse().map_err(|e| err(format!("{e}")))?,
                    }
                } else {
                    return Err(err("discount needs forever, once or repeating=N".into()));
                };
                account.subscriptions[i].discounts.push(Discount {
                    coupon: opts.get("coupon").unwrap_or(&"coupon").to_string(),
                    off,
                    duration,
                    start,
                    end,
                });
            }
            "cancel" => {
                let i = sub(&mut account).map_err(err)?;
                let opts = kv(&words[1..]);
                let t = |k: &str| opts.get(k).map(|v| instant(v)).transpose();
                account.subscriptions[i].cancellation = Some(Cancellation {
                    canceled_at: t("canceled").map_err(err)?,
                    cancel_at_period_end: opts.contains_key("at_period_end"),
                    cancel_at: t("cancel_at").map_err(err)?,
                    ended_at: t("ended").map_err(err)?,
                });
            }
            "trial_end" => {
                let i = sub(&mut account).map_err(err)?;
                account.subscriptions[i].trial_end = Some(instant(words[1]).map_err(err)?);
            }
            "payment" => {
                let [_, id, customer, at, amount, currency, ..] = words[..] else {
                    return Err(err("payment ID CUSTOMER AT AMOUNT CURRENCY".into()));
                };
                let (mut refunds, mut disputes) = (Vec::new(), Vec::new());
                for w in &words[6..] {
                    if let Some(d) = w.strip_prefix("dispute=") {
                        let (at, amount) =
                            d.split_once('/').ok_or(err("dispute=AT/AMOUNT".into()))?;
                        disputes.push(DisputeMove {
                            at: instant(at).map_err(err)?,
                            amount: dec(amount).map_err(err)?,
                        });
                    }
                    if let Some(r) = w.strip_prefix("refund=") {
                        let (at, amount) =
                            r.split_once('/').ok_or(err("refund=AT/AMOUNT".into()))?;
                        refunds.push(Refund {
                            at: instant(at).map_err(err)?,
                            amount: dec(amount).map_err(err)?,
                        });
                    }
                }
                account.payments.push(Payment {
                    id: id.to_owned(),
                    customer: Some(customer.to_owned()),
                    at: instant(at).map_err(err)?,
                    amount: dec(amount).map_err(err)?,
                    currency: Currency::parse(currency).map_err(|e| err(e.to_string()))?,
                    refunds,
                    disputes,
                });
            }
            "fx" => {
                let [_, from, to, days, rate] = words[..] else {
                    return Err(err("fx FROM TO DAY[..DAY] RATE".into()));
                };
                let (first, last) = range(days, date).map_err(err)?;
                fx.insert_range(
                    first,
                    last.unwrap_or(first),
                    Currency::parse(from).map_err(|e| err(e.to_string()))?,
                    Currency::parse(to).map_err(|e| err(e.to_string()))?,
                    dec(rate).map_err(err)?,
                );
            }
            "report" | "ledger" | "mrr" | "diff" | "cohorts" | "segments" => {
                commands.push(words.iter().map(|w| (*w).to_owned()).collect());
            }
            other => return Err(err(format!("unknown directive {other:?}"))),
        }
    }
    Ok(Case {
        account,
        fx,
        commands,
    })
}

fn money(c: Currency, d: Decimal) -> String {
    let digits = c.minor_digits().unwrap_or(2) as usize;
    format!("{:.digits$}", c.round(d))
}

fn rate(d: Option<Decimal>) -> String {
    d.map_or("-".into(), |d| d.round_dp(4).normalize().to_string())
}

pub(crate) fn render_row(c: Currency, r: &SeriesRow) -> String {
    let mut s = format!(
        "{} mrr={} (from {} since {})",
        r.date,
        money(c, r.mrr),
        money(c, r.mrr_start),
        r.period_start
    );
    for (name, v) in [
        ("new", r.new_mrr),
        ("react", r.reactivation_mrr),
        ("exp", r.expansion_mrr),
        ("contr", r.contraction_mrr),
        ("churn", r.churned_mrr),
        ("fx", r.fx_mrr),
        ("revenue", r.total_revenue),
    ] {
        if !c.round(v).is_zero() {
            let _ = write!(s, " {name}={}", money(c, v));
        }
    }
    if r.partial {
        s.push_str(" partial");
    }
    let _ = write!(
        s,
        "\n    customers {}->{} churned={} subs={} arpu={} ltv={} churn_rate={} rev_churn={} net_rev_churn={} quick={} nrr={} grr={}",
        r.customers_start,
        r.total_customers,
        r.churned_customers,
        r.active_subscriptions,
        r.arpu.map_or("-".into(), |v| money(c, v)),
        r.ltv.map_or("-".into(), |v| money(c, v)),
        rate(r.customer_churn_rate),
        rate(r.revenue_churn_rate),
        rate(r.net_revenue_churn_rate),
        rate(r.quick_ratio),
        rate(r.nrr),
        rate(r.grr),
    );
    s
}

/// Runs every command of a case and renders the results.
pub(crate) fn run(case: &Case) -> Result<String, String> {
    let mut out = String::new();
    for cmd in &case.commands {
        let words: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
        let opts = kv(&words);
        let rules = rules_of(&opts)?;
        let currency = match opts.get("currency") {
            Some(c) => Currency::parse(c).map_err(|e| e.to_string())?,
            None => Currency::USD,
        };
        let engine = Engine::new(&case.account, rules, currency).with_fx(&case.fx);
        let engine = match opts.get("as_of") {
            Some(at) => engine.with_as_of(instant(at)?),
            None => engine,
        };
        let _ = writeln!(out, "> {}", cmd.join(" "));
        let anomalies = match cmd[0].as_str() {
            "report" => {
                let granularity = match cmd[1].as_str() {
                    "day" => Granularity::Day,
                    "month" => Granularity::Month,
                    g => return Err(format!("granularity {g:?}")),
                };
                let (from, to) = range(&cmd[2], date)?;
                let report =
                    match engine.series(&SeriesRequest::new(from, to.unwrap_or(from), granularity))
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = writeln!(out, "error: {e}");
                            continue;
                        }
                    };
                for row in &report.rows {
                    let _ = writeln!(out, "{}", render_row(currency, row));
                }
                report.anomalies
            }
            "ledger" => {
                let (from, to) = range(&cmd[1], date)?;
                let ledger = engine
                    .movements(from, to.unwrap_or(from))
                    .map_err(|e| e.to_string())?;
                for m in &ledger.movements {
                    let _ = writeln!(
                        out,
                        "{} {} {} {} ({} -> {}) [{}]",
                        m.at.format("%Y-%m-%dT%H:%M"),
                        m.customer,
                        m.kind.name(),
                        money(currency, m.amount),
                        money(currency, m.mrr_before),
                        money(currency, m.mrr_after),
                        m.subscriptions.join(",")
                    );
                }
                ledger.anomalies
            }
            "mrr" => {
                let snap = engine
                    .mrr_at(instant(&cmd[1])?)
                    .map_err(|e| e.to_string())?;
                let _ = write!(out, "total={}", money(currency, snap.total));
                for c in &snap.customers {
                    let _ = write!(out, " {}={}", c.customer, money(currency, c.mrr));
                }
                out.push('\n');
                snap.anomalies
            }
            "diff" => {
                let day = date(&cmd[1])?;
                let a: Profile = cmd[2]
                    .parse()
                    .map_err(|e: revpilot_core::rules::UnknownProfile| e.to_string())?;
                let b: Profile = cmd[3]
                    .parse()
                    .map_err(|e: revpilot_core::rules::UnknownProfile| e.to_string())?;
                let diff = engine
                    .with_rules(a.rules())
                    .diff_profiles(&b.rules(), day)
                    .map_err(|e| e.to_string())?;
                let _ = writeln!(
                    out,
                    "total {}={} {}={}",
                    a,
                    money(currency, diff.total_a),
                    b,
                    money(currency, diff.total_b)
                );
                for c in &diff.customers {
                    let causes: Vec<&str> = c.causes.iter().map(|s| s.name()).collect();
                    let _ = writeln!(
                        out,
                        "{} {}={} {}={} because {}",
                        c.customer,
                        a,
                        money(currency, c.mrr_a),
                        b,
                        money(currency, c.mrr_b),
                        causes.join("+")
                    );
                }
                Vec::new()
            }
            "cohorts" => {
                let (from, to) = range(&cmd[1], date)?;
                let table = engine
                    .cohorts(from, to.unwrap_or(from))
                    .map_err(|e| e.to_string())?;
                for row in &table.rows {
                    let cells: Vec<String> = row
                        .mrr
                        .iter()
                        .zip(&row.paying)
                        .zip(&row.mrr_retention)
                        .map(|((m, p), r)| format!("{}/{}/{}", money(currency, *m), p, rate(*r)))
                        .collect();
                    let _ = writeln!(
                        out,
                        "{} n={} {}",
                        row.cohort.format("%Y-%m"),
                        row.customers,
                        cells.join(" ")
                    );
                }
                table.anomalies
            }
            "segments" => {
                let by = match cmd[1].as_str() {
                    "plan" => Segmentation::Plan,
                    "currency" => Segmentation::Currency,
                    "country" => Segmentation::Country,
                    m => Segmentation::Metadata(
                        m.strip_prefix("meta.")
                            .ok_or(format!("segment {m:?}"))?
                            .to_owned(),
                    ),
                };
                let (from, to) = range(&cmd[2], date)?;
                let segs = engine
                    .segmented_series(
                        &SeriesRequest::new(from, to.unwrap_or(from), Granularity::Month),
                        &by,
                    )
                    .map_err(|e| e.to_string())?;
                for seg in &segs {
                    let _ = writeln!(out, "[{}]", seg.key);
                    for row in &seg.report.rows {
                        let _ = writeln!(out, "{}", render_row(currency, row));
                    }
                }
                Vec::new()
            }
            other => return Err(format!("unknown command {other}")),
        };
        for a in anomalies {
            let _ = writeln!(out, "! {a}");
        }
    }
    Ok(out)
}
