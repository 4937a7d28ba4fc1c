//! A real browser on the demo: the `revpilot-server --demo` process, and Debian's Chromium
//! (headless) logging in through `/demo` and rendering `/dashboard`. The KPI tiles and the MRR
//! line's points in the DOM Chromium built must equal `/api/metrics`; a screenshot of every page
//! at 1,400 and 390 px is saved to `target/browser/{page}-{width}.png`.
//!
//! Chromium comes from `REVPILOT_TEST_CHROMIUM` (scripts/test sets it when `/usr/bin/chromium`
//! exists). Without it the test says it was skipped, unless `REVPILOT_TEST_REQUIRE_CHROMIUM` is
//! set (CI sets it: CI never skips).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use chrono::Datelike as _;
use rust_decimal::Decimal;
use serde_json::{Value, json};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo server on a free port: its base URL, email and password, read from what it prints.
fn demo_server() -> (Server, String, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_revpilot-server"))
        .args(["--demo", "--demo-customers", "300", "--bind", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut base = None;
    let mut login = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.trim().strip_prefix("open   ") {
            base = Some(url.trim_end_matches("/demo").to_owned());
        }
        if let Some(rest) = line.split(" as ").nth(1) {
            let (email, password) = rest.split_once(" with password ").unwrap();
            login = Some((email.to_owned(), password.to_owned()));
            break;
        }
    }
    let (email, password) = login.expect("the demo prints its login");
    (
        server,
        base.expect("the demo prints its URL"),
        email,
        password,
    )
}

fn chromium(binary: &Path, profile: &Path, args: &[&str]) -> String {
    chromium_at(binary, profile, "1100,1800", args)
}

/// [`chromium`] with a window of `size` (`"width,height"`).
fn chromium_at(binary: &Path, profile: &Path, size: &str, args: &[&str]) -> String {
    let out = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!("--window-size={size}"))
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Every `(name, value)` of `attr="..."` pairs in the elements carrying `marker`.
fn attrs(dom: &str, marker: &str, names: [&str; 2]) -> Vec<(String, String)> {
    let read = |el: &str, name: &str| {
        let key = format!("{name}=\"");
        let start = el.find(&key)? + key.len();
        Some(el[start..start + el[start..].find('"')?].to_owned())
    };
    dom.split('<')
        .filter(|el| el.contains(marker))
        .filter_map(|el| Some((read(el, names[0])?, read(el, names[1])?)))
        .collect()
}

async fn metrics(
    http: &reqwest::Client,
    base: &str,
    connection: &str,
    token: &str,
    query: &str,
) -> Value {
    http.get(format!(
        "{base}/api/metrics?connectionId={connection}{query}"
    ))
    .bearer_auth(token)
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

fn rounded(v: &Value) -> String {
    v.as_str()
        .unwrap()
        .parse::<Decimal>()
        .unwrap()
        .round_dp(2)
        .to_string()
}

#[tokio::test]
async fn chromium_shows_the_demo_dashboard_with_the_apis_numbers() {
    let Some(binary) = std::env::var_os("REVPILOT_TEST_CHROMIUM").map(PathBuf::from) else {
        assert!(
            std::env::var_os("REVPILOT_TEST_REQUIRE_CHROMIUM").is_none(),
            "REVPILOT_TEST_REQUIRE_CHROMIUM is set but REVPILOT_TEST_CHROMIUM is not"
        );
        eprintln!("skipped: REVPILOT_TEST_CHROMIUM is not set (no Chromium)");
        return;
    };
    let (_server, base, email, password) = demo_server();
    let profile = tempfile::tempdir().unwrap();

    // Chromium logs in (the demo link sets the session cookie) and renders the dashboard.
    let dom = chromium(
        &binary,
        profile.path(),
        &["--dump-dom", &format!("{base}/demo")],
    );
    assert!(dom.contains("Demo SaaS (synthetic data)"), "{dom}");
    let connection = attrs(&dom, "id=\"account\"", ["id", "data-connection"])[0]
        .1
        .clone();

    // The same numbers through the API, with a session of the printed login.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let session: Value = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    let daily = metrics(&http, &base, &connection, token, "").await;
    let last = daily["rows"].as_array().unwrap().last().unwrap();
    let tiles: std::collections::HashMap<String, String> =
        attrs(&dom, "data-kpi=", ["data-kpi", "data-value"])
            .into_iter()
            .collect();
    assert_eq!(tiles.len(), 7, "{tiles:?}");
    assert_eq!(tiles["mrr"], rounded(&last["mrr"]));
    assert_eq!(tiles["arr"], rounded(&last["arr"]));
    assert_eq!(tiles["arpu"], rounded(&last["arpu"]));
    assert_eq!(tiles["ltv"], rounded(&last["ltv"]));
    assert_eq!(tiles["customers"], last["total_customers"].to_string());
    let pct = |v: &Value| {
        (v.as_str().unwrap().parse::<Decimal>().unwrap() * Decimal::ONE_HUNDRED)
            .round_dp(1)
            .to_string()
    };
    assert_eq!(tiles["churn"], pct(&last["customer_churn_rate"]));
    assert_eq!(tiles["nrr"], pct(&last["nrr"]));

    // The MRR chart: one point per month, each at the API's monthly MRR.
    let to = daily["to"].as_str().unwrap();
    let from = chrono::NaiveDate::parse_from_str(to, "%Y-%m-%d")
        .unwrap()
        .with_day0(0)
        .unwrap()
        .checked_sub_months(chrono::Months::new(23))
        .unwrap();
    let monthly = metrics(
        &http,
        &base,
        &connection,
        token,
        &format!("&from={from}&to={to}&granularity=month"),
    )
    .await;
    let api_points: Vec<(String, String)> = monthly["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["date"].as_str().unwrap().to_owned(), rounded(&r["mrr"])))
        .collect();
    assert_eq!(api_points.len(), 24);
    assert_eq!(
        attrs(&dom, "class=\"mrr-point\"", ["data-date", "data-mrr"]),
        api_points
    );
    assert!(
        dom.matches("class=\"bar bar-").count() > 24,
        "movement bars"
    );
    assert!(
        dom.matches("class=\"cohort-cell\"").count() > 12,
        "cohort cells"
    );

    // Screenshots of every page, at a desktop's width and a phone's, for people to look at:
    // `target/browser/{page}-{width}.png`.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/browser");
    std::fs::create_dir_all(&dir).unwrap();
    for page in [
        "dashboard",
        "insights",
        "usage",
        "pricing",
        "login",
        "signup",
    ] {
        for (width, height) in [(1400, 1800), (390, 1800)] {
            let shot = dir.join(format!("{page}-{width}.png"));
            let _ = std::fs::remove_file(&shot);
            chromium_at(
                &binary,
                profile.path(),
                &format!("{width},{height}"),
                &[
                    &format!("--screenshot={}", shot.display()),
                    &format!("{base}/{page}"),
                ],
            );
            let png = std::fs::read(&shot).unwrap();
            assert!(
                png.starts_with(b"\x89PNG") && png.len() > 10_000,
                "a real picture of /{page} at {width} px"
            );
        }
    }
}
