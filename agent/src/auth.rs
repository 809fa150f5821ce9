//! Authentication of API requests.
//!
//! A request presents `Authorization: Bearer <secret>` (the scheme in any case); a
//! [`CredentialStore`] says which principal (if any) the secret belongs to, and with which
//! [`Role`]. The stores today:
//!
//! - [`TokenStore`]: the operator's token (role [`Role::Operator`]), which comes from the
//!   environment ([`TOKEN_ENV`]) or a file only the owner may read, never from the command
//!   line or the board file: see [`operator_token`];
//! - [`crate::devices::DeviceStore`]: one credential per paired device (`DATA/devices.json`,
//!   salted hashes only, with expiry and revocation; role [`Role::Device`]);
//! - [`PeerStore`]: the appliances this one trusts for VM handoff (`DATA/peers.json`, role
//!   [`Role::Peer`]): one shared secret per trusted appliance, the same on both sides. The
//!   source presents it to the target's `POST /v1/handoff/incoming`; the target accepts an
//!   incoming handoff only with it. A peer secret opens the handoff routes and nothing else,
//!   and the operator token does not open them.
//!
//! [`Credentials`] chains several stores. What each role may do on which route is the
//! router's business (`crate::http`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a principal may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The appliance's operator: every route but the handoff routes between appliances.
    Operator,
    /// A paired device: the catalogue, its own instances and the app store.
    Device,
    /// A trusted appliance: the handoff routes only.
    Peer,
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// A name for logs: "operator", "device:<id>", "peer:<appliance id>".
    pub name: String,
    /// What it may do.
    pub role: Role,
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

/// A single token (the operator's).
pub struct TokenStore {
    token: String,
    principal: String,
    role: Role,
}

impl TokenStore {
    /// A store accepting `token` as the operator `principal`.
    pub fn new(token: impl Into<String>, principal: impl Into<String>) -> Self {
        TokenStore::with_role(token, principal, Role::Operator)
    }

    /// A store accepting `token` as `principal` with `role`.
    pub fn with_role(token: impl Into<String>, principal: impl Into<String>, role: Role) -> Self {
        TokenStore {
            token: token.into(),
            principal: principal.into(),
            role,
        }
    }
}

impl CredentialStore for TokenStore {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        constant_time_eq(secret.as_bytes(), self.token.as_bytes()).then(|| Principal {
            name: self.principal.clone(),
            role: self.role,
        })
    }
}

/// Errors of the peer store and of reading secrets.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A secret file others than its owner may read.
    #[error("{0} may be read by group or others (mode {1:o}): a secret file must be the owner's alone; run `chmod 600 {0}`")]
    OpenFile(PathBuf, u32),
    /// A secret too short, or with whitespace inside.
    #[error("the operator token from {0} is not usable: it needs at least {MIN_OPERATOR_TOKEN} characters and no whitespace")]
    WeakToken(String),
    /// `peers.json` cannot be read or written.
    #[error("cannot {0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// `peers.json` does not parse.
    #[error("{0} is damaged")]
    Damaged(PathBuf, #[source] serde_json::Error),
    /// An appliance id that is not 12 hex digits.
    #[error("'{0}' is not an appliance id (12 hex digits, as GET /v1/system shows)")]
    BadId(String),
    /// A secret too short or with whitespace.
    #[error("a peer secret needs at least {MIN_PEER_SECRET} characters and no whitespace")]
    WeakSecret,
    /// No random bytes.
    #[error("cannot read random bytes")]
    Random(#[source] std::io::Error),
    /// A certificate fingerprint that is not 64 hex digits.
    #[error("'{0}' is not a certificate fingerprint (64 hex digits, as GET /v1/system shows in `fingerprint`)")]
    BadFingerprint(String),
}

/// Shortest peer secret accepted.
pub const MIN_PEER_SECRET: usize = 16;
/// File name of the peer store in the data directory.
pub const PEERS_FILE: &str = "peers.json";

/// One trusted appliance: `peers.json` holds a JSON array of these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its appliance id (12 hex digits, `GET /v1/system` → `id`).
    pub id: String,
    /// A name for people and logs.
    #[serde(default)]
    pub name: String,
    /// The secret shared with it (the same entry, with this appliance's id, is on its side).
    pub secret: String,
    /// SHA-256 of its TLS certificate: handoffs to it over HTTPS pin it (see crate::tls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// The appliances this one trusts for handoff, in `DATA/peers.json`. The file is read at
/// every use, so a peer added (by `agent add-peer`, later by pairing) counts at once
/// without a restart; a missing file means no peers.
#[derive(Clone, Debug)]
pub struct PeerStore {
    path: PathBuf,
}

fn check_id(id: &str) -> Result<(), AuthError> {
    if id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(AuthError::BadId(id.into()))
    }
}

