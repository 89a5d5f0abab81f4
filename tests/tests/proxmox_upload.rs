//! `omni-image upload` against the Proxmox VE double: image to template, idempotent re-runs,
//! `--replace`, the strictness of the upload parser, and every refusal the command makes.
//!
//! Needs: a release build of `omni-image` (`cargo build --release -p omni-image`),
//! `qemu-img`, `curl`, and the API schema at `../shared/data/pve-api-schema.json` (or
//! `PVE_API_SCHEMA`).

use std::process::Command;

use omni_image_tests::pve_double::client::{
    api_get, make_image, omni, omni_with, run, sha256_of, write_sidecars,
};
use omni_image_tests::pve_double::{AclEntry, Config, PveDouble, StorageConfig, TOKEN_ID, USER};

fn double() -> PveDouble {
    PveDouble::start(Config::standard()).unwrap()
}

#[test]
fn upload_makes_a_template_with_the_documented_hardware() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 64, "first");
    let sha = sha256_of(&image);

    let r = run(omni(&pve, "upload").arg(&image));
    assert!(r.ok, "upload failed: {}", r.stderr);
    assert_eq!(r.stdout.trim(), "100");

    let vms = pve.vms();
    assert_eq!(vms.len(), 1);
    let (vmid, name, template, tags) = &vms[0];
    assert_eq!((*vmid, name.as_str(), *template), (100, "tsidp", true));
    assert!(
        tags.split(';')
            .any(|t| t == format!("sha256-{}", &sha[..16])),
        "tags: {tags}"
    );
    assert!(
        tags.split(';').any(|t| t == "appliance"),
        "recipe tags missing: {tags}"
    );

    let config = pve.vm_config(100).unwrap();
    assert!(
        config["scsi0"].starts_with("local:100/base-100-disk-1.qcow2"),
        "{config:?}"
    );
    assert!(
        config["efidisk0"].contains("efitype=4m,pre-enrolled-keys=0"),
        "{config:?}"
    );
    assert!(config["ide2"].contains("cloudinit"), "{config:?}");
    assert_eq!(config["machine"], "q35");
    assert_eq!(config["bios"], "ovmf");
    assert_eq!(config["memory"], "1536");
    assert_eq!(config["cores"], "2");
    assert_eq!(config["agent"], "1");
    assert!(config["description"].contains(&sha));
    assert!(
        config["description"].contains("debian trixie"),
        "{}",
        config["description"]
    );

    // The uploaded file is gone from the import storage; the disk was imported from it.
    assert!(
        pve.volumes("local").iter().all(|v| !v.contains(":import/")),
        "{:?}",
        pve.volumes("local")
    );
    let uploads = pve.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].size, std::fs::metadata(&image).unwrap().len());
}

#[test]
fn rerunning_with_the_same_image_changes_nothing() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 64, "same");
    assert!(run(omni(&pve, "upload").arg(&image)).ok);
    let r = run(omni(&pve, "upload").arg(&image));
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("nothing to do"), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "100");
    assert_eq!(pve.vms().len(), 1);
    assert_eq!(pve.uploads().len(), 1, "the second run uploaded again");
}

#[test]
fn replace_swaps_the_template_and_removes_the_old_one_last() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let old = make_image(dir.path(), "tsidp", 64, "old");
    assert!(run(omni(&pve, "upload").arg(&old)).ok);

    let newer_dir = tempfile::tempdir().unwrap();
    let new = make_image(newer_dir.path(), "tsidp", 64, "new");
    let r = run(omni(&pve, "upload").arg(&new));
    assert!(!r.ok);
    assert!(r.stderr.contains("--replace"), "{}", r.stderr);
    assert_eq!(pve.vms().len(), 1);

    let r = run(omni(&pve, "upload").arg(&new).arg("--replace"));
    assert!(r.ok, "{}", r.stderr);
    let vms = pve.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0].0, 101);
    assert!(vms[0].3.contains(&sha256_of(&new)[..16]));

    // The old template was deleted only after the new one was a template.
    let reqs = pve.requests();
    let template_at = reqs
        .iter()
        .position(|r| r.path.ends_with("/qemu/101/template"))
        .unwrap();
    let delete_at = reqs
        .iter()
        .position(|r| r.method == "DELETE" && r.path.ends_with("/qemu/100"))
        .unwrap();
    assert!(template_at < delete_at);
}

fn curl_upload(
    pve: &PveDouble,
    image: &std::path::Path,
    fields: &[String],
    extra: &[&str],
) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
        .arg(&pve.ca_file);
    cmd.args([
        "-H",
        &format!(
            "Authorization: PVEAPIToken={TOKEN_ID}={}",
            omni_image_tests::pve_double::TOKEN_SECRET
        ),
    ]);
    cmd.args(extra);
    for f in fields {
        cmd.arg("-F").arg(f);
    }
    cmd.arg(format!("{}/nodes/pve/storage/local/upload", pve.url));
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let _ = image;
    (code.trim().to_string(), body.to_string())
}

