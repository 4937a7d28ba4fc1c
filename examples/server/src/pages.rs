//! The dashboard: server-rendered HTML (askama, auto-escaped; every Stripe-sourced string is
//! untrusted) with inline SVG charts, over the same functions as the JSON API. A page without a
//! valid session redirects to `/login`. Forms post with the session cookie (`SameSite=Lax`, and
//! `Secure` on https); every post must also come from the app's own origin
//! ([`crate::guard::cross_origin`]), so a page of another site, or of another port of the same
//! host, cannot post them on a user's behalf, nor log a user into another account.

use askama::Template;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{Datelike, Months, NaiveDate};
use revpilot_core::Currency;
use revpilot_core::insights::Unit;
use revpilot_core::metrics::{Granularity, SeriesRow};
use revpilot_core::params::{DashboardQuery, GenerateForm, UpgradeForm};
use revpilot_core::ports::{Connection, ConnectionId, InsightRecord, Tier, UserId};
use rust_decimal::Decimal;

use crate::auth::{AuthUser, ClientAddr, Credentials};
use crate::charts::{self, BarChart, HEIGHT, HeatMap, LineChart, WIDTH};
use crate::{AppState, Shared, api, refused};
use revpilot_core::guard::{Refusal, RefusalKind};
use revpilot_store::auth::Session;

/// A 500 whose message says nothing of the cause (logged instead).
fn internal(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "internal error");
    refused(&Refusal::internal())
}

fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => internal(&e),
    }
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

fn percent(rate: Option<Decimal>) -> Option<Decimal> {
    rate.map(|r| (r * Decimal::ONE_HUNDRED).round_dp(1))
}

// ----- sign-up, log-in, log-out -----

#[derive(Template)]
#[template(path = "auth.html")]
struct AuthPage {
    signed_in: bool,
    signup: bool,
    error: Option<String>,
    email: String,
    demo: Option<(String, String)>,
}

fn auth_page(state: &AppState, signup: bool, email: String, error: Option<String>) -> AuthPage {
    AuthPage {
        signed_in: false,
        signup,
        error,
        email,
        demo: state
            .demo
            .as_ref()
            .map(|d| (d.email.clone(), d.password.clone())),
    }
}

/// `GET /login`.
pub(crate) async fn login_form(State(state): Shared) -> Response {
    render(&auth_page(&state, false, String::new(), None))
}

/// `GET /signup`.
pub(crate) async fn signup_form(State(state): Shared) -> Response {
    render(&auth_page(&state, true, String::new(), None))
}

/// A session cookie and a redirect to the dashboard.
fn signed_in(state: &AppState, session: &Session) -> Response {
    let cookie = session.cookie(state.https());
    let to = (header::LOCATION, "/dashboard".to_owned());
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), to]).into_response()
}

fn form_failed(state: &AppState, signup: bool, email: String, f: &Refusal) -> Response {
    let mut r = render(&auth_page(
        state,
        signup,
        email,
        Some(f.message.to_string()),
    ));
    *r.status_mut() = crate::status(f.kind);
    r
}

/// `POST /login` (form).
pub(crate) async fn login_submit(
    State(state): Shared,
    client: ClientAddr,
    Form(c): Form<Credentials>,
) -> Response {
    let email = c.email.clone();
    match crate::auth::enter(&state, client, c, false).await {
        Ok(session) => signed_in(&state, &session),
        Err(f) => form_failed(&state, false, email, &f),
    }
}

/// `POST /signup` (form).
pub(crate) async fn signup_submit(
    State(state): Shared,
    client: ClientAddr,
    Form(c): Form<Credentials>,
) -> Response {
    let email = c.email.clone();
    match crate::auth::enter(&state, client, c, true).await {
        Ok(session) => signed_in(&state, &session),
        Err(f) => form_failed(&state, true, email, &f),
    }
}

/// `POST /logout`: ends the session on the server (its token is refused from now on) and in the
/// browser.
pub(crate) async fn logout(State(state): Shared, headers: header::HeaderMap) -> Response {
    if let Some(token) = crate::auth::presented(&headers) {
        let store = state.app.store.as_ref();
        state
            .sessions
            .log_out(store, token, (state.app.clock)())
            .await;
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, Session::clear_cookie(state.https())),
            (header::LOCATION, "/login".to_owned()),
        ],
    )
        .into_response()
}

