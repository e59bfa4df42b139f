//! The `Sink` trait: where results and dead letters go.

use async_trait::async_trait;

use crate::error::Result;
use crate::record::OutRecord;

/// A destination for records: a topic, an exchange, a stream, or a file.
#[async_trait]
pub trait Sink: Send {
    /// The destination's name, for logs.
    fn name(&self) -> &str;

    /// Sends a batch and returns once the destination has acknowledged every record of it.
    ///
    /// On error none of the batch may be assumed delivered; the runtime will not commit
    /// the positions the batch was derived from.
    async fn send(&mut self, batch: &[OutRecord]) -> Result<()>;
}
