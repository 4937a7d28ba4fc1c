//! A deterministic generator of Stripe-shaped exports (feature `synth`), shared by the tests, the
//! benchmarks and the sample data: customers signing up over the months, monthly, annual and
//! per-seat plans, 14-day trials, seat changes and plan swaps at renewal, cancellations at period
//! end, one invoice per period (today's shapes: the subscription under
//! `parent.subscription_details`, the price under `pricing.price_details`) and one succeeded
//! charge per paid invoice.
//!
//! Changes only happen at renewals, so an invoice's regular line tells the price and quantity of
//! its whole period: the DuckDB comparison in `benches/` reads the same MRR from invoice lines
//! with plain SQL.

use std::io::{self, Write};

use chrono::{DateTime, Months, TimeZone, Utc};
use serde_json::{Value, json};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthExport {
    /// Customers (one subscription each).
    pub customers: usize,
    /// Months of history, from 2023-01-01.
    pub months: u32,
    /// Seed; the same seed gives the same bytes.
    pub seed: u64,
}

struct Plan {
    id: &'static str,
    amount: i64,
    interval: &'static str,
    seats: bool,
}

const PLANS: [Plan; 6] = [
    Plan {
        id: "price_basic_monthly",
        amount: 2900,
        interval: "month",
        seats: false,
    },
    Plan {
        id: "price_pro_monthly",
        amount: 9900,
        interval: "month",
        seats: false,
    },
    Plan {
        id: "price_business_monthly",
        amount: 29900,
        interval: "month",
        seats: false,
    },
    Plan {
        id: "price_pro_annual",
        amount: 99000,
        interval: "year",
        seats: false,
    },
    Plan {
        id: "price_business_annual",
        amount: 299_000,
        interval: "year",
        seats: false,
    },
    Plan {
        id: "price_seat_monthly",
        amount: 1000,
        interval: "month",
        seats: true,
    },
];

fn price_json(p: &Plan) -> Value {
    json!({"id": p.id, "object": "price", "active": true, "billing_scheme": "per_unit",
           "created": 1_672_531_200, "currency": "usd", "livemode": false, "product": format!("prod_{}", p.id),
           "recurring": {"interval": p.interval, "interval_count": 1, "usage_type": "licensed"},
           "type": "recurring", "unit_amount": p.amount, "unit_amount_decimal": p.amount.to_string()})
}

fn add_period(t: DateTime<Utc>, interval: &str, n: u32) -> DateTime<Utc> {
    let months = if interval == "year" { 12 * n } else { n };
    t.checked_add_months(Months::new(months)).unwrap_or(t)
}

/// Writes one array member, with the separating comma when needed.
fn item(out: &mut impl Write, first: &mut bool, v: &Value) -> io::Result<()> {
    if !*first {
        out.write_all(b",")?;
    }
    *first = false;
    serde_json::to_writer(&mut *out, v).map_err(io::Error::other)
}

