//! The EFI system partition: FAT32 formatted and filled with `fatfs`, straight into its
//! slice of the disk file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fatfs::{FatType, FileSystem, FormatVolumeOptions, FsOptions};
use fscommon::StreamSlice;

use super::Layout;
use crate::size::MIB;

pub const LABEL: &[u8; 11] = b"ESP        ";

/// What goes on the ESP: paths inside it (with `/` separators) and where the bytes come from.
#[derive(Debug, Default, Clone)]
pub struct Contents {
    pub files: Vec<(String, Source)>,
}

#[derive(Debug, Clone)]
pub enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl Contents {
    pub fn add_file(&mut self, path: &str, from: impl Into<PathBuf>) {
        self.files
            .push((path.to_owned(), Source::Host(from.into())));
    }

    pub fn add_bytes(&mut self, path: &str, bytes: impl Into<Vec<u8>>) {
        self.files
            .push((path.to_owned(), Source::Bytes(bytes.into())));
    }

    /// Bytes the files take, before FAT's cluster rounding.
    pub fn size(&self) -> Result<u64> {
        self.files.iter().try_fold(0, |acc, (_, src)| {
            Ok(acc
                + match src {
                    Source::Host(p) => fs_err::metadata(p)?.len(),
                    Source::Bytes(b) => b.len() as u64,
                })
        })
    }
}

/// A fixed clock for FAT timestamps, so they do not depend on when the image was built.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// The FAT date and time of a Unix time (UTC), clamped to FAT's 1980-2107 range.
pub fn fat_datetime(epoch: i64) -> fatfs::DateTime {
    let secs = epoch.clamp(315_532_800, 4_354_819_199);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    fatfs::DateTime {
        date: fatfs::Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: fatfs::Time {
            hour: (rem / 3600) as u16,
            min: (rem % 3600 / 60) as u16,
            sec: (rem % 60) as u16,
            millis: 0,
        },
    }
}

pub fn write(raw: &Path, layout: &Layout, contents: &Contents, epoch: i64) -> Result<()> {
    let needed = contents.size()?;
    if needed + 4 * MIB > layout.esp_size {
        anyhow::bail!(
            "the ESP is too small: its files take {} but `disk.esp-size` gives {}; set \
             disk.esp-size to at least {}M",
            crate::size::human(needed),
            crate::size::human(layout.esp_size),
            (needed + 8 * MIB).div_ceil(MIB)
        );
    }
    let file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?
        .into_parts()
        .0;
    let end = layout.esp_start + layout.esp_size;
    let mut slice = StreamSlice::new(file, layout.esp_start, end).context("slicing the ESP")?;
    if layout.esp_size < 64 * MIB {
        anyhow::bail!("disk.esp-size must be at least 64M for a FAT32 ESP");
    }
    let opts = FormatVolumeOptions::new()
        .volume_id(layout.ids.esp_volume_id)
        .volume_label(*LABEL)
        .fat_type(FatType::Fat32);
    fatfs::format_volume(&mut slice, opts).context("formatting FAT")?;

    let clock: &'static FixedTime = Box::leak(Box::new(FixedTime(fat_datetime(epoch))));
    let fs = FileSystem::new(slice, FsOptions::new().time_provider(clock))
        .context("opening the new FAT filesystem")?;
    {
        let root = fs.root_dir();
        for (path, source) in &contents.files {
            let (dir_path, name) = match path.rsplit_once('/') {
                Some((d, n)) => (d, n),
                None => ("", path.as_str()),
            };
            let mut dir = root.clone();
            for part in dir_path.split('/').filter(|p| !p.is_empty()) {
                dir = match dir.open_dir(part) {
                    Ok(d) => d,
                    Err(_) => dir
                        .create_dir(part)
                        .with_context(|| format!("creating {part}"))?,
                };
            }
            let mut out = dir
                .create_file(name)
                .with_context(|| format!("creating {path}"))?;
            out.truncate()?;
            match source {
                Source::Bytes(b) => out.write_all(b),
                Source::Host(p) => {
                    let mut input = fs_err::File::open(p)?;
                    std::io::copy(&mut input, &mut out).map(|_| ())
                }
            }
            .with_context(|| format!("writing {path} on the ESP"))?;
            out.flush()?;
        }
    }
    fs.unmount().context("closing the FAT filesystem")?;

    let file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?
        .into_parts()
        .0;
    let slice = StreamSlice::new(file, layout.esp_start, end).context("slicing the ESP")?;
    super::fat_fixup::repair(slice).context("repairing folder entries")?;
    Ok(())
}

