//! Billing webhook ingestion over loopback, measured from a second process: the server (this
//! program started again with `--serve`) verifies each `Stripe-Signature`, stores the event in
//! the SQLite inbox (a durable insert: unique event id, WAL) and answers 2xx; this process sends
//! N distinct signed events, C at a time, over HTTP/1.1 keep-alive connections.
//!
//! The in-run baseline is the same server and client with a route that reads the body and
//! answers the same JSON without verifying or storing: the ratio is what verification and the
//! durable insert cost against the HTTP round trip alone.
//!
//! `cargo run --release -p revpilot-benches --bin webhook_ingest [-- N C ROUNDS]`
//! (defaults 20,000 events, 32 in flight, 3 rounds). The target is 1,000 events/s.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::routing::post;
use futures::StreamExt;
use revpilot_benches::{median, spawn_server};
use revpilot_server::{AppState, Store, app};
use revpilot_store::{KeyRing, SqliteStore};
use revpilot_stripe::billing::WebhookConfig;
use revpilot_stripe::webhook::signature_header;
use secrecy::SecretString;
use serde_json::json;

const SECRET: &str = "whsec_bench";

async fn serve(db: &str) {
    let keys = KeyRing::parse("bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(db, keys).await.unwrap());
    let state = AppState::new(
        store,
        Some(WebhookConfig::new(SecretString::from(SECRET), false)),
    );
    let router =
        app(state).route(
            "/bench/noop",
            post(|body: Bytes| async move {
                axum::Json(json!({ "received": true, "bytes": body.len() }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    axum::serve(listener, router).await.unwrap();
}

fn events(n: usize, round: usize, now: i64) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let body = json!({
                "id": format!("evt_bench_{round}_{i:07}"), "object": "event",
                "type": "customer.subscription.updated", "created": now, "livemode": false,
                "api_version": "2025-03-31.basil",
                "data": {"object": {
                    "id": format!("sub_{i}"), "object": "subscription", "customer": format!("cus_{i}"),
                    "status": "active", "created": now,
                    "items": {"object": "list", "has_more": false, "data": [{
                        "id": format!("si_{i}"), "quantity": 1,
                        "current_period_start": now, "current_period_end": now + 2_592_000,
                        "price": {"id": "price_pro", "object": "price", "currency": "usd",
                                  "unit_amount": 2900, "recurring": {"interval": "month"}}}]}}}
            })
            .to_string();
            let sig = signature_header(body.as_bytes(), SECRET, now);
            (body, sig)
        })
        .collect()
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    events: &[(String, String)],
    concurrency: usize,
) -> f64 {
    let start = Instant::now();
    let ok = futures::stream::iter(events.iter().map(|(body, sig)| async move {
        let r = client
            .post(url)
            .header("stripe-signature", sig)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let _ = r.bytes().await.unwrap();
        status.is_success()
    }))
    .buffer_unordered(concurrency)
    .filter(|ok| futures::future::ready(*ok))
    .count()
    .await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ok, events.len(), "every event answered 2xx");
    events.len() as f64 / secs
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        serve(&args[2]).await;
        return;
    }
    let n: usize = args.get(1).map_or(20_000, |a| a.parse().unwrap());
    let concurrency: usize = args.get(2).map_or(32, |a| a.parse().unwrap());
    let rounds: usize = args.get(3).map_or(3, |a| a.parse().unwrap());

    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("ingest.db");
    let (server, base) = spawn_server(&[db.to_str().unwrap()]);

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    println!(
        "events {n}, in flight {concurrency}, rounds {rounds}; server pid {}",
        server.id()
    );
    // Warm-up: connections, the SQLite file, the page cache.
    let warm = events(1_000, 999, now);
    send(&client, &format!("{base}/bench/noop"), &warm, concurrency).await;
    send(
        &client,
        &format!("{base}/api/webhooks/stripe-billing"),
        &warm,
        concurrency,
    )
    .await;

    let (mut base_rates, mut ingest_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let batch = events(n, round, now);
        let b = send(&client, &format!("{base}/bench/noop"), &batch, concurrency).await;
        let i = send(
            &client,
            &format!("{base}/api/webhooks/stripe-billing"),
            &batch,
            concurrency,
        )
        .await;
        println!(
            "round {round}: baseline (HTTP only) {b:>8.0}/s   ingest (verify + inbox insert) {i:>8.0}/s   ratio {:.2}",
            i / b
        );
        base_rates.push(b);
        ingest_rates.push(i);
    }
    // Every event is in the inbox exactly once.
    drop(server);
    let keys = KeyRing::parse("bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let store = SqliteStore::connect(db.to_str().unwrap(), keys)
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_events")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored as usize, 1_000 + n * rounds);
    let (b, i) = (median(base_rates), median(ingest_rates));
    println!(
        "median: baseline {b:.0}/s, ingest {i:.0}/s, ratio {:.2}; target 1,000/s: {}",
        i / b,
        if i >= 1_000.0 { "met" } else { "NOT met" }
    );
}
