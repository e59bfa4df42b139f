//! One backoff for the workspace: exponential delays with a cap and an optional give-up
//! time, and [`retry`], which retries a fallible call with a log line from the first
//! failure, stops at once on cancellation and gives up when the time is over.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{EngineError, Result};
use crate::time::human;

/// Exponential delays: `initial`, twice that, … up to `max`; `None` once `give_up_after`
/// (counted from the first call of [`next_delay`](Backoff::next_delay)) has passed.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    give_up_after: Option<Duration>,
    started: Option<Instant>,
    attempts: u32,
}

impl Backoff {
    /// Delays from `initial` doubling up to `max`, forever.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            next: initial,
            max,
            give_up_after: None,
            started: None,
            attempts: 0,
        }
    }

    /// The workspace's usual delays for a broker call: 200 ms doubling up to 10 s.
    pub fn broker() -> Self {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
    }

    /// Gives up (no more delays) once this much time passed since the first failure;
    /// `None` retries forever.
    pub fn give_up_after(mut self, limit: Option<Duration>) -> Self {
        self.give_up_after = limit;
        self
    }

    /// How many delays were handed out.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// How long since the first failure.
    pub fn elapsed(&self) -> Duration {
        self.started.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// The delay before the next attempt, or `None` when the give-up time has passed. The
    /// last delay is shortened so the final attempt happens at the give-up time.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let started = *self.started.get_or_insert_with(Instant::now);
        let mut delay = self.next;
        if let Some(limit) = self.give_up_after {
            let left = limit.checked_sub(started.elapsed())?;
            if left.is_zero() {
                return None;
            }
            delay = delay.min(left);
        }
        self.next = (self.next * 2).min(self.max);
        self.attempts += 1;
        Some(delay)
    }
}

/// Calls `op` until it succeeds, fails with an error that is not retryable, `backoff`
/// gives up (the last error, saying so), or `stop` is cancelled (`Ok(None)`). Every
/// retryable failure is logged, from the first one, naming `what`.
pub async fn retry<T, F, Fut>(
    what: &str,
    mut backoff: Backoff,
    stop: &CancellationToken,
    mut op: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            r = op() => r,
        };
        let e = match outcome {
            Ok(v) => {
                if backoff.attempts() > 0 {
                    tracing::info!(
                        "{what}: succeeded after {} attempts",
                        backoff.attempts() + 1
                    );
                }
                return Ok(Some(v));
            }
            Err(e) if e.is_retryable() => e,
            Err(e) => return Err(e),
        };
        let Some(delay) = backoff.next_delay() else {
            return Err(gave_up(what, &backoff, e));
        };
        tracing::warn!(
            attempt = backoff.attempts(),
            error = %e,
            "{what} failed; retrying in {}{}",
            human(delay),
            match backoff.give_up_after {
                Some(limit) => format!(" (giving up after {})", human(limit)),
                None => String::new(),
            }
        );
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn gave_up(what: &str, backoff: &Backoff, e: EngineError) -> EngineError {
    e.final_with(format!(
        "{what}: gave up after {} attempts in {}",
        backoff.attempts() + 1,
        human(backoff.elapsed())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn unreachable() -> EngineError {
        EngineError::backend("test", "connection refused", true)
    }

    #[tokio::test(start_paused = true)]
    async fn delays_double_up_to_the_cap_and_stop_at_the_give_up_time() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500))
            .give_up_after(Some(Duration::from_secs(2)));
        let mut seen = Vec::new();
        while let Some(d) = b.next_delay() {
            seen.push(d.as_millis());
            tokio::time::advance(d).await;
        }
        // 100+200+400+500+500 = 1700; the last delay is cut to the 300 ms left.
        assert_eq!(seen, [100, 200, 400, 500, 500, 300]);
        assert_eq!(b.attempts(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_gives_up_with_the_last_error_and_a_non_retryable_one() {
        let calls = AtomicU32::new(0);
        let stop = CancellationToken::new();
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1))
            .give_up_after(Some(Duration::from_secs(3)));
        let started = Instant::now();
        let r: Result<Option<()>> = retry("connecting to test", b, &stop, || {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err(unreachable()) }
        })
        .await;
        let e = r.unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            "test: connecting to test: gave up after 4 attempts in 3s: connection refused"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_succeeds_after_failures_and_stops_on_cancellation() {
        let calls = AtomicU32::new(0);
        let stop = CancellationToken::new();
        let r = retry("x", Backoff::broker(), &stop, || {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move {
                if n < 3 {
                    Err(unreachable())
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), Some(3));

        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stopper.cancel();
        });
        let started = Instant::now();
        let r: Result<Option<()>> = retry("x", Backoff::broker(), &stop, || async {
            Err(unreachable())
        })
        .await;
        assert!(r.unwrap().is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<Option<()>> =
            retry("x", Backoff::broker(), &CancellationToken::new(), || {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err(EngineError::backend("test", "no such topic", false)) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
