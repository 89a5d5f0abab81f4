//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "omni-firstboot", version, about, max_term_width = 100)]
pub struct Cli {
    /// Configure the tree in DIR instead of the running system (for tests and image checks).
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    /// Log more (-v: every external command).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// There is no default: `run` changes the machine it runs on, so it is asked for by name.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Find the cloud-init data and apply it if its instance is new (what the unit runs).
    Run(RunArgs),
    /// Show what ran, when, from which datasource, and what failed or is missing.
    Status {
        /// Print the state as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Check a user-data file (and its omni_appliance section) without applying it.
    Check {
        /// The user-data file.
        user_data: PathBuf,
    },
}

#[derive(Debug, Default, clap::Args)]
pub struct RunArgs {
    /// Read this seed (a NoCloud or config-2 directory, ISO or FAT image, or device) instead of
    /// looking for one.
    #[arg(long, value_name = "PATH")]
    pub seed: Option<PathBuf>,
    /// Do not wait for udev when no seed is found at once.
    #[arg(long)]
    pub no_settle: bool,
}
