//! Arbitrary bytes into the export reader, the history rebuild, every Stripe-object parser, the
//! `Stripe-Signature` header parser and the billing webhook's verify-then-parse path: errors are
//! fine, panics are not, and no request is accepted without a valid signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use revpilot_stripe::billing::parse_event;
use revpilot_stripe::export::Export;
use revpilot_stripe::objects::{
    Charge, Coupon, Customer, Event, Invoice, Price, Subscription, parse,
};
use revpilot_stripe::rebuild::rebuild;
use revpilot_stripe::webhook::{SignatureHeader, signature_header, verify};
use secrecy::SecretString;

const SECRET: &str = "whsec_fuzz";
const NOW: i64 = 1_800_000_000;

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
    let _ = parse_event(data);
    let _ = SignatureHeader::parse(&String::from_utf8_lossy(data));

    // A webhook: the first line is the Stripe-Signature header, the rest the body. Accepted only
    // when the header carries the body's true HMAC at its timestamp.
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let header = String::from_utf8_lossy(header);
    let secrets = [SecretString::from(SECRET)];
    if let Ok(parsed) = verify(body, Some(&header), &secrets, NOW, 300) {
        let expected = signature_header(body, SECRET, parsed.timestamp);
        let v1 = expected.split("v1=").nth(1).unwrap_or_default();
        assert!(
            header.contains(v1) && !v1.is_empty(),
            "accepted without a valid signature: {header}"
        );
        let _ = parse_event(body);
    }
});
