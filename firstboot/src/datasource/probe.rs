//! Finding a filesystem by its label: first through udev's `/dev/disk/by-label`, then by
//! reading the superblock of every CD-ROM and virtual disk the kernel lists, so that a seed is
//! found even before udev has made its links.

use std::path::PathBuf;

use anyhow::Result;

use super::Env;
use super::fs::{self, FsKind};

pub struct Found {
    pub device: PathBuf,
    pub kind: FsKind,
    pub label: String,
}

/// Block device names worth probing: CD-ROMs, virtio, SCSI/SATA and Xen disks and their
/// partitions.
fn is_candidate(name: &str) -> bool {
    ["sr", "vd", "sd", "xvd", "hd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The first device whose filesystem label matches one of `labels` (ignoring case).
pub fn find_by_label(env: &Env, labels: &[&str]) -> Result<Option<Found>> {
    let matches = |label: &str| labels.iter().any(|l| l.eq_ignore_ascii_case(label));

    let by_label = env.dev.join("disk/by-label");
    for label in labels {
        for variant in [label.to_string(), label.to_uppercase()] {
            let link = by_label.join(&variant);
            if link.exists()
                && let Ok(Some((kind, found))) = fs::probe(&link)
                && matches(&found)
            {
                let device = std::fs::canonicalize(&link).unwrap_or(link);
                return Ok(Some(Found {
                    device,
                    kind,
                    label: found,
                }));
            }
        }
    }

    let Ok(entries) = std::fs::read_dir(env.sysfs.join("class/block")) else {
        return Ok(None);
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_candidate(n))
        .collect();
    names.sort();
    for name in names {
        let device = env.dev.join(&name);
        // A drive without a medium or a device we may not read is simply not a seed.
        if let Ok(Some((kind, label))) = fs::probe(&device)
            && matches(&label)
        {
            return Ok(Some(Found {
                device,
                kind,
                label,
            }));
        }
    }
    Ok(None)
}
