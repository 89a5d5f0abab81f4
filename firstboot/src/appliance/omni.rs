//! The Omni stack's secrets and settings, written under [`DIR`] for the Compose project:
//!
//! | file | mode | read by | holds |
//! |---|---|---|---|
//! | `omni.env` | 0600 | Compose (`--env-file`) | the project's variables: account id, name, users, EULA, OIDC issuer and client id, endpoints |
//! | `omni.yaml` | 0600 | `omni`, mounted at `/omni.yaml` (`--config-path`) | the OIDC client secret |
//! | `tailscale.env` | 0600 | `omni-tailscale` sidecar (`env_file`) | `TS_AUTHKEY`, `TS_HOSTNAME` |
//! | `omni.asc` | 0600 | `omni`, mounted at `/omni.asc` | etcd encryption key |
//! | `provider.env` | 0600 | `proxmox-provider` (`env_file`) | `PROVIDER_ID`, `OMNI_SERVICE_ACCOUNT_KEY` |
//! | `provider.yaml` | 0600 | `proxmox-provider`, mounted at `/config.yaml` | Proxmox API |
//! | `proxmox-ca/proxmox-ca.pem` | 0644 | `proxmox-provider` | the Proxmox CA, when given |
//!
//! All are owned by root (Docker reads them). The stack's files are written only when every
//! required key is valid and the LAN address Talos machines dial is known; the provider's
//! only when its block is complete. The written project is then checked with the image's
//! own `docker compose config` (see [`compose`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_yaml_ng::Value;

pub mod compose;

use super::{Findings, Reader, envfile, etcdkey, is_dns_name, is_email, is_https_url};
use crate::config::Secret;
use crate::fsutil::{self, Owner, Root};

/// The folder the Compose project reads its secrets from.
pub const DIR: &str = "/etc/omni";
pub const OMNI_ENV: &str = "/etc/omni/omni.env";
/// Omni's own configuration file: what must not be a flag (the OIDC client secret).
pub const OMNI_CONFIG: &str = "/etc/omni/omni.yaml";
pub const TAILSCALE_ENV: &str = "/etc/omni/tailscale.env";
pub const ETCD_KEY: &str = "/etc/omni/omni.asc";
pub const PROVIDER_ENV: &str = "/etc/omni/provider.env";
pub const PROVIDER_CONFIG: &str = "/etc/omni/provider.yaml";
/// A folder, always there once the provider is configured (Compose mounts it), holding the
/// Proxmox CA when one was given.
pub const PROVIDER_CA_DIR: &str = "/etc/omni/proxmox-ca";
pub const PROVIDER_CA: &str = "/etc/omni/proxmox-ca/proxmox-ca.pem";
/// Example values for the section (none real), from which `omni-image build` renders the
/// project to check it with `docker compose config`.
pub const EXAMPLE_SECTION: &str = include_str!("omni/example.yaml");

/// The account id generated when none is supplied, kept so it never changes.
pub const ACCOUNT_ID_FILE: &str = "/var/lib/omni-firstboot/omni-account-id";

#[derive(Debug, Clone)]
pub struct Secrets {
    pub name: String,
    pub account_id: Option<String>,
    pub initial_users: Vec<String>,
    pub eula_name: String,
    pub eula_email: String,
    pub oidc_issuer: String,
    pub oidc_client_id: String,
    pub oidc_client_secret: Secret,
    pub ts_auth_key: Secret,
    pub ts_hostname: String,
    /// The tailnet's DNS name (`example.ts.net`).
    pub tailnet: String,
    pub etcd_key: Option<Secret>,
    pub lan_address: Option<String>,
    pub provider: Option<Provider>,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub id: String,
    pub service_account_key: Secret,
    pub url: String,
    pub auth: ProxmoxAuth,
    pub insecure_skip_verify: bool,
    pub ca_cert: Option<String>,
}

#[derive(Debug, Clone)]
pub enum ProxmoxAuth {
    Token {
        id: String,
        secret: Secret,
    },
    Password {
        username: String,
        password: Secret,
        realm: String,
    },
}

/// The secrets of [`EXAMPLE_SECTION`].
pub fn example() -> Result<Secrets> {
    let value: Value =
        serde_yaml_ng::from_str(EXAMPLE_SECTION).context("reading the example section")?;
    let (secrets, findings) = parse(&value);
    secrets.with_context(|| format!("the example section is incomplete: {findings:?}"))
}

