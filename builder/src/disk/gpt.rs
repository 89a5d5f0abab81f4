//! The GUID partition table, with Discoverable Partitions type GUIDs, written with the
//! `gpt` crate plus a protective MBR.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::partition_types;

use super::{Layout, SECTOR};

pub const ESP_NAME: &str = "esp";
pub const ROOT_NAME: &str = "root";

pub fn write(raw: &Path, layout: &Layout) -> Result<()> {
    let mut file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?
        .into_parts()
        .0;
    let sectors = layout.disk_size / SECTOR;
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut file)
        .context("writing the protective MBR")?;

    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(file, Some(layout.ids.disk_guid))
        .context("creating the GPT")?;
    disk.update_partitions(BTreeMap::new())
        .context("clearing the partition table")?;
    let lba = |bytes: u64| bytes / SECTOR;
    disk.add_partition_at(
        ESP_NAME,
        1,
        lba(layout.esp_start),
        lba(layout.esp_size),
        partition_types::EFI,
        0,
    )
    .context("adding the ESP")?;
    disk.add_partition_at(
        ROOT_NAME,
        2,
        lba(layout.root_start),
        lba(layout.root_size),
        partition_types::LINUX_ROOT_X64,
        0,
    )
    .context("adding the root partition")?;

    // The crate picks random partition GUIDs; replace them with the derived ones.
    let mut parts = disk.take_partitions();
    for (id, guid) in [(1, layout.ids.esp_guid), (2, layout.ids.root_guid)] {
        parts.get_mut(&id).expect("partition just added").part_guid = guid;
    }
    disk.update_partitions(parts)
        .context("setting partition GUIDs")?;
    let file = disk.write().context("writing the GPT")?;
    file.sync_all().context("syncing the partition table")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Ids;
    use crate::size::MIB;

    #[test]
    fn table_reads_back_with_discoverable_types() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let layout = Layout::new(512 * MIB, 64 * MIB, Ids::derive("t")).unwrap();
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(layout.disk_size)
            .unwrap();
        write(&raw, &layout).unwrap();

        let disk = gpt::GptConfig::new().writable(false).open(&raw).unwrap();
        assert_eq!(*disk.guid(), layout.ids.disk_guid);
        let parts = disk.partitions();
        assert_eq!(parts.len(), 2);
        let esp = &parts[&1];
        assert_eq!(
            esp.part_type_guid.guid.to_string().to_uppercase(),
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );
        assert_eq!(esp.first_lba * 512, MIB);
        assert_eq!(esp.part_guid, layout.ids.esp_guid);
        let root = &parts[&2];
        assert_eq!(
            root.part_type_guid.guid.to_string().to_uppercase(),
            "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
        );
        assert_eq!(root.first_lba * 512, layout.root_start);
        assert_eq!(
            (root.last_lba + 1) * 512,
            layout.root_start + layout.root_size
        );

        // sfdisk (util-linux) agrees, when it is installed.
        if let Some(sfdisk) = crate::hosttools::find_program("sfdisk") {
            let out = std::process::Command::new(sfdisk)
                .arg("--verify")
                .arg(&raw)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}
