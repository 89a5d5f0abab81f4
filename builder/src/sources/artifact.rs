//! Artifacts: files fetched by URL, pinned by sha256, kept in the cache by hash, and
//! installed into the image (the whole download, or one member of a `.tar.gz`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::fetch;
use crate::recipe::Artifact;

/// An artifact whose bytes are in the cache and match its pin.
#[derive(Debug)]
pub struct Fetched {
    pub artifact: Artifact,
    pub file: PathBuf,
    pub downloaded: bool,
}

/// What the manifest records about an installed artifact.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub name: String,
    pub url: String,
    pub sha256: String,
    pub member: Option<String>,
    pub path: String,
    pub mode: String,
    pub bytes: u64,
}

pub fn cache_dir(cache: &Path) -> PathBuf {
    cache.join("artifacts")
}

/// The artifact from the cache, or downloaded into it. A download is written under a
/// temporary name and becomes `<cache>/artifacts/<sha256>` only once its hash matched.
pub fn fetch(artifact: &Artifact, cache: &Path) -> Result<Fetched> {
    let dir = cache_dir(cache);
    fs_err::create_dir_all(&dir).context("creating the artifact cache")?;
    let file = dir.join(&artifact.sha256);
    if file.is_file() {
        let (actual, _) = crate::build::sha256_file(&file)?;
        if actual == artifact.sha256 {
            check_member(artifact, &file)?;
            return Ok(Fetched {
                artifact: artifact.clone(),
                file,
                downloaded: false,
            });
        }
        tracing::warn!(
            "{} does not hold what its name says (sha256 {actual}); fetching it again",
            file.display()
        );
        fs_err::remove_file(&file)?;
    }

    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}-", artifact.name))
        .suffix(".partial")
        .tempfile_in(&dir)
        .context("creating a file in the artifact cache")?;
    let mut hasher = Sha256::new();
    fetch::download(&artifact.url, tmp.path(), |chunk| hasher.update(chunk))
        .with_context(|| format!("artifacts `{}`: fetching {}", artifact.name, artifact.url))?;
    let actual = hex::encode(hasher.finalize());
    if actual != artifact.sha256 {
        // `tmp` is removed when it goes out of scope: nothing is left in the cache.
        bail!(
            "artifacts `{}`: {} has sha256 {actual}, but the recipe pins {}: the file changed \
             or was tampered with; nothing was kept",
            artifact.name,
            artifact.url,
            artifact.sha256
        );
    }
    tmp.persist(&file)
        .with_context(|| format!("keeping {} in the artifact cache", artifact.url))?;
    check_member(artifact, &file)?;
    Ok(Fetched {
        artifact: artifact.clone(),
        file,
        downloaded: true,
    })
}

/// Fails now, before anything is bootstrapped, when the tarball lacks the member.
fn check_member(artifact: &Artifact, file: &Path) -> Result<()> {
    if let Some(member) = &artifact.member {
        read_member(file, member, &mut std::io::sink()).with_context(|| {
            format!(
                "artifacts `{}`: reading {} as a .tar.gz",
                artifact.name, artifact.url
            )
        })?;
    }
    Ok(())
}

/// Copies the regular file `member` of the `.tar.gz` at `file` into `out`.
fn read_member(file: &Path, member: &str, out: &mut dyn std::io::Write) -> Result<u64> {
    let gz = flate2::read::GzDecoder::new(fs_err::File::open(file)?);
    let mut archive = tar::Archive::new(gz);
    let wanted = member.trim_start_matches("./");
    let mut names = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let name = path.trim_start_matches("./").to_owned();
        if name == wanted {
            if !entry.header().entry_type().is_file() {
                bail!("`{member}` in the tarball is not a regular file");
            }
            return Ok(std::io::copy(&mut entry, out)?);
        }
        if names.len() < 20 {
            names.push(name);
        }
    }
    bail!(
        "the tarball has no member `{member}`; it holds: {}",
        names.join(", ")
    )
}

