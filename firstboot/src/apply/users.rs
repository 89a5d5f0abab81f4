//! Users, groups, passwords, sudo rules and authorized SSH keys.
//!
//! Accounts are created with `useradd` (`--prefix` for a tree other than `/`); no password
//! ever goes through an argument list: hashes are written into `/etc/shadow` directly.

use std::process::Command;

use anyhow::{Context, Result};

use crate::accounts;
use crate::config::Secret;
use crate::config::userdata::{CloudConfig, UserEntry, UserSpec};
use crate::fsutil::{self, Owner, Root};

/// The sudoers drop-in this agent owns.
pub const SUDOERS: &str = "/etc/sudoers.d/90-omni-firstboot";

/// Groups the default user joins when they exist (Debian's cloud-init defaults).
const DEFAULT_GROUPS: &[&str] = &[
    "adm", "audio", "cdrom", "dialout", "dip", "floppy", "netdev", "plugdev", "sudo", "video",
];

/// A user to configure, with its password resolved.
#[derive(Debug)]
pub struct Plan {
    pub spec: UserSpec,
    pub password: Option<Secret>,
    /// Whether `password` is plain text (to be hashed here).
    pub plain: bool,
}

/// The default user's name for an image: `debian` or `ubuntu` by `/etc/os-release`.
pub fn distro_default_user(root: &Root) -> String {
    let text = std::fs::read_to_string(root.join("/etc/os-release")).unwrap_or_default();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    if id == "ubuntu" {
        "ubuntu".into()
    } else {
        "debian".into()
    }
}

/// Turns `user`, `users`, `password`, `chpasswd` and the keys into a list of users.
pub fn plan(c: &CloudConfig, default_name: &str, meta_keys: &[String]) -> Vec<Plan> {
    let mut out = Vec::new();
    let entries: Vec<&UserEntry> = match &c.users {
        Some(list) => list.iter().collect(),
        None => vec![&UserEntry::Default],
    };
    for entry in entries {
        match entry {
            UserEntry::Default => {
                let name = c
                    .default_user_name
                    .clone()
                    .unwrap_or_else(|| default_name.to_owned());
                let mut spec = c
                    .default_user_overrides
                    .as_deref()
                    .cloned()
                    .unwrap_or_default();
                spec.name = name.clone();
                if name != "root" {
                    if spec.groups.is_empty() {
                        spec.groups = DEFAULT_GROUPS.iter().map(|g| g.to_string()).collect();
                    }
                    if spec.sudo.is_empty() {
                        spec.sudo = vec!["ALL=(ALL) NOPASSWD:ALL".into()];
                    }
                    spec.shell.get_or_insert_with(|| "/bin/bash".into());
                }
                spec.ssh_authorized_keys
                    .extend(c.ssh_authorized_keys.iter().cloned());
                spec.ssh_authorized_keys.extend(meta_keys.iter().cloned());
                let password = c.password.clone();
                let plain = password
                    .as_ref()
                    .is_some_and(|p| !accounts::is_crypt_hash(p.expose()));
                out.push(Plan {
                    spec,
                    password,
                    plain,
                });
            }
            UserEntry::User(spec) => {
                let (password, plain) = match (&spec.hashed_passwd, &spec.plain_passwd) {
                    (Some(h), _) => (Some(h.clone()), false),
                    (None, Some(p)) => (Some(p.clone()), true),
                    _ => (None, false),
                };
                out.push(Plan {
                    spec: (**spec).clone(),
                    password,
                    plain,
                });
            }
        }
    }
    // Proxmox's `user: root` (no `users:`) means root itself gets the keys and password.
    if c.users.is_none()
        && c.default_user_name.as_deref() == Some("root")
        && let Some(p) = out.first_mut()
    {
        p.spec.groups.clear();
        p.spec.sudo.clear();
    }
    for (name, pw) in &c.chpasswd_users {
        match out.iter_mut().find(|p| &p.spec.name == name) {
            Some(p) => {
                p.plain = !accounts::is_crypt_hash(pw.expose());
                p.password = Some(pw.clone());
            }
            None => out.push(Plan {
                spec: UserSpec {
                    name: name.clone(),
                    ..Default::default()
                },
                plain: !accounts::is_crypt_hash(pw.expose()),
                password: Some(pw.clone()),
            }),
        }
    }
    out
}

