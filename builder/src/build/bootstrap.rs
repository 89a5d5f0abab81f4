//! Step 1: the root tree, bootstrapped from distribution packages by mmdebstrap.
//!
//! Downloaded packages are kept in the cache folder between builds: they are synced into the
//! tree's apt archive before apt runs and synced back out afterwards, so a second build of
//! the same package set downloads nothing.
//!
//! The base archive's `InRelease` is verified against `base.keyring` before mmdebstrap
//! starts ([`verify_base`]); extra repositories come in as further mirrors, each with its own
//! pinned keyring as `signed-by` (see [`crate::sources`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::steps::Step;
use crate::exec::Cmd;
use crate::recipe::Recipe;
use crate::sources::repository::{self, Prepared, VerifiedArchive};

/// Packages every image needs for its boot chain and first boot, whatever the recipe says.
pub const LAYOUT_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "systemd-boot-efi",
    "e2fsprogs",
    "initramfs-tools",
];

/// Documentation, manual pages and translations are left out of images.
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
];

#[derive(Debug, Default)]
pub struct Outcome {
    /// Package files fetched from the mirror in this build (not found in the cache).
    pub downloaded: Vec<String>,
    /// Package files that came from the cache.
    pub cached: usize,
    /// The whole tree came from the base-tree cache: nothing was bootstrapped.
    pub cache_hit: bool,
}

pub fn packages(recipe: &Recipe) -> Vec<String> {
    let mut all: Vec<String> = LAYOUT_PACKAGES.iter().map(|s| s.to_string()).collect();
    all.push(recipe.kernel.package.clone());
    let from_repositories = recipe.repositories.iter().flat_map(|r| &r.packages);
    for p in recipe.packages.iter().chain(from_repositories) {
        if !all.contains(p) {
            all.push(p.clone());
        }
    }
    all
}

/// The mmdebstrap command line for a recipe without extra repositories (the benchmark's bare
/// run; a recipe with switched-on repositories needs [`command_with`]).
pub fn command(recipe: &Recipe, tree: &Path, apt_cache: Option<&Path>, epoch: i64) -> Cmd {
    command_with(recipe, tree, apt_cache, epoch, &[])
}

/// The mmdebstrap command line for a recipe, with its verified extra repositories as further
/// mirrors.
pub fn command_with(
    recipe: &Recipe,
    tree: &Path,
    apt_cache: Option<&Path>,
    epoch: i64,
    repositories: &[Prepared],
) -> Cmd {
    // Root mode for real root. Otherwise unshare mode: run by hand without root it maps the
    // ids itself; inside the build's user namespace, where this process is root, it only adds
    // a mount and a pid namespace (so /proc mounts and device nodes are bind-mounted).
    let mode = if crate::hosttools::is_root() && !crate::userns::inside() {
        "root"
    } else {
        "unshare"
    };
    let mut cmd = Cmd::new("mmdebstrap")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .arg(format!("--mode={mode}"))
        .arg(format!("--variant={}", recipe.base.variant))
        .arg("--format=directory")
        .arg(format!("--components={}", recipe.base.components.join(",")))
        .arg(format!("--keyring={}", recipe.base.keyring.display()))
        .arg(format!("--include={}", packages(recipe).join(",")))
        .arg("--aptopt=Acquire::Retries \"3\"")
        // A snapshot's Release files are past their Valid-Until by design.
        .args(
            recipe
                .base
                .snapshot
                .as_ref()
                .map(|_| "--aptopt=Acquire::Check-Valid-Until \"false\""),
        )
        .arg("--aptopt=APT::Install-Recommends \"false\"");
    for ex in DPKG_EXCLUDES {
        cmd = cmd.arg(format!("--dpkgopt={ex}"));
    }
    if let Some(cache) = apt_cache {
        // Keep what apt downloads: do not unlink the essential set, do not empty the archive
        // before our hook has copied it out.
        cmd = cmd
            .arg("--skip=essential/unlink")
            .arg("--skip=download/empty")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives")
            .arg(format!(
                "--setup-hook=sync-in {} /var/cache/apt/archives/",
                cache.display()
            ))
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives {}",
                incoming_dir(cache).display()
            ))
            .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb");
    }
    cmd = cmd.arg(&recipe.base.suite).arg(tree).arg(recipe.mirror());
    for r in repositories {
        cmd = cmd.arg(r.mirror_line());
    }
    cmd
}

