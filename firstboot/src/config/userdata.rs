//! `user-data` and `vendor-data`: only `#cloud-config` documents are read; scripts, MIME
//! multipart archives and other kinds are reported and skipped.

use anyhow::{Context, Result};
use serde_yaml_ng::Value;

use super::{Secret, value};

/// The top-level keys this agent applies. Any other key is listed once and skipped.
pub const IMPLEMENTED: &[&str] = &[
    "hostname",
    "fqdn",
    "prefer_fqdn_over_hostname",
    "manage_etc_hosts",
    "user",
    "users",
    "password",
    "chpasswd",
    "ssh_authorized_keys",
    "ssh_pwauth",
    "ssh_deletekeys",
    "ssh_genkeytypes",
    "disable_root",
    "write_files",
    "package_upgrade",
    "package_update",
    "package_reboot_if_required",
    crate::appliance::SECTION,
];

/// What a user-data document turned out to be.
#[derive(Debug)]
pub enum UserData {
    Config(Box<CloudConfig>),
    /// A kind this agent does not run, with the reason shown to the user.
    Skipped(String),
}

#[derive(Debug, Default)]
pub struct CloudConfig {
    pub hostname: Option<String>,
    pub fqdn: Option<String>,
    pub prefer_fqdn: bool,
    pub manage_etc_hosts: bool,
    /// The name the `default` user gets (`user:`); the distribution's otherwise.
    pub default_user_name: Option<String>,
    /// Settings of `user:` when it is a mapping.
    pub default_user_overrides: Option<Box<UserSpec>>,
    /// `password:`, for the default user.
    pub password: Option<Secret>,
    pub chpasswd_expire: Option<bool>,
    /// `chpasswd.users` / `chpasswd.list`: (user, password).
    pub chpasswd_users: Vec<(String, Secret)>,
    pub ssh_authorized_keys: Vec<String>,
    /// `users:`; `None` when absent (which means `[default]`).
    pub users: Option<Vec<UserEntry>>,
    pub ssh_pwauth: Option<bool>,
    pub ssh_deletekeys: Option<bool>,
    pub ssh_genkeytypes: Option<Vec<String>>,
    pub disable_root: Option<bool>,
    pub write_files: Vec<WriteFile>,
    pub package_upgrade: bool,
    /// The appliance section, parsed later against the image's appliance.
    pub appliance: Option<Value>,
    /// Top-level keys that are not applied.
    pub unimplemented: Vec<String>,
    /// Values that were malformed and skipped (named by key, never by value).
    pub warnings: Vec<String>,
}

#[derive(Debug)]
pub enum UserEntry {
    Default,
    User(Box<UserSpec>),
}

#[derive(Debug, Default, Clone)]
pub struct UserSpec {
    pub name: String,
    pub gecos: Option<String>,
    pub primary_group: Option<String>,
    pub groups: Vec<String>,
    pub sudo: Vec<String>,
    pub shell: Option<String>,
    pub lock_passwd: Option<bool>,
    pub hashed_passwd: Option<Secret>,
    pub plain_passwd: Option<Secret>,
    pub ssh_authorized_keys: Vec<String>,
    pub system: bool,
    pub homedir: Option<String>,
    pub no_create_home: bool,
    pub uid: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct WriteFile {
    pub path: String,
    pub content: Vec<u8>,
    pub permissions: u32,
    pub owner: String,
    pub append: bool,
}

/// Reads a user-data (or vendor-data) document; `origin` names it in messages.
pub fn parse(bytes: &[u8], origin: &str) -> Result<UserData> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(UserData::Skipped(format!(
            "{origin} is gzip-compressed; omni-firstboot reads only plain #cloud-config"
        )));
    }
    let text = String::from_utf8_lossy(bytes);
    let first = text.lines().next().unwrap_or_default().trim_end();
    if text.trim().is_empty() {
        return Ok(UserData::Config(Box::default()));
    }
    // Nothing of the text itself is quoted: user-data carries secrets, and a file without
    // the header may well start with one.
    if first.starts_with("#!") {
        return Ok(UserData::Skipped(format!(
            "{origin} is a script (it starts with `#!`); omni-firstboot does not run scripts: \
             use #cloud-config with write_files instead"
        )));
    }
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("content-type:") || lower.starts_with("mime-version:") {
        return Ok(UserData::Skipped(format!(
            "{origin} is a MIME multipart archive; omni-firstboot reads only a single \
             #cloud-config document"
        )));
    }
    if !first.starts_with("#cloud-config") {
        return Ok(UserData::Skipped(format!(
            "{origin} does not start with `#cloud-config` (its first line must be exactly \
             that); it is not applied"
        )));
    }
    let doc: Value = serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {origin}"))?;
    Ok(UserData::Config(Box::new(from_value(&doc, origin))))
}

