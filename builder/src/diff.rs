//! `omni-image diff OLD.manifest.json NEW.manifest.json`: what a new build changes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The manifest of the older build.
    pub old: PathBuf,
    /// The manifest of the newer build.
    pub new: PathBuf,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    name: String,
    #[serde(default)]
    recipe_hash: String,
    #[serde(default)]
    kernel: String,
    #[serde(default)]
    archive: Option<serde_json::Value>,
    packages: Vec<Package>,
    #[serde(default)]
    outputs: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Package {
    name: String,
    version: String,
    #[serde(default)]
    architecture: String,
}

fn read(path: &PathBuf) -> Result<Manifest> {
    let bytes = fs_err::read(path)?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an omni-image manifest", path.display()))
}

/// The changes between two package lists: (added, removed, changed as (name, old, new)).
pub type PackageChanges = (
    Vec<(String, String)>,
    Vec<(String, String)>,
    Vec<(String, String, String)>,
);

fn packages(old: &[Package], new: &[Package]) -> PackageChanges {
    let index = |p: &[Package]| -> BTreeMap<String, String> {
        p.iter()
            .map(|p| {
                let key = if p.architecture.is_empty()
                    || p.architecture == "amd64"
                    || p.architecture == "all"
                {
                    p.name.clone()
                } else {
                    format!("{}:{}", p.name, p.architecture)
                };
                (key, p.version.clone())
            })
            .collect()
    };
    let (o, n) = (index(old), index(new));
    let added = n
        .iter()
        .filter(|(k, _)| !o.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let removed = o
        .iter()
        .filter(|(k, _)| !n.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let changed = n
        .iter()
        .filter_map(|(k, v)| {
            o.get(k)
                .filter(|ov| *ov != v)
                .map(|ov| (k.clone(), ov.clone(), v.clone()))
        })
        .collect();
    (added, removed, changed)
}

pub fn run(args: &DiffArgs) -> Result<()> {
    let (old, new) = (read(&args.old)?, read(&args.new)?);
    println!("{} -> {}", old.name, new.name);
    if old.recipe_hash != new.recipe_hash {
        println!(
            "recipe changed ({} -> {})",
            short(&old.recipe_hash),
            short(&new.recipe_hash)
        );
    }
    if old.kernel != new.kernel {
        println!("kernel {} -> {}", old.kernel, new.kernel);
    }
    let date = |m: &Manifest| {
        m.archive
            .as_ref()
            .and_then(|a| a["inrelease_date"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    if date(&old) != date(&new) {
        println!("archive {} -> {}", date(&old), date(&new));
    }
    let (added, removed, changed) = packages(&old.packages, &new.packages);
    for (n, v) in &added {
        println!("+ {n} {v}");
    }
    for (n, v) in &removed {
        println!("- {n} {v}");
    }
    for (n, a, b) in &changed {
        println!("~ {n} {a} -> {b}");
    }
    let sha = |m: &Manifest| {
        m.outputs
            .first()
            .and_then(|o| o["sha256"].as_str().map(str::to_owned))
    };
    if sha(&old) == sha(&new) && sha(&old).is_some() {
        println!("images are identical");
    }
    eprintln!(
        "{} added, {} removed, {} upgraded or downgraded",
        added.len(),
        removed.len(),
        changed.len()
    );
    Ok(())
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
        }
    }

    #[test]
    fn finds_added_removed_and_upgraded() {
        let old = [p("libc6", "2.41-11"), p("less", "668-1"), p("sudo", "1.9")];
        let new = [
            p("libc6", "2.41-12"),
            p("sudo", "1.9"),
            p("docker.io", "26.1"),
        ];
        let (a, r, c) = packages(&old, &new);
        assert_eq!(a, [("docker.io".to_owned(), "26.1".to_owned())]);
        assert_eq!(r, [("less".to_owned(), "668-1".to_owned())]);
        assert_eq!(
            c,
            [(
                "libc6".to_owned(),
                "2.41-11".to_owned(),
                "2.41-12".to_owned()
            )]
        );
    }
}
