//! `omni-image seed`: writes a NoCloud seed ISO the way Proxmox VE writes its cloud-init
//! drive: `user-data`, `meta-data` (instance-id = SHA-1 of user-data + network-config),
//! `network-config`, an empty `vendor-data`, by `genisoimage -iso-level 3 -J -R -V cidata`.
//!
//! The user-data is checked with the first-boot agent's own parser first, so a seed the
//! agent would refuse is never written. The ISO holds secrets: it is written 0600, under a
//! temporary name next to the output, and renamed only once complete.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::exec::Cmd;

#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// The cloud-config (user-data) file, with the appliance's secrets section.
    pub user_data: PathBuf,
    /// Where to write the ISO.
    #[arg(short, long)]
    pub output: PathBuf,
    /// A cloud-init network config (version 1 or 2) to include as `network-config`.
    #[arg(long, value_name = "FILE")]
    pub network_config: Option<PathBuf>,
    /// The instance id; by default computed as Proxmox does, so it changes with the content.
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
}

pub fn run(args: &SeedArgs) -> Result<()> {
    let user_data = fs_err::read(&args.user_data)?;
    let origin = args.user_data.display().to_string();
    if user_data.iter().all(u8::is_ascii_whitespace) {
        bail!(
            "{origin} is empty: a seed's user-data starts with `#cloud-config` and carries the \
             appliance's `omni_appliance:` section (see the README's Appliances section)"
        );
    }

    // Refuse what the agent would refuse; report what it would skip.
    let check = omni_firstboot::check_user_data(&user_data, &origin);
    for warning in &check.warnings {
        tracing::warn!("{warning}");
    }
    if !check.errors.is_empty() {
        bail!(
            "{origin} cannot be used as a seed:\n  {}\nfix it and run `omni-image seed` again",
            check.errors.join("\n  ")
        );
    }

    let network = match &args.network_config {
        Some(path) => {
            let bytes = fs_err::read(path).context("--network-config")?;
            let name = path.display().to_string();
            omni_firstboot::config::network::parse(&bytes, &name)
                .with_context(|| format!("checking the network config {name}"))?;
            Some(bytes)
        }
        None => None,
    };
    let instance_id = match &args.instance_id {
        Some(id) if id.trim().is_empty() || id.contains('\n') => {
            bail!("--instance-id must be one non-empty line")
        }
        Some(id) => id.clone(),
        None => omni_firstboot::instance_id(&user_data, network.as_deref().unwrap_or_default()),
    };

    write_iso(
        &user_data,
        &format!("instance-id: {instance_id}\n"),
        network.as_deref(),
        &args.output,
    )?;
    tracing::info!(
        "wrote {} (instance-id {instance_id})",
        args.output.display()
    );
    Ok(())
}

/// Writes a NoCloud seed ISO at `out` (0600, renamed into place only when complete):
/// `user-data`, `meta-data`, `network-config` when given, and an empty `vendor-data`.
pub fn write_iso(
    user_data: &[u8],
    meta_data: &str,
    network: Option<&[u8]>,
    out: &Path,
) -> Result<()> {
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs_err::create_dir_all(&out_dir)?;
    let staging = tempfile::Builder::new()
        .prefix(".omni-seed-")
        .tempdir_in(&out_dir)
        .with_context(|| format!("creating a staging folder in {}", out_dir.display()))?;
    let files = staging.path().join("files");
    fs_err::create_dir(&files)?;
    fs_err::set_permissions(&files, std::fs::Permissions::from_mode(0o700))?;
    write_private(&files.join("user-data"), user_data)?;
    write_private(&files.join("meta-data"), meta_data.as_bytes())?;
    if let Some(network) = network {
        write_private(&files.join("network-config"), network)?;
    }
    write_private(&files.join("vendor-data"), b"")?;

    // genisoimage keeps the mode of an existing output file: create it 0600 first.
    let iso = staging.path().join("seed.iso");
    write_private(&iso, b"")?;
    iso_command(&iso, &files)?
        .output()
        .context("writing the seed ISO")?;
    fs_err::rename(&iso, out)?;
    Ok(())
}

