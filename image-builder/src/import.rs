//! `image-builder import`: an existing VM disk (qcow2 or raw) made into a base's disk — raw,
//! whole 4 KiB blocks, the form `image-builder base --disk` takes — so operators bring the
//! service VMs they already have.
//!
//! QEMU's `qemu-img` (Debian's qemu-utils) is the reference reader of qcow2 and does the
//! work; this module decides what is accepted and checks the result:
//!
//! 1. `qemu-img info --output=json`: the format must be qcow2 or raw; a backing file,
//!    encryption, a compression type other than zlib or zstd, or the image's own `corrupt`
//!    flag is refused (an image `qemu-img` cannot open at all is refused with its message);
//! 2. qcow2: `qemu-img check --output=json` must find no corruption and no check error
//!    (leaked clusters waste space but lose nothing, so they pass) — `qemu-img convert`
//!    alone would read a truncated or damaged image as zeros and succeed;
//! 3. `qemu-img convert -O raw` into a temporary file beside the destination, padded to
//!    whole 4 KiB blocks, then `qemu-img compare` of the source against it;
//! 4. only then is the file renamed into place. Any failure removes the temporary file:
//!    nothing is installed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

/// Why an image was not imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// qemu-img is not installed.
    #[error("qemu-img is not installed: install Debian's qemu-utils (apt-get install qemu-utils)")]
    NoQemuImg(#[source] std::io::Error),
    /// qemu-img cannot open the image (its message says why: truncated header, unknown
    /// compression type, not a disk image …).
    #[error("'{0}' cannot be read as a disk image: {1}")]
    Unreadable(PathBuf, String),
    /// A format other than qcow2 or raw.
    #[error("'{0}' is a {1} image: import takes qcow2 or raw (convert it with `qemu-img convert -O qcow2` first)")]
    Format(PathBuf, String),
    /// The image needs a backing file.
    #[error("'{0}' has a backing file ('{1}'): import takes a self-contained image (flatten it with `qemu-img convert -O qcow2 SRC FLAT.qcow2` first)")]
    Backing(PathBuf, String),
    /// The image is encrypted.
    #[error("'{0}' is encrypted: import takes unencrypted images (decrypt it with `qemu-img convert` and its key first)")]
    Encrypted(PathBuf),
    /// A compression type this import does not read.
    #[error("'{0}' uses {1} compression, which import does not read (zlib and zstd are read)")]
    Compression(PathBuf, String),
    /// The image is damaged.
    #[error("'{0}' is damaged: {1}")]
    Corrupt(PathBuf, String),
    /// The destination exists.
    #[error("'{0}' exists: choose another --out or pass --force to replace it")]
    Exists(PathBuf),
    /// qemu-img failed while converting or comparing.
    #[error("qemu-img {0} of '{1}' failed: {2}")]
    QemuImg(&'static str, PathBuf, String),
    /// The converted disk does not read back equal to the source.
    #[error("the imported disk does not read back equal to '{0}': {1}")]
    Mismatch(PathBuf, String),
    /// A file operation failed.
    #[error("cannot {0} '{1}'")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
}

/// Formats import reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// A plain disk image.
    Raw,
}

impl SourceFormat {
    fn name(self) -> &'static str {
        match self {
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Raw => "raw",
        }
    }
}

/// The fields of `qemu-img info --output=json` import looks at.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Info {
    format: String,
    virtual_size: u64,
    #[serde(default)]
    backing_filename: Option<String>,
    #[serde(default)]
    encrypted: bool,
    #[serde(default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: Option<Qcow2Data>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Qcow2Data {
    #[serde(default)]
    compression_type: Option<String>,
    #[serde(default)]
    corrupt: bool,
}

/// The fields of `qemu-img check --output=json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Check {
    #[serde(default)]
    corruptions: u64,
    #[serde(default)]
    check_errors: u64,
    #[serde(default)]
    leaks: u64,
}

/// What was imported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    /// The source's format.
    pub format: SourceFormat,
    /// The source's virtual size in bytes.
    pub virtual_bytes: u64,
    /// The imported disk's size (whole 4 KiB blocks).
    pub disk_bytes: u64,
    /// Leaked clusters `qemu-img check` found in the source (harmless).
    pub leaks: u64,
}

fn qemu_img(args: &[&OsStr]) -> Result<Output, ImportError> {
    Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(ImportError::NoQemuImg)
}

/// qemu-img's message: its stderr without the program prefix, on one line.
fn message(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_start_matches("qemu-img: "))
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        format!("exit status {}", out.status)
    } else {
        lines.join("; ")
    }
}

