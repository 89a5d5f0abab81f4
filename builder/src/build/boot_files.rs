//! What goes on the ESP: systemd-boot as the removable-media loader, one loader entry, and
//! the kernel and initrd from the tree. A kernel hook in the image copies newer kernels
//! there after an upgrade (see the base overlay).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::disk::esp::Contents;

pub const SYSTEMD_BOOT: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// The newest kernel in the tree's `/boot`, with its initrd.
pub fn kernel(tree: &Path) -> Result<(String, PathBuf, PathBuf)> {
    let boot = tree.join("boot");
    let mut versions: Vec<String> = fs_err::read_dir(&boot)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    let Some(version) = versions.pop() else {
        bail!(
            "no kernel in {}: the recipe must install one (kernel.package)",
            boot.display()
        );
    };
    let vmlinuz = boot.join(format!("vmlinuz-{version}"));
    let initrd = boot.join(format!("initrd.img-{version}"));
    if !initrd.is_file() {
        bail!(
            "{} has no initrd ({} is missing): is initramfs-tools installed?",
            vmlinuz.display(),
            initrd.display()
        );
    }
    Ok((version, vmlinuz, initrd))
}

/// Orders kernel versions by their numeric parts (6.12.10 after 6.12.9).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    parts(a).cmp(&parts(b)).then_with(|| a.cmp(b))
}

pub fn contents(tree: &Path, name: &str, title: &str, cmdline: &str) -> Result<Contents> {
    let loader = tree.join(SYSTEMD_BOOT);
    if !loader.is_file() {
        bail!(
            "{} is missing: the image needs the systemd-boot-efi package",
            loader.display()
        );
    }
    let (version, vmlinuz, initrd) = kernel(tree).context("finding the kernel")?;
    let mut c = Contents::default();
    c.add_file("EFI/BOOT/BOOTX64.EFI", &loader);
    c.add_file("EFI/systemd/systemd-bootx64.efi", &loader);
    c.add_bytes(
        "loader/loader.conf",
        format!("default {name}.conf\ntimeout 0\neditor no\n"),
    );
    c.add_bytes(
        &format!("loader/entries/{name}.conf"),
        format!(
            "title {title}\nversion {version}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n"
        ),
    );
    c.add_file("vmlinuz", &vmlinuz);
    c.add_file("initrd.img", &initrd);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_wins() {
        let t = tempfile::tempdir().unwrap();
        let boot = t.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        for v in ["6.12.9-cloud-amd64", "6.12.10-cloud-amd64"] {
            std::fs::write(boot.join(format!("vmlinuz-{v}")), "k").unwrap();
            std::fs::write(boot.join(format!("initrd.img-{v}")), "i").unwrap();
        }
        assert_eq!(kernel(t.path()).unwrap().0, "6.12.10-cloud-amd64");
    }

    #[test]
    fn missing_initrd_is_explained() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("boot")).unwrap();
        std::fs::write(t.path().join("boot/vmlinuz-6.1"), "k").unwrap();
        let err = format!("{:#}", kernel(t.path()).unwrap_err());
        assert!(err.contains("initramfs-tools"), "{err}");
    }
}
