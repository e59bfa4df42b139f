//! The runtime's retries of its receive, send, flush and commit: retryable failures wait
//! 100 ms doubling up to 10 s and never give up on their own (`weir run`'s observer
//! watches from outside and cancels the pipeline); a shutdown ends the wait at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::error::{EngineError, Result};
use crate::record::OutRecord;
use crate::sink::Sink;
use crate::source::{Received, Source};

/// The longest wait between two attempts of the runtime's receive, send and commit.
pub(super) const RETRY_MAX_DELAY: Duration = Duration::from_secs(10);

/// The backoff of the runtime's receive, send and commit: 100 ms doubling up to 10 s,
/// without a give-up time (`Observer::give_up_after` of `weir run` and `weir serve`
/// watches from outside and cancels the pipeline).
pub(crate) fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), RETRY_MAX_DELAY)
}

/// The next delay of a [`retry_backoff`], which never gives up.
pub(crate) fn next_delay(backoff: &mut Backoff) -> Duration {
    backoff.next_delay().unwrap_or(RETRY_MAX_DELAY)
}

pub(crate) async fn recv_with_retry(
    source: &mut dyn Source,
    max: usize,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Received>> {
    let mut backoff = retry_backoff();
    loop {
        match source.recv(max, wait).await {
            Ok(r) => return Ok(Some(r)),
            Err(e) if e.is_retryable() => {
                let delay = next_delay(&mut backoff);
                tracing::warn!(error = %e, retry_in = ?delay, "receive failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Submits `batch` (see [`Sink::submit`]; acknowledged by the flush before the next
/// commit), retrying retryable failures.
pub(crate) async fn send_with_retry(
    sink: &mut dyn Sink,
    batch: &[OutRecord],
    shutdown: &CancellationToken,
) -> Result<()> {
    retry(sink, Some(batch), shutdown).await
}

/// Waits for every acknowledgement `sink` owes, retrying retryable failures.
pub(crate) async fn flush_with_retry(
    sink: &mut dyn Sink,
    shutdown: &CancellationToken,
) -> Result<()> {
    retry(sink, None, shutdown).await
}

async fn retry(
    sink: &mut dyn Sink,
    batch: Option<&[OutRecord]>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut backoff = retry_backoff();
    loop {
        let res = match batch {
            Some(b) => sink.submit(b).await,
            None => sink.flush().await,
        };
        match res {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => {
                let delay = next_delay(&mut backoff);
                tracing::warn!(sink = sink.name(), error = %e, retry_in = ?delay, "send failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(EngineError::Stopped(format!(
                        "shutdown while {} was unreachable; nothing past the undelivered batch was committed",
                        sink.name()
                    ))),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Commits `positions` to `source`, then (exactly-once) `transaction`, which holds them,
/// retrying retryable failures until `shutdown`.
pub(crate) async fn commit_with_retry(
    source: &mut dyn Source,
    positions: &[(crate::record::Position, crate::record::Checkpoint)],
    mut transaction: Option<&mut (dyn crate::sink::Transaction + 'static)>,
    shutdown: &CancellationToken,
) -> Result<()> {
    for in_transaction in [false, true] {
        let mut backoff = retry_backoff();
        loop {
            let res = match (in_transaction, transaction.as_deref_mut()) {
                (false, _) if !positions.is_empty() => source.commit(positions).await,
                (true, Some(t)) => t.commit().await,
                _ => Ok(()),
            };
            match res {
                Ok(()) => break,
                Err(e) if e.is_retryable() && !shutdown.is_cancelled() => {
                    let delay = next_delay(&mut backoff);
                    tracing::warn!(error = %e, retry_in = ?delay, transaction = in_transaction, "commit failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use tokio::time::Instant;

    use super::*;
    use crate::record::{Checkpoint, Position};

    /// A source whose first `fail` receives fail retryably, then returns `End`.
    struct Flaky {
        fail: u32,
        calls: Vec<Instant>,
    }

    #[async_trait]
    impl Source for Flaky {
        fn topic(&self) -> &str {
            "flaky"
        }
        async fn recv(&mut self, _max: usize, _wait: Duration) -> Result<Received> {
            self.calls.push(Instant::now());
            if self.calls.len() as u32 <= self.fail {
                return Err(EngineError::backend("test", "unreachable", true));
            }
            Ok(Received::End)
        }
        async fn commit(&mut self, _positions: &[(Position, Checkpoint)]) -> Result<()> {
            Ok(())
        }
    }

    fn gaps(calls: &[Instant]) -> Vec<u64> {
        calls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn receive_retries_wait_100ms_doubling_up_to_10s() {
        let mut s = Flaky {
            fail: 9,
            calls: Vec::new(),
        };
        let stop = CancellationToken::new();
        let r = recv_with_retry(&mut s, 1, Duration::ZERO, &stop).await;
        assert!(matches!(r, Ok(Some(Received::End))));
        assert_eq!(
            gaps(&s.calls),
            [100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_receive_retry_stops_at_once_on_shutdown() {
        let mut s = Flaky {
            fail: u32::MAX,
            calls: Vec::new(),
        };
        let stop = CancellationToken::new();
        let cancel = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            cancel.cancel();
        });
        let t0 = Instant::now();
        let r = recv_with_retry(&mut s, 1, Duration::ZERO, &stop).await;
        assert!(matches!(r, Ok(None)));
        assert_eq!(t0.elapsed(), Duration::from_millis(250));
        // Calls at 0 and 100 ms; the third, due at 300 ms, never happens.
        assert_eq!(gaps(&s.calls), [100]);
    }
}
