//! Apt archives: the base archive and extra repositories, each verified before bootstrapping
//! against exactly the keys the recipe trusts for it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use sequoia_openpgp::Cert;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{fetch, openpgp};
use crate::recipe::Repository;

/// What the build learnt about one archive's `InRelease`; recorded in the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedArchive {
    /// `base`, or the repository's name.
    pub name: String,
    pub url: String,
    pub suite: String,
    /// The `Date:` of the verified Release text.
    pub inrelease_date: Option<String>,
    #[serde(skip)]
    pub inrelease_epoch: Option<i64>,
    pub inrelease_sha256: String,
    /// Primary fingerprints of the keys that made good signatures.
    pub signed_by: Vec<String>,
}

/// Fetches `URL/dists/SUITE/InRelease` and verifies it against `trusted`. `who` names the
/// archive in errors ("base archive", "repository `tailscale`").
pub fn verify_archive(
    name: &str,
    who: &str,
    url: &str,
    suite: &str,
    inrelease: &[u8],
    trusted: &[Cert],
) -> Result<VerifiedArchive> {
    let inrelease_url = inrelease_url(url, suite);
    let verified = openpgp::verify_inrelease(inrelease, trusted)
        .map_err(|e| anyhow!("{who}: {inrelease_url}: {e}"))?;
    let date = crate::build::bootstrap::release_date(&verified.text);
    Ok(VerifiedArchive {
        name: name.to_owned(),
        url: url.to_owned(),
        suite: suite.to_owned(),
        inrelease_date: date.as_ref().map(|d| d.0.clone()),
        inrelease_epoch: date.map(|d| d.1),
        inrelease_sha256: hex::encode(Sha256::digest(inrelease)),
        signed_by: verified.signed_by,
    })
}

pub fn inrelease_url(url: &str, suite: &str) -> String {
    format!("{}/dists/{suite}/InRelease", url.trim_end_matches('/'))
}

/// An extra repository whose key was fetched and pinned and whose `InRelease` verified.
#[derive(Debug)]
pub struct Prepared {
    pub repository: Repository,
    /// The pinned key alone, as a binary keyring, on the host (apt reads `signed-by` paths
    /// on the host while mmdebstrap runs in root mode).
    pub host_keyring: PathBuf,
    pub keyring: Vec<u8>,
    pub archive: VerifiedArchive,
}

impl Prepared {
    /// The keyring's path in the image.
    pub fn image_keyring(&self) -> String {
        format!(
            "/usr/share/keyrings/{}-archive-keyring.gpg",
            self.repository.name
        )
    }

    /// The source line mmdebstrap gets while bootstrapping.
    pub fn mirror_line(&self) -> String {
        let r = &self.repository;
        format!(
            "deb [signed-by={}] {} {} {}",
            self.host_keyring.display(),
            r.url,
            r.suite,
            r.components.join(" ")
        )
    }

    /// `/etc/apt/sources.list.d/NAME.sources` in the image (deb822).
    pub fn sources_file(&self) -> String {
        let r = &self.repository;
        format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\nSigned-By: {}\n",
            r.url,
            r.suite,
            r.components.join(" "),
            self.image_keyring()
        )
    }
}

