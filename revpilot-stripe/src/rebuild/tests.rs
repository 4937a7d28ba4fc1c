//! The rebuild on Stripe-shaped fixtures: every object starts as Stripe's official example of its
//! kind (today's API shape, `tests/fixtures`) with only the fields a scenario needs changed, so
//! each case reads exactly what Stripe sends.

use chrono::{NaiveDate, TimeZone, Utc};
use revpilot_core::metrics::{Engine, MovementKind};
use revpilot_core::{Currency, Rules};
use serde_json::{Value, json};

use super::*;

fn template(name: &str) -> Value {
    let all: Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/stripe-openapi-fixtures3.json"
    ))
    .expect("the fixtures file is JSON");
    all["resources"][name].clone()
}

fn set(v: &mut Value, fields: Value) {
    for (k, x) in fields.as_object().expect("fields are an object") {
        v[k] = x.clone();
    }
}

fn ts(y: i32, m: u32, d: u32) -> i64 {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap().timestamp()
}

fn price(id: &str, amount: i64, interval: &str, count: u32, currency: &str) -> Value {
    let mut p = template("price");
    set(
        &mut p,
        json!({"id": id, "unit_amount": amount, "unit_amount_decimal": amount.to_string(),
               "currency": currency,
               "recurring": {"interval": interval, "interval_count": count, "meter": null,
                             "usage_type": "licensed", "trial_period_days": null}}),
    );
    p
}

fn customer(id: &str, created: i64) -> Value {
    let mut c = template("customer");
    set(&mut c, json!({"id": id, "created": created}));
    c
}

/// A subscription with `items` (price, quantity) as it stands today.
fn subscription(id: &str, cus: &str, status: &str, start: i64, items: &[(&Value, u64)]) -> Value {
    let mut s = template("subscription");
    let data: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(n, (p, q))| {
            let mut it = template("subscription_item");
            set(
                &mut it,
                json!({"id": format!("si_{id}_{n}"), "price": p, "quantity": q, "subscription": id,
                       "created": start, "current_period_start": start}),
            );
            it.as_object_mut().unwrap().remove("plan");
            it
        })
        .collect();
    set(
        &mut s,
        json!({"id": id, "customer": cus, "status": status, "created": start, "start_date": start,
               "currency": items[0].0["currency"],
               "items": {"object": "list", "data": data, "has_more": false, "url": "/v1/subscription_items"},
               "cancel_at": null, "canceled_at": null, "ended_at": null, "cancel_at_period_end": false,
               "trial_start": null, "trial_end": null, "pause_collection": null,
               "discounts": [], "discount": null}),
    );
    s
}

fn line(price: &str, qty: u64, start: i64, end: i64, amount: i64, proration: bool) -> Value {
    let mut l = template("line_item");
    set(
        &mut l,
        json!({"id": format!("il_{price}_{start}_{amount}"), "amount": amount, "quantity": qty,
               "period": {"start": start, "end": end},
               "parent": {"type": "subscription_item_details", "invoice_item_details": null,
                          "subscription_item_details": {"invoice_item": null, "proration": proration,
                            "proration_details": {"credited_items": null},
                            "subscription": "sub", "subscription_item": "si"}},
               "pricing": {"type": "price_details", "price_details": {"price": price, "product": "prod"},
                           "unit_amount_decimal": null}}),
    );
    l
}

fn invoice(id: &str, sub: &str, created: i64, lines: Vec<Value>) -> Value {
    let mut i = template("invoice");
    set(
        &mut i,
        json!({"id": id, "created": created, "status": "paid",
               "parent": {"type": "subscription_details", "quote_details": null,
                          "subscription_details": {"metadata": {}, "subscription": sub}},
               "discounts": [],
               "lines": {"object": "list", "data": lines, "has_more": false, "url": "/v1/invoices/x/lines"}}),
    );
    i
}

