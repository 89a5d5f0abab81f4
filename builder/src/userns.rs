//! Builds without root: `omni-image build` runs itself again inside a new user and mount
//! namespace in which it is root.
//!
//! The namespace maps id 0 to the invoking user and ids 1..=65536 to the user's first range
//! in `/etc/subuid` and `/etc/subgid` (written by the setuid `newuidmap`/`newgidmap` of the
//! `uidmap` package). Inside it every step sees the tree's files with the owners they have
//! in the image: mmdebstrap (in unshare mode, which as root only adds its own mount and pid
//! namespaces), the overlays, `chroot`, the base-tree archive and `mke2fs -d`, which records
//! the owners it sees. What the build writes outside the tree (the outputs, the cache) is
//! owned by the invoking user, because that user is root inside.
//!
//! The handshake: the outer process starts the inner one with two pipes named in
//! [`ENV`]. The inner one unshares its namespaces, says so on the first pipe and waits; the
//! outer one writes the id maps of the inner one's pid, then answers on the second pipe.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::exec::Cmd;

/// Set on the inner process: `READ_FD,WRITE_FD` of its ends of the handshake pipes.
pub const ENV: &str = "OMNI_IMAGE_USERNS";

/// Ids mapped besides 0: enough for every id a Debian system uses (nobody is 65534).
pub const IDS: u32 = 65536;

static INSIDE: AtomicBool = AtomicBool::new(false);

/// Whether this process runs the build inside the namespace [`rerun_inside`] set up.
pub fn inside() -> bool {
    INSIDE.load(Ordering::SeqCst)
}

/// A user's first subordinate id range, from `/etc/subuid` or `/etc/subgid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u32,
    pub count: u32,
}

/// The first range of `user` (by name or by numeric id) in the text of a subid file.
pub fn parse_subids(text: &str, user: &str, id: u32) -> Option<Range> {
    let id = id.to_string();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            let mut parts = l.trim().split(':');
            let (owner, start, count) = (parts.next()?, parts.next()?, parts.next()?);
            if owner != user && owner != id {
                return None;
            }
            Some(Range {
                start: start.trim().parse().ok()?,
                count: count.trim().parse().ok()?,
            })
        })
}

fn fix_hint(user: &str) -> String {
    format!(
        "give the user a range with `sudo usermod --add-subuids 100000-165535 --add-subgids \
         100000-165535 {user}` (pick a range no other user has in /etc/subuid and \
         /etc/subgid), or build as root with `sudo omni-image build ...`"
    )
}

fn subids(file: &str, user: &str, id: u32) -> Result<Range> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => bail!(
            "building without root needs {file}, which cannot be read ({err}); {}",
            fix_hint(user)
        ),
    };
    let Some(range) = parse_subids(&text, user, id) else {
        bail!(
            "building without root needs subordinate ids for {user} in {file}, and it has \
             none: {}",
            fix_hint(user)
        );
    };
    if range.count < IDS {
        bail!(
            "{file}: {user} has {} subordinate ids ({}..{}), a build without root needs \
             {IDS}: {}",
            range.count,
            range.start,
            range.start as u64 + range.count as u64,
            fix_hint(user)
        );
    }
    Ok(range)
}

fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid's result is read at once, before anything else can call it (the
    // process has one thread here).
    unsafe {
        let pw = libc::getpwuid(uid);
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned();
        }
    }
    std::env::var("USER").unwrap_or_else(|_| uid.to_string())
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("creating a pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: pipe() succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

/// Runs this same command line again inside a new user and mount namespace, and returns
/// its exit code. Fails, saying what to do, when the user has no subordinate ids or the
/// host lacks `newuidmap`/`newgidmap`.
///
/// Call it while the process has a single thread: the inner process starts from `exec`.
pub fn rerun_inside() -> Result<i32> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let user = user_name(uid);
    let subuid = subids("/etc/subuid", &user, uid)?;
    let subgid = subids("/etc/subgid", &user, uid)?;
    let mut maps = Vec::new();
    for (prog, id, range) in [("newuidmap", uid, subuid), ("newgidmap", gid, subgid)] {
        let Some(path) = crate::hosttools::find_program(prog) else {
            bail!(
                "building without root needs {prog}, which is missing: install the package \
                 uidmap (`sudo apt-get install uidmap`), or build as root with `sudo \
                 omni-image build ...`"
            );
        };
        maps.push((path, id, range));
    }

    let (child_read, parent_write) = pipe()?;
    let (parent_read, child_write) = pipe()?;
    set_cloexec(&parent_write);
    set_cloexec(&parent_read);
    let exe = std::env::current_exe().context("finding this program's path")?;
    let fds = {
        use std::os::fd::AsRawFd;
        format!("{},{}", child_read.as_raw_fd(), child_write.as_raw_fd())
    };
    let mut child = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(ENV, fds)
        .spawn()
        .with_context(|| format!("starting {} inside a user namespace", exe.display()))?;
    drop((child_read, child_write));
    crate::interrupt::forward_to(child.id());

    let mut parent_read = std::fs::File::from(parent_read);
    let mut parent_write = std::fs::File::from(parent_write);
    let mut byte = [0u8; 1];
    if parent_read.read(&mut byte).unwrap_or(0) == 0 {
        // The inner process ended before it entered its namespace; it said why.
        return Ok(exit_code(child.wait()?));
    }
    let pid = child.id().to_string();
    for (prog, id, range) in &maps {
        let result = Cmd::new(prog)
            .arg(&pid)
            .args(["0", &id.to_string(), "1"])
            .args(["1", &range.start.to_string(), &IDS.to_string()])
            .output();
        if let Err(err) = result {
            drop(parent_write);
            let _ = child.wait();
            let file = if prog.ends_with("newuidmap") {
                "/etc/subuid"
            } else {
                "/etc/subgid"
            };
            return Err(err.context(format!(
                "mapping ids for a build without root failed: check {user}'s range in {file} \
                 ({}..{}, it must not overlap another user's) and that {} is setuid root \
                 (reinstall the package uidmap)",
                range.start,
                range.start as u64 + IDS as u64,
                prog.display()
            )));
        }
    }
    parent_write
        .write_all(b"1")
        .context("starting the build inside its user namespace")?;
    drop(parent_write);
    // TODO: an inner process killed with SIGKILL leaves its scratch tree behind, with files
    // of subordinate ids; the outer one could remove it from a fresh namespace.
    Ok(exit_code(child.wait()?))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// In the process [`rerun_inside`] started: enters the namespace and becomes root in it.
/// Does nothing elsewhere. Must run before the process starts a thread.
pub fn enter_if_started_inside() -> Result<()> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(());
    };
    // SAFETY: the process has one thread yet, so nothing reads the environment meanwhile.
    unsafe { std::env::remove_var(ENV) };
    let value = value.to_string_lossy().into_owned();
    let (r, w) = value
        .split_once(',')
        .and_then(|(r, w)| Some((r.parse::<RawFd>().ok()?, w.parse::<RawFd>().ok()?)))
        .with_context(|| format!("{ENV}=`{value}` is malformed; unset it"))?;
    // SAFETY: the outer process passed these two pipe ends to this one alone.
    let (mut from_parent, mut to_parent) =
        unsafe { (std::fs::File::from_raw_fd(r), std::fs::File::from_raw_fd(w)) };
    // SAFETY: plain system calls; their results are checked.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "creating a user namespace failed ({err}): unprivileged user namespaces may be \
             switched off on this host (sysctl kernel.unprivileged_userns_clone, \
             user.max_user_namespaces, or an AppArmor restriction); build as root with \
             `sudo omni-image build ...`"
        );
    }
    to_parent
        .write_all(b"1")
        .context("signalling the outer process")?;
    drop(to_parent);
    let mut byte = [0u8; 1];
    if from_parent.read(&mut byte).unwrap_or(0) == 0 {
        // The outer process could not map the ids and reports why.
        std::process::exit(1);
    }
    drop(from_parent);
    // SAFETY: plain system calls; their results are checked.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(0, 0, 0) != 0
            || libc::setresuid(0, 0, 0) != 0
        {
            bail!(
                "becoming root inside the build's user namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    INSIDE.store(true, Ordering::SeqCst);
    tracing::debug!("building inside a user namespace (0 -> the invoking user, 1.. -> subids)");
    Ok(())
}

/// The command that removes a tree written inside the namespace (its files belong to
/// subordinate ids, which the invoking user cannot remove directly).
pub fn removal_hint(dir: &Path) -> String {
    format!(
        "unshare --map-root-user --map-auto rm -rf {}",
        crate::exec::quote(dir.as_os_str())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_range_of_the_user_is_used() {
        let text = "# comment\nalice:200000:65536\nbob:100000:65536\nbob:300000:65536\n";
        assert_eq!(
            parse_subids(text, "bob", 1001),
            Some(Range {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            parse_subids("1001:400000:70000\n", "carol", 1001),
            Some(Range {
                start: 400000,
                count: 70000
            })
        );
        assert_eq!(parse_subids(text, "carol", 1002), None);
        assert_eq!(parse_subids("carol:x:65536\n", "carol", 1), None);
    }

    #[test]
    fn a_missing_range_names_the_file_and_the_fix() {
        let err = subids("/nonexistent/subuid", "carol", 4242)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/subuid"), "{err}");
        assert!(err.contains("usermod --add-subuids"), "{err}");
        assert!(err.contains("sudo omni-image build"), "{err}");
    }
}
