//! NoCloud named on the kernel command line: `ds=nocloud;s=file:///path/` (also `seedfrom=`
//! and `ds=nocloud-net`). Only local `file://` seeds are read: the network is not up yet.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::{Env, seeddir::SeedDir};

/// Parses the `ds=` word of a kernel command line into the seed directory it names.
pub fn seed_from_cmdline(cmdline: &str) -> Result<Option<PathBuf>> {
    for word in cmdline.split_whitespace() {
        let Some(value) = word.strip_prefix("ds=") else {
            continue;
        };
        let mut parts = value.split(';');
        let source = parts.next().unwrap_or_default();
        if !matches!(source, "nocloud" | "nocloud-net") {
            continue;
        }
        for option in parts {
            let Some((key, url)) = option.split_once('=') else {
                continue;
            };
            if !matches!(key, "s" | "seedfrom") {
                continue;
            }
            if let Some(path) = url.strip_prefix("file://") {
                return Ok(Some(PathBuf::from(path)));
            }
            if url.starts_with('/') {
                return Ok(Some(PathBuf::from(url)));
            }
            bail!(
                "the kernel command line names the seed `{url}`; only file:// seeds are read \
                 (the network is not up at first boot)"
            );
        }
    }
    Ok(None)
}

pub fn detect(env: &Env) -> Result<Option<SeedDir>> {
    let Ok(text) = std::fs::read_to_string(&env.cmdline) else {
        return Ok(None);
    };
    Ok(seed_from_cmdline(&text)?
        .map(|dir| SeedDir::new(&env.root.join(dir), "kernel command line")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_seeds_are_found_in_the_command_line() {
        let line = "BOOT_IMAGE=/vmlinuz root=/dev/vda2 ds=nocloud;s=file:///srv/seed/ quiet";
        assert_eq!(
            seed_from_cmdline(line).unwrap(),
            Some(PathBuf::from("/srv/seed/"))
        );
        let line = "ds=nocloud;seedfrom=/var/tmp/seed";
        assert_eq!(
            seed_from_cmdline(line).unwrap(),
            Some(PathBuf::from("/var/tmp/seed"))
        );
        assert_eq!(
            seed_from_cmdline("root=/dev/sda1 console=ttyS0").unwrap(),
            None
        );
        assert_eq!(seed_from_cmdline("ds=ec2").unwrap(), None);
    }

    #[test]
    fn network_seeds_are_refused_with_a_reason() {
        let err = seed_from_cmdline("ds=nocloud-net;s=http://10.0.0.1/seed/").unwrap_err();
        assert!(err.to_string().contains("only file://"), "{err}");
    }
}
