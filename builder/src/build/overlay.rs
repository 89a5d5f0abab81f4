//! Step 2: overlays, folders of files laid over the tree in recipe order.
//!
//! - files are copied with their permission bits; files named `*.tera` are rendered with the
//!   recipe's variables and written without the suffix;
//! - symbolic links are copied as links (they are read inside the image);
//! - owners are not copied: everything an overlay adds belongs to root;
//! - folders that already exist in the tree keep their mode, new ones take the overlay's;
//! - every destination is resolved inside the tree, following the tree's own links the way
//!   the booted system would: a path that would land outside the tree is an error.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::recipe::Overlay;

/// How many links a path may pass through before it is taken for a loop (as Linux does).
const MAX_LINKS: usize = 40;

#[derive(Debug, Default)]
pub struct Applied {
    pub files: usize,
    pub rendered: usize,
}

pub fn apply(
    tree: &Path,
    overlays: &[Overlay],
    vars: &BTreeMap<String, serde_json::Value>,
    epoch: i64,
) -> Result<Applied> {
    let ctx = context(vars);
    let mut applied = Applied::default();
    for overlay in overlays {
        apply_one(tree, overlay, &ctx, epoch, &mut applied)
            .with_context(|| format!("applying overlay {}", overlay.path.display()))?;
    }
    Ok(applied)
}

fn context(vars: &BTreeMap<String, serde_json::Value>) -> tera::Context {
    let mut ctx = tera::Context::new();
    for (k, v) in vars {
        ctx.insert(k.clone(), v);
    }
    ctx
}

/// Renders the template at `path` (`rel` without `.tera`, as it lands in the image).
fn render(path: &Path, rel: &Path, ctx: &tera::Context) -> Result<String> {
    let text = fs_err::read_to_string(path)?;
    let mut tera = tera::Tera::default();
    let name = rel.display().to_string();
    tera.add_raw_template(&name, &text)
        .and_then(|_| tera.render(&name, ctx))
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
        .with_context(|| format!("rendering template {}", path.display()))
}

