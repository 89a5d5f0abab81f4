//! The first-boot agent of omni-image appliances.
//!
//! `omni-firstboot` reads the cloud-init data that Proxmox VE (or any NoCloud seed) supplies
//! and applies it before the network and the appliance's services start: hostname, users,
//! SSH keys, SSH host keys, machine id, network, `write_files`, and the appliance's secrets.
//! It runs once per instance and takes a fraction of a second.
//!
//! # Inputs
//! Datasources, in order ([`datasource::discover`]): `ds=nocloud;s=file:///dir/` on the
//! kernel command line; `/var/lib/cloud/seed/nocloud/`; a filesystem labelled `cidata` (ISO
//! 9660 as Proxmox writes it, or vfat); a `config-2` configdrive. They are read in userspace,
//! from devices or image files, never mounted.
//!
//! # The image contract
//! - [`appliance::MARKER`] (`/etc/omni-image/appliance`) holds `tsidp` or `omni`; without it
//!   the image is a plain one and the secrets section is not applied.
//! - `/etc/machine-id` ships empty (or `uninitialized`); the SSH host keys may be absent.
//! - The secrets section `omni_appliance:` of user-data lands in:
//!   - tsidp: [`appliance::tsidp::ENV_FILE`] (`/etc/default/tsidp`), 0600 root, with
//!     `TAILSCALE_USE_WIP_CODE=1`, `TS_AUTHKEY`, `TSNET_FORCE_LOGIN=1`, `TSIDP_HOSTNAME`. Once
//!     tsidp's state shows a login, the key lines are removed at the next boot.
//!   - omni: files under [`appliance::omni::DIR`] (`/etc/omni/`, 0700), see
//!     [`appliance::omni`].
//!
//!   A file is written only when its secrets are complete and valid, so a service's
//!   `ConditionPathExists=` on it keeps the service stopped otherwise; `omni-firstboot
//!   status` names the missing keys.
//! - State: [`state::FILE`] (`/var/lib/omni-firstboot/state.json`, 0600).

pub mod accounts;
pub mod appliance;
pub mod apply;
pub mod cli;
pub mod config;
pub mod datasource;
pub mod fsutil;
pub mod run;
pub mod state;
pub mod status;

use std::path::Path;

use anyhow::{Context, Result};
use sha1::Digest;

/// Where the builder installs the agent inside an image.
pub const INSTALL_PATH: &str = "/usr/bin/omni-firstboot";

/// The agent's systemd unit, installed as `/usr/lib/systemd/system/omni-firstboot.service`.
pub const SYSTEMD_UNIT: &str = include_str!("../systemd/omni-firstboot.service");

/// The target whose `.wants/` directory enables the unit.
pub const WANTED_BY: &str = "sysinit.target";

/// Printed on the console once the agent has finished; `omni-image boot` waits for it.
pub const READY_MARKER: &str = "omni-firstboot: ready";

/// Logging for journald: no timestamps (the journal adds them), no colours.
pub fn logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OMNI_FIRSTBOOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .try_init();
}

/// What checking a user-data document found.
#[derive(Debug, Default)]
pub struct Check {
    /// Problems that make the document (or a secret in it) unusable.
    pub errors: Vec<String>,
    /// Things that are skipped or left to the image (missing secrets, unknown keys).
    pub warnings: Vec<String>,
}

/// Checks a user-data document as the agent would read it, applying nothing. Messages name
/// keys, never values.
pub fn check_user_data(bytes: &[u8], origin: &str) -> Check {
    let mut check = Check::default();
    match config::userdata::parse(bytes, origin) {
        Err(err) => check.errors.push(format!("{err:#}")),
        Ok(config::userdata::UserData::Skipped(why)) => check.errors.push(why),
        Ok(config::userdata::UserData::Config(c)) => {
            check.warnings.extend(c.warnings.iter().cloned());
            if !c.unimplemented.is_empty() {
                check.warnings.push(format!(
                    "{origin}: keys omni-firstboot does not apply: {}",
                    c.unimplemented.join(", ")
                ));
            }
            for f in &c.write_files {
                if let Err(err) = fsutil::check_target_path(&f.path) {
                    check.errors.push(format!("{origin}: write_files: {err:#}"));
                }
            }
            if let Some(section) = &c.appliance {
                let findings = appliance::check(section);
                check.errors.extend(findings.invalid);
                // At boot an unknown key is only reported; in a seed being written it is
                // most likely a misspelling, and the appliance would come up without it.
                check.errors.extend(findings.unknown.into_iter().map(|k| {
                    format!("{k}: unknown key (misspelled?); the appliance would ignore it")
                }));
                check.warnings.extend(findings.missing.into_iter().map(|k| {
                    format!("{k} is missing: the service that needs it will stay stopped")
                }));
            }
        }
    }
    check
}

/// `omni-firstboot check FILE`.
pub fn check_file(path: &Path) -> Result<i32> {
    let bytes = fs_err::read(path)?;
    let origin = path.display().to_string();
    let check = check_user_data(&bytes, &origin);
    for w in &check.warnings {
        eprintln!("warning: {w}");
    }
    for e in &check.errors {
        eprintln!("error: {e}");
    }
    Ok(if check.errors.is_empty() { 0 } else { 1 })
}

/// The instance id Proxmox computes for a NoCloud drive: the SHA-1 of user-data followed by
/// network-config, in hex.
pub fn instance_id(user_data: &[u8], network_config: &[u8]) -> String {
    let mut hasher = sha1::Sha1::new();
    hasher.update(user_data);
    hasher.update(network_config);
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a user-data file for the builder, with the file named in errors.
pub fn read_user_data(path: &Path) -> Result<Vec<u8>> {
    fs_err::read(path).with_context(|| format!("reading user-data {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(key: &str) -> Vec<String> {
        SYSTEMD_UNIT
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    }

    #[test]
    fn the_unit_is_enabled_where_the_builder_links_it_and_runs_before_the_network() {
        assert_eq!(values("WantedBy"), vec![WANTED_BY]);
        let before = values("Before");
        for unit in [
            "systemd-networkd.service",
            "network-pre.target",
            "ssh.service",
            WANTED_BY,
        ] {
            assert!(before.iter().any(|b| b == unit), "Before= lacks {unit}");
        }
        assert!(values("After").iter().any(|a| a == "local-fs.target"));
        assert_eq!(
            values("ExecStart"),
            vec![INSTALL_PATH.to_owned(), "run".to_owned()]
        );
    }

    #[test]
    fn instance_ids_are_computed_as_proxmox_does() {
        // sha1("user" + "net") as `printf usernet | sha1sum` prints it.
        assert_eq!(
            instance_id(b"user", b"net"),
            "78a3ae3a6ef7246a9290f4f5e97737de99cd2f0e"
        );
    }
}
