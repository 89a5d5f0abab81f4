//! Reading the account databases of the target tree (`/etc/passwd`, `/etc/group`) and setting
//! password hashes in `/etc/shadow` directly, so that no password passes through an argument
//! list or a PAM conversation.

use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result, bail};

use crate::fsutil::{self, Owner, Root};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// All entries of `/etc/passwd` in `root`.
pub fn users(root: &Root) -> Result<Vec<Passwd>> {
    let path = root.join("/etc/passwd");
    let text = fsutil::read_optional(&path)?.unwrap_or_default();
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(Passwd {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect())
}

pub fn user(root: &Root, name: &str) -> Result<Option<Passwd>> {
    Ok(users(root)?.into_iter().find(|u| u.name == name))
}

/// The id of a group in `/etc/group`, by name.
pub fn group_id(root: &Root, name: &str) -> Result<Option<u32>> {
    let path = root.join("/etc/group");
    let text = fsutil::read_optional(&path)?.unwrap_or_default();
    Ok(String::from_utf8_lossy(&text).lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[0] == name)
            .then(|| f[2].parse().ok())
            .flatten()
    }))
}

/// Resolves a cloud-config `owner` such as `root:root`, `admin` or `1000:1000`.
pub fn resolve_owner(root: &Root, spec: &str) -> Result<Owner> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, default_gid) = match user_part.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let entry =
                user(root, user_part)?.with_context(|| format!("no user `{user_part}` exists"))?;
            (entry.uid, entry.gid)
        }
    };
    let gid = match group_part {
        None | Some("") => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_id(root, g)?.with_context(|| format!("no group `{g}` exists"))?,
        },
    };
    Ok(Owner { uid, gid })
}

/// Sets the password hash of `name` in `/etc/shadow`; `expire` forces a change at next login.
pub fn set_password_hash(root: &Root, name: &str, hash: &str, expire: bool) -> Result<()> {
    if hash.contains([':', '\n']) {
        bail!("the password hash for `{name}` contains `:` or a newline");
    }
    let path = root.join("/etc/shadow");
    let meta = fs_err::metadata(&path)?;
    let text = fs_err::read_to_string(&path)?;
    let days = (jiff::Timestamp::now().as_second() / 86_400).to_string();
    let mut found = false;
    let mut out = String::with_capacity(text.len() + 128);
    for line in text.lines() {
        let mut f: Vec<String> = line.split(':').map(str::to_owned).collect();
        if f.len() >= 3 && f[0] == name {
            f[1] = hash.to_owned();
            f[2] = if expire { "0".to_owned() } else { days.clone() };
            found = true;
            out.push_str(&f.join(":"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !found {
        bail!("no entry for `{name}` in {}", path.display());
    }
    let owner = Owner {
        uid: meta.uid(),
        gid: meta.gid(),
    };
    fsutil::write_atomic(&path, out.as_bytes(), meta.mode() & 0o7777, Some(owner))
        .context("updating the shadow file")
}

/// Whether the password field of `name` in `/etc/shadow` holds a usable hash.
pub fn has_password(root: &Root, name: &str) -> Result<bool> {
    let text = fsutil::read_optional(&root.join("/etc/shadow"))?.unwrap_or_default();
    Ok(String::from_utf8_lossy(&text).lines().any(|line| {
        let f: Vec<&str> = line.split(':').collect();
        f.len() >= 2 && f[0] == name && f[1].starts_with('$')
    }))
}

/// Hashes a plain-text password with SHA-512 crypt and a random salt.
pub fn hash_password(plain: &str) -> Result<String> {
    use sha_crypt::{PasswordHasher, ShaCrypt};
    let mut salt = [0u8; 12];
    getrandom_fill(&mut salt)?;
    let hash = ShaCrypt::SHA512
        .hash_password_with_salt(plain.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?;
    Ok(hash.to_string())
}

/// Whether a cloud-config password value is already a crypt hash.
pub fn is_crypt_hash(value: &str) -> bool {
    let parts: Vec<&str> = value.split('$').collect();
    value.starts_with('$') && parts.len() >= 4 && !parts[1].is_empty()
}

pub fn getrandom_fill(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    fs_err::File::open("/dev/urandom")?
        .read_exact(buf)
        .context("reading /dev/urandom")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        fs_err::create_dir_all(root.join("/etc")).unwrap();
        fs_err::write(
            root.join("/etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nadmin:x:1000:1000::/home/admin:/bin/bash\n",
        )
        .unwrap();
        fs_err::write(
            root.join("/etc/group"),
            "root:x:0:\nadm:x:4:\nadmin:x:1000:\n",
        )
        .unwrap();
        fs_err::write(
            root.join("/etc/shadow"),
            "root:*:19000:0:99999:7:::\nadmin:!:19000::::::\n",
        )
        .unwrap();
        (dir, root)
    }

    #[test]
    fn owners_resolve_by_name_and_number() {
        let (_d, root) = tree();
        assert_eq!(resolve_owner(&root, "root:root").unwrap(), Owner::ROOT);
        assert_eq!(
            resolve_owner(&root, "admin").unwrap(),
            Owner {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(
            resolve_owner(&root, "admin:adm").unwrap(),
            Owner { uid: 1000, gid: 4 }
        );
        assert_eq!(
            resolve_owner(&root, "5:6").unwrap(),
            Owner { uid: 5, gid: 6 }
        );
        assert!(
            resolve_owner(&root, "nobody-here")
                .unwrap_err()
                .to_string()
                .contains("no user")
        );
    }

    #[test]
    fn a_password_hash_replaces_only_that_users_field() {
        let (_d, root) = tree();
        set_password_hash(&root, "admin", "$6$salt$hash", false).unwrap();
        let shadow = fs_err::read_to_string(root.join("/etc/shadow")).unwrap();
        assert!(shadow.starts_with("root:*:19000:"));
        assert!(shadow.contains("admin:$6$salt$hash:"));
        assert!(has_password(&root, "admin").unwrap());
        set_password_hash(&root, "admin", "$6$salt$hash", true).unwrap();
        let shadow = fs_err::read_to_string(root.join("/etc/shadow")).unwrap();
        assert!(shadow.contains("admin:$6$salt$hash:0:"));
        assert!(set_password_hash(&root, "ghost", "$6$x$y", false).is_err());
    }

    #[test]
    fn plain_passwords_hash_to_sha512_crypt() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$6$"), "{hash}");
        assert!(is_crypt_hash(&hash));
        assert!(!is_crypt_hash("correct horse"));
        assert_ne!(hash, hash_password("correct horse").unwrap());
    }
}
