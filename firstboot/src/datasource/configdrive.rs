//! OpenStack's config drive, version 2, as Proxmox writes it for `citype=configdrive2`: a
//! filesystem labelled `config-2` holding `openstack/latest/{meta_data.json,user_data}` and the
//! network in `/etc/network/interfaces` syntax at `openstack/content/0000`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::fs::{self, DirFs, FsKind, SeedFs};
use super::{Datasource, Env, MetaFormat, NetworkFormat, SeedFiles, probe};

enum Source {
    Device {
        path: PathBuf,
        kind: FsKind,
        label: String,
    },
    Dir(PathBuf),
}

pub struct ConfigDrive {
    source: Source,
}

impl ConfigDrive {
    pub fn device(path: &Path, kind: FsKind, label: String) -> Self {
        ConfigDrive {
            source: Source::Device {
                path: path.to_owned(),
                kind,
                label,
            },
        }
    }

    pub fn dir(path: &Path) -> Self {
        ConfigDrive {
            source: Source::Dir(path.to_owned()),
        }
    }
}

pub fn detect(env: &Env) -> Result<Option<ConfigDrive>> {
    Ok(probe::find_by_label(env, &["config-2"])?
        .map(|found| ConfigDrive::device(&found.device, found.kind, found.label)))
}

impl Datasource for ConfigDrive {
    fn name(&self) -> String {
        match &self.source {
            Source::Device { path, kind, label } => {
                format!("configdrive2 {} {} ({label})", kind.name(), path.display())
            }
            Source::Dir(dir) => format!("configdrive2 directory {}", dir.display()),
        }
    }

    fn read(&self) -> Result<SeedFiles> {
        let mut fs: Box<dyn SeedFs> = match &self.source {
            Source::Device { path, kind, .. } => fs::open(path, *kind)?,
            Source::Dir(dir) => Box::new(DirFs::new(dir)),
        };
        let meta_data = fs.read_file("openstack/latest/meta_data.json")?;
        // The network file is wherever meta_data.json's network_config.content_path says.
        let content_path = meta_data
            .as_deref()
            .and_then(|m| serde_json::from_slice::<serde_json::Value>(m).ok())
            .and_then(|m| {
                m["network_config"]["content_path"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "/content/0000".to_owned());
        let content_path = format!("openstack/{}", content_path.trim_start_matches('/'));
        Ok(SeedFiles {
            meta_format: MetaFormat::OpenStack,
            meta_data,
            user_data: fs.read_file("openstack/latest/user_data")?,
            vendor_data: None,
            network: fs
                .read_file(&content_path)?
                .map(|b| (NetworkFormat::Interfaces, b)),
        })
    }
}
