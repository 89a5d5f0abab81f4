//! The cache folder: downloaded packages (`apt/`), fetched artifacts (`artifacts/`), and
//! bootstrapped base trees (`base/`), each keyed by content.
//!
//! A base tree entry is a tar archive of the tree as mmdebstrap left it (owners, modes and
//! extended attributes kept) and a `.sha256` file beside it, written last: an entry without
//! one, or whose archive does not match it, is incomplete or damaged and is never used.
//! Entries are published by rename under a per-key lock, so concurrent builds share them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::exec::Cmd;

pub mod cli;

/// Bumped when the layout of a base tree entry, or what goes into its key, changes.
const FORMAT: &str = "base-tree-v2";

pub struct BaseCache {
    dir: PathBuf,
}

/// Holds the lock of one key until dropped.
pub struct KeyLock(#[allow(dead_code)] File);

#[derive(Debug, Serialize)]
pub struct Entry {
    pub key: String,
    pub bytes: u64,
    pub complete: bool,
    pub modified: Option<SystemTime>,
    /// What the entry was made from, as recorded when it was stored.
    pub label: String,
}

/// The inputs that decide a base tree; its key is their hash.
pub fn key(inputs: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    for (name, value) in inputs {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    }
    hex::encode(h.finalize())
}

impl BaseCache {
    pub fn new(cache_root: &Path) -> BaseCache {
        BaseCache {
            dir: cache_root.join("base"),
        }
    }

    fn tar(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.tar"))
    }
    fn sum(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.tar.sha256"))
    }
    fn label_file(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.label"))
    }

    /// Waits for, then holds, the lock of `key`: one build bootstraps a given base while the
    /// others wait and then use its entry.
    pub fn lock(&self, key: &str) -> Result<KeyLock> {
        fs_err::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{key}.lock"));
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(KeyLock(f))
    }

    pub fn contains(&self, key: &str) -> bool {
        self.sum(key).is_file() && self.tar(key).is_file()
    }

    /// Unpacks the entry of `key` into `tree` (which must not exist) after checking it.
    /// Returns `Ok(false)` for a miss; a damaged entry is reported, removed and missed.
    pub fn restore(&self, key: &str, tree: &Path) -> Result<bool> {
        if !self.contains(key) {
            if self.tar(key).exists() {
                tracing::warn!(
                    "base cache entry {} is incomplete; bootstrapping again",
                    short(key)
                );
                self.remove(key);
            }
            return Ok(false);
        }
        let want = fs_err::read_to_string(self.sum(key))?;
        let (have, _) = crate::build::sha256_file(&self.tar(key))?;
        if want.split_whitespace().next() != Some(have.as_str()) {
            tracing::warn!(
                "base cache entry {} is damaged (its archive does not match its checksum); \
                 removing it and bootstrapping again",
                short(key)
            );
            self.remove(key);
            return Ok(false);
        }
        fs_err::create_dir_all(tree)?;
        Cmd::new("tar")
            .args([
                "--extract",
                "--numeric-owner",
                "--same-permissions",
                "--xattrs",
                "--xattrs-include=*",
                "-C",
            ])
            .arg(tree)
            .arg("-f")
            .arg(self.tar(key))
            .output()
            .context("unpacking the cached base tree")?;
        // Touch the entry so `cache prune` keeps what is in use.
        let _ = File::options()
            .append(true)
            .open(self.sum(key))
            .and_then(|f| f.set_modified(SystemTime::now()));
        Ok(true)
    }

    /// Stores `tree` as the entry of `key` (the caller holds its lock).
    pub fn store(&self, key: &str, tree: &Path, label: &str) -> Result<()> {
        fs_err::create_dir_all(&self.dir)?;
        let partial = self.dir.join(format!(".{key}.tar.partial"));
        let result = (|| -> Result<()> {
            Cmd::new("tar")
                .args([
                    "--create",
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--sort=name",
                    "-C",
                ])
                .arg(tree)
                .arg("-f")
                .arg(&partial)
                .arg(".")
                .output()
                .context("archiving the base tree")?;
            let (sha, _) = crate::build::sha256_file(&partial)?;
            fs_err::rename(&partial, self.tar(key))?;
            fs_err::write(self.label_file(key), format!("{label}\n"))?;
            // Written last: its presence marks the entry complete.
            let sum_partial = self.dir.join(format!(".{key}.sha256.partial"));
            fs_err::write(&sum_partial, format!("{sha}  {key}.tar\n"))?;
            fs_err::rename(&sum_partial, self.sum(key))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    pub fn remove(&self, key: &str) {
        for p in [self.sum(key), self.tar(key), self.label_file(key)] {
            let _ = std::fs::remove_file(p);
        }
    }

    pub fn list(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let Ok(dir) = fs_err::read_dir(&self.dir) else {
            return Ok(out);
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".tar") else {
                continue;
            };
            if key.starts_with('.') {
                continue;
            }
            let meta = e.metadata()?;
            out.push(Entry {
                key: key.to_owned(),
                bytes: meta.len(),
                complete: self.sum(key).is_file(),
                modified: fs_err::metadata(self.sum(key))
                    .ok()
                    .and_then(|m| m.modified().ok()),
                label: fs_err::read_to_string(self.label_file(key))
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.modified));
        Ok(out)
    }
}

pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) -> PathBuf {
        let t = dir.join("tree");
        fs_err::create_dir_all(t.join("etc")).unwrap();
        fs_err::write(t.join("etc/os-release"), "ID=debian\n").unwrap();
        std::os::unix::fs::symlink("os-release", t.join("etc/link")).unwrap();
        t
    }

    #[test]
    fn keys_change_with_any_input() {
        let a = key(&[("base", b"trixie"), ("packages", b"systemd")]);
        assert_eq!(a, key(&[("base", b"trixie"), ("packages", b"systemd")]));
        assert_ne!(a, key(&[("base", b"trixie"), ("packages", b"systemd,vim")]));
        assert_ne!(a, key(&[("base", b"trixiepackages"), ("", b"systemd")]));
    }

    #[test]
    fn stored_tree_restores_and_damage_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BaseCache::new(tmp.path());
        let src = tree(tmp.path());
        let k = key(&[("t", b"1")]);
        assert!(!cache.restore(&k, &tmp.path().join("miss")).unwrap());
        {
            let _lock = cache.lock(&k).unwrap();
            cache.store(&k, &src, "debian trixie").unwrap();
        }
        let out = tmp.path().join("out");
        assert!(cache.restore(&k, &out).unwrap());
        assert_eq!(
            fs_err::read_to_string(out.join("etc/os-release")).unwrap(),
            "ID=debian\n"
        );
        assert_eq!(
            fs_err::read_link(out.join("etc/link")).unwrap(),
            Path::new("os-release")
        );
        assert_eq!(cache.list().unwrap()[0].label, "debian trixie");

        // Flip one byte of the archive: the next restore refuses it and drops the entry.
        let tar = cache.tar(&k);
        let mut bytes = fs_err::read(&tar).unwrap();
        bytes[600] ^= 0xff;
        fs_err::write(&tar, bytes).unwrap();
        assert!(!cache.restore(&k, &tmp.path().join("out2")).unwrap());
        assert!(!cache.contains(&k));
        assert!(!tmp.path().join("out2").exists());
    }

    #[test]
    fn an_entry_without_its_checksum_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BaseCache::new(tmp.path());
        let k = key(&[("t", b"2")]);
        fs_err::create_dir_all(&cache.dir).unwrap();
        fs_err::write(cache.tar(&k), b"half an archive").unwrap();
        assert!(!cache.restore(&k, &tmp.path().join("x")).unwrap());
        assert!(!cache.tar(&k).exists());
    }
}