/// Fetches the repository's key, keeps only the certificate with the pinned fingerprint,
/// writes it to `keyrings/NAME-archive-keyring.gpg` in `scratch`, and verifies the
/// repository's `InRelease` against that key alone.
pub fn prepare(repo: &Repository, scratch: &Path) -> Result<Prepared> {
    let who = format!("repository `{}`", repo.name);
    let key_bytes = fetch::get(&repo.key_url)
        .with_context(|| format!("{who}: fetching its key (key-url {})", repo.key_url))?;
    let certs = openpgp::read_keyring(&key_bytes)
        .map_err(|e| anyhow!("{who}: the key at {}: {e}", repo.key_url))?;
    let cert = openpgp::pinned_cert(certs, &repo.fingerprint).map_err(|e| {
        anyhow!(
            "{who}: the key at {}: {e}; compare `fingerprint` with the one the repository's \
             owner publishes",
            repo.key_url
        )
    })?;
    let keyring = openpgp::binary_keyring(std::slice::from_ref(&cert));
    let dir = scratch.join("keyrings");
    fs_err::create_dir_all(&dir)?;
    let host_keyring = dir.join(format!("{}-archive-keyring.gpg", repo.name));
    fs_err::write(&host_keyring, &keyring)?;

    let url = inrelease_url(&repo.url, &repo.suite);
    let inrelease = fetch::get(&url).map_err(|e| match e.downcast_ref::<fetch::FetchError>() {
        Some(fetch::FetchError::Status { status: 404, .. }) => anyhow!(
            "{who}: {url} answered 404: check its `url` and `suite` (`{}`)",
            repo.suite
        ),
        _ => e.context(format!("{who}: fetching {url}")),
    })?;
    let archive = verify_archive(
        &repo.name,
        &who,
        &repo.url,
        &repo.suite,
        &inrelease,
        std::slice::from_ref(&cert),
    )?;
    Ok(Prepared {
        repository: repo.clone(),
        host_keyring,
        keyring,
        archive,
    })
}

