//! The JSON API on SQLite, driven without a socket: sessions, the authorization table, metrics
//! from what a sync cached, insights and scenarios with their limits, usage, errors.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::BodyExt;
use revpilot_core::billing::Catalog;
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::ports::{
    ConnectionId, ConnectionStore, NewConnection, ObjectCache, PlanChange, Tier, Tokens, UserId,
    UserStore,
};
use revpilot_core::{Currency, Rules};
use revpilot_server::auth::Jwt;
use revpilot_server::{AppState, app};
use revpilot_store::{KeyRing, SqliteStore};
use revpilot_stripe::export::{Export, RawExport};
use revpilot_stripe::rebuild::rebuild;
use revpilot_stripe::synth::SynthExport;
use secrecy::SecretString;
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;
use uuid::Uuid;

const SECRET: &str = "a-test-jwt-secret-of-at-least-32-bytes!";

/// The origin of `AppState::new`'s default app URL, which the tests' browsers post from.
const APP_ORIGIN: &str = "http://127.0.0.1:3000";

fn now() -> DateTime<Utc> {
    // The synthetic export covers 2023-01 to 2024-03.
    Utc.with_ymd_and_hms(2024, 2, 20, 12, 0, 0).unwrap()
}

struct World {
    _dir: TempDir,
    store: Arc<SqliteStore>,
    state: Arc<AppState>,
    router: axum::Router,
    jwt: Jwt,
    export: Vec<u8>,
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(adjust: impl FnOnce(&mut AppState)) -> World {
    let dir = TempDir::new().unwrap();
    let keys = KeyRing::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let store = Arc::new(
        SqliteStore::connect(dir.path().join("api.db").to_str().unwrap(), keys)
            .await
            .unwrap(),
    );
    let jwt = Jwt::new(SecretString::from(SECRET), None).unwrap();
    let mut state = AppState::new(store.clone(), None);
    let t = now();
    state.app.clock = Arc::new(move || t);
    state.sessions.jwt = Some(Arc::new(jwt.clone()));
    adjust(&mut state);
    let state = Arc::new(state);
    let mut export = Vec::new();
    SynthExport {
        customers: 80,
        months: 14,
        seed: 4,
    }
    .write(&mut export)
    .unwrap();
    World {
        _dir: dir,
        store,
        state: state.clone(),
        router: app(state),
        jwt,
        export,
    }
}

impl World {
    fn token(&self, user: UserId) -> String {
        self.jwt
            .issue(user, None, now().timestamp() + 3_600)
            .unwrap()
    }

    /// A user with a connection whose cache holds the synthetic export.
    async fn connected(&self, account: &str) -> (UserId, ConnectionId) {
        let user = UserId(Uuid::new_v4());
        self.store
            .create_user(
                user,
                None,
                Tier::Starter,
                Catalog::default().plan(Tier::Starter).limits,
                now(),
            )
            .await
            .unwrap();
        let c = self
            .store
            .save_connection(
                NewConnection {
                    user,
                    stripe_account_id: account.into(),
                    business_name: Some("Synth <b>Co</b>".into()),
                    currency: Some("usd".into()),
                    tokens: Tokens {
                        access_token: SecretString::from("sk_test_x"),
                        refresh_token: None,
                    },
                },
                now(),
            )
            .await
            .unwrap();
        let raw: RawExport = serde_json::from_slice(&self.export).unwrap();
        self.store
            .upsert_objects(c.id, &raw.cached(now()).unwrap())
            .await
            .unwrap();
        (user, c.id)
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, _, bytes) = self
            .send(
                method,
                uri,
                token.map(|t| ("authorization", format!("Bearer {t}"))),
                body.map(|b| ("application/json", b.to_string())),
            )
            .await;
        (
            status,
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)})),
        )
    }
}

impl World {
    /// One request through the router: an optional credential header and an optional
    /// `(content type, body)`.
    async fn send(
        &self,
        method: &str,
        uri: &str,
        credential: Option<(&str, String)>,
        body: Option<(&str, String)>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        self.send_with(method, uri, credential.as_slice(), body)
            .await
    }

    /// One request through the router with `headers` and an optional `(content type, body)`.
    async fn send_with(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, String)],
        body: Option<(&str, String)>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let body = match body {
            Some((content_type, b)) => {
                req = req.header("content-type", content_type);
                Body::from(b)
            }
            None => Body::empty(),
        };
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, bytes.to_vec())
    }
}

fn forged(claims: Value, secret: &str, alg: &str) -> String {
    use base64::Engine as _;
    use hmac::{Hmac, KeyInit, Mac};
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let head = b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
    let body = b64(claims.to_string().as_bytes());
    let signing = format!("{head}.{body}");
    let sig = if alg == "none" {
        String::new()
    } else {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(signing.as_bytes());
        b64(&mac.finalize().into_bytes())
    };
    format!("{signing}.{sig}")
}

