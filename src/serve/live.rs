//! The live view's feed: a tee [`Sink`] that, once the real sink acknowledged a batch of
//! window results, hands each to a broadcast [`Hub`] that every `/ws` client reads. A
//! broadcast channel never waits for its readers: a client that falls behind skips ahead.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::broadcast;
use weir_engine::{OutRecord, Sink};

/// Messages (JSON text) for the live view, plus the latest results for clients that join.
#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Arc<str>>,
    recent: Mutex<VecDeque<Arc<str>>>,
    keep: usize,
}

impl Hub {
    /// A hub whose readers may fall `lag` messages behind before skipping, and that replays
    /// the last `keep` results to a client that joins.
    pub fn new(lag: usize, keep: usize) -> Self {
        Hub {
            tx: broadcast::channel(lag.max(1)).0,
            recent: Mutex::new(VecDeque::with_capacity(keep)),
            keep,
        }
    }

    /// Sends `msg` to every client connected now (a message nobody reads is dropped).
    pub fn publish(&self, msg: Arc<str>) {
        let _ = self.tx.send(msg);
    }

    /// Publishes a window result (its JSON payload) and remembers it for clients to come.
    pub fn publish_result(&self, payload: &[u8]) {
        let msg: Arc<str> = format!(
            r#"{{"type":"result","result":{}}}"#,
            String::from_utf8_lossy(payload)
        )
        .into();
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == self.keep {
            recent.pop_front();
        }
        if self.keep > 0 {
            recent.push_back(msg.clone());
        }
        // Sent under the lock so a client joining now sees each result exactly once.
        self.publish(msg);
    }

    /// The remembered results and a receiver of every message from now on.
    pub fn subscribe(&self) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        (recent.iter().cloned().collect(), self.tx.subscribe())
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// A sink that forwards to `inner` and then publishes what it acknowledged to a [`Hub`].
pub struct LiveSink {
    inner: Box<dyn Sink>,
    hub: Arc<Hub>,
}

impl LiveSink {
    /// Tees `inner`'s acknowledged records to `hub`.
    pub fn new(inner: Box<dyn Sink>, hub: Arc<Hub>) -> Self {
        LiveSink { inner, hub }
    }
}

#[async_trait]
impl Sink for LiveSink {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&mut self, batch: &[OutRecord]) -> weir_engine::Result<()> {
        self.inner.send(batch).await?;
        for r in batch {
            self.hub.publish_result(&r.payload);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joining_client_gets_the_latest_results_then_new_ones() {
        let hub = Hub::new(4, 2);
        for i in 0..3 {
            hub.publish_result(format!(r#"{{"n":{i}}}"#).as_bytes());
        }
        let (recent, mut rx) = hub.subscribe();
        assert_eq!(
            recent.iter().map(|m| &**m).collect::<Vec<_>>(),
            [
                r#"{"type":"result","result":{"n":1}}"#,
                r#"{"type":"result","result":{"n":2}}"#
            ]
        );
        hub.publish_result(br#"{"n":3}"#);
        assert_eq!(
            &*rx.try_recv().unwrap(),
            r#"{"type":"result","result":{"n":3}}"#
        );
    }

    #[test]
    fn a_reader_that_falls_behind_skips_ahead_and_never_blocks_the_sender() {
        let hub = Hub::new(2, 0);
        let (_, mut rx) = hub.subscribe();
        for i in 0..5 {
            hub.publish(format!("{i}").into());
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(3))
        ));
        assert_eq!(&*rx.try_recv().unwrap(), "3");
    }
}
