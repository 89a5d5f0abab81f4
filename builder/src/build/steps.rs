//! Named, timed steps: a spinner on a terminal, plain lines otherwise, and the timings kept
//! for the manifest.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub step: String,
    pub seconds: f64,
}

#[derive(Debug, Default)]
pub struct Steps {
    pub timings: Vec<Timing>,
    started: Option<Instant>,
}

/// One running step. `note` updates what the step is doing; dropping it without `done`
/// (on an error) leaves the failure to be told by the caller.
pub struct Step<'a> {
    steps: &'a mut Steps,
    name: &'static str,
    start: Instant,
    bar: Option<ProgressBar>,
}

impl Steps {
    pub fn new() -> Self {
        Steps {
            timings: Vec::new(),
            started: Some(Instant::now()),
        }
    }

    pub fn start(&mut self, name: &'static str, what: &str) -> Step<'_> {
        let bar = crate::logging::fancy().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} {elapsed}")
                    .expect("static template"),
            );
            bar.set_prefix(name);
            bar.set_message(what.to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if bar.is_none() {
            tracing::info!("==> {name}: {what}");
        }
        Step {
            steps: self,
            name,
            start: Instant::now(),
            bar,
        }
    }

    pub fn total(&self) -> Duration {
        self.started.map(|s| s.elapsed()).unwrap_or_default()
    }
}

impl Step<'_> {
    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(msg.to_owned()),
            None => tracing::debug!("{}: {msg}", self.name),
        }
    }

    /// Prints a line that stays (above the spinner on a terminal), cut to a screen's width
    /// or so: the full text goes to the error.
    pub fn say(&self, msg: &str) {
        let msg = match msg.char_indices().nth(240) {
            Some((i, _)) => format!("{}...", &msg[..i]),
            None => msg.to_owned(),
        };
        let msg = msg.as_str();
        match &self.bar {
            Some(bar) => bar.println(format!("  {msg}")),
            None => tracing::info!("    {msg}"),
        }
    }

    pub fn done(self, summary: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        let line = format!("{} {summary} ({secs:.1}s)", self.name);
        match &self.bar {
            Some(bar) => bar.finish_with_message(format!("{summary} ({secs:.1}s)")),
            None => tracing::info!("    {line}"),
        }
        self.steps.timings.push(Timing {
            step: self.name.to_owned(),
            seconds: round(secs),
        });
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar
            && !bar.is_finished()
        {
            bar.abandon_with_message("failed");
        }
    }
}

pub fn round(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}