#[test]
fn the_double_rejects_chunked_and_misordered_uploads_and_accepts_ours() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "strict", 16, "strict");
    let sum = sha256_of(&image);
    let file = format!("filename=@{};filename=strict.qcow2", image.display());
    let ordered = vec![
        "content=import".to_string(),
        "checksum-algorithm=sha256".to_string(),
        format!("checksum={sum}"),
        file.clone(),
    ];

    // A well-formed upload from curl passes, so the refusals below are about the framing.
    let (code, body) = curl_upload(&pve, &image, &ordered, &[]);
    assert_eq!(code, "200", "{body}");

    let (code, body) = curl_upload(
        &pve,
        &image,
        &ordered,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(code, "501", "chunked upload accepted: {body}");

    let misordered = vec![file.clone(), "content=import".to_string()];
    let (code, body) = curl_upload(&pve, &image, &misordered, &[]);
    assert_eq!(code, "400", "misordered upload accepted: {body}");
    assert!(body.contains("after the file part"), "{body}");

    let swapped = vec![
        format!("checksum={sum}"),
        "checksum-algorithm=sha256".into(),
        "content=import".into(),
        file.clone(),
    ];
    let (code, body) = curl_upload(&pve, &image, &swapped, &[]);
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("out of order"), "{body}");

    let wrong_part = vec![
        "content=import".to_string(),
        format!("file=@{};filename=strict.qcow2", image.display()),
    ];
    let (code, body) = curl_upload(&pve, &image, &wrong_part, &[]);
    assert_eq!(code, "400", "{body}");

    let bad_ext = vec![
        "content=import".to_string(),
        format!("filename=@{};filename=strict.img", image.display()),
    ];
    let (code, body) = curl_upload(&pve, &image, &bad_ext, &[]);
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("wrong extension"), "{body}");

    // And ours goes through the same parser.
    let r = run(omni(&pve, "upload").arg(&image));
    assert!(r.ok, "{}", r.stderr);
}

#[test]
fn a_stale_checksum_file_is_refused_before_anything_is_sent() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 16, "sum");
    let stale = format!("{}  tsidp.qcow2\n", "0".repeat(64));
    std::fs::write(dir.path().join("tsidp.qcow2.sha256"), &stale).unwrap();
    let r = run(omni(&pve, "upload").arg(&image));
    assert!(!r.ok);
    assert!(
        r.stderr.contains("tsidp.qcow2.sha256 does not match") && r.stderr.contains("rebuild"),
        "{}",
        r.stderr
    );
    assert!(pve.vms().is_empty());

    // Proxmox itself checks the checksum sent with an upload and fails the import task; the
    // double does the same.
    let file = format!("filename=@{};filename=tsidp.qcow2", image.display());
    let fields = [
        "content=import".to_string(),
        "checksum-algorithm=sha256".to_string(),
        format!("checksum={}", "0".repeat(64)),
        file,
    ];
    let (code, body) = curl_upload(&pve, &image, &fields, &[]);
    assert_eq!(code, "200", "{body}");
    let upid: serde_json::Value = serde_json::from_str(&body).unwrap();
    let upid = upid["data"].as_str().unwrap().to_owned();
    let status = (0..100)
        .find_map(|_| {
            let out = Command::new("curl")
                .args(["-sS", "--cacert"])
                .arg(&pve.ca_file)
                .args([
                    "-H",
                    &format!(
                        "Authorization: PVEAPIToken={TOKEN_ID}={}",
                        omni_image_tests::pve_double::TOKEN_SECRET
                    ),
                ])
                .arg(format!("{}/nodes/pve/tasks/{upid}/status", pve.url))
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["data"]["status"] == "stopped" {
                return Some(v["data"]["exitstatus"].as_str().unwrap_or("").to_owned());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            None
        })
        .expect("the import task ends");
    assert!(status.contains("checksum mismatch"), "{status}");
    assert!(pve.vms().is_empty());
}

#[test]
fn bytes_damaged_on_the_way_fail_the_import_and_show_its_log() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 16, "damaged");
    pve.damage_next_uploads(1);
    let r = run(omni(&pve, "upload").arg(&image));
    assert!(!r.ok);
    assert!(r.stderr.contains("checksum mismatch"), "{}", r.stderr);
    assert!(r.stderr.contains("last log lines"), "{}", r.stderr);
    assert!(pve.vms().is_empty(), "a failed import left a VM");
    // The next upload arrives whole and goes through.
    let r = run(omni(&pve, "upload").arg(&image));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(pve.vms().len(), 1);
}

