//! The one shutdown signal: SIGTERM or SIGINT cancel a token that servers, watchers and
//! downloads all share; a second signal exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. The process exits on the second.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutdown signal received; stopping (send it again to exit at once)");
        t.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(130);
    });
    Ok(token)
}

/// How long servers get after the shutdown signal to finish in-flight calls. Clients such as
/// kubelet keep connections open indefinitely, so waiting for them to close is not an option.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `server` (which starts draining when `token` fires) until it finishes, or until `grace`
/// has passed since the signal, whichever comes first.
pub async fn drain<E>(
    server: impl std::future::Future<Output = Result<(), E>>,
    token: &CancellationToken,
    grace: std::time::Duration,
) -> Result<(), E> {
    tokio::select! {
        r = server => r,
        () = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "grace period over with connections still open; exiting");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_is_bounded_by_the_grace_period() {
        let token = CancellationToken::new();
        token.cancel();
        let never = std::future::pending::<Result<(), ()>>();
        let started = tokio::time::Instant::now();
        drain(never, &token, GRACE).await.unwrap();
        assert_eq!(started.elapsed(), GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_returns_the_servers_result() {
        let token = CancellationToken::new();
        assert_eq!(
            drain(async { Err::<(), _>(7) }, &token, GRACE).await,
            Err(7)
        );
    }
}