impl SynthExport {
    /// Writes the export as JSON (keys `prices`, `customers`, `subscriptions`, `invoices`,
    /// `charges`). Streams: memory stays small whatever the size.
    ///
    /// # Errors
    /// The writer's.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let start = Utc
            .with_ymd_and_hms(2023, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        let end = add_period(start, "month", self.months);
        let span = (end - start).num_seconds().max(1);
        let mut rng = fastrand::Rng::with_seed(self.seed);

        out.write_all(b"{\"prices\":[")?;
        let mut first = true;
        for p in &PLANS {
            item(out, &mut first, &price_json(p))?;
        }
        out.write_all(b"],\"customers\":[")?;
        // Sign-up instants, in order, so ids sort by creation.
        let mut created: Vec<i64> = (0..self.customers)
            .map(|_| start.timestamp() + rng.i64(0..span))
            .collect();
        created.sort_unstable();
        let mut first = true;
        for (n, c) in created.iter().enumerate() {
            let country = ["US", "DE", "GB", "FR", "CA"][n % 5];
            item(
                out,
                &mut first,
                &json!({"id": format!("cus_{n:07}"), "object": "customer", "created": c,
                "email": format!("c{n}@example.com"), "address": {"country": country}, "metadata": {}}),
            )?;
        }
        // Subscriptions, invoices and charges are generated together but written as three
        // arrays: buffer the two small ones, stream invoices (the bulk) to a second buffer.
        let mut subs: Vec<u8> = Vec::new();
        let mut invoices: Vec<u8> = Vec::new();
        let mut charges: Vec<u8> = Vec::new();
        let (mut first_sub, mut first_inv, mut first_ch) = (true, true, true);
        for (n, &c) in created.iter().enumerate() {
            let sub_id = format!("sub_{n:07}");
            let cus_id = format!("cus_{n:07}");
            let t0 = DateTime::from_timestamp(c, 0).unwrap_or(start);
            let mut plan = rng.usize(0..PLANS.len());
            let mut qty: u64 = if PLANS[plan].seats {
                rng.u64(1..=20)
            } else {
                1
            };
            let trial_end = (rng.u8(0..10) == 0).then(|| t0 + chrono::TimeDelta::days(14));
            let mut period_start = t0;
            let mut inv_n = 0;
            if let Some(te) = trial_end {
                let p = &PLANS[plan];
                item(
                    &mut invoices,
                    &mut first_inv,
                    &invoice(&sub_id, &cus_id, inv_n, p, qty, t0, te, 0),
                )?;
                inv_n += 1;
                period_start = te;
            }
            let mut ended: Option<(i64, i64)> = None;
            while period_start < end {
                let p = &PLANS[plan];
                let period_end = add_period(period_start, p.interval, 1);
                let amount = p.amount * qty as i64;
                item(
                    &mut invoices,
                    &mut first_inv,
                    &invoice(
                        &sub_id,
                        &cus_id,
                        inv_n,
                        p,
                        qty,
                        period_start,
                        period_end,
                        amount,
                    ),
                )?;
                item(
                    &mut charges,
                    &mut first_ch,
                    &json!({"id": format!("ch_{n:07}_{inv_n:03}"), "object": "charge",
                    "amount": amount, "amount_captured": amount, "amount_refunded": 0, "captured": true,
                    "created": period_start.timestamp() + 60, "currency": "usd", "customer": cus_id,
                    "paid": true, "status": "succeeded", "balance_transaction": format!("txn_{n:07}_{inv_n:03}"),
                    "billing_details": {"address": {"city": null, "country": "US", "line1": null, "line2": null, "postal_code": "12345", "state": null},
                                        "email": null, "name": "Customer Name", "phone": null},
                    "calculated_statement_descriptor": "ACME SAAS", "description": "Subscription update", "disputed": false,
                    "livemode": false, "metadata": {}, "outcome": {"network_status": "approved_by_network", "reason": null,
                        "risk_level": "normal", "risk_score": 32, "seller_message": "Payment complete.", "type": "authorized"},
                    "payment_intent": format!("pi_{n:07}_{inv_n:03}"), "payment_method": format!("pm_{n:07}"),
                    "payment_method_details": {"card": {"brand": "visa", "checks": {"address_line1_check": null,
                        "address_postal_code_check": "pass", "cvc_check": "pass"}, "country": "US", "exp_month": 12,
                        "exp_year": 2030, "fingerprint": "Xt5EWLLDS7FJjR1c", "funding": "credit", "last4": "4242",
                        "network": "visa"}, "type": "card"},
                    "receipt_url": format!("https://pay.stripe.com/receipts/invoices/test_{n:07}_{inv_n:03}"),
                    "refunds": {"object": "list", "data": [], "has_more": false, "url": "/v1/refunds"}}),
                )?;
                inv_n += 1;
                // At renewal: cancel (2 %), change seats or swap plan (5 %).
                let roll = rng.u8(0..100);
                if roll < 2 {
                    let requested = period_start.timestamp()
                        + rng.i64(0..(period_end - period_start).num_seconds().max(1));
                    ended = Some((requested, period_end.timestamp()));
                    break;
                } else if roll < 7 && period_end < end {
                    if PLANS[plan].seats {
                        qty = rng.u64(1..=20);
                    } else {
                        plan = rng.usize(0..PLANS.len() - 1);
                    }
                }
                period_start = period_end;
            }
            let p = &PLANS[plan];
            let (status, canceled_at, ended_at) = match ended {
                Some((req, at)) if at <= end.timestamp() => ("canceled", Some(req), Some(at)),
                Some((req, _)) => ("active", Some(req), None),
                None => ("active", None, None),
            };
            let cancel_at = match (ended, ended_at) {
                (Some((_, at)), None) => Some(at),
                _ => None,
            };
            item(
                &mut subs,
                &mut first_sub,
                &json!({
                "id": sub_id, "object": "subscription", "customer": cus_id, "currency": "usd",
                "status": status, "created": c, "start_date": c,
                "trial_start": trial_end.map(|_| c), "trial_end": trial_end.map(|t| t.timestamp()),
                "cancel_at_period_end": ended.is_some(), "canceled_at": canceled_at, "ended_at": ended_at,
                "cancel_at": cancel_at, "pause_collection": null, "discounts": [], "metadata": {},
                "items": {"object": "list", "has_more": false, "url": "/v1/subscription_items", "data": [{
                    "id": format!("si_{n:07}"), "object": "subscription_item", "created": c, "quantity": qty,
                    "subscription": sub_id, "price": price_json(p),
                    "current_period_start": period_start.timestamp().min(end.timestamp()),
                    "current_period_end": add_period(period_start, p.interval, 1).timestamp()}]}}),
            )?;
        }
        out.write_all(b"],\"subscriptions\":[")?;
        out.write_all(&subs)?;
        out.write_all(b"],\"invoices\":[")?;
        out.write_all(&invoices)?;
        out.write_all(b"],\"charges\":[")?;
        out.write_all(&charges)?;
        out.write_all(b"],\"coupons\":[],\"events\":[]}")?;
        out.flush()
    }
}

