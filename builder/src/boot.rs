//! `omni-image boot`: runs an image in QEMU the way Proxmox would (q35, OVMF, virtio disk
//! and network, serial console) and waits for the first-boot agent's ready line.
//!
//! KVM is used only where it works: on some hosts a full boot under KVM stops with an
//! "emulation failure"; that, or silence on the console, makes the boot start over with
//! TCG (software emulation).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::exec::Cmd;

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// A KVM boot that prints nothing for this long is taken as stuck.
const KVM_SILENCE: Duration = Duration::from_secs(30);

/// Lines on the console that mean the boot has failed for good.
const FATAL: &[&str] = &[
    "Kernel panic",
    "You are in emergency mode",
    "Give root password for maintenance",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BootArgs {
    /// The image (qcow2 or raw).
    pub image: PathBuf,
    /// A NoCloud seed (ISO or vfat image) attached as a CD-ROM.
    #[arg(long)]
    pub seed: Option<PathBuf>,
    /// Seconds to wait for the ready line.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Memory in MiB (at least 256).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..))]
    pub memory: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=288))]
    pub cpus: u32,
    /// Where the serial console is logged [default: IMAGE's folder, NAME.serial.log].
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Keep the guest's writes in this qcow2 overlay (created when missing) so a later boot
    /// with the same file sees them; without it, the image is not changed.
    #[arg(long, value_name = "OVERLAY")]
    pub state: Option<PathBuf>,
    /// After ready, run this shell command in the guest through its agent and print what it
    /// prints; repeatable. A command that fails makes the boot fail.
    #[arg(long = "exec", value_name = "COMMAND")]
    pub exec: Vec<String>,
    /// Hardware acceleration: auto uses KVM where it works, else TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
    /// MAC address of the virtual NIC (match it in a seed's network-config).
    #[arg(long, default_value = "52:54:00:12:34:56", value_parser = parse_mac)]
    pub mac: String,
    /// Wait for a console line containing this text instead of the agent's ready line (for
    /// images without omni-firstboot, e.g. "Cloud-init v." ... "finished").
    #[arg(long, value_name = "TEXT")]
    pub ready: Option<String>,
}

#[derive(Debug)]
pub struct Report {
    pub ready_after: Duration,
    pub accel: &'static str,
    pub ready_line: String,
    pub log: PathBuf,
    pub exec: Vec<(String, crate::qga::ExecResult)>,
}

pub fn run(args: &BootArgs) -> Result<()> {
    let report = boot(args)?;
    for (cmd, res) in &report.exec {
        println!("$ {cmd}");
        print!("{}", res.stdout);
        if !res.stderr.is_empty() {
            eprint!("{}", res.stderr);
        }
    }
    println!(
        "ready in {:.1}s ({}): {}",
        report.ready_after.as_secs_f64(),
        report.accel,
        report.ready_line.trim()
    );
    let failed: Vec<&str> = report
        .exec
        .iter()
        .filter(|(_, r)| r.exit_code != 0)
        .map(|(c, _)| c.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("commands failed in the guest: {}", failed.join("; "));
    }
    Ok(())
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// A raw disk with an MBR or a GPT's protective MBR ends its first sector with 55 AA.
fn has_boot_signature(path: &Path) -> bool {
    read_at(path, 510, 2).is_some_and(|b| b == [0x55, 0xaa])
}

/// An ISO 9660 volume (`CD001` in its first descriptor) or a FAT filesystem.
fn is_seed_image(path: &Path) -> bool {
    let iso = read_at(path, 32769, 5).is_some_and(|b| b == b"CD001");
    let fat = read_at(path, 0, 512).is_some_and(|b| {
        b[510..] == [0x55, 0xaa] && (b[54..57] == *b"FAT" || b[82..85] == *b"FAT")
    });
    iso || fat
}

fn image_format(image: &Path) -> Result<String> {
    let out = Cmd::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .with_context(|| format!("reading {}", image.display()))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["format"].as_str().unwrap_or("raw").to_owned())
}

/// `--mac`: six two-digit hex bytes separated by colons.
fn parse_mac(text: &str) -> std::result::Result<String, String> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("a MAC address is six hex bytes like 52:54:00:12:34:56".into())
    }
}