fn from_value(doc: &Value, origin: &str) -> CloudConfig {
    let mut c = CloudConfig::default();
    let Value::Mapping(map) = doc else {
        if !doc.is_null() {
            c.warnings
                .push(format!("{origin} is not a mapping of keys; nothing read"));
        }
        return c;
    };
    let get = |k: &str| map.get(k);
    c.hostname = get("hostname").and_then(value::string);
    c.fqdn = get("fqdn").and_then(value::string);
    c.prefer_fqdn = get("prefer_fqdn_over_hostname")
        .and_then(value::boolean)
        .unwrap_or(false);
    c.manage_etc_hosts = match get("manage_etc_hosts") {
        Some(Value::String(s)) if s == "localhost" || s == "template" => true,
        Some(v) => value::boolean(v).unwrap_or(false),
        None => false,
    };
    match get("user") {
        Some(Value::Mapping(_)) => {
            let spec = user_spec(get("user").unwrap_or(&Value::Null), "user", &mut c.warnings);
            if let Some(spec) = spec {
                c.default_user_name = Some(spec.name.clone());
                c.default_user_overrides = Some(Box::new(spec));
            }
        }
        Some(v) => c.default_user_name = value::string(v),
        None => {}
    }
    c.password = get("password").and_then(value::string).map(Secret::new);
    if let Some(chpasswd) = get("chpasswd") {
        c.chpasswd_expire = chpasswd.get("expire").and_then(value::boolean);
        if let Some(Value::Sequence(users)) = chpasswd.get("users") {
            for u in users {
                let name = u.get("name").and_then(value::string);
                let pw = u.get("password").and_then(value::string);
                match (name, pw) {
                    (Some(n), Some(p)) => c.chpasswd_users.push((n, Secret::new(p))),
                    _ => c
                        .warnings
                        .push("chpasswd.users: an entry lacks name or password".into()),
                }
            }
        }
        if let Some(list) = chpasswd.get("list") {
            let lines = match list {
                Value::String(s) => s.lines().map(str::to_owned).collect(),
                other => value::string_list(other),
            };
            for line in lines.iter().filter(|l| !l.trim().is_empty()) {
                match line.trim().split_once(':') {
                    Some((n, p)) => c.chpasswd_users.push((n.to_owned(), Secret::new(p))),
                    None => c
                        .warnings
                        .push("chpasswd.list: a line has no `user:`".into()),
                }
            }
        }
    }
    c.ssh_authorized_keys = get("ssh_authorized_keys")
        .map(keys_list)
        .unwrap_or_default();
    c.users = get("users").map(|v| users(v, &mut c.warnings));
    c.ssh_pwauth = get("ssh_pwauth").and_then(value::boolean);
    c.ssh_deletekeys = get("ssh_deletekeys").and_then(value::boolean);
    c.ssh_genkeytypes = get("ssh_genkeytypes").map(value::string_list);
    c.disable_root = get("disable_root").and_then(value::boolean);
    if let Some(Value::Sequence(files)) = get("write_files") {
        for (i, f) in files.iter().enumerate() {
            match write_file(f) {
                Ok(wf) => c.write_files.push(wf),
                Err(e) => c.warnings.push(format!("write_files[{i}]: {e:#}; skipped")),
            }
        }
    }
    c.package_upgrade = get("package_upgrade")
        .and_then(value::boolean)
        .unwrap_or(false);
    c.appliance = get(crate::appliance::SECTION).cloned();
    for key in map.keys().filter_map(value::string) {
        if !IMPLEMENTED.contains(&key.as_str()) {
            c.unimplemented.push(key);
        }
    }
    c
}

/// SSH keys: a list, or a single string with one key per line.
fn keys_list(v: &Value) -> Vec<String> {
    let all = match v {
        Value::String(s) => s.lines().map(str::to_owned).collect(),
        Value::Sequence(items) => items.iter().filter_map(value::string).collect(),
        _ => Vec::new(),
    };
    all.into_iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

fn users(v: &Value, warnings: &mut Vec<String>) -> Vec<UserEntry> {
    let items: Vec<Value> = match v {
        Value::Sequence(items) => items.clone(),
        Value::String(s) => s
            .split(',')
            .map(|n| Value::String(n.trim().to_owned()))
            .collect(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let mut spec = v.clone();
                if let Value::Mapping(inner) = &mut spec {
                    inner.insert("name".into(), k.clone());
                } else {
                    spec = k.clone();
                }
                spec
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) if s == "default" => out.push(UserEntry::Default),
            Value::String(s) if !s.is_empty() => out.push(UserEntry::User(Box::new(UserSpec {
                name: s.clone(),
                ..Default::default()
            }))),
            other => {
                if let Some(spec) = user_spec(other, &format!("users[{i}]"), warnings) {
                    out.push(UserEntry::User(Box::new(spec)))
                }
            }
        }
    }
    out
}

