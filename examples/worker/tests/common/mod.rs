//! What the worker's test files share: child processes, the binaries, a small fake Stripe
//! account, a connection, a slow Stripe.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use chrono::Utc;
use revpilot_core::ports::{ConnectionId, Limits, NewConnection, Tier, Tokens, UserId};
use revpilot_stripe::fake::FakeStripe;
use revpilot_worker::Store;
use secrecy::SecretString;
use serde_json::json;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The stores' encryption key in tests.
pub(crate) const KEY: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Child processes, killed on drop.
pub(crate) struct Processes(pub(crate) Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server binary next to this package's worker binary. `cargo test --workspace` builds it;
/// when it is missing or older than a source it is built from (`cargo test -p revpilot-worker`
/// after an edit), cargo builds it first, so a test never runs a stale server.
pub(crate) fn server_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let worker = PathBuf::from(env!("CARGO_BIN_EXE_revpilot-worker"));
            let server = worker.with_file_name("revpilot-server");
            let built = std::fs::metadata(&server).and_then(|m| m.modified()).ok();
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
            let sources = [
                "examples/server",
                "examples/worker/src",
                "revpilot-core/src",
                "revpilot-stripe/src",
                "revpilot-store/src",
                "revpilot-store/migrations",
                "revpilot-ai/src",
            ];
            let stale = match built {
                None => true,
                Some(built) => sources.iter().any(|d| newer_than(&root.join(d), built)),
            };
            if stale {
                let mut build = std::process::Command::new(env!("CARGO"));
                build.args([
                    "build",
                    "--quiet",
                    "-p",
                    "revpilot-server",
                    "--bin",
                    "revpilot-server",
                ]);
                if worker
                    .parent()
                    .and_then(|d| d.file_name())
                    .is_some_and(|n| n == "release")
                {
                    build.arg("--release");
                }
                assert!(
                    build.status().expect("cargo runs").success(),
                    "cargo build -p revpilot-server failed"
                );
            }
            assert!(server.exists(), "{} is missing", server.display());
            server
        })
        .clone()
}

/// Whether a file under `dir` was modified after `than`.
fn newer_than(dir: &std::path::Path, than: std::time::SystemTime) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            newer_than(&path, than)
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > than)
        }
    })
}

/// A fake Stripe holding one small account (`customers` customers), for every token.
pub(crate) async fn stripe(customers: i64) -> FakeStripe {
    let fake = FakeStripe::start(None).await;
    fake.set_object(
        "/v1/account",
        json!({"id": "acct_1", "object": "account", "default_currency": "usd"}),
    );
    fake.set(
        "/v1/customers",
        (0..customers)
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
    fake
}

/// A Stripe whose `GET /v1/account` takes `delay`, with every list empty.
pub(crate) async fn slow_stripe(account: &str, delay: Duration) -> MockServer {
    let slow = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/account"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": account, "object": "account"}))
                .set_delay(delay),
        )
        .mount(&slow)
        .await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .mount(&slow)
        .await;
    slow
}

/// A new starter user with a connection of `account` (token `sk_token_{account}`).
pub(crate) async fn connection(store: &dyn Store, account: &str) -> (UserId, ConnectionId) {
    let user = UserId(Uuid::new_v4());
    store
        .create_user(user, None, Tier::Starter, Limits::default(), Utc::now())
        .await
        .unwrap();
    let c = store
        .save_connection(
            NewConnection {
                user,
                stripe_account_id: account.to_owned(),
                business_name: None,
                currency: Some("usd".into()),
                tokens: Tokens {
                    access_token: SecretString::from(format!("sk_token_{account}")),
                    refresh_token: None,
                },
            },
            Utc::now(),
        )
        .await
        .unwrap();
    (user, c.id)
}