pub fn parse(value: &Value) -> (Option<Secrets>, Findings) {
    let mut r = Reader::new(value, "omni_appliance.omni");
    let name = r.string("name").unwrap_or_else(|| "omni".to_owned());
    if envfile::check_value("name", &name).is_err() {
        r.invalid("name", "must be one line without quotes");
    }
    let account_id = r.string("account_id");
    if let Some(id) = &account_id
        && (uuid::Uuid::try_parse(id).is_err() || id.len() != 36)
    {
        r.invalid(
            "account_id",
            "is not a UUID (like 2f3e4d5c-...); leave it out to generate one",
        );
    }
    let initial_users = r.list("initial_users");
    if initial_users.is_empty() {
        let k = r.key("initial_users");
        r.findings.missing.push(k);
    }
    for (i, u) in initial_users.iter().enumerate() {
        if !is_email(u) {
            r.invalid(&format!("initial_users[{i}]"), "is not an email address");
        }
    }
    let lan_address = r.string("lan_address");
    if let Some(lan) = &lan_address
        && lan.parse::<std::net::IpAddr>().is_err()
        && !is_dns_name(lan)
    {
        r.invalid("lan_address", "is neither an IP address nor a DNS name");
    }
    let etcd_key = r.secret_multiline("etcd_key");
    if let Some(key) = &etcd_key
        && let Err(e) = etcdkey::check(key.expose())
    {
        r.invalid("etcd_key", e);
    }

    let mut eula = r.child("eula");
    let eula_name = eula.required("name");
    let eula_email = eula.required("email");
    if eula_email.as_deref().is_some_and(|e| !is_email(e)) {
        eula.invalid("email", "is not an email address");
    }
    let eula_findings = eula.finish();

    let mut oidc = r.child("oidc");
    let issuer = oidc.required("issuer");
    if issuer.as_deref().is_some_and(|i| !is_https_url(i)) {
        oidc.invalid(
            "issuer",
            "must be an https:// URL, e.g. https://idp.example.ts.net",
        );
    }
    let client_id = oidc.required("client_id");
    let client_secret = oidc.secret("client_secret", true);
    let oidc_findings = oidc.finish();

    let mut ts = r.child("tailscale");
    let ts_auth_key = ts.secret("auth_key", true);
    super::check_tailscale_key(&mut ts, "auth_key", &ts_auth_key);
    let ts_hostname = ts.string("hostname").unwrap_or_else(|| "omni".to_owned());
    if !is_dns_name(&ts_hostname) || ts_hostname.contains('.') {
        ts.invalid("hostname", "must be a single DNS label such as `omni`");
    }
    let tailnet_given = ts.string("tailnet");
    if tailnet_given
        .as_deref()
        .is_some_and(|t| !is_dns_name(t.trim_end_matches('.')))
    {
        ts.invalid(
            "tailnet",
            "must be the tailnet's DNS name, e.g. example.ts.net",
        );
    }
    let tailnet = match (&issuer, &tailnet_given) {
        (Some(i), given) => compose::tailnet_domain(given.as_deref(), i),
        (None, Some(t)) => Some(t.clone()),
        (None, None) => None,
    };
    if tailnet.is_none() && issuer.is_some() {
        let k = ts.key("tailnet");
        ts.findings.missing.push(format!(
            "{k} (the OIDC issuer is not a *.ts.net name: give the tailnet's DNS name)"
        ));
    }
    let ts_findings = ts.finish();

    let provider = r.raw("provider").map(parse_provider);
    let mut findings = r.finish();
    for f in [eula_findings, oidc_findings, ts_findings] {
        findings.merge(f);
    }
    let provider = match provider {
        Some((p, f)) => {
            findings.merge(f);
            p
        }
        None => None,
    };
    // The provider's own problems leave the stack intact; anything else stops it.
    let stack_ok = !findings
        .missing
        .iter()
        .chain(&findings.invalid)
        .any(|k| !k.starts_with("omni_appliance.omni.provider"));
    let secrets = (|| {
        stack_ok.then_some(())?;
        Some(Secrets {
            name,
            account_id,
            initial_users,
            eula_name: eula_name?,
            eula_email: eula_email?,
            oidc_issuer: issuer?,
            oidc_client_id: client_id?,
            oidc_client_secret: client_secret?,
            ts_auth_key: ts_auth_key?,
            ts_hostname,
            tailnet: tailnet?,
            etcd_key,
            lan_address,
            provider,
        })
    })();
    (secrets, findings)
}

