//! `omni-firstboot status`: what ran, when, from where, and what failed or is missing.

use anyhow::Result;

use crate::fsutil::Root;
use crate::state::{State, Status};

pub fn run(root: &Root, json: bool) -> Result<i32> {
    let state = State::load(root)?;
    if json {
        let value = match &state {
            Some(s) => serde_json::to_value(s)?,
            None => serde_json::json!({ "instance_id": null }),
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(state.as_ref().map(exit_code).unwrap_or(2));
    }
    let Some(s) = state else {
        println!("omni-firstboot has not run on this machine yet.");
        return Ok(2);
    };
    print!("{}", render(&s));
    Ok(exit_code(&s))
}

/// 0: the last run finished (or found no seed); 1: a step failed; 2: not run or unfinished.
pub fn exit_code(s: &State) -> i32 {
    if s.steps.iter().any(|st| st.status == Status::Failed) {
        1
    } else if s.instance_id.is_empty() {
        if s.last_boot.is_some() { 0 } else { 2 }
    } else if s.finished_at.is_some() {
        0
    } else {
        2
    }
}

pub fn render(s: &State) -> String {
    let mut out = String::new();
    if s.instance_id.is_empty() {
        out.push_str("no instance configured yet\n");
        if let Some(b) = &s.last_boot {
            out.push_str(&format!("last boot:   {} {}\n", b.at, b.outcome));
        }
        return out;
    }
    out.push_str(&format!("instance:    {}\n", s.instance_id));
    out.push_str(&format!("datasource:  {}\n", s.datasource));
    let took = s
        .duration_ms
        .map(|ms| format!(" ({:.3} s)", ms as f64 / 1000.0))
        .unwrap_or_default();
    match &s.finished_at {
        Some(f) => out.push_str(&format!("ran:         {} .. {f}{took}\n", s.started_at)),
        None => out.push_str(&format!("ran:         {} (not finished)\n", s.started_at)),
    }
    out.push_str("steps:\n");
    for step in &s.steps {
        let status = match step.status {
            Status::Done => "done",
            Status::Failed => "FAILED",
            Status::Skipped => "skipped",
        };
        out.push_str(&format!(
            "  {status:<8} {:<18} {}\n",
            step.name, step.detail
        ));
    }
    if !s.missing_secrets.is_empty() {
        out.push_str("missing secrets (their services stay stopped):\n");
        for m in &s.missing_secrets {
            out.push_str(&format!("  {m}\n"));
        }
    }
    if !s.problems.is_empty() {
        out.push_str("problems:\n");
        for p in &s.problems {
            out.push_str(&format!("  {p}\n"));
        }
    }
    if !s.unimplemented_keys.is_empty() {
        out.push_str(&format!(
            "not applied: {}\n",
            s.unimplemented_keys.join(", ")
        ));
    }
    if let Some(b) = &s.last_boot {
        out.push_str(&format!("last boot:   {} {}\n", b.at, b.outcome));
    }
    out
}