/// `GET /demo`: in demo mode, a session of the demo user (whose password the server printed).
pub(crate) async fn demo_login(State(state): Shared) -> Response {
    match &state.demo {
        Some(d) => match state
            .sessions
            .session_for(d.user, &d.email, (state.app.clock)())
        {
            Ok(session) => signed_in(&state, &session),
            Err(_) => to_login(),
        },
        None => crate::error(StatusCode::NOT_FOUND, "not_found", "not in demo mode"),
    }
}

// ----- dashboard -----

struct ConnView {
    id: ConnectionId,
    name: String,
    selected: bool,
}

struct Kpi {
    key: &'static str,
    label: &'static str,
    value: String,
    display: String,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    signed_in: bool,
    upgraded: bool,
    connections: Vec<ConnView>,
    connection: String,
    business: String,
    last_sync: String,
    /// The instant the figures run to, when known; rows of a period ending after it are partial.
    data_as_of: Option<String>,
    sync_status: Option<String>,
    /// The page refreshes itself (a first sync is queued or running).
    pending: bool,
    /// Before the first successful sync: what the first sync is doing, or why it stopped and
    /// what to do.
    first_sync: Option<FirstSync>,
    kpis: Vec<Kpi>,
    as_of: NaiveDate,
    currency: String,
    line: Option<LineChart>,
    bars: Option<BarChart>,
    heat: Option<HeatMap>,
    width: f64,
    height: f64,
}

/// The state of an account that has no data yet, as the dashboard says it.
struct FirstSync {
    /// `queued`, `running`, `failed` or `paused`.
    status: &'static str,
    /// One sentence: what is happening.
    headline: String,
    /// The stored reason of a failed or paused run, as shown.
    reason: Option<String>,
    /// What the user can do.
    action: &'static str,
    /// A link for it: (href, text).
    link: Option<(&'static str, &'static str)>,
}

/// Longest stored reason shown, in characters.
const MAX_REASON: usize = 300;

/// A run's stored reason as the dashboard shows it: a storage error is not described (it is
/// RevPilot's, and may hold SQL), addresses are left out (a proxy's URL is configuration, not
/// the user's business), and it is cut at [`MAX_REASON`] characters.
fn shown_reason(reason: &str) -> String {
    if reason.starts_with("storage") {
        return "RevPilot could not store the data".to_owned();
    }
    let text = reason
        .split(' ')
        .map(|w| if w.contains("://") { "[address]" } else { w })
        .collect::<Vec<_>>()
        .join(" ");
    if text.chars().count() > MAX_REASON {
        format!("{}...", text.chars().take(MAX_REASON).collect::<String>())
    } else {
        text
    }
}

/// What the dashboard says before the first successful sync, from the latest run.
fn first_sync(run: Option<&revpilot_core::ports::SyncRun>) -> FirstSync {
    use revpilot_core::ports::SyncStatus;
    let reason = run
        .and_then(|r| r.outcome.error.as_deref())
        .map(shown_reason);
    match run.map(|r| r.status) {
        None => FirstSync {
            status: "queued",
            headline: "The first sync of this account is queued.".to_owned(),
            reason: None,
            action: "This page refreshes by itself.",
            link: None,
        },
        Some(SyncStatus::Running | SyncStatus::Succeeded) => FirstSync {
            status: "running",
            headline: "The first sync of this account is running.".to_owned(),
            reason: None,
            action: "This page refreshes by itself.",
            link: None,
        },
        Some(SyncStatus::Failed) => FirstSync {
            status: "failed",
            headline: "The first sync of this account failed.".to_owned(),
            reason,
            action: "RevPilot tries again by itself, resuming where it stopped, and syncs every \
                     day. If it keeps failing, connect the Stripe account again.",
            link: Some(("/api/stripe/connect", "Connect Stripe again")),
        },
        Some(SyncStatus::Paused) => FirstSync {
            status: "paused",
            headline: "The first sync of this account is paused: your plan's transaction \
                       volume for this period is used up."
                .to_owned(),
            reason,
            action: "Upgrade to go on now; otherwise it resumes at the start of the next period.",
            link: Some(("/pricing", "See the plans")),
        },
    }
}

