//! Arbitrary bytes into the export reader, the history rebuild and every Stripe-object parser:
//! errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use revpilot_stripe::export::Export;
use revpilot_stripe::objects::{
    Charge, Coupon, Customer, Event, Invoice, Price, Subscription, parse,
};
use revpilot_stripe::rebuild::rebuild;

fuzz_target!(|data: &[u8]| {
    if let Ok(export) = Export::from_json(data) {
        let _ = rebuild(&export);
    }
    let _ = parse::<Customer>("customer", data);
    let _ = parse::<Subscription>("subscription", data);
    let _ = parse::<Invoice>("invoice", data);
    let _ = parse::<Charge>("charge", data);
    let _ = parse::<Price>("price", data);
    let _ = parse::<Coupon>("coupon", data);
    let _ = parse::<Event>("event", data);
    let _ = revpilot_stripe::webhook::SignatureHeader::parse(&String::from_utf8_lossy(data));
});
