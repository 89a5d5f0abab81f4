//! tsidp's secrets: the Tailscale auth key (and the tailnet hostname), written to the unit's
//! environment file `/etc/default/tsidp`, mode 0600, owned by root (systemd reads it before
//! starting the service as its own unprivileged user).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_yaml_ng::Value;

use super::{Findings, Reader, envfile, is_dns_name};
use crate::config::Secret;
use crate::fsutil::{self, Owner, Root};

/// The environment file of `tsidp.service`.
pub const ENV_FILE: &str = "/etc/default/tsidp";

/// Where tsidp keeps its tailnet state: the plain directory, or systemd's private one when
/// the unit uses `DynamicUser=`.
pub const STATE_DIRS: &[&str] = &["/var/lib/tsidp", "/var/lib/private/tsidp"];

#[derive(Debug, Clone)]
pub struct Secrets {
    pub auth_key: Secret,
    pub hostname: String,
}

pub fn parse(value: &Value) -> (Option<Secrets>, Findings) {
    let mut r = Reader::new(value, "omni_appliance.tsidp");
    let auth_key = r.secret("auth_key", true);
    super::check_tailscale_key(&mut r, "auth_key", &auth_key);
    let hostname = r.string("hostname").unwrap_or_else(|| "tsidp".to_owned());
    if !is_dns_name(&hostname) || hostname.contains('.') {
        r.invalid("hostname", "must be a single DNS label such as `idp`");
    }
    let findings = r.finish();
    let ok = findings.missing.is_empty() && findings.invalid.is_empty();
    let secrets = auth_key
        .filter(|_| ok)
        .map(|auth_key| Secrets { auth_key, hostname });
    (secrets, findings)
}

/// Writes the environment file; returns the path written.
pub fn apply(root: &Root, secrets: &Secrets) -> Result<Vec<PathBuf>> {
    let path = root.join(ENV_FILE);
    let text = envfile::render(&[
        ("TAILSCALE_USE_WIP_CODE", "1"),
        ("TS_AUTHKEY", secrets.auth_key.expose()),
        ("TSNET_FORCE_LOGIN", "1"),
        ("TSIDP_HOSTNAME", &secrets.hostname),
    ])?;
    fsutil::write_atomic(&path, text.as_bytes(), 0o600, Some(Owner::ROOT))
        .with_context(|| format!("writing {ENV_FILE}"))?;
    Ok(vec![path])
}

/// Whether tsidp's state directory shows a completed login to the tailnet.
///
/// TODO: checked against tsnet's state file format (a JSON object whose `_current-profile`
/// names the logged-in profile); no live tsidp could be run where this was written.
pub fn logged_in(root: &Root) -> bool {
    STATE_DIRS.iter().any(|dir| {
        let path = root.join(dir).join("tailscaled.state");
        let Ok(bytes) = std::fs::read(path) else {
            return false;
        };
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("_current-profile").cloned())
            .is_some_and(|p| p.as_str().is_some_and(|s| !s.is_empty()))
    })
}

/// Once tsidp is logged in, removes the auth key (and the forced login) from its environment
/// file. Returns whether the file changed.
pub fn forget_key_after_login(root: &Root) -> Result<bool> {
    let path = root.join(ENV_FILE);
    let Some(bytes) = fsutil::read_optional(&path)? else {
        return Ok(false);
    };
    let text = String::from_utf8_lossy(&bytes);
    if envfile::get(&text, "TS_AUTHKEY").is_none() || !logged_in(root) {
        return Ok(false);
    }
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("TS_AUTHKEY=") && !l.starts_with("TSNET_FORCE_LOGIN="))
        .map(|l| format!("{l}\n"))
        .collect();
    fsutil::write_atomic(&path, kept.as_bytes(), 0o600, Some(Owner::ROOT))
        .with_context(|| format!("removing the auth key from {ENV_FILE}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn the_auth_key_lands_in_a_0600_environment_file() {
        let (secrets, findings) = parse(&yaml("auth_key: tskey-auth-abc123\nhostname: idp\n"));
        assert!(findings.is_clean(), "{findings:?}");
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        apply(&root, &secrets.unwrap()).unwrap();
        let path = root.join(ENV_FILE);
        let text = fs_err::read_to_string(&path).unwrap();
        assert!(text.contains("TS_AUTHKEY=tskey-auth-abc123\n"));
        assert!(text.contains("TSIDP_HOSTNAME=idp\n"));
        assert_eq!(fs_err::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_missing_key_is_named_and_nothing_is_returned() {
        let (secrets, findings) = parse(&yaml("hostname: idp\n"));
        assert!(secrets.is_none());
        assert_eq!(findings.missing, vec!["omni_appliance.tsidp.auth_key"]);
        let (secrets, findings) = parse(&yaml("auth_key: hunter2\ncolour: blue\n"));
        assert!(secrets.is_none());
        assert_eq!(findings.unknown, vec!["omni_appliance.tsidp.colour"]);
        assert!(findings.invalid[0].contains("tskey-"));
        assert!(!format!("{findings:?}").contains("hunter2"));
        assert!(!format!("{findings:?}").contains("blue"));
    }

    #[test]
    fn the_key_is_forgotten_once_the_state_shows_a_login() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let (secrets, _) = parse(&yaml("auth_key: tskey-auth-abc123\n"));
        apply(&root, &secrets.unwrap()).unwrap();
        assert!(!forget_key_after_login(&root).unwrap());
        let state = root.join("/var/lib/private/tsidp/tailscaled.state");
        fs_err::create_dir_all(state.parent().unwrap()).unwrap();
        fs_err::write(
            &state,
            r#"{"_current-profile": "cHJvZmlsZS0x", "profile-1": "e30="}"#,
        )
        .unwrap();
        assert!(forget_key_after_login(&root).unwrap());
        let text = fs_err::read_to_string(root.join(ENV_FILE)).unwrap();
        assert!(!text.contains("tskey") && !text.contains("FORCE_LOGIN"));
        assert!(text.contains("TSIDP_HOSTNAME=tsidp"));
        assert!(!forget_key_after_login(&root).unwrap());
    }

    const UNIT: &str = include_str!("../../../overlays/tsidp/usr/lib/systemd/system/tsidp.service");

    #[test]
    fn the_unit_reads_this_file_and_keeps_its_state_where_the_login_is_looked_for() {
        assert!(UNIT.contains(&format!("EnvironmentFile={ENV_FILE}\n")));
        assert!(UNIT.contains(&format!("ConditionPathExists={ENV_FILE}\n")));
        // DynamicUser= puts StateDirectory=tsidp in /var/lib/private/tsidp.
        assert!(UNIT.contains("DynamicUser=yes\n") && UNIT.contains("StateDirectory=tsidp\n"));
        assert!(STATE_DIRS.contains(&"/var/lib/private/tsidp"));
        // One ExecStart line, with the flags tsidp has.
        let exec: Vec<&str> = UNIT
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect();
        assert_eq!(exec.len(), 1, "{exec:?}");
        assert!(
            !exec[0].ends_with('\\'),
            "a continued ExecStart breaks tsidp"
        );
        for flag in [
            "-dir %S/tsidp",
            "-hostname ${TSIDP_HOSTNAME}",
            "-enable-sts",
            "-port 443",
        ] {
            assert!(exec[0].contains(flag), "{flag} in {}", exec[0]);
        }
        assert!(
            UNIT.contains("CapabilityBoundingSet=\n") && UNIT.contains("AmbientCapabilities=\n")
        );
    }
}
