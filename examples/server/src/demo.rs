//! Demo mode: a user and a connection whose account is the synthetic generator's two years of a
//! SaaS (trials, coupons, upgrades, churn, reactivations, EUR and USD customers), so a newcomer
//! sees a populated dashboard at once, with no Stripe key.
//!
//! The account is pinned in [`revpilot_stripe::accounts::Accounts`]: nothing syncs it, and no Stripe object
//! is stored for it.

use std::sync::Arc;

use chrono::{Datelike, Months, NaiveDate};
use revpilot_core::Currency;
use revpilot_core::ports::{NewConnection, Tokens};
use revpilot_core::synth::{SynthConfig, fx_table, generate};
use secrecy::SecretString;

use crate::auth::{AuthFailure, ClientAddr, Credentials, create_account};
use crate::{AppState, DemoLogin};
use revpilot_stripe::accounts::Loaded;

/// The demo user's email.
pub const DEMO_EMAIL: &str = "demo@revpilot.example";

/// The synthetic account: `customers` customers over the 24 months up to `today`'s month.
pub fn demo_config(customers: usize, today: NaiveDate) -> SynthConfig {
    let start = today
        .with_day(1)
        .and_then(|d| d.checked_sub_months(Months::new(23)))
        .unwrap_or(today);
    SynthConfig {
        start,
        months: 24,
        ..SynthConfig::new(customers, 2026)
    }
}

/// Creates the demo user (with `password`) and its connection, and pins the synthetic account
/// to it; sets `state.demo`.
///
/// # Errors
/// What the store said, in words.
pub async fn seed(
    state: &mut AppState,
    customers: usize,
    password: &str,
) -> Result<DemoLogin, String> {
    let now = (state.clock)();
    let (user, email) = create_account(
        state,
        ClientAddr(None),
        Credentials {
            email: DEMO_EMAIL.to_owned(),
            password: password.to_owned(),
        },
    )
    .await
    .map_err(|f: AuthFailure| f.parts().2.to_owned())?;
    let connection = state
        .store
        .save_connection(
            NewConnection {
                user,
                stripe_account_id: "acct_demo".to_owned(),
                business_name: Some("Demo SaaS (synthetic data)".to_owned()),
                currency: Some("usd".to_owned()),
                tokens: Tokens {
                    access_token: SecretString::from("demo: no Stripe account".to_owned()),
                    refresh_token: None,
                },
            },
            now,
        )
        .await
        .map_err(|e| e.to_string())?;
    state
        .store
        .set_last_synced(connection.id, now)
        .await
        .map_err(|e| e.to_string())?;
    let config = demo_config(customers, now.date_naive());
    let loaded = Loaded::new(generate(&config), Currency::USD, Some(fx_table(&config)))
        .with_as_of(Some(now));
    state.accounts.pin(user, connection.id, Arc::new(loaded));
    let login = DemoLogin {
        user,
        email,
        password: password.to_owned(),
    };
    state.demo = Some(login.clone());
    Ok(login)
}