fn user_spec(v: &Value, at: &str, warnings: &mut Vec<String>) -> Option<UserSpec> {
    let Some(name) = v
        .get("name")
        .and_then(value::string)
        .filter(|n| valid_user_name(n))
    else {
        warnings.push(format!("{at}: no valid `name`; skipped"));
        return None;
    };
    let get = |k: &str| v.get(k);
    let sudo = match get("sudo") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Bool(_)) => Vec::new(),
        Some(Value::Sequence(rules)) => rules.iter().filter_map(value::string).collect(),
        Some(other) => value::string(other).into_iter().collect(),
    };
    let sudo: Vec<String> = sudo
        .into_iter()
        .filter(|rule| {
            let ok = !rule.contains('\n') && !rule.trim().is_empty();
            if !ok {
                warnings.push(format!("{at}.sudo: a rule spans lines; skipped"));
            }
            ok
        })
        .collect();
    Some(UserSpec {
        name,
        gecos: get("gecos").and_then(value::string),
        primary_group: get("primary_group").and_then(value::string),
        groups: get("groups").map(value::string_list).unwrap_or_default(),
        sudo,
        shell: get("shell").and_then(value::string),
        lock_passwd: get("lock_passwd").and_then(value::boolean),
        hashed_passwd: get("hashed_passwd")
            .or_else(|| get("passwd"))
            .and_then(value::string)
            .map(Secret::new),
        plain_passwd: get("plain_text_passwd")
            .and_then(value::string)
            .map(Secret::new),
        ssh_authorized_keys: get("ssh_authorized_keys")
            .or_else(|| get("ssh-authorized-keys"))
            .map(keys_list)
            .unwrap_or_default(),
        system: get("system").and_then(value::boolean).unwrap_or(false),
        homedir: get("homedir").and_then(value::string),
        no_create_home: get("no_create_home")
            .and_then(value::boolean)
            .unwrap_or(false),
        uid: get("uid")
            .and_then(value::string)
            .and_then(|u| u.parse().ok()),
    })
}

/// A user name `useradd` accepts.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-$".contains(c))
}

fn write_file(v: &Value) -> Result<WriteFile> {
    use base64::Engine;
    let path = v.get("path").and_then(value::string).context("no `path`")?;
    let raw = v.get("content").and_then(value::string).unwrap_or_default();
    let encoding = v
        .get("encoding")
        .and_then(value::string)
        .unwrap_or_default();
    let content = match encoding.to_ascii_lowercase().as_str() {
        "" | "text/plain" => raw.into_bytes(),
        "b64" | "base64" => base64::engine::general_purpose::STANDARD
            .decode(raw.split_whitespace().collect::<String>())
            .context("`content` is not valid base64")?,
        other => anyhow::bail!("encoding `{other}` is not supported (use b64 or plain text)"),
    };
    let permissions = match v.get("permissions") {
        None | Some(Value::Null) => 0o644,
        Some(Value::Number(n)) => {
            // YAML 1.2 reads `0644` as the decimal 644: take its digits as octal.
            let digits = n.to_string();
            u32::from_str_radix(&digits, 8)
                .with_context(|| format!("`permissions` {digits} is not an octal mode"))?
        }
        Some(other) => {
            let s = value::string(other).unwrap_or_default();
            let s = s.trim().trim_start_matches("0o");
            u32::from_str_radix(s, 8)
                .with_context(|| format!("`permissions` `{s}` is not an octal mode like 0644"))?
        }
    };
    if permissions > 0o7777 {
        anyhow::bail!("`permissions` {permissions:o} is not a file mode");
    }
    Ok(WriteFile {
        path,
        content,
        permissions,
        owner: v
            .get("owner")
            .and_then(value::string)
            .unwrap_or_else(|| "root:root".into()),
        append: v.get("append").and_then(value::boolean).unwrap_or(false),
    })
}