/// The KPI tiles, from the last row of the default `/api/metrics` series (90 days, daily).
fn kpis(row: &SeriesRow, currency: Currency) -> Vec<Kpi> {
    let money_kpi = |key, label, v: Option<Decimal>| Kpi {
        key,
        label,
        value: v.map(|v| currency.round(v).to_string()).unwrap_or_default(),
        display: v.map_or_else(|| "n/a".to_owned(), |v| currency.display(v)),
    };
    let percent_kpi = |key, label, v: Option<Decimal>| Kpi {
        key,
        label,
        value: percent(v).map(|v| v.to_string()).unwrap_or_default(),
        display: percent(v).map_or_else(|| "n/a".to_owned(), |v| format!("{v} %")),
    };
    vec![
        money_kpi("mrr", "MRR", Some(row.mrr)),
        money_kpi("arr", "ARR", Some(row.arr)),
        Kpi {
            key: "customers",
            label: "Customers",
            value: row.total_customers.to_string(),
            display: row.total_customers.to_string(),
        },
        percent_kpi("churn", "Customer churn (30 d)", row.customer_churn_rate),
        money_kpi("arpu", "ARPU", row.arpu),
        money_kpi("ltv", "LTV", row.ltv),
        percent_kpi("nrr", "NRR (12 mo)", row.nrr),
    ]
}

fn first_of_month(d: NaiveDate, months_back: u32) -> NaiveDate {
    d.with_day(1)
        .and_then(|d| d.checked_sub_months(Months::new(months_back)))
        .unwrap_or(d)
}

/// `GET /dashboard[?connection=ID]`.
pub(crate) async fn dashboard(
    State(state): Shared,
    user: Result<AuthUser, Response>,
    Query(q): Query<DashboardQuery>,
) -> Response {
    let Ok(AuthUser(user)) = user else {
        return to_login();
    };
    let all = match state.app.store.connections(user).await {
        Ok(c) => c,
        Err(e) => return internal(&e),
    };
    let active: Vec<&Connection> = all.iter().filter(|c| c.is_active).collect();
    let selected = q
        .connection
        .and_then(|id| active.iter().find(|c| c.id.0 == id))
        .or(active.first())
        .copied();
    let mut page = DashboardPage {
        signed_in: true,
        upgraded: q.upgraded.unwrap_or(false),
        connections: active
            .iter()
            .map(|c| ConnView {
                id: c.id,
                name: c
                    .business_name
                    .clone()
                    .unwrap_or_else(|| c.stripe_account_id.clone()),
                selected: selected.is_some_and(|s| s.id == c.id),
            })
            .collect(),
        connection: String::new(),
        business: String::new(),
        last_sync: "never".to_owned(),
        data_as_of: None,
        sync_status: None,
        pending: false,
        first_sync: None,
        kpis: Vec::new(),
        as_of: state.app.today(),
        currency: String::new(),
        line: None,
        bars: None,
        heat: None,
        width: WIDTH,
        height: HEIGHT,
    };
    let Some(connection) = selected else {
        return render(&page);
    };
    page.connection = connection.id.to_string();
    page.business = connection
        .business_name
        .clone()
        .unwrap_or_else(|| connection.stripe_account_id.clone());
    let run = match state.app.store.last_run(user, connection.id).await {
        Ok(run) => run,
        Err(e) => return internal(&e),
    };
    page.sync_status = run.as_ref().map(|r| r.status.as_str().to_owned());
    let Some(synced) = connection.last_synced_at else {
        let first = first_sync(run.as_ref());
        // Refresh while something is under way; a stopped sync waits for the user.
        page.pending = matches!(first.status, "queued" | "running");
        page.first_sync = Some(first);
        return render(&page);
    };
    page.last_sync = synced.format("%Y-%m-%d %H:%M UTC").to_string();
    let loaded = match state.app.account(user, connection).await {
        Ok(l) => l,
        Err(r) => return refused(&r),
    };
    let currency = loaded.currency;
    page.currency = currency.as_str().to_uppercase();
    page.data_as_of = loaded
        .as_of
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string());
    let to = page.as_of;
    let daily = loaded.series(to - chrono::Duration::days(89), to, Granularity::Day);
    let monthly = loaded.series(first_of_month(to, 23), to, Granularity::Month);
    let (daily, monthly) = match (daily, monthly) {
        (Ok(d), Ok(m)) => (d, m),
        (Err(e), _) | (_, Err(e)) => return internal(&e),
    };
    if let Some(last) = daily.rows.last() {
        page.kpis = kpis(last, currency);
    }
    page.line = Some(charts::mrr_line(&monthly.rows, currency));
    page.bars = Some(charts::movements(&monthly.rows, currency));
    match loaded.cohorts(first_of_month(to, 11), to) {
        Ok(table) => page.heat = Some(charts::cohorts(&table.rows)),
        Err(e) => return internal(&e),
    }
    render(&page)
}