/// Installs each artifact at its path in the tree, owned by root, with its mode and the
/// build's time.
pub fn install(tree: &Path, fetched: &[Fetched], epoch: i64) -> Result<Vec<Installed>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for f in fetched {
        let a = &f.artifact;
        let ctx = || format!("artifacts `{}`: installing {}", a.name, a.path);
        let dest =
            crate::build::overlay::resolve_in_root(tree, Path::new(a.path.trim_start_matches('/')))
                .with_context(ctx)?;
        fs_err::create_dir_all(dest.parent().expect("an absolute path has a folder"))
            .with_context(ctx)?;
        if dest.is_dir() {
            bail!("{}: {} is a folder in the image", ctx(), a.path);
        }
        let tmp = dest.with_file_name(format!(
            ".{}.partial",
            dest.file_name().unwrap_or_default().to_string_lossy()
        ));
        let bytes = {
            let mut w = fs_err::File::create(&tmp).with_context(ctx)?;
            match &a.member {
                Some(m) => read_member(&f.file, m, &mut w).with_context(ctx)?,
                None => std::io::copy(&mut fs_err::File::open(&f.file)?, &mut w)?,
            }
        };
        fs_err::set_permissions(&tmp, std::fs::Permissions::from_mode(a.mode))?;
        crate::build::overlay::set_mtime(&tmp, epoch)?;
        fs_err::rename(&tmp, &dest).with_context(ctx)?;
        out.push(Installed {
            name: a.name.clone(),
            url: a.url.clone(),
            sha256: a.sha256.clone(),
            member: a.member.clone(),
            path: a.path.clone(),
            mode: format!("{:04o}", a.mode),
            bytes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::fetch::testserver::serve;
    use std::os::unix::fs::PermissionsExt;

    /// A .tar.gz holding `./bin/tool` and `README`, made with the tar crate.
    fn tarball(dir: &Path, tool: &[u8]) -> PathBuf {
        let path = dir.join("tool.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (name, data) in [("./bin/tool", tool), ("README", b"read me".as_slice())] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    fn artifact(url: String, sha256: String) -> Artifact {
        Artifact {
            name: "tool".into(),
            url,
            sha256,
            member: Some("bin/tool".into()),
            path: "/usr/local/bin/tool".into(),
            mode: 0o755,
        }
    }

    #[test]
    fn a_pinned_tarball_member_is_cached_and_installed() {
        let served = tempfile::tempdir().unwrap();
        let tgz = tarball(served.path(), b"#!/bin/sh\necho hi\n");
        let (sha, _) = crate::build::sha256_file(&tgz).unwrap();
        let base = serve(served.path().to_path_buf());
        let cache = tempfile::tempdir().unwrap();
        let a = artifact(format!("{base}/tool.tar.gz"), sha.clone());

        let f = fetch(&a, cache.path()).unwrap();
        assert!(f.downloaded);
        assert_eq!(f.file, cache.path().join("artifacts").join(&sha));
        // Served no more: the second fetch comes from the cache.
        std::fs::remove_file(&tgz).unwrap();
        let f = fetch(&a, cache.path()).unwrap();
        assert!(!f.downloaded);

        let tree = tempfile::tempdir().unwrap();
        let done = install(tree.path(), &[f], 1_700_000_000).unwrap();
        let dest = tree.path().join("usr/local/bin/tool");
        assert_eq!(std::fs::read(&dest).unwrap(), b"#!/bin/sh\necho hi\n");
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(done[0].mode, "0755");
        assert_eq!(done[0].bytes, 18);
    }

    #[test]
    fn a_checksum_mismatch_names_url_and_both_hashes_and_keeps_nothing() {
        let served = tempfile::tempdir().unwrap();
        tarball(served.path(), b"tampered");
        let base = serve(served.path().to_path_buf());
        let cache = tempfile::tempdir().unwrap();
        let pinned = "ab".repeat(32);
        let url = format!("{base}/tool.tar.gz");
        let err = format!(
            "{:#}",
            fetch(&artifact(url.clone(), pinned.clone()), cache.path()).unwrap_err()
        );
        let (actual, _) = crate::build::sha256_file(&served.path().join("tool.tar.gz")).unwrap();
        assert!(err.contains(&url), "{err}");
        assert!(err.contains(&pinned), "{err}");
        assert!(err.contains(&actual), "{err}");
        let left: Vec<_> = std::fs::read_dir(cache.path().join("artifacts"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_missing_member_is_reported_at_fetch_time() {
        let served = tempfile::tempdir().unwrap();
        let tgz = tarball(served.path(), b"x");
        let (sha, _) = crate::build::sha256_file(&tgz).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mut a = artifact(format!("file://{}", tgz.display()), sha);
        a.member = Some("tsidp".into());
        let err = format!("{:#}", fetch(&a, cache.path()).unwrap_err());
        assert!(err.contains("no member `tsidp`"), "{err}");
        assert!(err.contains("bin/tool"), "{err}");
    }

    #[test]
    fn a_corrupted_cache_entry_is_fetched_again() {
        let served = tempfile::tempdir().unwrap();
        let tgz = tarball(served.path(), b"good");
        let (sha, _) = crate::build::sha256_file(&tgz).unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(cache.path().join("artifacts")).unwrap();
        std::fs::write(cache.path().join("artifacts").join(&sha), b"rot").unwrap();
        let f = fetch(
            &artifact(format!("file://{}", tgz.display()), sha.clone()),
            cache.path(),
        )
        .unwrap();
        assert!(f.downloaded);
        assert_eq!(crate::build::sha256_file(&f.file).unwrap().0, sha);
    }
}
