//! Who issues a paired device's credential: the [`CredentialIssuer`] seam, implemented by the
//! agent's device store on disk ([`crate::devices::DeviceStore`]: salted hashes, expiry,
//! revocation, audit) and by [`MemoryIssuer`], which keeps them in memory (tests).

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::auth::{constant_time_eq, CredentialStore, Principal, Role};

use super::hex_random;

/// A credential issued to a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCredential {
    /// The bearer secret.
    pub secret: String,
    /// When it expires, unix seconds.
    pub expires_unix: u64,
}

/// What issues (and keeps) device credentials: the credentials store plugs in here.
pub trait CredentialIssuer: Send + Sync {
    /// A fresh credential for the device `device_id` (`name`, `model` from its Hello).
    fn issue(
        &self,
        device_id: &str,
        name: &str,
        model: &str,
    ) -> Result<IssuedCredential, Box<dyn std::error::Error + Send + Sync>>;
}

impl CredentialIssuer for crate::devices::DeviceStore {
    /// A credential valid for [`crate::devices::DEFAULT_TTL`], kept (hashed) on disk; a device
    /// that pairs again gets a fresh one in place of its old one.
    fn issue(
        &self,
        device_id: &str,
        name: &str,
        model: &str,
    ) -> Result<IssuedCredential, Box<dyn std::error::Error + Send + Sync>> {
        let (secret, expires_unix) = crate::devices::DeviceStore::issue(
            self,
            device_id,
            name,
            model,
            crate::devices::DEFAULT_TTL,
        )?;
        Ok(IssuedCredential {
            secret,
            expires_unix,
        })
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A device credential kept in memory (lost at restart): for tests, and for the agent
/// until an on-disk store issues them. It authenticates the secrets it issued as
/// `device:<id>` ([`Role::Device`]) until they expire.
pub struct MemoryIssuer {
    lifetime: Duration,
    issued: Mutex<Vec<(String, IssuedCredential)>>,
}

impl MemoryIssuer {
    /// Issues credentials valid for `lifetime`.
    pub fn new(lifetime: Duration) -> MemoryIssuer {
        MemoryIssuer {
            lifetime,
            issued: Mutex::new(Vec::new()),
        }
    }

    /// Every credential issued: (device id, credential).
    pub fn issued(&self) -> Vec<(String, IssuedCredential)> {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl CredentialIssuer for MemoryIssuer {
    fn issue(
        &self,
        device_id: &str,
        _name: &str,
        _model: &str,
    ) -> Result<IssuedCredential, Box<dyn std::error::Error + Send + Sync>> {
        let c = IssuedCredential {
            secret: hex_random(32)?,
            expires_unix: unix_now() + self.lifetime.as_secs(),
        };
        let mut v = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|(d, _)| d != device_id);
        v.push((device_id.to_string(), c.clone()));
        Ok(c)
    }
}

impl CredentialStore for MemoryIssuer {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        let now = unix_now();
        let v = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = None;
        for (d, c) in v.iter() {
            if constant_time_eq(secret.as_bytes(), c.secret.as_bytes())
                && c.expires_unix > now
                && found.is_none()
            {
                found = Some(Principal {
                    name: format!("device:{d}"),
                    role: Role::Device,
                });
            }
        }
        found
    }
}