/// After bootstrapping: the image gets each repository's keyring and a deb822 source file
/// naming it, and loses the bootstrap's source lines that point at host paths.
pub fn install(tree: &Path, prepared: &[Prepared], epoch: i64) -> Result<()> {
    if prepared.is_empty() {
        return Ok(());
    }
    let list = tree.join("etc/apt/sources.list");
    if list.exists() {
        let text = fs_err::read_to_string(&list)?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                !prepared
                    .iter()
                    .any(|p| l.contains(&*p.host_keyring.to_string_lossy()))
            })
            .collect();
        fs_err::write(&list, kept.join("\n") + "\n")?;
    }
    for p in prepared {
        let keyring = tree.join(p.image_keyring().trim_start_matches('/'));
        let sources = tree.join(format!(
            "etc/apt/sources.list.d/{}.sources",
            p.repository.name
        ));
        for (path, bytes) in [
            (&keyring, p.keyring.as_slice()),
            (&sources, p.sources_file().as_bytes()),
        ] {
            fs_err::create_dir_all(path.parent().expect("a folder"))?;
            fs_err::write(path, bytes)
                .with_context(|| format!("adding repository `{}`", p.repository.name))?;
            crate::build::overlay::set_mtime(path, epoch)?;
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::fetch::testserver::serve;
    use crate::sources::openpgp::testkeys::{clearsign, key};

    const RELEASE: &[u8] = b"Origin: fixture\nSuite: trixie\nDate: Sat, 15 Nov 2025 09:27:39 UTC\n";

    fn repo(base: &str, fingerprint: &str) -> Repository {
        Repository {
            name: "fixture".into(),
            url: format!("{base}/repo"),
            suite: "trixie".into(),
            components: vec!["main".into()],
            key_url: format!("{base}/key.gpg"),
            fingerprint: fingerprint.into(),
            packages: vec![],
        }
    }

    /// A served folder with a key and an InRelease made by `sign`.
    fn fixture(sign: impl Fn(&Cert) -> Vec<u8>) -> (tempfile::TempDir, String, Cert) {
        let dir = tempfile::tempdir().unwrap();
        let k = key("fixture");
        let dists = dir.path().join("repo/dists/trixie");
        std::fs::create_dir_all(&dists).unwrap();
        std::fs::write(dists.join("InRelease"), sign(&k)).unwrap();
        std::fs::write(
            dir.path().join("key.gpg"),
            openpgp::binary_keyring(std::slice::from_ref(&k)),
        )
        .unwrap();
        let base = serve(dir.path().to_path_buf());
        (dir, base, k)
    }

    #[test]
    fn a_pinned_repository_is_prepared_and_installed() {
        let (_dir, base, k) = fixture(|k| clearsign(RELEASE, &[k]));
        let scratch = tempfile::tempdir().unwrap();
        let p = prepare(&repo(&base, &openpgp::fingerprint_of(&k)), scratch.path()).unwrap();
        assert_eq!(p.archive.signed_by, [openpgp::fingerprint_of(&k)]);
        assert_eq!(
            p.archive.inrelease_date.as_deref(),
            Some("Sat, 15 Nov 2025 09:27:39 UTC")
        );
        assert!(p.host_keyring.starts_with(scratch.path()));
        assert!(p.mirror_line().starts_with(&format!(
            "deb [signed-by={}] {base}/repo trixie main",
            p.host_keyring.display()
        )));

        let tree = tempfile::tempdir().unwrap();
        let apt = tree.path().join("etc/apt");
        std::fs::create_dir_all(&apt).unwrap();
        let base_line = "deb http://deb.debian.org/debian trixie main";
        std::fs::write(
            apt.join("sources.list"),
            format!("{base_line}\n{}\n", p.mirror_line()),
        )
        .unwrap();
        install(tree.path(), std::slice::from_ref(&p), 0).unwrap();
        let list = std::fs::read_to_string(apt.join("sources.list")).unwrap();
        assert_eq!(list, format!("{base_line}\n"));
        let sources = std::fs::read_to_string(apt.join("sources.list.d/fixture.sources")).unwrap();
        assert!(sources.contains("Signed-By: /usr/share/keyrings/fixture-archive-keyring.gpg\n"));
        let ring = tree
            .path()
            .join("usr/share/keyrings/fixture-archive-keyring.gpg");
        let certs = openpgp::read_keyring(&std::fs::read(ring).unwrap()).unwrap();
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].fingerprint(), k.fingerprint());
    }

    #[test]
    fn a_wrong_fingerprint_stops_before_the_release_is_read() {
        let (_dir, base, _k) = fixture(|k| clearsign(RELEASE, &[k]));
        let scratch = tempfile::tempdir().unwrap();
        let wrong = "AB".repeat(20);
        let err = format!(
            "{:#}",
            prepare(&repo(&base, &wrong), scratch.path()).unwrap_err()
        );
        assert!(err.contains("repository `fixture`"), "{err}");
        assert!(err.contains(&format!("{base}/key.gpg")), "{err}");
        assert!(err.contains(&wrong), "{err}");
    }

    #[test]
    fn an_unsigned_or_foreign_signed_release_is_refused_naming_the_url() {
        let scratch = tempfile::tempdir().unwrap();
        let (_d1, base, k) = fixture(|_| RELEASE.to_vec());
        let err = format!(
            "{:#}",
            prepare(&repo(&base, &openpgp::fingerprint_of(&k)), scratch.path()).unwrap_err()
        );
        assert!(
            err.contains(&format!("{base}/repo/dists/trixie/InRelease")),
            "{err}"
        );
        assert!(err.contains("not signed"), "{err}");

        let (_d2, base, k) = fixture(|_| clearsign(RELEASE, &[&key("mallory")]));
        let err = format!(
            "{:#}",
            prepare(&repo(&base, &openpgp::fingerprint_of(&k)), scratch.path()).unwrap_err()
        );
        assert!(
            err.contains("no signature on it was made by a trusted key"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_suite_says_which_keys_to_check() {
        let (_dir, base, k) = fixture(|k| clearsign(RELEASE, &[k]));
        let mut r = repo(&base, &openpgp::fingerprint_of(&k));
        r.suite = "forky".into();
        let scratch = tempfile::tempdir().unwrap();
        let err = format!("{:#}", prepare(&r, scratch.path()).unwrap_err());
        assert!(err.contains("answered 404"), "{err}");
        assert!(err.contains("`suite` (`forky`)"), "{err}");
    }
}
