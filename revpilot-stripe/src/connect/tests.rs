//! Connect OAuth against wiremock (Stripe's token endpoint and account) and the in-memory store.

use revpilot_core::ports::{Limits, Tier, UserStore};
use revpilot_core::testing::MemoryStore;
use uuid::Uuid;
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;

struct Env {
    server: MockServer,
    store: Arc<MemoryStore>,
    connect: Connect,
}

async fn env(ttl: Duration) -> Env {
    let server = MockServer::start().await;
    let store = Arc::new(MemoryStore::new());
    let mut cfg = ConnectConfig::new("ca_platform", SecretString::from("sk_platform"));
    let base = Url::parse(&server.uri()).unwrap();
    cfg.connect_base = Url::parse("https://connect.example.test").unwrap();
    cfg.token_base = base.clone();
    cfg.api_base = base;
    cfg.redirect_uri = Some("https://app.example.test/api/stripe/callback".into());
    cfg.state_ttl = ttl;
    let connect = Connect::new(cfg, store.clone(), store.clone()).unwrap();
    Env {
        server,
        store,
        connect,
    }
}

async fn user(store: &MemoryStore) -> UserId {
    let id = UserId(Uuid::new_v4());
    store
        .create_user(id, None, Tier::Starter, Limits::default(), Utc::now())
        .await
        .unwrap();
    id
}

async fn stripe_accepts(server: &MockServer, code: &str, account: &str) {
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .and(body_string_contains(format!("code={code}")))
        .and(body_string_contains("grant_type=authorization_code"))
        .and(header("Authorization", "Basic c2tfcGxhdGZvcm06"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": format!("sk_token_{account}"), "refresh_token": "rt_1", "stripe_user_id": account,
            "scope": "read_only", "livemode": false, "token_type": "bearer"})))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/account"))
        .and(header(
            "Authorization",
            format!("Bearer sk_token_{account}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "id": account, "object": "account", "default_currency": "eur",
            "business_profile": {"name": "Acme GmbH"}})))
        .mount(server)
        .await;
}

fn state_of(url: &Url) -> String {
    url.query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned()
}

fn cb(code: Option<&str>, state: Option<&str>) -> Callback {
    Callback {
        code: code.map(Into::into),
        state: state.map(Into::into),
        ..Callback::default()
    }
}

#[tokio::test]
async fn the_authorize_url_carries_a_random_single_use_state() {
    let e = env(Duration::from_secs(600)).await;
    let u = user(&e.store).await;
    let a = e.connect.authorize_url(u).await.unwrap();
    let b = e.connect.authorize_url(u).await.unwrap();
    assert_eq!(
        a.origin().ascii_serialization(),
        "https://connect.example.test"
    );
    assert_eq!(a.path(), "/oauth/authorize");
    let q: std::collections::BTreeMap<_, _> = a.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], "ca_platform");
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["scope"], "read_only");
    assert_eq!(
        q["redirect_uri"],
        "https://app.example.test/api/stripe/callback"
    );
    let (sa, sb) = (state_of(&a), state_of(&b));
    assert_ne!(sa, sb);
    let bits = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&sa)
        .unwrap()
        .len()
        * 8;
    assert!(bits >= 128, "{bits} bits");
}

#[tokio::test]
async fn the_callback_stores_the_connection_with_its_account_details() {
    let e = env(Duration::from_secs(600)).await;
    stripe_accepts(&e.server, "ac_good", "acct_42").await;
    let u = user(&e.store).await;
    let state = state_of(&e.connect.authorize_url(u).await.unwrap());
    let conn = e
        .connect
        .callback(u, &cb(Some("ac_good"), Some(&state)))
        .await
        .unwrap();
    assert_eq!(conn.stripe_account_id, "acct_42");
    assert_eq!(conn.business_name.as_deref(), Some("Acme GmbH"));
    assert_eq!(conn.currency.as_deref(), Some("eur"));
    assert!(conn.is_active);
    let tokens = e.store.tokens(u, conn.id).await.unwrap().unwrap();
    assert_eq!(tokens.access_token.expose_secret(), "sk_token_acct_42");

    // The state is spent.
    let err = e
        .connect
        .callback(u, &cb(Some("ac_good"), Some(&state)))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::InvalidState), "{err}");
}

#[tokio::test]
async fn bad_states_are_refused_before_anything_is_asked_or_written() {
    let e = env(Duration::from_secs(600)).await;
    Mock::given(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&e.server)
        .await;
    let u = user(&e.store).await;
    let other = user(&e.store).await;
    let err = e
        .connect
        .callback(u, &cb(Some("ac_x"), None))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::MissingState), "{err}");
    let err = e
        .connect
        .callback(u, &cb(Some("ac_x"), Some("forged")))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::InvalidState), "{err}");
    let theirs = state_of(&e.connect.authorize_url(other).await.unwrap());
    let err = e
        .connect
        .callback(u, &cb(Some("ac_x"), Some(&theirs)))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::StateMismatch), "{err}");
    let mine = state_of(&e.connect.authorize_url(u).await.unwrap());
    let denied = Callback {
        error: Some("access_denied".into()),
        error_description: Some("The user denied your request".into()),
        ..cb(None, Some(&mine))
    };
    let err = e.connect.callback(u, &denied).await.unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");
    let mine = state_of(&e.connect.authorize_url(u).await.unwrap());
    let err = e
        .connect
        .callback(u, &cb(None, Some(&mine)))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::MissingCode), "{err}");
    assert!(e.store.connections(u).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_expired_state_is_refused() {
    let e = env(Duration::ZERO).await;
    let u = user(&e.store).await;
    let state = state_of(&e.connect.authorize_url(u).await.unwrap());
    let err = e
        .connect
        .callback(u, &cb(Some("ac_x"), Some(&state)))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::InvalidState), "{err}");
}

#[tokio::test]
async fn a_failed_exchange_names_stripes_reason_and_writes_nothing() {
    let e = env(Duration::from_secs(600)).await;
    Mock::given(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": "invalid_grant", "error_description": "Authorization code does not exist: ac_bad"})))
        .mount(&e.server)
        .await;
    let u = user(&e.store).await;
    let state = state_of(&e.connect.authorize_url(u).await.unwrap());
    let err = e
        .connect
        .callback(u, &cb(Some("ac_bad"), Some(&state)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist: ac_bad"), "{err}");
    assert!(e.store.connections(u).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_account_of_another_user_is_not_rebound_and_deauthorization_erases_tokens() {
    let e = env(Duration::from_secs(600)).await;
    stripe_accepts(&e.server, "ac_1", "acct_7").await;
    let first = user(&e.store).await;
    let second = user(&e.store).await;
    let s1 = state_of(&e.connect.authorize_url(first).await.unwrap());
    let conn = e
        .connect
        .callback(first, &cb(Some("ac_1"), Some(&s1)))
        .await
        .unwrap();
    let s2 = state_of(&e.connect.authorize_url(second).await.unwrap());
    let err = e
        .connect
        .callback(second, &cb(Some("ac_1"), Some(&s2)))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::AlreadyConnected(_)), "{err}");
    assert!(e.store.connections(second).await.unwrap().is_empty());
    assert!(
        e.store.tokens(first, conn.id).await.unwrap().is_some(),
        "the first user's connection is intact"
    );

    let gone = e.connect.deauthorize("acct_7").await.unwrap().unwrap();
    assert!(!gone.is_active);
    assert!(e.store.tokens(first, conn.id).await.unwrap().is_none());
    assert!(
        e.connect
            .deauthorize("acct_unknown")
            .await
            .unwrap()
            .is_none()
    );
}
