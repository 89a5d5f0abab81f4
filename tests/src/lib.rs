//! Shared harness for the end-to-end tests: where the binaries under test are, and scratch
//! folders that clean up after themselves.

pub mod pve_double;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A binary of this workspace, as `cargo build --release` left it. `OMNI_IMAGE_TARGET_DIR`
/// (or `CARGO_TARGET_DIR`) points at another target folder.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("OMNI_IMAGE_TARGET_DIR")
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR"))
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let path = target.join("release").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        path.display()
    );
    path
}
