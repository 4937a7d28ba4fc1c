//! Demo mode: a user and a connection whose account is the synthetic generator's two years of a
//! SaaS (trials, coupons, upgrades, churn, reactivations, EUR and USD customers), so a newcomer
//! sees a populated dashboard at once, with no Stripe key ([`revpilot_stripe::App::seed_demo`]).

use revpilot_store::auth::Session;

use crate::{AppState, DemoLogin};

/// The demo user's email.
pub const DEMO_EMAIL: &str = "demo@revpilot.example";

/// Creates the demo user (with `password`) and its connection with the synthetic account;
/// sets `state.demo`.
///
/// # Errors
/// The refusal's message (a store failure's cause is logged).
pub async fn seed(
    state: &mut AppState,
    customers: usize,
    password: &str,
) -> Result<DemoLogin, String> {
    let (app, now) = (&state.app, (state.app.clock)());
    let session = state.sessions.sign_up(
        app.store.as_ref(),
        &app.catalog,
        None,
        DEMO_EMAIL,
        password.to_owned(),
        now,
    );
    let Session { user, email, .. } = session.await.map_err(|r| r.message.to_string())?;
    let seeded = app.seed_demo(user, customers).await;
    seeded.map_err(|r| r.message.to_string())?;
    let password = password.to_owned();
    let login = DemoLogin {
        user,
        email,
        password,
    };
    state.demo = Some(login.clone());
    Ok(login)
}