/// Where one bootstrap's packages land before they are moved into the shared package cache,
/// beside it (so that nothing of it is synced into a tree): a build never writes into files
/// another build may be reading.
fn incoming_dir(apt_cache: &Path) -> PathBuf {
    let name = apt_cache.file_name().unwrap_or_default().to_string_lossy();
    apt_cache.with_file_name(format!(".incoming-{name}-{}", std::process::id()))
}

/// Moves the packages of one bootstrap into the shared package cache, each by a rename, so
/// concurrent builds only ever see whole files. Returns the names that were new and how many
/// were there already.
fn publish_packages(apt_cache: &Path) -> Result<(Vec<String>, usize)> {
    let incoming = incoming_dir(apt_cache);
    let (mut new, mut had) = (Vec::new(), 0);
    for entry in fs_err::read_dir(&incoming)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".deb") {
            continue;
        }
        // A package file's name holds its version: one already there is the same file.
        let dest = apt_cache.join(&name);
        if dest.exists() {
            had += 1;
        } else {
            fs_err::rename(entry.path(), &dest)?;
            new.push(name);
        }
    }
    fs_err::remove_dir_all(&incoming)?;
    new.sort();
    Ok((new, had))
}

pub fn apt_cache_dir(cache: &Path, recipe: &Recipe) -> PathBuf {
    cache.join("apt").join(format!(
        "{}-{}",
        recipe.base.distribution, recipe.base.suite
    ))
}

pub fn run(
    recipe: &Recipe,
    tree: &Path,
    cache: &Path,
    epoch: i64,
    step: &Step,
    repositories: &[Prepared],
) -> Result<Outcome> {
    let apt_cache = apt_cache_dir(cache, recipe);
    fs_err::create_dir_all(&apt_cache).context("creating the package cache")?;
    let incoming = incoming_dir(&apt_cache);
    if incoming.exists() {
        // Left by an earlier build of the same process id that was killed.
        fs_err::remove_dir_all(&incoming)?;
    }
    fs_err::create_dir_all(&incoming)?;

    let cmd = command_with(recipe, tree, Some(&apt_cache), epoch, repositories);
    let mut last_phase = String::new();
    cmd.run_lines(|line| {
        if let Some(msg) = line.strip_prefix("I: ") {
            step.note(msg);
            last_phase = msg.to_owned();
        } else if line.starts_with("E: ") || line.starts_with("W: ") {
            step.say(line);
        }
    })
    .map_err(|err| {
        let _ = fs_err::remove_dir_all(&incoming);
        explain(err, recipe, &last_phase)
    })?;

    empty_dev(tree)?;

    let (downloaded, cached) = publish_packages(&apt_cache)?;
    repository::install(tree, repositories, epoch)?;
    Ok(Outcome {
        downloaded,
        cached,
        cache_hit: false,
    })
}

/// Removes the device nodes, links and empty folders root mode leaves in `/dev` (unshare
/// mode leaves none): the booted system mounts devtmpfs there, and so the tree, its cache
/// entry and the image are the same with or without root (a tree holding device nodes
/// could not be unpacked inside a user namespace). Only empty folders are removed, so
/// nothing still mounted there is touched.
fn empty_dev(tree: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let dev = tree.join("dev");
    let Ok(entries) = fs_err::read_dir(&dev) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fs_err::remove_dir(&path).with_context(|| {
                format!(
                    "{} is not empty after the bootstrap; is something still mounted there?",
                    path.display()
                )
            })?;
        } else if kind.is_char_device()
            || kind.is_block_device()
            || kind.is_symlink()
            || kind.is_fifo()
            || kind.is_socket()
        {
            fs_err::remove_file(&path)?;
        } else {
            bail!(
                "{} is a regular file left by a package in /dev; the booted system mounts \
                 devtmpfs over it: remove the package that ships it",
                path.display()
            );
        }
    }
    Ok(())
}

/// The suite's `InRelease`, fetched before bootstrapping: it tells "unknown suite" from
/// "unreachable mirror" before mmdebstrap spends time finding out, and its date is the
/// default `SOURCE_DATE_EPOCH`.
pub fn fetch_inrelease(recipe: &Recipe) -> Result<Vec<u8>> {
    use crate::sources::fetch::{self, FetchError};
    let url = format!("{}/dists/{}/InRelease", recipe.mirror(), recipe.base.suite);
    fetch::get(&url).map_err(|err| match err.downcast_ref::<FetchError>() {
        Some(FetchError::Status { status: 404, .. }) => anyhow::anyhow!(
            "base.suite: `{}` is not a suite of {} ({url} answered 404); check the spelling \
             (Debian 13 is \"trixie\", Ubuntu 24.04 \"noble\")",
            recipe.base.suite,
            recipe.mirror()
        ),
        Some(FetchError::Status { status, .. }) => {
            anyhow::anyhow!("base.mirror: {url} answered {status}")
        }
        Some(FetchError::Unreachable { reason, .. }) => anyhow::anyhow!(
            "base.mirror: cannot reach {} ({reason}); check the network or set base.mirror to \
             a mirror you can reach",
            recipe.mirror()
        ),
        None => err,
    })
}

