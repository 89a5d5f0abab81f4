//! Parameter checks driven by the official API schema (`pve-api-schema.json`).
//!
//! The rules follow the server's `PVE::JSONSchema`: every key must be declared (indexed keys
//! such as `scsi[n]` stand for `scsi0`..`scsi30`), keys without `optional` are required,
//! values are checked for type, `enum`, `pattern` (anchored), length and range, `requires`
//! pairs are enforced, and property strings (a nested `format` object) are split into their
//! keys and each key checked the same way. Named formats are server code and absent from the
//! dump; the ones our client sends are re-implemented in [`check_named_format`], the others
//! are accepted unchecked.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use regex::Regex;
use serde_json::Value;

/// Request parameters as the server sees them: every value is a string; arrays repeat a key.
pub type Params = BTreeMap<String, Vec<String>>;

/// Per-parameter error messages, the `errors` object of a 400 answer.
pub type ParamErrors = BTreeMap<String, String>;

pub struct Schema {
    endpoints: Vec<Endpoint>,
}

struct Endpoint {
    segments: Vec<String>,
    info: serde_json::Map<String, Value>,
}

/// One method of one path, as matched against a request.
pub struct Method<'a> {
    /// The schema path, e.g. `/nodes/{node}/qemu`.
    pub path: String,
    pub info: &'a Value,
    /// Values taken from the path's `{placeholders}`.
    pub path_params: BTreeMap<String, String>,
}

impl Schema {
    pub fn load(path: &Path) -> anyhow::Result<Schema> {
        let text = fs_err::read_to_string(path)?;
        let tree: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing API schema {}", path.display()))?;
        let mut endpoints = Vec::new();
        fn walk(node: &Value, out: &mut Vec<Endpoint>) {
            if let (Some(path), Some(info)) = (node["path"].as_str(), node["info"].as_object()) {
                out.push(Endpoint {
                    segments: path
                        .split('/')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                    info: info.clone(),
                });
            }
            for child in node["children"].as_array().into_iter().flatten() {
                walk(child, out);
            }
        }
        for root in tree.as_array().context("API schema is not a list")? {
            walk(root, &mut endpoints);
        }
        Ok(Schema { endpoints })
    }

    /// Finds the schema entry for a request path (below `/api2/json`, already split and
    /// percent-decoded). `Err(true)` means the path exists but not with this method.
    pub fn find(&self, method: &str, segments: &[String]) -> Result<Method<'_>, bool> {
        let mut path_exists = false;
        for ep in &self.endpoints {
            if ep.segments.len() != segments.len() {
                continue;
            }
            let mut path_params = BTreeMap::new();
            let matched = ep.segments.iter().zip(segments).all(|(pat, seg)| {
                if let Some(name) = pat.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    path_params.insert(name.to_string(), seg.clone());
                    true
                } else {
                    pat == seg
                }
            });
            if !matched {
                continue;
            }
            path_exists = true;
            if let Some(info) = ep.info.get(method) {
                return Ok(Method {
                    path: format!("/{}", ep.segments.join("/")),
                    info,
                    path_params,
                });
            }
        }
        Err(path_exists)
    }
}

/// Checks a request's parameters (path parameters merged in) against a method's schema.
pub fn check_params(method: &Value, params: &Params) -> ParamErrors {
    let mut errors = ParamErrors::new();
    let schema = &method["parameters"];
    let props = schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let additional = schema["additionalProperties"].as_i64().unwrap_or(0) != 0;

    for (key, values) in params {
        let Some(prop) = lookup_key(&props, key) else {
            if !additional {
                errors.insert(
                    key.clone(),
                    "property is not defined in schema and the schema does not allow \
                     additional properties"
                        .into(),
                );
            }
            continue;
        };
        if prop["type"] == "array" {
            for v in values {
                if let Err(e) = check_value(&prop["items"], v) {
                    errors.insert(key.clone(), e);
                }
            }
        } else if values.len() > 1 {
            errors.insert(key.clone(), "duplicate parameter (not an array)".into());
        } else if let Err(e) = check_value(prop, &values[0]) {
            errors.insert(key.clone(), e);
        }
        if let Some(req) = prop["requires"].as_str()
            && !params.contains_key(req)
        {
            errors.insert(req.to_string(), format!("parameter is required by '{key}'"));
        }
    }
    for (key, prop) in &props {
        if key.ends_with("[n]") {
            continue;
        }
        if prop["optional"].as_i64().unwrap_or(0) == 0 && !params.contains_key(key) {
            errors.insert(
                key.clone(),
                "property is missing and it is not optional".into(),
            );
        }
    }
    errors
}

