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
//!
//! `cargo run --release -p revpilot-benches --bin sync_backfill -- unlimited [CUSTOMERS]`: the
//! sync's own speed. A `revpilot synth` account of CUSTOMERS customers over 24 months (default
//! 20,000) served by the fake without a rate limit (the client's bucket as wide open), synced
//! into a SQLite file as the example programs do, then (with `REVPILOT_BENCH_POSTGRES_URL`) into
//! a throwaway schema of that PostgreSQL database, then into memory (the store's share). Prints
//! objects per second, requests per second, the process's CPU use (the fake serves from the same
//! process) and the machine's (with the database's processes), over the whole run and the
//! machine's in each fifth of it: the backfill should keep both cores busy until its last page.
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

/// A client of the fake whose own bucket lets `rate` requests a second through.
fn client(fake: &FakeStripe, rate: u32) -> Client {
    let mut cfg = ClientConfig::new(SecretString::from("sk"))
        .with_api_base(&fake.uri())
        .unwrap();
    cfg.requests_per_second = NonZeroU32::new(rate).unwrap();
    Client::new(cfg).unwrap()
}

/// A full backfill of the connection, charges counted as usage in the current period.
fn backfill(
    user: revpilot_core::ports::UserId,
    conn: revpilot_core::ports::ConnectionId,
) -> SyncJob {
    let now = Utc::now();
    SyncJob {
        user,
        connection: conn,
        stripe_account_id: "acct_bench".into(),
        usage: Some((
            Period {
                start: now - chrono::TimeDelta::days(1),
                end: now + chrono::TimeDelta::days(30),
            },
            None,
        )),
    }
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
    let (store, user, conn) = MemoryStore::with_connection("acct_bench", Utc::now()).await;
    let ports = SyncPorts::from_store(Arc::new(store));
    let job = backfill(user, conn);
    let start = Instant::now();
    let (status, outcome) = Syncer::new(client(&fake, rate), ports)
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

/// CPU seconds this process has used (user and system, from `/proc/self/stat`).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // Linux reports them in USER_HZ, 100 on every architecture it runs on here.
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / 100.0
}

/// Seconds all cores of the machine spent on anything but idling and waiting for the disk
/// (`/proc/stat`): with PostgreSQL much of a sync's work runs in the database's own processes.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let all: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (all - idle) / 100.0
}

/// The synth account's objects by list path, each in Stripe's order source (oldest first).
fn synth_lists(customers: usize) -> Vec<(String, Vec<Value>)> {
    let mut export = Vec::new();
    revpilot_stripe::synth::SynthExport {
        customers,
        months: 24,
        seed: 1,
    }
    .write(&mut export)
    .unwrap();
    let mut all: serde_json::Map<String, Value> = serde_json::from_slice(&export).unwrap();
    [
        "customers",
        "subscriptions",
        "invoices",
        "charges",
        "prices",
        "coupons",
    ]
    .into_iter()
    .map(|kind| {
        let mut list = match all.remove(kind) {
            Some(Value::Array(list)) => list,
            _ => Vec::new(),
        };
        list.sort_by_key(|v| v["created"].as_i64().unwrap_or(0));
        (format!("/v1/{kind}"), list)
    })
    .collect()
}

