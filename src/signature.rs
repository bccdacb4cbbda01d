//! Standard Webhooks 1.0 signing: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
//!
//! The key is the base64 text after the `whsec_` prefix, as every Standard
//! Webhooks library reads it, so a receiver can verify with any of them.
//! Pure functions only; `deliver` calls [`SigningKey::sign`] once per attempt
//! because the timestamp, and so the signature, changes on every attempt.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

/// A webhook's signing key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct SigningKey(SecretSlice<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// Why a secret is not a usable signing key. The message never quotes it.
#[derive(Debug, thiserror::Error)]
#[error("the webhook secret must be \"whsec_\" followed by base64 (as Standard Webhooks generates it)")]
pub struct BadSecret;

impl SigningKey {
    /// Parses `whsec_<base64>` (the prefix is optional, as in the reference
    /// libraries). An empty or non-base64 key is refused.
    pub fn parse(secret: &str) -> Result<SigningKey, BadSecret> {
        let text = secret.trim();
        let text = text.strip_prefix("whsec_").unwrap_or(text);
        let bytes = BASE64.decode(text).map_err(|_| BadSecret)?;
        if bytes.is_empty() {
            return Err(BadSecret);
        }
        Ok(SigningKey(SecretSlice::from(bytes)))
    }

    /// The `webhook-signature` header value for one attempt.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", BASE64.encode(self.mac(msg_id, timestamp, body)))
    }

    /// Whether `header` (space-separated `v1,<sig>` entries) holds a valid
    /// signature of this message. Used by the demo's receiver and tests.
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        header.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|sig| {
            BASE64.decode(sig).is_ok_and(|given| {
                // Constant-time comparison through the MAC type.
                let mut mac = self.hmac();
                mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
                mac.update(body);
                mac.verify_slice(&given).is_ok()
            })
        })
    }

    fn hmac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(self.0.expose_secret()).expect("HMAC takes keys of any length")
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
        let mut mac = self.hmac();
        mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
        mac.update(body);
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks specification.
    #[test]
    fn matches_the_specification_example() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(key.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, &sig));
        assert!(!key.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, &sig));
    }

    #[test]
    fn refuses_bad_secrets() {
        assert!(SigningKey::parse("whsec_").is_err());
        assert!(SigningKey::parse("whsec_not base64!").is_err());
        assert!(format!("{:?}", SigningKey::parse("whsec_AAAA").unwrap()).contains("redacted"));
    }
}
