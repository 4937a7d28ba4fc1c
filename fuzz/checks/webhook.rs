//! The billing webhook's verify-then-parse path. The first line of the input is the
//! `Stripe-Signature` header, the rest the body. Besides "no panic", two oracles:
//! - an accepted request carries, as one of its `v1` entries, exactly the lower-case hex HMAC
//!   Stripe's signer writes for the body at the header's timestamp, and that timestamp is within
//!   the tolerance (what the official SDKs accept);
//! - the header Stripe would send for the body is accepted.

use revpilot_stripe::billing::parse_event;
use revpilot_stripe::webhook::{SignatureHeader, signature_header, verify};
use secrecy::SecretString;

const SECRET: &str = "whsec_fuzz";
const NOW: i64 = 1_800_000_000;
const TOLERANCE: i64 = 300;

/// One input, as the `webhook` target and the regression replay run it; true when the request
/// was accepted.
pub(crate) fn run(data: &[u8]) -> bool {
    let _ = SignatureHeader::parse(&String::from_utf8_lossy(data));
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let header = String::from_utf8_lossy(header);
    let secrets = [SecretString::from(SECRET)];

    let stripes = signature_header(body, SECRET, NOW);
    assert!(
        verify(body, Some(&stripes), &secrets, NOW, TOLERANCE).is_ok(),
        "refused the header Stripe would send: {stripes}"
    );

    let Ok(parsed) = verify(body, Some(&header), &secrets, NOW, TOLERANCE) else {
        return false;
    };
    assert!(
        (parsed.timestamp - NOW).abs() <= TOLERANCE,
        "accepted outside the tolerance: {header}"
    );
    let expected = signature_header(body, SECRET, parsed.timestamp);
    let expected_v1 = expected.split_once(",v1=").map(|(_, v1)| v1);
    let signed = header
        .split(',')
        .filter_map(|part| part.trim().split_once('='))
        .any(|(key, value)| key == "v1" && Some(value) == expected_v1);
    assert!(signed, "accepted without a valid signature: {header}");
    let _ = parse_event(body);
    true
}
