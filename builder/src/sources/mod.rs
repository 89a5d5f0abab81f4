//! Where an image's contents come from, and why they are trusted.
//!
//! Before anything is bootstrapped, every source a recipe names is fetched and checked:
//! - the base archive's `InRelease` is verified against `base.keyring`;
//! - each extra repository's key is fetched from its `key-url` and kept only if its primary
//!   fingerprint is the pinned one; the repository's `InRelease` is verified against that
//!   key alone, which becomes the repository's `signed-by` keyring;
//! - each artifact is taken from the cache (`<cache>/artifacts/<sha256>`) or downloaded and
//!   kept there once its sha256 matched the pin.
//!
//! A failed check stops the build with an error that names the source, the URL and what is
//! wrong. Apt then verifies the same archives again while it installs, and refuses any
//! package whose hash is not the one the signed index names.

pub mod artifact;
pub mod fetch;
pub mod openpgp;
pub mod repository;

use std::path::Path;

use anyhow::Result;

use crate::recipe::Recipe;
use repository::VerifiedArchive;

/// Every source of a recipe, checked.
#[derive(Debug)]
pub struct Sources {
    pub base: VerifiedArchive,
    pub repositories: Vec<repository::Prepared>,
    pub artifacts: Vec<artifact::Fetched>,
}

impl Sources {
    /// Every archive, base first, as the manifest records them.
    pub fn archives(&self) -> Vec<VerifiedArchive> {
        std::iter::once(self.base.clone())
            .chain(self.repositories.iter().map(|r| r.archive.clone()))
            .collect()
    }
}

/// Fetches and checks every source; keyrings for the bootstrap go to `scratch`.
pub fn prepare(recipe: &Recipe, scratch: &Path, cache: &Path) -> Result<Sources> {
    let base = crate::build::bootstrap::verify_base(recipe)?;
    let repositories = recipe
        .repositories
        .iter()
        .map(|r| repository::prepare(r, scratch))
        .collect::<Result<_>>()?;
    let artifacts = recipe
        .artifacts
        .iter()
        .map(|a| artifact::fetch(a, cache))
        .collect::<Result<_>>()?;
    Ok(Sources {
        base,
        repositories,
        artifacts,
    })
}