fn monthly_invoices(
    sub: &str,
    price: &str,
    qty: u64,
    amount: i64,
    months: &[(i32, u32)],
) -> Vec<Value> {
    months
        .iter()
        .map(|&(y, m)| {
            let start = ts(y, m, 1);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let end = ts(ny, nm, 1);
            invoice(
                &format!("in_{sub}_{y}{m:02}"),
                sub,
                start,
                vec![line(price, qty, start, end, amount * qty as i64, false)],
            )
        })
        .collect()
}

fn coupon(id: &str, off: Value, duration: &str, months: Option<u32>) -> Value {
    let mut c = template("coupon");
    set(
        &mut c,
        json!({"id": id, "percent_off": null, "amount_off": null, "duration": duration,
                        "duration_in_months": months}),
    );
    set(&mut c, off);
    c
}

fn discount(id: &str, coupon: &Value, start: i64, end: Option<i64>) -> Value {
    let mut d = template("discount");
    set(
        &mut d,
        json!({"id": id, "start": start, "end": end,
                        "source": {"type": "coupon", "coupon": coupon}}),
    );
    d
}

/// A succeeded charge of 1.00 (it dates the export's newest instant).
fn charge_at(created: i64) -> Value {
    let mut ch = template("charge");
    set(
        &mut ch,
        json!({"id": format!("ch_{created}"), "created": created, "status": "succeeded",
                         "customer": "cus_1", "refunds": null}),
    );
    ch
}

/// A case's export, as parsed objects and as the bytes the streaming rebuild reads.
struct Case {
    export: Export,
    json: Vec<u8>,
}

fn export(v: Value) -> Case {
    let json = v.to_string().into_bytes();
    Case {
        export: Export::from_json(&json).unwrap_or_else(|e| panic!("{e}")),
        json,
    }
}

/// Every case is rebuilt both ways: the streaming rebuild (one object per tiny batch, so every
/// object crosses a buffer boundary) must equal the in-memory one.
fn rebuild(case: &Case) -> Rebuilt {
    let simple = super::rebuild(&case.export);
    for batch_bytes in [64, 1 << 20] {
        let options = stream::StreamOptions {
            batch_bytes,
            threads: 2,
        };
        let streamed =
            stream::rebuild_reader(&case.json[..], &options).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            streamed, simple,
            "streamed in batches of {batch_bytes} bytes"
        );
    }
    simple
}

fn mrr(r: &Rebuilt, y: i32, m: u32, d: u32) -> String {
    let at = Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap();
    let snap = Engine::new(&r.account, Rules::default(), Currency::USD)
        .mrr_at(at)
        .unwrap();
    Currency::USD.round(snap.total).to_string()
}

#[test]
fn monthly_annual_weekly_plans_normalise_to_a_month() {
    let m = price("price_m", 2900, "month", 1, "usd");
    let y = price("price_y", 120_000, "year", 1, "usd");
    let w = price("price_w", 1000, "week", 1, "usd");
    let start = ts(2024, 1, 1);
    let r = rebuild(&export(json!({
        "customers": [customer("cus_a", start), customer("cus_b", start), customer("cus_c", start)],
        "subscriptions": [subscription("sub_m", "cus_a", "active", start, &[(&m, 1)]),
                          subscription("sub_y", "cus_b", "active", start, &[(&y, 1)]),
                          subscription("sub_w", "cus_c", "active", start, &[(&w, 1)])],
        "invoices": [invoice("in_y", "sub_y", start, vec![line("price_y", 1, start, ts(2025, 1, 1), 120_000, false)])],
    })));
    assert_eq!(r.issues, vec![]);
    // 29 + 1200/12 + 10 x 52/12
    assert_eq!(mrr(&r, 2024, 6, 15), "172.33");
}

