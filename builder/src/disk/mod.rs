//! The disk: a GPT with an EFI system partition and an x86-64 root partition, assembled in
//! a plain file. Nothing here needs a loop device, a mount or root.

pub mod esp;
pub mod ext4;
mod fat_fixup;
pub mod gpt;

use std::path::Path;

use anyhow::{Context, Result};
use uuid::Uuid;

use crate::size::MIB;

/// Partitions start and end on 1 MiB boundaries.
pub const ALIGN: u64 = MIB;
pub const SECTOR: u64 = 512;

/// Where each partition lies, in bytes, and the identities baked into the image.
#[derive(Debug, Clone)]
pub struct Layout {
    pub disk_size: u64,
    pub esp_start: u64,
    pub esp_size: u64,
    pub root_start: u64,
    pub root_size: u64,
    pub ids: Ids,
}

/// Identities derived from the recipe so the same inputs give the same disk.
#[derive(Debug, Clone)]
pub struct Ids {
    pub disk_guid: Uuid,
    pub esp_guid: Uuid,
    pub root_guid: Uuid,
    pub root_fs_uuid: Uuid,
    pub root_hash_seed: Uuid,
    pub esp_volume_id: u32,
}

impl Ids {
    /// Every identity is a name-based UUID under one namespace, keyed by `seed` (the
    /// recipe's hash), so rebuilding the same recipe reproduces them.
    pub fn derive(seed: &str) -> Ids {
        let ns = Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://omni-image.invalid/disk");
        let id = |what: &str| Uuid::new_v5(&ns, format!("{seed}/{what}").as_bytes());
        let vol = id("esp-volume-id");
        Ids {
            disk_guid: id("disk"),
            esp_guid: id("esp"),
            root_guid: id("root"),
            root_fs_uuid: id("root-fs"),
            root_hash_seed: id("root-hash-seed"),
            esp_volume_id: u32::from_be_bytes(vol.as_bytes()[..4].try_into().unwrap()),
        }
    }

    /// The ESP's volume id as fstab and `/dev/disk/by-uuid` spell it: `ABCD-EF01`.
    pub fn esp_uuid(&self) -> String {
        let v = self.esp_volume_id;
        format!("{:04X}-{:04X}", v >> 16, v & 0xffff)
    }
}

impl Layout {
    pub fn new(disk_size: u64, esp_size: u64, ids: Ids) -> Result<Layout> {
        let disk_size = disk_size / ALIGN * ALIGN;
        let esp_start = ALIGN;
        let esp_size = esp_size.div_ceil(ALIGN) * ALIGN;
        let root_start = esp_start + esp_size;
        // The backup GPT takes the last 33 sectors: keep the final MiB free of partitions.
        let root_end = disk_size
            .checked_sub(ALIGN)
            .context("disk smaller than 1 MiB")?;
        let root_size = root_end
            .checked_sub(root_start)
            .filter(|s| *s > 0)
            .context("disk too small to hold an ESP and a root partition")?;
        Ok(Layout {
            disk_size,
            esp_start,
            esp_size,
            root_start,
            root_size,
            ids,
        })
    }
}

/// Writes the partition table, the ESP and the root filesystem into `raw`.
pub fn assemble(
    raw: &Path,
    layout: &Layout,
    esp: &esp::Contents,
    tree: &Path,
    epoch: i64,
) -> Result<()> {
    let file = fs_err::File::create(raw)?;
    file.set_len(layout.disk_size)
        .with_context(|| format!("sizing {}", raw.display()))?;
    drop(file);

    gpt::write(raw, layout)
        .with_context(|| format!("writing the partition table of {}", raw.display()))?;
    crate::interrupt::check()?;
    esp::write(raw, layout, esp, epoch)
        .with_context(|| format!("writing the ESP in {}", raw.display()))?;
    crate::interrupt::check()?;
    ext4::write(raw, layout, tree, epoch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_leaves_room_for_the_backup_gpt() {
        let l = Layout::new(2 << 30, 128 * MIB, Ids::derive("x")).unwrap();
        assert_eq!(l.esp_start, MIB);
        assert_eq!(l.root_start, 129 * MIB);
        assert_eq!(l.root_start % ALIGN, 0);
        assert_eq!(l.root_start + l.root_size, (2 << 30) - MIB);
    }

    #[test]
    fn ids_are_stable_per_seed() {
        let (a, b, c) = (Ids::derive("a"), Ids::derive("a"), Ids::derive("b"));
        assert_eq!(a.root_fs_uuid, b.root_fs_uuid);
        assert_eq!(a.esp_volume_id, b.esp_volume_id);
        assert_ne!(a.root_fs_uuid, c.root_fs_uuid);
        assert_ne!(a.disk_guid, a.root_guid);
        assert_eq!(a.esp_uuid().len(), 9);
    }
}