#[allow(clippy::too_many_arguments)]
fn invoice(
    sub: &str,
    cus: &str,
    n: usize,
    p: &Plan,
    qty: u64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    amount: i64,
) -> Value {
    let id = format!("in_{}_{n:03}", &sub[4..]);
    let number = format!("{}-{n:04}", &sub[4..]);
    let mut inv = json!({"id": id, "object": "invoice", "customer": cus, "currency": "usd",
           "created": from.timestamp(), "status": "paid", "billing_reason": if n == 0 { "subscription_create" } else { "subscription_cycle" },
           "amount_due": amount, "amount_paid": amount, "total": amount, "discounts": [],
           "parent": {"type": "subscription_details", "quote_details": null,
                      "subscription_details": {"metadata": {}, "subscription": sub}},
           "lines": {"object": "list", "has_more": false, "url": format!("/v1/invoices/{id}/lines"), "data": [{
               "id": format!("il_{}_{n:03}", &sub[4..]), "object": "line_item", "amount": amount, "currency": "usd",
               "quantity": qty, "period": {"start": from.timestamp(), "end": to.timestamp()},
               "parent": {"type": "subscription_item_details", "invoice_item_details": null,
                          "subscription_item_details": {"invoice_item": null, "proration": false,
                              "proration_details": {"credited_items": null}, "subscription": sub,
                              "subscription_item": format!("si_{}", &sub[4..])}},
               "pricing": {"type": "price_details", "price_details": {"price": p.id, "product": format!("prod_{}", p.id)},
                           "unit_amount_decimal": p.amount.to_string()}}]}});
    // The rest of an invoice as Stripe sends it: read past, never used.
    let extra = json!({"account_country": "US", "account_name": "Acme SaaS Inc.", "account_tax_ids": null,
        "amount_remaining": 0, "amount_shipping": 0, "application": null, "attempt_count": 1, "attempted": true,
        "auto_advance": false, "automatic_tax": {"enabled": false, "liability": null, "status": null},
        "collection_method": "charge_automatically", "custom_fields": null,
        "customer_address": {"city": "Springfield", "country": "US", "line1": "1 Main St", "line2": null, "postal_code": "12345", "state": "CA"},
        "customer_email": format!("{cus}@example.com"), "customer_name": "Customer Name", "customer_phone": null,
        "customer_shipping": null, "customer_tax_exempt": "none", "customer_tax_ids": [], "default_payment_method": null,
        "default_source": null, "default_tax_rates": [], "description": null, "due_date": null,
        "effective_at": from.timestamp(), "ending_balance": 0, "footer": null, "from_invoice": null,
        "hosted_invoice_url": format!("https://invoice.stripe.com/i/acct_1Nv0FGQ9RKHgCVdK/test_{number}"),
        "invoice_pdf": format!("https://pay.stripe.com/invoice/acct_1Nv0FGQ9RKHgCVdK/test_{number}/pdf"),
        "issuer": {"type": "self"}, "last_finalization_error": null, "latest_revision": null, "livemode": false,
        "metadata": {}, "next_payment_attempt": null, "number": number, "on_behalf_of": null,
        "payment_settings": {"default_mandate": null, "payment_method_options": null, "payment_method_types": null},
        "period_end": from.timestamp(), "period_start": from.timestamp(), "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0, "receipt_number": null, "shipping_cost": null, "shipping_details": null,
        "starting_balance": 0, "statement_descriptor": null,
        "status_transitions": {"finalized_at": from.timestamp(), "marked_uncollectible_at": null, "paid_at": from.timestamp() + 60, "voided_at": null},
        "subtotal": amount, "subtotal_excluding_tax": amount, "test_clock": null, "total_discount_amounts": [],
        "total_excluding_tax": amount, "total_taxes": [], "webhooks_delivered_at": from.timestamp()});
    if let (Some(o), Value::Object(extra)) = (inv.as_object_mut(), extra) {
        o.extend(extra);
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::Export;
    use crate::rebuild::rebuild;

    #[test]
    fn the_same_seed_gives_the_same_export_and_it_rebuilds_cleanly() {
        let cfg = SynthExport {
            customers: 300,
            months: 12,
            seed: 7,
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        cfg.write(&mut a).unwrap();
        cfg.write(&mut b).unwrap();
        assert_eq!(a, b);
        let export = Export::from_json(&a).unwrap();
        assert_eq!(export.customers.len(), 300);
        assert_eq!(export.subscriptions.len(), 300);
        assert!(export.invoices.len() > 300 * 3);
        let r = rebuild(&export);
        // Plan changes take effect at a renewal without proration, so the renewal's invoice is
        // all that dates them: the rebuild says so, and reads nothing else as odd.
        assert!(
            r.issues
                .iter()
                .all(|i| i.problem.contains("dated by invoice in_")),
            "a synthetic export reads without other issues: {:?}",
            r.issues
        );
        assert_eq!(r.account.subscriptions.len(), 300);
    }
}