/// A fresh random secret: 32 bytes (256 bits) from the kernel, hex (64 characters).
pub fn random_secret() -> Result<String, AuthError> {
    random_hex(32)
}

/// `n` random bytes from the kernel, hex.
pub fn random_hex(n: usize) -> Result<String, AuthError> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(AuthError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The environment variable holding the operator's token: for the agent, the operator token
/// it accepts; for the `cloudlet` client, the credential it presents.
pub const TOKEN_ENV: &str = "CLOUDLET_TOKEN";
/// File name of the operator token the agent makes in its data directory on first start.
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";
/// Shortest operator token accepted.
pub const MIN_OPERATOR_TOKEN: usize = 16;

/// Where the operator token came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// The environment variable [`TOKEN_ENV`].
    Env,
    /// A file that existed.
    File(PathBuf),
    /// A file made now (mode 0600) in the data directory.
    Created(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Env => write!(f, "the environment variable {TOKEN_ENV}"),
            TokenSource::File(p) => write!(f, "{}", p.display()),
            TokenSource::Created(p) => write!(f, "{} (made now, mode 0600)", p.display()),
        }
    }
}

fn check_token(t: &str, from: &dyn std::fmt::Display) -> Result<(), AuthError> {
    if t.len() < MIN_OPERATOR_TOKEN || t.chars().any(char::is_whitespace) {
        return Err(AuthError::WeakToken(from.to_string()));
    }
    Ok(())
}

/// Reads a secret from `path`: refuses a file group or others may read, trims the
/// surrounding whitespace (a trailing newline), and needs [`MIN_OPERATOR_TOKEN`] characters.
pub fn read_secret_file(path: &Path) -> Result<String, AuthError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| AuthError::Io("read", path.into(), e))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::OpenFile(path.into(), mode));
    }
    let t = std::fs::read_to_string(path).map_err(|e| AuthError::Io("read", path.into(), e))?;
    let t = t.trim().to_string();
    check_token(&t, &path.display())?;
    Ok(t)
}

/// Writes `contents` to `path` through a temporary file made with mode 0600, then renames
/// it into place (readers see the old file or the new one, never a part).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The agent's operator token: `env` (the value of [`TOKEN_ENV`]) when set, else the file
/// `file` (`--token-file`), else `DATA/operator.token`, made with a fresh random token (mode
/// 0600) when missing. Files group or others may read are refused.
pub fn operator_token(
    env: Option<String>,
    file: Option<&Path>,
    data: &Path,
) -> Result<(String, TokenSource), AuthError> {
    if let Some(t) = env.filter(|t| !t.is_empty()) {
        let t = t.trim().to_string();
        check_token(&t, &format_args!("{TOKEN_ENV}"))?;
        return Ok((t, TokenSource::Env));
    }
    if let Some(f) = file {
        return Ok((read_secret_file(f)?, TokenSource::File(f.into())));
    }
    let path = data.join(OPERATOR_TOKEN_FILE);
    if path.exists() {
        return Ok((read_secret_file(&path)?, TokenSource::File(path)));
    }
    let t = random_secret()?;
    write_private(&path, format!("{t}\n").as_bytes())
        .map_err(|e| AuthError::Io("write", path.clone(), e))?;
    Ok((t, TokenSource::Created(path)))
}

/// A client's credential: `env` (the value of [`TOKEN_ENV`]) when set, else the file
/// `file`; `None` when neither is given.
pub fn client_token(env: Option<String>, file: Option<&Path>) -> Result<Option<String>, AuthError> {
    if let Some(t) = env.filter(|t| !t.trim().is_empty()) {
        return Ok(Some(t.trim().to_string()));
    }
    file.map(read_secret_file).transpose()
}

