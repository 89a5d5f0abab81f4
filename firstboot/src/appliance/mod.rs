//! The appliance secrets section of user-data, `omni_appliance:`, and where each secret lands.
//!
//! The image says which appliance it is in [`MARKER`]; only that appliance's subsection is
//! applied, a subsection for the other one is reported by name and ignored. Values are never
//! printed: messages name the key (`omni_appliance.omni.oidc.issuer`) and what is wrong.

pub mod envfile;
pub mod etcdkey;
pub mod omni;
pub mod tsidp;

use anyhow::Result;
use serde_yaml_ng::Value;

use crate::config::{Secret, value};
use crate::fsutil::{self, Root};

/// The user-data key of the section.
pub const SECTION: &str = "omni_appliance";

/// The file, written by the builder, naming the appliance: `tsidp`, `omni` or `none`.
pub const MARKER: &str = "/etc/omni-image/appliance";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appliance {
    Tsidp,
    Omni,
}

impl Appliance {
    pub fn name(self) -> &'static str {
        match self {
            Appliance::Tsidp => "tsidp",
            Appliance::Omni => "omni",
        }
    }

    pub fn parse(name: &str) -> Option<Appliance> {
        match name.trim() {
            "tsidp" => Some(Appliance::Tsidp),
            "omni" => Some(Appliance::Omni),
            _ => None,
        }
    }

    /// The appliance an image is, from its marker file; `None` for a plain image.
    pub fn of_image(root: &Root) -> Result<Option<Appliance>> {
        let path = root.join(MARKER);
        let Some(bytes) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        match Appliance::parse(&text) {
            Some(a) => Ok(Some(a)),
            // The builder writes `none` for an image that is no appliance.
            None if matches!(text.trim(), "" | "none") => Ok(None),
            None => anyhow::bail!(
                "{} names the appliance `{}`; expected `tsidp`, `omni` or `none`",
                path.display(),
                text.trim()
            ),
        }
    }
}

/// What checking a section found. Everything here names keys, never values.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Findings {
    /// Keys the schema does not have.
    pub unknown: Vec<String>,
    /// Required keys that are absent.
    pub missing: Vec<String>,
    /// Keys whose value was refused, with the reason.
    pub invalid: Vec<String>,
}

impl Findings {
    pub fn is_clean(&self) -> bool {
        self.unknown.is_empty() && self.missing.is_empty() && self.invalid.is_empty()
    }

    fn merge(&mut self, other: Findings) {
        self.unknown.extend(other.unknown);
        self.missing.extend(other.missing);
        self.invalid.extend(other.invalid);
    }
}

/// A typed view on one mapping of the section that records what it reads.
pub(crate) struct Reader<'a> {
    map: Option<&'a serde_yaml_ng::Mapping>,
    path: String,
    known: Vec<&'static str>,
    pub findings: Findings,
}

impl<'a> Reader<'a> {
    pub fn new(value: &'a Value, path: impl Into<String>) -> Self {
        let path = path.into();
        let mut findings = Findings::default();
        let map = match value {
            Value::Mapping(m) => Some(m),
            Value::Null => None,
            _ => {
                findings
                    .invalid
                    .push(format!("{path}: expected a mapping of keys"));
                None
            }
        };
        Reader {
            map,
            path,
            known: Vec::new(),
            findings,
        }
    }

    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    pub fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    /// An optional scalar, trimmed; an empty string counts as absent.
    pub fn string(&mut self, key: &'static str) -> Option<String> {
        let v = self.raw(key)?;
        match value::string(v) {
            Some(s) if s.trim().is_empty() => None,
            Some(s) => Some(s.trim().to_owned()),
            None => {
                let k = self.key(key);
                self.findings
                    .invalid
                    .push(format!("{k}: expected a single value"));
                None
            }
        }
    }

    pub fn required(&mut self, key: &'static str) -> Option<String> {
        let v = self.string(key);
        if v.is_none()
            && !self
                .findings
                .invalid
                .iter()
                .any(|i| i.starts_with(&self.key(key)))
        {
            let k = self.key(key);
            self.findings.missing.push(k);
        }
        v
    }

    pub fn secret(&mut self, key: &'static str, required: bool) -> Option<Secret> {
        let v = if required {
            self.required(key)
        } else {
            self.string(key)
        };
        let v = v?;
        match envfile::check_value(&self.key(key), &v) {
            Ok(()) => Some(Secret::new(v)),
            Err(e) => {
                self.findings.invalid.push(e.to_string());
                None
            }
        }
    }

