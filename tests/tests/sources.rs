//! Extra apt repositories and artifacts, fed from fixtures made here: a tiny .deb built with
//! dpkg-deb, a Packages/Release index written by this file, an InRelease clearsigned with a
//! key generated here, and a tarball, all served on loopback. Two tests bootstrap for real
//! (about a minute each with a warm package cache); the failure cases that stop before the
//! bootstrap take a second each.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use omni_image_tests::images::{heavy_lock, host, omni_image, stderr};
use omni_image_tests::workspace;
use sequoia_openpgp as openpgp;
use sha2::{Digest, Sha256};

use openpgp::Cert;
use openpgp::cert::{CertBuilder, CipherSuite};
use openpgp::policy::StandardPolicy;
use openpgp::serialize::Serialize;
use openpgp::serialize::stream::{Message, Signer};

const PACKAGE: &str = "omni-image-fixture";
const PAYLOAD: &str = "/usr/share/omni-image-fixture/hello";
const TOOL: &[u8] = b"#!/bin/sh\necho fixture tsidp\n";

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn key(name: &str) -> Cert {
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    CertBuilder::new()
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_creation_time(an_hour_ago)
        .add_userid(format!("{name} <{name}@example.org>"))
        .add_signing_subkey()
        .generate()
        .unwrap()
        .0
}

fn clearsign(text: &[u8], cert: &Cert) -> Vec<u8> {
    let policy = StandardPolicy::new();
    let keypair = cert
        .keys()
        .secret()
        .with_policy(&policy, None)
        .supported()
        .alive()
        .revoked(false)
        .for_signing()
        .next()
        .unwrap()
        .key()
        .clone()
        .into_keypair()
        .unwrap();
    let mut out = Vec::new();
    let message = Message::new(&mut out);
    let mut w = Signer::new(message, keypair)
        .unwrap()
        .cleartext()
        .build()
        .unwrap();
    w.write_all(text).unwrap();
    w.finalize().unwrap();
    out
}

/// A package holding one file, built by dpkg-deb.
fn build_deb(work: &Path, version: &str) -> Vec<u8> {
    let root = work.join(format!("pkg-{version}"));
    let payload = root.join(PAYLOAD.trim_start_matches('/'));
    fs_err::create_dir_all(payload.parent().unwrap()).unwrap();
    fs_err::write(&payload, format!("hello from {PACKAGE} {version}\n")).unwrap();
    fs_err::create_dir_all(root.join("DEBIAN")).unwrap();
    fs_err::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n\
             Maintainer: omni-image tests <tests@example.org>\n\
             Description: fixture package for omni-image's source tests\n"
        ),
    )
    .unwrap();
    let deb = work.join(format!("{PACKAGE}_{version}_all.deb"));
    host(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zgzip", "--build"])
            .arg(&root)
            .arg(&deb),
    );
    fs_err::read(&deb).unwrap()
}

/// The Release text for one Packages index, dated a minute ago.
fn release(packages: &[u8]) -> String {
    let date =
        host(Command::new("date").args(["-u", "-d", "1 minute ago", "+%a, %d %b %Y %H:%M:%S UTC"]))
            .trim()
            .to_owned();
    format!(
        "Origin: omni-image-fixture\nLabel: omni-image-fixture\nSuite: trixie\n\
         Codename: trixie\nDate: {date}\nArchitectures: amd64\nComponents: main\n\
         SHA256:\n {} {} main/binary-amd64/Packages\n",
        sha256(packages),
        packages.len()
    )
}

/// One apt repository below `dir`: `pool/NAME.deb`, `dists/trixie/main/binary-amd64/Packages`
/// and `dists/trixie/InRelease` as `inrelease` makes it from the Release text.
fn write_repo(dir: &Path, deb: &[u8], version: &str, inrelease: impl Fn(&str) -> Vec<u8>) {
    let file = format!("pool/{PACKAGE}_{version}_all.deb");
    let control = format!(
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n\
         Maintainer: omni-image tests <tests@example.org>\n\
         Description: fixture package for omni-image's source tests\n\
         Filename: {file}\nSize: {}\nSHA256: {}\n\n",
        deb.len(),
        sha256(deb)
    );
    fs_err::create_dir_all(dir.join("pool")).unwrap();
    fs_err::write(dir.join(&file), deb).unwrap();
    let index = dir.join("dists/trixie/main/binary-amd64");
    fs_err::create_dir_all(&index).unwrap();
    fs_err::write(index.join("Packages"), &control).unwrap();
    let text = release(control.as_bytes());
    fs_err::write(dir.join("dists/trixie/InRelease"), inrelease(&text)).unwrap();
}

