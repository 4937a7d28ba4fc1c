//! Stripe webhook signatures (`Stripe-Signature: t=...,v1=...,v1=...`), checked before anything
//! is written.
//!
//! The signature is HMAC-SHA256 with the endpoint secret over `{t}.{payload}`, hex-encoded. While a
//! secret rotates Stripe signs with both and sends several `v1` entries: the payload is accepted
//! when **any** of them matches any of the secrets (async-stripe keeps only the last `v1`, so this
//! is done here with `hmac`, `sha2` and a constant-time compare from `subtle`). Other schemes
//! (`v0`) are ignored. The timestamp must be within the tolerance of `now`, in both directions.
//!
//! A `v1` is exactly what Stripe's signer writes: 64 lower-case hex digits. The official SDKs
//! compare that lower-case string, so they refuse `B8565f...` even when it decodes to the right
//! bytes; decoding case-insensitively would accept headers Stripe never sends, so any other
//! spelling makes the header unreadable here.

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Stripe's default tolerance, seconds.
pub const TOLERANCE_SECS: i64 = 300;

/// Why a webhook is refused. Every variant means: answer 400, write nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// No endpoint secret is configured.
    #[error("no webhook secret is configured")]
    MissingSecret,
    /// The request has no `Stripe-Signature` header.
    #[error("the Stripe-Signature header is missing")]
    MissingHeader,
    /// The header cannot be read.
    #[error("the Stripe-Signature header cannot be read: {0}")]
    Unparsable(String),
    /// The header carries no `v1` signature.
    #[error("the Stripe-Signature header has no v1 signature")]
    NoV1,
    /// No `v1` signature matches the payload under any secret.
    #[error("no v1 signature matches the payload")]
    Mismatch,
    /// The timestamp is older than the tolerance.
    #[error("the signature timestamp is {0} s old, beyond the tolerance")]
    TooOld(i64),
    /// The timestamp is in the future beyond the tolerance.
    #[error("the signature timestamp is {0} s in the future, beyond the tolerance")]
    FromTheFuture(i64),
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    /// `t`: unix seconds.
    pub timestamp: i64,
    /// Every `v1` signature, decoded.
    pub v1: Vec<Vec<u8>>,
}

/// The length of a `v1` signature: an HMAC-SHA256 in hex.
const V1_HEX_LEN: usize = 64;

/// Decodes a `v1` signature written as Stripe writes it (64 lower-case hex digits), else `None`.
fn decode_v1(value: &str) -> Option<Vec<u8>> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if value.len() != V1_HEX_LEN || !value.bytes().all(lower_hex) {
        return None;
    }
    hex::decode(value).ok()
}

impl SignatureHeader {
    /// Parses `t=...,v1=...[,v1=...][,v0=...]`.
    ///
    /// # Errors
    /// [`SignatureError::Unparsable`] for a missing or repeated `t`, a non-integer `t`, an entry
    /// without `=`, or a `v1` that is not 64 lower-case hex digits; [`SignatureError::NoV1`]
    /// without any `v1`.
    pub fn parse(header: &str) -> Result<Self, SignatureError> {
        let mut timestamp = None;
        let mut v1 = Vec::new();
        for part in header.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| SignatureError::Unparsable(format!("entry {part:?} has no '='")))?;
            match key {
                "t" => {
                    if timestamp.is_some() {
                        return Err(SignatureError::Unparsable("more than one t".into()));
                    }
                    let t = value.parse::<i64>().map_err(|_| {
                        SignatureError::Unparsable(format!("timestamp {value:?} is not an integer"))
                    })?;
                    timestamp = Some(t);
                }
                "v1" => v1.push(decode_v1(value).ok_or_else(|| {
                    SignatureError::Unparsable(format!(
                        "v1 signature {value:?} is not 64 lower-case hex digits"
                    ))
                })?),
                _ => {} // other schemes (v0) are not Stripe's live signatures
            }
        }
        let timestamp = timestamp.ok_or_else(|| SignatureError::Unparsable("no t".into()))?;
        if v1.is_empty() {
            return Err(SignatureError::NoV1);
        }
        Ok(SignatureHeader { timestamp, v1 })
    }
}

/// Endpoint secrets as configured: comma-separated while rotating (`whsec_new,whsec_old`),
/// blanks dropped.
pub fn secrets_from_csv(csv: &str) -> Vec<SecretString> {
    csv.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_owned()))
        .collect()
}

/// A `Stripe-Signature` header for `payload` signed with `secret` at `timestamp` (unix
/// seconds), as Stripe makes it: for tests, fakes and load generators.
pub fn signature_header(payload: &[u8], secret: &str, timestamp: i64) -> String {
    let hex = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_or_else(
        |_| String::new(),
        |mut mac| {
            mac.update(format!("{timestamp}.").as_bytes());
            mac.update(payload);
            hex::encode(mac.finalize().into_bytes())
        },
    );
    format!("t={timestamp},v1={hex}")
}

