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
    /// Absent in manifests of builds that did not record their files.
    #[serde(default)]
    files: Option<BTreeMap<String, String>>,
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

/// How one path differs between two file lists.
#[derive(Debug, PartialEq, Eq)]
pub enum FileChange {
    Added,
    Removed,
    /// What changed: any of `kind`, `content`, `mode`, `owner`, `target`.
    Changed(Vec<&'static str>),
}

/// The paths that differ between two file lists (see `build::manifest::file_list`), in path
/// order.
pub fn files<'a>(
    old: &'a BTreeMap<String, String>,
    new: &'a BTreeMap<String, String>,
) -> Vec<(&'a str, FileChange)> {
    let mut out = Vec::new();
    for (path, was) in old {
        match new.get(path) {
            None => out.push((path.as_str(), FileChange::Removed)),
            Some(is) if is != was => out.push((path.as_str(), FileChange::Changed(what(was, is)))),
            Some(_) => {}
        }
    }
    for path in new.keys().filter(|p| !old.contains_key(*p)) {
        out.push((path.as_str(), FileChange::Added));
    }
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

fn what(was: &str, is: &str) -> Vec<&'static str> {
    let (a, b): (Vec<&str>, Vec<&str>) = (was.split(' ').collect(), is.split(' ').collect());
    if a[0] != b[0] {
        return vec!["kind"];
    }
    if a[0] == "l" {
        return vec!["target"];
    }
    let mut out = Vec::new();
    if a.get(1) != b.get(1) {
        out.push("mode");
    }
    if a.get(2) != b.get(2) {
        out.push("owner");
    }
    if a.get(3..) != b.get(3..) {
        out.push("content");
    }
    out
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
    let changed_files = match (&old.files, &new.files) {
        (Some(o), Some(n)) => {
            let changes = files(o, n);
            for (path, change) in &changes {
                match change {
                    FileChange::Added => println!("+f {path}"),
                    FileChange::Removed => println!("-f {path}"),
                    FileChange::Changed(what) => println!("~f {path} ({})", what.join(", ")),
                }
            }
            Some(changes.len())
        }
        _ => {
            let without = if old.files.is_none() {
                &args.old
            } else {
                &args.new
            };
            eprintln!(
                "{} records no file list (built by an older omni-image): files not compared",
                without.display()
            );
            None
        }
    };
    let sha = |m: &Manifest| {
        m.outputs
            .first()
            .and_then(|o| o["sha256"].as_str().map(str::to_owned))
    };
    if sha(&old) == sha(&new) && sha(&old).is_some() {
        println!("images are identical");
    }
    eprintln!(
        "packages: {} added, {} removed, {} upgraded or downgraded{}",
        added.len(),
        removed.len(),
        changed.len(),
        changed_files
            .map(|n| format!("; {n} paths added, removed or changed"))
            .unwrap_or_default()
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
    fn names_each_changed_path_and_what_changed() {
        let list = |entries: &[(&str, &str)]| -> BTreeMap<String, String> {
            entries
                .iter()
                .map(|(p, w)| (p.to_string(), w.to_string()))
                .collect()
        };
        let old = list(&[
            ("/etc", "d 0755 0:0"),
            ("/etc/motd", "f 0644 0:0 5 aa"),
            ("/etc/shadow", "f 0640 0:42 100 bb"),
            ("/usr/bin/old", "f 0755 0:0 9 cc"),
            ("/usr/lib/os-release", "l ../os-release"),
            ("/same", "f 0644 0:0 1 dd"),
        ]);
        let new = list(&[
            ("/etc", "d 0755 0:0"),
            ("/etc/motd", "f 0644 0:0 6 ab"),
            ("/etc/shadow", "f 0600 0:0 100 bb"),
            ("/usr/bin/new", "f 0755 0:0 9 cc"),
            ("/usr/lib/os-release", "f 0644 0:0 1 ee"),
            ("/same", "f 0644 0:0 1 dd"),
        ]);
        assert_eq!(
            files(&old, &new),
            [
                ("/etc/motd", FileChange::Changed(vec!["content"])),
                ("/etc/shadow", FileChange::Changed(vec!["mode", "owner"])),
                ("/usr/bin/new", FileChange::Added),
                ("/usr/bin/old", FileChange::Removed),
                ("/usr/lib/os-release", FileChange::Changed(vec!["kind"])),
            ]
        );
        assert!(files(&old, &old).is_empty());
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
