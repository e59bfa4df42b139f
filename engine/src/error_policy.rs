//! What happens to a record that a stage cannot handle: the error strategies
//! (`dead_letter`, `retry`, `skip`, `fail`) chosen per stage in `[errors]`, and the Rust
//! API's error callback that may choose differently for each record.

use crate::origin::Origin;
use crate::output::{dead_letter, dead_letter_from};
use crate::record::{OutRecord, Record};
use crate::retry::envelope::{wrap, AttemptLog};

pub use crate::config::ErrorAction;
use crate::config::RetryConfig;
use crate::config::STAGE_VALIDATE;
use crate::outcome::{Emitted, Outcome};

/// One failure, as the error callback sees it.
#[derive(Debug)]
pub struct ErrorEvent<'a> {
    /// The stage: `validate`, `enrich`, or a processor's name.
    pub stage: &'a str,
    /// The record as the stage saw it.
    pub record: &'a Record,
    /// Why it failed.
    pub reason: &'a str,
    /// Whether the stage expects a later attempt may succeed (e.g. an enrichment key that
    /// is not in its table yet).
    pub recoverable: bool,
    /// How many times this record went through the retry topic before.
    pub attempts: u32,
    /// The action `pipeline.toml` (or the job) sets for this stage.
    pub configured: ErrorAction,
}

/// A function that chooses the action for each failure.
pub type ErrorCallback = Box<dyn FnMut(&ErrorEvent<'_>) -> ErrorAction + Send>;

/// Decides and carries out what happens to failed records.
pub(crate) struct ErrorHandler {
    strategies: Vec<(String, ErrorAction)>,
    // In a mutex only so that the operator stays `Sync`; it is never contended.
    callback: Option<std::sync::Mutex<ErrorCallback>>,
    retry: Option<RetryConfig>,
    topic: String,
    /// The id of this run, written into its retry records.
    run: u64,
    /// The message to stop with, once a stage failed with [`ErrorAction::Fail`].
    pub(crate) failure: Option<String>,
    /// Whether the default validate action is a plain dead letter with no callback: the
    /// fast path.
    plain_validate: bool,
}

impl std::fmt::Debug for ErrorHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrorHandler")
            .field("strategies", &self.strategies)
            .field("callback", &self.callback.is_some())
            .field("retry", &self.retry)
            .finish()
    }
}

impl ErrorHandler {
    pub(crate) fn new(
        strategies: Vec<(String, ErrorAction)>,
        retry: Option<RetryConfig>,
        topic: &str,
        run: u64,
    ) -> Self {
        let mut h = ErrorHandler {
            strategies,
            callback: None,
            retry,
            topic: topic.to_string(),
            run,
            failure: None,
            plain_validate: false,
        };
        h.plain_validate = h.configured(STAGE_VALIDATE) == ErrorAction::DeadLetter;
        h
    }

    pub(crate) fn set_callback(&mut self, cb: ErrorCallback) {
        self.callback = Some(std::sync::Mutex::new(cb));
        self.plain_validate = false;
    }

    /// Whether some failure may stop the pipeline.
    pub(crate) fn may_fail(&self) -> bool {
        self.callback.is_some() || self.strategies.iter().any(|(_, a)| *a == ErrorAction::Fail)
    }

    fn configured(&self, stage: &str) -> ErrorAction {
        self.strategies
            .iter()
            .find(|(s, _)| s == stage)
            .map_or(ErrorAction::DeadLetter, |(_, a)| *a)
    }

    /// Handles a record (from `origin`) that `stage` failed on: a dead letter, a retry
    /// record, nothing (skipped) or a failure. `replaying` records had their outcome
    /// delivered before a restart, so nothing is produced for them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn handle(
        &mut self,
        stage: &str,
        rec: &Record,
        origin: &Origin,
        reason: &str,
        recoverable: bool,
        replaying: bool,
        now_ms: i64,
        out: &mut Emitted,
    ) -> Outcome {
        if self.plain_validate && stage == STAGE_VALIDATE && !replaying {
            out.dead.push(dead_letter(&self.topic, origin, rec, reason));
            return Outcome::Dead;
        }
        let configured = self.configured(stage);
        let attempts = origin.attempts();
        let action = match self.callback.as_mut() {
            Some(cb) => (cb.get_mut().unwrap_or_else(|p| p.into_inner()))(&ErrorEvent {
                stage,
                record: rec,
                reason,
                recoverable,
                attempts,
                configured,
            }),
            None => configured,
        };
        if replaying && action != ErrorAction::Fail {
            return Outcome::Replayed;
        }
        match action {
            ErrorAction::DeadLetter => {
                out.dead.push(dead_letter(&self.topic, origin, rec, reason));
                Outcome::Dead
            }
            ErrorAction::Skip => Outcome::Skipped,
            ErrorAction::Fail => {
                self.failure = Some(format!(
                    "stage `{stage}` failed on {} partition {} offset {}: {reason} (its error strategy is `fail`); nothing past this record was committed",
                    self.topic, rec.position.partition, rec.position.offset
                ));
                Outcome::Failed
            }
            ErrorAction::Retry => match &self.retry {
                Some(cfg) => {
                    match retry_or_give_up(
                        cfg,
                        &self.topic,
                        self.run,
                        rec,
                        origin,
                        stage,
                        reason,
                        now_ms,
                    ) {
                        Ok(r) => {
                            out.retry.push(r);
                            Outcome::Retried
                        }
                        Err(dead) => {
                            out.dead.push(dead);
                            Outcome::Dead
                        }
                    }
                }
                None => {
                    out.dead.push(dead_letter(
                        &self.topic,
                        origin,
                        rec,
                        &format!(
                            "{reason} (retry was chosen, but the pipeline has no [retry] topic)"
                        ),
                    ));
                    Outcome::Dead
                }
            },
        }
    }
}

