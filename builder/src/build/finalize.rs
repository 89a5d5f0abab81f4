//! Step 4: make the tree clone-ready. Everything that must differ between two machines made
//! from one template is removed here and created again on each clone's first boot; what
//! the disk layout decides (UUIDs, the console, growing the root) is written in.

use std::path::Path;

use anyhow::{Context, Result};

use crate::disk::Layout;
use crate::recipe::Recipe;

/// Serial console last, so that `/dev/console` (and systemd's status output) is `ttyS0`,
/// which is what Proxmox's `serial0` shows.
pub const CONSOLE_ARGS: &[&str] = &["console=tty0", "console=ttyS0,115200"];

pub fn kernel_cmdline(recipe: &Recipe, layout: &Layout) -> String {
    let mut words = vec![
        format!("root=UUID={}", layout.ids.root_fs_uuid),
        "rw".to_owned(),
    ];
    words.extend(CONSOLE_ARGS.iter().map(|s| s.to_string()));
    words.extend(recipe.kernel.cmdline.iter().cloned());
    words.join(" ")
}

pub fn run(tree: &Path, recipe: &Recipe, layout: &Layout) -> Result<()> {
    let path = |p: &str| tree.join(p);

    // Identity: an empty machine-id makes systemd create one at the first boot and run the
    // units that are conditioned on it (ConditionFirstBoot).
    write(tree, "etc/machine-id", "")?;
    remove(&path("var/lib/dbus/machine-id"))?;
    for entry in fs_err::read_dir(path("etc/ssh"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("ssh_host_") {
            fs_err::remove_file(entry.path())?;
        }
    }

    // Nothing of the build host.
    write(tree, "etc/hostname", &format!("{}\n", recipe.name))?;
    write(
        tree,
        "etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
            recipe.name
        ),
    )?;
    remove(&path("etc/resolv.conf"))?;
    if path("usr/lib/systemd/systemd-resolved").exists() {
        std::os::unix::fs::symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            path("etc/resolv.conf"),
        )
        .context("linking /etc/resolv.conf to systemd-resolved")?;
    } else {
        write(tree, "etc/resolv.conf", "")?;
    }

    // No package lists, caches or logs.
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/log",
        "tmp",
        "var/tmp",
    ] {
        empty_files_below(
            &path(dir),
            dir == "var/lib/apt/lists" || dir == "tmp" || dir == "var/tmp",
        )?;
    }
    for old in [
        "var/lib/dpkg/status-old",
        "var/lib/dpkg/diversions-old",
        "var/cache/debconf/config.dat-old",
        "var/cache/debconf/templates.dat-old",
        "etc/passwd-",
        "etc/group-",
        "etc/shadow-",
        "etc/gshadow-",
        "etc/subuid-",
        "etc/subgid-",
    ] {
        remove(&path(old))?;
    }

    // Filesystems by UUID; the root grows to fill a disk that was made larger after cloning
    // (systemd-repart grows the partition, x-systemd.growfs the filesystem).
    write(
        tree,
        "etc/fstab",
        &format!(
            "# <file system> <mount point> <type> <options> <dump> <pass>\n\
             UUID={} / ext4 defaults,x-systemd.growfs 0 1\n\
             UUID={} /boot/efi vfat umask=0077,nofail 0 2\n",
            layout.ids.root_fs_uuid,
            layout.ids.esp_uuid()
        ),
    )?;
    fs_err::create_dir_all(path("boot/efi"))?;
    write(
        tree,
        "usr/lib/repart.d/50-root.conf",
        "[Partition]\nType=root\n",
    )?;

    // The kernel command line, also for tools that read it from the tree.
    write(
        tree,
        "etc/kernel/cmdline",
        &format!("{}\n", kernel_cmdline(recipe, layout)),
    )?;
    Ok(())
}

/// Sets every time in the tree that is later than `epoch` to `epoch` (links included), so
/// what this build wrote carries no trace of when it ran.
pub fn clamp_times(tree: &Path, epoch: i64) -> Result<usize> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut clamped = 0;
    let ts = libc::timespec {
        tv_sec: epoch as libc::time_t,
        tv_nsec: 0,
    };
    for entry in walkdir::WalkDir::new(tree) {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        if meta.mtime() <= epoch && meta.atime() <= epoch {
            continue;
        }
        let path = std::ffi::CString::new(entry.path().as_os_str().as_bytes())?;
        let times = [ts, ts];
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                path.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setting the time of {}", entry.path().display()));
        }
        clamped += 1;
    }
    Ok(clamped)
}

fn write(tree: &Path, rel: &str, content: &str) -> Result<()> {
    let dest = tree.join(rel);
    if let Some(dir) = dest.parent() {
        fs_err::create_dir_all(dir)?;
    }
    remove(&dest)?;
    fs_err::write(&dest, content)?;
    Ok(())
}

fn remove(path: &Path) -> Result<()> {
    match path.symlink_metadata() {
        Ok(_) => Ok(fs_err::remove_file(path)?),
        Err(_) => Ok(()),
    }
}

/// Removes the files below `dir` and, when `dirs_too`, the folders; folders are otherwise
/// kept because packages expect them (e.g. `/var/log/apt`).
fn empty_files_below(dir: &Path, dirs_too: bool) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(dir).min_depth(1).contents_first(true) {
        let entry = entry?;
        let ft = entry.file_type();
        if ft.is_dir() {
            if dirs_too {
                fs_err::remove_dir(entry.path())?;
            }
        } else {
            fs_err::remove_file(entry.path())?;
        }
    }
    if dir.ends_with("var/lib/apt/lists") {
        fs_err::create_dir_all(dir.join("partial"))?;
    }
    Ok(())
}