fn parse_provider(value: &Value) -> (Option<Provider>, Findings) {
    let mut r = Reader::new(value, "omni_appliance.omni.provider");
    let id = r.string("id").unwrap_or_else(|| "proxmox".to_owned());
    if !is_dns_name(&id) {
        r.invalid(
            "id",
            "must be a name like `proxmox` (the provider name registered in Omni)",
        );
    }
    let key = r.secret("service_account_key", true);
    let mut px = r.child("proxmox");
    let url = px
        .required("url")
        .and_then(|url| match proxmox_api_url(&url) {
            Ok(u) => Some(u),
            Err(why) => {
                px.invalid("url", why);
                None
            }
        });
    let token_id = px.string("token_id");
    let token_secret = px.secret("token_secret", false);
    let username = px.string("username");
    let password = px.secret("password", false);
    let realm = px.string("realm").unwrap_or_else(|| "pam".to_owned());
    let insecure = px.boolean("insecure_skip_verify").unwrap_or(false);
    let ca_cert = px.string("ca_cert");
    if ca_cert
        .as_deref()
        .is_some_and(|c| !c.contains("-----BEGIN CERTIFICATE-----"))
    {
        px.invalid("ca_cert", "is not a PEM certificate");
    }
    let auth = match (token_id, token_secret, username, password) {
        (Some(id), Some(secret), _, _) => {
            if !id.contains('@') || !id.contains('!') {
                px.invalid("token_id", "must look like user@realm!tokenname");
            }
            Some(ProxmoxAuth::Token { id, secret })
        }
        (Some(_), None, _, _) => {
            let k = px.key("token_secret");
            px.findings.missing.push(k);
            None
        }
        (None, _, Some(username), Some(password)) => Some(ProxmoxAuth::Password {
            username,
            password,
            realm,
        }),
        _ => {
            let k = px.key("token_id");
            px.findings
                .missing
                .push(format!("{k} (or username and password)"));
            None
        }
    };
    let mut findings = px.finish();
    let own = r.finish();
    findings.merge(own);
    let ok = findings.missing.is_empty() && findings.invalid.is_empty();
    let provider = (|| {
        ok.then_some(())?;
        Some(Provider {
            id,
            service_account_key: key?,
            url: url?,
            auth: auth?,
            insecure_skip_verify: insecure,
            ca_cert,
        })
    })();
    (provider, findings)
}

