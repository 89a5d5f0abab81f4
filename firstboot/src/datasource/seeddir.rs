//! NoCloud from a directory: `/var/lib/cloud/seed/nocloud/` (or `nocloud-net`).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{Datasource, Env, SeedFiles, fs::DirFs};

pub struct SeedDir {
    dir: PathBuf,
    what: &'static str,
}

impl SeedDir {
    pub fn new(dir: &Path, what: &'static str) -> Self {
        SeedDir {
            dir: dir.to_owned(),
            what,
        }
    }
}

/// The seed directory, when it holds a `meta-data` or `user-data` file.
pub fn detect(env: &Env) -> Option<SeedDir> {
    [
        "/var/lib/cloud/seed/nocloud",
        "/var/lib/cloud/seed/nocloud-net",
    ]
    .into_iter()
    .find_map(|d| {
        let dir = env.root.join(d);
        (dir.join("meta-data").is_file() || dir.join("user-data").is_file())
            .then(|| SeedDir::new(&dir, "seed directory"))
    })
}

impl Datasource for SeedDir {
    fn name(&self) -> String {
        format!("nocloud {} {}", self.what, self.dir.display())
    }

    fn read(&self) -> Result<SeedFiles> {
        super::read_nocloud(&mut DirFs::new(&self.dir))
    }
}
