//! How to reach a Proxmox VE node: flags, a profile file, and where secrets come from.
//!
//! Precedence: a flag, then the profile (`$XDG_CONFIG_HOME/omni-image/proxmox.toml` or
//! `~/.config/omni-image/proxmox.toml`, table `[NAME]` picked by `--profile`, `default`
//! otherwise). Secrets are never flag values: the token secret comes from an environment
//! variable (`PROXMOX_TOKEN_SECRET` unless `--token-secret-env` names another) or a file,
//! the password from `PROXMOX_PASSWORD` or a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use super::tls::{Trust, parse_fingerprint};

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The API's URL, e.g. https://pve.example.net:8006/api2/json.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Which table of the profile file to read.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// API token id, USER@REALM!TOKENID.
    #[arg(long, value_name = "ID")]
    pub token_id: Option<String>,
    /// Environment variable holding the token secret.
    #[arg(long, value_name = "VAR", default_value = "PROXMOX_TOKEN_SECRET")]
    pub token_secret_env: String,
    /// File holding the token secret (instead of the environment variable).
    #[arg(long, value_name = "PATH")]
    pub token_secret_file: Option<PathBuf>,
    /// Log in as USER@REALM with a password (from PROXMOX_PASSWORD or --password-file)
    /// instead of a token.
    #[arg(long, value_name = "USER@REALM", conflicts_with = "token_id")]
    pub user: Option<String>,
    /// File holding the password for --user.
    #[arg(long, value_name = "PATH")]
    pub password_file: Option<PathBuf>,
    /// Trust this CA (PEM), e.g. a copy of the cluster's /etc/pve/pve-root-ca.pem.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Trust only the certificate with this SHA-256 fingerprint (`pvenode cert info`).
    #[arg(long, value_name = "AA:BB:...", conflicts_with = "ca_file")]
    pub fingerprint: Option<String>,
    /// Do not verify the server's certificate at all. Anyone on the path can then read the
    /// token and the image: use a CA file or a fingerprint instead.
    #[arg(long, conflicts_with_all = ["ca_file", "fingerprint"])]
    pub insecure: bool,
    /// Give up on a Proxmox task after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub task_timeout: u64,
}

/// One table of the profile file. No secret values: only where to find them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    pub url: Option<String>,
    pub token_id: Option<String>,
    pub token_secret_env: Option<String>,
    pub token_secret_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub fingerprint: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    pub node: Option<String>,
    pub storage: Option<String>,
    pub bridge: Option<String>,
}

pub fn profile_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("omni-image").join("proxmox.toml"))
}

pub fn load_profile(name: Option<&str>) -> anyhow::Result<Profile> {
    let Some(path) = profile_path() else {
        return Ok(Profile::default());
    };
    if !path.exists() {
        if let Some(name) = name {
            bail!(
                "--profile {name}: there is no profile file {}",
                path.display()
            );
        }
        return Ok(Profile::default());
    }
    let text = fs_err::read_to_string(&path)?;
    let mut tables: BTreeMap<String, Profile> = toml::from_str(&text)
        .with_context(|| format!("reading profile file {}", path.display()))?;
    let wanted = name.unwrap_or("default");
    match tables.remove(wanted) {
        Some(p) => Ok(p),
        None if name.is_none() => Ok(Profile::default()),
        None => bail!(
            "--profile {wanted}: no table [{wanted}] in {} (it has: {})",
            path.display(),
            tables.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

pub enum Auth {
    Token { id: String, secret: String },
    Password { user: String, password: String },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token { id, .. } => write!(f, "token {id}"),
            Auth::Password { user, .. } => write!(f, "user {user}"),
        }
    }
}

#[derive(Debug)]
pub struct Connection {
    /// Ends in `/api2/json`, no trailing slash.
    pub base: url::Url,
    pub auth: Auth,
    pub trust: Trust,
    pub task_timeout: std::time::Duration,
}

/// Checks `--url`: https, a host, and the `/api2/json` path (added when the URL has no path).
/// Proxmox serves its API over TLS only; plain http would carry the token in clear.
pub fn parse_url(text: &str) -> anyhow::Result<url::Url> {
    let hint = "use the form https://HOST:8006/api2/json";
    let url = url::Url::parse(text)
        .with_context(|| format!("--url {text:?} is not a URL with a scheme: {hint}"))?;
    if url.scheme() == "http" {
        bail!(
            "--url {text:?}: Proxmox serves its API over https only, and http would send the \
             API token in clear: {hint} (with --fingerprint or --ca-file for a self-signed \
             certificate)"
        );
    }
    if url.scheme() != "https" || url.host_str().is_none() {
        bail!("--url {text:?} needs an https:// scheme and a host: {hint}");
    }
    let path = url.path().trim_end_matches('/');
    if !path.is_empty() && path != "/api2/json" {
        bail!(
            "--url {text:?} must end in /api2/json (got path {:?}): {hint}",
            url.path()
        );
    }
    let mut url = url;
    url.set_path("/api2/json");
    Ok(url)
}

/// Checks a token id: USER@REALM!TOKENID.
pub fn check_token_id(id: &str) -> anyhow::Result<()> {
    let ok = id.split_once('!').is_some_and(|(user, token)| {
        user.contains('@')
            && !token.is_empty()
            && token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    });
    if !ok {
        bail!(
            "--token-id {id:?} is not USER@REALM!TOKENID (e.g. omni@pve!image); `pveum user \
             token list USER` shows the ids"
        );
    }
    Ok(())
}

fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = fs_err::read_to_string(path).with_context(|| format!("reading the {what} file"))?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        bail!("the {what} file {} is empty", path.display());
    }
    Ok(secret)
}

