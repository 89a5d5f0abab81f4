//! Hostname, fqdn and `/etc/hosts`.

use anyhow::{Context, Result, bail};

use crate::fsutil::{self, Root};

/// The hostname and fqdn to set, from user-data first, then meta-data.
pub fn choose(
    hostname: Option<&str>,
    fqdn: Option<&str>,
    meta_hostname: Option<&str>,
    prefer_fqdn: bool,
) -> Option<(String, Option<String>)> {
    let fqdn = fqdn.map(str::to_owned).or_else(|| {
        hostname
            .or(meta_hostname)
            .filter(|h| h.contains('.'))
            .map(str::to_owned)
    });
    let short = hostname
        .or(meta_hostname)
        .map(|h| h.split('.').next().unwrap_or(h).to_owned())
        .or_else(|| {
            fqdn.as_deref()
                .and_then(|f| f.split('.').next())
                .map(str::to_owned)
        })?;
    let name = match (&fqdn, prefer_fqdn) {
        (Some(f), true) => f.clone(),
        _ => short,
    };
    Some((name, fqdn.filter(|f| f.contains('.'))))
}

pub fn check(name: &str) -> Result<()> {
    if !crate::appliance::is_dns_name(name) {
        bail!("`{name}` is not a valid hostname (letters, digits and dashes, dot-separated)");
    }
    Ok(())
}

/// Writes `/etc/hostname` (and sets the running hostname on a live system).
pub fn apply(root: &Root, name: &str) -> Result<()> {
    check(name)?;
    fsutil::write_atomic(
        &root.join("/etc/hostname"),
        format!("{name}\n").as_bytes(),
        0o644,
        None,
    )
    .context("writing the hostname")?;
    if root.is_live() {
        // SAFETY: the pointer and length describe a live byte slice.
        let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setting the running hostname");
        }
    }
    Ok(())
}

/// Rewrites `/etc/hosts` with the machine's names on 127.0.1.1, as Debian does.
pub fn apply_hosts(root: &Root, name: &str, fqdn: Option<&str>) -> Result<()> {
    let path = root.join("/etc/hosts");
    let names = match fqdn {
        Some(f) if f != name => format!("{f} {name}"),
        _ => name.to_owned(),
    };
    let existing = fsutil::read_optional(&path)?.map(|b| String::from_utf8_lossy(&b).into_owned());
    let mut out = String::new();
    let mut placed = false;
    let base = existing.unwrap_or_else(|| {
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n\
         ff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n"
            .to_owned()
    });
    for line in base.lines() {
        if line.split_whitespace().next() == Some("127.0.1.1") {
            if !placed {
                out.push_str(&format!("127.0.1.1 {names}\n"));
                placed = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !placed {
        let insert_at = out.find('\n').map(|i| i + 1).unwrap_or(out.len());
        out.insert_str(insert_at, &format!("127.0.1.1 {names}\n"));
    }
    fsutil::write_atomic(&path, out.as_bytes(), 0o644, None).context("writing /etc/hosts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_user_data_then_meta_data() {
        assert_eq!(
            choose(Some("vm1"), Some("vm1.lab.example"), Some("meta"), false),
            Some(("vm1".into(), Some("vm1.lab.example".into())))
        );
        assert_eq!(
            choose(None, None, Some("meta"), false),
            Some(("meta".into(), None))
        );
        assert_eq!(
            choose(Some("a.b.c"), None, None, false),
            Some(("a".into(), Some("a.b.c".into())))
        );
        // Proxmox writes `fqdn: name` when no search domain is set.
        assert_eq!(
            choose(Some("vm"), Some("vm"), None, false),
            Some(("vm".into(), None))
        );
        assert_eq!(choose(None, None, None, false), None);
    }

    #[test]
    fn hosts_gets_one_line_for_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        fs_err::create_dir_all(root.join("/etc")).unwrap();
        fs_err::write(
            root.join("/etc/hosts"),
            "127.0.0.1 localhost\n127.0.1.1 old\n::1 x\n",
        )
        .unwrap();
        apply_hosts(&root, "vm1", Some("vm1.lab.example")).unwrap();
        apply_hosts(&root, "vm1", Some("vm1.lab.example")).unwrap();
        let hosts = fs_err::read_to_string(root.join("/etc/hosts")).unwrap();
        assert_eq!(
            hosts,
            "127.0.0.1 localhost\n127.0.1.1 vm1.lab.example vm1\n::1 x\n"
        );
        assert!(apply(&root, "bad name").is_err());
    }
}
