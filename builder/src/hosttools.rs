//! The external tools each command needs, and the Debian package that brings each one.
//! Commands check before they start work, so a missing tool costs no time.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::exec::Cmd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Purpose {
    Build,
    Boot,
    Seed,
    /// What this project's own test suite uses besides the above.
    Test,
}

/// Something on the host: a program looked up on `PATH` (and the sbin folders), or a file.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    Program(&'static str),
    File(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub need: Need,
    pub package: &'static str,
    pub purposes: &'static [Purpose],
}

use Need::{File, Program};
use Purpose::{Boot, Build, Seed, Test};

pub const TOOLS: &[Tool] = &[
    Tool {
        need: Program("mmdebstrap"),
        package: "mmdebstrap",
        purposes: &[Build],
    },
    Tool {
        need: Program("mkfs.ext4"),
        package: "e2fsprogs",
        purposes: &[Build],
    },
    Tool {
        need: Program("qemu-img"),
        package: "qemu-utils",
        purposes: &[Build],
    },
    Tool {
        need: Program("qemu-system-x86_64"),
        package: "qemu-system-x86",
        purposes: &[Boot],
    },
    Tool {
        need: File(crate::boot::OVMF_CODE),
        package: "ovmf",
        purposes: &[Boot],
    },
    Tool {
        need: File(crate::boot::OVMF_VARS),
        package: "ovmf",
        purposes: &[Boot],
    },
    Tool {
        need: Program("genisoimage"),
        package: "genisoimage",
        purposes: &[Seed, Test],
    },
    Tool {
        need: Program("chroot"),
        package: "coreutils",
        purposes: &[Build],
    },
    // A command in the tree that needs /dev/null gets it bound in a mount namespace of its
    // own.
    Tool {
        need: Program("unshare"),
        package: "util-linux",
        purposes: &[Build],
    },
    Tool {
        need: Program("mount"),
        package: "mount",
        purposes: &[Build],
    },
    Tool {
        need: Program("sfdisk"),
        package: "fdisk",
        purposes: &[Test],
    },
    Tool {
        need: Program("mdir"),
        package: "mtools",
        purposes: &[Test],
    },
    Tool {
        need: Program("mkfs.vfat"),
        package: "dosfstools",
        purposes: &[Test],
    },
    Tool {
        need: Program("xorriso"),
        package: "xorriso",
        purposes: &[Test],
    },
    Tool {
        need: Program("curl"),
        package: "curl",
        purposes: &[Test],
    },
    Tool {
        need: Program("qemu-system-x86_64"),
        package: "qemu-system-x86",
        purposes: &[Test],
    },
    Tool {
        need: File(crate::boot::OVMF_CODE),
        package: "ovmf",
        purposes: &[Test],
    },
    // The tests build once as an unprivileged user too.
    Tool {
        need: Program("newuidmap"),
        package: "uidmap",
        purposes: &[Test],
    },
];

/// Tools needed only when building without root: the build's user namespace is given its
/// ids by `newuidmap`/`newgidmap` (mmdebstrap's unshare mode also runs `unshare`).
const UNPRIVILEGED: &[Tool] = &[
    Tool {
        need: Program("newuidmap"),
        package: "uidmap",
        purposes: &[Build],
    },
    Tool {
        need: Program("newgidmap"),
        package: "uidmap",
        purposes: &[Build],
    },
];

/// Finds a program the way a root shell would: `PATH`, then the sbin folders, which a
/// normal user's `PATH` often lacks although mkfs tools work without root.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn present(need: Need) -> bool {
    match need {
        Program(name) => find_program(name).is_some(),
        File(path) => Path::new(path).is_file(),
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn wanted(purpose: Option<Purpose>) -> impl Iterator<Item = &'static Tool> {
    let extra = if is_root() { &[][..] } else { UNPRIVILEGED };
    TOOLS
        .iter()
        .chain(extra)
        .filter(move |t| purpose.is_none_or(|p| t.purposes.contains(&p)))
}

/// The Debian packages that bring the missing tools, in table order, without repeats.
pub fn missing_packages(purpose: Option<Purpose>) -> Vec<(&'static str, Vec<String>)> {
    let mut out: Vec<(&'static str, Vec<String>)> = Vec::new();
    for tool in wanted(purpose).filter(|t| !present(t.need)) {
        let what = match tool.need {
            Program(p) => p.to_string(),
            File(f) => f.to_string(),
        };
        match out.iter_mut().find(|(pkg, _)| *pkg == tool.package) {
            Some((_, whats)) if !whats.contains(&what) => whats.push(what),
            Some(_) => {}
            None => out.push((tool.package, vec![what])),
        }
    }
    out
}

fn install_line(packages: &[&str]) -> String {
    let sudo = if is_root() { "" } else { "sudo " };
    format!(
        "{sudo}apt-get install --no-install-recommends {}",
        packages.join(" ")
    )
}

/// Fails, naming every missing tool and one line that installs them all.
pub fn check(purpose: Purpose) -> Result<()> {
    let missing = missing_packages(Some(purpose));
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(pkg, whats)| format!("{} (package {pkg})", whats.join(", ")))
        .collect();
    let packages: Vec<&str> = missing.iter().map(|(pkg, _)| *pkg).collect();
    anyhow::bail!(
        "missing host tools: {}\n  install them with: {}\n  or run: omni-image setup --install",
        list.join("; "),
        install_line(&packages)
    )
}

/// `omni-image setup`: reports what is missing and, with `--install`, installs it.
pub fn setup(purpose: Option<Purpose>, install: bool) -> Result<()> {
    let missing = missing_packages(purpose);
    if missing.is_empty() {
        eprintln!("all host tools are installed");
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(pkg, _)| *pkg).collect();
    if !install {
        for (pkg, whats) in &missing {
            eprintln!("missing: {} (package {pkg})", whats.join(", "));
        }
        anyhow::bail!("install them with: {}", install_line(&packages));
    }
    if !is_root() {
        anyhow::bail!(
            "installing packages needs root: run `{}` or `sudo omni-image setup --install`",
            install_line(&packages)
        );
    }
    if find_program("apt-get").is_none() {
        anyhow::bail!(
            "this host has no apt-get: install the equivalents of these Debian packages: {}",
            packages.join(" ")
        );
    }
    eprintln!("installing: {}", packages.join(" "));
    // A fresh host may have no package lists yet.
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["update", "-q"])
        .run_lines(|line| tracing::debug!("  {line}"))
        .context("apt-get update")?;
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&packages)
        .run_lines(|line| eprintln!("  {line}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_names_a_package_and_a_purpose() {
        for tool in TOOLS.iter().chain(UNPRIVILEGED) {
            assert!(!tool.package.is_empty());
            assert!(!tool.purposes.is_empty());
        }
    }

    #[test]
    fn finds_sh_and_not_a_made_up_tool() {
        assert!(find_program("sh").is_some());
        assert!(find_program("omni-image-no-such-tool").is_none());
    }
}
