//! Board configurations: one TOML file per appliance board (`board-configs/*.toml`).
//!
//! A file is parsed into [`RawBoard`] (serde, `deny_unknown_fields`) and then checked into a
//! [`Board`]; every error names the file, the key (`vms.max_vms`) and what to do. The `dev`
//! board is embedded in the binary and is the default.
//!
//! ```toml
//! name = "dev"                      # [a-z0-9-], 1..=32 characters
//! description = "…"                 # optional
//! [vms]
//! cpus = 2                          # CPUs reserved for service VMs (1..=1024)
//! memory_mib = 1024                 # memory reserved for service VMs (64..=16777216)
//! max_vms = 4                       # service VMs at once (1..=1024)
//! network = "user"                  # "user" or "tap:NAME" (then max_vms = 1)
//! [api]
//! listen = ["127.0.0.1"]            # IP addresses (API and instance ports)
//! port = 0                          # 0 = any free port
//! max_upload_mib = 256              # largest overlay upload (1..=65536)
//! [discovery]
//! enabled = true
//! [storage]
//! data_dir = "target/agent-dev"     # relative: to the file's directory (cwd when embedded)
//! ```
//!
//! The file holds no secret: the operator token is `DATA/operator.token` or the environment
//! (see [`crate::auth::operator_token`]); a file that still has `api.token` is refused with
//! an error saying so.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The embedded default board's TOML.
pub const DEV_TOML: &str = include_str!("../../board-configs/dev.toml");
/// The other board files shipped in `board-configs/`, by name (for `--board NAME`).
pub const SHIPPED: &[(&str, &str)] = &[
    ("dev", DEV_TOML),
    (
        "minipc-4c",
        include_str!("../../board-configs/minipc-4c.toml"),
    ),
];

/// A board file as written (before checks).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBoard {
    /// Board name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Service-VM resources and limits.
    pub vms: RawVms,
    /// Client API.
    pub api: RawApi,
    /// mDNS discovery.
    #[serde(default)]
    pub discovery: RawDiscovery,
    /// Where state lives.
    pub storage: RawStorage,
    /// The flashable disk image of this board (`cargo xtask image`); the agent ignores it.
    #[serde(default)]
    pub image: Option<RawImage>,
}

/// `[image]`: what the flashable disk image of the board is made of.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    /// The Debian kernel package (`linux-image-cloud-amd64`: virtio only; `linux-image-amd64`:
    /// real hardware).
    pub kernel: String,
    /// Extra Debian packages (firmware, drivers).
    #[serde(default)]
    pub packages: Vec<String>,
    /// The box's host name.
    pub hostname: String,
    /// Kernel consoles, in order (the last one is /dev/console), e.g. `["tty0", "ttyS0,115200"]`.
    pub console: Vec<String>,
    /// EFI system partition, MiB.
    pub esp_mib: u64,
    /// Each of the two root slots, MiB.
    pub root_mib: u64,
    /// The data partition, MiB (grown to the rest of the disk on first boot).
    pub data_mib: u64,
    /// The API's listen addresses on the box (instead of `[api] listen`).
    pub listen: Vec<String>,
    /// The API's port on the box (instead of `[api] port`).
    pub port: u16,
}

/// `[vms]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVms {
    /// CPUs reserved for service VMs.
    pub cpus: u32,
    /// Memory reserved for service VMs, MiB.
    pub memory_mib: u64,
    /// Service VMs at once.
    pub max_vms: u32,
    /// Guest network mode.
    #[serde(default = "default_network")]
    pub network: String,
}

fn default_network() -> String {
    "user".into()
}

/// `[api]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Port (0 = pick).
    pub port: u16,
    /// No longer accepted (the board file holds no secret): present only to say where the
    /// token goes now.
    #[serde(default)]
    pub token: Option<toml::Value>,
    /// Largest upload, MiB.
    #[serde(default = "default_upload")]
    pub max_upload_mib: u64,
}

