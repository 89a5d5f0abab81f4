//! Environment files that both systemd's `EnvironmentFile=` and Docker Compose's `env_file:` /
//! `--env-file` read the same way.

use anyhow::{Result, bail};

/// Renders `KEY=value` lines; values with characters outside a safe set are single-quoted,
/// which both readers take literally (no `$` interpolation).
pub fn render(pairs: &[(&str, &str)]) -> Result<String> {
    let mut out =
        String::from("# Written by omni-firstboot from the seed's omni_appliance section.\n");
    for (key, value) in pairs {
        check_value(key, value)?;
        let safe = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
        if safe && !value.is_empty() {
            out.push_str(&format!("{key}={value}\n"));
        } else {
            out.push_str(&format!("{key}='{value}'\n"));
        }
    }
    Ok(out)
}

/// Checks that a value can be written to an environment file (the value itself is never
/// part of the message).
pub fn check_value(key: &str, value: &str) -> Result<()> {
    if value.contains(['\n', '\r', '\0']) {
        bail!("the value for {key} spans lines");
    }
    if value.contains('\'') {
        bail!("the value for {key} contains a single quote, which an environment file cannot hold");
    }
    Ok(())
}

/// Reads one variable back from an environment file written by [`render`].
pub fn get(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('\'').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_only_when_needed() {
        let text = render(&[("A", "tskey-auth-k1"), ("B", "x y$z"), ("C", "")]).unwrap();
        assert!(text.contains("\nA=tskey-auth-k1\n"));
        assert!(text.contains("\nB='x y$z'\n"));
        assert!(text.contains("\nC=''\n"));
        assert_eq!(get(&text, "B").as_deref(), Some("x y$z"));
    }

    #[test]
    fn unsafe_values_are_refused_without_showing_them() {
        let err = render(&[("SECRET", "abc'def")]).unwrap_err().to_string();
        assert!(err.contains("SECRET") && !err.contains("abc"), "{err}");
        assert!(render(&[("SECRET", "a\nb")]).is_err());
    }
}
