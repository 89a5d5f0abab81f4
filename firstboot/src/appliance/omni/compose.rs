//! The Compose project's side of the Omni appliance: the endpoints Omni advertises, the
//! variables `omni.env` gives the project, and the check of the rendered project with the
//! image's own `docker compose config`.
//!
//! The project itself (`/usr/lib/omni-image/omni/compose.yaml`) ships in the image with its
//! container images pinned; everything that differs per machine is interpolated from
//! [`super::OMNI_ENV`]. Secrets are never interpolated: they reach the containers through
//! `env_file:` and read-only file mounts, so none appears in a process argument list.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::fsutil::Root;

/// The Compose file, as the image ships it.
pub const PROJECT: &str = "/usr/lib/omni-image/omni/compose.yaml";

/// Debian's Compose plugin; it runs on its own, without the Docker daemon, for `config`.
pub const COMPOSE_BIN: &str = "/usr/libexec/docker/cli-plugins/docker-compose";

/// The networkd files the agent writes from `network-config` (see `apply::network`).
const NETWORK_DIR: &str = "/etc/systemd/network";
const NETWORK_PREFIX: &str = "10-omni-firstboot-";

/// Where Omni is reached: the UI and API on the tailnet, the machine-facing endpoints on the
/// LAN address that Talos machines outside the tailnet dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// `omni.example.ts.net`: the UI, API and Kubernetes proxy (tailnet only).
    pub tailnet_fqdn: String,
    /// `grpc://192.168.10.50:8090`: the machine API Talos machines join through.
    pub machine_api_url: String,
    /// `192.168.10.50:50180`: the SideroLink WireGuard endpoint (Omni wants an IP here).
    pub wireguard_addr: String,
    /// The host address the machine-facing ports are published on.
    pub lan_bind: String,
}

/// Why the endpoints could not be decided: a key to give, with what to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProblem {
    Missing(String),
    Invalid(String),
}

/// The tailnet's DNS name: given, or taken from an OIDC issuer on the same tailnet
/// (`https://idp.example.ts.net` gives `example.ts.net`).
pub fn tailnet_domain(given: Option<&str>, issuer: &str) -> Option<String> {
    if let Some(t) = given {
        return Some(t.trim_end_matches('.').to_owned());
    }
    let host = issuer
        .strip_prefix("https://")?
        .split(['/', ':', '?', '#'])
        .next()?;
    let (_, domain) = host.split_once('.')?;
    domain.ends_with(".ts.net").then(|| domain.to_owned())
}

/// Decides the endpoints from the tailnet name and the LAN address: `lan_address` as given, or
/// the first static IPv4 address the seed's network config set. A DHCP address is not used:
/// it may change, and Talos machines keep the endpoint they joined with.
pub fn endpoints(
    root: &Root,
    tailnet_hostname: &str,
    tailnet: &str,
    lan_address: Option<&str>,
) -> std::result::Result<Endpoints, EndpointProblem> {
    let static_ip = static_ipv4(root);
    let (host, wg_ip) = match lan_address {
        Some(given) => match given.parse::<IpAddr>() {
            Ok(ip) => (given.to_owned(), ip),
            Err(_) => match static_ip {
                Some(ip) => (given.to_owned(), IpAddr::V4(ip)),
                None => {
                    return Err(EndpointProblem::Invalid(
                        "omni_appliance.omni.lan_address: a DNS name needs a static IPv4 \
                         address in the network config for the WireGuard endpoint (Omni \
                         advertises it as IP:port); give the VM's IP address instead"
                            .into(),
                    ));
                }
            },
        },
        None => match static_ip {
            Some(ip) => (ip.to_string(), IpAddr::V4(ip)),
            None => {
                return Err(EndpointProblem::Missing(
                    "omni_appliance.omni.lan_address (the network config sets no static IPv4 \
                     address: give the address LAN Talos machines reach this VM at)"
                        .into(),
                ));
            }
        },
    };
    let bracket = |h: &str| match h.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{h}]"),
        _ => h.to_owned(),
    };
    Ok(Endpoints {
        tailnet_fqdn: format!("{tailnet_hostname}.{tailnet}"),
        machine_api_url: format!("grpc://{}:8090", bracket(&host)),
        wireguard_addr: format!("{}:50180", bracket(&wg_ip.to_string())),
        lan_bind: "0.0.0.0".into(),
    })
}

/// The first static IPv4 address of the networkd files written from the seed.
pub fn static_ipv4(root: &Root) -> Option<Ipv4Addr> {
    let dir = root.join(NETWORK_DIR);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(NETWORK_PREFIX))
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().find_map(|line| {
            let value = line.trim().strip_prefix("Address=")?;
            let ip = value.split('/').next()?.parse::<Ipv4Addr>().ok()?;
            (!ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified()).then_some(ip)
        })
    })
}

/// Runs `docker compose config --quiet` on the project with the machine's `omni.env`, as
/// `omni.service` will read it. Skipped (returns `Ok(false)`) where the image's Compose is
/// not at hand: in a tree that is not the running system, or without the plugin. The
/// values of `secrets` are removed from the error before it is shown.
pub fn check_project(root: &Root, env_file: &str, secrets: &[&str]) -> Result<bool> {
    let bin = root.join(COMPOSE_BIN);
    if !root.is_live() || !bin.is_file() {
        return Ok(false);
    }
    run_config(&bin, Path::new(PROJECT), Path::new(env_file), None, secrets)?;
    Ok(true)
}

