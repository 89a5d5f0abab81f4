//! Command-line interface: argument structs and dispatch, one subcommand per module.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "omni-image", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log more: -v for debug (every external command), -vv for trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an appliance image from a recipe.
    Build(crate::build::BuildArgs),
    /// Boot an image in QEMU and wait until it reports ready.
    Boot(crate::boot::BootArgs),
    /// Write a NoCloud seed ISO from a cloud-config file, the way Proxmox writes its drive.
    Seed(crate::seed::SeedArgs),
    /// Upload an image to Proxmox VE and make a template of it.
    Upload(crate::proxmox::UploadArgs),
    /// Clone a template in Proxmox VE, configure it and start it.
    Deploy(crate::proxmox::DeployArgs),
    /// Show what changed between two builds, from their manifests.
    Diff(crate::diff::DiffArgs),
    /// List or prune the cache of packages, artifacts and bootstrapped base trees.
    Cache(crate::cache::cli::CacheArgs),
    /// Check that every host tool a command needs is installed, and install what is missing.
    Setup(SetupArgs),
    /// Print the Tailscale ACL grant tsidp needs, as HuJSON to paste into the policy file.
    Acl(crate::acl::AclArgs),
}

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Install the missing Debian packages with apt-get (needs root).
    #[arg(long)]
    pub install: bool,
    /// Only check the tools of this command (build, boot, seed); all of them by default.
    #[arg(long = "for", value_name = "COMMAND")]
    pub for_command: Option<crate::hosttools::Purpose>,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(args) => crate::build::run(&args),
        Command::Boot(args) => crate::boot::run(&args),
        Command::Seed(args) => crate::seed::run(&args),
        Command::Upload(args) => crate::proxmox::run_upload(&args),
        Command::Deploy(args) => crate::proxmox::run_deploy(&args),
        Command::Diff(args) => crate::diff::run(&args),
        Command::Cache(args) => crate::cache::cli::run(&args),
        Command::Setup(args) => crate::hosttools::setup(args.for_command, args.install),
        Command::Acl(args) => crate::acl::run(&args),
    }
}

/// The default folder for outputs.
pub fn default_output_dir() -> PathBuf {
    PathBuf::from("out")
}
