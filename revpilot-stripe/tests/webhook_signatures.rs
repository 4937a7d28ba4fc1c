//! Signatures made by the official `stripe` Python SDK (from the virtualenv `scripts/test`
//! creates): exactly those are accepted; the same payload tampered, re-serialised, expired, from
//! the future or signed with another secret is refused.
#![allow(clippy::unwrap_used)]

use revpilot_stripe::fake::sdk_signature_header;
use revpilot_stripe::webhook::{SignatureError, TOLERANCE_SECS, verify};
use secrecy::SecretString;

fn sdk_header(venv: &str, payload: &str, secret: &str, t: i64) -> String {
    sdk_signature_header(venv, payload, secret, t)
}

#[test]
fn the_official_sdk_signatures_are_accepted_and_only_those() {
    let Ok(venv) = std::env::var("REVPILOT_TEST_VENV") else {
        eprintln!(
            "skipped: REVPILOT_TEST_VENV is not set (scripts/test creates the virtualenv and sets it)"
        );
        return;
    };
    let secret = "whsec_test_3f9c2a";
    let secrets = [SecretString::from(secret)];
    let now = 1_790_000_000;
    let payload = r#"{"id":"evt_1","object":"event","type":"checkout.session.completed","created":1790000000,"data":{"object":{"id":"cs_1","payment_status":"paid"}}}"#;
    let header = sdk_header(&venv, payload, secret, now);
    verify(
        payload.as_bytes(),
        Some(&header),
        &secrets,
        now,
        TOLERANCE_SECS,
    )
    .unwrap();

    let tampered = payload.replace("paid", "unpaid");
    assert_eq!(
        verify(
            tampered.as_bytes(),
            Some(&header),
            &secrets,
            now,
            TOLERANCE_SECS
        ),
        Err(SignatureError::Mismatch)
    );
    let reserialised =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(payload).unwrap())
            .unwrap();
    assert_eq!(
        verify(
            reserialised.as_bytes(),
            Some(&header),
            &secrets,
            now,
            TOLERANCE_SECS
        ),
        Err(SignatureError::Mismatch)
    );
    let expired = sdk_header(&venv, payload, secret, now - TOLERANCE_SECS - 1);
    assert!(matches!(
        verify(
            payload.as_bytes(),
            Some(&expired),
            &secrets,
            now,
            TOLERANCE_SECS
        ),
        Err(SignatureError::TooOld(_))
    ));
    let future = sdk_header(&venv, payload, secret, now + TOLERANCE_SECS + 1);
    assert!(matches!(
        verify(
            payload.as_bytes(),
            Some(&future),
            &secrets,
            now,
            TOLERANCE_SECS
        ),
        Err(SignatureError::FromTheFuture(_))
    ));
    let other = sdk_header(&venv, payload, "whsec_someone_else", now);
    assert_eq!(
        verify(
            payload.as_bytes(),
            Some(&other),
            &secrets,
            now,
            TOLERANCE_SECS
        ),
        Err(SignatureError::Mismatch)
    );
    // A secret rotating: Stripe sends both signatures; either secret alone verifies.
    let v1_other = other.split(",v1=").nth(1).unwrap();
    let both = format!("{header},v1={v1_other}");
    verify(
        payload.as_bytes(),
        Some(&both),
        &[SecretString::from("whsec_someone_else")],
        now,
        TOLERANCE_SECS,
    )
    .unwrap();
    verify(
        payload.as_bytes(),
        Some(&both),
        &secrets,
        now,
        TOLERANCE_SECS,
    )
    .unwrap();
}
