//! Encryption of stored Stripe tokens: AES-256-GCM with a random 96-bit nonce per write,
//! associated data binding each ciphertext to its connection, user and field, and a key id beside
//! it so keys can rotate. Keys come from configuration, never from the database.

use std::fmt;

use aes_gcm::aead::{Aead, Generate, Nonce, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// Why a key ring cannot be built from configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No key was configured.
    #[error("no encryption key configured: set REVPILOT_ENCRYPTION_KEY to `id:base64-of-32-bytes`")]
    Missing,
    /// A key entry is malformed.
    #[error("encryption key {id:?}: {problem}")]
    Invalid {
        /// The key id (or the entry's position when it has none).
        id: String,
        /// What is wrong.
        problem: String,
    },
}

/// The configured keys: the first encrypts, every one decrypts what it encrypted.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<(String, Aes256Gcm)>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

/// A sealed secret as stored: the key id and base64 of nonce || ciphertext || tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Which key sealed it.
    pub key_id: String,
    /// base64(nonce || ciphertext || tag).
    pub data: String,
}

impl KeyRing {
    /// Parses `id:base64key[,id:base64key...]`; the first key is the current one. Each key is 32
    /// random bytes (e.g. `openssl rand -base64 32`).
    ///
    /// # Errors
    /// [`KeyError::Missing`] for an empty spec; [`KeyError::Invalid`] naming the bad entry.
    pub fn parse(spec: &str) -> Result<KeyRing, KeyError> {
        let mut keys = Vec::new();
        for (i, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, b64) = entry.split_once(':').ok_or_else(|| KeyError::Invalid {
                id: format!("#{}", i + 1),
                problem: "expected `id:base64-key`".into(),
            })?;
            let invalid = |problem: String| KeyError::Invalid {
                id: id.to_owned(),
                problem,
            };
            if id.is_empty() || keys.iter().any(|(k, _)| k == id) {
                return Err(invalid("key ids must be non-empty and distinct".into()));
            }
            let bytes = B64
                .decode(b64)
                .map_err(|e| invalid(format!("not base64: {e}")))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| invalid(format!("a key is 32 bytes, this one is {}", bytes.len())))?;
            keys.push((id.to_owned(), cipher));
        }
        if keys.is_empty() {
            return Err(KeyError::Missing);
        }
        Ok(KeyRing { keys })
    }

    /// The id of the key new secrets are sealed with.
    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plaintext`, bound to `context` (which must be given again to open it).
    ///
    /// # Errors
    /// A message when the system's random source fails.
    pub fn seal(&self, plaintext: &str, context: &str) -> Result<Sealed, String> {
        let (id, cipher) = &self.keys[0];
        let nonce = Nonce::<Aes256Gcm>::try_generate()
            .map_err(|e| format!("no randomness for a nonce: {e}"))?;
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| "encryption failed".to_owned())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(Sealed {
            key_id: id.clone(),
            data: B64.encode(out),
        })
    }

    /// Opens a sealed secret with the key it names and the same `context`.
    ///
    /// # Errors
    /// A message naming the problem: unknown key id, malformed data, or a ciphertext that fails
    /// authentication (altered, swapped from another record, or sealed with another key).
    pub fn open(&self, sealed: &Sealed, context: &str) -> Result<String, String> {
        let cipher = self
            .keys
            .iter()
            .find(|(id, _)| *id == sealed.key_id)
            .map(|(_, c)| c)
            .ok_or_else(|| format!("key {:?} is not configured", sealed.key_id))?;
        let bytes = B64
            .decode(&sealed.data)
            .map_err(|_| "ciphertext is not base64".to_owned())?;
        if bytes.len() < 12 + 16 {
            return Err("ciphertext is truncated".into());
        }
        let (nonce, ct) = bytes.split_at(12);
        let nonce = Nonce::<Aes256Gcm>::try_from(nonce).map_err(|_| "bad nonce".to_owned())?;
        let plain = cipher
            .decrypt(&nonce, Payload { msg: ct, aad: context.as_bytes() })
            .map_err(|_| {
                "ciphertext failed authentication (altered, moved from another record, or wrong key)".to_owned()
            })?;
        String::from_utf8(plain).map_err(|_| "decrypted secret is not UTF-8".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        B64.encode([byte; 32])
    }

    #[test]
    fn seal_and_open_bound_to_context() {
        let ring = KeyRing::parse(&format!("k1:{}", key(1))).unwrap();
        let a = ring.seal("sk_live_secret", "conn-1/user-1/access").unwrap();
        let b = ring.seal("sk_live_secret", "conn-1/user-1/access").unwrap();
        assert_ne!(a.data, b.data, "a random nonce per write");
        assert_eq!(
            ring.open(&a, "conn-1/user-1/access").unwrap(),
            "sk_live_secret"
        );
        let moved = ring.open(&a, "conn-2/user-1/access").unwrap_err();
        assert!(moved.contains("failed authentication"), "{moved}");
        let mut altered = a.clone();
        let mut raw = B64.decode(&altered.data).unwrap();
        raw[20] ^= 1;
        altered.data = B64.encode(raw);
        assert!(ring.open(&altered, "conn-1/user-1/access").is_err());
    }

    #[test]
    fn rotation_and_configuration_errors() {
        let old = KeyRing::parse(&format!("old:{}", key(1))).unwrap();
        let sealed = old.seal("tok", "ctx").unwrap();
        let both = KeyRing::parse(&format!("new:{}, old:{}", key(2), key(1))).unwrap();
        assert_eq!(both.open(&sealed, "ctx").unwrap(), "tok");
        assert_eq!(both.seal("tok", "ctx").unwrap().key_id, "new");
        let only_new = KeyRing::parse(&format!("new:{}", key(2))).unwrap();
        assert!(
            only_new
                .open(&sealed, "ctx")
                .unwrap_err()
                .contains("\"old\" is not configured")
        );

        assert_eq!(KeyRing::parse("").unwrap_err(), KeyError::Missing);
        assert!(matches!(
            KeyRing::parse("nocolon").unwrap_err(),
            KeyError::Invalid { .. }
        ));
        let short = KeyRing::parse(&format!("k:{}", B64.encode([0u8; 16]))).unwrap_err();
        assert!(
            short.to_string().contains("32 bytes, this one is 16"),
            "{short}"
        );
        assert!(
            KeyRing::parse("k:!!!")
                .unwrap_err()
                .to_string()
                .contains("not base64")
        );
        assert!(
            KeyRing::parse(&format!("k:{},k:{}", key(1), key(2))).is_err(),
            "duplicate ids"
        );
        assert!(
            !format!("{both:?}").contains(&key(2)),
            "Debug never prints keys"
        );
    }
}
