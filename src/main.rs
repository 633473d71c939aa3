use std::process::ExitCode;

use clap::Parser;
use livebpf::cli::{Cli, execute};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livebpf: error: {e}");
            ExitCode::FAILURE
        }
    }
}
