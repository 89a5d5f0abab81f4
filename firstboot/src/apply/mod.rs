//! The steps that make a clone a configured machine. Each is idempotent: running it again
//! with the same input gives the same files.

pub mod hostkeys;
pub mod hostname;
pub mod machine_id;
pub mod network;
pub mod users;
pub mod write_files;

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs a command with stdin closed; on failure the error carries the command line and the
/// tail of its stderr. Callers never pass secrets as arguments.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}").replace('"', "");
    tracing::debug!("+ {line}");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {line}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{line}` failed ({}): {}", out.status, tail.join(" / "));
    }
    Ok(())
}
