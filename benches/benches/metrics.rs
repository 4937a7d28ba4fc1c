//! Run with: `cargo bench -p revpilot-benches --bench metrics`
//!
//! The engine's target: the daily series over 730 days for an account of 1,000,000 customers
//! (about 10 million timeline entries), against a baseline measured in the same run (one pass
//! reading every timeline entry). Sizes 250k and 1M show the cost grows with entries, and 730 vs
//! 3,650 days show it barely grows with days.

use std::hint::black_box;
use std::time::Duration;

use chrono::Months;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use revpilot_benches::{bench_account, touch_every_entry};
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::synth::fx_table;
use revpilot_core::{Currency, Rules};

fn series(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));
    for customers in [250_000usize, 1_000_000] {
        let (config, account) = bench_account(customers);
        let fx = fx_table(&config);
        let to = config.end();
        let from_730 = to
            .checked_sub_months(Months::new(24))
            .and_then(|d| d.succ_opt())
            .expect("valid date");
        let from_3650 = to
            .checked_sub_months(Months::new(120))
            .and_then(|d| d.succ_opt())
            .expect("valid date");
        let daily_730 = SeriesRequest::new(from_730, to, Granularity::Day);

        group.bench_function(
            BenchmarkId::new("baseline_touch_every_entry", customers),
            |b| b.iter(|| black_box(touch_every_entry(&account))),
        );
        group.bench_function(BenchmarkId::new("compile", customers), |b| {
            b.iter(|| black_box(Engine::new(&account, Rules::default(), Currency::USD)))
        });
        let engine = Engine::new(&account, Rules::default(), Currency::USD).with_fx(&fx);
        group.bench_function(BenchmarkId::new("series_daily_730", customers), |b| {
            b.iter(|| black_box(engine.series(&daily_730).expect("series")))
        });
        group.bench_function(
            BenchmarkId::new("compile_and_series_daily_730", customers),
            |b| {
                b.iter(|| {
                    let engine =
                        Engine::new(&account, Rules::default(), Currency::USD).with_fx(&fx);
                    black_box(engine.series(&daily_730).expect("series"))
                })
            },
        );
        if customers == 250_000 {
            let daily_3650 = SeriesRequest::new(from_3650, to, Granularity::Day);
            group.bench_function(BenchmarkId::new("series_daily_3650", customers), |b| {
                b.iter(|| black_box(engine.series(&daily_3650).expect("series")))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, series);
criterion_main!(benches);
