//! The paired devices' credentials (`DATA/devices.json`).
//!
//! Pairing issues each device a fresh 256-bit secret (64 hex digits) with an expiry; the
//! device presents it as `Authorization: Bearer <secret>` and is then the principal
//! `device:<id>` with [`Role::Device`]. The file keeps only a salted SHA-256 of each secret
//! (`sha256(salt ‖ secret)`, a random 16-byte salt per record), so reading it does not give
//! a credential away; it is written whole through a temporary file and a rename, mode 0600.
//!
//! The file is read at every authentication, so a revocation (by the API, the manager or
//! another process) and an expiry count from the very next request. Pairing and revocation
//! are audit events ([`crate::audit`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::audit::Audit;
use crate::auth::{constant_time_eq, random_hex, random_secret, CredentialStore, Principal, Role};
use crate::store::unix_now;

/// File name of the device store in the data directory.
pub const DEVICES_FILE: &str = "devices.json";
/// How long a credential lasts unless pairing says otherwise: 90 days.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest device id, name or model.
pub const MAX_FIELD: usize = 64;

/// Errors of the device store.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `devices.json` cannot be read or written.
    #[error("cannot {0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// `devices.json` does not parse.
    #[error("{0} is damaged (no device can authenticate until it is repaired or removed)")]
    Damaged(PathBuf, #[source] serde_json::Error),
    /// A device id that cannot name a device.
    #[error("'{0}' is not a device id: use 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'")]
    BadId(String),
    /// A name or model too long or with control characters.
    #[error("the device's {0} is not usable: at most 64 characters, no control characters")]
    BadText(&'static str),
    /// No device of this id.
    #[error("no device '{0}' is paired")]
    NoDevice(String),
    /// No random bytes.
    #[error("cannot make a secret")]
    Random(#[source] crate::auth::AuthError),
}

/// One paired device as stored: `devices.json` holds a JSON array of these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// The id the device sent when pairing.
    pub id: String,
    /// Its name (for people).
    pub name: String,
    /// Its model.
    pub model: String,
    /// When the credential was issued (Unix seconds).
    pub issued_unix: u64,
    /// When it stops being accepted (Unix seconds).
    pub expires_unix: u64,
    /// When it was revoked, if it was.
    pub revoked_unix: Option<u64>,
    /// The salt, hex (16 bytes).
    pub salt: String,
    /// `sha256(salt ‖ secret)`, hex.
    pub hash: String,
}

/// What revoking a device did: the device as it is now, and the instances it had running,
/// which were stopped (see [`crate::revocation`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The device.
    #[serde(flatten)]
    pub device: DeviceView,
    /// The ids of its instances stopped by the revocation.
    pub instances_stopped: Vec<String>,
}

/// A paired device as the API and the CLI show it (no salt, no hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Model.
    pub model: String,
    /// Issued (Unix seconds).
    pub issued_unix: u64,
    /// Expires (Unix seconds).
    pub expires_unix: u64,
    /// Revoked (Unix seconds), if it was.
    pub revoked_unix: Option<u64>,
    /// `active`, `expired` or `revoked`.
    pub status: String,
}

impl DeviceRecord {
    fn view(&self, now: u64) -> DeviceView {
        let status = if self.revoked_unix.is_some() {
            "revoked"
        } else if now >= self.expires_unix {
            "expired"
        } else {
            "active"
        };
        DeviceView {
            id: self.id.clone(),
            name: self.name.clone(),
            model: self.model.clone(),
            issued_unix: self.issued_unix,
            expires_unix: self.expires_unix,
            revoked_unix: self.revoked_unix,
            status: status.into(),
        }
    }
}

fn digest(salt: &str, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(secret.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a device id (it goes into URLs and principal names).
pub fn check_device_id(id: &str) -> Result<(), DeviceError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_FIELD
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DeviceError::BadId(id.into()))
    }
}

fn check_text(what: &'static str, t: &str) -> Result<(), DeviceError> {
    if t.chars().count() > MAX_FIELD || t.chars().any(char::is_control) {
        return Err(DeviceError::BadText(what));
    }
    Ok(())
}

