use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = omni_image::cli::Cli::parse();
    omni_image::logging::init(cli.verbose);
    match omni_image::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