fn default_upload() -> u64 {
    256
}

/// `[discovery]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    /// Announce over mDNS.
    pub enabled: bool,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        RawDiscovery { enabled: true }
    }
}

/// `[storage]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// Data directory.
    pub data_dir: PathBuf,
}

/// How service VMs reach the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// User-mode networking inside the vmm; each instance gets a forwarded host port.
    User,
    /// A TAP device of this name (one instance at a time).
    Tap(String),
}

/// A checked board configuration.
#[derive(Clone, Debug)]
pub struct Board {
    /// Board name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// CPUs reserved for service VMs.
    pub cpus: u32,
    /// Memory reserved for service VMs, MiB.
    pub memory_mib: u64,
    /// Service VMs at once.
    pub max_vms: u32,
    /// Guest network mode.
    pub network: NetworkMode,
    /// Listen addresses (the first one also carries the instances' forwarded ports).
    pub listen: Vec<IpAddr>,
    /// API port (0 = pick a free one).
    pub port: u16,
    /// Largest overlay upload, bytes.
    pub max_upload_bytes: u64,
    /// Announce over mDNS.
    pub discovery: bool,
    /// Data directory (absolute or relative to the working directory).
    pub data_dir: PathBuf,
    /// Where the configuration came from (a path, or `embedded:NAME`).
    pub source: String,
    /// The disk image's recipe (`[image]`), when the board has one.
    pub image: Option<RawImage>,
}

/// A board file that cannot be used; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    /// The file cannot be read.
    #[error("cannot read board config {0}")]
    Read(String, #[source] std::io::Error),
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("{file}:{line}:{column}: {key}{message}")]
    Parse {
        /// File.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// "key `vms.max_vms`: " or empty when unknown.
        key: String,
        /// The parser's message (and a suggestion).
        message: String,
    },
    /// A value out of range or inconsistent with another.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        /// File.
        file: String,
        /// Dotted key.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// `--board NAME` names no shipped board.
    #[error("no board named '{0}' (shipped boards: {1}); use --config FILE for another")]
    UnknownBoard(String, String),
}