/// Fetches the suite's `InRelease` and verifies it against `base.keyring` (which may hold
/// several keys, as Debian's does).
pub fn verify_base(recipe: &Recipe) -> Result<VerifiedArchive> {
    let keyring = &recipe.base.keyring;
    if !keyring.is_file() {
        bail!(
            "base.keyring: {} does not exist; install {} or point base.keyring at the archive's \
             keyring",
            keyring.display(),
            recipe.base.distribution.keyring_package()
        );
    }
    let bytes = fs_err::read(keyring).context("reading base.keyring")?;
    let certs = crate::sources::openpgp::read_keyring(&bytes)
        .map_err(|e| anyhow::anyhow!("base.keyring: {}: {e}", keyring.display()))?;
    let inrelease = fetch_inrelease(recipe)?;
    repository::verify_archive(
        "base",
        &format!("base archive (keyring {})", keyring.display()),
        recipe.mirror(),
        &recipe.base.suite,
        &inrelease,
        &certs,
    )
}

/// The `Date:` field of a Release file, as text and as a Unix time.
pub fn release_date(inrelease: &[u8]) -> Option<(String, i64)> {
    let text = String::from_utf8_lossy(inrelease);
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("Date:"))?
        .trim()
        .to_owned();
    // "Sat, 15 Nov 2025 09:27:39 UTC"
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [_, day, month, year, time, ..] = parts.as_slice() else {
        return None;
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as i64
        + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time.split(':').filter_map(|p| p.parse().ok()).collect();
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    // Days from civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((value, days * 86_400 + h * 3600 + m * 60 + s))
}

fn explain(err: anyhow::Error, recipe: &Recipe, phase: &str) -> anyhow::Error {
    if err.is::<crate::interrupt::Interrupted>() {
        return err;
    }
    let text = format!("{err:#}");
    if text.contains("Unable to locate package") || text.contains("has no installation candidate") {
        return err.context(format!(
            "a package named in the recipe does not exist in {} {}: check `packages`",
            recipe.base.distribution, recipe.base.suite
        ));
    }
    err.context(format!(
        "bootstrapping {} {} (while {phase})",
        recipe.base.distribution, recipe.base.suite
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_date_parses() {
        let r = b"Origin: Debian\nDate: Sat, 15 Nov 2025 09:27:39 UTC\nSuite: stable\n";
        let (text, epoch) = release_date(r).unwrap();
        assert_eq!(text, "Sat, 15 Nov 2025 09:27:39 UTC");
        assert_eq!(epoch, 1_763_198_859);
        assert!(release_date(b"Origin: x\n").is_none());
    }

    #[test]
    fn dev_is_emptied_of_nodes_links_and_empty_folders_only() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        fs_err::create_dir_all(dev.join("pts")).unwrap();
        std::os::unix::fs::symlink("/proc/self/fd", dev.join("fd")).unwrap();
        let fifo =
            std::ffi::CString::new(dev.join("initctl").into_os_string().into_encoded_bytes())
                .unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        empty_dev(dir.path()).unwrap();
        assert_eq!(fs_err::read_dir(&dev).unwrap().count(), 0);

        fs_err::create_dir_all(dev.join("shm")).unwrap();
        fs_err::write(dev.join("shm/held"), b"x").unwrap();
        let err = empty_dev(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not empty"), "{err}");
        assert!(dev.join("shm/held").exists());
        empty_dev(&dir.path().join("no-tree")).unwrap();
    }

    #[test]
    fn layout_packages_come_first_without_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(
            &path,
            "packages = [\"systemd\", \"sudo\"]\n[base]\nsuite = \"trixie\"\n",
        )
        .unwrap();
        let r = Recipe::load(&path).unwrap();
        let p = packages(&r);
        assert_eq!(p.iter().filter(|x| *x == "systemd").count(), 1);
        assert!(p.contains(&"linux-image-cloud-amd64".to_owned()));
        assert_eq!(p.last().unwrap(), "sudo");
    }
}
