//! Run with: `cargo run --release -p revpilot-benches --bin series_1m [-- CUSTOMERS]`
//!
//! One end-to-end run of the engine's target: the daily series over 730 days for a synthetic
//! account of 1,000,000 customers, with wall times and the process's peak memory. Criterion
//! (`cargo bench -p revpilot-benches`) measures the same at smaller sizes with statistics.

use std::time::Instant;

use chrono::Months;
use revpilot_benches::{bench_account, peak_rss_bytes, touch_every_entry};
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::synth::{fx_table, timeline_entries};
use revpilot_core::{Currency, Rules};

fn main() {
    let customers: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let t = Instant::now();
    let (config, account) = bench_account(customers);
    let fx = fx_table(&config);
    println!(
        "generated {} customers, {} subscriptions, {} timeline entries in {:.2?}",
        account.customers.len(),
        account.subscriptions.len(),
        timeline_entries(&account),
        t.elapsed()
    );
    let rss_input = peak_rss_bytes().unwrap_or(0);

    let t = Instant::now();
    let floor = touch_every_entry(&account);
    let baseline = t.elapsed();

    let t = Instant::now();
    let engine = Engine::new(&account, Rules::default(), Currency::USD).with_fx(&fx);
    let compile = t.elapsed();

    let to = config.end();
    let from = to
        .checked_sub_months(Months::new(24))
        .and_then(|d| d.succ_opt())
        .unwrap_or(to);
    let t = Instant::now();
    let report = engine
        .series(&SeriesRequest::new(from, to, Granularity::Day))
        .expect("series over the synthetic account");
    let series = t.elapsed();
    let last = report.rows.last().expect("730 rows");
    println!("baseline (touch every entry): {baseline:.2?} (checksum {floor})");
    println!("compile: {compile:.2?}");
    println!("daily series, {} rows: {series:.2?}", report.rows.len());
    println!("compile + series: {:.2?}", compile + series);
    println!(
        "ratio (compile + series) / baseline: {:.1}",
        (compile + series).as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "last row: {} mrr={} customers={}",
        last.date,
        Currency::USD.round(last.mrr),
        last.total_customers
    );
    let peak = peak_rss_bytes().unwrap_or(0);
    println!(
        "peak memory: {:.0} MiB total, {:.0} MiB for the input account, {:.0} MiB added by the engine",
        peak as f64 / 1048576.0,
        rss_input as f64 / 1048576.0,
        peak.saturating_sub(rss_input) as f64 / 1048576.0
    );
}
