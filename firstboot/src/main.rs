use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use omni_firstboot::cli::{Cli, Command};
use omni_firstboot::datasource::Env;
use omni_firstboot::fsutil::Root;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    omni_firstboot::logging(cli.verbose);
    // Tools run with `--prefix` need an absolute path.
    let root = Root::new(std::path::absolute(&cli.root).unwrap_or(cli.root.clone()));
    let result = match cli.command {
        Command::Run(args) => {
            let options = omni_firstboot::run::Options {
                seed: args.seed,
                no_settle: args.no_settle,
            };
            let summary = omni_firstboot::run::run(&Env::new(root), &options);
            // Exactly one ready line, whatever happened: the boot goes on.
            let (ds, outcome) = match &summary {
                Ok(s) => (
                    s.datasource.clone().unwrap_or_else(|| "none".into()),
                    s.outcome.clone(),
                ),
                Err(err) => ("unknown".into(), format!("error: {err:#}")),
            };
            println!(
                "{} in {:.3}s (datasource: {ds}; {outcome})",
                omni_firstboot::READY_MARKER,
                started.elapsed().as_secs_f64()
            );
            summary.map(|_| 0)
        }
        Command::Status { json } => omni_firstboot::status::run(&root, json),
        Command::Check { user_data } => omni_firstboot::check_file(&user_data),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code as u8),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
