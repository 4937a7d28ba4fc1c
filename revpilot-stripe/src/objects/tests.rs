//! The tolerant types on Stripe's official fixtures (today's shapes), on older shapes, and on bad
//! input.

use serde_json::{Value, json};

use super::*;

fn fixture(name: &str) -> Value {
    let all: Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/stripe-openapi-fixtures3.json"
    ))
    .expect("the fixtures file is JSON");
    all["resources"][name].clone()
}

fn read<T: serde::de::DeserializeOwned>(kind: &'static str, v: &Value) -> T {
    parse(kind, v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn todays_shapes_read() {
    let c: Customer = read("customer", &fixture("customer"));
    assert!(c.id.starts_with("cus_"));
    let s: Subscription = read("subscription", &fixture("subscription"));
    assert_eq!(s.status, "active");
    assert!(s.customer.is_some());
    let item = &s.items.data[0];
    assert!(
        item.price().is_some_and(|p| p.recurring.is_some()),
        "today's price on the item"
    );
    assert!(
        s.current_period_end().is_some(),
        "periods now live on items"
    );
    assert_eq!(
        s.pause_collection.as_ref().map(|p| p.behavior.as_str()),
        Some("mark_uncollectible")
    );
    let _: SubscriptionItem = read("subscription_item", &fixture("subscription_item"));
    let p: Price = read("price", &fixture("price"));
    assert_eq!(p.unit_amount, Some(Decimal::from(2000)));
    let coupon: Coupon = read("coupon", &fixture("coupon"));
    assert_eq!(
        coupon.percent_off,
        Some(Decimal::new(255, 1)),
        "a JSON float read exactly"
    );
    let d: Discount = read("discount", &fixture("discount"));
    assert!(d.source.is_some());
    let inv: Invoice = read("invoice", &fixture("invoice"));
    assert_eq!(
        inv.subscription_id(),
        Some("subscription"),
        "today: under parent.subscription_details"
    );
    assert!(!inv.lines.data.is_empty());
    let line: InvoiceLine = read("line_item", &fixture("line_item"));
    assert!(!line.id.is_empty());
    let ch: Charge = read("charge", &fixture("charge"));
    assert_eq!(ch.status, "succeeded");
    assert!(ch.refunds.is_some_and(|r| r.data.is_empty()));
    let _: Refund = read("refund", &fixture("refund"));
    let ev: Event = read("event", &fixture("event"));
    assert!(!ev.event_type.is_empty());
}

#[test]
fn older_shapes_read() {
    // Periods and the plan on the subscription, a single `discount` with its coupon inline.
    let s: Subscription = read(
        "subscription",
        &json!({
            "id": "sub_old", "object": "subscription", "customer": {"id": "cus_1", "object": "customer"},
            "currency": "eur", "status": "past_due", "created": 1_600_000_000,
            "current_period_start": 1_600_000_000, "current_period_end": 1_602_592_000,
            "discount": {"coupon": {"id": "SAVE10", "percent_off": 10, "duration": "repeating", "duration_in_months": 3}, "start": 1_600_000_000, "end": null},
            "items": {"data": [{"id": "si_1", "plan": {"id": "plan_pro", "currency": "eur", "amount": 4900, "interval": "month", "interval_count": 1}, "quantity": 3}]}
        }),
    );
    assert_eq!(
        s.customer.as_deref(),
        Some("cus_1"),
        "an expanded customer reads as its id"
    );
    assert_eq!(s.current_period_end(), Some(1_602_592_000));
    assert_eq!(
        s.items.data[0].price().map(|p| p.amount),
        Some(Some(Decimal::from(4900)))
    );
    assert!(
        matches!(s.discount.as_ref().and_then(Discount::coupon), Some(CouponRef::Coupon(c)) if c.id == "SAVE10")
    );
    // The invoice's subscription at the top, a proration flag on the line, "inf" tiers.
    let inv: Invoice = read(
        "invoice",
        &json!({
            "id": "in_old", "currency": "usd", "created": 1, "subscription": "sub_old",
            "lines": {"data": [{"id": "il_1", "amount": -1250, "proration": true, "period": {"start": 1, "end": 2},
                                 "plan": {"id": "plan_pro", "currency": "usd", "amount": 4900, "interval": "month"}}],
                      "has_more": true}
        }),
    );
    assert_eq!(inv.subscription_id(), Some("sub_old"));
    assert!(
        inv.lines.has_more,
        "nested lists say when they were cut at 10"
    );
    assert!(inv.lines.data[0].is_proration());
    assert_eq!(inv.lines.data[0].price_id(), Some("plan_pro"));
    let p: Price = read(
        "price",
        &json!({"id": "price_t", "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "volume",
                "tiers": [{"up_to": 10, "unit_amount": 1000}, {"up_to": "inf", "unit_amount_decimal": "750.5"}]}),
    );
    let tiers = p.tiers.unwrap_or_default();
    assert_eq!((tiers[0].up_to, tiers[1].up_to), (Some(10), None));
    assert_eq!(tiers[1].unit_amount_decimal, Some(Decimal::new(7505, 1)));
}

#[test]
fn todays_line_shape_reads_proration_and_price() {
    let line: InvoiceLine = read(
        "line_item",
        &json!({"id": "il_2", "amount": 500,
                "parent": {"type": "subscription_item_details", "subscription_item_details": {"proration": true, "subscription_item": "si_1"}},
                "pricing": {"type": "price_details", "price_details": {"price": "price_pro", "product": "prod_1"}}}),
    );
    assert!(line.is_proration());
    assert_eq!(line.price_id(), Some("price_pro"));
}

#[test]
fn bad_input_names_the_object() {
    let e = parse::<Subscription>("subscription", br#"{"id": "sub_bad", "currency": "usd"}"#)
        .unwrap_err();
    assert_eq!((e.kind, e.id.as_str()), ("subscription", "sub_bad"));
    assert!(e.problem.contains("missing field"), "{e}");
    let e = parse::<Charge>("charge", b"{not json").unwrap_err();
    assert_eq!(e.id, "(no id)");
    let e = parse::<Subscription>(
        "subscription",
        br#"{"id": "sub_x", "customer": 42, "currency": "usd", "status": "active", "created": 1}"#,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("subscription sub_x: expected an id or an expanded object"),
        "{e}"
    );
    let e = parse::<Coupon>(
        "coupon",
        br#"{"id": "c", "duration": "once", "percent_off": "ten"}"#,
    )
    .unwrap_err();
    assert!(e.problem.contains("decimal \"ten\""), "{e}");
}

/// The paths read without a `Value` (`parent`, `pricing`) give what `Value::pointer` gave, for
/// every shape: missing, null, scalars, arrays, other types at the leaf, duplicate keys (the last
/// wins), escaped keys, deeper objects beside the path.
#[test]
fn paths_read_as_a_value_pointer_would() {
    let shapes = [
        json!(null),
        json!("x"),
        json!(7),
        json!([{"subscription_item_details": {"proration": true}}]),
        json!({}),
        json!({"subscription_item_details": null}),
        json!({"subscription_item_details": "si_1"}),
        json!({"subscription_item_details": {"proration": "yes"}}),
        json!({"subscription_item_details": {"proration": [true]}}),
        json!({"subscription_item_details": {"proration": true, "x": {"proration": false}}}),
        json!({"a": [1, {"b": null}], "subscription_item_details": {"proration": false}}),
        json!({"price_details": {"price": "price_1", "product": {"id": "prod_1"}}}),
        json!({"price_details": {"price": 42}}),
        json!({"price_details": {"price": null}}),
        json!({"subscription_details": {"subscription": "sub_1", "metadata": {"k": "v"}}}),
        json!({"subscription_details": {"subscription": {"id": "sub_1"}}}),
    ];
    let mut texts: Vec<String> = shapes.iter().map(Value::to_string).collect();
    // Duplicate keys (the last wins in a `Value`) and an escaped key: only as text.
    texts.push(
        r#"{"subscription_item_details": {"proration": true, "proration": false}}"#.to_owned(),
    );
    texts.push(
        r#"{"subscription_item_details": {"proration": false}, "subscription_item_details": {"proration": true}}"#
            .to_owned(),
    );
    texts.push(r#"{"price_details": {"pr\u0069ce": "price_esc"}}"#.to_owned());
    texts.push(r#"{"subscription_details": {"subscription": "sub_\"q\""}}"#.to_owned());
    for text in &texts {
        let value: Value = serde_json::from_str(text).expect("JSON");
        let line: InvoiceLine = parse(
            "line_item",
            format!(r#"{{"id": "il_1", "parent": {text}, "pricing": {text}}}"#).as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            line.is_proration(),
            value
                .pointer("/subscription_item_details/proration")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            "{text}"
        );
        assert_eq!(
            line.price_id(),
            value
                .pointer("/price_details/price")
                .and_then(Value::as_str),
            "{text}"
        );
        let invoice: Invoice = parse(
            "invoice",
            format!(r#"{{"id": "in_1", "currency": "usd", "created": 1, "parent": {text}}}"#)
                .as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            invoice.subscription_id(),
            value
                .pointer("/subscription_details/subscription")
                .and_then(Value::as_str),
            "{text}"
        );
    }
}

/// Amounts read as exact decimals from integers, negative integers, floats and decimal strings;
/// expanded objects read as their id.
#[test]
fn amounts_and_expanded_ids_read_exactly() {
    let c: Coupon = parse(
        "coupon",
        br#"{"id": "c", "duration": "once", "percent_off": 25.5, "amount_off": -300}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.percent_off, Some(Decimal::new(255, 1)));
    assert_eq!(c.amount_off, Some(Decimal::new(-300, 0)));
    let c: Coupon = parse(
        "coupon",
        br#"{"id": "c", "duration": "once", "percent_off": 1e2, "amount_off": "12.50"}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.percent_off, Some(Decimal::new(100, 0)));
    assert_eq!(c.amount_off, Some(Decimal::new(1250, 2)));
    let e = parse::<Coupon>(
        "coupon",
        br#"{"id": "c", "duration": "once", "percent_off": true}"#,
    )
    .unwrap_err();
    assert!(e.problem.contains("expected a number, found true"), "{e}");
    let s: Subscription = parse(
        "subscription",
        br#"{"id": "sub_1", "customer": {"id": "cus_x", "object": "customer", "metadata": {"id": 5}},
             "status": "active", "created": 1}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.customer.as_deref(), Some("cus_x"));
    let e = parse::<Subscription>(
        "subscription",
        br#"{"id": "sub_1", "customer": {"object": "customer"}, "status": "active", "created": 1}"#,
    )
    .unwrap_err();
    assert!(e.problem.contains("without a string `id`"), "{e}");
}