#[test]
fn a_connection_reset_mid_upload_is_retried_from_the_start() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    // Big enough that the reset falls inside the body.
    let image = make_image(dir.path(), "tsidp", 64, &"x".repeat(4096));
    let big = dir.path().join("tsidp.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2", "-o", "preallocation=full"])
        .arg(&image)
        .arg(dir.path().join("full.qcow2"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::rename(dir.path().join("full.qcow2"), &big).unwrap();
    write_sidecars(&big, "tsidp");

    pve.reset_next_uploads(1);
    let r = run(omni(&pve, "upload").arg(&big));
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("retrying from the start (attempt 2 of 3)"),
        "{}",
        r.stderr
    );
    assert_eq!(pve.vms().len(), 1);

    pve.reset_next_uploads(5);
    let r = run(omni(&pve, "upload").arg(&big).args(["--name", "other"]));
    assert!(!r.ok);
    assert!(r.stderr.contains("attempt 3"), "{}", r.stderr);
    assert_eq!(pve.vms().len(), 1, "a failed upload left a VM behind");
}

#[test]
fn trust_by_ca_file_works_and_system_roots_refuse_a_self_signed_node() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 16, "ca");
    let mut cmd = Command::new(omni_image_tests::bin("omni-image"));
    cmd.arg("upload")
        .arg(&image)
        .args([
            "--url",
            &pve.url,
            "--token-id",
            TOKEN_ID,
            "--node",
            "pve",
            "--storage",
            "local",
        ])
        .env(
            "PROXMOX_TOKEN_SECRET",
            omni_image_tests::pve_double::TOKEN_SECRET,
        )
        .env("XDG_CONFIG_HOME", "/nonexistent");
    let r = run(&mut cmd);
    assert!(!r.ok);
    assert!(
        r.stderr.to_lowercase().contains("certificate"),
        "{}",
        r.stderr
    );

    let r = run(cmd.arg("--ca-file").arg(&pve.ca_file));
    assert!(r.ok, "{}", r.stderr);
}

#[test]
fn ticket_login_with_a_password_and_a_profile_file_work() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 16, "ticket");
    let config = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(config.path().join("omni-image")).unwrap();
    let pwfile = config.path().join("pw");
    std::fs::write(&pwfile, omni_image_tests::pve_double::PASSWORD).unwrap();
    std::fs::write(
        config.path().join("omni-image/proxmox.toml"),
        format!(
            "[lab]\nurl = \"{}\"\nuser = \"{USER}\"\npassword-file = \"{}\"\nfingerprint = \"{}\"\nnode = \"pve\"\nstorage = \"local\"\n",
            pve.url,
            pwfile.display(),
            pve.fingerprint
        ),
    )
    .unwrap();
    let mut cmd = Command::new(omni_image_tests::bin("omni-image"));
    cmd.arg("upload")
        .arg(&image)
        .args(["--profile", "lab"])
        .env("XDG_CONFIG_HOME", config.path());
    let r = run(&mut cmd);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(pve.vms().len(), 1);

    // A profile with an unknown key names the file and the key.
    std::fs::write(
        config.path().join("omni-image/proxmox.toml"),
        "[lab]\ntoken-secret = \"x\"\n",
    )
    .unwrap();
    let r = run(&mut cmd);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("proxmox.toml") && r.stderr.contains("token-secret"),
        "{}",
        r.stderr
    );
}