/// `COMPOSE --env-file ENV -f PROJECT config --quiet`, optionally inside `chroot`; fails with
/// Compose's own message, its secrets replaced by `<redacted>`.
pub fn run_config(
    bin: &Path,
    project: &Path,
    env_file: &Path,
    chroot: Option<&Path>,
    secrets: &[&str],
) -> Result<()> {
    let mut cmd = match chroot {
        Some(tree) => {
            let mut c = Command::new("chroot");
            c.arg(tree).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--env-file")
        .arg(env_file)
        .arg("-f")
        .arg(project)
        .args(["config", "--quiet"])
        .env("HOME", "/root")
        .env("COMPOSE_ANSI", "never")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let line = format!(
        "docker compose --env-file {} -f {} config --quiet",
        env_file.display(),
        project.display()
    );
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("running `{line}`: {e}"))?;
    if !out.status.success() {
        let text = redact(String::from_utf8_lossy(&out.stderr).trim(), secrets);
        bail!("`{line}` refused the Omni project ({}): {text}", out.status);
    }
    Ok(())
}

/// Replaces every secret value in `text` with `<redacted>`.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(*s, "<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with_network(files: &[(&str, &str)]) -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let net = root.join(NETWORK_DIR);
        fs_err::create_dir_all(&net).unwrap();
        for (name, text) in files {
            fs_err::write(net.join(name), text).unwrap();
        }
        (dir, root)
    }

    #[test]
    fn the_tailnet_comes_from_the_issuer_or_is_given() {
        assert_eq!(
            tailnet_domain(None, "https://idp.example-tailnet.ts.net").as_deref(),
            Some("example-tailnet.ts.net")
        );
        assert_eq!(
            tailnet_domain(None, "https://idp.tail1234.ts.net:443/x").as_deref(),
            Some("tail1234.ts.net")
        );
        assert_eq!(tailnet_domain(None, "https://login.example.com"), None);
        assert_eq!(
            tailnet_domain(Some("corp.ts.net."), "https://login.example.com").as_deref(),
            Some("corp.ts.net")
        );
    }

    #[test]
    fn a_static_address_from_the_network_config_is_what_talos_machines_dial() {
        let (_d, root) = root_with_network(&[
            ("90-dhcp.network", "[Network]\nAddress=10.9.9.9/24\n"),
            (
                "10-omni-firstboot-0-eth0.network",
                "[Match]\nMACAddress=aa:bb\n[Network]\nAddress=fe80::1/64\n\
                 Address=192.168.10.50/24\nGateway=192.168.10.1\n",
            ),
        ]);
        let e = endpoints(&root, "omni", "example.ts.net", None).unwrap();
        assert_eq!(e.tailnet_fqdn, "omni.example.ts.net");
        assert_eq!(e.machine_api_url, "grpc://192.168.10.50:8090");
        assert_eq!(e.wireguard_addr, "192.168.10.50:50180");
        // A given address wins; a name keeps the static IP for WireGuard.
        let e = endpoints(&root, "omni", "example.ts.net", Some("omni.lan.example")).unwrap();
        assert_eq!(e.machine_api_url, "grpc://omni.lan.example:8090");
        assert_eq!(e.wireguard_addr, "192.168.10.50:50180");
        let e = endpoints(&root, "omni", "x.ts.net", Some("fd00::5")).unwrap();
        assert_eq!(e.machine_api_url, "grpc://[fd00::5]:8090");
        assert_eq!(e.wireguard_addr, "[fd00::5]:50180");
    }

    #[test]
    fn without_a_stable_lan_address_the_key_is_asked_for() {
        let (_d, root) = root_with_network(&[(
            "10-omni-firstboot-0-eth0.network",
            "[Match]\nMACAddress=aa:bb\n[Network]\nDHCP=ipv4\n",
        )]);
        match endpoints(&root, "omni", "x.ts.net", None) {
            Err(EndpointProblem::Missing(m)) => {
                assert!(m.starts_with("omni_appliance.omni.lan_address"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        match endpoints(&root, "omni", "x.ts.net", Some("omni.lan")) {
            Err(EndpointProblem::Invalid(m)) => assert!(m.contains("IP address"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(endpoints(&root, "omni", "x.ts.net", Some("192.168.1.7")).is_ok());
    }

    #[test]
    fn compose_errors_lose_their_secrets() {
        let text = redact(
            "line 2: unexpected character \"tskey-auth-k123\" in variable name",
            &["tskey-auth-k123", ""],
        );
        assert_eq!(
            text,
            "line 2: unexpected character \"<redacted>\" in variable name"
        );
    }

    #[test]
    fn the_check_is_skipped_outside_the_running_system() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!check_project(&Root::new(dir.path()), "/etc/omni/omni.env", &[]).unwrap());
    }

    #[test]
    fn a_failing_compose_is_reported_with_its_message_and_without_secrets() {
        // A stand-in for Compose that fails the way it does on a bad env file.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("compose");
        fs_err::write(
            &fake,
            "#!/bin/sh\necho 'failed to read omni.env: line 3: value s3cr3t-value' >&2\nexit 15\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs_err::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = run_config(
            &fake,
            Path::new("p.yaml"),
            Path::new("o.env"),
            None,
            &["s3cr3t-value"],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 3: value <redacted>"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(
            err.contains("--env-file o.env -f p.yaml config --quiet"),
            "{err}"
        );
    }
}
