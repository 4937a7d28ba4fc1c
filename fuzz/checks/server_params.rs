//! The server's query and form parsers: arbitrary bytes read the way axum's `Query` and `Form`
//! read them (`serde_urlencoded`) into each type the routes and pages take, then the checks the
//! handlers run and what they run next on a request that passes: the metric series for the
//! range, the scenario projection for its parameters. A 400 is fine, a panic is not.

use std::sync::OnceLock;

use chrono::NaiveDate;
use revpilot_core::insights::scenario::{self, Rates, Scenario};
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest, SeriesRow};
use revpilot_core::params::{
    DashboardQuery, GenerateForm, InsightsQuery, MetricsQuery, UpgradeForm, address_list,
    client_behind, client_key, connection_id,
};
use revpilot_core::{Account, Currency, Rules};

/// A small account with history, so a series does real work.
const ACCOUNT: &str = r#"{
  "customers": [{"id": "cus_1", "created": "2024-01-01T00:00:00Z"},
                {"id": "cus_2", "created": "2024-03-10T00:00:00Z"}],
  "subscriptions": [{
    "id": "sub_1", "customer": "cus_1", "currency": "usd", "created": "2024-01-01T00:00:00Z",
    "statuses": [{"at": "2024-01-01T00:00:00Z", "status": "active"}],
    "items": [{"price": {"id": "price_pro", "unit_amount": "2900", "interval": "month"},
               "quantity": 2, "from": "2024-01-01T00:00:00Z"}]
  }, {
    "id": "sub_2", "customer": "cus_2", "currency": "usd", "created": "2024-03-10T00:00:00Z",
    "statuses": [{"at": "2024-03-10T00:00:00Z", "status": "active"},
                 {"at": "2024-09-01T00:00:00Z", "status": "canceled"}],
    "items": [{"price": {"id": "price_biz", "unit_amount": "99000", "interval": "year"},
               "quantity": 1, "from": "2024-03-10T00:00:00Z"}]
  }]
}"#;

fn account() -> Option<&'static Account> {
    static ACCOUNT_: OnceLock<Option<Account>> = OnceLock::new();
    ACCOUNT_
        .get_or_init(|| serde_json::from_str(ACCOUNT).ok())
        .as_ref()
}

/// The monthly rows the scenario route projects from (its last 120 days).
fn monthly_rows() -> &'static [SeriesRow] {
    static ROWS: OnceLock<Vec<SeriesRow>> = OnceLock::new();
    ROWS.get_or_init(|| {
        let (Some(account), Some(from), Some(to)) = (
            account(),
            NaiveDate::from_ymd_opt(2024, 5, 1),
            NaiveDate::from_ymd_opt(2024, 8, 31),
        ) else {
            return Vec::new();
        };
        Engine::new(account, Rules::default(), Currency::USD)
            .series(&SeriesRequest::new(from, to, Granularity::Month))
            .map(|r| r.rows)
            .unwrap_or_default()
    })
}

/// One input, as the `server_params` target and the regression replay run it.
pub(crate) fn run(data: &[u8]) {
    // The client address read past trusted proxies from `X-Forwarded-For` (the header's text is
    // the client's), and the proxy list as configured.
    if let Ok(text) = std::str::from_utf8(data) {
        let proxy = std::net::IpAddr::from([10, 0, 0, 1]);
        let _ = client_key(client_behind(proxy, text.lines(), &[proxy]));
        let _ = address_list(text);
    }
    if let Ok(q) = serde_urlencoded::from_bytes::<MetricsQuery>(data) {
        let _ = connection_id(&q.connection_id);
        let todays = [
            NaiveDate::from_ymd_opt(2024, 9, 30),
            Some(NaiveDate::MIN),
            Some(NaiveDate::MAX),
        ];
        for today in todays.into_iter().flatten() {
            if let (Ok(request), Some(account)) = (q.request(today), account()) {
                let _ = Engine::new(account, Rules::default(), Currency::USD).series(&request);
            }
        }
    }
    if let Ok(q) = serde_urlencoded::from_bytes::<InsightsQuery>(data) {
        let _ = connection_id(&q.connection_id);
    }
    let _ = serde_urlencoded::from_bytes::<DashboardQuery>(data);
    if let Ok(f) = serde_urlencoded::from_bytes::<GenerateForm>(data) {
        let _ = connection_id(&f.connection);
    }
    if let Ok(f) = serde_urlencoded::from_bytes::<UpgradeForm>(data) {
        let _ = f.tier();
    }
    // Scenario parameters (the `Scenario` the route fills from its JSON body), as a form or JSON.
    let scenario = serde_urlencoded::from_bytes::<Scenario>(data)
        .ok()
        .or_else(|| serde_json::from_slice::<Scenario>(data).ok());
    if let Some(scenario) = scenario {
        let rows = monthly_rows();
        if let Ok(rates) = Rates::from_rows(rows) {
            let start = rows.last().map(|r| r.mrr).unwrap_or_default();
            let _ = scenario::run(start, &rates, &scenario);
        }
    }
}
