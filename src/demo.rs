//! The `[demo]` generator: like the seed's timer, `events` random seed-shaped events every
//! `interval` with wall-clock times, published to the pipeline's source topic.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weir_engine::config::PipelineConfig;
use weir_engine::generate::EventGenerator;
use weir_engine::{OutRecord, Sink};

/// Starts the generator on `tasks`, publishing to `sink` until `stop`.
pub fn spawn(
    tasks: &TaskTracker,
    c: &PipelineConfig,
    mut sink: Box<dyn Sink>,
    stop: CancellationToken,
) {
    tracing::info!(
        events = c.demo.events,
        every = ?c.demo.interval,
        users = c.demo.users,
        topic = %c.source.topic,
        "demo generator feeding the source topic (the seed's timer)"
    );
    let demo = c.demo.clone();
    tasks.spawn(async move {
        let mut g = EventGenerator::new(weir_engine::time::now_millis() as u64, demo.users as u64)
            .with_invalid_every(demo.invalid_every as u64);
        let mut tick = tokio::time::interval(demo.interval);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = weir_engine::time::now_millis();
            let batch: Vec<OutRecord> = (0..demo.events)
                .map(|_| {
                    let payload = g.event(now);
                    OutRecord {
                        key: Some(g.last_user().into_bytes().into()),
                        payload: payload.into_bytes().into(),
                        ..Default::default()
                    }
                })
                .collect();
            if let Err(e) = sink.send(&batch).await {
                tracing::warn!(error = %e, "demo generator could not publish");
            }
        }
    });
}
