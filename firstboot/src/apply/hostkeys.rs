//! SSH host keys, generated afresh for a new machine with `ssh-keygen` (no passphrase, so no
//! secret in its arguments), all key types at once.

use std::process::Command;

use anyhow::{Context, Result};

use crate::fsutil::{self, Root};

/// The key types made unless `ssh_genkeytypes` says otherwise. RSA is left out by default:
/// generating it takes about a second, longer than everything else together; every current
/// SSH client speaks Ed25519 or ECDSA.
pub const DEFAULT_TYPES: &[&str] = &["ed25519", "ecdsa"];

fn key_path(root: &Root, ty: &str) -> std::path::PathBuf {
    root.join(format!("/etc/ssh/ssh_host_{ty}_key"))
}

/// Whether every host key of `types` exists.
pub fn present(root: &Root, types: &[String]) -> bool {
    types.iter().all(|t| key_path(root, t).exists())
}

/// Replaces the host keys of `types` (and removes other types' keys); returns the
/// fingerprints printed by ssh-keygen, for the console.
pub fn regenerate(root: &Root, types: &[String], comment: &str) -> Result<Vec<String>> {
    let dir = root.join("/etc/ssh");
    fs_err::create_dir_all(&dir)?;
    for entry in fs_err::read_dir(&dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("ssh_host_") && (name.ends_with("_key") || name.ends_with("_key.pub")) {
            fsutil::remove_if_exists(&dir.join(&name))?;
        }
    }
    // The key types are generated in parallel: RSA takes the longest.
    let mut children = Vec::new();
    for ty in types {
        let path = key_path(root, ty);
        let child = Command::new("ssh-keygen")
            .args(["-q", "-t", ty, "-N", "", "-C", comment, "-f"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running ssh-keygen")?;
        children.push((ty, child));
    }
    let mut failed = Vec::new();
    for (ty, child) in children {
        let out = child.wait_with_output().context("waiting for ssh-keygen")?;
        if !out.status.success() {
            failed.push(format!(
                "{ty}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("ssh-keygen failed for {}", failed.join("; "));
    }
    let mut fingerprints = Vec::new();
    for ty in types {
        let out = Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(key_path(root, ty).with_extension("pub"))
            .output()
            .context("running ssh-keygen -l")?;
        fingerprints.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    Ok(fingerprints)
}
