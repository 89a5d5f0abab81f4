//! Builds the shipped appliances from the real Debian archive and boots them in QEMU.
//! Slow: each build takes one to two minutes and each boot about a minute under TCG.

use std::path::Path;
use std::process::Command;

use omni_image_tests::images::{
    built_image, heavy_lock, host, omni_image, raw_disk, stderr, stdout,
};

/// Checks the disk with tools that share no code with the builder: qemu-img, sfdisk,
/// mtools and e2fsck.
fn check_disk(qcow2: &Path) {
    host(Command::new("qemu-img").arg("check").arg(qcow2));
    let tmp = tempfile::tempdir().unwrap();
    let (raw, table) = raw_disk(qcow2, tmp.path());
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(table["partitiontable"]["label"], "gpt");
    assert_eq!(parts.len(), 2, "{table}");
    assert_eq!(parts[0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!(parts[1]["type"], "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
    let esp_offset = parts[0]["start"].as_u64().unwrap() * 512;
    let image = format!("{}@@{esp_offset}", raw.display());

    let listing = host(Command::new("mdir").args(["-i", &image, "-b", "::/EFI/BOOT"]));
    assert!(listing.to_uppercase().contains("BOOTX64.EFI"), "{listing}");
    let entries = host(Command::new("mdir").args(["-i", &image, "-b", "::/loader/entries"]));
    assert!(entries.contains(".conf"), "{entries}");

    // The root filesystem, cut out of the disk, is clean ext4.
    let root = tmp.path().join("root.img");
    let (start, size) = (
        parts[1]["start"].as_u64().unwrap(),
        parts[1]["size"].as_u64().unwrap(),
    );
    host(
        Command::new("dd")
            .arg(format!("if={}", raw.display()))
            .arg(format!("of={}", root.display()))
            .args([
                "bs=512",
                &format!("skip={start}"),
                &format!("count={size}"),
                "conv=sparse",
                "status=none",
            ]),
    );
    host(Command::new("e2fsck").args(["-fn"]).arg(&root));
}

#[test]
fn tsidp_builds_boots_and_rebuilds_from_the_cache() {
    let built = built_image("recipes/tsidp.toml");
    check_disk(&built.qcow2);
    let sha_file = built.qcow2.with_extension("qcow2.sha256");
    let sums = fs_err::read_to_string(&sha_file).unwrap();
    assert!(sums.ends_with("  tsidp.qcow2\n"), "{sums}");
    assert_eq!(
        built.manifest["outputs"][0]["sha256"].as_str().unwrap(),
        &sums[..64]
    );
    let pkgs = built.manifest["packages"].as_array().unwrap();
    assert!(pkgs.iter().any(|p| p["name"] == "systemd"));
    assert!(pkgs.iter().any(|p| p["name"] == "linux-image-cloud-amd64"));

    let _lock = heavy_lock();
    let out = omni_image(&[
        "boot",
        built.qcow2.to_str().unwrap(),
        "--timeout",
        "420",
        "--exec",
        "systemctl is-enabled omni-firstboot.service",
        "--exec",
        "cat /etc/omni-image/appliance; systemctl is-active serial-getty@ttyS0.service; cat /proc/cmdline",
        "--exec",
        "findmnt -no FSTYPE /boot/efi",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "boot failed:\n{}", stderr(&out));
    assert!(text.contains("ready in"), "{text}");
    assert!(text.contains("enabled"), "{text}");
    assert!(text.contains("tsidp"), "{text}");
    assert!(text.contains("vfat"), "{text}");
    assert!(text.contains("console=ttyS0"), "{text}");

    // Bootstrapping the unchanged recipe again (bypassing the base-tree cache) finds every
    // package in the package cache.
    let again = tempfile::tempdir().unwrap();
    let out = omni_image(&[
        "build",
        "recipes/tsidp.toml",
        "--no-cache",
        "--output",
        again.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m: serde_json::Value =
        serde_json::from_slice(&fs_err::read(again.path().join("tsidp.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["base_tree"]["cache_hit"], false);
    assert_eq!(
        m["downloaded_packages"], 0,
        "the bootstrap downloaded packages again"
    );
    assert!(m["cached_packages"].as_u64().unwrap() > 100);
}

#[test]
fn omni_builds_and_boots_with_docker_and_compose() {
    let built = built_image("recipes/omni.toml");
    check_disk(&built.qcow2);
    let _lock = heavy_lock();
    let out = omni_image(&[
        "boot",
        built.qcow2.to_str().unwrap(),
        "--memory",
        "2048",
        "--timeout",
        "480",
        "--exec",
        "docker --version",
        "--exec",
        "docker compose version",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "boot failed:\n{}", stderr(&out));
    assert!(text.contains("Docker version"), "{text}");
    assert!(text.contains("Docker Compose version"), "{text}");
}

#[test]
fn a_disk_too_small_says_how_large_it_must_be_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("tiny.toml");
    let base = omni_image_tests::workspace().join("recipes/base.toml");
    fs_err::write(
        &recipe,
        format!(
            "extends = \"{}\"\nname = \"tiny\"\n[disk]\nsize = \"320M\"\nesp-size = \"64M\"\n",
            base.display()
        ),
    )
    .unwrap();
    let out_dir = tmp.path().join("out");
    let _lock = heavy_lock();
    let out = omni_image(&[
        "build",
        recipe.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("set disk.size to at least"), "{err}");
    // The output folder did not exist before the build: it is gone again, scratch tree and
    // all.
    assert!(!out_dir.exists(), "left behind: {out_dir:?}");
}

/// A tmpfs of `size` mounted on a fresh folder, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test mounts a small tmpfs to fill up: run it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs on {}", dir.path().display());
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_host_disk_filling_up_is_named_and_leaves_nothing() {
    // The base tree comes from the cache; the output folder fills up either while the tree is
    // unpacked (too small for the tree) or while the disk image is written (room for the
    // tree, not for the tree and the image together).
    built_image("recipes/tsidp.toml");
    let recipe = omni_image_tests::workspace().join("recipes/tsidp.toml");
    let _lock = heavy_lock();
    for size in ["150M", "500M"] {
        let disk = SmallDisk::new(size);
        let out = omni_image(&[
            "build",
            recipe.to_str().unwrap(),
            "--output",
            disk.0.path().to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "a build fit in {size}");
        let err = stderr(&out);
        assert!(
            err.contains("the disk filled up during the build") && err.contains("--work-dir"),
            "{size}: {err}"
        );
        assert!(!err.contains("set disk.size"), "{size}: {err}");
        let left: Vec<_> = fs_err::read_dir(disk.0.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{size}: left behind: {left:?}");
    }
}
