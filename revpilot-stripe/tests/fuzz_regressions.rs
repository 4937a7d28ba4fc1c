//! Every input kept in `fuzz/regressions/` (crashes the fuzzer found, and hand-written edge cases)
//! goes through what the fuzz target exercises: errors are fine, panics are not.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use revpilot_stripe::export::Export;
use revpilot_stripe::objects::{
    Charge, Coupon, Customer, Event, Invoice, Price, Subscription, parse,
};
use revpilot_stripe::rebuild::rebuild;

/// The fuzz target's webhook oracle: first line the header, the rest the body.
fn accepted_only_when_signed(data: &[u8]) -> bool {
    use revpilot_stripe::webhook::{signature_header, verify};
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let header = String::from_utf8_lossy(header);
    let secrets = [secrecy::SecretString::from("whsec_fuzz")];
    match verify(body, Some(&header), &secrets, 1_800_000_000, 300) {
        Ok(parsed) => {
            let expected = signature_header(body, "whsec_fuzz", parsed.timestamp);
            let v1 = expected.split("v1=").nth(1).unwrap();
            assert!(header.contains(v1), "accepted without a valid signature");
            revpilot_stripe::billing::parse_event(body).unwrap();
            true
        }
        Err(_) => false,
    }
}

#[test]
fn saved_fuzz_inputs_do_not_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut seen = 0;
    let mut accepted = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Ok(export) = Export::from_json(&data) {
            let _ = rebuild(&export);
        }
        let _ = parse::<Customer>("customer", &data);
        let _ = parse::<Subscription>("subscription", &data);
        let _ = parse::<Invoice>("invoice", &data);
        let _ = parse::<Charge>("charge", &data);
        let _ = parse::<Price>("price", &data);
        let _ = parse::<Coupon>("coupon", &data);
        let _ = parse::<Event>("event", &data);
        let _ = revpilot_stripe::webhook::SignatureHeader::parse(&String::from_utf8_lossy(&data));
        let _ = revpilot_stripe::billing::parse_event(&data);
        accepted += usize::from(accepted_only_when_signed(&data));
        seen += 1;
    }
    assert_eq!(accepted, 1, "signed-webhook.txt, and only it, is accepted");
    assert!(
        seen >= 5,
        "the regression inputs are where this test looks: {}",
        dir.display()
    );
}