#[test]
fn a_quantity_change_is_dated_by_its_proration_lines() {
    let seat = price("price_seat", 1000, "month", 1, "usd");
    let (jan, feb) = (ts(2024, 1, 1), ts(2024, 2, 1));
    let change = ts(2024, 1, 10) + 3600;
    let mut invoices = monthly_invoices("sub_1", "price_seat", 5, 1000, &[(2024, 1)]);
    invoices.push(invoice(
        "in_pr",
        "sub_1",
        change,
        vec![
            line("price_seat", 5, change, feb, -3600, true),
            line("price_seat", 8, change, feb, 5760, true),
        ],
    ));
    invoices.extend(monthly_invoices(
        "sub_1",
        "price_seat",
        8,
        1000,
        &[(2024, 2), (2024, 3)],
    ));
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan)],
        "subscriptions": [subscription("sub_1", "cus_1", "active", jan, &[(&seat, 8)])],
        "invoices": invoices,
    })));
    assert_eq!(r.issues, vec![]);
    assert_eq!(mrr(&r, 2024, 1, 9), "50.00");
    assert_eq!(
        mrr(&r, 2024, 1, 10),
        "80.00",
        "the change happens at the proration instant"
    );
    let ledger = Engine::new(&r.account, Rules::default(), Currency::USD)
        .movements(
            NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
            NaiveDate::from_ymd_opt(2024, 3, 31).unwrap(),
        )
        .unwrap();
    let kinds: Vec<_> = ledger
        .movements
        .iter()
        .map(|m| (m.date.to_string(), m.kind, m.amount.to_string()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                "2024-01-01".to_owned(),
                MovementKind::New,
                "50.000000000000".to_owned()
            ),
            (
                "2024-01-10".to_owned(),
                MovementKind::Expansion,
                "30.000000000000".to_owned()
            ),
        ]
    );
}

#[test]
fn upgrade_and_downgrade_with_proration() {
    let basic = price("price_basic", 2000, "month", 1, "usd");
    let pro = price("price_pro", 5000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let up = ts(2024, 1, 15);
    let down = ts(2024, 3, 20);
    let mut invoices = monthly_invoices("sub_1", "price_basic", 1, 2000, &[(2024, 1)]);
    invoices.push(invoice(
        "in_up",
        "sub_1",
        up,
        vec![
            line("price_basic", 1, up, ts(2024, 2, 1), -1100, true),
            line("price_pro", 1, up, ts(2024, 2, 1), 2700, true),
        ],
    ));
    invoices.extend(monthly_invoices(
        "sub_1",
        "price_pro",
        1,
        5000,
        &[(2024, 2), (2024, 3)],
    ));
    invoices.push(invoice(
        "in_down",
        "sub_1",
        down,
        vec![
            line("price_pro", 1, down, ts(2024, 4, 1), -1900, true),
            line("price_basic", 1, down, ts(2024, 4, 1), 760, true),
        ],
    ));
    invoices.extend(monthly_invoices(
        "sub_1",
        "price_basic",
        1,
        2000,
        &[(2024, 4)],
    ));
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan)],
        "subscriptions": [subscription("sub_1", "cus_1", "active", jan, &[(&basic, 1)])],
        "invoices": invoices, "prices": [basic, pro],
    })));
    assert_eq!(r.issues, vec![]);
    assert_eq!(mrr(&r, 2024, 1, 14), "20.00");
    assert_eq!(mrr(&r, 2024, 1, 15), "50.00");
    assert_eq!(mrr(&r, 2024, 3, 19), "50.00");
    assert_eq!(mrr(&r, 2024, 3, 20), "20.00");
    assert_eq!(mrr(&r, 2024, 4, 20), "20.00");
}

#[test]
fn an_event_dates_a_change_made_without_proration() {
    let seat = price("price_seat", 1000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let changed = ts(2024, 2, 17) + 4000;
    let mut invoices = monthly_invoices("sub_1", "price_seat", 2, 1000, &[(2024, 1), (2024, 2)]);
    invoices.extend(monthly_invoices(
        "sub_1",
        "price_seat",
        3,
        1000,
        &[(2024, 3)],
    ));
    let mut after = subscription("sub_1", "cus_1", "active", jan, &[(&seat, 3)]);
    let mut event = template("event");
    set(
        &mut event,
        json!({"id": "evt_1", "type": "customer.subscription.updated", "created": changed,
        "data": {"object": after.clone(), "previous_attributes": {"items": {"data": []}}}}),
    );
    after["items"]["data"][0]["quantity"] = json!(3);
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan)],
        "subscriptions": [after], "invoices": invoices, "events": [event],
    })));
    assert_eq!(r.issues, vec![]);
    assert_eq!(mrr(&r, 2024, 2, 16), "20.00");
    assert_eq!(
        mrr(&r, 2024, 2, 17),
        "30.00",
        "the event's instant, not the next invoice"
    );
}

