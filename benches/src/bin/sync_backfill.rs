//! Sync throughput under a rate limit: a full backfill of 100,000 objects from a fake Stripe whose
//! token bucket refuses (429) requests past R per second and which also fails one request in 100
//! (or 30) with a 429, a 503 or a 500 marked retryable, with the client's token bucket set to R.
//! The ceiling is R x 100 objects/s (full pages of 100).
//!
//! `cargo run --release -p revpilot-benches --bin sync_backfill [-- R]` (R defaults to 100,
//! Stripe's live-mode limit for reads).
//! Prints, per run: objects, seconds, objects/s, the ratio to the ceiling, requests, retries,
//! and whether the run succeeded; then the same backfill without injected faults as the in-run
//! baseline.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use revpilot_core::ports::{Period, SyncStatus};
use revpilot_core::testing::MemoryStore;
use revpilot_stripe::client::{Client, ClientConfig};
use revpilot_stripe::fake::{FakeStripe, Fault};
use revpilot_stripe::sync::{SyncJob, SyncPorts, Syncer};
use secrecy::SecretString;
use serde_json::{Value, json};

const T0: i64 = 1_700_000_000;
/// Objects of each kind are spread over three years before `T0`.
const SPAN: i64 = 95_000_000;

fn objects(prefix: &str, kind: &str, n: usize) -> Vec<Value> {
    let step = SPAN / n as i64;
    (0..n)
        .map(|i| (i, T0 - SPAN + i as i64 * step))
        .map(|(i, created)| match kind {
            "invoice" => json!({"id": format!("{prefix}_{i:07}"), "object": kind, "currency": "usd", "created": created,
                                "lines": {"object": "list", "has_more": false, "data": [
                                    {"id": format!("il_{i:07}"), "amount": 2900, "quantity": 1, "period": {"start": T0, "end": T0 + 2_592_000}}]}}),
            "charge" => json!({"id": format!("{prefix}_{i:07}"), "object": kind, "amount": 2900, "currency": "usd",
                               "created": created, "status": "succeeded", "refunds": {"object": "list", "has_more": false, "data": []}}),
            _ => json!({"id": format!("{prefix}_{i:07}"), "object": kind, "created": created, "currency": "usd", "status": "active"}),
        })
        .collect()
}

async fn run(rate: u32, faults: Option<u64>) -> (f64, u64, SyncStatus, u64, u64, u64) {
    let fake = FakeStripe::start(Some(rate)).await;
    fake.set("/v1/customers", objects("cus", "customer", 40_000));
    fake.set("/v1/subscriptions", objects("sub", "subscription", 30_000));
    fake.set("/v1/invoices", objects("in", "invoice", 15_000));
    fake.set("/v1/charges", objects("ch", "charge", 15_000));
    fake.set_object(
        "/v1/account",
        json!({"id": "acct_bench", "object": "account", "created": T0 - SPAN - 86_400}),
    );
    for path in ["/v1/prices", "/v1/products", "/v1/coupons", "/v1/events"] {
        fake.set(path, vec![]);
    }
    // One request in `every` fails (429, 503, or 500 with `Stripe-Should-Retry: true`, in turn).
    if let Some(every) = faults {
        fake.faults(move |n, _| {
            (n % every == 0).then(|| match (n / every) % 3 {
                0 => Fault {
                    status: 429,
                    should_retry: None,
                },
                1 => Fault {
                    status: 503,
                    should_retry: None,
                },
                _ => Fault {
                    status: 500,
                    should_retry: Some(true),
                },
            })
        });
    }
    let now = Utc::now();
    let (store, user, conn) = MemoryStore::with_connection("acct_bench", now).await;
    let store = Arc::new(store);
    let mut cfg = ClientConfig::new(SecretString::from("sk"))
        .with_api_base(&fake.uri())
        .unwrap();
    cfg.requests_per_second = NonZeroU32::new(rate).unwrap();
    let ports = SyncPorts::from_store(store.clone());
    let period = Period {
        start: now - chrono::TimeDelta::days(1),
        end: now + chrono::TimeDelta::days(30),
    };
    let job = SyncJob {
        user,
        connection: conn,
        stripe_account_id: "acct_bench".into(),
        usage: Some((period, None)),
    };
    let start = Instant::now();
    let (status, outcome) = Syncer::new(Client::new(cfg).unwrap(), ports)
        .run(&job, &|_| {})
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    let objects: u64 = outcome.objects.values().sum();
    let (_, refused) = fake.requests();
    (
        secs,
        objects,
        status,
        outcome.requests,
        outcome.retries,
        refused,
    )
}

#[tokio::main]
async fn main() {
    let rate: u32 = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(100);
    let ceiling = f64::from(rate) * 100.0;
    println!("rate limit R = {rate} requests/s; ceiling R x 100 = {ceiling} objects/s");
    println!(
        "{:<22} {:>8} {:>7} {:>10} {:>8} {:>9} {:>8} {:>12} status",
        "run", "objects", "secs", "objects/s", "of max", "requests", "retries", "429 by limit"
    );

    let mut worst: f64 = 1.0;
    let mut failed = 0;
    let runs = [
        ("1 in 100 fail", Some(100)),
        ("1 in 100 fail", Some(100)),
        ("1 in 100 fail", Some(100)),
        ("1 in 30 fail", Some(30)),
        ("baseline (no faults)", None),
    ];
    for (label, faults) in runs {
        // Let the server's and the client's buckets start full.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (secs, objects, status, requests, retries, refused) = run(rate, faults).await;
        let per_sec = objects as f64 / secs;
        let ratio = per_sec / ceiling;
        if faults.is_some() {
            worst = worst.min(ratio);
            failed += u32::from(status != SyncStatus::Succeeded);
        }
        println!(
            "{label:<22} {objects:>8} {secs:>7.2} {per_sec:>10.0} {:>7.1}% {requests:>9} {retries:>8} {refused:>12} {}",
            ratio * 100.0,
            status.as_str()
        );
    }
    println!(
        "worst run with faults: {:.1}% of the ceiling; failed syncs: {failed}",
        worst * 100.0
    );
}
