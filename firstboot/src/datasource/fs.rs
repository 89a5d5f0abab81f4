//! Reading seed files from a directory, an ISO 9660 filesystem or a FAT filesystem, each held
//! in a block device or an image file. Nothing is mounted: both filesystems are read here.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The largest seed file read; Proxmox keeps all files together below 3 MiB.
const MAX_FILE: u64 = 16 << 20;

/// A read-only view of a seed's files by their path inside the seed (`user-data`,
/// `openstack/latest/user_data`).
pub trait SeedFs {
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>>;
}

/// The filesystem found on a device or in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Iso9660,
    Fat,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Iso9660 => "iso9660",
            FsKind::Fat => "vfat",
        }
    }
}

/// Looks at the first 36 KiB of a device or image: its filesystem and volume label.
pub fn probe(path: &Path) -> Result<Option<(FsKind, String)>> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = vec![0u8; 0x8800];
    let n =
        read_up_to(&mut file, &mut head).with_context(|| format!("reading {}", path.display()))?;
    head.truncate(n);
    Ok(probe_bytes(&head))
}

fn probe_bytes(head: &[u8]) -> Option<(FsKind, String)> {
    // ISO 9660: the primary volume descriptor at sector 16, "CD001", label at byte 40.
    if head.len() >= 0x8000 + 72 && &head[0x8001..0x8006] == b"CD001" && head[0x8000] == 1 {
        let label = String::from_utf8_lossy(&head[0x8028..0x8048])
            .trim_end()
            .to_owned();
        return Some((FsKind::Iso9660, label));
    }
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA {
        // FAT32 keeps its extended boot record at 64, FAT12/16 at 36; both end with the
        // filesystem type string.
        for (sig_at, label_at, ty_at) in [(66usize, 71usize, 82usize), (38, 43, 54)] {
            if (head[sig_at] == 0x29 || head[sig_at] == 0x28) && head[ty_at..ty_at + 3] == *b"FAT" {
                let label = String::from_utf8_lossy(&head[label_at..label_at + 11])
                    .trim_end()
                    .to_owned();
                return Some((FsKind::Fat, label));
            }
        }
    }
    None
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Opens the filesystem in a device or image file.
pub fn open(path: &Path, kind: FsKind) -> Result<Box<dyn SeedFs>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(match kind {
        FsKind::Iso9660 => Box::new(IsoFs::open(file, path)?),
        FsKind::Fat => Box::new(FatFs::open(file, path)?),
    })
}

/// A seed kept as plain files in a directory.
pub struct DirFs {
    dir: PathBuf,
}

impl DirFs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirFs { dir: dir.into() }
    }
}

impl SeedFs for DirFs {
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>> {
        let full = self.dir.join(path);
        match fs_err::metadata(&full) {
            Ok(meta) if meta.len() > MAX_FILE => bail!("{} is larger than 16 MiB", full.display()),
            Ok(_) => Ok(Some(fs_err::read(&full)?)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}

/// An ISO 9660 image as `genisoimage -J -R` writes it: names come from Rock Ridge or Joliet.
pub struct IsoFs {
    image: hadris_iso::read::IsoImage<File>,
    source: PathBuf,
}

impl IsoFs {
    fn open(file: File, source: &Path) -> Result<Self> {
        let image = hadris_iso::read::IsoImage::open(file)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| format!("reading the ISO 9660 filesystem in {}", source.display()))?;
        Ok(IsoFs {
            image,
            source: source.to_owned(),
        })
    }
}

impl SeedFs for IsoFs {
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>> {
        let context = || {
            format!(
                "reading {path} from the ISO image {}",
                self.source.display()
            )
        };
        let entry = self
            .image
            .find_path(path)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(context)?;
        let Some(entry) = entry else { return Ok(None) };
        if !entry.is_file() {
            return Ok(None);
        }
        if entry.total_size() > MAX_FILE {
            bail!("{path} in {} is larger than 16 MiB", self.source.display());
        }
        let bytes = self
            .image
            .read_file(&entry)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(context)?;
        Ok(Some(bytes))
    }
}

/// A FAT filesystem, read through a handle that refuses every write.
pub struct FatFs {
    fs: fatfs::FileSystem<ReadOnly>,
    source: PathBuf,
}

impl FatFs {
    fn open(file: File, source: &Path) -> Result<Self> {
        let options = fatfs::FsOptions::new().update_accessed_date(false);
        let fs = fatfs::FileSystem::new(ReadOnly(file), options)
            .with_context(|| format!("reading the FAT filesystem in {}", source.display()))?;
        Ok(FatFs {
            fs,
            source: source.to_owned(),
        })
    }
}

impl SeedFs for FatFs {
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>> {
        let mut dir = self.fs.root_dir();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Ok(None);
        };
        for part in dirs {
            dir = match dir.open_dir(part) {
                Ok(d) => d,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!(
                            "reading {path} from the FAT image {}",
                            self.source.display()
                        )
                    });
                }
            };
        }
        let mut file = match dir.open_file(name) {
            Ok(f) => f,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "reading {path} from the FAT image {}",
                        self.source.display()
                    )
                });
            }
        };
        let mut bytes = Vec::new();
        (&mut file)
            .take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .with_context(|| {
                format!(
                    "reading {path} from the FAT image {}",
                    self.source.display()
                )
            })?;
        if bytes.len() as u64 > MAX_FILE {
            bail!("{path} in {} is larger than 16 MiB", self.source.display());
        }
        Ok(Some(bytes))
    }
}

/// A file handle for libraries that want read-write access; every write fails.
pub struct ReadOnly(File);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Seek for ReadOnly {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the seed is read-only",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
