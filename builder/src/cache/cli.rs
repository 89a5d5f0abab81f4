//! `omni-image cache list|prune`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Result;

use super::{BaseCache, short};
use crate::size::human;

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// The cache folder [default: $XDG_CACHE_HOME/omni-image or ~/.cache/omni-image].
    #[arg(long, env = "OMNI_IMAGE_CACHE", global = true)]
    pub cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List the cached base trees and the size of each part of the cache.
    List,
    /// Remove base trees not used for a while, incomplete entries, and (with --all)
    /// everything.
    Prune {
        /// Keep base trees used within this many days.
        #[arg(long, default_value_t = 14)]
        days: u64,
        /// Remove the whole cache: base trees, packages and artifacts.
        #[arg(long)]
        all: bool,
    },
}

fn dir_size(path: &std::path::Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

pub fn run(args: &CacheArgs) -> Result<()> {
    let root = args
        .cache_dir
        .clone()
        .unwrap_or_else(crate::build::default_cache_dir);
    let base = BaseCache::new(&root);
    match args.action {
        Action::List => {
            println!("cache: {}", root.display());
            for part in ["apt", "artifacts", "fetched", "base"] {
                println!("  {part:<10} {}", human(dir_size(&root.join(part))));
            }
            for e in base.list()? {
                let age = e
                    .modified
                    .and_then(|m| SystemTime::now().duration_since(m).ok())
                    .map(|d| format!("used {}h ago", d.as_secs() / 3600))
                    .unwrap_or_else(|| "incomplete".into());
                println!(
                    "  base {}  {:>10}  {age}  {}",
                    short(&e.key),
                    human(e.bytes),
                    e.label
                );
            }
        }
        Action::Prune { days, all } => {
            if all {
                if root.exists() {
                    fs_err::remove_dir_all(&root)?;
                }
                eprintln!("removed {}", root.display());
                return Ok(());
            }
            let horizon = SystemTime::now() - Duration::from_secs(days * 86_400);
            let mut freed = 0;
            for e in base.list()? {
                let _lock = base.lock(&e.key)?;
                if !e.complete || e.modified.is_none_or(|m| m < horizon) {
                    base.remove(&e.key);
                    freed += e.bytes;
                }
            }
            eprintln!("freed {}", human(freed));
        }
    }
    Ok(())
}