/// Reads a file back from the ESP of a disk image (for tests and inspection).
pub fn read_file(raw: &Path, layout_start: u64, layout_size: u64, path: &str) -> Result<Vec<u8>> {
    let file = fs_err::File::open(raw)?.into_parts().0;
    let slice = StreamSlice::new(ReadOnly(file), layout_start, layout_start + layout_size)?;
    let fs = FileSystem::new(slice, FsOptions::new())?;
    let mut f = fs
        .root_dir()
        .open_file(path)
        .with_context(|| format!("opening {path} on the ESP"))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// fatfs wants a writable stream even to read; this one refuses writes.
#[derive(Debug)]
struct ReadOnly(std::fs::File);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl std::io::Seek for ReadOnly {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Ids, Layout};

    #[test]
    fn epoch_to_fat_date() {
        let t = fat_datetime(1_700_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
        assert_eq!(fat_datetime(0).date.year, 1980);
    }

    #[test]
    fn esp_holds_the_files_and_passes_fsck() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let layout = Layout::new(512 * MIB, 128 * MIB, Ids::derive("esp-test")).unwrap();
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(layout.disk_size)
            .unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, vec![7u8; 3 * 1024 * 1024]).unwrap();
        let mut c = Contents::default();
        c.add_bytes("EFI/BOOT/BOOTX64.EFI", b"MZ fake loader".to_vec());
        c.add_bytes("loader/loader.conf", b"timeout 0\n".to_vec());
        c.add_bytes("loader/entries/tsidp.conf", b"title tsidp\n".to_vec());
        c.add_file("vmlinuz", &kernel);
        write(&raw, &layout, &c, 1_700_000_000).unwrap();

        let read = |p| read_file(&raw, layout.esp_start, layout.esp_size, p).unwrap();
        assert_eq!(read("EFI/BOOT/BOOTX64.EFI"), b"MZ fake loader");
        assert_eq!(read("loader/entries/tsidp.conf"), b"title tsidp\n");
        assert_eq!(read("vmlinuz").len(), 3 * 1024 * 1024);

        let fs_file = std::fs::File::open(&raw).unwrap();
        let slice = StreamSlice::new(
            ReadOnly(fs_file),
            layout.esp_start,
            layout.esp_start + layout.esp_size,
        )
        .unwrap();
        let fs = FileSystem::new(slice, FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), FatType::Fat32);
        assert_eq!(fs.volume_id(), layout.ids.esp_volume_id);

        // dosfstools' checker must find nothing to fix.
        if let Some(fsck) = crate::hosttools::find_program("fsck.vfat") {
            let part = dir.path().join("esp.img");
            let bytes = std::fs::read(&raw).unwrap();
            let (s, e) = (
                layout.esp_start as usize,
                (layout.esp_start + layout.esp_size) as usize,
            );
            std::fs::write(&part, &bytes[s..e]).unwrap();
            let out = std::process::Command::new(fsck)
                .arg("-n")
                .arg(&part)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "fsck.vfat -n failed:\n{text}");
        }
    }

    #[test]
    fn too_small_esp_says_how_large_it_must_be() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let layout = Layout::new(512 * MIB, 64 * MIB, Ids::derive("small")).unwrap();
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(layout.disk_size)
            .unwrap();
        let mut c = Contents::default();
        c.add_bytes("big", vec![0u8; 63 * MIB as usize]);
        let err = format!("{:#}", write(&raw, &layout, &c, 0).unwrap_err());
        assert!(err.contains("set disk.esp-size to at least"), "{err}");
    }
}