/// Checks a webhook's `Stripe-Signature` header against the raw `payload` and the endpoint
/// `secrets` (more than one while rotating), at `now` (unix seconds; injectable for tests).
///
/// # Errors
/// A [`SignatureError`] naming why the request must be refused.
pub fn verify(
    payload: &[u8],
    header: Option<&str>,
    secrets: &[SecretString],
    now: i64,
    tolerance: i64,
) -> Result<SignatureHeader, SignatureError> {
    if secrets.iter().all(|s| s.expose_secret().is_empty()) {
        return Err(SignatureError::MissingSecret);
    }
    let header = SignatureHeader::parse(header.ok_or(SignatureError::MissingHeader)?)?;
    let age = now.saturating_sub(header.timestamp);
    if age > tolerance {
        return Err(SignatureError::TooOld(age));
    }
    let ahead = header.timestamp.saturating_sub(now);
    if ahead > tolerance {
        return Err(SignatureError::FromTheFuture(ahead));
    }
    let signed = header.timestamp.to_string();
    let matches = secrets
        .iter()
        .filter(|s| !s.expose_secret().is_empty())
        .any(|secret| {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
            else {
                return false;
            };
            mac.update(signed.as_bytes());
            mac.update(b".");
            mac.update(payload);
            let expected = mac.finalize().into_bytes();
            // Every candidate is compared (no early exit on the first match's position).
            header
                .v1
                .iter()
                .fold(subtle::Choice::from(0), |acc, sig| {
                    acc | expected.as_slice().ct_eq(sig.as_slice())
                })
                .into()
        });
    if matches {
        Ok(header)
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn secrets_are_read_comma_separated_while_rotating() {
        let secrets = secrets_from_csv(" whsec_new, whsec_old ,,");
        let got: Vec<&str> = secrets.iter().map(|s| s.expose_secret()).collect();
        assert_eq!(got, ["whsec_new", "whsec_old"]);
        assert!(secrets_from_csv(" ").is_empty());
    }

    use super::*;

    fn sign(payload: &[u8], secret: &str, t: i64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(payload);
        hex::encode(mac.finalize().into_bytes())
    }

    fn secrets(s: &[&str]) -> Vec<SecretString> {
        s.iter().map(|x| SecretString::from(*x)).collect()
    }

    #[test]
    fn any_v1_under_any_secret_is_accepted_and_other_schemes_ignored() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign(body, "whsec_new", 1000);
        let header = format!("t=1000,v1={},v0=abc,v1={good}", "00".repeat(32));
        verify(
            body,
            Some(&header),
            &secrets(&["whsec_old", "whsec_new"]),
            1000,
            300,
        )
        .unwrap();
        let only_old = secrets(&["whsec_old"]);
        assert_eq!(
            verify(body, Some(&header), &only_old, 1000, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn bad_headers_are_named() {
        let s = secrets(&["whsec_x"]);
        let check = |h: Option<&str>| verify(b"{}", h, &s, 1000, 300).unwrap_err();
        assert_eq!(check(None), SignatureError::MissingHeader);
        assert!(matches!(
            check(Some("v1=00")),
            SignatureError::Unparsable(_)
        ));
        assert!(matches!(
            check(Some("t=x,v1=00")),
            SignatureError::Unparsable(_)
        ));
        assert!(matches!(
            check(Some("t=1,t=2,v1=00")),
            SignatureError::Unparsable(_)
        ));
        assert!(matches!(
            check(Some("t=1000,v1=zz")),
            SignatureError::Unparsable(_)
        ));
        assert!(matches!(
            check(Some("garbage")),
            SignatureError::Unparsable(_)
        ));
        assert_eq!(check(Some("t=1000,v0=00")), SignatureError::NoV1);
        // Not as Stripe writes a v1: too short, too long.
        assert!(matches!(
            check(Some("t=1000,v1=00")),
            SignatureError::Unparsable(_)
        ));
        let long = format!("t=1000,v1={}", "0".repeat(66));
        assert!(matches!(check(Some(&long)), SignatureError::Unparsable(_)));
        assert_eq!(
            verify(b"{}", Some("t=1000,v1=00"), &secrets(&[""]), 1000, 300),
            Err(SignatureError::MissingSecret)
        );
        assert_eq!(
            verify(b"{}", Some("t=1000,v1=00"), &[], 1000, 300),
            Err(SignatureError::MissingSecret)
        );
    }

    #[test]
    fn only_lower_case_hex_is_a_v1_signature() {
        let s = secrets(&["whsec_x"]);
        let good = sign(b"{}", "whsec_x", 1000);
        verify(b"{}", Some(&format!("t=1000,v1={good}")), &s, 1000, 300).unwrap();
        // The same bytes with one digit in upper case: the official SDKs refuse it, and so does
        // this (it still needs the HMAC, but Stripe never sends it).
        let i = good.find(|c: char| c.is_ascii_alphabetic()).unwrap();
        let mut shouted = good.clone();
        shouted.replace_range(i..=i, &good[i..=i].to_ascii_uppercase());
        assert!(matches!(
            verify(b"{}", Some(&format!("t=1000,v1={shouted}")), &s, 1000, 300),
            Err(SignatureError::Unparsable(_))
        ));
        let upper = good.to_ascii_uppercase();
        assert!(matches!(
            verify(b"{}", Some(&format!("t=1000,v1={upper}")), &s, 1000, 300),
            Err(SignatureError::Unparsable(_))
        ));
    }

    #[test]
    fn the_tolerance_holds_both_ways() {
        let s = secrets(&["whsec_x"]);
        let h = |t: i64| format!("t={t},v1={}", sign(b"{}", "whsec_x", t));
        verify(b"{}", Some(&h(700)), &s, 1000, 300).unwrap();
        verify(b"{}", Some(&h(1300)), &s, 1000, 300).unwrap();
        assert_eq!(
            verify(b"{}", Some(&h(699)), &s, 1000, 300),
            Err(SignatureError::TooOld(301))
        );
        assert_eq!(
            verify(b"{}", Some(&h(1301)), &s, 1000, 300),
            Err(SignatureError::FromTheFuture(301))
        );
        assert!(
            verify(b"{}", Some(&h(i64::MIN)), &s, i64::MAX, 300).is_err(),
            "no overflow"
        );
        assert!(
            verify(b"{}", Some(&h(i64::MAX)), &s, i64::MIN, 300).is_err(),
            "no overflow"
        );
    }
}
