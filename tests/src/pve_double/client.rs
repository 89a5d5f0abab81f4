//! Helpers for tests that run `omni-image upload`/`deploy` against a double.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::{PveDouble, TOKEN_ID, TOKEN_SECRET};

/// `omni-image SUB` pointed at the double with a pinned fingerprint and the test token, in an
/// environment without a profile file.
pub fn omni(double: &PveDouble, sub: &str) -> Command {
    omni_with(double, sub, &[])
}

/// Like [`omni`], with some of its connection flags replaced (`("--url", "...")`).
pub fn omni_with(double: &PveDouble, sub: &str, overrides: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(crate::bin("omni-image"));
    cmd.arg(sub);
    let defaults = [
        ("--url", double.url.as_str()),
        ("--token-id", TOKEN_ID),
        ("--fingerprint", double.fingerprint.as_str()),
        ("--node", "pve"),
        ("--storage", "local"),
    ];
    for (flag, value) in defaults {
        let value = overrides
            .iter()
            .find(|(f, _)| *f == flag)
            .map(|(_, v)| *v)
            .unwrap_or(value);
        cmd.args([flag, value]);
    }
    for (flag, value) in overrides {
        if !defaults.iter().any(|(f, _)| f == flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.env("PROXMOX_TOKEN_SECRET", TOKEN_SECRET)
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("PROXMOX_PASSWORD");
    cmd
}

/// A finished command's output, decoded.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("running omni-image");
    let run = Run {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    eprintln!("--- {cmd:?}\n{}{}", run.stdout, run.stderr);
    run
}

/// Writes `NAME.qcow2` (virtual size `mib`, with `data` written at its start so images
/// differ), its `.sha256` and a manifest, as `omni-image build` leaves them.
pub fn make_image(dir: &Path, name: &str, mib: u32, data: &str) -> PathBuf {
    let path = dir.join(format!("{name}.qcow2"));
    let raw = dir.join(format!("{name}.raw"));
    let mut bytes = data.as_bytes().to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&raw).unwrap();
    let st = Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&path)
        .arg(format!("{mib}M"))
        .status()
        .unwrap();
    assert!(st.success());
    write_sidecars(&path, name);
    path
}

pub fn write_sidecars(path: &Path, name: &str) {
    let sum = sha256_of(path);
    let file = path.file_name().unwrap().to_string_lossy().to_string();
    std::fs::write(
        path.with_file_name(format!("{file}.sha256")),
        format!("{sum}  {file}\n"),
    )
    .unwrap();
    let manifest = serde_json::json!({
        "name": name,
        "recipe": {"name": name, "base": {"distribution": "debian", "suite": "trixie"},
                   "vm": {"memory": 1536, "cores": 2, "tags": ["appliance"]}},
        "packages": [{"name": "systemd", "version": "257"}],
        "sizes": {"disk_bytes": 2147483648u64},
    });
    std::fs::write(
        path.with_file_name(format!("{name}.manifest.json")),
        manifest.to_string(),
    )
    .unwrap();
}

pub fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    // Streamed: a benchmark measures its children's peak memory, which includes ours.
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}

/// The `data` of a GET to the double, with the test token.
pub fn api_get(double: &PveDouble, path: &str) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&double.ca_file)
        .args([
            "-H",
            &format!("Authorization: PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}"),
        ])
        .arg(format!("{}{path}", double.url))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["data"].clone()
}
