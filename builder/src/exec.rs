//! The one way this program runs external commands: stdin closed, the command line logged at
//! debug level, and on failure an error that carries a command to paste and the tail of what
//! the command printed.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};

use anyhow::{Context, Result};

use crate::interrupt;

/// How many lines of a failed command's output an error carries.
const TAIL_LINES: usize = 25;

#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The command as a line a user can paste into a shell.
    pub fn display(&self) -> String {
        let mut words: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), quote(v)))
            .collect();
        words.push(quote(&self.program));
        words.extend(self.args.iter().map(|a| quote(a)));
        words.join(" ")
    }

    fn expression(&self) -> duct::Expression {
        let mut expr = duct::cmd(&self.program, &self.args).stdin_null();
        for (k, v) in &self.env {
            expr = expr.env(k, v);
        }
        expr
    }

    fn name(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }

    /// Runs the command to completion and returns its stdout.
    pub fn output(&self) -> Result<String> {
        tracing::debug!("+ {}", self.display());
        let out = self
            .expression()
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            .run()
            .with_context(|| format!("starting {} (is it installed?)", self.name()))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        if text.trim().is_empty() {
            text = String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let tail: VecDeque<String> = text.lines().map(str::to_owned).collect();
        Err(self.failure(out.status, &tail))
    }

    /// Runs the command to completion and returns stdout and stderr together.
    pub fn output_all(&self) -> Result<String> {
        tracing::debug!("+ {}", self.display());
        let out = self
            .expression()
            .stderr_to_stdout()
            .stdout_capture()
            .unchecked()
            .run()
            .with_context(|| format!("starting {} (is it installed?)", self.name()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(self.failure(out.status, &text.lines().map(str::to_owned).collect()))
        }
    }

    /// Runs the command, handing each line it prints (stdout and stderr merged) to `each`.
    pub fn run_lines(&self, mut each: impl FnMut(&str)) -> Result<()> {
        tracing::debug!("+ {}", self.display());
        let reader = self
            .expression()
            .stderr_to_stdout()
            .unchecked()
            .reader()
            .with_context(|| format!("starting {} (is it installed?)", self.name()))?;
        let pids = reader.pids();
        pids.iter().for_each(|p| interrupt::register_child(*p));
        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        let mut lines = BufReader::new(&reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match lines.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']);
                    tracing::trace!("{}: {line}", self.name());
                    each(line);
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.to_owned());
                }
                Err(err) => {
                    pids.iter().for_each(|p| interrupt::unregister_child(*p));
                    return Err(err).with_context(|| format!("reading output of {}", self.name()));
                }
            }
        }
        let status = reader.try_wait().ok().flatten().map(|o| o.status);
        pids.iter().for_each(|p| interrupt::unregister_child(*p));
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(self.failure(status, &tail)),
            None => anyhow::bail!("{} did not exit after closing its output", self.name()),
        }
    }

    fn failure(&self, status: std::process::ExitStatus, tail: &VecDeque<String>) -> anyhow::Error {
        if interrupt::interrupted() {
            return interrupt::Interrupted.into();
        }
        let skip = tail.len().saturating_sub(TAIL_LINES);
        let shown: Vec<&str> = tail.iter().skip(skip).map(String::as_str).collect();
        anyhow::anyhow!(
            "{} failed ({status})\n  command: {}\n  last output:\n    {}",
            self.name(),
            self.display(),
            shown.join("\n    ")
        )
    }
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(quote(OsStr::new("--mode=root")), "--mode=root");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }

    #[test]
    fn failure_carries_command_and_tail() {
        let err = Cmd::new("sh")
            .args(["-c", "echo first; echo boom >&2; exit 3"])
            .output();
        let msg = format!("{:#}", err.unwrap_err());
        assert!(
            msg.contains("sh -c 'echo first; echo boom >&2; exit 3'"),
            "{msg}"
        );
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn lines_are_streamed_in_order() {
        let mut seen = Vec::new();
        Cmd::new("sh")
            .args(["-c", "echo one; echo two >&2; echo three"])
            .run_lines(|l| seen.push(l.to_owned()))
            .unwrap();
        assert_eq!(seen, ["one", "two", "three"]);
    }

    #[test]
    fn missing_program_says_so() {
        let err = Cmd::new("no-such-tool-xyz").output().unwrap_err();
        assert!(format!("{err:#}").contains("starting no-such-tool-xyz"));
    }
}
