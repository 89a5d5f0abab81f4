//! Lenient readers for YAML values, as cloud-init reads them.

use serde_yaml_ng::Value;

/// A scalar as text: strings as they are, numbers and booleans written out.
pub fn string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Tagged(t) => string(&t.value),
        _ => None,
    }
}

/// A boolean in any of the spellings YAML 1.1 and cloud-init accept.
pub fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "y" | "1" => Some(true),
            "false" | "no" | "off" | "n" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        _ => None,
    }
}

/// A list of strings: a sequence, or one string of comma-separated items.
pub fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items.iter().filter_map(string).collect(),
        Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Value::Null => Vec::new(),
        other => string(other).into_iter().collect(),
    }
}

/// The keys of a mapping, as strings.
pub fn keys(v: &Value) -> Vec<String> {
    match v {
        Value::Mapping(m) => m.keys().filter_map(string).collect(),
        _ => Vec::new(),
    }
}
