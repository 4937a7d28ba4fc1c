//! `GET /api/metrics` for a 90-day range over loopback, measured from a second process: the
//! server (this program started again with `--serve`) is the example server on SQLite with the
//! demo's synthetic account; this process logs in, finds the connection, then:
//!
//! 1. **Throughput**, closed loop: N requests, C in flight over keep-alive connections, against
//!    a trivial route of the same server (`GET /bench/trivial`, answering `ok`: the in-run
//!    baseline) and against `/api/metrics` (session check, owner check in the database, the
//!    account's series, the JSON). A third route answers as many constant bytes as the metrics
//!    response has (`GET /bench/static`): what the payload alone costs. Each round runs the three
//!    back to back; the ratio reported is the median of the rounds' ratios (the machine's speed
//!    drifts between rounds, less within one).
//! 2. **Latency at a fixed rate**, open loop: R requests/s for S seconds, each sent at its
//!    scheduled instant whatever the previous ones did; latency is counted from that instant (no
//!    coordinated omission). Reports p50, p99 and max.
//!
//! `cargo run --release -p revpilot-benches --bin metrics_api [-- N C ROUNDS RATE SECONDS CUSTOMERS]`
//! (defaults 20,000 requests, 32 in flight, 3 rounds, 1,000/s for 10 s, 600 customers).
//! Targets: ratio at least 0.5; p99 under 20 ms at 1,000/s.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use futures::StreamExt;
use revpilot_benches::{median, spawn_server};
use revpilot_server::auth::Jwt;
use revpilot_server::{AppState, Store, app};
use revpilot_store::{KeyRing, SqliteStore};
use secrecy::SecretString;
use serde_json::{Value, json};

const PASSWORD: &str = "bench password";