/// Renders every template of the overlays without writing anything, so that a template
/// error is reported before the bootstrap rather than after it. Returns how many there are.
pub fn check_templates(
    overlays: &[Overlay],
    vars: &BTreeMap<String, serde_json::Value>,
) -> Result<usize> {
    let ctx = context(vars);
    let mut n = 0;
    for overlay in overlays {
        for entry in walkdir::WalkDir::new(&overlay.path).sort_by_file_name() {
            let entry =
                entry.with_context(|| format!("reading overlay {}", overlay.path.display()))?;
            let path = entry.path();
            if entry.file_type().is_file() && path.extension().is_some_and(|e| e == "tera") {
                let rel = path
                    .strip_prefix(&overlay.path)
                    .unwrap_or(path)
                    .with_extension("");
                render(path, &rel, &ctx)
                    .with_context(|| format!("applying overlay {}", overlay.path.display()))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn apply_one(
    tree: &Path,
    overlay: &Overlay,
    ctx: &tera::Context,
    epoch: i64,
    applied: &mut Applied,
) -> Result<()> {
    let walk = walkdir::WalkDir::new(&overlay.path)
        .min_depth(1)
        .sort_by_file_name();
    for entry in walk {
        crate::interrupt::check()?;
        let entry = entry?;
        let rel = entry
            .path()
            .strip_prefix(&overlay.path)
            .expect("walk stays below its root");
        let meta = entry.path().symlink_metadata()?;
        let mut rel = rel.to_path_buf();
        let template = meta.is_file() && rel.extension().is_some_and(|e| e == "tera");
        if template {
            rel.set_extension("");
        }
        let dest = resolve_in_root(tree, &rel)
            .with_context(|| format!("placing {}", entry.path().display()))?;
        let mode = meta.permissions().mode() & 0o7777;

        if meta.file_type().is_symlink() {
            let target = fs_err::read_link(entry.path())?;
            remove_existing(&dest)?;
            std::os::unix::fs::symlink(&target, &dest)
                .with_context(|| format!("linking {}", dest.display()))?;
        } else if meta.is_dir() {
            if !dest.is_dir() {
                fs_err::create_dir(&dest)?;
                fs_err::set_permissions(&dest, PermissionsExt::from_mode(mode))?;
            }
        } else if meta.is_file() {
            remove_existing(&dest)?;
            if template {
                let out = render(entry.path(), &rel, ctx)?;
                fs_err::write(&dest, out)?;
                applied.rendered += 1;
            } else {
                fs_err::copy(entry.path(), &dest)?;
            }
            fs_err::set_permissions(&dest, PermissionsExt::from_mode(mode))?;
            set_mtime(&dest, epoch)?;
            applied.files += 1;
        } else {
            bail!(
                "{} is neither a file, a folder nor a link",
                entry.path().display()
            );
        }
    }
    Ok(())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        src = e.source();
    }
    msg
}

fn remove_existing(dest: &Path) -> Result<()> {
    match dest.symlink_metadata() {
        Ok(m) if m.is_dir() => bail!(
            "{} is a folder in the tree; the overlay has a file there",
            dest.display()
        ),
        Ok(_) => Ok(fs_err::remove_file(dest)?),
        Err(_) => Ok(()),
    }
}

pub fn set_mtime(path: &Path, epoch: i64) -> Result<()> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch.max(0) as u64);
    let f = fs_err::File::options().write(true).open(path)?;
    f.set_modified(t)
        .with_context(|| format!("setting the time of {}", path.display()))?;
    Ok(())
}

/// Resolves `rel` inside `root` as if `root` were `/`: links in the tree are followed, an
/// absolute link target starts again at `root`, and `..` never climbs above `root`. The last
/// component is not followed (it is what gets written). Fails when the path would leave the
/// root.
pub fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    for c in rel.components().rev() {
        match c {
            Component::Normal(n) => pending.push(n.to_owned()),
            Component::ParentDir => pending.push("..".into()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                bail!(
                    "{} is absolute: overlay paths are relative to the root",
                    rel.display()
                )
            }
        }
    }
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            if resolved.pop().is_none() {
                bail!("{} would land outside the image's root", rel.display());
            }
            continue;
        }
        let last = pending.is_empty();
        let candidate: PathBuf = std::iter::once(root.as_os_str().to_owned())
            .chain(resolved.iter().cloned())
            .chain(std::iter::once(part.clone()))
            .collect();
        match candidate.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() && !last => {
                links += 1;
                if links > MAX_LINKS {
                    bail!("{} passes through too many links", rel.display());
                }
                let target = fs_err::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(std::iter::once(root.as_os_str().to_owned())
        .chain(resolved)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn overlay(path: &Path) -> Overlay {
        Overlay {
            name: path.display().to_string(),
            path: path.to_path_buf(),
        }
    }

    fn vars() -> BTreeMap<String, serde_json::Value> {
        let mut v = BTreeMap::new();
        v.insert("hostname".into(), serde_json::json!("tsidp"));
        v.insert("port".into(), serde_json::json!(443));
        v
    }

    #[test]
    fn copies_files_keeps_modes_and_renders_templates() {
        let t = tempfile::tempdir().unwrap();
        let (tree, ov) = (t.path().join("tree"), t.path().join("ov"));
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::create_dir_all(ov.join("etc/app")).unwrap();
        std::fs::create_dir_all(ov.join("usr/local/bin")).unwrap();
        std::fs::write(
            ov.join("etc/app/app.conf.tera"),
            "host={{ hostname }}:{{ port }}\n",
        )
        .unwrap();
        std::fs::write(ov.join("usr/local/bin/tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            ov.join("usr/local/bin/tool"),
            PermissionsExt::from_mode(0o750),
        )
        .unwrap();
        std::fs::write(ov.join("etc/secret"), "x").unwrap();
        std::fs::set_permissions(ov.join("etc/secret"), PermissionsExt::from_mode(0o600)).unwrap();
        symlink("/usr/local/bin/tool", ov.join("etc/tool-link")).unwrap();

        let done = apply(&tree, &[overlay(&ov)], &vars(), 1_700_000_000).unwrap();
        assert_eq!(done.rendered, 1);
        assert_eq!(
            std::fs::read_to_string(tree.join("etc/app/app.conf")).unwrap(),
            "host=tsidp:443\n"
        );
        assert!(!tree.join("etc/app/app.conf.tera").exists());
        let mode = |p: &str| {
            std::fs::metadata(tree.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("usr/local/bin/tool"), 0o750);
        assert_eq!(mode("etc/secret"), 0o600);
        assert_eq!(
            std::fs::read_link(tree.join("etc/tool-link")).unwrap(),
            Path::new("/usr/local/bin/tool")
        );
        let mtime = std::fs::metadata(tree.join("etc/secret")).unwrap().mtime();
        assert_eq!(mtime, 1_700_000_000);
    }

    #[test]
    fn later_overlays_win() {
        let t = tempfile::tempdir().unwrap();
        let (tree, a, b) = (
            t.path().join("tree"),
            t.path().join("a"),
            t.path().join("b"),
        );
        for d in [&tree, &a, &b] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(a.join("motd"), "a").unwrap();
        std::fs::write(b.join("motd"), "b").unwrap();
        apply(&tree, &[overlay(&a), overlay(&b)], &vars(), 0).unwrap();
        assert_eq!(std::fs::read_to_string(tree.join("motd")).unwrap(), "b");
    }

    #[test]
    fn a_link_in_the_tree_cannot_lead_outside() {
        let t = tempfile::tempdir().unwrap();
        let (tree, ov, outside) = (
            t.path().join("tree"),
            t.path().join("ov"),
            t.path().join("outside"),
        );
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(tree.join("var")).unwrap();
        std::fs::create_dir_all(ov.join("var/run")).unwrap();
        std::fs::write(ov.join("var/run/pid"), "1").unwrap();
        // A relative link that climbs out of the tree.
        symlink("../../outside", tree.join("var/run")).unwrap();
        let err = format!(
            "{:#}",
            apply(&tree, &[overlay(&ov)], &vars(), 0).unwrap_err()
        );
        assert!(err.contains("outside the image's root"), "{err}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn absolute_links_are_followed_inside_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let (tree, ov) = (t.path().join("tree"), t.path().join("ov"));
        std::fs::create_dir_all(tree.join("run")).unwrap();
        std::fs::create_dir_all(tree.join("var")).unwrap();
        symlink("/run", tree.join("var/run")).unwrap();
        std::fs::create_dir_all(ov.join("var/run")).unwrap();
        std::fs::write(ov.join("var/run/marker"), "m").unwrap();
        apply(&tree, &[overlay(&ov)], &vars(), 0).unwrap();
        assert!(tree.join("run/marker").is_file());
    }

    #[test]
    fn resolve_rejects_parent_escape() {
        let t = tempfile::tempdir().unwrap();
        assert!(resolve_in_root(t.path(), Path::new("../etc/passwd")).is_err());
        assert!(resolve_in_root(t.path(), Path::new("a/../../b")).is_err());
        assert_eq!(
            resolve_in_root(t.path(), Path::new("a/../b")).unwrap(),
            t.path().join("b")
        );
    }

    #[test]
    fn template_errors_name_the_file_and_variable() {
        let t = tempfile::tempdir().unwrap();
        let (tree, ov) = (t.path().join("tree"), t.path().join("ov"));
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::create_dir_all(&ov).unwrap();
        std::fs::write(ov.join("x.conf.tera"), "{{ missing_var }}").unwrap();
        let err = format!(
            "{:#}",
            apply(&tree, &[overlay(&ov)], &vars(), 0).unwrap_err()
        );
        assert!(err.contains("x.conf.tera"), "{err}");
        assert!(err.contains("missing_var"), "{err}");
        assert!(!tree.join("x.conf").exists());
        // The same error, from the check that runs before the bootstrap.
        let early = format!(
            "{:#}",
            check_templates(&[overlay(&ov)], &vars()).unwrap_err()
        );
        assert!(
            early.contains("x.conf.tera") && early.contains("missing_var"),
            "{early}"
        );
        std::fs::write(ov.join("x.conf.tera"), "ok").unwrap();
        assert_eq!(check_templates(&[overlay(&ov)], &vars()).unwrap(), 1);
    }
}
