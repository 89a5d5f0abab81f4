//! NoCloud on a filesystem labelled `cidata` (or `CIDATA`): the ISO Proxmox attaches, or a
//! vfat disk a user made.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::fs::{self, FsKind};
use super::{Datasource, Env, SeedFiles, probe};

pub struct Cidata {
    device: PathBuf,
    kind: FsKind,
    label: String,
}

impl Cidata {
    pub fn new(device: &Path, kind: FsKind, label: String) -> Self {
        Cidata {
            device: device.to_owned(),
            kind,
            label,
        }
    }
}

pub fn detect(env: &Env) -> Result<Option<Cidata>> {
    Ok(probe::find_by_label(env, &["cidata"])?
        .map(|found| Cidata::new(&found.device, found.kind, found.label)))
}

impl Datasource for Cidata {
    fn name(&self) -> String {
        format!(
            "nocloud {} {} ({})",
            self.kind.name(),
            self.device.display(),
            self.label
        )
    }

    fn read(&self) -> Result<SeedFiles> {
        let mut fs = fs::open(&self.device, self.kind)?;
        super::read_nocloud(fs.as_mut())
    }
}