/// Runs an upload with some flags replaced, expected to fail, and returns its stderr.
fn refused(pve: &PveDouble, image: &std::path::Path, overrides: &[(&str, &str)]) -> String {
    let r = run(omni_with(pve, "upload", overrides).arg(image));
    assert!(!r.ok, "expected a refusal, got success");
    assert!(
        pve.vms().iter().all(|v| v.0 == 999),
        "a refusal left a VM behind: {:?}",
        pve.vms()
    );
    assert!(
        pve.volumes("local").iter().all(|v| !v.contains(":import/")),
        "left an upload behind"
    );
    r.stderr
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let pve = double();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 16, "flags");

    let e = refused(&pve, &image, &[("--url", "pve.example:8006/api2/json")]);
    assert!(e.contains("--url") && e.contains("scheme"), "{e}");
    let other = pve.url.replace("/api2/json", "/api2/extjs");
    let e = refused(&pve, &image, &[("--url", &other)]);
    assert!(e.contains("/api2/json"), "{e}");
    let plain = pve.url.replace("https://", "http://");
    let e = refused(&pve, &image, &[("--url", &plain)]);
    assert!(e.contains("--url") && e.contains("https only"), "{e}");
    let e = refused(&pve, &image, &[("--token-id", "omni@pve")]);
    assert!(e.contains("--token-id") && e.contains('!'), "{e}");
    let wrong = format!("{}AB", "AB:".repeat(31));
    let e = refused(&pve, &image, &[("--fingerprint", &wrong)]);
    assert!(e.contains("fingerprint mismatch"), "{e}");
    let e = refused(&pve, &image, &[("--node", "pve2")]);
    assert!(
        e.contains("--node pve2") && e.contains("no such node"),
        "{e}"
    );
    let e = refused(&pve, &image, &[("--storage", "tank")]);
    assert!(
        e.contains("--storage tank") && e.contains("no such storage"),
        "{e}"
    );
    let e = refused(&pve, &image, &[("--name", "not_a_dns_name")]);
    assert!(e.contains("--name") && e.contains("DNS"), "{e}");

    pve.add_vm(999, "occupied", false);
    let e = refused(&pve, &image, &[("--vmid", "999")]);
    assert!(e.contains("--vmid 999 is taken"), "{e}");

    let notqcow = dir.path().join("plain.qcow2");
    std::fs::write(&notqcow, vec![0u8; 4096]).unwrap();
    let e = refused(&pve, &notqcow, &[]);
    assert!(e.contains("not a qcow2 image"), "{e}");

    // The server's own parameter check: a bridge name its format refuses.
    let e = refused(&pve, &image, &[("--bridge", "vm br0")]);
    assert!(e.contains("rejected") && e.contains("net0"), "{e}");
}

#[test]
fn credentials_and_privileges_are_checked_before_uploading() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 16, "creds");

    let pve = double();
    let r = run(omni(&pve, "upload")
        .arg(&image)
        .env("PROXMOX_TOKEN_SECRET", "wrong"));
    assert!(!r.ok);
    assert!(
        r.stderr.contains("authentication failed") && r.stderr.contains("401"),
        "{}",
        r.stderr
    );
    let r = run(omni(&pve, "upload")
        .arg(&image)
        .env_remove("PROXMOX_TOKEN_SECRET"));
    assert!(!r.ok);
    assert!(r.stderr.contains("PROXMOX_TOKEN_SECRET"), "{}", r.stderr);

    // A privilege-separated token whose own ACL lacks one privilege.
    let mut config = Config::standard();
    config.acl.retain(|a| a.subject != TOKEN_ID);
    config.acl.push(AclEntry {
        path: "/".into(),
        subject: TOKEN_ID.into(),
        privs: omni_image_tests::pve_double::CLIENT_PRIVS
            .iter()
            .filter(|p| **p != "Datastore.AllocateTemplate")
            .map(|s| s.to_string())
            .collect(),
        propagate: true,
    });
    let pve = PveDouble::start(config).unwrap();
    let r = run(omni(&pve, "upload").arg(&image));
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("Datastore.AllocateTemplate on /storage/local"),
        "{}",
        r.stderr
    );
    assert!(pve.uploads().is_empty());
}

#[test]
fn storage_problems_are_found_before_the_body_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "tsidp", 16, "storage");

    let mut config = Config::standard();
    config.storages = vec![StorageConfig {
        id: "local".into(),
        content: vec!["iso".into(), "images".into()],
        capacity: 64 << 30,
    }];
    let pve = PveDouble::start(config).unwrap();
    let e = refused(&pve, &image, &[]);
    assert!(
        e.contains("pvesm set local --content iso,images,import"),
        "{e}"
    );
    assert!(pve.uploads().is_empty());

    let mut config = Config::standard();
    config.storages[0].capacity = 256 << 10;
    let pve = PveDouble::start(config).unwrap();
    let e = refused(&pve, &image, &[]);
    assert!(e.contains("free"), "{e}");
    assert!(pve.uploads().is_empty());

    let mut config = Config::standard();
    config.version = "8.3.5".into();
    let pve = PveDouble::start(config).unwrap();
    let e = refused(&pve, &image, &[]);
    assert!(e.contains("8.4"), "{e}");
}

#[test]
fn the_double_answers_proxmox_error_formats() {
    let pve = double();
    // Unknown path: 501 in plain text.
    let v = api_get(&pve, "/nodes/pve/bogus");
    assert!(v.is_null());
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&pve.ca_file)
        .arg(format!("{}/version", pve.url))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "401",
        "no credentials must be 401"
    );
    let version = api_get(&pve, "/version");
    assert_eq!(version["version"], "9.1.2");
    let next = api_get(&pve, "/cluster/nextid");
    assert_eq!(next, "100", "nextid is a string on the wire");
}
