//! The signals that end a command early, as one future: Ctrl-C (SIGINT), SIGTERM (a
//! supervisor, `timeout`, an agent's tool runner) and SIGHUP (a closed terminal). Work raced
//! against it (an image build, a download) is dropped when it fires, and dropping it stops
//! what it started and removes what it half made, before vmoat exits.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves with the signal's name when one of them arrives. Where a handler cannot be
/// installed, that signal keeps its default action (ending vmoat) and is not waited on.
pub async fn signal_received() -> &'static str {
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();

    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        Some(()) = async { term.as_mut()?.recv().await } => "SIGTERM",
        Some(()) = async { hup.as_mut()?.recv().await } => "SIGHUP",
    }
}
