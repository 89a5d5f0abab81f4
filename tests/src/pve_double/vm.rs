//! Starting a VM as a real QEMU process, its cloud-init drive, and talking to its guest
//! agent and QMP over their sockets.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest;

use super::TaskCtx;
use super::schema::split_property_string;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// A QEMU process the double started. Killed when the VM stops or the double is dropped.
pub struct Running {
    child: Mutex<Child>,
    pub agent_socket: PathBuf,
    pub qmp_socket: PathBuf,
}

impl Running {
    pub fn alive(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(child.try_wait(), Ok(None))
    }

    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends one QMP command and returns its `return` value.
    pub fn qmp(&self, command: Value) -> Result<Value, String> {
        let stream = UnixStream::connect(&self.qmp_socket).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?; // greeting
        for cmd in [json!({"execute": "qmp_capabilities"}), command] {
            writeln!(writer, "{cmd}").map_err(|e| e.to_string())?;
            loop {
                line.clear();
                reader.read_line(&mut line).map_err(|e| e.to_string())?;
                let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                if v.get("event").is_some() {
                    continue;
                }
                if let Some(err) = v.get("error") {
                    return Err(err["desc"].as_str().unwrap_or("QMP error").to_string());
                }
                if cmd["execute"] != "qmp_capabilities" {
                    return Ok(v["return"].clone());
                }
                break;
            }
        }
        Ok(Value::Null)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One guest-agent command over the virtio-serial socket, after a `guest-sync-delimited`
/// handshake that discards whatever a previous client left in the channel.
pub fn agent_call(socket: &Path, command: &Value) -> Result<Value, String> {
    let not_running = || "QEMU guest agent is not running".to_string();
    let stream = UnixStream::connect(socket).map_err(|_| not_running())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let sync_id = std::process::id() as u64 * 1000
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_micros() as u64)
            .unwrap_or(0));
    writeln!(
        writer,
        "{}",
        json!({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
    )
    .map_err(|_| not_running())?;
    // The agent answers the sync with 0xFF and then the id.
    let mut line = Vec::new();
    loop {
        line.clear();
        reader
            .read_until(b'\n', &mut line)
            .map_err(|_| not_running())?;
        if line.is_empty() {
            return Err(not_running());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text
            .trim_start_matches('\u{FFFD}')
            .trim_start_matches('\u{ff}');
        if let Ok(v) = serde_json::from_str::<Value>(text)
            && v["return"].as_u64() == Some(sync_id)
        {
            break;
        }
    }
    writeln!(writer, "{command}").map_err(|_| not_running())?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|_| not_running())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("agent answer: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(format!(
            "Agent error: {}",
            err["desc"].as_str().unwrap_or("unknown")
        ));
    }
    Ok(v["return"].clone())
}