#[test]
fn an_undated_change_is_reported_not_guessed() {
    let seat = price("price_seat", 1000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan)],
        "subscriptions": [subscription("sub_1", "cus_1", "active", jan, &[(&seat, 4)])],
        "invoices": monthly_invoices("sub_1", "price_seat", 2, 1000, &[(2024, 1), (2024, 2)]),
        "charges": [charge_at(ts(2024, 2, 25))],
    })));
    assert_eq!(r.issues.len(), 1, "{:?}", r.issues);
    assert!(
        r.issues[0].problem.contains("no proration or event"),
        "{}",
        r.issues[0]
    );
    assert!(
        r.issues[0].problem.contains("placed at 2024-02-25"),
        "{}",
        r.issues[0]
    );
    assert_eq!(mrr(&r, 2024, 2, 20), "20.00", "history stays as billed");
    assert_eq!(
        mrr(&r, 2024, 2, 26),
        "40.00",
        "the present is the subscription's"
    );
}

#[test]
fn coupons_of_each_duration() {
    let p = price("price_p", 10_000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let once = coupon("once50", json!({"percent_off": 50}), "once", None);
    let rep = coupon(
        "rep10",
        json!({"amount_off": 1000, "currency": "usd"}),
        "repeating",
        Some(3),
    );
    let forever = coupon("ever25", json!({"percent_off": 25.5}), "forever", None);
    let mut s1 = subscription("sub_1", "cus_1", "active", jan, &[(&p, 1)]);
    let mut s2 = subscription("sub_2", "cus_2", "active", jan, &[(&p, 1)]);
    let mut s3 = subscription("sub_3", "cus_3", "active", jan, &[(&p, 1)]);
    // The once coupon has gone from the subscription; only its first invoice shows it.
    let mut first = monthly_invoices("sub_1", "price_p", 1, 10_000, &[(2024, 1)]).remove(0);
    first["discounts"] = json!([discount("di_once", &once, jan, None)]);
    s2["discounts"] = json!([discount("di_rep", &rep, jan, Some(ts(2024, 4, 1)))]);
    s3["discount"] = discount("di_ever", &json!("ever25"), jan, None);
    s1["discounts"] = json!([]);
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan), customer("cus_2", jan), customer("cus_3", jan)],
        "subscriptions": [s1, s2, s3], "invoices": [first], "coupons": [forever],
    })));
    assert_eq!(r.issues, vec![]);
    // once: 50 in January; repeating: 90 to March; forever: 74.50 always.
    assert_eq!(mrr(&r, 2024, 1, 15), "214.50");
    assert_eq!(mrr(&r, 2024, 3, 15), "264.50");
    assert_eq!(mrr(&r, 2024, 4, 15), "274.50");
}