impl Board {
    /// A shipped board by name (`dev`, `minipc-4c`).
    pub fn shipped(name: &str) -> Result<Board, BoardError> {
        let (_, text) = SHIPPED.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            BoardError::UnknownBoard(
                name.into(),
                SHIPPED
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
        Board::parse(text, &format!("embedded:board-configs/{name}.toml"), None)
    }

    /// Reads and checks a board file; a relative `data_dir` is taken relative to the file.
    pub fn load(path: &Path) -> Result<Board, BoardError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| BoardError::Read(shown.clone(), e))?;
        Board::parse(&text, &shown, path.parent())
    }

    /// Parses and checks board TOML; `file` names it in errors; a relative `data_dir` is
    /// joined to `base_dir` when given.
    pub fn parse(text: &str, file: &str, base_dir: Option<&Path>) -> Result<Board, BoardError> {
        let raw: RawBoard = toml::from_str(text).map_err(|e| parse_error(text, file, &e))?;
        let invalid = |key: &str, message: String| BoardError::Invalid {
            file: file.into(),
            key: key.into(),
            message,
        };
        let name_ok = !raw.name.is_empty()
            && raw.name.len() <= 32
            && raw
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(invalid(
                "name",
                format!(
                    "'{}' is not a board name: use 1-32 characters of a-z, 0-9 and '-'",
                    raw.name
                ),
            ));
        }
        range(raw.vms.cpus.into(), 1, 1024)
            .map_err(|m| invalid("vms.cpus", m + " CPUs reserved for service VMs"))?;
        range(raw.vms.memory_mib, 64, 16 << 20)
            .map_err(|m| invalid("vms.memory_mib", m + " MiB reserved for service VMs"))?;
        range(raw.vms.max_vms.into(), 1, 1024)
            .map_err(|m| invalid("vms.max_vms", m + " service VMs at once"))?;
        let network = match raw.vms.network.as_str() {
            "user" => NetworkMode::User,
            n if n.starts_with("tap:") => {
                let dev = &n[4..];
                if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ']) {
                    return Err(invalid(
                        "vms.network",
                        format!(
                            "'{dev}' is not a TAP device name (1-15 characters, no '/' or spaces)"
                        ),
                    ));
                }
                if raw.vms.max_vms != 1 {
                    return Err(invalid(
                        "vms.network",
                        format!(
                            "a TAP device serves one guest, but vms.max_vms is {}: set max_vms = 1 or use network = \"user\"",
                            raw.vms.max_vms
                        ),
                    ));
                }
                NetworkMode::Tap(dev.into())
            }
            other => {
                return Err(invalid(
                    "vms.network",
                    format!("'{other}' is not a network mode: use \"user\" or \"tap:NAME\""),
                ))
            }
        };
        if raw.api.listen.is_empty() {
            return Err(invalid(
                "api.listen",
                "no address given: list at least one, e.g. [\"127.0.0.1\"]".into(),
            ));
        }
        let mut listen = Vec::new();
        for a in &raw.api.listen {
            let ip: IpAddr = a.parse().map_err(|_| {
                invalid(
                    "api.listen",
                    format!("'{a}' is not an IP address (e.g. \"127.0.0.1\" or \"0.0.0.0\")"),
                )
            })?;
            listen.push(ip);
        }
        if raw.api.token.is_some() {
            return Err(invalid(
                "api.token",
                format!(
                    "the board file holds no secret any more: remove this line. The operator token is DATA_DIR/{} (made on first start, mode 0600), or the environment variable {}, or a file named by `agent --token-file FILE` (mode 0600)",
                    crate::auth::OPERATOR_TOKEN_FILE,
                    crate::auth::TOKEN_ENV
                ),
            ));
        }
        range(raw.api.max_upload_mib, 1, 65536)
            .map_err(|m| invalid("api.max_upload_mib", m + " MiB"))?;
        if raw.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "storage.data_dir",
                "empty path: name a directory the agent may create".into(),
            ));
        }
        let data_dir = match base_dir {
            Some(b) if raw.storage.data_dir.is_relative() => b.join(&raw.storage.data_dir),
            _ => raw.storage.data_dir.clone(),
        };
        if let Some(img) = &raw.image {
            check_image(img).map_err(|(k, m)| invalid(&format!("image.{k}"), m))?;
        }
        Ok(Board {
            name: raw.name,
            description: raw.description.unwrap_or_default(),
            cpus: raw.vms.cpus,
            memory_mib: raw.vms.memory_mib,
            max_vms: raw.vms.max_vms,
            network,
            listen,
            port: raw.api.port,
            max_upload_bytes: raw.api.max_upload_mib << 20,
            discovery: raw.discovery.enabled,
            data_dir,
            source: file.into(),
            image: raw.image,
        })
    }
}

/// Checks `[image]`; the error names the key (without `image.`) and what to do.
fn check_image(img: &RawImage) -> Result<(), (&'static str, String)> {
    let package_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
    };
    if !package_ok(&img.kernel) || !img.kernel.starts_with("linux-image-") {
        return Err((
            "kernel",
            format!(
                "'{}' is not a Debian kernel package: use e.g. \"linux-image-amd64\" or \"linux-image-cloud-amd64\"",
                img.kernel
            ),
        ));
    }
    if let Some(p) = img.packages.iter().find(|p| !package_ok(p)) {
        return Err(("packages", format!("'{p}' is not a Debian package name")));
    }
    let host_ok = !img.hostname.is_empty()
        && img.hostname.len() <= 63
        && !img.hostname.starts_with('-')
        && img
            .hostname
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !host_ok {
        return Err((
            "hostname",
            format!(
                "'{}' is not a host name: use 1-63 characters of a-z, 0-9 and '-'",
                img.hostname
            ),
        ));
    }
    if img.console.is_empty() || img.console.iter().any(|c| c.is_empty() || c.contains(' ')) {
        return Err((
            "console",
            "list the kernel consoles without spaces, e.g. [\"tty0\", \"ttyS0,115200\"]".into(),
        ));
    }
    range(img.esp_mib, 64, 4096).map_err(|m| ("esp_mib", m + " MiB"))?;
    range(img.root_mib, 256, 65536).map_err(|m| ("root_mib", m + " MiB per root slot"))?;
    range(img.data_mib, 64, 1 << 20).map_err(|m| ("data_mib", m + " MiB"))?;
    if img.listen.is_empty() || img.listen.iter().any(|a| a.parse::<IpAddr>().is_err()) {
        return Err((
            "listen",
            "list the IP addresses the box's API listens on, e.g. [\"0.0.0.0\"]".into(),
        ));
    }
    if img.port == 0 {
        return Err((
            "port",
            "a box needs a fixed API port that clients and forwarders can be told: e.g. 9999"
                .into(),
        ));
    }
    Ok(())
}

