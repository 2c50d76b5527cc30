//! Shows a fetch's progress: a progress bar when stderr is a terminal, a log line every few
//! seconds otherwise (CI, `kubectl logs`).

use crate::fetch::Progress;
use modelcache_core::size::Size;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Reports `progress` until `done` fires. `label` names what is fetched.
pub async fn report(progress: Arc<Progress>, label: String, done: CancellationToken) {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            // Sizes as everywhere else a user reads one (modelcache_core::size).
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {done}/{total} {rate}/s eta {eta}",
            )
            .expect("valid template")
            .with_key(
                "done",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}", Size(s.pos()));
                },
            )
            .with_key(
                "total",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}", Size(s.len().unwrap_or(0)));
                },
            )
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}", Size(s.per_sec() as u64));
                },
            )
            .progress_chars("=> "),
        );
        bar.set_message(label);
        loop {
            let v = progress.view();
            bar.set_length(v.bytes_total);
            bar.set_position(v.bytes_done);
            tokio::select! {
                () = done.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        bar.finish_and_clear();
    } else {
        loop {
            tokio::select! {
                () = done.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            let v = progress.view();
            tracing::info!(
                bytes_done = v.bytes_done,
                bytes_total = v.bytes_total,
                files_done = v.files_done,
                files_total = v.files_total,
                "{label}: progress"
            );
        }
    }
}
