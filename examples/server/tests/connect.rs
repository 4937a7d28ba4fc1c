//! Connecting a Stripe account through the server: the redirect, the callback (OAuth token
//! exchange on wiremock, the account and its data on the fake Stripe), the first sync started at
//! once, one sync at a time, and deauthorization through the Connect webhook.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use revpilot_core::ports::{ConnectionStore, ObjectCache, ObjectKind, SyncStateStore, UserId};
use revpilot_server::auth::Jwt;
use revpilot_server::{AppState, app};
use revpilot_store::{KeyRing, SqliteStore};
use revpilot_stripe::connect::{Connect, ConnectConfig};
use revpilot_stripe::fake::FakeStripe;
use revpilot_stripe::webhook::signature_header;
use secrecy::SecretString;
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const JWT: &str = "a-test-jwt-secret-of-at-least-32-bytes!";
const HOOK: &str = "whsec_connect_tests";

async fn send(router: &axum::Router, req: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        location,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn get(uri: &str, cookie: &str) -> Request<Body> {
    Request::get(uri)
        .header("cookie", format!("theme=dark; revpilot_session={cookie}"))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn connect_stores_the_account_syncs_it_at_once_and_deauthorization_ends_it() {
    // Stripe: the token exchange on wiremock, the API (account and data) on the fake.
    let oauth = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "sk_token_acct_1", "refresh_token": "rt_1",
            "stripe_user_id": "acct_1", "scope": "read_only", "livemode": false,
            "token_type": "bearer"})))
        .mount(&oauth)
        .await;
    let fake = FakeStripe::start(None).await;
    fake.set_object(
        "/v1/account",
        json!({"id": "acct_1", "object": "account", "default_currency": "usd",
               "business_profile": {"name": "Acme"}}),
    );
    fake.set(
        "/v1/customers",
        (0..3)
            .map(|i| json!({"id": format!("cus_{i}"), "object": "customer", "created": 1_700_000_000 + i}))
            .collect(),
    );
    for list in [
        "/v1/subscriptions",
        "/v1/invoices",
        "/v1/charges",
        "/v1/prices",
        "/v1/products",
        "/v1/coupons",
        "/v1/events",
    ] {
        fake.set(list, vec![]);
    }

    let dir = TempDir::new().unwrap();
    let keys = KeyRing::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let store = Arc::new(
        SqliteStore::connect(dir.path().join("c.db").to_str().unwrap(), keys)
            .await
            .unwrap(),
    );
    let mut config = ConnectConfig::new("ca_platform", SecretString::from("sk_platform"));
    config.token_base = url::Url::parse(&oauth.uri()).unwrap();
    config.api_base = url::Url::parse(&fake.uri()).unwrap();
    let jwt = Jwt::new(SecretString::from(JWT), None).unwrap();
    let mut state = AppState::new(store.clone(), None);
    state.sessions.jwt = Some(Arc::new(jwt.clone()));
    state.app.connect = Some(Arc::new(
        Connect::new(config, store.clone(), store.clone()).unwrap(),
    ));
    state.app.stripe_api_base = url::Url::parse(&fake.uri()).unwrap();
    state.app.connect_webhook_secrets = Some(vec![SecretString::from(HOOK)]);
    let router = app(state.clone());

    let user = UserId(Uuid::new_v4());
    let session = jwt
        .issue(user, None, chrono::Utc::now().timestamp() + 600)
        .unwrap();
    let (status, location, _) = send(&router, get("/api/stripe/connect", &session)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = url::Url::parse(&location.unwrap()).unwrap();
    assert_eq!(location.path(), "/oauth/authorize");
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], "ca_platform");
    let stripe_state = q["state"].clone();

    // Another user cannot use this state; a forged one is refused; nothing is stored.
    let other = jwt
        .issue(
            UserId(Uuid::new_v4()),
            None,
            chrono::Utc::now().timestamp() + 600,
        )
        .unwrap();
    let (status, _, body) = send(
        &router,
        get(
            &format!("/api/stripe/connect/callback?code=ac_1&state={stripe_state}"),
            &other,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_state");
    assert!(store.connections(user).await.unwrap().is_empty());

    // The right user's callback, with the same state (the other user's attempt did not consume
    // it): stored, redirected, synced at once.
    let (status, to, body) = send(
        &router,
        get(
            &format!("/api/stripe/connect/callback?code=ac_1&state={stripe_state}"),
            &session,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let connections = store.connections(user).await.unwrap();
    assert_eq!(connections.len(), 1);
    let conn = connections[0].clone();
    assert_eq!(to.unwrap(), format!("/dashboard?connected={}", conn.id));
    assert_eq!(conn.business_name.as_deref(), Some("Acme"));

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = store.last_run(user, conn.id).await.unwrap();
        if let Some(run) = run.filter(|r| r.finished_at.is_some()) {
            assert_eq!(run.status.as_str(), "succeeded", "{:?}", run.outcome);
            break;
        }
        assert!(Instant::now() < deadline, "the first sync did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        store
            .objects(user, conn.id, ObjectKind::Customer)
            .await
            .unwrap()
            .len(),
        3
    );
    // The cron: refused without the secret (and when none is configured), then syncs every
    // active connection.
    let cron = |secret: Option<&str>| {
        let mut r = Request::post("/api/stripe/sync");
        if let Some(s) = secret {
            r = r.header("authorization", format!("Bearer {s}"));
        }
        r.body(Body::empty()).unwrap()
    };
    assert_eq!(
        send(&router, cron(Some(""))).await.0,
        StatusCode::UNAUTHORIZED,
        "no secret configured"
    );
    let mut with_cron = state.clone();
    with_cron.app.cron_secret = Some(SecretString::from("cron-secret-1"));
    let cron_router = app(with_cron);
    for wrong in [
        None,
        Some(""),
        Some("cron-secret-2"),
        Some("cron-secret-1x"),
    ] {
        assert_eq!(
            send(&cron_router, cron(wrong)).await.0,
            StatusCode::UNAUTHORIZED,
            "{wrong:?}"
        );
    }
    let first = store.last_run(user, conn.id).await.unwrap().unwrap();
    let (status, _, body) = send(&cron_router, cron(Some("cron-secret-1"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queued"], 1, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = store.last_run(user, conn.id).await.unwrap().unwrap();
        if run.id != first.id && run.finished_at.is_some() {
            assert_eq!(run.status.as_str(), "succeeded", "{:?}", run.outcome);
            break;
        }
        assert!(Instant::now() < deadline, "the cron's sync did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Deauthorization: signed by the Connect endpoint's secret, the connection goes inactive.
    let event = json!({"id": "evt_deauth", "object": "event", "type": "account.application.deauthorized",
                       "created": chrono::Utc::now().timestamp(), "livemode": false, "account": "acct_1",
                       "data": {"object": {"id": "ca_platform", "object": "application"}}})
    .to_string();
    let forged = Request::post("/api/webhooks/stripe-connect")
        .header(
            "stripe-signature",
            signature_header(
                event.as_bytes(),
                "whsec_other",
                chrono::Utc::now().timestamp(),
            ),
        )
        .body(Body::from(event.clone()))
        .unwrap();
    assert_eq!(send(&router, forged).await.0, StatusCode::BAD_REQUEST);
    assert!(
        store
            .connection(user, conn.id)
            .await
            .unwrap()
            .unwrap()
            .is_active
    );
    let signed = Request::post("/api/webhooks/stripe-connect")
        .header(
            "stripe-signature",
            signature_header(event.as_bytes(), HOOK, chrono::Utc::now().timestamp()),
        )
        .body(Body::from(event))
        .unwrap();
    assert_eq!(send(&router, signed).await.0, StatusCode::OK);
    assert!(
        !store
            .connection(user, conn.id)
            .await
            .unwrap()
            .unwrap()
            .is_active
    );
    assert!(
        store.tokens(user, conn.id).await.unwrap().is_none(),
        "tokens erased"
    );
}
