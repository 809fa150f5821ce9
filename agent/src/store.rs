//! The data directory: base images, services, the app store and supervision state.
//!
//! ```text
//! DATA/
//!   agent.id                     this appliance's id (12 hex digits, made on first start)
//!   api.addr                     "IP:PORT" of the running agent's API (written at start)
//!   api.url                      one URL per listen address, http:// (loopback) or https://
//!   tls/cert.der, tls/key.der    the appliance certificate and its key (0600; crate::tls)
//!   peers.json                   appliances trusted for handoff (crate::auth::PeerStore)
//!   bases/NAME/                  base images, as `image-builder base` writes them
//!   services/NAME/service.json   ServiceRecord: name, base, description, overlay size + SHA-256
//!   services/NAME/app.overlay    the service's application overlay (for bases/BASE)
//!   apps/NAME/app.json           AppRecord: name, version, description, file, size + SHA-256
//!   apps/NAME/FILE               the client app a phone may download
//!   instances/ID.json            supervision record of a service VM (see crate::supervisor)
//!   instances/ID/                its runtime files: vm.sock, serial.log, vmm.log
//!   tmp/                         uploads and stagings in progress (emptied at start)
//! ```
//!
//! Everything is installed by writing under `tmp/` and renaming into place, so a reader
//! never sees half a base, service or app, and a failed upload leaves nothing behind.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use format::base::Manifest;
use format::overlay::Overlay;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of a service's overlay.
pub const OVERLAY_FILE: &str = "app.overlay";
/// File name of a service's record.
pub const SERVICE_FILE: &str = "service.json";
/// File name of an app's record.
pub const APP_FILE: &str = "app.json";

/// Errors of the data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File-system I/O failed.
    #[error("failed to {0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// A name that cannot be a base, service or app name.
    #[error("'{0}' is not a valid name: use 1-64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit")]
    BadName(String),
    /// No such base.
    #[error("no base image named '{0}'")]
    NoBase(String),
    /// No such service.
    #[error("no service named '{0}'")]
    NoService(String),
    /// No such app.
    #[error("no app named '{0}'")]
    NoApp(String),
    /// An overlay that does not open or verify.
    #[error("overlay refused")]
    BadOverlay(#[source] format::overlay::OverlayError),
    /// An overlay for a base that is not staged here (its id, hex).
    #[error(
        "overlay refused: it applies to base {0}, which is not staged here (stage that base first)"
    )]
    OverlayBase(String),
    /// A base directory that does not load.
    #[error("base refused")]
    BadBase(#[source] format::base::BaseError),
    /// A record that does not parse.
    #[error("{0} is damaged")]
    Damaged(PathBuf, #[source] serde_json::Error),
}

/// A base image in the catalogue.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaseInfo {
    /// Directory name under `bases/`.
    pub name: String,
    /// Content id (hex SHA-256).
    pub id: String,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Bytes of the root disk, when it has one.
    pub disk_bytes: Option<u64>,
    /// Bytes the base occupies on disk.
    pub bytes_on_disk: u64,
}

/// `services/NAME/service.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    /// Service name.
    pub name: String,
    /// Name of the base under `bases/` the overlay applies to.
    pub base: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Bytes of the overlay.
    pub overlay_bytes: u64,
    /// Hex SHA-256 of the overlay.
    pub overlay_sha256: String,
    /// When it was installed (seconds since the Unix epoch).
    pub installed_unix: u64,
}

/// `apps/NAME/app.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    /// App name.
    pub name: String,
    /// App version.
    pub version: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The service the app talks to, if any.
    #[serde(default)]
    pub service: Option<String>,
    /// File name under `apps/NAME/`.
    pub file: String,
    /// Bytes of the file.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// The data directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    id: String,
}

/// Checks a base/service/app name.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.into()))
    }
}

fn io<T>(what: &'static str, p: &Path, r: std::io::Result<T>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Io(what, p.to_owned(), e))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(p: &Path) -> Result<(String, u64), StoreError> {
    let mut f = io("open", p, fs::File::open(p))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = io("read", p, f.read(&mut buf))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        // No /dev/urandom: time and pid still make collisions unlikely for ids.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = t ^ (u128::from(std::process::id()) << 64);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    hex(&b)
}

/// A fresh random id of `bytes` bytes, hex.
pub fn new_id(bytes: usize) -> String {
    random_hex(bytes)
}

