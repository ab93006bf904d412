//! What the binaries' `main`s share: exit codes and the runtime. Exit code 2 is a refused
//! config or argument (the message names the key), 1 a failure while running, 0 success;
//! every message is `<binary>: <message>` on stderr.

use std::fmt::Display;
use std::process::ExitCode;

/// A refused config or argument: the message on stderr, exit code 2.
pub fn refused(bin: &str, message: impl Display) -> ExitCode {
    eprintln!("{bin}: {message}");
    ExitCode::from(2)
}

/// The exit code of a run: 0, or 1 with the error and its causes on stderr.
pub fn exit(bin: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bin}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A multi-thread Tokio runtime with I/O and timers (`worker_threads`: `None` for one per
/// CPU); `Err` is the exit code when it cannot start (its reason on stderr).
pub fn runtime(bin: &str, worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder.enable_all().build().map_err(|e| {
        eprintln!("{bin}: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}
