use std::fs::File;
use std::io::{LineWriter, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use livebpf::cli::{Cli, CliError, execute};

/// Whether file descriptor 1 was closed when the process started (`livebpf run ... >&-`).
/// Before `main`, Rust's runtime reopens a closed standard descriptor on `/dev/null`, after which
/// every write would succeed; so this is found out earlier, by an ELF constructor.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

#[cfg(target_os = "linux")]
extern "C" fn check_stdout() {
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails only for a closed descriptor.
    if unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) } == -1 {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static CHECK_STDOUT: extern "C" fn() = check_stdout;

/// Standard output as a file that reports every failed write: `std::io::Stdout` pretends that
/// writes to a descriptor that is not open for writing (EBADF) succeed.
enum Stdout {
    Open(LineWriter<File>),
    /// Every write fails with this errno: EBADF when stdout is closed.
    Unusable(i32),
}

impl Stdout {
    fn new() -> Stdout {
        if STDOUT_CLOSED.load(Ordering::Relaxed) {
            return Stdout::Unusable(libc::EBADF);
        }
        match std::io::stdout().as_fd().try_clone_to_owned() {
            Ok(fd) => Stdout::Open(LineWriter::new(File::from(fd))),
            Err(e) => Stdout::Unusable(e.raw_os_error().unwrap_or(libc::EBADF)),
        }
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stdout::Open(w) => w.write(buf),
            Stdout::Unusable(errno) => Err(std::io::Error::from_raw_os_error(*errno)),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stdout::Open(w) => w.flush(),
            Stdout::Unusable(_) => Ok(()),
        }
    }
}

/// Exit status 1 for every error, a failed write to stdout included; clap's usage errors are 2.
fn fail(e: CliError) -> ExitCode {
    // Not eprintln!, which panics when stderr cannot be written either.
    let _ = writeln!(std::io::stderr(), "livebpf: error: {e}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: normal output, whose failed write is an error as for a command.
        Err(e) if !e.use_stderr() => {
            let printed = if STDOUT_CLOSED.load(Ordering::Relaxed) {
                Err(std::io::Error::from_raw_os_error(libc::EBADF))
            } else {
                e.print().and_then(|()| std::io::stdout().flush())
            };
            return match printed {
                Ok(()) => ExitCode::SUCCESS,
                Err(source) => fail(CliError::Stdout { source }),
            };
        }
        Err(e) => e.exit(),
    };
    match execute(cli, &mut Stdout::new()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