#[test]
fn an_unexpanded_discount_is_reported() {
    let p = price("price_p", 10_000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let mut s = subscription("sub_1", "cus_1", "active", jan, &[(&p, 1)]);
    s["discounts"] = json!(["di_123"]);
    let r = rebuild(&export(
        json!({"customers": [customer("cus_1", jan)], "subscriptions": [s]}),
    ));
    assert_eq!(r.issues.len(), 1);
    assert!(r.issues[0].problem.contains("di_123"), "{}", r.issues[0]);
}

#[test]
fn trial_then_paid_and_cancel_at_period_end() {
    let p = price("price_p", 3000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let mut s = subscription("sub_1", "cus_1", "active", jan, &[(&p, 1)]);
    set(
        &mut s,
        json!({"trial_start": jan, "trial_end": ts(2024, 1, 15),
                        "cancel_at_period_end": true, "canceled_at": ts(2024, 3, 3),
                        "cancel_at": ts(2024, 4, 15)}),
    );
    let r = rebuild(&export(
        json!({"customers": [customer("cus_1", jan)], "subscriptions": [s]}),
    ));
    assert_eq!(r.issues, vec![]);
    assert_eq!(mrr(&r, 2024, 1, 10), "0.00", "trialing");
    assert_eq!(mrr(&r, 2024, 1, 16), "30.00");
    assert_eq!(
        mrr(&r, 2024, 4, 10),
        "30.00",
        "still paying until the period ends"
    );
    assert_eq!(mrr(&r, 2024, 4, 16), "0.00", "churned at cancel_at");
}

#[test]
fn canceled_and_reactivated_with_a_new_subscription() {
    let p = price("price_p", 3000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let mut old = subscription("sub_old", "cus_1", "canceled", jan, &[(&p, 1)]);
    set(
        &mut old,
        json!({"canceled_at": ts(2024, 2, 10), "ended_at": ts(2024, 3, 1)}),
    );
    let new = subscription("sub_new", "cus_1", "active", ts(2024, 5, 1), &[(&p, 2)]);
    let r = rebuild(&export(
        json!({"customers": [customer("cus_1", jan)], "subscriptions": [old, new]}),
    ));
    assert_eq!(r.issues, vec![]);
    let ledger = Engine::new(&r.account, Rules::default(), Currency::USD)
        .movements(
            NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
            NaiveDate::from_ymd_opt(2024, 6, 1).unwrap(),
        )
        .unwrap();
    let kinds: Vec<_> = ledger
        .movements
        .iter()
        .map(|m| (m.date.to_string(), m.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("2024-01-01".to_owned(), MovementKind::New),
            ("2024-03-01".to_owned(), MovementKind::Churn),
            ("2024-05-01".to_owned(), MovementKind::Reactivation),
        ]
    );
}

#[test]
fn past_due_is_dated_by_the_failing_invoice_and_pauses_are_reported() {
    let p = price("price_p", 3000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let s = subscription("sub_1", "cus_1", "unpaid", jan, &[(&p, 1)]);
    let mut invoices = monthly_invoices("sub_1", "price_p", 1, 3000, &[(2024, 1), (2024, 2)]);
    invoices[1]["status"] = json!("open");
    let mut paused = subscription("sub_2", "cus_2", "active", jan, &[(&p, 1)]);
    set(
        &mut paused,
        json!({"pause_collection": {"behavior": "void", "resumes_at": null}}),
    );
    paused["items"]["data"][0]["current_period_start"] = json!(ts(2024, 3, 1));
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan), customer("cus_2", jan)],
        "subscriptions": [s, paused], "invoices": invoices,
    })));
    assert_eq!(mrr(&r, 2024, 1, 20), "60.00");
    assert_eq!(
        mrr(&r, 2024, 2, 2),
        "30.00",
        "unpaid from the open invoice; paused is not, yet"
    );
    assert_eq!(mrr(&r, 2024, 1, 31), "60.00");
    assert_eq!(r.issues.len(), 1, "{:?}", r.issues);
    assert!(
        r.issues[0].problem.contains("collection paused"),
        "{}",
        r.issues[0]
    );
    assert_eq!(mrr(&r, 2024, 3, 2), "0.00");
}