/// One unlimited backfill into `ports`; prints its line.
async fn unlimited_run(
    label: &str,
    fake: &FakeStripe,
    ports: SyncPorts,
    user: revpilot_core::ports::UserId,
    conn: revpilot_core::ports::ConnectionId,
) {
    let job = backfill(user, conn);
    // CPU use sampled every 100 ms while the sync runs.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples = vec![(0.0, cpu_seconds(), machine_busy_seconds())];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let t = start.elapsed().as_secs_f64();
                samples.push((t, cpu_seconds(), machine_busy_seconds()));
            }
            samples
        })
    };
    let start = Instant::now();
    let (status, outcome) = Syncer::new(client(fake, 100_000), ports)
        .run(&job, &|_| {})
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let last = *samples.last().unwrap();
    let end = last.0;
    // The share of all cores busy between two moments: by this process (`machine` false) or
    // by anything on the machine.
    let busy = |from: f64, to: f64, machine: bool| {
        let at = |t: f64| samples.iter().find(|s| s.0 >= t).copied().unwrap_or(last);
        let (a, b) = (at(from), at(to));
        let used = if machine { b.2 - a.2 } else { b.1 - a.1 };
        if b.0 > a.0 {
            used / (b.0 - a.0) / cores * 100.0
        } else {
            0.0
        }
    };
    let fifths: Vec<String> = (0..5)
        .map(|i| {
            let (from, to) = (end * f64::from(i) / 5.0, end * f64::from(i + 1) / 5.0);
            format!("{:>4.0}%", busy(from, to, true))
        })
        .collect();
    let objects: u64 = outcome.objects.values().sum();
    println!(
        "{label:<10} {objects:>9} {secs:>7.2} {:>10.0} {:>10.0} {:>8.0}% {:>8.0}%   {}   {}",
        objects as f64 / secs,
        outcome.requests as f64 / secs,
        busy(0.0, end, false),
        busy(0.0, end, true),
        fifths.join(" "),
        status.as_str()
    );
    if let Some(error) = outcome.error {
        println!("         {error}");
    }
}

/// The sync's own speed: a synth account from a fake without a rate limit.
async fn unlimited(customers: usize) {
    let fake = FakeStripe::start(None).await;
    let lists = synth_lists(customers);
    let total: usize = lists.iter().map(|(_, l)| l.len()).sum();
    for (path, list) in lists {
        fake.set(&path, list);
    }
    fake.set_object(
        "/v1/account",
        json!({"id": "acct_bench", "object": "account", "created": 1_640_000_000, "default_currency": "usd"}),
    );
    for path in ["/v1/products", "/v1/disputes", "/v1/refunds", "/v1/events"] {
        fake.set(path, vec![]);
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "synth account of {customers} customers over 24 months: {total} listed objects; no rate limit; {cores} cores"
    );
    println!(
        "{:<10} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9}   {:<29}   status",
        "store",
        "objects",
        "secs",
        "objects/s",
        "requests/s",
        "CPU",
        "machine",
        "machine, each fifth of the run"
    );

    let dir = tempfile::TempDir::new().unwrap();
    let keys = revpilot_store::KeyRing::parse("bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        .unwrap();
    let db = dir.path().join("sync.db");
    let sqlite = Arc::new(
        revpilot_store::SqliteStore::connect(db.to_str().unwrap(), keys.clone())
            .await
            .unwrap(),
    );
    let (user, conn) = revpilot_benches::bench_connection(sqlite.as_ref()).await;
    unlimited_run("SQLite", &fake, SyncPorts::from_store(sqlite), user, conn).await;

    if let Ok(url) = std::env::var("REVPILOT_BENCH_POSTGRES_URL") {
        let schema = format!("bench_sync_{}", std::process::id());
        let admin = sqlx::PgPool::connect(&url).await.unwrap();
        // The job queue's extensions stay in `public` (see `account_load`).
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        let pg = Arc::new(
            revpilot_store::PgStore::connect_in_schema(&url, Some(&schema), keys)
                .await
                .unwrap(),
        );
        let (user, conn) = revpilot_benches::bench_connection(pg.as_ref()).await;
        unlimited_run("PostgreSQL", &fake, SyncPorts::from_store(pg), user, conn).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&admin)
            .await
            .unwrap();
    }

    let (memory, user, conn) = MemoryStore::with_connection("acct_bench", Utc::now()).await;
    unlimited_run(
        "memory",
        &fake,
        SyncPorts::from_store(Arc::new(memory)),
        user,
        conn,
    )
    .await;
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("unlimited") {
        let customers = args.next().and_then(|c| c.parse().ok()).unwrap_or(20_000);
        unlimited(customers).await;
        return;
    }
    let rate: u32 = first.and_then(|r| r.parse().ok()).unwrap_or(100);
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
