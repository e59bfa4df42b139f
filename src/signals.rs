//! SIGINT (Ctrl-C) and SIGTERM (what orchestrators send): the first one stops gracefully,
//! a second one exits at once.

use std::sync::{Arc, OnceLock};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Both stop signals, registered (so neither kills the process any more).
struct Stops {
    int: Signal,
    term: Signal,
}

impl Stops {
    fn register() -> std::io::Result<Stops> {
        Ok(Stops {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal's name and the exit code of a process it ends (128 + its number).
    async fn next(&mut self) -> (&'static str, u8) {
        tokio::select! {
            _ = self.int.recv() => ("SIGINT", 130),
            _ = self.term.recv() => ("SIGTERM", 143),
        }
    }
}

/// A token cancelled by the first SIGINT or SIGTERM; a second one exits at once with
/// 128 + the signal's number, committing nothing more. The handlers are in place when
/// this returns.
pub fn stop_token() -> std::io::Result<CancellationToken> {
    stop_token_and_signal().map(|(token, _)| token)
}

/// The first stop signal's name and 128 + its number, once it came.
pub type FirstSignal = Arc<OnceLock<(&'static str, u8)>>;

/// [`stop_token`], and which signal cancelled it.
pub fn stop_token_and_signal() -> std::io::Result<(CancellationToken, FirstSignal)> {
    let mut stops = Stops::register()?;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let first = FirstSignal::default();
    let by = first.clone();
    tokio::spawn(async move {
        let (name, code) = stops.next().await;
        let _ = by.set((name, code));
        tracing::info!(
            "{name}: finishing the current batch, committing and stopping (send it again to stop at once)"
        );
        shutdown.cancel();
        let (name, code) = stops.next().await;
        tracing::warn!("{name} again: exiting at once; nothing more is committed");
        std::process::exit(code.into());
    });
    Ok((token, first))
}

/// Resolves on the first SIGINT or SIGTERM (for commands that just stop).
pub async fn first() {
    match Stops::register() {
        Ok(mut s) => {
            s.next().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for signals");
            std::future::pending::<()>().await
        }
    }
}
