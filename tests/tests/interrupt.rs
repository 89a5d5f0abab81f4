//! Ctrl-C during a build: the build stops, says it was interrupted, and leaves nothing
//! behind in the output folder (no scratch tree, no partial image) and no mount.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use omni_image_tests::images::{built_image, heavy_lock};
use omni_image_tests::{bin, workspace};

/// Starts a build in its own process group, as a terminal would, and sends the group SIGINT
/// once a line containing `when` appears on stderr.
fn interrupt_build(extra: &[&str], when: &str) {
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("omni-image"))
        .args([
            "build",
            "recipes/tsidp.toml",
            "--output",
            out.path().to_str().unwrap(),
        ])
        .args(extra)
        .current_dir(workspace())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains(when) {
            std::thread::sleep(std::time::Duration::from_millis(300));
            unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
            break;
        }
    }
    seen.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert!(!status.success(), "the build was not stopped:\n{text}");
    assert!(text.contains("interrupted"), "{text}");
    let left: Vec<_> = fs_err::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind after Ctrl-C at `{when}`: {left:?}\n{text}"
    );
    let mounts = fs_err::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(out.path().to_str().unwrap()),
        "a mount was left behind"
    );
}

#[test]
fn ctrl_c_during_the_bootstrap_cleans_up() {
    let _lock = heavy_lock();
    interrupt_build(&["--no-cache"], "==> bootstrap");
}

#[test]
fn ctrl_c_while_writing_the_disk_cleans_up() {
    // From the base-tree cache the build reaches the disk step in seconds.
    built_image("recipes/tsidp.toml");
    let _lock = heavy_lock();
    interrupt_build(&[], "==> disk");
}
