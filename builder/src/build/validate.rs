//! Checks after the overlays, on what the image will run.
//!
//! For the Omni appliance: the Compose project the image ships is rendered from example
//! values by the first-boot agent's own code, exactly as a first boot renders it, and must
//! pass the image's own `docker compose config` (Debian's plugin is a static program that
//! runs in a chroot without a Docker daemon). The example files are removed afterwards, so
//! the image carries none of them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use omni_firstboot::appliance::omni::{self, compose};
use omni_firstboot::fsutil::Root;

use crate::exec::Cmd;
use crate::recipe::{Appliance, Recipe};

pub fn run(tree: &Path, recipe: &Recipe) -> Result<()> {
    if recipe.appliance == Some(Appliance::Omni) {
        check_omni_project(tree).context("checking the Omni Compose project")?;
    }
    Ok(())
}

fn check_omni_project(tree: &Path) -> Result<()> {
    let bin = in_tree(tree, compose::COMPOSE_BIN);
    if !bin.is_file() {
        bail!(
            "{} is missing from the image: the omni appliance needs the package \
             docker-compose in the recipe's packages",
            compose::COMPOSE_BIN
        );
    }
    let project = in_tree(tree, compose::PROJECT);
    if !project.is_file() {
        bail!(
            "{} is missing from the image: the recipe needs the overlay overlays/omni",
            compose::PROJECT
        );
    }
    warn_unpinned_images(&project)?;

    let _cleanup = ExampleFiles::new(tree)?;
    let secrets = omni::example()?;
    let root = Root::new(tree);
    omni::apply(&root, &secrets).context("rendering the project from example values")?;

    // Compose opens /dev/null, and the tree's /dev is empty (devtmpfs fills it at boot): the
    // host's is bound over an empty file there, in a mount namespace that ends with the
    // command, so no mount outlives it.
    let _null = Placeholder::create(&tree.join("dev/null"))?;
    Cmd::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind /dev/null "$1/dev/null" && exec chroot "$@""#)
        .arg("sh")
        .arg(tree)
        .arg(compose::COMPOSE_BIN)
        .args(["--env-file", omni::OMNI_ENV, "-f", compose::PROJECT])
        .args(["config", "--quiet"])
        .env("HOME", "/root")
        .env("COMPOSE_ANSI", "never")
        .output()
        .context("docker compose config refused the project rendered from example values")?;
    tracing::info!(
        "docker compose config accepts {} with example values",
        compose::PROJECT
    );
    Ok(())
}

/// Names each container image that is pinned by tag only (a tag can be moved; a digest
/// cannot).
fn warn_unpinned_images(project: &Path) -> Result<()> {
    let text = fs_err::read_to_string(project)?;
    for image in unpinned_images(&text) {
        tracing::warn!(
            "{}: the image {image} is pinned by tag only; add its @sha256 digest to the \
             recipe's [variables]",
            compose::PROJECT
        );
    }
    Ok(())
}

fn unpinned_images(compose_yaml: &str) -> Vec<String> {
    compose_yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(|i| i.trim().trim_matches('"').to_owned())
        .filter(|i| !i.contains("@sha256:"))
        .collect()
}

fn in_tree(tree: &Path, abs: &str) -> PathBuf {
    tree.join(abs.trim_start_matches('/'))
}

/// An empty file that is removed again when dropped.
struct Placeholder(PathBuf);

impl Placeholder {
    fn create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir)?;
        }
        fs_err::File::create_new(path)?;
        Ok(Placeholder(path.to_path_buf()))
    }
}

impl Drop for Placeholder {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0) {
            tracing::error!("removing {}: {err}", self.0.display());
        }
    }
}

/// Removes what rendering the example left in the tree, also when the check fails: the
/// appliance's folder and the agent's account id file.
struct ExampleFiles {
    paths: Vec<PathBuf>,
}

impl ExampleFiles {
    fn new(tree: &Path) -> Result<Self> {
        let etc = in_tree(tree, omni::DIR);
        let state = in_tree(tree, omni::ACCOUNT_ID_FILE);
        let state_dir = state.parent().map(Path::to_path_buf);
        for p in [Some(&etc), Some(&state), state_dir.as_ref()]
            .into_iter()
            .flatten()
        {
            if p.exists() {
                bail!(
                    "{} already exists in the image before first boot; an overlay must not \
                     ship it (omni-firstboot writes it from the seed)",
                    p.display()
                );
            }
        }
        Ok(ExampleFiles {
            paths: [Some(etc), state_dir].into_iter().flatten().collect(),
        })
    }
}

impl Drop for ExampleFiles {
    fn drop(&mut self) {
        for p in &self.paths {
            if let Err(err) = std::fs::remove_dir_all(p)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::error!("removing the example file {}: {err}", p.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_without_a_digest_are_named() {
        let yaml = "services:\n  a:\n    image: x/a:v1@sha256:abc\n  b:\n    image: \"x/b:v2\"\n";
        assert_eq!(unpinned_images(yaml), vec!["x/b:v2"]);
    }

    #[test]
    fn the_example_files_are_removed_even_when_the_check_fails() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        {
            let _guard = ExampleFiles::new(tree).unwrap();
            fs_err::create_dir_all(in_tree(tree, omni::DIR)).unwrap();
            fs_err::write(in_tree(tree, omni::OMNI_ENV), "X=1\n").unwrap();
            fs_err::create_dir_all(in_tree(tree, "/var/lib/omni-firstboot")).unwrap();
            fs_err::write(in_tree(tree, omni::ACCOUNT_ID_FILE), "id\n").unwrap();
        }
        assert!(!in_tree(tree, omni::DIR).exists());
        assert!(!in_tree(tree, "/var/lib/omni-firstboot").exists());
        assert!(tree.join("var/lib").exists());
    }

    #[test]
    fn an_overlay_shipping_the_secrets_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs_err::create_dir_all(in_tree(dir.path(), omni::DIR)).unwrap();
        let err = ExampleFiles::new(dir.path()).err().unwrap().to_string();
        assert!(err.contains("/etc/omni already exists"), "{err}");
    }

    #[test]
    fn a_tree_without_compose_is_refused_with_the_package_to_add() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_omni_project(dir.path()).unwrap_err().to_string();
        assert!(err.contains("docker-compose"), "{err}");
    }
}
