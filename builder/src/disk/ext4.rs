//! The root filesystem: `mkfs.ext4 -d` fills it from the tree, written in place at the root
//! partition's offset inside the disk file.

use std::path::Path;

use anyhow::{Result, bail};

use super::Layout;
use crate::exec::Cmd;
use crate::size::{MIB, human};

pub const LABEL: &str = "root";
const BLOCK: u64 = 4096;

/// Bytes a tree needs as ext4: its files rounded up to blocks, inodes, and the journal and
/// metadata that mke2fs reserves (a generous estimate: it is only used to fail early).
pub fn estimate(tree: &Path) -> Result<u64> {
    let mut data = 0u64;
    let mut inodes = 0u64;
    for entry in walkdir::WalkDir::new(tree) {
        let entry = entry?;
        inodes += 1;
        let meta = entry.metadata()?;
        if meta.is_file() || meta.is_dir() {
            data += meta.len().div_ceil(BLOCK) * BLOCK;
        }
        if inodes.is_multiple_of(4096) {
            crate::interrupt::check()?;
        }
    }
    let journal = 64 * MIB;
    Ok(data + inodes * 256 + journal + data / 20 + 16 * MIB)
}

/// The `disk.size` that would fit a root tree of `needed` bytes, rounded up to 256 MiB.
fn suggest_disk_size(layout: &Layout, needed: u64) -> u64 {
    let total = layout.root_start + needed + MIB;
    total.div_ceil(256 * MIB) * 256
}

/// The first e2fsprogs whose `mke2fs -d` honours `SOURCE_DATE_EPOCH`.
const REPRODUCIBLE: (u32, u32, u32) = (1, 47, 1);

fn version(cmd: Cmd) -> Option<(u32, u32, u32)> {
    // `mke2fs -V` prints "mke2fs 1.47.2 (1-Jan-2025)" on stderr and exits 0.
    let out = cmd.arg("-V").output_all().ok()?;
    let word = out.split_whitespace().nth(1)?;
    let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// The mke2fs to use: the host's when it is recent enough to make reproducible filesystems,
/// else the tree's own (run with the tree's dynamic loader and libraries, reading the tree's
/// mke2fs.conf), else the host's anyway, with a warning.
fn mke2fs(tree: &Path) -> (Cmd, String) {
    let host = crate::hosttools::find_program("mkfs.ext4").unwrap_or_else(|| "mkfs.ext4".into());
    let host_cmd = Cmd::new(&host).arg("-t").arg("ext4");
    match version(Cmd::new(&host)) {
        Some(v) if v >= REPRODUCIBLE => {
            return (host_cmd, format!("host mke2fs {}.{}.{}", v.0, v.1, v.2));
        }
        _ => {}
    }
    let libdir = tree.join("usr/lib/x86_64-linux-gnu");
    let loader = libdir.join("ld-linux-x86-64.so.2");
    let own = tree.join("usr/sbin/mke2fs");
    let tree_cmd = || {
        Cmd::new(&loader)
            .arg("--library-path")
            .arg(&libdir)
            .arg(&own)
            .env("MKE2FS_CONFIG", tree.join("etc/mke2fs.conf"))
    };
    if loader.is_file() && own.is_file() {
        match version(tree_cmd()) {
            Some(v) if v >= REPRODUCIBLE => {
                return (
                    tree_cmd().arg("-t").arg("ext4"),
                    format!("the image's mke2fs {}.{}.{}", v.0, v.1, v.2),
                );
            }
            _ => {}
        }
    }
    tracing::warn!(
        "{} predates e2fsprogs 1.47.1: the root filesystem's timestamps will differ between \
         builds",
        host.display()
    );
    (host_cmd, "host mke2fs (not reproducible)".into())
}

pub fn write(raw: &Path, layout: &Layout, tree: &Path, epoch: i64) -> Result<()> {
    let needed = estimate(tree)?;
    if needed > layout.root_size {
        bail!(
            "the disk is too small: the root tree needs about {} but the root partition has {}; \
             set disk.size to at least {}M",
            human(needed),
            human(layout.root_size),
            suggest_disk_size(layout, needed)
        );
    }
    let blocks = layout.root_size / BLOCK;
    let ids = &layout.ids;
    let (mkfs, which) = mke2fs(tree);
    tracing::debug!("making the root filesystem with {which}");
    let cmd = mkfs
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["-q", "-F", "-b", "4096", "-L", LABEL])
        .arg("-U")
        .arg(ids.root_fs_uuid.to_string())
        .arg("-E")
        .arg(format!(
            "offset={},hash_seed={},root_owner=0:0",
            layout.root_start, ids.root_hash_seed
        ))
        .arg("-d")
        .arg(tree)
        .arg(raw)
        .arg(blocks.to_string());
    if let Err(err) = cmd.output() {
        let text = format!("{err:#}");
        // mke2fs's own words for a full filesystem; "No space left on device" is the host's
        // disk filling up while the image is written, which the build explains itself.
        if ["Could not allocate", "No free space in the directory"]
            .iter()
            .any(|m| text.contains(m))
        {
            bail!(
                "the disk is too small: mkfs.ext4 ran out of space filling the root partition \
                 ({}); set disk.size to at least {}M\n{text}",
                human(layout.root_size),
                suggest_disk_size(layout, needed + needed / 4)
            );
        }
        return Err(err.context(format!("making the root filesystem in {}", raw.display())));
    }
    Ok(())
}