/// For a record (from `origin`) that failed at `stage` with `reason`: its retry record,
/// or, once it used up `max_attempts`, its dead letter with the history of its attempts.
#[allow(clippy::too_many_arguments)]
fn retry_or_give_up(
    cfg: &RetryConfig,
    topic: &str,
    run: u64,
    rec: &Record,
    origin: &Origin,
    stage: &str,
    reason: &str,
    now_ms: i64,
) -> std::result::Result<OutRecord, OutRecord> {
    let mut meta = origin.retry_meta(topic, run);
    let attempt = meta.retries + 1;
    meta.history.push(AttemptLog {
        attempt,
        at: crate::time::format_rfc3339(now_ms),
        stage: stage.to_string(),
        error: reason.to_string(),
    });
    if attempt >= cfg.max_attempts {
        return Err(dead_letter_from(
            &meta.source.topic,
            meta.source.partition,
            meta.source.offset,
            rec,
            &format!("gave up after {attempt} attempts: {reason}"),
            serde_json::to_value(&meta.history).ok(),
        ));
    }
    meta.retries = attempt;
    let not_before = now_ms.saturating_add(cfg.delay(attempt).as_millis() as i64);
    Ok(wrap(rec, meta, not_before))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::record::Position;
    use crate::retry::envelope::unwrap;

    fn cfg() -> RetryConfig {
        RetryConfig {
            topic: "r".into(),
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_millis(350),
            max_attempts: 3,
        }
    }

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_max() {
        let c = cfg();
        assert_eq!(c.delay(1), Duration::from_millis(100));
        assert_eq!(c.delay(2), Duration::from_millis(200));
        assert_eq!(c.delay(3), Duration::from_millis(350));
    }

    #[test]
    fn a_retry_waits_by_the_backoff_and_gives_up_after_max_attempts_with_its_history() {
        let c = cfg();
        let rec = Record {
            key: Some(Bytes::from_static(b"k\xff")),
            payload: Bytes::from_static(b"{\"a\":1}"),
            timestamp: Some(42),
            position: Position {
                partition: 2,
                offset: 7,
            },
            ..Default::default()
        };
        let read_back = |out: OutRecord| {
            let (due, back) = unwrap(Record {
                payload: out.payload,
                position: crate::record::Position {
                    partition: crate::origin::Input::Retry.partition(0),
                    offset: 0,
                },
                ..Default::default()
            });
            let origin = Origin::of(&back);
            (due, back, origin)
        };
        let origin = Origin::of(&rec);
        let out =
            retry_or_give_up(&c, "src", 1, &rec, &origin, "enrich", "not yet", 1_000).unwrap();
        // The envelope's own tests check what it carries (retry::envelope).
        let (due, back, origin) = read_back(out);
        assert_eq!(due, 1_100);
        assert_eq!(origin.attempts(), 1);
        let out2 =
            retry_or_give_up(&c, "src", 1, &back, &origin, "enrich", "still not", 2_000).unwrap();
        let (due2, back2, origin2) = read_back(out2);
        assert_eq!(due2, 2_200);
        let dead =
            retry_or_give_up(&c, "src", 1, &back2, &origin2, "enrich", "never", 3_000).unwrap_err();
        let v: serde_json::Value = serde_json::from_slice(&dead.payload).unwrap();
        assert_eq!(v["error"], "gave up after 3 attempts: never");
        assert_eq!(v["source"]["topic"], "src");
        assert_eq!(v["source"]["partition"], 2);
        assert_eq!(v["source"]["offset"], 7);
        assert_eq!(v["attempts"].as_array().unwrap().len(), 3);
        assert_eq!(v["attempts"][0]["error"], "not yet");
        assert_eq!(v["payload"], "{\"a\":1}");
    }
}
