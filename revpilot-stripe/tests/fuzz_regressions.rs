//! Every input kept in `fuzz/regressions/` (crashes the fuzzer found, and hand-written edge cases)
//! goes through what the fuzz target exercises: errors are fine, panics are not.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use revpilot_stripe::export::Export;
use revpilot_stripe::objects::{
    Charge, Coupon, Customer, Event, Invoice, Price, Subscription, parse,
};
use revpilot_stripe::rebuild::rebuild;

#[test]
fn saved_fuzz_inputs_do_not_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut seen = 0;
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
        seen += 1;
    }
    assert!(
        seen >= 4,
        "the regression inputs are where this test looks: {}",
        dir.display()
    );
}
