//! How `metrics` and `explain` print: JSON for programs, CSV for spreadsheets, a table for people.
//! Money is rounded to the reporting currency's minor unit (half to even, as the core does);
//! rates keep six decimals; a rate that has no value (nobody to divide by) is `null` or empty.

use std::io::{self, Write};

use chrono::{DateTime, Utc};
use revpilot_core::metrics::{Ledger, ProfileDiff, SeriesReport, SeriesRow};
use revpilot_core::{Currency, Profile};
use revpilot_stripe::rebuild::Issue;
use rust_decimal::Decimal;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Value, json};

use crate::Format;

/// A JSON object that keeps its keys in the order given.
struct Ordered(Vec<(&'static str, Value)>);

impl Serialize for Ordered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

fn rate(d: Option<Decimal>) -> Value {
    d.map_or(Value::Null, |d| {
        Value::String(
            d.round_dp_with_strategy(6, rust_decimal::RoundingStrategy::MidpointNearestEven)
                .normalize()
                .to_string(),
        )
    })
}

/// The JSON document of `metrics`.
#[derive(Serialize)]
struct Doc<'a> {
    currency: &'a str,
    profile: &'a str,
    /// The instant the data runs to: no row reaches past it.
    as_of: Option<String>,
    series: Vec<Ordered>,
    movements: Vec<Ordered>,
    anomalies: Vec<String>,
}

/// The series columns, in order, for one row.
fn columns(c: Currency, r: &SeriesRow) -> Vec<(&'static str, Value)> {
    let m = |d: Decimal| Value::String(c.plain(d));
    let om = |d: Option<Decimal>| d.map_or(Value::Null, m);
    vec![
        ("date", json!(r.date.to_string())),
        ("period_start", json!(r.period_start.to_string())),
        ("mrr_start", m(r.mrr_start)),
        ("mrr", m(r.mrr)),
        ("arr", m(r.arr)),
        ("new_mrr", m(r.new_mrr)),
        ("expansion_mrr", m(r.expansion_mrr)),
        ("contraction_mrr", m(r.contraction_mrr)),
        ("churned_mrr", m(r.churned_mrr)),
        ("reactivation_mrr", m(r.reactivation_mrr)),
        ("fx_mrr", m(r.fx_mrr)),
        ("total_revenue", m(r.total_revenue)),
        ("customers_start", json!(r.customers_start)),
        ("total_customers", json!(r.total_customers)),
        ("active_subscriptions", json!(r.active_subscriptions)),
        ("churned_customers", json!(r.churned_customers)),
        ("arpu", om(r.arpu)),
        ("ltv", om(r.ltv)),
        ("customer_churn_rate", rate(r.customer_churn_rate)),
        ("revenue_churn_rate", rate(r.revenue_churn_rate)),
        ("net_revenue_churn_rate", rate(r.net_revenue_churn_rate)),
        ("quick_ratio", rate(r.quick_ratio)),
        ("nrr", rate(r.nrr)),
        ("grr", rate(r.grr)),
        ("partial", json!(r.partial)),
    ]
}

fn anomalies(series: &SeriesReport, ledger: &Ledger, issues: &[Issue]) -> Vec<String> {
    let mut all: Vec<String> = issues.iter().map(ToString::to_string).collect();
    for a in series.anomalies.iter().chain(&ledger.anomalies) {
        let text = a.to_string();
        if !all.contains(&text) {
            all.push(text);
        }
    }
    all
}

/// Writes the report of `metrics`.
pub(crate) fn write(
    out: &mut impl Write,
    format: Format,
    profile: Profile,
    as_of: Option<DateTime<Utc>>,
    series: &SeriesReport,
    ledger: &Ledger,
    issues: &[Issue],
) -> io::Result<()> {
    let as_of_text = as_of.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string());
    let c = series.currency;
    match format {
        Format::Json => {
            let rows: Vec<Ordered> = series.rows.iter().map(|r| Ordered(columns(c, r))).collect();
            let movements: Vec<Ordered> = ledger
                .movements
                .iter()
                .map(|m| {
                    Ordered(vec![
                        ("date", json!(m.date.to_string())),
                        ("customer", json!(m.customer)),
                        ("kind", json!(m.kind)),
                        ("amount", json!(c.plain(m.amount))),
                    ])
                })
                .collect();
            let doc = Doc {
                currency: c.as_str(),
                profile: profile.name(),
                as_of: as_of.map(|t| t.to_rfc3339()),
                series: rows,
                movements,
                anomalies: anomalies(series, ledger, issues),
            };
            serde_json::to_writer_pretty(&mut *out, &doc).map_err(io::Error::other)?;
            writeln!(out)
        }
        Format::Csv => {
            let Some(first) = series.rows.first() else {
                return Ok(());
            };
            let header: Vec<&str> = columns(c, first).into_iter().map(|(k, _)| k).collect();
            writeln!(out, "{}", header.join(","))?;
            for r in &series.rows {
                let cells: Vec<String> = columns(c, r)
                    .into_iter()
                    .map(|(_, v)| match v {
                        Value::String(s) => s,
                        Value::Null => String::new(),
                        other => other.to_string(),
                    })
                    .collect();
                writeln!(out, "{}", cells.join(","))?;
            }
            Ok(())
        }
        Format::Table => {
            writeln!(
                out,
                "MRR in {} under the {} profile",
                c.as_str().to_uppercase(),
                profile.name()
            )?;
            if let Some(t) = &as_of_text {
                writeln!(
                    out,
                    "Data as of {t}; rows marked * are partial (their period ends after it)"
                )?;
            }
            writeln!(
                out,
                "{:<11} {:>14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>8} {:>8}",
                "date",
                "mrr",
                "new",
                "expansion",
                "contraction",
                "churned",
                "reactivated",
                "customers",
                "churn",
                "nrr"
            )?;
            let pct = |d: Option<Decimal>| {
                d.map_or_else(
                    || "-".to_owned(),
                    |d| format!("{}%", (d * Decimal::ONE_HUNDRED).round_dp(1)),
                )
            };
            for r in &series.rows {
                let date = if r.partial {
                    format!("{}*", r.date)
                } else {
                    r.date.to_string()
                };
                writeln!(
                    out,
                    "{:<11} {:>14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>8} {:>8}",
                    date,
                    c.plain(r.mrr),
                    c.plain(r.new_mrr),
                    c.plain(r.expansion_mrr),
                    c.plain(r.contraction_mrr),
                    c.plain(r.churned_mrr),
                    c.plain(r.reactivation_mrr),
                    r.total_customers,
                    pct(r.customer_churn_rate),
                    pct(r.nrr),
                )?;
            }
            let notes = anomalies(series, ledger, issues);
            if !notes.is_empty() {
                writeln!(out, "\n{} notes on the data:", notes.len())?;
                for n in notes.iter().take(20) {
                    writeln!(out, "  - {n}")?;
                }
                if notes.len() > 20 {
                    writeln!(
                        out,
                        "  ... and {} more (see --format json)",
                        notes.len() - 20
                    )?;
                }
            }
            Ok(())
        }
    }
}

/// Writes the per-customer profile diff of `explain`.
pub(crate) fn explain(
    out: &mut impl Write,
    a: Profile,
    b: Profile,
    c: Currency,
    diff: &ProfileDiff,
) -> io::Result<()> {
    writeln!(
        out,
        "MRR at the end of {}: {} {} under {}, {} under {} ({} customers differ)",
        diff.date,
        c.plain(diff.total_a),
        c.as_str().to_uppercase(),
        a.name(),
        c.plain(diff.total_b),
        b.name(),
        diff.customers.len()
    )?;
    for d in &diff.customers {
        let causes: Vec<String> = d.causes.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "  {}: {} -> {} ({})",
            d.customer,
            c.plain(d.mrr_a),
            c.plain(d.mrr_b),
            causes.join(", ")
        )?;
    }
    Ok(())
}