/// Normalises a Proxmox API URL: a scheme is required; a bare host gets `/api2/json`.
pub fn proxmox_api_url(url: &str) -> std::result::Result<String, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("has no scheme; write it as https://pve.example:8006/api2/json".into());
    };
    if !matches!(scheme, "https" | "http") {
        return Err(format!("has the scheme `{scheme}`; use https://"));
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err("has no host".into());
    }
    if path.trim_end_matches('/').is_empty() {
        return Ok(format!("{scheme}://{host}/api2/json"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// What applying the secrets did, for the log and `status`.
#[derive(Debug, Default)]
pub struct Applied {
    pub written: Vec<PathBuf>,
    pub notes: Vec<String>,
    /// Keys still needed: nothing of the stack was written.
    pub missing: Vec<String>,
    /// Values refused only once the machine was known: nothing of the stack was written.
    pub invalid: Vec<String>,
}

pub fn apply(root: &Root, secrets: &Secrets) -> Result<Applied> {
    let mut applied = Applied::default();

    // Where Talos machines on the LAN reach Omni; without it the stack is of no use to them.
    let endpoints = match compose::endpoints(
        root,
        &secrets.ts_hostname,
        &secrets.tailnet,
        secrets.lan_address.as_deref(),
    ) {
        Ok(e) => e,
        Err(compose::EndpointProblem::Missing(k)) => {
            applied.missing.push(k);
            return Ok(applied);
        }
        Err(compose::EndpointProblem::Invalid(k)) => {
            applied.invalid.push(k);
            return Ok(applied);
        }
    };

    let dir = root.join(DIR);
    fsutil::ensure_dir(&dir, 0o700, Some(Owner::ROOT))?;

    // The account id never changes: supplied, or generated once and kept.
    let account_id = match &secrets.account_id {
        Some(id) => id.clone(),
        None => existing_account_id(root)?.unwrap_or_else(|| {
            applied.notes.push("generated an Omni account id".into());
            uuid::Uuid::new_v4().to_string()
        }),
    };
    fsutil::write_atomic(
        &root.join(ACCOUNT_ID_FILE),
        format!("{account_id}\n").as_bytes(),
        0o600,
        Some(Owner::ROOT),
    )?;

    // The etcd key: an existing one is kept (replacing it would make Omni's data unreadable).
    let key_path = root.join(ETCD_KEY);
    let existing = fsutil::read_optional(&key_path)?;
    match (&secrets.etcd_key, existing) {
        (Some(given), Some(old)) if old != given.expose().as_bytes() => {
            let fpr = etcdkey::check(&String::from_utf8_lossy(&old)).unwrap_or_default();
            applied.notes.push(format!(
                "kept the existing etcd key {ETCD_KEY} (fingerprint {fpr}) instead of the \
                 supplied one: Omni's data is encrypted with it; remove the file by hand to \
                 replace it"
            ));
        }
        (Some(given), None) => {
            fsutil::write_atomic(
                &key_path,
                given.expose().as_bytes(),
                0o600,
                Some(Owner::ROOT),
            )?;
            applied.written.push(key_path.clone());
        }
        (None, None) => {
            let (armored, fpr) =
                etcdkey::generate(&format!("Omni etcd key <etcd@{}>", secrets.name))?;
            fsutil::write_atomic(&key_path, armored.as_bytes(), 0o600, Some(Owner::ROOT))?;
            applied.written.push(key_path.clone());
            applied.notes.push(format!(
                "generated an etcd encryption key, fingerprint {fpr}"
            ));
        }
        (_, Some(_)) => {}
    }

    let users = secrets.initial_users.join(",");
    let mut omni_env: Vec<(&str, &str)> = vec![
        ("OMNI_ACCOUNT_ID", &account_id),
        ("OMNI_NAME", &secrets.name),
        ("OMNI_INITIAL_USERS", &users),
        ("OMNI_EULA_NAME", &secrets.eula_name),
        ("OMNI_EULA_EMAIL", &secrets.eula_email),
        ("OMNI_OIDC_ISSUER", &secrets.oidc_issuer),
        ("OMNI_OIDC_CLIENT_ID", &secrets.oidc_client_id),
        ("OMNI_TAILNET_HOSTNAME", &secrets.ts_hostname),
        ("OMNI_TAILNET_FQDN", &endpoints.tailnet_fqdn),
        ("OMNI_MACHINE_API_URL", &endpoints.machine_api_url),
        ("OMNI_WIREGUARD_ADDR", &endpoints.wireguard_addr),
        ("OMNI_LAN_BIND", &endpoints.lan_bind),
    ];
    if let Some(lan) = &secrets.lan_address {
        omni_env.push(("OMNI_LAN_ADDRESS", lan));
    }
    // The provider runs once its files exist (from this seed or an earlier one).
    let provider_id = match &secrets.provider {
        Some(p) => Some(p.id.clone()),
        None => fsutil::read_optional(&root.join(PROVIDER_ENV))?
            .and_then(|b| envfile::get(&String::from_utf8_lossy(&b), "PROVIDER_ID")),
    };
    if let Some(id) = &provider_id {
        omni_env.push(("OMNI_PROVIDER_ID", id));
        omni_env.push(("COMPOSE_PROFILES", "provider"));
    }
    write_env(root, OMNI_ENV, &omni_env, &mut applied)?;
    let config = omni_config(secrets)?;
    let path = root.join(OMNI_CONFIG);
    fsutil::write_atomic(&path, config.as_bytes(), 0o600, Some(Owner::ROOT))
        .with_context(|| format!("writing {OMNI_CONFIG}"))?;
    applied.written.push(path);
    applied.notes.push(format!(
        "Omni: UI https://{}/ (tailnet); Talos machines join at {} and {}/udp",
        endpoints.tailnet_fqdn, endpoints.machine_api_url, endpoints.wireguard_addr
    ));
    write_env(
        root,
        TAILSCALE_ENV,
        &[
            ("TS_AUTHKEY", secrets.ts_auth_key.expose()),
            ("TS_HOSTNAME", &secrets.ts_hostname),
        ],
        &mut applied,
    )?;

    if let Some(p) = &secrets.provider {
        write_env(
            root,
            PROVIDER_ENV,
            &[
                ("PROVIDER_ID", &p.id),
                ("OMNI_SERVICE_ACCOUNT_KEY", p.service_account_key.expose()),
            ],
            &mut applied,
        )?;
        let yaml = provider_yaml(p)?;
        let path = root.join(PROVIDER_CONFIG);
        fsutil::write_atomic(&path, yaml.as_bytes(), 0o600, Some(Owner::ROOT))?;
        applied.written.push(path);
        fsutil::ensure_dir(&root.join(PROVIDER_CA_DIR), 0o755, Some(Owner::ROOT))?;
        let path = root.join(PROVIDER_CA);
        match &p.ca_cert {
            Some(ca) => {
                fsutil::write_atomic(&path, format!("{}\n", ca.trim()).as_bytes(), 0o644, None)?;
                applied.written.push(path);
            }
            None => {
                fsutil::remove_if_exists(&path)?;
            }
        }
    }

    // The project as omni.service will start it, checked by the image's own Compose.
    let mut hidden = vec![
        secrets.oidc_client_secret.expose(),
        secrets.ts_auth_key.expose(),
    ];
    if let Some(p) = &secrets.provider {
        hidden.push(p.service_account_key.expose());
        match &p.auth {
            ProxmoxAuth::Token { secret, .. } => hidden.push(secret.expose()),
            ProxmoxAuth::Password { password, .. } => hidden.push(password.expose()),
        }
    }
    if compose::check_project(root, OMNI_ENV, &hidden)
        .context("checking the Omni Compose project")?
    {
        applied
            .notes
            .push("docker compose config accepts the Omni project".into());
    }
    Ok(applied)
}

/// Omni's `--config-path` file: only what must not be a flag.
fn omni_config(secrets: &Secrets) -> Result<String> {
    use serde_yaml_ng::{Mapping, Value as V};
    let mut oidc = Mapping::new();
    oidc.insert(
        "clientSecret".into(),
        secrets.oidc_client_secret.expose().into(),
    );
    let mut auth = Mapping::new();
    auth.insert("oidc".into(), V::Mapping(oidc));
    let mut top = Mapping::new();
    top.insert("auth".into(), V::Mapping(auth));
    let body = serde_yaml_ng::to_string(&V::Mapping(top)).context("rendering omni.yaml")?;
    Ok(format!(
        "# Written by omni-firstboot from the seed's omni_appliance section; the other \
         settings are flags in /usr/lib/omni-image/omni/compose.yaml.\n{body}"
    ))
}

fn write_env(root: &Root, file: &str, pairs: &[(&str, &str)], applied: &mut Applied) -> Result<()> {
    let path = root.join(file);
    let text = envfile::render(pairs)?;
    fsutil::write_atomic(&path, text.as_bytes(), 0o600, Some(Owner::ROOT))
        .with_context(|| format!("writing {file}"))?;
    applied.written.push(path);
    Ok(())
}

fn existing_account_id(root: &Root) -> Result<Option<String>> {
    if let Some(bytes) = fsutil::read_optional(&root.join(ACCOUNT_ID_FILE))? {
        let id = String::from_utf8_lossy(&bytes).trim().to_owned();
        if uuid::Uuid::try_parse(&id).is_ok() {
            return Ok(Some(id));
        }
    }
    if let Some(bytes) = fsutil::read_optional(&root.join(OMNI_ENV))? {
        return Ok(envfile::get(
            &String::from_utf8_lossy(&bytes),
            "OMNI_ACCOUNT_ID",
        ));
    }
    Ok(None)
}

/// The provider's `config.yaml`, in the layout omni-infra-provider-proxmox documents.
fn provider_yaml(p: &Provider) -> Result<String> {
    use serde_yaml_ng::{Mapping, Value as V};
    let mut px = Mapping::new();
    px.insert("url".into(), p.url.clone().into());
    match &p.auth {
        ProxmoxAuth::Token { id, secret } => {
            px.insert("tokenID".into(), id.clone().into());
            px.insert("tokenSecret".into(), secret.expose().into());
        }
        ProxmoxAuth::Password {
            username,
            password,
            realm,
        } => {
            px.insert("username".into(), username.clone().into());
            px.insert("password".into(), password.expose().into());
            px.insert("realm".into(), realm.clone().into());
        }
    }
    px.insert("insecureSkipVerify".into(), V::Bool(p.insecure_skip_verify));
    let mut top = Mapping::new();
    top.insert("proxmox".into(), V::Mapping(px));
    let body = serde_yaml_ng::to_string(&V::Mapping(top)).context("rendering provider.yaml")?;
    Ok(format!(
        "# Written by omni-firstboot from the seed's omni_appliance section.\n{body}"
    ))
}

#[cfg(test)]
mod tests;
