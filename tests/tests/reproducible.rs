//! Rebuilds from the base-tree cache: two builds of the same inputs in different folders,
//! at different times, give the same bytes; a changed overlay file changes the image but
//! still hits the cache; a damaged cache entry is noticed and rebuilt.

use std::path::Path;

use omni_image_tests::images::{built_image, heavy_lock, omni_image, stderr, stdout};
use omni_image_tests::workspace;

fn manifest(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::from_slice(&fs_err::read(dir.join(format!("{name}.manifest.json"))).unwrap())
        .unwrap()
}

fn build(recipe: &Path, out: &Path, cache: Option<&Path>) -> serde_json::Value {
    let mut args = vec![
        "build",
        recipe.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    if let Some(c) = cache {
        args.extend(["--cache-dir", c.to_str().unwrap()]);
    }
    let res = omni_image(&args);
    assert!(res.status.success(), "{}", stderr(&res));
    let name = recipe.file_stem().unwrap().to_string_lossy().into_owned();
    manifest(out, &name)
}

#[test]
fn cached_rebuilds_are_bit_identical_and_overlay_changes_show() {
    // Fills the shared base-tree cache if it was empty.
    built_image("recipes/tsidp.toml");
    let _lock = heavy_lock();
    let recipe = workspace().join("recipes/tsidp.toml");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = build(&recipe, a.path(), None);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let second = build(&recipe, b.path(), None);
    assert_eq!(first["base_tree"]["cache_hit"], true);
    assert_eq!(second["base_tree"]["cache_hit"], true);
    assert_eq!(
        first["outputs"][0]["sha256"], second["outputs"][0]["sha256"],
        "two builds of the same inputs differ"
    );

    // One overlay file changed: the base tree still comes from the cache, the image differs.
    let tmp = tempfile::tempdir().unwrap();
    let overlay = tmp.path().join("extra");
    fs_err::create_dir_all(overlay.join("etc")).unwrap();
    fs_err::write(overlay.join("etc/motd"), "changed\n").unwrap();
    let changed = tmp.path().join("tsidp.toml");
    fs_err::write(
        &changed,
        format!(
            "extends = \"{}\"\noverlays = [\"extra\"]\n",
            recipe.display()
        ),
    )
    .unwrap();
    let c = tempfile::tempdir().unwrap();
    let third = build(&changed, c.path(), None);
    assert_eq!(third["base_tree"]["cache_hit"], true);
    assert_eq!(third["base_tree"]["key"], first["base_tree"]["key"]);
    assert_ne!(third["outputs"][0]["sha256"], first["outputs"][0]["sha256"]);

    // `diff` names the one changed file, and finds nothing between the identical builds.
    let diff = |x: &Path, y: &Path| {
        let res = omni_image(&[
            "diff",
            x.join("tsidp.manifest.json").to_str().unwrap(),
            y.join("tsidp.manifest.json").to_str().unwrap(),
        ]);
        assert!(res.status.success(), "{}", stderr(&res));
        stdout(&res)
    };
    let same = diff(a.path(), b.path());
    assert!(same.contains("images are identical"), "{same}");
    assert!(!same.lines().any(|l| l.contains("f /")), "{same}");
    let motd = if first["files"]["/etc/motd"].is_string() {
        "~f /etc/motd (content)"
    } else {
        "+f /etc/motd"
    };
    let changes: Vec<String> = diff(a.path(), c.path())
        .lines()
        .filter(|l| l.contains("f /"))
        .map(str::to_owned)
        .collect();
    // The changed recipe has a new hash, so the filesystem UUIDs derived from it changed too,
    // and with them the two files that name the root filesystem.
    assert_eq!(
        changes,
        [
            "~f /etc/fstab (content)",
            "~f /etc/kernel/cmdline (content)",
            motd
        ]
    );
}

#[test]
fn concurrent_builds_share_one_bootstrap() {
    // Two cold builds of one recipe into one empty cache, at the same time: one bootstraps
    // while the other waits for the entry, and both give the same image.
    let _lock = heavy_lock();
    let recipe = workspace().join("recipes/tsidp.toml");
    let cache = tempfile::tempdir().unwrap();
    let outs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let manifests: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = outs
            .iter()
            .map(|o| s.spawn(|| build(&recipe, o.path(), Some(cache.path()))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let hits: Vec<bool> = manifests
        .iter()
        .map(|m| m["base_tree"]["cache_hit"].as_bool().unwrap())
        .collect();
    assert!(
        hits.contains(&true) && hits.contains(&false),
        "exactly one build bootstraps: {hits:?}"
    );
    assert_eq!(
        manifests[0]["outputs"][0]["sha256"],
        manifests[1]["outputs"][0]["sha256"]
    );
    // The shared package cache holds whole files only, and no build's staging folder.
    let apt = cache.path().join("apt");
    let left: Vec<String> = fs_err::read_dir(&apt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["debian-trixie"], "{left:?}");
}

#[test]
fn a_damaged_cache_entry_is_rebuilt() {
    // The shared cache holds the entry after this; the rebuild below bootstraps from the
    // shared package cache, so it downloads nothing.
    let built = built_image("recipes/tsidp.toml");
    let _lock = heavy_lock();
    let key = built.manifest["base_tree"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let cache = std::env::var_os("OMNI_IMAGE_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".cache/omni-image"));
    let tar = cache.join(format!("base/{key}.tar"));
    let mut f = fs_err::OpenOptions::new().write(true).open(&tar).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(b"damage").unwrap();
    drop(f);

    let recipe = workspace().join("recipes/tsidp.toml");
    let out = tempfile::tempdir().unwrap();
    let second = build(&recipe, out.path(), None);
    assert_eq!(second["base_tree"]["key"], key.as_str());
    assert_eq!(
        second["base_tree"]["cache_hit"], false,
        "a damaged entry was used"
    );
    // The rebuilt entry is whole again.
    let third = build(&recipe, out.path(), None);
    assert_eq!(third["base_tree"]["cache_hit"], true);
}

#[test]
fn offline_builds_use_only_the_cache_and_say_what_is_missing() {
    built_image("recipes/tsidp.toml");
    let _lock = heavy_lock();
    let recipe = workspace().join("recipes/tsidp.toml");
    let out = tempfile::tempdir().unwrap();
    let res = omni_image(&[
        "build",
        recipe.to_str().unwrap(),
        "--offline",
        "--output",
        out.path().to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(
        manifest(out.path(), "tsidp")["base_tree"]["cache_hit"],
        true
    );

    let empty = tempfile::tempdir().unwrap();
    let res = omni_image(&[
        "build",
        recipe.to_str().unwrap(),
        "--offline",
        "--cache-dir",
        empty.path().to_str().unwrap(),
        "--output",
        out.path().join("x").to_str().unwrap(),
    ]);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(
        err.contains("--offline") && err.contains("not in the cache"),
        "{err}"
    );
}