#[test]
fn multi_currency_and_cash() {
    let eur = price("price_eur", 4000, "month", 1, "eur");
    let jan = ts(2024, 1, 1);
    let mut ch = template("charge");
    set(
        &mut ch,
        json!({"id": "ch_1", "amount": 4000, "amount_captured": 4000, "amount_refunded": 1000,
                         "currency": "eur", "created": jan + 60, "customer": "cus_1", "status": "succeeded",
                         "refunds": {"object": "list", "has_more": false, "url": "/v1/refunds",
                                     "data": [{"id": "re_1", "object": "refund", "amount": 1000,
                                               "created": jan + 120, "status": "succeeded", "currency": "eur"}]}}),
    );
    let mut failed = ch.clone();
    set(
        &mut failed,
        json!({"id": "ch_2", "status": "failed", "refunds": null}),
    );
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan)],
        "subscriptions": [subscription("sub_1", "cus_1", "active", jan, &[(&eur, 1)])],
        "charges": [ch, failed],
    })));
    assert_eq!(r.issues, vec![]);
    assert_eq!(r.account.subscriptions[0].currency, Currency::EUR);
    assert_eq!(r.account.payments.len(), 1, "failed charges are not cash");
    assert_eq!(r.account.payments[0].refunds.len(), 1);
    let snap = Engine::new(&r.account, Rules::default(), Currency::EUR)
        .mrr_at(Utc.with_ymd_and_hms(2024, 2, 1, 0, 0, 0).unwrap())
        .unwrap();
    assert_eq!(Currency::EUR.round(snap.total).to_string(), "40.00");
}

#[test]
fn unreadable_objects_are_reported_and_left_out() {
    let jan = ts(2024, 1, 1);
    let mut bad_price = price("price_bad", 1000, "fortnight", 1, "usd");
    bad_price["id"] = json!("price_bad");
    let good = price("price_ok", 1000, "month", 1, "usd");
    let mut s = subscription(
        "sub_1",
        "cus_1",
        "active",
        jan,
        &[(&bad_price, 1), (&good, 1)],
    );
    s["items"]["has_more"] = json!(true);
    let mut lost = subscription("sub_2", "cus_1", "active", jan, &[(&good, 1)]);
    lost["currency"] = json!("dollars");
    let mut inv = monthly_invoices("sub_1", "price_ok", 1, 1000, &[(2024, 1)]).remove(0);
    inv["lines"]["has_more"] = json!(true);
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan)], "subscriptions": [s, lost], "invoices": [inv],
    })));
    let text: Vec<String> = r.issues.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("price_bad: unknown interval")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("sub_1: more than the embedded items")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("in_sub_1_202401: lines cut")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("sub_2: invalid currency")),
        "{text:?}"
    );
    assert_eq!(r.account.subscriptions.len(), 1);
    assert_eq!(mrr(&r, 2024, 1, 20), "10.00");
}