impl ConnectArgs {
    /// Resolves flags and profile into a connection. Returns the profile too, for the
    /// node/storage defaults it may hold.
    pub fn resolve(&self) -> anyhow::Result<(Connection, Profile)> {
        let profile = load_profile(self.profile.as_deref())?;
        let url = self.url.clone().or(profile.url.clone()).context(
            "no Proxmox URL: pass --url https://HOST:8006/api2/json or set `url` in the profile",
        )?;
        let base = parse_url(&url)?;

        let user = self.user.clone().or(profile.user.clone());
        let token_id = self.token_id.clone().or(profile.token_id.clone());
        let auth =
            match (token_id, user) {
                (Some(id), _) if self.user.is_none() => {
                    check_token_id(&id)?;
                    let file = self
                        .token_secret_file
                        .clone()
                        .or(profile.token_secret_file.clone());
                    let var = profile
                        .token_secret_env
                        .clone()
                        .filter(|_| self.token_secret_env == "PROXMOX_TOKEN_SECRET")
                        .unwrap_or_else(|| self.token_secret_env.clone());
                    let secret = match file {
                    Some(f) => read_secret_file(&f, "token secret")?,
                    None => std::env::var(&var).ok().filter(|s| !s.is_empty()).with_context(|| {
                        format!(
                            "no secret for token {id}: set the environment variable {var} or \
                             pass --token-secret-file"
                        )
                    })?,
                };
                    Auth::Token { id, secret }
                }
                (_, Some(user)) => {
                    if !user.contains('@') {
                        bail!("--user {user:?} needs a realm: USER@REALM, e.g. root@pam");
                    }
                    let file = self.password_file.clone().or(profile.password_file.clone());
                    let password = match file {
                        Some(f) => read_secret_file(&f, "password")?,
                        None => std::env::var("PROXMOX_PASSWORD")
                            .ok()
                            .filter(|s| !s.is_empty())
                            .with_context(|| {
                                format!(
                                    "no password for {user}: set PROXMOX_PASSWORD or pass \
                                 --password-file"
                                )
                            })?,
                    };
                    Auth::Password { user, password }
                }
                (None, None) => bail!(
                    "no credentials: pass --token-id USER@REALM!TOKENID (secret in \
                 PROXMOX_TOKEN_SECRET) or --user USER@REALM (password in PROXMOX_PASSWORD)"
                ),
                (Some(_), None) => unreachable!("token id without --user is the first arm"),
            };

        let trust = if self.insecure
            || (profile.insecure && self.ca_file.is_none() && self.fingerprint.is_none())
        {
            Trust::Insecure
        } else if let Some(fp) = self.fingerprint.clone().or(profile.fingerprint.clone()) {
            Trust::Fingerprint(parse_fingerprint(&fp)?)
        } else if let Some(ca) = self.ca_file.clone().or(profile.ca_file.clone()) {
            Trust::CaFile(ca)
        } else {
            Trust::SystemRoots
        };
        if matches!(trust, Trust::Insecure) {
            tracing::warn!(
                "TLS verification is OFF (--insecure): anyone between here and {} can read the \
                 API token and alter the image. Pin the node with --fingerprint instead.",
                base.host_str().unwrap_or("the server")
            );
        }
        let connection = Connection {
            base,
            auth,
            trust,
            task_timeout: std::time::Duration::from_secs(self.task_timeout),
        };
        Ok((connection, profile))
    }
}

/// A DNS name as Proxmox's `dns-name` format accepts it.
pub fn check_dns_name(flag: &str, name: &str) -> anyhow::Result<()> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        bail!(
            "{flag} {name:?} is not a valid DNS name: use letters, digits and '-' (no '_', no \
             leading or trailing '-'), e.g. tsidp-1"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_a_scheme_and_the_api_path() {
        assert!(parse_url("https://pve:8006/api2/json").is_ok());
        assert!(parse_url("https://pve:8006/api2/json/").is_ok());
        assert_eq!(
            parse_url("https://pve:8006").unwrap().as_str(),
            "https://pve:8006/api2/json"
        );
        let e = parse_url("pve:8006/api2/json").unwrap_err().to_string();
        assert!(e.contains("scheme"), "{e}");
        let e = parse_url("http://pve:8006/api2/json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("https only"), "{e}");
        let e = parse_url("https://pve:8006/api2").unwrap_err().to_string();
        assert!(e.contains("/api2/json"), "{e}");
    }

    #[test]
    fn token_ids_need_a_realm_and_a_bang() {
        assert!(check_token_id("omni@pve!image").is_ok());
        assert!(check_token_id("omni@pve").is_err());
        assert!(check_token_id("omni!image").is_err());
    }

    #[test]
    fn dns_names_follow_the_server_rules() {
        assert!(check_dns_name("--name", "tsidp-1").is_ok());
        assert!(check_dns_name("--name", "a.b.c").is_ok());
        assert!(check_dns_name("--name", "bad_name").is_err());
        assert!(check_dns_name("--name", "-x").is_err());
    }
}
