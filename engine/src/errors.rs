//! What happens to a record that a stage cannot handle: the error strategies
//! (`dead_letter`, `retry`, `skip`, `fail`) chosen per stage in `[errors]`, and the Rust
//! API's error callback that may choose differently for each record.

use crate::operator::{Emitted, Outcome};
use crate::output::dead_letter;
use crate::record::Record;
use crate::retry::RetryConfig;

/// The stage that validates and decodes events (`[errors] validate`).
pub const STAGE_VALIDATE: &str = "validate";
/// The enrichment stage (`[errors] enrich`).
pub const STAGE_ENRICH: &str = "enrich";

/// What to do with a record a stage failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Send it to the dead-letter topic with the reason (the default).
    DeadLetter,
    /// Send it to the retry topic; after `max_attempts` it goes to the dead letters with
    /// the history of its attempts.
    Retry,
    /// Drop it, counted as `skipped`.
    Skip,
    /// Stop the pipeline with an error, committing nothing past the failing record.
    Fail,
}

impl ErrorAction {
    /// Reads `dead_letter`, `retry`, `skip` or `fail`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "dead_letter" => ErrorAction::DeadLetter,
            "retry" => ErrorAction::Retry,
            "skip" => ErrorAction::Skip,
            "fail" => ErrorAction::Fail,
            _ => return None,
        })
    }

    /// The name used in `pipeline.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::DeadLetter => "dead_letter",
            ErrorAction::Retry => "retry",
            ErrorAction::Skip => "skip",
            ErrorAction::Fail => "fail",
        }
    }
}

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
    ) -> Self {
        let mut h = ErrorHandler {
            strategies,
            callback: None,
            retry,
            topic: topic.to_string(),
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

    /// Handles a record that `stage` failed on: a dead letter, a retry record, nothing
    /// (skipped) or a failure. `replaying` records had their outcome delivered before a
    /// restart, so nothing is produced for them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn handle(
        &mut self,
        stage: &str,
        rec: &Record,
        reason: &str,
        recoverable: bool,
        replaying: bool,
        now_ms: i64,
        out: &mut Emitted,
    ) -> Outcome {
        if self.plain_validate && stage == STAGE_VALIDATE && !replaying {
            out.dead.push(dead_letter(&self.topic, rec, reason));
            return Outcome::Dead;
        }
        let configured = self.configured(stage);
        let attempts = crate::retry::attempts(rec);
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
                out.dead.push(dead_letter(&self.topic, rec, reason));
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
            ErrorAction::Retry => {
                match &self.retry {
                    Some(cfg) => match cfg.next(&self.topic, rec, stage, reason, now_ms) {
                        Ok(r) => {
                            out.retry.push(r);
                            Outcome::Retried
                        }
                        Err(dead) => {
                            out.dead.push(dead);
                            Outcome::Dead
                        }
                    },
                    None => {
                        out.dead.push(dead_letter(
                        &self.topic,
                        rec,
                        &format!("{reason} (retry was chosen, but the pipeline has no [retry] topic)"),
                    ));
                        Outcome::Dead
                    }
                }
            }
        }
    }
}