/// The NoCloud drive Proxmox generates at each start (qemu-server's `Cloudinit.pm`).
fn cloudinit_files(id: u32, config: &BTreeMap<String, String>) -> [(String, String); 3] {
    let name = config
        .get("name")
        .cloned()
        .unwrap_or_else(|| format!("VM{id}"));
    let mut user =
        format!("#cloud-config\nhostname: {name}\nmanage_etc_hosts: true\nfqdn: {name}\n");
    if let Some(u) = config.get("ciuser") {
        user.push_str(&format!("user: {u}\n"));
    }
    if let Some(p) = config.get("cipassword") {
        user.push_str(&format!("password: {p}\n"));
    }
    if let Some(keys) = config.get("sshkeys") {
        let keys = super::schema::percent_decode(keys).unwrap_or_default();
        user.push_str("ssh_authorized_keys:\n");
        for k in keys.lines().filter(|l| !l.trim().is_empty()) {
            user.push_str(&format!("  - {k}\n"));
        }
    }
    user.push_str("chpasswd:\n  expire: False\nusers:\n  - default\n");
    if config.get("ciupgrade").is_none_or(|v| v != "0") {
        user.push_str("package_upgrade: true\n");
    }

    let mut net = String::from("version: 1\nconfig:\n");
    for (key, value) in config.iter().filter(|(k, _)| k.starts_with("net")) {
        let n = &key[3..];
        let mac = split_property_string(value)
            .into_iter()
            .find(|(k, v)| k.is_some() && v.contains(':'))
            .map(|(_, v)| v.to_lowercase())
            .unwrap_or_default();
        net.push_str(&format!(
            "    - type: physical\n      name: eth{n}\n      mac_address: '{mac}'\n      subnets:\n"
        ));
        let ipconfig = config
            .get(&format!("ipconfig{n}"))
            .cloned()
            .unwrap_or_default();
        let parts = split_property_string(&ipconfig);
        let get = |k: &str| {
            parts
                .iter()
                .find(|(pk, _)| pk.as_deref() == Some(k))
                .map(|(_, v)| v.clone())
        };
        match get("ip") {
            Some(ip) if ip != "dhcp" => {
                let (addr, len) = ip.split_once('/').unwrap_or((&ip, "24"));
                let len: u32 = len.parse().unwrap_or(24);
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                let mask = std::net::Ipv4Addr::from(mask);
                net.push_str(&format!(
                    "      - type: static\n        address: '{addr}'\n        netmask: '{mask}'\n"
                ));
                if let Some(gw) = get("gw") {
                    net.push_str(&format!("        gateway: '{gw}'\n"));
                }
            }
            _ => net.push_str("      - type: dhcp4\n"),
        }
    }
    if config.contains_key("nameserver") || config.contains_key("searchdomain") {
        net.push_str("    - type: nameserver\n");
        if let Some(ns) = config.get("nameserver") {
            net.push_str("      address:\n");
            for a in ns.split_whitespace() {
                net.push_str(&format!("      - '{a}'\n"));
            }
        }
        if let Some(sd) = config.get("searchdomain") {
            net.push_str("      search:\n");
            for s in sd.split_whitespace() {
                net.push_str(&format!("      - '{s}'\n"));
            }
        }
    }
    let instance = hex::encode(sha1_like(&format!("{user}{net}")));
    let meta = format!("instance-id: {instance}\n");
    [
        ("user-data".into(), user),
        ("network-config".into(), net),
        ("meta-data".into(), meta),
    ]
}

// TODO: Proxmox hashes with SHA-1; sha2 is what this crate already has, and the id only needs
// to change when the data does, so a truncated SHA-256 stands in.
fn sha1_like(text: &str) -> Vec<u8> {
    sha2::Sha256::digest(text.as_bytes())[..20].to_vec()
}

/// Writes the cloud-init drive with `genisoimage -iso-level 3 -J -R -V cidata`, as Proxmox
/// does.
pub fn build_cloudinit_iso(
    id: u32,
    config: &BTreeMap<String, String>,
    out: &Path,
) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    for (name, text) in cloudinit_files(id, config) {
        std::fs::write(dir.path().join(name), text).map_err(|e| e.to_string())?;
    }
    super::run(
        Command::new("genisoimage")
            .args([
                "-quiet",
                "-iso-level",
                "3",
                "-J",
                "-R",
                "-V",
                "cidata",
                "-o",
            ])
            .arg(out)
            .arg(dir.path()),
    )?;
    Ok(())
}

fn resolve(ctx: &TaskCtx, volid: &str) -> Option<PathBuf> {
    let (storage, _) = volid.split_once(':')?;
    ctx.shared
        .lock()
        .volumes
        .get(storage)?
        .get(volid)
        .map(|v| v.path.clone())
}

