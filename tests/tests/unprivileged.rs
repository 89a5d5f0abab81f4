//! A build without root: `omni-image build` run by an unprivileged user (with subordinate
//! ids in /etc/subuid and /etc/subgid) bootstraps and assembles the image inside a user
//! namespace. Its outputs belong to that user, and the files inside the image have the
//! owners the packages gave them, not the user's ids.
//!
//! Run as root (as CI does), the test makes a dedicated user, `omni-image-test`, with a
//! range of subordinate ids, and builds as that user. Run as another user, it builds as
//! that user, who then needs a range of their own.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use omni_image_tests::images::{heavy_lock, host, raw_disk, stderr};
use omni_image_tests::{bin, workspace};

const USER: &str = "omni-image-test";

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The first range of `user` in a subid file, as (start, count).
fn subids(file: &str, user: &str, uid: u32) -> Option<(u64, u64)> {
    let text = fs_err::read_to_string(file).unwrap_or_default();
    text.lines().find_map(|l| {
        let mut p = l.trim().split(':');
        let (who, start, count) = (p.next()?, p.next()?, p.next()?);
        (who == user || who == uid.to_string())
            .then(|| Some((start.parse().ok()?, count.parse().ok()?)))
            .flatten()
    })
}

/// Who builds: the dedicated user when the test runs as root, else the current user.
struct Builder {
    /// `Some(name)` when commands must be run as that user with runuser.
    run_as: Option<String>,
    uid: u32,
    gid: u32,
}

impl Builder {
    fn get() -> Builder {
        if is_root() {
            let (uid, gid) = ensure_user();
            Builder {
                run_as: Some(USER.into()),
                uid,
                gid,
            }
        } else {
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            let name = std::env::var("USER").unwrap_or_default();
            for file in ["/etc/subuid", "/etc/subgid"] {
                assert!(
                    subids(file, &name, uid).is_some_and(|(_, n)| n >= 65536),
                    "this test builds without root and needs 65536 subordinate ids for \
                     {name} in {file}: run it as root (it then makes the user {USER}), or \
                     run `sudo usermod --add-subuids 100000-165535 --add-subgids \
                     100000-165535 {name}`"
                );
            }
            Builder {
                run_as: None,
                uid,
                gid,
            }
        }
    }

    fn command(&self, program: &Path) -> Command {
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Hands a folder the test made to the builder.
    fn own(&self, dir: &Path) {
        if self.run_as.is_some() {
            std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid)).unwrap();
        }
    }

    fn build(&self, out: &Path, cache: &Path) -> Output {
        let args = [
            "build",
            "recipes/tsidp.toml",
            "--output",
            out.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        let result = self
            .command(&bin("omni-image"))
            .args(args)
            .current_dir(workspace())
            .output()
            .expect("running omni-image");
        eprintln!("$ omni-image {} (as uid {})", args.join(" "), self.uid);
        eprintln!("{}", String::from_utf8_lossy(&result.stderr));
        result
    }
}

/// Makes the dedicated user, once, and gives it a range of subordinate ids that no other
/// entry of /etc/subuid or /etc/subgid overlaps.
fn ensure_user() -> (u32, u32) {
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, USER])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        host(Command::new("useradd").args([
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            USER,
        ]));
    }
    let uid = id("-u").expect("the test user exists");
    let gid = id("-g").expect("the test user has a group");
    let has = |file| subids(file, USER, uid).is_some_and(|(_, n)| n >= 65536);
    if !has("/etc/subuid") || !has("/etc/subgid") {
        let end = ["/etc/subuid", "/etc/subgid"]
            .iter()
            .flat_map(|f| {
                fs_err::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| {
                        let mut p = l.split(':').skip(1);
                        Some(p.next()?.parse::<u64>().ok()? + p.next()?.parse::<u64>().ok()?)
                    })
                    .collect::<Vec<_>>()
            })
            .max()
            .unwrap_or(0)
            .max(100_000);
        let start = end.div_ceil(65536) * 65536;
        let range = format!("{start}-{}", start + 65535);
        host(Command::new("usermod").args([
            "--add-subuids",
            &range,
            "--add-subgids",
            &range,
            USER,
        ]));
    }
    (uid, gid)
}