/// Copies `from` to `to`, leaving all-zero 64 KiB blocks as holes (base RAM files are sparse).
fn sparse_copy(from: &Path, to: &Path) -> Result<(), StoreError> {
    let mut src = io("open", from, fs::File::open(from))?;
    let len = io("inspect", from, src.metadata())?.len();
    let mut dst = io("create", to, fs::File::create(to))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = io("read", from, src.read(&mut buf))?;
        if k == 0 {
            break;
        }
        if buf[..k].iter().all(|&b| b == 0) {
            io("seek", to, dst.seek(SeekFrom::Current(k as i64)))?;
        } else {
            io("write", to, dst.write_all(&buf[..k]))?;
        }
    }
    io("write", to, dst.set_len(len))?;
    io("sync", to, dst.sync_all())
}

impl Store {
    /// Opens (creating if needed) the data directory at `root`; empties `tmp/`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for d in ["bases", "services", "apps", "instances", "tmp"] {
            let p = root.join(d);
            io("create", &p, fs::create_dir_all(&p))?;
        }
        let tmp = root.join("tmp");
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        let idp = root.join("agent.id");
        let id = match fs::read_to_string(&idp) {
            Ok(s) if s.trim().len() == 12 && s.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
                s.trim().to_string()
            }
            _ => {
                let id = random_hex(6);
                io("write", &idp, fs::write(&idp, format!("{id}\n")))?;
                id
            }
        };
        let root = io("resolve", root, fs::canonicalize(root))?;
        Ok(Store { root, id })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This appliance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `instances/`.
    pub fn instances_dir(&self) -> PathBuf {
        self.root.join("instances")
    }

    /// A fresh path under `tmp/`.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{what}-{}", random_hex(6)))
    }

    /// `bases/NAME/`.
    pub fn base_dir(&self, name: &str) -> PathBuf {
        self.root.join("bases").join(name)
    }

    /// `services/NAME/`.
    pub fn service_dir(&self, name: &str) -> PathBuf {
        self.root.join("services").join(name)
    }

    fn names(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join(sub))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| check_name(n).is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// One base.
    pub fn base(&self, name: &str) -> Result<BaseInfo, StoreError> {
        check_name(name)?;
        let dir = self.base_dir(name);
        if !dir.is_dir() {
            return Err(StoreError::NoBase(name.into()));
        }
        let m = Manifest::load(&dir).map_err(StoreError::BadBase)?;
        let bytes_on_disk = fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|md| {
                        use std::os::unix::fs::MetadataExt;
                        md.blocks() * 512
                    })
                    .sum()
            })
            .unwrap_or(0);
        Ok(BaseInfo {
            name: name.into(),
            id: m.id,
            mem_mib: m.mem_mib,
            disk_bytes: m.disk_bytes,
            bytes_on_disk,
        })
    }

    /// Every base that loads (damaged ones are logged and skipped).
    pub fn bases(&self) -> Vec<BaseInfo> {
        self.names("bases")
            .into_iter()
            .filter_map(|n| match self.base(&n) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("skipping base {n}: {}", error_chain(&e));
                    None
                }
            })
            .collect()
    }

    /// One service's record.
    pub fn service(&self, name: &str) -> Result<ServiceRecord, StoreError> {
        check_name(name)?;
        let p = self.service_dir(name).join(SERVICE_FILE);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoService(name.into()))
            }
            Err(e) => return Err(StoreError::Io("read", p, e)),
        };
        serde_json::from_str(&text).map_err(|e| StoreError::Damaged(p, e))
    }

    /// Every service.
    pub fn services(&self) -> Vec<ServiceRecord> {
        self.names("services")
            .into_iter()
            .filter_map(|n| self.service(&n).ok())
            .collect()
    }

    /// The overlay file of a service.
    pub fn overlay_path(&self, name: &str) -> PathBuf {
        self.service_dir(name).join(OVERLAY_FILE)
    }

    /// A short digest of the service catalogue (names and overlay checksums), 8 hex digits:
    /// it changes whenever a service is added, replaced or removed.
    pub fn catalogue_digest(&self) -> String {
        let mut h = Sha256::new();
        for s in self.services() {
            h.update(s.name.as_bytes());
            h.update(b"\0");
            h.update(s.overlay_sha256.as_bytes());
            h.update(b"\n");
        }
        hex(&h.finalize()[..4])
    }

    /// One app.
    pub fn app(&self, name: &str) -> Result<AppRecord, StoreError> {
        check_name(name)?;
        let p = self.root.join("apps").join(name).join(APP_FILE);
        let text = fs::read_to_string(&p).map_err(|_| StoreError::NoApp(name.into()))?;
        serde_json::from_str(&text).map_err(|e| StoreError::Damaged(p, e))
    }

    /// The file of an app.
    pub fn app_file(&self, rec: &AppRecord) -> PathBuf {
        self.root.join("apps").join(&rec.name).join(&rec.file)
    }

    /// Every app.
    pub fn apps(&self) -> Vec<AppRecord> {
        self.names("apps")
            .into_iter()
            .filter_map(|n| self.app(&n).ok())
            .collect()
    }

    /// Copies a base directory (from `image-builder base`) in as `bases/NAME`, keeping the
    /// RAM file sparse; replaces an existing base of that name.
    pub fn stage_base(&self, name: &str, from: &Path) -> Result<BaseInfo, StoreError> {
        check_name(name)?;
        let m = Manifest::load(from).map_err(StoreError::BadBase)?;
        let tmp = self.tmp_path("base");
        io("create", &tmp, fs::create_dir_all(&tmp))?;
        for e in io("list", from, fs::read_dir(from))? {
            let e = io("list", from, e)?;
            if e.path().is_file() {
                sparse_copy(&e.path(), &tmp.join(e.file_name()))?;
            }
        }
        let dst = self.base_dir(name);
        if dst.exists() {
            io("replace", &dst, fs::remove_dir_all(&dst))?;
        }
        io("install", &dst, fs::rename(&tmp, &dst))?;
        tracing::info!(base = name, id = %m.id, "base staged");
        self.base(name)
    }

    /// Checks an overlay file: it opens, every chunk checksum matches, and it names a
    /// staged base. Returns that base's name.
    pub fn verify_overlay(&self, path: &Path) -> Result<String, StoreError> {
        let ov = Overlay::open(path).map_err(StoreError::BadOverlay)?;
        ov.verify_chunks(2).map_err(StoreError::BadOverlay)?;
        let want = hex(ov.base_id());
        self.bases()
            .into_iter()
            .find(|b| b.id == want)
            .map(|b| b.name)
            .ok_or(StoreError::OverlayBase(want))
    }

    /// Installs the overlay at `tmp_overlay` (a file under `tmp/` or anywhere on the same
    /// file system when `copy` is false) as service `name`, after [`Store::verify_overlay`].
    /// Nothing is installed when verification fails.
    pub fn install_service(
        &self,
        name: &str,
        overlay: &Path,
        description: Option<&str>,
        copy: bool,
    ) -> Result<ServiceRecord, StoreError> {
        check_name(name)?;
        let base = self.verify_overlay(overlay)?;
        let (sha, bytes) = sha256_file(overlay)?;
        let description = match description {
            Some(d) => d.to_string(),
            None => self
                .service(name)
                .map(|s| s.description)
                .unwrap_or_default(),
        };
        let rec = ServiceRecord {
            name: name.into(),
            base,
            description,
            overlay_bytes: bytes,
            overlay_sha256: sha,
            installed_unix: unix_now(),
        };
        let tmp = self.tmp_path("service");
        io("create", &tmp, fs::create_dir_all(&tmp))?;
        let staged = tmp.join(OVERLAY_FILE);
        if copy {
            io("copy", overlay, fs::copy(overlay, &staged))?;
        } else {
            io("move", overlay, fs::rename(overlay, &staged))?;
        }
        let recp = tmp.join(SERVICE_FILE);
        let json = serde_json::to_string_pretty(&rec).expect("a flat record serialises");
        io("write", &recp, fs::write(&recp, json + "\n"))?;
        let dst = self.service_dir(name);
        if dst.exists() {
            // Running instances keep their mapping of the old overlay (it is unlinked, not
            // rewritten), so replacing a service never disturbs them.
            io("replace", &dst, fs::remove_dir_all(&dst))?;
        }
        io("install", &dst, fs::rename(&tmp, &dst))?;
        tracing::info!(service = name, base = %rec.base, bytes, "service installed");
        Ok(rec)
    }

    /// Removes a service.
    pub fn remove_service(&self, name: &str) -> Result<(), StoreError> {
        self.service(name)?;
        let d = self.service_dir(name);
        io("remove", &d, fs::remove_dir_all(&d))
    }

    /// Copies a client app into the app store.
    pub fn stage_app(
        &self,
        name: &str,
        file: &Path,
        version: &str,
        description: &str,
        service: Option<&str>,
    ) -> Result<AppRecord, StoreError> {
        check_name(name)?;
        let fname = file
            .file_name()
            .and_then(|f| f.to_str())
            .filter(|f| check_name(&f.to_ascii_lowercase()).is_ok() && *f != APP_FILE)
            .ok_or_else(|| StoreError::BadName(file.display().to_string()))?
            .to_string();
        let (sha, bytes) = sha256_file(file)?;
        let rec = AppRecord {
            name: name.into(),
            version: version.into(),
            description: description.into(),
            service: service.map(str::to_string),
            file: fname.clone(),
            bytes,
            sha256: sha,
        };
        let tmp = self.tmp_path("app");
        io("create", &tmp, fs::create_dir_all(&tmp))?;
        io("copy", file, fs::copy(file, tmp.join(&fname)))?;
        let json = serde_json::to_string_pretty(&rec).expect("a flat record serialises");
        io("write", &tmp, fs::write(tmp.join(APP_FILE), json + "\n"))?;
        let dst = self.root.join("apps").join(name);
        if dst.exists() {
            io("replace", &dst, fs::remove_dir_all(&dst))?;
        }
        io("install", &dst, fs::rename(&tmp, &dst))?;
        Ok(rec)
    }
}

