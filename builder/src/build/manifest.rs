//! `NAME.manifest.json`: what an image holds and how it was made.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::steps::Timing;
use crate::recipe::Recipe;
use crate::sources::repository::VerifiedArchive;

#[derive(Debug, Serialize)]
pub struct Manifest<'a> {
    pub name: &'a str,
    pub builder: String,
    pub recipe: &'a Recipe,
    pub recipe_hash: String,
    pub recipe_files: Vec<String>,
    pub source_date_epoch: i64,
    /// The base archive.
    pub archive: Archive,
    /// Extra apt repositories, in recipe order.
    pub repositories: Vec<Archive>,
    /// Files fetched by URL and installed, in recipe order.
    pub artifacts: Vec<crate::sources::artifact::Installed>,
    pub kernel: String,
    pub kernel_cmdline: String,
    pub packages: Vec<Package>,
    /// Every path in the root filesystem, relative to `/`, with what it is (see [`file_list`]).
    pub files: BTreeMap<String, String>,
    /// The base tree's cache key, and whether this build took it from the cache.
    pub base_tree: BaseTree,
    pub downloaded_packages: usize,
    pub cached_packages: usize,
    pub sizes: Sizes,
    pub outputs: Vec<OutputFile>,
    pub timings: Vec<Timing>,
    pub total_seconds: f64,
}

/// An apt archive whose `InRelease` the build verified before bootstrapping.
#[derive(Debug, Serialize)]
pub struct Archive {
    /// `base`, or the repository's name in the recipe.
    pub name: String,
    pub mirror: String,
    pub suite: String,
    /// The `Date:` of the suite's InRelease when the build fetched it.
    pub inrelease_date: Option<String>,
    pub inrelease_sha256: Option<String>,
    /// Primary fingerprints of the keys that made good signatures on it.
    pub signed_by: Vec<String>,
}

impl From<&VerifiedArchive> for Archive {
    fn from(v: &VerifiedArchive) -> Archive {
        Archive {
            name: v.name.clone(),
            mirror: v.url.clone(),
            suite: v.suite.clone(),
            inrelease_date: v.inrelease_date.clone(),
            inrelease_sha256: Some(v.inrelease_sha256.clone()),
            signed_by: v.signed_by.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BaseTree {
    pub key: String,
    pub cache_hit: bool,
}

#[derive(Debug, Serialize)]
pub struct Sizes {
    pub tree_bytes: u64,
    pub disk_bytes: u64,
    pub esp_bytes: u64,
    pub root_bytes: u64,
    /// Bytes the raw disk occupies on the host (it is sparse).
    pub raw_allocated_bytes: u64,
    pub qcow2_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct OutputFile {
    pub format: String,
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// Every entry of the tree, described in one line so that two builds can be compared path
/// by path: `d MODE UID:GID` for a folder, `f MODE UID:GID SIZE SHA256` for a regular file,
/// `l TARGET` for a symbolic link and `c`/`b`/`p`/`s MODE UID:GID` for devices, FIFOs and
/// sockets. Times are left out: they are clamped to the build's epoch anyway.
pub fn file_list(tree: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 1 << 16];
    for entry in walkdir::WalkDir::new(tree).min_depth(1).sort_by_file_name() {
        let entry = entry.with_context(|| format!("listing {}", tree.display()))?;
        let path = entry.path();
        let meta = path
            .symlink_metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        let rel = path.strip_prefix(tree).unwrap_or(path);
        let ft = meta.file_type();
        let perm = format!("{:04o} {}:{}", meta.mode() & 0o7777, meta.uid(), meta.gid());
        let what = if ft.is_symlink() {
            format!("l {}", fs_err::read_link(path)?.display())
        } else if ft.is_dir() {
            format!("d {perm}")
        } else if ft.is_file() {
            let mut f = fs_err::File::open(path)?;
            let mut h = Sha256::new();
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            format!("f {perm} {} {}", meta.len(), hex::encode(h.finalize()))
        } else {
            let kind = if ft.is_char_device() {
                "c"
            } else if ft.is_block_device() {
                "b"
            } else if ft.is_fifo() {
                "p"
            } else {
                "s"
            };
            format!("{kind} {perm}")
        };
        out.insert(format!("/{}", rel.display()), what);
    }
    Ok(out)
}

/// The installed packages, from the tree's dpkg status file, sorted by name.
pub fn installed_packages(tree: &Path) -> Result<Vec<Package>> {
    let status = fs_err::read_to_string(tree.join("var/lib/dpkg/status"))?;
    Ok(parse_status(&status))
}

fn parse_status(status: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
        };
        let installed = field("Status").is_some_and(|s| s.ends_with(" installed"));
        if let (true, Some(name), Some(version)) = (installed, field("Package"), field("Version")) {
            let architecture = field("Architecture").unwrap_or_default();
            out.push(Package {
                name,
                version,
                architecture,
            });
        }
    }
    out.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then(a.architecture.cmp(&b.architecture))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_kind_of_entry_with_its_content_digest() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs_err::create_dir_all(root.join("etc/ssh")).unwrap();
        fs_err::write(root.join("etc/hostname"), "idp\n").unwrap();
        fs_err::set_permissions(
            root.join("etc/hostname"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", root.join("etc/resolv.conf")).unwrap();
        let files = file_list(root).unwrap();
        let (uid, gid) = (unsafe { libc::getuid() }, unsafe { libc::getgid() });
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["/etc", "/etc/hostname", "/etc/resolv.conf", "/etc/ssh"]
        );
        assert_eq!(
            files["/etc/hostname"],
            format!(
                "f 0640 {uid}:{gid} 4 {}",
                hex::encode(Sha256::digest(b"idp\n"))
            )
        );
        assert_eq!(files["/etc/resolv.conf"], "l ../run/resolv.conf");
        assert!(
            files["/etc/ssh"].starts_with("d 0"),
            "{}",
            files["/etc/ssh"]
        );
    }

    #[test]
    fn reads_only_installed_packages() {
        let status = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.41-12\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: base-files\nStatus: install ok installed\nVersion: 13.8\nArchitecture: amd64\n";
        let pkgs = parse_status(status);
        assert_eq!(pkgs.len(), 2);
        assert_eq!(pkgs[0].name, "base-files");
        assert_eq!(
            pkgs[1],
            Package {
                name: "libc6".into(),
                version: "2.41-12".into(),
                architecture: "amd64".into()
            }
        );
    }
}
