//! Real images for the end-to-end tests: built once per content of the builder, the agent,
//! the recipes and the overlays, and shared by every test that boots one.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use crate::{bin, workspace};

/// Held while a test builds or boots: the machine has few cores, and two QEMU guests under
/// TCG at once would each take twice as long. Works across test binaries (flock).
pub struct HeavyLock(#[allow(dead_code)] File);

pub fn heavy_lock() -> HeavyLock {
    let dir = workspace().join("target");
    fs_err::create_dir_all(&dir).unwrap();
    let f = File::create(dir.join("e2e-heavy.lock")).unwrap();
    use std::os::fd::AsRawFd;
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "locking target/e2e-heavy.lock");
    HeavyLock(f)
}

/// Runs `omni-image ARGS`, echoing what it printed (cargo shows it for failing tests).
pub fn omni_image(args: &[&str]) -> Output {
    let out = Command::new(bin("omni-image"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("running omni-image");
    eprintln!("$ omni-image {}", args.join(" "));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    out
}

/// Runs a host tool and returns what it printed on stdout; fails the test, with its stderr,
/// when the tool fails.
pub fn host(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a host tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qcow2 image converted to `dir/disk.raw`, with its partition table as sfdisk reads it
/// (a tool that shares no code with the builder).
pub fn raw_disk(qcow2: &Path, dir: &Path) -> (PathBuf, serde_json::Value) {
    let raw = dir.join("disk.raw");
    host(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(qcow2)
            .arg(&raw),
    );
    let table = serde_json::from_str(&host(Command::new("sfdisk").arg("--json").arg(&raw)))
        .expect("sfdisk --json prints JSON");
    (raw, table)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[derive(Debug, Clone)]
pub struct Built {
    pub qcow2: PathBuf,
    pub manifest: serde_json::Value,
}

fn hash_path(h: &mut Sha256, path: &Path) {
    if path.is_dir() {
        let mut entries: Vec<_> = fs_err::read_dir(path)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            h.update(e.to_string_lossy().as_bytes());
            hash_path(h, &e);
        }
    } else if let Ok(mut f) = File::open(path) {
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        h.update(&buf);
    }
}

/// The image a recipe builds, built at most once for the current sources. Set
/// `OMNI_IMAGE_E2E_REBUILD=1` to build again regardless.
pub fn built_image(recipe: &str) -> Built {
    let _lock = heavy_lock();
    let mut h = Sha256::new();
    for p in [
        bin("omni-image"),
        bin("omni-firstboot"),
        workspace().join("recipes"),
        workspace().join("overlays"),
    ] {
        hash_path(&mut h, &p);
    }
    let key = &hex::encode(h.finalize())[..16];
    let dir = workspace().join("target/e2e-images").join(key);
    let name = Path::new(recipe)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let manifest = dir.join(format!("{name}.manifest.json"));
    if !manifest.exists() || std::env::var_os("OMNI_IMAGE_E2E_REBUILD").is_some() {
        let out = omni_image(&["build", recipe, "--output", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "building {recipe} failed:\n{}",
            stderr(&out)
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs_err::read(&manifest).unwrap()).unwrap();
    Built {
        qcow2: dir.join(format!("{name}.qcow2")),
        manifest,
    }
}
