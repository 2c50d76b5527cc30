//! What both daemons do around their work: run it on a runtime and turn its result into an exit
//! code, printing the whole error chain.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// Runs `program` to completion and maps its result to the process exit code. An error prints
/// with `{:#}`, which shows every cause of an `anyhow` chain.
pub fn run_main<E: Display>(program: impl Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(program) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