/// Inspects `src` and decides whether it can be imported; its format and virtual size.
pub fn inspect(
    src: &Path,
    forced: Option<SourceFormat>,
) -> Result<(SourceFormat, u64), ImportError> {
    let mut args: Vec<&OsStr> = vec!["info".as_ref(), "--output=json".as_ref()];
    if let Some(f) = forced {
        args.push(OsStr::new("-f"));
        args.push(OsStr::new(f.name()));
    }
    args.push(src.as_os_str());
    let out = qemu_img(&args)?;
    if !out.status.success() {
        return Err(ImportError::Unreadable(src.to_owned(), message(&out)));
    }
    let info: Info = serde_json::from_slice(&out.stdout).map_err(|e| {
        ImportError::Unreadable(
            src.to_owned(),
            format!("qemu-img info gave unexpected output: {e}"),
        )
    })?;
    let format = match info.format.as_str() {
        "qcow2" => SourceFormat::Qcow2,
        "raw" => SourceFormat::Raw,
        other => return Err(ImportError::Format(src.to_owned(), other.to_string())),
    };
    if let Some(b) = &info.backing_filename {
        return Err(ImportError::Backing(src.to_owned(), b.clone()));
    }
    if info.encrypted {
        return Err(ImportError::Encrypted(src.to_owned()));
    }
    if let Some(d) = info.format_specific.as_ref().and_then(|f| f.data.as_ref()) {
        if let Some(c) = &d.compression_type {
            if c != "zlib" && c != "zstd" {
                return Err(ImportError::Compression(src.to_owned(), c.clone()));
            }
        }
        if d.corrupt {
            return Err(ImportError::Corrupt(
                src.to_owned(),
                "the image is marked corrupt (qemu found an inconsistency while writing it)".into(),
            ));
        }
    }
    Ok((format, info.virtual_size))
}

/// Runs `qemu-img check` on a qcow2 image; the number of leaked clusters.
fn check(src: &Path) -> Result<u64, ImportError> {
    let out = qemu_img(&[
        "check".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        src.as_os_str(),
    ])?;
    // Exit 0: clean; 3: leaks only; 2: corruptions; 1: the check could not run.
    let c: Check = match serde_json::from_slice(&out.stdout) {
        Ok(c) => c,
        Err(_) => return Err(ImportError::Corrupt(src.to_owned(), message(&out))),
    };
    if c.corruptions > 0 || c.check_errors > 0 || !matches!(out.status.code(), Some(0 | 3)) {
        return Err(ImportError::Corrupt(
            src.to_owned(),
            format!(
                "qemu-img check found {} corruptions and {} check errors (a truncated or damaged image; repair a copy with `qemu-img check -r all` if you trust it)",
                c.corruptions, c.check_errors
            ),
        ));
    }
    Ok(c.leaks)
}

/// The temporary file beside `out` the disk is converted into.
fn temporary(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    out.with_file_name(format!(".{name}.importing-{}", std::process::id()))
}

/// Imports `src` into the raw disk `out` (see the module doc); `forced` skips format
/// probing; `force` replaces an existing `out`.
pub fn import(
    src: &Path,
    out: &Path,
    forced: Option<SourceFormat>,
    force: bool,
) -> Result<Imported, ImportError> {
    if out.exists() && !force {
        return Err(ImportError::Exists(out.to_owned()));
    }
    let (format, virtual_bytes) = inspect(src, forced)?;
    let leaks = match format {
        SourceFormat::Qcow2 => check(src)?,
        SourceFormat::Raw => 0,
    };
    let tmp = temporary(out);
    let result = convert_and_compare(src, format, &tmp);
    let disk_bytes = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImportError::Io(
            "install the imported disk as",
            out.to_owned(),
            e,
        ));
    }
    Ok(Imported {
        format,
        virtual_bytes,
        disk_bytes,
        leaks,
    })
}

/// Converts `src` to raw at `tmp`, pads it to whole 4 KiB blocks and compares it with the
/// source; the disk's size.
fn convert_and_compare(src: &Path, format: SourceFormat, tmp: &Path) -> Result<u64, ImportError> {
    let f = format.name();
    let out = qemu_img(&[
        "convert".as_ref(),
        "-f".as_ref(),
        f.as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        src.as_os_str(),
        tmp.as_os_str(),
    ])?;
    if !out.status.success() {
        return Err(ImportError::QemuImg(
            "convert",
            src.to_owned(),
            message(&out),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(tmp)
        .map_err(|e| ImportError::Io("open", tmp.to_owned(), e))?;
    let len = file
        .metadata()
        .map_err(|e| ImportError::Io("inspect", tmp.to_owned(), e))?
        .len();
    if len == 0 {
        return Err(ImportError::Corrupt(
            src.to_owned(),
            "the disk is empty".into(),
        ));
    }
    let padded = len.next_multiple_of(4096);
    file.set_len(padded)
        .map_err(|e| ImportError::Io("pad", tmp.to_owned(), e))?;
    file.sync_all()
        .map_err(|e| ImportError::Io("flush", tmp.to_owned(), e))?;
    // The padding past the source's end reads as zeros, which compare accepts (it is not
    // run with -s, strict size).
    let cmp = qemu_img(&[
        "compare".as_ref(),
        "-f".as_ref(),
        f.as_ref(),
        "-F".as_ref(),
        "raw".as_ref(),
        src.as_os_str(),
        tmp.as_os_str(),
    ])?;
    match cmp.status.code() {
        Some(0) => Ok(padded),
        Some(1) => Err(ImportError::Mismatch(
            src.to_owned(),
            String::from_utf8_lossy(&cmp.stdout).trim().to_string(),
        )),
        _ => Err(ImportError::QemuImg(
            "compare",
            src.to_owned(),
            message(&cmp),
        )),
    }
}