fn range(v: u64, lo: u64, hi: u64) -> Result<(), String> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(format!("{v} is out of range: use {lo} to {hi}"))
    }
}

/// Turns a toml error into one naming the file, position and key, with a "did you mean"
/// for a misspelt key.
fn parse_error(text: &str, file: &str, e: &toml::de::Error) -> BoardError {
    let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let line = text[..offset].matches('\n').count() + 1;
    let column = offset - text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    let mut message = e.message().trim().to_string();
    let key = key_at(text, offset)
        .map(|k| format!("key `{k}`: "))
        .unwrap_or_default();
    if let Some(s) = suggestion(&message) {
        message.push_str(&format!("; did you mean `{s}`?"));
    }
    BoardError::Parse {
        file: file.into(),
        line,
        column,
        key,
        message,
    }
}

/// The dotted key whose line holds byte `offset`: the nearest `[table]` above plus the key
/// before `=` on that line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("");
    let key = line.split('=').next()?.trim();
    if line.trim_start().starts_with('[') || !line.contains('=') || key.is_empty() {
        return None;
    }
    let table = text[..start].lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']')).then(|| l.trim_matches(['[', ']']).trim())
    });
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

/// For "unknown field `x`, expected one of `a`, `b`": the expected name closest to `x`.
fn suggestion(message: &str) -> Option<String> {
    let mut names = message.split('`').skip(1).step_by(2);
    let unknown = names.next()?;
    if !message.starts_with("unknown field") {
        return None;
    }
    names
        .map(|n| (edit_distance(unknown, n), n))
        .filter(|(d, n)| *d <= 3.max(n.len() / 3))
        .min()
        .map(|(_, n)| n.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_board_is_valid() {
        for (name, _) in SHIPPED {
            let b = Board::shipped(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&b.name, name);
        }
        let dev = Board::shipped("dev").unwrap();
        assert_eq!(dev.listen, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(dev.port, 0);
        assert_eq!(dev.network, NetworkMode::User);
        let mini = Board::shipped("minipc-4c").unwrap();
        assert_eq!(mini.port, 9999);
        assert!(mini.max_vms > dev.max_vms);
    }

    #[test]
    fn the_files_on_disk_match_the_embedded_copies() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../board-configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                let b = Board::load(&p).unwrap_or_else(|e| panic!("{e}"));
                assert!(SHIPPED.iter().any(|(n, _)| *n == b.name), "{}", b.name);
                seen += 1;
            }
        }
        assert_eq!(seen, SHIPPED.len());
    }

    fn err(text: &str) -> String {
        Board::parse(text, "x.toml", None).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_name_the_file_the_key_and_a_fix() {
        let t = DEV_TOML.replace("max_vms = 4", "max_vm = 4");
        let e = err(&t);
        assert!(e.starts_with("x.toml:"), "{e}");
        assert!(e.contains("key `vms.max_vm`"), "{e}");
        assert!(e.contains("did you mean `max_vms`"), "{e}");
        let e = err(&format!("{DEV_TOML}\n[extra]\nx = 1\n"));
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        // (text replaced in the dev board, by what, what the error must say)
        let cases = [
            (
                "max_vms = 4",
                "max_vms = 0",
                "x.toml: key `vms.max_vms`: 0 is out of range",
            ),
            ("max_vms = 4", "max_vms = \"four\"", "key `vms.max_vms`"),
            (
                "\"127.0.0.1\"",
                "\"localhost\"",
                "key `api.listen`: 'localhost' is not an IP",
            ),
            ("\"user\"", "\"bridge\"", "vms.network"),
            ("\"user\"", "\"tap:tap0\"", "max_vms = 1"),
            (
                "port = 0",
                "port = 0\ntoken = \"cloudlet-dev-token\"",
                "key `api.token`: the board file holds no secret any more: remove this line. The operator token is DATA_DIR/operator.token",
            ),
            ("name = \"dev\"", "name = \"Dev Board\"", "key `name`"),
            ("port = 0", "port = 70000", "key `api.port`"),
        ];
        for (from, to, needle) in cases {
            let e = err(&DEV_TOML.replace(from, to));
            assert!(e.contains(needle), "{e}");
        }
        let tap = DEV_TOML
            .replace("\"user\"", "\"tap:tap0\"")
            .replace("max_vms = 4", "max_vms = 1");
        let b = Board::parse(&tap, "x.toml", None).unwrap();
        assert_eq!(b.network, NetworkMode::Tap("tap0".into()));
    }

    #[test]
    fn the_image_section_is_checked() {
        let dev = Board::shipped("dev").unwrap();
        let img = dev.image.expect("the dev board describes its disk image");
        assert_eq!(img.kernel, "linux-image-cloud-amd64");
        assert_eq!(
            (img.port, img.listen.clone()),
            (9999, vec!["0.0.0.0".to_string()])
        );
        let mini = Board::shipped("minipc-4c").unwrap().image.unwrap();
        assert!(mini.root_mib > img.root_mib && mini.kernel == "linux-image-amd64");
        let cases = [
            (
                "kernel = \"linux-image-cloud-amd64\"",
                "kernel = \"vmlinuz\"",
                "key `image.kernel`: 'vmlinuz' is not a Debian kernel package",
            ),
            (
                "packages = []",
                "packages = [\"Bad Name\"]",
                "key `image.packages`",
            ),
            (
                "hostname = \"cloudlet-dev\"",
                "hostname = \"Cloudlet_Dev\"",
                "key `image.hostname`",
            ),
            (
                "root_mib = 640",
                "root_mib = 100",
                "key `image.root_mib`: 100 is out of range",
            ),
            (
                "port = 9999",
                "port = 0",
                "key `image.port`: a box needs a fixed API port",
            ),
            (
                "listen = [\"0.0.0.0\"]",
                "listen = [\"any\"]",
                "key `image.listen`",
            ),
            ("console = [", "consoles = [", "consoles"),
        ];
        for (from, to, needle) in cases {
            let t = DEV_TOML.replace(from, to);
            assert_ne!(t, DEV_TOML, "{from} is in the dev board");
            let e = err(&t);
            assert!(e.contains(needle), "{e}");
        }
        // A board without [image] is fine for the agent (xtask says it cannot make an image).
        let cut = &DEV_TOML[..DEV_TOML.find("[image]").unwrap()];
        assert!(Board::parse(cut, "x.toml", None).unwrap().image.is_none());
    }

    #[test]
    fn relative_data_dirs_follow_the_file() {
        let b = Board::parse(DEV_TOML, "x.toml", Some(Path::new("/etc/cloudlet"))).unwrap();
        assert_eq!(b.data_dir, Path::new("/etc/cloudlet/target/agent-dev"));
        assert!(matches!(
            Board::shipped("nope"),
            Err(BoardError::UnknownBoard(..))
        ));
    }
}