/// An error and its causes, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `s` with every absolute path on this host cut to its file name (`'/var/lib/cloudlet/bases/micro'`
/// → `'micro'`): what the API answers to clients names no server path; the agent's log keeps
/// the whole text.
pub fn hide_paths(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('/') {
        // A path starts at a '/' that begins a word ("at /x", "'/x'", "(/x").
        let before = rest[..i].chars().next_back().or(out.chars().next_back());
        let starts =
            before.is_none_or(|c| c.is_whitespace() || matches!(c, '\'' | '"' | '(' | '=' | '`'));
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | ')' | ',' | '`' | ';'))
            .map_or(rest.len(), |e| i + e);
        let word = rest[i..end].trim_end_matches([':', '.']);
        out.push_str(&rest[..i]);
        if starts && word.len() > 1 && word[1..].contains('/') {
            out.push_str(word.rsplit('/').next().unwrap_or(""));
            rest = &rest[i + word.len()..];
        } else {
            out.push('/');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_paths_are_cut_to_file_names() {
        use super::hide_paths;
        assert_eq!(
            hide_paths("failed to synthesise a VM from base '/var/lib/cl/bases/micro' and overlay '/var/lib/cl/services/m/app.overlay': bad"),
            "failed to synthesise a VM from base 'micro' and overlay 'app.overlay': bad"
        );
        assert_eq!(
            hide_paths("cannot run /usr/local/bin/vmm: gone. see /tmp/x/vmm.log."),
            "cannot run vmm: gone. see vmm.log."
        );
        assert_eq!(
            hide_paths("a/b and 1/2 MiB, http://h:1/v1/x"),
            "a/b and 1/2 MiB, http://h:1/v1/x"
        );
        assert_eq!(hide_paths("/"), "/");
    }

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "load16", "face-rec_2.1"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-x", "A", "a/b", "..", ".x", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_id_and_refusals() {
        let d = scratch("layout");
        let s = Store::open(&d).unwrap();
        assert_eq!(s.id().len(), 12);
        assert_eq!(Store::open(&d).unwrap().id(), s.id(), "the id is stable");
        for sub in ["bases", "services", "apps", "instances", "tmp"] {
            assert!(d.join(sub).is_dir());
        }
        assert!(s.services().is_empty());
        let empty = s.catalogue_digest();
        assert_eq!(empty.len(), 8);
        assert!(matches!(s.service("x"), Err(StoreError::NoService(_))));
        assert!(matches!(s.base("x"), Err(StoreError::NoBase(_))));
        let junk = d.join("junk.overlay");
        fs::write(&junk, b"not an overlay at all").unwrap();
        let e = s.install_service("x", &junk, None, true).unwrap_err();
        assert!(e.to_string().contains("overlay refused"), "{e}");
        assert!(!s.service_dir("x").exists());
        // An app round trip with its checksum.
        let f = d.join("client.apk");
        fs::write(&f, b"hello").unwrap();
        let a = s.stage_app("demo", &f, "1.0", "d", Some("svc")).unwrap();
        assert_eq!(
            a.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.apps(), vec![a.clone()]);
        assert_eq!(fs::read(s.app_file(&a)).unwrap(), b"hello");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let d = scratch("sparse");
        fs::create_dir_all(&d).unwrap();
        let a = d.join("a");
        let mut data = vec![0u8; 4 << 20];
        data[3 << 20] = 7;
        data[5] = 1;
        fs::write(&a, &data).unwrap();
        let b = d.join("b");
        sparse_copy(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&b).unwrap().blocks() * 512 < 1 << 20);
        fs::remove_dir_all(&d).unwrap();
    }
}
