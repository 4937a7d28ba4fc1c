//! The provider against fakellm (PyPI), an OpenAI-compatible fake server started from the
//! virtualenv `scripts/test` creates: the happy path, and a forced 429 that ends in the local
//! narrative.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use revpilot_ai::{OpenAiConfig, OpenAiProvider};
use revpilot_core::billing::Catalog;
use revpilot_core::insights::analyze;
use revpilot_core::insights::narrative::{
    InsightRequest, LlmError, LlmProvider, generate, local_narrative, validate,
};
use revpilot_core::metrics::Engine;
use revpilot_core::ports::{Tier, UserId, UserStore};
use revpilot_core::synth::{SynthConfig, generate as synth};
use revpilot_core::testing::MemoryStore;
use revpilot_core::{Currency, Rules};
use serde_json::json;
use uuid::Uuid;

struct FakeLlm {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fakellm with two rules: model `revpilot-happy` answers `content`; `revpilot-429` is
/// rate-limited.
fn start(content: &str) -> Option<FakeLlm> {
    let Ok(venv) = std::env::var("REVPILOT_TEST_VENV") else {
        eprintln!(
            "skipped: REVPILOT_TEST_VENV is not set (scripts/test creates the virtualenv and sets it)"
        );
        return None;
    };
    let dir = tempfile::TempDir::new().unwrap();
    // A JSON string is a valid YAML double-quoted scalar.
    let yaml = format!(
        "version: 1\ndefaults:\n  fallback: deterministic_echo\nrules:\n  - name: happy\n    when:\n      model_matches: \"revpilot-happy\"\n    respond:\n      content: {}\n  - name: limited\n    when:\n      model_matches: \"revpilot-429\"\n    respond:\n      status: 429\n      error: \"Rate limit exceeded (mock)\"\n",
        serde_json::to_string(content).unwrap()
    );
    let config = dir.path().join("fakellm.yaml");
    std::fs::write(&config, yaml).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(format!("{venv}/bin/fakellm"))
        .args(["serve", "--port", &port.to_string(), "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fakellm is in the virtualenv");
    let f = FakeLlm {
        child,
        base: format!("http://127.0.0.1:{port}/v1"),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "fakellm did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(f)
}

#[tokio::test]
async fn fakellm_answers_and_its_429_falls_back_to_the_local_narrative() {
    let config = SynthConfig::new(200, 5);
    let account = synth(&config);
    let engine = Engine::new(&account, Rules::default(), Currency::USD);
    let analysis = analyze(&engine, &account, config.end()).unwrap();
    let facts = analysis.facts();
    let mut expected = local_narrative(&facts);
    for i in &mut expected {
        i.title = format!("{} (fakellm)", i.title);
    }
    let content = json!({ "insights": expected }).to_string();
    let Some(fake) = start(&content) else { return };

    let provider = |model: &str| {
        let mut c = OpenAiConfig::new(&fake.base, model).unwrap();
        c.min_delay = Duration::from_millis(10);
        OpenAiProvider::new(c).unwrap()
    };
    let happy = provider("revpilot-happy");
    let got = happy.narrate(&facts).await.unwrap();
    validate(&got, &facts).unwrap();
    assert_eq!(got, expected);

    let limited = provider("revpilot-429");
    let err = limited.narrate(&facts).await.unwrap_err();
    assert_eq!(
        err,
        LlmError::Unavailable("the model server answered 429".into())
    );

    let store = MemoryStore::default();
    let user = UserId(Uuid::new_v4());
    let now = Utc.with_ymd_and_hms(2025, 1, 5, 0, 0, 0).unwrap();
    let catalog = Catalog::default();
    store
        .create_user(
            user,
            None,
            Tier::Professional,
            catalog.plan(Tier::Professional).limits,
            now,
        )
        .await
        .unwrap();
    let g = generate(
        &store,
        &catalog,
        &limited,
        InsightRequest::new(user, &analysis, Uuid::new_v4(), now),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert!(g.fallback.unwrap().contains("429"));
    assert!(g.records.iter().all(|r| r.provider == "local"));
    let g = generate(
        &store,
        &catalog,
        &happy,
        InsightRequest::new(user, &analysis, Uuid::new_v4(), now),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(g.fallback, None);
    assert!(g.records.iter().all(|r| r.provider == "revpilot-happy"));
}
