//! What every modelcache binary's `main` does after parsing its flags: run the async program on
//! a multi-threaded runtime and turn an error into `error: …` with its causes and exit code 1,
//! never a backtrace.

use std::future::Future;
use std::process::ExitCode;

/// Runs `program` to completion and maps its result to the process exit code.
pub fn run_main(program: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
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
