//! Shared harness for the end-to-end tests: where the binaries under test are, and scratch
//! folders that clean up after themselves.

pub mod images;
pub mod pve_double;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A binary of this workspace, from the release build. The first call in a test process
/// brings `omni-image` and `omni-firstboot` up to date with `cargo build --release` (a no-op
/// when nothing changed), so `cargo test --release` alone tests the current sources.
/// `OMNI_IMAGE_TARGET_DIR` points at another, already built, target folder instead.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let prebuilt = std::env::var_os("OMNI_IMAGE_TARGET_DIR").map(PathBuf::from);
    let target = prebuilt
        .clone()
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| workspace().join("target"));
    if prebuilt.is_none() {
        BUILD.call_once(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "omni-image",
                    "-p",
                    "omni-firstboot",
                ])
                .current_dir(workspace())
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .expect("running cargo build");
            assert!(status.success(), "cargo build --release failed");
        });
    }
    let path = target.join("release").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        path.display()
    );
    path
}
