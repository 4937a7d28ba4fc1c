//! The embedding example, run as its reader would: connect a Stripe account (the token exchange
//! on wiremock, the account on the Stripe-shaped fake), sync it, read its MRR (the same numbers
//! as the engine on the account's export), and receive a billing webhook.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::ports::WebhookInbox;
use revpilot_core::{Currency, Rules};
use revpilot_embed::{Revpilot, router};
use revpilot_store::{KeyRing, SqliteStore};
use revpilot_stripe::billing::WebhookConfig;
use revpilot_stripe::client::{Client, ClientConfig};
use revpilot_stripe::connect::{Connect, ConnectConfig};
use revpilot_stripe::export::Export;
use revpilot_stripe::fake::FakeStripe;
use revpilot_stripe::jobs::Runner;
use revpilot_stripe::rebuild::rebuild;
use revpilot_stripe::synth::SynthExport;
use secrecy::SecretString;
use serde_json::{Value, json};
use tower::ServiceExt;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const USER: &str = "6f1c2b9e-8a4d-4c3b-9a7e-2d5f0e1b3c4a";
const HOOK: &str = "whsec_embed";

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let location = headers
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        location,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header("x-user", USER)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn an_app_of_its_own_connects_syncs_reads_mrr_and_takes_billing_webhooks() {
    let mut export = Vec::new();
    SynthExport {
        customers: 40,
        months: 12,
        seed: 7,
    }
    .write(&mut export)
    .unwrap();
    let objects: Value = serde_json::from_slice(&export).unwrap();
    let fake = FakeStripe::start(None).await;
    fake.set_object(
        "/v1/account",
        json!({"id": "acct_embed", "object": "account", "default_currency": "usd"}),
    );
    for kind in [
        "customers",
        "subscriptions",
        "invoices",
        "charges",
        "prices",
        "coupons",
    ] {
        let list = objects[kind].as_array().cloned().unwrap_or_default();
        fake.set(&format!("/v1/{kind}"), list);
    }
    fake.set("/v1/products", vec![]);
    fake.set("/v1/events", vec![]);
    let oauth = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "sk_token_embed", "stripe_user_id": "acct_embed",
            "scope": "read_only", "livemode": false, "token_type": "bearer"})))
        .mount(&oauth)
        .await;

    let dir = tempfile::TempDir::new().unwrap();
    let keys = KeyRing::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let db = dir.path().join("embed.db");
    let store = Arc::new(
        SqliteStore::connect(db.to_str().unwrap(), keys)
            .await
            .unwrap(),
    );
    let mut config = ConnectConfig::new("ca_embed", SecretString::from("sk_platform"));
    config.token_base = url::Url::parse(&oauth.uri()).unwrap();
    config.api_base = url::Url::parse(&fake.uri()).unwrap();
    let mut runner = Runner::new(store.clone(), "embed-test");
    runner.stripe_api_base = url::Url::parse(&fake.uri()).unwrap();
    let billing = ClientConfig::new(SecretString::from("sk_platform"))
        .with_api_base(&fake.uri())
        .unwrap();
    runner.billing = Some(Client::new(billing).unwrap());
    let app = router(Revpilot {
        connect: Connect::new(config, store.clone(), store.clone()).unwrap(),
        store: store.clone(),
        runner,
        billing_webhook: WebhookConfig::new(SecretString::from(HOOK), false),
    });

    // Without the app's own auth, nothing.
    let anonymous = Request::get("/connect").body(Body::empty()).unwrap();
    assert_eq!(call(&app, anonymous).await.0, StatusCode::UNAUTHORIZED);

    // Connect: off to Stripe, back with the state, synced before the answer.
    let (status, location, _) = call(&app, get("/connect")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = url::Url::parse(&location.unwrap()).unwrap();
    let (_, state) = location.query_pairs().find(|(k, _)| k == "state").unwrap();
    let (status, _, body) = call(
        &app,
        get(&format!("/connect/callback?code=ac_1&state={state}")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sync"], "Synced(\"succeeded\")", "{body}");
    let connection = body["connection"].as_str().unwrap().to_owned();

    // MRR: the engine's numbers on the account's own export.
    let uri = format!("/connections/{connection}/mrr?from=2023-01-01&to=2023-12-31");
    let (status, _, rows) = call(&app, get(&uri)).await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    let account = rebuild(&Export::from_json(&export).unwrap()).account;
    let expected = Engine::new(&account, Rules::default(), Currency::USD)
        .series(&SeriesRequest::new(
            chrono::NaiveDate::from_ymd_opt(2023, 1, 1).unwrap(),
            chrono::NaiveDate::from_ymd_opt(2023, 12, 31).unwrap(),
            Granularity::Month,
        ))
        .unwrap();
    assert_eq!(rows, serde_json::to_value(&expected.rows).unwrap());
    assert!(
        expected.rows.iter().any(|r| !r.mrr.is_zero()),
        "an account with revenue"
    );
    // Another user's connection is not found.
    let other = Request::get(&uri)
        .header("x-user", "00000000-0000-4000-8000-000000000001")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, other).await.0, StatusCode::NOT_FOUND);

    // Billing: a signed event is stored, then applied (no user has that customer: processed
    // without change); a forged one is refused and stores nothing.
    let event = json!({"id": "evt_embed", "object": "event", "type": "customer.subscription.updated",
        "created": 1_700_000_000, "livemode": false, "data": {"object": {"id": "sub_x",
        "object": "subscription", "customer": "cus_nobody", "status": "active", "created": 1_700_000_000,
        "items": {"data": []}}}})
    .to_string();
    let signed = |signature: String| {
        Request::post("/webhooks/billing")
            .header("stripe-signature", signature)
            .body(Body::from(event.clone()))
            .unwrap()
    };
    let forged = revpilot_stripe::webhook::signature_header(
        event.as_bytes(),
        "whsec_other",
        chrono::Utc::now().timestamp(),
    );
    assert_eq!(call(&app, signed(forged)).await.0, StatusCode::BAD_REQUEST);
    let header = revpilot_stripe::webhook::signature_header(
        event.as_bytes(),
        HOOK,
        chrono::Utc::now().timestamp(),
    );
    let (status, _, body) = call(&app, signed(header)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["event"], "evt_embed");
    assert!(
        body["applied"].as_str().unwrap().starts_with("Ok(Inbox"),
        "{body} {:?}",
        store.pending(10, 10).await
    );
    assert!(store.pending(10, 10).await.unwrap().is_empty(), "processed");
}

/// The binary serves your app's route and RevPilot's beside it, configured from the environment.
#[tokio::test]
async fn the_binary_serves_the_app_and_revpilot_beside_it() {
    let dir = tempfile::TempDir::new().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_revpilot-embed"))
        .env("DATABASE_URL", dir.path().join("bin.db"))
        .env(
            "REVPILOT_ENCRYPTION_KEY",
            "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .env("STRIPE_CLIENT_ID", "ca_embed")
        .env("STRIPE_SECRET_KEY", "sk_test_embed")
        .env("STRIPE_WEBHOOK_SECRET", HOOK)
        .env("BIND", format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..200 {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                stream.write_all(req.as_bytes()).await.unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).await.unwrap();
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the binary did not listen on port {port}");
    };
    let home = get("/").await;
    let connect = get("/revpilot/connect").await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        home.starts_with("HTTP/1.1 200") && home.ends_with("your app"),
        "{home}"
    );
    assert!(connect.starts_with("HTTP/1.1 401"), "{connect}");
}