    /// A sub-mapping; an absent one reads as empty, so its required keys show as missing.
    pub fn child(&mut self, key: &'static str) -> Reader<'a> {
        static NULL: Value = Value::Null;
        let path = self.key(key);
        let v = self.raw(key).unwrap_or(&NULL);
        Reader::new(v, path)
    }

    /// A secret that may span lines (a key block); it never goes into an environment file.
    pub fn secret_multiline(&mut self, key: &'static str) -> Option<Secret> {
        self.string(key).map(Secret::new)
    }

    pub fn list(&mut self, key: &'static str) -> Vec<String> {
        self.raw(key).map(value::string_list).unwrap_or_default()
    }

    pub fn boolean(&mut self, key: &'static str) -> Option<bool> {
        let v = self.raw(key)?;
        let b = value::boolean(v);
        if b.is_none() {
            let k = self.key(key);
            self.findings
                .invalid
                .push(format!("{k}: expected true or false"));
        }
        b
    }

    pub fn invalid(&mut self, key: &str, why: impl std::fmt::Display) {
        let k = self.key(key);
        self.findings.invalid.push(format!("{k}: {why}"));
    }

    /// Ends reading: keys of the mapping that were never asked for are unknown.
    pub fn finish(mut self) -> Findings {
        if let Some(map) = self.map {
            for key in map.keys().filter_map(value::string) {
                if !self.known.contains(&key.as_str()) {
                    self.findings.unknown.push(format!("{}.{key}", self.path));
                }
            }
        }
        self.findings
    }
}

/// The section, checked against the appliance the image is (or both, when `None`).
#[derive(Debug, Default)]
pub struct Section {
    pub tsidp: Option<tsidp::Secrets>,
    pub omni: Option<omni::Secrets>,
    /// Whether the section had a subsection for each appliance at all.
    pub has_tsidp: bool,
    pub has_omni: bool,
    pub findings: Findings,
}

pub fn parse_section(value: &Value) -> Section {
    let mut top = Reader::new(value, SECTION);
    let mut section = Section::default();
    if let Some(v) = top.raw("tsidp") {
        section.has_tsidp = true;
        let (secrets, findings) = tsidp::parse(v);
        section.tsidp = secrets;
        section.findings.merge(findings);
    }
    if let Some(v) = top.raw("omni") {
        section.has_omni = true;
        let (secrets, findings) = omni::parse(v);
        section.omni = secrets;
        section.findings.merge(findings);
    }
    let top = top.finish();
    section.findings.merge(top);
    section
}

/// Checks a section without applying it, as `omni-image seed` does: returns the findings.
pub fn check(value: &Value) -> Findings {
    parse_section(value).findings
}

pub(crate) fn is_https_url(url: &str) -> bool {
    url.strip_prefix("https://")
        .map(|rest| {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            !host.is_empty() && !host.contains(char::is_whitespace)
        })
        .unwrap_or(false)
}

pub(crate) fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !s.contains(char::is_whitespace)
        && !domain.contains('@')
}

pub(crate) fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

pub(crate) fn check_tailscale_key(r: &mut Reader<'_>, key: &'static str, v: &Option<Secret>) {
    if let Some(s) = v
        && !s.expose().starts_with("tskey-")
    {
        r.invalid(
            key,
            "does not look like a Tailscale auth key (they start with `tskey-`)",
        );
    }
}

/// What applying the section did on this image.
#[derive(Debug, Default)]
pub struct Outcome {
    pub written: Vec<std::path::PathBuf>,
    pub notes: Vec<String>,
    /// Required keys still missing: the services that need them stay stopped.
    pub missing: Vec<String>,
    pub findings: Findings,
}

/// Applies the section for the image's appliance. Without a section, files written at an
/// earlier instance are kept; only what they lack is reported missing.
pub fn apply(root: &Root, image: Option<Appliance>, value: Option<&Value>) -> Result<Outcome> {
    let mut out = Outcome::default();
    let section = value.map(parse_section).unwrap_or_default();
    out.findings = section.findings.clone();
    let Some(image) = image else {
        if section.has_tsidp || section.has_omni {
            out.notes.push(format!(
                "{SECTION} is given but this image is no appliance (see {MARKER}): not applied"
            ));
        }
        return Ok(out);
    };
    let (ours, other) = match image {
        Appliance::Tsidp => (section.has_tsidp, section.has_omni.then_some("omni")),
        Appliance::Omni => (section.has_omni, section.has_tsidp.then_some("tsidp")),
    };
    if let Some(other) = other {
        out.notes.push(format!(
            "{SECTION}.{other} is for the other appliance; this image is {}: not applied",
            image.name()
        ));
    }
    let prefix = format!("{SECTION}.{}", image.name());
    let own = |k: &String| k.starts_with(&prefix);
    out.missing = section
        .findings
        .missing
        .iter()
        .filter(|k| own(k))
        .cloned()
        .collect();
    match image {
        Appliance::Tsidp => match &section.tsidp {
            Some(s) => out.written = tsidp::apply(root, s)?,
            None if !ours && !root.join(tsidp::ENV_FILE).exists() => {
                out.missing.push(format!("{prefix}.auth_key"));
            }
            None => {}
        },
        Appliance::Omni => match &section.omni {
            Some(s) => {
                let applied = omni::apply(root, s)?;
                out.written = applied.written;
                out.notes.extend(applied.notes);
                out.missing.extend(applied.missing);
                out.findings.invalid.extend(applied.invalid);
                if s.provider.is_none() && !root.join(omni::PROVIDER_ENV).exists() {
                    out.missing.push(format!(
                        "{prefix}.provider (the Proxmox provider stays off)"
                    ));
                }
            }
            None if !ours && !root.join(omni::OMNI_ENV).exists() => {
                out.missing
                    .push(format!("{prefix} (initial_users, eula, oidc, tailscale)"));
            }
            None => {}
        },
    }
    out.missing.dedup();
    Ok(out)
}
