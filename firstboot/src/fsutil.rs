//! File writes that survive power loss and never expose a secret: every file is written to a
//! temporary name in its final directory with its final mode, synced, then renamed.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The tree the agent configures: `/` on a booted machine, any directory in tests.
#[derive(Debug, Clone)]
pub struct Root {
    path: PathBuf,
}

impl Root {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Root { path: path.into() }
    }

    /// Whether this is the running system (so the kernel hostname and live services apply).
    pub fn is_live(&self) -> bool {
        self.path == Path::new("/")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps an absolute path inside the target system to a path on this machine.
    pub fn join(&self, abs: impl AsRef<Path>) -> PathBuf {
        let rel = abs.as_ref().strip_prefix("/").unwrap_or(abs.as_ref());
        self.path.join(rel)
    }
}

/// Ownership for a written file, as numeric ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };
}

/// Writes `contents` to `path` atomically with `mode` (and `owner` when given).
///
/// The temporary file is created with the final mode (never wider), so a secret is at no
/// moment readable by anyone else; missing parent directories are created 0755.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Option<Owner>) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("writing {}: no parent", path.display()))?;
    fs_err::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.omni-firstboot.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o700)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        file.write_all(contents)?;
        if let Some(owner) = owner {
            std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err.context(format!("writing {}", tmp.display())));
    }
    drop(file);
    fs_err::rename(&tmp, path)?;
    sync_dir(dir);
    Ok(())
}

/// Creates `path` (and its parents) and sets its mode and owner.
pub fn ensure_dir(path: &Path, mode: u32, owner: Option<Owner>) -> Result<()> {
    fs_err::create_dir_all(path)?;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(owner) = owner {
        std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
            .with_context(|| format!("changing owner of {}", path.display()))?;
    }
    Ok(())
}

/// Removes a file if it exists.
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                sync_dir(dir);
            }
            Ok(true)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

/// Reads a file, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

fn sync_dir(dir: &Path) {
    // A failed directory sync only weakens durability; the data itself is already synced.
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// Checks that a path from user input is absolute and stays inside `/` (no `..`).
pub fn check_target_path(path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        bail!("the path is empty");
    }
    if path.contains('\0') {
        bail!("the path contains a NUL byte");
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        bail!("`{path}` is a relative path; give an absolute one such as `/etc/example`");
    }
    for component in p.components() {
        match component {
            Component::ParentDir => bail!("`{path}` leaves `/` through `..`"),
            Component::RootDir | Component::CurDir | Component::Normal(_) => {}
            Component::Prefix(_) => bail!("`{path}` is not a Unix path"),
        }
    }
    if p.file_name().is_none() {
        bail!("`{path}` names a directory, not a file");
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/default/secret");
        write_atomic(&path, b"KEY=1\n", 0o600, None).unwrap();
        assert_eq!(fs_err::read_to_string(&path).unwrap(), "KEY=1\n");
        assert_eq!(fs_err::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        write_atomic(&path, b"KEY=2\n", 0o640, None).unwrap();
        assert_eq!(fs_err::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        let names: Vec<_> = fs_err::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    }

    #[test]
    fn target_paths_must_be_absolute_and_stay_inside_root() {
        assert!(check_target_path("/etc/motd").is_ok());
        assert!(
            check_target_path("etc/motd")
                .unwrap_err()
                .to_string()
                .contains("relative")
        );
        assert!(
            check_target_path("/etc/../../x")
                .unwrap_err()
                .to_string()
                .contains("..")
        );
        assert!(check_target_path("").is_err());
        assert!(check_target_path("/").is_err());
    }

    #[test]
    fn root_join_maps_absolute_paths_inside_the_tree() {
        let root = Root::new("/tmp/tree");
        assert_eq!(
            root.join("/etc/hostname"),
            PathBuf::from("/tmp/tree/etc/hostname")
        );
        assert!(!root.is_live());
        assert!(Root::new("/").is_live());
    }
}