impl PeerStore {
    /// The store of the data directory `data`.
    pub fn in_dir(data: &Path) -> PeerStore {
        PeerStore {
            path: data.join(PEERS_FILE),
        }
    }

    /// Every trusted appliance.
    pub fn peers(&self) -> Result<Vec<Peer>, AuthError> {
        match std::fs::read_to_string(&self.path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| AuthError::Damaged(self.path.clone(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(AuthError::Io("read", self.path.clone(), e)),
        }
    }

    /// The peer entry of appliance `id`.
    pub fn peer(&self, id: &str) -> Option<Peer> {
        self.peers().ok()?.into_iter().find(|p| p.id == id)
    }

    /// Adds (or replaces) the entry of appliance `id`; returns it.
    pub fn add(&self, id: &str, name: &str, secret: &str) -> Result<Peer, AuthError> {
        self.add_pinned(id, name, secret, None)
    }

    /// As [`PeerStore::add`], with the fingerprint of the peer's TLS certificate.
    pub fn add_pinned(
        &self,
        id: &str,
        name: &str,
        secret: &str,
        fingerprint: Option<&str>,
    ) -> Result<Peer, AuthError> {
        check_id(id)?;
        let fingerprint = fingerprint
            .map(|f| {
                crate::tls::parse_fingerprint(f).map_err(|_| AuthError::BadFingerprint(f.into()))
            })
            .transpose()?;
        if secret.len() < MIN_PEER_SECRET || secret.chars().any(char::is_whitespace) {
            return Err(AuthError::WeakSecret);
        }
        let mut v = self.peers()?;
        v.retain(|p| p.id != id);
        let p = Peer {
            id: id.into(),
            name: name.into(),
            secret: secret.into(),
            fingerprint,
        };
        v.push(p.clone());
        let json = serde_json::to_string_pretty(&v).expect("peers serialise") + "\n";
        write_private(&self.path, json.as_bytes())
            .map_err(|e| AuthError::Io("write", self.path.clone(), e))?;
        Ok(p)
    }
}

impl CredentialStore for PeerStore {
    fn authenticate(&self, secret: &str) -> Option<Principal> {
        let peers = match self.peers() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("no peer is trusted: {}", crate::store::error_chain(&e));
                return None;
            }
        };
        // Every entry is compared, so the time does not tell which one matched.
        let mut found = None;
        for p in peers {
            if constant_time_eq(secret.as_bytes(), p.secret.as_bytes()) && found.is_none() {
                found = Some(Principal {
                    name: format!("peer:{}", p.id),
                    role: Role::Peer,
                });
            }
        }
        found
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

    /// Checks an `Authorization` header value (`Bearer <secret>`, the scheme in any case).
    pub fn check_header(&self, header: Option<&str>) -> Result<Principal, &'static str> {
        let h = header.ok_or("missing Authorization header")?.trim_start();
        let (scheme, rest) = h.split_once([' ', '\t']).unwrap_or((h, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err("Authorization is not a Bearer credential");
        }
        let secret = rest.trim();
        if secret.is_empty() {
            return Err("the bearer token is not valid here");
        }
        self.stores
            .iter()
            .find_map(|s| s.authenticate(secret))
            .ok_or("the bearer token is not valid here")
    }

    /// As [`Credentials::check_header`], and the principal's role must be one of `roles`.
    pub fn check_role(
        &self,
        header: Option<&str>,
        roles: &[Role],
    ) -> Result<Principal, &'static str> {
        let p = self.check_header(header)?;
        if roles.contains(&p.role) {
            Ok(p)
        } else if p.role == Role::Peer {
            Err("a peer credential opens only the handoff routes")
        } else {
            Err("this route takes only a peer appliance's credential (DATA/peers.json)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked_against_every_store() {
        let c = Credentials::default()
            .with(Arc::new(TokenStore::new("secret-1", "operator")))
            .with(Arc::new(TokenStore::with_role(
                "device-key",
                "device:phone",
                Role::Device,
            )));
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

    #[test]
    fn peers_open_the_handoff_routes_only_and_are_read_at_each_use() {
        let d = std::env::temp_dir().join(format!("agent-peers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let peers = PeerStore::in_dir(&d);
        assert!(peers.peers().unwrap().is_empty(), "no file: no peers");
        let c = Credentials::default()
            .with(Arc::new(TokenStore::new("operator-token", "operator")))
            .with(Arc::new(peers.clone()));
        let secret = random_secret().unwrap();
        assert_eq!(secret.len(), 64);
        let bearer = format!("Bearer {secret}");
        assert!(c.check_header(Some(&bearer)).is_err(), "not a peer yet");
        peers.add("0123456789ab", "hall-b", &secret).unwrap();
        // Counted at once, without a restart.
        let p = c.check_role(Some(&bearer), &[Role::Peer]).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("peer:0123456789ab", Role::Peer));
        let e = c
            .check_role(Some(&bearer), &[Role::Operator, Role::Device])
            .unwrap_err();
        assert!(e.contains("only the handoff routes"), "{e}");
        let e = c
            .check_role(Some("Bearer operator-token"), &[Role::Peer])
            .unwrap_err();
        assert!(e.contains("peer"), "{e}");
        assert_eq!(peers.peer("0123456789ab").unwrap().secret, secret);
        assert!(peers.peer("ba9876543210").is_none());
        // Replacing keeps one entry per appliance; bad ids and weak secrets are refused.
        peers
            .add("0123456789ab", "hall-b", &"x".repeat(20))
            .unwrap();
        assert_eq!(peers.peers().unwrap().len(), 1);
        assert!(
            c.check_header(Some(&bearer)).is_err(),
            "the old secret is gone"
        );
        assert!(matches!(
            peers.add("nope", "", &secret),
            Err(AuthError::BadId(_))
        ));
        assert!(matches!(
            peers.add("0123456789ab", "", "short"),
            Err(AuthError::WeakSecret)
        ));
        // A damaged file trusts nobody.
        std::fs::write(d.join(PEERS_FILE), b"{").unwrap();
        assert!(c.check_header(Some("Bearer xxxxxxxxxxxxxxxxxxxx")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let c = Credentials::default().with(Arc::new(TokenStore::new("secret-1", "operator")));
        for h in [
            "bearer secret-1",
            "BEARER secret-1",
            "Bearer  secret-1",
            "bEaReR\tsecret-1",
        ] {
            assert_eq!(c.check_header(Some(h)).unwrap().name, "operator", "{h}");
        }
        for h in [
            "Bearersecret-1",
            "bearer",
            "Bearer secret-2",
            "Token secret-1",
        ] {
            assert!(c.check_header(Some(h)).is_err(), "{h}");
        }
    }

    #[test]
    fn the_operator_token_comes_from_the_environment_or_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("agent-optoken-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

        // First start: made in the data directory, random, the owner's alone; then reused.
        let (t, from) = operator_token(None, None, &d).unwrap();
        let made = d.join(OPERATOR_TOKEN_FILE);
        assert_eq!(from, TokenSource::Created(made.clone()));
        assert_eq!(t.len(), 64);
        assert_eq!(mode(&made), 0o600);
        let (again, from) = operator_token(None, None, &d).unwrap();
        assert_eq!(
            (again.as_str(), from),
            (t.as_str(), TokenSource::File(made.clone()))
        );

        // The environment wins; a named file comes next.
        let env = "e".repeat(20);
        assert_eq!(
            operator_token(Some(env.clone()), Some(&made), &d).unwrap(),
            (env.clone(), TokenSource::Env)
        );
        let f = d.join("my.token");
        std::fs::write(&f, "f-token-0123456789\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            operator_token(None, Some(&f), &d).unwrap().0,
            "f-token-0123456789"
        );
        assert_eq!(
            client_token(None, Some(&f)).unwrap().as_deref(),
            Some("f-token-0123456789")
        );
        assert_eq!(
            client_token(Some(env.clone()), Some(&f)).unwrap(),
            Some(env)
        );
        assert_eq!(client_token(None, None).unwrap(), None);

        // A file group or others may read is refused, saying what to do; so is a weak token.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = operator_token(None, Some(&f), &d).unwrap_err().to_string();
        assert!(
            e.contains("group or others") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(
            operator_token(None, None, &d),
            Err(AuthError::OpenFile(..))
        ));
        assert!(matches!(
            operator_token(Some("short".into()), None, &d),
            Err(AuthError::WeakToken(_))
        ));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "has space inside-0123\n").unwrap();
        assert!(matches!(read_secret_file(&f), Err(AuthError::WeakToken(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
