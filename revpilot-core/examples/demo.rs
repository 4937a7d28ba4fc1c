//! Run with: `cargo run --release -p revpilot-core --example demo --features synth`
//!
//! Generates a realistic two-currency SaaS account (trials, coupons, upgrades, churn) and prints
//! its last twelve months of metrics, a few traced movements, and why the `stripe` profile's MRR
//! differs from the default one.

use chrono::Months;
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::synth::{SynthConfig, fx_table, generate};
use revpilot_core::{Currency, Profile};

fn main() {
    let config = SynthConfig::new(5_000, 2024);
    let account = generate(&config);
    let fx = fx_table(&config);
    let engine = Engine::new(&account, Profile::Default.rules(), Currency::USD).with_fx(&fx);
    let to = config.end();
    let from = to.checked_sub_months(Months::new(11)).unwrap_or(to);
    let report = match engine.series(&SeriesRequest::new(from, to, Granularity::Month)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(1);
        }
    };
    let usd = |d| Currency::USD.round(d);
    let pct = |d: Option<rust_decimal::Decimal>| {
        d.map_or("-".to_owned(), |d| {
            format!("{:.1}%", d * rust_decimal::Decimal::ONE_HUNDRED)
        })
    };
    println!(
        "RevPilot demo: {} customers, {} subscriptions, {} payments (USD and EUR, reported in USD)\n",
        account.customers.len(),
        account.subscriptions.len(),
        account.payments.len()
    );
    println!(
        "{:<10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10} {:>6} {:>7} {:>7}",
        "month",
        "MRR",
        "new",
        "react",
        "expand",
        "contract",
        "churn",
        "fx",
        "revenue",
        "cust",
        "churn%",
        "NRR"
    );
    for r in &report.rows {
        println!(
            "{:<10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10} {:>6} {:>7} {:>7}",
            r.date.format("%Y-%m"),
            usd(r.mrr),
            usd(r.new_mrr),
            usd(r.reactivation_mrr),
            usd(r.expansion_mrr),
            usd(r.contraction_mrr),
            usd(r.churned_mrr),
            usd(r.fx_mrr),
            usd(r.total_revenue),
            r.total_customers,
            pct(r.customer_churn_rate),
            pct(r.nrr),
        );
    }
    if let Some(last) = report.rows.last() {
        println!(
            "\nARR {} | ARPA {} | LTV {} | quick ratio {} | GRR {}",
            usd(last.arr),
            last.arpu.map_or("-".into(), |v| usd(v).to_string()),
            last.ltv.map_or("-".into(), |v| usd(v).to_string()),
            last.quick_ratio
                .map_or("-".into(), |v| v.round_dp(2).to_string()),
            pct(last.grr),
        );
    }
    if let Ok(ledger) = engine.movements(to.checked_sub_months(Months::new(1)).unwrap_or(to), to) {
        println!(
            "\nA few of last month's {} movements, each traceable to its customer:",
            ledger.movements.len()
        );
        for m in ledger.movements.iter().take(5) {
            println!(
                "  {} {:<12} {:<13} {:>9} ({} -> {}) {}",
                m.at.format("%Y-%m-%d %H:%M"),
                m.customer,
                m.kind.name(),
                usd(m.amount),
                usd(m.mrr_before),
                usd(m.mrr_after),
                m.subscriptions.join(",")
            );
        }
    }
    if let Ok(diff) = engine.diff_profiles(&Profile::Stripe.rules(), to) {
        println!(
            "\nWhy doesn't this match Stripe? On {to}: default MRR {}, stripe-profile MRR {}; {} customers differ, e.g.:",
            usd(diff.total_a),
            usd(diff.total_b),
            diff.customers.len()
        );
        for c in diff.customers.iter().take(5) {
            let causes: Vec<&str> = c.causes.iter().map(|s| s.name()).collect();
            println!(
                "  {:<12} {:>9} vs {:>9} because {}",
                c.customer,
                usd(c.mrr_a),
                usd(c.mrr_b),
                causes.join(" + ")
            );
        }
    }
    println!("\n{} anomalies in the input", report.anomalies.len());
}
