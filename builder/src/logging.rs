//! Logging for people, on stderr: plain lines without timestamps, more with `-v`.
//! `RUST_LOG` overrides the level; `NO_COLOR` turns colour off.

use std::io::IsTerminal;

pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .without_time()
        .with_target(false)
        .try_init();
}

/// Whether progress bars may be drawn: only on a terminal.
pub fn fancy() -> bool {
    std::io::stderr().is_terminal()
}