/// Serves `root` on loopback until the test process ends; returns the base URL.
fn serve(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) <= 2 {
                        break;
                    }
                }
                let mut words = first.split_whitespace();
                let method = words.next().unwrap_or("GET").to_owned();
                let path = words.next().unwrap_or("/").to_owned();
                let file = root.join(path.trim_start_matches('/'));
                let mut stream = stream;
                match fs_err::read(&file) {
                    Ok(body) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\
                                 Connection: close\r\n\r\n",
                            body.len()
                        );
                        if method != "HEAD" {
                            let _ = stream.write_all(&body);
                        }
                    }
                    Err(_) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\
                                 Connection: close\r\n\r\n"
                        );
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// Everything the tests serve, in one folder:
/// - `key.gpg` (the repository key) and `tsidp.tar.gz`;
/// - `good/`: a repository signed with the key;
/// - `tampered-release/`: its InRelease altered after signing;
/// - `unsigned/`: a plain Release text as InRelease;
/// - `foreign/`: signed by another key;
/// - `tampered-deb/`: a correct index, but the package swapped for another after indexing.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    url: String,
    fingerprint: String,
    tarball_sha256: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    let work = dir.path().join("work");
    fs_err::create_dir_all(&root).unwrap();
    fs_err::create_dir_all(&work).unwrap();
    let k = key("fixture archive");
    let mallory = key("mallory");
    let mut ring = Vec::new();
    k.serialize(&mut ring).unwrap();
    fs_err::write(root.join("key.gpg"), ring).unwrap();

    let deb = build_deb(&work, "1.0");
    write_repo(&root.join("good"), &deb, "1.0", |t| {
        clearsign(t.as_bytes(), &k)
    });
    write_repo(&root.join("tampered-release"), &deb, "1.0", |t| {
        let signed = String::from_utf8(clearsign(t.as_bytes(), &k)).unwrap();
        signed.replace("Suite: trixie", "Suite: forky").into_bytes()
    });
    write_repo(&root.join("unsigned"), &deb, "1.0", |t| {
        t.as_bytes().to_vec()
    });
    write_repo(&root.join("foreign"), &deb, "1.0", |t| {
        clearsign(t.as_bytes(), &mallory)
    });
    // Another version, so that no good copy of it sits in the package cache.
    let genuine = build_deb(&work, "1.1-tampered");
    let repo = root.join("tampered-deb");
    write_repo(&repo, &genuine, "1.1-tampered", |t| {
        clearsign(t.as_bytes(), &k)
    });
    let mut evil = genuine.clone();
    let at = evil.len() - 10;
    evil[at] ^= 0xff;
    fs_err::write(
        repo.join(format!("pool/{PACKAGE}_1.1-tampered_all.deb")),
        evil,
    )
    .unwrap();

    let tool = work.join("tarball");
    fs_err::create_dir_all(&tool).unwrap();
    fs_err::write(tool.join("tsidp"), TOOL).unwrap();
    fs_err::write(tool.join("LICENSE"), b"fixture\n").unwrap();
    host(
        Command::new("tar")
            .arg("-C")
            .arg(&tool)
            .args(["-czf"])
            .arg(root.join("tsidp.tar.gz"))
            .args(["./tsidp", "./LICENSE"]),
    );
    let tarball_sha256 = sha256(&fs_err::read(root.join("tsidp.tar.gz")).unwrap());
    fs_err::write(root.join("tampered.tar.gz"), b"not the tarball").unwrap();

    Fixture {
        url: serve(root.clone()),
        root,
        fingerprint: k.fingerprint().to_hex(),
        tarball_sha256,
        _dir: dir,
    }
}

