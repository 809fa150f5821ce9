//! Authentication of mutating API requests.
//!
//! A request presents `Authorization: Bearer <secret>`; a [`CredentialStore`] says which
//! principal (if any) the secret belongs to. Today the only store is [`TokenStore`], the one
//! token of the board config (the operator's); USB pairing will add a store of per-device
//! credentials (issued to a phone, revocable one by one) behind the same trait, and
//! [`Credentials`] chains several stores.

use std::sync::Arc;

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// A name for logs: "operator", "device:<id>".
    pub name: String,
}

/// Something that recognises bearer secrets.
pub trait CredentialStore: Send + Sync {
    /// The principal `secret` authenticates, or `None`.
    fn authenticate(&self, secret: &str) -> Option<Principal>;
}

/// Compares in time independent of where the inputs first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The board config's single operator token.
pub struct TokenStore {
    token: String,
    principal: String,
}

impl TokenStore {
    /// A store accepting `token` as `principal`.
    pub fn new(token: impl Into<String>, principal: impl Into<String>) -> Self {
        TokenStore {
            token: token.into(),
            principal: principal.into(),
        }
    }
}

impl CredentialStore for TokenStore {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        constant_time_eq(secret.as_bytes(), self.token.as_bytes()).then(|| Principal {
            name: self.principal.clone(),
        })
    }
}

/// Several stores, tried in order.
#[derive(Clone, Default)]
pub struct Credentials {
    stores: Vec<Arc<dyn CredentialStore>>,
}

impl Credentials {
    /// Adds a store.
    pub fn with(mut self, s: Arc<dyn CredentialStore>) -> Self {
        self.stores.push(s);
        self
    }

    /// Checks an `Authorization` header value (`Bearer <secret>`).
    pub fn check_header(&self, header: Option<&str>) -> Result<Principal, &'static str> {
        let h = header.ok_or("missing Authorization header")?;
        let secret = h
            .strip_prefix("Bearer ")
            .ok_or("Authorization is not a Bearer credential")?
            .trim();
        self.stores
            .iter()
            .find_map(|s| s.authenticate(secret))
            .ok_or("the bearer token is not valid here")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked_against_every_store() {
        let c = Credentials::default()
            .with(Arc::new(TokenStore::new("secret-1", "operator")))
            .with(Arc::new(TokenStore::new("device-key", "device:phone")));
        assert_eq!(
            c.check_header(Some("Bearer secret-1")).unwrap().name,
            "operator"
        );
        assert_eq!(
            c.check_header(Some("Bearer device-key")).unwrap().name,
            "device:phone"
        );
        assert!(c.check_header(None).is_err());
        assert!(c.check_header(Some("Basic abc")).is_err());
        assert!(c.check_header(Some("Bearer secret-2")).is_err());
        assert!(c.check_header(Some("Bearer ")).is_err());
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
