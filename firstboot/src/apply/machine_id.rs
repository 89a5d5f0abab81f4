//! A machine id of its own for every clone.
//!
//! systemd makes a fresh id at boot when `/etc/machine-id` is empty or `uninitialized` (as the
//! image ships it), and writes it into the file, or mounts it over the file until it can be
//! committed: that id is kept. An id
//! that was already in the file when a machine first meets this agent came from elsewhere (a
//! clone of a booted VM) and is replaced, before systemd-networkd derives DHCP identifiers
//! from it.

use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};

use crate::fsutil::{self, Root};

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Kept(String),
    Written(String),
}

pub fn read(root: &Root) -> Option<String> {
    let text = std::fs::read_to_string(root.join("/etc/machine-id")).ok()?;
    let id = text.trim();
    (id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// Whether `/etc/machine-id` is systemd's transient mount (a fresh id of this boot).
fn is_transient(root: &Root) -> bool {
    let (Ok(file), Ok(dir)) = (
        std::fs::metadata(root.join("/etc/machine-id")),
        std::fs::metadata(root.join("/etc")),
    ) else {
        return false;
    };
    file.dev() != dir.dev()
}

/// Whether `/etc/machine-id` was written during this boot: systemd fills an empty file
/// itself when the root is already writable (the image's kernel command line has `rw`), and
/// journald files its logs under that id, so it must be kept.
fn written_this_boot(root: &Root) -> bool {
    if !root.is_live() {
        return false;
    }
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<i64>().ok())
    });
    let mtime = std::fs::metadata(root.join("/etc/machine-id"))
        .ok()
        .map(|m| m.mtime());
    matches!((btime, mtime), (Some(b), Some(m)) if m >= b - 1)
}

/// `new_machine` is true when this agent has not seen this machine before.
pub fn apply(root: &Root, new_machine: bool) -> Result<Outcome> {
    if let Some(id) = read(root)
        && (!new_machine || is_transient(root) || written_this_boot(root))
    {
        return Ok(Outcome::Kept(id));
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let path = root.join("/etc/machine-id");
    if is_transient(root) {
        // Cannot happen without an id in it; but never write through systemd's mount.
        return Ok(Outcome::Kept(read(root).unwrap_or_default()));
    }
    fsutil::write_atomic(&path, format!("{id}\n").as_bytes(), 0o444, None)
        .context("writing /etc/machine-id")?;
    Ok(Outcome::Written(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_id_is_filled_and_a_known_machine_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        fs_err::create_dir_all(root.join("/etc")).unwrap();
        fs_err::write(root.join("/etc/machine-id"), "uninitialized\n").unwrap();
        let Outcome::Written(id) = apply(&root, false).unwrap() else {
            panic!()
        };
        assert_eq!(read(&root).as_deref(), Some(id.as_str()));
        assert_eq!(apply(&root, false).unwrap(), Outcome::Kept(id.clone()));
        // The same id found on a machine never seen before is a copy: it is replaced.
        let Outcome::Written(new) = apply(&root, true).unwrap() else {
            panic!()
        };
        assert_ne!(new, id);
    }
}