#[tokio::test]
async fn every_route_refuses_bad_sessions_and_other_users_connections_alike() {
    let w = world().await;
    let (alice, alice_conn) = w.connected("acct_alice").await;
    let (bob, _) = w.connected("acct_bob").await;
    let good = w.token(alice);
    let exp = now().timestamp() + 3_600;
    let claims =
        |sub: UserId, exp: i64, aud: &str| json!({"sub": sub.to_string(), "exp": exp, "aud": aud});
    let bad_tokens = [
        ("no token", None),
        ("garbage", Some("not.a.token".to_owned())),
        (
            "other secret",
            Some(forged(
                claims(alice, exp, "authenticated"),
                "another-secret-of-32-bytes-or-more!!",
                "HS256",
            )),
        ),
        (
            "expired",
            Some(w.jwt.issue(alice, None, now().timestamp() - 3_600).unwrap()),
        ),
        (
            "alg none",
            Some(forged(claims(alice, exp, "authenticated"), SECRET, "none")),
        ),
        (
            "alg HS512",
            Some(forged(claims(alice, exp, "authenticated"), SECRET, "HS512")),
        ),
        (
            "wrong audience",
            Some(forged(claims(alice, exp, "anon"), SECRET, "HS256")),
        ),
        (
            "no sub",
            Some(forged(
                json!({"exp": exp, "aud": "authenticated"}),
                SECRET,
                "HS256",
            )),
        ),
    ];
    let c = alice_conn.to_string();
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/api/metrics?connectionId={c}"), None),
        ("POST", format!("/api/insights?connectionId={c}"), None),
        (
            "POST",
            "/api/scenarios".into(),
            Some(json!({"connectionId": c})),
        ),
        ("GET", "/api/usage/current".into(), None),
        (
            "POST",
            "/api/create-checkout".into(),
            Some(json!({"tier": "professional"})),
        ),
        ("GET", "/api/connections".into(), None),
    ];
    for (method, uri, body) in &routes {
        for (case, token) in &bad_tokens {
            let (status, json) = w.call(method, uri, token.as_deref(), body.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri}: {case}: {json}"
            );
            assert_eq!(json["error"]["code"], "unauthorized");
        }
    }
    // Bob asking for Alice's connection gets exactly what a missing one gets.
    let bob_token = w.token(bob);
    let missing = Uuid::new_v4().to_string();
    for (method, uri, body) in routes.iter().take(3) {
        let other = w.call(method, uri, Some(&bob_token), body.clone()).await;
        let swapped_uri = uri.replace(&c, &missing);
        let swapped_body = body
            .clone()
            .map(|b| serde_json::from_str(&b.to_string().replace(&c, &missing)).unwrap());
        let none = w
            .call(method, &swapped_uri, Some(&bob_token), swapped_body)
            .await;
        assert_eq!(other.0, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(
            other, none,
            "{uri}: another user's connection reads like a missing one"
        );
        let malformed = w
            .call(
                method,
                &uri.replace(&c, "not-a-uuid"),
                Some(&bob_token),
                body.clone().map(|b| {
                    serde_json::from_str(&b.to_string().replace(&c, "not-a-uuid")).unwrap()
                }),
            )
            .await;
        assert_eq!(malformed, none);
    }
    // Each user lists only their own connections.
    let (status, list) = w
        .call("GET", "/api/connections", Some(&bob_token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let accounts: Vec<&str> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stripeAccountId"].as_str().unwrap())
        .collect();
    assert_eq!(accounts, ["acct_bob"]);
    // Alice herself is served.
    let (status, _) = w
        .call(
            "GET",
            &format!("/api/metrics?connectionId={c}"),
            Some(&good),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // A first-seen user gets a starter profile.
    let newcomer = UserId(Uuid::new_v4());
    let (status, usage) = w
        .call("GET", "/api/usage/current", Some(&w.token(newcomer)), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["tier"], "starter");
}

#[tokio::test]
async fn metrics_are_the_engines_numbers_on_the_synced_data() {
    let w = world().await;
    let (user, conn) = w.connected("acct_m").await;
    // Synced at noon today: the data runs to then.
    w.store.set_last_synced(conn, now()).await.unwrap();
    let token = w.token(user);
    let (status, body) = w
        .call(
            "GET",
            &format!("/api/metrics?connectionId={conn}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 90, "90 days by default");
    assert_eq!(body["to"], "2024-02-20");
    // The same numbers as the engine on the export file itself.
    let account = rebuild(&Export::from_json(&w.export).unwrap()).account;
    let report = Engine::new(&account, Rules::default(), Currency::USD)
        .with_as_of(now())
        .series(&SeriesRequest::new(
            chrono::NaiveDate::from_ymd_opt(2023, 11, 23).unwrap(),
            chrono::NaiveDate::from_ymd_opt(2024, 2, 20).unwrap(),
            Granularity::Day,
        ))
        .unwrap();
    assert_eq!(rows.len(), report.rows.len());
    assert_eq!(
        serde_json::to_value(&report.rows).unwrap(),
        body["rows"],
        "every row, every field"
    );
    assert!(report.rows.last().unwrap().mrr > rust_decimal::Decimal::ZERO);

    let (status, monthly) = w
        .call(
            "GET",
            &format!(
                "/api/metrics?connectionId={conn}&from=2023-01-01&to=2024-01-31&granularity=month"
            ),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(monthly["rows"].as_array().unwrap().len(), 13);

    // Nothing past the data's as-of instant (the sync's time, today here): a range
    // reaching past it is cut with the answer saying so, and one wholly after it is refused.
    let synced = body["asOf"].as_str().unwrap().to_owned();
    assert!(synced.starts_with("2024-02-20"), "{synced}");
    assert_eq!(body["cut"], Value::Null, "today's range is not cut");
    assert_eq!(rows.last().unwrap()["partial"], true, "today is partial");
    let (status, cut) = w
        .call(
            "GET",
            &format!(
                "/api/metrics?connectionId={conn}&from=2023-10-01&to=2024-12-31&granularity=month"
            ),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{cut}");
    let months = cut["rows"].as_array().unwrap();
    assert_eq!(months.len(), 5, "October to February, nothing after");
    assert_eq!(months[4]["date"], "2024-02-20");
    assert_eq!(months[4]["partial"], true);
    assert_eq!(months[3]["partial"], false);
    assert_eq!(cut["to"], "2024-02-20");
    assert_eq!(cut["requestedTo"], "2024-12-31");
    assert!(
        cut["cut"]
            .as_str()
            .unwrap()
            .contains("the data runs to 2024-02-20"),
        "{cut}"
    );
    let (status, after) = w
        .call(
            "GET",
            &format!("/api/metrics?connectionId={conn}&from=2024-03-01&to=2024-12-31"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{after}");
    assert!(
        after["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no data after 2024-02-20"),
        "{after}"
    );
    for (query, says) in [
        ("&granularity=week", "granularity"),
        (
            "&from=2024-02-01&to=2024-01-01",
            "from must not be after to",
        ),
        ("&from=yesterday", "query"),
        // The earliest date chrono reads: no room for the default `from` (this panicked).
        ("&to=-262143-03-01", "too early for the default range"),
    ] {
        let (status, body) = w
            .call(
                "GET",
                &format!("/api/metrics?connectionId={conn}{query}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
}

#[tokio::test]
async fn insights_and_scenarios_are_generated_metered_and_refused_at_the_limit() {
    let w = world().await;
    let (user, conn) = w.connected("acct_i").await;
    let token = w.token(user);
    let uri = format!("/api/insights?connectionId={conn}");
    for i in 0..5 {
        let (status, body) = w.call("POST", &uri, Some(&token), None).await;
        assert_eq!(status, StatusCode::OK, "{i}: {body}");
        let insights = body["insights"].as_array().unwrap();
        assert_eq!(insights.len(), 5);
        assert!(
            insights
                .iter()
                .all(|i| !i["figures"].as_array().unwrap().is_empty())
        );
        assert_eq!(
            body["fallback"],
            Value::Null,
            "the local narrative is the provider"
        );
    }
    let (_, usage) = w
        .call("GET", "/api/usage/current", Some(&token), None)
        .await;
    assert_eq!(usage["ai_insight"]["used"], 5);
    assert_eq!(usage["ai_insight"]["remaining"], 0);
    let (status, body) = w.call("POST", &uri, Some(&token), None).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["error"]["code"], "upgrade_required");

    // Scenarios: none on starter, three on professional.
    let scenario = json!({"connectionId": conn.to_string(), "priceChangePct": "10"});
    let (status, body) = w
        .call(
            "POST",
            "/api/scenarios",
            Some(&token),
            Some(scenario.clone()),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::PAYMENT_REQUIRED, &json!("upgrade_required"))
    );
    w.store
        .set_plan(
            user,
            &PlanChange {
                tier: Tier::Professional,
                subscription_status: Some("active".into()),
                stripe_customer_id: None,
                stripe_subscription_id: None,
                current_period_start: None,
                current_period_end: None,
                limits: Catalog::default().plan(Tier::Professional).limits,
            },
            now(),
        )
        .await
        .unwrap();
    let (status, body) = w
        .call(
            "POST",
            "/api/scenarios",
            Some(&token),
            Some(json!({"connectionId": conn.to_string(), "churnChangePoints": "500"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("churn_change_points")
    );
    for _ in 0..3 {
        let (status, body) = w
            .call(
                "POST",
                "/api/scenarios",
                Some(&token),
                Some(scenario.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let p = body["projection"].as_array().unwrap();
        assert_eq!(p.len(), 3);
        assert!(
            p.iter()
                .all(|x| x["delta"].as_str().unwrap().parse::<f64>().unwrap() > 0.0)
        );
    }
    let (status, _) = w
        .call("POST", "/api/scenarios", Some(&token), Some(scenario))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "the fourth of three");
    let (status, body) = w
        .call(
            "POST",
            "/api/scenarios",
            Some(&token),
            Some(json!({"connectionId": conn.to_string(), "surprise": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn a_model_that_lies_stalls_or_fails_shows_only_computed_numbers_within_the_deadline() {
    use revpilot_ai::{OpenAiConfig, OpenAiProvider};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let model = MockServer::start().await;
    let mut config =
        OpenAiConfig::new(&format!("{}/internal-llm/v1", model.uri()), "gpt-x").unwrap();
    config.min_delay = std::time::Duration::from_millis(5);
    // As reported: a minute per attempt, three attempts; the generation's deadline is what
    // bounds the wait.
    config.timeout = std::time::Duration::from_secs(60);
    let provider = OpenAiProvider::new(config).unwrap();
    let deadline = std::time::Duration::from_secs(1);
    let w = world_with(|s| {
        s.app.llm = Arc::new(provider);
        s.app.insight_deadline = deadline;
    })
    .await;
    let (user, conn) = w.connected("acct_llm").await;
    w.store.set_last_synced(conn, now()).await.unwrap();
    let token = w.token(user);
    let uri = format!("/api/insights?connectionId={conn}");
    let lie = "MRR is $1,000,000,000 and will grow 500 %";
    let insights: Vec<Value> = revpilot_core::insights::InsightKind::ALL
        .iter()
        .map(|k| json!({"kind": k, "title": "Revenue", "summary": lie, "figure_ids": ["mrr"]}))
        .collect();
    let lying = ResponseTemplate::new(200).set_body_json(json!({
        "choices": [{"message": {"role": "assistant",
                                 "content": json!({"insights": insights}).to_string()}}]
    }));
    for (name, response, says) in [
        ("lies", lying.clone(), "writes 1000000000"),
        (
            "stalls",
            lying.set_delay(std::time::Duration::from_secs(75)),
            "no answer within the deadline",
        ),
        (
            "fails",
            ResponseTemplate::new(500).set_body_string("upstream http://10.0.0.7:8000 down"),
            "answered 500",
        ),
    ] {
        model.reset().await;
        Mock::given(method("POST"))
            .and(path("/internal-llm/v1/chat/completions"))
            .respond_with(response)
            .mount(&model)
            .await;
        let started = std::time::Instant::now();
        let (status, body) = w.call("POST", &uri, Some(&token), None).await;
        let waited = started.elapsed();
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert!(
            waited < deadline + std::time::Duration::from_millis(800),
            "{name}: the user waited {waited:?}"
        );
        let fallback = body["fallback"].as_str().unwrap();
        assert!(fallback.contains(says), "{name}: {fallback}");
        let text = body.to_string();
        for leak in [
            "1,000,000,000",
            "500 %",
            "internal-llm",
            "127.0.0.1",
            "10.0.0.7",
        ] {
            assert!(!text.contains(leak), "{name}: {leak:?} in {text}");
        }
        let (_, _, html) = w.page("GET", "/insights", Some(&token), None).await;
        for leak in ["1,000,000,000", "500 %", "internal-llm", "127.0.0.1"] {
            assert!(!html.contains(leak), "{name}: {leak:?} on /insights");
        }
        assert!(html.contains("written by local"), "{name}");
    }
    // The three generations fell back to the local narrative: none is counted (a starter's
    // five are all left), so none is billed past a limit either.
    let (_, usage) = w
        .call("GET", "/api/usage/current", Some(&token), None)
        .await;
    assert_eq!(usage["ai_insight"]["used"], 0, "{usage}");
    assert_eq!(usage["ai_insight"]["remaining"], 5, "{usage}");
}

#[tokio::test]
async fn the_scenario_meter_is_shown_and_its_limit_answers_before_the_history() {
    let w = world().await;
    let (user, _) = w.connected("acct_meter").await;
    let token = w.token(user);
    // A second account, synced but empty: no history to run a scenario on.
    let empty = w
        .store
        .save_connection(
            NewConnection {
                user,
                stripe_account_id: "acct_empty".into(),
                business_name: None,
                currency: Some("usd".into()),
                tokens: Tokens {
                    access_token: SecretString::from("sk_test_y"),
                    refresh_token: None,
                },
            },
            now(),
        )
        .await
        .unwrap();
    w.store.set_last_synced(empty.id, now()).await.unwrap();
    let scenario = json!({"connectionId": empty.id.to_string(), "priceChangePct": "10"});
    // Starter: no scenarios at all, so 402 whatever the data.
    let (status, body) = w
        .call(
            "POST",
            "/api/scenarios",
            Some(&token),
            Some(scenario.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["error"]["code"], "upgrade_required");
    let (_, usage) = w
        .call("GET", "/api/usage/current", Some(&token), None)
        .await;
    assert_eq!(usage["scenario"]["used"], 0, "{usage}");
    assert_eq!(usage["scenario"]["limit"], 0, "{usage}");
    assert_eq!(usage["scenario"]["hard_limit"], true, "{usage}");
    // Professional: the history's own error answers (the limit is not reached).
    w.store
        .set_plan(
            user,
            &PlanChange {
                tier: Tier::Professional,
                subscription_status: Some("active".into()),
                stripe_customer_id: None,
                stripe_subscription_id: None,
                current_period_start: None,
                current_period_end: None,
                limits: Catalog::default().plan(Tier::Professional).limits,
            },
            now(),
        )
        .await
        .unwrap();
    let (status, body) = w
        .call("POST", "/api/scenarios", Some(&token), Some(scenario))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (_, _, html) = w.page("GET", "/usage", Some(&token), None).await;
    assert!(
        html.contains("data-meter=\"scenario\" data-used=\"0\""),
        "{html}"
    );
    assert!(html.contains("What-if scenarios"));
}

#[tokio::test]
async fn checkout_without_stripe_and_oversized_bodies_get_json_errors() {
    let w = world().await;
    let (user, _) = w.connected("acct_c").await;
    let token = w.token(user);
    let (status, body) = w
        .call(
            "POST",
            "/api/create-checkout",
            Some(&token),
            Some(json!({"tier": "business"})),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("stripe_not_configured")
        )
    );
    let (status, body) = w
        .call(
            "POST",
            "/api/create-checkout",
            Some(&token),
            Some(json!({"tier": "platinum"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("platinum")
    );
    let huge = json!({"connectionId": "x", "pad": "a".repeat(2 * 1024 * 1024)});
    let (status, body) = w
        .call("POST", "/api/scenarios", Some(&token), Some(huge))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
}

#[tokio::test]
async fn expensive_routes_have_a_per_user_budget() {
    let w = world_with(|state| {
        state.app.expensive = Arc::new(revpilot_server::guard::KeyedBudget::per_minute(2, 1_000));
    })
    .await;
    let (alice, conn) = w.connected("acct_rate_a").await;
    let (bob, bob_conn) = w.connected("acct_rate_b").await;
    let uri = format!("/api/insights?connectionId={conn}");
    let token = w.token(alice);
    for _ in 0..2 {
        assert_eq!(
            w.call("POST", &uri, Some(&token), None).await.0,
            StatusCode::OK
        );
    }
    let (status, body) = w.call("POST", &uri, Some(&token), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // The refused call was not metered: two insights used.
    let (_, usage) = w
        .call("GET", "/api/usage/current", Some(&token), None)
        .await;
    assert_eq!(usage["ai_insight"]["used"], 2);
    // Another user has their own budget.
    let bob_uri = format!("/api/insights?connectionId={bob_conn}");
    assert_eq!(
        w.call("POST", &bob_uri, Some(&w.token(bob)), None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn built_in_accounts_sign_up_log_in_and_get_sessions() {
    let w = world().await;
    let creds = |email: &str, password: &str| json!({"email": email, "password": password});
    let (status, body) = w
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(creds("ada@example.com", "correct horse battery")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    let (status, usage) = w
        .call("GET", "/api/usage/current", Some(&token), None)
        .await;
    assert_eq!(
        (status, &usage["tier"]),
        (StatusCode::OK, &json!("starter"))
    );
    assert_eq!(usage["user"], body["user"]);

    let (status, body) = w
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(creds("ADA@example.com", "another password!")),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::CONFLICT, &json!("email_taken"))
    );

    let (status, body) = w
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(creds("Ada@Example.com", "correct horse battery")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = w
        .call(
            "GET",
            "/api/usage/current",
            Some(body["token"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let wrong = w
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(creds("ada@example.com", "wrong horse battery")),
        )
        .await;
    let unknown = w
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(creds("nobody@example.com", "correct horse battery")),
        )
        .await;
    assert_eq!(wrong.0, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong, unknown, "a wrong email reads like a wrong password");

    for (email, password, says) in [
        ("not-an-email", "long enough password", "email"),
        ("@example.com", "long enough password", "email"),
        ("bob@example.com", "short", "password"),
    ] {
        let (status, body) = w
            .call(
                "POST",
                "/api/auth/signup",
                None,
                Some(creds(email, password)),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{email}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    // Nothing is stored in clear.
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM user_credentials")
        .fetch_one(w.store.pool())
        .await
        .unwrap();
    assert!(stored.starts_with("$argon2id$") && !stored.contains("horse"));
}

impl World {
    /// A page as a browser asks for it: the session in the cookie, a form body when given.
    async fn page(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        form: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        // What a browser sends on the app's own pages: where the request comes from.
        let mut headers = vec![
            ("origin", APP_ORIGIN.to_owned()),
            ("sec-fetch-site", "same-origin".to_owned()),
        ];
        if let Some(t) = token {
            headers.push(("cookie", format!("theme=dark; revpilot_session={t}")));
        }
        let (status, headers, bytes) = self
            .send_with(
                method,
                uri,
                &headers,
                form.map(|f| ("application/x-www-form-urlencoded", f.to_owned())),
            )
            .await;
        (status, headers, String::from_utf8(bytes).unwrap())
    }
}

/// The `data-value` of the KPI tile `key`.
fn kpi(html: &str, key: &str) -> String {
    let at = html
        .find(&format!("data-kpi=\"{key}\" data-value=\""))
        .unwrap_or_else(|| panic!("no KPI {key}"));
    let rest = &html[at..];
    let start = rest.find("data-value=\"").unwrap() + "data-value=\"".len();
    rest[start..start + rest[start..].find('"').unwrap()].to_owned()
}

#[tokio::test]
async fn the_dashboard_shows_the_apis_numbers_and_escapes_stripe_strings() {
    let w = world().await;
    let (user, conn) = w.connected("acct_dash").await;
    let token = w.token(user);
    w.store.set_last_synced(conn, now()).await.unwrap();
    let (status, _, html) = w.page("GET", "/dashboard", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    // The dashboard says what its figures run to.
    assert!(
        html.contains("Figures as of <span data-as-of=\"2024-02-20 12:00 UTC\">"),
        "{html}"
    );

    let (_, metrics) = w
        .call(
            "GET",
            &format!("/api/metrics?connectionId={conn}"),
            Some(&token),
            None,
        )
        .await;
    let last = metrics["rows"].as_array().unwrap().last().unwrap().clone();
    let dec = |v: &Value| {
        v.as_str()
            .unwrap()
            .parse::<rust_decimal::Decimal>()
            .unwrap()
    };
    let usd = |v: &Value| Currency::USD.round(dec(v)).to_string();
    let pct = |v: &Value| {
        (dec(v) * rust_decimal::Decimal::ONE_HUNDRED)
            .round_dp(1)
            .to_string()
    };
    assert_eq!(kpi(&html, "mrr"), usd(&last["mrr"]));
    assert_eq!(kpi(&html, "arr"), usd(&last["arr"]));
    assert_eq!(kpi(&html, "customers"), last["total_customers"].to_string());
    assert_eq!(kpi(&html, "arpu"), usd(&last["arpu"]));
    assert_eq!(kpi(&html, "churn"), pct(&last["customer_churn_rate"]));
    assert!(!last["mrr"].as_str().unwrap().starts_with('0'));

    // The MRR line has one point per month of the 24 up to today, each at the API's value.
    let (_, monthly) = w
        .call(
            "GET",
            &format!(
                "/api/metrics?connectionId={conn}&from=2022-03-01&to=2024-02-20&granularity=month"
            ),
            Some(&token),
            None,
        )
        .await;
    let months = monthly["rows"].as_array().unwrap();
    assert_eq!(html.matches("class=\"mrr-point\"").count(), months.len());
    for m in months {
        let point = format!(
            "data-date=\"{}\" data-mrr=\"{}\"",
            m["date"].as_str().unwrap(),
            usd(&m["mrr"])
        );
        assert!(html.contains(&point), "{point}");
    }
    assert!(
        html.contains("data-kind=\"new\""),
        "movement bars are drawn"
    );
    assert!(
        html.contains("class=\"cohort-cell\""),
        "the cohort heat map is drawn"
    );

    // A Stripe-sourced string is text, never markup.
    assert!(
        html.contains("Synth &#60;b&#62;Co&#60;/b&#62;")
            || html.contains("Synth &lt;b&gt;Co&lt;/b&gt;"),
        "escaped"
    );
    assert!(!html.contains("<b>Co</b>"));

    // Another user sees their own (empty) dashboard, never this one.
    let other = w.token(UserId(Uuid::new_v4()));
    let (status, _, html) = w
        .page(
            "GET",
            &format!("/dashboard?connection={conn}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Connect Stripe") && !html.contains("data-kpi"));
}

#[tokio::test]
async fn no_data_yet_only_while_the_first_sync_runs_and_pages_need_a_session() {
    let w = world().await;
    let (user, _) = w.connected("acct_pending").await;
    let (status, _, html) = w
        .page("GET", "/dashboard", Some(&w.token(user)), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("No data yet") && !html.contains("data-kpi"));
    assert!(
        html.contains("http-equiv=\"refresh\""),
        "it refreshes until the sync is done"
    );
    assert!(html.contains("data-first-sync=\"queued\""), "{html}");

    // A first sync that failed or paused says so, why, and what to do; it does not claim to
    // be running, nor refresh for ever.
    use revpilot_core::ports::{RunOutcome, SyncStateStore, SyncStatus};
    let (user, conn) = w.connected("acct_stopped").await;
    for (i, (status, error, says, action)) in [
        (
            SyncStatus::Failed,
            "/v1/subscriptions failed after 5 attempts: error sending request for url \
             (http://10.1.2.3:8443/v1/subscriptions)",
            "/v1/subscriptions failed after 5 attempts",
            "/api/stripe/connect",
        ),
        (
            SyncStatus::Failed,
            "storage: error returned from database: UNIQUE constraint failed: customers_cache.id",
            "RevPilot could not store the data",
            "/api/stripe/connect",
        ),
        (
            SyncStatus::Paused,
            "transaction_volume limit reached; sync paused until the next period or an upgrade",
            "transaction_volume limit reached",
            "/pricing",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let at = now() + chrono::Duration::seconds(10 * i as i64);
        let run = w.store.start_run(conn, at).await.unwrap();
        let (_, _, html) = w
            .page("GET", "/dashboard", Some(&w.token(user)), None)
            .await;
        assert!(html.contains("data-first-sync=\"running\""), "{html}");
        let outcome = RunOutcome {
            error: Some(error.to_owned()),
            ..RunOutcome::default()
        };
        w.store
            .finish_run(run, status, &outcome, at + chrono::Duration::seconds(1))
            .await
            .unwrap();
        let (code, _, html) = w
            .page("GET", "/dashboard", Some(&w.token(user)), None)
            .await;
        assert_eq!(code, StatusCode::OK);
        let s = status.as_str();
        assert!(
            html.contains(&format!("data-first-sync=\"{s}\"")),
            "{s}: {html}"
        );
        assert!(!html.contains("is running"), "{s}: {html}");
        assert!(!html.contains("http-equiv=\"refresh\""), "{s}");
        assert!(html.contains(says), "{s}: the reason is shown: {html}");
        assert!(
            html.contains(&format!("href=\"{action}\"")),
            "{s}: what to do"
        );
        for hidden in ["10.1.2.3", "UNIQUE constraint", "customers_cache"] {
            assert!(!html.contains(hidden), "{s}: {hidden:?} shown");
        }
    }

    for path in ["/dashboard", "/insights", "/usage", "/pricing"] {
        for token in [None, Some("not-a-token")] {
            let (status, headers, _) = w.page("GET", path, token, None).await;
            assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
            assert_eq!(headers["location"], "/login", "{path}");
        }
    }
    let (status, headers, _) = w.page("GET", "/", None, None).await;
    assert_eq!(
        (status, &headers["location"]),
        (StatusCode::SEE_OTHER, &"/dashboard".parse().unwrap())
    );
}

#[tokio::test]
async fn forms_sign_up_log_in_and_log_out_with_a_cookie() {
    let w = world().await;
    let (status, headers, _) = w
        .page(
            "POST",
            "/signup",
            None,
            Some("email=grace%40example.com&password=a+long+password"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/dashboard");
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"));
    let token = cookie
        .strip_prefix("revpilot_session=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (status, _, html) = w.page("GET", "/dashboard", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("Connect Stripe"),
        "a new user is asked to connect"
    );

    let (status, _, html) = w
        .page(
            "POST",
            "/login",
            None,
            Some("email=grace%40example.com&password=wrong+password"),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        html.contains("wrong email or password") && html.contains("value=\"grace@example.com\"")
    );
    let (status, headers, _) = w
        .page(
            "POST",
            "/login",
            None,
            Some("email=grace%40example.com&password=a+long+password"),
        )
        .await;
    assert_eq!(
        (status, &headers["location"]),
        (StatusCode::SEE_OTHER, &"/dashboard".parse().unwrap())
    );
    let (status, _, html) = w
        .page(
            "POST",
            "/signup",
            None,
            Some("email=grace%40example.com&password=a+long+password"),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(html.contains("an account with this email exists"));
    let (_, headers, _) = w.page("POST", "/logout", Some(&token), Some("")).await;
    assert!(
        headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    // An injected email is shown as text.
    let (_, _, html) = w
        .page(
            "POST",
            "/login",
            None,
            Some("email=%22%3E%3Cscript%3Ex%3C%2Fscript%3E&password=whatever+long"),
        )
        .await;
    assert!(!html.contains("<script>x</script>"));
}

#[tokio::test]
async fn insights_usage_and_pricing_pages_work_through_their_forms() {
    let w = world().await;
    let (user, conn) = w.connected("acct_pages").await;
    w.store.set_last_synced(conn, now()).await.unwrap();
    let token = w.token(user);
    let (status, headers, _) = w
        .page(
            "POST",
            "/insights",
            Some(&token),
            Some(&format!("connection={conn}")),
        )
        .await;
    assert_eq!(
        (status, &headers["location"]),
        (StatusCode::SEE_OTHER, &"/insights".parse().unwrap())
    );
    let (status, _, html) = w.page("GET", "/insights", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        html.matches("class=\"insight\"").count(),
        revpilot_core::insights::InsightKind::ALL.len(),
        "one per kind"
    );
    assert!(
        html.contains("data-figure=\"mrr\""),
        "each insight shows its figures"
    );

    let (_, _, html) = w.page("GET", "/usage", Some(&token), None).await;
    assert!(
        html.contains("data-meter=\"ai_insight\" data-used=\"1\""),
        "{html}"
    );
    assert!(html.contains("id=\"tier\">starter<"));

    // Past starter's included insights, the button is refused, with the way out.
    let included = Catalog::default()
        .plan(Tier::Starter)
        .limits
        .ai_insights
        .unwrap();
    for _ in 1..included {
        let (status, _, _) = w
            .page(
                "POST",
                "/insights",
                Some(&token),
                Some(&format!("connection={conn}")),
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
    }
    let (status, _, html) = w
        .page(
            "POST",
            "/insights",
            Some(&token),
            Some(&format!("connection={conn}")),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html.contains("upgrade on the Pricing page"));

    let (status, _, html) = w.page("GET", "/pricing", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(html.matches("class=\"tier\"").count(), 4);
    assert!(html.contains("Your plan"));
    // Without Stripe configured, the upgrade says so instead of failing blindly.
    let (status, _, html) = w
        .page(
            "POST",
            "/pricing/checkout",
            Some(&token),
            Some("tier=professional"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(html.contains("could not be started"));
}

#[tokio::test]
async fn an_account_is_rebuilt_once_per_sync_not_once_per_request() {
    let w = world().await;
    let (user, conn) = w.connected("acct_cache").await;
    let token = w.token(user);
    let mrr = |body: &Value| body["rows"].as_array().unwrap().last().unwrap()["mrr"].clone();
    let uri = format!("/api/metrics?connectionId={conn}");
    let (_, before) = w.call("GET", &uri, Some(&token), None).await;

    // A sync writes more objects: until it records its finish, the account served is the one
    // built at the last sync...
    let mut bigger = Vec::new();
    SynthExport {
        customers: 160,
        months: 14,
        seed: 9,
    }
    .write(&mut bigger)
    .unwrap();
    let raw: RawExport = serde_json::from_slice(&bigger).unwrap();
    let later = now() + chrono::Duration::hours(1);
    w.store
        .upsert_objects(conn, &raw.cached(later).unwrap())
        .await
        .unwrap();
    let (_, same) = w.call("GET", &uri, Some(&token), None).await;
    assert_eq!(mrr(&same), mrr(&before));

    // ...and once it does, a request rebuilds from the cache: at once on a server that re-reads
    // the connection's row every time, within the row TTL (0.1 s) on one that keeps it briefly,
    // so a sync's end shows well within a second.
    w.store.set_last_synced(conn, later).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (_, after) = w.call("GET", &uri, Some(&token), None).await;
    assert_ne!(mrr(&after), mrr(&before));
    let mut cached = Vec::new();
    for kind in revpilot_core::ports::ObjectKind::ALL {
        cached.extend(w.store.objects(user, conn, kind).await.unwrap());
    }
    let account = rebuild(&Export::from_cached(&cached).unwrap()).account;
    let expected = Engine::new(&account, Rules::default(), Currency::USD)
        .with_as_of(later)
        .series(&SeriesRequest::new(
            chrono::NaiveDate::from_ymd_opt(2023, 11, 23).unwrap(),
            chrono::NaiveDate::from_ymd_opt(2024, 2, 20).unwrap(),
            Granularity::Day,
        ))
        .unwrap();
    assert_eq!(serde_json::to_value(&expected.rows).unwrap(), after["rows"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_the_snapshot_job_arriving_together_share_one_build() {
    use revpilot_core::ports::SnapshotStore;
    let w = world().await;
    let (user, conn) = w.connected("acct_flight").await;
    let token = w.token(user);
    let uri = format!("/api/metrics?connectionId={conn}");
    let builds = w.state.app.accounts.builds();
    let runner = w.state.app.runner("flight");
    let job = revpilot_worker::Job::Snapshot {
        day: chrono::NaiveDate::from_ymd_opt(2024, 2, 19).unwrap(),
    };
    let requests =
        futures::future::join_all((0..6).map(|_| w.call("GET", &uri, Some(&token), None)));
    let (answers, snapshot) = tokio::join!(requests, runner.try_execute_task(&job));
    assert!(answers.iter().all(|(status, _)| *status == StatusCode::OK));
    assert!(snapshot.is_ok(), "{snapshot:?}");
    assert_eq!(
        w.state.app.accounts.builds(),
        builds + 1,
        "six requests and the job: one build"
    );
    let rows = w
        .store
        .snapshots(user, conn, job_day(), job_day())
        .await
        .unwrap();
    let served = answers[0].1["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["date"] == "2024-02-19")
        .unwrap()["mrr"]
        .clone();
    assert_eq!(
        serde_json::to_value(rows[0].mrr).unwrap(),
        served,
        "the job read the account the requests were served"
    );
}

/// After a sync, the in-process worker brings the account up to date (the derivation updated
/// with what the sync changed) and the very next request serves it, without building again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_brings_the_account_up_to_date_for_the_next_request() {
    let w = world().await;
    let (user, conn) = w.connected("acct_after_sync").await;
    let token = w.token(user);
    let mrr = |body: &Value| body["rows"].as_array().unwrap().last().unwrap()["mrr"].clone();
    let uri = format!("/api/metrics?connectionId={conn}");
    let (_, before) = w.call("GET", &uri, Some(&token), None).await;
    // A sync cancels one subscription and records its finish.
    let sub = w
        .store
        .objects_page(
            user,
            conn,
            revpilot_core::ports::ObjectKind::Subscription,
            None,
            1,
        )
        .await
        .unwrap()
        .remove(0);
    let mut v: Value = serde_json::from_str(&sub.data).unwrap();
    let ended = chrono::NaiveDate::from_ymd_opt(2024, 1, 10)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp();
    v["status"] = "canceled".into();
    v["canceled_at"] = ended.into();
    v["ended_at"] = ended.into();
    let later = now() + chrono::Duration::hours(1);
    w.store
        .upsert_objects(
            conn,
            &[revpilot_stripe::export::cached_object(
                sub.kind,
                sub.stripe_id,
                later,
                v.to_string(),
            )],
        )
        .await
        .unwrap();
    w.store.set_last_synced(conn, later).await.unwrap();
    // The worker's job after the sync (here its snapshot, which loads the same account).
    let builds = w.state.app.accounts.builds();
    let runner = w.state.app.runner("after-sync");
    runner
        .try_execute_task(&revpilot_worker::Job::Snapshot { day: job_day() })
        .await
        .unwrap();
    assert_eq!(w.state.app.accounts.builds(), builds + 1);
    // No wait for the row TTL: the next request already serves the synced account.
    let (_, after) = w.call("GET", &uri, Some(&token), None).await;
    assert_ne!(mrr(&after), mrr(&before), "the cancellation shows");
    assert_eq!(
        w.state.app.accounts.builds(),
        builds + 1,
        "served, not built again"
    );
}

fn job_day() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2024, 2, 19).unwrap()
}

#[tokio::test]
async fn prometheus_counts_requests_by_route_template_and_openapi_lists_every_api_route() {
    let w = world().await;
    assert!(revpilot_server::telemetry::prometheus().is_some());
    for _ in 0..3 {
        assert_eq!(
            w.call("GET", "/healthz", None, None).await.0,
            StatusCode::OK
        );
    }
    let secret_id = Uuid::new_v4();
    let (status, _) = w
        .call(
            "GET",
            &format!("/api/metrics?connectionId={secret_id}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = w.call("GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let text = body["raw"].as_str().unwrap();
    let count = |line_start: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    // Other tests in this process count too: at least ours.
    assert!(
        count("revpilot_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"}")
            >= 3
    );
    assert!(
        count("revpilot_http_requests_total{method=\"GET\",route=\"/api/metrics\",status=\"401\"}")
            >= 1
    );
    assert!(text.contains("revpilot_http_request_duration_seconds_bucket{method=\"GET\",route=\"/healthz\",le=\"0.005\"}"));
    assert!(
        !text.contains(&secret_id.to_string()),
        "ids never become labels"
    );

    let (status, doc) = w.call("GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut listed: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    listed.sort();
    let mut expected = vec![
        "GET /healthz",
        "GET /metrics",
        "GET /api/openapi.json",
        "POST /api/webhooks/stripe-billing",
        "POST /api/webhooks/stripe-connect",
        "POST /api/auth/signup",
        "POST /api/auth/login",
        "GET /api/stripe/connect",
        "GET /api/stripe/connect/callback",
        "POST /api/stripe/sync",
        "GET /api/connections",
        "GET /api/metrics",
        "POST /api/insights",
        "POST /api/scenarios",
        "GET /api/usage/current",
        "POST /api/create-checkout",
    ];
    expected.sort_unstable();
    assert_eq!(listed, expected);
    let params = doc["paths"]["/api/metrics"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = params.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["connectionId", "from", "to", "granularity"]);
    assert!(doc["components"]["securitySchemes"]["session"].is_object());
    assert!(doc["components"]["schemas"]["ScenarioBody"].is_object());
}

#[tokio::test]
async fn log_in_attempts_are_limited_per_email_and_per_client_address() {
    let w = world().await;
    let creds = |email: &str, password: &str| json!({"email": email, "password": password});
    let (status, _) = w
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(creds("eve@example.com", "the right password")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Signing up spent one of the email's attempts; guessing spends the rest...
    let budget = revpilot_server::ATTEMPTS_PER_MINUTE;
    for _ in 1..budget {
        let (status, _) = w
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(creds("Eve@Example.com", "a wrong guess!")),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // ...and then even the right password waits, without any hashing.
    let (status, body) = w
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(creds("eve@example.com", "the right password")),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");

    // One address trying many emails is stopped too; another address is not.
    let from = |ip: [u8; 4], email: &str| {
        let mut req = Request::builder()
            .method("POST")
            .uri("/api/auth/login")
            .header("content-type", "application/json")
            .body(Body::from(creds(email, "some password").to_string()))
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                ip, 40_000,
            ))));
        let router = w.router.clone();
        async move { router.oneshot(req).await.unwrap().status() }
    };
    for i in 0..budget {
        let status = from([10, 0, 0, 1], &format!("user{i}@example.com")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        from([10, 0, 0, 1], "yet-another@example.com").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        from([10, 0, 0, 2], "yet-another@example.com").await,
        StatusCode::UNAUTHORIZED
    );
}

/// An EC P-256 key (PKCS#8) and the `x`/`y` of its public half, made for this test with openssl.
const ES_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgOhSJA7EKeqezbkpo
MC7XzoCrxds1LIpAhaKI1LAjxpmhRANCAAQ/RyCwkc3bkKxrG6iweCmuQ9hkbag6
4bQx24ZyK/jPkN4UXI2mKpWwwYva22htS6Crp5o+Llz18cBzu86tikBb
-----END PRIVATE KEY-----
";
const ES_X: &str = "P0cgsJHN25CsaxuosHgprkPYZG2oOuG0MduGciv4z5A";
const ES_Y: &str = "3hRcjaYqlbDBi9rbaG1LoKunmj4uXPXxwHO7zq2KQFs";
/// Another P-256 key, not in the JWKS.
const OTHER_ES_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgosY5B6P3XvgirVw5
Vesm+AdFg/EJRBXxUN/1ixnA7C6hRANCAATJs5kDijV7NhJ3mqcrqJNwyExwo0R3
H9NbNWuhAhRtfpeJmGFfJOQ7gmueInAsSgNo+Bagapwv8XMx/oQKiIdK
-----END PRIVATE KEY-----
";

/// The DER inside a PEM.
fn der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

#[tokio::test]
async fn supabase_sessions_verify_against_the_jwks_and_nothing_else() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let issuer = "https://project.supabase.co/auth/v1";
    let supabase = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/auth/v1/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": ES_X, "y": ES_Y,
            "kid": "key-1", "alg": "ES256", "use": "sig"
        }]})))
        .expect(1..=2)
        .mount(&supabase)
        .await;
    let jwks = revpilot_store::auth::jwks::Jwks::new(
        format!("{}/auth/v1/.well-known/jwks.json", supabase.uri())
            .parse()
            .unwrap(),
        Some(issuer.to_owned()),
    )
    .unwrap();
    let w = world_with(|s| {
        s.sessions.jwt = None;
        s.sessions.jwks = Some(Arc::new(jwks));
    })
    .await;
    let user = UserId(Uuid::new_v4());
    let exp = now().timestamp() + 3_600;
    let claims = |iss: &str, aud: &str, exp: i64| {
        json!({"sub": user.to_string(), "aud": aud, "exp": exp, "iss": iss,
               "email": "supa@example.com", "role": "authenticated"})
    };
    let es = |kid: &str, pem: &str, claims: Value| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        encode(&header, &claims, &EncodingKey::from_ec_der(&der(pem))).unwrap()
    };
    let good = es("key-1", ES_KEY, claims(issuer, "authenticated", exp));
    let (status, usage) = w.call("GET", "/api/usage/current", Some(&good), None).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["user"], json!(user));

    // The public key's coordinates as an HMAC secret: the algorithm-confusion attack.
    let confused = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("key-1".into());
        encode(
            &header,
            &claims(issuer, "authenticated", exp),
            &EncodingKey::from_secret(format!("{ES_X}{ES_Y}").as_bytes()),
        )
        .unwrap()
    };
    let refused = [
        (
            "another key, same kid",
            es("key-1", OTHER_ES_KEY, claims(issuer, "authenticated", exp)),
        ),
        (
            "unknown kid",
            es("key-9", ES_KEY, claims(issuer, "authenticated", exp)),
        ),
        (
            "another issuer",
            es(
                "key-1",
                ES_KEY,
                claims("https://evil.example", "authenticated", exp),
            ),
        ),
        (
            "wrong audience",
            es("key-1", ES_KEY, claims(issuer, "anon", exp)),
        ),
        (
            "expired",
            es(
                "key-1",
                ES_KEY,
                claims(issuer, "authenticated", now().timestamp() - 3_600),
            ),
        ),
        ("HS256 with the public key", confused),
        (
            "alg none",
            forged(claims(issuer, "authenticated", exp), "", "none"),
        ),
    ];
    for (case, token) in refused {
        let (status, body) = w
            .call("GET", "/api/usage/current", Some(&token), None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
    }
    // Without JWT_SECRET there are no built-in accounts.
    let (status, body) = w
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"email": "supa@example.com", "password": "long enough password"})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

/// An optional `(content type, body)`.
type FormBody = Option<(&'static str, String)>;

/// Rows in the tables a forged request could change.
async fn footprint(store: &SqliteStore) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "usage_events",
        "insights",
        "user_credentials",
        "user_profiles",
        "oauth_states",
    ] {
        counts.push(
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(store.pool())
                .await
                .unwrap(),
        );
    }
    counts
}

#[tokio::test]
async fn every_form_and_route_refuses_other_sites_and_changes_nothing() {
    let w = world().await;
    let (user, conn) = w.connected("acct_csrf").await;
    w.store.set_last_synced(conn, now()).await.unwrap();
    let token = w.token(user);
    let creds = json!({"email": "mallory@example.com", "password": "mallory's password"});
    let (status, _) = w
        .call("POST", "/api/auth/signup", None, Some(creds.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let form = "application/x-www-form-urlencoded";
    let json_type = "application/json";
    let routes: Vec<(&str, String, FormBody)> = vec![
        (
            "POST",
            "/login".into(),
            Some((
                form,
                "email=mallory%40example.com&password=mallory%27s+password".into(),
            )),
        ),
        (
            "POST",
            "/signup".into(),
            Some((
                form,
                "email=victim2%40example.com&password=a+long+password".into(),
            )),
        ),
        ("POST", "/logout".into(), Some((form, String::new()))),
        (
            "POST",
            "/insights".into(),
            Some((form, format!("connection={conn}"))),
        ),
        (
            "POST",
            "/pricing/checkout".into(),
            Some((form, "tier=professional".into())),
        ),
        (
            "POST",
            "/api/auth/login".into(),
            Some((json_type, creds.to_string())),
        ),
        (
            "POST",
            "/api/auth/signup".into(),
            Some((
                json_type,
                json!({"email": "victim3@example.com", "password": "a long password"}).to_string(),
            )),
        ),
        ("POST", format!("/api/insights?connectionId={conn}"), None),
        (
            "POST",
            "/api/scenarios".into(),
            Some((
                json_type,
                json!({"connectionId": conn.to_string(), "priceChangePct": "10"}).to_string(),
            )),
        ),
        (
            "POST",
            "/api/create-checkout".into(),
            Some((json_type, json!({"tier": "professional"}).to_string())),
        ),
        ("GET", "/api/stripe/connect".into(), None),
    ];
    // Another site, another port of the same host (same-site), an opaque origin, and a browser
    // that says so only in `Sec-Fetch-Site`.
    let forgeries: Vec<Vec<(&str, String)>> = vec![
        vec![("origin", "https://evil.example".into())],
        vec![("origin", "http://127.0.0.1:3001".into())],
        vec![("origin", "null".into())],
        vec![("sec-fetch-site", "cross-site".into())],
        vec![
            ("sec-fetch-site", "same-site".into()),
            ("origin", "http://127.0.0.1:3001".into()),
        ],
    ];
    let before = footprint(&w.store).await;
    for (method, uri, body) in &routes {
        for forged in &forgeries {
            let mut headers = forged.clone();
            headers.push(("cookie", format!("revpilot_session={token}")));
            let (status, response_headers, bytes) =
                w.send_with(method, uri, &headers, body.clone()).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri} {forged:?}");
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["error"]["code"], "cross_origin");
            assert!(
                !response_headers.contains_key("set-cookie"),
                "{method} {uri}: no session given or taken"
            );
        }
    }
    assert_eq!(footprint(&w.store).await, before, "nothing changed");
    // The forged logouts did not end the session.
    assert_eq!(
        w.call("GET", "/api/usage/current", Some(&token), None)
            .await
            .0,
        StatusCode::OK
    );
    // The forged signups made no account.
    let (status, _) = w
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"email": "victim2@example.com", "password": "a long password"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The same forms from the app's own pages work.
    let (status, headers, _) = w
        .page(
            "POST",
            "/login",
            None,
            Some("email=mallory%40example.com&password=mallory%27s+password"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers.contains_key("set-cookie"));
    let (status, _, _) = w
        .page(
            "POST",
            "/insights",
            Some(&token),
            Some(&format!("connection={conn}")),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    // Webhooks are other servers' calls: an Origin does not matter there (the signature does).
    let (status, _, _) = w
        .send_with(
            "POST",
            "/api/webhooks/stripe-billing",
            &[("origin", "https://evil.example".into())],
            Some((json_type, "{}".into())),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn every_page_carries_the_security_headers() {
    let w = world().await;
    let (user, conn) = w.connected("acct_headers").await;
    w.store.set_last_synced(conn, now()).await.unwrap();
    let token = w.token(user);
    let mut seen = Vec::new();
    for path in [
        "/login",
        "/signup",
        "/dashboard",
        "/insights",
        "/usage",
        "/pricing",
        "/",
        "/no-such-page",
    ] {
        for session in [None, Some(token.as_str())] {
            seen.push((path.to_owned(), w.page("GET", path, session, None).await.1));
        }
    }
    for (path, (method, body)) in [
        ("/api/usage/current", ("GET", None)),
        ("/healthz", ("GET", None)),
        ("/metrics", ("GET", None)),
        (
            "/login",
            (
                "POST",
                Some(("application/x-www-form-urlencoded", "email=x".to_owned())),
            ),
        ),
    ] {
        seen.push((
            path.to_owned(),
            w.send(
                method,
                path,
                Some(("authorization", format!("Bearer {token}"))),
                body,
            )
            .await
            .1,
        ));
    }
    for (path, headers) in seen {
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "same-origin", "{path}");
    }
}

#[tokio::test]
async fn the_session_cookie_is_secure_when_the_app_is_served_over_https() {
    for (app_url, secure) in [
        ("https://app.example/", true),
        ("http://127.0.0.1:3000/", false),
    ] {
        let w = world_with(|s| s.app_url = url::Url::parse(app_url).unwrap()).await;
        let origin = app_url.trim_end_matches('/').to_owned();
        let (status, headers, _) = w
            .send_with(
                "POST",
                "/signup",
                &[("origin", origin.clone())],
                Some((
                    "application/x-www-form-urlencoded",
                    "email=sec%40example.com&password=a+long+password".into(),
                )),
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{app_url}");
        let cookie = headers["set-cookie"].to_str().unwrap();
        assert_eq!(cookie.contains("; Secure"), secure, "{cookie}");
        let token = cookie
            .strip_prefix("revpilot_session=")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let (_, headers, _) = w
            .send_with(
                "POST",
                "/logout",
                &[
                    ("origin", origin),
                    ("cookie", format!("revpilot_session={token}")),
                ],
                None,
            )
            .await;
        let cleared = headers["set-cookie"].to_str().unwrap();
        assert!(cleared.contains("Max-Age=0"));
        assert_eq!(cleared.contains("; Secure"), secure, "{cleared}");
    }
}

#[tokio::test]
async fn logging_out_ends_the_session_on_every_server_of_the_store() {
    let w = world().await;
    let (status, headers, _) = w
        .page(
            "POST",
            "/signup",
            None,
            Some("email=leave%40example.com&password=a+long+password"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers["set-cookie"].to_str().unwrap();
    let token = cookie
        .strip_prefix("revpilot_session=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    // A second session of the same user, issued in the same second (the clock is fixed).
    let (status, body) = w
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"email": "leave@example.com", "password": "a long password"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let other = body["token"].as_str().unwrap().to_owned();
    assert_ne!(other, token);
    for t in [&token, &other] {
        assert_eq!(
            w.call("GET", "/api/usage/current", Some(t), None).await.0,
            StatusCode::OK
        );
    }
    let (status, headers, _) = w.page("POST", "/logout", Some(&token), Some("")).await;
    assert_eq!(
        (status, &headers["location"]),
        (StatusCode::SEE_OTHER, &"/login".parse().unwrap())
    );
    // The same token, as a bearer or a cookie, is refused from now on...
    assert_eq!(
        w.call("GET", "/api/usage/current", Some(&token), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (status, headers, _) = w.page("GET", "/dashboard", Some(&token), None).await;
    assert_eq!(
        (status, &headers["location"]),
        (StatusCode::SEE_OTHER, &"/login".parse().unwrap())
    );
    // ...and the other session goes on.
    assert_eq!(
        w.call("GET", "/api/usage/current", Some(&other), None)
            .await
            .0,
        StatusCode::OK
    );
    // Another server on the same database (behind the same balancer) refuses it too, and a
    // page of the other session still answers there.
    let mut second = AppState::new(w.store.clone(), None);
    let t = now();
    second.app.clock = Arc::new(move || t);
    second.sessions.jwt = Some(Arc::new(w.jwt.clone()));
    let second = app(second);
    for (t, expected) in [(&token, StatusCode::UNAUTHORIZED), (&other, StatusCode::OK)] {
        let response = second
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/api/usage/current")
                    .header("authorization", format!("Bearer {t}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), expected);
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_budget_and_otherwise_the_header_is_ignored()
{
    let proxy: std::net::IpAddr = [10, 0, 0, 1].into();
    let w = world_with(|s| s.trusted_proxies = vec![proxy]).await;
    let login = |peer: [u8; 4], forwarded: &str, email: String| {
        let mut req = Request::builder()
            .method("POST")
            .uri("/api/auth/login")
            .header("content-type", "application/json")
            .header("x-forwarded-for", forwarded)
            .body(Body::from(
                json!({"email": email, "password": "some password"}).to_string(),
            ))
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                peer, 40_000,
            ))));
        let router = w.router.clone();
        async move { router.oneshot(req).await.unwrap().status() }
    };
    let budget = revpilot_server::ATTEMPTS_PER_MINUTE;
    // One client behind the proxy spends its budget (the left of the header is its own say).
    for i in 0..budget {
        let status = login(
            [10, 0, 0, 1],
            "1.2.3.4, 203.0.113.5",
            format!("a{i}@example.com"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        login(
            [10, 0, 0, 1],
            "9.9.9.9, 203.0.113.5",
            "a-last@example.com".into()
        )
        .await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same proxy is not locked out.
    assert_eq!(
        login([10, 0, 0, 1], "203.0.113.6", "b@example.com".into()).await,
        StatusCode::UNAUTHORIZED
    );
    // A peer that is no trusted proxy cannot pick its address with the header.
    for i in 0..budget {
        let status = login(
            [10, 0, 0, 9],
            &format!("198.51.100.{i}"),
            format!("c{i}@example.com"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        login([10, 0, 0, 9], "198.51.100.200", "c-last@example.com".into()).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}