/// Creates or updates every planned user. Returns one line per user for the log.
pub fn apply(root: &Root, plans: &[Plan], expire: bool, warnings: &mut Vec<String>) -> Result<()> {
    let mut sudo_lines = Vec::new();
    for plan in plans {
        let spec = &plan.spec;
        ensure_user(root, spec, warnings)
            .with_context(|| format!("creating user {}", spec.name))?;
        if let Some(pw) = &plan.password {
            let hash = if plan.plain {
                accounts::hash_password(pw.expose())?
            } else {
                pw.expose().into()
            };
            // cloud-init expires a password by default, but not when it came as a hash.
            let expire = expire && plan.plain;
            accounts::set_password_hash(root, &spec.name, &hash, expire)
                .with_context(|| format!("setting the password of {}", spec.name))?;
        }
        for rule in &spec.sudo {
            sudo_lines.push(format!("{} {}", spec.name, rule));
        }
        if !spec.ssh_authorized_keys.is_empty() {
            authorized_keys(root, &spec.name, &spec.ssh_authorized_keys)
                .with_context(|| format!("writing the SSH keys of {}", spec.name))?;
        }
    }
    let path = root.join(SUDOERS);
    if sudo_lines.is_empty() {
        fsutil::remove_if_exists(&path)?;
    } else {
        let text = format!("# Written by omni-firstboot.\n{}\n", sudo_lines.join("\n"));
        fsutil::write_atomic(&path, text.as_bytes(), 0o440, Some(Owner::ROOT))
            .context("writing the sudo rules")?;
    }
    Ok(())
}

fn prefixed(root: &Root, program: &str) -> Command {
    let mut cmd = Command::new(program);
    if !root.is_live() {
        cmd.arg("--prefix").arg(root.path());
    }
    cmd
}

fn ensure_user(root: &Root, spec: &UserSpec, warnings: &mut Vec<String>) -> Result<()> {
    let mut groups = Vec::new();
    for g in &spec.groups {
        if accounts::group_id(root, g)?.is_some() {
            groups.push(g.clone());
        } else if !DEFAULT_GROUPS.contains(&g.as_str()) {
            // The distribution's default groups differ between releases: only a group the
            // user-data named itself is worth a warning.
            warnings.push(format!(
                "user {}: group `{g}` does not exist; not joined",
                spec.name
            ));
        }
    }
    if accounts::user(root, &spec.name)?.is_none() {
        let mut cmd = prefixed(root, "useradd");
        if !spec.no_create_home {
            cmd.arg("--create-home");
        } else {
            cmd.arg("--no-create-home");
        }
        if let Some(g) = &spec.gecos {
            cmd.arg("--comment").arg(g);
        }
        if let Some(s) = &spec.shell {
            cmd.arg("--shell").arg(s);
        }
        if let Some(h) = &spec.homedir {
            cmd.arg("--home-dir").arg(h);
        }
        if let Some(g) = &spec.primary_group {
            cmd.arg("--gid").arg(g);
        } else {
            cmd.arg("--user-group");
        }
        if let Some(uid) = spec.uid {
            cmd.arg("--uid").arg(uid.to_string());
        }
        if spec.system {
            cmd.arg("--system");
        }
        if !groups.is_empty() {
            cmd.arg("--groups").arg(groups.join(","));
        }
        cmd.arg(&spec.name);
        super::run(&mut cmd)?;
    } else if !groups.is_empty() {
        let mut cmd = prefixed(root, "usermod");
        cmd.arg("--append")
            .arg("--groups")
            .arg(groups.join(","))
            .arg(&spec.name);
        super::run(&mut cmd)?;
    }
    Ok(())
}

/// Adds keys to `~/.ssh/authorized_keys`, keeping the keys already there, without duplicates.
pub fn authorized_keys(root: &Root, name: &str, keys: &[String]) -> Result<()> {
    let user = accounts::user(root, name)?.with_context(|| format!("no user `{name}`"))?;
    let owner = Owner {
        uid: user.uid,
        gid: user.gid,
    };
    let home = root.join(&user.home);
    let ssh = home.join(".ssh");
    fsutil::ensure_dir(&ssh, 0o700, Some(owner))?;
    let path = ssh.join("authorized_keys");
    let existing = fsutil::read_optional(&path)?.map(|b| String::from_utf8_lossy(&b).into_owned());
    let mut lines: Vec<String> = existing
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    for key in keys {
        if !lines.iter().any(|l| l == key) {
            lines.push(key.clone());
        }
    }
    let text = format!("{}\n", lines.join("\n"));
    fsutil::write_atomic(&path, text.as_bytes(), 0o600, Some(owner))
}

/// Turns password logins over SSH on or off with a drop-in for sshd.
pub fn ssh_pwauth(root: &Root, allow: bool) -> Result<()> {
    let path = root.join("/etc/ssh/sshd_config.d/50-omni-firstboot.conf");
    let text = format!(
        "# Written by omni-firstboot (ssh_pwauth).\nPasswordAuthentication {}\n",
        if allow { "yes" } else { "no" }
    );
    fsutil::write_atomic(&path, text.as_bytes(), 0o644, None)
}