/// The paired devices of a data directory.
#[derive(Clone, Debug)]
pub struct DeviceStore {
    path: PathBuf,
    audit: Audit,
    /// Serialises read-modify-write cycles of this process.
    lock: Arc<Mutex<()>>,
}

impl DeviceStore {
    /// The store of the data directory `data` (its audit log beside it).
    pub fn in_dir(data: &Path) -> DeviceStore {
        DeviceStore {
            path: data.join(DEVICES_FILE),
            audit: Audit::in_dir(data),
            lock: Arc::default(),
        }
    }

    /// The audit log pairings and revocations go to.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    fn records(&self) -> Result<Vec<DeviceRecord>, DeviceError> {
        match std::fs::read_to_string(&self.path) {
            Ok(t) => {
                serde_json::from_str(&t).map_err(|e| DeviceError::Damaged(self.path.clone(), e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(DeviceError::Io("read", self.path.clone(), e)),
        }
    }

    fn save(&self, v: &[DeviceRecord]) -> Result<(), DeviceError> {
        let json = serde_json::to_string_pretty(v).expect("device records serialise") + "\n";
        crate::auth::write_private(&self.path, json.as_bytes())
            .map_err(|e| DeviceError::Io("write", self.path.clone(), e))
    }

    /// Issues device `device_id` a fresh credential valid for `ttl` (replacing any it had,
    /// revoked or not) and records the pairing in the audit log. Returns the secret (the
    /// only time it exists outside the device) and its expiry (Unix seconds).
    pub fn issue(
        &self,
        device_id: &str,
        name: &str,
        model: &str,
        ttl: Duration,
    ) -> Result<(String, u64), DeviceError> {
        check_device_id(device_id)?;
        check_text("name", name)?;
        check_text("model", model)?;
        let secret = random_secret().map_err(DeviceError::Random)?;
        let salt = random_hex(16).map_err(DeviceError::Random)?;
        let now = unix_now();
        let rec = DeviceRecord {
            id: device_id.into(),
            name: name.into(),
            model: model.into(),
            issued_unix: now,
            expires_unix: now.saturating_add(ttl.as_secs()),
            revoked_unix: None,
            hash: digest(&salt, &secret),
            salt,
        };
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = self.records()?;
        let replaced = v.iter().any(|r| r.id == device_id);
        v.retain(|r| r.id != device_id);
        v.push(rec.clone());
        self.save(&v)?;
        self.audit.record(
            "device.paired",
            json!({
                "device": rec.id, "name": rec.name, "model": rec.model,
                "expires_unix": rec.expires_unix, "replaced": replaced,
            }),
        );
        Ok((secret, rec.expires_unix))
    }

    /// Revokes device `id`'s credential (it gets 401 from its next request on), on behalf
    /// of principal `by`, and records it in the audit log. Revoking twice is no error.
    pub fn revoke(&self, id: &str, by: &str) -> Result<DeviceView, DeviceError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = self.records()?;
        let now = unix_now();
        let rec = v
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| DeviceError::NoDevice(id.into()))?;
        let first = rec.revoked_unix.is_none();
        if first {
            rec.revoked_unix = Some(now);
        }
        let view = rec.view(now);
        self.save(&v)?;
        if first {
            self.audit.record(
                "device.revoked",
                json!({ "device": view.id, "name": view.name, "by": by }),
            );
        }
        Ok(view)
    }

    /// Every paired device (active, expired and revoked), in pairing order.
    pub fn list(&self) -> Result<Vec<DeviceView>, DeviceError> {
        let now = unix_now();
        Ok(self.records()?.iter().map(|r| r.view(now)).collect())
    }

    /// Device `id`, if paired.
    pub fn get(&self, id: &str) -> Option<DeviceView> {
        self.list().ok()?.into_iter().find(|d| d.id == id)
    }