pub fn boot(args: &BootArgs) -> Result<Report> {
    crate::hosttools::check(crate::hosttools::Purpose::Boot)?;
    crate::interrupt::install();
    let what = |p: &std::path::Path| {
        if p.is_dir() {
            "is a folder, not a file"
        } else {
            "does not exist"
        }
    };
    if !args.image.is_file() {
        bail!("{} {}", args.image.display(), what(&args.image));
    }
    if let Some(seed) = &args.seed
        && !seed.is_file()
    {
        bail!("--seed: {} {}", seed.display(), what(seed));
    }
    let format = image_format(&args.image)?;
    if format == "raw" && !has_boot_signature(&args.image) {
        bail!(
            "{} is not a disk image: qemu-img reads it as raw and it has no partition table",
            args.image.display()
        );
    }
    if let Some(seed) = &args.seed
        && !is_seed_image(seed)
    {
        bail!(
            "--seed: {} is neither an ISO 9660 nor a FAT image; make one with `omni-image seed \
             USER_DATA -o seed.iso`",
            seed.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("omni-image-boot-")
        .tempdir()?;
    let vars = tmp.path().join("OVMF_VARS.fd");
    fs_err::copy(OVMF_VARS, &vars)?;
    let log_path = args.log.clone().unwrap_or_else(|| {
        let stem = args
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        args.image.with_file_name(format!("{stem}.serial.log"))
    });

    let (drive, drive_format, snapshot) = match &args.state {
        Some(state) => {
            if !state.exists() {
                let backing = args.image.canonicalize()?;
                Cmd::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", &format, "-b"])
                    .arg(&backing)
                    .arg(state)
                    .output()
                    .context("creating the --state overlay")?;
            }
            (state.clone(), "qcow2".to_owned(), false)
        }
        None => (args.image.clone(), format, true),
    };

    let mut accel = match args.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        Accel::Auto if kvm_usable() => "kvm",
        Accel::Auto => "tcg",
    };
    let start = Instant::now();
    loop {
        let attempt = Attempt {
            args,
            tmp: tmp.path(),
            vars: &vars,
            drive: &drive,
            drive_format: &drive_format,
            snapshot,
            accel,
        };
        match attempt.run(&log_path, start)? {
            Outcome::Ready(mut report) => {
                report.log = log_path;
                return Ok(report);
            }
            Outcome::KvmBroken(why) if args.accel == Accel::Auto => {
                tracing::info!("KVM does not work here ({why}); booting again with TCG");
                // The reset vars and a fresh start: nothing of the failed attempt is kept.
                fs_err::copy(OVMF_VARS, &vars)?;
                accel = "tcg";
            }
            Outcome::KvmBroken(why) => bail!("--accel kvm: {why}; use --accel tcg"),
        }
    }
}

enum Outcome {
    Ready(Report),
    KvmBroken(String),
}

struct Attempt<'a> {
    args: &'a BootArgs,
    tmp: &'a Path,
    vars: &'a Path,
    drive: &'a Path,
    drive_format: &'a str,
    snapshot: bool,
    accel: &'static str,
}

enum Line {
    Serial(String),
    Stderr(String),
    SerialClosed,
}

