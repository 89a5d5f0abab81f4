//! The first-boot agent in a booted tsidp image: a Proxmox-shaped seed ISO made by
//! `omni-image seed` configures hostname, user, SSH key, static address and the appliance's
//! secret file; a second boot with the same seed re-runs nothing.

use std::collections::BTreeMap;

use omni_image_tests::images::{built_image, heavy_lock, omni_image, stderr, stdout};
use omni_image_tests::workspace;

/// Splits `omni-image boot --exec` output into each command's output.
fn sections(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            if let Some((c, o)) = current.take() {
                out.insert(c, o);
            }
            current = Some((cmd.to_owned(), String::new()));
        } else if line.starts_with("ready in ") {
            break;
        } else if let Some((_, o)) = current.as_mut() {
            o.push_str(line);
            o.push('\n');
        }
    }
    if let Some((c, o)) = current {
        out.insert(c, o);
    }
    out
}

const HOSTNAME: &str = "hostname";
const KEYS: &str = "cat /home/admin/.ssh/authorized_keys";
const ADDR: &str = "ip -4 -o addr show scope global";
const SECRET: &str = "stat -c '%a %U:%G' /etc/default/tsidp";
const HOSTKEY: &str = "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub";
const STATUS: &str = "omni-firstboot status --json";
const JOURNAL: &str = "journalctl -b -u omni-firstboot -o cat --no-pager";

fn boot(image: &str, seed: &str, state: &str) -> BTreeMap<String, String> {
    let mut args = vec![
        "boot",
        image,
        "--seed",
        seed,
        "--state",
        state,
        "--timeout",
        "420",
    ];
    for cmd in [HOSTNAME, KEYS, ADDR, SECRET, HOSTKEY, STATUS, JOURNAL] {
        args.extend(["--exec", cmd]);
    }
    let out = omni_image(&args);
    assert!(out.status.success(), "boot failed:\n{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ready in"), "{text}");
    sections(&text)
}

#[test]
fn a_proxmox_shaped_seed_configures_the_clone_once() {
    let built = built_image("recipes/tsidp.toml");
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = workspace().join("tests/fixtures/seed");
    let seed = tmp.path().join("seed.iso");
    let out = omni_image(&[
        "seed",
        fixtures.join("tsidp-user-data").to_str().unwrap(),
        "--network-config",
        fixtures.join("network-config-v1").to_str().unwrap(),
        "-o",
        seed.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let _lock = heavy_lock();
    let state = tmp.path().join("state.qcow2");
    let (image, seed, state) = (
        built.qcow2.to_str().unwrap(),
        seed.to_str().unwrap(),
        state.to_str().unwrap(),
    );

    let first = boot(image, seed, state);
    assert_eq!(first[HOSTNAME].trim(), "idp-test");
    assert!(first[KEYS].contains("e2e@test"), "{}", first[KEYS]);
    assert!(first[ADDR].contains("10.0.2.15/24"), "{}", first[ADDR]);
    assert_eq!(first[SECRET].trim(), "600 root:root");
    let status: serde_json::Value = serde_json::from_str(&first[STATUS]).unwrap();
    assert!(
        status["datasource"].as_str().unwrap().contains("cidata"),
        "{status}"
    );
    assert!(status["finished_at"].is_string(), "{status}");
    // The secret never reaches the journal.
    assert!(
        !first[JOURNAL].contains("E2eSecretValue"),
        "{}",
        first[JOURNAL]
    );
    assert!(!first[STATUS].contains("E2eSecretValue"));

    // Same seed, same instance-id: nothing per-instance runs again.
    let second = boot(image, seed, state);
    assert_eq!(
        second[HOSTKEY], first[HOSTKEY],
        "host keys were regenerated"
    );
    let again: serde_json::Value = serde_json::from_str(&second[STATUS]).unwrap();
    assert_eq!(again["instance_id"], status["instance_id"]);
    assert_eq!(
        again["started_at"], status["started_at"],
        "the instance's steps ran again"
    );
    assert_ne!(
        again["last_boot"]["at"], status["last_boot"]["at"],
        "{again}"
    );
}
