//! The agent's journal under `/var/lib/omni-firstboot/`: which instance ran, from which
//! datasource, each step's outcome. Written atomically after every step, so a run cut short
//! by power loss resumes at the first step not done.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, Owner, Root};

pub const DIR: &str = "/var/lib/omni-firstboot";
pub const FILE: &str = "/var/lib/omni-firstboot/state.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Done,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub status: Status,
    /// What the step did or why it failed: names and paths, never a secret.
    pub detail: String,
    pub ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Boot {
    pub at: String,
    pub datasource: Option<String>,
    pub outcome: String,
    pub ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub instance_id: String,
    pub datasource: String,
    /// The SMBIOS system uuid the instance ran on; a different one means a clone.
    pub machine_uuid: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub steps: Vec<Step>,
    /// Appliance keys that are required and absent: the services that need them stay off.
    pub missing_secrets: Vec<String>,
    /// Anything wrong with the input or a step, one line each.
    pub problems: Vec<String>,
    /// User-data keys that were not applied.
    pub unimplemented_keys: Vec<String>,
    pub last_boot: Option<Boot>,
}

impl State {
    pub fn path(root: &Root) -> PathBuf {
        root.join(FILE)
    }

    pub fn load(root: &Root) -> Result<Option<State>> {
        let path = Self::path(root);
        let Some(bytes) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        match serde_json::from_slice(&bytes) {
            Ok(state) => Ok(Some(state)),
            Err(err) => {
                tracing::warn!("{} is unreadable ({err}); starting afresh", path.display());
                Ok(None)
            }
        }
    }

    pub fn save(&self, root: &Root) -> Result<()> {
        fsutil::ensure_dir(&root.join(DIR), 0o700, None)?;
        let json = serde_json::to_vec_pretty(self).context("serialising the state")?;
        fsutil::write_atomic(
            &Self::path(root),
            &json,
            0o600,
            Some(Owner::ROOT).filter(|_| root.is_live()),
        )
        .context("saving the first-boot state")
    }

    pub fn done(&self, step: &str) -> bool {
        self.steps
            .iter()
            .any(|s| s.name == step && s.status != Status::Failed)
    }

    pub fn record(&mut self, step: Step) {
        self.steps.retain(|s| s.name != step.name);
        self.steps.push(step);
    }
}

pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Millisecond)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