impl Attempt<'_> {
    fn command(&self) -> Command {
        let qga = self.tmp.join("qga.sock");
        let qmp = self.tmp.join("qmp.sock");
        let _ = std::fs::remove_file(&qga);
        let _ = std::fs::remove_file(&qmp);
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", &format!("q35,accel={}", self.accel)])
            .args(["-cpu", if self.accel == "kvm" { "host" } else { "max" }])
            .args([
                "-m",
                &self.args.memory.to_string(),
                "-smp",
                &self.args.cpus.to_string(),
            ])
            .args(["-nodefaults", "-display", "none", "-no-user-config"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                self.vars.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format={},cache=unsafe{}",
                self.drive.display(),
                self.drive_format,
                if self.snapshot { ",snapshot=on" } else { "" }
            ))
            // An entropy source, as Proxmox's rng0 gives: without one a guest under TCG can wait
            // seconds for its random pool before the first SSH host key can be made.
            .args(["-device", "virtio-rng-pci"])
            .args(["-netdev", "user,id=n0"])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={}", self.args.mac),
            ])
            .args([
                "-chardev",
                "stdio,id=ser0,signal=off",
                "-serial",
                "chardev:ser0",
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                qga.display()
            ))
            .args([
                "-device",
                "virtio-serial-pci",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(seed) = &self.args.seed {
            c.arg("-drive").arg(format!(
                "file={},media=cdrom,if=ide,readonly=on",
                seed.display()
            ));
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, log_path: &Path, start: Instant) -> Result<Outcome> {
        let mut cmd = self.command();
        tracing::debug!("+ {cmd:?}");
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        crate::interrupt::register_child(child.id());
        let guard = ChildGuard(&mut child);
        let (tx, rx) = mpsc::channel();
        let stdout = guard.0.stdout.take().expect("piped");
        let stderr = guard.0.stderr.take().expect("piped");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let _ = tx.send(Line::Serial(String::from_utf8_lossy(&line).into_owned()));
            }
            let _ = tx.send(Line::SerialClosed);
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(Line::Stderr(line));
            }
        });

        let mut log = fs_err::File::create(log_path)?;
        let attempt_start = Instant::now();
        let deadline = start + Duration::from_secs(self.args.timeout);
        let mut tail: std::collections::VecDeque<String> = Default::default();
        let mut seen_output = false;
        let mut qemu_errors = Vec::new();
        loop {
            crate::interrupt::check()?;
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "no ready line within {}s ({}); the console's last lines ({}):\n{}",
                    self.args.timeout,
                    self.accel,
                    log_path.display(),
                    tail_text(&tail)
                );
            }
            if self.accel == "kvm" && !seen_output && now - attempt_start > KVM_SILENCE {
                return Ok(Outcome::KvmBroken(format!(
                    "no console output in {}s",
                    KVM_SILENCE.as_secs()
                )));
            }
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(Line::Serial(raw)) => {
                    let line = strip_ansi(&raw);
                    writeln!(log, "{line}")?;
                    seen_output = seen_output || !line.trim().is_empty();
                    if tail.len() == 40 {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                    let marker = self
                        .args
                        .ready
                        .as_deref()
                        .unwrap_or(omni_firstboot::READY_MARKER);
                    if line.contains(marker) {
                        let ready_after = start.elapsed();
                        log.flush()?;
                        let exec = self.run_exec()?;
                        self.shut_down(guard.0);
                        return Ok(Outcome::Ready(Report {
                            ready_after,
                            accel: self.accel,
                            ready_line: line,
                            log: PathBuf::new(),
                            exec,
                        }));
                    }
                    if let Some(f) = FATAL.iter().find(|f| line.contains(*f)) {
                        bail!(
                            "the boot failed (`{f}`); the console's last lines ({}):\n{}",
                            log_path.display(),
                            tail_text(&tail)
                        );
                    }
                }
                Ok(Line::Stderr(line)) => {
                    tracing::debug!("qemu: {line}");
                    if self.accel == "kvm"
                        && (line.contains("emulation failure")
                            || line.contains("KVM internal error"))
                    {
                        return Ok(Outcome::KvmBroken(line));
                    }
                    qemu_errors.push(line);
                }
                Ok(Line::SerialClosed) => {
                    let status = guard.0.wait()?;
                    if self.accel == "kvm" && !seen_output {
                        return Ok(Outcome::KvmBroken(format!(
                            "qemu exited ({status}) before any output"
                        )));
                    }
                    bail!(
                        "qemu exited ({status}) before the ready line\n  qemu said: {}\n  console ({}):\n{}",
                        qemu_errors.join("\n    "),
                        log_path.display(),
                        tail_text(&tail)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("lost qemu's output"),
            }
        }
    }

    fn run_exec(&self) -> Result<Vec<(String, crate::qga::ExecResult)>> {
        if self.args.exec.is_empty() {
            return Ok(Vec::new());
        }
        let mut agent =
            crate::qga::Agent::connect(&self.tmp.join("qga.sock"), Duration::from_secs(120))?;
        let mut out = Vec::new();
        for cmd in &self.args.exec {
            let res = agent.exec(cmd, Duration::from_secs(120))?;
            out.push((cmd.clone(), res));
        }
        Ok(out)
    }

    /// With `--state` the guest is powered off cleanly so its writes are on disk (through
    /// its agent, else ACPI); otherwise its writes are thrown away and it is simply stopped.
    fn shut_down(&self, child: &mut Child) {
        if !self.snapshot {
            let asked =
                crate::qga::Agent::connect(&self.tmp.join("qga.sock"), Duration::from_secs(30))
                    .and_then(|mut a| a.shutdown())
                    .or_else(|_| qmp_powerdown(&self.tmp.join("qmp.sock")));
            if asked.is_ok() {
                let deadline = Instant::now() + Duration::from_secs(180);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            tracing::warn!(
                "the guest did not power off; stopping it (its last writes may be lost)"
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

struct ChildGuard<'a>(&'a mut Child);

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        crate::interrupt::unregister_child(self.0.id());
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn qmp_powerdown(socket: &Path) -> Result<()> {
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?; // greeting
    writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    writer.write_all(b"{\"execute\":\"system_powerdown\"}\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    Ok(())
}

fn tail_text(tail: &std::collections::VecDeque<String>) -> String {
    tail.iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Drops terminal escape sequences (colours, cursor moves) from console output.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_disk_and_seed_images_from_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.qcow2");
        std::fs::write(&text, "hello\n").unwrap();
        assert!(!has_boot_signature(&text) && !is_seed_image(&text));
        let mut sector = vec![0u8; 4096];
        sector[510] = 0x55;
        sector[511] = 0xaa;
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, &sector).unwrap();
        assert!(has_boot_signature(&disk));
        assert!(!is_seed_image(&disk), "a bare MBR is no FAT filesystem");
        sector[82..85].copy_from_slice(b"FAT");
        let fat = dir.path().join("seed.img");
        std::fs::write(&fat, &sector).unwrap();
        assert!(is_seed_image(&fat));
        let mut iso = vec![0u8; 40_000];
        iso[32769..32774].copy_from_slice(b"CD001");
        let iso_path = dir.path().join("seed.iso");
        std::fs::write(&iso_path, &iso).unwrap();
        assert!(is_seed_image(&iso_path));
    }

    #[test]
    fn strips_colour_codes() {
        assert_eq!(
            strip_ansi("[\u{1b}[0;32m  OK  \u{1b}[0m] Reached target\r"),
            "[  OK  ] Reached target"
        );
    }
}
