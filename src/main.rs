use std::process::ExitCode;

use clap::Parser;
use livebpf::cli::{Cli, CliError, execute};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`livebpf dump ... | head`): nothing left to say to anyone.
        Err(CliError::Write { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("livebpf: error: {e}");
            ExitCode::FAILURE
        }
    }
}