/// A recipe extending the shipped tsidp recipe (and so base.toml) with the fixture
/// repository `repo` and tsidp's artifact entry pointed at the fixture tarball.
fn recipe(dir: &Path, f: &Fixture, repo: &str, fingerprint: &str, tarball: &str) -> PathBuf {
    let text = format!(
        r#"extends = "{tsidp}"
name = "sources-fixture"

[[repositories]]
name = "fixture"
url = "{url}/{repo}"
suite = "trixie"
key-url = "{url}/key.gpg"
fingerprint = "{fingerprint}"
packages = ["{PACKAGE}"]

[[artifacts]]
name = "tsidp"
enabled = true
url = "{url}/{tarball}"
sha256 = "{sha}"

[output]
formats = ["raw"]
"#,
        tsidp = workspace().join("recipes/tsidp.toml").display(),
        url = f.url,
        sha = f.tarball_sha256,
    );
    let path = dir.join("sources-fixture.toml");
    fs_err::write(&path, text).unwrap();
    path
}

/// Runs debugfs on the root filesystem of a raw disk, in place (no copy, no mount).
fn debugfs(raw: &Path, request: &str) -> String {
    let table: serde_json::Value =
        serde_json::from_str(&host(Command::new("sfdisk").arg("--json").arg(raw))).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    let offset = parts[1]["start"].as_u64().unwrap() * 512;
    host(
        Command::new("debugfs")
            .args(["-R", request])
            .arg(format!("{}?offset={offset}", raw.display())),
    )
}

#[test]
fn a_local_repository_and_tarball_land_in_the_image() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let path = recipe(tmp.path(), &f, "good", &f.fingerprint, "tsidp.tar.gz");
    let out_dir = tmp.path().join("out");
    let _lock = heavy_lock();
    let out = omni_image(&[
        "build",
        path.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "build failed:\n{}", stderr(&out));

    let m: serde_json::Value = serde_json::from_slice(
        &fs_err::read(out_dir.join("sources-fixture.manifest.json")).unwrap(),
    )
    .unwrap();
    // The base archive verified with Debian's keyring, the fixture with its pinned key.
    assert_eq!(m["archive"]["name"], "base");
    assert!(
        !m["archive"]["signed_by"].as_array().unwrap().is_empty(),
        "{m}"
    );
    let repo = &m["repositories"][0];
    assert_eq!(repo["name"], "fixture");
    assert_eq!(repo["signed_by"], serde_json::json!([f.fingerprint]));
    let served = fs_err::read(f.root.join("good/dists/trixie/InRelease")).unwrap();
    assert_eq!(repo["inrelease_sha256"], sha256(&served));
    assert!(repo["inrelease_date"].as_str().unwrap().ends_with(" UTC"));
    let artifact = &m["artifacts"][0];
    assert_eq!(artifact["name"], "tsidp");
    assert_eq!(artifact["sha256"], f.tarball_sha256);
    assert_eq!(artifact["path"], "/usr/local/bin/tsidp");
    assert_eq!(artifact["mode"], "0755");
    let pkgs = m["packages"].as_array().unwrap();
    assert!(
        pkgs.iter()
            .any(|p| p["name"] == PACKAGE && p["version"] == "1.0"),
        "{PACKAGE} is not installed"
    );
    assert!(
        !pkgs.iter().any(|p| p["name"] == "tailscale"),
        "tailscale is off by default"
    );

    let raw = out_dir.join("sources-fixture.raw");
    let tool = debugfs(&raw, "cat /usr/local/bin/tsidp");
    assert_eq!(tool.as_bytes(), TOOL);
    let stat = debugfs(&raw, "stat /usr/local/bin/tsidp");
    assert!(stat.contains("Mode:  0755"), "{stat}");
    assert!(stat.contains("User:     0"), "{stat}");
    let payload = debugfs(&raw, &format!("cat {PAYLOAD}"));
    assert_eq!(payload, format!("hello from {PACKAGE} 1.0\n"));
    let sources = debugfs(&raw, "cat /etc/apt/sources.list.d/fixture.sources");
    assert!(
        sources.contains(&format!("URIs: {}/good\n", f.url)),
        "{sources}"
    );
    assert!(
        sources.contains("Signed-By: /usr/share/keyrings/fixture-archive-keyring.gpg\n"),
        "{sources}"
    );
    let ring = debugfs(&raw, "stat /usr/share/keyrings/fixture-archive-keyring.gpg");
    assert!(ring.contains("Mode:  0644"), "{ring}");
    let list = debugfs(&raw, "cat /etc/apt/sources.list");
    assert!(list.contains("deb.debian.org"), "{list}");
    assert!(
        !list.contains("keyrings"),
        "host keyring paths left behind: {list}"
    );
}