/// Names from an /etc/passwd or /etc/group text, by id.
fn ids(text: &str) -> BTreeSet<u32> {
    text.lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

fn id_of(text: &str, name: &str) -> u32 {
    text.lines()
        .find_map(|l| {
            let mut p = l.split(':');
            (p.next()? == name)
                .then(|| p.nth(1)?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{name} is not in the image's account files"))
}

/// The root filesystem of a qcow2 image, as a raw disk and the byte offset of the root
/// partition (for debugfs's `FILE?offset=N`).
fn root_fs(qcow2: &Path, dir: &Path) -> String {
    let (raw, table) = raw_disk(qcow2, dir);
    let offset = table["partitiontable"]["partitions"][1]["start"]
        .as_u64()
        .unwrap()
        * 512;
    format!("{}?offset={offset}", raw.display())
}

fn debugfs(fs: &str, request: &str) -> String {
    host(Command::new("debugfs").args(["-R", request]).arg(fs))
}

/// `(mode, uid, gid)` of a path inside the filesystem, from `debugfs stat`.
fn stat(fs: &str, path: &str) -> (u32, u32, u32) {
    let text = debugfs(fs, &format!("stat {path}"));
    let field = |name: &str| -> &str {
        let at = text
            .find(name)
            .unwrap_or_else(|| panic!("no {name} for {path}:\n{text}"));
        text[at + name.len()..].split_whitespace().next().unwrap()
    };
    (
        u32::from_str_radix(field("Mode:"), 8).unwrap(),
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
    )
}

/// Every owner of every entry under `dir` (not following links).
fn owners(dir: &Path, uids: &mut BTreeSet<u32>, gids: &mut BTreeSet<u32>, at: &mut Vec<String>) {
    for entry in fs_err::read_dir(dir).unwrap().flatten() {
        let meta = entry.path().symlink_metadata().unwrap();
        if uids.insert(meta.uid()) | gids.insert(meta.gid()) {
            at.push(format!(
                "{} {}:{}",
                entry.path().display(),
                meta.uid(),
                meta.gid()
            ));
        }
        if meta.is_dir() {
            owners(&entry.path(), uids, gids, at);
        }
    }
}

fn check_outputs(out: &Path, b: &Builder) {
    let mut names: Vec<String> = fs_err::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // Nothing else: the scratch tree, whose files belong to subordinate ids, is gone.
    assert_eq!(
        names,
        ["tsidp.manifest.json", "tsidp.qcow2", "tsidp.qcow2.sha256"],
        "{}",
        out.display()
    );
    for n in &names {
        let meta = fs_err::metadata(out.join(n)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (b.uid, b.gid),
            "{n} is not owned by the user who built it"
        );
    }
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs_err::read(out.join("tsidp.manifest.json")).unwrap()).unwrap()
}

#[test]
fn a_build_without_root_has_the_images_owners_and_the_users_outputs() {
    let b = Builder::get();
    let exe = bin("omni-image");
    let can_run = b
        .command(Path::new("test"))
        .arg("-x")
        .arg(&exe)
        .current_dir(workspace())
        .status()
        .unwrap();
    assert!(
        can_run.success(),
        "uid {} cannot run {}: make it and the folders above it readable and searchable by \
         others (chmod o+rx), or point OMNI_IMAGE_TARGET_DIR at a target folder it can read",
        b.uid,
        exe.display()
    );

    let _lock = heavy_lock();
    // The package cache is kept between runs (so only the first run downloads); the base
    // tree is not, so that mmdebstrap runs inside the namespace every time.
    let cache: PathBuf = workspace().join("target/e2e-unprivileged/cache");
    fs_err::create_dir_all(&cache).unwrap();
    for dir in [cache.parent().unwrap(), &cache] {
        b.own(dir);
    }
    let _ = fs_err::remove_dir_all(cache.join("base"));

    let tmp = tempfile::tempdir().unwrap();
    b.own(tmp.path());
    let out = tmp.path().join("out");
    let result = b.build(&out, &cache);
    assert!(
        result.status.success(),
        "the build without root failed:\n{}",
        stderr(&result)
    );
    check_outputs(&out, &b);
    assert_eq!(manifest(&out)["base_tree"]["cache_hit"], false);

    let fs = root_fs(&out.join("tsidp.qcow2"), tmp.path());
    let passwd = debugfs(&fs, "cat /etc/passwd");
    let group = debugfs(&fs, "cat /etc/group");
    let shadow = id_of(&group, "shadow");
    let journal = id_of(&group, "systemd-journal");
    let mail = id_of(&group, "mail");
    assert_eq!(stat(&fs, "/"), (0o755, 0, 0));
    assert_eq!(stat(&fs, "/etc/shadow"), (0o640, 0, shadow));
    assert_eq!(stat(&fs, "/var/log/journal"), (0o2755, 0, journal));
    assert_eq!(stat(&fs, "/var/mail"), (0o2775, 0, mail));
    assert_eq!(stat(&fs, "/usr/bin/sudo"), (0o4755, 0, 0));
    assert_eq!(stat(&fs, "/etc/omni-image/appliance"), (0o644, 0, 0));

    if is_root() {
        // Every owner of every file is an account of the image: none is the builder's own
        // id, a subordinate id or the overflow id of an unmapped one.
        let tree = tmp.path().join("tree");
        fs_err::create_dir(&tree).unwrap();
        debugfs(&fs, &format!("rdump / {}", tree.display()));
        let (mut uids, mut gids, mut at) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
        owners(&tree, &mut uids, &mut gids, &mut at);
        let (known_uids, known_gids) = (ids(&passwd), ids(&group));
        assert!(
            uids.is_subset(&known_uids) && gids.is_subset(&known_gids),
            "owners that are not accounts of the image: uids {:?}, gids {:?}; first seen at:\n{}",
            uids.difference(&known_uids).collect::<Vec<_>>(),
            gids.difference(&known_gids).collect::<Vec<_>>(),
            at.join("\n")
        );
        assert!(uids.len() > 1 || gids.len() > 1, "{at:?}");
    }

    // Again from the base tree the first build stored: unpacked inside the namespace, it
    // gives the same image.
    let again = tmp.path().join("again");
    let result = b.build(&again, &cache);
    assert!(
        result.status.success(),
        "the second build without root failed:\n{}",
        stderr(&result)
    );
    check_outputs(&again, &b);
    assert_eq!(manifest(&again)["base_tree"]["cache_hit"], true);
    assert_eq!(
        fs_err::read_to_string(again.join("tsidp.qcow2.sha256")).unwrap(),
        fs_err::read_to_string(out.join("tsidp.qcow2.sha256")).unwrap(),
        "the image from the cached base tree differs"
    );
    let _ = fs_err::remove_dir_all(cache.join("base"));
}

#[test]
fn a_user_without_subordinate_ids_is_told_what_to_do() {
    if !is_root() {
        // Only root can run a build as a user that surely has no range.
        eprintln!("skipped: needs root to run as a user without subordinate ids");
        return;
    }
    let nobody_has_none = subids("/etc/subuid", "nobody", 65534).is_none();
    assert!(nobody_has_none, "nobody has subordinate ids on this host");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin("omni-image"))
        .args(["build", "recipes/tsidp.toml", "--output"])
        .arg(tmp.path().join("out"))
        .current_dir(workspace())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("/etc/subuid"), "{err}");
    assert!(err.contains("usermod --add-subuids"), "{err}");
    assert!(err.contains("sudo omni-image build"), "{err}");
    assert!(!tmp.path().join("out").exists(), "{err}");
}