/// The schema of a parameter name, resolving indexed keys (`net0` against `net[n]`).
fn lookup_key<'a>(props: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    if let Some(p) = props.get(key) {
        return Some(p);
    }
    let split = key.find(|c: char| c.is_ascii_digit())?;
    let (base, index) = key.split_at(split);
    let index: u32 = index.parse().ok()?;
    let prop = props.get(&format!("{base}[n]"))?;
    let max = index_limit(prop["description"].as_str().unwrap_or(""));
    (index <= max).then_some(prop)
}

/// The highest index of an indexed key, read from "(n is 0 to 30)" in its description.
fn index_limit(description: &str) -> u32 {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"n is 0 to (\d+)").unwrap());
    re.captures(description)
        .and_then(|c| c[1].parse().ok())
        .unwrap_or(31)
}

/// Checks one value against a property schema, as `PVE::JSONSchema::check_prop` does.
pub fn check_value(prop: &Value, value: &str) -> Result<(), String> {
    match prop["type"].as_str().unwrap_or("string") {
        "integer" => {
            let n: i64 = value
                .parse()
                .map_err(|_| format!("type check ('integer') failed - got '{value}'"))?;
            check_range(prop, n as f64)?;
        }
        "number" => {
            let n: f64 = value
                .parse()
                .map_err(|_| format!("type check ('number') failed - got '{value}'"))?;
            check_range(prop, n)?;
        }
        "boolean" => {
            if parse_bool(value).is_none() {
                return Err(format!("type check ('boolean') failed - got '{value}'"));
            }
        }
        _ => {
            if let Some(max) = prop["maxLength"].as_u64()
                && value.chars().count() as u64 > max
            {
                return Err(format!("value may only be {max} characters long"));
            }
            if let Some(min) = prop["minLength"].as_u64()
                && (value.chars().count() as u64) < min
            {
                return Err(format!("value must be at least {min} characters long"));
            }
        }
    }
    if let Some(choices) = prop["enum"].as_array()
        && !choices.iter().any(|c| c.as_str() == Some(value))
    {
        let list: Vec<&str> = choices.iter().filter_map(Value::as_str).collect();
        return Err(format!(
            "value '{value}' does not have a value in the enumeration '{}'",
            list.join(", ")
        ));
    }
    if let Some(pattern) = prop["pattern"].as_str() {
        let re = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())?;
        if !re.is_match(value) {
            return Err("value does not match the regex pattern".into());
        }
    }
    match &prop["format"] {
        Value::Object(format) => check_property_string(format, value),
        Value::String(name) => check_named_format(name, value),
        _ => Ok(()),
    }
}

fn check_range(prop: &Value, n: f64) -> Result<(), String> {
    let bound = |v: &Value| {
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    };
    if let Some(min) = bound(&prop["minimum"])
        && n < min
    {
        return Err(format!("value must have a minimum value of {min}"));
    }
    if let Some(max) = bound(&prop["maximum"])
        && n > max
    {
        return Err(format!("value must have a maximum value of {max}"));
    }
    Ok(())
}

pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Splits a property string `a=1,b=2` (a leading bare value belongs to the `default_key`).
pub fn split_property_string(value: &str) -> Vec<(Option<String>, String)> {
    value
        .split(',')
        .map(|part| match part.split_once('=') {
            Some((k, v)) => (Some(k.to_string()), v.to_string()),
            None => (None, part.to_string()),
        })
        .collect()
}

/// Checks a property string against its nested format, as `parse_property_string` does.
fn check_property_string(
    format: &serde_json::Map<String, Value>,
    value: &str,
) -> Result<(), String> {
    let default_key = format
        .iter()
        .find(|(_, p)| p["default_key"].as_i64() == Some(1))
        .map(|(k, _)| k.clone());
    let mut seen = BTreeMap::new();
    let mut problems = Vec::new();
    for (key, v) in split_property_string(value) {
        let mut key = match key {
            Some(k) => k,
            None => match &default_key {
                Some(k) if !seen.contains_key(k) => k.clone(),
                _ => {
                    // A bare value may also be a key alias (`virtio` in `net0`).
                    if let Some(alias) = format.get(&v)
                        && alias.get("keyAlias").is_some()
                    {
                        problems.push(format!("missing value for '{v}'"));
                    } else {
                        problems.push(format!(
                            "value without key, but schema does not define a default key: '{v}'"
                        ));
                    }
                    continue;
                }
            },
        };
        let mut v = v;
        if let Some(entry) = format.get(&key)
            && let Some(alias) = entry["alias"].as_str()
        {
            if let Some(key_alias) = entry["keyAlias"].as_str() {
                // `virtio=MAC` means model=virtio, macaddr=MAC.
                seen.insert(key_alias.to_string(), key.clone());
                if let Err(e) = check_value(&format[key_alias], &key) {
                    problems.push(format!("{key_alias}: {e}"));
                }
            }
            key = alias.to_string();
        }
        // A bare key alias (`virtio` without a MAC) is its default key's value.
        if default_key.as_deref() == Some(key.as_str())
            && let Some(entry) = format.get(&v)
            && let Some(key_alias) = entry["keyAlias"].as_str()
        {
            key = key_alias.to_string();
        }
        let Some(schema) = format.get(&key) else {
            problems.push(format!("invalid format - unknown key '{key}'"));
            continue;
        };
        if seen.insert(key.clone(), v.clone()).is_some() {
            problems.push(format!("duplicate key '{key}'"));
            continue;
        }
        if let Err(e) = check_value(schema, &v) {
            problems.push(format!("{key}: {e}"));
        }
        v.clear();
    }
    for (key, schema) in format {
        if schema.get("alias").is_some() {
            continue;
        }
        if schema["optional"].as_i64().unwrap_or(0) == 0 && !seen.contains_key(key) {
            problems.push(format!("{key}: property is missing and it is not optional"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("invalid format - {}", problems.join("; ")))
    }
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).unwrap())
}

