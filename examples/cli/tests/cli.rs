//! The `revpilot` binary end to end: formats, bad input, export and sync against the fake Stripe.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use revpilot_stripe::fake::FakeStripe;
use serde_json::Value;

fn revpilot(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_revpilot"))
        .args(args)
        .output()
        .unwrap()
}

fn sample() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/sample-export.json")
        .display()
        .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn metrics_json_has_the_documented_shape_and_adds_up() {
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-12-31",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["currency"], "usd");
    assert_eq!(doc["profile"], "default");
    let series = doc["series"].as_array().unwrap();
    assert_eq!(series.len(), 12);
    // Columns in the documented order (date first), as printed.
    let text = stdout(&o);
    let first_row = &text[text.find("\"series\"").unwrap()..];
    let pos = |k: &str| first_row.find(&format!("\"{k}\":")).unwrap();
    assert!(
        pos("date") < pos("period_start")
            && pos("period_start") < pos("mrr_start")
            && pos("mrr") < pos("grr")
    );
    assert_eq!(series[0]["nrr"], Value::Null, "no year of history yet");
    // Money has exactly the currency's two decimals.
    assert!(
        series
            .iter()
            .all(|r| r["mrr"].as_str().unwrap().split('.').nth(1).unwrap().len() == 2)
    );
    // The movements add up to the last MRR (the year starts from nothing).
    let cents = |s: &str| -> i64 { s.replace('.', "").parse().unwrap() };
    let mut total = 0i64;
    for m in doc["movements"].as_array().unwrap() {
        let a = cents(m["amount"].as_str().unwrap());
        total += match m["kind"].as_str().unwrap() {
            "new" | "expansion" | "reactivation" => a,
            "contraction" | "churn" => -a,
            other => panic!("kind {other}"),
        };
    }
    let last = cents(series[11]["mrr"].as_str().unwrap());
    assert!(
        (total - last).abs() <= doc["movements"].as_array().unwrap().len() as i64,
        "{total} vs {last}"
    );
    // The sample's plan changes take effect at renewals without proration: each is dated by the
    // invoice that first bills it, and said; nothing else is odd.
    let anomalies = doc["anomalies"].as_array().unwrap();
    assert!(
        anomalies
            .iter()
            .all(|a| a.as_str().unwrap().contains("dated by invoice in_")),
        "{anomalies:?}"
    );
}

#[test]
fn csv_and_table_formats() {
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-03-31",
        "--format",
        "csv",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].starts_with("date,period_start,mrr_start,mrr,arr,"));
    assert!(lines.iter().all(|l| l.split(',').count() == 25));
    assert!(lines[0].ends_with(",partial"));
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-03-31",
        "--format",
        "table",
        "--granularity",
        "month",
        "--profile",
        "stripe",
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("under the stripe profile"));
    assert!(stdout(&o).contains("2023-03-31"));
}

#[test]
fn daily_granularity_and_fx() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("rates.csv");
    std::fs::write(&fx, "date,from,to,rate\n2023-01-01,usd,eur,0.9\n").unwrap();
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-03-01",
        "--to",
        "2023-03-10",
        "--granularity",
        "day",
        "--currency",
        "eur",
        "--fx",
        fx.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["series"].as_array().unwrap().len(), 10);
    assert_eq!(doc["currency"], "eur");
}

#[test]
fn explain_lists_the_customers_that_differ() {
    let o = revpilot(&[
        "explain",
        "--input",
        &sample(),
        "--date",
        "2023-12-31",
        "--profile",
        "default",
        "--vs",
        "stripe",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("MRR at the end of 2023-12-31: "), "{text}");
    assert!(
        text.contains("under default") && text.contains("under stripe"),
        "{text}"
    );
}

#[test]
fn bad_input_is_one_line_naming_the_file_and_object_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let cases = [
        (
            write(
                "missing.json",
                r#"{"subscriptions": [{"id": "sub_9", "customer": "cus_1"}]}"#,
            ),
            "subscription sub_9",
        ),
        (write("invalid.json", "{\"customers\": [}"), "invalid.json"),
        (write("shape.json", "[1,2]"), "not an export"),
        (
            dir.path().join("absent.json").display().to_string(),
            "absent.json",
        ),
    ];
    for (file, needle) in &cases {
        let o = revpilot(&[
            "metrics",
            "--input",
            file,
            "--from",
            "2023-01-01",
            "--to",
            "2023-02-01",
        ]);
        assert_eq!(o.status.code(), Some(2), "{file}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle) && err.contains(file.as_str()), "{err}");
    }
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-02-01",
        "--currency",
        "xyz",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("xyz"));
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-02-01",
        "--profile",
        "baremetrics",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-03-01",
        "--to",
        "2023-02-01",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("after"), "{}", stderr(&o));
}