// ----- insights -----

struct InsightView {
    kind: String,
    title: String,
    summary: String,
    figures: Vec<(String, String, String)>,
    provider: String,
    note: Option<String>,
    created: String,
}

#[derive(Template)]
#[template(path = "insights.html")]
struct InsightsPage {
    signed_in: bool,
    error: Option<String>,
    connection: Option<ConnectionId>,
    insights: Vec<InsightView>,
}

fn figure_value(f: &revpilot_core::insights::Figure, currency: Currency) -> String {
    match f.unit {
        Unit::Money => currency.display(f.value),
        Unit::Percent => format!("{} %", f.value),
        Unit::Points => format!("{} points", f.value),
        Unit::Count | Unit::Ratio => f.value.to_string(),
    }
}

fn insight_view(r: &InsightRecord, currency: Currency) -> InsightView {
    InsightView {
        kind: serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        title: r.title.clone(),
        summary: r.summary.clone(),
        figures: r
            .figures
            .iter()
            .map(|f| (f.id.clone(), f.label.clone(), figure_value(f, currency)))
            .collect(),
        provider: r.provider.clone(),
        note: r.note.clone(),
        created: r.created_at.format("%Y-%m-%d %H:%M UTC").to_string(),
    }
}

async fn insights_page(state: &AppState, user: UserId, error: Option<String>) -> Response {
    let connection = match state.app.store.connections(user).await {
        Ok(c) => c.into_iter().find(|c| c.is_active),
        Err(e) => return internal(&e),
    };
    let currency = connection
        .as_ref()
        .map_or(Currency::USD, Connection::reporting_currency);
    let records = match state
        .app
        .store
        .insights(user, connection.as_ref().map(|c| c.id), 20)
        .await
    {
        Ok(r) => r,
        Err(e) => return internal(&e),
    };
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let mut r = render(&InsightsPage {
        signed_in: true,
        error,
        connection: connection.map(|c| c.id),
        insights: records.iter().map(|r| insight_view(r, currency)).collect(),
    });
    if r.status() == StatusCode::OK {
        *r.status_mut() = status;
    }
    r
}

/// `GET /insights`: the newest insights with the figures they rest on.
pub(crate) async fn insights(State(state): Shared, user: Result<AuthUser, Response>) -> Response {
    let Ok(AuthUser(user)) = user else {
        return to_login();
    };
    insights_page(&state, user, None).await
}

/// `POST /insights`: generate, then show them.
pub(crate) async fn generate(
    State(state): Shared,
    user: Result<AuthUser, Response>,
    Form(f): Form<GenerateForm>,
) -> Response {
    let Ok(AuthUser(user)) = user else {
        return to_login();
    };
    match state.app.insights(user, &f.connection).await {
        Ok(_) => Redirect::to("/insights").into_response(),
        Err(r) => {
            let why = match r.kind {
                RefusalKind::PaymentRequired => {
                    "Your plan's AI insights for this period are used up: upgrade on the Pricing page."
                }
                RefusalKind::TooMany => "Too many requests; try again in a minute.",
                RefusalKind::NotFound => "No such connection.",
                _ => "Insights could not be generated; try again.",
            };
            insights_page(&state, user, Some(why.to_owned())).await
        }
    }
}

// ----- usage -----

struct MeterView {
    key: &'static str,
    label: &'static str,
    used: u64,
    limit: String,
    remaining: String,
}

#[derive(Template)]
#[template(path = "usage.html")]
struct UsagePage {
    signed_in: bool,
    tier: String,
    period: String,
    meters: Vec<MeterView>,
    bill: Vec<(String, String)>,
    starter: bool,
}

fn cents(amount: i64, currency: Currency) -> String {
    let digits = currency.minor_digits().unwrap_or(2);
    currency.display(Decimal::new(amount, digits))
}