/// The named formats this client sends, re-implemented from the server's code. Unknown names
/// are accepted.
pub fn check_named_format(name: &str, value: &str) -> Result<(), String> {
    static DNS: OnceLock<Regex> = OnceLock::new();
    static NODE: OnceLock<Regex> = OnceLock::new();
    static STORAGE: OnceLock<Regex> = OnceLock::new();
    static TAG: OnceLock<Regex> = OnceLock::new();
    static MAC: OnceLock<Regex> = OnceLock::new();
    static BRIDGE: OnceLock<Regex> = OnceLock::new();
    static CONFIGID: OnceLock<Regex> = OnceLock::new();
    static VOLID: OnceLock<Regex> = OnceLock::new();
    static DISKSIZE: OnceLock<Regex> = OnceLock::new();
    let label = r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?";
    let ok = match name {
        "dns-name" => re(&DNS, &format!(r"^({label}\.)*{label}$")).is_match(value),
        "pve-node" => re(&NODE, &format!("^{label}$")).is_match(value),
        "pve-storage-id" => re(&STORAGE, r"^[a-z][a-z0-9\-_.]*[a-z0-9]$").is_match(value),
        "pve-vmid" => value.parse::<u32>().is_ok_and(|n| n >= 100),
        "pve-tag-list" => {
            let tag = re(&TAG, r"^(?i)[a-z0-9_][a-z0-9_\-+.]*$");
            value
                .split([';', ',', ' '])
                .filter(|t| !t.is_empty())
                .all(|t| tag.is_match(t))
        }
        "mac-addr" => re(&MAC, r"^(?i)[a-f0-9][02468ace](?::[a-f0-9]{2}){5}$").is_match(value),
        "pve-bridge-id" => re(&BRIDGE, r"^[-_.\w\d]+$").is_match(value),
        "pve-configid" => re(&CONFIGID, r"^[a-z][a-z0-9_-]+$").is_match(value),
        "pve-configid-list" => {
            let id = re(&CONFIGID, r"^[a-z][a-z0-9_-]+$");
            value
                .split([',', ';', ' '])
                .filter(|t| !t.is_empty())
                .all(|t| id.is_match(t))
        }
        "pve-volume-id" => re(&VOLID, r"^[a-z][a-z0-9\-_.]*[a-z0-9]:.+$").is_match(value),
        "pve-volume-id-or-qm-path" => {
            value == "none"
                || value == "cdrom"
                || value.starts_with('/')
                || re(&VOLID, r"^[a-z][a-z0-9\-_.]*[a-z0-9]:.+$").is_match(value)
        }
        "pve-volume-id-or-absolute-path" => {
            value.starts_with('/') || re(&VOLID, r"^[a-z][a-z0-9\-_.]*[a-z0-9]:.+$").is_match(value)
        }
        "disk-size" => re(&DISKSIZE, r"^\d+(\.\d+)?[KMGT]?$").is_match(value),
        "pve-qm-boot" => check_boot(value),
        "pve-qm-ipconfig" => return check_ipconfig(value),
        "urlencoded" => percent_decode(value).is_some(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "value does not look like a valid {}",
            format_noun(name)
        ))
    }
}

fn format_noun(name: &str) -> &str {
    match name {
        "dns-name" => "DNS name",
        "pve-node" => "node name",
        "pve-storage-id" => "storage ID",
        "pve-tag-list" => "tag list",
        "mac-addr" => "MAC address",
        "pve-volume-id" | "pve-volume-id-or-qm-path" | "pve-volume-id-or-absolute-path" => {
            "volume ID"
        }
        other => other,
    }
}

