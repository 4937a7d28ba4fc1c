//! The customer journey against real processes: `revpilot-server` (and on PostgreSQL a separate
//! `revpilot-worker`), localstripe as Stripe, a small local fake of Connect OAuth's token
//! exchange (localstripe has none), fakellm as the model, and webhooks signed by the official
//! `stripe` Python SDK:
//!
//! sign up -> connect Stripe -> the first sync -> the dashboard shows the account's MRR within
//! 30 s -> insights (the model fails: the local narrative, not counted) -> checkout -> `checkout.session.completed` -> the
//! professional tier with its limits -> the subscription deleted -> back to starter.
//!
//! localstripe has no Checkout and no `GET /v1/account` either: a proxy in front of it answers
//! those two (recording Checkout's requests) and passes everything else through.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use revpilot_core::billing::Catalog;
use revpilot_core::ports::Tier;
use revpilot_stripe::fake::{LocalStripe, sdk_signature_header};
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const WEBHOOK_SECRET: &str = "whsec_journey";
const JWT_SECRET: &str = "journey-secret-journey-secret-journey-secret-0123";
const PROFESSIONAL_PRICE: &str = "price_professional";

mod common;

use common::{KEY, Processes, free_port, server_binary};

/// fakellm answering 429 to every request: the server must fall back to its local narrative.
fn fakellm(venv: &str, dir: &std::path::Path) -> (Child, String) {
    let yaml = "version: 1\ndefaults:\n  fallback: deterministic_echo\nrules:\n  - name: limited\n    when:\n      model_matches: \"revpilot-journey\"\n    respond:\n      status: 429\n      error: \"Rate limit exceeded (mock)\"\n";
    let config = dir.join("fakellm.yaml");
    std::fs::write(&config, yaml).unwrap();
    let port = free_port();
    let child = Command::new(format!("{venv}/bin/fakellm"))
        .args(["serve", "--port", &port.to_string(), "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fakellm is in the virtualenv");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "fakellm did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, format!("http://127.0.0.1:{port}/v1"))
}

/// The Checkout requests the proxy answered, each as its form fields.
type Checkouts = Arc<Mutex<Vec<Vec<(String, String)>>>>;

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    checkouts: Checkouts,
}

async fn checkout(State(p): State<Proxy>, body: Bytes) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let session = json!({
        "id": "cs_test_journey", "object": "checkout.session", "mode": "subscription",
        "url": "https://checkout.stripe.com/c/pay/cs_test_journey",
        "customer": get("customer"), "client_reference_id": get("client_reference_id"),
    });
    p.checkouts.lock().unwrap().push(form);
    axum::Json(session).into_response()
}