async fn serve(db: &str, customers: usize, payload: usize) {
    let keys = KeyRing::parse("bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(db, keys).await.unwrap());
    let mut state = AppState::new(store, None);
    state.sessions.jwt = Some(Arc::new(
        Jwt::new(
            SecretString::from("a-bench-jwt-secret-of-32-bytes-or-more"),
            None,
        )
        .unwrap(),
    ));
    revpilot_server::demo::seed(&mut state, customers, PASSWORD)
        .await
        .unwrap();
    let constant = axum::body::Bytes::from(vec![b' '; payload]);
    let router = app(state)
        .route("/bench/trivial", get(|| async { "ok" }))
        .route("/bench/static", get(move || async move { constant }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    axum::serve(listener, router).await.unwrap();
}

async fn get_ok(client: &reqwest::Client, url: &str, token: &str) -> usize {
    let r = client.get(url).bearer_auth(token).send().await.unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.bytes().await.unwrap().len()
}

/// Requests per second, `n` requests `concurrency` at a time.
async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    n: usize,
    concurrency: usize,
) -> f64 {
    let start = Instant::now();
    let done = futures::stream::iter((0..n).map(|_| get_ok(client, url, token)))
        .buffer_unordered(concurrency)
        .count()
        .await;
    assert_eq!(done, n);
    n as f64 / start.elapsed().as_secs_f64()
}

/// Latencies (ms, sorted) of `rate`/s for `seconds`, each from its scheduled instant.
async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    rate: u32,
    seconds: u32,
) -> Vec<f64> {
    let total = rate * seconds;
    let gap = Duration::from_secs(1) / rate;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + gap * i;
        tokio::time::sleep_until(at).await;
        let (client, url, token) = (client.clone(), url.to_owned(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            get_ok(&client, &url, &token).await;
            at.elapsed().as_secs_f64() * 1_000.0
        }));
    }
    let mut ms = Vec::with_capacity(tasks.len());
    for t in tasks {
        ms.push(t.await.unwrap());
    }
    ms.sort_by(f64::total_cmp);
    ms
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        serve(&args[2], args[3].parse().unwrap(), args[4].parse().unwrap()).await;
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().unwrap());
    let (n, concurrency, rounds) = (arg(1, 20_000), arg(2, 32), arg(3, 3));
    let (rate, seconds, customers) = (arg(4, 1_000) as u32, arg(5, 10) as u32, arg(6, 600));

    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("metrics.db");
    // The payload size is known once the server answers; a first server tells it.
    let payload = {
        let probe = dir.path().join("probe.db");
        let (_probe, base) = spawn_server(&[probe.to_str().unwrap(), &customers.to_string(), "0"]);
        metrics_size(&base).await
    };
    let (server, base) = spawn_server(&[
        db.to_str().unwrap(),
        &customers.to_string(),
        &payload.to_string(),
    ]);

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(256))
        .build()
        .unwrap();
    let (token, metrics) = login(&client, &base).await;
    let trivial = format!("{base}/bench/trivial");
    let constant = format!("{base}/bench/static");
    let bytes = get_ok(&client, &metrics, &token).await;
    println!(
        "{customers} customers; 90 days = {bytes} bytes of JSON per response; {n} requests x {rounds} rounds, {concurrency} in flight; server pid {}",
        server.id()
    );
    // Warm-up: connections, caches, the page cache.
    for url in [&trivial, &constant, &metrics] {
        closed_loop(&client, url, &token, 2_000, concurrency).await;
    }

    let (mut ratios, mut payload_ratios) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let b = closed_loop(&client, &trivial, &token, n, concurrency).await;
        let s = closed_loop(&client, &constant, &token, n, concurrency).await;
        let m = closed_loop(&client, &metrics, &token, n, concurrency).await;
        println!(
            "round {round}: trivial {b:>7.0}/s   {payload} constant bytes {s:>7.0}/s   /api/metrics (90 days) {m:>7.0}/s   ratio {:.2} (to the constant bytes {:.2})",
            m / b,
            m / s
        );
        ratios.push(m / b);
        payload_ratios.push(m / s);
    }
    let ratio = median(ratios);
    println!(
        "median ratio /api/metrics : trivial route {ratio:.2} (target 0.50: {}); /api/metrics : same bytes constant {:.2}",
        if ratio >= 0.5 { "met" } else { "NOT met" },
        median(payload_ratios)
    );

    let ms = open_loop(&client, &metrics, &token, rate, seconds).await;
    let p99 = pct(&ms, 0.99);
    println!(
        "open loop {rate}/s for {seconds} s ({} requests): p50 {:.2} ms, p99 {p99:.2} ms, max {:.2} ms; target p99 < 20 ms: {}",
        ms.len(),
        pct(&ms, 0.50),
        pct(&ms, 1.0),
        if p99 < 20.0 { "met" } else { "NOT met" }
    );
    drop(server);
}

/// The size of a 90-day metrics response from the server at `base`.
async fn metrics_size(base: &str) -> usize {
    let client = reqwest::Client::new();
    let (token, metrics) = login(&client, base).await;
    get_ok(&client, &metrics, &token).await
}

/// A session of the demo user and the URL of its connection's 90-day metrics.
async fn login(client: &reqwest::Client, base: &str) -> (String, String) {
    let json = |r: reqwest::RequestBuilder| async move {
        r.send().await.unwrap().json::<Value>().await.unwrap()
    };
    let session = json(
        client
            .post(format!("{base}/api/auth/login"))
            .json(&json!({"email": revpilot_server::demo::DEMO_EMAIL, "password": PASSWORD})),
    )
    .await;
    let token = session["token"].as_str().unwrap().to_owned();
    let list = json(
        client
            .get(format!("{base}/api/connections"))
            .bearer_auth(&token),
    )
    .await;
    let connection = list["connections"][0]["id"].as_str().unwrap().to_owned();
    let today = chrono::Utc::now().date_naive();
    let from = today - chrono::Duration::days(89);
    let metrics = format!("{base}/api/metrics?connectionId={connection}&from={from}&to={today}");
    (token, metrics)
}