fn check_boot(value: &str) -> bool {
    split_property_string(value)
        .iter()
        .all(|(k, v)| match k.as_deref() {
            Some("order") => v.split(';').all(|dev| {
                let dev_re =
                    Regex::new(r"^(ide|sata|scsi|virtio|net|efidisk|tpmstate)\d+$").unwrap();
                dev_re.is_match(dev)
            }),
            Some("legacy") | None => v.chars().all(|c| "acdn".contains(c)) && !v.is_empty(),
            _ => false,
        })
}

fn check_ipconfig(value: &str) -> Result<(), String> {
    for (k, v) in split_property_string(value) {
        let ok = match k.as_deref() {
            Some("ip") => v == "dhcp" || parse_cidr(&v, false),
            Some("gw") => v.parse::<std::net::Ipv4Addr>().is_ok(),
            Some("ip6") => v == "dhcp" || v == "auto" || parse_cidr(&v, true),
            Some("gw6") => v.parse::<std::net::Ipv6Addr>().is_ok(),
            _ => return Err(format!("invalid format - unknown key '{}'", k.unwrap_or(v))),
        };
        if !ok {
            return Err(format!(
                "invalid format - {}: invalid value '{v}'",
                k.unwrap_or_default()
            ));
        }
    }
    Ok(())
}

fn parse_cidr(value: &str, v6: bool) -> bool {
    let Some((addr, len)) = value.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    if v6 {
        addr.parse::<std::net::Ipv6Addr>().is_ok() && len <= 128
    } else {
        addr.parse::<std::net::Ipv4Addr>().is_ok() && len <= 32
    }
}

/// Decodes `%XX` escapes and `+` (as a form body encodes a space).
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `a=1&b=2` (a query string or a form body) into parameters.
pub fn parse_form(body: &str) -> Option<Params> {
    let mut params = Params::new();
    for pair in body.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(&k.replace('+', " "))?;
        let v = percent_decode(&v.replace('+', " "))?;
        params.entry(k).or_default().push(v);
    }
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::load(&super::super::schema_path()).unwrap()
    }

    #[test]
    fn create_vm_accepts_the_documented_template_parameters() {
        let schema = schema();
        let segs: Vec<String> = ["nodes", "pve", "qemu"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = schema.find("POST", &segs).unwrap();
        let mut params = parse_form(
            "vmid=100&name=tsidp&machine=q35&bios=ovmf&scsihw=virtio-scsi-single\
             &efidisk0=local%3A1%2Cefitype%3D4m%2Cpre-enrolled-keys%3D0\
             &scsi0=local%3A0%2Cimport-from%3Dlocal%3Aimport%2Ft.qcow2&ide2=local%3Acloudinit\
             &serial0=socket&vga=serial0&agent=1&boot=order%3Dscsi0\
             &net0=virtio%2Cbridge%3Dvmbr0&memory=1024&cores=1&tags=a%3Bb",
        )
        .unwrap();
        params.insert("node".into(), vec!["pve".into()]);
        assert_eq!(check_params(m.info, &params), ParamErrors::new());
    }

    #[test]
    fn property_strings_reject_unknown_keys_and_bad_enums() {
        let schema = schema();
        let segs: Vec<String> = ["nodes", "pve", "qemu"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = schema.find("POST", &segs).unwrap();
        let mut params = parse_form(
            "vmid=100&scsi0=local%3A0%2Cbogus%3D1&efidisk0=local%3A1%2Cefitype%3D8m\
             &net0=virtio%2Cbridge%3Dvmbr0%2Cfoo%3D1&name=not_dns&memory=8&scsi99=local%3A1",
        )
        .unwrap();
        params.insert("node".into(), vec!["pve".into()]);
        let errors = check_params(m.info, &params);
        for key in ["scsi0", "efidisk0", "net0", "name", "memory", "scsi99"] {
            assert!(errors.contains_key(key), "{key} not rejected: {errors:?}");
        }
    }

    #[test]
    fn missing_required_and_unknown_parameters_are_reported() {
        let schema = schema();
        let segs: Vec<String> = ["nodes", "pve", "qemu", "100", "clone"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = schema.find("POST", &segs).unwrap();
        let mut params = parse_form("colour=red").unwrap();
        params.insert("node".into(), vec!["pve".into()]);
        params.insert("vmid".into(), vec!["100".into()]);
        let errors = check_params(m.info, &params);
        assert!(errors["newid"].contains("not optional"));
        assert!(errors["colour"].contains("not defined"));
    }
}
