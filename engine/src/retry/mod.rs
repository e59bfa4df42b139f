//! The retry topic: records a stage cannot handle *yet* are sent there with their attempt
//! count, a not-before time and the history of their failures, and come back into the
//! pipeline once their time has come. [`envelope`] encodes and decodes retry records;
//! [`source`] reads them back ([`WithRetries`]) as the merged source's
//! [`Input::Retry`](crate::origin::Input::Retry) partitions, and the operator sees each as an
//! [`Origin::Retry`](crate::origin::Origin::Retry).

pub(crate) mod envelope;
pub(crate) mod source;

pub use crate::config::RetryConfig;
pub use source::{RetrySink, WithRetries};