async fn forward(
    State(p): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let url = format!(
        "{}{}",
        p.upstream,
        uri.path_and_query().map(|x| x.as_str()).unwrap_or("/")
    );
    let mut req = p.http.request(method, url).body(body);
    for name in [
        "authorization",
        "content-type",
        "idempotency-key",
        "stripe-version",
    ] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    match req.send().await {
        Ok(res) => {
            let status = res.status();
            let body = res.bytes().await.unwrap_or_default();
            (status, [("content-type", "application/json")], body).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

async fn start_proxy(upstream: &str) -> (String, Checkouts) {
    let checkouts = Arc::new(Mutex::new(Vec::new()));
    let state = Proxy {
        upstream: upstream.to_owned(),
        http: reqwest::Client::new(),
        checkouts: checkouts.clone(),
    };
    let app = axum::Router::new()
        .route("/v1/checkout/sessions", axum::routing::post(checkout))
        .route(
            "/v1/account",
            axum::routing::get(|| async {
                axum::Json(json!({"id": "acct_acme", "object": "account",
                    "default_currency": "usd", "business_profile": {"name": "Acme"}}))
            }),
        )
        .fallback(forward)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, app).into_future());
    (format!("http://{addr}"), checkouts)
}

/// A form POST to localstripe (any key authenticates there).
async fn ls(http: &reqwest::Client, base: &str, path: &str, form: &[(&str, &str)]) -> Value {
    let res = http
        .post(format!("{base}{path}"))
        .bearer_auth("sk_test_journey")
        .form(form)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

/// A customer paying by card, subscribed to `plan`.
async fn subscribe(http: &reqwest::Client, base: &str, customer: &str, plan: &str) -> String {
    ls(
        http,
        base,
        &format!("/v1/customers/{customer}/sources"),
        &[
            ("source[object]", "card"),
            ("source[number]", "4242424242424242"),
            ("source[exp_month]", "12"),
            ("source[exp_year]", "2030"),
            ("source[cvc]", "123"),
        ],
    )
    .await;
    let sub = ls(
        http,
        base,
        "/v1/subscriptions",
        &[("customer", customer), ("items[0][plan]", plan)],
    )
    .await;
    sub["id"].as_str().unwrap().to_owned()
}

/// A webhook event signed by the official SDK, posted to the server.
async fn webhook(http: &reqwest::Client, server: &str, venv: &str, event: Value) {
    let payload = event.to_string();
    let header = sdk_signature_header(
        venv,
        &payload,
        WEBHOOK_SECRET,
        chrono::Utc::now().timestamp(),
    );
    let res = http
        .post(format!("{server}/api/webhooks/stripe-billing"))
        .header("stripe-signature", header)
        .header("content-type", "application/json")
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

async fn journey(database_url: String, separate_worker: bool) {
    let Ok(venv) = std::env::var("REVPILOT_TEST_VENV") else {
        eprintln!("skipped: REVPILOT_TEST_VENV is not set (scripts/test creates and sets it)");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let localstripe = LocalStripe::start().unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // The connected account's business, in localstripe: one customer at $50 a month.
    let product = ls(
        &http,
        &localstripe.base,
        "/v1/products",
        &[("name", "Acme"), ("type", "service")],
    )
    .await;
    let product = product["id"].as_str().unwrap().to_owned();
    for (id, amount) in [("price_acme", "5000"), (PROFESSIONAL_PRICE, "2900")] {
        ls(
            &http,
            &localstripe.base,
            "/v1/plans",
            &[
                ("id", id),
                ("amount", amount),
                ("currency", "usd"),
                ("interval", "month"),
                ("product", &product),
            ],
        )
        .await;
    }
    let acme_customer = ls(
        &http,
        &localstripe.base,
        "/v1/customers",
        &[("email", "buyer@acme.example")],
    )
    .await;
    subscribe(
        &http,
        &localstripe.base,
        acme_customer["id"].as_str().unwrap(),
        "price_acme",
    )
    .await;

    let (stripe_base, checkouts) = start_proxy(&localstripe.base).await;
    // Connect OAuth's token exchange.
    let oauth = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "sk_test_connected_acme", "refresh_token": "rt_acme",
            "stripe_user_id": "acct_acme", "scope": "read_only", "livemode": false,
            "token_type": "bearer"})))
        .mount(&oauth)
        .await;
    let (llm, llm_base) = fakellm(&venv, dir.path());
    let mut children = Processes(vec![llm]);

    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let queue = format!("journey-{}", Uuid::new_v4().simple());
    let env = |c: &mut Command| {
        c.env("DATABASE_URL", &database_url)
            .env("REVPILOT_ENCRYPTION_KEY", KEY)
            .env("STRIPE_SECRET_KEY", "sk_test_journey")
            .env("STRIPE_API_BASE", &stripe_base)
            .env("STRIPE_PROFESSIONAL_PRICE_ID", PROFESSIONAL_PRICE)
            .env("REVPILOT_QUEUE", &queue)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
    };
    let mut s = Command::new(server_binary());
    env(&mut s);
    s.args(["--bind", &format!("127.0.0.1:{port}")])
        .arg(if separate_worker {
            "--without-worker"
        } else {
            "--with-worker"
        })
        .env("JWT_SECRET", JWT_SECRET)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("STRIPE_CLIENT_ID", "ca_journey")
        .env("STRIPE_OAUTH_BASE", oauth.uri())
        .env("REVPILOT_APP_URL", format!("{server}/"))
        .env("LLM_BASE_URL", &llm_base)
        .env("LLM_MODEL", "revpilot-journey")
        .env("LLM_API_KEY", "sk-fake");
    children.0.push(s.spawn().unwrap());
    if separate_worker {
        let mut w = Command::new(env!("CARGO_BIN_EXE_revpilot-worker"));
        env(&mut w);
        w.env("REVPILOT_WORKER_NAME", "journey-worker");
        children.0.push(w.spawn().unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{server}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let began = Instant::now();
    let step = |name: &str| eprintln!("journey: {name} at {:.1} s", began.elapsed().as_secs_f64());
    // Sign up.
    let res = http
        .post(format!("{server}/api/auth/signup"))
        .json(&json!({"email": "founder@journey.example", "password": "a long enough password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    let api = |m: Method, p: &str| {
        http.request(m, format!("{server}{p}"))
            .bearer_auth(&token)
            .header("cookie", format!("revpilot_session={token}"))
    };
    let usage = || async {
        let res = api(Method::GET, "/api/usage/current").send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()
    };
    assert_eq!(usage().await["tier"], "starter");

    step("connect");
    // Connect: the redirect to Stripe with a state, then Stripe's callback.
    let res = api(Method::GET, "/api/stripe/connect")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    let to = url::Url::parse(res.headers()["location"].to_str().unwrap()).unwrap();
    let state = to
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let connected_at = Instant::now();
    let res = api(
        Method::GET,
        &format!("/api/stripe/connect/callback?code=ac_journey&state={state}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 303);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let connection = location
        .strip_prefix("/dashboard?connected=")
        .unwrap()
        .to_owned();

    // The first sync runs in the worker; the dashboard shows the account's MRR within 30 s.
    let expected = "50.00 USD";
    loop {
        let html = api(Method::GET, "/dashboard")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if html.contains(expected) {
            eprintln!(
                "the dashboard showed {expected} {:.1} s after connecting",
                connected_at.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            connected_at.elapsed() < Duration::from_secs(30),
            "no MRR of {expected} on the dashboard 30 s after connecting"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics: Value = api(
        Method::GET,
        &format!("/api/metrics?connectionId={connection}"),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let rows = metrics["rows"].as_array().unwrap();
    let mrr: rust_decimal::Decimal = rows.last().unwrap()["mrr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        mrr,
        rust_decimal::Decimal::new(50, 0),
        "{}",
        rows.last().unwrap()
    );

    step("insights");
    // Insights: the model answers 429, the local narrative stands in; it is not metered (the
    // user did not get the model's answer: docs/insights.md, "Metering").
    let res = api(
        Method::POST,
        &format!("/api/insights?connectionId={connection}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let insights: Value = res.json().await.unwrap();
    assert!(
        insights["fallback"].as_str().unwrap().contains("429"),
        "{insights}"
    );
    assert_eq!(insights["insights"].as_array().unwrap().len(), 5);
    let u = usage().await;
    assert_eq!(u["ai_insight"]["used"], 0, "{u}");

    step("checkout");
    // Checkout for professional: a customer is made for the user, the session's URL returned.
    let res = api(Method::POST, "/api/create-checkout")
        .json(&json!({"tier": "professional"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let session: Value = res.json().await.unwrap();
    assert_eq!(
        session["url"],
        "https://checkout.stripe.com/c/pay/cs_test_journey"
    );
    let form = checkouts.lock().unwrap().last().unwrap().clone();
    let field = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(field("line_items[0][price]"), PROFESSIONAL_PRICE);
    let customer = field("customer");
    let user = field("client_reference_id");

    step("checkout.session.completed");
    // The customer pays: Stripe makes the subscription and sends checkout.session.completed.
    let subscription = subscribe(&http, &localstripe.base, &customer, PROFESSIONAL_PRICE).await;
    webhook(
        &http,
        &server,
        &venv,
        json!({"id": "evt_checkout_journey", "object": "event", "type": "checkout.session.completed",
               "created": chrono::Utc::now().timestamp(), "livemode": false,
               "data": {"object": {"id": "cs_test_journey", "object": "checkout.session",
                 "mode": "subscription", "payment_status": "paid", "status": "complete",
                 "customer": customer, "subscription": subscription,
                 "client_reference_id": user}}}),
    )
    .await;
    let professional = Catalog::default().plan(Tier::Professional).limits;
    // Applied at once: the server queues an inbox job for the event and an idle worker looks
    // for jobs every 250 ms (10 s is room for a loaded machine; a worker that only looked at
    // its 30 s heartbeat took 27 s here).
    let wait_for = |tier: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let u = usage().await;
            if u["tier"] == tier {
                return u;
            }
            assert!(Instant::now() < deadline, "not {tier}: {u}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let u = wait_for("professional").await;
    assert_eq!(
        u["ai_insight"]["limit"],
        json!(professional.ai_insights),
        "{u}"
    );
    assert_eq!(
        u["transaction_volume"]["limit"],
        json!(professional.transaction_volume),
        "{u}"
    );

    step("subscription deleted");
    // The subscription is canceled: customer.subscription.deleted brings the user back to
    // starter.
    let res = http
        .delete(format!(
            "{}/v1/subscriptions/{subscription}",
            localstripe.base
        ))
        .bearer_auth("sk_test_journey")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    let canceled: Value = res.json().await.unwrap();
    webhook(
        &http,
        &server,
        &venv,
        json!({"id": "evt_deleted_journey", "object": "event",
               "type": "customer.subscription.deleted",
               "created": chrono::Utc::now().timestamp() + 1, "livemode": false,
               "data": {"object": canceled}}),
    )
    .await;
    let u = wait_for("starter").await;
    assert_eq!(
        u["ai_insight"]["limit"],
        json!(Catalog::default().plan(Tier::Starter).limits.ai_insights),
        "{u}"
    );
    step("back to starter");
    drop(children);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_customer_journey_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("journey.db").display());
    journey(url, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_customer_journey_on_postgres_with_a_separate_worker() {
    let Ok(url) = std::env::var("REVPILOT_TEST_POSTGRES_URL") else {
        eprintln!("skipped on PostgreSQL: REVPILOT_TEST_POSTGRES_URL is not set");
        return;
    };
    // The store in its own schema; the queue's (`apalis`) set up first on a plain pool.
    let plain = sqlx::PgPool::connect(&url).await.unwrap();
    revpilot_worker::Queue::postgres(&plain, "journey-setup")
        .await
        .unwrap();
    let schema = format!("j_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&plain)
        .await
        .unwrap();
    journey(
        format!("{url}?options=-c%20search_path%3D{schema}%2Cpublic"),
        true,
    )
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&plain)
        .await
        .unwrap();
}
