//! Serves [`revpilot_embed::router`] beside a route of "your own app", configured from the
//! environment: `DATABASE_URL` (a SQLite file), `REVPILOT_ENCRYPTION_KEY`, `STRIPE_CLIENT_ID`,
//! `STRIPE_SECRET_KEY`, `STRIPE_WEBHOOK_SECRET`, `BIND` (default `127.0.0.1:3000`).

use std::sync::Arc;

use revpilot_embed::{Revpilot, router};
use revpilot_store::{KeyRing, SqliteStore};
use revpilot_stripe::client::{Client, ClientConfig};
use revpilot_stripe::connect::{Connect, ConnectConfig};
use revpilot_stripe::{billing::WebhookConfig, jobs::Runner};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let keys = KeyRing::parse(&env("REVPILOT_ENCRYPTION_KEY")?)?;
    let store = Arc::new(SqliteStore::connect(&env("DATABASE_URL")?, keys).await?);
    let secret = secrecy::SecretString::from(env("STRIPE_SECRET_KEY")?);
    let connect = ConnectConfig::new(env("STRIPE_CLIENT_ID")?, secret.clone());
    let mut runner = Runner::new(store.clone(), "embed");
    runner.billing = Some(Client::new(ClientConfig::new(secret))?);
    let revpilot = Revpilot {
        connect: Connect::new(connect, store.clone(), store.clone())?,
        store,
        runner,
        billing_webhook: WebhookConfig::new(env("STRIPE_WEBHOOK_SECRET")?.into(), false),
    };
    let yours = axum::routing::get(|| async { "your app" });
    let app = axum::Router::new()
        .route("/", yours)
        .nest("/revpilot", router(revpilot));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".into());
    axum::serve(tokio::net::TcpListener::bind(&bind).await?, app).await?;
    Ok(())
}
