//! Where cloud-init data comes from. Each source is one module behind [`Datasource`]; all of
//! them are found without the network and read without mounting anything, from block devices
//! and image files alike.

pub mod cidata;
pub mod cmdline;
pub mod configdrive;
pub mod fs;
pub mod probe;
pub mod seeddir;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::fsutil::Root;

/// How the network configuration of a seed is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkFormat {
    /// cloud-init's network config, version 1 or 2 (NoCloud `network-config`).
    CloudInit,
    /// Debian's `/etc/network/interfaces` syntax (Proxmox's configdrive2 `content/0000`).
    Interfaces,
}

/// How the meta-data of a seed is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaFormat {
    /// NoCloud `meta-data`: YAML (JSON is YAML too).
    NoCloud,
    /// configdrive2 `meta_data.json`: `uuid`, `hostname`, `public_keys`.
    OpenStack,
}

/// The files of one seed, unparsed.
#[derive(Debug, Clone)]
pub struct SeedFiles {
    pub meta_format: MetaFormat,
    pub meta_data: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub vendor_data: Option<Vec<u8>>,
    pub network: Option<(NetworkFormat, Vec<u8>)>,
}

/// One place cloud-init data can come from.
pub trait Datasource {
    /// A short description for logs and `status`, e.g. `nocloud iso9660 /dev/sr0 (cidata)`.
    fn name(&self) -> String;
    /// Reads the seed's files.
    fn read(&self) -> Result<SeedFiles>;
}

/// What the agent looks at on the machine besides the target tree.
#[derive(Debug, Clone)]
pub struct Env {
    pub root: Root,
    /// sysfs, for block devices, network interfaces and the SMBIOS uuid.
    pub sysfs: PathBuf,
    /// The device directory, for `/dev/disk/by-label` and device nodes.
    pub dev: PathBuf,
    /// The kernel command line file.
    pub cmdline: PathBuf,
}

impl Env {
    /// The running system, or a tree in `root` whose `sys`, `dev` and `proc/cmdline` (if any)
    /// stand in for the kernel's.
    pub fn new(root: Root) -> Self {
        if root.is_live() {
            Env {
                root,
                sysfs: "/sys".into(),
                dev: "/dev".into(),
                cmdline: "/proc/cmdline".into(),
            }
        } else {
            Env {
                sysfs: root.join("/sys"),
                dev: root.join("/dev"),
                cmdline: root.join("/proc/cmdline"),
                root,
            }
        }
    }
}

/// Finds the datasource to use, in cloud-init's order of precedence: the kernel command line,
/// the seed directory, then filesystems labelled `cidata` and `config-2`.
pub fn discover(env: &Env) -> Result<Option<Box<dyn Datasource>>> {
    if let Some(ds) = cmdline::detect(env)? {
        return Ok(Some(Box::new(ds)));
    }
    if let Some(ds) = seeddir::detect(env) {
        return Ok(Some(Box::new(ds)));
    }
    if let Some(ds) = cidata::detect(env)? {
        return Ok(Some(Box::new(ds)));
    }
    if let Some(ds) = configdrive::detect(env)? {
        return Ok(Some(Box::new(ds)));
    }
    Ok(None)
}

/// A datasource named on the command line: a seed directory, an image file or a device.
pub fn explicit(path: &Path) -> Result<Box<dyn Datasource>> {
    if path.is_dir() {
        if path.join("openstack/latest").is_dir() {
            return Ok(Box::new(configdrive::ConfigDrive::dir(path)));
        }
        return Ok(Box::new(seeddir::SeedDir::new(path, "seed directory")));
    }
    match fs::probe(path)? {
        Some((kind, label)) if label.eq_ignore_ascii_case("config-2") => Ok(Box::new(
            configdrive::ConfigDrive::device(path, kind, label),
        )),
        Some((kind, label)) => Ok(Box::new(cidata::Cidata::new(path, kind, label))),
        None => bail!(
            "{} holds neither an ISO 9660 nor a FAT filesystem (empty or truncated image?)",
            path.display()
        ),
    }
}

/// Reads NoCloud's four files from a filesystem.
pub(crate) fn read_nocloud(fs: &mut dyn fs::SeedFs) -> Result<SeedFiles> {
    Ok(SeedFiles {
        meta_format: MetaFormat::NoCloud,
        meta_data: fs.read_file("meta-data")?,
        user_data: fs.read_file("user-data")?,
        vendor_data: fs.read_file("vendor-data")?,
        network: fs
            .read_file("network-config")?
            .map(|b| (NetworkFormat::CloudInit, b)),
    })
}
