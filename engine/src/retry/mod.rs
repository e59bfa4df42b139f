//! The retry topic: records a stage cannot handle *yet* are sent there with their attempt
//! count, a not-before time and the history of their failures, and come back into the
//! pipeline once their time has come. [`envelope`] encodes and decodes retry records;
//! [`source`] reads them back ([`WithRetries`]).

pub(crate) mod envelope;
pub(crate) mod source;

pub use crate::config::RetryConfig;
pub use envelope::RETRY_PARTITION_BASE;
pub use source::{RetrySink, WithRetries};