/// Starts QEMU for a VM config: q35 under TCG, OVMF with the VM's own vars, virtio-scsi
/// disks, IDE CD-ROMs (the cloud-init drive and any attached ISO), user-mode networking in
/// place of the bridge, the serial console to a log file, and the guest agent and QMP on
/// sockets.
pub fn start(ctx: &TaskCtx, id: u32, config: &BTreeMap<String, String>) -> Result<Running, String> {
    let run_dir = ctx.shared.dir.join("run");
    let agent_socket = run_dir.join(format!("{id}.qga"));
    let qmp_socket = run_dir.join(format!("{id}.qmp"));
    let serial = run_dir.join(format!("{id}.serial.log"));
    let _ = std::fs::remove_file(&agent_socket);
    let _ = std::fs::remove_file(&qmp_socket);

    let memory = config
        .get("memory")
        .and_then(|m| split_property_string(m).first().map(|(_, v)| v.clone()))
        .unwrap_or_else(|| "512".into());
    let cores = config.get("cores").cloned().unwrap_or_else(|| "1".into());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-name",
        &format!("vm{id}"),
        "-machine",
        "q35,accel=tcg",
        "-m",
        &memory,
    ])
    .args([
        "-cpu",
        "max",
        "-smp",
        &cores,
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-vga", "none"])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
    .args(["-device", "virtio-scsi-pci,id=scsihw0"]);
    for (key, value) in config {
        let parts = split_property_string(value);
        let file = parts[0].1.clone();
        let media_cdrom = parts
            .iter()
            .any(|(k, v)| k.as_deref() == Some("media") && v == "cdrom");
        if indexed(key, "efidisk") {
            let vars = resolve(ctx, &file).ok_or(format!("volume '{file}' does not exist"))?;
            cmd.arg("-drive").arg(format!(
                "if=pflash,unit=0,format=raw,readonly=on,file={OVMF_CODE}"
            ));
            cmd.arg("-drive").arg(format!(
                "if=pflash,unit=1,format=raw,file={}",
                vars.display()
            ));
        } else if indexed(key, "scsi") {
            let disk = resolve(ctx, &file).ok_or(format!("volume '{file}' does not exist"))?;
            let boot = if config.get("boot").is_some_and(|b| b.contains(key.as_str())) {
                ",bootindex=100"
            } else {
                ""
            };
            cmd.arg("-drive").arg(format!(
                "file={},if=none,id=drive-{key},format=qcow2,cache=unsafe,discard=on",
                disk.display()
            ));
            cmd.arg("-device").arg(format!(
                "scsi-hd,bus=scsihw0.0,drive=drive-{key},id={key}{boot}"
            ));
        } else if indexed(key, "ide") && media_cdrom {
            let unit: u32 = key[3..].parse().unwrap_or(0);
            let path = if file.contains("cloudinit") {
                let iso = run_dir.join(format!("{id}.cloudinit.iso"));
                build_cloudinit_iso(id, config, &iso)?;
                ctx.log("generating cloud-init ISO");
                Some(iso)
            } else if file == "none" || file == "cdrom" {
                None
            } else {
                Some(resolve(ctx, &file).ok_or(format!("volume '{file}' does not exist"))?)
            };
            match path {
                Some(p) => cmd.arg("-drive").arg(format!(
                    "file={},if=none,id=drive-{key},media=cdrom,format=raw,readonly=on",
                    p.display()
                )),
                None => cmd
                    .arg("-drive")
                    .arg(format!("if=none,id=drive-{key},media=cdrom")),
            };
            cmd.arg("-device")
                .arg(format!("ide-cd,bus=ide.{unit},drive=drive-{key},id={key}"));
        } else if let Some(n) = key.strip_prefix("net").filter(|_| indexed(key, "net")) {
            let mac = parts
                .iter()
                .find(|(k, v)| k.is_some() && v.contains(':'))
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            cmd.arg("-netdev").arg(format!("user,id=net{n}"));
            cmd.arg("-device")
                .arg(format!("virtio-net-pci,netdev=net{n},mac={mac},id={key}"));
        }
    }
    if config
        .get("agent")
        .is_some_and(|a| a.starts_with('1') || a.contains("enabled=1"))
    {
        cmd.arg("-chardev").arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            agent_socket.display()
        ));
        cmd.args([
            "-device",
            "virtio-serial",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    }
    let log =
        std::fs::File::create(run_dir.join(format!("{id}.qemu.log"))).map_err(|e| e.to_string())?;
    ctx.log(format!("starting {cmd:?}"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    let running = Running {
        child: Mutex::new(child),
        agent_socket,
        qmp_socket,
    };
    // The start task ends once QEMU answers on its monitor, as `qm start` does.
    for _ in 0..100 {
        if !running.alive() {
            let log =
                std::fs::read_to_string(run_dir.join(format!("{id}.qemu.log"))).unwrap_or_default();
            return Err(format!("start failed: QEMU exited: {}", log.trim()));
        }
        if running.qmp(json!({"execute": "query-status"})).is_ok() {
            return Ok(running);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("start failed: QEMU did not answer on its monitor".into())
}

/// Whether `key` is `base` followed by an index (`scsi0`, not `scsihw`).
fn indexed(key: &str, base: &str) -> bool {
    key.strip_prefix(base)
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}
