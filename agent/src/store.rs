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
//!   services/NAME/service.json   ServiceRecord: name, description, the current version (its
//!                                base, overlay size + SHA-256 mirrored)
//!   services/NAME/versions/N/    version N (1, 2, …; never reused): version.json
//!                                (VersionRecord) and app.overlay, the overlay for bases/BASE,
//!                                with its shared RAM image beside it (app.overlay.ram*)
//!   apps/NAME/versions/V/        version V of a client app: app.json (AppRecord: version,
//!                                platform, the service it offloads to, file, size + SHA-256)
//!                                and FILE, what a phone downloads
//!   instances/ID.json            supervision record of a service VM (see crate::supervisor)
//!   instances/ID/                its runtime files: vm.sock, serial.log, vmm.log
//!   tmp/                         uploads and stagings in progress (emptied at start)
//! ```
//!
//! Everything is installed by writing under `tmp/` and renaming into place, so a reader
//! never sees half a base, service, version or app, and a failed upload leaves nothing
//! behind. Catalogue changes are serialised by one lock per data directory. A data directory
//! of the earlier layout (`services/NAME/app.overlay`, `apps/NAME/app.json`) is moved to this
//! one when opened (it becomes version 1, and the app's version).

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
/// File name of a service version's record.
pub const VERSION_FILE: &str = "version.json";
/// The files a base archive may hold (anything else is refused).
pub const BASE_FILES: [&str; 5] = [
    format::base::MANIFEST,
    format::base::KERNEL,
    format::base::STATE,
    format::base::MEMORY,
    format::base::DISK,
];

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
    /// No such version of a service.
    #[error("service '{0}' has no version {1}")]
    NoVersion(String, u32),
    /// No such version of an app.
    #[error("app '{0}' has no version '{1}'")]
    NoAppVersion(String, String),
    /// The current version of a service cannot be removed.
    #[error("version {1} is the current version of service '{0}'")]
    CurrentVersion(String, u32),
    /// A base that services' overlays apply to.
    #[error("base '{0}' is used by service(s) {1}")]
    BaseInUse(String, String),
    /// A name already taken.
    #[error("{0} '{1}' exists already")]
    Exists(&'static str, String),
    /// An uploaded base archive that is not a usable base.
    #[error("the base archive is not usable: {0}")]
    BadArchive(String),
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

/// `services/NAME/service.json`: the service and its current version (whose fields it
/// mirrors).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    /// Service name.
    pub name: String,
    /// Name of the base under `bases/` the current version's overlay applies to.
    pub base: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Bytes of the current version's overlay.
    pub overlay_bytes: u64,
    /// Hex SHA-256 of the current version's overlay.
    pub overlay_sha256: String,
    /// When the current version was installed (seconds since the Unix epoch).
    pub installed_unix: u64,
    /// The current version: what a start synthesises.
    #[serde(default = "first_version")]
    pub version: u32,
}

fn first_version() -> u32 {
    1
}

impl ServiceRecord {
    /// This service with version `v` current (its base, overlay and install time).
    pub fn at_version(self, v: &VersionRecord) -> ServiceRecord {
        ServiceRecord {
            base: v.base.clone(),
            overlay_bytes: v.overlay_bytes,
            overlay_sha256: v.overlay_sha256.clone(),
            installed_unix: v.installed_unix,
            version: v.version,
            ..self
        }
    }
}

/// `services/NAME/versions/N/version.json`: one version of a service (immutable).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    /// Version number (1, 2, …).
    pub version: u32,
    /// Name of the base its overlay applies to.
    pub base: String,
    /// Bytes of its overlay.
    pub overlay_bytes: u64,
    /// Hex SHA-256 of its overlay.
    pub overlay_sha256: String,
    /// When it was installed (seconds since the Unix epoch).
    pub installed_unix: u64,
    /// How it was made ("uploaded", "customised: …").
    #[serde(default)]
    pub note: String,
}

/// `apps/NAME/versions/V/app.json`: one version of a client app.
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
    /// The service the app offloads to (what a phone installing it starts), if any.
    #[serde(default)]
    pub service: Option<String>,
    /// The platform it runs on ("android", "ios", "linux", …; "any" when unsaid).
    #[serde(default = "any_platform")]
    pub platform: String,
    /// When it was installed (seconds since the Unix epoch).
    #[serde(default)]
    pub installed_unix: u64,
    /// File name under `apps/NAME/`.
    pub file: String,
    /// Bytes of the file.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