fn fake_account(fake: &FakeStripe) {
    let sample: Value = serde_json::from_str(&std::fs::read_to_string(sample()).unwrap()).unwrap();
    for (key, path) in [
        ("customers", "/v1/customers"),
        ("subscriptions", "/v1/subscriptions"),
        ("invoices", "/v1/invoices"),
        ("charges", "/v1/charges"),
        ("prices", "/v1/prices"),
        ("coupons", "/v1/coupons"),
    ] {
        fake.set(path, sample[key].as_array().unwrap().clone());
    }
    fake.set("/v1/products", vec![]);
    fake.set("/v1/events", vec![]);
}

#[test]
fn export_then_metrics_gives_the_same_numbers_as_the_source() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeStripe::start(None));
    fake_account(&fake);
    let o = revpilot(&[
        "export",
        "--api-key",
        "sk_test_1",
        "--api-base",
        &fake.uri(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in [
        "customers",
        "subscriptions",
        "invoices",
        "charges",
        "prices",
        "coupons",
        "events",
    ] {
        assert!(doc[key].is_array(), "{key}");
    }
    assert_eq!(doc["customers"].as_array().unwrap().len(), 40);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.json");
    std::fs::write(&file, &o.stdout).unwrap();
    let args = |input: &str| {
        revpilot(&[
            "metrics",
            "--input",
            input,
            "--from",
            "2023-01-01",
            "--to",
            "2023-12-31",
            "--format",
            "csv",
        ])
    };
    assert_eq!(
        stdout(&args(file.to_str().unwrap())),
        stdout(&args(&sample()))
    );
}

#[test]
fn sync_into_a_sqlite_file_then_incrementally() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeStripe::start(None));
    fake_account(&fake);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rp.db").display());
    let o = revpilot(&[
        "sync",
        "--api-key",
        "sk_test_1",
        "--api-base",
        &fake.uri(),
        "--db",
        &db,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("sync succeeded: "), "{}", stdout(&o));
    assert!(stdout(&o).contains("customer=40"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("customer: 40 objects, done"),
        "plain log lines off a terminal: {}",
        stderr(&o)
    );
    let o = revpilot(&[
        "sync",
        "--api-key",
        "sk_test_1",
        "--api-base",
        &fake.uri(),
        "--db",
        &db,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("event=0"),
        "the second run reads events only: {}",
        stdout(&o)
    );
    let o = revpilot(&[
        "sync",
        "--api-key",
        "sk_test_1",
        "--api-base",
        &fake.uri(),
        "--db",
        "mysql://nope",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// No row past the data's as-of instant (the export's newest object, or `--as-of`);
/// the cut is said, the last row is flagged partial, and a range wholly after it is refused.
#[test]
fn metrics_stop_at_the_data_as_of_instant() {
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-12-31",
    ]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let newest: chrono::DateTime<chrono::Utc> = doc["as_of"].as_str().unwrap().parse().unwrap();
    let as_of = "2023-06-15T12:00:00Z";
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-12-31",
        "--as-of",
        as_of,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["as_of"], "2023-06-15T12:00:00+00:00");
    let series = doc["series"].as_array().unwrap();
    assert_eq!(series.len(), 6, "January to June, nothing after");
    assert_eq!(series[5]["date"], "2023-06-15");
    assert_eq!(series[5]["partial"], true);
    assert_eq!(series[4]["partial"], false);
    let anomalies = doc["anomalies"].as_array().unwrap();
    assert!(
        anomalies.iter().any(|a| a
            .as_str()
            .unwrap()
            .contains("the data runs to 2023-06-15 12:00 UTC")),
        "{anomalies:?}"
    );
    // Without --as-of the export's newest instant cuts the series.
    let after = (newest + chrono::Duration::days(400))
        .date_naive()
        .to_string();
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        &after,
    ]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let last = doc["series"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["date"], newest.date_naive().to_string());
    // An export that says when it was made is known up to then, past its newest object.
    let dir = tempfile::tempdir().unwrap();
    let stamped = dir.path().join("stamped.json");
    let mut export: Value = serde_json::from_slice(&std::fs::read(sample()).unwrap()).unwrap();
    let made = newest + chrono::Duration::days(20);
    export["exported_at"] = made.timestamp().into();
    std::fs::write(&stamped, serde_json::to_vec(&export).unwrap()).unwrap();
    let o = revpilot(&[
        "metrics",
        "--input",
        stamped.to_str().unwrap(),
        "--from",
        "2023-01-01",
        "--to",
        &after,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let last = doc["series"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["date"], made.date_naive().to_string());
    // The table says it.
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-01-01",
        "--to",
        "2023-12-31",
        "--as-of",
        as_of,
        "--format",
        "table",
    ]);
    let text = stdout(&o);
    assert!(
        text.contains("Data as of 2023-06-15 12:00:00 UTC"),
        "{text}"
    );
    assert!(text.contains("2023-06-15*"), "{text}");
    // Wholly after: exit 2, naming the as-of.
    let o = revpilot(&[
        "metrics",
        "--input",
        &sample(),
        "--from",
        "2023-07-01",
        "--to",
        "2023-12-31",
        "--as-of",
        as_of,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no data after 2023-06-15 12:00:00 UTC"),
        "{}",
        stderr(&o)
    );
    assert!(o.stdout.is_empty());
}
