//! Step 3: the first-boot agent, built from this workspace, installed with its unit enabled;
//! then the recipe's services enabled or disabled with the image's own `systemctl`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::exec::Cmd;
use crate::recipe::Recipe;

/// Where the builder records which appliance an image is; the agent reads it.
pub const APPLIANCE_FILE: &str = "etc/omni-image/appliance";

/// The agent binary: `--firstboot PATH`, else the `omni-firstboot` next to this program
/// (where `cargo build` puts both).
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.exists() {
            bail!("--firstboot: {} does not exist", p.display());
        }
        let elf = std::fs::File::open(p).and_then(|mut f| {
            use std::io::Read;
            let mut magic = [0u8; 4];
            f.read_exact(&mut magic).map(|_| magic == *b"\x7fELF")
        });
        if !p.is_file() || !matches!(elf, Ok(true)) {
            bail!(
                "--firstboot: {} is not a program (an ELF executable); pass the omni-firstboot \
                 binary, e.g. target/release/omni-firstboot",
                p.display()
            );
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let sibling = exe.with_file_name("omni-firstboot");
    if sibling.is_file() {
        return Ok(sibling);
    }
    bail!(
        "the first-boot agent is not next to {} (looked for {}): build it with `cargo build \
         --release -p omni-firstboot`, or pass --firstboot PATH",
        exe.display(),
        sibling.display()
    )
}

pub fn install(tree: &Path, agent: &Path, recipe: &Recipe, epoch: i64) -> Result<()> {
    let bin = tree.join(omni_firstboot::INSTALL_PATH.trim_start_matches('/'));
    fs_err::create_dir_all(bin.parent().expect("install path has a folder"))?;
    fs_err::copy(agent, &bin).context("installing the first-boot agent")?;
    set_mode(&bin, 0o755)?;
    super::overlay::set_mtime(&bin, epoch)?;

    let unit = tree.join("usr/lib/systemd/system/omni-firstboot.service");
    fs_err::write(&unit, omni_firstboot::SYSTEMD_UNIT)?;
    set_mode(&unit, 0o644)?;
    super::overlay::set_mtime(&unit, epoch)?;

    let marker = tree.join(APPLIANCE_FILE);
    fs_err::create_dir_all(marker.parent().expect("marker has a folder"))?;
    let appliance = recipe.appliance.map(|a| a.as_str()).unwrap_or("none");
    fs_err::write(&marker, format!("{appliance}\n"))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    Ok(fs_err::set_permissions(
        path,
        std::fs::Permissions::from_mode(mode),
    )?)
}

/// Enables the agent and the recipe's services, and disables what the recipe turns off,
/// with the tree's own `systemctl` run offline in a chroot (it only writes links).
pub fn services(tree: &Path, recipe: &Recipe) -> Result<()> {
    let mut enable = vec!["omni-firstboot.service".to_owned()];
    enable.extend(recipe.services.enable.iter().cloned());
    systemctl(tree, "enable", &enable)?;
    for (unit, program) in missing_programs(tree, &enable) {
        tracing::warn!(
            "services: {unit} runs {program}, which is not in the image, so it will not start; \
             is the artifact or package that provides it switched off?"
        );
    }
    if !recipe.services.disable.is_empty() {
        systemctl(tree, "disable", &recipe.services.disable)?;
    }
    if !recipe.services.mask.is_empty() {
        systemctl(tree, "mask", &recipe.services.mask)?;
    }
    Ok(())
}

/// The enabled services whose `ExecStart=` program is not in the tree, as (unit, program).
pub fn missing_programs(tree: &Path, units: &[String]) -> Vec<(String, String)> {
    let resolve =
        |p: &str| super::overlay::resolve_in_root(tree, Path::new(p.trim_start_matches('/')));
    let mut out = Vec::new();
    for unit in units.iter().filter(|u| u.ends_with(".service")) {
        let text = ["etc/systemd/system", "usr/lib/systemd/system"]
            .iter()
            .filter_map(|dir| resolve(&format!("{dir}/{unit}")).ok())
            .find_map(|p| std::fs::read_to_string(p).ok());
        let Some(text) = text else { continue };
        for line in text.lines() {
            let Some(value) = line.trim().strip_prefix("ExecStart=") else {
                continue;
            };
            let program = value
                .trim_start_matches(['-', '@', ':', '+', '!'])
                .split_whitespace()
                .next()
                .unwrap_or_default();
            if !program.starts_with('/') {
                continue;
            }
            let present = resolve(program).is_ok_and(|p| p.symlink_metadata().is_ok());
            if !present {
                out.push((unit.clone(), program.to_owned()));
            }
        }
    }
    out
}

fn systemctl(tree: &Path, verb: &str, units: &[String]) -> Result<()> {
    Cmd::new("chroot")
        .arg(tree)
        .args(["systemctl", "--no-reload", verb])
        .args(units)
        .output()
        .with_context(|| format!("services: systemctl {verb} {}", units.join(" ")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_whose_program_is_missing_are_named() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let units = root.join("usr/lib/systemd/system");
        fs_err::create_dir_all(&units).unwrap();
        fs_err::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        fs_err::write(root.join("usr/bin/present"), "").unwrap();
        fs_err::write(
            units.join("tsidp.service"),
            "[Service]\nExecStart=/usr/local/bin/tsidp -dir %S/tsidp\n",
        )
        .unwrap();
        fs_err::write(
            units.join("ok.service"),
            "[Service]\nExecStartPre=/usr/bin/true\nExecStart=-/bin/present --flag\n",
        )
        .unwrap();
        let all = ["tsidp.service", "ok.service", "gone.service", "x.path"].map(String::from);
        assert_eq!(
            missing_programs(root, &all),
            [(
                "tsidp.service".to_owned(),
                "/usr/local/bin/tsidp".to_owned()
            )]
        );
    }
}
