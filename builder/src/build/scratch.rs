//! Temporary trees and files that remove themselves: on success once their contents have
//! been published, on an error or Ctrl-C on the way out.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A scratch folder for one build. Before removing it, anything still mounted below it (a
/// bootstrap that was killed can leave `/proc` or `/dev` mounts behind) is unmounted, so
/// removal never reaches outside the tree.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    pub fn create_in(parent: &Path, prefix: &str) -> Result<Scratch> {
        fs_err::create_dir_all(parent)?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .with_context(|| format!("creating a scratch folder in {}", parent.display()))?;
        Ok(Scratch {
            path: dir.keep(),
            keep: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the folder in place (for `--keep-work` debugging).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept work folder {}", self.path.display());
            if crate::userns::inside() {
                eprintln!(
                    "  its files belong to your subordinate ids; remove it with: {}",
                    crate::userns::removal_hint(&self.path)
                );
            }
            return;
        }
        let mounts = mounts_below(&self.path);
        for m in mounts.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
        if !mounts_below(&self.path).is_empty() {
            eprintln!(
                "warning: left {} in place: something is still mounted inside it",
                self.path.display()
            );
            return;
        }
        if let Err(err) = std::fs::remove_dir_all(&self.path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: could not remove {}: {err}", self.path.display());
        }
    }
}

/// Mount points at or below `dir`, outermost first, from `/proc/self/mountinfo`.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect()
}

/// A file being written under a temporary name next to its final one; `commit` renames it,
/// dropping it uncommitted removes it.
#[derive(Debug)]
pub struct Pending {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Pending {
    pub fn new(dest: PathBuf) -> Pending {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.partial"));
        Pending {
            tmp,
            dest,
            done: false,
        }
    }

    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        fs_err::rename(&self.tmp, &self.dest)?;
        self.done = true;
        Ok(self.dest.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_is_removed_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let path = {
            let s = Scratch::create_in(parent.path(), ".t-").unwrap();
            std::fs::write(s.path().join("f"), b"x").unwrap();
            s.path().to_path_buf()
        };
        assert!(!path.exists());
    }

    #[test]
    fn pending_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.qcow2");
        let p = Pending::new(dest.clone());
        std::fs::write(p.tmp(), b"x").unwrap();
        assert!(!dest.exists());
        p.commit().unwrap();
        assert!(dest.exists());

        let dest2 = dir.path().join("b.qcow2");
        let p = Pending::new(dest2.clone());
        std::fs::write(p.tmp(), b"x").unwrap();
        let tmp = p.tmp().to_path_buf();
        drop(p);
        assert!(!tmp.exists() && !dest2.exists());
    }
}
