//! A string that must never reach a log line, a stats page or a `{:?}`.

use std::fmt;

use blake2::{Blake2s256, Digest};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison, so response timing does not reveal how much of a guess matched.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(candidate).into()
    }
}

/// Serialised as a digest, never as the value: the config's canonical form (its hash on the
/// stats endpoint, the comparison of a reloaded file with the running one) sees that a secret
/// changed without holding it. Unkeyed, so the same config hashes alike on every instance.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut hasher = Blake2s256::new();
        hasher.update(b"poolsocks secret\0");
        hasher.update(self.0.as_bytes());
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        serializer.collect_str(&format_args!("blake2s:{hex}"))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_mask_the_value() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{secret}").contains("hunter2"));
    }

    #[test]
    fn serialises_as_a_digest_that_changes_with_the_value() {
        let json = serde_json::to_string(&Secret::new("hunter2")).expect("serialise");
        assert!(!json.contains("hunter2"), "{json}");
        assert!(json.starts_with("\"blake2s:"), "{json}");
        let other = serde_json::to_string(&Secret::new("hunter3")).expect("serialise");
        assert_ne!(json, other);
    }

    #[test]
    fn matches_only_the_exact_value() {
        let secret = Secret::new("hunter2");
        assert!(secret.matches(b"hunter2"));
        assert!(!secret.matches(b"hunter"));
        assert!(!secret.matches(b"hunter22"));
        assert!(!secret.matches(b""));
    }
}
