//! A client for the QEMU guest agent over its virtio-serial socket: enough to wait for the
//! agent, run a command and read what it printed. Proxmox talks to the same agent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};

pub struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// What a command run in the guest left behind.
#[derive(Debug)]
pub struct ExecResult {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

impl Agent {
    /// Connects and waits until the agent in the guest answers, up to `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Agent> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = (|| -> Result<Agent> {
                let stream = UnixStream::connect(socket)?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut agent = Agent {
                    reader: BufReader::new(stream.try_clone()?),
                    writer: stream,
                };
                agent.sync()?;
                Ok(agent)
            })();
            match attempt {
                Ok(agent) => return Ok(agent),
                Err(err) if Instant::now() >= deadline => {
                    return Err(err).context("the guest agent did not answer (is qemu-guest-agent installed and running?)");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// guest-sync: flushes stale replies from an earlier connection.
    fn sync(&mut self) -> Result<()> {
        let id: u32 = std::process::id() ^ (Instant::now().elapsed().subsec_nanos());
        self.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}))?;
        loop {
            let reply = self.read()?;
            if reply.get("return").and_then(Value::as_u64) == Some(u64::from(id)) {
                return Ok(());
            }
        }
    }

    fn send(&mut self, msg: &Value) -> Result<()> {
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .context("writing to the guest agent")?;
        Ok(())
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .context("reading from the guest agent")?;
            if n == 0 {
                bail!("the guest agent closed the connection");
            }
            // The agent may emit a 0xFF sentinel byte after guest-sync-delimited; skip noise.
            let text = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str(text)
                .with_context(|| format!("parsing agent reply `{text}`"));
        }
    }

    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.send(&json!({"execute": command, "arguments": arguments}))?;
        let reply = self.read()?;
        if let Some(err) = reply.get("error") {
            bail!(
                "guest agent: {command} failed: {}",
                err.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
            );
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Asks the guest to power off. The agent sends no reply to this command.
    pub fn shutdown(&mut self) -> Result<()> {
        self.send(&json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}))
    }

    /// Runs `sh -c script` in the guest and waits for it, up to `timeout`.
    pub fn exec(&mut self, script: &str, timeout: Duration) -> Result<ExecResult> {
        let started = self.call(
            "guest-exec",
            json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}),
        )?;
        let pid = started
            .get("pid")
            .and_then(Value::as_i64)
            .context("guest-exec returned no pid")?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.call("guest-exec-status", json!({"pid": pid}))?;
            if status.get("exited").and_then(Value::as_bool) == Some(true) {
                let text = |key: &str| {
                    status
                        .get(key)
                        .and_then(Value::as_str)
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                return Ok(ExecResult {
                    exit_code: status.get("exitcode").and_then(Value::as_i64).unwrap_or(-1),
                    stdout: text("out-data"),
                    stderr: text("err-data"),
                });
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{script}` did not finish within {}s in the guest",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