/// genisoimage as Proxmox calls it; xorriso's genisoimage emulation when only it exists.
fn iso_command(iso: &Path, files: &Path) -> Result<Cmd> {
    let common = [
        "-quiet",
        "-iso-level",
        "3",
        "-J",
        "-R",
        "-V",
        "cidata",
        "-o",
    ];
    if crate::hosttools::find_program("genisoimage").is_some() {
        return Ok(Cmd::new("genisoimage").args(common).arg(iso).arg(files));
    }
    if crate::hosttools::find_program("xorriso").is_some() {
        return Ok(Cmd::new("xorriso")
            .args(["-as", "genisoimage"])
            .args(common)
            .arg(iso)
            .arg(files));
    }
    bail!("neither genisoimage nor xorriso is installed: run `apt-get install genisoimage`")
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use omni_firstboot::datasource;
    use std::os::unix::fs::MetadataExt;

    fn args(dir: &Path, user_data: &str, network: Option<&str>) -> SeedArgs {
        let ud = dir.join("user-data.yaml");
        fs_err::write(&ud, user_data).unwrap();
        let network_config = network.map(|n| {
            let p = dir.join("network.yaml");
            fs_err::write(&p, n).unwrap();
            p
        });
        SeedArgs {
            user_data: ud,
            output: dir.join("out/seed.iso"),
            network_config,
            instance_id: None,
        }
    }

    #[test]
    fn a_seed_reads_back_like_a_proxmox_drive() {
        let dir = tempfile::tempdir().unwrap();
        let ud =
            "#cloud-config\nhostname: vm1\nomni_appliance:\n  tsidp:\n    auth_key: tskey-auth-x\n";
        let net = "version: 2\nethernets:\n  e:\n    match: {macaddress: '52:54:00:00:00:01'}\n    \
                   dhcp4: true\n";
        let a = args(dir.path(), ud, Some(net));
        run(&a).unwrap();
        assert_eq!(fs_err::metadata(&a.output).unwrap().mode() & 0o777, 0o600);
        let seed = datasource::explicit(&a.output).unwrap().read().unwrap();
        assert_eq!(seed.user_data.as_deref(), Some(ud.as_bytes()));
        let id = omni_firstboot::instance_id(ud.as_bytes(), net.as_bytes());
        assert_eq!(
            seed.meta_data.unwrap(),
            format!("instance-id: {id}\n").into_bytes()
        );
        assert_eq!(seed.network.unwrap().1, net.as_bytes());
        assert_eq!(seed.vendor_data.as_deref(), Some(&b""[..]));
        // Nothing is left behind but the ISO.
        let left: Vec<_> = fs_err::read_dir(a.output.parent().unwrap())
            .unwrap()
            .collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn bad_user_data_writes_no_iso_and_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ud = "#cloud-config\nomni_appliance:\n  omni:\n    oidc:\n      \
                  issuer: http://idp\n      client_secret: do-not-print-me\n";
        let a = args(dir.path(), ud, None);
        let err = format!("{:#}", run(&a).unwrap_err());
        assert!(err.contains("omni_appliance.omni.oidc.issuer"), "{err}");
        assert!(!err.contains("do-not-print-me"), "{err}");
        assert!(!a.output.exists());
        let a = args(dir.path(), "#!/bin/sh\necho\n", None);
        assert!(format!("{:#}", run(&a).unwrap_err()).contains("script"));
    }

    #[test]
    fn a_broken_network_config_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path(), "#cloud-config\n", Some("config: []\n"));
        let err = format!("{:#}", run(&a).unwrap_err());
        assert!(
            err.contains("network.yaml") && err.contains("version"),
            "{err}"
        );
        assert!(!a.output.exists());
    }
}