fn any_platform() -> String {
    "any".into()
}

/// The data directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    id: String,
    /// Serialises catalogue changes (version numbers, records).
    lock: std::sync::Arc<std::sync::Mutex<()>>,
}

/// Orders app versions: dotted parts compared as numbers where both are, else as text
/// ("1.10" after "1.9").
pub fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<String> { s.split(['.', '-', '_']).map(str::to_string).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Writes `text` to `path` through a temporary file beside it and a rename.
fn write_atomic(path: &Path, text: &str) -> Result<(), StoreError> {
    let tmp = path.with_extension("json.new");
    io("write", &tmp, fs::write(&tmp, text))?;
    io("install", path, fs::rename(&tmp, path))
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("a flat record serialises") + "\n"
}

/// Copies `src` into the new file `to` keeping all-zero 64 KiB blocks as holes, reading at
/// most `limit` bytes; returns the bytes copied.
fn sparse_write(src: &mut impl Read, to: &Path, limit: u64) -> Result<u64, StoreError> {
    let mut dst = io("create", to, fs::File::create(to))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let mut k = 0;
        while k < buf.len() {
            let r = io("read", to, src.read(&mut buf[k..]))?;
            if r == 0 {
                break;
            }
            k += r;
        }
        if k == 0 {
            break;
        }
        n += k as u64;
        if n > limit {
            return Err(StoreError::BadArchive(format!(
                "it unpacks to more than {limit} bytes"
            )));
        }
        if buf[..k].iter().all(|&b| b == 0) {
            io("seek", to, dst.seek(SeekFrom::Current(k as i64)))?;
        } else {
            io("write", to, dst.write_all(&buf[..k]))?;
        }
    }
    io("write", to, dst.set_len(n))?;
    io("sync", to, dst.sync_all())?;
    Ok(n)
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
        let store = Store {
            root,
            id,
            lock: Default::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Moves a data directory of the earlier layout (one overlay per service, one file per
    /// app) to versions.
    fn migrate(&self) -> Result<(), StoreError> {
        for name in self.names("services") {
            let dir = self.service_dir(&name);
            let old = dir.join(OVERLAY_FILE);
            if !old.is_file() || dir.join("versions").exists() {
                continue;
            }
            let rec = self.service(&name)?;
            let vdir = self.version_dir(&name, 1);
            io("create", &vdir, fs::create_dir_all(&vdir))?;
            let v = VersionRecord {
                version: 1,
                base: rec.base.clone(),
                overlay_bytes: rec.overlay_bytes,
                overlay_sha256: rec.overlay_sha256.clone(),
                installed_unix: rec.installed_unix,
                note: "uploaded".into(),
            };
            io("write", &vdir, fs::write(vdir.join(VERSION_FILE), json(&v)))?;
            io("move", &old, fs::rename(&old, vdir.join(OVERLAY_FILE)))?;
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let n = e.file_name();
                if n.to_string_lossy().starts_with("app.overlay.") {
                    let _ = fs::remove_file(e.path());
                }
            }
            let rec = ServiceRecord { version: 1, ..rec };
            write_atomic(&dir.join(SERVICE_FILE), &json(&rec))?;
            tracing::info!(service = name, "moved to version 1 of the versioned layout");
        }
        for name in self.names("apps") {
            let dir = self.root.join("apps").join(&name);
            let old = dir.join(APP_FILE);
            let Ok(text) = fs::read_to_string(&old) else {
                continue;
            };
            let rec: AppRecord =
                serde_json::from_str(&text).map_err(|e| StoreError::Damaged(old.clone(), e))?;
            let v = if check_name(&rec.version).is_ok() {
                rec.version.clone()
            } else {
                "1".into()
            };
            let vdir = dir.join("versions").join(&v);
            io("create", &vdir, fs::create_dir_all(&vdir))?;
            let f = dir.join(&rec.file);
            io("move", &f, fs::rename(&f, vdir.join(&rec.file)))?;
            let rec = AppRecord { version: v, ..rec };
            io("write", &vdir, fs::write(vdir.join(APP_FILE), json(&rec)))?;
            io("remove", &old, fs::remove_file(&old))?;
            tracing::info!(app = name, "moved to the versioned app store layout");
        }
        Ok(())
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
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

    /// `services/NAME/versions/N/`.
    pub fn version_dir(&self, name: &str, version: u32) -> PathBuf {
        self.service_dir(name)
            .join("versions")
            .join(version.to_string())
    }

    /// The overlay file of version `version` of a service (immutable once installed).
    pub fn overlay_path(&self, name: &str, version: u32) -> PathBuf {
        self.version_dir(name, version).join(OVERLAY_FILE)
    }

    /// One version of a service.
    pub fn version(&self, name: &str, version: u32) -> Result<VersionRecord, StoreError> {
        self.service(name)?;
        let p = self.version_dir(name, version).join(VERSION_FILE);
        let text =
            fs::read_to_string(&p).map_err(|_| StoreError::NoVersion(name.into(), version))?;
        serde_json::from_str(&text).map_err(|e| StoreError::Damaged(p, e))
    }

    /// Every version of a service, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, StoreError> {
        self.service(name)?;
        let mut nums: Vec<u32> = fs::read_dir(self.service_dir(name).join("versions"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        nums.sort_unstable();
        Ok(nums
            .into_iter()
            .filter_map(|n| self.version(name, n).ok())
            .collect())
    }

    /// Makes version `version` the current one of service `name` (what starts synthesise).
    pub fn set_current(&self, name: &str, version: u32) -> Result<ServiceRecord, StoreError> {
        let _g = self.locked();
        let rec = self.service(name)?;
        let v = self.version(name, version)?;
        self.base(&v.base)?;
        let rec = rec.at_version(&v);
        write_atomic(&self.service_dir(name).join(SERVICE_FILE), &json(&rec))?;
        tracing::info!(service = name, version, "current version set");
        Ok(rec)
    }

    /// Renames service `name` to `to` (its versions with it), and points the apps that offload
    /// to it at the new name.
    pub fn rename_service(&self, name: &str, to: &str) -> Result<ServiceRecord, StoreError> {
        check_name(to)?;
        let _g = self.locked();
        let rec = self.service(name)?;
        let dst = self.service_dir(to);
        if dst.exists() {
            return Err(StoreError::Exists("service", to.into()));
        }
        let src = self.service_dir(name);
        io("rename", &src, fs::rename(&src, &dst))?;
        let rec = ServiceRecord {
            name: to.into(),
            ..rec
        };
        write_atomic(&dst.join(SERVICE_FILE), &json(&rec))?;
        for app in self.names("apps") {
            for a in self.app_versions(&app).unwrap_or_default() {
                if a.service.as_deref() == Some(name) {
                    let p = self
                        .app_dir(&app)
                        .join("versions")
                        .join(&a.version)
                        .join(APP_FILE);
                    let a = AppRecord {
                        service: Some(to.into()),
                        ..a
                    };
                    write_atomic(&p, &json(&a))?;
                }
            }
        }
        tracing::info!(service = name, to, "service renamed");
        Ok(rec)
    }

    /// Sets a service's description.
    pub fn set_description(&self, name: &str, text: &str) -> Result<ServiceRecord, StoreError> {
        let _g = self.locked();
        let rec = ServiceRecord {
            description: text.into(),
            ..self.service(name)?
        };
        write_atomic(&self.service_dir(name).join(SERVICE_FILE), &json(&rec))?;
        Ok(rec)
    }

    /// Removes version `version` of a service (never its current one).
    pub fn remove_version(&self, name: &str, version: u32) -> Result<(), StoreError> {
        let _g = self.locked();
        let rec = self.service(name)?;
        self.version(name, version)?;
        if rec.version == version {
            return Err(StoreError::CurrentVersion(name.into(), version));
        }
        let d = self.version_dir(name, version);
        self.remove_tree(&d)?;
        tracing::info!(service = name, version, "version removed");
        Ok(())
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

    fn app_dir(&self, name: &str) -> PathBuf {
        self.root.join("apps").join(name)
    }

    /// Every version of an app, newest first.
    pub fn app_versions(&self, name: &str) -> Result<Vec<AppRecord>, StoreError> {
        check_name(name)?;
        let mut v: Vec<AppRecord> = fs::read_dir(self.app_dir(name).join("versions"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let v = e.file_name().into_string().ok()?;
                        self.app_version(name, &v).ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        if v.is_empty() {
            return Err(StoreError::NoApp(name.into()));
        }
        v.sort_by(|a, b| version_order(&b.version, &a.version));
        Ok(v)
    }

    /// One version of an app.
    pub fn app_version(&self, name: &str, version: &str) -> Result<AppRecord, StoreError> {
        check_name(name)?;
        check_name(version)?;
        let p = self
            .app_dir(name)
            .join("versions")
            .join(version)
            .join(APP_FILE);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(_) if !self.app_dir(name).is_dir() => return Err(StoreError::NoApp(name.into())),
            Err(_) => return Err(StoreError::NoAppVersion(name.into(), version.into())),
        };
        serde_json::from_str(&text).map_err(|e| StoreError::Damaged(p, e))
    }

    /// An app's newest version.
    pub fn app(&self, name: &str) -> Result<AppRecord, StoreError> {
        Ok(self.app_versions(name)?.remove(0))
    }

    /// The file of an app's version.
    pub fn app_file(&self, rec: &AppRecord) -> PathBuf {
        self.app_dir(&rec.name)
            .join("versions")
            .join(&rec.version)
            .join(&rec.file)
    }

    /// Every app (its newest version).
    pub fn apps(&self) -> Vec<AppRecord> {
        self.names("apps")
            .into_iter()
            .filter_map(|n| self.app(&n).ok())
            .collect()
    }

    /// Removes one version of an app (the app with its last one).
    pub fn remove_app_version(&self, name: &str, version: &str) -> Result<(), StoreError> {
        let _g = self.locked();
        self.app_version(name, version)?;
        let d = self.app_dir(name).join("versions").join(version);
        io("remove", &d, fs::remove_dir_all(&d))?;
        if self.app_versions(name).is_err() {
            let d = self.app_dir(name);
            io("remove", &d, fs::remove_dir_all(&d))?;
        }
        tracing::info!(app = name, version, "app version removed");
        Ok(())
    }

    /// Removes an app with every version.
    pub fn remove_app(&self, name: &str) -> Result<(), StoreError> {
        let _g = self.locked();
        self.app_versions(name)?;
        let d = self.app_dir(name);
        io("remove", &d, fs::remove_dir_all(&d))?;
        tracing::info!(app = name, "app removed");
        Ok(())
    }

    /// Unpacks a base archive (tar, or tar compressed with zstd; GNU sparse entries are
    /// fine) into `bases/NAME` after checking it: only the files of a base, its manifest
    /// matching them, and its content id recomputed equal to the manifest's. Refuses a name
    /// already staged. At most `limit` bytes unpacked. Nothing is installed on any failure.
    pub fn install_base_archive(
        &self,
        name: &str,
        archive: impl Read,
        limit: u64,
    ) -> Result<BaseInfo, StoreError> {
        check_name(name)?;
        if self.base_dir(name).exists() {
            return Err(StoreError::Exists("base", name.into()));
        }
        let tmp = self.tmp_path("base-upload");
        io("create", &tmp, fs::create_dir_all(&tmp))?;
        let r = self.unpack_base(&tmp, archive, limit).and_then(|()| {
            let _g = self.locked();
            if self.base_dir(name).exists() {
                return Err(StoreError::Exists("base", name.into()));
            }
            let dst = self.base_dir(name);
            io("install", &dst, fs::rename(&tmp, &dst))
        });
        if let Err(e) = r {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        tracing::info!(base = name, "base uploaded and installed");
        self.base(name)
    }

    fn unpack_base(&self, tmp: &Path, archive: impl Read, limit: u64) -> Result<(), StoreError> {
        let bad = |m: String| StoreError::BadArchive(m);
        let mut r = std::io::BufReader::new(archive);
        let head = {
            use std::io::BufRead;
            io("read", tmp, r.fill_buf())?.to_vec()
        };
        let input: Box<dyn Read> = if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(r)
                    .map_err(|e| bad(format!("zstd: {e}")))?,
            )
        } else {
            Box::new(r)
        };
        let mut ar = tar::Archive::new(input);
        let mut left = limit;
        let mut seen = Vec::new();
        for e in ar
            .entries()
            .map_err(|e| bad(format!("not a tar archive: {e}")))?
        {
            let mut e = e.map_err(|e| bad(format!("a damaged tar entry: {e}")))?;
            let path = e
                .path()
                .map_err(|e| bad(format!("an entry's name: {e}")))?
                .into_owned();
            let ty = e.header().entry_type();
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("")
                .to_string();
            if ty.is_dir() && path.components().count() <= 1 {
                continue;
            }
            let top = path.components().count() == 1
                || (path.components().count() == 2 && path.starts_with("."));
            if !(ty.is_file() || ty.is_gnu_sparse()) || !top || !BASE_FILES.contains(&file.as_str())
            {
                return Err(bad(format!(
                    "it holds '{}'; a base archive holds only {} at its top",
                    path.display(),
                    BASE_FILES.join(", ")
                )));
            }
            if seen.contains(&file) {
                return Err(bad(format!("it holds '{file}' twice")));
            }
            let n = sparse_write(&mut e, &tmp.join(&file), left).map_err(|e| match e {
                StoreError::Io(_, _, io) => bad(format!("cannot unpack '{file}': {io}")),
                other => other,
            })?;
            left -= n;
            seen.push(file);
        }
        let m = Manifest::load(tmp).map_err(|e| {
            bad(hide_paths(&error_chain(&e)).replace(
                "No such file or directory (os error 2)",
                "missing from the archive",
            ))
        })?;
        let id = format::base::content_id(tmp).map_err(|e| bad(format!("cannot hash it: {e}")))?;
        let id = hex(&id);
        if id != m.id {
            return Err(bad(format!(
                "its files hash to content id {id}, but its manifest says {}",
                m.id
            )));
        }
        if self.bases().iter().any(|b| b.id == id) {
            tracing::info!(
                id,
                "a base with the same content is staged under another name"
            );
        }
        Ok(())
    }

    /// Removes a base that no version of any service applies to.
    pub fn remove_base(&self, name: &str) -> Result<(), StoreError> {
        let _g = self.locked();
        self.base(name)?;
        let users: Vec<String> = self
            .services()
            .into_iter()
            .filter(|s| {
                self.versions(&s.name)
                    .map(|v| v.iter().any(|v| v.base == name))
                    .unwrap_or(s.base == name)
            })
            .map(|s| s.name)
            .collect();
        if !users.is_empty() {
            return Err(StoreError::BaseInUse(name.into(), users.join(", ")));
        }
        let d = self.base_dir(name);
        io("remove", &d, fs::remove_dir_all(&d))?;
        tracing::info!(base = name, "base removed");
        Ok(())
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

    /// Installs the overlay at `overlay` (moved when `copy` is false: a file under `tmp/` or
    /// anywhere on the same file system) as the next version of service `name` (creating
    /// it: version 1), after [`Store::verify_overlay`], and makes it the current version.
    /// Nothing is installed when verification fails.
    pub fn install_service(
        &self,
        name: &str,
        overlay: &Path,
        description: Option<&str>,
        copy: bool,
    ) -> Result<ServiceRecord, StoreError> {
        self.install_version(name, overlay, description, copy, "uploaded", true)
            .map(|(rec, _)| rec)
    }

    /// As [`Store::install_service`], with the version's `note`; `current` false keeps the
    /// current version of an existing service as it is (the new one is only listed). Returns
    /// the service's record and the new version's.
    pub fn install_version(
        &self,
        name: &str,
        overlay: &Path,
        description: Option<&str>,
        copy: bool,
        note: &str,
        current: bool,
    ) -> Result<(ServiceRecord, VersionRecord), StoreError> {
        check_name(name)?;
        let base = self.verify_overlay(overlay)?;
        let (sha, bytes) = sha256_file(overlay)?;
        let _g = self.locked();
        let old = match self.service(name) {
            Ok(r) => Some(r),
            Err(StoreError::NoService(_)) => None,
            Err(e) => return Err(e),
        };
        let version = match &old {
            Some(_) => {
                let last = fs::read_dir(self.service_dir(name).join("versions"))
                    .map(|rd| {
                        rd.flatten()
                            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                            .max()
                            .unwrap_or(0)
                    })
                    .unwrap_or(0);
                last + 1
            }
            None => 1,
        };
        let now = unix_now();
        let v = VersionRecord {
            version,
            base: base.clone(),
            overlay_bytes: bytes,
            overlay_sha256: sha.clone(),
            installed_unix: now,
            note: note.into(),
        };
        let description = match description {
            Some(d) => d.to_string(),
            None => old
                .as_ref()
                .map(|s| s.description.clone())
                .unwrap_or_default(),
        };
        let rec = match (&old, current) {
            (Some(o), false) => ServiceRecord {
                description,
                ..o.clone()
            },
            _ => ServiceRecord {
                name: name.into(),
                base,
                description,
                overlay_bytes: bytes,
                overlay_sha256: sha,
                installed_unix: now,
                version,
            },
        };
        // Staged whole under tmp/: the version directory (and for a new service, the service
        // directory around it).
        let tmp = self.tmp_path("service");
        let vtmp = if old.is_some() {
            tmp.clone()
        } else {
            tmp.join("versions").join(version.to_string())
        };
        io("create", &vtmp, fs::create_dir_all(&vtmp))?;
        let staged = vtmp.join(OVERLAY_FILE);
        let placed = if copy {
            io("copy", overlay, fs::copy(overlay, &staged).map(drop))
        } else {
            io("move", overlay, fs::rename(overlay, &staged))
        };
        if let Err(e) = placed {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        io("write", &vtmp, fs::write(vtmp.join(VERSION_FILE), json(&v)))?;
        if old.is_some() {
            let dst = self.version_dir(name, version);
            io("install", &dst, fs::rename(&tmp, &dst))?;
            write_atomic(&self.service_dir(name).join(SERVICE_FILE), &json(&rec))?;
        } else {
            io("write", &tmp, fs::write(tmp.join(SERVICE_FILE), json(&rec)))?;
            let dst = self.service_dir(name);
            io("install", &dst, fs::rename(&tmp, &dst))?;
        }
        tracing::info!(service = name, version, base = %v.base, bytes, "service version installed");
        Ok((rec, v))
    }

    /// Removes a service with every version.
    pub fn remove_service(&self, name: &str) -> Result<(), StoreError> {
        let _g = self.locked();
        self.service(name)?;
        self.remove_tree(&self.service_dir(name))
    }

    /// Removes directory `d` of the catalogue: renamed under `tmp/` first (so it is gone from
    /// the catalogue at once, even while a background writer — a RAM image being made —
    /// still adds files to it), then deleted; what cannot be deleted yet goes with `tmp/` at
    /// the next start.
    fn remove_tree(&self, d: &Path) -> Result<(), StoreError> {
        let gone = self.tmp_path("removed");
        io("remove", d, fs::rename(d, &gone))?;
        if fs::remove_dir_all(&gone).is_err() {
            // A file created in it meanwhile: once more, then leave it to the next start.
            if let Err(e) = fs::remove_dir_all(&gone) {
                tracing::warn!(dir = %gone.display(), "left for the next start: {e}");
            }
        }
        Ok(())
    }

    /// Copies a client app into the app store as version `version` (replacing that version).
    pub fn stage_app(
        &self,
        name: &str,
        file: &Path,
        version: &str,
        description: &str,
        service: Option<&str>,
    ) -> Result<AppRecord, StoreError> {
        let fname = file
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("")
            .to_string();
        self.install_app(
            AppUpload {
                name,
                version,
                file_name: &fname,
                description,
                service,
                platform: "any",
            },
            file,
            true,
        )
    }

    /// Installs the file at `file` (moved when `copy` is false) as `up.version` of app
    /// `up.name`, replacing that version.
    pub fn install_app(
        &self,
        up: AppUpload<'_>,
        file: &Path,
        copy: bool,
    ) -> Result<AppRecord, StoreError> {
        check_name(up.name)?;
        check_name(up.version)?;
        check_name(up.platform)?;
        if let Some(s) = up.service {
            check_name(s)?;
        }
        let fname = Some(up.file_name)
            .filter(|f| check_name(&f.to_ascii_lowercase()).is_ok() && *f != APP_FILE)
            .ok_or_else(|| StoreError::BadName(up.file_name.to_string()))?
            .to_string();
        let (sha, bytes) = sha256_file(file)?;
        let rec = AppRecord {
            name: up.name.into(),
            version: up.version.into(),
            description: up.description.into(),
            service: up.service.map(str::to_string),
            platform: up.platform.into(),
            installed_unix: unix_now(),
            file: fname.clone(),
            bytes,
            sha256: sha,
        };
        let tmp = self.tmp_path("app");
        io("create", &tmp, fs::create_dir_all(&tmp))?;
        let placed = if copy {
            io("copy", file, fs::copy(file, tmp.join(&fname)).map(drop))
        } else {
            io("move", file, fs::rename(file, tmp.join(&fname)))
        };
        let r = placed
            .and_then(|()| io("write", &tmp, fs::write(tmp.join(APP_FILE), json(&rec))))
            .and_then(|()| {
                let _g = self.locked();
                let vdir = self.app_dir(up.name).join("versions");
                io("create", &vdir, fs::create_dir_all(&vdir))?;
                let dst = vdir.join(up.version);
                if dst.exists() {
                    io("replace", &dst, fs::remove_dir_all(&dst))?;
                }
                io("install", &dst, fs::rename(&tmp, &dst))
            });
        if let Err(e) = r {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        tracing::info!(app = up.name, version = up.version, bytes, "app installed");
        Ok(rec)
    }
}

/// What an app upload says about its file.
#[derive(Clone, Copy, Debug)]
pub struct AppUpload<'a> {
    /// App name.
    pub name: &'a str,
    /// Its version.
    pub version: &'a str,
    /// The file's name as downloads give it.
    pub file_name: &'a str,
    /// Free text.
    pub description: &'a str,
    /// The service it offloads to.
    pub service: Option<&'a str>,
    /// The platform it runs on.
    pub platform: &'a str,
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
    fn an_earlier_layout_becomes_version_1_and_apps_their_version() {
        let d = scratch("migrate");
        let s = Store::open(&d).unwrap();
        // The earlier layout, by hand: one overlay per service, one file per app.
        let svc = d.join("services/old");
        fs::create_dir_all(&svc).unwrap();
        fs::write(svc.join(OVERLAY_FILE), b"overlay bytes").unwrap();
        fs::write(svc.join("app.overlay.ram"), b"image").unwrap();
        let old = r#"{"name":"old","base":"micro","description":"d","overlay_bytes":13,"overlay_sha256":"ab","installed_unix":5}"#;
        fs::write(svc.join(SERVICE_FILE), old).unwrap();
        let app = d.join("apps/client");
        fs::create_dir_all(&app).unwrap();
        fs::write(app.join("c.apk"), b"apk").unwrap();
        let rec = r#"{"name":"client","version":"1.0","file":"c.apk","bytes":3,"sha256":"cd"}"#;
        fs::write(app.join(APP_FILE), rec).unwrap();
        drop(s);
        let s = Store::open(&d).unwrap();
        let r = s.service("old").unwrap();
        assert_eq!((r.version, r.description.as_str()), (1, "d"));
        assert_eq!(
            fs::read(s.overlay_path("old", 1)).unwrap(),
            b"overlay bytes"
        );
        assert!(!svc.join(OVERLAY_FILE).exists() && !svc.join("app.overlay.ram").exists());
        let v = s.version("old", 1).unwrap();
        assert_eq!((v.overlay_bytes, v.overlay_sha256.as_str()), (13, "ab"));
        let a = s.app("client").unwrap();
        assert_eq!((a.version.as_str(), a.platform.as_str()), ("1.0", "any"));
        assert_eq!(fs::read(s.app_file(&a)).unwrap(), b"apk");
        // A version that does not exist, and the current one, cannot be removed.
        assert!(matches!(
            s.remove_version("old", 2),
            Err(StoreError::NoVersion(..))
        ));
        assert!(matches!(
            s.remove_version("old", 1),
            Err(StoreError::CurrentVersion(..))
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn app_versions_sort_by_number() {
        let mut v = vec!["1.10", "1.9", "2.0-rc1", "1.9.1", "0.1"];
        v.sort_by(|a, b| version_order(a, b));
        assert_eq!(v, ["0.1", "1.9", "1.9.1", "1.10", "2.0-rc1"]);
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
