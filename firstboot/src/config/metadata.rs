//! `meta-data` (NoCloud, YAML or JSON) and `meta_data.json` (configdrive2).

use anyhow::{Context, Result, bail};
use serde_yaml_ng::Value;

use super::value;
use crate::datasource::MetaFormat;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaData {
    pub instance_id: String,
    pub local_hostname: Option<String>,
    pub public_keys: Vec<String>,
}

pub fn parse(format: MetaFormat, bytes: &[u8], origin: &str) -> Result<MetaData> {
    let text = String::from_utf8_lossy(bytes);
    let doc: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {origin}"))?
    };
    let (id_keys, host_keys, keys_key): (&[&str], &[&str], &str) = match format {
        MetaFormat::NoCloud => (
            &["instance-id", "instance_id"],
            &["local-hostname", "hostname"],
            "public-keys",
        ),
        MetaFormat::OpenStack => (
            &["uuid", "instance-id"],
            &["hostname", "name"],
            "public_keys",
        ),
    };
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| doc.get(*k).and_then(value::string))
    };
    let Some(instance_id) = get(id_keys).filter(|id| !id.trim().is_empty()) else {
        bail!(
            "{origin} has no `{}`; a seed must name its instance, e.g. `instance-id: my-vm-1`",
            id_keys[0]
        );
    };
    let public_keys = match doc.get(keys_key) {
        Some(Value::Mapping(m)) => m.values().flat_map(value::string_list).collect(),
        Some(Value::String(s)) => s
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect(),
        Some(other) => value::string_list(other),
        None => Vec::new(),
    };
    Ok(MetaData {
        instance_id: instance_id.trim().to_owned(),
        local_hostname: get(host_keys),
        public_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxmox_meta_data_gives_the_instance_id() {
        let meta = parse(MetaFormat::NoCloud, b"instance-id: 0a1b2c\n", "meta-data").unwrap();
        assert_eq!(meta.instance_id, "0a1b2c");
        let json = br#"{"instance-id": "i-9", "local-hostname": "vm9"}"#;
        let meta = parse(MetaFormat::NoCloud, json, "meta-data").unwrap();
        assert_eq!(meta.local_hostname.as_deref(), Some("vm9"));
    }

    #[test]
    fn meta_data_without_instance_id_is_refused_with_the_fix() {
        let err = parse(MetaFormat::NoCloud, b"local-hostname: x\n", "meta-data").unwrap_err();
        assert!(err.to_string().contains("instance-id"), "{err}");
        assert!(parse(MetaFormat::NoCloud, b"", "meta-data").is_err());
    }

    #[test]
    fn configdrive_metadata_uses_uuid_and_public_keys() {
        let json =
            br#"{"uuid": "abc", "hostname": "h", "public_keys": {"key-0": "ssh-ed25519 A"}}"#;
        let meta = parse(MetaFormat::OpenStack, json, "meta_data.json").unwrap();
        assert_eq!(meta.instance_id, "abc");
        assert_eq!(meta.public_keys, vec!["ssh-ed25519 A"]);
    }
}
