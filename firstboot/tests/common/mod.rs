//! Fixtures made the way the real producers make them: ISOs by genisoimage with Proxmox's
//! arguments, FAT images by mkfs.vfat and mcopy, and a small system tree to configure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes NoCloud files into a fresh directory.
pub fn seed_dir(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let seed = dir.join("seed");
    fs_err::create_dir_all(&seed).unwrap();
    for (name, content) in files {
        let path = seed.join(name);
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(path, content).unwrap();
    }
    seed
}

/// Proxmox's nocloud files, with `user-data` replaced when given.
pub fn proxmox_files(user_data: Option<&[u8]>) -> Vec<(&'static str, Vec<u8>)> {
    let dir = fixtures().join("proxmox");
    let read = |n: &str| fs_err::read(dir.join(n)).unwrap();
    let user = user_data
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| read("user-data"));
    let network = read("network-config");
    let meta = format!(
        "instance-id: {}\n",
        omni_firstboot::instance_id(&user, &network)
    );
    vec![
        ("user-data", user),
        ("meta-data", meta.into_bytes()),
        ("network-config", network),
        ("vendor-data", Vec::new()),
    ]
}

/// An ISO as Proxmox writes its cloud-init drive.
pub fn iso(dir: &Path, label: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let src = dir.join(format!("{label}-files"));
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    let src = seed_dir(&src, &refs);
    let out = dir.join(format!("{label}.iso"));
    run(Command::new("genisoimage")
        .args(["-quiet", "-iso-level", "3", "-J", "-R", "-V", label, "-o"])
        .arg(&out)
        .arg(&src));
    out
}

/// A FAT image labelled `label` holding `files` in its root.
pub fn vfat(dir: &Path, label: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let img = dir.join(format!("{label}.img"));
    run(Command::new("mkfs.vfat")
        .args(["-n", label, "-C"])
        .arg(&img)
        .arg("2048"));
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    let src = seed_dir(&dir.join("vfat-files"), &refs);
    for (name, _) in files {
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&img)
            .arg(src.join(name))
            .arg(format!("::{name}")));
    }
    img
}

/// A small Debian-like tree: accounts, login.defs, skel, sshd, a NIC and an SMBIOS uuid.
pub fn system_tree(dir: &Path, appliance: &str, machine_uuid: &str) -> PathBuf {
    let root = dir.join("root");
    let w = |p: &str, c: &str| {
        let path = root.join(p);
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(path, c).unwrap();
    };
    w("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n");
    w(
        "etc/group",
        "root:x:0:\nadm:x:4:\nsudo:x:27:\nshadow:x:42:\nusers:x:100:\n",
    );
    w("etc/shadow", "root:*:20000:0:99999:7:::\n");
    w(
        "etc/gshadow",
        "root:*::\nadm:*::\nsudo:*::\nshadow:*::\nusers:*::\n",
    );
    w(
        "etc/login.defs",
        "UID_MIN 1000\nUID_MAX 60000\nGID_MIN 1000\nGID_MAX 60000\n",
    );
    w("etc/skel/.profile", "# skel\n");
    w("etc/os-release", "ID=debian\nVERSION_ID=\"13\"\n");
    w("etc/machine-id", "");
    w(
        "etc/hosts",
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    );
    w(
        "etc/ssh/sshd_config",
        "Include /etc/ssh/sshd_config.d/*.conf\n",
    );
    w("etc/omni-image/appliance", &format!("{appliance}\n"));
    w("sys/class/net/ens18/address", "bc:24:11:5e:7a:01\n");
    w("sys/class/net/ens18/device/uevent", "");
    w("sys/class/net/lo/address", "00:00:00:00:00:00\n");
    w(
        "sys/class/dmi/id/product_uuid",
        &format!("{machine_uuid}\n"),
    );
    fs_err::create_dir_all(root.join("home")).unwrap();
    root
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