impl CloudConfig {
    /// Fills what `self` leaves unset from `vendor` (vendor-data yields to user-data).
    pub fn merge_vendor(&mut self, vendor: CloudConfig) {
        macro_rules! take {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = vendor.$f; } )* };
        }
        take!(
            hostname,
            fqdn,
            default_user_name,
            password,
            chpasswd_expire,
            users,
            ssh_pwauth
        );
        take!(ssh_deletekeys, ssh_genkeytypes, disable_root, appliance);
        if self.ssh_authorized_keys.is_empty() {
            self.ssh_authorized_keys = vendor.ssh_authorized_keys;
        }
        let mut files = vendor.write_files;
        files.append(&mut self.write_files);
        self.write_files = files;
        self.manage_etc_hosts |= vendor.manage_etc_hosts;
        self.package_upgrade |= vendor.package_upgrade;
        for key in vendor.unimplemented {
            if !self.unimplemented.contains(&key) {
                self.unimplemented.push(key);
            }
        }
        self.warnings.extend(vendor.warnings);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> CloudConfig {
        match parse(text.as_bytes(), "user-data").unwrap() {
            UserData::Config(c) => *c,
            UserData::Skipped(why) => panic!("skipped: {why}"),
        }
    }

    #[test]
    fn proxmox_user_data_is_read() {
        let c = config(include_str!("../../tests/fixtures/proxmox/user-data"));
        assert_eq!(c.hostname.as_deref(), Some("omni-1"));
        assert_eq!(c.fqdn.as_deref(), Some("omni-1.lab.example"));
        assert!(c.manage_etc_hosts);
        assert_eq!(c.default_user_name.as_deref(), Some("admin"));
        assert!(c.password.as_ref().unwrap().expose().starts_with("$5$"));
        assert_eq!(c.chpasswd_expire, Some(false));
        assert_eq!(c.ssh_authorized_keys.len(), 2);
        assert!(matches!(c.users.as_deref(), Some([UserEntry::Default])));
        assert!(c.package_upgrade);
        assert!(c.unimplemented.is_empty(), "{:?}", c.unimplemented);
    }

    #[test]
    fn scripts_and_multipart_are_skipped_with_a_reason() {
        let UserData::Skipped(why) = parse(b"#!/bin/sh\necho hi\n", "user-data").unwrap() else {
            panic!()
        };
        assert!(why.contains("script"), "{why}");
        let mime = b"Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n--XX\n";
        let UserData::Skipped(why) = parse(mime, "user-data").unwrap() else {
            panic!()
        };
        assert!(why.contains("MIME"), "{why}");
        let UserData::Skipped(why) = parse(b"hello: world\n", "user-data").unwrap() else {
            panic!()
        };
        assert!(why.contains("#cloud-config"), "{why}");
    }

    #[test]
    fn yaml_errors_name_the_document_and_the_line() {
        let err = parse(b"#cloud-config\nhostname: [a\nusers:\n", "user-data").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("parsing user-data") && msg.contains("line"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_keys_are_listed_by_name() {
        let c = config("#cloud-config\nruncmd: [ls]\npackages: [htop]\nhostname: h\n");
        assert_eq!(c.unimplemented, vec!["runcmd", "packages"]);
    }

    #[test]
    fn users_and_write_files_are_read_leniently() {
        let c = config(
            "#cloud-config\nusers:\n  - default\n  - name: ops\n    groups: adm, sudo\n    \
             sudo: ALL=(ALL) NOPASSWD:ALL\n    plain_text_passwd: pw\n    lock_passwd: false\n\
             write_files:\n  - path: /etc/a\n    content: aGk=\n    encoding: b64\n    \
             permissions: '0600'\n  - path: /etc/b\n    permissions: 0640\n  - path: /etc/c\n    \
             encoding: gzip\n",
        );
        let Some([UserEntry::Default, UserEntry::User(ops)]) = c.users.as_deref() else {
            panic!("{:?}", c.users)
        };
        assert_eq!(ops.groups, vec!["adm", "sudo"]);
        assert_eq!(ops.sudo, vec!["ALL=(ALL) NOPASSWD:ALL"]);
        assert_eq!(ops.plain_passwd.as_ref().unwrap().expose(), "pw");
        assert_eq!(c.write_files[0].content, b"hi");
        assert_eq!(c.write_files[0].permissions, 0o600);
        assert_eq!(c.write_files[1].permissions, 0o640);
        assert_eq!(c.write_files.len(), 2);
        assert!(c.warnings[0].contains("write_files[2]") && c.warnings[0].contains("gzip"));
    }

    #[test]
    fn vendor_data_fills_only_what_user_data_leaves_unset() {
        let mut user = config("#cloud-config\nhostname: from-user\n");
        let vendor = config(
            "#cloud-config\nhostname: from-vendor\nssh_pwauth: false\nwrite_files:\n  \
             - path: /etc/v\n",
        );
        user.merge_vendor(vendor);
        assert_eq!(user.hostname.as_deref(), Some("from-user"));
        assert_eq!(user.ssh_pwauth, Some(false));
        assert_eq!(user.write_files[0].path, "/etc/v");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = config("#cloud-config\npassword: hunter2hunter2\n");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
