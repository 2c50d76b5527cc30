//! What both daemons do around their work: run it on a runtime and turn its result into an exit
//! code, printing the error with its causes.

use std::error::Error;
use std::future::Future;
use std::process::ExitCode;

/// Runs `program` to completion and maps its result to the process exit code. An error prints
/// as `error: ` and its [`message`].
pub fn run_main<E>(program: impl Future<Output = Result<(), E>>) -> ExitCode
where
    E: Into<Box<dyn Error + Send + Sync>>,
{
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
            eprintln!("error: {}", message(e.into().as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `outer: cause: root cause`, leaving out a cause the
/// line already says (an error that prints its source, and also returns it as its source).
pub fn message(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("lock /s/lock: {0}")]
    struct SaysItsCause(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Outer(#[source] SaysItsCause);

    #[test]
    fn every_cause_once() {
        let io = std::io::Error::other("the store is in use");
        let e = Outer(SaysItsCause(io));
        assert_eq!(
            message(&e),
            "cannot start: lock /s/lock: the store is in use"
        );
    }
}