/// `GET /usage`: meters with used and included amounts, and the bill so far.
pub(crate) async fn usage(State(state): Shared, user: Result<AuthUser, Response>) -> Response {
    let Ok(AuthUser(user)) = user else {
        return to_login();
    };
    let u = match state.app.usage(user).await {
        Ok(u) => u,
        Err(r) => return refused(&r),
    };
    let meter = |key, label, m: &revpilot_core::billing::MeterUsage| MeterView {
        key,
        label,
        used: m.used,
        limit: m
            .limit
            .map_or_else(|| "unlimited".to_owned(), |l| l.to_string()),
        remaining: m
            .remaining
            .map_or_else(|| "unlimited".to_owned(), |l| l.to_string()),
    };
    let c = u.bill.currency;
    render(&UsagePage {
        signed_in: true,
        tier: u.tier.as_str().to_owned(),
        period: format!(
            "{} to {}",
            u.period.start.format("%Y-%m-%d"),
            u.period.end.format("%Y-%m-%d")
        ),
        meters: vec![
            meter("ai_insight", "AI insights", &u.ai_insight),
            meter(
                "transaction_volume",
                "Transactions synced",
                &u.transaction_volume,
            ),
            meter("scenario", "What-if scenarios", &u.scenario),
        ],
        bill: vec![
            ("Plan".to_owned(), cents(u.bill.base, c)),
            (
                format!("AI insight overage ({})", u.bill.ai_insight_overage_units),
                cents(u.bill.ai_insight_overage, c),
            ),
            (
                format!(
                    "Transaction overage ({} blocks of 1,000)",
                    u.bill.transaction_volume_overage_blocks
                ),
                cents(u.bill.transaction_volume_overage, c),
            ),
            ("Total".to_owned(), cents(u.bill.total, c)),
        ],
        starter: u.tier == Tier::Starter,
    })
}

// ----- pricing -----

struct TierView {
    key: &'static str,
    name: String,
    price: String,
    lines: Vec<String>,
    current: bool,
    buyable: bool,
}

#[derive(Template)]
#[template(path = "pricing.html")]
struct PricingPage {
    signed_in: bool,
    error: Option<String>,
    tiers: Vec<TierView>,
}

fn limit_line(limit: Option<u64>, what: &str) -> String {
    match limit {
        Some(n) => format!("{n} {what}"),
        None => format!("Unlimited {what}"),
    }
}

async fn pricing_page(state: &AppState, user: UserId, error: Option<String>) -> Response {
    let current = match state.app.store.user(user).await {
        Ok(p) => p.map_or(Tier::Starter, |p| p.tier),
        Err(e) => return internal(&e),
    };
    let tiers = state
        .app
        .catalog
        .plans()
        .map(|p| {
            let key = p.tier.as_str();
            let mut name = key.to_owned();
            if let Some(first) = name.get_mut(..1) {
                first.make_ascii_uppercase();
            }
            TierView {
                key,
                name,
                price: cents(p.price, Currency::USD),
                lines: vec![
                    limit_line(p.limits.ai_insights.map(u64::from), "AI insights"),
                    limit_line(p.limits.scenarios.map(u64::from), "scenarios"),
                    limit_line(p.limits.transaction_volume, "transactions"),
                    if p.overage {
                        "Overage billed past the included amounts".to_owned()
                    } else {
                        "Hard limits".to_owned()
                    },
                ],
                current: p.tier == current,
                buyable: p.price > 0 && p.stripe_price_id.is_some(),
            }
        })
        .collect();
    let failed = error.is_some();
    let mut r = render(&PricingPage {
        signed_in: true,
        error,
        tiers,
    });
    if failed && r.status() == StatusCode::OK {
        *r.status_mut() = StatusCode::BAD_GATEWAY;
    }
    r
}

/// `GET /pricing`: the tiers, with upgrade buttons to Checkout.
pub(crate) async fn pricing(State(state): Shared, user: Result<AuthUser, Response>) -> Response {
    let Ok(AuthUser(user)) = user else {
        return to_login();
    };
    pricing_page(&state, user, None).await
}

/// `POST /pricing/checkout`: to Stripe Checkout for the chosen tier.
pub(crate) async fn upgrade(
    State(state): Shared,
    user: Result<AuthUser, Response>,
    Form(f): Form<UpgradeForm>,
) -> Response {
    let Ok(AuthUser(user)) = user else {
        return to_login();
    };
    let Some(tier) = f.tier() else {
        return pricing_page(&state, user, Some(format!("unknown plan {:?}", f.tier))).await;
    };
    match state
        .app
        .checkout(user, tier, &api::return_urls(&state))
        .await
    {
        Ok(session) => match session.url {
            Some(url) => Redirect::to(&url).into_response(),
            None => pricing_page(&state, user, Some("Stripe gave no checkout URL".into())).await,
        },
        Err(_) => {
            pricing_page(
                &state,
                user,
                Some("The checkout could not be started; try again.".to_owned()),
            )
            .await
        }
    }
}
