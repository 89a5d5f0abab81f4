//! `omni-image acl`: prints the grant tsidp needs in the tailnet policy file, as HuJSON ready
//! to paste into its `"grants"` list.
//!
//! tsidp reads the application capability `tailscale.com/cap/tsidp` from the grants that
//! match each request: `allow_admin_ui` opens its admin UI (where OIDC clients are
//! registered), `allow_dcr` its dynamic client registration, and `extraClaims` are added to
//! the ID token (`includeInUserInfo` also to `/userinfo`). Omni refuses a login whose token
//! lacks `email_verified: true` ("invalid jwt"), and tsidp sets no such claim by itself.

use anyhow::{Result, bail};

#[derive(Debug, clap::Args)]
pub struct AclArgs {
    /// Who the grant is for: a selector of the policy file (autogroup:member, group:admins,
    /// a user's login, a tag). Repeat for several.
    #[arg(long, value_name = "SELECTOR", default_value = "autogroup:member")]
    pub src: Vec<String>,
    /// The tsidp node: its tag (tag:tsidp, from the auth key it joined with), or `*`.
    /// Repeat for several.
    #[arg(long, value_name = "SELECTOR", default_value = "tag:tsidp")]
    pub dst: Vec<String>,
    /// Leave tsidp's admin UI closed to these users.
    #[arg(long)]
    pub no_admin_ui: bool,
    /// Leave dynamic client registration closed to these users.
    #[arg(long)]
    pub no_dcr: bool,
}

pub fn run(args: &AclArgs) -> Result<()> {
    print!("{}", render(args)?);
    Ok(())
}

/// The grant as HuJSON: a JSON object with `//` comments.
pub fn render(args: &AclArgs) -> Result<String> {
    let src = selectors("--src", &args.src)?;
    let dst = selectors("--dst", &args.dst)?;
    Ok(format!(
        r#"// tsidp: add this object to the "grants" list of the tailnet policy file
// (https://login.tailscale.com/admin/acls). Grants apply at once; tsidp needs no restart.
{{
  "src": {src},
  "dst": {dst},
  "app": {{
    "tailscale.com/cap/tsidp": [
      {{
        // The admin UI, where OIDC clients such as Omni are registered.
        "allow_admin_ui": {admin},
        // Dynamic client registration (RFC 7591).
        "allow_dcr": {dcr},
        // Omni accepts only ID tokens that say the email address is verified.
        "extraClaims": {{ "email_verified": true }},
        "includeInUserInfo": true
      }}
    ]
  }}
}}
"#,
        admin = !args.no_admin_ui,
        dcr = !args.no_dcr,
    ))
}

/// A JSON list of selectors, each checked enough to keep the output valid HuJSON and to
/// catch a likely typo; the policy file's own checks do the rest when it is saved.
fn selectors(flag: &str, values: &[String]) -> Result<String> {
    if values.is_empty() {
        bail!("{flag}: give at least one selector, e.g. {flag} autogroup:member");
    }
    let mut out = Vec::new();
    for v in values {
        let v = v.trim();
        if v.is_empty() {
            bail!("{flag}: an empty selector; give e.g. autogroup:member, tag:tsidp or *");
        }
        if v.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | ','))
        {
            bail!(
                "{flag} `{v}`: a selector has no spaces, quotes or commas; repeat {flag} for \
                 each one"
            );
        }
        if let Some(tag) = v.strip_prefix("tag:")
            && (tag.is_empty()
                || !tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            bail!("{flag} `{v}`: a tag is `tag:` and a name of letters, digits and dashes");
        }
        out.push(serde_json::to_string(v)?);
    }
    Ok(format!("[{}]", out.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(src: &[&str], dst: &[&str]) -> AclArgs {
        AclArgs {
            src: src.iter().map(|s| s.to_string()).collect(),
            dst: dst.iter().map(|s| s.to_string()).collect(),
            no_admin_ui: false,
            no_dcr: false,
        }
    }

    /// HuJSON's comments removed (none of the output's strings holds `//`).
    fn strip_comments(hujson: &str) -> String {
        hujson
            .lines()
            .map(|l| match l.find("//") {
                Some(i) if !l[..i].contains('"') => &l[..i],
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_grant_parses_as_json_with_the_claim_omni_needs() {
        let text = render(&args(&["autogroup:member"], &["tag:tsidp"])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&strip_comments(&text)).unwrap();
        assert_eq!(v["src"], serde_json::json!(["autogroup:member"]));
        assert_eq!(v["dst"], serde_json::json!(["tag:tsidp"]));
        let cap = &v["app"]["tailscale.com/cap/tsidp"][0];
        assert_eq!(cap["allow_admin_ui"], true);
        assert_eq!(cap["allow_dcr"], true);
        assert_eq!(cap["extraClaims"]["email_verified"], true);
        assert_eq!(cap["includeInUserInfo"], true);
    }

    #[test]
    fn several_selectors_and_closed_features() {
        let mut a = args(&["group:admins", "alice@example.com"], &["*"]);
        a.no_dcr = true;
        let text = render(&a).unwrap();
        let v: serde_json::Value = serde_json::from_str(&strip_comments(&text)).unwrap();
        assert_eq!(
            v["src"],
            serde_json::json!(["group:admins", "alice@example.com"])
        );
        assert_eq!(v["dst"], serde_json::json!(["*"]));
        assert_eq!(v["app"]["tailscale.com/cap/tsidp"][0]["allow_dcr"], false);
        assert_eq!(
            v["app"]["tailscale.com/cap/tsidp"][0]["allow_admin_ui"],
            true
        );
    }

    #[test]
    fn bad_selectors_name_the_flag() {
        let err = render(&args(&["a b"], &["*"])).unwrap_err().to_string();
        assert!(err.starts_with("--src `a b`"), "{err}");
        let err = render(&args(&["*"], &["tag:"])).unwrap_err().to_string();
        assert!(err.starts_with("--dst `tag:`"), "{err}");
        let err = render(&args(&["*"], &["x\"y"])).unwrap_err().to_string();
        assert!(err.contains("quotes"), "{err}");
        let err = render(&args(&[], &["*"])).unwrap_err().to_string();
        assert!(err.starts_with("--src: give at least one"), "{err}");
    }

    #[test]
    fn the_command_line_parses_with_its_defaults() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["omni-image", "acl"]).unwrap();
        match cli.command {
            crate::cli::Command::Acl(a) => {
                assert_eq!(a.src, vec!["autogroup:member"]);
                assert_eq!(a.dst, vec!["tag:tsidp"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