/// A change made without proration, older than the events, is dated by the next
/// invoice that bills it, and the rebuild says so, naming the subscription and the invoice.
#[test]
fn a_change_dated_only_by_the_next_invoice_is_reported() {
    let seat = price("price_seat", 1000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let mut invoices = monthly_invoices("sub_1", "price_seat", 2, 1000, &[(2024, 1), (2024, 2)]);
    invoices.extend(monthly_invoices(
        "sub_1",
        "price_seat",
        3,
        1000,
        &[(2024, 3)],
    ));
    let march_invoice = invoices[2]["id"].as_str().expect("id").to_owned();
    let r = rebuild(&export(json!({
        "customers": [customer("cus_1", jan)],
        "subscriptions": [subscription("sub_1", "cus_1", "active", jan, &[(&seat, 3)])],
        "invoices": invoices,
    })));
    assert_eq!(r.issues.len(), 1, "{:?}", r.issues);
    assert_eq!(r.issues[0].object, "sub_1");
    assert!(
        r.issues[0]
            .problem
            .contains(&format!("dated by invoice {march_invoice}")),
        "{}",
        r.issues[0]
    );
    assert_eq!(mrr(&r, 2024, 2, 28), "20.00");
    assert_eq!(mrr(&r, 2024, 3, 2), "30.00", "from the invoice's period");
}

fn dispute(id: &str, status: &str, created: i64, balance: Value) -> Value {
    let mut d = template("dispute");
    set(
        &mut d,
        json!({"id": id, "charge": "ch_1", "amount": 4000, "currency": "usd",
               "created": created, "status": status, "balance_transactions": balance}),
    );
    d
}

fn disputed_charge(jan: i64) -> Value {
    let mut ch = template("charge");
    set(
        &mut ch,
        json!({"id": "ch_1", "amount": 4000, "amount_captured": 4000, "amount_refunded": 0,
               "currency": "usd", "created": jan + 60, "customer": "cus_1",
               "status": "succeeded", "disputed": true, "refunds": null}),
    );
    ch
}

fn revenue(r: &Rebuilt, month: u32) -> String {
    let d = |m: u32| chrono::NaiveDate::from_ymd_opt(2024, m, 1).expect("date");
    let report = Engine::new(&r.account, Rules::default(), Currency::USD)
        .series(&revpilot_core::metrics::SeriesRequest::new(
            d(month),
            d(month + 1).pred_opt().expect("date"),
            revpilot_core::metrics::Granularity::Month,
        ))
        .expect("series");
    Currency::USD
        .round(report.rows[0].total_revenue)
        .to_string()
}

/// A lost dispute takes its amount and fee out of cash on its date; a won one gives
/// them back when it is reinstated; an inquiry moves nothing; MRR never moves.
#[test]
fn disputes_move_cash_not_mrr() {
    let plan = price("price_p", 4000, "month", 1, "usd");
    let jan = ts(2024, 1, 1);
    let (feb, mar) = (ts(2024, 2, 5), ts(2024, 3, 12));
    let bt = |amount: i64, fee: i64, at: i64| {
        json!({"id": format!("txn_{at}"), "object": "balance_transaction", "amount": amount,
               "fee": fee, "currency": "usd", "created": at})
    };
    let base = json!({
        "customers": [customer("cus_1", jan)],
        "subscriptions": [subscription("sub_1", "cus_1", "active", jan, &[(&plan, 1)])],
        "charges": [disputed_charge(jan)],
    });
    let with = |disputes: Vec<Value>| {
        let mut v = base.clone();
        v["disputes"] = json!(disputes);
        rebuild(&export(v))
    };
    // Lost, with its balance transaction: 40.00 and the 15.00 fee leave in February.
    let lost = with(vec![dispute(
        "dp_1",
        "lost",
        feb,
        json!([bt(-4000, 1500, feb)]),
    )]);
    assert_eq!(lost.issues, vec![]);
    assert_eq!(revenue(&lost, 1), "40.00");
    assert_eq!(revenue(&lost, 2), "-55.00");
    assert_eq!(
        mrr(&lost, 2024, 2, 20),
        "40.00",
        "a dispute is cash, not MRR"
    );
    // Lost, without balance transactions: the amount on the dispute's date.
    let bare = with(vec![dispute("dp_1", "lost", feb, json!([]))]);
    assert_eq!(revenue(&bare, 2), "-40.00");
    // Won: withdrawn in February, reinstated in March.
    let won = with(vec![dispute(
        "dp_1",
        "won",
        feb,
        json!([bt(-4000, 1500, feb), bt(4000, -1500, mar)]),
    )]);
    assert_eq!(revenue(&won, 2), "-55.00");
    assert_eq!(revenue(&won, 3), "55.00");
    // Won without its balance transactions: nothing in all.
    let won_bare = with(vec![dispute("dp_1", "won", feb, json!([]))]);
    assert_eq!(revenue(&won_bare, 2), "0.00");
    // An inquiry moves no money.
    let inquiry = with(vec![dispute(
        "dp_1",
        "warning_needs_response",
        feb,
        json!([]),
    )]);
    assert_eq!(revenue(&inquiry, 2), "0.00");
    // A dispute of a charge the account does not have is reported.
    let mut stray = dispute("dp_2", "lost", feb, json!([]));
    stray["charge"] = json!("ch_unknown");
    let r = with(vec![stray]);
    assert_eq!(r.issues.len(), 1, "{:?}", r.issues);
    assert_eq!(r.issues[0].object, "dp_2");
    assert_eq!(
        r.as_of.map(|t| t.timestamp()),
        Some(feb),
        "the newest instant dates the data"
    );
}