#[test]
fn bad_sources_stop_the_build_before_anything_is_installed() {
    let f = fixture();
    let mallory = key("mallory").fingerprint().to_hex();
    let cases = [
        (
            "good",
            mallory.as_str(),
            "tsidp.tar.gz",
            vec![
                "repository `fixture`".to_owned(),
                format!("{}/key.gpg", f.url),
                format!("no key with the pinned fingerprint {mallory}"),
            ],
        ),
        (
            "tampered-release",
            &f.fingerprint,
            "tsidp.tar.gz",
            vec![
                format!("{}/tampered-release/dists/trixie/InRelease", f.url),
                "does not verify".to_owned(),
                "altered".to_owned(),
            ],
        ),
        (
            "unsigned",
            &f.fingerprint,
            "tsidp.tar.gz",
            vec![
                format!("{}/unsigned/dists/trixie/InRelease", f.url),
                "not signed".to_owned(),
            ],
        ),
        (
            "foreign",
            &f.fingerprint,
            "tsidp.tar.gz",
            vec![
                "repository `fixture`".to_owned(),
                format!("{}/foreign/dists/trixie/InRelease", f.url),
                format!(
                    "no signature on it was made by a trusted key ({})",
                    f.fingerprint
                ),
            ],
        ),
        (
            "good",
            &f.fingerprint,
            "tampered.tar.gz",
            vec![
                "artifacts `tsidp`".to_owned(),
                format!("{}/tampered.tar.gz", f.url),
                format!("sha256 {}", sha256(b"not the tarball")),
                format!("the recipe pins {}", f.tarball_sha256),
            ],
        ),
    ];
    for (repo, fingerprint, tarball, expected) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let path = recipe(tmp.path(), &f, repo, fingerprint, tarball);
        let out_dir = tmp.path().join("out");
        let cache = tmp.path().join("cache");
        let out = omni_image(&[
            "build",
            path.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{repo}/{tarball}: the build went on");
        for e in &expected {
            assert!(
                err.contains(e.as_str()),
                "{repo}/{tarball}: expected `{e}` in:\n{err}"
            );
        }
        // Stopped in the sources step: nothing bootstrapped, nothing published, no
        // package downloaded and no artifact kept.
        assert!(!err.contains("bootstrap"), "{repo}/{tarball}:\n{err}");
        // The output folder did not exist before: the failed build removed it again.
        assert!(!out_dir.exists(), "{repo}/{tarball}: left {out_dir:?}");
        let artifacts = cache.join("artifacts");
        if artifacts.exists() {
            let kept: Vec<_> = fs_err::read_dir(&artifacts)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy() != f.tarball_sha256)
                .collect();
            assert!(kept.is_empty(), "{repo}/{tarball}: kept {kept:?}");
        }
    }
}

#[test]
fn a_tampered_package_is_refused_by_apt() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let path = recipe(
        tmp.path(),
        &f,
        "tampered-deb",
        &f.fingerprint,
        "tsidp.tar.gz",
    );
    let out_dir = tmp.path().join("out");
    let _lock = heavy_lock();
    let out = omni_image(&[
        "build",
        path.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(!out.status.success(), "a tampered package was installed");
    // The index and its signature are fine: apt itself refuses the package.
    assert!(err.contains("bootstrapping debian trixie"), "{err}");
    assert!(
        err.contains("Hash Sum mismatch") || err.contains("hashes do not match"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{PACKAGE}_1.1-tampered_all.deb")),
        "{err}"
    );
    assert!(!out_dir.exists(), "left {out_dir:?}");
}