    /// The principal `secret` authenticates at time `now` (Unix seconds): a device whose
    /// credential is neither revoked nor expired.
    pub fn authenticate_at(&self, secret: &str, now: u64) -> Option<Principal> {
        let records = match self.records() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("no device is trusted: {}", crate::store::error_chain(&e));
                return None;
            }
        };
        // Every record is hashed and compared, so the time does not tell which one matched.
        let mut found = None;
        for r in &records {
            let ok = constant_time_eq(digest(&r.salt, secret).as_bytes(), r.hash.as_bytes());
            if ok && found.is_none() && r.revoked_unix.is_none() && now < r.expires_unix {
                found = Some(Principal {
                    name: format!("device:{}", r.id),
                    role: Role::Device,
                });
            }
        }
        found
    }
}

impl CredentialStore for DeviceStore {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        self.authenticate_at(secret, unix_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-devices-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn issued_secrets_authenticate_until_revoked_or_expired_and_are_never_stored() {
        let d = scratch("issue");
        let s = DeviceStore::in_dir(&d);
        assert!(s.list().unwrap().is_empty(), "no file: no devices");
        let (secret, exp) = s
            .issue("phone-1", "Ann's phone", "Pixel 8", DEFAULT_TTL)
            .unwrap();
        assert_eq!(secret.len(), 64);
        assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
        let now = unix_now();
        assert!(exp >= now + DEFAULT_TTL.as_secs() - 1);
        let p = s.authenticate(&secret).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("device:phone-1", Role::Device));
        assert!(s.authenticate(&secret[1..]).is_none());
        assert!(s.authenticate("").is_none());

        // The file holds a salted hash, not the secret, and only its owner may read it.
        let text = std::fs::read_to_string(d.join(DEVICES_FILE)).unwrap();
        assert!(!text.contains(&secret), "{text}");
        let mode = std::fs::metadata(d.join(DEVICES_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A second device gets its own secret.
        let (other, _) = s.issue("phone-2", "", "", DEFAULT_TTL).unwrap();
        assert_ne!(other, secret);
        assert_eq!(s.authenticate(&other).unwrap().name, "device:phone-2");

        // Expiry: valid just before, refused at the instant.
        assert!(s.authenticate_at(&secret, exp - 1).is_some());
        assert!(s.authenticate_at(&secret, exp).is_none());

        // Revocation: at once, for that device only; listed as revoked; audited once.
        let v = s.revoke("phone-1", "operator").unwrap();
        assert_eq!(v.status, "revoked");
        assert!(s.authenticate(&secret).is_none());
        assert!(s.authenticate(&other).is_some());
        s.revoke("phone-1", "operator").unwrap();
        assert!(matches!(
            s.revoke("phone-9", "operator"),
            Err(DeviceError::NoDevice(_))
        ));
        let list = s.list().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].status, "revoked");
        assert_eq!(list[1].status, "active");
        let events: Vec<String> = Audit::in_dir(&d)
            .events()
            .iter()
            .map(|e| format!("{} {}", e["event"].as_str().unwrap(), e["device"]))
            .collect();
        assert_eq!(
            events,
            [
                "device.paired \"phone-1\"",
                "device.paired \"phone-2\"",
                "device.revoked \"phone-1\""
            ]
        );

        // Pairing again gives a new credential and lifts the revocation; the old one stays dead.
        let (again, _) = s
            .issue("phone-1", "Ann's phone", "Pixel 8", DEFAULT_TTL)
            .unwrap();
        assert!(s.authenticate(&again).is_some());
        assert!(s.authenticate(&secret).is_none());
        assert_eq!(s.list().unwrap().len(), 2);

        // Bad input is refused and changes nothing.
        for id in ["", "a b", "x/y", &"d".repeat(65), "dévice"] {
            assert!(matches!(
                s.issue(id, "", "", DEFAULT_TTL),
                Err(DeviceError::BadId(_))
            ));
        }
        assert!(matches!(
            s.issue("ok", "bell\u{7}", "", DEFAULT_TTL),
            Err(DeviceError::BadText("name"))
        ));
        assert_eq!(s.list().unwrap().len(), 2);

        // A damaged file trusts nobody.
        std::fs::write(d.join(DEVICES_FILE), b"[{").unwrap();
        assert!(s.authenticate(&again).is_none());
        assert!(matches!(s.list(), Err(DeviceError::Damaged(..))));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
