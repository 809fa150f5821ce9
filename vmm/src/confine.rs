//! Where a vmm may write: with `--confine DIR` (the agent passes the instance's directory),
//! every output it creates (its control socket, serial log and disk δ, and the directory a
//! control request asks a snapshot in) must lie inside DIR once resolved: `..` and symbolic
//! links are followed before the check, so neither leads out. A path that does not exist yet
//! is checked through its deepest existing ancestor, and may not climb (`..`) below it.

use std::path::{Component, Path, PathBuf};

/// Errors of confinement.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The confinement directory itself cannot be resolved.
    #[error("--confine '{0}' is not a directory that can be resolved")]
    Root(PathBuf, #[source] std::io::Error),
    /// A path cannot be resolved.
    #[error("cannot resolve '{0}'")]
    Resolve(PathBuf, #[source] std::io::Error),
    /// A path leads outside the confinement directory.
    #[error("'{path}' is outside this VM's directory '{root}': outputs may only be written there")]
    Outside {
        /// The path as given.
        path: PathBuf,
        /// The confinement directory.
        root: PathBuf,
    },
}

/// A directory outputs are confined to.
#[derive(Clone, Debug)]
pub struct Confine {
    root: PathBuf,
}

impl Confine {
    /// Confines outputs to `dir` (which must exist).
    pub fn new(dir: &Path) -> Result<Confine, ConfineError> {
        let root = dir
            .canonicalize()
            .map_err(|e| ConfineError::Root(dir.to_owned(), e))?;
        if !root.is_dir() {
            return Err(ConfineError::Root(
                dir.to_owned(),
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        Ok(Confine { root })
    }

    /// The directory, resolved.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` resolved (relative to the current directory), if it lies inside the
    /// directory; the directory itself counts as inside.
    pub fn check(&self, path: &Path) -> Result<PathBuf, ConfineError> {
        let outside = || ConfineError::Outside {
            path: path.to_owned(),
            root: self.root.clone(),
        };
        let abs =
            std::path::absolute(path).map_err(|e| ConfineError::Resolve(path.to_owned(), e))?;
        // The deepest ancestor that exists is resolved (symbolic links, `..`); the rest is
        // appended as plain names.
        let mut existing = abs.as_path();
        let mut rest = Vec::new();
        let resolved = loop {
            match existing.canonicalize() {
                Ok(p) => break p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let name = existing.file_name().ok_or_else(outside)?;
                    rest.push(name.to_owned());
                    existing = existing.parent().ok_or_else(outside)?;
                }
                Err(e) => return Err(ConfineError::Resolve(path.to_owned(), e)),
            }
        };
        // `file_name` is None for a trailing `..`, so the tail holds only plain names; a
        // `..` between them was refused above unless its parent existed (then resolved).
        let mut full = resolved;
        for name in rest.iter().rev() {
            if Path::new(name)
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
            {
                return Err(outside());
            }
            full.push(name);
        }
        if full.starts_with(&self.root) {
            Ok(full)
        } else {
            Err(outside())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-confine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("inst/snaps")).unwrap();
        std::fs::create_dir_all(d.join("other")).unwrap();
        d
    }

    #[test]
    fn paths_inside_pass_and_escapes_are_refused() {
        let d = scratch("paths");
        let c = Confine::new(&d.join("inst")).unwrap();
        let root = c.root().to_owned();
        // Inside, existing or not, and the directory itself.
        assert_eq!(c.check(&d.join("inst/snaps")).unwrap(), root.join("snaps"));
        assert_eq!(
            c.check(&d.join("inst/new/deeper")).unwrap(),
            root.join("new/deeper")
        );
        assert_eq!(c.check(&d.join("inst")).unwrap(), root);
        assert_eq!(c.check(&d.join("other/../inst/x")).unwrap(), root.join("x"));
        // Out: plainly, by `..` (existing or not), by a symbolic link, by a sibling prefix.
        for p in [
            d.join("other/snap"),
            d.join("inst/../other"),
            d.join("inst/snaps/../../other/x"),
            d.join("inst/missing/../../other"),
            PathBuf::from("/etc/cron.d/x"),
            d.join("inst2"),
        ] {
            let e = c.check(&p).unwrap_err();
            assert!(matches!(e, ConfineError::Outside { .. }), "{p:?}: {e}");
            assert!(e.to_string().contains("outside this VM's directory"), "{e}");
        }
        std::os::unix::fs::symlink(d.join("other"), d.join("inst/link")).unwrap();
        assert!(c.check(&d.join("inst/link/snap")).is_err());
        assert!(c.check(&d.join("inst/link")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_directory_must_exist() {
        let d = scratch("root");
        assert!(matches!(
            Confine::new(&d.join("nope")),
            Err(ConfineError::Root(..))
        ));
        std::fs::write(d.join("file"), b"").unwrap();
        assert!(Confine::new(&d.join("file")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
