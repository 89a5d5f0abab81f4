//! Upload throughput: `omni-image upload` against `curl` sending the same 2 GiB qcow2 to the
//! same Proxmox VE double, one after the other, and the peak memory of each.
//!
//! Both are timed by the double itself, from the request's headers to the end of its body,
//! so the ratio compares the two clients under one server. Peak memory is the child's
//! maximum resident set size from `wait4`.
//!
//! Usage: `bench_upload [SIZE_MIB] [OUTPUT]` (2048 and `bench/results/upload.txt` by default).
//! Needs a release build of `omni-image`, `qemu-img` and `curl`.

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use omni_image_tests::pve_double::client::{omni, write_sidecars};
use omni_image_tests::pve_double::{Config, PveDouble, TOKEN_ID, TOKEN_SECRET};

/// Runs a command to completion; returns (success, wall seconds, peak RSS in KiB).
fn measure(cmd: &mut Command) -> anyhow::Result<(bool, f64, i64)> {
    let started = Instant::now();
    let child = cmd.stdout(std::process::Stdio::null()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped; the pointers are valid for the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    anyhow::ensure!(
        r == pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    let ok = std::process::ExitStatus::from_raw(status).success();
    std::mem::forget(child);
    Ok((ok, started.elapsed().as_secs_f64(), usage.ru_maxrss))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2048);
    let output = args.get(2).cloned().unwrap_or_else(|| {
        omni_image_tests::workspace()
            .join("bench/results/upload.txt")
            .display()
            .to_string()
    });

    let dir = tempfile::Builder::new().prefix("bench-upload-").tempdir()?;
    let image = dir.path().join("bench.qcow2");
    // Fully allocated, so the file really is SIZE bytes on the wire.
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=full"])
        .arg(&image)
        .arg(format!("{mib}M"))
        .status()?;
    anyhow::ensure!(st.success(), "qemu-img create failed");
    write_sidecars(&image, "bench");
    let size = std::fs::metadata(&image)?.len();

    let pve = PveDouble::start(Config::standard())?;
    eprintln!("uploading {} MiB with omni-image", size >> 20);
    let (ok, ours_wall, ours_rss) = measure(omni(&pve, "upload").arg(&image))?;
    anyhow::ensure!(ok, "omni-image upload failed");
    let ours = pve.uploads().last().cloned().expect("upload recorded");

    eprintln!("uploading {} MiB with curl", size >> 20);
    let sum = std::fs::read_to_string(image.with_file_name("bench.qcow2.sha256"))?;
    let sum = sum.split_whitespace().next().unwrap_or("").to_string();
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-o", "/dev/null", "--fail", "--cacert"])
        .arg(&pve.ca_file)
        .args([
            "-H",
            &format!("Authorization: PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}"),
        ])
        .args(["-F", "content=import", "-F", "checksum-algorithm=sha256"])
        .args(["-F", &format!("checksum={sum}")])
        .arg("-F")
        .arg(format!("filename=@{};filename=curl.qcow2", image.display()))
        .arg(format!("{}/nodes/pve/storage/local/upload", pve.url));
    let (ok, _, curl_rss) = measure(&mut curl)?;
    anyhow::ensure!(ok, "curl upload failed");
    let theirs = pve.uploads().last().cloned().expect("upload recorded");
    anyhow::ensure!(
        theirs.file_name == "curl.qcow2",
        "curl's upload was not recorded"
    );

    let rate = |bytes: u64, secs: f64| bytes as f64 / secs / (1 << 20) as f64;
    let ours_rate = rate(ours.size, ours.elapsed.as_secs_f64());
    let curl_rate = rate(theirs.size, theirs.elapsed.as_secs_f64());
    let mut report = String::new();
    writeln!(
        report,
        "upload of a {} MiB qcow2 to the Proxmox VE double over loopback TLS",
        size >> 20
    )?;
    writeln!(
        report,
        "omni-image: {ours_rate:.0} MiB/s ({:.2} s body)",
        ours.elapsed.as_secs_f64()
    )?;
    writeln!(
        report,
        "curl:       {curl_rate:.0} MiB/s ({:.2} s body)",
        theirs.elapsed.as_secs_f64()
    )?;
    writeln!(
        report,
        "ratio omni-image/curl: {:.2}",
        ours_rate / curl_rate
    )?;
    writeln!(report, "omni-image peak RSS: {} MiB", ours_rss / 1024)?;
    writeln!(report, "curl peak RSS:       {} MiB", curl_rss / 1024)?;
    writeln!(
        report,
        "omni-image upload command, end to end (import, template): {ours_wall:.1} s"
    )?;
    print!("{report}");
    if let Some(parent) = Path::new(&output).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&output, report)?;
    eprintln!("wrote {output}");
    Ok(())
}
